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

import builtins
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec

from .errors import CrosscoderError

RETRIES = 5  # attempts of one storage operation on transient errors
BACKOFF_S = 0.5  # first wait; doubles per attempt
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a plain write would give (0644 under the usual umask): readable by the group


class StorageError(CrosscoderError, OSError):
    """A storage root cannot be used; the message names the root and the cause."""


CREDENTIALS_HINT = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"


def _lacks_credentials(e: BaseException) -> bool:
    """botocore's NoCredentialsError or PartialCredentialsError, told by name: no botocore import here."""
    return type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError")


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """A failed write in the block (a full disk, a quota) names ``path``, which a file object's error
    does not: ``[Errno 28] No space left on device`` says nothing of where."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _quiet_orphaned_connection_errors(loop, context: dict) -> None:
    """fsspec's event loop's exception handler: a dropped connection also fails aiohttp's request-body
    task, which nobody awaits once the request itself has failed, so asyncio printed "Task exception
    was never retrieved" and a traceback beside the one-line error that :meth:`Root._retry` already
    gives for the same failure. Those orphans are dropped; anything else is reported as before."""
    if isinstance(context.get("exception"), ConnectionError) and "never retrieved" in context.get("message", ""):
        return
    loop.default_exception_handler(context)


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
            self.endpoint = None
            if self.protocol == "s3":
                self.endpoint = storage_options.pop("endpoint_url", None) or os.environ.get("AWS_ENDPOINT_URL")
                if self.endpoint:
                    storage_options.setdefault("client_kwargs", {})["endpoint_url"] = self.endpoint
                # bounded waits: an unreachable endpoint fails in seconds, not minutes
                storage_options.setdefault("config_kwargs", {"connect_timeout": 5, "read_timeout": 120,
                                                              "retries": {"max_attempts": 3, "mode": "standard"}})
            self.fs = fsspec.filesystem(self.protocol, **storage_options)
            self.path = self.url.split("://", 1)[1]
            loop = getattr(self.fs, "loop", None)
            if loop is not None and loop.get_exception_handler() is not _quiet_orphaned_connection_errors:
                loop.call_soon_threadsafe(loop.set_exception_handler, _quiet_orphaned_connection_errors)

    @property
    def is_local(self) -> bool:
        return self.protocol == "file"

    def full(self, name: str) -> str:
        return f"{self.path}/{name}"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _retry(self, what: str, fn, *args):
        """Run a storage operation, retrying transient errors with exponential backoff."""
        for attempt in range(RETRIES):
            try:
                return fn(*args)
            except (FileNotFoundError, PermissionError, IsADirectoryError, FileExistsError):
                raise
            except OSError as e:
                if self.is_local or attempt == RETRIES - 1:
                    raise StorageError(f"{self.url}: {what} failed after {attempt + 1} attempts: {e}") from e
                time.sleep(BACKOFF_S * 2**attempt)
            except Exception as e:  # noqa: BLE001 - e.g. botocore's NoCredentialsError: no OSError, no retry
                hint = f" ({CREDENTIALS_HINT})" if _lacks_credentials(e) else ""
                raise StorageError(f"{self.url}: {what} failed: {type(e).__name__}: {e}{hint}") from e

    def exists(self, name: str) -> bool:
        return self._retry(f"checking {name}", self.fs.exists, self.full(name))

    def read_bytes(self, name: str) -> bytes:
        return self._retry(f"reading {name}", self.fs.cat_file, self.full(name))

    def check_writable(self) -> None:
        """One clear error, early, when the root cannot be reached or does not exist."""
        if self.is_local:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise StorageError(f"{self.url}: cannot create the output directory: {e}") from None
            if not os.access(self.path, os.W_OK):
                raise StorageError(f"{self.url}: the output directory is not writable")
            return
        bucket = self.path.split("/", 1)[0]
        where = f"endpoint {self.endpoint}" if getattr(self, "endpoint", None) else "the default endpoint"
        try:
            self._retry(f"listing bucket {bucket!r}", lambda: self.fs.ls(bucket, refresh=True))
        except FileNotFoundError:
            raise StorageError(f"{self.url}: bucket {bucket!r} does not exist at {where}") from None
        except PermissionError as e:
            raise StorageError(f"{self.url}: access to bucket {bucket!r} denied at {where}: {e}") from None
        except Exception as e:  # noqa: BLE001 - connection errors come in many types
            cause = e.__cause__ if isinstance(e, StorageError) and e.__cause__ else e
            if _lacks_credentials(cause):
                raise StorageError(f"{self.url}: no credentials for the object store at {where} "
                                   f"({CREDENTIALS_HINT}): {type(cause).__name__}: {cause}") from None
            raise StorageError(f"{self.url}: cannot reach the object store at {where}: "
                               f"{type(cause).__name__}: {cause}") from None

    def list(self) -> builtins.list[str]:
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))
        except FileNotFoundError:
            return []

    def stat_all(self) -> dict[str, tuple[int, str]]:
        """Every file's (size, version tag) from one listing, no download: the object store's ETag
        (its content hash for single-part uploads), or size and modification time on a file system."""
        try:
            entries = self._retry("listing", lambda: self.fs.ls(self.path, detail=True, refresh=True)
                                  if not self.is_local else self.fs.ls(self.path, detail=True))
        except FileNotFoundError:
            return {}
        return {e["name"].rsplit("/", 1)[-1]: (int(e["size"]), self._tag(e)) for e in entries if e["type"] == "file"}

    def _tag(self, entry: dict) -> str:
        if self.is_local:
            return f"{int(entry['size'])}-{os.stat(entry['name']).st_mtime_ns}"
        return str(entry.get("ETag") or entry.get("etag") or "").strip('"')

    def version_tag(self, name: str) -> str:
        """``name``'s version tag as :meth:`stat_all` reports it (one metadata request)."""
        info = self._retry(f"checking {name}", self.fs.info, self.full(name))
        return self._tag(info | {"name": self.full(name)})

    def create(self, name: str, data: bytes) -> bool:
        """Write ``name`` only if it does not exist, in one step (an object store's conditional
        write, ``If-None-Match: *``; ``O_EXCL`` on a file system); False if it exists."""
        try:
            self._retry(f"creating {name}", lambda: self.fs.pipe_file(self.full(name), data, mode="create"))
            return True
        except FileExistsError:
            return False

    def modified(self, name: str) -> float | None:
        """When ``name`` was last written (seconds since the epoch, by the store's clock), or None."""
        self.fs.invalidate_cache(self.full(name))
        try:
            info = self._retry(f"checking {name}", self.fs.info, self.full(name))
        except FileNotFoundError:
            return None
        when = info.get("LastModified") or info.get("mtime")
        return when.timestamp() if hasattr(when, "timestamp") else float(when)

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
                os.chmod(tmp, FILE_MODE)  # mkstemp made it 0600, unreadable to others on a shared volume
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    tmp.unlink()
        else:
            try:
                self._retry(f"uploading {name}", self.fs.put_file, str(local_file), self.full(name))
            except FileNotFoundError:
                # the bucket checked at the start is gone: a store without persistence restarted, or
                # it was emptied; a retry cannot mend that, and the shards committed before are gone too
                bucket = self.path.split("/", 1)[0]
                raise StorageError(f"{self.url}: uploading {name} failed: bucket {bucket!r} does not exist any "
                                   "more (was the object store restarted or emptied?)") from None
            os.unlink(local_file)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic small write (the manifest)."""
        fd, tmp = tempfile.mkstemp(prefix="crosscoder-", suffix=".part")
        try:
            with naming(tmp), os.fdopen(fd, "wb") as fh:
                fh.write(data)
            self.commit_file(tmp, name)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def temporary_files(self) -> builtins.list[str]:
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


def replace_text(path: Path, text: str) -> None:
    """Write ``text`` to a file of this process's own beside ``path`` and rename it over ``path``: a
    reader, or a kill mid-write, sees the old file or the new one whole, and processes writing at
    once never interleave."""
    mine = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    mine.write_text(text)
    mine.replace(path)


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; a ValueError saying what it is instead (not JSON: cut short or
    edited; another JSON value), for the caller to name the file and what writes it again."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"a JSON {type(data).__name__}, not an object")
    return data


def absolute_url(url: str) -> str:
    """A local root as an absolute path (processes on other working directories see the same place);
    remote URLs unchanged."""
    if url and _protocol(url) == "file":
        return str(Path(url[len("file://"):] if url.startswith("file://") else url).expanduser().absolute())
    return url
