"""GPU check (issue #15): profile, quantize (autoround, vsraq) and eval on the largest model the device holds.

Records tokens/s, seconds per block and the peak device memory of each stage to JSON, so the CPU
numbers in docs/scale.md have GPU numbers beside them.  Run it whenever a GPU is lent (one prepared
script: `bash benchmarks/gpu_check.sh`); nothing here runs in the tests.

The model: Qwen3-30B-A3B's real config (data/configs/Qwen3-30B-A3B: width 2048, 128 experts, top-8) with
random weights and `--layers` decoder layers (scripts/shape_real.py, bf16: ~1.2 GB per layer + 1.2 GB of
embeddings), so the per-block numbers are the real model's; --layers 48 is the full 61 GB model.

    python benchmarks/gpu_check.py --layers 8 --out runs/gpu-check
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def stage(name: str, fn, results: dict) -> None:
    """Run one stage, recording wall seconds and the peak device memory it reached."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        fn()
        err = None
    except Exception as e:  # noqa: BLE001 - a failed stage is a result too; the others still run
        err = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    results[name] = {
        "seconds": round(time.perf_counter() - t0, 2),
        "peak_device_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "error": err,
    }
    print(json.dumps({name: results[name]}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="runs/gpu-check")
    ap.add_argument("--samples", type=int, default=256, help="seed samples profiled")
    ap.add_argument("--tokens", type=int, default=65536, help="calibration tokens for quantize")
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 2
    from pascal_moe.balance.config import BalanceConfig
    from pascal_moe.balance.run import run as balance
    from pascal_moe.evaluate.config import EvalConfig
    from pascal_moe.evaluate.run import run as evaluate
    from pascal_moe.profile.config import ProfileConfig
    from pascal_moe.profile.run import run as profile
    from pascal_moe.quant.config import QuantizeConfig
    from pascal_moe.quant.run import run as quantize

    out = Path(a.out)
    model = out / f"model-{a.layers}"
    if not (model / "config.json").exists():
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts/shape_real.py"),
                "--config",
                str(ROOT / "data/configs/Qwen3-30B-A3B"),
                "--layers",
                str(a.layers),
                "--dtype",
                "bfloat16",
                "--out",
                str(model),
            ],
            check=True,
        )
    res: dict = {
        "device": torch.cuda.get_device_name(0),
        "layers": a.layers,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "stages": {},
    }
    st = res["stages"]
    data = str(ROOT / "data/seed/seed.parquet")
    stage(
        "profile",
        lambda: profile(
            ProfileConfig(
                model=str(model), data=data, out=str(out / "profile"), max_samples=a.samples, seq_len=512, device="cuda"
            )
        ),
        st,
    )
    stage(
        "balance",
        lambda: balance(
            BalanceConfig(profile=str(out / "profile"), out=str(out / "calib"), tokens=a.tokens, seq_len=512)
        ),
        st,
    )
    for method in ("autoround", "vsraq"):
        stage(
            f"quantize-{method}",
            lambda m=method: quantize(
                QuantizeConfig(
                    model=str(model),
                    calib=str(out / "calib"),
                    out=str(out / f"q-{m}"),
                    method=m,
                    scheme="int4-g128",
                    iters=a.iters,
                    device="cuda",
                )
            ),
            st,
        )
    stage(
        "eval",
        lambda: evaluate(
            EvalConfig(
                model=str(model),
                quantized=[str(out / "q-autoround"), str(out / "q-vsraq")],
                out=str(out / "eval"),
                device="cuda",
                max_tokens=16384,
            )
        ),
        st,
    )
    prof = out / "profile" / "profile.json"
    if prof.exists():  # routed tokens over the stage's wall time (model load included: a lower bound)
        tokens = json.loads(prof.read_text())["totals"]["tokens"]
        res["profile_tokens_per_s"] = round(tokens / max(st["profile"]["seconds"], 1e-9), 1)
    for m in ("autoround", "vsraq"):
        q = out / f"q-{m}" / "quantize.json"
        if q.exists():
            res[f"quantize_{m}_seconds_per_block"] = json.loads(q.read_text()).get("seconds_per_block")
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    dst = ROOT / "benchmarks/results/gpu_check.json"
    dst.write_text(json.dumps(res, indent=2))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
