"""The layer-adapter interface: one module's gradient in the canonical ``(d_out, d_in [+1])`` layout.

An adapter is the only code that knows how a module stores its weight. It

* presents the layer's gradient as a ``(d_out, d_in)`` matrix, the bias (if any) folded in as a last,
  homogeneous column (Goldfarb, Ren & Bahamou 2020, section 2; ``d_in`` counts that column);
* turns the module's forward input into rows of homogeneous inputs ``ā`` (``(R, d_in)``; for an
  Embedding, token ids, since its input factor is diagonal) and its output into rows of
  pre-activations ``h`` (``(R, d_out)``), one row per sample, token or spatial position;
* writes a direction given in the canonical layout back in the parameters' own shapes.

Curvature code only ever sees canonical matrices; adapters never see damping, histories or ranks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.shards import whole

__all__ = ["LayerAdapter", "UnsupportedLayer", "evenly_strided"]


def evenly_strided(rows: Tensor, max_rows: int | None) -> Tensor:
    """At most ``max_rows`` of ``rows``, evenly strided (every ``ceil(R / max_rows)``-th, a view); all of them for
    None."""
    if max_rows is not None and rows.shape[0] > max_rows:
        return rows[:: -(-rows.shape[0] // max_rows)]
    return rows


class UnsupportedLayer(Exception):
    """Raised by an adapter's ``check`` for a module configuration it cannot represent."""


class LayerAdapter(ABC):
    """Base class; subclasses set ``d_out``, ``d_in`` and ``has_bias`` in ``__init__``.

    Args:
        module: the layer.
        name: its qualified name in the model (for reports and state keys).
    """

    #: True when the input-side factor is diagonal (held as a vector): Embedding.
    input_diagonal: bool = False

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self.check(module)
        self.module = module
        self.name = name
        #: preconditioned by its input factor alone (set by ``assign_layers`` for a layer too wide for an
        #: output factor, e.g. a tied LM head over the vocabulary).
        self.one_sided = False
        #: the Embedding whose weight this layer shares, if any (a tied LM head).
        self.tied_with: str | None = None
        self.d_out: int = 0
        self.d_in: int = 0
        self.has_bias: bool = False
        #: the FSDP2-sharded weight, set by the optimizer: during forward and backward FSDP2 puts an unsharded
        #: copy in ``module.weight``, whose gradient it frees after each backward.
        self.sharded_weight: nn.Parameter | None = None

    # ----------------------------------------------------------------- structure
    @classmethod
    def check(cls, module: nn.Module) -> None:
        """Raise :class:`UnsupportedLayer` (with the reason) if this module cannot be adapted."""
        return None

    # The module's parameters are read from its ``_parameters`` (where FSDP2 also swaps its sharded and unsharded
    # ones): ``module.weight`` goes through ``nn.Module.__getattr__``, and the optimizers ask for every layer's
    # parameters several times a step.
    @property
    def weight(self) -> nn.Parameter:
        w = self.module._parameters.get("weight")
        assert isinstance(w, nn.Parameter)
        return w

    @property
    def bias(self) -> nn.Parameter | None:
        b = self.module._parameters.get("bias")
        return b if isinstance(b, nn.Parameter) else None

    def gradient_pending(self) -> bool:
        """Whether the weight holds a gradient (of a backward since the last ``zero_grad``); under FSDP2 that of
        the sharded weight, the one the optimizer sees."""
        return (self.sharded_weight if self.sharded_weight is not None else self.weight).grad is not None

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this adapter covers, weight first."""
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    # ----------------------------------------------------------------- matrices
    @abstractmethod
    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Map weight-shaped and bias-shaped tensors to the canonical ``(d_out, d_in)`` matrix."""

    @abstractmethod
    def from_matrix(self, M: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`to_matrix`: views/copies shaped like the weight and the bias."""

    def grad_parts(self) -> tuple[Tensor, Tensor | None]:
        """The gradients of the weight and the bias (None without a bias), whole (an FSDP2-sharded gradient is
        all-gathered) and dense; zeros for a parameter whose ``.grad`` is None."""
        w = self.weight
        gw = w.grad if w.grad is not None else torch.zeros_like(w)
        if gw.is_sparse:
            raise ValueError(
                f"Layer {self.name!r} produced a sparse gradient; hf_qn needs dense gradients "
                "(construct the Embedding with sparse=False)"
            )
        gb = None
        if self.bias is not None:
            b = self.bias
            gb = b.grad if b.grad is not None else torch.zeros_like(b)
        return whole(gw), None if gb is None else whole(gb)

    def param_parts(self) -> tuple[Tensor, Tensor | None]:
        """The weight and the bias (None without one), detached and whole."""
        return whole(self.weight.detach()), None if self.bias is None else whole(self.bias.detach())

    def grad_matrix(self) -> Tensor:
        """The gradient in canonical layout (:meth:`grad_parts` joined)."""
        return self.to_matrix(*self.grad_parts())

    def param_matrix(self) -> Tensor:
        """The current parameters in canonical layout."""
        return self.to_matrix(*self.param_parts())

    # ----------------------------------------------------------------- captured rows
    @abstractmethod
    def input_rows(self, inputs: tuple[Any, ...], max_rows: int | None = None) -> Tensor:
        """Homogeneous input rows ``ā`` ``(R, d_in)`` (for a diagonal layer: the ``(R,)`` indices); with
        ``max_rows``, at most that many of them, evenly strided (:func:`evenly_strided`)."""

    def input_mask(self, rows: Tensor) -> Tensor | None:
        """Which input rows count for the input-side factor (None: all); Embedding drops padding tokens."""
        return None

    @abstractmethod
    def output_rows(self, output: Tensor) -> Tensor:
        """Pre-activation rows ``(R, d_out)``; also applied to the gradient of the output."""

    def output_group_size(self, output: Tensor) -> int:
        """How many rows of :meth:`output_rows` belong to one sample (1, or the spatial size)."""
        return 1

    def _homogeneous(self, rows: Tensor, max_rows: int | None) -> Tensor:
        """``rows`` (at most ``max_rows`` of them, evenly strided) with the homogeneous column appended if the layer
        has a bias. The rows are chosen first, so the copy the column takes covers those rows alone (on a
        transformer's full batch that copy had cost more than the Gram of the chosen rows)."""
        rows = evenly_strided(rows, max_rows)
        if not self.has_bias:
            return rows
        return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, d_out={self.d_out}, d_in={self.d_in})"
