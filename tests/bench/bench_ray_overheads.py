"""What a command's own local Ray costs at its end, with and without this project's two settings.

    python tests/bench/bench_ray_overheads.py [--rounds 4] [--out bench-results/ray_overheads.json]

Side by side, alternating, in one run:

1. ``ray.shutdown()`` of the local Ray ``ray_connect.connect`` starts (its processes block SIGTERM):
   with Ray's own kill (SIGTERM, a 1-s grace, SIGKILL, for each process) and with
   ``ray_connect._no_grace_for_the_deaf`` (SIGKILL at once for the processes that cannot hear the
   SIGTERM). Each in a fresh process with a fresh Ray.
2. How late a Ray Train fit returns after its last worker's function ended, with Ray Train's
   default poll of the workers (every 2 s) and with the local Ray's (``ray_connect.LOCAL_RAY_ENV``,
   0.25 s). Two workers whose function sleeps a little longer each round, so the end falls at
   another point of the poll's cycle.

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SHUTDOWN = """
import sys, time
sys.path.insert(0, {root!r})
from crosscoder import ray_connect
ray = ray_connect.connect(2)
node = ray._private.worker._global_node
if {rays_own}:
    del node._kill_process_impl  # the instance's wrapper: back to Ray's method
started = time.time()
ray.shutdown()
print("SHUTDOWN", time.time() - started, flush=True)
"""


def shutdown_seconds(rays_own: bool) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    out = subprocess.run([sys.executable, "-c", SHUTDOWN.format(root=str(ROOT), rays_own=rays_own)], env=env,
                         capture_output=True, text=True, timeout=300, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("SHUTDOWN ")).split()[1])


def sleep_then_note_the_time(config: dict) -> None:
    import ray.train

    time.sleep(config["seconds"])
    Path(f"{config['out']}.{ray.train.get_context().get_world_rank()}").write_text(repr(time.time()))


def fit_latency(interval: str, seconds: float, storage: str) -> float:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval  # read by Ray Train at each fit
    out = tempfile.mktemp(dir=storage)
    TorchTrainer(sleep_then_note_the_time, train_loop_config={"seconds": seconds, "out": out},
                 scaling_config=ScalingConfig(num_workers=2),
                 run_config=RunConfig(storage_path=storage, name=Path(out).name)).fit()
    returned = time.time()
    return returned - max(float(Path(f"{out}.{rank}").read_text()) for rank in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "ray_overheads.json"))
    args = parser.parse_args()

    shutdown: dict[str, list[float]] = {"Ray's kill": [], "no grace for the deaf": []}
    for _ in range(args.rounds):
        shutdown["Ray's kill"].append(shutdown_seconds(rays_own=True))
        shutdown["no grace for the deaf"].append(shutdown_seconds(rays_own=False))
    for mode, values in shutdown.items():
        print(f"ray.shutdown(), {mode}: mean {statistics.mean(values):.2f} s {[round(v, 2) for v in values]}")

    from crosscoder.ray_connect import connect

    os.environ.pop("RAY_ADDRESS", None)
    connect(2)
    latency: dict[str, list[float]] = {"2": [], "0.25": []}
    with tempfile.TemporaryDirectory() as storage:
        for round_ in range(args.rounds):
            for interval in latency:
                latency[interval].append(fit_latency(interval, 1.0 + 0.37 * round_, storage))
    for interval, values in latency.items():
        print(f"fit() after the last worker ended, workers polled every {interval} s: mean "
              f"{statistics.mean(values):.2f} s {[round(v, 2) for v in values]}")

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"shutdown_s": shutdown, "fit_return_after_workers_s": latency}, indent=1))


if __name__ == "__main__":
    main()
