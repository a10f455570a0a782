"""Dense products of bf16/fp16 weights on CPUs that have no bf16/fp16 matrix units: computed in fp32.

Why: a crosscoder trained in bf16 (``train.precision = "bf16"``: DeepSpeed casts the parameters)
still does one dense product per step, ``x @ W_enc`` over all latents, and on a CPU without
AVX512-BF16/AMX torch's bf16 GEMM is a fallback. Measured with torch 2.13.0 on this project's AVX2
machine, ``[2048, 512] @ [512, 4096]``: fp32 92 ms; bf16 15.3 s with ``W`` row-major ``[D, L]``
(our layout), 468 ms with ``W`` transposed; fp16 the same as bf16. Converting the operands to fp32
and multiplying there costs the fp32 time plus the conversion (~6%), 15–170× less.

How: :func:`upcasts` says whether a tensor's products take this path (CPU, bf16/fp16, and oneDNN
reports no native support); :func:`matmul` and :func:`addmm` are autograd-safe products that
return the weights' dtype; :func:`addmm_into` is the no-grad encoder product of training, one
block of latents at a time, so the fp32 copy of the weights alive at once is one block
(``D · UPCAST_BLOCK`` floats), not the dictionary.

Testing as another CPU would: ``CROSSCODER_BF16_PRODUCTS`` = ``upcast`` or ``native`` forces one
path whatever this CPU has (``auto``, the default, asks oneDNN). It is a test switch: a suite run
on a CPU with bf16 units must also pass where the products are upcast, and the other way round
(tests/test_distributed.py runs the bf16 trainer under both; README, "The suite on other CPUs").

What it costs: where the path is taken, the training pre-activations ``[B, L]`` are fp32 (twice
bf16's bytes) and the selection runs on them; :func:`matmul` (the dense path: L1 crosscoders, the
aligned variant, decoding) holds a whole fp32 copy of its weight while it runs, twice the bf16
weight's bytes. The sparse entries and every gradient stay in the weights' dtype. GPUs and CPUs
with native bf16 are untouched.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

UPCAST_BLOCK = 8192  # latents per block of the no-grad encoder product


@functools.cache
def _native_support(dtype: torch.dtype) -> bool:
    """Whether oneDNN has fast kernels for ``dtype`` on this CPU (private torch ops: absent = no)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}[dtype]
    try:
        return bool(getattr(torch.ops.mkldnn, probe)())
    except (AttributeError, RuntimeError):
        return False


FORCE_VARIABLE = "CROSSCODER_BF16_PRODUCTS"  # auto | upcast | native (test switch, see above)


def native_products(dtype: torch.dtype) -> bool:
    """Whether reduced-precision products run in ``dtype`` itself on this CPU (or as forced)."""
    forced = os.environ.get(FORCE_VARIABLE, "auto")
    if forced not in ("auto", "upcast", "native"):
        raise ValueError(f"{FORCE_VARIABLE} must be auto, upcast or native, got {forced!r}")
    return _native_support(dtype) if forced == "auto" else forced == "native"


def upcasts(weight: Tensor) -> bool:
    """Products with ``weight`` are computed in fp32 (reduced precision on a CPU without its units)."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)
            and not native_products(weight.dtype))


def product_dtype(weight: Tensor) -> torch.dtype:
    """The dtype :func:`addmm_into` writes the training pre-activations in: fp32 where :func:`upcasts`
    and on CUDA (bf16/fp16 operands, fp32 accumulation and output: the BatchTopK selection compares
    fp32 scores), else the weights' own."""
    reduced = weight.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if upcasts(weight) or (weight.device.type == "cuda" and reduced) else weight.dtype


def matmul(a: Tensor, weight: Tensor) -> Tensor:
    """``a @ weight`` in ``weight``'s dtype, computed in fp32 where :func:`upcasts`; autograd-safe
    (the fp32 gradients are cast back by the conversions' backward)."""
    if not upcasts(weight):
        return a @ weight
    return (a.float() @ weight.float()).to(weight.dtype)


def addmm(bias: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """``bias + x @ weight`` in ``weight``'s dtype, autograd-safe: one fused ``addmm`` where the
    weights' own dtype is fast, else :func:`matmul` in fp32 and the bias added after."""
    if not upcasts(weight):
        return torch.addmm(bias, x, weight)
    return matmul(x, weight) + bias


def addmm_into(bias: Tensor, x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``out = bias + x @ weight`` without autograd; ``out`` is [B, L] of :func:`product_dtype`.

    Where :func:`upcasts`, one block of ``UPCAST_BLOCK`` latents at a time, each block's weights
    converted to fp32 just before its product.
    """
    if out.dtype == weight.dtype:
        return torch.addmm(bias, x, weight, out=out)
    if not upcasts(weight):  # CUDA: reduced-precision operands, fp32 output in one GEMM
        return torch.addmm(bias, x, weight, out_dtype=out.dtype, out=out)
    x32 = x.float()
    for start in range(0, weight.shape[1], UPCAST_BLOCK):
        stop = min(start + UPCAST_BLOCK, weight.shape[1])
        torch.addmm(bias[start:stop].float(), x32, weight[:, start:stop].float(), out=out[:, start:stop])
    return out
