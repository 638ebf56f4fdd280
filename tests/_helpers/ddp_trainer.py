"""Launched by tests/test_distributed.py: QNTrainer on 1 or 2 processes, same global batch; writes JSON."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[3])
from hf_qn.distributed import shutdown
from hf_qn.integrations.trainer import QNTrainer, QNTrainingArguments
from tests.integrations.test_trainer import RegressionModel, regression_dataset


def main() -> None:
    name, out = sys.argv[1], sys.argv[2]
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    torch.manual_seed(0)
    model = RegressionModel()
    args = QNTrainingArguments(output_dir=out, qn_optimizer=name, learning_rate=0.2 if name == "kbfgs" else 0.05,
                               per_device_train_batch_size=int(sys.argv[4]), max_steps=6, logging_steps=1, save_strategy="no",
                               report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
                               lr_scheduler_type="constant", dataloader_num_workers=0, data_seed=0,
                               # float32 products: bf16's rounding depends on how the batch is split over ranks
                               qn_args={"matmul_dtype": "float32"} if name.startswith("kbfgs") else None)
    trainer = QNTrainer(model=model, args=args, train_dataset=regression_dataset())
    trainer.train()
    world = trainer.args.world_size
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    if world > 1:
        dist.all_gather(gathered, flat)
    else:
        gathered = [flat]
    if trainer.is_world_process_zero():
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
        with open(f"{out}/results.json", "w") as f:
            json.dump({"world_size": world, "replicas_equal": all(torch.equal(g, gathered[0]) for g in gathered),
                       "losses": losses, "params": flat.tolist()}, f)
    trainer.accelerator.free_memory()
    del trainer
    shutdown()


if __name__ == "__main__":
    main()
