"""Peak memory of `pascal quantize` / `profile` / `eval` with disk offload, against the number of layers.

Why (issue #15): with decoder blocks on disk and one block on the device at a time, peak memory
must stay flat in the number of layers, not grow with the model.  For each layer count this
builds the shape-real model (scripts/shape_real.py: Qwen3-30B-A3B's routing geometry at width
256; 51 MB of fp32 weights per layer), then runs each command in a child process with
`--offload-dir D --max-memory cpu=<1/4 of the model's size>` and records the child's peak RSS
(/usr/bin/time -v, "Maximum resident set size").  Target: peak RSS <= 40% of the fp32 model
size + the calibration cache.  Calibration: 16 windows x 256 tokens of the bundled seed corpus.

    nice -n 10 python benchmarks/scale_memory.py --layers 8 16 48 --commands quantize profile eval
    # writes benchmarks/results/scale_memory.json; models and runs under runs/scale-memory/
    nice -n 10 python benchmarks/scale_memory.py --layers 48 --commands quantize eval --record eval
    # eval needs the quantize step's QDIR; only the eval numbers replace those in the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "scale-memory"
RESULTS = ROOT / "benchmarks" / "results" / "scale_memory.json"
WINDOWS, SEQ_LEN = 16, 256


def calib_parquet(path: Path) -> Path:
    """16 windows x 256 tokens (input_ids) of the seed corpus's train split."""
    import pandas as pd
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ROOT / "data/models/qwen3-moe-tiny")
    df = pd.read_parquet(ROOT / "data/seed/seed.parquet", columns=["text", "split"])
    ids: list[int] = []
    for text in df[df["split"] == "train"]["text"]:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= WINDOWS * SEQ_LEN:
            break
    rows = [ids[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(WINDOWS)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"input_ids": rows}).to_parquet(path)
    return path


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; its exit code, wall seconds and peak RSS (MiB)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    log.write_text(proc.stdout + proc.stderr)
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {
        "rc": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(int(m.group(1)) / 1024, 1) if m else None,
        "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None,
    }


def model_bytes(model: Path) -> int:
    return int(json.loads((model / "model.safetensors.index.json").read_text())["metadata"]["total_size"])


def run_layers(n: int, commands: list[str], calib: Path) -> dict:
    model = WORK / f"shape-real-{n}"
    if not (model / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "scripts/shape_real.py", "--layers", str(n), "--out", str(model)], check=True)
    size = model_bytes(model)
    budget_mb = size // 4 // 10**6
    cache = 3 * WINDOWS * SEQ_LEN * 256 * 4  # three [N, D] fp32 block caches
    cli = [sys.executable, "-m", "pascal_moe.cli"]
    place = ["--device", "cpu", "--max-memory", f"cpu={budget_mb}MB"]
    out = WORK / f"L{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    row: dict = {"layers": n, "model_bytes": size, "cpu_budget_mb": budget_mb, "cache_bytes": cache}
    row["target_mib"] = round((0.4 * size + cache) / 2**20, 1)
    args = {
        "quantize": [
            "quantize", "--model", str(model), "--calib", str(calib), "--out", str(out / "q"), "--method", "rtn",
            "--scheme", "int4-g128", "--seq-len", str(SEQ_LEN), "--offload-dir", str(out / "od-q"), *place,
        ],
        "profile": [
            "profile", "--model", str(model), "--out", str(out / "p"), "--no-sensitivity", "--max-samples", "16",
            "--seq-len", str(SEQ_LEN), "--offload-dir", str(out / "od-p"), *place,
        ],
        "eval": [
            "eval", "--model", str(model), "--quantized", str(out / "q"), "--out", str(out / "e"), "--max-tokens",
            str(WINDOWS * SEQ_LEN), "--seq-len", str(SEQ_LEN), "--generate-tokens", "0", "--offload-dir",
            str(out / "od-e"), *place,
        ],
    }  # fmt: skip
    for name in commands:
        row[name] = timed([*cli, *args[name]], out / f"{name}.log")
        print(json.dumps({"layers": n, name: row[name]}), flush=True)
    shutil.rmtree(out / "od-q", ignore_errors=True)
    return row


def merge_rows(old: list[dict], new: list[dict], record: list[str]) -> list[dict]:
    """Rows by layer count: the recorded commands of this run replace earlier numbers, the rest are kept."""
    by = {r["layers"]: r for r in old}
    for r in new:
        kept = {k: v for k, v in r.items() if k not in args_commands(r) or k in record}
        by[r["layers"]] = {**by.get(r["layers"], {}), **kept}
    return [by[n] for n in sorted(by)]


def args_commands(row: dict) -> set[str]:
    return {k for k, v in row.items() if isinstance(v, dict) and "peak_rss_mib" in v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 48])
    ap.add_argument("--commands", nargs="+", default=["quantize", "profile", "eval"])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument(
        "--record",
        nargs="+",
        default=None,
        help="commands whose numbers replace those in --out (default: all run); the others already there are kept",
    )
    args = ap.parse_args()
    calib = calib_parquet(WORK / "calib.parquet")
    rows = [run_layers(n, args.commands, calib) for n in args.layers]
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result |= {
        "what": "peak RSS of pascal commands with --offload-dir and --max-memory cpu=<model/4>, by layer count",
        "model": "data/configs/qwen3-30b-a3b-shape.json (scripts/shape_real.py), fp32, --device cpu",
        "calibration": f"{WINDOWS} windows x {SEQ_LEN} tokens",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    result["rows"] = merge_rows(result.get("rows", []), rows, args.record or args.commands)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
