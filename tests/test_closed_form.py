"""Each method's update against a closed form or a brute-force loop."""

import pytest
import torch
from helpers import (
    EXACT_WEIGHTS,
    LS_CONFIGS,
    MLP,
    LeastSquares,
    classification_data,
    least_squares_problem,
    ls_grad,
    ls_instance_grads,
    ls_sam_update,
    probe_draws,
)

from lit_deltasam import DeltaSAM, DeltaSAMConfig
from lit_deltasam.core.diagnostics import corrections, fidelity, top_hessian_eigenvalue

RHO, LR = 0.1, 0.05


def sgd_step(model, config, batch):
    """One engine step followed by one SGD step; returns the new weights and the step result."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    result = DeltaSAM(model, config).step(model.losses, batch)
    opt.step()
    return model.w.detach().clone(), result


def test_sam_least_squares_closed_form():
    x, y, w = least_squares_problem()
    new_w, result = sgd_step(LeastSquares(w), DeltaSAMConfig(method="sam", rho=RHO), (x, y))
    g = ls_grad(x, y, w)
    expected = w - LR * ls_grad(x, y, w + RHO * g / g.norm())
    torch.testing.assert_close(new_w, expected, atol=1e-6, rtol=0)
    assert result.eps_norm.item() == pytest.approx(RHO)
    assert result.grad_norm.item() == pytest.approx(g.norm().item())


def test_asam_least_squares_closed_form():
    x, y, w = least_squares_problem()
    eta = 0.01
    new_w, _ = sgd_step(LeastSquares(w), DeltaSAMConfig(method="asam", rho=RHO, asam_eta=eta), (x, y))
    g = ls_grad(x, y, w)
    t = w.abs() + eta
    eps = RHO * t * t * g / (t * g).norm()
    torch.testing.assert_close(new_w, w - LR * ls_grad(x, y, w + eps), atol=1e-6, rtol=0)


def test_erm_is_the_plain_gradient_step():
    x, y, w = least_squares_problem()
    new_w, result = sgd_step(LeastSquares(w), DeltaSAMConfig(method="erm"), (x, y))
    torch.testing.assert_close(new_w, w - LR * ls_grad(x, y, w), atol=1e-12, rtol=0)
    assert result.perturbed_losses is None


def test_deltasam_with_beta_zero_is_sam():
    x, y = classification_data()
    batch = (x, y)
    updates = []
    for config in (DeltaSAMConfig(method="sam", rho=RHO), DeltaSAMConfig(method="deltasam", rho=RHO, beta=0.0)):
        torch.manual_seed(1)
        model = MLP()
        DeltaSAM(model, config).step(model.losses, batch)
        updates.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*updates):
        assert torch.equal(a, b)


def test_beta_minus_one_with_exact_scores_perturbs_along_the_sum_of_unit_gradients():
    x, y, w = least_squares_problem()
    config = DeltaSAMConfig(method="deltasam", rho=RHO, beta=-1.0, estimator="exact", **EXACT_WEIGHTS)
    new_w, result = sgd_step(LeastSquares(w), config, (x, y))
    g_i = ls_instance_grads(x, y, w)
    direction = (g_i / g_i.norm(dim=1, keepdim=True)).sum(0)
    eps = RHO * direction / direction.norm()
    torch.testing.assert_close(new_w, w - LR * ls_grad(x, y, w + eps), atol=1e-6, rtol=0)
    inverse_norms = 1 / g_i.norm(dim=1)
    torch.testing.assert_close(result.weights, inverse_norms / inverse_norms.sum())


def test_weighted_descent_uses_lambda_at_the_perturbed_point():
    x, y, w = least_squares_problem()
    config = DeltaSAMConfig(
        method="deltasam", rho=RHO, beta=-1.0, estimator="exact", weighted_descent=True, **EXACT_WEIGHTS
    )
    new_w, result = sgd_step(LeastSquares(w), config, (x, y))
    g_i = ls_instance_grads(x, y, w)
    lam = (1 / g_i.norm(dim=1)) / (1 / g_i.norm(dim=1)).sum()
    direction = (lam[:, None] * g_i).sum(0)
    moved = w + RHO * direction / direction.norm()
    expected = w - LR * (lam[:, None] * ls_instance_grads(x, y, moved)).sum(0)
    torch.testing.assert_close(new_w, expected, atol=1e-6, rtol=0)


def test_head_scores_are_the_exact_norms_when_the_head_is_the_whole_model():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 3).double()
    x, y = classification_data()
    x = x.double()

    def losses(batch):
        return torch.nn.functional.cross_entropy(head(batch[0]), batch[1], reduction="none")

    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses((x[i : i + 1], y[i : i + 1]))[0], list(head.parameters()))
        norms.append(torch.cat([g.reshape(-1) for g in grads]).norm())
    expected = torch.stack(norms)
    for estimator in ("head", "exact"):
        config = DeltaSAMConfig(method="deltasam", rho=RHO, beta=-1.0, estimator=estimator, **EXACT_WEIGHTS)
        result = DeltaSAM(head, config).step(losses, (x, y))
        torch.testing.assert_close(result.weights, (1 / expected) / (1 / expected).sum())


class HeadFirst(torch.nn.Module):
    """Registers its head before its body, and calls the head with a keyword argument."""

    def __init__(self, outputs: int = 3) -> None:
        super().__init__()
        self.head = torch.nn.Linear(8, outputs)
        self.body = torch.nn.Linear(6, 8)

    def forward(self, x):
        return self.head(input=torch.tanh(self.body(x)))


def head_norms(model, losses, x, y):
    """Per-instance gradient norms of the head's parameters, by an explicit loop."""
    norms = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(losses((x[i : i + 1], y[i : i + 1]))[0], list(model.head.parameters()))
        norms.append(torch.cat([g.reshape(-1) for g in grads]).norm())
    return torch.stack(norms)


def reference_scores(estimator, model, losses_at, batch, config, seed):
    """s_i without the engine: gradient norms by an explicit loop, probe scores by re-running the reproduced draws."""
    params = dict(model.named_parameters())
    clean = losses_at(params, batch)
    if estimator in ("exact", "head"):
        wrt = list(model.parameters()) if estimator == "exact" else list(model.head.parameters())
        norms = []
        for i in range(clean.shape[0]):
            grads = torch.autograd.grad(clean[i], wrt, retain_graph=True)
            norms.append(torch.cat([g.reshape(-1) for g in grads]).norm())
        return torch.stack(norms).detach()
    curvature = estimator == "curvature"
    directions = config.probe_samples // 2 if curvature else config.probe_samples
    names = list(params)
    clean = clean.detach()
    terms = []
    with torch.no_grad():
        sigma = config.probe_sigma if config.probe_sigma is not None else config.rho
        for u in probe_draws(list(params.values()), directions, sigma, seed):
            plus = losses_at({n: params[n] + d for n, d in zip(names, u)}, batch)
            if curvature:  # antithetic pairs: the same draw with both signs
                minus = losses_at({n: params[n] - d for n, d in zip(names, u)}, batch)
                terms.append((plus + minus - 2 * clean) / 2)
            else:
                terms.append((plus - clean) ** 2)
    mean = torch.stack(terms).mean(0)
    return mean.clamp_min(0) if curvature else mean.sqrt()


@pytest.mark.parametrize(
    "estimator,beta",
    [
        ("exact", 1.0),
        ("exact", -1.0),
        ("head", 1.0),
        ("head", -1.0),
        ("probe", 1.0),
        ("probe", -1.0),
        ("curvature", 1.0),
    ],
)
def test_each_estimators_scores_drive_lambda_and_the_ascent(estimator, beta):
    """lambda = s**beta / sum(s**beta) with s computed independently, and G = grad l(w + rho g_lambda / ||g_lambda||).

    Without floor and clip the weights are the scores themselves: a different score (another estimator's, a
    constant, a wrong exponent) gives different weights. The model is a body and a head, so that the head's
    gradient norms differ from the whole model's; the probes cover every parameter with the shipped K.
    """
    torch.manual_seed(0)
    model = HeadFirst(1).double()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64))

    def losses_at(params, batch):
        out = torch.func.functional_call(model, params, (batch[0],))
        return 0.5 * (out.squeeze(-1) - batch[1]) ** 2

    def losses(batch):
        return losses_at(dict(model.named_parameters()), batch)

    # probe: the shipped K = 3, one-sided; curvature: two antithetic pairs, wide enough for float32 second differences
    pairs = dict(probe_samples=4, probe_sigma=0.5) if estimator == "curvature" else {}
    config = DeltaSAMConfig(method="deltasam", rho=RHO, beta=beta, estimator=estimator, **pairs, **EXACT_WEIGHTS)
    scores = reference_scores(estimator, model, losses_at, batch, config, seed=5)
    lam = scores**beta / (scores**beta).sum()
    assert lam.max() > 1.5 * lam.min()  # far from uniform: SAM's weights would fail the check below
    params = list(model.parameters())
    g_lam = torch.autograd.grad((lam * losses(batch)).sum(), params)
    norm = torch.cat([t.reshape(-1) for t in g_lam]).norm()
    moved = {n: p + RHO * t / norm for (n, p), t in zip(model.named_parameters(), g_lam)}
    expected = torch.autograd.grad(losses_at(moved, batch).mean(), params)

    torch.manual_seed(5)
    result = DeltaSAM(model, config).step(losses, batch)
    # the engine computes the probe and head scores in float32
    tol = dict(rtol=1e-10, atol=1e-12) if estimator == "exact" else dict(rtol=2e-5, atol=1e-12)
    torch.testing.assert_close(result.weights, lam, **tol)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_head_scores_of_a_deeper_model_are_the_head_gradient_norms(task):
    """The head is the last linear layer called (not the last registered), even when called by keyword."""
    torch.manual_seed(0)
    model = HeadFirst(3 if task == "classification" else 1).double()
    x, y = classification_data()
    x = x.double()

    def losses(batch):
        out = model(batch[0])
        if task == "regression":
            return (out.squeeze(-1) - batch[1].double()) ** 2
        return torch.nn.functional.cross_entropy(out, batch[1], reduction="none")

    expected = head_norms(model, losses, x, y)
    config = DeltaSAMConfig(method="deltasam", rho=RHO, beta=1.0, estimator="head", **EXACT_WEIGHTS)
    engine = DeltaSAM(model, config)
    for _ in range(2):  # the first step finds the head, the second taps it alone
        result = engine.step(losses, (x, y))
        torch.testing.assert_close(result.weights, expected / expected.sum())
    assert engine.scorer.head.name == "head"


def test_head_scores_survive_fp16_logits():
    """Tiny output gradients are computed at a scale fp16 can hold, not flushed towards zero.

    For cross-entropy dl/dz = softmax(z) - onehot(y): the closed form, from the fp16 logits themselves.
    """
    torch.manual_seed(0)
    model = HeadFirst(2)
    with torch.no_grad():
        model.head.weight.mul_(25.0)  # confident predictions: dl/dz down to about 1e-7
    model.head.half()
    x, y = classification_data(classes=2)
    h = torch.tanh(model.body(x)).half()
    y = model.head(h).argmax(-1)

    def losses(batch):
        hidden = torch.tanh(model.body(batch[0])).half()
        return torch.nn.functional.cross_entropy(model.head(input=hidden).double(), batch[1], reduction="none")

    z = model.head(h).double()
    dz = torch.softmax(z, -1) - torch.nn.functional.one_hot(y, 2).double()
    expected = dz.norm(dim=1) * (h.double().pow(2).sum(1) + 1).sqrt()
    assert expected.min() < 1e-6
    config = DeltaSAMConfig(method="deltasam", rho=RHO, beta=-1.0, estimator="head", head="head")
    engine = DeltaSAM(model, config, params=list(model.body.parameters()))
    with engine.scorer.head:
        at_w = losses((x, y))
    torch.testing.assert_close(engine.scorer.head.scores(at_w).double(), expected, rtol=1e-2, atol=0)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_per_instance_least_squares_closed_form(impl):
    x, y, w = least_squares_problem()
    chunk = dict(per_instance_chunk=3) if impl == "vmap" else {}
    config = DeltaSAMConfig(method="per_instance", rho=RHO, per_instance_impl=impl, **chunk)
    new_w, result = sgd_step(LeastSquares(w), config, (x, y))
    g_i = ls_instance_grads(x, y, w)
    moved = w + RHO * g_i / g_i.norm(dim=1, keepdim=True)
    per_instance = torch.stack([(x[i] @ moved[i] - y[i]) * x[i] for i in range(x.shape[0])])
    torch.testing.assert_close(new_w, w - LR * per_instance.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.perturbed_losses, 0.5 * ((x * moved).sum(1) - y) ** 2)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_per_instance_equals_an_explicit_loop_over_instances(impl):
    torch.manual_seed(0)
    model = MLP().double()
    x, y = classification_data(n=10)
    x = x.double()
    params = list(model.parameters())
    expected = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        batch = (x[i : i + 1], y[i : i + 1])
        grads = torch.autograd.grad(model.losses(batch)[0], params)
        norm = torch.cat([g.reshape(-1) for g in grads]).norm()
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.add_(RHO * g / norm)
        moved = torch.autograd.grad(model.losses(batch)[0], params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(RHO * g / norm)
        for acc, g in zip(expected, moved):
            acc += g / x.shape[0]
    before = [p.detach().clone() for p in params]
    chunk = dict(per_instance_chunk=4) if impl == "vmap" else {}
    config = DeltaSAMConfig(method="per_instance", rho=RHO, per_instance_impl=impl, **chunk)
    DeltaSAM(model, config).step(model.losses, (x, y))
    for p, b, e in zip(params, before, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-10, rtol=0)
        torch.testing.assert_close(p.detach(), b, atol=1e-12, rtol=0)


def test_parameters_outside_params_get_the_descent_gradient_only():
    """SAM perturbing the last layer only: every trainable parameter ends with the gradient at that point."""
    torch.manual_seed(0)
    model = MLP().double()
    x, y = classification_data(n=16)
    batch = (x.double(), y)
    first, last = list(model.net[0].parameters()), list(model.net[-1].parameters())
    grads = torch.autograd.grad(model.losses(batch).mean(), last)
    norm = torch.cat([g.reshape(-1) for g in grads]).norm()
    with torch.no_grad():
        for p, g in zip(last, grads):
            p.add_(RHO * g / norm)
    expected = torch.autograd.grad(model.losses(batch).mean(), first + last)
    with torch.no_grad():
        for p, g in zip(last, grads):
            p.sub_(RHO * g / norm)
    DeltaSAM(model, DeltaSAMConfig(method="sam", rho=RHO), params=last).step(model.losses, batch)
    for p, e in zip(first + last, expected):
        torch.testing.assert_close(p.grad, e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("method", ["erm", "sam", "deltasam", "per_instance"])
def test_accumulating_micro_batches_sums_their_updates(method):
    """.grad after three micro-batches is the sum of their closed-form updates, each with its own ascent at w."""
    x, y, w = least_squares_problem(n=12)
    model = LeastSquares(w)
    radius = {} if method == "erm" else dict(rho=RHO)
    engine = DeltaSAM(model, DeltaSAMConfig(**radius, **LS_CONFIGS[method]))
    parts = [slice(0, 5), slice(5, 8), slice(8, 12)]
    for part in parts:
        engine.step(model.losses, (x[part], y[part]))
    expected = sum(ls_sam_update(x[part], y[part], w, RHO, method) for part in parts)
    torch.testing.assert_close(model.w.grad, expected, atol=1e-12, rtol=0)
    assert torch.equal(model.w.detach(), w)


def test_fidelity_against_the_least_squares_closed_form():
    """For a quadratic loss G_X - ḡ = H eps exactly, and per-instance SAM's correction is mean_i H_i rho ĝ_i."""
    x, y, w = least_squares_problem(n=10, d=4)
    model = LeastSquares(w)
    g = ls_grad(x, y, w)
    g_i = ls_instance_grads(x, y, w)
    hessian = x.T @ x / x.shape[0]
    c_sam = hessian @ (RHO * g / g.norm())
    c_pi = torch.stack([torch.outer(x[i], x[i]) @ (RHO * g_i[i] / g_i[i].norm()) for i in range(x.shape[0])]).mean(0)
    expected = torch.nn.functional.cosine_similarity(c_sam, c_pi, dim=0).item()
    cos = fidelity(model, model.losses, (x, y), {"sam": DeltaSAMConfig(method="sam", rho=RHO)})
    assert cos["sam"] == pytest.approx(expected, abs=1e-9)
    measured = corrections(model, model.losses, (x, y), {"sam": DeltaSAMConfig(method="sam", rho=RHO)})
    assert measured["sam"]["rel_err"] == pytest.approx(((c_sam - c_pi).norm() / c_pi.norm()).item(), abs=1e-9)


def test_top_hessian_eigenvalue_of_least_squares():
    x, y, w = least_squares_problem(n=12, d=5)
    model = LeastSquares(w)
    expected = torch.linalg.eigvalsh(x.T @ x / x.shape[0]).max().item()
    estimate = top_hessian_eigenvalue(
        model, model.losses, (x, y), iters=200, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    assert estimate == pytest.approx(expected, rel=1e-6)
