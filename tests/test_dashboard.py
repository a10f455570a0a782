"""`crosscoder export --format neuronpedia`: per-latent dashboards in Neuronpedia's batch schema.

SAEDashboard (which writes that schema) needs SAELens and TransformerLens and is not installed, so
the schema's keys are restated from its source (dashboard.FEATURE_KEYS, commit 6b20386) and every
value is checked against what it must equal: the analysis's frequency and top activations, the
latent's activation re-computed on the window's tokens directly, the decoder norms of the export.
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from crosscoder import CrossCoder
from crosscoder.analysis import AnalysisError, read_latents_csv
from crosscoder.cli import main
from crosscoder.dashboard import FEATURE_KEYS
from crosscoder.shards import iter_samples, read_manifest
from crosscoder.storage import Root

from .test_analysis import artifacts  # noqa: F401 - the planted run, analysed


def test_dashboards_hold_every_live_latents_top_activations_with_values_on_every_token(artifacts, tmp_path,  # noqa: F811
                                                                                       capsys):
    *_, run = artifacts
    data = run.parent / "shards"
    out = tmp_path / "np"
    assert main(["export", str(run), "--format", "neuronpedia", "--data", str(data), "--out", str(out),
                 "--model-id", "planted", "--layer", "3"]) == 0
    said = capsys.readouterr()
    assert "Neuronpedia batch files" in said.out
    assert said.err.rstrip().splitlines()[-1].startswith("dashboards: 100%|")  # its bar ends at its total
    columns = read_latents_csv(run / "analysis" / "latents.csv")
    top = np.load(run / "analysis" / "top_activations.npz")
    live = np.flatnonzero(columns["class"] != "dead")
    features = []
    for path in sorted(out.glob("batch-*.json")):
        batch = json.loads(path.read_text())
        assert set(batch) == {"model_id", "layer", "sae_set", "features", "settings"}
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("planted", 3, run.name)
        features += batch["features"]
    assert [f["feature_index"] for f in features] == live.tolist()

    # the analysed stream in manifest order: each token's activations and its document
    root = Root(str(data))
    manifest = read_manifest(root)
    acts, doc = [], []
    for n, sample in enumerate(iter_samples(root, manifest)):
        acts.append(sample.acts)
        doc.append(np.full(len(sample.tokens), n))
    acts_all, doc_all = np.concatenate(acts)[: int(top["tokens"])], np.concatenate(doc)[: int(top["tokens"])]
    model = CrossCoder.from_pretrained(run / "crosscoder")
    checked = 0
    for feature in features:
        latent = feature["feature_index"]
        assert tuple(feature) == FEATURE_KEYS
        assert feature["frac_nonzero"] == pytest.approx(columns["frequency"][latent])
        assert feature["num_tokens_for_dashboard"] == int(top["tokens"])
        peaks = top["values"][latent][top["values"][latent] > 0]
        assert len(feature["activations"]) == len(peaks)
        assert sum(feature["freq_hist_data_bar_heights"]) == len(peaks)
        for example, peak, index in zip(feature["activations"], peaks, top["index"][latent]):
            assert len(example["tokens"]) == len(example["values"]) and example["bin_max"] == pytest.approx(peaks[0])
            assert max(example["values"]) == pytest.approx(peak, rel=1e-4, abs=1e-4)  # the analysis's value, again
            # the window: up to 12 tokens before and 3 after, inside the document; every value recomputed
            window = np.flatnonzero(doc_all == doc_all[index])
            window = window[(window >= index - 12) & (window <= index + 3)]
            assert len(window) == len(example["values"])
            with torch.no_grad():
                direct = model.encode(torch.from_numpy(acts_all[window]).float()).amax(1)[:, latent]
            np.testing.assert_allclose(example["values"], direct.numpy(), rtol=1e-4, atol=1e-4)
            assert example["tokens"] == [f"#{t}" for t in np.concatenate(
                [s.tokens for s in iter_samples(root, manifest)])[window]]  # no tokenizer: ids
            checked += 1
    assert checked >= len(live)  # every live latent has at least one example here

    sidecar = json.loads((out / "crosscoder.json").read_text())
    assert sidecar["sources"] == ["base", "chat"] and len(sidecar["latents"]) == len(live)
    norms = torch.stack([model.W_dec[:, sl].norm(dim=1) for sl in model.spec.slices], 1).detach().numpy()
    for row in sidecar["latents"]:
        i = row["index"]
        assert [row["decoder_norm"]["base"], row["decoder_norm"]["chat"]] == pytest.approx(norms[i].tolist())
        assert row["class"] == columns["class"][i]
        # the shares are the analysis's (normalised, per dimension), as rel_norm is, not the raw norms'
        assert row["decoder_share"] == {"base": columns["norm.base"][i], "chat": columns["norm.chat"][i]}
        assert row["decoder_share"]["chat"] == pytest.approx(row["rel_norm"], abs=1e-6)


def test_the_batches_are_filed_under_the_first_sources_model_and_layer_unless_named(artifacts, tmp_path,  # noqa: F811
                                                                                    capsys):
    """Neuronpedia's model_id and layer default to the export's first source (they were "" and 0,
    which files every crosscoder's dashboards under no model)."""
    *_, run = artifacts
    named = Path(shutil.copytree(run, tmp_path / "named"))
    config = json.loads((named / "crosscoder" / "config.json").read_text())
    config["source_models"] = {"base": {"model": "HuggingFaceTB/SmolLM2-135M", "hook": "model.layers.13"},
                               "chat": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "hook": "model.layers.13"}}
    (named / "crosscoder" / "config.json").write_text(json.dumps(config))
    data = str(run.parent / "shards")
    for flags, expected in (([], ("smollm2-135m", 13)), (["--model-id", "gemma-2-2b", "--layer", "0"], ("gemma-2-2b", 0))):
        out = tmp_path / f"np{len(flags)}"
        assert main(["export", str(named), "--format", "neuronpedia", "--data", data, "--out", str(out), "--quiet",
                     *flags]) == 0
        assert capsys.readouterr().out.strip().endswith(
            f"; model_id {expected[0]!r}, layer {expected[1]}, sae_set 'named' (--model-id, --layer, --sae-set)")
        batch = json.loads((out / "batch-0.json").read_text())
        assert (batch["model_id"], batch["layer"], batch["sae_set"]) == (*expected, "named")
    # planted data names no model: no model_id is made up
    assert main(["export", str(run), "--format", "neuronpedia", "--data", data, "--out", str(tmp_path / "bare"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "bare" / "batch-0.json").read_text())["model_id"] == ""


def test_dashboards_refuse_other_shards_and_an_unanalysed_run(artifacts, tmp_path):  # noqa: F811
    *_, run = artifacts
    from crosscoder.config import SyntheticConfig
    from crosscoder.dashboard import export_dashboards
    from crosscoder.synthetic import write_synthetic

    other = tmp_path / "other"
    write_synthetic(SyntheticConfig(widths=[48, 48], tokens=2_000, seq_len=64, samples_per_shard=16, seed=9),
                    str(other), progress=False)
    with pytest.raises(AnalysisError, match="not the ones .* analysed"):
        export_dashboards(run, Root(str(other)), tmp_path / "out", progress=False)
    bare = tmp_path / "bare"
    (bare / "crosscoder").mkdir(parents=True)
    with pytest.raises(AnalysisError, match="top_activations.npz is missing: analyse the run first"):
        export_dashboards(bare, Root(str(other)), tmp_path / "out", progress=False)
    # trained further after its analysis: the examples would be an earlier dictionary's (this summary predates
    # the recorded trained_steps: the files' times tell)
    moved_on = tmp_path / "moved-on"
    shutil.copytree(run, moved_on)
    weights = moved_on / "crosscoder" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, (moved_on / "analysis" / "top_activations.npz").stat().st_mtime_ns
                          + 10**9))
    with pytest.raises(AnalysisError, match=r"analysis predates .*moved-on/crosscoder \(trained further since\): "
                                            r"analyse the run again first"):
        export_dashboards(moved_on, Root(str(other)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
