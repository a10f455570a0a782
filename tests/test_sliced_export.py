"""The export assembled from latent slices (sliced_export.py) is the file one process writes."""

import pytest
import torch
from safetensors.torch import load_file

from crosscoder.model import CrossCoder, CrossCoderSpec, export_layout, write_export_config
from crosscoder.sliced_export import SLICES_DIR, assemble, write_slice


@pytest.mark.parametrize("arch", ["acausal", "aligned"])
def test_slices_assemble_into_the_single_process_export(tmp_path, arch, monkeypatch):
    monkeypatch.setattr("crosscoder.sliced_export.BLOCK_BYTES", 1000)  # several passes over W_enc's rows
    spec = CrossCoderSpec(["base", "chat"], [24, 40], latents=100, arch=arch, activation="batchtopk", k=4,
                          norm_scale=[0.5, 2.0])
    full = CrossCoder(spec, seed=0, dec_init_norm=0.5)
    with torch.no_grad():
        full.b_enc.normal_()
        full.b_dec.normal_()
        full.threshold.uniform_(0.1, 1.0)
    ranges = [(0, 34), (34, 67), (67, 100)]  # uneven, as ParallelLayout splits 100 over 3
    for rank, (lo, hi) in enumerate(ranges):
        part = CrossCoder(spec, seed=0, dec_init_norm=0.5, latent_range=(lo, hi))
        with torch.no_grad():
            part.W_enc.copy_(full.W_enc[:, lo:hi])
            part.W_dec.copy_(full.W_dec[lo:hi])
            part.b_enc.copy_(full.b_enc[:, lo:hi])
            part.threshold.copy_(full.threshold[:, lo:hi])
            part.b_dec.copy_(full.b_dec)
        write_slice(part.export_makers(spec.norm_scale), tmp_path / "sliced", rank)
    assemble(tmp_path / "sliced", len(ranges), export_layout(spec))
    write_export_config(spec, tmp_path / "sliced", spec.norm_scale, {"latent_parallel": 3})
    assert not (tmp_path / "sliced" / SLICES_DIR).exists()
    full.save_pretrained(tmp_path / "whole", norm_scale=spec.norm_scale)
    a, b = load_file(tmp_path / "sliced" / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    loaded = CrossCoder.from_pretrained(tmp_path / "sliced")
    x = torch.randn(8, 64)
    assert torch.equal(loaded.encode(x), CrossCoder.from_pretrained(tmp_path / "whole").encode(x))
