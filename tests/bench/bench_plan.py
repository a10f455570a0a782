"""Planning a harvest: tokenizing the documents a batch at a time vs one document at a time.

    python tests/bench/bench_plan.py [--tokens 2000000] [--out bench-results/plan.json]

Every harvest (and every re-run of one: the plan is what a resume is checked against) tokenizes its
documents in the driver before any actor starts. A byte-level BPE tokenizer (16k merges, a chat
template, trained here on generated words: no download) plans ``--tokens`` tokens of plain texts
and of conversations, side by side in one run:

- ``one by one``: one tokenizer call (or one chat-template call) per document, as the planner did;
- ``batched``: ``plan_chunks`` as it is, 64 documents per call (a fast tokenizer encodes a batch on
  every core; the conversations are rendered one by one by the template's Jinja either way);
- ``re-run check``: what a re-run of a complete harvest does instead of planning (the documents
  file's sha256 and ``tokenization_key``; the manifest read and the one listing are not counted).

The two plans must be equal chunk for chunk. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from crosscoder.documents import Chunk, plan_chunks, read_documents, tokenization_key, tokenize  # noqa: E402

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tokenizer(where: Path, words: list[str], rng: random.Random):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(rng.choice(words) for _ in range(500)) for _ in range(400)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=16_000, special_tokens=["<s>", "<|end|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(where)
    return fast


def write_documents(path: Path, words: list[str], rng: random.Random, n: int, chat: bool) -> None:
    def sentence(length: int) -> str:
        return " ".join(rng.choice(words) for _ in range(length)) + "."

    with path.open("w") as fh:
        for _ in range(n):
            if chat:
                messages = [{"role": "user", "content": sentence(rng.randint(10, 60))},
                            {"role": "assistant", "content": sentence(rng.randint(40, 400))}]
                fh.write(json.dumps({"messages": messages}) + "\n")
            else:
                fh.write(json.dumps({"text": sentence(rng.randint(100, 1500))}) + "\n")


def one_by_one(source: str, tok, seq_len: int, max_tokens: int) -> list[Chunk]:
    """The planner before batching: one tokenizer or template call per document."""
    import numpy as np

    chunks, total = [], 0
    for doc, record in enumerate(read_documents(source)):
        ids = np.asarray(tokenize(record, tok, tok)[0], dtype=np.int32)
        for index, offset in enumerate(range(0, len(ids), seq_len)):
            piece = ids[offset : offset + seq_len]
            if len(piece) < 2:
                continue
            chunks.append(Chunk(doc, index, offset, piece, "messages" in record))
            total += len(piece)
            if total >= max_tokens:
                return chunks
    return chunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2_000_000)
    parser.add_argument("--out", default=str(ROOT / "bench-results" / "plan.json"))
    args = parser.parse_args()
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "zu", "an", "er", "in", "on", "str", "gr"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(20_000)]
    results: dict = {"tokens": args.tokens, "cpus": os.cpu_count(), "kinds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(Path(tmp) / "tok", words, rng)
        for kind in ("text", "chat"):
            docs = Path(tmp) / f"{kind}.jsonl"
            write_documents(docs, words, rng, n=args.tokens // 150, chat=kind == "chat")
            times, plans = {}, {}
            for name in ("one by one", "batched"):
                started = time.perf_counter()
                plans[name] = one_by_one(str(docs), tok, 1024, args.tokens) if name == "one by one" else \
                    plan_chunks(read_documents(str(docs)), tok, tok, 1024, args.tokens)
                times[name] = time.perf_counter() - started
            assert plans["batched"] == plans["one by one"], f"{kind}: the batched plan differs"
            assert all((a.tokens == b.tokens).all() for a, b in zip(plans["batched"], plans["one by one"]))
            planned = sum(len(c.tokens) for c in plans["batched"])
            row = {name: {"seconds": round(t, 2), "million_tokens_per_s": round(planned / t / 1e6, 3)}
                   for name, t in times.items()}
            row["speedup"] = round(times["one by one"] / times["batched"], 2)
            started = time.perf_counter()
            hashlib.sha256(docs.read_bytes()).hexdigest(), tokenization_key(tok, tok)
            row["re-run check"] = {"seconds": round(time.perf_counter() - started, 3)}
            row["re-run check vs batched plan"] = round(row["re-run check"]["seconds"] / times["batched"], 4)
            results["kinds"][kind] = row
            print(f"{kind}: {planned:,} tokens; one by one {row['one by one']['million_tokens_per_s']} M tok/s, "
                  f"batched {row['batched']['million_tokens_per_s']} M tok/s: {row['speedup']}x; a finished "
                  f"harvest's re-run check {row['re-run check']['seconds']} s", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
