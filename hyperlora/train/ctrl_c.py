"""Ctrl-C in the training loops: the first one asks the loop to stop at its next safe point, a second one stops
at once.  One flag for fit, difflora-fit and difflora-dataset."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

AFTER_STEP = "saving a checkpoint after this step, then stopping (Ctrl-C again to abort)."
"""What the first Ctrl-C of a step loop (fit, difflora-fit) announces."""


class StopFlag:
    """Ctrl-C (SIGINT) sets :attr:`set` and logs ``"Ctrl-C: " + message``; the loop checks the flag at its safe
    point.  A second Ctrl-C raises KeyboardInterrupt.  A context manager: the handler is installed (main thread
    only) on entry and the handler found there restored on exit."""

    def __init__(self, message: str = AFTER_STEP) -> None:
        self.set = False
        self.message = message
        self._old: Any = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.set:                                  # second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.set = True
        log.warning("Ctrl-C: %s", self.message)

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


__all__ = ["AFTER_STEP", "StopFlag"]
