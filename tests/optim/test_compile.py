"""A torch.compile'd model works with both optimizers (hooks registered before compiling fire)."""

from __future__ import annotations

import copy

import torch

import hf_qn
from tests._helpers.models import mlp
from tests._helpers.training import loop, mse_loss, regression_batches


def test_kbfgs_and_mlbfgs_on_a_compiled_model_match_eager():
    torch.manual_seed(0)
    eager = mlp()
    comp_src = copy.deepcopy(eager)
    batches = regression_batches(4)
    for make in (lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1), lambda m: hf_qn.MLBFGS(m, lr=0.05, update_interval=2)):
        a, b = copy.deepcopy(eager), copy.deepcopy(comp_src)
        opt_a, opt_b = make(a), make(b)  # built on the plain module, as the Trainer does before prepare
        compiled = torch.compile(b, backend="eager")
        loop(a, opt_a, batches, mse_loss)
        loop(compiled, opt_b, batches, mse_loss)
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
