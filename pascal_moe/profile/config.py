"""Settings of `pascal profile` (also the `profile:` section of a pipeline YAML)."""

from __future__ import annotations

from dataclasses import dataclass

from pascal_moe.executor import (
    executor_option,
    gpus_per_worker_option,
    ray_address_option,
    shard_size_option,
    workers_option,
)
from pascal_moe.settings import MAX_MEMORY_HELP, OFFLOAD_DIR_HELP, REVISION_HELP, option


@dataclass
class ProfileConfig:
    model: str = option(help="model directory, hub id or short name (e.g. Qwen3-30B-A3B)")
    revision: str | None = option(None, REVISION_HELP)
    out: str = option(help="output directory for experts/samples/triggers Parquet, profile.json, report.md")
    data: str | None = option(
        None,
        "text data: .txt/.jsonl/.json/.parquet, a directory, or a hub dataset name[:config] "
        "(default: the bundled seed corpus, train split)",
    )
    text_column: str = option("text", "column holding the text")
    split: str | None = option(
        None,
        "keep only rows whose `split` column equals this (bundled corpus: "
        "train); for a hub dataset, the split to load (default train)",
    )
    max_samples: int | None = option(None, "use at most this many samples")
    max_tokens: int | None = option(
        None,
        "stop adding samples once they hold this many tokens (each counted up to "
        "--seq-len): a pool sized in tokens, not documents",
    )
    seq_len: int = option(512, "tokens per sample (longer samples are truncated)")
    batch_size: int = option(8, "samples per forward pass")
    scheme: str = option(
        "int4-g128", "target quantization scheme for sensitivity: int4-g128, int3-g128, int2-g64, nvfp4"
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:1 ...")
    dtype: str = option("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    offload_dir: str | None = option(None, OFFLOAD_DIR_HELP)
    min_token_count: int = option(5, "triggers: ignore tokens seen fewer times than this")
    top_triggers: int = option(20, "triggers: tokens kept per expert")
    contexts: int = option(5, "triggers: example contexts kept per expert")
    sensitivity: bool = option(True, "measure quantization sensitivity (weight error + reroute pass)")
    weight_error_tokens: int = option(
        8, "weight error: at most this many routed tokens per expert per batch (seeded random subsample; 0 = all)"
    )
    seed: int = option(0, "seed of the weight-error token subsample")
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    workers: int = workers_option()
    gpus_per_worker: float = gpus_per_worker_option()
    shard_size: int = shard_size_option("samples")
