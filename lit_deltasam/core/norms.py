"""Norms of many tensors taken as one vector, in fused ``foreach`` kernels, summed over shards where asked."""

from __future__ import annotations

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
