"""Where a run directory's recorded paths are after the directory moved.

A run records absolute paths: its ``config.toml`` names its shards (``<run>/shards`` by default) and,
for the demo pair, its models and documents (``<run>/tiny``); its shards' manifest names the models
and tokenizer the analysis loads for CE loss recovered and the report's text. A run trained on a
cluster and fetched to a laptop, or archived with ``mv``, finds none of them at the recorded place.

Why the paths are read in a new place rather than rewritten: the manifest is the shard format's
contract (its fingerprint covers the sources' models), and a copy may be meant to leave the
original's files as they are. So a recorded local path that lay under the directory where the run
was trained, and is gone from there, is read at the same place under the run directory's path now.
Where it was trained is ``train_result.json``'s ``run_dir``, absolute since this module exists: a run
trained before records it as given (often relative) and is not relocated. Paths outside the run
directory (a shared data root, a model folder elsewhere) and paths still there are left as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

RESULT_FILE = "train_result.json"  # trainer.RESULT_FILE, read here without importing torch


def trained_in(run_dir: Path) -> Path | None:
    """The directory the run was trained in, when that is not ``run_dir`` (moved or copied since)."""
    try:
        recorded = json.loads((Path(run_dir) / RESULT_FILE).read_text()).get("run_dir", "")
    except (OSError, ValueError, AttributeError):
        return None
    if not recorded or not os.path.isabs(recorded):
        return None
    old = Path(recorded)
    return None if os.path.realpath(old) == os.path.realpath(run_dir) else old


def locator(run_dir: Path) -> Callable[[str], str]:
    """A function from a path the run recorded to where it is now (see the module's docstring)."""
    old, new = trained_in(run_dir), Path(run_dir).absolute()
    if old is None:
        return lambda path: path

    def locate(path: str) -> str:
        if not path or "://" in path or not os.path.isabs(path):
            return path
        recorded = Path(path)
        if not recorded.is_relative_to(old) or recorded.exists():
            return path
        return str(new / recorded.relative_to(old))

    return locate
