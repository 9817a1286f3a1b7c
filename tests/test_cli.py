import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from incseg.cli import app

runner = CliRunner()


def test_every_command_has_help():
    commands = ["init", "validate", "bootstrap", "update", "watch", "serve", "models", "promote", "rollback", "ui",
                "demo", "data synth", "data add"]
    for args in [["--help"]] + [c.split() + ["--help"] for c in commands]:
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Usage" in result.output, args


def test_init_scaffolds_git_and_dvc_with_a_local_remote(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "ws")])
    assert result.exit_code == 0, result.output
    ws = tmp_path / "ws"
    assert (ws / "params.yaml").exists() and (ws / ".git").is_dir() and (ws / ".dvc").is_dir()
    remotes = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=ws, capture_output=True, text=True)
    assert str(ws / "dvc-remote") in remotes.stdout
    log = subprocess.run(["git", "log", "--oneline"], cwd=ws, capture_output=True, text=True).stdout
    assert "incseg init" in log
    repo_root = Path(__file__).resolve().parents[1]
    assert (ws / "dvc.yaml").read_text() == (repo_root / "dvc.yaml").read_text()  # one pipeline, kept in sync


def test_data_synth_writes_the_layout(tmp_path):
    (tmp_path / "params.yaml").write_text("synth: {size: 24, base_images: 2, step_images: 2, holdout_per_class: 1}\n")
    result = runner.invoke(app, ["-C", str(tmp_path), "data", "synth"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "classes.yaml").exists()
    assert len(list((tmp_path / "data" / "registry" / "batch-00" / "images").glob("*.png"))) == 2


def test_bad_params_fail_with_one_line_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text("synth: {size: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "incseg", "-C", str(tmp_path), "data", "synth"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "synth.size" in proc.stderr and "Traceback" not in proc.stderr
