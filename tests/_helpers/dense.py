"""Dense float64 references: obviously-correct, slow versions of what hf_qn computes."""

from __future__ import annotations

import torch
from torch import Tensor


def direct_bfgs_B(B: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """Direct BFGS update of the Hessian approximation B (Nocedal & Wright eq. 6.19)."""
    Bs = B @ s
    return B - torch.outer(Bs, Bs) / (s @ Bs) + torch.outer(y, y) / (y @ s)


def explicit_lbfgs_matrix(pairs: list[tuple[Tensor, Tensor]], gamma: float, n: int) -> Tensor:
    """H from gamma*I by successive inverse updates H <- V^T H V + rho s s^T (oldest pair first)."""
    H = gamma * torch.eye(n, dtype=torch.float64)
    I = torch.eye(n, dtype=torch.float64)
    for s, y in pairs:
        s, y = s.double(), y.double()
        rho = 1.0 / (s @ y)
        V = I - rho * torch.outer(y, s)
        H = V.T @ H @ V + rho * torch.outer(s, s)
    return H


def random_spd(n: int, cond: float = 10.0, generator: torch.Generator | None = None) -> Tensor:
    """A random symmetric positive-definite float64 matrix with condition number ``cond``."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    ev = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return Q @ torch.diag(ev) @ Q.T


def random_pair(n: int, B: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A pair with positive curvature: y = B s for an SPD B (random if not given)."""
    s = torch.randn(n, dtype=torch.float64)
    if B is None:
        B = random_spd(n)
    return s, B @ s


def svd_polar(X: Tensor, steps: int, coefficients: tuple[float, float, float], eps: float = 1e-7) -> Tensor:
    """``U p(…p(Σ / (‖X‖ + eps))…) Vᵀ`` for ``X = U Σ Vᵀ`` by an SVD in float64: the Newton-Schulz quintic
    ``p(x) = a x + b x³ + c x⁵`` (``coefficients``) applied ``steps`` times to each singular value."""
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    s = S / (S.norm() + eps)
    a, b, c = coefficients
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag(s) @ Vh
