"""Damping of curvature pairs.

Two families:

* K-BFGS "double damping" (Goldfarb, Ren & Bahamou 2020, section 3.2, Algorithm 2): Powell damping
  written for the *inverse* approximation ``H`` (it bounds the smallest eigenvalue of ``H``'s inverse
  from above), then Levenberg-Marquardt damping (bounds ``‖H‖``). ASDL's K-BFGS uses an additive LM
  step instead; both are offered.
* mL-BFGS damping (Niu et al. 2023, eq. 7): keep ``μ = sᵀy / sᵀs`` inside ``[σ_L, σ_H]`` by mixing
  ``y`` with ``s``, never keeping more than ``τ₀`` of ``y``.

Each function returns the damped vector(s) and whether damping fired; scalars are float64.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .bfgs import dots64

__all__ = [
    "DampedPair",
    "double_damping",
    "lm_damping",
    "mlbfgs_damping",
    "powell_damping_inverse",
]


class DampedPair(NamedTuple):
    """A curvature pair after damping, with flags saying which damping steps fired."""

    s: Tensor
    y: Tensor
    powell: bool
    lm: bool


def powell_damping_inverse(s: Tensor, y: Tensor, Hy: Tensor, mu1: float = 0.2) -> tuple[Tensor, bool]:
    r"""Powell damping on ``H`` (K-BFGS, Algorithm 2, first step).

    If ``sᵀy < μ₁ yᵀHy``, replace ``s`` by ``θ s + (1-θ) H y`` with
    ``θ = (1-μ₁) yᵀHy / (yᵀHy - sᵀy)``, which gives exactly ``sᵀy = μ₁ yᵀHy``. Roles of ``s`` and ``y``
    are swapped relative to classic Powell damping of ``B`` because ``H`` approximates the inverse.
    """
    if not 0.0 < mu1 < 1.0:
        raise ValueError(f"Invalid mu1: {mu1} (must be in (0, 1))")
    sy, yHy = dots64((s, y), (y, Hy))
    if sy >= mu1 * yHy:
        return s, False
    theta = (1.0 - mu1) * yHy / (yHy - sy)
    return theta * s + (1.0 - theta) * Hy.to(s.dtype), True


def lm_damping(s: Tensor, y: Tensor, mu2: float, additive: bool = False) -> tuple[Tensor, bool]:
    r"""Levenberg-Marquardt damping of ``y`` (K-BFGS, Algorithm 2, second step).

    Interpolating form (official code): if ``sᵀy < μ₂ sᵀs``, ``y ← θ y + (1-θ) s`` with
    ``θ = (1-μ₂) sᵀs / (sᵀs - sᵀy)``, which gives ``sᵀy = μ₂ sᵀs``; this needs ``0 < μ₂ < 1``.
    Additive form (ASDL): ``y ← y + μ₂ s`` always, i.e. the pair of ``B + μ₂ I``.
    Either way ``sᵀy ≥ μ₂ sᵀs`` afterwards (for the additive form, when ``sᵀy ≥ 0`` before), which
    bounds the largest eigenvalue that the BFGS update can give ``H`` along ``s``.
    """
    if mu2 <= 0.0:
        raise ValueError(f"Invalid mu2: {mu2} (must be > 0)")
    if additive:
        return y + mu2 * s, True
    if mu2 >= 1.0:
        raise ValueError(f"Invalid mu2: {mu2} (the interpolating LM damping needs 0 < mu2 < 1)")
    sy, ss = dots64((s, y), (s, s))
    if sy >= mu2 * ss:
        return y, False
    theta = (1.0 - mu2) * ss / (ss - sy)
    return theta * y + (1.0 - theta) * s, True


def double_damping(
    s: Tensor,
    y: Tensor,
    Hy: Tensor,
    mu1: float = 0.2,
    mu2: float = 0.5,
    powell: bool = True,
    lm: str = "interpolate",
) -> DampedPair:
    """K-BFGS double damping: Powell on ``H`` (optional), then LM (``lm`` in ``interpolate|additive|none``).

    ``Hy`` is ``H @ y`` for the current inverse approximation (for L-BFGS, the two-loop of ``y``).
    """
    fired_p = fired_l = False
    if powell:
        s, fired_p = powell_damping_inverse(s, y, Hy, mu1)
    if lm == "interpolate":
        y, fired_l = lm_damping(s, y, mu2, additive=False)
    elif lm == "additive":
        y, fired_l = lm_damping(s, y, mu2, additive=True)
    elif lm != "none":
        raise ValueError(f"Invalid lm: {lm!r} (must be 'interpolate', 'additive' or 'none')")
    return DampedPair(s, y, fired_p, fired_l)


def mlbfgs_damping(
    s: Tensor, y: Tensor, sigma_low: float = 0.01, sigma_high: float = 1.5, tau0: float = 0.99
) -> tuple[Tensor, bool]:
    r"""mL-BFGS damping (Niu et al. 2023, eq. 7): ``ŷ = τ y + (1-τ) s``, with ``τ`` from
    :func:`mlbfgs_mix` of ``sᵀs`` and ``sᵀy`` (float64). Returns ``(ŷ, fired)`` where ``fired`` says whether a
    bound was active."""
    ss, sy = dots64((s, s), (s, y))
    tau, fired = mlbfgs_mix(ss, sy, sigma_low, sigma_high, tau0)
    if tau == 1.0:
        return y, fired
    return tau * y + (1.0 - tau) * s.to(y.dtype), fired


def mlbfgs_mix(
    ss: float, sy: float, sigma_low: float = 0.01, sigma_high: float = 1.5, tau0: float = 0.99
) -> tuple[float, bool]:
    r"""The weight ``τ`` of mL-BFGS damping ``ŷ = τ y + (1-τ) s`` from the pair's ``sᵀs`` and ``sᵀy`` alone (so a
    pair split over ranks is damped from its all-reduced products), and whether a bound fired.

    With ``μ = sᵀy / sᵀs``:
    ``τ = min((1-σ_L)/(1-μ), τ₀)`` if ``μ ≤ σ_L``; ``τ = min((σ_H-1)/(μ-1), τ₀)`` if ``μ ≥ σ_H``;
    ``τ = τ₀`` otherwise. Afterwards ``σ_L ≤ sᵀŷ / sᵀs ≤ σ_H``. ``τ₀ = 1`` leaves in-range pairs
    untouched; the official code's ``damping=0.01`` is ``τ₀ = 0.99`` (1 % of ``s`` always mixed in).
    ``sᵀs = 0`` gives ``τ = 1`` (nothing to mix).
    """
    if not 0.0 <= sigma_low < 1.0 < sigma_high:
        raise ValueError(
            f"Invalid damping bounds: sigma_low={sigma_low}, sigma_high={sigma_high} "
            "(need 0 <= sigma_low < 1 < sigma_high)"
        )
    if not 0.0 < tau0 <= 1.0:
        raise ValueError(f"Invalid tau0: {tau0} (must be in (0, 1])")
    if ss == 0.0:
        return 1.0, False
    mu = sy / ss
    if mu <= sigma_low:
        return min((1.0 - sigma_low) / (1.0 - mu), tau0), True
    if mu >= sigma_high:
        return min((sigma_high - 1.0) / (mu - 1.0), tau0), True
    return tau0, False
