"""The sparse training forward of an acausal TopK/BatchTopK/JumpReLU crosscoder, and the memory it keeps.

:meth:`CrossCoder.forward <crosscoder.model.CrossCoder.forward>` is the readable math: the encoder
product, the sparsity rule, the decoder. Written that way, a training step pays for all ``B·L``
latent activations three more times after the encoder product, though only ``k·B`` are non-zero
(kernels.py). This path computes the same step through the active entries only:

1. the encoder product ``x @ W_enc + b_enc`` without autograd, into one ``[B, L]`` buffer kept across
   steps (allocated afresh its pages are faulted in again every step: measured ~0.2 s of 1.4 s at
   B = 2048, L = 64k on CPU; ``ForwardOutput.pre`` of a training step is therefore valid until the
   next training forward, and the buffer stays allocated between steps until ``eval()``);
2. the selection of the active entries (compiled where it applies, see sparsity.py);
3. the gathered pre-activations of those entries, with a gradient into the columns of ``W_enc`` they
   came from, and the decoder summed over them (``GatherPre``, ``SparseDecode``), their ``W_enc`` and
   ``W_dec`` gradients written into :class:`~crosscoder.kernels.GradientMemory` kept across steps
   (off for ZeRO-2/3, whose point is not holding whole gradients).

Extra entries to decode in the same pass (AuxK's, chosen in losses.py from the same ``pre``) are
decoded into rows ``B..2B``: each weight gets one dense gradient per step instead of two written
and then added. Results equal the dense path within float rounding (tests/test_model.py).

JumpReLU has no k: its entries are those with ``pre > θ − ε/2``, the fired ones and those in the
straight-through estimators' window just below θ (sparsity.py), whose value is 0 but whose decoder
gradient θ's estimator needs; both estimators and the L0 term (losses.py) then read those entries
only. Its code's size is set by the thresholds, so a step whose code would be too dense for this
path to pay (early in a run, thresholds near their start) runs the dense math instead, on the
product already computed (``kernels.EncoderProduct``; the share: below).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import precision
from .kernels import GradientMemory, encoder_product, gather_pre, sparse_decode
from .sparsity import JumpReLU, batchtopk_entries, topk_entries

if TYPE_CHECKING:
    from .model import CrossCoder

# BatchTopK's search hint for the next batch, as a fraction of this batch's threshold: the threshold
# rarely falls by more between batches; a miss costs one more pass over pre, never a wrong answer.
# (At B = 2048, L = 64k, 0.85 leaves ~4× k·B candidates against ~15× at 0.7: ~50 ms less per step.)
HINT_MARGIN = 0.85

# JumpReLU's code has no fixed size: its thresholds set it, and early in a run (thresholds still near
# their start) it can hold a large share of [B, L]. Above this share of entries a step runs the dense
# math instead (same results): measured on CPU at B = 2048, d = 256, L = 16k, the sparse forward and
# backward took 0.44× the dense one at 8% of entries, 0.68× at 11.5%, 0.88× at 14.5%, 0.97× at 20%,
# 1.08× at 24%. Elsewhere (a GPU, whose dense products cost far less per entry than gathers) a share
# estimated from memory bandwidth against matmul throughput, not yet measured.
JUMPRELU_DENSE_ABOVE = {"cpu": 1 / 8}
JUMPRELU_DENSE_ABOVE_ELSEWHERE = 1 / 32

# (pre [B, L] of one group) → (token, latent, number of latents they were chosen among): entries
# decoded with the main code in the same pass (AuxK's dead-latent entries)
ExtraEntries = Callable[[Tensor], tuple[Tensor, Tensor, int]]


@dataclass
class SparseCode:
    """The non-zero entries of a k-sparse code [B, G, L]: ``value`` carries the gradient."""

    token: Tensor  # [N] long
    group: Tensor  # [N] long
    latent: Tensor  # [N] long, index into this model's (local) latents
    value: Tensor  # [N]
    shape: tuple[int, int, int]

    def dense(self) -> Tensor:
        f = self.value.new_zeros(self.shape)
        f[self.token, self.group, self.latent] = self.value
        return f

    def fired(self) -> Tensor:
        """bool [G, L]: latents active on at least one token."""
        _, G, L = self.shape
        on = self.value.detach() != 0  # JumpReLU's code also holds its window's entries below θ, at 0
        counts = torch.bincount((self.group * L + self.latent)[on], minlength=G * L)
        return counts.view(G, L) > 0

    def active_count(self) -> Tensor:
        """Non-zero entries (L0 × tokens × groups), as a float tensor."""
        return torch.count_nonzero(self.value.detach()).to(torch.float32)


def too_dense(in_play: Tensor, model: CrossCoder) -> bool:
    """Whether a JumpReLU step's entries (``in_play``, bool [B, G, L]) pass its device's share (above)
    on any rank: every rank takes the same path, as their collectives must match."""
    share = JUMPRELU_DENSE_ABOVE.get(in_play.device.type, JUMPRELU_DENSE_ABOVE_ELSEWHERE)
    entries = int(torch.count_nonzero(in_play))
    return model.collectives.worst(int(entries > share * in_play.numel())) > 0


def jumprelu_floor(model: CrossCoder) -> Tensor:
    """[G, L] the smallest pre-activation that takes part in a JumpReLU step, ``θ − ε/2``: above it
    an entry either fired or lies in the straight-through estimators' window (sparsity.py); below,
    its value, its gradient and its share of θ's gradient are all zero."""
    return model.log_threshold.detach().exp() - model.jump_bandwidth / 2


@dataclass
class SparseStep:
    pre: Tensor  # [B, 1, L], no gradient (with one on a dense step)
    code: SparseCode | None  # None on a dense step
    batch_threshold: Tensor | None
    decoded: Tensor  # [B, D] Σ value · W_dec[latent], no bias
    extra_decoded: Tensor | None  # [B, D] the extra entries' decoding, no bias
    extra_among: int  # how many latents the extra entries were chosen among (0: none)
    dense_f: Tensor | None = None  # [B, 1, L] a dense step's activations


class SparsePath:
    """The sparse training forward (see the module docstring) and the buffers it keeps."""

    def __init__(self, gradient_memory: bool = True):
        self.pre_buffer: Tensor | None = None
        self.gradient_memory = GradientMemory() if gradient_memory else None

    def release(self) -> None:
        """Drop the kept buffers (``model.eval()`` calls this)."""
        self.pre_buffer = None
        if self.gradient_memory is not None:
            self.gradient_memory.clear()

    def forward(self, model: CrossCoder, x: Tensor, weights: Tensor, extra: ExtraEntries | None = None) -> SparseStep:
        B = x.shape[0]
        with torch.no_grad():
            pre = self.training_pre_activations(model, x) if model.training else model.pre_activations(x)
            # JumpReLU's entries: fired (pre > θ) and the estimators' window below θ
            in_play = pre > jumprelu_floor(model) if model.spec.activation == "jumprelu" else None
        if in_play is not None and too_dense(in_play, model):
            return self.dense_jumprelu(model, x, pre)
        with torch.no_grad():
            if in_play is not None:
                token, group, latent = in_play.nonzero(as_tuple=True)
                kth = None
            else:
                token, group, latent, kth = self.select_entries(model, pre, weights.detach())
            extra_token, extra_latent, among = extra(pre[:, 0]) if extra is not None else (token[:0], latent[:0], 0)
        all_token, all_latent = torch.cat([token, extra_token]), torch.cat([latent, extra_latent])
        memory = self.gradient_memory if model.training else None
        gathered = self.gather(model, x, pre, all_token, torch.zeros_like(all_token), all_latent, memory)
        main = gathered[: len(token)]
        if model.spec.activation == "jumprelu":  # zero below θ, and θ's gradient from the window's entries
            main = JumpReLU.apply(main, model.log_threshold.exp()[group, latent], model.jump_bandwidth)
        else:
            main = main.relu()
        value = torch.cat([main, gathered[len(token):].relu()]) if len(extra_token) else main
        # AuxK's rows ride in the same all-reduce only when it has entries: every rank agrees, as
        # ``among`` counts the dead latents over all shards
        rows = 2 * B if extra is not None and among > 0 else B
        decoded = model.collectives.sum_partial(
            sparse_decode(value, torch.cat([token, extra_token + B]), all_latent, model.W_dec, rows, memory))
        code = SparseCode(token, group, latent, main, (pre.shape[0], pre.shape[1], pre.shape[2]))
        if rows == 2 * B:  # split, not sliced: the backward joins the two gradients in one copy, where each
            own, extra_decoded = decoded.split(B)  # slice's filled a zeroed [2B, D] and added them
        else:
            own, extra_decoded = decoded, decoded[B:] if extra is not None else None
        return SparseStep(pre, code, kth, own, extra_decoded, among)

    @staticmethod
    def dense_jumprelu(model: CrossCoder, x: Tensor, pre: Tensor) -> SparseStep:
        """The model's dense math on the product already computed (a code too dense for this path):
        AuxK's entries are not decoded here, the loss computes them from ``pre`` as on the dense path."""
        pre = encoder_product(pre[:, 0], x, model.W_enc, model.b_enc).unsqueeze(1).to(model.W_enc.dtype)
        f = JumpReLU.apply(pre, model.log_threshold.exp(), model.jump_bandwidth)
        decoded = model.decode_group(f[:, 0], bias=False)
        return SparseStep(pre, None, None, decoded, None, 0, dense_f=f)

    def training_pre_activations(self, model: CrossCoder, x: Tensor) -> Tensor:
        """``model.pre_activations(x)`` written into the buffer kept across training steps; bf16
        weights on a CPU without bf16 GEMM write fp32 pre-activations (precision.py)."""
        shape, dtype = (x.shape[0], model.W_enc.shape[1]), precision.product_dtype(model.W_enc)
        buf = self.pre_buffer
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != model.W_enc.device:
            buf = self.pre_buffer = torch.empty(shape, dtype=dtype, device=model.W_enc.device)
        return precision.addmm_into(model.b_enc[0], x, model.W_enc, buf).unsqueeze(1)

    @staticmethod
    def select_entries(model: CrossCoder, pre: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(token, group, latent) of the active entries, sorted by token, and BatchTopK's threshold:
        the compiled selection where it applies, else the model's bool mask and ``nonzero``."""
        flat, kth = None, None
        k, collectives = model.spec.k, model.collectives
        if model.training and model.spec.activation == "batchtopk":
            hint = model.kth_hints[0] if model.kth_hints else None
            found = batchtopk_entries(pre[:, 0], weights[0], k, collectives, hint)
            if found is not None:
                flat, kth = found
                model.kth_hints = [HINT_MARGIN * float(kth)]
                kth = kth.view(1)
        elif model.spec.activation == "topk":
            flat = topk_entries(pre[:, 0], weights[0], k, collectives)
        if flat is not None:  # flat indices into pre[:, 0] ([B, L])
            L = pre.shape[2]
            return flat // L, torch.zeros_like(flat), flat % L, kth
        mask, kth = model.select(pre, weights, model.training)
        token, group, latent = mask.nonzero(as_tuple=True)
        return token, group, latent, kth

    @staticmethod
    def gather(model: CrossCoder, x: Tensor, pre: Tensor, token: Tensor, group: Tensor, latent: Tensor,
               memory: GradientMemory | None = None) -> Tensor:
        """``pre`` at the given entries, with gradient into ``W_enc``/``b_enc``."""
        # by flat index: one gather, where indexing by three tensors took 27 ms against 17 for 655k
        # entries of a 2048 x 65,536 pre (the main code's and AuxK's); pre may be fp32 (precision.py)
        _, G, L = pre.shape
        values = pre.reshape(-1)[(token * G + group) * L + latent].to(model.W_enc.dtype)
        return gather_pre(values, x, model.W_enc, model.b_enc, token, latent, memory)

    @staticmethod
    def code(model: CrossCoder, x: Tensor, pre: Tensor, token: Tensor, group: Tensor, latent: Tensor,
             memory: GradientMemory | None = None) -> SparseCode:
        """``relu(pre)`` at the given entries, with gradient into ``W_enc``/``b_enc``."""
        value = SparsePath.gather(model, x, pre, token, group, latent, memory).relu()
        return SparseCode(token, group, latent, value, (pre.shape[0], pre.shape[1], pre.shape[2]))

    @staticmethod
    def decode(model: CrossCoder, code: SparseCode) -> Tensor:
        """Σ value · W_dec[latent] per token, summed over latent shards; no bias. [B, D]."""
        return model.collectives.sum_partial(
            sparse_decode(code.value, code.token, code.latent, model.W_dec, code.shape[0]))
