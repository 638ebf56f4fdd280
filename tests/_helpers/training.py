"""Small training loops shared by optimizer tests."""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from torch import nn

import hf_qn


def loop(model: nn.Module, opt, batches, loss_fn: Callable, closure: bool = True, scaler=None) -> list[float]:
    """Plain loop: zero_grad, forward, backward, step(closure) where the closure re-runs the batch."""
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()

        def cl(batch=batch):
            out = loss_fn(model, batch)
            (scaler.scale(out) if scaler is not None else out).backward()
            return out

        if scaler is not None:
            scaler.step(opt, cl) if closure else scaler.step(opt)
            scaler.update()
        else:
            opt.step(cl) if closure else opt.step()
        losses.append(float(loss.detach()))
    return losses


def flat_state(opt, p) -> dict[str, torch.Tensor]:
    """The tensors of ``opt.state[p]`` by path (``"input/A"``, ``"output/H_g"``, ``"exp_avg"``, ...)."""
    from hf_qn.optim.state import iter_tensors

    return dict(iter_tensors(opt.state[p]))


def roundtrip(state_dict) -> dict:
    """torch.save then torch.load(weights_only=True), as the Trainer does."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def mse_loss(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def lm_loss(model, batch):
    """A causal LM's loss on a token batch (``token_batch``), its inputs as labels."""
    return model(**batch, labels=batch["input_ids"]).loss


def dead_unit_loss(model, batch):
    """``mse_loss`` on all but the model's last output unit, whose weights and bias then have an identically zero
    gradient (``batch``'s targets have one column fewer than the model's outputs)."""
    x, y = batch
    return ((model(x)[:, : y.shape[1]] - y) ** 2).mean()


def dead_unit_drift(model, init, opt, batches, decay: float = 1.0) -> float:
    """Train ``model`` (a copy of ``init`` whose last module is a Linear with one unit more than the targets) with
    ``opt`` on ``batches`` and ``dead_unit_loss``. Returns how far its dead unit (weight row and bias) ended from
    where a per-step factor ``decay`` alone (weight decay) would have left it, relative to how far the other units
    moved."""
    for batch in batches:
        opt.zero_grad()
        dead_unit_loss(model, batch).backward()
        opt.step()
    head, start = model[-1], init[-1]
    assert head.weight.grad[-1].abs().max() == 0 and head.bias.grad[-1] == 0  # the unit the loss never reads
    end = torch.cat([head.weight, head.bias[:, None]], dim=1).detach()
    begin = torch.cat([start.weight, start.bias[:, None]], dim=1).detach()
    decayed = begin[-1].clone()
    for _ in batches:
        decayed.mul_(decay)
    return float((end[-1] - decayed).norm() / (end[:-1] - begin[:-1]).norm())


def regression_batches(n: int, batch: int = 16, d_in: int = 6, d_out: int = 3, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(batch, d_in, generator=g)
        out.append((x.to(dtype), (torch.tanh(x @ W.T) + 0.1 * torch.randn(batch, d_out, generator=g)).to(dtype)))
    return out


#: One constructor per optimizer variant whose state contract is tested (on the CPU in
#: tests/optim/test_state_contract.py, on a GPU in tests/test_cuda.py).
OPTIMIZERS = {
    "kbfgs": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, damping=0.3),
    "kbfgsl": lambda m: hf_qn.KBFGSL(m, preset="paper", lr=0.1, damping=0.3, history_size=3),
    "kbfgs_interval": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, damping=0.3, update_interval=3, input_inverse="cholesky",
                                            inverse_interval=2),
    "kbfgs_consecutive": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, damping=0.3, pairs="consecutive"),
    "kbfgs_warm_start": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, damping=0.3, input_warm_start=6),  # saved mid-way
    "kbfgs_blocks": lambda m: hf_qn.KBFGS(m, max_block_dim=3),  # the defaults, every factor wider than 3 cut
    "kbfgs_kfac": lambda m: hf_qn.KBFGS(m, output_side="kfac", update_interval=2),  # K-FAC's output factor
    "kbfgs_kfac_paper_blocks": lambda m: hf_qn.KBFGS(m, preset="paper", lr=0.1, output_side="kfac", max_block_dim=3),
    "kbfgs_none": lambda m: hf_qn.KBFGS(m, output_side="none", update_interval=2),  # no output factor (a fine-tune's)
    "kbfgs_polar": lambda m: hf_qn.KBFGS(m, polar_steps=6),  # saved while its first directions are polar
    "mlbfgs": lambda m: hf_qn.MLBFGS(m, lr=0.05, update_interval=2, history_size=3),
    "mlbfgs_bf16": lambda m: hf_qn.MLBFGS(m, lr=0.05, update_interval=2, history_size=3,
                                          history_dtype=torch.bfloat16),
}
