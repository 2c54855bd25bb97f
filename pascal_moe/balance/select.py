"""Choose the calibration set under a token budget: a random natural part, then cost-effective greedy.

Shape legend: N candidates, K expert keys.

Every candidate i costs c_i tokens (its tokens after truncation, plus the EOS that joins it to the
next document when the set is packed into windows); the set may hold at most B tokens.  Order of
picks (each is recorded with its reason):
1. `natural`: random seed rows until they hold ⌈natural_share · B⌉ tokens, so the usual
   distribution of text is kept whatever the objective prefers;
2. `greedy`: budgeted maximum coverage on F(S) = Σ_e w_e min(c_e, t_e): each step takes the row
   with the largest gain per token g_i / c_i among the rows that still fit the remaining budget
   (per-sample gain would favour long documents: a 2,000-token row that adds 30 tokens of coverage
   beats a 150-token row that adds 25).  Synthetic/self rows fit only while the synthetic tokens stay
   within max_synthetic_share · B.  At the end the greedy part is compared with the best single row
   that fits (natural part + that row); the better one is kept, which is what gives the ratio rule its
   guarantee, ≥ ½(1 − 1/e) of optimal (Khuller, Moss & Naor 1999; ratio greedy alone has none);
3. `fill`: once no fitting row adds anything (every reachable demand met), random seed rows that fit
   (then random synthetic ones within the cap), again to stay close to the natural mix.
   `single` marks the row of the single-row solution when it won.

Why not a lazy-greedy heap: every pick touches most keys, so all N stale bounds drop together and
a heap re-evaluates a large share of N per pick (~700k row evaluations for 512 of 100k at Qwen3-30B
shape).  Instead every gain g_i = Σ_e w_e min(x_ie, r_e) (r = residual demand) is kept current:
when a pick lowers r_e from r_old to r_new, only entries with x_ie > r_new change, by
w_e (min(x_ie, r_new) − min(x_ie, r_old)); keys whose r_new still exceeds every candidate's count
(most keys, most of the time) need no work.  One pass over the changed key's column of the dense,
column-major X (balance/counts.py: no CSC copy), then an argmax of g / c over N (the costs never
change, so the ratio needs no table of its own).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from pascal_moe.balance.counts import dense
from pascal_moe.balance.objective import Objective


@dataclass(slots=True)
class Selection:
    """Rows picked (in order), why each was picked, and the coverage reached."""

    index: np.ndarray  # [n] candidate rows
    reason: list[str]  # natural | greedy | single | fill, per row
    coverage: np.ndarray  # [K] tokens per key of the set
    value: float  # F(S)
    updates: int = 0  # gain entries updated incrementally (cost diagnostic)
    reasons_count: dict[str, int] = field(default_factory=dict)
    tokens: float = 0.0  # Σ cost of the picked rows
    synthetic_tokens: float = 0.0  # Σ cost of the picked synthetic/self rows


class _GainTable:
    """Current marginal gains [N] of all candidates, updated column-wise as residual demand falls.

    X is dense and column-major (balance/counts.py), so a key's column is one contiguous read; an
    update touches only the entries a comparison on that column selects.
    """

    def __init__(self, X: np.ndarray, objective: Objective, coverage: np.ndarray, block: int = 64):
        self.obj = objective
        self.X = X  # [N, K] Fortran order
        self.colmax = X.max(axis=0).astype(np.float64) if X.shape[0] else np.zeros(X.shape[1])  # [K]
        self.resid = np.maximum(objective.demand - coverage, 0.0)  # [K]
        self.updates = 0
        # keys whose residual exceeds every count add w_e x_ie: a mat-vec over column blocks (no float copy of X)
        linear = self.resid >= self.colmax
        w = np.where(linear, objective.weight, 0.0)  # [K]
        self.gain = np.zeros(X.shape[0])  # [N]
        for lo in np.flatnonzero(np.add.reduceat(linear, np.arange(0, X.shape[1], block))) * block:
            self.gain += X[:, lo : lo + block] @ w[lo : lo + block]  # [N, b] @ [b] in float64
        for e in np.flatnonzero(~linear & (self.resid > 0)).tolist():
            col = X[:, e]  # [N]
            rows = np.flatnonzero(col)
            self.gain[rows] += objective.weight[e] * np.minimum(col[rows], self.resid[e])
            self.updates += len(rows)

    def lower(self, keys: np.ndarray, coverage: np.ndarray) -> None:
        """Coverage rose on `keys`: fold the residual drop into every affected candidate's gain."""
        r_old = self.resid[keys]
        r_new = np.maximum(self.obj.demand[keys] - coverage[keys], 0.0)
        self.resid[keys] = r_new
        hit = (r_new < r_old) & (r_new < self.colmax[keys])
        X, w = self.X, self.obj.weight
        for e, ro, rn in zip(keys[hit].tolist(), r_old[hit].tolist(), r_new[hit].tolist()):
            col = X[:, e]  # [N] counts of every candidate for key e
            if rn <= 0:  # saturated: every holder loses its whole remaining contribution
                rows = np.flatnonzero(col)
                self.gain[rows] -= w[e] * np.minimum(col[rows], ro)
            else:  # only counts above the new residual change
                rows = np.flatnonzero(col > rn)
                self.gain[rows] += w[e] * (rn - np.minimum(col[rows], ro))
            self.updates += len(rows)


def select(
    X: sp.spmatrix | np.ndarray,
    objective: Objective,
    cost: np.ndarray,
    budget: float,
    natural: np.ndarray,
    *,
    natural_share: float,
    max_synthetic_share: float,
    seed: int,
) -> Selection:
    """Rows of X [N, K] holding at most `budget` tokens (row i costs cost[i] > 0); `natural` [N] marks seed rows.

    X is best passed as `counts.dense` gives it (column-major, compact dtype; then no copy is made).
    """
    X = dense(X)
    N = X.shape[0]
    rng = np.random.default_rng(seed)
    natural = np.asarray(natural, dtype=bool)
    cost = np.maximum(np.asarray(cost, dtype=np.float64), 1.0)  # [N]
    synth_cap = max_synthetic_share * budget
    taken = np.zeros(N, dtype=bool)
    picks: list[int] = []
    reasons: list[str] = []
    coverage = np.zeros(X.shape[1])
    spent = {"all": 0.0, "synthetic": 0.0}

    def take(i: int, why: str) -> np.ndarray:
        taken[i] = True
        picks.append(int(i))
        reasons.append(why)
        spent["all"] += cost[i]
        spent["synthetic"] += 0.0 if natural[i] else cost[i]
        row = X[i]  # [K] strided view (column-major X)
        keys = np.flatnonzero(row)
        coverage[keys] += row[keys]
        return keys

    def room(synthetic: bool) -> float:
        """Tokens a row may still cost: the remaining budget, and for synthetic rows the cap's room too."""
        left = budget - spent["all"]
        return min(left, synth_cap - spent["synthetic"]) if synthetic else left

    def limit() -> np.ndarray:
        """[N] room() of every row."""
        return np.where(natural, room(False), room(True))

    target = np.ceil(natural_share * budget - 1e-9)
    for i in rng.permutation(np.flatnonzero(natural)):
        if spent["all"] >= target:
            break
        if cost[i] <= room(False):
            take(int(i), "natural")
    n_natural = len(picks)
    base_value = objective.value(coverage)

    table = _GainTable(X, objective, coverage)
    gain = table.gain  # [N] kept current by the table
    gain[taken] = -np.inf
    first_gain = gain.copy()  # [N] gains over the natural part: the single-row alternative
    first_limit = limit()
    while True:
        ratio = np.where(cost <= limit(), gain / cost, -np.inf)  # [N] gain per token of rows that fit
        i = int(np.argmax(ratio))  # ties: lowest row
        if not ratio[i] > 0:
            break
        keys = take(i, "greedy")
        gain[i] = -np.inf
        table.lower(keys, coverage)

    single = np.where(cost <= first_limit, first_gain, -np.inf)
    j = int(np.argmax(single))
    if single[j] > 0 and base_value + single[j] > objective.value(coverage) + 1e-9:
        for i in picks[n_natural:]:  # the single best row beats the whole greedy part: keep it instead
            taken[i] = False
        del picks[n_natural:], reasons[n_natural:]
        coverage[:] = coverage_of(X, np.asarray(picks, dtype=np.int64))
        spent["all"] = float(cost[picks].sum()) if picks else 0.0
        spent["synthetic"] = float(cost[picks][~natural[picks]].sum()) if picks else 0.0
        take(j, "single")

    for pool in (np.flatnonzero(natural & ~taken), np.flatnonzero(~natural & ~taken)):  # random rows that fit
        for i in rng.permutation(pool):
            if cost[i] <= room(not natural[i]):
                take(int(i), "fill")
    counts = {r: reasons.count(r) for r in ("natural", "greedy", "single", "fill")}
    return Selection(
        np.asarray(picks, dtype=np.int64),
        reasons,
        coverage,
        objective.value(coverage),
        table.updates,
        counts,
        float(spent["all"]),
        float(spent["synthetic"]),
    )


def random_baseline_tokens(
    X: sp.spmatrix | np.ndarray, natural: np.ndarray, n_tokens: np.ndarray, tokens: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random seed rows until they hold `tokens` tokens: the 'before' set at equal size in tokens.

    Why: the balanced set may prefer long samples, so at an equal sample count it can hold more
    tokens than random text; this baseline separates "better spread" from "more tokens".
    n_tokens [N] are the tokens each row contributes (after truncation); returns (rows, coverage [K]).
    """
    seeds = np.flatnonzero(np.asarray(natural, dtype=bool))
    order = np.random.default_rng(seed + 2).permutation(seeds)
    held = np.cumsum(np.asarray(n_tokens, dtype=np.float64)[order])
    rows = order[: min(int(np.searchsorted(held, tokens)) + 1, len(order))]
    return rows, coverage_of(X, rows)


def coverage_of(X: sp.spmatrix | np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Tokens per key [K] of the rows of X [N, K] (zeros for no rows)."""
    if not len(rows):
        return np.zeros(X.shape[1])
    if sp.issparse(X):
        return np.asarray(X[rows].sum(axis=0)).ravel()
    return X[rows].sum(axis=0, dtype=np.float64)
