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

import ast
import dataclasses
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from ..adapters import LayerPolicy
from ..optim.config import KBFGSConfig, MLBFGSConfig
from ..optim.factories import KBFGSFactory, MLBFGSFactory
from ..optim.kbfgs import KBFGS, KBFGSL
from ..optim.mlbfgs import MLBFGS

__all__ = [
    "QN_OPTIMIZERS", "KBFGSFactory", "MLBFGSFactory", "QNTrainer", "QNTrainingArguments", "build_optimizer",
    "parse_qn_args",
]

logger = logging.getLogger(__name__)

QN_OPTIMIZERS = ("kbfgs", "kbfgs_l", "mlbfgs")


#: flags of earlier versions, each now a key of ``qn_args`` (accepted with a FutureWarning).
_LEGACY_FLAGS = {
    "qn_damping": "damping", "qn_momentum": "momentum", "qn_update_interval": "update_interval",
    "qn_history_size": "history_size", "qn_stat_decay": "factor_decay", "qn_pair_decay": "pair_decay",
    "qn_powell_mu": "powell_mu", "qn_lm_damping": "lm_damping", "qn_input_inverse": "input_inverse",
    "qn_inverse_interval": "inverse_interval", "qn_input_warm_start": "input_warm_start", "qn_pairs": "pairs",
    "qn_kl_clip": "kl_clip", "qn_max_loss_increase": "max_loss_increase", "qn_fallback_lr": "fallback_lr",
    "qn_param_beta": "param_decay", "qn_grad_beta": "grad_decay", "qn_sigma_low": "sigma_low",
    "qn_sigma_high": "sigma_high", "qn_normalize": "normalize", "qn_blocks": "blocks",
    "qn_min_block_size": "min_block_size", "qn_history_dtype": "history_dtype", "qn_matmul_dtype": "matmul_dtype",
    "qn_max_dim": "max_dim", "qn_exclude": "exclude",
}


@dataclass
class _LegacyQNFlags:
    """The per-hyperparameter ``--qn_*`` flags of earlier versions; use ``qn_args`` instead."""

    qn_damping: float | None = None
    qn_momentum: float | None = None
    qn_update_interval: int | None = None
    qn_history_size: int | None = None
    qn_stat_decay: float | None = None
    qn_pair_decay: float | None = None
    qn_powell_mu: float | None = None
    qn_lm_damping: str | None = None
    qn_input_inverse: str | None = None
    qn_inverse_interval: int | None = None
    qn_input_warm_start: int | None = None
    qn_pairs: str | None = None
    qn_kl_clip: float | None = None
    qn_max_loss_increase: float | None = None
    qn_fallback_lr: float | None = None
    qn_param_beta: float | None = None
    qn_grad_beta: float | None = None
    qn_sigma_low: float | None = None
    qn_sigma_high: float | None = None
    qn_normalize: str | None = None
    qn_blocks: str | None = None
    qn_min_block_size: int | None = None
    qn_history_dtype: str | None = None
    qn_matmul_dtype: str | None = None
    qn_max_dim: int | None = None
    qn_exclude: list[str] | None = None


@dataclass
class QNTrainingArguments(TrainingArguments, _LegacyQNFlags):
    """``TrainingArguments`` plus the hf_qn optimizer: ``qn_optimizer`` picks it and ``qn_args`` sets any of
    its hyperparameters (the fields of :class:`~hf_qn.optim.config.KBFGSConfig` or
    :class:`~hf_qn.optim.config.MLBFGSConfig`), e.g. ``--qn_args "damping=0.2,update_interval=10"`` or a JSON
    object; in Python also a dict.

    ``learning_rate`` is the quasi-Newton step size and ``weight_decay`` its regularisation (K-BFGS's coupled
    ``l2``, mL-BFGS's decoupled ``weight_decay``). ``max_grad_norm`` defaults to 0 here: quasi-Newton steps
    scale themselves, and clipping the raw gradient would change mL-BFGS's curvature pairs (K-BFGS's pairs
    come from pre-activation statistics, which clipping does not touch). The per-hyperparameter ``--qn_*``
    flags of earlier versions still work, with a FutureWarning, and are merged into ``qn_args``.
    """

    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Raw-gradient clipping before the optimizer step (0 = off, the QN default)."},
    )
    learning_rate: float | None = field(  # type: ignore[assignment]  # None: the optimizer's own
        default=None,
        metadata={"help": "Step size; unset: the hf_qn optimizer's own default (K-BFGS 6e-3 for a language model "
                  "trained from scratch up to width 128, 6e-3 * 128 / width beyond, else 3e-3; mL-BFGS 1e-3), else "
                  "the Trainer's 5e-5."},
    )
    weight_decay: float | None = field(  # type: ignore[assignment]  # None: the optimizer's own
        default=None,
        metadata={"help": "Regularisation; unset: the hf_qn optimizer's own default (K-BFGS's l2 1e-5, "
                  "mL-BFGS 0), else the Trainer's 0."},
    )
    qn_optimizer: str | None = field(
        default=None,
        metadata={"help": f"hf_qn optimizer: one of {QN_OPTIMIZERS}; None uses the Trainer's `optim`."},
    )
    qn_args: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Hyperparameters of the hf_qn optimizer: 'name=value,name=value' or a JSON object, with "
                  "the names of KBFGSConfig / MLBFGSConfig (e.g. 'damping=0.2,update_interval=10'), and for K-BFGS "
                  "those of LayerPolicy, which layers it adapts (e.g. \"exclude=('wte',),one_sided_heads=False\")."},
    )
    qn_log_statistics: str = field(
        default="interval",
        metadata={"help": "The optimizer's qn/* statistics in the logs: interval (counts since the last log), "
                  "total (counts since the start) or off."},
    )
    qn_log_factor_norms: bool = field(
        default=False,
        metadata={"help": "K-BFGS: with qn_log_statistics, also log qn/max_norm_H_g and qn/max_norm_H_a, Lanczos "
                  "estimates of the factors' largest eigenvalues (they read every factor 30 times: on MiniLM "
                  "about half a training step per log line on a CPU)."},
    )

    def _fill_optimizer_defaults(self) -> None:
        """An unset ``learning_rate`` / ``weight_decay`` is the chosen optimizer's own default (not the Trainer's
        5e-5; a ``preset`` in ``qn_args`` gives its own), said in the log. K-BFGS's default
        ``lr`` follows the model, so ``learning_rate`` stays None until the optimizer resolves it (the optimizer's
        ``param_groups`` and the model card carry the value)."""
        preset = parse_qn_args(self.qn_args).get("preset") if self.qn_optimizer is not None else None
        lr, wd = _optimizer_defaults(self.qn_optimizer, preset)
        #: whether the caller set ``learning_rate`` (recipes apply it to every optimizer they compare).
        self.learning_rate_given = self.learning_rate is not None
        if self.learning_rate is None:
            self.learning_rate = lr
            if lr is None:
                logger.info("learning_rate not set: %s chooses its default lr for the model", self.qn_optimizer)
            elif self.qn_optimizer is not None:
                logger.info("learning_rate not set: using %s's default %g", self.qn_optimizer, lr)
        if self.weight_decay is None:
            self.weight_decay = wd
            if self.qn_optimizer is not None:
                logger.info("weight_decay not set: using %s's default %g", self.qn_optimizer, wd)

    def __post_init__(self) -> None:
        self._fill_optimizer_defaults()
        super().__post_init__()
        if self.qn_optimizer is not None and self.qn_optimizer not in QN_OPTIMIZERS:
            raise ValueError(f"Invalid qn_optimizer: {self.qn_optimizer!r} (must be one of {QN_OPTIMIZERS} or None)")
        if self.qn_log_statistics not in ("interval", "total", "off"):
            raise ValueError(
                f"Invalid qn_log_statistics: {self.qn_log_statistics!r} (must be 'interval', 'total' or 'off')"
            )
        hyper = parse_qn_args(self.qn_args)
        for flag, name in _LEGACY_FLAGS.items():
            value = getattr(self, flag)
            if value is None:
                continue
            if flag == "qn_exclude":
                value = tuple(value)  # as qn_args writes it: exclude=('lm_head',)
            warnings.warn(f'--{flag} is deprecated: pass --qn_args "{name}={value}"', FutureWarning, stacklevel=3)
            if flag == "qn_max_loss_increase" and math.isinf(value):
                value = None  # the old flag's way to turn the guard off
            if flag == "qn_blocks" and value.isdigit():
                value = int(value)  # a chunk size
            hyper.setdefault(name, value)
        self.qn_args = hyper
        if self.qn_optimizer is not None:
            optimizer_config(self.qn_optimizer, hyper)  # a bad name or value fails here, naming it
        else:  # no optimizer chosen yet (a recipe compares several): each checks the entries it takes, together
            parts = {name: qn_args_for(name, hyper) for name in ("kbfgs", "mlbfgs")}
            unknown = sorted(set(hyper).difference(*parts.values()))
            if unknown:
                raise ValueError(f"Invalid qn_args: {', '.join(map(repr, unknown))} names a field of none of "
                                 "KBFGSConfig, LayerPolicy and MLBFGSConfig (or a preset neither optimizer has)")
            for name, part in parts.items():
                optimizer_config(name, part)


def _optimizer_defaults(name: str | None, preset: str | None = None) -> tuple[float | None, float]:
    """(lr, weight decay) the optimizer ``name`` uses when nobody sets them (those of ``preset`` if given; lr None:
    K-BFGS's, which follows the model); the Trainer's for None."""
    if name in ("kbfgs", "kbfgs_l"):
        cfg = KBFGSConfig.from_kwargs(preset=preset)
        return cfg.lr, cfg.l2
    if name == "mlbfgs":
        mcfg = MLBFGSConfig.from_kwargs(preset=preset)
        return mcfg.lr, mcfg.weight_decay
    return 5e-5, 0.0


def parse_qn_args(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """``qn_args`` as a dict: ``None``, a dict, a JSON object, or ``name=value,name=value`` (values read as
    Python literals where they are one: ``0.2``, ``None``, ``True``, ``(0.9, 0.99)``; otherwise strings)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = value.strip()
    if text.startswith("{"):
        parsed = json.loads(text)
        if not isinstance(parsed, dict):
            raise ValueError(f"Invalid qn_args: {value!r} (a JSON object or 'name=value,...')")
        return parsed
    out: dict[str, Any] = {}
    for item in re.split(r",(?![^()\[\]]*[)\]])", text) if text else []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"Invalid qn_args item {item!r} in {value!r} (expected name=value)")
        try:
            out[name.strip()] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[name.strip()] = raw.strip()
    return out


def qn_args_for(name: str, hyper: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``hyper`` that optimizer ``name`` takes: the fields of its configuration, and ``preset``
    where that configuration has such a preset. One ``qn_args`` can then serve every optimizer a recipe compares
    (``lr`` or ``history_size`` go to each optimizer that has them, ``preset=paper`` to K-BFGS only)."""
    config = _config_class(name)
    own = {f.name for f in dataclasses.fields(config)}
    if config is KBFGSConfig:
        own |= {f.name for f in dataclasses.fields(LayerPolicy)}
    return {k: v for k, v in hyper.items()
            if k in own or (k == "preset" and isinstance(v, str) and v in config.PRESETS)}


def _config_class(name: str) -> type[KBFGSConfig] | type[MLBFGSConfig]:
    if name in ("kbfgs", "kbfgs_l"):
        return KBFGSConfig
    if name == "mlbfgs":
        return MLBFGSConfig
    raise ValueError(f"Invalid qn_optimizer: {name!r} (must be one of {QN_OPTIMIZERS})")


def optimizer_config(name: str, hyper: dict[str, Any]) -> tuple[KBFGSConfig | MLBFGSConfig, LayerPolicy | None]:
    """The validated configuration of optimizer ``name`` with the options ``hyper``, and for K-BFGS the layer
    policy that the options naming ``LayerPolicy`` fields give (None for mL-BFGS, which has none)."""
    config = _config_class(name)
    policy = None
    try:
        if config is KBFGSConfig:
            fields, hyper = LayerPolicy.split_kwargs(hyper)
            policy = LayerPolicy(**fields)
        if name == "kbfgs_l":
            hyper = {"history_size": KBFGSL.DEFAULT_HISTORY_SIZE, **hyper}
        return config.from_kwargs(**hyper), policy
    except (TypeError, ValueError) as e:
        raise ValueError(f"Invalid qn_args for {name}: {e}") from e


def build_optimizer(
    name: str, model: nn.Module, args: QNTrainingArguments, no_decay: set[str] | None = None
) -> torch.optim.Optimizer:
    """Build the hf_qn optimizer ``name`` for ``model`` from ``args`` (honouring a no-decay name set):
    ``learning_rate`` and ``weight_decay`` from the Trainer's arguments, everything else from ``qn_args``."""
    no_decay = no_decay or set()
    hyper = parse_qn_args(args.qn_args)
    if name in ("kbfgs", "kbfgs_l"):
        # learning_rate None: K-BFGS's default lr, which KBFGS resolves for the model
        cfg, policy = optimizer_config(name, {"lr": args.learning_rate, "l2": args.weight_decay, **hyper})
        cls = KBFGSL if name == "kbfgs_l" else KBFGS
        return cls(model, no_decay=sorted(no_decay), policy=policy, config=cfg)  # type: ignore[arg-type]
    if name == "mlbfgs":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = []
        for decay in (True, False):
            sel = [(n, p) for n, p in named if (n not in no_decay) == decay]
            if sel:
                groups.append({
                    "params": [p for _, p in sel],
                    "param_names": [n for n, _ in sel],
                    "weight_decay": args.weight_decay if decay else 0.0,
                })
        cfg, _ = optimizer_config(name, {"lr": args.learning_rate, "weight_decay": args.weight_decay, **hyper})
        return MLBFGS(groups, config=cfg)  # type: ignore[arg-type]
    raise ValueError(f"Invalid qn_optimizer: {name!r} (must be one of {QN_OPTIMIZERS})")


def coverage_line(optimizer: Any) -> str:
    """One line on what the optimizer preconditions: K-BFGS's adapted share of the trainable parameters, why the
    rest goes to the fallback, and the frozen share (a LoRA model's base); mL-BFGS's blocks."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, KBFGS):
        asg = inner.assignment
        layers = sum(1 for a in asg.adapters if any(p.requires_grad for p in a.parameters()))
        n_ad, n_fb = asg.trainable_numels()
        n_all = sum(p.numel() for p in asg.adapted_parameters() + asg.fallback_parameters())
        reasons: dict[str, int] = {}
        for f in asg.fallback:
            if f.param.requires_grad:
                why = f.reason.split(" (")[0]
                reasons[why] = reasons.get(why, 0) + f.param.numel()
        total = max(n_ad + n_fb, 1)
        why = "; ".join(f"{100 * n / total:.1f}% {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
        frozen = n_all - n_ad - n_fb
        return (f"{type(inner).__name__} preconditions {layers} layers, {100 * n_ad / total:.1f}% of the "
                f"trainable parameters; its {inner.config.fallback} fallback (lr {inner.config.fallback_lr_value:g}) "
                f"takes {100 * n_fb / total:.1f}%" + (f" ({why})" if why else "")
                + (f"; {100 * frozen / max(n_all, 1):.1f}% of all parameters are frozen (trained if unfrozen)"
                   if frozen else ""))
    if isinstance(inner, MLBFGS):
        n = sum(b.numel for b in inner.blocks)
        return f"MLBFGS preconditions all {n} parameters in {len(inner.blocks)} blocks"
    return f"{type(inner).__name__}: not an hf_qn optimizer"


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
        self._refuse_unsupported_sharding(name)
        opt_model = self.model if model is None else model
        assert opt_model is not None
        decay = set(self.get_decay_parameter_names(opt_model))
        no_decay = {n for n, p in opt_model.named_parameters() if n not in decay}
        self.optimizer = build_optimizer(name, opt_model, self.args, no_decay)  # type: ignore[arg-type]
        self._wire(self.optimizer)
        logger.info("%s", coverage_line(self.optimizer))
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            logger.warning(
                "max_grad_norm=%s clips the raw gradient before the %s step: mL-BFGS's curvature pairs then see "
                "clipped gradients; K-BFGS's pairs do not (they come from pre-activation statistics). "
                "Set max_grad_norm=0 to disable.",
                self.args.max_grad_norm,
                name,
            )
        return self.optimizer

    def _refuse_unsupported_sharding(self, name: str) -> None:
        """DeepSpeed, and FSDP other than FSDP2, each with the reason and what works."""
        if self.is_deepspeed_enabled:
            raise ValueError(
                f"qn_optimizer={name!r} does not support DeepSpeed: ZeRO hands the optimizer flat partitions of the "
                "parameters, which have no layer shape for the curvature. Use DDP (torchrun / accelerate launch "
                "--multi_gpu) or FSDP2 (--fsdp full_shard with fsdp_config fsdp_version: 2)."
            )
        if not self.is_fsdp_enabled:
            return
        version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
        if version != 2:
            raise ValueError(
                f"qn_optimizer={name!r} does not support FSDP version {version}, which flattens the parameters into "
                "FlatParameters without layer shapes; set fsdp_config fsdp_version: 2 (FSDP2, per-parameter "
                "sharding)."
            )

    def _wire(self, opt: Any) -> None:
        """Give a K-BFGS optimizer (however it was built) its closure provider and the loss scaler."""
        inner = unwrap_optimizer(opt)
        if isinstance(inner, KBFGS):
            inner.closure_provider = self._second_pass_closure
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None:
                inner.set_grad_scaler(scaler)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's, except for mL-BFGS with its state split under DDP (``shard_state=True``): the Trainer
        saves ``optimizer.state_dict()`` from rank 0 alone, which would hold rank 0's pieces only, so every rank
        gathers the whole state (:meth:`~hf_qn.MLBFGS.full_state_dict`, a collective) and rank 0 saves it where the
        Trainer expects it; on resume each rank loads that file and keeps its own pieces."""
        inner = unwrap_optimizer(self.optimizer)
        if not (isinstance(inner, MLBFGS) and inner.state_split_over_ranks and not self.is_fsdp_enabled):
            super()._save_optimizer_and_scheduler(output_dir)
            return
        import os

        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        whole = inner.full_state_dict()
        if self.args.should_save:
            torch.save(whole, os.path.join(output_dir, OPTIMIZER_NAME))
            if self.lr_scheduler is not None:
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

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
        """The Trainer's log, with the optimizer's ``qn/*`` statistics on every line that carries the training
        loss: counts since the previous such line (``qn_log_statistics="interval"``), since the start
        (``"total"``), or none (``"off"``); K-BFGS's factor norms too with ``qn_log_factor_norms``."""
        inner = unwrap_optimizer(self.optimizer) if self.optimizer is not None else None
        mode = getattr(self.args, "qn_log_statistics", "interval")
        if "loss" in logs and isinstance(inner, (KBFGS, MLBFGS)) and mode != "off":
            norms = bool(getattr(self.args, "qn_log_factor_norms", False))
            stats = inner.statistics(factor_norms=norms) if isinstance(inner, KBFGS) else inner.statistics()
            if mode == "interval":
                last = self.__dict__.setdefault("_qn_last_counts", {})
                counts = {k: v for k, v in stats.items() if k in inner.COUNTERS}
                stats.update({k: v - last.get(k, 0.0) for k, v in counts.items()})
                last.update(counts)
            logs = {**logs, **stats}
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
        hp = dataclasses.asdict(inner.config)
        desc = f"hf_qn.{type(inner).__name__} with " + ", ".join(f"{k}={v}" for k, v in sorted(hp.items()))
        if isinstance(inner, KBFGS):
            desc += f"; fallback for {len(inner.assignment.fallback)} non-adapted parameters"
        new, n = re.subn(r"^- optimizer: .*$", f"- optimizer: {desc}", text, count=1, flags=re.MULTILINE)
        if n == 0:
            new = text + f"\n\n## Optimizer\n\n{desc}\n"
        with open(path, "w") as f:
            f.write(new)
