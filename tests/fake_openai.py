"""A small, real OpenAI-compatible HTTP server for tests and benchmarks (stdlib only).

It answers `POST /v1/chat/completions` deterministically from the prompt: it fills the
requested JSON schema (from `response_format`, or from a schema spelled out in the
prompt) with the trigger phrases (`[[tok]]`) and expert ids (`L3.E17`) it finds in the
messages, varied by seed.  `GET /v1/models` and `GET /health` answer too.

Faults are injected per chat request: by request number (`faults={2: "429"}`), by a
queue (`script("500", None, "timeout")`), or at random (`fault_rate` with a seed).
Kinds: 429 (with retry-after), 500, 503, timeout (answers after `timeout_delay_s`),
disconnect, malformed, truncated (finish_reason "length"), empty, schema_violation,
reject_schema (400 when response_format is sent).  `startup_s` answers 503 "still
starting" to everything for that long.  `latency_s` delays every chat answer.

Server kinds seen in the wild: `json_mode_only` refuses a json_schema response_format
but takes `{"type": "json_object"}` (and then answers bare JSON); `ignore_bounds` obeys
JSON types but no length keyword: every string is 3x longer than its bound (or than
`LONG_CHARS` when the schema carries none), every array 3x longer than asked.

It counts chat requests by prompt hash so tests can assert nothing was sent twice.

    python tests/fake_openai.py --port 0 --latency-ms 100   # prints the base URL, serves until killed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import socket
import sys
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULTS = (
    "429",
    "500",
    "503",
    "timeout",
    "disconnect",
    "malformed",
    "truncated",
    "empty",
    "schema_violation",
    "reject_schema",
)
_MARKED = re.compile(r"\[\[(.+?)\]\]")
_EXPERT = re.compile(r"\bL\d+\.E\d+\b")
_HEADER = re.compile(r"^## (L\d+\.E\d+)", re.MULTILINE)  # the target experts of an analyse prompt
_COUNT = re.compile(r"exactly (\d+) passages")
LONG_CHARS = {"text": 700, "description": 300, "name": 80, "pattern": 120}  # our bounds, were they sent
_HINT = re.compile(r"matching this JSON schema:\s*```json\s*(.*?)```", re.DOTALL)


def prompt_hash(messages: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


class FakeOpenAI:
    """Start with `with FakeOpenAI(...) as srv:`; `srv.url` is the base URL (ends in /v1)."""

    def __init__(
        self,
        *,
        model: str = "fake-agent",
        api_key: str | None = None,
        latency_s: float = 0.0,
        startup_s: float = 0.0,
        retry_after_s: float = 0.2,
        timeout_delay_s: float = 3.0,
        faults: dict[int, str] | None = None,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] = ("429", "500", "malformed", "truncated", "empty"),
        fault_seed: int = 0,
        reject_response_format: bool = False,
        json_mode_only: bool = False,
        ignore_bounds: bool = False,
        port: int = 0,
    ):
        self.model, self.api_key, self.latency_s, self.startup_s = model, api_key, latency_s, startup_s
        self.retry_after_s, self.timeout_delay_s = retry_after_s, timeout_delay_s
        self.faults: dict[int, str] = dict(faults or {})
        self.queue: deque[str | None] = deque()
        self.fault_rate, self.fault_kinds = fault_rate, fault_kinds
        self._rng = random.Random(fault_seed)
        self.reject_response_format = reject_response_format
        self.json_mode_only, self.ignore_bounds = json_mode_only, ignore_bounds
        self.counts: Counter[str] = Counter()  # normal answers by prompt hash
        self.received: Counter[str] = Counter()  # every chat request by prompt hash
        self.records: list[dict[str, Any]] = []
        self.n_chat = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    # --- lifecycle -------------------------------------------------------
    def start(self) -> FakeOpenAI:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = _Server(("127.0.0.1", self._port), handler)
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- fault control ---------------------------------------------------
    def script(self, *faults: str | None) -> None:
        """The next chat requests get these faults in order (None: answer normally)."""
        with self.lock:
            self.queue.extend(faults)

    def starting(self) -> bool:
        return time.monotonic() - self._t0 < self.startup_s

    def duplicates(self) -> dict[str, int]:
        """Prompts answered normally more than once."""
        return {h: n for h, n in self.counts.items() if n > 1}

    def _next_fault(self, h: str, body: dict[str, Any]) -> tuple[int, str | None]:
        with self.lock:
            self.n_chat += 1
            n = self.n_chat
            self.received[h] += 1
            if n in self.faults:
                fault: str | None = self.faults[n]
            elif self.queue:
                fault = self.queue.popleft()
            elif self.fault_rate and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.fault_kinds)
            else:
                fault = None
            self.records.append(
                {
                    "n": n,
                    "hash": h,
                    "fault": fault,
                    "seed": body.get("seed"),
                    "temperature": body.get("temperature"),
                    "response_format": body.get("response_format"),
                    "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")),
                }
            )
            return n, fault

    def count_answer(self, h: str) -> None:
        with self.lock:
            self.counts[h] += 1


class _Server(ThreadingHTTPServer):
    request_queue_size = 512  # a benchmark opens dozens of connections at once
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    fake: FakeOpenAI
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle + delayed ACK adds ~40 ms a reply.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(status, {"error": {"message": message, "type": "fake_error", "code": status}}, headers)

    def _guard(self) -> bool:
        """Startup and auth checks shared by every endpoint; True when the request may go on."""
        fk = self.fake
        if fk.starting():
            self._error(503, "server is still starting")
            return False
        if fk.api_key is not None and self.headers.get("Authorization") != f"Bearer {fk.api_key}":
            self._error(401, "invalid API key")
            return False
        return True

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            if self.fake.starting():
                self._error(503, "server is still starting")
            else:
                self._send(200, {})
        elif self.path.rstrip("/") == "/v1/models":
            if self._guard():
                self._send(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": self.fake.model, "object": "model", "created": 0, "owned_by": "fake"}],
                    },
                )
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._error(404, f"no route {self.path}")
            return
        if not self._guard():
            return
        fk = self.fake
        if body.get("model") != fk.model:
            self._error(404, f"The model `{body.get('model')}` does not exist.")
            return
        messages = body.get("messages", [])
        h = prompt_hash(messages)
        n, fault = fk._next_fault(h, body)
        rf = body.get("response_format")
        if rf is not None and (
            fk.reject_response_format
            or fault == "reject_schema"
            or (fk.json_mode_only and rf.get("type") != "json_object")
        ):
            self._error(400, f"response_format {rf.get('type')} is not supported")
            return
        if fault in ("429", "500", "503"):
            headers = {"retry-after": str(fk.retry_after_s)} if fault == "429" else None
            self._error(int(fault), f"injected {fault}", headers)
            return
        if fault == "disconnect":
            self.close_connection = True
            self.connection.close()
            return
        if fault == "timeout":
            fk.stopping.wait(fk.timeout_delay_s)
        if fk.latency_s:
            fk.stopping.wait(fk.latency_s)
        schema = (
            rf.get("json_schema", {}).get("schema")
            if rf and rf.get("type") == "json_schema"
            else _schema_from_prompt(messages)
        )
        content, finish = _answer(messages, schema, body.get("seed"), fault, hinted=rf is None, long=fk.ignore_bounds)
        if fault is None:  # a timed-out answer reaches nobody: not counted
            fk.count_answer(h)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        self._send(
            200,
            {
                "id": f"chatcmpl-{n}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": fk.model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": max(1, len(content) // 4),
                    "total_tokens": prompt_tokens + max(1, len(content) // 4),
                },
            },
        )


def _schema_from_prompt(messages: list[dict[str, Any]]) -> dict[str, Any] | None:
    m = _HINT.search(str(messages[-1].get("content", ""))) if messages else None
    return json.loads(m.group(1)) if m else None


def _answer(
    messages: list[dict[str, Any]],
    schema: dict[str, Any] | None,
    seed: int | None,
    fault: str | None,
    hinted: bool,
    long: bool = False,
) -> tuple[str, str]:
    """(content, finish_reason) for a request, shaped by the fault."""
    text = "\n".join(str(m.get("content", "")) for m in messages)
    rng = random.Random(f"{prompt_hash(messages)}:{seed}")
    phrases = list(dict.fromkeys(_MARKED.findall(text))) or [w for w in re.findall(r"[A-Za-z]{4,}", text)[:12]]
    experts = list(dict.fromkeys(_HEADER.findall(text) or _EXPERT.findall(text))) or ["L0.E0"]
    count = _COUNT.search(text)
    if fault == "empty":
        return "", "stop"
    if fault == "malformed":
        return "Here are the passages you asked for: (sorry, formatting went wrong)", "stop"
    if schema is None:
        return " ".join(rng.choice(phrases) for _ in range(12)) if phrases else "ok", "stop"
    value: Any = _instance(schema, rng, phrases, experts, int(count.group(1)) if count else None, "", long)
    if fault == "schema_violation":
        value = {"unexpected": value}
    content = json.dumps(value)
    if fault == "truncated":
        return content[: max(1, int(len(content) * 0.6))], "length"
    if hinted:  # without structured output, models wrap their JSON in prose and fences
        content = f"Sure! Here is the JSON:\n```json\n{json.dumps(value, indent=1)}\n```\nLet me know if you need more."
    return content, "stop"


def _instance(
    schema: dict[str, Any],
    rng: random.Random,
    phrases: list[str],
    experts: list[str],
    count: int | None,
    name: str,
    long: bool = False,
) -> Any:
    """A deterministic value matching a simple JSON schema, built from the prompt's phrases.

    long: ignore every length keyword (strings 3x their bound, arrays 3x the items asked).
    """
    t = schema.get("type")
    if t == "object":
        return {k: _instance(v, rng, phrases, experts, count, k, long) for k, v in schema.get("properties", {}).items()}
    if t == "array":
        if name == "experts":
            return rng.sample(experts, k=min(len(experts), 2)) * (3 if long else 1)
        n = count if (name == "passages" and count) else max(schema.get("minItems", 0), rng.randint(2, 3))
        if long:
            n *= 3
        else:
            n = min(n, schema.get("maxItems", n))  # as a server enforcing the schema would
        return [_instance(schema.get("items", {}), rng, phrases, experts, count, name, long) for _ in range(n)]
    if t in ("integer", "number"):
        return rng.randint(0, 9)
    if t == "boolean":
        return rng.random() < 0.5
    if long:
        bound = 3 * schema.get("maxLength", LONG_CHARS.get(name, 80))
        out = _string(schema, rng, phrases, name)
        while len(out) < bound:
            out += ("_" if name in ("name", "pattern") else " ") + _string(schema, rng, phrases, name)
        return out
    return _string(schema, rng, phrases, name)[: schema.get("maxLength")]


def _string(schema: dict[str, Any], rng: random.Random, phrases: list[str], name: str) -> str:
    pick = rng.choice(phrases) if phrases else "token"
    if name in ("name", "pattern"):
        return re.sub(r"\W+", "_", pick.lower()).strip("_") or "pattern"
    if name in ("text", "description"):
        return " ".join(f"The {rng.choice(phrases or ['token'])} appears here." for _ in range(rng.randint(3, 6)))
    return pick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--model", default="fake-agent")
    args = ap.parse_args()
    srv = FakeOpenAI(model=args.model, latency_s=args.latency_ms / 1000, port=args.port).start()
    print(srv.url, flush=True)
    try:
        sys.stdin.read()  # serve until stdin closes or the process is killed
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
