"""What quantize.json says about the calibration data it consumed.

Why: the balancer promises per-expert token counts (`coverage.parquet`, column `tokens_measured`,
one row per MoE layer ordinal and expert); the quantizer's own router hooks count the tokens
each expert really got on the fp model over the calibration windows.  Writing both, and whether
they agree, is how a user sees that the set reached the quantizer whole.
"""

from __future__ import annotations

from pathlib import Path

from pascal_moe.io.artifacts import fingerprint_obj, sha256_file
from pascal_moe.quant.calib import CalibRows, CalibWindows

COVERAGE_COUNT = "tokens_measured"  # balance/coverage.py: tokens the packed windows route to each (layer, expert)


def calib_fingerprint(rows: CalibRows, win: CalibWindows, tokens: int | None) -> dict:
    """Where the calibration came from and exactly which windows were used."""
    return {
        "path": str(rows.path),
        "sha256": sha256_file(rows.path),
        "rows": len(rows.rows),
        "rows_used": win.rows_used,
        "samples": len(win.ids),
        "tokens": win.tokens_used,
        "tokens_budget": tokens,
        "seq_len": win.seq_len,
        "source": "input_ids" if rows.from_input_ids else "text",
        "ids_fingerprint": fingerprint_obj(win.ids),
    }


def coverage_match(calib_path: Path, counts: dict[str, list[int]]) -> dict | None:
    """Compare our per-expert counts ({"layer<i>": [E]}, MoE layers in order) with coverage.parquet's.

    None when the calibration directory has no coverage.parquet (e.g. a plain text Parquet).
    """
    import numpy as np
    import pandas as pd

    path = calib_path.parent / "coverage.parquet"
    if not path.exists():
        return None
    cov = pd.read_parquet(path)
    missing = {"layer", "expert", COVERAGE_COUNT} - set(cov.columns)
    if missing:
        return {"equal": False, "max_abs_diff": None, "reason": f"{path.name} lacks {', '.join(sorted(missing))}"}
    ours = np.array([counts[k] for k in sorted(counts, key=lambda k: int(k[len("layer") :]))], dtype=np.float64)
    n_layers, n_experts = int(cov["layer"].max()) + 1, int(cov["expert"].max()) + 1
    if ours.shape != (n_layers, n_experts):
        return {
            "equal": False,
            "max_abs_diff": None,
            "reason": f"{path.name} has {n_layers}x{n_experts} (layer x expert), the model {ours.shape}",
        }
    theirs = np.zeros_like(ours)
    theirs[cov["layer"].to_numpy(int), cov["expert"].to_numpy(int)] = cov[COVERAGE_COUNT].to_numpy(np.float64)
    diff = int(np.rint(np.abs(ours - theirs).max()))
    return {"equal": diff == 0, "max_abs_diff": diff, "path": str(path)}
