"""Progress bars that suit where they are read, a terminal or a log; and lines said beside them.

On a terminal (or in a Jupyter notebook) a bar redraws in place, and a redraw each second or less
often is what one wants to watch. Anywhere else every redraw is a line of its own: a log file
(``nohup ... > log``), the driver of a ``ray job submit`` or a KubeRay pod, and the output of a Ray
worker, which Ray passes on to the driver a line per redraw. There a bar redraws every
:data:`LOG_INTERVAL_S` at the most, so a training of a day writes about 3,000 lines, not 86,400 (one
a second) or ten times that (tqdm's default); its first and last states are always written.
transformers' own bars ("Loading weights") are paced the same way once a model is loaded through
``language_models``. The cost: progress followed in a log is up to 30 s old.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # the shortest time between two redraws of a bar that is not on a terminal


def progress_bar(iterable: Any = None, **settings: Any) -> tqdm:
    """``tqdm(iterable, **settings)``, redrawn at most every ``LOG_INTERVAL_S`` where its output
    (``file``, standard error by default) is not a terminal; ``mininterval`` (tqdm's, 0.1 s by
    default) holds on a terminal."""
    return tqdm(iterable, **_paced(settings))


def _paced(settings: dict[str, Any]) -> dict[str, Any]:
    """tqdm's ``settings``, redrawn at most every ``LOG_INTERVAL_S`` where the bar's output is not a
    terminal (tqdm's defaults: mininterval 0.1 s, maxinterval 10 s)."""
    if _on_a_terminal(settings.get("file") or sys.stderr):
        return settings
    interval = max(settings.get("mininterval", 0.1), LOG_INTERVAL_S)
    return {**settings, "mininterval": interval, "maxinterval": max(settings.get("maxinterval", 10.0), interval)}


def say(line: str, error: bool = False) -> None:
    """``line`` on standard output (or error), once, also in a Ray Train worker: Ray Train replaces
    print() there with one that logs the line and, where the stream is not the process's own, prints
    it as well, so the driver's console showed a print() twice. A write to the stream is left alone."""
    stream = sys.stderr if error else sys.stdout
    stream.write(line + "\n")
    stream.flush()


def pace_transformers_bars() -> None:
    """transformers' own bars ("Loading weights") paced as ours are, through its tqdm hook (transformers
    5). Called where a model is loaded, not at start-up: importing transformers takes most of a second."""
    from transformers.utils import logging as hf_logging

    def made(factory, args, kwargs):
        if isinstance(factory, type) and issubclass(factory, tqdm):  # not transformers' stand-in for a disabled bar
            kwargs = _paced(kwargs)
        return factory(*args, **kwargs)

    if hasattr(hf_logging, "set_tqdm_hook"):
        hf_logging.set_tqdm_hook(made)


def _on_a_terminal(output: Any) -> bool:
    """A terminal, or a Jupyter kernel's output (not a tty, but it redraws a bar in place)."""
    if type(output).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(output.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False
