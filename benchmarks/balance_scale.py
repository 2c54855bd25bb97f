"""Scale check for `pascal balance`: pick 1,048,576 tokens (512 x 2048) of 100,000 candidates over 48 x 128 experts.

Shape of Qwen3-30B-A3B (48 MoE layers, 128 experts, top-8), ~2k tokens per sample.  Generated
routing: per layer a Zipf-like expert popularity (p ∝ rank^-1.1, random order); each (sample,
layer) routes its n·k token slots to m ∈ [16, 96] distinct experts drawn by popularity (Gumbel
top-m), split by a Dirichlet(0.5) draw and capped at n (an expert takes a token at most once).
The timed part is what `pascal balance` does after loading: demand/importance, the full gain pass,
natural picks and the incrementally updated cost-effective greedy (`select`, incl. its CSC copy).  Building X
from Parquet list columns (`count_matrix`) is timed on a 10k-row slice and extrapolated.  Wall and
CPU seconds are both recorded, with the load average: this machine's 2 cores are shared.

    python benchmarks/balance_scale.py [--candidates 100000] [--out benchmarks/results/balance_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
from tqdm import tqdm

from pascal_moe.balance.coverage import summarize
from pascal_moe.balance.objective import build_objective, count_matrix
from pascal_moe.balance.select import random_baseline_tokens, select


def generate(N: int, L: int, E: int, k: int, seed: int, chunk: int = 500) -> tuple[sp.csr_matrix, np.ndarray]:
    """X [N, L·E] float32 routed-token counts and n_tokens [N] (see module docstring)."""
    rng = np.random.default_rng(seed)
    pop = np.stack([rng.permutation(np.arange(1, E + 1) ** -1.1) for _ in range(L)])  # [L, E]
    logpop = np.log(pop / pop.sum(1, keepdims=True))
    n_tok = rng.integers(1536, 2049, size=N)
    m = rng.integers(16, 97, size=(N, L))  # distinct experts per (sample, layer)
    indptr = np.concatenate([[0], np.cumsum(m.sum(1))])
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    for lo in tqdm(range(0, N, chunk), desc="generating", unit_scale=chunk):
        hi = min(lo + chunk, N)
        g = logpop[None] + rng.gumbel(size=(hi - lo, L, E))  # [C, L, E]
        order = np.argsort(-g, axis=2)  # [C, L, E] experts by perturbed popularity
        w = rng.gamma(0.5, size=(hi - lo, L, E))  # [C, L, E] Dirichlet via gammas
        ranks = np.arange(E)[None, None]
        keep = ranks < m[lo:hi, :, None]  # [C, L, E] first m of each row
        w = np.where(keep, w, 0.0) + keep * 1e-3
        share = w / w.sum(2, keepdims=True)
        tok = n_tok[lo:hi, None, None]
        cnt = np.minimum(np.maximum(np.rint(share * tok * k), 1), tok)  # [C, L, E]
        key = order + (np.arange(L) * E)[None, :, None]  # [C, L, E]
        indices[indptr[lo]:indptr[hi]] = key[keep]
        data[indptr[lo]:indptr[hi]] = cnt[keep]
    X = sp.csr_matrix((data, indices, indptr), shape=(N, L * E))
    return X, n_tok


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
    a = ap.parse_args()
    L, E, k = a.layers, a.experts, a.top_k
    X, n_tok = generate(a.candidates, L, E, k, a.seed)
    natural = np.random.default_rng(a.seed + 7).uniform(size=a.candidates) >= a.synthetic_share
    rng = np.random.default_rng(a.seed)
    experts = pd.DataFrame({"layer": np.repeat(np.arange(L), E), "expert": np.tile(np.arange(E), L),
                            "sensitivity": rng.uniform(0, 1, L * E), "tokens": np.asarray(X.sum(0)).ravel(),
                            "boundary_tokens": np.asarray(X.sum(0)).ravel() * rng.uniform(0, 0.3, L * E)})

    load_before = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    cost = np.minimum(n_tok, a.seq_len) + 1.0  # [N] tokens + the EOS that joins a document to the next
    obj = build_objective(experts, E, L, k, a.tokens, 64, 0.5, 1.0, 1.0)
    sel = select(X, obj, cost, a.tokens + 1, natural, natural_share=0.25, max_synthetic_share=0.5, seed=a.seed)
    t_select, cpu_select = time.perf_counter() - t0, time.process_time() - c0

    sub = X[:10_000]  # the Parquet path: list<int32> columns as Arrow arrays
    offsets = pa.array(sub.indptr.astype(np.int32))
    keys = pa.ListArray.from_arrays(offsets, pa.array(sub.indices.astype(np.int32)))
    vals = pa.ListArray.from_arrays(offsets, pa.array(sub.data.astype(np.int32)))
    t1 = time.perf_counter()
    count_matrix(keys, vals, n_tok[:10_000], L * E, a.seq_len)
    t_build = (time.perf_counter() - t1) * a.candidates / 10_000

    rows, base_cov = random_baseline_tokens(X, natural, cost, sel.tokens, a.seed)
    after = summarize(sel.coverage, obj.demand, obj.weight, documents=len(sel.index), windows=0,
                      tokens=int(sel.tokens), synthetic_tokens=sel.synthetic_tokens)
    before = summarize(base_cov, obj.demand, obj.weight, documents=len(rows), windows=0,
                       tokens=int(cost[rows].sum()), synthetic_tokens=0.0)
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}, shared 2-core VM",
        "shape": {"candidates": a.candidates, "tokens": a.tokens, "layers": L, "experts": E, "top_k": k,
                  "nnz": int(X.nnz), "nnz_per_row": round(X.nnz / a.candidates, 1)},
        "seconds_select": round(t_select, 2), "cpu_seconds_select": round(cpu_select, 2),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds_count_matrix_extrapolated": round(t_build, 2),
        "gain_updates": sel.updates, "picked_by": sel.reasons_count,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "random_seed_same_tokens": before.as_dict(), "after_balanced": after.as_dict(),
        "limit_seconds": 30, "within_limit_wall": t_select <= 30, "within_limit_cpu": cpu_select <= 30,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
