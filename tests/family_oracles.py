"""Closed forms for the SAM family (issue 48) on least squares, as plain functions, beside ``helpers.ls_sam_update``.

Each returns what the base optimizer receives (the gradient G, and for WSAM's decoupled form the term applied after
the base step), written from the papers' updates as docs/family-spec.md states them, with no stabilizing epsilon:
the reference library's ``perturb_eps`` is set to 0 where these are compared with it (tests/test_peer_reference.py).

Least squares is ``l_i(w) = (x_i·w - y_i)² / 2`` (``helpers.ls_grad``); gradient centralization needs a weight of
rank 2, so it has its multi-output form ``l_i(W) = ||W x_i - y_i||² / 2`` with ``W`` of shape ``[k, d]``
(:func:`mls_grad`), which is ``nn.Linear(d, k, bias=False)``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from helpers import ls_grad, ls_instance_grads
from torch import Tensor


def _ascent(w: Tensor, direction: Tensor, rho: float, eta: Optional[float] = None) -> Tensor:
    """``w + eps``: SAM's ``rho d/||d||``, or with ``eta`` ASAM's ``rho T² d/||T d||``, ``T = |w| + eta``."""
    if eta is None:
        return w + rho * direction / direction.norm()
    t = w.abs() + eta
    return w + rho * t * t * direction / (t * direction).norm()


# ------------------------------------------------------------------------------------------------------ δ- rows


def exact_weights(x: Tensor, y: Tensor, w: Tensor, beta: float) -> Tensor:
    """δ-SAM's instance weights with exact scores and neither floor nor clip: ``lambda_i ∝ ||g_i||**beta``."""
    s = ls_instance_grads(x, y, w).norm(dim=1) ** beta
    return s / s.sum()


def weighted_grad(x: Tensor, y: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """``sum_i lambda_i grad l_i(w)``."""
    return (lam[:, None] * ls_instance_grads(x, y, w)).sum(0)


# ----------------------------------------------------------------------------------------------------------- GSAM


def ls_gsam_update(
    x: Tensor,
    y: Tensor,
    w: Tensor,
    rho: float,
    alpha: float,
    lam: Optional[Tensor] = None,
    weighted: bool = False,
    eta: Optional[float] = None,
) -> Tensor:
    """GSAM (Zhuang et al., 2022): ``g_adv = ∇L(w + rho g/||g||)``, ``g_perp = g - (g·g_adv / ||g_adv||²) g_adv``
    (the clean gradient's part orthogonal to g_adv), ``G = g_adv - alpha g_perp``. alpha = 0 is SAM.

    δ-GSAM, given the instance weights ``lam`` (at w): the ascent along ``g_λ = sum_i lam_i g_i``; g and g_adv are
    the descent's loss's gradients at w and at w + eps, the plain mean or (``weighted``) the lam-weighted one.
    With ``eta``: ASAM's scaling of the ascent; the decomposition is unchanged, in gradient space."""
    g = ls_grad(x, y, w)
    direction = g if lam is None else weighted_grad(x, y, w, lam)
    moved = _ascent(w, direction, rho, eta)
    if weighted:
        assert lam is not None
        g, g_adv = direction, weighted_grad(x, y, moved, lam)
    else:
        g_adv = ls_grad(x, y, moved)
    g_perp = g - (g @ g_adv) / (g_adv @ g_adv) * g_adv
    return g_adv - alpha * g_perp


# ----------------------------------------------------------------------------------------------------------- WSAM


class WsamUpdate(NamedTuple):
    base: Tensor
    """What the base optimizer steps on."""
    after: Tensor
    """What is subtracted after the base step, times the LR: ``w <- base_step(w, G) - lr * after``."""


def wsam_alpha(gamma: float) -> float:
    """WSAM's weight of the sharpness term, ``gamma / (1 - gamma)`` (gamma in [0, 1))."""
    return gamma / (1.0 - gamma)


def ls_wsam_update(
    x: Tensor, y: Tensor, w: Tensor, rho: float, gamma: float, decouple: bool = True, lam: Optional[Tensor] = None
) -> WsamUpdate:
    """WSAM (Yue et al., 2023): ``L + alpha (L(w + eps) - L(w))`` with ``alpha = gamma/(1 - gamma)``, so its
    gradient is ``g + alpha (g_adv - g)``. Coupled: the base optimizer steps on that. Decoupled (the reference's
    default): the base optimizer steps on g alone and ``lr * alpha (g_adv - g)`` is subtracted after it, as decoupled
    weight decay is (so momentum and Adam's scaling never see the sharpness term). δ-WSAM (``lam``): the ascent
    along ``sum_i lam_i g_i``, the rest unchanged."""
    g = ls_grad(x, y, w)
    direction = g if lam is None else weighted_grad(x, y, w, lam)
    sharpness = ls_grad(x, y, _ascent(w, direction, rho)) - g
    a = wsam_alpha(gamma)
    if decouple:
        return WsamUpdate(base=g, after=a * sharpness)
    return WsamUpdate(base=g + a * sharpness, after=torch.zeros_like(g))


# ---------------------------------------------------------------------------------------------------- Friendly-SAM


class FsamUpdate(NamedTuple):
    G: Tensor
    momentum: Tensor
    """The EMA of the clean gradient after this step (optimizer state, carried to the next step)."""


def ls_fsam_update(
    x: Tensor,
    y: Tensor,
    w: Tensor,
    rho: float,
    sigma: float,
    lmbda: float,
    momentum: Optional[Tensor] = None,
    lam: Optional[Tensor] = None,
) -> FsamUpdate:
    """Friendly-SAM (Li et al., CVPR 2024), as its authors' code and the reference compute it.

    The first step (``momentum is None``) is SAM and starts the EMA at g: ``d = g``, ``m_1 = g``. After it,
    ``d = g - sigma m_{t-1}`` (the previous EMA: the full-batch estimate before this batch) and then
    ``m_t = lmbda m_{t-1} + (1 - lmbda) g``. ``eps = rho d/||d||``, ``G = ∇L(w + eps)``.

    δ-Friendly-SAM (``lam``): g is the reweighted ascent gradient ``sum_i lam_i g_i`` throughout (the running mean
    is of it too); G is the plain mean at w + eps.
    """
    g = ls_grad(x, y, w) if lam is None else weighted_grad(x, y, w, lam)
    if momentum is None:
        direction, new = g, g.clone()
    else:
        direction = g - sigma * momentum
        new = lmbda * momentum + (1 - lmbda) * g
    return FsamUpdate(G=ls_grad(x, y, _ascent(w, direction, rho)), momentum=new)


# ----------------------------------------------------------------------------------------- gradient centralization


def mls_grad(x: Tensor, y: Tensor, W: Tensor) -> Tensor:
    """Gradient of the mean multi-output least-squares loss ``||W x_i - y_i||² / 2`` at W (``[k, d]``; y ``[n, k]``)."""
    return (x @ W.T - y).T @ x / x.shape[0]


def centralize(g: Tensor) -> Tensor:
    """Gradient centralization (Yong et al., 2020) of one gradient: for rank > 1, subtract its mean over every
    dimension but the first (each output row, or each conv filter, gets mean 0); rank 0 and 1 (biases, LayerNorm
    scales) unchanged."""
    if g.dim() <= 1:
        return g.clone()
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


def mls_gc_sam_update(x: Tensor, y: Tensor, W: Tensor, rho: float, norm: str = "centered") -> Tensor:
    """SAM whose ascent direction is centralized: ``eps = rho GC(g) / ||GC(g)||`` (``norm="centered"``, this
    library's specification: ``||eps|| = rho``) or ``rho GC(g) / ||g||`` (``norm="peer"``: the reference computes
    the norm before it centres, so its ``||eps||`` is ``rho ||GC(g)|| / ||g||``, below rho). The descent gradient is
    not centralized in either: ``G = ∇L(W + eps)``."""
    g = mls_grad(x, y, W)
    c = centralize(g)
    if norm == "centered":
        scale = rho / c.norm()
    elif norm == "peer":
        scale = rho / g.norm()
    else:
        raise ValueError(norm)
    return mls_grad(x, y, W + scale * c)


# ------------------------------------------------------------------------------------------------ AE-SAM's policy


class AeSamState(NamedTuple):
    mean: float = 0.0
    """mu_{t-1}: the EMA of ||g||²."""
    var: float = 0.0
    """sigma²_{t-1}: the EMA of the squared deviation of ||g||² from its running mean."""


def ae_sam_threshold(t: int, total: int, lambda1: float = -1.0, lambda2: float = 1.0) -> float:
    """c_t, moving linearly from ``lambda2`` at t = 0 to ``lambda1`` at t = total (AE-SAM's schedule; with the
    defaults -1 and 1 the threshold starts one standard deviation above the mean, where about 16% of normally
    distributed ||g||² pass, and ends one below it, about 84%)."""
    frac = t / total
    return frac * lambda1 + (1.0 - frac) * lambda2


def ae_sam_decide(sq_norm: float, state: AeSamState, c: float, delta: float = 0.9) -> tuple[bool, AeSamState]:
    """AE-SAM (Jiang et al., ICLR 2023): update the running moments with this step's ``||g_t||²`` first,
    ``mu_t = delta mu_{t-1} + (1 - delta) ||g_t||²`` and
    ``sigma²_t = delta sigma²_{t-1} + (1 - delta) (||g_t||² - mu_t)²``, then take a full SAM step iff
    ``||g_t||² >= mu_t + c sigma_t``; otherwise a plain step on g_t. Returns ``(full, new state)``.

    The moments start at 0 (``AeSamState()``), so the first step's ``mu_1 = (1 - delta) ||g_1||²`` lies below
    ``||g_1||²`` and, for any c with ``c sigma_1 <= delta ||g_1||²``, the first step is full.
    """
    mean = delta * state.mean + (1 - delta) * sq_norm
    var = delta * state.var + (1 - delta) * (sq_norm - mean) ** 2
    return sq_norm >= mean + c * var**0.5, AeSamState(mean, var)


# ------------------------------------------------------------------------------------------- δ- rows, by window


def ls_delta_family_window(
    method: str,
    parts: list[tuple[Tensor, Tensor]],
    w: Tensor,
    rho: float,
    momentum: Optional[Tensor],
    weighted: bool = False,
    alpha: float = 0.4,
    gamma: float = 0.9,
    decouple: bool = True,
    sigma: float = 1.0,
    lmbda: float = 0.9,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One optimizer step of a δ- row (exact weights, beta = -1) over an accumulation window of micro-batches
    ``parts``: each micro-batch ascends along its own ``g_λ`` (F-SAM: less ``sigma * momentum``); the window's rule
    acts on the means of ``g_adv`` and of the clean gradient (``ḡ``, or ``g_λ`` when ``weighted``, where ``g_adv``
    is weighted too); F-SAM's running mean takes the window's mean ``g_λ`` once.

    Returns (what the base optimizer steps on, what is subtracted after it times the LR, the new running mean)."""
    adv, clean, ascents = [], [], []
    for x, y in parts:
        lam = exact_weights(x, y, w, -1.0)
        a = weighted_grad(x, y, w, lam)
        moved = _ascent(w, a if method != "fsam" or momentum is None else a - sigma * momentum, rho)
        adv.append(weighted_grad(x, y, moved, lam) if weighted else ls_grad(x, y, moved))
        clean.append(a if weighted else ls_grad(x, y, w))
        ascents.append(a)
    g_adv, g = sum(adv) / len(adv), sum(clean) / len(clean)
    zero = torch.zeros_like(w)
    if method == "gsam":
        return g_adv - alpha * (g - (g @ g_adv) / (g_adv @ g_adv) * g_adv), zero, None
    if method == "wsam":
        a_ = wsam_alpha(gamma)
        return (g, a_ * (g_adv - g), None) if decouple else (g + a_ * (g_adv - g), zero, None)
    mean = sum(ascents) / len(ascents)
    return g_adv, zero, mean.clone() if momentum is None else lmbda * momentum + (1 - lmbda) * mean
