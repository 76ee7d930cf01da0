"""What the SAM family adds to SAM's step, at the window's end, on the synchronized gradients: GSAM's descent, WSAM's
decoupled sharpness term and Friendly-SAM's running mean of the gradient (its ascent direction subtracts it, in
:mod:`.steps`). The update of each is written out in ``docs/method-card.md``; each is checked against the reference
library (``pytorch_optimizer``) in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from .norms import total_norm


@torch.no_grad()
def gsam_descent_(grads: Sequence[Tensor], clean: Sequence[Tensor], alpha: float) -> Tensor:
    """GSAM (Zhuang et al., 2022): ``G = g_adv - alpha * g_perp`` in place, where ``g_perp = g - (g·g_adv /
    ||g_adv||²) g_adv`` is the part of the clean gradient ``g`` orthogonal to ``g_adv`` (``grads``). Where either norm
    is zero the projection is taken as 0 (``g_perp = g``). Returns ``||g_perp||``."""
    inner = torch.stack([(g * a).sum() for g, a in zip(clean, grads)]).sum()
    new, old = total_norm(list(grads)), total_norm(list(clean))
    defined = bool(new > 0) and bool(old > 0)
    cosine = inner / (new * old) if defined else torch.zeros_like(inner)
    verticals = [g - cosine * old * a / new if defined else g.clone() for g, a in zip(clean, grads)]
    for a, vertical in zip(grads, verticals):
        a.add_(vertical, alpha=-alpha)
    return total_norm(verticals)


def wsam_weight(gamma: float) -> float:
    """WSAM's weight of the sharpness term, ``gamma / (1 - gamma)`` (γ = 0.5 is SAM, γ = 0 is ERM)."""
    return gamma / (1.0 - gamma)


@torch.no_grad()
def wsam_split_(grads: Sequence[Tensor], clean: Sequence[Tensor]) -> list[Tensor]:
    """WSAM's decoupled form, before the base step: ``grads`` (``g_adv``) become the clean gradient ``g`` in place;
    returns the sharpness term ``g_adv - g`` that :func:`wsam_correct_` applies after it."""
    sharpness = [a.clone() - g for a, g in zip(grads, clean)]
    for a, g in zip(grads, clean):
        a.copy_(g)
    return sharpness


@torch.no_grad()
def wsam_correct_(optimizer: Any, params: Sequence[Tensor], sharpness: Sequence[Tensor], weight: float) -> None:
    """After the base step: ``w -= lr * weight * (g_adv - g)`` with each parameter group's LR of that step, as
    decoupled weight decay is applied (momentum, Adam's scaling and weight decay never see the sharpness term)."""
    lr = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    for p, term in zip(params, sharpness):
        p.add_(term, alpha=-lr[id(p)] * weight)


@torch.no_grad()
def fsam_update(momentum: Optional[list[Tensor]], ascent: Sequence[Tensor], decay: float) -> list[Tensor]:
    """Friendly-SAM's running mean of the ascent gradient, ``m = decay * m + (1 - decay) * a``, started at the first
    full step's ``a`` (not at 0)."""
    if momentum is None:
        return [a.clone() for a in ascent]
    for m, a in zip(momentum, ascent):
        m.lerp_(a.to(m.device, m.dtype), 1.0 - decay)
    return momentum
