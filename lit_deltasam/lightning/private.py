"""Every read of a private attribute of Lightning (and of torchmetrics) that lit_deltasam makes, in one place.

Lightning has no public API for these. :func:`check` names any that an upgraded Lightning has dropped
(``tests/test_lightning.py`` runs it), so that an upgrade fails here with a clear message instead of deep inside a
fit.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, cast

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loops.fit_loop import _FitLoop
from lightning.pytorch.loops.optimization.automatic import Closure
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
from lightning.pytorch.trainer.connectors.logger_connector.result import _Metadata, _ResultMetric
from torchmetrics import Metric

USED = {
    _FitLoop: ("_combined_loader",),
    _TrainingEpochLoop: ("_num_ready_batches_reached", "_batches_that_stepped"),
    _LoggerConnector: ("should_update_logs",),
    Closure: ("_result",),
    LightningModule: ("_trainer",),
    Metric: ("_update_count", "_computed", "_forward_cache", "metric_state"),
    _ResultMetric: ("_forward_cache",),
    Trainer: ("_results",),
}
"""The private attributes read here, by the class that holds them (instance attributes are checked on an
instance)."""


def check(trainer: Optional[Trainer] = None) -> None:
    """Raise, naming each private attribute this module reads that the installed Lightning or torchmetrics lacks."""
    if trainer is None:
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    from torchmetrics.aggregation import SumMetric

    holders: dict[type, Any] = {
        _FitLoop: trainer.fit_loop,
        _TrainingEpochLoop: trainer.fit_loop.epoch_loop,
        _LoggerConnector: trainer._logger_connector,
        Closure: Closure(cast(Any, lambda: None)),  # a step function never called: only attributes are read
        LightningModule: LightningModule(),
        Metric: SumMetric(),
        _ResultMetric: _ResultMetric(_Metadata(fx="training_step", name="probe"), is_tensor=True),
        Trainer: trainer,
    }
    missing = [
        f"{cls.__module__}.{cls.__name__}.{name}"
        for cls, names in USED.items()
        for name in names
        if not hasattr(holders[cls], name) and not hasattr(cls, name)
    ]
    if missing:
        import lightning
        import torchmetrics

        raise RuntimeError(
            f"lit_deltasam reads private attributes that lightning {lightning.__version__} / torchmetrics "
            f"{torchmetrics.__version__} no longer have: {', '.join(missing)}. Update "
            "lit_deltasam/lightning/private.py for this version, or install the Lightning version pinned in "
            "pyproject.toml"
        )


def train_loader_ready(trainer: Trainer) -> bool:
    """Whether the fit loop has set up its train loader."""
    return trainer.fit_loop._combined_loader is not None


def drop_early_train_loader(trainer: Trainer) -> None:
    """Drop a train loader set up before the fit started (``trainer.estimated_stepping_batches`` read in
    ``configure_optimizers``), so that the fit sets it up again after a resume's restore. Lightning sets up the
    loader once and loads a checkpoint's position into it only when it sets it up: a loader set up before the restore
    would start the resumed epoch from its first batch (Lightning issue #20550)."""
    if trainer.fit_loop.epoch_loop.batch_progress.total.ready == 0:
        trainer.fit_loop._combined_loader = None


def forget_step_values(trainer: Trainer, names: set[str]) -> None:
    """Drop the values logged under ``names`` at an earlier step of the epoch: Lightning hands a logger, at each
    step, the last value of every key logged so far, so a key this step did not log would repeat an old value
    (``trainer.callback_metrics`` keeps it, as it does for every key)."""
    results = trainer._results
    if results is None:
        return
    for metric in results.values():
        if isinstance(metric, _ResultMetric) and metric.meta.name in names:
            metric._forward_cache = None


def attached_trainer(module: LightningModule) -> Optional[Trainer]:
    """The module's trainer, or ``None`` (``module.trainer`` raises when none is attached)."""
    return module._trainer


def epoch_complete(trainer: Trainer) -> bool:
    """Whether the training epoch ran all its batches (not cut short by ``max_steps``)."""
    return bool(trainer.fit_loop.epoch_loop._num_ready_batches_reached())


def should_update_logs(trainer: Trainer) -> bool:
    """Whether the loggers record this step (``log_every_n_steps``)."""
    return bool(trainer._logger_connector.should_update_logs)


def batches_that_stepped(trainer: Trainer) -> int:
    """The step axis of ``self.log``: batches run, not optimizer steps."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def automatic_closure(closure: Any) -> tuple[Optional[LightningModule], Optional[Closure]]:
    """The LightningModule and the automatic loop's ``Closure`` behind the closure a precision plugin passes to
    ``optimizer.step`` (``partial(plugin._wrap_closure, module, optimizer, closure)``); ``None`` where not found."""
    if not isinstance(closure, functools.partial):
        return None, None
    module = next((a for a in closure.args if isinstance(a, LightningModule)), None)
    inner = next((a for a in closure.args if isinstance(a, Closure)), None)
    return module, inner


def closure_result(closure: Closure) -> Any:
    """What the closure's last call returned from ``training_step`` (the step's ``outputs``)."""
    return closure._result


def set_closure_result(closure: Closure, result: Any) -> None:
    closure._result = result


def metric_snapshot(metric: Metric) -> dict[str, Any]:
    """A torchmetrics metric's accumulated state, to put back with :func:`metric_restore`."""
    states = {
        name: value.clone() if hasattr(value, "clone") else list(value) for name, value in metric.metric_state.items()
    }
    return {
        "states": states,
        "update_count": metric._update_count,
        "computed": metric._computed,
        "forward_cache": metric._forward_cache,
    }


def metric_restore(metric: Metric, saved: dict[str, Any]) -> None:
    for name, value in saved["states"].items():
        setattr(metric, name, value)
    metric._update_count = saved["update_count"]
    metric._computed = saved["computed"]
    metric._forward_cache = saved["forward_cache"]
