"""The optimizers: K-BFGS / K-BFGS(L) and mL-BFGS (torch only)."""

from __future__ import annotations

from .factories import KBFGSFactory, MLBFGSFactory
from .kbfgs import KBFGS, KBFGSL
from .mlbfgs import MLBFGS, Block, build_blocks

__all__ = ["KBFGS", "KBFGSL", "MLBFGS", "Block", "KBFGSFactory", "MLBFGSFactory", "build_blocks"]
