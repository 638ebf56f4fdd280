"""mL-BFGS's blocks: which parameters share one L-BFGS history (one block of the block-diagonal Hessian).

:func:`build_blocks` partitions a model's parameters by layer (the default), by parameter, as one block, in chunks
of a size, or by a user's mapping; :class:`~hf_qn.optim.mlbfgs.MLBFGS` keeps one history per block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["Block", "build_blocks"]


@dataclass(frozen=True)
class Block:
    """A set of whole parameters whose Hessian block is approximated by one L-BFGS history."""

    name: str
    params: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def build_blocks(
    named_params: Sequence[tuple[str, nn.Parameter]],
    blocks: str | int | Mapping[str, Sequence[str]] = "layer",
    min_block_size: int = 0,
) -> list[Block]:
    """Partition parameters into blocks.

    Args:
        named_params: ``(name, parameter)`` in a fixed order (deduplicated).
        blocks: ``"layer"`` (parameters of one module together, even when they are not consecutive:
            names sharing the prefix before the last dot, ordered by each module's first parameter),
            ``"param"`` (one block per parameter), ``"model"`` (one block), an integer ``n`` (consecutive
            parameters merged until a block holds at least ``n`` elements; a parameter is never split), or a
            mapping ``{block name: [parameter names]}`` (parameters not named go to per-layer blocks).
        min_block_size: consecutive blocks smaller than this are merged.
    """
    if isinstance(blocks, Mapping):
        return _named_blocks(named_params, blocks, min_block_size)
    groups = _group_params(named_params, blocks)
    if min_block_size > 0:
        groups = _merge_small(groups, min_block_size)
    names = [g[0] for g in groups]
    if len(set(names)) != len(names):  # e.g. a named block called like a layer
        groups = [(f"{n}#{i}", ps) for i, (n, ps) in enumerate(groups)]
    return [Block(n, tuple(ps)) for n, ps in groups]


def _named_blocks(
    named_params: Sequence[tuple[str, nn.Parameter]], blocks: Mapping[str, Sequence[str]], min_block_size: int
) -> list[Block]:
    """Blocks named by the user, then the remaining parameters per layer."""
    by_name = dict(named_params)
    out: list[Block] = []
    used: set[str] = set()
    for bname, pnames in blocks.items():
        missing = [n for n in pnames if n not in by_name]
        if missing:
            raise ValueError(f"Invalid blocks[{bname!r}]: unknown parameter names {missing}")
        dup = [n for n in pnames if n in used]
        if dup:
            raise ValueError(f"Invalid blocks[{bname!r}]: parameters {dup} are already in another block")
        used.update(pnames)
        out.append(Block(bname, tuple(by_name[n] for n in pnames)))
    rest = [(n, p) for n, p in named_params if n not in used]
    return out + build_blocks(rest, "layer", min_block_size)


def _group_params(
    named_params: Sequence[tuple[str, nn.Parameter]], blocks: str | int
) -> list[tuple[str, list[nn.Parameter]]]:
    """``(name, parameters)`` per block for the modes ``"layer"``, ``"param"``, ``"model"`` and a chunk size."""
    if blocks == "layer":
        # By module, wherever its parameters appear: the Trainer's weight-decay split lists every weight
        # before every bias, and a layer's weight and bias still make one block.
        by_prefix: dict[str, list[nn.Parameter]] = {}
        for n, p in named_params:
            by_prefix.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(p)
        return list(by_prefix.items())
    if blocks == "param":
        return [(n, [p]) for n, p in named_params]
    if blocks == "model":
        return [("model", [p for _, p in named_params])] if named_params else []
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        if blocks < 1:
            raise ValueError(f"Invalid blocks: {blocks} (a chunk size must be >= 1)")
        groups: list[tuple[str, list[nn.Parameter]]] = []
        cur: list[nn.Parameter] = []
        first = ""
        for n, p in named_params:
            if not cur:
                first = n
            cur.append(p)
            if sum(q.numel() for q in cur) >= blocks:
                groups.append((f"chunk:{first}", cur))
                cur = []
        if cur:
            groups.append((f"chunk:{first}", cur))
        return groups
    raise ValueError(
        f"Invalid blocks: {blocks!r} (must be 'layer', 'param', 'model', a chunk size, or a mapping of names)"
    )


def _merge_small(
    groups: list[tuple[str, list[nn.Parameter]]], min_block_size: int
) -> list[tuple[str, list[nn.Parameter]]]:
    """Consecutive blocks smaller than ``min_block_size`` merged."""
    merged: list[tuple[str, list[nn.Parameter]]] = []
    for name, ps in groups:
        small = sum(p.numel() for p in ps) < min_block_size
        if merged and small and sum(p.numel() for p in merged[-1][1]) < min_block_size:
            merged[-1] = (merged[-1][0] + "+" + name, merged[-1][1] + ps)
        else:
            merged.append((name, list(ps)))
    return merged
