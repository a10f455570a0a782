"""Benchmark of the distributed trainer, side by side in one run on this machine.

    .venv/bin/python tests/bench/bench_distributed.py [--out bench-results/distributed.json]

Measures, with real Ray Train workers and DeepSpeed engines:
1. throughput (tokens/s over the timed steps) of 1 rank vs 2 data-parallel ranks, same global batch;
2. per-rank parameter + optimizer memory of one rank holding the whole dictionary vs each of two
   latent-parallel ranks (goal ≤ 0.55×);
3. bytes one rank sends per step through the latent-parallel collectives for L = 16k and 128k
   (goal: the same);
4. the largest dictionary at d = 256, 2 sources that trains a few steps in one process on this
   machine (goal ≥ 1M latents), found by trying sizes in fresh subprocesses under a memory limit;
5. each rank's peak resident memory over a whole run, export included, at L = 262,144, d = 256 × 2:
   one worker vs each of two latent-parallel workers (goal ≤ 0.55×; rank 0 also assembles the export);
6. (``--largest-latent-parallel``) the largest dictionary this machine trains with 2 latent-parallel
   Ray Train workers on it: each rank's peak RSS over a whole run at two sizes gives its bytes per
   latent (a line), which predicts the size at which both ranks together reach the memory limit;
   a run at the largest multiple of 65,536 below that size checks the prediction.
Prints a table and writes JSON; not part of the test suite (no timed assertions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from crosscoder.config import RunConfig, SyntheticConfig  # noqa: E402
from crosscoder.synthetic import write_synthetic  # noqa: E402


def make_data(path: str, d: int = 256, tokens: int = 40_000) -> str:
    cfg = SyntheticConfig(widths=[d, d], features=1024, tokens=tokens, seq_len=256, samples_per_shard=16)
    write_synthetic(cfg, path, progress=False)
    return path


def config(latents: int, workers: int, lp: int, steps: int, batch: int = 1024) -> RunConfig:
    cfg = RunConfig(name="bench")
    t = cfg.train
    t.latents, t.k, t.batch_size, t.steps, t.workers, t.latent_parallel = latents, 32, batch, steps, workers, lp
    t.checkpoint_every, t.log_every, t.lr_warmup_steps, t.dead_tokens = 0, 1, 1, 10_000_000
    t.shuffle_samples = 8
    return cfg


def run(cfg: RunConfig, data: str, workdir: Path, name: str) -> dict:
    from crosscoder.ray_train import train_distributed

    run_dir = workdir / name
    out = dataclasses.asdict(train_distributed(cfg, run_dir, data, progress=False))
    log = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    warm = 2  # steps excluded from timing
    seconds = log[-1]["elapsed_s"] - log[warm - 1]["elapsed_s"]
    out["tokens_per_s"] = (len(log) - warm) * cfg.train.batch_size / seconds
    out["bytes_per_step"] = out["comm_bytes"] / cfg.train.steps
    return out


LARGEST_CHILD = """
import sys, resource, time, torch
sys.path.insert(0, {root!r})
from crosscoder.model import CrossCoder, CrossCoderSpec
from crosscoder.losses import LossWeights, forward_and_loss
from crosscoder.dead import DeadLatentTracker
L, B = {latents}, {batch}
spec = CrossCoderSpec(["base", "chat"], [256, 256], L, k=32)
model = CrossCoder(spec, dec_init_norm=1.0)
opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as the trainer
tracker = DeadLatentTracker((1, L), 10_000_000)
x = torch.randn(B, 512)
for _ in range(3):
    _, loss, _ = forward_and_loss(model, x, tracker.dead, LossWeights(aux=1/32, aux_k=256))  # as the trainer
    opt.zero_grad(); loss.backward(); opt.step()
print("OK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def largest_dictionary(limit_bytes: int, batch: int = 256) -> list[dict]:
    rows = []
    for latents in (262_144, 524_288, 786_432, 1_048_576, 1_310_720, 1_572_864):
        code = LARGEST_CHILD.format(root=str(ROOT), latents=latents, batch=batch)

        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

        start = time.time()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit)
        ok = proc.returncode == 0 and proc.stdout.startswith("OK")
        peak = int(proc.stdout.split()[1]) if ok else None
        rows.append({"latents": latents, "trained": ok, "peak_rss_bytes": peak, "seconds": time.time() - start,
                     "error": None if ok else (proc.stderr.strip().splitlines() or ["?"])[-1][:200]})
        print(f"  L={latents:>9,}: {'trains' if ok else 'fails'}"
              + (f", peak RSS {peak / 2**30:.1f} GiB" if ok else f" ({rows[-1]['error']})"), flush=True)
        if not ok:
            break
    return rows


def largest_latent_parallel(data: str, work: Path, limit_bytes: float) -> dict:
    """Measurement 6 (see the module docstring)."""
    print("6. largest dictionary with 2 latent-parallel workers on this machine, d=256×2, batch 256", flush=True)
    sizes = (131_072, 262_144)
    peaks = []
    for latents in sizes:
        result = run(config(latents, 2, 2, 3, batch=256), data, work, f"lp-{latents}")
        peaks.append(result["memory_bytes"]["peak_rss"])
        print(f"  L={latents:,}: rank 0 peak RSS {peaks[-1] / 2**30:.2f} GiB", flush=True)
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    limit_bytes = min(limit_bytes, 0.9 * available)  # what this machine has free now, with a margin
    per_latent = (peaks[1] - peaks[0]) / (sizes[1] - sizes[0])
    fixed = peaks[0] - per_latent * sizes[0]
    predicted = int((limit_bytes / 2 - fixed) / per_latent)  # two ranks on this machine
    trial = predicted // 65_536 * 65_536
    print(f"  rank bytes per latent {per_latent:,.0f}, fixed {fixed / 2**30:.2f} GiB: 2 ranks reach "
          f"{limit_bytes / 2**30:.0f} GiB at L ≈ {predicted:,}; trying L={trial:,}", flush=True)
    try:
        cfg = config(trial, 2, 2, 3, batch=256)
        cfg.train.max_failures = 0  # a worker killed for memory is the answer, not something to retry
        checked = run(cfg, data, work, "lp-largest")
        trained, peak = checked["steps"] == 3, checked["memory_bytes"]["peak_rss"]
    except Exception as error:  # noqa: BLE001 - a failure is the measurement
        trained, peak = False, None
        print(f"  L={trial:,} failed: {str(error).splitlines()[0][:200]}", flush=True)
    if trained:
        print(f"  L={trial:,} trains with 2 latent-parallel workers: rank 0 peak RSS {peak / 2**30:.2f} GiB", flush=True)
    return {"sizes": sizes, "rank_peak_rss": peaks, "rank_bytes_per_latent": per_latent, "rank_fixed_bytes": fixed,
            "predicted_largest": predicted, "trial": trial, "trained": trained, "trial_rank_peak_rss": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "distributed.json"))
    parser.add_argument("--memory-limit-gib", type=float, default=23.0)
    parser.add_argument("--skip-largest", action="store_true")
    parser.add_argument("--only-run-memory", action="store_true", help="only measurement 5")
    parser.add_argument("--largest-latent-parallel", action="store_true", help="only measurement 6")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "python": platform.python_version()}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_data(str(work / "shards"))
        if args.largest_latent_parallel:
            results["largest_latent_parallel"] = largest_latent_parallel(data, work, args.memory_limit_gib * 2**30)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            return
        print("5. peak RSS per rank over a whole run (export included), L=262144, d=256×2, batch 256", flush=True)
        whole = run(config(262_144, 1, 1, 4, batch=256), data, work, "rss1")["memory_bytes"]["peak_rss"]
        split = run(config(262_144, 2, 2, 4, batch=256), data, work, "rss2")["memory_bytes"]["peak_rss"]
        results["run_memory"] = {"one_worker_peak_rss": whole, "latent_parallel_rank0_peak_rss": split,
                                 "ratio": split / whole}
        print(f"  one worker {whole / 2**30:.2f} GiB, rank 0 of 2 latent-parallel {split / 2**30:.2f} GiB: "
              f"{split / whole:.3f}×", flush=True)
        if args.only_run_memory:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
            return
        print("1. throughput, L=16384, d=256×2, k=32, global batch 1024", flush=True)
        one = run(config(16384, 1, 1, 12), data, work, "dp1")
        two = run(config(16384, 2, 1, 12), data, work, "dp2")
        results["throughput"] = {"1_rank_tokens_per_s": one["tokens_per_s"], "2_ranks_tokens_per_s": two["tokens_per_s"],
                                 "speedup": two["tokens_per_s"] / one["tokens_per_s"]}
        print("2./3. memory and bytes per step, latent parallel over 2 ranks", flush=True)
        mem_one = one["memory_bytes"]["total"]
        lp16 = run(config(16384, 2, 2, 6), data, work, "lp16k")
        lp128 = run(config(131072, 2, 2, 6), data, work, "lp128k")
        results["memory"] = {"one_rank_bytes": mem_one, "latent_parallel_rank_bytes": lp16["memory_bytes"]["total"],
                             "ratio": lp16["memory_bytes"]["total"] / mem_one, "detail_one": one["memory_bytes"],
                             "detail_lp": lp16["memory_bytes"]}
        results["bytes_per_step"] = {"L=16384": lp16["bytes_per_step"], "L=131072": lp128["bytes_per_step"],
                                     "ratio": lp128["bytes_per_step"] / lp16["bytes_per_step"]}
    ray.shutdown()
    if not args.skip_largest:
        print("4. largest dictionary at d=256, 2 sources, batch 256, one process", flush=True)
        results["largest"] = largest_dictionary(int(args.memory_limit_gib * 2**30))

    t, m, b = results["throughput"], results["memory"], results["bytes_per_step"]
    print()
    print("| measure | value | goal |")
    print("|---|---|---|")
    print(f"| tokens/s, 1 rank | {t['1_rank_tokens_per_s']:,.0f} | |")
    print(f"| tokens/s, 2 data-parallel ranks | {t['2_ranks_tokens_per_s']:,.0f} ({t['speedup']:.2f}×) | |")
    print(f"| param+optimizer bytes per rank, 2 latent-parallel ranks vs 1 rank | {m['ratio']:.3f}× | ≤ 0.55× |")
    print(f"| bytes sent per step, L=16k | {b['L=16384']:,.0f} | |")
    print(f"| bytes sent per step, L=128k | {b['L=131072']:,.0f} ({b['ratio']:.3f}×) | the same |")
    r = results["run_memory"]
    print(f"| peak RSS over a whole run incl. export, L=262k, 2 latent-parallel ranks vs 1 | {r['ratio']:.3f}× | ≤ 0.55× |")
    if "largest" in results:
        ok = [r["latents"] for r in results["largest"] if r["trained"]]
        print(f"| largest dictionary trained (d=256, 2 sources) | {max(ok) if ok else 0:,} latents | ≥ 1M |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
