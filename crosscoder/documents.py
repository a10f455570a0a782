"""Documents for harvesting: text or chat conversations, tokenized once, cut into fixed chunks.

Input files:
- ``.jsonl``: one JSON object per line, either ``{"text": "..."}`` or a chat
  ``{"messages": [{"role": "user", "content": "..."}, ...]}``;
- ``.txt``: one document per non-empty line;
- ``hf:<dataset>[@<revision>][:<split>]`` (the ``datasets`` package): a ``save_to_disk`` directory,
  a local directory of data files or a hub name (at a branch, tag or commit, for a harvest that
  reads the same documents next year); the same two shapes per row.

Chats go through the chat model's template (``tokenizer.apply_chat_template``) so base and chat
models see the same token ids and their activation streams align token by token; every model in
a harvest must share one tokenizer (a mismatch is an error, checked by :func:`check_same_tokenizer`).

Each document becomes chunks of at most ``seq_len`` tokens; each chunk is run on its own. A
document's first chunk runs behind ``harvest.prefix`` (the BOS, the EOS document separator, none
or a named token: some tokenizers' BOS is a chat-template token); later chunks run behind nothing,
so no chunk gains a token its document never had. The prefix position (an attention sink with
outlier norms) is not stored unless ``keep_bos``. No padding is ever stored: chunks are run
one length at a time. The plan is a pure function of (files, tokenizer, config), so shard n always
holds the same chunks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CrosscoderError, type_and_message
from .hub_access import cached_snapshot, hub_offline, hub_unavailable
from .progress import progress_bar


class DataError(CrosscoderError, ValueError):
    """An input document file is unreadable or malformed; the message names file and line."""


class Record(dict):
    """A document, ``{"text": ...}`` or ``{"messages": [...]}``, that knows where it was read
    (``where``: ``file:line`` or ``hf:… row:n``), so an error met later, in the chat template, names it."""

    where = "a document"


@dataclass(eq=False)
class Chunk:
    doc: int  # document index in the input
    index: int  # chunk index within the document
    offset: int  # token offset of the chunk within the document
    tokens: np.ndarray  # the stored token ids (no BOS), int32: 4 bytes a token in the driver's plan
    chat: bool

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Chunk) and (self.doc, self.index, self.offset, self.chat)
                == (other.doc, other.index, other.offset, other.chat) and np.array_equal(self.tokens, other.tokens))


def read_documents(source: str) -> Iterator[dict]:
    """Yield {"text": ...} or {"messages": [...]} records from a file or a ``hf:`` dataset."""
    if source.startswith("hf:"):
        yield from _dataset_records(source)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"harvest data file not found: {path}")
    if path.suffix == ".jsonl":
        with path.open() as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON: {e}") from None
                yield _record(row, str(path), number)
    else:
        with path.open() as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    yield _record({"text": line.rstrip("\n")}, str(path), number)


def _dataset_records(source: str) -> Iterator[dict]:
    """Rows of ``hf:<dataset>[@<revision>][:<split>]`` (split ``train`` by default) as records; row n
    is named ``<source> row:n`` in errors. ``<dataset>`` is a directory written by ``save_to_disk``, a
    local directory of data files, or a hub name, at ``<revision>`` when given (read streaming: the
    plan stops at ``harvest.tokens``, so a large dataset is never downloaded whole; on a machine
    without network access, the hub cache's copy of the dataset is read: :func:`_data_files_of`)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading a dataset needs the `datasets` package") from None
    name, _, split = source[3:].partition(":")
    split = split or "train"
    local, revision = Path(name).expanduser(), None
    if "@" in name and not local.exists():  # a local path is taken whole, even with an @ in it
        name, _, revision = name.rpartition("@")
        local = Path(name).expanduser()
        if local.exists() or not (name and revision):
            raise DataError(f"{source}: a revision (@…) names a branch, tag or commit of a hub dataset, as in "
                            "hf:owner/name@v1.0:train; a local dataset has none")
    try:
        if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
            rows = datasets.load_from_disk(str(local))
            if isinstance(rows, datasets.DatasetDict):
                if split not in rows:
                    raise DataError(f"{source}: no split {split!r}; the dataset has {sorted(rows)}")
                rows = rows[split]
        else:
            where = _data_files_of(source, name, local, revision)
            rows = datasets.load_dataset(where, split=split, streaming=True,
                                         revision=revision if where == name else None)
        for number, row in enumerate(rows):
            yield _record(row, f"{source} row", number)
    except DataError:
        raise
    except Exception as error:  # hub unreachable, unknown name or split, unreadable files
        raise DataError(f"{source}: cannot read the dataset ({type_and_message(error)})") from error


def _data_files_of(source: str, name: str, local: Path, revision: str | None = None) -> str:
    """What ``load_dataset`` reads for ``name``: the local directory; or, while the hub is offline
    or its host does not resolve, the hub cache's copy of the dataset repository at ``revision``
    (``hf download --repo-type dataset NAME`` fills it), read as a local directory of data files
    (streaming from the hub reads no cache); else the hub name."""
    if local.is_dir():
        return str(local)
    why = hub_unavailable()
    if not why:
        return name
    if (snapshot := cached_snapshot(name, "dataset", revision)) is not None:
        return str(snapshot)
    if hub_offline():  # datasets may still hold it in its own cache: let it try and say
        return name
    at, flag = (f" of revision {revision!r}", f" --revision {revision}") if revision else ("", "")
    raise DataError(f"{source}: not a local directory and the Hugging Face hub {why}, with no copy{at} in the "
                    "hub cache; give a local directory, or fill the cache with `hf download --repo-type dataset "
                    f"{name}{flag}` where the hub can be reached")


def _record(row, where: str, number: int) -> Record:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        record = Record(text=row["text"])
    elif isinstance(row, dict) and isinstance(row.get("messages"), list):
        for m in row["messages"]:
            if not (isinstance(m, dict) and "role" in m and "content" in m):
                raise DataError(f"{where}:{number}: every message needs 'role' and 'content'")
        record = Record(messages=row["messages"])
    else:
        raise DataError(f"{where}:{number}: expected an object with 'text' or 'messages'")
    record.where = f"{where}:{number}"
    return record


def check_same_tokenizer(tokenizers: dict, probe: str = "The quick brown fox, 12345 — éà!") -> None:
    """All models must tokenize identically, or their activations would not align token by token."""
    names = list(tokenizers)
    first = tokenizers[names[0]]
    for name in names[1:]:
        other = tokenizers[name]
        if len(other) != len(first) or other(probe)["input_ids"] != first(probe)["input_ids"]:
            raise DataError(
                f"models {names[0]!r} and {name!r} have different tokenizers (vocab {len(first)} vs {len(other)}); "
                "a crosscoder needs token-aligned activations: use models of one family"
            )
        if other.get_vocab() != first.get_vocab():
            raise DataError(f"models {names[0]!r} and {name!r} have different vocabularies")


def tokenize(record: dict, tokenizer, chat_tokenizer) -> tuple[list[int], bool]:
    """Token ids of a record without special BOS (added per chunk), and whether it is a chat."""
    return tokenize_batch([record], tokenizer, chat_tokenizer)[0]


def tokenize_batch(records: list[dict], tokenizer, chat_tokenizer) -> list[tuple[list[int], bool]]:
    """:func:`tokenize` of each record, the texts in one call of the tokenizer and the conversations
    in one call of the chat template: a fast tokenizer encodes a batch on every core (one at a
    time, planning 100M tokens took minutes on one). The ids are those of one call per record.

    ``verbose=False`` on both paths: a document longer than the model's maximum length raises no
    "indexing errors" warning, since it is cut into ``harvest.seq_len`` chunks before a model sees it."""
    out: list[tuple[list[int], bool]] = [([], False)] * len(records)
    texts = [i for i, r in enumerate(records) if "messages" not in r]
    chats = [i for i, r in enumerate(records) if "messages" in r]
    if texts:
        encoded = tokenizer([records[i]["text"] for i in texts], add_special_tokens=False, verbose=False)["input_ids"]
        for i, ids in zip(texts, encoded):
            out[i] = (list(ids), False)
    if chats:
        for i, ids in zip(chats, _apply_template([records[i] for i in chats], chat_tokenizer)):
            out[i] = (ids, True)
    bos = tokenizer.bos_token_id
    strip_chat_bos = bool(chats) and _template_writes_bos(chat_tokenizer)
    return [(ids[1:], chat) if bos is not None and ids and ids[0] == bos and (not chat or strip_chat_bos)
            else (ids, chat) for ids, chat in out]


def _apply_template(records: list[dict], chat_tokenizer) -> list[list[int]]:
    """The chat template's token ids of each conversation; an error names the conversation at fault
    (the batch is retried one by one to find it)."""
    if not getattr(chat_tokenizer, "chat_template", None):
        raise DataError(f"{getattr(records[0], 'where', 'a conversation')}: chat data needs a tokenizer with a chat "
                        "template (the chat model's)")
    try:
        ids = chat_tokenizer.apply_chat_template([r["messages"] for r in records], tokenize=True,
                                                 add_generation_prompt=False, tokenizer_kwargs={"verbose": False})
    except Exception as error:  # the template's own raise_exception (Gemma's: no system role), a bad key
        if len(records) > 1:
            return [ids for r in records for ids in _apply_template([r], chat_tokenizer)]
        where = getattr(records[0], "where", "a conversation")
        raise DataError(f"{where}: the chat model's template refused this conversation "
                        f"({type_and_message(error)})") from None
    if not isinstance(ids, list):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return [list(one) for one in ids]


def _template_writes_bos(tokenizer) -> bool:
    """Whether the chat template starts a conversation with ``bos_token`` itself (Llama 3's, Gemma's):
    that BOS is the harvest's prefix, not part of the conversation. A template that writes its role
    token, which a tokenizer may also call its BOS (SmolLM2's ``<|im_start|>``), keeps it: stripping
    it took the conversation's first token away."""
    template = tokenizer.chat_template
    return any("bos_token" in t for t in (template.values() if isinstance(template, dict) else [template]))


_NOT_CONTENT = {"name_or_path", "local_files_only", "is_local", "_commit_hash", "cache_dir", "token"}


def tokenization_key(tokenizer, chat_tokenizer) -> str | None:
    """A digest of what, besides the documents and the harvest settings, decides the plan: both
    tokenizers' content (vocabulary, normaliser, special tokens, chat template), this module's code
    and the transformers and tokenizers versions. Equal keys, documents and settings give the same
    plan, so a finished harvest need not tokenize again to know it holds this one. None where a
    tokenizer cannot be written out whole (a slow, Python one; a fast one with a custom Python
    pre-tokenizer or normaliser, whose code no digest sees): then the plan is always made."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(f"{transformers.__version__} {tokenizers.__version__}".encode())
    for t in (tokenizer, chat_tokenizer):
        if not getattr(t, "is_fast", False):
            return None
        try:
            digest.update(t.backend_tokenizer.to_str().encode())
        except Exception:  # noqa: BLE001 - the tokenizers library raises a bare Exception: "cannot be serialized"
            return None
        kwargs = {k: v for k, v in t.init_kwargs.items() if k not in _NOT_CONTENT}
        digest.update(json.dumps([kwargs, t.chat_template], default=str, sort_keys=True).encode())
    return digest.hexdigest()


def plan_chunks(records: Iterator[dict], tokenizer, chat_tokenizer, seq_len: int, max_tokens: int,
                min_tokens: int = 2, progress: bool = False, batch_documents: int = 64) -> list[Chunk]:
    """Cut documents into chunks until ``max_tokens`` stored tokens are planned. The documents are
    tokenized ``batch_documents`` at a time; a bad document (malformed, or refused by the chat
    template) stops the plan only where it is reached, as one at a time: past the budget, never."""
    chunks, total = [], 0
    bar = progress_bar(total=max_tokens, desc="tokenize", unit="tok", unit_scale=True, disable=not progress,
                       mininterval=1.0)
    with bar:
        for first, batch in enumerate(_batches(records, batch_documents)):
            try:
                tokenized: Iterable[tuple[list[int], bool]] = tokenize_batch(batch, tokenizer, chat_tokenizer)
            except DataError:  # one at a time, up to the one at fault (which may lie past the budget)
                tokenized = (tokenize(record, tokenizer, chat_tokenizer) for record in batch)
            for doc, (listed, chat) in enumerate(tokenized, first * batch_documents):
                ids = np.asarray(listed, dtype=np.int32)  # the chunks below are views of it
                for index, offset in enumerate(range(0, len(ids), seq_len)):
                    piece = ids[offset : offset + seq_len]
                    if len(piece) < min_tokens:
                        continue
                    chunks.append(Chunk(doc, index, offset, piece, chat))
                    total += len(piece)
                    bar.update(min(len(piece), max_tokens - bar.n))
                    if total >= max_tokens:
                        return chunks
    return chunks


def _batches(records: Iterator[dict], size: int) -> Iterator[list[dict]]:
    """``records`` in lists of ``size``; a malformed record is raised after the records before it
    (the plan may end before it)."""
    batch: list[dict] = []
    try:
        for record in records:
            batch.append(record)
            if len(batch) == size:
                yield batch
                batch = []
    except DataError:
        if batch:
            yield batch
        raise
    if batch:
        yield batch
