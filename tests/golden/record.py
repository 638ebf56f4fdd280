"""Record the golden trajectories and checkpoints (see ``variants.py``). Run from the repository root:

    python -m tests.golden.record

Only ever re-record on purpose, when a change is *meant* to move the numbers, and say so in the commit.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from tests._helpers.training import loop
from tests.golden.variants import (
    CHECKPOINTED,
    PROBLEMS,
    RESUME_AT,
    STEPS,
    THREADS,
    VARIANTS,
    environment,
    hexes,
    needs_closure,
    param_hash,
    problem,
    run,
)

HERE = Path(__file__).parent


def main() -> None:
    torch.set_num_threads(THREADS)
    out: dict = {"environment": environment(), "steps": STEPS, "runs": {}, "resumed": {}}
    for variant in VARIANTS:
        for prob in PROBLEMS:
            out["runs"][f"{variant}/{prob}"] = run(variant, prob)
            print(variant, prob, out["runs"][f"{variant}/{prob}"]["losses"][-1])
    checkpoints = {}
    for variant in CHECKPOINTED:
        model, batches, loss_fn = problem("mlp")
        opt = VARIANTS[variant](model)
        loop(model, opt, batches[:RESUME_AT], loss_fn, closure=needs_closure(variant))
        checkpoints[variant] = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
        losses = loop(model, opt, batches[RESUME_AT:], loss_fn, closure=needs_closure(variant))
        out["resumed"][variant] = {"losses": hexes(losses), "params": param_hash(model)}
    torch.save(checkpoints, HERE / "checkpoints_v1.pt")
    (HERE / "trajectories.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
