from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_qn.linalg import (
    bfgs_inverse_update,
    double_damping,
    lm_damping,
    mlbfgs_damping,
    powell_damping_inverse,
)
from tests._helpers.dense import random_spd


def _adversarial(seed: int, n: int, kind: str):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, dtype=torch.float64, generator=g)
    if kind == "negative":
        y = -random_spd(n, generator=g) @ s
    elif kind == "orthogonal":
        y = torch.randn(n, dtype=torch.float64, generator=g)
        y = y - (y @ s) / (s @ s) * s
    elif kind == "tiny":
        y = 1e-8 * random_spd(n, generator=g) @ s
    elif kind == "huge":
        y = 1e6 * random_spd(n, generator=g) @ s
    else:
        y = random_spd(n, generator=g) @ s
    return s, y


@pytest.mark.parametrize("kind", ["negative", "orthogonal", "tiny", "huge", "normal"])
@pytest.mark.parametrize("mu1", [0.05, 0.2, 0.5])
def test_powell_on_H_gives_promised_bound(kind, mu1):
    n = 7
    H = random_spd(n, cond=20.0)
    s, y = _adversarial(3, n, kind)
    Hy = H @ y
    s2, fired = powell_damping_inverse(s, y, Hy, mu1)
    yHy = float(y @ Hy)
    assert float(s2 @ y) >= mu1 * yHy * (1 - 1e-10)
    if float(s @ y) >= mu1 * yHy:
        assert not fired and torch.equal(s2, s)
    else:
        assert fired
        torch.testing.assert_close(float(s2 @ y), mu1 * yHy, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["negative", "orthogonal", "tiny", "huge", "normal"])
@pytest.mark.parametrize("mu2", [0.1, 0.548, 0.9])
def test_lm_interpolating_bound(kind, mu2):
    s, y = _adversarial(5, 6, kind)
    y2, fired = lm_damping(s, y, mu2)
    assert float(s @ y2) >= mu2 * float(s @ s) * (1 - 1e-10)
    assert fired == (float(s @ y) < mu2 * float(s @ s))


def test_lm_additive_is_pair_of_shifted_hessian():
    B = random_spd(5)
    s = torch.randn(5, dtype=torch.float64)
    y2, fired = lm_damping(s, B @ s, 0.3, additive=True)
    assert fired
    torch.testing.assert_close(y2, (B + 0.3 * torch.eye(5, dtype=torch.float64)) @ s)


@pytest.mark.parametrize("bad", [0.0, -1.0, 1.0, 2.0])
def test_lm_rejects_bad_mu2(bad):
    s = torch.ones(2)
    if bad <= 0:
        with pytest.raises(ValueError, match="mu2"):
            lm_damping(s, s, bad, additive=True)
    with pytest.raises(ValueError, match="mu2"):
        lm_damping(s, s, bad)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 100_000), kind=st.sampled_from(["negative", "orthogonal", "tiny", "huge", "normal"]))
def test_double_damping_then_update_keeps_H_positive_definite_and_bounded(seed, kind):
    """After DD, sᵀy >= mu2 sᵀs > 0, so the BFGS update exists and stays SPD (paper, Lemma 1)."""
    n, mu1, mu2 = 6, 0.2, 0.5
    H = random_spd(n, cond=10.0, generator=torch.Generator().manual_seed(seed + 1))
    s, y = _adversarial(seed, n, kind)
    if float(s @ s) == 0:
        return
    d = double_damping(s, y, H @ y, mu1=mu1, mu2=mu2)
    assert float(d.s @ d.y) >= mu2 * float(d.s @ d.s) * (1 - 1e-9)
    H_new = bfgs_inverse_update(H, d.s, d.y)
    assert H_new is not None
    assert torch.linalg.eigvalsh(0.5 * (H_new + H_new.T)).min() > 0


def test_double_damping_rejects_unknown_lm():
    s = torch.ones(3)
    with pytest.raises(ValueError, match="lm"):
        double_damping(s, s, s, lm="multiplicative")


@settings(max_examples=100, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    ratio=st.floats(-50, 50),
    sigma_low=st.floats(0.0, 0.5),
    sigma_high=st.floats(1.01, 10),
    tau0=st.floats(0.05, 1.0),
)
def test_mlbfgs_damping_keeps_ratio_in_bounds(seed, ratio, sigma_low, sigma_high, tau0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(9, dtype=torch.float64, generator=g)
    # y with a prescribed s^T y / s^T s = ratio plus an orthogonal part.
    w = torch.randn(9, dtype=torch.float64, generator=g)
    w = w - (w @ s) / (s @ s) * s
    y = ratio * s + w
    y2, _ = mlbfgs_damping(s, y, sigma_low, sigma_high, tau0)
    mu = float(s @ y2) / float(s @ s)
    assert sigma_low - 1e-9 <= mu <= sigma_high + 1e-9


def test_mlbfgs_damping_identity_when_in_range_and_tau0_one():
    s = torch.tensor([1.0, 0.0])
    y = torch.tensor([0.7, 0.3])
    y2, fired = mlbfgs_damping(s, y, 0.01, 1.5, 1.0)
    assert not fired and torch.equal(y2, y)


@pytest.mark.parametrize(("lo", "hi", "tau0"), [(-0.1, 1.5, 0.9), (1.0, 1.5, 0.9), (0.1, 1.0, 0.9), (0.1, 2, 0.0)])
def test_mlbfgs_damping_validation(lo, hi, tau0):
    with pytest.raises(ValueError):
        mlbfgs_damping(torch.ones(2), torch.ones(2), lo, hi, tau0)
