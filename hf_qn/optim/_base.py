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
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..linalg import LBFGSHistory

__all__ = ["QNOptimizerBase", "adamw_updates_", "sgd_update_"]

ROLE = "role"
ROLE_QN = "qn"
ROLE_FALLBACK = "fallback"
FALLBACKS = ("adamw", "sgd")


def adamw_updates_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    lr: float,
    betas: tuple[float, float],
    eps: float,
    wd: float,
) -> None:
    """AdamW (decoupled weight decay) on each parameter, computed as ``torch.optim.AdamW(foreach=False)``
    computes it: the same arithmetic in the same order, so the same bits (``tests/optim/test_kbfgs.py``
    checks it). Multi-tensor kernels (``torch._foreach_*``) take each (device, dtype, step count) bucket in
    a few launches instead of about ten per parameter. ``states`` are the parameters' optimizer states,
    filled on first use (``step`` a 0-dim CPU tensor, as torch keeps it)."""
    beta1, beta2 = betas
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, st) in enumerate(zip(params, states)):
        if "step" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        buckets.setdefault((p.device, p.dtype, float(st["step"])), []).append(i)
    for (_, _, step), idx in buckets.items():
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        exp_avgs = [states[i]["exp_avg"] for i in idx]
        torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(exp_avgs, gs, 1 - beta1)
        denoms = adam_denominators_([states[i]["exp_avg_sq"] for i in idx], gs, beta2, step, eps)
        torch._foreach_addcdiv_(ps, exp_avgs, denoms, value=-lr / (1 - beta1**step))


def adam_denominators_(
    exp_avg_sqs: list[Tensor], grads: list[Tensor], beta2: float, step: float, eps: float
) -> list[Tensor]:
    """``v ← β₂ v + (1−β₂) g²`` in place for each tensor; returns Adam's denominators
    ``√v / √(1−β₂^step) + eps``, computed as ``torch.optim.AdamW(foreach=False)`` does, with multi-tensor
    (``torch._foreach_*``) kernels: a handful of launches in all instead of five per tensor."""
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
    torch._foreach_add_(denom, eps)
    return list(denom)


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


def check_range(name: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> None:
    """Raise ``ValueError`` naming the argument unless ``value`` lies in the interval."""
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi) or (isinstance(value, float) and math.isnan(value)):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"Invalid {name}: {value} (must be in {lb}{lo}, {hi}{rb})")


class QNOptimizerBase(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` with the hf_qn state contract and a first-order fallback part."""

    def _refuse_sharded_parameters(self) -> None:
        """FSDP2 / tensor parallelism swap DTensors into ``param_groups`` (also after construction)."""
        from ..distributed import is_dtensor

        if any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            raise NotImplementedError(
                f"{type(self).__name__} got DTensor parameters (FSDP2 fully_shard or tensor parallelism), which "
                "it does not support yet: its curvature needs whole layers. Supported: one process, or DDP "
                "(torchrun / accelerate launch --multi_gpu). The FSDP2 design is in docs/design.md."
            )

    #: per-parameter state keys whose saved dtype is kept on load (curvature, histories, counters).
    _CURVATURE_KEYS: frozenset[str] = frozenset()

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        """The param group holding ``p`` (cached; rebuilt after ``add_param_group`` or a load)."""
        cache: dict[int, dict[str, Any]] | None = getattr(self, "_group_cache", None)
        if cache is None or len(cache) != sum(len(g["params"]) for g in self.param_groups):
            cache = {id(q): g for g in self.param_groups for q in g["params"]}
            self._group_cache: dict[int, dict[str, Any]] | None = cache
        return cache[id(p)]

    def _fallback_step(self, group: dict[str, Any]) -> None:
        """Update a fallback group (parameters no adapter/block takes) with AdamW or SGD."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise ValueError("hf_qn's fallback does not take sparse gradients (use sparse=False)")
        if group["fallback"] == "adamw":
            adamw_updates_(
                params, [p.grad for p in params], [self.state[p] for p in params], group["lr"],
                tuple(group["betas"]), group["eps"], group["weight_decay"],
            )
            return
        for p in params:
            sgd_update_(p, p.grad, self.state[p], group["lr"], group["momentum"], group["weight_decay"])

    def _middle(self, name: str, pairs_pushed: int, hist: LBFGSHistory) -> tuple[Tensor, float | Tensor]:
        """The compact-form middle matrix (:meth:`LBFGSHistory.middle`) of the history called ``name`` (an
        mL-BFGS block, a K-BFGS(L) layer), kept until that history's next push: it depends on the history
        only, and the optimizers apply it at every step (K-BFGS(L) twice on a curvature step) but push at
        most once. The key (pairs pushed, ring position, storage) changes with every push;
        :meth:`load_state_dict` drops everything kept."""
        cache = self.__dict__.setdefault("_middles", {})
        key = (pairs_pushed, hist.count, hist.head, hist.S.data_ptr())
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            hit = cache[name] = (key, hist.middle())
        return hit[1]

    @staticmethod
    def _all_grads_finite(params: Iterable[nn.Parameter]) -> bool:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

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
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, keeping curvature tensors in their saved dtype (see module docstring)."""
        self._group_cache = None  # torch rebuilds param_groups as new dicts
        self.__dict__.pop("_middles", None)  # kept middle matrices belong to the histories being replaced
        saved_state = state_dict.get("state", {})
        kept: dict[Any, dict[str, Any]] = {}
        stripped_state = {}
        for pid, st in saved_state.items():
            keep = {k: v for k, v in st.items() if k in self._CURVATURE_KEYS}
            if keep:
                kept[pid] = keep
            stripped_state[pid] = {k: v for k, v in st.items() if k not in self._CURVATURE_KEYS}
        stripped = dict(state_dict)
        stripped["state"] = stripped_state
        super().load_state_dict(stripped)
        if not kept:
            return
        # Same id -> parameter mapping as torch's: saved groups' param ids in order.
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_map = dict(zip(saved_ids, params))
        for pid, keep in kept.items():
            p = id_map[pid]
            for k, v in keep.items():
                self.state[p][k] = _to_home(v, p) if isinstance(v, Tensor) else v


def _to_home(v: Tensor, p: Tensor) -> Tensor:
    """Where a fresh run keeps a state tensor: with its parameter, except 0-dim counters, flags and scalars,
    which stay on the CPU (as torch.optim keeps ``step``) so that reading them never waits on the GPU."""
    return v.cpu() if v.dim() == 0 else v.to(device=p.device)
