"""The model passes of the router check: each text's perplexity and routed counts, here or sharded on Ray.

Why a seam here: `verify` screens, deduplicates and judges in the driver (cheap, sequential: the near-duplicate
pool grows passage by passage); only its two forwards need the model.  `LocalPasses` runs them in this process;
`RayPasses` (`--executor ray`) splits the texts into contiguous shards of `--shard-size` (a multiple of
`--batch-size`, so each shard's batches are exactly the local pass's batches), runs each on the shared actor
pool (pascal_moe/executor/ray_pool.py) and concatenates the per-text results in shard order: the same numbers
as local, whatever the worker count (floats to round-off; counts exact unless a top-k tie flips on round-off).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pascal_moe.io.artifacts import fingerprint_texts
from pascal_moe.profile.capture import RoutedCounts


class ModelPasses(Protocol):
    def nll(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(mean next-token NLL per text [N], tokens per text [N]), as perplexity.mean_nll."""
        ...

    def route(self, texts: Sequence[str]) -> list[RoutedCounts]:
        """Routed-token counts per text, as capture.route_counts."""
        ...


@dataclass
class LocalPasses:
    model: Any
    tokenizer: Any
    seq_len: int
    batch_size: int

    def nll(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        from pascal_moe.agent.perplexity import mean_nll

        return mean_nll(self.model, self.tokenizer, list(texts), self.seq_len, self.batch_size)

    def route(self, texts: Sequence[str]) -> list[RoutedCounts]:
        from pascal_moe.profile.capture import route_counts

        return route_counts(self.model, self.tokenizer, list(texts), self.seq_len, self.batch_size)


@dataclass(frozen=True)
class NllShard:
    """One shard of the perplexity pass, run on an actor."""

    texts: list[str]
    seq_len: int
    batch_size: int

    def __call__(self, w: Any) -> tuple[np.ndarray, np.ndarray]:
        from pascal_moe.agent.perplexity import mean_nll
        from pascal_moe.io.batches import check_seq_len

        check_seq_len(self.seq_len, w.model)
        return mean_nll(w.model, w.tokenizer, self.texts, self.seq_len, self.batch_size)


@dataclass(frozen=True)
class RouteShard:
    """One shard of the routing pass, run on an actor."""

    texts: list[str]
    seq_len: int
    batch_size: int

    def __call__(self, w: Any) -> list[RoutedCounts]:
        from pascal_moe.io.batches import check_seq_len
        from pascal_moe.profile.capture import route_counts

        check_seq_len(self.seq_len, w.model)
        return route_counts(w.model, w.tokenizer, self.texts, self.seq_len, self.batch_size)


@dataclass
class RayPasses:
    """The same two passes on the Ray actor pool of `cfg`'s model; shard files live in OUT/shards/<pass> until
    the pass is merged (a stopped run re-run with the same texts resumes from them)."""

    cfg: Any  # a SynthesizeConfig or VerifyConfig: model, placement, executor fields, seq_len, batch_size, out

    def nll(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = self._sharded("nll", list(texts), NllShard)
        if not parts:
            return np.full(0, np.nan), np.zeros(0, dtype=np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def route(self, texts: Sequence[str]) -> list[RoutedCounts]:
        return [rc for part in self._sharded("route", list(texts), RouteShard) for rc in part]

    def _sharded(self, name: str, texts: list[str], task: type) -> list[Any]:
        from pascal_moe.executor import shards
        from pascal_moe.executor.ray_pool import Placement, run_shards

        if not texts:
            return []
        c, out = self.cfg, Path(self.cfg.out)
        root = out / "shards" / name
        plan = shards.plan(len(texts), c.shard_size, c.batch_size)
        key = {
            "pass": name,
            "model": c.model,
            "revision": c.revision,
            "dtype": c.dtype,
            "seq_len": c.seq_len,
            "batch_size": c.batch_size,
            "shard_size": shards.shard_size(c.shard_size, c.batch_size),
            "data_fingerprint": fingerprint_texts(texts),
        }
        jobs = [(s.index, lambda s=s: task(texts[s.start : s.stop], c.seq_len, c.batch_size)) for s in plan]
        run_shards(Placement.of(c), out, root, key, jobs, f"{name} shards")
        parts = [shards.load(shards.shard_file(root, s.index)) for s in plan]
        shutil.rmtree(root, ignore_errors=True)  # merged: the partial results are spent
        if not any(root.parent.iterdir()):
            root.parent.rmdir()
        return parts


def model_passes(cfg: Any, model: Any, tokenizer: Any) -> ModelPasses:
    """The passes `cfg.executor` asks for (`model`/`tokenizer` are used by the local executor only)."""
    if cfg.executor == "ray":
        return RayPasses(cfg)
    return LocalPasses(model, tokenizer, cfg.seq_len, cfg.batch_size)
