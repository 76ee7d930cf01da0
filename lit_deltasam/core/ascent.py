"""The ascent of every method, and nothing else: from the gradient g to the weights ``w + eps``.

* The direction: SAM's is g; ASAM's is ``T² g`` normalized by ``||T g||``, ``T = |w| + eta`` element-wise
  (:func:`asam_scale`; ``T = 1`` on the parameters it leaves unscaled).
* The factor ``rho / ||g||`` where ``||g||`` is finite and positive, else 0 (eps = 0): :func:`factor`, element-wise
  over a leading group dimension, in the precision the caller names, and :func:`host_factor` for a norm read on
  the host. No other file computes it.
* The in-place move: :func:`perturb` for one set of parameters, :func:`perturb_groups_` for a leading group
  dimension (m-sharpness's batched groups, per-instance SAM's instances).
* Options of the direction: gradient centralization (:func:`centralize_`); Friendly-SAM's shift by the gradient's
  running mean is subtracted by the caller (:class:`~.steps.TwoPass`).

Two arithmetics are kept on purpose (:mod:`.decisions`): on the host the decision is a Python value (the CPU path
every committed result was made with); on a GPU it is a tensor, and no value is read. Both rescue a finite gradient
whose squares overflow (a loss scaler's large scale) by scaling it first by a power of two (:mod:`.norms`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .decisions import on_device
from .norms import overflow_scale, total_norm, unoverflow_
from .sharding import NormReduce, local


def factor(rho: float, norm: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``rho / norm`` where ``norm`` is finite and positive, else 0, element-wise, computed in ``dtype`` (default:
    the norm's own), with no value read on the host."""
    ok = torch.isfinite(norm) & (norm > 0)
    dtype = dtype or norm.dtype
    return torch.where(ok, rho / norm.to(dtype), torch.zeros((), dtype=dtype, device=norm.device))


def host_factor(rho: float, norm: float) -> Optional[float]:
    """``rho / norm`` for a norm read on the host; ``None`` (eps = 0) where it is zero or not finite."""
    return rho / norm if math.isfinite(norm) and norm > 0 else None


def asam_scale(params: Sequence[Tensor], eta: float, unscaled: Optional[Sequence[bool]] = None) -> list[Tensor]:
    """ASAM's ``T = |w| + eta``, one tensor per parameter; ``T = 1`` where ``unscaled`` says."""
    scale = list(torch._foreach_abs(list(params)))
    torch._foreach_add_(scale, eta)
    for t, flat in zip(scale, unscaled or ()):
        if flat:
            t.fill_(1.0)
    return scale


def centralize_(grads: Sequence[Tensor], leading: int = 0) -> None:
    """Gradient centralization (Yong et al., 2020), in place: each gradient of rank > 1 (past ``leading`` group
    dimensions) less its mean over every dimension but its first, as the reference library's ``centralize_gradient``
    computes it."""
    for g in grads:
        if g.dim() > leading + 1:
            g.add_(-g.mean(dim=tuple(range(leading + 1, g.dim())), keepdim=True))


def zero_non_finite_(scaled: Sequence[Tensor]) -> None:
    """Zero in place the entries that a factor of 0 left non-finite (``inf * 0`` is NaN): eps must be exactly 0
    where the norm was not finite. Finite norms mean finite entries, which this leaves alone."""
    for t in scaled:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


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
    """Move ``params`` in place to ``w + eps``: ``eps = rho * g / ||g||`` (SAM), ``eps = rho * T² g / ||T g||``
    (ASAM, ``adaptive``). Where the norm is zero or not finite the parameters stay at ``w``.

    Sharded parameters and gradients (DTensors) are moved shard by shard, ``reduce_squares`` summing the norms over
    shards. The decision is taken on the host or, on an accelerator, on the device (:func:`perturb_on_host`,
    :func:`perturb_on_device`).

    Returns:
        ``(||g||, ||eps||, applied)``, where ``||g||`` is the norm that normalized eps.
    """
    params, grads = [local(p) for p in params], [local(g) for g in grads]
    scale = asam_scale(params, eta, unscaled) if adaptive else None
    normalized = list(torch._foreach_mul(scale, grads)) if scale is not None else grads
    norm = total_norm(normalized, reduce_squares, device=device)
    move = perturb_on_device if on_device(norm.device) else perturb_on_host
    return move(params, grads, normalized, scale, norm, rho, reduce_squares)


def perturb_on_host(
    params: list[Tensor],
    grads: list[Tensor],
    normalized: list[Tensor],
    scale: Optional[list[Tensor]],
    norm: Tensor,
    rho: float,
    reduce_squares: Optional[NormReduce],
) -> tuple[Tensor, Tensor, bool]:
    """:func:`perturb` with its decision read on the host (the CPU path every committed result was made with)."""
    value = norm.item()
    if math.isinf(value) and reduce_squares is None:  # the norm of shards is summed over ranks: no rescue there
        norm, power = unoverflow_(normalized, norm)
        value, norm = norm.item(), norm / power
    step = host_factor(rho, value)
    if step is None:
        return norm, torch.zeros_like(norm), False
    if scale is None:
        torch._foreach_add_(params, grads, alpha=step)
        return norm, torch.as_tensor(rho, dtype=norm.dtype, device=norm.device), True
    torch._foreach_mul_(normalized, scale)
    torch._foreach_mul_(normalized, step)
    eps_norm = total_norm(normalized, reduce_squares, device=norm.device)
    torch._foreach_add_(params, normalized)
    return norm, eps_norm, True


def perturb_on_device(
    params: list[Tensor],
    grads: list[Tensor],
    normalized: list[Tensor],
    scale: Optional[list[Tensor]],
    norm: Tensor,
    rho: float,
    reduce_squares: Optional[NormReduce],
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`perturb` with its decision a tensor, no value read: the gradients are scaled in place into eps (the
    caller replaces them with the descent's), and ``applied`` is a 0-d bool tensor."""
    rescue = reduce_squares is None
    if rescue:  # always, and bit for bit a no-op where nothing overflowed
        norm, power = unoverflow_(normalized, norm)
    step = factor(rho, norm, torch.float64).float()
    if rescue:
        norm = norm / power
    moved = normalized if scale is not None else grads
    if scale is not None:
        torch._foreach_mul_(moved, scale)
    torch._foreach_mul_(moved, step)
    zero_non_finite_(moved)
    if scale is not None:
        eps_norm = total_norm(moved, reduce_squares, device=norm.device)
    else:
        eps_norm = torch.where(step > 0, rho, 0.0).to(norm.dtype)
    torch._foreach_add_(params, moved)
    return norm, eps_norm, step > 0


def group_norms(grads: Sequence[Tensor], count: int) -> Tensor:
    """``[G]`` norms of the groups' gradients, each ``[G, ...]`` tensor's row k being group k's."""
    return torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.reshape(count, -1), dim=1) for g in grads]), dim=0
    )


@torch.no_grad()
def perturb_groups_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    *,
    adaptive: bool = False,
    eta: float = 0.0,
    unscaled: Optional[Sequence[bool]] = None,
    centralize: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Turn each ``[G, ...]`` gradient (row k: group k's ``g_k``) into ``w + eps_k`` in place, ``eps_k`` as
    :func:`perturb` makes it, 0 where group k's norm is 0 or not finite; the factors are float64.

    Returns:
        The per-group ``||g_k||`` (``||T g_k||`` for ASAM), ``||eps_k||`` and whether ``eps_k`` was applied.
    """
    count = grads[0].shape[0]
    if centralize:
        centralize_(grads, leading=1)
    scale = asam_scale(params, eta, unscaled) if adaptive else None
    if scale is not None:
        for g, t in zip(grads, scale):
            g.mul_(t)
    norm = group_norms(grads, count)
    power: Optional[Tensor] = None
    if on_device(norm.device) or bool(torch.isinf(norm).any()):  # a loss scaler can overflow the squares
        largest = torch.stack([torch.linalg.vector_norm(g.reshape(count, -1), math.inf, dim=1) for g in grads])
        power = overflow_scale(norm, largest.amax(0).to(norm.dtype))
        for g in grads:
            g.mul_(power.to(g.dtype).reshape(count, *([1] * (g.ndim - 1))))
        norm = torch.where(power != 1, group_norms(grads, count), norm)
    steps = factor(rho, norm, torch.float64)
    ok = steps > 0
    for i, g in enumerate(grads):
        if scale is not None:
            g.mul_(scale[i])
        g.mul_(steps.to(g.dtype).reshape(count, *([1] * (g.ndim - 1))))
    if on_device(norm.device) or not bool(ok.all()):
        zero_non_finite_(grads)
    eps_norm = group_norms(grads, count) if adaptive else ok.to(norm.dtype) * rho
    for g, p in zip(grads, params):
        g.add_(p.detach())
    return (norm if power is None else norm / power), eps_norm, ok
