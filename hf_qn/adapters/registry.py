"""Which module gets which adapter, and where every other trainable parameter goes.

:func:`assign_layers` walks a model once and returns a :class:`LayerAssignment`: the adapted layers
and, for every other trainable parameter, the reason it goes to the first-order fallback. Every
trainable parameter appears exactly once (tied parameters are deduplicated by identity); frozen
parameters are listed and never touched. ``print(assignment.report())`` shows the result.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Iterable, Mapping
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
    if "max_rows" not in inspect.signature(adapter.input_rows).parameters:
        raise TypeError(
            f"{adapter.__name__}.input_rows must take max_rows: def input_rows(self, inputs, max_rows=None) returning "
            "at most max_rows rows, evenly strided (return self._homogeneous(rows, max_rows) for rows without the "
            "bias column)"
        )
    if isinstance(module_type, str):
        _BY_NAME[module_type] = adapter
    else:
        _BY_TYPE[module_type] = adapter


def adapter_class_for(module: nn.Module) -> type[LayerAdapter] | None:
    """The adapter registered for this module's exact type, if any (for a module FSDP2's ``fully_shard`` wrapped,
    the type it wrapped)."""
    t = _unsharded_type(module)
    if t in _BY_TYPE:
        return _BY_TYPE[t]
    return _BY_NAME.get(f"{t.__module__}.{t.__qualname__}")


def _unsharded_type(module: nn.Module) -> type:
    """``fully_shard(module)`` swaps its class for ``FSDP<Class>(FSDPModule, Class)``: the wrapped class."""
    t = type(module)
    if not t.__name__.startswith("FSDP"):
        return t
    from torch.distributed.fsdp import FSDPModule

    bases = [b for b in t.__bases__ if b is not FSDPModule]
    return bases[0] if issubclass(t, FSDPModule) and len(bases) == 1 else t


@dataclass(frozen=True)
class LayerPolicy:
    """Which modules get an adapter.

    Args:
        include: regular expressions; when given, only modules whose qualified name matches one
            (``re.search``) are adapted. (default: all)
        exclude: regular expressions; matching modules are never adapted. (default: none)
        max_dim: largest dense factor dimension allowed (``d_out``, and ``d_in`` unless the input
            factor is diagonal), so a 50k-vocabulary head never builds a 50k × 50k matrix. A layer with a
            larger ``d_in`` goes to the fallback; one with a larger ``d_out`` is treated as ``wide`` says.
            (default: 4096)
        wide: a layer whose ``d_out`` exceeds ``max_dim``: ``"one_sided"`` preconditions it by its input
            factor alone (``H_g = I``, no pairs), ``"fallback"`` hands it to the fallback. (default: None:
            ``"one_sided"`` where step lengths are grafted (K-BFGS's ``graft="adam"``), ``"fallback"`` otherwise)
        tied_heads: an output projection (a bias-free ``nn.Linear``) whose weight is tied to an input
            ``nn.Embedding`` (GPT-2's ``lm_head``) is adapted as that Linear, one-sided, preconditioned by the
            covariance of the hidden states it reads; its gradient (head and embedding parts) is the
            tied weight's. False leaves the tied weight to the fallback. (default: None: True where step
            lengths are grafted, False otherwise: the paper's unscaled step on an embedding is SGD-like and
            slower than the fallback's AdamW there)
        one_sided_heads: the model's LM head (what ``get_output_embeddings()`` returns on a transformers model: a
            Llama's untied ``lm_head``), when adapted, is preconditioned one-sided like a tied head, by the covariance
            of the hidden states it reads, whatever its vocabulary. Its output factor would be ``vocab x vocab``:
            measured on a 1.9M-parameter Llama with a 4096 vocabulary, that dense factor (its Gram over every
            token's logit gradients and its inversion) made the mean step 4x AdamW's for no more progress per step
            than the one-sided head's. A head wider than ``max_dim`` is one-sided in any case. (default: None: True
            where step lengths are grafted, False otherwise)
        adapt_embeddings: whether input ``nn.Embedding`` layers (not a tied head's) are adapted, with a diagonal
            input factor; False hands them to the fallback. (default: None: False where step lengths are grafted,
            so the fallback's AdamW, at the same ``lr``, takes them; True otherwise. Measured on MiniLM
            fine-tuning, batch 8: adapting the 30,522 x 384 word embedding cost 0.45-0.6 s of a 2.0 s K-BFGS step
            (a dense ``H_g`` product over every vocabulary column and a dozen passes over its 11.7M entries, against
            AdamW's 0.6 s step) for the same accuracy, docs/benchmarks.md)
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_dim: int = 4096
    wide: str | None = None
    tied_heads: bool | None = None
    one_sided_heads: bool | None = None
    adapt_embeddings: bool | None = None

    def __post_init__(self) -> None:
        if self.max_dim < 1:
            raise ValueError(f"Invalid max_dim: {self.max_dim} (must be >= 1)")
        if self.wide not in (None, "one_sided", "fallback"):
            raise ValueError(f"Invalid wide: {self.wide!r} (must be 'one_sided', 'fallback' or None)")
        for pat in (*self.include, *self.exclude):
            try:
                re.compile(pat)
            except re.error as err:
                raise ValueError(f"Invalid pattern {pat!r} in include/exclude: {err}") from None
        # Accept lists from users and JSON; keep the dataclass hashable.
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def resolved(self, grafted: bool) -> LayerPolicy:
        """This policy with ``wide``, ``tied_heads``, ``one_sided_heads`` and ``adapt_embeddings`` decided where they
        are None (as their documentation says, by whether step lengths are ``grafted``)."""
        return dataclasses.replace(
            self, wide=self.wide or ("one_sided" if grafted else "fallback"),
            tied_heads=grafted if self.tied_heads is None else self.tied_heads,
            one_sided_heads=grafted if self.one_sided_heads is None else self.one_sided_heads,
            adapt_embeddings=not grafted if self.adapt_embeddings is None else self.adapt_embeddings,
        )

    @classmethod
    def split_kwargs(cls, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``kwargs`` split into (the entries named after this class's fields, the rest): how one flat set of
        options (the Trainer's ``qn_args``, a factory's kwargs) is told apart into the layer policy and the
        optimizer's hyperparameters. No name is both (a test holds the two sets disjoint)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return ({k: v for k, v in kwargs.items() if k in names},
                {k: v for k, v in kwargs.items() if k not in names})


@dataclass(frozen=True)
class FallbackParam:
    """A parameter updated by the first-order fallback, and why."""

    name: str
    param: nn.Parameter
    reason: str
    #: the model's input (token) embedding, as transformers' ``get_input_embeddings()`` names it (K-BFGS's
    #: ``fallback_embedding_lr`` applies to it; not to position embeddings, which train worse at its lr)
    embedding: bool = False


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

    def trainable_numels(self) -> tuple[int, int]:
        """Elements of the adapted and of the fallback parameters that train now (``requires_grad``): a LoRA
        model's frozen base counts in neither."""
        return (sum(p.numel() for p in self.adapted_parameters() if p.requires_grad),
                sum(p.numel() for p in self.fallback_parameters() if p.requires_grad))

    def report(self) -> str:
        """A table a person can read: each layer or parameter, its treatment and sizes."""
        lines = [f"{'name':<48} {'treatment':<22} {'numel':>10}  detail"]
        for a in self.adapters:
            numel = sum(p.numel() for p in a.parameters())
            lines.append(
                f"{a.name:<48} {type(a).__name__:<22} {numel:>10}  d_out={a.d_out} d_in={a.d_in}"
                + (" (diagonal input factor)" if a.input_diagonal else "")
                + (" (one-sided: input factor only)" if a.one_sided else "")
                + (f" (weight tied with {a.tied_with})" if a.tied_with else "")
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
    at assignment time, for the report. A policy's ``wide``, ``tied_heads`` and ``adapt_embeddings`` left None are
    decided as for grafted steps, K-BFGS's default (K-BFGS resolves them by its ``graft`` first,
    :meth:`LayerPolicy.resolved`)."""
    policy = (policy or LayerPolicy()).resolved(grafted=True)
    result = LayerAssignment()
    # Parameter identity -> every (module name, attribute) that owns it: finds tied weights.
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    names = {id(p): n for n, p in model.named_parameters()}
    result.param_names = dict(names)

    heads = _tied_heads(model, policy, owners)
    head = _output_head(model) if policy.one_sided_heads else None
    inputs = _input_embedding_ids(model)
    taken: set[int] = set()
    for mname, module in model.named_modules():
        cls = adapter_class_for(module)
        if cls is None:
            continue
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if cls is EmbeddingAdapter and id(own[0][1]) in heads:
            continue  # its weight is preconditioned as the tied head's
        reason = _refusal(module, mname, cls, policy, owners, heads, one_sided=module is head)
        if reason is not None:
            for _, p in own:
                if id(p) not in taken:
                    taken.add(id(p))
                    result.fallback.append(FallbackParam(names[id(p)], p, reason, embedding=id(p) in inputs))
            continue
        adapter = cls(module, mname)
        if id(adapter.weight) in heads:
            adapter.one_sided, adapter.tied_with = True, heads[id(adapter.weight)]
        adapter.one_sided = adapter.one_sided or module is head or adapter.d_out > policy.max_dim
        result.adapters.append(adapter)
        taken.update(id(p) for p in adapter.parameters())

    for name, p in model.named_parameters():
        if not p.requires_grad:
            result.frozen.append(name)
        if id(p) not in taken:
            taken.add(id(p))
            result.fallback.append(FallbackParam(name, p, "no adapter for its module", embedding=id(p) in inputs))
    return result


def _tied_heads(model: nn.Module, policy: LayerPolicy, owners: dict[int, list[str]]) -> dict[int, str]:
    """Weights shared by exactly one ``nn.Embedding`` and one bias-free ``nn.Linear`` that the policy adapts (a
    tied LM head): id of the weight -> the Embedding's name."""
    if not policy.tied_heads:
        return {}
    embeddings = {id(m.weight): n for n, m in model.named_modules() if adapter_class_for(m) is EmbeddingAdapter}
    out: dict[int, str] = {}
    for name, m in model.named_modules():
        if adapter_class_for(m) is not LinearAdapter or getattr(m, "bias", None) is not None:
            continue
        wid = id(m.weight)
        tied_once = wid in embeddings and len(owners.get(wid, [])) == 2
        if tied_once and _refusal(m, name, LinearAdapter, policy, owners, {wid: embeddings[wid]}) is None:
            out[wid] = embeddings[wid]
    return out


def transformers_embedding(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` or ``model.get_output_embeddings()`` (``getter``) of a transformers model,
    or None: for any other module, and for a model class that declares the method but has no such embedding."""
    get = getattr(model, getter, None)
    try:
        found = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None
    return found if isinstance(found, nn.Module) else None


def _input_embedding_ids(model: nn.Module) -> set[int]:
    """``id`` of the weight of the model's input embedding, as a transformers model names it
    (``get_input_embeddings()``); empty for any other module."""
    weight = getattr(transformers_embedding(model, "get_input_embeddings"), "weight", None)
    return {id(weight)} if isinstance(weight, nn.Parameter) else set()


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's LM head, as a transformers model names it (``get_output_embeddings()``), or None. Where that is a
    wrapper of the layer (peft's ``ModulesToSaveWrapper`` for ``modules_to_save=["lm_head"]``, whose ``weight`` is
    its trainable copy's), the head is the one adaptable layer inside it that holds that weight."""
    head = transformers_embedding(model, "get_output_embeddings")
    if head is None:
        return None
    if adapter_class_for(head) is not None:
        return head
    weight = getattr(head, "weight", None)
    if weight is None:
        return None
    inner = [m for m in head.modules()
             if m is not head and adapter_class_for(m) is not None and getattr(m, "weight", None) is weight]
    return inner[0] if len(inner) == 1 else None


def _refusal(
    module: nn.Module,
    name: str,
    cls: type[LayerAdapter],
    policy: LayerPolicy,
    owners: dict[int, list[str]],
    heads: dict[int, str] | None = None,
    one_sided: bool = False,
) -> str | None:
    """Why this module is not adapted, or None if it is (``heads``: tied head weights, which may be shared;
    ``one_sided``: the module is preconditioned by its input factor alone, so its ``d_out`` has no factor)."""
    heads = heads or {}
    if policy.include and not _matches(name, policy.include):
        return "not matched by include"
    if _matches(name, policy.exclude):
        return "matched by exclude"
    own = list(module.named_parameters(recurse=False))
    if len({p.requires_grad for _, p in own}) > 1:
        return "partially frozen layer"
    for _, p in own:
        if len(owners.get(id(p), [])) > 1 and id(p) not in heads:
            return "tied weight (shared with " + ", ".join(owners[id(p)]) + ")"
    if cls is EmbeddingAdapter and not policy.adapt_embeddings:
        return "adapt_embeddings=False"
    try:
        cls.check(module)
    except UnsupportedLayer as err:
        return f"unsupported: {err}"
    adapter = cls(module, name)
    one_sided_ok = one_sided or policy.wide == "one_sided" or id(adapter.weight) in heads
    dims = ([] if one_sided_ok else [adapter.d_out]) + ([] if adapter.input_diagonal else [adapter.d_in])
    if dims and max(dims) > policy.max_dim:
        return f"factor dimension {max(dims)} > max_dim={policy.max_dim}"
    return None
