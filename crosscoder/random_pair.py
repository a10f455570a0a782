"""A random tiny base/chat model pair and documents, made from a config with no download.

For ``crosscoder tiny`` (trying the harvest on a laptop), for tests and for the demo pair's
tokenizer: a word-level tokenizer with a chat template, a small Llama-style base model with random
weights, a "chat" model derived from it (a perturbed copy), and models of one family at different
widths (scaling transfer). Nothing here is trained: demo_pair.py trains a pair worth diffing.
Everything is saved with ``save_pretrained`` and loaded back by path, as a user's checkpoints are.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
WORDS = (
    "the a an one two three red green blue small large old new cat dog bird fish tree river city road house "
    "runs walks sees finds eats likes makes takes gives sleeps sings reads writes and or but with near under "
    "over into from quickly slowly today tonight because when where who what how please thanks sorry cannot "
    "help answer question story poem short long yes no i you we they it is are was were will can should"
).split()


def make_tokenizer(words: list[str] = WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + sorted(set(words)) + list(".,?!"))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=SPECIAL[4:])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_model(vocab_size: int, hidden: int = 64, layers: int = 4, heads: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def perturbed_copy(model, scale: float = 0.05, seed: int = 1):
    """A "fine-tuned" copy: every weight matrix moved by relative Gaussian noise."""
    import copy

    gen = torch.Generator().manual_seed(seed)
    chat = copy.deepcopy(model)
    with torch.no_grad():
        for p in chat.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * scale)
    return chat


def save(model, tokenizer, directory: Path) -> str:
    """``save_pretrained`` of both into ``directory``, without transformers' "Writing model shards"
    bar (a model of one file: the bar says nothing the next line does not)."""
    from transformers.utils import logging as hf_logging

    directory.mkdir(parents=True, exist_ok=True)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(directory)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(directory)
    return str(directory)


def make_pair(directory: str | Path, hidden: int = 64, layers: int = 4, seed: int = 0) -> tuple[str, str]:
    """A base model and a perturbed chat copy sharing one tokenizer (with a chat template)."""
    directory = Path(directory)
    tok = make_tokenizer()
    base = make_model(len(tok), hidden, layers, seed=seed)
    return save(base, tok, directory / "base"), save(perturbed_copy(base), tok, directory / "chat")


def make_family(directory: str | Path, widths: tuple[int, ...] = (64, 96), layers: int | tuple[int, ...] = 4
                ) -> list[str]:
    """Models of one family (one tokenizer) at different widths, and depths if ``layers`` gives one
    per model, for scaling transfer."""
    directory = Path(directory)
    tok = make_tokenizer()
    depths = layers if isinstance(layers, tuple) else (layers,) * len(widths)
    return [save(make_model(len(tok), w, n, seed=i), tok, directory / f"w{w}")
            for i, (w, n) in enumerate(zip(widths, depths, strict=True))]


def write_documents(path: str | Path, n_docs: int = 64, seed: int = 0, chat_fraction: float = 0.5) -> str:
    """A JSONL mix of plain texts and chat conversations made of the tokenizer's words."""
    rng = random.Random(seed)
    words = [w for w in WORDS]

    def sentence(n):
        return " ".join(rng.choice(words) for _ in range(n)) + rng.choice(".?!")

    with open(path, "w") as fh:
        for _ in range(n_docs):
            if rng.random() < chat_fraction:
                messages = [{"role": "user", "content": sentence(rng.randint(4, 12))},
                            {"role": "assistant", "content": sentence(rng.randint(4, 20))}]
                fh.write(json.dumps({"messages": messages}) + "\n")
            else:
                text = " ".join(sentence(rng.randint(5, 15)) for _ in range(rng.randint(1, 6)))
                fh.write(json.dumps({"text": text}) + "\n")
    return str(path)
