"""The few collectives the core issues itself. Reductions are SUM-based: gloo has no AVG."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_instances(values: Tensor) -> tuple[Tensor, slice]:
    """Concatenate a ``[n_r]`` tensor over all ranks; also return this rank's slice of the result."""
    if world_size() == 1:
        return values, slice(0, values.shape[0])
    sizes = [torch.zeros(1, dtype=torch.long, device=values.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([values.shape[0]], device=values.device))
    counts = [int(s.item()) for s in sizes]
    padded = values.new_zeros(max(counts))
    padded[: values.shape[0]] = values
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    start = sum(counts[: rank()])
    return torch.cat([part[:count] for part, count in zip(parts, counts)]), slice(start, start + values.shape[0])


def sum_over_ranks(value: Tensor) -> Tensor:
    """The sum of ``value`` over all ranks (a new tensor; the input is untouched)."""
    out = value.clone()
    if world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
