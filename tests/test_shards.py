"""Shard format: writing, reading, validation, interop with webdataset, and the token stream."""

import hashlib
import json
import re

import numpy as np
import pytest

from crosscoder.shards import (
    Manifest,
    ShardError,
    ShardWriter,
    SourceInfo,
    iter_samples,
    read_manifest,
    read_shard,
    shard_name,
    write_manifest,
)
from crosscoder.storage import Root
from crosscoder.stream import DataExhausted, Position, TokenStream


def make_dataset(path, n_shards=3, samples=4, T=10, widths=(3, 5), dtype="float16"):
    root = Root(str(path))
    rng = np.random.default_rng(0)
    infos, all_acts = [], []
    for n in range(n_shards):
        w = ShardWriter(root, shard_name(n), width=sum(widths), dtype=dtype)
        for i in range(samples):
            acts = rng.standard_normal((T, sum(widths))).astype(dtype)
            all_acts.append(acts)
            w.add(f"{n:04d}-{i:04d}", np.arange(T, dtype=np.int32) + i, acts, {"doc": n, "chunk": i})
        infos.append(w.commit())
    manifest = Manifest(sources=[SourceInfo("base", widths[0]), SourceInfo("chat", widths[1])], dtype=dtype,
                        seq_len=T, norm_scale=[1.0, 1.0], shards=infos)
    write_manifest(root, manifest)
    return root, manifest, np.concatenate(all_acts)


def test_round_trip_and_manifest_fields(tmp_path):
    root, manifest, acts = make_dataset(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("format", "version", "sources", "dtype", "seq_len", "tokenizer", "norm_scale", "shards"):
        assert key in data
    assert data["shards"][0]["sha256"] == hashlib.sha256((tmp_path / "shard-000000.tar").read_bytes()).hexdigest()
    assert data["shards"][0]["tokens"] == 40 and data["shards"][0]["samples"] == 4
    back = list(iter_samples(root))
    assert np.array_equal(np.concatenate([s.acts for s in back]), acts)
    assert back[1].key == "0000-0001" and back[1].meta == {"doc": 0, "chunk": 1}
    assert back[1].tokens.dtype == np.int32 and back[1].tokens[0] == 1
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or p.suffix == ".part"]


def test_shard_bytes_are_a_pure_function_of_content(tmp_path):
    make_dataset(tmp_path / "a")
    make_dataset(tmp_path / "b")
    for n in range(3):
        assert (tmp_path / "a" / shard_name(n)).read_bytes() == (tmp_path / "b" / shard_name(n)).read_bytes()


def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    _, _, acts = make_dataset(tmp_path, n_shards=1)
    ds = wds.WebDataset(str(tmp_path / shard_name(0)), shardshuffle=False).decode()
    samples = list(ds)
    assert [s["__key__"] for s in samples] == [f"0000-{i:04d}" for i in range(4)]
    assert np.array_equal(samples[2]["acts.npy"], acts[20:30])
    assert samples[2]["json"]["chunk"] == 2


def test_truncated_shard_is_named(tmp_path):
    root, manifest, _ = make_dataset(tmp_path)
    path = tmp_path / shard_name(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"shard-000001\.tar: .*bytes, manifest says"):
        read_shard(root, manifest.shards[1], manifest)
    # even without the sha256/size check the tar parser names the shard
    with pytest.raises(ShardError, match=r"shard-000001\.tar: (truncated|sample)"):
        read_shard(root, manifest.shards[1], manifest, verify=False)


def test_a_stream_whose_shard_changed_says_whether_the_manifest_changed_and_if_a_resume_can_follow(tmp_path):
    """A shard damaged in place is named alone; one rewritten by a harvest that also rewrote the
    manifest says so: a re-run resumes when the normalisation scales are the same, else it cannot."""
    from dataclasses import replace

    root, manifest, _ = make_dataset(tmp_path)
    path = tmp_path / shard_name(1)
    path.write_bytes(path.read_bytes()[:-512])

    def read_all():
        list(TokenStream(root, manifest, batch_size=8, shuffle_samples=2, max_epochs=1).batches())

    with pytest.raises(ShardError, match=r"shard-000001\.tar: \d+ bytes, manifest says \d+ \(truncated or rewritten\)$"):
        read_all()
    write_manifest(root, replace(manifest, extra={"harvest": {"complete": True}}))
    with pytest.raises(ShardError, match=r"\(truncated or rewritten\); the dataset's manifest changed since this run "
                                         r"read it \(a harvest grew or redid .*\), re-run to resume from the last"):
        read_all()
    # scales a little apart (a grown harvest's estimate): the resume keeps its own (trainer.with_saved_scale)
    write_manifest(root, replace(manifest, norm_scale=[s * 1.01 for s in manifest.norm_scale]))
    with pytest.raises(ShardError, match=r"manifest changed since this run read it .*, re-run to resume from the last"):
        read_all()
    write_manifest(root, replace(manifest, norm_scale=[s * 1.5 for s in manifest.norm_scale]))
    with pytest.raises(ShardError, match=r"its normalisation too \(norm_scale\): this run cannot resume on it"):
        read_all()


def test_corrupt_bytes_fail_the_checksum(tmp_path):
    root, manifest, _ = make_dataset(tmp_path)
    path = tmp_path / shard_name(2)
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000002\.tar: sha256"):
        read_shard(root, manifest.shards[2], manifest)


def test_wrong_dtype_and_width_are_named(tmp_path):
    root, manifest, _ = make_dataset(tmp_path, dtype="float32")
    lying = Manifest.from_json(manifest.to_json().replace('"dtype": "float32"', '"dtype": "float16"'))
    with pytest.raises(ShardError, match=r"shard-000000\.tar: sample '0000-0000' acts dtype float32, manifest says float16"):
        read_shard(root, lying.shards[0], lying)
    wide = Manifest.from_json(manifest.to_json())
    wide.sources[1].d = 6
    with pytest.raises(ShardError, match=r"acts shape \(10, 8\), manifest sources \['base', 'chat'\] have total width 9"):
        read_shard(root, wide.shards[0], wide)


def test_writer_rejects_wrong_width(tmp_path):
    w = ShardWriter(Root(str(tmp_path)), shard_name(0), width=8)
    with pytest.raises(ShardError, match=r"acts must be \[T=4, D=8\]"):
        w.add("a", np.zeros(4, np.int32), np.zeros((4, 7), np.float16))
    w.abort()


KILLED_WRITER = """
import os, sys
import numpy as np
from crosscoder.shards import ShardWriter, shard_name
from crosscoder.storage import Root
w = ShardWriter(Root(sys.argv[1]), shard_name(7), width=4, tmp_dir=sys.argv[2])
w.add("a", np.zeros(3, np.int32), np.ones((3, 4), np.float16))
os._exit(9)  # killed mid-shard: no chance to remove its file
"""


def test_partial_shards_of_killed_writers_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from crosscoder.shards import sweep_partial_shards

    tmp, root = tmp_path / "tmp", Root(str(tmp_path / "root"))
    tmp.mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path / "root"), str(tmp)], timeout=60)
    assert killed.returncode == 9
    (left,) = tmp.glob("shard-000007.tar.*.part")
    assert re.fullmatch(r"shard-000007\.tar\.\d+\.\w+\.part", left.name)  # the writer's pid in it
    size = left.stat().st_size
    with ShardWriter(root, shard_name(0), width=4, tmp_dir=str(tmp)) as live:
        live.add("a", np.zeros(3, np.int32), np.ones((3, 4), np.float16))
        assert sweep_partial_shards(str(tmp)) == (1, size)
        assert not left.exists() and len(list(tmp.glob("*.part"))) == 1  # the live writer's is kept
        info = live.commit()
    assert (tmp_path / "root" / shard_name(0)).stat().st_size == info.bytes  # committed whole after the sweep
    assert not list(tmp.iterdir())
    # leaving the block without a commit (an error, a Ctrl-C) removes the file
    with pytest.raises(KeyboardInterrupt), ShardWriter(root, shard_name(1), width=4, tmp_dir=str(tmp)) as w:
        w.add("a", np.zeros(3, np.int32), np.ones((3, 4), np.float16))
        raise KeyboardInterrupt
    assert not list(tmp.iterdir())
    # and so does a commit the root refuses
    (tmp_path / "blocked").write_text("a file where the root's directory should be")
    with pytest.raises(OSError), ShardWriter(Root(str(tmp_path / "blocked" / "root")), shard_name(2), width=4,
                                             tmp_dir=str(tmp)) as w:
        w.add("a", np.zeros(3, np.int32), np.ones((3, 4), np.float16))
        w.commit()
    assert not list(tmp.iterdir())
    assert sweep_partial_shards(str(tmp)) == (0, 0)


def test_missing_or_bad_manifest(tmp_path):
    with pytest.raises(ShardError, match="no manifest.json"):
        read_manifest(Root(str(tmp_path)))
    (tmp_path / "manifest.json").write_text('{"format": "crosscoder-shards", "version": 1, "sources": []}')
    with pytest.raises(ShardError, match="missing field 'dtype'"):
        read_manifest(Root(str(tmp_path)))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        read_manifest(Root(str(tmp_path)))


def test_missing_shard_is_named(tmp_path):
    root, manifest, _ = make_dataset(tmp_path)
    (tmp_path / shard_name(0)).unlink()
    with pytest.raises(ShardError, match=r"shard-000000\.tar: listed in the manifest but missing"):
        read_shard(root, manifest.shards[0], manifest)


def collect(stream, position=Position(), n=None):
    out = []
    for i, batch in enumerate(stream.batches(position)):
        out.append(batch)
        if n is not None and i + 1 == n:
            break
    return out


def test_stream_shuffles_covers_every_token_once_per_epoch_and_resumes_exactly(tmp_path):
    root, manifest, acts = make_dataset(tmp_path, n_shards=3, samples=4, T=10)  # 120 tokens
    stream = TokenStream(root, manifest, batch_size=24, shuffle_samples=3, seed=1, max_epochs=2)
    batches = []
    with pytest.raises(DataExhausted):
        for b in stream.batches():
            batches.append(b)
    assert len(batches) == 10
    epoch0 = np.concatenate([b.acts for b in batches[:5]])
    assert not np.array_equal(epoch0, acts)  # shuffled
    key = lambda a: sorted(map(bytes, a))  # noqa: E731 - compare as multisets of rows
    assert key(epoch0) == key(acts)
    assert not np.array_equal(epoch0, np.concatenate([b.acts for b in batches[5:]]))  # new order per epoch
    for cut in (1, 3, 6):
        resumed = collect(stream, batches[cut - 1].position, n=3)
        for a, b in zip(resumed, batches[cut : cut + 3]):
            assert np.array_equal(a.acts, b.acts)


def test_stream_ranks_read_disjoint_shards(tmp_path):
    root, manifest, acts = make_dataset(tmp_path, n_shards=4, samples=2, T=10)
    seen = []
    for rank in range(2):
        s = TokenStream(root, manifest, batch_size=10, shuffle_samples=2, rank=rank, world=2, max_epochs=1)
        seen.append(np.concatenate([b.acts for b in collect(s, n=4)]))
    key = lambda a: set(map(bytes, a))  # noqa: E731
    assert not key(seen[0]) & key(seen[1])
    assert key(seen[0]) | key(seen[1]) == key(acts)
    with pytest.raises(ShardError, match="cannot feed 5 data-parallel ranks"):
        TokenStream(root, manifest, batch_size=10, world=5)


def test_npy_members_are_byte_identical_to_numpy_save():
    """Shards stream .npy members from the arrays' own memory; the bytes are what np.save writes."""
    import io as _io

    from crosscoder.shards import _npy

    rng = np.random.default_rng(0)
    for array in (rng.standard_normal((37, 24)).astype(np.float16), np.arange(37, dtype=np.int32),
                  rng.standard_normal((24, 37)).astype(np.float32).T):  # not contiguous
        expected = _io.BytesIO()
        np.save(expected, np.ascontiguousarray(array), allow_pickle=False)  # shards store C order
        chain = _npy(array)
        got = chain.read()
        assert chain.size == len(got) and got == expected.getvalue()
        assert np.array_equal(np.load(_io.BytesIO(got)), array)
