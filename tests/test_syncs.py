"""Host synchronizations per optimizer step, counted by patching the Tensor methods that copy to the host.

On the host path (CPU tensors) the decisions are Python values: ERM reads 1 value per step (the joint
decision whether the update is finite), SAM and ASAM 2 (plus the norm that decides whether ε is applied),
δ-SAM 3 (plus the check whether the weights need their bounds), m-sharpness one more per group. On the
device path (every accelerator; forced here on the CPU) every method reads exactly the one value that
decides whether the base optimizer steps, and none on the micro-batches inside an accumulation window.
"""

import math

import pytest
import torch
from helpers import MLP, TinyData, TinyModule, classification_data
from helpers import trainer as make_trainer

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer
from lit_deltasam.core.decisions import HostReads, decisions_on_device
from lit_deltasam.core.weighting import _bounded, _bounded_exact


def batch(i, n=16):
    x, y = classification_data(n=64)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(i))[:n]
    return x[idx], y[idx]


def optimizer_for(options, seed=0):
    torch.manual_seed(seed)
    model = MLP()
    return model, DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), DeltaSAMConfig(**options))


def syncs_of_one_step(options):
    model, opt = optimizer_for(options)
    opt.step(model.losses, batch(0))  # first steps may check more, once
    with HostReads() as reads:
        opt.step(model.losses, batch(1))
    return reads.count


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(method="erm"), 1),
        (dict(method="sam"), 2),
        (dict(method="asam"), 2),
        (dict(method="deltasam", estimator="head"), 3),
        (dict(method="sam", m_sharpness=4), 5),
    ],
    ids=["erm", "sam", "asam", "deltasam", "m-sam-4-groups"],
)
def test_host_synchronizations_per_step(options, expected):
    assert syncs_of_one_step(options) == expected


DEVICE_CASES = {
    "erm": dict(method="erm"),
    "sam": dict(method="sam"),
    "asam": dict(method="asam", rho=0.5),
    "deltasam": dict(method="deltasam", estimator="head"),
    "deltasam-bounds": dict(method="deltasam", estimator="head", beta=-2.0, weight_min=0.5, weight_max=1.5),
    "deltasam-probe": dict(method="deltasam", estimator="probe"),
    "deltasam-exact": dict(method="deltasam", estimator="exact"),
    "m-sam-3": dict(method="sam", m_sharpness=3),
    "per-instance": dict(method="per_instance"),
    "interval": dict(method="sam", interval=3),
    "looksam": dict(method="sam", interval=2, reuse="looksam"),
    "looksam-deltasam": dict(method="deltasam", estimator="head", interval=2, reuse="looksam"),
}


@pytest.mark.parametrize("options", DEVICE_CASES.values(), ids=DEVICE_CASES)
def test_one_synchronization_per_step_on_device(options):
    model, opt = optimizer_for(dict(options, accumulate_grad_batches=2))
    with decisions_on_device():
        for i in range(2):
            opt.step(model.losses, batch(i))
        for i in range(2, 8):
            with HostReads() as reads:
                result = opt.step(model.losses, batch(i))
            assert reads.count == (1 if result.stepped else 0), (i, result.stepped)
    assert opt.steps == 4


@pytest.mark.parametrize("options", DEVICE_CASES.values(), ids=DEVICE_CASES)
def test_device_decisions_train_the_host_paths_weights(options):
    trained = []
    for on_device in (False, True):
        model, opt = optimizer_for(options)
        with decisions_on_device(on_device):
            for i in range(6):
                opt.step(model.losses, batch(i))
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert opt.loop_state.scalars()["perturbation_skipped"] == 0
    torch.testing.assert_close(trained[1], trained[0], rtol=0, atol=2e-6)


class Constant(MLP):
    """Zero gradient at the first step for half the training: ‖g‖ = 0, ε is skipped."""

    def losses(self, batch):
        return super().losses(batch) * 0.0


@pytest.mark.parametrize("method", ["sam", "asam", "per_instance"])
def test_device_path_skips_a_vanishing_perturbation(method):
    for on_device in (False, True):
        torch.manual_seed(0)
        model = Constant()
        before = [p.detach().clone() for p in model.parameters()]
        opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), DeltaSAMConfig(method=method))
        with decisions_on_device(on_device):
            result = opt.step(model.losses, batch(0))
        # per-instance SAM skips ε_i instance by instance and counts no skipped step
        assert result.stepped and opt.loop_state.scalars()["perturbation_skipped"] == (method != "per_instance")
        assert torch.equal(result.perturbed_losses, result.losses)
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p, b)


@pytest.mark.parametrize("method", ["sam", "deltasam", "per_instance"])
def test_device_path_skips_a_non_finite_step(method):
    torch.manual_seed(0)
    model = MLP()
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), DeltaSAMConfig(method=method))
    x, y = batch(1)
    x[3] = math.nan
    with decisions_on_device():
        opt.step(model.losses, batch(0))
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.warns(RuntimeWarning, match="optimizer step is skipped"):
            result = opt.step(model.losses, (x, y))
    assert not result.stepped and opt.loop_state.steps_skipped == 1
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("low, high", [(0.1, 10.0), (0.5, 1.5), (0.0, 2.0), (0.3, math.inf), (0.9, 1.1), (1.0, 1.0)])
def test_bounds_solved_on_device_equal_the_bisection(low, high):
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = 1 + trial
        logits = torch.randn(n, generator=g, dtype=torch.float64) * (8 * trial / 40)
        logits[: n // 3] = logits[0]  # ties among the breakpoints
        expected = _bounded(logits, low, high)
        exact = _bounded_exact(logits, low, high)
        torch.testing.assert_close(exact, expected, rtol=0, atol=1e-12)
        assert float(exact.min()) >= low - 1e-12 and float(exact.max()) <= high + 1e-12
        with decisions_on_device():
            torch.testing.assert_close(_bounded(logits, low, high), expected, rtol=0, atol=1e-12)


def test_looksam_on_device_adds_nothing_before_a_direction_is_recorded():
    """A first full step with no orthogonal part records zeros (the host path records nothing): the plain steps
    after it are plain."""
    from lit_deltasam.core.amortized import Reuse

    full = [torch.ones(3), torch.ones(2)]
    with decisions_on_device():
        reuse = Reuse(alpha=0.7)
        assert reuse.record(full, [2 * f for f in full]) is None  # G parallel to g
        grads = [torch.full((3,), 0.5), torch.full((2,), -1.0)]
        reuse.apply(grads)
    assert torch.equal(grads[0], torch.full((3,), 0.5)) and torch.equal(grads[1], torch.full((2,), -1.0))


def test_mixin_gathers_diagnostics_only_on_logging_steps_under_ddp(monkeypatch, tmp_path):
    """Under DDP the diagnostics' all-gather runs on the steps the loggers record (here a stand-in world of 2)."""
    import lit_deltasam.lightning.metrics as metrics

    gathered = []
    monkeypatch.setattr(metrics, "world_size", lambda: 2)
    monkeypatch.setattr(
        metrics, "reduce_over_ranks", lambda means, maxima, device: gathered.append(1) or {**means, **maxima}
    )
    trainer = make_trainer(max_steps=9, log_every_n_steps=3, default_root_dir=tmp_path)
    trainer.fit(TinyModule(DeltaSAMConfig(method="sam")), datamodule=TinyData())
    assert len(gathered) == 3


def test_bounds_on_device_when_the_root_sits_on_a_breakpoint():
    """An unclamped weight equal to a bound up to rounding (found by review): the device path must still find
    the bisection's weights."""
    from lit_deltasam.core.weighting import instance_weights

    scores = torch.tensor([5.0, 5, 3, 2, 3, 4, 5, 3, 4, 4, 4, 5, 1])
    expected = instance_weights(scores, 1.0, floor=0.0, clip=(0.8, 1.25))
    with decisions_on_device():
        torch.testing.assert_close(instance_weights(scores, 1.0, floor=0.0, clip=(0.8, 1.25)), expected)
    g = torch.Generator().manual_seed(1)
    for trial in range(300):  # integer scores: many ties, many roots on breakpoints
        scores = torch.randint(1, 8, (int(torch.randint(1, 40, (), generator=g)),), generator=g).double()
        beta, clip = [1.0, -1.0, 2.0][trial % 3], [(0.8, 1.25), (0.1, 10.0), (0.5, math.inf)][trial % 3]
        expected = instance_weights(scores, beta, floor=0.0, clip=clip)
        with decisions_on_device():
            torch.testing.assert_close(instance_weights(scores, beta, floor=0.0, clip=clip), expected)


def test_looksam_on_device_stores_zeros_from_a_non_finite_or_degenerate_full_step():
    from lit_deltasam.core.amortized import Reuse

    for full in ([float("inf"), 1.0], [float("nan"), 1.0], [3.0, 1e-9]):
        with decisions_on_device():
            reuse = Reuse(alpha=1.0)
            reuse.record([torch.tensor(full, dtype=torch.float64)], [torch.tensor([1.0, 0.0], dtype=torch.float64)])
            assert torch.equal(reuse.direction[0], torch.zeros(2, dtype=torch.float64)), full
            grads = [torch.tensor([0.5, -1.0], dtype=torch.float64)]
            reuse.apply(grads)
        assert torch.equal(grads[0], torch.tensor([0.5, -1.0], dtype=torch.float64)), full  # a plain step


def test_a_gradient_autograd_shares_between_parameters_is_stored_once_per_parameter():
    """``x @ (a + b)``: autograd hands one tensor to a and b; LookSAM writes g_v over the plain gradients."""
    from torch import nn

    from lit_deltasam import DeltaSAM

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(6, 3)), nn.Parameter(torch.randn(6, 3))
            self.head = nn.Linear(3, 3)

        def losses(self, batch):
            x, y = batch
            return nn.functional.cross_entropy(self.head(x @ (self.a + self.b)), y, reduction="none")

    torch.manual_seed(0)
    model = Shared()
    engine = DeltaSAM(model, DeltaSAMConfig(method="deltasam", estimator="head"))
    result = engine.step(model.losses, batch(0), plain_grad=True)
    a, b = result.plain_grad[0], result.plain_grad[1]
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
