"""Control over the random state, so that compared forwards draw the same dropout masks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import numpy as np
import torch


def _accelerator(device: torch.device) -> Optional[Any]:
    """The device module (``torch.cuda``, ``torch.mps``, ``torch.xpu``, ...) whose generator draws on ``device``."""
    if device.type in ("cpu", "meta"):
        return None
    module = torch.get_device_module(device.type)
    needed = ("get_rng_state", "set_rng_state", "manual_seed")
    if not all(hasattr(module, name) for name in needed):
        raise NotImplementedError(
            f"cannot control the random state of device type {device.type!r} (torch.{device.type} has no "
            "get_rng_state/set_rng_state); set share_dropout=False and seed_steps=False"
        )
    return module


def _accelerator_index(device: torch.device) -> list[int]:
    module = _accelerator(device)
    if module is None:
        return []
    if device.index is not None:
        return [device.index]
    return [module.current_device()] if hasattr(module, "current_device") else [0]


class RandomState:
    """The global random state of the CPU and of one accelerator (CUDA, MPS, XPU, ...), captured and replayable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._module = _accelerator(device)
        self._cpu: Optional[torch.Tensor] = None
        self._accel: Optional[torch.Tensor] = None

    def capture(self) -> None:
        self._cpu = torch.get_rng_state()
        if self._module is not None:
            self._accel = self._module.get_rng_state(self.device)

    def restore(self) -> None:
        """Set the global random state to the captured one."""
        if self._cpu is None:
            raise RuntimeError("RandomState.restore() needs a capture() first")
        torch.set_rng_state(self._cpu)
        if self._accel is not None and self._module is not None:
            self._module.set_rng_state(self._accel, self.device)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from the captured state; afterwards the state is as it was before the body."""
        with torch.random.fork_rng(devices=_accelerator_index(self.device), device_type=self.device.type):
            self.restore()
            yield


def step_seed(base_seed: int, *keys: int) -> int:
    """A well-mixed 63-bit seed for one training step, a pure function of its keys."""
    entropy = [int(base_seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with the CPU and ``device`` generators seeded by ``seed``, then restore them."""
    module = _accelerator(device)
    with torch.random.fork_rng(devices=_accelerator_index(device), device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[_accelerator_index(device)[0]].manual_seed(seed)
        elif module is not None:
            module.manual_seed(seed)
        yield
