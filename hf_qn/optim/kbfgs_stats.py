"""K-BFGS's batch statistics: captured row sums turned into means, all-reduced over ranks.

``A = Σ ā āᵀ / R``, ``ā = Σ ā / R`` (input side, float32), ``h̄ = Σ h / R_h``, ``ḡ = Σ ∂L/∂h`` averaged over
ranks (output side, float64): the ingredients of one curvature step (paper, Algorithm 1, lines 4 and 9); and
``G = Σ g gᵀ / R_G`` for a layer whose output factor is K-FAC's (float32; ``R_G``: the rows its Gram used).

Each rank's loss is the mean over its own rows, so the output gradients ``g`` it sees are ``world_size`` times
those of the loss over the global batch: ``ḡ`` (a sum over the batch) is divided by ``world_size`` and ``G`` (a
mean of products of two ``g``) by ``world_size²``, so that every statistic, and a checkpoint of them, is the one
process's whatever the number of ranks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ..adapters import LayerAdapter
from ..capture import LayerStats
from ..distributed import all_reduce_sum_, world_size

__all__ = ["LayerMeans", "reduce_statistics"]


class LayerMeans(NamedTuple):
    """One layer's means over a batch (``A_sum``, ``a``, ``a_rows`` are None for a second pass; ``G`` is None where
    the output-gradient Gram is not captured). The input Gram stays a sum, ``A = A_sum / a_rows``: the division is
    folded into the weight with which the running average takes it (one pass over a ``d_in x d_in`` matrix less)."""

    h: Tensor
    g: Tensor
    h_rows: Tensor
    A_sum: Tensor | None = None
    a: Tensor | None = None
    a_rows: Tensor | None = None
    G: Tensor | None = None


def _check_seen(adapters: list[LayerAdapter], stats: list[LayerStats], what: str, expect: list[bool] | None) -> None:
    """A layer with a gradient (or listed in ``expect``) must have been seen by its hooks."""
    for i, (ad, st) in enumerate(zip(adapters, stats)):
        needed = ad.weight.grad is not None if expect is None else expect[i]
        if needed and (st.forward_calls == 0 or st.g_sum is None):
            raise RuntimeError(
                f"KBFGS: the hooks of layer {ad.name!r} did not fire during the {what} although it has a "
                "gradient. Its weight is probably used functionally (e.g. nn.MultiheadAttention.out_proj) or "
                "the forward ran in eval mode / under no_grad. Exclude it: KBFGS(model, "
                f"policy=hf_qn.LayerPolicy(exclude=[r'{ad.name}']))"
            )


def reduce_statistics(
    adapters: list[LayerAdapter], stats: list[LayerStats], with_inputs: bool, what: str,
    expect: list[bool] | None = None,
) -> list[LayerMeans]:
    """Sums -> means, all-reduced (one collective for every layer; a layer that saw no rows sends zeros of its
    ``A``'s shape). ``what`` names the pass for errors."""
    _check_seen(adapters, stats, what, expect)
    # every layer's row counts in one tensor: one host-to-device copy, one all-reduce entry
    home = adapters[0].weight.device
    counts = torch.tensor([[float(st.a_rows), float(st.h_rows), float(st.G_rows)] for st in stats],
                          dtype=torch.float64, device=home)
    tensors: list[Tensor] = [counts]
    for ad, st in zip(adapters, stats):
        dev = ad.weight.device
        if st.h_sum is None or st.g_sum is None:  # a layer that did not take part in this pass
            st.h_sum = torch.zeros(ad.d_out, dtype=torch.float64, device=dev)
            st.g_sum = torch.zeros(ad.d_out, dtype=torch.float64, device=dev)
        tensors += [st.h_sum, st.g_sum]
        if with_inputs:
            if st.A_sum is None:
                st.A_sum = torch.zeros(st.input_shape, device=dev)
            if st.a_sum is None:
                st.a_sum = torch.zeros(ad.d_in, device=dev)
            tensors += [st.A_sum, st.a_sum]
    grams = [i for i, st in enumerate(stats) if with_inputs and st.output_shape is not None]
    for i in grams:  # after every layer's others, so that the offsets above stay fixed
        st = stats[i]
        if st.G_sum is None:
            st.G_sum = torch.zeros(st.output_shape, device=adapters[i].weight.device)  # type: ignore[arg-type]
        tensors.append(st.G_sum)
    all_reduce_sum_(tensors)
    ws = float(world_size())
    divisors = counts.clamp(min=1)
    # per layer: row counts and divisors as 0-dim views (one unbind each, not two indexing ops per layer)
    a_rows, h_rows_all = counts[:, 0].unbind(), counts[:, 1].unbind()
    a_div, h_div = divisors.float()[:, 0].unbind(), divisors[:, 1].unbind()
    # the ranks' g are ws times the global loss's (module docstring): G is divided by ws² with its row count
    g_div = (divisors[:, 2].float() * (ws * ws)).unbind() if grams else ()
    G_means = {i: tensors[len(tensors) - len(grams) + k] / g_div[i].to(adapters[i].weight.device)
               for k, i in enumerate(grams)}
    out = []
    per = 4 if with_inputs else 2
    h_means = divide_each(tensors[1::per][: len(adapters)], h_div)
    a_means = divide_each(tensors[4::per][: len(adapters)], a_div) if with_inputs else []
    for i, ad in enumerate(adapters):
        g_sum = tensors[2 + per * i]
        to = ad.weight.device
        h, g, h_rows = h_means[i], (g_sum if ws == 1.0 else g_sum / ws), h_rows_all[i].to(to)
        if not with_inputs:
            out.append(LayerMeans(h, g, h_rows))
            continue
        out.append(LayerMeans(h, g, h_rows, tensors[3 + per * i], a_means[i], a_rows[i].to(to), G_means.get(i)))
    return out


def divide_each(sums: list[Tensor], divisors: tuple[Tensor, ...]) -> list[Tensor]:
    """``sums[i] / divisors[i]`` (0-dim) for every ``i``: vectors of one device and dtype are divided together, as
    one vector (the same division of every entry, four tensor operations in all instead of one per layer; the
    lengths reach the device once per model, not at every call, since such a copy makes the host wait for it)."""
    if len({(x.device, x.dtype) for x in sums}) != 1 or any(x.dim() != 1 for x in sums):
        return [x / d.to(x.device) for x, d in zip(sums, divisors)]
    sizes = tuple(x.numel() for x in sums)
    dev = sums[0].device
    per_entry = torch.stack(divisors).to(dev).repeat_interleave(_lengths(sizes, dev), output_size=sum(sizes))
    return list(torch.cat(sums).div_(per_entry).split(sizes))


@functools.lru_cache(maxsize=64)
def _lengths(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """``sizes`` as an int64 tensor on ``device``, kept for the next call."""
    return torch.tensor(sizes, dtype=torch.int64, device=device)
