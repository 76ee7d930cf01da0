"""Probes of what a method does: fidelity to per-instance SAM, and the top Hessian eigenvalue.

To second order every rule's update is ``G = ḡ + C`` with a sharpness correction C.
δ-SAM's claim is that its ``C`` points where per-instance SAM's does, more than SAM's;
``cos(C_X, C_PI)`` measures exactly that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import FAMILY, DeltaSAMConfig
from .batch import Batch, LossFn
from .engine import DeltaSAM
from .family import descend_
from .norms import total_norm
from .snapshot import put_grads, take_grads


def update_of(
    sam: DeltaSAM, loss_fn: LossFn, batch: Batch, running_mean: Optional[Sequence[Tensor]] = None
) -> list[Tensor]:
    """The G of one full step of ``sam``'s method on ``batch`` at the config's ρ (a probe's fixed radius), leaving
    ``.grad`` and the weights as they were. The family's rules apply as at a step: GSAM's descent, WSAM's
    ``G = g + γ/(1−γ) (g_adv − g)`` (its decoupled form applies the same term after the base step, outside the
    optimizer's preconditioning) and Friendly-SAM's ascent shifted by ``running_mean`` (none: its first step,
    SAM's)."""
    cfg = sam.config
    saved = take_grads(sam.updated)
    try:
        shift = running_mean if cfg.method == "fsam" else None
        result = sam.step(loss_fn, batch, check_finite=False, rho=cfg.rho, plain_grad=cfg.method in FAMILY, shift=shift)
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in sam.params]
        if result.plain_grad is not None:
            descend_(cfg, grads, result.plain_grad)
        return grads
    finally:
        put_grads(sam.updated, saved)


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two vectors stored as lists of tensors."""
    return torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Cosine between two vectors stored as lists of tensors, in float64."""
    a, b = [x.double() for x in a], [y.double() for y in b]
    return dot(a, b) / (total_norm(a) * total_norm(b)).clamp_min(torch.finfo(torch.float64).tiny)


def corrections(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    methods: Mapping[str, DeltaSAMConfig],
    params: Optional[Iterable[Tensor]] = None,
    rho: Optional[float] = None,
    impl: str = "loop",
    running_means: Optional[Mapping[str, Sequence[Tensor]]] = None,
) -> dict[str, dict[str, float]]:
    """How close each named method's sharpness correction is to per-instance SAM's.

    For each method X, with ``C_X = G_X - ḡ``: ``cos``, the cosine between ``C_X`` and
    ``C_PI``, and ``rel_err``, ``||C_X - C_PI|| / ||C_PI||``, which also counts the
    magnitude. The per-instance oracle uses ``rho`` (default: the first method's) and
    computes per-instance SAM with ``impl``; every method is compared at the radius it is
    configured with. Run it with the module in eval mode so that dropout does not add
    noise to the comparison. Each method's correction is that of its full step (:func:`update_of`: the family's
    rules included, a Friendly-SAM method's running mean from ``running_means`` by name); ``interval``, LookSAM and
    the adaptive policy choose when a full step runs, not what it is.
    """
    params = list(params) if params is not None else None
    configs = list(methods.values())
    radius = rho if rho is not None else configs[0].rho
    plain = update_of(DeltaSAM(module, DeltaSAMConfig(method="erm"), params), loss_fn, batch)
    oracle_cfg = DeltaSAMConfig(method="per_instance", rho=radius, per_instance_impl=impl)
    oracle = update_of(DeltaSAM(module, oracle_cfg, params), loss_fn, batch)
    means = running_means or {}
    c_oracle = torch._foreach_sub(oracle, plain)
    c_oracle_norm = total_norm([c.double() for c in c_oracle])
    out = {}
    for name, cfg in methods.items():
        update = update_of(DeltaSAM(module, cfg, params, driven=True), loss_fn, batch, means.get(name))
        correction = torch._foreach_sub(update, plain)
        error = total_norm([(a.double() - b.double()) for a, b in zip(correction, c_oracle)])
        out[name] = {
            "cos": cosine(correction, c_oracle).item(),
            "rel_err": (error / c_oracle_norm.clamp_min(torch.finfo(torch.float64).tiny)).item(),
        }
    return out


def fidelity(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    methods: Mapping[str, DeltaSAMConfig],
    params: Optional[Iterable[Tensor]] = None,
    rho: Optional[float] = None,
    impl: str = "loop",
    running_means: Optional[Mapping[str, Sequence[Tensor]]] = None,
) -> dict[str, float]:
    """``cos(C_X, C_PI)`` for each named method X (see :func:`corrections`)."""
    found = corrections(module, loss_fn, batch, methods, params, rho, impl, running_means)
    return {name: m["cos"] for name, m in found.items()}


def top_hessian_eigenvalue(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Optional[Iterable[Tensor]] = None,
    iters: int = 20,
    tol: float = 1e-3,
    generator: Optional[torch.Generator] = None,
) -> float:
    """The largest-magnitude eigenvalue of the Hessian of the mean loss, by power iteration on Hessian-vector products.

    Attention runs on the math SDPA kernel here: the fused kernels have no double
    backward. ``generator`` (a CPU generator) draws the starting vector.
    """
    return top_hessian_eigenvalues(module, loss_fn, batch, params, 1, iters, tol, generator)[0]


def top_hessian_eigenvalues(
    module: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Optional[Iterable[Tensor]] = None,
    k: int = 3,
    iters: int = 20,
    tol: float = 1e-3,
    generator: Optional[torch.Generator] = None,
) -> list[float]:
    """The ``k`` largest-magnitude Hessian eigenvalues of the mean loss, by power iteration with deflation:
    each eigenpair found is projected out (``H - sum_j lambda_j v_j v_jᵀ``) before the next is sought."""
    params = [p for p in (params if params is not None else module.parameters()) if p.requires_grad]
    found: list[tuple[float, list[Tensor]]] = []
    with sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn(batch).mean()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(k):
            vector = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
            eigenvalue = 0.0
            for _ in range(iters):
                vector = list(torch._foreach_div(vector, total_norm(vector)))
                product = list(torch.autograd.grad(grads, params, grad_outputs=vector, retain_graph=True))
                for value, v in found:
                    torch._foreach_add_(product, v, alpha=-value * dot(v, vector).item())
                estimate = dot(product, vector).item()
                converged = abs(estimate - eigenvalue) <= tol * max(abs(estimate), 1e-12)
                eigenvalue = estimate
                vector = [h.detach() for h in product]
                if converged:
                    break
            found.append((eigenvalue, list(torch._foreach_div(vector, total_norm(vector)))))
    return [value for value, _ in found]
