"""Adapter for ``nn.Embedding``: a Linear map from one-hot inputs, so the input factor is diagonal.

With one-hot inputs ``e_t`` the layer is ``h = Wᵀ e_t`` where the weight ``(V, d)`` is the transposed
Linear weight, so the canonical matrix is ``weightᵀ`` of shape ``(d, V)``, there is no bias, and the
input-side factor ``E[e eᵀ]`` is ``diag(token frequencies)``, held as a length-``V`` vector.
Tokens equal to ``padding_idx`` get no gradient and are left out of the frequencies.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .base import LayerAdapter, UnsupportedLayer

__all__ = ["EmbeddingAdapter"]


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding`` with dense gradients; ``max_norm`` renormalisation is refused."""

    input_diagonal = True

    def __init__(self, module: nn.Module, name: str = "") -> None:
        super().__init__(module, name)
        assert isinstance(module, nn.Embedding)
        self.has_bias = False
        self.d_out = int(module.embedding_dim)
        self.d_in = int(module.num_embeddings)
        self.padding_idx = module.padding_idx

    @classmethod
    def check(cls, module: nn.Module) -> None:
        if not isinstance(module, nn.Embedding):
            raise UnsupportedLayer(f"not an nn.Embedding: {type(module).__name__}")
        if module.sparse:
            raise UnsupportedLayer(
                "sparse=True gradients are not supported; construct the Embedding with sparse=False"
            )
        if module.max_norm is not None:
            raise UnsupportedLayer("max_norm renormalises rows in forward (not a linear map)")

    @property
    def bias(self) -> nn.Parameter | None:
        return None

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        return weight.T

    def from_matrix(self, M: Tensor) -> tuple[Tensor, Tensor | None]:
        return M.T, None

    def input_rows(self, inputs: tuple[Any, ...], max_rows: int | None = None) -> Tensor:
        """The token ids ``(R,)``, all of them (counting them costs next to nothing, so ``max_rows`` is not
        applied); padding tokens are kept here and masked by :meth:`input_mask`."""
        return inputs[0].reshape(-1)

    def input_mask(self, rows: Tensor) -> Tensor | None:
        """Token ids other than ``padding_idx`` (which gets no gradient)."""
        if self.padding_idx is None:
            return None
        return rows != self.padding_idx

    def output_rows(self, output: Tensor) -> Tensor:
        return output.reshape(-1, output.shape[-1])
