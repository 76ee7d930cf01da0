"""The training loop's rules around the double step, in plain PyTorch: one object for hand-written loops and the
Lightning mixin alike.

:class:`DeltaSAM` runs one (micro-)batch's double step. :class:`DeltaSAMOptimizer` owns the
base optimizer and everything that is per-step state: ρ along its schedule (read from the
base optimizer's LR for ``follow_lr``), the full steps of ``interval``, LookSAM's stored
direction, the accumulation window, clipping of G, the skipped-step counts and the
per-step seeds. A hand-written loop calls :meth:`DeltaSAMOptimizer.step` once per
micro-batch; the mixin calls the same pieces (:meth:`~DeltaSAMOptimizer.micro_step`,
:meth:`~DeltaSAMOptimizer.end_window`) with Lightning's backward, sync control and
optimizer step, so that one config trains the same weights in both.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..config import DeltaSAMConfig
from .amortized import Reuse
from .batch import Batch, LossFn
from .distributed import rank as this_rank
from .distributed import world_size
from .engine import Backward, DeltaSAM, NoSync, StepResult
from .randomness import seeded, step_seed
from .schedule import scheduled_rho
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

    TENSORS = ("plain_sum", "reuse_direction", "reuse_norm")

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


def stated_lr_max(optimizer: Any, schedulers: Iterable[Any] = ()) -> Optional[float]:
    """The largest LR that the first parameter group's schedule states in advance, if any states one:
    OneCycleLR's ``max_lr``, a scheduler's base LR (``initial_lr``), CyclicLR's ``max_lrs``."""
    group = optimizer.param_groups[0]
    stated = [float(group[k]) for k in ("max_lr", "initial_lr") if k in group]
    stated += [float(s.max_lrs[0]) for s in schedulers if getattr(s, "max_lrs", None)]
    return max(stated) if stated else None


def lr_ratio(optimizer: Any, peak_seen: float = 0.0, stated: Optional[float] = None) -> tuple[float, float]:
    """lr_t / lr_max of the first parameter group, and lr_max.

    lr_max is the largest of the current LR, ``peak_seen`` (the largest LR seen so far: a
    ReduceLROnPlateau sets no base LR) and ``stated`` (:func:`stated_lr_max`; without it the
    group's ``max_lr``, else its ``initial_lr``).
    """
    group = optimizer.param_groups[0]
    if stated is None:
        stated = float(group.get("max_lr", group.get("initial_lr", group["lr"])))
    peak = max(stated, float(group["lr"]), peak_seen)
    return (float(group["lr"]) / peak if peak > 0 else 1.0), peak


def needs_total_steps(config: DeltaSAMConfig) -> bool:
    """Whether ρ's schedule is a fraction of training, which needs the run's number of optimizer steps."""
    return config.perturbs and config.rho_schedule in ("warmup", "start_step") and 0 < config.rho_warmup < 1


def clip_gradients(params: Sequence[Tensor], config: DeltaSAMConfig) -> None:
    """Clip G as ``gradient_clip_*`` say, with the torch functions Lightning's precision plugins call."""
    if config.gradient_clip_val is None:
        return
    if config.gradient_clip_algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, config.gradient_clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, config.gradient_clip_val)


class DeltaSAMOptimizer:
    """A base optimizer driven by sharpness-aware steps: every field of :class:`~lit_deltasam.DeltaSAMConfig`
    honoured in a hand-written loop.

    Args:
        module: the model; ``loss_fn`` must compute through it.
        optimizer: the base optimizer (any ``torch.optim.Optimizer``); its parameters are perturbed.
        config: the method and its hyperparameters.
        total_steps: optimizer steps in the run, needed only when ``rho_warmup`` is a fraction.
        schedulers: LR schedulers of ``optimizer`` whose maximum ``follow_lr`` should read
            (CyclicLR); stepping them stays the caller's, after a :meth:`step` that stepped.
        seed: base of the per-step seeds (``seed_steps``); default ``torch.initial_seed()``.
        reduce_squares: as for :class:`DeltaSAM` (FSDP1 shards).
        state: the loop state to continue (the mixin passes the one a checkpoint restored).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                         DeltaSAMConfig(method="sam", rho=0.05, accumulate_grad_batches=2))
        >>> loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1], reduction="none")
        >>> for _ in range(4):
        ...     result = opt.step(loss_fn, (torch.randn(8, 4), torch.randint(0, 3, (8,))))
        >>> opt.steps
        2
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: DeltaSAMConfig,
        *,
        total_steps: Optional[int] = None,
        schedulers: Sequence[Any] = (),
        seed: Optional[int] = None,
        reduce_squares: Optional[NormReduce] = None,
        state: Optional[LoopState] = None,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.config = config
        self.engine = DeltaSAM(module, config, optimizer_params(optimizer), reduce_squares=reduce_squares, driven=True)
        self.state = state if state is not None else LoopState()
        self.total_steps = total_steps
        self.schedulers = list(schedulers)
        if seed is not None and self.state.base_seed is None:
            self.state.base_seed = seed
        self.steps = 0
        """Optimizer steps taken by :meth:`step` (a hand-written loop's ``global_step``)."""
        self.warned_lr_max = False

    # ---- the pieces, shared with the Lightning mixin ----

    def rho(self, step: int, total_steps: Optional[int] = None, schedulers: Optional[Sequence[Any]] = None) -> float:
        """ρ of optimizer step ``step`` under ``rho_schedule``: 0 on the plain steps of ``interval``."""
        cfg = self.config
        if step % cfg.interval:
            return 0.0
        return self.scheduled_rho(step, total_steps, schedulers)

    def scheduled_rho(
        self, step: int, total_steps: Optional[int] = None, schedulers: Optional[Sequence[Any]] = None
    ) -> float:
        """ρ of optimizer step ``step`` under ``rho_schedule`` (the same on every rank, and after a resume)."""
        cfg = self.config
        if cfg.rho_schedule == "constant" or not cfg.perturbs:
            return cfg.rho
        total = None
        if needs_total_steps(cfg):
            total = total_steps if total_steps is not None else self.total_steps
            if total is None:
                raise ValueError(
                    f"DeltaSAMConfig.rho_warmup={cfg.rho_warmup} is a fraction of training: pass "
                    "DeltaSAMOptimizer(..., total_steps=N), or give rho_warmup in optimizer steps (>= 1)"
                )
        ratio = 1.0
        if cfg.rho_schedule == "follow_lr":
            state = self.state
            stated = stated_lr_max(self.optimizer, self.schedulers if schedulers is None else schedulers)
            lr = float(self.optimizer.param_groups[0]["lr"])
            if lr > max(stated or 0.0, state.lr_peak) and state.lr_peak > 0 and not self.warned_lr_max:
                self.warned_lr_max = True
                warnings.warn(
                    f"rho_schedule='follow_lr' cannot tell lr_max: the LR rose from {state.lr_peak:g} to {lr:g} and "
                    "no scheduler states its maximum, so ρ stays at its full value while the LR rises. State the "
                    "peak in the parameter group (param_groups[0]['initial_lr'] = peak) or use rho_schedule='warmup'",
                    RuntimeWarning,
                    stacklevel=4,
                )
            ratio, state.lr_peak = lr_ratio(self.optimizer, state.lr_peak, stated)
        return scheduled_rho(cfg, step, total, ratio)

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
    ) -> StepResult:
        """One micro-batch's double step at radius ``rho`` under this step's seed; counted in the loop state."""
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
                plain_grad=cfg.reuse is not None and rho > 0,
            )
        self._count(result, rho)
        return result

    def _count(self, result: StepResult, rho: float) -> None:
        """Advance the loop state by one micro-batch; sum LookSAM's plain gradients over the window."""
        state = self.state
        state.micro += 1
        state.micro_batches += 1
        if self.config.perturbs and rho > 0:
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
        schedulers: Optional[Sequence[Any]] = None,
    ) -> bool:
        """Close the accumulation window: average G, skip a non-finite step, apply LookSAM, step, zero.

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
        if result.finite is False:
            state.steps_skipped += 1
            warnings.warn(
                f"non-finite loss or gradient at global_step={step}: the optimizer step is skipped "
                f"and the weights are unchanged ({state.steps_skipped} skipped so far)",
                RuntimeWarning,
                stacklevel=4,
            )
            self._zero(zero_grad)
            return False
        if self.config.reuse is not None:
            self._reuse(plain, step, schedulers)
        try:
            stepped = optimizer_step()
        except BaseException:
            engine.rollback()
            raise
        self._zero(zero_grad)
        return stepped

    def _zero(self, zero_grad: Callable[[], None]) -> None:
        """Zero the optimizer's gradients and those the step wrote to trainable parameters outside it."""
        zero_grad()
        for p in self.engine.unperturbed:
            p.grad = None

    def _reuse(self, plain: Optional[list[Tensor]], step: int, schedulers: Optional[Sequence[Any]]) -> None:
        """LookSAM at the window's end, on the synchronized G: store g_v after a full step, add it after a plain one."""
        cfg, state, engine = self.config, self.state, self.engine
        if state.reuse_direction is not None:  # moved once to where the parameters are (after a resume)
            state.reuse_direction = [d.to(p.device, p.dtype) for d, p in zip(state.reuse_direction, engine.params)]
        reuse = Reuse(cfg.reuse_alpha, engine.reduce_squares, state.reuse_direction, state.reuse_norm)
        if plain is None:
            # the reused term follows the ρ schedule as the full steps do
            strength = self.scheduled_rho(step, schedulers=schedulers) / cfg.rho if cfg.rho else 0.0
            reuse.apply([p.grad for p in engine.params], strength)
            state.reuse_norm = reuse.norm
            return
        if not state.plain_synced and world_size() > 1:
            for g in plain:
                torch.distributed.all_reduce(g, op=torch.distributed.ReduceOp.SUM)
        full = [torch.zeros_like(p) if p.grad is None else p.grad for p in engine.params]
        reuse.record(full, plain)
        state.reuse_direction, state.reuse_norm = reuse.direction, reuse.norm

    # ---- a hand-written loop ----

    def step(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        backward: Optional[Backward] = None,
        no_sync: Optional[NoSync] = None,
        last: Optional[bool] = None,
    ) -> StepResult:
        """One micro-batch; at the end of each accumulation window, one step of the base optimizer.

        Args:
            loss_fn: maps ``batch`` to ``[n]`` per-instance losses through ``module``.
            batch: any pytree whose tensors have the instances on dimension 0.
            backward: as for :meth:`DeltaSAM.step`.
            no_sync: DDP's ``no_sync``, so that only a window's last micro-batch all-reduces.
            last: end the window with this micro-batch (an epoch's last, shorter window);
                default: after ``accumulate_grad_batches`` micro-batches.

        Returns:
            The micro-batch's :class:`StepResult`; ``result.stepped`` tells whether the base
            optimizer stepped (then step the LR schedulers).
        """
        cfg = self.config
        if last is None:
            last = self.state.micro + 1 >= cfg.accumulate_grad_batches
        result = self.micro_step(
            loss_fn, batch, rho=self.rho(self.steps), last=last, backward=backward, no_sync=no_sync, rank=this_rank()
        )
        if last:
            result.stepped = self.end_window(
                result, step=self.steps, optimizer_step=self._optimizer_step, zero_grad=self.zero_grad
            )
            self.steps += result.stepped
        return result

    def _optimizer_step(self) -> bool:
        clip_gradients(optimizer_params(self.optimizer), self.config)
        self.optimizer.step()
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, the loop state and an open window's partial gradients (this rank's)."""
        state = self.state
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "loop": state.scalars(), "steps": self.steps}
        if state.micro:
            out["grads"] = [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.engine.params
            ]
        if state.plain_sum is not None:
            out["plain"] = [g.detach().clone() for g in state.plain_sum]
        if state.reuse_direction is not None:
            out["reuse"] = [d.detach().clone() for d in state.reuse_direction]
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.state = LoopState.from_scalars(saved["loop"])
        self.state.plain_sum = saved.get("plain")
        self.state.reuse_direction = saved.get("reuse")
        self.steps = saved["steps"]
        grads = saved.get("grads")
        for i, p in enumerate(self.engine.params):
            p.grad = None if grads is None else grads[i].to(p.device, p.dtype).clone()
