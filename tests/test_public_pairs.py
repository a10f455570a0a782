"""The shipped configs for public base/chat pairs (hub ids, for users with a network): each loads,
passes the config check, names both models of one family by hub id, and hooks a module that exists
in that family's architecture at its real depth and width (built on the meta device: no weights, no
download). The architecture facts are those of the models' published config.json."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crosscoder.config import load_config, validate
from crosscoder.language_models import resolve_module

CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "configs"


def gemma2_2b():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=256_000, hidden_size=2304, intermediate_size=9216,
                                          num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                          head_dim=256))


def smollm2_135m():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=49_152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3))


def qwen25_05b():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864,
                                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2))


@pytest.mark.parametrize("file, hub_ids, architecture, width, layer", [
    ("gemma2-2b-l13.toml", ("google/gemma-2-2b", "google/gemma-2-2b-it"), gemma2_2b, 2304, 13),
    ("smollm2-135m-l15.toml", ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"), smollm2_135m,
     576, 15),
    ("qwen2.5-0.5b-l12.toml", ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct"), qwen25_05b, 896, 12),
])
def test_public_pair_config_names_the_pair_and_hooks_a_block_of_its_architecture(file, hub_ids, architecture,
                                                                                   width, layer):
    cfg = load_config(CONFIGS / file)
    validate(cfg)
    h = cfg.harvest
    assert [m["name"] for m in h.models] == ["base", "chat"] and tuple(m["path"] for m in h.models) == hub_ids
    assert len({m["dtype"] for m in h.models}) == 1  # one dtype, or the diff measures precision
    assert h.hooks == [f"model.layers.{layer}"] and h.data.startswith("hf:") and not h.demo_pair
    with torch.device("meta"):
        model = architecture()
    block = resolve_module(model, h.hooks[0])
    assert block is model.model.layers[layer] and layer < len(model.model.layers) - 1  # a block before the last
    assert model.config.hidden_size == width
    assert cfg.train.activation == "batchtopk" and cfg.train.latents >= 16 * width and cfg.train.k <= 128
    if file.startswith("gemma"):  # arXiv 2504.02922's dictionary: 32 × 2304 latents, k = 100
        assert (cfg.train.latents, cfg.train.k, cfg.train.lr) == (73_728, 100, 1e-4)
    # SmolLM2's BOS is a chat-template token and Qwen2.5 has none: documents start behind <|endoftext|>
    assert h.prefix == ("bos" if file.startswith("gemma") else "token:<|endoftext|>")


def test_every_shipped_config_loads_and_passes_the_config_check():
    files = sorted(CONFIGS.glob("*.toml"))
    assert len(files) >= 8
    for path in files:
        validate(load_config(path))


def smollm2_360m():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=49_152, hidden_size=960, intermediate_size=2560,
                                        num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5))


def test_scaling_transfer_config_reads_each_size_just_past_its_own_middle_block():
    """SmolLM2-135M (30 blocks) and -360M (32): each model table names its own hook, the block just
    past the middle of its own depth, so the two sources sit at the same relative depth."""
    from crosscoder.harvest import model_specs, source_names

    cfg = load_config(CONFIGS / "smollm2-135m-360m.toml")
    validate(cfg)
    sources = source_names(model_specs(cfg))
    assert [(name, m.path, hook) for name, m, hook in sources] == [
        ("small", "HuggingFaceTB/SmolLM2-135M", "model.layers.15"),
        ("large", "HuggingFaceTB/SmolLM2-360M", "model.layers.16")]
    for (_, _, hook), architecture, width in zip(sources, (smollm2_135m, smollm2_360m), (576, 960)):
        with torch.device("meta"):
            model = architecture()
        depth = len(model.model.layers)
        assert resolve_module(model, hook) is model.model.layers[depth // 2] and model.config.hidden_size == width
    assert cfg.train.latents >= 16 * 960 and cfg.harvest.prefix == "token:<|endoftext|>"
