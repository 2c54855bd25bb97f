"""The Ray executor: a pool of actors, each holding one model replica with its router hooks, runs the shards.

Faults: actors are created with `max_restarts=1, max_task_retries=1`, so an actor that dies mid-shard is
restarted (model reloaded) and the shard re-run once by Ray; the driver writes a shard's result only when its
task returns, once, so a redone shard is never counted twice.  A ledger actor counts attempts per shard, so a
redo is visible: the worker prints, and the driver logs, "redoing shard k (attempt 2)".  Shards whose file is
already on disk are skipped (a stopped driver re-run resumes).  The driver merges the files in shard order.

Test hook: PASCAL_TEST_KILL_SHARD=k makes the worker exit on its first attempt of shard k (a killed actor).
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pascal_moe.errors import PascalError
from pascal_moe.executor import require_ray, shards
from pascal_moe.profile.accumulate import Accumulators, merge
from pascal_moe.profile.config import ProfileConfig

KILL_ENV = "PASCAL_TEST_KILL_SHARD"


class Ledger:
    """Attempts per (pass, shard), shared by a pool's workers (survives a worker's death)."""

    def __init__(self) -> None:
        self.attempts: dict[tuple[str, int], int] = {}

    def begin(self, run: str, index: int) -> int:
        self.attempts[run, index] = self.attempts.get((run, index), 0) + 1
        return self.attempts[run, index]


class ProfileWorker:
    """One model replica; `run_shard` profiles one shard's texts and returns its accumulators.

    The model is loaded once per actor; the `Profiler` (with its layer-wise RTN) is rebuilt only when a call's
    settings differ from the previous call's, so one pool serves several passes of a driver.
    """

    def __init__(self, model: str, device: str, dtype: str, revision: str | None = None) -> None:
        from pascal_moe.models.loading import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model, revision)
        self.model = load_model(model, device, dtype, revision=revision)
        self.profiler: Any = None

    def run_shard(
        self, cfg: ProfileConfig, run: str, index: int, start: int, texts: list[str], ledger: Any, kill: int | None
    ) -> tuple[int, Accumulators]:
        import ray

        from pascal_moe.profile.accumulate import Profiler

        attempt = ray.get(ledger.begin.remote(run, index))
        if attempt > 1:
            print(f"redoing shard {index} (attempt {attempt})", flush=True)
        if kill == index and attempt == 1:
            os._exit(1)  # a worker killed mid-shard (test hook)
        if self.profiler is None or _profiler_key(self.profiler.cfg) != _profiler_key(cfg):
            self.profiler = Profiler(self.model, self.tokenizer, cfg)
        return attempt, self.profiler.run(texts, start)


def _profiler_key(cfg: ProfileConfig) -> tuple:
    return (cfg.seq_len, cfg.batch_size, cfg.scheme, cfg.sensitivity, cfg.contexts, cfg.weight_error_tokens, cfg.seed)


# pools kept by the driver between passes: (job, model, device, dtype, workers, gpus) -> (ledger, actors);
# starting an actor is a new process that imports torch and loads the model: the cost a warm pool avoids
_POOLS: dict[tuple, tuple[Any, list[Any]]] = {}


def _pool(ray: Any, cfg: ProfileConfig) -> tuple[Any, list[Any]]:
    """The driver's pool for this model and placement, started on first use."""
    key = (ray.get_runtime_context().get_job_id(), cfg.model, cfg.device, cfg.dtype, cfg.workers, cfg.gpus_per_worker)
    if key not in _POOLS:
        Worker = ray.remote(max_restarts=1, max_task_retries=1)(ProfileWorker)
        opts = {"num_cpus": 1, "num_gpus": cfg.gpus_per_worker} if cfg.gpus_per_worker > 0 else {"num_cpus": 1}
        ledger = ray.remote(num_cpus=0)(Ledger).remote()
        _POOLS[key] = (
            ledger,
            [Worker.options(**opts).remote(cfg.model, cfg.device, cfg.dtype, cfg.revision) for _ in range(cfg.workers)],
        )
    return _POOLS[key]


def shutdown_pools() -> None:
    """Kill every pooled actor (a pool whose restart budget was used is dropped this way too)."""
    import ray

    for key in list(_POOLS):
        ledger, actors = _POOLS.pop(key)
        for a in [*actors, ledger]:
            ray.kill(a, no_restart=True)


def init(cfg: ProfileConfig) -> Any:
    """Join --ray-address, or start a local cluster with one CPU per worker; reuse one already initialised."""
    ray = require_ray()
    if not ray.is_initialized():
        kw: dict[str, Any] = {"address": cfg.ray_address} if cfg.ray_address else {"num_cpus": cfg.workers}
        ray.init(**kw, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    return ray


def _log(out: Path) -> Callable[[str], None]:
    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)
        with open(out / "executor.log", "a") as f:
            f.write(line + "\n")

    return log


def _user_error(err: Exception, shard: int, root: Path) -> PascalError:
    """A worker's PascalError as it is; any other failure as one line that says a re-run resumes."""
    found = re.search(r"PascalError: (.+)", str(err))
    if found:
        return PascalError(found.group(1).strip())
    return PascalError(
        f"ray: shard {shard} failed after its retry ({type(err).__name__}); re-run the same command to resume "
        f"(finished shards are kept in {root})"
    )


def collect_ray(cfg: ProfileConfig, texts: list[str]) -> Accumulators:
    """Profile `texts` on a pool of `cfg.workers` actors; shard results in OUT/shards; merged in shard order."""
    ray = init(cfg)
    out = Path(cfg.out)
    root = out / "shards"
    all_shards = shards.plan(len(texts), cfg.shard_size, cfg.batch_size)
    shards.prepare(root, shards.plan_key(cfg, texts))
    finished = shards.done(root, all_shards)
    todo = deque(s for s in all_shards if s.index not in finished)
    log = _log(out)
    log(f"ray: {len(all_shards)} shards, {len(finished)} already done, {len(todo)} to run on {cfg.workers} workers")
    if todo:
        _run(ray, cfg, texts, todo, root, log)
    return merge(shards.load(shards.shard_file(root, s.index)) for s in all_shards)  # streamed, in shard order


def _run(ray: Any, cfg: ProfileConfig, texts: list[str], todo: deque, root: Path, log: Callable[[str], None]) -> None:
    kill = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    ledger, actors = _pool(ray, cfg)
    run = uuid.uuid4().hex
    pending: dict[Any, tuple[Any, shards.Shard]] = {}
    redone = False

    def submit(actor: Any) -> None:
        s = todo.popleft()
        pending[actor.run_shard.remote(cfg, run, s.index, s.start, texts[s.start : s.stop], ledger, kill)] = (actor, s)

    try:
        for a in actors:
            if todo:
                submit(a)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, s = pending.pop(ref)
            try:
                attempt, acc = ray.get(ref)
            except ray.exceptions.RayError as e:
                redone = isinstance(e, ray.exceptions.RayActorError)  # an actor died twice; a task error keeps it
                raise _user_error(e, s.index, root) from None
            if attempt > 1:
                redone = True
                log(f"redoing shard {s.index} (attempt {attempt}): done, counted once")
            shards.save(acc, shards.shard_file(root, s.index))
            log(f"shard {s.index} done (samples {s.start}..{s.stop - 1})")
            if todo:
                submit(actor)
    finally:
        if redone or pending:  # restart budget spent, or stopped mid-run: the next pass starts a fresh pool
            shutdown_pools()
