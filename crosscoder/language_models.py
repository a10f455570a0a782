"""Load transformers models and read activations at hook points, stopping after the deepest one.

A hook point is the dotted path of a module (``model.layers.13``); its output (the residual
stream after that block, for a decoder layer) is what is harvested. Forward hooks capture the
outputs, and the hook on the deepest hooked module raises :class:`_Done` so no later layer, final
norm or unembedding runs: harvesting layer 13 of a 26-layer model costs about half a forward.
The cost of stopping by exception: the model's own return value is never built, so this reads
activations only (it is not a general forward).

Models are loaded with ``from_pretrained`` from a local directory or a hub id (offline use needs a
local directory), with a revision and dtype; ``device_map`` (e.g. ``"auto"``) splits a model too
large for one device across the actor's devices. Missing models and unknown hook paths are errors
that name the model and the path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A model cannot be loaded or hooked; the message names the model and what is wrong."""


@dataclass
class ModelSpec:
    name: str
    path: str
    revision: str | None = None
    dtype: str = "float32"
    device_map: str | None = None


def load_model(spec: ModelSpec):
    from transformers import AutoModelForCausalLM

    if spec.dtype not in DTYPES:
        raise ModelError(f"model {spec.name!r}: dtype {spec.dtype!r} is not one of {sorted(DTYPES)}")
    local = Path(spec.path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ModelError(f"model {spec.name!r}: {local} has no config.json (not a saved transformers model)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(local) if local.exists() else spec.path,
            revision=spec.revision,
            dtype=DTYPES[spec.dtype],
            device_map=spec.device_map,
        )
    except OSError as e:
        raise ModelError(
            f"model {spec.name!r}: cannot load {spec.path!r} (revision {spec.revision}): "
            f"{str(e).splitlines()[0]}. Without network access, give a local directory."
        ) from None
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    local = Path(path).expanduser()
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.exists() else path, revision=revision)
    except OSError as e:
        raise ModelError(f"tokenizer {path!r}: cannot load: {str(e).splitlines()[0]}") from None


def resolve_module(model: nn.Module, path: str, model_name: str = "model") -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        layers = [n for n, _ in model.named_modules() if n.count(".") <= 2 and "layers." in n][:4]
        raise ModelError(
            f"model {model_name!r} has no module {path!r}; hook points are module paths such as {layers}"
        ) from None


class _Done(Exception):
    pass


class ActivationReader:
    """Reads the outputs of ``hooks`` (module paths) of one model, in hook order, stopping early."""

    def __init__(self, model: nn.Module, hooks: list[str], model_name: str = "model"):
        self.model = model
        self.hooks = list(hooks)
        self.modules = [resolve_module(model, h, model_name) for h in self.hooks]
        order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
        self.deepest = max(self.modules, key=lambda m: order[id(m)])
        self.width = [self._width(m) for m in self.modules]

    def _width(self, module: nn.Module) -> int:
        cfg = getattr(self.model, "config", None)
        return int(getattr(cfg, "hidden_size", 0) or 0)

    @torch.no_grad()
    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Activations [B, T, d] of every hook, for a batch of token ids [B, T]."""
        captured: dict[int, torch.Tensor] = {}

        def make_hook(i, module):
            def hook(_module, _inputs, output):
                tensor = output[0] if isinstance(output, (tuple, list)) else output
                captured[i] = tensor.detach()
                if module is self.deepest and len(captured) == len(self.modules):
                    raise _Done

            return hook

        handles = [m.register_forward_hook(make_hook(i, m)) for i, m in enumerate(self.modules)]
        device = next(self.model.parameters()).device
        try:
            self.model(input_ids=input_ids.to(device),
                       attention_mask=None if attention_mask is None else attention_mask.to(device),
                       use_cache=False)
        except _Done:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [self.hooks[i] for i in range(len(self.modules)) if i not in captured]
        if missing:
            raise ModelError(f"hook points {missing} did not run in the forward pass")
        return [captured[i] for i in range(len(self.modules))]
