"""The candidates' routed-token matrix X [N, K] as `select` uses it: dense, column-major, compact dtype.

Shape legend: N candidates, K = L·E expert keys, R rows of one Parquet batch.

Why dense and not sparse: at real routing density a 2,048-token sample of Qwen3-30B-A3B
touches 100-128 of the 128 experts of every layer (~5.5k of 6,144 keys), so a CSR costs
≥ 6 bytes per entry (int32 column + int16 count) for ~90% of the entries, and the greedy's column
access needed a second (CSC) copy: ~6.6 GB for 100k candidates.  A dense int16 array is 2 bytes per
entry, 1.2 GB, and Fortran order makes a key's column (what every gain update reads) contiguous;
rows are read only for the few hundred picks.  int16 holds every count as long as no sample exceeds
32,767 tokens and none is scaled for truncation; otherwise float32 (the scaled counts are
fractional), still without a second copy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from pascal_moe.errors import PascalError

INT16_MAX = int(np.iinfo(np.int16).max)


def counts_dtype(n_tokens: np.ndarray, seq_len: int) -> np.dtype:
    """int16 when every row is kept whole and no count can exceed int16; else float32."""
    n = np.asarray(n_tokens, dtype=np.int64)
    if n.size and (n.max() > seq_len or n.max() > INT16_MAX):
        return np.dtype(np.float32)
    return np.dtype(np.int16)


def row_scale(n_tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """[N] float32 min(1, seq_len / n_tokens): the share of a truncated sample's tokens that is kept."""
    n_tok = np.asarray(n_tokens, dtype=np.float64)
    return np.where(n_tok > seq_len, seq_len / np.maximum(n_tok, 1), 1.0).astype(np.float32)


def fill_rows(
    out: np.ndarray,
    at: int,
    keys: pa.Array,
    counts: pa.Array,
    scale: np.ndarray,
) -> None:
    """Write R rows of list<int> keys/counts into out[at : at + R] (a repeated key sums), times scale [R]."""
    N, K = out.shape
    lengths = pc.list_value_length(keys).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not np.array_equal(lengths, pc.list_value_length(counts).fill_null(0).to_numpy(zero_copy_only=False)):
        raise PascalError("keys and counts lists differ in length in a samples table: re-run `pascal profile`")
    R = len(lengths)
    k = pc.list_flatten(keys).to_numpy(zero_copy_only=False)
    if k.size and (k.min() < 0 or k.max() >= K):
        raise PascalError(
            f"expert key out of range 0..{K - 1} in a samples table: profile and candidates must come from the same model"
        )
    c = pc.list_flatten(counts).to_numpy(zero_copy_only=False)
    idx_t = np.int32 if N * K < 2**31 else np.int64
    flat = k.astype(idx_t) * N  # [nnz] cell of each entry in column-major out ...
    flat += np.repeat(np.arange(at, at + R, dtype=idx_t), lengths)  # ... plus its row
    if out.dtype == np.int16:
        vals = c
    else:
        vals = c.astype(np.float32) * np.repeat(scale, lengths)  # the float32 product CSR used to hold
    cells = out.reshape(-1, order="F")  # [N*K] view of out (column-major, contiguous)
    assert np.shares_memory(cells, out)
    if _unique_ascending_rows(k, lengths):
        cells[flat] = vals  # keys unique per row (as the profiler writes them): plain assignment
    else:
        np.add.at(cells, flat, vals)  # a repeated key sums


def _unique_ascending_rows(keys: np.ndarray, lengths: np.ndarray) -> bool:
    """True when every row's keys are strictly ascending (so no key repeats within a row)."""
    if keys.size < 2:
        return True
    up = keys[1:] > keys[:-1]  # [nnz - 1]
    starts = np.cumsum(lengths)[:-1]  # first entry of rows 1.. (a row start may go down)
    starts = starts[(starts > 0) & (starts < keys.size)]
    up[starts - 1] = True
    return bool(up.all())


def read_counts(
    path: Path, rows: np.ndarray, out: np.ndarray, at: int, scale: np.ndarray, batch_rows: int = 512
) -> None:
    """Read the keys/counts of file rows `rows` (ascending) into out[at : at + len(rows)], `batch_rows` at a time.

    Only the two list columns are read, one Parquet batch at a time, so the file's counts are never
    held whole; `scale` [len(rows)] is each kept row's truncation factor.
    """
    pf = pq.ParquetFile(path, pre_buffer=False)  # no read-ahead: Arrow's threaded reader buffered ~1.7 GB
    start, done = 0, 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["keys", "counts"], use_threads=False):
        if done == len(rows):
            break
        lo, hi = np.searchsorted(rows, [start, start + batch.num_rows])
        if hi > lo:
            keys, counts = batch.column("keys"), batch.column("counts")
            if hi - lo < batch.num_rows:  # some rows of this batch were dropped (rejected or duplicate)
                take = pa.array(rows[lo:hi] - start)
                keys, counts = keys.take(take), counts.take(take)
            fill_rows(out, at + done, keys, counts, scale[done : done + hi - lo])
            done += int(hi - lo)
        start += batch.num_rows
    if done != len(rows):
        raise PascalError(f"{path} changed while it was read ({done} of {len(rows)} rows found): run balance again")


def dense(X: sp.spmatrix | np.ndarray) -> np.ndarray:
    """A sparse or dense [N, K] matrix as the column-major array `select` works on (no copy when it already is)."""
    if isinstance(X, np.ndarray):
        return np.asfortranarray(X)
    return np.asfortranarray(X.toarray())
