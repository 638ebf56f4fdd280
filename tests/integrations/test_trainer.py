"""QNTrainer / QNTrainingArguments and the plain Trainer routes, re-implementing the Trainer's own checks."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from datasets import Dataset
from transformers import HfArgumentParser, Trainer, TrainerCallback

import hf_qn
from hf_qn.integrations.trainer import QNTrainer, QNTrainingArguments, build_optimizer, qn_args_for, unwrap_optimizer
from hf_qn.optim.mlbfgs import build_blocks
from tests._helpers.models import tiny_gpt2, tiny_llama
from tests._helpers.training import flat_state


class RegressionModel(nn.Module):
    """A plain module with the HF output convention: returns {"loss", "logits"}."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 3))

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = None if labels is None else ((out - labels) ** 2).mean()
        return {"loss": loss, "logits": out}


def regression_dataset(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    W = torch.randn(3, 6, generator=g)
    y = torch.tanh(x @ W.T)
    return Dataset.from_dict({"x": x.tolist(), "labels": y.tolist()}).with_format("torch")


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=2,
                logging_steps=2, save_strategy="no", report_to="none", use_cpu=True, seed=0,
                disable_tqdm=True, lr_scheduler_type="constant", dataloader_num_workers=0)
    base.update(kw)
    return QNTrainingArguments(**base)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(("name", "lr"), [("kbfgs", 0.2), ("kbfgs_l", 0.2), ("mlbfgs", 0.05)])
def test_qn_trainer_trains_and_logs_optimizer_statistics(tmp_path, name, lr):
    torch.manual_seed(0)
    model = RegressionModel()
    trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer=name, learning_rate=lr),
                        train_dataset=regression_dataset())
    result = trainer.train()
    inner = unwrap_optimizer(trainer.optimizer)
    assert type(inner).__name__ == {"kbfgs": "KBFGS", "kbfgs_l": "KBFGSL", "mlbfgs": "MLBFGS"}[name]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("qn/pairs_accepted" in h for h in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert result.global_step == 16
    if name.startswith("kbfgs"):
        assert inner.statistics()["qn/pairs_accepted"] > 0  # the second pass ran through the Trainer


def test_qn_arguments_parse_from_cli_and_json(tmp_path):
    parser = HfArgumentParser(QNTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--qn_optimizer", "kbfgs_l", "--qn_damping", "0.2",
         "--qn_history_size", "20", "--qn_exclude", "lm_head", "wte", "--use_cpu", "true"])
    assert (args.qn_optimizer, args.qn_damping, args.qn_history_size) == ("kbfgs_l", 0.2, 20)
    assert args.qn_exclude == ["lm_head", "wte"] and args.max_grad_norm == 0.0
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "qn_optimizer": "mlbfgs", "qn_update_interval": 5,
                                "use_cpu": True}))
    (args2,) = parser.parse_json_file(str(path))
    assert args2.qn_optimizer == "mlbfgs" and args2.qn_update_interval == 5
    with pytest.raises(ValueError, match="qn_optimizer"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="lbfgs", use_cpu=True)
    with pytest.raises(ValueError, match="matmul_dtype"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_matmul_dtype="fp8", use_cpu=True)
    args3 = QNTrainingArguments(output_dir=str(tmp_path), qn_matmul_dtype="bfloat16", qn_input_warm_start=4,
                                use_cpu=True)
    opt = build_optimizer("kbfgs", RegressionModel(), args3)
    assert (opt.defaults["matmul_dtype"], opt.defaults["input_warm_start"]) == ("bfloat16", 4)
    model = RegressionModel()  # layers of 112, 32 and 51 elements
    for flags, blocks, min_size, names in ((["--qn_min_block_size", "60"], "layer", 60, ["net.0", "net.2+net.3"]),
                                           (["--qn_blocks", "100"], 100, 0, ["chunk:net.0.weight", "chunk:net.2.weight"])):
        (args4,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--qn_optimizer", "mlbfgs", *flags, "--use_cpu", "true"])
        ml = build_optimizer("mlbfgs", model, args4)
        expected = build_blocks(list(model.named_parameters()), blocks, min_block_size=min_size)
        assert [b.name for b in ml.blocks] == [b.name for b in expected] == names
        assert [b.params for b in ml.blocks] == [b.params for b in expected]
    with pytest.raises(ValueError, match="blocks"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_blocks="rows", use_cpu=True)
    with pytest.raises(ValueError, match="min_block_size"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_min_block_size=-1, use_cpu=True)


def test_qn_args_reach_the_layer_policy_on_every_route(tmp_path):
    """Which layers K-BFGS adapts goes through the same ``qn_args`` as its hyperparameters (the fields of
    ``LayerPolicy``): from the command line, through a factory's kwargs, checked at argument time; the old
    ``--qn_exclude`` / ``--qn_max_dim`` warn and land there; the optimizer itself names the policy to pass."""
    import dataclasses

    from hf_qn.optim.config import KBFGSConfig, MLBFGSConfig

    policy = {f.name for f in dataclasses.fields(hf_qn.LayerPolicy)}
    assert not policy & ({f.name for f in dataclasses.fields(KBFGSConfig)}
                         | {f.name for f in dataclasses.fields(MLBFGSConfig)})  # split_kwargs is unambiguous
    parser = HfArgumentParser(QNTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--qn_optimizer", "kbfgs", "--use_cpu", "true",
         "--qn_args", "one_sided_heads=False,exclude=('down_proj',),damping=0.2"])
    opt = build_optimizer("kbfgs", tiny_llama(), args)
    sided = {a.name: a.one_sided for a in opt.adapters}
    assert sided["lm_head"] is False and opt.config.damping == 0.2  # the head's output factor is back
    assert "model.layers.0.mlp.down_proj" not in sided and "model.layers.0.mlp.up_proj" in sided
    assert build_optimizer("kbfgs", tiny_llama(), QNTrainingArguments(
        output_dir=str(tmp_path), qn_optimizer="kbfgs", use_cpu=True)).policy.one_sided_heads is True
    with pytest.raises(ValueError, match="Invalid qn_args for kbfgs: Invalid wide: 'diagonal'"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="kbfgs", use_cpu=True, qn_args="wide=diagonal")
    with pytest.raises(ValueError, match="Invalid qn_args for mlbfgs: Unknown MLBFGS.*'max_dim'"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="mlbfgs", use_cpu=True, qn_args="max_dim=64")
    # no optimizer chosen yet (a recipe): the policy's fields go to K-BFGS only
    both = QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True, qn_args="max_dim=64,normalize=unit")
    assert (qn_args_for("kbfgs", both.qn_args), qn_args_for("mlbfgs", both.qn_args)) == (
        {"max_dim": 64}, {"normalize": "unit"})
    with pytest.warns(FutureWarning, match="--qn_exclude is deprecated"):
        (old,) = parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--qn_optimizer", "kbfgs", "--use_cpu", "true",
             "--qn_exclude", "down_proj", "--qn_max_dim", "64"])
    assert old.qn_args == {"exclude": ("down_proj",), "max_dim": 64}
    assert build_optimizer("kbfgs", tiny_llama(), old).policy.exclude == ("down_proj",)
    # a factory's kwargs, flat or as policy=, but not both; the optimizer refuses the fields as hyperparameters
    factory = hf_qn.KBFGSFactory()(tiny_llama(), lr=1e-3, one_sided_heads=False)
    assert {a.name: a.one_sided for a in factory.adapters}["lm_head"] is False
    with pytest.raises(TypeError, match=r"\['max_dim'\] given beside policy="):
        hf_qn.KBFGSFactory()(tiny_llama(), max_dim=64, policy=hf_qn.LayerPolicy())
    with pytest.raises(TypeError, match=r"fields of LayerPolicy.*policy=hf_qn.LayerPolicy\(max_dim=64\)"):
        hf_qn.KBFGS(tiny_llama(), max_dim=64)


def test_qn_args_is_the_one_path_for_every_hyperparameter(tmp_path):
    """``--qn_args`` reaches every config field (as 'name=value,...', JSON or a dict), no field re-declared;
    a bad name or value fails at argument time, naming it; the old flags warn and land in the same place."""
    parser = HfArgumentParser(QNTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--qn_optimizer", "kbfgs", "--use_cpu", "true", "--learning_rate", "0.05",
         "--qn_args", "damping=0.2,update_interval=10,pairs=consecutive,max_loss_increase=None,"
         "fallback_betas=(0.9, 0.99),matmul_dtype=bfloat16"])
    opt = build_optimizer("kbfgs", RegressionModel(), args)
    assert (opt.config.damping, opt.config.update_interval, opt.config.pairs) == (0.2, 10, "consecutive")
    assert opt.config.max_loss_increase is None and opt.config.fallback_betas == (0.9, 0.99)
    assert (opt.config.matmul_dtype, opt.config.lr) == ("bfloat16", 0.05)
    as_json = QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="mlbfgs", use_cpu=True,
                                  qn_args='{"history_size": 4, "normalize": "unit", "blocks": 100}')
    ml = build_optimizer("mlbfgs", RegressionModel(), as_json)
    assert (ml.config.history_size, ml.config.normalize, ml.config.blocks) == (4, "unit", 100)
    as_dict = QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="kbfgs_l", use_cpu=True,
                                  qn_args={"history_size": 7})
    assert build_optimizer("kbfgs_l", RegressionModel(), as_dict).config.history_size == 7
    with pytest.raises(ValueError, match="Unknown KBFGS hyperparameter.*'dampin'"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="kbfgs", use_cpu=True, qn_args="dampin=0.2")
    with pytest.raises(ValueError, match="Invalid damping: -1"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="kbfgs", use_cpu=True, qn_args="damping=-1")
    with pytest.raises(ValueError, match="expected name=value"):
        QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="kbfgs", use_cpu=True, qn_args="damping")
    # no optimizer chosen yet (a recipe comparing several): each optimizer's values are checked together
    both = QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True,
                               qn_args="damping=3,lm_damping=additive,normalize=unit")
    assert both.qn_args == {"damping": 3, "lm_damping": "additive", "normalize": "unit"}
    with pytest.raises(ValueError, match="Invalid damping: 3.*lm_damping='additive'"):
        QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True, qn_args="damping=3")
    # a name both configurations have is checked for each; a preset goes to the optimizers that have it
    with pytest.raises(ValueError, match="Invalid qn_args for mlbfgs: Invalid history_size: None"):
        QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True, qn_args="history_size=None")
    with pytest.raises(ValueError, match="'dampin', 'preset' names a field of none of"):
        QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True, qn_args="dampin=0.2,preset=fast")
    paper = QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True, qn_args="preset=paper,lr=0.1,normalize=unit")
    assert qn_args_for("kbfgs", paper.qn_args) == {"preset": "paper", "lr": 0.1}
    assert qn_args_for("mlbfgs", paper.qn_args) == {"lr": 0.1, "normalize": "unit"}
    with pytest.warns(FutureWarning, match="--qn_damping is deprecated"):
        old = QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer="kbfgs", use_cpu=True, qn_damping=0.1)
    assert old.qn_args == {"damping": 0.1}


def test_kbfgs_second_pass_survives_evaluation_between_steps(tmp_path):
    """Evaluation calls optimizer.eval(); the next training step must still keep its batch."""
    trainer = QNTrainer(model=RegressionModel(), args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2,
                                                           qn_args="preset=paper", eval_strategy="steps",
                                                           eval_steps=2, max_steps=6),
                        train_dataset=regression_dataset(), eval_dataset=regression_dataset(16, seed=1))
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).statistics()["qn/pairs_accepted"] == 6 * 2


def test_loss_guard_runs_through_the_trainer(tmp_path):
    """At a far too large lr the guard re-measures the loss before the step (a second call of the closure
    provider in the same step) and undoes steps; training finishes with finite parameters."""
    torch.manual_seed(0)
    model = RegressionModel()
    trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=30.0,
                                                qn_args="preset=paper"),
                        train_dataset=regression_dataset())
    trainer.train()
    stats = unwrap_optimizer(trainer.optimizer).statistics()
    assert stats["qn/loss_checks"] > 0 and stats["qn/steps_rejected"] > 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    off = build_optimizer("kbfgs", RegressionModel(), _args(tmp_path, qn_optimizer="kbfgs", qn_max_loss_increase=float("inf")))
    assert off.hparams["max_loss_increase"] is None


def test_decay_split_is_honoured(tmp_path):
    model = RegressionModel()
    trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer="kbfgs", weight_decay=0.01),
                        train_dataset=regression_dataset())
    opt = trainer.create_optimizer()
    groups = {(g["role"], g["l2"] if g["role"] == "qn" else g["weight_decay"]): len(g["params"])
              for g in opt.param_groups}
    # biases and LayerNorm get no decay (the Trainer's rule); weights of adapted layers do
    assert groups[("qn", 0.01)] == 2 and groups[("qn", 0.0)] == 2 and groups[("fallback", 0.0)] == 2


def test_mlbfgs_decay_split_keeps_one_block_per_layer(tmp_path):
    model = RegressionModel()
    trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer="mlbfgs", weight_decay=0.01),
                        train_dataset=regression_dataset())
    opt = unwrap_optimizer(trainer.create_optimizer())
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.01]  # the split is there
    modules = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert sorted(b.name for b in opt.blocks) == sorted(modules)  # yet a layer's weight and bias share a block
    by_module = {name: {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[0] == name} for name in modules}
    assert all({id(p) for p in b.params} == by_module[b.name] for b in opt.blocks)


def test_plain_trainer_routes(tmp_path):
    """optimizers=(MLBFGS, None), optimizer_cls_and_kwargs with a class and with a factory, all train."""
    ds = regression_dataset()
    args = _args(tmp_path)
    start = RegressionModel().state_dict()
    finals = {}
    routes = {
        "instance": lambda m: dict(optimizers=(hf_qn.MLBFGS(m, lr=0.05), None)),
        "class": lambda m: dict(optimizer_cls_and_kwargs=(hf_qn.MLBFGS, {"lr": 0.05})),
        "factory": lambda m: dict(optimizer_cls_and_kwargs=(hf_qn.MLBFGSFactory, {"lr": 0.05})),
        "default": lambda m: {},
    }
    for route, make in routes.items():
        torch.manual_seed(0)
        model = RegressionModel()
        model.load_state_dict(start)
        trainer = Trainer(model=model, args=args, train_dataset=ds, **make(model))
        trainer.train()
        finals[route] = _params(model)
        if route != "default":
            assert isinstance(unwrap_optimizer(trainer.optimizer), hf_qn.MLBFGS)
    for route in ("instance", "class", "factory"):
        assert any(not torch.equal(a, b) for a, b in zip(finals[route], finals["default"]))


def test_plain_trainer_with_kbfgs_factory_points_to_qntrainer(tmp_path):
    trainer = Trainer(model=RegressionModel(), args=_args(tmp_path),
                      train_dataset=regression_dataset(),
                      optimizer_cls_and_kwargs=(hf_qn.KBFGSFactory, {"lr": 0.1, "preset": "paper"}))
    with pytest.raises(RuntimeError, match="QNTrainer"):  # the paper's same-batch pairs need a second pass
        trainer.train()
    # ... and the default (consecutive pairs, no second pass) works through the plain Trainer
    trainer = Trainer(model=RegressionModel(), args=_args(tmp_path), train_dataset=regression_dataset(),
                      optimizer_cls_and_kwargs=(hf_qn.KBFGSFactory, {"lr": 1e-2}))
    trainer.train()
    assert unwrap_optimizer(trainer.optimizer).statistics()["qn/pairs_accepted"] > 0


def test_learning_rates_schedule_both_parts(tmp_path):
    trainer = QNTrainer(model=RegressionModel(),
                        args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2, warmup_steps=4,
                                   lr_scheduler_type="linear", qn_fallback_lr=1e-3),
                        train_dataset=regression_dataset())
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[0] < lrs[1]  # warmup visible
    assert lrs[-1] < max(lrs)  # decay visible
    opt = unwrap_optimizer(trainer.optimizer)
    ratio = {g["role"]: g["lr"] / g["initial_lr"] for g in opt.param_groups}
    assert ratio["qn"] == pytest.approx(ratio["fallback"])


@pytest.mark.parametrize("name", ["kbfgs", "mlbfgs"])
def test_resume_from_checkpoint_is_bitwise(tmp_path, name):
    ds = regression_dataset()
    lr = 0.2 if name == "kbfgs" else 0.05

    def run(out, **kw):
        torch.manual_seed(0)
        model = RegressionModel()
        args = _args(tmp_path, output_dir=str(out), qn_optimizer=name, learning_rate=lr, save_strategy="steps",
                     save_steps=6, **kw)
        trainer = QNTrainer(model=model, args=args, train_dataset=ds)
        return trainer, model

    full, m_full = run(tmp_path / "full")
    full.train()
    part, _ = run(tmp_path / "part", max_steps=6)
    part.train()
    resumed, m_res = run(tmp_path / "part")
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    for a, b in zip(m_full.parameters(), m_res.parameters()):
        assert torch.equal(a, b)
    assert resumed.state.global_step == full.state.global_step
    assert os.path.exists(tmp_path / "part" / "checkpoint-6" / "optimizer.pt")


def test_gpt2_conv1d_tied_through_qn_trainer(tmp_path):
    torch.manual_seed(0)
    model = tiny_gpt2()
    ids = torch.randint(1, 97, (32, 16), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=3e-3,
                                                gradient_accumulation_steps=2, num_train_epochs=3),
                        train_dataset=ds)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert 0 < logs[-1]["qn/fallback_share"] < 0.05  # the tied wte/lm_head is the one-sided head; norms fall back


def test_model_card_tells_the_truth(tmp_path):
    ids = torch.randint(1, 97, (16, 8), generator=torch.Generator().manual_seed(0))
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}).with_format("torch")
    trainer = QNTrainer(model=tiny_gpt2(), args=_args(tmp_path, qn_optimizer="mlbfgs", learning_rate=0.05,
                                                      max_steps=2), train_dataset=ds)
    trainer.train()
    trainer.create_model_card(model_name="tiny")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "hf_qn.MLBFGS" in text and "OptimizerNames" not in text


def test_callbacks_see_steps_in_order(tmp_path):
    events = []

    class Spy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            events.append("pre")

        def on_optimizer_step(self, args, state, control, **kw):
            events.append("step")

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                events.append("log" if "qn/pairs_accepted" in logs else "log-without-stats")

    trainer = QNTrainer(model=RegressionModel(), args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2),
                        train_dataset=regression_dataset(), callbacks=[Spy()])
    trainer.train()
    assert events[:4] == ["pre", "step", "pre", "step"] and "log" in events and "log-without-stats" not in events


@pytest.mark.parametrize(("name", "setting", "match"), [
    ("kbfgs", "deepspeed", "flat partitions"), ("mlbfgs", "deepspeed", "flat partitions"),
    ("mlbfgs", "fsdp1", "fsdp_version: 2"), ("kbfgs", "fsdp1", "fsdp_version: 2"),
])
def test_deepspeed_and_fsdp1_are_refused_with_the_reason(tmp_path, monkeypatch, name, setting, match):
    from types import SimpleNamespace

    trainer = QNTrainer(model=RegressionModel(), args=_args(tmp_path, qn_optimizer=name),
                        train_dataset=regression_dataset())
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", setting == "deepspeed")
    monkeypatch.setattr(trainer, "is_fsdp_enabled", setting.startswith("fsdp"))
    version = 2 if setting == "fsdp2" else 1
    monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", SimpleNamespace(fsdp_version=version),
                        raising=False)
    with pytest.raises(ValueError, match=match):
        trainer.create_optimizer()


def test_pickling_the_prepared_optimizer():
    """As Accelerate's own check: the optimizer returned by prepare() pickles and keeps its state."""
    import pickle

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # Earlier Trainer runs leave weakrefs in Accelerate's shared GradientState, which the wrapper pickles
    # (for torch's AdamW too); Accelerate's own tests reset it first.
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for make in (lambda m: hf_qn.MLBFGS(m, lr=0.05), lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1),
                 lambda m: torch.optim.AdamW(m.parameters())):
        model = RegressionModel()
        accelerator = Accelerator(cpu=True)
        model, opt = accelerator.prepare(model, make(model))
        again = pickle.loads(pickle.dumps(opt))
        assert type(again.optimizer) is type(opt.optimizer)
        assert again.optimizer.state_dict()["param_groups"][0]["lr"] == opt.optimizer.param_groups[0]["lr"]


def test_injected_cpu_gradscaler_poisoned_step_commits_nothing(tmp_path):
    """fp16-style loss scaling through the Trainer: a poisoned gradient makes the scaler skip the step;
    K-BFGS's curvature is untouched and later steps capture unscaled statistics."""
    snapshots = {}

    class Poison(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step == 2:
                inner = unwrap_optimizer(optimizer)
                snapshots["before"] = {k: v.clone() for k, v in flat_state(inner, model.net[0].weight).items()}
                model.net[3].bias.grad[0] = float("inf")

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
            if state.global_step == 2:
                inner = unwrap_optimizer(optimizer)
                snapshots["after"] = {k: v.clone() for k, v in flat_state(inner, model.net[0].weight).items()}

    torch.manual_seed(0)
    model = RegressionModel()
    trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2, max_steps=5),
                        train_dataset=regression_dataset(), callbacks=[Poison()])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.accelerator.scaler = scaler  # accelerate creates none on CPU; inject as the upstream test does
    trainer.accelerator.native_amp = True
    trainer.train()
    inner = unwrap_optimizer(trainer.optimizer)
    assert inner.grad_scaler is scaler
    for k, v in snapshots["before"].items():
        assert torch.equal(v, snapshots["after"][k]), k
    assert inner.schedule.step == 4  # 5 steps, one skipped
    assert scaler.get_scale() < 2.0**8


def test_bf16_autocast_keeps_float32_curvature(tmp_path):
    torch.manual_seed(0)
    model = RegressionModel()
    trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2, bf16=True),
                        train_dataset=regression_dataset())
    trainer.train()
    st = unwrap_optimizer(trainer.optimizer).state[model.net[0].weight]
    assert st["output"]["H_g"].dtype == st["input"]["A"].dtype == torch.float32
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_hyperparameter_search_style_model_init_rebuilds_optimizer_and_hooks(tmp_path):
    """With model_init, each train() builds a new model; the optimizer and its hooks follow it."""
    inits = []

    def model_init():
        torch.manual_seed(len(inits))
        inits.append(RegressionModel())
        return inits[-1]

    trainer = QNTrainer(model_init=model_init, args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2,
                                                         max_steps=3), train_dataset=regression_dataset())
    trainer.train()
    first = unwrap_optimizer(trainer.optimizer)
    trainer.train()
    second = unwrap_optimizer(trainer.optimizer)
    assert second is not first
    assert second.adapters[0].module is trainer.model.net[0]
    assert second.schedule.step == 3


@pytest.mark.parametrize("name", ["kbfgs", "mlbfgs"])
def test_trainer_gradient_accumulation_2x4_matches_1x8(tmp_path, name):
    lr = 0.2 if name == "kbfgs" else 0.05
    finals = []
    for bs, ga in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = RegressionModel()
        # float32 products: bf16's (matmul_dtype="auto" where bf16 is native) round each micro-batch's Gram alone
        qn_args = {"matmul_dtype": "float32"} if name == "kbfgs" else None
        trainer = QNTrainer(model=model, args=_args(tmp_path, qn_optimizer=name, learning_rate=lr, max_steps=6,
                                                    per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                                                    qn_args=qn_args),
                            train_dataset=regression_dataset())
        trainer.train()
        finals.append(_params(model))
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_accelerate_accumulate_route_with_closure():
    """accelerator.prepare + accelerator.accumulate; the closure passes through AcceleratedOptimizer."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    ds = regression_dataset(32)
    x, y = ds["x"], ds["labels"]
    results = []
    for accum in (1, 2):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.manual_seed(0)
        model = RegressionModel()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        model, opt = accelerator.prepare(model, hf_qn.KBFGS(model, preset="paper", lr=0.2))
        micro = 8 // accum
        for step in range(4):
            xb, yb = x[step * 8 : (step + 1) * 8], y[step * 8 : (step + 1) * 8]
            for j in range(accum):
                part = slice(j * micro, (j + 1) * micro)
                with accelerator.accumulate(model):
                    accelerator.backward(model(xb[part], labels=yb[part])["loss"])

                    def closure(xb=xb, yb=yb):
                        for k in range(accum):
                            p = slice(k * micro, (k + 1) * micro)
                            accelerator.backward(model(xb[p], labels=yb[p])["loss"])

                    opt.step(closure)  # a no-op until the last micro-batch (sync_gradients)
                    opt.zero_grad()
        results.append(_params(accelerator.unwrap_model(model)))
        assert unwrap_optimizer(opt).statistics()["qn/pairs_accepted"] == 4 * 2
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("name", "lr", "wd"), [("kbfgs", None, 1e-5), ("mlbfgs", 1e-3, 0.0), (None, 5e-5, 0.0)])
def test_unset_learning_rate_and_weight_decay_are_the_optimizers_own(tmp_path, name, lr, wd, caplog):
    """K-BFGS's step size is not the Trainer's 5e-5: an unset learning_rate is the chosen optimizer's default
    (said in the log); K-BFGS's follows the model, so it stays None until the optimizer resolves it (3e-3 here, a
    plain module; 6e-3 for a language model trained from scratch, which the card and the schedule then carry); a
    set one is kept."""
    import logging

    with caplog.at_level(logging.INFO, logger="hf_qn.integrations.trainer"):
        args = QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer=name, use_cpu=True)
    assert (args.learning_rate, args.weight_decay) == (lr, wd)
    said = "chooses its default lr for the model" if lr is None else f"using {name}'s default"
    assert (said in caplog.text) == (name is not None)
    set_args = QNTrainingArguments(output_dir=str(tmp_path), qn_optimizer=name, use_cpu=True, learning_rate=0.01,
                                   weight_decay=0.1)
    assert (set_args.learning_rate, set_args.weight_decay) == (0.01, 0.1)
    if name is not None:
        assert build_optimizer(name, RegressionModel(), args).config.lr == (lr or 3e-3)
        assert build_optimizer(name, RegressionModel(), set_args).config.lr == 0.01
    if name == "kbfgs":
        torch.manual_seed(0)
        data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (16, 8))]
        trainer = QNTrainer(model=tiny_gpt2(), train_dataset=data,
                            args=_args(tmp_path, qn_optimizer="kbfgs", max_steps=4, lr_scheduler_type="constant"))
        trainer.train()
        assert trainer.args.learning_rate is None
        assert {g["lr"] for g in trainer.optimizer.param_groups} == {6e-3}
        trainer.create_model_card()
        assert "lr=0.006," in (tmp_path / "out" / "README.md").read_text()


def test_logs_count_per_interval_and_say_what_is_preconditioned(tmp_path, caplog):
    """qn/* counters in the logs count since the previous log line (their sum is the optimizer's total); a
    switch turns them to totals or off; one line at the start says what share each part preconditions."""
    import logging

    totals = {}
    for mode in ("interval", "total", "off"):
        torch.manual_seed(0)
        with caplog.at_level(logging.INFO, logger="hf_qn.integrations.trainer"):
            trainer = QNTrainer(model=RegressionModel(), train_dataset=regression_dataset(),
                                args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2, max_steps=8,
                                           logging_steps=2, qn_log_statistics=mode, qn_args="preset=paper"))
            trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        if mode == "off":
            assert not any("qn/pairs_accepted" in h for h in logs)
            continue
        totals[mode] = [h["qn/pairs_accepted"] for h in logs]
        assert "KBFGS preconditions 2 layers" in caplog.text and "fallback" in caplog.text
    assert sum(totals["interval"]) == totals["total"][-1] == 8 * 2
    assert all(b >= a for a, b in zip(totals["total"], totals["total"][1:]))
    assert all(v == 2 * 2 for v in totals["interval"])  # two layers, one pair each per step, two steps a line
    with pytest.raises(ValueError, match="qn_log_statistics"):
        _args(tmp_path, qn_log_statistics="sometimes")


def test_factor_norms_are_logged_only_when_asked(tmp_path):
    """K-BFGS's factor norms (a Lanczos pass over every factor) stay out of the log lines by default; with
    qn_log_factor_norms they are on every line that carries the loss, positive and finite."""
    for asked in (False, True):
        torch.manual_seed(0)
        trainer = QNTrainer(model=RegressionModel(), train_dataset=regression_dataset(),
                            args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2, max_steps=4,
                                       logging_steps=2, qn_log_factor_norms=asked, qn_args="preset=paper"))
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        assert logs and all("qn/pairs_accepted" in h for h in logs)
        for key in ("qn/max_norm_H_g", "qn/max_norm_H_a"):
            assert all((key in h) == asked for h in logs)
            assert not asked or all(0 < h[key] < float("inf") for h in logs)


def test_card_carries_the_configured_learning_rate(tmp_path):
    """After a linear schedule has taken the lr to 0, the card still says the configured one."""
    torch.manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 97, (16, 8))]
    trainer = QNTrainer(model=tiny_gpt2(), train_dataset=data,
                        args=_args(tmp_path, qn_optimizer="kbfgs", learning_rate=0.2, max_steps=4,
                                   lr_scheduler_type="linear"))
    trainer.train()
    assert trainer.optimizer.param_groups[0]["lr"] == 0.0
    trainer.create_model_card()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "hf_qn.KBFGS with" in card and "lr=0.2," in card and "lr=0.0," not in card


def test_benchmark_results_say_which_hf_qn_ran(tmp_path, monkeypatch):
    """A benchmark's ``code`` line names the hf_qn it imported: the directory, and in a git checkout the commit and
    whether hf_qn's files differ from it; outside one (an archive copy), the directory only."""
    import shutil
    import subprocess
    import sys

    from hf_qn.integrations import model_card

    root = os.path.dirname(os.path.dirname(os.path.abspath(hf_qn.__file__)))
    text = model_card.code_description()
    assert text.startswith(f"hf_qn {hf_qn.__version__} from {root}")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    pkg = tmp_path / "hf_qn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("__version__ = '9.9'\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    fake = type(hf_qn)("hf_qn")
    fake.__file__, fake.__version__ = str(pkg / "__init__.py"), "9.9"
    monkeypatch.setitem(sys.modules, "hf_qn", fake)
    assert model_card.code_description() == f"hf_qn 9.9 from {tmp_path} at {commit}"
    (pkg / "__init__.py").write_text("__version__ = '9.9'  # edited\n")
    assert model_card.code_description() == f"hf_qn 9.9 from {tmp_path} at {commit}, with uncommitted changes to hf_qn/"
    shutil.rmtree(tmp_path / ".git")
    assert model_card.code_description() == f"hf_qn 9.9 from {tmp_path}"


def test_benchmark_cards_say_whether_the_cpu_multiplies_bf16(monkeypatch):
    """The cards' hardware line names the CPU model and native bf16, which decides K-BFGS's
    ``matmul_dtype="auto"``."""
    if torch.cuda.is_available():
        pytest.skip("the hardware line names the GPU")
    from hf_qn.integrations import model_card
    from hf_qn.integrations.model_card import hardware_description
    from hf_qn.optim import config as config_module

    monkeypatch.setattr(model_card, "cpu_info", lambda: {"model name": "Example CPU 9000"})
    for flags, words in ((frozenset({"avx2"}), "(no native bf16)"), (frozenset({"avx512_bf16"}), "(native bf16)")):
        monkeypatch.setattr(config_module, "_cpu_flags", lambda flags=flags: flags)
        config_module.fast_bf16.cache_clear()
        assert "Example CPU 9000 " + words in hardware_description()
    config_module.fast_bf16.cache_clear()
