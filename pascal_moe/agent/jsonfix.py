"""Tolerant JSON extraction from LLM replies.

Why: servers without structured output (or models that ignore it) wrap JSON in prose
or code fences, use single quotes, leave trailing commas, or stop mid-object when
they hit the token limit.  `extract_json` recovers the value when that can be done
without guessing content; otherwise it raises `JSONExtractError` and the caller
retries the request.

A truncated reply is closed at its last complete element: a half-written passage is
dropped rather than kept as if whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_COLON = re.compile(r"\s*:")
_LITERALS = {"True": "true", "False": "false", "None": "null"}
_CLOSE = {"{": "}", "[": "]"}
_MAX_STARTS = 16  # bracket positions tried per block
_MAX_CUTS = 16  # truncation points tried per value


class JSONExtractError(ValueError):
    """The reply holds no JSON value that could be recovered."""


def extract_json(text: str, accept: Callable[[Any], bool] | None = None) -> Any:
    """Return the first JSON value in `text` that `accept` takes (any object/array when None).

    Candidates, in order: the whole text; then, in each code fence and in the whole
    text, the value starting at each `{`/`[`: strictly, after repairs, and, when cut
    off, closed at its last complete elements (latest first).
    """
    if not text.strip():
        raise JSONExtractError("empty reply")
    take = accept or (lambda v: isinstance(v, (dict, list)))
    seen = 0
    for value in _candidates(text.strip()):
        seen += 1
        if take(value):
            return value
    what = "no candidate was accepted" if seen else "no JSON object or array found"
    raise JSONExtractError(f"{what} in reply starting {text.strip()[:60]!r}")


def _candidates(s: str) -> Iterator[Any]:
    try:
        yield json.loads(s)
    except json.JSONDecodeError:
        pass
    for block in [m.group(1) for m in _FENCE.finditer(s)] + [s]:
        covered = 0  # a value found at one bracket hides the brackets nested in it
        for start in [m.start() for m in re.finditer(r"[\[{]", block)][:_MAX_STARTS]:
            if start < covered:
                continue
            values, end = _parse_from(block[start:])
            if values:
                covered = start + end
            yield from values


def _parse_from(s: str) -> tuple[list[Any], int]:
    """Values a repair of the text starting at s[0] yields (strict parse first), and how far it reached."""
    decoder = json.JSONDecoder()
    try:
        value, end = decoder.raw_decode(s)
        return [value], end
    except json.JSONDecodeError:
        pass
    out, stack, in_string, cuts, end = _scan(s)
    text = "".join(out)
    if not stack and not in_string:
        tries = [text]
    else:  # cut off: whole elements first, then the half-written one closed as is
        tries = ["".join(out[:k]) + _closers(st) for k, st in reversed(cuts[-_MAX_CUTS:])]
        tail = text + ('"' if in_string else "")
        tail = tail.rstrip()
        tail = (tail + " null") if tail.endswith(":") else tail.rstrip(",")
        tries.append(tail + _closers(stack))
    values = []
    for cand in tries:
        try:
            values.append(decoder.raw_decode(cand)[0])
        except json.JSONDecodeError:
            continue
    return values, end


def _scan(s: str) -> tuple[list[str], list[str], bool, list[tuple[int, list[str]]], int]:
    """Rewrite `s` into strict JSON pieces as far as the value goes.

    Returns (pieces, open-bracket stack at the end, whether the end is inside a string,
    cut points: (number of pieces, stack) at each comma, i.e. after a complete element,
    and the index in `s` where the value ended).
    """
    out: list[str] = []
    stack: list[str] = []
    cuts: list[tuple[int, list[str]]] = []
    quote = ""  # the quote char of the string we are in, or ""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\" and i + 1 < n:
                nxt = s[i + 1]
                out.append("'" if nxt == "'" else c + nxt)
                i += 2
                continue
            if c == quote:
                out.append('"')
                quote = ""
            elif c == '"':  # a double quote inside a single-quoted string
                out.append('\\"')
            elif c == "\n":
                out.append("\\n")
            elif c != "\\":
                out.append(c)
            i += 1
            continue
        if c in "\"'":
            quote = c
            out.append('"')
        elif c in "{[":
            stack.append(c)
            out.append(c)
        elif c in "}]":
            _strip_trailing_comma(out)
            if stack:
                stack.pop()
            out.append(c)
            if not stack:
                return out, stack, False, cuts, i + 1
        elif c == ",":
            cuts.append((len(out), list(stack)))
            out.append(c)
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (s[j].isalnum() or s[j] == "_"):
                j += 1
            word = s[i:j]
            bare_key = word not in _LITERALS and _COLON.match(s, j) is not None
            out.append(json.dumps(word) if bare_key else _LITERALS.get(word, word))
            i = j
            continue
        else:
            out.append(c)
        i += 1
    return out, stack, bool(quote), cuts, n


def _strip_trailing_comma(out: list[str]) -> None:
    while out and out[-1].isspace():
        out.pop()
    if out and out[-1] == ",":
        out.pop()


def _closers(stack: list[str]) -> str:
    return "".join(_CLOSE[b] for b in reversed(stack))
