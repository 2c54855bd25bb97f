"""`pascal eval`: metrics against RTN fake-quantized models, exact fp-vs-fp identities, one-line errors.

The pair of assertions that cannot pass by accident: fp vs itself gives Jaccard 1,
KL 0 and agreement 1 *exactly*, while int2-g64 is strictly worse than int4-g128 on
every metric.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import benchmark_module

from pascal_moe.errors import PascalError
from pascal_moe.evaluate.config import EvalConfig
from pascal_moe.evaluate.metrics import jaccard, selection_mask
from pascal_moe.evaluate.run import run
from pascal_moe.models import MoELayer, RouterSpec, moe_layers
from pascal_moe.models.base import decoder_layers
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.quant.schemes import fake_quantize, parse_scheme

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ARCHS = {"qwen3-moe-tiny": "qwen3_moe", "deepseek-v3-tiny": "deepseek_v3"}


def model_under_test(name: str, out: Path, tiny_moe_model) -> Path:
    """The trained bundled model when present, else a tiny random one of its family (with the bundled tokenizer)."""
    env = {"qwen3-moe-tiny": "PASCAL_TEST_QWEN_DIR", "deepseek-v3-tiny": "PASCAL_TEST_DEEPSEEK_DIR"}[name]
    bundled = Path(os.environ.get(env) or MODELS / name)
    if (bundled / "model.safetensors").exists():
        return bundled
    tok_src = MODELS / "qwen3-moe-tiny"
    if not (tok_src / "tokenizer.json").exists():
        pytest.skip("neither the bundled model nor the bundled tokenizer is present")
    tiny_moe_model(ARCHS[name], seed=0).save_pretrained(out)
    for f in TOKENIZER_FILES:
        if (tok_src / f).exists():
            shutil.copy(tok_src / f, out / f)
    return out


def rtn_quantize(src: str, scheme: str, out: Path) -> Path:
    """RTN fake-quantize every decoder Linear except routers, plus the fused expert tensors; save as a model dir."""
    model, tok, sch = load_model(src, "cpu", "float32"), load_tokenizer(src), parse_scheme(scheme)
    layers = moe_layers(model)
    routers = {id(layer.router) for layer in layers}
    with torch.no_grad():
        for mod in decoder_layers(model).modules():
            if isinstance(mod, nn.Linear) and id(mod) not in routers:
                mod.weight.copy_(fake_quantize(mod.weight, sch, 1))
        for layer in layers:
            for et in layer.experts:
                et.tensor.copy_(fake_quantize(et.tensor, sch, et.in_dim))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "quantize.json").write_text(json.dumps({"scheme": scheme, "method": "rtn"}))
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def evaluated(request, tmp_path_factory, tiny_moe_model) -> tuple[pd.DataFrame, dict]:
    root = tmp_path_factory.mktemp(request.param)
    model = str(model_under_test(request.param, root / "fp", tiny_moe_model))
    q4 = rtn_quantize(model, "int4-g128", root / "int4-g128")
    q2 = rtn_quantize(model, "int2-g64", root / "int2-g64")
    copy = root / "fp-copy"
    shutil.copytree(model, copy)
    out = run(
        EvalConfig(
            model=model,
            out=str(root / "eval"),
            quantized=[str(copy), str(q4), str(q2)],
            max_tokens=2048,
            seq_len=128,
            generate_tokens=24,
            prompts=6,
            prompt_tokens=16,
            batch_size=8,
        )
    )
    summary = {r["model"]: r for r in json.loads((out / "eval.json").read_text())["summary"]}
    return pd.read_parquet(out / "eval.parquet"), summary


def test_fp_against_itself_is_exact(evaluated):
    _, s = evaluated
    assert s["fp-copy"]["jaccard"] == 1.0
    assert s["fp-copy"]["kl"] == 0.0
    assert s["fp-copy"]["gen_agreement"] == 1.0
    assert s["fp-copy"]["ppl"] == s["fp"]["ppl"]


def test_int2_is_worse_than_int4_on_every_metric(evaluated):
    _, s = evaluated
    q4, q2 = s["int4-g128"], s["int2-g64"]
    assert q2["jaccard"] < q4["jaccard"] < 1.0
    assert q2["ppl"] > q4["ppl"]
    assert q2["kl"] > q4["kl"] > 0.0
    assert q2["gen_agreement"] < q4["gen_agreement"]
    assert q4["method"] == "rtn" and q4["scheme"] == "int4-g128"


def test_outputs_long_format_and_plots(evaluated, tmp_path):
    df, s = evaluated
    assert list(df.columns) == ["model", "path", "method", "scheme", "metric", "layer", "value"]
    per_layer = df[(df.model == "int2-g64") & (df.metric == "jaccard") & (df.layer >= 0)].sort_values("layer")
    assert per_layer.value.mean() == pytest.approx(s["int2-g64"]["jaccard"])
    assert per_layer.value.tolist() == pytest.approx(s["int2-g64"]["layer_jaccard"])
    out = Path(df.path[df.model == "int2-g64"].iloc[0]).parent / "eval"
    for f in ("report.md", "jaccard.png", "ppl_kl.png"):
        assert (out / f).stat().st_size > 0
    assert "| int2-g64 | rtn | int2-g64 |" in (out / "report.md").read_text()


def test_jaccard_matches_sets_on_a_tiny_example():
    torch.manual_seed(0)
    spec = RouterSpec("softmax", n_experts=8, top_k=3)
    layer = MoELayer(0, 0, "x", nn.Identity(), nn.Identity(), spec, [])
    za, zb = torch.randn(50, 8), torch.randn(50, 8)
    got = jaccard(selection_mask(layer, za), selection_mask(layer, zb))
    for i in range(50):
        a = set(sorted(range(8), key=lambda e: -za[i, e].item())[:3])
        b = set(sorted(range(8), key=lambda e: -zb[i, e].item())[:3])
        assert got[i].item() == pytest.approx(len(a & b) / len(a | b))
    hand = jaccard(torch.tensor([[1, 1, 0, 0]], dtype=torch.bool), torch.tensor([[0, 1, 1, 0]], dtype=torch.bool))
    assert hand.item() == pytest.approx(1 / 3)


def _config_only(tmp_path: Path, tiny_moe_config, arch: str = "qwen3_moe", **change) -> Path:
    """A model dir holding only config.json: `run` checks architectures before loading any weights."""
    out = tmp_path / f"{arch}-{'-'.join(change) or 'ref'}"
    tiny_moe_config(arch, **change).save_pretrained(out)
    return out


def test_missing_quantized_dir_is_one_line(tmp_path, tiny_moe_config):
    model = _config_only(tmp_path, tiny_moe_config)
    with pytest.raises(PascalError, match="quantized model not found") as e:
        run(EvalConfig(model=str(model), out=str(tmp_path / "o"), quantized=[str(tmp_path / "nope")]))
    assert "\n" not in str(e.value)


def test_other_architecture_or_vocab_is_one_line(tmp_path, tiny_moe_config):
    model = _config_only(tmp_path, tiny_moe_config)
    for other in (
        _config_only(tmp_path, tiny_moe_config, vocab_size=5000),
        _config_only(tmp_path, tiny_moe_config, "deepseek_v3"),
    ):
        with pytest.raises(PascalError, match="does not match --model") as e:
            run(EvalConfig(model=str(model), out=str(tmp_path / "o"), quantized=[str(other)]))
        assert "\n" not in str(e.value)


def test_bad_settings_fail_before_any_work(tmp_path, tiny_moe_config):
    model = _config_only(tmp_path, tiny_moe_config)
    for bad, match in (
        ({"seq_len": 1}, "--seq-len must be at least 2"),
        ({"calib": [str(tmp_path / "none.parquet")]}, "calibration set not found"),
    ):
        with pytest.raises(PascalError, match=match):
            run(EvalConfig(model=str(model), out=str(tmp_path / "o"), quantized=[str(model)], **bad))


def test_matrix_plan_and_reading():
    m = benchmark_module("calibration_matrix")
    s = {
        "models": ["a/m1"],
        "schemes": ["int4-g128", "int2-g64"],
        "quantizers": ["rtn", "vsraq"],
        "calib_sets": ["random", "pascal-self"],
        "seeds": [0, 1],
    }
    cells = m.plan(s)
    assert sum(c["method"] == "rtn" for c in cells) == 2  # rtn once per scheme: it reads no calibration data
    assert len(cells) == 2 * (1 + 2 * 2)
    rows = [
        {
            "model": "m1",
            "scheme": "int4-g128",
            "method": "vsraq",
            "calib": c,
            "seed": sd,
            "delta_ppl": d + sd * 0.01,
            "jaccard": j,
            "ppl": 10 + d,
            "kl": 0.1,
            "gen_agreement": 0.9,
            "fp_ppl": 10.0,
        }
        for c, d, j in (("random", 1.0, 0.80), ("pascal-self", 0.5, 0.85))
        for sd in (0, 1)
    ]
    text = "\n".join(m.reading(pd.DataFrame(rows)))
    assert "lowest Δppl with **pascal-self**" in text and "beyond seed noise" in text
    rows[0]["delta_ppl"], rows[1]["delta_ppl"] = 0.49, 0.53  # random: mean 0.51, std 0.028; pascal-self 0.505
    text = "\n".join(m.reading(pd.DataFrame(rows)))
    assert "lowest Δppl with **pascal-self**" in text and "within seed noise" in text
    rows[0]["delta_ppl"], rows[1]["delta_ppl"] = 0.40, 0.42  # now random wins clearly: the reading must say so
    text = "\n".join(m.reading(pd.DataFrame(rows)))
    assert "lowest Δppl with **random**" in text and "beyond seed noise" in text
    assert "| int4-g128 | vsraq | random | 2 |" in m.tables(pd.DataFrame(rows))["m1"]


@pytest.mark.parametrize("name", ["calibration_matrix.yaml", "quantizer_ranking.yaml", "domain_shift.yaml"])
def test_matrix_configs_load_and_plan(name):
    m = benchmark_module("calibration_matrix")
    path = Path(__file__).resolve().parents[1] / "pipelines" / name
    s, report = m.load_settings(path, False, None)
    cells = m.plan(s)
    assert cells and {c["scheme"] for c in cells} == set(s["schemes"])
    assert set(s["calib_sets"]) <= {"random", "balanced", "pascal-self", "pascal-vllm", "pascal-openai"}
    assert Path(s["results"]).suffix == ".md" and s["quantize"]["iters"] > 0


def test_matrix_seed_subset_keeps_only_the_named_domains_of_the_train_split(tmp_path):
    m = benchmark_module("calibration_matrix")
    path = m.seed_subset({"seed_domains": ["prose"]}, tmp_path)
    df = pd.read_parquet(path)
    full = pd.read_parquet(Path(__file__).resolve().parents[1] / "data" / "seed" / "seed.parquet")
    want = full[(full["split"] == "train") & (full["domain"] == "prose")]
    assert set(df["domain"]) == {"prose"} and len(df) == len(want) and "split" not in df
    assert m.seed_subset({"seed_domains": ["prose"]}, tmp_path) == path  # written once, then reused
    with pytest.raises(SystemExit, match="no bundled seed text"):
        m.seed_subset({"seed_domains": ["poetry"]}, tmp_path / "other")
