"""mL-BFGS with its state split over 2 gloo ranks, against one process at the same global batch.

Run with ``torchrun --nproc_per_node 2 tests/_helpers/sharded_worker.py OUT_DIR``. Each rank first computes the
one-process reference trajectories itself (before the process group exists), then runs every case sharded:

* ``fsdp2``: FSDP2 ``fully_shard`` (per block, then the root), the optimizer built on the sharded model;
* ``fsdp2_swapped``: the optimizer built on the plain model and the sharded parameters swapped into its
  ``param_groups`` afterwards, as ``accelerate.prepare`` does (GPT-2, one configuration);
* ``zero1``: DDP with ``shard_state=True`` (GPT-2 and the CNN, one configuration each);
* K-BFGS under FSDP2 (its defaults and the paper's same-batch pairs), with a torch.distributed.checkpoint
  resume.

Every case trains a tiny GPT-2 with tied embeddings and a small CNN (float64, so that only the order of sums
differs) for ``STEPS`` steps and records: the largest relative difference of the parameters from the reference,
the state bytes per rank and the reference's, whether the replicas agree bitwise (ZeRO-1), a rank-local
save/load resume against the uninterrupted run (bitwise), the refusal of another rank's piece, and the whole
state gathered by ``full_state_dict`` against the reference's. Rank 0 writes ``results.json``.
"""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import hf_qn  # noqa: E402
from tests._helpers.models import tiny_gpt2  # noqa: E402

STEPS, SAVE_AT, BATCH = 6, 4, 8
CONFIGS = {  # float64 histories, so that sums in another order are the only difference
    "adam": {"lr": 0.01, "history_size": 3, "update_interval": 2, "history_dtype": "float64"},
    "grad": {"lr": 0.05, "history_size": 3, "update_interval": 2, "normalize": "grad", "pair_decay": 0.5,
             "weight_decay": 0.01, "grad_avg_reset": True, "history_dtype": "float64"},
}


def config(kind: str, name: str) -> dict:
    """``CONFIGS[name]`` for a model ``kind``. GPT-2's attention key bias has an identically zero gradient, so its
    entries of every direction are rounding noise, which differs between one process and two ranks.
    ``direction_rms`` divides each entry by its own RMS (weighted by the gradient's RMS over ε, about 1e-3 for that
    noise), which lifts it to steps far above float32's rounding of the others (harmless to the loss, which does not
    depend on the key bias, but not the same parameters), so the GPT-2 cases run without it; the CNN's run with it."""
    cfg = dict(CONFIGS[name])
    if kind == "gpt2" and cfg.get("normalize", "adam") == "adam":
        cfg["direction_rms"] = False
    return cfg


#: "default" is K-BFGS's defaults with float32 products: where bf16 is native, ``matmul_dtype="auto"`` rounds each
#: rank's partial Gram to bf16, and sharded runs then agree with one process to about 1e-2, not float32's 1e-5.
KBFGS_CONFIGS = {"default": {"matmul_dtype": "float32"}, "bfgs": {"matmul_dtype": "float32", "output_side": "bfgs"},
                 "none": {"matmul_dtype": "float32", "output_side": "none"}, "paper": {"preset": "paper", "lr": 0.05}}
#: (model, K-BFGS configuration) runs: the defaults take K-FAC's output factor on the GPT-2 (a transformers model
#: built from a config) and BFGS's on the CNN; "bfgs" is the GPT-2's BFGS factor with consecutive pairs, "none" its
#: input factors alone (a fine-tune's default).
KBFGS_CASES = [("gpt2", "default"), ("gpt2", "bfgs"), ("gpt2", "none"), ("gpt2", "paper"), ("cnn", "default"),
               ("cnn", "paper")]


def kbfgs_model(kind: str, cfg: dict, mesh=None) -> tuple[nn.Module, object]:
    model = build(kind)
    if mesh is not None:
        shard(model, kind, mesh)
    return model, hf_qn.KBFGS(model, **cfg)


def kbfgs_train(kind: str, cfg: dict, model, opt, steps: int = STEPS, part=None, start: int = 0):
    """K-BFGS steps; the paper setting's same-batch pairs get the closure that re-evaluates the rank's batch."""
    data = batches(kind)
    for t in range(start, start + steps):
        x, y = data[t]
        if part is not None:
            x, y = x.chunk(part[1])[part[0]], y.chunk(part[1])[part[0]]
        opt.zero_grad()
        loss_of(kind, model, x, y).backward()

        def closure(x=x, y=y):
            loss = loss_of(kind, model, x, y)
            loss.backward()
            return loss

        opt.step(closure if cfg.get("preset") == "paper" else None)
    return model, opt


def factor_states(opt) -> dict[str, torch.Tensor]:
    """Every floating tensor of the layers' input and output factor states of a K-BFGS optimizer, by path."""
    return {f"{la.name}/{side}/{key}": value for la in opt.layers for side in ("input", "output")
            for key, value in la.state.get(side, {}).items() if torch.is_tensor(value) and value.is_floating_point()}


def kbfgs_run(kind: str, cfg: dict, mesh=None, part=None) -> tuple[nn.Module, object]:
    """K-BFGS for STEPS steps, on one process or FSDP2-sharded (``mesh``)."""
    return kbfgs_train(kind, cfg, *kbfgs_model(kind, cfg, mesh), part=part)


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = tiny_gpt2(vocab=61, n_embd=16, n_layer=2) if kind == "gpt2" else cnn()
    return model.double()


def batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if kind == "gpt2":
        ids = [torch.randint(0, 61, (BATCH, 8), generator=g) for _ in range(STEPS)]
        return [(x, x) for x in ids]
    return [(torch.randn(BATCH, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(STEPS)]


def loss_of(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "gpt2":
        return model(input_ids=x, labels=y).loss
    return nn.functional.cross_entropy(model(x), y)


def train(kind, model, opt, steps, part=None, start=0):
    data = batches(kind)
    for t in range(start, start + steps):
        x, y = data[t]
        if part is not None:  # this rank's half of the global batch
            rank, world = part
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        loss_of(kind, model, x, y).backward()
        opt.step()


def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


def reference(kind: str, cfg: dict) -> dict:
    model = build(kind)
    opt = hf_qn.MLBFGS(model, **cfg)
    train(kind, model, opt, STEPS)
    return {"params": full_params(model), "state_bytes": opt.state_bytes(), "state": opt.state_dict()}


def shard(model: nn.Module, kind: str, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    units = model.transformer.h if kind == "gpt2" else [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in units:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def make(case: str, kind: str, cfg: dict, mesh):
    """A fresh model and optimizer for a case."""
    model = build(kind)
    if case == "fsdp2":
        shard(model, kind, mesh)
        return model, model, hf_qn.MLBFGS(model, **cfg)
    if case == "fsdp2_swapped":
        opt = hf_qn.MLBFGS(model, **cfg)
        old = list(model.parameters())
        shard(model, kind, mesh)
        new_of = dict(zip(map(id, old), model.parameters()))
        for g in opt.param_groups:
            g["params"] = [new_of[id(p)] for p in g["params"]]
        return model, model, opt
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model), model, hf_qn.MLBFGS(model, shard_state=True, **cfg)


def local_params(model: nn.Module) -> list[torch.Tensor]:
    return [(p.to_local() if hasattr(p, "to_local") else p).detach().clone() for p in model.parameters()]


def saved(obj) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def dcp_state(model, opt, full: bool = False) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=full)
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, opt, options=options)}


def dcp_restore(model, opt, path) -> None:
    """What ``accelerator.load_state`` does with FSDP2: the current state as the template, filled from disk."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    sd = dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=str(path))
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def run_case(case: str, kind: str, cfg_name: str, ref: dict, mesh, rank: int, world: int, out_dir: Path) -> dict:
    cfg = config(kind, cfg_name)
    part = (rank, world)
    wrapped, model, opt = make(case, kind, cfg, mesh)
    train(kind, wrapped, opt, STEPS, part)
    out = {"max_rel_diff": max_rel(full_params(model), ref["params"]),
           "state_bytes": opt.state_bytes(), "reference_state_bytes": ref["state_bytes"],
           "sharded": opt._plan.sharded}
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) if case == "zero1" else None
    if flat is not None:
        both = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(both, flat)
        out["replicas_equal"] = bool(torch.equal(both[0], both[1]))
    # the whole state, gathered, against the reference's
    whole = opt.full_state_dict()
    diffs = []
    for pid, st in ref["state"]["state"].items():
        for k in ("param_avg", "grad_avg", "momentum_buffer", "exp_avg_sq"):
            if k in st:
                diffs.append(float((whole["state"][pid][k] - st[k]).abs().max() / st[k].abs().max().clamp_min(1e-30)))
        if "history" in st.get("block", {}):
            h, hw = st["block"]["history"], whole["state"][pid]["block"]["history"]
            assert hw["S"].shape == h["S"].shape, (hw["S"].shape, h["S"].shape)
            diffs.append(float((hw["S"] - h["S"]).abs().max() / h["S"].abs().max().clamp_min(1e-30)))
            diffs.append(float((hw["SY"] - h["SY"]).abs().max() / h["SY"].abs().max().clamp_min(1e-30)))
    out["full_state_max_rel_diff"] = max(diffs)
    out["full_state_has_no_shards"] = "shards" not in whole["hf_qn"]

    # rank-local resume: save at SAVE_AT, restore into fresh objects, finish: bitwise the uninterrupted run
    final = local_params(model)
    wrapped, model, opt = make(case, kind, cfg, mesh)
    train(kind, wrapped, opt, SAVE_AT, part)
    snap_params, snap_state = local_params(model), saved(opt.state_dict())
    if case == "fsdp2":  # through torch.distributed.checkpoint, as the Trainer and accelerate save FSDP runs
        import torch.distributed.checkpoint as dcp

        dcp_dir = out_dir / "dcp" / f"{kind}-{cfg_name}"
        dcp.save(dcp_state(model, opt), checkpoint_id=str(dcp_dir))
        whole = dcp_state(model, opt, full=True)  # gathered: for one process
        if rank == 0:
            torch.save(whole, out_dir / f"full-{kind}-{cfg_name}.pt")
        _, model2, opt2 = make(case, kind, cfg, mesh)
        dcp_restore(model2, opt2, dcp_dir)
        train(kind, model2, opt2, STEPS - SAVE_AT, part, start=SAVE_AT)
        out["dcp_resume_bitwise"] = all(torch.equal(a, b) for a, b in zip(local_params(model2), final))
    wrapped, model, opt = make(case, kind, cfg, mesh)
    with torch.no_grad():
        for p, v in zip(model.parameters(), snap_params):
            (p.to_local() if hasattr(p, "to_local") else p).copy_(v)
    opt.load_state_dict(snap_state)
    train(kind, wrapped, opt, STEPS - SAVE_AT, part, start=SAVE_AT)
    out["resume_bitwise"] = all(torch.equal(a, b) for a, b in zip(local_params(model), final))
    # another rank's piece is refused
    pieces = [None] * world
    dist.all_gather_object(pieces, snap_state)
    try:
        opt.load_state_dict(pieces[(rank + 1) % world])
        out["other_rank_refused"] = ""
    except ValueError as e:
        out["other_rank_refused"] = str(e)
    return out


def resume_from_whole(kind: str, cfg_name: str, ref_mid: dict, ref: dict, mesh, rank: int, world: int) -> dict:
    """A one-process state (saved at SAVE_AT) loaded into the split optimizer, then trained to STEPS: matches the
    one-process run."""
    wrapped, model, opt = make("fsdp2", kind, config(kind, cfg_name), mesh)
    with torch.no_grad():
        for (n, p) in model.named_parameters():
            lo, hi = opt._plan.flat_range(p)
            p.to_local().copy_(ref_mid["params"][n].reshape(-1)[lo:hi].view_as(p.to_local()))
    opt.load_state_dict(saved(ref_mid["state"]))
    train(kind, wrapped, opt, STEPS - SAVE_AT, (rank, world), start=SAVE_AT)
    return {"max_rel_diff": max_rel(full_params(model), ref["params"])}


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.use_deterministic_algorithms(True)
    refs, mids = {}, {}
    for kind in ("gpt2", "cnn"):
        for cfg_name in CONFIGS:
            cfg = config(kind, cfg_name)
            refs[kind, cfg_name] = reference(kind, cfg)
            model = build(kind)
            opt = hf_qn.MLBFGS(model, **cfg)
            train(kind, model, opt, SAVE_AT)
            mids[kind, cfg_name] = {"params": full_params(model), "state": copy.deepcopy(opt.state_dict())}
    kbfgs_refs = {(kind, name): kbfgs_run(kind, KBFGS_CONFIGS[name]) for kind, name in KBFGS_CASES}
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    cases = [("fsdp2", kind, cfg) for kind in ("gpt2", "cnn") for cfg in CONFIGS]
    cases += [("fsdp2_swapped", "gpt2", "adam"), ("zero1", "gpt2", "adam"), ("zero1", "cnn", "adam"), ("zero1", "cnn", "grad")]
    for case, kind, cfg_name in cases:
        results[f"{case}/{kind}/{cfg_name}"] = run_case(case, kind, cfg_name, refs[kind, cfg_name], mesh, rank,
                                                        world, out_dir)
    for kind, cfg_name in KBFGS_CASES:
        cfg = KBFGS_CONFIGS[cfg_name]
        model, opt = kbfgs_run(kind, cfg, mesh, (rank, world))
        ref_model, ref_opt = kbfgs_refs[kind, cfg_name]
        out = results[f"kbfgs/{kind}/{cfg_name}"] = {
            "max_rel_diff": max_rel(full_params(model), full_params(ref_model)),
            "factor_max_rel_diff": max_rel(factor_states(opt), factor_states(ref_opt)),
            "pairs": opt.statistics()["qn/pairs_accepted"],
            "reference_pairs": ref_opt.statistics()["qn/pairs_accepted"],
        }
        # torch.distributed.checkpoint at SAVE_AT into fresh objects, then on: the uninterrupted run's bits
        import torch.distributed.checkpoint as dcp

        half, half_opt = kbfgs_train(kind, cfg, *kbfgs_model(kind, cfg, mesh), SAVE_AT, (rank, world))
        path = out_dir / "dcp" / f"kbfgs-{kind}-{cfg_name}"
        dcp.save(dcp_state(half, half_opt), checkpoint_id=str(path))
        again, again_opt = kbfgs_model(kind, cfg, mesh)
        dcp_restore(again, again_opt, path)
        kbfgs_train(kind, cfg, again, again_opt, STEPS - SAVE_AT, (rank, world), start=SAVE_AT)
        out["dcp_resume_bitwise"] = all(torch.equal(a, b) for a, b in zip(local_params(again), local_params(model)))
    for kind in ("gpt2", "cnn"):
        results[f"from_whole/{kind}"] = resume_from_whole(kind, "adam", mids[kind, "adam"], refs[kind, "adam"], mesh,
                                                          rank, world)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "results.json").write_text(json.dumps({"world_size": world, "ranks": everyone}, indent=1))
    hf_qn.distributed.shutdown()


if __name__ == "__main__":
    main()
