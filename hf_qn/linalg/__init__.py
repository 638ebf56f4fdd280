"""Pure linear algebra of the quasi-Newton methods: no modules, no optimizer state, no communication."""

from __future__ import annotations

from .bfgs import (
    CurvatureCheck,
    all_finite,
    bfgs_inverse_update,
    check_curvature,
    curvature_verdict,
    dot64,
    finite_flag,
    finite_flags,
)
from .cast import cast, matmul_float32
from .damping import DampedPair, double_damping, lm_damping, mlbfgs_damping, mlbfgs_mix, powell_damping_inverse
from .kron import damped_cholesky_inverse, kron_precondition
from .lbfgs import LBFGSHistory
from .polar import NEWTON_SCHULZ_QUINTIC, newton_schulz_polar, polar_each
from .spectral import sym_psd_norm_estimate, sym_psd_norm_estimates

__all__ = [
    "NEWTON_SCHULZ_QUINTIC",
    "CurvatureCheck",
    "DampedPair",
    "LBFGSHistory",
    "all_finite",
    "bfgs_inverse_update",
    "cast",
    "check_curvature",
    "curvature_verdict",
    "damped_cholesky_inverse",
    "dot64",
    "double_damping",
    "finite_flag",
    "finite_flags",
    "kron_precondition",
    "lm_damping",
    "matmul_float32",
    "mlbfgs_damping",
    "mlbfgs_mix",
    "newton_schulz_polar",
    "polar_each",
    "powell_damping_inverse",
    "sym_psd_norm_estimate",
    "sym_psd_norm_estimates",
]
