"""Progress bars: redrawn in place on a terminal, twice (start, end) or every 30 s in a log."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from crosscoder.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]


def test_a_command_writing_to_a_log_draws_its_bar_at_the_start_and_the_end_only(tmp_path):
    """A log (here a pipe: ``nohup ... > log``, a ``ray job submit`` driver, a Ray worker's output)
    keeps every redraw as a line; 469 shards written in a second or two were ~20 lines of bar at
    tqdm's ten redraws a second."""
    proc = subprocess.run([sys.executable, "-m", "crosscoder.cli", "synthetic", "--config",
                           str(REPO / "launch" / "configs" / "synthetic.toml"), "--synthetic.tokens", "60000",
                           "--synthetic.samples_per_shard", "1", "--synthetic.output", str(tmp_path / "shards")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 469 shards" in proc.stdout
    drawn = [line for line in re.split(r"[\r\n]", proc.stderr) if line.startswith("synthetic shards:")]
    assert len(drawn) == 2, drawn
    assert " 0/469 " in drawn[0] and " 469/469 " in drawn[1]


def test_a_bar_on_a_terminal_is_redrawn_as_often_as_asked():
    import pty

    master, slave = pty.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        with progress_bar(total=20, desc="work", file=terminal, mininterval=0.05) as bar:
            for _ in range(20):
                time.sleep(0.05)
                bar.update(1)
        terminal.flush()
        shown = os.read(master, 1 << 16).decode()
    finally:
        terminal.close()
        os.close(master)
    assert shown.count("work:") >= 6, shown  # 1 s of work, at most one redraw per 0.05 s


def test_every_bar_of_the_package_is_a_progress_bar():
    """A bar made with tqdm itself would redraw ten times a second into every log."""
    package = REPO / "crosscoder"
    direct = [f"{path.name}:{n}" for path in sorted(package.glob("*.py")) if path.name != "progress.py"
              for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(r"(?<![\w.])tqdm\(", line)]
    assert not direct


def test_transformers_bars_in_a_log_are_paced_as_ours_once_a_model_is_loaded(tmp_path):
    """transformers' "Loading weights" bar (a real model: hundreds of tensors over seconds) was a line per
    0.1 s in a ``ray job submit`` or ``nohup`` log."""
    import io

    from transformers.utils import logging as hf_logging

    from crosscoder.language_models import ModelSpec, load_model
    from crosscoder.random_pair import make_pair

    base, _ = make_pair(tmp_path / "pair", hidden=32, layers=2)
    previous = hf_logging.set_tqdm_hook(None)
    try:
        load_model(ModelSpec(name="base", path=base))  # sets the hook, as every model load does
        log = io.StringIO()
        with hf_logging.tqdm(total=20, desc="Loading weights", file=log) as bar:
            for _ in range(20):
                time.sleep(0.05)
                bar.update(1)
    finally:
        hf_logging.set_tqdm_hook(previous)
    drawn = [line for line in re.split(r"[\r\n]", log.getvalue()) if line.startswith("Loading weights")]
    assert len(drawn) == 2, drawn  # 1 s of loading: tqdm's default drew it ten times


def test_a_bar_in_a_jupyter_notebook_is_redrawn_as_on_a_terminal():
    """ipykernel's output stream is no tty, but a notebook redraws a bar in place. ipykernel is not
    installed here: a stream class of that module, writing to a pipe, stands in for its OutStream."""
    OutStream = type("OutStream", (io.StringIO,), {"__module__": "ipykernel.iostream"})
    shown = OutStream()
    with progress_bar(total=20, desc="work", file=shown, mininterval=0.05) as bar:
        for _ in range(20):
            time.sleep(0.05)
            bar.update(1)
    assert shown.getvalue().count("work:") >= 6
