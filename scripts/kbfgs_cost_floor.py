#!/usr/bin/env python
"""How fast can a K-BFGS step be on this machine? The step's irreducible work, timed with plain torch, next to
hf_qn's measured step, both as multiples of AdamW's step in the same run.

A K-BFGS step (Goldfarb, Ren & Bahamou 2020) cannot cost less than the work the algorithm itself asks for:

* every step: the forward and backward, the momentum average of each layer's gradient, the direction
  products ``H_g ĝ H_a`` and the parameter update;
* on curvature steps, in addition: the input Grams ``Σ ā āᵀ``, the row sums of pre-activations and their
  gradients (on both passes), the second pass on the same batch (a forward, and a backward that needs only
  activation gradients: no weight-gradient products), and the factor updates (the running average of ``A``
  and one rank-2 BFGS update each of ``H_a`` and ``H_g``, after a matrix-vector product with each).

This script times each of those parts alone, on the paper's autoencoder with real MNIST digits, in the
dtype ``--matmul_dtype`` gives the two large products (the Grams and the directions), adds them up into a
*floor* for curvature every step and for a refresh every ``--update_interval`` steps, and then runs hf_qn's
``KBFGS`` in both modes for ``--steps`` steps, each step followed by an AdamW step (so that both see the same
machine load). ``hf_qn / floor`` is what the implementation adds: Python, dtype conversions, copies, the
damping arithmetic, allocator page faults.

    python scripts/kbfgs_cost_floor.py --output_dir /tmp/floor            # bf16 products, as the benchmark
    python scripts/kbfgs_cost_floor.py --output_dir /tmp/floor --matmul_dtype float32

Timing only: the losses are not reported. Step times on a shared 2-core machine vary by about 10 % between
runs, so compare ratios taken in one run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_autoencoder as ae

import hf_qn
from hf_qn.adapters import LinearAdapter

logger = logging.getLogger("kbfgs_cost_floor")


@dataclass
class FloorArguments:
    """Command-line options (parsed by ``transformers.HfArgumentParser``)."""

    output_dir: str = field(metadata={"help": "Where results.json and table.md go."})
    widths: list[int] = field(
        default_factory=lambda: list(ae.AUTOENCODER_SIZES),
        metadata={"help": "Layer widths of the autoencoder (ReLU between layers, linear code and output)."},
    )
    batch_size: int = field(default=1000, metadata={"help": "Rows per batch (the paper's 1000)."})
    matmul_dtype: str = field(
        default="bfloat16", metadata={"help": "dtype of the Grams and direction products: bfloat16 or float32."}
    )
    update_interval: int = field(default=10, metadata={"help": "The refresh interval of the interval mode."})
    repeats: int = field(default=20, metadata={"help": "Timings per part (the median is kept)."})
    steps: int = field(default=100, metadata={"help": "hf_qn steps timed per mode (and AdamW steps)."})
    skip: int = field(default=3, metadata={"help": "Leading steps or repeats not timed (allocator warm-up)."})
    run_steps: int = field(
        default=400,
        metadata={"help": "Length of the run the ideal-schedule floor is stated for (60 s of the benchmark's "
                          "interval mode is about 400 steps)."},
    )
    threads: int = field(default=2, metadata={"help": "torch.set_num_threads."})
    seed: int = field(default=0)
    smoke: bool = field(default=False, metadata={"help": "Tiny sizes for tests: 200 digits."})


# ------------------------------------------------------------------------------------------- timing helpers
def median_ms(fns: dict[str, Callable[[], Any]], repeats: int, skip: int) -> dict[str, float]:
    """Median wall time in milliseconds of each ``fn()``, over ``repeats`` rounds after ``skip`` untimed ones.
    A round calls every function once, in order, so a drift of the machine's speed (a shared machine's
    neighbours) touches all parts alike instead of whichever part was being timed."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(skip + repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r >= skip:
                times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def layer_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each Linear layer's homogeneous input rows ``[a, 1]`` for the batch ``x``, as K-BFGS's capture
    forms them (:meth:`LinearAdapter.input_rows`)."""
    rows: list[torch.Tensor] = []
    adapters = [LinearAdapter(m) for m in linear_layers(model)]
    hooks = [ad.module.register_forward_hook(lambda _m, inp, _out, ad=ad: rows.append(ad.input_rows(inp)))
             for ad in adapters]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rows


# ------------------------------------------------------------------------------------------- the parts
def time_parts(args: FloorArguments, model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Median milliseconds of every part of the floor (see the module docstring)."""
    dt = getattr(torch, args.matmul_dtype)
    layers = linear_layers(model)
    reps, skip = args.repeats, args.skip

    def loss() -> torch.Tensor:
        return ae.bce_sum(model(x), x)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        loss().backward()

    adamw = torch.optim.AdamW(model.parameters(), lr=1e-12, weight_decay=0.0, fused=True)  # lr ~0: timing only

    # The second pass: forward, then only activation gradients. Freezing the weights of layers with a bias
    # (the bias keeps the output in the graph) skips the weight-gradient products, as hf_qn does.
    def second_pass() -> None:
        for m in layers:
            m.weight.requires_grad_(False)
        try:
            model.zero_grad(set_to_none=True)
            loss().backward()
        finally:
            for m in layers:
                m.weight.requires_grad_(True)

    # In a round the second pass comes first: AdamW's update then sees the full backward's gradients.
    fns: dict[str, Callable[[], Any]] = {
        "second_pass": second_pass, "forward_backward": forward_backward, "adamw_update": adamw.step
    }

    rows = layer_inputs(model, x)
    rows_lp = [r.to(dt) for r in rows]
    fns["input_grams"] = lambda: [r.T @ r for r in rows_lp]

    # Row sums of the outputs and of their gradients on both passes, accumulated in float64 as the capture does
    # (the pairs are differences of these means), and of the inputs.
    outs = [torch.randn(len(x), m.out_features) for m in layers for _ in range(4)]  # h, ∂L/∂h; two passes

    def row_sums() -> list[torch.Tensor]:
        return [o.sum(0, dtype=torch.float64) for o in outs] + [r.sum(0, dtype=torch.float32) for r in rows]

    fns["row_sums"] = row_sums

    # Every step: ĝ ← μ ĝ + (1 − μ) G, D = H_g ĝ H_a in ``dt``, W ← W − α D.
    def spd(n: int) -> torch.Tensor:
        a = torch.randn(n, n) / n**0.5
        return a @ a.T + torch.eye(n)

    H_g = [spd(m.out_features) for m in layers]
    H_a = [spd(m.in_features + 1) for m in layers]
    G = [torch.randn(m.out_features, m.in_features + 1) for m in layers]
    buf = [g.clone() for g in G]
    W = [g.clone() for g in G]
    H_g_dt, H_a_dt = [h.to(dt) for h in H_g], [h.to(dt) for h in H_a]  # factors kept in ``dt``: no conversion

    def directions() -> list[torch.Tensor]:
        return [(hg @ (b.to(dt) @ ha)).float() for hg, b, ha in zip(H_g_dt, buf, H_a_dt)]

    def momentum_and_apply() -> None:
        torch._foreach_mul_(buf, 0.9)
        torch._foreach_add_(buf, G, alpha=0.1)
        torch._foreach_add_(W, buf, alpha=-1e-12)

    fns["directions"] = directions
    fns["momentum_and_apply"] = momentum_and_apply

    # Curvature steps: A ← β A + (1 − β) A_batch, and for H_a and H_g one H y and one rank-2 update each.
    A = [h.clone() for h in H_a]
    A_batch = [h.clone() for h in H_a]

    def factor_updates() -> None:
        torch._foreach_mul_(A, 0.9)
        torch._foreach_add_(A, A_batch, alpha=0.1)
        for H in H_a + H_g:
            y = torch.randn(len(H))
            Hy = H @ y
            U = torch.stack([y, Hy], 1) * 1e-12
            H.addmm_(U, torch.stack([Hy, y], 0))

    fns["factor_updates"] = factor_updates
    return median_ms(fns, reps, skip)


def floors(parts: dict[str, float]) -> dict[str, float]:
    """The floor of a plain step (no curvature) and of a curvature step, in milliseconds."""
    plain = parts["forward_backward"] + parts["directions"] + parts["momentum_and_apply"]
    curvature = plain + parts["second_pass"] + parts["input_grams"] + parts["row_sums"] + parts["factor_updates"]
    return {"adamw": parts["forward_backward"] + parts["adamw_update"], "plain": plain, "curvature": curvature}


def schedule_floor(fl: dict[str, float], curvature_steps: int, steps: int) -> float:
    """Mean floor (ms) of ``steps`` steps of which ``curvature_steps`` update curvature."""
    return (curvature_steps * fl["curvature"] + (steps - curvature_steps) * fl["plain"]) / steps


def ideal_curvature_steps(steps: int, warmup: int, interval: int) -> int:
    """Curvature steps of KBFGS's schedule without growth-guard refreshes: every one of the first ``warmup``
    steps, then steps 0, k, 2k, ... (as ``KBFGS.curvature_step_next``)."""
    return sum(1 for t in range(steps) if t < warmup or t % interval == 0)


# ------------------------------------------------------------------------------------------- hf_qn, measured
def time_steps(args: FloorArguments, interval: int, X: torch.Tensor) -> dict[str, Any]:
    """Time ``args.steps`` steps of hf_qn's ``KBFGS`` (curvature every ``interval`` steps) on consecutive
    batches, after ``args.skip`` untimed ones, each followed by a step of AdamW on its own copy of the model:
    the two see the same machine load, so their ratio holds even when the machine's speed drifts."""
    torch.manual_seed(args.seed)
    model = ae.autoencoder(sizes=args.widths)
    twin = copy.deepcopy(model)
    kbfgs = hf_qn.KBFGS(model, preset="paper", lr=0.2, damping=0.3, l2=0.0, update_interval=interval,
                        matmul_dtype=args.matmul_dtype)
    adamw = torch.optim.AdamW(twin.parameters(), lr=3e-3, weight_decay=0.0, fused=True)
    n_batches = max(1, len(X) // args.batch_size)
    times: dict[str, list[float]] = {"kbfgs": [], "adamw": []}
    curvature = []
    for i in range(args.skip + args.steps):
        x = X[(i % n_batches) * args.batch_size : (i % n_batches + 1) * args.batch_size]
        curv = kbfgs.curvature_step_next()
        t0 = time.perf_counter()
        kbfgs.zero_grad(set_to_none=True)
        ae.bce_sum(model(x), x).backward()
        if curv:

            def closure(x: torch.Tensor = x) -> torch.Tensor:
                out = ae.bce_sum(model(x), x)
                out.backward()
                return out

            kbfgs.step(closure)
        else:
            kbfgs.step()
        t1 = time.perf_counter()
        adamw.zero_grad(set_to_none=True)
        ae.bce_sum(twin(x), x).backward()
        adamw.step()
        t2 = time.perf_counter()
        if i >= args.skip:
            times["kbfgs"].append(t1 - t0)
            times["adamw"].append(t2 - t1)
            curvature.append(bool(curv))
    return {
        "kbfgs_mean_ms": 1e3 * statistics.mean(times["kbfgs"]),
        "kbfgs_median_ms": 1e3 * statistics.median(times["kbfgs"]),
        "adamw_mean_ms": 1e3 * statistics.mean(times["adamw"]),
        "curvature_steps": sum(curvature),
        "steps": len(curvature),
        "curvature": curvature,
    }


# ------------------------------------------------------------------------------------------- report
PART_LABELS = {
    "forward_backward": "forward + backward",
    "adamw_update": "AdamW's update",
    "directions": "directions `H_g ĝ H_a` ({dt})",
    "momentum_and_apply": "momentum average + parameter update",
    "second_pass": "second pass (forward + activation-only backward)",
    "input_grams": "input Grams `Σ ā āᵀ` ({dt})",
    "row_sums": "row sums of `h`, `∂L/∂h` (both passes, float64) and `ā`",
    "factor_updates": "factor updates (`A` average, rank-2 `H_a`, `H_g`)",
}


def render(result: dict[str, Any]) -> str:
    args, parts, fl, runs = result["args"], result["parts_ms"], result["floors_ms"], result["measured"]
    dt = args["matmul_dtype"]
    base = fl["adamw"]
    lines = [
        f"K-BFGS cost floor on the autoencoder {args['widths']}, batch {args['batch_size']}, "
        f"{result['device']}, torch {result['torch']}, products in {dt}.",
        "",
        f"| part (median of {args['repeats']}) | ms | x AdamW step |",
        "|---|---|---|",
    ]
    for key, label in PART_LABELS.items():
        lines.append(f"| {label.format(dt=dt)} | {parts[key]:.1f} | {parts[key] / base:.2f} |")
    lines += [
        "",
        f"AdamW's step is the first two parts: {base:.1f} ms. Floors are sums of parts over that sum; hf_qn's "
        "steps are timed alternately with AdamW steps (means), and `hf_qn / floor` is the ratio of the two "
        "ratios.",
        "",
        "| mode | curvature steps | floor x AdamW | hf_qn mean ms | AdamW mean ms | hf_qn x AdamW | hf_qn / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, key in (("every step", "every_step"), (f"every {args['update_interval']} steps", "interval")):
        r = runs[key]
        floor_x = schedule_floor(fl, r["curvature_steps"], r["steps"]) / base
        measured_x = r["kbfgs_mean_ms"] / r["adamw_mean_ms"]
        lines.append(
            f"| {label} | {r['curvature_steps']} of {r['steps']} | {floor_x:.2f} | {r['kbfgs_mean_ms']:.1f} | "
            f"{r['adamw_mean_ms']:.1f} | {measured_x:.2f} | {measured_x / floor_x:.2f} |"
        )
    ideal = result["ideal_schedule"]
    lines += [
        "",
        f"Floors by kind of step: {fl['plain'] / base:.2f}x AdamW's for a step without curvature, "
        f"{fl['curvature'] / base:.2f}x for a curvature step. A {ideal['steps']}-step run with a refresh every "
        f"{args['update_interval']} steps and no growth-guard refresh has {ideal['curvature_steps']} curvature "
        f"steps ({ideal['warmup']} of warm-up): its mean floor is {ideal['floor_x_adamw']:.2f}x.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(FloorArguments).parse_args_into_dataclasses(args=argv)
    if args.matmul_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"Invalid matmul_dtype: {args.matmul_dtype!r} (must be bfloat16 or float32)")
    for name in ("update_interval", "repeats", "steps", "batch_size", "run_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"Invalid {name}: {getattr(args, name)} (must be >= 1)")
    if len(args.widths) < 2:
        raise ValueError(f"Invalid widths: {args.widths} (need at least an input and an output width)")
    torch.set_num_threads(args.threads)
    os.makedirs(args.output_dir, exist_ok=True)
    X, _ = ae.load_mnist(4000, args.seed, args.smoke)
    if X.shape[1] != args.widths[0] or args.widths[-1] != args.widths[0]:
        raise ValueError(f"Invalid widths: {args.widths} (an autoencoder of {X.shape[1]}-pixel digits starts and "
                         f"ends at {X.shape[1]})")
    torch.manual_seed(args.seed)
    logger.info("timing the parts")
    parts = time_parts(args, ae.autoencoder(sizes=args.widths), X[: args.batch_size])
    fl = floors(parts)
    measured = {}
    for key, interval in (("every_step", 1), ("interval", args.update_interval)):
        logger.info("timing KBFGS(update_interval=%d) against AdamW", interval)
        measured[key] = time_steps(args, interval, X)
    wu = _default_warmup()
    c = ideal_curvature_steps(args.run_steps, wu, args.update_interval)
    result = {
        "args": asdict(args),
        "device": f"CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "parts_ms": parts,
        "floors_ms": fl,
        "measured": measured,
        "ideal_schedule": {
            "steps": args.run_steps,
            "warmup": wu,
            "curvature_steps": c,
            "floor_x_adamw": schedule_floor(fl, c, args.run_steps) / fl["adamw"],
        },
    }
    result["table"] = render(result)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(result["table"] + "\n")
    print(result["table"])
    return result


def _default_warmup() -> int:
    from hf_qn.optim.config import KBFGSConfig

    return KBFGSConfig(output_side="bfgs").warmup_curvature_steps  # the autoencoder learns BFGS's output factor


if __name__ == "__main__":
    main()
