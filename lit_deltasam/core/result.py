"""What one step measured: :class:`StepResult`, and how a grouped step's parts make one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, cast

import torch
from torch import Tensor

from .decisions import all_of
from .weighting import effective_sample_size


@dataclass
class StepResult:
    """What one step measured. Tensors are detached; per-instance ones have shape ``[n]``."""

    losses: Tensor
    """``l_i(w)``."""
    perturbed_losses: Optional[Tensor] = None
    """``l_i(w + eps)`` (``l_i(w + rho ĝ_i)`` for per-instance SAM); ``None`` for ERM."""
    weights: Optional[Tensor] = None
    """This rank's instance weights lambda in the ascent (uniform for SAM and ASAM)."""
    batch_weights: Optional[Tensor] = None
    """lambda over the batch it was normalized on: the global batch under ``ascent="global"``."""
    grad_norm: Optional[Tensor] = None
    """``||g_lambda||`` (``||T g||`` for ASAM), the norm that normalized eps."""
    eps_norm: Optional[Tensor] = None
    """``||eps||``; zero when the perturbation was skipped."""
    perturbed: bool | Tensor = False
    """False when eps was set to zero because ``||g||`` was zero or not finite; a 0-d bool tensor where the
    decision was taken on the device (:mod:`~lit_deltasam.core.decisions`)."""
    update_norm: Optional[Tensor] = None
    """``||G||`` of the accumulated ``.grad``, when the step checked it."""
    finite: Optional[bool] = None
    """Whether the update can be taken: on no rank a non-finite loss, ascent gradient or G since the
    last synchronized step; ``None`` when not checked."""
    plain_grad: Optional[list[Tensor]] = None
    """With ``step(plain_grad=True)`` on a sharpness-aware step: the plain gradient at w, one tensor per
    perturbed parameter, up to a positive scale (a loss scaler's). :class:`~lit_deltasam.core.loop.DeltaSAMOptimizer`
    takes it for LookSAM (and leaves ``None``)."""
    plain_grad_synced: bool = False
    """Whether ``plain_grad`` is already averaged over ranks (a global ascent with uniform weights)."""
    rho: float = 0.0
    """The radius this step took (set by the driver: its scheduled ρ, 0 on a plain step)."""
    full_step: bool = True
    """Set by the driver: whether this is a full sharpness-aware step under ``interval``."""
    extras: dict[str, Tensor] = field(default_factory=dict)
    """What a method of the family adds to the diagnostics (``gsam_perp_norm``, ``fsam_removed_norm``), logged as
    ``sam/<name>``."""
    stepped: bool = False
    """Set by the loop driver (:class:`~lit_deltasam.core.driver.Driver`): this micro-batch ended a window with an
    optimizer step (one whose update a loss scaler skipped counts, as in Lightning's ``global_step``)."""

    def local_finite(self) -> Tensor:
        """This rank's losses (and ascent gradient norm) are finite, as a 0-d bool tensor (no sync)."""
        ok = torch.isfinite(self.losses).all()
        if self.perturbed_losses is not None:
            ok = ok & torch.isfinite(self.perturbed_losses).all()
        if self.grad_norm is not None:
            ok = ok & torch.isfinite(self.grad_norm)
        return ok

    @property
    def loss(self) -> Tensor:
        return self.losses.mean()

    @property
    def perturbed_loss(self) -> Optional[Tensor]:
        return None if self.perturbed_losses is None else self.perturbed_losses.mean()

    @property
    def loss_change(self) -> Optional[Tensor]:
        """Per-instance ``l_i(w + eps) - l_i(w)``."""
        return None if self.perturbed_losses is None else self.perturbed_losses - self.losses

    @property
    def sharpness(self) -> Optional[Tensor]:
        change = self.loss_change
        return None if change is None else change.mean()

    @property
    def effective_sample_size(self) -> Optional[Tensor]:
        return None if self.batch_weights is None else effective_sample_size(self.batch_weights)

    @property
    def max_weight(self) -> Optional[Tensor]:
        """``max_i n * lambda_i``: 1 for uniform weights."""
        return None if self.batch_weights is None else self.batch_weights.max() * self.batch_weights.numel()


def merge_groups(parts: list[tuple[float, StepResult]], sizes: list[int]) -> StepResult:
    """One m-sharpness step's result from its groups' (share of the batch, result) and sizes. A scalar loss gives
    one loss per group, its mean: it stands for each of the group's instances, so that the batch's mean loss and
    sharpness weigh a smaller last group by its size."""
    results = [r for _, r in parts]

    def per_instance(losses: Tensor, size: int) -> Tensor:
        return losses.expand(size) if losses.numel() == 1 else losses

    weights = torch.cat([cast(Tensor, r.weights) * share for share, r in parts])
    plain = None
    if results[0].plain_grad is not None:
        plain = list(torch._foreach_mul(results[0].plain_grad, parts[0][0]))
        for share, r in parts[1:]:
            torch._foreach_add_(plain, cast(list[Tensor], r.plain_grad), alpha=share)
    return StepResult(
        losses=torch.cat([per_instance(r.losses, k) for r, k in zip(results, sizes)]),
        perturbed_losses=torch.cat([per_instance(cast(Tensor, r.perturbed_losses), k) for r, k in zip(results, sizes)]),
        weights=weights,
        batch_weights=weights,
        grad_norm=torch.stack([cast(Tensor, r.grad_norm) for r in results]).mean(),
        eps_norm=torch.stack([cast(Tensor, r.eps_norm) for r in results]).mean(),
        perturbed=all_of([r.perturbed for r in results]),
        plain_grad=plain,
    )
