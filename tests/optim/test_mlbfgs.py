"""mL-BFGS: the textbook L-BFGS reduction, scipy, SGD equivalence, damping, blocks, validation, families."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import hf_qn
from hf_qn.optim.mlbfgs import build_blocks
from tests._helpers.dense import explicit_lbfgs_matrix, random_spd
from tests._helpers.models import SmallCNN, digits_tensors, mlp, tiny_bert, tiny_gpt2, token_batch
from tests._helpers.training import dead_unit_drift, flat_state, loop, mse_loss, regression_batches, roundtrip

TEXTBOOK = dict(lr=1.0, momentum=0.0, param_decay=0.0, grad_decay=0.0, update_interval=1, damp=False,
                normalize=False, gamma="auto", blocks="model", history_dtype=torch.float64)


@pytest.mark.parametrize("m", [1, 3, 5])
def test_reduces_to_textbook_lbfgs_on_a_quadratic(m):
    n = 12
    Q = random_spd(n, cond=20.0, generator=torch.Generator().manual_seed(0)) / 20.0
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = hf_qn.MLBFGS([x], history_size=m, **TEXTBOOK)
    xr = torch.zeros(n, dtype=torch.float64)
    pairs = []
    prev = None
    for _ in range(40):
        opt.zero_grad()
        (0.5 * x @ Q @ x - b @ x).backward()
        opt.step()
        # reference: explicit H from the last m pairs, gamma = s^T y / y^T y of the newest
        g = Q @ xr - b
        if prev is not None:
            pairs.append((xr - prev[0], g - prev[1]))
            pairs = pairs[-m:]
        prev = (xr.clone(), g.clone())
        if pairs:
            s, y = pairs[-1]
            H = explicit_lbfgs_matrix(pairs, float(s @ y / (y @ y)), n)
            xr = xr - H @ g
        else:
            xr = xr - g
        torch.testing.assert_close(x.detach(), xr, rtol=1e-8, atol=1e-10)
    # and it converges to the minimizer
    assert float((Q @ x.detach() - b).norm()) < 1e-4 * float(b.norm())


def test_matches_scipy_lbfgs_on_logistic_regression():
    from scipy.optimize import minimize
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler

    X, y = load_breast_cancer(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    Xt, yt = torch.tensor(X), torch.tensor(y, dtype=torch.float64)
    lam = 1e-2

    def f_np(w):
        z = X @ w[:-1] + w[-1]
        return float(np.mean(np.logaddexp(0, z) - y * z) + 0.5 * lam * w[:-1] @ w[:-1])

    ref = minimize(f_np, np.zeros(X.shape[1] + 1), method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    w = nn.Parameter(torch.zeros(X.shape[1] + 1, dtype=torch.float64))
    opt = hf_qn.MLBFGS([w], history_size=10, **TEXTBOOK)
    for _ in range(100):
        opt.zero_grad()
        z = Xt @ w[:-1] + w[-1]
        loss = torch.mean(torch.nn.functional.softplus(z) - yt * z) + 0.5 * lam * w[:-1] @ w[:-1]
        loss.backward()
        opt.step()
    assert f_np(w.detach().numpy()) == pytest.approx(ref.fun, rel=1e-9)
    np.testing.assert_allclose(w.detach().numpy(), ref.x, rtol=1e-4, atol=1e-4)


def test_before_the_first_pair_it_is_torch_sgd_with_momentum_bitwise():
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    opt = hf_qn.MLBFGS(model, lr=0.05, momentum=0.9, normalize=False, update_interval=10**9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False)
    for batch in regression_batches(6):
        for o, m in ((opt, model), (ref_opt, ref)):
            o.zero_grad()
            mse_loss(m, batch).backward()
            o.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["unit", "grad"])
def test_normalized_direction_norms(mode):
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.MLBFGS(model, lr=1.0, momentum=0.0, update_interval=1, normalize=mode)
    loop(model, opt, regression_batches(4), mse_loss)  # history filled
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    mse_loss(model, regression_batches(1, seed=9)[0]).backward()
    gnorm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    opt.step()
    step = torch.sqrt(sum(((p.detach() - b).double() ** 2).sum() for p, b in zip(model.parameters(), before)))
    expected = 1.0 if mode == "unit" else float(gnorm)
    assert float(step) == pytest.approx(expected, rel=1e-4)


def test_decoupled_weight_decay_acts_on_parameters_not_gradients():
    p = nn.Parameter(torch.ones(3))
    opt = hf_qn.MLBFGS([p], lr=0.1, momentum=0.0, weight_decay=0.5, normalize=False)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 - 0.1 * 0.5))


def test_damping_bounds_hold_for_every_stored_pair():
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.MLBFGS(model, lr=0.05, update_interval=2, history_size=4, sigma_low=0.1, sigma_high=2.0)
    loop(model, opt, regression_batches(30), mse_loss)
    checked = 0
    for b in opt.blocks:
        hist = opt.state[b.params[0]]["block"]["history"]
        for i in range(int(hist["count"])):
            s, y = hist["S"][i].double(), hist["Y"][i].double()
            mu = float(s @ y / (s @ s))
            assert 0.1 - 1e-5 <= mu <= 2.0 + 1e-5
            checked += 1
    assert checked > 0 and opt.statistics()["qn/pairs_damped"] > 0


def test_nonfinite_gradient_never_enters_history():
    model = mlp()
    opt = hf_qn.MLBFGS(model, update_interval=1)
    loop(model, opt, regression_batches(3), mse_loss)
    snap = {id(p): {k: v.clone() for k, v in flat_state(opt, p).items()} for p in model.parameters()}
    opt.zero_grad()
    mse_loss(model, regression_batches(1)[0]).backward()
    model[0].bias.grad[0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    for p in model.parameters():
        for k, v in snap[id(p)].items():
            assert torch.equal(flat_state(opt, p)[k], v), k
    assert opt.statistics()["qn/steps_skipped_nonfinite"] == 1


def test_rejected_pair_is_dropped_and_counted():
    p = nn.Parameter(torch.zeros(4))
    opt = hf_qn.MLBFGS([p], lr=0.1, damp=False, update_interval=1, param_decay=0.0, grad_decay=0.0, normalize=False)
    for g in ([1.0, 0, 0, 0], [2.0, 0, 0, 0]):  # gradient grows along the step direction: s^T y < 0
        p.grad = torch.tensor(g)
        opt.step()
    assert opt.statistics()["qn/pairs_skipped"] == 1 and opt.statistics()["qn/pairs_accepted"] == 0


def test_accumulated_gradients_equal_the_large_batch():
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = hf_qn.MLBFGS(model, update_interval=2), hf_qn.MLBFGS(ref, update_interval=2)
    for x, y in regression_batches(8, batch=8):
        ref_opt.zero_grad()
        mse_loss(ref, (x, y)).backward()
        ref_opt.step()
        opt.zero_grad()
        for part in zip(x.split(4), y.split(4)):
            (mse_loss(model, part) / 2).backward()
        opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_blocks_layer_param_model_chunk_named_and_merge():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.LayerNorm(2))
    named = list(model.named_parameters())
    assert [b.name for b in build_blocks(named, "layer")] == ["0", "2", "3"]
    assert len(build_blocks(named, "param")) == 6
    assert len(build_blocks(named, "model")) == 1
    chunks = build_blocks(named, 10)
    assert all(b.numel >= 10 for b in chunks[:-1]) and sum(b.numel for b in chunks) == 27
    custom = build_blocks(named, {"first": ["0.weight", "0.bias"], "w2": ["2.weight"]})
    assert [b.name for b in custom] == ["first", "w2", "2", "3"]
    merged = build_blocks(named, "layer", min_block_size=10)
    assert [b.name for b in merged] == ["0", "2+3"]
    with pytest.raises(ValueError, match="unknown"):
        build_blocks(named, {"x": ["nope"]})
    with pytest.raises(ValueError, match="already"):
        build_blocks(named, {"x": ["0.bias"], "y": ["0.bias"]})
    with pytest.raises(ValueError, match="blocks"):
        build_blocks(named, "rows")
    opt = hf_qn.MLBFGS(model)
    table = opt.block_map()
    assert "0.weight, 0.bias" in table and "owner" in table
    # The Trainer's weight-decay split lists every weight before every bias: a layer is still one block.
    split = [(n, p) for n, p in named if n.endswith("weight")] + [(n, p) for n, p in named if n.endswith("bias")]
    by_layer = build_blocks(split, "layer")
    assert [b.name for b in by_layer] == ["0", "2", "3"]
    assert [b.params for b in by_layer] == [b.params for b in build_blocks(named, "layer")]


def test_accepts_params_groups_and_module():
    model = mlp()
    hf_qn.MLBFGS(model.parameters())
    opt = hf_qn.MLBFGS([{"params": model[0].parameters(), "lr": 0.01}, {"params": model[2].parameters()}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
    with pytest.raises(ValueError, match="empty"):
        hf_qn.MLBFGS([])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lr": -0.1}, "lr"), ({"momentum": 1.0}, "momentum"), ({"history_size": 0}, "history_size"),
     ({"update_interval": 0}, "update_interval"), ({"param_decay": 1.0}, "param_decay"),
     ({"grad_decay": -0.5}, "grad_decay"), ({"sigma_low": 1.0}, "sigma"), ({"sigma_high": 0.9}, "sigma"),
     ({"min_mix": 1.0}, "min_mix"), ({"gamma": 0.0}, "gamma"), ({"gamma": "x"}, "gamma"),
     ({"history_dtype": torch.int8}, "history_dtype"), ({"weight_decay": -1.0}, "weight_decay"),
     ({"pair_decay": 1.0}, "pair_decay"), ({"normalize": "layer"}, "normalize")],
)
def test_validation_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf_qn.MLBFGS(mlp(), **kwargs)


def test_loading_a_different_block_layout_is_refused():
    model = mlp()
    opt = hf_qn.MLBFGS(model, blocks="model")
    loop(model, opt, regression_batches(2), mse_loss)
    with pytest.raises(ValueError, match="block layout"):
        hf_qn.MLBFGS(model, blocks="layer").load_state_dict(opt.state_dict())
    per_param = hf_qn.MLBFGS(model, blocks="param")  # the layout the Trainer's decay split used to give
    loop(model, per_param, regression_batches(2), mse_loss)
    with pytest.raises(ValueError, match="block layout"):
        hf_qn.MLBFGS(model, blocks="layer").load_state_dict(per_param.state_dict())


def _falls(model, opt, batches, loss_fn, frac):
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        losses = loop(model, opt, batches, loss_fn, closure=False)
    k = max(2, len(losses) // 5)
    assert sum(losses[-k:]) / k < frac * sum(losses[:k]) / k, losses


@pytest.mark.parametrize("normalize,lr", [("adam", 3e-3), ("unit", 0.1)])
def test_loss_falls_on_each_family(normalize, lr):
    torch.manual_seed(0)
    x, y = digits_tensors(256)
    ce = nn.CrossEntropyLoss()
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)] * 5
    cnn = SmallCNN()
    _falls(cnn, hf_qn.MLBFGS(cnn, lr=lr, update_interval=4, normalize=normalize), batches, lambda m, b: ce(m(b[0]), b[1]), 0.5)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    flat = [(a.flatten(1), b) for a, b in batches]
    _falls(net, hf_qn.MLBFGS(net, lr=lr, update_interval=4, normalize=normalize), flat, lambda m, b: ce(m(b[0]), b[1]), 0.6)
    batch = token_batch(8, 16)
    gpt = tiny_gpt2()
    _falls(gpt, hf_qn.MLBFGS(gpt, lr=lr / 2, update_interval=3, normalize=normalize), [batch] * 15,
           lambda m, b: m(**b, labels=b["input_ids"]).loss, 0.85)
    bert = tiny_bert()
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    _falls(bert, hf_qn.MLBFGS(bert, lr=lr / 2, update_interval=3, normalize=normalize), [batch] * 15,
           lambda m, b: m(**b, labels=labels).loss, 0.85)


def test_adam_grafting_keeps_the_lbfgs_direction_and_takes_adams_block_norm():
    """normalize="adam": per block, the step is parallel to the raw L-BFGS direction H g (the same
    optimizer with normalize="none") and its length is lr * ||g / (sqrt(v_hat) + eps)||, with v
    Adam's bias-corrected second moment recomputed here from the recorded gradients in float64."""
    torch.manual_seed(0)
    model = mlp().double()
    opt = hf_qn.MLBFGS(model, lr=0.1, momentum=0.0, update_interval=1, param_decay=0.5, grad_decay=0.5,
                       history_size=3, direction_rms=False)
    assert opt.defaults["normalize"] == "adam"
    v = {p: torch.zeros_like(p) for p in model.parameters()}
    batches = regression_batches(6, dtype=torch.float64)
    for t, batch in enumerate(batches, start=1):
        opt.zero_grad()
        mse_loss(model, batch).backward()
        for p in model.parameters():
            v[p] = 0.999 * v[p] + 0.001 * p.grad**2
        twin_model = copy.deepcopy(model)  # Parameter.__deepcopy__ does not copy .grad
        for q, p in zip(twin_model.parameters(), model.parameters()):
            q.grad = p.grad.clone()
        twin_opt = hf_qn.MLBFGS(twin_model, lr=0.1, momentum=0.0, update_interval=1, param_decay=0.5,
                                grad_decay=0.5, history_size=3, normalize="none")
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else the twin shares state tensors
        assert twin_opt.defaults["normalize"] == "none"  # the loaded groups do not change the mode
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        twin_opt.step()
        steps = {p: p.detach() - b for p, b in zip(model.parameters(), before)}
        raw = {p: q.detach() - b for p, q, b in zip(model.parameters(), twin_model.parameters(), before)}
        for block in opt.blocks:
            d = torch.cat([steps[p].reshape(-1) for p in block.params])
            h = torch.cat([raw[p].reshape(-1) for p in block.params])
            adam = torch.cat([(p.grad / ((v[p] / (1 - 0.999**t)).sqrt() + 1e-8)).reshape(-1) for p in block.params])
            assert float(d.norm()) == pytest.approx(0.1 * float(adam.norm()), rel=1e-9)
            assert float(torch.dot(d, h) / (d.norm() * h.norm())) == pytest.approx(1.0, abs=1e-12)
    assert opt.statistics()["qn/pairs_held"] > 0  # the later steps used L-BFGS directions
    assert opt.state[next(model.parameters())]["exp_avg_sq"].dtype == torch.float64


def test_direction_rms_divides_each_entry_by_its_running_rms_before_grafting():
    """direction_rms (the default with normalize="adam"): d ← d (1 − ε / (√v̂ + ε)) / (√v̂_d + ε), v_d ← β₂ v_d +
    (1−β₂) d² per element (v̂: the gradient's Adam second moment),
    then each block takes Adam's length lr·‖g/(√v̂+ε)‖. A float64 reference from the raw L-BFGS direction: a twin
    with normalize="none" at lr 1 (its step is −H g) sees the same parameters and batches, so it forms the
    same pairs, and is reset onto this run's parameters after every step."""
    torch.manual_seed(0)
    model = mlp().double()
    twin = copy.deepcopy(model)
    kw = {"momentum": 0.0, "update_interval": 1, "param_decay": 0.5, "grad_decay": 0.5, "history_size": 3}
    opt = hf_qn.MLBFGS(model, lr=0.1, **kw)
    ref = hf_qn.MLBFGS(twin, lr=1.0, normalize="none", **kw)
    assert opt.defaults["direction_rms"] is True and ref.defaults["direction_rms"] is False
    params = list(model.parameters())
    v = {p: torch.zeros_like(p) for p in params}
    v_d = {p: torch.zeros_like(p) for p in params}
    for t, batch in enumerate(regression_batches(6, dtype=torch.float64), start=1):
        for o, net in ((opt, model), (ref, twin)):
            o.zero_grad()
            mse_loss(net, batch).backward()
        before = {p: p.detach().clone() for p in params}
        opt.step()
        ref.step()
        raw = {p: before[p] - q.detach() for p, q in zip(params, twin.parameters())}  # H g
        for block in opt.blocks:
            adam, scaled = [], []
            for p in block.params:
                v[p] = 0.999 * v[p] + 0.001 * p.grad**2
                v_d[p] = 0.999 * v_d[p] + 0.001 * raw[p] ** 2
                adam.append((p.grad / ((v[p] / (1 - 0.999**t)).sqrt() + 1e-8)).reshape(-1))
                weight = 1 - 1e-8 / ((v[p] / (1 - 0.999**t)).sqrt() + 1e-8)
                scaled.append((raw[p] * weight / ((v_d[p] / (1 - 0.999**t)).sqrt() + 1e-8)).reshape(-1))
            d_rms = torch.cat(scaled)
            expected = -0.1 * torch.cat(adam).norm() * d_rms / d_rms.norm()
            moved = torch.cat([(p.detach() - before[p]).reshape(-1) for p in block.params])
            torch.testing.assert_close(moved, expected, rtol=1e-7, atol=1e-12)
        with torch.no_grad():  # the twin continues from this run's point
            for q, p in zip(twin.parameters(), params):
                q.copy_(p)
    assert opt.statistics()["qn/pairs_held"] > 0  # the later steps used L-BFGS directions
    assert opt.state[params[0]]["direction_sq"].shape == params[0].shape


def test_direction_rms_keeps_a_unit_without_gradient_in_place():
    """An output unit the loss never reads has an identically zero gradient; weight decay moves it, so the pairs'
    ``s`` reach it and the L-BFGS direction there is not zero. direction_rms weights each entry by
    ``1 − ε / (√v̂ + ε)``, zero there up to rounding, so the unit moves by the decay alone, as with Adam; dividing by
    the RMS alone lifted that entry to a step as large as the other units'."""
    torch.manual_seed(0)
    init = mlp((6, 8, 4))
    lr, wd = 1e-2, 0.1
    drift = {}
    for rms in (True, False):
        model = copy.deepcopy(init)
        opt = hf_qn.MLBFGS(model, lr=lr, weight_decay=wd, update_interval=1, history_size=3, direction_rms=rms)
        drift[rms] = dead_unit_drift(model, init, opt, regression_batches(40), decay=1 - lr * wd)
    assert drift[False] > 1e-3  # the L-BFGS direction does reach the dead unit
    assert drift[True] < 1e-6  # RMS scaling alone: 0.37 (K-BFGS), 0.07 (mL-BFGS)


def test_direction_rms_needs_the_adam_grafting_and_a_state_without_it_is_refused():
    assert hf_qn.MLBFGS(mlp(), normalize="unit").defaults["direction_rms"] is False  # derived from normalize
    with pytest.raises(ValueError, match="direction_rms=True with normalize='unit'.*normalize='adam'"):
        hf_qn.MLBFGS(mlp(), normalize="unit", direction_rms=True)
    model = mlp()
    opt = hf_qn.MLBFGS(model, direction_rms=False)
    loop(model, opt, regression_batches(2), mse_loss)
    with pytest.raises(ValueError, match="written without direction_rms.*direction_rms=False"):
        hf_qn.MLBFGS(copy.deepcopy(model)).load_state_dict(opt.state_dict())
    hf_qn.MLBFGS(copy.deepcopy(model), direction_rms=False).load_state_dict(opt.state_dict())


def test_kept_compact_matrix_is_never_stale():
    """The compact form's middle matrix is kept between pushes; a run that rebuilds it at every step takes
    bitwise the same steps, through ring wrap-around (m=2), rejected pairs and pushes every other step."""
    batches = regression_batches(12)
    runs = []
    for rebuild in (False, True):
        torch.manual_seed(0)
        model = mlp()
        opt = hf_qn.MLBFGS(model, lr=0.05, update_interval=2, history_size=2, param_decay=0.5, grad_decay=0.5)
        for batch in batches:
            if rebuild:
                for u in opt.units:
                    u._middle = None
            opt.zero_grad()
            mse_loss(model, batch).backward()
            opt.step()
        assert opt.statistics()["qn/pairs_accepted"] > 2 * len(opt.blocks)  # the ring wrapped
        runs.append([p.detach().clone() for p in model.parameters()])
        if not rebuild:  # a reload drops the kept matrices: they belong to the history it replaces
            assert any(u._middle is not None for u in opt.units)
            opt.load_state_dict(roundtrip(opt.state_dict()))
            assert all(u._middle is None for u in opt.units)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_renamed_hyperparameters_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="'damping' is now called 'min_mix'"):
        opt = hf_qn.MLBFGS(mlp(), damping=0.05, param_beta=0.9, grad_beta=0.8, pair_momentum=0.5)
    assert (opt.config.min_mix, opt.config.param_decay, opt.config.grad_decay, opt.config.pair_decay) == (
        0.05, 0.9, 0.8, 0.5)
    assert opt.defaults["min_mix"] == 0.05
