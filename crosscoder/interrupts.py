"""Ctrl-C or SIGTERM during a long loop: finish the step, write a checkpoint, then stop.

A training loop interrupted in the middle of a step (between the optimizer update and the
bookkeeping of the data position) cannot be checkpointed consistently, and one interrupted without
a checkpoint redoes every step since the last one. :class:`StepBoundary` turns the first Ctrl-C
into a request the loop sees at its next step boundary, where it checkpoints and raises
``KeyboardInterrupt``; a second Ctrl-C stops at once. SIGTERM is taken the same way: it is how a
machine asks a process to stop before it kills it (``docker stop``, a Kubernetes pod deleted or
evicted, Slurm at a job's time limit), each after a grace period (10 s, 30 s, Slurm's KillWait)
in which one step and a checkpoint usually fit; without this, a SIGTERM ended the process where it
stood (Ray's driver handler exits at once). It only acts in the main thread (Python delivers
signals there); elsewhere it is inert. The cost: a Ctrl-C waits for the step in progress. Ray
starts its processes with SIGINT blocked, and a local Ray of ours with SIGTERM and SIGHUP blocked
as well (ray_connect.py), so a signal sent to every process of a command reaches only the driver, which
stops its workers at a step boundary.

SIGHUP (the terminal closed: an ssh connection dropped, a terminal window shut, without ``nohup``
or tmux) is taken so too, unless the command started with it ignored (``nohup``): the shell sends it
to every process of the command, and the default ended the training where it stood. A terminal that
has hung up fails every write with EIO, so the first SIGHUP points standard output and error at
``/dev/null`` where they were a terminal (a redirected log file keeps its lines): the stop then
runs to its checkpoint unseen, exit status 130, and a re-run resumes there.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_terminal_outputs: set[int] = set()  # standard output and error where they were a terminal at the start


def stop_signals_as_ctrl_c() -> None:
    """From here on, a SIGTERM or SIGHUP to this process is a Ctrl-C (``KeyboardInterrupt`` in the main
    thread), which the CLI turns into its `interrupted; re-run the same command to ...` line. The CLI
    sets it at its start, and ray_connect.connect again once Ray is started: ray.init() makes a
    driver exit at once on SIGTERM, after a C stack dump and without a word of what was kept. A
    SIGHUP ignored from the start (``nohup``) stays ignored; a SIGINT ignored from the start (a
    non-interactive shell starts its background jobs so) is a Ctrl-C again, so ``kill -INT`` stops a
    harvest or an analysis as it stops a training. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started as a script's background job: `kill -INT`
        signal.signal(signal.SIGINT, signal.default_int_handler)  # stops it, as StepBoundary's training does
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        if signal.getsignal(signal.SIGHUP) is not _interrupt:  # the first call: the terminal is still there
            _terminal_outputs.update(fd for fd in (1, 2) if os.isatty(fd))  # False where fd is closed
        signal.signal(signal.SIGHUP, _interrupt)


def leave_the_terminal() -> None:
    """After a SIGHUP: standard output and error that were a terminal go to /dev/null, since every
    write to a terminal that hung up fails (EIO) and would end the stop before its checkpoint."""
    if not _terminal_outputs:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in sorted(_terminal_outputs):
        os.dup2(null, fd)
    os.close(null)
    _terminal_outputs.clear()


def _interrupt(signum, frame) -> None:
    if signum == signal.SIGHUP:
        leave_the_terminal()
    raise KeyboardInterrupt


class StepBoundary:
    """``with StepBoundary() as stop: ... if stop.requested: <checkpoint>; raise KeyboardInterrupt``."""

    def __init__(self, what: str = "this step"):
        self.what, self.requested = what, False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            leave_the_terminal()
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if signum in (signal.SIGTERM, signal.SIGHUP):
            name = "SIGTERM" if signum == signal.SIGTERM else "SIGHUP (the terminal closed)"
            print(f"\ncrosscoder: {name}: stopping after {self.what} with a checkpoint (a second signal or a "
                  "Ctrl-C stops at once)", file=sys.stderr, flush=True)
        else:
            print(f"\ncrosscoder: stopping after {self.what} with a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StepBoundary:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handler) for signum in SIGNALS
                              if not (signum == signal.SIGHUP and signal.getsignal(signum) is signal.SIG_IGN)}
        return self

    def __exit__(self, *exc) -> None:
        # a handler not set from Python reads as None: put Python's default back
        for signum, previous in self._previous.items():
            default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
            signal.signal(signum, previous if previous is not None else default)
