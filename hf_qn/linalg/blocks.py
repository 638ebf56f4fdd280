"""Block-diagonal Kronecker factors: one dimension cut into equal blocks, and products with such factors.

A factor of dimension ``d`` larger than ``max_block`` is held as its ``n = ⌈d / max_block⌉`` diagonal blocks of
size ``b = ⌈d / n⌉``, stacked as one ``(n, b, b)`` tensor, so that every block has the same shape and one
batched kernel serves them all. The last ``n·b − d`` coordinates are padding: zero in every vector the factor
meets, so they never reach a result (a BFGS update with zero padding in ``s`` and ``y`` leaves the padded
rows and columns of a block as they were). This is Shampoo's ``max_preconditioner_dim`` applied to K-BFGS's
two factors: the products ``H_g ĝ H_a`` of a ``d_out × d_in`` layer cost ``d_out·d_in·(b_out + b_in)``
instead of ``d_out·d_in·(d_out + d_in)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cast import matmul_float32

__all__ = ["BlockSplit", "block_diagonal", "block_left", "block_right", "matvec_each", "matvec_rows"]


@dataclass(frozen=True)
class BlockSplit:
    """``dim`` coordinates as ``blocks`` blocks of ``size`` (the last ``pad`` of them padding)."""

    dim: int
    blocks: int
    size: int

    @classmethod
    def of(cls, dim: int, max_block: int | None) -> BlockSplit:
        """The fewest equal blocks of at most ``max_block`` (one block of ``dim`` if ``max_block`` is None)."""
        if max_block is None or dim <= max_block:
            return cls(dim, 1, dim)
        n = -(-dim // max_block)
        return cls(dim, n, -(-dim // n))

    @property
    def blocked(self) -> bool:
        return self.blocks > 1

    @property
    def pad(self) -> int:
        return self.blocks * self.size - self.dim

    def rows(self, x: Tensor) -> Tensor:
        """``(..., dim)`` -> ``(..., blocks, size)``, zero padded (a view when there is no padding)."""
        if self.pad:
            x = torch.nn.functional.pad(x, (0, self.pad))
        return x.reshape(*x.shape[:-1], self.blocks, self.size)

    def unrows(self, x: Tensor) -> Tensor:
        """``(..., blocks, size)`` -> ``(..., dim)``: the inverse of :meth:`rows`."""
        return x.reshape(*x.shape[:-2], self.blocks * self.size)[..., : self.dim]

    def gram(self, r: Tensor) -> Tensor:
        """The factor ``rᵀ r`` over these coordinates for rows ``r`` (``(R, dim)``), shaped as :attr:`factor_shape`:
        the whole matrix in one block, else its diagonal blocks ``(blocks, size, size)``; float32
        (:func:`.cast.matmul_float32`)."""
        if not self.blocked:
            return matmul_float32(r.T, r)
        x = self.rows(r).transpose(0, 1)  # (blocks, R, size)
        return matmul_float32(x.transpose(1, 2), x)

    @property
    def factor_shape(self) -> tuple[int, ...]:
        """The shape of a factor over these coordinates: ``(dim, dim)`` in one block, else ``(blocks, size, size)``."""
        return (self.blocks, self.size, self.size) if self.blocked else (self.dim, self.dim)

    def identity(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Tensor:
        """The factor ``I``, shaped as :attr:`factor_shape`."""
        if not self.blocked:
            return torch.eye(self.dim, dtype=dtype, device=device)
        return torch.eye(self.size, dtype=dtype, device=device).expand(self.blocks, -1, -1).clone()


def block_left(H: Tensor, X: Tensor) -> Tensor:
    """``blockdiag(H) @ X`` for blocks ``H`` (``(n, b, b)``) and ``X`` of shape ``(d, k)`` or ``(d,)``."""
    n, b, _ = H.shape
    split = BlockSplit(X.shape[0], n, b)
    if X.dim() == 1:
        return split.unrows((H @ split.rows(X).unsqueeze(-1)).squeeze(-1))
    Xp = torch.nn.functional.pad(X, (0, 0, 0, split.pad)) if split.pad else X
    return (H @ Xp.reshape(n, b, -1)).reshape(n * b, -1)[: split.dim]


def block_right(X: Tensor, H: Tensor) -> Tensor:
    """``X @ blockdiag(H)`` for ``X`` of shape ``(k, d)`` and blocks ``H`` (``(n, b, b)``)."""
    n, b, _ = H.shape
    split = BlockSplit(X.shape[1], n, b)
    Xb = split.rows(X).transpose(0, 1)  # (n, k, b)
    return split.unrows((Xb @ H).transpose(0, 1))


def matvec_rows(M: Tensor, x: Tensor) -> Tensor:
    """A factor ``M`` (``(d, d)``, or diagonal blocks ``(n, b, b)``) times a vector given as its rows ``x``
    (``(1, d)``, or ``(n, b)``: :meth:`BlockSplit.rows`), as rows."""
    if M.dim() == 2:
        return (M @ x[0]).unsqueeze(0)
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def matvec_each(Ms: list[Tensor], x: Tensor) -> Tensor:
    """:func:`matvec_rows` of ``Ms[k]`` and ``x[k]`` for every ``k``, stacked (``x``: ``(len(Ms), n, b)``; the factors
    all dense or all blocked): one matrix-vector product per factor, without the two reshapes of each call."""
    if Ms[0].dim() == 2:
        return torch.stack([torch.mv(M, v) for M, v in zip(Ms, x[:, 0].unbind())]).unsqueeze(1)
    return torch.stack([matvec_rows(M, v) for M, v in zip(Ms, x.unbind())])


def block_diagonal(H: Tensor, dim: int) -> Tensor:
    """The dense ``dim × dim`` matrix of blocks ``H`` (padding dropped): for tests and reports."""
    return torch.block_diag(*H.unbind(0))[:dim, :dim]
