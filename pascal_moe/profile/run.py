"""`pascal profile`: route text through an MoE, write per-expert coverage, sensitivity and triggers.

One pass over the batches (in this process, or sharded over Ray actors with `--executor ray`:
pascal_moe/executor): an fp forward with router hooks (counts, margins,
triggers, expert inputs for the weight error), then, when sensitivity is on, the
same batch through the RTN-quantized weights for re-routing, Jaccard and the weight
error (`LayerwiseRTN`: one decoder layer's weights quantized at a time, restored in
`finally`).  Only accumulators survive a batch, so memory is bounded by one batch
plus one decoder layer's quantized weights (no RTN copy of the model).
Nothing is written until all batches are done; each file is written atomically and
profile.json last, so Ctrl-C never leaves a half-written artifact.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pascal_moe.errors import PascalError
from pascal_moe.io.artifacts import fingerprint_model, fingerprint_texts, versions, write_json, write_parquet
from pascal_moe.io.batches import check_seq_len
from pascal_moe.executor import check_executor
from pascal_moe.io.texts import TextSet, load_texts
from pascal_moe.models import moe_layers
from pascal_moe.models.base import RouterSpec
from pascal_moe.models.hub import pinned_commit
from pascal_moe.models.lazy import release_memory
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.profile.accumulate import Accumulators, Profiler, check_tokens
from pascal_moe.profile.capture import CountAccumulator
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.profile.report import write_report
from pascal_moe.profile.sensitivity import MarginStats, combine
from pascal_moe.profile.triggers import TriggerStats
from pascal_moe.quant.schemes import parse_scheme


@dataclass
class Collected:
    """Everything one profiling pass accumulates (no per-token data), reduced to per-expert values."""

    layer_indices: list[int]
    spec: RouterSpec
    counts: CountAccumulator
    margins: MarginStats
    triggers: TriggerStats
    weight_error: np.ndarray  # [L, E]
    reroute_rate: np.ndarray  # [L, E]
    layer_jaccard: list[float]
    layer_reroute: list[float]
    seconds: dict[str, float]


def check_settings(cfg: ProfileConfig) -> None:
    """One-line errors for settings that are wrong before any model is loaded."""
    if cfg.seq_len < 1:
        raise PascalError(f"--seq-len must be at least 1 (got {cfg.seq_len})")
    if cfg.batch_size < 1:
        raise PascalError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if cfg.max_tokens is not None and cfg.max_tokens < 1:
        raise PascalError(f"--max-tokens must be at least 1 (got {cfg.max_tokens})")
    if cfg.max_samples is not None and cfg.max_samples < 1:
        raise PascalError(f"--max-samples must be at least 1 (got {cfg.max_samples})")
    parse_scheme(cfg.scheme)
    check_executor(cfg)
    if not cfg.out:
        raise PascalError("missing --out: give the directory to write the profile to")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise PascalError(f"--out {cfg.out} is a file: give a directory")


def finish(acc: Accumulators) -> Collected:
    """Per-expert values from (merged) accumulators."""
    check_tokens(acc)
    L, E = acc.werr_num.shape
    nan = np.full((L, E), np.nan)
    sens, rer = acc.sensitivity, acc.reroute
    num, den = acc.werr_num.numpy(), acc.werr_den.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        werr = np.where(den > 0, num / den, np.nan)
    return Collected(
        acc.layer_indices,
        acc.spec,
        acc.counts,
        acc.margins,
        acc.triggers,
        werr if sens else nan,
        rer.rate() if sens else nan,
        rer.jaccard() if sens else [],
        rer.layer_rate() if sens else [],
        {k: round(v, 3) for k, v in acc.seconds.items()},
    )


@torch.no_grad()
def collect(model: nn.Module, tokenizer, texts: list[str], cfg: ProfileConfig, progress: bool = True) -> Collected:
    """Run the profiling pass over `texts` in this process (the local executor) and return the values."""
    return finish(Profiler(model, tokenizer, cfg).run(texts, 0, progress=progress))


def experts_frame(c: Collected) -> pd.DataFrame:
    """experts.parquet: one row per (layer, expert); share = tokens / (n_tokens * k)."""
    L, E = len(c.layer_indices), c.spec.n_experts
    k = c.spec.top_k
    tokens = c.counts.tokens.view(L, E).numpy().round().astype(np.int64)
    df = pd.DataFrame(
        {
            "layer": np.repeat(np.arange(L), E).astype(np.int32),
            "layer_index": np.repeat(c.layer_indices, E).astype(np.int32),
            "expert": np.tile(np.arange(E), L).astype(np.int32),
            "tokens": tokens.reshape(-1),
            "share": (tokens / max(c.counts.n_tokens * k, 1)).reshape(-1),
            "weight_mass": c.counts.weight_mass.numpy(),
            **{name: v.reshape(-1) for name, v in c.margins.frame().items()},
            "weight_error": c.weight_error.reshape(-1),
            "reroute_rate": c.reroute_rate.reshape(-1),
        }
    )
    df["sensitivity"] = combine(df["weight_error"], df["reroute_rate"])
    return df


def samples_frame(c: Collected, texts: list[str], ids: list[str], domains: list[str], source: str) -> pd.DataFrame:
    """samples.parquet: per input sample its real tokens and sparse (layer, expert) key counts."""
    s = c.counts.samples
    return pd.DataFrame(
        {
            "sample_id": ids,
            "text": texts,
            "source": source,
            "domain": domains,
            "n_tokens": np.array([r.n_tokens for r in s], np.int64),
            "keys": [r.keys.astype(np.int32) for r in s],
            "counts": [r.counts.astype(np.int32) for r in s],
        }
    )


def profile_texts(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    out: Path | str,
    *,
    cfg: ProfileConfig | None = None,
    ids: list[str] | None = None,
    domains: list[str] | None = None,
    source: str = "seed",
    origin: str = "texts",
    progress: bool = True,
) -> Path:
    """Profile `texts` on a loaded model and write the full profile DIR (same outputs as `pascal profile`).

    `cfg` supplies seq_len, batch_size, scheme, trigger settings (its `out` is replaced by `out`);
    `source` fills samples.parquet's source column (seed|synthetic|self).
    """
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or "model"
    cfg = replace(cfg, out=str(out)) if cfg is not None else ProfileConfig(model=name, out=str(out))
    check_settings(cfg)
    if not texts:
        raise PascalError("no texts to profile: pass at least one non-empty text")
    ids = ids if ids is not None else [f"{source}-{i}" for i in range(len(texts))]
    domains = domains if domains is not None else ["unknown"] * len(texts)
    t0 = time.perf_counter()
    c = collect(model, tokenizer, texts, cfg, progress=progress)
    return write_profile(c, tokenizer, texts, out, cfg, ids, domains, source, origin, t0)


def write_profile(
    c: Collected,
    tokenizer,
    texts: list[str],
    out: Path | str,
    cfg: ProfileConfig,
    ids: list[str],
    domains: list[str],
    source: str,
    origin: str,
    t0: float,
) -> Path:
    """Write experts/samples/triggers Parquet, report.md and profile.json (last) for a collected pass."""
    experts = experts_frame(c)
    samples = samples_frame(c, texts, ids, domains, source)
    triggers = c.triggers.frame(tokenizer, cfg.min_token_count, cfg.top_triggers)
    spec = c.spec
    meta = {
        "model": cfg.model,
        "model_fingerprint": fingerprint_model(cfg.model, cfg.revision),
        "model_commit": pinned_commit(cfg.model, cfg.revision),  # a hub model's pinned commit; balance loads it
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "data": origin,
        "data_fingerprint": fingerprint_texts(texts),
        "settings": asdict(cfg),
        "versions": versions(),
        "n_layers": len(c.layer_indices),
        "layer_indices": c.layer_indices,
        "n_experts": spec.n_experts,
        "top_k": spec.top_k,
        "routing": spec.kind,
        "seq_len": cfg.seq_len,
        "scheme": parse_scheme(cfg.scheme).name,
        "totals": {"samples": len(texts), "tokens": c.counts.n_tokens, "routed": c.counts.n_tokens * spec.top_k},
        "layer_jaccard": c.layer_jaccard,
        "layer_reroute": c.layer_reroute,
        "seconds": {**c.seconds, "total": round(time.perf_counter() - t0, 3)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(out)
    write_parquet(experts, out / "experts.parquet")
    write_parquet(samples, out / "samples.parquet")
    write_parquet(triggers, out / "triggers.parquet")
    write_report(out, experts, triggers, meta)
    write_json(meta, out / "profile.json")  # last: its presence marks a complete profile
    return out


def first_tokens(data: TextSet, tokenizer, max_tokens: int, seq_len: int) -> TextSet:
    """The leading samples that hold `max_tokens` tokens (each counted up to `seq_len`, as profiled)."""
    total, n = 0, 0
    for start in range(0, len(data.texts), 512):  # tokenize in chunks: a big pool stops early
        chunk = data.texts[start : start + 512]
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            if total >= max_tokens:
                break
            total, n = total + min(len(ids), seq_len), n + 1
        if total >= max_tokens:
            break
    return TextSet(data.texts[:n], data.ids[:n], data.domains[:n], data.origin)


def run(cfg: ProfileConfig) -> Path:
    """`pascal profile`: load data and model, profile, write DIR; returns DIR."""
    check_settings(cfg)
    split = cfg.split if cfg.split is not None else ("train" if cfg.data is None else None)
    data = load_texts(cfg.data, cfg.text_column, cfg.max_samples, split=split, max_tokens=cfg.max_tokens)
    tokenizer = load_tokenizer(cfg.model, cfg.revision)
    if cfg.max_tokens is not None:
        data = first_tokens(data, tokenizer, cfg.max_tokens, cfg.seq_len)
    if cfg.executor == "ray":
        from pascal_moe.executor.ray_pool import collect_ray

        if not data.texts:
            raise PascalError("no texts to profile: pass at least one non-empty text")
        t0 = time.perf_counter()
        c = finish(collect_ray(cfg, data.texts))
        out = write_profile(c, tokenizer, data.texts, cfg.out, cfg, data.ids, data.domains, "seed", data.origin, t0)
        shutil.rmtree(out / "shards", ignore_errors=True)  # merged and written: the partial results are spent
        print(f"profile written to {out}")
        return out
    model = load_model(cfg.model, cfg.device, cfg.dtype, cfg.max_memory, cfg.offload_dir, revision=cfg.revision)
    moe_layers(model)  # unsupported / dense architecture: one line before any work
    check_seq_len(cfg.seq_len, model)
    if not data.texts:
        raise PascalError("no texts to profile: pass at least one non-empty text")
    t0 = time.perf_counter()
    c = collect(model, tokenizer, data.texts, cfg)
    del model  # the forwards are done: the model (and its last streamed block) goes before the frames and plots
    release_memory()
    out = write_profile(c, tokenizer, data.texts, cfg.out, cfg, data.ids, data.domains, "seed", data.origin, t0)
    print(f"profile written to {out}")
    return out
