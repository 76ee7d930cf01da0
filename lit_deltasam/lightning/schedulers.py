"""Lightning's LR-scheduler rules, re-created for manual optimization, and the run's length in optimizer steps."""

from __future__ import annotations

import math
from typing import Any, Optional

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim.lr_scheduler import ReduceLROnPlateau

from .hooks import mixin_state
from .private import drop_early_train_loader, train_loader_ready


def optimizer_steps(trainer: Any, accumulate_grad_batches: int = 1) -> int:
    """Optimizer steps in the run under the mixin's accumulation, for sizing LR schedules.

    Lightning's ``trainer.estimated_stepping_batches`` counts micro-batches in manual
    optimization: with ``accumulate_grad_batches=k`` a schedule sized from it runs k times
    too long. This counts accumulation windows per epoch (the last may be partial) × epochs,
    capped at ``max_steps`` (which alone bounds a run over an iterable of unknown length).
    """
    early = not train_loader_ready(trainer)
    _ = trainer.estimated_stepping_batches  # loads the train dataloader, which sets num_training_batches
    batches = trainer.num_training_batches
    if early:
        drop_early_train_loader(trainer)
    per_epoch = math.ceil(batches / accumulate_grad_batches) if math.isfinite(batches) else math.inf
    total = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
    if trainer.max_steps and trainer.max_steps > 0:
        total = min(total, trainer.max_steps)
    if math.isinf(total):
        raise ValueError("the run has no end: set trainer.max_epochs or trainer.max_steps")
    return max(1, int(total))


def step_schedulers(module: LightningModule, interval: str, count: Optional[int] = None) -> None:
    """Lightning's scheduler rules (interval, frequency, ReduceLROnPlateau monitor) in manual optimization:
    step the schedulers of ``interval`` (``"step"`` or ``"epoch"``) whose ``frequency`` divides ``count``.

    As in Lightning's automatic loop, a ``"step"`` scheduler counts the batches of the current epoch
    (``batch_idx + 1``, micro-batches under accumulation), checked at each optimizer step; an ``"epoch"``
    scheduler counts epochs (``count``).
    """
    trainer = module.trainer
    if count is None:
        count = trainer.fit_loop.epoch_loop.batch_idx + 1
    for config in trainer.lr_scheduler_configs:
        if config.interval != interval or count % config.frequency:
            continue
        metric = None
        if isinstance(config.scheduler, ReduceLROnPlateau):
            monitor, strict = mixin_state(module).monitors.get(id(config.scheduler), (None, True))
            if monitor is None:
                raise MisconfigurationException(
                    f"ReduceLROnPlateau (scheduler #{trainer.lr_scheduler_configs.index(config)}) needs a metric: "
                    'return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}} or '
                    '{"optimizer": opt, "lr_scheduler": sched, "monitor": "val/loss"} from configure_optimizers'
                )
            metric = trainer.callback_metrics.get(monitor)
            if metric is None:
                if strict:
                    raise MisconfigurationException(
                        f"ReduceLROnPlateau conditioned on metric {monitor!r}, which is not available; "
                        f"available metrics are {sorted(trainer.callback_metrics)}"
                    )
                continue
        module.lr_scheduler_step(config.scheduler, metric)
