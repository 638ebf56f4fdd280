"""K-BFGS's second pass: the closure re-evaluates the same batch at the new parameters θ⁺.

Only ``∂L/∂h`` and ``h`` are needed from it: the closure's gradients never leak (``.grad`` is restored
afterwards), and the weights of layers whose bias keeps the output in the graph are frozen for its
duration so that the weight-gradient GEMMs are skipped (not under DDP, whose reducer expects a gradient
for every parameter it registered).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import LayerAdapter
from ..capture import Capture, LayerStats
from ..distributed import all_reduce_sum_, is_distributed, world_size
from ..distributed.shards import local_part
from ..linalg import all_finite, cast
from .kbfgs_stats import LayerMeans, reduce_statistics

__all__ = ["run_closure", "second_pass"]


def run_closure(
    closure: Callable[[], Any], params: list[nn.Parameter], adapters: list[LayerAdapter], capture: Capture,
    record: bool,
) -> tuple[Any, float | None, list[LayerStats]]:
    """Call the closure with gradients saved and restored around it; statistics go to the second-pass sums
    if ``record``, nowhere otherwise. Returns the loss, its mean over ranks, and those sums."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    frozen = [] if is_distributed() else [
        ad.weight for ad in adapters if ad.bias is not None and ad.weight.requires_grad  # the user's stay as they are
    ]
    for w in frozen:
        w.requires_grad_(False)
    enabled = capture.enabled
    try:
        with torch.enable_grad(), capture.second_pass() as stats2:
            capture.enabled = record
            loss = closure()
    finally:
        capture.enabled = enabled
        for w in frozen:
            w.requires_grad_(True)
        for p, g in zip(params, saved):
            p.grad = g
    return loss, mean_over_ranks(loss, adapters[0].weight.device), stats2


def mean_over_ranks(loss: Any, device: torch.device) -> float | None:
    """The closure's loss as a float, averaged over ranks (None if the closure returned None). Reduced on the
    layers' device, which the backend supports (NCCL has no CPU tensors)."""
    if loss is None:
        return None
    t = torch.as_tensor(loss).detach().to(device=device, dtype=torch.float64).sum().reshape(1)
    if is_distributed():
        all_reduce_sum_([t])
        t /= world_size()
    return float(t)


def second_pass(
    closure: Callable[[], Any], now: list[LayerMeans], params: list[nn.Parameter], adapters: list[LayerAdapter],
    capture: Capture,
) -> tuple[Any, float | None, list[LayerMeans] | None]:
    """Re-evaluate the same batch at θ⁺. Returns the closure's loss, its value averaged over ranks (None if
    the closure returned None) and the second pass's means (None if the loss or a ``ḡ`` is not finite). A
    layer that had rows in the first pass must have them in the second."""
    dev = now[0].h_rows.device
    expect = [r > 0 for r in torch.stack([m.h_rows.reshape(()).to(dev) for m in now]).tolist()]
    loss, value, stats2 = run_closure(closure, params, adapters, capture, record=True)
    try:
        loss_ok = value is None or math.isfinite(value)  # the same verdict on every rank
        plus = reduce_statistics(adapters, stats2, False, "second pass (closure)", expect) if loss_ok else None
    finally:
        capture.reset("second")
    if plus is not None and not all_finite(*(m.g for m in plus)):
        plus = None
    return loss, value, plus


def add_to_layers(
    adapters: list[LayerAdapter], directions: list[Tensor | None], lrs: list[float], factor: float
) -> None:
    """``W̄ ← W̄ + factor · α · D`` for every active layer (α: the layer's lr), one multi-tensor add per step
    size; a layer without a direction, and a bias without a gradient, are left alone. Under FSDP2 ``D`` is
    whole on every rank and each rank adds its shard's rows."""
    by_alpha: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for ad, D, lr in zip(adapters, directions, lrs):
        if D is None:
            continue
        targets, updates = by_alpha.setdefault(lr * factor, ([], []))
        w, b = ad.from_matrix(D)
        bias = ad.bias if b is not None else None
        pairs: list[tuple[nn.Parameter, Tensor]] = [(ad.weight, w)]
        if b is not None and bias is not None and bias.grad is not None:
            pairs.append((bias, b))
        for p, whole_update in pairs:  # an FSDP2 parameter takes the rows of its shard
            target, update = local_part(p, whole_update)
            targets.append(target)
            updates.append(cast(update, p.dtype))
    for alpha, (targets, updates) in by_alpha.items():
        torch._foreach_add_(targets, updates, alpha=alpha)
