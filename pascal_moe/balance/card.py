"""The dataset card (README.md) written beside calib.parquet: what the set is, how it was chosen, how to load it."""

from __future__ import annotations

from pascal_moe.balance.coverage import CoverageSummary


def dataset_card(m: dict, random: CoverageSummary, after: CoverageSummary, predicted: CoverageSummary) -> str:
    """README.md with Hugging Face front matter so the folder loads as a dataset."""
    p = m["parameters"]
    rows = [("experts below demand", "experts_below_demand", "{:d}"), ("experts with no tokens",
            "experts_without_tokens", "{:d}"), ("min tokens per expert", "min_tokens_per_expert", "{:.1f}"),
            ("median tokens per expert", "median_tokens_per_expert", "{:.1f}"), ("Gini of tokens per expert",
            "gini", "{:.3f}"), ("synthetic share (tokens)", "synthetic_share", "{:.1%}"), ("tokens", "tokens", "{:d}"),
            ("windows", "windows", "{:d}"), ("documents", "documents", "{:d}")]
    table = "\n".join(f"| {name} | {fmt.format(getattr(random, key))} | {fmt.format(getattr(after, key))} | "
                      f"{fmt.format(getattr(predicted, key))} |" for name, key, fmt in rows)
    sources = ", ".join(f"{k}: {v}" for k, v in m["selection"]["sources"].items())
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: calib.parquet
tags: [calibration, quantization, mixture-of-experts, pascal-moe]
---
# Expert-balanced calibration set for `{m['model']}`

{m['calib_tokens']} tokens (budget {p['tokens']}) in {m['calib_windows']} windows of {p['seq_len']} tokens (the last
may be shorter), packed from {m['calib_documents']} documents ({sources}) joined with the tokenizer's EOS.
Selected by `pascal balance` to maximise sensitivity-weighted, saturated expert coverage per token:
{m['objective']['formula']}, with {m['objective']['weight']} and {m['objective']['demand']}.
At least {p['natural_share']:.0%} of the tokens are random seed text; synthetic text is capped at
{p['max_synthetic_share']:.0%} of the tokens.

## Coverage (tokens routed to each layer/expert, top-k membership)
"Measured" routes the windows themselves through `{m['measured_with']}`; "predicted" sums the selected documents'
profiled counts; "random seed" is seed text drawn at random (seed {p['seed']}) until it holds the same number of
tokens, packed and measured the same way.

| | random seed, same tokens (measured) | balanced (measured) | balanced (predicted) |
|---|---|---|---|
{table}

![coverage](coverage.png)

## Columns
One row per window: `input_ids` (tokenizer `{m['tokenizer']}`), `n_tokens`, `text` (the window decoded),
`sample_ids`, `sources` (of the documents in the window), `source` (seed / synthetic / self / mixed), `keys`/`counts`
(measured routed tokens per layer·E+expert key).  Row order carries no meaning: use every row.
`documents.parquet` lists the selected documents: why each was picked (`selected_by`) and its windows.

## Use
```python
from datasets import load_dataset
ds = load_dataset("parquet", data_files="calib.parquet", split="train")
```
llm-compressor: `oneshot(model, dataset=ds.select_columns(["input_ids"]), ...)`; other quantizers:
`pascal export-calib --format autoround|gptqmodel|jsonl`.
Inputs, parameters and versions are in `manifest.json`.
"""
