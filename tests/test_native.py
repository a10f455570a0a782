"""The compiled CPU kernels (crosscoder/csrc, native.py) against the PyTorch path they replace."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crosscoder import kernels, native
from crosscoder.collectives import LOCAL
from crosscoder.losses import LossWeights, auxk_selector, total_loss
from crosscoder.model import CrossCoder, CrossCoderSpec
from crosscoder.sparsity import (
    batchtopk_entries,
    batchtopk_mask,
    count_firing,
    scores,
    threshold_mask,
    topk_entries,
    topk_mask,
)

pytestmark = pytest.mark.precision  # vector-ISA builds and bf16 sums: rerun as a baseline CPU (.ci/run)


def test_kernels_are_built_on_this_machine():
    # CI installs g++; a missing compiler would silently fall back to the slow path
    assert native.module() is not None


KERNEL_OUTPUTS = """
import sys, torch
from crosscoder import native
gen = torch.Generator().manual_seed(0)
pre, w = torch.randn(64, 999, generator=gen), torch.rand(999, generator=gen)
token = torch.randint(0, 64, (3000,), generator=gen).sort().values
latent = torch.randint(0, 999, (3000,), generator=gen)
coef, W = torch.randn(3000, generator=gen), torch.randn(999, 77, generator=gen)
x, g = torch.randn(64, 77, generator=gen), torch.randn(64, 77, generator=gen)
torch.save({"name": native.module().__name__, "scores": native.scores_at_least(pre, w, 1.1),
            "topk": native.row_topk_scores(pre, w, 9).sort(1).values,
            "dot": native.decode_backward(g, token, latent, coef, W, True, gW := torch.empty_like(W)), "rows": gW,
            "sums": native.latent_sums(x, token, latent, coef, 999)}, sys.argv[1])
"""


def test_baseline_and_vector_builds_give_the_same_results(tmp_path, monkeypatch):
    # the module is built for the CPU's vector extensions when it has them (native._target); a
    # build for the x86-64 baseline (what another CPU gets) must select the same entries and sum
    # to the same values within rounding
    outputs = {}
    for isa in ("auto", "baseline"):
        env = {**os.environ, "CROSSCODER_NATIVE_ISA": isa}
        subprocess.run([sys.executable, "-c", KERNEL_OUTPUTS, str(tmp_path / isa)], env=env, check=True, timeout=600)
        outputs[isa] = torch.load(tmp_path / isa)
    auto, baseline = outputs["auto"], outputs["baseline"]
    monkeypatch.setenv("CROSSCODER_NATIVE_ISA", "auto")  # what "auto" picks here, even when this run forces baseline
    # each build is named by its target and a hash of its source and flags (builds.py)
    assert baseline["name"].startswith("crosscoder_sparse_cpu_") and "avx2" not in baseline["name"]
    assert auto["name"].startswith(native._target()[0] + "_")
    assert all(torch.equal(a, b) for a, b in zip(auto["scores"], baseline["scores"]))
    assert len(auto["scores"][0]) > 1000 and torch.equal(auto["topk"], baseline["topk"])
    for key in ("dot", "rows", "sums"):
        torch.testing.assert_close(auto[key], baseline[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_at_least_equals_the_pytorch_ops_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(37, 203, generator=gen).to(dtype)  # widths that are not multiples of the block
    pre[3, 5] = float("nan")
    w = torch.rand(203, generator=gen).to(dtype)
    flat, score = native.scores_at_least(pre, w, 0.8)
    s = scores(pre.clone(), w).reshape(-1)
    ref = (s >= 0.8).nonzero().squeeze(1)
    assert len(ref) > 100
    assert torch.equal(flat, ref) and torch.equal(score, s[ref])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_backward_and_latent_sums_equal_their_pytorch_versions(dtype):
    gen = torch.Generator().manual_seed(1)
    B, D, L, N = 19, 37, 70, 300  # L % 16 != 0, D % 16 != 0 and latents without entries
    a, b = torch.randn(B, D, generator=gen).to(dtype), torch.randn(L, D, generator=gen).to(dtype)
    token = torch.randint(0, B, (N,), generator=gen).sort().values
    latent = torch.randint(0, L - 5, (N,), generator=gen)
    coef = torch.randn(N, generator=gen).to(dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    ref_dot = (a[token].float() * b[latent].float()).sum(1)
    ref_rows = torch.zeros(L, D).index_add_(0, latent, coef.float()[:, None] * a[token].float())
    # the decoder's backward (a = the gradient of the decoded rows, b = W_dec): every row of the
    # given gradient buffer is written, the rows of latents without entries with zeros
    grad_W = torch.full((L, D), float("nan"), dtype=dtype)
    grad_value = native.decode_backward(a, token, latent, coef, b, True, grad_W)
    assert torch.allclose(grad_value.float(), ref_dot, **tol)
    assert torch.allclose(grad_W.float(), ref_rows, **tol)
    assert torch.equal(grad_W[L - 5 :], torch.zeros(5, D, dtype=dtype))
    assert native.decode_backward(a, token, latent, coef, b, False, None).numel() == 0  # nothing asked
    only_values = native.decode_backward(a, token, latent, coef, b, True, None)
    assert torch.equal(only_values, grad_value)
    with pytest.raises(RuntimeError, match="grad_W must be"):
        native.decode_backward(a, token, latent, coef, b, True, torch.empty(L, D + 1, dtype=dtype))
    # the encoder's gradient, in W_enc's [D, L] layout, into a fresh tensor or a given one
    cols = native.latent_sums(a, token, latent, coef, L)
    assert cols.shape == (D, L) and cols.is_contiguous()
    assert torch.allclose(cols.float(), ref_rows.t(), **tol)
    assert torch.equal(cols[:, L - 5 :], torch.zeros(D, 5, dtype=dtype))
    given = torch.full((D, L), float("nan"), dtype=dtype)
    assert native.latent_sums(a, token, latent, coef, L, given) is not None and torch.equal(given, cols)
    with pytest.raises(RuntimeError, match="out must be"):
        native.latent_sums(a, token, latent, coef, L, torch.empty(L, D, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_forward_equals_embedding_bag(dtype):
    gen = torch.Generator().manual_seed(4)
    L, D, R, N = 90, 37, 600, 5000  # rows without entries at the start, in the middle and at the end
    W = torch.randn(L, D, generator=gen).to(dtype)
    row = torch.randint(3, R - 7, (N,), generator=gen).sort().values
    row[(row >= 200) & (row < 260)] = 199
    row = row.sort().values
    latent = torch.randint(0, L, (N,), generator=gen)
    value = torch.rand(N, generator=gen).to(dtype)
    ref = kernels.bag_sum(latent, W, row, R, value)
    out = native.decode_forward(row, latent, value, W, R)
    assert out.shape == (R, D) and torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    empty = torch.cat([torch.arange(3), torch.arange(200, 260), torch.arange(R - 7, R)])  # rows without entries
    assert not torch.isin(empty, row).any() and torch.equal(out[empty], torch.zeros(len(empty), D, dtype=dtype))
    assert torch.equal(native.decode_forward(row[:0], latent[:0], value[:0], W, R), torch.zeros(R, D, dtype=dtype))
    with pytest.raises(RuntimeError, match="rows must be ascending"):
        native.decode_forward(row.flip(0), latent, value, W, R)
    with pytest.raises(RuntimeError, match="latent index out of range"):
        native.decode_forward(row, latent + L, value, W, R)


def test_batchtopk_entries_is_exact_or_declines():
    gen = torch.Generator().manual_seed(2)
    pre, w = torch.randn(64, 500, generator=gen), torch.rand(500, generator=gen) + 0.5
    mask, kth = batchtopk_mask(scores(pre.clone()[:, None], w[None]), 8, LOCAL)
    flat, kth_fast = batchtopk_entries(pre, w, 8, LOCAL, hint=0.5 * float(kth))
    assert torch.equal(flat, mask[:, 0].reshape(-1).nonzero().squeeze(1)) and torch.equal(kth_fast, kth[0])
    # no hint, or one above the k·B-th score (the threshold fell by more than the margin): the
    # smallest of the rows' 8th largest scores serves as one, exactly
    for hint in (None, 1.01 * float(kth), 100.0):
        flat_other, kth_other = batchtopk_entries(pre, w, 8, LOCAL, hint=hint)
        assert torch.equal(flat_other, flat) and torch.equal(kth_other, kth[0]), hint

    class TwoDataRanks(type(LOCAL)):  # a global batch twice this rank's
        def batch_tokens(self, local_tokens: int) -> int:
            return 2 * local_tokens

    # every row holds the same scores: the rows' hint admits exactly k·B local entries, fewer than
    # the k·B_global needed, so the caller must run the full search
    same = torch.stack([pre[0][torch.randperm(500, generator=gen)] for _ in range(64)])
    w_one = torch.ones(500)
    assert batchtopk_entries(same, w_one, 8, TwoDataRanks(), hint=None) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_topk_then_per_row_thresholds_equal_topk_mask(dtype):
    gen = torch.Generator().manual_seed(3)
    pre, w = torch.randn(29, 301, generator=gen).to(dtype), (torch.rand(301, generator=gen) + 0.5).to(dtype)
    pre[4] = -1.0  # a row with fewer than k positive scores keeps only the positive ones
    pre[4, :5] = 1.0 + torch.arange(5).to(dtype)
    local = native.row_topk_scores(pre, w, 7)
    ref = torch.topk(scores(pre.clone(), w), 7, dim=1).values
    assert torch.equal(local.sort(1, descending=True).values, ref)
    flat, score = native.scores_at_least(pre, w, local.min(1).values)
    mask = topk_mask(scores(pre.clone()[:, None], w[None]), 7, LOCAL)[:, 0]
    assert torch.equal(flat, mask.reshape(-1).nonzero().squeeze(1))
    assert int(mask[4].sum()) == 5
    # both in one read: the same top k, entries and scores (ties at the k-th included: bf16 has many)
    top, flat_once, score_once = native.row_topk_entries(pre, w, 7)
    assert torch.equal(top.sort(1).values, local.sort(1).values)
    assert torch.equal(flat_once, flat) and torch.equal(score_once, score)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_entries_over_two_latent_shards_equal_the_mask_of_the_whole_row(dtype):
    """Each shard's entries reach its own k-th largest; the k-th over both shards is higher, and
    the entries kept on each shard are the whole row's TopK entries in that shard's columns."""
    gen = torch.Generator().manual_seed(5)
    pre, w = torch.randn(31, 400, generator=gen).to(dtype), (torch.rand(400, generator=gen) + 0.5).to(dtype)
    whole = topk_mask(scores(pre.clone()[:, None], w[None]), 9, LOCAL)[:, 0]
    halves = [slice(0, 170), slice(170, 400)]
    local = [native.row_topk_entries(pre[:, h], w[h], 9)[0] for h in halves]

    class TwoLatentShards(type(LOCAL)):
        def kth_largest_rows(self, values, k):  # as DistributedCollectives: over both shards' candidates
            return super().kth_largest_rows(torch.cat(local, dim=1), k)

    for h in halves:
        flat = topk_entries(pre[:, h].contiguous(), w[h], 9, TwoLatentShards())
        width = h.stop - h.start
        assert torch.equal(flat, whole[:, h].reshape(-1).nonzero().squeeze(1)), width
        assert len(flat) < len(native.row_topk_entries(pre[:, h], w[h], 9)[1])  # the other shard's k-th was higher


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_inference_l0_count_equals_the_masks_count(dtype, monkeypatch):
    """count_firing (the logged inference L0) through the kernel: the entries above max(θ, 0),
    NaN never firing, as threshold_mask's count; the kernel is the one that ran."""
    gen = torch.Generator().manual_seed(11)
    pre, threshold = torch.randn(37, 2, 501, generator=gen).to(dtype), (0.5 * torch.randn(2, 501, generator=gen)).to(dtype)
    threshold[0, :4], pre[1, 0, 7], threshold[1, 3] = float("nan"), float("nan"), -0.0
    calls = []
    monkeypatch.setattr(native, "count_above", lambda *a, _f=native.count_above: calls.append(1) or _f(*a))
    fired = count_firing(pre, threshold)
    assert calls and fired.dtype == torch.long
    assert int(fired) == int(torch.count_nonzero(threshold_mask(pre, threshold))) > 0


@pytest.mark.parametrize("activation", ["batchtopk", "topk"])
def test_training_steps_through_the_compiled_kernels_equal_the_pytorch_path(monkeypatch, activation):
    """Same entries, threshold and values bit for bit; loss and every gradient within rounding."""
    spec = CrossCoderSpec(["base", "chat"], [24, 40], 256, activation=activation, k=6)
    xs = [torch.randn(48, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    dead = torch.zeros(1, 256, dtype=torch.bool)
    dead[0, ::3] = True
    calls = {"select": 0, "decode": 0, "decode_backward": 0, "sums": 0}
    # the selections: BatchTopK's entries above the hint, each token's top k (TopK, and AuxK's search
    # over the dead latents)
    for name, key in (("scores_at_least", "select"), ("row_topk_entries", "select"), ("decode_forward", "decode"),
                      ("decode_backward", "decode_backward"), ("latent_sums", "sums")):
        def counted(*args, _f=getattr(native, name), _k=key, **kwargs):
            calls[_k] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(native, name, counted)

    def run(compiled: bool):
        if not compiled:
            monkeypatch.setattr(native, "usable", lambda *t: False)
        model = CrossCoder(spec, seed=3, dec_init_norm=0.5)
        steps = []
        for x in xs:
            model.zero_grad(set_to_none=True)
            out = model(x, auxk_selector(model, dead, 16))  # AuxK decoded with the main code, as in training
            loss, _ = total_loss(model, x, out, dead, LossWeights(aux=1 / 32, aux_k=16))
            loss.backward()
            steps.append((out.code.token, out.code.latent, out.code.value.detach(), out.batch_threshold, loss.detach(),
                          {n: p.grad.clone() for n, p in model.named_parameters()}))
        return steps

    compiled = run(True)
    # every step, the first one too (BatchTopK then takes its hint from the rows' top k), and once
    # more per step for AuxK's per-token search over the dead latents (one read: row top k and entries)
    n_select = 6
    assert calls["select"] == n_select and calls["decode"] == calls["decode_backward"] == calls["sums"] == 3
    reference = run(False)
    assert calls["select"] == n_select  # the reference did not use the kernels
    for (t1, l1, v1, k1, loss1, g1), (t2, l2, v2, k2, loss2, g2) in zip(compiled, reference):
        assert torch.equal(t1, t2) and torch.equal(l1, l2) and torch.equal(v1, v2)
        assert (k1 is None and k2 is None) or torch.equal(k1, k2)
        assert torch.allclose(loss1, loss2, rtol=1e-6)
        for name in g2:
            assert torch.allclose(g1[name], g2[name], rtol=1e-5, atol=1e-7), name


def test_gradient_memory_is_reused_only_when_nobody_holds_the_last_gradient():
    spec = CrossCoderSpec(["base", "chat"], [24, 40], 256, activation="batchtopk", k=6)
    model = CrossCoder(spec, seed=3, dec_init_norm=0.5)
    fresh = CrossCoder(spec, seed=3, dec_init_norm=0.5, gradient_memory=False)  # new gradient tensors every step
    dead = torch.zeros(1, 256, dtype=torch.bool)
    dead[0, ::3] = True
    weights = LossWeights(aux=1 / 32, aux_k=16)
    xs = [torch.randn(48, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def backward(m, x):
        out = m(x, auxk_selector(m, dead, 16))
        total_loss(m, x, out, dead, weights)[0].backward()

    def grads(m):
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    backward(model, xs[0])
    first = {n: model.get_parameter(n).grad.data_ptr() for n in ("W_enc", "W_dec")}
    model.zero_grad(set_to_none=True)
    backward(model, xs[1])  # the memory was free again: the same memory, no new allocation
    assert {n: model.get_parameter(n).grad.data_ptr() for n in first} == first
    backward(fresh, xs[1])
    expected = grads(fresh)
    assert all(torch.allclose(model.get_parameter(n).grad, expected[n], rtol=1e-6, atol=1e-8) for n in expected)
    # a gradient someone keeps is not overwritten by the next step
    kept = {n: model.get_parameter(n).grad for n in first}
    model.zero_grad(set_to_none=True)
    backward(model, xs[2])
    assert all(kept[n].data_ptr() != model.get_parameter(n).grad.data_ptr() for n in first)
    assert all(torch.equal(kept[n], expected[n]) for n in first)
    # accumulating into .grad (no zeroing) adds, not overwrites: the memory in use is not handed out
    backward(model, xs[0])
    fresh.zero_grad(set_to_none=True)
    backward(fresh, xs[2])
    backward(fresh, xs[0])
    accumulated = grads(fresh)
    for name, grad in grads(model).items():
        assert torch.allclose(grad, accumulated[name], rtol=1e-5, atol=1e-7), name


def test_a_stale_build_lock_is_removed_and_a_live_one_waited_on_within_a_bound(tmp_path, capsys):
    """crosscoder/builds.py: a lock left by a killed build (older than a build takes) is removed with
    a message; a lock of a build in progress is waited on until it goes; one that never goes is
    treated as stale once it passes the bound, never waited on forever."""
    import threading
    import time

    from crosscoder.builds import clear_stale_locks

    stale = tmp_path / "ext" / "lock"
    stale.parent.mkdir()
    stale.touch()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    clear_stale_locks(tmp_path, stale_after_s=600)
    assert not stale.exists() and "removing the stale build lock" in capsys.readouterr().err
    live = tmp_path / "ext" / "lock"
    live.touch()
    threading.Timer(1.5, live.unlink).start()  # the other build finishes
    started = time.time()
    clear_stale_locks(tmp_path, stale_after_s=600)
    assert 1.0 < time.time() - started < 10 and "waiting for a build in progress" in capsys.readouterr().err
    live.touch()  # a build that hangs: taken as stale at the bound
    started = time.time()
    clear_stale_locks(tmp_path, stale_after_s=3)
    assert not live.exists() and time.time() - started < 10
    (tmp_path / "ext" / "ext.so").touch()  # built already: a lock is a load's check, stale after a minute
    live.touch()
    os.utime(live, (time.time() - 90, time.time() - 90))
    clear_stale_locks(tmp_path, stale_after_s=600)
    assert not live.exists()
    # however old, a lock whose directory a live process works in (ninja and the compiler run there) is a
    # build in progress: a rebuild that outlasted the bound on a loaded CI machine had its lock removed
    # under it and died. It is waited on until the build ends.
    live.touch()
    os.utime(live, (time.time() - 3600, time.time() - 3600))
    compiler = subprocess.Popen(["sleep", "60"], cwd=tmp_path / "ext")
    try:
        def build_ends(_seconds):
            compiler.kill()
            compiler.wait()
            live.unlink()

        capsys.readouterr()
        clear_stale_locks(tmp_path, stale_after_s=3, sleep=build_ends)
        assert "waiting for a build in progress" in capsys.readouterr().err and not live.exists()
    finally:
        compiler.kill()
        compiler.wait()
    live.touch()  # the same lock with nobody working there: stale, removed
    os.utime(live, (time.time() - 3600, time.time() - 3600))
    clear_stale_locks(tmp_path, stale_after_s=3, sleep=lambda _: pytest.fail("waited on a dead build's lock"))
    assert not live.exists()


def test_kernels_that_cannot_be_built_are_one_line_and_the_pytorch_path_serves(tmp_path):
    """A broken toolchain (here a compiler that always fails) costs speed, not the run: one line says
    so and module() is None, which every caller takes as "use the PyTorch path"."""
    env = {**os.environ, "CROSSCODER_EXTENSIONS_DIR": str(tmp_path), "CXX": "/bin/false"}
    env.pop("CROSSCODER_NATIVE", None)
    proc = subprocess.run([sys.executable, "-c", "from crosscoder import native; print('module:', native.module())"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "module: None" in proc.stdout, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "kernels unavailable" in line]
    assert len(said) == 1 and said[0].startswith("crosscoder: compiled CPU kernels unavailable ("), proc.stderr
    assert said[0].endswith("using the PyTorch path, which is slower")


def test_the_kernels_load_through_a_stale_lock_in_a_fresh_install_directory(tmp_path):
    """A build killed midway leaves its lock; the next process that loads the kernels removes it and
    builds, instead of waiting on it forever (as torch's own cache did)."""
    import time

    env = {**os.environ, "CROSSCODER_EXTENSIONS_DIR": str(tmp_path)}
    code = ("from crosscoder import native\nfrom crosscoder.builds import extensions_dir, source_key\n"
            "name, flags = native._target()\n"
            "print(extensions_dir() / (name + '_' + source_key(native.SOURCE.read_bytes(), '-O3', '-fopenmp', *flags)))")
    build = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    lock = Path(build.strip()) / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    proc = subprocess.run([sys.executable, "-c", "from crosscoder import native; assert native.module() is not None"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"removing the stale build lock {lock}" in proc.stderr and not lock.exists()
    assert proc.stderr.count("removing the stale build lock") == 1, proc.stderr  # said once


def test_every_process_of_an_install_runs_its_pinned_ninja(tmp_path):
    """torch runs the `ninja` PATH finds. A Ray worker had the venv's first (the pinned 1.13), a plain
    subprocess the system's (1.11): each took the other's build log for none and rebuilt DeepSpeed's
    op from scratch, a minute on a busy CI machine, and once a 2-rank test died of it. Whatever PATH a
    process starts with, the install's build directory puts the pinned ninja first."""
    import ninja

    pinned = subprocess.run([str(Path(ninja.BIN_DIR) / "ninja"), "--version"], capture_output=True, text=True,
                            check=True).stdout.strip()
    code = ("import subprocess\nfrom crosscoder.builds import extensions_dir\nextensions_dir()\n"
            "print(subprocess.run(['ninja', '--version'], capture_output=True, text=True, check=True).stdout.strip())")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "CROSSCODER_EXTENSIONS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == pinned
