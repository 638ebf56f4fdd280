"""Forward/backward capture of the statistics Kronecker-factored curvature needs.

For every adapted layer, between two commits by the optimizer, a :class:`Capture` accumulates sums
over rows (samples, tokens or spatial positions) of

* ``A_sum = Σ ā āᵀ`` and ``a_sum = Σ ā`` over homogeneous input rows (for an Embedding, the token
  counts, i.e. the diagonal of ``Σ e eᵀ``);
* ``h_sum = Σ h`` over pre-activation rows and ``g_sum = Σ ∂L/∂h`` over the same rows, divided by the loss scale
  when one is in use, for a layer that forms pairs (asked for per layer, as ``output_means``);
* ``G_sum = Σ (∂L/∂h)(∂L/∂h)ᵀ`` over the same rows, for a layer whose output factor is K-FAC's (asked for per
  layer, as ``output_grams``), divided by the loss scale squared.

``g_sum`` is the gradient of the (batch-mean) loss with respect to a uniform shift of the layer's
pre-activations; ``h_sum / rows`` is their mean. Those are the two ends of a K-BFGS output-side pair
(Goldfarb, Ren & Bahamou 2020, Algorithm 1, line 9; the official code's ``mean(N·∂f/∂h)``).

What the hooks survive:

* in-place activations after the layer: the gradient is taken by a *tensor* hook on the output,
  registered in a forward hook, never by ``register_full_backward_hook`` (pytorch#61519);
* activation checkpointing: a forward re-run inside backward is recognised by the autograd graph
  task id and not counted twice;
* gradient accumulation: sums run over all micro-batches until the optimizer commits them; the first
  forward of a new accumulation window (the layer's ``.grad`` is None again) drops what a step that
  never happened (a GradScaler skip) left behind;
* ``model.eval()``, ``torch.no_grad()``, and ``capture.enabled = False``: nothing is captured;
* fp16 loss scaling: ``grad_scale`` (e.g. ``scaler.get_scale``) divides every captured gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .adapters.base import LayerAdapter, evenly_strided
from .linalg.blocks import BlockSplit
from .linalg.cast import cast, matmul_float32

__all__ = ["Capture", "LayerStats"]

PRIMARY = "primary"
SECOND = "second"


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed forward being recomputed)."""
    fn = getattr(torch._C, "_current_graph_task_id", None)
    return fn is not None and fn() != -1


def input_factor_shape(adapter: LayerAdapter, split: BlockSplit | None) -> tuple[int, ...]:
    """The shape of a layer's input factor ``A`` (and of ``A_sum``): ``(d_in,)`` diagonal, ``(d_in, d_in)``
    dense, ``(blocks, size, size)`` cut by ``split``."""
    if adapter.input_diagonal:
        return (adapter.d_in,)
    return split.factor_shape if split is not None else (adapter.d_in, adapter.d_in)


class LayerStats:
    """Row sums of one layer since the last reset, on the layer's device: input side in float32,
    output side (``h_sum``, ``g_sum``) in float64, the output-gradient Gram ``G_sum`` in float32. ``input_shape`` is
    the shape ``A_sum`` has (and its zeros, when the layer saw no rows): ``(d_in, d_in)``, ``(blocks, size, size)``
    for a block split, ``(d_in,)`` when diagonal; ``output_shape`` likewise for ``G_sum``, None when it is not
    captured."""

    def __init__(self, input_shape: tuple[int, ...], output_shape: tuple[int, ...] | None = None) -> None:
        self.input_shape = input_shape
        self.output_shape = output_shape
        self.reset()

    def reset(self) -> None:
        self.A_sum: Tensor | None = None
        self.a_sum: Tensor | None = None
        self.a_rows = 0
        self.h_sum: Tensor | None = None
        self.h_rows = 0
        self.samples = 0
        self.g_sum: Tensor | None = None
        self.G_sum: Tensor | None = None
        self.G_rows = 0
        self.forward_calls = 0
        self.grad_calls = 0

    @property
    def pending(self) -> bool:
        return self.forward_calls > 0

    @staticmethod
    def _add(acc: Tensor | None, x: Tensor) -> Tensor:
        return x if acc is None else acc.add_(x)


class Capture:
    """Hooks on adapted layers that accumulate :class:`LayerStats`.

    Args:
        adapters: the adapted layers.
        input_stats: capture the input side (``A_sum``, ``a_sum``). (default: True)
        grad_scale: callable returning the current loss scale (fp16 with a GradScaler), or None.
        gram_dtype: dtype of the product ``āᵀā`` behind ``A_sum`` (the sums stay float32); bfloat16 runs
            that product, the capture's main cost, about 3x faster on a CPU with AVX512-BF16.
            (default: float32)
        max_input_rows: the input side (``A_sum``, ``a_sum``) of a forward call uses at most this many of its
            rows, evenly strided (every ``ceil(R / max_input_rows)``-th); None uses all. (default: None)
        input_splits: per adapter, a :class:`~hf_qn.linalg.blocks.BlockSplit` whose diagonal blocks of
            ``Σ ā āᵀ`` alone are formed (``A_sum`` is then ``(blocks, size, size)``), or None for the whole
            matrix. (default: None for every adapter)
        output_grams: per adapter, the :class:`~hf_qn.linalg.blocks.BlockSplit` of its output-gradient Gram
            ``G_sum`` (the diagonal blocks of ``Σ g gᵀ``, or the whole matrix for a split of one block), or None
            where it is not wanted. Taken on primary passes only, in ``gram_dtype`` (float32 for float16), over the
            rows ``max_input_rows`` leaves (it caps both Grams).
            (default: None for every adapter)
        output_means: per adapter, whether the output means' sums ``h_sum`` and ``g_sum`` are taken; False for a
            layer that forms no pairs (K-FAC's output factor), whose sums then stay zero, uncomputed, as a
            one-sided layer's (the row counts are kept). (default: True for every adapter)

    ``enabled`` switches all capture on or off (the optimizer turns it on only for steps that
    update curvature, so the others pay nothing). :meth:`second_pass` switches the hooks to a
    separate set of sums for a re-evaluation of the same batch at new parameters; the input side is
    not captured there.
    """

    def __init__(
        self,
        adapters: Sequence[LayerAdapter],
        input_stats: bool = True,
        grad_scale: Callable[[], float | Tensor] | None = None,
        gram_dtype: torch.dtype = torch.float32,
        max_input_rows: int | None = None,
        input_splits: Sequence[BlockSplit | None] | None = None,
        output_grams: Sequence[BlockSplit | None] | None = None,
        output_means: Sequence[bool] | None = None,
    ) -> None:
        self.adapters = list(adapters)
        self.input_splits: list[BlockSplit | None] = (
            list(input_splits) if input_splits is not None else [None] * len(self.adapters))
        self.output_grams: list[BlockSplit | None] = (
            list(output_grams) if output_grams is not None else [None] * len(self.adapters))
        self.output_means: list[bool] = list(output_means) if output_means is not None else [True] * len(self.adapters)
        self.gram_dtype = gram_dtype
        self.max_input_rows = max_input_rows
        self.input_stats = input_stats
        self.grad_scale = grad_scale
        self.enabled = True
        self.mode = PRIMARY
        self.stats: dict[str, list[LayerStats]] = {
            mode: [LayerStats(input_factor_shape(ad, sp), None if og is None else og.factor_shape)
                   for ad, sp, og in zip(self.adapters, self.input_splits, self.output_grams)]
            for mode in (PRIMARY, SECOND)
        }
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> Capture:
        if not self._handles:
            for i, adapter in enumerate(self.adapters):
                self._handles.append(adapter.module.register_forward_hook(_ForwardHook(self, i)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def add(
        self, adapter: LayerAdapter, input_split: BlockSplit | None = None, output_gram: BlockSplit | None = None,
        output_means: bool = True,
    ) -> None:
        """Capture one more layer (hooked at once if the others are)."""
        self.adapters.append(adapter)
        self.input_splits.append(input_split)
        self.output_grams.append(output_gram)
        self.output_means.append(output_means)
        for mode in (PRIMARY, SECOND):
            self.stats[mode].append(LayerStats(input_factor_shape(adapter, input_split),
                                               None if output_gram is None else output_gram.factor_shape))
        if self._handles:
            self._handles.append(adapter.module.register_forward_hook(_ForwardHook(self, len(self.adapters) - 1)))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def reset(self, mode: str = PRIMARY) -> None:
        for st in self.stats[mode]:
            st.reset()

    @contextlib.contextmanager
    def second_pass(self) -> Iterator[list[LayerStats]]:
        """Route captures to the second-pass sums (reset on entry) for the duration of the block."""
        prev_mode, prev_enabled = self.mode, self.enabled
        self.reset(SECOND)
        self.mode, self.enabled = SECOND, True
        try:
            yield self.stats[SECOND]
        finally:
            self.mode, self.enabled = prev_mode, prev_enabled

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy without the hook handles; the copy re-attaches its own hooks (see
        :class:`_ForwardHook`: a copied module's old hook becomes inert, so it never feeds this capture)."""
        state = dict(self.__dict__)
        state["_handles"] = []
        state["_was_attached"] = self.attached
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        was_attached = state.pop("_was_attached", False)
        self.__dict__.update(state)
        if was_attached:
            self.attach()

    # ------------------------------------------------------------------ hooks
    def _forward(self, index: int, module: nn.Module, inputs: Any, output: Any) -> None:
        """The forward hook's body (see :class:`_ForwardHook`)."""
        adapter = self.adapters[index]
        if not (self.enabled and module.training and torch.is_grad_enabled()) or _in_backward():
            return
        if not isinstance(output, Tensor) or not any(p.requires_grad for p in adapter.parameters()):
            return  # a frozen layer's curvature is paused: nothing to capture
        mode = self.mode
        st = self.stats[mode][index]
        if mode == PRIMARY and st.pending and not adapter.gradient_pending():
            st.reset()  # a new accumulation window: the previous one was never committed
        means = self.output_means[index] and not adapter.one_sided
        self._capture_forward(adapter, st, inputs, output, with_inputs=self.input_stats and mode == PRIMARY,
                              split=self.input_splits[index], means=means)
        if output.requires_grad and not adapter.one_sided:
            gram = self.output_grams[index] if mode == PRIMARY else None
            output.register_hook(self._make_grad_hook(adapter, st, gram, means))

    @torch.no_grad()
    def _capture_forward(
        self, adapter: LayerAdapter, st: LayerStats, inputs: tuple[Any, ...], output: Tensor, with_inputs: bool,
        split: BlockSplit | None = None, means: bool = True,
    ) -> None:
        st.forward_calls += 1
        if with_inputs:
            rows = adapter.input_rows(inputs, self.max_input_rows)
            if adapter.input_diagonal:
                mask = adapter.input_mask(rows)
                ids = rows if mask is None else rows[mask]
                counts = torch.bincount(ids, minlength=adapter.d_in).to(torch.float32)
                st.A_sum = LayerStats._add(st.A_sum, counts)
                st.a_rows += int(ids.numel())
            else:
                r = rows.detach()
                g = r.to(self.gram_dtype)
                gram = split.gram(g) if split is not None else matmul_float32(g.T, g)
                st.A_sum = LayerStats._add(st.A_sum, cast(gram, torch.float32))
                st.a_sum = LayerStats._add(st.a_sum, r.sum(0, dtype=torch.float32))
                st.a_rows += int(r.shape[0])
        if not means:  # no pairs: the output means stay zero, uncomputed
            rows_out = output.numel() // adapter.d_out
            if st.h_sum is None:
                st.h_sum = output.new_zeros(adapter.d_out, dtype=torch.float64)
            if adapter.one_sided and st.g_sum is None:  # (no backward hook; otherwise the hook sets it)
                st.g_sum = output.new_zeros(adapter.d_out, dtype=torch.float64)
            st.h_rows += rows_out
            st.samples += rows_out // max(adapter.output_group_size(output), 1)
            return
        # Output-side sums to float64 accuracy: K-BFGS pairs are differences of these means (cancellation).
        h = adapter.output_rows(output.detach())
        st.h_sum = LayerStats._add(st.h_sum, row_sums(h))
        st.h_rows += int(h.shape[0])
        st.samples += int(h.shape[0]) // max(adapter.output_group_size(output), 1)

    def _make_grad_hook(
        self, adapter: LayerAdapter, st: LayerStats, gram: BlockSplit | None = None, means: bool = True
    ) -> Callable[[Tensor], None]:
        # the loss scale is read only by a hook with a sum to divide (not by a K-FAC layer's on a second pass)
        divides = means or gram is not None

        def grad_hook(grad: Tensor) -> None:
            with torch.no_grad():
                rows = adapter.output_rows(grad)
                scale = 1.0 if self.grad_scale is None or not divides else float(self.grad_scale())
                if means:
                    g = row_sums(rows)
                    st.g_sum = LayerStats._add(st.g_sum, g if scale == 1.0 else g / scale)
                elif st.g_sum is None:  # set all the same: it tells that the backward reached this layer
                    st.g_sum = grad.new_zeros(adapter.d_out, dtype=torch.float64)
                if gram is not None:  # K-FAC's output factor: Σ g gᵀ (its diagonal blocks when split)
                    r = evenly_strided(rows.detach(), self.max_input_rows)  # the rows of the input side's Gram
                    # float16's range holds neither a loss-scaled gradient's square nor an unscaled one's
                    r = r.to(torch.float32 if self.gram_dtype == torch.float16 else self.gram_dtype)
                    G = cast(gram.gram(r), torch.float32)
                    st.G_sum = LayerStats._add(st.G_sum, G if scale == 1.0 else G / scale**2)
                    st.G_rows += int(r.shape[0])
                st.grad_calls += 1

        return grad_hook


#: rows summed in the input dtype before the partial sums are added in float64 (see :func:`row_sums`).
ROW_BLOCK = 256


def row_sums(x: Tensor) -> Tensor:
    """``x.sum(0)`` in float64, computed as float64 sums of blocks of ``ROW_BLOCK`` rows summed in ``x``'s dtype.

    Summing float32 rows straight into float64 (``x.sum(0, dtype=torch.float64)``) converts every element and
    runs a slow path on a CPU: 95 ms for GPT-2's 2048 x 4096 logits, 11 ms for a 2048 x 512 layer, which made the
    output statistics most of K-BFGS's overhead on a small transformer. Blocks of 256 float32 rows (pairwise
    summed by torch) then float64 cost 0.8 ms for the latter, at a relative error of 8e-8 against the float64
    sum (measured on Gaussian rows), far below the pair differences' scale. Half-precision rows are summed in
    float32 blocks."""
    if x.dtype == torch.float64 or x.shape[0] <= ROW_BLOCK:
        return x.sum(0, dtype=torch.float64)
    full = x.shape[0] // ROW_BLOCK * ROW_BLOCK
    out = x[:full].reshape(-1, ROW_BLOCK, *x.shape[1:]).sum(1, dtype=torch.float32).sum(0, dtype=torch.float64)
    if full < x.shape[0]:
        out += x[full:].sum(0, dtype=torch.float64)
    return out


class _InertHook:
    """What a :class:`_ForwardHook` becomes in a copied or unpickled module: it does nothing."""

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        return None


class _ForwardHook:
    """The forward hook of one adapted layer.

    A callable object rather than a closure, so that a module carrying it can be deep-copied or
    pickled: the copy gets an :class:`_InertHook`, because a copied model must not feed the original
    optimizer's statistics. A copied optimizer re-attaches hooks of its own (``Capture.__setstate__``).
    """

    def __init__(self, capture: Capture, index: int) -> None:
        self.capture = capture
        self.index = index

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.capture._forward(self.index, module, inputs, output)

    def __reduce__(self) -> tuple[type[_InertHook], tuple[()]]:
        return (_InertHook, ())
