"""The dataset card (README.md) written beside calib.parquet: what the set is, how it was chosen, how to load it."""

from __future__ import annotations

from pathlib import Path

import yaml

from pascal_moe.balance.coverage import CoverageSummary

TAGS = ["calibration", "quantization", "mixture-of-experts", "pascal-moe"]


def _source_datasets(data: str | None) -> list[str]:
    """Hub ids the seed text came from (`name[:config]` -> name); `original` for local or bundled text."""
    if data and not Path(data).exists() and not data.startswith((".", "/", "~")):
        return [data.partition(":")[0]]
    return ["original"]


def front_matter(m: dict, data_file: str = "calib.parquet") -> str:
    """The YAML block the hub and `datasets.load_dataset(folder)` read: files, licence, task, sources, model."""
    model = str(m.get("model") or "")
    meta = {
        "license": "other",  # that of the seed texts and, for synthetic rows, the generating model's terms
        "task_categories": ["text-generation"],
        "tags": TAGS + ([f"base_model:{model}"] if model and not Path(model).exists() else []),
        "source_datasets": _source_datasets(m.get("seed_data")),
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_file}]}],
        "pascal_moe": {
            "model": model,
            "model_fingerprint": m.get("model_fingerprint"),
            "calib_sha256": m.get("calib_sha256"),
            "tokens": m.get("calib_tokens"),
        },
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, width=120) + "---\n"


def run_card(m: dict, calib_rel: str = "calib") -> str:
    """README.md at a build-calib run root, so `datasets.load_dataset(RUN)` loads `calib/calib.parquet` too."""
    return (
        front_matter(m, f"{calib_rel}/calib.parquet")
        + f"# build-calib run for `{m.get('model')}`\n\nThe calibration set is `{calib_rel}/calib.parquet` "
        f"({m.get('calib_tokens')} tokens in {m.get('calib_windows')} windows); its card, with coverage and "
        f"columns, is `{calib_rel}/README.md`. Stages: `profile/`, `synth/`, `synth_profile/`, `{calib_rel}/`.\n"
    )


def dataset_card(m: dict, random: CoverageSummary, after: CoverageSummary, predicted: CoverageSummary) -> str:
    """README.md with Hugging Face front matter so the folder loads as a dataset."""
    p = m["parameters"]
    rows = [
        ("experts below demand", "experts_below_demand", "{:d}"),
        ("experts with no tokens", "experts_without_tokens", "{:d}"),
        ("min tokens per expert", "min_tokens_per_expert", "{:.1f}"),
        ("median tokens per expert", "median_tokens_per_expert", "{:.1f}"),
        ("Gini of tokens per expert", "gini", "{:.3f}"),
        ("synthetic share (tokens)", "synthetic_share", "{:.1%}"),
        ("tokens", "tokens", "{:d}"),
        ("windows", "windows", "{:d}"),
        ("documents", "documents", "{:d}"),
    ]
    table = "\n".join(
        f"| {name} | {fmt.format(getattr(random, key))} | {fmt.format(getattr(after, key))} | "
        f"{fmt.format(getattr(predicted, key))} |"
        for name, key, fmt in rows
    )
    sources = ", ".join(f"{k}: {v}" for k, v in m["selection"]["sources"].items())
    return (
        front_matter(m)
        + f"""# Expert-balanced calibration set for `{m["model"]}`

{m["calib_tokens"]} tokens (budget {p["tokens"]}) in {m["calib_windows"]} windows of {p["seq_len"]} tokens (the last
may be shorter), packed from {m["calib_documents"]} documents ({sources}) joined with the tokenizer's EOS.
Selected by `pascal balance` to maximise sensitivity-weighted, saturated expert coverage per token:
{m["objective"]["formula"]}, with {m["objective"]["weight"]} and {m["objective"]["demand"]}.
At least {p["natural_share"]:.0%} of the tokens are random seed text; synthetic text is capped at
{p["max_synthetic_share"]:.0%} of the tokens.

## Coverage (tokens routed to each layer/expert, top-k membership)
"Measured" routes the windows themselves through `{m["measured_with"]}`; "predicted" sums the selected documents'
profiled counts; "random seed" is seed text drawn at random (seed {p["seed"]}) until it holds the same number of
tokens, packed and measured the same way.

| | random seed, same tokens (measured) | balanced (measured) | balanced (predicted) |
|---|---|---|---|
{table}

![coverage](coverage.png)

## Columns
One row per window: `input_ids` (tokenizer `{m["tokenizer"]}`), `n_tokens`, `text` (the window decoded),
`sample_ids`, `sources` (of the documents in the window), `source` (seed / synthetic / self / mixed), `keys`/`counts`
(measured routed tokens per layer·E+expert key).  Row order carries no meaning: use every row.
`documents.parquet` lists the selected documents: why each was picked (`selected_by`) and its windows.

## Use
```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="train")  # or: load_dataset("parquet", data_files="calib.parquet")
```
llm-compressor: `oneshot(model, dataset=ds.select_columns(["input_ids"]), ...)`; other quantizers:
`pascal export-calib --format autoround|gptqmodel|jsonl`.
Inputs, parameters and versions are in `manifest.json`. Licence: that of the seed text
(`{m.get("seed_data") or "the bundled seed corpus, see data/seed/README.md"}`) and, for synthetic rows, the terms of
the model that wrote them.
"""
    )
