"""Compare `pascal plan`'s host-memory estimates with the measured peak RSS of the real commands (CPU).

Each command runs as a child process; its resident set (with its children) is sampled every 20 ms
with psutil and the maximum kept.  The estimate is the plan's host peak for the same settings
(pascal_moe/plan.py).  Prints one Markdown table (docs/scale.md, "Plan vs measured").

    OMP_NUM_THREADS=1 python scripts/plan_vs_measured.py data/models/qwen3-moe-fine runs/shape-real-48
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, SAMPLES, CALIB_TOKENS, CACHE_GB = 512, 8, 64, 32_768, 2.0


def peak_rss(cmd: list[str]) -> tuple[int, float]:
    """(peak RSS in bytes of the child and its children, seconds); raises when the command fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    return peak, time.perf_counter() - t0


def calib_parquet(path: Path) -> Path:
    """A text calibration set: seed-corpus train documents (what `pascal quantize --calib` reads)."""
    import pandas as pd

    df = pd.read_parquet(ROOT / "data/seed/seed.parquet", columns=["text", "split"])
    pd.DataFrame({"text": df[df["split"] == "train"]["text"].head(400).tolist()}).to_parquet(path)
    return path


def estimates(model: str) -> dict[str, int]:
    """The plan's host peaks (CPU, fp32) for the settings the measured commands use."""
    from pascal_moe.plan import PlanConfig, Shape, budget, full_forward, quantize
    from pascal_moe.preflight.checks import check_model

    _, info = check_model(model, full=False)
    shape, b = Shape(info, 4), budget("cpu", None, None)
    cfg = PlanConfig(model=model, tokens=CALIB_TOKENS, seq_len=SEQ, batch_size=BATCH, cache_limit_gb=CACHE_GB)
    return {
        "profile": full_forward("profile", shape, b, BATCH * SEQ, SEQ).host_peak,
        "quantize rtn": quantize(shape, b, PlanConfig(**{**vars(cfg), "method": "rtn"}))[0].host_peak,
    }


def main(models: list[str]) -> None:
    py = [sys.executable, "-m", "pascal_moe.cli"]
    base, _ = peak_rss([sys.executable, "-c", "import torch, transformers, pascal_moe.cli, pascal_moe.plan"])
    print(f"imports alone: {base / 2**30:.2f} GiB RSS (plan.HOST_BASE)\n")
    print("| model | command | plan host peak | measured peak RSS | plan / measured | seconds |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        calib = calib_parquet(Path(tmp) / "calib.parquet")
        for model in models:
            est = estimates(model)
            cmds = {
                "profile": py
                + ["profile", "--model", model, "--out", f"{tmp}/p", "--device", "cpu", "--no-sensitivity"]
                + ["--max-samples", str(SAMPLES), "--seq-len", str(SEQ), "--batch-size", str(BATCH)],
                "quantize rtn": py
                + ["quantize", "--model", model, "--calib", str(calib), "--out", f"{tmp}/q", "--method", "rtn"]
                + ["--device", "cpu", "--tokens", str(CALIB_TOKENS), "--seq-len", str(SEQ)]
                + ["--batch-size", str(BATCH), "--cache-limit-gb", str(CACHE_GB)],
            }
            for name, cmd in cmds.items():
                peak, secs = peak_rss(cmd)
                e = est[name]
                print(
                    f"| {Path(model).name} | {name} | {e / 2**30:.2f} GiB | {peak / 2**30:.2f} GiB "
                    f"| {e / peak:.2f} | {secs:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main(sys.argv[1:] or [str(ROOT / "data/models/qwen3-moe-fine")])
