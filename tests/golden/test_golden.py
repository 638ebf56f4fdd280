"""The optimizers' numbers do not move: every variant of ``variants.py`` re-run bit for bit against the
recorded goldens, and every committed checkpoint resumed to the recorded continuation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._helpers.training import loop
from tests.golden.variants import (
    CHECKPOINTED,
    PROBLEMS,
    RESUME_AT,
    THREADS,
    VARIANTS,
    environment,
    hexes,
    needs_closure,
    param_hash,
    problem,
    run,
)

HERE = Path(__file__).parent
GOLDEN = json.loads((HERE / "trajectories.json").read_text())


@pytest.fixture(autouse=True)
def _same_kernels():
    recorded = GOLDEN["environment"]
    if environment() != recorded:
        pytest.skip(f"goldens were recorded with {recorded}, this machine is {environment()}: bits may differ")
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("prob", PROBLEMS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trajectory_is_bitwise_golden(variant, prob):
    assert run(variant, prob) == GOLDEN["runs"][f"{variant}/{prob}"]


def test_every_variant_has_a_golden():
    assert set(GOLDEN["runs"]) == {f"{v}/{p}" for v in VARIANTS for p in PROBLEMS}
    assert set(GOLDEN["resumed"]) == set(CHECKPOINTED)


@pytest.mark.parametrize("variant", CHECKPOINTED)
def test_committed_checkpoint_resumes_to_the_golden_continuation(variant):
    """State written by the code of the recording (``checkpoints_v1.pt``) loads and continues exactly."""
    saved = torch.load(HERE / "checkpoints_v1.pt", weights_only=True)[variant]
    model, batches, loss_fn = problem("mlp")
    model.load_state_dict(saved["model"])
    opt = VARIANTS[variant](model)
    opt.load_state_dict(saved["optimizer"])
    losses = loop(model, opt, batches[RESUME_AT:], loss_fn, closure=needs_closure(variant))
    assert {"losses": hexes(losses), "params": param_hash(model)} == GOLDEN["resumed"][variant]
