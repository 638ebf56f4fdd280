"""Run a script on 1 or 2 CPU processes (torchrun or accelerate launch, gloo) and read its JSON results."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_script(script: str, args: list[str], nproc: int = 1, launcher: str = "torchrun", timeout: int = 240) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    path = str(ROOT / "scripts" / script) if "/" not in script else str(ROOT / script)

    def launch() -> tuple[list[str], subprocess.CompletedProcess]:
        cmd = _command(path, args, nproc, launcher)  # a fresh port for each attempt
        return cmd, subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    cmd, proc = launch()
    if proc.returncode != 0 and nproc > 1 and _killed_by_signal(proc.stderr):
        # A rank killed by a signal (once in many CI runs: SIGABRT inside gloo's TCP transport, the other rank then
        # reading "Connection reset by peer") is retried once; the first failure stays visible as a warning.
        warnings.warn(f"{' '.join(cmd)}: a rank was killed by a signal; retrying once.\n{_report(proc)}", stacklevel=2)
        cmd, proc = launch()
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{_report(proc)}")


def _command(path: str, args: list[str], nproc: int, launcher: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, path, *args]
    if launcher == "torchrun":
        torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
        return [torchrun, "--standalone", "--nproc_per_node", str(nproc), path, *args]
    accel = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    return [accel, "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), path, *args]


def _killed_by_signal(stderr: str) -> bool:
    """Whether torchrun's failure summary names a rank that exited on a signal (a negative exit code)."""
    return re.search(r"exitcode\s*:\s*-\d+", stderr) is not None


def _report(proc: subprocess.CompletedProcess) -> str:
    """The ends of stdout and stderr, and each rank's own last lines (``[rankN]:``-prefixed), which the end of
    stderr can miss when one rank's traceback is long and another rank failed first."""
    ranks: dict[str, list[str]] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"\[rank(\d+)\]:", line)
        if m:
            ranks.setdefault(m.group(1), []).append(line)
        elif re.search(r"terminate called|what\(\):|Fatal Python error|Segmentation fault", line):
            ranks.setdefault("?", []).append(line)  # C++ and interpreter aborts print without a rank prefix
    per_rank = "".join(f"\n--- rank {r}, last lines ---\n" + "\n".join(lines[-15:]) for r, lines in sorted(ranks.items()))
    return f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}{per_rank}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def results(out_dir: Path) -> dict:
    return json.loads((out_dir / "results.json").read_text())
