"""The ascent: from the gradient g to the weight perturbation eps, in batched ops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .norms import total_norm
from .sharding import NormReduce, local


@torch.no_grad()
def perturb(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    reduce_squares: Optional[NormReduce] = None,
    device: Optional[torch.device] = None,
) -> tuple[Tensor, Tensor, bool]:
    """Move ``params`` in place to ``w + eps``.

    SAM: ``eps = rho * g / ||g||``. ASAM (``adaptive``): ``eps = rho * T² g / ||T g||``
    with ``T = |w| + eta``, element-wise. When ``||g||`` (or ``||T g||``) is zero or
    not finite, the parameters are left at ``w`` and ``eps = 0``.

    Sharded parameters and gradients (DTensors) are updated shard by shard, with
    ``reduce_squares`` summing the norms over shards.

    Returns:
        ``(||g||, ||eps||, applied)``, where ``||g||`` is the norm that normalized eps.
    """
    params, grads = [local(p) for p in params], [local(g) for g in grads]
    if adaptive:
        scale = torch._foreach_abs(params)
        torch._foreach_add_(scale, eta)
        scaled = torch._foreach_mul(scale, grads)
        norm = total_norm(scaled, reduce_squares, device=device)
    else:
        norm = total_norm(grads, reduce_squares, device=device)
    value = norm.item()
    if not (math.isfinite(value) and value > 0):
        return norm, torch.zeros_like(norm), False
    factor = rho / value
    if adaptive:
        torch._foreach_mul_(scaled, scale)
        torch._foreach_mul_(scaled, factor)
        eps_norm = total_norm(scaled, reduce_squares, device=device)
        torch._foreach_add_(params, scaled)
    else:
        eps_norm = torch.as_tensor(rho, dtype=norm.dtype, device=norm.device)
        torch._foreach_add_(params, grads, alpha=factor)
    return norm, eps_norm, True
