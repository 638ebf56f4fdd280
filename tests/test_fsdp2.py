"""FSDP2 (fully_shard) on one rank: both optimizers take the unsharded run's steps (the two-rank checks are in
``test_sharded_state.py``); a model sharded only in part is refused."""

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


def _sharded_mlp():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return model


@pytest.mark.parametrize(("make", "steps"), [
    (lambda m: hf_qn.KBFGS(m), 5),
    (lambda m: hf_qn.MLBFGS(m, history_size=3, update_interval=2, lr=0.05), 7),
], ids=["kbfgs", "mlbfgs"])
def test_on_one_fully_sharded_rank_the_unsharded_steps(single_rank_group, make, steps):
    torch.manual_seed(0)
    plain_model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model = _sharded_mlp()
    plain, sharded = make(plain_model), make(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 4, generator=g)
        for m, opt in ((plain_model, plain), (model, sharded)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(plain_model.parameters(), model.parameters()):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
    assert sharded.statistics()["qn/pairs_accepted"] == plain.statistics()["qn/pairs_accepted"] > 0


def test_mlbfgs_splits_its_state_under_fsdp2_only(single_rank_group):
    model = _sharded_mlp()
    assert hf_qn.MLBFGS(model)._plan.kind == "fsdp2"
    assert not hf_qn.MLBFGS(nn.Linear(3, 2))._plan.sharded
    with pytest.raises(ValueError, match="shard_state"):
        hf_qn.MLBFGS(model, shard_state=False)


@pytest.mark.parametrize("make", [hf_qn.KBFGS, hf_qn.MLBFGS])
def test_sharded_and_plain_parameters_mixed_are_refused(single_rank_group, make):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    fully_shard(model[0], mesh=init_device_mesh("cpu", (1,)))  # the root left plain
    with pytest.raises(NotImplementedError, match="apply fully_shard to the root module"):
        make(model)


def test_chunk_range_splits_as_torch_chunk():
    from hf_qn.distributed.shards import chunk_range

    for n in (0, 1, 2, 5, 7, 64):
        for parts in (1, 2, 3, 8):
            pieces = torch.arange(n).chunk(parts) if n else ()
            got = [chunk_range(n, parts, r) for r in range(parts)]
            assert [hi - lo for lo, hi in got if hi > lo] == [len(c) for c in pieces]
            assert torch.equal(torch.cat([torch.arange(n)[lo:hi] for lo, hi in got]), torch.arange(n))


def test_kbfgs_gradient_accumulation_on_a_fully_sharded_rank(single_rank_group):
    """Two micro-batches per step without no_sync: FSDP2 hands each backward's gradient to the sharded parameter
    and frees the unsharded one, which the capture must not take for the start of a new accumulation window."""
    torch.manual_seed(0)
    plain_model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model = _sharded_mlp()
    plain, sharded = hf_qn.KBFGS(plain_model), hf_qn.KBFGS(model)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        xs = torch.randn(2, 5, 4, generator=g)
        for m, opt in ((plain_model, plain), (model, sharded)):
            opt.zero_grad()
            for x in xs:
                (m(x).square().mean() / 2).backward()
            opt.step()
    for p, q in zip(plain_model.parameters(), model.parameters()):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
