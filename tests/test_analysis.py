"""Model-diffing analysis: Latent Scaling on planted artifacts, CE loss recovered on a tiny model,
latents.csv and the HTML report (rendered by a real headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from crosscoder.analysis import CSV_COLUMNS, analyze, read_latents_csv, save
from crosscoder.ce_recovered import ce_loss_recovered, describe
from crosscoder.config import AnalyzeConfig, SyntheticConfig
from crosscoder.language_models import ActivationReader
from crosscoder.model import CrossCoder, CrossCoderSpec
from crosscoder.report import write_report
from crosscoder.shards import iter_samples, read_manifest
from crosscoder.storage import Root
from crosscoder.synthetic import CLASSES, read_planted, write_synthetic


def planted_config() -> SyntheticConfig:
    return SyntheticConfig(widths=[48, 48], features=24, shared_fraction=0.5, base_only_fraction=0.125,
                           chat_only_fraction=0.25, rotated_fraction=0.125, strong_fraction=0.0,
                           active_per_token=2.0, noise=0.02, tokens=24_000, seq_len=64, samples_per_shard=64,
                           dtype="float32", seed=3)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Planted shards and a crosscoder built from the planted truth with two artifacts put in.

    Every planted feature gets one latent whose encoder is the pseudo-inverse of the planted
    dictionary (it reads the feature's coefficient) and whose decoder is the feature itself. Then:
    shared feature ``shrunk`` loses its base decoder (Complete Shrinkage: the base error keeps the
    concept), and shared feature ``decoupled`` is split into a chat-only latent and an extra
    base-only latent that fire together (Latent Decoupling: the base reconstruction keeps it).
    """
    cfg = planted_config()
    data = tmp_path_factory.mktemp("planted") / "shards"
    write_synthetic(cfg, str(data), progress=False)
    root = Root(str(data))
    manifest, planted = read_manifest(root), read_planted(root)
    truth = np.concatenate([planted.directions[s] * planted.magnitudes[:, s : s + 1] for s in range(2)], 1)
    F, D = truth.shape
    shared = [i for i, c in enumerate(planted.classes) if CLASSES[c] == "shared"]
    shrunk, decoupled = shared[0], shared[1]
    W_dec = np.concatenate([truth, np.zeros((1, D))])  # latent F: the decoupled base half
    W_enc = np.linalg.pinv(truth)  # [D, F]
    W_enc = np.concatenate([W_enc, W_enc[:, decoupled : decoupled + 1]], 1)
    W_dec[shrunk, :48] = 0
    W_dec[F, :48] = truth[decoupled, :48]
    W_dec[decoupled, :48] = 0
    spec = CrossCoderSpec(sources=["base", "chat"], widths=[48, 48], latents=F + 1, activation="relu",
                          norm_scale=manifest.norm_scale)
    model = CrossCoder(spec)
    with torch.no_grad():
        model.W_enc.copy_(torch.from_numpy(W_enc).float())
        model.W_dec.copy_(torch.from_numpy(W_dec).float())
        model.b_enc.zero_()
        model.b_dec.zero_()
    result = analyze(model.eval(), root, AnalyzeConfig(tokens=20_000, top_examples=5), progress=False)
    run = data.parent / "run"
    model.save_pretrained(run / "crosscoder", norm_scale=[1.0, 1.0])  # already in raw units
    save(result, run / "analysis")
    return planted, shrunk, decoupled, F, result, run


def test_latent_scaling_flags_shrinkage_and_decoupling_but_not_genuine_exclusive_latents(artifacts):
    planted, shrunk, decoupled, extra, result, _ = artifacts
    c = result.columns
    assert c["class"][shrunk] == "chat_only" and c["class"][decoupled] == "chat_only"
    assert c["class"][extra] == "base_only"
    assert c["nu_error"][shrunk] > 0.8 and c["nu_recon"][shrunk] < 0.2, (c["nu_error"][shrunk], c["nu_recon"][shrunk])
    assert c["artifact"][shrunk] == "complete_shrinkage"
    for latent in (decoupled, extra):
        assert c["nu_recon"][latent] > 0.8 and c["nu_error"][latent] < 0.2, latent
        assert c["artifact"][latent] == "latent_decoupling"
    genuine = [i for i, k in enumerate(planted.classes) if CLASSES[k] in ("chat_only", "base_only")]
    assert len(genuine) >= 6
    for i in genuine:
        assert c["class"][i] == CLASSES[planted.classes[i]], i
        assert abs(c["nu_error"][i]) < 0.2 and abs(c["nu_recon"][i]) < 0.2, (i, c["nu_error"][i], c["nu_recon"][i])
        assert c["artifact"][i] == ""
    # the owner's betas are the reference scale: ≈ 1 for these exactly fitted latents
    assert abs(c["beta_error_chat"][shrunk] - 1) < 0.1 and abs(c["beta_recon_base"][extra] - 1) < 0.1
    counts = result.artifact_counts()
    assert counts["chat_only"]["flagged"] == 2 and counts["base_only"]["flagged"] == 1


def test_relative_norms_do_not_lean_toward_the_wider_source(tmp_path):
    """Scaling transfer, widths 32 and 128: a planted concept as strong in both sources (the same
    share of each one's variance) has rel_norm 0.5, not the 0.67 that normalised units give (decoder
    norms in the ratio √(128/32)); each planted class is found. score_recovery agrees."""
    from crosscoder.synthetic import score_recovery

    cfg = SyntheticConfig(widths=[32, 128], features=16, shared_fraction=0.5, base_only_fraction=0.25,
                          chat_only_fraction=0.25, rotated_fraction=0.0, strong_fraction=0.0, active_per_token=2.0,
                          noise=0.0, tokens=4096, seq_len=64, samples_per_shard=64, dtype="float32", seed=5)
    write_synthetic(cfg, str(tmp_path / "shards"), progress=False)
    root = Root(str(tmp_path / "shards"))
    manifest, planted = read_manifest(root), read_planted(root)
    truth = np.concatenate([planted.directions[s] * planted.magnitudes[:, s : s + 1] for s in range(2)], 1)
    model = CrossCoder(CrossCoderSpec(["base", "chat"], [32, 128], latents=16, activation="relu",
                                      norm_scale=manifest.norm_scale))
    with torch.no_grad():
        model.W_enc.copy_(torch.from_numpy(np.linalg.pinv(truth)).float())
        model.W_dec.copy_(torch.from_numpy(truth).float())
        model.b_enc.zero_()
        model.b_dec.zero_()
    result = analyze(model.eval(), root, AnalyzeConfig(tokens=4096, ce_sequences=0), progress=False)
    classes = [CLASSES[c] for c in planted.classes]
    shared = np.array([c == "shared" for c in classes])
    rel = result.columns["rel_norm"]
    assert np.abs(rel[shared] - 0.5).max() < 0.05, rel[shared]
    assert list(result.columns["class"]) == [{"base_only": "base_only", "chat_only": "chat_only"}.get(c, "shared")
                                             for c in classes]
    recovery = score_recovery(truth, [32, 128], planted, cfg.raw_scale, manifest.norm_scale)
    np.testing.assert_allclose(recovery.rel_norm, rel, atol=1e-5)


def test_latents_csv_round_trips_and_report_renders_in_chromium(artifacts, tmp_path):
    *_, result, _ = artifacts
    save(result, tmp_path)
    back = read_latents_csv(tmp_path / "latents.csv")
    # the fixed columns, then each source's share of the decoder norm and the sources a latent decodes into
    assert set(back) == set(CSV_COLUMNS) | {"norm.base", "norm.chat", "present"}
    assert len(back["index"]) == len(result.classes)
    np.testing.assert_allclose(back["norm.chat"], result.columns["rel_norm"], rtol=1e-5)  # two sources: the same
    np.testing.assert_allclose(back["rel_norm"], result.columns["rel_norm"], rtol=1e-5)
    assert list(back["artifact"]) == list(result.columns["artifact"])
    report = write_report(result, tmp_path / "report.html")
    text = report.read_text()
    assert text.count("data:image/png;base64,") == 5
    for heading in ("Relative decoder norm", "Latent Scaling of exclusive latents", "Token attribution",
                    "Max-activating examples", "complete_shrinkage"):
        assert heading in text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed for this test (.ci/run installs it)"
    shot = tmp_path / "report.png"
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2400, 1200)
    # the plots are drawn: many distinct colours, and not a blank page
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200
    assert (image.mean(-1) < 200).mean() > 0.02


def test_ce_loss_recovered_is_one_for_a_perfect_reconstruction_and_zero_for_zero_ablation():
    from crosscoder import random_pair

    tok = random_pair.make_tokenizer()
    lm = random_pair.make_model(len(tok), hidden=32, layers=3)
    # a model that has learned something (count upwards through the vocabulary), so that the
    # clean loss is far below the zero-ablated one
    V = len(tok) - 7
    start = torch.randint(0, V, (16, 1))
    ids = 7 + (start + torch.arange(20)) % V
    ids[:, 0] = tok.bos_token_id
    # untrained, the model barely uses the layer: the ratio is not a score, and says so
    (act,) = ActivationReader(lm, ["model.layers.1"]).read(ids)
    untrained = ce_loss_recovered(lm, ids, "model.layers.1", act[:, 1:] * 0.5, start=1)
    assert not untrained.meaningful
    gap = untrained.zero_ablated - untrained.clean
    assert (f"not meaningful: zero-ablating the hooked activation moves the loss by {gap:+.4f} of "
            f"{untrained.clean:.3f} nats, not the rise of at least 1% that makes the ratio a score") in describe(
        vars(untrained) | {"recovered": untrained.recovered})
    # a fall is no rise either, and is said as a fall
    fell = {"clean": 4.5, "spliced": 4.4, "zero_ablated": 4.2, "recovered": 1.0 / 3}
    assert "moves the loss by -0.3000 of 4.500 nats, not the rise" in describe(fell)
    lm.train()
    optimizer = torch.optim.Adam(lm.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        lm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    lm.eval()
    (act,) = ActivationReader(lm, ["model.layers.1"]).read(ids)
    perfect = ce_loss_recovered(lm, ids, "model.layers.1", act[:, 1:], start=1)
    assert abs(perfect.recovered - 1) < 1e-4 and abs(perfect.spliced - perfect.clean) < 1e-4
    assert perfect.zero_ablated > perfect.clean + 1  # zero-ablating a middle layer hurts
    assert perfect.meaningful and describe(vars(perfect) | {"recovered": perfect.recovered}) == "1.000"
    zero = ce_loss_recovered(lm, ids, "model.layers.1", torch.zeros_like(act[:, 1:]), start=1)
    assert abs(zero.recovered) < 1e-6
    noisy = ce_loss_recovered(lm, ids, "model.layers.1", act[:, 1:] + 1.5 * act[:, 1:].std() * torch.randn_like(act[:, 1:]),
                              start=1)
    assert zero.recovered < noisy.recovered < perfect.recovered - 1e-3  # a worse reconstruction recovers less
    with pytest.raises(ValueError, match="does not fit"):
        ce_loss_recovered(lm, ids, "model.layers.1", act[:, 2:], start=1)


def test_analyze_without_an_export_names_the_missing_file(tmp_path):
    """One line, before the analysis says which device it chose (it said so first)."""
    (tmp_path / "nothing").mkdir()  # a run directory, not trained (none at all: the test below)
    proc = subprocess.run([sys.executable, "-m", "crosscoder.cli", "analyze", "--run", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"crosscoder: AnalysisError: {tmp_path / 'nothing' / 'crosscoder'}: "
                                                f"no crosscoder export; train first (crosscoder train --run "
                                                f"{tmp_path / 'nothing'})"], proc.stderr


def test_compare_prints_exclusive_latents_and_flags_per_run(artifacts, capsys):
    from crosscoder.cli import main

    *_, run = artifacts
    proc = subprocess.run([sys.executable, "-m", "crosscoder.cli", "compare", str(run), str(run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.strip().splitlines()
    assert "chat-only" in header and "shrinkage" in header and len(rows) == 2
    cells = rows[0].split()
    # relu, 25 latents, chat-only: the 6 planted + shrunk + decoupled, 1 shrinkage, 1 decoupling, 6 kept
    assert cells[1:] == ["relu", "25", "0", cells[4], "8", "1", "1", "6", "4", "1"], rows[0]
    assert "older than the crosscoder" not in proc.stdout
    # trained further since its analysis (`crosscoder train --train.steps` alone): said, not shown as current
    weights, summary = run / "crosscoder" / "model.safetensors", run / "analysis" / "summary.json"
    then = weights.stat()
    try:
        os.utime(weights, ns=(then.st_atime_ns, summary.stat().st_mtime_ns + 10**9))
        assert main(["compare", str(run)]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == (
            f"older than the crosscoder it describes: the analysis of {run} (trained further since); "
            "`crosscoder analyze RUN` redoes it")
    finally:
        os.utime(weights, ns=(then.st_atime_ns, then.st_mtime_ns))  # the fixture's run, as the other tests see it
    (run.parent / "not-analysed").mkdir(exist_ok=True)
    missing = subprocess.run([sys.executable, "-m", "crosscoder.cli", "compare", str(run.parent / "not-analysed")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr.strip() == (
        f"crosscoder: AnalysisError: {run.parent / 'not-analysed' / 'analysis' / 'summary.json'} is missing; run "
        f"`crosscoder analyze --run {run.parent / 'not-analysed'}` first")


@pytest.mark.parametrize("command", [["compare", "{run}"], ["analyze", "--run", "{run}"], ["analyze", "{run}"],
                                     ["export", "{run}"],
                                     ["export", "--run", "{run}", "--format", "neuronpedia"],
                                     ["push", "{run}", "me/name"]])
def test_a_run_directory_that_does_not_exist_is_one_line_and_is_not_made(tmp_path, capsys, command):
    """A typo in the run directory: it was a message about a missing summary or export (suggesting to
    analyse or train the typo) and, for `analyze`, a directory made for its lock."""
    from crosscoder.cli import main

    run = tmp_path / "runs" / "typo"
    assert main([arg.format(run=run) for arg in command]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"crosscoder: NoRunDirectory: {run}: no such run directory (`crosscoder run` or `crosscoder train` "
                   "makes one, under runs/<name> by default)"], err
    assert not run.exists() and not run.parent.exists()


def test_compare_names_a_summary_it_cannot_read(tmp_path, capsys):
    """A summary.json from another version (or cut short) was a KeyError traceback."""
    from crosscoder.cli import main

    (tmp_path / "old" / "analysis").mkdir(parents=True)
    (tmp_path / "old" / "analysis" / "summary.json").write_text('{"latents": 64}')
    assert main(["compare", str(tmp_path / "old")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crosscoder: AnalysisError: ")
    assert "summary.json is not an analysis summary this version reads (KeyError: 'artifacts'); " \
        f"run `crosscoder analyze --run {tmp_path / 'old'}` again" in err[0], err


@pytest.mark.parametrize("command", [["compare", "{run}"],
                                     ["export", "{run}", "--format", "neuronpedia", "--data", "{data}"],
                                     ["push", "{run}", "me/name"]])
def test_a_summary_cut_short_beside_its_export_is_named_and_the_analysis_is_redone(artifacts, tmp_path, capsys,
                                                                                  command):
    """A summary.json that is not JSON (a write cut short, an edit) beside the run's export: `compare`,
    the Neuronpedia export and `push` each ended in a JSONDecodeError traceback (reading it for
    staleness), and `crosscoder run` too. Now each names the file and the command that writes it again,
    and a re-run takes the run as not analysed (it redoes the analysis)."""
    from crosscoder.analysis import is_analysed
    from crosscoder.cli import main

    *_, analysed = artifacts
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    (run / "analysis" / "report.html").write_text("<html></html>")  # the fixture writes no report; a run's has one
    assert is_analysed(run)
    summary = run / "analysis" / "summary.json"
    summary.write_text(summary.read_text()[:100])
    assert not is_analysed(run)
    assert main([arg.format(run=run, data=analysed.parent / "shards") for arg in command]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"crosscoder: AnalysisError: {summary}: not a readable analysis "
                                               "summary ("), err
    assert err[0].endswith(f"); `crosscoder analyze {run}` writes it again"), err


def test_a_latents_table_cut_short_or_edited_is_named_by_line_and_column(artifacts, tmp_path, capsys):
    """latents.csv cut short mid-line was a TypeError traceback from the Neuronpedia export; one that
    is not a latents table, or cut at a line's end, exported 0 or fewer dashboards without a word; the
    top activations cut short, a BadZipFile traceback."""
    from crosscoder.analysis import read_latents_csv
    from crosscoder.cli import main
    from crosscoder.errors import AnalysisError

    *_, analysed = artifacts
    run = tmp_path / "run"
    shutil.copytree(analysed, run)
    table = run / "analysis" / "latents.csv"
    lines = table.read_text().splitlines(keepends=True)
    again = re.escape(f"(the file was cut short or edited); `crosscoder analyze {run}` writes it again")
    table.write_text("".join(lines[:2]) + lines[2].split(",")[0])  # its index alone
    with pytest.raises(AnalysisError, match=rf"{table}: line 3 ends before column 'frequency' {again}"):
        read_latents_csv(table)
    fields = lines[1].split(",")
    table.write_text(lines[0] + ",".join([fields[0], "abc", *fields[2:]]))
    with pytest.raises(AnalysisError, match=rf"{table}: line 2, column 'frequency': 'abc' is not a number {again}"):
        read_latents_csv(table)
    table.write_text("garbage\n")
    with pytest.raises(AnalysisError, match=rf"{table}: not a latents table \(no column index, class\)"):
        read_latents_csv(table)
    table.write_text("".join(lines[:5]))
    assert main(["export", str(run), "--format", "neuronpedia", "--data", str(analysed.parent / "shards")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"crosscoder: AnalysisError: {table}: 4 latents, the crosscoder has {len(lines) - 1} (the file was "
                   f"cut short); `crosscoder analyze {run}` writes it again"], err
    # the top activations cut short (a zip without its directory): a BadZipFile traceback
    table.write_text("".join(lines))
    top = run / "analysis" / "top_activations.npz"
    top.write_bytes(top.read_bytes()[:200])
    assert main(["export", str(run), "--format", "neuronpedia", "--data", str(analysed.parent / "shards")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"crosscoder: AnalysisError: {top}: not a readable top-activations archive (BadZipFile: File is not "
                   f"a zip file); `crosscoder analyze {run}` writes it again"], err


def test_streamed_fve_equals_fve_of_all_analysed_tokens_at_once(artifacts):
    """The analysis streams batches; its FVE must be the one-shot FVE of the same tokens (the
    variance taken around each dimension's mean, not one scalar mean)."""
    from crosscoder.metrics import fve_per_source
    from crosscoder.shards import iter_samples

    *_, result, run = artifacts
    model = CrossCoder.from_pretrained(run / "crosscoder")
    root = Root(str(run.parent / "shards"))
    acts = np.concatenate([s.acts for s in iter_samples(root)])[: result.tokens]
    x = torch.from_numpy(acts).float()
    expected = fve_per_source(x, model.reconstruct(x), model.spec.slices)
    got = torch.tensor([result.fve["base"], result.fve["chat"]], dtype=torch.float32)
    assert torch.allclose(got, expected, atol=1e-4), (got, expected)


def test_base_only_latents_firing_on_special_tokens_are_labelled_untrained_tokens():
    from crosscoder.analysis import untrained_token_labels

    cls = np.array(["base_only", "base_only", "chat_only", "shared", "base_only"], dtype=object)
    share = np.array([0.9, 0.2, 0.95, 0.99, np.nan])
    artifact = np.array(["latent_decoupling", "", "", "", ""], dtype=object)
    out = untrained_token_labels(cls, share, artifact)
    assert list(out) == ["latent_decoupling+untrained_tokens", "", "", "", ""]
    assert list(artifact) == ["latent_decoupling", "", "", "", ""]  # the input is not modified


def test_latents_firing_mostly_on_special_tokens_are_counted_per_class_with_those_kept():
    from crosscoder.analysis import Analysis
    from crosscoder.report import render

    cls = np.array(["chat_only", "chat_only", "chat_only", "base_only", "shared", "shared", "dead"], dtype=object)
    share = np.array([0.9, 0.7, 0.1, 0.8, 0.6, 0.5, np.nan])
    artifact = np.array(["", "latent_decoupling", "", "untrained_tokens", "", "", ""], dtype=object)
    columns = {c: np.full(len(cls), np.nan) for c in CSV_COLUMNS}
    columns.update({"class": cls, "special_share": share, "artifact": artifact, "index": np.arange(len(cls)),
                    "frequency": np.where(cls == "dead", 0.0, 0.1), "rel_norm": np.full(len(cls), 0.5),
                    "cosine": np.full(len(cls), 0.9)})
    analysis = Analysis(("base", "chat"), 100, columns, {"base": 0.9, "chat": 0.9}, {}, {})
    counts = analysis.special_token_counts()
    assert counts == {"chat_only": {"latents": 3, "mostly_special": 2, "kept_mostly_special": 1},
                      "base_only": {"latents": 1, "mostly_special": 1, "kept_mostly_special": 0},
                      "shared": {"latents": 2, "mostly_special": 1}}
    assert analysis.summary()["special_tokens"] == counts
    page = render(analysis)
    assert "mostly on special tokens" in page and "<td>shared</td><td>2</td><td>1</td><td>—</td>" in page
    # where Latent Scaling did not run (aligned, unequal widths), nothing is counted as kept by it
    analysis.scaling_skipped = "it needs sources of equal width"
    assert analysis.special_token_counts()["chat_only"] == {"latents": 3, "mostly_special": 2}
    page = render(analysis)
    assert "mostly on special tokens" in page and "kept by Latent Scaling" not in page
    analysis.scaling_skipped = ""
    # a CE loss recovered that is not a score gives the gap in the report too, a fall as a fall
    analysis.ce_recovered = {"chat": {"clean": 4.508, "spliced": 4.49, "zero_ablated": 4.5011, "recovered": -1.5}}
    assert ("CE loss recovered chat</td><td>-1.5000 (clean 4.508, spliced 4.490, zero-ablated 4.501 nats); not "
            "meaningful: zero-ablating the hooked activation moves the loss by -0.0069 of 4.508 nats, not the rise "
            "of at least 1% that makes the ratio a score") in render(analysis)
    analysis.ce_recovered = {}
    columns["special_share"] = np.full(len(cls), np.nan)  # shards without a tokenizer: nothing to count
    assert analysis.special_token_counts() == {} and "mostly on special tokens" not in render(analysis)


def test_the_fve_and_ce_plot_spans_every_value_and_says_which_ce_is_not_a_score():
    """A CE loss recovered below 0 (a reconstruction worse than zero-ablation) is drawn below 0, not
    cut off at the axis; one that is not a score (an untrained model: 5.5 here) is not drawn as a bar
    (it was, cut off at the top, where it looked like a perfect reconstruction) but said in its place."""
    from crosscoder.analysis import Analysis
    from crosscoder.report import fve_and_ce_figure

    ce = {"base": {"clean": 3.0, "spliced": 5.8, "zero_ablated": 5.0, "recovered": -0.4},
          "chat": {"clean": 4.509, "spliced": 4.508, "zero_ablated": 4.5092, "recovered": 5.5}}
    analysis = Analysis(("base", "chat"), 100, {}, {"base": 0.9, "chat": 0.8}, {}, {}, ce_recovered=ce)
    ax = fve_and_ce_figure(analysis).axes[0]
    assert sorted(round(bar.get_height(), 3) for bar in ax.patches) == [-0.4, 0.8, 0.9]
    low, high = ax.get_ylim()
    assert low < -0.4 and high > 0.9
    said = [text.get_text() for text in ax.texts]
    assert {"-0.400", "0.900", "0.800"} <= set(said) and not any("5.5" in text for text in said)
    assert sum("not meaningful" in text for text in said) == 1
    # four model@hook names side by side would run into each other: each breaks before its hook
    fve = {f"{m}@model.layers.{i}": 0.9 for m in ("base", "chat") for i in (0, 1)}
    ax = fve_and_ce_figure(Analysis(("base@model.layers.0", "chat@model.layers.0"), 100, {}, fve, {}, {})).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [n.replace("@", "\n@") for n in fve]


def test_the_latent_scaling_plot_shows_the_exclusive_latents_or_says_there_are_none():
    """The ν_ε/ν_r scatter draws every exclusive latent with finite ν; with none (the demo's run), the
    axes say so instead of standing empty."""
    from crosscoder.analysis import Analysis
    from crosscoder.report import latent_scaling_figure

    cls = np.array(["chat_only", "chat_only", "base_only", "shared", "dead"], dtype=object)
    columns = {"class": cls, "nu_error": np.array([0.1, 0.8, np.nan, 0.2, np.nan]),
               "nu_recon": np.array([0.05, 0.4, 0.3, 0.1, np.nan])}
    analysis = Analysis(("base", "chat"), 100, columns, {"base": 0.9, "chat": 0.9}, {}, {})
    ax = latent_scaling_figure(analysis).axes[0]
    points = np.concatenate([dots.get_offsets() for dots in ax.collections])
    assert sorted(map(tuple, points.tolist())) == [(0.1, 0.05), (0.8, 0.4)]  # the chat-only pair; no NaN, no shared
    assert not [text for text in ax.texts if "latents to scale" in text.get_text()]
    columns["class"] = np.array(["shared"] * 4 + ["dead"], dtype=object)
    ax = latent_scaling_figure(analysis).axes[0]
    assert [text.get_text() for text in ax.texts] == ["no base-only or chat-only latents to scale"]
    long_names = Analysis(("base@model.layers.0", "chat@model.layers.0"), 100, columns, {}, {}, {})
    (said,) = [text.get_text() for text in latent_scaling_figure(long_names).axes[0].texts]
    assert said.replace("\n", " ") == "no base@model.layers.0-only or chat@model.layers.0-only latents to scale"
    assert max(map(len, said.splitlines())) <= 46  # wrapped inside the axes


def test_chunk_starts_are_left_out_of_the_examples_unless_asked_for(artifacts, tmp_path):
    """The first stored position of a chunk is an attention sink with outlier norms; here every
    chunk's first token is made 20 times larger, so with chunk starts kept they take every example
    (an example whose activating token is its chunk's first has position 0), and left out (the
    default) none does, and the report says how many were left out."""
    from crosscoder.shards import ShardWriter, shard_name

    _, _, _, _, _, run = artifacts
    source = Root(str(run.parent / "shards"))
    manifest = read_manifest(source)
    loud = Root(str(tmp_path / "loud"))
    infos = []
    for n, info in enumerate(manifest.shards):
        writer = ShardWriter(loud, shard_name(n), width=manifest.width, dtype=manifest.dtype)
        for sample in iter_samples(source, type(manifest)(**{**manifest.__dict__, "shards": [info]})):
            acts = sample.acts.copy()
            acts[0] *= 20
            writer.add(sample.key, sample.tokens, acts, sample.meta)
        infos.append(writer.commit())
    from crosscoder.shards import write_manifest

    write_manifest(loud, type(manifest)(**{**manifest.__dict__, "shards": infos}))
    model = CrossCoder.from_pretrained(run / "crosscoder")
    kept = analyze(model, loud, AnalyzeConfig(tokens=20_000, top_examples=5, chunk_starts=True), progress=False)
    left_out = analyze(model, loud, AnalyzeConfig(tokens=20_000, top_examples=5), progress=False)
    starts_kept = [e.position == 0 for rows in kept.examples.values() for e in rows]
    starts_left = [e.position == 0 for rows in left_out.examples.values() for e in rows]
    assert starts_kept and sum(starts_kept) > 0.8 * len(starts_kept)
    assert starts_left and not any(starts_left)
    assert any("chunk-start positions" in note for note in left_out.notes)
    assert not any("chunk-start positions" in note for note in kept.notes)


@pytest.mark.parametrize("arch", ["acausal", "aligned"])
def test_three_sources_get_a_profile_per_source_and_aligned_runs_a_cross_layer_table(tmp_path, arch, capsys):
    """Three layers of one model (a cross-layer run): latents.csv gets each source's share of the
    decoder norm and the sources a latent decodes into, the report a profile heatmap and names the
    pairwise classes by source, and the aligned variant a cross-layer FVE table (from -> to). The
    command's summary line names the classes by source too, and says when Latent Scaling did not run."""
    from crosscoder.config import RunConfig
    from crosscoder.shards import Manifest, ShardWriter, SourceInfo, shard_name, write_manifest
    from crosscoder.trainer import train

    rng = np.random.default_rng(0)
    features = rng.standard_normal((24, 48)).astype(np.float32)
    root = Root(str(tmp_path / "shards"))
    infos = []
    for n in range(4):
        writer = ShardWriter(root, shard_name(n), width=48, dtype="float32")
        for i in range(8):
            codes = rng.random((64, 24)) * (rng.random((64, 24)) < 0.1)
            writer.add(f"{n:04d}{i:04d}-0000", np.arange(64, dtype=np.int32), (codes @ features).astype(np.float32), {})
        infos.append(writer.commit())
    layers = ["layer4", "layer8", "layer12"]
    write_manifest(root, Manifest(sources=[SourceInfo(name, 16) for name in layers], dtype="float32",
                                  seq_len=64, shards=infos))
    cfg = RunConfig(name="layers")
    cfg.train.arch, cfg.train.activation, cfg.train.latents, cfg.train.k = arch, "topk", 64, 4
    cfg.train.batch_size, cfg.train.steps, cfg.train.lr, cfg.train.dead_tokens = 256, 30, 3e-3, 10_000
    result = train(cfg, tmp_path / "run", data=str(tmp_path / "shards"), progress=False)
    analysis = analyze(CrossCoder.from_pretrained(result.export_dir), root, AnalyzeConfig(tokens=2048, ce_sequences=0),
                       progress=False)
    save(analysis, tmp_path / "analysis")
    back = read_latents_csv(tmp_path / "analysis" / "latents.csv")
    shares = np.stack([back[f"norm.{name}"] for name in layers], 1)
    assert np.allclose(shares.sum(1), 1, atol=1e-4)
    live = back["class"] != "dead"
    assert all(set(p.split("+")) <= set(layers) and p for p in back["present"][live])
    assert sum(analysis.present_counts().values()) == int(live.sum())
    text = write_report(analysis, tmp_path / "report.html").read_text()
    assert "Decoder-norm profile over all sources" in text and "layer4-only latents" in text
    assert "base-only" not in text and "chat-only" not in text
    if arch == "aligned":  # no shared latent space: the report says why Latent Scaling did not run, no empty plot
        assert "Not run: it needs one shared latent space (acausal)." in text
        assert "Latent Scaling of exclusive latents" not in text and "complete shrinkage" not in text
        assert set(analysis.cross_fve) == {f"{s}->{t}" for s in layers for t in layers}
        assert "Cross-source mapping" in text
        own = [analysis.cross_fve[f"{s}->{s}"] for s in layers]
        assert np.allclose(own, [analysis.fve[s] for s in layers], atol=1e-6)  # the diagonal is the own FVE
    else:
        assert analysis.cross_fve == {} and "Cross-source mapping" not in text
        assert "Latent Scaling of exclusive latents" in text and "Not run" not in text
    from crosscoder import pipeline

    capsys.readouterr()
    pipeline.analyze(pipeline.plan(cfg, tmp_path / "run", str(tmp_path / "shards")), progress=False)
    line = next(out for out in capsys.readouterr().out.splitlines() if out.startswith("analyze: 2048 tokens;"))
    assert re.search(r"latents shared \d+, layer4-only \d+, layer8-only \d+, dead \d+; ", line), line
    assert "base-only" not in line and "chat-only" not in line
    if arch == "aligned":
        assert "; Latent Scaling not run (it needs one shared latent space (acausal)); inference L0" in line, line
    else:
        assert re.search(r"; Latent Scaling flags \d+ of \d+ layer8-only latents; inference L0", line), line
    # the command's report names the run directory beside the config's name, and which crosscoder it analysed
    page = (tmp_path / "run" / "analysis" / "report.html").read_text()
    assert "<h1>Crosscoder model-diffing report: layers (run)</h1>" in page
    assert f"<tr><td>crosscoder</td><td>{arch}, topk (k 4)</td></tr>" in page
    # `crosscoder compare` names its columns by the compared sources and shows n/a, not 0, for flags never computed
    from crosscoder.cli import main

    assert main(["compare", str(tmp_path / "run")]) == 0
    header, row, *notes = capsys.readouterr().out.strip().splitlines()
    assert header.split() == ["run", "sparsity", "latents", "dead", "min", "FVE", "layer8-only", "shrinkage",
                              "decoupling", "layer8-only", "kept", "layer4-only", "layer4-only", "flagged"], header
    flags = row.split()[6:9] + row.split()[10:]
    if arch == "aligned":
        assert flags == ["n/a"] * 4 and notes == [f"n/a: Latent Scaling did not run for {tmp_path / 'run'} "
                                                  "(it needs one shared latent space (acausal))"], (row, notes)
    else:
        assert all(cell.isdigit() for cell in flags) and notes == [], (row, notes)
    summary = json.loads((tmp_path / "run" / "analysis" / "summary.json").read_text())  # a run of other sources
    (tmp_path / "pair" / "analysis").mkdir(parents=True)
    (tmp_path / "pair" / "analysis" / "summary.json").write_text(json.dumps(summary | {"sources": ["base", "chat"]}))
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "pair")]) == 0
    header, *_, pairs = [line for line in capsys.readouterr().out.strip().splitlines() if not line.startswith("n/a")]
    assert "2nd-only kept" in header and "1st-only flagged" in header and "layer8" not in header, header
    assert pairs == (f"the 1st and 2nd sources each run compares: {tmp_path / 'run'} layer4/layer8; "
                     f"{tmp_path / 'pair'} base/chat"), pairs


def test_ce_loss_recovered_loads_one_model_per_table_with_its_own_dtype(tmp_path):
    """Two sources from one model directory, harvested in float32 and in bfloat16 (a precision
    comparison): each source's CE loss recovered runs through the model its own table loaded,
    so the clean losses differ as the two precisions do; looked up by path, both got one model."""
    from crosscoder.analysis import ce_recovered_for_harvest
    from crosscoder.ce_recovered import next_token_loss
    from crosscoder.language_models import ModelSpec, load_model
    from crosscoder.random_pair import make_model, make_tokenizer
    from crosscoder.random_pair import save as save_model
    from crosscoder.shards import Manifest, ShardWriter, SourceInfo, shard_name, write_manifest

    tok = make_tokenizer()
    path = save_model(make_model(len(tok), hidden=32, layers=2), tok, tmp_path / "model")
    rng = np.random.default_rng(0)
    root = Root(str(tmp_path / "shards"))
    writer = ShardWriter(root, shard_name(0), width=64, dtype="float32")
    for i in range(4):
        writer.add(f"{i:08d}-0000", rng.integers(5, len(tok), 16).astype(np.int32), np.zeros((16, 64), np.float32),
                   {"doc": i, "chunk": 0})
    tables = [{"name": "fp32", "path": path, "dtype": "float32"}, {"name": "bf16", "path": path, "dtype": "bfloat16"}]
    write_manifest(root, Manifest(
        sources=[SourceInfo(t["name"], 32, model=path, hook="model.layers.0") for t in tables], dtype="float32",
        seq_len=16, tokenizer=path, shards=[writer.commit()],
        extra={"harvest": {"models": tables, "prefix": "bos", "complete": True}}))
    crosscoder = CrossCoder(CrossCoderSpec(["fp32", "bf16"], [32, 32], latents=64, activation="topk", k=8))
    out = ce_recovered_for_harvest(crosscoder, root, AnalyzeConfig(ce_sequences=4))
    ids = torch.tensor([[tok.bos_token_id, *s.tokens.tolist()] for s in iter_samples(root, read_manifest(root))])
    for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        reference = next_token_loss(load_model(ModelSpec(name, path, dtype=dtype)), ids)
        assert out[name]["clean"] == pytest.approx(reference, rel=1e-6)
    assert out["fp32"]["clean"] != out["bf16"]["clean"]


def test_ce_loss_recovered_on_documents_shorter_than_seq_len(tmp_path):
    """Short conversations leave no full-length chunk: CE loss recovered then runs the first chunks
    as they are, in batches of equal length, and averages over every next-token prediction (before,
    it returned nothing)."""
    from crosscoder.analysis import ce_recovered_for_harvest
    from crosscoder.ce_recovered import next_token_loss
    from crosscoder.language_models import ModelSpec, load_model
    from crosscoder.random_pair import make_model, make_tokenizer
    from crosscoder.random_pair import save as save_model
    from crosscoder.shards import Manifest, ShardWriter, SourceInfo, shard_name, write_manifest

    tok = make_tokenizer()
    path = save_model(make_model(len(tok), hidden=32, layers=2), tok, tmp_path / "model")
    rng = np.random.default_rng(0)
    root = Root(str(tmp_path / "shards"))
    writer = ShardWriter(root, shard_name(0), width=32, dtype="float32")
    lengths = [9, 12, 12, 5, 7]
    for i, n in enumerate(lengths):
        writer.add(f"{i:08d}-0000", rng.integers(7, len(tok), n).astype(np.int32), np.zeros((n, 32), np.float32),
                   {"doc": i, "chunk": 0})
    write_manifest(root, Manifest(
        sources=[SourceInfo("m", 32, model=path, hook="model.layers.0")], dtype="float32", seq_len=16,
        tokenizer=path, shards=[writer.commit()],
        extra={"harvest": {"models": [{"name": "m", "path": path}], "prefix": "bos", "complete": True}}))
    crosscoder = CrossCoder(CrossCoderSpec(["m"], [32], latents=64, activation="topk", k=8))
    out = ce_recovered_for_harvest(crosscoder, root, AnalyzeConfig(ce_sequences=4))["m"]
    assert out["sequences"] == 4  # the first four chunks; none is full length
    model = load_model(ModelSpec("m", path))
    samples = list(iter_samples(root, read_manifest(root)))[:4]
    losses = [next_token_loss(model, torch.tensor([[tok.bos_token_id, *s.tokens.tolist()]])) for s in samples]
    weights = [len(s.tokens) for s in samples]  # predictions per chunk: its tokens (the BOS predicts the first)
    assert out["clean"] == pytest.approx(np.average(losses, weights=weights), rel=1e-5)
    assert np.isfinite(out["spliced"]) and out["zero_ablated"] != out["clean"]


@pytest.mark.parametrize("layout", ["two models at two hooks", "two models at their own hooks", "one model"])
def test_the_default_pair_is_the_two_models_at_one_hook(tmp_path, layout):
    """A run that reads base and chat at two layers has four sources, model by model (base@l0,
    base@l1, chat@l0, chat@l1). The analysis compared the first two by default: base at two layers, a
    cross-layer comparison, where a model diff was meant. By default it now compares the first source
    with the first of another model at its hook (else of another model; one model's layers: the
    first two), and ``analyze.sources`` still names any pair."""
    from crosscoder.shards import Manifest, ShardWriter, SourceInfo, shard_name, write_manifest

    sources = {"two models at two hooks": [("base@l0", "m/base", "l0"), ("base@l1", "m/base", "l1"),
                                          ("chat@l0", "m/chat", "l0"), ("chat@l1", "m/chat", "l1")],
               "two models at their own hooks": [("small@l0", "m/small", "l0"), ("small@l1", "m/small", "l1"),
                                                ("large@l2", "m/large", "l2")],
               "one model": [("layer4", "m/base", "l4"), ("layer8", "m/base", "l8"), ("layer12", "m/base", "l12")]}
    infos = [SourceInfo(name, 16, model=model, hook=hook) for name, model, hook in sources[layout]]
    expected = {"two models at two hooks": ("base@l0", "chat@l0"), "two models at their own hooks": ("small@l0", "large@l2"),
                "one model": ("layer4", "layer8")}[layout]
    rng = np.random.default_rng(0)
    root = Root(str(tmp_path / "shards"))
    writer = ShardWriter(root, shard_name(0), width=16 * len(infos), dtype="float32")
    for i in range(4):
        writer.add(f"{i:08d}-0000", np.arange(32, dtype=np.int32),
                   rng.standard_normal((32, 16 * len(infos))).astype(np.float32), {})
    write_manifest(root, Manifest(sources=infos, dtype="float32", seq_len=32, shards=[writer.commit()]))
    names = [s.name for s in infos]
    crosscoder = CrossCoder(CrossCoderSpec(names, [16] * len(infos), latents=32, activation="topk", k=4))
    analysis = analyze(crosscoder, root, AnalyzeConfig(ce_sequences=0), progress=False)
    assert analysis.sources == expected
    chosen = analyze(crosscoder, root, AnalyzeConfig(ce_sequences=0, sources=[names[-1], names[0]]), progress=False)
    assert chosen.sources == (names[-1], names[0])
