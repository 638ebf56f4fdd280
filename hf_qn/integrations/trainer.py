"""``QNTrainingArguments`` and ``QNTrainer``: hf_qn's optimizers inside transformers' ``Trainer``.

The Trainer calls ``optimizer.step()`` with no closure, once per optimizer step, after clipping
(transformers 5.x ``_run_epoch``). K-BFGS needs the same minibatch re-evaluated at the new point, so
``QNTrainer`` keeps the inputs of every micro-batch of the current optimizer step and gives the
optimizer a *closure provider*: on curvature steps the optimizer re-runs ``training_step`` on those
inputs (same loss scaling, same gradient-accumulation division, same ``accelerator.backward``), and its
gradients are discarded. mL-BFGS needs nothing of the sort.

Everything else is the Trainer's own machinery: scheduler, checkpoints (the optimizer state follows
the hf_qn state contract, so ``resume_from_checkpoint`` continues exactly), logging (optimizer
statistics are merged into every ``log`` call that carries the training loss), evaluation (the Trainer
calls ``optimizer.eval()``, which stops statistic capture).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..adapters import LayerPolicy
from ..optim.factories import KBFGSFactory, MLBFGSFactory
from ..optim.kbfgs import KBFGS, KBFGSL, MATMUL_DTYPES
from ..optim.mlbfgs import MLBFGS

__all__ = ["QN_OPTIMIZERS", "KBFGSFactory", "MLBFGSFactory", "QNTrainer", "QNTrainingArguments", "build_optimizer"]

logger = logging.getLogger(__name__)

QN_OPTIMIZERS = ("kbfgs", "kbfgs_l", "mlbfgs")


@dataclass
class QNTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the hf_qn optimizer and its hyperparameters (all ``--qn_*`` flags).

    ``learning_rate`` is the quasi-Newton step size (K-BFGS's paper value is 0.3, mL-BFGS's 0.1) and
    ``weight_decay`` its weight decay (L2 for K-BFGS, decoupled for mL-BFGS). A ``None`` hyperparameter
    means the optimizer's documented default. ``max_grad_norm`` defaults to 0 here: quasi-Newton steps
    scale themselves, and clipping the raw gradient would change mL-BFGS's curvature pairs (K-BFGS's pairs
    come from pre-activation statistics, which clipping does not touch).
    """

    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Raw-gradient clipping before the optimizer step (0 = off, the QN default)."},
    )
    qn_optimizer: str | None = field(
        default=None,
        metadata={"help": f"hf_qn optimizer: one of {QN_OPTIMIZERS}; None uses the Trainer's `optim`."},
    )
    qn_damping: float | None = field(default=None, metadata={"help": "K-BFGS damping lambda (default 0.3)."})
    qn_momentum: float | None = field(default=None, metadata={"help": "Gradient momentum (default 0.9)."})
    qn_update_interval: int | None = field(
        default=None, metadata={"help": "Steps between curvature updates (K-BFGS 1, mL-BFGS 20)."}
    )
    qn_history_size: int | None = field(
        default=None, metadata={"help": "L-BFGS pairs kept (K-BFGS(L) 100, mL-BFGS 10)."}
    )
    qn_stat_decay: float | None = field(default=None, metadata={"help": "K-BFGS input-factor decay (0.9)."})
    qn_pair_decay: float | None = field(default=None, metadata={"help": "K-BFGS pair decay (0.9)."})
    qn_powell_mu: float | None = field(default=None, metadata={"help": "K-BFGS Powell mu1 (0.2)."})
    qn_lm_damping: str | None = field(default=None, metadata={"help": "interpolate | additive | none."})
    qn_input_inverse: str | None = field(default=None, metadata={"help": "K-BFGS H_a: bfgs | cholesky."})
    qn_inverse_interval: int | None = field(default=None, metadata={"help": "Cholesky re-inversion interval."})
    qn_input_warm_start: int | None = field(
        default=None, metadata={"help": "K-BFGS: curvature steps whose input Grams are plainly averaged (0)."}
    )
    qn_pairs: str | None = field(default=None, metadata={"help": "K-BFGS pairs: same_batch | consecutive."})
    qn_kl_clip: float | None = field(default=None, metadata={"help": "K-BFGS KL clip (off by default)."})
    qn_max_loss_increase: float | None = field(
        default=None,
        metadata={"help": "K-BFGS loss guard: undo a step that raises its batch's loss by more than this fraction "
                  "(default 0.25; inf turns the guard off)."},
    )
    qn_fallback_lr: float = field(
        default=1e-3, metadata={"help": "AdamW lr of the parameters K-BFGS does not precondition."}
    )
    qn_max_dim: int = field(default=4096, metadata={"help": "Largest Kronecker factor dimension adapted."})
    qn_exclude: list[str] = field(
        default_factory=list, metadata={"help": "Regexes of module names K-BFGS must not adapt."}
    )
    qn_param_beta: float | None = field(default=None, metadata={"help": "mL-BFGS parameter EMA (0.99)."})
    qn_grad_beta: float | None = field(default=None, metadata={"help": "mL-BFGS gradient EMA (0.99)."})
    qn_sigma_low: float | None = field(default=None, metadata={"help": "mL-BFGS damping lower bound."})
    qn_sigma_high: float | None = field(default=None, metadata={"help": "mL-BFGS damping upper bound."})
    qn_normalize: str | None = field(default=None, metadata={"help": "mL-BFGS direction: adam | unit | grad | none."})
    qn_blocks: str | None = field(
        default=None, metadata={"help": "mL-BFGS blocks: layer | param | model | a chunk size in elements."}
    )
    qn_min_block_size: int | None = field(
        default=None, metadata={"help": "mL-BFGS: merge consecutive blocks smaller than this many elements (0)."}
    )
    qn_history_dtype: str = field(default="float32", metadata={"help": "mL-BFGS history: float32 | bfloat16."})
    qn_matmul_dtype: str = field(
        default="float32",
        metadata={"help": "K-BFGS dtype of the per-step Gram and H_g G H_a products: float32 | bfloat16 | float16."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qn_optimizer is not None and self.qn_optimizer not in QN_OPTIMIZERS:
            raise ValueError(f"Invalid qn_optimizer: {self.qn_optimizer!r} (must be one of {QN_OPTIMIZERS} or None)")
        if self.qn_blocks is not None:
            _blocks_arg(self.qn_blocks)  # raises on a bad value
        if self.qn_min_block_size is not None and self.qn_min_block_size < 0:
            raise ValueError(f"Invalid qn_min_block_size: {self.qn_min_block_size} (must be >= 0)")
        if self.qn_history_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"Invalid qn_history_dtype: {self.qn_history_dtype!r} (must be float32 or bfloat16)")
        if self.qn_matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(
                f"Invalid qn_matmul_dtype: {self.qn_matmul_dtype!r} (must be one of {', '.join(MATMUL_DTYPES)})"
            )


def _blocks_arg(value: str) -> str | int:
    """``--qn_blocks`` as :func:`~hf_qn.optim.mlbfgs.build_blocks` takes it: a mode name, or a chunk size."""
    if value in ("layer", "param", "model"):
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"Invalid qn_blocks: {value!r} (must be layer, param, model or a chunk size >= 1)")


def _opt(kwargs: dict[str, Any], **values: Any) -> dict[str, Any]:
    kwargs.update({k: v for k, v in values.items() if v is not None})
    return kwargs


def build_optimizer(
    name: str, model: nn.Module, args: QNTrainingArguments, no_decay: set[str] | None = None
) -> torch.optim.Optimizer:
    """Build the hf_qn optimizer ``name`` for ``model`` from ``args`` (honouring a no-decay name set)."""
    no_decay = no_decay or set()
    if name in ("kbfgs", "kbfgs_l"):
        kw = _opt(
            {},
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            damping=args.qn_damping,
            momentum=args.qn_momentum,
            update_interval=args.qn_update_interval,
            stat_decay=args.qn_stat_decay,
            pair_decay=args.qn_pair_decay,
            powell_mu=args.qn_powell_mu,
            lm_damping=args.qn_lm_damping,
            input_inverse=args.qn_input_inverse,
            inverse_interval=args.qn_inverse_interval,
            input_warm_start=args.qn_input_warm_start,
            pairs=args.qn_pairs,
            kl_clip=args.qn_kl_clip,
            matmul_dtype=args.qn_matmul_dtype,
            fallback_lr=args.qn_fallback_lr,
        )
        if args.qn_max_loss_increase is not None:
            kw["max_loss_increase"] = None if math.isinf(args.qn_max_loss_increase) else args.qn_max_loss_increase
        if name == "kbfgs_l" and args.qn_history_size is not None:
            kw["history_size"] = args.qn_history_size
        policy = LayerPolicy(exclude=tuple(args.qn_exclude), max_dim=args.qn_max_dim)
        cls = KBFGSL if name == "kbfgs_l" else KBFGS
        return cls(model, no_decay=sorted(no_decay), policy=policy, **kw)
    if name == "mlbfgs":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = []
        for decay in (True, False):
            sel = [(n, p) for n, p in named if (n not in no_decay) == decay]
            if sel:
                groups.append(
                    {
                        "params": [p for _, p in sel],
                        "param_names": [n for n, _ in sel],
                        "weight_decay": args.weight_decay if decay else 0.0,
                    }
                )
        kw = _opt(
            {},
            lr=args.learning_rate,
            momentum=args.qn_momentum,
            history_size=args.qn_history_size,
            update_interval=args.qn_update_interval,
            param_beta=args.qn_param_beta,
            grad_beta=args.qn_grad_beta,
            sigma_low=args.qn_sigma_low,
            sigma_high=args.qn_sigma_high,
            normalize=args.qn_normalize,
            blocks=None if args.qn_blocks is None else _blocks_arg(args.qn_blocks),
            min_block_size=args.qn_min_block_size,
        )
        kw["history_dtype"] = getattr(torch, args.qn_history_dtype)
        return MLBFGS(groups, **kw)
    raise ValueError(f"Invalid qn_optimizer: {name!r} (must be one of {QN_OPTIMIZERS})")


def unwrap_optimizer(opt: Any) -> Any:
    """The hf_qn optimizer inside Accelerate's ``AcceleratedOptimizer`` (or ``opt`` itself)."""
    while hasattr(opt, "optimizer") and not isinstance(opt, (KBFGS, MLBFGS)):
        opt = opt.optimizer
    return opt


class QNTrainer(Trainer):
    """A ``Trainer`` that builds hf_qn optimizers and gives K-BFGS its second pass.

    Use with :class:`QNTrainingArguments` (``qn_optimizer="kbfgs" | "kbfgs_l" | "mlbfgs"``); any other
    optimizer route of the Trainer keeps working (``optimizers=``, ``optimizer_cls_and_kwargs=``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._qn_batches: list[tuple[nn.Module, Any, Any]] = []
        self._qn_step_id: int | None = None

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        name = getattr(self.args, "qn_optimizer", None)
        if self.optimizer is not None or name is None:
            opt = super().create_optimizer(model) if self.optimizer is None else self.optimizer
            self._wire(opt)
            return opt
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(
                f"qn_optimizer={name!r} supports single-process and DDP training (torchrun / accelerate launch "
                "--multi_gpu); DeepSpeed ZeRO and FSDP flatten or shard parameters, which breaks the per-layer "
                "curvature. Disable deepspeed/fsdp in the TrainingArguments."
            )
        opt_model = self.model if model is None else model
        assert opt_model is not None
        decay = set(self.get_decay_parameter_names(opt_model))
        no_decay = {n for n, p in opt_model.named_parameters() if n not in decay}
        self.optimizer = build_optimizer(name, opt_model, self.args, no_decay)  # type: ignore[arg-type]
        self._wire(self.optimizer)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            logger.warning(
                "max_grad_norm=%s clips the raw gradient before the %s step: mL-BFGS's curvature pairs then see "
                "clipped gradients; K-BFGS's pairs do not (they come from pre-activation statistics). "
                "Set max_grad_norm=0 to disable.",
                self.args.max_grad_norm,
                name,
            )
        return self.optimizer

    def _wire(self, opt: Any) -> None:
        """Give a K-BFGS optimizer (however it was built) its closure provider and the loss scaler."""
        inner = unwrap_optimizer(opt)
        if isinstance(inner, KBFGS):
            inner.closure_provider = self._second_pass_closure
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                inner.set_grad_scaler(scaler)

    # ------------------------------------------------------------------ second pass
    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """The Trainer's step, keeping this micro-batch for K-BFGS's same-batch second pass."""
        inner = unwrap_optimizer(self.optimizer)
        if isinstance(inner, KBFGS) and inner.curvature_step_next():
            step_id = self.state.global_step
            if self._qn_step_id != step_id:
                self._qn_batches, self._qn_step_id = [], step_id
            self._qn_batches.append((model, inputs, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)

    def _second_pass_closure(self) -> Any:
        """Re-run every kept micro-batch of this optimizer step at the current parameters; returns the loss.

        K-BFGS may call it twice in one step (its loss guard re-measures the loss before the step), so the
        batches stay until the next step's first ``training_step`` replaces them."""
        batches = self._qn_batches
        if not batches or self._qn_step_id != self.state.global_step:
            raise RuntimeError("QNTrainer: no training batch was kept for K-BFGS's second pass of this step")
        total = None
        for model, inputs, num_items in batches:
            loss = super().training_step(model, inputs, num_items)
            total = loss if total is None else total + loss
        return total

    # ------------------------------------------------------------------ logging and cards
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        inner = unwrap_optimizer(self.optimizer) if self.optimizer is not None else None
        if "loss" in logs and isinstance(inner, (KBFGS, MLBFGS)):
            logs = {**logs, **inner.statistics()}
        super().log(logs, start_time)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's card, with its optimizer line replaced by the truth about the hf_qn optimizer."""
        super().create_model_card(*args, **kwargs)
        inner = unwrap_optimizer(self.optimizer) if self.optimizer is not None else None
        if not self.is_world_process_zero() or not isinstance(inner, (KBFGS, MLBFGS)):
            return
        import os

        path = os.path.join(str(self.args.output_dir), "README.md")
        if not os.path.exists(path):
            return
        with open(path) as f:
            text = f.read()
        hp = inner.hparams if isinstance(inner, KBFGS) else dict(inner.defaults)
        desc = f"hf_qn.{type(inner).__name__} with " + ", ".join(f"{k}={v}" for k, v in sorted(hp.items()))
        if isinstance(inner, KBFGS):
            desc += f"; fallback for {len(inner.assignment.fallback)} non-adapted parameters"
        new, n = re.subn(r"^- optimizer: .*$", f"- optimizer: {desc}", text, count=1, flags=re.MULTILINE)
        if n == 0:
            new = text + f"\n\n## Optimizer\n\n{desc}\n"
        with open(path, "w") as f:
            f.write(new)
