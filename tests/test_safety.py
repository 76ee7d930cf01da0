"""Weights, buffers and gradients survive every failure; BatchNorm and dropout interact correctly."""

import warnings

import pytest
import torch
from helpers import MLP, classification_data, with_rho

from lit_deltasam import DeltaSAM, DeltaSAMConfig, DeltaSAMOptimizer
from lit_deltasam.core.guardedness import Prober
from lit_deltasam.core.randomness import RandomState
from lit_deltasam.core.snapshot import Snapshot


class Boom(Exception):
    pass


def state_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def failing_on_call(model, fail_at, exc=Boom):
    """A per-sample loss that raises on its ``fail_at``-th call (1-based) after computing the forward."""
    calls = {"n": 0}

    def losses(batch):
        calls["n"] += 1
        out = model.losses(batch)
        if calls["n"] == fail_at:
            raise exc("injected")
        return out

    return losses


METHOD_CALLS = [
    # (config, call that runs at perturbed or probed weights)
    (dict(method="sam"), 2),
    (dict(method="asam"), 2),
    (dict(method="deltasam", estimator="head"), 2),
    (dict(method="deltasam", estimator="probe", probe_samples=2), 2),
    (dict(method="deltasam", estimator="probe", probe_samples=2), 4),
    (dict(method="deltasam", estimator="exact"), 3),
    (dict(method="per_instance"), 2),
]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("options,fail_at", METHOD_CALLS)
def test_exception_in_a_perturbed_forward_leaves_everything_bit_identical(options, fail_at, exc):
    torch.manual_seed(0)
    model = MLP(dropout=0.1)
    batch = classification_data(n=8)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    before = state_of(model)
    sam = DeltaSAM(model, DeltaSAMConfig(**with_rho(options, 0.5)))
    with pytest.raises(exc):
        sam.step(failing_on_call(model, fail_at, exc), batch)
    assert_bit_identical(model, before)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_exception_in_the_descent_backward_restores_weights_and_accumulated_grads():
    torch.manual_seed(0)
    model = MLP(batchnorm=True)
    batch = classification_data(n=8)
    sam = DeltaSAM(model, DeltaSAMConfig(method="sam", rho=0.5))
    sam.step(model.losses, batch)
    grads = [p.grad.clone() for p in model.parameters()]
    before = state_of(model)
    calls = {"n": 0}

    def backward(loss):
        calls["n"] += 1
        if calls["n"] == 2:
            model.net[0].weight.register_hook(lambda g: (_ for _ in ()).throw(Boom("in backward")))
        loss.backward()

    with pytest.raises(Boom):
        sam.step(model.losses, batch, backward=backward)
    assert_bit_identical(model, before)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def _policy_fields(opt):
    return {k: v for k, v in opt.driver.state.scalars().items() if k.startswith("policy_")}


def test_a_failed_step_under_the_adaptive_policy_leaves_its_moments_as_they_were():
    """AE-SAM's running moments of ||g||² take a step's norm when it decides; a step that raises after deciding (in
    its perturbed forward) must leave them, and the counts, as before, so that the retried batch counts once: the
    retried run then equals one that never failed (an independent tester found the moments advanced twice)."""
    config = DeltaSAMConfig(method="sam", rho=0.05, policy="adaptive")
    runs = {}
    for fail in (False, True):
        torch.manual_seed(0)
        model = MLP()
        opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), config, total_steps=6)
        for i in range(6):
            batch = classification_data(n=8, seed=i)
            if fail and i == 0:  # the first step is full: its moments start at 0
                before = _policy_fields(opt)
                with pytest.raises(Boom):
                    opt.step(failing_on_call(model, 2), batch)
                assert _policy_fields(opt) == before
            opt.step(model.losses, batch)
        runs[fail] = (torch.cat([p.detach().flatten() for p in model.parameters()]), opt.driver.state.scalars())
    assert runs[True][1]["policy_decided"] == 6
    assert torch.equal(runs[True][0], runs[False][0]) and runs[True][1] == runs[False][1]


def test_rollback_undoes_a_failed_optimizer_step():
    torch.manual_seed(0)
    model = MLP(batchnorm=True)
    before = state_of(model)
    sam = DeltaSAM(model, DeltaSAMConfig(method="deltasam", rho=0.5))
    sam.step(model.losses, classification_data(n=8))
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    sam.rollback()
    assert_bit_identical(model, before)


@pytest.mark.parametrize(
    "options",
    [dict(method="sam"), dict(method="deltasam", estimator="head"), dict(method="deltasam", estimator="probe")],
)
def test_batchnorm_statistics_are_those_of_the_clean_pass(options):
    torch.manual_seed(0)
    model = MLP(batchnorm=True)
    batch = classification_data(n=16)
    reference = MLP(batchnorm=True)
    reference.load_state_dict(model.state_dict())
    reference.losses(batch)  # one clean training-mode forward
    DeltaSAM(model, DeltaSAMConfig(**with_rho(options, 0.5))).step(model.losses, batch)
    bn, ref = model.net[1], reference.net[1]
    assert torch.equal(bn.running_mean, ref.running_mean)
    assert torch.equal(bn.running_var, ref.running_var)
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("share", [True, False])
def test_compared_forwards_share_dropout_masks(share):
    torch.manual_seed(0)
    model = MLP(dropout=0.5)
    batch = classification_data(n=32)
    result = DeltaSAM(model, DeltaSAMConfig(method="sam", rho=1e-6, share_dropout=share)).step(model.losses, batch)
    same = torch.allclose(result.losses, result.perturbed_losses, atol=1e-4, rtol=0)
    assert same == share


@pytest.mark.parametrize("share", [True, False])
def test_per_instance_loop_shares_masks_only_when_asked(share):
    torch.manual_seed(0)
    model = MLP(dropout=0.5)
    config = DeltaSAMConfig(method="per_instance", rho=1e-6, share_dropout=share)
    result = DeltaSAM(model, config).step(model.losses, classification_data(n=8))
    assert torch.allclose(result.losses, result.perturbed_losses, atol=1e-4, rtol=0) == share


def test_shared_masks_make_probe_deltas_noise_free():
    """With a vanishing probe radius the loss changes vanish only if the masks are shared."""
    torch.manual_seed(0)
    model = MLP(dropout=0.5).double()
    x, y = classification_data(n=16)
    batch = (x.double(), y)
    params = list(model.parameters())
    prober = Prober(params, samples=4, sigma=1e-9, antithetic=False)
    snapshot = Snapshot(params)
    snapshot.capture()
    scores = {}
    for share in (True, False):
        state = RandomState(torch.device("cpu"))
        state.capture()
        losses = model.losses(batch)
        scores[share] = prober.scores(model.losses, batch, losses, state if share else None, snapshot.restore)
    assert scores[True].max() < 1e-6
    assert scores[False].max() > 1e-2


def test_zero_gradient_gives_zero_perturbation():
    model = MLP()
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    x, _ = classification_data(n=4)
    result = DeltaSAM(model, DeltaSAMConfig(method="sam")).step(lambda b: (model(b[0]) * 0).sum(1), (x, x))
    assert not result.perturbed
    assert result.eps_norm.item() == 0.0


def test_non_finite_loss_is_reported_and_weights_stay():
    model = MLP()
    before = state_of(model)
    x, y = classification_data(n=4)
    result = DeltaSAM(model, DeltaSAMConfig(method="sam")).step(lambda b: model.losses(b) * float("nan"), (x, y))
    assert result.finite is False
    assert not result.perturbed
    assert_bit_identical(model, before)


def test_a_model_cast_after_the_engine_was_built_is_still_restored():
    torch.manual_seed(0)
    model = MLP()
    sam = DeltaSAM(model, DeltaSAMConfig(method="deltasam", rho=0.5))
    model.double()  # gives every parameter new storage
    x, y = classification_data(n=8)
    before = state_of(model)
    sam.step(model.losses, (x.double(), y))
    assert_bit_identical(model, before)


def test_vmap_refuses_to_give_an_instance_two_dropout_masks():
    model = MLP(dropout=0.2)
    config = DeltaSAMConfig(method="per_instance", per_instance_impl="vmap")
    with pytest.raises(ValueError, match="cannot give an instance the same dropout mask"):
        DeltaSAM(model, config).step(model.losses, classification_data(n=4))
    DeltaSAM(model, DeltaSAMConfig(method="per_instance")).step(model.losses, classification_data(n=4))


def test_probing_under_16_bit_autocast_warns_once():
    model = MLP()
    engine = DeltaSAM(model, DeltaSAMConfig(method="deltasam", estimator="probe"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(RuntimeWarning, match=r"probe estimator runs in torch.bfloat16"):
            engine.step(model.losses, classification_data(n=8))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            engine.step(model.losses, classification_data(n=8))


def test_a_buffer_the_model_reassigns_is_restored():
    class Reassigning(MLP):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls = self.calls + 1  # a new tensor, not an in-place update
            return super().forward(x)

    model = Reassigning()
    DeltaSAM(model, DeltaSAMConfig(method="sam")).step(model.losses, classification_data(n=8))
    assert model.calls.item() == 1  # the clean forward's update only


def test_a_non_finite_gradient_of_an_unperturbed_parameter_is_reported():
    model = MLP()
    model.net[0].weight.register_hook(lambda g: g * float("inf"))
    engine = DeltaSAM(model, DeltaSAMConfig(method="sam"), params=list(model.net[-1].parameters()))
    assert engine.step(model.losses, classification_data(n=8)).finite is False


def test_probing_16_bit_weights_warns():
    model = MLP().bfloat16()
    x, y = classification_data(n=8)
    with pytest.warns(RuntimeWarning, match=r"probe estimator runs in torch.bfloat16"):
        DeltaSAM(model, DeltaSAMConfig(method="deltasam", estimator="probe")).step(model.losses, (x.bfloat16(), y))


def test_eps_norm_is_what_16_bit_weights_moved():
    """bf16 weights round a small eps: the logged norm is the rounded move, with a warning."""
    torch.manual_seed(0)
    model = MLP().bfloat16()
    x, y = classification_data()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(8.0)  # large weights: bf16's spacing there is 1/16 per element
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def losses(batch):
        seen.append([p.detach().clone() for p in model.parameters()])
        return model.losses(batch)

    with pytest.warns(RuntimeWarning, match=r"the weights are torch.bfloat16: the perturbation of norm rho=0.05"):
        result = DeltaSAM(model, DeltaSAMConfig(method="sam", rho=0.05)).step(losses, (x.bfloat16(), y))
    moved = torch.cat([(a.float() - b.float()).reshape(-1) for a, b in zip(seen[-1], before)]).norm()
    assert result.eps_norm.item() == pytest.approx(moved.item(), rel=1e-2)
    assert abs(result.eps_norm.item() - 0.05) > 0.01


class FakeAccelerator:
    """Stands in for torch.mps / torch.xpu: a generator state per device."""

    def __init__(self):
        self.state = torch.tensor([1, 2, 3], dtype=torch.uint8)
        self.calls = []

    def get_rng_state(self, device):
        self.calls.append(("get", device.type))
        return self.state.clone()

    def set_rng_state(self, state, device):
        self.calls.append(("set", device.type))
        self.state = state.clone()

    def manual_seed(self, seed):
        self.calls.append(("seed", seed))


def test_the_random_state_of_other_accelerators_is_replayed(monkeypatch):
    """share_dropout and seed_steps reach the generator of MPS, XPU and other device modules, not only CUDA's."""
    from lit_deltasam.core.randomness import RandomState

    fake = FakeAccelerator()
    monkeypatch.setattr(torch, "get_device_module", lambda kind: fake)
    state = RandomState(torch.device("xpu"))
    state.capture()
    fake.state = torch.tensor([9, 9, 9], dtype=torch.uint8)  # the device draws
    state.restore()
    assert fake.calls == [("get", "xpu"), ("set", "xpu")]
    assert torch.equal(fake.state, torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_a_device_without_a_controllable_generator_is_named(monkeypatch):
    from lit_deltasam.core.randomness import RandomState

    monkeypatch.setattr(torch, "get_device_module", lambda kind: object())
    with pytest.raises(NotImplementedError, match=r"device type 'xpu'.*set share_dropout=False and seed_steps=False"):
        RandomState(torch.device("xpu"))
