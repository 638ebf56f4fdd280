"""Dense inverse-BFGS updates and their curvature tests.

Notation follows Goldfarb, Ren & Bahamou (NeurIPS 2020), section 3: ``H`` approximates an *inverse*
Hessian, ``(s, y)`` is a curvature pair with ``s`` a change of the variable and ``y`` the change of
the gradient. Scalars that cancel (``sᵀy``, ``yᵀHy``, ``sᵀs``) are formed in float64 whatever the
dtype of the vectors; the matrix itself keeps its own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CurvatureCheck",
    "all_finite",
    "bfgs_inverse_update",
    "check_curvature",
    "curvature_verdict",
    "dot64",
    "dots64",
    "finite_flag",
    "finite_flags",
]


def finite_flag(*tensors: Tensor) -> Tensor:
    """0-dim bool tensor, on the first tensor's device: every entry of every tensor is finite. One reduction
    per tensor instead of an elementwise mask (5-30x cheaper on a large matrix): a NaN or inf anywhere makes
    the sum non-finite; so would finite entries summing past the dtype's range, which are as unusable. No
    host sync, so it can be read together with other scalars."""
    if len(tensors) == 1:
        return torch.isfinite(tensors[0].sum())
    dev = tensors[0].device
    return torch.isfinite(torch.stack([t.sum().to(dev) for t in tensors]).sum())


def finite_flags(tensors: list[Tensor]) -> Tensor:
    """:func:`finite_flag` of each tensor, as one 1-D bool tensor on the first tensor's device: a sum each, then one
    check for all of them."""
    dev = tensors[0].device
    return torch.isfinite(torch.stack([t.sum() if t.device == dev else t.sum().to(dev) for t in tensors]))


def all_finite(*tensors: Tensor) -> bool:
    """:func:`finite_flag`, read on the host (one sync for all the tensors)."""
    return bool(finite_flag(*tensors))


def _dot64_t(a: Tensor, b: Tensor) -> Tensor:
    """``aᵀb`` accumulated in float64, as a 0-dim tensor (no host sync)."""
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


def dot64(a: Tensor, b: Tensor) -> float:
    """``aᵀb`` of two vectors, accumulated in float64 and returned as a Python float."""
    return float(_dot64_t(a, b))


def dots64(*pairs: tuple[Tensor, Tensor]) -> list[float]:
    """``[aᵀb for a, b in pairs]``, each as :func:`dot64` computes it, read back with one host sync instead
    of one per product (on a GPU every read waits for the queue to drain)."""
    return torch.stack([_dot64_t(a, b) for a, b in pairs]).tolist()


@dataclass(frozen=True)
class CurvatureCheck:
    """Outcome of the curvature test of a pair; ``reason`` is ``"ok"`` or why the pair is skipped;
    ``sy = sᵀy`` and ``ss = sᵀs`` (NaN for a non-finite pair)."""

    ok: bool
    reason: str
    sy: float
    ss: float = float("nan")


def check_curvature(s: Tensor, y: Tensor, eps: float = 0.0, grad_norm: float | Tensor = 1.0) -> CurvatureCheck:
    """The skip rules of K-BFGS (official code, ``Kron_BFGS_update_per_layer``).

    A pair is used only if it is finite, ``sᵀy > 0`` and ``sᵀy > eps · sᵀs · grad_norm``. The second test
    is relative: it rejects pairs whose curvature is negligible next to the step length and the size of
    the gradient ``grad_norm`` (the official code passes ``‖mean ∂f/∂h‖``; ``eps`` there is 1e-4).
    ``grad_norm`` may be a 0-dim tensor: it is read together with the products, in one host sync.
    """
    parts = [torch.isfinite(s).all().double(), torch.isfinite(y).all().double(), _dot64_t(s, y), _dot64_t(s, s)]
    if isinstance(grad_norm, Tensor):
        parts.append(grad_norm.detach().double().to(s.device))
    vals = torch.stack(parts).tolist()
    gnorm = vals[4] if isinstance(grad_norm, Tensor) else float(grad_norm)
    return curvature_verdict(bool(vals[0] and vals[1]), vals[2], vals[3], eps, gnorm)


def curvature_verdict(finite: bool, sy: float, ss: float, eps: float = 0.0, grad_norm: float = 1.0) -> CurvatureCheck:
    """:func:`check_curvature`'s rules applied to products already formed (a pair split over ranks is judged
    from its all-reduced ``sᵀy``, ``sᵀs`` and finiteness)."""
    if not finite:
        return CurvatureCheck(False, "nonfinite", float("nan"))
    if not sy > 0.0:
        return CurvatureCheck(False, "nonpositive", sy, ss)
    if eps > 0.0 and sy <= eps * ss * grad_norm:
        return CurvatureCheck(False, "relative", sy, ss)
    return CurvatureCheck(True, "ok", sy, ss)


def bfgs_inverse_update(H: Tensor, s: Tensor, y: Tensor, Hy: Tensor | None = None) -> Tensor | None:
    r"""One inverse-BFGS update, returned as a new matrix (``None`` if the result is not finite).

    .. math::
        H^+ = (I - \rho s y^\top) H (I - \rho y s^\top) + \rho s s^\top
            = H + (\rho^2 y^\top H y + \rho) s s^\top - \rho (s (Hy)^\top + (Hy) s^\top),
        \quad \rho = 1 / s^\top y.

    ``H`` must be symmetric; the caller guarantees ``sᵀy > 0`` (see :func:`check_curvature`), under
    which ``H⁺`` is symmetric positive definite whenever ``H`` is, and satisfies the secant condition
    ``H⁺ y = s``. ``Hy`` may be passed when the caller already has it (damping computes it).

    Computed as one rank-2 product ``H + s wᵀ + w sᵀ`` with ``w = (ρ²yᵀHy + ρ)/2 · s − ρ Hy``: a single
    pass over ``H`` (``addmm``) instead of three outer products and four elementwise passes (measured on
    a 1000 x 1000 float32 factor, 2 CPU threads: 0.2 ms against 4-6 ms with the old finiteness test).
    The result is symmetric up to rounding (measured: 4e-9 relative).

    References: Nocedal & Wright, *Numerical Optimization*, eq. (6.17); K-BFGS official code
    ``get_BFGS_formula``.
    """
    if Hy is None:
        Hy = H @ y
    sy, yHy = dots64((s, y), (y, Hy))
    rho = 1.0 / sy
    coef_ss = rho * rho * yHy + rho
    s_ = s.to(H.dtype)
    w = (0.5 * coef_ss) * s_ - rho * Hy.to(H.dtype)
    H_new = torch.addmm(H, torch.stack([s_, w], 1), torch.stack([w, s_], 0))
    if not all_finite(H_new):
        return None
    return H_new
