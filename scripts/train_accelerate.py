#!/usr/bin/env python
"""hf_qn in a plain Accelerate loop; runs unchanged on one process, or on two with

    torchrun --nproc_per_node 2 scripts/train_accelerate.py --optimizer mlbfgs
    accelerate launch --multi_gpu --num_processes 2 scripts/train_accelerate.py --optimizer kbfgs

(on a CPU-only machine both give 2 ranks on gloo; `accelerate launch --cpu --num_processes 2` gives one).
An MLP classifies scikit-learn's real 8x8 digits. Each step draws one *global* batch and each rank takes
its contiguous share, so runs on 1 and 2 processes see the same data. At the end the script checks that
every replica holds bitwise-identical parameters and writes ``results.json`` on rank 0 (losses, parameter
checksum, the per-rank count of L-BFGS products for mL-BFGS). ``--save_state_at`` / ``--resume_from``
exercise ``accelerator.save_state`` / ``load_state``. ``--fsdp2 true`` shards the model with accelerate's FSDP
plugin (``fsdp_version=2``; accelerate enables FSDP on GPU machines, e.g.
``accelerate launch --num_processes 2 scripts/train_accelerate.py --fsdp2 true``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_qn.distributed import shutdown

logger = logging.getLogger("train_accelerate")


@dataclass
class Arguments:
    optimizer: str = field(default="mlbfgs", metadata={"help": "kbfgs | kbfgs_l | kbfgs_kfac | mlbfgs | adamw"})
    steps: int = field(default=20)
    global_batch: int = field(default=64)
    lr: float | None = field(default=None)
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    seed: int = field(default=0)
    output_dir: str = field(default="outputs/train_accelerate")
    save_state_at: int = field(default=0, metadata={"help": "save accelerator state after this step (0: never)"})
    resume_from: str | None = field(default=None, metadata={"help": "a directory written by --save_state_at"})
    fsdp2: bool = field(default=False, metadata={
        "help": "shard the model with FSDP2 (accelerate's FSDP plugin, fsdp_version 2; accelerate enables it on "
                "GPU machines)"})


def build(args: Arguments):
    import hf_qn

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.LayerNorm(32), nn.Linear(32, 10))
    lr = args.lr
    if args.optimizer == "kbfgs":
        opt = hf_qn.KBFGS(model, preset="paper", lr=lr or 0.2)
    elif args.optimizer == "kbfgs_kfac":  # K-FAC's output factor: the output gradients' Gram is all-reduced too
        opt = hf_qn.KBFGS(model, preset="paper", lr=lr or 0.2, output_side="kfac")
    elif args.optimizer == "kbfgs_l":
        opt = hf_qn.KBFGSL(model, preset="paper", lr=lr or 0.2, history_size=10)
    elif args.optimizer == "mlbfgs":
        opt = hf_qn.MLBFGS(model, lr=lr or 1e-3, update_interval=2, history_size=4)
    elif args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr or 3e-3, fused=True)
    else:
        raise ValueError(f"Invalid --optimizer {args.optimizer!r}")
    return model, opt


def main(argv: list[str] | None = None) -> None:
    from accelerate import Accelerator
    from sklearn.datasets import load_digits
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(args=argv)
    torch.set_num_threads(1)
    plugin = None
    if args.fsdp2:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.global_batch % (world * args.grad_accum):
        raise ValueError("--global_batch must be divisible by num_processes * grad_accum")

    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    Y = torch.tensor(digits.target)
    model, opt = build(args)
    model, opt = accelerator.prepare(model, opt)
    if args.resume_from:
        accelerator.load_state(args.resume_from)
    start = int(args.resume_from.rstrip("/").rsplit("-", 1)[-1]) if args.resume_from else 0
    ce = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed + 1)
    for _ in range(start):  # same data order after a resume
        torch.randperm(len(X), generator=gen)
    losses = []
    local = args.global_batch // world
    micro = local // args.grad_accum
    for step in range(start, args.steps):
        idx = torch.randperm(len(X), generator=gen)[: args.global_batch]
        mine = idx[rank * local : (rank + 1) * local]
        parts = [mine[i * micro : (i + 1) * micro] for i in range(args.grad_accum)]

        def pass_over(parts=parts):
            total = 0.0
            for j, part in enumerate(parts):
                ctx = accelerator.no_sync(model) if j < len(parts) - 1 else contextlib.nullcontext()
                with ctx:
                    loss = ce(model(X[part]), Y[part]) / len(parts)
                    accelerator.backward(loss)
                total += float(loss.detach())
            return total

        opt.zero_grad()
        loss = pass_over()
        if args.optimizer.startswith("kbfgs"):
            opt.step(pass_over)  # the closure reaches KBFGS through AcceleratedOptimizer
        else:
            opt.step()
        losses.append(accelerator.reduce(torch.tensor(loss), "mean").item())
        if args.save_state_at and step + 1 == args.save_state_at:
            accelerator.save_state(os.path.join(args.output_dir, f"state-{step + 1}"))

    # Replicas must be bitwise equal: compare every rank's flat parameters with rank 0's (FSDP2: gathered whole).
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in accelerator.unwrap_model(model).parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    gathered = accelerator.gather(flat.unsqueeze(0))
    replicas_equal = bool((gathered == gathered[0]).all())
    inner = opt.optimizer
    work = torch.tensor([float(getattr(inner, "work_counter", 0))])
    work_per_rank = accelerator.gather(work).tolist()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        out = {"world_size": world, "losses": losses, "replicas_equal": replicas_equal,
               "fsdp": accelerator.distributed_type == "FSDP",
               "params": flat.tolist(), "work_per_rank": work_per_rank,
               "statistics": inner.statistics() if hasattr(inner, "statistics") else {}}
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(out, f)
        logger.info("world %d: final loss %.4f, replicas equal: %s", world, losses[-1], replicas_equal)
    # Drop the DDP wrapper before the group goes (see hf_qn.distributed.shutdown for why).
    accelerator.free_memory()
    model = opt = inner = None  # the closure above refers to model: rebind rather than del
    shutdown()


if __name__ == "__main__":
    main()
