"""Near-duplicate removal against the seed pool and the passages already kept.

Why: an agent that copies a seed context, or writes the same passage twice with a few
words changed, adds nothing to the calibration set but weight on one text.  A passage is
a near-duplicate when the Jaccard similarity of its word 5-gram shingles with any pool
text reaches `threshold`.  The similarity is exact, found through an inverted index
(shingle hash -> texts), so only texts sharing a shingle are compared: fast enough for
a seed pool of tens of thousands of documents without an approximate MinHash index.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable

_TOKEN = re.compile(r"\w+", re.UNICODE)


def shingles(text: str, n: int = 5) -> set[int]:
    """crc32 hashes of the lower-cased word n-grams (the whole text as one shingle when shorter than n)."""
    words = _TOKEN.findall(text.lower())
    grams = [" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))]
    return {zlib.crc32(g.encode()) for g in grams if g}


class NearDuplicates:
    """A pool of texts; `check_add` says whether a text nearly duplicates one in it, and adds it if not."""

    def __init__(self, texts: Iterable[str] = (), threshold: float = 0.5, n: int = 5):
        self.threshold, self.n = threshold, n
        self._index: dict[int, list[int]] = defaultdict(list)
        self._sizes: list[int] = []
        for t in texts:
            self._add(shingles(t, n))

    def _add(self, sh: set[int]) -> None:
        i = len(self._sizes)
        self._sizes.append(len(sh))
        for h in sh:
            self._index[h].append(i)

    def similarity(self, text: str) -> float:
        """The highest Jaccard similarity of `text` with any pool text (0 when none shares a shingle)."""
        return self._best(shingles(text, self.n))

    def _best(self, sh: set[int]) -> float:
        shared = Counter(i for h in sh for i in self._index.get(h, ()))
        return max((c / (len(sh) + self._sizes[i] - c) for i, c in shared.items()), default=0.0)

    def check_add(self, text: str) -> bool:
        """True when `text` is a near-duplicate (then it is not added); else it joins the pool."""
        sh = shingles(text, self.n)
        if sh and self._best(sh) >= self.threshold:
            return True
        self._add(sh)
        return False
