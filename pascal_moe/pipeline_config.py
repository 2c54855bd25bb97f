"""Settings of `pascal build-calib` (profile -> synthesize -> profile synthetic -> balance)."""

from __future__ import annotations

from dataclasses import dataclass

from pascal_moe.settings import option


@dataclass
class BuildCalibConfig:
    model: str = option(help="model directory or hub id")
    out: str = option("runs/build-calib", "run directory (stages resume from it)")
    data: str | None = option(None, "seed text (default: the bundled seed corpus, train split)")
    text_column: str = option("text", "column holding the text")
    max_seed_samples: int | None = option(4000, "seed samples profiled: the pool balance picks from "
                                                "(hold a few times --tokens)")
    agent: str = option("auto", "openai, vllm, self, or auto (openai when an endpoint is configured, else self)")
    base_url: str | None = option(None, "OpenAI-compatible endpoint (env OPENAI_BASE_URL)")
    agent_model: str | None = option(None, "model name at the endpoint")
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key")
    rounds: int = option(2, "agent rounds")
    samples_per_target: int = option(4, "passages per target group per round")
    concurrency: int = option(32, "agent requests in flight")
    max_tokens_budget: int | None = option(None, "agent token budget")
    targets: str = option("starved,sensitive", "which experts the synthesis targets: starved, sensitive, or both")
    top_sensitive: int = option(16, "the most quantization-sensitive experts targeted (over all layers)")
    self_tokens: int = option(96, "self backend: tokens written per passage")
    tokens: int = option(1_048_576, "token budget of the calibration set (default 512 x 2048)")
    seq_len: int = option(2048, "tokens per calibration window (capped at the model's max_position_embeddings)")
    profile_seq_len: int | None = option(None, "tokens per sample while profiling and verifying synthetic text "
                                                       "(default: the calibration --seq-len, so counts match what a quantizer sees)")
    scheme: str = option("int4-g128", "target quantization scheme for sensitivity")
    min_tokens_per_expert: int = option(64, "demand floor per expert")
    max_synthetic_share: float = option(0.5, "cap on the synthetic fraction")
    natural_share: float = option(0.25, "fraction of the set that is random seed text")
    demand_share: float = option(0.25, "demand: fraction of the uniform per-expert share each expert should get")
    sensitivity: bool = option(True, "measure quantization sensitivity while profiling (weights the selection)")
    batch_size: int = option(8, "samples per forward pass")
    seed: int = option(0, "random seed")
    device: str = option("auto", "device")
    dtype: str = option("auto", "dtype")
