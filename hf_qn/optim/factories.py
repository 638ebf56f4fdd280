"""Factories for ``Trainer(optimizer_cls_and_kwargs=(Factory, kwargs))``.

transformers 5.x treats a first element that is not a ``torch.optim.Optimizer`` subclass as a factory and
calls ``Factory()(model, **kwargs)``, so model-aware optimizers get the whole model (torch-only module).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..adapters import LayerPolicy
from .kbfgs import KBFGS, KBFGSL
from .mlbfgs import MLBFGS

__all__ = ["KBFGSFactory", "MLBFGSFactory"]


class KBFGSFactory:
    """For ``Trainer(optimizer_cls_and_kwargs=(hf_qn.KBFGSFactory, kwargs))``: the Trainer calls
    ``KBFGSFactory()(model, **kwargs)``. ``kwargs`` are K-BFGS's hyperparameters and, flat beside them or as
    ``policy=``, the fields of :class:`~hf_qn.LayerPolicy` (``{"lr": 3e-3, "exclude": ["lm_head"]}``). The plain
    Trainer gives no second pass: the default consecutive pairs need none; for the paper's same-batch pairs
    (``preset="paper"``) use ``QNTrainer``."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> KBFGS:
        fields, kwargs = LayerPolicy.split_kwargs(kwargs)
        if fields:
            if kwargs.get("policy") is not None:
                raise TypeError(f"Invalid kwargs: {sorted(fields)} given beside policy=; put them in the policy")
            kwargs["policy"] = LayerPolicy(**fields)
        history = kwargs.pop("history_size", None)
        if history is not None:
            return KBFGSL(model, history_size=history, **kwargs)
        return KBFGS(model, **kwargs)


class MLBFGSFactory:
    """For ``Trainer(optimizer_cls_and_kwargs=(hf_qn.MLBFGSFactory, kwargs))``: blocks follow the model."""

    def __call__(self, model: nn.Module, **kwargs: Any) -> MLBFGS:
        return MLBFGS(model, **kwargs)
