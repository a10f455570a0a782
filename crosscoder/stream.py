"""Token batches from shards, shuffled, with a position that makes resume exact.

Design: the stream is a pure function of (manifest, seed, rank, position). For each epoch a
rank's shards (``shard i`` belongs to data-parallel rank ``i mod world``) are put in an order drawn
from ``(seed, epoch)``; their samples, in that order, are cut into *windows* of
``shuffle_samples`` samples, and the tokens of each window are permuted with a generator seeded
by ``(seed, epoch, rank, window)``. Batches are cut from the concatenated windows.

The position is ``(epoch, window, offset)``: the next token to emit. Resuming re-reads only the
current window and regenerates its permutation, so a resumed run sees exactly the tokens an
uninterrupted run would, without saving a shuffle buffer in the checkpoint. The cost: tokens
mix only within a window (a window of 64 samples × 1024 tokens mixes 65k tokens from up to 64
documents), and shards whose samples are skipped on resume are still read once.

A background thread (:func:`prefetch`) reads and decodes ahead while the trainer computes.
No torch here.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from .errors import CrosscoderError
from .shards import Manifest, ShardError, read_manifest, read_shard
from .storage import Root

SCALE_DRIFT = 0.05  # a run resumes on shards whose normalisation scales moved by at most this share (trainer.py)


def scale_drift(was: list[float], now: list[float]) -> float:
    """The largest relative move of a source's normalisation scale, ``inf`` where they cannot be
    compared (another number of sources, a scale not positive)."""
    if len(was) != len(now) or not was or min(was) <= 0:
        return 0.0 if list(was) == list(now) else math.inf
    return max(abs(b / a - 1) for a, b in zip(was, now))


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    window: int = 0
    offset: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Position:
        return cls(**{k: int(d[k]) for k in ("epoch", "window", "offset")})


@dataclass
class Batch:
    acts: np.ndarray  # [B, D] in the stored dtype
    position: Position  # where the stream continues after this batch
    epoch: int  # epoch of the batch's last token


class DataExhausted(CrosscoderError):
    """The stream reached ``max_epochs``."""


class TokenStream:
    def __init__(
        self,
        root: Root,
        manifest: Manifest,
        batch_size: int,
        shuffle_samples: int = 64,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        max_epochs: int = 0,
        verify: bool = True,
    ):
        if not manifest.shards:
            raise ShardError(f"{root.url}: the manifest lists no shards")
        if world > len(manifest.shards):
            raise ShardError(
                f"{root.url}: {len(manifest.shards)} shards cannot feed {world} data-parallel ranks "
                "(each rank reads its own shards); harvest more, smaller shards"
            )
        if batch_size <= 0 or shuffle_samples <= 0:
            raise ValueError("batch_size and shuffle_samples must be positive")
        self.root, self.manifest = root, manifest
        self.batch_size, self.window_samples = batch_size, shuffle_samples
        self.seed, self.rank, self.world = seed, rank, world
        self.max_epochs, self.verify = max_epochs, verify
        self.shards = [s for i, s in enumerate(manifest.shards) if i % world == rank]
        self.samples_per_epoch = sum(s.samples for s in self.shards)
        self.windows_per_epoch = -(-self.samples_per_epoch // shuffle_samples)

    def shard_order(self, epoch: int) -> list:
        rng = np.random.default_rng([self.seed, epoch, 1])
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def _samples_from(self, epoch: int, start: int) -> Iterator[np.ndarray]:
        """Activations of the epoch's samples from sample index ``start`` on."""
        seen = 0
        for info in self.shard_order(epoch):
            if seen + info.samples <= start:
                seen += info.samples
                continue
            try:
                samples = read_shard(self.root, info, self.manifest, verify=self.verify)
            except ShardError as error:
                raise self._explained(error) from None
            for sample in samples[max(start - seen, 0) :]:
                yield sample.acts
            seen += info.samples

    def _explained(self, error: ShardError) -> ShardError:
        """A shard that no longer matches the manifest read at the start: the error, and whether the
        dataset's manifest changed since (a harvest grew the root or redid shards), and whether a
        re-run can resume on it (not where the normalisation scales moved with the data)."""
        try:
            now = read_manifest(self.root)
        except Exception:  # the store may be what failed: the shard's own error says it
            return error
        if now.to_json() == self.manifest.to_json():
            return error
        then = ("its normalisation too (norm_scale): this run cannot resume on it (a resume needs the scales it "
                "was trained with); train a new run" if scale_drift(self.manifest.norm_scale, now.norm_scale) >
                SCALE_DRIFT else "re-run to resume from the last checkpoint on the dataset as it is now")
        return ShardError(f"{error}; the dataset's manifest changed since this run read it (a harvest grew or redid "
                          f"{self.root.url}), {then}")

    def _windows(self, epoch: int, first_window: int) -> Iterator[tuple[int, np.ndarray]]:
        samples = self._samples_from(epoch, first_window * self.window_samples)
        window = first_window
        while True:
            chunk = [a for _, a in zip(range(self.window_samples), samples)]
            if not chunk:
                return
            acts = np.concatenate(chunk)
            perm = np.random.default_rng([self.seed, epoch, self.rank, window, 2]).permutation(len(acts))
            yield window, acts[perm]
            window += 1

    def batches(self, position: Position = Position()) -> Iterator[Batch]:
        """Batches from ``position`` on; raises DataExhausted after ``max_epochs`` (0 = never)."""
        epoch, window, offset = position.epoch, position.window, position.offset
        pending: list[np.ndarray] = []
        have = 0
        while True:
            if self.max_epochs and epoch >= self.max_epochs:
                raise DataExhausted(
                    f"{self.root.url}: the data ran out after train.max_epochs = {self.max_epochs} epoch(s) of "
                    f"{self.samples_per_epoch} samples (data partition {self.rank}'s shards); raise "
                    "train.max_epochs (0 cycles) or train on more data")
            for w, acts in self._windows(epoch, window):
                acts = acts[offset:]
                start = 0
                while start < len(acts):
                    take = min(self.batch_size - have, len(acts) - start)
                    pending.append(acts[start : start + take])
                    have += take
                    start += take
                    if have == self.batch_size:
                        consumed = offset + start
                        if consumed == len(acts) + offset:
                            nxt = Position(epoch, w + 1, 0)
                            if w + 1 >= self.windows_per_epoch:
                                nxt = Position(epoch + 1, 0, 0)
                        else:
                            nxt = Position(epoch, w, consumed)
                        yield Batch(np.concatenate(pending), nxt, epoch)
                        pending, have = [], 0
                offset = 0
            epoch, window, offset = epoch + 1, 0, 0


def prefetch(iterator: Iterator, depth: int = 2) -> Generator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead; exceptions are re-raised."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)

    thread = threading.Thread(target=work, daemon=True, name="crosscoder-prefetch")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@dataclass
class PartitionBatch:
    acts: np.ndarray  # [sum of my partitions' batch sizes, D]
    positions: dict[int, Position]  # partition → where it continues after this batch
    epoch: int


class PartitionedStream:
    """The global batch as ``partitions`` independent token streams of ``B / partitions`` tokens.

    Partition ``p`` reads the shards ``i ≡ p (mod partitions)``. A data-parallel rank takes the
    partitions ``p ≡ dp_rank (mod dp_size)``, so the global batch of step n is the same tokens
    whatever the number of ranks: a 1-process run with 2 partitions trains on exactly what a
    2-rank data-parallel run does (and can resume it). ``partitions`` must be a multiple of the
    data-parallel size.
    """

    def __init__(self, root: Root, manifest: Manifest, global_batch: int, partitions: int, mine: list[int],
                 shuffle_samples: int = 64, seed: int = 0, max_epochs: int = 0, verify: bool = True):
        if global_batch % partitions:
            raise ValueError(f"train.batch_size ({global_batch}) must be divisible by the {partitions} data partitions")
        self.mine = list(mine)
        self.streams = {
            p: TokenStream(root, manifest, global_batch // partitions, shuffle_samples, seed=seed, rank=p,
                           world=partitions, max_epochs=max_epochs, verify=verify)
            for p in self.mine
        }

    def batches(self, positions: dict[int, Position] | None = None) -> Iterator[PartitionBatch]:
        positions = positions or {}
        iters = {p: s.batches(positions.get(p, Position())) for p, s in self.streams.items()}
        while True:
            parts = {p: next(it) for p, it in iters.items()}
            yield PartitionBatch(
                np.concatenate([parts[p].acts for p in self.mine]),
                {p: b.position for p, b in parts.items()},
                max(b.epoch for b in parts.values()),
            )
