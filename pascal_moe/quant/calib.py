"""The calibration set as the quantizer consumes it: every row by default, cut into windows.

Why a module of its own: what the quantizer sees must be exactly what the balancer counted.
`calib.parquet` rows with `input_ids` are used as-is (balance writes packed windows of its
`--seq-len`); `text` rows are tokenized without truncation.  Rows longer than the window are
cut into consecutive windows (nothing is thrown away); `--tokens` takes a seeded random subset
of rows (never a prefix: balance writes its random "natural" rows first).  Windows are put in a
canonical order (longest first, then by ids), so the row order of the Parquet does not change
the batches, hence neither the expert counts nor the quantized weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pascal_moe.errors import PascalError

DEFAULT_TEXT_WINDOW = 2048  # tokens per window for text-only sets (capped at the model's positions)


@dataclass(slots=True)
class CalibRows:
    """Token ids of every usable calibration row, and where they came from."""

    path: Path
    rows: list[list[int]]
    from_input_ids: bool  # True: the Parquet's own input_ids (packed by balance); False: tokenized text


@dataclass(slots=True)
class CalibWindows:
    """What the quantizer runs on: windows of at most `seq_len` tokens, in canonical order."""

    ids: list[list[int]]
    seq_len: int
    rows_used: int
    tokens_used: int


def read_calib(calib: str, tokenizer) -> CalibRows:
    """Rows of a calibration Parquet (file or directory holding calib.parquet) as token ids."""
    import pandas as pd

    from pascal_moe.io.artifacts import calib_file

    path = calib_file(calib)
    if not path.exists():
        raise PascalError(f"calibration file not found: {path} (pass a Parquet with a text column or its directory)")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is one actionable line
        raise PascalError(f"malformed calibration Parquet {path}: {str(e).splitlines()[0]}") from e
    if "input_ids" in df.columns:
        rows = [[int(t) for t in row] for row in df["input_ids"] if row is not None]
        from_ids = True
    elif "text" in df.columns:
        texts = [t for t in df["text"].tolist() if isinstance(t, str) and t.strip()]
        rows = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        from_ids = False
    else:
        raise PascalError(f"{path} has neither a text nor an input_ids column (columns: {', '.join(df.columns)})")
    rows = [list(r) for r in rows if len(r) >= 2]
    if not rows:
        raise PascalError(f"no usable calibration samples in {path} (need rows with at least 2 tokens)")
    return CalibRows(path, rows, from_ids)


def window_length(calib: CalibRows, seq_len: int | None, max_positions: int | None) -> int:
    """--seq-len, else the set's own window (longest input_ids row) or 2048 for text; capped at the model."""
    if seq_len is not None:
        if max_positions is not None and seq_len > max_positions:
            raise PascalError(
                f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_positions}: lower --seq-len"
            )
        return seq_len
    own = max(map(len, calib.rows)) if calib.from_input_ids else DEFAULT_TEXT_WINDOW
    return min(own, max_positions) if max_positions else own


def pick_rows(rows: list[list[int]], tokens: int | None, seed: int) -> list[list[int]]:
    """All rows (tokens None), else a seeded random subset holding at most `tokens` tokens.

    Rows are ordered canonically before the draw so the subset does not depend on the Parquet's
    row order; the last drawn row is cut to fill the budget exactly.
    """
    rows = sorted(rows)
    if tokens is None:
        return rows
    out, left = [], tokens
    for i in np.random.default_rng(seed).permutation(len(rows)).tolist():
        if left < 2:
            break
        out.append(rows[i][:left])
        left -= len(out[-1])
    return out


def cut_windows(rows: list[list[int]], seq_len: int) -> list[list[int]]:
    """Each row cut into consecutive windows of `seq_len` (a last window under 2 tokens is dropped)."""
    out = [r[i : i + seq_len] for r in rows for i in range(0, len(r), seq_len)]
    return sorted((w for w in out if len(w) >= 2), key=lambda w: (-len(w), w))


def calib_windows(calib: CalibRows, seq_len: int, tokens: int | None, seed: int) -> CalibWindows:
    """The windows the quantizer runs on (every row unless `tokens` is given)."""
    rows = pick_rows(calib.rows, tokens, seed)
    ids = cut_windows(rows, seq_len)
    if not ids:
        raise PascalError(f"no calibration window of at least 2 tokens in {calib.path}: raise --tokens")
    return CalibWindows(ids, seq_len, len(rows), sum(map(len, ids)))
