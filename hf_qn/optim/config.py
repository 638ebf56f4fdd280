"""Hyperparameters of K-BFGS, declared once: name, type, default, documentation and validation.

:class:`KBFGSConfig` is what ``KBFGS(model, **hyperparameters)`` builds from its keyword arguments, and what
``QNTrainingArguments(qn_args=...)`` reaches without re-declaring anything. A bad value raises ``ValueError``
(or ``TypeError``) naming the argument and the allowed range, from ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["MATMUL_DTYPES", "KBFGSConfig", "MLBFGSConfig", "check_range", "fast_bf16", "resolve_matmul_dtype"]

#: the names ``matmul_dtype`` accepts (torch dtypes or these strings); stored as the string.
MATMUL_DTYPES = ("auto", "float32", "bfloat16", "float16")
FALLBACKS = ("adamw", "sgd")


def check_range(name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = True) -> None:
    """Raise ``TypeError`` unless ``value`` is a real number, ``ValueError`` naming the argument unless it lies
    in the interval."""
    if isinstance(value, torch.Tensor):
        raise ValueError(f"Invalid {name}: {name} as a Tensor is not supported (pass a Python float)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (must be a number)")
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi) or math.isnan(value):
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"Invalid {name}: {value} (must be in {lb}{lo}, {hi}{rb})")


def _renamed(cls: Any, owner: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with the names of earlier versions (``cls.RENAMED``) replaced, each with a FutureWarning,
    and a ``TypeError`` listing the known names for an unknown one."""
    out = dict(kwargs)
    for old, new in cls.RENAMED.items():
        if old in out:
            if new in out:
                raise TypeError(f"{owner} got both {old!r} and its new name {new!r}; pass only {new!r}")
            warnings.warn(f"{owner}: {old!r} is now called {new!r}; the old name will be removed in hf_qn 0.3",
                          FutureWarning, stacklevel=4)
            out[new] = out.pop(old)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(out) - known)
    if unknown:
        raise TypeError(f"Unknown {owner} hyperparameter(s) {unknown}; known: {', '.join(sorted(known))}")
    return out


def check_int(name: str, value: Any, lo: int, what: str = "") -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or int(value) != value or value < lo):
        raise ValueError(f"Invalid {name}: {value!r} (must be {what or 'an integer'} >= {lo})")


def set_integers(config: Any, specs: tuple[tuple[str, int, str], ...]) -> None:
    """For each ``(name, lo, what)``: the field checked to be an integer ``>= lo`` (:func:`check_int`) and stored as
    an ``int``. A non-empty ``what`` (e.g. ``"None or an integer"``) allows None, left as it is, and names it in the
    error."""
    for name, lo, what in specs:
        value = getattr(config, name)
        if value is None and what:
            continue
        check_int(name, value, lo, what)
        object.__setattr__(config, name, int(value))


def check_optional_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` naming the argument unless ``value`` is None (the default follows another field), True
    or False."""
    if value not in (None, True, False):
        raise ValueError(f"Invalid {name}: {value!r} (must be None, True or False)")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {', '.join(map(repr, allowed))})")


class _Config:
    """What both configurations share: building one from keyword arguments."""

    OWNER: ClassVar[str] = ""
    RENAMED: ClassVar[dict[str, str]] = {}

    #: named configurations: ``preset=name`` starts from these values instead of the defaults.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: fields whose default (None) is derived from others: ``{derived: deciding fields}``. A keyword that changes
    #: a deciding field derives the other afresh unless it is given too or set by the preset.
    DERIVED: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def from_kwargs(cls, base: Any = None, **kwargs: Any) -> Any:
        """``base`` (default: the defaults, or ``PRESETS[preset]`` when ``preset`` is given) with ``kwargs``
        replaced; old names renamed with a warning, unknown names refused."""
        preset = kwargs.pop("preset", None)
        chosen: set[str] = set()  # fields the preset sets: never re-derived
        if preset is not None:
            if base is not None:
                raise TypeError(f"{cls.OWNER} got both config and preset={preset!r}; pass one of them")
            if preset not in cls.PRESETS:
                raise ValueError(f"Invalid preset: {preset!r} (must be one of {', '.join(map(repr, cls.PRESETS))})")
            base = cls(**cls.PRESETS[preset])
            chosen = set(cls.PRESETS[preset])
        start: Any = base or cls()
        kwargs = _renamed(cls, cls.OWNER, kwargs)
        unset = {f.name: f.default for f in dataclasses.fields(start)}
        for derived, deciders in cls.DERIVED.items():
            if derived in kwargs or derived in chosen:
                continue  # given, or set by the preset
            if any(d in kwargs and kwargs[d] != getattr(start, d) and getattr(start, d) != "auto" for d in deciders):
                kwargs[derived] = unset[derived]  # derived afresh (a decider still "auto": nothing derived from it yet)
        return dataclasses.replace(start, **kwargs)


def _resolve_direction_rms(cfg: Any, grafting: str, without: str) -> None:
    """``cfg.direction_rms``: None becomes whether the field ``grafting`` grafts to Adam; True needs that grafting,
    which gives the RMS-scaled direction its step length (``without``: the other way out, in the message)."""
    mode = getattr(cfg, grafting)
    if cfg.direction_rms is None:
        object.__setattr__(cfg, "direction_rms", mode == "adam")
    if not isinstance(cfg.direction_rms, bool):
        raise ValueError(f"Invalid direction_rms: {cfg.direction_rms!r} (must be True, False or None)")
    if cfg.direction_rms and mode != "adam":
        raise ValueError(
            f"Invalid direction_rms=True with {grafting}={mode!r}: the RMS-scaled direction takes its step length "
            f"from the Adam grafting; pass {grafting}='adam' (the default), or {without}"
        )


@dataclass(frozen=True, kw_only=True)
class KBFGSConfig(_Config):
    """The hyperparameters of :class:`~hf_qn.KBFGS` (all keyword arguments of ``KBFGS(model, ...)``).

    Attributes:
        lr: step size. With ``graft="adam"`` (the default) every layer's step has Adam's length times ``lr``, so
            ``lr`` is tuned like AdamW's; with ``graft="none"`` it is the paper's α of ``α D``. (default: None,
            resolved by ``KBFGS(model, ...)`` for the model: for a transformers language model built from a config
            (a model with an output embedding and ``output_side="kfac"``: pretraining) 6e-3 up to a hidden size of
            128 and ``6e-3 * 128 / hidden_size`` beyond (3e-3 at 256, 1e-3 at 768: μP's 1/width for Adam-like
            steps), 3e-3 for any other. Measured with the from-scratch defaults: at width 128 6e-3 against 3e-3 on
            the GPT-2 1.3M Wikipedia benchmark, 4 seeds, 5.342 against 5.396; the Lee GPT-2 121.0 against 131.3
            perplexity, the Lee Llama 113.4 against 116.4; at width 256 3e-3 against 6e-3 on the 5.8M GPT-2, 2
            seeds x 240 s, 5.463 against 5.584 (ahead on both), and level on the 6.9M Llama (5.339 against 5.342 at
            180 s, 5.587 against 5.616 at 90 s); the ViT on digits level (0.947 against 0.952) but slower to AdamW's
            final accuracy at 6e-3 (0.92x against 0.74x of AdamW's time), so it keeps 3e-3; docs/benchmarks.md.
            ``preset="paper"``: 0.3, the paper's MNIST autoencoder setting)
        damping: total damping λ; each Kronecker factor gets √λ (input side: ``A + √λ I``; output side:
            LM damping ``μ₂ = √λ``). (default: 0.3, the paper's MNIST setting; the official README says
            to tune only ``lr`` and ``damping``)
        grad_decay: ρ of the gradient's running average ``ĝ ← ρ ĝ + (1−ρ) g`` (the paper's "momentum"; no
            bias correction, as the official code). (default: 0.9)
        nesterov: precondition Nesterov's look-ahead ``ρ ĝ + (1−ρ) g`` (``ĝ`` already this step's) instead of
            ``ĝ``: ``D = H_g (ρ ĝ + (1−ρ) g) H_a``, the momentum form of Muon and of ``torch.optim.SGD(nesterov=
            True)``; the grafting's length stays Adam's. One more pass over the layers' gradients per step.
            (default: None: True with ``output_side="kfac"`` (training from scratch), False otherwise. Measured on
            the 1.3M GPT-2 at a constant lr, 120 s, 2 seeds, against without: Vim's documentation 3.992 against
            4.012, the docstrings 3.421 against 3.442 (both with ``inverse_interval=4``), Wikipedia 5.434 against
            5.429 (level); under the Trainer's linear decay level on the Lee GPT-2 and Llama (121.1 against 121.0,
            101.5 against 101.4 perplexity) and the ViT 0.957 against 0.951 (10 seeds); docs/benchmark-history.md)
        l2: L2 coefficient τ added to the gradient of weights and biases before averaging, as the paper
            (coupled, like ``torch.optim.SGD``'s ``weight_decay``; ``QNTrainer`` passes the Trainer's
            ``weight_decay`` here). (default: 1e-5, the paper's)
        factor_decay: β_A of the running average of ``A``. (default: 0.9, the paper's)
        pair_decay: decay of the running averages of ``s`` and ``y``; 0 uses raw pairs (the paper
            uses 0.9 for minibatches and 0 for full batch). (default: 0.99, an average over about 100 curvature
            steps: consecutive batches' pairs differ more by their data than by the step. Measured, 3 seeds on
            the ViT recipe: 0.808 accuracy (0.786-0.822) against 0.713 (0.574-0.783) with 0.9; level on the
            GPT-2 benchmark at both sizes and within the seed spread on MiniLM; ``preset="paper"``: 0.9)
        powell_mu: μ₁ of Powell damping on ``H_g``. (default: 0.2, the paper's)
        lm_damping: ``"interpolate"`` (paper: ``y ← θy + (1−θ)s``, needs √λ < 1), ``"additive"``
            (ASDL: ``y ← y + √λ s``) or ``"none"``. (default: ``"interpolate"``)
        update_interval: curvature (statistics, pairs, factor updates, and the second pass) every this
            many steps; other steps reuse the factors and cost about an Adam step. (default: 5; measured
            against 3 with ``direction_rms``: GPT-2 5.8M, 2 seeds x 240 s, val loss 5.666 against 5.747
            (AdamW 5.919); GPT-2 1.3M 5.629 against 5.656; MiniLM, 5 seeds, 0.785 against 0.775; ViT,
            10 seeds, 0.906 against 0.911 at 1.18x instead of 1.34x AdamW's time to its final accuracy.
            Earlier, without ``direction_rms``: every step 0.70x AdamW's time to its final LM loss, every 2
            0.57x, every 3 0.55x. ``preset="paper"``: 1, the paper's; 10 amortizes the second pass as ASDL
            does with 100)
        warmup_curvature_steps: with ``update_interval > 1``, update curvature at every one of the first
            this many steps, while it changes fastest (the official code's KFAC baseline does the same for
            its first 20 iterations; measured: without it, ``update_interval=10`` at lr 0.3 diverged on the
            autoencoder within 3 epochs). (default: None: 20 where an output factor is learned, 1 with
            ``output_side="none"``: its only curvature is the input factor, inverted exactly at the first step,
            after which a warm-up step only nudges ``A``'s running average and ``H_a`` by one BFGS pair. Measured
            on fine-tunes without an output factor: MiniLM sentiment, 5 seeds, 1 warm-up step against 5: the
            same seed-mean learning curve (0.775 at the end), AdamW's final accuracy in 0.96x its time against
            1.02x; 5 against 20 there: 0.775 against 0.780, 1.08x against 1.21x; next-sentence pairs, 3 seeds:
            0.671 with 1, AdamW's final in 0.57x its time, against 0.673 and 0.55x with 5 and 0.665 and 0.65x
            with 20 in an earlier run)
        input_inverse: how ``H_a`` follows ``A``: ``"bfgs"`` (the paper's Hessian-action BFGS update, no
            inversion after the first: it moves ``H_a`` by one pair along ``H_a ā`` per curvature step) or
            ``"cholesky"`` (``(A + √λ I)⁻¹`` re-inverted exactly every ``inverse_interval`` curvature steps).
            (default: ``"auto"``: ``"cholesky"`` with K-FAC's output factor (``output_side="kfac"``, training from
            scratch), ``"bfgs"`` otherwise. Measured under the Trainer's linear decay with the other
            from-scratch defaults, two CPUs: a 5.8M GPT-2's 240 s ended lower on every one of 4 seeds (by 0.116 on
            the mean; ahead of Muon on all 4), a 1.3M one's 120 s at 5.418 against 5.458 (4 seeds), for 2 % of the
            mean step; the Lee GPT-2 and Llama better outside the seed ranges, the ViT and ResNet level;
            docs/benchmarks.md)
        inverse_interval: curvature steps between Cholesky re-inversions when ``input_inverse="cholesky"``.
            (default: 2, every 10 steps with ``update_interval=5``; measured on the GPT-2s, docs/benchmarks.md.
            The official code's K-FAC re-inverts every 20)
        output_inverse_interval: with ``output_side="kfac"``: each layer's ``H_g = (Ĝ + √λ I)⁻¹`` is re-inverted
            after every one of its first this many batches, then after every this-many-th, staggered over the
            layers of each width so that each curvature step re-inverts about ``1 / output_inverse_interval`` of
            them; ``G`` takes every curvature step's batch (kfac-pytorch's separate factor and inverse
            intervals). The Cholesky and inverse are most of the optimizer's own time in a curvature step on a
            CPU. (default: 2; measured on a 5.8M GPT-2 with ``max_input_rows=512``, CPU: against 1 (every curvature
            step) it cut a curvature step from 1.60x AdamW's step to 1.46x, the final loss within the run-to-run
            spread, docs/benchmarks.md)
        input_warm_start: ``A`` is the plain average of the first this many curvature steps' input Grams
            (each weighted 1/k, ``H_a`` re-inverted exactly after each) before its running average with
            decay ``factor_decay`` starts. The official code averages ``A`` over one extra pass over the
            training set before training; this forms that average online from the training batches,
            without the extra pass (steps per epoch = that pass). 0 or 1: ``A`` starts from the first batch.
            (default: 0; measured on the autoencoder, 5 seeds: no per-epoch difference beyond the
            seed-to-seed spread, docs/design.md)
        max_input_rows: the input factor's batch statistics (``A_batch = Σ ā āᵀ / R``, ``ā``) and the K-FAC output
            factor's Gram use at most this many rows of each forward call (tokens, samples or positions), evenly
            strided; the Grams over all rows are the largest cost of a curvature step on a transformer. None uses
            every row. (default: ``"auto"``: 512 with ``output_side="kfac"`` (training from scratch; measured on
            a 5.8M GPT-2, batch 16 x 128 tokens, CPU: a curvature step 1.60x AdamW's step instead of 1.95x, the
            final loss within the run-to-run spread, docs/benchmarks.md), None otherwise: fine-tunes and the
            autoencoder were measured with every row)
        history_size: ``None`` for a dense BFGS ``H_g`` (K-BFGS); an integer ``p`` for an L-BFGS
            ``H_g`` with ``p`` pairs (K-BFGS(L); the paper uses 100). (default: None)
        output_side: how ``H_g`` is learned: ``"bfgs"`` (the paper's: damped BFGS from the pre-activation pairs),
            ``"kfac"`` (K-FAC's output factor: ``H_g = (Ĝ + √λ I)⁻¹`` with ``G`` the running average (β_A) of the
            output gradients' second moment ``E[g gᵀ]`` over rows, scaled to unit mean eigenvalue, re-inverted at
            every curvature step; it learns every direction of a batch at once where BFGS learns one pair per
            curvature step, at the price of a Gram over the rows and a Cholesky per curvature step), ``"none"``
            (``H_g = I``: every layer preconditioned by its input factor alone, ``D = ĝ H_a``; no output
            statistics, no pairs, half the products) or ``"auto"``: ``"kfac"`` for a transformers model built
            from a config (trained from scratch: no checkpoint in its ``name_or_path``), ``"none"`` for one
            loaded from a checkpoint (a fine-tune), ``"bfgs"`` for any other module and an L-BFGS output side, as
            measured in docs/benchmarks.md: K-FAC's factor trained every model measured from scratch as well as
            BFGS's or better and fails fine-tunes of small batches; on the fine-tunes BFGS's factor, learned from
            a few dozen pairs, added nothing the input factor alone did not reach, at 5-12 % more time.
            The optimizer's ``config`` and ``param_groups`` hold the resolved value. (default: ``"auto"``)
        max_block_dim: a Kronecker factor (dense ``H_g``, or ``H_a``) of dimension ``d`` larger than this is held
            block-diagonal: ``⌈d / max_block_dim⌉`` equal diagonal blocks, each learned by its own BFGS updates
            from its part of the pairs (Shampoo's ``max_preconditioner_dim``). A layer's products ``H_g ĝ H_a``
            then cost ``d_out·d_in·(b_out + b_in)`` instead of ``d_out·d_in·(d_out + d_in)``, and its factors
            ``b·d`` floats instead of ``d²``. None keeps every factor dense. (default: None)
        pairs: ``"same_batch"`` (the paper: a second pass on the same batch at the new point, given by
            ``closure``) or ``"consecutive"`` (no second pass: pairs from the statistics of
            consecutive curvature steps' batches, smoothed by ``pair_decay``). (default: ``"consecutive"``, no
            closure needed; ``preset="paper"``: ``"same_batch"``)
        curvature_eps: relative curvature test ``sᵀy > eps·sᵀs·‖ḡ‖`` of the official code.
            (default: 1e-4)
        max_update_growth: with ``update_interval > 1`` only: if a layer's step ``‖α D‖`` would exceed
            this many times its size at the last kept curvature step, the whole step is scaled down to that
            bound (counted in ``steps_clipped``) and the next step updates curvature. None disables it. With
            ``update_interval=1`` the paper's algorithm runs unchanged. (default: 2.0; measured on the
            autoencoder at lr 0.3, ``update_interval=10``: without it the loss went to NaN within 35 steps (a
            stale step jumped 7x, then curvature steps grew 0.1 -> 0.5 -> 9.7 relative to the weights); with
            it, 128 at step 100, against 129 for ``update_interval=1``)
        max_loss_increase: a guard the paper does not have, on same-batch curvature steps: a step after which
            the batch's loss exceeds its loss before the step by more than this fraction of it is undone (no
            pair; counted in ``steps_rejected``) and the step size is halved, growing back by 1.25x, up to the
            full ``lr``, with every accepted curvature step (``qn/step_backoff`` in :meth:`statistics`). The
            loss before the step costs one more pass, spent only when the loss after it is above the same bound
            for the running average of accepted losses (``qn/loss_checks`` counts them). None disables it.
            (default: 0.25; measured on the autoencoder at the paper's lr 0.3: without it some runs blow up
            (loss 205 -> 287, 190 -> 320, 317 -> 1450, then 4e8 and inf within 80 steps), others do not,
            depending on floating-point summation order)
        graft: ``"adam"``: each layer's direction ``D`` is rescaled to the length Adam's step would have in that
            layer, ``‖m̂ / (√v̂ + ε)‖`` with ``m̂`` the bias-corrected ``ĝ`` and ``v`` the running average of the
            squared gradient (β₂ and ε: ``fallback_betas[1]`` and ``fallback_eps``; one more float per
            parameter): layer-wise grafting (Agarwal et al. 2020, as Distributed Shampoo and mL-BFGS's
            ``normalize="adam"`` do). K-BFGS picks the direction inside a layer, Adam the step length of every
            layer, so ``lr`` is tuned like AdamW's and also serves the fallback (``fallback_lr`` defaults to
            ``lr``). ``"none"``: the paper's ``α D``. (default: ``"adam"``; ``preset="paper"``: ``"none"``)
        direction_rms: with ``graft="adam"``: before the grafting, each entry of the direction is divided by its
            own running RMS, ``D ← D / (√v̂_D + ε)`` with ``v_D ← β₂ v_D + (1 − β₂) D²`` bias-corrected (β₂, ε:
            ``fallback_betas[1]``, ``fallback_eps``; one more float per parameter): Adam's per-coordinate scaling,
            applied to K-BFGS's preconditioned direction instead of the gradient. An entry whose preconditioned
            step swings from step to step (a poorly estimated curvature direction) is held back; the grafting
            then sets the layer's length. Each entry is also weighted by ``1 − ε / (√v̂ + ε)`` (``v̂``: its
            gradient's Adam second moment), 1 where the gradient has signal and 0 where it has none, so that an
            entry without gradient (an attention key bias) keeps Adam's near-zero step instead of a unit one.
            (default: None: True with ``graft="adam"``, False with ``"none"``.
            Measured against without, same lr: ViT on digits, 10 seeds, 0.910 (0.883-0.925) against 0.812
            (0.702-0.861), AdamW 0.881; GPT-2 1.3M on Wikipedia, 2 seeds, 5.573 against 5.64 nats at 120 s;
            docs/benchmarks.md)
        polar_steps: with ``graft="adam"``: over each layer's first this many steps, the shape of its direction
            moves linearly from the orthogonal polar factor of ``H_g ĝ H_a`` (a Newton-Schulz iteration, Muon's
            quintic) to the shape ``direction_rms`` gives, ``(1 − w) P / ‖P‖ + w D / ‖D‖`` with ``w = (t − 1) /
            polar_steps``, before the grafting sets the length. Early on, K-BFGS's factors have seen few batches
            and the RMS-scaled direction moves about as AdamW's step does; the polar factor moves every direction of
            the early gradients alike, as Muon's does. Only layers preconditioned on both sides (no embedding, no
            one-sided layer such as an LM head). Costs a Newton-Schulz iteration per layer and step while it
            lasts (3 matrix products, 3 times, in ``matmul_dtype``: bfloat16 where native, as Muon's). (default:
            None: 40 with K-FAC's output factor, a transformers model trained from scratch, 0 otherwise and with
            ``graft="none"``. Measured at the default lr and a constant lr, 2 seeds, 40 against 0: GPT-2 on the
            docstrings 4.118 against 4.158 at 5.8M and 3.537 against 3.558 at 1.3M (better on every seed), the
            Llama 5.391 against 5.430 at 6.9M and 5.301 against 5.346 at 1.9M; the ViT on digits, 10 seeds, 0.965
            against 0.957, the ResNet level, the Lee recipes level under the Trainer's decay; on Wikipedia the
            1.3M GPT-2 level and the 5.8M 0.015-0.043 worse (two runs; 0.026 under the decay); docs/benchmarks.md)
        kl_clip: if set, scales the step down so that ``α² Σ⟨D, ĝ⟩ ≤ kl_clip`` (kfac-pytorch's
            KL clipping; with ``nesterov``, ``ĝ``'s look-ahead, the matrix ``D`` preconditions, in place of ``ĝ``);
            None follows the paper. (default: None)
        matmul_dtype: dtype of the two large products of every step, the input Gram ``Σ ā āᵀ`` of the
            capture and the direction ``H_g ĝ H_a`` (and of ``polar_steps``' Newton-Schulz); factors, their
            updates, sums and ĝ stay float32. ``torch.bfloat16`` makes those products about 3x faster on a CPU
            with AVX512-BF16 (measured: 1000-wide GEMM 5.9 vs 19.5 ms), at about 3 significant digits; the
            autoencoder's per-epoch loss did not change (docs/design.md); on a CPU without it (AVX2 only) they
            are slower than float32 (a 1.1M-parameter GPT-2: 2.3x AdamW's step against 1.1x). ``"auto"``:
            bfloat16 where the device multiplies it natively (a CUDA GPU of compute capability 8.0 or newer, a
            CPU with AVX512-BF16 or AMX) unless the model is float64, float32 elsewhere; a layer whose direction
            has fewer than 4M multiply-adds (about 128 x 128) keeps float32 there, which is faster at that size
            (:func:`resolve_matmul_dtype`; the layer's Newton-Schulz takes the same dtype).
            bf16 products round each Gram and direction entry to about 3 digits, so runs that split a batch
            differently (gradient accumulation, another number of ranks) agree to about 1e-2 relative, not to
            float32's 1e-5; set ``"float32"`` where that matters. (default: ``"auto"``)
        fallback: first-order rule for parameters no adapter takes: ``"adamw"`` or ``"sgd"``.
            (default: ``"adamw"``)
        fallback_lr: learning rate of the fallback. (default: None: ``lr`` with ``graft="adam"``, else 1e-3)
        fallback_embedding_lr: learning rate of the model's input (token) embedding where it goes to the fallback
            (transformers' ``get_input_embeddings()`` when untied from the head, such as a Llama's; a tied one is the
            one-sided head, at ``lr``), in param groups of its own; the fallback's other parameters (position
            embeddings, norms, biases) keep ``fallback_lr``; None: ``fallback_lr``'s, in the fallback's groups.
            (default: ``"auto"``, resolved by ``KBFGS(model, ...)``: ``lr / 0.1`` (0.06 at 6e-3, 0.03 at 3e-3) for a
            language model trained from scratch, None otherwise. Against ``lr / 0.3`` on every Llama measured: the Lee
            Llama 101.6 against 104.8 perplexity, the 1.9M Llama on Wikipedia 5.168 against 5.293 and on Vim's
            documentation 3.707 against 3.775, the 6.9M Llama 5.294 against 5.377; the optimum is flat up to
            ``lr / 0.05``. A position embedding at such an lr trained far worse (the Lee GPT-2 at 0.03: 184.4 against
            121.0), so it keeps ``fallback_lr``; docs/benchmarks.md)
        fallback_betas, fallback_eps: AdamW's, also the grafting's and ``direction_rms``'s β₂ and ε. (default:
            ``"auto"``: (0.9, 0.95) with ``output_side="kfac"``, the β₂ of language-model pretraining (measured on
            the GPT-2s under the Trainer's linear decay: 0.04 nats at 1.3M, docs/benchmarks.md), (0.9, 0.999)
            otherwise; 1e-8)
        fallback_momentum: SGD's momentum when ``fallback="sgd"``. (default: 0.9)
        fallback_weight_decay: decoupled (AdamW) or coupled (SGD) weight decay of the fallback.
            (default: 0.0)
        fallback_fused: the AdamW fallback's kernel. True: torch's fused AdamW kernel, the arithmetic of
            ``torch.optim.AdamW(fused=True)`` (one pass per tensor; on a CPU several times faster than the
            multi-tensor passes: 5.8 against 33.8 ms per step on MiniLM's 11.7M-parameter word embedding); False: the
            arithmetic of ``torch.optim.AdamW(foreach=False)``, bit for bit (the numbers of hf_qn before this
            option). None: fused where torch has the kernel for the parameters' device and they are plain
            tensors (FSDP2's sharded parameters take the multi-tensor passes). (default: None)
    """

    lr: float | None = None
    damping: float = 0.3
    grad_decay: float = 0.9
    nesterov: bool | None = None
    l2: float = 1e-5
    factor_decay: float = 0.9
    pair_decay: float = 0.99
    powell_mu: float = 0.2
    lm_damping: str = "interpolate"
    update_interval: int = 5
    warmup_curvature_steps: int | None = None
    input_inverse: str = "auto"
    inverse_interval: int = 2
    output_inverse_interval: int = 2
    input_warm_start: int = 0
    max_input_rows: int | str | None = "auto"
    history_size: int | None = None
    output_side: str = "auto"
    max_block_dim: int | None = None
    pairs: str = "consecutive"
    curvature_eps: float = 1e-4
    max_update_growth: float | None = 2.0
    max_loss_increase: float | None = 0.25
    graft: str = "adam"
    direction_rms: bool | None = None
    polar_steps: int | None = None
    kl_clip: float | None = None
    matmul_dtype: str | torch.dtype = "auto"
    fallback: str = "adamw"
    fallback_lr: float | None = None
    fallback_embedding_lr: float | str | None = "auto"
    fallback_betas: tuple[float, float] | str = "auto"
    fallback_eps: float = 1e-8
    fallback_momentum: float = 0.9
    fallback_weight_decay: float = 0.0
    fallback_fused: bool | None = None

    def __post_init__(self) -> None:
        self._check_scalars()
        self._follow_output_side()
        self._check_structure()

    def _follow_output_side(self) -> None:
        """Each field of :attr:`FOLLOW_OUTPUT_SIDE` still at its unset value takes the value of the output side,
        once ``output_side`` is not ``"auto"`` (``KBFGS(model, ...)`` resolves it for the model)."""
        check_choice("output_side", self.output_side, ("auto", "bfgs", "kfac", "none"))
        if self.polar_steps is None and self.graft != "adam":
            object.__setattr__(self, "polar_steps", 0)  # the polar blend takes its step length from the grafting
        if self.output_side == "auto":
            return
        for name, (unset, by_side, otherwise) in self.FOLLOW_OUTPUT_SIDE.items():
            if getattr(self, name) == unset:
                object.__setattr__(self, name, by_side.get(self.output_side, otherwise))

    def _check_scalars(self) -> None:
        if self.lr is not None:
            check_range("lr", self.lr, 0.0, math.inf)
        check_range("damping", self.damping, 0.0, math.inf, lo_open=True)
        check_range("grad_decay", self.grad_decay, 0.0, 1.0)
        check_range("l2", self.l2, 0.0, math.inf)
        check_range("factor_decay", self.factor_decay, 0.0, 1.0)
        check_range("pair_decay", self.pair_decay, 0.0, 1.0)
        check_range("powell_mu", self.powell_mu, 0.0, 1.0, lo_open=True)
        check_range("curvature_eps", self.curvature_eps, 0.0, math.inf)
        if self.fallback_lr is not None:
            check_range("fallback_lr", self.fallback_lr, 0.0, math.inf)
        if isinstance(self.fallback_embedding_lr, str) and self.fallback_embedding_lr != "auto":
            raise ValueError(f"Invalid fallback_embedding_lr: {self.fallback_embedding_lr!r} (must be a number, None "
                             "or 'auto')")
        if self.fallback_embedding_lr not in (None, "auto"):
            check_range("fallback_embedding_lr", self.fallback_embedding_lr, 0.0, math.inf)
        check_range("fallback_eps", self.fallback_eps, 0.0, math.inf, lo_open=True)
        check_range("fallback_momentum", self.fallback_momentum, 0.0, 1.0)
        check_range("fallback_weight_decay", self.fallback_weight_decay, 0.0, math.inf)
        if self.fallback_betas != "auto":
            if not isinstance(self.fallback_betas, (tuple, list)) or len(self.fallback_betas) != 2:
                raise ValueError(f"Invalid fallback_betas: {self.fallback_betas!r} (must be a pair (beta1, beta2) "
                                 "or 'auto')")
            for i, b in enumerate(self.fallback_betas):
                check_range(f"fallback_betas[{i}]", b, 0.0, 1.0)
            object.__setattr__(self, "fallback_betas", tuple(self.fallback_betas))
        if self.max_update_growth is not None:
            check_range("max_update_growth", self.max_update_growth, 1.0, math.inf, lo_open=True)
        if self.max_loss_increase is not None:
            check_range("max_loss_increase", self.max_loss_increase, 0.0, math.inf)
        if self.kl_clip is not None:
            check_range("kl_clip", self.kl_clip, 0.0, math.inf, lo_open=True)

    def _check_structure(self) -> None:
        check_choice("lm_damping", self.lm_damping, ("interpolate", "additive", "none"))
        if self.lm_damping == "interpolate" and math.sqrt(self.damping) >= 1.0:
            raise ValueError(
                f"Invalid damping: {self.damping} gives mu2 = sqrt(damping) = {math.sqrt(self.damping):.3g} >= 1, "
                "which the interpolating LM damping cannot use; pass damping < 1 or lm_damping='additive'"
            )
        optional = "None or an integer"
        set_integers(self, (("update_interval", 1, ""), ("inverse_interval", 1, ""),
                            ("output_inverse_interval", 1, ""), ("input_warm_start", 0, ""),
                            ("polar_steps", 0, optional), ("warmup_curvature_steps", 0, optional),
                            ("max_block_dim", 1, optional),
                            ("history_size", 1, "None for dense BFGS, or an integer")))
        if self.max_input_rows != "auto":
            set_integers(self, (("max_input_rows", 1, "'auto', None or an integer"),))
        check_choice("input_inverse", self.input_inverse, ("auto", "bfgs", "cholesky"))
        if self.output_side in ("kfac", "none") and self.history_size is not None:
            raise ValueError(
                f"Invalid history_size: {self.history_size} with output_side={self.output_side!r} (an L-BFGS "
                f"history is a BFGS output side); use KBFGS (history_size=None) for output_side="
                f"{self.output_side!r}, or output_side='bfgs'"
            )
        check_choice("pairs", self.pairs, ("same_batch", "consecutive"))
        check_choice("fallback", self.fallback, FALLBACKS)
        check_optional_bool("nesterov", self.nesterov)
        check_optional_bool("fallback_fused", self.fallback_fused)
        check_choice("graft", self.graft, ("none", "adam"))
        _resolve_direction_rms(self, "graft", "direction_rms=False for the paper's α D")
        if self.polar_steps and self.graft != "adam":
            raise ValueError(
                f"Invalid polar_steps={self.polar_steps} with graft={self.graft!r}: the polar factor takes its step "
                "length from the grafting; pass graft='adam', or polar_steps=0 for the paper's α D"
            )
        name = str(self.matmul_dtype).replace("torch.", "")
        if name not in MATMUL_DTYPES:
            raise ValueError(
                f"Invalid matmul_dtype: {self.matmul_dtype!r} (must be 'auto', torch.float32, torch.bfloat16 or "
                "torch.float16)"
            )
        object.__setattr__(self, "matmul_dtype", name)

    OWNER: ClassVar[str] = "KBFGS"
    #: ``preset="paper"``: the K-BFGS paper's MNIST autoencoder setting (Goldfarb et al. 2020, section 5):
    #: curvature every step, the paper's lr, damping, L2 and pair decay, no grafting, float32 products.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {"lr": 0.3, "damping": 0.3, "l2": 1e-5, "update_interval": 1, "warmup_curvature_steps": 20,
                  "pair_decay": 0.9, "pairs": "same_batch", "graft": "none", "direction_rms": False,
                  "polar_steps": 0, "matmul_dtype": "float32", "output_side": "bfgs"},
    }
    #: names of earlier versions: accepted with a FutureWarning (the table in docs/design.md).
    RENAMED: ClassVar[dict[str, str]] = {"momentum": "grad_decay", "weight_decay": "l2", "stat_decay": "factor_decay"}
    #: fields whose default follows the resolved ``output_side``: ``{field: (unset value, {side: value}, value for
    #: the other sides)}``. The ``"kfac"`` values (a transformers model trained from scratch) are the pretraining
    #: measurements of docs/benchmarks.md; the others are the values of earlier versions, which the fine-tunes,
    #: the autoencoder and ``preset="paper"`` were measured with.
    FOLLOW_OUTPUT_SIDE: ClassVar[dict[str, tuple[Any, dict[str, Any], Any]]] = {
        "warmup_curvature_steps": (None, {"none": 1}, 20),
        "nesterov": (None, {"kfac": True}, False),
        "input_inverse": ("auto", {"kfac": "cholesky"}, "bfgs"),
        "max_input_rows": ("auto", {"kfac": 512}, None),
        "fallback_betas": ("auto", {"kfac": (0.9, 0.95)}, (0.9, 0.999)),
        "polar_steps": (None, {"kfac": 40}, 0),
    }
    DERIVED: ClassVar[dict[str, tuple[str, ...]]] = {
        "direction_rms": ("graft",), **{f: ("output_side",) for f in FOLLOW_OUTPUT_SIDE},
        "polar_steps": ("output_side", "graft"),
    }

    def matmul_torch_dtype(
        self, device: torch.device, param_dtype: torch.dtype = torch.float32, flops: int | None = None
    ) -> torch.dtype:
        """``matmul_dtype`` as a torch dtype, ``"auto"`` resolved for ``device``, the parameters' dtype and (if
        given) the multiply-adds of the product."""
        return resolve_matmul_dtype(str(self.matmul_dtype), device, param_dtype, flops)

    def _resolved(self, name: str) -> Any:
        """The field ``name`` of :attr:`FOLLOW_OUTPUT_SIDE`, refused while it is still unset (``output_side="auto"``
        is resolved for the model by ``KBFGS(model, ...)``)."""
        value = getattr(self, name)
        if value == self.FOLLOW_OUTPUT_SIDE[name][0]:
            raise ValueError(
                f"{name}={value!r} follows output_side, which is still 'auto': construct KBFGS(model, ...) to resolve "
                f"it for the model, or pass output_side or {name}"
            )
        return value

    @property
    def warmup_steps(self) -> int:
        """``warmup_curvature_steps``, resolved (the default follows ``output_side``)."""
        return int(self._resolved("warmup_curvature_steps"))

    @property
    def polar_blend_steps(self) -> int:
        """``polar_steps``, resolved (the default follows ``output_side`` and ``graft``)."""
        return int(self._resolved("polar_steps"))

    @property
    def input_rows(self) -> int | None:
        """``max_input_rows``, resolved (the default follows ``output_side``)."""
        rows: int | None = self._resolved("max_input_rows")
        return rows

    @property
    def adam_betas(self) -> tuple[float, float]:
        """``fallback_betas``, resolved (the default follows ``output_side``)."""
        betas: tuple[float, float] = self._resolved("fallback_betas")
        return betas

    @property
    def lr_value(self) -> float:
        """``lr``, resolved (the default follows the model: ``KBFGS(model, ...)`` resolves it)."""
        if self.lr is None:
            raise ValueError("lr=None follows the model: construct KBFGS(model, ...) to resolve it, or pass lr")
        return self.lr

    @property
    def fallback_lr_value(self) -> float:
        """The fallback's learning rate: ``fallback_lr``, or by default ``lr`` when grafted to Adam, else 1e-3."""
        if self.fallback_lr is not None:
            return self.fallback_lr
        return self.lr_value if self.graft == "adam" else 1e-3


#: ``matmul_dtype="auto"`` keeps a layer's direction ``H_g ĝ H_a`` with fewer multiply-adds than this in float32:
#: there the two casts cost more than bfloat16 saves. Measured on a CPU with AVX512-BF16 (2 threads), float32
#: against bfloat16: 96 x 97 (1.8M) 40 vs 84 µs, 128 x 129 (4.2M) 101 vs 91 µs, 256 x 257 552 vs 222 µs.
AUTO_BF16_MIN_FLOPS = 1 << 22


def resolve_matmul_dtype(
    name: str, device: torch.device, param_dtype: torch.dtype = torch.float32, flops: int | None = None
) -> torch.dtype:
    """The torch dtype of ``name``; ``"auto"`` is bfloat16 where ``device`` multiplies it natively (CUDA compute
    capability >= 8.0; a CPU with the ``avx512_bf16`` or ``amx_bf16`` flag), float32 elsewhere, float32 for a
    float64 model (whoever trains in float64 asked for precision, not speed), and float32 for a product of
    fewer than :data:`AUTO_BF16_MIN_FLOPS` multiply-adds (``flops``, when given)."""
    if name != "auto":
        dtype: torch.dtype = getattr(torch, name)
        return dtype
    if param_dtype == torch.float64 or (flops is not None and flops < AUTO_BF16_MIN_FLOPS):
        return torch.float32
    return torch.bfloat16 if fast_bf16(torch.device(device)) else torch.float32


@functools.lru_cache(maxsize=16)
def fast_bf16(device: torch.device) -> bool:
    """Whether ``device`` has native bfloat16 matrix products."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, str]:
    """The fields of the first processor in Linux's ``/proc/cpuinfo`` (``"model name"``, ``"flags"``, ...);
    empty elsewhere."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():  # the end of the first processor's block
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where ``/proc/cpuinfo`` is not)."""
    return frozenset(cpu_info().get("flags", "").split())


NORMALIZE_MODES = ("adam", "unit", "grad", "none")
HISTORY_DTYPES = ("float32", "bfloat16", "float64")


@dataclass(frozen=True, kw_only=True)
class MLBFGSConfig(_Config):
    """The hyperparameters of :class:`~hf_qn.MLBFGS` (all keyword arguments of ``MLBFGS(params, ...)``).

    Attributes:
        lr: step size α. (default: 1e-3: with the default Adam grafting a step moves each block as far as
            Adam's step at lr ``α / (1 − μ)`` would; the official runs use 0.1 with ``normalize="unit"``)
        momentum: heavy-ball momentum μ on the direction (as ``torch.optim.SGD``'s). (default: 0.9, the
            official runs')
        weight_decay: decoupled weight decay, applied to the parameters (as ``torch.optim.AdamW``'s; not mixed
            into the gradient or into ``y``, unlike the official code). (default: 0.0)
        history_size: pairs kept per block, ``m``. (default: 10, the official runs')
        update_interval: steps between curvature pairs, ``T``. (default: 20: the official runs use 50 with
            β = 0.999 over 150-epoch trainings, too slow for short fine-tuning; on the MNIST autoencoder
            β = 0.99 with T = 20 reached a training loss of 98 in 60 s, against 174 with β = 0.9, T = 10)
        param_decay, grad_decay: β_θ, β_g of the running averages of parameters and gradients (normalized
            EMAs started at the first value; the paper's β). (default: 0.99: minibatch noise in ``y`` falls
            with the averaging window, about 100 steps here; see ``update_interval``)
        sigma_low, sigma_high: damping bounds on ``sᵀy/sᵀs``. (default: 0.01, 1.5, the official code's)
        min_mix: when the bounds fire, at most ``1 − min_mix`` of ``y`` is kept (``τ₀ = 1 − min_mix``; the
            official code's "damping"). (default: 0.01, the official runs')
        damp: apply the bounds at all (off gives textbook pairs). (default: True)
        pair_decay: the official code's "double momentum" on pairs: ``s ← (1−c) s + c s_prev``, same for
            ``y`` (as K-BFGS's ``pair_decay``). (default: 0.0; the official runs use 0.9)
        normalize: how the direction is scaled before momentum. ``"adam"``: each block's direction is
            rescaled to the norm Adam's un-momented step ``g / (√v̂ + ε)`` has in that block (layer-wise
            grafting, as Distributed Shampoo does; β₂ = 0.999, ε = 1e-8; one more float per parameter):
            L-BFGS picks the direction inside a block, Adam the step length of each block, so noisy pairs
            cannot make one block's step dwarf the others and ``lr`` is tuned like Adam's, divided by
            ``1/(1 − μ)``. ``"unit"``: unit global L2 norm, as the official code does for all its results
            (``lr`` is then the step length, so use a decaying schedule). ``"grad"``: the global norm of the
            gradient (L-BFGS picks the direction, SGD's magnitude is kept). ``"none"``: the raw ``H g``
            (textbook; measured on digits, unnormalized diverged for lr ≥ 0.003 with σ_L = 0.01).
            ``True``/``False`` mean ``"unit"``/``"none"``. (default: ``"adam"``: on the MNIST autoencoder,
            60 s, ``"unit"`` reached 199-233 at every lr tried, ``"grad"`` stalled near 190-230, ``"adam"``
            98 (AdamW 98); on the digits ViT recipe ``"unit"`` stayed at chance, ``"adam"`` reached 0.62)
        direction_rms: with ``normalize="adam"``: before the grafting, each entry of the direction is divided by
            its own running RMS, ``d ← d / (√v̂_d + ε)`` with ``v_d ← β₂ v_d + (1 − β₂) d²`` (Adam's second moment,
            of the L-BFGS direction instead of the gradient; β₂, ε as the grafting's; one more float per
            parameter) and weighted by ``1 − ε / (√v̂ + ε)`` (0 for an entry without gradient), as K-BFGS's
            ``direction_rms``. (default: None: True with ``normalize="adam"``, False
            otherwise. Measured against without, same lr: ViT on digits, 5 seeds, 0.753 against 0.568 (AdamW
            0.881); MiniLM, 3 seeds, 0.725 against 0.625; GPT-2 1.3M on Wikipedia, 2 seeds, 5.946 against 6.073
            nats at 120 s (AdamW 5.771); docs/benchmarks.md)
        grad_avg_reset: restart the gradient average from the current gradient after each pair (the
            official "refresh-g"). (default: False)
        gamma: initial scaling ``H₀ = γI``: ``"auto"`` (newest pair's ``sᵀy/yᵀy``) or a float.
            (default: ``"auto"``)
        curvature_eps: a pair is used only if ``sᵀy > curvature_eps · sᵀs``. (default: 1e-10)
        history_dtype: storage dtype of the histories, float32 or bfloat16 (halves the dominant memory).
            (default: float32)
        blocks: ``"layer"``, ``"param"``, ``"model"``, a chunk size, or ``{name: [param names]}``; see
            :func:`~hf_qn.optim.mlbfgs_blocks.build_blocks`. (default: ``"layer"``)
        min_block_size: merge consecutive blocks smaller than this. (default: 0)
        shard_state: split the per-element state (averages, histories, momentum) over the ranks, each keeping
            a ``1/N`` slice of every parameter, with the L-BFGS products summed over ranks (the same
            directions as one process, within float rounding). ``None``: split under FSDP2 ``fully_shard``
            (where it is the only choice), whole on every rank otherwise. ``True`` under DDP: ZeRO-1 (each
            rank updates its slices, which are then all-gathered). Checkpoints are then per rank (see
            :meth:`~hf_qn.MLBFGS.full_state_dict` to move between rank counts). (default: None)
    """

    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    history_size: int = 10
    update_interval: int = 20
    param_decay: float = 0.99
    grad_decay: float = 0.99
    sigma_low: float = 0.01
    sigma_high: float = 1.5
    min_mix: float = 0.01
    damp: bool = True
    pair_decay: float = 0.0
    normalize: str | bool = "adam"
    direction_rms: bool | None = None
    grad_avg_reset: bool = False
    gamma: float | str = "auto"
    curvature_eps: float = 1e-10
    history_dtype: str | torch.dtype = "float32"
    blocks: str | int | Mapping[str, Sequence[str]] = "layer"
    min_block_size: int = 0
    shard_state: bool | None = None

    OWNER: ClassVar[str] = "MLBFGS"
    DERIVED: ClassVar[dict[str, tuple[str, ...]]] = {"direction_rms": ("normalize",)}
    RENAMED: ClassVar[dict[str, str]] = {
        "param_beta": "param_decay", "grad_beta": "grad_decay", "pair_momentum": "pair_decay", "damping": "min_mix",
    }

    def __post_init__(self) -> None:
        for name in ("momentum", "param_decay", "grad_decay", "min_mix", "pair_decay"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_range("lr", self.lr, 0.0, math.inf)
        check_range("weight_decay", self.weight_decay, 0.0, math.inf)
        check_range("curvature_eps", self.curvature_eps, 0.0, math.inf)
        set_integers(self, (("history_size", 1, ""), ("update_interval", 1, ""), ("min_block_size", 0, "")))
        check_range("sigma_low", self.sigma_low, 0.0, 1.0)
        check_range("sigma_high", self.sigma_high, 1.0, math.inf, lo_open=True)
        for name in ("damp", "grad_avg_reset"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Invalid {name}: {getattr(self, name)!r} (must be True or False)")
        if self.shard_state is not None and not isinstance(self.shard_state, bool):
            raise TypeError(f"Invalid shard_state: {self.shard_state!r} (must be None, True or False)")
        normalize = self.normalize
        if isinstance(normalize, bool):
            object.__setattr__(self, "normalize", "unit" if normalize else "none")
        check_choice("normalize", self.normalize, NORMALIZE_MODES)
        _resolve_direction_rms(self, "normalize", "direction_rms=False")
        if isinstance(self.gamma, str):
            check_choice("gamma", self.gamma, ("auto",))
        else:
            check_range("gamma", self.gamma, 0.0, math.inf, lo_open=True)
        dtype = str(self.history_dtype).replace("torch.", "")
        check_choice("history_dtype", dtype, HISTORY_DTYPES)
        object.__setattr__(self, "history_dtype", dtype)
        blocks = self.blocks
        if not (blocks in ("layer", "param", "model") or isinstance(blocks, Mapping)
                or (isinstance(blocks, int) and not isinstance(blocks, bool) and blocks >= 1)):
            raise ValueError(f"Invalid blocks: {blocks!r} (must be 'layer', 'param', 'model', a chunk size >= 1, or "
                             "a mapping {block name: [parameter names]})")

    @property
    def history_torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, str(self.history_dtype))
        return dtype
