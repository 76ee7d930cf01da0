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

import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
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
    return config.perturbs and config.rho_warmup is not None and 0 < config.rho_warmup < 1


def clip_gradients(params: Sequence[Tensor], config: DeltaSAMConfig) -> None:
    """Clip G as ``gradient_clip_*`` say, with the torch functions Lightning's precision plugins call."""
    if config.gradient_clip_val is None:
        return
    if config.gradient_clip_algorithm == "norm":
        torch.nn.utils.clip_grad_norm_(params, config.gradient_clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, config.gradient_clip_val)


_LOOP_SHAPE = ("method", "accumulate_grad_batches", "interval", "reuse", "m_sharpness")
"""The config fields a saved loop state depends on: a state loads only into an optimizer that agrees on them."""


class _Skipped(Exception):
    """A closure returned ``None`` (Lightning's way of skipping a batch): the step is not taken."""


_NO_BATCH = object()

_HISTOGRAMS_DEFAULT = next(f.default for f in fields(DeltaSAMConfig) if f.name == "histogram_every_n_steps")

_COPIED = (
    "optimizer",
    "module",
    "config",
    "scaler",
    "_reduce_squares",
    "loop_state",
    "total_steps",
    "schedulers",
    "steps",
    "warned_lr_max",
    "_reads_histograms",
)
"""What a copy (``copy.deepcopy``, ``pickle``) of a DeltaSAMOptimizer carries; the engine is built again."""


class _Pass:
    """Which pass of ``step(closure)`` is running; one object shared by every view of the optimizer (Lightning's
    ``LightningOptimizer`` copies the wrapper's attributes, not their values)."""

    perturbed: bool = False


def _perturbed_closure(closure: Callable[[], Any]) -> AbstractContextManager:
    """What a closure's framework needs around its evaluation at w + ε: under Lightning's automatic optimization,
    ``training_step``'s logging, metric updates and step output are those of the pass at w
    (:mod:`lit_deltasam.lightning.automatic`). Lightning is imported only if the closure's caller already did."""
    if "lightning.pytorch" not in sys.modules:
        return nullcontext()
    from ..lightning.automatic import perturbed_closure

    return perturbed_closure(closure)


def _shared(name: str) -> property:
    """An attribute of the base optimizer, read and set through the wrapper, so that a scheduler built on either
    acts on one set of groups, also after torch's ``load_state_dict`` replaced the base's lists. (Before the base
    is attached, during ``torch.optim.Optimizer.__init__``, the wrapper holds its own.)"""

    def get(self: Any) -> Any:
        base = self.__dict__.get("optimizer")
        return getattr(base, name) if base is not None else self.__dict__[f"_own_{name}"]

    def put(self: Any, value: Any) -> None:
        base = self.__dict__.get("optimizer")
        if base is not None:
            setattr(base, name, value)
        else:
            self.__dict__[f"_own_{name}"] = value

    return property(get, put)


class DeltaSAMOptimizer(torch.optim.Optimizer):
    """A base optimizer driven by sharpness-aware steps: every field of :class:`~lit_deltasam.DeltaSAMConfig`
    honoured in a hand-written loop (``histogram_every_n_steps``, which only the Lightning mixin's loggers read, is
    refused when set), and a ``torch.optim.Optimizer`` that LR schedulers and tooling accept.

    Its ``param_groups`` are the base optimizer's (a scheduler of either moves both). Step hooks, the optimizer's own
    (``register_step_pre_hook``, ``register_step_post_hook``) and torch's global ones, fire once per optimizer step
    the base optimizer takes: not per micro-batch, not for a skipped step, and the global ones for the base optimizer
    only. ``copy.deepcopy`` and ``pickle`` carry the model, the base optimizer, the config and the loop state (an open
    window's gradients included), as ``state_dict`` does; step hooks are not copied, as in torch. Three ways to
    step:

    * ``step(loss_fn, batch)``: ``loss_fn(batch)`` returns per-instance losses ``[n]`` (every method), or
      a scalar mean loss (``erm``, ``sam``, ``asam`` and their m-sharpness; not ``deltasam`` or
      ``per_instance``, which need one loss per instance);
    * ``step(closure)``: torch's convention (``closure()`` zeroes, computes the loss, calls backward and
      returns the loss), called twice per step; for ``erm``, ``sam`` and ``asam`` without m-sharpness or
      accumulation (a closure is one optimizer step on one batch). This is what Lightning's automatic
      optimization calls; its 16-mixed precision, which runs the closure once before a loss-scaler step,
      and its gradient accumulation, which passes only the last micro-batch's closure, are refused by name:
      use :class:`~lit_deltasam.DeltaSAMMixin` for those;
    * the pieces :meth:`micro_step` and :meth:`end_window`, as the Lightning mixin calls them through :meth:`drive`.

    Args:
        module: the model; ``loss_fn`` must compute through it.
        optimizer: the base optimizer (any ``torch.optim.Optimizer``); its parameters are perturbed.
        config: the method and its hyperparameters (default: ``DeltaSAMConfig()``).
        scaler: a ``torch.amp.GradScaler`` for mixed precision: the losses are scaled for both backward
            passes, G is unscaled before clipping and the base step, and a step whose G overflowed is
            skipped by the scaler (the weights unchanged; the step counts, as in Lightning) while the scale
            backs off.
        total_steps: optimizer steps in the run, needed only when ``rho_warmup`` is a fraction.
        schedulers: LR schedulers of ``optimizer`` whose maximum ``follow_lr`` should read
            (CyclicLR); stepping them stays the caller's, after a :meth:`step` that stepped.
        seed: base of the per-step seeds (``seed_steps``); default ``torch.initial_seed()``.
        reduce_squares: as for :class:`DeltaSAM` (FSDP1 shards).
        state: the loop state to continue (the mixin passes the one a checkpoint restored).
        reads_histograms: the caller logs the histograms of ``histogram_every_n_steps`` (the Lightning mixin
            does); otherwise a ``histogram_every_n_steps`` set in the config is refused, as nothing would read it.

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

    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: Optional[DeltaSAMConfig] = None,
        *,
        scaler: Optional[Any] = None,
        total_steps: Optional[int] = None,
        schedulers: Sequence[Any] = (),
        seed: Optional[int] = None,
        reduce_squares: Optional[NormReduce] = None,
        state: Optional[LoopState] = None,
        reads_histograms: bool = False,
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"DeltaSAMOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; pass e.g. "
                "torch.optim.AdamW(model.parameters())"
            )
        config = config if config is not None else DeltaSAMConfig()
        every = config.histogram_every_n_steps
        if not reads_histograms and every != _HISTOGRAMS_DEFAULT:
            raise ValueError(
                f"DeltaSAMConfig.histogram_every_n_steps={every} is read only by DeltaSAMMixin, which logs the "
                "histograms to Lightning's loggers; DeltaSAMOptimizer logs nothing, so it would be ignored. Leave it "
                "unset and log result.loss_change (and result.weights) from the StepResult yourself"
            )
        self._reads_histograms = reads_histograms
        self._pass = _Pass()
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer  # from here on param_groups, state and defaults are the base's
        for name in ("param_groups", "state", "defaults"):
            del self.__dict__[f"_own_{name}"]
        self.module = module
        self.config = config
        self.scaler = scaler
        self.engine = DeltaSAM(module, config, optimizer_params(optimizer), reduce_squares=reduce_squares, driven=True)
        self._reduce_squares = reduce_squares
        self._stepped_params = [id(p) for p in self.engine.params]
        self.loop_state = state if state is not None else LoopState()
        self.total_steps = total_steps
        self.schedulers = list(schedulers)
        if seed is not None and self.loop_state.base_seed is None:
            self.loop_state.base_seed = seed
        self.steps = 0
        """Optimizer steps taken by :meth:`step` (a hand-written loop's ``global_step``); a step whose update a loss
        scaler skipped counts, as in Lightning's ``global_step``, and a skipped non-finite step does not."""
        self.warned_lr_max = False

    @property
    def perturbed_pass(self) -> bool:
        """True while ``step(closure)`` evaluates the closure at w + ε, the second of its two evaluations.

        Under Lightning's automatic optimization ``training_step`` runs in both; what it logs with ``self.log``,
        the torchmetrics it updates and the loss it returns count from the first (at w) only. Read this flag in
        ``training_step`` to skip any other side effect in the second: ``if not self.optimizers().perturbed_pass``.
        """
        return self._pass.perturbed  # also through Lightning's LightningOptimizer, which forwards attributes

    def __repr__(self) -> str:
        cfg = self.config
        fields_set = [
            f"{f.name}={getattr(cfg, f.name)!r}"
            for f in fields(cfg)
            if f.name not in ("method", "rho") and getattr(cfg, f.name) != f.default
        ]
        described = ", ".join([f"method={cfg.method!r}", f"rho={cfg.rho!r}", *fields_set])
        base = repr(self.optimizer).replace("\n", "\n    ")
        return f"DeltaSAMOptimizer({type(self.optimizer).__name__}, {described}) over\n    {base}"

    def __getstate__(self) -> dict[str, Any]:
        """The model, base optimizer, config and loop state (``copy.deepcopy``, ``pickle``); the engine is built
        again from them, and an open accumulation window's gradients are carried, as in :meth:`state_dict`."""
        state = {name: self.__dict__[name] for name in _COPIED}
        if self.loop_state.micro:
            state["grads"] = [None if p.grad is None else p.grad.detach().clone() for p in self.engine.params]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        grads = state.pop("grads", None)
        if "optimizer" not in state or "module" not in state:
            raise ValueError(
                "this DeltaSAMOptimizer was copied without its model and base optimizer (keys "
                f"{sorted(state)}); build a new DeltaSAMOptimizer and load_state_dict() the original's state_dict()"
            )
        self.__init__(  # type: ignore[misc]
            state["module"],
            state["optimizer"],
            state["config"],
            scaler=state["scaler"],
            total_steps=state["total_steps"],
            schedulers=state["schedulers"],
            reduce_squares=state["_reduce_squares"],
            state=state["loop_state"],
            reads_histograms=state["_reads_histograms"],
        )
        self.steps, self.warned_lr_max = state["steps"], state["warned_lr_max"]
        if grads is not None:
            for p, g in zip(self.engine.params, grads):
                p.grad = g

    # ---- the pieces, shared with the Lightning mixin ----

    def rho(self, step: int, total_steps: Optional[int] = None, schedulers: Optional[Sequence[Any]] = None) -> float:
        """ρ of optimizer step ``step`` under ``rho_schedule``: 0 on the plain steps of ``interval``."""
        return self.scheduled_rho(step, total_steps, schedulers) if self.full_step(step) else 0.0

    def scheduled_rho(
        self, step: int, total_steps: Optional[int] = None, schedulers: Optional[Sequence[Any]] = None
    ) -> float:
        """ρ of optimizer step ``step`` under ``rho_schedule`` (the same on every rank, and after a resume)."""
        cfg = self.config
        if cfg.rho_schedule == "constant" or not cfg.perturbs:
            return scheduled_rho(cfg, step)
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
            state = self.loop_state
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
        cfg, state = self.config, self.loop_state
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
        state = self.loop_state
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
        state, engine = self.loop_state, self.engine
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
        cfg, state, engine = self.config, self.loop_state, self.engine
        if state.reuse_direction is not None:  # moved once to where the parameters are (after a resume)
            state.reuse_direction = [d.to(p.device, p.dtype) for d, p in zip(state.reuse_direction, engine.params)]
        assert cfg.reuse_alpha is not None  # resolved by DeltaSAMConfig where reuse is set
        reuse = Reuse(cfg.reuse_alpha, engine.reduce_squares, state.reuse_direction, state.reuse_norm)
        if plain is None:
            # the reused term follows the ρ schedule as the full steps do
            strength = self.scheduled_rho(step, schedulers=schedulers) / cfg.rho if cfg.rho else 0.0
            reuse.apply([p.grad for p in engine.params], strength)
            state.reuse_norm = reuse.norm
            return
        plain = state.plain_over_ranks(plain)
        full = [torch.zeros_like(p) if p.grad is None else p.grad for p in engine.params]
        reuse.record(full, plain)
        state.reuse_direction, state.reuse_norm = reuse.direction, reuse.norm

    # ---- one driver for every loop ----

    def window_ends(self, last_batch: bool = False) -> bool:
        """Whether the next micro-batch closes the accumulation window: the window is full, or the data ends."""
        return last_batch or self.loop_state.micro + 1 >= self.config.accumulate_grad_batches

    def full_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` is a full sharpness-aware step under ``interval``."""
        return step % self.config.interval == 0

    def drive(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        step: int,
        last: bool,
        optimizer_step: Callable[[], bool],
        zero_grad: Callable[[], None],
        rho: Optional[float] = None,
        backward: Optional[Backward] = None,
        no_sync: Optional[NoSync] = None,
        check_finite: bool = True,
        rank: int = 0,
        schedulers: Optional[Sequence[Any]] = None,
        stale_advice: Optional[str] = None,
    ) -> StepResult:
        """One micro-batch of optimizer step ``step`` at its scheduled ρ (``rho`` if given); when ``last``, close
        the window with ``optimizer_step`` and ``zero_grad``. The hand-written loop and the mixin both run this.
        ``stale_advice`` replaces the advice of the refusal of gradients found in ``.grad`` at a window's start."""
        if self.loop_state.micro == 0:
            self._follow_param_groups()
            self._refuse_stale_gradients(step, stale_advice)
        if rho is None:
            rho = self.rho(step, schedulers=schedulers)
        result = self.micro_step(
            loss_fn, batch, rho=rho, last=last, backward=backward, no_sync=no_sync, check_finite=check_finite, rank=rank
        )
        if last:
            result.stepped = self.end_window(
                result, step=step, optimizer_step=optimizer_step, zero_grad=zero_grad, schedulers=schedulers
            )
        return result

    def _follow_param_groups(self) -> None:
        """At a window's start: perturb and update the parameters the base optimizer steps now. A group added since
        the last step (Lightning's ``BackboneFinetuning`` unfreezes layers so) gets the engine rebuilt over them;
        before, its parameters kept their ascent gradient in G."""
        params = optimizer_params(self.optimizer)
        if [id(p) for p in params] == self._stepped_params:
            return
        if self.loop_state.reuse_direction is not None:
            raise ValueError(
                f"the base optimizer's parameters changed at optimizer step {self.steps} (a group added or removed), "
                f"and reuse={self.config.reuse!r} holds a direction over the old ones; build a new "
                "DeltaSAMOptimizer around the base optimizer"
            )
        self.engine = DeltaSAM(self.module, self.config, params, reduce_squares=self._reduce_squares, driven=True)
        self._stepped_params = [id(p) for p in params]

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

    # ---- a hand-written loop, and torch's step(closure) ----

    def step(  # type: ignore[override]
        self,
        loss_fn: Optional[Callable[..., Any]] = None,
        batch: Batch = _NO_BATCH,
        *,
        closure: Optional[Callable[[], Any]] = None,
        backward: Optional[Backward] = None,
        no_sync: Optional[NoSync] = None,
        last: Optional[bool] = None,
    ) -> Optional[StepResult]:
        """One micro-batch; at the end of each accumulation window, one step of the base optimizer.

        Args:
            loss_fn: maps ``batch`` to ``[n]`` per-instance losses through ``module`` (or to a scalar
                mean loss, for the methods that need no per-instance loss). Called with no ``batch``, it
                is a closure, as ``closure``.
            batch: any pytree whose tensors have the instances on dimension 0.
            closure: torch's closure (zeroes, computes the loss, runs backward, returns the loss),
                evaluated at w and at w + eps; one closure is one optimizer step.
            backward: as for :meth:`DeltaSAM.step` (not with ``scaler``, which scales the losses itself).
            no_sync: DDP's ``no_sync``, so that only a window's last micro-batch all-reduces.
            last: end the window with this micro-batch (an epoch's last, shorter window);
                default: after ``accumulate_grad_batches`` micro-batches.

        Returns:
            The micro-batch's :class:`StepResult`; ``result.stepped`` tells whether the window ended in an
            optimizer step (then step the LR schedulers); a step whose update the loss scaler skipped counts,
            as in Lightning's ``global_step``. ``None`` when a closure returned ``None``
            (a skipped batch): nothing was stepped.
        """
        if batch is _NO_BATCH and closure is None:
            closure, loss_fn = loss_fn, None
        if closure is not None:
            if loss_fn is not None or batch is not _NO_BATCH:
                raise TypeError("DeltaSAMOptimizer.step takes a closure or loss_fn and batch, not both")
            return self._closure_step(closure)
        if loss_fn is None:
            raise TypeError(
                "DeltaSAMOptimizer.step() got neither loss_fn and batch nor a closure: a sharpness-aware step "
                "evaluates the loss twice. (Lightning's precision='16-mixed' runs the closure once and steps through "
                "its GradScaler without one: use DeltaSAMMixin there, or DeltaSAMOptimizer(..., scaler=) in your "
                "own loop.)"
            )
        if backward is not None and self.scaler is not None:
            raise ValueError(
                "DeltaSAMOptimizer.step got backward= and the optimizer has a scaler: the scaler scales the losses "
                "itself; drop backward= (or build the optimizer without scaler= and scale in your backward)"
            )
        if self.scaler is not None:
            scaler = self.scaler
            backward = lambda loss: scaler.scale(loss).backward()  # noqa: E731
        if last is None:
            last = self.window_ends()
        active = self._active_scaler()
        scale = active.get_scale() if active is not None else None  # both passes' (the window's end may move it)
        result = self.drive(
            loss_fn,
            batch,
            step=self.steps,
            last=last,
            optimizer_step=self._optimizer_step,
            zero_grad=self.zero_grad,
            backward=backward,
            no_sync=no_sync,
            check_finite=active is None,
            rank=this_rank(),
        )
        if scale is not None and result.grad_norm is not None:
            result.grad_norm = result.grad_norm / scale
        self.steps += result.stepped
        return result

    # torch wraps an optimizer class's step in its step hooks unless marked: this step is a micro-batch, which may
    # not step at all; the hooks fire from the base optimizer's step instead (_own_hooks_on_the_base)
    step.hooked = True  # type: ignore[attr-defined]

    def _closure_step(self, closure: Callable[[], Any]) -> Optional[StepResult]:
        cfg = self.config
        refused = [
            (cfg.accumulate_grad_batches > 1, f"accumulate_grad_batches={cfg.accumulate_grad_batches}"),
            (cfg.m_sharpness is not None, f"m_sharpness={cfg.m_sharpness}"),
            (cfg.reweights or cfg.method == "per_instance", f"method={cfg.method!r} (per-instance losses)"),
            (self.scaler is not None, "scaler= (the closure runs its own backward)"),
            (cfg.ascent == "local" and cfg.perturbs and world_size() > 1, "ascent='local' under DDP"),
        ]
        for bad, what in refused:
            if bad:
                raise ValueError(
                    f"DeltaSAMOptimizer.step(closure) cannot run {what}: a closure is one scalar loss of one batch, "
                    "evaluated with its own backward (all-reduced under DDP); call step(loss_fn, batch) with per-"
                    "instance losses, or use DeltaSAMMixin in Lightning"
                )
        passes = 0

        def loss_of(_: Batch) -> Tensor:
            nonlocal passes
            passes += 1
            perturbed = passes > 1
            self._pass.perturbed = perturbed
            try:
                with torch.enable_grad(), _perturbed_closure(closure) if perturbed else nullcontext():
                    loss = closure()
            finally:
                self._pass.perturbed = False
            if loss is None:
                raise _Skipped
            return torch.as_tensor(loss).detach().reshape(1)

        try:
            result = self.drive(
                loss_of,
                None,
                step=self.steps,
                last=True,
                optimizer_step=self._optimizer_step,
                zero_grad=self.zero_grad,
                backward=lambda loss: None,
                stale_advice=(
                    "step(closure) evaluates the closure itself at w and at w + eps. Under Lightning's automatic "
                    "optimization this is Trainer(accumulate_grad_batches > 1), which passes only a window's last "
                    "closure: use DeltaSAMMixin with DeltaSAMConfig(accumulate_grad_batches=k). In a loop of your own, "
                    "zero them first (davda54/sam's example runs a backward before step(closure), not needed here)"
                ),
            )
        except _Skipped:
            self.zero_grad()
            self.loop_state.micro = 0
            return None
        self.steps += result.stepped
        return result

    def _active_scaler(self) -> Optional[Any]:
        """The loss scaler, where it scales the losses and decides the skips (a disabled one does neither)."""
        return self.scaler if self.scaler is not None and self.scaler.is_enabled() else None

    def _optimizer_step(self) -> bool:
        """The base optimizer's step, clipping included. A step that a loss scaler skips (inf or NaN in G; the scale
        backs off) counts as taken, as in Lightning's ``global_step`` and torch's AMP recipe, which steps the LR
        schedulers after every ``scaler.step``: ρ's schedule, ``interval`` and the LR then agree with the mixin's."""
        params = optimizer_params(self.optimizer)
        scaler = self._active_scaler()
        with self._own_hooks_on_the_base():
            if scaler is None:
                clip_gradients(params, self.config)
                self.optimizer.step()
                return True
            scaler.unscale_(self.optimizer)
            clip_gradients(params, self.config)
            scaler.step(self.optimizer)  # steps the base only if G is finite
            scaler.update()
            return True

    @contextmanager
    def _own_hooks_on_the_base(self) -> Iterator[None]:
        """Fire this optimizer's step hooks from the base optimizer's step, so that they run exactly when the base
        steps (after torch's global pre-hooks, before its global post-hooks), with this optimizer as their first
        argument."""
        pre, post = self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks
        if not pre and not post:
            yield
            return

        def run_pre(_: Any, args: Any, kwargs: Any) -> Any:
            for hook in list(pre.values()):
                out = hook(self, args, kwargs)
                if out is not None:
                    args, kwargs = out
            return args, kwargs

        def run_post(_: Any, args: Any, kwargs: Any) -> None:
            for hook in list(post.values()):
                hook(self, args, kwargs)

        handles = [self.optimizer.register_step_pre_hook(run_pre), self.optimizer.register_step_post_hook(run_post)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "engine" not in self.__dict__:  # torch.optim.Optimizer.__init__ registering the base's groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)  # the next window's step perturbs and updates them too

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, the loop state and an open window's partial gradients (this rank's)."""
        state = self.loop_state
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "loop": state.scalars(), "steps": self.steps}
        out["config"] = {name: getattr(self.config, name) for name in _LOOP_SHAPE}
        if state.micro:
            out["grads"] = [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.engine.params
            ]
        if state.plain_sum is not None:
            out["plain"] = [g.detach().clone() for g in state.plain_sum]
        if state.reuse_direction is not None:
            out["reuse"] = [d.detach().clone() for d in state.reuse_direction]
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if not isinstance(saved, dict) or "loop" not in saved or "optimizer" not in saved:
            raise ValueError(
                "DeltaSAMOptimizer.load_state_dict takes what DeltaSAMOptimizer.state_dict() returned (keys "
                "'optimizer', 'loop', 'steps'); load a base optimizer's own state into optimizer.optimizer"
            )
        differ = {k: v for k, v in saved.get("config", {}).items() if getattr(self.config, k) != v}
        if differ:
            now = {k: getattr(self.config, k) for k in differ}
            raise ValueError(
                f"DeltaSAMOptimizer.load_state_dict: the state was saved with {differ}, this optimizer has {now}; "
                "its loop state (the open window, LookSAM's direction) would not mean the same here"
            )
        self.optimizer.load_state_dict(saved["optimizer"])
        self.loop_state = LoopState.from_scalars(saved["loop"])
        self.loop_state.plain_sum = saved.get("plain")
        self.loop_state.reuse_direction = saved.get("reuse")
        self.steps = saved["steps"]
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])
        grads = saved.get("grads")
        for i, p in enumerate(self.engine.params):
            p.grad = None if grads is None else grads[i].to(p.device, p.dtype).clone()
