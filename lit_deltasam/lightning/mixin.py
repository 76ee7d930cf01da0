"""The Lightning layer: one δ-SAM double step per ``training_step``, in manual optimization.

Everything else stays Lightning's: ``global_step``, loggers, checkpoints, precision
plugins, strategies, validation, test and predict.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Optional, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..config import DeltaSAMConfig
from ..core import DeltaSAM, StepResult
from ..core.batch import Batch
from ..core.distributed import world_size
from ..core.driver import Driver, LoopState
from ..core.schedule import needs_total_steps
from ..core.sharding import is_sharded
from .hooks import (
    Fit,
    mixin_state,
    no_closure,
    overridden,
    remember_plateau_monitors,
    require_clipping,
    require_deltasam_step,
)
from .metrics import log_histograms, reduce_over_ranks, scalars_on
from .private import attached_trainer, epoch_complete, should_update_logs
from .schedulers import optimizer_steps, step_schedulers


def refuse_strategy(strategy: Any) -> None:
    """Name the strategies a double step cannot run under, and what runs instead."""
    if isinstance(strategy, DeepSpeedStrategy):
        raise NotImplementedError(
            f"DeltaSAMMixin does not support {type(strategy).__name__}: DeepSpeed keeps gradients in its own "
            "partitioned buffers; use one of 'auto', 'ddp' or ModelParallelStrategy (FSDP2, fully_shard)"
        )
    if isinstance(strategy, FSDPStrategy):
        raise NotImplementedError(
            "DeltaSAMMixin does not support FSDPStrategy (FSDP1): a double step runs two forwards inside one of "
            "FSDP1's, which fails on the first step with use_orig_params=True (the module's parameters are temporary "
            "views there, not the optimizer's) and with False (FSDP1's state machine refuses it), both seen on a GPU "
            "(docs/results/gpu_check_bert.json); use ModelParallelStrategy with fully_shard (FSDP2, tested)"
        )


def refuse_trainer_flags(trainer: Any) -> None:
    """At fit start, name the ``DeltaSAMConfig`` field for each trainer flag that manual optimization refuses (before
    Lightning's own error, which names none)."""
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return
    clip, accumulate = trainer.gradient_clip_val, trainer.accumulate_grad_batches
    if clip is not None and clip > 0:
        algorithm = getattr(trainer.gradient_clip_algorithm, "value", trainer.gradient_clip_algorithm)  # an enum
        fields = f"gradient_clip_val={clip}" + (f", gradient_clip_algorithm={algorithm!r}" if algorithm else "")
        raise ValueError(
            f"Trainer({fields}) does not apply under DeltaSAMMixin (manual optimization, where Lightning clips "
            f"nothing): remove it from the Trainer and set self.deltasam = DeltaSAMConfig(..., {fields}), which "
            "clips G, never the ascent gradient"
        )
    if accumulate != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={accumulate}) does not apply under DeltaSAMMixin (manual optimization, "
            "where Lightning accumulates nothing): remove it from the Trainer and set self.deltasam = "
            f"DeltaSAMConfig(..., accumulate_grad_batches={accumulate})"
        )


def note_precision(trainer: Any) -> None:
    """Say once per fit what runs where Lightning changed the precision asked for: ``precision="16-mixed"`` on the
    CPU runs bfloat16 autocast without a loss scaler."""
    plugin = trainer.precision_plugin
    if isinstance(plugin, MixedPrecision) and plugin.device == "cpu" and plugin.precision == "bf16-mixed":
        rank_zero_info(
            "DeltaSAMMixin: precision bf16-mixed on the CPU: bfloat16 autocast, no loss scaler (Lightning runs "
            "precision='16-mixed' so on the CPU). For float16 with a GradScaler on the CPU pass "
            "plugins=[MixedPrecision('16-mixed', 'cpu', torch.amp.GradScaler('cpu'))]"
        )


class DeltaSAMMixin:
    """Sharpness-aware training for a LightningModule: ``class M(DeltaSAMMixin, L.LightningModule)``.

    The user's module:

    * sets ``self.deltasam = DeltaSAMConfig(...)`` (or a mapping of its fields);
    * implements :meth:`per_sample_loss`, returning one loss per instance, shape ``[n]``;
    * returns one plain torch optimizer (and optionally LR schedulers) from
      ``configure_optimizers``.

    The mixin owns ``training_step``. Gradient clipping and accumulation come from
    ``DeltaSAMConfig`` because Lightning rejects the trainer flags in manual
    optimization. If you override ``on_before_optimizer_step``, ``on_train_epoch_end``,
    ``on_save_checkpoint`` or ``on_load_checkpoint``, call ``super()``.
    ``on_before_backward``/``on_after_backward`` fire for both backward passes of a
    step; the second runs at the perturbed point.

    Example:
        >>> class Classifier(DeltaSAMMixin, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = nn.Linear(16, 4)
        ...         self.deltasam = DeltaSAMConfig(method="deltasam", rho=0.05, beta=-1.0)
        ...     def per_sample_loss(self, batch):
        ...         x, y = batch
        ...         return F.cross_entropy(self.net(x), y, reduction="none")
        ...     def configure_optimizers(self):
        ...         return torch.optim.AdamW(self.parameters(), lr=1e-3)
    """

    deltasam: DeltaSAMConfig

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if LightningModule in mro and mro.index(LightningModule) < mro.index(DeltaSAMMixin):
            raise TypeError(
                f"class {cls.__name__}: DeltaSAMMixin must come before LightningModule in the bases, "
                f"class {cls.__name__}(DeltaSAMMixin, L.LightningModule), or LightningModule's own training_step "
                "and automatic optimization shadow the mixin's"
            )
        configure = getattr(cls, "configure_optimizers", None)
        if configure is not None and not getattr(configure, "_deltasam_wrapped", False):
            cls.configure_optimizers = remember_plateau_monitors(configure)  # type: ignore[attr-defined]
        hook = cls.on_before_optimizer_step
        if hook is not DeltaSAMMixin.on_before_optimizer_step and not getattr(hook, "_deltasam_wrapped", False):
            cls.on_before_optimizer_step = require_clipping(hook)  # type: ignore[method-assign]
        step = cls.training_step
        if step is not DeltaSAMMixin.training_step and not getattr(step, "_deltasam_wrapped", False):
            cls.training_step = require_deltasam_step(step)  # type: ignore[method-assign]

    @property
    def _deltasam_module(self) -> LightningModule:
        """``self`` as the LightningModule it is mixed into (the one cast of the mixin)."""
        return cast(LightningModule, self)

    @property
    def automatic_optimization(self) -> bool:
        # Lightning reads this first when it checks a fit's trainer flags: refuse them here, naming our own field
        refuse_trainer_flags(attached_trainer(self._deltasam_module))
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError("DeltaSAMMixin runs manual optimization; automatic_optimization cannot be set to True")

    def per_sample_loss(self, batch: Batch) -> Tensor:
        """Per-instance losses of ``batch``, shape ``[n]`` (e.g. ``reduction="none"``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample_loss(self, batch) -> Tensor[n]")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self.deltasam_step(batch).loss

    def deltasam_step(self, batch: Batch) -> StepResult:
        """Run one micro-batch of the double step; step the optimizer at the end of each accumulation window."""
        mixin_state(self).step_called = True
        module = self._deltasam_module
        cfg = self._deltasam_config()
        optimizer = module.optimizers()
        if isinstance(optimizer, list):
            raise ValueError(
                f"DeltaSAMMixin drives exactly one optimizer; configure_optimizers returned {len(optimizer)}"
            )
        driver = self._deltasam_driver(cfg)
        self._deltasam_catch_up_epochs()
        state = self._deltasam_state
        trainer = module.trainer
        last = driver.window_ends(trainer.is_last_batch)
        if state.base_seed is None:
            # without seed_everything the ranks' initial seeds differ; a checkpoint keeps rank 0's
            state.base_seed = trainer.strategy.broadcast(int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())))
        result = driver.drive(
            self.per_sample_loss,
            batch,
            step=module.global_step,
            last=last,
            optimizer_step=lambda: self._deltasam_optimizer_step(optimizer),
            zero_grad=lambda: self._deltasam_zero_grad(optimizer),
            backward=module.manual_backward,
            no_sync=getattr(trainer.strategy, "block_backward_sync", nullcontext),
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            rank=module.global_rank,
            total_steps=self._deltasam_total_steps(cfg),
            schedulers=[c.scheduler for c in trainer.lr_scheduler_configs],
        )
        if result.stepped:
            step_schedulers(module, "step")
        self._deltasam_log(cfg, result, last)
        return result

    def _deltasam_total_steps(self, cfg: DeltaSAMConfig) -> Optional[int]:
        """The run's optimizer steps, where ρ's schedule is a fraction of them."""
        trainer = self._deltasam_module.trainer
        return optimizer_steps(trainer, cfg.accumulate_grad_batches) if needs_total_steps(cfg) else None

    def deltasam_rho(self, cfg: Optional[DeltaSAMConfig] = None) -> float:
        """ρ of the next optimizer step under ``rho_schedule`` (the same on every rank, and after a resume)."""
        module = self._deltasam_module
        cfg = cfg or self._deltasam_config()
        schedulers = [c.scheduler for c in module.trainer.lr_scheduler_configs]
        schedule = self._deltasam_driver(cfg).schedule
        return schedule.scheduled(module.global_step, self._deltasam_total_steps(cfg), schedulers)

    def _deltasam_optimizer_step(self, optimizer: Any) -> bool:
        """The base optimizer's step through the ``optimizer_step`` hook, so that an override (Lightning's LR
        warm-up recipe) runs as in automatic optimization; clipping happens in ``on_before_optimizer_step``,
        after a loss scaler unscales."""
        module = self._deltasam_module
        before = module.global_step
        module.optimizer_step(module.current_epoch, module.trainer.fit_loop.epoch_loop.batch_idx, optimizer, no_closure)
        if module.global_step == before:
            raise RuntimeError(
                f"{type(self).__name__}.optimizer_step returned without stepping the optimizer: call "
                "optimizer.step(closure=optimizer_closure) in it; the weights are unchanged"
            )
        return True

    def _deltasam_zero_grad(self, optimizer: Any) -> None:
        """Zero through ``optimizer_zero_grad``, which a user may override."""
        module = self._deltasam_module
        module.optimizer_zero_grad(module.current_epoch, module.trainer.fit_loop.epoch_loop.batch_idx, optimizer)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Clip G here: Lightning calls it inside the optimizer step, after a loss scaler has unscaled G."""
        super().on_before_optimizer_step(optimizer)  # type: ignore[misc]
        cfg = self._deltasam_config()
        module = self._deltasam_module
        if cfg.gradient_clip_val is not None or overridden(module, "configure_gradient_clipping"):
            # the hook Lightning's automatic loop calls here, with the values from DeltaSAMConfig
            module.configure_gradient_clipping(optimizer, cfg.gradient_clip_val, cfg.gradient_clip_algorithm)
            mixin_state(self).clipped = True

    def on_validation_model_zero_grad(self) -> None:
        """Keep the gradients of an open accumulation window through validation.

        Lightning zeroes them before validation unless it is accumulating, and in manual
        optimization it never knows that it is: the window would lose its micro-batches so far.
        """
        if self._deltasam_fit.loop.micro == 0:
            super().on_validation_model_zero_grad()  # type: ignore[misc]

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # type: ignore[misc]
        self._deltasam_epoch_end()

    def _deltasam_epoch_end(self) -> None:
        module = self._deltasam_module
        state = self._deltasam_state
        if state.epochs_scheduled <= module.current_epoch:
            state.epochs_scheduled = module.current_epoch + 1
            # as Lightning's fit loop: an epoch cut short (by max_steps) does not step the epoch schedulers
            if epoch_complete(module.trainer):
                step_schedulers(module, "epoch", state.epochs_scheduled)

    def _deltasam_catch_up_epochs(self) -> None:
        """Step the epoch schedulers of epochs whose end hook was overridden without ``super()``."""
        module = self._deltasam_module
        state = self._deltasam_state
        while state.epochs_scheduled < module.current_epoch:
            warnings.warn(
                "on_train_epoch_end was overridden without calling super(); DeltaSAMMixin steps the epoch-interval "
                "LR schedulers late, at the next epoch's first batch",
                RuntimeWarning,
                stacklevel=3,
            )
            state.epochs_scheduled += 1
            step_schedulers(module, "epoch", state.epochs_scheduled)

    def _deltasam_log(self, cfg: DeltaSAMConfig, result: StepResult, last: bool) -> None:
        module = self._deltasam_module
        state = self._deltasam_state
        if world_size() > 1 and not should_update_logs(module.trainer):
            return  # the diagnostics' all-gather runs on the steps the loggers record (log_every_n_steps)
        means: dict[str, Tensor] = {"train/loss": result.loss}
        host = {"sam/steps_skipped": float(state.steps_skipped)}
        if cfg.perturbs:
            host["sam/rho"] = result.rho
            skipped = state.perturbation_skipped
            if isinstance(skipped, Tensor):  # counted on the device
                means["sam/perturbation_skipped"] = skipped / max(state.perturbing, 1)
            else:
                host["sam/perturbation_skipped"] = skipped / max(state.perturbing, 1)
        if cfg.perturbs and cfg.interval > 1:
            host["sam/full_step"] = float(result.full_step)
        moved = scalars_on(result.losses.device, host)
        for name in ("sam/rho", "sam/full_step"):
            if name in moved:
                module.log(name, moved.pop(name), on_step=True, on_epoch=False)
        means.update(moved)
        maxima: dict[str, Tensor] = {}
        if result.perturbed_losses is not None:
            means["sam/perturbed_loss"] = result.perturbed_loss  # type: ignore[assignment]
            means["sam/sharpness"] = result.sharpness  # type: ignore[assignment]
        if result.grad_norm is not None and result.eps_norm is not None:
            means["sam/grad_norm"] = result.grad_norm
            means["sam/eps_norm"] = result.eps_norm
        if cfg.reweights and result.weights is not None:
            means["sam/ess"] = result.effective_sample_size  # type: ignore[assignment]
            maxima["sam/max_weight"] = result.max_weight  # type: ignore[assignment]
        if result.update_norm is not None:
            means["sam/update_norm"] = result.update_norm
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        state = self._deltasam_state
        saved: dict[str, Any] = {"state": state.scalars()}
        cached = self._deltasam_fit.driver
        if state.micro and cached is not None:
            saved["grads"] = self._deltasam_partial_grads(cached[2].engine)
            if state.plain_sum is not None:
                plain = state.plain_over_ranks([g.detach().clone() for g in state.plain_sum])
                saved["plain"] = [g.cpu() for g in plain]
        if state.reuse_direction is not None:
            saved["reuse"] = [d.detach().cpu() for d in state.reuse_direction]
        checkpoint["deltasam"] = saved

    def _deltasam_partial_grads(self, engine: DeltaSAM) -> list[Tensor]:
        """The gradients accumulated so far in this window, summed over ranks (DDP has not synchronized them yet).

        On resume rank 0 takes the sum and the others start from zero, so the window's
        final all-reduce averages the same total (up to the order of the additions).
        """
        if any(is_sharded(p) for p in engine.params):
            raise RuntimeError(
                f"cannot checkpoint inside a gradient accumulation window under FSDP (micro-batch "
                f"{self._deltasam_state.micro} of {engine.config.accumulate_grad_batches}): the partial gradients are "
                "sharded and already reduced; checkpoint at optimizer steps, e.g. "
                "ModelCheckpoint(every_n_train_steps=...)"
            )
        grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in engine.params]
        if world_size() > 1:
            for grad in grads:
                torch.distributed.all_reduce(grad, op=torch.distributed.ReduceOp.SUM)
        return [grad.cpu() for grad in grads]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        saved = checkpoint.get("deltasam")
        if saved is None:
            warnings.warn(
                "the checkpoint holds no DeltaSAMMixin state (was on_save_checkpoint overridden without super()?); "
                "the resumed run will not repeat the original's random draws",
                RuntimeWarning,
                stacklevel=2,
            )
        module = self._deltasam_module
        self._deltasam_forget()
        trainer = attached_trainer(module)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return  # load_from_checkpoint, validate, test: the next fit starts a new loop state
        if saved is None:
            # "processed" counts epochs whose end hook ran; checkpoints are saved after it
            progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
            state = LoopState(epochs_scheduled=progress.get("current", {}).get("processed", checkpoint.get("epoch", 0)))
        else:
            state = LoopState.from_scalars(saved["state"])
            state.reuse_direction = saved.get("reuse")
            plain = saved.get("plain")
            if plain is not None and not state.plain_synced and module.global_rank != 0:
                plain = [torch.zeros_like(g) for g in plain]  # rank 0 carries the sum over ranks
            state.plain_sum = plain
        pending = saved.get("grads") if saved is not None else None
        mixin_state(self).fit = Fit(trainer=weakref.ref(trainer), loop=state, pending_grads=pending)

    def _deltasam_forget(self) -> None:
        """Drop the fit's state: loop state, engine and any gradients an open accumulation window left."""
        module = self._deltasam_module
        holder = mixin_state(self)
        if holder.fit is not None and holder.fit.loop.micro:
            for p in module.parameters():
                p.grad = None
        holder.fit = None

    @property
    def _deltasam_fit(self) -> Fit:
        """The current fit's state: loaded from a checkpoint, carried on by the same trainer, or new."""
        module = self._deltasam_module
        trainer = attached_trainer(module)
        holder = mixin_state(self)
        fit = holder.fit
        if fit is not None and trainer is not None and fit.trainer is not None and fit.trainer() is not trainer:
            self._deltasam_forget()
            fit = None
        if fit is None:
            fit = holder.fit = Fit()
        if fit.trainer is None and trainer is not None:
            fit.trainer = weakref.ref(trainer)
        return fit

    @property
    def _deltasam_state(self) -> LoopState:
        return self._deltasam_fit.loop

    def _deltasam_config(self) -> DeltaSAMConfig:
        cfg = getattr(self, "deltasam", None)
        if not isinstance(cfg, (DeltaSAMConfig, Mapping)):
            raise TypeError(
                f"{type(self).__name__}.deltasam must be a DeltaSAMConfig (set self.deltasam = DeltaSAMConfig(...) in "
                f"__init__), got {type(cfg).__name__}"
            )
        if isinstance(cfg, Mapping):
            self.deltasam = cfg = DeltaSAMConfig.coerce(cfg)
        return cfg

    def _deltasam_driver(self, cfg: DeltaSAMConfig) -> Driver:
        module = self._deltasam_module
        refuse_strategy(module.trainer.strategy)
        optimizer = cast(torch.optim.Optimizer, module.optimizers(use_pl_optimizer=False))
        fit = self._deltasam_fit
        cached = fit.driver
        if cached is not None and cached[0] is optimizer and cached[1] == cfg:
            return cached[2]
        if fit.driver is None:
            note_precision(module.trainer)
        driver = Driver(module, optimizer, cfg, fit.loop)
        pending, fit.pending_grads = fit.pending_grads, None
        if pending is not None:
            for p, g in zip(driver.engine.params, pending):
                g = g.to(device=p.device, dtype=p.dtype)
                p.grad = g if module.global_rank == 0 else torch.zeros_like(g)
        fit.driver = (optimizer, cfg, driver)
        return driver
