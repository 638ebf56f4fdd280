"""K-BFGS behaviour: the closure contract, real-world training conditions, validation, model families."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import hf_qn
from hf_qn.linalg import NEWTON_SCHULZ_QUINTIC, polar_each
from hf_qn.optim._base import ROLE, ROLE_FALLBACK
from hf_qn.optim.kbfgs_layer import POLAR_ITERATIONS
from hf_qn.optim.state import iter_tensors
from tests._helpers.dense import svd_polar
from tests._helpers.models import SmallCNN, digits_tensors, mlp, tiny_bert, tiny_gpt2, token_batch
from tests._helpers.training import dead_unit_drift, flat_state, lm_loss, loop, mse_loss, regression_batches, roundtrip


def test_closure_required_on_curvature_steps_with_clear_error():
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper")
    mse_loss(model, regression_batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before touching anything


def test_closure_gradients_do_not_leak():
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper")
    batch = regression_batches(1)[0]
    mse_loss(model, batch).backward()
    grads = [p.grad.clone() for p in model.parameters()]

    def closure():
        loss = 100.0 * mse_loss(model, batch)
        loss.backward()
        return loss

    opt.step(closure)
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)


def test_no_second_pass_mode_trains_without_closure():
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.3, pairs="consecutive")
    losses = loop(model, opt, regression_batches(60), mse_loss, closure=False)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert opt.statistics()["qn/pairs_accepted"] > 0


def test_update_interval_captures_and_calls_closure_only_on_curvature_steps():
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, update_interval=3, warmup_curvature_steps=0, max_update_growth=None)
    calls = []
    for i, batch in enumerate(regression_batches(7)):
        opt.zero_grad()
        assert opt.curvature_step_next() == (i % 3 == 0)
        mse_loss(model, batch).backward()
        if opt.curvature_step_next():
            opt.step(lambda batch=batch: calls.append(1) or mse_loss(model, batch).backward())
        else:
            opt.step()  # no closure needed on the other steps
    assert len(calls) == 3
    assert opt.statistics()["qn/pairs_accepted"] == 3 * len(opt.adapters)


def test_warmup_updates_curvature_every_step_first():
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, update_interval=4, warmup_curvature_steps=3, max_update_growth=None)
    seen = []
    for batch in regression_batches(9):
        opt.zero_grad()
        seen.append(opt.curvature_step_next())
        mse_loss(model, batch).backward()
        opt.step(lambda batch=batch: mse_loss(model, batch).backward())
    assert seen == [True, True, True, False, True, False, False, False, True]


def test_refresh_step_captures_its_second_pass_when_the_closure_calls_train():
    """The Trainer calls ``optimizer.train()`` inside every training_step, the closure's too. On a refresh
    step requested by the growth guard (off the ``update_interval`` schedule), that call must not switch the
    second pass's capture off (it did: GPT-2 small under the Trainer raised "hooks ... did not fire")."""
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, update_interval=4, warmup_curvature_steps=0, max_update_growth=None)
    batches = regression_batches(3)

    def train_step(batch, closure):
        opt.train()  # what Trainer.training_step does first
        opt.zero_grad()
        mse_loss(model, batch).backward()
        opt.step(closure)

    def closure(batch):
        opt.train()
        return mse_loss(model, batch).backward()

    for batch in batches[:2]:
        train_step(batch, lambda batch=batch: closure(batch))
    assert not opt.curvature_step_next()  # step 2 of interval 4: off schedule
    opt.schedule.refresh_next(True)  # as the growth guard does
    opt.train()
    assert opt.curvature_step_next()
    before = opt.statistics()["qn/pairs_accepted"]
    train_step(batches[2], lambda: closure(batches[2]))
    assert opt.statistics()["qn/pairs_accepted"] == before + len(opt.adapters)


def _layer_steps(model, before):
    return [float((m.weight.detach() - w).norm()) for m, w in zip(_linears(model), before)]


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_growth_guard_bounds_a_stale_step_and_refreshes_curvature(momentum):
    """update_interval > 1: a step between curvature updates whose gradient jumps 1000x is scaled so that the
    largest layer step is exactly max_update_growth x its size at the last curvature step (weights have no
    bias here, so ‖ΔW‖ is ‖α ν D‖ exactly), is counted, and makes the next step a curvature step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 2, bias=False))
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, grad_decay=momentum, l2=0.0, update_interval=5,
                      warmup_curvature_steps=0, max_update_growth=2.0)
    batches = regression_batches(3, d_in=4, d_out=2)
    steps = []
    for i, batch in enumerate(batches):
        scale = 1000.0 if i == 1 else 1.0
        opt.zero_grad()
        before = [m.weight.detach().clone() for m in _linears(model)]
        (scale * mse_loss(model, batch)).backward()
        opt.step((lambda b=batch: mse_loss(model, b).backward()) if opt.curvature_step_next() else None)
        steps.append(_layer_steps(model, before))
        if i == 1:
            assert opt.curvature_step_next()  # step 2 would have been stale (interval 5): refreshed instead
    ratios = [a / b for a, b in zip(steps[1], steps[0])]
    assert max(ratios) == pytest.approx(2.0, rel=1e-5)
    stats = opt.statistics()
    assert stats["qn/steps_clipped"] >= 1
    assert stats["qn/pairs_accepted"] == 2 * len(opt.adapters)  # steps 0 and 2 (the refresh) updated curvature


@pytest.mark.parametrize("preset", ["paper", None])
def test_growth_guard_reference_is_the_step_taken(preset):
    """The growth guard's reference for each layer is the size of the step the layer took, ``‖ΔW‖`` (bias-free
    layers), whether the size comes from the direction's own norm (the paper's) or from the grafted length
    (the defaults: Adam's norm times the direction's RMS-scaled one, read with the finiteness check)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 2, bias=False))
    opt = hf_qn.KBFGS(model, preset=preset, lr=0.05, l2=0.0, update_interval=3, warmup_curvature_steps=0)
    for batch in regression_batches(2, d_in=4, d_out=2):  # a curvature step, then a stale one
        opt.zero_grad()
        before = [m.weight.detach().clone() for m in _linears(model)]
        mse_loss(model, batch).backward()
        curvature = opt.curvature_step_next()
        opt.step((lambda b=batch: mse_loss(model, b).backward()) if curvature and preset == "paper" else None)
        if curvature:
            refs = opt.growth_guard.state["ref_step_sizes"].tolist()
            assert refs == pytest.approx(_layer_steps(model, before), rel=1e-5)
            assert min(refs) > 0


@pytest.mark.parametrize("preset", ["paper", None])
def test_nonfinite_direction_skips_step(preset):
    """A factor gone non-finite makes the direction non-finite: the step is skipped with a warning and no
    parameter moves, with and without grafting (whose rescaling would turn an inf into NaN or 0)."""
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, preset=preset, lr=0.05)
    batches = regression_batches(3)
    loop(model, opt, batches[:2], mse_loss)
    opt.layers[0].state["input"]["H_a"][0, 0] = float("inf")
    snap = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    mse_loss(model, batches[2]).backward()
    with pytest.warns(RuntimeWarning, match="non-finite direction"):
        opt.step(lambda: mse_loss(model, batches[2]).backward())
    assert all(torch.equal(a, b) for a, b in zip(snap, model.parameters()))
    assert opt.statistics()["qn/steps_skipped_nonfinite"] == 1


def test_growth_guard_leaves_the_paper_algorithm_alone_at_interval_one():
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, max_update_growth=1.0001)
    ref_opt = hf_qn.KBFGS(ref, preset="paper", lr=0.1, max_update_growth=None)
    loop(model, opt, regression_batches(6), mse_loss)
    loop(ref, ref_opt, regression_batches(6), mse_loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    assert opt.statistics()["qn/steps_clipped"] == 0


@pytest.mark.parametrize("fused", [False, True, None])
def test_fallback_equals_torch_adamw_exactly(fused):
    """Parameters no adapter takes (here: LayerNorm) follow torch.optim.AdamW bit for bit: its fused kernel
    (``fallback_fused`` True, or None on a CPU) or its single-tensor arithmetic (False)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    ref = copy.deepcopy(model)
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, fallback_lr=1e-2, fallback_weight_decay=0.01,
                      fallback_fused=fused)
    kernel = {"foreach": False} if fused is False else {"fused": True}
    ref_opt = torch.optim.AdamW(ref[1].parameters(), lr=1e-2, weight_decay=0.01, **kernel)
    for batch in regression_batches(5):
        opt.zero_grad()
        ref_opt.zero_grad()
        mse_loss(model, batch).backward()
        mse_loss(ref, batch).backward()
        # Same gradient on the LayerNorm as long as the other layers are equal: compare the update alone.
        with torch.no_grad():
            for p, q in zip(model[1].parameters(), ref[1].parameters()):
                q.copy_(p)
                q.grad = p.grad.clone()
        opt.step(lambda batch=batch: mse_loss(model, batch).backward())
        ref_opt.step()
        for p, q in zip(model[1].parameters(), ref[1].parameters()):
            assert torch.equal(p, q)
        with torch.no_grad():  # keep the rest of the reference model in lockstep
            for p, q in zip(model.parameters(), ref.parameters()):
                q.copy_(p)


@pytest.mark.parametrize("fused", [False, True])
def test_fallback_kernels_match_their_torch_adamw_on_large_tensors(fused):
    """On tensors large enough for the two kernels' roundings to differ, each ``fused`` setting gives the bits of
    its own torch.optim.AdamW and not the other's (so the test above tells the kernels apart)."""
    from hf_qn.optim._base import adamw_updates_

    torch.manual_seed(0)
    params = [torch.randn(300, 200), torch.randn(999)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(4)]
    ours, states = [p.clone() for p in params], [{} for _ in params]
    refs = {k: [nn.Parameter(p.clone()) for p in params] for k in ("fused", "foreach")}
    opts = {"fused": torch.optim.AdamW(refs["fused"], lr=1e-2, weight_decay=0.01, fused=True),
            "foreach": torch.optim.AdamW(refs["foreach"], lr=1e-2, weight_decay=0.01, foreach=False)}
    for gs in grads:
        adamw_updates_(ours, gs, states, 1e-2, (0.9, 0.999), 1e-8, 0.01, fused)
        for name, opt in opts.items():
            for q, g in zip(refs[name], gs):
                q.grad = g.clone()
            opt.step()
    same, other = ("fused", "foreach") if fused else ("foreach", "fused")
    assert all(torch.equal(a, b) for a, b in zip(ours, refs[same]))
    assert not all(torch.equal(a, b) for a, b in zip(ours, refs[other]))
    assert all(st["step"].device.type == "cpu" and float(st["step"]) == 4 for st in states)


def test_param_groups_cover_every_parameter_once_and_scheduler_scales_both_parts():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.2, fallback_lr=1e-3)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert sorted(g["lr"] for g in opt.param_groups) == [5e-4, 0.1]
    assert sched.get_last_lr()


def test_fallback_embedding_lr_moves_the_input_embedding_alone(tmp_path, caplog):
    """``fallback_embedding_lr`` gives the model's input embedding, where it goes to the fallback (a Llama's
    untied one), groups of its own at that lr, split by ``no_decay`` like the rest; the other fallback parameters
    (norms, position embeddings) keep ``fallback_lr``. Its default ("auto") is ``lr / 0.1`` on a language model
    trained from scratch and None elsewhere (the earlier groups), logged only where an untied embedding takes it;
    at the fallback's own lr the steps are those of None, and a higher one moves the embedding alone further. A
    checkpoint with other groups is refused."""
    from tests._helpers.models import tiny_llama

    torch.manual_seed(0)
    models = [tiny_llama() for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    embedding = "model.embed_tokens.weight"
    plain = hf_qn.KBFGS(models[0], update_interval=1, fallback_embedding_lr=None)
    same = hf_qn.KBFGS(models[1], update_interval=1, fallback_embedding_lr=6e-3)  # the fallback's lr: 6e-3
    with caplog.at_level(logging.INFO, logger="hf_qn.optim.kbfgs"):
        default = hf_qn.KBFGS(models[2], update_interval=1, no_decay=[embedding])
    assert default.config.fallback_embedding_lr == pytest.approx(0.06)
    assert "fallback_embedding_lr='auto' is 0.06 (lr / 0.1, a language model trained from scratch)" in caplog.text
    assert len(same.param_groups) == len(plain.param_groups) + 1
    weight = dict(models[2].named_parameters())[embedding]
    group = next(g for g in default.param_groups if any(p is weight for p in g["params"]))
    assert (group["lr"], group["weight_decay"], len(group["params"])) == (pytest.approx(0.06), 0.0, 1)
    norms = [g for g in default.param_groups if g[ROLE] == ROLE_FALLBACK and g is not group]
    assert norms and all(g["lr"] == 6e-3 for g in norms)
    # elsewhere the default keeps the earlier groups: a tied GPT-2 (its position embedding stays at fallback_lr), a
    # fine-tune, a plain module
    gpt2 = tiny_gpt2()
    gpt2.save_pretrained(tmp_path)
    for model in (gpt2, type(gpt2).from_pretrained(tmp_path), mlp()):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="hf_qn.optim.kbfgs"):
            auto = hf_qn.KBFGS(model)
        none = hf_qn.KBFGS(model, fallback_embedding_lr=None)
        assert [g["lr"] for g in auto.param_groups] == [g["lr"] for g in none.param_groups]
        assert "fallback_embedding_lr" not in caplog.text  # nothing to say: no untied embedding in the fallback
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hf_qn.optim.kbfgs"):  # a Llama whose embedding is adapted
        adapted = hf_qn.KBFGS(tiny_llama(), policy=hf_qn.LayerPolicy(adapt_embeddings=True))
    assert not any(f.embedding for f in adapted.assignment.fallback)
    assert "fallback_embedding_lr" not in caplog.text
    for bad in (-1.0, "high"):
        with pytest.raises(ValueError, match="Invalid fallback_embedding_lr"):
            hf_qn.KBFGS(tiny_llama(), fallback_embedding_lr=bad)
    starts = [dict(m.named_parameters())[embedding].detach().clone() for m in models]
    batch = token_batch()
    for model, opt in zip(models, (plain, same, default)):
        loop(model, opt, [batch] * 3, lm_loss, closure=False)
    weights = [dict(m.named_parameters()) for m in models]
    assert all(torch.equal(p, weights[1][n]) for n, p in weights[0].items())
    moved = [(w[embedding] - s).norm() for w, s in zip(weights, starts)]
    assert moved[2] > 2 * moved[0]
    with pytest.raises(ValueError, match="fallback_embedding_lr=None for a run saved before"):
        hf_qn.KBFGS(tiny_llama()).load_state_dict(roundtrip(plain.state_dict()))


def test_nonfinite_gradient_skips_step_and_keeps_curvature():
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1)
    loop(model, opt, regression_batches(2), mse_loss)
    snap_p = [p.detach().clone() for p in model.parameters()]
    snap_s = {k: v.clone() for k, v in flat_state(opt, model[0].weight).items()}
    batch = regression_batches(1, seed=5)[0]
    opt.zero_grad()
    mse_loss(model, batch).backward()
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: mse_loss(model, batch).backward())
    assert all(torch.equal(a, b) for a, b in zip(snap_p, model.parameters()))
    st = flat_state(opt, model[0].weight)
    for k, v in snap_s.items():
        assert torch.equal(st[k], v), k
    assert opt.statistics()["qn/steps_skipped_nonfinite"] == 1


def test_gradscaler_skipped_step_commits_no_statistics_or_pair():
    """A CPU GradScaler with a poisoned gradient skips step(); the next step sees only its own batch."""
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, grad_scaler=scaler)
    ref_opt = hf_qn.KBFGS(ref, preset="paper", lr=0.1)
    good = regression_batches(3, seed=1)
    # poisoned step: the model never moves, nothing is committed
    opt.zero_grad()
    loss = mse_loss(model, good[0])
    scaler.scale(loss).backward()
    model[2].bias.grad[0] = float("inf")
    scaler.step(opt, lambda: scaler.scale(mse_loss(model, good[0])).backward())
    scaler.update()
    assert opt.state[model[0].weight] == {} and opt.schedule.step == 0
    # following steps equal an unscaled run that never saw the poisoned batch (stats unscaled)
    for batch in good[1:]:
        opt.zero_grad()
        scaler.scale(mse_loss(model, batch)).backward()
        scaler.step(opt, lambda batch=batch: scaler.scale(mse_loss(model, batch)).backward())
        scaler.update()
        ref_opt.zero_grad()
        mse_loss(ref, batch).backward()
        ref_opt.step(lambda batch=batch: mse_loss(ref, batch).backward())
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(opt.state[model[0].weight]["output"]["H_g"], ref_opt.state[ref[0].weight]["output"]["H_g"])


def test_accumulation_2x4_equals_1x8():
    torch.manual_seed(0)
    model = mlp()
    ref = copy.deepcopy(model)
    opt, ref_opt = hf_qn.KBFGS(model, preset="paper", lr=0.1), hf_qn.KBFGS(ref, preset="paper", lr=0.1)
    for x, y in regression_batches(3, batch=8):
        ref_opt.zero_grad()
        mse_loss(ref, (x, y)).backward()
        ref_opt.step(lambda x=x, y=y: mse_loss(ref, (x, y)).backward())
        opt.zero_grad()
        parts = list(zip(x.split(4), y.split(4)))
        for part in parts:
            (mse_loss(model, part) / 2).backward()

        def closure(parts=parts):
            for part in parts:
                (mse_loss(model, part) / 2).backward()

        opt.step(closure)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # H_g is built from differences of means (s, y), where summation order shows at about 1e-5
    torch.testing.assert_close(opt.state[model[0].weight]["output"]["H_g"], ref_opt.state[ref[0].weight]["output"]["H_g"],
                               rtol=1e-4, atol=1e-4)


def test_eval_mode_and_optimizer_eval_capture_nothing():
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper")
    opt.eval()
    model(torch.randn(3, 6)).sum().backward()
    assert all(not s.pending for s in opt.capture.stats["primary"])
    opt.train()
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 6))
    assert all(not s.pending for s in opt.capture.stats["primary"])


def test_functionally_used_layer_gives_clear_error():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return nn.functional.linear(x, self.lin.weight, self.lin.bias)

    model = Functional()
    opt = hf_qn.KBFGS(model, preset="paper")
    x = torch.randn(3, 4)
    model(x).sum().backward()
    with pytest.raises(RuntimeError, match="did not fire.*exclude"):
        opt.step(lambda: model(x).sum().backward())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"damping": 0.0}, "damping"),
        ({"damping": 1.5}, "damping"),
        ({"grad_decay": 1.0}, "grad_decay"),
        ({"factor_decay": -0.1}, "factor_decay"),
        ({"pair_decay": 1.0}, "pair_decay"),
        ({"powell_mu": 0.0}, "powell_mu"),
        ({"history_size": 0}, "history_size"),
        ({"update_interval": 0}, "update_interval"),
        ({"max_update_growth": 1.0}, "max_update_growth"),
        ({"warmup_curvature_steps": -1}, "warmup_curvature_steps"),
        ({"lm_damping": "x"}, "lm_damping"),
        ({"input_inverse": "eigh"}, "input_inverse"),
        ({"input_warm_start": -1}, "input_warm_start"),
        ({"input_warm_start": 1.5}, "input_warm_start"),
        ({"pairs": "x"}, "pairs"),
        ({"fallback": "lion"}, "fallback"),
        ({"fallback_betas": (0.9, 1.0)}, "fallback_betas"),
        ({"kl_clip": 0.0}, "kl_clip"),
        ({"max_loss_increase": -0.1}, "max_loss_increase"),
        ({"l2": -1e-3}, "l2"),
        ({"lr": "0.1"}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"fallback_betas": (0.9,)}, "fallback_betas"),
        ({"matmul_dtype": torch.float64}, "matmul_dtype"),
        ({"matmul_dtype": "half-ish"}, "matmul_dtype"),
    ],
)
def test_validation_names_the_argument(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        hf_qn.KBFGS(mlp(), preset="paper", **kwargs)


def test_model_without_adaptable_layer_and_non_module():
    with pytest.raises(ValueError, match="no adaptable layer"):
        hf_qn.KBFGS(nn.Sequential(nn.LayerNorm(4)), preset="paper")
    with pytest.raises(TypeError, match="MLBFGS"):
        hf_qn.KBFGS(list(mlp().parameters()), preset="paper")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="history_size"):
        hf_qn.KBFGSL(mlp(), preset="paper", history_size=None)  # type: ignore[arg-type]


def test_large_lr_never_produces_nonfinite_parameters():
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=50.0, damping=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loop(model, opt, regression_batches(15), mse_loss)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _guarded_step(model, opt, batch, loss_scale=1.0):
    """One curvature step whose closure returns the loss; the loss of the first pass is returned."""
    opt.zero_grad()
    loss = loss_scale * mse_loss(model, batch)
    loss.backward()

    def closure():
        out = loss_scale * mse_loss(model, batch)
        out.backward()
        return out

    opt.step(closure)
    return float(loss.detach())


def test_loss_guard_undoes_a_step_that_raises_the_batch_loss():
    """A step that multiplies the same-batch loss is undone (parameters back, no pair, grads untouched),
    the next step is half as long, and both counters say so."""
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.05, damping=0.3, max_loss_increase=0.25)
    batches = regression_batches(3)
    _guarded_step(model, opt, batches[0])  # initialises the running average
    for g in opt.param_groups:
        g["lr"] = 200.0  # the next step overshoots by far
    before = [p.detach().clone() for p in model.parameters()]
    H_g = [opt.state[ad.weight]["output"]["H_g"].clone() for ad in opt.adapters]
    with pytest.warns(RuntimeWarning, match="rose from"):
        _guarded_step(model, opt, batches[1])
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-5)  # undone by subtracting the step
    for ad, h in zip(opt.adapters, H_g):
        assert torch.equal(opt.state[ad.weight]["output"]["H_g"], h)  # no pair from the rejected step
    stats = opt.statistics()
    assert stats["qn/steps_rejected"] == 1 and stats["qn/loss_checks"] == 1
    assert stats["qn/step_backoff"] == 0.5
    assert all(p.grad is not None for p in model.parameters())  # the user's gradients are restored


def test_loss_guard_checks_and_keeps_a_good_step_on_a_hard_batch():
    """A batch whose loss is far above the running average triggers the check (one more pass at the old
    point); the step lowers that batch's loss, so it is redone and the run equals an unguarded one."""
    runs = {}
    for guard in (0.25, None):
        torch.manual_seed(0)
        model = mlp()
        opt = hf_qn.KBFGS(model, preset="paper", lr=0.05, damping=0.3, max_loss_increase=guard)
        batches = regression_batches(3)
        _guarded_step(model, opt, batches[0])
        _guarded_step(model, opt, batches[1], loss_scale=100.0)  # a hard batch: 100x the loss
        _guarded_step(model, opt, batches[2])
        runs[guard] = (model, opt)
    (m1, o1), (m0, o0) = runs[0.25], runs[None]
    assert o1.statistics()["qn/loss_checks"] == 1 and o1.statistics()["qn/steps_rejected"] == 0
    assert o0.statistics()["qn/loss_checks"] == 0
    for p, q in zip(m1.parameters(), m0.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # redo = subtract and add the step back
    for a1, a0 in zip(o1.adapters, o0.adapters):
        torch.testing.assert_close(o1.state[a1.weight]["output"]["H_g"], o0.state[a0.weight]["output"]["H_g"])


def test_loss_guard_keeps_the_paper_lr_finite_on_a_blowup():
    """lr far beyond stability: without the guard the loss explodes; with it, every parameter stays finite and
    the final loss is within a small factor of the first."""
    torch.manual_seed(0)
    batches = regression_batches(20)
    finals = {}
    for guard in (0.25, None):
        torch.manual_seed(0)
        model = mlp()
        opt = hf_qn.KBFGS(model, preset="paper", lr=30.0, damping=0.3, max_loss_increase=guard)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            losses = [_guarded_step(model, opt, b) for b in batches]
        finals[guard] = losses
        if guard is not None:
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
            assert opt.statistics()["qn/steps_rejected"] > 0
    assert max(finals[0.25]) < 10 * finals[0.25][0]
    assert max(finals[None]) > 10 * finals[None][0]


def _falls(model, opt, batches, loss_fn, steps_frac=0.5):
    losses = loop(model, opt, batches, loss_fn)
    k = max(2, int(len(losses) * 0.2))
    assert sum(losses[-k:]) / k < steps_frac * sum(losses[:k]) / k, losses


@pytest.mark.parametrize("cls", [hf_qn.KBFGS, hf_qn.KBFGSL])
def test_loss_falls_mlp_and_cnn(cls):
    torch.manual_seed(0)
    x, y = digits_tensors(256)
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)] * 5
    ce = nn.CrossEntropyLoss()
    model = SmallCNN()
    _falls(model, cls(model, lr=0.3), batches, lambda m, b: ce(m(b[0]), b[1]))
    flat = [(a.flatten(1), b) for a, b in batches]
    model2 = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    _falls(model2, cls(model2, lr=1.0), flat, lambda m, b: ce(m(b[0]), b[1]), 0.8)


@pytest.mark.parametrize("cls", [hf_qn.KBFGS, hf_qn.KBFGSL])
def test_loss_falls_gpt2_conv1d_tied_and_bert_embedding(cls):
    torch.manual_seed(0)
    gpt = tiny_gpt2()
    batch = token_batch(8, 16)
    opt = cls(gpt)  # the defaults: grafted, consecutive pairs, the tied head one-sided
    assert any(type(a).__name__ == "Conv1DAdapter" for a in opt.adapters)
    assert any(a.tied_with == "transformer.wte" for a in opt.adapters)
    _falls(gpt, opt, [batch] * 15, lambda m, b: m(**b, labels=b["input_ids"]).loss, 0.85)
    bert = tiny_bert()
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    opt = cls(bert, policy=hf_qn.LayerPolicy(adapt_embeddings=True))  # the diagonal input factor at work
    assert any(type(a).__name__ == "EmbeddingAdapter" for a in opt.adapters)
    _falls(bert, opt, [batch] * 15, lambda m, b: m(**b, labels=labels).loss, 0.85)


def test_bf16_matmuls_follow_the_float32_run_and_keep_float32_state():
    """matmul_dtype=bfloat16 only changes the rounding of the Gram and direction products: the state stays
    float32, the hyperparameter is a string in the state dict (weights_only), and 24 steps on a regression
    problem stay within bf16's few-digit accuracy of the float32 run."""
    batches = regression_batches(8)

    def full_loss(model):
        with torch.no_grad():
            return sum(float(mse_loss(model, b)) for b in batches) / len(batches)

    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = mlp()
        before = full_loss(model)
        opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, matmul_dtype=dtype)
        losses = loop(model, opt, batches * 3, mse_loss)
        runs[dtype] = (model, opt, losses, before, full_loss(model))
    (m32, _, l32, _, after32), (m16, o16, l16, before, after16) = runs[torch.float32], runs[torch.bfloat16]
    assert after16 < 0.9 * before
    # a CPU with native bf16 (AMX) rounds its products differently: 1.1 % at the end, 2.3 % at one step
    assert abs(after16 - after32) < 0.02 * after32
    torch.testing.assert_close(torch.tensor(l16), torch.tensor(l32), rtol=3e-2, atol=0)
    for p32, p16 in zip(m32.parameters(), m16.parameters()):
        assert (p16 - p32).norm() < 0.1 * p32.norm()  # up to 6.7 % after 24 steps with AMX's bf16 products
        assert not torch.equal(p16, p32)  # the option really changed the arithmetic
    for st in o16.state.values():
        for k, v in iter_tensors(st):
            if v.is_floating_point():
                assert v.dtype == torch.float32, k
    sd = roundtrip(o16.state_dict())
    assert sd["param_groups"][0]["matmul_dtype"] == "bfloat16"
    fresh = hf_qn.KBFGS(m16, preset="paper")  # float32 by default; the loaded group switches the capture to bf16
    fresh.load_state_dict(sd)
    assert fresh.capture.gram_dtype == torch.bfloat16


@pytest.mark.parametrize("interval", [1, 3])
def test_kbfgsl_kept_compact_matrix_is_never_stale(interval):
    """K-BFGS(L) keeps each layer's compact-form middle matrix until that layer's next push; a run that
    rebuilds it at every use takes bitwise the same steps, through ring wrap-around (history 2) and an
    interval mode whose ordinary steps reuse it; a reload drops what was kept."""
    batches = regression_batches(14)
    runs = []
    for rebuild in (False, True):
        torch.manual_seed(0)
        model = mlp()
        opt = hf_qn.KBFGSL(model, preset="paper", lr=0.1, history_size=2, update_interval=interval, warmup_curvature_steps=0)
        calls = {"n": 0}
        for la in opt.layers:
            apply = la.output.apply

            def counting_apply(X, side=la.output, apply=apply, rebuild=rebuild):
                calls["n"] += 1
                if rebuild:
                    side._middle = None
                return apply(X)

            la.output.apply = counting_apply
        loop(model, opt, batches[:7], mse_loss)
        for la in opt.layers:
            la.output.apply(torch.zeros(la.adapter.d_out))
        assert all(la.output._middle is not None for la in opt.layers)
        opt.load_state_dict(roundtrip(opt.state_dict()))
        assert all(la.output._middle is None for la in opt.layers)
        loop(model, opt, batches[7:], mse_loss)
        assert calls["n"] > 0
        assert opt.statistics()["qn/pairs_accepted"] > 2 * len(opt.adapters)  # the ring wrapped
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_renamed_hyperparameters_still_work_with_a_warning():
    """One name per concept: K-BFGS's ``momentum``, ``weight_decay`` and ``stat_decay`` are now ``grad_decay``,
    ``l2`` and ``factor_decay``; the old names map onto them with a FutureWarning."""
    with pytest.warns(FutureWarning, match="'momentum' is now called 'grad_decay'"):
        opt = hf_qn.KBFGS(mlp(), preset="paper", momentum=0.8, weight_decay=1e-3, stat_decay=0.7)
    assert (opt.config.grad_decay, opt.config.l2, opt.config.factor_decay) == (0.8, 1e-3, 0.7)
    with pytest.raises(TypeError, match="both 'momentum' and its new name 'grad_decay'"):
        hf_qn.KBFGS(mlp(), preset="paper", momentum=0.8, grad_decay=0.8)
    with pytest.raises(TypeError, match="Unknown KBFGS hyperparameter.*'betas'"):
        hf_qn.KBFGS(mlp(), preset="paper", betas=(0.9, 0.99))


def _layer_matrix(layer: nn.Linear, grad: bool = False) -> torch.Tensor:
    """``[W | b]`` (or its gradient) as the canonical matrix of a Linear layer, in float64."""
    w, b = (layer.weight.grad, layer.bias.grad) if grad else (layer.weight, layer.bias)
    return torch.cat([w, b[:, None]], dim=1).detach().double()


class _AdamLengths:
    """Float64 reference of Adam's step length per layer, ``lr·‖m̂ / (√v̂ + ε)‖``, over the gradients seen."""

    def __init__(self, layers: list[nn.Linear], rho: float, beta2: float, eps: float) -> None:
        self.layers, self.rho, self.beta2, self.eps = layers, rho, beta2, eps
        self.t = [0] * len(layers)  # each layer's own step count (a paused layer does not step)
        self.m = [torch.zeros_like(_layer_matrix(la)) for la in layers]
        self.v = [torch.zeros_like(x) for x in self.m]

    def observe(self) -> None:
        """Take the current gradients of the layers that have one into ``m`` and ``v`` (one step)."""
        for i, la in enumerate(self.layers):
            if la.weight.grad is None:
                continue
            self.t[i] += 1
            G = _layer_matrix(la, grad=True)
            self.m[i] = self.rho * self.m[i] + (1 - self.rho) * G
            self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * G * G

    def length(self, i: int, lr: float) -> torch.Tensor:
        t = self.t[i]
        return lr * (self.m[i] / (1 - self.rho**t) / ((self.v[i] / (1 - self.beta2**t)).sqrt() + self.eps)).norm()


def test_adam_grafting_takes_adams_step_length_per_layer_and_keeps_the_direction():
    """graft="adam": every layer moves by lr·‖m̂/(√v̂+ε)‖ (Adam's step length, from a float64 reference of the
    gradients seen), in the direction of the plain K-BFGS step; the fallback's lr defaults to lr."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    plain_model = copy.deepcopy(model)
    kw = {"lr": 3e-3, "l2": 0.0, "max_loss_increase": None}
    opt = hf_qn.KBFGS(model, preset="paper", graft="adam", **kw)
    plain = hf_qn.KBFGS(plain_model, preset="paper", **kw)
    assert {g["lr"] for g in opt.param_groups} == {3e-3}  # one lr for the layers and the fallback
    rho, beta2, eps = opt.config.grad_decay, opt.config.fallback_betas[1], opt.config.fallback_eps
    layers = [model[0], model[3]]
    adam = _AdamLengths(layers, rho, beta2, eps)
    for t, batch in enumerate(regression_batches(5), start=1):
        before = [_layer_matrix(la) for la in layers]
        opt.zero_grad()
        mse_loss(model, batch).backward()
        adam.observe()
        opt.step(lambda batch=batch: mse_loss(model, batch).backward())
        for i, la in enumerate(layers):
            expected = adam.length(i, 3e-3)
            moved = (_layer_matrix(la) - before[i]).norm()
            torch.testing.assert_close(moved, expected, rtol=1e-4, atol=0.0)
        if t == 1:  # same start, same batch: the grafted step is the plain one rescaled, layer by layer
            plain_before = [_layer_matrix(la) for la in (plain_model[0], plain_model[3])]
            plain.zero_grad()
            mse_loss(plain_model, batch).backward()
            plain.step(lambda batch=batch: mse_loss(plain_model, batch).backward())
            for i, la in enumerate((plain_model[0], plain_model[3])):
                d_plain = _layer_matrix(la) - plain_before[i]
                d_graft = _layer_matrix(layers[i]) - before[i]
                cos = (d_plain * d_graft).sum() / (d_plain.norm() * d_graft.norm())
                assert float(cos) > 1 - 1e-5
    assert set(flat_state(opt, model[0].weight)) >= {"graft/exp_avg_sq", "graft/steps"}
    assert int(opt.state[model[0].weight]["graft"]["steps"]) == 5


def test_the_l2_terms_of_all_layers_are_added_together_as_each_layers_own_sum():
    """grads_with_l2 (two multi-tensor kernels for every layer's ∇W̄ + τ W̄) gives each layer exactly the sum
    taken layer by layer in the canonical layout: a weight and bias with different τ (the no-decay split), a
    layer without a bias, a layer without L2, a convolution, and a bias whose gradient is None."""
    from hf_qn.optim.kbfgs_layer import grads_with_l2

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 2), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 4, bias=False),
                          nn.Linear(4, 2))
    opt = hf_qn.KBFGS(model)
    model(torch.randn(8, 1, 3, 3)).square().mean().backward()
    model[5].bias.grad = None
    l2s = [[1e-3, 1e-3], [1e-2, 0.0], [1e-2], [0.0, 0.0]]
    got = grads_with_l2(opt.layers, l2s)
    for la, l2, G in zip(opt.layers, l2s, got):
        ad = la.adapter
        taus = torch.full((ad.d_in,), l2[0])
        if len(l2) == 2:
            taus[-1] = l2[1]
        expected = ad.grad_matrix().float() + ad.param_matrix().float() * taus
        assert G.dtype == torch.float32 and torch.equal(G, expected), ad.name
    assert torch.equal(got[3], opt.layers[3].adapter.grad_matrix())  # no L2: the gradient itself, bias zeros


def test_adam_grafting_counts_each_layers_own_steps_when_a_layer_was_paused():
    """A layer frozen for the first steps (no gradient: paused) has fewer Adam steps than the others; each
    layer's length is still lr·‖m̂/(√v̂+ε)‖ with its own bias correction, in steps where layers of both counts
    are grafted together."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))
    opt = hf_qn.KBFGS(model, preset="paper", graft="adam", pairs="consecutive", lr=3e-3, l2=0.0,
                      max_loss_increase=None)
    rho, beta2, eps = opt.config.grad_decay, opt.config.fallback_betas[1], opt.config.fallback_eps
    layers = [model[0], model[3]]
    adam = _AdamLengths(layers, rho, beta2, eps)
    for t, batch in enumerate(regression_batches(5), start=1):
        model[3].requires_grad_(t > 2)
        before = [_layer_matrix(la) for la in layers]
        opt.zero_grad()
        mse_loss(model, batch).backward()
        adam.observe()
        opt.step()
        for i, la in enumerate(layers):
            moved = (_layer_matrix(la) - before[i]).norm()
            expected = adam.length(i, 3e-3) if adam.t[i] else torch.zeros((), dtype=torch.float64)
            torch.testing.assert_close(moved, expected, rtol=1e-4, atol=0.0)
    assert adam.t == [5, 3]
    assert [int(opt.state[la.weight]["graft"]["steps"]) for la in layers] == [5, 3]


def _check_grafted_rms_steps(
    loss_scale: float = 1.0, polar_steps: int = 0
) -> tuple[hf_qn.KBFGS, nn.Module, list[float]]:
    """Six grafted steps with direction_rms (and ``polar_steps``) on a float64 MLP, each checked against a float64
    reference built from the plain direction D: a twin optimizer without grafting at lr 1 (whose step is −D) sees
    the same parameters and batches (consecutive-batch pairs, so both learn the same factors) and is reset onto the
    grafted run's parameters after every step. The expected step is Adam's length along R = D (1 − ε / (√v̂ + ε)) /
    (√v̂_D + ε), v_D ← β₂ v_D + (1−β₂) D² (v̂: the gradient's Adam second moment); at a step t ≤ polar_steps along
    (1 − w) P / ‖P‖ + w R / ‖R‖, w = (t − 1) / polar_steps, P = (1 − ε / (√v̂ + ε)) · NS(D) (NS: the Newton-Schulz
    polar factor, by a float64 SVD). Returns the optimizer, its model and the median gradient weight of each step
    and layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    kw = {"l2": 0.0, "max_loss_increase": None, "pairs": "consecutive"}
    opt = hf_qn.KBFGS(model, preset="paper", graft="adam", direction_rms=True, polar_steps=polar_steps, lr=1e-2, **kw)
    ref = hf_qn.KBFGS(twin, preset="paper", lr=1.0, **kw)  # graft="none": the step is −1·D
    rho, beta2, eps = opt.config.grad_decay, opt.config.fallback_betas[1], opt.config.fallback_eps
    layers, twin_layers = [model[0], model[3]], [twin[0], twin[3]]
    adam = _AdamLengths(layers, rho, beta2, eps)
    v_D = [torch.zeros_like(x) for x in adam.m]
    weights = []
    for t, batch in enumerate(regression_batches(6, dtype=torch.float64), start=1):
        before = [_layer_matrix(la) for la in layers]
        for o, net in ((opt, model), (ref, twin)):
            o.zero_grad()
            (loss_scale * mse_loss(net, batch)).backward()
        adam.observe()
        opt.step()
        ref.step()
        for i, (la, tw) in enumerate(zip(layers, twin_layers)):
            D = before[i] - _layer_matrix(tw)
            v_D[i] = beta2 * v_D[i] + (1 - beta2) * D * D
            weight = 1 - eps / ((adam.v[i] / (1 - beta2**t)).sqrt() + eps)
            shaped = D * weight / ((v_D[i] / (1 - beta2**t)).sqrt() + eps)
            if t <= polar_steps:
                polar = svd_polar(D, POLAR_ITERATIONS, NEWTON_SCHULZ_QUINTIC) * weight
                w = (t - 1) / polar_steps
                shaped = (1 - w) * polar / polar.norm() + w * shaped / shaped.norm()
            expected = -adam.length(i, 1e-2) * shaped / shaped.norm()
            torch.testing.assert_close(_layer_matrix(la) - before[i], expected, rtol=2e-4, atol=1e-9)
            weights.append(float(weight.median()))
        with torch.no_grad():  # the twin continues from the grafted run's point
            for p, q in zip(twin.parameters(), model.parameters()):
                p.copy_(q)
    return opt, model, weights


@pytest.mark.parametrize("loss_scale", [1.0, 1e-7])
def test_direction_rms_divides_each_entry_by_its_running_rms_before_grafting(loss_scale):
    """direction_rms: D ← D (1 − ε / (√v̂ + ε)) / (√v̂_D + ε), v_D ← β₂ v_D + (1−β₂) D² (v̂: the gradient's Adam
    second moment), then Adam's layer length, against the float64 reference of :func:`_check_grafted_rms_steps`.
    A loss scaled by 1e-7 puts the gradients and directions at the scale of ε, where each of the three ε terms (and
    their bias corrections, which the code folds into ε) moves the step."""
    opt, model, weights = _check_grafted_rms_steps(loss_scale)
    # at the scale of ε the gradient's weight is far from 1 (and the other ε terms as large): the case bites
    assert max(weights) < 0.9 if loss_scale < 1 else min(weights) > 1 - 1e-4
    assert opt.state[model[0].weight]["graft"]["direction_sq"].shape == (8, 7)
    with pytest.raises(ValueError, match="direction_rms=True with graft='none'.*graft='adam'"):
        hf_qn.KBFGS(mlp(), graft="none", direction_rms=True)
    # left unset, it follows graft, also when graft changes a configuration that had it derived
    assert hf_qn.KBFGS(mlp(), graft="none").config.direction_rms is False
    from hf_qn.optim.config import KBFGSConfig

    assert hf_qn.KBFGS(mlp(), config=KBFGSConfig(graft="none"), graft="adam").config.direction_rms is True
    assert hf_qn.KBFGS(mlp(), config=KBFGSConfig(direction_rms=False), lr=1e-3).config.direction_rms is False


def test_polar_steps_orthogonalize_the_first_directions_then_hand_over_to_direction_rms():
    """polar_steps=3: at each layer's step t ≤ 3 the step is Adam's length along (1 − w) P / ‖P‖ + w R / ‖R‖,
    w = (t − 1) / 3, with P the weighted Newton-Schulz polar factor of the plain K-BFGS direction D and R
    direction_rms's shape of D; from step 4 on it is R alone, whose v_D has taken D² at every step (the float64
    reference of :func:`_check_grafted_rms_steps`)."""
    opt, _, _ = _check_grafted_rms_steps(polar_steps=3)
    assert all(la.takes_polar for la in opt.layers)


def test_polar_steps_leave_embeddings_and_one_sided_layers_alone():
    """Muon's split: an embedding (rows are tokens) and a one-sided layer (an LM head wider than max_dim) keep the
    RMS-scaled direction during polar_steps: their first step is bitwise the one without polar_steps, while a
    two-sided layer's is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 12))
    tokens = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(0))
    moved = {}
    for polar in (0, 5):
        net = copy.deepcopy(model)
        opt = hf_qn.KBFGS(net, polar_steps=polar, policy=hf_qn.LayerPolicy(max_dim=8, wide="one_sided", adapt_embeddings=True), lr=1e-2)
        sides = {la.adapter.name: la.takes_polar for la in opt.layers}
        net(tokens).logsumexp(-1).mean().backward()
        opt.step()
        moved[polar] = [(q - p).detach() for p, q in zip(model.parameters(), net.parameters())]
    assert sides == {"0": False, "1": True, "3": False}
    assert torch.equal(moved[0][0], moved[5][0])  # the embedding
    assert not torch.equal(moved[0][1], moved[5][1])  # the two-sided Linear
    assert torch.equal(moved[0][4], moved[5][4])  # the one-sided Linear's weight
    with pytest.raises(ValueError, match="polar_steps=2 with graft='none'.*graft='adam'"):
        hf_qn.KBFGS(mlp(), graft="none", polar_steps=2)
    with pytest.raises(ValueError, match="polar_steps"):
        hf_qn.KBFGS(mlp(), polar_steps=-1)
    assert hf_qn.KBFGS(mlp(), preset="paper", graft="adam").config.polar_steps == 0


def test_polar_steps_run_newton_schulz_in_matmul_dtype(monkeypatch):
    """The polar factor's iterations take the products' dtype (bfloat16 where native under ``"auto"``, as Muon's
    Newton-Schulz): the dtype reaches the iteration, and a bf16 step stays within bf16's rounding of the float32
    one."""
    from hf_qn.optim import kbfgs_layer

    seen: list[list[torch.dtype] | None] = []

    def spy(mats, steps, dtypes=None):
        seen.append(dtypes)
        return polar_each(mats, steps, dtypes)

    monkeypatch.setattr(kbfgs_layer, "polar_each", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    moved = {}
    for dtype in ("float32", "bfloat16"):
        net = copy.deepcopy(model)
        opt = hf_qn.KBFGS(net, polar_steps=5, matmul_dtype=dtype, lr=1e-2)
        net(x).square().mean().backward()
        opt.step()
        moved[dtype] = torch.cat([(q - p).detach().flatten() for p, q in zip(model.parameters(), net.parameters())])
    assert seen == [[torch.float32] * 2, [torch.bfloat16] * 2]
    gap = (moved["bfloat16"] - moved["float32"]).norm() / moved["float32"].norm()
    assert 0 < gap < 5e-2


def test_direction_rms_keeps_a_unit_without_gradient_in_place():
    """An output unit the loss never reads has an identically zero gradient, but ``H_g`` mixes the other units into
    its row of D (without direction_rms that row moves by the mixing alone). direction_rms weights each entry by
    ``1 − ε / (√v̂ + ε)``, zero there up to rounding, so the row stays where Adam leaves it; dividing by the RMS
    alone lifted the mixing to a step as large as the other rows'."""
    torch.manual_seed(0)
    init = mlp((6, 8, 4))
    drift = {}
    for rms in (True, False):
        model = copy.deepcopy(init)
        opt = hf_qn.KBFGS(model, lr=1e-2, l2=0.0, direction_rms=rms)  # an L2 term would be a gradient
        drift[rms] = dead_unit_drift(model, init, opt, regression_batches(40))
    assert drift[False] > 1e-3  # the direction does reach the dead row
    assert drift[True] < 1e-6  # RMS scaling alone: 0.37 (K-BFGS), 0.07 (mL-BFGS)


def test_a_checkpoint_without_direction_rms_is_refused_by_an_optimizer_with_it():
    model = mlp()
    opt = hf_qn.KBFGS(model, direction_rms=False)
    loop(model, opt, regression_batches(2), mse_loss)
    other = hf_qn.KBFGS(copy.deepcopy(model), direction_rms=True)
    with pytest.raises(ValueError, match="written without direction_rms.*direction_rms=False"):
        other.load_state_dict(opt.state_dict())


def test_matmul_dtype_auto_is_bfloat16_only_where_the_device_multiplies_it_natively_and_the_layer_is_large(
    monkeypatch,
):
    from hf_qn.optim import config as config_module

    cpu = torch.device("cpu")
    for flags, expected in ((frozenset({"avx2", "fma"}), torch.float32),
                            (frozenset({"avx2", "avx512_bf16"}), torch.bfloat16),
                            (frozenset({"amx_bf16"}), torch.bfloat16)):
        monkeypatch.setattr(config_module, "_cpu_flags", lambda flags=flags: flags)
        config_module.fast_bf16.cache_clear()
        assert config_module.resolve_matmul_dtype("auto", cpu) is expected
        opt = hf_qn.KBFGS(mlp())
        assert opt.config.matmul_dtype == "auto" and opt._matmul_dtype is expected
        assert hf_qn.KBFGS(mlp(), matmul_dtype="float32")._matmul_dtype is torch.float32  # explicit wins
        assert hf_qn.KBFGS(mlp().double())._matmul_dtype is torch.float32  # a float64 model keeps float32
        # a layer's direction runs in bfloat16 only when it is large enough to gain from it
        big = hf_qn.KBFGS(nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4)))
        assert [la.direction_flops for la in big.layers] == [256 * 257 * 513, 4 * 257 * 261]
        assert [big._matmul_dtype_for(la) for la in big.layers] == [expected, torch.float32]
        small = config_module.AUTO_BF16_MIN_FLOPS - 1
        assert config_module.resolve_matmul_dtype("auto", cpu, flops=small) is torch.float32
        assert config_module.resolve_matmul_dtype("bfloat16", cpu, flops=small) is torch.bfloat16
    config_module.fast_bf16.cache_clear()


def test_paper_preset_is_the_papers_setting_and_keywords_override_it():
    cfg = hf_qn.KBFGS(mlp(), preset="paper", damping=0.1).config
    assert (cfg.lr, cfg.damping, cfg.l2, cfg.update_interval, cfg.graft, cfg.matmul_dtype) == (
        0.3, 0.1, 1e-5, 1, "none", "float32")
    with pytest.raises(ValueError, match="Invalid preset: 'fast'"):
        hf_qn.KBFGS(mlp(), preset="fast")
    with pytest.raises(TypeError, match="both config and preset"):
        hf_qn.KBFGS(mlp(), preset="paper", config=cfg)


class _TiedLM(nn.Module):
    """Embedding -> tanh -> a bias-free head tied to the embedding (a one-layer GPT-2 in miniature)."""

    def __init__(self, vocab: int = 11, width: int = 5) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.wte(ids))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(ids))


def _lm_loss(model, ids):
    return nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def test_tied_head_is_adapted_one_sided_and_wide_layers_follow_the_policy():
    model = _TiedLM()
    a = hf_qn.assign_layers(model)
    assert [(ad.name, ad.one_sided, ad.tied_with) for ad in a.adapters] == [("head", True, "wte")]
    assert a.fallback == [] and a.adapted_parameters() == [model.wte.weight]
    off = hf_qn.assign_layers(model, hf_qn.LayerPolicy(tied_heads=False))
    assert off.adapters == [] and [f.reason for f in off.fallback] == ["tied weight (shared with wte.weight, head.weight)"]
    wide = nn.Sequential(nn.Linear(4, 12), nn.Linear(12, 3), nn.Linear(3, 2))  # d_out 12, d_in 13 > max_dim 10
    one_sided = hf_qn.assign_layers(wide, hf_qn.LayerPolicy(max_dim=10))
    assert [(ad.name, ad.one_sided) for ad in one_sided.adapters] == [("0", True), ("2", False)]
    assert [f.reason for f in one_sided.fallback] == ["factor dimension 13 > max_dim=10"] * 2
    fallback = hf_qn.assign_layers(wide, hf_qn.LayerPolicy(max_dim=10, wide="fallback"))
    assert [ad.name for ad in fallback.adapters] == ["2"] and len(fallback.fallback) == 4
    # K-BFGS turns both on only with grafted step lengths
    assert [ad.name for ad in hf_qn.KBFGS(_TiedLM(), preset="paper", graft="adam").adapters] == ["head"]
    with pytest.raises(ValueError, match="no adaptable layer"):
        hf_qn.KBFGS(_TiedLM(), preset="paper")
    with pytest.raises(ValueError, match="Invalid wide"):
        hf_qn.LayerPolicy(wide="diagonal")


def test_one_sided_tied_head_step_equals_the_float64_reference():
    """First step of a one-sided layer: ΔW = −α (1−ρ) G (A + √λ I)⁻¹ with A = mean h hᵀ of the hidden states
    the head reads and G the tied weight's whole gradient (head and embedding parts); no pair is formed."""
    torch.manual_seed(0)
    model = _TiedLM()
    ids = torch.randint(0, 11, (4, 7))
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1, damping=0.3, max_loss_increase=None, policy=hf_qn.LayerPolicy(tied_heads=True))
    W0 = model.wte.weight.detach().double().clone()
    opt.zero_grad()
    loss = _lm_loss(model, ids)
    loss.backward()
    G = model.wte.weight.grad.double().clone()
    with torch.no_grad():
        h = model.hidden(ids[:, :-1]).reshape(-1, 5).double()
    A = h.T @ h / h.shape[0]
    opt.step(lambda: _lm_loss(model, ids).backward())
    expected = W0 - 0.1 * (1 - 0.9) * G @ torch.linalg.inv(A + 0.3**0.5 * torch.eye(5, dtype=torch.float64))
    torch.testing.assert_close(model.wte.weight.detach().double(), expected, rtol=1e-5, atol=1e-7)
    st = opt.state[model.wte.weight]
    assert st["output"] == {} and int(st["counters"]["pairs_accepted"]) == int(st["counters"]["pairs_skipped"]) == 0


def test_output_side_none_steps_by_the_input_factor_alone_as_the_float64_reference():
    """``output_side="none"``: every layer one-sided, ``H_g = I``. First step of each layer
    ``ΔW = −α (1−ρ) G (A + √λ I)⁻¹`` with ``A = mean x xᵀ`` of its inputs; no output statistics, no output state,
    no pair ever formed; an L-BFGS history is refused with it, and a state of another output side is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    opt = hf_qn.KBFGS(model, preset="paper", output_side="none", pairs="consecutive", lr=0.1, damping=0.3,
                      max_loss_increase=None)
    assert all(la.adapter.one_sided and la.output_gram is None for la in opt.layers)
    W0 = [m.weight.detach().double().clone() for m in (model[0], model[2])]
    inputs = [x.double(), torch.tanh(x @ model[0].weight.T).double()]
    opt.zero_grad()
    mse_loss(model, (x, y)).backward()
    G = [m.weight.grad.double().clone() for m in (model[0], model[2])]
    stats = opt.capture.stats["primary"]  # the input side captured, the output gradients not looked at
    assert all(st.A_sum is not None and st.h_rows == 16 and not st.g_sum.any() and st.grad_calls == 0 for st in stats)
    opt.step()
    for m, w0, g, a in zip((model[0], model[2]), W0, G, inputs):
        A = a.T @ a / a.shape[0]
        expected = w0 - 0.1 * (1 - 0.9) * g @ torch.linalg.inv(A + 0.3**0.5 * torch.eye(A.shape[0], dtype=torch.float64))
        torch.testing.assert_close(m.weight.detach().double(), expected, rtol=1e-5, atol=1e-7)
    loop(model, opt, [(torch.randn(16, 5), torch.randn(16, 3)) for _ in range(4)], mse_loss)
    for m in (model[0], model[2]):
        st = opt.state[m.weight]
        assert st["output"] == {} and int(st["counters"]["pairs_accepted"]) == int(st["counters"]["pairs_skipped"]) == 0
    assert opt.state_dict()["hf_qn"]["output_side"] == "none"
    with pytest.raises(ValueError, match="Invalid history_size: 3 with output_side='none'"):
        hf_qn.KBFGS(model, output_side="none", history_size=3)
    with pytest.raises(ValueError, match="holds 'none' output-side factors.*KBFGS\\(output_side='none'\\)"):
        hf_qn.KBFGS(model, output_side="bfgs").load_state_dict(roundtrip(opt.state_dict()))


def test_a_new_gradient_at_a_freed_gradients_address_counts_as_fresh(monkeypatch):
    """``step(closure)`` after the caller's backward must not run the closure as a first pass: the last step's
    gradient, once freed, can leave its address (so its ``id``) to the new one, which must still count as fresh.
    A first pass would add a second backward into the gradient (seen as a rare flake of the dense reference
    test, whose four gradients all landed at their predecessors' addresses). CPython reuses the address most of
    the time but not always, so the collision is forced: in the optimizer's module every tensor that is not a
    parameter gets one and the same ``id``."""
    import hf_qn.optim.kbfgs as kbfgs_module

    monkeypatch.setattr(kbfgs_module, "id", lambda obj: 0 if isinstance(obj, torch.Tensor)
                        and not isinstance(obj, nn.Parameter) else id(obj), raising=False)
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False)
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.1)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    calls = []

    def closure():
        calls.append(1)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss

    closure()
    opt.step(closure)
    (g,) = torch.autograd.grad(((model(x) - y) ** 2).mean(), [model.weight])
    seen_version = model.weight.grad._version
    model.weight.grad = None  # frees the gradient the step saw ...
    model.weight.grad = g.clone()  # ... and the new one, at the same version, takes its place
    assert model.weight.grad._version == seen_version and kbfgs_module.id(model.weight.grad) == 0
    calls.clear()
    opt.step(closure)
    assert len(calls) == 1  # the second pass only, no first pass
    opt.step(closure)  # the gradient this step saw again, unchanged: not fresh, so a first pass runs
    assert len(calls) == 3


def test_a_factor_converted_for_the_products_follows_every_change_of_the_factor():
    """KroneckerLayer.converted keeps a factor's bfloat16 copy between steps and converts again when the factor
    is written in place or replaced; in the factor's own dtype it is the factor itself."""
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, matmul_dtype="bfloat16")
    loop(model, opt, regression_batches(2), mse_loss, closure=False)
    la = opt.layers[0]
    H_a = la.state["input"]["H_a"]
    first = la.converted("H_a", H_a, torch.bfloat16)
    assert torch.equal(first, H_a.to(torch.bfloat16)) and la.converted("H_a", H_a, torch.bfloat16) is first
    H_a.mul_(2.0)  # written in place
    again = la.converted("H_a", H_a, torch.bfloat16)
    assert again is not first and torch.equal(again, H_a.to(torch.bfloat16))
    other = H_a * 3.0  # replaced
    assert torch.equal(la.converted("H_a", other, torch.bfloat16), other.to(torch.bfloat16))
    assert la.converted("H_a", other, torch.float32) is other
