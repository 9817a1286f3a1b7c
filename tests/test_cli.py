import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from incseg.cli import app

runner = CliRunner()


def all_commands():
    """(path, click command) for every command and sub-command of the app, found by walking it."""
    import typer.main

    def walk(cmd, path):
        yield path, cmd
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_every_command_has_help_naming_what_it_does_and_every_option():
    commands = all_commands()
    names = {" ".join(path) for path, _ in commands}
    assert {"init", "data synth", "data add", "validate", "bootstrap", "update", "watch", "serve", "models",
            "promote", "approve", "reject", "rollback", "ui", "predict", "export", "bench", "demo"} <= names
    for path, cmd in commands:
        result = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert result.exit_code == 0, (path, result.output)
        summary = (cmd.help or "").strip().splitlines()
        assert summary and summary[0].split()[0] in result.output, (path, "no description")
        for param in cmd.params:
            if param.param_type_name == "option" and param.name != "help":
                assert param.help, (path, param.name, "option without help")
                assert param.opts[0] in result.output, (path, param.opts[0])
            if param.param_type_name == "argument":
                assert param.help and param.name in result.output.lower(), (path, param.name)


def test_a_command_list_reflows_each_summary():
    """A docstring's line breaks are the source's, not the help's: a group's list of commands shows each
    command's first paragraph as one flowing text (Markdown help), not cut where the source line ended."""
    groups = [(path, cmd) for path, cmd in all_commands() if getattr(cmd, "commands", None)]
    assert [path for path, _ in groups] == [[], ["data"]]
    for path, cmd in groups:
        output = " ".join(runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"}).output.split())
        for name, sub in cmd.commands.items():
            first = (sub.help or "").strip().split("\n\n")[0]
            assert " ".join(first.replace("`", "").split()) in output, (path, name)


def test_init_scaffolds_git_and_dvc_with_a_local_remote(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    ws = tmp_path / "ws"
    assert (ws / "params.yaml").exists() and (ws / ".git").is_dir() and (ws / ".dvc").is_dir()
    remotes = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=ws, capture_output=True, text=True)
    assert str(ws / "dvc-remote") in "".join(remotes.stdout.split())  # dvc wraps long lines
    log = subprocess.run(["git", "log", "--oneline"], cwd=ws, capture_output=True, text=True).stdout
    assert "incseg init" in log
    repo_root = Path(__file__).resolve().parents[1]
    assert (ws / "dvc.yaml").read_text() == (repo_root / "dvc.yaml").read_text()  # one pipeline, kept in sync


def test_the_pipeline_stages_list_every_train_knob_they_read():
    """`dvc repro` re-runs a stage only when a param it lists changed: a knob that shapes what is
    learned and is missing from its stage would leave a stale model looking up to date."""
    import yaml

    from incseg.config import TrainParams

    stages = yaml.safe_load((Path(__file__).resolve().parents[1] / "dvc.yaml").read_text())["stages"]

    def listed(stage: str) -> set[str]:
        return {p.split(".", 1)[1] for p in stages[stage]["params"] if isinstance(p, str) and p.startswith("train.")}

    knobs = set(TrainParams.model_fields) - {"device", "num_workers", "distributed"}  # where it runs, not what it learns
    assert {k for k in knobs if not k.startswith("update_")} - listed("bootstrap") == set()
    assert {k for k in knobs if not k.startswith("bootstrap_")} - {"lr"} - listed("update") == set()
    assert "data.image_size" in stages["bootstrap"]["params"] and "data.image_size" in stages["update"]["params"]


def test_a_push_to_an_unusable_dvc_remote_fails_in_one_line_naming_the_command(tmp_path, stream_dir):
    """DVC runs in process: its failure is still one `error:` line naming the dvc command, and the
    batch is versioned locally (committed) though not pushed."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the DVC remote should be\n")
    result = runner.invoke(app, ["init", str(tmp_path / "ws"), "--remote", str(blocker)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["-C", str(tmp_path / "ws"), "data", "add", str(stream_dir / "registry" / "batch-00"),
                                 "--classes", str(stream_dir / "classes.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "`dvc push data/registry/batch-00.dvc` failed" in errors[0], result.output
    log = subprocess.run(["git", "log", "--oneline"], cwd=tmp_path / "ws", capture_output=True, text=True).stdout
    assert "data: add batch batch-00" in log


def test_a_data_add_that_dvc_cannot_version_leaves_the_workspace_as_it_was(tmp_path, stream_dir):
    """`dvc add` failing (a disk error, a Ctrl-C in a large batch's hashing) left the copied batch folder
    and the class names behind, uncommitted, and a retry was refused: 'batch-00 already exists'."""
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(ws)]).exit_code == 0
    cache = ws / ".dvc" / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.write_text("a file where DVC's cache should be\n")
    args = ["-C", str(ws), "data", "add", str(stream_dir / "registry" / "batch-00"), "--classes",
            str(stream_dir / "classes.yaml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "`dvc add data/registry/batch-00` failed" in result.output, result.output
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ws, capture_output=True,
                            text=True).stdout
    assert status == "" and not (ws / "data" / "registry" / "batch-00").exists(), status
    assert not (ws / "data" / "classes.yaml").exists()
    cache.unlink()
    result = runner.invoke(app, args)  # the retry goes through
    assert result.exit_code == 0, result.output
    log = subprocess.run(["git", "log", "--oneline"], cwd=ws, capture_output=True, text=True).stdout
    assert "data: add batch batch-00" in log


def test_adding_a_holdout_says_the_training_size_auto_chose(tmp_path):
    import numpy as np
    from PIL import Image

    src = tmp_path / "holdout"
    for sub in ("images", "masks"):
        (src / sub).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.zeros((90, 120, 3), np.uint8)).save(src / "images" / f"{i}.png")
        Image.fromarray(np.zeros((90, 120), np.uint8)).save(src / "masks" / f"{i}.png")
    (tmp_path / "classes.yaml").write_text("0: background\n1: thing\n")
    assert runner.invoke(app, ["init", str(tmp_path / "ws")]).exit_code == 0
    result = runner.invoke(app, ["-C", str(tmp_path / "ws"), "data", "add", str(src), "--holdout",
                                 "--classes", str(tmp_path / "classes.yaml")])
    assert result.exit_code == 0, result.output
    # the images are 120 px wide and 90 high: said width x height, as image sizes are
    said = "holdout images 120 x 90 px (width x height, median): models train at 96 px"
    assert "".join(said.split()) in "".join(result.output.split()), result.output


def test_sizes_are_said_width_first():
    from incseg.cli import size_text

    assert size_text((90, 120)) == "120 x 90 px"  # (height, width), as numpy and holdout_shape hold them


def test_data_synth_writes_the_layout(tmp_path):
    (tmp_path / "params.yaml").write_text("synth: {size: 24, base_images: 2, step_images: 2, holdout_per_class: 1}\n")
    result = runner.invoke(app, ["-C", str(tmp_path), "data", "synth"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "classes.yaml").exists()
    assert len(list((tmp_path / "data" / "registry" / "batch-00" / "images").glob("*.png"))) == 2


@pytest.mark.slow
def test_data_synth_into_a_workspace_registers_every_batch_and_one_rule_decides(tmp_path, prefect_api):
    """In a DVC workspace a batch is registered once DVC tracks it, for every entry point alike."""
    import shutil

    from incseg.data.layout import DataError, list_batches
    from incseg.ledger import registered, untracked
    from incseg.datastore import batch_root
    from incseg.workspace import Workspace

    assert runner.invoke(app, ["init", str(tmp_path / "ws")]).exit_code == 0
    ws_root = tmp_path / "ws"
    (ws_root / "params.yaml").write_text("synth: {size: 24, base_images: 2, step_images: 2, holdout_per_class: 1}\n")
    result = runner.invoke(app, ["-C", str(ws_root), "data", "synth"])
    assert result.exit_code == 0 and "registered with DVC" in result.output, result.output
    ws = Workspace(ws_root)
    assert list(registered(ws)) == list_batches(ws.registry_dir) and all(h.startswith("md5:") for h in registered(ws).values())
    assert (ws.data_dir / "holdout.dvc").exists() and batch_root(ws, "batch-00") == ws.registry_dir / "batch-00"
    log = subprocess.run(["git", "log", "--oneline"], cwd=ws_root, capture_output=True, text=True).stdout
    assert "data: synthetic stream" in log
    status = subprocess.run(["git", "status", "--porcelain", "data"], cwd=ws_root, capture_output=True, text=True).stdout
    assert status.strip() == "", status  # classes.yaml, the .dvc files and .gitignore are committed

    shutil.copytree(ws.registry_dir / "batch-00", ws.registry_dir / "copied")  # a folder dropped in by hand
    assert untracked(ws) == ["copied"] and "copied" not in registered(ws)
    with pytest.raises(DataError, match="not tracked by DVC"):
        batch_root(ws, "copied")
    for named in (["--batch-id", "copied"], ["copied"]):  # the batch as an option or, as `update` takes it, an argument
        refused = runner.invoke(app, ["-C", str(ws_root), "bootstrap", *named])
        assert refused.exit_code == 1 and "not tracked by DVC" in refused.output, refused.output
        assert "Flow run" not in refused.output  # said before any flow run starts
    for command in ("bootstrap", "update"):  # a mistyped id: one line naming the batches there, no flow run
        refused = runner.invoke(app, ["-C", str(ws_root), command, "batch-0"], terminal_width=400)
        assert refused.exit_code == 1 and refused.output.strip().startswith(
            f"error: no batch 'batch-0' in {ws.registry_dir} (there: batch-00, batch-01"), refused.output
        assert len(refused.output.strip().splitlines()) == 1, refused.output
    both = runner.invoke(app, ["-C", str(ws_root), "bootstrap", "batch-00", "--batch-id", "copied"])
    assert both.exit_code == 1 and "two batches named: batch-00 and --batch-id copied" in both.output, both.output


def test_notify_without_a_prefect_server_fails_in_one_line(tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "params.yaml").write_text("{}\n")  # a workspace at the defaults
    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # not the session harness's API either
        result = runner.invoke(app, ["-C", str(tmp_path), "notify", "batch-00"])
    assert result.exit_code == 1 and "PREFECT_API_URL is not set" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_folder_that_is_no_workspace_is_refused_and_left_as_it_was(tmp_path):
    """`incseg models` in the wrong folder, or `-C` mistyped, made the folder and an empty MLflow store
    there, and listed no versions as if the workspace had none."""
    plain, typo = tmp_path / "plain", tmp_path / "typo" / "ws"
    plain.mkdir()
    for folder, command in [(plain, "models"), (typo, "rollback")]:
        result = runner.invoke(app, ["-C", str(folder), command], terminal_width=400)
        assert result.exit_code == 1
        assert f"error: {folder}: not an incseg workspace (no params.yaml): `incseg init {folder}` makes one" in \
            result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"] and not any(plain.iterdir())


def test_ui_and_serve_name_a_port_in_use_before_starting_anything(tmp_path, monkeypatch):
    """With the port taken, `incseg ui` printed MLflow's bind error and exited 0; `incseg serve` waited on
    a server that could not start (or found the other one healthy)."""
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    (tmp_path / "params.yaml").write_text("{}\n")
    with temporary_settings(restore_defaults={PREFECT_API_URL}), socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command, what in [("ui", "the MLflow UI"), ("serve", "the local Prefect server")]:
            result = runner.invoke(app, ["-C", str(tmp_path), command, "--port", str(port)], terminal_width=400)
            assert result.exit_code == 1, result.output
            assert result.output.strip() == (f"error: port {port} on 127.0.0.1 is in use (another server?): give {what} "
                                             "another with --port N")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no store, no database made


def test_a_new_workspaces_first_command_prints_no_mlflow_info_lines(tmp_path):
    """MLflow logs at INFO when it creates its tables (a workspace's first command); the command's own
    output says what matters. A level the user set is kept."""
    from incseg.datastore import init_workspace

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "INCSEG_DEBUG")}
    for name, extra, shown in [("quiet", {}, False), ("asked", {"MLFLOW_LOGGING_LEVEL": "INFO"}, True)]:
        ws = init_workspace(tmp_path / name)
        proc = subprocess.run([sys.executable, "-m", "incseg", "-C", str(ws), "models"], capture_output=True,
                              text=True, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr
        assert (ws / "mlflow.db").exists()  # the store was created by this command
        assert ("Creating initial MLflow database tables" in proc.stderr) is shown, proc.stderr


def test_prefect_waits_two_minutes_for_a_server_it_starts_unless_the_user_set_a_time():
    """Prefect waits 20 s for the ephemeral API it starts on first use: short on a busy laptop, where a
    command failed. Importing `flows` raises that to `flows.STARTUP_TIMEOUT_S` before Prefect reads its
    settings (once); a value the user set is kept, shorter or longer, also by the ephemeral API that
    `flows.watch` starts itself, and in a process that imported Prefect first."""
    from flows import STARTUP_TIMEOUT_ENV as name
    from flows import STARTUP_TIMEOUT_S

    code = ("{first}import flows.update\nfrom flows.watch import startup_timeout\n"
            f"from prefect.settings import {name} as t\nprint(t.value(), startup_timeout())")
    env = {k: v for k, v in os.environ.items() if k != name}
    cases = [("", {}, (120, 120)), ("", {name: "300"}, (300, 300)), ("", {name: "7"}, (7, 7)),
             ("import prefect.settings\n", {}, (20, 120)), ("import prefect.settings\n", {name: "7"}, (7, 7))]
    for first, extra, expected in cases:
        proc = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True,
                              env={**env, **extra})
        assert proc.returncode == 0, proc.stderr
        assert tuple(float(v) for v in proc.stdout.split()[-2:]) == expected, (first, extra)
    assert STARTUP_TIMEOUT_S == 120


def test_the_demo_writes_its_budgets_and_the_chosen_look_and_refuses_an_unknown_look(tmp_path):
    from incseg.cli import DEMO_CHANGES, write_demo_params
    from incseg.config import STYLES, Params, load_params
    from incseg.datastore import init_workspace

    root = init_workspace(tmp_path / "ws")
    for style in (None, *STYLES):
        write_demo_params(root, style)
        params = load_params(root / "params.yaml")
        assert params.synth.style == (style or Params().synth.style)
        assert params.train.update_max_steps == DEMO_CHANGES["train"]["update_max_steps"] < Params().train.update_max_steps
        assert params.data.image_size == params.synth.size == 48
    result = runner.invoke(app, ["demo", str(tmp_path / "demo"), "--style", "nope"], terminal_width=200)
    assert result.exit_code == 2 and "nope" in result.output and all(s in result.output for s in STYLES)
    assert not (tmp_path / "demo").exists()


def test_registering_a_version_prints_mlflow_events_only_at_info(tmp_path, capsys):
    """`mlflow.register_model` prints "Created version ..." to stderr whatever the `mlflow` logger's level:
    in incseg those lines follow the level (the CLI's default, WARNING, drops them), other lines pass."""
    import logging

    from incseg.datastore import init_workspace
    from incseg.registry import ModelRegistry, events_at_log_level
    from incseg.workspace import Workspace

    reg = ModelRegistry(Workspace(init_workspace(tmp_path / "ws")))
    run_id = reg.start_run("registration", {"batch_id": "batch-00"}, {})
    source = reg.client.get_run(run_id).info.artifact_uri + "/model"
    logger = logging.getLogger("mlflow")
    before = logger.level
    try:
        for level, shown in [(logging.WARNING, False), (logging.INFO, True)]:
            logger.setLevel(level)
            capsys.readouterr()
            version = reg.register(run_id, source, {"batch_id": "batch-00"}).version
            assert ("Created version" in capsys.readouterr().err) is shown
            assert reg.version(version).tags["status"] == "pending"
        logger.setLevel(logging.WARNING)
        with events_at_log_level():
            print("Created version '9' of model 'm'.", file=sys.stderr)
            print("a warning of its own", file=sys.stderr)
        assert capsys.readouterr().err == "a warning of its own\n"
    finally:
        logger.setLevel(before)
        reg.end_run(run_id)


def test_bad_params_fail_with_one_line_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("synth: {size: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "incseg", "-C", str(tmp_path), "data", "synth"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "synth.size" in proc.stderr and "Traceback" not in proc.stderr
