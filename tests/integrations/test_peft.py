"""hf_qn on peft's LoRA models: the adapters' ``lora_A`` / ``lora_B`` are ordinary ``nn.Linear`` layers to K-BFGS,
the frozen base holds no optimizer state, and a LoRA run through ``QNTrainer`` resumes exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hf_qn
from hf_qn.integrations.trainer import QNTrainer, QNTrainingArguments, unwrap_optimizer
from tests._helpers.models import tiny_bert, tiny_llama
from tests._helpers.training import loop, mse_loss, regression_batches

peft = pytest.importorskip("peft")


class HandLoRA(nn.Module):
    """``base(x) + scaling * B(A(x))`` written out, the base frozen: what peft's LoRA layer computes."""

    def __init__(self, base: nn.Linear, A: nn.Linear, B: nn.Linear, scaling: float) -> None:
        super().__init__()
        self.base, self.A, self.B, self.scaling = base, A, B, scaling
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.B(self.A(x))


def lora_mlp(init_lora_weights: bool | str = False) -> tuple[nn.Module, nn.Module]:
    """A peft LoRA model over a small MLP and the same model written by hand, with equal weights."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=init_lora_weights)
    model = peft.get_peft_model(copy.deepcopy(base), config)
    layers = [model.base_model.model[i] for i in (0, 2)]
    hand = nn.Sequential(*(HandLoRA(copy.deepcopy(layer.base_layer), copy.deepcopy(layer.lora_A["default"]),
                                    copy.deepcopy(layer.lora_B["default"]), layer.scaling["default"])
                           for layer in layers))
    hand.insert(1, nn.Tanh())
    return model, hand


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n or n.endswith((".A.weight", ".B.weight"))]


def test_kbfgs_on_a_lora_model_is_kbfgs_on_the_same_model_written_by_hand():
    """30 steps (the curvature warm-up, then steps between curvature updates): the same losses and adapter
    weights, whether the LoRA layers are peft's or hand-written ``nn.Linear`` pairs; the frozen base unchanged."""
    model, hand = lora_mlp()
    frozen = [p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n]
    batches = regression_batches(30, d_out=3)
    runs = []
    for m in (model, hand):
        opt = hf_qn.KBFGS(m, lr=3e-3)
        runs.append(loop(m, opt, batches, mse_loss, closure=False))
        assert opt.statistics()["qn/pairs_accepted"] > 0
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)
    assert runs[0][-1] < runs[0][0]
    for a, b in zip(lora_params(model), lora_params(hand), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for p, before in zip((p for n, p in model.named_parameters() if "base_layer" in n), frozen, strict=True):
        assert torch.equal(p, before)


@pytest.mark.parametrize("make", [lambda m: hf_qn.KBFGS(m, lr=3e-3), lambda m: hf_qn.MLBFGS(m, lr=1e-3)],
                         ids=["kbfgs", "mlbfgs"])
def test_the_frozen_base_holds_no_state_and_peft_default_init_trains(make):
    """peft's default init (``B = 0``, so ``A`` has no gradient signal at first): every step finite, the adapters
    trained, and state only for the adapters' parameters."""
    model, _ = lora_mlp(init_lora_weights=True)
    opt = make(model)
    losses = loop(model, opt, regression_batches(25, d_out=3), mse_loss, closure=False)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora_params(model)}
    assert {id(p) for p in opt.state if opt.state[p]} <= trainable
    assert all(float(p.detach().abs().sum()) > 0 for p in lora_params(model))  # B moved off zero, then A


def test_qntrainer_resumes_a_lora_fine_tune_exactly(tmp_path):
    """A LoRA BERT classifier through QNTrainer (peft's SEQ_CLS: the head trained whole): stopped at a checkpoint
    and resumed, it ends with the weights of the uninterrupted run (the adapters and the head; the base never
    moves)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (48, 8), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()}).with_format("torch")

    def run(out):
        torch.manual_seed(0)
        model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                                 task_type="SEQ_CLS"))
        args = QNTrainingArguments(output_dir=str(out), qn_optimizer="kbfgs", learning_rate=3e-3,
                                   per_device_train_batch_size=8, num_train_epochs=2, save_strategy="steps",
                                   save_steps=6, report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
        return QNTrainer(model=model, args=args, train_dataset=ds), model

    full, m_full = run(tmp_path / "full")
    full.train()  # saves checkpoint-6 half way (the Trainer's linear schedule over the 12 steps)
    resumed, m_res = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert resumed.state.global_step == full.state.global_step == 12
    for (name, a), b in zip(m_full.named_parameters(), m_res.parameters(), strict=True):
        assert torch.equal(a, b), name
    opt = unwrap_optimizer(full.optimizer)
    assert opt.statistics()["qn/pairs_accepted"] > 0


def test_the_coverage_line_and_the_fallback_share_count_what_trains():
    """On a LoRA model the Trainer's coverage line counts the layers and parameters that train (the adapters of
    2 layers x (query, value) x (lora_A, lora_B), and the head) and names the frozen share; ``qn/fallback_share``
    is a share of the trainable parameters (none here: the head's bias belongs to its layer)."""
    from hf_qn.integrations.trainer import coverage_line

    model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, target_modules=["query", "value"],
                                                             task_type="SEQ_CLS"))
    opt = hf_qn.KBFGS(model, lr=3e-3)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    line = coverage_line(opt)
    assert line.startswith("KBFGS preconditions 9 layers, 100.0% of the trainable parameters")
    assert f"{100 * frozen / sum(p.numel() for p in model.parameters()):.1f}% of all parameters are frozen" in line
    assert opt.statistics(factor_norms=False)["qn/fallback_share"] == 0.0


def test_a_head_in_modules_to_save_is_one_sided_as_the_head_it_copies():
    """``modules_to_save=["lm_head"]`` wraps the head (``get_output_embeddings()`` returns peft's wrapper): the
    trainable copy inside is the LM head, preconditioned one-sided as the plain model's head is, and it trains."""
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    opt = hf_qn.KBFGS(model, lr=3e-3, update_interval=1)
    sided = {a.name: a.one_sided for a in opt.adapters if any(p.requires_grad for p in a.parameters())}
    assert sided.pop("base_model.model.lm_head.modules_to_save.default") is True
    assert len(sided) == 4 and not any(sided.values())  # (q, v) x (lora_A, lora_B) keep both factors
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    before = head.detach().clone()
    ids = torch.randint(0, 97, (4, 12))
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert not torch.equal(head, before)
    assert opt.state_dict()["state"] and opt.layers[[a.name for a in opt.adapters].index(
        "base_model.model.lm_head.modules_to_save.default")].state["output"] == {}
