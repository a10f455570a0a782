"""Benchmark of the whole training step as a user's run pays for it, against the encoder-product floor.

    .venv/bin/python tests/bench/bench_step.py [--out bench-results/step.json] [--sizes 256x16384,256x65536x128]
        [--activations batchtopk,jumprelu] [--kernels on,off] [--jumprelu-threshold 0.5]

A step here is what ``crosscoder train`` does per step, timed by the trainer itself: the real
``trainer.train`` loop (one process, fp32, the sparse and compiled kernels) on planted synthetic
shards, i.e. the data stream, schedule, forward and loss with AuxK, backward, clipping, Adam, the
threshold update, the dead-latent tracker and the step metrics, with the default ``log_every = 10``
(the logged metrics, inference L0 included, cost a pass over ``[B, L]`` on those steps, as they do in
a user's run). Its time per step is read from the run's ``train_log.jsonl``: the difference of
``elapsed_s`` between two logged steps, over 10 steps (the first interval after each start, which
holds the warm-up, is left out). Each size runs in two states (``--dead-tokens``): with a window of
two batches, so some latents count dead from the first steps and AuxK selects and decodes up to
``k_aux`` (half the input width) entries per token on every step, as in most of a real run; and with
200,000 tokens, longer than the bench, so nothing is dead yet and AuxK adds nothing. The floor is
the dense encoder product ``x @ W_enc`` into a kept buffer (as in bench_kernels.py). Segments of training steps and floor products alternate in one
process (the run is resumed between segments), so both ratios are taken under the same machine
load. S = 2 sources of width d, batch 2048, k = 64 unless a size says otherwise (``d x L x k``).
``--activations`` adds other sparsity rules (JumpReLU: its defaults but the initial threshold
``--jumprelu-threshold``, k unused; its L0, which sets the sparse path's work, is in the row) and ``--kernels off`` the dense reference computation, each in the
same turns. Not part of the test suite (no timed assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from crosscoder.config import RunConfig, SyntheticConfig  # noqa: E402
from crosscoder.synthetic import write_synthetic  # noqa: E402
from crosscoder.trainer import train  # noqa: E402

BATCH, K, LOG_EVERY = 2048, 64, 10


def floor_seconds(d: int, L: int, repeats: int) -> list[float]:
    x = torch.randn(BATCH, 2 * d)
    W = torch.randn(2 * d, L) / (2 * d) ** 0.5
    out = torch.empty(BATCH, L)
    torch.mm(x, W, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(x, W, out=out)
        times.append(time.perf_counter() - t0)
    return times


def step_seconds(run: Path, after: int) -> list[float]:
    """Seconds per step between consecutive logged steps past ``after`` (the segment's start), the
    interval that holds the restart's warm-up left out."""
    rows = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    elapsed = {r["step"]: r["elapsed_s"] for r in rows}
    steps = sorted(s for s in elapsed if s > after + LOG_EVERY and s - LOG_EVERY in elapsed)
    return [(elapsed[s] - elapsed[s - LOG_EVERY]) / LOG_EVERY for s in steps]


def measure(d: int, L: int, k: int, work: Path, segments: int, per_segment: int, dead_tokens: int,
            activation: str = "batchtopk", kernels: str = "on", jumprelu_threshold: float | None = None) -> dict:
    data = work / f"shards-{d}"
    if not data.exists():
        write_synthetic(SyntheticConfig(widths=[d, d], features=2048, tokens=BATCH * 48, seq_len=256,
                                        samples_per_shard=32), str(data), progress=False)
    cfg = RunConfig(name="bench-step")
    t = cfg.train
    t.latents, t.k, t.batch_size, t.steps = L, k, BATCH, segments * per_segment
    t.log_every, t.checkpoint_every, t.keep_checkpoints, t.lr_warmup_steps = LOG_EVERY, 0, 1, 1
    t.dead_tokens, t.calibration_batches, t.sparse_kernels, t.activation = dead_tokens, 0, kernels, activation
    if jumprelu_threshold is not None:
        t.jumprelu_threshold = jumprelu_threshold
    run = work / f"run-{d}-{L}-{k}-{dead_tokens}-{activation}-{kernels}"
    ratios, steps_all, floors_all = [], [], []
    for segment in range(segments):
        train(cfg, run, data=str(data), progress=False, stop_after=per_segment)
        steps = step_seconds(run, segment * per_segment)
        floors = floor_seconds(d, L, per_segment)
        steps_all += steps
        floors_all += floors
        ratios.append(statistics.median(steps) / statistics.median(floors))
        print(f"  {activation} kernels {kernels} d={d} L={L:,} k={k} dead window {dead_tokens:,} segment {segment + 1}: step "
              f"{statistics.median(steps) * 1e3:.0f} ms, floor {statistics.median(floors) * 1e3:.0f} ms, ratio "
              f"{ratios[-1]:.2f}", flush=True)
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {"d": d, "latents": L, "k": k, "dead_tokens": dead_tokens, "activation": activation, "kernels": kernels,
            "dead_fraction": statistics.median(r["dead_fraction"] for r in logged),
            "l0": statistics.median(r["l0"] for r in logged),
            "step_s": statistics.median(steps_all), "floor_s": statistics.median(floors_all),
            "ratio_per_segment": ratios, "ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "step.json"))
    parser.add_argument("--sizes", default="256x16384,256x65536,512x65536,256x262144,256x65536x32,256x65536x128,"
                        "256x65536x256", help="d x L or d x L x k, comma separated")
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per segment (a multiple of 10)")
    parser.add_argument("--dead-tokens", default=f"{2 * BATCH},200000",
                        help="train.dead_tokens values, comma separated: the states each size runs in")
    parser.add_argument("--activations", default="batchtopk", help="train.activation values, comma separated")
    parser.add_argument("--kernels", default="on", help="train.sparse_kernels values (on, off), comma separated")
    parser.add_argument("--jumprelu-threshold", type=float, default=None,
                        help="train.jumprelu_threshold (default: the config's): where a run's thresholds stand")
    args = parser.parse_args()
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as the CLI sets it
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            d, L, *rest = (int(v) for v in size.split("x"))
            for dead_tokens in map(int, args.dead_tokens.split(",")):
                for activation in args.activations.split(","):
                    for kernels in args.kernels.split(","):
                        rows.append(measure(d, L, rest[0] if rest else K, Path(tmp), args.segments, args.steps,
                                            dead_tokens, activation, kernels, args.jumprelu_threshold))
    print("\n| rule | kernels | d | L | k | L0 | dead (AuxK) | full step | floor `x @ W_enc` | full step / floor, in turn "
          "(median of segments) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['activation']} | {r['kernels']} | {r['d']} | {r['latents']:,} | {r['k']} | {r['l0']:.0f} | "
              f"{r['dead_fraction']:.0%} | {r['step_s'] * 1e3:.0f} ms | "
              f"{r['floor_s'] * 1e3:.0f} ms | "
              f"{r['ratio']:.2f}× ({', '.join(f'{x:.2f}' for x in r['ratio_per_segment'])}) |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                          "batch": BATCH, "log_every": LOG_EVERY, "rows": rows}, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
