"""Sharpness-aware steps at near-ERM cost: reuse the last sharpness correction between full steps (LookSAM).

LookSAM (Liu et al., CVPR 2022) splits a full step's sharpness-aware gradient G_s into its
component along the plain gradient g and the rest, ``g_v = G_s - (G_s·g / ||g||²) g``,
which carries the sharpness information and changes slowly. Between full steps it adds
that direction to the plain gradient, rescaled to its norm:
``G = g + alpha * (||g|| / ||g_v||) * g_v``. Both formulas are invariant to a common scale
of G_s and g, so gradients under a loss scaler need no unscaling here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .perturbation import total_norm
from .sharding import NormReduce, local


def _dot(a: Sequence[Tensor], b: Sequence[Tensor], reduce: Optional[NormReduce]) -> Tensor:
    value = torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()
    return reduce(value) if reduce is not None else value


class Reuse:
    """The stored orthogonal direction ``g_v`` of LookSAM, one local tensor (shard) per parameter.

    Args:
        alpha: weight of the reused direction between full steps.
        reduce: sums a local scalar over the shards of sharded parameters (``None``: whole tensors).
    """

    def __init__(self, alpha: float, reduce: Optional[NormReduce] = None) -> None:
        self.alpha = alpha
        self.reduce = reduce
        self.direction: Optional[list[Tensor]] = None

    @torch.no_grad()
    def record(self, full: Sequence[Tensor], plain: Sequence[Tensor]) -> Optional[float]:
        """Store ``g_v`` from a full step's G (``full``) and the plain gradient at w (``plain``).

        Returns the cosine between the stored direction it replaces and the fresh one
        (how stale the reused direction had become), or ``None`` on the first full step.
        """
        full, plain = [local(g) for g in full], [local(g) for g in plain]
        squares = total_norm(plain, self.reduce).double().pow(2)
        along = _dot(full, plain, self.reduce) / squares.clamp_min(torch.finfo(torch.float64).tiny)
        fresh = [f - (along * p.double()).to(f.dtype) for f, p in zip(full, plain)]
        staleness = None
        if self.direction is not None:
            norms = total_norm(self.direction, self.reduce) * total_norm(fresh, self.reduce)
            staleness = (_dot(self.direction, fresh, self.reduce) / norms.double().clamp_min(1e-300)).item()
        self.direction = fresh
        return staleness

    @torch.no_grad()
    def apply(self, grads: Sequence[Tensor]) -> None:
        """``g <- g + alpha * (||g|| / ||g_v||) * g_v`` in place; nothing before the first full step."""
        if self.direction is None:
            return
        grads = [local(g) for g in grads]
        scale = total_norm(grads, self.reduce) / total_norm(self.direction, self.reduce).clamp_min(1e-30)
        if torch.isfinite(scale):
            torch._foreach_add_(grads, torch._foreach_mul(self.direction, self.alpha * scale.item()))
