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
_CODE = re.compile(
    r"[_(){}\[\];=<>+*/\\|&%#@$^~`]|^\.?[a-z]+[A-Z]\w*$|^(def|class|return|import|self|var|let|const|"
    r"function|int|float|str|void|elif|else|null|None|True|False|lambda|print)$"
)
_SCRIPT_WORDS = {
    "digits": "numbers: digits, amounts, dates, measurements, arithmetic or tables of figures",
    "code": "program code: identifiers, operators and brackets in source files, not prose about code",
    "non_latin": "text in a non-Latin script ({scripts}): write in that script and language, not in English",
}


def readable_trigger(token: str) -> str:
    """The token with broken characters removed and whitespace shown plainly ('' when nothing readable is left)."""
    return token.replace(BROKEN, "")


def readable_context(context: str) -> str:
    """A context with the marked piece widened to its whole word and broken characters dropped."""
    text = context.replace(BROKEN, "")

    def widen(m: re.Match[str]) -> str:
        left, mid, right = m.group(1), m.group(2), m.group(3)
        if mid[:1].isspace():  # a word-initial piece (" al" of "altchars"): the word starts inside the mark
            return f"{left}{mid[: len(mid) - len(mid.lstrip())]}[[{mid.strip()}{right}]]" if mid.strip() else m.group(0)
        if mid[-1:].isspace():
            return f"[[{left}{mid.rstrip()}]]{mid[len(mid.rstrip()) :]}{right}"
        whole = f"{left}{mid}{right}"
        return f"[[{whole}]]" if whole.strip() else whole

    return " ".join(_MARKED.sub(widen, text).split())


def _script(ch: str) -> str | None:
    """The script word of a letter ('LATIN', 'CYRILLIC', 'CJK', ...), None for non-letters."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return name.split(" ")[0] if name else None


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in character -> the byte it encodes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _bytes_to_unicode()


def piece_script(tokenizer, token_id: int) -> str | None:
    """The script of the character a byte-level piece is part of (from its UTF-8 lead byte), None if unknown."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    if not isinstance(piece, str) or any(c not in _BYTE_OF for c in piece):
        return None
    raw = bytes(_BYTE_OF[c] for c in piece)
    lead = next((i for i, b in enumerate(raw) if b >= 0xC0), None)
    if lead is None:
        return None
    b0, rest = raw[lead], raw[lead + 1 :]
    b1 = (rest[0] & 0x3F) if rest else 0x20
    if b0 < 0xE0:
        cp = ((b0 & 0x1F) << 6) | b1
    elif b0 < 0xF0:
        cp = ((b0 & 0x0F) << 12) | (b1 << 6) | 0x20
    else:
        return "EMOJI"
    return _script(chr(cp)) if chr(cp).isalpha() else None


def annotate_pieces(triggers: Sequence, tokenizer) -> None:
    """Set `.script` on triggers that decode to broken characters, so the prompt can name their script."""
    for t in triggers:
        if BROKEN in t.token and getattr(t, "token_id", None) is not None:
            t.script = piece_script(tokenizer, t.token_id)


def trigger_kind(tokens: Sequence[str], piece_scripts: Sequence[str | None] = ()) -> tuple[str, str] | None:
    """(kind, sentence) when most triggers are digits, code or non-Latin script; None for ordinary words.

    piece_scripts: scripts of triggers that are pieces of multi-byte characters (annotate_pieces).
    """
    toks = [t.strip() for t in tokens if t.strip()]
    if not toks:
        return None
    broken = sum(BROKEN in t for t in toks)
    scripts = [s for t in toks for s in (_script(c) for c in t) if s and s != "LATIN"]
    scripts += [s for s in piece_scripts if s and s not in ("LATIN", "EMOJI")]
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
