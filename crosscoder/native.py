"""Optional compiled CPU kernels (csrc/sparse_cpu.cpp) for the hot passes of a k-sparse step.

Why: on CPU the training step's time beyond the encoder product went to full passes over the
``[B, L]`` pre-activations, each a separate PyTorch op (score, hint comparison, count, boolean
gather, keep mask, ``nonzero``), and to ``[L, D]`` gradients written once and then transposed or
added. Each function here does one of those jobs in one pass:

- :func:`scores_at_least`: the entries whose BatchTopK score ``relu(pre)·w`` reaches a threshold,
  as (flat index, score), in one read of ``pre`` (replaces ~6 passes);
- :func:`row_topk_entries`: per-token TopK (and AuxK's per-token search over the dead latents)
  in one read of ``pre``: each row scored into a cache-resident buffer with its blocks' maxima,
  partially sorted there, and its entries that reach the row's k-th largest taken from that buffer,
  instead of a scored copy, ``topk``, a mask and ``nonzero`` (:func:`row_topk_scores` alone gives
  BatchTopK its first hint);
- :func:`count_above`: how many pre-activations exceed their latent's inference threshold (the
  logged inference L0), in one read and no ``[B, L]`` mask (~5× faster at 2048 × 65,536);
- :func:`latent_sums`: per-latent sums ``Σ c·src[token]`` written, blocked, straight into
  ``[D, L]`` (the encoder's layout), zeros included, with no sort and no transpose, into a kept
  buffer when given one (kernels.GradientMemory);
- :func:`decode_forward`: the sparse decoder latent by latent within pieces of consecutive
  rows (each piece's output stays in cache; each ``W_dec`` row read once per piece, not once per
  entry), fp32/fp64;
- :func:`decode_backward`: the sparse decoder's whole backward latent by latent: each ``W_dec``
  row is read once for all of its entries, giving their ``grad_value`` dot products and the row's
  gradient together; every gradient row written once, zeros included. Entry by entry (a gathered
  dot product, then ``embedding_bag`` over entries sorted by latent) it read a ``W_dec`` row per
  entry, and AuxK's entries concentrate on the dead latents (~64 per row per step at L = 64k):
  measured at L = 64k, D = 1024, 655k entries: 0.20 s against 0.45 s.

The scores are computed with the same float operations as :func:`crosscoder.sparsity.scores`,
so selections agree bit for bit; sums run in another order than PyTorch's, so gradients agree
within float rounding (tests/test_model.py checks both against the PyTorch path).

What it costs: a C++ compiler at first use. The module is built once by
``torch.utils.cpp_extension.load`` into this install's own directory (builds.py: named by a hash
of its source and flags; scripts/install.sh builds it, so tests and workers only load it), with
AVX2 and FMA where the CPU has them (measured on this
machine's EPYC: the kernels 13–22% faster than the x86-64 baseline build, same selections;
the CPU image carries both builds). Without a compiler, or with ``CROSSCODER_NATIVE=0``, the
pure PyTorch path in kernels.py/sparsity.py runs instead (same results, slower; one warning).
CPU tensors only: on GPU the PyTorch path is used.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

from .errors import type_and_message

SOURCE = Path(__file__).parent / "csrc" / "sparse_cpu.cpp"
_module = None
_tried = False


def module():
    """The compiled module, or None (disabled by ``CROSSCODER_NATIVE=0`` or not buildable here)."""
    global _module, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("CROSSCODER_NATIVE", "1") == "0":
        return None
    if shutil.which("ninja") is None:  # pip's ninja sits beside this interpreter, maybe not on PATH
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    try:
        from torch.utils.cpp_extension import load

        from .builds import clear_stale_locks, extensions_dir, source_key

        name, flags = _target()
        cflags = ["-O3", "-fopenmp", *flags]
        name = f"{name}_{source_key(SOURCE.read_bytes(), *cflags)}"  # a changed source or flag is a new build
        build = extensions_dir() / name
        built = build / f"{name}.so"
        if built.is_file():  # imported directly: torch's load() would take the build lock even to load
            spec = importlib.util.spec_from_file_location(name, built)
            assert spec is not None and spec.loader is not None
            _module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(_module)
            return _module
        build.mkdir(exist_ok=True)
        clear_stale_locks(build)
        _module = load(name=name, sources=[str(SOURCE)], extra_cflags=cflags, extra_ldflags=["-fopenmp"],
                       build_directory=str(build), verbose=False)
    except Exception as error:  # no compiler, no ninja, a broken toolchain: the PyTorch path still works
        print(f"crosscoder: compiled CPU kernels unavailable ({type_and_message(error)}); using the "
              "PyTorch path, which is slower", file=sys.stderr)
    return _module


def _target() -> tuple[str, list[str]]:
    """The module's name and instruction-set flags: AVX2 + FMA where this CPU has both (each kernel's
    inner loops are vector sums and compares), else the x86-64 baseline. The flags are part of the
    name, so a build cached on one machine (a container image) is never loaded by a CPU without
    them; that machine builds its own."""
    try:
        cpu = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        cpu = set()
    if os.environ.get("CROSSCODER_NATIVE_ISA", "auto") != "baseline" and {"avx2", "fma"} <= cpu:
        return "crosscoder_sparse_cpu_avx2", ["-mavx2", "-mfma"]
    return "crosscoder_sparse_cpu", []


def usable(*tensors: Tensor) -> bool:
    """Whether the compiled kernels can take these tensors (all on CPU, module built)."""
    return all(t.device.type == "cpu" for t in tensors) and module() is not None


def scores_at_least(pre: Tensor, weights: Tensor, thresholds: Tensor | float) -> tuple[Tensor, Tensor]:
    """(flat index [M] int64, score [M]) of the entries of ``relu(pre) · weights`` that reach their
    row's threshold and are > 0, row-major. pre [R, L], weights [L], thresholds [R] or one number
    for every row."""
    thr = torch.as_tensor(thresholds, dtype=pre.dtype, device=pre.device).expand(pre.shape[0]).contiguous()
    return tuple(module().scores_at_least(pre.contiguous(), weights.to(pre.dtype).contiguous(), thr))


def row_topk_scores(pre: Tensor, weights: Tensor, k: int) -> Tensor:
    """Per row, the k largest of ``relu(pre) · weights``, unordered: [R, k]. NaN counts as -inf."""
    return module().row_topk_scores(pre.contiguous(), weights.to(pre.dtype).contiguous(), int(k))


def row_topk_entries(pre: Tensor, weights: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row, the k largest of ``relu(pre) · weights`` [R, k] (unordered), and the entries that
    reach their row's k-th largest and are > 0 (flat index [M] int64, score [M], row-major): what
    :func:`row_topk_scores`, then :func:`scores_at_least` with each row's k-th largest, return, in
    one read of ``pre``."""
    return tuple(module().row_topk_entries(pre.contiguous(), weights.to(pre.dtype).contiguous(), int(k)))


def count_above(pre: Tensor, thresholds: Tensor) -> int:
    """How many entries of ``pre`` [R, L] exceed ``max(thresholds[l], 0)`` ([L]): BatchTopK's
    inference L0 counted in one read, without the ``[R, L]`` mask."""
    return int(module().count_above(pre.contiguous(), thresholds.to(pre.dtype).contiguous()))


def latent_sums(src: Tensor, token: Tensor, latent: Tensor, coef: Tensor, n_latents: int,
                out: Tensor | None = None) -> Tensor:
    """Per latent ``Σ coef_n · src[token_n]`` over the entries of that latent, as the columns of a
    [D, L] tensor (``W_enc``'s layout), written into ``out`` when given (every element: no zeroing
    needed)."""
    return module().latent_sums(src.contiguous(), token.contiguous(), latent.contiguous(),
                                coef.to(src.dtype).contiguous(), int(n_latents), out)


def decode_forward(row: Tensor, latent: Tensor, value: Tensor, W: Tensor, n_rows: int) -> Tensor:
    """``out[r] = Σ_{n: row_n = r} value_n · W[latent_n]`` → [n_rows, D]; rows ascending; float32
    or float64 ``W``."""
    return module().decode_forward(row.contiguous(), latent.contiguous(), value.to(W.dtype).contiguous(),
                                   W.contiguous(), int(n_rows))


def decode_backward(grad: Tensor, row: Tensor, latent: Tensor, value: Tensor, W: Tensor, need_value: bool,
                    grad_W: Tensor | None) -> Tensor:
    """The backward of ``out[r] = Σ_{n: row_n = r} value_n · W[latent_n]`` given ``grad`` [R, D]:
    returns ``grad_value`` [N] (empty unless ``need_value``) and, when ``grad_W`` [L, D] is given,
    writes every row of it (zeros for latents without entries). Latent by latent: each W row is
    read once."""
    return module().decode_backward(grad.to(W.dtype).contiguous(), row.contiguous(), latent.contiguous(),
                                    value.to(W.dtype).contiguous(), W.contiguous(), bool(need_value), grad_W)
