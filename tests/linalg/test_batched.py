"""The row-wise pair rules (hf_qn.linalg.batched) against their scalar twins, row by row, and against
the explicit BFGS inverse in float64."""

from __future__ import annotations

import pytest
import torch

from hf_qn.linalg import bfgs_inverse_update, check_curvature, double_damping
from hf_qn.linalg.batched import bfgs_rank2_rows, curvature_ok_rows, double_damping_rows
from tests._helpers.dense import random_spd
from tests.linalg.test_damping import _adversarial

KINDS = ["negative", "orthogonal", "tiny", "huge", "normal"]


def _group(n: int = 6, dtype: torch.dtype = torch.float32):
    """One row per adversarial kind (so that Powell and LM fire on some rows and not on others), plus a
    non-finite row; a different SPD H for every row."""
    Hs, S, Y = [], [], []
    for i, kind in enumerate(KINDS):
        s, y = _adversarial(10 + i, n, kind)
        Hs.append(random_spd(n, cond=20.0, generator=torch.Generator().manual_seed(i)))
        S.append(s)
        Y.append(y)
    Hs.append(torch.eye(n, dtype=torch.float64))
    S.append(torch.randn(n, dtype=torch.float64))
    Y.append(torch.full((n,), float("nan"), dtype=torch.float64))
    S_, Y_ = torch.stack(S).to(dtype), torch.stack(Y).to(dtype)
    Hs = [H.to(dtype) for H in Hs]
    Hy = torch.stack([H @ y for H, y in zip(Hs, Y_)])
    return Hs, S_, Y_, Hy


@pytest.mark.parametrize("lm", ["interpolate", "additive", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_damping_rows_equal_the_scalar_rule_row_by_row(lm, dtype):
    Hs, S, Y, Hy = _group(dtype=dtype)
    active = torch.tensor([True] * (len(KINDS) - 1) + [False, True])  # "normal" inactive; the NaN row active
    out = double_damping_rows(S, Y, Hy, active, mu1=0.2, mu2=0.3, lm=lm)
    fired = {"powell": 0, "lm": 0}
    for i in range(S.shape[0]):
        if not active[i]:
            assert torch.equal(out.s[i], S[i]) and torch.equal(out.y[i], Y[i])
            assert not out.powell[i] and not out.lm[i]
            continue
        if not torch.isfinite(Y[i]).all():  # Powell does not fire on a NaN row (the scalar rule does, on a NaN
            assert not out.powell[i]  # compare); the optimizer marks such a pair inactive before damping
            continue
        ref = double_damping(S[i], Y[i], Hy[i], mu1=0.2, mu2=0.3, lm=lm)
        assert bool(out.powell[i]) == ref.powell and bool(out.lm[i]) == ref.lm
        fired["powell"] += ref.powell
        fired["lm"] += ref.lm
        torch.testing.assert_close(out.s[i], ref.s, equal_nan=True, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.y[i], ref.y, equal_nan=True, rtol=1e-6, atol=0)
    # the group mixes rows where damping fires and rows where it does not
    assert 0 < fired["powell"] < active.sum()
    if lm == "interpolate":
        assert 0 < fired["lm"] < active.sum()


@pytest.mark.parametrize("eps", [0.0, 1e-4, 10.0])
def test_curvature_ok_rows_equal_check_curvature(eps):
    _, S, Y, _ = _group(dtype=torch.float64)
    grad_norm = torch.linspace(0.5, 3.0, S.shape[0], dtype=torch.float64)
    ok, sy = curvature_ok_rows(S, Y, eps, grad_norm)
    for i in range(S.shape[0]):
        ref = check_curvature(S[i], Y[i], eps, float(grad_norm[i]))
        margin = 1e-10 * float(S[i].norm() * Y[i].norm())
        if ref.reason != "nonfinite" and min(abs(ref.sy), abs(ref.sy - eps * ref.ss * float(grad_norm[i]))) < margin:
            continue  # sᵀy is rounding noise here (the "orthogonal" row): either verdict is right
        assert bool(ok[i]) == ref.ok, (i, ref.reason)
        if ref.reason != "nonfinite":
            assert float(sy[i]) == pytest.approx(ref.sy, rel=1e-12)
    assert ok.any() and not ok.all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank2_rows_give_the_explicit_bfgs_inverse(dtype):
    Hs, S, Y, _ = _group(dtype=dtype)
    d = double_damping_rows(S, Y, torch.stack([H @ y for H, y in zip(Hs, Y)]), torch.ones(S.shape[0], dtype=torch.bool))
    Hy = torch.stack([H @ y for H, y in zip(Hs, d.y)])
    ok, sy = curvature_ok_rows(d.s, d.y, 0.0, torch.ones(S.shape[0]))
    U, V = bfgs_rank2_rows(d.s, d.y, Hy, sy, dtype)
    assert U.dtype == V.dtype == dtype
    checked = 0
    for i, H in enumerate(Hs):
        if not ok[i]:
            continue
        s, y = d.s[i].double(), d.y[i].double()
        rho = 1.0 / (s @ y)
        I = torch.eye(len(s), dtype=torch.float64)
        explicit = (I - rho * torch.outer(s, y)) @ H.double() @ (I - rho * torch.outer(y, s)) + rho * torch.outer(s, s)
        new = torch.addmm(H, U[i], V[i])
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        scale = explicit.abs().max()
        assert float((new.double() - explicit).abs().max() / scale) < tol
        torch.testing.assert_close(new, bfgs_inverse_update(H, d.s[i], d.y[i]), rtol=tol, atol=tol * float(scale))
        checked += 1
    assert checked >= 4

