"""SIGTERM (what a cluster scheduler sends before SIGKILL) and SIGINT (Ctrl-C) stop a sweep at a safe point.

Inside `interruptible()` either signal raises `Interrupted` where the main thread is, except inside `critical()`
blocks (a manifest write; renaming a finished adapter and recording it), which end first. The engine marks the
run being trained `interrupted`; its last checkpoint is where the next run resumes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_held: list[int] = []  # signals received inside a critical block
_depth = 0


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived; `exit_status` is the shell's 128 + signal number (143, 130)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _handle(signum: int, frame: object) -> None:
    if _depth:
        _held.append(signum)
    else:
        raise Interrupted(signum)


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` while the block runs (main thread only: Python delivers signals
    there; elsewhere this does nothing). The previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handle) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def critical() -> Iterator[None]:
    """A block that a signal does not cut: one received meanwhile raises `Interrupted` when it ends."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _held:
            signum = _held[0]
            _held.clear()
            raise Interrupted(signum)
