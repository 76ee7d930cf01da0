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

    It holds one copy of the parameters' size, and nothing else across steps: the loop drops the
    stored direction when a full step starts, so that the full step's second pass holds the plain
    gradient and the snapshot of w as SAM's does, and no older direction beside them.

    Args:
        alpha: weight of the reused direction between full steps.
        reduce: sums a local scalar over the shards of sharded parameters (``None``: whole tensors).
    """

    def __init__(
        self,
        alpha: float,
        reduce: Optional[NormReduce] = None,
        direction: Optional[list[Tensor]] = None,
        norm: Optional[Tensor] = None,
    ) -> None:
        self.alpha = alpha
        self.reduce = reduce
        self.direction = direction
        self.norm = norm
        """``||g_v||``, kept from :meth:`record` (``None``: computed at the next :meth:`apply`)."""

    @torch.no_grad()
    def record(self, full: Sequence[Tensor], plain: Sequence[Tensor]) -> None:
        """Store ``g_v`` from a full step's G (``full``) and the plain gradient at w (``plain``), written into
        ``plain``'s buffers.

        A non-finite G (a step a loss scaler will skip) or one with no orthogonal part to speak
        of (a skipped or vanishing perturbation) stores nothing: the plain steps until the next
        full step are plain.
        """
        full, plain = [local(g) for g in full], [local(g) for g in plain]
        full_norm, plain_norm = total_norm(full, self.reduce), total_norm(plain, self.reduce)
        if on_device(full_norm.device):
            self._record_on_device(full, plain, full_norm, plain_norm)
            return
        self.direction = self.norm = None
        if not (torch.isfinite(full_norm) and torch.isfinite(plain_norm)) or plain_norm == 0:
            return
        along = (_dot(full, plain, self.reduce) / plain_norm.double().pow(2)).item()
        for g, p in zip(full, plain):  # g_v written over the plain gradient, which nothing needs after this
            torch.add(g, p, alpha=-along, out=p)
        fresh_norm = total_norm(plain, self.reduce)
        if fresh_norm > MIN_SHARE * full_norm:
            self.direction, self.norm = plain, fresh_norm

    def _record_on_device(self, full: list[Tensor], plain: list[Tensor], full_norm: Tensor, plain_norm: Tensor) -> None:
        """:meth:`record` with its decision taken on the device: a full step that stores nothing stores zeros,
        which :meth:`apply` adds nothing of."""
        along = (-_dot(full, plain, self.reduce) / plain_norm.double().pow(2)).to(plain[0].dtype)
        for g, p in zip(full, plain):  # g_v = G - along * g over the plain gradient's buffers, one rounding
            torch.addcmul(g, p, along, out=p)
        fresh_norm = total_norm(plain, self.reduce)
        ok = torch.isfinite(full_norm) & torch.isfinite(plain_norm) & (plain_norm > 0)
        ok = ok & (fresh_norm > MIN_SHARE * full_norm)
        for f in plain:
            f.masked_fill_(~ok, 0.0)
        self.direction, self.norm = plain, torch.where(ok, fresh_norm, 0.0)

    @torch.no_grad()
    def apply(self, grads: Sequence[Optional[Tensor]], strength: float = 1.0) -> None:
        """``g <- g + strength * alpha * (||g|| / ||g_v||) * g_v`` in place; nothing before the first full step.

        ``grads`` lines up with the stored direction; a ``None`` entry (a parameter without
        a gradient this step) is left alone. ``strength`` follows a ρ schedule (ρ_t / ρ).
        """
        if self.direction is None or strength == 0:
            return
        pairs = [(local(g), d) for g, d in zip(grads, self.direction) if g is not None]
        if not pairs:
            return
        present, directions = [g for g, _ in pairs], [d for _, d in pairs]
        # both norms over the same parameters: those with a gradient this step
        if len(present) < len(self.direction):
            direction_norm = total_norm(directions, self.reduce)
        elif self.norm is not None:
            direction_norm = self.norm
        else:
            direction_norm = self.norm = total_norm(directions, self.reduce)
        scale = total_norm(present, self.reduce) / direction_norm
        if on_device(scale.device):  # 0 where the stored direction is zeros (none recorded) or g is not finite
            factor = torch.where(torch.isfinite(scale), scale * (strength * self.alpha), 0.0).to(present[0].dtype)
            torch._foreach_addcmul_(present, directions, [factor] * len(present))
        elif torch.isfinite(scale):
            torch._foreach_add_(present, directions, alpha=strength * self.alpha * scale.item())
