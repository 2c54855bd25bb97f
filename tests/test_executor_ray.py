"""The Ray executor on a real local cluster (2 CPU workers, the session's cluster): same artifacts as local.

`pascal profile --executor ray --workers 2` against `--executor local` on the bundled Qwen3-MoE; a worker killed
mid-shard (the PASCAL_TEST_KILL_SHARD hook exits the actor's process) is restarted and its shard redone once;
a re-run skips shards already on disk; build-calib with `--executor ray` writes the same calib.parquet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from pascal_moe.executor import shards  # noqa: E402
from pascal_moe.executor.ray_pool import KILL_ENV, collect_ray, shutdown_pools  # noqa: E402
from pascal_moe.profile.config import ProfileConfig  # noqa: E402
from pascal_moe.profile.run import experts_frame, finish  # noqa: E402
from pascal_moe.profile.run import run as run_profile  # noqa: E402

N = 40  # samples: 5 shards of 8


@pytest.fixture(scope="module", autouse=True)
def cluster(ray_cluster):
    yield
    shutdown_pools()  # this module's pools (the session's cluster stays up)


def _cfg(model: Path, out: Path, **kw) -> ProfileConfig:
    base = dict(model=str(model), out=str(out), max_samples=N, seq_len=48, batch_size=4, shard_size=8, device="cpu")
    return ProfileConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def local_dir(qwen_dir, tmp_path_factory) -> Path:
    return run_profile(_cfg(qwen_dir, tmp_path_factory.mktemp("local")))


def test_profile_ray_two_workers_equals_local(qwen_dir, local_dir, tmp_path):
    out = run_profile(_cfg(qwen_dir, tmp_path / "ray", executor="ray", workers=2))
    ex, ref = pd.read_parquet(out / "experts.parquet"), pd.read_parquet(local_dir / "experts.parquet")
    assert (ex["tokens"] == ref["tokens"]).all() and ex["tokens"].sum() > 0
    assert (ex["boundary_tokens"] == ref["boundary_tokens"]).all()
    # float statistics to round-off: Ray's CPU actors run torch with one thread (num_cpus=1), the driver with
    # all cores, so matmul reductions (router logits) differ in the last fp32 bits (seen in CI: 1e-8 relative)
    for col in ("weight_mass", "margin_mean", "weight_error", "reroute_rate", "sensitivity"):
        np.testing.assert_allclose(ex[col], ref[col], rtol=1e-6, equal_nan=True, err_msg=col)
    s, sref = pd.read_parquet(out / "samples.parquet"), pd.read_parquet(local_dir / "samples.parquet")
    assert len(s) == N and s["sample_id"].is_unique and list(s["sample_id"]) == list(sref["sample_id"])
    assert all((a == b).all() for a, b in zip(s["counts"], sref["counts"])) and (s.n_tokens == sref.n_tokens).all()
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "triggers.parquet"), pd.read_parquet(local_dir / "triggers.parquet")
    )
    meta = json.loads((out / "profile.json").read_text())
    assert meta["totals"] == json.loads((local_dir / "profile.json").read_text())["totals"]
    assert not (out / "shards").exists() and "5 to run on 2 workers" in (out / "executor.log").read_text()


def test_build_calib_ray_writes_the_same_calib_parquet(qwen_dir, tmp_path, monkeypatch):
    from pascal_moe.pipeline import run as build_calib
    from pascal_moe.pipeline_config import BuildCalibConfig

    monkeypatch.setenv("OPENAI_BASE_URL", "")  # the offline `self` agent
    base = dict(
        model=str(qwen_dir),
        max_seed_samples=24,
        seed_pool_tokens=100000,
        sensitivity=False,
        rounds=1,
        samples_per_target=1,
        top_sensitive=2,
        self_tokens=8,
        tokens=1024,
        seq_len=64,
        batch_size=8,
        seed=3,
        device="cpu",
    )
    local = build_calib(BuildCalibConfig(**base, out=str(tmp_path / "local")))
    ray_run = build_calib(BuildCalibConfig(**base, out=str(tmp_path / "ray"), executor="ray", workers=2, shard_size=8))
    a, b = pd.read_parquet(local / "calib.parquet"), pd.read_parquet(ray_run / "calib.parquet")
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)
    assert "3 to run on 2 workers" in (tmp_path / "ray" / "profile" / "executor.log").read_text()


def test_synthetic_candidates_routed_on_ray_count_as_locally(qwen_dir, tmp_path):
    from pascal_moe.agent.config import SynthesizeConfig
    from pascal_moe.io.texts import load_texts
    from pascal_moe.pipeline import profile_candidates

    texts = load_texts(None, max_samples=60, split="train").texts[30:]
    synth = tmp_path / "synthetic.parquet"
    pd.DataFrame(
        {"sample_id": [f"s{i}" for i in range(30)], "text": texts, "accepted": [i % 3 > 0 for i in range(30)]}
    ).to_parquet(synth)
    scfg = SynthesizeConfig(model=str(qwen_dir), profile="p", out="o", seq_len=48, batch_size=4, device="cpu")
    local = profile_candidates(scfg, synth, tmp_path / "local")
    on_ray = profile_candidates(scfg, synth, tmp_path / "ray", runs_on=_cfg(qwen_dir, "x", executor="ray", workers=2))
    a, b = pd.read_parquet(local), pd.read_parquet(on_ray)
    assert len(a) == 20 and list(a.sample_id) == list(b.sample_id) and (a.n_tokens == b.n_tokens).all()
    assert all(list(x) == list(y) for x, y in zip(a["keys"], b["keys"])) and all(
        list(x) == list(y) for x, y in zip(a["counts"], b["counts"])
    )


def test_a_workers_user_error_is_one_line(qwen_dir, tmp_path):
    from pascal_moe.errors import PascalError

    with pytest.raises(PascalError) as e:  # the actor finds it: the driver never loads the model
        collect_ray(_cfg(qwen_dir, tmp_path / "bad", executor="ray", workers=2, seq_len=100000), ["one text"])
    assert str(e.value) == "--seq-len 100000 exceeds the model's max_position_embeddings 4096: lower --seq-len"


def test_killed_worker_shard_redone_once_and_rerun_skips_done_shards(qwen_dir, local_dir, tmp_path, monkeypatch):
    from pascal_moe.io.texts import load_texts

    cfg = _cfg(qwen_dir, tmp_path / "kill", executor="ray", workers=2)
    texts = load_texts(None, max_samples=N, split="train").texts
    collect_ray(cfg, texts)  # the module's pool is warm: every shard on disk
    root = tmp_path / "kill" / "shards"
    for i in (1, 3):
        shards.shard_file(root, i).unlink()  # as if the driver had stopped before shards 1 and 3 were written
    before = {i: shards.shard_file(root, i).stat().st_mtime_ns for i in (0, 2, 4)}
    monkeypatch.setenv(KILL_ENV, "1")  # the worker running shard 1 dies on its first attempt
    acc = collect_ray(cfg, texts)
    log = (tmp_path / "kill" / "executor.log").read_text()
    assert "3 already done, 2 to run" in log
    assert {i: shards.shard_file(root, i).stat().st_mtime_ns for i in before} == before  # not redone
    assert "redoing shard 1 (attempt 2)" in log and log.count("shard 1 done") == 2  # first run + the redo only
    ref = pd.read_parquet(local_dir / "experts.parquet")
    assert (experts_frame(finish(acc))["tokens"] == ref["tokens"]).all()  # the redone shard counted once
    assert [r.n_tokens for r in acc.counts.samples] == list(pd.read_parquet(local_dir / "samples.parquet").n_tokens)
