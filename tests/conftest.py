"""Shared test fixtures: bundled models, the seed corpus, tiny random MoEs, and a repo-leak guard.

Why these exist:
- Behaviour tests run on the two trained bundled models (`qwen_dir`, `deepseek_dir`); they
  skip with a clear reason only while the weights are missing.  `PASCAL_TEST_QWEN_DIR` /
  `PASCAL_TEST_DEEPSEEK_DIR` point them elsewhere during development (never in CI).
- Architecture coverage uses tiny random models built from configs (`tiny_moe_config`,
  `tiny_moe_model`, `tiny_moe_dir`): nothing is downloaded and each builds in well under a second.
- `_no_repo_leaks` (autouse) fails any test that leaves new files in the repository outside
  its temporary directory.  Opt out with `@pytest.mark.allow_repo_writes` (one test) or
  PASCAL_LEAK_CHECK=warn|off (a shared checkout that others edit during the run).

Append new fixtures at the end of this file, with a docstring saying what they are for.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "data" / "models"
SEED_PARQUET = REPO / "data" / "seed" / "seed.parquet"
TOKENIZER_SRC = MODELS / "qwen3-moe-tiny"  # the bundled byte-level BPE (both bundled models share it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# Every architecture the adapters support, built tiny: 2-3 layers, hidden 64, 8 experts, top-2.
TINY_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "allow_repo_writes: skip the check that a test leaves no files in the repo")


# --------------------------------------------------------------------------- bundled models and data


def _bundled(name: str, env: str) -> Path:
    path = Path(os.environ.get(env) or MODELS / name)
    if not (path / "model.safetensors").exists():
        pytest.skip(f"bundled model {path} has no model.safetensors yet (trained weights are committed separately)")
    return path


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    """data/models/qwen3-moe-tiny: trained Qwen3-MoE, softmax routing, 4 MoE layers, 16 experts, top-2."""
    return _bundled("qwen3-moe-tiny", "PASCAL_TEST_QWEN_DIR")


@pytest.fixture(scope="session")
def deepseek_dir() -> Path:
    """data/models/deepseek-v3-tiny: trained DeepSeek-V3, sigmoid + bias + group-limited top-4, first layer dense."""
    return _bundled("deepseek-v3-tiny", "PASCAL_TEST_DEEPSEEK_DIR")


@pytest.fixture(scope="session")
def fine_dir() -> Path:
    """data/models/qwen3-moe-fine: trained Qwen3-MoE with fine-grained routing, 6 MoE layers, 64 experts, top-8."""
    return _bundled("qwen3-moe-fine", "PASCAL_TEST_FINE_DIR")


@pytest.fixture(scope="session")
def seed_parquet() -> Path:
    """data/seed/seed.parquet: doc_id, text, domain (prose/code/math/dialogue), source, split (train/heldout)."""
    if not SEED_PARQUET.exists():
        pytest.skip(f"seed corpus {SEED_PARQUET} is missing")
    return SEED_PARQUET


# --------------------------------------------------------------------------- tiny random MoEs


def tiny_moe_config(arch: str, **overrides: Any):
    """A tiny config of `arch` (a model_type in TINY_ARCHS); `overrides` replace any field.

    Vocab 4096 and special ids 0/0/1 match the bundled tokenizer, so a saved tiny model
    works with it.  Dense layers are included where the family has them: Qwen3-MoE layer 1
    (`mlp_only_layers`), DeepSeek-V3 and GLM-4-MoE layer 0 (`first_k_dense_replace`).
    DeepSeek/GLM use group-limited routing (n_group >= 2) with a scaling factor != 1.
    """
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=4096,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        num_experts_per_tok=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    sigmoid: dict[str, Any] = dict(
        num_hidden_layers=3,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        first_k_dense_replace=1,
        norm_topk_prob=True,
    )
    families: dict[str, tuple[type, dict[str, Any]]] = {
        "qwen3_moe": (
            tf.Qwen3MoeConfig,
            dict(
                common,
                num_hidden_layers=3,
                intermediate_size=96,
                moe_intermediate_size=32,
                num_experts=8,
                mlp_only_layers=[1],
                norm_topk_prob=True,
            ),
        ),
        "qwen2_moe": (
            tf.Qwen2MoeConfig,
            dict(
                common,
                num_hidden_layers=2,
                intermediate_size=96,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=48,
                num_experts=8,
                norm_topk_prob=False,
            ),
        ),
        "mixtral": (tf.MixtralConfig, dict(common, num_hidden_layers=2, intermediate_size=32, num_local_experts=8)),
        "olmoe": (
            tf.OlmoeConfig,
            dict(common, num_hidden_layers=2, intermediate_size=32, num_experts=8, norm_topk_prob=False),
        ),
        # MLA attention: rotary runs on qk_rope_head_dim, so head_dim must equal it.
        "deepseek_v3": (
            tf.DeepseekV3Config,
            dict(
                common,
                **sigmoid,
                head_dim=8,
                n_group=4,
                topk_group=2,
                routed_scaling_factor=2.5,
                kv_lora_rank=16,
                q_lora_rank=None,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=16,
            ),
        ),
        "glm4_moe": (tf.Glm4MoeConfig, dict(common, **sigmoid, n_group=2, topk_group=1, routed_scaling_factor=1.5)),
        "gpt_oss": (
            tf.GptOssConfig,
            dict(
                common,
                num_hidden_layers=2,
                intermediate_size=32,
                num_local_experts=8,
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=8,
            ),
        ),
    }
    if arch not in families:
        raise ValueError(f"no tiny config for {arch!r}: known are {', '.join(families)}")
    cls, fields = families[arch]
    return cls(**{**fields, **overrides})


def tiny_moe_model(arch: str, seed: int = 0, bias_std: float = 0.05, **overrides: Any) -> nn.Module:
    """An eval-mode tiny random model of `arch`, seeded.

    Sigmoid routers get a random non-zero `e_score_correction_bias` (std `bias_std`) so
    that biased selection differs from unbiased selection, as in a trained DeepSeek.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(arch, **overrides)).eval()
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.randn_like(bias) * bias_std)
    return model


def save_tiny_moe(arch: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a seeded tiny random model of `arch` plus the bundled tokenizer to `out`; returns `out`."""
    tiny_moe_model(arch, seed=seed, **overrides).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (TOKENIZER_SRC / name).exists():
            shutil.copy(TOKENIZER_SRC / name, out / name)
    return out


@pytest.fixture
def tiny_moe_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `tiny_moe_dir(arch, **config_overrides) -> Path` of a saved tiny model plus the bundled tokenizer.

    Each call writes a fresh directory under the test's tmp_path; it loads with
    `AutoModelForCausalLM.from_pretrained` and `pascal_moe.models.loading.load_model`.
    """
    count = 0

    def make(arch: str, seed: int = 0, **overrides: Any) -> Path:
        nonlocal count
        count += 1
        return save_tiny_moe(arch, tmp_path / f"{arch}-{count}", seed=seed, **overrides)

    return make


@pytest.fixture(name="tiny_moe_config", scope="session")
def tiny_moe_config_fixture() -> Callable[..., Any]:
    """Factory: `tiny_moe_config(arch, **overrides)` -> a transformers config (see `tiny_moe_config`)."""
    return tiny_moe_config


@pytest.fixture(name="tiny_moe_model", scope="session")
def tiny_moe_model_fixture() -> Callable[..., nn.Module]:
    """Factory: `tiny_moe_model(arch, seed=0, bias_std=0.05, **overrides)` -> an in-memory eval-mode model."""
    return tiny_moe_model


# --------------------------------------------------------------------------- repo-leak guard


def _repo_status() -> set[str] | None:
    """`git status` entries (status + path) of the repo, or None when git or the repo is unavailable.

    GIT_OPTIONAL_LOCKS=0 keeps git from refreshing the index: the check never changes git state.
    """
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=all"],
            cwd=REPO,
            text=True,
            capture_output=True,
            timeout=30,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(out.stdout.splitlines()) if out.returncode == 0 else None


@pytest.fixture(autouse=True)
def _no_repo_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves new or modified files in the repo (write to tmp_path instead).

    Entries that existed before the test are ignored.  In a checkout shared with people
    editing files at the same time their new files show up too: there, set
    PASCAL_LEAK_CHECK=warn (report only) or off.  CI keeps the default, fail.
    """
    mode = os.environ.get("PASCAL_LEAK_CHECK", "fail")
    if mode == "off" or request.node.get_closest_marker("allow_repo_writes"):
        yield
        return
    before = _repo_status()
    yield
    if before is None:
        return
    after = _repo_status() or set()
    leaked = sorted(after - before)
    if not leaked:
        return
    msg = f"test left files in the repo (write under tmp_path): {', '.join(leaked)}"
    if mode == "warn":
        warnings.warn(msg, stacklevel=1)
    else:
        pytest.fail(msg + " [in a checkout others edit meanwhile, PASCAL_LEAK_CHECK=warn or off]", pytrace=False)


# --------------------------------------------------------------------------- profile DIRs (synthesize tests)


@pytest.fixture(scope="session")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `profile_dir(model_dir, max_samples=96, seq_len=64) -> Path` of a real `pascal profile` run.

    Runs the real profiler once per (model, settings) per session on the bundled seed corpus
    (train split) and returns the cached directory afterwards; for stages that read a profile DIR.
    """
    made: dict[tuple[str, int, int], Path] = {}

    def make(model_dir: Path | str, max_samples: int = 96, seq_len: int = 64) -> Path:
        from pascal_moe.profile.config import ProfileConfig
        from pascal_moe.profile.run import run as run_profile

        key = (str(model_dir), max_samples, seq_len)
        if key not in made:
            out = tmp_path_factory.mktemp("profile")
            run_profile(
                ProfileConfig(
                    model=str(model_dir),
                    out=str(out),
                    max_samples=max_samples,
                    seq_len=seq_len,
                    batch_size=16,
                    device="cpu",
                    split="train",
                )
            )
            made[key] = out
        return made[key]

    return make


def _single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test (shared cores: oversubscription stalls forwards), restored after."""
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """`one_torch_thread` for a whole module (its module-scoped fixtures run models too)."""
    yield from _single_thread()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The in-memory quantized model, grabbed as `pascal quantize` hands it to export (quantize tests)."""
    from pascal_moe.quant import run as qrun

    got: dict = {}
    real = qrun.export

    def spy(model, *args, **kwargs):
        got["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(qrun, "export", spy)
    return got


@pytest.fixture
def text_calib(tmp_path: Path, seed_parquet: Path):
    """A text-only calibration Parquet of the first `n` train documents of the seed corpus (quantize tests)."""

    def make(n: int) -> Path:
        import pandas as pd

        df = pd.read_parquet(seed_parquet, columns=["text", "split"])
        path = tmp_path / "calib.parquet"
        pd.DataFrame({"text": df[df["split"] == "train"]["text"].head(n).tolist()}).to_parquet(path)
        return path

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the whole session, shared by every Ray test module (`ray.init` costs
    ~8 s); the driver's actor pools are stopped with it.  Skips when Ray is not installed."""
    ray = pytest.importorskip("ray")
    from pascal_moe.executor.ray_pool import shutdown_pools

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray
    shutdown_pools()
    ray.shutdown()


def benchmark_module(name: str) -> Any:
    """benchmarks/NAME.py as a module (benchmarks/ is not a package): benchmarks/ on sys.path for its sibling
    imports, and registered in sys.modules so dataclasses resolve their annotations."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
