"""Periodic sharpness probes on a fixed held-out batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional, cast

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from ..config import PER_INSTANCE_IMPLS, DeltaSAMConfig
from ..core.batch import Batch, LossFn, slice_batch
from ..core.diagnostics import fidelity, top_hessian_eigenvalue
from ..core.sharding import is_sharded
from .metrics import logging_step

if TYPE_CHECKING:
    from .mixin import DeltaSAMMixin


def _running_means(
    pl_module: L.LightningModule, configs: Mapping[str, DeltaSAMConfig], params: Sequence[Tensor]
) -> dict[str, Sequence[Tensor]]:
    """Friendly-SAM's running mean where the module trains with it: the loop's, for each Friendly-SAM config probed
    (zeros for a parameter the optimizer does not hold or that has none yet)."""
    mixin = cast("DeltaSAMMixin", pl_module)
    own, momentum, cached = mixin._deltasam_config(), mixin._deltasam_state.fsam_momentum, mixin._deltasam_fit.driver
    if own.method != "fsam" or momentum is None or cached is None:
        return {}
    held = {id(p): m for p, m in zip(cached[2].engine.params, momentum)}
    mean = [torch.zeros_like(p) if (m := held.get(id(p))) is None else m.to(p.device, p.dtype) for p in params]
    return {name: mean for name, cfg in configs.items() if cfg.method == "fsam"}


class SharpnessProbe(Callback):
    """Every ``every_n_steps`` optimizer steps, probe the model on one fixed validation batch.

    Logs ``probe/cos_<name>``, the cosine between method ``name``'s sharpness
    correction and per-instance SAM's (``C_X = G_X - ḡ``, of one full step: GSAM's descent,
    WSAM's term and, where the module trains with Friendly-SAM, the loop's running mean included), and
    ``probe/hessian_top_eig``, the top Hessian eigenvalue. The module runs in eval
    mode during the probe (no dropout noise) and every submodule goes back to its own
    mode afterwards; weights, buffers and gradients are left untouched. Probes run on
    rank 0 only, each method with a local ascent, so the metrics are for logging: a
    callback that monitors them would decide differently per rank. Under FSDP the
    callback refuses to start.

    Args:
        every_n_steps: probe period in optimizer steps.
        batch_size: instances in the held-out batch (the first ones of the first
            validation batch).
        methods: name → config of each method to compare; by default SAM and the
            module's own ``deltasam`` config (SAM alone under ERM, which has no correction to compare).
        hessian_iters: power iterations; 0 disables the eigenvalue.
        per_instance_impl: how the oracle computes per-instance SAM (``loop`` works for any model).
        seed: seeds the power iteration's starting vector.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        batch_size: int = 16,
        methods: Optional[Mapping[str, Any]] = None,
        hessian_iters: int = 20,
        per_instance_impl: str = "loop",
        seed: int = 0,
    ) -> None:
        for name, value, low in (
            ("every_n_steps", every_n_steps, 1),
            ("batch_size", batch_size, 1),
            ("hessian_iters", hessian_iters, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"SharpnessProbe.{name}={value!r} is not valid; it must be an integer >= {low}")
        if per_instance_impl not in PER_INSTANCE_IMPLS:
            raise ValueError(
                f"SharpnessProbe.per_instance_impl={per_instance_impl!r} is not valid; choose one of "
                f"{list(PER_INSTANCE_IMPLS)}"
            )
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.methods = dict(methods) if methods is not None else None
        self.hessian_iters = hessian_iters
        self.per_instance_impl = per_instance_impl
        self.seed = seed
        self._batch: Optional[Batch] = None
        self._last_step = -1

    def _held_out(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Batch:
        if self._batch is None:
            loaders = trainer.val_dataloaders
            if loaders is None:
                raise RuntimeError("SharpnessProbe needs a validation dataloader to draw its held-out batch from")
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            batch = next(iter(loader))
            self._batch = slice_batch(batch, slice(0, self.batch_size))
        return pl_module.transfer_batch_to_device(self._batch, pl_module.device, 0)

    def _configs(self, pl_module: L.LightningModule) -> dict[str, DeltaSAMConfig]:
        """The methods to compare; a probe is a computation on one rank, so every ascent is local."""
        own = cast("DeltaSAMMixin", pl_module)._deltasam_config()  # the probe runs on the mixin's modules
        methods = self.methods
        if methods is None:  # ERM makes no sharpness correction to compare: its cosine would be a constant 0
            methods = {"sam": DeltaSAMConfig(method="sam", rho=own.rho), **({own.method: own} if own.perturbs else {})}
        return {name: DeltaSAMConfig.coerce(cfg).replace(ascent="local") for name, cfg in methods.items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy) or any(is_sharded(p) for p in pl_module.parameters()):
            raise NotImplementedError(
                "SharpnessProbe runs on rank 0 alone and needs whole parameters; it is not available under FSDP"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self._probe(trainer, pl_module)

    @rank_zero_only
    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch = self._held_out(trainer, pl_module)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        loss_fn = cast(LossFn, pl_module.per_sample_loss)
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.enable_grad():
                configs = self._configs(pl_module)
                cosines = fidelity(
                    pl_module,
                    loss_fn,
                    batch,
                    configs,
                    params,
                    impl=self.per_instance_impl,
                    running_means=_running_means(pl_module, configs, params),
                )
                metrics = {f"probe/cos_{name}": value for name, value in cosines.items()}
                if self.hessian_iters:
                    generator = torch.Generator().manual_seed(self.seed)
                    metrics["probe/hessian_top_eig"] = top_hessian_eigenvalue(
                        pl_module, loss_fn, batch, params, iters=self.hessian_iters, generator=generator
                    )
        finally:
            for m, mode in modes.items():
                m.training = mode
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=logging_step(trainer))
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
