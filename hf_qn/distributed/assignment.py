"""Deterministic assignment of curvature work to ranks (pure; no torch.distributed here).

Greedy longest-processing-time: blocks sorted by cost (largest first, ties broken by name) each go
to the currently least-loaded rank (ties to the lowest rank). Same inputs, same map, on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["greedy_assignment"]


def greedy_assignment(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Map each block name to an owner rank in ``[0, world_size)``."""
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size} (must be >= 1)")
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-float(costs[n]), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += float(costs[name])
    return owner
