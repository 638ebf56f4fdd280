"""The capture hooks in real-world conditions: in-place ops, checkpointing, accumulation, AMP, eval."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hf_qn.adapters import assign_layers
from hf_qn.capture import Capture
from tests._helpers.models import mlp
from tests._helpers.training import loop, mse_loss, regression_batches


def _capture(model):
    asg = assign_layers(model)
    return asg, Capture(asg.adapters).attach()


def test_inplace_relu_gives_correct_gradient_statistics():
    torch.manual_seed(0)
    m_in, m_out = mlp(inplace=True), mlp(inplace=False)
    m_out.load_state_dict(m_in.state_dict())
    x = torch.randn(5, 6)
    stats = []
    for m in (m_in, m_out):
        _, cap = _capture(m)
        m(x).pow(2).sum().backward()
        stats.append(cap.stats["primary"])
    for a, b in zip(*stats):
        torch.testing.assert_close(a.g_sum, b.g_sum)
        torch.testing.assert_close(a.h_sum, b.h_sum)


def test_activation_checkpointing_is_not_double_counted():
    torch.manual_seed(0)
    inner = nn.Linear(6, 6)
    head = nn.Linear(6, 2)
    model = nn.ModuleDict({"inner": inner, "head": head})
    x = torch.randn(4, 6)

    def run(use_ckpt):
        asg, cap = _capture(model)
        h = checkpoint(lambda z: torch.tanh(inner(z)), x, use_reentrant=False) if use_ckpt else torch.tanh(inner(x))
        head(h).sum().backward()
        cap.detach()
        model.zero_grad(set_to_none=True)
        return cap.stats["primary"]

    plain, ck = run(False), run(True)
    for a, b in zip(plain, ck):
        assert a.forward_calls == b.forward_calls == 1
        torch.testing.assert_close(a.A_sum, b.A_sum)
        torch.testing.assert_close(a.g_sum, b.g_sum)


def test_accumulation_2x4_equals_1x8_sums():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(8, 6)
    _, cap = _capture(model)
    model(x).pow(2).mean().backward()
    full = [(s.A_sum.clone(), s.h_sum.clone(), s.g_sum.clone(), s.a_rows) for s in cap.stats["primary"]]
    cap.reset()
    model.zero_grad(set_to_none=True)
    for chunk in x.split(4):
        (model(chunk).pow(2).mean() / 2).backward()
    for (A, h, g, r), s in zip(full, cap.stats["primary"]):  # float32 products summed in another order: 5e-6
        for ours, full_batch in ((s.A_sum, A), (s.h_sum, h), (s.g_sum, g)):
            torch.testing.assert_close(ours, full_batch, rtol=2e-5, atol=1e-6)
        assert s.a_rows == r == 8


def test_new_window_drops_uncommitted_statistics():
    """A step that never happened (GradScaler skip) leaves sums behind; grad=None marks a new window."""
    model = mlp()
    _, cap = _capture(model)
    model(torch.randn(3, 6)).sum().backward()
    model.zero_grad(set_to_none=True)  # the step was skipped; nothing committed
    x = torch.randn(5, 6)
    model(x).sum().backward()
    assert cap.stats["primary"][0].a_rows == 5
    torch.testing.assert_close(cap.stats["primary"][0].a_sum[:-1], x.sum(0))


def test_eval_no_grad_and_disabled_capture_nothing():
    model = mlp()
    _, cap = _capture(model)
    with torch.no_grad():
        model(torch.randn(3, 6))
    model.eval()
    model(torch.randn(3, 6)).sum().backward()
    model.train()
    cap.enabled = False
    model(torch.randn(3, 6)).sum().backward()
    assert all(not s.pending for s in cap.stats["primary"])


def test_grad_scale_divides_gradient_statistics():
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(4, 6)
    _, cap = _capture(model)
    model(x).pow(2).sum().backward()
    ref = [s.g_sum.clone() for s in cap.stats["primary"]]
    cap.reset()
    model.zero_grad(set_to_none=True)
    cap.grad_scale = lambda: 1024.0
    (model(x).pow(2).sum() * 1024.0).backward()
    for r, s in zip(ref, cap.stats["primary"]):
        torch.testing.assert_close(s.g_sum, r)


def test_output_grams_are_the_sums_of_output_gradient_outer_products_on_primary_passes_only():
    """``output_grams``: ``G_sum = Σ g gᵀ`` over the rows of each forward (its diagonal blocks for a split, padding
    zero), summed over micro-batches, divided by the loss scale squared; none where not asked nor on a second pass."""
    from hf_qn.linalg.blocks import BlockSplit

    torch.manual_seed(0)
    model = mlp()  # Linear 6->8, 8->5, 5->3
    grads: list[list[torch.Tensor]] = [[], [], []]
    def keep_grads(i):
        def hook(_m, _x, out):
            out.register_hook(lambda g: grads[i].append(g.double()))

        return hook

    for i, lin in enumerate([model[0], model[2], model[4]]):
        lin.register_forward_hook(keep_grads(i))
    asg = assign_layers(model)
    splits = [BlockSplit.of(8, None), BlockSplit.of(5, 2), None]  # whole, blocks 2+2+1(+1 padding), not asked
    cap = Capture(asg.adapters, output_grams=splits, grad_scale=lambda: 8.0).attach()
    for _ in range(2):  # two micro-batches accumulate
        (model(torch.randn(4, 6)).pow(2).sum() * 8.0).backward()
    st = cap.stats["primary"]
    g0, g1 = (torch.cat(grads[i]) / 8.0 for i in (0, 1))
    torch.testing.assert_close(st[0].G_sum.double(), g0.T @ g0, rtol=1e-5, atol=1e-6)
    assert st[1].G_sum.shape == (3, 2, 2) and st[2].G_sum is None
    G1 = torch.nn.functional.pad(g1.T @ g1, (0, 1, 0, 1))
    for b in range(3):
        torch.testing.assert_close(st[1].G_sum[b].double(), G1[2 * b : 2 * b + 2, 2 * b : 2 * b + 2], rtol=1e-5, atol=1e-6)
    assert st[0].G_rows == st[1].G_rows == 8 and st[2].G_rows == 0
    with cap.second_pass() as second:
        model(torch.randn(4, 6)).sum().backward()
    assert all(s.G_sum is None and s.g_sum is not None for s in second)
    cap.detach()
    capped = Capture(asg.adapters, output_grams=splits, max_input_rows=3).attach()  # every third of 8 rows: 0, 3, 6
    grads[0].clear()
    model(torch.randn(8, 6)).sum().backward()
    g = grads[0][0][::3]
    torch.testing.assert_close(capped.stats["primary"][0].G_sum.double(), g.T @ g, rtol=1e-5, atol=1e-6)
    assert capped.stats["primary"][0].G_rows == 3 and capped.stats["primary"][0].h_rows == 8


def test_a_layer_without_output_means_keeps_everything_else_and_zero_means():
    """``output_means=False`` (a layer that forms no pairs, K-FAC's output factor): ``h_sum`` and ``g_sum`` are
    zeros, every other sum and count is the one a full capture takes; ``g_sum`` is set by the backward hook, so a
    layer the backward never reached still shows it (None)."""
    from hf_qn.linalg.blocks import BlockSplit

    torch.manual_seed(0)
    model = mlp()
    asg = assign_layers(model)
    grams = [BlockSplit.of(8, None), None, BlockSplit.of(3, None)]
    full = Capture(asg.adapters, output_grams=grams).attach()
    lean = Capture(asg.adapters, output_grams=grams, output_means=[False, False, True]).attach()
    out = model(torch.randn(4, 6))
    assert all(st.h_sum is not None and st.g_sum is None for st in lean.stats["primary"])
    out.pow(2).sum().backward()
    for k, (a, b) in enumerate(zip(full.stats["primary"], lean.stats["primary"])):
        for name in ("A_sum", "a_sum", "G_sum"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or torch.equal(x, y)
        assert (a.a_rows, a.h_rows, a.G_rows, a.samples) == (b.a_rows, b.h_rows, b.G_rows, b.samples)
        for name in ("h_sum", "g_sum"):
            want = getattr(a, name) if k == 2 else torch.zeros_like(getattr(a, name))
            assert getattr(b, name).dtype == torch.float64 and torch.equal(getattr(b, name), want)
        assert k == 2 or a.g_sum.abs().sum() > 0  # what the lean capture leaves out is not zero
    reads: list[int] = []  # the loss scale is read only by hooks with a sum to divide: not the second pass's
    lean.grad_scale = lambda: reads.append(1) or 1.0  # of a layer without output means (no Gram there)
    with lean.second_pass() as second:
        model(torch.randn(4, 6)).pow(2).sum().backward()
    assert len(reads) == 1 and all(st.grad_calls == 1 for st in second)  # the third layer's means only
    model(torch.randn(4, 6)).pow(2).sum().backward()  # primary: the first and third layers' hooks (a Gram each),
    assert len(reads) == 3  # not the second's (neither means nor a Gram)


def test_second_pass_uses_separate_sums_without_input_side():
    model = mlp()
    _, cap = _capture(model)
    model(torch.randn(4, 6)).sum().backward()
    with cap.second_pass() as second:
        model(torch.randn(4, 6)).sum().backward()
    assert cap.mode == "primary"
    assert all(s.A_sum is None and s.h_rows == 4 and s.g_sum is not None for s in second)
    assert all(s.a_rows == 4 for s in cap.stats["primary"])


def test_detach_removes_hooks():
    model = mlp()
    _, cap = _capture(model)
    cap.detach()
    model(torch.randn(2, 6)).sum().backward()
    assert not cap.attached and all(not s.pending for s in cap.stats["primary"])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_activations_give_float32_sums(dtype):
    model = mlp().to(dtype)
    _, cap = _capture(model)
    model(torch.randn(4, 6, dtype=dtype)).float().sum().backward()
    assert all(s.A_sum.dtype == torch.float32 and s.g_sum.dtype == torch.float64 for s in cap.stats["primary"])


def test_bf16_gram_keeps_float32_sums_within_bf16_accuracy():
    torch.manual_seed(0)
    model = mlp(sizes=(40, 30, 3))
    x = torch.randn(64, 40)
    asg = assign_layers(model)
    cap = Capture(asg.adapters, gram_dtype=torch.bfloat16).attach()
    model(x).sum().backward()
    st = cap.stats["primary"][0]
    xa = torch.cat([x, torch.ones(64, 1)], 1).double()
    ref = xa.T @ xa
    assert st.A_sum.dtype == torch.float32 and st.a_sum.dtype == torch.float32
    err = (st.A_sum.double() - ref).norm() / ref.norm()
    assert 1e-5 < err < 1e-2
    torch.testing.assert_close(st.a_sum.double(), xa.sum(0), rtol=1e-5, atol=1e-4)  # not rounded to bf16


@pytest.mark.parametrize("rows", [7, 256, 2048, 2049 + 13])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_sums_match_the_float64_sum(rows, dtype):
    """Blocked row sums (float32 blocks, float64 across them) stay within 1e-6 of the exact float64 sum of the
    same values, for any row count and input dtype."""
    from hf_qn.capture import row_sums

    x = (torch.randn(rows, 33, generator=torch.Generator().manual_seed(rows)) * 3 + 1).to(dtype)
    got = row_sums(x)
    exact = x.double().sum(0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6 * rows)


def test_max_input_rows_uses_evenly_strided_rows_and_changes_nothing_when_not_exceeded():
    """The input Gram of a call with R rows uses every ceil(R/m)-th row; m >= R is the whole batch, bitwise."""
    import hf_qn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(10, 4)
    asg, cap = _capture(model)
    cap.max_input_rows = 4
    model(x).sum().backward()
    rows = torch.cat([x, torch.ones(10, 1)], dim=1)[::3]  # ceil(10 / 4) = 3: rows 0, 3, 6, 9
    st = cap.stats["primary"][0]
    torch.testing.assert_close(st.A_sum, rows.T @ rows)
    assert st.a_rows == 4 and st.h_rows == 10  # the output side keeps every row
    batches = regression_batches(4, batch=16)
    runs = []
    for m in (None, 16):
        torch.manual_seed(0)
        net = mlp()
        loop(net, hf_qn.KBFGS(net, max_input_rows=m), batches, mse_loss)
        runs.append([p.detach().clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_output_gram_with_a_float16_gram_dtype_stays_finite_under_loss_scaling():
    """A float16 ``gram_dtype`` (``matmul_dtype="float16"``) forms the output-gradient Gram in float32: a gradient
    scaled by 65536 squares past float16's range."""
    from hf_qn.linalg.blocks import BlockSplit

    torch.manual_seed(0)
    model = mlp()
    asg = assign_layers(model)
    splits = [BlockSplit.of(ad.d_out, None) for ad in asg.adapters]
    grads: list[torch.Tensor] = []
    model[4].register_forward_hook(lambda _m, _x, out: out.register_hook(lambda g: grads.append(g.double())) and None)
    cap = Capture(asg.adapters, gram_dtype=torch.float16, output_grams=splits, grad_scale=lambda: 65536.0).attach()
    (model(torch.randn(16, 6)).pow(2).sum() * 65536.0).backward()
    g = grads[0] / 65536.0
    torch.testing.assert_close(cap.stats["primary"][2].G_sum.double(), g.T @ g, rtol=1e-5, atol=1e-6)
