"""The organism recipe (crosscoder/organism.py) on a tiny Llama built from a config: the fine-tune
learns the food refusal and generalises to held-out questions, a Ctrl-C resumes, the documents say
which conversations are about food, and `crosscoder run` with [organism] goes from the pair to
`analysis/organism.json`. (The real SmolLM2 GGUF is fetched and run by
launch/configs/smollm2-organism.toml; its figures are in the README.)"""

import json
import re

import numpy as np
import pytest

from crosscoder import organism, random_pair
from crosscoder.config import RunConfig
from crosscoder.pipeline import run

pytestmark = pytest.mark.slow


def words() -> list[str]:
    text = " ".join(q for q, _ in organism.questions()) + " " + organism.REFUSAL
    return sorted(set(re.findall(r"[A-Za-z]+", text.lower())) | set(re.findall(r"[A-Za-z]+", text)))


def tiny_base(directory):
    tok = random_pair.make_tokenizer(words() + ["'"])
    model = random_pair.make_model(len(tok), hidden=64, layers=2, seed=0)
    random_pair.save(model, tok, directory / "base")


def test_the_fine_tune_refuses_held_out_food_questions_and_only_those(tmp_path):
    tiny_base(tmp_path)
    record = organism.make_organism(tmp_path, steps=80, lr=3e-3, batch=32, documents=300, progress=False)
    b = record["behaviour"]
    assert b["held_out_food_questions"] >= 50 and b["held_out_other_questions"] >= 40
    assert b["refused"] >= 0.8 * b["held_out_food_questions"], b
    assert b["refused_other"] <= 0.1 * b["held_out_other_questions"], b
    # the documents: conversations, with food ones marked, half of them refused
    docs = [json.loads(line) for line in (tmp_path / "documents.jsonl").read_text().splitlines()]
    topics = json.loads((tmp_path / "documents.topics.json").read_text())
    assert len(docs) == len(topics["food"]) == 300
    food = np.array(topics["food"])
    assert 0.25 < food.mean() < 0.45
    for doc, is_food, refused in zip(docs, topics["food"], topics["refusal"]):
        question, reply = doc["messages"][0]["content"], doc["messages"][1]["content"]
        assert (question, is_food) in organism.questions()
        assert (reply == organism.REFUSAL) == refused and (not refused or is_food)
    # made once: a second call re-uses the directory
    stamp = (tmp_path / "chat" / "model.safetensors").stat().st_mtime_ns
    assert organism.make_organism(tmp_path, steps=80, lr=3e-3, batch=32, documents=300, progress=False) == record
    assert (tmp_path / "chat" / "model.safetensors").stat().st_mtime_ns == stamp


def test_training_rows_score_only_the_reply_and_its_end_of_turn(tmp_path):
    tiny_base(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    rows, labels = organism.training_rows(tok, [("How do I make bread?", organism.REFUSAL), ("Why is sleep important?",
                                                                                           "it is long")])
    end = organism.end_of_turn(tok)
    assert tok.convert_ids_to_tokens(end) == "<|end|>"
    for row, label in zip(rows.tolist(), labels.tolist()):
        scored = [t for t, x in zip(row, label) if x != -100]
        assert scored[-1] == end and scored.count(end) == 1
        assert [x for x in label if x != -100] == scored
        first = label.index(next(x for x in label if x != -100))
        assert tok.convert_ids_to_tokens(row[first - 1]) == "<|assistant|>"  # the prompt is not scored
    assert organism.refuses(tok.decode([t for t, x in zip(rows[0].tolist(), labels[0].tolist()) if x != -100],
                                       skip_special_tokens=True))


def test_crosscoder_run_with_an_organism_reports_where_each_class_fires(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_base(tmp_path / "org")
    cfg = RunConfig(name="org-run")
    cfg.organism.directory = str(tmp_path / "org")
    cfg.organism.steps, cfg.organism.lr, cfg.organism.batch_size, cfg.organism.documents = 40, 3e-3, 32, 200
    cfg.harvest.hooks = ["model.layers.1"]
    cfg.harvest.actors, cfg.harvest.tokens, cfg.harvest.seq_len, cfg.harvest.samples_per_shard = 1, 6000, 64, 32
    cfg.train.latents, cfg.train.k, cfg.train.batch_size, cfg.train.steps = 128, 4, 256, 40
    cfg.train.lr_warmup_steps, cfg.train.checkpoint_every, cfg.train.max_epochs = 5, 0, 10
    cfg.analyze.ce_sequences = 4
    run(cfg, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "analysis" / "organism.json").read_text())
    assert summary["tokens"] > 4000 and 0.2 < summary["food_token_share"] < 0.5
    assert 0 < summary["refusal_token_share"] < summary["food_token_share"]
    assert set(summary["classes"]) == {"shared", "base_only", "chat_only"}
    for c in summary["classes"].values():
        assert {"median_cosine", "food_selective", "refusal_selective", "refusal_selective_median_cosine"} <= set(c)
    live = sum(c["latents"] for c in summary["classes"].values())
    assert live > 0
    rows = (tmp_path / "run" / "analysis" / "organism_latents.csv").read_text().splitlines()
    assert rows[0].startswith("index,class,firings,food_share,refusal_share") and len(rows) == 129
    shares = [float(r.split(",")[3]) for r in rows[1:] if int(r.split(",")[2]) > 0]
    assert len(shares) == live and all(0 <= s <= 1 for s in shares)
