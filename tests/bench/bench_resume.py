"""How long a resumed run takes to its first step, against a fresh run, side by side.

    python tests/bench/bench_resume.py [--out bench-results/resume.json]

On planted shards, for one process and for 2 Ray Train workers with DeepSpeed: the wall time of a
call that runs one step from scratch (start-up, b_dec from the first batch, the step), then, after
100 more steps, of a call that resumes at step 101 and runs one step (start-up, the checkpoint,
the data position: the windows before it are not read again, the step). A resumed first step should
cost no more than a fresh one plus reading the checkpoint. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from crosscoder.ray_connect import connect  # noqa: E402
from crosscoder.ray_train import train_distributed  # noqa: E402
from crosscoder.synthetic import write_synthetic  # noqa: E402
from crosscoder.trainer import train  # noqa: E402
from tests.conftest import small_run_config, small_synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "resume.json"))
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "shards")
        write_synthetic(small_synthetic(tokens=65536), data, progress=False)
        connect(2)
        for mode in ("one process", "2 Ray Train workers"):
            run = Path(tmp) / mode.replace(" ", "-")
            shutil.rmtree(run, ignore_errors=True)
            cfg = small_run_config(steps=300, checkpoint_every=0, workers=0 if mode == "one process" else 2)

            def call(stop_after: int, cfg=cfg, run=run) -> float:
                started = time.time()
                if cfg.train.workers:
                    train_distributed(cfg, run, data, progress=False, stop_after=stop_after)
                else:
                    train(cfg, run, data=data, progress=False, stop_after=stop_after)
                return time.time() - started

            fresh = call(1)
            call(100)
            resumed = call(1)
            results[mode] = {"fresh_s": fresh, "resumed_s": resumed}
            print(f"{mode}: fresh call to its first step {fresh:.1f} s, resumed at step 102 {resumed:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
