"""The optimizers' numbers do not move: every variant of ``variants.py`` re-run bit for bit against the
recorded goldens, and every committed checkpoint resumed to the recorded continuation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.golden.variants import (
    CHECKPOINTED,
    PROBLEMS,
    THREADS,
    VARIANTS,
    environment,
    read_recordings,
    recording_for,
    resume_from_committed_checkpoint,
    run,
)

HERE = Path(__file__).parent
RECORDINGS = read_recordings(HERE)
APPLIES = recording_for({name: rec["environment"] for name, rec in RECORDINGS.items()}, environment())
GOLDEN = RECORDINGS[APPLIES] if APPLIES else {"runs": {}, "resumed": {}}


@pytest.fixture(autouse=True)
def _same_kernels():
    if "environment" not in GOLDEN:
        recorded = [g["environment"] for g in RECORDINGS.values()]
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
