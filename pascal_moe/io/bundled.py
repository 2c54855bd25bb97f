"""Where the bundled models and seed corpus live: a checkout's `data/`, or `$PASCAL_DATA_DIR`.

Why one resolver: a wheel carries code only (the models and corpus are ~100 MB of
assets), so every stage that defaults to bundled data must find it the same way and,
when it is absent, fail with the same one line saying how to point at it.
The environment variable wins over the checkout: an explicit setting beats a guess.
"""

from __future__ import annotations

import os
from pathlib import Path

from pascal_moe.errors import PascalError

ENV = "PASCAL_DATA_DIR"
CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "data"  # <checkout>/pascal_moe/io/bundled.py -> <checkout>/data
HOW = f"set {ENV} to a folder holding models/ and seed/ (a pascal-moe checkout's data/), or pass --model / --data paths"


def data_dir() -> Path:
    """The folder holding `models/` and `seed/`: `$PASCAL_DATA_DIR`, else the checkout's `data/`."""
    env = os.environ.get(ENV)
    if env:
        p = Path(env).expanduser()
        if not ((p / "models").is_dir() or (p / "seed").is_dir()):
            raise PascalError(
                f"{ENV}={env} holds no models/ or seed/ folder: point it at a pascal-moe checkout's data/"
            )
        return p
    if (CHECKOUT_DATA / "models").is_dir() or (CHECKOUT_DATA / "seed").is_dir():
        return CHECKOUT_DATA
    raise PascalError(f"no bundled data (an installed wheel does not carry it): {HOW}")


def bundled_models() -> Path:
    """The bundled models folder (one subfolder per model)."""
    p = data_dir() / "models"
    if not p.is_dir():
        raise PascalError(f"no bundled models in {p.parent}: {HOW}")
    return p


def bundled_seed() -> Path:
    """The bundled seed corpus (Parquet with text, domain, split columns)."""
    p = data_dir() / "seed" / "seed.parquet"
    if not p.is_file():
        raise PascalError(f"the bundled seed corpus {p} is missing: {HOW}")
    return p
