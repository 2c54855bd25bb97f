"""Where a stage's model pass runs: `local` (this process, the default, no Ray needed) or `ray`.

`shards.py` plans deterministic shards and stores their partial results atomically; `ray_pool.py` runs them
on a pool of Ray actors, each holding one model replica.  Only the settings check lives here, so that the
local path never imports Ray.
"""

from __future__ import annotations

from typing import Any

from pascal_moe.errors import PascalError

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray: install it with `pip install 'pascal-moe[ray]'` (or bash scripts/setup.sh)"


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
