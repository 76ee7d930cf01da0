"""The training loop's rules around the double step: one :class:`Driver` for a hand-written loop and the Lightning
mixin alike.

Per micro-batch the driver takes ρ from the :class:`~.schedule.RhoSchedule`, runs the engine's double step under
the step's seed, and counts it; at a window's end it averages G, skips a non-finite step, applies LookSAM, and
takes the base optimizer's step (given by the caller: the plain loop's, or Lightning's ``optimizer_step``). Everything
it carries across steps is the :class:`LoopState`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import DeltaSAMConfig
from .amortized import Reuse
from .batch import Batch, LossFn
from .distributed import world_size
from .engine import Backward, DeltaSAM, NoSync, StepResult
from .family import FamilyRules, reads_clean
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
    fsam_momentum: Optional[list[Optional[Tensor]]] = None
    """Friendly-SAM: the running mean of the full steps' synchronized ascent gradients (unscaled); ``None`` for a
    parameter added since the last full step."""

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

    def restore(self, saved: LoopState) -> None:
        """Take every field of ``saved`` (a checkpoint's) in place: the schedule and the family's rules hold this
        object, so it is never replaced."""
        for f in fields(self):
            setattr(self, f.name, getattr(saved, f.name))

    @classmethod
    def from_scalars(cls, saved: dict[str, Any]) -> LoopState:
        known = {f.name for f in fields(cls)} - set(cls.TENSORS)
        return cls(**{k: v for k, v in saved.items() if k in known})


LOOP_SHAPE = ("method", "policy", "accumulate_grad_batches", "interval", "reuse", "m_sharpness")
"""The config fields a saved loop state depends on: a state loads only into a loop that agrees on them."""


def refuse_other_shape(saved: dict[str, Any], config: DeltaSAMConfig, where: str) -> None:
    """Refuse a loop state saved under ``saved`` (the :data:`LOOP_SHAPE` fields) into a loop of ``config``."""
    differ = {k: v for k, v in saved.items() if getattr(config, k) != v}
    if differ:
        now = {k: getattr(config, k) for k in differ}
        raise ValueError(
            f"{where}: the state was saved with {differ}, this run has {now}; its loop state (the open window, "
            "LookSAM's direction, F-SAM's running mean, the policy's moments) would not mean the same here"
        )


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


@dataclass(frozen=True)
class Tick:
    """One micro-batch's place in the run: its optimizer step, the run's length and LR schedulers (for ρ), the
    active loss scaler with the scale the passes run at, and the rank (for the step's seed)."""

    step: int
    total_steps: Optional[int] = None
    schedulers: Optional[Sequence[Any]] = None
    scaler: Optional[Any] = None
    scale: Optional[float] = None
    rank: int = 0


class Driver:
    """The loop's rules around the engine's double step, over one base optimizer.

    Args:
        module: the model.
        optimizer: the base optimizer; its parameters are perturbed and stepped.
        config: the method and its loop fields (accumulation, clipping, ``interval``, LookSAM, seeds).
        state: the loop state to carry on (a checkpoint's, or a new one).
        reduce_squares: as for :class:`~.engine.DeltaSAM` (FSDP1 shards).
        total_steps: optimizer steps in the run (a ``rho_warmup`` fraction and ``policy="adaptive"`` need it).
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
        if config.policy is not None and world_size() > 1 and (config.ascent != "global" or reduce_squares):
            raise NotImplementedError(
                f"DeltaSAMConfig.policy={config.policy!r} with ascent={config.ascent!r} decides from each rank's own "
                "ascent gradient, and the ranks could take different branches; set ascent='global' (the ascent "
                "gradient all-reduced, one decision on every rank) or run in one process"
                + (" (sharded parameters: one process for now)" if reduce_squares else "")
            )
        self.module, self.optimizer, self.config, self.state = module, optimizer, config, state
        self.reduce_squares = reduce_squares
        self.engine = DeltaSAM(module, config, optimizer_params(optimizer), reduce_squares=reduce_squares, driven=True)
        self.stepped_params = [id(p) for p in self.engine.params]
        self.schedule = RhoSchedule(config, optimizer, state, total_steps, schedulers)
        self.rules = FamilyRules(config, state, self.schedule, optimizer)

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
            self.follow_param_groups()
            self._refuse_stale_gradients(step, stale_advice)
        active = scaler if scaler is not None and scaler.is_enabled() else None
        scale = active.get_scale() if active is not None else None  # both passes' (the window's end may move it)
        tick = Tick(step, total_steps, schedulers, active, scale, rank)
        rho = self.schedule(step, total_steps, schedulers)
        result = self.micro_step(loss_fn, batch, tick, rho=rho, last=last, backward=backward, no_sync=no_sync)
        result.rho, result.full_step = rho, self.schedule.full(step) and result.full_step
        if scale is not None and result.grad_norm is not None:
            result.grad_norm = result.grad_norm / scale
        if last:
            result.stepped = self.end_window(result, tick, optimizer_step=optimizer_step, zero_grad=zero_grad)
        return result

    def micro_step(
        self,
        loss_fn: LossFn,
        batch: Batch,
        tick: Tick,
        *,
        rho: float,
        last: bool,
        backward: Optional[Backward] = None,
        no_sync: Optional[NoSync] = None,
    ) -> StepResult:
        """One micro-batch's double step at radius ``rho`` under this step's seed; counted in the loop state."""
        cfg, state = self.config, self.state
        if state.base_seed is None:
            state.base_seed = torch.initial_seed()
        seed = step_seed(state.base_seed, state.micro_batches, tick.rank)
        if cfg.reuse is not None and rho > 0 and state.micro == 0:
            # a full step replaces the stored direction: not held beside the plain gradient and the snapshot
            state.reuse_direction = state.reuse_norm = None
        policy = rho > 0 and cfg.policy == "adaptive"
        with seeded(seed, self.engine.device) if cfg.seed_steps else nullcontext(), self._policy_undone_on_error():
            result = self.engine.step(
                loss_fn,
                batch,
                backward=backward,
                no_sync=no_sync,
                sync_descent=last,
                check_finite=tick.scaler is None,
                rho=rho,
                plain_grad=rho > 0 and (cfg.reuse is not None or reads_clean(cfg)),
                shift=self.rules.shift(self.engine.params, tick.scale) if rho > 0 else None,
                decide=self.rules.policy(tick.step, tick.total_steps, tick.scale) if policy else None,
            )
        self._count(result, rho)
        return result

    @contextmanager
    def _policy_undone_on_error(self) -> Iterator[None]:
        """A step that raises (its weights restored by the engine) leaves the policy's moments as they were, so that
        a retried batch counts once."""
        state = self.state
        moments = (state.policy_mean, state.policy_var, state.policy_full, state.policy_decided)
        try:
            yield
        except BaseException:
            state.policy_mean, state.policy_var, state.policy_full, state.policy_decided = moments
            raise

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
        self, result: StepResult, tick: Tick, *, optimizer_step: Callable[[], bool], zero_grad: Callable[[], None]
    ) -> bool:
        """Close the accumulation window of optimizer step ``tick.step``: average G, skip a non-finite step, apply
        LookSAM or the family's rule, step (``optimizer_step``, clipping included, returns whether it stepped),
        zero. Returns whether it stepped."""
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
                f"non-finite loss or gradient at global_step={tick.step}: the optimizer step is skipped "
                f"and the weights are unchanged ({state.steps_skipped} skipped so far)",
                RuntimeWarning,
                stacklevel=5,
            )
            self._zero(zero_grad)
            return False
        if self.config.reuse is not None:
            self._reuse(plain, tick.step, tick.total_steps, tick.schedulers)
        after = self.rules.before_step(result, engine.params, plain, window, tick.scale) if plain is not None else None
        self._leave_late_params()
        try:
            stepped = optimizer_step()
        except BaseException:
            engine.rollback()
            raise
        if after is not None and not (tick.scaler is not None and tick.scaler.get_scale() < (tick.scale or 0.0)):
            after()  # not after a step the loss scaler skipped (inf or NaN in G)
        self._zero(zero_grad)
        return stepped

    def _leave_late_params(self) -> None:
        """A group added inside this window joins at the next one: this window's step leaves its parameters as they
        are (their ``.grad`` holds whatever part of the window's passes reached them)."""
        window = set(self.stepped_params)
        for p in optimizer_params(self.optimizer):
            if id(p) not in window:
                p.grad = None

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

    def saved_params(self) -> Optional[list[int]]:
        """Before the loop state is saved: where its per-parameter lists stand among the base optimizer's
        parameters. ``None``: all of them, in order (at a window's start a changed set of groups is followed first,
        as the next step would). Inside a window a group added since its start joins at the next window, so the
        window's parameters are saved as positions, and :meth:`restore_params` takes them back."""
        params = optimizer_params(self.optimizer)
        if [id(p) for p in params] == self.stepped_params:
            return None
        if self.state.micro == 0:
            self.follow_param_groups()
            return None
        where = {id(p): i for i, p in enumerate(params)}
        if any(id(p) not in where for p in self.engine.params):
            raise ValueError(
                f"a parameter group was removed inside an accumulation window (micro-batch {self.state.micro} of "
                f"{self.config.accumulate_grad_batches}), whose gradients still cover it: save the state after the "
                "window's optimizer step"
            )
        return [where[id(p)] for p in self.engine.params]

    def restore_params(self, positions: Optional[list[int]], grads: Optional[Sequence[Any]] = None) -> None:
        """After a saved loop state is loaded: take back the window's parameters (:meth:`saved_params`), and refuse
        a state whose per-parameter lists (``grads``, an open window's gradients, among them) do not line up with
        them."""
        if positions is not None:
            params = optimizer_params(self.optimizer)
            window = [params[i] for i in positions]
            self.engine = DeltaSAM(self.module, self.config, window, reduce_squares=self.reduce_squares, driven=True)
            self.stepped_params = [id(p) for p in window]
        n, state = len(self.engine.params), self.state
        lists = {
            "grads": grads,
            "plain": state.plain_sum,
            "reuse": state.reuse_direction,
            "momentum": state.fsam_momentum,
        }
        for name, values in lists.items():
            if values is not None and len(values) != n:
                raise ValueError(
                    f"the saved loop state's {name!r} covers {len(values)} parameters, but this optimizer steps {n}: "
                    "it was saved with other parameter groups; load it into an optimizer over the same groups"
                )

    def follow_param_groups(self) -> None:
        """At a window's start: perturb and update the parameters the base optimizer steps now. A group added since
        the last step (Lightning's ``BackboneFinetuning`` unfreezes layers so) gets the engine rebuilt over them;
        before, its parameters kept their ascent gradient in G."""
        params = optimizer_params(self.optimizer)
        if [id(p) for p in params] == self.stepped_params:
            return
        state, old = self.state, self.engine.params
        self.engine = DeltaSAM(self.module, self.config, params, reduce_squares=self.reduce_squares, driven=True)
        new = self.engine.params
        if state.reuse_direction is not None:  # an added parameter's g_v is 0 (plain) until the next full step
            held = {id(p): d for p, d in zip(old, state.reuse_direction)}
            state.reuse_direction = [held[id(p)] if id(p) in held else local(torch.zeros_like(p)) for p in new]
            if set(held) - {id(p) for p in new}:  # a removed parameter: ||g_v|| over the rest, at the next use
                state.reuse_norm = None
        if state.fsam_momentum is not None:  # an added parameter's running mean starts at its first ascent gradient
            means = {id(p): m for p, m in zip(old, state.fsam_momentum)}
            state.fsam_momentum = [means.get(id(p)) for p in new]
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
