"""torch's ``step(closure)`` on the loop driver: what Lightning's automatic optimization calls.

A closure zeroes the gradients, computes one scalar loss of one batch, runs its backward and returns the loss. A
sharpness-aware step evaluates it twice, at w and at w + eps; one closure is one optimizer step. Under Lightning
the second evaluation's logging, metric updates and step output are put back to the first's
(:mod:`lit_deltasam.lightning.automatic`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from ..config import FAMILY
from .batch import Batch
from .distributed import world_size
from .result import StepResult

if TYPE_CHECKING:
    from .loop import DeltaSAMOptimizer

STALE_ADVICE = (
    "step(closure) evaluates the closure itself at w and at w + eps. Under Lightning's automatic optimization this "
    "is Trainer(accumulate_grad_batches > 1), which passes only a window's last closure: use DeltaSAMMixin with "
    "DeltaSAMConfig(accumulate_grad_batches=k). In a loop of your own, zero them first (davda54/sam's example runs a "
    "backward before step(closure), not needed here)"
)


class Skipped(Exception):
    """A closure returned ``None`` (Lightning's way of skipping a batch): the step is not taken."""


class Pass:
    """Which pass of ``step(closure)`` is running; one object shared by every view of the optimizer (Lightning's
    ``LightningOptimizer`` copies the wrapper's attributes, not their values)."""

    perturbed: bool = False


def perturbed_closure(closure: Callable[[], Any]) -> AbstractContextManager:
    """What a closure's framework needs around its evaluation at w + ε (Lightning's, where the caller already
    imported Lightning; a hand-written loop never imports it)."""
    if "lightning.pytorch" not in sys.modules:
        return nullcontext()
    from ..lightning.automatic import perturbed_closure as lightning_closure

    return lightning_closure(closure)


def clipping(closure: Callable[[], Any]) -> Optional[str]:
    """What the closure's framework clips after each evaluation (Lightning's clipping), ``None`` where nothing."""
    if "lightning.pytorch" not in sys.modules:
        return None
    from ..lightning.automatic import clipping as lightning_clipping

    return lightning_clipping(closure)


def refuse(optimizer: DeltaSAMOptimizer, closure: Callable[[], Any]) -> None:
    """Name what a closure (one scalar loss of one batch, with its own backward) cannot run."""
    cfg = optimizer.config
    readers = [
        (cfg.method in FAMILY, f"method={cfg.method!r}"),
        (cfg.policy is not None, "policy='adaptive'"),
        (cfg.reuse is not None, "reuse='looksam'"),
    ]
    reads = next((what for read, what in readers if read), None)
    clip = clipping(closure) if reads is not None and cfg.perturbs else None
    if clip is not None:
        raise ValueError(
            f"{clip} clips the gradient after each closure evaluation, the clean gradient at w that {reads} reads "
            "too, so the step would not be the method's: clip with DeltaSAMConfig(gradient_clip_val=...), which "
            "clips G alone at the step, or train with DeltaSAMMixin"
        )
    refused = [
        (cfg.accumulate_grad_batches > 1, f"accumulate_grad_batches={cfg.accumulate_grad_batches}"),
        (cfg.m_sharpness is not None, f"m_sharpness={cfg.m_sharpness}"),
        (cfg.method == "per_instance", "method='per_instance' (per-instance losses)"),
        (cfg.reweights and cfg.method == "deltasam", "method='deltasam' (per-instance losses)"),
        (cfg.reweights, f"beta={cfg.beta} with method={cfg.method!r} (per-instance losses)"),
        (optimizer.scaler is not None, "scaler= (the closure runs its own backward)"),
        (cfg.ascent == "local" and cfg.perturbs and world_size() > 1, "ascent='local' under DDP"),
    ]
    for bad, what in refused:
        if bad:
            raise ValueError(
                f"DeltaSAMOptimizer.step(closure) cannot run {what}: a closure is one scalar loss of one batch, "
                "evaluated with its own backward (all-reduced under DDP); call step(loss_fn, batch) with per-"
                "instance losses, or use DeltaSAMMixin in Lightning"
            )


def closure_step(optimizer: DeltaSAMOptimizer, closure: Callable[[], Any]) -> Optional[StepResult]:
    """One optimizer step from ``closure``; ``None`` when it returned ``None`` (nothing stepped)."""
    refuse(optimizer, closure)
    passes = 0

    def loss_of(_: Batch) -> Tensor:
        nonlocal passes
        passes += 1
        perturbed = passes > 1
        optimizer.pass_.perturbed = perturbed
        try:
            with torch.enable_grad(), perturbed_closure(closure) if perturbed else nullcontext():
                loss = closure()
        finally:
            optimizer.pass_.perturbed = False
        if loss is None:
            raise Skipped
        return torch.as_tensor(loss).detach().reshape(1)

    try:
        result = optimizer.driver.drive(
            loss_of,
            None,
            step=optimizer.steps,
            last=True,
            optimizer_step=optimizer.base_step,
            zero_grad=optimizer.zero_grad,
            backward=lambda loss: None,
            stale_advice=STALE_ADVICE,
        )
    except Skipped:
        optimizer.zero_grad()
        optimizer.loop_state.micro = 0
        return None
    optimizer.steps += result.stepped
    return result
