"""Settings of `pascal balance` and `pascal export-calib`."""

from __future__ import annotations

from dataclasses import dataclass

from pascal_moe.settings import option


@dataclass
class BalanceConfig:
    profile: str = option(help="directory written by `pascal profile` (seed samples and expert statistics)")
    out: str = option(help="output directory (calib.parquet, coverage.parquet/png, manifest.json, README.md)")
    candidates: list[str] = option([], "candidate directories with synthetic.parquet (repeat the flag)")
    tokens: int = option(1_048_576, "token budget of the calibration set (default 512 x 2048), separators included")
    seq_len: int = option(
        2048,
        "tokens per window: documents are truncated to this, then packed into windows "
        "of exactly this length (joined with the tokenizer's EOS)",
    )
    min_tokens_per_expert: int = option(64, "demand floor: tokens every expert should receive")
    max_synthetic_share: float = option(0.5, "at most this fraction of the tokens is synthetic")
    natural_share: float = option(
        0.25, "at least this fraction of the tokens is seed text chosen at random (keeps the natural mix)"
    )
    demand_share: float = option(
        0.25,
        "demand: fraction of the uniform per-expert token share every expert should get "
        "(times 1 + sensitivity; never below --min-tokens-per-expert)",
    )
    sensitivity_weight: float = option(1.0, "importance weight on quantization sensitivity")
    boundary_weight: float = option(1.0, "importance weight on near-boundary routing share")
    seed: int = option(0, "random seed")
    tokenizer: str | None = option(None, "tokenizer for input_ids (default: the one profile.json names)")
    model: str | None = option(
        None,
        "model that routes the packed windows for the measured coverage "
        "(default: the one profile.json names, on its device and dtype)",
    )
    batch_size: int = option(8, "windows per forward pass when measuring coverage")


@dataclass
class ExportConfig:
    calib: str = option(help="calib.parquet (or its directory) written by `pascal balance`/`build-calib`")
    format: str = option(help="llmcompressor, autoround, gptqmodel or jsonl")
    out: str = option(help="output file or directory")
    seq_len: int | None = option(None, "pack to this many tokens per sample (default: the calibration set's)")
