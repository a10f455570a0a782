"""Sparse crosscoders at scale: harvest activations, train, and diff models.

``CrossCoder.from_pretrained(<run dir>/crosscoder)`` loads a trained export.
"""

from .model import CrossCoder, CrossCoderSpec

__all__ = ["CrossCoder", "CrossCoderSpec"]
__version__ = "0.1.0"
