"""The K-BFGS cost-floor script: its schedule arithmetic, and a run on a tiny autoencoder."""

from __future__ import annotations

import json

import pytest

from tests._helpers.scripts import load_script


def test_schedule_arithmetic():
    floor = load_script("kbfgs_cost_floor")
    # warm-up 20, then t = 20, 30, ..., 390: 20 + 38 curvature steps in 400
    assert floor.ideal_curvature_steps(400, 20, 10) == 58
    assert floor.ideal_curvature_steps(5, 0, 1) == 5
    fl = {"plain": 120.0, "curvature": 250.0, "adamw": 100.0}
    assert floor.schedule_floor(fl, 1, 4) == pytest.approx((250.0 + 3 * 120.0) / 4)
    parts = {"forward_backward": 90.0, "adamw_update": 5.0, "directions": 20.0, "momentum_and_apply": 1.0,
             "second_pass": 60.0, "input_grams": 15.0, "row_sums": 3.0, "factor_updates": 7.0}
    assert floor.floors(parts) == {"adamw": 95.0, "plain": 111.0, "curvature": 196.0}


def test_cost_floor_smoke(tmp_path):
    floor = load_script("kbfgs_cost_floor")
    skip, steps, interval = 1, 24, 4
    result = floor.main(["--output_dir", str(tmp_path), "--smoke", "--widths", "784", "32", "8", "32", "784",
                         "--batch_size", "50", "--repeats", "2", "--skip", str(skip), "--steps", str(steps),
                         "--update_interval", str(interval), "--matmul_dtype", "float32"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"] == result["table"] == (tmp_path / "table.md").read_text().strip()
    assert all(v > 0 for v in saved["parts_ms"].values())
    fl = saved["floors_ms"]
    assert fl["curvature"] > fl["plain"] > saved["parts_ms"]["forward_backward"]
    runs = saved["measured"]
    assert runs["every_step"]["curvature_steps"] == runs["every_step"]["steps"] == steps
    assert all(r["kbfgs_mean_ms"] > 0 and r["adamw_mean_ms"] > 0 for r in runs.values())
    # the interval mode's schedule (warm-up 20, then every 4th step) in the timed window; the growth guard
    # can only add refreshes
    scheduled = sum(1 for t in range(skip, skip + steps) if t < 20 or t % interval == 0)
    assert scheduled <= runs["interval"]["curvature_steps"] < steps
    assert runs["interval"]["curvature"][: 20 - skip] == [True] * (20 - skip)
    assert "| every step | 24 of 24 |" in result["table"]
    with pytest.raises(ValueError, match="Invalid matmul_dtype"):
        floor.main(["--output_dir", str(tmp_path), "--matmul_dtype", "float16"])
    with pytest.raises(ValueError, match="Invalid widths"):
        floor.main(["--output_dir", str(tmp_path), "--smoke", "--widths", "784", "32", "10"])
