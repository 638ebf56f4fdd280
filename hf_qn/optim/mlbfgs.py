"""mL-BFGS: block-wise momentum L-BFGS (Niu, Fabian, Lee, Soltanolkotabi & Avestimehr, TMLR 2023).

Every step (nearly free: two axpys per parameter)

    M^θ ← β_θ M^θ + (1−β_θ) θ,    M^g ← β_g M^g + (1−β_g) g                  (paper, eq. 5)

every ``update_interval`` = T steps, per block, a curvature pair from the averages

    s = M^θ_now − M^θ_{T steps ago},   y = M^g_now − M^g_{T steps ago}         (paper, eq. 6)

damped so that ``σ_L ≤ sᵀy/sᵀs ≤ σ_H`` (eq. 7) and pushed into the block's history of ``m`` pairs; the
direction ``d = H g`` is the block's L-BFGS product (compact form), first-order ``d = g`` until a block
has its first pair, rescaled per block to the norm of Adam's step there (grafting; ``normalize``), and
the step is heavy-ball momentum with decoupled weight decay:

    b ← μ b + d,    θ ← θ − α (b + λ_wd θ).

Distributed, two ways (:mod:`hf_qn.distributed.shards`):

* whole state on every rank (one process; DDP by default): the pair pushes are replicated on every rank
  (cheap, every T steps) so rank 0 holds the complete state; the per-step L-BFGS products, the dominant
  cost, are computed only by each block's owner (greedy assignment by size) and exchanged with one
  all-reduce, so replicas take identical steps;
* split state (FSDP2 ``fully_shard``; DDP with ``shard_state=True``): every rank keeps the averages,
  momentum and history columns of its ``1/N`` of every parameter. The compact form needs the whole block
  only through inner products, so each stage sums its partial products over the ranks in one all-reduce
  for all blocks: ``sᵀs, sᵀy`` (damping), finiteness and ``sᵀŷ`` (the curvature test), the new pair's
  products with the history (the push), ``[Sᵀg; Yᵀg]`` (the direction, every step: ``2m`` numbers per
  block) and the grafting norms. The directions are those of one process up to the order of float sums.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_sum_, greedy_assignment, rank, world_size
from ..distributed.shards import FullyShardedPlan, ShardPlan, chunk_range, local_piece, plan_for
from ..linalg import LBFGSHistory, curvature_verdict, mlbfgs_mix
from ..linalg.bfgs import _dot64_t
from ._base import QNOptimizerBase, adam_denominators_, weight_by_gradient_signal_
from .config import MLBFGSConfig
from .mlbfgs_blocks import Block, build_blocks
from .state import FORMAT, HF_QN, MLBFGS_BLOCK_COUNTERS, MLBFGS_PARAM_KEYS, convert_mlbfgs_v1, is_v1, iter_tensors

__all__ = ["MLBFGS", "Block", "MLBFGSBlock", "MLBFGSConfig", "build_blocks"]

#: the hyperparameters kept in every param group (``blocks`` and ``min_block_size`` are fixed at construction).
_GROUP_FIELDS = tuple(
    f.name for f in dataclasses.fields(MLBFGSConfig) if f.name not in ("blocks", "min_block_size", "shard_state")
)
#: the per-parameter state with one value per element (split over ranks with the parameter).
_ELEMENT_KEYS = (*MLBFGS_PARAM_KEYS, "exp_avg_sq", "direction_sq")

_ADAM_BETA2, _ADAM_EPS = 0.999, 1e-8


def _named_entry(entry: Any, default: str) -> tuple[str, Any]:
    """``(name, parameter)`` from a parameter or a ``(name, parameter)`` pair, with a clear error otherwise."""
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], Tensor):
        return entry
    if isinstance(entry, Tensor):
        return default, entry
    raise TypeError(f"MLBFGS params must be tensors or (name, tensor) pairs, got {type(entry).__name__}")


class MLBFGSBlock:
    """One mL-BFGS curvature unit: a :class:`Block`'s L-BFGS history of ``m`` pairs, whether it has a previous
    pair point, and its counters (``state``: the ``"block"`` entry of its first parameter's state). The compact
    form's middle matrix is kept from one push (or load) to the next."""

    def __init__(self, block: Block) -> None:
        self.block = block
        self.state: dict[str, Any] = {}
        self._middle: Any = None
        #: elements of the block held by this rank (all of them unless the state is split over ranks).
        self.local_numel = block.numel

    @property
    def name(self) -> str:
        return self.block.name

    def bind(self, states: Any) -> None:
        """Use ``states`` (the optimizer's ``state``): the block's entry is that of its first parameter, created
        at the first step (an optimizer that has not stepped has an empty ``state``, as torch's do)."""
        self._states = states
        key = self.block.params[0]
        self.state = states[key].get("block", {}) if key in states else {}
        self._middle = None

    def ensure_state(self, history_size: int, gamma: float | str, dtype: torch.dtype) -> None:
        if "history" in self.state:
            return
        hist = LBFGSHistory(history_size, self.local_numel, gamma=gamma, dtype=dtype,
                            device=self.block.params[0].device)
        self.state = self._states[self.block.params[0]]["block"] = {
            "history": hist.state_dict(),
            "has_prev": torch.tensor(False),
            "counters": {k: torch.tensor(0, dtype=torch.int64) for k in MLBFGS_BLOCK_COUNTERS},
        }

    def count(self, key: str) -> None:
        self.state["counters"][key] += 1

    def history(self, gamma: float | str) -> LBFGSHistory:
        S = self.state["history"]["S"]
        compute = torch.float64 if S.dtype == torch.float64 else torch.float32
        return LBFGSHistory.from_state(self.state["history"], gamma=gamma, compute_dtype=compute)

    def commit_push(self, hist: LBFGSHistory, products: Tensor) -> None:
        """Complete a push begun by ``hist.write_pair`` with its (summed) products."""
        hist.commit_push(products)
        self.state["history"].update(hist.state_dict())
        self._middle = None
        self.count("pairs_accepted")

    def finish(self, hist: LBFGSHistory, g: Tensor, products: Tensor) -> Tensor:
        """``H g`` (compact form) from ``hist.project(g)``'s (summed) products."""
        if self._middle is None:
            self._middle = hist.middle()
        return hist.finish(g, products, middle=self._middle)


class MLBFGS(QNOptimizerBase):
    """Momentum-based block-wise L-BFGS; needs no closure and no hooks.

    Args:
        params: an ``nn.Module`` (blocks follow its layers and names), an iterable of parameters (named
            ``param{j}``: one block each), or of param-group dicts (torch.optim style; a group's
            ``param_names`` name its parameters, else they are ``group{i}.{j}`` and ``blocks="layer"`` makes
            the whole group one block).
        config: an :class:`~hf_qn.optim.config.MLBFGSConfig`; keyword ``hyperparameters`` override its fields.
        **hyperparameters: the fields of :class:`~hf_qn.optim.config.MLBFGSConfig` (``lr``, ``momentum``,
            ``history_size``, ``update_interval``, ``normalize``, ``blocks``, ...), each documented there with
            its default.
    """

    _CURVATURE_KEYS = frozenset({"block", "exp_avg_sq", "direction_sq", *MLBFGS_PARAM_KEYS})
    #: the keys of :meth:`statistics` that count events since the start (the others are current values).
    COUNTERS = frozenset(f"qn/{k}" for k in (*MLBFGS_BLOCK_COUNTERS, "steps_skipped_nonfinite"))

    def __init__(
        self,
        params: nn.Module | Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        *,
        config: MLBFGSConfig | None = None,
        **hyperparameters: Any,
    ) -> None:
        if isinstance(params, Tensor):
            raise TypeError(
                "MLBFGS params must be an nn.Module, an iterable of tensors / (name, tensor) pairs, or param-group "
                f"dicts, got a single {type(params).__name__} (wrap it in a list)"
            )
        if config is not None and not isinstance(config, MLBFGSConfig):
            raise TypeError(f"Invalid config: {config!r} (must be an hf_qn.optim.config.MLBFGSConfig or None)")
        cfg = MLBFGSConfig.from_kwargs(config, **hyperparameters)
        named, groups = self._named_params_and_groups(params)
        self.config = cfg
        defaults = {k: getattr(cfg, k) for k in _GROUP_FIELDS}
        super().__init__(groups, defaults)
        self._refuse_unsupported_parameters()
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}
        named = [(n, p) for n, p in named if id(p) in in_groups]
        if not named:
            raise ValueError("MLBFGS got no trainable parameter")
        self.blocks: list[Block] = build_blocks(named, cfg.blocks, cfg.min_block_size)
        self.units = [MLBFGSBlock(b) for b in self.blocks]
        self.counters: dict[str, Any] = {
            "step": torch.tensor(0, dtype=torch.int64),
            "steps_skipped_nonfinite": torch.tensor(0, dtype=torch.int64),
        }
        self._names = {id(p): n for n, p in named}
        self._built_params = self._params()
        self._plan: ShardPlan = plan_for(self._built_params, cfg.shard_state)
        self._assign()
        self._bind_units()
        #: L-BFGS products computed by this rank (to show the distributed work split).
        self.work_counter = 0

    # ------------------------------------------------------------------ copies
    _PICKLED_ATTRS = ("config", "blocks", "units", "counters", "work_counter")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_named"] = [(p, n) for b in self.blocks for p in b.params if (n := self._names.get(id(p)))]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        named = state.pop("_named", None)
        super().__setstate__(state)  # also called by torch's load_state_dict, with state and param_groups only
        if named is not None:  # a copy
            self._names = {id(p): n for p, n in named}
            self._plan = plan_for(self._params(), self.config.shard_state)
            self._assign()  # owners follow this process's world size
        if "units" in self.__dict__:
            self._bind_units()

    def _bind_units(self) -> None:
        for u in self.units:
            u.bind(self.state)
            u.local_numel = sum(self._plan.local(p).numel() for p in u.block.params)

    def _follow_swapped_parameters(self) -> None:
        """Accelerate (FSDP2) and similar wrappers replace the parameters in ``param_groups`` after the optimizer
        was built (by the sharded DTensors, in the same order): move the blocks, names and state to the new
        parameters and choose the sharding plan again. Nothing happens when the parameters are the ones the
        blocks were built on."""
        current = self._params()
        known = [p for b in self.blocks for p in b.params]
        if {id(p) for p in current} == {id(p) for p in known}:
            return
        old = getattr(self, "_built_params", None)
        if old is None or len(old) != len(current):
            raise RuntimeError(
                "MLBFGS: the parameters in param_groups changed and cannot be matched to the blocks; build the "
                "optimizer after wrapping the model (fully_shard, DDP) or let accelerate.prepare swap them"
            )
        new_of = {id(o): n for o, n in zip(old, current)}
        self.blocks = [Block(b.name, tuple(new_of[id(p)] for p in b.params)) for b in self.blocks]
        for u, b in zip(self.units, self.blocks):
            u.block = b
        plan = plan_for(current, self.config.shard_state)
        if plan.sharded and any(True for st in self.state.values() for _ in iter_tensors(st)):
            raise RuntimeError(
                "MLBFGS: the parameters were swapped for sharded ones after the optimizer had taken steps, so its "
                "state is whole; save full_state_dict() and load it into an optimizer built on the sharded model"
            )
        self._names = {id(new_of[i]): n for i, n in self._names.items() if i in new_of}
        for o in old:
            if o in self.state:
                self.state[new_of[id(o)]] = self.state.pop(o)
        self._built_params = current
        self._group_cache = None
        self._plan = plan
        self._assign()
        self._bind_units()

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _named_params_and_groups(
        params: nn.Module | Iterable[Any],
    ) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
        """``(name, parameter)`` pairs and torch param groups from a module (all its parameters, frozen ones
        too: they train once unfrozen), parameters, ``(name, parameter)`` pairs (``named_parameters()``), or
        param-group dicts of either."""
        if isinstance(params, nn.Module):
            module_named = list(params.named_parameters())
            return module_named, [{"params": [p for _, p in module_named]}]
        items = list(params)
        if not items:
            raise ValueError("MLBFGS got an empty parameter list")
        as_groups = all(isinstance(g, dict) for g in items)
        named: list[tuple[str, Any]] = []
        groups = []
        for i, g in enumerate(items if as_groups else [{"params": items}]):
            entries = [g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])
            names = g.get("param_names")
            ps = []
            for j, entry in enumerate(entries):
                default = names[j] if names else (f"group{i}.{j}" if as_groups else f"param{j}")
                name, p = _named_entry(entry, default)
                named.append((name, p))
                ps.append(p)
            groups.append(dict(g, params=ps))
        return named, groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group``: the new parameters form blocks of their own (by the ``blocks``
        rule; a mapping of names applies only at construction, so new parameters are blocked per layer),
        named by the group's ``param_names`` or ``group{i}.{j}``."""
        if "units" not in self.__dict__:  # torch.optim.Optimizer.__init__ adds the constructor's groups
            super().add_param_group(param_group)
            return
        named, (group,) = self._named_params_and_groups([param_group])
        index = len(self.param_groups)
        if not param_group.get("param_names"):
            named = [(f"group{index}.{j}", p) for j, (_, p) in enumerate(named)]
        super().add_param_group(group)
        rule = self.config.blocks if not isinstance(self.config.blocks, Mapping) else "layer"
        taken = {b.name for b in self.blocks}
        for b in build_blocks(named, rule, self.config.min_block_size):
            name = b.name if b.name not in taken else f"{b.name}@group{index}"
            self.blocks.append(Block(name, b.params))
            self.units.append(MLBFGSBlock(self.blocks[-1]))
        self._names.update({id(p): n for n, p in named})
        self._built_params = self._params()
        self._plan = plan_for(self._built_params, self.config.shard_state)
        self._assign()
        self._bind_units()

    def _assign(self) -> None:
        costs = {b.name: float(b.numel) for b in self.blocks}
        self.owners = greedy_assignment(costs, world_size())

    @property
    def state_split_over_ranks(self) -> bool:
        """Whether each rank keeps state for its pieces of the parameters only (FSDP2, or ``shard_state=True``)."""
        return self._plan.sharded

    def block_map(self) -> str:
        """A table of the blocks: name, parameters, size and owner rank."""
        lines = [f"{'block':<40} {'numel':>10} {'owner':>5}  parameters"]
        for b in self.blocks:
            pn = ", ".join(self._names.get(id(p), "?") for p in b.params)
            owner = "all" if self._plan.sharded else str(self.owners[b.name])
            lines.append(f"{b.name:<40} {b.numel:>10} {owner:>5}  {pn}")
        return "\n".join(lines)

    def state_bytes(self) -> int:
        """Bytes of optimizer state held now by this rank (all tensors in ``self.state``)."""
        tensors = [v for st in self.state.values() for _, v in iter_tensors(st)]
        return sum(v.numel() * v.element_size() for v in tensors)

    def statistics(self) -> dict[str, float]:
        """Counters for logging (keys prefixed ``qn/``)."""
        out = {f"qn/{k}": 0.0 for k in MLBFGS_BLOCK_COUNTERS}
        pairs_held = 0
        for u in self.units:
            if "counters" not in u.state:
                continue
            for k in MLBFGS_BLOCK_COUNTERS:
                out[f"qn/{k}"] += float(u.state["counters"][k])
            pairs_held += int(u.state["history"]["count"])
        out["qn/steps_skipped_nonfinite"] = float(self.counters["steps_skipped_nonfinite"])
        out["qn/pairs_held"] = float(pairs_held)
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step. ``closure`` (optional, torch.optim semantics) computes loss and gradients first. Parameters
        without a gradient are skipped (no average, momentum or decay); a block none of whose parameters has one
        forms no pair."""
        self._follow_swapped_parameters()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [p for b in self.blocks for p in b.params if p.grad is not None]
        if not live:
            return loss
        # (ZeRO-1: the DDP-averaged gradients are whole and equal on every rank, so every rank decides alike)
        if not self._all_grads_finite(live):
            self.counters["steps_skipped_nonfinite"] += 1
            warnings.warn("MLBFGS: non-finite gradient; step skipped, history untouched", RuntimeWarning, stacklevel=2)
            return loss
        hp = self._hyperparameters()
        units = [u for u in self.units if any(p.grad is not None for p in u.block.params)]
        for u in units:
            u.ensure_state(hp["history_size"], hp["gamma"], self.config.history_torch_dtype)
        self.counters["step"] += 1
        t = int(self.counters["step"])
        # M^θ ← β_θ M^θ + (1−β_θ) θ,  M^g ← β_g M^g + (1−β_g) g                              (eq. 5)
        self._update_averages(live, hp)
        # every T steps: s = M^θ − M^θ_prev, y = M^g − M^g_prev, damped, pushed               (eqs. 6, 7)
        if t % hp["update_interval"] == 0:
            self._curvature_pairs(units, hp)
        # d = H g per block (owner ranks, then one all-reduce), scaled by ``normalize``
        directions = self._directions(units, t, hp)
        # b ← μ b + d;  θ ← θ(1 − α λ_wd) − α b
        self._apply(units, directions)
        self._plan.after_update(live)
        return loss

    def _hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters of this step, from ``param_groups`` (as torch.optim reads them, so a loaded
        checkpoint or a user's change takes effect). ``lr``, ``momentum`` and ``weight_decay`` may differ
        between groups; the others act on whole blocks and must agree."""
        hp: dict[str, Any] = {}
        for key in _GROUP_FIELDS:
            if key in ("lr", "momentum", "weight_decay"):
                continue
            values = {repr(g.get(key, self.defaults[key])) for g in self.param_groups}
            if len(values) > 1:
                raise ValueError(
                    f"MLBFGS: param groups disagree on {key!r} ({', '.join(sorted(values))}); it acts on whole blocks, "
                    "so only lr, momentum and weight_decay can differ between groups"
                )
            hp[key] = self.param_groups[0].get(key, self.defaults[key])
        for key in ("history_size", "history_dtype"):
            if hp[key] != getattr(self.config, key):
                raise ValueError(
                    f"MLBFGS: {key} changed from {getattr(self.config, key)!r} to {hp[key]!r} in param_groups; the "
                    "histories cannot change shape or dtype during training (build a new optimizer)"
                )
        return hp

    def _update_averages(self, params: list[nn.Parameter], hp: dict[str, Any]) -> None:
        """M^θ ← β_θ M^θ + (1−β_θ) θ,  M^g ← β_g M^g + (1−β_g) g (each started at its first θ, g), over the
        parameters with a gradient, with multi-tensor (``torch._foreach_*``) kernels."""
        bp, bg = hp["param_decay"], hp["grad_decay"]
        local = self._plan.local
        fresh = [p for p in params if "param_avg" not in self.state[p]]
        for p in fresh:
            st = self._param_state(p)
            st["param_avg"].copy_(local(p))
            st["grad_avg"].copy_(self._plan.local_grad(p))
        started = {id(p) for p in fresh}
        params = [p for p in params if id(p) not in started]
        if not params:
            return
        states = [self._param_state(p) for p in params]
        p_avg, g_avg = [st["param_avg"] for st in states], [st["grad_avg"] for st in states]
        torch._foreach_mul_(p_avg, bp)
        torch._foreach_add_(p_avg, [local(p).detach() for p in params], alpha=1 - bp)
        torch._foreach_mul_(g_avg, bg)
        torch._foreach_add_(g_avg, self._grads(params), alpha=1 - bg)

    def _curvature_pairs(self, units: list[MLBFGSBlock], hp: dict[str, Any]) -> None:
        """Per block: s = M^θ − M^θ_prev, y = M^g − M^g_prev; pair momentum; damping (eq. 7); push if
        sᵀy > ε sᵀs. Every product over a block is summed over the ranks (one all-reduce per stage, for all
        blocks; nothing to sum when the state is whole), so every rank takes the same decisions."""
        pairs = []
        for u in units:
            s_y = self._pair_vectors(u, hp)
            if s_y is not None:
                pairs.append((u, u.history(hp["gamma"]), *s_y))
        if not pairs:
            return
        c = hp["pair_decay"]
        if c > 0:
            for i, (u, hist, s, y) in enumerate(pairs):
                if len(hist) > 0:
                    j = hist.newest()
                    s = (1 - c) * s + c * hist.S[j].to(s.dtype)
                    pairs[i] = (u, hist, s, (1 - c) * y + c * hist.Y[j].to(y.dtype))
        if hp["damp"]:  # ŷ = τ y + (1−τ) s with τ from the block's sᵀs, sᵀy
            ss_sy = self._summed([torch.stack([_dot64_t(s, s), _dot64_t(s, y)]) for _, _, s, y in pairs])
            for i, ((u, hist, s, y), (ss, sy)) in enumerate(zip(pairs, ss_sy)):
                tau, fired = mlbfgs_mix(ss, sy, hp["sigma_low"], hp["sigma_high"], 1.0 - hp["min_mix"])
                if fired:
                    u.count("pairs_damped")
                if tau != 1.0:
                    pairs[i] = (u, hist, s, tau * y + (1.0 - tau) * s.to(y.dtype))
        checks = self._summed([
            torch.stack([(~torch.isfinite(s)).sum().double() + (~torch.isfinite(y)).sum().double(),
                         _dot64_t(s, y), _dot64_t(s, s)])
            for _, _, s, y in pairs
        ])
        accepted = []
        for (u, hist, s, y), (bad, sy, ss) in zip(pairs, checks):
            check = curvature_verdict(bad == 0, sy, ss)
            if not check.ok or check.sy <= hp["curvature_eps"] * check.ss:
                u.count("pairs_skipped")
            else:
                accepted.append((u, hist, hist.write_pair(s, y)))
        products = [pr for _, _, pr in accepted]
        self._plan.all_reduce_(products)
        for (u, hist, _), pr in zip(accepted, products):
            u.commit_push(hist, pr)

    def _summed(self, parts: list[Tensor]) -> list[list[float]]:
        """Each block's partial products summed over the ranks (one all-reduce), read back in one host sync."""
        flat = torch.stack(parts)
        self._plan.all_reduce_([flat])
        return flat.tolist()

    def _pair_vectors(self, u: MLBFGSBlock, hp: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """s = M^θ − M^θ_prev, y = M^g − M^g_prev over the block (this rank's pieces); the averages become
        the next pair's starting point. ``None`` at the block's first pair point."""
        first_pair_point = not bool(u.state["has_prev"])
        s_parts, y_parts = [], []
        for p in u.block.params:
            if "param_avg" not in self.state[p]:  # never had a gradient: no movement to pair
                if not first_pair_point:
                    n = self._plan.local(p).numel()
                    s_parts.append(torch.zeros(n, dtype=self._state_dtype(p), device=p.device))
                    y_parts.append(s_parts[-1])
                continue
            st = self.state[p]
            if not first_pair_point:
                s_parts.append((st["param_avg"] - st["param_avg_prev"]).reshape(-1))
                y_parts.append((st["grad_avg"] - st["grad_avg_prev"]).reshape(-1))
            st["param_avg_prev"].copy_(st["param_avg"])
            st["grad_avg_prev"].copy_(st["grad_avg"])
            if hp["grad_avg_reset"] and p.grad is not None:
                st["grad_avg"].copy_(self._plan.local_grad(p))
        u.state["has_prev"].fill_(True)
        if first_pair_point:
            return None
        return torch.cat(s_parts), torch.cat(y_parts)

    def _directions(self, units: list[MLBFGSBlock], step: int, hp: dict[str, Any]) -> list[Tensor]:
        """d = H g per block (compact L-BFGS), d = g before the first pair (a parameter without a gradient counts
        as zeros), then the ``normalize`` scaling (``step``, this step's count, bias-corrects the Adam grafting).

        Whole state on several ranks: each block's owner computes its direction, non-owners contribute zeros to
        one all-reduce. Split state: every rank computes its pieces of every direction from ``[Sᵀg; Yᵀg]``
        summed over the ranks (one all-reduce for all blocks)."""
        split_by_owner = not self._plan.sharded and world_size() > 1
        me = rank()
        out: list[Tensor] = []
        pending = []
        for u in units:
            b = u.block
            dtype = self._state_dtype(b.params[0])
            if split_by_owner and self.owners[b.name] != me:
                out.append(torch.zeros(u.local_numel, dtype=dtype, device=b.params[0].device))
                continue
            g = torch.cat([x.reshape(-1) for x in self._grads(b.params)]).to(dtype)
            out.append(g)  # d = g until the block has a pair (torch.cat made it a fresh tensor)
            hist = u.history(hp["gamma"])
            if len(hist) > 0:
                self.work_counter += 1
                pending.append((len(out) - 1, u, hist, g, hist.project(g)))
        self._plan.all_reduce_([P for *_, P in pending])
        for i, u, hist, g, P in pending:
            out[i] = u.finish(hist, g, P)
        if split_by_owner:
            all_reduce_sum_(out)
        mode = hp["normalize"]
        if mode in ("unit", "grad"):
            sums = [sum(float(torch.dot(d.double(), d.double())) for d in out), 1.0]
            if mode == "grad":
                local_grads = [self._plan.local_grad(p) for u in units for p in u.block.params]
                sums[1] = sum((float(x.double().pow(2).sum()) for x in local_grads if x is not None), 0.0)
            if self._plan.sharded:
                summed = torch.tensor(sums, dtype=torch.float64)
                self._plan.all_reduce_([summed])
                sums = summed.tolist()
            total, target = math.sqrt(sums[0]), (math.sqrt(sums[1]) if mode == "grad" else 1.0)
            if total > 0:
                out = [d * (target / total) for d in out]
        elif mode == "adam":
            which, grads, denom = self._adam_denominators(units, out, step)
            if hp["direction_rms"]:
                self._divide_by_rms(units, out, step, denom)
            out = self._graft_to_adam(units, out, which, grads, denom)
        return out

    def _grads(self, params: Sequence[Tensor]) -> list[Tensor]:
        """This rank's pieces of the gradients (zeros for a parameter without one)."""
        local = self._plan.local
        return [g if (g := self._plan.local_grad(p)) is not None else torch.zeros_like(local(p)) for p in params]

    def _adam_denominators(
        self, units: list[MLBFGSBlock], directions: list[Tensor], step: int
    ) -> tuple[list[int], list[Tensor], list[Tensor]]:
        """Adam's ``v ← β₂ v + (1−β₂) g²`` (β₂ = 0.999, bias-corrected with ``step``) for every parameter with a
        gradient, in that order: the block of each, its gradient (this rank's piece, in the direction's dtype) and
        its denominator ``√v̂ + ε`` (ε = 1e-8). Every rank keeps ``v`` for every parameter (like the momentum
        buffers), so replicas agree without communication; under split state each rank keeps its pieces."""
        which, vs, gs = [], [], []
        for i, u in enumerate(units):
            for p in u.block.params:
                g = self._plan.local_grad(p)
                if g is None:
                    continue
                st = self._param_state(p)
                if "exp_avg_sq" not in st:
                    st["exp_avg_sq"] = torch.zeros_like(g, dtype=directions[i].dtype,
                                                        memory_format=torch.contiguous_format)
                which.append(i)
                vs.append(st["exp_avg_sq"])
                gs.append(g.to(directions[i].dtype))
        return which, gs, adam_denominators_(vs, gs, _ADAM_BETA2, step, _ADAM_EPS)

    def _divide_by_rms(
        self, units: list[MLBFGSBlock], directions: list[Tensor], step: int, denom: list[Tensor]
    ) -> None:
        """``direction_rms``: each entry of each block's direction divided in place by its own running RMS and
        weighted by how far its gradient's RMS stands above ε, ``d ← d · (1 − ε / (√v̂ + ε)) / (√v̂_d + ε)`` with
        ``v_d ← β₂ v_d + (1 − β₂) d²`` (the grafting's β₂ and ε, bias-corrected with ``step``; ``denom``: the
        gradients' ``√v̂ + ε`` from :meth:`_adam_denominators`), over the parameters that have a gradient (the
        others' entries are kept; the weight: :func:`weight_by_gradient_signal_`, for the entries L-BFGS's pairs
        echo into a coordinate without gradient). ``v_d`` is per element like Adam's ``v`` (this rank's pieces
        under split state); multi-tensor kernels over all parameters. The directions are this step's own tensors,
        so they are divided where they are."""
        pieces, vs = [], []
        for u, d in zip(units, directions):
            offset = 0
            for p in u.block.params:
                g = self._plan.local_grad(p)
                n = self._plan.local(p).numel()
                if g is not None:
                    st = self._param_state(p)
                    if "direction_sq" not in st:
                        st["direction_sq"] = torch.zeros_like(g, dtype=d.dtype, memory_format=torch.contiguous_format)
                    pieces.append(d[offset : offset + n].view_as(st["direction_sq"]))
                    vs.append(st["direction_sq"])
                offset += n
        if pieces:
            torch._foreach_div_(pieces, adam_denominators_(vs, pieces, _ADAM_BETA2, step, _ADAM_EPS))
            weight_by_gradient_signal_(pieces, denom, _ADAM_EPS)

    def _graft_to_adam(
        self, units: list[MLBFGSBlock], directions: list[Tensor], which: list[int], gs: list[Tensor],
        denom: list[Tensor],
    ) -> list[Tensor]:
        """Rescale each block's direction to the norm of Adam's un-momented step in that block, ``‖g / (√v̂ + ε)‖``
        over its parameters that have a gradient (``which``, ``gs``, ``denom``: from :meth:`_adam_denominators`):
        layer-wise grafting (Agarwal et al. 2020), as Distributed Shampoo grafts its blocks (under split state the
        squared norms are summed over the ranks). Multi-tensor kernels over all parameters."""
        dev = directions[0].device
        adam_norms = torch._foreach_norm(torch._foreach_div(gs, denom))
        adam_sq = torch.stack([n.to(dev, torch.float64) for n in adam_norms]).square()
        sq = torch.zeros(len(units), dtype=torch.float64, device=dev)
        sq.index_add_(0, torch.tensor(which, device=dev), adam_sq)
        dn = torch.stack([n.to(dev, torch.float64) for n in torch._foreach_norm(directions)])
        if self._plan.sharded:  # this rank's pieces: sum the squares over the ranks
            both = torch.cat([sq, dn.square()])
            self._plan.all_reduce_([both])
            sq, dn = both[: len(units)], both[len(units) :].sqrt()
        scale = torch.where(dn > 0, sq.sqrt() / dn.clamp_min(1e-300), torch.ones_like(dn))
        return [d * s.to(d.device, d.dtype) for d, s in zip(directions, scale.unbind())]

    def _apply(self, units: list[MLBFGSBlock], directions: list[Tensor]) -> None:
        """b ← μ b + d;  θ ← θ(1 − α λ_wd) − α b, with multi-tensor kernels per parameter group, for the
        parameters with a gradient."""
        per_group: dict[int, tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]]] = {}
        for u, d in zip(units, directions):
            offset = 0
            for p in u.block.params:
                piece = self._plan.local(p)
                n = piece.numel()
                if p.grad is not None:
                    group = self._group_of(p)
                    _, ps, pieces, ds = per_group.setdefault(id(group), (group, [], [], []))
                    ps.append(p)
                    pieces.append(piece)
                    ds.append(d[offset : offset + n].view_as(piece))
                offset += n
        for group, params, ps, ds in per_group.values():
            mu, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
            upd = ds
            if mu > 0:
                upd = [self._param_state(p)["momentum_buffer"] for p in params]
                torch._foreach_mul_(upd, mu)
                torch._foreach_add_(upd, ds)
            if wd != 0:
                torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, [u.to(p.dtype) for u, p in zip(upd, ps)], alpha=-lr)

    # ------------------------------------------------------------------ state helpers
    @staticmethod
    def _state_dtype(p: Tensor) -> torch.dtype:
        """Averages and buffers in float32 (float64 for a float64 model)."""
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _param_state(self, p: Tensor) -> dict[str, Any]:
        st = self.state[p]
        if "param_avg" not in st:
            piece = self._plan.local(p)
            for k in MLBFGS_PARAM_KEYS:
                st[k] = torch.zeros_like(piece, dtype=self._state_dtype(p), memory_format=torch.contiguous_format)
        return st

    def _global_state(self) -> dict[str, Any]:
        out = {"format": FORMAT, "optimizer": "MLBFGS", **self.counters}
        if self._plan.sharded:
            out["shards"] = self._plan.signature()
        return out

    def _layout(self) -> list[list[Any]]:
        return [[b.name, b.numel] for b in self.blocks]

    def _load_global_state(self, saved: dict[str, Any]) -> None:
        self.counters = {k: saved[k] for k in ("step", "steps_skipped_nonfinite")}

    def _upgrade(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Format 1 (flat keys) -> 2, through :func:`~hf_qn.optim.state.convert_mlbfgs_v1`."""
        if not is_v1(state_dict):
            return state_dict
        id_of = {id(p): pid for pid, p in self._saved_ids(state_dict).items()}
        return convert_mlbfgs_v1(state_dict, id_of[id(self.blocks[0].params[0])])

    def state_dict(self) -> dict[str, Any]:
        """torch's ``{"state", "param_groups"}`` plus ``"hf_qn"``, the optimizer-wide state.

        Under split state the tensors are this rank's pieces. Under FSDP2 they are DTensors sharded like their
        parameters, as torch's optimizers' are, so that ``torch.distributed.checkpoint`` (what the Trainer and
        ``accelerator.save_state`` use with FSDP) saves them by parameter name and reshards them for another
        number of ranks: each parameter's columns of its block's history become a ``(m, *shape)`` DTensor of its
        own (``"columns"``), and the optimizer-wide entry is also kept in the state of the first block's first
        parameter (``get_optimizer_state_dict`` keeps only ``"state"`` and ``"param_groups"``) with a marker of
        the rank that wrote each piece."""
        self._follow_swapped_parameters()
        sd = super().state_dict()  # under FSDP2 with the optimizer-wide state embedded
        return self._as_dtensors(sd) if self._plan.kind == "fsdp2" else sd

    def _as_dtensors(self, sd: dict[str, Any]) -> dict[str, Any]:
        """:meth:`state_dict`'s FSDP2 form of this rank's pieces (see there)."""
        plan, params = self._plan, self._saved_ids(sd)
        assert isinstance(plan, FullyShardedPlan)
        pid_of = {id(p): pid for pid, p in params.items()}
        columns: dict[Any, dict[str, Tensor]] = {}
        state = {}
        for pid, saved in sd["state"].items():
            p, st = params[pid], dict(saved)
            for k in _ELEMENT_KEYS:
                if k in st:
                    st[k] = plan.like_param(p, st[k])
            if "history" in st.get("block", {}):
                hist = dict(st["block"]["history"])
                S, Y = hist.pop("S"), hist.pop("Y")
                offset = 0
                for q in self._unit_of_first[id(p)].block.params:
                    n = plan.local(q).numel()
                    columns[pid_of[id(q)]] = {key: plan.like_param(q, M[:, offset : offset + n], rows=M.shape[0])
                                              for key, M in (("S", S), ("Y", Y))}
                    offset += n
                st["block"] = {**st["block"], "history": hist}
            state[pid] = st
        for pid, cols in columns.items():
            state.setdefault(pid, {})["columns"] = cols
        home = next(pid for pid, st in state.items() if HF_QN in st)  # _embed_global's entry: the marker joins it
        state[home] = {**state[home], HF_QN: {**state[home][HF_QN], "ranks": plan.rank_marker()}}
        return {**sd, "state": state}

    def _from_columns(self, sd: dict[str, Any]) -> dict[str, Any]:
        """The block layout from :meth:`state_dict`'s FSDP2 form, or from the whole tensors that
        ``get_optimizer_state_dict(..., full_state_dict=True)`` gathers from it: each block's ``S`` and ``Y`` joined
        from its parameters' columns; DTensors replaced by this rank's pieces, once the rank marker shows that
        they are this rank's (refused otherwise)."""
        from ..distributed import is_dtensor

        marker = next((st[HF_QN]["ranks"] for st in sd["state"].values() if "ranks" in st.get(HF_QN, {})), None)
        sd = self._extract_global(sd)
        glob = sd.get(HF_QN)
        if glob is None or not any("columns" in st for st in sd["state"].values()):
            return sd  # the block layout already (one process, ZeRO-1 pieces, an older state)
        pieces = marker is not None and is_dtensor(marker)
        if pieces:
            assert marker is not None
            plan = self._plan
            got = marker.to_local()
            if plan.kind != "fsdp2":
                raise ValueError(
                    "MLBFGS.load_state_dict: this state holds one rank's DTensor pieces of an FSDP2 run, and this "
                    f"optimizer's state is {plan.kind}; load a whole state instead: full_state_dict(), or "
                    "get_optimizer_state_dict(..., options=StateDictOptions(full_state_dict=True)) on the FSDP2 run"
                )
            lo, hi = chunk_range(marker.shape[0], plan.world, plan.rank)
            if not torch.equal(got, torch.arange(lo, hi)):
                wrote = f"elements {int(got[0])}-{int(got[-1])} of the rank marker" if got.numel() else "none"
                raise ValueError(
                    f"MLBFGS.load_state_dict: these DTensor pieces are another rank's ({wrote}; this is rank "
                    f"{plan.rank} of {plan.world}): a file saved per rank loads only on the rank that wrote it. Load "
                    "through torch.distributed.checkpoint, which reshards by parameter name for any number of ranks, "
                    "or save a full_state_dict()"
                )

        params = self._saved_ids(sd)
        state = {}
        for pid, saved in sd["state"].items():
            st = {k: v for k, v in saved.items() if k != "columns"}
            for k in _ELEMENT_KEYS:
                if k in st:
                    st[k] = local_piece(st[k])
            state[pid] = st
        pid_of = {id(p): pid for pid, p in params.items()}
        for pid, st in state.items():
            unit = self._unit_of_first.get(id(params[pid]))
            if unit is None or "history" not in st.get("block", {}) or "S" in st["block"]["history"]:
                continue
            joined = {}
            for key in ("S", "Y"):
                parts = [local_piece(sd["state"][pid_of[id(q)]]["columns"][key]) for q in unit.block.params]
                joined[key] = torch.cat([c.reshape(c.shape[0], -1) for c in parts], dim=1)
            st["block"] = {**st["block"], "history": {**st["block"]["history"], **joined}}
        glob = {k: v for k, v in glob.items() if k != "shards"}
        if pieces:
            glob["shards"] = self._plan.signature()
        return {**sd, "state": state, HF_QN: glob}

    @property
    def _unit_of_first(self) -> dict[int, MLBFGSBlock]:
        return {id(u.block.params[0]): u for u in self.units}

    def full_state_dict(self) -> dict[str, Any]:
        """The whole state, as one process holds it: loads into an ``MLBFGS`` on one process or on any number
        of ranks, with whole or split state (a split optimizer keeps its pieces of it). Equal to
        :meth:`state_dict` when the state is whole; under split state a collective (every rank calls it and
        gets the whole dict)."""
        self._follow_swapped_parameters()
        sd = super().state_dict()
        if not self._plan.sharded:
            return sd
        plan, params = self._plan, self._saved_ids(sd)
        first_of = self._unit_of_first
        state = {}
        for pid in sorted(sd["state"]):  # the same order on every rank: the gathers pair up
            p, st = params[pid], dict(sd["state"][pid])
            for k in _ELEMENT_KEYS:
                if k in st:
                    st[k] = plan.gather(p, st[k].reshape(1, -1)).reshape(p.shape)
            if "history" in st.get("block", {}):
                hist = dict(st["block"]["history"])
                for key in ("S", "Y"):
                    pieces, offset = [], 0
                    for q in first_of[id(p)].block.params:
                        n = plan.local(q).numel()
                        pieces.append(plan.gather(q, hist[key][:, offset : offset + n]))
                        offset += n
                    hist[key] = torch.cat(pieces, dim=1)
                st["block"] = {**st["block"], "history": hist}
            state[pid] = st
        sd["state"] = state
        sd[HF_QN] = {k: v for k, v in sd[HF_QN].items() if k != "shards"}
        return sd

    def _pieces_of(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """This rank's pieces of a whole state (:meth:`full_state_dict`, or one process's ``state_dict()``)."""
        plan, params = self._plan, self._saved_ids(state_dict)
        first_of = self._unit_of_first
        state = {}
        for pid, saved in state_dict["state"].items():
            p, st = params[pid], dict(saved)
            lo, hi = plan.flat_range(p)
            shape = plan.local(p).shape
            for k in _ELEMENT_KEYS:
                if k in st:
                    if st[k].numel() != p.numel():
                        raise ValueError(
                            f"MLBFGS.load_state_dict: state {k!r} of parameter {self._names.get(id(p), pid)!r} has "
                            f"{st[k].numel()} elements, the parameter {p.numel()}: it was written for another model"
                        )
                    st[k] = st[k].reshape(-1)[lo:hi].reshape(shape).clone()
            if "history" in st.get("block", {}):
                hist = dict(st["block"]["history"])
                starts = [0]
                for q in first_of[id(p)].block.params:
                    starts.append(starts[-1] + q.numel())
                for key in ("S", "Y"):
                    hist[key] = torch.cat([
                        hist[key][:, start + a : start + b]
                        for q, start in zip(first_of[id(p)].block.params, starts)
                        for a, b in [plan.flat_range(q)]
                    ], dim=1).clone()
                st["block"] = {**st["block"], "history": hist}
            state[pid] = st
        return {**state_dict, "state": state}

    def _check_direction_rms(self, state_dict: dict[str, Any]) -> None:
        """Refuse a state grafted without ``direction_rms`` (Adam's ``v`` but no ``v_d``) in an optimizer with it:
        ``v_d`` would restart from zero mid-run, so the next steps would not be the saved run's."""
        params = self._saved_ids(state_dict)
        for pid, st in state_dict.get("state", {}).items():
            p = params.get(pid)
            if p is not None and "exp_avg_sq" in st and "direction_sq" not in st and self._group_of(p)["direction_rms"]:
                raise ValueError(
                    f"MLBFGS.load_state_dict: the state of parameter {self._names.get(id(p), pid)!r} was written "
                    "without direction_rms (it has Adam's exp_avg_sq but no direction_sq); construct the optimizer "
                    "with direction_rms=False to resume it exactly"
                )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s output. Under split state a rank loads the pieces it saved itself (same rank
        of the same number of ranks), or splits a whole state (:meth:`full_state_dict`, or one process's)."""
        self._follow_swapped_parameters()
        state_dict = self._from_columns(self._upgrade(state_dict))
        saved = state_dict.get(HF_QN, {}).get("shards")
        mine = self._plan.signature() if self._plan.sharded else None
        if saved is not None and saved != mine:
            here = (f"rank {mine['rank']} of {mine['world_size']} ({mine['kind']})" if mine
                    else "whole (not split over ranks)")
            raise ValueError(
                f"MLBFGS.load_state_dict: this state is rank {saved['rank']}'s piece of a state split over "
                f"{saved['world_size']} ranks ({saved['kind']}), and this optimizer's state is {here}. A piece loads "
                "only into the same rank of the same split; to change the number of ranks, call full_state_dict() "
                "on every rank of the run that wrote it and load that whole state instead"
            )
        ours = state_dict.get(HF_QN, {}).get("optimizer") == "MLBFGS"  # else the base class says whose it is
        if ours:
            self._check_layout(state_dict[HF_QN])
            self._check_direction_rms(state_dict)
        if saved is None and mine is not None and ours:
            state_dict = self._pieces_of(state_dict)
        params = self._saved_ids(state_dict)
        first_of = self._unit_of_first
        for pid, st in state_dict.get("state", {}).items():
            hist = st.get("block", {}).get("history")
            unit = first_of.get(id(params.get(pid)))
            if hist is not None and unit is not None and hist["S"].shape[1] != unit.local_numel:
                raise ValueError(
                    f"MLBFGS state for block {unit.name!r} has {hist['S'].shape[1]} elements but the block has "
                    f"{unit.local_numel} here: the block layout (blocks=, min_block_size=) differs from the saved run"
                )
        super().load_state_dict(state_dict)
