"""Block-diagonal Kronecker factors (``max_block_dim``) in the optimizer: the state they keep, the checkpoints
they accept, and that a bound above every factor changes nothing. Their numbers are proven against a dense
float64 twin in ``test_kbfgs_reference.py``, their linear algebra in ``tests/linalg/test_blocks.py``, and their
resume in ``test_state_contract.py`` (``kbfgs_blocks``)."""

from __future__ import annotations

import math

import pytest
import torch

import hf_qn
from tests._helpers.models import mlp, tiny_gpt2, token_batch
from tests._helpers.training import loop, mse_loss, regression_batches, roundtrip


def _trained(max_block_dim, steps=8, **kw):
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, max_block_dim=max_block_dim, **kw)
    loop(model, opt, regression_batches(steps), mse_loss)
    return model, opt


@pytest.mark.parametrize("kw", [{}, {"preset": "paper", "lr": 0.1}])
def test_a_bound_above_every_factor_changes_no_bit(kw):
    a, _ = _trained(None, **kw)
    b, _ = _trained(10**6, **kw)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_state_holds_the_diagonal_blocks_and_the_layout_names_them():
    """mlp(6, 8, 5, 3): d_in 7, 9, 6 and d_out 8, 5, 3, cut into blocks of at most 3."""
    model, opt = _trained(3)
    expected = {  # layer: (H_g shape, H_a shape)
        "0": ((3, 3, 3), (3, 3, 3)), "2": ((2, 3, 3), (3, 3, 3)), "4": ((3, 3), (2, 3, 3)),
    }
    for la in opt.layers:
        g_shape, a_shape = expected[la.name]
        assert tuple(la.state["output"]["H_g"].shape) == g_shape
        assert tuple(la.state["input"]["H_a"].shape) == a_shape == tuple(la.state["input"]["A"].shape)
    assert opt.state_dict()["hf_qn"]["layout"] == [["0", 8, 7, "blocks", 3, 3], ["2", 5, 9, "blocks", 2, 3],
                                                   ["4", 3, 6, "blocks", 1, 2]]
    stats = opt.statistics()
    assert stats["qn/pairs_accepted"] > 0 and math.isfinite(stats["qn/max_norm_H_g"])
    # the padding of a block never leaks: the last block of layer "0"'s H_g (8 = 3 + 3 + 2) is identity there
    H = opt.state[model[0].weight]["output"]["H_g"]
    assert torch.equal(H[-1, -1], torch.eye(3)[-1]) and torch.equal(H[-1, :, -1], torch.eye(3)[-1])


def test_a_checkpoint_of_another_block_layout_is_refused_naming_max_block_dim():
    model, dense = _trained(None)
    blocked = hf_qn.KBFGS(model, max_block_dim=3)
    with pytest.raises(ValueError, match="another block layout.*max_block_dim"):
        blocked.load_state_dict(roundtrip(dense.state_dict()))


def test_max_block_dim_cannot_change_during_training():
    model, opt = _trained(3, steps=2)
    for g in opt.param_groups:
        g["max_block_dim"] = 4
    with pytest.raises(ValueError, match="max_block_dim changed from 3 to 4"):
        loop(model, opt, regression_batches(1), mse_loss)


def test_gpt2_blocks_its_wide_layers_and_learns():
    """Tiny GPT-2 (Conv1D layers, a tied one-sided head): with blocks of at most 40 the 128-wide MLP layers
    (and their 129-wide inputs) are cut, the 32-wide attention layers are not; the loss falls over 20 steps on
    one batch, as it does with dense factors. Without direction_rms, whose per-entry scaling would hide part of
    the difference between block and dense factors (and on one batch descends like AdamW: 4.59 -> 2.47 in 20
    steps, against 2.04 without it)."""
    losses = {}
    for mbd in (None, 40):
        torch.manual_seed(0)
        model = tiny_gpt2()
        opt = hf_qn.KBFGS(model, max_block_dim=mbd, lr=3e-3, direction_rms=False)
        batch = token_batch()
        out = []
        for _ in range(20):
            opt.zero_grad()
            loss = model(**batch, labels=batch["input_ids"]).loss
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[mbd] = out
        if mbd is not None:
            shapes = {la.name: (tuple(la.state["output"].get("H_g", torch.empty(0)).shape),
                                tuple(la.state["input"]["H_a"].shape)) for la in opt.layers}
            assert shapes["transformer.h.0.mlp.c_fc"] == ((4, 32, 32), (33, 33))
            assert shapes["transformer.h.0.mlp.c_proj"] == ((32, 32), (4, 33, 33))
            assert shapes["transformer.h.0.attn.c_attn"] == ((3, 32, 32), (33, 33))
            assert opt.statistics()["qn/pairs_accepted"] > 0
    assert losses[40][-1] < 0.5 * losses[40][0]
    assert abs(losses[40][-1] - losses[None][-1]) < 0.25 * losses[None][0]


@pytest.mark.parametrize("max_block_dim", [None, 3])
def test_logged_factor_norms_are_the_largest_eigenvalues(max_block_dim):
    """``qn/max_norm_H_g`` / ``_H_a`` (one batched Lanczos call for all factors, exact at these sizes) equal the
    largest eigenvalue over the layers' factors, a block-diagonal factor taken as the dense matrix of its blocks
    without the last block's padding (float64 reference; to 1e-6, as the float32 factors are symmetric only to
    rounding and eigvalsh reads one triangle); a non-finite factor is logged as NaN."""
    model, opt = _trained(max_block_dim)

    def dense(H, split):
        if H.dim() == 2:
            return H
        last = split.size - split.pad
        return torch.block_diag(*H[:-1], H[-1, :last, :last])

    def top(mats):
        return max(float(torch.linalg.eigvalsh(M.double())[-1]) for M in mats)

    stats = opt.statistics()
    assert stats["qn/max_norm_H_g"] == pytest.approx(
        top([dense(la.state["output"]["H_g"], la.output.split) for la in opt.layers]), rel=1e-6)
    assert stats["qn/max_norm_H_a"] == pytest.approx(
        top([dense(la.state["input"]["H_a"], la.input_split) for la in opt.layers]), rel=1e-6)
    opt.layers[1].state["input"]["H_a"].view(-1)[0] = float("nan")
    assert math.isnan(opt.statistics()["qn/max_norm_H_a"])
