"""report.md and coverage.png of `pascal synthesize`: targets, acceptance per round, coverage gained.

Coverage is measured, not inferred: per target expert, its routed tokens in the seed
profile vs those added by accepted passages, and its rate (routed tokens / tokens) in
the accepted passages written for its group vs its seed rate.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from pascal_moe.agent.config import SynthesizeConfig
from pascal_moe.agent.targets import Profile, TargetGroup
from pascal_moe.agent.verify import per_key_rate
from pascal_moe.io.artifacts import atomic_path, write_text


def coverage_table(profile: Profile, groups: list[TargetGroup], df: pd.DataFrame) -> pd.DataFrame:
    """Per target expert: seed tokens and rate vs tokens added and rate in the accepted passages of its group.

    rate = tokens routed to the expert / all tokens of the passages counted; rate_ratio =
    accepted rate / seed rate (how much denser the new text is in that expert than the seed).
    """
    seed_keys, seed_total = profile.seed_key_tokens()
    rows = []
    acc = df[df["accepted"].astype(bool)] if len(df) else df
    for g in groups:
        mine = acc[acc["group"] == g.gid] if len(acc) else acc
        per_key, total = per_key_rate(
            list(mine["keys"]) if len(mine) else [],
            list(mine["counts"]) if len(mine) else [],
            list(mine["n_tokens"]) if len(mine) else [],
            len(seed_keys),
        )
        for t in g.targets:
            seed_rate = seed_keys[t.key] / max(seed_total, 1)
            rate = per_key[t.key] / total if total else 0.0
            rows.append(
                {
                    "group": g.gid,
                    "expert": t.id,
                    "key": t.key,
                    "reason": t.reason,
                    "seed_tokens": int(seed_keys[t.key]),
                    "seed_rate": float(seed_rate),
                    "passages": len(mine),
                    "added_tokens": int(per_key[t.key]),
                    "accepted_rate": float(rate),
                    "rate_ratio": float(rate / seed_rate) if seed_rate > 0 else (float("inf") if rate else 0.0),
                }
            )
    return pd.DataFrame(
        rows,
        columns=[
            "group",
            "expert",
            "key",
            "reason",
            "seed_tokens",
            "seed_rate",
            "passages",
            "added_tokens",
            "accepted_rate",
            "rate_ratio",
        ],
    )


def write_report(
    out: Path,
    cfg: SynthesizeConfig,
    agent: str,
    profile: Profile,
    groups: list[TargetGroup],
    df: pd.DataFrame,
    failures: dict[str, int],
    analysis: dict | None = None,
) -> Path:
    """report.md: targets, acceptance per round, coverage gained per target expert, and coverage.png."""
    cov = coverage_table(profile, groups, df)
    lines = [
        f"# synthesize: {cfg.model}",
        "",
        f"- profile: `{cfg.profile}`",
        f"- backend: {agent}" + (f" (agent model {df['agent_model'].iloc[0]})" if len(df) and agent != "self" else ""),
        f"- targets: {cfg.targets} (starved < {cfg.starved_ratio} x uniform share; top {cfg.top_sensitive} "
        f"sensitive), {sum(len(g.targets) for g in groups)} experts in {len(groups)} groups",
        f"- accept when target-hit rate >= {cfg.accept_ratio} x seed baseline rate",
        "",
    ]
    lines += [
        "## Targets",
        "",
        "| group | expert | reason | share | uniform | sensitivity | baseline rate (group) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {g.gid} | {t.id} | {t.reason} | {t.share:.4f} | {t.uniform_share:.4f} | {t.sensitivity:.3f} | "
        f"{g.baseline_rate:.4f} |"
        for g in groups
        for t in g.targets
    ]
    lines += [
        "",
        "## Acceptance per round",
        "",
        "| round | passages | accepted | rate | rejected by reason |",
        "|---|---|---|---|---|",
    ]
    for rnd, d in df.groupby("round") if len(df) else []:
        why = Counter(r for r in d["reject_reason"] if isinstance(r, str) and r)
        lines.append(
            f"| {rnd} | {len(d)} | {int(d['accepted'].sum())} | {d['accepted'].mean():.0%} | "
            + (", ".join(f"{k}: {v}" for k, v in why.most_common()) or "-")
            + " |"
        )
    if failures:
        lines += [
            "",
            "Agent requests that gave no usable reply (after retries): "
            + ", ".join(f"{k}: {v}" for k, v in sorted(failures.items())),
        ]
    if analysis and analysis.get("patterns"):
        share = analysis["dropped"] / analysis["patterns"]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(analysis.get("reasons", {}).items())) or "-"
        lines += [
            "",
            f"Analyses checked: {analysis['dropped']} of {analysis['patterns']} patterns dropped "
            f"({share:.0%}; {reasons}); {analysis['fallback_groups']} groups used the trigger-token fallback",
        ]
    lines += [
        "",
        "## Coverage gained per target expert",
        "",
        "Seed rate = the expert's routed tokens / all seed tokens; accepted rate = its routed tokens / all "
        "tokens of the accepted passages written for its group.",
        "",
        "| expert | seed tokens | seed rate | accepted passages | tokens added | accepted rate | rate ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.expert} | {r.seed_tokens} | {r.seed_rate:.4f} | {r.passages} | {r.added_tokens} | "
        f"{r.accepted_rate:.4f} | {r.rate_ratio:.2f} |"
        for r in cov.itertuples()
    ]
    if len(cov):
        _plot(cov, out / "coverage.png")
        lines += ["", "![coverage](coverage.png)"]
    return write_text("\n".join(lines) + "\n", out / "report.md")


def _plot(cov: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(cov))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.5 * len(cov) + 4), 4))
    axes[0].bar(x - 0.2, cov["seed_rate"], 0.4, label="seed corpus")
    axes[0].bar(x + 0.2, cov["accepted_rate"], 0.4, label="accepted passages")
    axes[0].set_ylabel("tokens routed to expert / tokens")
    axes[1].bar(x - 0.2, cov["seed_tokens"], 0.4, label="seed profile")
    axes[1].bar(x + 0.2, cov["added_tokens"], 0.4, label="added by accepted passages")
    axes[1].set_ylabel("routed tokens")
    for ax in axes:
        ax.set_xticks(x, cov["expert"], rotation=90, fontsize=7)
        ax.legend(fontsize=8)
    fig.suptitle("coverage of the target experts")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
