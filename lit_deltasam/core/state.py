"""Bit-exact save and restore of the tensors a step touches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from .sharding import local


class Snapshot:
    """Copies of a fixed list of tensors, restored by copying back (never by subtraction).

    The storage for the copies is allocated on the first ``capture`` and reused by
    every later one, so a training step costs one ``_foreach_copy_`` each way.
    Writes go through ``.data`` (the local shard of a sharded parameter) and so do not bump autograd's version counters: a
    graph built at ``w`` stays valid across a perturbation that is restored before
    its backward (the probes run between the clean forward and its backward).
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = [local(t) for t in tensors]
        self._copies: Optional[list[Tensor]] = None

    @torch.no_grad()
    def capture(self) -> None:
        if not self.tensors:
            return
        if self._copies is None:
            self._copies = [t.clone() for t in self.tensors]
        else:
            torch._foreach_copy_(self._copies, self.tensors)

    @torch.no_grad()
    def restore(self, indices: Optional[Sequence[int]] = None) -> None:
        """Copy the captured values back, into all tensors or only those at ``indices``."""
        if self._copies is None:
            return
        if indices is None:
            torch._foreach_copy_(self.tensors, self._copies)
        else:
            torch._foreach_copy_([self.tensors[i] for i in indices], [self._copies[i] for i in indices])

    @property
    def copies(self) -> list[Tensor]:
        if self._copies is None:
            raise RuntimeError("Snapshot.copies read before the first capture()")
        return self._copies


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
