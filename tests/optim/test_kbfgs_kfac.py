"""K-FAC's output factor (``output_side="kfac"``): against a float64 reference, in the direction, and its refusals.

The reference records each Linear's output gradients with hooks of its own (not hf_qn's capture), forms
``G = E[g gᵀ]`` over rows and its running average in float64, and inverts ``Ĝ + √λ I`` with ``torch.linalg.inv``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hf_qn
from hf_qn.optim.output_side import KFACOutput
from tests._helpers.models import mlp
from tests._helpers.training import lm_loss, loop, mse_loss, regression_batches, roundtrip


def _record_output_grads(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Forward hooks that keep, per Linear, the gradient of its output (rows x d_out) of every backward."""
    grads: dict[str, list[torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            grads[name] = []

            def hook(_m, _i, out, name=name):
                if out.requires_grad:
                    out.register_hook(lambda g: grads[name].append(g.detach().double().clone()))

            mod.register_forward_hook(hook)
    return grads


def _reference_H_g(G: torch.Tensor, sqrt_lam: float) -> torch.Tensor:
    d = G.shape[0]
    return torch.linalg.inv(G / (G.trace() / d) + sqrt_lam * torch.eye(d, dtype=torch.float64))


@pytest.mark.parametrize(("interval", "sizes", "batches", "refreshes"), [
    # every batch: each layer re-inverted after each of 4 batches
    (1, (6, 8, 5, 3), 4, [[1, 2, 3, 4]] * 3),
    # every 3rd batch after the first 3, staggered within each width: three layers of width 5 (phases 0, 1, 2)
    # and one of width 3 (phase 0)
    (3, (6, 5, 5, 5, 3), 8, [[1, 2, 3, 6], [1, 2, 3, 5, 8], [1, 2, 3, 4, 7], [1, 2, 3, 6]]),
])
def test_the_output_factor_is_the_damped_inverse_of_the_running_output_gradient_moment(
    interval, sizes, batches, refreshes
):
    """After every curvature step each layer's ``G`` is the plain first batch's ``E[g gᵀ]`` and then its running
    average with ``factor_decay``; its ``H_g`` is ``(Ĝ + √λ I)⁻¹`` (``Ĝ`` scaled to unit mean eigenvalue) of ``G``
    as it stood at the layer's last re-inversion, held unchanged in between. With ``output_inverse_interval=k`` a
    layer is re-inverted after each of its first ``k`` batches and then after every batch ``n`` with
    ``(n + phase) % k == 0``, its phase being its place among the layers of its width."""
    torch.manual_seed(0)
    model = mlp(sizes=sizes)
    grads = _record_output_grads(model)
    decay, damping = 0.8, 0.3
    opt = hf_qn.KBFGS(model, output_side="kfac", update_interval=1, factor_decay=decay, damping=damping,
                      output_inverse_interval=interval, matmul_dtype="float32")
    assert len(opt.layers) == len(refreshes)
    G_ref: dict[str, torch.Tensor] = {}
    H_ref: dict[str, torch.Tensor] = {}
    for n, batch in enumerate(regression_batches(batches), start=1):
        loop(model, opt, [batch], mse_loss)
        for la, expected in zip(opt.layers, refreshes):
            g = grads[la.name][-1]  # rows x d_out of this step's backward
            G_batch = g.T @ g / g.shape[0]
            G_ref[la.name] = G_batch if n == 1 else decay * G_ref[la.name] + (1 - decay) * G_batch
            if n in expected:  # re-inverted now; else H_g must still be the last inverse
                H_ref[la.name] = _reference_H_g(G_ref[la.name], math.sqrt(damping))
            out = la.state["output"]
            assert isinstance(la.output, KFACOutput) and int(out["batches"]) == n
            torch.testing.assert_close(out["G"].double(), G_ref[la.name], rtol=1e-5, atol=1e-9)
            torch.testing.assert_close(out["H_g"].double(), H_ref[la.name], rtol=2e-5, atol=1e-6)
    assert all(int(la.state["counters"]["pairs_accepted"]) == batches for la in opt.layers)


def test_an_inverse_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="output_inverse_interval"):
        hf_qn.KBFGS(mlp(), output_side="kfac", output_inverse_interval=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_first_direction_uses_the_factor_of_its_own_batch(nesterov):
    """The factor is refreshed before the direction: the first step (no grafting, no guards) moves each layer by
    ``−α H_g ĝ H_a`` with ``ĝ = (1 − ρ) ∇W̄`` (Nesterov's look-ahead ``ρ ĝ + (1 − ρ) ∇W̄ = (1 + ρ)(1 − ρ) ∇W̄``),
    ``H_g`` the reference inverse of this batch's ``Ĝ``."""
    torch.manual_seed(0)
    model = mlp()
    grads = _record_output_grads(model)
    lr, rho, damping = 0.1, 0.9, 0.3
    opt = hf_qn.KBFGS(model, output_side="kfac", graft="none", l2=0.0, lr=lr, grad_decay=rho, damping=damping,
                      update_interval=1, max_update_growth=None, matmul_dtype="float32", nesterov=nesterov)
    weight = (1 - rho) * ((1 + rho) if nesterov else 1.0)
    before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    mse_loss(model, regression_batches(1)[0]).backward()
    grad = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    opt.step()
    for la, (name, mod) in zip(opt.layers, [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]):
        g = grads[name][-1]
        H_g = _reference_H_g(g.T @ g / g.shape[0], math.sqrt(damping))
        G_bar = torch.cat([grad[f"{name}.weight"], grad[f"{name}.bias"][:, None]], 1)
        D = H_g @ (weight * G_bar) @ la.state["input"]["H_a"].double()
        torch.testing.assert_close(mod.weight.detach().double() - before[f"{name}.weight"], -lr * D[:, :-1],
                                   rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(mod.bias.detach().double() - before[f"{name}.bias"], -lr * D[:, -1],
                                   rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("nesterov", [False, True])
def test_nesterov_preconditions_the_look_ahead_of_the_gradient_average(nesterov, monkeypatch):
    """At every step each layer's direction is ``H_g X H_a`` with ``X = ĝ`` (``ĝ ← ρ ĝ + (1 − ρ) G``), or with
    ``nesterov`` the look-ahead ``X = ρ ĝ + (1 − ρ) G`` of the updated ``ĝ`` (float64 reference over four steps), and
    the KL clip pairs each direction with that ``X``."""
    from hf_qn.optim import kbfgs_layer

    torch.manual_seed(0)
    model = mlp()
    rho = 0.8
    opt = hf_qn.KBFGS(model, output_side="kfac", nesterov=nesterov, grad_decay=rho, l2=0.0, lr=0.05, kl_clip=1e-3)
    seen: list[torch.Tensor] = []
    clipped: list[list[torch.Tensor]] = []
    direction, scale = kbfgs_layer.KroneckerLayer.direction, opt.kl_clip.scale
    monkeypatch.setattr(kbfgs_layer.KroneckerLayer, "direction",
                        lambda self, X, dtype: seen.append(X.double().clone()) or direction(self, X, dtype))
    monkeypatch.setattr(opt.kl_clip, "scale",
                        lambda D, X, lrs: clipped.append([x.double().clone() for x in X]) or scale(D, X, lrs))
    avg = [torch.zeros(la.adapter.d_out, la.adapter.d_in, dtype=torch.float64) for la in opt.layers]
    for batch in regression_batches(4):
        seen.clear()
        clipped.clear()
        opt.zero_grad()
        mse_loss(model, batch).backward()
        G = [la.adapter.grad_matrix().double() for la in opt.layers]
        opt.step()
        avg = [rho * a + (1 - rho) * g for a, g in zip(avg, G)]
        want = [rho * a + (1 - rho) * g for a, g in zip(avg, G)] if nesterov else avg
        assert len(seen) == len(want) == 3 and len(clipped) == 1
        for x, k, w in zip(seen, clipped[0], want):
            torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-8)
            torch.testing.assert_close(k, w, rtol=1e-5, atol=1e-8)
    if nesterov:  # the look-ahead differs from the average it is taken of
        assert not torch.allclose(seen[0], avg[0], rtol=1e-3)


def test_blocked_factors_invert_each_diagonal_block_of_the_moment():
    """Above ``max_block_dim`` the factor holds the diagonal blocks of ``G`` (padding zero) and each is inverted
    alone, after the whole factor is scaled by its mean eigenvalue over the layer's ``d_out`` coordinates."""
    torch.manual_seed(0)
    model = mlp(sizes=(6, 8, 5, 3))
    grads = _record_output_grads(model)
    opt = hf_qn.KBFGS(model, output_side="kfac", max_block_dim=3, update_interval=1, matmul_dtype="float32")
    loop(model, opt, regression_batches(1), mse_loss)
    la = opt.layers[0]  # d_out 8: blocks of 3, 3, 2 (+1 padding)
    g = grads[la.name][-1]
    G = g.T @ g / g.shape[0]
    H = la.state["output"]["H_g"].double()
    assert H.shape == (3, 3, 3)
    scale = G.trace() / 8
    for b, (lo, hi) in enumerate(((0, 3), (3, 6), (6, 8))):
        n = hi - lo
        ref = torch.linalg.inv(G[lo:hi, lo:hi] / scale + math.sqrt(0.3) * torch.eye(n, dtype=torch.float64))
        torch.testing.assert_close(H[b, :n, :n], ref, rtol=2e-5, atol=1e-6)


def test_a_non_finite_moment_is_skipped():
    """A batch whose ``E[g gᵀ]`` is not finite leaves ``G`` and its count as they were (the inverse is recomputed
    from the same ``G``). The optimizer never passes one: a non-finite output gradient makes a non-finite
    parameter gradient, and such a step is skipped whole."""
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, output_side="kfac", update_interval=1)
    loop(model, opt, regression_batches(2), mse_loss)
    la = opt.layers[0]
    G, H = la.state["output"]["G"].clone(), la.state["output"]["H_g"].clone()
    from hf_qn.optim.output_side import refresh_kfac_factors

    one_inf = G.clone()
    one_inf[0, -1] = float("inf")
    for bad in (torch.full_like(G, float("nan")), one_inf):
        taken = refresh_kfac_factors([la.output], [bad], 0.9, math.sqrt(0.3))  # type: ignore[list-item]
        assert taken == [False]
    assert torch.equal(la.state["output"]["G"], G) and int(la.state["output"]["batches"]) == 2
    assert torch.isfinite(la.state["output"]["H_g"]).all()
    torch.testing.assert_close(la.state["output"]["H_g"], H, rtol=1e-5, atol=1e-6)  # re-inverted from the same G


def test_kfac_trains_and_refuses_what_it_cannot_do():
    torch.manual_seed(0)
    model = mlp()
    opt = hf_qn.KBFGS(model, output_side="kfac", lr=3e-2)
    losses = loop(model, opt, regression_batches(30), mse_loss)
    # 0.75 -> 0.25 with K-FAC's from-scratch defaults; 0.16 with the earlier values (input_inverse='bfgs',
    # output_inverse_interval=1); AdamW at the same lr: 0.27
    assert losses[-1] < 0.4 * losses[0]
    with pytest.raises(ValueError, match="Invalid output_side: 'shampoo'"):
        hf_qn.KBFGS(model, output_side="shampoo")
    with pytest.raises(ValueError, match="Invalid history_size: 5 with output_side='kfac'"):
        hf_qn.KBFGS(model, output_side="kfac", history_size=5)
    with pytest.raises(ValueError, match="output_side='kfac'"):
        hf_qn.KBFGSL(model, output_side="kfac")
    dense = hf_qn.KBFGS(model)
    with pytest.raises(ValueError, match="'kfac' output-side factors.*KBFGS\\(output_side='kfac'\\)"):
        dense.load_state_dict(roundtrip(opt.state_dict()))
    with pytest.raises(ValueError, match="'dense' output-side factors"):
        hf_qn.KBFGS(model, output_side="kfac").load_state_dict(roundtrip(dense.state_dict()))
    opt.param_groups[0]["output_side"] = "bfgs"
    with pytest.raises(ValueError, match="output_side changed from kfac to bfgs"):
        loop(model, opt, regression_batches(1), mse_loss)


def test_kfac_layers_skip_the_output_means_and_train_bit_for_bit_as_with_them():
    """K-FAC's output factor forms no pairs, so the capture leaves out the output means ``h̄``, ``ḡ`` of its layers
    (two float64 row sums per layer and curvature step): the run is bit for bit the one that takes them. Layers
    that learn from pairs keep them."""
    runs = []
    for means in (None, True):
        torch.manual_seed(0)
        model = mlp()
        opt = hf_qn.KBFGS(model, output_side="kfac", lr=3e-2, update_interval=2)
        assert opt.capture.output_means == [False] * 3
        if means:
            opt.capture.output_means = [True] * 3
        loop(model, opt, regression_batches(8), mse_loss)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert hf_qn.KBFGS(mlp()).capture.output_means == [True] * 3
    assert hf_qn.KBFGSL(mlp(), history_size=3).capture.output_means == [True] * 3


def assert_lockstep(runs: list, batch: dict, steps: int) -> None:
    """Each ``(model, optimizer)`` of ``runs`` takes ``steps`` steps on ``batch`` in turn; the models' weights
    end bit for bit equal."""
    for _ in range(steps):
        for model, opt in runs:
            loop(model, opt, [batch], lm_loss, closure=False)
    first = list(runs[0][0].parameters())
    for model, _ in runs[1:]:
        for p, q in zip(first, model.parameters()):
            assert torch.equal(p, q)


def test_auto_output_side_is_kfac_for_a_transformers_model_built_from_a_config(tmp_path, caplog):
    """The default ``output_side="auto"``: K-FAC's factor for a transformers model built from a config (also inside a
    wrapper), none (``H_g = I``) for the same model loaded from a checkpoint, BFGS's for a plain module, an L-BFGS
    output side and the paper's preset; an explicit choice is kept. The resolved value is what the config, the param groups and the
    checkpoint hold, and the log says which was taken and why."""
    import logging

    from tests._helpers.models import tiny_gpt2, token_batch

    torch.manual_seed(0)
    scratch = tiny_gpt2()
    assert hf_qn.optim.config.KBFGSConfig().output_side == "auto"
    with caplog.at_level(logging.INFO, logger="hf_qn.optim.kbfgs"):
        opt = hf_qn.KBFGS(scratch)
    assert "output_side='auto' is 'kfac' (a transformers model built from a config" in caplog.text
    assert opt.config.output_side == "kfac" and {g["output_side"] for g in opt.param_groups} == {"kfac"}
    assert any(isinstance(la.output, KFACOutput) for la in opt.layers)

    class Wrapper(nn.Module):  # as DDP holds the model (.module)
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert hf_qn.KBFGS(Wrapper(scratch)).config.output_side == "kfac"
    scratch.save_pretrained(tmp_path)
    loaded = type(scratch).from_pretrained(tmp_path)
    assert loaded.name_or_path == str(tmp_path)
    with caplog.at_level(logging.INFO, logger="hf_qn.optim.kbfgs"):
        assert hf_qn.KBFGS(loaded).config.output_side == "none"
    assert "output_side='auto' is 'none' (a transformers model whose name_or_path names a checkpoint" in caplog.text
    # built from a checkpoint's config, it inherits the checkpoint's name: taken for a fine-tune (the safe side)
    from transformers import AutoConfig

    assert hf_qn.KBFGS(type(scratch)(AutoConfig.from_pretrained(tmp_path))).config.output_side == "none"
    assert all(la.adapter.one_sided for la in hf_qn.KBFGS(loaded).layers)
    assert hf_qn.KBFGS(mlp()).config.output_side == "bfgs"
    assert hf_qn.KBFGSL(scratch).config.output_side == "bfgs"
    assert hf_qn.KBFGS(scratch, preset="paper").config.output_side == "bfgs"
    assert hf_qn.KBFGS(scratch, output_side="bfgs").config.output_side == "bfgs"
    assert hf_qn.KBFGS(mlp(), output_side="kfac").config.output_side == "kfac"

    # "auto" on a model built from a config takes exactly the steps of output_side="kfac"
    a, b = tiny_gpt2(), tiny_gpt2()
    b.load_state_dict(a.state_dict())
    batch = token_batch()
    opts = hf_qn.KBFGS(a, update_interval=1), hf_qn.KBFGS(b, output_side="kfac", update_interval=1)
    assert_lockstep(list(zip((a, b), opts)), batch, steps=3)
    assert opts[0].state_dict()["hf_qn"]["output_side"] == "kfac"
    with pytest.raises(ValueError, match="output_side='auto', the default, takes 'kfac' for a transformers model"):
        hf_qn.KBFGS(loaded).load_state_dict(roundtrip(opts[0].state_dict()))


def test_the_from_scratch_defaults_follow_the_output_side(tmp_path):
    """``input_inverse``, ``max_input_rows``, ``fallback_betas``, ``nesterov`` and ``polar_steps`` left unset take
    the pretraining values with K-FAC's output factor (a transformers model built from a config) and the values of
    earlier versions with any other output side (a fine-tune, a plain module, the paper's preset), so that those
    runs keep their steps; an explicit value is kept, and a keyword that changes the output side derives them
    afresh. ``polar_steps`` also follows ``graft``: 0 without the grafting its blend needs. The optimizer's config,
    its param groups, the capture and the fallback's groups take the resolved values."""
    from hf_qn.optim.config import KBFGSConfig
    from tests._helpers.models import tiny_gpt2, token_batch

    scratch_values = {"input_inverse": "cholesky", "max_input_rows": 512, "fallback_betas": (0.9, 0.95),
                      "nesterov": True, "polar_steps": 40}
    earlier_values = {"input_inverse": "bfgs", "max_input_rows": None, "fallback_betas": (0.9, 0.999),
                      "nesterov": False, "polar_steps": 0}

    def values(cfg: KBFGSConfig) -> dict:
        return {name: getattr(cfg, name) for name in scratch_values}

    assert values(KBFGSConfig()) == {**dict.fromkeys(scratch_values, "auto"), "nesterov": None,
                                     "polar_steps": None}  # resolved with the model
    # polar_steps follows graft too, both ways, whether or not the output side is resolved yet
    assert KBFGSConfig(graft="none").polar_steps == KBFGSConfig(output_side="kfac", graft="none").polar_steps == 0
    assert KBFGSConfig.from_kwargs(KBFGSConfig(output_side="kfac"), graft="none").polar_steps == 0
    assert KBFGSConfig.from_kwargs(KBFGSConfig(output_side="kfac", graft="none"), graft="adam").polar_steps == 40
    assert KBFGSConfig.from_kwargs(KBFGSConfig(graft="none"), graft="adam").polar_steps is None
    assert KBFGSConfig.from_kwargs(KBFGSConfig(output_side="kfac", polar_steps=8), lr=1.0).polar_steps == 8
    with pytest.raises(ValueError, match="Invalid polar_steps=40 with graft='none'"):
        KBFGSConfig(output_side="kfac", graft="none", polar_steps=40)
    assert values(KBFGSConfig(output_side="kfac")) == scratch_values
    assert values(KBFGSConfig(output_side="none")) == values(KBFGSConfig(output_side="bfgs")) == earlier_values
    assert values(KBFGSConfig.from_kwargs(preset="paper")) == earlier_values
    assert values(KBFGSConfig.from_kwargs(KBFGSConfig(output_side="kfac"), output_side="none")) == earlier_values
    kept = KBFGSConfig(output_side="kfac", input_inverse="bfgs", max_input_rows=None, fallback_betas=(0.8, 0.99),
                       nesterov=False, polar_steps=8)
    assert values(kept) == {"input_inverse": "bfgs", "max_input_rows": None, "fallback_betas": (0.8, 0.99),
                            "nesterov": False, "polar_steps": 8}
    # a value given in a config whose output side is not resolved yet was given, not derived: a keyword that sets
    # the output side keeps it
    assert KBFGSConfig.from_kwargs(KBFGSConfig(max_input_rows=256), output_side="kfac").max_input_rows == 256
    with pytest.raises(ValueError, match="Invalid max_input_rows: 'all'"):
        KBFGSConfig(max_input_rows="all")
    with pytest.raises(ValueError, match="Invalid nesterov: 'yes' \\(must be None, True or False\\)"):
        KBFGSConfig(nesterov="yes")

    torch.manual_seed(0)
    scratch = tiny_gpt2()
    scratch.save_pretrained(tmp_path)
    loaded = type(scratch).from_pretrained(tmp_path)
    for model, expected in ((scratch, scratch_values), (loaded, earlier_values), (mlp(), earlier_values)):
        opt = hf_qn.KBFGS(model)
        assert values(opt.config) == expected
        groups = [g for g in opt.param_groups if "input_inverse" in g]
        assert groups and all({k: g[k] for k in scratch_values} == expected for g in groups)
        assert {tuple(g["betas"]) for g in opt.param_groups if "betas" in g} <= {expected["fallback_betas"]}
        opt._schedule_capture()
        assert opt.capture.max_input_rows == expected["max_input_rows"]

    # the default on a model built from a config takes exactly the steps of the explicit from-scratch values
    a, b = tiny_gpt2(), tiny_gpt2()
    b.load_state_dict(a.state_dict())
    batch = token_batch()
    opts = (hf_qn.KBFGS(a, update_interval=1),
            hf_qn.KBFGS(b, output_side="kfac", update_interval=1, inverse_interval=2, **scratch_values))
    assert_lockstep(list(zip((a, b), opts)), batch, steps=3)

    # a checkpoint saved with the earlier values continues exactly in an optimizer built with the new defaults: the
    # values live in its param groups, and the configuration follows them; one written before polar_steps existed
    # (its groups without the field) resumes without the blend it was trained without
    earlier = hf_qn.KBFGS(a, update_interval=1, output_inverse_interval=1, **earlier_values)
    loop(a, earlier, [batch] * 2, lm_loss, closure=False)
    b.load_state_dict(a.state_dict())
    resumed = hf_qn.KBFGS(b, update_interval=1)
    saved = roundtrip(earlier.state_dict())
    for g in saved["param_groups"]:
        del g["polar_steps"]
    resumed.load_state_dict(saved)
    assert values(resumed.config) == earlier_values and resumed.config.output_inverse_interval == 1
    assert_lockstep([(a, earlier), (b, resumed)], batch, steps=2)


def test_the_default_lr_follows_the_model(tmp_path):
    """``lr=None`` (the default) is resolved by ``KBFGS(model, ...)``: 6e-3 for a language model trained from
    scratch (an output embedding and K-FAC's output factor) up to a hidden size of 128, ``6e-3 * 128 / width``
    for a wider one, 3e-3 for anything else (a fine-tune, a classifier built from a config, a plain module, another
    output side, K-BFGS(L)); a given lr and the paper's preset keep theirs. The param groups, the fallback's and
    the config carry the resolved value."""
    from hf_qn.optim.config import KBFGSConfig
    from hf_qn.optim.kbfgs import model_width, pretraining_lr
    from tests._helpers.models import tiny_gpt2, tiny_llama, tiny_vit, token_batch

    assert KBFGSConfig().lr is None and KBFGSConfig(output_side="kfac").lr is None
    with pytest.raises(ValueError, match="lr=None follows the model"):
        _ = KBFGSConfig().fallback_lr_value
    assert KBFGSConfig(lr=0.01).fallback_lr_value == 0.01
    torch.manual_seed(0)
    scratch = tiny_gpt2()
    scratch.save_pretrained(tmp_path)
    loaded = type(scratch).from_pretrained(tmp_path)
    assert [pretraining_lr(w) for w in (None, 32, 128, 256, 768)] == [6e-3, 6e-3, 6e-3, 3e-3, 1e-3]
    wide = tiny_gpt2(n_embd=256, n_layer=1)  # the width of a GPT-2 (n_embd) and of a Llama (hidden_size)
    assert model_width(wide) == 256 and model_width(tiny_llama(hidden=192)) == 192 and model_width(mlp()) is None
    llama = tiny_llama(hidden=256)  # untied: its input embedding's fallback groups run at lr / 0.1
    cases = [(scratch, {}, 6e-3), (wide, {}, 3e-3), (llama, {}, 3e-3),
             (wide, {"output_side": "none"}, 3e-3), (loaded, {}, 3e-3), (tiny_vit(), {}, 3e-3), (mlp(), {}, 3e-3),
             (scratch, {"output_side": "bfgs"}, 3e-3), (scratch, {"lr": 0.02}, 0.02),
             (scratch, {"preset": "paper"}, 0.3)]
    for model, kwargs, lr in cases:
        opt = hf_qn.KBFGS(model, **kwargs)
        assert opt.config.lr == lr, kwargs
        fallback_lr = lr if opt.config.graft == "adam" else 1e-3  # the paper's preset: no grafting
        embedding_lr = {lr / 0.1} if model is llama else set()
        assert {g["lr"] for g in opt.param_groups} == {lr, fallback_lr, *embedding_lr}
    assert hf_qn.KBFGSL(scratch).config.lr == 3e-3  # an L-BFGS output side: not the K-FAC pretraining setting
    # the default takes exactly the steps of the explicit value
    a, b = tiny_gpt2(), tiny_gpt2()
    b.load_state_dict(a.state_dict())
    assert_lockstep([(a, hf_qn.KBFGS(a, update_interval=1)), (b, hf_qn.KBFGS(b, update_interval=1, lr=6e-3))],
                    token_batch(), steps=2)


def test_the_default_curvature_warm_up_follows_the_output_side(tmp_path):
    """``warmup_curvature_steps=None`` (the default): 20 curvature steps where an output factor is learned (BFGS,
    L-BFGS, K-FAC), 1 without one (``output_side="none"``, the fine-tune default: curvature at the first step
    and then every ``update_interval``-th), resolved with ``output_side``;
    an explicit value and the paper's preset keep theirs; a keyword that changes the output side derives it
    afresh; the schedule and the param groups take the resolved value."""
    from hf_qn.optim.config import KBFGSConfig
    from tests._helpers.models import tiny_gpt2

    assert KBFGSConfig().warmup_curvature_steps is None  # "auto": resolved with the model
    with pytest.raises(ValueError, match="warmup_curvature_steps=None follows output_side"):
        _ = KBFGSConfig().warmup_steps
    assert {side: KBFGSConfig(output_side=side).warmup_steps for side in ("bfgs", "kfac", "none")} == {
        "bfgs": 20, "kfac": 20, "none": 1}
    assert KBFGSConfig(output_side="none", warmup_curvature_steps=7).warmup_steps == 7
    assert KBFGSConfig.from_kwargs(KBFGSConfig(output_side="bfgs"), output_side="none").warmup_steps == 1
    assert KBFGSConfig.from_kwargs(preset="paper", output_side="none").warmup_steps == 20  # the preset's own
    torch.manual_seed(0)
    scratch = tiny_gpt2()
    scratch.save_pretrained(tmp_path)
    loaded = type(scratch).from_pretrained(tmp_path)
    for model, side, warmup in ((scratch, "kfac", 20), (loaded, "none", 1), (mlp(), "bfgs", 20)):
        opt = hf_qn.KBFGS(model)
        assert (opt.config.output_side, opt.schedule.warmup) == (side, warmup)
        assert {g["warmup_curvature_steps"] for g in opt.param_groups} == {warmup}
        due = []
        for _ in range(12):
            due.append(opt.schedule.due())
            opt.schedule.advance()
        assert [t for t, d in enumerate(due) if d] == (list(range(12)) if warmup == 20 else [0, 5, 10])
    assert hf_qn.KBFGS(loaded, warmup_curvature_steps=20).schedule.warmup == 20
    with pytest.raises(ValueError, match="warmup_curvature_steps"):
        hf_qn.KBFGS(loaded, warmup_curvature_steps=-1)
