"""The profiling pass as mergeable accumulators: one `Profiler` per loaded model, `run` over any slice of texts.

Why a separate module: the same pass serves the local executor (one slice: all texts) and the Ray executor
(one slice per shard, on an actor that keeps the model between shards; RTN weights are made one layer at a time inside each quantized forward).  Everything a slice
yields is a sum, a histogram, a sparse count table or a bounded top-C heap, so `merge` of the slices' results
in shard order gives the whole pass: counts exactly, float sums to round-off (only their summation order moves).

The weight-error subsample is seeded per *global* batch (seed, batch index), not by one generator running
through the data, so it does not depend on how the batches are split into shards.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from pascal_moe.errors import PascalError
from pascal_moe.io.batches import check_seq_len
from pascal_moe.models import MoELayer, moe_layers
from pascal_moe.models.base import RouterSpec
from pascal_moe.profile.capture import CountAccumulator, capture_routing, forward, iter_batches, routed_batch
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.profile.sensitivity import LayerwiseRTN, MarginStats, Reroute, WeightError
from pascal_moe.profile.triggers import TriggerStats
from pascal_moe.quant.schemes import parse_scheme

SECONDS = ("quantize", "fp_forward", "stats", "weight_error", "q_forward")


@dataclass
class Accumulators:
    """What one slice of the pass accumulates; picklable (no model tensors), mergeable with `merge`."""

    layer_indices: list[int]
    spec: RouterSpec
    sensitivity: bool
    counts: CountAccumulator
    margins: MarginStats
    triggers: TriggerStats
    werr_num: torch.Tensor  # [L, E] summed squared output error
    werr_den: torch.Tensor  # [L, E] summed squared fp output
    reroute: Reroute
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SECONDS, 0.0))


def _act(layers: list[MoELayer], model: nn.Module):
    """The experts' activation: the module's own `act_fn`, else `config.hidden_act`."""
    for et in layers[0].experts:
        if hasattr(et.module, "act_fn"):
            return et.module.act_fn
    return getattr(model.config, "hidden_act", "silu")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]profile[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("batches"),
        TextColumn("{task.fields[tps]:>8.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


class Profiler:
    """A loaded model ready to profile slices: layers found, settings checked, RTN weights made once."""

    def __init__(self, model: nn.Module, tokenizer, cfg: ProfileConfig) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.layers = moe_layers(model)
        check_seq_len(cfg.seq_len, model)
        self.vocab = max(len(tokenizer), getattr(model.config, "vocab_size", 0))
        # one decoder layer's RTN weights at a time, made inside each quantized forward (no model copy)
        self.rtn = LayerwiseRTN(model, self.layers, parse_scheme(cfg.scheme)) if cfg.sensitivity else None

    def empty(self, n_samples: int) -> Accumulators:
        L, E = len(self.layers), self.layers[0].spec.n_experts
        return Accumulators(
            layer_indices=[lay.layer_index for lay in self.layers],
            spec=self.layers[0].spec,
            sensitivity=self.cfg.sensitivity,
            counts=CountAccumulator(n_samples, L, E),
            margins=MarginStats(L, E),
            triggers=TriggerStats(L, E, self.vocab, contexts=self.cfg.contexts),
            werr_num=torch.zeros(L, E, dtype=torch.float64),
            werr_den=torch.zeros(L, E, dtype=torch.float64),
            reroute=Reroute(L, E),
        )

    @torch.no_grad()
    def run(self, texts: list[str], offset: int = 0, progress: bool = False) -> Accumulators:
        """Profile `texts`, the samples `offset ..` of the whole input (`offset` must be a batch boundary)."""
        cfg, model, layers = self.cfg, self.model, self.layers
        if offset % cfg.batch_size:
            raise ValueError(f"slice offset {offset} is not a multiple of the batch size {cfg.batch_size}")
        acc = self.empty(len(texts))
        acc.triggers.sample_offset = offset
        _, it = iter_batches(self.tokenizer, texts, cfg.seq_len, cfg.batch_size)
        sens, secs = cfg.sensitivity, acc.seconds
        werr = None
        rtn_s0 = self.rtn.seconds if self.rtn is not None else 0.0
        if sens:
            werr = WeightError(layers, _act(layers, model), cap=cfg.weight_error_tokens, seed=cfg.seed)
        n_batches = -(-len(texts) // cfg.batch_size)
        start, done = time.perf_counter(), 0
        with (
            capture_routing(model, layers, keep_inputs=sens, stop_early=True, margins=True) as rec,
            _progress(progress) as bar,
        ):
            task = bar.add_task("profile", total=n_batches, tps=0.0)
            for batch in it:
                t0 = time.perf_counter()
                rec.clear()
                forward(model, batch)
                rb = routed_batch(batch, rec, layers)
                t1 = time.perf_counter()
                acc.counts.add(rb)
                acc.margins.add(rb)
                acc.triggers.add(rb)
                t2 = time.perf_counter()
                if werr is not None and self.rtn is not None:
                    werr.start_batch((offset + batch.sample_index[0]) // cfg.batch_size)
                    rec.clear()
                    with self.rtn.applied(partial(werr.add, rb)):  # weight error runs layer by layer inside
                        forward(model, batch)
                    rq = routed_batch(batch, rec, layers)
                    acc.reroute.add(rb.indices, rq.indices)
                    secs["q_forward"] += time.perf_counter() - t2
                secs["fp_forward"] += t1 - t0
                secs["stats"] += t2 - t1
                done += rb.n_tokens
                bar.update(task, advance=1, tps=done / max(time.perf_counter() - start, 1e-9))
        if werr is not None and self.rtn is not None:  # RTN and weight error ran inside the quantized forward
            secs["quantize"] = self.rtn.seconds - rtn_s0
            secs["weight_error"] = werr.seconds
            secs["q_forward"] -= secs["quantize"] + secs["weight_error"]
            acc.werr_num, acc.werr_den = werr.num, werr.den
        return acc


def check_tokens(acc: Accumulators) -> None:
    if acc.counts.n_tokens == 0:
        raise PascalError("the data has no tokens after tokenization: pass non-empty texts")


def merge(parts: Iterable[Accumulators]) -> Accumulators:
    """The accumulators of consecutive slices, in the order given (shard order), as one pass over all of them.

    Streams: one part at a time is held besides the result (shard files are loaded lazily by the caller)."""
    it = iter(parts)
    first = next(it, None)
    if first is None:
        raise ValueError("nothing to merge")
    L, E = first.werr_num.shape
    out = Accumulators(
        layer_indices=first.layer_indices,
        spec=first.spec,
        sensitivity=first.sensitivity,
        counts=CountAccumulator(0, L, E),
        margins=MarginStats(L, E),
        triggers=TriggerStats(L, E, len(first.triggers.token_count), contexts=first.triggers.C),
        werr_num=torch.zeros(L, E, dtype=torch.float64),
        werr_den=torch.zeros(L, E, dtype=torch.float64),
        reroute=Reroute(L, E),
    )
    c, m, t, r = out.counts, out.margins, out.triggers, out.reroute
    for p in itertools.chain([first], it):
        c.samples.extend(p.counts.samples)
        c.tokens += p.counts.tokens
        c.weight_mass += p.counts.weight_mass
        c.n_tokens += p.counts.n_tokens
        m.hist += p.margins.hist
        m.gap_sum += p.margins.gap_sum
        m.count += p.margins.count
        pt = p.triggers
        if len(pt.token_count) > len(t.token_count):
            t.token_count = np.pad(t.token_count, (0, len(pt.token_count) - len(t.token_count)))
        t.token_count[: len(pt.token_count)] += pt.token_count
        t.expert_tokens += pt.expert_tokens
        t.n_tokens += pt.n_tokens
        for li in range(L):
            src, dst = pt.pairs[li], t.pairs[li]
            src.merge()
            dst._pending.append((src.keys, src.counts, src.wsum))
            dst._n_pending += len(src.keys)
            if dst._n_pending > dst.merge_at:
                dst.merge()
            for e in range(E):
                # (weight, tiebreak) is a total order: the top C of the shards' top C are the top C of all
                t.heaps[li][e] = heapq.nlargest(t.C, t.heaps[li][e] + pt.heaps[li][e], key=lambda x: x[:2])
        out.werr_num += p.werr_num
        out.werr_den += p.werr_den
        r.routed += p.reroute.routed
        r.lost += p.reroute.lost
        r.jac_sum += p.reroute.jac_sum
        r.n += p.reroute.n
        for k, v in p.seconds.items():
            out.seconds[k] = out.seconds.get(k, 0.0) + v
    for li in range(L):
        t.pairs[li].merge()
        for e in range(E):
            heapq.heapify(t.heaps[li][e])
    return out
