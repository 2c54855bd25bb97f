"""Pick the JSON value an LLM reply means, repairing it with the maintained `json-repair`.

Why: servers without structured output (or models that ignore it) wrap JSON in prose or
code fences, use single quotes, leave trailing commas, or stop mid-object at the token
limit.  `json_repair` fixes the syntax of one value; what it cannot do, and this module
adds, is choose: among the several values a reply may hold (a fenced block, an example
before the answer) return the first that a validator accepts, and close a cut-off value
at its last complete element (latest first) before the half-written one, so a
half-written passage is dropped rather than kept as if whole.  When nothing is accepted,
`extract_json` raises `JSONExtractError` and the caller retries the request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import json_repair

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)
_MAX_STARTS = 16  # bracket positions tried per block
_MAX_CUTS = 16  # truncation points tried per value


class JSONExtractError(ValueError):
    """The reply holds no JSON value that could be recovered."""


def extract_json(text: str, accept: Callable[[Any], bool] | None = None) -> Any:
    """Return the first JSON value in `text` that `accept` takes (any object/array when None).

    Candidates, in order: the whole text (strict); then, in each code fence and in the
    whole text, the value starting at each `{`/`[`, repaired by json_repair, and, when
    cut off, closed at each complete element (latest first) before the half-written one.
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
            end, cuts = _span(block, start)
            covered = end
            if cuts is None:  # closed: one value, repaired
                yield json_repair.loads(block[start:end])
                continue
            for cut in reversed(cuts[-_MAX_CUTS:]):  # cut off: whole elements first (json_repair closes them)
                yield json_repair.loads(block[start:cut])
            yield json_repair.loads(block[start:end])  # then the half-written one, closed as is


def _span(s: str, start: int) -> tuple[int, list[int] | None]:
    """Where the value opening at s[start] ends, and (when the text ends before it closes) the comma positions.

    A structural scan only: brackets outside strings (either quote char, backslash escapes);
    the repair itself is json_repair's.
    """
    depth, quote, cuts = 0, "", []
    i = start
    while i < len(s):
        c = s[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1, None
        elif c == ",":
            cuts.append(i)
        i += 1
    return len(s), cuts
