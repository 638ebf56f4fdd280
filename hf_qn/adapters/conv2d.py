"""Adapter for ``nn.Conv2d`` via patch extraction (``F.unfold``).

A convolution is a Linear map applied to every spatial patch: the weight ``(out, in, kh, kw)`` viewed
as ``(out, in·kh·kw)`` multiplies the unfolded patch columns. Patches (one row per sample and output
position) are the input rows, so the input-side factor is the KFC expansion of Grosse & Martens
(2016); output rows are the per-position pre-activations, and each sample's ``H'·W'`` positions are
averaged for K-BFGS output-side pairs (Ren, Bahamou & Goldfarb 2021; ASDL's spatial mean).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import LayerAdapter, UnsupportedLayer

__all__ = ["Conv2dAdapter"]


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with ``groups == 1``, zero padding, any stride/dilation/rectangular kernel."""

    def __init__(self, module: nn.Module, name: str = "") -> None:
        super().__init__(module, name)
        assert isinstance(module, nn.Conv2d)
        self.has_bias = self.bias is not None
        out_c = module.out_channels
        self.d_out = int(out_c)
        self.d_in = int(module.in_channels * module.kernel_size[0] * module.kernel_size[1]) + int(self.has_bias)
        self._padding = _resolve_padding(module)

    @classmethod
    def check(cls, module: nn.Module) -> None:
        if not isinstance(module, nn.Conv2d):
            raise UnsupportedLayer(f"not an nn.Conv2d: {type(module).__name__}")
        if module.groups != 1:
            raise UnsupportedLayer(f"groups={module.groups} (only groups=1 is adapted; sent to the fallback)")
        if module.padding_mode != "zeros":
            raise UnsupportedLayer(f"padding_mode={module.padding_mode!r} (only 'zeros' is adapted)")
        _resolve_padding(module)

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        W = weight.reshape(weight.shape[0], -1)
        if bias is None:
            return W
        import torch

        return torch.cat([W, bias.reshape(-1, 1)], dim=1)

    def from_matrix(self, M: Tensor) -> tuple[Tensor, Tensor | None]:
        shape = self.weight.shape
        if not self.has_bias:
            return M.reshape(shape), None
        return M[:, :-1].reshape(shape), M[:, -1]

    def input_rows(self, inputs: tuple[Any, ...], max_rows: int | None = None) -> Tensor:
        m = self.module
        assert isinstance(m, nn.Conv2d)
        x = inputs[0]
        if x.dim() == 3:  # unbatched (C, H, W)
            x = x.unsqueeze(0)
        cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=self._padding, stride=m.stride)
        return self._homogeneous(cols.transpose(1, 2).reshape(-1, cols.shape[1]), max_rows)  # (B * L, C*kh*kw)

    def output_rows(self, output: Tensor) -> Tensor:
        if output.dim() == 3:
            output = output.unsqueeze(0)
        return output.permute(0, 2, 3, 1).reshape(-1, output.shape[1])

    def output_group_size(self, output: Tensor) -> int:
        return int(output.shape[-1] * output.shape[-2])


def _resolve_padding(module: nn.Conv2d) -> tuple[int, int]:
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0)
        # 'same' with stride 1: total padding d*(k-1) per dim, symmetric only when even.
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise UnsupportedLayer("padding='same' with an asymmetric total padding")
        return (total[0] // 2, total[1] // 2)
    return (int(pad[0]), int(pad[1]))
