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

import logging
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..adapters import LayerAdapter, LayerAssignment, LayerPolicy, assign_layers
from ..capture import Capture, LayerStats
from ..distributed import all_reduce_sum_, is_distributed, world_size
from ..linalg import (
    LBFGSHistory,
    all_finite,
    damped_cholesky_inverse,
    finite_flag,
    kron_precondition,
    sym_psd_norm_estimate,
)
from ..linalg.batched import bfgs_rank2_rows, curvature_ok_rows, double_damping_rows
from ._base import FALLBACKS, ROLE, ROLE_FALLBACK, ROLE_QN, QNOptimizerBase, check_range

__all__ = ["KBFGS", "KBFGSL"]

logger = logging.getLogger(__name__)

_LBFGS_KEYS = ("Hg_S", "Hg_Y", "Hg_SY", "Hg_YY", "Hg_count", "Hg_head")
_COUNTERS = (
    "pairs_accepted",
    "pairs_skipped",
    "powell_damped",
    "lm_damped",
    "input_updates_skipped",
    "steps_skipped_nonfinite",
    "steps_rejected",
    "steps_clipped",
    "loss_checks",
)
# Counters of whole steps, kept on the first layer only (the per-layer ones are summed in statistics()).
_GLOBAL_COUNTERS = ("steps_skipped_nonfinite", "steps_rejected", "steps_clipped", "loss_checks")


#: the names ``matmul_dtype`` accepts (torch dtypes or these strings); stored as the string.
MATMUL_DTYPES = ("float32", "bfloat16", "float16")


class KBFGS(QNOptimizerBase):
    """K-BFGS (``history_size=None``: dense BFGS ``H_g``) or K-BFGS(L) (``history_size=p``: L-BFGS ``H_g``).

    Args:
        model: the model; its Linear, Conv2d, Embedding and transformers Conv1D layers are adapted
            according to ``policy`` and every other trainable parameter goes to the fallback.
        lr: step size α of the K-BFGS part. (default: 0.3, the paper's MNIST autoencoder setting)
        damping: total damping λ; each Kronecker factor gets √λ (input side: ``A + √λ I``; output side:
            LM damping ``μ₂ = √λ``). (default: 0.3, the paper's MNIST setting; the official README says
            to tune only ``lr`` and ``damping``)
        momentum: ρ of the gradient momentum ``ĝ ← ρ ĝ + (1−ρ) g`` (no bias correction, as the
            official code). (default: 0.9)
        weight_decay: L2 coefficient τ added to the gradient of weights and biases before momentum,
            as the paper (coupled, like ``torch.optim.SGD``). (default: 1e-5, the paper's)
        stat_decay: β_A of the running average of ``A``. (default: 0.9, the paper's)
        pair_decay: decay of the running averages of ``s`` and ``y``; 0 uses raw pairs (the paper
            uses 0.9 for minibatches and 0 for full batch). (default: 0.9)
        powell_mu: μ₁ of Powell damping on ``H_g``. (default: 0.2, the paper's)
        lm_damping: ``"interpolate"`` (paper: ``y ← θy + (1−θ)s``, needs √λ < 1), ``"additive"``
            (ASDL: ``y ← y + √λ s``) or ``"none"``. (default: ``"interpolate"``)
        update_interval: curvature (statistics, pairs, factor updates, and the second pass) every this
            many steps; other steps reuse the factors and cost about an SGD step. (default: 1, the
            paper's; 10 amortizes the second pass as ASDL does with 100)
        warmup_curvature_steps: with ``update_interval > 1``, update curvature at every one of the first
            this many steps, while it changes fastest (the official code's KFAC baseline does the same for
            its first 20 iterations; measured: without it, ``update_interval=10`` at lr 0.3 diverged on the
            autoencoder within 3 epochs). (default: 20)
        input_inverse: how ``H_a`` follows ``A``: ``"bfgs"`` (the paper's Hessian-action BFGS update, no
            inversion after the first) or ``"cholesky"`` (re-inverted every ``inverse_interval``
            curvature steps). (default: ``"bfgs"``)
        inverse_interval: curvature steps between Cholesky re-inversions when
            ``input_inverse="cholesky"``. (default: 20, the official code's KFAC setting)
        input_warm_start: ``A`` is the plain average of the first this many curvature steps' input Grams
            (each weighted 1/k, ``H_a`` re-inverted exactly after each) before its running average with
            decay ``stat_decay`` starts. The official code averages ``A`` over one extra pass over the
            training set before training; this forms that average online from the training batches,
            without the extra pass (steps per epoch = that pass). 0 or 1: ``A`` starts from the first batch.
            (default: 0; measured on the autoencoder, 5 seeds: no per-epoch difference beyond the
            seed-to-seed spread, docs/design.md)
        history_size: ``None`` for a dense BFGS ``H_g`` (K-BFGS); an integer ``p`` for an L-BFGS
            ``H_g`` with ``p`` pairs (K-BFGS(L); the paper uses 100). (default: None)
        pairs: ``"same_batch"`` (the paper: a second pass on the same batch at the new point, given by
            ``closure``) or ``"consecutive"`` (no second pass: pairs from the statistics of
            consecutive curvature steps' batches, smoothed by ``pair_decay``). (default:
            ``"same_batch"``)
        curvature_eps: relative curvature test ``sᵀy > eps·sᵀs·‖ḡ‖`` of the official code.
            (default: 1e-4)
        max_update_growth: with ``update_interval > 1`` only: if a layer's step ``‖α D‖`` would exceed
            this many times its size at the last kept curvature step, the whole step is scaled down to that
            bound (counted in ``steps_clipped``) and the next step updates curvature. None disables it. With
            ``update_interval=1`` the paper's algorithm runs unchanged. (default: 2.0; measured on the
            autoencoder at lr 0.3, ``update_interval=10``: without it the loss went to NaN within 35 steps (a
            stale step jumped 7x, then curvature steps grew 0.1 -> 0.5 -> 9.7 relative to the weights); with
            it, 128 at step 100, against 129 for ``update_interval=1``)
        max_loss_increase: a guard the paper does not have, on same-batch curvature steps: a step after which
            the batch's loss exceeds its loss before the step by more than this fraction of it is undone (no
            pair; counted in ``steps_rejected``) and the step size is halved, growing back by 1.25x, up to the
            full ``lr``, with every accepted curvature step (``qn/step_backoff`` in :meth:`statistics`). The
            loss before the step costs one more pass, spent only when the loss after it is above the same bound
            for the running average of accepted losses (``qn/loss_checks`` counts them). None disables it.
            (default: 0.25; measured on the autoencoder at the paper's lr 0.3: without it some runs blow up
            (loss 205 -> 287, 190 -> 320, 317 -> 1450, then 4e8 and inf within 80 steps), others do not,
            depending on floating-point summation order)
        kl_clip: if set, scales the step down so that ``α² Σ⟨D, ĝ⟩ ≤ kl_clip`` (kfac-pytorch's
            KL clipping); None follows the paper. (default: None)
        matmul_dtype: dtype of the two large products of every step, the input Gram ``Σ ā āᵀ`` of the
            capture and the direction ``H_g ĝ H_a``; factors, their updates, sums and the momentum stay
            float32. ``torch.bfloat16`` makes those products about 3x faster on a CPU with AVX512-BF16
            (measured: 1000-wide GEMM 5.9 vs 19.5 ms), at about 3 significant digits; the autoencoder's
            per-epoch loss did not change (docs/design.md). (default: float32, the paper's)
        fallback: first-order rule for parameters no adapter takes: ``"adamw"`` or ``"sgd"``.
            (default: ``"adamw"``)
        fallback_lr: learning rate of the fallback. (default: 1e-3)
        fallback_betas, fallback_eps: AdamW's. (default: (0.9, 0.999), 1e-8)
        fallback_momentum: SGD's momentum when ``fallback="sgd"``. (default: 0.9)
        fallback_weight_decay: decoupled (AdamW) or coupled (SGD) weight decay of the fallback.
            (default: 0.0)
        no_decay: names (as in ``model.named_parameters()``) of parameters that get no weight
            decay, e.g. the Trainer's no-decay set. (default: none)
        policy: which layers are adapted (:class:`~hf_qn.adapters.LayerPolicy`).
        grad_scaler: a ``torch.amp.GradScaler`` (or anything with ``get_scale()``) when training in
            fp16, so that captured output gradients are unscaled. (default: None)

    Raises:
        ValueError: for an out-of-range hyperparameter, or a model with no adaptable layer.
    """

    _CURVATURE_KEYS = frozenset(
        {"A", "H_a", "H_g", "momentum_buffer", "s_avg", "y_avg", "h_prev", "g_prev"}
        | {"qn_step", "input_batches", "has_prev", "inverse_countdown", "ref_step_size", "refresh_next"}
        | {"loss_avg", "step_backoff"}
        | set(_LBFGS_KEYS)
        | set(_COUNTERS)
    )

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.3,
        damping: float = 0.3,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        stat_decay: float = 0.9,
        pair_decay: float = 0.9,
        powell_mu: float = 0.2,
        lm_damping: str = "interpolate",
        update_interval: int = 1,
        warmup_curvature_steps: int = 20,
        input_inverse: str = "bfgs",
        inverse_interval: int = 20,
        input_warm_start: int = 0,
        history_size: int | None = None,
        pairs: str = "same_batch",
        curvature_eps: float = 1e-4,
        max_update_growth: float | None = 2.0,
        max_loss_increase: float | None = 0.25,
        kl_clip: float | None = None,
        matmul_dtype: torch.dtype | str = torch.float32,
        fallback: str = "adamw",
        fallback_lr: float = 1e-3,
        fallback_betas: tuple[float, float] = (0.9, 0.999),
        fallback_eps: float = 1e-8,
        fallback_momentum: float = 0.9,
        fallback_weight_decay: float = 0.0,
        no_decay: Iterable[str] = (),
        policy: LayerPolicy | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"KBFGS needs the model (an nn.Module) to find its layers, got {type(model).__name__}; "
                "use hf_qn.MLBFGS for a plain iterable of parameters"
            )
        check_range("lr", lr, 0.0, math.inf)
        check_range("damping", damping, 0.0, math.inf, lo_open=True)
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("weight_decay", weight_decay, 0.0, math.inf)
        check_range("stat_decay", stat_decay, 0.0, 1.0)
        check_range("pair_decay", pair_decay, 0.0, 1.0)
        check_range("powell_mu", powell_mu, 0.0, 1.0, lo_open=True)
        check_range("curvature_eps", curvature_eps, 0.0, math.inf)
        check_range("fallback_lr", fallback_lr, 0.0, math.inf)
        check_range("fallback_eps", fallback_eps, 0.0, math.inf, lo_open=True)
        check_range("fallback_momentum", fallback_momentum, 0.0, 1.0)
        check_range("fallback_weight_decay", fallback_weight_decay, 0.0, math.inf)
        for i, b in enumerate(fallback_betas):
            check_range(f"fallback_betas[{i}]", b, 0.0, 1.0)
        if lm_damping not in ("interpolate", "additive", "none"):
            raise ValueError(f"Invalid lm_damping: {lm_damping!r} (must be 'interpolate', 'additive' or 'none')")
        if lm_damping == "interpolate" and math.sqrt(damping) >= 1.0:
            raise ValueError(
                f"Invalid damping: {damping} gives mu2 = sqrt(damping) = {math.sqrt(damping):.3g} >= 1, which the "
                "interpolating LM damping cannot use; pass damping < 1 or lm_damping='additive'"
            )
        if int(update_interval) != update_interval or update_interval < 1:
            raise ValueError(f"Invalid update_interval: {update_interval} (must be an integer >= 1)")
        if int(warmup_curvature_steps) != warmup_curvature_steps or warmup_curvature_steps < 0:
            raise ValueError(f"Invalid warmup_curvature_steps: {warmup_curvature_steps} (must be an integer >= 0)")
        if input_inverse not in ("bfgs", "cholesky"):
            raise ValueError(f"Invalid input_inverse: {input_inverse!r} (must be 'bfgs' or 'cholesky')")
        if int(inverse_interval) != inverse_interval or inverse_interval < 1:
            raise ValueError(f"Invalid inverse_interval: {inverse_interval} (must be an integer >= 1)")
        if int(input_warm_start) != input_warm_start or input_warm_start < 0:
            raise ValueError(f"Invalid input_warm_start: {input_warm_start} (must be an integer >= 0)")
        if history_size is not None and (int(history_size) != history_size or history_size < 1):
            raise ValueError(f"Invalid history_size: {history_size} (must be None for dense BFGS, or an integer >= 1)")
        if pairs not in ("same_batch", "consecutive"):
            raise ValueError(f"Invalid pairs: {pairs!r} (must be 'same_batch' or 'consecutive')")
        if max_update_growth is not None:
            check_range("max_update_growth", max_update_growth, 1.0, math.inf, lo_open=True)
        if max_loss_increase is not None:
            check_range("max_loss_increase", max_loss_increase, 0.0, math.inf)
        if kl_clip is not None:
            check_range("kl_clip", kl_clip, 0.0, math.inf, lo_open=True)
        if fallback not in FALLBACKS:
            raise ValueError(f"Invalid fallback: {fallback!r} (must be one of {FALLBACKS})")
        matmul_name = str(matmul_dtype).replace("torch.", "")
        if matmul_name not in MATMUL_DTYPES:
            raise ValueError(
                f"Invalid matmul_dtype: {matmul_dtype!r} (must be torch.float32, torch.bfloat16 or torch.float16)"
            )

        assignment = assign_layers(model, policy)
        if not assignment.adapters:
            raise ValueError(
                "The model has no adaptable layer (nn.Linear, nn.Conv2d, nn.Embedding, transformers Conv1D) "
                "under the given policy; K-BFGS has nothing to precondition. Assignment:\n" + assignment.report()
            )
        no_decay_set = set(no_decay)
        names = assignment.param_names

        def split(params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
            dec = [p for p in params if names.get(id(p)) not in no_decay_set]
            nod = [p for p in params if names.get(id(p)) in no_decay_set]
            return dec, nod

        qn_dec, qn_nod = split(assignment.adapted_parameters())
        fb_dec, fb_nod = split(assignment.fallback_parameters())
        groups: list[dict[str, Any]] = []
        for ps, wd in ((qn_dec, weight_decay), (qn_nod, 0.0)):
            if ps:
                groups.append({"params": ps, ROLE: ROLE_QN, "lr": lr, "weight_decay": wd})
        for ps, wd in ((fb_dec, fallback_weight_decay), (fb_nod, 0.0)):
            if ps:
                groups.append(
                    {
                        "params": ps,
                        ROLE: ROLE_FALLBACK,
                        "fallback": fallback,
                        "lr": fallback_lr,
                        "betas": tuple(fallback_betas),
                        "eps": fallback_eps,
                        "momentum": fallback_momentum,
                        "weight_decay": wd,
                    }
                )
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            stat_decay=stat_decay,
            pair_decay=pair_decay,
            powell_mu=powell_mu,
            lm_damping=lm_damping,
            update_interval=int(update_interval),
            warmup_curvature_steps=int(warmup_curvature_steps),
            input_inverse=input_inverse,
            inverse_interval=int(inverse_interval),
            input_warm_start=int(input_warm_start),
            history_size=None if history_size is None else int(history_size),
            pairs=pairs,
            curvature_eps=curvature_eps,
            max_update_growth=max_update_growth,
            max_loss_increase=max_loss_increase,
            kl_clip=kl_clip,
            matmul_dtype=matmul_name,
        )
        super().__init__(groups, defaults)
        self._refuse_sharded_parameters()
        self.assignment: LayerAssignment = assignment
        self.adapters: list[LayerAdapter] = assignment.adapters
        self.grad_scaler = grad_scaler
        self.capture = Capture(self.adapters, grad_scale=self._current_scale if grad_scaler is not None else None)
        self.capture.attach()
        self._training = True
        #: called in place of a missing closure on curvature steps (set by QNTrainer).
        self.closure_provider: Callable[[], Any] | None = None
        self._warned_no_loss = False
        self._schedule_capture()

    # ------------------------------------------------------------------ copies
    # A copy (deepcopy, pickle) works on copies of the layers, with its own hooks on them; it has no
    # closure_provider (a Trainer's bound method): QNTrainer wires the optimizer it is given again.
    _PICKLED_ATTRS = ("assignment", "adapters", "grad_scaler", "capture", "_training", "_warned_no_loss")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict, with state and param_groups only
        if not hasattr(self, "closure_provider"):
            self.closure_provider = None

    # ------------------------------------------------------------------ public helpers
    @property
    def hparams(self) -> dict[str, Any]:
        """The K-BFGS hyperparameters in use (from the first K-BFGS param group)."""
        g = next(g for g in self.param_groups if g[ROLE] == ROLE_QN)
        return {k: g.get(k, v) for k, v in self.defaults.items()}

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
        st = self.state.get(self.adapters[0].weight, {})
        t = int(st["qn_step"]) if "qn_step" in st else 0
        hp = self.hparams
        refresh = "refresh_next" in st and bool(st["refresh_next"])
        return refresh or t < hp["warmup_curvature_steps"] or t % hp["update_interval"] == 0

    def statistics(self) -> dict[str, float]:
        """Counters and curvature norms for logging (keys prefixed ``qn/``; the largest eigenvalues of the
        factors are estimated by 30 Lanczos steps, cheap enough for every logging step)."""
        out: dict[str, float] = dict.fromkeys((f"qn/{k}" for k in _COUNTERS), 0.0)
        hg_norm = ha_norm = 0.0
        for ad in self.adapters:
            st = self.state.get(ad.weight, {})
            for k in _COUNTERS:
                if k in st:
                    out[f"qn/{k}"] += float(st[k])
            if "H_g" in st:
                hg_norm = max(hg_norm, sym_psd_norm_estimate(st["H_g"]))
            if "H_a" in st:
                Ha = st["H_a"]
                ha_norm = max(ha_norm, float(Ha.max()) if Ha.dim() == 1 else sym_psd_norm_estimate(Ha))
        # Global counters live on the first layer only; per-layer ones are summed.
        first = self.state.get(self.adapters[0].weight, {})
        for k in _GLOBAL_COUNTERS:
            out[f"qn/{k}"] = float(first.get(k, 0))
        out["qn/step_backoff"] = self._backoff(first)
        out["qn/max_norm_H_g"] = hg_norm
        out["qn/max_norm_H_a"] = ha_norm
        n_fb = sum(p.numel() for p in self.assignment.fallback_parameters())
        n_all = n_fb + sum(p.numel() for p in self.assignment.adapted_parameters())
        out["qn/fallback_share"] = n_fb / max(n_all, 1)
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One K-BFGS step; on curvature steps with ``pairs="same_batch"``, ``closure`` is required."""
        self._refuse_sharded_parameters()
        hp = self.hparams
        curvature = bool(self.capture.enabled)
        if curvature and hp["pairs"] == "same_batch" and closure is None and self.closure_provider is not None:
            closure = self.closure_provider
        if curvature and hp["pairs"] == "same_batch" and closure is None:
            raise RuntimeError(
                "KBFGS.step() needs a closure on curvature steps: a function that re-evaluates the same batch "
                "at the current parameters, calls backward and returns the loss, e.g. "
                "optimizer.step(lambda: compute_loss(model, batch).backward() or ...). Use hf_qn.QNTrainer with "
                "the Trainer, pass the closure through accelerator's optimizer.step(closure), or construct "
                "KBFGS(..., pairs='consecutive') for the no-second-pass mode."
            )
        all_params = [p for g in self.param_groups for p in g["params"]]
        first_state = self.state[self.adapters[0].weight]
        if not self._all_grads_finite(all_params):
            self._bump(first_state, "steps_skipped_nonfinite")
            warnings.warn("KBFGS: non-finite gradient; step skipped, curvature untouched", RuntimeWarning, stacklevel=2)
            self.capture.reset()
            return None

        layer_stats = self._commit_statistics() if curvature else None
        directions = self._directions(layer_stats)
        if directions is None:
            self._bump(first_state, "steps_skipped_nonfinite")
            warnings.warn("KBFGS: non-finite direction; step skipped", RuntimeWarning, stacklevel=2)
            return None
        scale = self._kl_scale(directions) * self._backoff(first_state)
        sizes: list[float] = []
        if hp["update_interval"] > 1:  # per-layer step sizes ‖α D‖
            if curvature:
                first_state["refresh_next"] = torch.tensor(False)  # this step is the refresh
            dev = directions[0].device  # one host sync for all layers, not one per layer
            norms = torch.stack([D.norm().float().to(dev) for D in directions]).tolist()
            sizes = [self._group_of(ad.weight)["lr"] * n for ad, n in zip(self.adapters, norms)]
            scale = self._growth_scale(sizes, scale, first_state)
        backup = self._apply(directions, scale)

        loss, kept = None, True
        if curvature and layer_stats is not None:
            if hp["pairs"] == "same_batch":
                assert closure is not None
                loss, value, plus = self._second_pass(closure, layer_stats)
                after: dict[nn.Parameter, Tensor] = {}  # fallback parameters after the step, to redo it

                def undo() -> None:
                    after.update({p: p.detach().clone() for p in backup})
                    self._undo(directions, scale, backup)

                why = self._verify(
                    closure, first_state, value, plus, undo=undo, redo=lambda: self._undo(directions, -scale, after)
                )
                if why is not None:
                    kept = False
                    self._bump(first_state, "steps_rejected")
                    first_state["step_backoff"] = torch.tensor(0.5 * self._backoff(first_state), dtype=torch.float32)
                    warnings.warn(
                        f"KBFGS: {why}; step undone, no curvature pair, step size halved", RuntimeWarning, stacklevel=2
                    )
                else:
                    assert plus is not None
                    self._accept_loss(first_state, value)
                    self._update_output_factors(layer_stats, plus)
            else:
                self._update_output_factors_consecutive(layer_stats)
            self._update_input_inverses(layer_stats)
        if kept:
            self._remember_step_sizes(sizes, scale, curvature)
        for ad in self.adapters:
            self.state[ad.weight]["qn_step"] += 1
        self._schedule_capture()
        return loss

    # -- stage 1: statistics --------------------------------------------------------------
    def _commit_statistics(self) -> list[dict[str, Tensor]]:
        """Finalise captured sums (all-reduced across ranks) into means:
        A = Σ ā āᵀ / R,  ā = Σ ā / R,  h̄ = Σ h / R_h,  ḡ = Σ ∂L/∂h (averaged over ranks)."""
        stats = self.capture.stats["primary"]
        out = self._reduce(stats, with_inputs=True, what="training forward/backward")
        self.capture.reset()
        return out

    def _reduce(
        self, stats: list[LayerStats], with_inputs: bool, what: str, expect: list[bool] | None = None
    ) -> list[dict[str, Tensor]]:
        """Sums -> means, all-reduced. A layer with a gradient (or listed in ``expect``) must have been seen."""
        for i, (ad, st) in enumerate(zip(self.adapters, stats)):
            needed = ad.weight.grad is not None if expect is None else expect[i]
            if needed and (st.forward_calls == 0 or st.g_sum is None):
                raise RuntimeError(
                    f"KBFGS: the hooks of layer {ad.name!r} did not fire during the {what} although it has a "
                    "gradient. Its weight is probably used functionally (e.g. nn.MultiheadAttention.out_proj) or "
                    "the forward ran in eval mode / under no_grad. Exclude it: KBFGS(model, "
                    f"policy=hf_qn.LayerPolicy(exclude=[r'{ad.name}']))"
                )
        # every layer's row counts in one tensor: one host-to-device copy, one all-reduce entry
        home = self.adapters[0].weight.device
        counts = torch.tensor([[float(st.a_rows), float(st.h_rows)] for st in stats], dtype=torch.float64, device=home)
        tensors: list[Tensor] = [counts]
        for ad, st in zip(self.adapters, stats):
            dev = ad.weight.device
            if st.h_sum is None or st.g_sum is None:  # a layer that did not take part in this pass
                st.h_sum = torch.zeros(ad.d_out, dtype=torch.float64, device=dev)
                st.g_sum = torch.zeros(ad.d_out, dtype=torch.float64, device=dev)
            tensors += [st.h_sum, st.g_sum]
            if with_inputs:
                if st.A_sum is None:
                    shape = (ad.d_in,) if ad.input_diagonal else (ad.d_in, ad.d_in)
                    st.A_sum = torch.zeros(shape, device=dev)
                if st.a_sum is None:
                    st.a_sum = torch.zeros(ad.d_in, device=dev)
                tensors += [st.A_sum, st.a_sum]
        all_reduce_sum_(tensors)
        ws = float(world_size())
        divisors = counts.clamp(min=1)
        divisors32 = divisors.float()
        out = []
        per = 4 if with_inputs else 2
        for i, ad in enumerate(self.adapters):
            h_sum, g_sum = tensors[1 + per * i : 3 + per * i]
            to = ad.weight.device
            d = {  # float64
                "h": h_sum / divisors[i, 1].to(to),
                "g": g_sum if ws == 1.0 else g_sum / ws,
                "h_rows": counts[i, 1].to(to),
            }
            if with_inputs:
                A_sum, a_sum = tensors[3 + per * i : 5 + per * i]
                d["A"] = A_sum / divisors32[i, 0].to(to)
                d["a"] = a_sum / divisors32[i, 0].to(to)
                d["a_rows"] = counts[i, 0].to(to)
            out.append(d)
        return out

    # -- stage 2: input factor, then direction ----------------------------------------------
    def _directions(self, stats: list[dict[str, Tensor]] | None) -> list[Tensor] | None:
        """A ← β_A A + (1−β_A) A_batch (the first max(1, input_warm_start) batches: their plain average,
        and H_a = (A + √λ I)⁻¹ exactly);
        ĝ ← ρ ĝ + (1−ρ)(∇W̄ + τ W̄);  D = H_g ĝ H_a."""
        hp = self.hparams
        sqrt_lam = math.sqrt(hp["damping"])
        matmul_dtype = getattr(torch, hp["matmul_dtype"])
        out = []
        if stats is not None:  # each batch's row count and finiteness, read with one host sync for all layers
            dev = stats[0]["A"].device
            checks = torch.stack(
                [torch.stack([s["a_rows"].double().reshape(()), finite_flag(s["A"]).double()]).to(dev) for s in stats]
            ).tolist()
        for i, ad in enumerate(self.adapters):
            st = self._layer_state(ad)
            if stats is not None:
                rows, finite = checks[i]
                self._update_input_factor(ad, st, stats[i], rows > 0, finite > 0, sqrt_lam, hp)
            G = self._grad_with_l2(ad)
            buf = st["momentum_buffer"]
            buf.mul_(hp["momentum"]).add_(G, alpha=1.0 - hp["momentum"])
            if "H_g" in st:
                D = kron_precondition(st["H_g"], buf, st.get("H_a"), matmul_dtype)
            else:
                D = self._apply_H_g(ad, kron_precondition(None, buf, st.get("H_a"), matmul_dtype))
            out.append(D)
        if not all_finite(*out):
            return None
        return out

    def _update_input_factor(
        self,
        ad: LayerAdapter,
        st: dict[str, Any],
        s: dict[str, Tensor],
        seen: bool,
        finite: bool,
        sqrt_lam: float,
        hp: dict[str, Any],
    ) -> None:
        """``seen``: the layer had input rows in this batch; ``finite``: its batch statistic ``A`` is finite."""
        A_batch = s["A"]
        if not seen:
            return
        if not finite:
            self._bump(st, "input_updates_skipped")
            return
        n = int(st["input_batches"])
        if n < max(1, hp["input_warm_start"]):  # the first batch, then the warm start: a plain average
            st["A"].mul_(n / (n + 1)).add_(A_batch, alpha=1.0 / (n + 1))
            st["input_batches"].add_(1)
            self._invert_input(ad, st, sqrt_lam)
            return
        st["A"].mul_(hp["stat_decay"]).add_(A_batch, alpha=1.0 - hp["stat_decay"])
        st["a_mean"] = s["a"]  # consumed by _update_input_inverses after the step

    def _invert_input(self, ad: LayerAdapter, st: dict[str, Any], sqrt_lam: float) -> None:
        """H_a = (A + √λ I)⁻¹ (diagonal for an Embedding)."""
        if ad.input_diagonal:
            st["H_a"].copy_(1.0 / (st["A"] + sqrt_lam))
        else:
            st["H_a"].copy_(damped_cholesky_inverse(st["A"], sqrt_lam))

    def _grad_with_l2(self, ad: LayerAdapter) -> Tensor:
        G = ad.grad_matrix().to(torch.float32)
        wds = [self._group_of(p)["weight_decay"] for p in ad.parameters()]
        if any(wd != 0 for wd in wds):
            W = ad.param_matrix().to(torch.float32)
            if len(set(wds)) == 1:
                G = G + wds[0] * W
            else:  # weight and bias in different groups (the Trainer's no-decay split)
                wd_cols = torch.full((ad.d_in,), wds[0], device=G.device)
                wd_cols[-1] = wds[1]
                G = G + W * wd_cols
        return G

    def _apply_H_g(self, ad: LayerAdapter, X: Tensor) -> Tensor:
        st = self.state[ad.weight]
        if "H_g" in st:
            return st["H_g"] @ X
        hist = self._history(st)  # K-BFGS(L): the middle matrix is kept between pushes
        return hist.apply(X, middle=self._middle(ad.name, int(st["pairs_accepted"]), hist))

    # -- stage 3: apply the step ----------------------------------------------------------
    def _kl_scale(self, directions: list[Tensor]) -> float:
        """ν = min(1, √(κ / (α² Σ⟨D, ĝ⟩))) when ``kl_clip`` = κ is set, else 1."""
        kl = self.hparams["kl_clip"]
        if kl is None:
            return 1.0
        total = 0.0
        for ad, D in zip(self.adapters, directions):
            lr = self._group_of(ad.weight)["lr"]
            total += lr * lr * float((D.double() * self.state[ad.weight]["momentum_buffer"].double()).sum())
        if total <= 0:
            return 1.0
        return min(1.0, math.sqrt(kl / total))

    def _growth_scale(self, sizes: list[float], scale: float, first_state: dict[str, Any]) -> float:
        """Shrink ``scale`` so that no layer's step exceeds ``max_update_growth`` times its size at the last
        curvature update; if it had to, ask for a curvature update at the next step."""
        growth = self.hparams["max_update_growth"]
        if growth is None:
            return scale
        ratio = 0.0
        for ad, size in zip(self.adapters, sizes):
            ref = self.state[ad.weight].get("ref_step_size")
            if ref is not None and float(ref) > 0:
                ratio = max(ratio, scale * size / float(ref))
        if ratio <= growth:
            return scale
        self._bump(first_state, "steps_clipped")
        first_state["refresh_next"] = torch.tensor(True)
        logger.debug("KBFGS: a layer's step was %.3gx its last curvature step's; scaled down to %gx", ratio, growth)
        return scale * growth / ratio

    def _remember_step_sizes(self, sizes: list[float], scale: float, curvature: bool) -> None:
        """A kept curvature step's per-layer sizes are the reference until the next curvature step."""
        if not sizes or not curvature:
            return
        for ad, size in zip(self.adapters, sizes):
            self.state[ad.weight]["ref_step_size"] = torch.tensor(scale * size, dtype=torch.float32)

    def _add_to_layers(self, directions: list[Tensor], factor: float) -> None:
        """W̄ ← W̄ + factor · α · D for every adapted layer (α: the layer's group lr)."""
        by_alpha: dict[float, tuple[list[Tensor], list[Tensor]]] = {}  # one multi-tensor add per step size
        for ad, D in zip(self.adapters, directions):
            targets, updates = by_alpha.setdefault(self._group_of(ad.weight)["lr"] * factor, ([], []))
            w, b = ad.from_matrix(D)
            targets.append(ad.weight)
            updates.append(w.to(ad.weight.dtype))
            if b is not None and ad.bias is not None:
                targets.append(ad.bias)
                updates.append(b.to(ad.bias.dtype))
        for alpha, (targets, updates) in by_alpha.items():
            torch._foreach_add_(targets, updates, alpha=alpha)

    def _apply(self, directions: list[Tensor], scale: float) -> dict[nn.Parameter, Tensor]:
        """W̄ ← W̄ − α ν D; fallback parameters by their own rule. Returns fallback backups."""
        self._add_to_layers(directions, -scale)
        backup: dict[nn.Parameter, Tensor] = {}
        needs_backup = self.capture.enabled and self.hparams["pairs"] == "same_batch"
        for g in self.param_groups:
            if g[ROLE] == ROLE_FALLBACK:
                if needs_backup:
                    params = [p for p in g["params"] if p.grad is not None]
                    copies = [torch.empty_like(p, requires_grad=False) for p in params]
                    torch._foreach_copy_(copies, [p.detach() for p in params])  # one multi-tensor copy
                    backup.update(zip(params, copies))
                self._fallback_step(g)
        return backup

    def _undo(self, directions: list[Tensor], scale: float, backup: dict[nn.Parameter, Tensor]) -> None:
        self._add_to_layers(directions, scale)
        for p, old in backup.items():
            p.copy_(old)

    # -- stage 4: second pass and output-side pairs ---------------------------------------
    def _second_pass(
        self, closure: Callable[[], Any], now: list[dict[str, Tensor]]
    ) -> tuple[Any, float | None, list[dict[str, Tensor]] | None]:
        """Re-evaluate the same batch at θ⁺.

        Returns the closure's loss, its value averaged over ranks (None if the closure returned None) and
        the second-pass statistics (None if the loss or a gradient mean is not finite)."""
        dev = now[0]["h_rows"].device
        expect = [r > 0 for r in torch.stack([d["h_rows"].reshape(()).to(dev) for d in now]).tolist()]
        loss, value, stats2 = self._run_closure(closure, capture=True)
        try:
            loss_ok = value is None or math.isfinite(value)  # the same verdict on every rank
            plus = (
                self._reduce(stats2, with_inputs=False, what="second pass (closure)", expect=expect)
                if loss_ok
                else None
            )
        finally:
            self.capture.reset("second")
        if plus is not None and not all_finite(*(d["g"] for d in plus)):
            plus = None
        return loss, value, plus

    def _run_closure(self, closure: Callable[[], Any], capture: bool) -> tuple[Any, float | None, list[LayerStats]]:
        """Call the closure with gradients saved and restored around it; statistics go to the second-pass
        sums if ``capture``, nowhere otherwise. Returns the loss, its mean over ranks, and those sums."""
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        # Only ∂L/∂h is needed: freezing the weights of layers whose bias keeps the output in the graph
        # skips the weight-gradient GEMMs (a third of the pass). Not under DDP, whose reducer expects
        # a gradient for every parameter it registered.
        frozen = [] if is_distributed() else [ad.weight for ad in self.adapters if ad.bias is not None]
        for w in frozen:
            w.requires_grad_(False)
        enabled = self.capture.enabled
        try:
            with torch.enable_grad(), self.capture.second_pass() as stats2:
                self.capture.enabled = capture
                loss = closure()
        finally:
            self.capture.enabled = enabled
            for w in frozen:
                w.requires_grad_(True)
            for p, g in zip(params, saved):
                p.grad = g
        return loss, self._mean_over_ranks(loss), stats2

    def _mean_over_ranks(self, loss: Any) -> float | None:
        """The closure's loss as a float, averaged over ranks (None if the closure returned None). Reduced on
        the layers' device, which the backend supports (NCCL has no CPU tensors)."""
        if loss is None:
            return None
        dev = self.adapters[0].weight.device
        t = torch.as_tensor(loss).detach().to(device=dev, dtype=torch.float64).sum().reshape(1)
        if is_distributed():
            all_reduce_sum_([t])
            t /= world_size()
        return float(t)

    # -- the loss guard (not in the paper) ----------------------------------------------------
    def _verify(
        self,
        closure: Callable[[], Any],
        first_state: dict[str, Any],
        value: float | None,
        plus: list[dict[str, Tensor]] | None,
        undo: Callable[[], None],
        redo: Callable[[], None],
    ) -> str | None:
        """Why the step just taken must be undone, or None.

        Undone: a non-finite loss or gradient mean at θ⁺, or a same-batch loss increase
        ``L(θ⁺) > L(θ) + max_loss_increase·|L(θ)|``. ``L(θ)`` costs a pass (the step is undone, the closure
        called, the step redone), so it is measured only when ``L(θ⁺)`` is above that bound for the running
        average ``r`` of accepted losses in place of ``L(θ)``: a blow-up always is, an ordinary step rarely."""
        if plus is None:
            undo()
            return "the loss or a gradient at the new point is not finite"
        tol = self.hparams["max_loss_increase"]
        if tol is not None and value is None and not self._warned_no_loss:
            self._warned_no_loss = True
            warnings.warn(
                "KBFGS: the closure returned None, so the loss guard (max_loss_increase) cannot act; return the "
                "loss from the closure, or pass max_loss_increase=None to silence this",
                UserWarning,
                stacklevel=4,
            )
        if tol is None or value is None or "loss_avg" not in first_state:  # no accepted loss yet
            return None
        r = float(first_state["loss_avg"])
        if value <= r + tol * abs(r):
            return None
        undo()
        _, before, _ = self._run_closure(closure, capture=False)
        self._bump(first_state, "loss_checks")
        if before is not None and value > before + tol * abs(before):
            return f"the loss of this batch rose from {before:.4g} to {value:.4g}"
        redo()
        return None

    @staticmethod
    def _accept_loss(first_state: dict[str, Any], value: float | None) -> None:
        """r ← 0.9 r + 0.1 L(θ⁺) (the first accepted loss initialises it); the step-size backoff grows by
        1.25 (up to 1)."""
        first_state["step_backoff"] = torch.tensor(min(1.0, 1.25 * KBFGS._backoff(first_state)), dtype=torch.float32)
        if value is None:
            return
        r = value if "loss_avg" not in first_state else 0.9 * float(first_state["loss_avg"]) + 0.1 * value
        first_state["loss_avg"] = torch.tensor(r, dtype=torch.float64)

    @staticmethod
    def _backoff(first_state: dict[str, Any]) -> float:
        return float(first_state["step_backoff"]) if "step_backoff" in first_state else 1.0

    def _update_output_factors(self, now: list[dict[str, Tensor]], plus: list[dict[str, Tensor]]) -> None:
        """s = h̄(θ⁺) − h̄(θ), y = ḡ(θ⁺) − ḡ(θ) on the same batch, then the H_g update."""
        self._pair_updates(
            [b["h"] - a["h"] for a, b in zip(now, plus)],
            [b["g"] - a["g"] for a, b in zip(now, plus)],
            [a["g"] for a in now],
        )

    def _update_output_factors_consecutive(self, now: list[dict[str, Tensor]]) -> None:
        """No second pass: s = h̄_k − h̄_{k−1}, y = ḡ_k − ḡ_{k−1} from consecutive curvature batches."""
        have = [i for i, ad in enumerate(self.adapters) if bool(self.state[ad.weight]["has_prev"])]
        states = [self.state[self.adapters[i].weight] for i in have]
        self._pair_updates(
            [now[i]["h"] - st["h_prev"] for i, st in zip(have, states)],
            [now[i]["g"] - st["g_prev"] for i, st in zip(have, states)],
            [now[i]["g"] for i in have],
            layers=have,
        )
        for ad, a in zip(self.adapters, now):
            st = self.state[ad.weight]
            st["h_prev"].copy_(a["h"])
            st["g_prev"].copy_(a["g"])
            st["has_prev"].fill_(True)

    def _pair_updates(
        self, s_raw: list[Tensor], y_raw: list[Tensor], g_now: list[Tensor], layers: list[int] | None = None
    ) -> None:
        """Per layer: s̄ ← β s̄ + (1−β) s, ȳ likewise; double damping; BFGS (or L-BFGS push) if the pair passes.

        Layers of one output width are done together as the rows of a matrix (:mod:`hf_qn.linalg.batched`),
        and what happened to every layer is read back with one host sync at the end. ``layers`` are the
        adapter indices the lists refer to (default: all)."""
        hp = self.hparams
        beta = hp["pair_decay"]
        layers = list(range(len(self.adapters))) if layers is None else layers
        dense = hp["history_size"] is None
        results = []  # per group: adapter indices, flags (powell, lm, kept) x L, damped pairs, new factors
        for rows in _groups([self.adapters[i] for i in layers], key=lambda ad: (ad.d_out, ad.weight.device)):
            idx = [layers[r] for r in rows]
            sts = [self.state[self.adapters[i].weight] for i in idx]
            S = torch.stack([st["s_avg"] for st in sts]).mul_(beta)
            S.add_(torch.stack([s_raw[r] for r in rows]).to(torch.float32), alpha=1.0 - beta)
            Y = torch.stack([st["y_avg"] for st in sts]).mul_(beta)
            Y.add_(torch.stack([y_raw[r] for r in rows]).to(torch.float32), alpha=1.0 - beta)
            torch._foreach_copy_(
                [st["s_avg"] for st in sts] + [st["y_avg"] for st in sts], list(S.unbind(0)) + list(Y.unbind(0))
            )
            usable = torch.isfinite(S).all(-1) & torch.isfinite(Y).all(-1) & (S.abs().amax(-1) > 0)
            Hy = torch.stack([self._apply_H_g(self.adapters[i], y) for i, y in zip(idx, Y)])
            d = double_damping_rows(
                S, Y, Hy, usable, mu1=hp["powell_mu"], mu2=math.sqrt(hp["damping"]), powell=True, lm=hp["lm_damping"]
            )
            grad_norm = torch.stack([g_now[r] for r in rows]).norm(dim=-1)
            ok, sy = curvature_ok_rows(d.s, d.y, hp["curvature_eps"], grad_norm)
            ok &= usable
            new: list[Tensor] | None = None
            kept = ok
            if dense:
                if hp["lm_damping"] != "none":  # y changed where LM fired (elsewhere H y is recomputed as it was)
                    Hy = torch.stack([st["H_g"] @ y for st, y in zip(sts, d.y)])
                new, finite = self._rank2_updates([st["H_g"] for st in sts], d.s, d.y, Hy, sy)
                kept = ok & finite
            results.append((idx, torch.stack([d.powell, d.lm, kept]), d, new))
        for (idx, _, d, new), flags in zip(results, self._read_flags([r[1] for r in results])):
            for k, i in enumerate(idx):
                st = self.state[self.adapters[i].weight]
                powell, lm, accepted = (f[k] for f in flags)
                if powell:
                    self._bump(st, "powell_damped")
                if lm:
                    self._bump(st, "lm_damped")
                if not accepted:
                    self._bump(st, "pairs_skipped")
                    continue
                if new is not None:
                    st["H_g"] = new[k]  # a fresh tensor already: rebinding saves a full copy of the factor
                else:
                    hist = self._history(st)
                    hist.push(d.s[k], d.y[k])
                    self._store_history(st, hist)
                self._bump(st, "pairs_accepted")

    @staticmethod
    def _rank2_updates(Hs: list[Tensor], s: Tensor, y: Tensor, Hy: Tensor, sy: Tensor) -> tuple[list[Tensor], Tensor]:
        """The inverse-BFGS updates of a group of factors (rows of ``s``, ``y``, ``Hy``), each a new tensor,
        and a mask of those that came out finite. The new factors of a group all exist until the caller has
        read the masks: at most one extra copy of the group's factors, after the backward has freed the
        activations (GPT-2 small's peak memory did not change)."""
        U, V = bfgs_rank2_rows(s, y, Hy, sy, Hs[0].dtype)
        new = [torch.addmm(H, u, v) for H, u, v in zip(Hs, U, V)]
        return new, torch.isfinite(torch.stack([H.sum() for H in new]))

    def _read_flags(self, flags: list[Tensor]) -> list[list[list[bool]]]:
        """Boolean masks of several groups, read on the host with one sync."""
        if not flags:
            return []
        dev = flags[0].device
        values = torch.cat([f.to(dev) for f in flags], dim=1).tolist()
        out, start = [], 0
        for f in flags:
            out.append([row[start : start + f.shape[1]] for row in values])
            start += f.shape[1]
        return out

    # -- stage 5: input-side inverse --------------------------------------------------------
    def _update_input_inverses(self, stats: list[dict[str, Tensor]]) -> None:
        """Hessian-action BFGS (paper, section 3.3): s_a = H_a ā, y_a = (A + √λ I) s_a, BFGS on H_a;
        or a Cholesky re-inversion every ``inverse_interval`` curvature steps. The BFGS layers of one
        input width are done together, as for H_g."""
        hp = self.hparams
        sqrt_lam = math.sqrt(hp["damping"])
        todo: list[tuple[dict[str, Any], Tensor]] = []
        for ad in self.adapters:
            st = self.state[ad.weight]
            a_mean = st.pop("a_mean", None)
            if a_mean is None:
                continue  # first statistics: H_a was just inverted exactly
            if ad.input_diagonal:
                self._invert_input(ad, st, sqrt_lam)
                continue
            if hp["input_inverse"] == "cholesky":
                st["inverse_countdown"] = st.get("inverse_countdown", torch.tensor(0)) - 1
                if int(st["inverse_countdown"]) <= 0:
                    st["inverse_countdown"].fill_(hp["inverse_interval"])
                    self._invert_input(ad, st, sqrt_lam)
                continue
            todo.append((st, a_mean))
        results = []
        for rows in _groups(todo, key=lambda t: (t[1].shape[0], t[1].device)):
            sts = [todo[r][0] for r in rows]
            a = torch.stack([todo[r][1] for r in rows])
            s_a = torch.stack([st["H_a"] @ a_k for st, a_k in zip(sts, a)])
            y_a = torch.stack([st["A"] @ s_k for st, s_k in zip(sts, s_a)]) + sqrt_lam * s_a
            ok, sy = curvature_ok_rows(s_a, y_a, hp["curvature_eps"], a.norm(dim=-1))
            Hy = torch.stack([st["H_a"] @ y_k for st, y_k in zip(sts, y_a)])
            new, finite = self._rank2_updates([st["H_a"] for st in sts], s_a, y_a, Hy, sy)
            results.append((sts, new, (ok & finite).unsqueeze(0)))
        for (sts, new, _), flags in zip(results, self._read_flags([r[2] for r in results])):
            for st, H_new, accepted in zip(sts, new, flags[0]):
                if accepted:
                    st["H_a"] = H_new
                else:
                    self._bump(st, "input_updates_skipped")

    # ------------------------------------------------------------------ state helpers
    def _layer_state(self, ad: LayerAdapter) -> dict[str, Any]:
        st = self.state[ad.weight]
        if "qn_step" in st:
            return st
        dev = ad.weight.device
        hp = self.hparams
        st["qn_step"] = torch.tensor(0, dtype=torch.int64)
        st["input_batches"] = torch.tensor(0, dtype=torch.int64)  # batches in A's plain average
        st["has_prev"] = torch.tensor(False)
        if ad.input_diagonal:
            st["A"] = torch.zeros(ad.d_in, dtype=torch.float32, device=dev)
            st["H_a"] = torch.ones(ad.d_in, dtype=torch.float32, device=dev)
        else:
            st["A"] = torch.zeros(ad.d_in, ad.d_in, dtype=torch.float32, device=dev)
            st["H_a"] = torch.eye(ad.d_in, dtype=torch.float32, device=dev)
        if hp["history_size"] is None:
            st["H_g"] = torch.eye(ad.d_out, dtype=torch.float32, device=dev)
        else:
            self._store_history(st, LBFGSHistory(hp["history_size"], ad.d_out, gamma=1.0, device=dev))
        st["momentum_buffer"] = torch.zeros(ad.d_out, ad.d_in, dtype=torch.float32, device=dev)
        for k in ("s_avg", "y_avg", "h_prev", "g_prev"):
            st[k] = torch.zeros(ad.d_out, dtype=torch.float32, device=dev)
        for k in _COUNTERS:
            st[k] = torch.tensor(0, dtype=torch.int64)
        return st

    def _history(self, st: dict[str, Any]) -> LBFGSHistory:
        # The compact form's products lose too much in float32 over ~20 ill-conditioned pairs (measured:
        # K-BFGS(L) left K-BFGS after 20 steps and diverged on the autoencoder); the history is only
        # p x d_out, so compute in float64 while storing float32.
        return LBFGSHistory.from_state(
            {k[3:]: st[k] for k in _LBFGS_KEYS}, gamma=1.0, compute_dtype=torch.float64
        )

    @staticmethod
    def _store_history(st: dict[str, Any], hist: LBFGSHistory) -> None:
        for k, v in hist.state_dict().items():
            st[f"Hg_{k}"] = v

    @staticmethod
    def _bump(st: dict[str, Any], key: str) -> None:
        if key not in st:
            st[key] = torch.tensor(0, dtype=torch.int64)
        st[key] += 1

    def _schedule_capture(self) -> None:
        """Capture statistics only for steps that update curvature: every step during the warm-up, then
        steps 0, k, 2k, ... (k = ``update_interval``). Inside a second pass the schedule is left alone: the
        Trainer calls ``optimizer.train()`` from the closure, and a refresh step (``refresh_next``) is no
        longer "next" by then, so re-scheduling would switch the capture of that very pass off."""
        if self.adapters and self.capture.mode == "primary":
            self.capture.enabled = self._training and self.curvature_step_next()
            self.capture.gram_dtype = getattr(torch, self.hparams["matmul_dtype"])

    def _current_scale(self) -> float:
        return float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for st in self.state.values():  # checkpoints from before input_warm_start kept a boolean flag
            if "first_stats" in st:
                st.setdefault("input_batches", torch.tensor(int(bool(st.pop("first_stats"))), dtype=torch.int64))
        self._schedule_capture()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero gradients and drop statistics captured since the last step (they were never committed)."""
        super().zero_grad(set_to_none=set_to_none)
        if self.capture.mode == "primary":
            self.capture.reset()


class KBFGSL(KBFGS):
    """K-BFGS(L): :class:`KBFGS` with an L-BFGS output-side factor of ``history_size`` pairs.

    Same arguments as :class:`KBFGS`; ``history_size`` defaults to 100 (the paper's).
    """

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        kwargs.setdefault("history_size", 100)
        if kwargs["history_size"] is None:
            raise ValueError("Invalid history_size: None (KBFGSL needs an integer >= 1; use KBFGS for dense BFGS)")
        super().__init__(model, **kwargs)


def _groups(items: list[Any], key: Callable[[Any], Any]) -> list[list[int]]:
    """Indices of ``items`` grouped by ``key``, groups and members in first-seen order."""
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    return list(groups.values())
