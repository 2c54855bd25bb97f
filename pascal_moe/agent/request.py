"""What the agent client is given and gives back: its settings, one chat request, one outcome.

Why a module of its own: the transport, the cache and the log all speak of requests and
outcomes, and none of them should import another to get the types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


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
