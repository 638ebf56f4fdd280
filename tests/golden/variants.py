"""Golden trajectories: every optimizer variant, 30 steps on a small MLP and on a tiny GPT-2.

``python -m tests.golden.record`` writes the goldens of the machine it runs on (:func:`golden_file`): losses as
exact hex floats and a SHA-256 of the parameters after each run, and the continuation of every committed
checkpoint. ``checkpoints_v1.pt`` (optimizer and model state after 15 steps of a few variants, as the state
layout of that time wrote them) is never rewritten: it tests the state converter. ``test_golden.py`` re-runs
every variant and requires the same bits, and resumes each checkpoint and requires the same continuation.
``trajectories.json`` (AVX2 kernels) was recorded before the optimizers were restructured into per-layer and
per-block objects, so it proves that the restructuring moved no number; ``trajectories_avx512_bf16.json``
(AVX512 kernels, bf16 products) was recorded later from the code of its commit, as were
``trajectories_avx512_bf16_amx.json`` and ``trajectories_avx512.json`` (AVX512 kernels, float32 products, one Intel
Xeon model, which it names). Bitwise equality needs the same torch build, CPU kernels and product dtype, and for a
recording that names its CPU model that model: the test skips, saying why, where no recording matches.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hf_qn
from tests._helpers.models import mlp, tiny_gpt2, token_batch
from tests._helpers.training import lm_loss, loop, mse_loss, regression_batches

STEPS = 30
RESUME_AT = 15
THREADS = 1  # one thread: reductions in a fixed order

Factory = Callable[[nn.Module], torch.optim.Optimizer]

#: what the K-BFGS variants were recorded with, spelled out so that a change of defaults cannot move them: the
#: paper's configuration, the layer assignment of the time (a tied embedding and layers wider than max_dim
#: went to the fallback) and the fallback's AdamW arithmetic of the time (``torch.optim.AdamW(foreach=False)``'s).
RECORDED_POLICY = hf_qn.LayerPolicy(tied_heads=False, wide="fallback")
PAPER = {"preset": "paper", "policy": RECORDED_POLICY, "fallback_fused": False}

KBFGS_VARIANTS: dict[str, Factory] = {
    "kbfgs_dense": lambda m: hf_qn.KBFGS(m, **PAPER, lr=0.1, damping=0.3),
    "kbfgs_lbfgs": lambda m: hf_qn.KBFGSL(m, **PAPER, lr=0.1, damping=0.3, history_size=5),
    "kbfgs_consecutive": lambda m: hf_qn.KBFGS(m, **PAPER, lr=0.1, damping=0.3, pairs="consecutive"),
    "kbfgs_lbfgs_consecutive": lambda m: hf_qn.KBFGSL(m, **PAPER, lr=0.1, damping=0.3, history_size=4, pairs="consecutive"),
    "kbfgs_interval_guards": lambda m: hf_qn.KBFGS(
        m, **PAPER, lr=0.3, damping=0.3, update_interval=4, warmup_curvature_steps=5, max_update_growth=1.2
    ),
    "kbfgs_loss_guard_high_lr": lambda m: hf_qn.KBFGS(m, **PAPER, lr=8.0, damping=0.1, max_loss_increase=0.0),
    "kbfgs_kl_clip": lambda m: hf_qn.KBFGS(m, **PAPER, lr=0.3, damping=0.3, kl_clip=1e-6),
    "kbfgs_cholesky": lambda m: hf_qn.KBFGS(
        m, **PAPER, lr=0.1, damping=0.3, input_inverse="cholesky", inverse_interval=3, update_interval=2,
        warmup_curvature_steps=2,
    ),
    "kbfgs_warm_start_additive": lambda m: hf_qn.KBFGS(
        m, **PAPER, lr=0.1, damping=0.3, input_warm_start=4, lm_damping="additive", factor_decay=0.8, pair_decay=0.5
    ),
    "kbfgs_bf16_products": lambda m: hf_qn.KBFGS(m, **PAPER, lr=0.1, damping=0.3, matmul_dtype=torch.bfloat16),
    "kbfgs_adamw_fallback": lambda m: hf_qn.KBFGS(
        m, preset="paper", lr=0.1, damping=0.3, fallback_lr=3e-3, fallback_weight_decay=0.01, fallback_fused=False,
        policy=hf_qn.LayerPolicy(exclude=[r"(^0$|\.c_fc$)"], tied_heads=False, wide="fallback"),
    ),
    "kbfgs_sgd_fallback": lambda m: hf_qn.KBFGS(
        m, preset="paper", lr=0.1, damping=0.3, fallback="sgd", fallback_lr=0.05, fallback_weight_decay=1e-3,
        policy=hf_qn.LayerPolicy(exclude=[r"(^0$|\.c_fc$)"], tied_heads=False, wide="fallback"),
    ),
}

#: the mL-BFGS variants grafted to Adam were recorded before ``direction_rms`` (now on by default with it): spelled
#: out, so that they keep proving that nothing else moved.
NO_RMS = {"direction_rms": False}

MLBFGS_VARIANTS: dict[str, Factory] = {
    "mlbfgs_adam": lambda m: hf_qn.MLBFGS(m, lr=1e-2, update_interval=3, history_size=4, **NO_RMS),
    "mlbfgs_unit": lambda m: hf_qn.MLBFGS(m, lr=0.05, update_interval=3, history_size=4, normalize="unit"),
    "mlbfgs_grad": lambda m: hf_qn.MLBFGS(m, lr=0.05, update_interval=3, history_size=4, normalize="grad"),
    "mlbfgs_none": lambda m: hf_qn.MLBFGS(
        m, lr=1e-3, update_interval=3, history_size=4, normalize="none", weight_decay=0.01
    ),
    "mlbfgs_param_blocks": lambda m: hf_qn.MLBFGS(
        m, lr=1e-2, update_interval=2, history_size=3, blocks="param", **NO_RMS
    ),
    "mlbfgs_model_block": lambda m: hf_qn.MLBFGS(
        m, lr=1e-2, update_interval=2, history_size=3, blocks="model", pair_decay=0.5, gamma=0.5, **NO_RMS
    ),
    "mlbfgs_chunks": lambda m: hf_qn.MLBFGS(
        m, lr=1e-2, update_interval=2, history_size=3, blocks=64, min_block_size=40, grad_avg_reset=True, **NO_RMS
    ),
    "mlbfgs_bf16_history": lambda m: hf_qn.MLBFGS(
        m, lr=1e-2, update_interval=2, history_size=3, history_dtype=torch.bfloat16, param_decay=0.9, grad_decay=0.9,
        **NO_RMS,
    ),
    "mlbfgs_undamped": lambda m: hf_qn.MLBFGS(
        m, lr=1e-2, update_interval=2, history_size=3, damp=False, **NO_RMS
    ),
}

VARIANTS: dict[str, Factory] = {**KBFGS_VARIANTS, **MLBFGS_VARIANTS}

#: variants whose state after RESUME_AT steps on the MLP is committed in the state layout of the recording.
CHECKPOINTED = (
    "kbfgs_dense", "kbfgs_lbfgs", "kbfgs_consecutive", "kbfgs_interval_guards", "kbfgs_loss_guard_high_lr",
    "kbfgs_cholesky", "kbfgs_adamw_fallback", "mlbfgs_adam", "mlbfgs_bf16_history", "mlbfgs_chunks",
)


def problem(name: str) -> tuple[nn.Module, list[Any], Callable[..., torch.Tensor]]:
    """A freshly initialised model, its STEPS batches and its loss."""
    torch.manual_seed(0)
    if name == "mlp":
        return mlp(), regression_batches(STEPS), mse_loss
    if name == "gpt2":
        return tiny_gpt2(), [token_batch(seed=i) for i in range(STEPS)], lm_loss
    raise ValueError(name)


PROBLEMS = ("mlp", "gpt2")


def param_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for _, p in model.named_parameters():  # tied parameters once
        h.update(p.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def hexes(losses: list[float]) -> list[str]:
    return [float(x).hex() for x in losses]


def needs_closure(variant: str) -> bool:
    """Only same-batch K-BFGS needs the closure; the others step on the gradients of the loop."""
    return variant.startswith("kbfgs") and "consecutive" not in variant


def run(variant: str, prob: str) -> dict[str, Any]:
    model, batches, loss_fn = problem(prob)
    opt = VARIANTS[variant](model)
    losses = loop(model, opt, batches, loss_fn, closure=needs_closure(variant))
    return {"losses": hexes(losses), "params": param_hash(model)}


def environment() -> dict[str, Any]:
    """What decides the bits: the torch build, the CPU kernels torch picked, whether K-BFGS's
    ``matmul_dtype="auto"`` takes bf16 products on this CPU, (named only where present) whether oneDNN has
    AMX tiles for them, whose bf16 products round differently from AVX-512 BF16's, and the CPU model: the same
    kernels need not give the same bits on another CPU (:func:`recorded_for`)."""
    from hf_qn.optim.config import _cpu_flags, cpu_info, fast_bf16

    env: dict[str, Any] = {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           "native_bf16": fast_bf16(torch.device("cpu"))}
    if "amx_bf16" in _cpu_flags():
        env["amx"] = True
    env["cpu_model"] = cpu_info().get("model name", "")
    return env


#: the value a fact stands for where an environment leaves it out
_UNNAMED = {"amx": False}
#: the facts a recording may leave out to apply whatever their value here
_UNPINNED = {"cpu_model"}


def recorded_for(recorded: dict[str, Any], here: dict[str, Any]) -> bool:
    """Whether a recording made in environment ``recorded`` applies to a machine in ``here``: every fact either
    names agrees. The first recordings (AVX2; AVX-512 BF16; AMX) name no CPU model and apply to every CPU of their
    kernels; later ones name theirs, because the AVX2 recording, made on an AMD EPYC, is not reproduced by the
    AVX2 emulation on an Intel Xeon (every run differs, 2026-12-07)."""
    for key in recorded.keys() | here.keys():
        if key in _UNPINNED and key not in recorded:
            continue
        if here.get(key, _UNNAMED.get(key)) != recorded.get(key, _UNNAMED.get(key)):
            return False
    return True


def recording_for(recordings: dict[str, dict[str, Any]], here: dict[str, Any], *, unpinned: bool = True) -> str | None:
    """The file among ``recordings`` (file name -> the environment it was recorded in) that applies ``here``: one
    that names this CPU model before one that names none (``unpinned=False``: only the former); ``None`` if none
    applies."""
    applies = [name for name, env in sorted(recordings.items())
               if recorded_for(env, here) and (unpinned or "cpu_model" in env)]
    return min(applies, key=lambda name: "cpu_model" not in recordings[name], default=None)  # the first named


def golden_file(here: dict[str, Any], recordings: dict[str, dict[str, Any]], *, unpinned: bool = True) -> str:
    """Where the recording of environment ``here`` goes: the file that applies here (:func:`recording_for`),
    else a new one named by the kernels and product dtype (``trajectories.json`` for the first recording: AVX2,
    float32 products), and also by the CPU model where another model's recording already holds that name."""
    applies = recording_for(recordings, here, unpinned=unpinned)
    if applies is not None:
        return applies
    name = ("trajectories.json" if here["cpu_capability"] == "AVX2" and not here["native_bf16"] else
            f"trajectories_{here['cpu_capability'].lower()}{'_bf16' if here['native_bf16'] else ''}"
            f"{'_amx' if here.get('amx') else ''}.json")
    if name not in recordings:
        return name
    model = re.sub(r"[^a-z0-9]+", "_", here["cpu_model"].lower()).strip("_")
    return f"{name.removesuffix('.json')}_{model}.json"


def read_recordings(folder: Path) -> dict[str, dict[str, Any]]:
    """Every committed recording in ``folder``, by file name."""
    return {f.name: json.loads(f.read_text()) for f in sorted(folder.glob("trajectories*.json"))}


def resume_from_committed_checkpoint(variant: str) -> dict[str, Any]:
    """Load the state the code of the first recording wrote (``checkpoints_v1.pt``, the old layout, through the
    state converter) and continue from it: the continuation's losses and final parameters."""
    saved = torch.load(Path(__file__).parent / "checkpoints_v1.pt", weights_only=True)[variant]
    model, batches, loss_fn = problem("mlp")
    model.load_state_dict(saved["model"])
    opt = VARIANTS[variant](model)
    opt.load_state_dict(saved["optimizer"])
    losses = loop(model, opt, batches[RESUME_AT:], loss_fn, closure=needs_closure(variant))
    return {"losses": hexes(losses), "params": param_hash(model)}
