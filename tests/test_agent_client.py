"""The agent client over a real HTTP connection (tests/fake_openai.py) with the real openai client.

Covers: every injected fault is survived, retries give the right value, the token budget
stops cleanly, a killed or cancelled run resumes without re-sending what succeeded, the
API key is never written, plus reply JSON extraction and prompt rendering.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

from pascal_moe.agent.backends import (
    MicroBatcher,
    OpenAIBackend,
    generate_many,
    make_backend,  # noqa: E402
    resolve_api_key,
)
from pascal_moe.agent.client import (
    AgentClient,
    ClientConfig,
    Request,
    read_log,
    run_requests,  # noqa: E402
    run_requests_sync,
)
from pascal_moe.agent.reply_json import JSONExtractError, extract_json  # noqa: E402
from pascal_moe.agent.prompts import (
    PassageFeedback,
    TargetBrief,
    Trigger,  # noqa: E402
    analyse_prompt,
    generate_prompt,
    refine_prompt,
    render,
    reply_tokens,
)
from pascal_moe.errors import PascalError  # noqa: E402

KEY = "sk-test-d0-not-leak-7f3a9c"
ROOT = Path(__file__).resolve().parents[1]
FAST = dict(backoff_initial_s=0.01, backoff_max_s=0.05, request_timeout_s=2.0, server_wait_s=5.0)


def target(i: int) -> TargetBrief:
    return TargetBrief(
        f"L{i % 4}.E{i}",
        "starved",
        [Trigger(f"tok{i}", 3.5, 40), Trigger("def", 2.0, 12)],
        [f"for x in range(3): [[tok{i}]] = x + 1", f"the [[tok{i}]] of a [[def]]"],
        share=0.002,
        uniform_share=0.0625,
    )


def reqs(n: int, offset: int = 0) -> list[Request]:
    out = []
    for i in range(offset, offset + n):
        r = analyse_prompt([target(i)], {"code": 0.4, "prose": 0.6})
        out.append(
            Request(
                f"r{i}",
                r.messages,
                schema=r.schema,
                max_tokens=512,
                seed=i,
                meta={"template_sha256": r.template_sha256},
            )
        )
    return out


@pytest.fixture
def server():
    with FakeOpenAI(api_key=KEY) as srv:
        yield srv


def backend(srv: FakeOpenAI) -> OpenAIBackend:
    return OpenAIBackend(base_url=srv.url, model=srv.model, api_key=KEY)


def cfg(**kw: float) -> ClientConfig:
    return ClientConfig(**{**FAST, "concurrency": 4, **kw})


def assert_no_key(run_dir: Path) -> None:
    for p in run_dir.rglob("*"):
        if p.is_file():
            assert KEY not in p.read_text(encoding="utf-8", errors="replace"), p


# --- faults ------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", ["429", "500", "503", "disconnect", "timeout", "malformed", "truncated", "empty", "schema_violation"]
)
def test_each_fault_is_survived(server: FakeOpenAI, tmp_path: Path, fault: str) -> None:
    server.timeout_delay_s = 1.5
    server.script(fault)
    t0 = time.perf_counter()
    [out] = run_requests_sync(backend(server), reqs(1), cfg(request_timeout_s=0.5), tmp_path)
    elapsed = time.perf_counter() - t0
    assert out.ok and out.attempts == 2, out
    jsonschema.validate(out.value, out_schema())
    assert sum(server.counts.values()) == 1 and server.n_chat == 2
    if fault == "429":
        assert elapsed >= server.retry_after_s  # retry-after honoured
    [rec] = read_log(tmp_path / "agent_log.jsonl")
    assert rec["status"] == "ok" and rec["attempts"] == 2 and len(rec["errors"]) == 1 and not rec["cached"]
    assert_no_key(tmp_path)


def out_schema() -> dict:
    return analyse_prompt([target(0)], {"x": 1.0}).schema


def test_transport_retry_returns_the_same_value_as_a_clean_run(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY) as clean:
        [expected] = run_requests_sync(backend(clean), reqs(1), cfg())
    with FakeOpenAI(api_key=KEY) as srv:
        srv.script("500", "429", "503")
        [got] = run_requests_sync(backend(srv), reqs(1), cfg())
    assert got.ok and got.attempts == 4 and got.value == expected.value


def test_truncated_reply_is_retried_with_more_tokens(server: FakeOpenAI) -> None:
    server.script("truncated")
    [out] = run_requests_sync(backend(server), reqs(1), cfg())
    assert out.ok and out.finish_reason == "stop"
    first, second = server.records
    assert (first["max_tokens"], second["max_tokens"]) == (512, 1024) and second["seed"] != first["seed"]


def test_random_faults_all_survived_and_nothing_answered_twice(tmp_path: Path) -> None:
    with FakeOpenAI(
        api_key=KEY,
        fault_rate=0.35,
        fault_seed=3,
        fault_kinds=("429", "500", "503", "disconnect", "malformed", "truncated", "empty", "schema_violation"),
    ) as srv:
        srv.retry_after_s = 0.02
        outs = run_requests_sync(backend(srv), reqs(24), cfg(concurrency=8, max_attempts=10), tmp_path)
        assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
        assert srv.n_chat > 24 and sum(srv.counts.values()) == 24 and not srv.duplicates()
    assert [o.id for o in outs] == [f"r{i}" for i in range(24)]
    assert_no_key(tmp_path)


def test_gives_up_and_keeps_the_raw_reply(server: FakeOpenAI, tmp_path: Path) -> None:
    server.script("malformed", "malformed", "malformed")
    [out] = run_requests_sync(backend(server), reqs(1), cfg(max_attempts=3), tmp_path)
    assert out.status == "failed" and out.attempts == 3 and "formatting went wrong" in out.text
    assert "unparsable" in out.error
    [rec] = read_log(tmp_path / "agent_log.jsonl")
    assert rec["status"] == "failed" and "formatting went wrong" in rec["raw"] and len(rec["errors"]) == 3
    assert not list((tmp_path / "cache").rglob("*.json"))  # failures are not cached: a re-run tries again
    [again] = run_requests_sync(backend(server), reqs(1), cfg(), tmp_path)
    assert again.ok and not again.cached


def test_server_refusing_response_format_falls_back_to_prompted_json() -> None:
    with FakeOpenAI(api_key=KEY, reject_response_format=True) as srv:
        be = backend(srv)
        outs = run_requests_sync(be, reqs(3), cfg(concurrency=1))
    assert all(o.ok for o in outs) and not be.structured
    assert "```json" in outs[0].text  # the fake wraps prompted JSON in prose; reply_json recovered it
    jsonschema.validate(outs[0].value, out_schema())


def test_waits_for_a_starting_server() -> None:
    with FakeOpenAI(api_key=KEY, startup_s=0.8) as srv:
        t0 = time.perf_counter()
        [out] = run_requests_sync(backend(srv), reqs(1), cfg())
        assert out.ok and out.attempts == 1 and time.perf_counter() - t0 >= 0.8


def test_server_that_never_comes_up_is_a_one_line_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    be = OpenAIBackend(base_url=f"http://127.0.0.1:{port}/v1", model="m")
    t0 = time.perf_counter()
    with pytest.raises(PascalError, match="not ready after"):
        run_requests_sync(be, reqs(2), cfg(server_wait_s=0.6))
    assert time.perf_counter() - t0 < 5


def test_wrong_key_is_a_one_line_error(server: FakeOpenAI) -> None:
    be = OpenAIBackend(base_url=server.url, model=server.model, api_key="wrong")
    with pytest.raises(PascalError, match="API key"):
        run_requests_sync(be, reqs(1), cfg())


def test_empty_model_name_is_taken_from_the_server(server: FakeOpenAI) -> None:
    be = OpenAIBackend(base_url=server.url, api_key=KEY)
    [out] = run_requests_sync(be, reqs(1), cfg())
    assert out.ok and be.model == server.model


def test_identical_requests_are_sent_once(server: FakeOpenAI) -> None:
    r = reqs(1)[0]
    twin = Request("twin", r.messages, schema=r.schema, max_tokens=r.max_tokens, seed=r.seed)
    outs = run_requests_sync(backend(server), [r, twin], cfg())
    assert [o.id for o in outs] == ["r0", "twin"] and outs[0].value == outs[1].value
    assert server.n_chat == 1


# --- budget, cache, resume -------------------------------------------------


def test_budget_stops_cleanly_and_a_rerun_finishes(server: FakeOpenAI, tmp_path: Path) -> None:
    be = backend(server)
    [probe] = run_requests_sync(be, reqs(1, offset=100), cfg())
    per_request = probe.prompt_tokens + probe.completion_tokens
    outs = run_requests_sync(be, reqs(10), cfg(concurrency=1, max_tokens_budget=3 * per_request), tmp_path)
    statuses = [o.status for o in outs]
    k = statuses.count("ok")  # about 3: each request costs about `per_request`
    assert 2 <= k <= 4 and statuses == ["ok"] * k + ["budget_exhausted"] * (10 - k)
    log = read_log(tmp_path / "agent_log.jsonl")
    assert any(r.get("event") == "budget_exhausted" for r in log)
    sent = server.n_chat
    again = run_requests_sync(be, reqs(10), cfg(concurrency=1), tmp_path)
    assert all(o.ok for o in again) and sum(o.cached for o in again) == statuses.count("ok")
    assert server.n_chat - sent == 10 - statuses.count("ok") and not server.duplicates()


def test_one_client_keeps_the_budget_across_rounds(server: FakeOpenAI, tmp_path: Path) -> None:
    client = AgentClient(backend(server), cfg(concurrency=1, max_tokens_budget=1), tmp_path)
    first = client.run_sync(reqs(2))
    second = client.run_sync(reqs(2, offset=2))
    assert [o.status for o in first + second] == ["ok"] + ["budget_exhausted"] * 3
    assert client.budget_exhausted and client.tokens_spent > 1 and server.n_chat == 1


def test_cancelled_run_resumes_without_resending(tmp_path: Path) -> None:
    with FakeOpenAI(api_key=KEY, latency_s=0.05) as srv:
        be = backend(srv)

        async def cancel_midway() -> None:
            task = asyncio.create_task(run_requests(be, reqs(30), cfg(concurrency=2), tmp_path))
            while sum(srv.counts.values()) < 8:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_midway())
        done = len(list((tmp_path / "cache").rglob("*.json")))
        assert 8 - 2 <= done < 30  # the 2 in flight may have been answered but not yet received
        outs = run_requests_sync(be, reqs(30), cfg(concurrency=8), tmp_path)
        assert all(o.ok for o in outs) and sum(o.cached for o in outs) == done
        assert sum(srv.counts.values()) <= 30 + 2  # at most the 2 in flight at the cancel were answered twice


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_agent_client import reqs, cfg
from pascal_moe.agent.backends import make_backend
from pascal_moe.agent.client import run_requests_sync
be = make_backend("openai", model="fake-agent", base_url={url!r}, api_key_env="PASCAL_TEST_KEY")
run_requests_sync(be, reqs(40), cfg(concurrency=3), {run_dir!r})
"""


def test_killed_run_resumes_without_resending(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with FakeOpenAI(api_key=KEY, latency_s=0.03) as srv:
        code = _CHILD.format(tests=str(Path(__file__).parent), url=srv.url, run_dir=str(run_dir))
        env = {**os.environ, "PASCAL_TEST_KEY": KEY}
        child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
        try:
            deadline = time.monotonic() + 30
            while sum(srv.counts.values()) < 12 and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            assert child.poll() is None, "child finished before it could be killed"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.wait(10)
        files = list((run_dir / "cache").rglob("*.json"))
        for f in files:  # every entry present is whole
            json.loads(f.read_text())
        received_before = set(srv.received)  # includes requests still being answered to the dead child
        assert 12 - 3 <= len(files) < 40  # up to 3 answered but not yet received when killed
        outs = run_requests_sync(backend(srv), reqs(40), cfg(concurrency=8), run_dir)
        assert all(o.ok for o in outs) and sum(o.cached for o in outs) == len(files)
        # what the killed run had cached was not sent again; only its in-flight requests (at most its
        # concurrency, 3: sent or answered but not yet written) may repeat
        resent = {h for h, n in srv.counts.items() if n > 1}
        assert len(resent) <= 3 and resent <= received_before
    log = read_log(run_dir / "agent_log.jsonl")
    assert sum(r.get("cached", False) for r in log) == len(files)
    assert_no_key(run_dir)


# --- backends, keys ------------------------------------------------------------


def test_api_key_comes_from_env_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASCAL_TEST_KEY", KEY)
    assert resolve_api_key("PASCAL_TEST_KEY") == KEY
    assert resolve_api_key("PASCAL_TEST_UNSET_KEY") == "EMPTY"
    (tmp_path / "key").write_text(KEY + "\n")
    assert resolve_api_key("PASCAL_TEST_UNSET_KEY", tmp_path / "key") == KEY
    be = make_backend("openai", base_url="http://127.0.0.1:9/v1", api_key_env="PASCAL_TEST_KEY")
    assert KEY not in repr(be)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(PascalError, match="--base-url"):
        make_backend("openai")


def test_vllm_missing_is_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setenv("PASCAL_VLLM_PYTHON", "/nonexistent/python")  # and no .venv-vllm to serve from
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed")
    except ImportError:
        pass
    with pytest.raises(PascalError, match=r"vLLM is not installed: run `bash scripts/setup.sh --with-vllm`"):
        make_backend("vllm", model="m")


def test_generate_many_is_a_plain_fan_out(server: FakeOpenAI) -> None:
    rs = reqs(3)
    outs = generate_many(backend(server), [(r.messages, r.schema) for r in rs], concurrency=3, seed=1)
    assert len(outs) == 3 and all(o.finish_reason == "stop" and json.loads(o.text) for o in outs)
    assert server.n_chat == 3 and outs[0].raw and outs[0].prompt_tokens > 0


def test_micro_batcher_batches_concurrent_calls() -> None:
    calls: list[list[int]] = []

    def fn(items: list[int]) -> list[int]:
        calls.append(items)
        return [i * 10 for i in items]

    async def main() -> list[int]:
        mb = MicroBatcher(fn, max_batch=4, wait_s=0.01)
        return list(await asyncio.gather(*(mb.submit(i) for i in range(10))))

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2]


# --- reply_json -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ('{"a": 1}', {"a": 1}),
        ('Sure!\n```json\n{"a": [1, 2,],}\n```\nAnything else?', {"a": [1, 2]}),
        ("{'a': 'it\\'s', 'b': True, 'c': None}", {"a": "it's", "b": True, "c": None}),
        ('Here: {name: "x", n: 3} done', {"name": "x", "n": 3}),
        ('[{"a": 1}, {"a": 2', [{"a": 1}]),
        ('{"a": "line1\nline2"}', {"a": "line1\nline2"}),
        ('{"a": 1, "b":', {"a": 1}),
        ('The answer is [1, 2] and {"x": {"y": [true]}}', [1, 2]),
    ],
)
def test_extract_json(text: str, expected: object) -> None:
    assert extract_json(text) == expected


def test_extract_json_accept_picks_the_valid_candidate() -> None:
    trunc = '{"passages":[{"pattern":"a","text":"x"},{"pattern":"b","text":"cut mid-sen'
    whole = extract_json(trunc, accept=lambda v: all("text" in p for p in v["passages"]))
    assert whole == {"passages": [{"pattern": "a", "text": "x"}]}  # the half-written passage is dropped
    assert extract_json('see [1] then {"x": "y"}', accept=lambda v: isinstance(v, dict)) == {"x": "y"}
    with pytest.raises(JSONExtractError):  # a wrapper object is not searched for a valid inner value
        extract_json('{"unexpected": {"a": 1}}', accept=lambda v: "a" in v)


@pytest.mark.parametrize("text", ["", "   ", "no json here", "I think (a, b) is fine", "42", '"just a string"'])
def test_extract_json_raises(text: str) -> None:
    with pytest.raises(JSONExtractError):
        extract_json(text)


# --- prompts -------------------------------------------------------------------


def test_prompts_render_with_stable_template_hash(tmp_path: Path) -> None:
    a = analyse_prompt([target(1), target(2)], {"code": 3.0, "prose": 1.0})
    assert a.template_sha256 == analyse_prompt([target(9)], {"x": 1.0}).template_sha256
    user = a.messages[1]["content"]
    assert "## L1.E1" in user and "[[tok1]]" in user and "75%" in user and "$" not in user
    pats = [{"name": "loop_vars", "description": "Python loops.", "experts": ["L1.E1"], "example_phrases": ["for i"]}]
    g = generate_prompt(pats, {"code": 1.0}, n_passages=5, words=120)
    assert "exactly 5 passages" in g.messages[1]["content"]
    items = g.schema["properties"]["passages"]  # bounded, so a schema-enforcing server must close the JSON
    assert items["maxItems"] == 5 and items["items"]["properties"]["text"]["maxLength"] >= 2 * 6 * 120
    assert all(
        a.schema["properties"]["patterns"]["items"]["properties"][k]["maxLength"] > 0 for k in ("name", "description")
    )
    assert reply_tokens(g.schema) * 3 >= 5 * items["items"]["properties"]["text"]["maxLength"]
    assert reply_tokens(a.schema) * 3 >= 4 * (80 + 300)  # every pattern's name and description fit
    fb = PassageFeedback("loop_vars", "for i in range(3): pass", 0.12, 0.03, ["L1.E1"])
    r = refine_prompt(pats, [fb], [], n_passages=4, words=100)
    assert "ratio 4.00" in r.messages[1]["content"] and "(none)" in r.messages[1]["content"]
    assert len({a.template_sha256, g.template_sha256, r.template_sha256}) == 3
    (tmp_path / "system.md").write_text("sys")
    (tmp_path / "generate.md").write_text("needs $missing")
    with pytest.raises(PascalError, match=r"needs a value for \$missing"):
        render("generate", {}, {}, tmp_path)


def test_vllm_backend_passes_dtype_eager_and_no_seed() -> None:
    be = make_backend("openai", base_url="http://127.0.0.1:9/v1", send_seed=False)
    assert isinstance(be, OpenAIBackend) and not be.send_seed
    from pascal_moe.agent.backends import VLLMBackend

    v = VLLMBackend(model="m", dtype="float32", send_seed=False)
    assert v.engine_args() == {
        "model": "m",
        "max_model_len": 8192,
        "gpu_memory_utilization": 0.85,
        "enforce_eager": True,
        "dtype": "float32",
    }
    assert "dtype" not in VLLMBackend(model="m").engine_args()


def test_cli_error_keeps_brackets_of_the_install_hint(tmp_path: Path) -> None:
    """rich markup would eat `[vllm]` from "pip install 'pascal-moe[vllm]'"; the CLI escapes error text."""
    code = (
        "import sys; from pascal_moe import cli; from pascal_moe.errors import PascalError\n"
        "def boom(): raise PascalError(\"vLLM is not installed: pip install 'pascal-moe[vllm]'\")\n"
        "cli.app = boom; cli.main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "1000"}
    )
    assert proc.returncode == 2 and "pascal-moe[vllm]" in proc.stderr, proc.stderr
