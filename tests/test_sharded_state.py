"""mL-BFGS with its state split over 2 gloo ranks (FSDP2 ``fully_shard``, and ZeRO-1 under DDP): the same
parameters as one process at the same global batch, half the state per rank, bitwise rank-local resume, and
whole states moved between one process and two ranks. The worker is ``tests/_helpers/sharded_worker.py``."""

from __future__ import annotations

import pytest

from tests._helpers.launch import results, run_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CASES = [f"{case}/{kind}/{cfg}" for case in ("fsdp2", "fsdp2_swapped", "zero1") for kind in ("gpt2", "cnn")
         for cfg in ("adam", "grad")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    run_script("tests/_helpers/sharded_worker.py", [str(out)], nproc=2, timeout=400)
    res = results(out)
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
        assert f"rank {1 - rank}'s piece of a state split over 2 ranks" in msg and "full_state_dict()" in msg


@pytest.mark.parametrize("kind", ["gpt2", "cnn"])
def test_a_one_process_state_loads_into_two_ranks(ranks, kind):
    for r in ranks:
        assert r[f"from_whole/{kind}"]["max_rel_diff"] < 1e-11
