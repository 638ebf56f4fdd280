"""The state contract of both optimizers: weights_only, dtypes, counters, exact lockstep resume."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import hf_qn
from tests._helpers.models import mlp
from tests._helpers.training import OPTIMIZERS, loop, mse_loss, regression_batches, roundtrip


def _all_tensors_or_primitives(obj) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _all_tensors_or_primitives(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_all_tensors_or_primitives(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_lockstep_resume_is_bitwise(name):
    """Run 8 steps; separately run 4, save (weights_only), restore into fresh objects, run 4: identical."""
    batches = regression_batches(8)
    torch.manual_seed(0)
    ref_model = mlp()
    init = copy.deepcopy(ref_model.state_dict())
    ref_opt = OPTIMIZERS[name](ref_model)
    loop(ref_model, ref_opt, batches, mse_loss)

    m1 = mlp()
    m1.load_state_dict(init)
    o1 = OPTIMIZERS[name](m1)
    loop(m1, o1, batches[:4], mse_loss)
    sd = roundtrip(o1.state_dict())
    assert _all_tensors_or_primitives(sd)
    msd = roundtrip(m1.state_dict())

    m2 = mlp()
    m2.load_state_dict(msd)
    o2 = OPTIMIZERS[name](m2)
    o2.load_state_dict(sd)
    loop(m2, o2, batches[4:], mse_loss)
    for a, b in zip(ref_model.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for p_ref, p2 in zip(ref_model.parameters(), m2.parameters()):
        for k, v in ref_opt.state[p_ref].items():
            v2 = o2.state[p2][k]
            assert (torch.equal(v, v2) if torch.is_tensor(v) else v == v2), k


def test_kbfgs_loads_a_checkpoint_with_the_old_first_stats_flag():
    """State written before ``input_warm_start`` had ``first_stats`` (bool) where it now has a count."""
    batches = regression_batches(6)
    torch.manual_seed(0)
    ref_model = mlp()
    init = copy.deepcopy(ref_model.state_dict())
    ref_opt = OPTIMIZERS["kbfgs"](ref_model)
    loop(ref_model, ref_opt, batches, mse_loss)
    m1 = mlp()
    m1.load_state_dict(init)
    o1 = OPTIMIZERS["kbfgs"](m1)
    loop(m1, o1, batches[:3], mse_loss)
    sd = roundtrip(o1.state_dict())
    for st in sd["state"].values():
        if "input_batches" in st:
            st["first_stats"] = torch.tensor(bool(st.pop("input_batches")))
    o1.load_state_dict(sd)
    assert all("first_stats" not in st and int(st["input_batches"]) == 1 for st in o1.state.values()
               if "qn_step" in st)
    loop(m1, o1, batches[3:], mse_loss)
    for a, b in zip(ref_model.parameters(), m1.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["kbfgs", "kbfgsl", "mlbfgs"])
def test_curvature_stays_float32_on_bf16_model_after_load(name):
    torch.manual_seed(0)
    model = mlp().to(torch.bfloat16)
    opt = OPTIMIZERS[name](model)
    loop(model, opt, regression_batches(4, dtype=torch.bfloat16), mse_loss)
    sd = roundtrip(opt.state_dict())
    opt2 = OPTIMIZERS[name](model)
    opt2.load_state_dict(sd)
    for p in model.parameters():
        for k, v in opt.state[p].items():
            if torch.is_tensor(v):
                assert opt2.state[p][k].dtype == v.dtype, k
                assert torch.equal(opt2.state[p][k], v), k
    keys = {k for st in opt2.state.values() for k in st}
    curv = {"H_g", "A", "H_a"} if name.startswith("kbfgs") and name != "kbfgsl" else {"hist_S"} if name == "mlbfgs" else {"Hg_S"}
    assert curv <= keys
    for st in opt2.state.values():
        for k in curv & set(st):
            assert st[k].dtype == torch.float32


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_counters_are_tensors_and_empty_state_round_trips(name):
    model = mlp()
    opt = OPTIMIZERS[name](model)
    opt.load_state_dict(opt.state_dict())  # Accelerate does this at prepare time, with empty state
    loop(model, opt, regression_batches(3), mse_loss)
    for st in opt.state.values():
        for k, v in st.items():
            assert torch.is_tensor(v), f"{k} is {type(v)}"
    stats = opt.statistics()
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("normalize,vectors", [("adam", 6), ("unit", 5)])
def test_mlbfgs_state_bytes_per_parameter(normalize, vectors):
    """(2m + 6) x 4 bytes per parameter in float32 with Adam grafting (2m + 5 without: the grafting
    keeps one second-moment vector), bf16 history halves the 2m part; besides that only O(m²) per
    block (the float64 m x m products s_iᵀy_j, y_iᵀy_j and scalar counters)."""
    m = 10
    for dtype, hist_bytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = torch.nn.Linear(200, 100)
        opt = hf_qn.MLBFGS(model, history_size=m, history_dtype=dtype, blocks="model", normalize=normalize)
        loop(model, opt, regression_batches(2, d_in=200, d_out=100), mse_loss)
        n = sum(p.numel() for p in model.parameters())
        per_block = 2 * m * m * 8 + 7 * 8 + 1  # two m x m float64 matrices, 7 int64 counters, 1 bool
        assert opt.state_bytes() == (2 * m * hist_bytes + vectors * 4) * n + per_block
        assert opt.state_bytes() - per_block <= (2 * m + 6) * 4 * n


def _copy(obj, how):
    return copy.deepcopy(obj) if how == "deepcopy" else pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_interval", "mlbfgs"])
def test_copied_model_and_optimizer_train_on_independently(name, how):
    """copy.deepcopy / pickle of (model, optimizer) after 4 steps: the copy, run first, and then the
    original each continue exactly like an uninterrupted 8-step run (no shared hooks or state)."""
    batches = regression_batches(8)
    torch.manual_seed(0)
    ref_model = mlp()
    init = copy.deepcopy(ref_model.state_dict())
    loop(ref_model, OPTIMIZERS[name](ref_model), batches, mse_loss)

    model = mlp()
    model.load_state_dict(init)
    opt = OPTIMIZERS[name](model)
    loop(model, opt, batches[:4], mse_loss)
    model2, opt2 = _copy((model, opt), how)
    assert all(p2 is not p for p2, p in zip(model2.parameters(), model.parameters()))
    loop(model2, opt2, batches[4:], mse_loss)
    loop(model, opt, batches[4:], mse_loss)
    for r, a, b in zip(ref_model.parameters(), model.parameters(), model2.parameters()):
        assert torch.equal(r, a) and torch.equal(r, b)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_model_alone_does_not_feed_the_optimizer(how):
    """A model copied after K-BFGS attached its hooks (an EMA or teacher copy) carries inert hooks:
    training passes through the copy capture nothing into the original optimizer."""
    model = mlp()
    opt = hf_qn.KBFGS(model, lr=0.1)
    copied = _copy(model, how)
    mse_loss(copied, regression_batches(1)[0]).backward()
    assert all(st.forward_calls == 0 and st.grad_calls == 0 for st in opt.capture.stats["primary"])
    mse_loss(model, regression_batches(1)[0]).backward()
    assert all(st.forward_calls == 1 and st.grad_calls == 1 for st in opt.capture.stats["primary"])


def test_copied_optimizer_has_readable_block_map_and_names():
    """Attributes keyed by id(parameter) are re-keyed in a copy."""
    model = mlp()
    opt = hf_qn.MLBFGS(model)
    again = pickle.loads(pickle.dumps(opt))
    assert again.block_map() == opt.block_map()
    again.load_state_dict(opt.state_dict())  # torch's load calls __setstate__ with part of the state
    assert again.block_map() == opt.block_map()
    assert "?" not in again.block_map()
    kb = pickle.loads(pickle.dumps(hf_qn.KBFGS(model)))
    names = [kb.assignment.param_names[id(p)] for p in kb.assignment.adapted_parameters()]
    assert names == [n for n, _ in model.named_parameters()]
