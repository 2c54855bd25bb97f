"""What the agent spent and did: the token budget and RUN_DIR/agent_log.jsonl.

Budget: prompt + completion tokens of every attempt; once spent, no new attempt starts
(`BudgetExhausted`) and the remaining requests end as `budget_exhausted` outcomes.
In-flight attempts finish, so the overshoot is at most `concurrency` replies.
Log: one line per request (timing, tokens, outcome, attempts, cached; the raw reply when
parsing failed).  The API key is never written anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pascal_moe.agent.request import Outcome, Request

log = logging.getLogger("pascal_moe.agent")


class BudgetExhausted(Exception):
    """The token budget is spent: no new attempt may start."""


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

    def request(self, req: Request, out: Outcome, errors: list[str], backend: str, model: str) -> None:
        """One request's line; the raw reply only when it failed (so a parse failure can be read later)."""
        rec = {
            "ts": time.time(),
            "id": req.id,
            "key": out.key,
            "backend": backend,
            "model": model,
            "status": out.status,
            "attempts": out.attempts,
            "cached": out.cached,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "latency_s": round(out.latency_s, 4),
            "finish_reason": out.finish_reason,
            "error": out.error,
            "errors": errors,
            "meta": req.meta,
        }
        if out.status == "failed" and out.text:
            rec["raw"] = out.text
        self.write(rec)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The log's records, skipping a line cut short by a kill."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class TokenBudget:
    """Tokens spent by every attempt of one client (use one client for all rounds of a stage)."""

    def __init__(self, limit: int | None, log_to: AgentLog | None = None):
        self.limit, self.log_to = limit, log_to
        self.spent = 0
        self.exhausted = False

    def spend(self, tokens: int) -> None:
        self.spent += tokens

    def check(self) -> None:
        """Raise BudgetExhausted once the limit is reached (logged once, as an event line)."""
        if self.limit and self.spent >= self.limit:
            if not self.exhausted:
                self.exhausted = True
                log.warning("agent token budget spent (%d >= %d): no new requests", self.spent, self.limit)
                if self.log_to is not None:
                    self.log_to.write(
                        {
                            "ts": time.time(),
                            "event": "budget_exhausted",
                            "tokens_spent": self.spent,
                            "budget": self.limit,
                        }
                    )
            raise BudgetExhausted()
