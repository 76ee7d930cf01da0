"""m-sharpness: one perturbation per group of m instances, against closed forms, SAM, per-instance SAM and
accumulated micro-batches."""

import pytest
import torch
from helpers import (
    LS_CONFIGS,
    MLP,
    LeastSquares,
    TinyModule,
    classification_data,
    flat_params,
    least_squares_problem,
    loader,
    ls_sam_update,
    trainer,
)

from lit_deltasam import DeltaSAM, DeltaSAMConfig

RHO = 0.1


def groups(n: int, m: int) -> list[slice]:
    return [slice(start, min(start + m, n)) for start in range(0, n, m)]


@pytest.mark.parametrize("method", ["sam", "deltasam"])
@pytest.mark.parametrize("m", [4, 5])
def test_least_squares_closed_form(method, m):
    """G = (1/n) sum_k |k| G_k, each group with its own ascent at w (m = 5 leaves a last group of 1)."""
    x, y, w = least_squares_problem(n=16)
    model = LeastSquares(w)
    result = DeltaSAM(model, DeltaSAMConfig(rho=RHO, m_sharpness=m, **LS_CONFIGS[method])).step(model.losses, (x, y))
    expected = sum((k.stop - k.start) / 16 * ls_sam_update(x[k], y[k], w, RHO, method) for k in groups(16, m))
    torch.testing.assert_close(model.w.grad, expected, atol=1e-12, rtol=0)
    assert torch.equal(model.w.detach(), w)
    # lambda is normalized within each group: a group's weights sum to its share of the batch
    for k in groups(16, m):
        assert result.weights[k].sum().item() == pytest.approx((k.stop - k.start) / 16)
    moved = torch.cat([0.5 * (x[k] @ (w + RHO * ls_eps(x[k], y[k], w, method)) - y[k]) ** 2 for k in groups(16, m)])
    torch.testing.assert_close(result.perturbed_losses, moved)


def ls_eps(x, y, w, method):
    g_i = (x @ w - y)[:, None] * x
    lam = 1 / g_i.norm(dim=1) if method == "deltasam" else torch.ones(x.shape[0], dtype=x.dtype)
    d = ((lam / lam.sum())[:, None] * g_i).sum(0)
    return d / d.norm()


@pytest.mark.parametrize(
    "options", [dict(method="sam"), dict(method="asam"), dict(method="deltasam", estimator="head")], ids=str
)
@pytest.mark.parametrize("m", [16, 40])
def test_m_at_least_n_is_the_method_bit_for_bit(options, m):
    x, y = classification_data(n=16)
    grads = []
    for extra in ({}, {"m_sharpness": m}):
        torch.manual_seed(0)
        model = MLP(dropout=0.2)
        torch.manual_seed(1)
        result = DeltaSAM(model, DeltaSAMConfig(rho=RHO, **options, **extra)).step(model.losses, (x, y))
        grads.append([p.grad.clone() for p in model.parameters()] + [result.perturbed_losses])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_sam_with_m_one_is_per_instance_sam(dropout):
    x, y = classification_data(n=10)
    grads = []
    for options in (dict(method="sam", m_sharpness=1), dict(method="per_instance")):
        torch.manual_seed(0)
        model = MLP(dropout=dropout).double()
        torch.manual_seed(1)
        result = DeltaSAM(model, DeltaSAMConfig(rho=RHO, **options)).step(model.losses, (x.double(), y))
        grads.append([p.grad.clone() for p in model.parameters()] + [result.perturbed_losses])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_m_sam_on_a_batch_equals_sam_on_accumulated_micro_batches_of_m():
    """How m-sharpness is often run: n/m micro-batches of m, each with SAM, averaged into one update."""
    x, y = classification_data(n=16)
    torch.manual_seed(0)
    model = MLP().double()
    DeltaSAM(model, DeltaSAMConfig(method="sam", rho=RHO, m_sharpness=4)).step(model.losses, (x.double(), y))
    grouped = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    engine = DeltaSAM(model, DeltaSAMConfig(method="sam", rho=RHO))
    for k in groups(16, 4):
        engine.step(model.losses, (x[k].double(), y[k]))
    for a, p in zip(grouped, model.parameters()):
        torch.testing.assert_close(a, p.grad / 4, atol=1e-12, rtol=0)


def test_the_mixin_matches_accumulated_micro_batches_over_a_fit():
    def fit(config, batch_size):
        torch.manual_seed(0)
        module = TinyModule(config, optimizer="adamw", lr=0.01)
        trainer(max_epochs=2).fit(module, loader(n=64, batch_size=batch_size))
        return flat_params(module)

    grouped = fit(DeltaSAMConfig(method="sam", rho=RHO, m_sharpness=4, rho_schedule="constant"), 16)
    accumulated = fit(DeltaSAMConfig(method="sam", rho=RHO, accumulate_grad_batches=4, rho_schedule="constant"), 4)
    torch.testing.assert_close(grouped, accumulated, atol=1e-6, rtol=0)
    single = fit(DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="constant"), 16)
    assert not torch.allclose(grouped, single, atol=1e-4)


def test_a_failing_group_leaves_weights_and_gradients_as_they_were():
    x, y = classification_data(n=16)
    model = MLP()
    engine = DeltaSAM(model, DeltaSAMConfig(method="sam", rho=RHO, m_sharpness=4))
    engine.step(model.losses, (x, y))
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 5:  # the third group's clean forward
            raise RuntimeError("injected")
        return model.losses(batch)

    with pytest.raises(RuntimeError, match="injected"):
        engine.step(failing, (x, y))
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.equal(p.detach(), b)
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(method="erm"), "takes no ascent"),
        (dict(method="per_instance"), "perturbs each instance"),
        (dict(method="sam", ascent="global"), "ascent='local'"),
    ],
)
def test_refused_where_it_cannot_apply(options, match):
    with pytest.raises(ValueError, match=match):
        DeltaSAMConfig(m_sharpness=4, **options)
    with pytest.raises(ValueError, match="integer >= 1"):
        DeltaSAMConfig(method="sam", m_sharpness=0)
