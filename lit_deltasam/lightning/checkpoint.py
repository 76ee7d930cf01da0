"""The mixin's part of a Lightning checkpoint: the loop state, an open accumulation window's gradients, the
reused LookSAM direction; and what a resume or a new fit drops."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from ..config import DeltaSAMConfig
from ..core import DeltaSAM
from ..core.distributed import world_size
from ..core.driver import LOOP_SHAPE, LoopState, refuse_other_shape
from ..core.sharding import is_sharded
from .hooks import Fit, mixin_state
from .private import attached_trainer


def save_state(fit: Fit, checkpoint: dict[str, Any], config: DeltaSAMConfig) -> None:
    """Write the fit's loop state (and an open window's partial gradients) under ``checkpoint["deltasam"]``, with
    the fields of ``config`` it depends on."""
    state, cached = fit.loop, fit.driver
    positions = cached[2].saved_params() if cached is not None else fit.pending_params
    saved: dict[str, Any] = {"state": state.scalars(), "config": {k: getattr(config, k) for k in LOOP_SHAPE}}
    if positions is not None:
        saved["window_params"] = positions
    if state.micro and cached is not None:
        saved["grads"] = partial_grads(state, cached[2].engine)
        if state.plain_sum is not None:
            plain = state.plain_over_ranks([g.detach().clone() for g in state.plain_sum])
            saved["plain"] = [g.cpu() for g in plain]
    if state.reuse_direction is not None:
        saved["reuse"] = [d.detach().cpu() for d in state.reuse_direction]
    if state.fsam_momentum is not None:
        saved["momentum"] = [None if m is None else m.detach().cpu() for m in state.fsam_momentum]
    checkpoint["deltasam"] = saved


def partial_grads(state: LoopState, engine: DeltaSAM) -> list[Tensor]:
    """The gradients accumulated so far in this window, summed over ranks (DDP has not synchronized them yet).

    On resume rank 0 takes the sum and the others start from zero, so the window's
    final all-reduce averages the same total (up to the order of the additions).
    """
    if any(is_sharded(p) for p in engine.params):
        raise RuntimeError(
            f"cannot checkpoint inside a gradient accumulation window under FSDP (micro-batch "
            f"{state.micro} of {engine.config.accumulate_grad_batches}): the partial gradients are "
            "sharded and already reduced; checkpoint at optimizer steps, e.g. "
            "ModelCheckpoint(every_n_train_steps=...)"
        )
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in engine.params]
    if world_size() > 1:
        for grad in grads:
            torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
    return [grad.cpu() for grad in grads]


def load_state(module: LightningModule, checkpoint: dict[str, Any], config: DeltaSAMConfig) -> None:
    """Drop the module's fit, and under a fitting trainer start the next one from ``checkpoint``'s loop state
    (refused where ``config`` differs in a field the state depends on)."""
    saved = checkpoint.get("deltasam")
    if saved is None:
        warnings.warn(
            "the checkpoint holds no DeltaSAMMixin state (was on_save_checkpoint overridden without super()?); "
            "the resumed run will not repeat the original's random draws",
            RuntimeWarning,
            stacklevel=3,  # the caller of on_load_checkpoint
        )
    forget(module)
    trainer = attached_trainer(module)
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return  # load_from_checkpoint, validate, test: the next fit starts a new loop state
    refuse_epoch_end_resume(trainer, checkpoint)
    if saved is not None:
        refuse_other_shape(saved.get("config", {}), config, "resuming from this checkpoint")
    if saved is None:
        # "processed" counts epochs whose end hook ran; checkpoints are saved after it
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
        state = LoopState(epochs_scheduled=progress.get("current", {}).get("processed", checkpoint.get("epoch", 0)))
    else:
        state = LoopState.from_scalars(saved["state"])
        state.reuse_direction = saved.get("reuse")
        state.fsam_momentum = saved.get("momentum")
        plain = saved.get("plain")
        if plain is not None and not state.plain_synced and module.global_rank != 0:
            plain = [torch.zeros_like(g) for g in plain]  # rank 0 carries the sum over ranks
        state.plain_sum = plain
    pending = saved.get("grads") if saved is not None else None
    positions = saved.get("window_params") if saved is not None else None
    mixin_state(module).fit = Fit(
        trainer=weakref.ref(trainer), loop=state, pending_grads=pending, pending_params=positions
    )


def refuse_epoch_end_resume(trainer: Any, checkpoint: dict[str, Any]) -> None:
    """A checkpoint saved at an epoch's end, resumed with ``max_steps`` set: Lightning starts the next epoch with the
    saved epoch's batches counted as done and ends it at once, so that epoch is skipped untrained (seen with
    Lightning 2.6; with ``max_steps=-1`` the same checkpoint resumes exactly)."""
    if trainer.max_steps in (None, -1):
        return
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    if progress and progress.get("ready", 0) == progress.get("processed", 0) > progress.get("completed", 0):
        epoch = checkpoint.get("epoch", progress["processed"] - 1)
        raise ValueError(
            f"this checkpoint was saved at the end of epoch {epoch} (global_step {checkpoint.get('global_step')}); "
            f"resumed with trainer.max_steps={trainer.max_steps}, Lightning would skip epoch {epoch + 1} without "
            "training it. Resume with trainer.max_steps=-1 (max_epochs bounds the run), or from a checkpoint saved "
            "inside an epoch"
        )


def forget(module: LightningModule) -> None:
    """Drop the fit's state: loop state, engine and any gradients an open accumulation window left."""
    holder = mixin_state(module)
    if holder.fit is not None and holder.fit.loop.micro:
        for p in module.parameters():
            p.grad = None
    holder.fit = None
