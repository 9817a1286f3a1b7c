"""`incseg bench --inference`: per-image latency of PyTorch eager and ONNX Runtime on CPU.

The model is the one `params.yaml` describes (arch, width), with random weights: latency does
not depend on the weights. One image per call (batch 1), after warm-up runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from incseg.config import Params
from incseg.export import export_onnx, session
from incseg.models import build_model, save_checkpoint

SIZES = (64, 256, 512)


def _latencies(run, runs: int, warmup: int = 3) -> np.ndarray:
    for _ in range(warmup):
        run()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        out.append(time.perf_counter() - t0)
    return np.array(out)


def _row(engine: str, size: int, seconds: np.ndarray) -> dict:
    return {"engine": engine, "size": size, "images_per_s": round(1 / seconds.mean(), 1),
            "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 2),
            "p95_ms": round(1000 * float(np.percentile(seconds, 95)), 2), "runs": len(seconds)}


def run(params: Params, quick: bool, console: Console | None = None, n_classes: int = 5) -> dict:
    console = console or Console()
    torch.manual_seed(0)
    model = build_model(params.model.arch, n_classes, params.model.width, params.model.depth).eval()
    sizes = (64, 128) if quick else SIZES
    rows = []
    with tempfile.TemporaryDirectory(prefix="incseg-bench-onnx-") as tmp:
        ckpt = save_checkpoint(Path(tmp) / "model.pt", model, {i: str(i) for i in range(n_classes)})
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", params.data.image_size,
                                {i: str(i) for i in range(n_classes)})
        sizes_on_disk = {"checkpoint_mb": round(ckpt.stat().st_size / 1e6, 2),
                         "onnx_mb": round(onnx_path.stat().st_size / 1e6, 2)}
        sess = session(onnx_path)
        for size in sizes:
            x = torch.randn(1, 3, size, size)
            runs = 5 if quick else max(10, int(200 * (64 / size) ** 2))
            with torch.no_grad():
                rows.append(_row("pytorch eager", size, _latencies(lambda: model(x), runs)))
            feed = {"image": x.numpy()}
            rows.append(_row("onnx runtime", size, _latencies(lambda: sess.run(["logits"], feed), runs)))
            console.print(f"  {size} px: eager p50 {rows[-2]['p50_ms']} ms, onnx runtime p50 {rows[-1]['p50_ms']} ms")
    return {"arch": params.model.arch, "width": params.model.width, "depth": params.model.depth,
            "threads": torch.get_num_threads(), **sizes_on_disk, "rows": rows}


def markdown(result: dict, command: str) -> str:
    lines = ["# Inference latency (CPU, one image per call)", "",
             f"Made by `{command}`: {result['arch']} (width {result['width']}, depth {result['depth']}), "
             f"{result['threads']} torch threads. On disk: checkpoint {result['checkpoint_mb']} MB, ONNX {result['onnx_mb']} MB.", "",
             "| engine | size (px) | images/s | p50 (ms) | p95 (ms) | runs |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['engine']} | {r['size']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['runs']} |"
              for r in result["rows"]]
    return "\n".join(lines) + "\n"
