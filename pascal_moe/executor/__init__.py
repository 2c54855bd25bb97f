"""Where a stage's model pass runs: `local` (this process, the default, no Ray needed) or `ray`.

`shards.py` plans deterministic shards and stores their partial results atomically; `ray_pool.py` runs them
on a pool of Ray actors, each holding one model replica.  Only the settings check lives here, so that the
local path never imports Ray.
"""

from __future__ import annotations

from typing import Any

from pascal_moe.errors import PascalError
from pascal_moe.settings import option

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: install it with `pip install 'pascal-moe[ray]'` (or bash scripts/setup.sh)"


# The executor fields, defined once; each stage config that can run on Ray declares them with these (its
# `shard_size` help says what one item is: a sample, a candidate text, an evaluation window).
def executor_option() -> Any:
    return option("local", "where the model passes run: local (this process) or ray (a pool of model actors)")


def ray_address_option() -> Any:
    return option(None, "Ray cluster to join (e.g. auto, ray://head:10001); default: a local one")


def workers_option() -> Any:
    return option(1, "ray: model actors (one model replica each)")


def gpus_per_worker_option() -> Any:
    return option(0.0, "ray: GPUs per actor (0 = CPU actors, one core each)")


def shard_size_option(items: str) -> Any:
    return option(256, f"ray: {items} per shard (rounded up to a multiple of --batch-size)")


def check_executor(cfg: Any) -> None:
    """One-line errors for --executor/--workers/--gpus-per-worker/--shard-size before any model is loaded."""
    if cfg.executor not in EXECUTORS:
        raise PascalError(f"--executor must be local or ray (got {cfg.executor!r})")
    if cfg.workers < 1:
        raise PascalError(f"--workers must be at least 1 (got {cfg.workers})")
    if cfg.gpus_per_worker < 0:
        raise PascalError(f"--gpus-per-worker must be 0 (CPU actors) or more (got {cfg.gpus_per_worker})")
    if cfg.shard_size < 1:
        raise PascalError(f"--shard-size must be at least 1 (got {cfg.shard_size})")
    if cfg.executor == "ray":
        require_ray()


def require_ray() -> Any:
    """The `ray` module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise PascalError(RAY_MISSING) from None
    return ray
