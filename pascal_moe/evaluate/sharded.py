"""`pascal eval --executor ray`: the fp and quantized passes sharded over Ray actors, merged in the driver.

Why the metrics equal the local run's: the windows (and each domain's windows) are split into contiguous shards
of `--shard-size` windows, a multiple of `--batch-size`, so every shard's batches are exactly the local pass's
batches; every metric is a sum over tokens (NLL, KL, Jaccard per layer, counts), so the driver adds the shards'
sums in shard order and reads the means off at the end: the same numbers to round-off, whatever the worker count.

How: one model resident per actor, as locally one per process.  Phase 1, a pool of the fp model: per shard the
actor runs `metrics.reference` into its own temp dir and returns the files (the driver stores them atomically in
OUT/shards/fp, so a stopped run resumes); the greedy generations and calibration coverage run as one task each.
That pool is then stopped.  Phase 2, per quantized model, a pool of that model: each shard's task carries the
shard's stored fp reference, the actor runs `metrics.compare_to` against it and returns the shard's `PairStats`.
The reference files are passed as opaque bytes, so this module does not depend on their format.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from pascal_moe.errors import PascalError
from pascal_moe.evaluate import metrics
from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.executor import shards
from pascal_moe.io.artifacts import calib_file, fingerprint_model, fingerprint_obj, sha256_file
from pascal_moe.io.batches import batches, check_seq_len


@dataclass(frozen=True)
class FpShard:
    """The fp reference of one shard of windows: the files `metrics.reference` wrote, and its running sums."""

    windows: list[list[int]]
    batch_size: int
    pad: int
    top_n: int
    seq_len: int

    def __call__(self, w: Any) -> dict:
        from pascal_moe.models import moe_layers

        check_seq_len(self.seq_len, w.model)
        with tempfile.TemporaryDirectory(prefix="pascal-fp-") as tmp:
            ref = metrics.reference(w.model, batches(self.windows, self.batch_size, self.pad), self.top_n, Path(tmp))
            files = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in sorted(Path(tmp).rglob("*")) if p.is_file()}
        sums = {f.name: getattr(ref, f.name) for f in dataclasses.fields(ref) if f.name != "dir"}
        return {"files": files, "sums": sums, "n_moe": len(moe_layers(w.model))}


@dataclass(frozen=True)
class CompareShard:
    """One shard of a quantized model's pass against its stored fp reference -> the shard's PairStats."""

    windows: list[list[int]]
    batch_size: int
    pad: int
    ref: dict  # an FpShard result

    def __call__(self, w: Any) -> metrics.PairStats:
        with tempfile.TemporaryDirectory(prefix="pascal-fp-") as tmp:
            for name, data in self.ref["files"].items():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                (Path(tmp) / name).write_bytes(data)
            ref = metrics.Reference(Path(tmp), **self.ref["sums"])
            return metrics.compare_to(w.model, ref, batches(self.windows, self.batch_size, self.pad))


@dataclass(frozen=True)
class Generate:
    """Greedy generations of all prompts in one batch (as locally: generation is not split)."""

    prompts: torch.Tensor
    n_tokens: int

    def __call__(self, w: Any) -> torch.Tensor:
        return metrics.greedy_generate(w.model, self.prompts, self.n_tokens)


@dataclass(frozen=True)
class Coverage:
    """[L, E] tokens per expert of one calibration set on the fp model (the file must be readable by the actor)."""

    calib: str
    cfg: EvalConfig

    def __call__(self, w: Any) -> torch.Tensor:
        from pascal_moe.evaluate.run import calib_counts

        return calib_counts(w.model, w.tokenizer, self.calib, self.cfg)


@dataclass
class RayEval:
    """What the local passes produce, from the shards: fp sums, generations, coverage, per model its stats."""

    ppl_fp: float
    n_pred: int
    gen_fp: torch.Tensor | None
    coverage: list[torch.Tensor]
    models: list[tuple[metrics.PairStats, dict[str, metrics.PairStats]]]  # (mixed, {domain: stats}) per model


def merge_stats(parts: list[metrics.PairStats]) -> metrics.PairStats:
    """Shard PairStats added field by field, in shard order (list fields element-wise)."""
    out = metrics.PairStats(parts[0].n_layers)
    for p in parts:
        for f in dataclasses.fields(p):
            if f.name == "n_layers":
                continue
            a, b = getattr(out, f.name), getattr(p, f.name)
            setattr(out, f.name, [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b)
    return out


def evaluate_on_ray(
    cfg: EvalConfig,
    tok: Any,
    wins: list[list[int]],
    dwins: dict[str, list[list[int]]],
    prompt_ids: torch.Tensor | None,
    qpaths: list[Path],
) -> RayEval:
    """Run every pass of `pascal eval` on the actor pool; OUT/shards holds the shard files until the end."""
    from pascal_moe.executor.ray_pool import Placement, run_shards, shutdown_pools

    out = Path(cfg.out)
    root = out / "shards"
    pad = tok.pad_token_id
    streams = [wins, *dwins.values()]  # stream 0: the mixed windows; stream k: the k-th domain's
    items = [
        (k, s) for k, w in enumerate(streams) for s in shards.plan(len(w), cfg.shard_size, cfg.batch_size)
    ]  # global shard index = position here
    extra = len(items)  # the generation task's index; the coverage tasks follow
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in (*shards.NOT_IN_PLAN, "quantized")}
    key = {
        "settings": settings,
        "shard_size": shards.shard_size(cfg.shard_size, cfg.batch_size),
        "windows": fingerprint_obj([streams, None if prompt_ids is None else prompt_ids.tolist()]),
        "model": fingerprint_model(cfg.model, cfg.revision),
        "calib": [sha256_file(calib_file(c)) for c in cfg.calib],
    }
    cuts = [streams[k][s.start : s.stop] for k, s in items]  # views of the lists: no token is copied
    fp_dir = root / "fp"

    fp_tasks: list[tuple[int, Callable[[], Any]]] = [
        (i, partial(FpShard, cut, cfg.batch_size, pad, cfg.kl_top_n, cfg.seq_len)) for i, cut in enumerate(cuts)
    ]
    if prompt_ids is not None:
        fp_tasks.append((extra, partial(Generate, prompt_ids, cfg.generate_tokens)))
    fp_tasks += [(extra + 1 + j, partial(Coverage, c, cfg)) for j, c in enumerate(cfg.calib)]
    run_shards(Placement.of(cfg), out, fp_dir, key, fp_tasks, "fp shards")
    shutdown_pools(cfg.model)  # one model resident per actor: the quantized pools start after this one is gone

    sums: dict[str, Any] = {}
    n_moe = 0
    for i, (k, _) in enumerate(items):
        if k == 0:
            part = shards.load(shards.shard_file(fp_dir, i))
            n_moe = part["n_moe"]
            sums = {name: sums.get(name, 0) + v for name, v in part["sums"].items()}
    ref = metrics.Reference(fp_dir, **sums)
    gen_fp = shards.load(shards.shard_file(fp_dir, extra)) if prompt_ids is not None else None
    coverage = [shards.load(shards.shard_file(fp_dir, extra + 1 + j)) for j in range(len(cfg.calib))]

    models = []
    for j, qp in enumerate(qpaths):
        q_dir = root / f"q{j}"
        q_tasks: list[tuple[int, Callable[[], Any]]] = [
            (i, partial(_compare, cut, cfg.batch_size, pad, shards.shard_file(fp_dir, i))) for i, cut in enumerate(cuts)
        ]
        if prompt_ids is not None:
            q_tasks.append((extra, partial(Generate, prompt_ids, cfg.generate_tokens)))
        qkey = {**key, "quantized": fingerprint_model(str(qp))}
        run_shards(Placement.of(cfg, model=str(qp)), out, q_dir, qkey, q_tasks, f"shards of {qp.name}")
        shutdown_pools(str(qp))
        parts: list[list[metrics.PairStats]] = [[] for _ in streams]
        for i, (k, _) in enumerate(items):
            parts[k].append(shards.load(shards.shard_file(q_dir, i)))
        merged = [merge_stats(p) for p in parts]
        if merged[0].n_layers != n_moe:
            raise PascalError(f"quantized model {qp} has a different MoE layer layout than {cfg.model}")
        if gen_fp is not None:
            gen_q = shards.load(shards.shard_file(q_dir, extra))
            merged[0].gen_match, merged[0].gen_total = metrics.agreement(gen_fp, gen_q)
        models.append((merged[0], dict(zip(dwins, merged[1:]))))
    shutil.rmtree(root, ignore_errors=True)  # merged: the partial results are spent
    return RayEval(ref.ppl_fp, ref.n_pred, gen_fp, coverage, models)


def _compare(windows: list[list[int]], batch_size: int, pad: int, fp_file: Path) -> CompareShard:
    """The shard's task, its stored fp reference read only now (when it is submitted): one shard in memory."""
    return CompareShard(windows, batch_size, pad, shards.load(fp_file))
