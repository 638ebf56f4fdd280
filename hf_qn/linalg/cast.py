"""Dtype conversion without a dispatch when there is nothing to convert, and products with a float32 result.

``x.to(dtype)`` returns ``x`` itself when it already has that dtype, but still goes through torch's argument
parsing and dispatcher, about a microsecond. K-BFGS's step converts a few tensors per layer; on a model of many
small layers (a ViT of 64-wide layers) such calls were 222 of a plain step's 448 tensor operators. :func:`cast`
reads the dtype first.

:func:`matmul_float32` multiplies half-precision operands into a float32 result where torch can (CUDA's
``out_dtype``): a Gram matrix rounded to bfloat16's 8 bits is no longer positive semi-definite once its spectrum
spans more than a few hundred to one, and its damped inverse can fail.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cast", "matmul_float32"]


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``: ``x`` itself when it has that dtype already."""
    return x if x.dtype == dtype else x.to(dtype)


#: per device type: whether torch's ``mm``/``bmm`` take ``out_dtype`` there (CUDA in recent torch; not the CPU)
_OUT_DTYPE: dict[str, bool] = {}


def matmul_float32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (2-D, or 3-D batched) with a result of at least float32: float32 and float64 operands multiply as
    usual; half-precision ones with a float32 result where torch supports it (``torch.mm(...,
    out_dtype=torch.float32)``, the same tensor-core kernels, no rounding of the result to the operands'
    precision), elsewhere in their dtype, up-cast."""
    if a.dtype in (torch.float32, torch.float64):
        return a @ b
    kind = a.device.type
    if _OUT_DTYPE.get(kind, True):
        op = torch.mm if a.dim() == 2 else torch.bmm
        try:
            out = op(a, b, out_dtype=torch.float32)
            _OUT_DTYPE[kind] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _OUT_DTYPE[kind] = False
    return (a @ b).to(torch.float32)
