"""Benchmark of the harvest pipeline, side by side in one run on this machine.

    .venv/bin/python tests/bench/bench_harvest.py [--out bench-results/harvest.json]

Two Llama-style models (a base and its perturbed chat copy, built from config: hidden 256,
8 layers) read the same planned token chunks, hooked at the middle layer (``model.layers.3``).
Measured on the same tokens, in this order, with the same torch thread count:

1. ``full forward``: a plain ``model(input_ids)`` of both models (every layer, the LM head);
2. ``early stop``: the activation reader alone, which stops after the hooked layer;
3. ``shard pipeline``: ``ShardHarvester.write`` for every shard (forward with early stop, dtype
   conversion, webdataset tar, sha256, atomic commit to local disk), in process;
4. ``ray harvest``: the whole ``harvest()`` with one Ray actor, including the actor's start and
   model loading and the driver's manifest updates.

Goals: (3) costs ≤ 10% over (2); (2) is cheaper than (1). Prints a table, writes JSON; not part of
the test suite (no timed assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from crosscoder import random_pair  # noqa: E402
from crosscoder.config import RunConfig, to_dict  # noqa: E402
from crosscoder.documents import plan_chunks, read_documents  # noqa: E402
from crosscoder.harvest import ShardHarvester, harvest  # noqa: E402
from crosscoder.language_models import ActivationReader, ModelSpec, load_model, load_tokenizer  # noqa: E402


def best_of(repeats: int, fn) -> float:
    """Smallest wall time of ``repeats`` calls: the least disturbed measurement."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "harvest.json"))
    parser.add_argument("--tokens", type=int, default=32_768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hook = f"model.layers.{args.layers // 2 - 1}"

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, chat = random_pair.make_pair(work / "models", hidden=args.hidden, layers=args.layers)
        docs = random_pair.write_documents(work / "docs.jsonl", n_docs=4000, chat_fraction=0.5)
        cfg = RunConfig(name="bench-harvest")
        hc = cfg.harvest
        hc.models = [{"name": "base", "path": base}, {"name": "chat", "path": chat}]
        hc.hooks, hc.data, hc.tokens, hc.seq_len = [hook], docs, args.tokens, 128
        hc.samples_per_shard, hc.batch_size, hc.actors, hc.cpus_per_actor = 32, 8, 1, 2
        hc.dtype = "float16"

        tok = load_tokenizer(chat)
        chunks = plan_chunks(read_documents(docs), tok, tok, hc.seq_len, hc.tokens)
        tokens = sum(len(c.tokens) for c in chunks)
        plan = [chunks[i : i + hc.samples_per_shard] for i in range(0, len(chunks), hc.samples_per_shard)]
        models = [load_model(ModelSpec("base", base)), load_model(ModelSpec("chat", chat))]
        readers = [ActivationReader(m, [hook]) for m in models]
        batches = []
        for shard in plan:  # the same batches the harvester forms: equal-length runs of ≤ batch_size chunks
            i = 0
            while i < len(shard):
                j = i
                while j < len(shard) and j - i < hc.batch_size and len(shard[j].tokens) == len(shard[i].tokens):
                    j += 1
                batches.append(torch.tensor([[tok.bos_token_id] + c.tokens for c in shard[i:j]]))
                i = j

        @torch.no_grad()
        def full_forward():
            for ids in batches:
                for m in models:
                    m(input_ids=ids, use_cache=False)

        def early_stop():
            for ids in batches:
                for r in readers:
                    r.read(ids)

        harvester = ShardHarvester(to_dict(_with_output(cfg, str(work / "inproc"))))

        def pipeline():
            for n, shard in enumerate(plan):
                harvester.write(n, shard)

        print(f"{tokens:,} tokens in {len(plan)} shards, 2 models of hidden {args.hidden}, {args.layers} layers, "
              f"hook {hook}, {torch.get_num_threads()} torch threads", flush=True)
        full_forward()  # warm-up
        t_full = best_of(args.repeats, full_forward)
        print(f"  full forward:   {tokens / t_full:,.0f} tokens/s", flush=True)
        t_early = best_of(args.repeats, early_stop)
        print(f"  early stop:     {tokens / t_early:,.0f} tokens/s", flush=True)
        t_pipe = best_of(args.repeats, pipeline)
        print(f"  shard pipeline: {tokens / t_pipe:,.0f} tokens/s", flush=True)

        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        start = time.perf_counter()
        manifest = harvest(_with_output(cfg, str(work / "ray")), progress=False)
        t_ray = time.perf_counter() - start
        ray.shutdown()
        assert manifest.tokens == tokens, (manifest.tokens, tokens)
        print(f"  ray harvest:    {tokens / t_ray:,.0f} tokens/s (incl. actor start and model loading)", flush=True)

    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads()},
        "setup": {"tokens": tokens, "shards": len(plan), "hidden": args.hidden, "layers": args.layers, "hook": hook},
        "tokens_per_s": {"full_forward": tokens / t_full, "early_stop": tokens / t_early,
                         "shard_pipeline": tokens / t_pipe, "ray_harvest": tokens / t_ray},
        "pipeline_overhead": t_pipe / t_early - 1,
        "early_stop_cost_vs_full": t_early / t_full,
    }
    print()
    print("| measure | tokens/s | vs early-stop forward |")
    print("|---|---|---|")
    for name, t in (("full forward (both models, all layers)", t_full), ("early-stop forward (to the hook)", t_early),
                    ("shard pipeline (forward + tar + sha256 + commit)", t_pipe),
                    ("whole Ray harvest, 1 actor (incl. start-up)", t_ray)):
        print(f"| {name} | {tokens / t:,.0f} | {t / t_early:.2f}× time |")
    print(f"\npipeline overhead over the forward it needs: {results['pipeline_overhead']:+.1%} (goal ≤ +10%)")
    print(f"early stop at the middle layer costs {results['early_stop_cost_vs_full']:.2f}× a full forward")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


def _with_output(cfg: RunConfig, output: str) -> RunConfig:
    from crosscoder.config import from_dict

    copy = from_dict(RunConfig, to_dict(cfg))
    copy.harvest.output = output
    return copy


if __name__ == "__main__":
    main()
