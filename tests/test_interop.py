"""`crosscoder export --format dictionary_learning`: the state dict in the layout of
science-of-finetuning/dictionary_learning's BatchTopKCrossCoder (commit 173f7fa; its PyPI package
has no crosscoder, so its forward is restated below from that source: per-source einsum encoder,
CROSSCODER code normalisation, one threshold on the scaled score), checked for agreement on
held-out activations."""

import subprocess
import sys

import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.interop import ExportError, dictionary_learning_state
from crosscoder.model import CrossCoderSpec

EXPECTED_KEYS = {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias", "code_normalization_id", "k",
                 "threshold", "target_rms", "activation_mean", "activation_std", "activation_global_scale"}


def their_forward(state: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning's BatchTopKCrossCoder at inference (use_threshold): x [B, S, d] → (f, x̂)."""
    assert torch.isnan(state["activation_mean"]).all()  # no activation normaliser: inputs pass unchanged
    f = torch.relu(torch.einsum("bld,ldf->blf", x, state["encoder.weight"]).sum(1) + state["encoder.bias"])
    code_norm = state["decoder.weight"].norm(dim=2).sum(0, keepdim=True)  # CROSSCODER: Σ_layers ‖W_dec‖
    f = f * (f * code_norm > state["threshold"])
    return f, torch.einsum("bf,lfd->bld", f, state["decoder.weight"]) + state["decoder.bias"]


def calibrated_model(norm_scale: list[float]) -> CrossCoder:
    spec = CrossCoderSpec(["base", "chat"], [32, 32], latents=256, activation="batchtopk", k=8, norm_scale=norm_scale)
    model = CrossCoder(spec, seed=0, dec_init_norm=0.3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # latents of different decoder norms, shared unevenly between the sources
        model.W_dec[:, :32].mul_(torch.rand(256, 1, generator=gen) + 0.5)
        model.W_dec[:, 32:].mul_(torch.rand(256, 1, generator=gen) + 0.5)
        model.b_enc.normal_(0, 0.1, generator=gen)
    model.calibrate_threshold(iter([torch.randn(128, 64, generator=gen) for _ in range(4)]), 8, max_tokens=512)
    return model


def test_equal_scales_export_exactly(tmp_path):
    model = calibrated_model([1.0, 1.0])
    model.save_pretrained(tmp_path / "export")
    ours = CrossCoder.from_pretrained(tmp_path / "export")
    state, fit = dictionary_learning_state(ours)
    assert set(state) == EXPECTED_KEYS and state["code_normalization_id"].item() == 1 and state["k"].item() == 8
    assert state["encoder.weight"].shape == (2, 32, 256) and state["decoder.weight"].shape == (2, 256, 32)
    assert fit.max_relative_error < 1e-5
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))  # held out
    f_theirs, x_hat_theirs = their_forward(state, x.view(512, 2, 32))
    f_ours = ours.encode(x)[:, 0]
    agree = ((f_theirs > 0) == (f_ours > 0)).float().mean()
    assert agree > 0.999, float(agree)
    assert torch.allclose(x_hat_theirs.reshape(512, 64), ours.reconstruct(x), atol=1e-4, rtol=1e-4)


def test_unequal_scales_report_how_far_one_threshold_is(tmp_path):
    """Normalisation folded into the decoder makes their score weights differ from ours per latent:
    the export says how far off the single threshold is, and the firing still mostly agrees."""
    model = calibrated_model([0.5, 2.0])
    model.save_pretrained(tmp_path / "export")
    ours = CrossCoder.from_pretrained(tmp_path / "export")
    state, fit = dictionary_learning_state(ours)
    assert fit.relative_spread > 0.01  # not expressible exactly
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1)) * torch.tensor([2.0] * 32 + [0.5] * 32)
    f_theirs, _ = their_forward(state, x.view(512, 2, 32))
    f_ours = ours.encode(x)[:, 0]
    both = (f_theirs > 0) & (f_ours > 0)
    assert torch.allclose(f_theirs[both], f_ours[both], atol=1e-5, rtol=1e-5)  # the same codes where both fire
    agree = ((f_theirs > 0) == (f_ours > 0)).float().mean()
    assert agree > 0.98, float(agree)  # measured 0.989 with scales 4× apart


def test_the_cli_writes_the_file_and_refuses_what_does_not_fit(tmp_path):
    calibrated_model([1.0, 1.0]).save_pretrained(tmp_path / "run" / "crosscoder")
    done = subprocess.run([sys.executable, "-m", "crosscoder.cli", "export", str(tmp_path / "run")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    state = torch.load(tmp_path / "run" / "exports" / "dictionary_learning.pt", weights_only=True)
    assert set(state) == EXPECTED_KEYS and "scalar threshold" in done.stdout
    spec = CrossCoderSpec(["base", "chat"], [16, 24], latents=64, activation="batchtopk", k=4)
    CrossCoder(spec).save_pretrained(tmp_path / "wide" / "crosscoder")
    done = subprocess.run([sys.executable, "-m", "crosscoder.cli", "export", str(tmp_path / "wide")],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith("crosscoder: ExportError:")
    with pytest.raises(ExportError, match="acausal BatchTopK"):
        dictionary_learning_state(CrossCoder(CrossCoderSpec(["a", "b"], [8, 8], latents=16, activation="relu")))
