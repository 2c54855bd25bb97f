"""Train the bundled tiny MoE models (softmax Qwen3-MoE and sigmoid DeepSeek-V3).

Why: every stage of pascal-moe must be measured on models whose routing is real
(learnt, uneven, no dead expert), and no hub is reachable.  This seeded script
trains a byte-level BPE tokenizer on the seed corpus, then a tiny MoE of each
router kind for a fixed CPU-time budget, and writes a standard
`save_pretrained` directory plus a model card (`README.md`, `card.json`).

    python data/build/train.py --arch qwen3_moe --out data/models/qwen3-moe-tiny --minutes 40
    python data/build/train.py --arch deepseek_v3 --out data/models/deepseek-v3-tiny --minutes 40
    python data/build/train.py --arch qwen3_moe_fine --out data/models/qwen3-moe-fine --cpu-minutes 75

`--cpu-minutes` budgets the process's CPU time instead of wall-clock time, so a run on a busy machine
still sees the compute it was given (and the card says how many tokens that was).

Load balancing is deliberately weak (Switch-style auxiliary loss with a small
coefficient; for DeepSeek-V3 also a slow aux-loss-free bias update of
`e_score_correction_bias`) so that routing stays uneven, as in real MoEs, while
no expert dies.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]  # <checkout>/data/build/train.py -> <checkout>
if str(ROOT) not in sys.path:  # a build script run from the checkout uses the checkout's own package
    sys.path.insert(0, str(ROOT))

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: list[str], out: Path, vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token=None,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


ARCHS = ("qwen3_moe", "deepseek_v3", "qwen3_moe_fine")


def model_config(arch: str, vocab_size: int, tok):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common,
            num_hidden_layers=4,
            intermediate_size=512,
            moe_intermediate_size=192,
            num_experts=16,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=32,
            router_aux_loss_coef=0.0,
            output_router_logits=False,
        )
    if arch == "deepseek_v3":
        from transformers import DeepseekV3Config

        common["num_key_value_heads"] = 4  # MLA has no grouped KV heads
        return DeepseekV3Config(
            **common,
            num_hidden_layers=5,
            first_k_dense_replace=1,
            intermediate_size=384,
            moe_intermediate_size=128,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            q_lora_rank=96,
            kv_lora_rank=64,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
        )
    if arch == "qwen3_moe_fine":  # Qwen3-30B-A3B's routing geometry in miniature: many narrow experts, top-8
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common,
            num_hidden_layers=6,
            intermediate_size=512,
            moe_intermediate_size=64,
            num_experts=64,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            head_dim=32,
            router_aux_loss_coef=0.0,
            output_router_logits=False,
        )
    raise SystemExit(f"unknown --arch {arch!r}: use {', '.join(ARCHS)}")


def pack(texts: list[str], tok, seq_len: int) -> torch.Tensor:
    """Training rows [n, seq_len]: every text followed by EOS, packed by `pack_windows`, the short tail dropped."""
    from pascal_moe.io.batches import pack_windows  # after ROOT is on sys.path

    windows = pack_windows([tok(t)["input_ids"] + [tok.eos_token_id] for t in texts], seq_len, None).windows
    return torch.tensor([w for w in windows if len(w) == seq_len], dtype=torch.long).view(-1, seq_len)


class RouterStats:
    """Forward hooks on every gate: collects (logits, indices) for the balance loss and usage counts."""

    def __init__(self, model, sigmoid: bool):
        self.sigmoid = sigmoid
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        self.handles = [g.register_forward_hook(self._hook) for g in self.gates]

    def _hook(self, module, args, out):
        self.calls.append((out[0], out[2]))

    def balance_loss(self) -> torch.Tensor:
        """Switch-Transformer loss E * sum_e f_e * P_e, averaged over MoE layers."""
        losses = []
        for logits, idx in self.calls:  # logits [N, E], idx [N, k]
            E = logits.shape[-1]
            p = torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, -1)
            p = p / p.sum(-1, keepdim=True)
            f = torch.zeros(E).index_add_(0, idx.reshape(-1), torch.ones(idx.numel())) / idx.numel()
            losses.append(E * (f.detach() * p.mean(0)).sum())
        self.calls.clear()
        return torch.stack(losses).mean()


@torch.no_grad()
def evaluate(model, data: torch.Tensor, stats: RouterStats, batch: int = 16) -> tuple[float, list[list[int]]]:
    model.eval()
    nll, n = 0.0, 0
    usage = [[0] * stats.gates[0].weight.shape[0] for _ in stats.gates]
    for i in range(0, len(data), batch):
        x = data[i : i + batch]
        out = model(input_ids=x, labels=x)
        nll += out.loss.item() * x.numel()
        n += x.numel()
        for layer, (_, idx) in enumerate(stats.calls):
            for e, c in Counter(idx.reshape(-1).tolist()).items():
                usage[layer][e] += c
        stats.calls.clear()
    model.train()
    return math.exp(nll / n), usage


def unigram_ppl(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    """Perplexity of an add-one unigram model fitted on the held-out text itself (the issue's yardstick)."""
    counts = torch.bincount(held.reshape(-1), minlength=vocab).double() + 1
    p = counts / counts.sum()
    return math.exp(-(torch.log(p[held.reshape(-1)])).mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description="train a bundled tiny MoE")
    ap.add_argument("--arch", required=True, choices=list(ARCHS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=Path("data/seed/seed.parquet"))
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget")
    ap.add_argument("--cpu-minutes", type=float, default=None, help="CPU-time budget (overrides --minutes)")
    ap.add_argument("--bf16", action="store_true", help="store the weights in bfloat16 (halves the file)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--balance-coef", type=float, default=0.01)
    ap.add_argument("--bias-speed", type=float, default=2e-4, help="DeepSeek aux-free bias update per step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(a.threads)
    df = pd.read_parquet(a.corpus)
    train_texts = df[df.split == "train"].text.tolist()
    held_texts = df[df.split == "heldout"].text.tolist()
    a.out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_texts, a.out)

    from transformers import AutoModelForCausalLM

    cfg = model_config(a.arch, len(tok), tok)
    model = AutoModelForCausalLM.from_config(cfg)
    sigmoid = a.arch == "deepseek_v3"  # qwen3_moe_fine: softmax, like qwen3_moe
    stats = RouterStats(model, sigmoid)
    train = pack(train_texts, tok, a.seq_len)
    held = pack(held_texts, tok, a.seq_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{a.arch}: {n_params / 1e6:.2f}M params, {train.numel() / 1e6:.2f}M train tokens, "
        f"{held.numel() / 1e3:.0f}k held-out tokens",
        flush=True,
    )

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1, betas=(0.9, 0.95))
    # The learning-rate schedule runs on wall-clock time, not steps: on a shared 2-core machine the step rate
    # varies several-fold, and a time-based cosine still anneals fully by the end of the budget.
    use_cpu = a.cpu_minutes is not None
    clock = time.process_time if use_cpu else time.time
    budget, t0, step, warm = (a.cpu_minutes if use_cpu else a.minutes) * 60, clock(), 0, 50
    wall0 = time.time()
    log = []
    g = torch.Generator().manual_seed(a.seed)
    while True:
        progress = (clock() - t0) / budget
        if progress >= 1.0:
            break
        idx = torch.randint(0, len(train), (a.batch,), generator=g)
        x = train[idx]
        lr = a.lr * min(1.0, (step + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        out = model(input_ids=x, labels=x)
        if sigmoid and a.bias_speed > 0:
            with torch.no_grad():  # aux-loss-free balancing (DeepSeek-V3): nudge bias toward mean load
                for gate, (_, ind) in zip(stats.gates, stats.calls):
                    load = torch.bincount(ind.reshape(-1), minlength=gate.e_score_correction_bias.numel()).float()
                    gate.e_score_correction_bias += a.bias_speed * torch.sign(load.mean() - load)
        bal = stats.balance_loss()
        loss = out.loss + a.balance_coef * bal
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(
                f"step {step} loss {out.loss.item():.3f} bal {bal.item():.3f} lr {lr:.2e} "
                f"{(clock() - t0) / 60:.1f} {'CPU-' if use_cpu else ''}min",
                flush=True,
            )
        if step % 250 == 0:
            ppl, _ = evaluate(model, held[:64], stats)
            log.append({"step": step, "tokens": step * a.batch * a.seq_len, "heldout_ppl": ppl})
            print(f"  held-out ppl (64 seqs) {ppl:.2f}", flush=True)

    ppl, usage = evaluate(model, held, stats)
    for h in stats.handles:
        h.remove()
    if a.bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(a.out, safe_serialization=True)
    spread = [
        {
            "layer": i,
            "min": min(u),
            "max": max(u),
            "dead": sum(c == 0 for c in u),
            "max_over_min": (max(u) / min(u)) if min(u) else float("inf"),
        }
        for i, u in enumerate(usage)
    ]
    card = {
        "arch": a.arch,
        "routing": "sigmoid" if sigmoid else "softmax",
        "params": n_params,
        "config": model.config.to_diff_dict(),
        "steps": step,
        "tokens_seen": step * a.batch * a.seq_len,
        "train_minutes": (time.time() - wall0) / 60,
        "train_cpu_minutes": (time.process_time() / 60) if use_cpu else None,
        "heldout_tokens": held.numel(),
        "heldout_ppl": ppl,
        "heldout_unigram_ppl": unigram_ppl(train, held, len(tok)),
        "expert_usage_spread": spread,
        "expert_usage": usage,
        "curve": log,
        "args": {k: str(v) for k, v in vars(a).items()},
        "torch": torch.__version__,
    }
    (a.out / "card.json").write_text(json.dumps(card, indent=1))
    print(json.dumps({k: card[k] for k in ("heldout_ppl", "heldout_unigram_ppl", "tokens_seen")}))
    print(spread)


if __name__ == "__main__":
    main()
