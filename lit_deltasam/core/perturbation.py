"""The ascent: from the gradient g to the weight perturbation eps, in batched ops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .decisions import on_device, scale_or_zero, zero_non_finite_
from .norms import total_norm, unoverflow_
from .sharding import NormReduce, local


@torch.no_grad()
def perturb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    unscaled: Optional[Sequence[bool]] = None,
    reduce_squares: Optional[NormReduce] = None,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor, bool | Tensor]:
    """Move ``params`` in place to ``w + eps``.

    SAM: ``eps = rho * g / ||g||``. ASAM (``adaptive``): ``eps = rho * T² g / ||T g||``
    with ``T = |w| + eta``, element-wise (``T = 1`` on the parameters flagged in ``unscaled``).
    When ``||g||`` (or ``||T g||``) is zero or not finite, the parameters are left at ``w`` and ``eps = 0``.

    Sharded parameters and gradients (DTensors) are updated shard by shard, with
    ``reduce_squares`` summing the norms over shards.

    On an accelerator the decision is taken on the device (:mod:`.decisions`): the gradients are
    scaled in place into eps (the caller replaces them with the descent's), and ``applied`` is a 0-d
    bool tensor. A zero or non-finite norm gives eps = 0 exactly there too (its non-finite entries,
    scaled by 0, are zeroed), so the descent runs at w, as on the host path.

    A finite gradient whose squares overflow (a loss scaler's large scale) is first scaled in place by a power of two
    (:func:`.norms.unoverflow_`), on both paths.

    Returns:
        ``(||g||, ||eps||, applied)``, where ``||g||`` is the norm that normalized eps.
    """
    params, grads = [local(p) for p in params], [local(g) for g in grads]
    scale: Optional[Sequence[Tensor]] = None
    normalized: Sequence[Tensor] = grads  # what eps is the normalized direction of: g, or T g for ASAM
    if adaptive:
        scale = torch._foreach_abs(params)
        torch._foreach_add_(scale, eta)
        for t, flat in zip(scale, unscaled or ()):
            if flat:
                t.fill_(1.0)
        scaled = torch._foreach_mul(scale, grads)
        normalized = scaled
    norm = total_norm(normalized, reduce_squares, device=device)
    # a loss scaler's large scale can overflow the squares of a finite gradient (not on shards: their norm is summed)
    rescue = reduce_squares is None
    if on_device(norm.device):
        if rescue:  # no value read: always, and bit for bit a no-op where nothing overflowed
            norm, power = unoverflow_(normalized, norm)
        factor: float | Tensor = scale_or_zero(rho, norm)
        applied: bool | Tensor = factor > 0
        if rescue:
            norm = norm / power
    else:
        value = norm.item()
        if math.isinf(value) and rescue:
            norm, power = unoverflow_(normalized, norm)
            value, norm = norm.item(), norm / power
        if not (math.isfinite(value) and value > 0):
            return norm, torch.zeros_like(norm), False
        factor, applied = rho / value, True
    if scale is not None:
        torch._foreach_mul_(scaled, scale)  # type: ignore[arg-type]
        torch._foreach_mul_(scaled, factor)
        if isinstance(factor, Tensor):
            zero_non_finite_(scaled)
        eps_norm = total_norm(scaled, reduce_squares, device=device)
        torch._foreach_add_(params, scaled)
    elif isinstance(factor, Tensor):
        torch._foreach_mul_(grads, factor)
        zero_non_finite_(grads)
        eps_norm = torch.where(factor > 0, rho, 0.0).to(norm.dtype)
        torch._foreach_add_(params, grads)
    else:
        eps_norm = torch.as_tensor(rho, dtype=norm.dtype, device=norm.device)
        torch._foreach_add_(params, grads, alpha=factor)
    return norm, eps_norm, applied
