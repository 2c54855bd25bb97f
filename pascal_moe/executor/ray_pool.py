"""The Ray executor: a pool of actors, each holding one model replica, runs shards of a model pass.

One pool serves every sharded pass (profile, the router check of synthesize/verify, eval): a shard's work is a
small picklable task object called with the actor's `ModelWorker` (its model, tokenizer and a cache), so a new
pass adds a task, not a pool.  `run_shards` is the driver side: plan, skip the shard files already on disk, run
the rest on the pool, write each result atomically; the caller reads the files back in shard order.

Faults: actors are created with `max_restarts=1, max_task_retries=1`, so an actor that dies mid-shard is
restarted (model reloaded) and the shard re-run once by Ray; the driver writes a shard's result only when its
task returns, once, so a redone shard is never counted twice.  A ledger actor counts attempts per shard, so a
redo is visible: the worker prints, and the driver logs, "redoing shard k (attempt 2)".  Shards whose file is
already on disk are skipped (a stopped driver re-run resumes).

Test hook: PASCAL_TEST_KILL_SHARD=k makes the worker exit on its first attempt of shard k (a killed actor).
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pascal_moe.errors import PascalError
from pascal_moe.executor import require_ray, shards
from pascal_moe.profile.accumulate import Accumulators, merge
from pascal_moe.profile.config import ProfileConfig

KILL_ENV = "PASCAL_TEST_KILL_SHARD"


@dataclass(frozen=True)
class Placement:
    """Which model a pool holds and where its actors run (any stage config with the executor fields has these)."""

    model: str
    revision: str | None
    device: str
    dtype: str
    workers: int
    gpus_per_worker: float
    ray_address: str | None

    @classmethod
    def of(cls, cfg: Any, model: str | None = None, revision: str | None = None) -> Placement:
        """The placement of `cfg`'s model (or of `model`, e.g. a quantized one, on the same actors' settings)."""
        return cls(
            model or cfg.model,
            revision if model else cfg.revision,
            cfg.device,
            cfg.dtype,
            cfg.workers,
            cfg.gpus_per_worker,
            cfg.ray_address,
        )


class Ledger:
    """Attempts per (pass, shard), shared by a pool's workers (survives a worker's death)."""

    def __init__(self) -> None:
        self.attempts: dict[tuple[str, int], int] = {}

    def begin(self, run: str, index: int) -> int:
        self.attempts[run, index] = self.attempts.get((run, index), 0) + 1
        return self.attempts[run, index]


class ModelWorker:
    """One model replica; `run_task` calls a task object with this worker and returns its result.

    The model is loaded once per actor; `cache` keeps what a task may reuse across shards (e.g. the profiler and
    its layer-wise RTN), so one pool serves several passes of a driver.
    """

    def __init__(self, model: str, device: str, dtype: str, revision: str | None = None) -> None:
        from pascal_moe.models.loading import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(model, revision)
        self.model = load_model(model, device, dtype, revision=revision)
        self.cache: dict[str, Any] = {}

    def run_task(self, task: Callable[[ModelWorker], Any], run: str, index: int, ledger: Any, kill: int | None):
        import ray

        attempt = ray.get(ledger.begin.remote(run, index))
        if attempt > 1:
            print(f"redoing shard {index} (attempt {attempt})", flush=True)
        if kill == index and attempt == 1:
            os._exit(1)  # a worker killed mid-shard (test hook)
        return attempt, task(self)


@dataclass(frozen=True)
class ProfileShard:
    """Profile one shard's texts (global sample index `start` onwards) -> its accumulators."""

    cfg: ProfileConfig
    start: int
    texts: list[str]

    def __call__(self, w: ModelWorker) -> Accumulators:
        from pascal_moe.profile.accumulate import Profiler

        prof = w.cache.get("profiler")
        if prof is None or _profiler_key(prof.cfg) != _profiler_key(self.cfg):
            prof = w.cache["profiler"] = Profiler(w.model, w.tokenizer, self.cfg)
        return prof.run(self.texts, self.start)


def _profiler_key(cfg: ProfileConfig) -> tuple:
    return (cfg.seq_len, cfg.batch_size, cfg.scheme, cfg.sensitivity, cfg.contexts, cfg.weight_error_tokens, cfg.seed)


# pools kept by the driver between passes: (job, placement) -> (ledger, actors); starting an actor is a new
# process that imports torch and loads the model: the cost a warm pool avoids
_POOLS: dict[tuple, tuple[Any, list[Any]]] = {}


def _pool(ray: Any, where: Placement) -> tuple[Any, list[Any]]:
    """The driver's pool for this model and placement, started on first use."""
    key = (ray.get_runtime_context().get_job_id(), where)
    if key not in _POOLS:
        Worker = ray.remote(max_restarts=1, max_task_retries=1)(ModelWorker)
        gpus = where.gpus_per_worker
        opts = {"num_cpus": 1, "num_gpus": gpus} if gpus > 0 else {"num_cpus": 1}
        ledger = ray.remote(num_cpus=0)(Ledger).remote()
        _POOLS[key] = (
            ledger,
            [
                Worker.options(**opts).remote(where.model, where.device, where.dtype, where.revision)
                for _ in range(where.workers)
            ],
        )
    return _POOLS[key]


def shutdown_pools(model: str | None = None) -> None:
    """Kill the pooled actors (of `model` only, when given): a pool whose restart budget was used, or one whose
    model is done (eval keeps one model resident per actor, as the local run keeps one per process)."""
    import ray

    for key in [k for k in _POOLS if model is None or k[1].model == model]:
        ledger, actors = _POOLS.pop(key)
        for a in [*actors, ledger]:
            ray.kill(a, no_restart=True)


def init(where: Placement) -> Any:
    """Join --ray-address, or start a local cluster with one CPU per worker; reuse one already initialised."""
    ray = require_ray()
    if not ray.is_initialized():
        kw: dict[str, Any] = {"address": where.ray_address} if where.ray_address else {"num_cpus": where.workers}
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


def run_shards(
    where: Placement,
    out: Path,
    root: Path,
    key: dict,
    tasks: Iterable[tuple[int, Callable[[], Any]]],
    what: str = "shards",
) -> None:
    """Make sure `root` holds one result file per task: (index, make_task) pairs, each `make_task()` building the
    task object when it is submitted (so large inputs are read one shard at a time).  Files of another `key`
    (settings + data) are discarded first; files already there are kept (resume).  Logs to OUT/executor.log."""
    ray = init(where)
    all_tasks = list(tasks)
    shards.prepare(root, key)
    finished = {i for i, _ in all_tasks if shards.shard_file(root, i).exists()}
    todo = deque((i, make) for i, make in all_tasks if i not in finished)
    out.mkdir(parents=True, exist_ok=True)
    log = _log(out)
    log(f"ray: {len(all_tasks)} {what}, {len(finished)} already done, {len(todo)} to run on {where.workers} workers")
    if todo:
        _run(ray, where, todo, root, log)


def collect_ray(cfg: ProfileConfig, texts: list[str]) -> Accumulators:
    """Profile `texts` on a pool of `cfg.workers` actors; shard results in OUT/shards; merged in shard order."""
    root = Path(cfg.out) / "shards"
    plan = shards.plan(len(texts), cfg.shard_size, cfg.batch_size)
    tasks = [(s.index, lambda s=s: ProfileShard(cfg, s.start, texts[s.start : s.stop])) for s in plan]
    run_shards(Placement.of(cfg), Path(cfg.out), root, shards.plan_key(cfg, texts), tasks)
    return merge(shards.load(shards.shard_file(root, s.index)) for s in plan)  # streamed, in shard order


def _run(ray: Any, where: Placement, todo: deque, root: Path, log: Callable[[str], None]) -> None:
    kill = int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None
    ledger, actors = _pool(ray, where)
    run = uuid.uuid4().hex
    pending: dict[Any, tuple[Any, int]] = {}
    redone = False

    def submit(actor: Any) -> None:
        index, make = todo.popleft()
        pending[actor.run_task.remote(make(), run, index, ledger, kill)] = (actor, index)

    try:
        for a in actors:
            if todo:
                submit(a)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor, index = pending.pop(ref)
            try:
                attempt, result = ray.get(ref)
            except ray.exceptions.RayError as e:
                redone = isinstance(e, ray.exceptions.RayActorError)  # an actor died twice; a task error keeps it
                raise _user_error(e, index, root) from None
            if attempt > 1:
                redone = True
                log(f"redoing shard {index} (attempt {attempt}): done, counted once")
            shards.save(result, shards.shard_file(root, index))
            log(f"shard {index} done")
            if todo:
                submit(actor)
    finally:
        if redone or pending:  # restart budget spent, or stopped mid-run: the next pass starts a fresh pool
            shutdown_pools()
