"""The Hugging Face Hub (hub.py), offline, through huggingface_hub itself.

No network here, so the Hub's side is what huggingface_hub does without one: a pull by repo id is
``snapshot_download`` answering from the Hub cache with ``HF_HUB_OFFLINE=1`` (and when the endpoint
refuses connections), from a cache laid out as the library lays it out (checked by the library's
own ``scan_cache_dir``); a push stops with one line when offline or unreachable; what a push
uploads is written by ``--save-to`` and read back with ``ModelCard.load`` and ``from_pretrained``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crosscoder import CrossCoder
from crosscoder.cli import main
from crosscoder.hub import HubError, is_repo_id
from crosscoder.shards import read_manifest
from crosscoder.storage import open_root
from crosscoder.trainer import train

from .conftest import free_port, put_in_hub_cache, small_run_config


@pytest.fixture(scope="module")
def trained_run(small_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("hub") / "run"
    train(small_run_config(steps=16, checkpoint_every=0), run, data=small_shards, progress=False)
    return run


def offline_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **env})


def test_push_save_to_writes_the_export_and_a_model_card_from_the_run(trained_run, small_shards, tmp_path, capsys):
    from huggingface_hub import ModelCard

    out = tmp_path / "staged"
    assert main(["push", str(trained_run), "me/tiny-crosscoder", "--save-to", str(out)]) == 0
    assert "nothing uploaded" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = ModelCard.load(out / "README.md")  # the library parses the metadata header
    facts = card.data.to_dict()["crosscoder"]
    result = json.loads((trained_run / "train_result.json").read_text())
    manifest = read_manifest(open_root(str(small_shards)))
    cfg = small_run_config(steps=16)
    assert card.data.library_name == "crosscoder"
    assert facts["latents"] == cfg.train.latents and facts["k"] == cfg.train.k
    assert facts["tokens_trained"] == 16 * cfg.train.batch_size
    assert facts["dead_fraction"] == pytest.approx(result["last_metrics"]["dead_fraction"])
    assert facts["fve"] == pytest.approx(result["last_metrics"]["fve"])
    assert facts["data_fingerprint"] == manifest.fingerprint()
    for source in manifest.sources:
        assert f"| {source.name} | {source.d} |" in card.text
    staged = CrossCoder.from_pretrained(out)
    exported = load_file(str(trained_run / "crosscoder" / "model.safetensors"))
    for name, tensor in staged.export_tensors([1.0] * staged.spec.n_sources).items():
        torch.testing.assert_close(tensor, exported[name], rtol=0, atol=0)


def test_a_run_shorter_than_the_dead_latent_window_has_its_dead_share_not_counted_on_the_card(small_shards,
                                                                                              tmp_path):
    """No latent can be dead before train.dead_tokens tokens were trained on: the card says so rather
    than 0.00% (which reads as every latent alive), and its metadata holds no number."""
    from huggingface_hub import ModelCard

    cfg = small_run_config(steps=4, checkpoint_every=0)  # 4 × 256 tokens, under the window of 2,000
    train(cfg, tmp_path / "run", data=small_shards, progress=False)
    assert main(["push", str(tmp_path / "run"), "me/short", "--save-to", str(tmp_path / "staged")]) == 0
    card = ModelCard.load(tmp_path / "staged" / "README.md")
    assert card.data.to_dict()["crosscoder"]["dead_fraction"] is None
    assert "dead latents at the end of training: not counted (trained on fewer tokens than train.dead_tokens " \
           "= 2,000" in card.text


def test_pull_by_repo_id_and_revision_from_the_hub_cache_offline(trained_run, tmp_path):
    from huggingface_hub import scan_cache_dir

    staged, other = tmp_path / "main", tmp_path / "v1"
    assert main(["push", str(trained_run), "me/tiny-crosscoder", "--save-to", str(staged)]) == 0
    # a second revision: the same export with every threshold doubled
    model = CrossCoder.from_pretrained(staged)
    with torch.no_grad():
        model.threshold.mul_(2)
    model.save_pretrained(other)
    cache = tmp_path / "hub-cache"
    commits = {rev: put_in_hub_cache(cache, "me/tiny-crosscoder", rev, folder)
               for rev, folder in (("main", staged), ("v1", other))}
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "me/tiny-crosscoder" and {r.commit_hash for r in repo.revisions} == set(commits.values())

    expected = {rev: CrossCoder.from_pretrained(folder).threshold.sum().item()
                for rev, folder in (("main", staged), ("v1", other))}
    code = ("import sys; from crosscoder import CrossCoder\n"
            "for rev in ('main', 'v1'):\n"
            "    m = CrossCoder.from_pretrained('me/tiny-crosscoder', revision=rev)\n"
            "    print(rev, repr(m.threshold.sum().item()), m.spec.latents)\n")
    for env in ({"HF_HUB_OFFLINE": "1"},  # offline mode: the cache answers
                {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}):  # the Hub refuses
        done = offline_python(code, env | {"HF_HUB_CACHE": str(cache)})
        assert done.returncode == 0, done.stderr[-3000:]
        got = {line.split()[0]: float(line.split()[1]) for line in done.stdout.splitlines()}
        assert got == pytest.approx(expected) and expected["v1"] == pytest.approx(2 * expected["main"])

    missing = offline_python("from crosscoder import CrossCoder; CrossCoder.from_pretrained('me/absent')",
                             {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert missing.returncode != 0 and "HubError: me/absent: not in the Hub cache" in missing.stderr


def test_push_without_a_hub_stops_with_one_line(trained_run):
    for env, says in (({"HF_HUB_OFFLINE": "1"}, "cannot push, HF_HUB_OFFLINE is set"),
                      ({"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_TOKEN": "hf_x"},
                       "the Hub cannot be reached")):
        done = subprocess.run([sys.executable, "-m", "crosscoder.cli", "push", str(trained_run), "me/tiny"],
                              capture_output=True, text=True, timeout=180, env={**os.environ, **env})
        assert done.returncode == 1 and done.stderr.startswith(f"crosscoder: HubError: me/tiny: {says}"), done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    # the Python API's push (a whole model, staged from a temporary export) goes the same way
    done = offline_python(f"from crosscoder import CrossCoder\n"
                          f"CrossCoder.from_pretrained({str(trained_run / 'crosscoder')!r}).push_to_hub('me/tiny')",
                          {"HF_HUB_OFFLINE": "1"})
    assert "crosscoder.hub.HubError: me/tiny: cannot push, HF_HUB_OFFLINE is set" in done.stderr, done.stderr


def test_a_run_without_an_export_is_refused_and_repo_ids_are_told_from_paths(tmp_path, monkeypatch):
    with pytest.raises(HubError, match="not a crosscoder export"):
        from crosscoder.hub import stage

        stage(tmp_path / "run" / "crosscoder", tmp_path / "out", "me/x")
    assert is_repo_id("me/x") and is_repo_id("gpt2") and not is_repo_id("./runs/x") and not is_repo_id("a/b/c")
    (tmp_path / "me").mkdir()
    monkeypatch.chdir(tmp_path)
    assert not is_repo_id("me")  # an existing directory is a directory
    with pytest.raises(FileNotFoundError, match="not a crosscoder export"):
        CrossCoder.from_pretrained(tmp_path / "nowhere" / "x")


def test_an_export_loaded_and_saved_again_is_the_same_export(trained_run, tmp_path):
    """The loaded weights are in raw units already: saving them folds the normalisation no second
    time, and the config keeps the training's scales and records."""
    original = trained_run / "crosscoder"
    model = CrossCoder.from_pretrained(original)
    assert any(abs(c - 1) > 1e-3 for c in model.spec.norm_scale)  # a second fold would show
    model.save_pretrained(tmp_path / "again")
    before, after = load_file(str(original / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads((original / "config.json").read_text())


@pytest.mark.parametrize("held_out", [False, True])
def test_an_analysed_aligned_runs_card_states_its_dictionary_and_what_its_fve_was_measured_on(
        small_shards, tmp_path, held_out, capsys):
    """The card said "latents shared by 2 sources" of the aligned variant (it has one dictionary per
    source) and called the analysis's FVE held-out, though the analysis reads the training data
    unless analyze.data names other shards. It says which, and gives the aligned variant's FVE
    decoding across sources (what the variant is for)."""
    from huggingface_hub import ModelCard

    from .conftest import small_synthetic

    run, data = tmp_path / "run", small_shards
    train(small_run_config(steps=8, checkpoint_every=0, arch="aligned", activation="topk"), run, data=small_shards,
          progress=False)
    if held_out:  # the same sources, another sample of the planted data
        from crosscoder.synthetic import write_synthetic

        data = str(tmp_path / "held-out")
        write_synthetic(small_synthetic(seed=1), data, progress=False)
    assert main(["analyze", str(run), "--analyze.data", data, "--analyze.tokens", "1024", "--quiet"]) == 0
    assert main(["push", str(run), "me/aligned", "--save-to", str(tmp_path / "staged")]) == 0
    text = ModelCard.load(tmp_path / "staged" / "README.md").text
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert "with 96 latents for each of its 2 sources, aligned into one space by an alignment loss" in text
    assert "shared by" not in text and "- k (active latents per token in each source's dictionary): 4" in text
    measured = "1,024 held-out tokens, not of the training data" if held_out else \
        "the analysis's 1,024 tokens, of the training data"
    fve = ", ".join(f"{name} {value:.4f}" for name, value in summary["fve"].items())
    assert f"- fraction of variance explained ({measured}): {fve}\n" in text, text
    across = summary["cross_fve"]
    assert (f"- FVE decoding across sources (latents read at one, decoded at another): base → chat "
            f"{across['base->chat']:.4f}, chat → base {across['chat->base']:.4f}\n") in text, text
    # copied without its file times (cp -r): the export may now look newer than the analysis, but it is the
    # dictionary the analysis describes (the summary records its trained_steps)
    copied = Path(shutil.copytree(run, tmp_path / "copied", copy_function=shutil.copyfile))
    weights = copied / "crosscoder" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, (copied / "analysis" / "summary.json").stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert main(["push", str(copied), "me/aligned", "--save-to", str(tmp_path / "copied-card")]) == 0
    assert "predates" not in capsys.readouterr().out
    assert f"- fraction of variance explained ({measured}): {fve}\n" in \
        ModelCard.load(tmp_path / "copied-card" / "README.md").text
    # trained further since the analysis: its figures are an earlier dictionary's, so the card gives the training's
    assert main(["train", str(run), "--data", small_shards, "--train.steps", "10", "--quiet"]) == 0
    assert main(["push", str(run), "me/aligned", "--save-to", str(tmp_path / "later")]) == 0
    assert f"push: {run}'s analysis predates its crosscoder (trained further since)" in capsys.readouterr().out
    later = ModelCard.load(tmp_path / "later" / "README.md").text
    last = json.loads((run / "train_result.json").read_text())["last_metrics"]["fve"]
    assert "- fraction of variance explained (the last training batch): " + ", ".join(
        f"{name} {value:.4f}" for name, value in last.items()) in later, later
    assert "FVE decoding across sources" not in later and fve not in later
