"""Deterministic shards of the input and their partial results on disk (RUN/shards/NNNNN.pt).

Why contiguous ranges of a fixed size (a multiple of the batch size) that do not depend on the number of
workers: each shard's batches are then exactly the batches one local pass makes, so the merged result is the
local one whatever the worker count or the order in which shards finish.  A partial result is written with
tmp + os.replace, so a shard file is either whole or absent; a driver that is stopped and re-run skips the
shards already on disk, provided plan.json (settings + data fingerprint) is unchanged.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pascal_moe.io.artifacts import fingerprint_texts

# settings that do not change a shard's result (where and how it runs)
NOT_IN_PLAN = ("out", "executor", "ray_address", "workers", "gpus_per_worker", "device")


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first sample (global index)
    stop: int  # one past the last sample


def shard_size(requested: int, batch_size: int) -> int:
    """`requested` rounded up to a multiple of `batch_size` (a shard never splits a batch)."""
    return -(-requested // batch_size) * batch_size


def plan(n_samples: int, size: int, batch_size: int) -> list[Shard]:
    """Contiguous shards of `shard_size(size, batch_size)` samples covering 0..n_samples."""
    step = shard_size(size, batch_size)
    return [Shard(i, lo, min(lo + step, n_samples)) for i, lo in enumerate(range(0, n_samples, step))]


def shard_file(root: Path, index: int) -> Path:
    return root / f"{index:05d}.pt"


def plan_key(cfg: Any, texts: list[str]) -> dict:
    """What the shard files depend on: the settings that change results, the shard size and the data."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_PLAN}
    return {"settings": settings, "data_fingerprint": fingerprint_texts(texts), "n_samples": len(texts)}


def prepare(root: Path, key: dict) -> None:
    """Make RUN/shards for `key`: shard files written under another plan are removed (they would not merge)."""
    root.mkdir(parents=True, exist_ok=True)
    pj = root / "plan.json"
    if pj.exists() and json.loads(pj.read_text()) != json.loads(json.dumps(key)):
        for f in root.glob("*.pt"):
            f.unlink()
    tmp = pj.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
    os.replace(tmp, pj)


def save(obj: Any, path: Path) -> None:
    """Write atomically: a reader (or a re-run) sees the whole file or none."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load(path: Path) -> Any:
    return torch.load(path, weights_only=False)  # our own files, written by `save`


def done(root: Path, shards: list[Shard]) -> set[int]:
    """Indices of the shards whose result is on disk."""
    return {s.index for s in shards if shard_file(root, s.index).exists()}
