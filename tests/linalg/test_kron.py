from __future__ import annotations

import torch

from hf_qn.linalg import cast, damped_cholesky_inverse, kron_precondition
from tests._helpers.dense import random_spd


def test_kron_identity_row_major_vec():
    G, A = random_spd(4), random_spd(3)
    X = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(torch.kron(G, A) @ X.reshape(-1), (G @ X @ A.T).reshape(-1))


def test_kron_precondition_equals_dense_solve():
    """H_g X H_a with H = (factor + sqrt(lam) I)^-1 equals the solve with the Kronecker product."""
    lam = 0.3
    Gf, Af = random_spd(5), random_spd(4)
    X = torch.randn(5, 4, dtype=torch.float64)
    H_g = damped_cholesky_inverse(Gf, lam**0.5)
    H_a = damped_cholesky_inverse(Af, lam**0.5)
    I5, I4 = torch.eye(5, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    K = torch.kron(Gf + lam**0.5 * I5, Af + lam**0.5 * I4)
    ref = torch.linalg.solve(K, X.reshape(-1)).reshape(5, 4)
    torch.testing.assert_close(kron_precondition(H_g, X, H_a), ref, rtol=1e-9, atol=1e-10)


def test_diagonal_input_factor_and_identity():
    X = torch.randn(3, 6, dtype=torch.float64)
    d = torch.rand(6, dtype=torch.float64) + 0.5
    torch.testing.assert_close(kron_precondition(None, X, d), X @ torch.diag(d))
    assert torch.equal(kron_precondition(None, X, None), X)


def test_compute_dtype_rounds_only_the_products():
    """bf16 products: the result keeps X's dtype and is within bf16 accuracy of the float64 reference."""
    torch.manual_seed(0)
    H_g, H_a = random_spd(40), random_spd(30)
    X = torch.randn(40, 30, dtype=torch.float64)
    ref = H_g @ X @ H_a
    out = kron_precondition(H_g.float(), X.float(), H_a.float(), compute_dtype=torch.bfloat16)
    assert out.dtype == torch.float32
    err = (out.double() - ref).norm() / ref.norm()
    assert 1e-5 < err < 2e-2  # rounded (so bf16 really ran), but only at bf16's ~3 digits
    d = torch.rand(30, dtype=torch.float64) + 0.5
    out_d = kron_precondition(None, X.float(), d.float(), compute_dtype=torch.bfloat16)
    torch.testing.assert_close(out_d.double(), X * d, rtol=2e-2, atol=2e-2)


def test_cast_returns_the_tensor_itself_when_its_dtype_matches():
    x = torch.randn(3, 4)
    assert cast(x, torch.float32) is x
    y = cast(x, torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y, x.double())
    X, H = torch.randn(5, 4), random_spd(4).float()
    assert kron_precondition(None, X, None) is X  # nothing to multiply, nothing to convert
    torch.testing.assert_close(kron_precondition(None, X, H, torch.float64), (X.double() @ H.double()).float())
