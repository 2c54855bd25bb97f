"""PNG plots of an evaluation (matplotlib, Agg backend): what a reader looks at first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pascal_moe.io import heatmap
from pascal_moe.io.artifacts import atomic_path


def _plt():
    """pyplot on the Agg backend, imported when a plot is drawn (not under the model passes' peak)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def jaccard_lines(df: pd.DataFrame, path: Path) -> Path:
    """Per-layer expert-selection Jaccard vs fp, one line per quantized model (from long-format eval rows)."""
    rows = df[(df.metric == "jaccard") & (df.layer >= 0)]
    fig, ax = _plt().subplots(figsize=(6.5, 3.8))
    for model, g in rows.groupby("model", sort=False):
        g = g.sort_values("layer")
        ax.plot(g.layer, g.value, marker="o", label=model)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("Jaccard(top-k fp, top-k q)")
    ax.set_title("expert-selection agreement per layer")
    if not rows.empty:
        ax.set_xticks(sorted(rows.layer.unique()))
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def ppl_kl_bars(df: pd.DataFrame, path: Path) -> Path:
    """Perplexity (fp included) and mean KL(fp || q) per model, side by side."""
    s = df[df.layer == -1].pivot_table(index="model", columns="metric", values="value", sort=False)
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(9, 3.8))
    x = np.arange(len(s))
    bars = a1.bar(x, s.get("ppl", pd.Series(np.nan, index=s.index)), color="tab:blue")
    a1.bar_label(bars, fmt="%.2f", fontsize=7)
    a1.set_title("held-out perplexity")
    kl = s.get("kl", pd.Series(np.nan, index=s.index)).fillna(0.0)
    a2.bar_label(a2.bar(x, kl, color="tab:red"), fmt="%.4f", fontsize=7)
    a2.set_title("mean KL(fp || q) per token")
    for a in (a1, a2):
        a.set_xticks(x, s.index, rotation=30, ha="right", fontsize=7)
        a.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def coverage_heatmap(counts: np.ndarray, path: Path, title: str = "calibration coverage") -> Path:
    """Tokens routed to each (layer, expert) [L, E], log scale; zero cells (uncalibrated experts) show as white."""
    size = heatmap.figsize(max(5.0, counts.shape[1] * 0.35), 1.2 + counts.shape[0] * 0.45)
    fig, ax = _plt().subplots(figsize=size)
    shown = np.ma.masked_where(counts == 0, np.log10(np.maximum(counts, 1)))  # [L, E]
    im = heatmap.draw(ax, shown, cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="log10 tokens")
    return _save(fig, path)
