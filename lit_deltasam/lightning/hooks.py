"""What Lightning's automatic loop does that manual optimization bypasses, and what the mixin does about each.

In manual optimization Lightning steps no LR scheduler, accumulates nothing, clips
nothing, never calls ``optimizer_step``, ``optimizer_zero_grad`` or
``configure_gradient_clipping``, drops a scheduler's ``monitor``, and zeroes the gradients
before validation as if no accumulation window were open. The rules, in one place:

* LR schedulers (``interval``, ``frequency``, ReduceLROnPlateau's ``monitor`` and
  ``strict``; no epoch step for an epoch cut short by ``max_steps``): re-created in
  :mod:`~lit_deltasam.lightning.schedulers`; the monitors are kept by
  :func:`remember_plateau_monitors`.
* Accumulation, clipping of G, ρ schedules, ``interval``/LookSAM, per-step seeds: the
  loop rules of :class:`~lit_deltasam.core.loop.DeltaSAMOptimizer`, from ``DeltaSAMConfig``
  (Lightning rejects its own trainer flags in manual optimization).
* ``optimizer_step`` and ``optimizer_zero_grad``: called at the end of every window with
  Lightning's arguments, so that overrides (the LR warm-up recipe) run; an
  ``optimizer_step`` that never steps is refused.
* ``configure_gradient_clipping``: called from ``on_before_optimizer_step`` (after a loss
  scaler unscales) with ``DeltaSAMConfig``'s values; an ``on_before_optimizer_step``
  override that skips ``super()`` while clipping is set is refused (:func:`require_clipping`).
* ``on_validation_model_zero_grad``: skipped while a window is open, so that validation
  inside a window leaves the step alone.
* ``training_step``: a leftover from automatic optimization that never calls
  ``deltasam_step`` is refused on the first batch (:func:`require_deltasam_step`).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, TypeVar

from lightning.pytorch import LightningModule
from torch import Tensor

from ..config import DeltaSAMConfig
from ..core.driver import Driver, LoopState
from ..core.engine import StepResult


@dataclass
class Fit:
    """What the mixin holds for the fit in progress."""

    trainer: Optional[weakref.ReferenceType] = None
    loop: LoopState = field(default_factory=LoopState)
    driver: Optional[tuple[Any, DeltaSAMConfig, Driver]] = None
    """The loop driver, with the torch optimizer and the config it was built for."""
    pending_grads: Optional[list[Tensor]] = None
    """A resumed accumulation window's partial gradients, installed when the engine is built."""
    pending_params: Optional[list[int]] = None
    """A resumed window's parameters among the optimizer's, where a group was added inside it (``None``: all)."""


@dataclass
class MixinState:
    """All the mixin keeps on a module: the fit in progress, and what its hook wrappers note."""

    fit: Optional[Fit] = None
    monitors: dict[int, tuple[Optional[str], bool]] = field(default_factory=dict)
    """``id(scheduler)`` → (monitor, strict) from ``configure_optimizers``."""
    clipped: bool = False
    step_called: bool = False
    step_seen: bool = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "fit": None}  # a pickled module leaves its fit (and trainer) behind


def mixin_state(module: Any) -> MixinState:
    state = module.__dict__.get("_deltasam")
    if state is None:
        state = module.__dict__["_deltasam"] = MixinState()
    return state


_WRAPPED = "_deltasam_wrapped"
_F = TypeVar("_F", bound=Callable[..., Any])


def mark_wrapped(wrapped: _F) -> _F:
    """Mark one of the hook wrappers below, so that a subclass's ``__init_subclass__`` does not wrap it again."""
    wrapped.__dict__[_WRAPPED] = True
    return wrapped


def is_wrapped(method: Any) -> bool:
    return bool(getattr(method, _WRAPPED, False))


def no_closure() -> None:
    """The closure handed to ``optimizer_step``: G is already in ``.grad``."""
    return None


def overridden(module: Any, hook: str) -> bool:
    return getattr(type(module), hook) is not getattr(LightningModule, hook)


def remember_plateau_monitors(configure_optimizers: Callable[..., Any]) -> Callable[..., Any]:
    """Keep each scheduler's ``monitor``: Lightning drops it in manual optimization.

    Both of Lightning's forms count: ``{"scheduler": s, "monitor": m}`` and
    ``{"optimizer": o, "lr_scheduler": s, "monitor": m}``.
    """

    def monitors(out: Any) -> Iterator[tuple[Any, Optional[str], bool]]:
        if isinstance(out, Mapping):
            if "scheduler" in out:
                yield out["scheduler"], out.get("monitor"), out.get("strict", True)
            elif "optimizer" in out and "lr_scheduler" in out and not isinstance(out["lr_scheduler"], Mapping):
                yield out["lr_scheduler"], out.get("monitor"), True
            for value in out.values():
                yield from monitors(value)
        elif isinstance(out, (list, tuple)):
            for value in out:
                yield from monitors(value)

    @functools.wraps(configure_optimizers)
    def wrapped(self: Any) -> Any:
        out = configure_optimizers(self)
        mixin_state(self).monitors = {id(s): (m, strict) for s, m, strict in monitors(out)}
        return out

    return mark_wrapped(wrapped)


def require_clipping(hook: Callable[..., Any]) -> Callable[..., Any]:
    """Fail before the update when an override of ``on_before_optimizer_step`` skipped the mixin's clipping."""

    @functools.wraps(hook)
    def wrapped(self: Any, optimizer: Any, *args: Any, **kwargs: Any) -> Any:
        mixin_state(self).clipped = False
        out = hook(self, optimizer, *args, **kwargs)
        if self._deltasam_config().gradient_clip_val is not None and not mixin_state(self).clipped:
            raise RuntimeError(
                "DeltaSAMConfig.gradient_clip_val is set but no clipping ran: on_before_optimizer_step was overridden "
                "without calling super().on_before_optimizer_step(optimizer); the weights are unchanged"
            )
        return out

    return mark_wrapped(wrapped)


def _loss_of(out: Any) -> Any:
    """``return self.deltasam_step(batch)`` is the obvious line to write: Lightning takes a tensor, its loss."""
    return out.loss if isinstance(out, StepResult) else out


def require_deltasam_step(training_step: Callable[..., Any]) -> Callable[..., Any]:
    """Fail on the first batch when a custom ``training_step`` never calls ``deltasam_step``.

    Under manual optimization such a step (left over from automatic optimization) would
    train nothing, silently, and a run bounded only by ``max_steps`` would never end.
    """

    @functools.wraps(training_step)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        holder = mixin_state(self)
        if holder.step_seen:
            return _loss_of(training_step(self, *args, **kwargs))
        holder.step_called = False
        out = _loss_of(training_step(self, *args, **kwargs))
        if not holder.step_called:
            raise RuntimeError(
                f"{type(self).__name__}.training_step returned without calling self.deltasam_step(batch): under "
                "DeltaSAMMixin (manual optimization) nothing would be trained. Delete training_step to let the mixin "
                "own it, or call self.deltasam_step(batch) from it (it returns a StepResult with .loss)"
            )
        holder.step_seen = True
        return out

    return mark_wrapped(wrapped)


def refuse_unread_clipping(module: Any, config: DeltaSAMConfig) -> None:
    """``gradient_clip_algorithm`` without ``gradient_clip_val`` is read only by an overridden
    ``configure_gradient_clipping`` (which Lightning's loop, and the mixin, hand it to); without one it is refused."""
    if config.gradient_clip_val is None and config.gradient_clip_algorithm != "norm":
        if not overridden(module, "configure_gradient_clipping"):
            algorithm = config.gradient_clip_algorithm
            raise ValueError(
                f"DeltaSAMConfig.gradient_clip_algorithm={algorithm!r} without gradient_clip_val clips nothing: set "
                "gradient_clip_val (e.g. DeltaSAMConfig(gradient_clip_val=1.0, "
                f"gradient_clip_algorithm={algorithm!r})), or override configure_gradient_clipping to read it"
            )
