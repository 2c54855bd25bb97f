"""Several agent endpoints (--base-url more than once): client-side round-robin with per-endpoint health.

Real HTTP: two tests/fake_openai.py servers and a port where nobody listens, through the real openai client
and the real transport (retries, budget, cache).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

from pascal_moe.agent.backends import OpenAIBackend, make_backend  # noqa: E402
from pascal_moe.agent.client import ClientConfig, Request, run_requests_sync  # noqa: E402
from pascal_moe.agent.config import SynthesizeConfig  # noqa: E402
from pascal_moe.agent.endpoints import Endpoints, endpoint_list  # noqa: E402
from pascal_moe.errors import PascalError  # noqa: E402
from pascal_moe.settings import from_mapping  # noqa: E402

KEY = "sk-test-endpoints"
FAST = ClientConfig(backoff_initial_s=0.01, backoff_max_s=0.05, request_timeout_s=5.0, server_wait_s=3.0, concurrency=4)


def _dead_url() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


def _reqs(n: int) -> list[Request]:
    return [
        Request(f"r{i}", [{"role": "user", "content": f"say hi {i}"}], want_json=False, max_tokens=16) for i in range(n)
    ]


def test_endpoint_list_from_flags_yaml_and_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env:1/v1/")
    assert endpoint_list(["http://a/v1", "http://b/v1/", "http://a/v1"]) == ["http://a/v1", "http://b/v1"]
    assert endpoint_list("http://a/v1, http://b/v1") == ["http://a/v1", "http://b/v1"]
    assert endpoint_list(None) == endpoint_list([]) == ["http://env:1/v1"]
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert endpoint_list([]) == []
    cfg = from_mapping(SynthesizeConfig, {"model": "m", "profile": "p", "out": "o", "base_url": ["u1", "u2"]}, "t")
    assert endpoint_list(cfg.base_url) == ["u1", "u2"]


def test_one_endpoint_down_all_requests_served_by_the_other(monkeypatch):
    with FakeOpenAI(api_key=KEY) as up:
        monkeypatch.setenv("PASCAL_TEST_KEY", KEY)
        be = make_backend("openai", model=up.model, base_url=[_dead_url(), up.url], api_key_env="PASCAL_TEST_KEY")
        assert isinstance(be, Endpoints) and len(be.backends) == 2
        outs = run_requests_sync(be, _reqs(8), FAST)
        assert all(o.ok for o in outs) and up.n_chat == 8
        assert all(o.attempts == 1 for o in outs)  # the dead one was skipped, never charged as a failed attempt
        assert be.healthy() == [1]  # cooling down


def test_two_endpoints_share_the_load():
    with FakeOpenAI(api_key=KEY) as a, FakeOpenAI(api_key=KEY) as b:
        be = Endpoints([OpenAIBackend(s.url, s.model, KEY) for s in (a, b)])
        outs = run_requests_sync(be, _reqs(10), FAST)
        assert all(o.ok for o in outs) and a.n_chat + b.n_chat == 10 and min(a.n_chat, b.n_chat) >= 4


def test_all_endpoints_down_is_one_line():
    be = Endpoints([OpenAIBackend(_dead_url(), "m", KEY), OpenAIBackend(_dead_url(), "m", KEY)])
    with pytest.raises(PascalError) as e:
        asyncio.run(be.wait_ready(1.0))
    msg = str(e.value)
    assert "\n" not in msg and "none of the 2 agent endpoints" in msg and "--base-url" in msg
