"""Launched by tests/test_sharded_state.py: ``scripts/train_accelerate.py --fsdp2 true`` on gloo ranks.

accelerate enables its FSDP plugin only for GPU-type runs (on a CPU it would silently train DDP): this wrapper
marks the CPU run as one before the script builds its Accelerator, so that the script takes accelerate's FSDP2
path (fully_shard, the optimizer's parameters swapped for the DTensors, torch.distributed.checkpoint in
``save_state`` / ``load_state``) unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import train_accelerate  # noqa: E402
from accelerate.state import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

if __name__ == "__main__":
    PartialState(cpu=True)
    if PartialState().num_processes > 1:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    train_accelerate.main(sys.argv[1:])
