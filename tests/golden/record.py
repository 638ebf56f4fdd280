"""Record the golden trajectories of this machine (see ``variants.py``). Run from the repository root:

    python -m tests.golden.record                  # this machine's environment
    python -m tests.golden.record --emulate avx2   # the AVX2 recording, on a machine with AVX-512
    python -m tests.golden.record --emulate avx2 --check   # compare with it instead of writing

Only ever re-record on purpose, when a change is *meant* to move the numbers (or for a machine that has no
recording yet), and say so in the commit; re-record every environment this machine can produce (``--emulate``),
so that no committed recording is left behind. ``checkpoints_v1.pt`` is not rewritten: its continuations are.

``--emulate avx2`` runs the recording in a child process whose torch picks its AVX2 kernels
(``ATEN_CPU_CAPABILITY``), whose oneDNN and MKL stop at AVX2 (``DNNL_MAX_CPU_ISA``, ``MKL_ENABLE_INSTRUCTIONS``)
and whose K-BFGS sees no native bf16 (``matmul_dtype="auto"`` takes float32 products): on the AMD EPYC CPU with
AVX-512 BF16 of the project's CI this reproduces every AVX2 golden bit for bit (checked with ``--check`` before a
re-recording: do the same on another CPU before trusting it there; on an Intel Xeon with AVX-512 but no BF16 every
run differs, so that CPU has a recording of its own, not an emulated one). A recording names the CPU model it was made
on (``environment()``), and applies only to that model where it names one (``recorded_for``); a machine takes the
recording naming its model before one naming none (``recording_for``). Re-recording one of the first three, which
name none, narrows it to this machine's model; where such a recording applies but does not reproduce (``--check``),
``--beside`` records this model in a file of its own instead (``golden_file``: a file named by the kernels, and by the
model where that name is taken), leaving the other CPUs their recording.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.golden.variants import (
    CHECKPOINTED,
    PROBLEMS,
    STEPS,
    THREADS,
    VARIANTS,
    environment,
    golden_file,
    read_recordings,
    resume_from_committed_checkpoint,
    run,
)

HERE = Path(__file__).parent

#: what makes torch, oneDNN and MKL take their AVX2 code paths in a fresh process
EMULATIONS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
_EMULATING = "HF_QN_GOLDEN_EMULATING"


def record() -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    out: dict = {"environment": environment(), "steps": STEPS, "runs": {}, "resumed": {}}
    for variant in VARIANTS:
        for prob in PROBLEMS:
            out["runs"][f"{variant}/{prob}"] = run(variant, prob)
    for variant in CHECKPOINTED:
        out["resumed"][variant] = resume_from_committed_checkpoint(variant)
    return out


def write_or_check(out: dict[str, Any], check: bool, beside: bool = False) -> int:
    """Write ``out`` to its environment's file, or (``check``) compare it with that file: 0 when equal.
    ``beside``: a recording that names no CPU model is not that file (a new one, naming this model, goes beside it)."""
    recordings = read_recordings(HERE)
    name = golden_file(out["environment"], {n: rec["environment"] for n, rec in recordings.items()}, unpinned=not beside)
    path = HERE / name
    if not check:
        path.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
        print(f"wrote {path.name}: {len(out['runs'])} runs, {len(out['resumed'])} continuations")
        return 0
    recorded = recordings.get(name, {"runs": {}, "resumed": {}})
    differ = [key for part in ("runs", "resumed") for key in sorted(set(out[part]) | set(recorded[part]))
              if out[part].get(key) != recorded[part].get(key)]
    print(f"{path.name} ({out['environment']}): {len(differ)} of {len(out['runs']) + len(out['resumed'])} differ"
          + "".join(f"\n  {key}" for key in differ))
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulate", choices=sorted(EMULATIONS), help="record another environment's goldens")
    parser.add_argument("--check", action="store_true", help="compare with the recording instead of writing it")
    parser.add_argument("--beside", action="store_true",
                        help="where a recording naming no CPU model applies but does not reproduce here, record this "
                             "model in a file of its own beside it (it is then preferred here) instead of narrowing it")
    args = parser.parse_args()
    if args.emulate and os.environ.get(_EMULATING) != args.emulate:
        # the kernels are chosen when torch loads: only a fresh process can take other ones
        env = {**os.environ, **EMULATIONS[args.emulate], _EMULATING: args.emulate}
        return subprocess.call([sys.executable, "-m", "tests.golden.record", *sys.argv[1:]], env=env)
    if args.emulate:
        import hf_qn.optim.config as config

        flags = config._cpu_flags() - {"avx512_bf16", "amx_bf16"}
        config._cpu_flags = lambda: flags  # no native bf16 as the CPU reports it
    return write_or_check(record(), args.check, args.beside)


if __name__ == "__main__":
    sys.exit(main())
