"""Which module gets which adapter, and where every other trainable parameter goes.

:func:`assign_layers` walks a model once and returns a :class:`LayerAssignment`: the adapted layers
and, for every other trainable parameter, the reason it goes to the first-order fallback. Every
trainable parameter appears exactly once (tied parameters are deduplicated by identity); frozen
parameters are listed and never touched. ``print(assignment.report())`` shows the result.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .base import LayerAdapter, UnsupportedLayer
from .conv2d import Conv2dAdapter
from .embedding import EmbeddingAdapter
from .linear import Conv1DAdapter, LinearAdapter

__all__ = [
    "FallbackParam",
    "LayerAssignment",
    "LayerPolicy",
    "adapter_class_for",
    "assign_layers",
    "register_adapter",
]

# Exact-type registry: a subclass of nn.Linear (e.g. MultiheadAttention's out_proj, whose weight
# is used functionally so hooks never fire) is *not* adapted unless registered explicitly.
_BY_TYPE: dict[type, type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.Embedding: EmbeddingAdapter,
}
# By qualified class name, so that transformers is never imported here.
_BY_NAME: dict[str, type[LayerAdapter]] = {
    "transformers.pytorch_utils.Conv1D": Conv1DAdapter,
}


def register_adapter(module_type: type | str, adapter: type[LayerAdapter]) -> None:
    """Register ``adapter`` for modules of exactly ``module_type`` (a class or ``"pkg.mod.Class"``)."""
    if not (isinstance(adapter, type) and issubclass(adapter, LayerAdapter)):
        raise TypeError(f"adapter must be a LayerAdapter subclass, got {adapter!r}")
    if isinstance(module_type, str):
        _BY_NAME[module_type] = adapter
    else:
        _BY_TYPE[module_type] = adapter


def adapter_class_for(module: nn.Module) -> type[LayerAdapter] | None:
    """The adapter registered for this module's exact type, if any."""
    t = type(module)
    if t in _BY_TYPE:
        return _BY_TYPE[t]
    return _BY_NAME.get(f"{t.__module__}.{t.__qualname__}")


@dataclass(frozen=True)
class LayerPolicy:
    """Which modules get an adapter.

    Args:
        include: regular expressions; when given, only modules whose qualified name matches one
            (``re.search``) are adapted. (default: all)
        exclude: regular expressions; matching modules are never adapted. (default: none)
        max_dim: largest dense factor dimension allowed (``d_out``, and ``d_in`` unless the input
            factor is diagonal); larger layers go to the fallback, so a 50k-vocabulary head never
            builds a 50k × 50k matrix. (default: 4096)
        adapt_embeddings: whether ``nn.Embedding`` layers are adapted. (default: True)
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_dim: int = 4096
    adapt_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.max_dim < 1:
            raise ValueError(f"Invalid max_dim: {self.max_dim} (must be >= 1)")
        for pat in (*self.include, *self.exclude):
            try:
                re.compile(pat)
            except re.error as err:
                raise ValueError(f"Invalid pattern {pat!r} in include/exclude: {err}") from None
        # Accept lists from users and JSON; keep the dataclass hashable.
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))


@dataclass(frozen=True)
class FallbackParam:
    """A parameter updated by the first-order fallback, and why."""

    name: str
    param: nn.Parameter
    reason: str


@dataclass
class LayerAssignment:
    """Result of :func:`assign_layers`."""

    adapters: list[LayerAdapter] = field(default_factory=list)
    fallback: list[FallbackParam] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    param_names: dict[int, str] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        # param_names is keyed by id(parameter): a copy keys it by its own parameters.
        state = dict(self.__dict__)
        params = self.adapted_parameters() + self.fallback_parameters()
        state["param_names"] = [(p, self.param_names[id(p)]) for p in params if id(p) in self.param_names]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state, param_names={id(p): n for p, n in state["param_names"]})
        self.__dict__.update(state)

    def adapted_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters for p in a.parameters()]

    def fallback_parameters(self) -> list[nn.Parameter]:
        return [f.param for f in self.fallback]

    def report(self) -> str:
        """A table a person can read: each layer or parameter, its treatment and sizes."""
        lines = [f"{'name':<48} {'treatment':<22} {'numel':>10}  detail"]
        for a in self.adapters:
            numel = sum(p.numel() for p in a.parameters())
            lines.append(
                f"{a.name:<48} {type(a).__name__:<22} {numel:>10}  d_out={a.d_out} d_in={a.d_in}"
                + (" (diagonal input factor)" if a.input_diagonal else "")
            )
        for f in self.fallback:
            lines.append(f"{f.name:<48} {'fallback':<22} {f.param.numel():>10}  {f.reason}")
        for name in self.frozen:
            lines.append(f"{name:<48} {'frozen now':<22} {'':>10}  skipped while it has no gradient")
        n_ad = sum(p.numel() for p in self.adapted_parameters())
        n_fb = sum(p.numel() for p in self.fallback_parameters())
        total = max(n_ad + n_fb, 1)
        lines.append(
            f"{len(self.adapters)} adapted layers ({n_ad} params, {100 * n_ad / total:.1f}%), "
            f"{len(self.fallback)} fallback parameters ({n_fb} params, {100 * n_fb / total:.1f}%), "
            f"{len(self.frozen)} frozen now (included, trained once unfrozen)"
        )
        return "\n".join(lines)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def assign_layers(model: nn.Module, policy: LayerPolicy | None = None) -> LayerAssignment:
    """Assign every parameter of ``model`` to exactly one adapter or to the fallback.

    Frozen parameters (``requires_grad=False``) are assigned too, as ``torch.optim`` optimizers built from
    ``model.parameters()`` hold them: the optimizers skip a parameter while it has no gradient, and it trains
    when it is unfrozen. A layer frozen in part goes to the fallback. ``frozen`` lists the parameters frozen
    at assignment time, for the report."""
    policy = policy or LayerPolicy()
    result = LayerAssignment()
    # Parameter identity -> every (module name, attribute) that owns it: finds tied weights.
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    names = {id(p): n for n, p in model.named_parameters()}
    result.param_names = dict(names)

    taken: set[int] = set()
    for mname, module in model.named_modules():
        cls = adapter_class_for(module)
        if cls is None:
            continue
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        reason = _refusal(module, mname, cls, policy, owners)
        if reason is not None:
            for _, p in own:
                if id(p) not in taken:
                    taken.add(id(p))
                    result.fallback.append(FallbackParam(names[id(p)], p, reason))
            continue
        adapter = cls(module, mname)
        result.adapters.append(adapter)
        taken.update(id(p) for p in adapter.parameters())

    for name, p in model.named_parameters():
        if not p.requires_grad:
            result.frozen.append(name)
        if id(p) not in taken:
            taken.add(id(p))
            result.fallback.append(FallbackParam(name, p, "no adapter for its module"))
    return result


def _refusal(
    module: nn.Module,
    name: str,
    cls: type[LayerAdapter],
    policy: LayerPolicy,
    owners: dict[int, list[str]],
) -> str | None:
    """Why this module is not adapted, or None if it is."""
    if policy.include and not _matches(name, policy.include):
        return "not matched by include"
    if _matches(name, policy.exclude):
        return "matched by exclude"
    if cls is EmbeddingAdapter and not policy.adapt_embeddings:
        return "adapt_embeddings=False"
    own = list(module.named_parameters(recurse=False))
    if len({p.requires_grad for _, p in own}) > 1:
        return "partially frozen layer"
    for _, p in own:
        if len(owners.get(id(p), [])) > 1:
            return "tied weight (shared with " + ", ".join(owners[id(p)]) + ")"
    try:
        cls.check(module)
    except UnsupportedLayer as err:
        return f"unsupported: {err}"
    adapter = cls(module, name)
    dims = [adapter.d_out] + ([] if adapter.input_diagonal else [adapter.d_in])
    if max(dims) > policy.max_dim:
        return f"factor dimension {max(dims)} > max_dim={policy.max_dim}"
    return None
