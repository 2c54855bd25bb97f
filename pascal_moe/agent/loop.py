"""`pascal synthesize`: write text for starved and sensitive experts, verified on the real router.

Per target group and round: (1) analyse: the agent names the trigger patterns from
trigger tokens, lifts and contexts (once per group, kept in state.json); (2) generate
(round 1) or refine (later rounds, with last round's hits and misses): passages that
exercise the patterns; (3) verify: screen degenerate text, route it through the target
model, accept on the measured target-hit rate.  A group stops once each of its experts
got `cover_tokens` tokens from accepted passages.  With `--agent self` steps 1-2 are
replaced by the target model writing its own steered text (self_sampling.py).

Resume: each round's rows go to parts/round-NN.parquet and are merged into
synthetic.parquet atomically; a re-run reads finished rounds back instead of redoing
them, and every agent request it re-sends is answered from the response cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from pascal_moe.agent import prompts as P
from pascal_moe.agent import text_mode as TM
from pascal_moe.agent.analysis import check_patterns, fallback_patterns
from pascal_moe.agent.client import AgentLog
from pascal_moe.agent.config import SynthesizeConfig
from pascal_moe.agent.dedup import NearDuplicates
from pascal_moe.agent.passes import ModelPasses, model_passes
from pascal_moe.agent.perplexity import PerplexityBound
from pascal_moe.agent.readable import annotate_pieces
from pascal_moe.agent.screen import expected_script
from pascal_moe.agent.report import write_report
from pascal_moe.agent.targets import Profile, TargetGroup, build_groups, domain_mix, load_profile
from pascal_moe.agent.verify import Measured, Rejections, verify
from pascal_moe.errors import PascalError
from pascal_moe.executor import check_executor
from pascal_moe.io.artifacts import fingerprint_model, fingerprint_obj, read_json, write_json, write_parquet
from pascal_moe.io.batches import check_seq_len

console = Console(stderr=True)
COLUMNS = [
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
    "accept_threshold",
    "reject_reason",
    "group",
]
# Settings that change what a round produces: a re-run into the same --out must match them.
RESULT_SETTINGS = (
    "model",
    "profile",
    "agent",
    "agent_model",
    "agent_format",
    "rounds",
    "samples_per_target",
    "targets",
    "starved_ratio",
    "top_sensitive",
    "group_size",
    "accept_ratio",
    "passage_words",
    "ppl_percentile",
    "temperature",
    "seq_len",
    "seed",
    "cover_tokens",
    "self_tokens",
    "self_width",
    "self_bonus",
)
PPL_SEED_TEXTS = 256  # seed texts whose NLL sets the perplexity ceilings
MAX_FEEDBACK = 4  # hits and misses each shown to the agent in a refine prompt


def resolve_agent(cfg: SynthesizeConfig) -> str:
    """`auto` is openai when an endpoint is configured (--base-url or OPENAI_BASE_URL), else self."""
    agent = cfg.agent.strip().lower()
    if agent == "auto":
        return "openai" if (cfg.base_url or os.environ.get("OPENAI_BASE_URL", "").strip()) else "self"
    if agent not in ("openai", "vllm", "self"):
        raise PascalError(f"unknown --agent {cfg.agent!r}: use openai, vllm, self or auto")
    return agent


@dataclass
class GroupState:
    """What the loop knows about one group between rounds."""

    group: TargetGroup
    patterns: list[dict[str, Any]] = field(default_factory=list)
    added: Counter = field(default_factory=Counter)  # key -> tokens from accepted passages
    feedback: list[P.PassageFeedback] = field(default_factory=list)  # last round's passages
    sources: list[str] = field(default_factory=list)  # real texts routing to the group (text mode's examples)

    def uncovered(self, cover_tokens: int) -> list[int]:
        return [k for k in self.group.keys if self.added[k] < cover_tokens]

    def absorb(self, rows: pd.DataFrame, n_experts: int) -> None:
        mine = rows[rows["group"] == self.group.gid]
        self.feedback = []
        for r in mine.itertuples():
            if r.accepted:
                self.added.update({int(k): int(c) for k, c in zip(r.keys, r.counts) if int(k) in self.group.keys})
            if r.n_tokens:
                hit = sorted(
                    {f"L{int(k) // n_experts}.E{int(k) % n_experts}" for k in r.keys if int(k) in self.group.keys}
                )
                self.feedback.append(P.PassageFeedback(r.pattern, r.text, r.target_rate, r.baseline_rate, hit))


class RoundStore:
    """parts/round-NN.parquet per finished round; synthetic.parquet = their merge, rewritten atomically."""

    def __init__(self, out: Path):
        self.out, self.parts = out, out / "parts"

    def part(self, rnd: int) -> Path:
        return self.parts / f"round-{rnd:02d}.parquet"

    def load(self, rnd: int) -> pd.DataFrame | None:
        return pd.read_parquet(self.part(rnd)) if self.part(rnd).is_file() else None

    def chunk(self, rnd: int, c: int) -> Path:
        return self.parts / "chunks" / f"round-{rnd:02d}-c{c:03d}.parquet"

    def load_chunk(self, rnd: int, c: int) -> pd.DataFrame | None:
        return pd.read_parquet(self.chunk(rnd, c)) if self.chunk(rnd, c).is_file() else None

    def commit_chunk(self, rnd: int, c: int, rows: list[dict[str, Any]]) -> pd.DataFrame:
        df = _frame(rows)
        write_parquet(df, self.chunk(rnd, c))
        return df

    def commit(self, rnd: int, rows: list[dict[str, Any]]) -> pd.DataFrame:
        df = _frame(rows)
        write_parquet(df, self.part(rnd))
        write_parquet(self.merged(), self.out / "synthetic.parquet")
        return df

    def merged(self) -> pd.DataFrame:
        parts = sorted(self.parts.glob("round-*.parquet")) if self.parts.is_dir() else []
        frames = [f for f in (pd.read_parquet(p) for p in parts) if not f.empty]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
        return df.drop_duplicates("sample_id", keep="first").reset_index(drop=True)


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("keys", "counts"):  # list<int32>, as in samples.parquet (docs/CONTRACTS.md)
        df[col] = [np.asarray(v, dtype=np.int32) for v in df[col]]
    return df


def make_row(
    text: str,
    g: TargetGroup,
    pattern: str,
    rnd: int,
    source: str,
    backend: str,
    agent_model: str,
    prompt_hash: str,
    m: Measured,
) -> dict[str, Any]:
    sid = "syn-" + hashlib.sha256(f"{g.gid}\0{text}".encode()).hexdigest()[:16]
    return {
        "sample_id": sid,
        "text": text,
        "source": source,
        "targets": g.ids,
        "pattern": pattern,
        "round": rnd,
        "backend": backend,
        "agent_model": agent_model,
        "prompt_hash": prompt_hash,
        **asdict(m),
        "group": g.gid,
    }


def _seed(cfg: SynthesizeConfig, *parts: object) -> int:
    return int(hashlib.sha256(json.dumps([cfg.seed, *parts]).encode()).hexdigest()[:8], 16)


def _check_settings(cfg: SynthesizeConfig) -> None:
    if cfg.agent_format not in ("json", "text"):
        raise PascalError(f"--agent-format {cfg.agent_format!r}: use json or text")
    for name in ("rounds", "samples_per_target", "seq_len", "batch_size", "self_tokens", "self_width", "max_attempts"):
        if getattr(cfg, name) < 1:
            raise PascalError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.accept_ratio <= 0:
        raise PascalError(f"--accept-ratio must be positive (got {cfg.accept_ratio})")
    check_executor(cfg)


def _check_shape(model: Any, profile: Profile, cfg: SynthesizeConfig) -> None:
    """Expert keys only mean the same thing on a model with the profile's MoE layers and experts."""
    from pascal_moe.models import moe_layers

    layers = moe_layers(model)
    got, want = (len(layers), layers[0].spec.n_experts), (int(profile.meta["n_layers"]), profile.n_experts)
    if got != want:
        raise PascalError(
            f"{cfg.model} has {got[0]} MoE layers x {got[1]} experts but {cfg.profile} was profiled on "
            f"{want[0]} x {want[1]} ({profile.meta.get('model')}): pass the profiled model with --model"
        )


def _open_state(cfg: SynthesizeConfig, out: Path, agent: str) -> dict[str, Any]:
    """state.json: the settings fingerprint (a re-run must match it), resolved agent model, patterns, failures."""
    unchecked = {} if cfg.verify_routing else {"verify_routing": False}  # absent when on: older runs still resume
    fp = fingerprint_obj({k: getattr(cfg, k) for k in RESULT_SETTINGS} | {"agent": agent} | unchecked)
    path = out / "state.json"
    if path.is_file():
        state = read_json(path)
        if state.get("settings") != fp:
            raise PascalError(
                f"{out} holds a synthesize run with different settings: use a new --out or the same "
                "settings to resume it"
            )
        return state
    return {"settings": fp, "agent_model": None, "patterns": {}, "failures": {}}


def run(cfg: SynthesizeConfig) -> Path:
    """Run (or resume) the stage; returns the path of synthetic.parquet."""
    _check_settings(cfg)
    profile = load_profile(cfg.profile)
    agent = resolve_agent(cfg)
    model_fp = fingerprint_model(cfg.model, cfg.revision)
    if model_fp != profile.meta.get("model_fingerprint", model_fp):
        # Files beside the weights (a card, a README) change the fingerprint too: warn, and check the shape below.
        console.print(
            f"[yellow]warning:[/] the files of {cfg.model} changed since {cfg.profile} was profiled "
            f"(on {profile.meta.get('model')}); re-profile if the weights changed"
        )
    groups = build_groups(profile, cfg.targets, cfg.starved_ratio, cfg.top_sensitive, cfg.group_size)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = _open_state(cfg, out, agent)
    store, rejections = RoundStore(out), Rejections()
    states = [GroupState(g) for g in groups]
    tally: RequestTally | None = None
    backend = _backend(cfg, agent, state) if agent != "self" and groups else None
    if backend is not None and not all(store.part(r).is_file() for r in range(1, cfg.rounds + 1)):
        asyncio.run(_ready(backend, cfg.ready_timeout))  # before loading the model: fail fast on a dead endpoint
    if not groups:
        console.print("[yellow]no target experts[/] under these settings: nothing to synthesize")
    else:
        from pascal_moe.models.loading import load_model, load_tokenizer

        tok = load_tokenizer(cfg.model, cfg.revision)
        if cfg.executor == "ray" and agent != "self":  # the router check runs on the actors: a skeleton for checks
            import torch

            from pascal_moe.models.placement import empty_model

            model = empty_model(cfg.model, torch.float32, cfg.revision)
        else:
            model = load_model(cfg.model, cfg.device, cfg.dtype, cfg.max_memory, cfg.offload_dir, revision=cfg.revision)
        for g in groups:  # name the script of byte-level pieces (their text is U+FFFD)
            for b in g.briefs:
                annotate_pieces(b.triggers, tok)
        check_seq_len(cfg.seq_len, model)
        _check_shape(model, profile, cfg)
        verifier = _Verifier(model_passes(cfg, model, tok), cfg, profile, rejections)
        if agent == "self":
            _self_rounds(cfg, profile, states, store, verifier, model, tok)
        else:
            tally = asyncio.run(_agent_rounds(cfg, profile, states, store, verifier, state, backend, out))
    write_json(state, out / "state.json")
    df = store.merged()
    write_parquet(df, out / "synthetic.parquet")
    write_report(out, cfg, agent, profile, groups, df, state.get("failures", {}), state.get("analysis"))
    if tally is not None:
        tally.check()  # after the report, which counts the failures by kind
    console.print(f"synthesize: {int(df['accepted'].sum()) if len(df) else 0} of {len(df)} passages accepted -> {out}")
    return out / "synthetic.parquet"


@dataclass
class _Verifier:
    passes: ModelPasses  # the router check's forwards: this process, or shards on the Ray pool (--executor ray)
    cfg: SynthesizeConfig
    profile: Profile
    rejections: Rejections
    pool: NearDuplicates | None = None  # seed texts + passages kept so far (built on first use)
    ppl: PerplexityBound | None = None  # seed NLL ceilings (built on first use when cfg.ppl_percentile > 0)

    def rows(
        self, items: list[tuple[str, TargetGroup, str, str]], rnd: int, source: str, backend: str, agent_model: str
    ) -> list[dict[str, Any]]:
        """items: (text, group, pattern, prompt_hash) -> synthetic.parquet rows."""
        if self.pool is None:
            seed = self.profile.seed_samples()
            self.pool = NearDuplicates(seed["text"].astype(str) if "text" in seed.columns else [])
            if self.cfg.ppl_percentile > 0 and "text" in seed.columns and len(seed):
                sample = seed["text"].astype(str).sample(min(len(seed), PPL_SEED_TEXTS), random_state=0).tolist()
                self.ppl = PerplexityBound.from_nll(*self.passes.nll(sample), self.cfg.ppl_percentile)
        scripts = [expected_script([t.token for b in g.briefs for t in b.triggers[:12]]) for _, g, *_ in items]
        checked = self.cfg.verify_routing
        measured = verify(
            [t for t, *_ in items],
            [g.keys for _, g, *_ in items],
            [g.baseline_rate for _, g, *_ in items],
            None,
            None,
            accept_ratio=self.cfg.accept_ratio,
            seq_len=self.cfg.seq_len,
            batch_size=self.cfg.batch_size,
            rejections=self.rejections if checked else None,
            scripts=scripts,
            pool=self.pool,
            ppl=self.ppl,
            passes=self.passes,
        )
        if not checked:  # EBSS-style: the screen still applies, the hit-rate test does not
            from pascal_moe.agent.self_sampling import unverified

            measured = unverified(measured, self.rejections)
        return [
            make_row(t, g, pat, rnd, source, backend, agent_model, h, m) for (t, g, pat, h), m in zip(items, measured)
        ]


def _fallback_patterns(g: TargetGroup) -> list[dict[str, Any]]:
    return fallback_patterns(g.briefs)


def _backend(cfg: SynthesizeConfig, agent: str, state: dict[str, Any]) -> Any:
    from pascal_moe.agent.backends import make_backend

    if agent == "vllm" and cfg.executor == "ray":  # one `vllm serve` per Ray actor (agent/vllm_ray.py)
        from pascal_moe.agent.vllm_ray import ray_backend

        return ray_backend(cfg, cfg.agent_model or state.get("agent_model") or "")
    return make_backend(
        agent,
        model=cfg.agent_model or state.get("agent_model") or "",
        base_url=cfg.base_url,
        api_key_env=cfg.api_key_env,
        api_key_file=cfg.api_key_file,
        dtype=cfg.agent_dtype,
        enforce_eager=cfg.enforce_eager,
        send_seed=cfg.request_seed,
        send_bounds=cfg.schema_bounds,
    )


def _unreachable(e: PascalError) -> PascalError:
    """The backend's not-ready error, plus the way out that needs no server."""
    return PascalError(f"{e}, or use --agent self (no server needed)") if "not ready" in str(e) else e


async def _ready(backend: Any, timeout_s: float) -> None:
    """Wait for the server; its connections are closed inside this event loop (else a traceback at exit)."""
    try:
        await backend.wait_ready(timeout_s)
    except PascalError as e:
        raise _unreachable(e) from e
    finally:
        await backend.aclose()


@dataclass
class RequestTally:
    """Agent requests of this run by outcome, so a run in which every one failed can say why and exit non-zero."""

    sent: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)

    def add(self, outcomes: list[Any]) -> None:
        for o in outcomes:
            if o.status == "budget_exhausted":
                continue
            self.sent += 1
            self.ok += o.ok
            if not o.ok:
                self.errors[o.error.split(":")[0] + ": " + o.error.split(":", 1)[-1].strip()[:120]] += 1

    def check(self) -> None:
        if self.sent and not self.ok:
            cause, n = self.errors.most_common(1)[0] if self.errors else ("unknown", self.sent)
            raise PascalError(f"every agent request failed ({self.sent} of {self.sent}); most often ({n}x): {cause}")


def _analyses(cfg: SynthesizeConfig, need: list[GroupState], outcomes: list[Any], state: dict[str, Any]) -> None:
    """Keep each group's checked patterns (analysis.py); fall back to trigger patterns when none survive."""
    stats = state.setdefault("analysis", {"patterns": 0, "dropped": 0, "fallback_groups": 0, "reasons": {}})
    failures = state.setdefault("failures", {})
    for s, o in zip(need, outcomes):
        if o.status == "budget_exhausted":  # retried on the next run
            continue
        if not o.ok:
            failures[f"analyse_{o.status}"] = failures.get(f"analyse_{o.status}", 0) + 1
        check = check_patterns(o.value["patterns"] if o.ok else [], s.group.briefs)
        stats["patterns"] += len(check.kept) + len(check.dropped)
        stats["dropped"] += len(check.dropped)
        for _, why in check.dropped:
            key = why.split(":")[0]
            stats["reasons"][key] = stats["reasons"].get(key, 0) + 1
        stats["fallback_groups"] += not check.kept
        state["patterns"][s.group.gid] = check.kept or _fallback_patterns(s.group)


def _generate_requests(
    cfg: SynthesizeConfig, s: GroupState, rnd: int, mix: dict[str, float], patterns: list[dict[str, Any]]
) -> list[tuple[Any, P.Rendered, str]]:
    """(request, rendered prompt, pattern name or '' when the reply names it) for one group and round."""
    from pascal_moe.agent.client import Request

    hits = [f for f in s.feedback if f.hit_rate >= cfg.accept_ratio * f.baseline_rate][:MAX_FEEDBACK]
    meta = {"group": s.group.gid, "round": rnd}
    if cfg.agent_format == "text":
        return _text_requests(cfg, s, rnd, meta)
    misses = [f for f in s.feedback if f not in hits][:MAX_FEEDBACK]
    r = (
        P.refine_prompt(patterns, hits, misses, cfg.samples_per_target, cfg.passage_words)
        if rnd > 1 and s.feedback
        else P.generate_prompt(patterns, mix, cfg.samples_per_target, cfg.passage_words)
    )
    return [
        (
            Request(
                f"{r.step}-{s.group.gid}-r{rnd}",
                r.messages,
                r.schema,
                max_tokens=P.reply_tokens(r.schema),
                temperature=cfg.temperature,
                seed=_seed(cfg, s.group.gid, rnd),
                meta={"step": r.step, **meta},
            ),
            r,
            "",
        )
    ]


def _text_requests(
    cfg: SynthesizeConfig, s: GroupState, rnd: int, meta: dict[str, Any]
) -> list[tuple[Any, P.Rendered, str]]:
    """One plain-text request per passage: imitate a real excerpt, continue a real opening (agent/text_mode.py)."""
    from pascal_moe.agent.client import Request
    from pascal_moe.agent.readable import trigger_kind

    kinds = [
        trigger_kind([t.token for t in b.triggers[:12]], [t.script for t in b.triggers[:12]]) for b in s.group.briefs
    ]
    kind = next((k for k in kinds if k), None)
    n = cfg.samples_per_target
    out = []
    for i, shot in enumerate(TM.shots(s.sources, n * rnd)[n * (rnd - 1) :]):
        r = P.text_prompt(shot.example, shot.opening, cfg.passage_words, f"It should be {kind[1]}." if kind else "")
        req = Request(
            f"text-{s.group.gid}-r{rnd}-{i}",
            r.messages,
            None,
            max_tokens=4 * cfg.passage_words + 64,
            temperature=cfg.temperature,
            seed=_seed(cfg, s.group.gid, rnd, i),
            want_json=False,
            meta={"step": r.step, **meta, "opening": shot.opening},
        )
        out.append((req, r, "continue: " + " ".join(shot.opening.split()[:6])))
    return out


def _passages(o: Any, pattern: str, opening: str = "") -> list[tuple[str, str]]:
    """(text, pattern) pairs from one successful reply; a plain-text reply continues `opening`."""
    if isinstance(o.value, str):
        return [(TM.passage(o.value, opening), pattern)]
    return [(str(p["text"]), str(p["pattern"])) for p in o.value["passages"]]


async def _agent_rounds(
    cfg: SynthesizeConfig,
    profile: Profile,
    states: list[GroupState],
    store: RoundStore,
    verifier: _Verifier,
    state: dict[str, Any],
    backend: Any,
    out: Path,
) -> RequestTally:
    from pascal_moe.agent.client import AgentClient, ClientConfig, Request

    client = AgentClient(
        backend,
        ClientConfig(
            concurrency=cfg.concurrency,
            max_attempts=cfg.max_attempts,
            backoff_initial_s=cfg.backoff,
            backoff_max_s=max(cfg.backoff * 16, cfg.backoff),
            request_timeout_s=cfg.request_timeout,
            max_tokens_budget=cfg.max_tokens_budget or None,
            server_wait_s=cfg.ready_timeout,
        ),
        run_dir=out,
    )
    mix = domain_mix(profile)
    failures: dict[str, int] = state.setdefault("failures", {})
    tally = RequestTally()

    async def send(reqs: list[Request]):
        try:
            outcomes = await client.run(reqs)
        except PascalError as e:
            raise _unreachable(e) from e
        tally.add(outcomes)
        state["agent_model"] = backend.model
        write_json(state, out / "state.json")
        return outcomes

    try:
        for rnd in range(1, cfg.rounds + 1):
            # A round cut short by the token budget is redone on a re-run (its replies come from the cache).
            done = store.load(rnd) if state.get("partial_round") != rnd else None
            active = [s for s in states if s.uncovered(cfg.cover_tokens)]
            if done is None and not active:
                break
            if done is None:
                need = [s for s in active if s.group.gid not in state["patterns"]]
                if need and cfg.agent_format == "text":  # small models: no analyse step, trigger patterns
                    for s in need:
                        state["patterns"][s.group.gid] = _fallback_patterns(s.group)
                if cfg.agent_format == "text":
                    for s in active:
                        s.sources = s.sources or TM.group_sources(
                            profile.seed_samples(),
                            [c for b in s.group.briefs for c in b.contexts],
                            s.group.keys,
                            cfg.samples_per_target * cfg.rounds + 1,
                        )
                elif need:
                    reqs = []
                    for s in need:
                        r = P.analyse_prompt(s.group.briefs, mix)
                        reqs.append(
                            Request(
                                f"analyse-{s.group.gid}",
                                r.messages,
                                r.schema,
                                max_tokens=P.reply_tokens(r.schema),
                                temperature=cfg.temperature,
                                seed=_seed(cfg, s.group.gid, "analyse"),
                                meta={"step": "analyse", "group": s.group.gid},
                            )
                        )
                    _analyses(cfg, need, await send(reqs), state)
                planned = [
                    (s, *x)
                    for s in active
                    for x in _generate_requests(
                        cfg, s, rnd, mix, state["patterns"].get(s.group.gid) or _fallback_patterns(s.group)
                    )
                ]
                outcomes = await send([req for _, req, _, _ in planned])
                items = []
                for (s, req, r, pat), o in zip(planned, outcomes):
                    if not o.ok:
                        key = f"generate_{o.status}"
                        failures[key] = failures.get(key, 0) + 1
                        verifier.rejections.add("agent_" + o.status)
                        continue
                    opening = str(req.meta.get("opening", ""))
                    items += [(t, s.group, p, r.template_sha256) for t, p in _passages(o, pat, opening)]
                done = store.commit(rnd, verifier.rows(items, rnd, "synthetic", backend.name, backend.model))
                console.print(f"round {rnd}: {int(done['accepted'].sum())}/{len(done)} passages accepted")
                state["partial_round"] = rnd if client.budget_exhausted else None
                write_json(state, out / "state.json")
                if client.budget_exhausted:
                    console.print("[yellow]agent token budget spent[/]: stopping after this round (re-run to resume)")
                    break
            for s in states:
                s.absorb(done, profile.n_experts)
    finally:
        await backend.aclose()  # close the HTTP pool inside this loop: no "Event loop is closed" at exit
    return tally


def _self_rounds(
    cfg: SynthesizeConfig,
    profile: Profile,
    states: list[GroupState],
    store: RoundStore,
    verifier: _Verifier,
    model: Any,
    tok: Any,
) -> None:
    """The target model writes the passages; later rounds steer only toward still-uncovered experts."""
    from rich.progress import Progress

    from pascal_moe.agent.self_sampling import SelfSampleConfig, SelfSampler, prompt_pool

    sc = SelfSampleConfig(width=cfg.self_width, new_tokens=cfg.self_tokens, bonus=cfg.self_bonus)
    sampler = SelfSampler(model, tok, sc)
    n = cfg.samples_per_target
    pools = {
        s.group.gid: prompt_pool(
            profile.seed_samples(), profile.triggers, s.group.targets, profile.n_experts, n * cfg.rounds
        )
        for s in states
    }
    settings_hash = fingerprint_obj(asdict(sc))
    log = AgentLog(Path(cfg.out) / "agent_log.jsonl")  # one line per generated chunk, like one per request
    for rnd in range(1, cfg.rounds + 1):
        done = store.load(rnd)
        active = [s for s in states if s.uncovered(cfg.cover_tokens)]
        if done is None and not active:
            break
        if done is None:
            # Chunks of groups that fill one search batch, each saved when done: Ctrl-C loses one chunk at most.
            per = max(1, sc.parallel // n)
            chunks = [active[i : i + per] for i in range(0, len(active), per)]
            frames = []
            with Progress(console=console, transient=True) as bar:
                task = bar.add_task(f"self-sampling round {rnd}", total=len(chunks))
                for c, chunk in enumerate(chunks):
                    got = store.load_chunk(rnd, c)
                    if got is None:
                        t1 = time.perf_counter()
                        chosen = [
                            [pools[s.group.gid][(i + (rnd - 1) * n) % len(pools[s.group.gid])] for i in range(n)]
                            if pools[s.group.gid]
                            else []
                            for s in chunk
                        ]
                        jobs = [(s.uncovered(cfg.cover_tokens), [t for _, t in ch]) for s, ch in zip(chunk, chosen)]
                        items = [
                            (p.text, s.group, f"self:{ch[p.prompt_index][0]}", settings_hash)
                            for s, ch, ps in zip(chunk, chosen, sampler.sample_groups(jobs, _seed(cfg, rnd, c)))
                            for p in ps
                        ]
                        t0 = time.perf_counter()
                        got = store.commit_chunk(rnd, c, verifier.rows(items, rnd, "self", "self", cfg.model))
                        log.write(
                            {
                                "id": f"self-r{rnd}-c{c}",
                                "step": "self",
                                "round": rnd,
                                "status": "ok",
                                "groups": [s.group.gid for s in chunk],
                                "passages": len(got),
                                "accepted": int(got["accepted"].sum()) if len(got) else 0,
                                "completion_tokens": int(got["n_tokens"].sum()) if len(got) else 0,
                                "seconds": round(time.perf_counter() - t1, 3),
                                "verify_s": round(time.perf_counter() - t0, 3),
                            }
                        )
                    frames.append(got)
                    bar.advance(task)
            done = store.commit(rnd, pd.concat(frames, ignore_index=True).to_dict("records") if frames else [])
            console.print(f"round {rnd}: {int(done['accepted'].sum())}/{len(done)} passages accepted")
        for s in states:
            s.absorb(done, profile.n_experts)
