"""Prompt templates for the agent's steps, and the JSON schema each step's reply must match.

Templates are plain files in the top-level `prompts/` folder (`system.md` plus one per
step) with `$placeholders` (string.Template, so JSON examples need no brace escaping).
Each rendering reports the sha256 of the template text it used, recorded with every
sample so that a changed prompt is visible in the artifacts.

The dataclasses here are the prompt-side view of the profile: the synthesize stage
maps its targets and measurements onto them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from pascal_moe.agent.schema import max_json_chars
from pascal_moe.errors import PascalError

STEPS = ("analyse", "generate", "refine", "generate_text")
ANALYSE_PATTERNS = 4  # patterns asked for per target group
PROMPTS_ENV = "PASCAL_PROMPTS_DIR"
REPLY_RULES = {
    "json": "Reply with a single JSON value that matches the requested schema, and nothing else: no prose, "
    "no code fences, no comments.",
    "text": "Reply with the requested text only: no introduction, no comments about it, no JSON.",
}


def _strings(max_items: int, max_chars: int) -> dict[str, Any]:
    return {"type": "array", "maxItems": max_items, "items": {"type": "string", "maxLength": max_chars}}


def analyse_schema(n_patterns: int = ANALYSE_PATTERNS) -> dict[str, Any]:
    """Reply schema of the analyse step.

    Every array and string is bounded.  The server is sent the portable form without the
    bounds (schema.portable); the client clips the reply to them (schema.clip), and
    `max_tokens` is read off them (reply_tokens).
    """
    return {
        "title": "analyse",
        "type": "object",
        "properties": {
            "patterns": {
                "type": "array",
                "minItems": 1,
                "maxItems": n_patterns,
                "items": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "maxLength": 80},
                        "description": {"type": "string", "minLength": 1, "maxLength": 300},
                        "experts": _strings(8, 24),
                        "example_phrases": _strings(4, 80),
                    },
                    "required": ["name", "description", "experts", "example_phrases"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["patterns"],
        "additionalProperties": False,
    }


def passage_chars(words: int) -> int:
    """Longest passage text the schema allows for a request of `words` words (about 2x the request)."""
    return 12 * words + 200


def generate_schema(n_passages: int = 8, words: int = 150) -> dict[str, Any]:
    """Reply schema of the generate and refine steps: at most `n_passages` bounded passages."""
    return {
        "title": "generate",
        "type": "object",
        "properties": {
            "passages": {
                "type": "array",
                "minItems": 1,
                "maxItems": n_passages,
                "items": {
                    "type": "object",
                    # text first: a small model writes its passage into whichever string field comes first
                    "properties": {
                        "text": {"type": "string", "minLength": 1, "maxLength": passage_chars(words)},
                        "pattern": {"type": "string", "maxLength": 120},
                    },
                    "required": ["text", "pattern"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["passages"],
        "additionalProperties": False,
    }


def reply_tokens(schema: dict[str, Any] | None) -> int:
    """`max_tokens` that fits the longest reply `schema` allows (tokens >= chars / 3 assumed)."""
    if schema is None:
        raise ValueError("a plain-text step sizes its reply from --passage-words, not from a schema")
    return max_json_chars(schema) // 3 + 256


@dataclass(slots=True)
class Trigger:
    """A token that routes to an expert more often than average."""

    token: str
    lift: float  # P(expert | token) / P(expert)
    count: int  # times this token was routed to the expert in the seed corpus
    token_id: int | None = None
    script: str | None = None  # for a piece of a multi-byte character: the script it belongs to (readable.py)


@dataclass(slots=True)
class TargetBrief:
    """One target expert as the agent sees it."""

    expert: str  # "L{layer}.E{expert}"
    reason: str  # "starved", "sensitive" or "starved+sensitive"
    triggers: list[Trigger] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)  # snippets with the routed token marked [[tok]]
    share: float | None = None  # routing share in the seed corpus
    uniform_share: float | None = None  # top_k / n_experts
    weight_error: float | None = None  # relative output error after quantization
    reroute_rate: float | None = None  # share of its tokens that switch experts after quantization


@dataclass(slots=True)
class PassageFeedback:
    """A previous passage with its measured routing, for the refine step."""

    pattern: str
    text: str
    hit_rate: float  # share of the passage's tokens routed to its pattern's target experts
    baseline_rate: float  # the same rate on the seed corpus
    experts_hit: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Rendered:
    """Messages ready for a backend, the schema the reply must match, and the template's sha256."""

    step: str
    messages: list[dict[str, str]]
    schema: dict[str, Any] | None  # None: a plain-text reply (--agent-format text)
    template_sha256: str


def prompts_dir(override: str | Path | None = None) -> Path:
    """The templates folder: the argument, else $PASCAL_PROMPTS_DIR, else the package's own `prompts/`.

    The templates are package data (read with importlib.resources), so a wheel install has them; the
    repository's top-level `prompts/` is a link to the same folder.
    """
    d = Path(override or os.environ.get(PROMPTS_ENV) or str(resources.files("pascal_moe") / "prompts"))
    if not (d / "system.md").is_file():
        raise PascalError(f"prompt templates not found in {d}: set {PROMPTS_ENV} to the folder holding system.md")
    return d


def render(
    step: str, values: Mapping[str, object], schema: dict[str, Any] | None, directory: str | Path | None = None
) -> Rendered:
    """Fill `prompts/<step>.md` (and `system.md`) with `values`; a missing placeholder is a one-line error."""
    if step not in STEPS:
        raise PascalError(f"unknown agent step {step!r}: use one of {', '.join(STEPS)}")
    d = prompts_dir(directory)
    path = d / f"{step}.md"
    if not path.is_file():
        raise PascalError(f"prompt template {path} is missing")
    # A plain-text step gets a short system prompt of its own when there is one: small models echo a long one.
    sys_path = d / "system_text.md" if schema is None and (d / "system_text.md").is_file() else d / "system.md"
    system, user = sys_path.read_text(encoding="utf-8"), path.read_text(encoding="utf-8")
    sha = hashlib.sha256(f"{system}\0{user}".encode()).hexdigest()
    rule = REPLY_RULES["json" if schema is not None else "text"]
    texts = {"reply_rule": rule, **{k: str(v) for k, v in values.items()}}
    try:
        content = Template(user).substitute(texts)
        system_text = Template(system).substitute(texts)
    except KeyError as e:
        raise PascalError(f"prompt template {path.name} needs a value for ${e.args[0]}") from e
    except ValueError as e:
        raise PascalError(f"prompt template {path.name}: malformed placeholder ({e}); write $$ for a dollar") from e
    messages = [{"role": "system", "content": system_text.strip()}, {"role": "user", "content": content.strip()}]
    return Rendered(step, messages, schema, sha)


def format_domain_mix(mix: Mapping[str, float]) -> str:
    total = sum(mix.values()) or 1.0
    return "\n".join(f"- {k}: {v / total:.0%}" for k, v in sorted(mix.items(), key=lambda kv: -kv[1]))


def _why(t: TargetBrief) -> str:
    parts = []
    if t.share is not None and t.uniform_share:
        parts.append(
            f"receives {t.share:.2%} of routed tokens vs a uniform share of {t.uniform_share:.2%} "
            f"({t.share / t.uniform_share:.2f}x)"
        )
    if t.weight_error is not None:
        parts.append(f"relative output error after quantization {t.weight_error:.3f}")
    if t.reroute_rate is not None:
        parts.append(f"{t.reroute_rate:.1%} of its tokens switch experts after quantization")
    return f"{t.reason}" + (f": {'; '.join(parts)}" if parts else "")


def format_targets(targets: Sequence[TargetBrief], max_triggers: int = 12, max_contexts: int = 6) -> str:
    """The targets block of the analyse prompt: one section per expert, in whole words (readable.py)."""
    from pascal_moe.agent.readable import readable_context, readable_trigger, trigger_kind

    blocks = []
    for t in targets:
        lines = [f"## {t.expert}", f"Why targeted: {_why(t)}"]
        trig = sorted(t.triggers, key=lambda g: (-g.lift, -g.count))[:max_triggers]
        kind = trigger_kind([g.token for g in trig], [g.script for g in trig])
        shown = [(readable_trigger(g.token), g) for g in trig]
        shown = [(w, g) for w, g in shown if w.strip()]
        if shown:
            lines.append(
                "Trigger tokens: "
                + ", ".join(f"{json.dumps(w, ensure_ascii=False)} (lift {g.lift:.1f}, n={g.count})" for w, g in shown)
            )
        if kind is not None:
            lines.append(f"Its triggers are mostly {kind[1]}.")
        contexts = [c for c in (readable_context(c) for c in t.contexts[:max_contexts]) if c.strip()]
        if contexts:
            lines.append("Contexts:")
            lines += [f"- {c}" for c in contexts]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def format_patterns(patterns: Sequence[Mapping[str, Any]]) -> str:
    """Patterns from the analyse step, as a readable list."""
    out = []
    for p in patterns:
        phrases = "; ".join(p.get("example_phrases", []))
        out.append(
            f"- {p['name']} (experts {', '.join(p.get('experts', []))}): {p['description']}"
            + (f"\n  e.g. {phrases}" if phrases else "")
        )
    return "\n".join(out)


def format_feedback(items: Sequence[PassageFeedback], max_chars: int = 600) -> str:
    if not items:
        return "(none)"
    out = []
    for f in items:
        ratio = f.hit_rate / f.baseline_rate if f.baseline_rate > 0 else float("inf")
        text = " ".join(f.text.split())
        text = text if len(text) <= max_chars else text[:max_chars] + " ..."
        hit = f"; experts reached: {', '.join(f.experts_hit)}" if f.experts_hit else ""
        out.append(
            f"- [{f.pattern}] target-hit rate {f.hit_rate:.2%} vs baseline {f.baseline_rate:.2%} "
            f"(ratio {ratio:.2f}){hit}\n  {text}"
        )
    return "\n".join(out)


def analyse_prompt(
    targets: Sequence[TargetBrief],
    domain_mix: Mapping[str, float],
    n_patterns: int = ANALYSE_PATTERNS,
    directory: str | Path | None = None,
) -> Rendered:
    return render(
        "analyse",
        {"targets": format_targets(targets), "domain_mix": format_domain_mix(domain_mix), "n_patterns": n_patterns},
        analyse_schema(n_patterns),
        directory,
    )


def generate_prompt(
    patterns: Sequence[Mapping[str, Any]],
    domain_mix: Mapping[str, float],
    n_passages: int,
    words: int,
    directory: str | Path | None = None,
) -> Rendered:
    return render(
        "generate",
        {
            "patterns": format_patterns(patterns),
            "domain_mix": format_domain_mix(domain_mix),
            "n_passages": n_passages,
            "words": words,
        },
        generate_schema(n_passages, words),
        directory,
    )


def refine_prompt(
    patterns: Sequence[Mapping[str, Any]],
    hits: Sequence[PassageFeedback],
    misses: Sequence[PassageFeedback],
    n_passages: int,
    words: int,
    directory: str | Path | None = None,
) -> Rendered:
    return render(
        "refine",
        {
            "patterns": format_patterns(patterns),
            "hits": format_feedback(hits),
            "misses": format_feedback(misses),
            "n_passages": n_passages,
            "words": words,
        },
        generate_schema(n_passages, words),
        directory,
    )


def text_prompt(
    example: str, opening: str, words: int, kind_hint: str = "", directory: str | Path | None = None
) -> Rendered:
    """One passage in plain text (--agent-format text: small models, no JSON): imitate `example`, continue `opening`.

    Both are real seed text that routes to the target experts (agent/text_mode.py): a 135M
    model continues text far better than it follows abstract instructions, which it echoes.
    """
    return render(
        "generate_text",
        {
            "words": words,
            "example": example.strip() or "(none)",
            "opening": opening.strip(),
            "kind_hint": f" {kind_hint}" if kind_hint else "",
        },
        None,
        directory,
    )
