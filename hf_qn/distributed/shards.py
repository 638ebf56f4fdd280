"""Where a parameter's elements live when an optimizer's state is split over ranks.

An optimizer that keeps per-element state (running averages, histories, momentum) works on each parameter's
*local piece*: the elements this rank holds state for. A :class:`ShardPlan` says what that piece is, how to
sum partial inner products over the ranks that share a parameter, and what to do after the update:

* :class:`Replicated` - every rank holds whole parameters and whole state (one process, or DDP as before):
  the local piece is the parameter itself and nothing is summed.
* :class:`FullyShardedPlan` - FSDP2 ``fully_shard``: parameters are DTensors sharded on dim 0 over a 1-D
  mesh; the local piece is the rank's shard (``to_local()``), gradients arrive reduce-scattered alike,
  partial products are all-reduced over the mesh, and FSDP2 all-gathers the updated shards itself.
* :class:`SlicedPlan` - ZeRO-1 under DDP: parameters and gradients are whole on every rank, each rank keeps
  state for a contiguous ``1/N`` slice of every parameter (``torch.chunk`` of its flat view, the split FSDP2
  uses on dim 0), updates that slice, and the slices are all-gathered after the step so that every replica
  holds the same bits.

Every element belongs to exactly one rank, so a sum of per-rank partial products is the whole product.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .comm import all_reduce_sum_, is_distributed, is_dtensor

__all__ = [
    "FullyShardedPlan", "Replicated", "ShardPlan", "SlicedPlan", "chunk_range", "local_part", "local_piece",
    "plan_for", "whole",
]


def chunk_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of piece ``index`` when ``n`` items are split as ``torch.chunk(x, parts)`` splits them
    (pieces of ``ceil(n / parts)``; trailing pieces may be short or empty)."""
    size = -(-n // parts) if n else 0
    lo = min(index * size, n)
    return lo, min(lo + size, n)


def whole(t: Tensor) -> Tensor:
    """The whole of a DTensor (all-gathered), or ``t`` itself."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def local_piece(t: Tensor) -> Tensor:
    """A DTensor's local shard (a view: in-place writes reach it), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def local_part(p: Tensor, full: Tensor) -> tuple[Tensor, Tensor]:
    """``(p's local piece, the part of a whole p-shaped tensor that the piece holds)``: for an FSDP2 DTensor its
    shard and the matching rows (dim 0, ``torch.chunk``'s split); ``(p, full)`` for a plain tensor."""
    if not is_dtensor(p):
        return p, full
    mesh = p.device_mesh  # type: ignore[attr-defined]
    lo, hi = chunk_range(p.shape[0], mesh.size(), mesh.get_local_rank())
    return local_piece(p), full[lo:hi]


class ShardPlan:
    """The interface (see the module docstring). ``world`` ranks share every parameter; this is ``rank``."""

    kind = "replicated"
    sharded = False
    world = 1
    rank = 0

    def local(self, p: Tensor) -> Tensor:
        """This rank's piece of ``p``, a view that in-place updates write through."""
        return p

    def local_grad(self, p: Tensor) -> Tensor | None:
        """This rank's piece of ``p.grad`` (``None`` without a gradient)."""
        return p.grad

    def flat_range(self, p: Tensor, rank: int | None = None) -> tuple[int, int]:
        """``[lo, hi)`` of ``rank``'s piece (default: this rank's) in ``p``'s flat, row-major elements."""
        return 0, p.numel()

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Sum partial products in place over the ranks that share the parameters (one collective per dtype)."""

    def after_update(self, params: Sequence[Tensor]) -> None:
        """Called after the local pieces of ``params`` were updated."""

    def gather(self, p: Tensor, pieces: Tensor) -> Tensor:
        """The whole of a per-element quantity of ``p`` from every rank's ``pieces`` (``(k, local numel)``: ``k``
        rows, e.g. a history's, of this rank's elements): ``(k, p.numel())``, on every rank. Collective."""
        return pieces

    def signature(self) -> dict[str, Any]:
        """What a rank-local checkpoint must match to be loaded here."""
        return {"kind": self.kind, "world_size": self.world, "rank": self.rank}


class Replicated(ShardPlan):
    """Whole parameters and whole state on every rank (see the module docstring)."""


class _SplitPlan(ShardPlan):
    """Shared by the sharded plans: a process group, sums and gathers over it."""

    sharded = True

    def __init__(self, group: Any) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        all_reduce_sum_(tensors, self.group)

    def gather(self, p: Tensor, pieces: Tensor) -> Tensor:
        k = pieces.shape[0]
        ranges = [self.flat_range(p, r) for r in range(self.world)]
        width = max(hi - lo for lo, hi in ranges)
        padded = torch.zeros(k, width, dtype=pieces.dtype, device=pieces.device)
        padded[:, : pieces.shape[1]] = pieces
        out = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(out, padded.contiguous(), group=self.group)
        cols = [o[:, : hi - lo] for o, (lo, hi) in zip(out, ranges)]
        return torch.cat(cols, dim=1)


class FullyShardedPlan(_SplitPlan):
    """FSDP2 ``fully_shard`` (see the module docstring)."""

    kind = "fsdp2"

    def __init__(self, params: Sequence[Tensor]) -> None:
        from torch.distributed.tensor import Shard

        mesh = None
        for p in params:
            if not is_dtensor(p):
                raise NotImplementedError(
                    f"a parameter of shape {tuple(p.shape)} is a plain tensor while others are FSDP2 DTensors: "
                    "apply fully_shard to the root module too, so that every parameter is sharded"
                )
            if tuple(p.placements) != (Shard(0),) or p.device_mesh.ndim != 1:  # type: ignore[attr-defined]
                raise NotImplementedError(
                    f"a DTensor parameter has placements {tuple(p.placements)} on a "  # type: ignore[attr-defined]
                    f"{p.device_mesh.ndim}-D mesh; hf_qn supports FSDP2 fully_shard on a 1-D mesh (Shard(0)), "  # type: ignore[attr-defined]
                    "not HSDP or tensor parallelism"
                )
            if mesh is None:
                mesh = p.device_mesh  # type: ignore[attr-defined]
            elif p.device_mesh != mesh:  # type: ignore[attr-defined]
                raise NotImplementedError("the parameters are sharded over different device meshes; use one mesh")
        assert mesh is not None
        self.mesh = mesh
        super().__init__(mesh.get_group())

    def local(self, p: Tensor) -> Tensor:
        return local_piece(p)

    def local_grad(self, p: Tensor) -> Tensor | None:
        return None if p.grad is None else local_piece(p.grad)

    def like_param(self, p: Tensor, piece: Tensor, rows: int = 0) -> Tensor:
        """This rank's ``piece`` of a per-element quantity of ``p`` as a DTensor sharded like ``p`` (what
        ``torch.distributed.checkpoint`` saves and reshards by name). ``rows > 0``: ``piece`` holds ``rows`` rows of
        ``p``'s elements (``(rows, local numel)``, e.g. its columns of a history), giving ``(rows, *p.shape)``
        sharded on dim 1."""
        from torch.distributed.tensor import DTensor, Shard

        local_shape = p.to_local().shape  # type: ignore[attr-defined]
        if rows:
            shape, placement = (rows, *p.shape), Shard(1)
            piece = piece.reshape(rows, *local_shape)
        else:
            shape, placement = tuple(p.shape), Shard(0)
            piece = piece.reshape(local_shape)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(piece.contiguous(), self.mesh, [placement], run_check=False,
                                  shape=torch.Size(shape), stride=stride)

    #: length of :meth:`rank_marker`: fixed, so that it reshards to any number of ranks up to this many.
    MARKER_LENGTH = 4096

    def rank_marker(self) -> Tensor:
        """``arange(MARKER_LENGTH)`` sharded over the ranks. Loaded through ``torch.distributed.checkpoint`` (on any
        number of ranks) each rank holds its own piece of it; a rank that holds another piece was given another
        rank's file."""
        from torch.distributed.tensor import DTensor, Shard

        lo, hi = chunk_range(self.MARKER_LENGTH, self.world, self.rank)
        return DTensor.from_local(torch.arange(lo, hi), self.mesh, [Shard(0)], run_check=False,
                                  shape=torch.Size([self.MARKER_LENGTH]), stride=(1,))

    def flat_range(self, p: Tensor, rank: int | None = None) -> tuple[int, int]:
        rows = p.shape[0] if p.dim() else 1
        lo, hi = chunk_range(rows, self.world, self.rank if rank is None else rank)
        per_row = p.numel() // rows if rows else 0
        return lo * per_row, hi * per_row


class SlicedPlan(_SplitPlan):
    """ZeRO-1 under DDP (see the module docstring)."""

    kind = "zero1"

    def __init__(self, params: Sequence[Tensor]) -> None:
        for p in params:
            if not p.is_contiguous():
                raise ValueError(f"sharded state needs contiguous parameters; one of shape {tuple(p.shape)} is not")
        super().__init__(dist.group.WORLD)

    def flat_range(self, p: Tensor, rank: int | None = None) -> tuple[int, int]:
        return chunk_range(p.numel(), self.world, self.rank if rank is None else rank)

    def local(self, p: Tensor) -> Tensor:
        lo, hi = self.flat_range(p)
        return p.detach().view(-1)[lo:hi]

    def local_grad(self, p: Tensor) -> Tensor | None:
        if p.grad is None:
            return None
        lo, hi = self.flat_range(p)
        return p.grad.reshape(-1)[lo:hi]

    def after_update(self, params: Sequence[Tensor]) -> None:
        """Every rank's updated slices to every rank: one all-gather per dtype of the padded slices."""
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for p in params:
            buckets.setdefault((p.dtype, p.device), []).append(p)
        for ps in buckets.values():
            widths = [-(-p.numel() // self.world) for p in ps]
            mine = torch.zeros(sum(widths), dtype=ps[0].dtype, device=ps[0].device)
            offset = 0
            for p, w in zip(ps, widths):
                piece = self.local(p)
                mine[offset : offset + piece.numel()] = piece
                offset += w
            out = [torch.empty_like(mine) for _ in range(self.world)]
            dist.all_gather(out, mine, group=self.group)
            for r, buf in enumerate(out):
                if r == self.rank:
                    continue
                offset = 0
                for p, w in zip(ps, widths):
                    lo, hi = self.flat_range(p, r)
                    p.detach().view(-1)[lo:hi] = buf[offset : offset + hi - lo]
                    offset += w


def plan_for(params: Sequence[Tensor], shard_state: bool | None) -> ShardPlan:
    """The plan for these parameters: :class:`FullyShardedPlan` for DTensors (FSDP2; ``shard_state=False`` is
    refused there), :class:`SlicedPlan` when ``shard_state`` is true on several ranks, else
    :class:`Replicated`."""
    if any(is_dtensor(p) for p in params):
        if shard_state is False:
            raise ValueError(
                "Invalid shard_state: False with FSDP2 (fully_shard) parameters, whose elements live on different "
                "ranks; leave shard_state=None"
            )
        return FullyShardedPlan(params)
    if shard_state and is_distributed():
        return SlicedPlan(params)
    return Replicated()
