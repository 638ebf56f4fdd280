"""GPU checks: the optimizers on CUDA against the CPU, exact resume there, and the real CUDA GradScaler.

Skipped where no GPU is present (CI never has one); run on a lent GPU with ``pytest -m cuda``.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch

import hf_qn
from hf_qn.linalg import damped_cholesky_inverse, matmul_float32
from tests._helpers.models import mlp, tiny_gpt2, token_batch
from tests._helpers.training import OPTIMIZERS as STATE_OPTIMIZERS
from tests._helpers.training import flat_state, loop, mse_loss, regression_batches, roundtrip

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Dense K-BFGS, K-BFGS(L), interval mode with Cholesky re-inversion, and mL-BFGS, built as the CPU state
# contract builds them.
OPTIMIZERS = {k: STATE_OPTIMIZERS[k] for k in ("kbfgs", "kbfgsl", "kbfgs_interval", "mlbfgs")}


def _to(batches, device, dtype=None):
    return [tuple(t.to(device=device, dtype=dtype or t.dtype) for t in b) for b in batches]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_run_equals_the_cpu_run(name):
    """Eight steps of a float64 model on the GPU and on the CPU: the same algorithm, so equal up to rounding.
    Both optimizers keep their per-parameter state in float32 (K-BFGS's factors and direction products,
    mL-BFGS's history), so the two runs agree to float32 rounding, not float64's (measured on an H100:
    at most 1.1e-6 relative on the parameters after eight steps)."""
    torch.manual_seed(0)
    cpu = mlp().double()
    gpu = copy.deepcopy(cpu).cuda()
    batches = regression_batches(8, dtype=torch.float64)
    o_cpu, o_gpu = OPTIMIZERS[name](cpu), OPTIMIZERS[name](gpu)
    l_cpu = loop(cpu, o_cpu, batches, mse_loss)
    l_gpu = loop(gpu, o_gpu, _to(batches, "cuda"), mse_loss)
    torch.testing.assert_close(torch.tensor(l_gpu), torch.tensor(l_cpu), rtol=1e-5, atol=1e-7)
    for a, b in zip(gpu.parameters(), cpu.parameters()):
        assert a.is_cuda
        torch.testing.assert_close(a.cpu(), b, rtol=2e-5, atol=1e-6)
    n_tensors = 0
    for pa, pb in zip(gpu.parameters(), cpu.parameters()):
        s_gpu, s_cpu = flat_state(o_gpu, pa), flat_state(o_cpu, pb)  # nested state by path ("input/A", ...)
        assert s_gpu.keys() == s_cpu.keys()
        for k, v in s_gpu.items():
            # state lives with its parameter; 0-dim counters and scalars on the CPU, like torch's "step"
            assert v.device == (pa.device if v.dim() else torch.device("cpu")), k
            assert v.dtype == s_cpu[k].dtype, k
            torch.testing.assert_close(v.cpu(), s_cpu[k], rtol=1e-4, atol=1e-6)
            n_tensors += v.dim() > 0
    assert n_tensors > 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_cuda_lockstep_resume_is_bitwise_and_a_cpu_resume_follows(name):
    """8 steps straight vs 4, save (weights_only), restore, 4 more: bitwise equal on the GPU. The same
    checkpoint loaded with ``map_location="cpu"`` continues on the CPU within float32 rounding."""
    batches = _to(regression_batches(8), "cuda")
    torch.manual_seed(0)
    ref = mlp().cuda()
    init = copy.deepcopy(ref.state_dict())
    ref_opt = OPTIMIZERS[name](ref)
    loop(ref, ref_opt, batches, mse_loss)

    m1 = mlp().cuda()
    m1.load_state_dict(init)
    o1 = OPTIMIZERS[name](m1)
    loop(m1, o1, batches[:4], mse_loss)
    sd, msd = roundtrip(o1.state_dict()), roundtrip(m1.state_dict())
    m2 = mlp().cuda()
    m2.load_state_dict(msd)
    o2 = OPTIMIZERS[name](m2)
    o2.load_state_dict(sd)
    for p in m2.parameters():  # the restored state sits where a fresh run keeps it
        for k, v in flat_state(o2, p).items():
            assert v.device == (p.device if v.dim() else torch.device("cpu")), k
    loop(m2, o2, batches[4:], mse_loss)
    for a, b in zip(ref.parameters(), m2.parameters()):
        assert torch.equal(a, b)

    buf = io.BytesIO()
    torch.save({"opt": o1.state_dict(), "model": m1.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True, map_location="cpu")
    m3 = mlp()
    m3.load_state_dict(ck["model"])
    o3 = OPTIMIZERS[name](m3)
    o3.load_state_dict(ck["opt"])
    for p in m3.parameters():
        assert all(v.device.type == "cpu" for v in flat_state(o3, p).values())
    loop(m3, o3, _to(batches[4:], "cpu"), mse_loss)
    for a, b in zip(ref.parameters(), m3.parameters()):
        torch.testing.assert_close(b, a.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [hf_qn.KBFGS, hf_qn.MLBFGS])
def test_real_cuda_gradscaler_with_fp16_autocast(cls):
    """A tiny GPT-2 under fp16 autocast with ``torch.amp.GradScaler("cuda")``: a poisoned gradient makes the
    scaler skip the step, which commits nothing; training still lowers the loss and the state stays
    float32 and finite."""
    torch.manual_seed(0)
    model = tiny_gpt2().cuda()
    batch = {k: v.cuda() for k, v in token_batch(8, 16).items()}
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    kw = {"grad_scaler": scaler, "fallback_lr": 3e-3} if cls is hf_qn.KBFGS else {"update_interval": 2}
    opt = cls(model, lr=0.2 if cls is hf_qn.KBFGS else 0.01, **kw)

    def loss_fn():
        with torch.autocast("cuda", dtype=torch.float16):
            return model(**batch, labels=batch["input_ids"]).loss

    def one_step(poison: bool = False) -> float:
        opt.zero_grad()
        loss = loss_fn()
        scaler.scale(loss).backward()
        if poison:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        scaler.step(opt, lambda: scaler.scale(loss_fn()).backward()) if cls is hf_qn.KBFGS else scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    losses = [one_step() for _ in range(4)]
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in flat_state(opt, p).items()} for p in model.parameters()}
    scale = scaler.get_scale()
    one_step(poison=True)
    assert scaler.get_scale() < scale  # the scaler saw the inf and skipped
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    for p in model.parameters():
        assert flat_state(opt, p).keys() == state[id(p)].keys()
        for k, v in flat_state(opt, p).items():
            assert torch.equal(v, state[id(p)][k]), k
    losses += [one_step() for _ in range(25)]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    small64 = ("block/history/SY", "block/history/YY")  # mL-BFGS's m x m inner products: float64 by design
    n_float = 0
    for p in model.parameters():
        assert torch.isfinite(p).all()
        for k, v in flat_state(opt, p).items():
            if v.is_floating_point() and k not in small64:
                assert v.dtype == torch.float32, k
                n_float += v.dim() > 0
    assert n_float > 0


def test_bf16_model_on_cuda_keeps_float32_factors_across_a_checkpoint():
    torch.manual_seed(0)
    model = tiny_gpt2().cuda().to(torch.bfloat16)
    batch = {k: v.cuda() for k, v in token_batch(8, 16).items()}
    opt = hf_qn.KBFGS(model, preset="paper", lr=0.2, fallback_lr=3e-3)

    def loss_fn():
        return model(**batch, labels=batch["input_ids"]).loss

    losses: list[float] = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(lambda: loss_fn().backward())
        losses.append(float(loss))
    assert sum(losses[-3:]) / 3 < 0.85 * sum(losses[:3]) / 3, losses
    fresh = hf_qn.KBFGS(model, preset="paper", lr=0.2, fallback_lr=3e-3)
    fresh.load_state_dict(roundtrip(opt.state_dict()))
    n_factors = 0
    for p in model.parameters():
        before, after = flat_state(opt, p), flat_state(fresh, p)
        for k in ("input/A", "input/H_a", "output/H_g"):
            if k in before:
                for v in (before[k], after[k]):
                    assert v.dtype == torch.float32 and v.is_cuda, k
                assert torch.equal(after[k], before[k]), k
                n_factors += 1
    assert n_factors > 0


def test_the_lm_benchmark_trains_on_the_gpu_and_reports_each_optimizers_peak_memory(tmp_path):
    """The language-modelling benchmark's GPU path: models and batches on CUDA under bf16 autocast, a peak-memory
    column measured per optimizer alone, and a ratio table as on the CPU."""
    from tests._helpers.scripts import load_script

    bench = load_script("benchmark_lm")
    names = ["adamw", "muon", "kbfgs"]
    # the repository's own prose as the text: a bare GPU image may lack gensim, whose Wikipedia excerpt is the default
    docs = [str(ROOT / "README.md"), str(ROOT / "docs" / "design.md")]
    result = bench.main(["--size", "tiny", "--text_files", *docs, "--optimizers", *names, "--budget", "1",
                         "--sweep_seconds", "0", "--eval_every", "0.5", "--slice_seconds", "0.5", "--memory_steps", "3",
                         "--output_dir", str(tmp_path)])
    assert [r["optimizer"] for r in result["records"]] == names
    assert all(r["error"] is None and r["steps"] > 0 for r in result["records"])
    peaks = {row["optimizer"]: row["peak_memory_gib"] for row in result["rows"]}
    assert all(0 < peaks[n] < 1 for n in names)  # a 0.1M-parameter model: well under a GiB each
    assert peaks["kbfgs"] > peaks["adamw"]  # its factors, inverses and hooks' statistics
    assert "peak GiB" in (tmp_path / "results.md").read_text()


def test_half_precision_grams_on_cuda_have_a_float32_result():
    """K-BFGS's bf16 Gram products (``matmul_float32``) keep a float32 result on CUDA: against the float64 Gram of
    the same bf16 rows, float32 accumulation's error (measured on an H200: 1.6e-5 and 3.6e-5 of the largest
    element), where the bf16 product's result is off by ~2⁻⁹ of it (2.7e-3 and 2.6e-3) and, with a spectrum as
    spread as this one, is no longer positive semi-definite."""
    torch.manual_seed(0)
    rows = 100.0 * torch.randn(8192, 1, device="cuda") * torch.randn(1, 512, device="cuda")
    rows = (rows + torch.randn(8192, 512, device="cuda")).bfloat16()  # one direction ~1e4 times the others
    for r in (rows, rows.reshape(8192, 4, 128).transpose(0, 1)):  # one Gram, and four diagonal blocks (bmm)
        G = matmul_float32(r.mT, r)
        ref = r.double().mT @ r.double()
        assert G.dtype == torch.float32
        assert float((G.double() - ref).abs().max() / ref.abs().max()) < 1e-4
        assert float(((r.mT @ r).double() - ref).abs().max() / ref.abs().max()) > 1e-3  # what it replaces


def test_damped_inverses_on_cuda_equal_the_cpu_ones():
    """The GPU inverts through ``L⁻¹`` (a triangular solve and one batched product), the CPU through
    ``torch.cholesky_inverse``: the same matrices to float32 rounding, for a batch of K-FAC-like factors."""
    torch.manual_seed(0)
    x = torch.randn(3, 1024, 256, dtype=torch.float64)
    A = (x.mT @ x / 1024).float()
    cpu = damped_cholesky_inverse(A, 0.55, torch.float32)
    gpu = damped_cholesky_inverse(A.cuda(), 0.55, torch.float32)
    assert gpu.is_cuda and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
