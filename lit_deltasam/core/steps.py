"""The step strategies, one per kind of double step, chosen once per engine (:func:`choose`).

* :class:`Plain`: one forward and backward (ERM, and every step at ρ = 0).
* :class:`TwoPass`: the ascent to ``w + eps`` and the descent there, on one batch (SAM, ASAM, δ-SAM).
* :class:`Grouped`: m-sharpness, a :class:`TwoPass` per group of m instances, or all groups in batched passes.
* :class:`PerInstanceSAM`: exact per-instance SAM, the instances as groups of one, or the per-instance oracle.

Each ``run`` adds G for ``ctx.batch`` to ``.grad`` (from the gradients set aside before the step) and leaves the
weights at w; the engine rolls everything back if one raises.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack, nullcontext
from typing import Optional, cast

import torch
from torch import Tensor

from .ascent import centralize_, perturb
from .batch import batch_size, check_losses, slice_batch
from .distributed import arm_reducer, world_size
from .groups import BatchedGroups, GroupBuffers, GroupedStep, GroupSettings, Unbatchable, group_impl, unbatchable
from .norms import total_norm
from .parts import NoSync, Parts, Step, descent_sync
from .randomness import RandomState
from .result import StepResult, merge_groups
from .scoring import Scorer
from .snapshot import put_grads, take_grads

Grads = list[Optional[Tensor]]


class Strategy:
    """One kind of step over the engine's :class:`~.parts.Parts`."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts

    def run(self, ctx: Step, grads_before: Grads) -> StepResult:
        raise NotImplementedError


class Plain(Strategy):
    """``G = grad L(w)``: one forward and backward."""

    def run(self, ctx: Step, grads_before: Grads) -> StepResult:
        parts = self.parts
        put_grads(parts.updated, grads_before, copy=True)
        with descent_sync(ctx.no_sync, ctx.sync_descent):
            losses = check_losses(ctx.loss_fn(ctx.batch), ctx.batch, parts.device, scalar=parts.scalar)
            ctx.backward(losses.mean())
        return StepResult(losses=losses.detach())


def _distinct(tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` with every buffer held once: autograd may hand one gradient tensor to two parameters
    (``x @ (a + b)``), and the loop writes into these in place."""
    seen: set[int] = set()
    out = []
    for t in tensors:
        out.append(t.clone() if t.data_ptr() in seen else t)
        seen.add(t.data_ptr())
    return out


def _add_back(updated: list[Tensor], grads_before: Grads, copy: bool) -> None:
    """``.grad`` (a gradient of this step) plus the gradients set aside before the step."""
    step = take_grads(updated)
    put_grads(updated, grads_before, copy=copy)
    for p, g in zip(updated, step):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)


class TwoPass(Strategy):
    """The double step on one batch: ``l_i(w)``, λ, the ascent gradient ``g_λ`` and ``w + eps`` (:mod:`.ascent`),
    then ``l_i(w + eps)`` and its backward into ``.grad``."""

    def __init__(self, parts: Parts, scorer: Scorer) -> None:
        super().__init__(parts)
        self.scorer = scorer
        self._warned_16_bit_eps = False

    def run(self, ctx: Step, grads_before: Grads, *, share: float = 1.0, copy: bool = True) -> StepResult:
        """The descent's loss is multiplied by ``share`` (a group's share of the batch)."""
        parts, cfg = self.parts, self.parts.config
        # A local ascent keeps both its forward and its backward out of the all-reduce:
        # raw DDP decides at forward time, Lightning at backward time.
        ascent_sync = ctx.no_sync if cfg.ascent == "local" else nullcontext
        random_state = RandomState(parts.device) if cfg.share_dropout else None
        if random_state is not None:
            random_state.capture()
        losses = self._clean_pass(ctx, ascent_sync)
        parts.buffers_clean.capture()
        try:
            batch_weights, mine = self.scorer.weights(ctx.loss_fn, ctx.batch, losses, random_state, ctx.no_sync)
            # Under a global ascent DDP averages over ranks; scaling by the rank count makes
            # the all-reduced gradient sum_i lambda_i g_i over the global batch.
            weights = batch_weights[mine] * (world_size() if cfg.ascent == "global" else 1)
            plain, grad_norm, eps_norm, applied = self._ascend(ctx, losses, weights, ascent_sync)
            perturbed: Optional[Tensor] = None
            if applied is None:  # the policy's plain step: G is the ascent gradient at w
                _add_back(parts.updated, grads_before, copy)
            else:
                put_grads(parts.updated, grads_before, copy=copy)
                perturbed = self._descend(ctx, weights, random_state, share)
        finally:
            parts.params_before.restore()
            parts.buffers_clean.restore()
        return StepResult(
            losses=losses.detach(),
            perturbed_losses=None if perturbed is None else perturbed.detach(),
            full_step=applied is not None,
            weights=batch_weights[mine],
            batch_weights=batch_weights,
            grad_norm=grad_norm.detach(),
            eps_norm=eps_norm.detach(),
            perturbed=True if applied is None else applied,
            plain_grad=plain,
            plain_grad_synced=cfg.ascent == "global" and parts.plain_is_ascent,
        )

    def _clean_pass(self, ctx: Step, ascent_sync: NoSync) -> Tensor:
        """``l_i(w)``, with the estimator's taps on the forward (the head's inputs, the probes' cached layers)."""
        head, prober = self.scorer.head, self.scorer.prober
        with ExitStack() as taps:
            taps.enter_context(ascent_sync())
            if head is not None:
                taps.enter_context(head)
            if prober is not None and prober.cache is not None:
                taps.enter_context(prober.cache.record())
            return check_losses(ctx.loss_fn(ctx.batch), ctx.batch, self.parts.device, scalar=self.parts.scalar)

    def _ascend(
        self, ctx: Step, losses: Tensor, weights: Tensor, ascent_sync: NoSync
    ) -> tuple[Optional[list[Tensor]], Tensor, Tensor, Optional[bool | Tensor]]:
        """The ascent gradient's backward and the move to ``w + eps``: (LookSAM's plain gradient, ``||g||``,
        ``||eps||``, applied); applied is ``None`` where the adaptive policy takes a plain step instead."""
        parts = self.parts
        params, reweights = parts.params, parts.config.reweights
        ascent_loss = (weights.to(losses.dtype) * losses).sum() if reweights else losses.mean()
        plain = None
        if ctx.plain_grad and not parts.plain_is_ascent:
            clean = torch.autograd.grad(losses.mean(), params, retain_graph=True, allow_unused=True)
            plain = _distinct([torch.zeros_like(p) if g is None else g for p, g in zip(params, clean)])
        with ascent_sync():
            ctx.backward(ascent_loss)
        if ctx.plain_grad and parts.plain_is_ascent:
            plain = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        ascent = [cast(Tensor, params[i].grad) for i in with_grad]
        if ctx.decide is not None:
            norm = total_norm(ascent, parts.reduce_squares)
            if not ctx.decide(float(norm**2)):
                return plain, norm, torch.zeros_like(norm), None
        self._shape_direction(ctx, ascent, with_grad)
        grad_norm, eps_norm, applied = perturb(
            [params[i] for i in with_grad],
            ascent,
            ctx.rho,
            adaptive=parts.adaptive,
            eta=parts.eta,
            unscaled=[parts.unscaled[i] for i in with_grad],
            reduce_squares=parts.reduce_squares,
            device=parts.device,
        )
        if applied is not False and params[0].dtype in (torch.float16, torch.bfloat16):
            # what the weights moved, after rounding to their dtype: 16-bit weights can round eps away
            eps_norm = parts.params_before.change_norm(parts.reduce_squares, parts.device)
            self._warn_if_16_bit_weights(ctx.rho, eps_norm)
        return plain, grad_norm, eps_norm, applied

    @torch.no_grad()
    def _shape_direction(self, ctx: Step, grads: list[Tensor], indices: list[int]) -> None:
        """The options of the ascent's direction, in place on the ascent gradients: Friendly-SAM's shift by the
        gradient's running mean, then gradient centralization."""
        cfg = self.parts.config
        if ctx.shift is not None:
            sigma = cfg.fsam_sigma if cfg.fsam_sigma is not None else 0.0
            for g, i in zip(grads, indices):
                if (m := ctx.shift[i]) is not None:
                    g.sub_(m, alpha=sigma)
        if cfg.gradient_centralization:
            centralize_(grads)

    def _descend(self, ctx: Step, weights: Tensor, random_state: Optional[RandomState], share: float) -> Tensor:
        """``l_i(w + eps)`` under the clean pass's random state, and its backward into ``.grad`` (G)."""
        parts = self.parts
        with descent_sync(ctx.no_sync, ctx.sync_descent):
            with random_state.replay() if random_state is not None else nullcontext():
                perturbed = check_losses(ctx.loss_fn(ctx.batch), ctx.batch, parts.device, scalar=parts.scalar)
            if parts.config.weighted_descent:
                descent_loss = (weights.to(perturbed.dtype) * perturbed).sum()
            else:
                descent_loss = perturbed.mean()
            ctx.backward(descent_loss * share if share != 1.0 else descent_loss)
        return perturbed

    def _warn_if_16_bit_weights(self, rho: float, eps_norm: Tensor) -> None:
        if self._warned_16_bit_eps:
            return
        self._warned_16_bit_eps = True
        warnings.warn(
            f"the weights are {self.parts.params[0].dtype}: the perturbation of norm rho={rho:g} moved them by "
            f"{eps_norm.item():.3g} after rounding; keep 32-bit master weights (mixed precision) so that eps "
            "is applied as computed",
            RuntimeWarning,
            stacklevel=6,
        )


class Batched:
    """The plan for groups of m in batched passes (:mod:`.groups`): taken where ``group_impl`` resolves to
    ``batched`` and the model can be batched, the loop elsewhere (said once per reason)."""

    def __init__(self, parts: Parts, scorer: Scorer) -> None:
        self.parts, self.scorer = parts, scorer
        self.enabled = group_impl(parts.config, parts.device) == "batched"
        cfg = parts.config
        settings = GroupSettings(
            adaptive=parts.adaptive,
            eta=parts.eta,
            unscaled=parts.unscaled,
            share_dropout=cfg.share_dropout,
            head=scorer.head,
            weigh=scorer.group_weights if cfg.reweights else None,
            weighted_descent=cfg.weighted_descent,
            centralize=cfg.gradient_centralization,
        )
        groups = (parts.module, parts.params, parts.names, parts.unperturbed, cfg.group_chunk, settings)
        self.groups = BatchedGroups(*groups)
        self.said: set[str] = set()

    def run(self, ctx: Step, grads_before: Grads, m: int) -> Optional[GroupedStep]:
        """The groups' step, or ``None`` where they run in the loop (``.grad`` then as the step found it)."""
        parts, cfg, head = self.parts, self.parts.config, self.scorer.head
        if not self.enabled:
            return None
        reason = unbatchable(parts.module, cfg.method, parts.params, cfg.estimator)
        if reason is not None:
            self._say(reason)
            return None
        if head is not None and head.layer is None:  # the loop's first step finds the head layer
            return None
        put_grads(parts.updated, grads_before, copy=True)
        try:
            return self.groups.step(
                ctx.loss_fn,
                ctx.batch,
                m,
                ctx.rho,
                backward=ctx.backward,
                ascent_sync=ctx.no_sync,
                descent_sync=lambda last: descent_sync(ctx.no_sync, ctx.sync_descent and last),
                plain_grad=ctx.plain_grad,
            )
        except Unbatchable as why:  # the loop from now on
            parts.params_before.restore()
            parts.buffers_before.restore()
            take_grads(parts.updated)  # the loop starts, as the step does, from .grad set aside
            self.enabled = False
            self._say(str(why))
            return None

    def _say(self, reason: str) -> None:
        if reason not in self.said:
            self.said.add(reason)
            warnings.warn(f"group_impl='batched' runs the loop instead: {reason}", RuntimeWarning, stacklevel=6)


def _grouped_result(step: GroupedStep) -> StepResult:
    """An m-sharpness step's result from its batched groups: λ scaled by each group's share of the batch."""
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


class Grouped(Strategy):
    """m-sharpness: each contiguous group of m instances its own perturbation, ``G = (1/n) sum_i grad l_i(w +
    eps_k(i))``; a batch of at most m instances is one group, :class:`TwoPass`'s step bit for bit."""

    def __init__(self, parts: Parts, two_pass: TwoPass, batched: Batched, m: int) -> None:
        super().__init__(parts)
        self.two_pass, self.batched, self.m = two_pass, batched, m

    def run(self, ctx: Step, grads_before: Grads) -> StepResult:
        n = batch_size(ctx.batch)
        if n is None or self.m >= n:
            return self.two_pass.run(ctx, grads_before)
        step = self.batched.run(ctx, grads_before, self.m)
        return _grouped_result(step) if step is not None else self._loop(ctx, grads_before, n)

    def _loop(self, ctx: Step, grads_before: Grads, n: int) -> StepResult:
        """A two-pass step per group, each descent weighted by its share of the batch."""
        parts: list[tuple[float, StepResult]] = []
        sizes: list[int] = []
        grads = grads_before
        buffers = GroupBuffers(self.parts.module)
        buffers.start()
        for start in range(0, n, self.m):
            stop = min(start + self.m, n)
            group = Step(
                ctx.loss_fn,
                slice_batch(ctx.batch, slice(start, stop)),
                ctx.backward,
                ctx.no_sync,
                ctx.sync_descent and stop == n,
                ctx.rho,
                ctx.plain_grad,
            )
            share = (stop - start) / n
            # the first group keeps grads_before pristine for a rollback; the later ones hand on the running sum
            parts.append((share, self.two_pass.run(group, grads, share=share, copy=start == 0)))
            sizes.append(stop - start)
            buffers.record(share)
            if stop < n:
                grads = take_grads(self.parts.updated)
        buffers.finish()
        return merge_groups(parts, sizes)


class PerInstanceSAM(Strategy):
    """``G = (1/n) sum_i grad l_i(w + rho g_i / ||g_i||)``: the instances as batched groups of one, or the
    per-instance oracle (:mod:`.per_instance`) one instance at a time or vmapped."""

    def __init__(self, parts: Parts, batched: Batched) -> None:
        super().__init__(parts)
        self.batched = batched

    def run(self, ctx: Step, grads_before: Grads) -> StepResult:
        step = self.batched.run(ctx, grads_before, 1)
        if step is not None:
            return StepResult(step.losses, step.perturbed_losses, perturbed=True, plain_grad=step.plain_grad)
        parts = self.parts
        # per-instance passes are local: a synchronized DDP forward would arm the all-reduce for them
        with ctx.no_sync():
            update, losses, perturbed, plain = parts.instances.sam_gradient(
                ctx.loss_fn, ctx.batch, ctx.rho, parts.params_before, with_plain=ctx.plain_grad
            )
        put_grads(parts.updated, grads_before, copy=True)
        # d/dp sum_p <p, G_p> = G: routes G through the caller's backward (loss scaling, DDP all-reduce). A parameter
        # the loss never reaches is left out, so that its .grad stays None as under ERM, SAM and the batched path.
        terms = [(p * g).sum() for p, g in zip(parts.params, update) if g is not None]
        surrogate = torch.stack(terms or [parts.params[0].sum() * 0]).sum()  # or a loss that reaches no parameter
        with descent_sync(ctx.no_sync, ctx.sync_descent):
            if ctx.sync_descent:
                arm_reducer(ctx.no_sync, surrogate)
            ctx.backward(surrogate)
        return StepResult(losses.detach(), perturbed.detach(), perturbed=True, plain_grad=plain)


def choose(parts: Parts, scorer: Scorer) -> Strategy:
    """The strategy of ``parts.config``'s method, decided once."""
    cfg = parts.config
    if not cfg.perturbs:
        return Plain(parts)
    if cfg.method == "per_instance":
        return PerInstanceSAM(parts, Batched(parts, scorer))
    two_pass = TwoPass(parts, scorer)
    if cfg.m_sharpness is not None:
        return Grouped(parts, two_pass, Batched(parts, scorer), cfg.m_sharpness)
    return two_pass
