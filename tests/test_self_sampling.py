"""The degenerate-text screen, acceptance, the steered self-sampler, and `--agent self` on both bundled models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pascal_moe.agent import verify as V
from pascal_moe.agent.config import SynthesizeConfig
from pascal_moe.agent.loop import run
from pascal_moe.agent.self_sampling import SelfSampleConfig, SelfSampler, allowed
from pascal_moe.agent.report import coverage_table
from pascal_moe.agent.verify import judge, screen
from pascal_moe.models import moe_layers
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.profile.capture import capture_routing, route_counts

PROSE = (
    "The harbour town grew around a narrow inlet where fishing boats sheltered from winter storms. "
    "Merchants later built stone warehouses along the quay, and by the eighteenth century the port "
    "shipped wool, salted herring and slate to cities across the northern sea. Today most warehouses "
    "hold galleries and cafes, yet a small fleet still lands crab and lobster each morning."
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs the model with one intra-op thread (see conftest)."""


# --- screen -------------------------------------------------------------------


def test_clean_text_passes_every_check():
    assert screen(PROSE) is None


@pytest.mark.parametrize(
    "bad, reason",
    [
        (PROSE[:120] + "\x00" * 40 + PROSE[120:], "control_chars"),  # a NUL run inside otherwise clean text
        (PROSE[:200] + "\x07\x1b" + PROSE[200:], "control_chars"),
        (" ".join(["the cat sat on the mat near the door."] * 12), "repetition"),
        (PROSE[:150] + " " + "=" * 3000 + " " + PROSE[150:], "low_compression"),  # no repeated n-gram, one long run
        ("Too short to be a passage.", "too_short"),
        ("   \n ", "empty"),
        (PROSE[:90] + "\ufffd" + PROSE[90:], "broken_chars"),
    ],
)
def test_screen_names_the_right_reason(bad, reason):
    assert screen(bad) == reason


def test_each_defect_trips_only_its_own_check():
    """The crafted texts are defective in one way only, so a check firing for the wrong reason is caught."""
    cfg = V.ScreenConfig()
    nul = PROSE[:120] + "\x00" * 40 + PROSE[120:]
    run_ = PROSE[:150] + " " + "=" * 3000 + " " + PROSE[150:]
    rep = " ".join(["the cat sat on the mat near the door."] * 12)
    assert V.control_chars(nul) == 40 and V.control_chars(PROSE) == 0 and V.control_chars(run_) == 0
    assert V.repeated_ngram_fraction(run_) <= cfg.max_repeated_ngram_frac  # the run is one word: no n-gram repeats
    assert V.repeated_ngram_fraction(rep) > cfg.max_repeated_ngram_frac
    assert V.compression_ratio(run_) < cfg.min_compression_ratio <= V.compression_ratio(nul)
    assert V.compression_ratio(PROSE) >= cfg.min_compression_ratio
    assert V.repeated_ngram_fraction("a b c d e f g") == 0.0


def test_seed_corpus_passes_the_screen(seed_parquet):
    texts = pd.read_parquet(seed_parquet, columns=["text"]).sample(400, random_state=0)["text"]
    rejected = [screen(t) for t in texts]
    assert sum(r is not None for r in rejected) <= 4, [r for r in rejected if r]


def test_verify_screens_before_profiling(monkeypatch):
    routed: list[str] = []

    def fake_route_counts(model, tok, texts, seq_len, batch_size):
        routed.extend(texts)
        return [type("R", (), {"n_tokens": 10, "keys": np.array([3, 7]), "counts": np.array([4, 6])})() for _ in texts]

    monkeypatch.setattr("pascal_moe.profile.capture.route_counts", fake_route_counts)
    rej = V.Rejections()
    nul = PROSE + "\x00" * 30
    out = V.verify([PROSE, nul], [[3], [3]], [0.1, 0.1], None, None, accept_ratio=2.0, seq_len=64, rejections=rej)
    assert routed == [PROSE]
    assert out[0].accepted and out[0].target_hits == 4 and np.isclose(out[0].target_rate, 0.4)
    assert not out[1].accepted and out[1].reject_reason == "control_chars" and out[1].n_tokens == 0
    assert rej.counts == {"control_chars": 1}


def test_judge_threshold_and_zero_baseline():
    m = judge(100, [1, 2, 5], [10, 20, 30], targets=[2, 5], baseline_rate=0.2, accept_ratio=1.5)
    assert m.target_hits == 50 and np.isclose(m.target_rate, 0.5) and np.isclose(m.accept_threshold, 0.3)
    assert m.accepted and np.isclose(m.hit_ratio, 2.5)
    low = judge(100, [1, 2], [10, 20], targets=[2], baseline_rate=0.2, accept_ratio=1.5)
    assert not low.accepted and low.reject_reason == "below_threshold"
    # An expert the seed never reached: any real hit is progress, no hit is not.
    assert judge(50, [4], [1], targets=[4], baseline_rate=0.0, accept_ratio=1.5).accepted
    assert not judge(50, [4], [1], targets=[9], baseline_rate=0.0, accept_ratio=1.5).accepted


# --- self-sampler on tiny random models ----------------------------------------


def test_allowed_keeps_a_candidate_when_bans_hit_the_nucleus():
    """The nucleus's only token repeats an n-gram: the next-best token must stay writable."""
    logp = torch.log_softmax(torch.tensor([[10.0, 4.0, 3.0, 0.0, -5.0]]), -1)
    cfg = SelfSampleConfig(top_p=0.9, no_repeat_ngram=2, max_drop=6.0)
    free = allowed(logp, [[3, 1]], banned=[4], c=cfg)
    assert torch.isfinite(free[0, 0]) and torch.isinf(free[0, 1:]).all()  # plain nucleus: token 0 only
    blocked = allowed(logp, [[3, 0, 7, 3]], banned=[4], c=cfg)  # "3 0" seen: after 3, token 0 is a repeat
    assert torch.isinf(blocked[0, 0]) and torch.isfinite(blocked[0, 1])
    assert torch.equal(blocked[0, 1], logp[0, 1])  # values are the model's own log-probabilities
    assert torch.isinf(blocked[0, 4])  # banned stays banned


def _hits_and_logprob(model, keys, ids, n_prompt, n_experts):
    """Full (uncached) forward: target hits of the written tokens and their mean log-probability."""
    layers = moe_layers(model)
    with torch.no_grad(), capture_routing(model, layers) as rec:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # [T, V]
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)  # [T-1]
    hits = 0
    for lay, sel in zip(layers, rec.indices):
        assert sel is not None
        idx = sel[n_prompt:]  # [written, k]: the recorder keeps each router's selection
        want = [k % n_experts for k in keys if k // n_experts == lay.ordinal]
        hits += int(torch.isin(idx, torch.tensor(want, dtype=idx.dtype)).sum()) if want else 0
    return hits, float(lp[n_prompt - 1 :].mean())


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_cached_search_matches_a_full_forward(tiny_moe_dir, arch):
    """KV-cache bookkeeping (expand, select) and hook bookkeeping agree with one plain forward per passage."""
    path = tiny_moe_dir(arch)
    model, tok = load_model(str(path), "cpu"), load_tokenizer(str(path))
    E = moe_layers(model)[0].spec.n_experts
    keys = [0 * E + 1, 1 * E + 5]
    sampler = SelfSampler(model, tok, SelfSampleConfig(new_tokens=12, width=3, expand=4, prompt_tokens=6))
    out = sampler.sample(keys, [PROSE, PROSE[40:]], seed=1)
    assert len(out) == 2
    for p in out:
        hits, lp = _hits_and_logprob(model, keys, p.token_ids, 6, E)
        assert p.hits == hits and np.isclose(p.logprob, lp, atol=1e-3)
    for lay in moe_layers(model):
        assert not lay.router._forward_hooks  # hooks removed after sampling


def test_sampler_is_seeded(tiny_moe_dir):
    path = tiny_moe_dir("qwen3_moe")
    model, tok = load_model(str(path), "cpu"), load_tokenizer(str(path))
    s = SelfSampler(model, tok, SelfSampleConfig(new_tokens=10, width=2, expand=3))
    a, b, c = (s.sample([1], [PROSE], seed=k) for k in (7, 7, 8))
    assert [p.text for p in a] == [p.text for p in b] != [p.text for p in c]
    assert a[0].text.startswith(a[0].prompt)


# --- the bundled models ----------------------------------------------------------


def _target_rate(model, tok, texts, keys):
    rc = route_counts(model, tok, texts, 256, 8)
    hits = sum(int(c) for r in rc for k, c in zip(r.keys, r.counts) if int(k) in keys)
    return hits / sum(r.n_tokens for r in rc)


@pytest.mark.parametrize("which", ["qwen_dir", "deepseek_dir"])
def test_steering_raises_target_hits_on_bundled_models(which, request, profile_dir, seed_parquet):
    """Same prompts and seed: the routing bonus makes the text reach starved experts more often than without it."""
    model_dir = request.getfixturevalue(which)
    prof = load_profile_frame(profile_dir(model_dir))
    ex = prof.sort_values("share").head(3)  # the three most starved experts
    E = int(prof["expert"].max()) + 1
    keys = [int(r.layer) * E + int(r.expert) for r in ex.itertuples()]
    model, tok = load_model(str(model_dir), "cpu"), load_tokenizer(str(model_dir))
    prompts = pd.read_parquet(seed_parquet).query("split == 'train'")
    prompts = prompts.sample(6, random_state=0)["text"].tolist()
    rates = {}
    for bonus in (0.0, 3.0):
        s = SelfSampler(model, tok, SelfSampleConfig(new_tokens=40, bonus=bonus))
        rates[bonus] = _target_rate(model, tok, [p.text for p in s.sample(keys, prompts, seed=0)], set(keys))
    assert rates[3.0] > rates[0.0], rates


def load_profile_frame(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path / "experts.parquet")


@pytest.mark.parametrize("which", ["qwen_dir", "deepseek_dir"])
def test_self_backend_raises_targeted_experts_above_seed(which, request, profile_dir, tmp_path):
    model_dir = request.getfixturevalue(which)
    prof = profile_dir(model_dir)
    cfg = SynthesizeConfig(
        model=str(model_dir),
        profile=str(prof),
        out=str(tmp_path / "syn"),
        agent="self",
        rounds=2,
        samples_per_target=3,
        targets="starved,sensitive",
        starved_ratio=0.25,
        top_sensitive=4,
        group_size=4,
        accept_ratio=1.5,
        seq_len=128,
        self_tokens=32,
        device="cpu",
    )
    df = pd.read_parquet(run(cfg))
    assert set(df["source"]) == {"self"} and df["accepted"].any()
    from pascal_moe.agent.targets import build_groups, load_profile

    p = load_profile(prof)
    cov = coverage_table(p, build_groups(p, cfg.targets, cfg.starved_ratio, cfg.top_sensitive, cfg.group_size), df)
    reached = cov[(cov["passages"] > 0) & (cov["seed_tokens"] > 0)]
    assert len(reached) > 0
    # Accepted passages are denser in the targeted experts than the seed corpus, for most targeted experts.
    assert (reached["accepted_rate"] > reached["seed_rate"]).mean() >= 0.5, reached.to_string()
    assert reached["added_tokens"].sum() > 0
    assert "Coverage gained per target expert" in (tmp_path / "syn" / "report.md").read_text()
    from pascal_moe.agent.client import read_log

    log = read_log(tmp_path / "syn" / "agent_log.jsonl")  # one line per generated chunk
    assert sum(e["passages"] for e in log) == len(df) and sum(e["accepted"] for e in log) == df["accepted"].sum()
    # Interrupted mid-round (round file and its last chunk lost): the re-run redoes that chunk identically.
    parts = tmp_path / "syn" / "parts"
    last = max(r for r in df["round"])
    (parts / f"round-{last:02d}.parquet").unlink()
    max(parts.glob(f"chunks/round-{last:02d}-c*.parquet")).unlink()
    pd.testing.assert_frame_equal(pd.read_parquet(run(cfg)), df)
