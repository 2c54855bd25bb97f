"""report.md and its PNG plots for a profile DIR: share heatmap, sensitivity heatmap, fp-vs-RTN Jaccard.

Why plots: routing imbalance and sensitivity are layer x expert maps; a heatmap
shows dead experts and hot spots at a glance, the tables give exact numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pascal_moe.io import heatmap
from pascal_moe.io.artifacts import atomic_path, write_text


def _grid(df: pd.DataFrame, col: str) -> np.ndarray:
    """[L, E] grid of a column of experts.parquet."""
    return df.pivot(index="layer", columns="expert", values=col).sort_index().to_numpy(dtype=float)


def _axes(ax, experts: pd.DataFrame, L: int, E: int) -> None:
    """Integer ticks: experts on x, MoE ordinal (decoder index) on y."""
    idx = experts.groupby("layer").layer_index.first().sort_index().tolist()
    ax.set_yticks(range(L), [f"{li} (dec {d})" for li, d in zip(range(L), idx)])
    ax.set_xticks(range(0, E, max(1, E // 16)))


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_heatmaps(out: Path, experts: pd.DataFrame, meta: dict) -> None:
    """The three PNGs, one figure at a time: a closed figure's canvas (its RGBA buffer, ~25 MiB at
    24 inches) sits in reference cycles until collected, so each is collected before the next."""
    import matplotlib

    matplotlib.use("Agg")
    from pascal_moe.models.lazy import release_memory

    for plot in (_plot_share, _plot_sensitivity, _plot_jaccard):
        plot(out, experts, meta)
        release_memory()


def _size(experts: pd.DataFrame) -> tuple[float, float]:
    L, E = experts.layer.nunique(), experts.expert.nunique()
    return heatmap.figsize(max(6, E * 0.35 + 2), max(3, L * 0.45 + 1.5))


def _plot_share(out: Path, experts: pd.DataFrame, meta: dict) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    share = _grid(experts, "share")
    L, E = share.shape
    size = _size(experts)
    uniform = 1.0 / E
    fig, ax = plt.subplots(figsize=size)
    pos = share[share > 0]
    lo = min(pos.min() if pos.size else uniform, uniform) / 2
    im = heatmap.draw(
        ax, np.where(share > 0, share, lo), cmap="viridis", norm=LogNorm(vmin=lo, vmax=max(share.max(), uniform * 2))
    )
    dead = np.argwhere(share == 0)
    ax.scatter(dead[:, 1], dead[:, 0], marker="x", color="red", s=30, label="no tokens") if len(dead) else None
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"token share (log; uniform = 1/{E})")
    _axes(ax, experts, L, E)
    fig.colorbar(im, ax=ax, label="share of routed tokens")
    if len(dead):
        ax.legend(loc="upper right", fontsize=7)
    _save(fig, out / "share_heatmap.png")
    plt.close(fig)


def _plot_sensitivity(out: Path, experts: pd.DataFrame, meta: dict) -> None:
    import matplotlib.pyplot as plt

    sens = _grid(experts, "sensitivity")
    L, E = sens.shape
    fig, ax = plt.subplots(figsize=_size(experts))
    im = heatmap.draw(ax, sens, cmap="magma", vmin=0, vmax=1)
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"quantization sensitivity ({meta['scheme']}, rank-combined)")
    _axes(ax, experts, L, E)
    fig.colorbar(im, ax=ax, label="sensitivity (0..1)")
    _save(fig, out / "sensitivity_heatmap.png")
    plt.close(fig)


def _plot_jaccard(out: Path, experts: pd.DataFrame, meta: dict) -> None:
    import matplotlib.pyplot as plt

    L = experts.layer.nunique()
    jac = meta.get("layer_jaccard") or []
    fig, ax = plt.subplots(figsize=heatmap.figsize(max(4, L * 0.6 + 2), 3))
    if jac:
        ax.bar(range(L), jac, color="steelblue")
        ax.set_ylim(min(jac) - 0.05 if min(jac) > 0.05 else 0, 1.0)
        for i, v in enumerate(jac):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
    else:
        ax.text(0.5, 0.5, "sensitivity pass disabled", ha="center", transform=ax.transAxes)
    ax.set_xticks(range(L))
    ax.set(xlabel="MoE layer", ylabel="mean Jaccard", title=f"top-k agreement fp vs RTN {meta['scheme']}")
    _save(fig, out / "jaccard.png")
    plt.close(fig)


def _table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(floatfmt.format(v) if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def render(experts: pd.DataFrame, triggers: pd.DataFrame, meta: dict) -> str:
    """The markdown report (numbers from the same frames that were written)."""
    E, k = meta["n_experts"], meta["top_k"]
    per_layer = (
        experts.groupby("layer")
        .agg(
            layer_index=("layer_index", "first"),
            dead=("tokens", lambda t: int((t == 0).sum())),
            min_share=("share", "min"),
            max_share=("share", "max"),
            boundary=("boundary_tokens", "sum"),
            weight_error=("weight_error", "mean"),
            reroute=("reroute_rate", "mean"),
        )
        .reset_index()
    )
    if meta.get("layer_jaccard"):
        per_layer["jaccard"] = meta["layer_jaccard"]
    rare = experts.sort_values("share").head(10)[["layer", "expert", "tokens", "share", "sensitivity"]]
    sens = experts.sort_values("sensitivity", ascending=False).head(10)[
        ["layer", "expert", "tokens", "weight_error", "reroute_rate", "margin_p50", "sensitivity"]
    ]
    parts = [
        f"# Routing profile: {meta['model']}",
        "",
        f"- data: `{meta['data']}` ({meta['totals']['samples']} samples, {meta['totals']['tokens']} tokens, "
        f"seq_len {meta['seq_len']})",
        f"- {meta['n_layers']} MoE layers (decoder indices {meta['layer_indices']}), {E} experts, top-{k}, "
        f"routing `{meta['routing']}`; sensitivity scheme `{meta['scheme']}` (RTN)",
        f"- dead experts (no token): {int((experts.tokens == 0).sum())} of {len(experts)}; uniform share = {1 / E:.4f}",
        f"- time: {meta['seconds']}",
        "",
        "## Per layer",
        _table(per_layer),
        "",
        "![token share](share_heatmap.png)",
        "",
        "## Rarest experts",
        _table(rare),
        "",
        "## Most quantization-sensitive experts",
        "sensitivity = mean of the within-model rank (0..1) of weight_error and reroute_rate.",
        "",
        _table(sens),
        "",
        "![sensitivity](sensitivity_heatmap.png)",
        "",
        "![jaccard](jaccard.png)",
        "",
        "## Trigger tokens of the rarest experts",
    ]
    tok = triggers[triggers.kind == "token"]
    ctx = triggers[triggers.kind == "context"]
    for r in rare.head(5).itertuples():
        t = tok[(tok.layer == r.layer) & (tok.expert == r.expert)].head(8)
        c = ctx[(ctx.layer == r.layer) & (ctx.expert == r.expert)].head(2)
        toks = ", ".join(f"`{x.token!r}` (lift {x.lift:.1f}, n={x.count})" for x in t.itertuples()) or "none"
        parts.append(f"- L{r.layer}.E{r.expert}: {toks}")
        parts.extend(f"  - `{x.context!r}` (w={x.weight:.2f})" for x in c.itertuples())
    return "\n".join(parts) + "\n"


def write_report(out: Path, experts: pd.DataFrame, triggers: pd.DataFrame, meta: dict) -> None:
    out = Path(out)
    plot_heatmaps(out, experts, meta)
    write_text(render(experts, triggers, meta), out / "report.md")
