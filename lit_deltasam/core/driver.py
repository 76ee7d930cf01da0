"""The training loop's rules around the double step: one :class:`Driver` for a hand-written loop and the Lightning
mixin alike.

Per micro-batch the driver takes ρ from the :class:`~.schedule.RhoSchedule`, runs the engine's double step under
the step's seed, and counts it; at a window's end it averages G, skips a non-finite step, applies LookSAM, and
takes the base optimizer's step (given by the caller: the plain loop's, or Lightning's ``optimizer_step``). Everything
it carries across steps is the :class:`LoopState`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn

from ..config import FAMILY, DeltaSAMConfig
from .amortized import Reuse
from .batch import Batch, LossFn
from .distributed import world_size
from .engine import Backward, DeltaSAM, NoSync, StepResult
from .family import fsam_update, gsam_descent_, wsam_correct_, wsam_split_, wsam_weight
from .norms import total_norm
from .randomness import seeded, step_seed
from .schedule import RhoSchedule
from .sharding import NormReduce, local


@dataclass
class LoopState:
    """What the loop carries across steps and checkpoints for an exact resume."""

    micro: int = 0
    """Micro-batches accumulated towards the next optimizer step."""
    micro_batches: int = 0
    """Micro-batches run in total; keys each step's random seed."""
    perturbation_skipped: int | Tensor = 0
    """Perturbations skipped (ε = 0); a 0-d tensor while decisions are taken on the device."""
    steps_skipped: int = 0
    epochs_scheduled: int = 0
    """Epochs whose end has stepped the epoch-interval LR schedulers (the Lightning mixin's)."""
    base_seed: Optional[int] = None
    lr_peak: float = 0.0
    """The largest learning rate seen, for ``rho_schedule="follow_lr"``."""
    perturbing: int = 0
    """Micro-batches whose step tried a perturbation (ρ_t > 0)."""
    plain_synced: bool = False
    """Whether ``plain_sum`` is already averaged over ranks."""
    plain_sum: Optional[list[Tensor]] = None
    """LookSAM: the plain gradients at w summed over this window's micro-batches (full steps only)."""
    reuse_direction: Optional[list[Tensor]] = None
    """LookSAM: the stored direction g_v of the last full step (dropped when the next one starts)."""
    reuse_norm: Optional[Tensor] = None
    """LookSAM: ``||g_v||``, not saved (a resumed run computes it again, to the same bits)."""
    policy_mean: float = 0.0
    """The adaptive policy's running mean of ``||g||²`` (AE-SAM's mu)."""
    policy_var: float = 0.0
    """... and of its squared deviation (sigma²)."""
    policy_full: int = 0
    """Micro-batches the policy gave a full step."""
    policy_decided: int = 0
    """Micro-batches the policy decided."""
    policy_plain: int = 0
    """Micro-batches of this window the policy gave a plain step (a window of only those is plain: no family rule)."""
    fsam_momentum: Optional[list[Tensor]] = None
    """Friendly-SAM: the running mean of the full steps' synchronized ascent gradients (unscaled)."""

    TENSORS = ("plain_sum", "reuse_direction", "reuse_norm", "fsam_momentum")

    def plain_mean(self, plain: list[Tensor], window: int) -> list[Tensor]:
        """The window's mean plain gradient over every rank, in place on the sums ``plain``."""
        ranks = 1 if self.plain_synced else world_size()
        summed = self.plain_over_ranks(plain)
        torch._foreach_mul_(summed, 1.0 / (window * ranks))
        return summed

    def plain_over_ranks(self, plain: list[Tensor]) -> list[Tensor]:
        """LookSAM's summed plain gradients ``plain`` (``plain_sum`` or a copy of it), summed over ranks in place
        unless a global ascent already averaged them."""
        if not self.plain_synced and world_size() > 1:
            for g in plain:
                torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.SUM)
        return plain

    def scalars(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.TENSORS}
        return {k: int(v) if isinstance(v, Tensor) else v for k, v in values.items()}

    @classmethod
    def from_scalars(cls, saved: dict[str, Any]) -> LoopState:
        known = {f.name for f in fields(cls)} - set(cls.TENSORS)
        return cls(**{k: v for k, v in saved.items() if k in known})


def optimizer_params(optimizer: Any) -> list[Tensor]:
    """The parameters a (Lightning or torch) optimizer steps, in order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def clip_gradients(params: Sequence[Tensor], config: DeltaSAMConfig) -> None:
    """Clip G as ``gradient_clip_*`` say, with the torch functions Lightning's precision plugins call."""
    if config.gradient_clip_val is None:
        return
    if config.gradient_clip_algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, config.gradient_clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, config.gradient_clip_val)


class Driver:
    """The loop's rules around the engine's double step, over one base optimizer.

    Args:
        module: the model.
        optimizer: the base optimizer; its parameters are perturbed and stepped.
        config: the method and its loop fields (accumulation, clipping, ``interval``, LookSAM, seeds).
        state: the loop state to carry on (a checkpoint's, or a new one).
        reduce_squares: as for :class:`~.engine.DeltaSAM` (FSDP1 shards).
        total_steps: optimizer steps in the run (a ``rho_warmup`` fraction needs it).
        schedulers: LR schedulers whose stated maximum ``follow_lr`` reads.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Any,
        config: DeltaSAMConfig,
        state: LoopState,
        *,
        reduce_squares: Optional[NormReduce] = None,
        total_steps: Optional[int] = None,
        schedulers: Sequence[Any] = (),
    ) -> None:
        if config.policy is not None and world_size() > 1:
            raise NotImplementedError(
                f"DeltaSAMConfig.policy={config.policy!r} decides from each rank's own ascent gradient, and under "
                "data parallelism the ranks could take different branches; it runs in one process for now"
            )
        self.module, self.optimizer, self.config, self.state = module, optimizer, config, state
        self.reduce_squares = reduce_squares
        self.engine = DeltaSAM(module, config, optimizer_params(optimizer), reduce_squares=reduce_squares, driven=True)
        self.stepped_params = [id(p) for p in self.engine.params]
        self.schedule = RhoSchedule(config, optimizer, state, total_steps, schedulers)

    def base_step(self, scaler: Optional[Any] = None) -> bool:
        """The base optimizer's step, clipping G first (after ``scaler`` unscaled it). A step that an active loss
        scaler skips (inf or NaN in G; the scale backs off) counts as taken, as in Lightning's ``global_step`` and
        torch's AMP recipe, which steps the LR schedulers after every ``scaler.step``."""
        params = optimizer_params(self.optimizer)
        if scaler is None or not scaler.is_enabled():
            clip_gradients(params, self.config)
            self.optimizer.step()
            return True
        scaler.unscale_(self.optimizer)
        clip_gradients(params, self.config)
        scaler.step(self.optimizer)  # steps the base only if G is finite
        scaler.update()
        return True

    def window_ends(self, last_batch: bool = False) -> bool:
        """Whether the next micro-batch closes the accumulation window: the window is full, or the data ends."""
        return last_batch or self.state.micro + 1 >= self.config.accumulate_grad_batches

    def drive(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        step: int,
        last: bool,
        optimizer_step: Callable[[], bool],
        zero_grad: Callable[[], None],
        backward: Optional[Backward] = None,
        no_sync: Optional[NoSync] = None,
        scaler: Optional[Any] = None,
        rank: int = 0,
        total_steps: Optional[int] = None,
        schedulers: Optional[Sequence[Any]] = None,
        stale_advice: Optional[str] = None,
    ) -> StepResult:
        """One micro-batch of optimizer step ``step`` at its scheduled ρ; when ``last``, close the window with
        ``optimizer_step`` and ``zero_grad``. ``scaler`` is the loss scaler ``backward`` scales with: an active one
        decides the skips itself, and ``result.grad_norm`` is divided by the scale the passes ran at.
        ``stale_advice`` replaces the advice of the refusal of gradients found in ``.grad`` at a window's start."""
        if self.state.micro == 0:
            self._follow_param_groups(step)
            self._refuse_stale_gradients(step, stale_advice)
        active = scaler if scaler is not None and scaler.is_enabled() else None
        scale = active.get_scale() if active is not None else None  # both passes' (the window's end may move it)
        full = self.schedule.full(step)
        rho = self.schedule(step, total_steps, schedulers)
        checks = active is None
        result = self.micro_step(
            loss_fn,
            batch,
            rho=rho,
            last=last,
            backward=backward,
            no_sync=no_sync,
            check_finite=checks,
            rank=rank,
            scale=scale,
            step=step,
            total_steps=total_steps,
        )
        result.rho, result.full_step = rho, full and result.full_step
        if scale is not None and result.grad_norm is not None:
            result.grad_norm = result.grad_norm / scale
        if last:
            result.stepped = self.end_window(
                result,
                step=step,
                optimizer_step=optimizer_step,
                zero_grad=zero_grad,
                total_steps=total_steps,
                schedulers=schedulers,
                scaler=active,
                scale=scale,
            )
        return result

    def micro_step(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        rho: float,
        last: bool,
        backward: Optional[Backward] = None,
        no_sync: Optional[NoSync] = None,
        check_finite: bool = True,
        rank: int = 0,
        scale: Optional[float] = None,
        step: int = 0,
        total_steps: Optional[int] = None,
    ) -> StepResult:
        """One micro-batch's double step at radius ``rho`` under this step's seed (``scale``: the loss scaler's, which
        Friendly-SAM's shift is multiplied by); counted in the loop state."""
        cfg, state = self.config, self.state
        if state.base_seed is None:
            state.base_seed = torch.initial_seed()
        seed = step_seed(state.base_seed, state.micro_batches, rank)
        if cfg.reuse is not None and rho > 0 and state.micro == 0:
            # a full step replaces the stored direction: not held beside the plain gradient and the snapshot
            state.reuse_direction = state.reuse_norm = None
        with seeded(seed, self.engine.device) if cfg.seed_steps else nullcontext():
            result = self.engine.step(
                loss_fn,
                batch,
                backward=backward,
                no_sync=no_sync,
                sync_descent=last,
                check_finite=check_finite,
                rho=rho,
                plain_grad=rho > 0 and (cfg.reuse is not None or cfg.method in FAMILY),
                shift=self._fsam_shift(scale) if rho > 0 else None,
                decide=self._policy(step, total_steps) if rho > 0 and cfg.policy == "adaptive" else None,
            )
        self._count(result, rho)
        return result

    def _policy(self, step: int, total_steps: Optional[int]) -> Callable[[float], bool]:
        """AE-SAM's decision for this micro-batch (Jiang et al., 2023): the running moments of ``||g||²`` take this
        one first, and the step is full iff ``||g||² >= mu + c sigma``, c moving linearly from ``policy_c_start``
        to ``policy_c_end`` over the run's optimizer steps."""
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
            state.policy_mean = delta * state.policy_mean + (1 - delta) * sq_norm
            state.policy_var = delta * state.policy_var + (1 - delta) * (sq_norm - state.policy_mean) ** 2
            full = sq_norm >= state.policy_mean + c * state.policy_var**0.5
            state.policy_decided += 1
            state.policy_full += full
            return full

        return decide

    def _fsam_shift(self, scale: Optional[float]) -> Optional[list[Tensor]]:
        """Friendly-SAM's running mean, where the parameters are, times the loss scale the passes run at."""
        momentum = self.state.fsam_momentum
        if self.config.method != "fsam" or momentum is None:
            return None
        params = self.engine.params
        self.state.fsam_momentum = momentum = [m.to(p.device, p.dtype) for m, p in zip(momentum, params)]
        return momentum if scale is None else [m * scale for m in momentum]

    def _count(self, result: StepResult, rho: float) -> None:
        """Advance the loop state by one micro-batch; sum LookSAM's plain gradients over the window."""
        state = self.state
        state.micro += 1
        state.micro_batches += 1
        state.policy_plain += self.config.policy is not None and rho > 0 and not result.full_step
        if self.config.perturbs and rho > 0 and result.full_step:
            state.perturbing += 1
            perturbed = result.perturbed
            state.perturbation_skipped += (~perturbed).int() if isinstance(perturbed, Tensor) else not perturbed
        if result.plain_grad is not None:
            # the loop owns it from here: LookSAM writes g_v over these buffers
            plain, result.plain_grad = result.plain_grad, None
            if state.plain_sum is None:
                state.plain_sum = plain
            else:  # a window resumed from a checkpoint holds its partial sum on the CPU
                state.plain_sum = [a.to(b.device, b.dtype) for a, b in zip(state.plain_sum, plain)]
                torch._foreach_add_(state.plain_sum, plain)
            state.plain_synced = result.plain_grad_synced

    def end_window(
        self,
        result: StepResult,
        *,
        step: int,
        optimizer_step: Callable[[], bool],
        zero_grad: Callable[[], None],
        total_steps: Optional[int] = None,
        schedulers: Optional[Sequence[Any]] = None,
        scaler: Optional[Any] = None,
        scale: Optional[float] = None,
    ) -> bool:
        """Close the accumulation window: average G, skip a non-finite step, apply LookSAM or the family's rule,
        step, zero. ``scaler`` (active) and ``scale`` tell a step the scaler skipped.

        ``optimizer_step`` takes the base optimizer's step (clipping included) and returns whether
        it stepped; ``step`` is the optimizer step this window ends. Returns whether it stepped.
        """
        state, engine = self.state, self.engine
        window, state.micro = state.micro, 0
        if window > 1:
            with torch.no_grad():
                torch._foreach_mul_([local(p.grad) for p in engine.params if p.grad is not None], 1.0 / window)
            if result.update_norm is not None:
                result.update_norm = result.update_norm / window
        plain, state.plain_sum = state.plain_sum, None
        if state.policy_plain == window:  # the policy made every micro-batch plain: GSAM, WSAM, F-SAM's m untouched
            plain = None
        state.policy_plain = 0
        if result.finite is False:
            state.steps_skipped += 1
            warnings.warn(
                f"non-finite loss or gradient at global_step={step}: the optimizer step is skipped "
                f"and the weights are unchanged ({state.steps_skipped} skipped so far)",
                RuntimeWarning,
                stacklevel=5,
            )
            self._zero(zero_grad)
            return False
        if self.config.reuse is not None:
            self._reuse(plain, step, total_steps, schedulers)
        after = self._family(result, plain, window, scale) if plain is not None else None
        try:
            stepped = optimizer_step()
        except BaseException:
            engine.rollback()
            raise
        if after is not None and not (scaler is not None and scale is not None and scaler.get_scale() < scale):
            after()  # not after a step the loss scaler skipped (inf or NaN in G)
        self._zero(zero_grad)
        return stepped

    def _family(
        self, result: StepResult, plain: list[Tensor], window: int, scale: Optional[float]
    ) -> Optional[Callable[[], None]]:
        """GSAM's descent, WSAM's split, on a full step's G and the window's mean clean gradient; returns what runs
        after the base step (WSAM's sharpness term, Friendly-SAM's running mean)."""
        cfg, engine, unscale = self.config, self.engine, 1.0 / scale if scale is not None else 1.0
        if cfg.method not in FAMILY:
            return None
        mean = self.state.plain_mean(plain, window)
        live = [i for i, p in enumerate(engine.params) if p.grad is not None]
        grads = [cast(Tensor, engine.params[i].grad) for i in live]
        clean = [mean[i] for i in live]
        if cfg.method == "gsam":
            perp = gsam_descent_(grads, clean, cfg.gsam_alpha or 0.0)
            result.extras["gsam_perp_norm"] = perp * unscale
            return None
        if cfg.method == "wsam":
            sharpness = wsam_split_(grads, clean)
            params, weight = [engine.params[i] for i in live], wsam_weight(cfg.wsam_gamma or 0.0)
            terms = sharpness if scale is None else list(torch._foreach_mul(sharpness, unscale))
            return lambda: wsam_correct_(self.optimizer, params, terms, weight)
        ascent = mean if scale is None else list(torch._foreach_mul(mean, unscale))
        if self.state.fsam_momentum is not None:
            result.extras["fsam_removed_norm"] = total_norm(self.state.fsam_momentum) * (cfg.fsam_sigma or 0.0)

        def remember() -> None:
            self.state.fsam_momentum = fsam_update(self.state.fsam_momentum, ascent, cfg.fsam_lambda or 0.0)

        return remember

    def _zero(self, zero_grad: Callable[[], None]) -> None:
        """Zero the optimizer's gradients and those the step wrote to trainable parameters outside it."""
        zero_grad()
        for p in self.engine.unperturbed:
            p.grad = None

    def _reuse(
        self,
        plain: Optional[list[Tensor]],
        step: int,
        total_steps: Optional[int],
        schedulers: Optional[Sequence[Any]],
    ) -> None:
        """LookSAM at the window's end, on the synchronized G: store g_v after a full step, add it after a plain one
        (the reused term follows the ρ schedule as the full steps do)."""
        cfg, state, engine = self.config, self.state, self.engine
        if state.reuse_direction is not None:  # moved once to where the parameters are (after a resume)
            state.reuse_direction = [d.to(p.device, p.dtype) for d, p in zip(state.reuse_direction, engine.params)]
        reuse = Reuse(cfg.loop.reuse_alpha, engine.reduce_squares, state.reuse_direction, state.reuse_norm)
        if plain is None:
            strength = self.schedule.scheduled(step, total_steps, schedulers) / cfg.rho if cfg.rho else 0.0
            reuse.apply([p.grad for p in engine.params], strength)
            state.reuse_norm = reuse.norm
            return
        plain = state.plain_over_ranks(plain)
        full = [torch.zeros_like(p) if p.grad is None else p.grad for p in engine.params]
        reuse.record(full, plain)
        state.reuse_direction, state.reuse_norm = reuse.direction, reuse.norm

    def _follow_param_groups(self, step: int) -> None:
        """At a window's start: perturb and update the parameters the base optimizer steps now. A group added since
        the last step (Lightning's ``BackboneFinetuning`` unfreezes layers so) gets the engine rebuilt over them;
        before, its parameters kept their ascent gradient in G."""
        params = optimizer_params(self.optimizer)
        if [id(p) for p in params] == self.stepped_params:
            return
        if self.state.reuse_direction is not None or self.state.fsam_momentum is not None:
            held = f"reuse={self.config.reuse!r}" if self.state.reuse_direction is not None else "method='fsam'"
            raise ValueError(
                f"the base optimizer's parameters changed at optimizer step {step} (a group added or removed), "
                f"and {held} holds a direction over the old ones; build a new DeltaSAMOptimizer around the base "
                "optimizer"
            )
        self.engine = DeltaSAM(self.module, self.config, params, reduce_squares=self.reduce_squares, driven=True)
        self.stepped_params = [id(p) for p in params]

    def _refuse_stale_gradients(self, step: int, advice: Optional[str] = None) -> None:
        """A window's G starts from zero: a gradient already in ``.grad`` (a backward run before ``step()``, as
        davda54/sam's loop runs one before ``first_step``) would be added to it. Zeros (``zero_grad(set_to_none=
        False)``) are harmless; their values are read only when some ``.grad`` is there at all. One rule for
        ``step(loss_fn, batch)``, ``step(closure)`` and the mixin."""
        present = [p.grad for p in self.engine.updated if p.grad is not None]
        if not present or not bool(torch.stack([g.ne(0).any() for g in present]).any()):
            return
        raise ValueError(
            f"DeltaSAMOptimizer found gradients already in .grad at the start of optimizer step {step}: the step "
            "runs both backward passes itself, and they would be added to its G. "
            + (
                advice
                or "Drop the backward before step() (davda54/sam's loop runs one before first_step; not needed here), "
                "or call optimizer.zero_grad() first"
            )
        )
