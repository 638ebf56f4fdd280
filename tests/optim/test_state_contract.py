"""The state contract of both optimizers: weights_only, dtypes, counters, exact lockstep resume."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import hf_qn
from hf_qn.optim.state import iter_tensors
from tests._helpers.models import mlp
from tests._helpers.training import OPTIMIZERS, flat_state, loop, mse_loss, regression_batches, roundtrip


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
        ref_state, state2 = flat_state(ref_opt, p_ref), flat_state(o2, p2)
        assert ref_state.keys() == state2.keys()
        for k, v in ref_state.items():
            assert torch.equal(v, state2[k]), k
    ref_global, global2 = dict(iter_tensors(ref_opt.state_dict()["hf_qn"])), dict(iter_tensors(sd["hf_qn"]))
    assert ref_global.keys() == global2.keys() and ref_opt.statistics() == o2.statistics()


def test_kbfgs_converts_the_oldest_flat_checkpoints_first_stats_flag():
    """Flat-layout state written before ``input_warm_start`` had ``first_stats`` (bool) where later flat
    layouts have ``input_batches``: the converter makes it a count of 1, and the run continues exactly."""
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
    flat = {"param_groups": sd["param_groups"], "state": {}}  # the flat layout, as the oldest code wrote it
    g = sd["hf_qn"]
    for pid, st in sd["state"].items():
        flat["state"][pid] = {
            "A": st["input"]["A"], "H_a": st["input"]["H_a"], "H_g": st["output"]["H_g"],
            "momentum_buffer": st["momentum_buffer"], **st["pair"], **st["counters"],
            "first_stats": torch.tensor(True), "qn_step": g["schedule"]["step"],
            "steps_skipped_nonfinite": g["steps_skipped_nonfinite"], "steps_rejected": g["loss_guard"]["steps_rejected"],
            "loss_checks": g["loss_guard"]["loss_checks"], "steps_clipped": g["growth_guard"]["steps_clipped"],
            "loss_avg": g["loss_guard"]["loss_avg"], "step_backoff": g["backoff"]["factor"],
        }
    o1.load_state_dict(flat)
    assert all(int(la.state["input"]["batches"]) == 1 for la in o1.layers)
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
    keys = set()
    for p in model.parameters():
        loaded = flat_state(opt2, p)
        for k, v in flat_state(opt, p).items():
            assert loaded[k].dtype == v.dtype, k
            assert torch.equal(loaded[k], v), k
        keys |= set(loaded)
    curv = {"kbfgs": {"output/H_g", "input/A", "input/H_a"}, "kbfgsl": {"output/S", "input/A"},
            "mlbfgs": {"block/history/S"}}[name]
    assert curv <= keys
    for p in model.parameters():
        for k, v in flat_state(opt2, p).items():
            if k in curv:
                assert v.dtype == torch.float32, k


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_counters_are_tensors_and_empty_state_round_trips(name):
    model = mlp()
    opt = OPTIMIZERS[name](model)
    opt.load_state_dict(opt.state_dict())  # Accelerate does this at prepare time, with empty state
    loop(model, opt, regression_batches(3), mse_loss)
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert torch.is_tensor(v) or isinstance(v, dict), f"{k} is {type(v)}"
    assert all(torch.is_tensor(v) for st in opt.state.values() for _, v in iter_tensors(st))
    stats = opt.statistics()
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("kwargs,vectors", [({"normalize": "adam"}, 7),
                                            ({"normalize": "adam", "direction_rms": False}, 6),
                                            ({"normalize": "unit"}, 5)])
def test_mlbfgs_state_bytes_per_parameter(kwargs, vectors):
    """(2m + 7) x 4 bytes per parameter in float32 with the defaults: Adam grafting keeps one second-moment
    vector and ``direction_rms`` another (2m + 6 without the latter, 2m + 5 without grafting); bf16 history
    halves the 2m part; besides that only O(m²) per block (the float64 m x m products s_iᵀy_j, y_iᵀy_j and scalar
    counters)."""
    m = 10
    for dtype, hist_bytes in ((torch.float32, 4), (torch.bfloat16, 2)):
        model = torch.nn.Linear(200, 100)
        opt = hf_qn.MLBFGS(model, history_size=m, history_dtype=dtype, blocks="model", **kwargs)
        loop(model, opt, regression_batches(2, d_in=200, d_out=100), mse_loss)
        n = sum(p.numel() for p in model.parameters())
        per_block = 2 * m * m * 8 + 5 * 8 + 1  # two m x m float64 matrices, 5 int64 counters, 1 bool
        assert opt.state_bytes() == (2 * m * hist_bytes + vectors * 4) * n + per_block
        assert opt.state_bytes() - per_block <= (2 * m + 7) * 4 * n


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
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1)
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
    kb = pickle.loads(pickle.dumps(hf_qn.KBFGS(model, preset="paper")))
    names = [kb.assignment.param_names[id(p)] for p in kb.assignment.adapted_parameters()]
    assert names == [n for n, _ in model.named_parameters()]
