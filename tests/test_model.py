"""Shapes, gradients and rules of the crosscoder module (pure PyTorch, no data)."""

import pytest
import torch

from crosscoder.dead import DeadLatentTracker, dead_share
from crosscoder.losses import LossWeights, alignment_loss, auxk_loss, auxk_selector, l1_penalty, total_loss
from crosscoder.metrics import decoder_cosine, decoder_norms, fve_per_source, relative_decoder_norm
from crosscoder.model import CrossCoder, CrossCoderSpec, export_names, init_parameters
from crosscoder.sparsity import Heaviside, JumpReLU

ARCHS = ["acausal", "aligned"]
ACTS = ["relu", "topk", "batchtopk", "jumprelu"]


def make(arch="acausal", act="batchtopk", widths=(24, 40), latents=64, k=4, seed=0):
    spec = CrossCoderSpec(sources=[f"s{i}" for i in range(len(widths))], widths=list(widths),
                          latents=latents, arch=arch, activation=act, k=k)
    # JumpReLU: thresholds and a kernel wide enough that a batch of 32 random tokens reaches them
    return CrossCoder(spec, seed=seed, dec_init_norm=0.5, jump_threshold=0.5, jump_bandwidth=1.0)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("act", ACTS)
def test_shapes_and_gradients_reach_every_parameter(arch, act):
    model = make(arch, act)
    x = torch.randn(32, 64)
    out = model(x)
    groups = 1 if arch == "acausal" else 2
    assert out.pre.shape == out.f.shape == (32, groups, 64)
    assert out.x_hat.shape == (32, 64)
    assert out.weights.shape == (groups, 64)
    dead = torch.zeros(groups, 64, dtype=torch.bool)
    dead[:, :10] = True  # so the AuxK path is exercised
    loss, terms = total_loss(model, x, out, dead, LossWeights(l1=1.0, aux=0.1, aux_k=8, align=1.0))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got no gradient"
    assert ("l1" in terms) == (act == "relu")
    assert ("l0" in terms) == (act == "jumprelu")
    assert ("align" in terms) == (arch == "aligned")


def test_jumprelu_gradients_are_the_straight_through_estimators():
    """f = pre·H(pre − θ): pre's gradient where the latent fired; θ's −(θ/ε)·K((pre−θ)/ε) (JumpReLU)
    and −(1/ε)·K((pre−θ)/ε) (the L0 count), K = 1 on |u| < ½, summed over tokens (hand-computed)."""
    eps = 0.2
    pre = torch.tensor([[[0.30, 1.00]], [[0.45, 0.95]], [[0.05, 2.00]]], requires_grad=True)  # [B=3, G=1, L=2]
    theta = torch.tensor([[0.40, 1.00]], requires_grad=True)
    upstream = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]])
    f = JumpReLU.apply(pre, theta, eps)
    assert torch.equal(f.detach(), torch.tensor([[[0.0, 0.0]], [[0.45, 0.0]], [[0.0, 2.0]]]))  # 1.00 > 1.00 is off
    (f * upstream).sum().backward()
    assert torch.equal(pre.grad, upstream * torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 1.0]]]))
    # in the window (|pre − θ| < 0.1): tokens 0 and 1 of latent 0, tokens 0 and 1 of latent 1
    expected = -torch.tensor([0.40 * (1.0 + 3.0), 1.00 * (2.0 + 4.0)]) / eps
    assert torch.allclose(theta.grad, expected.view(1, 2))
    pre.grad, theta.grad = None, None
    count = Heaviside.apply(pre, theta, eps)
    assert torch.equal(count.detach(), (f.detach() != 0).float())
    (count * upstream).sum().backward()
    assert pre.grad is None or not pre.grad.any()
    assert torch.allclose(theta.grad, -torch.tensor([[1.0 + 3.0, 2.0 + 4.0]]) / eps)


@pytest.mark.parametrize("arch", ARCHS)
def test_jumprelu_applies_the_same_learned_thresholds_in_training_and_at_inference(arch):
    model = make(arch, "jumprelu")
    with torch.no_grad():
        model.log_threshold.uniform_(-2.0, 0.5)
    x = torch.randn(64, 64)
    trained = model.train()(x).f.detach()
    assert torch.equal(model.eval().encode(x), trained)  # one token's code does not depend on its batch
    few = model.encode(x[:5])  # the same latents (the product's rounding depends on the batch's size)
    assert torch.equal(few != 0, trained[:5] != 0) and torch.allclose(few, trained[:5], atol=1e-6)
    assert 0 < int((trained != 0).sum()) < trained.numel() // 2  # the thresholds cut
    assert torch.equal(model.export_tensors()["threshold" if arch == "acausal" else "threshold.s0"],
                       model.log_threshold.exp()[0].detach())
    weights = LossWeights(l0=2.0)
    loss, terms = total_loss(model.train(), x, model(x), None, weights)
    assert float(terms["l0"]) == pytest.approx(float((trained != 0).sum()) / 64)
    assert float(loss.detach()) == pytest.approx(float(terms["mse"]) + 2.0 * float(terms["l0"]), rel=1e-6)


def test_parameter_shapes_follow_design_for_different_widths():
    model = make(widths=(64, 96), latents=128)
    assert model.W_enc.shape == (160, 128) and model.W_dec.shape == (128, 160)
    tensors = model.export_tensors([1.0, 1.0])
    assert tensors["W_enc.s0"].shape == (64, 128) and tensors["W_enc.s1"].shape == (96, 128)
    assert tensors["W_dec.s0"].shape == (128, 64) and tensors["W_dec.s1"].shape == (128, 96)
    assert tensors["b_dec.s1"].shape == (96,) and tensors["b_enc"].shape == (128,)
    assert sorted(tensors) == sorted(export_names(model.spec))


def test_initialisation_encoder_is_decoder_transpose_with_chosen_norms():
    model = make(widths=(16, 48), latents=32)
    assert torch.equal(model.W_enc, model.W_dec.t())
    norms = model.decoder_norms()
    assert torch.allclose(norms, torch.full_like(norms, 0.5), atol=1e-6)
    assert torch.allclose(relative_decoder_norm(model.W_dec, model.spec.slices), torch.full((32,), 0.5))


@pytest.mark.parametrize("widths", [(16, 16, 16), (16, 48)], ids=["one-width", "two-widths"])
def test_decoder_norms_and_their_gradient_are_each_sources_columns(widths):
    # sources of one width take one norm over W_dec as [L, S, d]: the same values and gradient as a
    # norm per source's columns, source by source (a swapped reshape would mix the sources)
    model = make(widths=widths, latents=32)
    with torch.no_grad():
        model.W_dec.normal_()
    norms = model.decoder_norms()
    per_source = torch.stack([model.W_dec[:, sl].norm(dim=1) for sl in model.spec.slices])
    assert norms.shape == (len(widths), 32) and torch.equal(norms, per_source)
    weights = torch.arange(norms.numel(), dtype=norms.dtype).view_as(norms)  # each (source, latent) its own weight
    (grad,) = torch.autograd.grad((norms * weights).sum(), model.W_dec)
    (expected,) = torch.autograd.grad((per_source * weights).sum(), model.W_dec)
    assert torch.allclose(grad, expected, rtol=1e-6, atol=1e-7)
    # the analysis's form ([L, S], per dimension), and slices that do not cover W_dec in order
    widths_ = torch.tensor(widths, dtype=norms.dtype)
    assert torch.equal(decoder_norms(model.W_dec, model.spec.slices, per_dimension=True),
                       (per_source / widths_[:, None] ** 0.5).t())
    reversed_slices = model.spec.slices[::-1]
    assert torch.equal(decoder_norms(model.W_dec, reversed_slices), per_source.flip(0).t())


def test_batchtopk_keeps_exactly_k_times_batch_in_training():
    model = make(act="batchtopk", k=5)
    with torch.no_grad():
        model.b_enc.fill_(10.0)  # every pre-activation positive: the rule alone decides
    model.train()
    out = model(torch.randn(50, 64))
    assert int((out.f != 0).sum()) == 5 * 50
    per_token = (out.f != 0).sum(-1).flatten()
    assert per_token.min() != per_token.max()  # batch-level, not per token


def test_topk_keeps_k_per_token():
    model = make(act="topk", k=3)
    with torch.no_grad():
        model.b_enc.fill_(10.0)
    out = model(torch.randn(20, 64))
    assert ((out.f != 0).sum(-1) == 3).all()


def test_batchtopk_uses_threshold_at_inference_independent_of_batch():
    model = make(act="batchtopk", k=4)
    x = torch.randn(256, 64)
    model.train()
    out = model(x)
    model.update_threshold(out.batch_threshold, out.weights.detach(), momentum=0.9)
    expected = out.batch_threshold.view(-1, 1) / out.weights
    assert torch.allclose(model.threshold, expected)
    model.eval()
    f_full = model.encode(x)
    f_single = torch.cat([model.encode(x[i : i + 1]) for i in range(8)])
    # a token's code does not depend on its batch (up to matmul rounding)
    assert torch.allclose(f_full[:8], f_single, atol=1e-5)
    pre = model.pre_activations(x)
    assert torch.equal(f_full != 0, (pre > model.threshold) & (pre > 0))
    # the threshold reproduces roughly the training sparsity
    assert 0.5 * 4 < float((f_full != 0).sum(-1).float().mean()) < 2 * 4


def test_threshold_is_a_bias_corrected_exponential_moving_average():
    """Adam's correction: after t steps each step weighs (1 − m) m^age / (1 − m^t); with m = 1/2, the
    first value alone, then 1/3 and 2/3, so the first step does not linger as it did when the
    average started at it (1/2 and 1/2)."""
    model = make(act="batchtopk")
    w = torch.ones(1, 64)
    model.update_threshold(torch.tensor([2.0]), w, momentum=0.5)
    assert torch.allclose(model.threshold, torch.full((1, 64), 2.0))
    model.update_threshold(torch.tensor([4.0]), w, momentum=0.5)
    assert torch.allclose(model.threshold, torch.full((1, 64), 2.0 / 3 + 8.0 / 3))


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrated_threshold_is_batchtopk_over_all_the_calibration_tokens_at_once(arch):
    """Streamed over batches, the calibration equals BatchTopK's rule on their concatenation, even when
    one batch holds most of the k·N largest scores (the first, scaled up here), and it stops early
    when the data ends before ``max_tokens``."""
    model = make(arch=arch, act="batchtopk", k=4)
    torch.manual_seed(1)
    batches = [torch.randn(64, 64) * 3] + [torch.randn(64, 64) for _ in range(3)]
    tokens = model.calibrate_threshold(iter(batches), 4, max_tokens=8 * 64)
    assert tokens == 256
    weights = model.selection_weights()
    scores = model.pre_activations(torch.cat(batches)).clamp_min(0) * weights  # [N, G, L]
    for g in range(scores.shape[1]):
        kth = scores[:, g].flatten().topk(4 * 256).values[-1]
        assert torch.allclose(model.threshold[g], kth / weights[g])
    # on those tokens the inference L0 is k per group
    fired = (model.encode(torch.cat(batches)) != 0).sum(-1).float().mean(0)
    assert torch.allclose(fired, torch.full_like(fired, 4.0), atol=1 / 256)


def test_l1_penalty_matches_hand_computed_value():
    spec = CrossCoderSpec(["a", "b"], [2, 1], latents=2, activation="relu")
    model = CrossCoder(spec)
    with torch.no_grad():
        model.W_dec.copy_(torch.tensor([[3.0, 4.0, 2.0], [0.0, 1.0, 0.0]]))  # norms: a=[5,1], b=[2,0]
        model.W_enc.zero_()
        model.b_enc.copy_(torch.tensor([[1.5, 2.0]]))
    out = model(torch.zeros(2, 3))
    # per token: 1.5 * (5 + 2) + 2.0 * (1 + 0) = 12.5
    assert torch.isclose(l1_penalty(model, out), torch.tensor(12.5))
    assert out.weights.tolist() == [[7.0, 1.0]]


def test_auxk_is_zero_when_nothing_is_dead_and_positive_otherwise():
    model = make()
    x = torch.randn(64, 64)
    out = model(x)
    nothing = torch.zeros(1, 64, dtype=torch.bool)
    assert auxk_loss(model, x, out, nothing, 8).item() == 0.0
    some = nothing.clone()
    some[0, :16] = True
    loss = auxk_loss(model, x, out, some, 8)
    assert loss.item() > 0
    loss.backward()
    # only dead latents' encoder columns learn from AuxK
    assert model.W_enc.grad[:, 16:].abs().sum() == 0 and model.W_enc.grad[:, :16].abs().sum() > 0


def test_alignment_loss_zero_for_equal_codes_and_scale_invariant_when_normalized():
    a = torch.rand(8, 2, 16)
    active = torch.rand(8, 2, 16) > 0.7
    same = torch.stack([a[:, 0], a[:, 0]], 1)
    assert alignment_loss(same, active).item() == 0.0
    assert alignment_loss(a, active).item() > 0
    assert torch.isclose(alignment_loss(a, active), alignment_loss(a * 7.0, active))
    assert not torch.isclose(alignment_loss(a, active, "mse"), alignment_loss(a * 7.0, active, "mse"))
    # only latents active in either source count
    off = a.clone()
    off[:, 1][~(active[:, 0] | active[:, 1])] += 5.0
    assert torch.isclose(alignment_loss(off, active), alignment_loss(a, active))


@pytest.mark.parametrize("act", ACTS)
def test_aligned_cross_reconstruction_decodes_into_the_target_width(act):
    """From every source side by side, or (aligned) from the read source's activations alone: a
    user mapping layer 4 to layer 8 need not have every other source's activations at hand."""
    model = make("aligned", act, widths=(24, 40))
    model.threshold.fill_(0.05)  # BatchTopK's inference threshold, as training would leave it
    model.eval()
    x = torch.randn(10, 64)
    assert model.cross_reconstruct(x, 0, 1).shape == (10, 40)
    assert model.cross_reconstruct(x, 1, 0).shape == (10, 24)
    for source, target, sl in [(0, 1, slice(0, 24)), (1, 0, slice(24, 64)), (1, 1, slice(24, 64))]:
        alone = model.cross_reconstruct(x[:, sl], source, target)
        torch.testing.assert_close(alone, model.cross_reconstruct(x, source, target), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"source 0 is 24 wide and the sources together 64; got 40"):
        model.cross_reconstruct(x[:, 24:], 0, 1)
    with pytest.raises(ValueError, match=r"the acausal code reads every source: x must be \[B, 64\], got 24 wide"):
        make("acausal", act, widths=(24, 40)).cross_reconstruct(x[:, :24], 0, 1)


def test_dead_tracker_counts_tokens_since_fired():
    tracker = DeadLatentTracker((1, 4), window_tokens=100)
    tracker.update(torch.tensor([[True, False, False, False]]), 60)
    assert not tracker.dead.any()
    tracker.update(torch.tensor([[False, True, False, False]]), 60)
    assert tracker.dead.tolist() == [[False, False, True, True]]
    assert tracker.dead_fraction() == 0.5
    tracker.update(torch.zeros(1, 4, dtype=torch.bool), 50)  # 110, 50, 170, 170 tokens since fired
    assert tracker.dead.tolist() == [[True, False, True, True]]
    # shown as n/a until a whole window was trained on (no latent can be dead before), then the share
    assert dead_share({"tokens": 99, "dead_fraction": 0.0}, 100) is None
    assert dead_share({"tokens": 170, "dead_fraction": tracker.dead_fraction()}, 100, digits=2) == "75.00%"


def test_metrics_on_known_values():
    x = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 4.0]])
    slices = [slice(0, 2), slice(2, 3)]
    assert torch.allclose(fve_per_source(x, x, slices), torch.ones(2))
    mean_hat = x.mean(0, keepdim=True).expand_as(x)
    assert torch.allclose(fve_per_source(x, mean_hat, slices), torch.zeros(2), atol=1e-6)
    W = torch.tensor([[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, -2.0]])
    sl = [slice(0, 2), slice(2, 4)]
    assert torch.allclose(relative_decoder_norm(W, sl), torch.tensor([0.75, 0.5]))
    assert torch.allclose(decoder_cosine(W, sl), torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sources=["a"], widths=[4, 5], latents=8), "one width per source"),
        (dict(sources=["a", "a"], widths=[4, 5], latents=8), "unique"),
        (dict(sources=["a"], widths=[4], latents=8, arch="causal"), "arch"),
        (dict(sources=["a"], widths=[4], latents=8, activation="gelu"), "activation"),
        (dict(sources=["a"], widths=[4], latents=8, k=9), "k must be"),
    ],
)
def test_bad_spec_is_rejected_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrossCoderSpec(**kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_range_init_matches_the_full_dictionary_slice(arch):
    full = make(arch, latents=96)
    part = CrossCoder(full.spec, seed=0, dec_init_norm=0.5, latent_range=(32, 80))
    assert torch.equal(part.W_dec, full.W_dec[32:80])
    # drawn in chunks (65,536 rows in a real run): a slice across chunk boundaries gets the same rows
    whole = init_parameters(full.spec, 0, 0.5, 0, 96, chunk=7)
    for lo, hi in [(0, 7), (3, 40), (32, 80), (90, 96)]:
        assert torch.equal(init_parameters(full.spec, 0, 0.5, lo, hi, chunk=7), whole[lo:hi]), (lo, hi)
    assert torch.allclose(whole[:, :24].norm(dim=1), torch.tensor(0.5))


@pytest.mark.precision
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "jumprelu, too dense"])
def test_sparse_kernels_equal_the_dense_path_in_loss_and_every_gradient(activation, monkeypatch):
    """The sparse encoder backward and sparse decoder give the dense implementation's loss, AuxK
    term, gradients and dead-latent statistics, within float rounding; AuxK's entries decoded with
    the main code (the forward given the dead latents, as the trainer does) or on their own alike.
    JumpReLU: thresholds spread around the activations and a kernel wide enough that many entries
    lie in its window on either side of θ, so the thresholds' gradient (the estimators', the L0
    term's) is compared too, through the entries (however many: 38% of them here) and, "too dense",
    with a step holding more entries than the path takes, through the dense math on the product it
    computed."""
    from crosscoder import sparse_path

    too_dense = activation.endswith("too dense")
    activation = activation.split(",")[0]
    monkeypatch.setitem(sparse_path.JUMPRELU_DENSE_ABOVE, "cpu", 0.0 if too_dense else 1.0)
    spec = CrossCoderSpec(["base", "chat"], [24, 40], 256, activation=activation, k=6)
    x = torch.randn(48, 64) * torch.rand(48, 1) * 3
    dead = torch.zeros(1, 256, dtype=torch.bool)
    dead[0, ::3] = True  # AuxK active on a third of the dictionary
    results = {}
    for mode in ("joint", "separate", "dense"):
        model = CrossCoder(spec, seed=3, dec_init_norm=0.5, sparse_kernels=mode != "dense", jump_threshold=0.3,
                           jump_bandwidth=0.2)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.b_enc.copy_(torch.randn(model.b_enc.shape, generator=gen) * 0.1)
            model.b_dec.copy_(torch.randn(model.b_dec.shape, generator=gen) * 0.1)
            if activation == "jumprelu":
                model.log_threshold.add_(torch.randn(model.log_threshold.shape, generator=gen) * 0.3)
        out = model(x, auxk_selector(model, dead, 16)) if mode == "joint" else model(x)
        sparse = mode != "dense" and not too_dense
        assert (out.code is not None) == sparse and (out.aux_hat is not None) == (mode == "joint" and sparse)
        if activation == "jumprelu" and out.code is not None:  # the code holds its window's entries below θ
            assert 0 < float(out.active_count()) < out.code.value.numel()
        loss, terms = total_loss(model, x, out, dead, LossWeights(aux=1 / 32, aux_k=16, l0=0.5))
        loss.backward()
        results[mode] = (terms, {n: p.grad.clone() for n, p in model.named_parameters()}, out.fired(),
                         out.active_count(), out.f.detach(), out.batch_threshold)
    t_d, g_d, fired_d, n_d, f_d, th_d = results["dense"]
    assert t_d["auxk"] > 0
    for mode in ("joint", "separate"):
        t_s, g_s, fired_s, n_s, f_s, th_s = results[mode]
        for name in t_d:
            assert torch.allclose(t_s[name], t_d[name], rtol=1e-5, atol=1e-6), (mode, name)
        for name in g_d:
            assert torch.allclose(g_s[name], g_d[name], rtol=1e-4, atol=1e-6), (mode, name)
            assert g_d[name].abs().sum() > 0, name
        assert torch.equal(fired_s, fired_d) and float(n_s) == float(n_d)
        assert torch.allclose(f_s, f_d, atol=1e-6)
        if activation == "batchtopk":
            assert torch.allclose(th_s, th_d)


def test_the_reconstruction_sum_carries_auxk_rows_only_when_latents_are_dead():
    """What latent parallelism all-reduces per step: B rows of reconstruction, 2B when AuxK has dead
    latents to decode with the main code (README, "bytes per step"); counted at the collective."""
    from crosscoder.collectives import Collectives

    class Counting(Collectives):
        def __init__(self):
            self.rows: list[int] = []

        def sum_partial(self, partial):
            self.rows.append(partial.shape[0])
            return partial

    spec = CrossCoderSpec(["base", "chat"], [24, 40], 256, activation="batchtopk", k=6)
    x = torch.randn(48, 64)
    for dead_every, rows in ((0, 48), (3, 96)):
        counting = Counting()
        model = CrossCoder(spec, seed=3, dec_init_norm=0.5, sparse_kernels=True, collectives=counting)
        dead = torch.zeros(1, 256, dtype=torch.bool)
        if dead_every:
            dead[0, ::dead_every] = True
        out = model(x, auxk_selector(model, dead, 16))
        _, terms = total_loss(model, x, out, dead, LossWeights(aux=1 / 32, aux_k=16))
        assert counting.rows == [rows], (dead_every, counting.rows)
        assert (float(terms["auxk"]) > 0) == bool(dead_every)


@pytest.mark.precision
@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_weights_on_a_cpu_without_bf16_gemm_multiply_in_fp32(monkeypatch, native_bf16):
    """precision.py: without native bf16 (as on this project's AVX2 machine), the training encoder
    product of bf16 weights is computed in fp32, block by block (a ragged last block included), into
    an fp32 buffer equal to the fp32 product of the same bf16 values, so the step selects what an fp32
    model holding those values selects (up to ties of the bf16 selection weights); its loss and bf16
    gradients match that model's within bf16 rounding. With native bf16 nothing is upcast."""
    from crosscoder import precision

    monkeypatch.setenv(precision.FORCE_VARIABLE, "native" if native_bf16 else "upcast")
    monkeypatch.setattr(precision, "UPCAST_BLOCK", 96)  # 300 latents: blocks of 96, 96, 96, 12
    spec = CrossCoderSpec(["base", "chat"], [16, 24], 300, activation="batchtopk", k=5)
    x = (torch.randn(40, 40) * 2).bfloat16()
    dead = torch.zeros(1, 300, dtype=torch.bool)
    dead[0, ::4] = True
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        model = CrossCoder(spec, seed=2, dec_init_norm=0.5).bfloat16()  # both hold the same bf16 values
        with torch.no_grad():
            model.b_enc.copy_(torch.randn(model.b_enc.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        model = model.to(dtype)
        out = model(x.to(dtype), auxk_selector(model, dead, 8))
        loss, _ = total_loss(model, x.to(dtype), out, dead, LossWeights(aux=1 / 32, aux_k=8))
        loss.backward()
        results[dtype] = (float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}, out)
    pre, pre32 = results[torch.bfloat16][2].pre, results[torch.float32][2].pre
    assert pre.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    if native_bf16:
        assert torch.allclose(pre.float(), pre32, rtol=1e-2, atol=1e-2) and not torch.equal(pre.float(), pre32)
        return
    assert torch.allclose(pre, pre32, rtol=1e-5, atol=1e-6)
    code, code32 = results[torch.bfloat16][2].code, results[torch.float32][2].code
    entries = set(zip(code.token.tolist(), code.latent.tolist()))
    entries32 = set(zip(code32.token.tolist(), code32.latent.tolist()))
    # the selection weights (decoder norms) are bf16 in one model: an entry or two at the threshold may differ
    assert len(entries) == len(entries32) and len(entries & entries32) >= 0.97 * len(entries32)
    assert results[torch.bfloat16][0] == pytest.approx(results[torch.float32][0], rel=1e-2)
    for name, grad32 in results[torch.float32][1].items():
        grad = results[torch.bfloat16][1][name]
        # bf16 residuals x̂ − x keep few digits (cancellation), so gradients agree to ~10%, not to 1e-3
        assert grad.dtype == torch.bfloat16 and float((grad.float() - grad32).norm() / grad32.norm()) < 0.25, name


def test_the_precision_switch_is_read_at_each_product_and_refuses_bad_values(monkeypatch):
    """CROSSCODER_BF16_PRODUCTS (a test switch) decides the dtype bf16 products run in, whatever this
    CPU's bf16 units; a value other than auto/upcast/native is an error, not a silent default."""
    from crosscoder import precision

    x, w = torch.randn(4, 8).bfloat16(), torch.randn(8, 6).bfloat16()
    out = torch.empty(4, 6, dtype=torch.float32)
    monkeypatch.setenv(precision.FORCE_VARIABLE, "upcast")
    assert precision.product_dtype(w) == torch.float32
    precision.addmm_into(torch.zeros(6).bfloat16(), x, w, out)
    assert torch.allclose(out, x.float() @ w.float(), atol=1e-5)
    monkeypatch.setenv(precision.FORCE_VARIABLE, "native")
    assert precision.product_dtype(w) == torch.bfloat16
    assert precision.matmul(x, w).dtype == torch.bfloat16
    assert not precision.upcasts(w.float())  # fp32 weights are never upcast
    monkeypatch.setenv(precision.FORCE_VARIABLE, "fp8")
    with pytest.raises(ValueError, match="must be auto, upcast or native, got 'fp8'"):
        precision.upcasts(w)


@pytest.mark.parametrize("act", ["batchtopk", "jumprelu"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loading_an_export_writes_its_tensors_once_without_drawing_a_dictionary(arch, act, tmp_path, monkeypatch):
    model = make(arch, act)
    with torch.no_grad():
        model.b_enc.normal_()
        model.b_dec.normal_()
        model.threshold.uniform_(0.1, 1.0)
        if act == "jumprelu":  # its thresholds are learned: the export holds exp(log θ), not the buffer
            model.log_threshold.uniform_(-2.0, 0.5)
            model.threshold.copy_(model.log_threshold.exp())
    model.save_pretrained(tmp_path / "export")

    def no_draw(*args, **kwargs):
        raise AssertionError("a random dictionary was drawn only to be overwritten")

    monkeypatch.setattr("crosscoder.model.init_parameters", no_draw)
    loaded = CrossCoder.from_pretrained(tmp_path / "export")
    for name, tensor in model.state_dict().items():
        if name == "log_threshold":  # stored as θ, read back as log θ
            assert torch.allclose(loaded.state_dict()[name], tensor, rtol=0, atol=1e-6), name
        elif name != "threshold_updates":  # an export's thresholds count as estimated: 1
            assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not loaded.training and int(loaded.threshold_updates) == 1
    x = torch.randn(5, 64)
    assert torch.equal(loaded.encode(x), model.eval().encode(x))


def test_an_export_cut_short_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """A process killed while writing model.safetensors (a preempted node, at 1M latents a long write)
    left a truncated file in its place; now the file is written beside it and renamed."""
    import crosscoder.model as model_module

    first = make()
    first.save_pretrained(tmp_path / "export")
    second = make(seed=1)

    def cut_short(tensors, path):
        with open(path, "wb") as fh:
            fh.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(model_module, "save_file", cut_short)
    with pytest.raises(KeyboardInterrupt):
        second.save_pretrained(tmp_path / "export")
    loaded = CrossCoder.from_pretrained(tmp_path / "export")
    assert torch.equal(loaded.W_dec, first.W_dec)


def test_bag_sum_of_unsorted_bags_and_the_gpu_form_of_kth_largest():
    """bag_sum sorts bags it is told are unsorted (the sums by latent); CUDA's k-th largest (topk's
    minimum), run here on a CPU tensor, is kthvalue's, ties included."""
    from crosscoder import kernels
    from crosscoder.collectives import kth_largest, kth_largest_by_topk

    gen = torch.Generator().manual_seed(5)
    L, D, R, N = 90, 37, 600, 5000
    W = torch.randn(L, D, generator=gen, dtype=torch.float64)
    bag, latent = torch.randint(0, R, (N,), generator=gen), torch.randint(0, L, (N,), generator=gen)
    value = torch.rand(N, generator=gen, dtype=torch.float64)
    direct = torch.zeros(R, D, dtype=torch.float64).index_add_(0, bag, W[latent] * value[:, None])
    assert torch.allclose(kernels.bag_sum(latent, W, bag, R, value, bags_sorted=False), direct, rtol=1e-12, atol=1e-12)

    values = torch.randn(10_001, generator=gen).round(decimals=1)  # ties
    for k in (1, 17, 5000, 10_001):
        assert torch.equal(kth_largest_by_topk(values, k), kth_largest(values, k)), k
        assert kth_largest(values, k) == values.sort(descending=True).values[k - 1]
