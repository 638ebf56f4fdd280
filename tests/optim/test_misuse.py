"""The cases a user hits outside the happy path: each trains correctly or fails with a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

import hf_qn
from tests._helpers.models import mlp
from tests._helpers.training import flat_state, loop, mse_loss, regression_batches

KBFGS_MODES = {
    "same_batch": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1),
    "consecutive": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, pairs="consecutive"),
    "interval": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, update_interval=3, warmup_curvature_steps=1),
    "lbfgs": lambda m: hf_qn.KBFGSL(m, preset="paper", lr=0.1, history_size=3),
}
ALL = {**KBFGS_MODES, "mlbfgs": lambda m: hf_qn.MLBFGS(m, lr=1e-2, update_interval=2)}


def _state(opt, model):
    return {(i, k): v.clone() for i, p in enumerate(model.parameters()) for k, v in flat_state(opt, p).items()}


@pytest.mark.parametrize("name", list(ALL))
def test_step_without_gradients_moves_nothing(name):
    """``zero_grad(); step()`` with no backward: no parameter and no state moves (torch.optim skips them)."""
    torch.manual_seed(0)
    model = mlp()
    opt = ALL[name](model)
    loop(model, opt, regression_batches(3), mse_loss)
    params, state = [p.detach().clone() for p in model.parameters()], _state(opt, model)
    opt.zero_grad()
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = _state(opt, model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", list(ALL))
def test_a_layer_frozen_mid_run_is_paused_and_resumes(name):
    """Freezing a layer stops its updates and its curvature (state untouched); unfreezing trains it again."""
    torch.manual_seed(0)
    model = mlp()
    opt = ALL[name](model)
    batches = regression_batches(12)
    loop(model, opt, batches[:4], mse_loss)
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    state = {k: v.clone() for p in model[0].parameters() for k, v in flat_state(opt, p).items()}
    others = [p.detach().clone() for p in model[2].parameters()]
    loop(model, opt, batches[4:8], mse_loss)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model[0].parameters()))
    now = {k: v for p in model[0].parameters() for k, v in flat_state(opt, p).items()}
    if name == "consecutive":  # a paused layer's consecutive pairs start over from its next batch
        assert not bool(now.pop("pair/has_prev")) and bool(state.pop("pair/has_prev"))
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())
    assert not all(torch.equal(a, b) for a, b in zip(others, model[2].parameters()))  # the rest trains
    model[0].requires_grad_(True)
    loop(model, opt, batches[8:], mse_loss)
    assert not torch.equal(frozen[0], model[0].weight)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize("name", list(ALL))
def test_a_layer_frozen_at_construction_trains_once_unfrozen(name):
    torch.manual_seed(0)
    model = mlp()
    model[0].requires_grad_(False)
    opt = ALL[name](model)
    loop(model, opt, regression_batches(3), mse_loss)
    w = model[0].weight.detach().clone()
    model[0].requires_grad_(True)
    loop(model, opt, regression_batches(3, seed=1), mse_loss)
    assert not torch.equal(w, model[0].weight)
    if name in KBFGS_MODES:
        assert "input" in opt.state[model[0].weight]  # it has curvature of its own now


@pytest.mark.parametrize("name", list(ALL))
def test_torch_style_closure_gives_loss_and_gradients_in_every_mode(name):
    """``step(closure)`` with no backward before it, as torch.optim documents: the closure is called, its loss
    returned, and the step uses its gradients."""
    torch.manual_seed(0)
    model = mlp()
    opt = ALL[name](model)
    losses = []
    for x, y in regression_batches(1) * 8:  # one batch again and again: its loss must fall

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = mse_loss(model, (x, y))
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["same_batch", "lbfgs", "interval"])
def test_a_closure_that_raises_leaves_parameters_and_state_as_they_were(name):
    """A second pass that raises takes the step back exactly; retrying the step then equals a run in which
    nothing failed."""
    batches = regression_batches(6)
    torch.manual_seed(0)
    ref = mlp()
    model = copy.deepcopy(ref)
    ref_opt, opt = KBFGS_MODES[name](ref), KBFGS_MODES[name](model)
    loop(ref, ref_opt, batches, mse_loss)
    loop(model, opt, batches[:3], mse_loss)
    params, state = [p.detach().clone() for p in model.parameters()], _state(opt, model)
    global_state = copy.deepcopy(opt.state_dict()["hf_qn"])
    x, y = batches[3]
    opt.zero_grad()
    mse_loss(model, (x, y)).backward()

    def failing():
        raise KeyboardInterrupt

    assert opt.curvature_step_next()
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = _state(opt, model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    from hf_qn.optim.state import iter_tensors

    assert dict(iter_tensors(opt.state_dict()["hf_qn"])).keys() == dict(iter_tensors(global_state)).keys()
    for (k, v), (_, w) in zip(iter_tensors(opt.state_dict()["hf_qn"]), iter_tensors(global_state)):
        assert torch.equal(v, w), k
    loop(model, opt, batches[3:], mse_loss)  # the retry
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(ALL))
def test_add_param_group_trains_the_new_parameters_with_their_groups_values(name):
    """Progressive unfreezing: a layer left out at construction joins with add_param_group and trains with
    its group's lr (K-BFGS: an adaptable layer becomes a layer of its own; a bare tensor goes to the fallback)."""
    torch.manual_seed(0)
    model = mlp()
    head = torch.nn.Linear(3, 3)
    extra = torch.nn.Parameter(torch.zeros(3))

    class Grown(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.extra = model, None, None

        def forward(self, x):
            out = self.body(x)
            return out if self.head is None else self.head(out) + self.extra

    grown = Grown()
    opt = ALL[name](grown)
    loop(grown, opt, regression_batches(3), mse_loss)
    grown.head, grown.extra = head, extra
    lr = 0.05 if name in KBFGS_MODES else 3e-3
    opt.add_param_group({"params": [*head.parameters(), extra], "lr": lr})
    before = [p.detach().clone() for p in (head.weight, extra)]
    loop(grown, opt, regression_batches(4, seed=1), mse_loss)
    assert not torch.equal(before[0], head.weight) and not torch.equal(before[1], extra)
    assert opt.param_groups[-1]["lr"] == lr
    if name in KBFGS_MODES:
        assert opt.adapters[-1].module is head and "input" in opt.state[head.weight]
        assert opt.param_groups[-1]["role"] == "fallback" and opt.param_groups[-1]["params"] == [extra]
    else:
        # unnamed: the group is one block (as for unnamed groups at construction)
        assert [id(p) for p in opt.blocks[-1].params] == [id(head.weight), id(head.bias), id(extra)]
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [head.weight]})
    sd = opt.state_dict()
    opt.load_state_dict(sd)  # the grown layout round-trips
    loop(grown, opt, regression_batches(1, seed=2), mse_loss)


def test_mlbfgs_takes_named_parameters_and_mixed_lists():
    model = mlp()
    opt = hf_qn.MLBFGS(model.named_parameters())
    assert [b.name for b in opt.blocks] == ["0", "2", "4"]  # per layer, by the real names
    p0, p1 = model[0].weight, model[0].bias
    mixed = hf_qn.MLBFGS([("first", p0), p1])
    assert [b.name for b in mixed.blocks] == ["first", "param1"] and mixed.blocks[0].params[0] is p0
    with pytest.raises(TypeError, match="tensors or \\(name, tensor\\) pairs"):
        hf_qn.MLBFGS([("a", "b", p0)])


def test_mlbfgs_hyperparameters_come_from_param_groups():
    """A checkpoint saved with update_interval=2 and loaded into an optimizer built with 1000 forms pairs every
    2 steps (the loaded groups rule, as in torch.optim); groups that disagree on a block-wide value are
    refused, naming it."""
    torch.manual_seed(0)
    model = mlp()
    saved = hf_qn.MLBFGS(model, update_interval=2)
    loop(model, saved, regression_batches(2), mse_loss)
    fresh = hf_qn.MLBFGS(model, update_interval=1000)
    fresh.load_state_dict(saved.state_dict())
    loop(model, fresh, regression_batches(6), mse_loss)
    assert fresh.statistics()["qn/pairs_accepted"] + fresh.statistics()["qn/pairs_skipped"] > 0
    split = hf_qn.MLBFGS([{"params": model[0].parameters()}, {"params": model[2].parameters(), "update_interval": 3}])
    with pytest.raises(ValueError, match="disagree on 'update_interval'"):
        loop(model, split, regression_batches(1), mse_loss)
    fresh.param_groups[0]["history_size"] = 4
    with pytest.raises(ValueError, match="history_size changed"):
        loop(model, fresh, regression_batches(1), mse_loss)


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda m: hf_qn.KBFGS(m, preset="paper", no_decay="0.bias"), TypeError, "no_decay.*collection of parameter names"),
    (lambda m: hf_qn.KBFGS(m, preset="paper", policy="all"), TypeError, "policy.*LayerPolicy"),
    (lambda m: hf_qn.KBFGS(m, preset="paper", config={"lr": 0.1}), TypeError, "config.*KBFGSConfig"),
    (lambda m: hf_qn.KBFGS(list(m.parameters()), preset="paper"), TypeError, "needs the model"),
    (lambda m: hf_qn.MLBFGS(m[0].weight), TypeError, "single Parameter.*wrap it in a list"),
    (lambda m: hf_qn.MLBFGS(m, config=hf_qn.optim.config.KBFGSConfig()), TypeError, "config.*MLBFGSConfig"),
    (lambda m: hf_qn.MLBFGS([]), ValueError, "empty parameter list"),
])
def test_constructor_misuse_names_the_argument(make, error, match):
    import hf_qn.optim.config  # noqa: F401

    with pytest.raises(error, match=match):
        make(mlp())
