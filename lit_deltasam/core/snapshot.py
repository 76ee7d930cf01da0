"""Bit-exact save and restore of the tensors a step touches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from .norms import total_norm
from .sharding import NormReduce, local


class Snapshot:
    """Copies of a set of tensors, restored by copying back (never by subtraction).

    ``tensors`` is a list, or a function returning the current list, so that a module
    moved or cast after the snapshot was made (``.to()``, ``.double()``) is still the
    one captured. The storage for the copies is reused while shapes and dtypes stay,
    so a training step costs one ``_foreach_copy_`` each way. Writes go through
    ``.data`` (the local shard of a sharded parameter), which leaves autograd's
    version counters alone: a graph built at ``w`` stays valid across a perturbation
    that is restored before its backward (the probes run between the clean forward and
    its backward).
    """

    def __init__(self, tensors: Union[Sequence[Tensor], Callable[[], Iterable[Tensor]]]) -> None:
        self._source = tensors if callable(tensors) else (lambda: tensors)
        self._targets: list[Tensor] = []
        self._copies: list[Tensor] = []

    @torch.no_grad()
    def capture(self) -> None:
        targets = [local(t) for t in self._source()]
        if not targets:
            self._targets, self._copies = [], []
            return
        same = len(targets) == len(self._copies) and all(
            t.shape == c.shape and t.dtype == c.dtype and t.device == c.device for t, c in zip(targets, self._copies)
        )
        if same:
            torch._foreach_copy_(self._copies, targets)
        else:
            self._copies = [t.clone() for t in targets]
        self._targets = targets

    @torch.no_grad()
    def restore(self, indices: Optional[Sequence[int]] = None) -> None:
        """Copy the captured values back, into all tensors or only those at ``indices``.

        The targets are looked up again, so a buffer a module reassigned (``self.b = …``
        instead of an in-place update) since the capture is restored too.
        """
        if not self._targets:
            return
        current = [local(t) for t in self._source()]
        if len(current) == len(self._copies):
            self._targets = [
                new if (new.shape, new.dtype, new.device) == (c.shape, c.dtype, c.device) else old
                for new, old, c in zip(current, self._targets, self._copies)
            ]
        if indices is None:
            torch._foreach_copy_(self._targets, self._copies)
        else:
            torch._foreach_copy_([self._targets[i] for i in indices], [self._copies[i] for i in indices])

    @torch.no_grad()
    def change_norm(self, reduce_squares: Optional[NormReduce] = None, device: Optional[torch.device] = None) -> Tensor:
        """``||current - captured||`` over all tensors as one vector (summed over shards by ``reduce_squares``)."""
        current = [local(t) for t in self._source()]
        return total_norm(torch._foreach_sub(current, self._copies), reduce_squares, device=device)


def take_grads(params: Sequence[Tensor]) -> list[Optional[Tensor]]:
    """Detach the current ``.grad`` of each parameter and leave ``None`` in its place."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def put_grads(params: Sequence[Tensor], grads: Sequence[Optional[Tensor]], *, copy: bool = False) -> None:
    """Install ``grads`` as the ``.grad`` of each parameter.

    A backward adds into an existing ``.grad`` in place, so ``copy=True`` installs
    clones and keeps ``grads`` a pristine record that a failed step can restore.
    """
    for p, g in zip(params, grads):
        p.grad = g.clone() if copy and g is not None else g
