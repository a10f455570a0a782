"""Benchmark of one training step: sparse kernels vs the dense implementation vs the encoder floor.

    .venv/bin/python tests/bench/bench_kernels.py [--out bench-results/kernels.json] [--quick]

For d ∈ {256, 512} per source, S = 2 sources, L ∈ {16k, 64k}, k = 64, batch 2048, fp32 and bf16,
on the same batch, each measured in a fresh subprocess (so peak memory is the step's own):

- ``ours``: forward + loss (MSE and AuxK) + backward of the acausal BatchTopK crosscoder through the
  sparse kernels (crosscoder/kernels.py): dense encoder product without autograd, global
  selection, gradients only into the selected latents, sparse decoder;
- ``dense``: the same model with ``sparse_kernels = False``, i.e. the way the reference BatchTopK
  crosscoder computes it: dense ``f @ W_dec`` and a dense backward through every latent;
- ``floor``: the dense encoder forward ``x @ W_enc`` alone, the one product over all ``L`` latents
  no sparse method avoids;
- ``selection``: the BatchTopK selection alone (k·B-th largest score of the batch), hinted by the
  previous batch's threshold as in training, to show it does not dominate.

The median of ``--repeats`` timed steps after one warm-up is reported, with the peak RSS growth
of the step, and the largest relative difference of loss and gradients between ours and dense.
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

CHILD = r"""
import json, resource, statistics, sys, time, torch
sys.path.insert(0, {root!r})
from crosscoder.model import CrossCoder, CrossCoderSpec
from crosscoder.losses import LossWeights, total_loss
from crosscoder.sparsity import LOCAL, batchtopk_mask, scores
d, L, k, B, dtype, method, repeats = {d}, {L}, {k}, {B}, getattr(torch, {dtype!r}), {method!r}, {repeats}
torch.manual_seed(0)
spec = CrossCoderSpec(["base", "chat"], [d, d], L, activation="batchtopk", k=k)
model = CrossCoder(spec, dec_init_norm=0.5).to(dtype)
model.sparse_kernels = method != "dense"
x = torch.randn(B, 2 * d).to(dtype)
dead = torch.zeros(1, L, dtype=torch.bool); dead[0, ::8] = True
weights = LossWeights(aux=1 / 32, aux_k=256)
hint = None

def step():
    if method == "floor":
        with torch.no_grad():
            return x @ model.W_enc
    if method == "selection":
        # as in training: the search is hinted by 0.7× the previous batch's threshold (here the
        # same batch's, from the warm-up call), which the result does not depend on
        global hint
        with torch.no_grad():
            pre = model.pre_activations(x)
            t0 = time.perf_counter()
            _, kth = batchtopk_mask(scores(pre, model.selection_weights()), k, LOCAL, hint)
            hint = [0.7 * float(v) for v in kth]
            return time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss, terms = total_loss(model, x, out, dead, weights)
    loss.backward()
    return loss

step()
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    r = step()
    times.append(r if method == "selection" else time.perf_counter() - t0)
result = dict(seconds=statistics.median(times), peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
if method in ("ours", "dense"):
    torch.save(dict(loss=r.detach().float(), grads={{n: p.grad.float() for n, p in model.named_parameters()}}),
               {grads!r})
print("RESULT", json.dumps(result))
"""


def measure(d: int, L: int, k: int, B: int, dtype: str, method: str, repeats: int, grads: str) -> dict:
    code = CHILD.format(root=str(ROOT), d=d, L=L, k=k, B=B, dtype=dtype, method=method, repeats=repeats, grads=grads)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "kernels.json"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="only d=256, L=64k, fp32")
    args = parser.parse_args()
    k, B = 64, 2048
    grid = [(d, L, dt) for dt in ("float32", "bfloat16") for d in (256, 512) for L in (16384, 65536)]
    if args.quick:
        grid = [(256, 65536, "float32")]
    rows = []
    tmp = ROOT / "bench-results"
    tmp.mkdir(exist_ok=True)
    print("| d | L | dtype | ours s/step | dense s/step | floor s/step | selection s | ours vs dense | ours vs floor "
          "| peak MiB ours / dense | max rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d, L, dt in grid:
        row = {"d": d, "L": L, "dtype": dt, "k": k, "batch": B}
        files = {m: str(tmp / f".grads-{m}.pt") for m in ("ours", "dense")}
        for method in ("ours", "dense", "floor", "selection"):
            row[method] = measure(d, L, k, B, dt, method, args.repeats, files.get(method, ""))
        ok = all("error" not in row[m] for m in ("ours", "dense", "floor", "selection"))
        if ok:
            row["speedup_vs_dense"] = row["dense"]["seconds"] / row["ours"]["seconds"]
            row["ratio_to_floor"] = row["ours"]["seconds"] / row["floor"]["seconds"]
            row["max_rel_diff"] = max_rel_diff(files["ours"], files["dense"])
            print(f"| {d} | {L:,} | {dt} | {row['ours']['seconds']:.3f} | {row['dense']['seconds']:.3f} | "
                  f"{row['floor']['seconds']:.3f} | {row['selection']['seconds']:.3f} | "
                  f"{row['speedup_vs_dense']:.2f}× faster | {row['ratio_to_floor']:.2f}× | "
                  f"{row['ours']['peak_rss'] / 2**20:,.0f} / {row['dense']['peak_rss'] / 2**20:,.0f} | "
                  f"{row['max_rel_diff']:.1e} |", flush=True)
        else:
            print(f"| {d} | {L:,} | {dt} | " + " | ".join(str(row[m].get("error", "")) for m in ("ours", "dense")), flush=True)
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
