"""The reference library, ``pytorch_optimizer`` 4.1.0 (a test-only dependency), and ours, step by step, in float64.

A *driver* builds an optimizer around a model and returns a ``Stepper``: ``step(batch)`` takes one full optimizer
step on ``batch`` and then steps the LR schedule, if any. There is one driver per peer method (SAM, ASAM, GC-SAM,
GSAM, WSAM, FriendlySAM: :func:`peer_sam`, :func:`peer_gsam`, :func:`peer_wsam`, :func:`peer_fsam`) and one for ours
(:func:`ours`, ``DeltaSAMOptimizer.step(loss_fn, batch)``). :func:`run` trains a fresh copy of one model with a driver
and returns the flat final weights, so that a test compares two drivers' weights. A :class:`Row` pairs a peer driver
(with its hyperparameters bound) with the ``DeltaSAMConfig`` that should reproduce it.

Conventions aligned here, each on purpose:

* **Norms in float64.** The peer's ``get_global_gradient_norm`` (``optimizer/utils/gradient.py``) casts the squared
  per-tensor norms to float32 (``.float().square_()``) before summing, whatever the parameters' dtype, so its
  ``||g||`` (and GSAM's ``||g_adv||``) carries float32 rounding (relative 2**-24) even in float64. That is the
  second difference from ours besides ``perturb_eps``. :func:`float64_norms` swaps in the same sum without the cast
  (the swap is local to the peer's ``optimizer.sam`` module and undone on exit).
* **``perturb_eps``.** The peer adds 1e-12 to the norm (``rho / (||g|| + 1e-12)``; GSAM also to the cosine's
  and the projection's denominators; WSAM calls it ``eps``). The drivers take it as ``eps``; the exact rows pass 0.
* **ASAM.** The peer's ``adaptive=True`` is davda54/sam's: ``eps = rho * w² g / ||w g||``, on every parameter,
  with no offset: ours with ``asam_eta=0`` and ``asam_scope="all"``.
* **No dropout, no batch norm** in :class:`Net`: ours replays dropout masks (``share_dropout``) and the peer's GSAM
  and WSAM switch batch-norm momentum off for the second pass; neither is compared here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler
from pytorch_optimizer.optimizer import sam as peer_sam_module
from pytorch_optimizer.optimizer.gradient_centralization import centralize_gradient
from torch import Tensor, nn

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

PEER_VERSION = "4.1.0"
_FOUND = importlib.metadata.version("pytorch_optimizer")
assert _FOUND == PEER_VERSION, f"the reference is pytorch_optimizer=={PEER_VERSION} (pyproject's dev extra): {_FOUND}"

DTYPE = torch.float64
Batch = tuple[Tensor, Tensor]
LrLambda = Callable[[int], float]


class Net(nn.Module):
    """A dropout-free classifier with rank-2 weights (gradient centralization acts on them) and biases (ASAM's
    scope differs on them): Linear(5, 7) → tanh → Linear(7, 3), float64."""

    def __init__(self, seed: int = 0, d_in: int = 5, hidden: int = 7, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes)).to(DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def batches(steps: int = 5, n: int = 8, d_in: int = 5, classes: int = 3, seed: int = 1) -> list[Batch]:
    """``steps`` fixed float64 batches of ``n`` instances."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, d_in, generator=g, dtype=DTYPE), torch.randint(0, classes, (n,), generator=g))
        for _ in range(steps)
    ]


def instance_losses(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _squared_global_norm_native(param_groups, device=None, *, weight_adaptive: bool = False) -> Tensor:
    """``get_global_gradient_norm`` as the peer writes it, without its cast of the squared norms to float32."""
    grads = []
    for group in param_groups or []:
        adaptive = weight_adaptive and group.get("adaptive", False)
        for p in group["params"]:
            if p.grad is not None:
                grads.append(p.grad * p.abs() if adaptive else p.grad)
    norms = torch._foreach_norm(grads)
    return torch.stack(norms).square_().sum().reshape(1)


@contextlib.contextmanager
def float64_norms() -> Iterator[None]:
    """Within: the peer's SAM-family norms in the parameters' dtype (see the module docstring)."""
    original = peer_sam_module.get_global_gradient_norm
    peer_sam_module.get_global_gradient_norm = _squared_global_norm_native
    try:
        yield
    finally:
        peer_sam_module.get_global_gradient_norm = original


# ---------------------------------------------------------------------------------------------------------------
# Steppers


@dataclass
class Stepper:
    """One optimizer step per ``step(batch)``, then one step of ``schedule`` (an LR scheduler), if any."""

    take: Callable[[Batch], Any]
    schedule: Optional[Any] = None
    after: Callable[[], Any] = lambda: None
    optimizer: Any = None

    def step(self, batch: Batch) -> None:
        self.take(batch)
        if self.schedule is not None:
            self.schedule.step()
        self.after()


Driver = Callable[[nn.Module, type, dict, Optional[LrLambda]], Stepper]
"""``driver(model, base_cls, base_kwargs, lr_lambda)``: a Stepper training ``model`` with ``base_cls(**base_kwargs)``
under ``LambdaLR(lr_lambda)`` (``None``: a constant LR)."""


def _schedule(base: torch.optim.Optimizer, lr_lambda: Optional[LrLambda]):
    return None if lr_lambda is None else torch.optim.lr_scheduler.LambdaLR(base, lr_lambda)


Loss = Callable[[Tensor, Tensor], Tensor]
"""``loss(outputs, targets)``: the batch's mean loss (the peer's convention; default cross-entropy)."""


def _closure(optimizer: Any, model: nn.Module, batch: Batch, loss_fn: Loss = F.cross_entropy) -> Callable[[], Tensor]:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss

    return closure


def _center_(model: nn.Module) -> None:
    """The peer's gradient centralization (``centralize_gradient``, ``gc_conv_only=False``) on every gradient."""
    for p in model.parameters():
        if p.grad is not None:
            centralize_gradient(p.grad, gc_conv_only=False)


def peer_sam(
    model: nn.Module,
    base_cls: type,
    base_kwargs: dict,
    lr_lambda: Optional[LrLambda] = None,
    *,
    rho: float,
    adaptive: bool = False,
    use_gc: bool = False,
    gc_norm: str = "peer",
    eps: float = 0.0,
    loss: Loss = F.cross_entropy,
) -> Stepper:
    """The peer's ``SAM`` (``adaptive=True``: its ASAM; ``use_gc=True``: its gradient-centralized SAM), driven as its
    docstring shows: gradients at w, then ``step(closure)``.

    ``gc_norm`` (with ``use_gc``): ``"peer"`` runs ``SAM(use_gc=True)`` as shipped, which takes ``||g||`` *before*
    centering (so ``||eps|| = rho ||GC(g)|| / ||g|| <= rho``); ``"centered"`` centres the gradients with the peer's
    own ``centralize_gradient`` first and then runs its plain SAM step, so that eps is normalized after centering
    (``||eps|| = rho``), the form this library specifies (docs/family-spec.md).
    """
    if gc_norm not in ("peer", "centered"):
        raise ValueError(gc_norm)
    shipped_gc = use_gc and gc_norm == "peer"
    opt = peer_sam_module.SAM(
        model.parameters(), base_cls, rho=rho, adaptive=adaptive, use_gc=shipped_gc, perturb_eps=eps, **base_kwargs
    )

    def take(batch: Batch) -> None:
        closure = _closure(opt, model, batch, loss)
        closure()
        if use_gc and gc_norm == "centered":
            _center_(model)
        opt.step(closure)

    return Stepper(take, _schedule(opt.base_optimizer, lr_lambda), optimizer=opt)


def peer_gsam(
    model: nn.Module,
    base_cls: type,
    base_kwargs: dict,
    lr_lambda: Optional[LrLambda] = None,
    *,
    rho: float,
    alpha: float = 0.4,
    rho_min: float = 0.0,
    adaptive: bool = False,
    eps: float = 0.0,
    loss: Loss = F.cross_entropy,
) -> Stepper:
    """The peer's ``GSAM``, driven as its README shows: the base optimizer is built first; the radius comes from a
    ``ProportionScheduler`` over the LR scheduler, ``rho_t = rho_min + (rho - rho_min) (lr_t - 0) / (lr_0 - 0)``
    (``min_lr=0``, ``max_lr`` = the initial LR); each step is ``set_closure``, ``step()``, then the LR scheduler's
    step and ``update_rho_t()``. With ``rho_min=0`` this is ours ``rho_schedule="follow_lr"`` (rho · lr_t / lr_max).
    Without ``lr_lambda`` the LR is constant (a ``LambdaLR`` of 1) and so is rho."""
    base = base_cls(model.parameters(), **base_kwargs)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(base, lr_lambda or (lambda t: 1.0))
    lr0 = base.param_groups[0]["lr"]
    rho_scheduler = ProportionScheduler(lr_scheduler, max_lr=lr0, min_lr=0.0, max_value=rho, min_value=rho_min)
    opt = peer_sam_module.GSAM(
        model.parameters(), base, model, rho_scheduler, alpha=alpha, adaptive=adaptive, perturb_eps=eps
    )

    def take(batch: Batch) -> None:
        x, y = batch
        opt.set_closure(loss, x, y)
        opt.step()

    return Stepper(take, lr_scheduler, after=opt.update_rho_t, optimizer=opt)


def peer_wsam(
    model: nn.Module,
    base_cls: type,
    base_kwargs: dict,
    lr_lambda: Optional[LrLambda] = None,
    *,
    rho: float,
    gamma: float = 0.9,
    decouple: bool = True,
    adaptive: bool = False,
    eps: float = 0.0,
    loss: Loss = F.cross_entropy,
) -> Stepper:
    """The peer's ``WSAM``: ``step(closure)`` runs the closure at w itself, then at w + eps. Decoupled (default): the
    base optimizer steps on the clean gradient g, then ``w -= lr * alpha * (g_adv - g)``, ``alpha = gamma/(1-gamma)``;
    coupled: the base optimizer steps on ``g + alpha (g_adv - g)``."""
    opt = peer_sam_module.WSAM(
        model,
        model.parameters(),
        base_cls,
        rho=rho,
        gamma=gamma,
        adaptive=adaptive,
        decouple=decouple,
        eps=eps,
        **base_kwargs,
    )

    def take(batch: Batch) -> None:
        opt.step(_closure(opt, model, batch, loss))

    return Stepper(take, _schedule(opt.base_optimizer, lr_lambda), optimizer=opt)


def peer_fsam(
    model: nn.Module,
    base_cls: type,
    base_kwargs: dict,
    lr_lambda: Optional[LrLambda] = None,
    *,
    rho: float,
    sigma: float = 1.0,
    lmbda: float = 0.9,
    adaptive: bool = False,
    eps: float = 0.0,
    loss: Loss = F.cross_entropy,
) -> Stepper:
    """The peer's ``FriendlySAM``, driven as SAM: gradients at w, then ``step(closure)``."""
    opt = peer_sam_module.FriendlySAM(
        model.parameters(),
        base_cls,
        rho=rho,
        sigma=sigma,
        lmbda=lmbda,
        adaptive=adaptive,
        perturb_eps=eps,
        **base_kwargs,
    )

    def take(batch: Batch) -> None:
        closure = _closure(opt, model, batch, loss)
        closure()
        opt.step(closure)

    return Stepper(take, _schedule(opt.base_optimizer, lr_lambda), optimizer=opt)


def ours(
    model: nn.Module, base_cls: type, base_kwargs: dict, lr_lambda: Optional[LrLambda] = None, *, config: dict
) -> Stepper:
    """``DeltaSAMOptimizer(model, base, DeltaSAMConfig(**config)).step(loss_fn, batch)`` with per-instance losses."""
    base = base_cls(model.parameters(), **base_kwargs)
    opt = DeltaSAMOptimizer(model, base, DeltaSAMConfig(**config))

    def take(batch: Batch) -> None:
        result = opt.step(lambda b: instance_losses(model, b), batch)
        assert result is not None and result.stepped

    return Stepper(take, _schedule(base, lr_lambda), optimizer=opt)


def run(driver: Callable[..., Stepper], model: nn.Module, data: Sequence[Batch], **kwargs: Any) -> Tensor:
    """Train a deep copy of ``model`` on ``data``, one step per batch, with ``driver(copy, **kwargs)``; the flat
    final weights."""
    trained = copy.deepcopy(model)
    stepper = driver(trained, **kwargs)
    for batch in data:
        stepper.step(batch)
    return flat(trained)


# ---------------------------------------------------------------------------------------------------------------
# Rows


BASES: dict[str, tuple[type, dict]] = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "sgd_momentum": (torch.optim.SGD, dict(lr=5e-2, momentum=0.9, weight_decay=1e-3)),
}
"""The base optimizers every row runs under: decoupled weight decay with Adam's scaling, and coupled weight decay
with heavy-ball momentum (so that where each method applies weight decay and momentum shows in the weights)."""


def decaying_lr(t: int) -> float:
    """An LR that falls every step (ρ follows it under ``follow_lr`` and the peer's ProportionScheduler)."""
    return 1.0 / (1.0 + 0.5 * t)


@dataclass(frozen=True)
class Row:
    """A peer driver with its hyperparameters bound, and the config of ours that should train the same weights."""

    peer: Callable[..., Stepper]
    config: dict
    lr_lambda: Optional[LrLambda] = None
    note: str = ""
    peer_kwargs: dict = field(default_factory=dict)

    def peer_weights(self, model: nn.Module, data: Sequence[Batch], base: str) -> Tensor:
        base_cls, base_kwargs = BASES[base]
        return run(
            self.peer,
            model,
            data,
            base_cls=base_cls,
            base_kwargs=base_kwargs,
            lr_lambda=self.lr_lambda,
            **self.peer_kwargs,
        )

    def our_weights(self, model: nn.Module, data: Sequence[Batch], base: str) -> Tensor:
        base_cls, base_kwargs = BASES[base]
        return run(
            ours, model, data, base_cls=base_cls, base_kwargs=base_kwargs, lr_lambda=self.lr_lambda, config=self.config
        )
