"""Load transformers models and read activations at hook points, stopping after the deepest one.

A hook point is the dotted path of a module (``model.layers.13``); its output (the residual
stream after that block, for a decoder layer) is what is harvested. Forward hooks capture the
outputs, and the hook on the deepest hooked module raises :class:`_Done` so no later layer, final
norm or unembedding runs: harvesting layer 13 of a 26-layer model costs about half a forward.
The cost of stopping by exception: the model's own return value is never built, so this reads
activations only (it is not a general forward).

:func:`load_trunk` does not even load what the hooks do not reach: when every hook is inside a
numbered decoder layer of the base model, it loads the base model (no LM head) with the layers up
to the deepest hooked one, so memory, not only compute, stops there (a 26-layer model hooked at 13
loads half its layers and no unembedding). :func:`load_model` loads the whole causal LM (CE loss
recovered needs its logits).

Models are loaded with ``from_pretrained`` from a local directory or a hub id (offline use needs a
local directory), with a revision and dtype, onto the actor's device: one GPU (``device``), or split
over several with ``device_map`` (``auto``, ``balanced``, …, and an optional ``max_memory`` map,
through accelerate). Missing models and unknown hook paths are errors that name the model and path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CrosscoderError, message_line
from .hub_access import cached_snapshot, hub_unavailable
from .progress import pace_transformers_bars

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# a numbered decoder layer in a module path: model.layers.13, transformer.h.5, …
BLOCKS = r"(?:layers|h|blocks|layer)"  # what the numbered decoder blocks' list is called
LAYER = re.compile(rf"\.{BLOCKS}\.(\d+)(?:\.|$)")
BLOCK = re.compile(rf"(?:^|\.){BLOCKS}\.\d+$")  # a block itself: model.layers.3, h.11


class ModelError(CrosscoderError, ValueError):
    """A model cannot be loaded or hooked; the message names the model and what is wrong."""


@dataclass
class ModelSpec:
    name: str
    path: str
    revision: str | None = None
    dtype: str = "float32"
    device_map: str | dict | None = None  # split over the process's devices (accelerate): auto, balanced, …
    max_memory: dict | None = None  # with device_map: per device, e.g. {0: "20GiB", "cpu": "64GiB"}
    device: str = "cpu"  # without device_map: where the whole model goes
    hooks: list[str] = field(default_factory=list)  # the harvest's module paths in this model


HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # "gpt2" or "org/name"


def where(name: str, path: str, revision: str | None = None) -> dict:
    """``from_pretrained``'s arguments for ``path``: an existing directory, or a hub id.

    A path that looks local (absolute, relative with ./ or ../ or ~, more than one separator, or a
    separator after an existing directory) and is not there is a ModelError at once, never a hub
    lookup with its network retries; so is a hub id not cached while the hub is offline, or its
    host name does not resolve (:mod:`hub_access`). A cached one is then read from the cache alone
    (``local_files_only``), not after transformers' retries; it keeps its hub id as its name.
    """
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "config.json").is_file():
            raise ModelError(f"model {name!r}: {local} has no config.json (not a saved transformers model)")
        return {"pretrained_model_name_or_path": str(local), "revision": revision}
    first = Path(path).parts[0] if Path(path).parts else ""
    looks_local = (path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or not HUB_ID.match(path)
                   or ("/" in path and Path(first).is_dir()))
    if looks_local:
        raise ModelError(f"model {name!r}: model directory {local.absolute()} does not exist")
    why = hub_unavailable()
    if not why:
        return {"pretrained_model_name_or_path": path, "revision": revision}
    snapshot = cached_snapshot(path, "model", revision)
    if snapshot is None or not (snapshot / "config.json").is_file():
        at = "" if revision is None else f" at revision {revision!r}"
        raise ModelError(f"model {name!r}: {path!r} is not a local directory and the Hugging Face hub {why}, "
                         f"with no cached copy{at}; give a local directory")
    return {"pretrained_model_name_or_path": path, "revision": revision, "local_files_only": True}


def _from_pretrained(loader, spec: ModelSpec, **kwargs):
    if spec.dtype not in DTYPES:
        raise ModelError(f"model {spec.name!r}: dtype {spec.dtype!r} is not one of {sorted(DTYPES)}")
    located = where(spec.name, spec.path, spec.revision)
    if spec.device_map is not None:
        max_memory = {int(k) if str(k).isdigit() else k: v for k, v in (spec.max_memory or {}).items()}
        kwargs |= {"device_map": spec.device_map, "max_memory": max_memory or None}
    elif spec.device != "cpu":
        kwargs["device_map"] = {"": spec.device}  # straight onto the GPU, no full copy on the host
    pace_transformers_bars()  # "Loading weights": one line a redraw in a log
    try:
        model = loader.from_pretrained(**located, dtype=DTYPES[spec.dtype], **kwargs)
    except OSError as e:
        raise ModelError(
            f"model {spec.name!r}: cannot load {spec.path!r} (revision {spec.revision}): "
            f"{message_line(e)}. Without network access, give a local directory."
        ) from None
    model.eval()
    model.requires_grad_(False)
    return model


def load_model(spec: ModelSpec):
    """The whole causal language model (with its LM head)."""
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, spec)


def load_trunk(spec: ModelSpec, hooks: list[str]) -> tuple[nn.Module, list[str]]:
    """The model only as deep as ``hooks`` reach, and the hooks' paths in what was loaded.

    When every hook lies in a numbered layer of the base model (``model.layers.13``, not
    ``lm_head``), that is the base model without its LM head, with ``num_hidden_layers`` cut after
    the deepest hooked layer; otherwise the whole causal LM.
    """
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    try:
        config = load_config(spec.name, spec.path, spec.revision)
        prefix = AutoModelForCausalLM._model_mapping[type(config)].base_model_prefix  # type: ignore[attr-defined]
    except (OSError, KeyError, ValueError):
        return load_model(spec), list(hooks)  # let the full load report what is wrong
    depths = [LAYER.search(h) for h in hooks]
    layers = getattr(config, "num_hidden_layers", None)
    if not (layers and all(depths) and all(h.startswith(prefix + ".") for h in hooks)):
        return load_model(spec), list(hooks)
    keep = min(layers, 1 + max(int(m.group(1)) for m in depths if m))
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the weights of the layers cut and the LM head are expected to go unused
    try:
        model = _from_pretrained(AutoModel, spec, config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, [h[len(prefix) + 1:] for h in hooks]


def load_config(name: str, path: str, revision: str | None = None):
    """The model's transformers config (errors as for the model)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(**where(name, path, revision))
    except OSError as e:
        raise ModelError(f"model {name!r}: cannot load the config of {path!r}: {message_line(e)}") from None


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(**where(path, path, revision))
    except OSError as e:
        raise ModelError(f"tokenizer {path!r}: cannot load: {message_line(e)}") from None


def resolve_module(model: nn.Module, path: str, model_name: str = "model", shown: str | None = None) -> nn.Module:
    """The module at ``path``; else a ModelError naming ``shown`` (the path as the user wrote it, when
    ``model`` is a trunk loaded without the prefix) and the model's blocks, as the user would write them."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        prefix = shown[: len(shown) - len(path)] if shown and shown.endswith(path) else ""
        names = [prefix + n for n, _ in model.named_modules() if n]
        blocks = [n for n in names if BLOCK.search(n)]
        hint = (f"its blocks are {blocks[0]} … {blocks[-1]}" if blocks
                else f"hook points are module paths such as {names[:4]}")
        raise ModelError(f"model {model_name!r} has no module {shown or path!r}; {hint}") from None


def check_hooks(config, hooks: list[str], model_name: str) -> None:
    """Every hook is a module of the model of ``config`` (its transformers config) whose output has
    the model's width, checked on its skeleton (built on the meta device: no weights, no memory),
    so a misspelt hook, or one inside the MLP or attention (``mlp.up_proj``: the MLP's width), is
    one line before any actor loads a model. A module whose width its type does not tell
    (``mlp.act_fn``) is checked by :meth:`ActivationReader.read` on the first batch."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError):  # not a causal LM that transformers knows: the actor's load says so
        return
    for hook in hooks:
        module = resolve_module(skeleton, hook, model_name)
        width = getattr(module, "out_features", None) or getattr(module, "embedding_dim", None)
        if isinstance(width, int):
            check_width(model_name, hook, width, int(config.hidden_size))


def check_width(model_name: str, hook: str, width: int, hidden: int) -> None:
    """A hook's output width is the model's (the harvest stores residual-stream-wide sources)."""
    if width != hidden:
        raise ModelError(f"model {model_name!r}: {hook!r} outputs width {width}, not the model's hidden size {hidden}; "
                         "hooks are residual-stream points: a block (model.layers.N), or its attention or MLP output")


class _Done(Exception):
    pass


class ActivationReader:
    """Reads the outputs of ``hooks`` (module paths) of one model, in hook order, stopping early."""

    def __init__(self, model: nn.Module, hooks: list[str], model_name: str = "model", shown: list[str] | None = None):
        """``hooks``: module paths in ``model``; ``shown``: the names the user gave them, for errors
        (they differ when :func:`load_trunk` loaded the base model only)."""
        self.model, self.model_name = model, model_name
        self.hooks = list(shown or hooks)
        self.modules = [resolve_module(model, h, model_name, s) for h, s in zip(hooks, self.hooks)]
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
        for i, hook in enumerate(self.hooks):
            if self.width[i]:
                check_width(self.model_name, hook, captured[i].shape[-1], self.width[i])
        return [captured[i] for i in range(len(self.modules))]
