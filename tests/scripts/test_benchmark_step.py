"""The plain-loop step benchmark runs on a tiny GPT-2 and reports what its table says."""

from __future__ import annotations

import json
import statistics

import pytest

from tests._helpers.scripts import load_script


def test_step_benchmark_smoke(tmp_path):
    bench = load_script("benchmark_step")
    names = ["adamw", "mlbfgs", "kbfgs_int10_bf16"]
    result = bench.main(["--output_dir", str(tmp_path), "--optimizers", *names, "--vocab_size", "97",
                         "--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--seq", "8", "--batch", "2",
                         "--steps", "4", "--warmup", "1", "--autocast", "none", "--profile"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in saved["runs"]] == names
    for r in saved["runs"]:
        assert len(r["step_seconds"]) == 4 and len(r["losses"]) == 4
        assert r["median_step_seconds"] > 0 and r["optimizer_state_bytes"] > 0
        assert (tmp_path / f"profile-{r['optimizer']}.txt").stat().st_size > 0
    adam = saved["runs"][0]
    # AdamW: two float32 moments per parameter, plus a 0-dim float32 step per tensor (GPT-2 1x16: 16 tensors)
    assert adam["optimizer_state_bytes"] == 8 * adam["parameters"] + 4 * 16
    row = next(line for line in result["table"].splitlines() if line.startswith("| adamw "))
    assert row.split("|")[3].strip() == "1.00"
    with pytest.raises(ValueError, match="Invalid optimizers"):
        bench.main(["--output_dir", str(tmp_path), "--optimizers", "lion"])


def test_step_benchmark_on_the_packaged_minilm(tmp_path):
    bench = load_script("benchmark_step")
    names = ["adamw", "kbfgs_defaults"]
    result = bench.main(["--output_dir", str(tmp_path), "--model", "minilm", "--optimizers", *names, "--seq", "8",
                         "--batch", "2", "--steps", "2", "--warmup", "1", "--autocast", "none"])
    assert result["table"].startswith("all-MiniLM-L6-v2 + 2-class head (22.7M parameters), batch 2 x 8 tokens")
    assert [r["optimizer"] for r in result["runs"]] == names
    assert all(len(r["losses"]) == 2 and r["median_step_seconds"] > 0 for r in result["runs"])
    with pytest.raises(ValueError, match="Invalid model 'bert'"):
        bench.main(["--output_dir", str(tmp_path), "--model", "bert"])


def test_step_benchmark_rounds_on_the_recipe_vit(tmp_path):
    """--model vit times the image recipe's ViT; --rounds times every optimizer that many times in turns, and
    each ratio is the median over the rounds of that round's ratio, with its min-max."""
    bench = load_script("benchmark_step")
    names = ["adamw", "kbfgs_defaults"]
    result = bench.main(["--output_dir", str(tmp_path), "--model", "vit", "--optimizers", *names, "--batch", "4",
                         "--steps", "3", "--warmup", "1", "--rounds", "3", "--autocast", "none"])
    assert result["table"].startswith("ViT of the image recipe (0.1M parameters), batch 4, autocast none")
    adam, kbfgs = result["runs"]
    assert [len(r["round_step_seconds"]) for r in result["runs"]] == [3, 3]
    assert all(len(t) == 3 for r in result["runs"] for t in r["round_step_seconds"])
    assert len(set(kbfgs["losses"])) > 1 and kbfgs["losses"] != adam["losses"]  # it trained, and differently
    ratios = sorted(statistics.fmean(k[1:]) / statistics.fmean(a[1:])
                    for k, a in zip(kbfgs["round_step_seconds"], adam["round_step_seconds"]))
    row = next(line for line in result["table"].splitlines() if line.startswith("| kbfgs_defaults "))
    assert row.split("|")[5].strip() == f"{ratios[1]:.2f} ({ratios[0]:.2f}-{ratios[2]:.2f})"
    with pytest.raises(ValueError, match="Invalid rounds=0"):
        bench.main(["--output_dir", str(tmp_path), "--model", "vit", "--rounds", "0"])


def test_step_kinds_profile_splits_curvature_from_plain_steps(tmp_path):
    """K-BFGS's defaults after the 20 warm-up curvature steps: every 5th step captures statistics; the script
    times the two kinds apart and profiles one of each (a curvature step runs more tensor operators)."""
    kinds = load_script("profile_step_kinds")
    out = kinds.main(["--output_dir", str(tmp_path), "--optimizers", "adamw", "kbfgs", "--n_embd", "32",
                      "--n_layer", "2", "--n_head", "2", "--vocab_size", "128", "--batch", "2", "--seq", "16",
                      "--steps", "10"])
    adamw, kbfgs = out["runs"]
    assert len(adamw["ms"]["plain"]) == 10 and adamw["ms"]["curvature"] == [] and "curvature" not in adamw
    assert len(kbfgs["ms"]["curvature"]) == 2 and len(kbfgs["ms"]["plain"]) == 8  # steps 25-34: 25 and 30
    assert kbfgs["curvature"]["aten_ops"] > kbfgs["plain"]["aten_ops"] > adamw["plain"]["aten_ops"] > 0
    # the optimizer's own step: at least K-BFGS's two direction products for each of the 2 blocks' 4 layers
    assert kbfgs["curvature"]["optimizer_step_ops"] > kbfgs["plain"]["optimizer_step_ops"] > 2 * 4 * 2
    assert adamw["plain"]["optimizer_step_ops"] > 0
    assert all(run[k]["optimizer_step_ms"] > 0 for run, k in ((adamw, "plain"), (kbfgs, "plain"), (kbfgs, "curvature")))
    assert "curvature step" in (tmp_path / "profile-kbfgs.txt").read_text()
    assert (tmp_path / "summary.json").exists()
