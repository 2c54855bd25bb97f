"""Render a bundled model's `README.md` model card from its `card.json` and `config.json`.

python data/build/card.py data/models/qwen3-moe-tiny
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "moe_intermediate_size",
    "num_experts",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "first_k_dense_replace",
    "norm_topk_prob",
    "routed_scaling_factor",
    "tie_word_embeddings",
)


def render(model_dir: Path) -> str:
    card = json.loads((model_dir / "card.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    args = card["args"]
    lines = [
        f"# {model_dir.name}",
        "",
        f"A tiny, trained {cfg['model_type']} Mixture-of-Experts model with a **{card['routing']}** router, "
        "bundled with pascal-moe so that every stage runs on real, learnt routing without a model hub.",
        "",
        "## Config",
        "",
        "| key | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {cfg[k]} |" for k in KEYS if k in cfg]
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    storage = "bfloat16" if args.get("bf16") == "True" else "float32"
    cpu = card.get("train_cpu_minutes")
    budget = (
        f"--cpu-minutes {args['cpu_minutes']}"
        if args.get("cpu_minutes") not in (None, "None")
        else f"--minutes {args['minutes']}"
    )
    spent = (
        f"{cpu:.1f} CPU-minutes ({card['train_minutes']:.1f} min wall-clock on a shared machine)"
        if cpu
        else f"{card['train_minutes']:.1f} min of CPU"
    )
    lines += [
        "",
        "## Training",
        "",
        f"- parameters: {card['params']:,} ({weights / 2**20:.1f} MiB of {storage} safetensors)",
        f"- data: `data/seed/seed.parquet` train split, packed into {args['seq_len']}-token rows; "
        f"byte-level BPE tokenizer ({cfg['vocab_size']} tokens) trained on the same text",
        f"- steps: {card['steps']:,} of batch {args['batch']} x {args['seq_len']} = "
        f"{card['tokens_seen']:,} tokens seen in {spent}",
        f"- optimiser: AdamW lr {args['lr']}, {'CPU-time' if cpu else 'wall-clock'} cosine schedule, "
        f"weight decay 0.1, seed {args['seed']}",
        f"- load balancing: Switch auxiliary loss x {args['balance_coef']}"
        + (f", aux-loss-free bias update {args['bias_speed']}/step" if card["routing"] == "sigmoid" else ""),
        f"- command: `python data/build/train.py --arch {card['arch']} --out {model_dir} "
        f"{budget} --threads {args['threads']} --balance-coef {args['balance_coef']}"
        + (" --bf16" if storage == "bfloat16" else "")
        + (f" --bias-speed {args['bias_speed']}" if card["routing"] == "sigmoid" else "")
        + "`",
        "",
        "## Held-out quality",
        "",
        f"- perplexity on the held-out split ({card['heldout_tokens']:,} tokens): **{card['heldout_ppl']:.1f}**",
        f"- a unigram model fitted on that very text: {card['heldout_unigram_ppl']:.1f}",
        "",
        "## Expert usage on held-out text (tokens with the expert in their top-k)",
        "",
        "| MoE layer | min | max | max/min | dead experts |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {s['layer']} | {s['min']:,} | {s['max']:,} | {s['max_over_min']:.1f} | {s['dead']} |"
        for s in card["expert_usage_spread"]
    ]
    lines += [
        "",
        "Training curve (held-out perplexity on 64 rows): "
        + ", ".join(
            f"step {c['step']} ({c['tokens'] / 1e6:.1f}M tokens): {c['heldout_ppl']:.1f}" for c in card["curve"]
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    for d in sys.argv[1:]:
        (Path(d) / "README.md").write_text(render(Path(d)))
        print(f"wrote {d}/README.md")
