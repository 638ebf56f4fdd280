#!/usr/bin/env python
"""Optimizer state per rank, extra communication and step time of mL-BFGS and K-BFGS under FSDP2, against AdamW.

Every optimizer trains the same GPT-2 (built from a config, same seed, tied embeddings), sharded with FSDP2
``fully_shard`` (per transformer block, then the root) over all ranks, on the same random token batches. Run it
on one process and on several, then merge:

    python scripts/benchmark_sharded.py --output_dir /tmp/sharded                                  # 1 rank
    torchrun --nproc_per_node 2 scripts/benchmark_sharded.py --output_dir /tmp/sharded             # 2 ranks
    python scripts/benchmark_sharded.py --output_dir /tmp/sharded --report true                   # table, plot

Measured, per rank:

* **state bytes**: the optimizer's state tensors held by the rank (its local pieces of DTensors);
* **bytes sent per step**, split into FSDP2's own collectives (all-gathers of parameters, reduce-scatters of
  gradients: during forward and backward) and the optimizer's (during ``step``; K-BFGS's statistics
  all-reduce and gradient all-gathers, mL-BFGS's products), each counted as a ring
  algorithm sends it: ``(N−1)/N`` of an all-gather's output or a reduce-scatter's input, twice that for an
  all-reduce;
* **step time** (forward, backward, step): all optimizers take turns step by step in one process, so machine
  load hits them alike; the timed steps are cut into ``--rounds`` blocks, each optimizer's median step in a
  block is divided by AdamW's in the same block, and the table gives the median of these ratios and their
  range.

Timing only: the tokens are random, so the losses mean nothing.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import HfArgumentParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf_qn

logger = logging.getLogger("benchmark_sharded")

SIZES = {"tiny": (32, 1, 2), "small": (128, 4, 4), "large": (256, 6, 8)}  # n_embd, n_layer, n_head
OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True),
    "mlbfgs": lambda m: hf_qn.MLBFGS(m, lr=1e-3),
    "mlbfgs_bf16": lambda m: hf_qn.MLBFGS(m, lr=1e-3, history_dtype="bfloat16"),
    "kbfgs": lambda m: hf_qn.KBFGS(m, lr=1e-3),
}


@dataclass
class ShardedBenchArguments:
    output_dir: str = field(metadata={"help": "Where results-{N}ranks.json go (and, with --report, the table)."})
    size: str = field(default="small", metadata={"help": f"GPT-2 size: {', '.join(SIZES)}."})
    vocab_size: int = 4096
    seq: int = 128
    batch: int = field(default=8, metadata={"help": "Sequences per rank and step."})
    warmup: int = field(default=45, metadata={"help": "Untimed steps first: past mL-BFGS's first pair (step 40)."})
    steps: int = field(default=30, metadata={"help": "Timed steps per optimizer."})
    rounds: int = field(default=3, metadata={"help": "Blocks of steps for the spread of the step-time ratio."})
    report: bool = field(default=False, metadata={"help": "Merge the results-*.json into results.md and a plot."})


class ByteCounter:
    """Bytes each rank sends in collectives, by phase, counted as a ring algorithm sends them."""

    def __init__(self, world: int) -> None:
        self.world, self.phase, self.sent = world, "model", {"model": 0, "optimizer": 0}
        self._originals: dict[str, Any] = {}

    def _count(self, nbytes: float) -> None:
        self.sent[self.phase] += int(nbytes * (self.world - 1) / self.world)

    def install(self) -> None:
        def wrap(name: str, size_of):
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(*args, **kwargs):
                self._count(size_of(*args, **kwargs))
                return original(*args, **kwargs)

            setattr(dist, name, counted)

        def nbytes(t: Any) -> int:
            return sum(nbytes(x) for x in t) if isinstance(t, list) else t.numel() * t.element_size()

        def arg(i: int, *names: str):  # positional argument i, or the keyword that names it
            return lambda *a, **k: nbytes(a[i] if len(a) > i else next(k[n] for n in names if n in k))

        wrap("all_gather_single", arg(0, "output_tensor", "output"))
        wrap("reduce_scatter_single", arg(1, "input", "input_tensor"))
        wrap("all_gather_into_tensor", arg(0, "output_tensor"))
        wrap("reduce_scatter_tensor", arg(1, "input"))
        wrap("all_gather", arg(0, "tensor_list"))
        all_reduce = arg(0, "tensor")
        wrap("all_reduce", lambda *a, **k: 2 * all_reduce(*a, **k))


def local_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors on this rank (a DTensor counts its local piece)."""

    def walk(v: Any) -> int:
        if hasattr(v, "to_local"):
            v = v.to_local()
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        if isinstance(v, dict):
            return sum(walk(x) for x in v.values())
        return 0

    return sum(walk(st) for st in opt.state.values())


def build(args: ShardedBenchArguments, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2Config, GPT2LMHeadModel

    n_embd, n_layer, n_head = SIZES[args.size]
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=args.vocab_size, n_positions=args.seq, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def measure(args: ShardedBenchArguments) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    if "RANK" not in os.environ:  # one process: a group of one, so that fully_shard runs as on several
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("gloo", rank=0, world_size=1)
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = ByteCounter(world)
    counter.install()
    mesh = init_device_mesh("cpu", (world,))
    runs = {}
    for name, make in OPTIMIZERS.items():
        model = build(args, mesh)
        runs[name] = (model, make(model))
    g = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, args.vocab_size, (args.batch, args.seq), generator=g) for _ in range(4)]

    def step(name: str, i: int) -> float:
        model, opt = runs[name]
        x = data[i % len(data)]
        t0 = time.perf_counter()
        counter.phase = "model"
        opt.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        counter.phase = "optimizer"
        opt.step()
        counter.phase = "model"
        return time.perf_counter() - t0

    for i in range(args.warmup):
        for name in runs:
            step(name, i)
    times: dict[str, list[float]] = {name: [] for name in runs}
    sent: dict[str, dict[str, float]] = {}
    for i in range(args.steps):
        for name in runs:  # interleaved: the same load for all
            before = dict(counter.sent)
            times[name].append(step(name, args.warmup + i))
            if i == args.steps - 1:
                sent[name] = {k: counter.sent[k] - before[k] for k in before}
    per_round = max(args.steps // args.rounds, 1)
    out: dict[str, Any] = {"world_size": world, "size": args.size, "rank": rank, "optimizers": {}}
    for name, (model, opt) in runs.items():
        ratios = [statistics.median(times[name][r * per_round:(r + 1) * per_round])
                  / statistics.median(times["adamw"][r * per_round:(r + 1) * per_round]) for r in range(args.rounds)]
        out["optimizers"][name] = {
            "state_bytes": local_bytes(opt),
            "param_bytes": sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4 for p in model.parameters()),
            "median_step_s": statistics.median(times[name]),
            "step_ratio": statistics.median(ratios),
            "step_ratio_range": [min(ratios), max(ratios)],
            "model_bytes_sent": sent[name]["model"],
            "optimizer_bytes_sent": sent[name]["optimizer"],
        }
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, out)
    if rank == 0:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(args.output_dir) / f"results-{world}ranks.json"
        path.write_text(json.dumps({"world_size": world, "size": args.size, "ranks": everyone}, indent=1))
        logger.info("wrote %s", path)
    for name in list(runs):
        del runs[name]
    hf_qn.distributed.shutdown()
    return out


def report(args: ShardedBenchArguments) -> str:
    """results.md (a table per rank count) and state_bytes.png from the results-*.json in ``output_dir``."""
    files = sorted(Path(args.output_dir).glob("results-*ranks.json"))
    if not files:
        raise SystemExit(f"no results-*ranks.json in {args.output_dir}: run the measurement first")
    results = [json.loads(f.read_text()) for f in files]
    lines = ["| ranks | optimizer | state / rank (MB) | params / rank (MB) | FSDP2 sent / step (MB) | "
             "optimizer sent / step (MB) | step vs AdamW (range) |", "|---|---|---|---|---|---|---|"]
    mb = 1 / 2**20
    for res in results:
        for name in OPTIMIZERS:
            rows = [r["optimizers"][name] for r in res["ranks"]]
            state = max(r["state_bytes"] for r in rows) * mb
            params = max(r["param_bytes"] for r in rows) * mb
            lo, hi = rows[0]["step_ratio_range"]
            lines.append(f"| {res['world_size']} | {name} | {state:.2f} | {params:.2f} | "
                         f"{rows[0]['model_bytes_sent'] * mb:.2f} | {rows[0]['optimizer_bytes_sent'] * mb:.3f} | "
                         f"{rows[0]['step_ratio']:.2f} ({lo:.2f}-{hi:.2f}) |")
    table = "\n".join(lines)
    (Path(args.output_dir) / "results.md").write_text(
        f"GPT-2 {results[0]['size']} under FSDP2 (gloo, CPU); the largest rank's state and parameters.\n\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(results)
    for k, res in enumerate(results):
        vals = [max(r["optimizers"][n]["state_bytes"] for r in res["ranks"]) * mb for n in OPTIMIZERS]
        ax.bar([i + k * width for i in range(len(OPTIMIZERS))], vals, width, label=f"{res['world_size']} rank(s)")
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(OPTIMIZERS))], list(OPTIMIZERS))
    ax.set_ylabel("optimizer state per rank (MB)")
    ax.set_title(f"GPT-2 {results[0]['size']} under FSDP2")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(args.output_dir) / "state_bytes.png", dpi=120)
    return table


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    (args,) = HfArgumentParser(ShardedBenchArguments).parse_args_into_dataclasses()
    if args.size not in SIZES:
        raise SystemExit(f"Invalid --size {args.size!r}: one of {', '.join(SIZES)}")
    if args.report:
        print(report(args))
    else:
        measure(args)


if __name__ == "__main__":
    main()
