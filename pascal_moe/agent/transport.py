"""One request to the backend, sent until a usable reply comes back: retries, server wait, reply checks.

- retries with exponential backoff and jitter (honouring `retry-after`) for transport
  errors (connection, timeout, 408/409/429/5xx) and for replies that are unusable:
  empty, cut off at max_tokens (`finish_reason == "length"`), unparsable or not matching
  the schema.  A content retry varies the seed (and runs at temperature 0.3 or more;
  a cut-off reply is retried with twice the max_tokens, up to 4x) so it does not get
  the same reply again;
- portable structured output (schema.py): the server gets the schema without length
  bounds, and the reply is clipped to them here (long strings cut at a sentence end,
  extra items dropped) instead of being rejected;
- a wait for the server to come up, done once and only when a request is actually sent;
- every attempt is charged to the token budget, which is checked before each one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import jsonschema
import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_random,
)

from pascal_moe.agent.backends import Backend, Completion
from pascal_moe.agent.ledger import BudgetExhausted, TokenBudget
from pascal_moe.agent.reply_json import JSONExtractError, extract_json
from pascal_moe.agent.request import ClientConfig, Outcome, Request
from pascal_moe.agent.schema import clip, portable
from pascal_moe.errors import PascalError

log = logging.getLogger("pascal_moe.agent")
MAX_RETRY_AFTER_S = 60.0


class BadReply(Exception):
    """The server answered, but the reply is unusable; retried like a transport error.

    `salvage` holds a usable value recovered from a reply cut off at max_tokens: the
    request is retried with more tokens, and the salvage is kept if every retry fails.
    """

    def __init__(self, kind: str, detail: str, salvage: Any = None):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.salvage = kind, salvage


def retry_after(exc: BaseException | None) -> float | None:
    """The server's requested delay in seconds (retry-after-ms or retry-after), None when absent."""
    if not isinstance(exc, openai.APIStatusError):
        return None
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            return float(headers[name]) * scale
        except (KeyError, ValueError):  # absent, or an HTTP date: fall back to backoff
            continue
    return None


def retryable(exc: BaseException) -> bool:
    if isinstance(exc, (BadReply, TimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code in (408, 409, 429) or exc.status_code >= 500)


def describe(exc: BaseException) -> str:
    """A short line for the log (never the request, so never the key)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc)[:200]}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


class ReplyReader:
    """Turns a completion into the request's value, or a BadReply saying why it cannot be used."""

    def __init__(self) -> None:
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    def accept(self, req: Request, comp: Completion, max_tokens: int) -> Any:
        """The reply's value (clipped to the schema's bounds); raises BadReply."""
        if comp.finish_reason == "length" and req.schema is None and not req.want_json and comp.text.strip():
            return comp.text  # plain text cut off: usable as it is (the caller trims it; a loop is the usual cause)
        if comp.finish_reason == "length":
            salvage = self.parse(req, comp.text) if req.schema is not None and comp.text.strip() else None
            raise BadReply(
                "truncated",
                f"reply cut off at max_tokens={max_tokens}",
                None if isinstance(salvage, BadReply) else salvage,
            )
        if not comp.text.strip():
            raise BadReply("empty", f"empty reply (finish_reason={comp.finish_reason})")
        if req.schema is None and not req.want_json:
            return comp.text
        value = self.parse(req, comp.text)
        if isinstance(value, BadReply):
            raise value
        return value

    def parse(self, req: Request, text: str) -> Any:
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

    def _validator(self, schema: dict[str, Any]) -> jsonschema.protocols.Validator:
        sid = json.dumps(schema, sort_keys=True)
        if sid not in self._validators:
            cls = jsonschema.validators.validator_for(schema)
            cls.check_schema(schema)
            self._validators[sid] = cls(schema)
        return self._validators[sid]


class Transport:
    """Sends one request through a Backend with retries, charging every attempt to `budget`."""

    def __init__(self, backend: Backend, config: ClientConfig, budget: TokenBudget):
        self.backend, self.config, self.budget = backend, config, budget
        self.reader = ReplyReader()
        self._ready = False
        self._ready_lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None
        self._wait_exp = wait_exponential(multiplier=config.backoff_initial_s, max=config.backoff_max_s) + wait_random(
            0, config.backoff_initial_s
        )

    async def ensure_ready(self) -> None:
        """Wait for the server once (per client; each event loop gets its own lock)."""
        if self._ready:
            return
        loop = asyncio.get_running_loop()
        if self._ready_lock is None or self._ready_lock[0] is not loop:  # run_sync makes a loop per call
            self._ready_lock = (loop, asyncio.Lock())
        async with self._ready_lock[1]:
            if not self._ready:
                await self.backend.wait_ready(self.config.server_wait_s)
                self._ready = True

    async def send(self, req: Request, key: str) -> tuple[Outcome, list[str]]:
        """The request's outcome and the description of every failed attempt."""
        c = self.config
        max_tokens, temperature, seed = req.max_tokens, req.temperature, req.seed
        errors: list[str] = []
        salvage: Any = None  # a usable value from a cut-off reply, kept in case no retry does better
        wire_schema = (
            None
            if req.schema is None
            else req.schema
            if getattr(self.backend, "send_bounds", False)
            else portable(req.schema)
        )
        out = Outcome(req.id, key, "failed", meta=req.meta)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(c.max_attempts),
            wait=self._wait,
            retry=retry_if_exception(retryable),
            before_sleep=self._before_sleep(req),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    try:
                        self.budget.check()
                        out.attempts = attempt.retry_state.attempt_number  # attempts actually sent
                        await self.ensure_ready()
                        comp = await asyncio.wait_for(
                            self.backend.agenerate(
                                req.messages,
                                schema=wire_schema,
                                max_tokens=max_tokens,
                                temperature=temperature,
                                seed=seed,
                            ),
                            c.request_timeout_s,
                        )
                        self._account(out, comp)
                        out.value = self.reader.accept(req, comp, max_tokens)
                    except Exception as e:
                        if not isinstance(e, BudgetExhausted):
                            errors.append(describe(e))
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
                raise PascalError(
                    f"agent server refused the API key (HTTP {e.status_code}): set the key in the "
                    f"variable named by --api-key-env or in --api-key-file"
                ) from e
            out.error = describe(e)
            return out, errors
        except (BadReply, TimeoutError, openai.APIError) as e:
            if salvage is not None:  # every retry failed, but a cut-off reply held whole items: use them
                out.status, out.value, out.error = "ok", salvage, ""
                return out, errors
            out.error = describe(e)
            return out, errors
        out.status, out.error = "ok", ""
        return out, errors

    def _account(self, out: Outcome, comp: Completion) -> None:
        self.budget.spend(comp.prompt_tokens + comp.completion_tokens)
        out.prompt_tokens += comp.prompt_tokens
        out.completion_tokens += comp.completion_tokens
        out.text, out.finish_reason = comp.text, comp.finish_reason

    def _wait(self, rs: RetryCallState) -> float:
        base = self._wait_exp(rs)
        ra = retry_after(rs.outcome.exception() if rs.outcome is not None else None)
        return base if ra is None else min(max(ra, base), MAX_RETRY_AFTER_S)

    def _before_sleep(self, req: Request) -> Any:
        def hook(rs: RetryCallState) -> None:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            sleep = rs.next_action.sleep if rs.next_action is not None else 0.0
            log.info(
                "agent request %s try %d failed (%s); retrying in %.1fs",
                req.id,
                rs.attempt_number,
                describe(exc) if exc is not None else "?",
                sleep,
            )

        return hook
