"""What the SAM family adds to SAM's step, at the window's end, on the synchronized gradients: GSAM's descent, WSAM's
decoupled sharpness term and Friendly-SAM's running mean of the gradient (its ascent direction subtracts it, in
:mod:`.steps`). The update of each is written out in ``docs/method-card.md``; each is checked against the reference
library (``pytorch_optimizer``) in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional, Protocol, cast

import torch
from torch import Tensor

from ..config import FAMILY, DeltaSAMConfig
from .norms import total_norm


def plain_is_ascent(config: DeltaSAMConfig) -> bool:
    """Whether the clean gradient a step hands on (``plain_grad``) is the ascent gradient itself, from the ascent's
    backward (``g_λ`` where the ascent is reweighted, in ``.grad``'s units, a loss scaler's scale included): for a
    uniform ascent, for Friendly-SAM (its running mean is of the ascent) and for GSAM's and WSAM's rule under
    ``weighted_descent`` (the clean gradient of the descent's loss). Otherwise it is the plain mean ``ḡ`` from one
    more, unscaled, backward through the clean graph (LookSAM's plain steps, δ-GSAM and δ-WSAM)."""
    if not config.reweights:
        return True
    return config.method == "fsam" or (config.method in FAMILY and bool(config.weighted_descent))


def reads_clean(config: DeltaSAMConfig) -> bool:
    """Whether a full step's window end reads the clean gradient: GSAM's and WSAM's rule, Friendly-SAM's running
    mean (none at ``fsam_sigma=0``, which is SAM)."""
    return config.method in ("gsam", "wsam") or (config.method == "fsam" and bool(config.fsam_sigma))


@torch.no_grad()
def gsam_descent_(grads: Sequence[Tensor], clean: Sequence[Tensor], alpha: float) -> Tensor:
    """GSAM (Zhuang et al., 2022): ``G = g_adv - alpha * g_perp`` in place, where ``g_perp = g - (g·g_adv /
    ||g_adv||²) g_adv`` is the part of the clean gradient ``g`` orthogonal to ``g_adv`` (``grads``). Where either norm
    is zero the projection is taken as 0 (``g_perp = g``). Returns ``||g_perp||``."""
    inner = torch.stack([(g * a).sum() for g, a in zip(clean, grads)]).sum()
    new, old = total_norm(list(grads)), total_norm(list(clean))
    defined = bool(new > 0) and bool(old > 0)
    cosine = inner / (new * old) if defined else torch.zeros_like(inner)
    verticals = [g - cosine * old * a / new if defined else g.clone() for g, a in zip(clean, grads)]
    for a, vertical in zip(grads, verticals):
        a.add_(vertical, alpha=-alpha)
    return total_norm(verticals)


def wsam_weight(gamma: float) -> float:
    """WSAM's weight of the sharpness term, ``gamma / (1 - gamma)`` (γ = 0.5 is SAM, γ = 0 is ERM)."""
    return gamma / (1.0 - gamma)


@torch.no_grad()
def wsam_couple_(grads: Sequence[Tensor], clean: Sequence[Tensor], weight: float) -> None:
    """WSAM's coupled form in place: ``G = g + weight * (g_adv - g)``, one base step on it."""
    for a, g in zip(grads, clean):
        a.sub_(g).mul_(weight).add_(g)


@torch.no_grad()
def wsam_split_(grads: Sequence[Tensor], clean: Sequence[Tensor]) -> list[Tensor]:
    """WSAM's decoupled form, before the base step: ``grads`` (``g_adv``) become the clean gradient ``g`` in place;
    returns the sharpness term ``g_adv - g`` that :func:`wsam_correct_` applies after it."""
    sharpness = [a.clone() - g for a, g in zip(grads, clean)]
    for a, g in zip(grads, clean):
        a.copy_(g)
    return sharpness


@torch.no_grad()
def wsam_correct_(optimizer: Any, params: Sequence[Tensor], sharpness: Sequence[Tensor], weight: float) -> None:
    """After the base step: ``w -= lr * weight * (g_adv - g)`` with each parameter group's LR of that step, as
    decoupled weight decay is applied (momentum, Adam's scaling and weight decay never see the sharpness term)."""
    lr = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
    for p, term in zip(params, sharpness):
        p.add_(term, alpha=-lr[id(p)] * weight)


def descend_(config: DeltaSAMConfig, grads: Sequence[Tensor], clean: Sequence[Tensor]) -> Optional[Tensor]:
    """The method's G from ``g_adv`` (``grads``, in place) and the clean gradient: GSAM's descent (returns
    ``||g_perp||``) or WSAM's coupled form; SAM's ``G = g_adv`` for the others."""
    if config.method == "gsam":
        return gsam_descent_(grads, clean, config.gsam_alpha or 0.0)
    if config.method == "wsam":
        wsam_couple_(grads, clean, wsam_weight(config.wsam_gamma or 0.0))
    return None


@torch.no_grad()
def fsam_update(
    momentum: Optional[list[Optional[Tensor]]], ascent: Sequence[Tensor], decay: float
) -> list[Optional[Tensor]]:
    """Friendly-SAM's running mean of the ascent gradient, ``m = decay * m + (1 - decay) * a``, started at each
    parameter's first full step's ``a`` (not at 0), as the reference library starts it per parameter."""
    if momentum is None:
        return [a.clone() for a in ascent]
    for i, (m, a) in enumerate(zip(momentum, ascent)):
        if m is None:
            momentum[i] = a.clone()
        else:
            m.lerp_(a.to(m.device, m.dtype), 1.0 - decay)
    return momentum


class FamilyState(Protocol):
    """The loop state's fields the family's rules carry (:class:`~.driver.LoopState`)."""

    fsam_momentum: Optional[list[Optional[Tensor]]]
    policy_mean: float
    policy_var: float
    policy_full: int
    policy_decided: int

    def plain_mean(self, plain: list[Tensor], window: int) -> list[Tensor]: ...


class FamilyRules:
    """The family's rules for one loop: Friendly-SAM's shift of the ascent, GSAM's and WSAM's window's end, and the
    adaptive policy's decision; their state lives in the loop state, so that a checkpoint holds it."""

    def __init__(self, config: DeltaSAMConfig, state: FamilyState, schedule: Any, optimizer: Any) -> None:
        self.config, self.state, self.schedule, self.optimizer = config, state, schedule, optimizer

    def shift(self, params: Sequence[Tensor], scale: Optional[float]) -> Optional[list[Optional[Tensor]]]:
        """Friendly-SAM's running mean, where the parameters are, times the loss scale the passes run at (``None``
        for a parameter that has none yet: its ascent is not shifted)."""
        momentum = self.state.fsam_momentum
        if self.config.method != "fsam" or momentum is None:
            return None
        momentum = [None if m is None else m.to(p.device, p.dtype) for m, p in zip(momentum, params)]
        self.state.fsam_momentum = momentum
        return momentum if scale is None else [None if m is None else m * scale for m in momentum]

    def policy(self, step: int, total_steps: Optional[int], scale: Optional[float] = None) -> Callable[[float], bool]:
        """AE-SAM's decision for this micro-batch (Jiang et al., 2023): the running moments of ``||g||²`` take this
        one first, and the step is full iff ``||g||² >= mu + c sigma``, c moving linearly from ``policy_c_start``
        to ``policy_c_end`` over the run's optimizer steps. ``||g||²`` is read at the loss scale ``scale`` of the
        passes and kept unscaled, so that a scaler's growth or back-off does not move the moments; a non-finite one
        (an overflow the scaler will skip) leaves them as they are and takes the full step."""
        cfg, state = self.config, self.state
        total = total_steps if total_steps is not None else self.schedule.total_steps
        if total is None:
            raise ValueError(
                "DeltaSAMConfig.policy='adaptive' moves its threshold over the run: pass DeltaSAMOptimizer(..., "
                "total_steps=N) (the Lightning mixin reads the trainer's)"
            )
        frac = min(step / max(total, 1), 1.0)
        start, end, delta = cfg.policy_c_start or 0.0, cfg.policy_c_end or 0.0, cfg.policy_delta or 0.0
        c = frac * end + (1.0 - frac) * start

        def decide(sq_norm: float) -> bool:
            state.policy_decided += 1
            if not math.isfinite(sq_norm):
                state.policy_full += 1
                return True
            if scale is not None:
                sq_norm /= scale * scale
            state.policy_mean = delta * state.policy_mean + (1 - delta) * sq_norm
            state.policy_var = delta * state.policy_var + (1 - delta) * (sq_norm - state.policy_mean) ** 2
            full = sq_norm >= state.policy_mean + c * state.policy_var**0.5
            state.policy_full += full
            return full

        return decide

    def before_step(
        self, result: Any, params: Sequence[Tensor], plain: list[Tensor], window: int, scale: Optional[float]
    ) -> Optional[Callable[[], None]]:
        """At a full step's window end, on G and the window's mean clean gradient: GSAM's descent, WSAM's split.
        Returns what runs after the base step took the update (WSAM's sharpness term, Friendly-SAM's running
        mean)."""
        cfg, unscale = self.config, 1.0 / scale if scale is not None else 1.0
        if cfg.method not in FAMILY:
            return None
        mean = self.state.plain_mean(plain, window)
        if scale is not None and not plain_is_ascent(cfg):  # ḡ of its own backward, unscaled: in G's units
            torch._foreach_mul_(mean, scale)
        live = [i for i, p in enumerate(params) if p.grad is not None]
        grads = [cast(Tensor, params[i].grad) for i in live]
        clean = [mean[i] for i in live]
        if cfg.method == "gsam" or (cfg.method == "wsam" and not cfg.wsam_decouple):
            perp = descend_(cfg, grads, clean)
            if perp is not None:
                result.extras["gsam_perp_norm"] = perp * unscale
            return None
        if cfg.method == "wsam":
            sharpness = wsam_split_(grads, clean)
            stepped, weight = [params[i] for i in live], wsam_weight(cfg.wsam_gamma or 0.0)
            terms = sharpness if scale is None else list(torch._foreach_mul(sharpness, unscale))
            return lambda: wsam_correct_(self.optimizer, stepped, terms, weight)
        ascent = mean if scale is None else list(torch._foreach_mul(mean, unscale))
        if self.state.fsam_momentum is not None:
            held = [m for m in self.state.fsam_momentum if m is not None]
            result.extras["fsam_removed_norm"] = total_norm(held) * (cfg.fsam_sigma or 0.0)

        def remember() -> None:
            self.state.fsam_momentum = fsam_update(self.state.fsam_momentum, ascent, cfg.fsam_lambda or 0.0)

        return remember
