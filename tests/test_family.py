"""The SAM family (GSAM, WSAM, Friendly-SAM, gradient centralization) through the public API against their closed
forms on least squares (tests/family_oracles.py; each oracle is itself checked against the reference library in
tests/test_peer_reference.py), over several steps of plain SGD, so that state carried across steps (Friendly-SAM's
running mean) and the window's rules (GSAM's descent, WSAM's term after the base step) are exercised."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from family_oracles import (
    exact_weights,
    ls_delta_family_window,
    ls_fsam_update,
    ls_gsam_update,
    ls_wsam_update,
    mls_gc_sam_update,
    wsam_alpha,
)
from helpers import EXACT_WEIGHTS, LeastSquares, least_squares_problem, ls_sam_update
from torch import nn

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

RHO, LR, STEPS = 0.3, 0.1, 4


def ours(config: DeltaSAMConfig, x, y, w, steps: int = STEPS, accumulate: int = 1) -> torch.Tensor:
    model = LeastSquares(w)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config)
    for _ in range(steps):
        for part in torch.chunk(torch.arange(x.shape[0]), accumulate):
            opt.step(model.losses, (x[part], y[part]))
    return model.w.detach()


def test_gsam_is_its_closed_form():
    x, y, w = least_squares_problem()
    expected = w.clone()
    for _ in range(STEPS):
        expected = expected - LR * ls_gsam_update(x, y, expected, RHO, 0.4)
    got = ours(DeltaSAMConfig(method="gsam", rho=RHO, rho_schedule="constant"), x, y, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    sam = w.clone()
    for _ in range(STEPS):
        sam = sam - LR * ls_sam_update(x, y, sam, RHO)
    assert (got - sam).abs().max() > 1e-4  # alpha = 0.4 is not SAM


def test_gsam_with_asams_scaling_is_its_closed_form():
    """ASAM's scaling of GSAM's ascent, eps = rho T² g/||T g|| with T = |w| + 0.05 (the reference's adaptive=True is
    eta = 0, tests/test_peer_reference.py); the decomposition is GSAM's, in gradient space."""
    x, y, w = least_squares_problem()
    expected, unscaled = w.clone(), w.clone()
    for _ in range(STEPS):
        expected = expected - LR * ls_gsam_update(x, y, expected, 0.5, 0.4, eta=0.05)
        unscaled = unscaled - LR * ls_gsam_update(x, y, unscaled, 0.5, 0.4)
    config = DeltaSAMConfig(method="gsam", rho=0.5, asam_eta=0.05, rho_schedule="constant")
    assert config.asam_scope == "all" and DeltaSAMConfig(method="gsam", asam_eta=0.0).rho == 0.5
    got = ours(config, x, y, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - unscaled).abs().max() > 1e-4


@pytest.mark.parametrize("decouple", [True, False], ids=["decoupled", "coupled"])
@pytest.mark.parametrize("gamma", [0.9, 0.6])
def test_wsam_is_its_closed_form(gamma, decouple):
    x, y, w = least_squares_problem()
    expected = w.clone()
    for _ in range(STEPS):
        update = ls_wsam_update(x, y, expected, RHO, gamma, decouple=decouple)
        expected = expected - LR * update.base - LR * update.after
    config = DeltaSAMConfig(method="wsam", rho=RHO, wsam_gamma=gamma, wsam_decouple=decouple, rho_schedule="constant")
    got = ours(config, x, y, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert wsam_alpha(gamma) == pytest.approx(gamma / (1 - gamma))


def test_fsam_is_its_closed_form_with_its_running_mean():
    x, y, w = least_squares_problem()
    expected, momentum = w.clone(), None
    for _ in range(STEPS):
        update = ls_fsam_update(x, y, expected, RHO, 1.0, 0.9, momentum)
        expected, momentum = expected - LR * update.G, update.momentum
    config = DeltaSAMConfig(method="fsam", rho=RHO, rho_schedule="constant")
    got = ours(config, x, y, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


DELTA = dict(beta=-1.0, estimator="exact", **EXACT_WEIGHTS)
"""δ-weights the closed forms compute: ``lambda_i ∝ 1 / ||g_i||``, exactly."""


@pytest.mark.parametrize("weighted", [False, True], ids=["mean-descent", "weighted-descent"])
def test_delta_gsam_is_its_closed_form(weighted):
    """δ-GSAM: the ascent along the reweighted gradient; GSAM's decomposition of the descent's loss's gradients
    (the plain mean's, or the weighted ones under weighted_descent)."""
    x, y, w = least_squares_problem()
    expected = w.clone()
    for _ in range(STEPS):
        lam = exact_weights(x, y, expected, -1.0)
        expected = expected - LR * ls_gsam_update(x, y, expected, RHO, 0.4, lam=lam, weighted=weighted)
    config = DeltaSAMConfig(method="gsam", rho=RHO, rho_schedule="constant", weighted_descent=weighted, **DELTA)
    got = ours(config, x, y, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    plain = ours(DeltaSAMConfig(method="gsam", rho=RHO, rho_schedule="constant"), x, y, w)
    assert (got - plain).abs().max() > 1e-4  # the weights change the step


def test_delta_wsam_is_its_closed_form():
    x, y, w = least_squares_problem()
    expected = w.clone()
    for _ in range(STEPS):
        update = ls_wsam_update(x, y, expected, RHO, 0.9, lam=exact_weights(x, y, expected, -1.0))
        expected = expected - LR * update.base - LR * update.after
    got = ours(DeltaSAMConfig(method="wsam", rho=RHO, rho_schedule="constant", **DELTA), x, y, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_delta_fsam_is_its_closed_form_with_a_running_mean_of_the_reweighted_ascent():
    x, y, w = least_squares_problem()
    expected, momentum = w.clone(), None
    for _ in range(STEPS):
        lam = exact_weights(x, y, expected, -1.0)
        update = ls_fsam_update(x, y, expected, RHO, 1.0, 0.9, momentum, lam=lam)
        expected, momentum = expected - LR * update.G, update.momentum
    got = ours(DeltaSAMConfig(method="fsam", rho=RHO, rho_schedule="constant", **DELTA), x, y, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


RULES = {
    "δ-gsam": dict(method="gsam"),
    "δ-wsam": dict(method="wsam"),
    "δ-wsam-coupled": dict(method="wsam", wsam_decouple=False),
    "δ-fsam": dict(method="fsam"),
}


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad-scaler"])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("weighted", [False, True], ids=["mean-descent", "weighted-descent"])
@pytest.mark.parametrize("rule", list(RULES))
def test_the_delta_rows_are_their_closed_forms_over_windows_and_a_loss_scaler(rule, weighted, accumulate, scaled):
    """Each δ- row, both descents, one micro-batch or a window of two, with a GradScaler or without: the window's rule
    on its mean gradients, as family_oracles.ls_delta_family_window writes it out."""
    x, y, w = least_squares_problem()
    options = dict(RULES[rule], rho=RHO, rho_schedule="constant", weighted_descent=weighted, **DELTA)
    model = LeastSquares(w)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    config = DeltaSAMConfig(accumulate_grad_batches=accumulate, **options)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config, scaler=scaler)
    parts = [(x[i], y[i]) for i in torch.chunk(torch.arange(x.shape[0]), accumulate)]
    expected, momentum = w.clone(), None
    for _ in range(STEPS):
        for part in parts:
            opt.step(model.losses, part)
        extra = {"decouple": RULES[rule].get("wsam_decouple", True)}
        base, after, momentum = ls_delta_family_window(
            RULES[rule]["method"], parts, expected, RHO, momentum, weighted=weighted, **extra
        )
        expected = expected - LR * base - LR * after
    torch.testing.assert_close(model.w.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["gsam", "wsam", "fsam"])
def test_beta_zero_is_the_unweighted_method(method):
    x, y, w = least_squares_problem()
    plain = ours(DeltaSAMConfig(method=method, rho=RHO, rho_schedule="constant"), x, y, w)
    zero = ours(DeltaSAMConfig(method=method, rho=RHO, rho_schedule="constant", beta=0.0), x, y, w)
    assert torch.equal(plain, zero)


def test_fsam_state_resumes_bit_exactly():
    """The running mean is optimizer state: a run stopped after two steps and resumed from state_dict trains the
    weights of the run that never stopped."""
    x, y, w = least_squares_problem()
    config = DeltaSAMConfig(method="fsam", rho=RHO, rho_schedule="constant")
    whole = ours(config, x, y, w, steps=4)
    model = LeastSquares(w)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config)
    for _ in range(2):
        opt.step(model.losses, (x, y))
    saved, weights = opt.state_dict(), model.state_dict()
    assert "momentum" in saved
    model = LeastSquares(w)
    model.load_state_dict(weights)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config)
    opt.load_state_dict(saved)
    for _ in range(2):
        opt.step(model.losses, (x, y))
    assert torch.equal(model.w.detach(), whole)


def test_fsam_at_sigma_zero_is_sam_and_keeps_no_running_mean():
    """σ = 0 removes nothing: the weights are SAM's to the bit, and no running mean is kept or checkpointed (it held a
    copy of the parameters for nothing, and the clean gradient beside it)."""
    x, y, w = least_squares_problem()
    sam = ours(DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="constant"), x, y, w, steps=3)
    model = LeastSquares(w)
    config = DeltaSAMConfig(method="fsam", rho=RHO, rho_schedule="constant", fsam_sigma=0.0)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config)
    for _ in range(3):
        opt.step(model.losses, (x, y))
    assert torch.equal(model.w.detach(), sam)
    assert opt.driver.state.fsam_momentum is None and "momentum" not in opt.state_dict()


class Linear(nn.Module):
    """Multi-output least squares ``||W x_i - y_i||² / 2`` (a weight of rank 2, which centralization centres)."""

    def __init__(self, W: torch.Tensor) -> None:
        super().__init__()
        self.W = nn.Parameter(W.clone())

    def losses(self, batch):
        x, y = batch
        return 0.5 * ((x @ self.W.T - y) ** 2).sum(1)


def test_gradient_centralization_is_its_closed_form():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g, dtype=torch.float64)
    W = torch.randn(3, 5, generator=g, dtype=torch.float64)
    model = Linear(W)
    config = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="constant", gradient_centralization=True)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config)
    expected = W.clone()
    for _ in range(STEPS):
        opt.step(model.losses, (x, y))
        expected = expected - LR * mls_gc_sam_update(x, y, expected, RHO, norm="centered")
    torch.testing.assert_close(model.W.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(method="sam", gsam_alpha=0.4), r"gsam_alpha=0.4 does nothing with method='sam'"),
        (dict(method="gsam", gsam_alpha=1.0), r"gsam_alpha=1.0 is not valid; .*\[0.0, 1.0\)"),
        (dict(method="wsam", wsam_gamma=1.0), r"wsam_gamma=1.0 is not valid"),
        (dict(method="sam", wsam_decouple=False), r"wsam_decouple=False does nothing with method='sam'"),
        (dict(method="fsam", fsam_lambda=-0.1), r"fsam_lambda=-0.1 is not valid"),
        (dict(method="gsam", m_sharpness=4), r"m_sharpness=4 .* method='gsam' applies its rule to the whole batch"),
        (dict(method="fsam", interval=2, reuse="looksam"), r"reuse='looksam' with method='fsam'"),
        (dict(method="gsam", estimator="exact"), r"estimator='exact' does nothing with method='gsam'"),
        (dict(method="fsam", beta=0.0, estimator="exact"), r"estimator='exact' does nothing .*beta=0.0"),
        (dict(method="per_instance", gradient_centralization=True), r"gradient_centralization=True does nothing"),
    ],
)
def test_family_fields_are_refused_where_they_do_nothing(options, match):
    with pytest.raises(ValueError, match=match):
        DeltaSAMConfig(**options)


def test_family_defaults_are_the_reference_libraries():
    assert DeltaSAMConfig(method="gsam").gsam_alpha == 0.4
    assert DeltaSAMConfig(method="wsam").wsam_gamma == 0.9
    config = DeltaSAMConfig(method="fsam")
    assert (config.fsam_sigma, config.fsam_lambda) == (1.0, 0.9)
    assert DeltaSAMConfig(method="sam").gsam_alpha is None


def test_the_adaptive_policy_takes_the_steps_its_closed_form_decides():
    """AE-SAM on least squares: each step's decision from ||g||² against the running moments (family_oracles'
    closed form), a full SAM step where it says so and a plain step on g elsewhere; the weights follow."""
    from family_oracles import AeSamState, ae_sam_decide, ae_sam_threshold
    from helpers import ls_grad

    x, y, w = least_squares_problem(n=8, seed=4)
    steps = 12
    config = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="constant", policy="adaptive")
    model = LeastSquares(w)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config, total_steps=steps)
    expected, state, decisions = w.clone(), AeSamState(), []
    got = []
    for t in range(steps):
        g = ls_grad(x, y, expected)
        full, state = ae_sam_decide(float(g @ g), state, ae_sam_threshold(t, steps), delta=0.9)
        decisions.append(full)
        expected = expected - LR * (ls_sam_update(x, y, expected, RHO) if full else g)
        got.append(opt.step(model.losses, (x, y)).full_step)
    assert got == decisions and True in decisions and False in decisions
    torch.testing.assert_close(model.w.detach(), expected, rtol=0, atol=1e-12)
    assert opt.loop_state.policy_full == sum(decisions) and opt.loop_state.policy_decided == steps


def test_the_adaptive_policy_needs_the_run_length_and_is_refused_where_it_cannot_decide():
    x, y, w = least_squares_problem()
    model = LeastSquares(w)
    config = DeltaSAMConfig(method="sam", rho=RHO, policy="adaptive")
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config)
    with pytest.raises(ValueError, match=r"policy='adaptive' moves its threshold over the run: .*total_steps=N"):
        opt.step(model.losses, (x, y))
    assert torch.equal(model.w.detach(), w)
    for options, match in [
        (dict(method="deltasam", policy="adaptive"), r"policy='adaptive' with method='deltasam'"),
        (dict(method="sam", policy="adaptive", m_sharpness=2), r"policy='adaptive' with m_sharpness"),
        (dict(method="sam", policy="adaptive", interval=2), r"policy='adaptive' and interval=2"),
        (dict(method="sam", policy_delta=0.5), r"policy_delta=0.5 does nothing"),
    ]:
        with pytest.raises(ValueError, match=match):
            DeltaSAMConfig(**options)


@pytest.mark.parametrize("method", ["fsam", "gsam", "wsam"])
def test_the_adaptive_policys_plain_steps_are_plain_for_the_family(method):
    """Under the policy a plain step is a step on g: no GSAM decomposition, no WSAM term, and Friendly-SAM's running
    mean moves on the full steps only (family-spec.md: m on full steps only), so that F-SAM under the policy is F-SAM
    on the subsequence of full steps, step for step against the closed forms."""
    from family_oracles import AeSamState, ae_sam_decide, ae_sam_threshold
    from helpers import ls_grad

    x, y, w = least_squares_problem(n=8, seed=4)
    steps = 12
    config = DeltaSAMConfig(method=method, rho=RHO, rho_schedule="constant", policy="adaptive")
    model = LeastSquares(w)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=LR), config, total_steps=steps)
    expected, state, momentum, decisions = w.clone(), AeSamState(), None, []
    for t in range(steps):
        g = ls_grad(x, y, expected)
        full, state = ae_sam_decide(float(g @ g), state, ae_sam_threshold(t, steps), delta=0.9)
        decisions.append(full)
        if not full:
            expected = expected - LR * g
        elif method == "fsam":
            update = ls_fsam_update(x, y, expected, RHO, 1.0, 0.9, momentum)
            expected, momentum = expected - LR * update.G, update.momentum
        elif method == "gsam":
            expected = expected - LR * ls_gsam_update(x, y, expected, RHO, 0.4)
        else:
            parts = ls_wsam_update(x, y, expected, RHO, 0.9, decouple=True)
            expected = expected - LR * parts.base - LR * parts.after
        result = opt.step(model.losses, (x, y))
        assert result.full_step == full
        if not full:  # nothing of the family's rule is computed (or logged) on a plain step
            assert result.extras == {}
    assert True in decisions and False in decisions
    torch.testing.assert_close(model.w.detach(), expected, rtol=0, atol=1e-12)
    if method == "fsam":
        torch.testing.assert_close(opt.loop_state.fsam_momentum[0], momentum, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["gsam", "wsam", "fsam"])
def test_one_full_step_of_the_family_for_a_probe_is_its_closed_form(method):
    """``diagnostics.update_of`` (what SharpnessProbe and ``corrections`` measure) is one full step of the method,
    its rule included: GSAM's descent, WSAM's G = g + γ/(1−γ)(g_adv − g), Friendly-SAM's ascent shifted by the running
    mean it is given; not SAM's G under the method's name."""
    from lit_deltasam.core.diagnostics import update_of
    from lit_deltasam.core.engine import DeltaSAM

    x, y, w = least_squares_problem()
    model = LeastSquares(w)
    config = DeltaSAMConfig(method=method, rho=RHO, rho_schedule="constant")
    momentum = torch.linspace(-1.0, 1.0, w.numel(), dtype=w.dtype)
    got = update_of(DeltaSAM(model, config, driven=True), model.losses, (x, y), [momentum])[0]
    if method == "gsam":
        expected = ls_gsam_update(x, y, w, RHO, 0.4)
    elif method == "wsam":
        expected = ls_wsam_update(x, y, w, RHO, 0.9, decouple=False).base
    else:
        expected = ls_fsam_update(x, y, w, RHO, 1.0, 0.9, momentum).G
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert (got - ls_sam_update(x, y, w, RHO)).abs().max() > 1e-4
    assert torch.equal(model.w.detach(), w) and model.w.grad is None


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(method="gsam"), r"method='gsam' \(GSAM's descent\) acts at the optimizer step"),
        (dict(method="wsam"), r"method='wsam' \(WSAM's sharpness term\)"),
        (dict(method="fsam"), r"method='fsam' \(Friendly-SAM's running mean"),
        (dict(method="sam", policy="adaptive"), r"policy='adaptive' \(its running moments"),
    ],
)
def test_the_engine_alone_refuses_the_rules_that_act_at_the_optimizer_step(options, match):
    from lit_deltasam.core.engine import DeltaSAM

    x, y, w = least_squares_problem()
    with pytest.raises(ValueError, match=match + r".*DeltaSAMOptimizer .* or DeltaSAMMixin"):
        DeltaSAM(LeastSquares(w), DeltaSAMConfig(**options))


def test_the_adaptive_policy_decides_on_unscaled_norms_under_a_growing_loss_scale():
    """A GradScaler whose scale grows every step (and one that overflows once) leaves the policy's decisions and the
    weights those of the unscaled run: the running moments of ||g||² are kept in unscaled units, and an overflowed
    step, which the scaler skips, does not enter them."""
    x, y, w = least_squares_problem(n=8, seed=4)
    steps = 16
    config = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="constant", policy="adaptive")

    def run(scaler, poison: Optional[int] = None):
        model = LeastSquares(w)
        sgd = torch.optim.SGD(model.parameters(), lr=LR)
        opt = DeltaSAMOptimizer(model, sgd, config, scaler=scaler, total_steps=steps)
        decisions = []
        for t in range(steps):
            xb = x.clone()
            if t == poison:
                xb[0, 0] = float("inf")
            decisions.append(opt.step(model.losses, (xb, y)).full_step)
        return model.w.detach(), decisions, opt.loop_state

    plain, decided, _ = run(None)
    assert True in decided and False in decided
    growing = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1)
    weights, scaled, _ = run(growing)
    assert scaled == decided
    torch.testing.assert_close(weights, plain, rtol=0, atol=1e-12)
    _, _, state = run(torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1), poison=3)
    assert math.isfinite(state.policy_mean) and math.isfinite(state.policy_var)
