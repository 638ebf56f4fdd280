"""The state layout is a contract (``hf_qn.optim.state``): every key, its nesting and dtype, pinned here.

A change to this file is a change of checkpoint format: bump ``FORMAT`` and extend the converter."""

from __future__ import annotations

import pytest
import torch

import hf_qn
from hf_qn.optim.state import FORMAT, iter_tensors
from tests._helpers.models import mlp
from tests._helpers.training import loop, mse_loss, regression_batches, roundtrip

I64, F32, F64, BOOL = torch.int64, torch.float32, torch.float64, torch.bool
KBFGS_GLOBAL = {
    "schedule/step": I64, "schedule/refresh_next": BOOL, "steps_skipped_nonfinite": I64,
    "growth_guard/ref_step_sizes": F32, "growth_guard/steps_clipped": I64, "loss_guard/loss_checks": I64,
    "loss_guard/steps_rejected": I64, "loss_guard/loss_avg": F64, "backoff/factor": F32,
}
LAYER_COMMON = {
    "input/A": F32, "input/H_a": F32, "input/batches": I64, "momentum_buffer": F32, "pair/s_avg": F32,
    "pair/y_avg": F32, "pair/h_prev": F32, "pair/g_prev": F32, "pair/has_prev": BOOL,
    "counters/pairs_accepted": I64, "counters/pairs_skipped": I64, "counters/powell_damped": I64,
    "counters/lm_damped": I64, "counters/input_updates_skipped": I64,
}
HISTORY = {"S": F32, "Y": F32, "SY": F64, "YY": F64, "count": I64, "head": I64}
DENSE_LAYER = {**LAYER_COMMON, "output/H_g": F32}
LBFGS_LAYER = {**LAYER_COMMON, **{f"output/{k}": v for k, v in HISTORY.items()}}
KFAC_LAYER = {**LAYER_COMMON, "output/G": F32, "output/H_g": F32, "output/batches": I64}
ADAMW = {"step": F32, "exp_avg": F32, "exp_avg_sq": F32}
MLBFGS_PARAM = {k: F32 for k in ("param_avg", "grad_avg", "param_avg_prev", "grad_avg_prev", "momentum_buffer",
                                 "exp_avg_sq", "direction_sq")}
MLBFGS_FIRST = {**MLBFGS_PARAM, **{f"block/history/{k}": v for k, v in HISTORY.items()}, "block/has_prev": BOOL,
                "block/counters/pairs_accepted": I64, "block/counters/pairs_skipped": I64,
                "block/counters/pairs_damped": I64}

# mlp(): Linear 6->8 (ids 0, 1), Linear 8->5 (2, 3), Linear 5->3 (4, 5); state on each layer's weight.
CASES = {
    "kbfgs_dense_cholesky_with_fallback": (
        lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, input_inverse="cholesky", policy=hf_qn.LayerPolicy(exclude=[r"^2$"])),
        {"optimizer": "KBFGS", "output_side": "dense"}, KBFGS_GLOBAL,
        {0: {**DENSE_LAYER, "input/inverse_countdown": I64}, 2: {**DENSE_LAYER, "input/inverse_countdown": I64},
         4: ADAMW, 5: ADAMW},
    ),
    "kbfgs_grafted": (
        lambda m: hf_qn.KBFGS(m, preset="paper", graft="adam"), {"optimizer": "KBFGS", "output_side": "dense"}, KBFGS_GLOBAL,
        {i: {**DENSE_LAYER, "graft/exp_avg_sq": F32, "graft/steps": I64} for i in (0, 2, 4)},
    ),
    "kbfgs_defaults": (
        lambda m: hf_qn.KBFGS(m, matmul_dtype="float32"), {"optimizer": "KBFGS", "output_side": "dense"},
        {k: v for k, v in KBFGS_GLOBAL.items() if k != "loss_guard/loss_avg"},  # no same-batch loss guard
        {i: {**DENSE_LAYER, "graft/exp_avg_sq": F32, "graft/steps": I64, "graft/direction_sq": F32} for i in (0, 2, 4)},
    ),
    "kbfgs_kfac": (
        lambda m: hf_qn.KBFGS(m, output_side="kfac", matmul_dtype="float32"), {"optimizer": "KBFGS", "output_side": "kfac"},
        {k: v for k, v in KBFGS_GLOBAL.items() if k != "loss_guard/loss_avg"},
        {i: {**KFAC_LAYER, "input/inverse_countdown": I64, "graft/exp_avg_sq": F32, "graft/steps": I64,
             "graft/direction_sq": F32} for i in (0, 2, 4)},  # with K-FAC's factor H_a is re-inverted by default
    ),
    "kbfgsl": (
        lambda m: hf_qn.KBFGSL(m, preset="paper", history_size=3), {"optimizer": "KBFGS", "output_side": "lbfgs"}, KBFGS_GLOBAL,
        {0: LBFGS_LAYER, 2: LBFGS_LAYER, 4: LBFGS_LAYER},
    ),
    "mlbfgs": (
        lambda m: hf_qn.MLBFGS(m, update_interval=1, history_size=3), {"optimizer": "MLBFGS"},
        {"step": I64, "steps_skipped_nonfinite": I64},
        {0: MLBFGS_FIRST, 1: MLBFGS_PARAM, 2: MLBFGS_FIRST, 3: MLBFGS_PARAM, 4: MLBFGS_FIRST, 5: MLBFGS_PARAM},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_layout_is_the_documented_one(case):
    make, meta, global_keys, per_param = CASES[case]
    torch.manual_seed(0)
    model = mlp()
    opt = make(model)
    loop(model, opt, regression_batches(3), mse_loss)
    sd = roundtrip(opt.state_dict())  # weights_only=True
    assert set(sd) == {"state", "param_groups", "hf_qn"}
    g = sd["hf_qn"]
    layout = g.pop("layout")
    assert layout == opt._layout() and all(isinstance(u[0], str) for u in layout)
    assert {k: v for k, v in g.items() if not isinstance(v, dict | torch.Tensor)} == {"format": FORMAT, **meta}
    assert {k: v.dtype for k, v in iter_tensors(g)} == global_keys
    assert {pid: {k: v.dtype for k, v in iter_tensors(st)} for pid, st in sd["state"].items()} == per_param
    for _, v in iter_tensors(sd):
        if v.dtype in (I64, BOOL) and v.dim() == 0:
            assert v.device.type == "cpu"


def test_kbfgs_refuses_the_other_output_side_and_another_optimizer():
    torch.manual_seed(0)
    model = mlp()
    dense, lbfgs, ml = hf_qn.KBFGS(model, preset="paper"), hf_qn.KBFGSL(model, preset="paper", history_size=3), hf_qn.MLBFGS(model)
    loop(model, dense, regression_batches(2), mse_loss)
    with pytest.raises(ValueError, match="'dense' output-side factors"):
        lbfgs.load_state_dict(roundtrip(dense.state_dict()))
    with pytest.raises(ValueError, match="written by KBFGS, not by MLBFGS"):
        ml.load_state_dict(roundtrip(dense.state_dict()))
    adamw = torch.optim.AdamW(model.parameters())
    loop(model, adamw, regression_batches(1), mse_loss, closure=False)
    with pytest.raises(ValueError, match="not written by an hf_qn optimizer"):
        dense.load_state_dict(roundtrip(adamw.state_dict()))


def test_a_state_of_another_model_or_block_layout_is_refused_naming_the_unit():
    torch.manual_seed(0)
    small, wide = mlp(), mlp(sizes=(6, 9, 5, 3))
    for make in (lambda m: hf_qn.KBFGS(m, preset="paper"), lambda m: hf_qn.MLBFGS(m)):
        opt = make(small)
        loop(small, opt, regression_batches(2), mse_loss)
        with pytest.raises(ValueError, match="unit \\['0', .*differs.*another model"):
            make(wide).load_state_dict(roundtrip(opt.state_dict()))
    per_param = hf_qn.MLBFGS(small, blocks="param")
    with pytest.raises(ValueError, match="3 units, this optimizer 6|differs"):
        per_param.load_state_dict(roundtrip(hf_qn.MLBFGS(small).state_dict()))


@pytest.mark.parametrize("make", [lambda p: hf_qn.MLBFGS([p]), lambda p: hf_qn.KBFGS(torch.nn.Linear(2, 2).to(p.dtype), preset="paper")])
def test_complex_parameters_are_refused_at_construction(make):
    p = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex parameters.*view_as_real"):
        make(p)


def test_sparse_gradients_are_refused_with_hf_qns_message():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"\['0'\] produce sparse ones.*sparse=False"):
        hf_qn.KBFGS(model, preset="paper")
    opt = hf_qn.MLBFGS(model)
    model(torch.tensor([[1, 2]])).sum().backward()
    with pytest.raises(ValueError, match="dense gradients.*sparse=False"):
        opt.step()


def test_an_incomplete_state_is_refused_naming_the_missing_key():
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGSL(model, preset="paper", history_size=3)
    loop(model, opt, regression_batches(2), mse_loss)
    sd = roundtrip(opt.state_dict())
    first = next(iter(sd["state"].values()))
    del first["output"]["S"]
    with pytest.raises(ValueError, match="layer '0' has no 'output/S'"):
        hf_qn.KBFGSL(model, preset="paper", history_size=3).load_state_dict(sd)


def test_a_two_sided_layers_state_is_refused_by_a_one_sided_layer_and_nothing_changes():
    """A run saved with a layer two-sided (here ``max_dim=8``) loaded where that layer is one-sided (``max_dim=5``,
    its ``d_out`` 6 > 5): refused naming the layer and the fix, and the optimizer continues exactly as an untouched
    twin does; the other way round is refused too."""
    def make(max_dim):
        torch.manual_seed(0)
        model = mlp(sizes=(4, 4, 6))
        return model, hf_qn.KBFGS(model, policy=hf_qn.LayerPolicy(max_dim=max_dim), update_interval=1)

    def batches(n, seed):
        return regression_batches(n, d_in=4, d_out=6, seed=seed)

    (saved_model, saved), (model, opt), (twin_model, twin) = make(8), make(5), make(5)
    assert [la.adapter.one_sided for la in opt.layers] == [False, True]
    loop(saved_model, saved, batches(2, 0), mse_loss)
    for m, o in ((model, opt), (twin_model, twin)):
        loop(m, o, batches(2, 1), mse_loss)
    with pytest.raises(ValueError, match=r"layer '2' holds an output factor.*one-sided.*one_sided_heads=False"):
        opt.load_state_dict(roundtrip(saved.state_dict()))
    more = batches(3, 2)
    assert loop(model, opt, more, mse_loss) == loop(twin_model, twin, more, mse_loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin_model.parameters()))
    # the other way: a one-sided layer's state into an optimizer that gives that layer an output factor
    with pytest.raises(ValueError, match=r"layer '2' holds no output factor.*saved with it one-sided"):
        saved.load_state_dict(roundtrip(opt.state_dict()))


def test_a_no_decay_name_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="Invalid no_decay: \\['0.bais'\\]"):
        hf_qn.KBFGS(mlp(), preset="paper", no_decay=["0.bias", "0.bais"])


@pytest.mark.parametrize("history", [None, 3])
def test_a_layers_declared_state_paths_are_the_ones_it_creates(history):
    from hf_qn.optim.kbfgs_layer import KroneckerLayer
    from hf_qn.optim.output_side import output_side_for

    opt = hf_qn.KBFGS(mlp(), preset="paper", history_size=history)
    layer = KroneckerLayer(opt.adapters[0], output_side_for("0", opt.adapters[0].d_out, history))
    layer.ensure_state()
    assert sorted(layer.state_paths()) == sorted(path for path, _ in iter_tensors(layer.state))
