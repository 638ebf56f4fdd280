"""torch.optim's generic optimizer tests, applied to hf_qn's optimizers.

The optimizers are registered as ``OptimizerInfo`` entries of ``torch.testing._internal.common_optimizers``
(the registry torch's own ``test/test_optim.py`` runs over ``optim_db``), with their inputs and their error
inputs. The generic checks of ``TestOptimRenewed`` are written out below for them. torch's tests build an
optimizer from a list of tensors and compute ``weight.mv(input) + bias`` functionally; mL-BFGS takes exactly
that. K-BFGS preconditions *layers* (it needs the module to hook), so it gets the same weight and bias inside
an ``nn.Linear`` and the same loss through it, in both pairing modes.

Generic tests that do not apply, and why:

* ``test_optim_infos_do_not_specify_global_cliquey_kwargs`` is kept; the ``foreach`` / ``fused`` /
  ``differentiable`` / ``capturable`` / ``maximize`` variants are not options of hf_qn (one multi-tensor
  implementation, not differentiable, no ``maximize``), so every test that compares them does not apply.
* ``test_complex`` / ``test_complex_2d``: complex parameters are refused at construction (``test_errors``).
* ``test_rosenbrock_sparse`` and the sparse variants: sparse gradients are refused (``test_errors``).
* CUDA, multi-GPU, mixed-device and ``torch.compile`` tests: no GPU in CI; ``tests/test_cuda.py`` runs the
  state contract on a GPU when one is there.
* ``test_param_groups_lr`` / ``test_param_group_with_lrscheduler_goes_right_direction`` for K-BFGS: K-BFGS
  builds its own param groups from the model (a K-BFGS part and a fallback part); the per-group learning rates
  it reads are tested in ``tests/optim/test_misuse.py`` (``add_param_group``) and below for mL-BFGS.
* ``test_param_groups_lr`` for mL-BFGS runs with per-group ``lr`` / ``momentum`` / ``weight_decay`` only:
  its other hyperparameters act on whole blocks, and groups that disagree on them are refused.
* ``test_load_nontensor_step``: hf_qn's counters are tensors by contract (``tests/optim/test_state_layout.py``).
* ``test_can_load_older_state_dict`` as torch writes it deletes the newer flags; hf_qn's older states are
  its format-1 checkpoints, converted on load (``tests/golden/test_golden.py``).
"""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import Parameter
from torch.optim.lr_scheduler import ReduceLROnPlateau, StepLR
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

pytest.importorskip("expecttest")  # torch.testing._internal imports it
from torch.testing._internal.common_optimizers import (
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
)

import hf_qn


def _mlbfgs_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(params=None, kwargs={"lr": 1e-2}, desc="default, Adam grafting"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "update_interval": 2, "history_size": 3}, desc="pairs"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "weight_decay": 0.1}, desc="decoupled weight decay"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "normalize": "unit", "update_interval": 2}, desc="unit"),
        OptimizerInput(params=None, kwargs={"lr": 1e-2, "blocks": "model", "history_dtype": torch.bfloat16,
                                            "update_interval": 2}, desc="one block, bf16 history"),
    ]


def _kbfgs_inputs(device: Any = None, dtype: Any = None) -> list[OptimizerInput]:
    return [
        OptimizerInput(params=None, kwargs={"lr": 0.05}, desc="same batch, dense H_g"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "history_size": 3}, desc="same batch, L-BFGS H_g"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "update_interval": 3, "warmup_curvature_steps": 2},
                       desc="interval"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "pairs": "consecutive"}, desc="consecutive pairs"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "l2": 0.0, "input_inverse": "cholesky"}, desc="cholesky"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "output_side": "kfac"}, desc="K-FAC output factor"),
        OptimizerInput(params=None, kwargs={"lr": 0.05, "output_side": "none", "pairs": "consecutive"},
                       desc="no output factor"),
    ]


def _errors(device: Any = None, dtype: Any = None) -> list[ErrorOptimizerInput]:
    def bad(kwargs: dict[str, Any], error_type: type, regex: str, params: Any = None) -> ErrorOptimizerInput:
        return ErrorOptimizerInput(OptimizerInput(params=params, kwargs=kwargs), error_type=error_type,
                                   error_regex=regex)

    complex_param = [Parameter(torch.randn(2, 2, dtype=torch.complex64))]
    return [
        bad({"lr": -1.0}, ValueError, "Invalid lr: -1.0"),
        bad({"lr": torch.tensor(0.1)}, ValueError, "lr as a Tensor is not supported"),
        bad({"lr": "0.1"}, TypeError, "Invalid lr: '0.1'"),
        bad({"history_size": 0}, ValueError, "Invalid history_size"),
        bad({"update_interval": 2.5}, ValueError, "Invalid update_interval"),
        bad({"no_such_option": 1}, TypeError, "Unknown .* hyperparameter.*no_such_option"),
        bad({}, ValueError, "complex parameters", params=complex_param),
    ]


#: torch's OptimizerInfo entries for hf_qn's optimizers (``optim_cls`` is what the tests construct).
OPTIM_DB = [
    OptimizerInfo(hf_qn.MLBFGS, optim_inputs_func=_mlbfgs_inputs, optim_error_inputs_func=_errors,
                  scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
                                    [lambda opt: ReduceLROnPlateau(opt)]),
                  supported_impls=(), supports_complex=False, supports_sparse=False),
    OptimizerInfo(hf_qn.KBFGS, optim_inputs_func=_kbfgs_inputs, optim_error_inputs_func=_errors,
                  scheduler_inputs=([lambda opt: StepLR(opt, gamma=0.9, step_size=10)],
                                    [lambda opt: ReduceLROnPlateau(opt)]),
                  supported_impls=(), supports_complex=False, supports_sparse=False, step_requires_closure=True),
]
IDS = [info.optim_cls.__name__ for info in OPTIM_DB]


Tensor = torch.Tensor


class Problem:
    """torch's test problem, ``loss = ‖W x + b‖²``, with ``W``, ``b`` as given; K-BFGS gets them in a Linear."""

    def __init__(self, info: OptimizerInfo, weight: Tensor, bias: Tensor, x: Tensor, kwargs: dict[str, Any]):
        self.weight, self.bias, self.x = Parameter(weight), Parameter(bias), x
        if info.optim_cls is hf_qn.KBFGS:
            self.linear = nn.Linear(weight.shape[1], weight.shape[0])
            self.linear.weight, self.linear.bias = self.weight, self.bias
            self.opt = hf_qn.KBFGS(self.linear, **kwargs)
        else:
            self.linear = None
            self.opt = info.optim_cls([self.weight, self.bias], **kwargs)

    def loss(self) -> Tensor:
        y = self.linear(self.x.unsqueeze(0))[0] if self.linear is not None else self.weight.mv(self.x) + self.bias
        return y.pow(2).sum()

    def closure(self) -> Tensor:
        self.opt.zero_grad()
        loss = self.loss()
        loss.backward()
        return loss

    def train(self, steps: int, schedulers: list[Any] = ()) -> None:  # type: ignore[assignment]
        for _ in range(steps):
            loss = self.opt.step(self.closure)
            for s in schedulers:
                s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()


def _inputs(info: OptimizerInfo) -> list[dict[str, Any]]:
    return [copy.deepcopy(i.kwargs) for i in info.optim_inputs_func(device="cpu")]


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_optim_infos_do_not_specify_global_cliquey_kwargs(info):
    for kwargs in _inputs(info):
        assert not {"foreach", "fused", "differentiable"} & set(kwargs)


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_errors(info):
    for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
        inp = error.optimizer_error_input
        assert error.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
        params = inp.params if inp.params is not None else [Parameter(torch.randn(3, 2)), Parameter(torch.randn(3))]
        with pytest.raises(error.error_type, match=error.error_regex):
            if info.optim_cls is hf_qn.KBFGS:
                linear = nn.Linear(2, 2) if inp.params is None else nn.Linear(2, 2).to(params[0].dtype)
                info.optim_cls(linear, **inp.kwargs)
            else:
                info.optim_cls(params, **inp.kwargs)


@pytest.mark.parametrize("with_lrsched", [False, True])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_forloop_goes_right_direction(info, contiguous, with_lrsched):
    for schedulers in info.scheduler_inputs if with_lrsched else [[]]:
        for kwargs in _inputs(info):
            torch.manual_seed(0)
            if contiguous:
                weight, bias = torch.randn(10, 5), torch.randn(10)
            else:
                weight, bias = torch.randn(10, 5, 2)[..., 0], torch.randn(10, 2)[..., 0]
            prob = Problem(info, weight, bias, torch.randn(5), kwargs)
            initial = prob.loss().item()
            prob.train(20, [s(prob.opt) for s in schedulers])
            assert prob.loss().item() < initial, kwargs


@pytest.mark.parametrize("info", OPTIM_DB[:1], ids=IDS[:1])
def test_param_group_with_lrscheduler_goes_right_direction(info):
    for schedulers in info.scheduler_inputs:
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        x = torch.randn(5)
        opt = info.optim_cls([{"params": [weight]}, {"params": [bias], "lr": 0.01}])
        scheds = [s(opt) for s in schedulers]

        def closure(opt=opt, weight=weight, bias=bias, x=x):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            return loss

        initial = closure().item()
        for _ in range(20):
            loss = opt.step(closure)
            for s in scheds:
                s.step(loss) if isinstance(s, ReduceLROnPlateau) else s.step()
        assert closure().item() < initial


@pytest.mark.parametrize("info", OPTIM_DB[:1], ids=IDS[:1])
def test_param_groups_lr(info):
    """A group with a ~0 lr leaves its parameter alone while the other group trains (mL-BFGS's Adam grafting
    is per block, so groups are independent). Deviation from torch's version: only ``lr``, ``momentum`` and
    ``weight_decay`` may differ between mL-BFGS's groups (the rest act on whole blocks, and groups that
    disagree on them are refused, naming the value), so the input's other values are the optimizer's."""
    for kwargs in _inputs(info):
        torch.manual_seed(0)
        weight, bias = Parameter(torch.randn(10, 5)), Parameter(torch.randn(10))
        irrelevant = Parameter(torch.randn(2))
        keep = irrelevant.detach().clone()
        x = torch.randn(5)
        if kwargs.get("normalize") == "unit" or kwargs.get("blocks") == "model":
            continue  # a global norm or one block couples the groups by design
        group = {k: v for k, v in kwargs.items() if k in ("lr", "momentum", "weight_decay")}
        rest = {k: v for k, v in kwargs.items() if k not in group}
        opt = info.optim_cls([dict(params=[weight, bias], **group), dict(params=[irrelevant])], lr=1e-28, **rest)
        initial = (weight.mv(x) + bias).pow(2).sum().item()
        for _ in range(20):
            opt.zero_grad()
            loss = (weight.mv(x) + bias).pow(2).sum()
            loss.backward()
            irrelevant.grad = torch.rand_like(irrelevant)
            opt.step()
        assert loss.item() < initial
        assert torch.equal(irrelevant, keep)


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_step_is_noop_when_params_have_no_grad(info):
    for kwargs in _inputs(info):
        torch.manual_seed(0)
        prob = Problem(info, torch.randn(2, 3), torch.randn(2), torch.randn(3), kwargs)
        for p in (prob.weight, prob.bias):
            p.requires_grad_(False)
        old = [prob.weight.detach().clone(), prob.bias.detach().clone()]
        prob.opt.step(lambda: torch.tensor([1.0]))
        assert torch.equal(old[0], prob.weight) and torch.equal(old[1], prob.bias)


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_step_is_noop_for_zero_grads(info):
    """Zero gradients move nothing (inputs with weight decay or L2 skipped, as torch does). K-BFGS's hooks need a
    forward: a loss of 0 · output gives exact zero gradients through the layer."""
    for kwargs in _inputs(info):
        if kwargs.get("weight_decay", 0) != 0:
            continue
        kwargs.setdefault("l2", 0.0) if info.optim_cls is hf_qn.KBFGS else None
        torch.manual_seed(0)
        prob = Problem(info, torch.randn(5, 1), torch.randn(5), torch.randn(1), kwargs)
        old = [prob.weight.detach().clone(), prob.bias.detach().clone()]

        def zero_closure(prob=prob):
            prob.opt.zero_grad()
            loss = 0.0 * prob.loss()
            loss.backward()
            return loss

        for _ in range(3):
            prob.opt.step(zero_closure)
        assert torch.equal(old[0], prob.weight) and torch.equal(old[1], prob.bias), kwargs


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_optimizer_can_be_printed(info):
    for kwargs in _inputs(info):
        prob = Problem(info, torch.randn(2, 3), torch.randn(2), torch.randn(3), kwargs)
        assert type(prob.opt).__name__ in repr(prob.opt)


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_state_dict_deterministic(info):
    """A state loaded into an optimizer of equal (not identical) parameters continues in lockstep; the state
    dicts are equal; loading does not modify the loaded dict; repeated groups have identical representation."""
    for kwargs in _inputs(info):
        torch.manual_seed(0)
        weight, bias, x = torch.randn(2, 3), torch.randn(2), torch.randn(3)
        prob = Problem(info, weight, bias, x, kwargs)
        prob.train(10)
        twin = Problem(info, prob.weight.detach().clone(), prob.bias.detach().clone(), x, kwargs)
        saved = copy.deepcopy(prob.opt.state_dict())
        loaded = copy.deepcopy(saved)
        twin.opt.load_state_dict(loaded)
        _assert_equal(loaded, saved)
        for _ in range(10):
            prob.train(1)
            twin.train(1)
            assert torch.equal(prob.weight, twin.weight) and torch.equal(prob.bias, twin.bias), kwargs
        _assert_equal(prob.opt.state_dict(), twin.opt.state_dict())
        twin.opt.param_groups.extend(twin.opt.param_groups)
        _assert_equal(prob.opt.state_dict()["param_groups"][-1], twin.opt.state_dict()["param_groups"][-1])


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_save_load_equality_with_weights_only(info):
    for kwargs in _inputs(info):
        torch.manual_seed(0)
        prob = Problem(info, torch.randn(2, 3), torch.randn(2), torch.randn(3), kwargs)
        prob.train(5)
        buf = io.BytesIO()
        torch.save(prob.opt.state_dict(), buf)
        buf.seek(0)
        _assert_equal(torch.load(buf, weights_only=True), prob.opt.state_dict())


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_deepcopy_copies_all_public_attrs(info):
    for kwargs in _inputs(info):
        prob = Problem(info, torch.randn(2, 3), torch.randn(2), torch.randn(3), kwargs)
        prob.train(2)
        public = {k for k in prob.opt.__dict__ if not k.startswith("_")}
        assert public == {k for k in copy.deepcopy(prob.opt).__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_step_hooks_fire_in_order(info):
    """Global and per-optimizer step pre/post hooks fire around every step, in torch's order."""
    prob = Problem(info, torch.randn(2, 3), torch.randn(2), torch.randn(3), _inputs(info)[0])
    calls: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda *a: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda *a: calls.append("global post")),
        prob.opt.register_step_pre_hook(lambda *a: calls.append("pre")),
        prob.opt.register_step_post_hook(lambda *a: calls.append("post")),
    ]
    try:
        prob.train(2)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["global pre", "pre", "post", "global post"] * 2


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_state_dict_and_load_state_dict_hooks(info):
    prob = Problem(info, torch.randn(2, 3), torch.randn(2), torch.randn(3), _inputs(info)[0])
    prob.train(2)
    seen: list[str] = []
    prob.opt.register_state_dict_pre_hook(lambda opt: seen.append("sd pre"))
    prob.opt.register_state_dict_post_hook(lambda opt, sd: {**sd, "extra": 1})
    prob.opt.register_load_state_dict_pre_hook(lambda opt, sd: seen.append("load pre"))
    prob.opt.register_load_state_dict_post_hook(lambda opt: seen.append("load post"))
    sd = prob.opt.state_dict()
    assert sd["extra"] == 1 and "hf_qn" in sd
    prob.opt.load_state_dict(sd)
    assert seen == ["sd pre", "load pre", "load post"]
    prob.train(1)


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_non_empty_state(info):
    """Every parameter the optimizer keeps state for has a non-empty entry after steps."""
    for kwargs in _inputs(info):
        prob = Problem(info, torch.randn(2, 3), torch.randn(2), torch.randn(3), kwargs)
        prob.train(3)
        assert prob.opt.state and all(len(st) > 0 for st in prob.opt.state.values())


def _assert_equal(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested state dicts (tensors by value, dtype and shape; everything else by ==)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    else:
        assert a == b, path


