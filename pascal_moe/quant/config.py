"""Settings of `pascal quantize` (the router-alignment quantizer and its baselines)."""

from __future__ import annotations

from dataclasses import dataclass

from pascal_moe.settings import MAX_MEMORY_HELP, REVISION_HELP, option


@dataclass
class QuantizeConfig:
    model: str = option(help="model directory, hub id or short name (e.g. Qwen3-30B-A3B)")
    revision: str | None = option(None, REVISION_HELP)
    calib: str = option(help="calibration Parquet (text column) or directory holding calib.parquet")
    out: str = option(help="output directory for the quantized model")
    scheme: str = option(
        "int4-g128",
        "int4-g128, int3-g128, int2-g64 or nvfp4; add -full (int2-g64-full) for the full-range symmetric grid "
        "(scale +-amax/2^(b-1), as auto-round int_sym) instead of compressed-tensors' amax/((2^b-1)/2)",
    )
    method: str = option("vsraq", "rtn, autoround (lambda=0), topk (TopK-MSE only) or vsraq (full router alignment)")
    iters: int = option(200, "signed-gradient steps per block")
    lr: str = option("auto", "SignSGD step for V, alpha, beta, decayed linearly to 0 (auto = 1/iters, AutoRound's)")
    lambda_router: float = option(0.1, "weight of the router-alignment loss")
    alpha: float = option(0.3, "alpha_v: share of the sigmoid-aware term in the value loss")
    gamma: float = option(1.0, "gamma: exponent of the sigmoid-aware weights")
    beta_rank: float = option(0.01, "weight of the top-k rank loss")
    beta_margin: float = option(0.05, "weight of the boundary-margin loss")
    boundary: int = option(1, "b: boundary margins aligned beyond the k-th expert")
    downstream_router: bool = option(
        False,
        "also align the next MoE router's logits on this block's output (DREAM-MoE), weighted by --lambda-downstream",
    )
    lambda_downstream: float | None = option(
        None,
        "weight of the downstream-router term (default: the same as --lambda-router; 0 with --method autoround or rtn)",
    )
    selective_tokens: bool = option(
        False,
        "align routers only on the tokens whose relative output error at the RTN "
        "start of the block exceeds --selective-quantile of those errors; the selection "
        "is made once per batch and fixed for the whole optimisation (SRA-MoE)",
    )
    tokens: int | None = option(
        None,
        "use at most this many calibration tokens: a seeded random subset of rows, not a prefix (default: every row)",
    )
    seq_len: int | None = option(
        None,
        "tokens per calibration window; longer rows are cut into windows (default: "
        "the set's own window = its longest input_ids row, else 2048; capped at the "
        "model's max_position_embeddings)",
    )
    batch_size: int = option(8, "calibration windows per optimisation step")
    min_expert_tokens: int = option(
        8,
        "experts routed fewer calibration tokens fall back to RTN: V = 0, "
        "alpha = beta = 1 (they get no gradient anyway); counted per layer",
    )
    fallback_threshold: float | None = option(
        None,
        "experts routed fewer than this share of the calibration "
        "tokens also fall back to RTN (GPTQModel's rule: 0.005); "
        "default: only --min-expert-tokens",
    )
    selective_quantile: float = option(
        0.5,
        "--selective-tokens: a token is aligned when its relative output error "
        "at the RTN start exceeds this quantile of the block's RTN errors "
        "(0.5 = median: about half the tokens)",
    )
    cache_limit_gb: float = option(2.0, "cached block inputs beyond this many GB are offloaded to a temp dir")
    export_format: str = option("auto", "auto (pack-quantized for int, fake-quantized for nvfp4) or fake")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto, cpu, cuda")
    dtype: str = option("auto", "model dtype while calibrating")
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    offload_dir: str | None = option(
        None,
        "folder for decoder blocks offloaded to disk; given (or when the model does not fit), one block at a "
        "time is on the device and the export is streamed, one shard per block",
    )
    cache_dir: str | None = option(
        None, "where cached block inputs beyond --cache-limit-gb go (default: a temp dir under --out)"
    )
