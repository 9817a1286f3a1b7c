"""The layers point one way and the core has no Prefect in it: import-linter's contracts
(pyproject.toml, tool.importlinter) on the real import graph, so a cycle cannot come back."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the packages under `root` (not whatever the virtualenv has installed)."""
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})


def test_import_contracts_are_kept():
    proc = lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


def test_a_reverse_import_breaks_the_contract(tmp_path):
    for part in ("incseg", "flows", "tasks", "pyproject.toml"):
        src = ROOT / part
        (shutil.copytree(src, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copy(src, tmp_path / part))
    metrics = tmp_path / "incseg" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\nfrom incseg import pipeline  # noqa: E402 - points up\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0 and "incseg.metrics -> incseg.pipeline" in proc.stdout, proc.stdout[-3000:]


def test_a_training_process_does_not_load_torchvision():
    """torchvision loads `torch._dynamo` on import (~3 s of CPU in every process that trains): the
    training path and the torchrun worker use plain torch; torchvision only for its own archs and
    the VOC / Cityscapes importers, imported where they are used."""
    code = ("import sys, incseg.launch, incseg.inference, incseg.reports; "
            "print(sorted(m for m in ('torchvision', 'torch._dynamo', 'mlflow') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[]"]  # nor MLflow: a torchrun rank other than 0 never logs


def test_openmp_spins_briefly_in_every_incseg_process():
    """`import incseg` sets GOMP_SPINCOUNT before torch loads (idle OpenMP threads spinning 300000 rounds
    made training ~5x slower beside another busy process: README, GOMP_SPINCOUNT); a user's own value wins."""
    code = "import os, incseg.cli, torch; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"} | {"PYTHONPATH": str(ROOT)}
    for given, expected in ((None, "1000"), ("20000", "20000")):
        extra = {} if given is None else {"GOMP_SPINCOUNT": given}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=env | extra)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.split() == [expected]
