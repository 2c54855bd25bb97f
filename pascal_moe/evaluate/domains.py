"""Per-domain evaluation: the same metrics on the held-out texts of each domain separately.

Why: a model calibrated on one kind of text (prose, the WikiText/C4 habit) and served on
others (code, math, dialogue) degrades unevenly; a mixed held-out score hides where.
Each domain gets its own windows (up to `--max-tokens` each, so a small domain is not
drowned by a large one) from the held-out texts whose `domain` column names it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from pascal_moe.errors import PascalError
from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.evaluate.metrics import PairStats
from pascal_moe.io.texts import load_texts


def parse(spec: str | None) -> list[str]:
    """'prose, code' -> ['prose', 'code']; None or '' -> [] (mixed only)."""
    return [d.strip() for d in (spec or "").split(",") if d.strip()]


def texts_by_domain(cfg: EvalConfig) -> dict[str, list[str]]:
    """Held-out texts of each domain named in --domains ('all' = every domain present), each shuffled with --seed."""
    wanted = parse(cfg.domains)
    ts = load_texts(cfg.data, cfg.text_column, split="heldout" if cfg.data is None else None)
    present = sorted(set(ts.domains) - {"unknown"})
    if not present:
        raise PascalError(
            f"--domains needs a `domain` column in the held-out data ({ts.origin} has none): "
            "drop --domains or pass data with one"
        )
    if wanted == ["all"]:
        wanted = present
    missing = [d for d in wanted if d not in present]
    if missing:
        raise PascalError(f"no held-out text in domain(s) {', '.join(missing)}: known are {', '.join(present)}")
    out = {}
    for d in wanted:
        texts = [t for t, dom in zip(ts.texts, ts.domains) if dom == d]
        random.Random(cfg.seed).shuffle(texts)
        out[d] = texts
    return out


def domain_windows(tokenizer, cfg: EvalConfig, windows: Callable) -> dict[str, list[list[int]]]:
    """Windows of each domain, built exactly like the mixed ones (EOS-joined, non-overlapping)."""
    return {d: windows(tokenizer, texts, cfg.seq_len, cfg.max_tokens) for d, texts in texts_by_domain(cfg).items()}


def rows(label: str, domain: str, st: PairStats) -> dict:
    """One eval.json `domains` row: a quantized model's metrics on one domain."""
    return {
        "model": label,
        "domain": domain,
        "ppl_fp": st.ppl_fp,
        "ppl": st.ppl_q,
        "delta_ppl": st.ppl_q - st.ppl_fp,
        "kl": st.kl,
        "jaccard": st.mean_jaccard,
        "layer_jaccard": st.layer_jaccard,
        "tokens": st.n_pred,
    }


def table(domain_rows: list[dict]) -> str:
    """Markdown: one row per (model, domain)."""
    lines = [
        "| model | domain | tokens | fp ppl | ppl | Δppl | mean Jaccard | KL(fp‖q) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in domain_rows:
        lines.append(
            f"| {r['model']} | {r['domain']} | {r['tokens']} | {r['ppl_fp']:.3f} | {r['ppl']:.3f} | "
            f"{r['delta_ppl']:.3f} | {r['jaccard']:.4f} | {r['kl']:.5f} |"
        )
    return "\n".join(lines)
