"""`report.md` of an evaluation: one table a reader can compare methods with, plus how it was produced."""

from __future__ import annotations

import shlex
from pathlib import Path

from pascal_moe.evaluate import domains
from pascal_moe.io.artifacts import write_text


def _fmt(v: object, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(summary: list[dict]) -> str:
    """Markdown table: model, method, scheme, ppl, Δppl, mean Jaccard, KL, generation agreement."""
    lines = [
        "| model | method | scheme | ppl | Δppl | mean Jaccard | KL(fp‖q) | gen agreement |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['scheme']} | {_fmt(r['ppl'], 3)} | "
            f"{_fmt(r['delta_ppl'], 3)} | {_fmt(r['jaccard'])} | {_fmt(r['kl'])} | {_fmt(r['gen_agreement'])} |"
        )
    return "\n".join(lines)


def command(settings: dict) -> str:
    """The `pascal eval` command line that reproduces these settings."""
    parts = ["pascal", "eval"]
    for k, v in settings.items():
        flag = "--" + k.replace("_", "-")
        if v is None:
            continue
        for item in v if isinstance(v, list) else [v]:
            parts += [flag, str(item)]
    return shlex.join(parts)


def write(path: Path, summary: list[dict], meta: dict, pngs: list[str]) -> Path:
    s = meta["settings"]
    vers = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    body = [
        "# Evaluation vs the full-precision model",
        "",
        f"Held-out data: `{meta['data']}` ({meta['tokens']} tokens in {meta['windows']} windows of {s['seq_len']}; "
        f"{meta['prompts']} prompts x {s['generate_tokens']} greedy tokens for generation agreement).",
        "",
        table(summary),
        "",
        *(
            [
                "Per domain (each on its own held-out windows, up to --max-tokens each):",
                "",
                domains.table(meta["domains"]),
                "",
            ]
            if meta.get("domains")
            else []
        ),
        "- ppl: exp(mean next-token NLL) over non-overlapping windows, padding excluded.",
        "- mean Jaccard: |top-k_fp ∩ top-k_q| / |top-k_fp ∪ top-k_q| per token, averaged over tokens then MoE layers; "
        "each model routes on its own hidden states for the same input ids.",
        "- KL: mean over tokens of KL(p_fp ‖ p_q) of the next-token distribution.",
        "- gen agreement: share of identical tokens when both models greedily continue the same prompts.",
        "",
        "Per-layer Jaccard and every metric are in `eval.parquet` (long format: model, path, method, scheme, metric, "
        "layer, value; layer -1 = whole model).",
        "",
        *[f"![{p}]({p})" for p in pngs],
        "",
        "Reproduce:",
        "",
        "```",
        command(s),
        "```",
        "",
        f"Versions: {vers}; torch threads {meta['threads']}; {meta['seconds']} s.",
        "",
    ]
    return write_text("\n".join(body), path)
