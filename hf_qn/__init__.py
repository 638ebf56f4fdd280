"""hf_qn: stochastic quasi-Newton optimizers (K-BFGS, K-BFGS(L), mL-BFGS) for the Hugging Face stack.

``import hf_qn`` imports torch only. The Trainer integration (``QNTrainer``, ``QNTrainingArguments``)
imports transformers on first access.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .adapters import LayerPolicy, assign_layers, register_adapter
from .capture import Capture

try:
    __version__ = version("hf-qn")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

# name -> module, imported lazily on first attribute access (PEP 562).
_LAZY = {
    "KBFGS": "hf_qn.optim.kbfgs",
    "KBFGSL": "hf_qn.optim.kbfgs",
    "MLBFGS": "hf_qn.optim.mlbfgs",
    "KBFGSFactory": "hf_qn.optim.factories",
    "MLBFGSFactory": "hf_qn.optim.factories",
    "QNTrainer": "hf_qn.integrations.trainer",
    "QNTrainingArguments": "hf_qn.integrations.trainer",
}

__all__ = ["Capture", "LayerPolicy", "__version__", "assign_layers", "register_adapter", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_qn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
