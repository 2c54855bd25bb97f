"""`--agent-format text`: few-shot continuation prompts built from real seed text, and chat fluff removed.

Why: a 135M instruct model does not follow abstract instructions ("use words like these",
"write text of this kind"); it answers as an assistant or echoes the prompt.  It does
continue text well.  So each request shows one real excerpt of the seed corpus that
routes to the group's experts (the seed documents richest in them, then the profile's
trigger contexts) and asks for a continuation of another real opening.  The passage is
that opening plus the model's continuation: a few words of seed text, the rest written
by the agent (like `--agent self`, which grows its passages from 8 seed tokens).  Chat
fluff around the answer ("Sure! Here is ...", "Let me know if ...") is cut before the
screen, which still judges everything that is left.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

EXCERPT_CHARS = 600  # longest real excerpt shown in a prompt
OPENING_WORDS = 12  # words of a real opening each passage starts from
OPENING_CHARS = 80  # ... and at most this many characters of it

_MARK = re.compile(r"\[\[|\]\]")
# A first line that introduces the answer instead of being part of it.
_LEAD = re.compile(
    r"^\s*(sure|certainly|of course|absolutely|okay|ok|great|here(?:'s| is| are)|below is|the continuation|"
    r"continuation|i(?:'d| would) (?:be happy|love)|i can)\b[^\n]*?(:|!|\.)\s*$",
    re.IGNORECASE,
)
# A last paragraph that comments on the answer.
_TAIL = re.compile(
    r"^\s*(i hope|let me know|feel free|this (?:continuation|text|passage)|note:|in this (?:continuation|text)|"
    r"the (?:continuation|text) above)\b",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^\**(text|example|passage|continuation)\s*\d*\s*:\**[ \t]*", re.IGNORECASE)
# A sentence in which the model talks to the user as an assistant instead of writing the text.
_CHAT = re.compile(
    r"\b(I'm (here|ready) to|I am (here|ready) to|can you (share|provide|give)|good job|complete this|I'll (start|provide|write|continue|add|give)|I (have )?added|I (can|will) help|"
    r"what would you like|here's (another|a|an|the|my)|here is (another|a|an|the|my)|you've been (given|provided)|"
    r"let me know|happy to help|feel free|hope (this|you)|as requested|the (original|above|given|example) text|"
    r"(this|the) (new )?text (is|was|has)|words? to the text)\b",
    re.IGNORECASE,
)
_FENCE = re.compile(r"^\s*```[\w+-]*\s*$")


@dataclass(frozen=True, slots=True)
class Shot:
    """One request's real material: an excerpt to imitate and the opening its passage starts from."""

    example: str
    opening: str


def excerpt(text: str, max_chars: int = EXCERPT_CHARS) -> str:
    """The start of a seed text, cut at a line or sentence end inside `max_chars` (code keeps its lines)."""
    text = _MARK.sub("", text).strip()
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind("\n"), *(head.rfind(p) for p in (". ", "? ", "! ")))
    return head[: cut + 1].rstrip() if cut > max_chars // 3 else head.rstrip()


def opening(text: str, words: int = OPENING_WORDS, max_chars: int = OPENING_CHARS) -> str:
    """The first `words` words of a text (at most `max_chars`: CJK text has few spaces), line breaks kept."""
    text = _MARK.sub("", text).strip()
    spans = [m.end() for m in re.finditer(r"\S+", text)]
    return text[: min(spans[min(words, len(spans)) - 1], max_chars)] if spans else ""


def group_sources(seed: pd.DataFrame, contexts: Sequence[str], keys: Sequence[int], n: int) -> list[str]:
    """Real texts that route to `keys`: the seed documents with the highest share of their tokens there, then contexts.

    A document counts only when at least 20 words long (a shorter one shows the model too little).
    """
    want = {int(k) for k in keys}
    rate = [
        sum(int(c) for k, c in zip(ks, cs) if int(k) in want) / max(int(nt), 1)
        for ks, cs, nt in zip(seed["keys"], seed["counts"], seed["n_tokens"])
    ]
    ranked = seed.assign(_rate=rate).sort_values("_rate", ascending=False, kind="stable")["text"].astype(str)
    docs = [t for t in ranked if len(t.split()) >= 20][:n]
    longer = [c for c in (_MARK.sub("", c).strip() for c in contexts) if len(c.split()) >= 8]
    return list(dict.fromkeys(docs + longer))[: max(n, 1)]


def shots(sources: Sequence[str], n: int) -> list[Shot]:
    """`n` (example, opening) pairs: request i imitates source i and continues the opening of source i+1."""
    if not sources:
        return []
    m = len(sources)
    return [Shot(excerpt(sources[i % m]), opening(sources[(i + 1) % m])) for i in range(n)]


def passage(reply: str, start: str) -> str:
    """The opening plus the model's continuation, without chat fluff, code fences or wrapping quotes.

    When the reply repeats the opening (or starts with it), it is not doubled.
    """
    reply = _LABEL.sub("", reply.strip(), count=1)
    lines = reply.strip().strip('"').strip().splitlines()
    while lines and (_LEAD.match(lines[0]) or _FENCE.match(lines[0]) or not lines[0].strip()):
        lines.pop(0)
    # cut at the first closing remark or fence after the body
    for i, line in enumerate(lines):
        if i and (_TAIL.match(line) or _FENCE.match(line)):
            lines = lines[:i]
            break
    body = drop_chat(cut_loops("\n".join(lines).strip('"\n').rstrip()))  # leading indentation is code
    if not start:
        return body
    squash = lambda s: " ".join(s.split())  # noqa: E731
    if squash(body).startswith(squash(start)[: max(20, len(squash(start)) // 2)]):
        return body
    glue = "" if not body or start.endswith(("\n", " ")) or body[:1] in ",.;:)" else " "
    return (start + glue + body).strip()


def cut_loops(text: str, n: int = 3, max_overlap: float = 0.5) -> str:
    """`text` up to the first line or sentence that mostly repeats earlier word n-grams (where a small model loops).

    The screen would reject the whole reply for its repeats; the part before the loop is often fine.
    """
    pieces = re.split(r"(?<=[.!?])\s+|\n+", text)
    seen: set[tuple[str, ...]] = set()
    kept: list[str] = []
    for piece in pieces:
        words = piece.split()
        grams = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}
        if kept and grams and len(grams & seen) / len(grams) > max_overlap:
            break
        seen |= grams
        kept.append(piece)
    if len(kept) == len(pieces):
        return text
    end = 0
    for piece in kept:  # the original text (its line breaks and spaces) up to the end of the last kept piece
        end = text.index(piece, end) + len(piece)
    return text[:end].rstrip()


def drop_chat(text: str) -> str:
    """`text` without the sentences in which the model talks to the user ("I'll start with ...", "What would you like?")."""
    out = []
    for line in text.split("\n"):
        parts = re.split(r"(?<=[.!?])(\s+)", line)
        kept = "".join(p for p in parts if not _CHAT.search(p))
        out.append(kept.rstrip() if kept.strip() or not line.strip() else None)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(x for x in out if x is not None)).strip("\n").rstrip()
