"""GPU benchmark, side by side in one process: our training step vs the dense reference and the floor,
and the harvest's reads vs a plain forward.

    python tests/bench/bench_gpu.py [--out bench-results/gpu.json] [--latents 65536] [--d 256]

1. Training step (forward, loss with AuxK, backward, Adam step), fp32 and bf16 weights, on one GPU:
   ``ours`` (the sparse PyTorch path: encoder product without autograd, selection, gradients and
   decoder through the active latents only), ``dense`` (the same model with ``sparse_kernels=False``,
   dense ``f @ W_dec`` and backward through every latent) and ``floor`` (the encoder product
   ``x @ W_enc`` alone, which no sparse method avoids). Each is timed with CUDA events, median of
   repeats after warm-up, the three in turn so they share the GPU's clocks; peak memory per method.
2. Harvest: tokens/s of ShardHarvester.activations (the trunk cut after the hooked layer, padded
   batches) against a plain forward of the whole causal LM on the same batches.
3. With ``--profile FILE``: where our step's time goes, bf16 and fp32, with and without AuxK's
   entries (torch.profiler: the kernels by GPU time, the host calls by CPU time; the wall time per
   step beside them). The first GPU run's profile is summarised in the README ("Running on GPUs").

Prints a table and writes JSON. Not part of the test suite; scripts/gpu-check.sh runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from crosscoder.dead import DeadLatentTracker  # noqa: E402
from crosscoder.losses import LossWeights, forward_and_loss  # noqa: E402
from crosscoder.model import CrossCoder, CrossCoderSpec  # noqa: E402


def timed(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1000)
    return statistics.median(times)


def _step(method: str, spec: CrossCoderSpec, x: torch.Tensor, tracker: DeadLatentTracker, weights: LossWeights,
          dtype: torch.dtype):
    """One method's step as a closure over its own model, optimizer and buffer."""
    model = CrossCoder(spec, dec_init_norm=0.5, sparse_kernels=method != "dense", device=x.device).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    buffer = torch.empty(x.shape[0], spec.latents, device=x.device, dtype=torch.float32)

    def step():
        if method == "floor":
            with torch.no_grad():
                if dtype == torch.float32:
                    torch.mm(x, model.W_enc, out=buffer)
                else:
                    torch.mm(x, model.W_enc, out_dtype=torch.float32, out=buffer)
            return
        opt.zero_grad(set_to_none=True)
        _, loss, _ = forward_and_loss(model, x, tracker.dead, weights)
        loss.backward()
        opt.step()

    return step


def training_step(d: int, latents: int, k: int, batch: int, dtype: torch.dtype, repeats: int) -> dict:
    device = torch.device("cuda")
    spec = CrossCoderSpec(["base", "chat"], [d, d], latents, k=k)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 2 * d, generator=gen, device="cpu").to(device, dtype)
    tracker = DeadLatentTracker((1, latents), 10**9, device)
    tracker.tokens_since_fired[0, ::8] = 10**9  # an eighth dead: AuxK has work
    weights = LossWeights(aux=1 / 32, aux_k=256)
    out = {}
    for method in ("ours", "dense", "floor"):
        torch.cuda.reset_peak_memory_stats()
        out[method] = {"seconds": timed(_step(method, spec, x, tracker, weights, dtype), repeats),
                       "peak_bytes": torch.cuda.max_memory_allocated()}
        torch.cuda.empty_cache()
    out["ours_over_floor"] = out["ours"]["seconds"] / out["floor"]["seconds"]
    out["dense_over_ours"] = out["dense"]["seconds"] / out["ours"]["seconds"]
    return out


def harvest(hidden: int, layers: int, hook: int, batch: int, seq: int, repeats: int) -> dict:
    from crosscoder.config import RunConfig, to_dict
    from crosscoder.harvest import ShardHarvester
    from crosscoder.language_models import ModelSpec, load_model
    from crosscoder.random_pair import make_pair

    with tempfile.TemporaryDirectory() as tmp:
        base, chat = make_pair(Path(tmp), hidden=hidden, layers=layers)
        cfg = RunConfig()
        cfg.harvest.models = [{"name": "base", "path": base, "dtype": "bfloat16"}]
        cfg.harvest.hooks, cfg.harvest.output, cfg.harvest.gpus_per_actor = [f"model.layers.{hook}"], tmp, 1
        harvester = ShardHarvester(to_dict(cfg))
        plain = load_model(ModelSpec("plain", base, dtype="bfloat16", device="cuda"))
        gen = torch.Generator(device="cpu").manual_seed(0)
        tokens = torch.randint(7, 80, (batch, seq), generator=gen, device="cpu")
        rows = tokens.tolist()
        ours = timed(lambda: harvester.activations(rows), repeats)
        ids = tokens.to("cuda")
        with torch.no_grad():
            full = timed(lambda: plain(input_ids=ids, use_cache=False), repeats)
    return {"ours_tokens_per_s": batch * seq / ours, "plain_forward_tokens_per_s": batch * seq / full,
            "speedup": full / ours, "hook": hook, "layers": layers}


def profile_step(d: int, latents: int, k: int, batch: int, path: str) -> None:
    """Write torch.profiler tables of our step (see the module docstring) to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    spec = CrossCoderSpec(["base", "chat"], [d, d], latents, k=k)
    lines = []
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(batch, 2 * d, generator=torch.Generator().manual_seed(0)).to("cuda", dtype)
        tracker = DeadLatentTracker((1, latents), 10**9, "cuda")
        tracker.tokens_since_fired[0, ::8] = 10**9
        for aux in (1 / 32, 0.0):
            step = _step("ours", spec, x, tracker, LossWeights(aux=aux, aux_k=256), dtype)
            wall = timed(step, repeats=10)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            table = prof.key_averages()
            lines += [f"##### {dtype}, AuxK {'on' if aux else 'off'}: {wall * 1e3:.1f} ms per step; 3 steps profiled",
                      table.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60),
                      table.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60)]
            print(lines[-3], flush=True)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "gpu.json"))
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile", metavar="FILE", help="also write a profile of our step to FILE")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    if args.profile:
        profile_step(args.d, args.latents, args.k, args.batch, args.profile)
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        results[name] = training_step(args.d, args.latents, args.k, args.batch, dtype, args.repeats)
    results["harvest"] = harvest(hidden=1024, layers=16, hook=7, batch=16, seq=512, repeats=args.repeats)
    print(f"GPU: {results['gpu']}, d = {args.d} × 2, L = {args.latents:,}, k = {args.k}, B = {args.batch}")
    print("| dtype | ours (s) | dense (s) | floor (s) | ours / floor | dense / ours | peak GiB ours / dense |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name in ("fp32", "bf16"):
        r = results[name]
        print(f"| {name} | {r['ours']['seconds']:.4f} | {r['dense']['seconds']:.4f} | {r['floor']['seconds']:.4f} | "
              f"{r['ours_over_floor']:.2f}× | {r['dense_over_ours']:.2f}× | "
              f"{r['ours']['peak_bytes'] / 2**30:.2f} / {r['dense']['peak_bytes'] / 2**30:.2f} |")
    h = results["harvest"]
    print(f"harvest (layer {h['hook']} of {h['layers']}, bf16): {h['ours_tokens_per_s']:,.0f} tokens/s vs a plain "
          f"forward {h['plain_forward_tokens_per_s']:,.0f} ({h['speedup']:.2f}×)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
