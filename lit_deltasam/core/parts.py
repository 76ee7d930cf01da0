"""What every step strategy works on: the module, the parameters it perturbs and updates, their snapshots and the
per-instance oracle, built once per engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..config import DeltaSAMConfig
from .batch import Batch, LossFn
from .family import plain_is_ascent
from .per_instance import PerInstance
from .sharding import NormReduce
from .snapshot import Snapshot

Backward = Callable[[Tensor], None]
NoSync = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class Step:
    """One call of :meth:`~lit_deltasam.core.engine.DeltaSAM.step`: what it computes on, and how it reaches the
    caller's autograd and sync."""

    loss_fn: LossFn
    batch: Batch
    backward: Backward
    no_sync: NoSync
    sync_descent: bool
    rho: float
    plain_grad: bool
    shift: Optional[Sequence[Optional[Tensor]]] = None
    """Friendly-SAM's running mean of the gradient, one tensor per perturbed parameter (``None``: not shifted): the
    ascent direction is ``g - fsam_sigma * shift``."""
    decide: Optional[Callable[[float], bool]] = None
    """The adaptive policy: given ``||g||²`` of the ascent gradient at w, whether to take the full step."""


@dataclass
class Parts:
    """The engine's parts that its strategies share."""

    module: nn.Module
    config: DeltaSAMConfig
    params: list[Tensor]
    """The perturbed parameters."""
    names: list[str]
    unperturbed: list[Tensor]
    """Trainable parameters outside ``params``: not perturbed, but given the descent gradient."""
    reduce_squares: Optional[NormReduce]
    instances: PerInstance
    params_before: Snapshot
    buffers_before: Snapshot
    buffers_clean: Snapshot
    scalar: Optional[str]
    """The method, where ``loss_fn`` may return one scalar mean loss; ``None`` where it needs one per instance."""
    unscaled: list[bool]
    """ASAM's parameters with ``T = 1`` (``asam_scope="weights"``: those without "weight" in their name)."""
    updated: list[Tensor] = field(init=False)
    """Every parameter whose ``.grad`` a step writes: ``params`` then ``unperturbed``."""

    plain_is_ascent: bool = field(init=False)
    """:func:`~.family.plain_is_ascent` of the config."""

    def __post_init__(self) -> None:
        self.updated = self.params + self.unperturbed
        self.plain_is_ascent = plain_is_ascent(self.config)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def adaptive(self) -> bool:
        return self.config.asam_scaled

    @property
    def eta(self) -> float:
        return self.config.asam_eta or 0.0


@contextmanager
def descent_sync(no_sync: NoSync, sync_descent: bool) -> Iterator[None]:
    """The descent's context: synchronized at a window's last micro-batch, inside ``no_sync`` before it."""
    with nullcontext() if sync_descent else no_sync():
        yield
