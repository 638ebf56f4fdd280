"""FSDP2 (fully_shard) parameters are refused with a clear message, never a silent wrong answer."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import hf_qn


@pytest.fixture
def single_rank_group(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fully_sharded_parameters_are_refused(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    plain = hf_qn.MLBFGS(model)  # built before sharding, as accelerate does
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(NotImplementedError, match="FSDP2"):
        hf_qn.KBFGS(model, preset="paper")
    with pytest.raises(NotImplementedError, match="FSDP2"):
        hf_qn.MLBFGS(model)
    # accelerate swaps the sharded parameters into an existing optimizer's groups: refused at step time
    plain.param_groups[0]["params"] = list(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(NotImplementedError, match="DDP"):
        plain.step()
