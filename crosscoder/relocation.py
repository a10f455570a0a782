"""Where a run directory's recorded paths are after the directory moved.

A run records absolute paths: its ``config.toml`` names its shards (``<run>/shards`` by default) and,
for the demo pair, its models and documents (``<run>/tiny``); its shards' manifest names the models
and tokenizer the analysis loads for CE loss recovered and the report's text. A run trained on a
cluster and fetched to a laptop, or archived with ``mv``, finds none of them at the recorded place.

Why the paths are read in a new place rather than rewritten: the manifest is the shard format's
contract, and a copy may be meant to leave the original's files as they are. So a recorded local
path that lay under the directory the file was written in, and is gone from there, is read at the
same place under that directory's path now. Each file is anchored by what was written with it:
``config.toml``'s paths by ``train_result.json``'s ``run_dir`` (both written by the training; a run
trained before this module records it as given, often relative, and is not relocated); a
manifest's by the shard root it records it was written to (the harvest block's ``output``), so a
run trained again after a move still finds what its older manifest names, and a copy of that run
too. A harvest compares its recorded models and documents with the config's the same way, and
takes a path that is still there as moved where the new folder holds its copy. Paths outside the
moved directory (a shared data root, a model folder elsewhere) are left as they are.
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


def _moving(old: Path | None, new: Path, keep_existing: bool) -> Callable[[str], str]:
    """Local absolute paths under ``old``, at the same place under ``new``: where the old one is gone
    (``keep_existing``) or where it is gone or the new one exists (a copy's files are its own)."""
    if old is None or os.path.realpath(old) == os.path.realpath(new):
        return lambda path: path

    def move(path: str) -> str:
        if not path or "://" in path or not os.path.isabs(path) or not Path(path).is_relative_to(old):
            return path
        there = new / Path(path).relative_to(old)
        gone = not Path(path).exists()
        return str(there) if gone or (not keep_existing and there.exists()) else path

    return move


def locator(run_dir: Path) -> Callable[[str], str]:
    """A function from a path the run's config recorded to where it is now (the module's docstring)."""
    return _moving(trained_in(run_dir), Path(run_dir).absolute(), keep_existing=True)


def shards_written_to(root_path: str | Path, written_to: str | None) -> Path | None:
    """Where the directory holding a shard root was when its manifest was written: the parent of
    the root the manifest recorded (the harvest block's ``output``), or, for a manifest that
    predates that record, the directory the run whose ``shards`` folder it is was trained in."""
    if written_to and os.path.isabs(written_to) and "://" not in written_to:
        return Path(written_to).parent
    return trained_in(Path(root_path).absolute().parent)


def shards_locator(root_path: str | Path, written_to: str | None) -> Callable[[str], str]:
    """A function from a path a local shard root's manifest recorded (the models, the tokenizer, the
    documents) to where it is now, when the folder holding the root moved with them since."""
    return _moving(shards_written_to(root_path, written_to), Path(root_path).absolute().parent, keep_existing=True)


def shards_mover(root_path: str | Path, written_to: str | None) -> Callable[[str], str]:
    """As :func:`shards_locator`, and a path still there is moved too where the root's folder holds
    its copy: how a harvest compares what its manifest recorded with a moved or copied run's config."""
    return _moving(shards_written_to(root_path, written_to), Path(root_path).absolute().parent, keep_existing=False)
