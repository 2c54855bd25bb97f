"""The plan a preflight prints: stages, token budget, sizes, and a time estimate per stage.

Estimates come from RATES, measured on this project's machines (how: below), scaled by the model's
*active* parameters: seconds ≈ tokens × active params × passes / rate.  They are rough (±2× on the
machine measured; other hardware scales with its matmul speed) and meant to tell minutes from hours.

RATES, in active-parameter-tokens per second (a forward pass over T tokens of a model with A
active parameters costs T × A of them), measured on the 2-core development machine (shared with
other jobs), OMP_NUM_THREADS=1, on the bundled Qwen3-MoE (1.32M active parameters):
- cpu forward 8.1e9: `pascal profile --model data/models/qwen3-moe-tiny --max-samples 400 --seq-len 256
  --no-sensitivity --device cpu` routed 6,173 tokens/s;
- cpu decode 6.6e8: `pascal synthesize --agent self --rounds 1 --samples-per-target 4 --seq-len 256` on
  that profile wrote 44 passages × 96 tokens × beam 4 in ≈34 s (42 s wall minus model loading);
- cuda: not measured in this project; assumed 100× cpu (the plan says "assumed").
A tiny model is overhead-bound, so these rates under-state large models' speed: read estimates as
upper bounds.  Seed documents are counted at min(seq_len, mean characters / 3.3) tokens (3.3
characters per token: the bundled byte-level BPE on the bundled corpus) when the data is Parquet.
Sensitivity adds 0.94 of a forward (benchmarks/profile_overhead.py); SignRound costs ≈ 3 forwards
per step (forward + backward); balance takes 22.1 CPU-s per 100,000 candidates × 6,144 experts at
real routing density, reading the Parquet counts included (benchmarks/balance_scale.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RATES = {"cpu": {"forward": 8.1e9, "decode": 6.6e8}, "cuda": {"forward": 8.1e11, "decode": 6.6e10}}
CHARS_PER_TOKEN = 3.3
MEASURED = {"cpu": True, "cuda": False}
SENSITIVITY_PASSES = 0.94
SIGNROUND_PASSES_PER_STEP = 3.0
BALANCE_S_PER_CAND_EXPERT = 22.1 / (100_000 * 6_144)


@dataclass(slots=True)
class Step:
    """One row of the plan."""

    stage: str
    what: str
    tokens: int | None = None
    seconds: float | None = None


def device_kind(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else "cpu"


def _secs(tokens: float, active: int, passes: float, kind: str, rate: str = "forward") -> float | None:
    return tokens * active * passes / RATES[kind][rate] if active else None


def data_stats(data: str | None, text_column: str, split: str | None) -> tuple[int, float] | None:
    """(documents, mean characters) of Parquet seed text, read from the text column only; None otherwise."""
    from pathlib import Path

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pascal_moe.errors import PascalError
    from pascal_moe.io.bundled import bundled_seed

    try:
        p = Path(data) if data else bundled_seed()
    except PascalError:  # check_data reports missing bundled data
        return None
    if p.suffix != ".parquet" or not p.is_file():
        return None
    try:
        cols = [text_column] + (["split"] if split and "split" in pq.read_schema(p).names else [])
        t = pq.read_table(p, columns=cols)
    except (OSError, ValueError, KeyError):  # check_data reports unreadable files
        return None
    if len(cols) > 1:
        t = t.filter(pc.equal(t["split"], split))
    return (t.num_rows, pc.mean(pc.utf8_length(t[text_column])).as_py() or 0.0) if t.num_rows else None


def profile_size(cfg: Any) -> tuple[int | None, int, int | None, bool]:
    """(samples, tokens per sample, tokens, whether estimated from the data) a profile will read."""
    stats = data_stats(cfg.data, cfg.text_column, cfg.split)
    docs = min(cfg.max_samples or stats[0], stats[0]) if stats else cfg.max_samples
    per_doc = min(cfg.seq_len, int(stats[1] / CHARS_PER_TOKEN)) if stats else cfg.seq_len
    tokens = docs * per_doc if docs else None
    cap = getattr(cfg, "max_tokens", None)
    if cap is not None and (tokens is None or tokens > cap):  # a pool sized in tokens stops early
        tokens, docs = cap, (max(1, cap // per_doc) if per_doc else docs)
    return docs, per_doc, tokens, stats is not None


def profile_step(cfg: Any, active: int, name: str = "profile") -> Step:
    docs, per_doc, tokens, estimated = profile_size(cfg)
    passes = 1 + (SENSITIVITY_PASSES if cfg.sensitivity else 0)
    what = f"{docs or 'all'} samples × {'≈' if estimated else '≤'}{per_doc} tokens" + (
        ", + sensitivity pass" if cfg.sensitivity else ""
    )
    return Step(name, what, tokens, _secs(tokens, active, passes, device_kind(cfg.device)) if tokens else None)


def synth_step(cfg: Any, active: int, agent: str, n_experts: int) -> Step:
    sens = min(cfg.top_sensitive, n_experts) if n_experts else cfg.top_sensitive
    groups = max(1, -(-sens // cfg.group_size)) if "sensitive" in cfg.targets else 1  # + starved groups, unknown yet
    passages = cfg.rounds * groups * cfg.samples_per_target
    kind = device_kind(cfg.device)
    verify = passages * cfg.seq_len
    secs = _secs(verify, active, 1, kind)
    what = f"≈{passages} passages ({cfg.rounds} rounds × ≥{groups} target groups × {cfg.samples_per_target})"
    if agent == "self" and secs is not None:
        secs += _secs(passages * cfg.self_tokens * cfg.self_width, active, 1, kind, "decode") or 0
    elif agent != "self":
        what += "; agent time depends on the endpoint (not included)"
    return Step("synthesize", what, verify, secs)


def balance_step(cfg: Any, pool: int | None, n_experts_total: int) -> Step:
    budget = getattr(cfg, "tokens", None)
    size = f"{budget:,} tokens" if budget else "? tokens"
    secs = max(1.0, (pool or 0) * n_experts_total * BALANCE_S_PER_CAND_EXPERT) if pool else None
    return Step("balance", f"select {size} × {cfg.seq_len} from ≈{pool or '?'} candidates", budget, secs)


def quantize_step(cfg: Any, active: int, params: int, bits: int) -> Step:
    tokens = cfg.n_samples * cfg.seq_len if getattr(cfg, "n_samples", None) else getattr(cfg, "tokens", None)
    passes = 2 + (0 if cfg.method == "rtn" else cfg.iters * SIGNROUND_PASSES_PER_STEP)
    size = f"; writes ≈{params * bits / 8 / 1e9:.2f} GB" if params else ""
    return Step(
        "quantize",
        f"{cfg.method}, {cfg.iters} steps per block{size}",
        tokens,
        _secs(tokens, active, passes, device_kind(cfg.device)) if tokens else None,
    )


def eval_step(cfg: Any, active: int) -> Step:
    models = 1 + len(cfg.quantized)
    gen = cfg.prompts * (cfg.prompt_tokens + cfg.generate_tokens) * cfg.generate_tokens / 2
    return Step(
        "eval",
        f"{models} model(s) × {cfg.max_tokens:,} tokens + {cfg.prompts} generations",
        cfg.max_tokens * models,
        _secs(cfg.max_tokens * models + gen * models, active, 1, device_kind(cfg.device)),
    )


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
