"""What both hf_qn optimizers share: the state contract and the first-order fallback.

State contract (tested in ``tests/optim/test_state_contract.py``):

* tensors and primitives only, so ``torch.load(weights_only=True)`` reads a checkpoint;
* every counter is a 0-dim tensor;
* state is replicated: every rank holds all of it, so rank 0's ``state_dict()`` is complete and needs
  no collective (the Trainer saves on rank 0 only);
* curvature tensors keep the dtype they were saved in: ``torch.optim.Optimizer.load_state_dict``
  casts floating state to the parameter dtype (bf16 models would silently get bf16 factors), so the
  keys listed in ``_CURVATURE_KEYS`` are taken out before the cast and put back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .state import HF_QN

__all__ = ["QNOptimizerBase", "adamw_updates_", "sgd_update_"]

ROLE = "role"
ROLE_QN = "qn"
ROLE_FALLBACK = "fallback"


def adamw_updates_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    wd: float,
    fused: bool | None = None,
) -> None:
    """AdamW (decoupled weight decay) on each parameter. ``fused=False``: computed as
    ``torch.optim.AdamW(foreach=False)`` computes it, the same arithmetic in the same order, so the same bits,
    with multi-tensor kernels (``torch._foreach_*``): a few launches per (device, dtype, step count) bucket
    instead of about ten per parameter. ``fused=True``: torch's fused AdamW kernel, one pass over each tensor,
    the bits of ``torch.optim.AdamW(fused=True)``. ``None``: fused where :func:`fused_adamw_supported`.
    ``tests/optim/test_kbfgs.py`` checks both against torch. ``states`` are the parameters' optimizer states,
    filled on first use (``step`` a 0-dim CPU tensor, as torch's non-fused AdamW keeps it)."""
    beta1, beta2 = betas
    for p, st in zip(params, states):
        adamw_state_(p, st)
    if not states:
        return
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, step) in enumerate(zip(params, count_steps_([st["step"] for st in states]))):
        buckets.setdefault((p.device, p.dtype, step), []).append(i)
    for (device, _, step), idx in buckets.items():
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        exp_avgs = [states[i]["exp_avg"] for i in idx]
        if fused or (fused is None and fused_adamw_supported(ps)):
            # the kernel reads the step from a float32 tensor on the parameters' device, as torch's fused AdamW
            # keeps it; the CPU counters stay the state (checkpoints are the same either way)
            steps = [torch.tensor(float(step), dtype=torch.float32, device=device)] * len(idx)
            torch._fused_adamw_(ps, gs, exp_avgs, [states[i]["exp_avg_sq"] for i in idx], [], steps, lr=lr,
                                beta1=beta1, beta2=beta2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
            continue
        torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
        denoms = adam_denominators_([states[i]["exp_avg_sq"] for i in idx], gs, beta2, step, eps)
        torch._foreach_addcdiv_(ps, exp_avgs, denoms, value=-lr / (1 - beta1**step))


def fused_adamw_supported(params: list[Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: plain floating-point tensors (not DTensors) on
    a device torch has the kernel for."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(type(p) in (Tensor, nn.Parameter) and p.is_floating_point() and p.device.type in devices
               for p in params)


def adamw_state_(p: Tensor, st: dict[str, Any]) -> None:
    """AdamW's state for ``p``, created in ``st`` on first use as torch.optim.AdamW creates it: ``step`` a 0-dim
    float32 CPU tensor, the moments zeros like ``p``."""
    if "step" not in st:
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def count_steps_(counters: list[Tensor]) -> list[Any]:
    """Add 1 to each step counter (0-dim CPU tensors, as torch.optim keeps ``step``) and return their new values,
    with one multi-tensor add and one read for all of them instead of an add and a read per counter."""
    torch._foreach_add_(counters, 1)
    return torch.stack(counters).tolist()


def group_indices(items: list[Any], key: Callable[[Any], Any]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key``, groups and members in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())


def adam_denominators_(
    exp_avg_sqs: list[Tensor], grads: list[Tensor], beta2: float, step: float, eps: float, folded: bool = False
) -> list[Tensor]:
    """``v ← β₂ v + (1−β₂) g²`` in place for each tensor; returns Adam's denominators
    ``√v / c + eps`` (``c = √(1−β₂^step)``), computed as ``torch.optim.AdamW(foreach=False)`` does, with multi-tensor
    (``torch._foreach_*``) kernels: a handful of launches in all instead of five per tensor. ``folded``: the bias
    correction folded into ε instead, ``√v + c·eps = c (√v / c + eps)``, a pass fewer, for a caller in which the
    factor ``c`` cancels or is divided out once."""
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    c = math.sqrt(1 - beta2**step)
    if folded:
        torch._foreach_add_(denom, c * eps)
    else:
        torch._foreach_div_(denom, c)
        torch._foreach_add_(denom, eps)
    return list(denom)


def weight_by_gradient_signal_(directions: list[Tensor], grad_denoms: list[Tensor], eps: float) -> None:
    """``d ← d (1 − ε / (√v̂ + ε))`` in place (``grad_denoms``: the gradients' Adam denominators ``√v̂ + ε``), the
    weight ``direction_rms`` puts on each RMS-scaled entry of a direction: 1 up to ε / √v̂ where the gradient has
    signal, √v̂ / ε (Adam's own step) where it is rounding noise and 0 where it is identically zero. Without it, an
    entry the preconditioner mixes into a coordinate without gradient (an attention key bias, which softmax's
    shift invariance leaves without one) became a unit-size step once divided by its own RMS. One fused kernel."""
    torch._foreach_addcdiv_(directions, directions, grad_denoms, value=-eps)


def sgd_update_(p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, momentum: float, wd: float) -> None:
    """SGD with heavy-ball momentum and coupled weight decay, as ``torch.optim.SGD`` (dampening 0)."""
    d = grad.add(p, alpha=wd) if wd != 0 else grad
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d.clone().detach()
        else:
            buf.mul_(momentum).add_(d)
        d = buf
    p.add_(d, alpha=-lr)


class QNOptimizerBase(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` with the hf_qn state contract and a first-order fallback part."""

    def _refuse_unsupported_parameters(self) -> None:
        """Complex and sparse parameters are refused at construction, naming them (the curvature is real and
        dense)."""
        for g in self.param_groups:
            for p in g["params"]:
                if p.is_complex():
                    raise ValueError(
                        f"{type(self).__name__} does not support complex parameters (got one of shape "
                        f"{tuple(p.shape)}, {p.dtype}); train torch.view_as_real(param) as a real parameter instead"
                    )
                if p.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse parameters (shape {tuple(p.shape)})"
                    )

    def _check_layout(self, saved: dict[str, Any]) -> None:
        """Refuse a state whose units (layers or blocks, with their sizes) differ from this optimizer's, naming
        the first difference. States of the first format carry no layout and are checked by their shapes."""
        mine, theirs = self._layout(), saved.get("layout")
        if theirs is None or [list(x) for x in theirs] == mine:
            return
        theirs = [list(x) for x in theirs]
        for a, b in zip(theirs, mine):
            if a != b:
                raise ValueError(
                    f"{type(self).__name__}.load_state_dict: the saved state's unit {a} differs from this optimizer's "
                    f"{b} ([name, sizes...]): it was written for another model or another block layout (K-BFGS's "
                    "max_block_dim, mL-BFGS's blocks)"
                )
        raise ValueError(
            f"{type(self).__name__}.load_state_dict: the saved state has {len(theirs)} units, this optimizer "
            f"{len(mine)}: it was written for another model or another block layout (K-BFGS's max_block_dim, "
            "mL-BFGS's blocks)"
        )

    def _layout(self) -> list[list[Any]]:
        """The units and their sizes, saved as ``"hf_qn"/"layout"`` and compared on load."""
        raise NotImplementedError

    def _check_sharded_parameters(self) -> None:
        """DTensor parameters (FSDP2 swaps them into ``param_groups``, also after construction) must be FSDP2's:
        every parameter sharded on dim 0 over one 1-D mesh (not HSDP, not tensor parallelism)."""
        from ..distributed.shards import FullyShardedPlan

        if self._fully_sharded():
            try:
                FullyShardedPlan(self._params())
            except NotImplementedError as e:
                raise NotImplementedError(f"{type(self).__name__}: {e}") from None

    #: per-parameter state keys whose saved dtype is kept on load (curvature, histories, counters).
    _CURVATURE_KEYS: frozenset[str] = frozenset()
    #: hyperparameters whose default changed the steps after checkpoints were written without them, each with the
    #: value those checkpoints were trained with: a checkpoint that lacks one resumes with that value.
    _TRAINED_WITHOUT: ClassVar[dict[str, Any]] = {}

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The param group holding ``p`` (cached; rebuilt after ``add_param_group``, a load, or for a parameter it
        does not know, e.g. one appended to a group's ``"params"`` by hand)."""
        cache: dict[int, dict[str, Any]] | None = self.__dict__.get("_group_cache")
        group = cache.get(id(p)) if cache is not None else None
        if group is None:
            cache = {id(q): g for g in self.param_groups for q in g["params"]}
            self._group_cache: dict[int, dict[str, Any]] | None = cache
            group = cache[id(p)]
        return group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._group_cache = None

    def _fallback_step(self, group: dict[str, Any]) -> None:
        """Update a fallback group (parameters no adapter/block takes) with AdamW or SGD."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise ValueError("hf_qn's fallback does not take sparse gradients (use sparse=False)")
        if group["fallback"] == "adamw":
            adamw_updates_(
                params, [p.grad for p in params], [self.state[p] for p in params], group["lr"],
                tuple(group["betas"]), group["eps"], group["weight_decay"], group.get("fused"),
            )
            return
        for p in params:
            sgd_update_(p, p.grad, self.state[p], group["lr"], group["momentum"], group["weight_decay"])

    def _all_grads_finite(self, params: Iterable[nn.Parameter]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            raise ValueError(
                f"{type(self).__name__} needs dense gradients and got a sparse one: construct nn.Embedding (and "
                "EmbeddingBag) with sparse=False"
            )
        if not grads:
            return True
        from ..distributed import all_reduce_sum_, is_dtensor
        from ..distributed.shards import local_piece

        sharded = [g for g in grads if is_dtensor(g)]
        if sharded:  # FSDP2: each rank sees its shards; every rank must take the same decision
            local = [x for g in grads if (x := local_piece(g)).numel()]
            bad = torch.zeros(1, dtype=torch.float64, device=grads[0].device)
            if local:
                bad += (~torch.isfinite(torch.stack([n.double() for n in torch._foreach_norm(local)]))).sum()
            all_reduce_sum_([bad], sharded[0].device_mesh.get_group())  # type: ignore[attr-defined]
            return not bool(bad.item())
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())

    # ------------------------------------------------------------------ copies
    #: attributes beyond torch's (defaults, state, param_groups) that a pickled or deep-copied
    #: optimizer needs to work; torch.optim drops everything else (e.g. an LR scheduler's step wrapper).
    _PICKLED_ATTRS: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED_ATTRS if k in self.__dict__})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict calls this too, with only "state" and "param_groups".
        super().__setstate__(state)
        self._group_cache = None  # keyed by id(parameter), which a copy changes

    # ------------------------------------------------------------------ state dict
    def _global_state(self) -> dict[str, Any]:
        """The optimizer-wide state, saved as ``state_dict()["hf_qn"]`` (see :mod:`hf_qn.optim.state`)."""
        raise NotImplementedError

    def _load_global_state(self, saved: dict[str, Any]) -> None:
        raise NotImplementedError

    def _upgrade(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state dict of an older format, converted to the current one (see :mod:`hf_qn.optim.state`)."""
        return state_dict

    def _saved_ids(self, state_dict: dict[str, Any]) -> dict[Any, nn.Parameter]:
        """Saved parameter id -> this optimizer's parameter, the mapping torch's ``load_state_dict`` uses (the
        saved groups' ids in order)."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        return dict(zip(saved_ids, (p for g in self.param_groups for p in g["params"])))

    def state_dict(self) -> dict[str, Any]:
        """torch's ``{"state", "param_groups"}`` plus ``"hf_qn"``, the optimizer-wide state. Under FSDP2 the latter
        is also kept inside ``"state"`` (see :meth:`_embed_global`)."""
        sd = super().state_dict()
        sd[HF_QN] = {**self._global_state(), "layout": self._layout()}
        return self._embed_global(sd) if self._fully_sharded() else sd

    def _params(self) -> list[nn.Parameter]:
        """Every parameter of every group, in order."""
        return [p for g in self.param_groups for p in g["params"]]

    def _fully_sharded(self) -> bool:
        from ..distributed import is_dtensor

        return any(is_dtensor(p) for p in self._params())

    @staticmethod
    def _embed_global(sd: dict[str, Any]) -> dict[str, Any]:
        """``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` (the Trainer's and accelerate's FSDP path)
        keeps only ``"state"`` and ``"param_groups"``, and a load fills only the keys of a fresh optimizer's
        state: so the optimizer-wide state is also stored, serialized whole into one string (its structure may
        grow during training), as ``state[first parameter]["hf_qn"]["encoded"]``."""
        if not sd["state"]:
            return sd
        import base64
        import io

        buf = io.BytesIO()
        torch.save(sd[HF_QN], buf)
        home = min(sd["state"])
        state = dict(sd["state"])
        state[home] = {**state[home], HF_QN: {"encoded": base64.b64encode(buf.getvalue()).decode("ascii")}}
        return {**sd, "state": state}

    @staticmethod
    def _extract_global(sd: dict[str, Any]) -> dict[str, Any]:
        """:meth:`_embed_global` undone: ``"hf_qn"`` at the top again, decoded if it only came inside ``"state"``,
        and no longer inside ``"state"``."""
        inside = [pid for pid, st in sd.get("state", {}).items() if isinstance(st, dict) and HF_QN in st]
        if not inside:
            return sd
        state = dict(sd["state"])
        embedded = state[inside[0]][HF_QN]
        for pid in inside:
            state[pid] = {k: v for k, v in state[pid].items() if k != HF_QN}
        out = {**sd, "state": state}
        if HF_QN not in sd:
            import base64
            import io

            raw = base64.b64decode(embedded["encoded"])
            out[HF_QN] = torch.load(io.BytesIO(raw), weights_only=True)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping curvature tensors in their saved dtype (see module docstring)."""
        state_dict = self._upgrade(self._extract_global(state_dict))
        saved_global = state_dict.get(HF_QN)
        if saved_global is None and not any(state_dict.get("state", {}).values()):
            saved_global = self._global_state()  # saved before any step (hf_qn's first format): nothing to restore
        if saved_global is None:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state dict has no {HF_QN!r} entry, so it was not "
                "written by an hf_qn optimizer; load it into the optimizer class that wrote it"
            )
        if saved_global.get("optimizer") != self._global_state()["optimizer"]:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state was written by {saved_global.get('optimizer')}, "
                f"not by {self._global_state()['optimizer']}; load it into the optimizer class that wrote it"
            )
        self._check_layout(saved_global)
        self._group_cache = None  # torch rebuilds param_groups as new dicts
        saved_state = state_dict.get("state", {})
        kept: dict[Any, dict[str, Any]] = {}
        stripped_state = {}
        for pid, st in saved_state.items():
            keep = {k: v for k, v in st.items() if k in self._CURVATURE_KEYS}
            if keep:
                kept[pid] = keep
            stripped_state[pid] = {k: v for k, v in st.items() if k not in self._CURVATURE_KEYS}
        stripped = {k: v for k, v in state_dict.items() if k != HF_QN}
        stripped["state"] = stripped_state
        constructed = [dict(g) for g in self.param_groups]
        super().load_state_dict(stripped)
        for group, before in zip(self.param_groups, constructed):
            # a hyperparameter added after the checkpoint was written keeps the value this optimizer was
            # constructed with (torch would leave it out), or the one the checkpoint was trained with
            for key, value in before.items():
                group.setdefault(key, self._TRAINED_WITHOUT.get(key, value))
        id_map = self._saved_ids(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, keep in kept.items():
            p = id_map[pid]
            for k, v in keep.items():
                self.state[p][k] = _to_home(v, p)
        home = params[0] if params else torch.empty(0)
        self._load_global_state(_to_home(saved_global, home))
        self.__setstate__({"state": self.state, "param_groups": self.param_groups})  # re-bind the units


def _to_home(v: Any, p: Tensor) -> Any:
    """Where a fresh run keeps a state value: a tensor with its parameter, except 0-dim counters, flags and
    scalars, which stay on the CPU (as torch.optim keeps ``step``) so that reading them never waits on the GPU;
    nested dicts alike; other values as they are."""
    if isinstance(v, dict):
        return {k: _to_home(x, p) for k, x in v.items()}
    if not isinstance(v, Tensor):
        return v
    return v.cpu() if v.dim() == 0 else v.to(device=p.device)
