"""One K-BFGS curvature unit: an adapted layer with its Kronecker factors ``H_g ⊗ H_a``.

A :class:`KroneckerLayer` owns (in its state dict, see :mod:`hf_qn.optim.state`)

* the input side: ``A = E[ā āᵀ]`` (running average) and ``H_a ≈ (A + √λ I)⁻¹``, both block-diagonal when
  ``d_in`` exceeds ``max_block_dim`` (their ``(blocks, size, size)`` diagonal blocks, :mod:`hf_qn.linalg.blocks`);
* the output side ``H_g``, held by an :class:`~hf_qn.optim.output_side.OutputSide` strategy;
* the gradient momentum ``ĝ`` and the smoothed pair ``(s̄, ȳ)`` (with the previous statistics for
  consecutive-batch pairs);
* its counters.

The pair and ``H_a`` updates of all layers of one width run together as the rows of one matrix
(:func:`update_output_sides`, :func:`update_input_inverses`), with one host sync per stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adapters import LayerAdapter
from ..capture import input_factor_shape
from ..distributed.shards import whole
from ..linalg import cast, damped_cholesky_inverse, kron_precondition, sym_psd_norm_estimates
from ..linalg.batched import curvature_ok_rows, double_damping_rows
from ..linalg.blocks import BlockSplit, matvec_each
from ..linalg.polar import polar_each
from ._base import adam_denominators_, count_steps_, group_indices, weight_by_gradient_signal_
from .output_side import OutputSide, PairLearner, keep_blocks, rank2_updates
from .state import KBFGS_LAYER_COUNTERS

__all__ = [
    "KroneckerLayer", "PairHyper", "grads_with_l2", "graft_to_adam", "layer_statistics", "read_flags",
    "update_input_factors", "update_input_inverses", "update_momenta", "update_output_sides",
]


#: Newton-Schulz iterations of ``polar_steps``' orthogonalization: 3 instead of Muon's 5, a third cheaper. Measured
#: on the 5.8M GPT-2 on the docstrings, 120 steps, polar for the first 60: validation loss 4.25 against 4.30 with 5.
POLAR_ITERATIONS = 3


class KroneckerLayer:
    """The curvature of one adapted layer; ``state`` is that layer's entry of the optimizer state.
    ``max_block_dim``: an input factor wider than this is block-diagonal (the output side has its own)."""

    def __init__(self, adapter: LayerAdapter, output: OutputSide, max_block_dim: int | None = None) -> None:
        self.adapter = adapter
        self.output = output
        #: how ``A`` and ``H_a`` are cut into diagonal blocks (one block: dense; never for a diagonal factor).
        self.input_split = BlockSplit.of(adapter.d_in, None if adapter.input_diagonal else max_block_dim)
        self.state: dict[str, Any] = {}
        #: the factors converted to the product dtype, per factor: (the factor, its version, the copy)
        self._converted: dict[str, tuple[Tensor, int, Tensor]] = {}

    @property
    def output_gram(self) -> BlockSplit | None:
        """The split of the output-gradient Gram the capture takes for this layer (K-FAC's output factor), or None."""
        return self.output.split if self.output.needs_output_gram else None

    @property
    def forms_pairs(self) -> bool:
        """Whether this layer's output side learns from pairs (BFGS, L-BFGS): only then does the capture take the
        output means ``h̄``, ``ḡ`` the pairs are made of."""
        return isinstance(self.output, PairLearner)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of ``A``: ``(d_in,)`` diagonal, ``(d_in, d_in)`` dense, ``(blocks, size, size)`` blocked."""
        return input_factor_shape(self.adapter, self.input_split)

    def layout(self) -> list[Any]:
        """``[name, d_out, d_in]``, and the block counts of the output and input factors when either is cut."""
        ad, out, inp = self.adapter, self.output.split, self.input_split
        blocks = ["blocks", out.blocks, inp.blocks] if out.blocked or inp.blocked else []
        return [ad.name, ad.d_out, ad.d_in, *blocks]

    @property
    def name(self) -> str:
        return self.adapter.name

    def bind(self, state: dict[str, Any]) -> None:
        """Use ``state`` (the optimizer's entry for this layer, filled on the first step)."""
        self.state = state
        self.output.bind(state.get("output", {}))

    def ensure_state(self, cholesky: bool = False) -> None:
        """Create the state on first use: ``A = 0``, ``H_a = I``, ``H_g = I``, ``ĝ = 0``, zero pairs; with
        ``cholesky`` (``input_inverse="cholesky"``) also the re-inversion countdown at 0 (due at the first update),
        also in a state that lacks it (loaded, or written before the option was set), so that every state of such a
        run holds the keys a checkpoint of it has (what ``torch.distributed.checkpoint`` loads into)."""
        ad, dev = self.adapter, self.adapter.weight.device
        if "input" not in self.state:
            self.state["input"] = {
                "A": torch.zeros(self.input_shape, dtype=torch.float32, device=dev),
                "H_a": torch.ones(ad.d_in, dtype=torch.float32, device=dev)
                if ad.input_diagonal
                else self.input_split.identity(torch.float32, dev),
                "batches": torch.tensor(0, dtype=torch.int64),  # batches in A's plain average
            }
            self.state["output"] = self.output.init_state(dev)
            self.state["momentum_buffer"] = torch.zeros(ad.d_out, ad.d_in, dtype=torch.float32, device=dev)
            self.state["pair"] = {k: torch.zeros(ad.d_out, dtype=torch.float32, device=dev)
                                  for k in ("s_avg", "y_avg", "h_prev", "g_prev")}
            self.state["pair"]["has_prev"] = torch.tensor(False)
            self.state["counters"] = {k: torch.tensor(0, dtype=torch.int64) for k in KBFGS_LAYER_COUNTERS}
            self.output.bind(self.state["output"])
        if cholesky and not ad.input_diagonal:
            self.state["input"].setdefault("inverse_countdown", torch.tensor(0))

    def state_paths(self, graft: str = "none", direction_rms: bool = False) -> list[str]:
        """The paths (``"input/A"``, ``"output/H_g"``, ...) every state of this layer has (``ensure_state``'s,
        and the grafting's)."""
        grafting = [f"graft/{k}" for k in ("exp_avg_sq", "steps")] if graft == "adam" else []
        grafting += ["graft/direction_sq"] if graft == "adam" and direction_rms else []
        return (grafting + [f"input/{k}" for k in ("A", "H_a", "batches")]
                + [f"output/{k}" for k in self.output.STATE_KEYS] + ["momentum_buffer"]
                + [f"pair/{k}" for k in ("s_avg", "y_avg", "h_prev", "g_prev", "has_prev")]
                + [f"counters/{k}" for k in KBFGS_LAYER_COUNTERS])

    def count(self, key: str, times: int = 1) -> None:
        if times:
            self.state["counters"][key] += times

    # ------------------------------------------------------------------ input side
    def warm_input_update(self, A_sum: Tensor, rows: float, n: int, sqrt_lam: float) -> None:
        """One of the first batches of ``A``'s plain average (``n`` batches in it so far, ``A_batch = A_sum / rows``,
        the division folded into the weight); ``H_a = (A + √λ I)⁻¹`` is re-inverted exactly after it."""
        inp = self.state["input"]
        inp["A"].mul_(n / (n + 1)).add_(A_sum, alpha=1.0 / ((n + 1) * rows))
        inp["batches"].add_(1)
        self.invert_input(sqrt_lam)

    def invert_input(self, sqrt_lam: float) -> None:
        """``H_a = (A + √λ I)⁻¹`` (diagonal for an Embedding; block by block for a block-diagonal ``A``)."""
        inp = self.state["input"]
        if self.adapter.input_diagonal:
            inp["H_a"].copy_(1.0 / (inp["A"] + sqrt_lam))
        else:
            inp["H_a"].copy_(damped_cholesky_inverse(inp["A"], sqrt_lam))

    # ------------------------------------------------------------------ momentum and direction
    def ensure_graft_state(self, direction_rms: bool = False) -> dict[str, Tensor]:
        """The grafting's state, created on first use: Adam's ``v = 0`` (``d_out x d_in``, float32), no steps;
        with ``direction_rms`` also the direction's ``v_D = 0`` (same shape)."""
        ad = self.adapter

        def zeros() -> Tensor:
            return torch.zeros(ad.d_out, ad.d_in, dtype=torch.float32, device=ad.weight.device)

        graft = self.state.get("graft")
        if graft is None:  # not setdefault: its default (a zero matrix) would be built on every step
            graft = self.state["graft"] = {"exp_avg_sq": zeros(), "steps": torch.tensor(0, dtype=torch.int64)}
        if direction_rms and "direction_sq" not in graft:
            graft["direction_sq"] = zeros()
        return graft

    @property
    def takes_polar(self) -> bool:
        """Whether ``polar_steps`` orthogonalizes this layer's first directions: a layer preconditioned on both sides
        (as Muon, not an embedding, whose rows are tokens, nor a one-sided layer, such as an LM head)."""
        return not (self.adapter.input_diagonal or self.adapter.one_sided)

    @property
    def direction_flops(self) -> int:
        """Multiply-adds of ``H_g ĝ H_a`` with dense factors (``ĝ H_a`` one-sided): what decides whether
        ``matmul_dtype="auto"`` uses bfloat16 for this layer."""
        d_out, d_in = self.adapter.d_out, self.adapter.d_in
        return d_out * d_in * ((0 if self.adapter.one_sided else d_out) + d_in)

    def direction(self, X: Tensor, matmul_dtype: torch.dtype) -> Tensor:
        """``D = H_g X H_a`` (``X``: ``ĝ``, or Nesterov's look-ahead; the two large products in ``matmul_dtype``)."""
        H_a = self.converted("H_a", self.state["input"]["H_a"], matmul_dtype)
        if self.output.dense_matrix is not None:
            H_g = self.converted("H_g", self.output.dense_matrix, matmul_dtype)
            return kron_precondition(H_g, X, H_a, matmul_dtype)
        return self.output.apply(kron_precondition(None, X, H_a, matmul_dtype))

    def converted(self, key: str, factor: Tensor, dtype: torch.dtype) -> Tensor:
        """``factor`` in ``dtype``, converted again only when the factor has changed since (another tensor, or
        this one written in place: its version counter moved). The factors change on curvature steps only,
        while every step multiplies by them: on a CPU, converting all-MiniLM-L6-v2's input factors to bfloat16 at
        every step made the direction stage 123 ms against 113 (median of 8). Costs the copy's memory (half the
        factor's, for bfloat16)."""
        if factor.dtype == dtype:
            return factor
        held = self._converted.get(key)
        if held is None or held[0] is not factor or held[1] != factor._version or held[2].dtype != dtype:
            held = self._converted[key] = (factor, factor._version, factor.to(dtype))
        return held[2]


def grads_with_l2(layers: list[KroneckerLayer], l2s: list[list[float]]) -> list[Tensor]:
    """Each layer's ``∇W̄ + τ W̄`` in the canonical layout, float32. ``l2s[i]``: τ of layer ``i``'s weight and (if
    any) bias, which may differ (the Trainer's no-decay split). The L2 terms of all layers are added with two
    multi-tensor kernels (``τ W`` then ``∇W + τ W``, elementwise as the unbatched sum), before each layer's parts
    are joined into its matrix."""
    parts: list[Tensor | None] = []  # layer k's weight and bias gradients at 2k and 2k + 1 (None: no bias)
    grads, params, taus, where = [], [], [], []  # what takes an L2 term, and where its sum goes in ``parts``
    for la, l2 in zip(layers, l2s):
        ad = la.adapter
        for g, p, tau in zip(ad.grad_parts(), (ad.weight, ad.bias), l2):
            g = None if g is None else cast(g, torch.float32)
            if g is not None and p is not None and tau != 0:  # the step runs without autograd: no detach
                grads.append(g)
                params.append(cast(whole(p), torch.float32))
                taus.append(tau)
                where.append(len(parts))
            parts.append(g)
        parts += [None] * (len(parts) % 2)  # a layer without a bias
    if grads:
        for i, g in zip(where, torch._foreach_add(grads, torch._foreach_mul(params, taus))):
            parts[i] = g
    return [la.adapter.to_matrix(parts[2 * k], parts[2 * k + 1]) for k, la in enumerate(layers)]  # type: ignore[arg-type]


def update_input_factors(
    layers: list[KroneckerLayer], A_sums: list[Tensor], a_means: list[Tensor], rows: list[float], finite: list[bool],
    decay: float, warm_start: int, sqrt_lam: float,
) -> list[Tensor | None]:
    """Each layer's ``A ← β_A A + (1−β_A) A_batch`` with its batch's ``A_batch = A_sum / rows`` (the division folded
    into the weight); the first ``max(1, warm_start)`` batches are averaged plainly, with ``H_a = (A + √λ I)⁻¹``
    re-inverted exactly after each (:meth:`KroneckerLayer.warm_input_update`); a non-finite batch is skipped and
    counted. The running averages are updated with multi-tensor kernels (one scaling for all, one addition per row
    count), each entry as ``A.mul_(β_A).add_(A_sum, alpha=...)`` computes it. Returns per layer ``ā`` for the
    Hessian-action update of ``H_a`` after the step, or None when ``H_a`` is already exact (or the batch not
    finite)."""
    counts = torch.stack([la.state["input"]["batches"] for la in layers]).tolist() if layers else []  # CPU counters
    out: list[Tensor | None] = []
    averaged: list[Tensor] = []
    by_weight: dict[float, tuple[list[Tensor], list[Tensor]]] = {}
    for la, A_sum, a_mean, n_rows, ok, n in zip(layers, A_sums, a_means, rows, finite, counts):
        if not ok:
            la.count("input_updates_skipped")
            out.append(None)
        elif n < max(1, warm_start):
            la.warm_input_update(A_sum, n_rows, n, sqrt_lam)
            out.append(None)
        else:
            averaged.append(la.state["input"]["A"])
            targets, sums = by_weight.setdefault((1.0 - decay) / n_rows, ([], []))
            targets.append(averaged[-1])
            sums.append(A_sum)
            out.append(a_mean)
    if averaged:
        torch._foreach_mul_(averaged, decay)
        for alpha, (targets, sums) in by_weight.items():
            torch._foreach_add_(targets, sums, alpha=alpha)
    return out


def update_momenta(layers: list[KroneckerLayer], grads: list[Tensor], rho: float) -> None:
    """``ĝ ← ρ ĝ + (1−ρ) G`` for every layer, with multi-tensor kernels (``G``: its gradient with L2)."""
    buffers = [la.state["momentum_buffer"] for la in layers]
    if buffers:
        torch._foreach_mul_(buffers, rho)
        torch._foreach_add_(buffers, grads, alpha=1.0 - rho)


def graft_to_adam(
    layers: list[KroneckerLayer], directions: list[Tensor], grads: list[Tensor], rho: float, beta2: float, eps: float,
    direction_rms: bool = False, polar_steps: int = 0, polar_dtypes: list[torch.dtype] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's ``D`` rescaled to the norm of Adam's step ``m̂ / (√v̂ + ε)`` in that layer, where
    ``m̂ = ĝ / (1 − ρᵗ)`` and ``v ← β₂ v + (1 − β₂) G²`` (``G``: this step's gradient with L2); ``t`` counts the
    layer's own steps. With ``direction_rms``, each entry of ``D`` is first divided by its own running RMS and
    weighted by how far its gradient's RMS stands above ε, ``D ← D (1 − ε / (√v̂ + ε)) / (√v̂_D + ε)`` with
    ``v_D ← β₂ v_D + (1 − β₂) D²`` (Adam's second moment, of the preconditioned direction instead of the gradient;
    the weight: :func:`weight_by_gradient_signal_`, for the entries ``H_g`` and ``H_a`` mix into a coordinate
    without gradient). At a step ``t ≤ polar_steps`` of a layer that :attr:`KroneckerLayer.takes_polar`, the
    shape is ``(1 − w) P / ‖P‖ + w D / ‖D‖`` with ``w = (t − 1) / polar_steps``, ``D`` as above and ``P`` the
    orthogonal polar factor of the plain direction (:func:`~hf_qn.linalg.newton_schulz_polar`,
    :data:`POLAR_ITERATIONS` iterations, in the layer's ``polar_dtypes`` entry) with the same weight: from the polar
    factor at the first step to ``D`` alone after ``polar_steps`` (``v_D`` takes ``D²`` at every step).

    Adam's bias correction ``v̂ = v / c²`` (``c = √(1 − β₂ᵗ)``) is folded into ε: ``√v̂ + ε = (√v + cε) / c``, so the
    denominators are ``√v + cε`` (a pass fewer each than ``√v / c + ε``), the gradient's weight is
    ``1 − cε / (√v + cε)``, and the factor ``c`` of ``D``'s denominator cancels in the rescaling; Adam's norm is
    ``c / (1 − ρᵗ) · ‖ĝ / (√v + cε)‖``. The layers that share a step count (and a device) are done together with
    multi-tensor kernels (both second moments in one update, one ratio of norms per layer in one vector); no host
    sync: the ratios stay tensors. ``directions`` are fresh tensors (this step's products) and are rescaled in
    place, and the quotient whose norm is Adam's is written into the direction's spent denominator: no new
    ``d_out x d_in`` matrix per layer but the denominators. Returns the grafted directions and their norms (0-dim
    tensors, ``r ‖D‖`` for the ratio ``r``: Adam's norm, or 0 for a zero direction; non-finite if the direction
    is)."""
    out, norms = list(directions), dict[int, Tensor]()
    grafts = [la.ensure_graft_state(direction_rms) for la in layers]
    if not grafts:
        return out, []
    counts: list[int] = count_steps_([graft["steps"] for graft in grafts])
    tiny = torch.finfo(torch.float32).tiny
    for idx in group_indices(list(range(len(layers))), key=lambda i: (counts[i], directions[i].device)):
        t, n = counts[idx[0]], len(idx)
        c = math.sqrt(1.0 - beta2**t)
        D = [cast(directions[i], torch.float32) if direction_rms else directions[i] for i in idx]
        moments = [grafts[i]["exp_avg_sq"] for i in idx] + ([grafts[i]["direction_sq"] for i in idx]
                                                            if direction_rms else [])
        samples = [grads[i] for i in idx] + (D if direction_rms else [])
        denoms = adam_denominators_(moments, samples, beta2, t, eps, folded=True)  # √v + cε
        momenta = [layers[i].state["momentum_buffer"] for i in idx]
        polar = [k for k, i in enumerate(idx) if t <= polar_steps and layers[i].takes_polar]
        P = polar_each([D[k] for k in polar], POLAR_ITERATIONS,
                       [polar_dtypes[idx[k]] for k in polar] if polar_dtypes else None)
        if polar:
            weight_by_gradient_signal_(P, [denoms[k] for k in polar], c * eps)
        if direction_rms:
            torch._foreach_div_(D, denoms[n:])
            weight_by_gradient_signal_(D, denoms[:n], c * eps)
        if polar:  # D ← (1 − w) P / ‖P‖ + w D / ‖D‖, w = (t − 1) / polar_steps: from the polar factor to D
            w = (t - 1) / polar_steps
            mixed = [D[k] for k in polar]
            inv_p = torch.stack(torch._foreach_norm(P)).clamp_min(tiny).reciprocal().mul_(1.0 - w)
            inv_d = torch.stack(torch._foreach_norm(mixed)).clamp_min(tiny).reciprocal().mul_(w)
            torch._foreach_mul_(P, inv_p.unbind())
            torch._foreach_mul_(mixed, inv_d.unbind())
            torch._foreach_add_(mixed, P)
        if direction_rms:
            quotients = [torch.div(m, d, out=spent) for m, d, spent in zip(momenta, denoms[:n], denoms[n:])]
        else:
            quotients = list(torch._foreach_div(momenta, denoms))
        adam_norms = torch.stack(torch._foreach_norm(quotients)) * (c / (1.0 - rho**t))
        d_norms = torch.stack(torch._foreach_norm(D))
        ratios = adam_norms / d_norms.clamp_min(tiny)
        torch._foreach_mul_(D, ratios.unbind())
        for i, d, r in zip(idx, D, (ratios * d_norms).unbind()):
            out[i] = d
            norms[i] = r
    return out, [norms[i] for i in range(len(layers))]


@dataclass(frozen=True)
class PairHyper:
    """What the pair updates need of the configuration."""

    pair_decay: float
    powell_mu: float
    sqrt_damping: float
    lm_damping: str
    curvature_eps: float


def update_output_sides(
    layers: list[KroneckerLayer], s_raw: list[Tensor], y_raw: list[Tensor], g_now: list[Tensor], hp: PairHyper
) -> None:
    """Per layer: ``s̄ ← β s̄ + (1−β) s``, ``ȳ`` likewise; double damping (Powell on ``H_g``, then
    Levenberg-Marquardt with ``μ₂ = √λ``); the output side takes the pair if it passes
    ``sᵀy > eps·sᵀs·‖ḡ‖``. A block-diagonal ``H_g`` does all of this block by block, with each block's part of
    ``s̄``, ``ȳ`` and ``ḡ``. The rows (layers, or their blocks) of one output split are done together as the
    rows of a matrix, and what happened to every row is read back with one host sync at the end."""
    beta = hp.pair_decay
    results = []  # per group: its layers, flags (powell, lm, kept) x rows, damped pairs, the proposal, rows/layer
    # one-sided layers and K-FAC's output factors form no pairs
    learners = [i for i, la in enumerate(layers) if isinstance(la.output, PairLearner)]
    for members in group_indices(learners, key=lambda i: (layers[i].output.split, layers[i].adapter.weight.device)):
        rows = [learners[m] for m in members]
        group = [layers[r] for r in rows]
        sides = [la.output for la in group if isinstance(la.output, PairLearner)]  # every one (typed as learners)
        split = sides[0].split
        pairs = [la.state["pair"] for la in group]
        S = torch.stack([p["s_avg"] for p in pairs]).mul_(beta)
        S.add_(torch.stack([s_raw[r] for r in rows]).to(torch.float32), alpha=1.0 - beta)
        Y = torch.stack([p["y_avg"] for p in pairs]).mul_(beta)
        Y.add_(torch.stack([y_raw[r] for r in rows]).to(torch.float32), alpha=1.0 - beta)
        torch._foreach_copy_(
            [p["s_avg"] for p in pairs] + [p["y_avg"] for p in pairs], list(S.unbind(0)) + list(Y.unbind(0))
        )
        n, size = split.blocks, split.size
        S, Y = split.rows(S).reshape(-1, size), split.rows(Y).reshape(-1, size)  # layer k: rows k·n ... k·n + n − 1
        usable = torch.isfinite(S).all(-1) & torch.isfinite(Y).all(-1) & (S.abs().amax(-1) > 0)
        Hy = torch.cat([side.apply_rows(Y[k * n : k * n + n]) for k, side in enumerate(sides)])
        d = double_damping_rows(
            S, Y, Hy, usable, mu1=hp.powell_mu, mu2=hp.sqrt_damping, powell=True, lm=hp.lm_damping
        )
        grad_norm = split.rows(torch.stack([g_now[r] for r in rows])).reshape(-1, size).norm(dim=-1)
        ok, sy = curvature_ok_rows(d.s, d.y, hp.curvature_eps, grad_norm)
        ok &= usable
        if sides[0].needs_damped_products and hp.lm_damping != "none":  # y changed where LM fired
            Hy = torch.cat([side.apply_rows(d.y[k * n : k * n + n]) for k, side in enumerate(sides)])
        kept, proposal = sides[0].propose(sides, d.s, d.y, Hy, sy, ok)
        results.append((group, sides, torch.stack([d.powell, d.lm, kept]), d, proposal, n))
    for (group, sides, _, d, proposal, n), flags in zip(results, read_flags([r[2] for r in results])):
        for k, (la, side) in enumerate(zip(group, sides)):
            powell, lm, accepted = (f[k * n : k * n + n] for f in flags)
            la.count("powell_damped", sum(powell))
            la.count("lm_damped", sum(lm))
            la.count("pairs_skipped", n - sum(accepted))
            if any(accepted):
                side.commit(k, accepted, d.s[k * n : k * n + n], d.y[k * n : k * n + n], proposal)
                la.count("pairs_accepted", sum(accepted))


def update_input_inverses(
    layers: list[KroneckerLayer], a_means: list[Tensor | None], cholesky_interval: int | None, sqrt_lam: float,
    curvature_eps: float,
) -> None:
    """Hessian-action BFGS on ``H_a`` (paper, section 3.3): ``s_a = H_a ā``, ``y_a = (A + √λ I) s_a``, then
    the inverse-BFGS update; or, with ``cholesky_interval``, an exact re-inversion every that many curvature
    steps. Diagonal (Embedding) factors are re-inverted exactly; a block-diagonal ``H_a`` is updated block by
    block (each block's pair from its part of ``ā``). Layers of one input split are updated together.
    ``a_means[i]`` is None where ``H_a`` needs no update (just inverted, or not seen)."""
    todo: list[tuple[KroneckerLayer, Tensor]] = []
    for la, a_mean in zip(layers, a_means):
        if a_mean is None:
            continue
        if la.adapter.input_diagonal:
            la.invert_input(sqrt_lam)
            continue
        if cholesky_interval is not None:  # the countdown: made by ensure_state(cholesky=True)
            countdown = la.state["input"]["inverse_countdown"]
            if int(countdown.sub_(1)) <= 0:
                countdown.fill_(cholesky_interval)
                la.invert_input(sqrt_lam)
            continue
        todo.append((la, a_mean))
    results = []
    for rows in group_indices(todo, key=lambda t: (t[0].input_split, t[1].device)):
        group = [todo[r][0] for r in rows]
        split = group[0].input_split
        n, size = split.blocks, split.size
        inputs = [la.state["input"] for la in group]
        a = split.rows(torch.stack([todo[r][1] for r in rows]))  # (layers, n, size)
        H_a, A = [inp["H_a"] for inp in inputs], [inp["A"] for inp in inputs]
        s_a = matvec_each(H_a, a)
        y_a = matvec_each(A, s_a) + sqrt_lam * s_a
        Hy = matvec_each(H_a, y_a).reshape(-1, size)
        s_a, y_a = s_a.reshape(-1, size), y_a.reshape(-1, size)
        ok, sy = curvature_ok_rows(s_a, y_a, curvature_eps, a.reshape(-1, size).norm(dim=-1))
        new, finite = rank2_updates([inp["H_a"] for inp in inputs], s_a, y_a, Hy, sy)
        results.append((group, new, (ok & finite).unsqueeze(0), n))
    for (group, new, _, n), flags in zip(results, read_flags([r[2] for r in results])):
        for k, (la, H_new) in enumerate(zip(group, new)):
            accepted = flags[0][k * n : k * n + n]
            if any(accepted):
                la.state["input"]["H_a"] = keep_blocks(H_new, la.state["input"]["H_a"], accepted)
            if n - sum(accepted):
                la.count("input_updates_skipped", n - sum(accepted))


def layer_statistics(layers: list[KroneckerLayer], factor_norms: bool = True) -> dict[str, float]:
    """The layers' counters summed and, with ``factor_norms``, the largest norms of their factors
    (:func:`max_factor_norms`)."""
    out: dict[str, float] = dict.fromkeys((f"qn/{k}" for k in KBFGS_LAYER_COUNTERS), 0.0)
    seen = [la for la in layers if "counters" in la.state]
    for la in seen:
        for k in KBFGS_LAYER_COUNTERS:
            out[f"qn/{k}"] += float(la.state["counters"][k])
    if factor_norms:
        out["qn/max_norm_H_g"], out["qn/max_norm_H_a"] = max_factor_norms(seen)
    return out


def max_factor_norms(layers: list[KroneckerLayer]) -> tuple[float, float]:
    """The largest eigenvalue over the layers' ``H_g`` and over their ``H_a`` (NaN if a factor is not finite, 0
    for none): the Lanczos estimates of all the factors' matrices in one batched call."""
    output_mats: list[Tensor] = []
    input_mats: list[Tensor] = []
    for la in layers:
        H_g = la.state["output"].get("H_g")
        if H_g is not None:
            output_mats += factor_matrices(H_g, la.output.split)
        input_mats += factor_matrices(la.state["input"]["H_a"], la.input_split)
    norms = sym_psd_norm_estimates(output_mats + input_mats)
    return _nan_max(norms[: len(output_mats)]), _nan_max(norms[len(output_mats) :])


def factor_matrices(H: Tensor, split: BlockSplit) -> list[Tensor]:
    """The symmetric matrices whose largest eigenvalue is the factor's: a dense factor itself, each block of a
    block-diagonal one (the padding of the last block left out), a diagonal's largest entry as a 1 x 1 matrix."""
    if H.dim() == 1:
        return [H.max().reshape(1, 1)]
    if H.dim() == 2:
        return [H]
    last = split.size - split.pad
    return [*H[:-1].unbind(0), H[-1, :last, :last]]


def _nan_max(values: list[float]) -> float:
    """The largest value, NaN if any is NaN (a non-finite factor must show in the logs), 0 for none."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)


def read_flags(flags: list[Tensor]) -> list[list[list[bool]]]:
    """Boolean masks of several groups, read on the host with one sync."""
    if not flags:
        return []
    dev = flags[0].device
    values = torch.cat([f.to(dev) for f in flags], dim=1).tolist()
    out, start = [], 0
    for f in flags:
        out.append([row[start : start + f.shape[1]] for row in values])
        start += f.shape[1]
    return out

