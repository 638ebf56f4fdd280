"""Each adapter against hand-built references: gradient matrices, captured rows and statistics."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_qn.adapters import Conv1DAdapter, Conv2dAdapter, EmbeddingAdapter, LinearAdapter, UnsupportedLayer
from hf_qn.capture import Capture


@pytest.fixture(autouse=True)
def _float64():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(prev)


def _run(module, adapter, x, loss_fn):
    """Forward/backward capturing the full output gradient by an independent tensor hook."""
    cap = Capture([adapter]).attach()
    got = {}
    out = module(x)
    out.register_hook(lambda g: got.__setitem__("g", g))
    loss_fn(out).backward()
    cap.detach()
    return out.detach(), got["g"], cap.stats["primary"][0]


def explicit_patches(x, kh, kw, stride, padding, dilation):
    """Patch rows by explicit loops (independent of F.unfold): (B*L, C*kh*kw), channel-major."""
    B, C, H, W = x.shape
    xp = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    rows = []
    for b in range(B):
        for i in range(Ho):
            for j in range(Wo):
                patch = torch.stack([xp[b, :, i * stride[0] + u * dilation[0], j * stride[1] + v * dilation[1]]
                                     for u in range(kh) for v in range(kw)], dim=1)  # (C, kh*kw)
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4), (2, 2, 3, 4)])
def test_linear_gradient_and_statistics(bias, shape):
    lin = nn.Linear(4, 3, bias=bias)
    ad = LinearAdapter(lin, "lin")
    x = torch.randn(*shape)
    out, gout, st = _run(lin, ad, x, lambda o: (o.sin() ** 2).mean())
    a = x.reshape(-1, 4)
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
    g = gout.reshape(-1, 3)
    assert (ad.d_out, ad.d_in) == (3, 4 + bias)
    torch.testing.assert_close(ad.grad_matrix(), g.T @ a)  # hooks + bias folding reproduce autograd
    torch.testing.assert_close(st.A_sum, (a.T @ a).float())
    torch.testing.assert_close(st.a_sum, a.sum(0).float())
    torch.testing.assert_close(st.h_sum, out.reshape(-1, 3).sum(0))
    torch.testing.assert_close(st.g_sum, g.sum(0))
    assert st.a_rows == st.h_rows == a.shape[0]
    w, b = ad.from_matrix(ad.param_matrix())
    assert torch.equal(w, lin.weight) and (b is None or torch.equal(b, lin.bias))


CONV_CASES = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1, bias=True),
    dict(kernel_size=(2, 3), stride=(2, 1), padding=(0, 1), dilation=1, bias=False),
    dict(kernel_size=3, stride=2, padding=2, dilation=2, bias=True),
    dict(kernel_size=1, stride=1, padding=0, dilation=1, bias=True),
    dict(kernel_size=3, stride=1, padding="same", dilation=1, bias=True),
]


@pytest.mark.parametrize("cfg", CONV_CASES)
def test_conv2d_against_explicit_unfold(cfg):
    conv = nn.Conv2d(2, 3, **cfg)
    ad = Conv2dAdapter(conv, "conv")
    x = torch.randn(2, 2, 7, 6)
    out, gout, st = _run(conv, ad, x, lambda o: (o.tanh() ** 2).sum())
    pad = ad._padding
    kh, kw = conv.kernel_size
    a = explicit_patches(x, kh, kw, conv.stride, pad, conv.dilation)
    if conv.bias is not None:
        a = torch.cat([a, torch.ones(a.shape[0], 1)], 1)
    g = gout.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(ad.grad_matrix(), g.T @ a)
    torch.testing.assert_close(st.A_sum, (a.T @ a).float())
    torch.testing.assert_close(st.h_sum, out.permute(0, 2, 3, 1).reshape(-1, 3).sum(0))
    torch.testing.assert_close(st.g_sum, g.sum(0))
    assert st.samples == 2  # spatial positions grouped per sample
    assert ad.output_group_size(out) == out.shape[-1] * out.shape[-2]
    w, b = ad.from_matrix(ad.grad_matrix())
    torch.testing.assert_close(w, conv.weight.grad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(groups=2), "groups"), (dict(padding_mode="reflect", padding=1), "padding_mode"),
     (dict(padding="same", kernel_size=2), "same")],
)
def test_conv2d_unsupported_configs_are_explicit(kwargs, match):
    args = dict(in_channels=2, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(UnsupportedLayer, match=match):
        Conv2dAdapter.check(nn.Conv2d(**args))


def test_conv1d_equals_linear_with_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    c1 = Conv1D(3, 4)  # nf=3 outputs, nx=4 inputs; weight (4, 3)
    nn.init.normal_(c1.bias)
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight.copy_(c1.weight.T)
        lin.bias.copy_(c1.bias)
    x = torch.randn(2, 5, 4)
    a1, a2 = Conv1DAdapter(c1, "c"), LinearAdapter(lin, "l")
    o1, g1, s1 = _run(c1, a1, x, lambda o: (o**3).mean())
    o2, g2, s2 = _run(lin, a2, x, lambda o: (o**3).mean())
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(a1.grad_matrix(), a2.grad_matrix())
    torch.testing.assert_close(a1.param_matrix(), a2.param_matrix())
    for k in ("A_sum", "a_sum", "h_sum", "g_sum"):
        torch.testing.assert_close(getattr(s1, k), getattr(s2, k))
    w, b = a1.from_matrix(a1.grad_matrix())
    torch.testing.assert_close(w, c1.weight.grad)
    torch.testing.assert_close(b, c1.bias.grad)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_equals_one_hot_linear(padding_idx):
    V, d = 7, 3
    emb = nn.Embedding(V, d, padding_idx=padding_idx)
    lin = nn.Linear(V, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(emb.weight.T)
    ids = torch.tensor([[0, 1, 1, 3], [6, 0, 2, 1]])
    ae, al = EmbeddingAdapter(emb, "e"), LinearAdapter(lin, "l")
    oe, ge, se = _run(emb, ae, ids, lambda o: (o.sin()).sum())
    onehot = F.one_hot(ids, V).double()
    ol, gl, sl = _run(lin, al, onehot, lambda o: (o.sin()).sum())
    torch.testing.assert_close(oe, ol)
    grad_lin = al.grad_matrix()
    if padding_idx is not None:
        grad_lin[:, padding_idx] = 0  # nn.Embedding gives the padding row no gradient
        keep = ids.reshape(-1) != padding_idx
        A_dense = onehot.reshape(-1, V)[keep].T @ onehot.reshape(-1, V)[keep]
    else:
        A_dense = sl.A_sum.double()
    torch.testing.assert_close(ae.grad_matrix(), grad_lin)
    # Diagonal input factor equals the diagonal of the dense one-hot factor, which is diagonal.
    torch.testing.assert_close(torch.diag(se.A_sum.double()), A_dense)
    torch.testing.assert_close(se.h_sum, sl.h_sum)
    torch.testing.assert_close(se.g_sum, sl.g_sum)


def test_embedding_refuses_sparse_and_max_norm():
    with pytest.raises(UnsupportedLayer, match="sparse"):
        EmbeddingAdapter.check(nn.Embedding(5, 2, sparse=True))
    with pytest.raises(UnsupportedLayer, match="max_norm"):
        EmbeddingAdapter.check(nn.Embedding(5, 2, max_norm=1.0))


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Linear(3, 4), lambda: nn.Linear(3, 4, bias=False), lambda: nn.Conv2d(2, 3, (2, 3)),
     lambda: nn.Embedding(6, 3)],
)
def test_from_matrix_inverts_to_matrix(make):
    m = make()
    ad = {nn.Linear: LinearAdapter, nn.Conv2d: Conv2dAdapter, nn.Embedding: EmbeddingAdapter}[type(m)](m)
    M = torch.randn(ad.d_out, ad.d_in)
    w, b = ad.from_matrix(M)
    assert w.shape == m.weight.shape
    torch.testing.assert_close(ad.to_matrix(w, b), M)


def test_all_conv_geometries_match_unfold_sweep():
    """Sweep of strides/paddings/dilations on a rectangular input: rows match the explicit patches."""
    x = torch.randn(1, 2, 6, 5)
    for k, s, p, d in itertools.product([(1, 2), (3, 3)], [1, 2], [0, 1], [1, 2]):
        conv = nn.Conv2d(2, 2, k, stride=s, padding=p, dilation=d, bias=False)
        try:
            out = conv(x)
        except RuntimeError:
            continue  # kernel larger than padded input
        ad = Conv2dAdapter(conv)
        rows = ad.input_rows((x,))
        ref = explicit_patches(x, k[0], k[1], conv.stride, conv.padding, conv.dilation)
        torch.testing.assert_close(rows, ref)
        assert rows.shape[0] == out.shape[-1] * out.shape[-2]


@pytest.mark.parametrize("make", [
    lambda: (LinearAdapter(nn.Linear(4, 3)), torch.randn(2, 5, 4)),
    lambda: (LinearAdapter(nn.Linear(4, 3, bias=False)), torch.randn(10, 4)),
    lambda: (Conv2dAdapter(nn.Conv2d(2, 3, 2)), torch.randn(1, 2, 3, 6)),  # 2 x 5 positions
], ids=["linear", "linear-no-bias", "conv2d"])
@pytest.mark.parametrize("max_rows", [1, 3, 4, 9, 10, 100])
def test_capped_input_rows_are_the_evenly_strided_rows_of_all(make, max_rows):
    """``input_rows(inputs, max_rows)`` chooses its rows before appending the homogeneous column: the same rows,
    the same values, as every ``ceil(R / max_rows)``-th of all of them."""
    ad, x = make()
    every = ad.input_rows((x,))
    capped = ad.input_rows((x,), max_rows)
    stride = -(-every.shape[0] // max_rows)
    assert every.shape[0] == 10 and capped.shape == (len(range(0, 10, stride)), ad.d_in)
    assert torch.equal(capped, every[::stride])
