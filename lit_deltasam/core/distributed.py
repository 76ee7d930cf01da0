"""The few collectives the core issues itself. Reductions are SUM-based: gloo has no AVG."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.nn.parallel.distributed import _find_tensors


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


def arm_reducer(no_sync: Callable[..., Any], output: Tensor) -> None:
    """Prepare raw DDP's reducer for a backward whose graph did not come out of a synchronized DDP forward.

    ``no_sync`` is the context the caller passed; when it is a ``DistributedDataParallel``'s
    own ``no_sync``, its module is the one to arm (Lightning arms its own in ``manual_backward``).
    This is what DDP's forward does after running the module.
    """
    ddp = getattr(no_sync, "__self__", None)
    if not isinstance(ddp, DistributedDataParallel) or not (torch.is_grad_enabled() and ddp.require_backward_grad_sync):
        return
    ddp.require_forward_param_sync = True
    outputs = list(_find_tensors(output)) if ddp.find_unused_parameters and not ddp.static_graph else []
    ddp.reducer._rebuild_buckets()
    ddp.reducer.prepare_for_backward(outputs)


def refuse_static_graph(no_sync: Callable[..., Any]) -> None:
    """Fail clearly where DDP's static graph would crash at the first ascent backward with an internal assert."""
    owner = getattr(no_sync, "__self__", None)
    ddp = owner if isinstance(owner, DistributedDataParallel) else getattr(owner, "model", None)
    if isinstance(ddp, DistributedDataParallel) and ddp.static_graph:
        raise ValueError(
            "DistributedDataParallel(static_graph=True) is not supported: a sharpness-aware step runs a local ascent "
            "backward and a synchronized descent backward per iteration, which a static graph cannot record; build "
            "DDP with static_graph=False (the default), e.g. DDPStrategy() instead of DDPStrategy(static_graph=True)"
        )
