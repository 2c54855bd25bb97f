"""`pascal balance`: objective, lazy greedy, caps, and the written calibration set.

Profiles here are synthetic directories written with the CONTRACTS schema (fake routing,
real seed texts, the bundled tokenizer), so the stage is tested without the profiler.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from pascal_moe.balance.config import BalanceConfig
from pascal_moe.balance.coverage import gini
from pascal_moe.balance.objective import Objective, build_objective, count_matrix
from pascal_moe.errors import PascalError

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "data" / "models" / "qwen3-moe-tiny"


def _routing(rng: np.random.Generator, n_tokens: np.ndarray, pop: np.ndarray, k: int, conc: float) -> np.ndarray:
    """counts [N, L, E]: each sample mixes the layer popularity with its own Dirichlet preference."""
    N, (L, E) = len(n_tokens), pop.shape
    out = np.zeros((N, L, E), dtype=np.int64)
    for i, n in enumerate(n_tokens):
        for layer in range(L):
            p = pop[layer] * rng.dirichlet(np.full(E, conc))
            out[i, layer] = np.minimum(rng.multinomial(int(n) * k, p / p.sum()), int(n))
    return out


def _sparse_rows(c: np.ndarray) -> tuple[list[list[int]], list[list[int]]]:
    flat = c.reshape(len(c), -1)
    keys = [np.flatnonzero(r).astype(int).tolist() for r in flat]
    return keys, [flat[i, kk].astype(int).tolist() for i, kk in enumerate(keys)]


def write_fake_profile(
    d: Path, n_seed: int = 300, n_synth: int = 120, seq_len: int = 64, seed: int = 0
) -> tuple[Path, Path]:
    """A profile DIR and a synthesize DIR (CONTRACTS schema) whose rare experts only targeted text reaches.

    The routing counts are generated, but profile.json names the bundled Qwen3-MoE (4 MoE layers x 16 experts,
    top-2), so balance measures the packed windows on a real model.
    """
    from pascal_moe.io.batches import tokenize
    from pascal_moe.io.texts import load_texts
    from pascal_moe.models.loading import load_tokenizer

    if not (QWEN / "model.safetensors").is_file():
        pytest.skip(f"bundled model {QWEN} has no weights")
    L, E, k = 4, 16, 2
    rng = np.random.default_rng(seed)
    ts = load_texts(None, split="train", max_samples=n_seed + n_synth)
    tok = load_tokenizer(str(QWEN))
    n_tok = np.array([len(x) for x in tokenize(ts.texts, tok, seq_len)])
    pop = np.stack([rng.permutation(1.0 / np.arange(1, E + 1) ** 2.5) for _ in range(L)])  # [L, E] Zipf-like
    seed_c = _routing(rng, n_tok[:n_seed], pop, k, 0.5)
    keys, counts = _sparse_rows(seed_c)
    prof, syn = d / "profile", d / "synth"
    prof.mkdir(parents=True)
    syn.mkdir(parents=True)
    pd.DataFrame(
        {
            "sample_id": ts.ids[:n_seed],
            "text": ts.texts[:n_seed],
            "source": "seed",
            "domain": ts.domains[:n_seed],
            "n_tokens": n_tok[:n_seed],
            "keys": keys,
            "counts": counts,
        }
    ).to_parquet(prof / "samples.parquet")
    tot = seed_c.sum(0)  # [L, E]
    lay, exp = np.divmod(np.arange(L * E), E)
    pd.DataFrame(
        {
            "layer": lay,
            "layer_index": lay,
            "expert": exp,
            "tokens": tot.ravel(),
            "share": (tot / tot.sum(1, keepdims=True)).ravel(),
            "weight_mass": 1.0,
            "boundary_tokens": (tot.ravel() * rng.uniform(0, 0.3, L * E)).astype(int),
            "margin_mean": 0.1,
            "margin_p10": 0.01,
            "margin_p50": 0.1,
            "weight_error": 0.01,
            "reroute_rate": 0.05,
            "sensitivity": rng.uniform(0, 1, L * E),
        }
    ).to_parquet(prof / "experts.parquet")
    (prof / "profile.json").write_text(
        json.dumps(
            {
                "model": str(QWEN),
                "tokenizer": str(QWEN),
                "n_layers": L,
                "layer_indices": list(range(L)),
                "n_experts": E,
                "top_k": k,
                "routing": "softmax",
                "seq_len": seq_len,
                "settings": {"device": "cpu", "dtype": "float32"},
            }
        )
    )
    rare = 1.0 / pop  # synthetic text written for the least used experts
    syn_c = _routing(rng, n_tok[n_seed:], rare / rare.sum(1, keepdims=True), k, 0.5)
    keys, counts = _sparse_rows(syn_c)
    accepted = rng.uniform(size=n_synth) < 0.8
    pd.DataFrame(
        {
            "sample_id": [f"syn-{i}" for i in range(n_synth)],
            "text": [f"[synthetic {i}] " + t for i, t in enumerate(ts.texts[n_seed:])],
            "source": "synthetic",
            "targets": [["L0.E1", "L1.E2"]] * n_synth,
            "n_tokens": n_tok[n_seed:],
            "keys": keys,
            "counts": counts,
            "accepted": accepted,
            "round": 0,
        }
    ).to_parquet(syn / "synthetic.parquet")
    return prof, syn


def _random_instance(rng, N=60, K=24, scale=1.0):
    X = sp.random(
        N,
        K,
        density=0.3,
        random_state=np.random.RandomState(int(rng.integers(1 << 30))),
        data_rvs=lambda s: rng.uniform(1, 20, s),
        format="csr",
    )
    return X, Objective(demand=rng.uniform(5, 40, K) * scale, weight=rng.uniform(1, 3, K))


def test_count_matrix_scales_truncated_samples_and_checks_keys():
    X = count_matrix(pd.Series([[0, 3], [1]]), pd.Series([[10, 30], [8]]), np.array([100, 20]), 4, seq_len=50)
    assert X.shape == (2, 4)
    np.testing.assert_allclose(X.toarray(), [[5, 0, 0, 15], [0, 8, 0, 0]])  # row 0 halved (100 -> 50 tokens)
    with pytest.raises(PascalError, match="out of range"):
        count_matrix(pd.Series([[4]]), pd.Series([[1]]), np.array([1]), 4, seq_len=50)


def test_gains_match_brute_force_and_demand_follows_the_token_budget():
    rng = np.random.default_rng(1)
    X, obj = _random_instance(rng)
    cov = np.asarray(X[:5].sum(0)).ravel()
    brute = [obj.value(cov + X[i].toarray().ravel()) - obj.value(cov) for i in range(X.shape[0])]
    np.testing.assert_allclose(obj.gains(X, cov, rows_per_chunk=7), brute, rtol=1e-6, atol=1e-6)
    ex = pd.DataFrame(
        {"layer": [0, 0], "expert": [0, 1], "sensitivity": [0.0, 1.0], "tokens": [10, 0], "boundary_tokens": [5, 0]}
    )
    o = build_objective(
        ex,
        n_experts=2,
        n_layers=1,
        top_k=1,
        tokens=200,
        min_tokens=3,
        demand_share=0.5,
        sensitivity_weight=2.0,
        boundary_weight=4.0,
    )
    np.testing.assert_allclose(o.weight, [1 + 4 * 0.5, 1 + 2 * 1.0])  # w = 1 + a*sens + b*boundary_share
    np.testing.assert_allclose(o.demand, [0.5 * 100, 0.5 * 100 * 2])  # t = rho * B*k/E * (1 + sens)


def test_gini():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.eye(1, 10).ravel()) == pytest.approx(0.9)


def test_balance_writes_packed_windows_within_budget_that_beat_random(tmp_path):
    from datasets import load_dataset

    from pascal_moe.balance.run import run

    prof, syn = write_fake_profile(tmp_path)
    cfg = BalanceConfig(
        profile=str(prof),
        out=str(tmp_path / "calib"),
        candidates=[str(syn)],
        tokens=3000,
        seq_len=48,
        max_synthetic_share=0.4,
        natural_share=0.25,
        min_tokens_per_expert=8,
    )
    out = run(cfg)
    # the card's front matter names calib.parquet as the data files; a private cache: the shared one can
    # answer for an earlier calib.parquet at a reused pytest path
    ds = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    cols = {"input_ids", "n_tokens", "text", "sample_ids", "sources", "source", "keys", "counts"}
    assert cols <= set(ds.column_names)
    lens = [len(i) for i in ds["input_ids"]]
    assert lens == ds["n_tokens"] and all(n == 48 for n in lens[:-1]) and 0 < lens[-1] <= 48
    m = json.loads((out / "manifest.json").read_text())
    assert m["calib_tokens"] == sum(lens) and m["calib_windows"] == len(ds)
    assert 0.99 * 3000 <= sum(lens) <= 3000  # the budget, within 1%
    docs = pd.read_parquet(out / "documents.parquet")
    assert sum(docs["n_tokens"]) + len(docs) - 1 == sum(lens)  # documents + one EOS between neighbours
    assert sorted(docs["sample_id"]) == sorted({s for ids in ds["sample_ids"] for s in ids})
    syn_df = pd.read_parquet(syn / "synthetic.parquet")
    assert not set(syn_df.loc[~syn_df["accepted"], "sample_id"]) & set(docs["sample_id"])
    synth_tokens = docs.loc[docs["source"] != "seed", "n_tokens"].sum() + (docs["source"] != "seed").sum()
    seed_tokens = docs.loc[docs["source"] == "seed", "n_tokens"].sum()
    assert synth_tokens <= 0.4 * 3001 + 1e-9  # the synthetic cap counts tokens
    nat = docs[docs["selected_by"] == "natural"]
    assert nat["n_tokens"].sum() + len(nat) >= 0.25 * 3001 and (nat["source"] == "seed").all()
    assert m["coverage"]["after_balanced"]["synthetic_share"] == pytest.approx(
        docs.loc[docs["source"] != "seed", "n_tokens"].sum() / sum(lens)
    )
    assert seed_tokens > 0 and set(docs["selected_by"]) <= {"natural", "greedy", "single", "fill"}
    assert all(t.size == 0 for t, s in zip(docs["targets"], docs["source"]) if s == "seed")
    after, same = m["coverage"]["after_balanced"], m["coverage"]["random_seed_same_tokens"]
    assert abs(same["tokens"] - after["tokens"]) <= 49 and same["synthetic_share"] == 0.0  # within one document
    pred, pred_random = m["coverage"]["after_balanced_predicted"], m["coverage"]["random_seed_same_tokens_predicted"]
    assert pred["objective"] > pred_random["objective"]  # on the (generated) counts the greedy optimised
    assert pred["experts_below_demand"] < pred_random["experts_below_demand"]
    cov = pd.read_parquet(out / "coverage.parquet")
    assert len(cov) == 64 and int(cov["below_after"].sum()) == after["experts_below_demand"]
    assert cov["tokens_measured"].sum() == sum(lens) * 4 * 2  # every token, top-2, 4 MoE layers
    card = (out / "README.md").read_text()
    assert "same tokens" in card and "calib.parquet" in card
    front = yaml.safe_load(card.split("---\n")[1])  # the fields the hub reads
    assert front["license"] and front["task_categories"] == ["text-generation"]
    assert front["source_datasets"] == ["original"] and front["pascal_moe"]["tokens"] == sum(lens)
    assert front["pascal_moe"]["model"] == m["model"] and front["pascal_moe"]["calib_sha256"] == m["calib_sha256"]
    assert (out / "coverage.png").stat().st_size > 1000
    assert m["tokenizer_fingerprint"] and str(prof / "samples.parquet") in m["inputs"]


def test_balance_cli_and_one_line_errors(tmp_path):
    from typer.testing import CliRunner

    from pascal_moe.balance.run import run
    from pascal_moe.cli import app

    prof, syn = write_fake_profile(tmp_path, n_seed=60, n_synth=20, seq_len=32)
    res = CliRunner().invoke(
        app,
        [
            "balance",
            "--profile",
            str(prof),
            "--candidates",
            str(syn),
            "--tokens",
            "640",
            "--seq-len",
            "32",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert 640 - 33 <= pd.read_parquet(tmp_path / "o" / "calib.parquet")["n_tokens"].sum() <= 640  # one document
    with pytest.raises(PascalError, match="not a profile directory"):
        run(BalanceConfig(profile=str(tmp_path / "nope"), out=str(tmp_path / "x")))
    with pytest.raises(PascalError, match="neither synthetic.parquet"):
        run(BalanceConfig(profile=str(prof), out=str(tmp_path / "x"), candidates=[str(tmp_path)]))
    with pytest.raises(PascalError, match="must lie in"):
        run(BalanceConfig(profile=str(prof), out=str(tmp_path / "x"), max_synthetic_share=1.5))
    with pytest.raises(PascalError, match="--tokens"):
        run(BalanceConfig(profile=str(prof), out=str(tmp_path / "x"), tokens=0))
    # the profile counted at most 32 tokens per document: a 64-token window length would mix two lengths
    with pytest.raises(PascalError, match="re-run the profile with --seq-len 64"):
        run(BalanceConfig(profile=str(prof), out=str(tmp_path / "x"), tokens=2000, seq_len=64, natural_share=1.0))


def test_random_baseline_tokens_stops_at_the_token_target():
    from pascal_moe.balance.select import random_baseline_tokens

    rng = np.random.default_rng(0)
    X = sp.random(200, 12, density=0.5, format="csr", random_state=1) * 10
    natural = np.arange(200) % 4 != 0  # every 4th row synthetic: never drawn
    n_tok = rng.integers(5, 50, size=200).astype(float)
    rows, cov = random_baseline_tokens(X, natural, n_tok, 1000.0, seed=3)
    assert natural[rows].all() and len(set(rows.tolist())) == len(rows)
    assert n_tok[rows].sum() >= 1000 > n_tok[rows[:-1]].sum()  # the fewest rows in draw order that reach it
    np.testing.assert_allclose(cov, np.asarray(X[rows].sum(axis=0)).ravel())
    assert np.array_equal(rows, random_baseline_tokens(X, natural, n_tok, 1000.0, seed=3)[0])
    all_rows, _ = random_baseline_tokens(X, natural, n_tok, 1e9, seed=3)  # unreachable target: every seed row
    assert len(all_rows) == natural.sum()
