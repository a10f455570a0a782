"""Harvest through its real components: tiny Llama models saved and loaded by path, a local Ray
cluster with actors, a real S3 protocol server (moto), and the shard format read back."""

import hashlib
import http.server
import json
import os
import re
import shutil
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizer

from crosscoder.config import ConfigError, RunConfig
from crosscoder.documents import DataError, check_same_tokenizer, plan_chunks, read_documents
from crosscoder.harvest import HarvestError, harvest
from crosscoder.language_models import ActivationReader, ModelError, ModelSpec, load_model, load_tokenizer
from crosscoder.random_pair import make_family, make_pair, make_tokenizer, write_documents
from crosscoder.shards import Manifest, ShardInfo, iter_samples, read_manifest, shard_name
from crosscoder.storage import Root, StorageError

from .conftest import free_port, put_in_hub_cache, said

pytestmark = pytest.mark.slow
HOOKS = ["model.layers.1", "model.layers.2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    base, chat = make_pair(d / "models")
    docs = write_documents(d / "docs.jsonl", n_docs=40)
    return {"base": base, "chat": chat, "docs": docs, "dir": d}


def harvest_config(tiny, output, **kw) -> RunConfig:
    cfg = RunConfig(name="harvest-test")
    h = cfg.harvest
    h.models = [{"name": "base", "path": tiny["base"]}, {"name": "chat", "path": tiny["chat"]}]
    h.hooks, h.data, h.output = list(HOOKS), tiny["docs"], output
    h.actors, h.tokens, h.seq_len, h.samples_per_shard, h.batch_size = 2, 500, 16, 6, 4
    for k, v in kw.items():
        setattr(h, k, v)
    return cfg


def direct_activations(path, tokens: list[int], first: bool = True, hooks=HOOKS) -> list[np.ndarray]:
    """Reference: a full forward with output_hidden_states (hidden_states[i+1] = layer i output), a
    document's first chunk behind the BOS (harvest.prefix = "bos"), later chunks with none."""
    model = load_model(ModelSpec("ref", path))
    prefix = [1] if first else []
    out = model(input_ids=torch.tensor([prefix + tokens]), output_hidden_states=True)
    return [out.hidden_states[int(h.rsplit(".", 1)[1]) + 1][0, len(prefix):].numpy() for h in hooks]


def test_early_stop_reads_the_same_activations_as_a_full_forward(tiny):
    model = load_model(ModelSpec("base", tiny["base"]))
    reader = ActivationReader(model, HOOKS, "base")
    ran = []
    handle = model.model.layers[3].register_forward_hook(lambda *a: ran.append(1))
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    acts = reader.read(ids)
    assert ran == []  # layers after the deepest hook never ran
    handle.remove()
    full = model(input_ids=ids, output_hidden_states=True).hidden_states
    for act, layer in zip(acts, (1, 2)):
        assert torch.equal(act, full[layer + 1])


def test_s3_harvest_matches_a_direct_forward_of_both_models(ray_cluster, tiny, s3_bucket):
    endpoint, bucket = s3_bucket
    cfg = harvest_config(tiny, f"s3://{bucket}/acts")
    cfg.storage.endpoint_url = endpoint
    manifest = harvest(cfg, progress=False)
    root = Root(f"s3://{bucket}/acts", endpoint_url=endpoint)
    again = read_manifest(root)
    assert again.to_json() == manifest.to_json()
    assert [s.name for s in again.sources] == [f"{m}@{h}" for m in ("base", "chat") for h in HOOKS]
    assert [s.d for s in again.sources] == [64] * 4 and again.extra["harvest"]["complete"]
    assert [s.name for s in again.shards] == [shard_name(i) for i in range(len(again.shards))]
    assert not [n for n in root.list() if ".tmp-" in n or n.endswith(".part")]
    assert ".output.lock" not in root.list()  # the lease (run_lock.shared_root) is released

    tok = load_tokenizer(tiny["base"])
    plan = plan_chunks(read_documents(tiny["docs"]), tok, tok, 16, 500)
    samples = list(iter_samples(root, again))
    assert len(samples) == len(plan) and sum(len(s.tokens) for s in samples) == again.tokens >= 500
    norm_sum = np.zeros(4)
    assert {c.index == 0 for c in plan[:8]} == {True, False}  # first and later chunks of documents
    for sample, chunk in zip(samples[:8], plan[:8]):
        assert sample.key == f"{chunk.doc:08d}-{chunk.index:04d}"
        assert sample.tokens.tolist() == chunk.tokens.tolist()  # the plan holds int32 arrays
        first = chunk.index == 0
        ref = (direct_activations(tiny["base"], chunk.tokens.tolist(), first)
               + direct_activations(tiny["chat"], chunk.tokens.tolist(), first))
        assert np.allclose(sample.acts.astype(np.float32), np.concatenate(ref, axis=1), atol=2e-3, rtol=2e-3)
    for sample in samples:
        acts = sample.acts.astype(np.float64)
        norm_sum += [np.linalg.norm(acts[:, i * 64 : (i + 1) * 64], axis=1).sum() for i in range(4)]
    expected = np.sqrt(64) / (norm_sum / again.tokens)
    assert np.allclose(again.norm_scale, expected, rtol=1e-3)
    # chat documents went through the template: their token ids contain the role markers
    user = tok.convert_tokens_to_ids("<|user|>")
    assert any(user in s.tokens for s in samples if s.meta["chat"])


def read_all_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.glob("shard-*.tar"))}


def elsewhere_alike(grown: Manifest, fresh: Manifest, grown_at: Path) -> bool:
    """The two manifests' extras are the same but for where each root was written (the harvest
    block's ``output``, which anchors the paths it names: relocation.py), and ``grown``'s says its root."""
    def placeless(extra: dict) -> dict:
        return extra | {"harvest": {k: v for k, v in extra["harvest"].items() if k != "output"}}
    return grown.extra["harvest"]["output"] == str(grown_at) and placeless(grown.extra) == placeless(fresh.extra)


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tiny):
    out = tiny["dir"] / "uninterrupted"
    harvest(harvest_config(tiny, str(out)), progress=False)
    return out


def test_actor_killed_mid_shard_is_replaced_and_the_shard_redone(ray_cluster, tiny, uninterrupted, tmp_path,
                                                                 monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv("CROSSCODER_FAULT", "harvest: shard 1 half")  # crosscoder/faults.py
    monkeypatch.setenv("CROSSCODER_FAULT_MARKER", str(marker))
    out = tmp_path / "acts"
    manifest = harvest(harvest_config(tiny, str(out)), progress=False)
    assert marker.exists()  # an actor really died writing shard 1
    import tempfile

    killed_pid = int(marker.read_text())  # its half-written shard-000001 was swept by the shard written after it
    assert not list(Path(tempfile.gettempdir()).glob(f"shard-000001.tar.{killed_pid}.*"))
    names = [s.name for s in manifest.shards]
    assert names == sorted(set(names)) and len(names) == manifest.extra["harvest"]["planned_shards"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or p.suffix == ".part"]
    assert read_all_bytes(out) == read_all_bytes(uninterrupted)


def test_a_shard_failing_past_its_retries_stops_in_one_line_keeping_the_shards_done(ray_cluster, tiny, uninterrupted,
                                                                                     tmp_path, monkeypatch):
    """harvest.max_retries = 0 and the actor dies writing shard 1: the stop says so in one line (not
    Ray's paragraph), and shard 0 is in the manifest (written only every 60 s before), so the re-run
    keeps it and writes the rest."""
    monkeypatch.setenv("CROSSCODER_FAULT", "harvest: shard 1 half")
    monkeypatch.setenv("CROSSCODER_FAULT_MARKER", str(tmp_path / "killed"))
    out = tmp_path / "acts"
    with pytest.raises(HarvestError, match=r"^shard-000001.tar failed 1 time \(harvest.max_retries = 0\); last: its "
                                           r"actor's process died: killed, out of memory or crashed; the committed "
                                           r"shards are kept: re-run the same command to write the rest$"):
        harvest(harvest_config(tiny, str(out), actors=1, max_retries=0), progress=False)
    kept = read_manifest(Root(str(out)))
    assert [s.name for s in kept.shards] == [shard_name(0)] and not kept.extra["harvest"]["complete"]
    os.utime(out / shard_name(0), (1_000_000_000, 1_000_000_000))
    harvest(harvest_config(tiny, str(out), actors=1), progress=False)
    assert (out / shard_name(0)).stat().st_mtime == 1_000_000_000  # kept, not written again
    assert read_all_bytes(out) == read_all_bytes(uninterrupted)


def test_a_disk_that_refuses_a_shard_stops_the_harvest_at_once(ray_cluster, tiny, uninterrupted, tmp_path,
                                                                monkeypatch):
    """The actor's write of shard 1 fails as on a full disk (ENOSPC, crosscoder/faults.py; once, so a
    retry would pass, as one did before): one line, no retry, the shards done kept."""
    monkeypatch.setenv("CROSSCODER_FAULT", "harvest: shard 1 half")
    monkeypatch.setenv("CROSSCODER_FAULT_KIND", "disk")
    monkeypatch.setenv("CROSSCODER_FAULT_MARKER", str(tmp_path / "full"))
    out = tmp_path / "acts"
    with pytest.raises(HarvestError, match=r"^shard-000001.tar could not be written \(OSError: \[Errno 28\] No space "
                                           r"left on device: .*\); free space \(or raise the quota\) and re-run the "
                                           r"same command: the committed shards are kept$"):
        harvest(harvest_config(tiny, str(out), actors=1), progress=False)
    assert (tmp_path / "full").exists()
    assert [s.name for s in read_manifest(Root(str(out))).shards] == [shard_name(0)]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".output.lock"]


def test_stopped_harvest_rerun_skips_committed_shards_and_writes_the_same_bytes(ray_cluster, tiny, uninterrupted,
                                                                                tmp_path):
    # the state a harvest stopped mid-way leaves: a manifest listing the shards committed so far
    # (one of them since damaged), later shards missing, a temporary file of an unfinished commit
    import json

    out = tmp_path / "acts"
    shutil.copytree(uninterrupted, out)
    manifest = json.loads((out / "manifest.json").read_text())
    planned = len(manifest["shards"])
    manifest["shards"] = manifest["shards"][:3]
    manifest["harvest"]["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    for n in range(3, planned):
        (out / shard_name(n)).unlink()
    damaged = out / shard_name(1)
    damaged.write_bytes(damaged.read_bytes()[:1000])
    (out / f".{shard_name(3)}.tmp-0badc0de").write_bytes(b"partial")
    os.utime(out / shard_name(0), (1_000_000_000, 1_000_000_000))

    harvest(harvest_config(tiny, str(out)), progress=False)
    assert (out / shard_name(0)).stat().st_mtime == 1_000_000_000  # committed and intact: skipped
    assert read_all_bytes(out) == read_all_bytes(uninterrupted)
    final = read_manifest(Root(str(out)))
    assert final.extra["harvest"]["complete"] and len(final.shards) == planned
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


def test_rerun_of_a_finished_harvest_does_no_work(ray_cluster, tiny, uninterrupted, monkeypatch, capsys):
    """Not even tokenizing: a resumed `crosscoder run` on a 100M-token harvest spent minutes planning
    chunks to learn that the harvest was done. The documents' sha256, the settings and the
    tokenization key say so; a missing shard still makes the plan and redoes the shard."""
    import crosscoder.harvest as harvest_module

    def no_plan(*args, **kwargs):
        raise AssertionError("the documents were tokenized again")

    before = {p.name: p.stat().st_mtime_ns for p in uninterrupted.glob("shard-*.tar")}
    with monkeypatch.context() as patched:
        patched.setattr(harvest_module, "plan_chunks", no_plan)
        manifest = harvest(harvest_config(tiny, str(uninterrupted)), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in uninterrupted.glob("shard-*.tar")} == before
    assert manifest.to_json() == read_manifest(Root(str(uninterrupted))).to_json()
    assert "holds this harvest, complete; its documents, tokenizer and settings are unchanged" in capsys.readouterr().out
    with monkeypatch.context() as patched:  # the tokenizer changed: the plan is made (and here refused)
        patched.setattr(harvest_module, "tokenization_key", lambda *tokenizers: "another tokenizer")
        patched.setattr(harvest_module, "plan_chunks", no_plan)
        with pytest.raises(AssertionError, match="tokenized again"):
            harvest(harvest_config(tiny, str(uninterrupted)), progress=False)


def test_the_tokenization_key_changes_with_the_tokenizer_and_not_with_its_place(tiny, tmp_path):
    from crosscoder.documents import tokenization_key

    tok = load_tokenizer(tiny["chat"])
    key = tokenization_key(tok, tok)
    assert key == tokenization_key(load_tokenizer(tiny["base"]), tok)  # the same tokenizer, saved elsewhere
    shutil.copytree(tiny["chat"], tmp_path / "moved")
    assert tokenization_key(load_tokenizer(str(tmp_path / "moved")), tok) == key
    other = make_tokenizer(["alpha", "beta"])  # another vocabulary
    assert tokenization_key(other, tok) not in (key, None)
    templated = load_tokenizer(tiny["chat"])
    templated.chat_template = templated.chat_template.replace("<|end|>", "<|end|>\n")
    assert tokenization_key(tok, templated) != key
    assert tokenization_key(tok, Characters()) is None  # a slow (Python) tokenizer: always planned
    from tokenizers.pre_tokenizers import PreTokenizer

    class Whole:  # a custom pre-tokenizer: Python code inside a fast tokenizer, which no digest sees
        def pre_tokenize(self, text):
            text.split(lambda index, piece: [piece])

    custom = load_tokenizer(tiny["chat"])
    custom.backend_tokenizer.pre_tokenizer = PreTokenizer.custom(Whole())
    assert tokenization_key(custom, custom) is None


class Characters(PreTrainedTokenizer):
    """A slow tokenizer (transformers' Python backend), one token a character."""

    def __init__(self, **kwargs):
        self.ids = {c: i for i, c in enumerate("?abcdefghijklmnopqrstuvwxyz ")}
        super().__init__(unk_token="?", **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.ids)

    def get_vocab(self) -> dict:
        return dict(self.ids)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return list(text)

    def _convert_token_to_id(self, token: str) -> int:
        return self.ids.get(token, 0)

    def _convert_id_to_token(self, index: int) -> str:
        return next(c for c, i in self.ids.items() if i == index)


def test_a_harvest_into_a_root_another_harvest_holds_waits_then_keeps_its_shards(ray_cluster, tiny, uninterrupted,
                                                                                   tmp_path, capsys):
    """A sweep of configs over one dataset starts its harvests at once: the second waited for nothing
    and removed the first's temporary files of commits in flight (so the first's commit failed), then
    both wrote the same shards. Now the second says whom it waits for, touches nothing meanwhile, and
    then keeps what the first committed."""
    import json
    import threading

    from crosscoder.run_lock import shared_output

    out = tmp_path / "acts"
    shutil.copytree(uninterrupted, out)
    manifest = json.loads((out / "manifest.json").read_text())  # the first harvest, mid-way: 3 shards so far
    planned = len(manifest["shards"])
    manifest["shards"], manifest["harvest"]["complete"] = manifest["shards"][:3], False
    (out / "manifest.json").write_text(json.dumps(manifest))
    for n in range(3, planned):
        (out / shard_name(n)).unlink()
    in_flight = out / f".{shard_name(3)}.tmp-0f1ea7"
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    done = threading.Event()
    with shared_output(out, "test"):  # the first harvest, committing
        in_flight.write_bytes(b"a commit in flight")
        threading.Thread(target=lambda: (harvest(harvest_config(tiny, str(out)), progress=False), done.set()),
                         daemon=True).start()
        assert "harvest: waiting for another crosscoder process" in said(capsys, "harvest: waiting", timeout=120)
        assert not done.is_set()
        time.sleep(1.0)
        assert in_flight.exists() and not done.is_set()
        in_flight.unlink()  # the first's commit completes
    assert done.wait(120)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    assert {n: after[n] for n in before} == before  # kept, none rewritten
    assert read_all_bytes(out) == read_all_bytes(uninterrupted)  # and the rest harvested
    assert read_manifest(Root(str(out))).extra["harvest"]["complete"]


def test_a_finished_harvest_is_read_without_writing_anything(ray_cluster, tiny, uninterrupted, tmp_path):
    """A finished dataset may be shared read-only: a re-run (``crosscoder run`` with the same
    [harvest]) checks it by one listing and writes nothing, not even its lock file or the manifest
    (it rewrote the manifest, and checked that the root was writable first)."""
    out = tmp_path / "acts"
    shutil.copytree(uninterrupted, out)
    (out / ".output.lock").unlink(missing_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    manifest = harvest(harvest_config(tiny, str(out)), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert manifest.to_json() == read_manifest(Root(str(out))).to_json()
    (out / shard_name(2)).write_bytes((out / shard_name(2)).read_bytes()[:-10])  # a damaged shard is still redone
    harvest(harvest_config(tiny, str(out)), progress=False)
    assert read_all_bytes(out) == read_all_bytes(uninterrupted)


def test_output_of_another_harvest_is_refused(ray_cluster, tiny, uninterrupted):
    from crosscoder.shards import ShardError

    # the settings that differ are named (a user who lowered harvest.tokens learns why); a setting a
    # harvest cannot grow by is refused before the plan (the next test)
    with pytest.raises(ShardError, match=r"this config \w+; chunks planned = \d+ there, \d+ here; harvest.tokens = 500 "
                                         r"there, 300 here\); a harvest grows in place but does not shrink"):
        harvest(harvest_config(tiny, str(uninterrupted), tokens=300), progress=False)


def test_another_harvests_root_is_refused_before_the_models_are_made_or_the_documents_tokenized(
        ray_cluster, tiny, uninterrupted, tmp_path, monkeypatch, capsys):
    """A setting a harvest cannot grow by (here seq_len, or the models) is refused from the root's
    manifest alone: not after the documents of a large harvest are tokenized, nor after
    `crosscoder run` trained the demo pair (two minutes) for a root it then refuses."""
    import crosscoder.harvest as harvest_module
    from crosscoder.cli import main
    from crosscoder.shards import ShardError

    before = read_all_bytes(uninterrupted)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the documents were tokenized for a root that is refused")

    monkeypatch.setattr(harvest_module, "plan_chunks", no_tokenizing)
    with pytest.raises(ShardError, match=r"holds shards of a different harvest \(fingerprint \w+; "
                                         r"harvest.seq_len = 16 there, 12 here\); use another harvest.output"):
        harvest(harvest_config(tiny, str(uninterrupted), seq_len=12), progress=False)
    run = tmp_path / "run"
    assert main(["run", "--run", str(run), "--data", str(uninterrupted), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"crosscoder: ShardError: {uninterrupted}: holds shards of a different harvest"), err
    assert "harvest.models = " in err and "harvest.demo_pair" in err
    assert err.strip().endswith("; to train on its shards as they are, name them as train.data in a config without "
                                "harvest models (as launch/configs/demo-l1.toml does)"), err
    assert not (run / "tiny").exists()  # the demo pair was not trained
    assert read_all_bytes(uninterrupted) == before


def test_a_larger_harvest_tokens_grows_the_harvest_keeping_its_full_shards(ray_cluster, tiny, uninterrupted, tmp_path,
                                                                           capsys):
    """A larger harvest.tokens plans the same chunks first, then more: the smaller harvest's full
    shards are kept (not rewritten), its partial last shard and the new ones are written, and the
    result is the dataset a harvest of the larger size writes from scratch."""
    out = tmp_path / "acts"
    shutil.copytree(uninterrupted, out)
    smaller = read_manifest(Root(str(out)))
    held, per = smaller.extra["harvest"]["settings"]["n_chunks"], 6
    assert held % per  # the last shard is partial: the larger harvest puts more chunks in it
    for n in range(held // per):
        os.utime(out / shard_name(n), (1_000_000_000, 1_000_000_000))
    grown = harvest(harvest_config(tiny, str(out), tokens=800), progress=False)
    assert [(out / shard_name(n)).stat().st_mtime for n in range(held // per)] == [1_000_000_000] * (held // per)
    assert f"holds the first {held} of the {grown.extra['harvest']['settings']['n_chunks']} chunks planned here" \
        in capsys.readouterr().out
    fresh = harvest(harvest_config(tiny, str(tmp_path / "fresh"), tokens=800), progress=False)
    assert len(grown.shards) > len(smaller.shards)
    assert read_all_bytes(out) == read_all_bytes(tmp_path / "fresh")
    assert grown.norm_scale == fresh.norm_scale and elsewhere_alike(grown, fresh, out)  # settings, plan, complete
    assert read_manifest(Root(str(out))).to_json() == grown.to_json()
    # a training stream that read the smaller manifest meets the rewritten last shard and says why
    from crosscoder.shards import ShardError
    from crosscoder.stream import TokenStream

    stream = TokenStream(Root(str(out)), smaller, batch_size=32, shuffle_samples=4, max_epochs=1)
    with pytest.raises(ShardError, match=rf"{shard_name(held // per)}: \d+ bytes, manifest says \d+ \(truncated or "
                                         r"rewritten\); the dataset's manifest changed since this run read it"):
        list(stream.batches())


def test_a_harvest_grows_only_where_its_plan_starts_with_the_recorded_one():
    """``grows``: how many chunks of this plan the root's harvest holds, or None where this harvest is
    not that one grown (another setting, a plan with other first chunks, fewer chunks)."""
    from crosscoder.documents import Chunk
    from crosscoder.harvest import fingerprint, grows, plan_digest

    plan = [Chunk(d, 0, 0, np.arange(d, d + 8, dtype=np.int32), d % 2 == 0) for d in range(10)]
    settings = {"tokens": 80, "n_chunks": 10, "seq_len": 8}

    def recorded(n: int, **changed) -> dict:
        there = settings | {"tokens": 8 * n, "n_chunks": n} | changed
        return {"fingerprint": fingerprint(there), "settings": there, "plan_sha256": plan_digest(plan[:n])}

    assert grows(recorded(6), settings, plan) == 6
    assert grows(recorded(6, data_sha256="an earlier file"), settings | {"data_sha256": "appended"}, plan) == 6
    assert grows(recorded(10, tokens=75), settings, plan) == 10  # the same plan: harvest.tokens moved in its last chunk
    assert grows(recorded(6, seq_len=16), settings, plan) is None  # another setting
    assert grows(recorded(6) | {"plan_sha256": plan_digest(plan[1:7])}, settings, plan) is None  # other chunks
    assert grows(recorded(6), settings | {"tokens": 40, "n_chunks": 5}, plan[:5]) is None  # fewer: refused
    assert grows({"fingerprint": "old", "settings": recorded(6)["settings"]}, settings, plan) is None  # no plan recorded


def test_documents_appended_to_the_file_grow_the_harvest_and_other_edits_are_refused(ray_cluster, tiny, tmp_path):
    """A harvest of a whole documents file grows when documents are appended (its sha256 differs but
    the plan starts with the same chunks); an edit of a document already harvested is refused."""
    from crosscoder.shards import ShardError

    docs = tmp_path / "docs.jsonl"
    write_documents(docs, n_docs=12)  # the first 12 documents of the 20 below (one random stream)
    everything = dict(data=str(docs), tokens=10**6)
    smaller = harvest(harvest_config(tiny, str(tmp_path / "acts"), **everything), progress=False)
    write_documents(docs, n_docs=20)
    grown = harvest(harvest_config(tiny, str(tmp_path / "acts"), **everything), progress=False)
    assert grown.tokens > smaller.tokens and grown.extra["harvest"]["complete"]
    fresh = harvest(harvest_config(tiny, str(tmp_path / "fresh"), **everything), progress=False)
    assert read_all_bytes(tmp_path / "acts") == read_all_bytes(tmp_path / "fresh")
    assert elsewhere_alike(grown, fresh, tmp_path / "acts")
    lines = docs.read_text().splitlines(keepends=True)
    docs.write_text("".join([lines[1], lines[0]] + lines[2:] + lines[:1]))  # more documents, not appended
    with pytest.raises(ShardError, match=r"sha256 of harvest.data = .* there, .* here; chunks planned = "
                                         r"\d+ there, \d+ here\); use another harvest.output"):
        harvest(harvest_config(tiny, str(tmp_path / "acts"), **everything), progress=False)


def test_a_resume_after_the_tokenization_changed_is_refused_not_mixed(ray_cluster, tiny, uninterrupted, tmp_path,
                                                                    monkeypatch):
    """The same config can plan other chunks (a hub dataset's new revision, a tokenizer update, a
    fix in the tokenization): the manifest records the plan's sha256, and a resume that plans other
    token ids is refused before anything is written. A manifest written before the plan was
    recorded is accepted and gets it."""
    import crosscoder.harvest as harvest_module
    from crosscoder.shards import ShardError

    out = tmp_path / "acts"
    shutil.copytree(uninterrupted, out)
    before = read_all_bytes(out)
    original = harvest_module.plan_chunks

    def retokenized(*args, **kwargs):
        chunks = original(*args, **kwargs)
        chunks[5].tokens = chunks[5].tokens.copy()
        chunks[5].tokens[0] += 1  # one token id of one chunk differs
        return chunks

    monkeypatch.setattr(harvest_module, "plan_chunks", retokenized)
    monkeypatch.setattr(harvest_module, "tokenization_key", lambda *tokenizers: "a fix in the tokenization")
    with pytest.raises(ShardError, match=r"holds shards of this config but of another chunk plan \(plan [0-9a-f]{12}…, "
                                         r"now [0-9a-f]{12}…\): the documents, the tokenizer or the tokenization"):
        harvest(harvest_config(tiny, str(out)), progress=False)
    assert read_all_bytes(out) == before
    monkeypatch.setattr(harvest_module, "plan_chunks", original)
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = manifest["harvest"].pop("plan_sha256")
    (out / "manifest.json").write_text(json.dumps(manifest))
    harvest(harvest_config(tiny, str(out)), progress=False)  # an older manifest: accepted, nothing redone
    assert read_all_bytes(out) == before
    assert read_manifest(Root(str(out))).extra["harvest"]["plan_sha256"] == recorded


class FlakyProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def start_flaky_proxy(upstream: str, failures: int):
    """An HTTP proxy in front of the S3 server that answers 503 to the first ``failures`` requests of
    each HTTP method, so listings, reads and uploads (of shards and manifests) all meet errors; it
    logs every request as (method, path)."""
    state: dict = {"left": {}, "failed": 0, "log": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers the uploads' "Expect: 100-continue"

        def log_message(self, *a):
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            parts = []  # the client streams the upload in HTTP chunks
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(parts)

        def _forward(self):
            body = self._body()
            state["log"].append((self.command, self.path))
            if state["left"].setdefault(self.command, failures) > 0:
                state["left"][self.command] -= 1
                state["failed"] += 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("host", "expect", "transfer-encoding")}
            # without a Content-Type urllib sends a form type, and the server would parse the body away
            headers.setdefault("Content-Type", "application/octet-stream")
            req = urllib.request.Request(upstream + self.path, data=body or None, method=self.command, headers=headers)
            try:
                resp = urllib.request.urlopen(req, timeout=30)
                status, headers, data = resp.status, resp.headers, resp.read()
            except urllib.error.HTTPError as e:
                status, headers, data = e.code, e.headers, e.read()
            self.send_response(status)
            for k, v in headers.items():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = FlakyProxy(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


def test_transient_s3_errors_are_retried(ray_cluster, tiny, s3_bucket):
    endpoint, bucket = s3_bucket
    server, state = start_flaky_proxy(endpoint, failures=3)
    try:
        proxy = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = harvest_config(tiny, f"s3://{bucket}/flaky", tokens=200)
        cfg.storage.endpoint_url = proxy
        manifest = harvest(cfg, progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert state["left"].get("PUT") == 0 and state["left"].get("GET") == 0, state  # uploads and reads both failed
    root = Root(f"s3://{bucket}/flaky", endpoint_url=endpoint)
    assert read_manifest(root).extra["harvest"]["complete"]
    for info in manifest.shards:
        assert hashlib.sha256(root.read_bytes(info.name)).hexdigest() == info.sha256


def test_unreachable_endpoint_and_missing_bucket_give_one_clear_error(tiny, s3_server):
    cfg = harvest_config(tiny, "s3://no-such-bucket/acts")
    cfg.storage.endpoint_url = s3_server
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        harvest(cfg, progress=False)
    cfg.storage.endpoint_url = f"http://127.0.0.1:{free_port()}"
    start = time.time()
    with pytest.raises(StorageError, match="cannot reach the object store"):
        harvest(cfg, progress=False)
    assert time.time() - start < 60


def test_object_store_without_credentials_gives_one_clear_error(s3_server, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    root = Root("s3://some-bucket/acts", endpoint_url=s3_server, skip_instance_cache=True)  # not a cached client
    with pytest.raises(StorageError, match=r"s3://some-bucket/acts: reading manifest.json failed: "
                                           r"NoCredentialsError: Unable to locate credentials \(set AWS_ACCESS_KEY_ID"):
        read_manifest(root)
    # the early check a harvest or a run makes says so, not that the store cannot be reached
    with pytest.raises(StorageError, match=rf"s3://some-bucket/acts: no credentials for the object store at "
                                           rf"endpoint {s3_server} \(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                                           r"or AWS_PROFILE\): NoCredentialsError"):
        root.check_writable()


def test_bad_models_and_tokenizers_are_named(tiny, tmp_path):
    with pytest.raises(ModelError, match=r"model 'ghost'.*no config.json"):
        load_model(ModelSpec("ghost", str(tmp_path)))
    with pytest.raises(ModelError, match="has no module 'model.layers.99'"):
        ActivationReader(load_model(ModelSpec("base", tiny["base"])), ["model.layers.99"], "base")
    other = make_tokenizer(["completely", "different", "words"])
    with pytest.raises(DataError, match="different tokenizers"):
        check_same_tokenizer({"base": load_tokenizer(tiny["base"]), "other": other})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"oops": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with 'text' or 'messages'"):
        list(read_documents(str(bad)))
    # a conversation the chat template refuses (Gemma's has no system role) is named by its line
    strict = make_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "the cat"}]}\n\n'
                     '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}]}\n')
    with pytest.raises(DataError, match=r"chats.jsonl:3: the chat model's template refused this conversation "
                                        r"\(TemplateError: System role not supported\)$"):
        plan_chunks(read_documents(str(chats)), strict, strict, 16, 500)
    plain = make_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match=r"chats.jsonl:1: chat data needs a tokenizer with a chat template"):
        plan_chunks(read_documents(str(chats)), plain, plain, 16, 500)
    # a bad document past the token budget is never reached (documents are tokenized 64 at a time,
    # but a plan stops where one at a time stopped)
    for tail, says in (('{"messages": [{"role": "system", "content": "be brief"}]}', "tail.jsonl:2: the chat model's"),
                       ("not json", "tail.jsonl:2: not valid JSON")):
        (tmp_path / "tail.jsonl").write_text('{"text": "the cat the cat"}\n' + tail + "\n")
        assert sum(len(c.tokens) for c in plan_chunks(read_documents(str(tmp_path / "tail.jsonl")), strict, strict,
                                                      16, 3)) >= 3
        with pytest.raises(DataError, match=says):
            plan_chunks(read_documents(str(tmp_path / "tail.jsonl")), strict, strict, 16, 500)


def test_a_loader_error_without_a_message_is_still_named(tiny, monkeypatch):
    """transformers may raise an OSError with no text (a hub client's bare error): the error names
    the model or tokenizer all the same (the first line of an empty message was an IndexError)."""
    import transformers

    from crosscoder.language_models import load_config

    def refuse(*args, **kwargs):
        raise OSError()

    for loader in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(transformers, loader), "from_pretrained", refuse)
    with pytest.raises(ModelError, match=r"^model 'base': cannot load the config of '[^']+': OSError$"):
        load_config("base", tiny["base"])
    with pytest.raises(ModelError, match=r"^tokenizer '[^']+': cannot load: OSError$"):
        load_tokenizer(tiny["base"])
    with pytest.raises(ModelError, match=r"^model 'base': cannot load '[^']+' \(revision None\): OSError\. Without"):
        load_model(ModelSpec("base", tiny["base"]))


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """The Hub's host name does not resolve (RFC 6761's .invalid), no proxy, a hub cache of this
    test's own, and every HTTP request huggingface_hub makes recorded and refused as a network
    error. Yields the URLs asked for."""
    import httpx2
    import huggingface_hub
    from huggingface_hub.utils import _http

    from crosscoder import hub_access

    asked = []

    def refuse(request):
        asked.append(str(request.url))
        raise httpx2.ConnectError("refused by the test", request=request)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    for proxy in hub_access.PROXY_VARIABLES:
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub_access, "_lookups", {})
    _http.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(refuse)))
    yield asked
    _http.set_client_factory(_http.default_client_factory)


def test_a_cached_hub_model_loads_from_the_cache_alone_when_the_hub_cannot_be_reached(tiny, tmp_path, hub_unreachable):
    """On an air-gapped cluster with the hub cache filled beforehand, a model given by hub id loads
    from the cache without one request (transformers would retry each file five times, ~26 s), and
    keeps its hub id as its name, which the manifest records for the analysis to load."""
    from crosscoder.language_models import load_config

    put_in_hub_cache(tmp_path / "hub-cache", "someone/tiny", "main", Path(tiny["base"]))
    model = load_model(ModelSpec("base", "someone/tiny"))
    tokenizer = load_tokenizer("someone/tiny")
    assert load_config("base", "someone/tiny").num_hidden_layers == model.config.num_hidden_layers
    assert tokenizer.name_or_path == "someone/tiny"
    # huggingface_hub's own agent registry (one try a day, no retries) is the only request
    assert [url for url in hub_unreachable if "agent-harnesses" not in url] == []
    reference = load_model(ModelSpec("ref", tiny["base"]))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    with pytest.raises(ModelError, match=r"'someone/tiny' is not a local directory and the Hugging Face hub cannot "
                                         r"be reached \(hub.invalid: .*\), with no cached copy at revision 'v2'"):
        load_model(ModelSpec("base", "someone/tiny", revision="v2"))


def test_documents_tokenized_a_batch_at_a_time_plan_what_one_at_a_time_plans(tiny, capsys):
    """The planner tokenizes 64 documents per call (the texts in one tokenizer call, the
    conversations in one template call): the plan is the one of a call per document, chunk for
    chunk and token for token, whatever the batch, and a progress bar counts the tokens planned."""
    from crosscoder.documents import tokenize

    tok = load_tokenizer(tiny["base"])
    records = list(read_documents(tiny["docs"]))
    assert {"messages" in r for r in records} == {True, False}  # texts and conversations, interleaved
    single = [tokenize(r, tok, tok) for r in records]
    for batch in (1, 7, 64):
        plan = plan_chunks(iter(records), tok, tok, 16, 10**6, batch_documents=batch, progress=batch == 7)
        assert [c.tokens.tolist() for c in plan] == [ids[o : o + 16] for ids, _ in single
                                                     for o in range(0, len(ids), 16) if len(ids[o : o + 16]) >= 2]
        assert [c.chat for c in plan] == [chat for ids, chat in single for o in range(0, len(ids), 16)
                                          if len(ids[o : o + 16]) >= 2]
        assert {c.doc for c in plan} == set(range(len(records)))
    assert re.search(r"tokenize: .*\d+(\.\d+)?k?/1\.00M", capsys.readouterr().err)


def test_a_templates_own_bos_is_left_to_the_prefix_but_a_role_token_named_bos_is_kept():
    """Llama 3's and Gemma's templates begin a conversation with bos_token: it is dropped, the harvest
    puts its prefix there instead. SmolLM2's tokenizer calls the template's role token <|im_start|>
    its BOS: a conversation begins with it as a token of its own, and keeps it (it was dropped)."""
    from crosscoder.documents import tokenize
    from crosscoder.random_pair import CHAT_TEMPLATE

    chat = {"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "a dog"}]}
    role_as_bos = make_tokenizer()
    role_as_bos.bos_token = "<|user|>"
    ids, is_chat = tokenize(chat, role_as_bos, role_as_bos)
    assert is_chat and ids[0] == role_as_bos.convert_tokens_to_ids("<|user|>")
    writes_bos = make_tokenizer()
    writes_bos.chat_template = "{{ bos_token }}" + CHAT_TEMPLATE
    rendered = writes_bos.apply_chat_template(chat["messages"], tokenize=True)["input_ids"]
    assert rendered[0] == writes_bos.bos_token_id
    assert tokenize(chat, writes_bos, writes_bos)[0] == list(rendered[1:])
    assert tokenize({"text": "the cat"}, role_as_bos, role_as_bos)[0] == role_as_bos("the cat",
                                                                                    add_special_tokens=False)["input_ids"]


def test_documents_longer_than_the_models_maximum_length_are_cut_without_a_warning(tmp_path, capfd):
    """transformers warns of "indexing errors" for a document longer than model_max_length; the
    harvest cuts every document into seq_len chunks first, so the warning would only alarm."""
    tok = make_tokenizer()
    tok.model_max_length = 16
    docs = tmp_path / "long.jsonl"
    docs.write_text(json.dumps({"text": "the cat " * 40}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "the cat " * 40}]}) + "\n")
    capfd.readouterr()
    chunks = plan_chunks(read_documents(str(docs)), tok, tok, 16, 10_000)
    assert [len(c.tokens) for c in chunks][:5] == [16] * 5 and sum(c.chat for c in chunks) >= 5
    assert "indexing errors" not in capfd.readouterr().err


def test_hf_datasets_saved_or_as_data_files_read_like_the_jsonl_file(tiny, tmp_path):
    import datasets

    records = list(read_documents(tiny["docs"]))
    texts, chats = [r for r in records if "text" in r], [r for r in records if "messages" in r]
    assert texts and chats
    saved = tmp_path / "saved"  # save_to_disk: a DatasetDict with two splits
    datasets.DatasetDict({"train": datasets.Dataset.from_list(texts),
                          "test": datasets.Dataset.from_list(chats)}).save_to_disk(str(saved))
    assert list(read_documents(f"hf:{saved}")) == texts
    assert list(read_documents(f"hf:{saved}:test")) == chats
    with pytest.raises(DataError, match=r"no split 'dev'; the dataset has \['test', 'train'\]"):
        list(read_documents(f"hf:{saved}:dev"))
    # a directory of data files, read streaming by load_dataset: the same plan as the file itself
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(tiny["docs"], files / "train.jsonl")
    tok = load_tokenizer(tiny["base"])
    plan = plan_chunks(read_documents(tiny["docs"]), tok, tok, 16, 500)
    assert plan_chunks(read_documents(f"hf:{files}"), tok, tok, 16, 500) == plan
    # a row of the wrong shape is named; so is a dataset that cannot be read
    odd = tmp_path / "odd"
    datasets.Dataset.from_list([{"text": "fine"}, {"oops": "x"}]).save_to_disk(str(odd))
    with pytest.raises(DataError, match=rf"hf:{odd} row:1: expected an object with 'text' or 'messages'"):
        list(read_documents(f"hf:{odd}"))
    code = "from crosscoder.documents import read_documents; list(read_documents('hf:nobody/no-such-dataset'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "DataError: hf:nobody/no-such-dataset: cannot read the dataset" in proc.stderr
    # online, with a hub whose host name does not resolve (an air-gapped cluster): said at once
    from crosscoder.hub_access import PROXY_VARIABLES

    air_gapped = {k: v for k, v in os.environ.items() if k not in PROXY_VARIABLES}
    air_gapped |= {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://hub.invalid", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=air_gapped)
    assert proc.returncode != 0
    assert ("DataError: hf:nobody/no-such-dataset: not a local directory and the Hugging Face hub cannot be "
            "reached (hub.invalid: ") in proc.stderr, proc.stderr[-2000:]
    assert "Retrying" not in proc.stderr
    # a dataset the hub cache holds (`hf download --repo-type dataset` on a connected machine, the
    # cache copied over) is read from it, offline or air-gapped: the same records as the file itself
    (tmp_path / "repo" / "data").mkdir(parents=True)
    shutil.copy(tiny["docs"], tmp_path / "repo" / "data" / "train.jsonl")
    put_in_hub_cache(tmp_path / "hf" / "hub", "someone/docs", "main", tmp_path / "repo", repo_type="dataset")
    code = ("import json; from crosscoder.documents import read_documents; "
            "print(json.dumps(list(read_documents('hf:someone/docs'))))")
    for offline in ("1", "0"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                              env=air_gapped | {"HF_HUB_OFFLINE": offline})
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == records, offline
    # hf:NAME@REVISION reads that branch, tag or commit: here its snapshot, which holds the texts alone
    (tmp_path / "v1" / "data").mkdir(parents=True)
    (tmp_path / "v1" / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    commit = put_in_hub_cache(tmp_path / "hf" / "hub", "someone/docs", "v1", tmp_path / "v1", repo_type="dataset")
    for revision in ("v1", commit):
        proc = subprocess.run([sys.executable, "-c", code.replace("someone/docs", f"someone/docs@{revision}")],
                              capture_output=True, text=True, timeout=300, env=air_gapped)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == texts, revision
    proc = subprocess.run([sys.executable, "-c", code.replace("someone/docs", "someone/docs@v2:test")],
                          capture_output=True, text=True, timeout=300, env=air_gapped)
    assert proc.returncode != 0
    assert ("DataError: hf:someone/docs@v2:test: not a local directory and the Hugging Face hub cannot be reached "
            "(hub.invalid: ") in proc.stderr, proc.stderr[-2000:]
    assert ("with no copy of revision 'v2' in the hub cache; give a local directory, or fill the cache with "
            "`hf download --repo-type dataset someone/docs --revision v2` where the hub can be reached") in proc.stderr
    with pytest.raises(DataError, match=rf"hf:{files}@v1: a revision \(@…\) names a branch, tag or commit of a hub "
                                        "dataset, as in hf:owner/name@v1.0:train; a local dataset has none"):
        list(read_documents(f"hf:{files}@v1"))


def test_models_of_different_sizes_harvest_at_their_own_layers_into_one_dataset(ray_cluster, tiny, tmp_path):
    """Scaling transfer: a 2-layer model of width 64 and a 4-layer one of width 96 (one tokenizer),
    the small one at harvest.hooks (the end of its first half), the large one at the layers its
    table names (its own first half ends a block later). The shards hold each model's activations at its own layers, the trainer
    trains on them, and CE loss recovered splices each source back at its own layer."""
    from crosscoder.analysis import ce_recovered_for_harvest
    from crosscoder.config import AnalyzeConfig
    from crosscoder.model import CrossCoder
    from crosscoder.storage import open_root
    from crosscoder.trainer import train

    small, large = make_family(tmp_path / "family", widths=(64, 96), layers=(2, 4))
    cfg = harvest_config(tiny, str(tmp_path / "acts"), hooks=["model.layers.0"], tokens=800)
    cfg.harvest.models = [{"name": "small", "path": small},
                          {"name": "large", "path": large, "hooks": ["model.layers.1", "model.layers.2"]}]
    manifest = harvest(cfg, progress=False)
    assert [(s.name, s.d, s.hook) for s in manifest.sources] == [
        ("small", 64, "model.layers.0"), ("large@model.layers.1", 96, "model.layers.1"),
        ("large@model.layers.2", 96, "model.layers.2")]
    sample = next(iter_samples(Root(str(tmp_path / "acts")), manifest))
    tokens, first = sample.tokens.tolist(), sample.meta["chunk"] == 0
    # (not a model's last layer: output_hidden_states gives that one after the final norm)
    expected = [*direct_activations(small, tokens, first, ["model.layers.0"]),
                *direct_activations(large, tokens, first, ["model.layers.1", "model.layers.2"])]
    np.testing.assert_allclose(sample.acts.astype(np.float32), np.concatenate(expected, 1), atol=2e-3, rtol=2e-3)
    with pytest.raises(ModelError, match=r"large.*model\.layers\.7"):  # checked on the model's own skeleton
        cfg.harvest.models[1]["hooks"] = ["model.layers.7"]
        harvest(cfg, progress=False)
    cfg.harvest.models[1]["hooks"] = ["model.layers.1", "model.layers.2"]
    cfg.train.latents, cfg.train.k, cfg.train.batch_size, cfg.train.steps = 128, 8, 128, 20
    cfg.train.shuffle_samples, cfg.train.lr, cfg.train.lr_warmup_steps, cfg.train.steps = 8, 3e-3, 5, 60
    result = train(cfg, tmp_path / "run", data=str(tmp_path / "acts"), progress=False)
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5])
    assert set(result.last_metrics["fve"]) == {s.name for s in manifest.sources}
    ce = ce_recovered_for_harvest(CrossCoder.from_pretrained(tmp_path / "run" / "crosscoder"),
                                  open_root(str(tmp_path / "acts")), AnalyzeConfig(ce_sequences=4))
    assert set(ce) == {s.name for s in manifest.sources}
    one, three = ce["large@model.layers.1"], ce["large@model.layers.2"]
    assert one["clean"] == three["clean"] != ce["small"]["clean"]  # one model loaded per table
    assert one["zero_ablated"] != three["zero_ablated"]  # each spliced at its own layer
    # the report compares the first two sources, of different widths: no cosine or Latent Scaling
    # (each needs equal widths), said once, and no empty plot (matplotlib's warnings are errors here)
    from crosscoder.analysis import analyze
    from crosscoder.report import write_report

    analysis = analyze(CrossCoder.from_pretrained(tmp_path / "run" / "crosscoder"), open_root(str(tmp_path / "acts")),
                       AnalyzeConfig(ce_sequences=0), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text = write_report(analysis, tmp_path / "report.html").read_text()
    assert "small-only latents" in text and "Not run: it needs sources of equal width." in text
    assert "Decoder cosine" not in text and "Latent Scaling of exclusive latents" not in text
    assert "Relative decoder norm" in text and ", cosine " not in text


def test_harvest_metrics_are_served_while_shards_are_written(tiny, tmp_path):
    from crosscoder.config import to_dict
    from crosscoder.harvest import ShardHarvester

    cfg = harvest_config(tiny, str(tmp_path / "acts"))
    cfg.metrics.port, cfg.metrics.host = free_port(), "127.0.0.1"
    tok = load_tokenizer(tiny["chat"])
    chunks = plan_chunks(read_documents(tiny["docs"]), tok, tok, 16, 200)[:6]
    harvester = ShardHarvester(to_dict(cfg), actor_index=0)
    try:
        harvester.write(0, chunks[:3])
        harvester.write(1, chunks[3:])
        text = urllib.request.urlopen(f"http://127.0.0.1:{cfg.metrics.port}/metrics", timeout=10).read().decode()
    finally:
        harvester.metrics.close()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}
    tokens = sum(len(c.tokens) for c in chunks)
    assert values['crosscoder_harvest_tokens_total{actor="0",run="harvest-test"}'] == tokens
    assert values['crosscoder_harvest_shards_total{actor="0",run="harvest-test"}'] == 2
    assert values['crosscoder_harvest_shard_seconds_count{actor="0",run="harvest-test"}'] == 2
    assert values['crosscoder_harvest_shard_seconds_sum{actor="0",run="harvest-test"}'] > 0


def test_the_trunk_loads_no_layer_past_the_deepest_hook_and_no_lm_head(tiny):
    """load_trunk: the base model without its LM head, cut after the deepest hooked layer (here 2 of
    4), reads exactly the activations the whole model gives; a hook outside the numbered layers
    loads the whole model."""
    from crosscoder.language_models import load_trunk

    full = load_model(ModelSpec("base", tiny["base"]))
    trunk, paths = load_trunk(ModelSpec("base", tiny["base"]), HOOKS)
    assert paths == ["layers.1", "layers.2"] and len(trunk.layers) == 3 and not hasattr(trunk, "lm_head")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    layer, head = count(full.model.layers[0]), full.lm_head.weight.numel()
    assert count(trunk) == count(full) - layer - head - full.model.norm.weight.numel() + trunk.norm.weight.numel()
    ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    for a, b in zip(ActivationReader(trunk, paths, "base", shown=HOOKS).read(ids), ActivationReader(full, HOOKS).read(ids)):
        assert torch.equal(a, b)
    whole, same = load_trunk(ModelSpec("base", tiny["base"]), ["model.layers.1", "lm_head"])
    assert same == ["model.layers.1", "lm_head"] and hasattr(whole, "lm_head")
    with pytest.raises(ModelError, match=r"model 'base' has no module 'model.layers.99'; its blocks are "
                                         r"model.layers.0 … model.layers.3$"):  # named as the user writes them
        ActivationReader(*load_trunk(ModelSpec("base", tiny["base"]), ["model.layers.99"]), "base",
                         shown=["model.layers.99"])


@pytest.fixture
def no_ray(monkeypatch):
    """The harvest's driver fails the test if it starts Ray: for checks that must come first."""
    import crosscoder.harvest as harvest_module

    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(harvest_module, "connect", started)


def test_a_misspelt_hook_stops_the_harvest_before_any_actor_or_shard(tiny, tmp_path, no_ray):
    """The hooks are checked on each model's skeleton (meta device) on the driver: one line naming the
    model's blocks, no Ray started, nothing written (the actor's own check came after Ray started
    and printed its traceback through Ray's log)."""
    cfg = harvest_config(tiny, str(tmp_path / "out"))
    cfg.harvest.hooks = ["model.layers.1", "model.layer.2"]
    with pytest.raises(ModelError, match=r"model 'base' has no module 'model.layer.2'; its blocks are model.layers.0 "
                                         r"… model.layers.3$"):
        harvest(cfg, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_documents_shorter_than_harvest_tokens_are_said_to_be(tiny, tmp_path, no_ray, capsys):
    """Asked for more tokens than the documents hold, the harvest takes them all and says so first
    (a run on 2 tokens of a typo'd file ended with 'harvest: 2 tokens' and nothing more)."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "the cat sat on the mat " * 3}) + "\n" for _ in range(2)))
    cfg = harvest_config(tiny, str(tmp_path / "out"), data=str(docs), tokens=10**6)
    with pytest.raises(AssertionError, match="Ray was started"):
        harvest(cfg, progress=False)
    out = capsys.readouterr().out
    assert re.search(rf"^harvest: {docs} holds \d+ tokens in chunks of at least 2, fewer than harvest.tokens = "
                     r"1000000; harvesting them all$", out, re.M), out
    cfg.harvest.tokens = 20
    with pytest.raises(AssertionError, match="Ray was started"):
        harvest(cfg, progress=False)
    assert "fewer than" not in capsys.readouterr().out


def test_a_hook_narrower_or_wider_than_the_residual_stream_is_named(tiny, tmp_path, no_ray):
    """Sources are residual-stream wide. A hook inside the MLP (its up projection: the MLP's width) is
    refused on the driver from the skeleton's module type, before Ray; one whose type tells no width
    (the MLP's activation function) on the first batch, by the reader; both name model, hook and
    widths (it was a shard's "acts must be [T, D]" error from inside the actor)."""
    cfg = harvest_config(tiny, str(tmp_path / "out"))
    cfg.harvest.hooks = ["model.layers.1", "model.layers.2.mlp.up_proj"]
    with pytest.raises(ModelError, match=r"model 'base': 'model.layers.2.mlp.up_proj' outputs width 128, not the "
                                         r"model's hidden size 64; hooks are residual-stream points"):
        harvest(cfg, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    reader = ActivationReader(load_model(ModelSpec("base", tiny["base"])), ["model.layers.1.mlp.act_fn"], "base")
    with pytest.raises(ModelError, match=r"model 'base': 'model.layers.1.mlp.act_fn' outputs width 128, not the "
                                         r"model's hidden size 64"):
        reader.read(torch.tensor([[5, 6, 7]]))
    assert [a.shape[-1] for a in ActivationReader(reader.model, ["model.layers.1.mlp"], "base").read(
        torch.tensor([[5, 6, 7]]))] == [64]  # the MLP's output is residual-wide


@pytest.mark.parametrize("poison, message", [
    (float("inf"), r"the model produced inf or NaN activations \(a model run in float16 overflows"),
    (float("nan"), r"the model produced inf or NaN activations"),
    (1e5, r"activations beyond float16's range \(65504\): store them as float32 \(harvest.dtype = float32\)")])
def test_activations_that_float16_cannot_hold_stop_the_shard_by_name(tiny, tmp_path, monkeypatch, poison, message):
    """An inf or NaN from the model, or a finite value past float16's range, would be stored as inf and
    surface steps into training as a NaN loss: the shard stops, naming shard, source, document and
    fix, and nothing is committed."""
    from crosscoder.config import to_dict
    from crosscoder.documents import Chunk
    from crosscoder.harvest import ShardHarvester

    harvester = ShardHarvester(to_dict(harvest_config(tiny, str(tmp_path / "acts"))))
    reader = harvester.readers["chat"]
    original = reader.read

    def poisoned(ids, mask=None):
        parts = original(ids, mask)
        if len(parts[1]) > 2:  # the first batch (4 chunks): chat's second hook, doc 2, a stored position
            parts[1][2, 3, 5] = poison
        return parts

    monkeypatch.setattr(reader, "read", poisoned)
    chunks = [Chunk(doc, 0, 0, np.arange(10 + doc, 20 + doc, dtype=np.int32), False) for doc in range(5)]
    with pytest.raises(ModelError, match=rf"^shard-000003.tar, source 'chat@{HOOKS[1]}', document 2 of the plan: "
                                         rf"{message}"):
        harvester.write(3, chunks)
    assert not list((tmp_path / "acts").glob("shard-*"))  # nothing committed
    monkeypatch.setattr(reader, "read", original)
    assert harvester.write(3, chunks)["info"]["name"] == "shard-000003.tar"


def test_actors_asking_for_gpus_the_cluster_lacks_say_that_they_wait(ray_cluster, tiny, tmp_path, monkeypatch,
                                                                     capsys):
    """Ray keeps such actors pending without a word (an autoscaler may add GPU nodes); the driver says
    so before it creates them (the test stops it there)."""
    import crosscoder.harvest as harvest_module

    from .conftest import WaitingForGpus, stop_at_the_gpu_note

    stop_at_the_gpu_note(monkeypatch, harvest_module)
    with pytest.raises(WaitingForGpus):
        harvest(harvest_config(tiny, str(tmp_path / "acts"), gpus_per_actor=0.5), progress=False)
    assert "harvest.gpus_per_actor: 2 × 0.5 GPUs asked for, the Ray cluster has 0 now; waiting" in capsys.readouterr().err


def test_an_actor_given_a_gpu_without_cuda_says_it_harvests_on_the_cpu(tiny, tmp_path, monkeypatch, capsys):
    """A CPU build of torch on a GPU node would harvest 100x slower without a word: the actor says so."""
    from crosscoder.config import to_dict
    from crosscoder.harvest import ShardHarvester

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = harvest_config(tiny, str(tmp_path / "acts"), gpus_per_actor=1.0)
    assert ShardHarvester(to_dict(cfg), actor_index=3).device == "cpu"
    assert ("harvest actor 3: harvest.gpus_per_actor = 1, but this process sees no CUDA device (torch "
            f"{torch.__version__}") in capsys.readouterr().err
    ShardHarvester(to_dict(harvest_config(tiny, str(tmp_path / "acts"))))
    assert "harvest actor" not in capsys.readouterr().err  # no GPU asked for: nothing to say


def test_an_actors_host_memory_counts_the_weights_only_where_they_may_live_on_the_host(tiny):
    """On a CPU actor the weights are host memory; an actor with GPUs loads them straight onto its GPUs,
    unless accelerate may offload (a device_map with no max_memory, or one naming cpu). Counting
    them there asked Ray for host memory a GPU node may not have, and the actor never scheduled."""
    from crosscoder.harvest import estimated_actor_memory

    weights = sum(f.stat().st_size for f in Path(tiny["base"]).glob("*.safetensors"))
    spec = ModelSpec("base", tiny["base"])  # float32, as stored
    gib = float(2**30)
    assert estimated_actor_memory([spec, spec]) == gib + 2 * weights
    assert estimated_actor_memory([spec, spec], gpus=1) == gib
    for table, counted in (({"device_map": "auto"}, True), ({"device_map": "auto", "max_memory": {0: "70GiB"}}, False),
                           ({"device_map": "auto", "max_memory": {0: "70GiB", "cpu": "200GiB"}}, True)):
        split = ModelSpec("base", tiny["base"], **table)
        assert estimated_actor_memory([split], gpus=8) == gib + weights * counted, table
    assert estimated_actor_memory([ModelSpec("base", "nobody/not-here")]) == 0  # unknown size: no request


def test_a_tokenizer_without_the_prefix_token_stops_the_harvest_before_ray(tiny, tmp_path, no_ray):
    """Qwen2's tokenizers have no BOS: the default harvest.prefix = bos would run documents behind
    nothing and store their first token, the attention sink. One config error naming the fix, on
    the driver, before Ray starts and before anything is written."""
    from crosscoder.random_pair import make_model, make_tokenizer, save

    tok = make_tokenizer()
    tok.bos_token = None
    model_dir = save(make_model(len(tok), hidden=32, layers=2), tok, tmp_path / "no-bos")
    cfg = harvest_config(tiny, str(tmp_path / "out"))
    cfg.harvest.models, cfg.harvest.hooks = [{"name": "m", "path": model_dir}], ["model.layers.1"]
    with pytest.raises(ConfigError, match=r"harvest.prefix = 'bos': the tokenizer of .*no-bos has no BOS token; set "
                                          r"harvest.prefix = eos, token:<text> or none$"):
        harvest(cfg, progress=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_device_map_auto_harvests_through_accelerate_on_the_cpu(tiny, tmp_path):
    """A model table with device_map = "auto" (and a max_memory cap) loads through accelerate, which
    places everything on the CPU here, and the actor's shard is the one a plain load writes."""
    from crosscoder.config import to_dict
    from crosscoder.documents import Chunk
    from crosscoder.harvest import ShardHarvester

    chunks = [Chunk(doc, 0, 0, list(range(10 + doc, 22 + doc)), False) for doc in range(5)]
    shards = {}
    for name, extra in (("plain", {}), ("auto", {"device_map": "auto", "max_memory": {"cpu": "2GiB"}})):
        cfg = harvest_config(tiny, str(tmp_path / name))
        cfg.harvest.models = [m | extra for m in cfg.harvest.models]
        harvester = ShardHarvester(to_dict(cfg))
        model = harvester.readers["base"].model
        assert all(p.device.type == "cpu" for p in model.parameters())
        if extra:
            assert set((getattr(model, "hf_device_map", None) or {"": "cpu"}).values()) == {"cpu"}
        harvester.write(0, chunks)
        shards[name] = (tmp_path / name / shard_name(0)).read_bytes()
    assert shards["auto"] == shards["plain"]


def test_chunks_of_different_lengths_share_a_padded_forward_and_read_as_alone(tiny, tmp_path, monkeypatch):
    """Chat data cuts chunks of many lengths; a batch is right-padded with an attention mask, so
    every forward carries harvest.batch_size chunks (not one per length) and each chunk's
    activations are those of a forward of that chunk alone."""
    from crosscoder.config import to_dict
    from crosscoder.documents import Chunk
    from crosscoder.harvest import ShardHarvester
    from crosscoder.storage import Root

    cfg = harvest_config(tiny, str(tmp_path / "acts"), batch_size=4)
    harvester = ShardHarvester(to_dict(cfg))
    forwards = []
    reader = harvester.readers["base"]
    original = reader.read
    monkeypatch.setattr(reader, "read", lambda ids, mask=None: forwards.append(tuple(ids.shape)) or original(ids, mask))
    rng = np.random.default_rng(0)
    chunks = [Chunk(doc, 0, 0, rng.integers(7, 40, size=int(n)).tolist(), True)
              for doc, n in enumerate(rng.integers(3, 16, size=10))]
    out = harvester.write(0, chunks)
    assert len(forwards) == 3 and [shape[0] for shape in forwards] == [4, 4, 2]  # ceil(10 / 4), full batches
    manifest_info = ShardInfo(**out["info"])
    from crosscoder.shards import Manifest, SourceInfo, read_shard

    manifest = Manifest(sources=[SourceInfo(f"s{i}", 64) for i in range(4)], dtype="float16")
    samples = read_shard(Root(str(tmp_path / "acts")), manifest_info, manifest)
    assert [len(s.tokens) for s in samples] == [len(c.tokens) for c in chunks]
    monkeypatch.setattr(reader, "read", original)
    for chunk, sample in zip(chunks, samples):
        alone, _, _ = harvester.activations([chunk.tokens])
        assert np.allclose(sample.acts.astype(np.float32), alone[0].float().numpy(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("prefix, token", [("bos", "<|user|>"), ("eos", "</s>"), ("none", None),
                                           ("token:<|end|>", "<|end|>"),
                                           # the unknown token is a token too: SmolLM2's GGUF tokenizer
                                           # names its document separator <|endoftext|> so
                                           ("token:<unk>", "<unk>")])
def test_the_prefix_goes_before_a_documents_first_chunk_only(tiny, tmp_path, monkeypatch, prefix, token):
    """A tokenizer whose BOS is a chat-template token, as SmolLM2's <|im_start|>: harvest.prefix picks
    the token a document's first chunk runs behind; a later chunk of the document gains none (it
    would be a template token the document never had); the prefix is not stored."""
    from crosscoder.config import to_dict
    from crosscoder.documents import Chunk
    from crosscoder.harvest import ShardHarvester
    from crosscoder.random_pair import make_model, make_tokenizer, save

    tok = make_tokenizer()
    tok.bos_token = "<|user|>"  # the template's role token, as BOS
    model_dir = save(make_model(len(tok), hidden=32, layers=2), tok, tmp_path / "model")
    cfg = harvest_config(tiny, str(tmp_path / "acts"), prefix=prefix)
    cfg.harvest.models, cfg.harvest.hooks = [{"name": "m", "path": model_dir}], ["model.layers.1"]
    harvester = ShardHarvester(to_dict(cfg))
    seen = []
    reader = harvester.readers["m"]
    original = reader.read
    monkeypatch.setattr(reader, "read", lambda ids, mask=None: seen.append(ids.clone()) or original(ids, mask))
    first, later = Chunk(0, 0, 0, np.array([10, 11, 12], np.int32), False), Chunk(0, 1, 3, np.array([13, 14], np.int32), False)
    _, stored, _ = harvester.activations([first.tokens, later.tokens], [True, False])
    expected = [] if token is None else [tok.convert_tokens_to_ids(token)]
    assert seen[0][0, : len(expected) + 3].tolist() == expected + [10, 11, 12]
    assert seen[0][1, :2].tolist() == [13, 14]  # no invented token before a later chunk
    assert [s.tolist() for s in stored] == [[10, 11, 12], [13, 14]]
    with pytest.raises(ConfigError, match="harvest.prefix = 'token:<nope>': the tokenizer has no such token"):
        ShardHarvester(to_dict(harvest_config(tiny, str(tmp_path / "x"), prefix="token:<nope>")))
