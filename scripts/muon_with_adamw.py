"""Muon as the field runs it, beside AdamW, as one torch optimizer: the peer of the LM benchmark and the recipes.

``torch.optim.Muon`` takes 2-D matrices only. Muon's authors give it the hidden matrices of a transformer's
blocks and AdamW everything else (embeddings, the LM head, a classifier head, norms, biases).
:class:`MuonWithAdamW` holds the two and is itself a ``torch.optim.Optimizer`` whose ``param_groups`` are
theirs, so a Trainer's scheduler, gradient clipping and checkpoints see one optimizer. Muon runs with
``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling: each matrix's update has AdamW's RMS), so one learning
rate and one schedule serve both parts, as a Trainer has them; the LM benchmark gives the AdamW part AdamW's own
tuned lr (``adamw_lr``).

torch runs Muon's Newton-Schulz iteration in bfloat16, several times slower than float32 on a CPU without
native bf16 (docs/benchmarks.md): ``float32_newton_schulz=True`` runs it in float32; :class:`MuonFactory`
chooses by the machine, so that the comparison is fair to the peer.

    Trainer(model=model, args=args, optimizer_cls_and_kwargs=(MuonFactory, {"lr": 1e-3, "weight_decay": 0.01}))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from hf_qn.linalg import newton_schulz_polar
from hf_qn.optim.config import fast_bf16

__all__ = ["MuonFactory", "MuonWithAdamW", "hidden_matrices", "muon_float32", "newton_schulz_float32"]

#: a layer inside a numbered block of a named container: GPT-2's ``h.3.attn.``, Llama's ``layers.3.mlp.``, BERT's
#: and ViT's ``layer.3.attention.``; not a numbered layer itself (a classifier ``Sequential``'s ``classifier.1.``,
#: a top-level ``nn.Sequential``'s ``3.``)
_BLOCK = re.compile(r"\.\d+\.[^.]+\.")


def hidden_matrices(model: nn.Module) -> list[str]:
    """The names of the trainable 2-D weights inside the model's numbered blocks (GPT-2's ``transformer.h.N``,
    Llama's ``model.layers.N``, BERT's and ViT's ``encoder.layer.N``): Muon's share. Embeddings (also one inside
    a block), the LM head, a classifier or pooler, norms and biases are AdamW's."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return [n for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and _BLOCK.search(n) and id(p) not in embeddings]


def newton_schulz_float32(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> Tensor:
    """Muon's quintic Newton-Schulz orthogonalization in float32 (torch's runs it in bfloat16, which is slow on a
    CPU without native bf16): hf_qn's :func:`~hf_qn.linalg.newton_schulz_polar`, with torch's signature."""
    return newton_schulz_polar(grad.to(torch.float32), ns_steps, eps, ns_coefficients)


@contextmanager
def muon_float32() -> Iterator[None]:
    """torch.optim.Muon with :func:`newton_schulz_float32` while the block runs (torch has no option for it)."""
    import torch.optim._muon as muon_module

    original = muon_module._zeropower_via_newtonschulz
    muon_module._zeropower_via_newtonschulz = newton_schulz_float32
    try:
        yield
    finally:
        muon_module._zeropower_via_newtonschulz = original


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on ``muon_params`` (2-D matrices) and ``torch.optim.AdamW`` (fused) on
    ``adamw_params`` (tensors or param groups with their own ``weight_decay``), stepped together.

    ``param_groups`` is Muon's groups then AdamW's (the same dicts: a scheduler's lr reaches both), ``state`` is
    one dict shared by the two, and ``state_dict`` / ``load_state_dict`` are torch's, so a checkpoint restores
    both parts exactly. ``adamw_lr``: the AdamW part's lr (default ``lr``)."""

    def __init__(
        self,
        muon_params: Iterable[Tensor],
        adamw_params: Iterable[Any],
        lr: float = 1e-3,
        *,
        adamw_lr: float | None = None,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        float32_newton_schulz: bool = False,
    ) -> None:
        self.muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(adamw_params, lr=lr if adamw_lr is None else adamw_lr, betas=betas, eps=eps,
                                       weight_decay=weight_decay, fused=True)
        self.float32_newton_schulz = float32_newton_schulz
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {"lr": lr})
        self._share()

    def _share(self) -> None:
        """Point the two optimizers at this one's groups and state (after construction and after a load, which
        replaces both)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with muon_float32() if self.float32_newton_schulz else nullcontext():
            self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()


class MuonFactory:
    """For ``Trainer(optimizer_cls_and_kwargs=(MuonFactory, kwargs))`` (transformers calls
    ``MuonFactory()(model, **kwargs)``): :class:`MuonWithAdamW` with Muon on :func:`hidden_matrices` and AdamW on
    the other trainable parameters, weight decay on the matrices only (the Trainer's rule: none on biases and
    norms). ``float32_newton_schulz=None`` picks float32 where the parameters' device has no fast bf16;
    ``adamw_lr``: the AdamW part's lr (default ``lr``)."""

    def __call__(self, model: nn.Module, *, lr: float, adamw_lr: float | None = None, weight_decay: float = 0.0,
                 momentum: float = 0.95, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 float32_newton_schulz: bool | None = None) -> MuonWithAdamW:
        names = set(hidden_matrices(model))
        if not names:
            raise ValueError(f"Invalid optimizer 'muon' for {type(model).__name__}: it has no trainable 2-D weight "
                             "inside numbered blocks for Muon (a convolutional network, say); compare with adamw")
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        rest = [p for n, p in trainable if n not in names]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        if float32_newton_schulz is None:
            float32_newton_schulz = not fast_bf16(trainable[0][1].device)
        return MuonWithAdamW([p for n, p in trainable if n in names], [g for g in groups if g["params"]], lr,
                             adamw_lr=adamw_lr, weight_decay=weight_decay, momentum=momentum, betas=betas, eps=eps,
                             float32_newton_schulz=float32_newton_schulz)
