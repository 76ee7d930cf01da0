"""Diagnostics across ranks and into whichever loggers the trainer has."""

from __future__ import annotations

from typing import Any, Optional, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from ..config import DeltaSAMConfig
from ..core.distributed import gather_instances, world_size
from ..core.driver import LoopState
from ..core.result import StepResult
from .private import batches_that_stepped, forget_step_values, should_update_logs


def log_step(module: LightningModule, state: LoopState, cfg: DeltaSAMConfig, result: StepResult, last: bool) -> None:
    """Log a micro-batch's diagnostics: ρ and the full-step flag as they are, the rest averaged (the maximum weight
    maximized) over ranks; the histograms at the end of a window, every ``histogram_every_n_steps``."""
    if world_size() > 1 and not should_update_logs(module.trainer):
        return  # the diagnostics' all-gather runs on the steps the loggers record (log_every_n_steps)
    per_step, means, maxima = step_metrics(state, cfg, result)
    # a key not logged at this step would reach the loggers with its last full step's value
    forget_step_values(module.trainer, FULL_STEP_ONLY - {*means, *maxima})
    for name, value in per_step.items():
        module.log(name, value, on_step=True, on_epoch=False)
    metrics = reduce_over_ranks(means, maxima, device=result.losses.device)
    loss = metrics.pop("train/loss")
    module.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
    module.log_dict(metrics, on_step=True, on_epoch=False)
    every = cfg.histogram_every_n_steps
    if last and every and module.global_step % every == 0 and result.perturbed_losses is not None:
        histograms = {"sam/loss_change": result.loss_change}
        if cfg.reweights:
            histograms["sam/lambda"] = result.weights
        log_histograms(module, histograms)


def step_metrics(
    state: LoopState, cfg: DeltaSAMConfig, result: StepResult
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """A step's diagnostics on its device: (logged per step as they are, averaged over ranks, maximized over ranks)."""
    means: dict[str, Tensor] = {"train/loss": result.loss}
    host = {"sam/steps_skipped": float(state.steps_skipped)}
    if cfg.perturbs:
        host["sam/rho"] = result.rho
        skipped = state.perturbation_skipped
        if isinstance(skipped, Tensor):  # counted on the device
            means["sam/perturbation_skipped"] = skipped / max(state.perturbing, 1)
        else:
            host["sam/perturbation_skipped"] = skipped / max(state.perturbing, 1)
    if cfg.perturbs and (cfg.interval > 1 or cfg.policy is not None):
        host["sam/full_step"] = float(result.full_step)
    if cfg.policy is not None:  # the running fraction of the micro-batches the policy gave a full step
        host["sam/full_fraction"] = state.policy_full / max(state.policy_decided, 1)
    moved = scalars_on(result.losses.device, host)
    per_step: dict[str, Tensor] = {name: moved.pop(name) for name in ("sam/rho", "sam/full_step") if name in moved}
    means.update(moved)
    maxima: dict[str, Tensor] = {}
    perturbed, sharpness = result.perturbed_loss, result.sharpness
    if perturbed is not None and sharpness is not None:
        means["sam/perturbed_loss"] = perturbed
        means["sam/sharpness"] = sharpness
    if result.grad_norm is not None and result.eps_norm is not None:
        means["sam/grad_norm"] = result.grad_norm
        means["sam/eps_norm"] = result.eps_norm
    if cfg.reweights and result.weights is not None:
        ess, max_weight = result.effective_sample_size, result.max_weight
        if ess is not None and max_weight is not None:
            means["sam/ess"] = ess
            maxima["sam/max_weight"] = max_weight
    if result.update_norm is not None:
        means["sam/update_norm"] = result.update_norm
    for name, value in result.extras.items():  # what a method adds: GSAM's ||g_perp||, F-SAM's removed component
        means[f"sam/{name}"] = value
    return per_step, means, maxima


FULL_STEP_ONLY = {
    "sam/perturbed_loss",
    "sam/sharpness",
    "sam/grad_norm",
    "sam/eps_norm",
    "sam/ess",
    "sam/max_weight",
    "sam/gsam_perp_norm",
    "sam/fsam_removed_norm",
}
"""The diagnostics that a plain step (``interval``, LookSAM, the policy, ρ = 0) may not measure."""


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

            # wandb annotates Histogram's sequence as a Python sequence; it takes (and documents) numpy arrays
            histograms = {name: wandb.Histogram(cast(Any, v.numpy())) for name, v in gathered.items()}
            logger.experiment.log(histograms | {"trainer/global_step": step})
        elif isinstance(logger, TensorBoardLogger):
            for name, v in gathered.items():
                logger.experiment.add_histogram(name, v, step)


def logging_step(trainer: Any) -> int:
    """The step axis of ``self.log`` (and of Lightning's own callbacks): batches run, not optimizer steps."""
    return batches_that_stepped(trainer)
