"""Choose the calibration set: a random natural part, then greedy on the saturated coverage.

Shape legend: N candidates, K expert keys.

Order of picks (each is recorded with its reason):
1. `natural`: ⌈natural_share · n⌉ seed samples drawn at random, so the usual distribution of
   text is kept whatever the objective prefers;
2. `greedy`: exact greedy on F(S) = Σ_e w_e min(c_e, t_e) (submodular: within 1 − 1/e of optimal).
   Synthetic/self candidates leave the pool once ⌊max_synthetic_share · n⌋ of them are in;
3. `fill`: once no candidate adds anything (every reachable demand met), the rest are random seed
   samples (then random synthetic ones within the cap), again to stay close to the natural mix.

Why not a lazy-greedy heap: every pick touches most keys, so all N stale bounds drop together and
a heap re-evaluates a large share of N per pick (~700k row evaluations for 512 of 100k at Qwen3-30B
shape).  Instead every gain g_i = Σ_e w_e min(x_ie, r_e) (r = residual demand) is kept current:
when a pick lowers r_e from r_old to r_new, only entries with x_ie > r_new change, by
w_e (min(x_ie, r_new) − min(x_ie, r_old)); keys whose r_new still exceeds every candidate's count
(most keys, most of the time) need no work.  One CSC pass per changed key, then argmax over N.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from pascal_moe.balance.objective import Objective


@dataclass(slots=True)
class Selection:
    """Rows picked (in order), why each was picked, and the coverage reached."""

    index: np.ndarray  # [n] candidate rows
    reason: list[str]  # natural | greedy | fill, per row
    coverage: np.ndarray  # [K] tokens per key of the set
    value: float  # F(S)
    updates: int = 0  # gain entries updated incrementally (cost diagnostic)
    reasons_count: dict[str, int] = field(default_factory=dict)


class _GainTable:
    """Current marginal gains [N] of all candidates, updated column-wise as residual demand falls."""

    def __init__(self, X: sp.csr_matrix, objective: Objective, coverage: np.ndarray):
        self.obj = objective
        self.C = X.tocsc()  # [N, K] column access: candidates holding each key
        self.colmax = np.zeros(X.shape[1], dtype=np.float64)  # [K] largest count per key
        nz = np.diff(self.C.indptr) > 0
        self.colmax[nz] = np.maximum.reduceat(self.C.data, self.C.indptr[:-1][nz])
        self.resid = np.maximum(objective.demand - coverage, 0.0)  # [K]
        self.updates = 0
        # keys whose residual exceeds every count add w_e x_ie: one compiled sparse mat-vec; the rest column-wise
        linear = self.resid >= self.colmax
        self.gain = np.asarray(X @ np.where(linear, objective.weight, 0.0).astype(X.dtype), dtype=np.float64)  # [N]
        ip, rows, data = self.C.indptr, self.C.indices, self.C.data
        for e in np.flatnonzero(~linear & (self.resid > 0)).tolist():
            x = data[ip[e]:ip[e + 1]]
            self.gain[rows[ip[e]:ip[e + 1]]] += objective.weight[e] * np.minimum(x, self.resid[e])
            self.updates += len(x)

    def lower(self, keys: np.ndarray, coverage: np.ndarray) -> None:
        """Coverage rose on `keys`: fold the residual drop into every affected candidate's gain."""
        r_old = self.resid[keys]
        r_new = np.maximum(self.obj.demand[keys] - coverage[keys], 0.0)
        self.resid[keys] = r_new
        hit = (r_new < r_old) & (r_new < self.colmax[keys])
        ip, rows, data, w = self.C.indptr, self.C.indices, self.C.data, self.obj.weight
        for e, ro, rn in zip(keys[hit].tolist(), r_old[hit].tolist(), r_new[hit].tolist()):
            x = data[ip[e]:ip[e + 1]]  # [n_e] counts of the candidates holding key e
            if rn <= 0:  # saturated: every holder loses its whole remaining contribution
                self.gain[rows[ip[e]:ip[e + 1]]] -= w[e] * np.minimum(x, ro)
                self.updates += len(x)
                continue
            m = x > rn  # only counts above the new residual change
            xm = x[m]
            self.gain[rows[ip[e]:ip[e + 1]][m]] += w[e] * (rn - np.minimum(xm, ro))
            self.updates += len(xm)


def select(X: sp.csr_matrix, objective: Objective, n: int, natural: np.ndarray, *, natural_share: float,
           max_synthetic_share: float, seed: int) -> Selection:
    """Pick n rows of X [N, K]; `natural` [N] marks seed rows (everything else counts as synthetic)."""
    N = X.shape[0]
    n = min(n, N)
    rng = np.random.default_rng(seed)
    natural = np.asarray(natural, dtype=bool)
    max_synth = int(np.floor(max_synthetic_share * n + 1e-9))
    taken = np.zeros(N, dtype=bool)
    picks: list[int] = []
    reasons: list[str] = []
    coverage = np.zeros(X.shape[1])

    def take(i: int, why: str) -> np.ndarray:
        taken[i] = True
        picks.append(int(i))
        reasons.append(why)
        keys = X.indices[X.indptr[i]:X.indptr[i + 1]]
        np.add.at(coverage, keys, X.data[X.indptr[i]:X.indptr[i + 1]])
        return keys

    seeds = np.flatnonzero(natural)
    n_nat = min(int(np.ceil(natural_share * n - 1e-9)), len(seeds), n)
    for i in rng.choice(seeds, size=n_nat, replace=False) if n_nat else []:
        take(int(i), "natural")

    table = _GainTable(X, objective, coverage)
    gain = table.gain
    gain[taken] = -np.inf
    n_synth = 0
    if n_synth >= max_synth:
        gain[~natural] = -np.inf
    while len(picks) < n:
        i = int(np.argmax(gain))  # ties: lowest row
        if not gain[i] > 0:
            break
        keys = take(i, "greedy")
        gain[i] = -np.inf
        if not natural[i]:
            n_synth += 1
            if n_synth >= max_synth:
                gain[~natural] = -np.inf  # cap reached: synthetic rows are out for good
        table.lower(np.unique(keys), coverage)

    if len(picks) < n:  # nothing adds coverage any more: random seed rows, then random synthetic rows
        room = max(max_synth - n_synth, 0)
        for pool, cap in ((np.flatnonzero(natural & ~taken), n), (np.flatnonzero(~natural & ~taken), room)):
            k = min(len(pool), cap, n - len(picks))
            for i in rng.choice(pool, size=k, replace=False) if k > 0 else []:
                take(int(i), "fill")
    counts = {r: reasons.count(r) for r in ("natural", "greedy", "fill")}
    return Selection(np.asarray(picks, dtype=np.int64), reasons, coverage, objective.value(coverage), table.updates,
                     counts)


def random_baseline(X: sp.csr_matrix, natural: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n seed rows drawn at random (seeded): the 'before' set; returns (rows [n], coverage [K])."""
    seeds = np.flatnonzero(np.asarray(natural, dtype=bool))
    rows = np.random.default_rng(seed + 1).choice(seeds, size=min(n, len(seeds)), replace=False)
    return rows, coverage_of(X, rows)


def random_baseline_tokens(X: sp.csr_matrix, natural: np.ndarray, n_tokens: np.ndarray, tokens: float,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random seed rows until they hold `tokens` tokens: the 'before' set at equal size in tokens.

    Why: the balanced set may prefer long samples, so at an equal sample count it can hold more
    tokens than random text; this baseline separates "better spread" from "more tokens".
    n_tokens [N] are the tokens each row contributes (after truncation); returns (rows, coverage [K]).
    """
    seeds = np.flatnonzero(np.asarray(natural, dtype=bool))
    order = np.random.default_rng(seed + 2).permutation(seeds)
    held = np.cumsum(np.asarray(n_tokens, dtype=np.float64)[order])
    rows = order[:min(int(np.searchsorted(held, tokens)) + 1, len(order))]
    return rows, coverage_of(X, rows)


def coverage_of(X: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """Tokens per key [K] of the rows of X [N, K] (zeros for no rows)."""
    return np.asarray(X[rows].sum(axis=0)).ravel() if len(rows) else np.zeros(X.shape[1])
