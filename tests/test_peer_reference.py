"""Ours against the reference library (``pytorch_optimizer`` 4.1.0) in float64, and the SAM family's closed forms
(``family_oracles.py``) against the reference on least squares (issue 48; the updates are in docs/family-spec.md).

``ROWS``: methods ours has today, compared weight for weight over several steps under AdamW and SGD with momentum.
Three rows reach the peer's GSAM, WSAM and FriendlySAM at the hyperparameter where each reduces to SAM (GSAM at
alpha = 0 with its radius following the LR, coupled WSAM at gamma = 0.5, Friendly-SAM at sigma = 0), so their
drivers are exercised at those points too. WSAM is compared in both its forms (decoupled, the reference's default,
and coupled).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from family_oracles import (
    AeSamState,
    ae_sam_decide,
    ae_sam_threshold,
    centralize,
    ls_fsam_update,
    ls_gsam_update,
    ls_wsam_update,
    mls_gc_sam_update,
    wsam_alpha,
)
from helpers import LeastSquares, least_squares_problem, ls_sam_update
from peer import (
    BASES,
    Net,
    Row,
    batches,
    decaying_lr,
    flat,
    float64_norms,
    instance_losses,
    peer_fsam,
    peer_gsam,
    peer_sam,
    peer_sam_module,
    peer_wsam,
)
from peer import _closure as peer_closure
from pytorch_optimizer.optimizer.gradient_centralization import centralize_gradient
from torch import nn

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

RHO = 0.05
RHO_ASAM = 0.5

EXACT = 2e-15
"""Tolerance on the weights (of order 0.1 to 1) after 5 steps when the conventions are aligned: float64 rounding,
a few ulps (measured: at most 6e-17). A perturb_eps of 1e-12 alone moves them by about 1e-14, the peer's float32
norm by about 1e-9, and swapping SAM for ERM by 5e-3 or more, so this separates all three."""

SAM = dict(method="sam", rho=RHO, rho_schedule="constant")

ROWS: dict[str, Row] = {
    "sam": Row(peer_sam, SAM, peer_kwargs=dict(rho=RHO)),
    "asam": Row(
        peer_sam,
        dict(method="asam", rho=RHO_ASAM, rho_schedule="constant", asam_eta=0.0, asam_scope="all"),
        peer_kwargs=dict(rho=RHO_ASAM, adaptive=True),
        note="the peer's adaptive=True is davda54/sam's ASAM: eta = 0 on every parameter",
    ),
    "gsam_alpha0_follow_lr": Row(
        peer_gsam,
        dict(method="sam", rho=RHO, rho_schedule="follow_lr"),
        lr_lambda=decaying_lr,
        peer_kwargs=dict(rho=RHO, alpha=0.0),
        note="GSAM at alpha = 0 is SAM; its ProportionScheduler with min_lr = min_value = 0 is follow_lr",
    ),
    "wsam_coupled_gamma_half": Row(
        peer_wsam,
        SAM,
        peer_kwargs=dict(rho=RHO, gamma=0.5, decouple=False),
        note="gamma = 0.5 gives alpha = 1: the coupled WSAM gradient g + (g_adv - g) is SAM's",
    ),
    "fsam_sigma0": Row(
        peer_fsam,
        SAM,
        peer_kwargs=dict(rho=RHO, sigma=0.0, lmbda=0.9),
        note="sigma = 0 removes nothing: SAM (the peer still keeps its EMA; ours keeps none)",
    ),
    "gsam": Row(
        peer_gsam,
        dict(method="gsam", rho=RHO, gsam_alpha=0.4, rho_schedule="follow_lr"),
        lr_lambda=decaying_lr,
        peer_kwargs=dict(rho=RHO, alpha=0.4),
    ),
    "gsam_constant_rho": Row(
        peer_gsam,
        dict(method="gsam", rho=RHO, gsam_alpha=0.4, rho_schedule="constant"),
        peer_kwargs=dict(rho=RHO, alpha=0.4),
    ),
    "wsam": Row(
        peer_wsam,
        dict(method="wsam", rho=RHO, wsam_gamma=0.9, rho_schedule="constant"),
        peer_kwargs=dict(rho=RHO, gamma=0.9, decouple=True),
    ),
    "wsam_coupled": Row(
        peer_wsam,
        dict(method="wsam", rho=RHO, wsam_gamma=0.9, wsam_decouple=False, rho_schedule="constant"),
        peer_kwargs=dict(rho=RHO, gamma=0.9, decouple=False),
    ),
    "fsam": Row(
        peer_fsam,
        dict(method="fsam", rho=RHO, fsam_sigma=1.0, fsam_lambda=0.9, rho_schedule="constant"),
        peer_kwargs=dict(rho=RHO, sigma=1.0, lmbda=0.9),
    ),
    "gsam_asam": Row(
        peer_gsam,
        dict(method="gsam", rho=RHO_ASAM, gsam_alpha=0.4, asam_eta=0.0, asam_scope="all", rho_schedule="follow_lr"),
        lr_lambda=decaying_lr,
        peer_kwargs=dict(rho=RHO_ASAM, alpha=0.4, adaptive=True),
        note="the peer's adaptive=True is ASAM's scaling with eta = 0 on every parameter",
    ),
    "wsam_asam": Row(
        peer_wsam,
        dict(method="wsam", rho=RHO_ASAM, wsam_gamma=0.9, asam_eta=0.0, asam_scope="all", rho_schedule="constant"),
        peer_kwargs=dict(rho=RHO_ASAM, gamma=0.9, decouple=True, adaptive=True),
    ),
    "fsam_asam": Row(
        peer_fsam,
        dict(
            method="fsam",
            rho=RHO_ASAM,
            fsam_sigma=1.0,
            fsam_lambda=0.9,
            asam_eta=0.0,
            asam_scope="all",
            rho_schedule="constant",
        ),
        peer_kwargs=dict(rho=RHO_ASAM, sigma=1.0, lmbda=0.9, adaptive=True),
        note="the running mean is of raw gradients; the shifted direction is scaled",
    ),
    "gc_sam": Row(
        peer_sam,
        dict(SAM, gradient_centralization=True),
        peer_kwargs=dict(rho=RHO, use_gc=True, gc_norm="centered"),
        note="a deliberate difference: eps is normalized after centering (the peer normalizes before)",
    ),
    "gc_asam": Row(
        peer_sam,
        dict(
            method="asam",
            rho=RHO_ASAM,
            rho_schedule="constant",
            asam_eta=0.0,
            asam_scope="all",
            gradient_centralization=True,
        ),
        peer_kwargs=dict(rho=RHO_ASAM, adaptive=True, use_gc=True, gc_norm="centered"),
    ),
}


@pytest.fixture(scope="module")
def model() -> Net:
    return Net(seed=0)


@pytest.fixture(scope="module")
def data():
    return batches(steps=5)


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- ours == the peer


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("name", list(ROWS))
def test_same_weights_as_the_peer(name, base, model, data):
    row = ROWS[name]
    with float64_norms():
        theirs = row.peer_weights(model, data, base)
    mine = row.our_weights(model, data, base)
    assert _gap(theirs, flat(model)) > 1e-3, "the run must move the weights"
    assert _gap(theirs, mine) <= EXACT, f"{name} under {base}: {row.note}"


@pytest.mark.parametrize("base", list(BASES))
def test_perturb_eps_and_the_float32_norm_are_the_only_differences(base, model, data):
    """With the peer's norms in float64 and perturb_eps = 0 the weights agree to EXACT (above). Each of the peer's two
    conventions alone then moves them, by about its own size: perturb_eps = 1e-12 shifts rho / ||g|| by a relative
    1e-12 / ||g|| (||g|| ~ 0.1 to 1 here), so the weights by 1e-14-ish; the float32 norm shifts it by up to 2**-24
    relative, so the weights by 1e-10 to 1e-9. Nothing else differs: the shipped peer is within those bounds."""
    sam = ROWS["sam"]
    mine = sam.our_weights(model, data, base)
    with float64_norms():
        eps_only = Row(peer_sam, SAM, peer_kwargs=dict(rho=RHO, eps=1e-12)).peer_weights(model, data, base)
    as_shipped = Row(peer_sam, SAM, peer_kwargs=dict(rho=RHO, eps=1e-12)).peer_weights(model, data, base)
    assert EXACT < _gap(eps_only, mine) < 1e-11
    assert 1e-12 < _gap(as_shipped, mine) < 1e-7


def test_the_comparison_tells_methods_apart(model, data):
    """The harness is not blind: ours with ERM, or with ASAM at SAM's settings, is far from the peer's SAM."""
    with float64_norms():
        theirs = ROWS["sam"].peer_weights(model, data, "adamw")
    for config in (dict(method="erm"), dict(SAM, method="asam", asam_eta=0.0, asam_scope="all")):
        mine = Row(peer_sam, config).our_weights(model, data, "adamw")
        assert _gap(theirs, mine) > 1e-3


@pytest.mark.parametrize("base", list(BASES))
def test_fsam_with_a_group_added_mid_run_matches_the_peer(base, data):
    """Progressive unfreezing under Friendly-SAM: the first layer joins the optimizer before the third step. The
    peer starts each parameter's running mean at its first gradient (no shift on that step); so must ours, on the
    new parameters, while the others keep theirs (before the fix ours refused the added group)."""
    base_cls, base_kwargs = BASES[base]
    trained = {}
    for who in ("peer", "ours"):
        model = Net(seed=0)
        first = list(model.net[0].parameters())
        for p in first:
            p.requires_grad_(False)
        head = list(model.net[2].parameters())
        with float64_norms():
            if who == "peer":
                opt = peer_sam_module.FriendlySAM(
                    head, base_cls, rho=RHO, sigma=1.0, lmbda=0.9, perturb_eps=0.0, **base_kwargs
                )
            else:
                opt = DeltaSAMOptimizer(
                    model,
                    base_cls(head, **base_kwargs),
                    DeltaSAMConfig(method="fsam", rho=RHO, fsam_sigma=1.0, fsam_lambda=0.9, rho_schedule="constant"),
                )
            for step, batch in enumerate(data):
                if step == 2:
                    for p in first:
                        p.requires_grad_(True)
                    if who == "ours":
                        opt.optimizer.add_param_group({"params": first})
                    else:
                        _peer_add(opt, first)
                if who == "peer":
                    closure = peer_closure(opt, model, batch)
                    closure()
                    opt.step(closure)
                else:
                    opt.step(lambda b, model=model: instance_losses(model, b), batch)
        trained[who] = flat(model)
    assert _gap(trained["peer"], flat(Net(seed=0))) > 1e-3
    assert _gap(trained["peer"], trained["ours"]) <= EXACT


def _peer_add(opt, params) -> None:
    """A group added to the peer's base optimizer (as Lightning's BackboneFinetuning adds it), given the peer's own
    defaults (rho, sigma, lmbda) that the base optimizer does not know."""
    opt.base_optimizer.add_param_group({"params": params})
    group = opt.param_groups[-1]
    group.update({k: v for k, v in opt.defaults.items() if k not in group})


# ------------------------------------------------------------------------------ closed forms == the peer (LS)

LR = 0.1


def _ls_mean_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).mean()


def _ls_data(steps: int, seed: int = 0):
    out = []
    for s in range(steps):
        x, y, _ = least_squares_problem(n=8, d=5, seed=seed + 10 + s)
        out.append((x, y))
    return out


def _ls_start():
    return least_squares_problem(n=8, d=5, seed=0)[2]


def _peer_ls(driver, data, base=(torch.optim.SGD, dict(lr=LR)), lr_lambda=None, **kwargs):
    with float64_norms():
        model = LeastSquares(_ls_start())
        stepper = driver(
            model, base_cls=base[0], base_kwargs=base[1], lr_lambda=lr_lambda, loss=_ls_mean_loss, eps=0.0, **kwargs
        )
        for batch in data:
            stepper.step(batch)
    return model.w.detach().clone(), stepper


def test_ls_sam_oracle_matches_the_peer():
    """The existing SAM closed form (helpers.ls_sam_update) against the peer's SAM: the harness's anchor."""
    data = _ls_data(3)
    w = _ls_start()
    for x, y in data:
        w = w - LR * ls_sam_update(x, y, w, RHO, "sam")
    theirs, _ = _peer_ls(peer_sam, data, rho=RHO)
    assert _gap(theirs, w) <= 1e-14


@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.9])  # the peer takes alpha in [0, 1)
def test_ls_gsam_oracle_matches_the_peer(alpha):
    data = _ls_data(3)
    w = _ls_start()
    for x, y in data:
        w = w - LR * ls_gsam_update(x, y, w, RHO, alpha)
    theirs, _ = _peer_ls(peer_gsam, data, rho=RHO, alpha=alpha)
    assert _gap(theirs, w) <= 1e-14
    if alpha > 0:  # the decomposition acts: GSAM is not SAM here
        sam = _ls_start()
        for x, y in data:
            sam = sam - LR * ls_sam_update(x, y, sam, RHO, "sam")
        assert _gap(w, sam) > 1e-6


def test_ls_gsam_radius_follows_the_lr_as_the_peer_does():
    """rho_t = rho * lr_t / lr_0 (ours: follow_lr), the peer's ProportionScheduler with min_lr = min_value = 0, read
    after the LR scheduler's step: the LR and the radius of one step are those of the same t."""
    data = _ls_data(4)
    w = _ls_start()
    for t, (x, y) in enumerate(data):
        w = w - LR * decaying_lr(t) * ls_gsam_update(x, y, w, RHO * decaying_lr(t), 0.4)
    theirs, _ = _peer_ls(peer_gsam, data, lr_lambda=decaying_lr, rho=RHO, alpha=0.4)
    assert _gap(theirs, w) <= 1e-14


@pytest.mark.parametrize("decouple", [True, False])
def test_ls_wsam_oracle_matches_the_peer(decouple):
    """Two steps of SGD with momentum 0.9, so that the decoupled form (momentum never sees the sharpness term)
    differs from the coupled one."""
    momentum, gamma = 0.9, 0.9
    data = _ls_data(3)
    w, buf = _ls_start(), None
    for x, y in data:
        update = ls_wsam_update(x, y, w, RHO, gamma, decouple)
        buf = update.base.clone() if buf is None else momentum * buf + update.base
        w = w - LR * buf - LR * update.after
    theirs, _ = _peer_ls(
        peer_wsam, data, base=(torch.optim.SGD, dict(lr=LR, momentum=momentum)), rho=RHO, gamma=gamma, decouple=decouple
    )
    assert _gap(theirs, w) <= 1e-14
    assert wsam_alpha(gamma) == pytest.approx(9.0)


def test_ls_wsam_forms_differ_under_momentum_and_agree_without():
    data = _ls_data(3)
    sgd = [_peer_ls(peer_wsam, data, rho=RHO, gamma=0.9, decouple=d)[0] for d in (True, False)]
    assert _gap(*sgd) <= 1e-14
    heavy = (torch.optim.SGD, dict(lr=LR, momentum=0.9))
    ball = [_peer_ls(peer_wsam, data, base=heavy, rho=RHO, gamma=0.9, decouple=d)[0] for d in (True, False)]
    assert _gap(*ball) > 1e-6


@pytest.mark.parametrize("sigma,lmbda", [(1.0, 0.9), (0.5, 0.6)])
def test_ls_fsam_oracle_matches_the_peer_with_its_state(sigma, lmbda):
    """Four steps: the EMA is carried (state in, state out) and equals the peer's ``state[p]['momentum']``. (The peer's
    foreach path takes a shortcut for sigma = 1, lmbda >= 0.5; its CPU default is the per-tensor path.)"""
    data = _ls_data(4)
    w, m = _ls_start(), None
    for x, y in data:
        update = ls_fsam_update(x, y, w, RHO, sigma, lmbda, m)
        w, m = w - LR * update.G, update.momentum
    theirs, stepper = _peer_ls(peer_fsam, data, rho=RHO, sigma=sigma, lmbda=lmbda)
    assert _gap(theirs, w) <= 1e-14
    (state,) = [
        stepper.optimizer.state[p]["momentum"] for group in stepper.optimizer.param_groups for p in group["params"]
    ]
    assert _gap(state, m) <= 1e-15
    # the first step is SAM's
    x, y = data[0]
    assert _gap(ls_fsam_update(x, y, _ls_start(), RHO, sigma, lmbda).G, ls_sam_update(x, y, _ls_start(), RHO)) == 0


def test_centralize_matches_the_peer():
    g = torch.Generator().manual_seed(3)
    for shape in [(4, 3, 2, 2), (5, 6), (7,)]:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        theirs = t.clone()
        centralize_gradient(theirs, gc_conv_only=False)
        assert _gap(centralize(t), theirs) <= 1e-15
        if len(shape) > 1:
            assert centralize(t).mean(dim=tuple(range(1, len(shape)))).abs().max() <= 1e-15
        else:
            assert torch.equal(centralize(t), t)


class _LinearLS(nn.Module):
    """Multi-output least squares ``||W x - y||² / 2``: one weight of rank 2, which gradient centralization centres."""

    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.lin = nn.Linear(W.shape[1], W.shape[0], bias=False).to(torch.float64)
        with torch.no_grad():
            self.lin.weight.copy_(W)

    def forward(self, x):
        return self.lin(x)


def _mls_loss(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


@pytest.mark.parametrize("norm", ["peer", "centered"])
def test_mls_gc_sam_oracle_matches_the_peer(norm):
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    data = [
        (torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64))
        for _ in range(3)
    ]
    W = W0.clone()
    for x, y in data:
        W = W - LR * mls_gc_sam_update(x, y, W, RHO, norm)
    with float64_norms():
        model = _LinearLS(W0)
        stepper = peer_sam(model, torch.optim.SGD, dict(lr=LR), rho=RHO, use_gc=True, gc_norm=norm, loss=_mls_loss)
        for batch in data:
            stepper.step(batch)
    assert _gap(model.lin.weight.detach(), W) <= 1e-14


def test_gc_normalizations_differ():
    """The peer's ||eps|| is rho ||GC(g)|| / ||g|| < rho; the specified one is rho. Their updates differ."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    assert _gap(mls_gc_sam_update(x, y, W, RHO, "peer"), mls_gc_sam_update(x, y, W, RHO, "centered")) > 1e-6


# ------------------------------------------------------------------------------------- AE-SAM's policy (no peer)


def test_ae_sam_threshold_schedule():
    assert ae_sam_threshold(0, 100) == 1.0
    assert ae_sam_threshold(100, 100) == -1.0
    assert ae_sam_threshold(50, 100) == 0.0
    assert ae_sam_threshold(25, 100, lambda1=0.0, lambda2=2.0) == 1.5


def test_ae_sam_decisions_by_hand():
    """||g||² = 1, 4, 1 with c = 0.5 and delta = 0.9, worked by hand:
    t=1: mu = 0.1, var = 0.1 * 0.9² = 0.081, threshold 0.1 + 0.5 * 0.28460 = 0.2423 <= 1: full.
    t=2: mu = 0.09 + 0.4 = 0.49, var = 0.0729 + 0.1 * 3.51² = 1.30491, threshold 0.49 + 0.5 * 1.14233 = 1.0612 <= 4:
    full. t=3: mu = 0.441 + 0.1 = 0.541, var = 1.174419 + 0.1 * 0.459² = 1.1954871, threshold
    0.541 + 0.5 * 1.09339 = 1.0877 > 1: plain."""
    state, decisions = AeSamState(), []
    for s in (1.0, 4.0, 1.0):
        full, state = ae_sam_decide(s, state, c=0.5, delta=0.9)
        decisions.append(full)
    assert decisions == [True, True, False]
    assert state.mean == pytest.approx(0.541, abs=1e-12)
    assert state.var == pytest.approx(1.1954871, abs=1e-12)


def test_ae_sam_constant_norm():
    """A constant ||g||² = s: mu_t = s (1 - delta^t) < s, so with c <= 0 every step is full. With c > 0 the policy
    settles on plain steps: the gap s - mu_t = s delta^t shrinks faster than sigma_t, which decays as delta^(t/2)
    (sigma²_t = delta sigma²_{t-1} + (1 - delta) s² delta^(2t)). A stationary norm is a flat stretch: ERM there."""
    state = AeSamState()
    for _ in range(50):
        full, state = ae_sam_decide(2.0, state, c=-0.5)
        assert full
    state, fulls = AeSamState(), []
    for _ in range(200):
        full, state = ae_sam_decide(2.0, state, c=1.0)
        fulls.append(full)
    assert fulls[0] and not any(fulls[-100:])
    assert math.isfinite(state.var) and state.mean == pytest.approx(2.0, rel=1e-8)


def test_float64_norms_is_undone():
    from pytorch_optimizer.optimizer import sam as module

    before = module.get_global_gradient_norm
    with contextlib.suppress(RuntimeError), float64_norms():
        assert module.get_global_gradient_norm is not before
        raise RuntimeError
    assert module.get_global_gradient_norm is before
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert before([{"params": [p]}]).dtype == torch.float32  # the reason for the swap
