"""Diagnostics across ranks and into whichever loggers the trainer has."""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from ..core.distributed import gather_instances, world_size
from .private import batches_that_stepped


def reduce_over_ranks(means: dict[str, Tensor], maxima: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Average ``means`` and take the max of ``maxima`` over ranks, in one all-gather."""
    names = [*means, *maxima]
    values = torch.stack(
        [
            torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())
            for v in [*means.values(), *maxima.values()]
        ]
    )
    if world_size() > 1:
        gathered = [torch.empty_like(values) for _ in range(world_size())]
        torch.distributed.all_gather(gathered, values)
        stacked = torch.stack(gathered)
        values = torch.cat([stacked[:, : len(means)].mean(0), stacked[:, len(means) :].amax(0)])
    return dict(zip(names, values.unbind()))


def scalars_on(device: torch.device, values: dict[str, float]) -> dict[str, Tensor]:
    """Python numbers as 0-d float32 tensors on ``device``, in one copy; on a GPU from pinned memory and without
    waiting (a blocking copy would stall the host until the queued kernels ran)."""
    stacked = torch.tensor(list(values.values()), dtype=torch.float32)
    if device.type == "cuda":
        stacked = stacked.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        stacked = stacked.to(device)
    return dict(zip(values, stacked.unbind()))


def log_histograms(module: LightningModule, values: dict[str, Optional[Tensor]]) -> None:
    """Gather per-instance values from every rank and log them as histograms (W&B, TensorBoard)."""
    gathered = {name: gather_instances(v.detach().float())[0].cpu() for name, v in values.items() if v is not None}
    if module.global_rank != 0:
        return
    step = logging_step(module.trainer)
    for logger in module.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            histograms = {name: wandb.Histogram(v.numpy()) for name, v in gathered.items()}  # type: ignore[arg-type]
            logger.experiment.log(histograms | {"trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            for name, v in gathered.items():
                logger.experiment.add_histogram(name, v, step)


def logging_step(trainer: Any) -> int:
    """The step axis of ``self.log`` (and of Lightning's own callbacks): batches run, not optimizer steps."""
    return batches_that_stepped(trainer)
