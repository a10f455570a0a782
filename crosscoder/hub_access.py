"""Whether the Hugging Face Hub can be asked at all, before a model, tokenizer or dataset is
loaded by hub id.

Why: on a machine whose DNS does not know the Hub (an air-gapped cluster, the usual place for a
large run) huggingface_hub retries each request five times with back-off, ~26 s and ten log lines
per file, before an error that says what a name lookup says in milliseconds. One lookup a
minute answers for every load in it. Behind a proxy nothing is looked up (the proxy resolves
the Hub's name, not this machine). The cost: a DNS failure that a retry would have outlived stops
the start instead (nothing is written by then; start again).

Standard library only (and huggingface_hub's endpoint, imported when asked): the harvest's
document reader imports this without torch.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

# where one is set, the proxy looks the Hub's host up, not this machine
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` set as huggingface_hub reads it (read now: a test or a caller may set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_unavailable() -> str:
    """Why the Hub cannot be asked now, as the end of a sentence about it ('is offline
    (HF_HUB_OFFLINE=1)', 'cannot be reached (<host>: <reason>)'); '' where it can be."""
    return "is offline (HF_HUB_OFFLINE=1)" if hub_offline() else hub_unresolvable()


# (host, port) -> (when looked up, answer); an answer is trusted for LOOKUP_LIFETIME_S, so a
# notebook whose network comes back sees it within a minute and a run's many loads look up once
LOOKUP_LIFETIME_S = 60.0
_lookups: dict[tuple[str, int], tuple[float, str]] = {}
_clock = time.monotonic


def hub_unresolvable() -> str:
    """'cannot be reached (<host>: <reason>)' where the Hub's host name (``HF_ENDPOINT``'s) does
    not resolve, else '' (it resolves, a proxy is set, or the lookup failed otherwise: then
    huggingface_hub tries and says). One lookup per host a minute at most."""
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return ""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    key = (endpoint.hostname or "", endpoint.port or 443)
    when, answer = _lookups.get(key, (-LOOKUP_LIFETIME_S, ""))
    if _clock() - when >= LOOKUP_LIFETIME_S:
        answer = _look_up(*key)
        _lookups[key] = (_clock(), answer)
    return answer


def _look_up(host: str, port: int) -> str:
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as e:
        return f"cannot be reached ({host}: {e.strerror})"
    except (OSError, UnicodeError):  # anything else: let huggingface_hub try and say
        return ""
    return ""


def cached_snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None) -> Path | None:
    """The hub cache's directory of ``repo_id`` at ``revision`` (a branch or tag its refs name, or a
    commit; ``main`` when None), as ``hf download`` or any earlier load left it; None where the
    cache has none."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    ref = repo / "refs" / (revision or "main")
    commit = ref.read_text().strip() if ref.is_file() else revision or "main"
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None
