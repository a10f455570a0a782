"""Activation shards, the contract between harvest and training (its format: docs/architecture.md).

Any webdataset reader can read the shards; this module writes and reads them with the standard
library's ``tarfile`` so that:

- the bytes are a pure function of the content (fixed mtime, owner and mode; sorted JSON), which
  makes a retried or resumed harvest write the same shard, checkable by the manifest's sha256;
- a shard is read whole and hashed before it is parsed, so a truncated or corrupt shard is
  reported by name and never half-trained-on. The cost is holding one shard in memory while it
  is decoded (shards are ~100–300 MB by design).

Pure numpy: no torch, so harvest writers and other tools can use it without the training stack.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import CrosscoderError
from .storage import Root, naming

FORMAT = "crosscoder-shards"
VERSION = 1
MANIFEST = "manifest.json"
STORABLE_DTYPES = ("float16", "float32")
PART_SUFFIX = ".part"  # a shard being written, in the local temporary directory


class ShardError(CrosscoderError, ValueError):
    """A dataset or shard is invalid; the message names the root, shard or field at fault."""


class ManifestMissing(ShardError):
    """The root holds no manifest.json: no dataset there yet, or its harvest never finished a shard."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass
class SourceInfo:
    name: str
    d: int
    model: str = ""
    revision: str | None = None
    hook: str = ""


@dataclass
class ShardInfo:
    name: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    stats: dict | None = None  # e.g. {"norm_sum": [...]}: per-source Σ‖x‖, for normalisation scales
    etag: str | None = None  # the store's version tag at commit (Root.stat_all): resume checks it, no download


@dataclass
class Manifest:
    sources: list[SourceInfo]
    dtype: str = "float16"
    seq_len: int = 0
    tokenizer: str = ""
    norm_scale: list[float] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # any further keys, kept on rewrite

    @property
    def width(self) -> int:
        return sum(s.d for s in self.sources)

    @property
    def source_names(self) -> list[str]:
        return [s.name for s in self.sources]

    def fingerprint(self) -> str:
        """The data's identity: a hash of the sources, dtype and shard checksums, not of the
        bookkeeping (a copy of the dataset in another store has the same fingerprint)."""
        content = {"sources": [[s.name, s.d, s.model, s.hook] for s in self.sources], "dtype": self.dtype,
                   "shards": [[s.name, s.samples, s.sha256] for s in self.shards]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> str:
        data = {"format": FORMAT, "version": VERSION}
        data |= {
            "sources": [asdict(s) for s in self.sources],
            "dtype": self.dtype,
            "seq_len": self.seq_len,
            "tokenizer": self.tokenizer,
            "norm_scale": list(self.norm_scale),
            "shards": [asdict(s) for s in self.shards],
        }
        data |= self.extra
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> Manifest:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ShardError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ShardError(f"{where}: expected a JSON object")
        if data.get("format") != FORMAT:
            raise ShardError(f"{where}: field 'format' is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ShardError(f"{where}: field 'version' is {data.get('version')!r}, this code reads {VERSION}")
        for key in ("sources", "dtype", "norm_scale", "shards"):
            if key not in data:
                raise ShardError(f"{where}: missing field {key!r}")
        try:
            sources = [SourceInfo(**s) for s in data["sources"]]
            shards = [ShardInfo(**s) for s in data["shards"]]
        except TypeError as e:
            raise ShardError(f"{where}: malformed 'sources' or 'shards' entry: {e}") from None
        if not sources:
            raise ShardError(f"{where}: field 'sources' is empty")
        if data["dtype"] not in STORABLE_DTYPES:
            raise ShardError(f"{where}: field 'dtype' is {data['dtype']!r}, expected one of {STORABLE_DTYPES}")
        if data["norm_scale"] and len(data["norm_scale"]) != len(sources):
            raise ShardError(
                f"{where}: field 'norm_scale' has {len(data['norm_scale'])} entries for {len(sources)} sources"
            )
        known = {"format", "version", "sources", "dtype", "seq_len", "tokenizer", "norm_scale", "shards"}
        return cls(
            sources=sources,
            dtype=data["dtype"],
            seq_len=int(data.get("seq_len", 0)),
            tokenizer=data.get("tokenizer", ""),
            norm_scale=[float(v) for v in data["norm_scale"]],
            shards=shards,
            extra={k: v for k, v in data.items() if k not in known},
        )


def read_manifest(root: Root) -> Manifest:
    try:
        text = root.read_bytes(MANIFEST).decode()
    except FileNotFoundError:
        raise ManifestMissing(f"{root.url}: no {MANIFEST} (not a shard dataset, or the harvest has not finished)"
                              ) from None
    return Manifest.from_json(text, where=root.url_of(MANIFEST))


def write_manifest(root: Root, manifest: Manifest) -> None:
    root.write_bytes(MANIFEST, manifest.to_json().encode())


# ---------------------------------------------------------------------------------------------
# writing


class _Chain(io.RawIOBase):
    """Read the concatenation of byte buffers without joining them (tarfile copies from it)."""

    def __init__(self, *parts):
        self.parts = [memoryview(p).cast("B") for p in parts]
        self.size = sum(len(p) for p in self.parts)

    def readable(self):
        return True

    def readinto(self, out) -> int:
        n = 0
        while self.parts and n < len(out):
            head = self.parts[0]
            take = min(len(head), len(out) - n)
            out[n : n + take] = head[:take]
            n += take
            self.parts[0] = head[take:]
            if not len(self.parts[0]):
                self.parts.pop(0)
        return n


def _npy(array: np.ndarray) -> _Chain:
    """The .npy file of ``array`` (format 1.0, what np.save writes) as a header and a view of the
    array's own memory: the payload is copied once, by tarfile, into the shard."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return _Chain(header.getvalue(), array.reshape(-1).view(np.uint8))


class _HashingFile(io.RawIOBase):
    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, b):
        self.sha.update(b)
        self.size += len(b)
        return self.fh.write(b)


class ShardWriter:
    """Write one shard to a local temporary file, then commit it to the root atomically.

    The temporary file (``<tmp>/shard-NNNNNN.tar.<pid>.<random>.part``) is ``flock``-ed from its
    birth until it is committed or aborted, so :func:`sweep_partial_shards` can tell a live writer's
    file from one a killed writer left. Use it as a context manager: leaving the block without
    :meth:`commit` (an error, a Ctrl-C) removes the file."""

    def __init__(self, root: Root, name: str, width: int, dtype: str = "float16", tmp_dir: str | None = None):
        if dtype not in STORABLE_DTYPES:
            raise ShardError(f"{name}: dtype {dtype!r} cannot be stored; use one of {STORABLE_DTYPES}")
        self.root, self.name, self.width, self.dtype = root, name, width, np.dtype(dtype)
        fd, creating = tempfile.mkstemp(prefix=f"{name}.{os.getpid()}.", suffix=".creating", dir=tmp_dir)
        # the lock sits on a descriptor of its own, so it outlives closing the file before the commit
        self._lock = os.open(creating, os.O_RDONLY)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.tmp_path = creating[: -len(".creating")] + PART_SUFFIX
        os.rename(creating, self.tmp_path)  # only ever seen as .part while locked
        self._fh = os.fdopen(fd, "wb")
        self._hashing = _HashingFile(self._fh)
        # a 1 MiB stream buffer: tarfile's default (10 KiB) re-slices its buffer once per 10 KiB written
        self._tar = tarfile.open(fileobj=self._hashing, mode="w|", format=tarfile.GNU_FORMAT, bufsize=1 << 20)
        self.samples = 0
        self.tokens = 0
        self._keys: set[str] = set()

    def _add(self, member: str, data: bytes | _Chain) -> None:
        if not isinstance(data, _Chain):
            data = _Chain(data)
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = data.size, 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, data)

    def add(self, key: str, tokens: np.ndarray, acts: np.ndarray, meta: dict | None = None) -> None:
        if "." in key or "/" in key:
            raise ShardError(f"{self.name}: sample key {key!r} may not contain '.' or '/'")
        if key in self._keys:
            raise ShardError(f"{self.name}: duplicate sample key {key!r}")
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ShardError(f"{self.name}/{key}: tokens must be 1-D, got shape {tokens.shape}")
        if acts.ndim != 2 or acts.shape != (tokens.shape[0], self.width):
            raise ShardError(
                f"{self.name}/{key}: acts must be [T={tokens.shape[0]}, D={self.width}], got {acts.shape}"
            )
        self._keys.add(key)
        with naming(self.tmp_path):
            self._add(f"{key}.tokens.npy", _npy(tokens.astype(np.int32, copy=False)))
            self._add(f"{key}.acts.npy", _npy(acts.astype(self.dtype, copy=False)))
            self._add(f"{key}.json", json.dumps(meta or {}, sort_keys=True).encode())
        self.samples += 1
        self.tokens += int(tokens.shape[0])

    def commit(self) -> ShardInfo:
        with naming(self.tmp_path):
            self._tar.close()
            self._fh.close()
        info = ShardInfo(self.name, self.samples, self.tokens, self._hashing.size, self._hashing.sha.hexdigest())
        try:
            self.root.commit_file(self.tmp_path, self.name)
        except BaseException:
            self.abort()
            raise
        self._release()
        return info

    def abort(self) -> None:
        try:
            with contextlib.suppress(OSError):  # the file is discarded: a full disk failing its flush is moot
                self._tar.close()
            with contextlib.suppress(OSError):
                self._fh.close()
        finally:
            if os.path.exists(self.tmp_path):
                os.unlink(self.tmp_path)
            self._release()

    def _release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._lock >= 0:  # neither committed nor aborted
            self.abort()


def sweep_partial_shards(tmp_dir: str | None = None) -> tuple[int, int]:
    """Remove the temporary shard files that killed writers left in ``tmp_dir`` (the system's
    temporary directory by default): a harvest actor killed mid-shard (out of memory, a preempted
    node) cannot remove its own, and each is up to a shard's size. A file whose writer lives is
    locked and kept. Returns (files, bytes) removed."""
    files = freed = 0
    for path in Path(tmp_dir or tempfile.gettempdir()).glob(f"shard-*{PART_SUFFIX}"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = os.fstat(fd).st_size
            path.unlink()
            files, freed = files + 1, freed + size
        except OSError:
            pass  # its writer lives (or another sweep took it first)
        finally:
            os.close(fd)
    return files, freed


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class Sample:
    key: str
    tokens: np.ndarray  # int32 [T]
    acts: np.ndarray  # [T, D]
    meta: dict


def read_shard(root: Root, info: ShardInfo, manifest: Manifest, verify: bool = True) -> list[Sample]:
    """Read and validate one whole shard; every problem raises ShardError naming the shard."""
    where = root.url_of(info.name)
    try:
        data = root.read_bytes(info.name)
    except FileNotFoundError:
        raise ShardError(f"{where}: listed in the manifest but missing") from None
    if verify:
        if len(data) != info.bytes:
            raise ShardError(f"{where}: {len(data)} bytes, manifest says {info.bytes} (truncated or rewritten)")
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise ShardError(f"{where}: sha256 {digest[:12]}… does not match the manifest's {info.sha256[:12]}…")
    samples = parse_shard(data, manifest, where)
    if len(samples) != info.samples:
        raise ShardError(f"{where}: {len(samples)} samples, manifest says {info.samples}")
    return samples


def parse_shard(data: bytes, manifest: Manifest, where: str) -> list[Sample]:
    members: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if key not in members:
                    members[key] = {}
                    order.append(key)
                content = tar.extractfile(member)
                members[key][ext] = content.read() if content is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{where}: truncated or corrupt tar: {e}") from None
    expected_dtype = np.dtype(manifest.dtype)
    out = []
    for key in order:
        parts = members[key]
        for ext in ("tokens.npy", "acts.npy", "json"):
            if ext not in parts:
                raise ShardError(f"{where}: sample {key!r} has no {ext} (truncated or corrupt shard)")
        try:
            tokens = np.load(io.BytesIO(parts["tokens.npy"]), allow_pickle=False)
            acts = np.load(io.BytesIO(parts["acts.npy"]), allow_pickle=False)
            meta = json.loads(parts["json"])
        except (ValueError, EOFError, json.JSONDecodeError) as e:
            raise ShardError(f"{where}: sample {key!r} cannot be decoded: {e}") from None
        if acts.dtype != expected_dtype:
            raise ShardError(f"{where}: sample {key!r} acts dtype {acts.dtype}, manifest says {manifest.dtype}")
        if acts.ndim != 2 or acts.shape[1] != manifest.width:
            raise ShardError(
                f"{where}: sample {key!r} acts shape {acts.shape}, manifest sources "
                f"{manifest.source_names} have total width {manifest.width}"
            )
        if tokens.ndim != 1 or tokens.shape[0] != acts.shape[0] or tokens.dtype != np.int32:
            raise ShardError(
                f"{where}: sample {key!r} tokens {tokens.dtype}{list(tokens.shape)} do not match acts rows "
                f"{acts.shape[0]}"
            )
        out.append(Sample(key, tokens, acts, meta))
    return out


def check_sizes(root: Root, manifest: Manifest) -> None:
    """Every shard the manifest lists is there with its size, from one listing (no download);
    raises ShardError naming the missing or truncated shards and what to do."""
    listed = root.stat_all()
    bad = [f"{s.name} ({'missing' if s.name not in listed else f'{listed[s.name][0]} bytes, manifest says {s.bytes}'})"
           for s in manifest.shards if s.name not in listed or listed[s.name][0] != s.bytes]
    if bad:
        raise ShardError(f"{root.url}: {len(bad)} of {len(manifest.shards)} shards are missing or truncated: "
                         f"{', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; re-run the harvest to redo them "
                         "(`crosscoder validate ROOT --full` checks every shard's sha256)")


def validate(root: Root, full: bool = False, progress: bool = True) -> Manifest:
    """Check a dataset: the manifest, every shard's size (one listing) and, with ``full``, every
    shard's sha256 and samples, and that every activation is finite (reads them all, with a
    progress bar; training does not pay for the finiteness pass). Raises ShardError; with ``full``,
    one that names every bad shard (up to 5, and how many), so they can be redone in one harvest."""
    from .progress import progress_bar

    manifest = read_manifest(root)
    check_sizes(root, manifest)
    if not full:
        return manifest
    bad: list[tuple[str, str]] = []  # (shard, its problem: a message that begins with the shard's url)
    for info in progress_bar(manifest.shards, desc="validate", unit="shard", disable=not progress):
        try:
            problem = _nonfinite(root.url_of(info.name), read_shard(root, info, manifest, verify=True), manifest)
        except ShardError as error:
            problem = str(error)
        if problem:
            bad.append((info.name, problem))
    if not bad:
        return manifest
    them = "the shard" if len(bad) == 1 else "them"
    redo = (f"delete {them} and re-run, which writes the synthetic data again" if "synthetic" in manifest.extra
            else f"delete {them} and re-run the harvest, which redoes only the missing shards (naming the cause "
                 "if it recurs)")
    if len(bad) == 1:
        raise ShardError(f"{bad[0][1]}; {redo}")
    shown = "; ".join(problem.replace(root.url_of(name), name, 1) for name, problem in bad[:5])
    raise ShardError(f"{root.url}: {len(bad)} of {len(manifest.shards)} shards are bad: {shown}"
                     f"{' …' if len(bad) > 5 else ''}; {redo}")


def _nonfinite(where: str, samples: list[Sample], manifest: Manifest) -> str:
    """The first sample holding an inf or NaN and its source, or ``""``."""
    for sample in samples:
        if not np.isfinite(sample.acts).all():
            column = int(np.argmax(~np.isfinite(sample.acts).all(0)))
            ends = np.cumsum([s.d for s in manifest.sources])
            name = manifest.sources[int(np.searchsorted(ends, column, side="right"))].name
            return f"{where}: sample {sample.key!r} holds inf or NaN activations (source {name!r})"
    return ""


def iter_samples(root: Root, manifest: Manifest | None = None, verify: bool = True) -> Iterator[Sample]:
    """Every sample of a dataset, in manifest order."""
    manifest = manifest or read_manifest(root)
    for info in manifest.shards:
        yield from read_shard(root, info, manifest, verify=verify)


def check_compatible(manifest: Manifest, sources: list[str], widths: list[int], where: str) -> None:
    """Raise if a dataset's sources differ from what a model or checkpoint expects."""
    got = [(s.name, s.d) for s in manifest.sources]
    want = list(zip(sources, widths))
    if got != want:
        raise ShardError(f"{where}: sources {got} do not match the expected {want}")
