"""The loss around a minimum along random filter-normalized directions (Li et al., *Visualizing the Loss Landscape
of Neural Nets*, NeurIPS 2018), for comparing how flat two sets of weights are.

A direction is drawn once, as Gaussian noise in the parameters' shapes, from a seed; each
model then scales it filter by filter (a filter is a row of a weight: an output unit) to
the norm of its own filter, so that the scale invariance of ReLU-like nets and the size of
each layer do not decide what the picture shows. Biases and other one-dimensional
parameters (LayerNorm) get no component, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .snapshot import Snapshot


def random_directions(params: Sequence[Tensor], count: int, seed: int) -> list[list[Tensor]]:
    """``count`` Gaussian directions in the shapes of ``params``, the same for every model of those shapes."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=generator, dtype=torch.float32) for p in params] for _ in range(count)]


def filter_normalized(direction: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """``direction`` scaled row by row to the norms of ``params``' rows; zero for parameters with one dimension."""
    out = []
    for d, p in zip(direction, params):
        d = d.to(p.device, p.dtype)
        if p.ndim <= 1:
            out.append(torch.zeros_like(p))
            continue
        rows_p, rows_d = p.detach().reshape(p.shape[0], -1), d.reshape(d.shape[0], -1)
        scale = rows_p.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out.append((rows_d * scale).reshape(p.shape))
    return out


@torch.no_grad()
def surface(
    params: Sequence[Tensor],
    directions: Sequence[Sequence[Tensor]],
    coordinates: Sequence[Sequence[float]],
    evaluate: Callable[[], dict[str, float]],
    progress: Callable[[], None] = lambda: None,
) -> list[dict[str, float]]:
    """``evaluate()`` at ``w + sum_k c_k d_k`` for each point ``c`` of ``coordinates``; ``w`` is restored exactly.

    Args:
        params: the parameters to move (``w``).
        directions: one list of tensors per axis, in the shapes of ``params`` (already normalized).
        coordinates: points, one coordinate per direction.
        evaluate: the metrics of the model at its current weights (e.g. the mean loss and accuracy on a sample).
        progress: called after each point.
    """
    snapshot = Snapshot(list(params))
    snapshot.capture()
    out = []
    try:
        for point in coordinates:
            snapshot.restore()
            for c, direction in zip(point, directions):
                if c:
                    torch._foreach_add_(list(params), list(direction), alpha=float(c))
            out.append(evaluate())
            progress()
    finally:
        snapshot.restore()
    return out
