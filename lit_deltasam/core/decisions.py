"""Where a step takes its data-dependent decisions: skip ε, bound λ, keep LookSAM's direction, count skips.

On a GPU every read of a tensor's value on the host waits for the queue of kernels before
it, so there the decisions are tensors (``torch.where``, masks) and a step reads one
value: the joint check that decides whether the base optimizer steps at all (a loss scaler
takes the same read). On the CPU a read costs nothing; the decisions are Python values there,
and that path's arithmetic is the one every committed result was made with. Other devices
(MPS, XLA) keep the host path, which needs no float64 on the device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

_forced: Optional[bool] = None


def on_device(device: torch.device) -> bool:
    """Whether steps on ``device`` keep their decisions on the device: on CUDA (and ROCm) GPUs; other devices
    keep the host path."""
    return _forced if _forced is not None else device.type == "cuda"


@contextmanager
def decisions_on_device(enabled: bool = True) -> Iterator[None]:
    """Take the decisions on the device (or on the host) whatever the device: to check one path on the other's
    hardware, as the tests do on the CPU."""
    global _forced
    before, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = before


def all_of(flags: list[bool | Tensor]) -> bool | Tensor:
    """``all(flags)``, as a 0-d bool tensor when any flag is one."""
    if all(isinstance(f, bool) for f in flags):
        return all(flags)
    return torch.stack([torch.as_tensor(f, device=_device(flags)) for f in flags]).all()


def _device(flags: list[bool | Tensor]) -> torch.device:
    return next(f.device for f in flags if isinstance(f, Tensor))


class HostReads:
    """Counts, while active, the calls of the Tensor methods that read a value on the host (``item``,
    ``tolist``, ``bool``, ``float``, ``int``): the synchronizations a step takes on an accelerator.

    Example:
        >>> with HostReads() as reads:
        ...     _ = float(torch.ones(()))
        >>> reads.count
        1
    """

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __enter__(self) -> HostReads:
        self.count = 0
        self._originals = {name: getattr(Tensor, name) for name in self.METHODS}
        for name, method in self._originals.items():
            setattr(Tensor, name, self._counting(method))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, method in self._originals.items():
            setattr(Tensor, name, method)

    def _counting(self, method):
        def counted(tensor, *args, **kwargs):
            self.count += 1
            return method(tensor, *args, **kwargs)

        return counted
