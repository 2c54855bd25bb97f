"""Cost of `pascal profile` relative to a plain forward over the same batches.

Measures, interleaved per repeat (so machine noise hits all modes alike), median over repeats:
- plain: the profiler's forward call (`logits_to_keep=1`, no cache) with no hooks;
- capture: router hooks + `layer.select` + padding removal + count accumulation, full forward
  (the issue's bound: at most 10% over plain);
- profile_fp: what the profiler really does in its fp pass (early stop after the last router,
  router inputs kept, counts + margins + triggers + contexts);
- sensitivity: the extra work of the sensitivity pass per batch (weight error on the fp inputs
  + the RTN-quantized forward with early stop; the issue's bound: at most one more forward).

Usage: python benchmarks/profile_overhead.py [--model DIR] [--samples 64] [--seq-len 256] [--batch-size 8]
Writes benchmarks/results/profile_overhead.json with the command that produced it.
"""

from __future__ import annotations

import argparse
from functools import partial
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pascal_moe.io.artifacts import write_json
from pascal_moe.io.texts import load_texts
from pascal_moe.models import moe_layers
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.profile.capture import CountAccumulator, capture_routing, forward, iter_batches, routed_batch
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.profile.sensitivity import LayerwiseRTN, MarginStats, Reroute, WeightError
from pascal_moe.profile.triggers import TriggerStats
from pascal_moe.quant.schemes import parse_scheme

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "data/models/qwen3-moe-tiny"))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 on a shared 2-core box)")
    ap.add_argument("--scheme", default="int4-g128")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--weight-error-tokens", type=int, default=ProfileConfig.__dataclass_fields__["weight_error_tokens"].default
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/profile_overhead.json"))
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    model, tok = load_model(a.model, a.device), load_tokenizer(a.model)
    layers = moe_layers(model)
    L, E = len(layers), layers[0].spec.n_experts
    texts = load_texts(None, max_samples=a.samples, split="train").texts
    ids, it = iter_batches(tok, texts, a.seq_len, a.batch_size)
    batches = list(it)
    n_tokens = sum(len(x) for x in ids)
    rtn = LayerwiseRTN(model, layers, parse_scheme(a.scheme))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def plain() -> float:
        sync()
        t = time.perf_counter()
        for b in batches:
            forward(model, b)
        sync()
        return time.perf_counter() - t

    def capture() -> float:
        acc = CountAccumulator(len(texts), L, E)
        sync()
        t = time.perf_counter()
        with capture_routing(model, layers) as rec:
            for b in batches:
                rec.clear()
                forward(model, b)
                acc.add(routed_batch(b, rec, layers))
        sync()
        return time.perf_counter() - t

    def profile_fp() -> float:
        acc, ms, tr = CountAccumulator(len(texts), L, E), MarginStats(L, E), TriggerStats(L, E, len(tok))
        sync()
        t = time.perf_counter()
        with capture_routing(model, layers, keep_inputs=True, stop_early=True, margins=True) as rec:
            for b in batches:
                rec.clear()
                forward(model, b)
                rb = routed_batch(b, rec, layers)
                acc.add(rb)
                ms.add(rb)
                tr.add(rb)
        sync()
        return time.perf_counter() - t

    def sensitivity() -> float:
        werr = WeightError(layers, layers[0].experts[0].module.act_fn, cap=a.weight_error_tokens)
        rer = Reroute(L, E)
        spent = 0.0
        with capture_routing(model, layers, keep_inputs=True, stop_early=True) as rec:
            for bi, b in enumerate(batches):
                rec.clear()
                forward(model, b)
                rb = routed_batch(b, rec, layers)
                sync()
                t = time.perf_counter()
                werr.start_batch(bi)
                rec.clear()
                with rtn.applied(partial(werr.add, rb)):
                    forward(model, b)
                rer.add(rb.indices, routed_batch(b, rec, layers).indices)
                sync()
                spent += time.perf_counter() - t
        return spent

    modes = {"plain": plain, "capture": capture, "profile_fp": profile_fp, "sensitivity": sensitivity}
    with torch.no_grad():
        for f in modes.values():  # warm-up
            f()
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(a.repeats):
            for m, f in modes.items():
                times[m].append(f())
            print(f"repeat {r}: " + ", ".join(f"{m} {v[-1]:.3f}s" for m, v in times.items()), file=sys.stderr)
    med = {m: statistics.median(v) for m, v in times.items()}
    # per-repeat ratios (same repeat = same machine load) are steadier than a ratio of medians
    ratio = {m: statistics.median(x / p for x, p in zip(times[m], times["plain"])) for m in modes}
    res = {
        "command": "python " + " ".join(sys.argv),
        "model": a.model,
        "device": str(model.device),
        "threads": a.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "scheme": a.scheme,
        "weight_error_tokens": a.weight_error_tokens,
        "samples": len(texts),
        "batches": len(batches),
        "tokens": n_tokens,
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "repeats": a.repeats,
        "seconds_median": {m: round(v, 4) for m, v in med.items()},
        "seconds_all": {m: [round(x, 4) for x in v] for m, v in times.items()},
        "plain_tokens_per_s": round(n_tokens / med["plain"], 1),
        "capture_overhead": round(ratio["capture"] - 1, 4),
        "profile_fp_vs_plain": round(ratio["profile_fp"], 4),
        "sensitivity_vs_plain": round(ratio["sensitivity"], 4),
        "capture_within_10pct": ratio["capture"] - 1 <= 0.10,
        "sensitivity_within_one_forward": ratio["sensitivity"] <= 1.0,
    }
    write_json(res, a.out)
    print(json.dumps({k: v for k, v in res.items() if k != "seconds_all"}, indent=1))


if __name__ == "__main__":
    main()
