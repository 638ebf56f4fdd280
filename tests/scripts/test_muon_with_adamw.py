"""The Muon peer (scripts/muon_with_adamw.py): its share of each model family, one optimizer that steps exactly as
torch's Muon and AdamW side by side, exact checkpoints, and the Trainer's factory route."""

from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch
from torch import nn

from tests._helpers.scripts import SCRIPTS


@pytest.fixture(scope="module")
def mwa():
    sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module("muon_with_adamw")  # the module the recipes and the benchmark import


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=24, num_labels=2))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_float32_newton_schulz_orthogonalizes_like_torchs(mwa):
    """The float32 Newton-Schulz gives Muon's ``U S' Vᵀ`` with S' near 1, as torch's bf16 one does, closer."""
    import torch.optim._muon as muon

    G = torch.randn(48, 24, generator=torch.Generator().manual_seed(0))
    args = ((3.4445, -4.775, 2.0315), 5, 1e-7)
    ours, torchs = mwa.newton_schulz_float32(G, *args), muon._zeropower_via_newtonschulz(G, *args).float()
    assert ours.dtype == torch.float32 and ours.shape == G.shape
    s = torch.linalg.svdvals(ours)
    assert float(s.min()) > 0.5 and float(s.max()) < 1.5
    assert float((ours - torchs).norm() / torchs.norm()) < 0.05  # the same map, bf16 rounding apart
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert float((ours * (U @ Vh)).sum() / (ours.norm() * (U @ Vh).norm())) > 0.95


def test_muons_share_is_the_block_matrices_of_an_encoder(mwa):
    """BERT: the six matrices of each encoder layer; the embeddings, pooler and classifier go to AdamW, as do
    frozen matrices (not trained at all) and an embedding inside a block."""
    bert = _bert()
    names = mwa.hidden_matrices(bert)
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    assert names == [f"bert.encoder.layer.{i}.{m}.weight" for i in range(2) for m in per_layer]
    bert.bert.encoder.layer[1].output.dense.weight.requires_grad_(False)
    assert "bert.encoder.layer.1.output.dense.weight" not in mwa.hidden_matrices(bert)
    blocks = nn.ModuleList([nn.ModuleDict({"emb": nn.Embedding(5, 3), "proj": nn.Linear(3, 3)})])
    assert mwa.hidden_matrices(nn.ModuleDict({"blocks": blocks})) == ["blocks.0.proj.weight"]


def _twin_steps(opt, model, steps, scheduler=None):
    """``steps`` steps of ``opt`` on fixed gradients (the same for every model built by the same seed)."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("float32", [False, True])
def test_one_optimizer_steps_exactly_as_muon_and_adamw_side_by_side(mwa, float32):
    """MuonWithAdamW = torch.optim.Muon on the block matrices + fused AdamW on the rest (each with its own lr and
    weight decay), bit for bit, and a scheduler's lr reaches both parts."""
    ours_model, ref_model = _llama(), _llama()
    names = set(mwa.hidden_matrices(ours_model))

    def split(model):
        hidden = [p for n, p in model.named_parameters() if n in names]
        rest = [p for n, p in model.named_parameters() if n not in names]
        return hidden, rest

    hidden, rest = split(ours_model)
    ours = mwa.MuonWithAdamW(hidden, rest, 0.02, adamw_lr=1e-3, weight_decay=0.1, float32_newton_schulz=float32)
    hidden, rest = split(ref_model)
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1, fused=True)
    halve = torch.optim.lr_scheduler.LambdaLR(ours, lambda step: 0.5 ** step)
    assert [g["lr"] for g in ours.param_groups] == [0.02, 1e-3]
    _twin_steps(ours, ours_model, 3, halve)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        for p in ref_model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        for opt, lr in ((muon, 0.02), (adamw, 1e-3)):
            opt.param_groups[0]["lr"] = lr * 0.5**step
        with mwa.muon_float32() if float32 else torch.no_grad():
            muon.step()
        adamw.step()
    for (n, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(a, b), n
    assert ours.muon.param_groups[0]["lr"] == 0.02 * 0.5**3  # the scheduler wrote the inner group


def test_float32_newton_schulz_is_used_only_when_asked(mwa, monkeypatch):
    calls = []
    original = mwa.newton_schulz_float32
    monkeypatch.setattr(mwa, "newton_schulz_float32", lambda *a: calls.append(1) or original(*a))
    for float32 in (False, True):
        model = _llama()
        names = set(mwa.hidden_matrices(model))
        opt = mwa.MuonWithAdamW([p for n, p in model.named_parameters() if n in names],
                                [p for n, p in model.named_parameters() if n not in names],
                                float32_newton_schulz=float32)
        _twin_steps(opt, model, 1)
        assert len(calls) == (len(names) if float32 else 0)


def test_a_checkpoint_restores_both_parts_exactly(mwa):
    """state_dict after two steps, loaded into a fresh optimizer over a copy of the model: the next two steps
    (and the scheduler's lrs) are the uninterrupted run's, bit for bit."""
    model = _llama()
    opt = mwa.MuonFactory()(model, lr=0.01, weight_decay=0.01)
    _twin_steps(opt, model, 2)
    saved, at_two = copy.deepcopy(opt.state_dict()), copy.deepcopy(model)
    assert len(saved["state"]) == sum(1 for _ in model.parameters())  # both parts' state, one dict
    resumed = mwa.MuonFactory()(at_two, lr=0.01, weight_decay=0.01)
    resumed.load_state_dict(saved)
    for o in (opt, resumed):
        for g in o.param_groups:
            g["lr"] *= 0.5  # as a scheduler would: must reach the inner optimizers after the load
    _twin_steps(opt, model, 2)
    _twin_steps(resumed, at_two, 2)
    for (n, a), b in zip(model.named_parameters(), at_two.parameters()):
        assert torch.equal(a, b), n
    assert resumed.adamw.state is resumed.state and resumed.muon.param_groups[0] is resumed.param_groups[0]


def test_the_factory_splits_decay_as_the_trainer_does_and_refuses_a_model_without_blocks(mwa):
    from hf_qn.optim.config import fast_bf16

    bert = _bert()
    opt = mwa.MuonFactory()(bert, lr=1e-3, weight_decay=0.05)
    muon, matrices, vectors = opt.param_groups
    assert {id(p) for p in muon["params"]} == {id(p) for n, p in bert.named_parameters()
                                                 if n in mwa.hidden_matrices(bert)}
    assert muon["weight_decay"] == matrices["weight_decay"] == 0.05 and vectors["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in matrices["params"]) and all(p.dim() == 1 for p in vectors["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for _ in bert.parameters())
    assert opt.float32_newton_schulz == (not fast_bf16(torch.device("cpu")))
    with pytest.raises(ValueError, match="Invalid optimizer 'muon' for Sequential: it has no trainable 2-D"):
        mwa.MuonFactory()(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), lr=1e-3)


def test_the_trainer_builds_it_through_optimizer_cls_and_kwargs(mwa, tmp_path):
    """transformers calls the factory with the model; its linear schedule decays both parts' lrs."""
    from transformers import Trainer, TrainingArguments

    model = _llama()
    data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.randint(0, 50, (8,))} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      optimizer_cls_and_kwargs=(mwa.MuonFactory, {"lr": 3e-3, "weight_decay": 0.0}))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert isinstance(opt, mwa.MuonWithAdamW)
    assert all(g["lr"] == 0.0 for g in opt.muon.param_groups + opt.adamw.param_groups)  # linear decay to 0
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())  # every part trained
