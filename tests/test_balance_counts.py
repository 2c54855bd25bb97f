"""The dense count matrix of `pascal balance` (balance/counts.py) equals the sparse one it replaced.

Read from Parquet in small batches, with rows dropped, truncated samples scaled, and a repeated key;
the greedy gives the same selection on the dense matrix as on the sparse one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pascal_moe.balance.counts import counts_dtype, dense, read_counts, row_scale
from pascal_moe.balance.objective import Objective, count_matrix
from pascal_moe.balance.select import select
from pascal_moe.errors import PascalError


def _samples(rng: np.random.Generator, n: int, K: int) -> pd.DataFrame:
    keys = [np.sort(rng.choice(K, size=rng.integers(1, K), replace=False)).astype(np.int32) for _ in range(n)]
    return pd.DataFrame(
        {
            "keys": keys,
            "counts": [rng.integers(1, 40, size=len(k)).astype(np.int32) for k in keys],
            "n_tokens": rng.integers(20, 60, size=n),
        }
    )


@pytest.mark.parametrize("seq_len", [64, 40])  # 40: some samples are truncated, so counts are scaled (float32)
def test_read_counts_equals_count_matrix(tmp_path, seq_len):
    rng = np.random.default_rng(0)
    df = _samples(rng, 53, 24)
    df.loc[5, "keys"], df.loc[5, "counts"] = np.array([3, 3, 7], np.int32), np.array([2, 5, 1], np.int32)  # repeat
    df.to_parquet(tmp_path / "s.parquet")
    rows = np.flatnonzero(rng.uniform(size=53) < 0.7)  # the kept rows, in file order
    n_tok = df["n_tokens"].to_numpy()[rows]
    X = np.zeros((len(rows), 24), dtype=counts_dtype(n_tok, seq_len), order="F")
    read_counts(tmp_path / "s.parquet", rows, X, 0, row_scale(n_tok, seq_len), batch_rows=8)
    ref = count_matrix(df["keys"], df["counts"], df["n_tokens"].to_numpy(), 24, seq_len)[rows].toarray()
    assert X.dtype == (np.int16 if seq_len == 64 else np.float32) and X.flags.f_contiguous
    np.testing.assert_array_equal(X, ref)
    assert 5 in rows and X[list(rows).index(5), 3] == pytest.approx(7 * row_scale(df["n_tokens"][5:6], seq_len)[0])


def test_read_counts_checks_keys(tmp_path):
    pd.DataFrame({"keys": [[0, 9]], "counts": [[1, 2]], "n_tokens": [3]}).to_parquet(tmp_path / "s.parquet")
    with pytest.raises(PascalError, match="out of range"):
        read_counts(tmp_path / "s.parquet", np.array([0]), np.zeros((1, 4), np.int16, order="F"), 0, np.ones(1))


def test_select_same_on_dense_int16_as_on_sparse():
    rng = np.random.default_rng(3)
    X = sp.random(300, 40, density=0.6, random_state=np.random.RandomState(3), format="csr")
    X.data = rng.integers(1, 30, size=X.nnz).astype(np.float32)
    obj = Objective(demand=rng.uniform(500, 2000, 40), weight=rng.uniform(1, 3, 40))  # not all met: no zero-gain ties
    cost = rng.integers(10, 60, size=300).astype(float)
    natural = rng.uniform(size=300) < 0.7
    kw = dict(natural_share=0.25, max_synthetic_share=0.3, seed=1)
    a = select(X, obj, cost, 2500.0, natural, **kw)
    b = select(dense(X.astype(np.int16)), obj, cost, 2500.0, natural, **kw)
    greedy = [i for i, r in zip(a.index.tolist(), a.reason) if r == "greedy"]
    assert len(greedy) > 5 and a.reason == b.reason and a.index.tolist() == b.index.tolist()
    np.testing.assert_array_equal(a.coverage, b.coverage)
