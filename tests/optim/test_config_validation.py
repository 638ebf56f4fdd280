"""Every constructor argument is validated in one place: over the whole argument space (hypothesis), a value
either builds a configuration that holds it, or raises ``ValueError`` / ``TypeError`` naming the argument."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_qn.optim.config import KBFGSConfig, MLBFGSConfig

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["layer", "param", "model", "adam", "unit", "auto", "interpolate", "bfgs", "same_batch",
                     "consecutive", "float32", "bfloat16", "sgd", "adamw"]),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.tensor(0.1), (0.9, 0.99), (0.9,), [0.5]]),
)


def _check(cls, name, value):
    try:
        cfg = cls.from_kwargs(**{name: value})
    except (ValueError, TypeError) as err:
        assert name in str(err), f"{name}={value!r}: the error does not name the argument: {err}"
        return
    held = getattr(cfg, name)
    if isinstance(held, float) and isinstance(value, float) and math.isnan(value):
        raise AssertionError(f"{name}=nan accepted")
    for number in (held,) if not isinstance(held, tuple) else held:
        if isinstance(number, float):
            assert math.isfinite(number), f"{name}={value!r} accepted as {number}"
    again = cls.from_kwargs(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})
    assert again == cfg  # what it holds is itself valid


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([f.name for f in dataclasses.fields(KBFGSConfig)]), VALUES)
def test_kbfgs_config_accepts_or_names_the_argument(name, value):
    _check(KBFGSConfig, name, value)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([f.name for f in dataclasses.fields(MLBFGSConfig)]), VALUES)
def test_mlbfgs_config_accepts_or_names_the_argument(name, value):
    _check(MLBFGSConfig, name, value)


def test_the_values_the_old_validation_let_through_are_refused():
    bad = [(KBFGSConfig, {"fallback_betas": (0.9,)}), (KBFGSConfig, {"lr": torch.tensor([0.1, 0.2])}),
           (MLBFGSConfig, {"min_block_size": -1}), (MLBFGSConfig, {"min_block_size": 2.5}),
           (MLBFGSConfig, {"min_block_size": float("nan")}), (MLBFGSConfig, {"gamma": math.inf}),
           (MLBFGSConfig, {"damp": "no"}), (KBFGSConfig, {"update_interval": float("nan")})]
    for cls, kwargs in bad:
        name = next(iter(kwargs))
        try:
            cls.from_kwargs(**kwargs)
        except (ValueError, TypeError) as err:
            assert name in str(err)
        else:
            raise AssertionError(f"{cls.__name__}({kwargs}) was accepted")


def _documented_defaults(cls) -> dict[str, str | None]:
    """Per field, the first token after ``(default:`` in its entry of the class docstring's Attributes (None for
    an entry that documents several fields at once, whose defaults are listed together)."""
    entries = re.split(r"\n {8}(?=[a-z_0-9, ]+: )", cls.__doc__.split("Attributes:")[1])
    out: dict[str, str | None] = {}
    for entry in entries:
        names, _, body = entry.partition(": ")
        names_list = [n.strip() for n in names.split(",")]
        match = re.search(r"\(default: `*\"?([^`\",;:)\s]+)", body)
        for n in names_list:
            out[n] = match.group(1) if match and len(names_list) == 1 else None
    return out


@pytest.mark.parametrize("cls", [KBFGSConfig, MLBFGSConfig])
def test_every_field_is_documented_with_its_actual_default(cls):
    documented = _documented_defaults(cls)
    for f in dataclasses.fields(cls):
        assert f.name in documented, f"{cls.__name__}.{f.name} has no entry in the docstring's Attributes"
        token = documented[f.name]
        if token is None:
            continue
        if f.default is None or isinstance(f.default, (bool, str)):
            assert token == str(f.default), f"{cls.__name__}.{f.name}: docstring says {token}, default {f.default!r}"
        else:
            assert float(token) == f.default, f"{cls.__name__}.{f.name}: docstring says {token}, default {f.default}"
