"""Safeguards composed around K-BFGS's step (none of them is in the paper), and its curvature schedule.

Each is a small object with its own state (tensors and primitives, saved under ``"hf_qn"`` in the
optimizer's state dict) and one call site in :meth:`hf_qn.KBFGS.step`:

* :class:`CurvatureSchedule`: which steps update curvature (every ``update_interval``-th, every step of
  the warm-up, and a step the growth guard asks for);
* :class:`KLClip`: ``ν = min(1, √(κ / (α² Σ⟨D, ĝ⟩)))`` (kfac-pytorch's KL clipping);
* :class:`StepBackoff`: a step-size factor halved when the loss guard undoes a step, grown back by 1.25x;
* :class:`GrowthGuard`: no layer's step may exceed ``max_update_growth`` times its size at the last kept
  curvature step (with ``update_interval > 1``);
* :class:`LossGuard`: a same-batch curvature step after which the batch's loss rose by more than
  ``max_loss_increase`` of it is undone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["CurvatureSchedule", "GrowthGuard", "KLClip", "LossGuard", "StepBackoff"]

logger = logging.getLogger(__name__)


def _bump(state: dict[str, Any], key: str) -> None:
    state[key] += 1


class CurvatureSchedule:
    """Steps that update curvature: ``t < warmup`` or ``t % interval == 0`` (``t`` counts finished steps),
    or the step after one whose growth guard fired (``refresh_next``).

    State: ``step`` (int64), ``refresh_next`` (bool)."""

    def __init__(self, interval: int, warmup: int) -> None:
        self.interval = interval
        self.warmup = warmup
        self.state: dict[str, Any] = {"step": torch.tensor(0, dtype=torch.int64), "refresh_next": torch.tensor(False)}

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def due(self) -> bool:
        """Whether the next step updates curvature."""
        t = self.step
        return bool(self.state["refresh_next"]) or t < self.warmup or t % self.interval == 0

    def refresh_next(self, value: bool) -> None:
        self.state["refresh_next"] = torch.tensor(value)

    def advance(self) -> None:
        self.state["step"] += 1


class KLClip:
    """``ν = min(1, √(κ / (α² Σ⟨D, ĝ⟩)))`` when ``kl_clip`` = κ is set, else 1 (kfac-pytorch's KL clip)."""

    def __init__(self, kl_clip: float | None) -> None:
        self.kl_clip = kl_clip

    @property
    def enabled(self) -> bool:
        return self.kl_clip is not None

    def scale(self, directions: list[Tensor], momenta: list[Tensor], lrs: list[float]) -> float:
        if self.kl_clip is None:
            return 1.0
        total = 0.0
        for D, m, lr in zip(directions, momenta, lrs):
            total += lr * lr * float((D.double() * m.double()).sum())
        if total <= 0:
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / total))


class StepBackoff:
    """A step-size factor in (0, 1]: halved when the loss guard undoes a step, grown by 1.25x (up to 1) with
    every accepted same-batch curvature step. State: ``factor`` (float32)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"factor": torch.tensor(1.0, dtype=torch.float32)}

    @property
    def factor(self) -> float:
        return float(self.state["factor"])

    def shrink(self) -> None:
        self.state["factor"] = torch.tensor(0.5 * self.factor, dtype=torch.float32)

    def grow(self) -> None:
        self.state["factor"] = torch.tensor(min(1.0, 1.25 * self.factor), dtype=torch.float32)


class GrowthGuard:
    """With ``update_interval > 1``: if a layer's step ``‖ν α D‖`` would exceed ``max_growth`` times its size
    at the last kept curvature step, scale the whole step down to that bound and ask for a curvature update
    at the next step. State: ``ref_step_sizes`` (float32, one per layer; 0 = none yet), ``steps_clipped``."""

    def __init__(self, max_growth: float | None, layers: int) -> None:
        self.max_growth = max_growth
        self.state: dict[str, Any] = {
            "ref_step_sizes": torch.zeros(layers, dtype=torch.float32),
            "steps_clipped": torch.tensor(0, dtype=torch.int64),
        }

    def limit(self, sizes: list[float], scale: float, schedule: CurvatureSchedule) -> float:
        """``scale``, shrunk so that no layer's step (``scale · sizes[i]``) outgrows its reference."""
        if self.max_growth is None:
            return scale
        ratio = 0.0
        for size, ref in zip(sizes, self.state["ref_step_sizes"].tolist()):
            if ref > 0:
                ratio = max(ratio, scale * size / ref)
        if ratio <= self.max_growth:
            return scale
        _bump(self.state, "steps_clipped")
        schedule.refresh_next(True)
        logger.debug("KBFGS: a layer's step was %.3gx its last curvature step's; scaled down to %gx", ratio,
                     self.max_growth)
        return scale * self.max_growth / ratio

    def remember(self, sizes: list[float], scale: float) -> None:
        """A kept curvature step's per-layer sizes are the references until the next one."""
        self.state["ref_step_sizes"] = torch.tensor([scale * s for s in sizes], dtype=torch.float32)


class LossGuard:
    """Undo a same-batch curvature step after which the batch's loss rose too much.

    Undone: a non-finite loss or gradient mean at θ⁺, or ``L(θ⁺) > L(θ) + max_increase·|L(θ)|``. ``L(θ)``
    costs a pass, so it is measured only when ``L(θ⁺)`` is above that bound for the running average ``r``
    of accepted losses in place of ``L(θ)``: a blow-up always is, an ordinary step rarely.

    State: ``loss_avg`` (float64, absent until a loss is accepted), ``loss_checks``, ``steps_rejected``."""

    def __init__(self, max_increase: float | None) -> None:
        self.max_increase = max_increase
        self.state: dict[str, Any] = {
            "loss_checks": torch.tensor(0, dtype=torch.int64),
            "steps_rejected": torch.tensor(0, dtype=torch.int64),
        }
        self.warned_no_loss = False

    def reason_to_undo(
        self, value: float | None, finite: bool, loss_before: Callable[[], float | None]
    ) -> str | None:
        """Why the step must be undone, or None. ``value``: the loss at θ⁺ (None if the closure returned
        None); ``finite``: the loss and the gradient means at θ⁺ are finite; ``loss_before``: measures
        ``L(θ)`` (the caller undoes the step to do so)."""
        if not finite:
            return "the loss or a gradient at the new point is not finite"
        tol = self.max_increase
        if tol is not None and value is None and not self.warned_no_loss:
            self.warned_no_loss = True
            import warnings

            warnings.warn(
                "KBFGS: the closure returned None, so the loss guard (max_loss_increase) cannot act; return the "
                "loss from the closure, or pass max_loss_increase=None to silence this",
                UserWarning,
                stacklevel=4,
            )
        if tol is None or value is None or "loss_avg" not in self.state:  # no accepted loss yet
            return None
        r = float(self.state["loss_avg"])
        if value <= r + tol * abs(r):
            return None
        before = loss_before()
        _bump(self.state, "loss_checks")
        if before is not None and value > before + tol * abs(before):
            return f"the loss of this batch rose from {before:.4g} to {value:.4g}"
        return None

    def reject(self) -> None:
        _bump(self.state, "steps_rejected")

    def accept(self, value: float | None) -> None:
        """r ← 0.9 r + 0.1 L(θ⁺) (the first accepted loss initialises it)."""
        if value is None:
            return
        r = value if "loss_avg" not in self.state else 0.9 * float(self.state["loss_avg"]) + 0.1 * value
        self.state["loss_avg"] = torch.tensor(r, dtype=torch.float64)
