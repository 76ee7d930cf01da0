"""Norms of many tensors taken as one vector, in fused ``foreach`` kernels, summed over shards where asked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .sharding import NormReduce


def total_norm(
    tensors: Sequence[Tensor], reduce_squares: Optional[NormReduce] = None, *, device: Optional[torch.device] = None
) -> Tensor:
    """The 2-norm of all ``tensors`` taken as one flat vector, computed with ``foreach`` kernels.

    With ``reduce_squares`` every rank joins the reduction, also one holding no tensor
    (its zero goes to ``device``).
    """
    if tensors:
        norm = torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=True)
    else:
        norm = torch.zeros((), device=device)
    if reduce_squares is None:
        return norm
    return reduce_squares(norm.pow(2)).sqrt()


def overflow_scale(norm: Tensor, largest: Tensor) -> Tensor:
    """Where ``norm`` is inf but ``largest``, the largest magnitude of the tensors it is the norm of, is finite and
    positive (their squares overflowed, as a loss scaler's large scale makes them), the power of two that brings
    ``largest`` into [0.5, 1); 1 elsewhere. Element-wise, no value read on the host."""
    overflowed = torch.isinf(norm) & torch.isfinite(largest) & (largest > 0)
    _, exponent = torch.frexp(largest)
    one = torch.ones_like(largest)
    return torch.where(overflowed, torch.ldexp(one, -exponent), one)


@torch.no_grad()
def unoverflow_(tensors: Sequence[Tensor], norm: Tensor) -> tuple[Tensor, Tensor]:
    """The norm of finite ``tensors`` whose squares overflowed: scales them in place by :func:`overflow_scale`'s
    ``s`` and returns ``(||s t||, s)``, so that ``||t|| = ||s t|| / s`` and ``t / ||t|| = s t / ||s t||``.
    Where ``norm`` did not overflow, ``(norm, 1)`` and the tensors times 1, bit for bit what they were."""
    present = [t for t in tensors if t.numel()]
    if not present:
        return norm, torch.ones_like(norm)
    largest = torch.stack(torch._foreach_norm(present, math.inf)).amax().to(norm.dtype)
    scale = overflow_scale(norm, largest)
    torch._foreach_mul_(present, scale)
    return torch.where(scale != 1, total_norm(present), norm), scale
