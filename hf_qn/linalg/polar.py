"""The orthogonal polar factor of a matrix, approximated by a Newton-Schulz iteration (Muon's)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["NEWTON_SCHULZ_QUINTIC", "newton_schulz_polar", "polar_each"]

#: the quintic ``p(x) = a x + b x³ + c x⁵`` of Muon (Jordan et al. 2024), applied to the singular values: it
#: grows small ones fast and leaves every one it has met between about 0.7 and 1.2 instead of converging to 1.
NEWTON_SCHULZ_QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz_polar(
    X: Tensor, steps: int, eps: float = 1e-7, coefficients: tuple[float, float, float] = NEWTON_SCHULZ_QUINTIC,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``U p(…p(Σ / ‖X‖)…) Vᵀ`` for ``X = U Σ Vᵀ`` (``X``: a matrix or a batch of them, ``(..., m, n)``; float32, or
    float64 for a float64 ``X``; the iterations in ``dtype`` if given, e.g. bfloat16 as Muon runs them where the
    hardware multiplies it natively, the norm always in float32 or wider):
    ``steps`` iterations of ``X ← a X + (b X Xᵀ + c (X Xᵀ)²) X`` from ``X / (‖X‖ + eps)`` (Frobenius norm, per
    matrix), on the wide orientation (``X Xᵀ`` the smaller Gram). Singular vectors are kept exactly; each singular
    value moves through the quintic ``coefficients`` (``a, b, c``) ``steps`` times, so the result approaches the
    polar factor ``U Vᵀ`` on the directions whose singular value is not far below the norm. A zero matrix stays
    zero."""
    a, b, c = coefficients
    Y = X.to(torch.promote_types(X.dtype, torch.float32))
    tall = Y.size(-2) > Y.size(-1)
    if tall:
        Y = Y.mT
    out_dtype = Y.dtype
    Y = (Y / (torch.linalg.matrix_norm(Y, keepdim=True) + eps)).to(dtype or out_dtype)
    for _ in range(steps):
        gram = Y @ Y.mT
        Y = a * Y + (b * gram + c * gram @ gram) @ Y
    Y = Y.to(out_dtype)
    return Y.mT if tall else Y


def polar_each(mats: list[Tensor], steps: int, dtypes: list[torch.dtype] | None = None) -> list[Tensor]:
    """:func:`newton_schulz_polar` of each matrix (its iterations in ``dtypes[i]`` if given); the matrices of one
    shape, device and dtype are done as one batch."""
    out: list[Tensor | None] = [None] * len(mats)
    groups: dict[tuple[tuple[int, ...], torch.device, torch.dtype | None], list[int]] = {}
    for i, M in enumerate(mats):
        groups.setdefault((tuple(M.shape), M.device, dtypes[i] if dtypes else None), []).append(i)
    for (_, _, dtype), idx in groups.items():
        batch = newton_schulz_polar(torch.stack([mats[i] for i in idx]), steps, dtype=dtype)
        for i, P in zip(idx, batch.unbind(0)):
            out[i] = P
    return [P for P in out if P is not None]
