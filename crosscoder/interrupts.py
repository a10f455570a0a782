"""Ctrl-C during a long loop: finish the step, write a checkpoint, then stop.

A training loop interrupted in the middle of a step (between the optimizer update and the
bookkeeping of the data position) cannot be checkpointed consistently, and one interrupted without
a checkpoint redoes every step since the last one. :class:`StepBoundary` turns the first Ctrl-C
into a request the loop sees at its next step boundary, where it checkpoints and raises
``KeyboardInterrupt``; a second Ctrl-C stops at once. It only acts in the main thread (Python
delivers signals there); elsewhere it is inert. The cost: a Ctrl-C waits for the step in progress.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StepBoundary:
    """``with StepBoundary() as stop: ... if stop.requested: <checkpoint>; raise KeyboardInterrupt``."""

    def __init__(self, what: str = "this step"):
        self.what, self.requested = what, False
        self._installed: bool = False
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\ncrosscoder: stopping after {self.what} with a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StepBoundary:
        if threading.current_thread() is threading.main_thread():
            self._previous, self._installed = signal.signal(signal.SIGINT, self._handler), True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # a handler not set from Python reads as None: put Python's default back
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
