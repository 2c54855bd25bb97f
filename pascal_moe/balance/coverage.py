"""Coverage diagnostics: the selected set against random seed text holding the same number of tokens.

Shape legend: K = L·E expert keys.  Tokens per key count top-k membership, so a layer's keys sum to
tokens · k: measured on the packed windows (balance/run.py), or predicted from the documents' profiled
counts (objective.count_matrix).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pascal_moe.io.artifacts import atomic_path


@dataclass(frozen=True, slots=True)
class CoverageSummary:
    """What a user checks first: how many experts miss their demand, and how even the spread is."""

    documents: int
    windows: int  # packed rows of seq_len tokens
    tokens: int  # calibration tokens in the windows (separators included)
    experts_below_demand: int
    experts_without_tokens: int
    min_tokens_per_expert: float
    median_tokens_per_expert: float
    gini: float  # of tokens per expert over all keys, 0 = perfectly even
    synthetic_share: float  # of tokens
    objective: float

    def as_dict(self) -> dict:
        return asdict(self)


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 even, → 1 all on one)."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    if v.size == 0 or v.sum() <= 0:
        return 0.0
    n = v.size
    return float((2.0 * np.sum(np.arange(1, n + 1) * v) / (n * v.sum())) - (n + 1.0) / n)


def summarize(
    coverage: np.ndarray,
    demand: np.ndarray,
    weight: np.ndarray,
    *,
    documents: int,
    windows: int,
    tokens: int,
    synthetic_tokens: float,
) -> CoverageSummary:
    """Summary of one set from its coverage [K], the demand/weight [K], and its size in documents/windows/tokens."""
    below = coverage < demand - 1e-6
    return CoverageSummary(
        documents=int(documents),
        windows=int(windows),
        tokens=int(tokens),
        experts_below_demand=int(below.sum()),
        experts_without_tokens=int(np.sum(coverage <= 0)),
        min_tokens_per_expert=float(coverage.min()),
        median_tokens_per_expert=float(np.median(coverage)),
        gini=gini(coverage),
        synthetic_share=float(synthetic_tokens / tokens) if tokens else 0.0,
        objective=float(np.sum(weight * np.minimum(coverage, demand))),
    )


def coverage_table(
    random: np.ndarray,
    measured: np.ndarray,
    predicted: np.ndarray,
    demand: np.ndarray,
    weight: np.ndarray,
    n_experts: int,
    reachable: np.ndarray,
) -> pd.DataFrame:
    """One row per (layer, expert): measured/predicted/random tokens, demand, importance, below-demand flags."""
    key = np.arange(len(demand))
    return pd.DataFrame(
        {
            "layer": key // n_experts,
            "expert": key % n_experts,
            "key": key,
            "demand": demand,
            "weight": weight,
            "tokens_measured": measured,
            "tokens_predicted": predicted,
            "tokens_random": random,
            "below_after": measured < demand - 1e-6,
            "below_before": random < demand - 1e-6,
            "candidate_tokens": reachable,
        }
    )


def plot_coverage(table: pd.DataFrame, before: CoverageSummary, after: CoverageSummary, path: Path | str) -> Path:
    """coverage.png: per-expert tokens/demand (sorted) and experts below demand per layer, before vs after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    for col, lab, s in (("tokens_random", "random seed, same tokens", before), ("tokens_measured", "balanced", after)):
        ratio = np.sort(table[col].to_numpy() / table["demand"].to_numpy())
        ax1.plot(np.arange(len(ratio)), np.maximum(ratio, 1e-3), label=f"{lab}: {s.experts_below_demand} below demand")
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.set_yscale("log")
    ax1.set_xlabel("experts (sorted)")
    ax1.set_ylabel("tokens / demand")
    ax1.legend()
    ax1.set_title("per-expert coverage")
    layers = sorted(table["layer"].unique())
    x = np.arange(len(layers))
    b = table.groupby("layer")["below_before"].sum().reindex(layers).to_numpy()
    a = table.groupby("layer")["below_after"].sum().reindex(layers).to_numpy()
    ax2.bar(x - 0.2, b, 0.4, label=f"random seed (Gini {before.gini:.2f})")
    ax2.bar(x + 0.2, a, 0.4, label=f"balanced (Gini {after.gini:.2f}, synthetic {after.synthetic_share:.0%})")
    ax2.set_xticks(x, [str(v) for v in layers])
    ax2.set_xlabel("MoE layer")
    ax2.set_ylabel("experts below demand")
    ax2.legend()
    ax2.set_title("experts below demand per layer")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
