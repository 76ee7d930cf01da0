"""``DeltaSAMOptimizer`` under Lightning's automatic optimization: ``training_step`` counts once per batch.

Lightning's closure runs ``training_step``, so a sharpness-aware step, which evaluates it at w and at w + ε, runs
it twice. What it logs, the torchmetrics it updates and the loss it returns (the ``outputs`` of
``on_train_batch_end``) are kept from the pass at w: the loss at w is the training loss, as with any other
optimizer. Other side effects of ``training_step`` can read ``DeltaSAMOptimizer.perturbed_pass``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

from torchmetrics import Metric

from . import private


def _discard(*args: Any, **kwargs: Any) -> None:
    """``self.log`` in the pass at w + ε."""


@contextmanager
def perturbed_closure(closure: Callable[[], Any]) -> Iterator[None]:
    """Around the closure's evaluation at w + ε: ``self.log`` and ``self.log_dict`` (the module's and its callbacks')
    log nothing, and the module's torchmetrics and the step's output are put back as the pass at w left them."""
    module, inner = private.automatic_closure(closure)
    if module is None:
        yield
        return
    kept = private.closure_result(inner) if inner is not None else None
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    saved = [private.metric_snapshot(m) for m in metrics]
    module.__dict__["log"] = _discard  # log_dict logs through self.log
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        for metric, state in zip(metrics, saved):
            private.metric_restore(metric, state)
        if inner is not None and kept is not None:
            private.set_closure_result(inner, kept)


def clipping(closure: Callable[[], Any]) -> Optional[str]:
    """What clips the gradients after each evaluation of ``closure`` (Lightning's precision plugin runs its clipping
    after every one, the evaluation at w too): the trainer's ``gradient_clip_val`` or an overridden
    ``configure_gradient_clipping``; ``None`` where nothing does."""
    from .hooks import overridden

    module, _ = private.automatic_closure(closure)
    if module is None or not module.automatic_optimization:  # Lightning clips under automatic optimization only
        return None
    clip = getattr(module._trainer, "gradient_clip_val", None)
    if clip:
        return f"Trainer(gradient_clip_val={clip})"
    if overridden(module, "configure_gradient_clipping"):
        return f"{type(module).__name__}.configure_gradient_clipping"
    return None
