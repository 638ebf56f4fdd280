"""Work assignment (pure) and communication (no-ops on one process)."""

from __future__ import annotations

from .assignment import greedy_assignment
from .comm import all_reduce_sum_, is_distributed, is_dtensor, rank, shutdown, world_size

__all__ = ["all_reduce_sum_", "greedy_assignment", "is_distributed", "is_dtensor", "rank", "shutdown", "world_size"]
