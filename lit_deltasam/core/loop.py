"""A torch ``Optimizer`` over the loop :class:`~.driver.Driver`: sharpness-aware training in a hand-written loop.

:class:`DeltaSAMOptimizer` owns the base optimizer and one driver (ρ's schedule, the accumulation window, clipping,
LookSAM, the per-step seeds, the loop state); ``step`` runs one micro-batch through it. The Lightning mixin runs the
same driver with Lightning's backward, sync control and optimizer step, so that one config trains the same weights
in both.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from typing import Any, Optional

import torch
from torch import nn

from ..config import DeltaSAMConfig
from .batch import Batch
from .closure import Pass, closure_step
from .distributed import rank as this_rank
from .driver import LOOP_SHAPE, Driver, LoopState, refuse_other_shape
from .engine import Backward, DeltaSAM, NoSync, StepResult
from .sharding import NormReduce

_NO_BATCH = object()

_NO_LOSS = (
    "DeltaSAMOptimizer.step() got neither loss_fn and batch nor a closure: a sharpness-aware step evaluates the loss "
    "twice. (Lightning's precision='16-mixed' runs the closure once and steps through its GradScaler without one: "
    "use DeltaSAMMixin there, or DeltaSAMOptimizer(..., scaler=) in your own loop.)"
)

_HISTOGRAMS_DEFAULT = next(f.default for f in fields(DeltaSAMConfig) if f.name == "histogram_every_n_steps")

_COPIED = ("optimizer", "module", "config", "scaler", "steps")
"""What a copy (``copy.deepcopy``, ``pickle``) of a DeltaSAMOptimizer carries; the engine is built again."""


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
    window's gradients included), as ``state_dict`` does; step hooks are not copied, as in torch. Two ways to
    step (the Lightning mixin runs the same :class:`~.driver.Driver` with Lightning's own step):

    * ``step(loss_fn, batch)``: ``loss_fn(batch)`` returns per-instance losses ``[n]`` (every method), or
      a scalar mean loss (``erm``, ``sam``, ``asam`` and their m-sharpness; not ``deltasam`` or
      ``per_instance``, which need one loss per instance);
    * ``step(closure)``: torch's convention (``closure()`` zeroes, computes the loss, calls backward and
      returns the loss), called twice per step; for ``erm``, ``sam`` and ``asam`` without m-sharpness or
      accumulation (a closure is one optimizer step on one batch). This is what Lightning's automatic
      optimization calls; its 16-mixed precision, which runs the closure once before a loss-scaler step,
      and its gradient accumulation, which passes only the last micro-batch's closure, are refused by name:
      use :class:`~lit_deltasam.DeltaSAMMixin` for those.

    Args:
        module: the model; ``loss_fn`` must compute through it.
        optimizer: the base optimizer (any ``torch.optim.Optimizer``); its parameters are perturbed.
        config: the method and its hyperparameters (default: ``DeltaSAMConfig()``).
        scaler: a ``torch.amp.GradScaler`` for mixed precision: the losses are scaled for both backward
            passes, G is unscaled before clipping and the base step, and a step whose G overflowed is
            skipped by the scaler (the weights unchanged; the step counts, as in Lightning) while the scale
            backs off.
        total_steps: optimizer steps in the run, needed where ``rho_warmup`` is a fraction and by ``policy="adaptive"``.
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
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"DeltaSAMOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}; pass e.g. "
                "torch.optim.AdamW(model.parameters())"
            )
        config = config if config is not None else DeltaSAMConfig()
        _refuse_unread(config)
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1
        ):
            raise ValueError(
                f"DeltaSAMOptimizer(total_steps={total_steps!r}): give the run's number of optimizer steps, an int "
                ">= 1 (or None where neither a fractional rho_warmup nor policy='adaptive' needs it)"
            )
        self.pass_ = Pass()
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer  # from here on param_groups, state and defaults are the base's
        for name in ("param_groups", "state", "defaults"):
            del self.__dict__[f"_own_{name}"]
        self.module = module
        self.config = config
        self.scaler = scaler
        loop_state = state if state is not None else LoopState()
        if seed is not None and loop_state.base_seed is None:
            loop_state.base_seed = seed
        self.driver = Driver(
            module,
            optimizer,
            config,
            loop_state,
            reduce_squares=reduce_squares,
            total_steps=total_steps,
            schedulers=schedulers,
        )
        self.steps = 0
        """Optimizer steps taken by :meth:`step` (a hand-written loop's ``global_step``); a step whose update a loss
        scaler skipped counts, as in Lightning's ``global_step``, and a skipped non-finite step does not."""

    @property
    def perturbed_pass(self) -> bool:
        """True while ``step(closure)`` evaluates the closure at w + ε, the second of its two evaluations.

        Under Lightning's automatic optimization ``training_step`` runs in both; what it logs with ``self.log``,
        the torchmetrics it updates and the loss it returns count from the first (at w) only. Read this flag in
        ``training_step`` to skip any other side effect in the second: ``if not self.optimizers().perturbed_pass``.
        """
        return self.pass_.perturbed  # also through Lightning's LightningOptimizer, which forwards attributes

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
        schedule = self.driver.schedule
        state.update(
            window_params=self.driver.saved_params(),
            loop_state=self.loop_state,
            reduce_squares=self.driver.reduce_squares,
            total_steps=schedule.total_steps,
            schedulers=schedule.schedulers,
            warned_lr_max=schedule.warned_lr_max,
        )
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
        self.__init__(  # type: ignore[misc]  # torch.optim.Optimizer has no __setstate__ that rebuilds the wrapper
            state["module"],
            state["optimizer"],
            state["config"],
            scaler=state["scaler"],
            total_steps=state["total_steps"],
            schedulers=state["schedulers"],
            reduce_squares=state["reduce_squares"],
            state=state["loop_state"],
        )
        self.steps, self.driver.schedule.warned_lr_max = state["steps"], state["warned_lr_max"]
        self.driver.restore_params(state.get("window_params"), grads)
        if grads is not None:
            for p, g in zip(self.engine.params, grads):
                p.grad = g

    @property
    def engine(self) -> DeltaSAM:
        """The double step of one micro-batch (rebuilt when the base optimizer's parameters change)."""
        return self.driver.engine

    @property
    def loop_state(self) -> LoopState:
        return self.driver.state

    # ---- a hand-written loop, and torch's step(closure) ----

    def step(  # type: ignore[override]  # torch's step(closure), extended with (loss_fn, batch)
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
            loss_fn: maps ``batch`` to ``[n]`` per-instance losses through ``module`` (or to a scalar mean loss, for
                the methods that need no per-instance loss); called with no ``batch``, it is a closure.
            batch: any pytree whose tensors have the instances on dimension 0.
            closure: torch's closure (zeroes, computes the loss, runs backward, returns the loss), evaluated at w
                and at w + eps; one closure is one optimizer step.
            backward: as for :meth:`DeltaSAM.step` (not with ``scaler``, which scales the losses itself).
            no_sync: DDP's ``no_sync``, so that only a window's last micro-batch all-reduces.
            last: end the window with this micro-batch (an epoch's last); default: after
                ``accumulate_grad_batches`` micro-batches.

        Returns:
            The micro-batch's :class:`StepResult`; ``result.stepped`` tells whether the window ended in an optimizer
            step (then step the LR schedulers; a step a loss scaler skipped counts, as in Lightning). ``None`` when
            a closure returned ``None`` (a skipped batch): nothing was stepped.
        """
        if batch is _NO_BATCH and closure is None:
            closure, loss_fn = loss_fn, None
        if closure is not None:
            if loss_fn is not None or batch is not _NO_BATCH:
                raise TypeError("DeltaSAMOptimizer.step takes a closure or loss_fn and batch, not both")
            return closure_step(self, closure)
        if loss_fn is None:
            raise TypeError(_NO_LOSS)
        result = self.driver.drive(
            loss_fn,
            batch,
            step=self.steps,
            last=self.driver.window_ends() if last is None else last,
            optimizer_step=self.base_step,
            zero_grad=self.zero_grad,
            backward=self._backward(backward),
            no_sync=no_sync,
            scaler=self.scaler,
            rank=this_rank(),
        )
        self.steps += result.stepped
        return result

    def _backward(self, backward: Optional[Backward]) -> Optional[Backward]:
        """The caller's backward, or the scaler's: one of the two scales the losses."""
        if self.scaler is None:
            return backward
        if backward is not None:
            raise ValueError(
                "DeltaSAMOptimizer.step got backward= and the optimizer has a scaler: the scaler scales the losses "
                "itself; drop backward= (or build the optimizer without scaler= and scale in your backward)"
            )
        scaler = self.scaler
        return lambda loss: scaler.scale(loss).backward()

    # torch wraps an optimizer class's step in its step hooks unless marked: this step is a micro-batch, which may
    # not step at all; the hooks fire from the base optimizer's step instead (_hooks_on_the_base)
    step.hooked = True  # type: ignore[attr-defined]  # torch's own marker on a function object

    def base_step(self) -> bool:
        """The base optimizer's step (:meth:`~.driver.Driver.base_step`), firing this optimizer's step hooks."""
        with _hooks_on_the_base(self, self.optimizer):
            return self.driver.base_step(self.scaler)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "driver" not in self.__dict__:  # torch.optim.Optimizer.__init__ registering the base's groups
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)  # the next window's step perturbs and updates them too

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, the loop state and an open window's partial gradients (this rank's)."""
        state, positions = self.loop_state, self.driver.saved_params()
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "loop": state.scalars(), "steps": self.steps}
        if positions is not None:
            out["window_params"] = positions
        out["config"] = {name: getattr(self.config, name) for name in LOOP_SHAPE}
        if state.micro:
            out["grads"] = [
                torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.engine.params
            ]
        if state.plain_sum is not None:
            out["plain"] = [g.detach().clone() for g in state.plain_sum]
        if state.reuse_direction is not None:
            out["reuse"] = [d.detach().clone() for d in state.reuse_direction]
        if state.fsam_momentum is not None:
            out["momentum"] = [None if m is None else m.detach().clone() for m in state.fsam_momentum]
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if not isinstance(saved, dict) or "loop" not in saved or "optimizer" not in saved:
            raise ValueError(
                "DeltaSAMOptimizer.load_state_dict takes what DeltaSAMOptimizer.state_dict() returned (keys "
                "'optimizer', 'loop', 'steps'); load a base optimizer's own state into optimizer.optimizer"
            )
        refuse_other_shape(saved.get("config", {}), self.config, "DeltaSAMOptimizer.load_state_dict")
        self.optimizer.load_state_dict(saved["optimizer"])
        loop_state = LoopState.from_scalars(saved["loop"])
        loop_state.plain_sum = saved.get("plain")
        loop_state.reuse_direction = saved.get("reuse")
        loop_state.fsam_momentum = saved.get("momentum")
        self.driver.state.restore(loop_state)
        self.steps = saved["steps"]
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])
        grads = saved.get("grads")
        self.driver.restore_params(saved.get("window_params"), grads)
        for i, p in enumerate(self.engine.params):
            p.grad = None if grads is None else grads[i].to(p.device, p.dtype).clone()


def _refuse_unread(config: DeltaSAMConfig) -> None:
    """What a hand-written loop does not read: ``histogram_every_n_steps`` (the Lightning mixin's loggers do), and
    ``gradient_clip_algorithm`` without ``gradient_clip_val`` (Lightning hands it to a user's clipping hook)."""
    if config.gradient_clip_val is None and config.gradient_clip_algorithm != "norm":
        raise ValueError(
            f"DeltaSAMConfig.gradient_clip_algorithm={config.gradient_clip_algorithm!r} without gradient_clip_val "
            "clips nothing; set gradient_clip_val too (e.g. gradient_clip_val=1.0), or leave the algorithm unset"
        )
    every = config.histogram_every_n_steps
    if every != _HISTOGRAMS_DEFAULT:
        raise ValueError(
            f"DeltaSAMConfig.histogram_every_n_steps={every} is read only by DeltaSAMMixin, which logs the histograms "
            "to Lightning's loggers; DeltaSAMOptimizer logs nothing, so it would be ignored. Leave it unset and log "
            "result.loss_change (and result.weights) from the StepResult yourself"
        )


@contextmanager
def _hooks_on_the_base(wrapper: torch.optim.Optimizer, base: torch.optim.Optimizer) -> Iterator[None]:
    """Fire ``wrapper``'s step hooks from ``base``'s step, so that they run exactly when the base steps (after
    torch's global pre-hooks, before its global post-hooks), with the wrapper as their first argument."""
    pre, post = wrapper._optimizer_step_pre_hooks, wrapper._optimizer_step_post_hooks
    if not pre and not post:
        yield
        return

    def run_pre(_: Any, args: Any, kwargs: Any) -> Any:
        for hook in list(pre.values()):
            out = hook(wrapper, args, kwargs)
            if out is not None:
                args, kwargs = out
        return args, kwargs

    def run_post(_: Any, args: Any, kwargs: Any) -> None:
        for hook in list(post.values()):
            hook(wrapper, args, kwargs)

    handles = [base.register_step_pre_hook(run_pre), base.register_step_post_hook(run_post)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
