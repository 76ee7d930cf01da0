"""Amortized steps: a full double step every k steps, plain or LookSAM steps in between."""

import copy
from unittest import mock

import pytest
import torch
from helpers import TinyModule, flat_params, least_squares_problem, loader, ls_grad, trainer
from test_lightning import SaveAt
from test_schedule import LR, LeastSquaresModule, RecordRho

from lit_deltasam import DeltaSAM, DeltaSAMConfig
from lit_deltasam.core.amortized import Reuse

RHO, ALPHA = 0.2, 0.5


def looksam_trajectory(x, y, w, interval, alpha, steps=8, reuse=True):
    """The least-squares LookSAM trajectory in closed form."""
    direction = None
    for t in range(steps):
        g = ls_grad(x, y, w)
        if t % interval == 0:
            update = ls_grad(x, y, w + RHO * g / g.norm())
            direction = update - (update @ g) / (g @ g) * g
        else:
            update = g + alpha * g.norm() / direction.norm() * direction if reuse else g
        w = w - LR * update
    return w


@pytest.mark.parametrize("interval, reuse", [(3, "looksam"), (2, "looksam"), (3, None)])
def test_least_squares_trajectory_in_closed_form(interval, reuse):
    x, y, w = least_squares_problem()
    alpha = dict(reuse_alpha=ALPHA) if reuse is not None else {}
    config = DeltaSAMConfig(method="sam", rho=RHO, interval=interval, reuse=reuse, **alpha)
    module = LeastSquaresModule(config, x, y, w)
    record = RecordRho()
    trainer(max_epochs=1, callbacks=[record]).fit(module)
    assert record.rhos == pytest.approx([RHO if t % interval == 0 else 0.0 for t in range(8)])
    expected = looksam_trajectory(x, y, w, interval, ALPHA, reuse=reuse is not None)
    torch.testing.assert_close(module.w.detach(), expected, atol=1e-10, rtol=0)


def test_reuse_formula_in_the_plain_gradients_buffers():
    plain = [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)]
    full = [torch.tensor([2.0, 3.0, 0.0], dtype=torch.float64)]
    reuse = Reuse(alpha=0.5)
    reuse.record(full, plain)
    torch.testing.assert_close(reuse.direction[0], torch.tensor([0.0, 3.0, 0.0], dtype=torch.float64))
    assert (
        reuse.direction[0].data_ptr() == plain[0].data_ptr()
    )  # no copy of the parameters' size beside the plain gradient
    assert float(reuse.norm) == 3.0
    grads = [torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)]
    reuse.apply(grads)
    torch.testing.assert_close(grads[0], torch.tensor([0.0, 2.0, 4.0], dtype=torch.float64))  # + 0.5 * 4/3 * g_v


@pytest.mark.parametrize("method", [dict(method="sam"), dict(method="deltasam", estimator="exact", beta=-1.0)])
def test_interval_alternates_full_and_plain_steps_as_a_hand_loop_does(method):
    """interval=2 under the mixin: full steps at global_step 0 and 2, plain ERM steps at 1 and 3."""
    rho = 0.2
    torch.manual_seed(0)
    module = TinyModule(DeltaSAMConfig(**method, rho=rho, rho_schedule="constant", interval=2, seed_steps=False))
    start = copy.deepcopy(module.model)
    seen = []
    step = DeltaSAM.step

    def recording(self, *args, **kwargs):
        seen.append(kwargs["rho"])
        return step(self, *args, **kwargs)

    with mock.patch.object(DeltaSAM, "step", recording):
        trainer(max_steps=4).fit(module, loader(n=32, batch_size=8))
    assert seen == [rho, 0.0, rho, 0.0]
    engine = DeltaSAM(start, DeltaSAMConfig(**method, rho=rho))
    opt = torch.optim.SGD(start.parameters(), lr=0.1)
    for t, batch in enumerate(loader(n=32, batch_size=8)):
        engine.step(start.losses, batch, rho=rho if t % 2 == 0 else 0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.testing.assert_close(flat_params(module.model), flat_params(start), atol=1e-6, rtol=0)


@pytest.mark.parametrize("at", [4, 5])
def test_resume_mid_interval_is_exact(at, tmp_path):
    """Batch 4 is the end of a window on a plain step between full ones, batch 5 the middle of the next window."""

    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        config = DeltaSAMConfig(method="deltasam", rho=0.2, interval=3, reuse="looksam", accumulate_grad_batches=2)
        module = TinyModule(config, optimizer="adamw", lr=0.01, dropout=0.2)
        fit = trainer(max_epochs=2, callbacks=list(callbacks))
        fit.fit(module, loader(n=64, shuffle=True), ckpt_path=ckpt_path)
        return module

    full = run(callbacks=[SaveAt(tmp_path, [at])])
    resumed = run(ckpt_path=tmp_path / f"batch{at}.ckpt")
    assert torch.equal(flat_params(resumed), flat_params(full))


def test_full_steps_are_logged():
    module = TinyModule(DeltaSAMConfig(method="sam", interval=2, reuse="looksam"))
    seen = []

    class Watch(RecordRho):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(float(trainer.callback_metrics["sam/full_step"]))

    trainer(max_steps=5, callbacks=[Watch()]).fit(module, loader(n=64, batch_size=8))
    assert seen == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_reuse_stores_nothing_from_a_non_finite_or_degenerate_full_step():
    for full in ([float("inf"), 1.0], [3.0, 1e-9]):  # an overflowed G; one with no orthogonal part
        reuse = Reuse(alpha=1.0)
        reuse.record([torch.tensor([1.0, 2.0], dtype=torch.float64)], [torch.tensor([1.0, 0.0], dtype=torch.float64)])
        assert reuse.direction is not None
        reuse.record([torch.tensor(full, dtype=torch.float64)], [torch.tensor([1.0, 0.0], dtype=torch.float64)])
        assert reuse.direction is None and reuse.norm is None
        grads = [torch.tensor([0.5, -1.0], dtype=torch.float64)]
        reuse.apply(grads)
        assert torch.equal(grads[0], torch.tensor([0.5, -1.0], dtype=torch.float64))  # a plain step


def test_a_full_step_drops_the_stored_direction_before_its_passes():
    """The second pass of a full step holds the plain gradient and the snapshot of w, as SAM's does, and no
    older direction beside them: LookSAM's memory is SAM's plus the one stored direction."""
    from helpers import MLP, classification_data

    from lit_deltasam import DeltaSAMOptimizer

    torch.manual_seed(0)
    model = MLP()
    config = DeltaSAMConfig(method="sam", interval=2, reuse="looksam", accumulate_grad_batches=2)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    held = []
    step = opt.engine.step

    def watching(*args, **kwargs):
        held.append(opt.loop_state.reuse_direction is not None)
        return step(*args, **kwargs)

    x, y = classification_data(n=16)
    with mock.patch.object(opt.engine, "step", watching):
        for _ in range(8):
            opt.step(model.losses, (x, y))
    # windows of 2 micro-batches: full, plain, full, plain
    assert held == [False, False, True, True, False, False, True, True]
    assert opt.loop_state.reuse_direction is not None


def test_reuse_leaves_parameters_without_a_gradient_alone_and_follows_the_schedule():
    reuse = Reuse(alpha=1.0)
    reuse.direction = [torch.tensor([0.0, 1.0]), torch.tensor([5.0])]
    grads = [torch.tensor([2.0, 0.0]), None]
    reuse.apply(grads, strength=0.5)
    # ||g|| / ||g_v|| over the same parameters, those with a gradient: 2 / 1
    torch.testing.assert_close(grads[0], torch.tensor([2.0, 0.5 * 2.0]))
    assert grads[1] is None


def test_bad_amortization_options_fail_naming_the_value():
    with pytest.raises(ValueError, match=r"reuse='looksam' reuses .* interval=1 makes every step full"):
        DeltaSAMConfig(method="sam", reuse="looksam")
    with pytest.raises(ValueError, match=r"interval=0 is not valid; it must be an integer >= 1"):
        DeltaSAMConfig(interval=0)
    with pytest.raises(ValueError, match=r"reuse='lookahead' is not valid; choose one of \[None, 'looksam'\]"):
        DeltaSAMConfig(reuse="lookahead")


@pytest.mark.parametrize(
    "config", [dict(method="sam"), dict(method="per_instance"), dict(method="deltasam", estimator="exact", beta=-1.0)]
)
def test_the_plain_gradient_lookSAM_needs_is_the_gradient_at_w(config):
    x, y, w = least_squares_problem()
    model = LeastSquaresModule(DeltaSAMConfig(**config, rho=RHO), x, y, w)
    result = DeltaSAM(model, model.deltasam).step(model.per_sample_loss, (x, y), plain_grad=True)
    torch.testing.assert_close(result.plain_grad[0], ls_grad(x, y, w), atol=1e-12, rtol=0)


def test_the_loop_takes_the_plain_gradient_it_writes_g_v_over():
    """A caller's StepResult does not expose the buffers LookSAM now holds as its stored direction."""
    from helpers import MLP, classification_data

    from lit_deltasam import DeltaSAMOptimizer

    torch.manual_seed(0)
    model = MLP()
    config = DeltaSAMConfig(method="sam", interval=2, reuse="looksam")
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    result = opt.step(model.losses, classification_data(n=16))
    assert result.stepped and result.plain_grad is None and opt.loop_state.reuse_direction is not None
