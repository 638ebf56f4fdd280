"""Kronecker-factored preconditioning in the canonical ``(d_out, d_in)`` layout.

With row-major ``vec``, ``(H_g ⊗ H_a) vec(X) = vec(H_g X H_aᵀ)``; both factors are symmetric, so the
K-BFGS direction of a layer is ``H_g X H_a`` (Goldfarb, Ren & Bahamou 2020, eq. 3). A 3-D factor is
block-diagonal (its ``(n, b, b)`` diagonal blocks, :mod:`.blocks`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .blocks import block_left, block_right
from .cast import cast

__all__ = ["damped_cholesky_inverse", "kron_precondition"]


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


def damped_cholesky_inverse(A: Tensor, damping: float, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """``(A + damping·I)⁻¹`` by Cholesky, in ``compute_dtype`` internally (float64 unless the caller knows the
    damped matrix is well conditioned); symmetric by construction. Leading dimensions are a batch (the blocks of a
    block-diagonal factor, several layers' factors), each matrix inverted alike.

    Raises ``torch.linalg.LinAlgError`` if the damped matrix is not positive definite (a caller
    holding a non-finite factor must not get here).
    """
    n = A.shape[-1]
    M = A.to(compute_dtype) + damping * torch.eye(n, dtype=compute_dtype, device=A.device)
    L = torch.linalg.cholesky(M)
    inv = torch.cholesky_inverse(L)
    return (0.5 * (inv + inv.mT)).to(A.dtype)
