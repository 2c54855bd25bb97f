"""The three bundled trained MoEs are real language models with real (uneven, alive) routing.

Shape legend: S windows, T tokens per window, V vocabulary, E experts, k experts per token.

Why: every behaviour test and the demo pipeline lean on these models; if one is
undertrained (no better than token frequencies), has dead experts, or routes
uniformly, calibration balancing and router-aligned quantization have nothing to show.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from pascal_moe.models import moe_layers
from pascal_moe.profile.capture import expert_totals

WINDOW = 256  # tokens per forward window
PPL_TOKENS = 4096  # held-out English prose scored for perplexity
ROUTING_TOKENS = 8192  # held-out tokens (all domains, shuffled) whose routing is counted
MAX_WEIGHTS_BYTES = 30 * 1024 * 1024
CARD_FIELDS = ("config", "params", "tokens_seen", "heldout_ppl", "expert_usage_spread")

# What each bundled model must be (docs/CONTRACTS.md, README): kind, MoE layers, experts, top-k.
SHAPE = {"qwen_dir": ("softmax", 4, 16, 2), "deepseek_dir": ("sigmoid", 4, 16, 4), "fine_dir": ("softmax", 6, 64, 8)}


@pytest.fixture(scope="module", params=sorted(SHAPE))
def bundled(request: pytest.FixtureRequest) -> tuple[str, Path, nn.Module, object]:
    """(fixture name, path, model, tokenizer), loaded with plain transformers as a user would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path: Path = request.getfixturevalue(request.param)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return request.param, path, model, tok


@pytest.fixture(scope="module")
def heldout(seed_parquet: Path) -> pd.DataFrame:
    df = pd.read_parquet(seed_parquet, columns=["doc_id", "text", "domain", "split"])
    return df[df.split == "heldout"].sort_values("doc_id").reset_index(drop=True)


def windows(tok, texts: list[str], n_tokens: int) -> torch.Tensor:
    """Documents joined by EOS, cut into [S, T] windows covering at least `n_tokens` (fewer if the text runs out)."""
    ids: list[int] = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= n_tokens + WINDOW:
            break
    n = min(len(ids) // WINDOW, math.ceil(n_tokens / WINDOW))
    assert n >= 4, "not enough held-out text to score"
    return torch.tensor(ids[: n * WINDOW]).view(n, WINDOW)  # [S, T]


def model_and_unigram_ppl(model: nn.Module, ids: torch.Tensor, vocab: int) -> tuple[float, float]:
    """Perplexity of the model on next-token prediction, and of an add-one unigram fitted on those same targets."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()  # [S, T-1, V]
    targets = ids[:, 1:]  # [S, T-1]
    nll = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).mean().item()
    counts = torch.bincount(targets.reshape(-1), minlength=vocab).double()  # [V]
    p = (counts + 1) / (targets.numel() + vocab)
    unigram_nll = -torch.log(p[targets.reshape(-1)]).mean().item()
    return math.exp(nll), math.exp(unigram_nll)


def test_structure(bundled) -> None:
    name, _, model, _ = bundled
    kind, n_layers, n_experts, top_k = SHAPE[name]
    layers = moe_layers(model)
    assert len(layers) == n_layers
    assert {(layer.spec.kind, layer.spec.n_experts, layer.spec.top_k) for layer in layers} == {(kind, n_experts, top_k)}
    if kind == "sigmoid":
        assert layers[0].layer_index == 1, "DeepSeek's first layer should be dense"
        assert (layers[0].spec.n_group, layers[0].spec.topk_group) == (4, 2)
        assert all(layer.shared is not None for layer in layers)
        assert any(layer.spec.bias.abs().sum() > 0 for layer in layers), "bias never trained"


def test_beats_unigram_on_heldout_prose(bundled, heldout: pd.DataFrame) -> None:
    _, _, model, tok = bundled
    prose = heldout[heldout.domain == "prose"].text.tolist()
    ids = windows(tok, prose, PPL_TOKENS)
    ppl, unigram = model_and_unigram_ppl(model, ids, model.config.vocab_size)
    assert ppl < 0.5 * unigram, f"held-out prose ppl {ppl:.1f} vs unigram {unigram:.1f} on {ids.numel()} tokens"


def test_routing_alive_and_uneven(bundled, heldout: pd.DataFrame) -> None:
    _, _, model, tok = bundled
    layers = moe_layers(model)
    mixed = heldout.sample(frac=1.0, random_state=0).text.tolist()  # every domain, in a fixed shuffled order
    counts = expert_totals(model, windows(tok, mixed, ROUTING_TOKENS).tolist(), batch_size=16)  # [L, E]
    assert (counts.sum(-1) == counts.sum(-1)[0]).all() and counts.sum() > 0
    dead = (counts == 0).nonzero().tolist()
    assert not dead, f"dead experts (MoE layer, expert) on held-out text: {dead}"
    ratio = counts.max(-1).values.double() / counts.min(-1).values.double()  # [L]
    assert (ratio >= 3).sum().item() > len(layers) / 2, f"routing too even: max/min per layer {ratio.tolist()}"


def test_tokenizer_round_trips(bundled, heldout: pd.DataFrame) -> None:
    _, _, _, tok = bundled
    samples = heldout.groupby("domain").head(3).text.tolist()
    samples += ["Ünïcödé, emoji 🙂, tabs\tand\nnewlines  ", "def f(x):\n    return x ** 2  # ok"]
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_weights_small(bundled) -> None:
    _, path, _, _ = bundled
    size = (path / "model.safetensors").stat().st_size
    assert size <= MAX_WEIGHTS_BYTES, f"model.safetensors is {size / 2**20:.1f} MiB (limit 30 MiB)"


def test_card(bundled) -> None:
    _, path, model, _ = bundled
    card = json.loads((path / "card.json").read_text())
    missing = [f for f in CARD_FIELDS if f not in card]
    assert not missing, f"card.json lacks {missing}"
    assert card["params"] == sum(p.numel() for p in model.parameters())
    assert card["tokens_seen"] > 0 and math.isfinite(card["heldout_ppl"]) and card["heldout_ppl"] > 1
    assert len(card["expert_usage_spread"]) == len(moe_layers(model))
