"""Exact per-instance quantities: gradient norms and the per-instance SAM gradient.

Two implementations compute the same numbers. ``loop`` runs one instance at a time
through ordinary autograd; it works for any model, holds one instance's graph, and
gives an instance the same dropout masks in its two forwards. ``vmap`` maps
``torch.func.grad`` of a ``functional_call`` over the instances, in chunks; it can be
faster for small models whose forward is free of data-dependent control flow, and it
refuses active dropout for the per-instance SAM gradient, whose masks it cannot share.

In the loop, an embedding table's per-instance gradient is the few rows its instance's tokens select:
on the host path (a CPU), the loop asks ``nn.Embedding`` for sparse gradients and perturbs, restores and
accumulates those rows alone (:class:`Rows`). On an accelerator it keeps dense gradients, since coalescing
rows reads their count on the host. A row's repeated tokens are summed in another order than in a dense
gradient, so the results can differ from dense arithmetic in the last bits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Optional, Union, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from .ascent import factor, host_factor, zero_non_finite_
from .batch import Batch, LossFn, batch_size, check_losses, slice_batch
from .decisions import on_device
from .norms import total_norm
from .randomness import RandomState
from .snapshot import Snapshot


def _places(module: nn.Module) -> dict[str, list[str]]:
    """Every path of a tensor held in more than one place -> one path per place (a module's attribute) holding it.

    A module registered under two names (``nn.ModuleList([block, block])``, one layer under two attributes) holds
    its tensors in one place reached by two paths; a tensor tied across two modules is held in two places.
    ``functional_call``'s own tying swaps one place once per path: the second swap saves the first's tensor as the
    original and puts it back after the call, leaving a vmap tensor where the module's Parameter was."""
    held: dict[int, list[str]] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, layer in module.named_modules(remove_duplicate=False):
        for attr, t in [*layer._parameters.items(), *layer._buffers.items()]:
            if t is not None and (id(layer), attr) not in seen:
                seen.add((id(layer), attr))
                held.setdefault(id(t), []).append(f"{prefix}.{attr}" if prefix else attr)
    return {path: paths for paths in held.values() if len(paths) > 1 for path in paths}


class _LossModule(nn.Module):
    """Lets ``functional_call`` swap the parameters under an arbitrary loss function."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn
        self._places = _places(self)

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(batch)

    def call(self, tensors: dict[str, Tensor], batch: Batch) -> Tensor:
        """``loss_fn(batch)`` with ``tensors`` (by path) in place of the module's, each in every place holding it."""
        placed = {path: t for name, t in tensors.items() for path in self._places.get(name, (name,))}
        return functional_call(self, placed, (batch,), tie_weights=False)


def _has_active_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in module.modules())


def check_instance_independent(module: nn.Module) -> None:
    """Per-instance forwards are meaningless for layers that mix the instances of a batch."""
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            raise ValueError(
                f"module {name!r} is a {type(layer).__name__} in training mode, which couples the instances of a "
                "batch; per-instance gradients (method='per_instance' or estimator='exact') need instance-independent "
                "layers (use GroupNorm/LayerNorm, or put the BatchNorm layers in eval mode)"
            )


Grad = Union[Tensor, tuple[Tensor, Tensor]]
"""A parameter's per-instance gradient: dense, or an embedding table's ``(rows, values)`` (rows distinct)."""


class Rows:
    """The embedding tables among ``params``, whose per-instance gradients the loop takes as the rows touched."""

    def __init__(self, module: nn.Module, params: Sequence[Tensor]) -> None:
        ids = {id(p) for p in params}
        self.layers = [
            m for m in module.modules() if isinstance(m, nn.Embedding) and id(m.weight) in ids and m.max_norm is None
        ]

    @contextmanager
    def sparse(self) -> Iterator[None]:
        """Forwards whose embedding gradients come back sparse, where decisions are taken on the host: on an
        accelerator, coalescing the rows would read their count on the host once per gradient."""
        layers = [m for m in self.layers if not on_device(m.weight.device)]
        flags = [m.sparse for m in layers]
        for m in layers:
            m.sparse = True
        try:
            yield
        finally:
            for m, flag in zip(layers, flags):
                m.sparse = flag


def _rows(grads: Sequence[Tensor]) -> list[Grad]:
    out: list[Grad] = []
    for g in grads:
        if g.is_sparse:
            g = g.coalesce()
            out.append((g.indices()[0], g.values()))
        else:
            out.append(g)
    return out


def _values(grads: Sequence[Grad]) -> list[Tensor]:
    return [g[1] if isinstance(g, tuple) else g for g in grads]


def _add_(targets: Sequence[Tensor], grads: Sequence[Grad]) -> None:
    """``targets += grads``, a sparse gradient into its rows."""
    dense = [(t, g) for t, g in zip(targets, grads) if not isinstance(g, tuple)]
    if dense:
        torch._foreach_add_([t for t, _ in dense], [g for _, g in dense])
    for t, g in zip(targets, grads):
        if isinstance(g, tuple):
            t.index_add_(0, g[0], g[1])


class PerInstance:
    """Per-instance gradient norms and per-instance SAM gradients of a loss function on ``module``.

    Args:
        module: the module whose parameters ``params`` are.
        params: the parameters to differentiate; the others stay fixed.
        names: their names in ``module.named_parameters()``.
        impl: ``loop`` or ``vmap``.
        chunk: instances per ``vmap`` call; ``None`` for the whole batch.
        share_dropout: the loop replays the random state so that an instance's two
            forwards draw the same dropout masks; ``vmap`` cannot, and refuses.
    """

    def __init__(
        self,
        module: nn.Module,
        params: Sequence[Tensor],
        names: Sequence[str],
        impl: str = "loop",
        chunk: Optional[int] = None,
        share_dropout: bool = True,
    ) -> None:
        self.module = module
        self.share_dropout = share_dropout
        self.params = list(params)
        self.names = list(names)
        self.impl = impl
        self.chunk = chunk
        self.rows = Rows(module, self.params)

    def grad_norms(self, loss_fn: LossFn, batch: Batch) -> Tensor:
        """``[n]`` norms ``||grad l_i(w)||`` over ``params``."""
        check_instance_independent(self.module)
        if self.impl == "vmap":
            return torch.cat([self._vmap(loss_fn, chunk, rho=None)[0] for chunk in self._chunks(batch)])
        norms = []
        for i in range(self._size(batch)):
            instance = slice_batch(batch, slice(i, i + 1))
            with self.rows.sparse():
                loss = self._instance_loss(loss_fn, instance)
                grads = _rows(self._grads(loss))
            norms.append(total_norm(_values(grads)))
        return torch.stack(norms)

    def sam_gradient(
        self, loss_fn: LossFn, batch: Batch, rho: float, snapshot: Snapshot, with_plain: bool = False
    ) -> tuple[list[Optional[Tensor]], Tensor, Tensor, Optional[list[Tensor]]]:
        """``G = mean_i grad l_i(w + rho ĝ_i)`` with ``ĝ_i = g_i / ||g_i||``.

        Returns:
            ``G`` as one tensor per parameter (``None`` for one that no instance's loss reaches, whose ``.grad``
            autograd leaves ``None`` too), the losses ``l_i(w)``, the losses
            ``l_i(w + rho ĝ_i)`` and, ``with_plain``, the plain gradient ``mean_i g_i``. ``snapshot`` must
            hold ``params`` at ``w``; the parameters are restored from it.
        """
        check_instance_independent(self.module)
        if self.impl == "vmap" and self.share_dropout and _has_active_dropout(self.module):
            raise ValueError(
                "per_instance_impl='vmap' cannot give an instance the same dropout mask at w and at w + rho ĝ_i; "
                "use per_instance_impl='loop' (the default), share_dropout=False, or a model without active dropout"
            )
        n = self._size(batch)
        total = [torch.zeros_like(p) for p in self.params]
        plain = [torch.zeros_like(p) for p in self.params] if with_plain else []
        clean, perturbed = [], []
        reached = [False] * len(self.params)
        if self.impl == "vmap":
            reached = self._reached(loss_fn, batch)
            for chunk in self._chunks(batch):
                losses, grads, perturbed_losses, clean_grads = self._vmap(loss_fn, chunk, rho=rho)
                torch._foreach_add_(total, [g.sum(0) for g in grads])
                if with_plain:
                    torch._foreach_add_(plain, [g.sum(0) for g in clean_grads])
                clean.append(losses)
                perturbed.append(perturbed_losses)
        else:
            random_state = RandomState(self.device)
            for i in range(n):
                instance = slice_batch(batch, slice(i, i + 1))
                sums = (total, plain, reached)
                loss, perturbed_loss = self._sam_one(loss_fn, instance, rho, snapshot, random_state, *sums)
                clean.append(loss)
                perturbed.append(perturbed_loss)
        torch._foreach_div_(total, n)
        if with_plain:
            torch._foreach_div_(plain, n)
        update = [t if r else None for t, r in zip(total, reached)]
        return update, torch.cat(clean), torch.cat(perturbed), plain if with_plain else None

    def _sam_one(
        self,
        loss_fn: LossFn,
        instance: Batch,
        rho: float,
        snapshot: Snapshot,
        random_state: RandomState,
        total: list[Tensor],
        plain: list[Tensor],
        reached: list[bool],
    ) -> tuple[Tensor, Tensor]:
        """One instance of the loop: ``grad l_i(w + rho ĝ_i)`` added to ``total`` (and ``g_i`` to a non-empty
        ``plain``; the parameters it reaches marked in ``reached``), w restored; returns ``l_i(w)`` and
        ``l_i(w + rho ĝ_i)``."""
        random_state.capture()
        with self.rows.sparse():
            loss = self._instance_loss(loss_fn, instance)
            grads = _rows(self._grads(loss))
        if plain:
            _add_(plain, grads)
        norm = total_norm(_values(grads))
        try:
            if on_device(norm.device):  # eps_i = 0 where ||g_i|| is 0 or not finite, with no value read
                saved = self._perturb(grads, factor(rho, norm, torch.float64).float())
            else:
                step = host_factor(rho, norm.item())
                saved = [] if step is None else self._perturb(grads, step)
            with self.rows.sparse(), random_state.replay() if self.share_dropout else nullcontext():
                perturbed_loss = self._instance_loss(loss_fn, instance)
                _add_(total, _rows(self._grads(perturbed_loss, reached)))
        except BaseException:
            snapshot.restore()
            raise
        self._restore(snapshot, saved)
        return loss.detach().reshape(1), perturbed_loss.detach().reshape(1)

    @torch.no_grad()
    def _perturb(self, grads: list[Grad], factor: Union[float, Tensor]) -> list[tuple[int, Tensor, Tensor]]:
        """Move the parameters by ``factor * grads``: a dense gradient everywhere, a sparse one on its rows alone.
        Returns the rows moved, ``(parameter index, rows, their values before)``."""
        dense = [i for i, g in enumerate(grads) if not isinstance(g, tuple)]
        moves = [cast(Tensor, grads[i]) for i in dense]
        saved = []
        for i, g in enumerate(grads):
            if isinstance(g, tuple):
                saved.append((i, g[0], self.params[i][g[0]]))
                moves.append(g[1])
        if isinstance(factor, Tensor):
            torch._foreach_mul_(moves, factor)
            zero_non_finite_(moves)  # inf * 0 is NaN: eps_i must be exactly 0
            torch._foreach_add_([self.params[i] for i in dense], moves[: len(dense)])
        else:
            torch._foreach_add_([self.params[i] for i in dense], moves[: len(dense)], alpha=factor)
        for (i, rows, _), values in zip(saved, moves[len(dense) :]):
            self.params[i].index_add_(0, rows, values, alpha=1.0 if isinstance(factor, Tensor) else factor)
        return saved

    @torch.no_grad()
    def _restore(self, snapshot: Snapshot, saved: list[tuple[int, Tensor, Tensor]]) -> None:
        """Put back the parameters moved by :meth:`_perturb`: the dense ones from ``snapshot``, the rows by copy."""
        moved_rows = {i for i, _, _ in saved}
        snapshot.restore([i for i in range(len(self.params)) if i not in moved_rows])
        for i, rows, values in saved:
            self.params[i].index_copy_(0, rows, values)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _size(self, batch: Batch) -> int:
        n = batch_size(batch)
        if not n:
            raise ValueError("per-instance computations need a batch of tensors with at least one instance")
        return n

    def _chunks(self, batch: Batch) -> list[Batch]:
        n = self._size(batch)
        step = self.chunk or n
        return [slice_batch(batch, slice(i, i + step)) for i in range(0, n, step)]

    def _instance_loss(self, loss_fn: LossFn, instance: Batch) -> Tensor:
        losses = check_losses(loss_fn(instance), instance, self.device)
        return losses[0]

    def _grads(self, loss: Tensor, reached: Optional[list[bool]] = None) -> list[Tensor]:
        """``grad loss`` for each parameter, zero where the loss does not reach it (marked in ``reached``)."""
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        if reached is not None:
            reached[:] = [r or g is not None for r, g in zip(reached, grads)]
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def _reached(self, loss_fn: LossFn, batch: Batch) -> list[bool]:
        """Which parameters the loss reaches, from the first instance through ordinary autograd: ``torch.func``
        gives zeros where autograd gives ``None``, and a function ``vmap`` runs reaches the same parameters for
        every instance. The random state is put back, so that the step draws what it would without this."""
        random_state = RandomState(self.device)
        random_state.capture()
        try:
            loss = self._instance_loss(loss_fn, slice_batch(batch, slice(0, 1)))
            return [g is not None for g in torch.autograd.grad(loss, self.params, allow_unused=True)]
        finally:
            random_state.restore()

    def _vmap(self, loss_fn: LossFn, batch: Batch, rho: Optional[float]):
        wrapper = _LossModule(self.module, loss_fn)
        detached = {f"module.{name}": p.detach() for name, p in zip(self.names, self.params)}

        def loss_one(params: dict[str, Tensor], instance: Batch) -> Tensor:
            unsqueezed = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, instance)
            return wrapper.call(params, unsqueezed).reshape(())

        def norm_of(grads: dict[str, Tensor]) -> Tensor:
            # vmap has no batching rule for the foreach norm kernels
            return torch.stack([g.pow(2).sum() for g in grads.values()]).sum().sqrt()

        def norm_one(params: dict[str, Tensor], instance: Batch):
            return (norm_of(grad_and_value(loss_one)(params, instance)[0]),)

        radius = 0.0 if rho is None else rho

        def sam_one(params: dict[str, Tensor], instance: Batch):
            grads, loss = grad_and_value(loss_one)(params, instance)
            norm = norm_of(grads)
            scale = factor(radius, norm)
            moved = {k: v + scale * grads[k] for k, v in params.items()}
            moved_grads, perturbed_loss = grad_and_value(loss_one)(moved, instance)
            return loss, [moved_grads[k] for k in params], perturbed_loss, [grads[k] for k in params]

        in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.ndim > 0 else None, batch)
        fn = norm_one if rho is None else sam_one
        return vmap(fn, in_dims=(None, in_dims), randomness="different")(detached, batch)
