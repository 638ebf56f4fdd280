"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton (Goldfarb, Ren & Bahamou, NeurIPS 2020).

Per adapted layer the inverse Hessian block is approximated by ``H_g ⊗ H_a`` and the step is

    W̄ ← W̄ − α · H_g · ĝ · H_a                                   (paper, eq. 3; Algorithm 1 line 7)

where ``ĝ`` is the momentum-averaged gradient (with L2), ``H_a`` approximates ``(A + √λ I)⁻¹`` for the
input second moment ``A = E[ā āᵀ]`` and ``H_g`` approximates the inverse of the Hessian of the loss with
respect to the layer's pre-activations, learned by BFGS (K-BFGS) or L-BFGS (K-BFGS(L)) from the pair

    s = mean h(θ⁺) − mean h(θ),   y = Σ ∂L/∂h(θ⁺) − Σ ∂L/∂h(θ)    (same minibatch at both points)

with "double damping" (Powell on ``H_g``, then Levenberg-Marquardt with ``μ₂ = √λ``).

The contract of :meth:`KBFGS.step`: it is called after the user's backward (gradients are there); on
curvature steps ``closure`` re-evaluates **the same batch** at the current parameters, calls backward
and returns the loss. The closure's gradients never leak: ``.grad`` is restored after it runs.
"""


from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..adapters import LayerAdapter, LayerAssignment, LayerPolicy, assign_layers
from ..adapters.registry import FallbackParam, transformers_embedding
from ..capture import Capture
from ..distributed import is_dtensor
from ..distributed.shards import local_piece
from ..linalg import finite_flags
from ._base import ROLE, ROLE_FALLBACK, ROLE_QN, QNOptimizerBase, adamw_state_
from .config import MATMUL_DTYPES, KBFGSConfig
from .guards import CurvatureSchedule, GrowthGuard, KLClip, LossGuard, StepBackoff
from .kbfgs_layer import (
    KroneckerLayer,
    PairHyper,
    grads_with_l2,
    graft_to_adam,
    layer_statistics,
    update_input_factors,
    update_input_inverses,
    update_momenta,
    update_output_sides,
)
from .kbfgs_pass import add_to_layers, run_closure, second_pass
from .kbfgs_stats import LayerMeans, reduce_statistics
from .output_side import KFACOutput, inverse_phases, output_side_for, refresh_kfac_factors
from .state import FORMAT, KBFGS_LAYER_COUNTERS, KBFGS_LAYER_KEYS, convert_kbfgs_v1, is_v1, iter_tensors

logger = logging.getLogger(__name__)

__all__ = ["KBFGS", "KBFGSL", "MATMUL_DTYPES", "KBFGSConfig"]

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(KBFGSConfig))


class KBFGS(QNOptimizerBase):
    """K-BFGS (``history_size=None``: dense BFGS ``H_g``) or K-BFGS(L) (``history_size=p``: L-BFGS ``H_g``).

    Args:
        model: the model; its Linear, Conv2d, Embedding and transformers Conv1D layers are adapted
            according to ``policy`` and every other trainable parameter goes to the fallback.
        no_decay: names (as in ``model.named_parameters()``) of parameters that get no weight
            decay, e.g. the Trainer's no-decay set. (default: none)
        policy: which layers are adapted (:class:`~hf_qn.adapters.LayerPolicy`).
        grad_scaler: a ``torch.amp.GradScaler`` (or anything with ``get_scale()``) when training in
            fp16, so that captured output gradients are unscaled. (default: None)
        config: a :class:`~hf_qn.optim.config.KBFGSConfig`; keyword ``hyperparameters`` override its fields.
        preset: start from a named configuration instead of the defaults: ``"paper"`` is the K-BFGS paper's
            autoencoder setting (``KBFGSConfig.PRESETS``); keyword ``hyperparameters`` override it.
        **hyperparameters: the fields of :class:`~hf_qn.optim.config.KBFGSConfig` (``lr``, ``damping``,
            ``update_interval``, ...), each documented there with its default.

    Raises:
        ValueError, TypeError: for a bad hyperparameter (naming it), or a model with no adaptable layer.
    """

    _CURVATURE_KEYS = frozenset({*KBFGS_LAYER_KEYS, "graft"})
    #: ``polar_steps`` came with the default 0, before its default followed the output side
    _TRAINED_WITHOUT: ClassVar[dict[str, Any]] = {"polar_steps": 0}
    #: the keys of :meth:`statistics` that count events since the start (the others are current values).
    COUNTERS = frozenset(f"qn/{k}" for k in (*KBFGS_LAYER_COUNTERS, "steps_skipped_nonfinite", "steps_rejected",
                                             "steps_clipped", "loss_checks"))

    def __init__(
        self,
        model: nn.Module,
        *,
        no_decay: Iterable[str] = (),
        policy: LayerPolicy | None = None,
        grad_scaler: Any = None,
        config: KBFGSConfig | None = None,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KBFGS needs the model (an nn.Module) to find its layers, got {type(model).__name__}; "
                "use hf_qn.MLBFGS for a plain iterable of parameters"
            )
        if isinstance(no_decay, str):
            raise TypeError(
                f"Invalid no_decay: {no_decay!r} (must be a collection of parameter names, e.g. [{no_decay!r}])"
            )
        if policy is not None and not isinstance(policy, LayerPolicy):
            raise TypeError(f"Invalid policy: {policy!r} (must be an hf_qn.LayerPolicy or None)")
        if config is not None and not isinstance(config, KBFGSConfig):
            raise TypeError(f"Invalid config: {config!r} (must be an hf_qn.optim.config.KBFGSConfig or None)")
        misplaced, _ = LayerPolicy.split_kwargs(hyperparameters)
        if misplaced:
            given = ", ".join(f"{k}={v!r}" for k, v in misplaced.items())
            raise TypeError(f"Invalid hyperparameters {sorted(misplaced)}: fields of LayerPolicy (which layers are "
                            f"adapted, and how); pass policy=hf_qn.LayerPolicy({given})")
        requested = KBFGSConfig.from_kwargs(config, **hyperparameters)
        cfg = resolve_for_model(requested, model)
        sparse = [n for n, m in model.named_modules() if getattr(m, "sparse", False) is True]
        if sparse:
            raise ValueError(
                f"KBFGS needs dense gradients, and {sparse} produce sparse ones: construct them with sparse=False"
            )
        # layers too wide for an output factor and a tied head are adapted one-sided when steps are grafted
        policy = (policy or LayerPolicy()).resolved(grafted=cfg.graft == "adam")
        assignment = assign_layers(model, policy)
        if requested.fallback_embedding_lr == "auto" and cfg.fallback_embedding_lr is not None and any(
            f.embedding for f in assignment.fallback
        ):  # said only where it applies: not to a tied embedding (the head's) or an adapted one
            logger.info("KBFGS: fallback_embedding_lr='auto' is %g (lr / %g, a language model trained from scratch) "
                        "for the untied input embedding; pass it to choose, or None for the fallback's lr",
                        cfg.fallback_embedding_lr, EMBEDDING_LR_DIVISOR)
        unknown = sorted(set(no_decay) - set(assignment.param_names.values()))
        if unknown:
            raise ValueError(
                f"Invalid no_decay: {unknown} name no parameter of the model (names as in model.named_parameters())"
            )
        if not assignment.adapters:
            raise ValueError(
                "The model has no adaptable layer (nn.Linear, nn.Conv2d, nn.Embedding, transformers Conv1D) "
                "under the given policy; K-BFGS has nothing to precondition. Assignment:\n" + assignment.report()
            )
        super().__init__(_param_groups(assignment, cfg, set(no_decay)), dataclasses.asdict(cfg))
        self._check_sharded_parameters()
        self._refuse_unsupported_parameters()
        self.model, self.policy = model, policy
        self.assignment: LayerAssignment = assignment
        self.adapters: list[LayerAdapter] = assignment.adapters
        self.layers = [_new_layer(ad, cfg) for ad in self.adapters]
        # the phases that stagger the K-FAC output factors' re-inversions (output_inverse_interval)
        self._inverse_phases = inverse_phases([la.output for la in self.layers])
        self.schedule = CurvatureSchedule(cfg.update_interval, cfg.warmup_steps)
        self.kl_clip = KLClip(cfg.kl_clip)
        self.backoff = StepBackoff()
        self.growth_guard = GrowthGuard(cfg.max_update_growth, len(self.layers))
        self.loss_guard = LossGuard(cfg.max_loss_increase)
        self._use_config(cfg)
        self.counters: dict[str, Any] = {"steps_skipped_nonfinite": torch.tensor(0, dtype=torch.int64)}
        self._bind_layers()
        self.grad_scaler = grad_scaler
        self.capture = Capture(self.adapters, grad_scale=self._current_scale if grad_scaler is not None else None,
                               input_splits=[la.input_split for la in self.layers],
                               output_grams=[la.output_gram for la in self.layers],
                               output_means=[la.forms_pairs for la in self.layers])
        self.capture.attach()
        self._training = True
        #: called in place of a missing closure on curvature steps (set by QNTrainer).
        self.closure_provider: Callable[[], Any] | None = None
        self._schedule_capture()

    # ------------------------------------------------------------------ copies
    # A copy (deepcopy, pickle) works on copies of the layers, with its own hooks on them; it has no
    # closure_provider (a Trainer's bound method): QNTrainer wires the optimizer it is given again.
    _PICKLED_ATTRS = ("model", "policy", "config", "_config_values", "assignment", "adapters", "layers", "schedule",
                      "kl_clip", "backoff",
                      "growth_guard", "loss_guard", "counters", "grad_scaler", "capture", "_training")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict, with state and param_groups only
        if not hasattr(self, "closure_provider"):
            self.closure_provider = None
        if "layers" in self.__dict__:
            self._bind_layers()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch.optim's ``add_param_group`` (e.g. progressive unfreezing, a module added to the model): a new
        parameter whose whole layer is in the group and adaptable joins K-BFGS as a layer of its own; every
        other one joins the fallback. The group's own values (``lr``, ``l2`` / ``weight_decay``, ...) apply;
        missing ones come from the defaults (the fallback's ``lr`` is ``fallback_lr``)."""
        if "layers" not in self.__dict__:  # torch.optim.Optimizer.__init__ adds the constructor's groups
            super().add_param_group(param_group)
            return
        params = [param_group["params"]] if isinstance(param_group["params"], Tensor) else list(param_group["params"])
        ids = {id(p) for p in params}
        fresh = assign_layers(self.model, self.policy)
        adapters = [ad for ad in fresh.adapters if all(id(p) in ids for p in ad.parameters())]
        adapted = {id(p) for ad in adapters for p in ad.parameters()}
        rest = {k: v for k, v in param_group.items() if k != "params"}
        layer_params = [p for p in params if id(p) in adapted]
        other = [p for p in params if id(p) not in adapted]
        if layer_params:
            super().add_param_group({**rest, "params": layer_params, ROLE: ROLE_QN})
        if other:
            super().add_param_group({**_fallback_values(self.config), **rest, "params": other, ROLE: ROLE_FALLBACK})
        for ad in adapters:
            self.adapters.append(ad)
            self.layers.append(_new_layer(ad, self.config))
            la = self.layers[-1]
            self.capture.add(ad, la.input_split, la.output_gram, la.forms_pairs)
        names = dict(fresh.param_names)
        self.assignment.param_names.update(names)
        self.assignment.fallback += [FallbackParam(names.get(id(p), "?"), p, "added with add_param_group")  # type: ignore[arg-type]
                                     for p in other]
        refs = self.growth_guard.state["ref_step_sizes"]
        self.growth_guard.state["ref_step_sizes"] = torch.cat([refs, refs.new_zeros(len(adapters))])
        self._bind_layers()
        self._schedule_capture()

    def _use_config(self, cfg: KBFGSConfig) -> None:
        """Hand the configuration to the parts that read it (the guards and the schedule)."""
        self.config, self._config_values = cfg, dataclasses.asdict(cfg)
        self.schedule.interval, self.schedule.warmup = cfg.update_interval, cfg.warmup_steps
        self.kl_clip.kl_clip = cfg.kl_clip
        self.growth_guard.max_growth = cfg.max_update_growth
        self.loss_guard.max_increase = cfg.max_loss_increase

    def _sync_config(self) -> None:
        """The hyperparameters live in ``param_groups`` (as in torch.optim: a user or a loaded checkpoint may
        change them); the configuration follows the first K-BFGS group. ``lr`` and ``l2`` are read from each
        layer's own group where they are used (a scheduler changes ``lr`` every step), so ``config`` keeps the
        configured values of those two."""
        hp = {**self.hparams, "lr": self.config.lr, "l2": self.config.l2}
        if hp != self._config_values:
            for name in ("history_size", "output_side", "max_block_dim"):
                if hp[name] != getattr(self.config, name):
                    raise ValueError(
                        f"KBFGS: {name} changed from {getattr(self.config, name)} to {hp[name]} in param_groups; "
                        "the factors cannot change kind or shape during training"
                    )
            self._use_config(KBFGSConfig.from_kwargs(**hp))

    def _bind_layers(self) -> None:
        for la in self.layers:
            w = la.adapter.weight  # outside forward: under FSDP2 the sharded DTensor
            la.bind(self.state[w])
            la.adapter.sharded_weight = w if is_dtensor(w) else None
        self._bound_params = [id(p) for p in self._params()]

    def _follow_swapped_parameters(self) -> None:
        """Accelerate's FSDP2 path builds the optimizer on the plain model, then puts the sharded DTensors (the
        modules' parameters now) into ``param_groups``: bind the layers to their state and forget the cached
        groups. Refused once steps were taken, since the state would stay with the old parameters."""
        if [id(p) for p in self._params()] == self.__dict__.get("_bound_params"):
            return
        current = {id(p) for p in self._params()}
        if any(True for p, st in self.state.items() if id(p) not in current for _ in iter_tensors(st)):
            raise RuntimeError(
                "KBFGS: the parameters in param_groups were replaced after the optimizer had taken steps; build "
                "the optimizer on the wrapped (sharded) model, or let accelerate.prepare swap them before training"
            )
        for p in [p for p in self.state if id(p) not in current]:  # the replaced parameters' (empty) entries
            del self.state[p]
        self._group_cache = None
        self._bind_layers()

    # ------------------------------------------------------------------ public helpers
    @property
    def hparams(self) -> dict[str, Any]:
        """The K-BFGS hyperparameters in use (from the first K-BFGS param group)."""
        g = next(g for g in self.param_groups if g[ROLE] == ROLE_QN)
        return {k: g.get(k, self.defaults[k]) for k in _CONFIG_FIELDS}

    def train(self, mode: bool = True) -> KBFGS:
        """Enable statistic capture (the Trainer and Accelerate call this before each training step)."""
        self._training = mode
        self._schedule_capture()
        return self

    def eval(self) -> KBFGS:
        """Disable statistic capture (called before evaluation)."""
        return self.train(False)

    def remove_hooks(self) -> None:
        """Detach the capture hooks from the model (the optimizer cannot update curvature afterwards)."""
        self.capture.detach()

    def set_grad_scaler(self, scaler: Any) -> None:
        """Unscale captured output gradients by ``scaler.get_scale()`` (fp16 training)."""
        self.grad_scaler = scaler
        self.capture.grad_scale = self._current_scale if scaler is not None else None

    def curvature_step_next(self) -> bool:
        """Whether the next call to :meth:`step` updates curvature (and so needs the closure), whatever
        the train/eval mode is right now."""
        self._sync_config()
        return self.schedule.due()

    def statistics(self, factor_norms: bool = True) -> dict[str, float]:
        """Counters for logging (keys prefixed ``qn/``) and, with ``factor_norms``, the largest eigenvalues of the
        factors (``qn/max_norm_H_g``, ``qn/max_norm_H_a``; NaN if a factor is not finite), estimated by 30
        batched Lanczos steps that read every factor 30 times: on MiniLM's 76 factors about half a step's time
        on a CPU, so the Trainer logs them only when asked (``qn_log_factor_norms``)."""
        out = layer_statistics(self.layers, factor_norms)
        out["qn/steps_skipped_nonfinite"] = float(self.counters["steps_skipped_nonfinite"])
        out["qn/steps_rejected"] = float(self.loss_guard.state["steps_rejected"])
        out["qn/steps_clipped"] = float(self.growth_guard.state["steps_clipped"])
        out["qn/loss_checks"] = float(self.loss_guard.state["loss_checks"])
        out["qn/step_backoff"] = self.backoff.factor
        n_ad, n_fb = self.assignment.trainable_numels()
        out["qn/fallback_share"] = n_fb / max(n_ad + n_fb, 1)
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One K-BFGS step (paper, Algorithm 1). Called after the caller's backward, ``closure`` re-evaluates
        the same batch at the new point, which same-batch curvature steps need; called without a backward
        before it, as torch.optim documents, the closure first computes the loss and the gradients. Returns
        the closure's loss."""
        try:
            return self._step(closure)
        finally:
            self._remember_gradients()

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        self._follow_swapped_parameters()
        self._check_sharded_parameters()
        self._sync_config()
        curvature = bool(self.capture.enabled)
        loss = self._first_pass(closure)  # torch.optim's call: the closure gives the loss and the gradients
        if not any(p.grad is not None for p in self._params()):
            return loss  # nothing has a gradient: nothing moves (as in torch.optim)
        closure = self._closure_for(curvature, closure)
        if not self._all_grads_finite(self._params()):
            self.capture.reset()
            return self._skip("non-finite gradient; step skipped, curvature untouched", loss)
        active = [la.adapter.weight.grad is not None for la in self.layers]  # the others are paused
        snapshot = self._snapshot(active) if curvature and self.config.pairs == "same_batch" else None
        # A, ā, h̄, ḡ of this batch: captured sums -> means, all-reduced over ranks         (Alg. 1, line 4)
        now = self._commit_statistics() if curvature else None
        # A ← β_A A + (1−β_A) A_batch                                                       (Alg. 1, line 5)
        a_means = self._update_input_factors(now, active) if now is not None else []
        # [output_side="kfac": G ← β_A G + (1−β_A) G_batch, H_g = (Ĝ + √λ I)⁻¹]
        if now is not None:
            self._update_kfac_outputs(now, active)
        # ĝ ← ρ ĝ + (1−ρ)(∇W̄ + τ W̄);  D = H_g ĝ H_a   [nesterov: D = H_g (ρ ĝ + (1−ρ)(∇W̄ + τ W̄)) H_a] (eq. 3)
        found = self._directions(active)
        if found is None:
            return self._skip("non-finite direction; step skipped", loss)
        directions, norms, sources = found
        # ν: KL clip × loss-guard back-off, then no layer's step outgrows its last curvature step's
        lrs = self._layer_lrs()
        scale = self._kl_scale(directions, sources, lrs) * self.backoff.factor
        sizes, scale = self._limit_growth(directions, norms, lrs, scale, curvature)
        # W̄ ← W̄ − α ν D; the fallback parameters by AdamW / SGD                             (Alg. 1, line 7)
        self._apply(directions, lrs, scale)
        kept = True
        if now is not None:
            if snapshot is not None:
                # s = h̄(θ⁺) − h̄(θ), y = ḡ(θ⁺) − ḡ(θ) on the same batch; undone if its loss rose (Alg. 1, l. 9)
                assert closure is not None
                loss, kept = self._same_batch_pairs(closure, now, directions, scale, active, snapshot)
            else:  # s = h̄_k − h̄_{k−1}, y = ḡ_k − ḡ_{k−1} of consecutive curvature batches
                self._consecutive_pairs(now, active)
            # H_a by Hessian-action BFGS: s_a = H_a ā, y_a = (A + √λ I) s_a             (section 3.3)
            update_input_inverses(self.layers, a_means, self._cholesky_interval(), self._sqrt_lam(),
                                  self.config.curvature_eps)
        if kept and curvature and sizes:
            self.growth_guard.remember(sizes, scale)
        self.schedule.advance()
        self._schedule_capture()
        return loss

    # -- stages of step() ----------------------------------------------------------------------
    def _closure_for(self, curvature: bool, closure: Callable[[], Any] | None) -> Callable[[], Any] | None:
        """The closure of a same-batch curvature step (the Trainer's provider when none is passed)."""
        if not curvature or self.config.pairs != "same_batch" or closure is not None:
            return closure
        if self.closure_provider is not None:
            return self.closure_provider
        raise RuntimeError(
            "KBFGS.step() with pairs='same_batch' (the paper's, as in preset='paper') needs a closure on "
            "curvature steps: a function that re-evaluates the same batch "
            "at the current parameters, calls backward and returns the loss, e.g. "
            "optimizer.step(lambda: compute_loss(model, batch).backward() or ...). Use hf_qn.QNTrainer with "
            "the Trainer, pass the closure through accelerator's optimizer.step(closure), or construct "
            "KBFGS(..., pairs='consecutive') (the default) for the no-second-pass mode."
        )

    def _skip(self, why: str, loss: Any) -> Any:
        self.counters["steps_skipped_nonfinite"] += 1
        warnings.warn(f"KBFGS: {why}", RuntimeWarning, stacklevel=3)
        return loss

    def _first_pass(self, closure: Callable[[], Any] | None) -> Any:
        """torch.optim's ``step(closure)``: when no parameter has a fresh gradient (none, or only those the
        last step used), the closure computes the loss and the gradients (with capture on, as a training
        forward). Otherwise the caller's backward already ran and the closure is kept for the second pass."""
        if closure is None or self._fresh_gradients():
            return None
        with torch.enable_grad():
            return closure()

    def _fresh_gradients(self) -> bool:
        """Whether a backward ran since the last step: a gradient that is not the tensor the last step saw, or
        was written to since. The tensor is compared by weak reference, not by ``id``: a gradient freed by
        ``zero_grad()`` can leave its address, and so its ``id``, to the next backward's gradient."""
        seen = self.__dict__.get("_seen_grads", {})
        for p in self._params():
            if p.grad is None:
                continue
            ref, version = seen.get(id(p), (None, -1))
            if ref is None or ref() is not p.grad or p.grad._version != version:
                return True
        return False

    def _remember_gradients(self) -> None:
        self._seen_grads = {id(p): (weakref.ref(p.grad), p.grad._version) for p in self._params()
                            if p.grad is not None}

    def _commit_statistics(self) -> list[LayerMeans]:
        out = reduce_statistics(self.adapters, self.capture.stats["primary"], True, "training forward/backward")
        self.capture.reset()
        return out

    def _update_input_factors(self, now: list[LayerMeans], active: list[bool]) -> list[Tensor | None]:
        """Each seen layer's ``A`` takes the batch's (:func:`update_input_factors`); returns per layer the ``ā`` whose
        ``H_a`` update follows the step (None: none). Every batch's row count and finiteness are read with one host
        sync for all layers."""
        dev = now[0].h.device
        rows = torch.stack([m.a_rows if m.a_rows.device == dev else m.a_rows.to(dev) for m in now])  # type: ignore
        finite = finite_flags([m.A_sum for m in now])  # type: ignore[misc]
        checks = torch.stack([rows, finite.to(device=dev, dtype=rows.dtype)], 1).tolist()
        seen = [i for i, (on, (n, _)) in enumerate(zip(active, checks)) if on and n > 0]
        cholesky = self._cholesky_interval() is not None
        for i in seen:
            self.layers[i].ensure_state(cholesky)
        cfg = self.config
        a_means = update_input_factors(
            [self.layers[i] for i in seen], [now[i].A_sum for i in seen], [now[i].a for i in seen],  # type: ignore[misc]
            [checks[i][0] for i in seen], [checks[i][1] > 0 for i in seen], cfg.factor_decay, cfg.input_warm_start,
            self._sqrt_lam())
        out: list[Tensor | None] = [None] * len(now)
        for i, a in zip(seen, a_means):
            out[i] = a
        return out

    def _update_kfac_outputs(self, now: list[LayerMeans], active: list[bool]) -> None:
        """K-FAC output factors (``output_side="kfac"``) take their batch's ``E[g gᵀ]`` and are re-inverted; a
        non-finite batch is skipped and counted in ``pairs_skipped`` (the output side's rejected updates), a
        taken one in ``pairs_accepted``."""
        todo = [(i, la, m.G) for i, (la, m, on) in enumerate(zip(self.layers, now, active))  # hooks saw rows
                if on and isinstance(la.output, KFACOutput) and m.G is not None]
        for _, la, _ in todo:
            la.ensure_state()
        taken = refresh_kfac_factors([la.output for _, la, _ in todo], [G for _, _, G in todo],  # type: ignore[misc]
                                     self.config.factor_decay, self._sqrt_lam(), self.config.output_inverse_interval,
                                     phases=[self._inverse_phases[i] for i, _, _ in todo])
        counters = [la.state["counters"]["pairs_accepted" if ok else "pairs_skipped"]
                    for (_, la, _), ok in zip(todo, taken)]
        if counters:
            torch._foreach_add_(counters, 1)

    def _directions(
        self, active: list[bool]
    ) -> tuple[list[Tensor | None], list[float], list[Tensor | None]] | None:
        """Per active layer ``ĝ ← ρ ĝ + (1−ρ) G`` (``G = ∇W̄ + τ W̄``) and ``D = H_g ĝ H_a`` (None for a paused
        layer; with ``nesterov``, ``D = H_g (ρ ĝ + (1−ρ) G) H_a``), with the norms ``‖D‖`` (0 for a paused layer)
        and the matrices ``D`` preconditions (``ĝ``, or the look-ahead; None for a paused layer); None if any is not
        finite. The elementwise stages run over all active layers at once, and the norms, which also tell whether
        every direction is finite (a NaN or inf entry makes its norm one), are read with one host sync."""
        cfg = self.config
        on = [la for la, a in zip(self.layers, active) if a]
        for la in on:
            la.ensure_state()
        grads = grads_with_l2(on, [[self._group_of(p)["l2"] for p in la.adapter.parameters()] for la in on])
        update_momenta(on, grads, cfg.grad_decay)
        sources = [la.state["momentum_buffer"] for la in on]
        if cfg.nesterov:  # Nesterov's look-ahead ρ ĝ + (1−ρ) G, a new matrix per layer (G feeds the grafting)
            sources = list(torch._foreach_lerp(grads, sources, cfg.grad_decay))
        dtypes = [self._matmul_dtype_for(la) for la in on]
        D = [la.direction(src, dtype) for la, src, dtype in zip(on, sources, dtypes)]
        if cfg.graft == "adam":  # [D ← D / (√v̂_D + ε)], then D ← D · ‖m̂ / (√v̂ + ε)‖ / ‖D‖
            D, norms = graft_to_adam(on, D, grads, cfg.grad_decay, cfg.adam_betas[1], cfg.fallback_eps,
                                     bool(cfg.direction_rms), cfg.polar_blend_steps, dtypes)
        else:
            norms = list(torch._foreach_norm(D)) if D else []
        dev = D[0].device if D else None
        values = torch.stack([n if n.device == dev else n.to(dev) for n in norms]).tolist() if D else []
        if not all(math.isfinite(v) for v in values):
            return None
        it = iter(zip(D, values, sources))
        per_layer: list[tuple[Tensor | None, float, Tensor | None]] = [
            next(it) if a else (None, 0.0, None) for a in active]
        return [d for d, _, _ in per_layer], [n for _, n, _ in per_layer], [x for _, _, x in per_layer]

    def _kl_scale(self, directions: list[Tensor | None], sources: list[Tensor | None], lrs: list[float]) -> float:
        """The KL clip's ``ν`` over the active layers' directions, what each preconditions and learning rates."""
        if not self.kl_clip.enabled:
            return 1.0
        keep = [i for i, D in enumerate(directions) if D is not None]
        return self.kl_clip.scale([directions[i] for i in keep], [sources[i] for i in keep],  # type: ignore[misc]
                                  [lrs[i] for i in keep])

    def _layer_lrs(self) -> list[float]:
        return [self._group_of(ad.weight)["lr"] for ad in self.adapters]

    @property
    def _matmul_dtype(self) -> torch.dtype:
        """The dtype of the input Grams, ``"auto"`` resolved for the device the model is on now (it may have
        moved since construction, e.g. by ``accelerator.prepare``)."""
        weight = self.adapters[0].weight
        return self.config.matmul_torch_dtype(weight.device, weight.dtype)

    def _matmul_dtype_for(self, la: KroneckerLayer) -> torch.dtype:
        """The dtype of ``la``'s direction products: ``"auto"`` keeps a layer too small to gain from bfloat16
        in float32 (:data:`~hf_qn.optim.config.AUTO_BF16_MIN_FLOPS`)."""
        weight = la.adapter.weight
        return self.config.matmul_torch_dtype(weight.device, weight.dtype, la.direction_flops)

    def _sqrt_lam(self) -> float:
        return math.sqrt(self.config.damping)

    def _cholesky_interval(self) -> int | None:
        return self.config.inverse_interval if self.config.input_inverse == "cholesky" else None

    def _limit_growth(
        self, directions: list[Tensor | None], norms: list[float], lrs: list[float], scale: float, curvature: bool
    ) -> tuple[list[float], float]:
        """With ``update_interval > 1``: the layers' step sizes ``‖α D‖`` (``norms``: each ``‖D‖``, ``lrs``: each
        ``α``) and the scale the growth guard allows."""
        if self.config.update_interval == 1:
            return [], scale
        if curvature:
            self.schedule.refresh_next(False)  # this step is the refresh
        if all(D is None for D in directions):
            return [0.0] * len(directions), scale
        sizes = [0.0 if D is None else lr * n for D, n, lr in zip(directions, norms, lrs)]
        return sizes, self.growth_guard.limit(sizes, scale, self.schedule)

    def _apply(self, directions: list[Tensor | None], lrs: list[float], scale: float) -> None:
        """W̄ ← W̄ − α ν D (``lrs``: each layer's ``α``); fallback parameters by their own rule (parameters without a
        gradient are skipped)."""
        add_to_layers(self.adapters, directions, lrs, -scale)
        for g in self.param_groups:
            if g[ROLE] == ROLE_FALLBACK:
                self._fallback_step(g)

    def _restore(self, directions: list[Tensor | None], scale: float, values: dict[nn.Parameter, Tensor]) -> None:
        """Add ``scale · α · D`` back to the layers and copy ``values`` into the fallback parameters."""
        add_to_layers(self.adapters, directions, self._layer_lrs(), scale)
        for p, old in values.items():
            local_piece(p).copy_(old)

    def _snapshot(self, active: list[bool]) -> dict[str, Any]:
        """What a same-batch curvature step changes before its closure runs: the parameters with a gradient,
        the active layers' input factors, gradient averages and counters, the fallback's state and the
        optimizer-wide state. Put back exactly if the closure raises (:meth:`_put_back`); its fallback
        parameters also serve the loss guard's undo."""
        params = [p for p in self._params() if p.grad is not None]
        pieces = [local_piece(p).detach() for p in params]  # an FSDP2 parameter: its shard
        copies = [torch.empty_like(x, requires_grad=False) for x in pieces]
        torch._foreach_copy_(copies, pieces)  # one multi-tensor copy
        layers = {la.adapter.weight: self._layer_snapshot(la) for la, on in zip(self.layers, active) if on}
        fallback = {p: copy.deepcopy(self.state.get(p, {})) for g in self.param_groups if g[ROLE] == ROLE_FALLBACK
                    for p in g["params"] if p.grad is not None}
        return {"params": dict(zip(params, copies)), "layers": layers, "fallback": fallback,
                "global": copy.deepcopy(self._global_state())}

    def _layer_snapshot(self, la: KroneckerLayer) -> dict[str, Any] | None:
        """A layer's state that the input-factor and average updates change in place before the closure runs:
        ``A`` and its batch count, ``ĝ``, the counters, and ``H_a`` only while it is re-inverted exactly (the
        plain-average phase); None for a layer without state yet."""
        if "input" not in la.state:
            return None
        inp = la.state["input"]
        keep = ["A", "batches"] + (["H_a"] if int(inp["batches"]) < max(1, self.config.input_warm_start) else [])
        out = {"input": {k: inp[k].clone() for k in keep}, "momentum_buffer": la.state["momentum_buffer"].clone(),
               "counters": {k: v.clone() for k, v in la.state["counters"].items()}}
        if "graft" in la.state:
            out["graft"] = {k: v.clone() for k, v in la.state["graft"].items()}
        if isinstance(la.output, KFACOutput):  # re-inverted before the closure runs
            out["output"] = {k: v.clone() for k, v in la.state["output"].items()}
        return out

    def _put_back(self, snapshot: dict[str, Any]) -> None:
        for p, old in snapshot["params"].items():
            local_piece(p).copy_(old)
        for w, saved in snapshot["layers"].items():
            if saved is None:  # created by this step
                self.state[w].clear()
                continue
            self.state[w]["input"].update(saved["input"])
            self.state[w]["momentum_buffer"] = saved["momentum_buffer"]
            self.state[w]["counters"] = saved["counters"]
            if "graft" in saved:
                self.state[w]["graft"] = saved["graft"]
            if "output" in saved:
                self.state[w]["output"] = saved["output"]
        for p, saved in snapshot["fallback"].items():
            self.state[p] = saved
        self._load_global_state(snapshot["global"])
        self._bind_layers()

    # -- pairs -------------------------------------------------------------------------------------
    def _pair_hyper(self) -> PairHyper:
        cfg = self.config
        return PairHyper(cfg.pair_decay, cfg.powell_mu, self._sqrt_lam(), cfg.lm_damping, cfg.curvature_eps)

    def _same_batch_pairs(
        self, closure: Callable[[], Any], now: list[LayerMeans], directions: list[Tensor | None], scale: float,
        active: list[bool], snapshot: dict[str, Any],
    ) -> tuple[Any, bool]:
        """The second pass at θ⁺, the loss guard's verdict, and (if kept) the pairs. Returns the closure's
        loss and whether the step was kept. If the closure raises, the step is taken back exactly (parameters
        and optimizer state as before it) and the exception propagates."""
        try:
            return self._second_pass_and_guard(closure, now, directions, scale, active, snapshot)
        except BaseException:
            self._put_back(snapshot)
            raise

    def _second_pass_and_guard(
        self, closure: Callable[[], Any], now: list[LayerMeans], directions: list[Tensor | None], scale: float,
        active: list[bool], snapshot: dict[str, Any],
    ) -> tuple[Any, bool]:
        fallback = {p for g in self.param_groups if g[ROLE] == ROLE_FALLBACK for p in g["params"]}
        backup = {p: v for p, v in snapshot["params"].items() if p in fallback}
        loss, value, plus = second_pass(closure, now, self._params(), self.adapters, self.capture)
        after: dict[nn.Parameter, Tensor] = {}  # fallback parameters after the step, to redo it
        undone = False

        def loss_before() -> float | None:
            nonlocal undone
            after.update({p: p.detach().clone() for p in backup})
            self._restore(directions, scale, backup)
            undone = True
            return run_closure(closure, self._params(), self.adapters, self.capture, record=False)[1]

        why = self.loss_guard.reason_to_undo(value, plus is not None, loss_before)
        if why is not None:
            if not undone:
                after.update({p: p.detach().clone() for p in backup})
                self._restore(directions, scale, backup)
            self.loss_guard.reject()
            self.backoff.shrink()
            warnings.warn(f"KBFGS: {why}; step undone, no curvature pair, step size halved", RuntimeWarning,
                          stacklevel=3)
            return loss, False
        if undone:
            self._restore(directions, -scale, after)
        assert plus is not None
        self.backoff.grow()
        self.loss_guard.accept(value)
        on = [i for i, a in enumerate(active) if a]
        update_output_sides([self.layers[i] for i in on], [plus[i].h - now[i].h for i in on],
                            [plus[i].g - now[i].g for i in on], [now[i].g for i in on], self._pair_hyper())
        return loss, True

    def _consecutive_pairs(self, now: list[LayerMeans], active: list[bool]) -> None:
        """s = h̄_k − h̄_{k−1}, y = ḡ_k − ḡ_{k−1} for the active layers that have a previous curvature batch; a
        paused layer starts over from its next batch. The flags are read, and the statistics kept for the next
        pair, with one multi-tensor operation each."""
        paused = [la.state["pair"]["has_prev"] for la, on in zip(self.layers, active) if not on and "pair" in la.state]
        if paused:
            torch._foreach_copy_(paused, [torch.tensor(False)] * len(paused))
        on = [i for i, a in enumerate(active) if a]  # each has its state (created by the step's directions)
        flags = torch.stack([self.layers[i].state["pair"]["has_prev"] for i in on]).tolist() if on else []
        have = [i for i, flag in zip(on, flags) if flag]
        if have:
            prev = [self.layers[i].state["pair"] for i in have]
            update_output_sides([self.layers[i] for i in have],
                                list(torch._foreach_sub([now[i].h for i in have], [p["h_prev"] for p in prev])),
                                list(torch._foreach_sub([now[i].g for i in have], [p["g_prev"] for p in prev])),
                                [now[i].g for i in have], self._pair_hyper())
        pairs = [self.layers[i].state["pair"] for i in on]
        if pairs:
            torch._foreach_copy_([p["h_prev"] for p in pairs] + [p["g_prev"] for p in pairs],
                                 [now[i].h for i in on] + [now[i].g for i in on])
            torch._foreach_copy_([p["has_prev"] for p in pairs], [torch.tensor(True)] * len(pairs))

    # ------------------------------------------------------------------ capture and state
    def _schedule_capture(self) -> None:
        """Capture statistics only for steps that update curvature (:class:`CurvatureSchedule`). Inside a
        second pass the schedule is left alone: the Trainer calls ``optimizer.train()`` from the closure, and
        a refresh step is no longer "next" by then, so re-scheduling would switch the capture of that very
        pass off."""
        if self.adapters and self.capture.mode == "primary":
            self.capture.enabled = self._training and self.curvature_step_next()
            self.capture.gram_dtype = self._matmul_dtype
            self.capture.max_input_rows = self.config.input_rows

    def _current_scale(self) -> float:
        return float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0

    def _global_state(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "optimizer": "KBFGS",
            "output_side": self._output_side_name(),
            "schedule": self.schedule.state,
            "steps_skipped_nonfinite": self.counters["steps_skipped_nonfinite"],
            "growth_guard": self.growth_guard.state,
            "loss_guard": self.loss_guard.state,
            "backoff": self.backoff.state,
        }

    def _layout(self) -> list[list[Any]]:
        return [la.layout() for la in self.layers]

    def _output_side_name(self) -> str:
        if self.config.output_side in ("kfac", "none"):
            return self.config.output_side
        return "dense" if self.config.history_size is None else "lbfgs"

    def _check_layer_keys(self) -> None:
        """Every loaded layer state has the keys of the layout (:mod:`hf_qn.optim.state`), named if not."""
        for la in self.layers:
            if not la.state:
                continue
            saved = la.state.get("output")  # {} for a one-sided layer; a missing key is named below
            if saved is not None and bool(saved) != bool(la.output.STATE_KEYS):
                raise ValueError(_sidedness_refusal(la.name, saved_two_sided=bool(saved), keys=sorted(saved)))
            for path in la.state_paths(self.config.graft, bool(self.config.direction_rms)):
                node: Any = la.state
                for part in path.split("/"):
                    node = node.get(part) if isinstance(node, dict) else None
                if node is None and path == "graft/direction_sq":
                    raise ValueError(
                        f"KBFGS.load_state_dict: the state of layer {la.name!r} was written without direction_rms "
                        "(no 'graft/direction_sq'), and this optimizer has direction_rms=True; construct it with "
                        "direction_rms=False to continue that run exactly"
                    )
                if node is None:
                    raise ValueError(
                        f"KBFGS.load_state_dict: the state of layer {la.name!r} has no {path!r}; it is incomplete or "
                        "was written by another version (see hf_qn.optim.state for the layout)"
                    )

    def _load_global_state(self, saved: dict[str, Any]) -> None:
        if saved["output_side"] != self._output_side_name():
            raise ValueError(
                f"KBFGS.load_state_dict: the state holds {saved['output_side']!r} output-side factors and this "
                f"optimizer uses {self._output_side_name()!r} ones (history_size={self.config.history_size}, "
                f"output_side={self.config.output_side!r}); load it into KBFGS(output_side='bfgs') for 'dense', "
                "KBFGSL (or history_size=p) for 'lbfgs', KBFGS(output_side='kfac') for 'kfac', "
                "KBFGS(output_side='none') for 'none' (output_side='auto', the default, takes 'kfac' for a "
                "transformers model built from a config, 'none' for one loaded from a checkpoint, 'bfgs' otherwise)"
            )
        self.schedule.state = dict(saved["schedule"])
        self.counters["steps_skipped_nonfinite"] = saved["steps_skipped_nonfinite"]
        self.growth_guard.state = dict(saved["growth_guard"])
        self.loss_guard.state = dict(saved["loss_guard"])
        self.backoff.state = dict(saved["backoff"])

    def _upgrade(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Format 1 (flat keys) -> 2, through :func:`~hf_qn.optim.state.convert_kbfgs_v1`."""
        if not is_v1(state_dict):
            return state_dict
        id_of = {id(p): pid for pid, p in self._saved_ids(state_dict).items()}
        return convert_kbfgs_v1(state_dict, [id_of[id(ad.weight)] for ad in self.adapters], self._output_side_name())

    def state_dict(self) -> dict[str, Any]:
        """torch's ``{"state", "param_groups"}`` plus ``"hf_qn"``. Under FSDP2 every state a step creates is
        created first, as zeros (what the first step would start from): ``torch.distributed.checkpoint`` loads
        into the state of a fresh optimizer, which must therefore hold every key, and checks that every trainable
        parameter has an entry. The layers' factors are whole on every rank (replicated, as under DDP); the
        fallback's AdamW state is sharded like its parameters."""
        self._follow_swapped_parameters()
        if self._fully_sharded():
            self._complete_state()
        return super().state_dict()

    def _complete_state(self) -> None:
        cholesky = self._cholesky_interval() is not None
        for la in self.layers:
            la.ensure_state(cholesky)
            if self.config.graft == "adam":
                la.ensure_graft_state(bool(self.config.direction_rms))
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]  # an entry for every parameter (an adapted layer's bias: empty)
                if g[ROLE] != ROLE_FALLBACK:
                    continue
                if g["fallback"] == "adamw":
                    adamw_state_(p, st)
                elif g["fallback"] == "sgd" and g["momentum"] != 0 and "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's ``load_state_dict``, refused (with this optimizer left as it was) when a layer's saved state
        does not fit its unit here (a missing key, an output factor for a one-sided layer)."""
        self._follow_swapped_parameters()
        saved_groups = len(state_dict.get("param_groups", ()))
        if saved_groups != len(self.param_groups):
            raise ValueError(
                f"KBFGS.load_state_dict: the state holds {saved_groups} param groups and this optimizer "
                f"{len(self.param_groups)}: it was saved with the parameters split otherwise (no_decay, or "
                "fallback_embedding_lr, whose default gives an untied input embedding groups of its own on a "
                "language model trained from scratch); construct the optimizer as the run was saved (e.g. "
                "fallback_embedding_lr=None for a run saved before that default)"
            )
        before, global_before = {"state": self.state, "param_groups": self.param_groups}, self._global_state()
        super().load_state_dict(state_dict)
        try:
            self._check_layer_keys()
        except ValueError:  # torch replaced the state and groups by new objects: the old ones are intact
            self._load_global_state(global_before)
            self.__setstate__(before)
            raise
        self._sync_config()
        self._schedule_capture()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero gradients and drop statistics captured since the last step (they were never committed)."""
        super().zero_grad(set_to_none=set_to_none)
        if self.capture.mode == "primary":
            self.capture.reset()


def _param_groups(assignment: LayerAssignment, cfg: KBFGSConfig, no_decay: set[str]) -> list[dict[str, Any]]:
    """Adapted parameters (K-BFGS's lr and L2) and fallback parameters, each split by ``no_decay``."""
    names = assignment.param_names

    def split(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return ([p for p in params if names.get(id(p)) not in no_decay],
                [p for p in params if names.get(id(p)) in no_decay])

    qn_dec, qn_nod = split(assignment.adapted_parameters())
    groups: list[dict[str, Any]] = []
    for ps, wd in ((qn_dec, cfg.l2), (qn_nod, 0.0)):
        if ps:
            groups.append({"params": ps, ROLE: ROLE_QN, "lr": cfg.lr, "l2": wd})
    # the input embedding, where the fallback holds it, gets groups of its own only with fallback_embedding_lr
    own_lr = cfg.fallback_embedding_lr is not None
    rest = [f.param for f in assignment.fallback if not (own_lr and f.embedding)]
    embeddings = [f.param for f in assignment.fallback if own_lr and f.embedding]
    for params, lr in ((rest, cfg.fallback_lr_value), (embeddings, cfg.fallback_embedding_lr)):
        dec, nod = split(params)
        for ps, wd in ((dec, cfg.fallback_weight_decay), (nod, 0.0)):
            if ps:
                groups.append({"params": ps, ROLE: ROLE_FALLBACK, **_fallback_values(cfg), "lr": lr,
                               "weight_decay": wd})
    return groups


def _transformers_models(model: nn.Module) -> list[nn.Module]:
    """The ``PreTrainedModel`` modules inside ``model`` (recognised by their ``config`` and string ``name_or_path``,
    without importing transformers; under a DDP, FSDP2 or ``torch.compile`` wrapper too)."""
    return [m for m in model.modules() if hasattr(m, "config") and isinstance(getattr(m, "name_or_path", None), str)]


def transformers_origin(model: nn.Module) -> str | None:
    """``"config"`` for a transformers model built from a config, ``"checkpoint"`` for one loaded from a checkpoint,
    None for any other module. ``from_pretrained`` records the path or Hub id in ``name_or_path``, a model built
    from a config has ``""``. A model built from a config that was itself read from a checkpoint
    (``from_config(AutoConfig.from_pretrained(...))``) inherits its ``name_or_path`` and counts as
    ``"checkpoint"``: the error on the safe side (K-FAC's factor fails fine-tunes; a from-scratch run without it
    trains, only slower)."""
    found = _transformers_models(model)
    if not found:
        return None
    return "checkpoint" if any(m.name_or_path for m in found) else "config"


def is_language_model(model: nn.Module) -> bool:
    """Whether ``model`` holds a transformers model with an output embedding (``get_output_embeddings()``: the LM
    head of a causal or masked language model; a classifier has none)."""
    return any(transformers_embedding(m, "get_output_embeddings") is not None for m in _transformers_models(model))


#: the default ``lr`` of a language model trained from scratch (``output_side="kfac"``) up to a hidden size of
#: ``PRETRAINING_WIDTH``, and of everything else (``KBFGSConfig.lr``'s docstring gives the measurements).
PRETRAINING_LR, DEFAULT_LR = 6e-3, 3e-3
#: a wider language model trained from scratch takes ``PRETRAINING_LR * PRETRAINING_WIDTH / hidden_size``
PRETRAINING_WIDTH = 128
#: ``fallback_embedding_lr="auto"`` on a language model trained from scratch: ``lr`` divided by this (0.06 at 6e-3)
EMBEDDING_LR_DIVISOR = 0.1


def pretraining_lr(hidden_size: int | None) -> float:
    """K-BFGS's default ``lr`` for a language model of width ``hidden_size`` trained from scratch: 6e-3 up to a width
    of 128, inversely proportional to the width beyond (3e-3 at 256, 1e-3 at 768), as μP scales an Adam-like step's
    lr; 6e-3 where the width is unknown (None)."""
    if hidden_size is None or hidden_size <= PRETRAINING_WIDTH:
        return PRETRAINING_LR
    return PRETRAINING_LR * (PRETRAINING_WIDTH / hidden_size)


def model_width(model: nn.Module) -> int | None:
    """The ``hidden_size`` of the (first) transformers model inside ``model``, or None: not a transformers model, or
    a config without one."""
    for m in _transformers_models(model):
        width = getattr(m.config, "hidden_size", None)
        if isinstance(width, int) and width > 0:
            return width
    return None


def resolve_for_model(cfg: KBFGSConfig, model: nn.Module) -> KBFGSConfig:
    """``cfg`` with its model-dependent defaults resolved for ``model``, each logged at INFO (the input embedding's
    lr by :class:`KBFGS` once the layers are assigned, and only where that embedding goes to the fallback).

    ``output_side="auto"``: K-FAC's output factor for a transformers model built from a config (training from
    scratch, where it measured as well as BFGS's or better), none (``H_g = I``) for one loaded from a checkpoint (a
    fine-tune, where K-FAC's factor fails on small batches and BFGS's added nothing at more cost), BFGS's for any
    other module and an L-BFGS output side (it decides the state's layout).

    ``lr=None``: for a language model with K-FAC's output factor (pretraining) :func:`pretraining_lr` of its width
    (6e-3 up to a hidden size of 128, ``6e-3 * 128 / hidden_size`` beyond), 3e-3 otherwise.
    ``fallback_embedding_lr="auto"``: ``lr / 0.1`` when pretraining a language model, else None (the fallback's lr)."""
    if cfg.output_side == "auto":
        origin = transformers_origin(model)
        if cfg.history_size is not None:
            side, why = "bfgs", "an L-BFGS output side"
        elif origin == "config":
            side, why = "kfac", "a transformers model built from a config: training from scratch"
        elif origin == "checkpoint":
            side, why = "none", ("a transformers model whose name_or_path names a checkpoint: fine-tuning; a model "
                                 "built from a checkpoint's config and trained from scratch takes output_side='kfac'")
        else:
            side, why = "bfgs", "not a transformers model"
        logger.info("KBFGS: output_side='auto' is %r (%s); pass output_side='bfgs', 'kfac' or 'none' to choose", side,
                    why)
        cfg = dataclasses.replace(cfg, output_side=side)
    pretraining = cfg.output_side == "kfac" and is_language_model(model)
    regime = "a language model trained from scratch" if pretraining else "the default outside LM pretraining"
    if cfg.lr is None:
        width = model_width(model) if pretraining else None
        lr = pretraining_lr(width) if pretraining else DEFAULT_LR
        why = regime if width is None else f"{regime}, hidden size {width}"
        logger.info("KBFGS: lr not set: %g (%s); pass lr to choose", lr, why)
        cfg = dataclasses.replace(cfg, lr=lr)
    if cfg.fallback_embedding_lr == "auto":
        embedding_lr = cfg.lr_value / EMBEDDING_LR_DIVISOR if pretraining else None  # logged where it applies
        cfg = dataclasses.replace(cfg, fallback_embedding_lr=embedding_lr)
    return cfg


def _sidedness_refusal(name: str, saved_two_sided: bool, keys: list[str]) -> str:
    """Why a layer's saved state cannot be loaded where the layer is preconditioned the other way (with or
    without an output factor): the policy changed between save and load."""
    if saved_two_sided:
        return (f"KBFGS.load_state_dict: the state of layer {name!r} holds an output factor ({keys}), and this "
                "optimizer preconditions that layer one-sided, by its input factor alone (an LM head, a tied head, or "
                "a layer wider than max_dim): the run was saved with it two-sided; to continue it exactly, construct "
                "the optimizer with the policy it was saved with (policy=hf_qn.LayerPolicy(one_sided_heads=False) for "
                "an LM head, or its max_dim)")
    return (f"KBFGS.load_state_dict: the state of layer {name!r} holds no output factor, and this optimizer "
            "preconditions that layer with one: the run was saved with it one-sided (an LM head, which the default "
            "policy makes one-sided, or a layer wider than max_dim); to continue it exactly, construct the optimizer "
            "with the policy it was saved with (the default LayerPolicy(), or its max_dim)")


def _new_layer(adapter: LayerAdapter, cfg: KBFGSConfig) -> KroneckerLayer:
    """The curvature unit of an adapted layer, with the output side the configuration asks for."""
    if cfg.output_side == "none":
        adapter.one_sided = True  # what the capture reads: no output statistics for this layer
    output = output_side_for(adapter.name, adapter.d_out, cfg.history_size, adapter.one_sided, cfg.max_block_dim,
                             cfg.output_side)
    return KroneckerLayer(adapter, output, cfg.max_block_dim)


def _fallback_values(cfg: KBFGSConfig) -> dict[str, Any]:
    """A fallback param group's hyperparameters."""
    return {"fallback": cfg.fallback, "lr": cfg.fallback_lr_value, "betas": cfg.adam_betas, "eps": cfg.fallback_eps,
            "momentum": cfg.fallback_momentum, "weight_decay": cfg.fallback_weight_decay, "fused": cfg.fallback_fused}


class KBFGSL(KBFGS):
    """K-BFGS(L): :class:`KBFGS` with an L-BFGS output-side factor of ``history_size`` pairs.

    Same arguments as :class:`KBFGS`; ``history_size`` defaults to :attr:`DEFAULT_HISTORY_SIZE` (100, the paper's).
    """

    #: the paper's number of L-BFGS pairs (the Trainer's ``qn_optimizer="kbfgs_l"`` uses it too)
    DEFAULT_HISTORY_SIZE = 100

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        config = kwargs.get("config")
        if "history_size" not in kwargs and (config is None or config.history_size is None):
            kwargs["history_size"] = self.DEFAULT_HISTORY_SIZE
        if kwargs.get("history_size", 1) is None:
            raise ValueError("Invalid history_size: None (KBFGSL needs an integer >= 1; use KBFGS for dense BFGS)")
        super().__init__(model, **kwargs)
