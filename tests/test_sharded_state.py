"""mL-BFGS with its state split over 2 gloo ranks (FSDP2 ``fully_shard``, and ZeRO-1 under DDP): the same
parameters as one process at the same global batch, half the state per rank, bitwise rank-local resume, and
whole states moved between one process and two ranks. The worker is ``tests/_helpers/sharded_worker.py``."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hf_qn
from tests._helpers import sharded_worker as w
from tests._helpers.launch import results, run_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CASES = [*(f"fsdp2/{kind}/{cfg}" for kind in ("gpt2", "cnn") for cfg in ("adam", "grad")),
         "fsdp2_swapped/gpt2/adam", "zero1/gpt2/adam", "zero1/cnn/adam", "zero1/cnn/grad"]


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    run_script("tests/_helpers/sharded_worker.py", [str(out)], nproc=2, timeout=400)
    return out


@pytest.fixture(scope="module")
def ranks(worker_out):
    res = results(worker_out)
    assert res["world_size"] == 2
    return res["ranks"]


@pytest.mark.parametrize("case", CASES)
def test_split_state_equals_one_process(ranks, case):
    for r in ranks:
        got = r[case]
        assert got["sharded"]
        # float64 throughout: only the order of the sums over ranks differs from one process
        assert got["max_rel_diff"] < 1e-11, got["max_rel_diff"]
        assert got["full_state_max_rel_diff"] < 1e-11, got["full_state_max_rel_diff"]
        assert got["full_state_has_no_shards"]
        if case.startswith("zero1"):
            assert got["replicas_equal"]


@pytest.mark.parametrize("case", CASES)
def test_state_per_rank_is_half_of_one_process(ranks, case):
    total = sum(r[case]["state_bytes"] for r in ranks)
    whole = ranks[0][case]["reference_state_bytes"]
    # the per-element state is split exactly; the small per-block matrices (m x m) and counters are on every rank
    assert whole < total < 1.02 * whole
    for r in ranks:
        assert r[case]["state_bytes"] < 0.52 * whole


@pytest.mark.parametrize("case", CASES)
def test_rank_local_resume_is_bitwise_and_another_ranks_piece_is_refused(ranks, case):
    for rank, r in enumerate(ranks):
        assert r[case]["resume_bitwise"]
        msg = r[case]["other_rank_refused"]
        if case.startswith("zero1"):
            assert f"rank {1 - rank}'s piece of a state split over 2 ranks" in msg and "full_state_dict()" in msg
        else:  # DTensor pieces: told apart by the rank marker
            assert f"another rank's (elements {2048 * (1 - rank)}-" in msg and "torch.distributed.checkpoint" in msg


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("fsdp2/")])
def test_torch_distributed_checkpoint_resume_is_bitwise(ranks, case):
    for r in ranks:
        assert r[case]["dcp_resume_bitwise"]


#: parameters of K-BFGS on 2 ranks against one process, float32 factors: sums in another order. K-FAC's output factor
#: (the GPT-2's default) is a full matrix from the first curvature step, so its rounding reaches every entry of the
#: direction, which ``direction_rms`` divides by its own running RMS: near-zero entries carry it to 1.25e-5 (its
#: factors agree to 9e-7, as the others').
PARAM_RTOL = {"kbfgs/gpt2/default": 3e-5}


@pytest.mark.parametrize("case", [f"kbfgs/{kind}/{cfg}" for kind, cfg in w.KBFGS_CASES])
def test_kbfgs_under_fsdp2_equals_one_process_and_resumes_bitwise(ranks, case):
    """K-BFGS on FSDP2 shards: each layer's gradient gathered whole, the factors (from the hooks' all-reduced
    statistics) and the direction replicated, each rank adding its shard's rows; the defaults (grafted,
    consecutive pairs; float32 products, see KBFGS_CONFIGS: K-FAC's output factor on the GPT-2, BFGS's on the CNN),
    the GPT-2 with BFGS's and with none (no pairs), and the paper's same-batch pairs, whose second pass runs through
    the sharded model. The factors are the one process's (a rank's output gradients are world_size times the
    global loss's: K-FAC's output Gram is rescaled by world_size²)."""
    for r in ranks:
        got = r[case]
        assert got["pairs"] == got["reference_pairs"]
        assert (got["pairs"] > 0) == (not case.endswith("/none"))
        assert got["factor_max_rel_diff"] < 5e-6, got["factor_max_rel_diff"]
        assert got["max_rel_diff"] < PARAM_RTOL.get(case, 1e-5), got["max_rel_diff"]
        assert got["dcp_resume_bitwise"]


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["gpt2", "cnn"])
def test_a_two_rank_checkpoint_reshards_to_one_rank(worker_out, one_rank_group, kind):
    """torch.distributed.checkpoint written by 2 ranks, read by 1 (fully_shard over one rank): the run goes on as
    the one-process reference does."""
    from torch.distributed.device_mesh import init_device_mesh

    ref = w.reference(kind, w.config(kind, "adam"))
    _, model, opt = w.make("fsdp2", kind, w.config(kind, "adam"), init_device_mesh("cpu", (1,)))
    w.dcp_restore(model, opt, worker_out / "dcp" / f"{kind}-adam")
    assert int(opt.counters["step"]) == w.SAVE_AT
    w.train(kind, model, opt, w.STEPS - w.SAVE_AT, start=w.SAVE_AT)
    assert w.max_rel(w.full_params(model), ref["params"]) < 1e-11


@pytest.mark.parametrize(("kind", "cfg"), [("gpt2", "default"), ("gpt2", "bfgs"), ("cnn", "default")])
def test_a_two_rank_kbfgs_checkpoint_loads_on_one_rank(worker_out, one_rank_group, kind, cfg):
    """K-BFGS's DCP checkpoint from 2 ranks (whole factors, sharded fallback state) read by 1: the run goes on as
    one process's does (float32 factors; K-FAC's output Gram is saved at the one process's scale, or the averages
    of the two world sizes would mix, as they did before it was rescaled: 0.19)."""
    from torch.distributed.device_mesh import init_device_mesh

    config = w.KBFGS_CONFIGS[cfg]
    ref, _ = w.kbfgs_run(kind, config)
    model, opt = w.kbfgs_model(kind, config, init_device_mesh("cpu", (1,)))
    w.dcp_restore(model, opt, worker_out / "dcp" / f"kbfgs-{kind}-{cfg}")
    assert int(opt.schedule.state["step"]) == w.SAVE_AT
    w.kbfgs_train(kind, config, model, opt, w.STEPS - w.SAVE_AT, start=w.SAVE_AT)
    assert w.max_rel(w.full_params(model), w.full_params(ref)) < PARAM_RTOL.get(f"kbfgs/{kind}/{cfg}", 1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "cnn"])
def test_a_gathered_checkpoint_loads_into_one_plain_process(worker_out, kind):
    """``get_optimizer_state_dict(..., full_state_dict=True)`` on 2 FSDP2 ranks: whole tensors by parameter name,
    which a plain one-process MLBFGS loads (the parameters' columns joined into each block's history)."""
    ref = w.reference(kind, w.config(kind, "adam"))
    whole = torch.load(worker_out / f"full-{kind}-adam.pt", weights_only=True)
    model = w.build(kind)
    model.load_state_dict(whole["model"])
    opt = hf_qn.MLBFGS(model, **w.config(kind, "adam"))
    opt.load_state_dict(whole["optim"])
    assert int(opt.counters["step"]) == w.SAVE_AT and not opt._plan.sharded
    w.train(kind, model, opt, w.STEPS - w.SAVE_AT, start=w.SAVE_AT)
    assert w.max_rel(w.full_params(model), ref["params"]) < 1e-11


@pytest.mark.parametrize("kind", ["gpt2", "cnn"])
def test_a_one_process_state_loads_into_two_ranks(ranks, kind):
    for r in ranks:
        assert r[f"from_whole/{kind}"]["max_rel_diff"] < 1e-11


@pytest.fixture(scope="module")
def one_process_trainer_runs(tmp_path_factory):
    """The one-process reference runs of the Trainer tests (batch 8), per optimizer."""
    from tests._helpers.launch import ROOT

    def run(name: str) -> dict:
        out = tmp_path_factory.mktemp(f"one-{name}")
        run_script("tests/_helpers/fsdp_trainer.py", [str(out), str(ROOT), "8", "plain", "--optimizer", name])
        return results(out)

    return {name: run(name) for name in ("mlbfgs",)}


# K-BFGS's accelerate FSDP2 path is checked through the plain Accelerate loop below (the same prepare, swap and
# torch.distributed.checkpoint calls as the Trainer's).
@pytest.mark.parametrize(("name", "mode"), [("mlbfgs", "fsdp"), ("mlbfgs", "zero1")])
def test_qn_trainer_on_sharded_ranks_matches_one_process_and_resumes_bitwise(
    tmp_path, one_process_trainer_runs, name, mode
):
    """QNTrainer on 2 ranks x batch 4, with FSDP2 (``--fsdp full_shard``, ``fsdp_version: 2``: the optimizer follows
    the parameters accelerate swaps for DTensors) or, for mL-BFGS, DDP with ``shard_state=True``: the same run as
    one plain process x batch 8; saved at step 3 (FSDP2: accelerate's torch.distributed.checkpoint; DDP: the whole
    state gathered into the Trainer's optimizer.pt) and resumed, it ends on the same bits."""
    from tests._helpers.launch import ROOT

    two, res = tmp_path / "two", tmp_path / "res"
    run_script("tests/_helpers/fsdp_trainer.py", [str(two), str(ROOT), "4", mode, "--optimizer", name,
                                                   "--save_at", "3", "--then_resume_into", str(res)], nproc=2)
    saved = two / "checkpoint-3"
    assert (saved / "optimizer_0").is_dir() if mode == "fsdp" else (saved / "optimizer.pt").is_file()
    a, b, c = one_process_trainer_runs[name], results(two), results(res)
    kind = "fsdp2" if mode == "fsdp" else "zero1"
    assert (a["plan"], b["plan"], c["plan"]) == ("replicated", kind, kind) and b["fsdp_enabled"] == (mode == "fsdp")
    assert a["world_size"] == 1 and b["world_size"] == c["world_size"] == 2
    assert len(b["losses"]) == 6 and c["step"] == 6
    for param, values in a["params"].items():
        assert torch.allclose(torch.tensor(b["params"][param]), torch.tensor(values), atol=1e-5, rtol=0), param
    assert b["params"] == c["params"]
    assert torch.allclose(torch.tensor(b["losses"]), torch.tensor(a["losses"]), atol=1e-5, rtol=0)


def test_accelerate_fsdp2_loop_matches_one_process_and_resumes_bitwise(tmp_path):
    """``scripts/train_accelerate.py --fsdp2 true`` (a plain Accelerate loop; K-BFGS with the paper's same-batch
    pairs, its closure through AcceleratedOptimizer) on 2 ranks: the one-process run's parameters and pair
    counts; ``accelerator.save_state`` at step 5 and ``load_state`` in a new launch end on the same bits."""
    common = ["--optimizer", "kbfgs", "--steps", "8"]
    run_script("train_accelerate.py", [*common, "--output_dir", str(tmp_path / "one")], nproc=1)
    run_script("tests/_helpers/fsdp_accelerate.py", [*common, "--fsdp2", "true", "--save_state_at", "5",
                                                     "--output_dir", str(tmp_path / "two")], nproc=2)
    assert (tmp_path / "two" / "state-5" / "optimizer_0").is_dir()  # torch.distributed.checkpoint
    run_script("tests/_helpers/fsdp_accelerate.py", [*common, "--fsdp2", "true", "--output_dir", str(tmp_path / "res"),
                                                     "--resume_from", str(tmp_path / "two" / "state-5")], nproc=2)
    one, two, res = (results(tmp_path / d) for d in ("one", "two", "res"))
    assert two["fsdp"] and res["fsdp"] and two["world_size"] == 2 and not one["fsdp"]
    assert two["statistics"]["qn/pairs_accepted"] == one["statistics"]["qn/pairs_accepted"] > 0
    assert torch.allclose(torch.tensor(two["params"]), torch.tensor(one["params"]), atol=1e-5, rtol=0)
    assert res["params"] == two["params"]
