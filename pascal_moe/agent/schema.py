"""Portable structured output: what is sent to the server, and the bounds we enforce ourselves.

Why: servers differ in how much of JSON Schema they honour.  The subset every one of
them accepts (OpenAI strict mode, vLLM, SGLang, llama.cpp, hosted APIs) is: every
property required, `additionalProperties: false`, and no numeric or length keywords.
Many enforce types but silently ignore `maxLength`/`maxItems`; others refuse a schema
that has them.  So the server gets `portable(schema)`, and the bounds of the full
schema are applied to the reply here by `clip`: a too-long string is cut at a
sentence boundary, extra array items are dropped.  A reply is rejected only when it
carries nothing usable (wrong types, an empty required array).
"""

from __future__ import annotations

import re
from typing import Any

# Keywords outside the portable subset (checked by the server only sometimes; by `clip` always).
BOUND_KEYS = (
    "maxLength",
    "minLength",
    "maxItems",
    "minItems",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "pattern",
    "format",
    "uniqueItems",
    "minProperties",
    "maxProperties",
)
_SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f][\"')\]]*(?=\s|$)|\n")


def portable(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every bound removed, every property required and no additional properties."""
    out = {k: v for k, v in schema.items() if k not in BOUND_KEYS}
    if out.get("type") == "object":
        props = {k: portable(v) for k, v in out.get("properties", {}).items()}
        out.update(properties=props, required=list(props), additionalProperties=False)
    if out.get("type") == "array" and isinstance(out.get("items"), dict):
        out["items"] = portable(out["items"])
    return out


def cut_text(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars`, at the last sentence end (else word break) inside the limit."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    if ends and ends[-1] >= max_chars // 3:  # keep at least a third: a first-sentence cut would waste the reply
        return head[: ends[-1]].rstrip()
    space = head.rfind(" ")
    return (head[:space] if space >= max_chars // 3 else head).rstrip()


_EMPTY = {"string": "", "array": []}


def clip(value: Any, schema: dict[str, Any]) -> Any:
    """`value` (already of the schema's types) with strings and arrays cut to the schema's bounds.

    A missing required string or array that may be empty (no minLength/minItems) is filled
    in empty: a passage whose `pattern` label was cut off is still a usable passage.
    """
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        out = {
            k: clip(v, props[k]) if k in props else v
            for k, v in value.items()
            if k in props or schema.get("additionalProperties", True) is not False
        }
        for k in schema.get("required", []):
            p = props.get(k, {})
            if k not in out and p.get("type") in _EMPTY and not (p.get("minLength") or p.get("minItems")):
                out[k] = type(_EMPTY[p["type"]])()
        return out
    if kind == "array" and isinstance(value, list):
        items = schema.get("items", {})
        kept = [clip(v, items) for v in value]
        if items.get("type") == "string" and items.get("minLength"):  # drop blank entries before counting
            kept = [v for v in kept if not isinstance(v, str) or len(v.strip()) >= items["minLength"]]
        if items.get("type") == "object":
            kept = [v for v in kept if not _blank_required(v, items)]
        return kept[: schema["maxItems"]] if "maxItems" in schema else kept
    if kind == "string" and isinstance(value, str):
        value = value.strip()
        return cut_text(value, schema["maxLength"]) if "maxLength" in schema else value
    return value


def _blank_required(v: Any, schema: dict[str, Any]) -> bool:
    """An object item missing a required field, or whose required string with a minLength is blank.

    Unusable alone, so it is dropped like an extra item instead of failing the whole reply.
    """
    if not isinstance(v, dict):
        return False
    props = schema.get("properties", {})
    return any(
        k not in v or (props.get(k, {}).get("minLength") and isinstance(v[k], str) and not v[k].strip())
        for k in schema.get("required", [])
    )


def max_json_chars(schema: dict[str, Any]) -> int:
    """Longest JSON text a bounded schema admits (keys, quotes and separators included), read off the schema."""
    kind = schema.get("type")
    if kind == "object":
        return 2 + sum(len(k) + 4 + max_json_chars(v) for k, v in schema.get("properties", {}).items())
    if kind == "array":
        return 2 + schema["maxItems"] * (max_json_chars(schema["items"]) + 1)
    if kind == "string":
        return schema["maxLength"] + 2
    return 32  # numbers, booleans, null
