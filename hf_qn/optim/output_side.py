"""Output-side strategies of K-BFGS: how a layer's inverse factor ``H_g`` (``d_out × d_out``) is held,
applied and learned from its damped pairs ``(s, y)``.

* :class:`DenseBFGS` (K-BFGS): ``H_g`` as a dense matrix, updated by the inverse BFGS formula
  ``H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` (paper, eq. 6), as one rank-2 update per layer;
* :class:`LimitedBFGS` (K-BFGS(L)): ``H_g`` implied by the last ``history_size`` pairs (compact form), never
  formed;
* :class:`OneSided`: ``H_g = I``, for layers too wide for an output factor (a tied LM head over the
  vocabulary): the layer is preconditioned by its input factor alone, ``D = ĝ H_a``, and learns no pairs.

A strategy owns the ``"output"`` part of its layer's state. Pairs of the layers of one output width are
proposed together (:meth:`OutputSide.propose`, the rows of one matrix, so one set of kernels per width);
each layer then commits its own (:meth:`OutputSide.commit`). Adding a strategy (say a diagonal ``H_g`` for
layers too wide for a dense factor) means subclassing :class:`OutputSide` and naming it in
:func:`output_side_for`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..linalg import LBFGSHistory
from ..linalg.batched import bfgs_rank2_rows

__all__ = ["DenseBFGS", "LimitedBFGS", "OneSided", "OutputSide", "output_side_for"]


class OutputSide(ABC):
    """One layer's ``H_g``. ``state`` is the layer's ``"output"`` state dict (created by :meth:`init_state`)."""

    #: whether :meth:`propose` wants ``H y`` recomputed with the damped ``y`` (dense BFGS does).
    needs_damped_products: bool = False
    #: the keys of the state :meth:`init_state` makes.
    STATE_KEYS: tuple[str, ...] = ()
    #: whether the layer learns from ``(s, y)`` pairs (its pairs are not formed when it does not).
    learns: bool = True

    def __init__(self, name: str) -> None:
        self.name = name
        self.state: dict[str, Any] = {}

    def bind(self, state: dict[str, Any]) -> None:
        """Use ``state`` (the layer's ``"output"`` entry); anything kept from an earlier state is dropped."""
        self.state = state

    @property
    def dense_matrix(self) -> Tensor | None:
        """``H_g`` itself when it is held as a matrix (then the direction is one fused product), else None."""
        return None

    @abstractmethod
    def init_state(self, d_out: int, device: torch.device) -> dict[str, Any]:
        """Fresh state: ``H_g = I``."""

    @abstractmethod
    def apply(self, X: Tensor) -> Tensor:
        """``H_g X`` (``X``: ``(d_out, k)`` or ``(d_out,)``)."""

    @staticmethod
    @abstractmethod
    def propose(
        sides: list[OutputSide], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, ok: Tensor
    ) -> tuple[Tensor, Any]:
        """For the layers ``sides`` (rows of ``s``, ``y``, their ``H y`` and ``sᵀy``, the mask ``ok`` of pairs
        that passed the curvature test): the mask of updates to keep and what :meth:`commit` needs."""

    @abstractmethod
    def commit(self, k: int, s: Tensor, y: Tensor, proposal: Any) -> None:
        """Take row ``k`` of a kept proposal."""


class DenseBFGS(OutputSide):
    """K-BFGS: a dense ``H_g`` (state ``{"H_g"}``), one inverse-BFGS rank-2 update per kept pair."""

    needs_damped_products = True
    STATE_KEYS = ("H_g",)

    def init_state(self, d_out: int, device: torch.device) -> dict[str, Any]:
        return {"H_g": torch.eye(d_out, dtype=torch.float32, device=device)}

    def apply(self, X: Tensor) -> Tensor:
        return self.state["H_g"] @ X

    @property
    def dense_matrix(self) -> Tensor | None:
        return self.state["H_g"]

    @staticmethod
    def propose(
        sides: list[OutputSide], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, ok: Tensor
    ) -> tuple[Tensor, Any]:
        new, finite = rank2_updates([side.state["H_g"] for side in sides], s, y, Hy, sy)
        return ok & finite, new

    def commit(self, k: int, s: Tensor, y: Tensor, proposal: Any) -> None:
        self.state["H_g"] = proposal[k]  # a fresh tensor already: rebinding saves a full copy of the factor


class LimitedBFGS(OutputSide):
    """K-BFGS(L): ``H_g`` from the last ``history_size`` pairs (state: the history's ``S, Y, SY, YY, count,
    head``), applied in compact form with float64 products. The compact form's middle matrix depends on
    the history alone: it is kept from one push (or load) to the next, since a step applies it once or
    twice and pushes at most once."""

    STATE_KEYS = ("S", "Y", "SY", "YY", "count", "head")

    def __init__(self, name: str, history_size: int) -> None:
        super().__init__(name)
        self.history_size = history_size
        self._middle: Any = None

    def bind(self, state: dict[str, Any]) -> None:
        super().bind(state)
        self._middle = None

    def init_state(self, d_out: int, device: torch.device) -> dict[str, Any]:
        return LBFGSHistory(self.history_size, d_out, gamma=1.0, device=device).state_dict()

    def history(self) -> LBFGSHistory:
        # The compact form's products lose too much in float32 over ~20 ill-conditioned pairs (measured:
        # K-BFGS(L) left K-BFGS after 20 steps and diverged on the autoencoder); the history is only
        # p x d_out, so compute in float64 while storing float32.
        return LBFGSHistory.from_state(self.state, gamma=1.0, compute_dtype=torch.float64)

    def apply(self, X: Tensor) -> Tensor:
        hist = self.history()
        if self._middle is None:
            self._middle = hist.middle()
        return hist.apply(X, middle=self._middle)

    @staticmethod
    def propose(
        sides: list[OutputSide], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, ok: Tensor
    ) -> tuple[Tensor, Any]:
        return ok, None

    def commit(self, k: int, s: Tensor, y: Tensor, proposal: Any) -> None:
        hist = self.history()
        hist.push(s, y)
        self.state.update(hist.state_dict())
        self._middle = None


class OneSided(OutputSide):
    """``H_g = I``: no output-side state, no pairs; the direction is ``ĝ H_a``."""

    learns = False

    def init_state(self, d_out: int, device: torch.device) -> dict[str, Any]:
        return {}

    def apply(self, X: Tensor) -> Tensor:
        return X

    @staticmethod
    def propose(
        sides: list[OutputSide], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, ok: Tensor
    ) -> tuple[Tensor, Any]:
        return torch.zeros_like(ok), None

    def commit(self, k: int, s: Tensor, y: Tensor, proposal: Any) -> None:
        raise AssertionError("a one-sided layer takes no pair")


def output_side_for(name: str, history_size: int | None, one_sided: bool = False) -> OutputSide:
    """The strategy a layer gets: none (``one_sided``, for a layer the policy marks too wide), dense BFGS, or
    L-BFGS with ``history_size`` pairs."""
    if one_sided:
        return OneSided(name)
    return DenseBFGS(name) if history_size is None else LimitedBFGS(name, history_size)


def rank2_updates(Hs: list[Tensor], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor) -> tuple[list[Tensor], Tensor]:
    """The inverse-BFGS updates of a group of factors (rows of ``s``, ``y``, ``Hy``), each a new tensor, and
    a mask of those that came out finite. The new factors of a group all exist until the caller has read the
    masks: at most one extra copy of the group's factors, after the backward has freed the activations
    (GPT-2 small's peak memory did not change)."""
    U, V = bfgs_rank2_rows(s, y, Hy, sy, Hs[0].dtype)
    new = [torch.addmm(H, u, v) for H, u, v in zip(Hs, U, V)]
    return new, torch.isfinite(torch.stack([H.sum() for H in new]))
