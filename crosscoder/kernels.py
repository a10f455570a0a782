"""Sparse encoder gradient and sparse decoder for k-sparse codes, as autograd functions.

After TopK/BatchTopK only ``N ≈ k·B`` of the ``B·L`` latent activations are non-zero. A dense
implementation still pays for all of them three more times after the encoder forward: the decoder
``f @ W_dec``, its backward into ``f`` and into ``W_dec``, and the encoder's backward
``x.T @ grad_pre``, each ``B·L·D`` multiply-adds, plus several ``[B, L]`` buffers kept for
backward. Here a code is the list of its non-zero entries ``(token, latent, value)``:

- :class:`GatherPre` returns pre-activations already computed (without autograd) at the selected
  entries, and in backward sends their gradient to exactly those columns of ``W_enc`` and entries
  of ``b_enc``: ``grad W_enc`` costs ``N·D``, not ``B·L·D``;
- :class:`SparseDecode` computes ``Σ value · W_dec[latent]`` per token (``embedding_bag``, or the
  compiled latent-by-latent kernel); its backward touches only the active rows (``N·D`` each way).

What it costs: the gradients of ``W_enc`` and ``W_dec`` are still dense tensors (zeros except the
touched columns/rows), as every optimizer and ZeRO expects, so each step writes ``2·L·D`` zeros;
the sums run in another order than a matmul's, so results equal the dense path within float
rounding, not bit for bit. Pure PyTorch, CPU and GPU alike; on CPU the encoder gradient and the
decoder's backward go through the compiled kernels of native.py when they are built (one pass
each, latent by latent: ``grad W_enc`` written straight in its ``[D, L]`` layout, each ``W_dec``
row read once for all its entries and its gradient row written once).

Gradient memory (:class:`GradientMemory`, compiled path): a fresh ``[L, D]`` gradient is page-faulted
in on every step (measured at L = 64k, D = 1024 on CPU: ~110 ms per gradient, of a ~1.2 s sparse
step beyond the encoder product). Given a ``GradientMemory``, the backward writes the two gradients
into buffers kept across steps, handed to autograd as new tensors on the same memory, so they become
``.grad`` without a copy. A buffer is reused only when no tensor other than the memory's own still
uses it (the storage's reference count), so a gradient someone kept, or one being accumulated into,
is never overwritten: a new buffer is made instead. The cost: the two gradients' memory stays
allocated between steps (as with ``zero_grad(set_to_none=False)``), which is why the ZeRO-2/3
trainer, whose point is not holding whole gradients, runs without it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import native

CHUNK = 8192  # rows per block when a gather cannot be avoided: bounded, reused temporaries
GPU_BLOCK_ELEMENTS = 1 << 26  # elements per gathered block on a GPU (256 MiB of fp32)


class GradientMemory:
    """Gradient buffers kept across training steps, by name (see the module docstring)."""

    def __init__(self):
        self._buffers: dict[str, tuple[Tensor, int]] = {}

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A contiguous tensor of ``shape`` with ``like``'s dtype and device, on memory no other tensor
        uses; the memory keeps it for the next step."""
        kept = self._buffers.get(name)
        if kept is not None and _storage_use_count is not None:
            buffer, free_count = kept
            if (tuple(buffer.shape) == tuple(shape) and buffer.dtype == like.dtype and buffer.device == like.device
                    and _storage_users(buffer) == free_count):
                return buffer.detach()
        buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        self._buffers[name] = (buffer, _storage_users(buffer))
        return buffer.detach()

    def clear(self) -> None:
        self._buffers.clear()


# torch's count of references to a storage (private; absent in some other torch: then no reuse)
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_users(t: Tensor) -> int:
    """References to ``t``'s memory (tensors, views, autograd buffers): more than when the memory made
    it means someone else still holds it."""
    return _storage_use_count(t.untyped_storage()._cdata) if _storage_use_count is not None else 0


def bag_sum(index: Tensor, weight: Tensor, bag: Tensor, n_bags: int, scale: Tensor, bags_sorted: bool = True
            ) -> Tensor:
    """``out[j] = Σ_{n: bag_n = j} scale_n · weight[index_n]`` → [n_bags, D].

    ``embedding_bag`` does the gather, the scaling and the sum in one pass per output row, with no
    ``[N, D]`` temporary (the temporaries, not the arithmetic, dominated a gather-multiply-add). It
    needs ``bag`` ascending: ``bags_sorted=False`` sorts the entries first (stably). On a GPU it sums
    each bag serially, and bags by latent are uneven (AuxK's dead latents hold thousands of
    entries); atomic adds (``index_add_`` into fp32 rows) were tried there and gave no measurable
    gain at L = 64k on an H200 while making sums vary between runs, so this is kept on every device.
    """
    if not bags_sorted:
        order = torch.argsort(bag, stable=True)
        index, bag, scale = index[order], bag[order], scale[order]
    counts = torch.bincount(bag, minlength=n_bags)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(index, weight, offsets, mode="sum", per_sample_weights=scale.to(weight.dtype))


def _block_rows(a: Tensor) -> int:
    """Rows per block of gathered ``[rows, width]`` temporaries from ``a``: CHUNK on a CPU (cache
    sized); on a GPU, where each block is a kernel launch (with CHUNK rows: ~320 small launches per
    step at L = 64k, measured on an H200), up to ``GPU_BLOCK_ELEMENTS`` elements."""
    if not a.is_cuda:
        return CHUNK
    return max(CHUNK, GPU_BLOCK_ELEMENTS // max(a.shape[1], 1))


def rowwise_dot(a: Tensor, a_index: Tensor, b: Tensor, b_index: Tensor) -> Tensor:
    """``(a[a_index] * b[b_index]).sum(1)``, in blocks gathered into two reused buffers."""
    n = a_index.numel()
    out = torch.empty(n, dtype=a.dtype, device=a.device)
    block = _block_rows(a)
    rows = min(block, n)
    b = b.to(a.dtype)
    buf_a, buf_b = a.new_empty(rows, a.shape[1]), b.new_empty(rows, b.shape[1])
    for start in range(0, n, block):
        stop = min(start + block, n)
        ga, gb = buf_a[: stop - start], buf_b[: stop - start]
        torch.index_select(a, 0, a_index[start:stop], out=ga)
        torch.index_select(b, 0, b_index[start:stop], out=gb)
        torch.sum(ga.mul_(gb), 1, out=out[start:stop])
    return out


class GatherPre(torch.autograd.Function):
    """``pre[token, latent]`` with a gradient into ``W_enc[:, latent]`` and ``b_enc[latent]`` only.

    ``values`` are the pre-activations at the selected entries, computed earlier without autograd
    as ``x @ W_enc + b_enc``; ``x`` [B, D], ``W_enc`` [D, L], ``b_enc`` [L] or [1, L]; the entries
    are sorted by token (as ``nonzero`` returns them).
    """

    @staticmethod
    def forward(ctx, values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, token: Tensor, latent: Tensor,
                memory: GradientMemory | None = None):
        ctx.save_for_backward(x, W_enc, token, latent)
        ctx.b_shape = b_enc.shape
        ctx.memory = memory
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, token, latent = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        L = W_enc.shape[1]
        if ctx.needs_input_grad[2]:
            # per latent l: Σ_n g_n · x[token_n]; compiled: written straight in W_enc's [D, L] layout,
            # else built as [L, D] rows and handed back transposed
            if native.usable(x, W_enc):
                out = ctx.memory.take("W_enc", tuple(W_enc.shape), W_enc) if ctx.memory is not None else None
                grad_W = native.latent_sums(x.to(W_enc.dtype), token, latent, grad.to(W_enc.dtype), L, out)
            else:
                grad_W = bag_sum(token, x.to(W_enc.dtype), latent, L, grad, bags_sorted=False).t()
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(L, dtype=grad.dtype, device=grad.device).index_add_(0, latent, grad)
            grad_b = grad_b.view(ctx.b_shape).to(W_enc.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = bag_sum(latent, W_enc.t().to(x.dtype), token, x.shape[0], grad)
        return None, grad_x, grad_W, grad_b, None, None, None


class SparseDecode(torch.autograd.Function):
    """``out[b] = Σ_{n: token_n = b} value_n · W[latent_n]`` for ``b < batch``; W [L, D]; the
    entries sorted by token."""

    @staticmethod
    def forward(ctx, value: Tensor, token: Tensor, latent: Tensor, W: Tensor, batch: int,
                memory: GradientMemory | None = None):
        ctx.save_for_backward(value, token, latent, W)
        ctx.memory = memory
        if native.usable(W) and W.dtype in (torch.float32, torch.float64):
            return native.decode_forward(token, latent, value, W, batch)
        return bag_sum(latent, W, token, batch, value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        value, token, latent, W = ctx.saved_tensors
        grad_value = grad_W = None
        need_value, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        grad = grad.contiguous()
        if native.usable(grad, W) and (need_value or need_W):
            # one pass, latent by latent: each W row read once for all its entries
            if need_W:
                grad_W = (ctx.memory.take("W_dec", tuple(W.shape), W) if ctx.memory is not None
                          else torch.empty_like(W, memory_format=torch.contiguous_format))
            grad_value = native.decode_backward(grad, token, latent, value, W, need_value, grad_W)
            grad_value = grad_value.to(value.dtype) if need_value else None
            return grad_value, None, None, grad_W, None, None
        if need_value:
            grad_value = rowwise_dot(grad, token, W, latent).to(value.dtype)
        if need_W:
            grad_W = bag_sum(token, grad.to(W.dtype), latent, W.shape[0], value, bags_sorted=False)
        return grad_value, None, None, grad_W, None, None


class EncoderProduct(torch.autograd.Function):
    """``x @ W_enc + b_enc`` already computed without autograd (``pre`` [B, L]), given the product's
    gradient: the dense math on the sparse path's kept product, where a step leaves that path (a
    JumpReLU code too dense for it), instead of computing the product a second time."""

    @staticmethod
    def forward(ctx, pre: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor):
        ctx.save_for_backward(x, W_enc)
        ctx.b_shape = b_enc.shape
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[2]:  # in the product's dtype (fp32 for upcast bf16 weights, precision.py)
            grad_W = (x.t().to(grad.dtype) @ grad).to(W_enc.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = grad.sum(0).view(ctx.b_shape).to(W_enc.dtype)
        if ctx.needs_input_grad[1]:
            grad_x = (grad @ W_enc.t().to(grad.dtype)).to(x.dtype)
        return None, grad_x, grad_W, grad_b


def encoder_product(pre: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor) -> Tensor:
    return EncoderProduct.apply(pre, x, W_enc, b_enc)


def gather_pre(values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, token: Tensor, latent: Tensor,
               memory: GradientMemory | None = None) -> Tensor:
    return GatherPre.apply(values, x, W_enc, b_enc, token, latent, memory)


def sparse_decode(value: Tensor, token: Tensor, latent: Tensor, W: Tensor, batch: int,
                  memory: GradientMemory | None = None) -> Tensor:
    return SparseDecode.apply(value, token, latent, W, batch, memory)
