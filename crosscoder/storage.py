"""Where shards live: a local directory, ``file://…`` or ``s3://bucket/prefix``, through fsspec.

One small class, :class:`Root`, gives the shard code the four operations it needs (read a file,
list, commit a finished file atomically, delete) with the same code path for every backend. A
commit is atomic on both: on a file system the file is written under a temporary name in the same
directory and renamed; on S3 a single upload becomes visible only when complete, so a reader never
sees half a shard. The S3 endpoint and credentials come from arguments or the usual environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), so MinIO, moto or any
S3-compatible store works. No torch here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import fsspec


class StorageError(OSError):
    """A storage root cannot be used; the message names the root and the cause."""


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


class Root:
    """A directory-like location that holds a dataset (manifest + shards) or a run's files."""

    def __init__(self, url: str, **storage_options):
        if not url:
            raise StorageError("no storage root given (empty path or URL)")
        self.url = url.rstrip("/")
        self.protocol = _protocol(url)
        if self.protocol == "file":
            self.path = url[len("file://") :] if url.startswith("file://") else url
            self.path = str(Path(self.path).expanduser().absolute())
            self.fs = fsspec.filesystem("file")
        else:
            if self.protocol == "s3":
                endpoint = storage_options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
                if endpoint:
                    storage_options.setdefault("client_kwargs", {})["endpoint_url"] = endpoint
            self.fs = fsspec.filesystem(self.protocol, **storage_options)
            self.path = self.url.split("://", 1)[1]

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def full(self, name: str) -> str:
        return f"{self.path}/{name}"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.full(name))

    def read_bytes(self, name: str) -> bytes:
        return self.fs.cat_file(self.full(name))

    def list(self) -> list[str]:
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            return []

    def delete(self, name: str) -> None:
        try:
            self.fs.rm(self.full(name))
        except FileNotFoundError:
            pass

    def commit_file(self, local_file: str | Path, name: str) -> None:
        """Make ``name`` appear, complete, with the content of ``local_file`` (which is consumed)."""
        if self.is_local:
            os.makedirs(self.path, exist_ok=True)
            final = Path(self.full(name))
            tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                shutil.move(str(local_file), tmp)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
        else:
            self.fs.put_file(str(local_file), self.full(name))
            os.unlink(local_file)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic small write (the manifest)."""
        fd, tmp = tempfile.mkstemp(prefix="crosscoder-", suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        self.commit_file(tmp, name)

    def temporary_files(self) -> list[str]:
        """Left-over temporary files of interrupted local commits (S3 commits leave none)."""
        return [n for n in self.list() if ".tmp-" in n]

    def __repr__(self) -> str:
        return f"Root({self.url!r})"


def open_root(url: str, storage=None) -> Root:
    """A Root for ``url`` with the run's storage settings (a StorageConfig or None)."""
    endpoint = getattr(storage, "endpoint_url", "") or None
    if _protocol(url) == "s3" and endpoint:
        return Root(url, endpoint_url=endpoint)
    return Root(url)
