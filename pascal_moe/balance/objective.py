"""Saturated, sensitivity-weighted expert coverage: the objective `pascal balance` maximises.

Shape legend: N candidate samples, K = L·E expert keys (`key = layer * E + expert`).

Every candidate is a sparse row `x_i ∈ R^K` of tokens it routes to each expert (top-k
membership, from the profiler's `keys`/`counts`).  A sample longer than the calibration
`seq_len` is truncated by the consumer, so its row is scaled by `seq_len / n_tokens`
(tokens are assumed spread evenly over the sample; `n_tokens` is what the profiler
counted).  A set S covers expert e with `c_e(S) = Σ_{i∈S} x_ie` tokens and scores

    F(S) = Σ_e w_e · min(c_e(S), t_e)

a weighted saturated coverage: monotone and submodular, so lazy greedy is within
(1 − 1/e) of optimal.  Our choice of weights (the sources leave it open, methods.md §4):

    w_e = 1 + a · sensitivity_e + b · boundary_share_e
          sensitivity_e ∈ [0, 1] (experts.parquet), boundary_share_e = boundary_tokens_e / tokens_e
    t_e = max(T, ρ · u · (1 + sensitivity_e)),   u = B · k / E
          B = the token budget of the set (`--tokens`), so demand follows the size asked for and
          not the pool's mean document length,
          u = the uniform per-expert share of the B·k routed token slots of one layer.

So every expert should see at least T tokens (stable statistics) and at least a ρ-fraction of
its uniform share, up to twice that for the most sensitive experts.  Tokens beyond t_e earn
nothing, which is what steers the selection away from over-served experts, so the saturation
must bind: with the default ρ = 0.25, Σ_e t_e ≈ 0.37 of a layer's B·k routed slots and the
common experts saturate early, leaving the rare ones to decide the later picks.  (With ρ = 0.5,
Σ t_e ≈ 0.75 B·k: almost no expert saturates and F(S) degenerates into "most weighted tokens";
measured on the bundled Qwen3-MoE, 4,000 candidates, 256 × 128: 15 experts below a ρ = 0.5
demand vs 23 for random seed text, while ρ = 0.25 gives 0 vs 4 and raises the least-served
expert from 425 to 1,337 tokens.)  a, b, T, ρ are BalanceConfig fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from pascal_moe.errors import PascalError


@dataclass(frozen=True, slots=True)
class Objective:
    """Per-key demand t [K] and importance w [K] of the saturated coverage F(S)."""

    demand: np.ndarray  # [K] t_e, tokens wanted
    weight: np.ndarray  # [K] w_e, importance

    def value(self, coverage: np.ndarray) -> float:
        """F = Σ_e w_e · min(c_e, t_e) for a coverage vector c [K]."""
        return float(np.sum(self.weight * np.minimum(coverage, self.demand)))

    def gains(self, X: sp.csr_matrix, coverage: np.ndarray, rows_per_chunk: int = 4096) -> np.ndarray:
        """Marginal gain of adding each row of X [N, K] to a set with coverage c [K] -> [N]."""
        resid = np.maximum(self.demand - coverage, 0.0)  # [K] tokens still wanted
        ip, out = X.indptr, np.zeros(X.shape[0])
        for lo in range(0, X.shape[0], rows_per_chunk):
            hi = min(lo + rows_per_chunk, X.shape[0])
            a, b = ip[lo], ip[hi]
            if a == b:
                continue
            keys = X.indices[a:b]
            per = self.weight[keys] * np.minimum(X.data[a:b], resid[keys])  # [nnz of the chunk]
            lens = np.diff(ip[lo : hi + 1])
            nz = lens > 0
            out[lo:hi][nz] = np.add.reduceat(per, (ip[lo:hi] - a)[nz])
        return out


def count_matrix(
    keys: pa.ChunkedArray | pa.Array | pd.Series,
    counts: pa.ChunkedArray | pa.Array | pd.Series,
    n_tokens: np.ndarray,
    n_keys: int,
    seq_len: int,
) -> sp.csr_matrix:
    """CSR [N, K] of routed tokens per key, each row scaled by min(1, seq_len / n_tokens)."""
    keys_a = _as_list_array(keys)
    counts_a = _as_list_array(counts)
    lengths = pc.list_value_length(keys_a).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not np.array_equal(lengths, pc.list_value_length(counts_a).fill_null(0).to_numpy(zero_copy_only=False)):
        raise PascalError("keys and counts lists differ in length in a samples table: re-run `pascal profile`")
    indices = pc.list_flatten(keys_a).to_numpy(zero_copy_only=False).astype(np.int32)
    data = pc.list_flatten(counts_a).to_numpy(zero_copy_only=False).astype(np.float32)
    if indices.size and (indices.min() < 0 or indices.max() >= n_keys):
        raise PascalError(
            f"expert key out of range 0..{n_keys - 1} in a samples table: profile and candidates "
            "must come from the same model"
        )
    n_tok = np.asarray(n_tokens, dtype=np.float64)
    scale = np.where(n_tok > seq_len, seq_len / np.maximum(n_tok, 1), 1.0).astype(np.float32)  # [N]
    data *= np.repeat(scale, lengths)
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    X = sp.csr_matrix((data, indices, indptr), shape=(len(lengths), n_keys))
    if not X.has_canonical_format:  # linear check; sorts only when keys are unsorted or repeated
        X.sum_duplicates()
    return X


def _as_list_array(col: pa.ChunkedArray | pa.Array | pd.Series) -> pa.Array:
    if isinstance(col, pd.Series):
        col = pa.array(col.map(lambda v: [] if v is None else list(v)), type=pa.list_(pa.int64()))
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col


def build_objective(
    experts: pd.DataFrame,
    n_experts: int,
    n_layers: int,
    top_k: int,
    tokens: float,
    min_tokens: int,
    demand_share: float,
    sensitivity_weight: float,
    boundary_weight: float,
) -> Objective:
    """Demand and importance per key from experts.parquet (formulas in the module docstring)."""
    K = n_layers * n_experts
    key = experts["layer"].to_numpy(np.int64) * n_experts + experts["expert"].to_numpy(np.int64)
    if len(key) and (key.min() < 0 or key.max() >= K):
        raise PascalError("experts.parquet has layer/expert ids outside profile.json's n_layers x n_experts")
    sens = np.zeros(K)
    bshare = np.zeros(K)
    sens[key] = (
        np.clip(experts["sensitivity"].fillna(0.0).to_numpy(np.float64), 0.0, 1.0) if "sensitivity" in experts else 0.0
    )
    if "boundary_tokens" in experts and "tokens" in experts:
        tok = experts["tokens"].to_numpy(np.float64)
        bt = experts["boundary_tokens"].fillna(0).to_numpy(np.float64)
        bshare[key] = np.clip(np.divide(bt, tok, out=np.zeros_like(tok), where=tok > 0), 0.0, 1.0)
    uniform = tokens * top_k / n_experts  # routed slots per expert of one layer if spread evenly
    demand = np.maximum(float(min_tokens), demand_share * uniform * (1.0 + sens))  # [K]
    weight = 1.0 + sensitivity_weight * sens + boundary_weight * bshare  # [K]
    return Objective(demand=demand, weight=weight)
