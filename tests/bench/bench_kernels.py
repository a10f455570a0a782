"""Benchmark of one training step: ours vs the dense implementation, the references and the floor.

    .venv/bin/python tests/bench/bench_kernels.py [--out bench-results/kernels.json] [--quick]
        [--dtypes float32,bfloat16] [--references] [--methods ours,floor,...]

For d ∈ {256, 512} per source, S = 2 sources, L ∈ {16k, 64k}, k = 64, batch 2048, on the same
batch (one seeded generator), each method measured in a fresh subprocess (so peak memory is the
step's own). A step is forward + loss + backward, no optimizer:

- ``ours``: the acausal BatchTopK crosscoder through the sparse kernels (kernels.py) and the
  compiled CPU kernels (native.py): dense encoder product without autograd, one-pass hinted
  selection, gradients only into the selected latents, sparse decoder; MSE + AuxK (1/8 dead);
- ``ours_pytorch``: the same without the compiled kernels (``CROSSCODER_NATIVE=0``): the pure
  PyTorch sparse path, which is also what runs on GPU;
- ``ours_topk``: ``ours`` with per-token TopK instead of BatchTopK (what sparsify does);
- ``dense``: the same model built with ``sparse_kernels=False``, i.e. the way the reference BatchTopK
  crosscoder computes it: dense ``f @ W_dec`` and a dense backward through every latent;
- ``floor``: the dense encoder forward ``x @ W_enc`` alone, the one product over all ``L`` latents
  no sparse method avoids, written into a buffer kept across steps (as ours does);
  in bf16 on a CPU without bf16 GEMM units, computed in fp32 from the bf16 values as ours and dense
  compute theirs (crosscoder/precision.py: torch's bf16 fallback GEMM is 15–170× slower here);
- ``selection``: our BatchTopK selection alone (threshold and kept entries), hinted by the previous
  batch's threshold as in training, to show it does not dominate;
- with ``--references`` (needs ``bash scripts/install-bench.sh``): EleutherAI's sparsify
  (``SparseCoder``, TopK, on the concatenated sources, its AuxK on with 1/8 dead) and OpenMOSS's
  llamascopium (``Crosscoder``, BatchTopK), run by ``.venv-bench``'s interpreter on the same
  batch. llamascopium 2.0.0b34's AuxK fails on a Crosscoder (a shape error in
  ``dead_feature_acts @ W_D``), so it runs without AuxK; ours keeps it, i.e. does more work.

The median of ``--repeats`` timed steps after ``--warmup`` untimed ones (3: a fresh process's
first steps are up to 30% slower while its large allocations settle) is reported, with the peak RSS of the
process, and the largest relative difference of loss and gradients between ours and dense. The
``ours`` process then also takes ``--repeats`` (step, floor product) pairs in turn: the ratio of
their medians is the floor ratio with both under the same machine load (the separate-process
ratio moves with whatever else the shared machine does between processes).
Not part of the test suite (no timed assertions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
REFERENCES = ("sparsify", "llamascopium")

SETUP_OURS = r"""
import sys
sys.path.insert(0, {root!r})
from crosscoder import precision
from crosscoder.model import CrossCoder, CrossCoderSpec
from crosscoder.losses import LossWeights, forward_and_loss
spec = CrossCoderSpec(["base", "chat"], [d, d], L, activation="topk" if method == "ours_topk" else "batchtopk", k=k)
model = CrossCoder(spec, dec_init_norm=0.5, sparse_kernels=method != "dense").to(dtype)
dead = torch.zeros(1, L, dtype=torch.bool); dead[0, ::8] = True
weights = LossWeights(aux=1 / 32, aux_k=256)
# the floor writes into one buffer, as our step's encoder product does: no page faults of a fresh
# [B, L] output in either, i.e. the strictest floor; bf16 on a CPU without bf16 GEMM computes it
# the fastest way this machine has, in fp32 (crosscoder/precision.py)
floor_out = torch.empty(B, L, dtype=precision.product_dtype(model.W_enc))
floor_bias = torch.zeros(L, dtype=dtype)  # made once, outside the timed product

def floor():
    with torch.no_grad():
        if precision.upcasts(model.W_enc):
            return precision.addmm_into(floor_bias, x, model.W_enc, floor_out)
        return torch.mm(x, model.W_enc, out=floor_out)

def step():
    if method == "floor":
        return floor()
    if method == "selection":
        # as in training: the selection of the active entries, hinted by HINT_MARGIN × the previous
        # batch's threshold (here the same batch's, from a warm-up call), which the result does not
        # depend on
        with torch.no_grad():
            pre = model.sparse.training_pre_activations(model, x)  # the step's own buffer (fp32 where bf16 upcasts)
            w = model.selection_weights()
            t0 = time.perf_counter()
            model.sparse.select_entries(model, pre, w)
            return time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    _, loss, _ = forward_and_loss(model, x, dead, weights)  # as the trainer
    loss.backward()
    return loss
"""

SETUP_REFERENCE = r"""
if method == "sparsify":
    from sparsify import SparseCoder, SparseCoderConfig
    model = SparseCoder(2 * d, SparseCoderConfig(num_latents=L, k=k), dtype=dtype)
    dead = torch.zeros(L, dtype=torch.bool); dead[::8] = True

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        return loss
else:
    from llamascopium.models.crosscoder import Crosscoder, CrosscoderConfig
    cfg = CrosscoderConfig(d_model=d, expansion_factor=L / d, hook_points=["base", "chat"], act_fn="batchtopk",
                           top_k=k, dtype=dtype, device="cpu")
    model = Crosscoder(cfg)
    model.init_parameters(encoder_uniform_bound=d ** -0.5, decoder_uniform_bound=d ** -0.5)
    batch = dict(base=x[:, :d], chat=x[:, d:], tokens=torch.zeros(B, dtype=torch.long))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model.compute_loss(batch)["loss"]
        loss.backward()
        return loss
"""

CHILD = r"""
import json, resource, statistics, time, torch
d, L, k, B, dtype, method, repeats, warmup, grads = ({d}, {L}, {k}, {B}, getattr(torch, {dtype!r}), {method!r}, {repeats},
                                                   {warmup}, {grads!r})
torch.manual_seed(0)
x = torch.randn(B, 2 * d, generator=torch.Generator().manual_seed(1)).to(dtype)  # the batch every method sees
{setup}
for _ in range(warmup):
    step()
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    r = step()
    times.append(r if method == "selection" else time.perf_counter() - t0)
result = dict(seconds=statistics.median(times), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
if method == "ours":  # after the peak was read: the floor's output would add to it
    # the floor ratio from steps and floor products taken in turn in this process, so that both
    # see the same machine state (on a shared machine the two separate processes may not)
    pairs = []
    for _ in range(repeats):
        t0 = time.perf_counter(); step(); t1 = time.perf_counter()
        floor()
        pairs.append((t1 - t0, time.perf_counter() - t1))
    result["interleaved"] = dict(step=statistics.median(p[0] for p in pairs),
                                 floor=statistics.median(p[1] for p in pairs))
if grads:
    torch.save(dict(loss=r.detach().float(), grads={{n: p.grad.float() for n, p in model.named_parameters()}}), grads)
print("RESULT", json.dumps(result))
"""


def measure(d: int, L: int, k: int, B: int, dtype: str, method: str, repeats: int, warmup: int, grads: str = "") -> dict:
    reference = method in REFERENCES
    setup = SETUP_REFERENCE if reference else SETUP_OURS.format(root=str(ROOT))
    code = CHILD.format(d=d, L=L, k=k, B=B, dtype=dtype, method=method, repeats=repeats, warmup=warmup,
                       grads=grads, setup=setup)
    # every method with huge-page tensors, as `crosscoder` runs training (cli.py); 0 turns it off
    env = dict(os.environ, CROSSCODER_NATIVE="0" if method == "ours_pytorch" else "1")
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    python = str(BENCH_PYTHON) if reference else sys.executable
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    if proc.returncode or not line:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(line[0][len("RESULT ") :])


def max_rel_diff(a_file: str, b_file: str) -> float:
    import torch

    a, b = torch.load(a_file), torch.load(b_file)
    diffs = [float((a["loss"] - b["loss"]).abs() / b["loss"].abs())]
    for name, g in b["grads"].items():
        diffs.append(float((a["grads"][name] - g).norm() / g.norm().clamp_min(1e-12)))
    return max(diffs)


def seconds(row: dict, method: str) -> str:
    entry = row.get(method)
    if entry is None:
        return "—"
    return f"{entry['seconds']:.3f}" if "seconds" in entry else "error"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "kernels.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (a process's first steps also pay for its memory settling in)")
    parser.add_argument("--quick", action="store_true", help="only d=256, L=64k")
    parser.add_argument("--dtypes", default="float32", help="comma-separated: float32,bfloat16")
    parser.add_argument("--references", action="store_true", help="also sparsify and llamascopium (.venv-bench)")
    parser.add_argument("--methods", help="comma-separated subset of the methods to run (default: all)")
    args = parser.parse_args()
    if args.references and not BENCH_PYTHON.exists():
        sys.exit(f"--references needs {BENCH_PYTHON}: run bash scripts/install-bench.sh first")
    k, B = 64, 2048
    dtypes = args.dtypes.split(",")
    grid = [(d, L, dt) for dt in dtypes for d in (256, 512) for L in (16384, 65536)]
    if args.quick:
        grid = [(256, 65536, dt) for dt in dtypes]
    methods = ["ours", "ours_pytorch", "ours_topk", "dense", "floor", "selection"]
    methods += list(REFERENCES) if args.references else []
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    tmp = ROOT / "bench-results"
    tmp.mkdir(exist_ok=True)
    print("| d | L | dtype | ours (BatchTopK) | ours, PyTorch only | ours (TopK) | dense | floor | selection "
          "| sparsify (TopK) | llamascopium (BatchTopK) | ours vs dense | ours / floor | ours / floor, in turn "
          "| peak MiB ours / dense | max rel. diff |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---:|")
    rows = []
    for d, L, dt in grid:
        row = {"d": d, "L": L, "dtype": dt, "k": k, "batch": B}
        files = {m: str(tmp / f".grads-{m}.pt") for m in ("ours", "dense")}
        for method in methods:
            row[method] = measure(d, L, k, B, dt, method, args.repeats, args.warmup, files.get(method, ""))
        have = {m for m in methods if "error" not in row[m]}
        if {"ours", "dense"} <= have:
            row["speedup_vs_dense"] = row["dense"]["seconds"] / row["ours"]["seconds"]
            row["max_rel_diff"] = max_rel_diff(files["ours"], files["dense"])
        if {"ours", "floor"} <= have:
            row["ratio_to_floor"] = row["ours"]["seconds"] / row["floor"]["seconds"]
        if "ours" in have:
            row["ratio_to_floor_interleaved"] = row["ours"]["interleaved"]["step"] / row["ours"]["interleaved"]["floor"]
        cells = [seconds(row, m) for m in ("ours", "ours_pytorch", "ours_topk", "dense", "floor", "selection", *REFERENCES)]
        cells.append(f"{row['speedup_vs_dense']:.2f}× faster" if "speedup_vs_dense" in row else "—")
        cells.append(f"{row['ratio_to_floor']:.2f}×" if "ratio_to_floor" in row else "—")
        cells.append(f"{row['ratio_to_floor_interleaved']:.2f}×" if "ratio_to_floor_interleaved" in row else "—")
        cells.append(f"{row['ours']['peak_rss'] / 2**20:,.0f} / {row['dense']['peak_rss'] / 2**20:,.0f}"
                     if {"ours", "dense"} <= have else "—")
        cells.append(f"{row['max_rel_diff']:.1e}" if "max_rel_diff" in row else "—")
        print(f"| {d} | {L:,} | {dt} | " + " | ".join(cells) + " |", flush=True)
        for m in methods:
            if "error" in row[m]:
                print(f"  {m}: {row[m]['error']}", flush=True)
        rows.append(row)
        for f in files.values():
            Path(f).unlink(missing_ok=True)
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
