from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_qn.linalg import bfgs_inverse_update, check_curvature
from tests._helpers.dense import direct_bfgs_B, random_pair, random_spd


@pytest.mark.parametrize("n", [1, 3, 8, 20])
def test_inverse_update_is_inverse_of_direct_update(n):
    B = random_spd(n, cond=50.0)
    H = torch.linalg.inv(B)
    s, y = random_pair(n)
    H_new = bfgs_inverse_update(H, s, y)
    B_new = direct_bfgs_B(B, s, y)
    torch.testing.assert_close(H_new, torch.linalg.inv(B_new), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n", [2, 5, 16])
def test_secant_symmetry_and_positive_definiteness(n):
    H = random_spd(n)
    for _ in range(10):
        s, y = random_pair(n)
        H = bfgs_inverse_update(H, s, y)
        torch.testing.assert_close(H @ y, s, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(H, H.T, rtol=0, atol=1e-12)
        assert torch.linalg.eigvalsh(H).min() > 0


def test_float32_matrix_keeps_dtype_and_is_close_to_float64():
    n = 10
    H64 = random_spd(n)
    s, y = random_pair(n)
    ref = bfgs_inverse_update(H64, s, y)
    out = bfgs_inverse_update(H64.float(), s.float(), y.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_nonfinite_result_is_refused():
    H = torch.eye(3, dtype=torch.float64)
    s = torch.tensor([1e200, 0.0, 0.0], dtype=torch.float64)
    y = torch.tensor([1e-200, 0.0, 0.0], dtype=torch.float64)
    assert bfgs_inverse_update(H, s, y) is None


@pytest.mark.parametrize(
    ("s", "y", "eps", "gnorm", "reason"),
    [
        ([1.0, 0.0], [1.0, 0.0], 0.0, 1.0, "ok"),
        ([1.0, 0.0], [-1.0, 0.0], 0.0, 1.0, "nonpositive"),
        ([1.0, 0.0], [0.0, 1.0], 0.0, 1.0, "nonpositive"),
        ([1.0, 0.0], [1e-5, 0.0], 1e-4, 1.0, "relative"),
        ([1.0, 0.0], [1e-5, 0.0], 1e-4, 0.01, "ok"),
        ([float("nan"), 0.0], [1.0, 0.0], 0.0, 1.0, "nonfinite"),
        ([1.0, 0.0], [float("inf"), 0.0], 0.0, 1.0, "nonfinite"),
    ],
)
def test_skip_rules(s, y, eps, gnorm, reason):
    res = check_curvature(torch.tensor(s), torch.tensor(y), eps=eps, grad_norm=gnorm)
    assert res.reason == reason
    assert res.ok == (reason == "ok")


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-6, 6),
)
def test_property_update_preserves_pd_and_secant(n, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    H = random_spd(n, cond=100.0, generator=g)
    s = torch.randn(n, dtype=torch.float64, generator=g) * 10**log_scale
    B = random_spd(n, cond=1000.0, generator=g)
    y = B @ s
    H_new = bfgs_inverse_update(H, s, y)
    assert H_new is not None
    torch.testing.assert_close(H_new @ y, s, rtol=1e-6, atol=1e-9 * float(s.abs().max()))
    ev = torch.linalg.eigvalsh(0.5 * (H_new + H_new.T))
    assert ev.min() > -1e-9 * ev.max()
