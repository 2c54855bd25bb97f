"""Several OpenAI-compatible endpoints (one `vllm serve` per node) behind one Backend, balanced by the client.

Why in the client and not a proxy: each node serves the same model; the client already owns retries and
concurrency, so round-robin with per-endpoint health is a few lines here and needs no extra service.
Rules: requests go round-robin over the healthy endpoints; an endpoint that fails with a connection error is
skipped for `cooldown_s` and the request goes to the next one at once (other errors - 429, 5xx, bad replies -
are the transport's to retry, as with one endpoint); when all are cooling down they are tried anyway, in
order, and the last connection error goes to the transport's backoff.  `wait_ready` returns as soon as one
endpoint is up; when none comes up, the single-endpoint error (one line) is raised.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from pascal_moe.agent.backends import Completion, OpenAIBackend
from pascal_moe.errors import PascalError

log = logging.getLogger("pascal_moe.agent")


def endpoint_list(base_url: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """The configured endpoints: --base-url given once or more (a list), a single string, else OPENAI_BASE_URL.

    A string may hold several URLs separated by commas (for YAML or the environment)."""
    items = [base_url] if isinstance(base_url, str) else list(base_url or [])
    if not items:
        items = [os.environ.get("OPENAI_BASE_URL", "")]
    urls = [u.strip().rstrip("/") for item in items for u in item.split(",")]
    return list(dict.fromkeys(u for u in urls if u))  # order kept, duplicates dropped


@dataclass
class Endpoints:
    """Round-robin over `backends` with a cool-down for endpoints that refuse connections."""

    backends: list[OpenAIBackend]
    cooldown_s: float = 30.0
    name: str = "openai"
    _next: int = 0
    _down_until: dict[int, float] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.backends[0].model

    @model.setter
    def model(self, value: str) -> None:
        for b in self.backends:
            b.model = value

    @property
    def send_bounds(self) -> bool:
        return self.backends[0].send_bounds

    @property
    def base_url(self) -> str:
        return ", ".join(b.base_url for b in self.backends)

    def healthy(self) -> list[int]:
        """Endpoint indices in round-robin order, those cooling down left out."""
        n, now = len(self.backends), time.monotonic()
        order = [(self._next + i) % n for i in range(n)]
        return [i for i in order if self._down_until.get(i, 0.0) <= now]

    def mark_down(self, i: int, why: str) -> None:
        self._down_until[i] = time.monotonic() + self.cooldown_s
        log.warning(
            "agent endpoint %s unreachable (%s); skipped for %.0fs", self.backends[i].base_url, why, self.cooldown_s
        )

    async def agenerate(self, messages: list[dict[str, str]], **kw: Any) -> Completion:
        import openai

        n = len(self.backends)
        order = self.healthy() or [(self._next + i) % n for i in range(n)]  # all cooling down: try them anyway
        self._next = (order[0] + 1) % n  # the next request starts at the following endpoint
        last: Exception | None = None
        for i in order:
            try:
                return await self.backends[i].agenerate(messages, **kw)
            except openai.APIConnectionError as e:
                if isinstance(e, openai.APITimeoutError):
                    raise  # slow, not down: the transport's timeout and retry policy applies
                self.mark_down(i, type(e).__name__)
                last = e
        assert last is not None
        raise last

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once one endpoint answers (the others join as they answer requests); else its one-line error."""
        tasks = [asyncio.ensure_future(b.wait_ready(timeout_s)) for b in self.backends]
        first_error: BaseException | None = None
        try:
            for fut in asyncio.as_completed(tasks):
                try:
                    await fut
                except PascalError as e:
                    first_error = first_error or e
                    continue
                ready = next(i for i, t in enumerate(tasks) if t.done() and not t.cancelled() and not t.exception())
                resolved = self.backends[ready].model
                for i, (b, t) in enumerate(zip(self.backends, tasks)):
                    if not b.model:
                        b.model = resolved  # every node serves the same model
                    if t.done() and not t.cancelled() and t.exception() is not None:
                        self.mark_down(i, "not ready")
                return
        finally:
            for t in tasks:
                t.cancel()
        if len(self.backends) == 1 and first_error is not None:
            raise first_error
        raise PascalError(
            f"none of the {len(self.backends)} agent endpoints ({self.base_url}) is ready after {timeout_s:.0f}s: "
            f"start them (e.g. `vllm serve MODEL` on each node) or fix --base-url"
        )

    async def aclose(self) -> None:
        for b in self.backends:
            await b.aclose()
