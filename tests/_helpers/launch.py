"""Run a script on 1 or 2 CPU processes (torchrun or accelerate launch, gloo) and read its JSON results."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, args: list[str], nproc: int = 1, launcher: str = "torchrun", timeout: int = 240) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    path = str(ROOT / "scripts" / script) if "/" not in script else str(ROOT / script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    elif launcher == "torchrun":
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), path, *args]
    else:
        accel = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [accel, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), path, *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def results(out_dir: Path) -> dict:
    return json.loads((out_dir / "results.json").read_text())
