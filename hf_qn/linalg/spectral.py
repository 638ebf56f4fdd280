"""Cheap spectral-norm estimates for logging the size of symmetric positive semi-definite factors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sym_psd_norm_estimate", "sym_psd_norm_estimates"]


def sym_psd_norm_estimate(M: Tensor, steps: int = 30) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by ``steps`` Lanczos steps (float64 for a float64 matrix,
    float32 for the others).

    The top Ritz value: a lower bound, exact once ``steps`` reaches the dimension, and far closer than
    power iteration for dense spectra such as BFGS factors. It costs ``steps`` matrix-vector products
    (O(steps·d²), with full re-orthogonalisation O(steps²·d)) where an exact 2-norm needs an O(d³)
    decomposition. The start vector is deterministic and has no zero entry, so the result is reproducible.
    """
    return sym_psd_norm_estimates([M], steps)[0]


def sym_psd_norm_estimates(mats: Sequence[Tensor], steps: int = 30) -> list[float]:
    """:func:`sym_psd_norm_estimate` of each matrix (NaN for one with a non-finite entry). The matrices of one
    size and device run their Lanczos steps together, as a batch, and every result is read with one host sync:
    logging the factors of a model costs a few dozen batched products instead of two syncs per step per factor."""
    for M in mats:
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"Invalid M: expected a square matrix, got shape {tuple(M.shape)}")
    if not mats:
        return []
    groups: dict[tuple[int, torch.device], list[int]] = {}
    for i, M in enumerate(mats):
        groups.setdefault((M.shape[0], M.device), []).append(i)
    order = [i for idx in groups.values() for i in idx]
    tops = [_lanczos_top(torch.stack([mats[i].detach() for i in idx]).to(_lanczos_dtype(mats[idx[0]])), steps)
            for idx in groups.values()]
    out = torch.empty(len(mats), dtype=torch.float64)
    out[order] = torch.cat([top.cpu() for top in tops])  # the one host sync
    return out.tolist()


def _lanczos_dtype(M: Tensor) -> torch.dtype:
    """float64 for a float64 matrix, float32 for the others: the products read each matrix ``steps`` times, and a
    float32 factor holds no more than float32 precision (the Ritz value is then good to about 1e-6)."""
    return torch.float64 if M.dtype == torch.float64 else torch.float32


def _closing_tolerance(dtype: torch.dtype) -> float:
    """``β`` below this times the first Ritz value counts as rounding: the Krylov space has closed."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def _lanczos_top(A: Tensor, steps: int) -> Tensor:
    """The top Ritz value of each matrix of the batch ``A`` ``(b, n, n)`` after ``min(steps, n)`` Lanczos steps
    with full re-orthogonalisation (twice). A matrix whose Krylov space closes early (``β`` at rounding level)
    continues with zero vectors, which adds only zero Ritz values; NaN where an entry is not finite."""
    b, n, _ = A.shape
    k = min(steps, n)
    V = torch.zeros(b, k, n, dtype=A.dtype, device=A.device)
    v = 1.0 + torch.arange(n, dtype=A.dtype, device=A.device) / max(n, 1)
    V[:, 0] = v / v.norm()
    alphas = torch.zeros(b, k, dtype=A.dtype, device=A.device)
    betas = torch.zeros(b, max(k - 1, 0), dtype=A.dtype, device=A.device)
    for j in range(k):  # row vectors (b, 1, n) times matrices: batched GEMMs, where (b, n, n) x (b, n, 1) is slow
        w = V[:, j : j + 1] @ A  # (A v)ᵀ, A symmetric
        alphas[:, j] = (V[:, j : j + 1] * w).sum((-2, -1))
        if j + 1 == k:
            break
        basis = V[:, : j + 1]
        for _ in range(2):
            w = w - (w @ basis.mT) @ basis
        beta = w.norm(dim=(-2, -1))
        going = beta > _closing_tolerance(A.dtype) * alphas[:, 0].abs().clamp_min(1e-30)
        betas[:, j] = torch.where(going, beta, 0.0)
        V[:, j + 1] = torch.where(going.unsqueeze(-1), w.squeeze(1) / beta.clamp_min(1e-30).unsqueeze(-1), 0.0)
    finite = torch.isfinite(alphas).all(-1) & torch.isfinite(betas).all(-1)
    T = torch.diag_embed(torch.where(finite.unsqueeze(-1), alphas, 0.0).double())
    if k > 1:
        off = torch.where(finite.unsqueeze(-1), betas, 0.0).double()
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    top = torch.linalg.eigvalsh(T)[:, -1]
    return torch.where(finite, top, torch.nan)
