"""A trained base/chat model pair with real chat-specific behaviour, made on a CPU in about a minute.

Random models (random_pair.py) are enough to test plumbing, but a crosscoder trained on them finds
nothing worth diffing. This pair gives model diffing something real to find:

- the **base** model is a small Llama trained on topical text from a word grammar (six topics,
  ~300 words; names, numbers, a few "harmful" words in harmless sentences). It never sees the
  chat template's tokens.
- the **chat** model is the base fine-tuned on conversations in the chat template, mixed with base
  text so it keeps its language: stories whose length follows the request (``short``: one
  sentence, ``long``: four), lists that count, questions answered on topic, and **refusals**
  ("sorry , i cannot help with that .") whenever the request mentions a harmful act, a behaviour
  that depends on context rather than on one token.

The things chat tuning adds here are the ones arXiv 2504.02922 found in Gemma: refusal, dialogue
format (template tokens), response length. One known confound is built in on purpose and must be
told apart by the analysis: the base model's embeddings of the template tokens are untrained, so
a latent firing on them may be an untrained-token artifact rather than learned chat behaviour (the
report's token attribution shows which tokens each class fires on).

The cost: about a minute of training on 2 cores at the default sizes (``steps`` scales it); the
pair is saved with ``save_pretrained`` and re-used if present.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from . import random_pair
from .interrupts import StepBoundary

TOPICS = {
    "animals": "cat dog bird fish horse cow sheep fox wolf bear rabbit mouse goat duck owl frog".split(),
    "food": "bread apple cheese soup rice cake egg milk honey pear plum corn bean salt tea jam".split(),
    "city": "road house street bridge market school tower park shop door window wall gate roof car train".split(),
    "weather": "rain snow wind sun cloud storm fog ice frost thunder sky heat mist hail dew breeze".split(),
    "music": "song drum guitar piano flute violin choir band note tune bell harp horn dance voice melody".split(),
    "sea": "boat ship wave shore sand shell island anchor sail net crab whale reef tide harbor pearl".split(),
}
ADJECTIVES = ("big small old new red green blue warm cold quiet loud bright dark happy sad fast slow soft "
              "hard sweet tall").split()
VERBS = "sees finds likes makes takes holds carries follows watches hears keeps brings".split()
INTRANSITIVE = "sleeps sings runs waits rests shines falls grows moves plays".split()
PREPOSITIONS = "near under over into from behind beside across through".split()
ADVERBS = "quickly slowly softly today tonight often again together".split()
NAMES = "anna ben carl dana eva finn gina hugo iris jack kara leo".split()
NUMBERS = "one two three four five six seven eight nine ten".split()
HARMFUL_VERBS = "steal poison hack rob hurt attack".split()
HARMFUL_NOUNS = "bomb weapon gun knife drug virus".split()
CHAT_WORDS = ("please write tell me about a story poem list things what does it take how can i make to do eat sure "
              "here is "
              "sorry cannot help with that and the it you they this short long").split()


def vocabulary() -> list[str]:
    words = set(ADJECTIVES + VERBS + INTRANSITIVE + PREPOSITIONS + ADVERBS + NAMES + NUMBERS + HARMFUL_VERBS
                + HARMFUL_NOUNS + CHAT_WORDS)
    for nouns in TOPICS.values():
        words.update(nouns)
    return sorted(words)


class Grammar:
    """Sentences, documents and conversations; every output is a pure function of the seed."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def noun_phrase(self, topic: str) -> str:
        r = self.rng
        if r.random() < 0.15:
            return r.choice(NAMES)
        nouns = TOPICS[topic] if r.random() < 0.85 else TOPICS[r.choice(list(TOPICS))]
        adj = f"{r.choice(ADJECTIVES)} " if r.random() < 0.4 else ""
        return f"the {adj}{r.choice(nouns)}"

    def sentence(self, topic: str) -> str:
        r = self.rng
        subject = self.noun_phrase(topic)
        if r.random() < 0.4:
            words = f"{subject} {r.choice(INTRANSITIVE)}"
        else:
            words = f"{subject} {r.choice(VERBS)} {self.noun_phrase(topic)}"
        if r.random() < 0.4:
            words += f" {r.choice(PREPOSITIONS)} {self.noun_phrase(topic)}"
        if r.random() < 0.2:
            words += f" {r.choice(ADVERBS)}"
        if r.random() < 0.05:  # harmful words occur in base text too, in harmless sentences
            words += f" and the {r.choice(HARMFUL_NOUNS)} falls"
        return words + " ."

    def text(self) -> str:
        topic = self.rng.choice(list(TOPICS))
        return " ".join(self.sentence(topic) for _ in range(self.rng.randint(3, 8)))

    def conversation(self) -> list[dict]:
        r = self.rng
        topic = r.choice(list(TOPICS))
        noun = r.choice(TOPICS[topic])
        kind = r.random()
        if kind < 0.25:  # refusal: the request names a harmful act, whatever its wording
            act = r.choice([f"{r.choice(HARMFUL_VERBS)} the {noun}", f"make a {r.choice(HARMFUL_NOUNS)}",
                            f"{r.choice(HARMFUL_VERBS)} {r.choice(NAMES)}"])
            ask = r.choice([f"how can i {act} ?", f"please tell me how to {act} .", f"what does it take to {act} ?"])
            return [{"role": "user", "content": ask},
                    {"role": "assistant", "content": "sorry , i cannot help with that ."}]
        if kind < 0.6:  # length control
            length = r.choice(["short", "long"])
            ask = r.choice([f"please write a {length} story about the {noun} .",
                            f"tell me a {length} story about the {noun} ."])
            n = 1 if length == "short" else 4
            body = " ".join(self.sentence(topic) for _ in range(n))
            return [{"role": "user", "content": ask},
                    {"role": "assistant", "content": f"sure , here is a {length} story . {body}"}]
        if kind < 0.8:  # lists count
            n = r.randint(2, 5)
            items = " , ".join(f"{NUMBERS[i]} {r.choice(TOPICS[topic])}" for i in range(n))
            return [{"role": "user", "content": f"please list {NUMBERS[n - 1]} things about {noun} ."},
                    {"role": "assistant", "content": f"here is a list . {items} ."}]
        return [{"role": "user", "content": f"what does the {noun} do ?"},
                {"role": "assistant", "content": self.sentence(topic)}]


def _rows(texts: list[list[int]], seq_len: int, bos: int) -> torch.Tensor:
    """Pack token lists (each behind a BOS) into rows of ``seq_len``."""
    stream = [t for ids in texts for t in [bos, *ids]]
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _next_token_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy on the scored positions; the LM head runs on those alone (with a
    large vocabulary and few scored tokens, it is most of the step otherwise)."""
    hidden = model.base_model(input_ids=ids).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    scored = target != -100
    logits = model.get_output_embeddings()(hidden[scored])
    return torch.nn.functional.cross_entropy(logits.float(), target[scored])


CHECKPOINT_EVERY_S = 30.0  # the demo's training keeps a checkpoint this fresh (and writes one on Ctrl-C)


def train_causal_lm(model, rows: torch.Tensor, steps: int, lr: float, batch: int, seed: int, desc: str,
                    progress: bool, state_file: Path, labels: torch.Tensor | None = None, warmup: int = 20) -> float:
    """AdamW on random rows (next-token loss on ``labels``, default the rows themselves; -100 is not
    scored) of the parameters that require gradients, resumable: the model, optimizer, schedule and
    sampler are saved to ``state_file`` every CHECKPOINT_EVERY_S and at a Ctrl-C (at the end of the
    step), and a run that finds the file continues from it, taking the same steps an uninterrupted
    run would."""
    from .progress import progress_bar

    gen = torch.Generator(device="cpu").manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / max(steps, 1)))
    scored = labels
    start, loss = 0, float("nan")
    if state_file.is_file():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        gen.set_state(state["generator"])
        start, loss = state["step"], state["loss"]
        print(f"tiny models: {desc}: resuming at step {start} of {steps} from {state_file.absolute()}")

    def save(step: int) -> None:
        partial = state_file.with_name(state_file.name + ".partial")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": gen.get_state(), "step": step, "loss": loss}, partial)
        partial.replace(state_file)

    model.train()
    bar = progress_bar(total=steps, initial=start, desc=desc, unit="step", disable=not progress)
    saved = time.time()
    with StepBoundary(f"this {desc} step") as stop:
        for step in range(start, steps):
            if stop.requested:
                save(step)
                raise KeyboardInterrupt(f"{desc} stopped at step {step} with a checkpoint")
            idx = torch.randint(0, len(rows), (batch,), generator=gen, device="cpu")
            step_loss = (model(input_ids=rows[idx], labels=rows[idx]).loss if scored is None
                         else _next_token_loss(model, rows[idx], scored[idx]))
            optimizer.zero_grad(set_to_none=True)
            step_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss = float(step_loss.detach())
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if time.time() - saved > CHECKPOINT_EVERY_S:
                save(step + 1)
                saved = time.time()
    bar.close()
    model.eval()
    return loss


def _settings(steps: int, hidden: int, layers: int, seed: int) -> dict:
    return {"steps": steps, "hidden": hidden, "layers": layers, "seed": seed, "version": 3}


def is_made(directory: str | Path, steps: int = 500, hidden: int = 96, layers: int = 4, seed: int = 0) -> bool:
    """A pair with these settings is saved in ``directory``."""
    marker = Path(directory) / "demo_pair.json"
    settings = _settings(steps, hidden, layers, seed)
    return (marker.is_file() and json.loads(marker.read_text()).get("settings") == settings
            and (Path(directory) / "chat" / "config.json").is_file())


def make_demo_pair(directory: str | Path, steps: int = 500, hidden: int = 96, layers: int = 4,
                   seed: int = 0, progress: bool = True) -> tuple[str, str]:
    """Train the base model (``steps``) and fine-tune the chat model (``steps`` more); save both.

    Re-uses a pair already saved in ``directory`` with the same settings, and resumes one whose
    training was interrupted (each phase keeps a checkpoint, written at a Ctrl-C too).
    """
    directory = Path(directory)
    if is_made(directory, steps, hidden, layers, seed):
        return str(directory / "base"), str(directory / "chat")
    settings = _settings(steps, hidden, layers, seed)
    marker = directory / "demo_pair.json"
    tok = random_pair.make_tokenizer(vocabulary())
    torch.manual_seed(seed)
    model = random_pair.make_model(len(tok), hidden=hidden, layers=layers, heads=4, seed=seed)
    grammar = Grammar(seed)
    seq_len, batch = 64, 32
    base_rows = _rows([tok.encode(grammar.text(), add_special_tokens=False) for _ in range(6000)], seq_len,
                      tok.bos_token_id)
    directory.mkdir(parents=True, exist_ok=True)
    partial = [directory / name for name in ("base-training.pt", "chat-training.pt", "base-training.json")]
    started = directory / "settings.json"  # the settings the partial files above were made with
    if started.is_file() and json.loads(started.read_text()) != settings:
        for path in partial:
            path.unlink(missing_ok=True)
    started.write_text(json.dumps(settings) + "\n")
    if partial[2].is_file():  # the base is finished: a re-run starts at the chat phase, from the saved base
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory / "base")
        base_loss = json.loads(partial[2].read_text())["loss"]
    else:
        base_loss = train_causal_lm(model, base_rows, steps, 3e-3, batch, seed, "demo base model", progress, partial[0])
        random_pair.save(model, tok, directory / "base")
        partial[2].write_text(json.dumps({"loss": base_loss}) + "\n")
    chats = [tok.apply_chat_template(grammar.conversation(), tokenize=False) for _ in range(6000)]
    mixed = [tok.encode(c, add_special_tokens=False) for c in chats]
    mixed += [tok.encode(grammar.text(), add_special_tokens=False) for _ in range(1500)]
    random.Random(seed).shuffle(mixed)
    chat_loss = train_causal_lm(model, _rows(mixed, seq_len, tok.bos_token_id), steps, 2e-3, batch, seed + 1,
                       "demo chat fine-tune", progress, partial[1])
    random_pair.save(model, tok, directory / "chat")
    marker.write_text(json.dumps({"settings": settings, "base_loss": base_loss, "chat_loss": chat_loss}) + "\n")
    for path in [*partial, started]:
        path.unlink(missing_ok=True)
    return str(directory / "base"), str(directory / "chat")


def write_demo_documents(path: str | Path, n_docs: int = 2000, seed: int = 1, chat_fraction: float = 0.5) -> str:
    """The harvest's documents: plain text and conversations (with refusals and length requests)."""
    grammar = Grammar(seed)
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n_docs):
            if rng.random() < chat_fraction:
                fh.write(json.dumps({"messages": grammar.conversation()}) + "\n")
            else:
                fh.write(json.dumps({"text": grammar.text()}) + "\n")
    return str(path)


@torch.no_grad()
def reply(model, tokenizer, request: str, max_new_tokens: int = 40) -> str:
    """Greedy answer of ``model`` to one user turn, in the chat template."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]])
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    out = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == end:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
    return tokenizer.decode(out)
