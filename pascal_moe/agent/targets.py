"""Which experts the synthesize stage writes text for, and how they are grouped per request.

Why groups: one agent request (or one self-sampling batch) can serve several experts
when the same kind of text reaches them; experts whose top trigger tokens overlap
(Jaccard over token ids) are put together, at most `group_size` per group.

The profile DIR (docs/CONTRACTS.md) is read here and nowhere else in the stage:
experts.parquet picks the targets, triggers.parquet describes them, samples.parquet
gives the seed baseline rate of each group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pascal_moe.agent.prompts import TargetBrief, Trigger
from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import read_json

PROFILE_FILES = ("profile.json", "experts.parquet", "samples.parquet", "triggers.parquet")
TOP_TRIGGERS = 20  # trigger tokens per expert compared when grouping
MIN_JACCARD = 0.05  # below this overlap two experts are not put in one request


def expert_id(layer: int, expert: int) -> str:
    return f"L{layer}.E{expert}"


@dataclass(slots=True)
class Profile:
    """The parts of a profile DIR this stage reads."""

    path: Path
    meta: dict
    experts: pd.DataFrame
    samples: pd.DataFrame
    triggers: pd.DataFrame

    @property
    def n_experts(self) -> int:
        return int(self.meta["n_experts"])

    def key(self, layer: int, expert: int) -> int:
        return layer * self.n_experts + expert

    def seed_samples(self) -> pd.DataFrame:
        """Seed rows of samples.parquet (all rows when it has no `source` column)."""
        s = self.samples
        return s[s["source"] == "seed"] if "source" in s.columns and (s["source"] == "seed").any() else s

    def seed_key_tokens(self) -> tuple[np.ndarray, int]:
        """(tokens routed to each key [L*E], total tokens) over the seed samples."""
        seed = self.seed_samples()
        totals = np.zeros(int(self.meta["n_layers"]) * self.n_experts, dtype=np.int64)
        for keys, counts in zip(seed["keys"], seed["counts"]):
            np.add.at(totals, np.asarray(keys, dtype=np.int64), np.asarray(counts, dtype=np.int64))
        return totals, int(seed["n_tokens"].sum())


def load_profile(path: str | Path) -> Profile:
    """Read a profile DIR; a missing directory or file is a one-line error naming it."""
    p = Path(path)
    if not p.is_dir():
        raise PascalError(f"profile directory not found: {p} (run `pascal profile --model M --out {p}` first)")
    missing = [f for f in PROFILE_FILES if not (p / f).is_file()]
    if missing:
        raise PascalError(f"profile directory {p} lacks {', '.join(missing)}: re-run `pascal profile` into it")
    meta = read_json(p / "profile.json")
    for k in ("n_experts", "n_layers"):
        if k not in meta:
            raise PascalError(f"{p / 'profile.json'} has no {k!r}: re-run `pascal profile` with this version")
    return Profile(
        p,
        meta,
        pd.read_parquet(p / "experts.parquet"),
        pd.read_parquet(p / "samples.parquet"),
        pd.read_parquet(p / "triggers.parquet"),
    )


@dataclass(slots=True)
class Target:
    layer: int
    expert: int
    key: int
    reason: str  # "starved", "sensitive" or "starved+sensitive"
    share: float
    uniform_share: float
    sensitivity: float
    seed_tokens: int
    trigger_ids: frozenset[int] = frozenset()

    @property
    def id(self) -> str:
        return expert_id(self.layer, self.expert)


@dataclass(slots=True)
class TargetGroup:
    """Experts served by one request; `baseline_rate` = seed tokens routed to them / seed tokens."""

    gid: str
    targets: list[Target]
    baseline_rate: float = 0.0
    briefs: list[TargetBrief] = field(default_factory=list)

    @property
    def keys(self) -> list[int]:
        return [t.key for t in self.targets]

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.targets]


def pick_targets(profile: Profile, which: str, starved_ratio: float, top_sensitive: int) -> list[Target]:
    """Starved experts (share < ratio x the layer's uniform share) and the `top_sensitive` most sensitive ones."""
    kinds = {w.strip() for w in which.replace("+", ",").split(",") if w.strip()}
    if not kinds or kinds - {"starved", "sensitive"}:
        raise PascalError(f"--targets {which!r}: use starved, sensitive, or starved,sensitive")
    ex = profile.experts.copy()
    # Uniform share = the layer's mean share: right whether shares sum to 1 or to top_k per layer.
    ex["uniform"] = ex.groupby("layer")["share"].transform("mean")
    starved = set(ex.index[ex["share"] < starved_ratio * ex["uniform"]]) if "starved" in kinds else set()
    sensitive: set[int] = set()
    if "sensitive" in kinds and top_sensitive > 0 and "sensitivity" in ex.columns:
        sens = ex["sensitivity"].fillna(0.0)
        sensitive = set(sens.sort_values(ascending=False, kind="stable").index[:top_sensitive])
    seed_tokens, _ = profile.seed_key_tokens()
    out = []
    for i in sorted(
        starved | sensitive, key=lambda i: (i not in starved, ex.at[i, "share"] / max(ex.at[i, "uniform"], 1e-12))
    ):
        r = ex.loc[i]
        layer, expert = int(r["layer"]), int(r["expert"])
        reason = "+".join(k for k, s in (("starved", starved), ("sensitive", sensitive)) if i in s)
        key = profile.key(layer, expert)
        out.append(
            Target(
                layer,
                expert,
                key,
                reason,
                float(r["share"]),
                float(r["uniform"]),
                float(r.get("sensitivity", 0.0) or 0.0),
                int(seed_tokens[key]),
                frozenset(_trigger_ids(profile.triggers, layer, expert)),
            )
        )
    return out


def _trigger_ids(triggers: pd.DataFrame, layer: int, expert: int, top: int = TOP_TRIGGERS) -> list[int]:
    t = triggers[(triggers["layer"] == layer) & (triggers["expert"] == expert) & (triggers["kind"] == "token")]
    return [int(x) for x in t.sort_values("rank")["token_id"].head(top)]


def jaccard(a: frozenset[int], b: frozenset[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def group_targets(targets: Sequence[Target], group_size: int, min_jaccard: float = MIN_JACCARD) -> list[list[Target]]:
    """Greedy: the first ungrouped target (highest priority) takes the most overlapping others, up to group_size."""
    if group_size < 1:
        raise PascalError(f"--group-size must be >= 1, got {group_size}")
    left = list(targets)
    groups = []
    while left:
        head = left.pop(0)
        group = [head]
        while len(group) < group_size and left:
            union = frozenset().union(*(t.trigger_ids for t in group))
            best = max(left, key=lambda t: jaccard(union, t.trigger_ids))
            if jaccard(union, best.trigger_ids) < min_jaccard:
                break
            group.append(best)
            left.remove(best)
        groups.append(group)
    return groups


def brief(profile: Profile, t: Target, max_contexts: int = 6) -> TargetBrief:
    """The prompt-side view of one target: its triggers with lifts and example contexts."""
    tr = profile.triggers
    mine = tr[(tr["layer"] == t.layer) & (tr["expert"] == t.expert)]
    tokens = mine[mine["kind"] == "token"].sort_values("rank")
    contexts = mine[mine["kind"] == "context"].sort_values("rank")["context"].dropna().astype(str).tolist()
    row = profile.experts[(profile.experts["layer"] == t.layer) & (profile.experts["expert"] == t.expert)].iloc[0]
    opt = lambda c: float(row[c]) if c in row.index and pd.notna(row[c]) else None  # noqa: E731
    return TargetBrief(
        expert=t.id,
        reason=t.reason,
        triggers=[
            Trigger(str(r.token), float(r.lift), int(r["count"]), int(r["token_id"])) for _, r in tokens.iterrows()
        ],
        contexts=contexts[:max_contexts],
        share=t.share,
        uniform_share=t.uniform_share,
        weight_error=opt("weight_error"),
        reroute_rate=opt("reroute_rate"),
    )


def build_groups(
    profile: Profile, which: str, starved_ratio: float, top_sensitive: int, group_size: int
) -> list[TargetGroup]:
    """Targets, grouped, each group with its seed baseline rate and the briefs the agent reads."""
    targets = pick_targets(profile, which, starved_ratio, top_sensitive)
    key_tokens, total = profile.seed_key_tokens()
    out = []
    for i, members in enumerate(group_targets(targets, group_size)):
        hits = int(sum(key_tokens[t.key] for t in members))
        out.append(TargetGroup(f"g{i:03d}", members, hits / max(total, 1), [brief(profile, t) for t in members]))
    return out


def domain_mix(profile: Profile) -> dict[str, float]:
    """Share of seed tokens per domain (what the agent is told the corpus looks like)."""
    seed = profile.seed_samples()
    if "domain" not in seed.columns:
        return {"unknown": 1.0}
    mix = seed.groupby("domain")["n_tokens"].sum()
    return {str(k): float(v) for k, v in (mix / max(mix.sum(), 1)).items()}
