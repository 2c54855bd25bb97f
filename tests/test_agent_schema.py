"""Portable structured output: the schema the server sees, bounds enforced by clipping, fallbacks per server kind.

The servers are tests/fake_openai.py (real HTTP, the real openai client): one that obeys JSON
types but ignores every length bound, and one that offers JSON mode only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

from pascal_moe.agent.backends import OpenAIBackend  # noqa: E402
from pascal_moe.agent.client import ClientConfig, Request, run_requests_sync  # noqa: E402
from pascal_moe.agent.prompts import TargetBrief, Trigger, analyse_prompt, generate_prompt  # noqa: E402
from pascal_moe.agent.schema import BOUND_KEYS, clip, cut_text, portable  # noqa: E402

FAST = ClientConfig(
    backoff_initial_s=0.01, backoff_max_s=0.05, request_timeout_s=5.0, server_wait_s=5.0, max_attempts=2
)
PATS = [{"name": "loops", "description": "Python loops.", "experts": ["L1.E1"], "example_phrases": ["for i"]}]


def _keys(schema: dict) -> set[str]:
    """Every keyword used anywhere in a schema (property names are not keywords)."""
    out = set(schema)
    for v in schema.get("properties", {}).values():
        out |= _keys(v)
    return out | (_keys(schema["items"]) if isinstance(schema.get("items"), dict) else set())


def test_portable_drops_every_bound_and_requires_every_field():
    full = generate_prompt(PATS, {"code": 1.0}, n_passages=4, words=50).schema
    p = portable(full)
    assert not _keys(p) & set(BOUND_KEYS)
    item = p["properties"]["passages"]["items"]
    assert item["required"] == ["text", "pattern"] and item["additionalProperties"] is False
    assert list(item["properties"]) == ["text", "pattern"]  # text first, so a small model writes it first
    assert full["properties"]["passages"]["maxItems"] == 4  # the full schema is left as it was


def test_cut_text_at_sentence_end():
    text = "First sentence here. Second one is longer than that. Third never fits in."
    assert cut_text(text, 60) == "First sentence here. Second one is longer than that."
    assert cut_text(text, 500) == text
    assert cut_text("word " * 40, 50).endswith("word") and len(cut_text("word " * 40, 50)) <= 50


def test_clip_makes_an_overlong_reply_valid():
    full = generate_prompt(PATS, {"code": 1.0}, n_passages=2, words=10).schema
    limit = full["properties"]["passages"]["items"]["properties"]["text"]["maxLength"]
    long = " ".join(f"Sentence {i} says something." for i in range(60))
    value = {
        "passages": [
            {"text": long, "pattern": "p" * 500},
            {"text": "ok text.", "pattern": "q"},
            {"text": "extra.", "pattern": "r"},
            {"text": "   ", "pattern": "s"},
        ]
    }
    got = clip(value, full)
    jsonschema.validate(got, full)
    assert len(got["passages"]) == 2 and got["passages"][0]["text"].endswith("something.")
    assert len(got["passages"][0]["text"]) > limit // 2


def _reqs(n: int) -> list[Request]:
    t = TargetBrief("L1.E1", "starved", [Trigger("for", 3.0, 20)], ["a [[for]] loop"])
    out = []
    for i in range(n):
        r = analyse_prompt([t], {"code": 1.0}) if i % 2 else generate_prompt(PATS, {"code": 1.0}, 3, 40)
        out.append(Request(f"r{i}", r.messages, r.schema, max_tokens=4096, seed=i))
    return out


def test_server_ignoring_bounds_replies_are_clipped_not_rejected(tmp_path):
    with FakeOpenAI(ignore_bounds=True) as srv:
        reqs = _reqs(4)
        outs = run_requests_sync(OpenAIBackend(srv.url, srv.model), reqs, FAST, tmp_path)
        sent = [r["response_format"]["json_schema"]["schema"] for r in srv.records]
    assert all(o.ok and o.attempts == 1 for o in outs), [o.error for o in outs]
    assert not any(_keys(s) & set(BOUND_KEYS) for s in sent)  # the portable subset went out
    for r, o in zip(reqs, outs):
        jsonschema.validate(o.value, r.schema)  # bounds hold after clipping
        raw = json.loads(o.text)
        assert len(json.dumps(raw)) > len(json.dumps(o.value))  # the server's reply really was overlong
    gen = outs[0].value["passages"]
    assert len(gen) == 3 and all(p["text"].endswith(".") for p in gen)


def test_json_mode_only_server_gets_json_object():
    with FakeOpenAI(json_mode_only=True) as srv:
        be = OpenAIBackend(srv.url, srv.model)
        reqs = _reqs(3)
        outs = run_requests_sync(be, reqs, ClientConfig(**{**_fast(), "concurrency": 1}))
        kinds = [(r["response_format"] or {}).get("type") for r in srv.records]
    assert all(o.ok for o in outs) and not be.structured and be.json_mode
    assert kinds[0] == "json_schema" and set(kinds[1:]) == {"json_object"}
    for r, o in zip(reqs, outs):
        jsonschema.validate(o.value, r.schema)


def test_server_without_any_structured_output_gets_plain_text():
    with FakeOpenAI(reject_response_format=True) as srv:
        be = OpenAIBackend(srv.url, srv.model)
        outs = run_requests_sync(be, _reqs(2), ClientConfig(**{**_fast(), "concurrency": 1}))
        kinds = [(r["response_format"] or {}).get("type") for r in srv.records]
    assert all(o.ok for o in outs) and not be.structured and not be.json_mode
    assert kinds == ["json_schema", "json_object", None, None]


def _fast() -> dict:
    return {k: getattr(FAST, k) for k in FAST.__slots__}


def test_missing_optional_label_is_filled_not_rejected():
    full = generate_prompt(PATS, {"code": 1.0}, n_passages=2, words=10).schema
    got = clip({"passages": [{"text": "A whole passage."}]}, full)
    assert got == {"passages": [{"text": "A whole passage.", "pattern": ""}]}
    jsonschema.validate(got, full)
    # an item without text is dropped; with none left the reply stays invalid (minItems 1) and is retried
    kept = clip({"passages": [{"pattern": "x"}, {"text": "Kept."}]}, full)["passages"]
    assert kept == [{"text": "Kept.", "pattern": ""}]
    assert clip({"passages": [{"pattern": "x"}]}, full) == {"passages": []}


def test_bounds_are_sent_only_when_asked(tmp_path):
    with FakeOpenAI() as srv:
        run_requests_sync(OpenAIBackend(srv.url, srv.model, send_bounds=True), _reqs(1), FAST)
        sent = srv.records[0]["response_format"]["json_schema"]["schema"]
    assert "maxItems" in _keys(sent) and "maxLength" in _keys(sent)
