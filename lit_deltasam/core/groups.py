"""m-sharpness and per-instance SAM in batched passes, and the buffers of grouped steps.

The loop in :meth:`~lit_deltasam.core.engine.DeltaSAM._m_sharpness` runs a pair of passes per group of m
instances. :class:`BatchedGroups` stacks the groups of a chunk instead: ``vmap`` of ``functional_call`` runs
every group's clean forward in one pass over G views of w (expanded, not copied), whose backward gives every
group's ascent gradient ``g_k``; ``g_k`` becomes ``w + eps_k`` in place, and a second ``vmap`` pass over those
runs every group's perturbed descent, whose gradients sum into ``w``'s ``.grad`` through the caller's backward.
The FLOPs are SAM's; the memory is about 2G parameter copies per chunk (``w + eps_k``, and the descent's
gradient for each), which ``chunk`` bounds. Per-instance SAM is the case m = 1.

The result is the loop's G to float tolerance on any model whose groups can be batched (:func:`unbatchable`
names the others, and they run the loop). A tensor held in several places (one module under two names, as in
``nn.ModuleList([block, block])``, or weights tied across modules) gets each group's view in every place
(``_LossModule.call``), and a parameter the loss never reaches keeps ``.grad`` ``None``, as in the loop.

Dropout: under ``vmap`` each group draws its own masks, and the descent replays the clean forward's random
state, so every instance sees the same masks in its two forwards, as in the loop; the masks are drawn layer by
layer across the chunk's groups instead of group by group, so they are other draws of the same distribution
than the loop's. Hugging Face models run their eager attention in these passes (:func:`eager_attention`),
whose dropout on the attention probabilities draws other masks than SDPA's.

:class:`GroupBuffers` keeps a grouped step's buffers to one move, as a whole-batch step makes: each group's
clean pass starts from the step's buffers, and they end moved by the share-weighted mean of the groups' moves.
For BatchNorm's running mean that is the whole batch's update; its running variance becomes the weighted mean
of the groups' variances (in training mode each group is normalised with its own statistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_map

from .ascent import perturb_groups_
from .batch import Batch, LossFn, batch_size, check_losses, slice_batch
from .decisions import on_device
from .distributed import world_size
from .guardedness import HeadTap
from .per_instance import _LossModule
from .randomness import RandomState
from .sharding import is_sharded

IMPLS = ("loop", "batched")


class Unbatchable(Exception):
    """The groups of a step cannot run in batched passes (the message says why); the caller runs the loop."""


BATCHED_METHODS = ("sam", "asam", "per_instance", "deltasam")


def _hooked(module: nn.Module) -> Optional[str]:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    for name, layer in module.named_modules():
        if any(getattr(layer, d, None) for d in hook_dicts):
            return name or type(module).__name__
    return None


def _instances(t: object) -> bool:
    return isinstance(t, Tensor) and t.ndim > 0


def group_impl(config: Any, device: torch.device) -> str:
    """``config.group_impl`` with ``auto`` resolved by measurement: ``batched`` on CUDA (2.7-7.9x faster than the
    loop on an H200), ``loop`` elsewhere (faster on the CPU); a per-instance SAM that chose ``vmap`` keeps it."""
    if config.group_impl != "auto":
        return str(config.group_impl)
    return "batched" if device.type == "cuda" and config.per_instance_impl != "vmap" else "loop"


def unbatchable(
    module: nn.Module, method: str, params: Sequence[Tensor], estimator: Optional[str] = None
) -> Optional[str]:
    """Why the groups of a step on ``module`` cannot run batched, or ``None`` when they can."""
    if method not in BATCHED_METHODS:
        return f"method={method!r} is not one of {BATCHED_METHODS}"
    if method == "deltasam" and estimator != "head":
        return f"estimator={estimator!r} scores each group with passes of its own; batched groups score with 'head'"
    if world_size() > 1:
        return "under data parallelism the batched passes would bypass the wrapper's forward (DDP's reducer)"
    if any(is_sharded(p) for p in params):
        return "the parameters are sharded (FSDP)"
    if params[0].dtype in (torch.float16, torch.bfloat16):
        return f"the weights are {params[0].dtype}, and eps must be measured after rounding to them"
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            return f"{name!r} is a {type(layer).__name__} in training mode, which normalises each group on its own"
    hooked = _hooked(module)
    if hooked is not None:
        return f"module {hooked!r} has hooks, which would see vmap's batched tensors"
    return None


@contextmanager
def eager_attention(module: nn.Module) -> Iterator[None]:
    """Hugging Face attention through its eager kernels: SDPA has no vmap batching rule, and vmap would run it
    one group at a time. HF reads the choice at every forward; it is put back after."""
    configs: dict[int, Any] = {}
    for layer in module.modules():
        config = getattr(layer, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            configs[id(config)] = config
    for config in configs.values():
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        for config in configs.values():
            config._attn_implementation = "sdpa"


class _Moved(torch.autograd.Function):
    """``moved`` (G stacked ``w + eps_k``) as a function of ``w``: the gradient reaching it sums over the groups
    into ``w``, with no copy of ``moved`` in the graph."""

    @staticmethod
    def forward(ctx, param: Tensor, moved: Tensor) -> Tensor:
        return moved.view_as(moved)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.sum(0), None


@dataclass
class GroupedStep:
    """What the groups of one step measured, in instance order (group order for the per-group tensors)."""

    losses: Tensor
    perturbed_losses: Tensor
    weights: Optional[Tensor]
    """Each instance's lambda within its group (``None`` for uniform weights)."""
    sizes: list[int]
    """Each group's number of instances."""
    grad_norms: Tensor
    eps_norms: Tensor
    applied: bool | Tensor
    plain_grad: Optional[list[Tensor]]


@dataclass(frozen=True)
class GroupSettings:
    """What every grouped step of an engine shares: ASAM's scaling, dropout, and δ-SAM's weights, where ``head`` (a
    :class:`HeadTap` whose layer is known) and ``weigh`` (one group's scores to its λ) make each group's ascent
    ``sum_i lambda_i grad l_i(w)``, its descent weighted too with ``weighted_descent``."""

    adaptive: bool = False
    eta: float = 0.0
    unscaled: Optional[Sequence[bool]] = None
    share_dropout: bool = True
    head: Optional[HeadTap] = None
    weigh: Optional[Callable[[Tensor], Tensor]] = None
    weighted_descent: bool = False
    centralize: bool = False


@dataclass(frozen=True)
class _Call:
    """One grouped step: its loss, radius, backward and sync, batch size and LookSAM's plain-gradient sums."""

    loss: _LossModule
    rho: float
    backward: Callable[[Tensor], None]
    ascent_sync: Callable[[], AbstractContextManager]
    n: int
    plain: Optional[list[Tensor]]


class BatchedGroups:
    """Every group's ascent in one ``vmap`` pass and every group's descent in another, ``chunk`` groups at a time.

    Args:
        module: the model; ``loss_fn`` must compute through it.
        params: the perturbed parameters, named ``names`` in ``module.named_parameters()``.
        unperturbed: the other trainable parameters (held at ``w`` in the ascent, differentiated in the descent).
        chunk: groups per batched pass; ``None`` for all of a batch's equal-sized groups.
        settings: what the engine's method asks of every step.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[Tensor],
        names: Sequence[str],
        unperturbed: Sequence[Tensor],
        chunk: Optional[int] = None,
        settings: GroupSettings = GroupSettings(),
    ) -> None:
        self.module = module
        self.params = list(params)
        self.names = [f"module.{n}" for n in names]
        owned = {id(p): name for name, p in module.named_parameters()}
        self.unperturbed = {f"module.{owned[id(p)]}": p for p in unperturbed}
        self.chunk = chunk
        self.settings = settings

    def passes(self, n: int, m: int) -> list[tuple[int, int, int]]:
        """``(start, groups, size)`` of each batched pass: the full groups of m, ``chunk`` at a time, then the
        remainder (n mod m instances) as one group of its own."""
        full, rest = divmod(n, m)
        step = self.chunk or max(full, 1)
        out = [(k * m, min(step, full - k), m) for k in range(0, full, step)]
        return out + ([(full * m, 1, rest)] if rest else [])

    def step(
        self,
        loss_fn: LossFn,
        batch: Batch,
        m: int,
        rho: float,
        *,
        backward: Callable[[Tensor], None],
        ascent_sync: Callable[[], AbstractContextManager],
        descent_sync: Callable[[bool], AbstractContextManager],
        plain_grad: bool = False,
    ) -> GroupedStep:
        """Add ``(1/n) sum_i grad l_i(w + eps_k(i))`` to ``.grad`` through ``backward``; the weights stay at w.
        ``descent_sync(last)`` is the context of a pass's descent, ``last`` for the batch's final pass.

        Raises:
            Unbatchable: where vmap cannot run the model, or the loss is one scalar per group.
        """
        n = batch_size(batch)
        assert n is not None
        plain = [torch.zeros_like(p) for p in self.params] if plain_grad else None
        call = _Call(_LossModule(self.module, loss_fn), rho, backward, ascent_sync, n, plain)
        passes = self.passes(n, m)
        out = []
        with eager_attention(self.module):
            for index, (start, count, size) in enumerate(passes):
                part = slice_batch(batch, slice(start, start + count * size))
                last = partial(descent_sync, index == len(passes) - 1)
                try:
                    out.append(self._pass(call, part, count, size, last))
                except RuntimeError as error:  # an op vmap has no batching rule for (a real error recurs in the loop)
                    raise Unbatchable(f"vmap cannot run this model ({str(error).splitlines()[0][:200]})") from error
        ok = torch.cat([o[4] for o in out]).all()
        return GroupedStep(
            losses=torch.cat([o[0] for o in out]),
            perturbed_losses=torch.cat([o[1] for o in out]),
            weights=torch.cat([cast(Tensor, o[5]) for o in out]) if self.settings.weigh is not None else None,
            sizes=[size for _, count, size in passes for _ in range(count)],
            grad_norms=torch.cat([o[2] for o in out]),
            eps_norms=torch.cat([o[3] for o in out]),
            applied=ok if on_device(ok.device) else bool(ok),
            plain_grad=plain,
        )

    def _losses(
        self,
        call: _Call,
        stacked: dict[str, Tensor],
        shared: dict[str, Tensor],
        part: Batch,
        count: int,
        tap: bool = False,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """``[count, size]`` losses of the groups of ``part``, group k at the parameters ``stacked[:, k]``; with
        ``tap``, also the head layer's ``[count, size, D]`` input and a zero ``[n, C]`` leaf added to its output,
        whose gradient is the loss's gradient at the head's output (vmap's outputs are not in the graph)."""
        grouped = tree_map(lambda t: t.unflatten(0, (count, -1)) if _instances(t) else t, part)
        in_dims = tree_map(lambda t: 0 if _instances(t) else None, grouped)
        head = self.settings.head
        layer = head.layer if tap and head is not None else None
        device = self.params[0].device
        if layer is None:

            def group_losses(params: dict[str, Tensor], group: Batch) -> Tensor:
                return call.loss.call({**params, **shared}, group)

            out = vmap(group_losses, in_dims=(0, in_dims), randomness="different")(stacked, grouped)
            if out.ndim == 1:
                raise Unbatchable("the loss is one scalar per group")
            return check_losses(out.reshape(-1), part, device).reshape(count, -1), None, None
        return self._tapped_losses(call, layer, stacked, shared, part, grouped, in_dims, count)

    def _tapped_losses(
        self,
        call: _Call,
        layer: nn.Linear,
        stacked: dict[str, Tensor],
        shared: dict[str, Tensor],
        part: Batch,
        grouped: Batch,
        in_dims: Any,
        count: int,
    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """:meth:`_losses` with the head layer tapped."""
        device = self.params[0].device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        n = batch_size(part)
        assert n is not None
        zero = torch.zeros(n, layer.out_features, dtype=dtype or layer.weight.dtype, device=device, requires_grad=True)

        def tapped_losses(params: dict[str, Tensor], group: Batch, added: Tensor) -> tuple[Tensor, Tensor]:
            inputs: list[Tensor] = []

            def hook(_: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
                inputs.append(args[0])
                return out + added.to(out.dtype)

            handle = layer.register_forward_hook(hook)
            try:
                losses = call.loss.call({**params, **shared}, group)
            finally:
                handle.remove()
            if len(inputs) != 1:
                raise RuntimeError(f"the head layer ran {len(inputs)} times in one forward; the head estimator needs 1")
            return losses, inputs[0]

        losses, h = vmap(tapped_losses, in_dims=(0, in_dims, 0), randomness="different")(
            stacked, grouped, zero.unflatten(0, (count, -1))
        )
        return check_losses(losses.reshape(-1), part, device).reshape(count, -1), h, zero

    def _weights(self, clean: Tensor, h: Tensor, z: Tensor) -> Tensor:
        """Each group's lambda from the head's scores, ``[count, size]``."""
        tap, weigh = self.settings.head, self.settings.weigh
        assert tap is not None and weigh is not None
        tap._input, tap._output, tap._calls = h.flatten(0, 1).detach(), z, 1  # as its hook would
        scores = tap.scores(clean.reshape(-1)).reshape(clean.shape)
        return torch.stack([weigh(group) for group in scores])

    def _pass(
        self, call: _Call, part: Batch, count: int, size: int, descent_sync: Callable[[], AbstractContextManager]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
        """The ascent and descent of ``count`` groups of ``size``: losses, perturbed losses, per group ``||g_k||``,
        ``||eps_k||`` and whether eps_k was applied, and each instance's lambda (``None`` when uniform)."""
        settings = self.settings
        random_state = RandomState(self.params[0].device) if settings.share_dropout else None
        if random_state is not None:
            random_state.capture()
        clean, weights, grads = self._ascend(call, part, count, size)
        live = [i for i, g in enumerate(grads) if g is not None]
        unscaled = [settings.unscaled[i] for i in live] if settings.unscaled is not None else None
        norm, eps_norm, ok = self._to_moved(
            call, count, [self.params[i] for i in live], [cast(Tensor, grads[i]) for i in live], unscaled
        )
        moved = {
            name: p.expand(count, *p.shape) if g is None else _Moved.apply(p, g)
            for name, p, g in zip(self.names, self.params, grads)
        }
        del grads
        with descent_sync():
            with random_state.replay() if random_state is not None else nullcontext():
                perturbed = self._losses(call, moved, self.unperturbed, part, count)[0]
            if weights is not None and settings.weighted_descent:
                call.backward((weights.to(perturbed.dtype) * perturbed).sum() * (size / call.n))
            else:
                call.backward(perturbed.sum() / call.n)
        flat = None if weights is None else weights.reshape(-1)
        return clean.detach().reshape(-1), perturbed.detach().reshape(-1), norm, eps_norm, ok, flat

    def _ascend(
        self, call: _Call, part: Batch, count: int, size: int
    ) -> tuple[Tensor, Optional[Tensor], list[Optional[Tensor]]]:
        """The groups' clean losses, λ, and ascent gradients ``[count, ...]`` (summed into LookSAM's plain
        gradient where asked)."""
        views = [p.detach().expand(count, *p.shape).requires_grad_() for p in self.params]
        fixed = {name: p.detach() for name, p in self.unperturbed.items()}
        weights = None
        with call.ascent_sync():
            tap = self.settings.weigh is not None
            clean, h, z = self._losses(call, dict(zip(self.names, views)), fixed, part, count, tap=tap)
            if h is not None and z is not None:
                weights = self._weights(clean, h, z)
                if call.plain is not None:
                    mean = torch.autograd.grad(clean.sum() / call.n, views, retain_graph=True, allow_unused=True)
                    for total, part_grad in zip(call.plain, mean):
                        if part_grad is not None:
                            total.add_(part_grad.sum(0))
                ascent = (weights.to(clean.dtype) * clean).sum()
            else:
                ascent = clean.mean(1).sum()
            call.backward(ascent)
        grads = [v.grad for v in views]
        if call.plain is not None and weights is None:
            share = torch.full((count,), size / call.n, dtype=self.params[0].dtype, device=self.params[0].device)
            for total, grad in zip(call.plain, grads):
                if grad is not None:
                    total.add_(torch.tensordot(share, grad, dims=1))
        return clean, weights, grads

    def _to_moved(
        self, call: _Call, count: int, params: list[Tensor], grads: list[Tensor], unscaled: Optional[list[bool]]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Turn each ``[G, ...]`` gradient into ``w + eps_k`` in place (:func:`.ascent.perturb_groups_`)."""
        if not grads:
            zero = torch.zeros(count, device=self.params[0].device)
            return zero, zero, zero > 0
        settings = self.settings
        return perturb_groups_(
            params,
            grads,
            call.rho,
            adaptive=settings.adaptive,
            eta=settings.eta,
            unscaled=unscaled,
            centralize=settings.centralize,
        )


class GroupBuffers:
    """A grouped step's buffers moved once: each group's clean pass starts from the step's buffers, and they end
    at the step's plus the share-weighted mean of the groups' moves (a non-floating buffer, such as BatchNorm's
    ``num_batches_tracked``, takes the first group's value)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @torch.no_grad()
    def start(self) -> None:
        self._before = [b.detach().clone() for b in self.module.buffers()]
        self._moves: list[Optional[Tensor]] = [None] * len(self._before)

    @torch.no_grad()
    def record(self, share: float) -> None:
        """Take one group's move (since :meth:`start`) at weight ``share``, and put the buffers back."""
        for i, (b, before) in enumerate(zip(self.module.buffers(), self._before)):
            if torch.equal(b, before):
                continue
            if not b.is_floating_point():
                self._moves[i] = b.clone() if self._moves[i] is None else self._moves[i]
            else:
                move = (b - before).mul_(share)
                held = self._moves[i]
                self._moves[i] = move if held is None else held.add_(move)
            b.copy_(before)

    @torch.no_grad()
    def finish(self) -> None:
        for b, before, move in zip(self.module.buffers(), self._before, self._moves):
            if move is not None:
                b.copy_(move if not b.is_floating_point() else before + move)
