"""Shards without Ray: the plan, merge order and worker-count independence, resume bookkeeping, executor errors.

The merge test runs the real profiling pass per shard (bundled Qwen3-MoE, deepseek tiny model for sigmoid
routing) and compares with the one-pass local executor: counts exactly, float statistics to round-off.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from pascal_moe.errors import PascalError
from pascal_moe.executor import RAY_MISSING, check_executor, shards
from pascal_moe.io.texts import load_texts
from pascal_moe.models.loading import load_model, load_tokenizer
from pascal_moe.profile.accumulate import Profiler, merge
from pascal_moe.profile.config import ProfileConfig
from pascal_moe.profile.run import collect, experts_frame, finish

FLOATS = ["weight_mass", "margin_mean", "margin_p10", "margin_p50", "weight_error", "reroute_rate", "sensitivity"]


def test_plan_is_contiguous_batch_aligned_and_covers_every_sample_once():
    for n, size, bs in [(0, 8, 4), (1, 8, 4), (37, 10, 4), (64, 16, 16), (100, 3, 8)]:
        plan = shards.plan(n, size, bs)
        covered = [i for s in plan for i in range(s.start, s.stop)]
        assert covered == list(range(n))
        assert all(s.start % bs == 0 and (s.stop - s.start) % bs == 0 for s in plan[:-1])
        assert [s.index for s in plan] == list(range(len(plan)))
    assert shards.shard_size(10, 4) == 12 and shards.shard_size(8, 4) == 8


@pytest.fixture(scope="module")
def pool() -> list[str]:
    ts = load_texts(None, max_samples=200, split="train").texts
    return [t[: 30 + 23 * i] for i, t in enumerate(ts[::10][:19])]  # unequal lengths, 19 = not a batch multiple


def _cfg(tmp_path, **kw) -> ProfileConfig:
    base = dict(model="test", out=str(tmp_path), seq_len=48, batch_size=4, min_token_count=1, top_triggers=4)
    return ProfileConfig(**{**base, **kw})


@pytest.mark.parametrize("which", ["qwen", "deepseek"])
def test_merged_shards_equal_the_local_pass(which, qwen_dir, deepseek_dir, pool, tmp_path, one_torch_thread):
    d = {"qwen": qwen_dir, "deepseek": deepseek_dir}[which]
    model, tok = load_model(str(d), "cpu"), load_tokenizer(str(d))
    cfg = _cfg(tmp_path)
    local = collect(model, tok, pool, cfg, progress=False)
    ref = experts_frame(local)
    prof = Profiler(model, tok, cfg)
    for size in (4, 8, 12):  # worker count never enters; shard size only moves float summation order
        parts = [prof.run(pool[s.start : s.stop], s.start) for s in shards.plan(len(pool), size, cfg.batch_size)]
        got = finish(merge(parts))
        ex = experts_frame(got)
        assert (ex["tokens"] == ref["tokens"]).all() and (ex["boundary_tokens"] == ref["boundary_tokens"]).all()
        assert got.counts.n_tokens == local.counts.n_tokens
        for a, b in zip(got.counts.samples, local.counts.samples, strict=True):
            assert a.n_tokens == b.n_tokens and (a.keys == b.keys).all() and (a.counts == b.counts).all()
        for col in FLOATS:
            np.testing.assert_allclose(ex[col], ref[col], rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=col)
        np.testing.assert_allclose(got.layer_jaccard, local.layer_jaccard, rtol=1e-12)
        t_got, t_ref = got.triggers.frame(tok, 1, 4), local.triggers.frame(tok, 1, 4)
        pd.testing.assert_frame_equal(t_got.drop(columns=["lift", "weight"]), t_ref.drop(columns=["lift", "weight"]))
        np.testing.assert_allclose(t_got[["lift", "weight"]], t_ref[["lift", "weight"]], rtol=1e-9)


def test_slice_must_start_on_a_batch_boundary(qwen_dir, pool, tmp_path):
    prof = Profiler(load_model(str(qwen_dir), "cpu"), load_tokenizer(str(qwen_dir)), _cfg(tmp_path, sensitivity=False))
    with pytest.raises(ValueError, match="multiple of the batch size"):
        prof.run(pool[2:6], 2)


def test_resume_keeps_shards_of_the_same_plan_and_drops_stale_ones(tmp_path):
    root = tmp_path / "shards"
    plan = shards.plan(10, 4, 2)
    key = shards.plan_key(_cfg(tmp_path), ["a", "b"])
    shards.prepare(root, key)
    shards.save({"x": 1}, shards.shard_file(root, 0))
    shards.save({"x": 2}, shards.shard_file(root, 2))
    assert not list(root.glob("*.tmp")) and shards.load(shards.shard_file(root, 2)) == {"x": 2}
    moved = shards.plan_key(_cfg(tmp_path, workers=5, executor="ray", out="/elsewhere"), ["a", "b"])
    shards.prepare(root, moved)  # where it runs is not part of the plan: shards kept
    assert shards.done(root, plan) == {0, 2}
    shards.prepare(root, shards.plan_key(_cfg(tmp_path), ["a", "c"]))  # other data: stale shards dropped
    assert shards.done(root, plan) == set()


def test_executor_settings_are_one_line_errors(tmp_path, monkeypatch):
    for kw, msg in [
        ({"executor": "spark"}, "--executor must be local or ray"),
        ({"workers": 0}, "--workers must be at least 1"),
        ({"gpus_per_worker": -1.0}, "--gpus-per-worker"),
        ({"shard_size": 0}, "--shard-size must be at least 1"),
    ]:
        with pytest.raises(PascalError, match=msg) as e:
            check_executor(_cfg(tmp_path, **kw))
        assert "\n" not in str(e.value)
    check_executor(_cfg(tmp_path))  # local needs no Ray
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    check_executor(_cfg(tmp_path))
    with pytest.raises(PascalError) as e:
        check_executor(_cfg(tmp_path, executor="ray"))
    assert str(e.value) == RAY_MISSING and "pascal-moe[ray]" in str(e.value)


def test_cli_takes_the_executor_options_and_says_what_is_wrong(qwen_dir, tmp_path):
    import os
    import subprocess

    args = [sys.executable, "-m", "pascal_moe.cli", "profile", "--model", str(qwen_dir), "--out", str(tmp_path / "p")]
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    bad = subprocess.run([*args, "--executor", "spark", "--workers", "2"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--executor must be local or ray" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()
