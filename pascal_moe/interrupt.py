"""Ctrl-C that is never lost: a SIGINT handler that remembers the interrupt.

Why: Python raises KeyboardInterrupt wherever the main thread happens to be; inside a weakref
callback or a `__del__` (torch and tokenizers run many) it is printed as "Exception ignored" and
the run goes on, so a user's Ctrl-C could be dropped and the stage marked finished.  The handler
sets a flag as well as raising; `check()` at the stage boundaries raises again if the first one
was swallowed, so an interrupted stage is never recorded as done.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_requested = threading.Event()


def _in_finalizer(frame) -> bool:
    """Whether Python is running a weakref callback or `__del__`: an exception raised there is only printed."""
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code.co_filename.endswith("weakref.py"):
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    _requested.set()
    if not _in_finalizer(frame):  # else the next check() raises, at a stage boundary
        raise KeyboardInterrupt


@contextmanager
def watching() -> Iterator[None]:
    """Install the handler (main thread only) for the duration of a command; restore the old one after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    old = signal.signal(signal.SIGINT, _handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def requested() -> bool:
    return _requested.is_set()


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed, even when its first KeyboardInterrupt was swallowed."""
    if _requested.is_set():
        raise KeyboardInterrupt
