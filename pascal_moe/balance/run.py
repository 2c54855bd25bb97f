"""`pascal balance`: profile + candidate dirs in, calib.parquet + coverage report + dataset card out.

Why a stage of its own: selection is cheap and deterministic given its inputs, so it can be
re-run with other budgets (n_samples, seq_len, caps) without re-profiling or re-synthesising.
Reads only the artifacts of docs/CONTRACTS.md (profile DIR, synthetic.parquet/samples.parquet).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from rich.console import Console

from pascal_moe.balance.config import BalanceConfig
from pascal_moe.balance.coverage import CoverageSummary, coverage_table, plot_coverage, summarize
from pascal_moe.balance.objective import Objective, build_objective, count_matrix
from pascal_moe.balance.select import Selection, random_baseline, random_baseline_tokens, select
from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import (atomic_path, fingerprint_obj, read_json, sha256_file, versions, write_json,
                                     write_parquet, write_text)

console = Console(stderr=True)
META = ["sample_id", "text", "source", "n_tokens"]


@dataclass(slots=True)
class Pool:
    """All candidates: metadata per row and their routed-token matrix X [N, K]."""

    frame: pd.DataFrame  # sample_id, text, source, n_tokens, targets, domain, origin
    X: sp.csr_matrix  # [N, K]
    inputs: dict[str, str]  # file -> sha256 (input fingerprints)

    @property
    def natural(self) -> np.ndarray:
        return (self.frame["source"] == "seed").to_numpy()


def _read_samples(path: Path, n_keys: int, seq_len: int, accepted_only: bool) -> tuple[pd.DataFrame, sp.csr_matrix]:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise PascalError(f"cannot read {path}: {str(e).splitlines()[0]}") from e
    missing = [c for c in [*META, "keys", "counts"] if c not in table.column_names]
    if missing:
        raise PascalError(f"{path} lacks column(s) {', '.join(missing)}: candidates need routed counts "
                          "(run `pascal profile --data` on them, or use `pascal build-calib`)")
    if accepted_only and "accepted" in table.column_names:
        table = table.filter(pc.equal(table["accepted"].fill_null(False), True))
    meta = table.select([c for c in table.column_names if c not in ("keys", "counts")]).to_pandas()
    X = count_matrix(table["keys"], table["counts"], meta["n_tokens"].to_numpy(), n_keys, seq_len)
    frame = pd.DataFrame({c: meta[c] for c in META})
    frame["sample_id"] = frame["sample_id"].astype(str)
    frame["targets"] = (meta["targets"].map(lambda t: [] if t is None else [str(v) for v in t])
                        if "targets" in meta else [[] for _ in range(len(meta))])
    frame["domain"] = meta["domain"].astype(str) if "domain" in meta else "synthetic"
    frame["origin"] = str(path)
    return frame, X


def load_pool(profile: Path, candidates: list[str], n_keys: int, seq_len: int) -> Pool:
    """Seed rows of the profile, then accepted candidate rows; duplicate texts keep their first row."""
    frames, mats, inputs = [], [], {}
    for path, accepted in [(profile / "samples.parquet", False), *[(_candidate_file(Path(c)), True)
                                                                     for c in candidates]]:
        f, X = _read_samples(path, n_keys, seq_len, accepted)
        frames.append(f)
        mats.append(X)
        inputs[str(path)] = sha256_file(path)
    frame = pd.concat(frames, ignore_index=True)
    X = sp.vstack(mats, format="csr")
    keep = ~frame["text"].duplicated().to_numpy() & frame["text"].map(lambda t: isinstance(t, str) and bool(t))
    keep = np.asarray(keep, dtype=bool)
    return Pool(frame[keep].reset_index(drop=True), X[np.flatnonzero(keep)], inputs)


def _candidate_file(d: Path) -> Path:
    if d.is_file() and d.suffix == ".parquet":
        return d
    for name in ("synthetic.parquet", "samples.parquet"):
        if (d / name).exists():
            return d / name
    raise PascalError(f"candidate directory {d} has neither synthetic.parquet nor samples.parquet")


def _load_profile(d: Path) -> tuple[dict, pd.DataFrame]:
    for name in ("profile.json", "experts.parquet", "samples.parquet"):
        if not (d / name).exists():
            raise PascalError(f"{d} is not a profile directory ({name} missing): run `pascal profile --out {d}` first")
    meta = read_json(d / "profile.json")
    for k in ("n_layers", "n_experts", "top_k"):
        if not isinstance(meta.get(k), int) or meta[k] <= 0:
            raise PascalError(f"{d}/profile.json has no valid {k!r}: re-run `pascal profile`")
    return meta, pd.read_parquet(d / "experts.parquet")


def _check(cfg: BalanceConfig) -> None:
    if cfg.n_samples <= 0 or cfg.seq_len <= 0:
        raise PascalError("--n-samples and --seq-len must be positive")
    for name in ("max_synthetic_share", "natural_share"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise PascalError(f"--{name.replace('_', '-')} must lie in [0, 1]")
    if cfg.min_tokens_per_expert < 0 or cfg.demand_share < 0:
        raise PascalError("--min-tokens-per-expert and --demand-share must be >= 0")


def _tokenizer_fingerprint(name: str, tok) -> str:
    f = Path(name) / "tokenizer.json"
    return sha256_file(f) if f.exists() else fingerprint_obj(sorted(tok.get_vocab().items()))


def calib_table(pool: Pool, sel: Selection, input_ids: list[list[int]]) -> pa.Table:
    """calib.parquet rows in pick order (CONTRACTS columns first, then domain and selected_by)."""
    rows = pool.frame.iloc[sel.index]
    return pa.table({
        "text": pa.array(rows["text"].tolist(), pa.string()),
        "source": pa.array(rows["source"].astype(str).tolist(), pa.string()),
        "sample_id": pa.array(rows["sample_id"].tolist(), pa.string()),
        "n_tokens": pa.array([len(ids) for ids in input_ids], pa.int32()),
        "input_ids": pa.array(input_ids, pa.list_(pa.int32())),
        "targets": pa.array(rows["targets"].tolist(), pa.list_(pa.string())),
        "domain": pa.array(rows["domain"].tolist(), pa.string()),
        "selected_by": pa.array(sel.reason, pa.string()),
    })


def run(cfg: BalanceConfig) -> Path:
    """Select, tokenize, write OUT/{calib.parquet, coverage.parquet, coverage.png, manifest.json, README.md}."""
    from pascal_moe.io.batches import tokenize
    from pascal_moe.models.loading import load_tokenizer

    t0 = time.perf_counter()
    _check(cfg)
    prof_dir, out = Path(cfg.profile), Path(cfg.out)
    meta, experts = _load_profile(prof_dir)
    L, E, k = meta["n_layers"], meta["n_experts"], meta["top_k"]
    with console.status("loading candidates"):
        pool = load_pool(prof_dir, list(cfg.candidates), L * E, cfg.seq_len)
    natural = pool.natural
    if natural.sum() == 0:
        raise PascalError(f"{prof_dir}/samples.parquet holds no seed samples (source == 'seed')")
    if len(pool.frame) < cfg.n_samples:
        console.print(f"[yellow]warning:[/] only {len(pool.frame)} candidates for --n-samples {cfg.n_samples}")
    n = min(cfg.n_samples, len(pool.frame))
    row_tokens = np.minimum(pool.frame["n_tokens"].to_numpy(np.float64), cfg.seq_len)  # [N] after truncation
    mean_tokens = float(row_tokens.mean())
    obj = build_objective(experts, E, L, k, n, mean_tokens, cfg.min_tokens_per_expert, cfg.demand_share,
                          cfg.sensitivity_weight, cfg.boundary_weight)
    with console.status(f"selecting {n} of {len(pool.frame)} candidates (greedy)"):
        sel = select(pool.X, obj, n, natural, natural_share=cfg.natural_share,
                     max_synthetic_share=cfg.max_synthetic_share, seed=cfg.seed)
    base_rows, base_cov = random_baseline(pool.X, natural, len(sel.index), cfg.seed)

    tok_name = cfg.tokenizer or meta.get("tokenizer") or meta.get("model")
    if not tok_name:
        raise PascalError(f"{prof_dir}/profile.json names no tokenizer: pass --tokenizer")
    tok = load_tokenizer(str(tok_name))
    with console.status("tokenizing"):
        ids = tokenize(pool.frame["text"].iloc[sel.index].tolist(), tok, cfg.seq_len)
        base_ids = tokenize(pool.frame["text"].iloc[base_rows].tolist(), tok, cfg.seq_len)
    table = calib_table(pool, sel, ids)
    out.mkdir(parents=True, exist_ok=True)
    with_synth = ~natural[sel.index]
    after = summarize(sel.coverage, obj.demand, obj.weight, np.array([len(i) for i in ids]), with_synth)
    before = summarize(base_cov, obj.demand, obj.weight, np.array([len(i) for i in base_ids]),
                       np.zeros(len(base_rows), bool))
    eq_rows, eq_cov = random_baseline_tokens(pool.X, natural, row_tokens, after.tokens, cfg.seed)
    same_tokens = summarize(eq_cov, obj.demand, obj.weight, row_tokens[eq_rows].astype(np.int64),
                            np.zeros(len(eq_rows), bool))
    reach = np.asarray(pool.X.sum(axis=0)).ravel()
    cov = coverage_table(base_cov, sel.coverage, obj.demand, obj.weight, E, reach)
    write_parquet(cov, out / "coverage.parquet")
    plot_coverage(cov, before, after, out / "coverage.png")
    with atomic_path(out / "calib.parquet") as tmp:
        pq.write_table(table, tmp)
    manifest = {
        "model": meta.get("model"), "tokenizer": str(tok_name), "tokenizer_fingerprint": _tokenizer_fingerprint(
            str(tok_name), tok), "model_fingerprint": meta.get("model_fingerprint"),
        "parameters": asdict(cfg), "objective": _objective_doc(cfg, obj, n, mean_tokens, k, E),
        "inputs": {"profile.json": sha256_file(prof_dir / "profile.json"),
                   "experts.parquet": sha256_file(prof_dir / "experts.parquet"), **pool.inputs},
        "candidates": {"total": int(len(pool.frame)), "seed": int(natural.sum()), "synthetic": int((~natural).sum())},
        "selection": {"picked_by": sel.reasons_count, "gain_updates": sel.updates,
                      "sources": table.column("source").to_pandas().value_counts().to_dict()},
        "coverage": {"before_random_seed": before.as_dict(), "after_balanced": after.as_dict(),
                     "random_seed_same_tokens": same_tokens.as_dict(),
                     "unreachable_experts": int(np.sum(reach <= 0))},
        "calib_sha256": sha256_file(out / "calib.parquet"), "seconds": round(time.perf_counter() - t0, 2),
        "versions": versions(),
    }
    write_json(manifest, out / "manifest.json")
    write_text(dataset_card(manifest, before, after, same_tokens), out / "README.md")
    console.print(f"balance: {after.experts_below_demand} of {L * E} experts below demand (random seed text: "
                  f"{before.experts_below_demand} at the same sample count, {same_tokens.experts_below_demand} at the "
                  f"same token count); synthetic share {after.synthetic_share:.0%}; wrote {out / 'calib.parquet'}")
    return out


def _objective_doc(cfg: BalanceConfig, obj: Objective, n: int, mean_tokens: float, k: int, E: int) -> dict:
    return {"formula": "max F(S) = sum_e w_e * min(c_e(S), t_e)",
            "weight": f"w_e = 1 + {cfg.sensitivity_weight} * sensitivity_e + {cfg.boundary_weight} * boundary_share_e",
            "demand": f"t_e = max({cfg.min_tokens_per_expert}, {cfg.demand_share} * {n} * {mean_tokens:.1f} * {k} / {E}"
                      " * (1 + sensitivity_e))",
            "count_scaling": "counts * min(1, seq_len / n_tokens)",
            "demand_min": float(obj.demand.min()), "demand_max": float(obj.demand.max()),
            "weight_min": float(obj.weight.min()), "weight_max": float(obj.weight.max())}


def dataset_card(m: dict, before: CoverageSummary, after: CoverageSummary, same_tokens: CoverageSummary) -> str:
    """README.md with Hugging Face front matter so the folder loads as a dataset."""
    p = m["parameters"]
    rows = [("experts below demand", "experts_below_demand", "{:d}"), ("experts with no tokens",
            "experts_without_tokens", "{:d}"), ("min tokens per expert", "min_tokens_per_expert", "{:.1f}"),
            ("median tokens per expert", "median_tokens_per_expert", "{:.1f}"), ("Gini of tokens per expert",
            "gini", "{:.3f}"), ("synthetic share", "synthetic_share", "{:.1%}"), ("tokens", "tokens", "{:d}")]
    table = "\n".join(f"| {name} | {fmt.format(getattr(before, key))} | {fmt.format(getattr(same_tokens, key))} | "
                      f"{fmt.format(getattr(after, key))} |" for name, key, fmt in rows)
    sources = ", ".join(f"{k}: {v}" for k, v in m["selection"]["sources"].items())
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: calib.parquet
tags: [calibration, quantization, mixture-of-experts, pascal-moe]
---
# Expert-balanced calibration set for `{m['model']}`

{after.samples} samples ({sources}), at most {p['seq_len']} tokens each, selected by `pascal balance` to
maximise sensitivity-weighted, saturated expert coverage: {m['objective']['formula']},
with {m['objective']['weight']} and {m['objective']['demand']}.
{p['natural_share']:.0%} of the set is random seed text; synthetic text is capped at {p['max_synthetic_share']:.0%}.

## Coverage (tokens routed to each layer/expert, top-k membership)
"Before" is seed text drawn at random (seed {p['seed']}): the same number of samples, and enough samples for the
same number of tokens as the balanced set (which may prefer long samples).

| | random seed, same samples | random seed, same tokens | balanced |
|---|---|---|---|
{table}

![coverage](coverage.png)

## Columns
`text`, `source` (seed / synthetic / self), `sample_id`, `n_tokens`, `input_ids` (tokenizer `{m['tokenizer']}`,
truncated to {p['seq_len']}), `targets` (experts a synthetic sample was written for), `domain`, `selected_by`.

## Use
```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="calib.parquet", split="train")
```
llm-compressor: `oneshot(model, dataset=ds.select_columns(["input_ids"]), ...)`; other quantizers:
`pascal export-calib --format autoround|gptqmodel|jsonl` (packs so no sample is dropped).
Inputs, parameters and versions are in `manifest.json`.
"""
