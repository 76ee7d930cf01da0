"""Exact per-instance quantities: gradient norms and the per-instance SAM gradient.

Two implementations compute the same numbers. ``loop`` runs one instance at a time
through ordinary autograd; it works for any model, holds one instance's graph, and
gives an instance the same dropout masks in its two forwards. ``vmap`` maps
``torch.func.grad`` of a ``functional_call`` over the instances, in chunks; it can be
faster for small models whose forward is free of data-dependent control flow, and it
refuses active dropout for the per-instance SAM gradient, whose masks it cannot share.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_map

from .batch import Batch, LossFn, batch_size, check_losses, slice_batch
from .decisions import on_device, scale_or_zero
from .norms import total_norm
from .randomness import RandomState
from .snapshot import Snapshot


class _LossModule(nn.Module):
    """Lets ``functional_call`` swap the parameters under an arbitrary loss function."""

    def __init__(self, module: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> Tensor:
        return self.loss_fn(batch)


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

    def grad_norms(self, loss_fn: LossFn, batch: Batch) -> Tensor:
        """``[n]`` norms ``||grad l_i(w)||`` over ``params``."""
        check_instance_independent(self.module)
        if self.impl == "vmap":
            return torch.cat([self._vmap(loss_fn, chunk, rho=None)[0] for chunk in self._chunks(batch)])
        norms = []
        for i in range(self._size(batch)):
            instance = slice_batch(batch, slice(i, i + 1))
            loss = self._instance_loss(loss_fn, instance)
            grads = self._grads(loss)
            norms.append(total_norm(grads))
        return torch.stack(norms)

    def sam_gradient(
        self, loss_fn: LossFn, batch: Batch, rho: float, snapshot: Snapshot, with_plain: bool = False
    ) -> tuple[list[Tensor], Tensor, Tensor, Optional[list[Tensor]]]:
        """``G = mean_i grad l_i(w + rho ĝ_i)`` with ``ĝ_i = g_i / ||g_i||``.

        Returns:
            ``G`` as one tensor per parameter, the losses ``l_i(w)``, the losses
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
        if self.impl == "vmap":
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
                random_state.capture()
                loss = self._instance_loss(loss_fn, instance)
                grads = self._grads(loss)
                if with_plain:
                    torch._foreach_add_(plain, grads)
                norm = total_norm(grads)
                try:
                    if on_device(norm.device):  # eps_i = 0 where ||g_i|| is 0 or not finite, with no value read
                        with torch.no_grad():
                            torch._foreach_mul_(grads, scale_or_zero(rho, norm))
                            torch._foreach_add_(self.params, grads)
                    elif norm > 0 and torch.isfinite(norm):
                        with torch.no_grad():
                            torch._foreach_add_(self.params, grads, alpha=rho / norm.item())
                    with random_state.replay() if self.share_dropout else nullcontext():
                        perturbed_loss = self._instance_loss(loss_fn, instance)
                    torch._foreach_add_(total, self._grads(perturbed_loss))
                finally:
                    snapshot.restore()
                clean.append(loss.detach().reshape(1))
                perturbed.append(perturbed_loss.detach().reshape(1))
        torch._foreach_div_(total, n)
        if with_plain:
            torch._foreach_div_(plain, n)
        return total, torch.cat(clean), torch.cat(perturbed), plain if with_plain else None

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

    def _grads(self, loss: Tensor) -> list[Tensor]:
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]

    def _vmap(self, loss_fn: LossFn, batch: Batch, rho: Optional[float]):
        wrapper = _LossModule(self.module, loss_fn)
        detached = {f"module.{name}": p.detach() for name, p in zip(self.names, self.params)}

        def loss_one(params: dict[str, Tensor], instance: Batch) -> Tensor:
            unsqueezed = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, instance)
            return functional_call(wrapper, params, (unsqueezed,)).reshape(())

        def norm_of(grads: dict[str, Tensor]) -> Tensor:
            # vmap has no batching rule for the foreach norm kernels
            return torch.stack([g.pow(2).sum() for g in grads.values()]).sum().sqrt()

        def norm_one(params: dict[str, Tensor], instance: Batch):
            return (norm_of(grad_and_value(loss_one)(params, instance)[0]),)

        radius = 0.0 if rho is None else rho

        def sam_one(params: dict[str, Tensor], instance: Batch):
            grads, loss = grad_and_value(loss_one)(params, instance)
            norm = norm_of(grads)
            scale = torch.where((norm > 0) & torch.isfinite(norm), radius / norm, torch.zeros_like(norm))
            moved = {k: v + scale * grads[k] for k, v in params.items()}
            moved_grads, perturbed_loss = grad_and_value(loss_one)(moved, instance)
            return loss, [moved_grads[k] for k in params], perturbed_loss, [grads[k] for k in params]

        in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.ndim > 0 else None, batch)
        fn = norm_one if rho is None else sam_one
        return vmap(fn, in_dims=(None, in_dims), randomness="different")(detached, batch)
