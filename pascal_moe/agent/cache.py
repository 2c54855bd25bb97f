"""The agent's response cache: a re-run or resumed run sends no request that already succeeded.

RUN_DIR/cache/ holds one JSON file per request key, written to a temp file and renamed
into place, so a kill -9 leaves either the whole file or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from pascal_moe.agent.request import Request

log = logging.getLogger("pascal_moe.agent")
KEY_VERSION = 1  # bump when the key's recipe changes, so old cache entries stop matching


def request_key(model: str, req: Request) -> str:
    """sha256 over what determines the reply: model, messages, schema and sampling parameters."""
    payload = {
        "v": KEY_VERSION,
        "model": model,
        "messages": req.messages,
        "schema": req.schema,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "seed": req.seed,
        "want_json": req.want_json or req.schema is not None,
    }
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
