"""What the core needs to know about a user's batch and per-sample losses."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

Batch = Any
LossFn = Callable[[Batch], Tensor]


def batch_size(batch: Batch) -> Optional[int]:
    """The leading size of the batch's tensors, or ``None`` when it holds no tensor."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return leaf.shape[0]
    return None


def slice_batch(batch: Batch, index: slice) -> Batch:
    """The instances ``index`` of every tensor in the batch; other leaves pass through."""
    return tree_map(lambda t: t[index] if isinstance(t, Tensor) and t.ndim > 0 else t, batch)


def check_losses(losses: Any, batch: Batch, device: torch.device, *, scalar: Optional[str] = None) -> Tensor:
    """Validate what the user's loss function returned: a floating ``[n]`` tensor on ``device``.

    With ``scalar`` (the name of a method that needs no per-instance loss), a 0-d mean loss is accepted too and
    returned as shape ``[1]``."""
    name = "the per-sample loss (per_sample_loss / loss_fn)"
    expected = batch_size(batch)
    if expected == 0:
        raise ValueError(f"{name} got an empty batch (0 instances); drop empty batches before the step")
    if not isinstance(losses, Tensor):
        raise TypeError(
            f"{name} must return a Tensor of per-instance losses with shape [n], got {type(losses).__name__}"
        )
    if losses.ndim == 0 and scalar is not None:
        losses = losses.reshape(1)
    elif losses.ndim != 1 or (expected is not None and losses.shape[0] != expected):
        want = f"[{expected}]" if expected is not None else "[n]"
        why = (
            ""
            if losses.ndim
            else " (a scalar mean loss serves every method but per_instance, and none with beta != 0: the "
            "reweighting needs each instance's loss)"
        )
        raise ValueError(
            f"{name} returned shape {list(losses.shape)} but must return one loss per instance, shape {want}{why}; "
            "compute the loss with reduction='none'"
        )
    if losses.numel() == 0:
        raise ValueError(f"{name} returned an empty tensor; the batch must hold at least one instance")
    if not losses.is_floating_point():
        raise TypeError(f"{name} returned dtype {losses.dtype}; per-instance losses must be a floating-point tensor")
    if losses.device.type != device.type or (device.index is not None and losses.device.index != device.index):
        raise ValueError(f"{name} returned a tensor on {losses.device}, but the parameters are on {device}")
    return losses
