"""Analyses are checked, not trusted: a pattern must be about the group's experts and their triggers.

Why: a small agent model returns analyses that fit the schema yet say nothing (patterns
naming experts such as "GraceBakelov/Gabriela", descriptions with no trigger in them).
Generating from such a pattern wastes every request that follows.  A pattern is kept
only when (1) it names at least one expert and only experts of its group, and (2) its
name, description or example phrases contain at least one trigger token of those
experts.  When no pattern of a group survives, the trigger-token fallback is used:
one pattern per expert built from its decoded triggers and contexts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pascal_moe.agent.prompts import TargetBrief
from pascal_moe.agent.readable import readable_context, readable_trigger

MARK = re.compile(r"\[\[|\]\]")


@dataclass(slots=True)
class AnalysisCheck:
    """Patterns kept and dropped (with the reason) for one group's analysis."""

    kept: list[dict[str, Any]]
    dropped: list[tuple[str, str]]  # (pattern name, reason)


def _triggers(b: TargetBrief, top: int = 12) -> list[str]:
    words = [readable_trigger(t.token).strip().lower() for t in b.triggers[:top]]
    return [w for w in words if w and "\ufffd" not in w]


def check_patterns(patterns: Sequence[Any], briefs: Sequence[TargetBrief]) -> AnalysisCheck:
    """Keep the patterns that name only the group's experts and contain one of their trigger tokens."""
    by_id = {b.expert: b for b in briefs}
    kept, dropped = [], []
    for p in patterns:
        if not isinstance(p, dict):
            dropped.append(("?", "not an object"))
            continue
        name = str(p.get("name", "?"))[:80]
        experts = [str(e).strip() for e in p.get("experts") or []]
        if not experts:
            dropped.append((name, "names no expert"))
            continue
        foreign = [e for e in experts if e not in by_id]
        if foreign:
            dropped.append((name, f"names experts outside the group: {', '.join(foreign[:3])}"))
            continue
        body = " ".join([name, str(p.get("description", "")), *map(str, p.get("example_phrases") or [])]).lower()
        if not any(t in body for e in experts for t in _triggers(by_id[e])):
            dropped.append((name, "contains none of its experts' trigger tokens"))
            continue
        kept.append(p)
    return AnalysisCheck(kept, dropped)


def fallback_patterns(briefs: Sequence[TargetBrief]) -> list[dict[str, Any]]:
    """When the agent gave no usable analysis: one pattern per expert from its decoded trigger tokens."""
    out = []
    for b in briefs:
        words = list(
            dict.fromkeys(
                w for w in (readable_trigger(t.token).strip() for t in b.triggers[:12]) if w and "\ufffd" not in w
            )
        )
        contexts = [MARK.sub("", readable_context(c)) for c in b.contexts[:4]]
        out.append(
            {
                "name": f"triggers_{b.expert.replace('.', '_').lower()}",
                "experts": [b.expert],
                "description": "text in which these tokens occur naturally and often: " + ", ".join(words),
                "example_phrases": [c for c in contexts if c.strip() and "\ufffd" not in c],
                "trigger_words": whole_words(b),
            }
        )
    return out


def whole_words(b: TargetBrief, top: int = 8) -> list[str]:
    """The expert's triggers that are whole words (a byte-level token starting with a space), else its readable ones.

    Sub-word pieces ("comp", "ident") mean nothing to a writer; the words of its contexts do.
    """
    marked = [m.strip() for c in b.contexts for m in re.findall(r"\[\[(.+?)\]\]", readable_context(c))]
    tokens = [w for w in (readable_trigger(t.token).strip() for t in b.triggers) if w]
    # the contexts' marked words are real words ("altchars" for the piece " al"); then the triggers that
    # are whole words of their own (seen unextended in a context), then the rest
    whole = [t for t in tokens if t in marked]
    return list(dict.fromkeys(w for w in marked + whole + tokens if w))[:top]
