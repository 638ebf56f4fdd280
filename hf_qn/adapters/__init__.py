"""Layer adapters: the only code in hf_qn that knows how a module stores its weight."""

from __future__ import annotations

from .base import LayerAdapter, UnsupportedLayer
from .conv2d import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .linear import Conv1DAdapter, LinearAdapter
from .registry import (
    FallbackParam,
    LayerAssignment,
    LayerPolicy,
    adapter_class_for,
    assign_layers,
    register_adapter,
)

__all__ = [
    "Conv1DAdapter",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "FallbackParam",
    "LayerAdapter",
    "LayerAssignment",
    "LayerPolicy",
    "LinearAdapter",
    "UnsupportedLayer",
    "adapter_class_for",
    "assign_layers",
    "register_adapter",
]
