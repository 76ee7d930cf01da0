"""Sharpness-aware steps at near-ERM cost: reuse the last sharpness correction between full steps (LookSAM).

LookSAM (Liu et al., CVPR 2022) splits a full step's sharpness-aware gradient G_s into its
component along the plain gradient g and the rest, ``g_v = G_s - (G_s·g / ||g||²) g``,
which carries the sharpness information and changes slowly. Between full steps it adds
that direction to the plain gradient, rescaled to its norm:
``G = g + alpha * (||g|| / ||g_v||) * g_v``. ``g_v`` is invariant to the scale of g and
proportional to that of G_s, and the reused term depends on ``g_v``'s direction only, so
G_s and g may each carry their own positive scale (a loss scaler's, a sum over ranks or
micro-batches instead of a mean): nothing needs unscaling here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .decisions import on_device
from .norms import total_norm
from .sharding import NormReduce, local

MIN_SHARE = 1e-3
"""A full step whose orthogonal part is below this share of its norm records nothing: it is rounding noise."""


def _dot(a: Sequence[Tensor], b: Sequence[Tensor], reduce: Optional[NormReduce]) -> Tensor:
    """Per-tensor dot products in the tensors' dtype, summed in float64 (no float64 copies of the gradients)."""
    value = torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)).double() for x, y in zip(a, b)]).sum()
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
    def record(self, full: Sequence[Tensor], plain: Sequence[Tensor]) -> Optional[float | Tensor]:
        """Store ``g_v`` from a full step's G (``full``) and the plain gradient at w (``plain``).

        Returns the cosine between the stored direction it replaces and the fresh one
        (how stale the reused direction had become), or ``None`` when there was none. A
        non-finite G (a step a loss scaler will skip) or one with no orthogonal part to
        speak of (a skipped or vanishing perturbation) keeps the stored direction.
        """
        full, plain = [local(g) for g in full], [local(g) for g in plain]
        full_norm, plain_norm = total_norm(full, self.reduce), total_norm(plain, self.reduce)
        if on_device(full_norm.device):
            return self._record_on_device(full, plain, full_norm, plain_norm)
        if not (torch.isfinite(full_norm) and torch.isfinite(plain_norm)) or plain_norm == 0:
            return None
        along = (_dot(full, plain, self.reduce) / plain_norm.double().pow(2)).item()
        fresh = list(torch._foreach_add(full, plain, alpha=-along))
        fresh_norm = total_norm(fresh, self.reduce)
        if not fresh_norm > MIN_SHARE * full_norm:
            return None
        staleness = None
        if self.direction is not None:
            norms = total_norm(self.direction, self.reduce) * fresh_norm
            staleness = (_dot(self.direction, fresh, self.reduce) / norms.double()).item()
        self.direction = fresh
        return staleness

    def _record_on_device(
        self, full: list[Tensor], plain: list[Tensor], full_norm: Tensor, plain_norm: Tensor
    ) -> Optional[Tensor]:
        """:meth:`record` with its decision taken on the device; the cosine is NaN on a full step that kept the
        stored direction. A direction never recorded is kept as zeros, which :meth:`apply` adds nothing of."""
        along = _dot(full, plain, self.reduce) / plain_norm.double().pow(2)
        fresh = list(torch._foreach_mul(plain, (-along).to(plain[0].dtype)))
        torch._foreach_add_(fresh, full)
        fresh_norm = total_norm(fresh, self.reduce)
        ok = torch.isfinite(full_norm) & torch.isfinite(plain_norm) & (plain_norm > 0)
        ok = ok & (fresh_norm > MIN_SHARE * full_norm)
        staleness = None
        if self.direction is None:
            for f in fresh:
                f.masked_fill_(~ok, 0.0)
        else:
            norms = total_norm(self.direction, self.reduce) * fresh_norm
            cosine = _dot(self.direction, fresh, self.reduce) / norms.double()
            staleness = torch.where(ok, cosine, torch.full_like(cosine, math.nan))
            for f, d in zip(fresh, self.direction):
                f.copy_(torch.where(ok, f, d))
        self.direction = fresh
        return staleness

    @torch.no_grad()
    def apply(self, grads: Sequence[Optional[Tensor]], strength: float = 1.0) -> None:
        """``g <- g + strength * alpha * (||g|| / ||g_v||) * g_v`` in place; nothing before the first full step.

        ``grads`` lines up with the stored direction; a ``None`` entry (a parameter without
        a gradient this step) is left alone. ``strength`` follows a ρ schedule (ρ_t / ρ).
        """
        if self.direction is None or strength == 0:
            return
        pairs = [(local(g), d) for g, d in zip(grads, self.direction) if g is not None]
        present, directions = [g for g, _ in pairs], [d for _, d in pairs]
        # both norms over the same parameters: those with a gradient this step
        scale = total_norm(present, self.reduce) / total_norm(directions, self.reduce)
        if on_device(scale.device):  # 0 where the stored direction is zeros (none recorded yet) or g is not finite
            factor = torch.where(torch.isfinite(scale), scale * (strength * self.alpha), 0.0).to(present[0].dtype)
            torch._foreach_addcmul_(present, directions, [factor] * len(present))
        elif torch.isfinite(scale):
            torch._foreach_add_(present, directions, alpha=strength * self.alpha * scale.item())
