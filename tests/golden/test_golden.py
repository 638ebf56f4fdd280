"""The optimizers' numbers do not move: every variant of ``variants.py`` re-run bit for bit against the
recorded goldens, and every committed checkpoint resumed to the recorded continuation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.golden.variants import (
    CHECKPOINTED,
    PROBLEMS,
    THREADS,
    VARIANTS,
    environment,
    recorded_for,
    resume_from_committed_checkpoint,
    run,
)

HERE = Path(__file__).parent
RECORDINGS = [json.loads(f.read_text()) for f in sorted(HERE.glob("trajectories*.json"))]
GOLDEN = next((g for g in RECORDINGS if recorded_for(g["environment"], environment())), {"runs": {}, "resumed": {}})


@pytest.fixture(autouse=True)
def _same_kernels():
    if "environment" not in GOLDEN:
        recorded = [g["environment"] for g in RECORDINGS]
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
    """State written by the code of the first recording (``checkpoints_v1.pt``) loads and continues exactly."""
    assert resume_from_committed_checkpoint(variant) == GOLDEN["resumed"][variant]
