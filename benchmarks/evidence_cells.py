"""The evidence matrix's committed results: one JSON line per finished cell, merged with the cells on disk.

Why: run directories are not committed, so on a fresh machine the report would otherwise be
rebuilt from nothing and drop every earlier row.  The report writes each cell it reads from
disk into docs/evidence/cells.jsonl (one record per model, calibration set, seed, quantizer,
scheme and domain) and each calibration set's coverage into coverage.jsonl, and it reads both
back: a committed record stands for its cell until that cell is on disk again (disk wins).
Records are the measured per-seed values only; nothing is derived from published means.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

CELL_KEY = ("model", "calib", "seed", "method", "scheme", "domain")
COVERAGE_KEY = ("model", "calib", "seed")


def read(path: Path) -> pd.DataFrame:
    """The records of a JSONL file (an empty frame when it does not exist yet)."""
    if not path.is_file():
        return pd.DataFrame()
    return pd.DataFrame([json.loads(line) for line in path.read_text().splitlines() if line.strip()])


def merge(disk: pd.DataFrame, kept: pd.DataFrame, key: tuple[str, ...]) -> pd.DataFrame:
    """Every disk record (in the runner's order, which the tables keep), then kept records whose key is not on disk."""
    if kept.empty:
        out = disk
    elif disk.empty:
        out = kept
    else:
        on_disk = set(disk[list(key)].itertuples(index=False, name=None))
        stale = [tuple(r) in on_disk for r in kept[list(key)].itertuples(index=False, name=None)]
        out = pd.concat([disk, kept[[not s for s in stale]]], ignore_index=True)
    if out.empty:
        return out
    dup = out.duplicated(list(key), keep="last")
    if dup.any():
        raise ValueError(f"{int(dup.sum())} cells appear twice on disk (key {key})")
    return out.reset_index(drop=True)


def write(df: pd.DataFrame, path: Path, key: tuple[str, ...]) -> Path:
    """One JSON object per row, sorted by key for stable diffs (numbers at full precision, NaN as null)."""
    from pascal_moe.io.artifacts import write_text

    df = df.sort_values(list(key), kind="stable") if not df.empty else df
    rows = json.loads(df.to_json(orient="records", double_precision=15)) if not df.empty else []
    return write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), path)


def keep(cells: dict | None, df: pd.DataFrame, cov: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge the cells on disk (df: domain frame, cov: coverage frame) with the committed files named by
    the settings' `cells: {metrics: ..., coverage: ...}`, write the merged records back, return them."""
    if not cells:
        return df, cov
    out = []
    for frame, key, name in ((df, CELL_KEY, "metrics"), (cov, COVERAGE_KEY, "coverage")):
        path = Path(cells[name])
        merged = merge(frame, read(path), key)
        if not merged.empty:
            write(merged, path, key)
        out.append(merged)
    return out[0], out[1]
