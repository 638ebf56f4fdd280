"""Kronecker-factored preconditioning in the canonical ``(d_out, d_in)`` layout.

With row-major ``vec``, ``(H_g ⊗ H_a) vec(X) = vec(H_g X H_aᵀ)``; both factors are symmetric, so the
K-BFGS direction of a layer is ``H_g X H_a`` (Goldfarb, Ren & Bahamou 2020, eq. 3). A 3-D factor is
block-diagonal (its ``(n, b, b)`` diagonal blocks, :mod:`.blocks`).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .blocks import block_left, block_right
from .cast import cast

__all__ = ["FLOAT32_INVERSE_MAX_CONDITION", "damped_cholesky_inverse", "kron_precondition"]


def kron_precondition(
    H_g: Tensor | None, X: Tensor, H_a: Tensor | None, compute_dtype: torch.dtype | None = None
) -> Tensor:
    """``H_g @ X @ H_a`` where a 1-D ``H_a`` is a diagonal (Embedding), a 3-D factor block-diagonal and ``None``
    the identity.

    ``compute_dtype`` (default: ``X``'s) is the dtype the two matrix products run in; the result has
    ``X``'s dtype.
    """
    dtype = X.dtype if compute_dtype is None else compute_dtype
    out = cast(X, dtype)
    if H_a is not None:
        a = cast(H_a, dtype)
        out = out * a if a.dim() == 1 else block_right(out, a) if a.dim() == 3 else out @ a
    if H_g is not None:
        g = cast(H_g, dtype)
        out = block_left(g, out) if g.dim() == 3 else g @ out
    return cast(out, X.dtype)


#: The largest condition number of a damped factor that :func:`damped_cholesky_inverse` inverts in float32 when
#: left to choose: the inverse's relative error is then of the order of ``κ · 2⁻²⁴ ≤ 6e-4``. On all-MiniLM-L6-v2's input
#: factors after one batch (``√λ = 0.55``): the bound ``1 + tr(A)/√λ`` was 6-280, the true ``κ`` 5-110, the float32
#: inverse within 5e-7 of the float64 one, and five times faster (1537-wide: 49 against 240 ms on 2 CPU threads).
FLOAT32_INVERSE_MAX_CONDITION = 1e4


def damped_cholesky_inverse(A: Tensor, damping: float, compute_dtype: torch.dtype | None = None) -> Tensor:
    """``(A + damping·I)⁻¹`` by Cholesky for a positive semi-definite ``A``, symmetric by construction. Leading
    dimensions are a batch (the blocks of a block-diagonal factor, several layers' factors), each matrix inverted
    alike.

    ``compute_dtype`` is the dtype of the factorisation; None (the default) takes float32 for a float32 (or
    narrower) ``A`` whose damped matrices' condition numbers are provably at most
    :data:`FLOAT32_INVERSE_MAX_CONDITION` (for a PSD ``A``, ``κ ≤ 1 + tr(A) / damping``; one host read of the
    largest trace decides), float64 otherwise. The result has ``A``'s dtype.

    A PSD ``A`` can come out slightly indefinite from rounding (a Gram of half-precision products: on an H200, a
    GPT-2 small K-FAC output factor failed Cholesky in float32 at its 2300th leading minor). A matrix whose
    factorisation fails is inverted instead through the eigendecomposition of its positive semi-definite part,
    ``V diag(1 / (max(w, 0) + damping)) Vᵀ`` in float64, with a warning; the others keep their Cholesky inverse.
    Checking costs one host read. A caller holding a non-finite factor must not get here. On a CPU a width that
    makes LAPACK slow (a multiple of 128, see ``CPU_PAD``) is factorised inside a slightly larger matrix.
    """
    if compute_dtype is None:
        trace = float(A.diagonal(dim1=-2, dim2=-1).sum(-1).max()) if A.numel() else 0.0
        well_conditioned = 1.0 + max(trace, 0.0) / damping <= FLOAT32_INVERSE_MAX_CONDITION
        compute_dtype = torch.float32 if well_conditioned and A.dtype != torch.float64 else torch.float64
    # Three n x n temporaries (the damped copy, L, the inverse; on CUDA L⁻¹ too), not six: the first step inverts
    # every factor at once, and on all-MiniLM-L6-v2 its fresh pages fell from 89k to 42k (the same bits as
    # A + damping·I). A padded matrix takes a fourth (the contiguous result).
    n = A.shape[-1]
    size = lapack_size(n, A.device)
    if size == n:
        M = A.to(compute_dtype, copy=True)
    else:  # [[A, 0], [0, 0]] + damping·I: its inverse's leading n x n block is (A + damping·I)⁻¹
        M = A.new_zeros((*A.shape[:-2], size, size), dtype=compute_dtype)
        M[..., :n, :n] = A
    M.diagonal(dim1=-2, dim2=-1).add_(damping)
    L, info = torch.linalg.cholesky_ex(M)
    inv = _inverse_from_cholesky(L)[..., :n, :n]
    target = M if size == n else inv.new_empty(inv.shape)  # contiguous (an elementwise op follows its inputs' strides)
    out = torch.add(inv, inv.mT, out=target).mul_(0.5)  # symmetric by construction
    failed = info.reshape(-1) != 0
    if bool(failed.any()):  # the one host read
        out = _invert_psd_parts(A, damping, out, failed)
    return out.to(A.dtype)


#: On a CPU, LAPACK's Cholesky and inverse (``potrf``, ``potri``) run up to 4x slower on an ``n x n`` matrix whose
#: ``n`` is a multiple of 128 (a leading dimension of a multiple of 512 bytes): the columns alias in the caches. Such a
#: matrix of at least ``CPU_PAD_MIN`` rows is inverted inside one ``CPU_PAD`` rows and columns larger (the damped
#: identity there). Measured on 2 threads of an Intel Xeon (AVX512), float32, Cholesky + inverse: 1024 wide 21.3 ms
#: against 9.3 padded, 2048 102 against 64, 3072 290 against 194, 768 5.5 against 4.8; float64 1024 25.3 against 16.4.
CPU_PAD, CPU_PAD_MIN = 16, 512


def lapack_size(n: int, device: torch.device) -> int:
    """The size :func:`damped_cholesky_inverse` factorises an ``n x n`` matrix on ``device`` at (see ``CPU_PAD``)."""
    if device.type == "cpu" and n >= CPU_PAD_MIN and n % 128 == 0:
        return n + CPU_PAD
    return n


#: on CUDA, invert through ``L⁻¹`` and one batched product instead of ``torch.cholesky_inverse`` (switchable for
#: benchmarks): see :func:`_inverse_from_cholesky`
CUDA_TRIANGULAR_INVERSE = True


def _inverse_from_cholesky(L: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹`` from the lower Cholesky factor ``L`` (batched over leading dimensions). On CUDA ``L⁻¹`` by a
    triangular solve, then ``L⁻ᵀ L⁻¹`` in one batched matrix product: ``torch.cholesky_inverse``'s batched kernels
    took 118 ms of GPU time for GPT-2 small's K-FAC output factors on an H200 (12 each of 768, 768, 2304 and
    3072 wide), most of a curvature step. Elsewhere ``torch.cholesky_inverse`` (LAPACK's ``potri``)."""
    if L.is_cuda and CUDA_TRIANGULAR_INVERSE:
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
        L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
        return L_inv.mT @ L_inv
    return torch.cholesky_inverse(L)


def _invert_psd_parts(A: Tensor, damping: float, out: Tensor, failed: Tensor) -> Tensor:
    """``out`` with the matrices of ``A`` flagged in ``failed`` (one flag per matrix) replaced by the damped
    inverse of their positive semi-definite part, computed in float64 by ``eigh``."""
    warnings.warn(
        f"damped_cholesky_inverse: {int(failed.sum())} of {failed.numel()} damped factors of shape "
        f"{tuple(A.shape[-2:])} were not positive definite in {out.dtype} (rounding made the factor indefinite); "
        "inverted through the eigendecomposition of their positive semi-definite part",
        RuntimeWarning,
        stacklevel=3,
    )
    flat_A, flat_out = A.reshape(-1, *A.shape[-2:]), out.reshape(-1, *out.shape[-2:])
    idx = failed.nonzero().flatten()
    B = flat_A[idx].to(torch.float64)
    w, V = torch.linalg.eigh(0.5 * (B + B.mT))
    inv = (V / (w.clamp_min(0.0) + damping).unsqueeze(-2)) @ V.mT
    flat_out[idx] = (0.5 * (inv + inv.mT)).to(out.dtype)
    return flat_out.reshape(out.shape)
