"""The path users run first, as they run it: `build-calib` -> `quantize` -> `eval`, no calibration-size flags.

Why: the main path once fed the quantizer only the random slice of the balanced set, and nothing caught
it.  Here the quantizer must consume the whole set (every window, every token) and its own router hooks
must count, per expert, exactly what the balancer's coverage.parquet promised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "data" / "models" / "qwen3-moe-tiny"


def _pascal(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENAI_BASE_URL": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pascal_moe.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_build_calib_then_quantize_with_defaults_consumes_the_whole_set(tmp_path: Path) -> None:
    run, q, ev = tmp_path / "run", tmp_path / "q", tmp_path / "eval"
    # sizes only: the budget and window (small for CI), the synthesis kept short; everything else default
    res = _pascal(
        "build-calib",
        "--model",
        str(MODEL),
        "--out",
        str(run),
        "--tokens",
        "8192",
        "--seq-len",
        "128",
        "--rounds",
        "1",
        "--samples-per-target",
        "2",
        "--top-sensitive",
        "4",
        "--no-sensitivity",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    man = json.loads((run / "calib" / "manifest.json").read_text())
    calib = pd.read_parquet(run / "calib" / "calib.parquet")
    assert abs(man["calib_tokens"] - 8192) <= 0.01 * 8192 and int(calib["n_tokens"].sum()) == man["calib_tokens"]

    res = _pascal(
        "quantize",
        "--model",
        str(MODEL),
        "--calib",
        str(run),
        "--scheme",
        "int3-g128",
        "--method",
        "autoround",
        "--iters",
        "4",
        "--out",
        str(q),
    )  # the run directory is enough
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((q / "quantize.json").read_text())
    assert meta["calib_rows_used"] == len(calib)
    assert meta["calib_tokens_used"] == man["calib_tokens"]  # every token of the set, not a prefix of rows
    assert meta["coverage_match"]["equal"], meta["coverage_match"]  # counts == coverage.parquet's, per expert
    cov = pd.read_parquet(run / "calib" / "coverage.parquet")
    ours = sum(sum(v) for v in meta["expert_token_counts"].values())
    assert ours == int(cov["tokens_measured"].sum()) > 0

    res = _pascal(
        "eval",
        "--model",
        str(MODEL),
        "--quantized",
        str(q),
        "--out",
        str(ev),
        "--max-tokens",
        "2048",
        "--generate-tokens",
        "0",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (ev / "report.md").is_file()
