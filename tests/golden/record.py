"""Record the golden trajectories of this machine (see ``variants.py``). Run from the repository root:

    python -m tests.golden.record

Only ever re-record on purpose, when a change is *meant* to move the numbers (or for a machine that has no
recording yet), and say so in the commit. ``checkpoints_v1.pt`` is not rewritten: its continuations are.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.golden.variants import (
    CHECKPOINTED,
    PROBLEMS,
    STEPS,
    THREADS,
    VARIANTS,
    environment,
    golden_file,
    resume_from_committed_checkpoint,
    run,
)

HERE = Path(__file__).parent


def main() -> None:
    torch.set_num_threads(THREADS)
    env = environment()
    out: dict = {"environment": env, "steps": STEPS, "runs": {}, "resumed": {}}
    for variant in VARIANTS:
        for prob in PROBLEMS:
            out["runs"][f"{variant}/{prob}"] = run(variant, prob)
            print(variant, prob, out["runs"][f"{variant}/{prob}"]["losses"][-1])
    for variant in CHECKPOINTED:
        out["resumed"][variant] = resume_from_committed_checkpoint(variant)
    (HERE / golden_file(env)).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
