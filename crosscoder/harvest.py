"""Harvest activations from a list of models into shards, with a pool of Ray actors.

The driver tokenizes the documents once and *plans* the dataset: chunk list → shard n holds chunks
``[n·S, (n+1)·S)``. A pool of actors, each hosting every model (split over the actor's devices
with ``device_map`` when needed), takes shards: for each it runs the models only as deep as the
deepest hook (language_models.py), writes the shard locally and commits it to the output root atomically
(storage.py). A shard's bytes are a pure function of (config, chunk plan, n), so a shard redone
after an actor died, or skipped on a re-run because the manifest already lists it with a matching
sha256, is exactly the shard an uninterrupted run writes; a re-run whose config or plan differs
(the manifest records both) is refused rather than mixed, with one exception: a harvest that only
plans *more* (a larger ``harvest.tokens``, documents appended to the file) keeps the full shards of
the smaller one, since its plan starts with the same chunks (checked by the sha256 of that prefix).

Only the driver writes ``manifest.json``: at most every ``MANIFEST_EVERY_S`` while shards commit
(listing only complete shards, ``harvest.complete = false``), when the harvest stops (retries
spent, a permanent error, Ctrl-C: a re-run keeps the shards done), and at the end with the
normalisation scales computed from every shard's per-source norm sums (``norm_scale[s] = √d_s /
E‖x_s‖``). The root is held for the harvest (run_lock.shared_root: a flock, or a lease on S3): a
second harvest into it, as a sweep of configs over one dataset starts, waits and then keeps the
shards. A finished dataset is checked by one listing and nothing is written to it (it may be
read-only). Costs: the plan holds all token ids in the driver's memory (4 bytes per token: 400 MB for
100M tokens), and a retried shard's partial work is lost.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import faults
from .config import ConfigError, RunConfig, from_dict, model_name, to_dict
from .documents import Chunk, DataError, check_same_tokenizer, plan_chunks, read_documents, tokenization_key
from .errors import CrosscoderError
from .language_models import (
    ActivationReader,
    ModelError,
    ModelSpec,
    check_hooks,
    load_config,
    load_tokenizer,
    load_trunk,
)
from .progress import progress_bar
from .ray_connect import (
    CodeMismatch,
    check_code,
    code_fingerprint,
    connect,
    first_line,
    memory_request,
    note_gpu_wait,
    process_died,
    worker_env,
)
from .relocation import shards_mover
from .run_lock import shared_root
from .shards import (
    Manifest,
    ManifestMissing,
    ShardError,
    ShardInfo,
    ShardWriter,
    SourceInfo,
    read_manifest,
    shard_name,
    sweep_partial_shards,
    write_manifest,
)
from .shared_paths import check_nodes_see
from .storage import Root, StorageError, absolute_url, open_root
from .telemetry import HarvestMetrics


def model_specs(cfg: RunConfig) -> list[ModelSpec]:
    """The harvest's models (their tables are checked by config.validate)."""
    if not cfg.harvest.models:
        raise HarvestError("no models to harvest: list them in harvest.models, or set harvest.demo_pair = true (the "
                           "demo base/chat pair) or organism.directory")
    return [ModelSpec(name=model_name(m, i), path=m["path"], revision=m.get("revision"),
                      dtype=m.get("dtype", "float32"), device_map=m.get("device_map"), max_memory=m.get("max_memory"),
                      hooks=list(m.get("hooks", cfg.harvest.hooks)))
            for i, m in enumerate(cfg.harvest.models)]


def source_names(models: list[ModelSpec]) -> list[tuple[str, ModelSpec, str]]:
    """Sources in manifest order: each model × its hooks; named by model, or model@hook where a
    model has several hooks."""
    return [(m.name if len(m.hooks) == 1 else f"{m.name}@{h}", m, h) for m in models for h in m.hooks]


class ShardHarvester:
    """Hosts the models and writes whole shards; used by each Ray actor (and directly in tests).

    An actor with GPUs (``harvest.gpus_per_actor``) puts each model on its GPU, or splits it over
    them with the model's ``device_map``. Chunks are run ``harvest.batch_size`` at a time, right-padded
    with an attention mask (a causal model's real tokens never see the padding after them), so
    chunks of different lengths, as chat data has, share a forward. On a GPU each batch's activations
    go to pinned host memory without blocking, and are written while the next batch runs.
    """

    def __init__(self, config: dict, actor_index: int = 0, code: str | None = None):
        check_code(code, f"harvest actor {actor_index}")
        self.cfg = from_dict(RunConfig, config)
        hc = self.cfg.harvest
        self.device = "cuda" if hc.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu"
        if hc.gpus_per_actor > 0 and self.device == "cpu":  # a CPU build of torch on a GPU node: say so, once
            print(f"harvest actor {actor_index}: harvest.gpus_per_actor = {hc.gpus_per_actor:g}, but this process sees "
                  f"no CUDA device (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                  f"{os.environ.get('CUDA_VISIBLE_DEVICES', '')!r}): harvesting on the CPU",
                  file=sys.stderr, flush=True)
        self.models = model_specs(self.cfg)
        self.readers = {}
        for spec in self.models:
            spec.device = self.device
            model, paths = load_trunk(spec, spec.hooks)
            self.readers[spec.name] = ActivationReader(model, paths, spec.name, shown=spec.hooks)
        tokenizer = load_tokenizer(self.models[0].path, self.models[0].revision)
        self.prefix = prefix_token(tokenizer, hc.prefix)
        self.pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        self.root = open_root(hc.output, self.cfg.storage)
        self.actor_index = actor_index
        self.metrics = HarvestMetrics(self.cfg.metrics.port, actor_index, host=self.cfg.metrics.host, run=self.cfg.name)

    def activations(self, tokens: list, firsts: list[bool] | None = None
                    ) -> tuple[torch.Tensor, list[np.ndarray], torch.Tensor]:
        """For chunks of any lengths (``firsts``: which begin their document; all by default): acts
        [B, T, D] on the models' device (sources concatenated, stored dtype; rows past a chunk's
        length are padding), the stored token ids, and per source the sum of their activation norms
        [S] (float64). A document's first chunk is run behind the prefix token (harvest.prefix),
        stored only with keep_bos; later chunks start with their own first token."""
        hc = self.cfg.harvest
        firsts = firsts if firsts is not None else [True] * len(tokens)
        prefixed = [self.prefix is not None and first for first in firsts]
        rows = [np.concatenate([np.asarray([self.prefix] if p else [], dtype=np.int64), np.asarray(t, dtype=np.int64)])
                for t, p in zip(tokens, prefixed)]
        ids = torch.full((len(rows), max(map(len, rows))), self.pad, dtype=torch.long, device="cpu")
        mask = torch.zeros(ids.shape, dtype=torch.long, device="cpu")
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.from_numpy(row)
            mask[i, : len(row)] = 1
        skips = [1 if p and not hc.keep_bos else 0 for p in prefixed]
        lengths = [len(row) - skip for row, skip in zip(rows, skips)]
        parts = [act for spec in self.models for act in self.readers[spec.name].read(ids, mask)]
        # one pass per source and row: converted to the stored dtype while copied into its columns and
        # left-aligned (no float32 concatenation first), on the device of the first part
        device = parts[0].device
        joined = torch.zeros(len(rows), max(lengths), sum(p.shape[-1] for p in parts), dtype=getattr(torch, hc.dtype),
                             device=device)
        norms = torch.zeros(len(parts), dtype=torch.float64, device=device)
        start = 0
        for s, part in enumerate(parts):
            for i, (skip, n) in enumerate(zip(skips, lengths)):
                stored = part[i, skip : skip + n]
                joined[i, :n, start : start + part.shape[-1]].copy_(stored)
                norms[s] += torch.linalg.vector_norm(stored, dim=-1, dtype=torch.float64).sum().to(device)
            start += part.shape[-1]
        stored_ids = [np.asarray(row[skip:], dtype=np.int32) for row, skip in zip(rows, skips)]
        return joined, stored_ids, norms

    def write(self, index: int, chunks: list[Chunk]) -> dict:
        hc = self.cfg.harvest
        started = time.time()
        # each shard first removes what writers killed on this node left (an actor that dies mid-shard
        # cannot): checked by each file's lock, a few files at most
        files, freed = sweep_partial_shards()
        if files:
            print(f"harvest actor {self.actor_index}: removed {files} partial shard file(s) ({freed / 2**20:.0f} MiB) "
                  f"that killed harvest actors left in {tempfile.gettempdir()}", file=sys.stderr, flush=True)
        width = sum(sum(r.width) for r in self.readers.values())
        norm_sum: torch.Tensor | float = 0.0
        waiting: tuple | None = None  # the previous batch: (chunks, host acts, ids, copy event, finite, norms)

        def flush(batch, host, ids, event, finite, norms):
            if event is not None:
                event.synchronize()
            if not bool(finite):
                raise self.non_finite(index, batch, host, norms)
            for c, a, t in zip(batch, host, ids):
                writer.add(f"{c.doc:08d}-{c.index:04d}", t, a[: len(t)].numpy(),
                           {"doc": c.doc, "chunk": c.index, "offset": c.offset, "chat": c.chat})

        with ShardWriter(self.root, shard_name(index), width=width, dtype=hc.dtype) as writer:  # removed on an error
            for i in range(0, len(chunks), hc.batch_size):
                batch = chunks[i : i + hc.batch_size]
                acts, ids, norms = self.activations([c.tokens for c in batch], [c.index == 0 for c in batch])
                norm_sum = norm_sum + norms
                finite = torch.isfinite(acts).all()  # read when the batch is written: no wait for the device here
                event = None
                if acts.device.type == "cuda":  # to pinned memory without blocking; written after the next forward
                    host = torch.empty(acts.shape, dtype=acts.dtype, device="cpu", pin_memory=True)
                    host.copy_(acts, non_blocking=True)
                    finite = torch.empty((), dtype=torch.bool, device="cpu", pin_memory=True).copy_(finite,
                                                                                                   non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    acts = host
                if waiting is not None:
                    flush(*waiting)
                waiting = (batch, acts, ids, event, finite, norms)
                if i + len(batch) >= len(chunks) // 2:
                    faults.point("harvest", f"shard {index} half")
            if waiting is not None:
                flush(*waiting)
            info = writer.commit()
        info.stats = {"norm_sum": torch.as_tensor(norm_sum, device="cpu").tolist()}
        info.etag = self.root.version_tag(info.name)  # a resume checks this, not the bytes
        seconds = time.time() - started
        self.metrics.shard(info.tokens, seconds)
        return {"index": index, "info": asdict(info), "seconds": seconds}

    def non_finite(self, index: int, batch: list[Chunk], acts: torch.Tensor, norms: torch.Tensor) -> ModelError:
        """The error for a batch with an inf or NaN to store: the model produced it (a model run in
        float16 overflows; Gemma's do), or a finite value beyond float16's range met harvest.dtype."""
        names = [name for name, _, _ in source_names(self.models)]
        widths = [w for spec in self.models for w in self.readers[spec.name].width]
        start = 0
        for name, width, norm in zip(names, widths, norms.cpu().tolist()):
            part = acts[..., start : start + width]
            start += width
            rows = (~torch.isfinite(part)).flatten(1).any(1).nonzero().flatten().tolist()
            if not rows:
                continue
            where = f"{shard_name(index)}, source {name!r}, document {batch[rows[0]].doc} of the plan"
            if not math.isfinite(norm):
                return ModelError(f"{where}: the model produced inf or NaN activations (a model run in float16 "
                                  "overflows; Gemma's do): load it in bfloat16 or float32 (dtype in harvest.models)")
            return ModelError(f"{where}: activations beyond float16's range (65504): store them as float32 "
                              "(harvest.dtype = float32)")
        return ModelError(f"{shard_name(index)}: inf or NaN activations")


def prefix_token(tokenizer, setting: str) -> int | None:
    """The token a document's first chunk is run behind (harvest.prefix): bos, eos, none or token:<text>."""
    if setting == "none":
        return None
    if setting in ("bos", "eos"):
        token_id = getattr(tokenizer, f"{setting}_token_id")
        if token_id is None:  # Qwen2's tokenizers have no BOS: without a prefix a document's first token
            # becomes the attention sink, with outlier norms, and would be stored
            raise ConfigError(f"harvest.prefix = {setting!r}: the tokenizer of {tokenizer.name_or_path} has no "
                              f"{setting.upper()} token; set harvest.prefix = "
                              f"{'eos' if setting == 'bos' else 'bos'}, token:<text> or none")
        return int(token_id)
    token = setting.removeprefix("token:")
    ids = tokenizer.convert_tokens_to_ids([token])
    # an unknown token maps to the unknown token's id; the unknown token itself is a token (SmolLM2's
    # GGUF tokenizer names <|endoftext|>, its document separator, as its unknown token)
    if not ids or ids[0] is None or (ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ConfigError(f"harvest.prefix = {setting!r}: the tokenizer has no such token")
    return int(ids[0])


class HarvestError(CrosscoderError, RuntimeError):
    """A shard could not be harvested; the message names it and the cause."""


PERMANENT = (ModelError, DataError, ShardError, StorageError, ConfigError, CodeMismatch)  # a retry would fail again
DISK_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a retry at once would write into the same disk


def give_up_if_permanent(error: BaseException, shard: str) -> None:
    """Raise at once, without retries, what no retry can mend: our own errors raised in an actor
    (a missing model, bad data, an unreachable store, mismatched code), a disk that refused the
    shard (full, over quota, read-only: the retry would redo the shard's forward passes into the
    same disk), and an actor that failed to start for one of these reasons."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, PERMANENT):
        raise cause
    if isinstance(cause, OSError) and cause.errno in DISK_REFUSED:
        raise HarvestError(f"{shard} could not be written ({type(cause).__name__}: {cause}); free space (or raise "
                           "the quota) and re-run the same command: the committed shards are kept") from None
    if getattr(error, "actor_init_failed", False):
        raise HarvestError(f"the harvest actor could not start ({first_line(error)}); {shard} was not written")


def estimated_actor_memory(models: list[ModelSpec], gpus: float = 0.0) -> float:
    """Host bytes an actor needs: its models' weight files, converted to the loaded dtype, and 1 GiB
    for the rest; 0 (no request) when a model is a hub id whose files are not here. An actor with
    GPUs loads its models straight onto them, so their weights count only where accelerate may
    offload a model to the host (a ``device_map`` with no ``max_memory``, or one naming ``cpu``): a
    pair of 70B models on a GPU node with less RAM than their weights still schedules."""
    size = {"float32": 4, "bfloat16": 2, "float16": 2}
    total = float(2**30)
    for m in models:
        if gpus > 0 and (m.device_map is None or (m.max_memory and "cpu" not in m.max_memory)):
            continue
        where = Path(m.path).expanduser()
        files = [*where.glob("*.safetensors"), *where.glob("*.bin")]
        if not files or not (where / "config.json").is_file():
            return 0
        config = json.loads((where / "config.json").read_text())
        stored = size.get(config.get("torch_dtype") or config.get("dtype") or "float32", 4)
        total += sum(f.stat().st_size for f in files) * size.get(m.dtype, 4) / stored
    return total


MANIFEST_EVERY_S = 60.0  # the manifest is rewritten at most this often during a harvest, and at the end


def harvest_settings(cfg: RunConfig, n_chunks: int) -> dict:
    """What decides a harvest's shards: its [harvest] settings but where and how fast it runs, the
    number of chunks, and the documents file's sha256. Recorded in the manifest, so a root of
    another harvest is refused naming the settings that differ."""
    hc = cfg.harvest
    key = {k: v for k, v in asdict(hc).items() if k not in ("actors", "cpus_per_actor", "gpus_per_actor", "output",
                                                            "max_retries", "batch_size")}
    key["n_chunks"] = n_chunks
    data = Path(hc.data)
    if data.is_file():
        key["data_sha256"] = hashlib.sha256(data.read_bytes()).hexdigest()
    return json.loads(json.dumps(key))


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _differing(there: dict, here: dict) -> list[str]:
    return sorted(k for k in set(there) | set(here) if there.get(k) != here.get(k))


def another_harvest(root: Root, recorded: dict, settings: dict, planned: bool = True) -> str:
    """Why a root holding another harvest is refused: `; harvest.tokens = 1000 there, 2000 here` for
    each setting that differs (values shortened), and what to do. Without the chunk plan
    (``planned`` False) the settings a harvest grows by are left out, and so is this config's
    fingerprint (it covers the plan)."""
    def short(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."
    names = {"n_chunks": "chunks planned", "data_sha256": "sha256 of harvest.data"}
    there = recorded.get("settings", {})
    keys = [k for k in _differing(there, settings) if planned or k not in GROWABLE] if there else []
    differ = "".join(f"; {names.get(k, 'harvest.' + k)} = {short(there.get(k))} there, {short(settings.get(k))} here"
                     for k in keys)
    shrinks = keys and set(keys) <= GROWABLE and there.get("n_chunks", 0) > settings["n_chunks"]
    as_they_are = ("to train on its shards as they are, name them as train.data in a config without harvest models "
                   "(as launch/configs/demo-l1.toml does)")
    hint = ("a harvest grows in place but does not shrink: train on it with fewer train.steps, or use another "
            "harvest.output") if shrinks else f"use another harvest.output or delete it; {as_they_are}"
    this = f", this config {fingerprint(settings)}" if planned else ""
    return (f"{root.url}: holds shards of a different harvest (fingerprint {recorded.get('fingerprint')}{this}"
            f"{differ}); {hint}")


GROWABLE = {"tokens", "n_chunks", "data_sha256"}  # settings a harvest may grow by, its plan's prefix unchanged


def grows(recorded: dict, settings: dict, chunks: list[Chunk]) -> int | None:
    """The number of chunks the root's harvest planned, when this harvest plans more and starts with
    the same ones (the sha256 of this plan's prefix is the recorded plan's): a larger
    ``harvest.tokens``, or documents appended to the file. Else None."""
    there = recorded.get("settings")
    if there is None or "plan_sha256" not in recorded:
        return None
    differ, held = _differing(there, settings), there.get("n_chunks", 0)
    if not differ or not set(differ) <= GROWABLE or not 0 < held <= len(chunks):
        return None
    return held if plan_digest(chunks[:held]) == recorded["plan_sha256"] else None


def smaller_harvest(root: Root, recorded: dict, settings: dict, chunks: list[Chunk]) -> int | None:
    """None where the root holds this harvest (``recorded``: its manifest's ``harvest`` block); the
    chunks it holds where this harvest grows it (:func:`grows`); else the root is refused."""
    if recorded.get("fingerprint") == fingerprint(settings):
        return None
    held = grows(recorded, settings, chunks)
    if held is None:
        raise ShardError(another_harvest(root, recorded, settings))
    return held


def recorded_harvest(root: Root, manifest: Manifest) -> dict:
    """The root's manifest's ``harvest`` block, compared with this config's settings. In a run
    directory moved or copied since (``relocation.shards_mover``), the models and documents its
    shards recorded under the old directory are read under the new one, and the fingerprint
    recomputed, so the run goes on there; the manifest itself is left as written."""
    recorded = manifest.extra.get("harvest", {})
    there = recorded.get("settings")
    if not root.is_local or there is None or recorded.get("fingerprint") != fingerprint(there):
        return recorded
    move = shards_mover(root.path, recorded.get("output"))
    here = dict(there)
    if isinstance(there.get("models"), list):
        here["models"] = [m | {"path": move(m["path"])} if isinstance(m.get("path"), str) else m
                          for m in there["models"]]
    if isinstance(there.get("data"), str):
        here["data"] = move(there["data"])
    return recorded if here == there else dict(recorded, settings=here, fingerprint=fingerprint(here))


def refuse_another_harvest(cfg: RunConfig, root: Root | None = None) -> Manifest | None:
    """Refuse, before the models are loaded (or the demo pair trained) and the documents tokenized,
    an output root whose manifest is of a harvest that differs from this one in a setting it cannot
    grow by (the models, layers, seq_len, ...), or of no harvest at all (planted synthetic shards):
    :func:`smaller_harvest` refuses them too, but only once the chunk plan is made. Settings a
    harvest grows by (harvest.tokens, the documents) wait for the plan. Returns the root's manifest
    (None for an empty root), which the caller reads no second time."""
    cfg = with_absolute_paths(cfg)
    if root is None:
        root = open_root(cfg.harvest.output, cfg.storage)
        if not root.is_local:
            root.check_writable()  # an unreachable store or a missing bucket: harvest's own error, as early
    try:
        manifest = read_manifest(root)
    except ManifestMissing:
        return None
    recorded = recorded_harvest(root, manifest)
    settings, there = harvest_settings(cfg, 0), recorded.get("settings")
    if "fingerprint" not in recorded or there is not None and set(_differing(there, settings)) - GROWABLE:
        raise ShardError(another_harvest(root, recorded, settings, planned=False))
    return manifest


def plan_digest(chunks: list[Chunk]) -> str:
    """sha256 of the chunk plan, each chunk's place and token ids: what the shards hold, whatever
    changed it since (the documents, a hub dataset's revision, the tokenizer, the tokenization)."""
    digest = hashlib.sha256()
    for c in chunks:
        digest.update(np.asarray([c.doc, c.index, c.offset, int(c.chat), len(c.tokens)], dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(c.tokens, dtype=np.int32).tobytes())
    return digest.hexdigest()


def committed_shards(root: Root, settings: dict, plan: str, manifest: Manifest | None = None,
                     chunks: list[Chunk] | None = None, per: int = 1) -> dict[str, ShardInfo]:
    """Shards a previous run of the same harvest committed, checked by size and the store's version
    tag from one listing (a shard recorded without a tag is read and its sha256 checked). Another
    config, or the same config with another chunk plan (``plan``: :func:`plan_digest`; manifests
    written before it was recorded are not compared), is refused: resuming would mix the two. A
    smaller harvest this one grows (:func:`grows`; ``chunks``: this plan, ``per`` chunks a shard)
    gives its full shards; its last shard, when partial, holds more chunks here and is redone.
    ``manifest``: the root's, when the caller has read it already."""
    if manifest is None:
        try:
            manifest = read_manifest(root)
        except ManifestMissing:
            return {}
    recorded, kept, chunks = recorded_harvest(root, manifest), manifest.shards, chunks or []
    held = smaller_harvest(root, recorded, settings, chunks)
    if held is not None:
        # a shard is the same where its chunks are the same: every full one, and the last one too when
        # only harvest.tokens moved within the last chunk (the same plan)
        same = held // per if held < len(chunks) else math.ceil(held / per)
        kept = [info for info in manifest.shards if info.name in {shard_name(n) for n in range(same)}]
        if held == len(chunks):
            told = f"holds the {held} chunks planned here (harvest.tokens or the documents changed past them): " \
                   "keeping every shard"
        else:
            names = {0: "no shard (none is full)", 1: shard_name(0)}.get(same,
                                                                          f"{shard_name(0)} … {shard_name(same - 1)}")
            told = f"holds the first {held} of the {len(chunks)} chunks planned here (a smaller harvest.tokens or " \
                   f"fewer documents): growing it, keeping {names}"
        print(f"harvest: {root.url} {told}", flush=True)
    elif recorded.get("plan_sha256", plan) != plan:
        raise ShardError(
            f"{root.url}: holds shards of this config but of another chunk plan (plan {recorded['plan_sha256'][:12]}…, "
            f"now {plan[:12]}…): the documents, the tokenizer or the tokenization changed since; use another "
            "harvest.output or delete it"
        )
    listed = root.stat_all()
    ok = {}
    for info in kept:
        size, tag = listed.get(info.name, (-1, None))
        if size != info.bytes:
            continue  # missing or truncated: redone
        if info.etag is not None and tag == info.etag:
            ok[info.name] = info
        elif hashlib.sha256(root.read_bytes(info.name)).hexdigest() == info.sha256:
            ok[info.name] = replace(info, etag=tag)
    return ok


def finished_harvest(root: Root, settings: dict, plan: str, chunks: list[Chunk], per: int) -> Manifest | None:
    """The manifest of this harvest when it is complete and every shard is as recorded (one
    listing, nothing written), else None; another harvest's root is refused, before anything is written."""
    try:
        manifest = read_manifest(root)
    except ManifestMissing:
        return None
    recorded = recorded_harvest(root, manifest)
    if smaller_harvest(root, recorded, settings, chunks) is not None:
        return None  # a smaller harvest, which this one grows
    if not recorded.get("complete") or len(manifest.shards) != math.ceil(len(chunks) / per):
        return None
    intact = as_recorded(root, settings, plan, manifest)  # refuses another plan's root
    # a manifest written before the plan was recorded is not finished: it is rewritten with the plan
    return intact if recorded.get("plan_sha256") == plan else None


def as_recorded(root: Root, settings: dict, plan: str, manifest: Manifest) -> Manifest | None:
    """``manifest`` when every shard it lists is in the root as recorded (committed_shards: one
    listing), else None."""
    done = committed_shards(root, settings, plan, manifest)
    return manifest if all(done.get(info.name) == info for info in manifest.shards) else None


def finished_unchanged(root: Root, settings: dict, key: str | None, manifest: Manifest | None) -> Manifest | None:
    """The manifest of this harvest, complete and every shard as recorded, when nothing that decides
    its plan changed since it was written: the settings, the documents file's sha256 and the
    tokenization (``key``: documents.tokenization_key). Else None, and the plan is made and compared
    (:func:`finished_harvest`): a ``hf:`` dataset (no file to hash), a slow tokenizer, a grown or
    other harvest, a manifest that predates the key, a missing or changed shard. ``manifest``: the
    root's, None where it has none."""
    if key is None or "data_sha256" not in settings or manifest is None:
        return None
    recorded = recorded_harvest(root, manifest)
    there = recorded.get("settings", {})
    if recorded.get("tokenization") != key or "n_chunks" not in there or "plan_sha256" not in recorded:
        return None
    settings = dict(settings, n_chunks=there["n_chunks"])
    if recorded.get("fingerprint") != fingerprint(settings) or not recorded.get("complete") \
            or len(manifest.shards) != recorded.get("planned_shards"):
        return None
    return as_recorded(root, settings, recorded["plan_sha256"], manifest)


def build_manifest(cfg, sources, widths, infos: list[ShardInfo], tokenizer: str, settings: dict, planned: int,
                   plan: str, tokenization: str | None = None) -> Manifest:
    hc = cfg.harvest
    infos = sorted(infos, key=lambda s: s.name)
    complete = len(infos) == planned
    norm_scale = []
    stats = [i.stats for i in infos]
    if infos and all(s is not None for s in stats):
        sums = np.sum([s["norm_sum"] for s in stats if s is not None], axis=0)
        tokens = sum(i.tokens for i in infos)
        norm_scale = [float(math.sqrt(d) / max(s / tokens, 1e-12)) for d, s in zip(widths, sums)]
    return Manifest(
        sources=[SourceInfo(name, d, model=m.path, revision=m.revision, hook=h)
                 for (name, m, h), d in zip(sources, widths)],
        dtype=hc.dtype, seq_len=hc.seq_len, tokenizer=tokenizer, norm_scale=norm_scale, shards=infos,
        extra={"harvest": {"fingerprint": fingerprint(settings), "settings": settings, "plan_sha256": plan,
                           "tokenization": tokenization, "complete": complete, "planned_shards": planned,
                           "models": hc.models, "hooks": hc.hooks, "data": hc.data, "keep_bos": hc.keep_bos,
                           "prefix": hc.prefix, "output": hc.output}},
    )


def model_widths(models: list[ModelSpec]) -> list[int]:
    """Each source's width, from its model's config; every hook is checked on the model's skeleton
    on the way (language_models.check_hooks), before any actor loads a model."""
    widths = []
    for m in models:
        config = load_config(m.name, m.path, m.revision)
        check_hooks(config, m.hooks, m.name)
        widths += [int(config.hidden_size)] * len(m.hooks)
    return widths


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` whose local output, data and model paths are absolute: actors run in other
    working directories. Hub ids, ``hf:`` datasets and ``s3://`` roots stay as they are."""
    cfg = copy.deepcopy(cfg)
    hc = cfg.harvest
    hc.output = absolute_url(hc.output)
    if hc.data and not hc.data.startswith("hf:"):
        hc.data = str(Path(hc.data).expanduser().absolute())
    for m in hc.models:
        if Path(m["path"]).expanduser().exists():
            m["path"] = str(Path(m["path"]).expanduser().absolute())
    return cfg


def harvest(cfg: RunConfig, progress: bool = True) -> Manifest:
    """Run (or resume) the harvest described by ``cfg.harvest``; returns the final manifest."""
    cfg = with_absolute_paths(cfg)
    hc = cfg.harvest
    models = model_specs(cfg)
    if not hc.output:
        raise HarvestError("harvest.output is empty: set a path, file://… or s3://bucket/prefix")
    widths = model_widths(models)  # a misspelt hook stops here, before the documents are tokenized
    tokenizers = {m.name: load_tokenizer(m.path, m.revision) for m in models}
    check_same_tokenizer(tokenizers)
    tokenizer = tokenizers[models[0].name]
    prefix_token(tokenizer, hc.prefix)  # a prefix the tokenizer lacks stops here, before Ray starts
    chat_tokenizer = next((t for t in reversed(list(tokenizers.values())) if getattr(t, "chat_template", None)),
                          tokenizer)
    root = open_root(hc.output, cfg.storage)
    if not root.is_local:
        root.check_writable()  # the store answers and the bucket exists (a listing): one clear error, early
    existing = refuse_another_harvest(cfg, root)  # before the documents are tokenized
    settings, key = harvest_settings(cfg, 0), tokenization_key(tokenizer, chat_tokenizer)
    finished = finished_unchanged(root, settings, key, existing)
    if finished is not None:  # a re-run (a resumed `crosscoder run`): no tokenizing to find that out
        print(f"harvest: {root.url} holds this harvest, complete; its documents, tokenizer and settings are "
              "unchanged, so they are not tokenized again", flush=True)
        return finished
    chunks = plan_chunks(read_documents(hc.data), tokenizer, chat_tokenizer, hc.seq_len, hc.tokens,
                         progress=progress)
    if not chunks:
        raise HarvestError(f"{hc.data}: no documents with at least 2 tokens")
    planned = sum(len(c.tokens) for c in chunks)
    if planned < hc.tokens:
        print(f"harvest: {hc.data} holds {planned} tokens in chunks of at least 2, fewer than harvest.tokens = "
              f"{hc.tokens}; harvesting them all", flush=True)
    per = hc.samples_per_shard
    plan = [chunks[i : i + per] for i in range(0, len(chunks), per)]
    sources = source_names(models)
    settings, digest = dict(settings, n_chunks=len(chunks)), plan_digest(chunks)
    finished = finished_harvest(root, settings, digest, chunks, per)
    if finished is not None:
        return finished  # nothing written: a finished dataset may be read-only, shared by users
    if root.is_local:
        root.check_writable()

    def record() -> Manifest:  # the manifest of the shards done so far, written to the root
        manifest = build_manifest(cfg, sources, widths, list(done.values()), tokenizer.name_or_path, settings,
                                  len(plan), digest, key)
        write_manifest(root, manifest)
        return manifest

    # a root may be shared by runs (a sweep over one dataset): the second waits, then keeps the shards
    with shared_root(root, "harvest"):
        for leftover in root.temporary_files():
            root.delete(leftover)
        done = committed_shards(root, settings, digest, chunks=chunks, per=per)
        pending = [n for n in range(len(plan)) if shard_name(n) not in done]
        if pending:
            write_shards(cfg, models, root, plan, pending, done, record, progress)
        return record()


def write_shards(cfg: RunConfig, models: list[ModelSpec], root: Root, plan: list[list[Chunk]], pending: list[int],
                 done: dict[str, ShardInfo], record: Callable[[], Manifest], progress: bool) -> None:
    """Write the ``pending`` shards of ``plan`` on Ray actors into ``done``, calling ``record`` at
    most every MANIFEST_EVERY_S. A failed shard is redone (on a new actor when its actor died) up to
    ``harvest.max_retries`` times; a permanent error (give_up_if_permanent) stops at once."""
    hc = cfg.harvest
    ray = connect(math.ceil(hc.actors * hc.cpus_per_actor))
    # the actors load the models and write the shards into ``root``: every node that may run one must see them
    check_nodes_see(ray, "GPU" if hc.gpus_per_actor else "CPU", "harvest actors",
                    files={f"the model {m.path}": Path(m.path) / "config.json" for m in models
                           if (Path(m.path) / "config.json").is_file()},
                    directories={f"the harvest output {root.path}": Path(root.path)} if root.is_local else {})
    env = worker_env()  # settings, never credentials (ray_connect.WORKER_ENV)
    # no "Loading weights" (or download) bar from the actors' transformers: Ray passes an actor's
    # output on by whole lines, so a bar arrives once, finished, cutting into the harvest's own bar
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    n_actors = max(1, min(hc.actors, len(pending)))
    wanted = hc.memory_per_actor * 2**30 or estimated_actor_memory(models, hc.gpus_per_actor)
    memory = memory_request(ray, wanted, n_actors, "harvest.memory_per_actor")
    if hc.gpus_per_actor:
        note_gpu_wait(ray, hc.gpus_per_actor, n_actors, "harvest.gpus_per_actor")
    Actor: Any = ray.remote(num_cpus=hc.cpus_per_actor, num_gpus=hc.gpus_per_actor, memory=memory,
                            max_restarts=0)(ShardHarvester)
    Actor = Actor.options(runtime_env={"env_vars": env} if env else None)
    config, code = to_dict(cfg), code_fingerprint()
    actors = {i: Actor.remote(config, i, code) for i in range(n_actors)}
    queue = list(pending)
    running: dict = {}
    attempts = {n: 0 for n in pending}
    written = time.time()
    bar = progress_bar(total=len(plan), initial=len(done), desc="harvest", unit="shard", disable=not progress,
                       mininterval=1.0)
    try:
        while queue or running:
            for i, actor in actors.items():
                if queue and all(a != i for a, _ in running.values()):
                    n = queue.pop(0)
                    running[actor.write.remote(n, plan[n])] = (i, n)
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            i, n = running.pop(ref)
            try:
                out = ray.get(ref)
            except ray.exceptions.RayError as error:  # actor or task error, OOM kill, lost node, …
                give_up_if_permanent(error, shard_name(n))
                attempts[n] += 1
                if attempts[n] > hc.max_retries:
                    last = "its actor's process died: killed, out of memory or crashed" if process_died(error) \
                        else first_line(error)
                    times = f"{attempts[n]} time{'s' if attempts[n] > 1 else ''}"
                    raise HarvestError(f"{shard_name(n)} failed {times} (harvest.max_retries = "
                                       f"{hc.max_retries}); last: {last}; the committed shards are kept: "
                                       "re-run the same command to write the rest") from None
                if not isinstance(error, ray.exceptions.RayTaskError):  # the actor is gone: replace it
                    actors[i] = Actor.remote(config, i, code)
                queue.insert(0, n)
                bar.write(f"harvest: {shard_name(n)} will be redone ({type(error).__name__}: "
                          f"{first_line(error)[:160]})")
                continue
            info = ShardInfo(**out["info"])
            done[info.name] = info
            if time.time() - written >= MANIFEST_EVERY_S:  # bounded: not once per shard
                record()
                written = time.time()
            bar.update(1)
            bar.set_postfix(tokens=f"{sum(s.tokens for s in done.values()):,}", refresh=False)  # not tqdm's 6e+4
    except BaseException:  # a stop (retries spent, a permanent error, Ctrl-C): the shards done are kept
        with contextlib.suppress(Exception):  # the store may be what failed: its error is the one to say
            record()
        raise
    finally:
        bar.close()
        for actor in actors.values():
            ray.kill(actor)
        for ref in running:  # after a stop, the tasks in flight: read now, a failed one's error is not
            try:             # printed by Ray at exit as "Unhandled error", after the stop's own line
                ray.get(ref, timeout=10)
            except Exception:  # killed above, or failed like the one that stopped the harvest
                pass
