"""The workspace's git + DVC repository: scaffolding and the data registry's versions."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from incseg.config import PARAMS_FILE
from incseg.data.layout import BatchInfo, DataError, load_yaml, read_classes, unlabelled_in
from incseg.workspace import Workspace

WORKSPACE_GITIGNORE = """\
# local state of the embedded defaults (MLflow store, scratch, quarantine, DVC remote)
/mlflow.db
/mlartifacts/
/runs/
/quarantine/
/dvc-remote/
/incoming/
"""


class StoreError(RuntimeError):
    """A git or DVC command failed; the message carries its output."""


def run(cmd: list[str], cwd: Path, shown: list[str] | None = None) -> str:
    """The command's stdout; a failure is a one-line `StoreError` naming the command as the user
    would type it (`shown`) and what it said (its error lines)."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        said = " ".join([line for line in lines if line.lower().startswith(("error", "fatal"))] or lines)
        raise StoreError(f"`{' '.join(shown or cmd)}` failed in {cwd}: {said[:400]}")
    return proc.stdout


def git(root: Path, *args: str) -> str:
    """git, with a fallback identity where none is configured (fresh CI machines)."""
    who = subprocess.run(["git", "config", "user.email"], cwd=root, capture_output=True, text=True).stdout.strip()
    identity = [] if who else ["-c", "user.name=incseg", "-c", "user.email=incseg@localhost"]
    return run(["git", *identity, *args], root, ["git", *args])


def dvc(root: Path, command: str, *targets: Path) -> None:
    """`dvc init|add|push|pull TARGETS` through DVC's Python API (`dvc.repo.Repo`), in this process:
    what the CLI does, without a Python start per call (~1 s of CPU each). Its chatter ("To track the
    changes with git...") stays out of our output; a failure is a one-line `StoreError` naming the
    command as the user would type it. TARGETS are relative to ROOT (or absolute)."""
    import logging

    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        if command == "init":
            Repo.init(str(root)).close()
            return
        with Repo(str(root)) as repo:
            getattr(repo, command)([str(root / t) for t in targets])
    except (DvcException, OSError) as err:  # e.g. a remote folder that cannot be written
        said = " ".join(str(err).split())
        shown = " ".join(["dvc", command, *map(str, targets)])
        raise StoreError(f"`{shown}` failed in {root}: {said[:400]}") from None
    finally:
        log.setLevel(level)


PIPELINE_YAML = Path(__file__).parent / "templates" / "dvc.yaml"  # the one source of the DVC pipeline
PARAMS_YAML = Path(__file__).parent / "templates" / "params.yaml"  # of the default params.yaml, commented


def write_default_params(path: Path) -> None:
    """Every knob at its default, each with a comment saying what it does (the project's own params.yaml)."""
    shutil.copyfile(PARAMS_YAML, path)


def init_workspace(root: Path, remote: str | None = None) -> Path:
    """A fresh workspace: params.yaml, data/, git + DVC initialised, a default DVC remote."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / PARAMS_FILE).exists():
        write_default_params(root / PARAMS_FILE)
    if not (root / "dvc.yaml").exists():
        shutil.copyfile(PIPELINE_YAML, root / "dvc.yaml")
    (root / "data" / "registry").mkdir(parents=True, exist_ok=True)
    gitignore = root / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(WORKSPACE_GITIGNORE)
    if not (root / ".git").exists():
        git(root, "init", "-q")
    if not (root / ".dvc").exists():
        dvc(root, "init")
        with repo_config(root) as conf:
            conf["core"]["analytics"] = False
            conf["core"]["remote"] = "storage"
            conf["remote"]["storage"] = {"url": remote or str((root / "dvc-remote").resolve())}
    git(root, "add", "-A")
    if git(root, "status", "--porcelain").strip():
        git(root, "commit", "-q", "-m", "incseg init")
    return root


@contextmanager
def repo_config(root: Path):
    """The workspace's DVC config (`.dvc/config`) to edit, as `dvc config` / `dvc remote add` do."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.config.edit() as conf:
        yield conf


def has_dvc(root: Path) -> bool:
    return (root / ".dvc").is_dir()


def track(root: Path, path: Path, message: str) -> str:
    """`dvc add` the folder, commit its `.dvc` file, and `dvc push` to the default remote.

    Returns the folder's DVC content hash (md5 of its directory manifest).
    """
    return track_all(root, [path], message)[0]


def track_all(root: Path, paths: list[Path], message: str, also: list[Path] = ()) -> list[str]:
    """`track` for several folders at once: one `dvc add`, one commit (with the files in `also`,
    e.g. classes.yaml), one `dvc push`, then `git push` where the branch has an upstream. Returns
    each folder's DVC content hash."""
    if not has_dvc(root):
        raise StoreError(f"{root} is not a DVC workspace: run `incseg init {root}` first")
    rels = [p.resolve().relative_to(root.resolve()) for p in paths]
    dvc(root, "add", *rels)
    dvc_files = [r.with_name(r.name + ".dvc") for r in rels]
    ignores = sorted({str(r.parent / ".gitignore") for r in rels})
    git(root, "add", *map(str, dvc_files), *ignores, *(str(p.resolve().relative_to(root.resolve())) for p in also))
    if _staged(root):
        git(root, "commit", "-q", "-m", message)
    if dvc_remote(root):
        dvc(root, "push", *dvc_files)
    publish(root)
    return [dvc_hash(root / f) for f in dvc_files]


def upstream(root: Path) -> str | None:
    """The current branch's upstream (e.g. `origin/main`); None without one."""
    proc = subprocess.run(["git", "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}"], cwd=root,
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 and proc.stdout.strip() else None


def publish(root: Path) -> str | None:
    """`git push` the registry's commits to the branch's upstream, so other machines see them
    (`dvc push` has already stored the data). Returns the upstream, None without one."""
    where = upstream(root)
    if where is not None:
        git(root, "push", "-q")
    return where


def pull_registry(ws: Workspace) -> str | None:
    """Bring the registry up to date from other machines: `git pull --ff-only` from the branch's
    upstream, then `dvc pull` of the registered batches and the holdout. Returns what changed in
    one line, None when the workspace has no upstream. A divergence, a conflict or an unreachable
    remote raises `StoreError` and leaves the checkout as it was."""
    root = ws.root
    if not has_dvc(root) or (where := upstream(root)) is None:
        return None
    before = git(root, "rev-parse", "HEAD").strip()
    git(root, "pull", "--ff-only", "-q")  # never merges: a divergent history changes nothing
    after = git(root, "rev-parse", "HEAD").strip()
    targets = sorted(ws.registry_dir.glob("*.dvc")) + sorted(ws.data_dir.glob("*.dvc"))
    try:
        if targets and dvc_remote(root):
            dvc(root, "pull", *targets)
    except StoreError:
        if after != before:
            git(root, "reset", "-q", "--keep", before)  # the .dvc files back where their data is
        raise
    return f"{where}: {before[:8]} -> {after[:8]}" if after != before else f"{where}: up to date"


def dvc_remote(root: Path) -> bool:
    """Whether the workspace has a DVC remote to push to (a default one, as `dvc push` needs)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return bool(repo.config["core"].get("remote"))


def _staged(root: Path) -> bool:
    return bool(git(root, "diff", "--cached", "--name-only").strip())


def dvc_hash(dvc_file: Path) -> str | None:
    """The md5 DVC recorded for the single output of a `.dvc` file."""
    if not dvc_file.exists():
        return None
    outs = load_yaml(dvc_file).get("outs") or [{}]
    md5 = outs[0].get("md5") if isinstance(outs, list) and isinstance(outs[0], dict) else None
    if not isinstance(md5, str) or not re.fullmatch(r"[0-9a-f]{32}(\.dir)?", md5):
        raise DataError(f"{dvc_file}: outs[0].md5 is missing or not a DVC hash; restore it with "
                        f"`git checkout -- {dvc_file.name}` or re-add the batch with `incseg data add`")
    return f"md5:{md5}"


def tracked_batches(registry: Path) -> dict[str, str]:
    """Batch id -> DVC content hash, for every batch with a `.dvc` file: the registry's data version."""
    out = {}
    for f in sorted(registry.glob("*.dvc")):
        h = dvc_hash(f)
        if h:
            out[f.name[: -len(".dvc")]] = h
    return out


def safe_batch_id(batch_id: str) -> str:
    """Batch ids become folder names: no separators, no `..`, nothing hidden."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", batch_id) or ".." in batch_id:
        raise DataError(f"invalid batch id {batch_id!r}: use letters, digits, '.', '_' and '-' only")
    return batch_id


def batch_root(ws: Workspace, batch_id: str) -> Path:
    """The batch's folder in the registry; refuses links, unknown ids (naming the registered ones) and
    folders DVC does not track."""
    root = ws.registry_dir / safe_batch_id(batch_id)
    if root.is_symlink():
        raise DataError(f"{root} is a symbolic link: batches must be real folders of the registry")
    if not root.is_dir():
        known = [p.name for p in sorted(ws.registry_dir.glob("*")) if p.is_dir() and not p.name.startswith(".")]
        there = ", ".join(known[:8]) + (f" and {len(known) - 8} more" if len(known) > 8 else "")
        raise DataError(f"no batch '{batch_id}' in {ws.registry_dir}" + (f" (there: {there})" if known else ""))
    if has_dvc(ws.root) and not root.with_name(root.name + ".dvc").exists():  # the rule of `ledger.registered`
        raise DataError(f"batch '{batch_id}' in {ws.registry_dir} is not tracked by DVC, so it is not registered: "
                        "bring batches in with `incseg data add SOURCE` (or `incseg data synth`)")
    return root


def holdout_gap(ws: Workspace, batch_id: str, classes: list[int]) -> str | None:
    """Why the gate could not judge a batch labelling `classes`, naming the classes the holdout labels
    nowhere; None when it labels them all, or there is no holdout yet."""
    if not ws.holdout_dir.is_dir():
        return None
    missing = unlabelled_in(ws.holdout_dir, classes)
    if not missing:
        return None
    names = read_classes(ws.classes_file) if ws.classes_file.exists() else {}
    listed = ", ".join(f"'{names.get(c, str(c))}' ({c})" for c in missing)
    return (f"{ws.holdout_dir}: no pixel labelled {listed}, which batch '{batch_id}' labels, so the gate could not "
            "judge it: replace the holdout with one that labels it too (`incseg data add SRC --holdout --force`)")


def install_classes(ws: Workspace, path: Path) -> None:
    """Make `path` the workspace's `classes.yaml`: where it has one, `path` may only add ids after its
    last (a class arriving later, named now); an id it names otherwise is refused, naming both names:
    models, metrics and verdicts were recorded under the workspace's names."""
    given = read_classes(path)  # a damaged file is refused, naming it, before it is installed
    if ws.classes_file.exists():
        known = read_classes(ws.classes_file)
        for c, name in known.items():
            if given.get(c) != name:
                now = f"'{given[c]}'" if c in given else "missing"
                raise DataError(f"{path}: id {c} is {now} there but '{name}' in {ws.classes_file}: a workspace's "
                                "class names stay (its models and records use them); a new class takes a new id "
                                f"after {max(known)}")
        if len(given) == len(known):
            return
    ws.classes_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, ws.classes_file)


def add_data(ws: Workspace, src: Path, batch_id: str | None = None, *, holdout: bool = False, force: bool = False,
             layout: str = "auto", split: str = "train", classes: Path | None = None,
             colours: Path | None = None, progress: Callable | None = None) -> tuple[Path, BatchInfo, str]:
    """Import SRC as a registry batch (or as the holdout) and version it with DVC; `colours`: the colour
    table of colour-coded masks (`importers.read_colours`), installed as the workspace's
    (`colours_file`, versioned with the data) if it has none; without it the workspace's is used.
    `progress` wraps the pairs as they are copied (`importers.import_batch`). `classes`: installed as
    `classes_file` (`install_classes`: new ids only, where it has one). An import refused, failed or
    interrupted before its commit leaves the registry, the holdout and the class names as they were.

    Returns (folder, its batch.yaml, its DVC hash). The holdout is fixed: replacing it needs `force`.
    """
    from incseg.data.importers import import_batch

    if not has_dvc(ws.root):
        raise StoreError(f"{ws.root} is not a DVC workspace: run `incseg init {ws.root}` first")
    replaced = None  # the holdout being replaced, kept aside until the new one is in
    if holdout:
        dst = ws.holdout_dir
        if dst.exists() and any(dst.iterdir()):
            if not force:
                raise DataError(f"{dst} already holds the holdout; replacing it makes old and new IoU figures "
                                "incomparable (use --force if you mean it)")
            replaced = dst.with_name(f".{dst.name}.replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            dst.rename(replaced)
    else:
        dst = ws.registry_dir / safe_batch_id(batch_id or src.resolve().name)
    dst.parent.mkdir(parents=True, exist_ok=True)
    installed = ws.colours_file.exists()
    before = ws.classes_file.read_bytes() if ws.classes_file.exists() else None  # restored if the import fails
    head = git(ws.root, "rev-parse", "HEAD").strip()  # `init` commits: a workspace has one
    imported = False
    try:
        if classes is not None:
            install_classes(ws, classes)
        info = import_batch(src, dst, layout, split, ws.classes_file,
                            colours or (ws.colours_file if installed else None), progress)
        imported = True
        if colours is not None and not installed:  # read and used by the import: a bad table never gets here
            shutil.copyfile(colours, ws.colours_file)
        also = [f for f in (ws.classes_file, ws.colours_file) if f.exists()]
        h = track_all(ws.root, [dst], f"data: add {'holdout' if holdout else 'batch ' + dst.name}", also)[0]
    except BaseException:
        if git(ws.root, "rev-parse", "HEAD").strip() != head:
            raise  # committed (a push failed after): the batch is in, the error says what is left to do
        # refused, failed or interrupted before its commit: the workspace is left as it was, so a retry can run
        if imported:
            _unversion(ws.root, dst)
        if replaced is not None:  # the holdout as it was
            shutil.rmtree(dst, ignore_errors=True)
            replaced.rename(dst)
        elif imported:
            shutil.rmtree(dst, ignore_errors=True)
        if before is None:  # and the class names and colour table as they were
            ws.classes_file.unlink(missing_ok=True)
        else:
            ws.classes_file.write_bytes(before)
        if colours is not None and not installed:
            ws.colours_file.unlink(missing_ok=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced)
    return dst, info, h


def _unversion(root: Path, folder: Path) -> None:
    """Undo what a `dvc add` of `folder` may have done before its commit: its `.dvc` file and the
    `.gitignore` entry beside it back to the last commit's (or gone), nothing of them left staged."""
    for f in (folder.with_name(folder.name + ".dvc"), folder.parent / ".gitignore"):
        rel = str(f.resolve().relative_to(root.resolve()))
        git(root, "reset", "-q", "--", rel)
        if git(root, "ls-tree", "--name-only", "HEAD", "--", rel).strip():
            git(root, "checkout", "-q", "HEAD", "--", rel)
        else:
            f.unlink(missing_ok=True)
