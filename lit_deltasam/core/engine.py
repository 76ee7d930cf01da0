"""The double step: ascent to a (re)weighted perturbation, descent at the perturbed point.

One :class:`DeltaSAM` runs every method of :class:`~lit_deltasam.DeltaSAMConfig`: it builds the parts a step works
on (:mod:`.parts`), the instance weights (:mod:`.scoring`) and one step strategy (:mod:`.steps`) at construction.
``step`` leaves G in ``.grad`` (added to whatever was there, so micro-batches accumulate) and the weights exactly
as they were; the caller then steps its optimizer. Derivation and step order: ``docs/method-card.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor, nn

from ..config import DeltaSAMConfig
from .batch import Batch, LossFn
from .distributed import refuse_static_graph, sum_over_ranks
from .norms import total_norm
from .parts import Backward, NoSync, Parts, Step
from .per_instance import PerInstance
from .result import StepResult
from .scoring import Scorer
from .sharding import NormReduce, is_sharded, local, shard_reduction
from .snapshot import Snapshot, put_grads, take_grads
from .steps import Plain, choose

__all__ = ["Backward", "DeltaSAM", "NoSync", "StepResult"]


def _default_backward(loss: Tensor) -> None:
    loss.backward()


def _recasting(loss_fn: LossFn) -> LossFn:
    """``loss_fn``, each call with autocast's cache cleared first. Inside a caller's ``torch.autocast`` region (cache
    on, its default) the cache keeps the low-precision copy of each weight made by the region's first forward; the
    step moves the weights in place between its passes, and the next forward would get the copies of w (SAM's
    descent at w: an ERM step, silently)."""

    def call(batch: Batch) -> Tensor:
        torch.clear_autocast_cache()
        return loss_fn(batch)

    return call


def _owned_parameters(module: nn.Module, params: Optional[Iterable[Tensor]]) -> tuple[list[Tensor], list[str]]:
    names = {id(p): name for name, p in module.named_parameters()}
    chosen = [p for p in module.parameters() if p.requires_grad] if params is None else list(params)
    seen: set[int] = set()
    for i, p in enumerate(chosen):
        if id(p) not in names:
            raise ValueError(
                f"parameter #{i} (shape {list(p.shape)}) is not owned by {type(module).__name__}; every perturbed "
                "parameter must be one of module.parameters() (build the optimizer from the module's parameters)"
            )
        if not p.requires_grad:
            raise ValueError(
                f"parameter {names[id(p)]!r} is frozen (requires_grad=False) and cannot be perturbed; leave it out "
                "of the optimizer, e.g. [p for p in module.parameters() if p.requires_grad]. (Resuming under "
                "Lightning's BackboneFinetuning or BaseFinetuning: it restores the groups it added but freezes their "
                "modules again, Lightning issue #21901; set requires_grad=True on them in its on_fit_start)"
            )
        if id(p) in seen:
            raise ValueError(f"parameter {names[id(p)]!r} appears twice")
        seen.add(id(p))
    if not chosen:
        raise ValueError(f"{type(module).__name__} has no trainable parameter to perturb")
    return list(chosen), [names[id(p)] for p in chosen]


_LOOP_DEFAULTS = {"interval": 1, "reuse": None, "accumulate_grad_batches": 1, "gradient_clip_val": None}


_STEP_RULES = {
    "gsam": "GSAM's descent",
    "wsam": "WSAM's sharpness term",
    "fsam": "Friendly-SAM's running mean of the gradient",
}


def _refuse_step_rules(config: DeltaSAMConfig) -> None:
    """The engine alone computes G of one micro-batch; the family's rules and the adaptive policy act at the optimizer
    step, with state across steps, which only a training loop holds."""
    rule = _STEP_RULES.get(config.method)
    what = f"method={config.method!r} ({rule})" if rule else "policy='adaptive' (its running moments of ||g||²)"
    if rule or (config.policy is not None and config.perturbs):
        raise ValueError(
            f"DeltaSAM runs one micro-batch's double step, and {what} acts at the optimizer step: use "
            "DeltaSAMOptimizer (a hand-written loop) or DeltaSAMMixin (Lightning); "
            "lit_deltasam.core.diagnostics.corrections measures one full step of any method"
        )


def _warn_of_loop_fields(config: DeltaSAMConfig) -> None:
    """The engine alone runs one micro-batch: name the fields that only a training loop can apply."""
    set_fields = [f"{k}={getattr(config, k)!r}" for k, v in _LOOP_DEFAULTS.items() if getattr(config, k) != v]
    if set_fields:
        warnings.warn(
            f"DeltaSAM runs one micro-batch's double step and leaves {', '.join(sorted(set_fields))} to the training "
            "loop; use DeltaSAMOptimizer (a hand-written loop) or DeltaSAMMixin (Lightning), which apply them",
            RuntimeWarning,
            stacklevel=3,
        )


def _refuse_sharded(config: DeltaSAMConfig) -> None:
    """Fail, saying why and what can run instead, where ``config`` cannot run on sharded parameters (FSDP)."""
    if config.perturbs and config.ascent == "local":
        raise ValueError(
            "DeltaSAMConfig.ascent='local' is not available with sharded parameters (FSDP): the backward "
            "reduce-scatters the ascent gradient, so every rank sees the full batch's; use ascent='global'"
        )
    if config.method == "per_instance":
        raise NotImplementedError(
            "method='per_instance' is not available under FSDP: per-instance gradients need whole parameters; "
            "use method='sam' or method='deltasam' with estimator='head'"
        )
    if config.reweights and config.estimator != "head":
        why = (
            "per-instance gradient norms need whole parameters"
            if config.estimator == "exact"
            else "FSDP's root unit keeps its parameters gathered across forwards, out of a probe's reach"
        )
        raise NotImplementedError(
            f"estimator={config.estimator!r} is not available under FSDP: {why}; choose one of ['head']"
        )
    if config.method in ("gsam", "wsam", "fsam"):
        raise NotImplementedError(
            f"method={config.method!r} is not available under FSDP: its rule takes inner products and keeps state "
            "over whole gradients; use method='sam' or 'deltasam'"
        )
    if config.reuse is not None:
        raise NotImplementedError(
            "reuse='looksam' is not available under FSDP: its stored direction is a shard per rank, which a "
            "checkpoint would not hold; use interval=k with reuse=None for cheaper steps"
        )


class DeltaSAM:
    """Sharpness-aware steps (SAM, ASAM, δ-SAM, per-instance SAM, or plain ERM) in plain PyTorch.

    Args:
        module: the model; ``loss_fn`` must compute through it.
        config: the method and its hyperparameters.
        params: the parameters to perturb; default: those of ``module`` that require grad.
            Other trainable parameters of ``module`` are not perturbed but get the
            descent gradient at the perturbed point, like any parameter in ``params``.
        reduce_squares: maps a local sum of squares to the global one when each rank
            holds a shard of plain-tensor parameters (FSDP1). DTensor shards (FSDP2)
            are detected and reduced over their mesh without it.
        driven: set by :class:`~lit_deltasam.core.loop.DeltaSAMOptimizer`, which applies the
            config's loop fields (ρ schedule, ``interval``, LookSAM, accumulation, clipping,
            seeds). Alone, the engine runs one micro-batch at radius ``rho``, warns about
            loop fields set away from their defaults, and refuses GSAM, WSAM, Friendly-SAM and
            the adaptive policy, whose rules act at the optimizer step.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> sam = DeltaSAM(model, DeltaSAMConfig(method="deltasam", rho=0.05, beta=-1.0))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> loss_fn = lambda b: nn.functional.cross_entropy(model(b[0]), b[1], reduction="none")
        >>> result = sam.step(loss_fn, (x, y))
        >>> if result.finite:
        ...     opt.step()
        >>> opt.zero_grad()
    """

    def __init__(
        self,
        module: nn.Module,
        config: DeltaSAMConfig,
        params: Optional[Iterable[Tensor]] = None,
        *,
        reduce_squares: Optional[NormReduce] = None,
        driven: bool = False,
    ) -> None:
        self.module = module
        self.config = config
        self._driven = driven
        self._warned_rho = False
        if not driven:
            _refuse_step_rules(config)
            _warn_of_loop_fields(config)
        self.parts = _parts(module, config, params, reduce_squares)
        self.scorer = Scorer(self.parts)
        self.strategy = choose(self.parts, self.scorer)
        self._plain = Plain(self.parts)
        self._window_ok: Optional[Tensor] = None

    @property
    def params(self) -> list[Tensor]:
        """The perturbed parameters."""
        return self.parts.params

    @property
    def names(self) -> list[str]:
        return self.parts.names

    @property
    def unperturbed(self) -> list[Tensor]:
        """Trainable parameters of the module outside ``params``: given the descent gradient, not perturbed."""
        return self.parts.unperturbed

    @property
    def updated(self) -> list[Tensor]:
        """Every parameter whose ``.grad`` a step writes."""
        return self.parts.updated

    @property
    def reduce_squares(self) -> Optional[NormReduce]:
        return self.parts.reduce_squares

    @property
    def device(self) -> torch.device:
        return self.parts.device

    def step(
        self,
        loss_fn: LossFn,
        batch: Batch,
        *,
        backward: Optional[Backward] = None,
        no_sync: Optional[NoSync] = None,
        sync_descent: bool = True,
        check_finite: bool = True,
        rho: Optional[float] = None,
        plain_grad: bool = False,
        shift: Optional[Sequence[Optional[Tensor]]] = None,
        decide: Optional[Callable[[float], bool]] = None,
    ) -> StepResult:
        """Add G for one (micro-)batch to ``.grad``; the weights end exactly where they started.

        Args:
            loss_fn: maps ``batch`` to ``[n]`` per-instance losses through ``module``.
            batch: any pytree whose tensors have the instances on dimension 0.
            backward: runs the backward of a scalar (e.g. Lightning's ``manual_backward``, which applies loss
                scaling); default ``loss.backward()``.
            no_sync: DDP's ``no_sync``; a local ascent (``config.ascent == "local"``) runs inside it.
            sync_descent: False before a window's last micro-batch: the descent all-reduces once per step.
            check_finite: at a synchronized descent, report in ``result.finite`` whether G can be stepped on (one
                tiny all-reduce under data parallelism); off under a loss scaler, which checks itself.
            rho: this step's radius (e.g. :func:`~lit_deltasam.core.schedule.scheduled_rho`'s); default
                ``config.rho``. At 0 the step is a plain ERM step.
            plain_grad: also return the plain gradient at w in ``result.plain_grad`` (LookSAM's, the family's).
            shift: Friendly-SAM's running mean m (one tensor per parameter, ``None``: not shifted): the ascent is
                along ``g - sigma m``.
            decide: the adaptive policy, from ``||g||²`` at w: a full step, or (False) a plain step on g.

        Raises:
            Exception: whatever ``loss_fn`` or ``backward`` raise; parameters, buffers and ``.grad`` are then
                bit-identical to their values before the call.
        """
        ctx = self._context(loss_fn, batch, backward, no_sync, sync_descent, rho, plain_grad, shift, decide)
        self.parts.params_before.capture()
        self.parts.buffers_before.capture()
        grads_before = take_grads(self.updated)
        try:
            result = (self.strategy if ctx.rho > 0 else self._plain).run(ctx, grads_before)
        except BaseException:
            self.rollback()
            put_grads(self.updated, grads_before)
            self._window_ok = None
            raise
        finally:
            torch.clear_autocast_cache()  # it holds copies of w + eps, and the weights are back at w
        self._check_window(result, sync_descent, check_finite)
        return result

    def _context(
        self,
        loss_fn: LossFn,
        batch: Batch,
        backward: Optional[Backward],
        no_sync: Optional[NoSync],
        sync_descent: bool,
        rho: Optional[float],
        plain_grad: bool,
        shift: Optional[Sequence[Optional[Tensor]]],
        decide: Optional[Callable[[float], bool]],
    ) -> Step:
        """One call's arguments, checked, with their defaults."""
        if rho is not None and not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"DeltaSAM.step(rho={rho!r}) is not valid; the radius must be a finite number >= 0")
        self._warn_if_unscheduled(rho)
        no_sync = no_sync or nullcontext
        if self.config.perturbs:
            refuse_static_graph(no_sync)
        radius = self.config.radius if rho is None else float(rho)
        backward = backward or _default_backward
        return Step(_recasting(loss_fn), batch, backward, no_sync, sync_descent, radius, plain_grad, shift, decide)

    def _check_window(self, result: StepResult, sync_descent: bool, check_finite: bool) -> None:
        """Gather whether the window's losses were finite; at its synchronized end, whether G is, on every rank."""
        ok = result.local_finite()
        self._window_ok = ok if self._window_ok is None else self._window_ok & ok
        if not sync_descent:
            return
        window_ok, self._window_ok = self._window_ok, None
        if check_finite:
            grads = [local(p.grad) for p in self.updated if p.grad is not None]
            result.update_norm = total_norm(grads, self.reduce_squares, device=self.device)
            bad = (~window_ok | ~torch.isfinite(result.update_norm)).float()
            # every rank must take the same decision, also when only one saw a non-finite loss
            result.finite = sum_over_ranks(bad).item() == 0

    def rollback(self) -> None:
        """Put parameters and buffers back to their values at the start of the last ``step``.

        Call it when something after the step fails (clipping, the optimizer step) to
        leave the model exactly as it was before the step.
        """
        self.parts.params_before.restore()
        self.parts.buffers_before.restore()

    def _warn_if_unscheduled(self, rho: Optional[float]) -> None:
        """Once: the engine alone steps at ``config.rho``, not along the schedule a loop applies."""
        if rho is not None or self._driven or self._warned_rho or not self.config.perturbs:
            return
        self._warned_rho = self.config.rho_schedule != "constant"
        if self._warned_rho:
            warnings.warn(
                f"DeltaSAM.step uses rho={self.config.rho:g} as given: rho_schedule="
                f"{self.config.rho_schedule!r} is applied by DeltaSAMOptimizer and DeltaSAMMixin; pass rho= "
                "(e.g. from lit_deltasam.scheduled_rho) or drive the engine with DeltaSAMOptimizer",
                RuntimeWarning,
                stacklevel=4,
            )


def _parts(
    module: nn.Module, config: DeltaSAMConfig, chosen: Optional[Iterable[Tensor]], reduce: Optional[NormReduce]
) -> Parts:
    """The parameters a step perturbs and updates, checked, with their snapshots and the per-instance oracle."""
    params, names = _owned_parameters(module, chosen)
    ids = {id(p) for p in params}
    sparse = [name for name, layer in module.named_modules() if getattr(layer, "sparse", False) is True]
    if sparse:
        raise ValueError(
            f"{type(module).__name__} has sparse-gradient layers {sparse[:5]} (nn.Embedding(sparse=True)): a "
            "sharpness-aware step takes norms of the gradient and moves the weights along it, which torch does "
            "not do for sparse gradients; build them with sparse=False"
        )
    unperturbed: list[Tensor] = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    if unperturbed and config.method == "per_instance":
        others = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in ids]
        raise ValueError(
            f"method='per_instance' computes G for params only, but {type(module).__name__} has other trainable "
            f"parameters {others[:5]}{' …' if len(others) > 5 else ''}; pass every trainable parameter or freeze them"
        )
    reduce_squares = reduce if reduce is not None else shard_reduction(params)
    if reduce is not None or any(is_sharded(p) for p in params):
        _refuse_sharded(config)
    instances = PerInstance(
        module, params, names, config.per_instance_impl or "loop", config.per_instance_chunk, config.share_dropout
    )
    return Parts(
        module=module,
        config=config,
        params=params,
        names=names,
        unperturbed=unperturbed,
        reduce_squares=reduce_squares,
        instances=instances,
        params_before=Snapshot(params),
        buffers_before=Snapshot(module.buffers),
        buffers_clean=Snapshot(module.buffers),
        scalar=None if config.reweights or config.method == "per_instance" else config.method,
        unscaled=[config.asam_scope == "weights" and "weight" not in name for name in names],
    )
