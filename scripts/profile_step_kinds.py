#!/usr/bin/env python
"""Where K-BFGS's step time goes, by kind of step: curvature steps and plain steps timed apart, each profiled.

``benchmark_step.py`` gives the median and mean step of each optimizer; this script splits K-BFGS's defaults
(curvature every ``update_interval`` steps after 20 warm-up curvature steps) into its two kinds of step on GPT-2
(random tokens, bf16 autocast where the device has it), and for one step of each kind writes torch.profiler's
operator tables, the counts of tensor operators, kernel launches and host syncs, the time and the number of tensor
operators of the optimizer's own ``step()`` (on 3 and 1 more steps of that kind) and, on CUDA, which lines of
Python made the host wait for the GPU (torch's sync debug mode warns at each). With ``--inverses`` it also times
the damped factor inverse both ways (``torch.cholesky_inverse`` against a triangular solve and one batched
product) on the batched shapes of GPT-2 small's K-FAC output factors.

    python scripts/profile_step_kinds.py --output_dir /tmp/kinds --optimizers adamw kbfgs --inverses   # a GPU
    python scripts/profile_step_kinds.py --output_dir /tmp/kinds --n_embd 64 --n_layer 2 --n_head 4 \
        --vocab_size 512 --batch 2 --seq 32                                                   # a CPU dry run

Outputs in ``--output_dir``: ``summary.json`` and ``profile-NAME.txt`` per optimizer.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_step import StepBenchArguments, build_model
from recipe_utils import sync_cuda

import hf_qn
from hf_qn.linalg import kron

VARIANTS: dict[str, Callable[[torch.nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=next(m.parameters()).is_cuda),
    "kbfgs": lambda m: hf_qn.KBFGS(m, lr=3e-3),  # the defaults
    "kbfgs_fp32": lambda m: hf_qn.KBFGS(m, lr=3e-3, matmul_dtype="float32"),
    "kbfgs_int10": lambda m: hf_qn.KBFGS(m, lr=3e-3, update_interval=10),
    # the curvature step of earlier versions: the Grams on every row, each K-FAC output inverse at every curvature
    # step, the paper's BFGS update of H_a (the defaults on a model built from a config: 512 strided rows, each
    # output inverse every other curvature step, H_a re-inverted by Cholesky every other curvature step)
    "kbfgs_all_rows": lambda m: hf_qn.KBFGS(m, lr=3e-3, max_input_rows=None, output_inverse_interval=1,
                                            input_inverse="bfgs"),
    "kbfgs_rows512": lambda m: hf_qn.KBFGS(m, lr=3e-3, output_inverse_interval=1, input_inverse="bfgs"),
    # the defaults with torch.cholesky_inverse for the damped inverses on CUDA (as before the triangular path)
    "kbfgs_potri": lambda m: hf_qn.KBFGS(m, lr=3e-3),
}


LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")


@dataclass
class ProfileArguments:
    output_dir: str = field(metadata={"help": "Where summary.json and the profiles go."})
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "kbfgs"],
                                  metadata={"help": f"Any of {', '.join(VARIANTS)}."})
    vocab_size: int = 50257
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    seq: int = 512
    batch: int = 16
    warmup: int = field(default=25, metadata={"help": "Untimed steps first (K-BFGS's 20 warm-up curvature steps)."})
    steps: int = field(default=20, metadata={"help": "Timed steps, each counted as curvature or plain."})
    inverses: bool = field(default=False, metadata={"help": "Time the damped inverse both ways (CUDA)."})


def _profile_one(name: str, args: ProfileArguments, device: torch.device) -> tuple[dict[str, Any], str]:
    kron.CUDA_TRIANGULAR_INVERSE = name != "kbfgs_potri"
    # the step benchmark's GPT-2 and random-token batches (seed 0)
    model, make_batch = build_model(StepBenchArguments(
        output_dir=args.output_dir, vocab_size=args.vocab_size, n_embd=args.n_embd, n_layer=args.n_layer,
        n_head=args.n_head, seq=args.seq, batch=args.batch))
    model = model.to(device).train()
    opt = VARIANTS[name](model)
    g = torch.Generator().manual_seed(0)
    batches = [{k: v.to(device) for k, v in make_batch(g).items()} for _ in range(4)]
    autocast = device.type == "cuda"

    def step(i: int, alone: bool = False, mode: Any = None) -> float:
        """One training step; with ``alone``, the seconds of ``opt.step()`` by itself (synchronised before and after),
        run under ``mode`` if given."""
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        if alone:
            sync_cuda()
        t0 = time.perf_counter()
        with mode if mode is not None else contextlib.nullcontext():
            opt.step()
        if alone:
            sync_cuda()
        return time.perf_counter() - t0

    def kind() -> str:  # the step K-BFGS is about to take captures statistics: a curvature step
        capture = getattr(opt, "capture", None)
        return "curvature" if capture is not None and capture.enabled else "plain"

    counter = itertools.count(args.warmup + args.steps)

    def next_of(wanted: str) -> int:
        """Steps on until the next step is of kind ``wanted``; that step's index (not yet taken)."""
        i = next(counter)
        while kind() != wanted:
            step(i)
            i = next(counter)
        sync_cuda()
        return i

    for i in range(args.warmup):
        step(i)
    times: dict[str, list[float]] = {"curvature": [], "plain": []}
    for i in range(args.warmup, args.warmup + args.steps):
        k = kind()
        sync_cuda()
        t0 = time.perf_counter()
        step(i)
        sync_cuda()
        times[k].append(time.perf_counter() - t0)
    every = times["curvature"] + times["plain"]
    out: dict[str, Any] = {
        "optimizer": name, "ms": {k: [round(1e3 * t, 2) for t in v] for k, v in times.items()},
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items() if v},
        "mean_ms": 1e3 * statistics.mean(every),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    text = [f"== {name}: median ms {out['median_ms']}, mean {out['mean_ms']:.1f} ms", str(getattr(opt, "config", ""))]
    for wanted in ("curvature", "plain") if isinstance(opt, hf_qn.KBFGS) else ("plain",):
        i = next_of(wanted)
        with profile(activities=acts) as prof:
            step(i)
            sync_cuda()
        ev = prof.key_averages()
        counts = {
            "aten_ops": sum(e.count for e in ev if e.key.startswith("aten::")),
            "launches": sum(e.count for e in ev if e.key in LAUNCHES),
            "stream_syncs": sum(e.count for e in ev if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")),
            "self_cpu_ms": sum(e.self_cpu_time_total for e in ev) / 1e3,
            "self_cuda_ms": sum(e.self_device_time_total for e in ev) / 1e3 if device.type == "cuda" else None,
        }
        text += [f"\n---- {wanted} step: {counts}",
                 ev.table(sort_by="self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total",
                          row_limit=25),
                 ev.table(sort_by="cpu_time_total", row_limit=25)]
        if device.type == "cuda":
            i = next_of(wanted)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    step(i)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            where = collections.Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught
                                        if "synchroniz" in str(w.message))
            counts["syncs_by_line"] = dict(where.most_common())
            text.append("host syncs by line: " + json.dumps(counts["syncs_by_line"], indent=1))
        alone = [step(next_of(wanted), alone=True) for _ in range(3)]
        ops = CountOperators()
        step(next_of(wanted), alone=True, mode=ops)
        counts["optimizer_step_ms"] = 1e3 * statistics.median(alone)  # the step alone, median of 3
        counts["optimizer_step_ops"] = ops.count  # the tensor operators its step issued, views included
        text.append(f"optimizer.step alone: {counts['optimizer_step_ms']:.2f} ms, {ops.count} operators")
        out[wanted] = counts
    kron.CUDA_TRIANGULAR_INVERSE = True
    return out, "\n".join(text)


class CountOperators(TorchDispatchMode):
    """Counts the tensor operators dispatched while it is active: every operator the host issues, views included
    (on a GPU each costs some microseconds of Python and dispatch; most are also a kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def time_inverses(device: torch.device) -> list[dict[str, Any]]:
    """The damped inverse of batches of K-FAC-like factors (trace-normalised Grams, damping 0.55) both ways:
    mean of 3 calls after one, and the largest relative error against float64."""
    rows = []
    for b, n in ((24, 768), (12, 2304), (12, 3072)):
        x = torch.randn(b, 4 * n, n, device=device)
        A = x.mT @ x / (4 * n)
        A = A / A.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
        ref = torch.linalg.inv(A.double() + 0.55 * torch.eye(n, device=device, dtype=torch.float64))
        for triangular in (False, True):
            kron.CUDA_TRIANGULAR_INVERSE = triangular
            H = kron.damped_cholesky_inverse(A, 0.55, torch.float32)
            sync_cuda()
            t0 = time.perf_counter()
            for _ in range(3):
                H = kron.damped_cholesky_inverse(A, 0.55, torch.float32)
            sync_cuda()
            err = ((H.double() - ref).abs().amax((1, 2)) / ref.abs().amax((1, 2))).max()
            rows.append({"batch": b, "n": n, "path": "triangular" if triangular else "cholesky_inverse",
                         "ms": 1e3 * (time.perf_counter() - t0) / 3, "max_rel_err": float(err)})
            print(json.dumps(rows[-1]), flush=True)
    kron.CUDA_TRIANGULAR_INVERSE = True
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ProfileArguments).parse_args_into_dataclasses(args=argv)
    unknown = [o for o in args.optimizers if o not in VARIANTS]
    if unknown:
        raise ValueError(f"Invalid optimizers {unknown} (choose from {list(VARIANTS)})")
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"args": vars(args), "torch": torch.__version__, "runs": [],
                              "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU"}
    if args.inverses:
        result["inverses"] = time_inverses(device)
    for name in args.optimizers:
        run, text = _profile_one(name, args, device)
        with open(os.path.join(args.output_dir, f"profile-{name}.txt"), "w") as f:
            f.write(text)
        print(json.dumps({k: run.get(k) for k in ("optimizer", "median_ms", "mean_ms", "peak_gib")}), flush=True)
        result["runs"].append(run)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
