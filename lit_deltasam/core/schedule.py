"""ρ along training: a constant radius, a linear warm-up, GSAM's radius that follows the LR, or a late start.

A radius of zero is a plain ERM step (one forward and backward), whatever the method.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Protocol

from ..config import DeltaSAMConfig


def warmup_steps(config: DeltaSAMConfig, total_steps: Optional[int] = None) -> int:
    """Optimizer steps of the ``warmup`` ramp or of the plain steps before ``start_step``.

    ``config.rho_warmup`` counts optimizer steps when it is at least 1, and is a fraction
    of ``total_steps`` below 1.
    """
    span = config.rho_warmup or 0.0
    if span >= 1 or span == 0:
        return int(span)
    if total_steps is None:
        raise ValueError(
            f"DeltaSAMConfig.rho_warmup={span} is a fraction of training, but the total number of optimizer steps "
            "is unknown; pass total_steps, or give rho_warmup in optimizer steps (>= 1)"
        )
    return int(span * total_steps)  # rounded as the app rounds its LR warm-up


def scheduled_rho(config: DeltaSAMConfig, step: int, total_steps: Optional[int] = None, lr_ratio: float = 1.0) -> float:
    """ρ at optimizer step ``step`` (counted from 0).

    * ``constant``: ρ.
    * ``warmup``: ρ · step / N for the first N steps (N from :func:`warmup_steps`), then ρ.
    * ``follow_lr``: ρ · lr_t / lr_max (GSAM, Zhuang et al., 2022), with ``lr_ratio``
      = lr_t / lr_max clamped to [0, 1].
    * ``start_step``: 0 (plain steps) for the first N steps, then ρ.
    """
    if not config.perturbs or config.rho is None:
        return 0.0
    schedule, rho = config.rho_schedule, config.rho
    if schedule == "constant":
        return rho
    if schedule == "follow_lr":
        return rho * min(max(lr_ratio, 0.0), 1.0)
    n = warmup_steps(config, total_steps)
    if step >= n:
        return rho
    return 0.0 if schedule == "start_step" else rho * step / n


def needs_total_steps(config: DeltaSAMConfig) -> bool:
    """Whether ρ's schedule is a fraction of training, which needs the run's number of optimizer steps."""
    return config.perturbs and config.rho_warmup is not None and 0 < config.rho_warmup < 1


def stated_lr_max(optimizer: Any, schedulers: Iterable[Any] = ()) -> Optional[float]:
    """The largest LR that the first parameter group's schedule states in advance, if any states one:
    OneCycleLR's ``max_lr``, a scheduler's base LR (``initial_lr``), CyclicLR's ``max_lrs``."""
    group = optimizer.param_groups[0]
    stated = [float(group[k]) for k in ("max_lr", "initial_lr") if k in group]
    stated += [float(s.max_lrs[0]) for s in schedulers if getattr(s, "max_lrs", None)]
    return max(stated) if stated else None


def lr_ratio(optimizer: Any, peak_seen: float = 0.0, stated: Optional[float] = None) -> tuple[float, float]:
    """lr_t / lr_max of the first parameter group, and lr_max.

    lr_max is the largest of the current LR, ``peak_seen`` (the largest LR seen so far: a
    ReduceLROnPlateau sets no base LR) and ``stated`` (:func:`stated_lr_max`; without it the
    group's ``max_lr``, else its ``initial_lr``).
    """
    group = optimizer.param_groups[0]
    if stated is None:
        stated = float(group.get("max_lr", group.get("initial_lr", group["lr"])))
    peak = max(stated, float(group["lr"]), peak_seen)
    return (float(group["lr"]) / peak if peak > 0 else 1.0), peak


class PeakHolder(Protocol):
    lr_peak: float
    """The largest learning rate seen, for ``rho_schedule="follow_lr"`` (saved with the loop state)."""


class RhoSchedule:
    """The one place ρ comes from: the scheduled radius of optimizer step t (a function of the step, the run's
    length and the base optimizer's LR, so the same on every rank and after a resume), and 0 on the plain steps of
    ``interval``.

    Args:
        config: the method, its ``rho``, ``rho_schedule``, ``rho_warmup`` and ``interval``.
        optimizer: the base optimizer, whose first group's LR ``follow_lr`` reads.
        peak: where the largest LR seen is kept (the loop state).
        total_steps: optimizer steps in the run, needed only when ``rho_warmup`` is a fraction.
        schedulers: LR schedulers whose stated maximum ``follow_lr`` reads (CyclicLR's ``max_lrs``).
    """

    def __init__(
        self,
        config: DeltaSAMConfig,
        optimizer: Any,
        peak: PeakHolder,
        total_steps: Optional[int] = None,
        schedulers: Sequence[Any] = (),
    ) -> None:
        self.config, self.optimizer, self.peak = config, optimizer, peak
        self.total_steps = total_steps
        self.schedulers = list(schedulers)
        self.warned_lr_max = False

    def full(self, step: int) -> bool:
        """Whether optimizer step ``step`` is a full sharpness-aware step under ``interval``."""
        return step % self.config.interval == 0

    def __call__(
        self, step: int, total_steps: Optional[int] = None, schedulers: Optional[Sequence[Any]] = None
    ) -> float:
        """ρ of optimizer step ``step``: the scheduled radius on a full step, 0 on a plain one."""
        return self.scheduled(step, total_steps, schedulers) if self.full(step) else 0.0

    def scheduled(
        self, step: int, total_steps: Optional[int] = None, schedulers: Optional[Sequence[Any]] = None
    ) -> float:
        """ρ of optimizer step ``step`` under ``rho_schedule``, whether or not the step is a full one."""
        cfg = self.config
        if cfg.rho_schedule == "constant" or not cfg.perturbs:
            return scheduled_rho(cfg, step)
        total = None
        if needs_total_steps(cfg):
            total = total_steps if total_steps is not None else self.total_steps
            if total is None:
                raise ValueError(
                    f"DeltaSAMConfig.rho_warmup={cfg.rho_warmup} is a fraction of training: pass "
                    "DeltaSAMOptimizer(..., total_steps=N), or give rho_warmup in optimizer steps (>= 1)"
                )
        ratio = 1.0
        if cfg.rho_schedule == "follow_lr":
            ratio = self._lr_ratio(self.schedulers if schedulers is None else schedulers)
        return scheduled_rho(cfg, step, total, ratio)

    def _lr_ratio(self, schedulers: Sequence[Any]) -> float:
        """lr_t / lr_max, keeping the peak seen; says once when the LR rises past every stated maximum."""
        stated = stated_lr_max(self.optimizer, schedulers)
        lr, seen = float(self.optimizer.param_groups[0]["lr"]), self.peak.lr_peak
        if lr > max(stated or 0.0, seen) and seen > 0 and not self.warned_lr_max:
            self.warned_lr_max = True
            warnings.warn(
                f"rho_schedule='follow_lr' cannot tell lr_max: the LR rose from {seen:g} to {lr:g} and no scheduler "
                "states its maximum, so ρ stays at its full value while the LR rises. State the peak in the "
                "parameter group (param_groups[0]['initial_lr'] = peak) or use rho_schedule='warmup'",
                RuntimeWarning,
                stacklevel=5,
            )
        ratio, self.peak.lr_peak = lr_ratio(self.optimizer, seen, stated)
        return ratio
