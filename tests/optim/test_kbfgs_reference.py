"""K-BFGS against a dense float64 reference twin: four full steps of a small MLP, by hand; also with
block-diagonal factors, where the twin keeps dense matrices and updates each diagonal block on its own."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import hf_qn
from hf_qn.linalg import bfgs_inverse_update, double_damping
from hf_qn.linalg.blocks import block_diagonal


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _forward_with_preacts(model, x):
    h1 = model[0](x)
    h2 = model[2](torch.tanh(h1))
    return h1, h2


def _loss(out, y):
    return ((out - y) ** 2).sum(1).mean()


def _blocks(d, max_block):
    """Index ranges of the diagonal blocks: the fewest equal blocks of at most ``max_block``, the last shorter."""
    if max_block is None or d <= max_block:
        return [slice(0, d)]
    n = -(-d // max_block)
    size = -(-d // n)
    return [slice(j * size, min((j + 1) * size, d)) for j in range(n)]


def _block_mask(M, blocks):
    """``M`` with everything outside the diagonal blocks set to zero."""
    out = torch.zeros_like(M)
    for b in blocks:
        out[b, b] = M[b, b]
    return out


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


@pytest.mark.parametrize("warm, max_block", [(0, None), (3, None), (0, 2), (3, 2)])
def test_steps_match_dense_reference(warm, max_block):
    """Four steps; with ``input_warm_start=3`` A is the plain average of the first three batch Grams. With
    ``max_block_dim=2`` every factor is block-diagonal (5 -> 3 blocks of 2, the last padded; 6 -> 3 of 2; 3 -> 2):
    ``A`` keeps only its diagonal blocks and every block of ``H_g`` and ``H_a`` is damped, tested and updated
    from its own part of the pair."""
    lr, lam, rho, tau, beta_a, beta_p, mu1 = 0.2, 0.3, 0.9, 1e-5, 0.9, 0.9, 0.2
    sl = math.sqrt(lam)
    model, ref = _mlp(), _mlp()
    opt = hf_qn.KBFGS(model, preset="paper", lr=lr, damping=lam, grad_decay=rho, l2=tau, factor_decay=beta_a,
                      pair_decay=beta_p, powell_mu=mu1, input_warm_start=warm, max_block_dim=max_block)
    n_plain = max(1, warm)  # batches in A's plain average
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
               for _ in range(4)]
    # Reference state
    layers = [ref[0], ref[2]]
    out_blocks = [_blocks(5, max_block), _blocks(3, max_block)]
    in_blocks = [_blocks(5, max_block), _blocks(6, max_block)]
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
            A_b = _block_mask(rows[i].T @ rows[i] / len(x), in_blocks[i])
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
            for b in out_blocks[i]:
                H_b = H_g[i][b, b]
                d = double_damping(s_avg[i][b], y_avg[i][b], H_b @ y_avg[i][b], mu1=mu1, mu2=sl)
                H_g[i][b, b] = bfgs_inverse_update(H_b, d.s, d.y)
            if step >= n_plain:  # Hessian-action BFGS on H_a with the new A
                abar = rows[i].mean(0)
                for b in in_blocks[i]:
                    s_a = H_a[i][b, b] @ abar[b]
                    y_a = A[i][b, b] @ s_a + sl * s_a
                    H_a[i][b, b] = bfgs_inverse_update(H_a[i][b, b], s_a, y_a)
        # --- compare
        for m_opt, m_ref in zip((model[0], model[2]), layers):
            torch.testing.assert_close(m_opt.weight, m_ref.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m_opt.bias, m_ref.bias, rtol=1e-5, atol=1e-6)
        for i, m in enumerate((model[0], model[2])):
            st = opt.state[m.weight]
            for key, mine, theirs, dim, tol in (("H_g", st["output"]["H_g"], H_g[i], H_g[i].shape[0], 1e-4),
                                                ("H_a", st["input"]["H_a"], H_a[i], H_a[i].shape[0], 1e-4),
                                                ("A", st["input"]["A"], A[i], A[i].shape[0], 1e-5)):
                assert mine.dim() == (2 if max_block is None else 3), key
                dense = mine if mine.dim() == 2 else block_diagonal(mine, dim)
                torch.testing.assert_close(dense.double(), theirs, rtol=tol, atol=tol / 10)
    stats = opt.statistics()
    n_blocks = sum(len(b) for b in out_blocks)
    assert stats["qn/pairs_accepted"] == 4 * n_blocks  # every block of both layers, 4 steps
    assert stats["qn/pairs_skipped"] == 0


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
