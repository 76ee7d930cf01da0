"""ρ along training: a constant radius, a linear warm-up, GSAM's radius that follows the LR, or a late start.

A radius of zero is a plain ERM step (one forward and backward), whatever the method.
"""

from __future__ import annotations

from typing import Optional

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
