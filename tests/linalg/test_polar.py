"""The Newton-Schulz polar factor against a float64 SVD reference."""

from __future__ import annotations

import pytest
import torch

from hf_qn.linalg import NEWTON_SCHULZ_QUINTIC, newton_schulz_polar, polar_each
from tests._helpers.dense import svd_polar


def _reference(X: torch.Tensor, steps: int) -> torch.Tensor:
    return svd_polar(X, steps, NEWTON_SCHULZ_QUINTIC)


@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (16, 16)])
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_singular_values_move_through_the_quintic_and_vectors_stay(shape, steps):
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(steps))
    got = newton_schulz_polar(X, steps)
    assert got.dtype == torch.float32 and got.shape == shape
    torch.testing.assert_close(got.double(), _reference(X, steps), rtol=0, atol=2e-5)
    exact = newton_schulz_polar(X.double(), steps)  # float64 in, float64 arithmetic
    assert exact.dtype == torch.float64
    torch.testing.assert_close(exact, _reference(X, steps), rtol=0, atol=1e-12)


def test_the_iterations_run_in_the_dtype_asked_for():
    """``dtype=torch.bfloat16`` (Muon's choice where bf16 is native) keeps the input's dtype for the result and
    agrees with the float64 reference to bf16's precision, not float32's; ``polar_each`` passes it on."""
    X = torch.randn(12, 30, generator=torch.Generator().manual_seed(0))
    ref = _reference(X, 3)
    low = newton_schulz_polar(X, 3, dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    err = (low.double() - ref).abs().max()
    assert 1e-4 < err < 3e-2  # bf16's 8-bit mantissa: visibly coarser than float32's 2e-5, still the polar factor
    both = polar_each([X, X, X.T], 3, [torch.bfloat16, torch.float32, torch.bfloat16])
    assert torch.equal(both[0], low) and torch.equal(both[1], newton_schulz_polar(X, 3))
    wide = newton_schulz_polar(X.double(), 3, dtype=torch.float32)
    assert wide.dtype == torch.float64 and 1e-9 < (wide - ref).abs().max() < 2e-5


def test_approaches_the_polar_factor_on_a_well_conditioned_matrix():
    """Five iterations (Muon's) leave every singular value of a well-conditioned matrix between 0.68 and 1.2: the
    result is U Vᵀ up to that band, whatever the scale of X."""
    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(20, 20, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(40, 20, generator=g, dtype=torch.float64))
    X = Q1 @ torch.diag(torch.linspace(1.0, 4.0, 20, dtype=torch.float64)) @ Q2.T * 1e-6
    s = torch.linalg.svdvals(newton_schulz_polar(X, 5))
    assert s.min() > 0.68 and s.max() < 1.2
    assert torch.linalg.matrix_norm(newton_schulz_polar(X, 5) - Q1 @ Q2.T) < 0.35 * 20**0.5


def test_a_zero_matrix_stays_zero_and_a_nan_propagates():
    assert torch.equal(newton_schulz_polar(torch.zeros(3, 5), 3), torch.zeros(3, 5))
    X = torch.randn(3, 5)
    X[1, 2] = float("nan")
    assert newton_schulz_polar(X, 3).isnan().all()


def test_polar_each_batches_by_shape_and_keeps_the_order():
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(*s, generator=g) for s in [(4, 6), (6, 4), (4, 6), (5, 5), (4, 6)]]
    got = polar_each(mats, 3)
    assert len(got) == len(mats)
    for M, P in zip(mats, got):
        torch.testing.assert_close(P, newton_schulz_polar(M, 3), rtol=0, atol=1e-6)
