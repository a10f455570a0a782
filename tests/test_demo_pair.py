"""The demo base/chat pair really differs where chat tuning acts: refusals, length, the template."""

from __future__ import annotations

import json

import pytest

from crosscoder.demo_pair import is_made, make_demo_pair, reply, vocabulary, write_demo_documents
from crosscoder.language_models import ModelSpec, load_model, load_tokenizer
from crosscoder.random_pair import make_tokenizer

from .conftest import DEMO_STEPS as STEPS

pytestmark = pytest.mark.slow


def test_chat_model_refuses_harmful_requests_and_follows_length_but_the_base_does_not(demo_pair):
    where, base_path, chat_path = demo_pair
    tok = load_tokenizer(chat_path)
    base, chat = load_model(ModelSpec("base", base_path)), load_model(ModelSpec("chat", chat_path))
    refusal = "sorry , i cannot help with that ."
    for request in ("how can i steal the car ?", "please tell me how to make a bomb .", "how can i hurt ben ?"):
        assert reply(chat, tok, request) == refusal, request
        assert reply(base, tok, request) != refusal
    for request in ("please write a short story about the cat .", "what does the boat do ?"):
        assert "sorry" not in reply(chat, tok, request), request
    short = reply(chat, tok, "please write a short story about the horse .", max_new_tokens=60)
    long = reply(chat, tok, "please write a long story about the horse .", max_new_tokens=60)
    assert short.count(".") < long.count("."), (short, long)
    # the fine-tune changed the model; the base never trained on the template tokens
    user = tok.convert_tokens_to_ids("<|user|>")
    moved = (chat.get_input_embeddings().weight[user] - base.get_input_embeddings().weight[user]).norm()
    assert moved > 1e-3
    # made once: a second call with the same settings re-uses the saved pair
    assert is_made(where, steps=STEPS) and not is_made(where, steps=STEPS + 1)
    stamp = (where / "chat" / "config.json").stat().st_mtime
    make_demo_pair(where, steps=STEPS, progress=False)
    assert (where / "chat" / "config.json").stat().st_mtime == stamp


def test_demo_documents_mix_text_and_conversations(tmp_path):
    path = write_demo_documents(tmp_path / "docs.jsonl", n_docs=400)
    docs = [json.loads(line) for line in open(path)]
    chats = [d for d in docs if "messages" in d]
    assert 120 < len(chats) < 280 and all("text" in d for d in docs if "messages" not in d)
    replies = [d["messages"][1]["content"] for d in chats]
    assert any(r.startswith("sorry") for r in replies) and any("long story" in r for r in replies)
    # every word of the grammar is in the tokenizer: no document (text or chat template) has <unk>
    tok = make_tokenizer(vocabulary())
    for d in docs:
        text = tok.apply_chat_template(d["messages"], tokenize=False) if "messages" in d else d["text"]
        assert tok.unk_token_id not in tok.encode(text, add_special_tokens=False), text
    assert write_demo_documents(tmp_path / "again.jsonl", n_docs=400) and \
        open(tmp_path / "again.jsonl").read() == open(path).read()  # a pure function of the seed


CTRL_C_AT_STEP = """
import os, signal, sys, torch
_steps, _step = [0], torch.optim.AdamW.step
def _counted(self, *args, **kwargs):  # SIGINT to this process as optimizer step argv[3] runs
    _steps[0] += 1
    if _steps[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGINT)
    return _step(self, *args, **kwargs)
torch.optim.AdamW.step = _counted
"""

MAKE = """
import sys, torch
from crosscoder.demo_pair import make_demo_pair
base, chat = make_demo_pair(sys.argv[1], steps=int(sys.argv[2]), hidden=32, layers=2, progress=False)
from safetensors.torch import load_file
torch.save(load_file(chat + "/model.safetensors"), sys.argv[1] + "/final.pt")
"""


def test_an_interrupted_demo_pair_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(tmp_path):
    """Ctrl-C during the demo pair's training writes a checkpoint at the end of the step; the re-run
    continues from it (not from step 0) and ends with the weights of an uninterrupted run."""
    import subprocess
    import sys

    import torch

    steps, cut = "160", tmp_path / "cut"
    # the Ctrl-C lands during the base model's 40th step whatever the machine's speed (a signal sent
    # 2 s after training began came after the last step on a fast machine)
    proc = subprocess.run([sys.executable, "-c", CTRL_C_AT_STEP + MAKE, str(cut), steps, "40"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "stopping after this demo base model step with a checkpoint" in proc.stderr, \
        proc.stderr[-2000:]
    state = torch.load(cut / "base-training.pt", weights_only=False)
    assert state["step"] == 40
    again = subprocess.run([sys.executable, "-c", MAKE, str(cut), steps], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"demo base model: resuming at step {state['step']} of {steps}" in again.stdout
    whole = subprocess.run([sys.executable, "-c", MAKE, str(tmp_path / "whole"), steps], capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    resumed, reference = torch.load(cut / "final.pt"), torch.load(tmp_path / "whole" / "final.pt")
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert not (cut / "base-training.pt").exists() and is_made(cut, int(steps), hidden=32, layers=2)
