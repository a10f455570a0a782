"""Sparse encoder gradient and sparse decoder for k-sparse codes, as autograd functions.

After TopK/BatchTopK only ``N ≈ k·B`` of the ``B·L`` latent activations are non-zero. A dense
implementation still pays for all of them three more times after the encoder forward: the decoder
``f @ W_dec``, its backward into ``f`` and into ``W_dec``, and the encoder's backward
``x.T @ grad_pre``, each ``B·L·D`` multiply-adds, plus several ``[B, L]`` buffers kept for
backward. Here a code is the list of its non-zero entries ``(token, latent, value)``:

- :class:`GatherPre` returns pre-activations already computed (without autograd) at the selected
  entries, and in backward sends their gradient to exactly those columns of ``W_enc`` and entries
  of ``b_enc``: ``grad W_enc`` costs ``N·D``, not ``B·L·D``;
- :class:`SparseDecode` computes ``Σ value · W_dec[latent]`` per token with a gather and an
  ``index_add``; its backward touches only the active rows (``N·D`` each way).

What it costs: the gradients of ``W_enc`` and ``W_dec`` are still dense tensors (zeros except the
touched columns/rows), as every optimizer and ZeRO expects, so each step writes ``2·L·D`` zeros;
the sums run in another order than a matmul's, so results equal the dense path within float
rounding, not bit for bit. Pure PyTorch, CPU and GPU alike.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GatherPre(torch.autograd.Function):
    """``pre[token, latent]`` with a gradient into ``W_enc[:, latent]`` and ``b_enc[latent]`` only.

    ``values`` are the pre-activations at the selected entries, computed earlier without autograd
    as ``x @ W_enc + b_enc``; ``x`` [B, D], ``W_enc`` [D, L], ``b_enc`` [L].
    """

    @staticmethod
    def forward(ctx, values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, token: Tensor, latent: Tensor):
        ctx.save_for_backward(x, W_enc, token, latent)
        ctx.b_shape = b_enc.shape
        return values.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, W_enc, token, latent = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[2]:
            # [N, D] rows accumulated into the latents' columns; built as [L, D] (row adds are
            # contiguous) and handed back transposed
            rows = x.index_select(0, token) * grad.unsqueeze(1).to(x.dtype)
            grad_W = torch.zeros(W_enc.shape[1], W_enc.shape[0], dtype=W_enc.dtype, device=W_enc.device)
            grad_W.index_add_(0, latent, rows.to(W_enc.dtype))
            grad_W = grad_W.t()
        if ctx.needs_input_grad[3]:
            grad_b = torch.zeros(ctx.b_shape[-1], dtype=grad.dtype, device=grad.device).index_add_(0, latent, grad)
            grad_b = grad_b.view(ctx.b_shape)
        if ctx.needs_input_grad[1]:
            cols = W_enc.t().index_select(0, latent) * grad.unsqueeze(1).to(W_enc.dtype)
            grad_x = torch.zeros_like(x).index_add_(0, token, cols.to(x.dtype))
        return None, grad_x, grad_W, grad_b, None, None


class SparseDecode(torch.autograd.Function):
    """``out[b] = Σ_{n: token_n = b} value_n · W[latent_n]`` for ``b < batch``; W [L, D]."""

    @staticmethod
    def forward(ctx, value: Tensor, token: Tensor, latent: Tensor, W: Tensor, batch: int):
        ctx.save_for_backward(value, token, latent, W)
        rows = W.index_select(0, latent) * value.unsqueeze(1).to(W.dtype)
        return torch.zeros(batch, W.shape[1], dtype=W.dtype, device=W.device).index_add_(0, token, rows)

    @staticmethod
    def backward(ctx, grad: Tensor):
        value, token, latent, W = ctx.saved_tensors
        grad_rows = grad.index_select(0, token)  # [N, D]
        grad_value = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_value = (grad_rows * W.index_select(0, latent)).sum(1).to(value.dtype)
        if ctx.needs_input_grad[3]:
            grad_W = torch.zeros_like(W).index_add_(0, latent, grad_rows * value.unsqueeze(1).to(grad.dtype))
        return grad_value, None, None, grad_W, None


def gather_pre(values: Tensor, x: Tensor, W_enc: Tensor, b_enc: Tensor, token: Tensor, latent: Tensor) -> Tensor:
    return GatherPre.apply(values, x, W_enc, b_enc, token, latent)


def sparse_decode(value: Tensor, token: Tensor, latent: Tensor, W: Tensor, batch: int) -> Tensor:
    return SparseDecode.apply(value, token, latent, W, batch)
