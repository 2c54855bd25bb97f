"""`pascal synthesize` end to end: the agent loop over a real HTTP server, resume, and one-line errors.

The agent is tests/fake_openai.py (a real OpenAI-compatible server on 127.0.0.1), the
model the trained bundled Qwen3-MoE, the profile DIR a real `pascal profile` run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_openai import FakeOpenAI  # noqa: E402

from pascal_moe.agent.config import SynthesizeConfig  # noqa: E402
from pascal_moe.agent.loop import COLUMNS, resolve_agent, run  # noqa: E402
from pascal_moe.agent.targets import Target, group_targets, load_profile, pick_targets  # noqa: E402
from pascal_moe.errors import PascalError  # noqa: E402

CONTRACT = [
    "sample_id",
    "text",
    "source",
    "targets",
    "pattern",
    "round",
    "backend",
    "agent_model",
    "prompt_hash",
    "n_tokens",
    "keys",
    "counts",
    "target_hits",
    "target_rate",
    "baseline_rate",
    "hit_ratio",
    "accepted",
]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs the model with one intra-op thread (see conftest)."""


def cfg_for(model: Path, profile: Path, out: Path, **kw) -> SynthesizeConfig:
    base = dict(
        model=str(model),
        profile=str(profile),
        out=str(out),
        agent="openai",
        rounds=2,
        samples_per_target=3,
        targets="starved",
        starved_ratio=0.25,
        group_size=4,
        accept_ratio=1.0,
        seq_len=64,
        device="cpu",
        passage_words=40,
        max_attempts=3,
        backoff=0.01,
        ready_timeout=5.0,
        request_timeout=10.0,
        ppl_percentile=0.0,
    )  # the fake agent writes word salad: these tests are about the loop, not the screen
    return SynthesizeConfig(**{**base, **kw})


def test_agent_loop_end_to_end_and_rerun_sends_nothing(qwen_dir, profile_dir, tmp_path):
    prof = profile_dir(qwen_dir)
    out = tmp_path / "syn"
    with FakeOpenAI() as srv:
        path = run(cfg_for(qwen_dir, prof, out, base_url=srv.url))
        sent = srv.n_chat
        df = pd.read_parquet(path)
        assert sent > 0 and len(df) > 0
        assert set(CONTRACT) <= set(df.columns) and list(df.columns) == COLUMNS
        assert set(df["source"]) == {"synthetic"} and set(df["backend"]) == {"openai"}
        assert set(df["agent_model"]) == {srv.model}
        assert df["sample_id"].is_unique
        schema = pq.read_schema(path)
        assert schema.field("keys").type == pa.list_(pa.int32()) == schema.field("counts").type
        # Every measured row: hits recomputed from keys/counts and its targets; the flag follows the threshold.
        n_exp = load_profile(prof).n_experts
        measured = df[df["n_tokens"] > 0]
        assert len(measured) > 0
        for r in measured.itertuples():
            want = {int(t[1:].split(".E")[0]) * n_exp + int(t.split(".E")[1]) for t in r.targets}
            hits = sum(int(c) for k, c in zip(r.keys, r.counts) if int(k) in want)
            assert r.target_hits == hits and np.isclose(r.target_rate, hits / r.n_tokens)
            assert np.isclose(r.accept_threshold, 1.0 * r.baseline_rate)
            assert bool(r.accepted) == (hits > 0 and r.target_rate >= r.accept_threshold)
        assert df.loc[df["n_tokens"] == 0, "accepted"].eq(False).all()  # screened out: never accepted
        assert df["accepted"].any()
        assert (df["round"] == 2).any(), "round 2 should run for groups still uncovered"
        log = pd.read_json(out / "agent_log.jsonl", lines=True)
        steps = {m.get("step") for m in log["meta"] if isinstance(m, dict)}
        assert {"analyse", "generate", "refine"} <= steps
        report = (out / "report.md").read_text()
        assert "Coverage gained per target expert" in report and (out / "coverage.png").stat().st_size > 0
        before = df.copy()
        # Re-run: finished rounds are read back, analyses come from state.json; nothing new is sent.
        run(cfg_for(qwen_dir, prof, out, base_url=srv.url))
        assert srv.n_chat == sent
        assert not srv.duplicates()
        pd.testing.assert_frame_equal(pd.read_parquet(path), before)


def test_rerun_after_lost_round_is_served_from_cache(qwen_dir, profile_dir, tmp_path):
    """A crash after the requests but before the round's part file: the re-run re-sends them, all cached."""
    prof = profile_dir(qwen_dir)
    out = tmp_path / "syn"
    with FakeOpenAI() as srv:
        run(cfg_for(qwen_dir, prof, out, base_url=srv.url, rounds=1))
        sent = srv.n_chat
        (out / "parts" / "round-01.parquet").unlink()
        (out / "state.json").unlink()
        run(cfg_for(qwen_dir, prof, out, base_url=srv.url, rounds=1))
        assert srv.n_chat == sent and len(pd.read_parquet(out / "synthetic.parquet")) > 0


def test_token_budget_stops_cleanly_and_resumes(qwen_dir, profile_dir, tmp_path):
    prof = profile_dir(qwen_dir)
    out = tmp_path / "syn"
    with FakeOpenAI() as srv:
        run(cfg_for(qwen_dir, prof, out, base_url=srv.url, rounds=1, max_tokens_budget=1))
        first = srv.n_chat
        assert first > 0 and len(pd.read_parquet(out / "synthetic.parquet")) == 0  # analyses only, then stop
        run(cfg_for(qwen_dir, prof, out, base_url=srv.url, rounds=1))
        assert srv.n_chat > first and not srv.duplicates()
        assert len(pd.read_parquet(out / "synthetic.parquet")) > 0


def test_every_request_failing_is_a_one_line_error_after_the_report(qwen_dir, profile_dir, tmp_path):
    prof = profile_dir(qwen_dir)
    out = tmp_path / "syn"
    with FakeOpenAI(fault_rate=1.0, fault_kinds=("malformed",)) as srv:
        with pytest.raises(PascalError, match=r"every agent request failed \((\d+) of \1\).*unparsable") as e:
            run(cfg_for(qwen_dir, prof, out, base_url=srv.url, rounds=1))
        assert srv.n_chat > 0 and "\n" not in str(e.value)
    assert len(pd.read_parquet(out / "synthetic.parquet")) == 0
    report = (out / "report.md").read_text()
    assert "generate_failed" in report and "analyse_failed" in report
    log = pd.read_json(out / "agent_log.jsonl", lines=True)
    failed = log[log["status"] == "failed"]
    assert len(failed) > 0 and failed["raw"].str.contains("formatting went wrong").all()


@pytest.mark.parametrize("kind", ["ignore_bounds", "json_mode_only"])
def test_servers_without_full_structured_output_lose_no_group(qwen_dir, profile_dir, tmp_path, kind):
    """Types obeyed but no length bound (3x too long, too many items), or JSON mode only: every group is judged."""
    prof = profile_dir(qwen_dir)
    out = tmp_path / "syn"
    with FakeOpenAI(**{kind: True}) as srv:
        run(cfg_for(qwen_dir, prof, out, base_url=srv.url, rounds=1, ppl_percentile=95.0))
    log = pd.read_json(out / "agent_log.jsonl", lines=True)
    assert (log["status"] == "ok").all() and (log["attempts"] == 1).all(), log[["status", "errors"]]
    df = pd.read_parquet(out / "synthetic.parquet")
    state = __import__("json").loads((out / "state.json").read_text())
    groups = set(state["patterns"])
    assert groups and set(df["group"]) == groups  # every group's passages judged: none lost to a length violation
    assert (df.groupby("group").size() == 3).all()  # extra passages dropped, not rejected
    assert df["text"].str.len().max() <= 12 * 40 + 200


def test_text_format_one_passage_per_request_no_json(qwen_dir, profile_dir, tmp_path):
    prof = profile_dir(qwen_dir)
    out = tmp_path / "syn"
    with FakeOpenAI() as srv:
        run(cfg_for(qwen_dir, prof, out, base_url=srv.url, rounds=1, agent_format="text"))
        assert all(r["response_format"] is None for r in srv.records)
        n_groups = len(__import__("json").loads((out / "state.json").read_text())["patterns"])
        assert srv.n_chat == 3 * n_groups  # one request per passage, no analyse request
    log = pd.read_json(out / "agent_log.jsonl", lines=True)
    assert {m["step"] for m in log["meta"]} == {"generate_text"}
    df = pd.read_parquet(out / "synthetic.parquet")
    assert len(df) == 3 * n_groups and (df["n_tokens"] > 0).any()
    with pytest.raises(PascalError, match="--agent-format"):
        run(cfg_for(qwen_dir, prof, tmp_path / "x", base_url=srv.url, agent_format="yaml"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_one_line_error(qwen_dir, profile_dir, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(PascalError) as e:
        run(cfg_for(qwen_dir, profile_dir(qwen_dir), tmp_path / "syn", base_url=url, ready_timeout=0.5))
    msg = str(e.value)
    assert url in msg and "--agent self" in msg and "start it" in msg and "\n" not in msg


def test_profile_of_another_model_is_one_line_error(qwen_dir, profile_dir, tiny_moe_dir, tmp_path):
    other = tiny_moe_dir("qwen3_moe")  # 2 MoE layers x 8 experts: the profile's keys mean nothing there
    with pytest.raises(PascalError, match="MoE layers x 8 experts but .* profiled on 4 x 16"):
        run(cfg_for(other, profile_dir(qwen_dir), tmp_path / "syn", agent="self"))


def test_missing_profile_dir_is_one_line_error(tmp_path):
    with pytest.raises(PascalError, match="profile directory not found"):
        run(SynthesizeConfig(model="unused", profile=str(tmp_path / "nope"), out=str(tmp_path / "o"), agent="self"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pascal_moe.cli",
            "synthesize",
            "--model",
            "m",
            "--profile",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "1000"},
    )  # rich wraps at 80 otherwise
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "profile directory not found" in lines[0] and "Traceback" not in proc.stderr


def test_auto_agent(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    c = SynthesizeConfig(model="m", profile="p", out="o")
    assert resolve_agent(c) == "self"
    assert resolve_agent(SynthesizeConfig(model="m", profile="p", out="o", base_url="http://x/v1")) == "openai"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert resolve_agent(c) == "openai"
    with pytest.raises(PascalError, match="unknown --agent"):
        resolve_agent(SynthesizeConfig(model="m", profile="p", out="o", agent="gpt"))


def _profile_stub(shares: list[list[float]], sens: list[list[float]]):
    rows = [
        {"layer": l, "expert": e, "share": s, "sensitivity": sens[l][e], "tokens": int(s * 1000)}
        for l, layer in enumerate(shares)
        for e, s in enumerate(layer)
    ]
    samples = pd.DataFrame(
        {
            "sample_id": ["a"],
            "text": ["t"],
            "source": ["seed"],
            "domain": ["prose"],
            "n_tokens": [100],
            "keys": [[0, 1]],
            "counts": [[50, 50]],
        }
    )
    from pascal_moe.agent.targets import Profile

    trig = pd.DataFrame(columns=["layer", "expert", "kind", "rank", "token_id", "token", "count", "lift", "context"])
    return Profile(Path("."), {"n_experts": len(shares[0]), "n_layers": len(shares)}, pd.DataFrame(rows), samples, trig)


def test_pick_targets_starved_and_sensitive():
    # Layer 0 shares sum to 1 (uniform 0.25); expert 3 is starved at 0.02 < 0.25 * 0.25.
    prof = _profile_stub([[0.4, 0.3, 0.28, 0.02], [0.25, 0.25, 0.25, 0.25]], [[0.1, 0.2, 0.3, 0.0], [0.9, 0, 0, 0.5]])
    starved = pick_targets(prof, "starved", 0.25, 2)
    assert [t.id for t in starved] == ["L0.E3"] and starved[0].reason == "starved"
    both = pick_targets(prof, "starved,sensitive", 0.25, 2)
    assert {t.id: t.reason for t in both} == {"L0.E3": "starved", "L1.E0": "sensitive", "L1.E3": "sensitive"}
    with pytest.raises(PascalError):
        pick_targets(prof, "rare", 0.25, 2)


def test_group_targets_by_trigger_overlap():
    def t(i: int, ids: set[int]) -> Target:
        return Target(0, i, i, "starved", 0.0, 0.1, 0.0, 0, frozenset(ids))

    a, b, c, d = t(0, {1, 2, 3}), t(1, {50, 51}), t(2, {2, 3, 4}), t(3, {3, 1, 2, 9})
    groups = group_targets([a, b, c, d], group_size=2)
    ids = [[x.expert for x in g] for g in groups]
    assert ids[0] == [0, 3]  # a's best overlap is d (Jaccard 3/4), not c (2/4)
    assert [1] in ids and [2] in ids  # b shares nothing with c: separate requests
    assert all(len(g) <= 2 for g in groups)


def test_cli_openai_run_ends_without_traceback(qwen_dir, profile_dir, tmp_path):
    """The HTTP pool is closed inside its event loop: no "Event loop is closed" traceback at exit."""
    prof = profile_dir(qwen_dir)
    with FakeOpenAI(ignore_bounds=True) as srv:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pascal_moe.cli",
                "synthesize",
                "--model",
                str(qwen_dir),
                "--profile",
                str(prof),
                "--out",
                str(tmp_path / "syn"),
                "--agent",
                "openai",
                "--base-url",
                srv.url,
                "--rounds",
                "1",
                "--samples-per-target",
                "2",
                "--targets",
                "starved",
                "--seq-len",
                "64",
                "--device",
                "cpu",
                "--agent-format",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "COLUMNS": "1000"},
        )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    assert "passages accepted" in proc.stderr
