"""Which golden recording applies to a machine (``recorded_for``: every fact that either side names agrees;
``recording_for``: the one naming its model first) and where a new recording goes (``golden_file``)."""

from __future__ import annotations

from tests.golden.variants import environment, golden_file, recorded_for, recording_for

BASE = {"torch": "2.13.0+cpu", "cpu_capability": "AVX512", "native_bf16": True}
HERE = {**BASE, "cpu_model": "CPU X"}


def test_a_recording_that_names_no_model_applies_to_every_model_of_its_kernels():
    assert recorded_for(BASE, HERE)
    assert recorded_for(BASE, {**HERE, "cpu_model": "CPU Y"})


def test_a_recording_that_names_its_model_applies_to_that_model_only():
    assert recorded_for({**BASE, "cpu_model": "CPU X"}, HERE)
    assert not recorded_for({**BASE, "cpu_model": "CPU Y"}, HERE)


def test_amx_left_out_means_no_amx_on_either_side():
    assert not recorded_for({**BASE, "amx": True}, HERE)
    assert not recorded_for(BASE, {**HERE, "amx": True})
    assert recorded_for({**BASE, "amx": True}, {**HERE, "amx": True})


def test_kernels_product_dtype_and_torch_must_agree():
    for key, other in (("cpu_capability", "AVX2"), ("native_bf16", False), ("torch", "2.14.1+cpu")):
        assert not recorded_for({**BASE, key: other}, HERE)


def test_this_machine_matches_its_own_environment():
    assert recorded_for(environment(), environment())


XEON = {**BASE, "native_bf16": False, "cpu_model": "Intel(R) Xeon(R) Processor @ 2.80GHz"}
OTHER_XEON = {**XEON, "cpu_model": "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"}
AVX2 = {**BASE, "cpu_capability": "AVX2", "native_bf16": False}


def test_a_machine_takes_the_recording_naming_its_model_before_one_naming_none():
    recordings = {"a.json": {k: v for k, v in XEON.items() if k != "cpu_model"}, "b.json": XEON}
    assert recording_for(recordings, XEON) == "b.json"
    assert recording_for(recordings, OTHER_XEON) == "a.json"
    assert recording_for(recordings, OTHER_XEON, unpinned=False) is None
    assert recording_for({"b.json": XEON}, OTHER_XEON) is None


def test_a_new_recording_is_named_by_its_kernels_and_by_its_model_where_that_name_is_taken():
    assert golden_file(AVX2 | {"cpu_model": "CPU X"}, {}) == "trajectories.json"
    assert golden_file(XEON, {}) == "trajectories_avx512.json"
    assert golden_file({**BASE, "amx": True}, {}) == "trajectories_avx512_bf16_amx.json"
    taken = {"trajectories_avx512.json": XEON}
    assert golden_file(XEON, taken) == "trajectories_avx512.json"  # its own file: re-recorded in place
    assert golden_file(OTHER_XEON, taken) == "trajectories_avx512_intel_r_xeon_r_gold_6338_cpu_2_00ghz.json"


def test_recording_where_an_unpinned_recording_applies_narrows_it_unless_beside():
    unpinned = {"trajectories.json": AVX2}
    here = {**AVX2, "cpu_model": "CPU X"}
    assert golden_file(here, unpinned) == "trajectories.json"
    assert golden_file(here, unpinned, unpinned=False) == "trajectories_cpu_x.json"
