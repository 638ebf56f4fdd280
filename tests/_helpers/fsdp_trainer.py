"""Launched by tests/test_sharded_state.py: QNTrainer with mL-BFGS (or K-BFGS) on a tiny GPT-2 (tied embeddings): on one
plain process (mode ``plain``), on 2 ranks with FSDP2 (``fsdp``: ``--fsdp full_shard`` with ``fsdp_version: 2``)
or with DDP and ``shard_state=True`` (``zero1``), at the same global batch; optionally saving a checkpoint or
resuming from one. Writes the final parameters and the loss log as JSON.

Usage: fsdp_trainer.py OUT_DIR ROOT PER_DEVICE_BATCH MODE [--optimizer mlbfgs|kbfgs]
[--save_at N [--then_resume_into OUT_DIR2]]
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])
from hf_qn.distributed import shutdown
from hf_qn.integrations.trainer import QNTrainer, QNTrainingArguments
from tests._helpers.models import tiny_gpt2

STEPS = 6


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(3)
        self.ids = torch.randint(0, 61, (n, 8), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run(out: str, per_device: int, mode: str, name: str, save_at: int = 0, resume: str | None = None) -> None:
    """One Trainer run; rank 0 writes ``out/results.json``."""
    fsdp = mode == "fsdp"
    # without direction_rms: GPT-2's key bias has a zero gradient, and dividing its entries of the direction (rounding
    # noise, different on two ranks) by their own RMS would lift them far above rounding (tests/_helpers/sharded_worker.py)
    qn_args = "history_size=3,update_interval=2,direction_rms=False" + (",shard_state=True" if mode == "zero1" else "")
    if name == "kbfgs":
        qn_args = ""
    torch.manual_seed(0)
    model = tiny_gpt2(vocab=61, n_embd=16, n_layer=2)
    fsdp_args = {}
    if fsdp:
        fsdp_args = {"fsdp": "full_shard", "fsdp_config": {
            "fsdp_version": 2, "reshard_after_forward": True, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["GPT2Block"], "state_dict_type": "SHARDED_STATE_DICT"}}
    args = QNTrainingArguments(
        output_dir=out, qn_optimizer=name, qn_args=qn_args or None, learning_rate=0.01,
        per_device_train_batch_size=per_device, max_steps=STEPS, logging_steps=1,
        save_strategy="steps" if save_at else "no", save_steps=save_at or 500, report_to="none", use_cpu=True,
        seed=0, disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0,
        data_seed=0, max_grad_norm=0.0, **fsdp_args)
    if fsdp:
        # accelerate enables its FSDP plugin only for GPU-type runs (on a CPU it would silently train DDP): mark
        # this gloo run as one once the arguments have set up the process state, so that it takes accelerate's
        # FSDP2 path (fully_shard, the optimizer's parameters swapped for the DTensors, torch.distributed.checkpoint
        # for the optimizer state)
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        assert args.world_size == 2
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    trainer = QNTrainer(model=model, args=args, train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=resume)
    params = {}
    for n, p in trainer.model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        params[n.replace("_orig_mod.", "")] = full.detach().reshape(-1).tolist()
    inner = trainer.optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    world = dist.get_world_size() if dist.is_initialized() else 1
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
        with open(f"{out}/results.json", "w") as f:
            plan = inner._plan.kind if name == "mlbfgs" else ("fsdp2" if inner._fully_sharded() else "replicated")
            steps = int(inner.counters["step"]) if name == "mlbfgs" else int(inner.schedule.state["step"])
            json.dump({"world_size": world, "losses": losses, "params": params, "plan": plan, "step": steps,
                       "fsdp_enabled": trainer.is_fsdp_enabled}, f)
    trainer.accelerator.free_memory()
    del trainer


def main() -> None:
    out, per_device, mode = sys.argv[1], int(sys.argv[3]), sys.argv[4]
    extra = dict(zip(sys.argv[5::2], sys.argv[6::2]))
    save_at, name = int(extra.get("--save_at", 0)), extra.get("--optimizer", "mlbfgs")
    run(out, per_device, mode, name, save_at)
    if "--then_resume_into" in extra:  # a second Trainer in the same processes, from the saved checkpoint
        run(extra["--then_resume_into"], per_device, mode, name, resume=f"{out}/checkpoint-{save_at}")
    shutdown()


if __name__ == "__main__":
    main()
