"""The pair rules of :mod:`.damping` and :mod:`.bfgs` for many layers at once, without host syncs.

K-BFGS updates one small factor per layer per curvature step, and each update takes a handful of
decisions (is the pair finite? does Powell damping fire? LM damping? does the pair pass the curvature
test?). Taken one layer at a time, every decision is a host read: on a GPU each read drains the queue,
and the many tiny kernels are launched one by one (a 12-layer GPT-2: about 250 reads and 6,000
operations per curvature step in the pair and input-factor updates). Here the vectors of all layers of
one width are stacked as rows of a ``(L, d)`` matrix, every scalar is a length-``L`` tensor and every
decision a boolean mask, so a group costs a few dozen kernels and no host read; the caller reads all
the masks once.

Each function is the row-wise twin of a scalar function, with the same formulas (scalars in float64,
vectors in their own dtype) and the same outcome; ``tests/linalg/test_batched.py`` compares them.
Rows that a decision leaves alone are returned bit for bit (``torch.where``, never a blend with 0 or 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["RowPairs", "bfgs_rank2_rows", "curvature_ok_rows", "double_damping_rows", "row_dots64"]


def row_dots64(a: Tensor, b: Tensor) -> Tensor:
    """``[aᵢᵀbᵢ]`` of two ``(L, d)`` matrices, accumulated in float64: the row-wise :func:`.bfgs.dot64`."""
    return (a.double() * b.double()).sum(-1)


def _mix(mask: Tensor, theta: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Rows ``θ u + (1−θ) v`` where ``mask``, ``u`` elsewhere; ``θ`` is rounded to ``u``'s dtype as a Python
    float would be, so that a fired row equals the scalar function's result."""
    t = theta.to(u.dtype).unsqueeze(-1)
    one_minus = (1.0 - theta).to(u.dtype).unsqueeze(-1)
    return torch.where(mask.unsqueeze(-1), t * u + one_minus * v.to(u.dtype), u)


class RowPairs(NamedTuple):
    """Damped pairs of a group of layers (rows) and, per row, which damping steps fired."""

    s: Tensor
    y: Tensor
    powell: Tensor
    lm: Tensor


def double_damping_rows(
    s: Tensor,
    y: Tensor,
    Hy: Tensor,
    active: Tensor,
    mu1: float = 0.2,
    mu2: float = 0.5,
    powell: bool = True,
    lm: str = "interpolate",
) -> RowPairs:
    """:func:`.damping.double_damping` for every row where ``active``; other rows pass through untouched
    and report no damping, and so does a row with a NaN product (the optimizer marks non-finite pairs
    inactive first). Argument checks are the caller's (the optimizer validated them)."""
    fired_p = torch.zeros_like(active)
    if powell:
        sy, yHy = row_dots64(s, y), row_dots64(y, Hy)
        fired_p = active & (sy < mu1 * yHy)
        s = _mix(fired_p, (1.0 - mu1) * yHy / (yHy - sy), s, Hy)
    fired_l = torch.zeros_like(active)
    if lm == "interpolate":
        sy, ss = row_dots64(s, y), row_dots64(s, s)
        fired_l = active & (sy < mu2 * ss)
        y = _mix(fired_l, (1.0 - mu2) * ss / (ss - sy), y, s)
    elif lm == "additive":
        fired_l = active.clone()
        y = torch.where(active.unsqueeze(-1), y + mu2 * s, y)
    elif lm != "none":
        raise ValueError(f"Invalid lm: {lm!r} (must be 'interpolate', 'additive' or 'none')")
    return RowPairs(s, y, fired_p, fired_l)


def curvature_ok_rows(s: Tensor, y: Tensor, eps: float, grad_norm: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`.bfgs.check_curvature` per row: a boolean mask of the rows whose pair is finite with
    ``sᵀy > 0`` and ``sᵀy > eps · sᵀs · grad_norm``, and ``sᵀy`` (float64)."""
    finite = torch.isfinite(s).all(-1) & torch.isfinite(y).all(-1)
    sy, ss = row_dots64(s, y), row_dots64(s, s)
    ok = finite & (sy > 0.0)
    if eps > 0.0:
        ok &= sy > eps * ss * grad_norm.to(torch.float64)
    return ok, sy


def bfgs_rank2_rows(s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Factors of the inverse-BFGS updates of a group: ``H⁺ᵢ = torch.addmm(Hᵢ, U[i], V[i])`` is
    :func:`.bfgs.bfgs_inverse_update` of ``(Hᵢ, sᵢ, yᵢ)`` with ``Hy[i] = Hᵢ yᵢ`` and ``sy = [sᵢᵀyᵢ]``.

    ``U = [s, w]`` (``(L, d, 2)``) and ``V = [w, s]`` (``(L, 2, d)``) with
    ``w = (ρ²yᵀHy + ρ)/2 · s − ρ Hy``, ``ρ = 1/sᵀy``; ``dtype`` is the factors' dtype. Rows whose pair
    failed the curvature test give meaningless factors: the caller must not apply them.
    """
    rho = 1.0 / sy
    coef_ss = rho * rho * row_dots64(y, Hy) + rho
    s_ = s.to(dtype)
    w = (0.5 * coef_ss).to(dtype).unsqueeze(-1) * s_ - rho.to(dtype).unsqueeze(-1) * Hy.to(dtype)
    return torch.stack([s_, w], -1), torch.stack([w, s_], -2)
