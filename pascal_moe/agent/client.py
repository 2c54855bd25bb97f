"""The robust layer around any Backend: concurrency and deduplication over the parts that do each job.

- transport.py: one request sent with retries (transport errors and unusable replies),
  the server wait, portable structured output and reply checks;
- cache.py: RUN_DIR/cache/, so a re-run or resumed run sends no request that already succeeded;
- ledger.py: the token budget and RUN_DIR/agent_log.jsonl.

What this module adds: bounded concurrency (one semaphore slot per request, held through
its retries, so a rate-limited server sees less load, not more); identical requests sent
once; a success cached before it is logged; the sync entry points.  The names callers
use (`Request`, `Outcome`, `ClientConfig`, `AgentLog`, `read_log`, ...) stay importable from here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pascal_moe.agent.backends import Backend
from pascal_moe.agent.cache import ResponseCache, request_key
from pascal_moe.agent.ledger import AgentLog, BudgetExhausted, TokenBudget, read_log
from pascal_moe.agent.request import ClientConfig, Outcome, Request, Status
from pascal_moe.agent.transport import BadReply, Transport

__all__ = [
    "AgentClient",
    "AgentLog",
    "BadReply",
    "BudgetExhausted",
    "ClientConfig",
    "Outcome",
    "Request",
    "ResponseCache",
    "Status",
    "read_log",
    "request_key",
    "run_requests",
    "run_requests_sync",
    "summarize",
]


class AgentClient:
    """Sends Requests through a Backend with retries, cache, budget and log (see the module doc)."""

    def __init__(self, backend: Backend, config: ClientConfig | None = None, run_dir: str | Path | None = None):
        self.backend, self.config = backend, config or ClientConfig()
        self.cache = ResponseCache(Path(run_dir) / "cache") if run_dir is not None else None
        self.log = AgentLog(Path(run_dir) / "agent_log.jsonl") if run_dir is not None else None
        self.budget = TokenBudget(self.config.max_tokens_budget, self.log)
        self.transport = Transport(backend, self.config, self.budget)

    @property
    def tokens_spent(self) -> int:
        return self.budget.spent

    @property
    def budget_exhausted(self) -> bool:
        return self.budget.exhausted

    async def run(self, reqs: Sequence[Request]) -> list[Outcome]:
        """Outcomes in request order; identical requests (same key) are sent once."""
        if not reqs:
            return []
        if not self.backend.model:  # the key needs the model name: ask the server first
            await self.transport.ensure_ready()
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

    async def _one(self, req: Request, key: str, sem: asyncio.Semaphore) -> Outcome:
        t0 = time.perf_counter()
        rec = self.cache.get(key) if self.cache is not None else None
        if rec is not None:
            out = Outcome(
                req.id,
                key,
                "ok",
                value=rec.get("value"),
                text=rec.get("text", ""),
                cached=True,
                prompt_tokens=rec.get("prompt_tokens", 0),
                completion_tokens=rec.get("completion_tokens", 0),
                finish_reason=rec.get("finish_reason"),
                meta=req.meta,
            )
            self._log(req, out, [])
            return out
        async with sem:
            out, errors = await self.transport.send(req, key)
            out.latency_s = time.perf_counter() - t0
            # Written in a worker thread so a slow disk does not stall the loop, but before the slot is
            # freed: a kill then loses at most `concurrency` answered replies.
            await asyncio.to_thread(self._record, req, out, errors)
        return out

    def _record(self, req: Request, out: Outcome, errors: list[str]) -> None:
        """Cache a success (before logging it: a kill in between only re-logs it as cached), then log."""
        if out.ok and self.cache is not None:
            self.cache.put(
                out.key,
                {
                    "id": req.id,
                    "model": self.backend.model,
                    "text": out.text,
                    "value": out.value,
                    "finish_reason": out.finish_reason,
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "attempts": out.attempts,
                    "created": time.time(),
                },
            )
        self._log(req, out, errors)

    def _log(self, req: Request, out: Outcome, errors: list[str]) -> None:
        if self.log is not None:
            self.log.request(req, out, errors, self.backend.name, self.backend.model)


async def run_requests(
    backend: Backend, reqs: Sequence[Request], config: ClientConfig | None = None, run_dir: str | Path | None = None
) -> list[Outcome]:
    """Send `reqs` through `backend` with retries, cache and log in `run_dir` (none when None)."""
    return await AgentClient(backend, config, run_dir).run(reqs)


def run_requests_sync(
    backend: Backend, reqs: Sequence[Request], config: ClientConfig | None = None, run_dir: str | Path | None = None
) -> list[Outcome]:
    """`run_requests` from synchronous code (not from inside a running event loop)."""
    return AgentClient(backend, config, run_dir).run_sync(reqs)


def summarize(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Counts by status, cache hits and tokens, for the stage's manifest."""
    return {
        "requests": len(outcomes),
        "by_status": dict(Counter(o.status for o in outcomes)),
        "cached": sum(o.cached for o in outcomes),
        "prompt_tokens": sum(o.prompt_tokens for o in outcomes if not o.cached),
        "completion_tokens": sum(o.completion_tokens for o in outcomes if not o.cached),
    }
