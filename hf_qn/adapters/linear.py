"""Adapters for ``nn.Linear`` and transformers' ``Conv1D`` (same map, weight stored transposed)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import LayerAdapter

__all__ = ["Conv1DAdapter", "LinearAdapter"]


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: ``h = W a + b`` with ``W`` of shape ``(out, in)``; any leading dims are rows."""

    def __init__(self, module: nn.Module, name: str = "") -> None:
        super().__init__(module, name)
        out_f, in_f = self.weight.shape
        self.has_bias = self.bias is not None
        self.d_out, self.d_in = int(out_f), int(in_f) + int(self.has_bias)

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        if bias is None:
            return weight
        return _cat_bias(weight, bias)

    def from_matrix(self, M: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.has_bias:
            return M, None
        return M[:, :-1], M[:, -1]

    def input_rows(self, inputs: tuple[Any, ...], max_rows: int | None = None) -> Tensor:
        x = inputs[0]
        return self._homogeneous(x.reshape(-1, x.shape[-1]), max_rows)

    def output_rows(self, output: Tensor) -> Tensor:
        return output.reshape(-1, output.shape[-1])


class Conv1DAdapter(LinearAdapter):
    """transformers' ``Conv1D`` (GPT-2): ``h = a W + b`` with ``W`` of shape ``(in, out)``.

    Identical to :class:`LinearAdapter` with the weight transposed; the bias is always present.
    """

    def __init__(self, module: nn.Module, name: str = "") -> None:
        LayerAdapter.__init__(self, module, name)
        in_f, out_f = self.weight.shape
        self.has_bias = self.bias is not None
        self.d_out, self.d_in = int(out_f), int(in_f) + int(self.has_bias)

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super().to_matrix(weight.T, bias)

    def from_matrix(self, M: Tensor) -> tuple[Tensor, Tensor | None]:
        w, b = super().from_matrix(M)
        return w.T, b


def _cat_bias(weight: Tensor, bias: Tensor) -> Tensor:
    import torch

    return torch.cat([weight, bias.reshape(-1, 1)], dim=1)
