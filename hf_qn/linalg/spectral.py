"""Cheap spectral-norm estimate for logging the size of symmetric positive semi-definite factors."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sym_psd_norm_estimate"]


def sym_psd_norm_estimate(M: Tensor, steps: int = 30) -> float:
    """Largest eigenvalue of a symmetric PSD matrix by ``steps`` Lanczos steps, in float64.

    The top Ritz value: a lower bound, exact once ``steps`` reaches the dimension, and far closer than
    power iteration for dense spectra such as BFGS factors. It costs ``steps`` matrix-vector products
    (O(steps·d²), with full re-orthogonalisation O(steps²·d)) where an exact 2-norm needs an O(d³)
    decomposition. The start vector is deterministic and has no zero entry, so the result is reproducible.
    """
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"Invalid M: expected a square matrix, got shape {tuple(M.shape)}")
    A = M.detach().to(torch.float64)
    n = A.shape[0]
    k = min(steps, n)
    V = torch.zeros(k, n, dtype=torch.float64, device=A.device)
    v = 1.0 + torch.arange(n, dtype=torch.float64, device=A.device) / max(n, 1)
    V[0] = v / v.norm()
    alphas, betas = [], []
    for j in range(k):
        w = A @ V[j]
        alphas.append(float(V[j] @ w))
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)  # full re-orthogonalisation (twice is enough)
        w = w - V[: j + 1].T @ (V[: j + 1] @ w)
        beta = float(w.norm())
        if j + 1 == k or beta <= 1e-12 * max(abs(alphas[0]), 1e-300):
            break
        betas.append(beta)
        V[j + 1] = w / beta
    if not all(torch.isfinite(torch.tensor(alphas))):
        return float("nan")
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T)[-1])
