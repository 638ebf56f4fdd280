"""Which golden recording applies to a machine (``recorded_for``): every fact that either side names agrees."""

from __future__ import annotations

from tests.golden.variants import environment, recorded_for

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
