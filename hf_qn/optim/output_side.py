"""Output-side strategies of K-BFGS: how a layer's inverse factor ``H_g`` (``d_out × d_out``) is held,
applied and learned from its damped pairs ``(s, y)``.

* :class:`DenseBFGS` (K-BFGS): ``H_g`` as a dense matrix, updated by the inverse BFGS formula
  ``H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` (paper, eq. 6), as one rank-2 update per layer; or, for a
  layer wider than ``max_block_dim``, as equal diagonal blocks, each updated from its part of the pair;
* :class:`LimitedBFGS` (K-BFGS(L)): ``H_g`` implied by the last ``history_size`` pairs (compact form), never
  formed;
* :class:`KFACOutput` (``output_side="kfac"``): K-FAC's output factor instead of BFGS's,
  ``H_g = (Ĝ + √λ I)⁻¹`` with ``G`` the running average of the output gradients' second moment ``E[g gᵀ]`` over
  rows (tokens) and ``Ĝ = G / (tr G / d_out)`` (unit mean eigenvalue, so that ``√λ`` damps it as it damps ``A``),
  re-inverted at every curvature step before the direction; it learns no pairs;
* :class:`OneSided`: ``H_g = I``, for layers too wide for an output factor (a tied LM head over the
  vocabulary): the layer is preconditioned by its input factor alone, ``D = ĝ H_a``, and learns no pairs.

A strategy owns the ``"output"`` part of its layer's state. Those that learn from pairs are
:class:`PairLearner` s: a layer's pair is cut into the rows of its ``split`` (one row of ``d_out``, or one per
diagonal block: each block is damped, tested and updated as a pair of its own). The rows of the layers of one
split are proposed together (:meth:`PairLearner.propose`, one matrix, so one set of kernels per width); each
layer then commits its own (:meth:`PairLearner.commit`). :class:`HeldMatrix` is the storage the dense BFGS and
K-FAC factors share (a matrix, or its diagonal blocks). Adding a strategy (say a diagonal ``H_g`` for layers too
wide for a dense factor) means subclassing :class:`OutputSide` (or :class:`PairLearner`) and naming it in
:func:`output_side_for`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ..linalg import LBFGSHistory, damped_cholesky_inverse, finite_flags
from ..linalg.batched import bfgs_rank2_rows
from ..linalg.blocks import BlockSplit, block_left, matvec_rows
from ._base import group_indices

__all__ = ["DenseBFGS", "HeldMatrix", "KFACOutput", "LimitedBFGS", "OneSided", "OutputSide", "PairLearner",
           "inverse_phases", "output_side_for", "refresh_kfac_factors"]


class OutputSide(ABC):
    """One layer's ``H_g``. ``state`` is the layer's ``"output"`` state dict (created by :meth:`init_state`)."""

    #: the keys of the state :meth:`init_state` makes.
    STATE_KEYS: tuple[str, ...] = ()
    #: whether the capture takes the layer's output-gradient Gram ``Σ g gᵀ`` (cut by :attr:`split`) for it.
    needs_output_gram: bool = False

    def __init__(self, name: str, d_out: int) -> None:
        self.name = name
        self.d_out = d_out
        #: how the layer's pairs and output Gram are cut into rows: one row of ``d_out`` unless ``H_g`` is
        #: block-diagonal.
        self.split = BlockSplit.of(d_out, None)
        self.state: dict[str, Any] = {}

    def bind(self, state: dict[str, Any]) -> None:
        """Use ``state`` (the layer's ``"output"`` entry); anything kept from an earlier state is dropped."""
        self.state = state

    @property
    def dense_matrix(self) -> Tensor | None:
        """``H_g`` itself when it is held as a matrix (then the direction is one fused product), else None."""
        return None

    @abstractmethod
    def init_state(self, device: torch.device) -> dict[str, Any]:
        """Fresh state: ``H_g = I``."""

    @abstractmethod
    def apply(self, X: Tensor) -> Tensor:
        """``H_g X`` (``X``: ``(d_out, k)`` or ``(d_out,)``)."""

    def apply_rows(self, Y: Tensor) -> Tensor:
        """``H_g y`` for a vector given as the rows of ``split`` (``(blocks, size)``), as rows."""
        return self.split.rows(self.apply(self.split.unrows(Y)))


class PairLearner(OutputSide):
    """An ``H_g`` learned from the layer's damped pairs ``(s, y)`` (:func:`~hf_qn.optim.kbfgs_layer.update_output_sides`
    forms them only for these)."""

    #: whether :meth:`propose` wants ``H y`` recomputed with the damped ``y`` (dense BFGS does).
    needs_damped_products: bool = False

    @staticmethod
    @abstractmethod
    def propose(
        sides: list[PairLearner], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, ok: Tensor
    ) -> tuple[Tensor, Any]:
        """For the layers ``sides`` (their pairs' rows, in order: ``s``, ``y``, ``H y``, ``sᵀy`` and the mask
        ``ok`` of rows that passed the curvature test): the mask of rows to keep and what :meth:`commit` needs."""

    @abstractmethod
    def commit(self, k: int, kept: list[bool], s: Tensor, y: Tensor, proposal: Any) -> None:
        """Take what ``kept`` marks of layer ``k``'s part of a proposal (``s``, ``y``: that layer's rows)."""


class HeldMatrix(OutputSide):
    """An ``H_g`` held as a matrix in ``state["H_g"]``; wider than ``max_block_dim``, as its diagonal blocks
    (``(blocks, size, size)``)."""

    def __init__(self, name: str, d_out: int, max_block_dim: int | None = None) -> None:
        super().__init__(name, d_out)
        self.split = BlockSplit.of(d_out, max_block_dim)

    def apply(self, X: Tensor) -> Tensor:
        H = self.state["H_g"]
        return block_left(H, X) if H.dim() == 3 else H @ X

    def apply_rows(self, Y: Tensor) -> Tensor:
        return matvec_rows(self.state["H_g"], Y)  # the rows' own shape: no unpadding and padding again

    @property
    def dense_matrix(self) -> Tensor | None:
        H: Tensor = self.state["H_g"]
        return H if H.dim() == 2 else None


class DenseBFGS(PairLearner, HeldMatrix):
    """K-BFGS: a dense ``H_g`` (state ``{"H_g"}``), one inverse-BFGS rank-2 update per kept pair; wider than
    ``max_block_dim``, its diagonal blocks, one update per block and pair."""

    needs_damped_products = True
    STATE_KEYS: tuple[str, ...] = ("H_g",)

    def init_state(self, device: torch.device) -> dict[str, Any]:
        return {"H_g": self.split.identity(torch.float32, device)}

    @staticmethod
    def propose(
        sides: list[PairLearner], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, ok: Tensor
    ) -> tuple[Tensor, Any]:
        new, finite = rank2_updates([side.state["H_g"] for side in sides], s, y, Hy, sy)
        return ok & finite, new

    def commit(self, k: int, kept: list[bool], s: Tensor, y: Tensor, proposal: Any) -> None:
        # a fresh tensor already: rebinding saves a full copy of the factor
        self.state["H_g"] = keep_blocks(proposal[k], self.state["H_g"], kept)


class LimitedBFGS(PairLearner):
    """K-BFGS(L): ``H_g`` from the last ``history_size`` pairs (state: the history's ``S, Y, SY, YY, count,
    head``), applied in compact form with float64 products. The compact form's middle matrix depends on
    the history alone: it is kept from one push (or load) to the next, since a step applies it once or
    twice and pushes at most once."""

    STATE_KEYS = ("S", "Y", "SY", "YY", "count", "head")

    def __init__(self, name: str, d_out: int, history_size: int) -> None:
        super().__init__(name, d_out)
        self.history_size = history_size
        self._middle: Any = None

    def bind(self, state: dict[str, Any]) -> None:
        super().bind(state)
        self._middle = None

    def init_state(self, device: torch.device) -> dict[str, Any]:
        return LBFGSHistory(self.history_size, self.d_out, gamma=1.0, device=device).state_dict()

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
        sides: list[PairLearner], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor, ok: Tensor
    ) -> tuple[Tensor, Any]:
        return ok, None

    def commit(self, k: int, kept: list[bool], s: Tensor, y: Tensor, proposal: Any) -> None:
        hist = self.history()
        hist.push(s[0], y[0])  # one row: the history is never blocked
        self.state.update(hist.state_dict())
        self._middle = None


class KFACOutput(HeldMatrix):
    """K-FAC's output factor (state ``{"G", "H_g", "batches"}``): ``G`` is the plain average of the first batch's
    ``E[g gᵀ]`` and then its running average with ``factor_decay`` (as ``A`` is), and ``H_g = (Ĝ + √λ I)⁻¹``,
    ``Ĝ = G / (tr G / d_out)``, is re-inverted exactly at every curvature step, or every ``output_inverse_interval``-th
    (:func:`refresh_kfac_factors`).
    Held and applied as dense BFGS holds its ``H_g`` (block-diagonal above ``max_block_dim``: the diagonal
    blocks of ``G``, each inverted alone); it forms no pairs."""

    STATE_KEYS = ("G", "H_g", "batches")
    needs_output_gram = True

    def init_state(self, device: torch.device) -> dict[str, Any]:
        return {"G": torch.zeros(self.split.factor_shape, dtype=torch.float32, device=device),
                "H_g": self.split.identity(torch.float32, device), "batches": torch.tensor(0, dtype=torch.int64)}


def accumulate_(
    sides: list[KFACOutput], G_batches: list[Tensor], take: list[bool], seen: list[int], decay: float
) -> None:
    """Each side whose ``take`` is set: ``G ← G_batch`` on its first batch (``seen``: the batches each side has taken),
    then ``G ← β G + (1 − β) G_batch``; with multi-tensor kernels, each entry computed as
    ``G.mul_(β).add_(G_batch, alpha=1 − β)`` computes it."""
    taken = [(side, G_b, n) for side, G_b, ok, n in zip(sides, G_batches, take, seen) if ok]
    if not taken:
        return
    first = [(side.state["G"], G_b) for side, G_b, n in taken if n == 0]
    later = [(side.state["G"], G_b) for side, G_b, n in taken if n > 0]
    if first:
        torch._foreach_copy_([G for G, _ in first], [G_b for _, G_b in first])
    if later:
        torch._foreach_mul_([G for G, _ in later], decay)
        torch._foreach_add_([G for G, _ in later], [G_b for _, G_b in later], alpha=1.0 - decay)
    torch._foreach_add_([side.state["batches"] for side, _, _ in taken], 1)


def inverse_phases(sides: list[OutputSide]) -> list[int]:
    """Each side's position among the K-FAC sides of its factor shape, in order (0 for any other side): the phase
    that staggers its re-inversions under ``output_inverse_interval``. Staggered within each shape, every curvature
    step inverts about the same share of each batched Cholesky (a transformer's layers repeat in blocks of an even
    number of kinds, so staggering by layer index would put every wide factor on the same steps)."""
    phases = [0] * len(sides)
    kfac = [i for i, side in enumerate(sides) if isinstance(side, KFACOutput)]
    for idx in group_indices(kfac, key=lambda i: tuple(sides[i].split.factor_shape)):
        for phase, j in enumerate(idx):
            phases[kfac[j]] = phase
    return phases


def refresh_kfac_factors(
    sides: list[KFACOutput], G_batches: list[Tensor], decay: float, sqrt_lam: float, interval: int = 1,
    phases: list[int] | None = None,
) -> list[bool]:
    """Each side's ``G`` takes its batch's ``G_batch`` where that is finite (one host sync for all), and a side
    that has seen a batch gets ``H_g = (Ĝ + √λ I)⁻¹`` anew when it is due: after each of its first ``interval``
    batches, then after every ``interval``-th, staggered by its ``phase`` (:func:`inverse_phases`) so that each
    curvature step re-inverts about ``1 / interval`` of the factors of each shape. The factors of one shape are
    inverted in one batched Cholesky call (per device). Returns, per side, whether its batch was taken."""
    if not sides:
        return []
    finite = finite_flags(G_batches).tolist()  # a sum each: no d x d mask
    seen = torch.stack([side.state["batches"] for side in sides]).tolist()  # CPU counters: no sync
    accumulate_(sides, G_batches, finite, seen, decay)
    counts = [n + int(ok) for n, ok in zip(seen, finite)]  # batches taken, this one included
    phases = phases if phases is not None else [0] * len(sides)
    ready = [side for side, n, phase in zip(sides, counts, phases)
             if n > 0 and (n <= interval or (n + phase) % interval == 0)]
    # by shape and device (a model split over devices)
    for idx in group_indices(ready, key=lambda side: (*side.state["G"].shape, side.state["G"].device)):
        group = [ready[i] for i in idx]
        G = torch.stack([side.state["G"] for side in group])  # (layers, d, d) or (layers, blocks, size, size)
        dims = {side.d_out for side in group}  # one width (no copy to the device), or blocked factors of several
        divisor = dims.pop() if len(dims) == 1 else G.new_tensor([side.d_out for side in group])
        mean_eig = G.diagonal(dim1=-2, dim2=-1).flatten(1).sum(1) / divisor
        tiny = torch.finfo(G.dtype).tiny
        G = G / mean_eig.clamp_min(tiny).reshape(-1, *([1] * (G.dim() - 1)))
        # float32: Ĝ + √λ I has eigenvalues in [√λ, d_out + √λ], so its condition number is at most ~d_out / √λ
        H = damped_cholesky_inverse(G, sqrt_lam, torch.float32)  # batched over every leading dimension
        for side, H_k in zip(group, H.unbind(0)):
            side.state["H_g"] = H_k.clone()
    return [bool(ok) for ok in finite]


class OneSided(OutputSide):
    """``H_g = I``: no output-side state, no pairs; the direction is ``ĝ H_a``."""

    def init_state(self, device: torch.device) -> dict[str, Any]:
        return {}

    def apply(self, X: Tensor) -> Tensor:
        return X


def output_side_for(
    name: str, d_out: int, history_size: int | None, one_sided: bool = False, max_block_dim: int | None = None,
    kind: str = "bfgs",
) -> OutputSide:
    """The strategy a layer gets: none (``one_sided``, for a layer the policy marks too wide), K-FAC's factor
    (``kind="kfac"``), dense BFGS (both block-diagonal above ``max_block_dim``), or L-BFGS with ``history_size``
    pairs."""
    if one_sided:
        return OneSided(name, d_out)
    if kind == "kfac":
        return KFACOutput(name, d_out, max_block_dim)
    if history_size is None:
        return DenseBFGS(name, d_out, max_block_dim)
    return LimitedBFGS(name, d_out, history_size)


def rank2_updates(Hs: list[Tensor], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor) -> tuple[list[Tensor], Tensor]:
    """The inverse-BFGS updates of a group of factors, each a new tensor, and a mask of the rows that came out
    finite. A 2-D factor takes one row of ``s``, ``y``, ``Hy``; a block-diagonal one (``(n, b, b)``) takes ``n``
    rows, one per block, in order. The new factors of a group all exist until the caller has read the masks:
    at most one extra copy of the group's factors, after the backward has freed the activations (GPT-2 small's
    peak memory did not change)."""
    U, V = bfgs_rank2_rows(s, y, Hy, sy, Hs[0].dtype)
    if all(H.dim() == 2 for H in Hs):  # a row each: one view per row, one sum per factor
        new = [torch.addmm(H, u, v) for H, u, v in zip(Hs, U.unbind(), V.unbind())]
        return new, torch.isfinite(torch.stack([H.sum() for H in new]))
    new, sums, row = [], [], 0
    for H in Hs:
        if H.dim() == 2:
            new.append(torch.addmm(H, U[row], V[row]))
            sums.append(new[-1].sum().reshape(1))
            row += 1
        else:
            n = H.shape[0]
            new.append(torch.baddbmm(H, U[row : row + n], V[row : row + n]))
            sums.append(new[-1].sum((1, 2)))
            row += n
    return new, torch.isfinite(torch.cat(sums))


def keep_blocks(new: Tensor, old: Tensor, kept: list[bool]) -> Tensor:
    """``new`` where ``kept`` (one flag per block of a block-diagonal factor, or one for a 2-D one), ``old``'s
    blocks elsewhere; ``new`` is a fresh tensor and is written in place."""
    if all(kept):
        return new
    if new.dim() == 2:
        return old
    rejected = [j for j, k in enumerate(kept) if not k]
    new[rejected] = old[rejected]
    return new
