"""Instance weights lambda for the δ-SAM perturbation (design: "Why reweight")."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .decisions import on_device


def instance_weights(
    scores: Tensor,
    beta: float,
    *,
    floor: float = 0.1,
    clip: tuple[float, float] = (0.1, 10.0),
) -> Tensor:
    """Weights ``lambda_i ∝ s_i ** beta``, non-negative and summing to one.

    Second-order matching of the per-instance SAM correction gives
    ``lambda_i ∝ 1 / ||g_i||`` (``beta = -1``); ``beta = 0`` is uniform, i.e. SAM.

    Args:
        scores: ``[n]`` non-negative estimates ``s_i`` of the per-instance gradient
            norms. Non-finite entries count as the largest finite score.
        beta: the exponent.
        floor: ``s_i`` is floored at ``floor`` times the median of the positive scores, so
            that a vanishing gradient (or a curvature clamped at 0) cannot claim all the
            weight when ``beta < 0``.
        clip: bounds ``[low, high]`` on ``n * lambda_i`` (``low <= 1 <= high``), met after
            normalization: ``n * lambda_i = clamp(c * s_i ** beta, low, high)`` with ``c`` such
            that the weights sum to one.

    Returns:
        ``[n]`` float64 weights. Computed in log space, they are finite for any input.

    Example:
        >>> instance_weights(torch.tensor([1.0, 2.0, 4.0]), beta=-1.0, floor=0.0, clip=(0.0, float("inf")))
        tensor([0.5714, 0.2857, 0.1429], dtype=torch.float64)
    """
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"instance_weights needs a non-empty 1-D tensor of scores, got shape {list(scores.shape)}")
    n = scores.numel()
    if beta == 0.0:
        return torch.full((n,), 1.0 / n, dtype=torch.float64, device=scores.device)
    s = scores.detach().to(torch.float64).abs()
    finite = torch.isfinite(s)
    largest = torch.where(finite, s, torch.zeros_like(s)).max()
    s = torch.where(finite, s, largest)
    tiny = torch.finfo(torch.float64).tiny
    # the median of the positive scores: a score clamped at 0 (curvature) must not pull the floor down with it
    reference = torch.where(s > 0, s, torch.full_like(s, math.nan)).nanmedian().nan_to_num(0.0)
    s = s.clamp_min(floor * reference).clamp_min(tiny)
    return _bounded(beta * s.log(), *clip) / n


def _bounded(logits: Tensor, low: float, high: float, iterations: int = 200) -> Tensor:
    """``clamp(exp(logits + t), low, high)`` with ``t`` such that the result sums to ``n`` (bisection on ``t``)."""
    n = logits.numel()
    weights = n * torch.softmax(logits, dim=0)
    inside = ((weights >= low) & (weights <= high)).all()
    if on_device(logits.device):
        return torch.where(inside, weights, _bounded_exact(logits, low, high))
    if bool(inside):
        return weights
    device, logits = logits.device, logits.cpu()  # n numbers: the bisection stays off the accelerator
    # the sum is non-decreasing in t, from n * low (every entry at low) to n * high, and low <= 1 <= high
    lo = math.log(max(low, 1e-300)) - logits.max().item() - 1.0
    hi = math.log(min(high, 1e300)) - logits.min().item() + 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if (logits + mid).exp().clamp(low, high).sum() < n:
            lo = mid
        else:
            hi = mid
    out = (logits + hi).exp().clamp(low, high)
    return (out * (n / out.sum())).to(device)


def _bounded_exact(logits: Tensor, low: float, high: float) -> Tensor:
    """:func:`_bounded` solved exactly in a fixed number of batched ops, with no value read on the host.

    ``f(t) = sum_i clamp(exp(l_i + t), low, high)`` is non-decreasing, and between consecutive sorted
    breakpoints ``log(low) - l_i`` and ``log(high) - l_i`` it is ``c_low * low + c_high * high + e^t * S``,
    where the entries at a bound are a prefix and a suffix of the logits in sorted order. The root lies in
    the last interval whose ``f`` at its start is at most n; O(n log n) work and O(n) memory.
    """
    n = logits.numel()
    if low >= high:  # low <= 1 <= high: every weight is 1
        return torch.ones_like(logits)
    shifted = logits - logits.max()
    ordered = shifted.sort().values
    below = ((math.log(low) if low > 0 else -math.inf) - ordered).flip(0)  # ascending
    above = ((math.log(high) if high < math.inf else math.inf) - ordered).flip(0)
    edges = torch.cat([below, above]).sort().values
    start, stop = edges[:-1], edges[1:]
    # at low in [start, stop]: below_i >= stop (the smallest logits); at high: above_i <= start (the largest)
    n_low = n - torch.searchsorted(below, stop, right=False)
    n_high = torch.searchsorted(above, start, right=True)
    mass = torch.cat([ordered.new_zeros(1), ordered.exp().cumsum(0)])
    free = (mass[n - n_high] - mass[n_low]).clamp_min(0)
    bounded = low * n_low.to(logits.dtype) + torch.where(n_high > 0, high * n_high.to(logits.dtype), 0.0)
    at_start = bounded + torch.where(free > 0, start.exp() * free, 0.0)
    k = ((at_start <= n).sum() - 1).clamp(0, start.numel() - 1).reshape(1)
    t = ((n - bounded).clamp_min(0).log() - free.log()).gather(0, k)
    fallback = torch.where(torch.isfinite(start.gather(0, k)), start.gather(0, k), stop.gather(0, k))
    t = torch.where(free.gather(0, k) > 0, t, fallback)  # no free entry: every weight at a bound
    root = torch.minimum(torch.maximum(t, start.gather(0, k)), stop.gather(0, k))
    out = (shifted + root).exp().clamp(low, high)
    return out * (n / out.sum())


def effective_sample_size(weights: Tensor) -> Tensor:
    """``1 / sum_i lambda_i**2``: ``n`` for uniform weights, 1 when one instance has all of it."""
    return 1.0 / weights.pow(2).sum()
