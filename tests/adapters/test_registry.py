"""Assignment policy: every trainable parameter exactly once, on tiny real architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_qn.adapters import LayerAdapter, LayerPolicy, LinearAdapter, assign_layers, register_adapter
from tests._helpers.models import SmallCNN, tiny_bert, tiny_gpt2, tiny_llama, tiny_resnet, tiny_vit


def _check_exactly_once(model, asg):
    trainable = {id(p) for p in model.parameters()}  # frozen ones too: they train once unfrozen
    covered = [id(p) for p in asg.adapted_parameters()] + [id(p) for p in asg.fallback_parameters()]
    assert len(covered) == len(set(covered)), "a parameter is assigned twice"
    assert set(covered) == trainable


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert, tiny_vit, tiny_resnet, SmallCNN])
def test_every_parameter_assigned_exactly_once(build):
    model = build()
    asg = assign_layers(model)
    _check_exactly_once(model, asg)
    report = asg.report()
    assert "adapted layers" in report and len(asg.adapters) > 0


def test_gpt2_tied_embedding_is_the_one_sided_head_or_goes_to_fallback_once():
    model = tiny_gpt2()
    asg = assign_layers(model)
    kinds = {type(a).__name__ for a in asg.adapters}
    assert "Conv1DAdapter" in kinds
    heads = [a for a in asg.adapters if a.weight is model.lm_head.weight]
    assert [(a.name, a.one_sided, a.tied_with) for a in heads] == [("lm_head", True, "transformer.wte")]
    assert not any(f.param is model.lm_head.weight for f in asg.fallback)
    # input embeddings go to the fallback by default (grafted steps), and are adapted when asked or ungrafted
    assert [(f.name, f.reason) for f in asg.fallback if f.param is model.transformer.wpe.weight] == [
        ("transformer.wpe.weight", "adapt_embeddings=False")]
    assert "transformer.wpe" in {a.name for a in assign_layers(model, LayerPolicy(adapt_embeddings=True)).adapters}
    assert LayerPolicy().resolved(grafted=False).adapt_embeddings is True
    assert LayerPolicy().resolved(grafted=True).adapt_embeddings is False
    off = assign_layers(model, LayerPolicy(tied_heads=False))
    tied = [f for f in off.fallback if f.param is model.lm_head.weight]
    assert len(tied) == 1 and "tied" in tied[0].reason
    assert not any(a.weight is model.lm_head.weight for a in off.adapters)


def test_an_untied_lm_head_is_one_sided_like_a_tied_one_unless_asked_otherwise():
    """The head ``get_output_embeddings()`` names is preconditioned by its input factor alone, whatever its width
    (its output factor would be vocab x vocab); every other layer keeps both factors."""
    model = tiny_llama(vocab=97)  # 97 < max_dim: a dense 97 x 97 output factor would be allowed
    asg = assign_layers(model)
    sided = {a.name: a.one_sided for a in asg.adapters}
    assert sided.pop("lm_head") is True and not any(sided.values()) and len(sided) == 7
    assert [f.name for f in asg.fallback if f.param is model.model.embed_tokens.weight] == [
        "model.embed_tokens.weight"]
    assert "lm_head" in asg.report().split("(one-sided")[0].splitlines()[-1]
    two = {a.name: a.one_sided for a in assign_layers(model, LayerPolicy(one_sided_heads=False)).adapters}
    assert two["lm_head"] is False
    # ungrafted (the paper's steps) it is not decided for the user: the head keeps both factors
    assert LayerPolicy().resolved(grafted=False).one_sided_heads is False
    assert LayerPolicy().resolved(grafted=True).one_sided_heads is True
    # a head wider than max_dim stays adapted (one-sided) with wide="fallback", as a tied head does
    narrow = assign_layers(model, LayerPolicy(max_dim=64, wide="fallback"))
    assert [(a.name, a.one_sided) for a in narrow.adapters if a.name == "lm_head"] == [("lm_head", True)]
    # a model without get_output_embeddings, or whose head is None (a classifier), has no LM head
    assert not any(a.one_sided for a in assign_layers(tiny_bert()).adapters)


def test_vit_free_parameters_and_patch_conv():
    model = tiny_vit()
    asg = assign_layers(model)
    names = {f.name for f in asg.fallback}
    assert "vit.embeddings.cls_token" in names and "vit.embeddings.position_embeddings" in names
    assert any(type(a).__name__ == "Conv2dAdapter" for a in asg.adapters)
    assert all("layernorm" not in a.name for a in asg.adapters)


def test_policy_include_exclude_and_max_dim():
    model = tiny_bert()
    asg = assign_layers(model, LayerPolicy(exclude=(r"attention",), max_dim=48, wide="fallback"))
    assert all("attention" not in a.name for a in asg.adapters)
    assert all(max(a.d_out, 0 if a.input_diagonal else a.d_in) <= 48 for a in asg.adapters)
    assert any("max_dim" in f.reason for f in asg.fallback)
    _check_exactly_once(model, asg)
    wide = assign_layers(model, LayerPolicy(exclude=(r"attention",), max_dim=48))  # wide outputs: one-sided
    assert all((a.d_out > 48) == a.one_sided for a in wide.adapters) and any(a.one_sided for a in wide.adapters)
    assert all(a.input_diagonal or a.d_in <= 48 for a in wide.adapters)
    _check_exactly_once(model, wide)
    only = assign_layers(model, LayerPolicy(include=(r"classifier",)))
    assert [a.name for a in only.adapters] == ["classifier"]
    _check_exactly_once(model, only)


def test_frozen_and_partially_frozen_layers():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2), nn.Linear(2, 2))
    model[0].requires_grad_(False)
    model[1].bias.requires_grad_(False)
    asg = assign_layers(model)
    assert [a.name for a in asg.adapters] == ["0", "2"]  # a frozen layer is adapted: it trains once unfrozen
    assert [f.name for f in asg.fallback] == ["1.weight", "1.bias"]
    assert asg.fallback[0].reason == "partially frozen layer"
    assert set(asg.frozen) == {"0.weight", "0.bias", "1.bias"}


def test_functionally_used_linear_subclass_is_not_adapted_unless_registered():
    mha = nn.MultiheadAttention(8, 2)
    asg = assign_layers(mha)
    assert asg.adapters == []  # out_proj is a Linear subclass whose weight MHA uses functionally
    _check_exactly_once(mha, asg)

    class MyLinear(nn.Linear):
        pass

    register_adapter(MyLinear, LinearAdapter)
    asg2 = assign_layers(nn.Sequential(MyLinear(3, 2)))
    assert len(asg2.adapters) == 1
    with pytest.raises(TypeError):
        register_adapter(nn.Linear, object)  # type: ignore[arg-type]

    class OldStyle(LinearAdapter):  # the interface before input_rows took max_rows
        def input_rows(self, inputs):  # type: ignore[override]
            return super().input_rows(inputs)

    with pytest.raises(TypeError, match=r"OldStyle.input_rows must take max_rows: def input_rows\(self, inputs, max"):
        register_adapter(MyLinear, OldStyle)


def test_policy_validation():
    with pytest.raises(ValueError, match="max_dim"):
        LayerPolicy(max_dim=0)
    with pytest.raises(ValueError, match="pattern"):
        LayerPolicy(exclude=("(",))
    assert LayerPolicy(include=["a"]).include == ("a",)  # type: ignore[arg-type]


def test_adapter_base_is_abstract():
    with pytest.raises(TypeError):
        LayerAdapter(nn.Linear(2, 2))  # type: ignore[abstract]
    assert torch.is_tensor(LinearAdapter(nn.Linear(2, 2)).param_matrix())
