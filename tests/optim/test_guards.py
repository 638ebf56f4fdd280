"""The safeguards around K-BFGS's step, each on its own (``hf_qn.optim.guards``)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from hf_qn.optim.guards import CurvatureSchedule, GrowthGuard, KLClip, LossGuard, StepBackoff


def test_schedule_warmup_interval_and_refresh():
    sched = CurvatureSchedule(interval=3, warmup=2)
    due = []
    for _ in range(8):
        due.append(sched.due())
        sched.advance()
    assert due == [True, True, False, True, False, False, True, False]
    assert not sched.due()  # step 8
    sched.refresh_next(True)
    assert sched.due()
    sched.refresh_next(False)
    assert not sched.due()


def test_kl_clip_scales_to_the_bound_and_only_down():
    D, m = [torch.ones(2, 2)], [torch.full((2, 2), 2.0)]
    assert KLClip(None).scale(D, m, [0.5]) == 1.0
    total = 0.5**2 * 8.0  # α² Σ⟨D, ĝ⟩
    assert KLClip(1e-3).scale(D, m, [0.5]) == pytest.approx(math.sqrt(1e-3 / total))
    assert KLClip(100.0).scale(D, m, [0.5]) == 1.0
    assert KLClip(1e-3).scale(D, [-x for x in m], [0.5]) == 1.0  # a non-descent product is not clipped


def test_backoff_halves_and_grows_back_to_one():
    b = StepBackoff()
    b.shrink()
    b.shrink()
    assert b.factor == 0.25
    values = []
    for _ in range(8):
        b.grow()
        values.append(b.factor)
    assert values[:2] == [0.3125, 0.390625] and values[-1] == 1.0
    assert b.state["factor"].dtype == torch.float32


def test_growth_guard_clips_the_largest_ratio_and_asks_for_a_refresh():
    sched = CurvatureSchedule(interval=10, warmup=0)
    g = GrowthGuard(2.0, layers=2)
    assert g.limit([1.0, 5.0], 1.0, sched) == 1.0  # no reference yet
    g.remember([1.0, 2.0], 0.5)  # references 0.5 and 1.0
    assert g.limit([1.0, 2.0], 1.0, sched) == 1.0  # ratios 2 and 2: at the bound
    assert not bool(sched.state["refresh_next"])
    scale = g.limit([1.0, 8.0], 1.0, sched)  # ratios 2 and 8
    assert scale == pytest.approx(0.25)
    assert bool(sched.state["refresh_next"]) and int(g.state["steps_clipped"]) == 1
    assert GrowthGuard(None, 2).limit([1.0, 1e9], 1.0, sched) == 1.0


def test_loss_guard_measures_the_loss_before_only_when_needed():
    guard = LossGuard(0.25)
    calls = []

    def before():
        calls.append(1)
        return 1.0

    assert guard.reason_to_undo(10.0, True, before) is None  # no accepted loss yet: nothing to compare
    guard.accept(1.0)
    assert guard.reason_to_undo(1.2, True, before) is None and not calls  # within 25 % of the average
    assert guard.reason_to_undo(1.3, True, before) is not None and calls == [1]  # measured, and above it
    assert int(guard.state["loss_checks"]) == 1
    assert guard.reason_to_undo(1.3, True, lambda: 1.1) is None  # above the average, not above L(θ)
    assert "not finite" in guard.reason_to_undo(1.0, False, before)
    guard.accept(2.0)
    assert float(guard.state["loss_avg"]) == pytest.approx(0.9 * 1.0 + 0.1 * 2.0)


def test_loss_guard_off_and_closure_without_loss():
    assert LossGuard(None).reason_to_undo(1e9, True, lambda: 0.0) is None
    guard = LossGuard(0.25)
    guard.accept(1.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert guard.reason_to_undo(None, True, lambda: 0.0) is None
        assert guard.reason_to_undo(None, True, lambda: 0.0) is None
    assert len([x for x in w if "cannot act" in str(x.message)]) == 1  # said once
