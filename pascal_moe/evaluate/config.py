"""Settings of `pascal eval`."""

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
class EvalConfig:
    model: str = option(help="the full-precision reference model")
    revision: str | None = option(None, REVISION_HELP)
    out: str = option(help="output directory (eval.parquet, report.md, PNG plots)")
    quantized: list[str] = option([], "quantized model directories (repeat the flag)")
    data: str | None = option(None, "held-out text (default: the bundled seed corpus, heldout split)")
    text_column: str = option("text", "column holding the text")
    domains: str | None = option(
        None,
        "also evaluate each of these domains of the held-out data separately, "
        "comma-separated (e.g. prose,code,math,dialogue; all = every domain); "
        "up to --max-tokens each; default: the mixed held-out text only",
    )
    max_tokens: int = option(50_000, "held-out tokens evaluated")
    seq_len: int = option(256, "tokens per evaluation window")
    generate_tokens: int = option(128, "greedy tokens generated per prompt for generation agreement (0 = skip)")
    prompts: int = option(16, "held-out prompts for generation agreement")
    prompt_tokens: int = option(32, "tokens of held-out text that start each generation prompt")
    calib: list[str] = option([], "calibration Parquet(s) whose coverage heatmap to plot (repeat the flag)")
    batch_size: int = option(8, "windows per forward pass")
    kl_top_n: int = option(
        4096,
        "fp log-probs kept per token for KL(fp||q): KL over the fp top-n plus one bucket for the rest "
        "(a lower bound; exact when the vocabulary is at most n, as for the bundled models)",
    )
    device: str = option("auto", "auto, cpu, cuda")
    dtype: str = option("auto", "dtype")
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    offload_dir: str | None = option(None, OFFLOAD_DIR_HELP)
    seed: int = option(0, "seed of the held-out text order (windows and prompts are a deterministic function of it)")
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    workers: int = workers_option()
    gpus_per_worker: float = gpus_per_worker_option()
    shard_size: int = shard_size_option("evaluation windows")
