"""The stages that update many layers at once (one multi-tensor operation, or one product per factor without the
reshapes around it) give each layer the bits of its own unbatched update: on a GPU every tensor operation is a
launch and some microseconds of the host's time, so the curvature step does as few per layer as it can."""

from __future__ import annotations

import math

import torch

import hf_qn
from hf_qn.linalg import finite_flags
from hf_qn.linalg.blocks import BlockSplit, matvec_each, matvec_rows
from hf_qn.optim.kbfgs_layer import update_input_factors
from hf_qn.optim.kbfgs_stats import divide_each
from hf_qn.optim.output_side import accumulate_, rank2_updates
from tests._helpers.dense import random_pair, random_spd
from tests._helpers.models import mlp


def test_matvec_each_is_matvec_rows_of_each_factor():
    g = torch.Generator().manual_seed(0)
    for split in (BlockSplit.of(7, None), BlockSplit.of(10, 4)):  # dense factors, then blocked ones
        Ms = [split.identity(torch.float32) + 0.1 * torch.randn(split.factor_shape, generator=g) for _ in range(3)]
        x = split.rows(torch.randn(3, split.dim, generator=g))
        assert torch.equal(matvec_each(Ms, x), torch.stack([matvec_rows(M, v) for M, v in zip(Ms, x)]))


def test_divide_each_is_each_division():
    g = torch.Generator().manual_seed(1)
    sums = [torch.randn(n, dtype=torch.float64, generator=g) for n in (3, 1, 5)]
    divisors = tuple(torch.tensor([7.0, 3.0, 11.0], dtype=torch.float64).unbind())
    for got, x, d in zip(divide_each(sums, divisors), sums, divisors):
        assert torch.equal(got, x / d)
    mixed = [sums[0], sums[1].float()]  # not one dtype: divided one by one
    assert [t.dtype for t in divide_each(mixed, divisors[:2])] == [torch.float64, torch.float32]


def test_finite_flags_name_each_tensor_that_is_not_finite():
    a, b, c = torch.ones(3, 3), torch.ones(4), torch.ones(2, 2)
    b[1], c[0, 1] = float("nan"), float("inf")
    assert finite_flags([a, b, c]).tolist() == [True, False, False]


def test_rank2_updates_of_dense_factors_are_each_factors_addmm():
    g = torch.Generator().manual_seed(2)
    Hs = [random_spd(4, generator=g).float() for _ in range(3)]
    pairs = [random_pair(4) for _ in Hs]
    s, y = torch.stack([p[0] for p in pairs]).float(), torch.stack([p[1] for p in pairs]).float()
    s[2, 0] = float("nan")
    Hy = torch.stack([H @ yk for H, yk in zip(Hs, y)])
    sy = (s * y).sum(-1)
    new, finite = rank2_updates(Hs, s, y, Hy, sy)
    mixed, _ = rank2_updates([*Hs, torch.eye(4).expand(1, 4, 4)], torch.cat([s, y[:1]]), torch.cat([y, y[:1]]),
                             torch.cat([Hy, y[:1]]), torch.cat([sy, sy[:1]]))  # the general path, one row each
    assert finite.tolist() == [True, True, False]
    for k in range(2):
        assert torch.equal(new[k], mixed[k])


def _layers(rows_seen: int = 2):
    torch.manual_seed(0)
    model = mlp((5, 6, 6, 3))
    opt = hf_qn.KBFGS(model, output_side="kfac", update_interval=1)
    x, t = torch.randn(8, 5), torch.randn(8, 3)
    for _ in range(rows_seen):
        ((model(x) - t) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt.layers


def test_input_factors_take_the_batch_as_each_layers_own_update():
    """Past the plain average: ``A.mul_(β).add_(A_sum, alpha=(1 − β) / rows)`` per layer, layers of different row
    counts alike; a non-finite batch leaves its layer as it was and is counted; a layer still in the plain average
    is averaged and re-inverted."""
    layers = _layers()
    g = torch.Generator().manual_seed(3)
    A_sums = [(r.T @ r) for r in (torch.randn(8, la.adapter.d_in, generator=g) for la in layers)]  # Grams of rows
    a_means = [torch.randn(la.adapter.d_in, generator=g) for la in layers]
    before = [la.state["input"]["A"].clone() for la in layers]
    skipped = int(layers[1].state["counters"]["input_updates_skipped"])
    out = update_input_factors(layers, A_sums, a_means, [8.0, 8.0, 5.0], [True, False, True], 0.9, 0, 0.5)
    assert out[0] is a_means[0] and out[1] is None and out[2] is a_means[2]
    for k, rows in ((0, 8.0), (2, 5.0)):
        assert torch.equal(layers[k].state["input"]["A"], before[k].mul_(0.9).add_(A_sums[k], alpha=0.1 / rows))
    assert torch.equal(layers[1].state["input"]["A"], before[1])
    assert int(layers[1].state["counters"]["input_updates_skipped"]) == skipped + 1

    fresh = _layers(rows_seen=1)  # one batch in A: still averaged plainly with input_warm_start=3
    A0 = fresh[0].state["input"]["A"].clone()
    out = update_input_factors(fresh[:1], A_sums[:1], a_means[:1], [4.0], [True], 0.9, 3, 0.5)
    assert out == [None] and int(fresh[0].state["input"]["batches"]) == 2
    assert torch.equal(fresh[0].state["input"]["A"], A0.mul_(0.5).add_(A_sums[0], alpha=1.0 / (2 * 4.0)))
    H_a = torch.linalg.inv(fresh[0].state["input"]["A"].double() + 0.5 * torch.eye(6, dtype=torch.float64))
    torch.testing.assert_close(fresh[0].state["input"]["H_a"].double(), H_a, rtol=1e-5, atol=1e-6)


def test_kfac_moments_take_the_batch_as_each_sides_own_update():
    """``G ← G_batch`` on a side's first batch, ``G.mul_(β).add_(G_batch, alpha=1 − β)`` after; not taken: as
    it was."""
    layers = _layers()
    sides = [la.output for la in layers]
    g = torch.Generator().manual_seed(4)
    G_batches = [torch.randn(side.state["G"].shape, generator=g) for side in sides]
    sides[2].state["batches"].zero_()  # as if this side had seen no batch yet
    before = [side.state["G"].clone() for side in sides]
    seen = [int(side.state["batches"]) for side in sides]
    accumulate_(sides, G_batches, [True, False, True], seen, 0.95)  # type: ignore[arg-type]
    assert torch.equal(sides[0].state["G"], before[0].mul_(0.95).add_(G_batches[0], alpha=1.0 - 0.95))
    assert torch.equal(sides[1].state["G"], before[1])
    assert torch.equal(sides[2].state["G"], G_batches[2])
    assert [int(side.state["batches"]) for side in sides] == [3, 2, 1]
    assert not math.isnan(float(sides[0].state["G"].sum()))
