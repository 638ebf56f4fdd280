"""The only place hf_qn touches torch.distributed. Every function is a no-op on a single process."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_reduce_sum_", "is_distributed", "is_dtensor", "rank", "shutdown", "world_size"]


_DTENSOR: list[type] = []  # DTensor's class, once looked up


def is_dtensor(t: object) -> bool:
    """True for a DTensor (parameters sharded by FSDP2 ``fully_shard`` or tensor parallelism). The class is
    imported on the first call, not with hf_qn, and kept: the optimizers ask this of every tensor they touch."""
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # pragma: no cover - very old torch
            return False
        _DTENSOR.append(DTensor)
    return isinstance(t, _DTENSOR[0])


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def shutdown() -> None:
    """End a distributed run cleanly: collect garbage, wait for every rank, destroy the default group.

    Call it last, after dropping every reference to ``DistributedDataParallel`` wrappers (``del model``;
    ``accelerator.free_memory()``; ``del trainer``). Measured with torch 2.13 and gloo on CPU: when a DDP
    wrapper still holds the process group at interpreter exit, about 3 runs in 100 abort after the work is
    done ("terminate called without an active exception", SIGABRT); with the wrappers dropped and the group
    destroyed here, 0 in 70. A no-op on a single process.
    """
    import gc

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum_(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Sum the tensors in place across the ranks of ``group`` (default: all), as one flat bucket per dtype/device
    (one collective each)."""
    if not is_distributed() or not tensors:
        return
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n
