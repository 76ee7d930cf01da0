"""The ascent: from the gradient g to the weight perturbation eps, in batched ops."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .decisions import on_device, scale_or_zero, zero_non_finite_
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

    Returns:
        ``(||g||, ||eps||, applied)``, where ``||g||`` is the norm that normalized eps.
    """
    params, grads = [local(p) for p in params], [local(g) for g in grads]
    scale: Optional[Sequence[Tensor]] = None
    if adaptive:
        scale = torch._foreach_abs(params)
        torch._foreach_add_(scale, eta)
        for t, flat in zip(scale, unscaled or ()):
            if flat:
                t.fill_(1.0)
        scaled = torch._foreach_mul(scale, grads)  # type: ignore[arg-type]
        norm = total_norm(scaled, reduce_squares, device=device)
    else:
        norm = total_norm(grads, reduce_squares, device=device)
    if on_device(norm.device):
        factor: float | Tensor = scale_or_zero(rho, norm)
        applied: bool | Tensor = factor > 0
    else:
        value = norm.item()
        if math.isinf(value):  # the squares overflowed (a loss scaler's large scale), not always the gradient
            norm = _rescaled_norm(scaled if scale is not None else grads, norm, reduce_squares)
            value = norm.item()
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


def _rescaled_norm(tensors: Sequence[Tensor], norm: Tensor, reduce_squares: Optional[NormReduce]) -> Tensor:
    """The 2-norm of finite ``tensors`` whose squares overflowed: ``m * ||t / m||`` with ``m`` the largest
    magnitude; ``norm`` (inf) where an entry is not finite or the tensors are shards (FSDP)."""
    present = [t for t in tensors if t.numel()]
    if reduce_squares is not None or not present:
        return norm
    largest = torch.stack([t.abs().max() for t in present]).max()
    if not torch.isfinite(largest) or largest == 0:
        return norm
    return largest * total_norm(list(torch._foreach_div(present, largest)))
