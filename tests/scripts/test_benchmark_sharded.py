"""The FSDP2 state/communication benchmark runs on one rank (a subprocess: it counts bytes by wrapping
torch.distributed's collectives) and reports a table and a plot."""

from __future__ import annotations

import json

from tests._helpers.launch import run_script
from tests._helpers.scripts import load_script


def test_sharded_benchmark_smoke(tmp_path):
    args = ["--output_dir", str(tmp_path), "--size", "tiny", "--vocab_size", "97", "--seq", "16", "--batch", "2",
            "--warmup", "1", "--steps", "3", "--rounds", "1"]
    run_script("benchmark_sharded.py", args)
    bench = load_script("benchmark_sharded")  # the report only reads files: in this process
    bench.report(bench.ShardedBenchArguments(output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "results-1ranks.json").read_text())
    assert saved["world_size"] == 1
    runs = saved["ranks"][0]["optimizers"]
    assert list(runs) == ["adamw", "mlbfgs", "mlbfgs_bf16", "kbfgs"]
    # AdamW: two float32 moments per parameter (a 0-dim step per tensor besides); mL-BFGS: far more
    assert 2 * runs["adamw"]["param_bytes"] <= runs["adamw"]["state_bytes"] < runs["mlbfgs"]["state_bytes"]
    assert all(r["optimizer_bytes_sent"] == 0 and r["model_bytes_sent"] == 0 for r in runs.values())  # one rank
    table = (tmp_path / "results.md").read_text()
    assert sum(line.startswith("| 1 | ") for line in table.splitlines()) == 4
    assert (tmp_path / "state_bytes.png").stat().st_size > 0
