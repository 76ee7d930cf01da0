"""Sharded parameters (FSDP2 ``DTensor``): each rank updates its own shard, and norms sum over shards."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional, cast

import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed support
    DTensor = Shard = None  # type: ignore[assignment,misc]  # no such classes: is_sharded() is then False


NormReduce = Callable[[Tensor], Tensor]
"""Turns a local sum of squares into the global one (an all-reduce across shards)."""


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds, outside autograd (see :class:`~lit_deltasam.core.snapshot.Snapshot`)."""
    data = t.data
    return cast("DTensor", data).to_local() if is_sharded(data) else data


def shard_reduction(params: Sequence[Tensor]) -> Optional[NormReduce]:
    """The all-reduce that turns local sums of squares into global ones; ``None`` for unsharded parameters.

    Supports FSDP2's layout: every parameter sharded along one mesh dimension of the
    same 1-D mesh.
    """
    sharded = [cast("DTensor", p) for p in params if is_sharded(p)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    layouts = {(p.device_mesh, tuple(p.placements)) for p in sharded}
    if (
        len(sharded) != len(params)
        or mesh.ndim != 1
        or any(m != mesh or not all(isinstance(pl, Shard) for pl in pls) for m, pls in layouts)
    ):
        raise NotImplementedError(
            "lit_deltasam supports sharded parameters laid out as FSDP2 does (every parameter a DTensor sharded "
            f"on one 1-D mesh); got placements {sorted({str(pls) for _, pls in layouts})} on {len(layouts)} layouts"
        )
    group = mesh.get_group()

    def reduce(squares: Tensor) -> Tensor:
        out = squares.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return reduce
