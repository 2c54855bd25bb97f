"""Scale check for `pascal balance` at real routing density: 512 x 2048 tokens of 100,000 candidates, 48 x 128 experts.

Shape of Qwen3-30B-A3B (48 MoE layers, 128 experts, top-8), 1,536-2,048 tokens per sample.  Real
density: a 2,048-token sample touches 100-128 of the 128 experts in every layer (~5.5k of 6,144
keys per row).  Generated routing: per layer a Zipf-like expert popularity (p ∝ rank^-1.1, random
order); each (sample, layer) routes its n·k token slots to m ∈ [100, 128] distinct experts drawn by
popularity (Gumbel top-m), split by a Dirichlet(0.5) draw (skewed counts), each at least 1 and
capped at n.  The rows are written to a samples.parquet (list<int32> keys/counts, as `pascal
profile` writes them) in chunks, so the generator never holds the matrix.  The timed part is what
`pascal balance` does: `load_pool` (metadata, then keys/counts in Parquet batches into the dense
int16 matrix), the objective, the greedy `select`, and the random same-tokens baseline.  Peak RSS is
the whole process's (generation included).  Wall and CPU seconds are recorded with the load average:
this machine's 2 cores are shared.

    python benchmarks/balance_scale.py [--candidates 100000] [--samples-dir DIR] [--out benchmarks/results/balance_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pascal_moe.balance.coverage import summarize
from pascal_moe.balance.objective import build_objective
from pascal_moe.balance.run import load_pool
from pascal_moe.balance.select import random_baseline_tokens, select


def generate(path: Path, N: int, L: int, E: int, k: int, seed: int, chunk: int = 1000) -> None:
    """Write N rows of samples.parquet to `path` (see module docstring)."""
    rng = np.random.default_rng(seed)
    pop = np.stack([rng.permutation(np.arange(1, E + 1) ** -1.1) for _ in range(L)])  # [L, E]
    logpop = np.log(pop / pop.sum(1, keepdims=True))
    writer = None
    for lo in range(0, N, chunk):
        C = min(chunk, N - lo)
        n_tok = rng.integers(1536, 2049, size=C)  # [C]
        m = rng.integers(100, E + 1, size=(C, L))  # [C, L] distinct experts per (sample, layer)
        g = logpop[None] + rng.gumbel(size=(C, L, E))  # [C, L, E]
        order = np.argsort(-g, axis=2)  # [C, L, E] experts by perturbed popularity
        keep = np.arange(E)[None, None] < m[:, :, None]  # [C, L, E] first m of each row
        w = np.where(keep, rng.gamma(0.5, size=(C, L, E)), 0.0) + keep * 1e-3  # Dirichlet(0.5) via gammas
        tok = n_tok[:, None, None]
        cnt = np.minimum(np.maximum(np.rint(w / w.sum(2, keepdims=True) * tok * k), 1), tok).astype(np.int32)
        key = (order + (np.arange(L) * E)[None, :, None]).astype(np.int32)  # [C, L, E]
        key, cnt = np.where(keep, key, L * E), np.where(keep, cnt, 0)  # dropped entries sort last
        srt = np.argsort(key.reshape(C, -1), axis=1)  # keys ascending per row, as the profiler writes them
        key = np.take_along_axis(key.reshape(C, -1), srt, 1)
        cnt = np.take_along_axis(cnt.reshape(C, -1), srt, 1)
        lens = m.sum(1)  # [C]
        valid = np.arange(L * E)[None] < lens[:, None]
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32))
        table = pa.table(
            {
                "sample_id": [f"c{lo + i}" for i in range(C)],
                "text": [f"candidate {lo + i}" for i in range(C)],
                "source": ["seed"] * C,
                "n_tokens": n_tok.astype(np.int64),
                "keys": pa.ListArray.from_arrays(offsets, pa.array(key[valid])),
                "counts": pa.ListArray.from_arrays(offsets, pa.array(cnt[valid])),
            }
        )
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        print(f"generated {lo + C}/{N}", end="\r", file=sys.stderr)
    if writer is not None:
        writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=100_000)
    ap.add_argument("--tokens", type=int, default=512 * 2048)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--synthetic-share", type=float, default=0.3, help="fraction of candidates marked synthetic")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/balance_scale.json")
    ap.add_argument("--samples-dir", default=None, help="keep samples.parquet here (reused when present)")
    a = ap.parse_args()
    L, E, k = a.layers, a.experts, a.top_k
    tmp = Path(a.samples_dir) if a.samples_dir else Path(tempfile.mkdtemp(prefix="balance-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    t_gen = time.perf_counter()
    if not (tmp / "samples.parquet").exists():
        generate(tmp / "samples.parquet", a.candidates, L, E, k, a.seed)
    t_gen = time.perf_counter() - t_gen
    rss_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6

    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    pool = load_pool(tmp, [], L * E, a.seq_len)  # [N, K] dense column-major, Parquet read in batches
    t_load, cpu_load = time.perf_counter() - t0, time.process_time() - c0
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    X = pool.X
    n_tok = pool.frame["n_tokens"].to_numpy()
    totals = X.sum(axis=0, dtype=np.float64)  # [K] (untimed: the profile's experts.parquet holds these)
    rng = np.random.default_rng(a.seed)
    experts = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), E),
            "expert": np.tile(np.arange(E), L),
            "sensitivity": rng.uniform(0, 1, L * E),
            "tokens": totals,
            "boundary_tokens": totals * rng.uniform(0, 0.3, L * E),
        }
    )
    natural = np.random.default_rng(a.seed + 7).uniform(size=a.candidates) >= a.synthetic_share
    t1, c1 = time.perf_counter(), time.process_time()
    cost = np.minimum(n_tok, a.seq_len) + 1.0  # [N] tokens + the EOS that joins a document to the next
    obj = build_objective(experts, E, L, k, a.tokens, 64, 0.25, 1.0, 1.0)  # the `pascal balance` defaults
    sel = select(X, obj, cost, a.tokens + 1, natural, natural_share=0.25, max_synthetic_share=0.5, seed=a.seed)
    rows, base_cov = random_baseline_tokens(X, natural, cost, sel.tokens, a.seed)
    t_select, cpu_select = time.perf_counter() - t1, time.process_time() - c1
    nnz = int(np.count_nonzero(X))

    after = summarize(
        sel.coverage,
        obj.demand,
        obj.weight,
        documents=len(sel.index),
        windows=0,
        tokens=int(sel.tokens),
        synthetic_tokens=sel.synthetic_tokens,
    )
    before = summarize(
        base_cov,
        obj.demand,
        obj.weight,
        documents=len(rows),
        windows=0,
        tokens=int(cost[rows].sum()),
        synthetic_tokens=0.0,
    )
    total = t_load + t_select
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, shared 2-core VM",
        "shape": {
            "candidates": a.candidates,
            "tokens": a.tokens,
            "layers": L,
            "experts": E,
            "top_k": k,
            "nnz": nnz,
            "nnz_per_row": round(nnz / a.candidates, 1),
            "matrix_dtype": str(X.dtype),
            "matrix_gb": round(X.nbytes / 1e9, 3),
            "parquet_gb": round((tmp / "samples.parquet").stat().st_size / 1e9, 3),
        },
        "seconds_generate": round(t_gen, 1),
        "seconds_load_pool": round(t_load, 2),
        "cpu_seconds_load_pool": round(cpu_load, 2),
        "seconds_select": round(t_select, 2),
        "cpu_seconds_select": round(cpu_select, 2),
        "seconds_total": round(total, 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "gain_updates": sel.updates,
        "picked_by": sel.reasons_count,
        "picked": len(sel.index),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "peak_rss_gb_after_generation": round(rss_gen, 2),
        "peak_rss_gb_after_load_pool": round(rss_load, 2),
        "samples_generated_now": t_gen > 1.0,
        "random_seed_same_tokens": before.as_dict(),
        "after_balanced": after.as_dict(),
        "limit_seconds": 30,
        "limit_rss_gb": 4,
        "within_limit_wall": total <= 30,
        "within_limit_cpu": cpu_load + cpu_select <= 30,
    }
    if not a.samples_dir:
        (tmp / "samples.parquet").unlink()
        tmp.rmdir()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
