"""Documents for harvesting: text or chat conversations, tokenized once, cut into fixed chunks.

Input files:
- ``.jsonl``: one JSON object per line, either ``{"text": "..."}`` or a chat
  ``{"messages": [{"role": "user", "content": "..."}, ...]}``;
- ``.txt``: one document per non-empty line;
- ``hf:<dataset>[:<split>]`` with the ``datasets`` package installed: the same two shapes per row.

Chats go through the chat model's template (``tokenizer.apply_chat_template``) so base and chat
models see the same token ids and their activation streams align token by token; every model in
a harvest must share one tokenizer (a mismatch is an error, checked by :func:`check_same_tokenizer`).

Each document becomes chunks of at most ``seq_len`` tokens; each chunk is run on its own, with the
tokenizer's BOS token prepended when the tokenizer has one. The BOS position (an attention sink
with outlier norms) is not stored unless ``keep_bos``. No padding is ever stored: chunks are run
one length at a time. The plan is a pure function of (files, tokenizer, config), so shard n always
holds the same chunks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """An input document file is unreadable or malformed; the message names file and line."""


@dataclass
class Chunk:
    doc: int  # document index in the input
    index: int  # chunk index within the document
    offset: int  # token offset of the chunk within the document
    tokens: list[int]  # the stored token ids (no BOS)
    chat: bool


def read_documents(source: str) -> Iterator[dict]:
    """Yield {"text": ...} or {"messages": [...]} records from a file or a ``hf:`` dataset."""
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{source}: reading a dataset by name needs the `datasets` package") from None
        name, _, split = source[3:].partition(":")
        for row in datasets.load_dataset(name, split=split or "train"):
            yield _record(row, source, 0)
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
            for line in fh:
                if line.strip():
                    yield {"text": line.rstrip("\n")}


def _record(row, where: str, number: int) -> dict:
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return {"text": row["text"]}
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        for m in row["messages"]:
            if not (isinstance(m, dict) and "role" in m and "content" in m):
                raise DataError(f"{where}:{number}: every message needs 'role' and 'content'")
        return {"messages": row["messages"]}
    raise DataError(f"{where}:{number}: expected an object with 'text' or 'messages'")


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
    if "messages" in record:
        if not getattr(chat_tokenizer, "chat_template", None):
            raise DataError("chat data needs a tokenizer with a chat template (the chat model's)")
        ids = chat_tokenizer.apply_chat_template(record["messages"], tokenize=True, add_generation_prompt=False)
        if not isinstance(ids, list):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)
        chat = True
    else:
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"]
        chat = False
    bos = tokenizer.bos_token_id
    if bos is not None and ids and ids[0] == bos:
        ids = ids[1:]
    return ids, chat


def plan_chunks(records: Iterator[dict], tokenizer, chat_tokenizer, seq_len: int, max_tokens: int,
                min_tokens: int = 2) -> list[Chunk]:
    """Cut documents into chunks until ``max_tokens`` stored tokens are planned."""
    chunks, total = [], 0
    for doc, record in enumerate(records):
        ids, chat = tokenize(record, tokenizer, chat_tokenizer)
        for index, offset in enumerate(range(0, len(ids), seq_len)):
            piece = ids[offset : offset + seq_len]
            if len(piece) < min_tokens:
                continue
            chunks.append(Chunk(doc, index, offset, piece, chat))
            total += len(piece)
            if total >= max_tokens:
                return chunks
    return chunks
