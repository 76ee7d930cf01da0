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
from typing import TYPE_CHECKING, Any, Optional, cast

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ..config import DeltaSAMConfig
from ..core import StepResult
from ..core.batch import Batch
from ..core.driver import Driver, LoopState
from ..core.loop import DeltaSAMOptimizer
from ..core.schedule import needs_total_steps
from .checkpoint import forget, load_state, save_state
from .hooks import (
    Fit,
    is_wrapped,
    mixin_state,
    no_closure,
    overridden,
    refuse_unread_clipping,
    remember_plateau_monitors,
    require_clipping,
    require_deltasam_step,
)
from .metrics import log_step
from .private import attached_trainer, epoch_complete
from .schedulers import optimizer_steps, step_schedulers

if TYPE_CHECKING:
    _Base = LightningModule  # what the mixin is mixed into: super()'s hooks are LightningModule's
else:
    _Base = object  # at run time LightningModule comes after the mixin in the user's bases


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


class DeltaSAMMixin(_Base):
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
        wrappers = (
            ("configure_optimizers", remember_plateau_monitors),
            ("on_before_optimizer_step", require_clipping),
            ("training_step", require_deltasam_step),
        )
        for name, wrapper in wrappers:
            # the user's own method (or, for configure_optimizers, any), wrapped once
            method = getattr(cls, name, None)
            if method is not None and method is not getattr(DeltaSAMMixin, name, None) and not is_wrapped(method):
                setattr(cls, name, wrapper(method))

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
        log_step(module, self._deltasam_state, cfg, result, last)
        return result

    def _deltasam_total_steps(self, cfg: DeltaSAMConfig) -> Optional[int]:
        """The run's optimizer steps, where ρ's schedule is a fraction of them or the adaptive policy's threshold
        moves over them."""
        trainer = self._deltasam_module.trainer
        needed = needs_total_steps(cfg) or cfg.policy is not None
        return optimizer_steps(trainer, cfg.accumulate_grad_batches) if needed else None

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
        super().on_before_optimizer_step(optimizer)
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
            super().on_validation_model_zero_grad()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        save_state(self._deltasam_fit, checkpoint, self._deltasam_config())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        load_state(self._deltasam_module, checkpoint, self._deltasam_config())

    @property
    def _deltasam_fit(self) -> Fit:
        """The current fit's state: loaded from a checkpoint, carried on by the same trainer, or new."""
        module = self._deltasam_module
        trainer = attached_trainer(module)
        holder = mixin_state(self)
        fit = holder.fit
        if fit is not None and trainer is not None and fit.trainer is not None and fit.trainer() is not trainer:
            forget(module)
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
        refuse_unread_clipping(module, cfg)
        optimizer = cast(torch.optim.Optimizer, module.optimizers(use_pl_optimizer=False))
        if isinstance(optimizer, DeltaSAMOptimizer):
            raise TypeError(
                f"{type(self).__name__}.configure_optimizers returned a DeltaSAMOptimizer, but DeltaSAMMixin runs the "
                "sharpness-aware step itself: return its base optimizer (e.g. torch.optim.AdamW(self.parameters())) "
                "and set the method in self.deltasam; or drop DeltaSAMMixin and return the DeltaSAMOptimizer under "
                "automatic optimization"
            )
        fit = self._deltasam_fit
        cached = fit.driver
        if cached is not None and cached[0] is optimizer and cached[1] == cfg:
            return cached[2]
        if fit.driver is None:
            note_precision(module.trainer)
        driver = Driver(module, optimizer, cfg, fit.loop)
        pending, fit.pending_grads = fit.pending_grads, None
        driver.restore_params(fit.pending_params, pending)
        fit.pending_params = None
        if pending is not None:
            for p, g in zip(driver.engine.params, pending):
                g = g.to(device=p.device, dtype=p.dtype)
                p.grad = g if module.global_rank == 0 else torch.zeros_like(g)
        fit.driver = (optimizer, cfg, driver)
        return driver
