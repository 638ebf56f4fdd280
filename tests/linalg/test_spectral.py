"""The logging norm estimate against exact eigenvalues (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from hf_qn.linalg import sym_psd_norm_estimate, sym_psd_norm_estimates


def _spd(eigs: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return Q @ torch.diag(eigs) @ Q.T


@pytest.mark.parametrize("seed", range(5))
def test_exact_with_a_spectral_gap(seed):
    eigs = torch.cat([torch.tensor([7.0]), torch.rand(49, generator=torch.Generator().manual_seed(seed)) * 3.5])
    M = _spd(eigs.double(), seed)
    assert sym_psd_norm_estimate(M) == pytest.approx(7.0, rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("d", [80, 400])
def test_lower_bound_close_without_a_gap(seed, d):
    """Like BFGS factors: a dense spectrum (Wishart + damping), where 20 power iterations were 7 % low.
    Never above the truth, within 1 % of it."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d, d + d // 2, generator=g, dtype=torch.float64)
    M = (X @ X.T / X.shape[1] + 0.1 * torch.eye(d, dtype=torch.float64)).float()
    exact = float(torch.linalg.eigvalsh(M.double())[-1])
    est = sym_psd_norm_estimate(M)
    assert est <= exact * (1 + 1e-6)  # a float32 matrix: its Lanczos runs in float32
    assert est >= 0.99 * exact


def test_exact_once_steps_reach_the_dimension():
    M = _spd(torch.linspace(0.1, 2.0, 12, dtype=torch.float64), 0)
    assert sym_psd_norm_estimate(M, steps=12) == pytest.approx(2.0, rel=1e-10)


def test_zero_and_bad_input():
    assert sym_psd_norm_estimate(torch.zeros(4, 4)) == 0.0
    with pytest.raises(ValueError, match="square"):
        sym_psd_norm_estimate(torch.zeros(3, 4))


def test_batched_estimates_equal_each_matrix_alone():
    """Matrices of several sizes (two of each, one zero, one 1 x 1, one with a NaN) in one call: the estimate of
    each equals its own call's and, at dimensions within the steps, the exact largest eigenvalue; NaN for the
    non-finite one."""
    mats = [_spd(torch.linspace(0.1, s, n, dtype=torch.float64), n) for n, s in ((12, 2.0), (12, 5.0), (20, 3.0))]
    mats += [torch.zeros(20, 20, dtype=torch.float64), torch.tensor([[4.0]]), _spd(torch.rand(50).double() + 1, 1)]
    bad = mats[1].clone()
    bad[3, 4] = float("nan")
    mats.append(bad)
    got = sym_psd_norm_estimates(mats)
    assert got[:5] == pytest.approx([2.0, 5.0, 3.0, 0.0, 4.0], rel=1e-10)
    assert got[5] == pytest.approx(sym_psd_norm_estimate(mats[5]), rel=1e-12)
    assert math.isnan(got[6]) and math.isnan(sym_psd_norm_estimate(bad))
    assert sym_psd_norm_estimates([]) == []
