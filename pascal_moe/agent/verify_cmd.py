"""`pascal verify`: judge externally produced synthetic text with the synthesize stage's screen and router check.

Why: synthetic data from elsewhere (PASCAL's Data Designer stage, another generator, a
hand-written set) deserves the same checks as the agent's own passages.  Each row is
screened (verify.screen: degenerate text, then screen.py's quality checks) and, when it
passes, routed through the model and judged against all target experts of the profile
(starved and sensitive, as `synthesize` picks them).  verified.parquet holds the
synthetic.parquet columns (so `pascal balance --candidates V/verified.parquet` can use
it) plus `quality_ok`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console

from pascal_moe.agent.config import VerifyConfig
from pascal_moe.agent.dedup import NearDuplicates
from pascal_moe.agent.passes import model_passes
from pascal_moe.agent.perplexity import PerplexityBound
from pascal_moe.agent.targets import expert_id, load_profile, pick_targets
from pascal_moe.agent.verify import Rejections, verify
from pascal_moe.errors import PascalError
from pascal_moe.executor import check_executor
from pascal_moe.io.artifacts import write_json, write_parquet
from pascal_moe.io.batches import check_seq_len
from pascal_moe.io.texts import load_texts

console = Console(stderr=True)


def _seed_texts(profile) -> list[str]:
    seed = profile.seed_samples()
    return seed["text"].astype(str).tolist() if "text" in seed.columns else []


def run(cfg: VerifyConfig) -> Path:
    """Screen and route every candidate; write verified.parquet and verify.json; returns the Parquet path."""
    if cfg.accept_ratio <= 0:
        raise PascalError(f"--accept-ratio must be positive (got {cfg.accept_ratio})")
    check_executor(cfg)
    profile = load_profile(cfg.profile)
    if not Path(cfg.candidates).exists():
        raise PascalError(f"candidates not found: {cfg.candidates}")
    texts = load_texts(cfg.candidates, cfg.text_column)
    targets = pick_targets(profile, cfg.targets, cfg.starved_ratio, cfg.top_sensitive)
    if not targets:
        raise PascalError(f"no target experts in {cfg.profile} under --targets {cfg.targets}: widen the selection")
    keys = [t.key for t in targets]
    seed_keys, seed_total = profile.seed_key_tokens()
    baseline = float(seed_keys[keys].sum() / max(seed_total, 1))
    model = tok = None
    if cfg.executor == "local":  # on Ray the actors load the model (and check --seq-len against it)
        from pascal_moe.models.loading import load_model, load_tokenizer

        model, tok = (
            load_model(cfg.model, cfg.device, cfg.dtype, cfg.max_memory, cfg.offload_dir, revision=cfg.revision),
            load_tokenizer(cfg.model, cfg.revision),
        )
        check_seq_len(cfg.seq_len, model)
    passes = model_passes(cfg, model, tok)
    rejections = Rejections()
    seed = _seed_texts(profile)
    ppl = (
        PerplexityBound.from_nll(*passes.nll(seed[:: max(1, len(seed) // 256)]), cfg.ppl_percentile)
        if cfg.ppl_percentile > 0 and seed
        else None
    )
    measured = verify(
        texts.texts,
        [keys] * len(texts.texts),
        [baseline] * len(texts.texts),
        model,
        tok,
        accept_ratio=cfg.accept_ratio,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        rejections=rejections,
        pool=NearDuplicates(seed),
        ppl=ppl,
        passes=passes,
    )
    ids = [expert_id(t.layer, t.expert) for t in targets]
    rows = [
        {
            "sample_id": "ver-" + hashlib.sha256(t.encode()).hexdigest()[:16],
            "text": t,
            "source": "verified",
            "targets": ids,
            "domain": d,
            "quality_ok": m.n_tokens > 0,
            **asdict(m),
        }
        for t, d, m in zip(texts.texts, texts.domains, measured)
    ]
    df = pd.DataFrame(rows)
    for col in ("keys", "counts"):
        df[col] = [np.asarray(v, dtype=np.int32) for v in df[col]]
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_parquet(df, out / "verified.parquet")
    summary = {
        "candidates": len(df),
        "quality_ok": int(df["quality_ok"].sum()),
        "accepted": int(df["accepted"].sum()),
        "rejected_by_reason": dict(Counter(rejections.counts)),
        "targets": ids,
        "baseline_rate": baseline,
        "accept_threshold": cfg.accept_ratio * baseline,
    }
    write_json(summary, out / "verify.json")
    console.print(
        f"verify: {summary['quality_ok']} of {len(df)} pass the screen, {summary['accepted']} accepted "
        f"-> {out / 'verified.parquet'}"
    )
    return out / "verified.parquet"
