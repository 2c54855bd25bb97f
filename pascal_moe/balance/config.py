"""Settings of `pascal balance` and `pascal export-calib`."""

from __future__ import annotations

from dataclasses import dataclass

from pascal_moe.settings import option


@dataclass
class BalanceConfig:
    profile: str = option(help="directory written by `pascal profile` (seed samples and expert statistics)")
    out: str = option(help="output directory (calib.parquet, coverage.parquet/png, manifest.json, README.md)")
    candidates: list[str] = option([], "candidate directories with synthetic.parquet (repeat the flag)")
    n_samples: int = option(512, "samples in the calibration set")
    seq_len: int = option(2048, "tokens per sample (input_ids are truncated to this)")
    min_tokens_per_expert: int = option(64, "demand floor: tokens every expert should receive")
    max_synthetic_share: float = option(0.5, "at most this fraction of the set is synthetic")
    natural_share: float = option(0.25, "at least this fraction is seed text chosen at random (keeps the natural mix)")
    demand_share: float = option(0.25, "demand: fraction of the uniform per-expert token share every expert should get "
                                      "(times 1 + sensitivity; never below --min-tokens-per-expert)")
    sensitivity_weight: float = option(1.0, "importance weight on quantization sensitivity")
    boundary_weight: float = option(1.0, "importance weight on near-boundary routing share")
    seed: int = option(0, "random seed")
    tokenizer: str | None = option(None, "tokenizer for input_ids (default: the one profile.json names)")


@dataclass
class ExportConfig:
    calib: str = option(help="calib.parquet (or its directory) written by `pascal balance`/`build-calib`")
    format: str = option(help="llmcompressor, autoround, gptqmodel or jsonl")
    out: str = option(help="output file or directory")
    seq_len: int | None = option(None, "pack to this many tokens per sample (default: the calibration set's)")
