"""K-BFGS against a dense float64 reference twin: two full steps of a small MLP, by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hf_qn
from hf_qn.linalg import bfgs_inverse_update, double_damping


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _forward_with_preacts(model, x):
    h1 = model[0](x)
    h2 = model[2](torch.tanh(h1))
    return h1, h2


def _loss(out, y):
    return ((out - y) ** 2).sum(1).mean()


def _means(model, x, y):
    """Per layer: homogeneous inputs, mean pre-activation, Σ_rows ∂L/∂h (at the model's parameters)."""
    h1, h2 = _forward_with_preacts(model, x)
    h1.retain_grad()
    h2.retain_grad()
    _loss(h2, y).backward()
    a0 = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    a1 = torch.cat([torch.tanh(h1).detach(), torch.ones(len(x), 1, dtype=x.dtype)], 1)
    grads = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).clone() for m in (model[0], model[2])]
    model.zero_grad(set_to_none=True)
    return [a0, a1], [h1.detach().mean(0), h2.detach().mean(0)], [h1.grad.sum(0), h2.grad.sum(0)], grads


@pytest.mark.parametrize("warm", [0, 3])
def test_steps_match_dense_reference(warm):
    """Four steps; with ``input_warm_start=3`` A is the plain average of the first three batch Grams."""
    lr, lam, rho, tau, beta_a, beta_p, mu1 = 0.2, 0.3, 0.9, 1e-5, 0.9, 0.9, 0.2
    sl = math.sqrt(lam)
    model, ref = _mlp(), _mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=lr, damping=lam, grad_decay=rho, l2=tau, factor_decay=beta_a,
                      pair_decay=beta_p, powell_mu=mu1, input_warm_start=warm)
    n_plain = max(1, warm)  # batches in A's plain average
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
               for _ in range(4)]
    # Reference state
    layers = [ref[0], ref[2]]
    A = [None, None]
    H_a = [None, None]
    H_g = [torch.eye(5, dtype=torch.float64), torch.eye(3, dtype=torch.float64)]
    mom = [torch.zeros(5, 5, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.float64)]
    s_avg = [torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    y_avg = [torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    for step, (x, y) in enumerate(batches):
        # --- hf_qn
        opt.zero_grad()
        _loss(model(x), y).backward()

        def closure():
            loss = _loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        # --- reference twin
        rows, hbar, gbar, grads = _means(ref, x, y)
        directions = []
        for i, m in enumerate(layers):
            A_b = rows[i].T @ rows[i] / len(x)
            if step < n_plain:
                A[i] = A_b if step == 0 else (step * A[i] + A_b) / (step + 1)
                H_a[i] = torch.linalg.inv(A[i] + sl * torch.eye(A[i].shape[0], dtype=torch.float64))
            else:
                A[i] = beta_a * A[i] + (1 - beta_a) * A_b
            W = torch.cat([m.weight, m.bias[:, None]], 1).detach()
            mom[i] = rho * mom[i] + (1 - rho) * (grads[i] + tau * W)
            directions.append(H_g[i] @ mom[i] @ H_a[i])
        with torch.no_grad():
            for m, D in zip(layers, directions):
                m.weight -= lr * D[:, :-1]
                m.bias -= lr * D[:, -1]
        _, hbar2, gbar2, _ = _means(ref, x, y)
        for i, m in enumerate(layers):
            s_avg[i] = beta_p * s_avg[i] + (1 - beta_p) * (hbar2[i] - hbar[i])
            y_avg[i] = beta_p * y_avg[i] + (1 - beta_p) * (gbar2[i] - gbar[i])
            d = double_damping(s_avg[i], y_avg[i], H_g[i] @ y_avg[i], mu1=mu1, mu2=sl)
            H_g[i] = bfgs_inverse_update(H_g[i], d.s, d.y)
            if step >= n_plain:  # Hessian-action BFGS on H_a with the new A
                abar = rows[i].mean(0)
                s_a = H_a[i] @ abar
                y_a = A[i] @ s_a + sl * s_a
                H_a[i] = bfgs_inverse_update(H_a[i], s_a, y_a)
        # --- compare
        for m_opt, m_ref in zip((model[0], model[2]), layers):
            torch.testing.assert_close(m_opt.weight, m_ref.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m_opt.bias, m_ref.bias, rtol=1e-5, atol=1e-6)
        for i, m in enumerate((model[0], model[2])):
            st = opt.state[m.weight]
            torch.testing.assert_close(st["output"]["H_g"].double(), H_g[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(st["input"]["H_a"].double(), H_a[i], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(st["input"]["A"].double(), A[i], rtol=1e-5, atol=1e-6)
    stats = opt.statistics()
    assert stats["qn/pairs_accepted"] == 8  # 2 layers x 4 steps


def test_kbfgsl_equals_kbfgs_while_history_holds_every_pair():
    """With history >= steps and gamma = 1, L-BFGS H_g equals the dense BFGS H_g (both from I)."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)) for _ in range(4)]
    outs = []
    for cls in (hf_qn.KBFGS, hf_qn.KBFGSL):
        model = _mlp()
        opt = cls(model, lr=0.1, damping=0.3, **({"history_size": 10} if cls is hf_qn.KBFGSL else {}))
        for x, y in data:
            opt.zero_grad()
            _loss(model(x), y).backward()
            opt.step(lambda x=x, y=y: _loss(model(x), y).backward())
        outs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
