"""The token-budgeted greedy of `pascal balance` (balance/select.py): exactness, budget, shares, and why per token.

Instances are small random sparse matrices or crafted pools; no model is needed.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from pascal_moe.balance.objective import Objective
from pascal_moe.balance.select import select


def _instance(seed: int, N: int = 80, K: int = 24, scale: float = 4.0):
    rng = np.random.default_rng(seed)
    X = sp.random(
        N,
        K,
        density=0.3,
        random_state=np.random.RandomState(seed),
        data_rvs=lambda s: rng.uniform(1, 20, s),
        format="csr",
    )
    cost = rng.integers(5, 60, size=N).astype(float)
    return X, Objective(demand=rng.uniform(5, 40, K) * scale, weight=rng.uniform(1, 3, K)), cost


def _plain_greedy(X, obj, cost, budget, by_ratio: bool) -> list[int]:
    """Reference: recompute every gain each step; by gain per token or (old rule) by gain per sample."""
    cov, picks, spent = np.zeros(X.shape[1]), [], 0.0
    while True:
        g = obj.gains(X, cov)
        score = g / cost if by_ratio else g.copy()
        score[picks] = -np.inf
        score[cost > budget - spent] = -np.inf
        i = int(np.argmax(score))
        if not score[i] > 0:
            return picks
        picks.append(i)
        spent += cost[i]
        cov += X[i].toarray().ravel()


def test_incremental_greedy_equals_plain_cost_effective_greedy():
    X, obj, cost = _instance(2)
    sel = select(X, obj, cost, 600.0, np.ones(X.shape[0], bool), natural_share=0.0, max_synthetic_share=0.0, seed=0)
    plain = _plain_greedy(X, obj, cost, 600.0, by_ratio=True)
    greedy = [i for i, r in zip(sel.index.tolist(), sel.reason) if r == "greedy"]
    assert greedy == plain and len(plain) > 5
    assert 0 < sel.updates < len(plain) * X.nnz  # gains were maintained incrementally, not recomputed
    assert sel.tokens == cost[sel.index].sum() <= 600.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_budget_is_met_within_one_percent_and_shares_count_tokens(seed):
    X, obj, cost = _instance(seed, N=400, scale=3.0)
    natural = np.random.default_rng(seed).uniform(size=400) < 0.6
    X = X.tolil()
    X[~natural] = X[~natural] * 5  # synthetic rows far more attractive: the cap must bind
    X = X.tocsr()
    budget = 3000.0
    sel = select(X, obj, cost, budget, natural, natural_share=0.25, max_synthetic_share=0.3, seed=seed)
    assert 0.99 * budget <= sel.tokens <= budget and len(set(sel.index.tolist())) == len(sel.index)
    synth = cost[sel.index][~natural[sel.index]].sum()
    assert synth == sel.synthetic_tokens <= 0.3 * budget and synth > 0.2 * budget
    nat = np.array([r == "natural" for r in sel.reason])
    assert natural[sel.index[nat]].all() and cost[sel.index[nat]].sum() >= 0.25 * budget
    assert cost[sel.index[nat]][:-1].sum() < 0.25 * budget  # no more natural rows than the share needs


def test_cost_effective_greedy_beats_per_sample_greedy_when_long_rows_cover_little():
    """Long rows (200 tokens) add 12 tokens of coverage each, short rows (10 tokens) add 8: per sample the long rows
    win every step and exhaust the budget; per token the short rows win and cover 18x more."""
    K, n_long, n_short = 60, 20, 60
    rows, cols, vals = [], [], []
    for i in range(n_long):  # long rows: 12 tokens on the first key of a pair
        rows.append(i), cols.append(i % K), vals.append(12.0)
    for j in range(n_short):  # short rows: 8 tokens each on their own key
        rows.append(n_long + j), cols.append(j), vals.append(8.0)
    X = sp.csr_matrix((vals, (rows, cols)), shape=(n_long + n_short, K))
    cost = np.r_[np.full(n_long, 200.0), np.full(n_short, 10.0)]
    obj = Objective(demand=np.full(K, 20.0), weight=np.ones(K))
    budget = 400.0
    per_sample = _plain_greedy(X, obj, cost, budget, by_ratio=False)
    sel = select(X, obj, cost, budget, np.ones(len(cost), bool), natural_share=0.0, max_synthetic_share=0.0, seed=0)
    f_sample = obj.value(np.asarray(X[per_sample].sum(0)).ravel())
    assert cost[per_sample].sum() <= budget and set(per_sample) <= set(range(n_long))  # only long rows
    assert sel.value > 10 * f_sample and sel.value == pytest.approx(40 * 8.0)  # 40 short rows fill 400 tokens


def test_best_single_row_replaces_a_worse_greedy_part():
    """Classic case of ratio greedy alone: a cheap row with the best ratio blocks the one row worth the budget."""
    X = sp.csr_matrix(np.array([[2.0, 0.0], [0.0, 100.0]]))
    cost = np.array([1.0, 100.0])
    obj = Objective(demand=np.array([10.0, 100.0]), weight=np.ones(2))
    sel = select(X, obj, cost, 100.0, np.ones(2, bool), natural_share=0.0, max_synthetic_share=0.0, seed=0)
    assert sel.index.tolist() == [1] and sel.reason == ["single"] and sel.value == pytest.approx(100.0)
