from __future__ import annotations

import pytest
import torch

from hf_qn.linalg import cast, damped_cholesky_inverse, kron_precondition, matmul_float32
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


def test_damped_cholesky_inverse_takes_float32_only_where_the_condition_bound_allows():
    """Left to choose, a float32 factor is inverted in float32 when ``1 + tr(A)/damping`` bounds its condition
    number by FLOAT32_INVERSE_MAX_CONDITION, in float64 otherwise, and either way is close to the float64 inverse
    of that float32 matrix; on the ill-conditioned one a float32 inverse would not be. A float64 factor stays
    float64."""
    from hf_qn.linalg.kron import FLOAT32_INVERSE_MAX_CONDITION

    torch.manual_seed(0)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    well = Q @ torch.diag(torch.linspace(0.1, 2.0, n, dtype=torch.float64)) @ Q.T  # trace 63
    ill = Q @ torch.diag(torch.logspace(0, -9, n, dtype=torch.float64)) @ Q.T  # kappa ~ 1e7 with damping 1e-7
    for A, damping, inner in ((well, 0.5, torch.float32), (ill, 1e-7, torch.float64)):
        A32 = A.float()
        assert (1 + float(A32.diagonal().sum()) / damping <= FLOAT32_INVERSE_MAX_CONDITION) == (inner is torch.float32)
        ref = torch.linalg.inv(A32.double() + damping * torch.eye(n, dtype=torch.float64))
        out = damped_cholesky_inverse(A32, damping)
        assert out.dtype == torch.float32
        assert torch.equal(out, damped_cholesky_inverse(A32, damping, inner))  # the choice the bound names
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-6
    wrong = damped_cholesky_inverse(ill.float(), 1e-7, torch.float32).double()
    ref = torch.linalg.inv(ill.float().double() + 1e-7 * torch.eye(n, dtype=torch.float64))
    assert float((wrong - ref).norm() / ref.norm()) > 1e-3  # what float32 would have given there
    torch.testing.assert_close(damped_cholesky_inverse(well, 0.5),
                               torch.linalg.inv(well + 0.5 * torch.eye(n, dtype=torch.float64)), rtol=1e-10, atol=1e-12)


def test_an_indefinite_factor_is_inverted_through_its_psd_part_and_the_others_keep_their_cholesky_inverse():
    """A PSD factor made slightly indefinite by rounding (a half-precision Gram) fails Cholesky; that matrix alone
    gets ``V diag(1/(max(w, 0) + λ)) Vᵀ`` (float64), with a warning, and the batch's other matrices are bitwise
    what they would be alone."""
    torch.manual_seed(0)
    d, lam = 40, 0.5
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    w = torch.linspace(-3.0, 20.0, d, dtype=torch.float64)  # eigenvalues below -λ: not PD after damping
    bad, good = (Q * w) @ Q.T, (Q * w.abs()) @ Q.T
    A = torch.stack([good, bad, good]).float()
    with pytest.warns(RuntimeWarning, match="1 of 3 damped factors"):
        H = damped_cholesky_inverse(A, lam)
    assert H.dtype == torch.float32 and torch.isfinite(H).all()
    torch.testing.assert_close(H[1].double(), (Q / (w.clamp_min(0.0) + lam)) @ Q.T, rtol=1e-6, atol=1e-6)
    alone = damped_cholesky_inverse(A[0], lam)
    assert torch.equal(H[0], alone) and torch.equal(H[2], alone)
    with pytest.warns(RuntimeWarning, match="1 of 1"):  # an unbatched matrix too
        torch.testing.assert_close(damped_cholesky_inverse(bad, lam), H[1].double(), rtol=1e-6, atol=1e-6)


def test_a_cpu_factor_whose_width_aliases_the_caches_is_inverted_inside_a_padded_matrix():
    """On a CPU a factor whose width is a multiple of 128 (at least CPU_PAD_MIN) is factorised CPU_PAD rows and
    columns larger, the damped identity there; its inverse is the damped inverse all the same, in float32 and
    float64, batched, symmetric and contiguous, and an indefinite one still goes through the eigendecomposition."""
    from hf_qn.linalg.kron import CPU_PAD, CPU_PAD_MIN, lapack_size

    cpu = torch.device("cpu")
    assert lapack_size(CPU_PAD_MIN, cpu) == CPU_PAD_MIN + CPU_PAD and lapack_size(1024, cpu) == 1024 + CPU_PAD
    assert lapack_size(CPU_PAD_MIN + 8, cpu) == CPU_PAD_MIN + 8 and lapack_size(384, cpu) == 384
    assert lapack_size(1024, torch.device("cuda")) == 1024  # CUDA has its own inverse path
    torch.manual_seed(0)
    n, lam = CPU_PAD_MIN, 0.5
    X = torch.randn(2, n, n + 8, dtype=torch.float64)
    A = X @ X.mT / n
    # one matrix at a time: torch 2.13's batched CPU inverse (LU) fails in MKL at this size
    ref = torch.stack([torch.linalg.inv(a + lam * torch.eye(n, dtype=torch.float64)) for a in A])
    out = damped_cholesky_inverse(A.float(), lam)  # 1 + tr(A)/λ is about 1e3: float32
    assert out.shape == (2, n, n) and out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, out.mT)
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
    torch.testing.assert_close(damped_cholesky_inverse(A, lam), ref, rtol=1e-10, atol=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    w = torch.linspace(-3.0, 20.0, n, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="1 of 2 damped factors"):
        H = damped_cholesky_inverse(torch.stack([A[0], (Q * w) @ Q.T]), lam)
    torch.testing.assert_close(H[0], ref[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(H[1], (Q / (w.clamp_min(0.0) + lam)) @ Q.T, rtol=1e-10, atol=1e-12)


def test_matmul_float32_keeps_full_precision_operands_and_gives_half_precision_ones_a_float32_result():
    torch.manual_seed(0)
    a, b = torch.randn(64, 16, dtype=torch.float64), torch.randn(16, 8, dtype=torch.float64)
    assert torch.equal(matmul_float32(a, b), a @ b)
    assert torch.equal(matmul_float32(a.float(), b.float()), a.float() @ b.float())
    h, k = a.bfloat16(), b.bfloat16()
    out = matmul_float32(h, k)  # on the CPU: torch has no out_dtype kernel, so the bf16 product, up-cast
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (h.double() @ k.double()).float(), rtol=1e-2, atol=1e-2)
    batched = matmul_float32(h.reshape(4, 16, 16), k.reshape(1, 16, 8).expand(4, 16, 8))
    assert batched.shape == (4, 16, 8) and batched.dtype == torch.float32
