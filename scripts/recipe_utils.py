"""What the fine-tuning recipes share: run several optimizers through ``QNTrainer`` on the same task with
the same budget, time the training alone, and write results JSON, a comparison plot and a model card. With
several seeds the optimizers take turns seed by seed, so that machine load hits the runs whose times are
compared alike.

Each recipe parses ``RecipeArguments`` plus its own model/data dataclasses and ``QNTrainingArguments`` with
``HfArgumentParser``, builds the data and a ``model_init``, and calls :func:`run_comparison`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from muon_with_adamw import MuonFactory, MuonWithAdamW
from transformers import TrainerCallback

from hf_qn.distributed import shutdown
from hf_qn.integrations.model_card import code_description, hardware_description, write_benchmark_card
from hf_qn.integrations.trainer import (
    _LEGACY_FLAGS,
    QNTrainer,
    QNTrainingArguments,
    parse_qn_args,
    qn_args_for,
    unwrap_optimizer,
)

logger = logging.getLogger("hf_qn.recipes")

OPTIMIZER_CHOICES = ("kbfgs", "kbfgs_l", "mlbfgs", "adamw", "muon", "sgd")
QN_OPTIMIZERS = ("kbfgs", "kbfgs_l", "mlbfgs")
DEFAULT_OPTIMIZERS = ["adamw", "kbfgs", "mlbfgs"]


def split_optimizer(name: str) -> tuple[str, dict[str, Any]]:
    """An optimizer of the comparison: a name of ``OPTIMIZER_CHOICES``, or a quasi-Newton one with its own
    hyperparameters, ``"kbfgs:output_side=kfac"`` (name, colon, ``qn_args`` syntax), which runs as a row of its
    own beside plain ``kbfgs``. Returns the base name and those hyperparameters (they override ``--qn_args``)."""
    base, sep, extra = name.partition(":")
    if base not in OPTIMIZER_CHOICES:
        raise ValueError(f"Invalid optimizer {name!r}: choose from {OPTIMIZER_CHOICES}, or a variant such as "
                         "kbfgs:output_side=kfac")
    if not sep:
        return base, {}
    if base not in QN_OPTIMIZERS:
        raise ValueError(f"Invalid optimizer {name!r}: only {QN_OPTIMIZERS} take hyperparameters after a colon")
    hyper = parse_qn_args(extra)
    unknown = sorted(set(hyper) - set(qn_args_for(base, hyper)))
    if not hyper or unknown:
        raise ValueError(f"Invalid optimizer {name!r}: after the colon give {base}'s hyperparameters as "
                         f"name=value,... ({'unknown: ' + ', '.join(unknown) if unknown else 'none given'})")
    return base, hyper


def lora_model_init(model_init: Callable[[], torch.nn.Module], recipe: RecipeArguments, task_type: str | None,
                    modules_to_save: list[str] | None = None) -> Callable[[], torch.nn.Module]:
    """``model_init`` itself for a full fine-tune (``--lora_r 0``); else a ``model_init`` that wraps each fresh
    model in peft's LoRA adapters (``get_peft_model``). ``task_type`` is peft's (``"SEQ_CLS"`` also trains the
    classifier head); ``modules_to_save`` names modules trained whole beside the adapters (a new head, where the
    task type does not imply one). The configuration is built here, so that a bad one or a missing peft stops the
    recipe before any training."""
    if recipe.lora_r == 0:
        return model_init
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise ImportError("--lora_r needs peft: pip install peft (in hf_qn's bench and dev extras)") from err
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=recipe.lora_target_modules, task_type=task_type,
                        modules_to_save=modules_to_save)

    def init() -> torch.nn.Module:
        return get_peft_model(model_init(), copy.deepcopy(config))  # peft fills the config in: one per model

    return init


def llama_config(vocab_size: int, n_embd: int, n_layer: int, n_head: int, n_positions: int, token_id: int = 0) -> Any:
    """A ``LlamaConfig`` of GPT-2's width, depth and heads: RMSNorm, rotary positions, a SwiGLU MLP of width
    ``8/3 · n_embd`` rounded up to a multiple of 32 (about the parameters of GPT-2's 4x MLP), separate q/k/v
    projections, no biases, an untied LM head."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=-(-8 * n_embd // 96) * 32,
                       num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
                       max_position_embeddings=n_positions, tie_word_embeddings=False, attention_dropout=0.0,
                       bos_token_id=token_id, eos_token_id=token_id, pad_token_id=None)


def check_push_possible(recipe: RecipeArguments, training_args: QNTrainingArguments) -> None:
    """Fail before any training when the requested upload cannot happen (no repository named, offline, or
    not logged in), instead of after all of it."""
    if not recipe.push_card_to_hub:
        return
    if not training_args.hub_model_id:
        raise ValueError("--push_card_to_hub needs --hub_model_id (the repository to upload to)")
    from huggingface_hub import HfApi

    try:
        HfApi().whoami()
    except Exception as err:  # offline mode, no token, no network: all stop the upload
        raise RuntimeError(
            f"--push_card_to_hub: the Hub cannot be reached or you are not logged in ({type(err).__name__}: "
            f"{err}); log in with `huggingface-cli login` and unset HF_HUB_OFFLINE, or drop --push_card_to_hub"
        ) from err


def comparison_plan(recipe: RecipeArguments, training_args: QNTrainingArguments,
                    default_lrs: dict[str, float]) -> tuple[list[str], dict[str, float]]:
    """Which optimizers, at which learning rates: --learning_rates entries, then --learning_rate (when given,
    for every optimizer), then the recipe's defaults."""
    names = recipe.optimizers or ([training_args.qn_optimizer] if training_args.qn_optimizer else DEFAULT_OPTIMIZERS)
    bases = {name: split_optimizer(name)[0] for name in names}  # raises on a bad name
    if len(bases) != len(names):
        raise ValueError(f"Invalid --optimizers {names}: each optimizer (or variant) once")
    # Muon's default lr is AdamW's (its match_rms_adamw scaling puts it on AdamW's scale); a variant starts from its
    # base optimizer's default lr
    default_lrs = {"muon": default_lrs["adamw"], **default_lrs}
    base = {**{name: default_lrs[b] for name, b in bases.items()}, **default_lrs}
    if getattr(training_args, "learning_rate_given", False):
        base.update(dict.fromkeys(names, training_args.learning_rate))
    return names, parse_learning_rates(recipe.learning_rates, base)


@dataclass
class RecipeArguments:
    """Which optimizers to compare and how (the Trainer's own options are in QNTrainingArguments)."""

    optimizers: list[str] | None = field(
        default=None,
        metadata={"help": f"Optimizers to train with, one after another, in {OPTIMIZER_CHOICES}; a quasi-Newton "
                  "one may carry its own hyperparameters after a colon and run beside the plain one, e.g. "
                  "kbfgs kbfgs:output_side=kfac (default: --qn_optimizer alone when it is given, else adamw kbfgs "
                  "mlbfgs)."},
    )
    learning_rates: list[str] = field(
        default_factory=list,
        metadata={"help": "Overrides as name=value, e.g. adamw=5e-5 kbfgs=0.1 (else the recipe's defaults)."},
    )
    lr_sweep: list[str] = field(
        default_factory=list,
        metadata={"help": "Learning-rate sweeps as name=v1,v2,..., e.g. adamw=1e-4,3e-4,1e-3: every candidate "
                          "trains with the full budget and the best final eval metric is reported."},
    )
    lr_sweep_extend: int = field(
        default=2,
        metadata={"help": "When a sweep's best lr is at an end of its grid, train one more candidate a factor of 3 "
                          "beyond that end, up to this many times per optimizer, so that the lr kept is an interior "
                          "optimum (the card says when it is still at an end); 0 keeps the grid as given."},
    )
    smoke: bool = field(default=False, metadata={"help": "A few steps on tiny sizes (used by the tests)."})
    card_title: str | None = field(default=None)
    push_card_to_hub: bool = field(
        default=False,
        metadata={"help": "Upload the card, the best run's model and its tokenizer to --hub_model_id (checked "
                  "before any training)."},
    )
    repeats: int = field(
        default=1,
        metadata={"help": "Runs of each optimizer at its chosen lr (seeds seed, seed+1, ...): with 2 or more, the "
                  "time-to-AdamW verdict is given only when it exceeds the run-to-run spread."},
    )
    sweep_seeds: int = field(
        default=1,
        metadata={"help": "Seeds (seed, seed+1, ...) each --lr_sweep candidate trains with; the lr with the best "
                  "mean final metric is kept, and its runs count among --repeats. On a short fine-tune or a small "
                  "test set one seed picks the lr by luck."},
    )

    lora_r: int = field(
        default=0,
        metadata={"help": "LoRA rank: above 0, every run trains peft LoRA adapters of this rank on "
                          "--lora_target_modules (and the recipe's new head), the rest of the model frozen; 0: a "
                          "full fine-tune."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA's scale numerator (the update is alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapters' input."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Names of the modules that get adapters (peft's target_modules); default: peft's choice "
                          "for the architecture (BERT and ViT: query, value)."},
    )

    def __post_init__(self) -> None:
        for name, lo in (("repeats", 1), ("sweep_seeds", 1), ("lr_sweep_extend", 0), ("lora_r", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"Invalid --{name}: {value!r} (must be an integer >= {lo})")


def _named_values(items: list[str], flag: str, single: bool) -> dict[str, list[float]]:
    """Parse ``name=v1,v2,...`` entries of ``flag`` (one value each when ``single``)."""
    expected = "name=value" if single else "name=v1,v2,..."
    out: dict[str, list[float]] = {}
    for item in items:
        name, sep, values = item.rpartition("=")  # the last "=": a variant's name has its own (kbfgs:output_side=kfac)
        try:
            grid = [float(v) for v in values.split(",") if v]
            split_optimizer(name)
        except ValueError:
            grid = []
        if not sep or not grid or (single and len(grid) != 1):
            raise ValueError(f"Invalid {flag} entry {item!r} (expected {expected} with name in {OPTIMIZER_CHOICES} "
                             "or a variant such as kbfgs:output_side=kfac)")
        out[name] = grid
    return out


def parse_learning_rates(items: list[str], defaults: dict[str, float]) -> dict[str, float]:
    out = dict(defaults)
    out.update({name: grid[0] for name, grid in _named_values(items, "--learning_rates", single=True).items()})
    return out


def parse_lr_sweep(items: list[str]) -> dict[str, list[float]]:
    return _named_values(items, "--lr_sweep", single=False)


def lr_beyond_best_end(mean_ranks: dict[float, float]) -> float | None:
    """The next candidate of a sweep whose best lr (lowest mean rank; ``inf`` for a run that diverged) is at an
    end of its grid: a factor of 3 beyond that end, rounded to two significant digits; None when the best is
    interior or the grid has a single point. When every candidate diverged, the next one is below the grid."""
    if not mean_ranks:
        return None
    lrs = sorted(mean_ranks)
    return lr_beyond(min(lrs, key=lambda lr: mean_ranks[lr]), lrs)  # all diverged: min keeps the lowest lr


def lr_beyond(best: float, lrs: list[float]) -> float | None:
    """A factor of 3 beyond ``best`` (rounded to two significant digits) when it is an end of the sorted ``lrs``
    tried; None when it is interior or ``lrs`` is a single point."""
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    return float(f"{best / 3 if best == lrs[0] else best * 3:.2g}")


def sync_cuda() -> None:
    """Wait for queued GPU work, so that host clocks measure it (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def resolved_output_side(optimizer: Any) -> str | None:
    """K-BFGS's output factor as its ``output_side="auto"`` resolved it for the model; None for other optimizers."""
    return getattr(getattr(optimizer, "config", None), "output_side", None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer.state_dict()["state"]`` (what a checkpoint holds)."""

    def walk(v: Any) -> int:
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return sum(walk(x) for x in v)
        return 0

    return walk(optimizer.state_dict()["state"])


class TrainTimeCallback(TrainerCallback):
    """Training wall time (evaluation excluded) at every step and at every evaluation.

    On a GPU the clock is read after ``torch.cuda.synchronize()``, so a step's time includes its kernels and
    not only their launch (without it, an optimizer that never waits on the GPU would look free).
    """

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self._t0: float | None = None
        self.evals: list[dict[str, float]] = []
        self.step_seconds: list[float] = []

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        sync_cuda()
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._t0 is not None:
            sync_cuda()
            dt = time.perf_counter() - self._t0
            self.step_seconds.append(dt)
            self.train_seconds += dt
            self._t0 = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if metrics:
            self.evals.append({"step": state.global_step, "seconds": self.train_seconds, **metrics})


#: the Trainer's AdamW for the AdamW rows: torch's fused kernel, the Trainer's own default (several times faster on a
#: CPU than ``adamw_torch``'s multi-tensor passes; docs/benchmarks.md)
ADAMW_OPTIM = "adamw_torch_fused"


def optimizer_args(base: QNTrainingArguments, name: str, lr: float, output_dir: str) -> QNTrainingArguments:
    """The TrainingArguments for one optimizer of the comparison."""
    changes: dict[str, Any] = dict(output_dir=output_dir, learning_rate=lr)
    optimizer, own = split_optimizer(name)
    # qn_args serves every optimizer compared (each takes the entries it has); a variant's own entries win
    if optimizer in QN_OPTIMIZERS:
        changes.update(qn_optimizer=optimizer,
                       qn_args={**qn_args_for(optimizer, parse_qn_args(base.qn_args)), **own})
    else:  # a Muon row's optimizer comes from muon_route (the optim named here is not used)
        changes.update(qn_optimizer=None, optim="sgd" if optimizer == "sgd" else ADAMW_OPTIM, qn_args={})
    # Re-run the constructor (and its validation) from the init fields rather than mutating in place; the
    # deprecated per-hyperparameter flags are already in qn_args.
    values = {f.name: getattr(base, f.name) for f in fields(base) if f.init and f.name not in _LEGACY_FLAGS}
    values.update(changes)
    return type(base)(**values)


def muon_route(args: QNTrainingArguments) -> tuple[type[MuonFactory], dict[str, Any]]:
    """The Trainer's ``optimizer_cls_and_kwargs`` of a Muon row: Muon on the blocks' matrices and AdamW on the rest
    (:mod:`muon_with_adamw`), at the run's learning rate, weight decay and Adam betas."""
    return MuonFactory, {"lr": args.learning_rate, "weight_decay": args.weight_decay,
                         "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def run_comparison(
    *,
    task_name: str,
    recipe: RecipeArguments,
    training_args: QNTrainingArguments,
    model_init: Callable[[], torch.nn.Module],
    train_dataset: Any,
    eval_dataset: Any,
    compute_metrics: Callable[[Any], dict[str, float]] | None,
    metric_name: str,
    greater_is_better: bool,
    default_lrs: dict[str, float],
    data_collator: Any = None,
    dataset_id: tuple[str, str] = ("", ""),
    task_id: tuple[str, str] = ("", ""),
    base_model: str | None = None,
    extra_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Train every optimizer of the plan and write results.json, comparison.png, README.md, and the best run's
    model (with ``tokenizer``) beside them, so that the folder is a usable Hub repository."""
    if not training_args.should_log:  # replicas log warnings only (their log_level_replica)
        logger.setLevel(training_args.get_process_log_level())
    check_push_possible(recipe, training_args)
    names, lrs = comparison_plan(recipe, training_args, default_lrs)
    code = code_description()  # the hf_qn this run imported, as it starts
    logger.info("%s", code)
    out_root = training_args.output_dir
    os.makedirs(out_root, exist_ok=True)
    sweeps = parse_lr_sweep(recipe.lr_sweep)
    key = f"eval_{metric_name}"
    best_model: dict[str, Any] = {}

    def rank_key(run: dict[str, Any]) -> float:
        v = float(run["final"][key])
        if not math.isfinite(v):
            return math.inf
        return -v if greater_is_better else v

    def train_one(name: str, lr: float, repeat: int = 0) -> dict[str, Any]:
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + f"-lr{lr:g}" + (f"-repeat{repeat}" if repeat else "")
        args = optimizer_args(training_args, name, lr, os.path.join(out_root, "runs", tag))
        if repeat:
            args.seed = training_args.seed + repeat
        run, model = _train(args, name, lr, model_init, train_dataset, eval_dataset, compute_metrics,
                            data_collator, tokenizer, extra_metrics, key, metric_name,
                            _resume_point(training_args, args.output_dir, len(names)))
        if repeat == 0 and ("run" not in best_model or rank_key(run) < rank_key(best_model["run"])):
            best_model.update(run=run, model=model)
        return run

    def mean_rank(seeds: list[dict[str, Any]]) -> float:
        return sum(rank_key(run) for run in seeds) / len(seeds)

    # The optimizers take turns seed by seed (seed s of every candidate of every optimizer, then seed s + 1), so
    # that a change of machine load during the comparison hits them alike: their training times are compared.
    grids = {name: sweeps.get(name, [lrs[name]]) for name in names}
    sweep_seeds = {name: recipe.sweep_seeds if len(grids[name]) > 1 else 1 for name in names}
    trials: dict[str, dict[float, list[dict[str, Any]]]] = {name: {} for name in names}  # per lr, its seeds' runs

    def run_candidates(todo: dict[str, list[float]]) -> None:
        for r in range(max(sweep_seeds[name] for name in todo)):
            for name, candidates in todo.items():
                if r < sweep_seeds[name]:
                    for lr in candidates:
                        trials[name].setdefault(lr, []).append(train_one(name, lr, r))

    def beyond(name: str) -> float | None:
        return lr_beyond_best_end({lr: mean_rank(t) for lr, t in trials[name].items()})

    run_candidates(grids)
    for _ in range(recipe.lr_sweep_extend):  # a best lr at an end of its grid: one more candidate beyond it
        todo = {name: [lr] for name in names if (lr := beyond(name)) is not None and lr not in trials[name]}
        if not todo:
            break
        run_candidates(todo)
    chosen = {name: min(trials[name].values(), key=mean_rank) for name in names}
    for name in names:
        if beyond(name) is not None:
            logger.warning("%s: the best lr %g is still at an end of its sweep %s", name,
                           chosen[name][0]["learning_rate"], sorted(trials[name]))
    more: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(min(sweep_seeds.values(), default=0), recipe.repeats):  # the chosen lr's further seeds
        for name in names:
            if r >= sweep_seeds[name]:
                more[name].append(_brief(train_one(name, chosen[name][0]["learning_rate"], r)))
    runs = []
    for name in names:
        best = chosen[name][0]
        best["sweep"] = [{"learning_rate": t[0]["learning_rate"], "final": t[0]["final"][key],
                          "final_mean": sum(run["final"][key] for run in t) / len(t), "seeds": len(t),
                          "train_seconds": t[0]["train_seconds"]} for _, t in sorted(trials[name].items())]
        best["repeats"] = [_brief(run) for run in chosen[name][1:]] + more[name]
        runs.append(best)
    summary = summarize(runs, key, greater_is_better)
    is_main = training_args.process_index == 0
    shutdown()  # evaluation metrics are gathered over ranks; rank 0 writes the files
    if not is_main:
        return {"summary": summary, "runs": runs}
    _save_best(best_model, tokenizer, out_root)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    meta = {"task": task_name, "command": command, "metric": key, "greater_is_better": greater_is_better,
            "torch": torch.__version__, "machine": hardware_description(), "code": code,
            "date": time.strftime("%Y-%m-%d"),
            "model_saved_from": best_model["run"]["optimizer"] if best_model else None,
            "model": describe_model(best_model["model"], base_model) if best_model else None}
    with open(os.path.join(out_root, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1, default=str)
    plot_runs(runs, key, os.path.join(out_root, "comparison.png"), task_name)
    table = summary_table(summary, key)
    write_benchmark_card(
        output_dir=out_root,
        title=recipe.card_title or f"hf_qn optimizers on {task_name}",
        command=command,
        dataset=dataset_id,
        task=task_id,
        metric_name=metric_name,
        results=[{"optimizer": r["optimizer"], "value": r["final"][key]} for r in runs],
        hyperparameters={"learning_rates": {r["optimizer"]: r["learning_rate"] for r in runs},
                         "epochs": training_args.num_train_epochs, "max_steps": training_args.max_steps,
                         "batch_size": training_args.per_device_train_batch_size,
                         "weight_decay": training_args.weight_decay, "seed": training_args.seed,
                         "AdamW rows (Trainer optim)": ADAMW_OPTIM,
                         **({"Muon rows": "torch.optim.Muon (adjust_lr_fn match_rms_adamw, momentum 0.95, "
                                          f"Newton-Schulz in {muon[0]['newton_schulz']}) on the blocks' 2-D matrices, "
                                          "fused AdamW on the rest, at one lr"}
                            if (muon := [r for r in runs if r.get("newton_schulz")]) else {}),
                         "K-BFGS rows' output factor": {r["optimizer"]: r["output_side"] for r in runs
                                                        if r.get("output_side")} or "no K-BFGS row",
                         "lr_sweep (best final eval metric kept)": sweeps or "none",
                         "seeds per sweep candidate (best mean kept)": recipe.sweep_seeds,
                         "lr_sweep_extend (candidates beyond a best end)": recipe.lr_sweep_extend,
                         "repeats": recipe.repeats,
                         "trained": (f"LoRA adapters (peft), r={recipe.lora_r}, alpha={recipe.lora_alpha:g}, "
                                     f"dropout={recipe.lora_dropout:g}, on "
                                     f"{recipe.lora_target_modules or 'peft defaults'}"
                                     if recipe.lora_r else "the whole model"),
                         "model": meta["model"],
                         "model in this folder": meta["model_saved_from"]},
        table=table,
        plot="comparison.png",
        notes=summary["verdict"],
        base_model=base_model,
    )
    if recipe.push_card_to_hub:
        from huggingface_hub import HfApi

        HfApi().upload_folder(repo_id=str(training_args.hub_model_id), folder_path=out_root,
                              ignore_patterns=["runs/*"])
    print(table)
    print(summary["verdict"])
    return {"meta": meta, "summary": summary, "runs": runs}


def describe_model(model: torch.nn.Module, base_model: str | None) -> str:
    """What was trained, for the card: the model's class (under a peft wrapper, the base model's), its size and
    where its weights came from."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(p.numel() for p in inner.parameters())
    return f"{type(inner).__name__}, {n / 1e6:.2f}M parameters, " + (
        f"from {base_model}" if base_model else "built from its config")


def _resume_point(training_args: QNTrainingArguments, run_dir: str, n_optimizers: int) -> str | None:
    """``--resume_from_checkpoint``: a path resumes a one-optimizer recipe from it; otherwise (or ``True``) each
    run resumes from the last checkpoint in its own folder, if it has one."""
    resume = training_args.resume_from_checkpoint
    if not resume:
        return None
    if str(resume).lower() not in ("true", "1") and n_optimizers == 1:
        return str(resume)
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    logger.info("resuming %s from %s", run_dir, last or "the start (no checkpoint there)")
    return last


def _train(args: QNTrainingArguments, name: str, lr: float, model_init: Callable[[], torch.nn.Module],
           train_dataset: Any, eval_dataset: Any, compute_metrics: Any, data_collator: Any, tokenizer: Any,
           extra_metrics: Any, key: str, metric_name: str, resume: str | None) -> tuple[dict[str, Any], Any]:
    """One training run; returns its record and the trained model."""
    timer = TrainTimeCallback()
    trainer = QNTrainer(model_init=model_init, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                        compute_metrics=compute_metrics, data_collator=data_collator, callbacks=[timer],
                        processing_class=tokenizer,
                        optimizer_cls_and_kwargs=muon_route(args) if split_optimizer(name)[0] == "muon" else None)
    logger.info("training with %s (lr %g, seed %d)", name, lr, args.seed)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train_out = trainer.train(resume_from_checkpoint=resume)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    final = trainer.evaluate()
    if extra_metrics is not None:
        final.update(extra_metrics(final))
        for e in timer.evals:
            e.update(extra_metrics(e))
    inner = unwrap_optimizer(trainer.optimizer)
    steps = sorted(timer.step_seconds[1:]) or [float("nan")]
    run = {
        "optimizer": name,
        "qn_args": dict(args.qn_args or {}),  # the hyperparameters it ran with beyond the defaults (and lr)
        "learning_rate": lr,
        "seed": args.seed,
        "train_seconds": timer.train_seconds,
        "median_step_seconds": steps[len(steps) // 2],
        "global_step": train_out.global_step,
        "train_loss": train_out.training_loss,
        "final": final,
        "evals": timer.evals,
        "log_history": [h for h in trainer.state.log_history if "eval_loss" not in h],  # evals are above
        "optimizer_statistics": inner.statistics() if hasattr(inner, "statistics") else {},
        "output_side": resolved_output_side(inner),
        "newton_schulz": (("float32" if inner.float32_newton_schulz else "bfloat16")  # Muon's, as the factory chose
                          if isinstance(inner, MuonWithAdamW) else None),
        "optimizer_state_bytes": optimizer_state_bytes(inner),
        "peak_gpu_memory_bytes": peak,  # torch.cuda.max_memory_allocated over training; None on CPU
    }
    logger.info("%s (lr %g): %s = %.4f after %.1f s of training", name, lr, metric_name, final[key],
                timer.train_seconds)
    model = trainer.model
    trainer.accelerator.free_memory()  # drop the DDP wrapper before the next run (and before shutdown)
    del trainer, inner
    return run, model


def _brief(run: dict[str, Any]) -> dict[str, Any]:
    """What a repeat keeps: its seed, time, final metrics and evaluations."""
    return {k: run[k] for k in ("seed", "train_seconds", "final", "evals", "global_step")}


def _save_best(best: dict[str, Any], tokenizer: Any, out_root: str) -> None:
    """The best run's model (and the tokenizer) beside the card: the folder is a usable Hub repository."""
    if not best:
        return
    model = best["model"]
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(out_root)
    else:
        torch.save(model.state_dict(), os.path.join(out_root, "pytorch_model.bin"))
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_root)


def _better(a: float, b: float, greater: bool) -> bool:
    return a >= b if greater else a <= b


def _curve(run: dict[str, Any], key: str) -> list[tuple[float, float]]:
    """A run's evaluations of ``key`` as (training seconds, value)."""
    return [(e["seconds"], e[key]) for e in run["evals"] if key in e]


def seconds_to_reach(curve: list[tuple[float, float]], target: float, greater: bool) -> float | None:
    """The training seconds of the first point of ``curve`` at or beyond ``target`` (None if none is)."""
    return next((t for t, value in curve if _better(value, target, greater)), None)


def summarize(runs: list[dict[str, Any]], key: str, greater: bool) -> dict[str, Any]:
    """Did the best quasi-Newton run reach AdamW's final metric, and in how much training time?"""
    adam = next((r for r in runs if r["optimizer"] == "adamw"), None)
    rows = []
    for r in runs:
        t_reach = None
        if adam is not None:
            target = adam["final"][key]
            t_reach = seconds_to_reach(_curve(r, key), target, greater)
        rows.append({"optimizer": r["optimizer"], "lr": r["learning_rate"], "final": r["final"][key],
                     "swept": [t["learning_rate"] for t in r.get("sweep", [])],
                     "sweep_seeds": max((t.get("seeds", 1) for t in r.get("sweep", [])), default=1),
                     "train_seconds": r["train_seconds"], "median_step_seconds": r["median_step_seconds"],
                     "optimizer_state_bytes": r.get("optimizer_state_bytes"),
                     "peak_gpu_memory_bytes": r.get("peak_gpu_memory_bytes"),
                     "seconds_to_adamw_final": t_reach})
    adam_avg = seed_average(adam, key) if adam is not None else None
    for row, r in zip(rows, runs):
        avg = seed_average(r, key)
        row.update(seeds=avg["seeds"], final_mean=avg["final"], final_min=avg["final_min"],
                   final_max=avg["final_max"], mean_ratio_to_adamw_final=None)
        if adam_avg is not None:
            row["mean_ratio_to_adamw_final"] = seed_averaged_ratio(avg, adam_avg, greater)
    qn = [row for row in rows if split_optimizer(row["optimizer"])[0] in QN_OPTIMIZERS]  # variants too
    verdict = "No quasi-Newton run in this comparison." if adam is not None else "No AdamW run in this comparison."
    if adam is not None and qn:
        adam_row = next(row for row in rows if row["optimizer"] == "adamw")
        reached = [row for row in qn if row["seconds_to_adamw_final"] is not None]
        if reached:
            best = min(reached, key=lambda row: row["seconds_to_adamw_final"])
            ratio = best["seconds_to_adamw_final"] / max(adam_row["train_seconds"], 1e-9)
            best_run = next(r for r in runs if r["optimizer"] == best["optimizer"])
            pace = pace_verdict(time_ratios(best_run, adam, key, greater))
            verdict = (f"{best['optimizer']} reached AdamW's final {key} ({adam_row['final']:.4g}) after "
                       f"{best['seconds_to_adamw_final']:.1f} s of training, {ratio:.2f}x AdamW's "
                       f"{adam_row['train_seconds']:.1f} s ({pace}).")
        else:
            best = max(qn, key=lambda row: row["final"]) if greater else min(qn, key=lambda row: row["final"])
            gap = best["final"] - adam_row["final"]
            verdict = (f"No quasi-Newton run reached AdamW's final {key} ({adam_row['final']:.4g}); the best, "
                       f"{best['optimizer']}, ended at {best['final']:.4g} ({gap:+.4g}).")
        if adam_row["seeds"] > 1:
            verdict += " " + _seed_verdict(qn, adam_row, key, greater)
    muon = next((row for row in rows if row["optimizer"] == "muon"), None)
    if muon is not None and qn:
        verdict += " " + _muon_verdict(qn, muon, key, greater)
    return {"rows": rows, "verdict": verdict}


def _muon_verdict(qn: list[dict[str, Any]], muon: dict[str, Any], key: str, greater: bool) -> str:
    """Muon's mean final against the best quasi-Newton row's: who ends ahead, by how much, and whether the seeds'
    ranges separate them."""
    best = (max if greater else min)(qn, key=lambda row: row["final_mean"])
    ahead = _better(muon["final_mean"], best["final_mean"], greater)
    lead, trail = (muon, best) if ahead else (best, muon)
    apart = (lead["final_min"] > trail["final_max"]) if greater else (lead["final_max"] < trail["final_min"])
    if muon["seeds"] > 1:
        seeds, spread = f"mean of {muon['seeds']} seeds", (", outside both seeds' ranges" if apart
                                                         else ", within the seeds' ranges")
    else:
        seeds, spread = "one seed each", ""
    return (f"Muon's final {key} is {muon['final_mean']:.4g} against {best['optimizer']}'s {best['final_mean']:.4g} "
            f"({seeds}): {lead['optimizer']} ahead by {abs(muon['final_mean'] - best['final_mean']):.4g}{spread}.")


def seed_average(run: dict[str, Any], key: str) -> dict[str, Any]:
    """The run and its repeats (seeds) averaged: the final metric's mean and range, and the mean learning curve
    (evaluation ``i`` of every seed averaged, in metric and in seconds; the evaluations fall at the same step
    fractions in every seed)."""
    seeds = [run, *run.get("repeats", [])]
    finals = [float(r["final"][key]) for r in seeds]
    curves = [_curve(r, key) for r in seeds]
    curve = [(sum(t for t, _ in points) / len(points), sum(v for _, v in points) / len(points))
             for points in zip(*curves)]  # zip stops at the shortest curve
    return {"seeds": len(seeds), "final": sum(finals) / len(finals), "final_min": min(finals),
            "final_max": max(finals), "curve": curve,
            "train_seconds": sum(r["train_seconds"] for r in seeds) / len(seeds)}


def seed_averaged_ratio(avg: dict[str, Any], adam_avg: dict[str, Any], greater: bool) -> float | None:
    """When the seed-averaged curve first reaches AdamW's mean final metric, over AdamW's mean training time
    (None if it never does)."""
    t = seconds_to_reach(avg["curve"], adam_avg["final"], greater)
    return None if t is None else t / max(adam_avg["train_seconds"], 1e-9)


def _seed_verdict(qn: list[dict[str, Any]], adam_row: dict[str, Any], key: str, greater: bool) -> str:
    n, target = adam_row["seeds"], adam_row["final_mean"]
    reached = [row for row in qn if row["mean_ratio_to_adamw_final"] is not None]
    if not reached:
        pick = max if greater else min
        best = pick(qn, key=lambda row: row["final_mean"])
        return (f"Averaged over {n} seeds, no quasi-Newton optimizer reached AdamW's mean final {key} "
                f"({target:.4g}); {best['optimizer']} ended at {best['final_mean']:.4g} on average.")
    best = min(reached, key=lambda row: row["mean_ratio_to_adamw_final"])
    return (f"Averaged over {n} seeds, {best['optimizer']} reached AdamW's mean final {key} ({target:.4g}) in "
            f"{best['mean_ratio_to_adamw_final']:.2f}x AdamW's mean training time.")


def time_ratios(run: dict[str, Any], adam: dict[str, Any], key: str, greater: bool) -> list[float]:
    """Per repeat (the main run first, then ``repeats``, paired by seed order): the run's time to that AdamW
    run's final metric over AdamW's training time (inf where it never got there)."""
    ratios = []
    for mine, theirs in zip([run, *run.get("repeats", [])], [adam, *adam.get("repeats", [])]):
        target = theirs["final"][key]
        t = seconds_to_reach(_curve(mine, key), target, greater)
        ratios.append(math.inf if t is None else t / max(theirs["train_seconds"], 1e-9))
    return ratios


def pace_verdict(ratios: list[float]) -> str:
    """"faster" / "slower" only when every repeat says so, with the spread beside it; one run is no verdict.
    A repeat that never reached AdamW's final (``inf``) counts as slower and is named, not printed as a ratio."""
    if len(ratios) < 2:
        return "one run each: the run-to-run spread is not measured, so no verdict; --repeats 3 measures it"
    reached = [r for r in ratios if math.isfinite(r)]
    if not reached:
        return f"slower: never reached it in {len(ratios)} runs"
    lo, hi = min(reached), max(reached)
    span = f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"
    never = len(ratios) - len(reached)
    spread = (f"{span} in {len(reached)} of {len(ratios)} runs, never in {never}" if never
              else f"{span} over {len(ratios)} runs each")
    if max(ratios) < 1.0:  # a run that never got there (inf) is never faster
        return f"faster: {spread}"
    if lo > 1.0:
        return f"slower: {spread}"
    return f"within noise: {spread}"


def summary_table(summary: dict[str, Any], key: str) -> str:
    """Markdown table of the comparison; a peak GPU memory column appears when the runs were on a GPU."""
    gpu = any(r.get("peak_gpu_memory_bytes") for r in summary["rows"])
    seeds = max((r.get("seeds", 1) for r in summary["rows"]), default=1)
    head = f"| optimizer | lr | final {key} | train s | s/step | s to AdamW's final | state MiB |"
    extra = [" peak GPU GiB |"] if gpu else []
    if seeds > 1:
        extra += [f" mean final over {seeds} seeds (min-max) |", " x AdamW's time to its mean final (seed mean) |"]
    lines = [head + "".join(extra), "|---|---|---|---|---|---|---|" + "---|" * len(extra)]
    for r in summary["rows"]:
        reach = "-" if r["seconds_to_adamw_final"] is None else f"{r['seconds_to_adamw_final']:.1f}"
        swept = r.get("swept") or []
        grid = ", ".join(f"{v:g}" for v in swept)
        chosen_by = f"best mean of {r['sweep_seeds']} seeds among" if r.get("sweep_seeds", 1) > 1 else "best of"
        at_end = len(swept) > 1 and r["lr"] in (min(swept), max(swept))
        lr = f"{r['lr']:g}" + (f" ({chosen_by} {grid}{'; at an end of the grid' if at_end else ''})"
                               if len(swept) > 1 else "")
        state = r.get("optimizer_state_bytes")
        line = (f"| {r['optimizer']} | {lr} | {r['final']:.4f} | {r['train_seconds']:.1f} | "
                f"{r['median_step_seconds']:.3f} | {reach} | {'-' if state is None else f'{state / 2**20:.1f}'} |")
        if gpu:
            peak = r.get("peak_gpu_memory_bytes")
            line += f" {'-' if peak is None else f'{peak / 2**30:.2f}'} |"
        if seeds > 1:
            ratio = r.get("mean_ratio_to_adamw_final")
            n = "" if r.get("seeds", 1) == seeds else f", {r.get('seeds', 1)} seeds"
            line += (f" {r['final_mean']:.4f} ({r['final_min']:.4f}-{r['final_max']:.4f}{n}) |"
                     f" {'never' if ratio is None else f'{ratio:.2f}'} |")
        lines.append(line)
    return "\n".join(lines)


def plot_runs(runs: list[dict[str, Any]], key: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in runs:
        logs = [h for h in r["log_history"] if "loss" in h and "step" in h]
        axes[0].plot([h["step"] for h in logs], [h["loss"] for h in logs], label=r["optimizer"])
        ev = [e for e in r["evals"] if key in e]
        axes[1].plot([e["step"] for e in ev], [e[key] for e in ev], marker="o", label=r["optimizer"])
        axes[2].plot([e["seconds"] for e in ev], [e[key] for e in ev], marker="o", label=r["optimizer"])
    axes[0].set(xlabel="step", ylabel="training loss")
    axes[1].set(xlabel="step", ylabel=key)
    axes[2].set(xlabel="training seconds (evaluation excluded)", ylabel=key)
    values = [e[key] for r in runs for e in r["evals"] if key in e and math.isfinite(e[key])]
    if values and min(values) > 0 and max(values) > 100 * min(values):  # e.g. a perplexity that blew up
        axes[1].set_yscale("log")
        axes[2].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def accuracy_metrics(eval_pred: Any) -> dict[str, float]:
    """Accuracy computed directly (the Hub's metric scripts cannot load offline)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def perplexity(metrics: dict[str, float]) -> dict[str, float]:
    loss = metrics.get("eval_loss")
    return {} if loss is None else {"eval_perplexity": math.exp(min(loss, 50.0))}
