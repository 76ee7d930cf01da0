"""The double step: ascent to a (re)weighted perturbation, descent at the perturbed point.

One :class:`DeltaSAM` runs every method of :class:`~lit_deltasam.DeltaSAMConfig`.
``step`` leaves G in ``.grad`` (added to whatever was there, so micro-batches
accumulate) and the weights exactly as they were; the caller then steps its
optimizer. Derivation and step order: ``docs/method-card.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Optional, cast

import torch
from torch import Tensor, nn

from ..config import PROBING, DeltaSAMConfig
from .batch import Batch, LossFn, batch_size, check_losses, slice_batch
from .decisions import all_of
from .distributed import arm_reducer, gather_instances, rank, refuse_static_graph, sum_over_ranks, world_size
from .groups import BatchedGroups, GroupBuffers, group_impl, unbatchable, warn_once
from .guardedness import ForwardCache, HeadTap, Prober, find_head, select_params
from .norms import total_norm
from .per_instance import PerInstance
from .perturbation import perturb
from .randomness import RandomState
from .sharding import NormReduce, is_sharded, local, shard_reduction
from .snapshot import Snapshot, put_grads, take_grads
from .weighting import effective_sample_size, instance_weights

Backward = Callable[[Tensor], None]
NoSync = Callable[[], AbstractContextManager]


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
    stepped: bool = False
    """Set by :class:`~lit_deltasam.core.loop.DeltaSAMOptimizer`: this micro-batch ended a window with an optimizer
    step (one whose update a loss scaler skipped counts, as in Lightning's ``global_step``)."""

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


@dataclass(frozen=True)
class _Step:
    """One call of :meth:`DeltaSAM.step`: what it computes on, and how it reaches the caller's autograd and sync."""

    loss_fn: LossFn
    batch: Batch
    backward: Backward
    no_sync: NoSync
    sync_descent: bool
    rho: float
    plain_grad: bool


def _merge_groups(parts: list[tuple[float, StepResult]], sizes: list[int]) -> StepResult:
    """One m-sharpness step's result from its groups' (share of the batch, result) and sizes. A scalar loss gives
    one loss per group, its mean: it stands for each of the group's instances, so that the batch's mean loss and
    sharpness weigh a smaller last group by its size."""
    results = [r for _, r in parts]

    def per_instance(losses: Tensor, size: int) -> Tensor:
        return losses.expand(size) if losses.numel() == 1 else losses

    assert all(r.weights is not None and r.perturbed_losses is not None for r in results)
    weights = torch.cat([cast(Tensor, r.weights) * share for share, r in parts])
    plain = None
    if results[0].plain_grad is not None:
        plain = list(torch._foreach_mul(results[0].plain_grad, parts[0][0]))
        for share, r in parts[1:]:
            torch._foreach_add_(plain, r.plain_grad, alpha=share)  # type: ignore[arg-type]
    return StepResult(
        losses=torch.cat([per_instance(r.losses, k) for r, k in zip(results, sizes)]),
        perturbed_losses=torch.cat([per_instance(cast(Tensor, r.perturbed_losses), k) for r, k in zip(results, sizes)]),
        weights=weights,
        batch_weights=weights,
        grad_norm=torch.stack([r.grad_norm for r in results]).mean(),  # type: ignore[misc]
        eps_norm=torch.stack([r.eps_norm for r in results]).mean(),  # type: ignore[misc]
        perturbed=all_of([r.perturbed for r in results]),
        plain_grad=plain,
    )


def _distinct(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` with every buffer held once: autograd may hand one gradient tensor to two parameters
    (``x @ (a + b)``), and the loop writes into these in place."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        out.append(t.clone() if t.data_ptr() in seen else t)
        seen.add(t.data_ptr())
    return out


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
                "of the optimizer, e.g. [p for p in module.parameters() if p.requires_grad]"
            )
        if id(p) in seen:
            raise ValueError(f"parameter {names[id(p)]!r} appears twice")
        seen.add(id(p))
    if not chosen:
        raise ValueError(f"{type(module).__name__} has no trainable parameter to perturb")
    return list(chosen), [names[id(p)] for p in chosen]


_LOOP_DEFAULTS = {"interval": 1, "reuse": None, "accumulate_grad_batches": 1, "gradient_clip_val": None}


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
            seeds). Alone, the engine runs one micro-batch at radius ``rho`` and warns about
            loop fields set away from their defaults.

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
            _warn_of_loop_fields(config)
        self.params, self.names = _owned_parameters(module, params)
        chosen = {id(p) for p in self.params}
        sparse = [name for name, layer in module.named_modules() if getattr(layer, "sparse", False) is True]
        if sparse:
            raise ValueError(
                f"{type(module).__name__} has sparse-gradient layers {sparse[:5]} (nn.Embedding(sparse=True)): a "
                "sharpness-aware step takes norms of the gradient and moves the weights along it, which torch does "
                "not do for sparse gradients; build them with sparse=False"
            )
        self.unperturbed: list[Tensor] = [p for p in module.parameters() if p.requires_grad and id(p) not in chosen]
        self.updated = self.params + self.unperturbed
        """Every parameter whose ``.grad`` a step writes."""
        if self.unperturbed and config.method == "per_instance":
            names = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in chosen]
            raise ValueError(
                f"method='per_instance' computes G for params only, but {type(module).__name__} has other trainable "
                f"parameters {names[:5]}{' …' if len(names) > 5 else ''}; pass every trainable parameter or freeze them"
            )
        self.reduce_squares = reduce_squares if reduce_squares is not None else shard_reduction(self.params)
        if reduce_squares is not None or any(is_sharded(p) for p in self.params):
            _refuse_sharded(config)
        self._params_before = Snapshot(self.params)
        self._buffers_before = Snapshot(module.buffers)
        self._buffers_clean = Snapshot(module.buffers)
        self._head: Optional[HeadTap] = None
        self._prober: Optional[Prober] = None
        self._probed: Optional[list[int]] = None
        if config.reweights and config.estimator == "head":
            self._head = HeadTap(*find_head(module, config.head), module)
        if config.reweights and config.estimator in PROBING:
            self._probed = select_params(self.names, config.probe_params)
            probed = [self.params[i] for i in self._probed]
            sigma = config.probe_sigma if config.probe_sigma is not None else config.rho
            assert config.probe_samples is not None and sigma is not None  # resolved by DeltaSAMConfig
            truncate = config.probe_truncate and config.probe_params is not None
            cache = ForwardCache(module, probed, config.share_dropout) if truncate else None
            curvature = config.estimator == "curvature"
            self._prober = Prober(
                probed, config.probe_samples, sigma, config.probe_antithetic or curvature, cache, curvature
            )
        self._window_ok: Optional[Tensor] = None
        self._warned_16_bit = False
        self._warned_16_bit_eps = False
        self._instances = PerInstance(
            module,
            self.params,
            self.names,
            config.per_instance_impl or "loop",
            config.per_instance_chunk,
            config.share_dropout,
        )
        self._scalar = None if config.reweights or config.method == "per_instance" else config.method
        self._unscaled = [config.asam_scope == "weights" and "weight" not in name for name in self.names]

    @property
    def device(self) -> torch.device:
        return self.params[0].device

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
    ) -> StepResult:
        """Add G for one (micro-)batch to ``.grad``; the weights end exactly where they started.

        Args:
            loss_fn: maps ``batch`` to ``[n]`` per-instance losses through ``module``.
            batch: any pytree whose tensors have the instances on dimension 0.
            backward: runs the backward of a scalar (e.g. Lightning's ``manual_backward``,
                which applies loss scaling); default ``loss.backward()``.
            no_sync: a context that suppresses the gradient all-reduce (DDP's ``no_sync``).
                The ascent runs inside it when ``config.ascent == "local"``.
            sync_descent: False for micro-batches before the last of an accumulation
                window, so that the descent is all-reduced once per optimizer step.
            check_finite: after a synchronized descent, compute ``||G||`` and report in
                ``result.finite`` whether the update can be taken (one tiny all-reduce
                under data parallelism). Turn it off under a loss scaler, which checks itself.
            rho: this step's radius (e.g. from :func:`~lit_deltasam.core.schedule.scheduled_rho`);
                default ``config.rho``. At 0 the step is a plain ERM step.
            plain_grad: also return the plain gradient at w in ``result.plain_grad`` (for
                :class:`~lit_deltasam.core.amortized.Reuse`); free for SAM and ASAM, one more
                backward through the clean graph for reweighted ascents.

        Raises:
            Exception: whatever ``loss_fn`` or ``backward`` raise. Parameters, buffers and
                ``.grad`` are then bit-identical to their values before the call.
        """
        if rho is not None and not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"DeltaSAM.step(rho={rho!r}) is not valid; the radius must be a finite number >= 0")
        backward = backward or _default_backward
        no_sync = no_sync or nullcontext
        if rho is None and not self._driven and not self._warned_rho and self.config.perturbs:
            self._warned_rho = self.config.rho_schedule != "constant"
            if self._warned_rho:
                warnings.warn(
                    f"DeltaSAM.step uses rho={self.config.rho:g} as given: rho_schedule="
                    f"{self.config.rho_schedule!r} is applied by DeltaSAMOptimizer and DeltaSAMMixin; pass rho= "
                    "(e.g. from lit_deltasam.scheduled_rho) or drive the engine with DeltaSAMOptimizer",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if self.config.perturbs:
            refuse_static_graph(no_sync)
        self._params_before.capture()
        self._buffers_before.capture()
        grads_before = take_grads(self.updated)
        ctx = _Step(
            _recasting(loss_fn),
            batch,
            backward,
            no_sync,
            sync_descent,
            (self.config.rho or 0.0) if rho is None else float(rho),
            plain_grad,
        )
        try:
            if self.config.method == "erm" or ctx.rho == 0:
                result = self._erm(ctx, grads_before)
            elif self.config.method == "per_instance":
                result = self._per_instance(ctx, grads_before)
            elif self._splits(batch):
                result = self._m_sharpness(ctx, grads_before)
            else:
                result = self._two_pass(ctx, grads_before)
        except BaseException:
            self.rollback()
            put_grads(self.updated, grads_before)
            self._window_ok = None
            raise
        finally:
            torch.clear_autocast_cache()  # it holds copies of w + eps, and the weights are back at w
        ok = result.local_finite()
        self._window_ok = ok if self._window_ok is None else self._window_ok & ok
        if sync_descent:
            window_ok, self._window_ok = self._window_ok, None
            if check_finite:
                grads = [local(p.grad) for p in self.updated if p.grad is not None]
                result.update_norm = total_norm(grads, self.reduce_squares, device=self.device)
                bad = (~window_ok | ~torch.isfinite(result.update_norm)).float()
                # every rank must take the same decision, also when only one saw a non-finite loss
                result.finite = sum_over_ranks(bad).item() == 0
        return result

    def rollback(self) -> None:
        """Put parameters and buffers back to their values at the start of the last ``step``.

        Call it when something after the step fails (clipping, the optimizer step) to
        leave the model exactly as it was before the step.
        """
        self._params_before.restore()
        self._buffers_before.restore()

    @contextmanager
    def _descent_sync(self, no_sync: NoSync, sync_descent: bool) -> Iterator[None]:
        with nullcontext() if sync_descent else no_sync():
            yield

    def _erm(self, ctx: _Step, grads_before: list[Optional[Tensor]]) -> StepResult:
        put_grads(self.updated, grads_before, copy=True)
        with self._descent_sync(ctx.no_sync, ctx.sync_descent):
            losses = check_losses(ctx.loss_fn(ctx.batch), ctx.batch, self.device, scalar=self._scalar)
            ctx.backward(losses.mean())
        return StepResult(losses=losses.detach())

    def _per_instance(self, ctx: _Step, grads_before: list[Optional[Tensor]]) -> StepResult:
        batched = self._batched(ctx, grads_before, 1)
        if batched is not None:
            return batched
        # per-instance passes are local: a synchronized DDP forward would arm the all-reduce for them
        with ctx.no_sync():
            update, losses, perturbed, plain = self._instances.sam_gradient(
                ctx.loss_fn, ctx.batch, ctx.rho, self._params_before, with_plain=ctx.plain_grad
            )
        put_grads(self.updated, grads_before, copy=True)
        # d/dp sum_p <p, G_p> = G: routes G through the caller's backward (loss scaling, DDP all-reduce).
        surrogate = torch.stack([t.sum() for t in torch._foreach_mul(self.params, update)]).sum()
        with self._descent_sync(ctx.no_sync, ctx.sync_descent):
            if ctx.sync_descent:
                arm_reducer(ctx.no_sync, surrogate)
            ctx.backward(surrogate)
        return StepResult(
            losses=losses.detach(),
            perturbed_losses=perturbed.detach(),
            perturbed=True,
            plain_grad=plain,
        )

    def _splits(self, batch: Batch) -> bool:
        m, n = self.config.m_sharpness, batch_size(batch)
        return m is not None and n is not None and m < n

    def _m_sharpness(self, ctx: _Step, grads_before: list[Optional[Tensor]]) -> StepResult:
        """One two-pass step per contiguous group of ``m_sharpness`` instances, each descent weighted by its
        share of the batch, so that ``.grad`` gains ``(1/n) sum_i grad l_i(w + eps_k(i))``."""
        n = batch_size(ctx.batch)
        assert n is not None and self.config.m_sharpness is not None
        batched = self._batched(ctx, grads_before, self.config.m_sharpness)
        if batched is not None:
            return batched
        parts: list[tuple[float, StepResult]] = []
        sizes: list[int] = []
        grads = grads_before
        buffers = GroupBuffers(self.module)
        buffers.start()
        for start in range(0, n, self.config.m_sharpness):
            stop = min(start + self.config.m_sharpness, n)
            group = replace(
                ctx, batch=slice_batch(ctx.batch, slice(start, stop)), sync_descent=ctx.sync_descent and stop == n
            )
            share = (stop - start) / n
            # the first group keeps grads_before pristine for a rollback; the later ones hand on the running sum
            parts.append((share, self._two_pass(group, grads, share=share, copy=start == 0)))
            sizes.append(stop - start)
            buffers.record(share)
            if stop < n:
                grads = take_grads(self.updated)
        buffers.finish()
        return _merge_groups(parts, sizes)

    def _batched(self, ctx: _Step, grads_before: list[Optional[Tensor]], m: int) -> Optional[StepResult]:
        """The groups of m in batched passes (:mod:`.groups`); ``None`` where they run in the loop (said once)."""
        cfg = self.config
        if group_impl(cfg, self.device) != "batched" or self.__dict__.get("_unbatchable"):
            return None
        reason = unbatchable(self.module, cfg.method, self.params, cfg.estimator)
        if reason is not None:
            warn_once(self, reason)
            return None
        if self._head is not None and self._head.layer is None:  # the loop's first step finds the head layer
            return None
        groups = self.__dict__.get("_groups")
        if groups is None:
            groups = self._groups = BatchedGroups(
                self.module, self.params, self.names, self.unperturbed, cfg.group_chunk
            )
        put_grads(self.updated, grads_before, copy=True)
        try:
            step = groups.step(
                ctx.loss_fn,
                ctx.batch,
                m,
                ctx.rho,
                backward=ctx.backward,
                ascent_sync=ctx.no_sync,
                descent_sync=lambda last: self._descent_sync(ctx.no_sync, ctx.sync_descent and last),
                adaptive=cfg.method == "asam",
                eta=cfg.asam_eta or 0.0,
                unscaled=self._unscaled,
                share_dropout=cfg.share_dropout,
                plain_grad=ctx.plain_grad,
                head=self._head,
                weigh=self._group_weights if cfg.reweights else None,
                weighted_descent=cfg.weighted_descent,
            )
        except (RuntimeError, ValueError) as error:  # an op vmap cannot batch, or a scalar loss: the loop from now on
            vmap = isinstance(error, RuntimeError) and ("vmap" in str(error) or "atching rule" in str(error))
            scalar = isinstance(error, ValueError) and self._scalar is not None and "returned shape" in str(error)
            if not (vmap or scalar):
                raise
            self.rollback()
            take_grads(self.updated)  # the loop starts, as the step does, from .grad set aside
            self._unbatchable = True
            why = "the loss is one scalar per group" if scalar else "vmap cannot run this model"
            warn_once(self, f"{why} ({str(error).splitlines()[0][:200]})")
            return None
        if cfg.method == "per_instance":
            return StepResult(
                losses=step.losses, perturbed_losses=step.perturbed_losses, perturbed=True, plain_grad=step.plain_grad
            )
        n = sum(step.sizes)
        device = step.losses.device
        if step.weights is not None:
            shares = torch.tensor([k / n for k in step.sizes], dtype=torch.float64, device=device)
            weights = step.weights * shares.repeat_interleave(torch.tensor(step.sizes, device=device))
        else:
            weights = torch.cat(
                [torch.full((k,), 1.0 / k, dtype=torch.float64, device=device) * (k / n) for k in step.sizes]
            )
        return StepResult(
            losses=step.losses,
            perturbed_losses=step.perturbed_losses,
            weights=weights,
            batch_weights=weights,
            grad_norm=step.grad_norms.mean(),
            eps_norm=step.eps_norms.mean(),
            perturbed=step.applied,
            plain_grad=step.plain_grad,
        )

    def _group_weights(self, scores: Tensor) -> Tensor:
        """One group's lambda from its instances' scores."""
        cfg = self.config
        beta, floor, low, high = cfg.beta, cfg.weight_floor, cfg.weight_min, cfg.weight_max
        assert beta is not None and floor is not None and low is not None and high is not None  # resolved
        return instance_weights(scores, beta, floor=floor, clip=(low, high))

    def _two_pass(
        self, ctx: _Step, grads_before: list[Optional[Tensor]], *, share: float = 1.0, copy: bool = True
    ) -> StepResult:
        """Ascent and descent on ``ctx.batch``; the descent's loss is multiplied by ``share``."""
        cfg = self.config
        # A local ascent keeps both its forward and its backward out of the all-reduce:
        # raw DDP decides at forward time, Lightning at backward time.
        ascent_sync = ctx.no_sync if cfg.ascent == "local" else nullcontext
        random_state = RandomState(self.device) if cfg.share_dropout else None
        if random_state is not None:
            random_state.capture()
        losses = self._clean_pass(ctx, ascent_sync)
        self._buffers_clean.capture()
        try:
            batch_weights, mine = self._weights(ctx.loss_fn, ctx.batch, losses, random_state, ctx.no_sync)
            # Under a global ascent DDP averages over ranks; scaling by the rank count makes
            # the all-reduced gradient sum_i lambda_i g_i over the global batch.
            weights = batch_weights[mine] * (world_size() if cfg.ascent == "global" else 1)
            plain, grad_norm, eps_norm, applied = self._ascend(ctx, losses, weights, ascent_sync)
            put_grads(self.updated, grads_before, copy=copy)
            perturbed = self._descend(ctx, weights, random_state, share)
        finally:
            self._params_before.restore()
            self._buffers_clean.restore()
        return StepResult(
            losses=losses.detach(),
            perturbed_losses=perturbed.detach(),
            weights=batch_weights[mine],
            batch_weights=batch_weights,
            grad_norm=grad_norm.detach(),
            eps_norm=eps_norm.detach(),
            perturbed=applied,
            plain_grad=plain,
            plain_grad_synced=cfg.ascent == "global" and not cfg.reweights,
        )

    def _clean_pass(self, ctx: _Step, ascent_sync: NoSync) -> Tensor:
        """``l_i(w)``, with the estimator's taps on the forward (the head's inputs, the probes' cached layers)."""
        with ExitStack() as taps:
            taps.enter_context(ascent_sync())
            if self._head is not None:
                taps.enter_context(self._head)
            if self._prober is not None and self._prober.cache is not None:
                taps.enter_context(self._prober.cache.record())
            return check_losses(ctx.loss_fn(ctx.batch), ctx.batch, self.device, scalar=self._scalar)

    def _ascend(
        self, ctx: _Step, losses: Tensor, weights: Tensor, ascent_sync: NoSync
    ) -> tuple[Optional[list[Tensor]], Tensor, Tensor, bool | Tensor]:
        """The ascent gradient's backward and the move to ``w + eps``: (LookSAM's plain gradient, ``||g||``,
        ``||eps||``, applied)."""
        cfg = self.config
        ascent_loss = (weights.to(losses.dtype) * losses).sum() if cfg.reweights else losses.mean()
        plain = None
        if ctx.plain_grad and cfg.reweights:
            grads = torch.autograd.grad(losses.mean(), self.params, retain_graph=True, allow_unused=True)
            plain = _distinct([torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)])
        with ascent_sync():
            ctx.backward(ascent_loss)
        if ctx.plain_grad and not cfg.reweights:
            plain = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in self.params]
        with_grad = [i for i, p in enumerate(self.params) if p.grad is not None]
        grad_norm, eps_norm, applied = perturb(
            [self.params[i] for i in with_grad],
            [cast(Tensor, self.params[i].grad) for i in with_grad],
            ctx.rho,
            adaptive=cfg.method == "asam",
            eta=cfg.asam_eta or 0.0,
            unscaled=[self._unscaled[i] for i in with_grad],
            reduce_squares=self.reduce_squares,
            device=self.device,
        )
        if applied is not False and self.params[0].dtype in (torch.float16, torch.bfloat16):
            # what the weights moved, after rounding to their dtype: 16-bit weights can round eps away
            eps_norm = self._params_before.change_norm(self.reduce_squares, self.device)
            self._warn_if_16_bit_weights(ctx.rho, eps_norm)
        return plain, grad_norm, eps_norm, applied

    def _descend(self, ctx: _Step, weights: Tensor, random_state: Optional[RandomState], share: float) -> Tensor:
        """``l_i(w + eps)`` under the clean pass's random state, and its backward into ``.grad`` (G)."""
        with self._descent_sync(ctx.no_sync, ctx.sync_descent):
            with random_state.replay() if random_state is not None else nullcontext():
                perturbed = check_losses(ctx.loss_fn(ctx.batch), ctx.batch, self.device, scalar=self._scalar)
            if self.config.weighted_descent:
                descent_loss = (weights.to(perturbed.dtype) * perturbed).sum()
            else:
                descent_loss = perturbed.mean()
            ctx.backward(descent_loss * share if share != 1.0 else descent_loss)
        return perturbed

    def _weights(
        self, loss_fn: LossFn, batch: Batch, losses: Tensor, random_state: Optional[RandomState], no_sync: NoSync
    ) -> tuple[Tensor, slice]:
        """lambda over the batch it is normalized on, and this rank's slice of it."""
        cfg = self.config
        n = losses.shape[0]
        if not cfg.reweights:
            ranks, r = (world_size(), rank()) if cfg.ascent == "global" else (1, 0)
            uniform = torch.full((n * ranks,), 1.0 / (n * ranks), dtype=torch.float64, device=losses.device)
            return uniform, slice(r * n, (r + 1) * n)
        with no_sync():  # scoring is local: its forwards must not arm DDP's all-reduce or buffer broadcast
            scores = self._scores(loss_fn, batch, losses, random_state)
        if cfg.ascent == "global":
            scores, mine = gather_instances(scores)
        else:
            mine = slice(0, n)
        return self._group_weights(scores), mine

    def _warn_if_16_bit_weights(self, rho: float, eps_norm: Tensor) -> None:
        if self._warned_16_bit_eps:
            return
        self._warned_16_bit_eps = True
        warnings.warn(
            f"the weights are {self.params[0].dtype}: the perturbation of norm rho={rho:g} moved them by "
            f"{eps_norm.item():.3g} after rounding; keep 32-bit master weights (mixed precision) so that eps "
            "is applied as computed",
            RuntimeWarning,
            stacklevel=5,
        )

    def _warn_if_probing_in_16_bit(self) -> None:
        kind = self.device.type
        if self._warned_16_bit:
            return
        half = (torch.float16, torch.bfloat16)
        dtype = self.params[0].dtype
        if dtype not in half and torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        if dtype in half:
            self._warned_16_bit = True
            assert self._prober is not None
            warnings.warn(
                f"the {self.config.estimator} estimator runs in {dtype}: its per-element perturbation "
                f"({self._prober.scale:.1e}) is likely below the 16-bit rounding of the weights, so the scores measure "
                "rounding noise; use estimator='head', a larger probe_sigma, or 32-bit precision",
                RuntimeWarning,
                stacklevel=6,
            )

    def _scores(self, loss_fn: LossFn, batch: Batch, losses: Tensor, random_state: Optional[RandomState]) -> Tensor:
        estimator = self.config.estimator
        if estimator == "head":
            assert self._head is not None
            return self._head.scores(losses)
        if estimator in PROBING:
            assert self._prober is not None and self._probed is not None
            self._warn_if_probing_in_16_bit()
            probed = self._probed
            scores = self._prober.scores(
                loss_fn, batch, losses, random_state, lambda: self._params_before.restore(probed)
            )
            self._buffers_clean.restore()
            # negative curvature along the probes: no more exposed than a flat direction
            return scores.clamp_min(0.0) if estimator == "curvature" else scores
        return self._instances.grad_norms(loss_fn, batch)
