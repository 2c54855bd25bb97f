"""Trigger tokens and contexts as an agent can read them: whole words, no broken characters.

Why: triggers.parquet holds each token decoded alone, so a byte-level BPE piece of a
multi-byte character decodes to U+FFFD, and a context marks a sub-word piece
(`qu[[ick]]`).  No agent can act on `\\ufffd`.  Here a marked piece is widened to the
whole word around it, broken characters are removed, and when an expert's triggers
are mostly digits, code identifiers or a non-Latin script the prompt says so in words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

BROKEN = "\ufffd"
_MARKED = re.compile(r"(\w*)\[\[(.*?)\]\](\w*)", re.DOTALL)
_CODE = re.compile(r"[_(){}\[\];=<>+*/\\|&%#@$^~`]|^\.?[a-z]+[A-Z]\w*$|^(def|class|return|import|self|var|let|const|"
                   r"function|int|float|str|void|elif|else|null|None|True|False|lambda|print)$")
_SCRIPT_WORDS = {"digits": "numbers: digits, amounts, dates, measurements, arithmetic or tables of figures",
                 "code": "program code: identifiers, operators and brackets in source files, not prose about code",
                 "non_latin": "text in a non-Latin script ({scripts}): write in that script and language, "
                              "not in English"}


def readable_trigger(token: str) -> str:
    """The token with broken characters removed and whitespace shown plainly ('' when nothing readable is left)."""
    return token.replace(BROKEN, "")


def readable_context(context: str) -> str:
    """A context with the marked piece widened to its whole word and broken characters dropped."""
    text = context.replace(BROKEN, "")

    def widen(m: re.Match[str]) -> str:
        whole = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        return f"[[{whole}]]" if whole.strip() else whole

    return " ".join(_MARKED.sub(widen, text).split())


def _script(ch: str) -> str | None:
    """The script word of a letter ('LATIN', 'CYRILLIC', 'CJK', ...), None for non-letters."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ")[0] if name else None


def trigger_kind(tokens: Sequence[str]) -> tuple[str, str] | None:
    """(kind, sentence) when most triggers are digits, code or non-Latin script; None for ordinary words."""
    toks = [t.strip() for t in tokens if t.strip()]
    if not toks:
        return None
    broken = sum(BROKEN in t for t in toks)
    scripts = [s for t in toks for s in (_script(c) for c in t) if s and s != "LATIN"]
    non_latin = sum(any((_script(c) or "LATIN") != "LATIN" for c in t) for t in toks) + broken
    digits = sum(any(c.isdigit() for c in t) and not any(c.isalpha() for c in t) for t in toks)
    code = sum(bool(_CODE.search(t)) for t in toks)
    half = len(toks) / 2
    if non_latin >= half:
        names = ", ".join(sorted({"CJK (Chinese, Japanese)" if s == "CJK" else s.title() for s in scripts})[:3])
        names = names or "multi-byte characters"
        return "non_latin", _SCRIPT_WORDS["non_latin"].format(scripts=names)
    if digits >= half:
        return "digits", _SCRIPT_WORDS["digits"]
    if code >= half:
        return "code", _SCRIPT_WORDS["code"]
    return None
