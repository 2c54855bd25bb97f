"""The robust layer around any Backend: concurrency, retries, cache, budget and log.

What it adds to a backend's single attempt:
- bounded concurrency (one semaphore slot per request, held through its retries, so a
  rate-limited server sees less load, not more);
- retries with exponential backoff and jitter (honouring `retry-after`) for transport
  errors (connection, timeout, 408/409/429/5xx) and for replies that are unusable:
  empty, cut off at max_tokens (`finish_reason == "length"`), unparsable or not matching
  the schema.  A content retry varies the seed (and runs at temperature 0.3 or more;
  a cut-off reply is retried with twice the max_tokens, up to 4x) so it does not get
  the same reply again;
- portable structured output (schema.py): the server gets the schema without length
  bounds, and the reply is clipped to them here (long strings cut at a sentence end,
  extra items dropped) instead of being rejected;
- a wait for the server to come up, done once and only when a request misses the cache;
- a token budget (prompt + completion tokens of every attempt): once spent, no new
  attempt starts and the remaining requests end as `budget_exhausted` outcomes.
  In-flight attempts finish, so the overshoot is at most `concurrency` replies.  The
  count lives in the AgentClient: use one client for all rounds of a stage;
- a response cache in RUN_DIR/cache/ (one JSON file per request key, written to a temp
  file and renamed into place, so a kill -9 leaves either the whole file or none): a
  re-run or resumed run sends no request that already succeeded;
- RUN_DIR/agent_log.jsonl, one line per request (timing, tokens, outcome, attempts,
  cached; the raw reply when parsing failed).  The API key is never written anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential,
                      wait_random)

from pascal_moe.agent.backends import Backend, Completion
from pascal_moe.agent.reply_json import JSONExtractError, extract_json
from pascal_moe.agent.schema import clip, portable
from pascal_moe.errors import PascalError

log = logging.getLogger("pascal_moe.agent")
KEY_VERSION = 1  # bump when the key's recipe changes, so old cache entries stop matching
MAX_RETRY_AFTER_S = 60.0


@dataclass(slots=True)
class ClientConfig:
    """How the agent's requests are sent (the stage's settings map onto this)."""

    concurrency: int = 16  # requests in flight at once
    max_attempts: int = 6  # tries per request, transport errors and unusable replies alike
    backoff_initial_s: float = 1.0  # first retry delay; doubles per try, with jitter
    backoff_max_s: float = 30.0  # longest retry delay (a longer retry-after is honoured up to 60 s)
    request_timeout_s: float = 300.0  # one attempt is abandoned (and retried) after this
    max_tokens_budget: int | None = None  # prompt + completion tokens; None or 0: no limit
    server_wait_s: float = 600.0  # how long to wait for the server to come up


@dataclass(slots=True)
class Request:
    """One chat request; `id` and `meta` are for the caller and the log, not part of the cache key."""

    id: str
    messages: list[dict[str, str]]
    schema: dict[str, Any] | None = None
    max_tokens: int = 2048
    temperature: float = 0.7
    seed: int | None = None
    want_json: bool = True  # parse the reply as JSON (always true when a schema is given)
    meta: dict[str, Any] = field(default_factory=dict)


Status = Literal["ok", "failed", "budget_exhausted"]


@dataclass(slots=True)
class Outcome:
    """What became of a request. `value` is the parsed JSON (or text); `text` keeps the raw reply."""

    id: str
    key: str
    status: Status
    value: Any = None
    text: str = ""
    error: str = ""
    attempts: int = 0
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class BadReply(Exception):
    """The server answered, but the reply is unusable; retried like a transport error.

    `salvage` holds a usable value recovered from a reply cut off at max_tokens: the
    request is retried with more tokens, and the salvage is kept if every retry fails.
    """

    def __init__(self, kind: str, detail: str, salvage: Any = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.salvage = kind, salvage


class BudgetExhausted(Exception):
    """The token budget is spent: no new attempt may start."""


def request_key(model: str, req: Request) -> str:
    """sha256 over what determines the reply: model, messages, schema and sampling parameters."""
    payload = {"v": KEY_VERSION, "model": model, "messages": req.messages, "schema": req.schema,
               "max_tokens": req.max_tokens, "temperature": req.temperature, "seed": req.seed,
               "want_json": req.want_json or req.schema is not None}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """One JSON file per key under `root/<key[:2]>/`, written atomically (temp file + os.replace)."""

    def __init__(self, root: Path, fsync: bool = False):
        self.root, self.fsync = Path(root), fsync  # rename alone survives kill -9; fsync guards power loss
        self._dirs: set[Path] = set()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        p = self.path(key)
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            log.warning("ignoring unreadable cache entry %s", p)
            return None
        return rec if isinstance(rec, dict) and rec.get("key") == key else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        p = self.path(key)
        if p.parent not in self._dirs:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(p.parent)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({**record, "key": key}, f, ensure_ascii=False)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)


class AgentLog:
    """Append-only JSONL; each line goes out in one write() on an O_APPEND descriptor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's records, skipping a line cut short by a kill."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _retry_after(exc: BaseException | None) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, ValueError):  # absent, or an HTTP date: fall back to backoff
            continue
    return None


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, (BadReply, TimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code in (408, 409, 429) or exc.status_code >= 500)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc)[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class AgentClient:
    """Sends Requests through a Backend with retries, cache, budget and log (see the module doc)."""

    def __init__(self, backend: Backend, config: ClientConfig | None = None, run_dir: str | Path | None = None):
        self.backend, self.config = backend, config or ClientConfig()
        self.cache = ResponseCache(Path(run_dir) / "cache") if run_dir is not None else None
        self.log = AgentLog(Path(run_dir) / "agent_log.jsonl") if run_dir is not None else None
        self.tokens_spent = 0
        self.budget_exhausted = False
        self._ready = False
        self._ready_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._validators: dict[str, jsonschema.protocols.Validator] = {}
        c = self.config
        self._wait_exp = (wait_exponential(multiplier=c.backoff_initial_s, max=c.backoff_max_s)
                          + wait_random(0, c.backoff_initial_s))

    async def run(self, reqs: Sequence[Request]) -> list[Outcome]:
        """Outcomes in request order; identical requests (same key) are sent once."""
        if not reqs:
            return []
        if not self.backend.model:  # the key needs the model name: ask the server first
            await self._ensure_ready()
        sem = asyncio.Semaphore(self.config.concurrency)
        by_key: dict[str, asyncio.Task[Outcome]] = {}
        order: list[tuple[Request, str]] = []
        for r in reqs:
            key = request_key(self.backend.model, r)
            if key not in by_key:
                by_key[key] = asyncio.create_task(self._one(r, key, sem))
            order.append((r, key))
        tasks = list(by_key.values())
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        out = []
        for r, key in order:
            o = by_key[key].result()
            out.append(o if o.id == r.id else dataclasses.replace(o, id=r.id, meta=r.meta))
        return out

    def run_sync(self, reqs: Sequence[Request]) -> list[Outcome]:
        """`run` from synchronous code (one event loop per call; the backend's connections close with it)."""

        async def main() -> list[Outcome]:
            try:
                return await self.run(reqs)
            finally:
                await self.backend.aclose()

        return asyncio.run(main())

    async def _ensure_ready(self) -> None:
        if self._ready:
            return
        loop = asyncio.get_running_loop()
        if self._ready_lock is None or self._ready_lock[0] is not loop:  # run_sync makes a loop per call
            self._ready_lock = (loop, asyncio.Lock())
        async with self._ready_lock[1]:
            if not self._ready:
                await self.backend.wait_ready(self.config.server_wait_s)
                self._ready = True

    async def _one(self, req: Request, key: str, sem: asyncio.Semaphore) -> Outcome:
        t0 = time.perf_counter()
        rec = self.cache.get(key) if self.cache is not None else None
        if rec is not None:
            out = Outcome(req.id, key, "ok", value=rec.get("value"), text=rec.get("text", ""), cached=True,
                          prompt_tokens=rec.get("prompt_tokens", 0), completion_tokens=rec.get("completion_tokens", 0),
                          finish_reason=rec.get("finish_reason"), meta=req.meta)
            self._log(req, out, [])
            return out
        async with sem:
            out, errors = await self._attempts(req, key)
            out.latency_s = time.perf_counter() - t0
            # Written in a worker thread so a slow disk does not stall the loop, but before the slot is
            # freed: a kill then loses at most `concurrency` answered replies.
            await asyncio.to_thread(self._record, req, out, errors)
        return out

    def _record(self, req: Request, out: Outcome, errors: list[str]) -> None:
        """Cache a success (before logging it: a kill in between only re-logs it as cached), then log."""
        if out.ok and self.cache is not None:
            self.cache.put(out.key, {"id": req.id, "model": self.backend.model, "text": out.text, "value": out.value,
                                     "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                                     "completion_tokens": out.completion_tokens, "attempts": out.attempts,
                                     "created": time.time()})
        self._log(req, out, errors)

    async def _attempts(self, req: Request, key: str) -> tuple[Outcome, list[str]]:
        c = self.config
        max_tokens, temperature, seed = req.max_tokens, req.temperature, req.seed
        errors: list[str] = []
        salvage: Any = None  # a usable value from a cut-off reply, kept in case no retry does better
        wire_schema = (None if req.schema is None else req.schema if getattr(self.backend, "send_bounds", False)
                       else portable(req.schema))
        out = Outcome(req.id, key, "failed", meta=req.meta)
        retrying = AsyncRetrying(stop=stop_after_attempt(c.max_attempts), wait=self._wait,
                                 retry=retry_if_exception(_retryable), before_sleep=self._before_sleep(req),
                                 reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        self._check_budget()
                        out.attempts = attempt.retry_state.attempt_number  # attempts actually sent
                        await self._ensure_ready()
                        comp = await asyncio.wait_for(
                            self.backend.agenerate(req.messages, schema=wire_schema, max_tokens=max_tokens,
                                                   temperature=temperature, seed=seed), c.request_timeout_s)
                        self._account(out, comp)
                        out.value = self._accept(req, comp, max_tokens)
                    except Exception as e:
                        if not isinstance(e, BudgetExhausted):
                            errors.append(_describe(e))
                        if isinstance(e, BadReply):  # vary the next try so it does not repeat this reply
                            salvage = e.salvage if e.salvage is not None else salvage
                            seed = None if seed is None else seed + 1_000_003 * out.attempts
                            temperature = max(temperature, 0.3)
                            if e.kind == "truncated":
                                max_tokens = min(max_tokens * 2, req.max_tokens * 4)
                        raise
        except BudgetExhausted:
            out.status, out.error = "budget_exhausted", f"token budget of {c.max_tokens_budget} spent"
            return out, errors
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise PascalError(f"agent server refused the API key (HTTP {e.status_code}): set the key in the "
                                  f"variable named by --api-key-env or in --api-key-file") from e
            out.error = _describe(e)
            return out, errors
        except (BadReply, TimeoutError, openai.APIError) as e:
            if salvage is not None:  # every retry failed, but a cut-off reply held whole items: use them
                out.status, out.value, out.error = "ok", salvage, ""
                return out, errors
            out.error = _describe(e)
            return out, errors
        out.status, out.error = "ok", ""
        return out, errors

    def _account(self, out: Outcome, comp: Completion) -> None:
        self.tokens_spent += comp.prompt_tokens + comp.completion_tokens
        out.prompt_tokens += comp.prompt_tokens
        out.completion_tokens += comp.completion_tokens
        out.text, out.finish_reason = comp.text, comp.finish_reason

    def _check_budget(self) -> None:
        budget = self.config.max_tokens_budget
        if budget and self.tokens_spent >= budget:
            if not self.budget_exhausted:
                self.budget_exhausted = True
                log.warning("agent token budget spent (%d >= %d): no new requests", self.tokens_spent, budget)
                if self.log is not None:
                    self.log.write({"ts": time.time(), "event": "budget_exhausted", "tokens_spent": self.tokens_spent,
                                    "budget": budget})
            raise BudgetExhausted()

    def _validator(self, schema: dict[str, Any]) -> jsonschema.protocols.Validator:
        sid = json.dumps(schema, sort_keys=True)
        if sid not in self._validators:
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            self._validators[sid] = cls(schema)
        return self._validators[sid]

    def _accept(self, req: Request, comp: Completion, max_tokens: int) -> Any:
        """The reply's value (clipped to the schema's bounds), or BadReply saying why it cannot be used."""
        if comp.finish_reason == "length":
            salvage = self._parse(req, comp.text) if req.schema is not None and comp.text.strip() else None
            raise BadReply("truncated", f"reply cut off at max_tokens={max_tokens}",
                           None if isinstance(salvage, BadReply) else salvage)
        if not comp.text.strip():
            raise BadReply("empty", f"empty reply (finish_reason={comp.finish_reason})")
        if req.schema is None and not req.want_json:
            return comp.text
        value = self._parse(req, comp.text)
        if isinstance(value, BadReply):
            raise value
        return value

    def _parse(self, req: Request, text: str) -> Any:
        """The first JSON value in `text` that, clipped to the schema's bounds, matches it; else a BadReply."""
        if req.schema is None:
            try:
                return extract_json(text)
            except JSONExtractError as e:
                return BadReply("unparsable", str(e))
        schema = req.schema
        validator = self._validator(schema)
        try:
            return clip(extract_json(text, accept=lambda v: validator.is_valid(clip(v, schema))), schema)
        except JSONExtractError:
            pass
        try:
            value = clip(extract_json(text), req.schema)
        except JSONExtractError as e:
            return BadReply("unparsable", str(e))
        err = jsonschema.exceptions.best_match(validator.iter_errors(value))
        where = "/".join(str(p) for p in err.absolute_path) if err is not None else ""
        return BadReply("schema", f"{err.message if err is not None else 'invalid'} at /{where}"[:300])

    def _wait(self, rs: RetryCallState) -> float:
        base = self._wait_exp(rs)
        ra = _retry_after(rs.outcome.exception() if rs.outcome is not None else None)
        return base if ra is None else min(max(ra, base), MAX_RETRY_AFTER_S)

    def _before_sleep(self, req: Request) -> Any:
        def hook(rs: RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            sleep = rs.next_action.sleep if rs.next_action is not None else 0.0
            log.info("agent request %s try %d failed (%s); retrying in %.1fs", req.id, rs.attempt_number,
                     _describe(exc) if exc is not None else "?", sleep)
        return hook

    def _log(self, req: Request, out: Outcome, errors: list[str]) -> None:
        if self.log is None:
            return
        rec = {"ts": time.time(), "id": req.id, "key": out.key, "backend": self.backend.name,
               "model": self.backend.model, "status": out.status, "attempts": out.attempts, "cached": out.cached,
               "prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
               "latency_s": round(out.latency_s, 4), "finish_reason": out.finish_reason, "error": out.error,
               "errors": errors, "meta": req.meta}
        if out.status == "failed" and out.text:
            rec["raw"] = out.text
        self.log.write(rec)


async def run_requests(backend: Backend, reqs: Sequence[Request], config: ClientConfig | None = None,
                       run_dir: str | Path | None = None) -> list[Outcome]:
    """Send `reqs` through `backend` with retries, cache and log in `run_dir` (none when None)."""
    return await AgentClient(backend, config, run_dir).run(reqs)


def run_requests_sync(backend: Backend, reqs: Sequence[Request], config: ClientConfig | None = None,
                      run_dir: str | Path | None = None) -> list[Outcome]:
    """`run_requests` from synchronous code (not from inside a running event loop)."""
    return AgentClient(backend, config, run_dir).run_sync(reqs)


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts by status, cache hits and tokens, for the stage's manifest."""
    return {"requests": len(outcomes), "by_status": dict(Counter(o.status for o in outcomes)),
            "cached": sum(o.cached for o in outcomes),
            "prompt_tokens": sum(o.prompt_tokens for o in outcomes if not o.cached),
            "completion_tokens": sum(o.completion_tokens for o in outcomes if not o.cached)}
