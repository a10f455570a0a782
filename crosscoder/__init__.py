"""Sparse crosscoders at scale: harvest activations, train, and diff models.

``CrossCoder.from_pretrained(<run dir>/crosscoder)`` loads a trained export;
``crosscoder.pipeline.run(config)`` runs every stage. The package imports lazily: the shard,
storage and stream modules load without torch (tools that only read or write shards stay light).
"""

from typing import TYPE_CHECKING

__all__ = ["CrossCoder", "CrossCoderSpec"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from .model import CrossCoder, CrossCoderSpec


def __getattr__(name: str):
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'crosscoder' has no attribute {name!r}")
