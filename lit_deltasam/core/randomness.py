"""Control over the random state, so that compared forwards draw the same dropout masks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch


def _accelerator_index(device: torch.device) -> list[int]:
    if device.type == "cuda":
        return [device.index if device.index is not None else torch.cuda.current_device()]
    return []


class RandomState:
    """The global random state of the CPU and of one accelerator, captured once and replayable."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cpu: Optional[torch.Tensor] = None
        self._accel: Optional[torch.Tensor] = None

    def capture(self) -> None:
        self._cpu = torch.get_rng_state()
        if self.device.type == "cuda":
            self._accel = torch.cuda.get_rng_state(self.device)

    def restore(self) -> None:
        """Set the global random state to the captured one."""
        if self._cpu is None:
            raise RuntimeError("RandomState.restore() needs a capture() first")
        torch.set_rng_state(self._cpu)
        if self._accel is not None:
            torch.cuda.set_rng_state(self._accel, self.device)

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
    with torch.random.fork_rng(devices=_accelerator_index(device), device_type=device.type):
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.default_generators[_accelerator_index(device)[0]].manual_seed(seed)
        yield
