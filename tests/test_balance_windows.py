"""Packed windows of `pascal balance` and the coverage measured on them.

The measured coverage is checked against an independent recount: the model's own router logits
(`output_router_logits=True`, transformers' code path, not our hooks), top-k per real token, one window
at a time in a shuffled order, so neither our capture code, the batching nor the row order is trusted.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pascal_moe.io.batches import pack_windows
from test_balance import QWEN, write_fake_profile


def test_pack_windows_joins_with_eos_and_keeps_every_token():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    p = pack_windows(docs, 4, sep_id=0)
    assert p.windows == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0], [10]]
    assert p.members == [[0], [1, 2], [2], [3]]  # a separator belongs to no document
    assert p.n_tokens == sum(map(len, docs)) + len(docs) - 1
    assert pack_windows(docs, 100, sep_id=None).windows == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    assert pack_windows([], 4, 0).windows == []


@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    from pascal_moe.balance.config import BalanceConfig
    from pascal_moe.balance.run import run

    d = tmp_path_factory.mktemp("bal")
    prof, syn = write_fake_profile(d, n_seed=200, n_synth=60)
    return run(
        BalanceConfig(
            profile=str(prof), out=str(d / "calib"), candidates=[str(syn)], tokens=2500, seq_len=64, batch_size=3
        )
    )


def _recount(input_ids: list[list[int]], E: int = 16, k: int = 2) -> np.ndarray:
    """Tokens per key [L*E] from the model's own router logits (no pascal hooks), one window per forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(QWEN), dtype=torch.float32).eval()
    total = None
    with torch.no_grad():
        for ids in input_ids:
            out = model(input_ids=torch.tensor([ids]), output_router_logits=True, use_cache=False)
            per_layer = [torch.bincount(z.topk(k, dim=-1).indices.reshape(-1), minlength=E) for z in out.router_logits]
            c = torch.cat(per_layer).numpy()  # [L*E]
            total = c if total is None else total + c
    return total


def test_measured_coverage_equals_an_independent_recount_in_any_row_order(balanced):
    calib = pd.read_parquet(balanced / "calib.parquet")
    cov = pd.read_parquet(balanced / "coverage.parquet").sort_values("key")
    shuffled = calib.sample(frac=1.0, random_state=7).reset_index(drop=True)  # row order must not matter
    recount = _recount([list(map(int, x)) for x in shuffled["input_ids"]])
    np.testing.assert_array_equal(cov["tokens_measured"].to_numpy(), recount)
    per_window = np.zeros(len(cov))
    for keys, counts in zip(shuffled["keys"], shuffled["counts"]):  # the rows' own counts add up to the same
        np.add.at(per_window, keys, counts)
    np.testing.assert_array_equal(per_window, recount)
    assert not np.allclose(cov["tokens_measured"], cov["tokens_predicted"])  # predicted is a separate column
