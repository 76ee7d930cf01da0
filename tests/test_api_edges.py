"""The API's edges (issue 36): decisions on the device against their host twins on non-finite input, a loss scaler
in the plain loop, radii and settings that would otherwise be ignored."""

import copy
import dataclasses
import math

import lightning as L
import pytest
import torch
from helpers import (
    EXACT_WEIGHTS,
    MLP,
    LeastSquares,
    classification_data,
    flat_params,
    least_squares_problem,
    loader,
    ls_grad,
    ls_instance_grads,
    sam_step_by_hand,
    trainer,
)

from lit_deltasam import DeltaSAM, DeltaSAMConfig, DeltaSAMOptimizer
from lit_deltasam.core.decisions import decisions_on_device


def _batch(n=16, seed=1):
    x, y = classification_data(n=n, seed=seed)
    return x, y


class OverflowingAscent:
    """A backward that overflows the first pass of each step (the ascent), as a loss scaler's would."""

    def __init__(self):
        self.calls = 0

    def __call__(self, loss):
        self.calls += 1
        (loss * math.inf if self.calls == 1 else loss).backward()


ASCENT_CASES = {
    "sam": dict(method="sam"),
    "asam": dict(method="asam"),
    "deltasam": dict(method="deltasam", estimator="head"),
}


@pytest.mark.parametrize("options", ASCENT_CASES.values(), ids=ASCENT_CASES)
def test_an_overflowing_ascent_descends_at_w_on_the_device_as_on_the_host(options):
    """eps = 0 and G = the plain gradient at w on both paths; before the fix the device path added inf * 0 = NaN."""
    grads = {}
    for on_device in (False, True):
        torch.manual_seed(0)
        model = MLP()
        engine = DeltaSAM(model, DeltaSAMConfig(rho_schedule="constant", **options))
        with decisions_on_device(on_device):
            result = engine.step(model.losses, _batch(), backward=OverflowingAscent(), check_finite=False)
        assert not bool(result.perturbed) and float(result.eps_norm) == 0.0
        grads[on_device] = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.manual_seed(0)
    plain = MLP()
    plain.losses(_batch()).mean().backward()
    expected = torch.cat([p.grad.flatten() for p in plain.parameters()])
    assert torch.isfinite(grads[True]).all()
    torch.testing.assert_close(grads[True], grads[False], rtol=0, atol=0)
    torch.testing.assert_close(grads[False], expected, rtol=0, atol=0)


# ---- nothing set is silently ignored ----

UNUSED = [
    (dict(method="sam", beta=-1.0), "beta=-1.0 does nothing with method='sam'"),
    (dict(method="sam", estimator="exact"), "estimator='exact' does nothing with method='sam'"),
    (dict(method="sam", weighted_descent=True), "weighted_descent=True does nothing with method='sam'"),
    (dict(method="sam", probe_params=["net.0.*"]), "probe_params=\\['net.0.\\*'\\] does nothing with method='sam'"),
    (dict(method="sam", per_instance_chunk=4), "per_instance_chunk=4 does nothing with method='sam'"),
    (dict(method="sam", asam_eta=0.1), "asam_eta=0.1 does nothing with method='sam'"),
    (dict(method="gsam", asam_scope="weights"), "asam_scope='weights' does nothing .* with asam_eta set"),
    (dict(method="deltasam", beta=0.0, estimator="probe"), "estimator='probe' does nothing with .*beta=0.0"),
    (dict(method="deltasam", estimator="head", probe_params=["x*"]), "probe_params=\\['x\\*'\\] does nothing"),
    (dict(method="deltasam", head="net.3", estimator="probe"), "head='net.3' does nothing"),
    (dict(method="sam", rho_warmup=5), "rho_warmup=5 does nothing"),
    (dict(method="sam", reuse_alpha=0.5), "reuse_alpha=0.5 does nothing"),
    (dict(method="per_instance", per_instance_chunk=4), "per_instance_chunk=4 does nothing"),
]


@pytest.mark.parametrize("options, match", UNUSED, ids=[str(o) for o, _ in UNUSED])
def test_a_setting_the_method_never_reads_is_refused_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        DeltaSAMConfig(**options)


def test_erm_the_baseline_of_a_sweep_warns_of_the_method_fields_it_ignores():
    with pytest.warns(
        UserWarning, match=r"method='erm'\) takes plain steps: rho=0.05, rho_schedule='constant', beta=-1.0 have no"
    ):
        config = DeltaSAMConfig(method="erm", rho=0.05, rho_schedule="constant", beta=-1.0)
    assert config.rho == 0.05 and not config.perturbs
    with pytest.warns(UserWarning, match=r"takes plain steps: gsam_alpha=0.3 has no effect") as caught:
        DeltaSAMConfig(method="erm", gsam_alpha=0.3)
    from hydra.utils import instantiate

    with pytest.warns(UserWarning, match="gsam_alpha=0.3 has no effect") as built:  # as the CLI builds it
        instantiate({"_target_": "lit_deltasam.DeltaSAMConfig", "method": "erm", "gsam_alpha": 0.3})
    assert caught[0].filename == built[0].filename == __file__  # where the config was written, not Hydra's file


def test_unset_fields_take_per_method_defaults_and_round_trip():
    assert DeltaSAMConfig(method="asam").rho == 0.5 and DeltaSAMConfig(method="sam").rho == 0.02
    assert DeltaSAMConfig(method="erm").rho is None
    d = DeltaSAMConfig()
    assert (d.beta, d.estimator, d.weight_floor, d.weight_min, d.weight_max) == (-0.5, "head", 0.1, 0.1, 10.0)
    assert DeltaSAMConfig(method="sam").beta is None and DeltaSAMConfig(method="asam").asam_eta == 0.01
    for cfg in (d, DeltaSAMConfig(method="sam"), DeltaSAMConfig(method="asam", beta=-1.0)):
        assert dataclasses.replace(cfg) == cfg


def test_asam_with_beta_is_an_adaptive_deltasam_in_closed_form():
    """eps = rho T² g_λ / ||T g_λ|| with g_λ = Σ λ_i g_i and λ_i ∝ ||g_i||^β (exact scores, no bounds)."""
    x, y, w = least_squares_problem()
    eta, beta, rho, lr = 0.01, -1.0, 0.1, 0.05
    config = DeltaSAMConfig(method="asam", rho=rho, asam_eta=eta, beta=beta, estimator="exact", **EXACT_WEIGHTS)
    model = LeastSquares(w)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    result = DeltaSAM(model, config).step(model.losses, (x, y))
    opt.step()
    g_i = ls_instance_grads(x, y, w)
    lam = g_i.norm(dim=1) ** beta
    lam = lam / lam.sum()
    g = (lam[:, None] * g_i).sum(0)
    t = w.abs() + eta
    eps = rho * t * t * g / (t * g).norm()
    torch.testing.assert_close(model.w.detach(), w - lr * ls_grad(x, y, w + eps), atol=1e-9, rtol=0)
    torch.testing.assert_close(result.weights, lam)


class AffineLeastSquares(torch.nn.Module):
    """l_i = (x_i·w + b - y_i)² / 2: a weight and a bias, for ASAM's two conventions."""

    def __init__(self, w, b):
        super().__init__()
        self.weight = torch.nn.Parameter(w.clone())
        self.bias = torch.nn.Parameter(b.clone())

    def losses(self, batch):
        x, y = batch
        return 0.5 * (x @ self.weight + self.bias - y) ** 2


@pytest.mark.parametrize("scope", ["all", "weights"])
def test_asam_scales_biases_as_its_scope_says(scope):
    """``all``: T = |w| + eta on the bias too (ours); ``weights``: T = 1 on the bias (the ASAM authors' code)."""
    x, y, w = least_squares_problem()
    b = torch.tensor([0.3], dtype=torch.float64)
    eta, rho = 0.01, 0.1
    model = AffineLeastSquares(w, b)
    DeltaSAM(model, DeltaSAMConfig(method="asam", rho=rho, asam_eta=eta, asam_scope=scope)).step(model.losses, (x, y))

    def grads(v, c):
        r = x @ v + c - y
        return x.T @ r / len(y), r.mean().reshape(1)

    gw, gb = grads(w, b)
    tw = w.abs() + eta
    tb = b.abs() + eta if scope == "all" else torch.ones_like(b)
    norm = torch.cat([tw * gw, tb * gb]).norm()
    ew, eb = rho * tw * tw * gw / norm, rho * tb * tb * gb / norm
    expected_w, expected_b = grads(w + ew, b + eb)
    torch.testing.assert_close(model.weight.grad, expected_w, atol=1e-12, rtol=0)
    torch.testing.assert_close(model.bias.grad, expected_b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("rho", [-0.05, math.nan, math.inf])
def test_the_engine_refuses_a_radius_that_is_not_a_finite_non_negative_number(rho):
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"rho={rho!r}"):
        DeltaSAM(model, DeltaSAMConfig(method="sam")).step(model.losses, _batch(), rho=rho)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---- DeltaSAMOptimizer: a loss scaler, a closure, a torch.optim.Optimizer ----


def _sam(options=None, scaler=None, lr=0.1, seed=0):
    torch.manual_seed(seed)
    model = MLP()
    config = DeltaSAMConfig(**(options or dict(method="sam", rho=0.05, rho_schedule="constant")))
    return model, DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr), config, scaler=scaler)


@pytest.mark.parametrize(
    "options",
    [
        dict(method="sam", rho=0.05, rho_schedule="constant"),
        dict(method="asam", rho_schedule="constant"),
        dict(method="deltasam", rho_schedule="constant"),
        dict(method="sam", m_sharpness=4, rho_schedule="constant", gradient_clip_val=0.05),
        dict(method="gsam", rho=0.05, rho_schedule="constant", gradient_clip_val=0.05),
        dict(method="wsam", rho=0.05, rho_schedule="constant"),
        dict(method="fsam", rho=0.05, rho_schedule="constant", fsam_sigma=0.5),
        dict(method="sam", rho=0.05, rho_schedule="constant", gradient_centralization=True),
        dict(method="gsam", rho=0.05, rho_schedule="constant", beta=-0.5),
        dict(method="fsam", rho=0.05, rho_schedule="constant", beta=-0.5),
        dict(method="wsam", rho=0.05, rho_schedule="constant", wsam_decouple=False),
    ],
    ids=[
        "sam",
        "asam",
        "deltasam",
        "m-sam+clip",
        "gsam+clip",
        "wsam",
        "fsam",
        "gc-sam",
        "δ-gsam",
        "δ-fsam",
        "wsam-coupled",
    ],
)
def test_a_grad_scaler_gives_the_unscaled_step(options):
    """Scaling by 2**10 is exact in floating point: the weights equal the unscaled run's after 3 steps (before the
    fix the base optimizer stepped on the scaled G, a 1,000x update, and clipping acted on it)."""
    trained = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        model, opt = _sam(options, scaler)
        for i in range(3):
            result = opt.step(model.losses, _batch(seed=i))
            assert result.stepped
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        if scaler is not None:
            assert result.grad_norm is not None and result.grad_norm < 100  # reported unscaled
    torch.testing.assert_close(trained[1], trained[0], rtol=0, atol=1e-7)


def test_a_grad_scaler_skips_an_overflowing_step_and_backs_off():
    model, opt = _sam(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    opt.step(model.losses, _batch())
    before = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(seed=2)
    x[0] = math.inf
    result = opt.step(model.losses, (x, y))
    # a step the scaler skipped counts, as in Lightning's global_step (tests/test_loop_edges.py)
    assert result.stepped and opt.steps == 2 and opt.scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["sam", "deltasam"])
def test_looksam_stores_no_direction_from_a_full_step_the_scaler_skipped(method):
    """An inf on LookSAM's full step: the scaler skips it, nothing is stored, and the plain step after it is a plain
    step (finite weights, no stale direction added); the next full step stores a finite direction again."""
    options = dict(method=method, rho=0.05, rho_schedule="constant", interval=2, reuse="looksam")
    model, opt = _sam(options, torch.amp.GradScaler("cpu", init_scale=2.0**10))
    for i in range(2):
        opt.step(model.losses, _batch(seed=i))
    assert opt.loop_state.reuse_direction is not None
    x, y = _batch(seed=2)
    x[0] = math.inf
    assert opt.step(model.losses, (x, y)).full_step and opt.scaler.get_scale() == 2.0**9
    assert opt.loop_state.reuse_direction is None
    before = [p.detach().clone() for p in model.parameters()]
    plain_model, plain = _sam(dict(method="erm"))
    plain_model.load_state_dict(model.state_dict())
    assert not opt.step(model.losses, _batch(seed=3)).full_step
    plain.step(plain_model.losses, _batch(seed=3))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain_model.parameters()))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt.step(model.losses, _batch(seed=4))
    assert all(torch.isfinite(d).all() for d in opt.loop_state.reuse_direction)


@pytest.mark.parametrize("method", ["gsam", "wsam", "fsam"])
def test_a_grad_scaler_skips_the_familys_rule_with_an_overflowing_step(method):
    """An inf in one gradient: the scaler skips the base step, and with it WSAM's sharpness term (applied after the
    base step: the weights stay bit for bit) and Friendly-SAM's update of its running mean (unchanged); the next
    finite step runs the rule again."""
    model, opt = _sam(
        dict(method=method, rho=0.05, rho_schedule="constant"), torch.amp.GradScaler("cpu", init_scale=2.0**10)
    )
    opt.step(model.losses, _batch())
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [m.clone() for m in opt.loop_state.fsam_momentum] if method == "fsam" else None
    x, y = _batch(seed=2)
    x[0] = math.inf
    result = opt.step(model.losses, (x, y))
    assert result.stepped and opt.scaler.get_scale() == 2.0**9
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if momentum is not None:
        assert all(torch.equal(a, b) for a, b in zip(opt.loop_state.fsam_momentum, momentum))
    opt.step(model.losses, _batch(seed=3))
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert torch.isfinite(flat_params(model)).all()
    if momentum is not None:
        assert not all(torch.equal(a, b) for a, b in zip(opt.loop_state.fsam_momentum, momentum))
        assert all(torch.isfinite(m).all() for m in opt.loop_state.fsam_momentum)


def test_a_scaler_and_a_backward_of_ones_own_are_refused():
    model, opt = _sam(scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ValueError, match="backward= and the optimizer has a scaler"):
        opt.step(model.losses, _batch(), backward=lambda loss: loss.backward())


@pytest.mark.parametrize("method", ["sam", "asam", "erm"])
def test_a_closure_or_a_scalar_loss_trains_the_per_instance_losses_weights(method):
    """torch's step(closure) and a scalar mean loss give the weights of per-instance losses, bit for bit."""
    options = dict(method=method, rho_schedule="constant") if method != "erm" else dict(method="erm")
    trained = []
    for kind in ("per-instance", "scalar", "closure"):
        model, opt = _sam(options)
        for i in range(3):
            batch = _batch(seed=i)
            if kind == "per-instance":
                opt.step(model.losses, batch)
            elif kind == "scalar":
                opt.step(lambda b, model=model: model.losses(b).mean(), batch)
            else:

                def closure(batch=batch, model=model, opt=opt):
                    opt.zero_grad()
                    loss = model.losses(batch).mean()
                    loss.backward()
                    return loss

                result = opt.step(closure)
                assert result.stepped and result.perturbed_loss is not None or method == "erm"
        trained.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(trained[1], trained[0], rtol=0, atol=0)
    torch.testing.assert_close(trained[2], trained[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "options", [dict(method="deltasam"), dict(method="gsam", beta=-0.5), dict(method="per_instance")]
)
def test_a_scalar_loss_is_refused_where_the_method_needs_one_loss_per_instance(options):
    model, opt = _sam(options)
    with pytest.raises(ValueError, match="scalar mean loss serves every method but per_instance, and none with beta"):
        opt.step(lambda b: model.losses(b).mean(), _batch())


@pytest.mark.parametrize("method", ["gsam", "wsam", "fsam"])
def test_a_scalar_loss_serves_the_family(method):
    """As the refusal above says: without beta the family takes one scalar mean loss, to the same weights."""
    trained = []
    for scalar in (False, True):
        model, opt = _sam(dict(method=method, rho=0.05, rho_schedule="constant"))
        for i in range(3):
            opt.step((lambda b, m=model: m.losses(b).mean()) if scalar else model.losses, _batch(seed=i))
        trained.append(flat_params(model))
    torch.testing.assert_close(trained[1], trained[0], rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(method="sam", accumulate_grad_batches=2), "accumulate_grad_batches=2"),
        (dict(method="sam", m_sharpness=4), "m_sharpness=4"),
        (dict(method="deltasam"), "per-instance losses"),
    ],
)
def test_a_closure_refuses_what_it_cannot_run(options, match):
    model, opt = _sam(options)
    with pytest.raises(ValueError, match=match):
        opt.step(lambda: model.losses(_batch()).mean())


def test_a_closure_refuses_gradients_left_in_grad():
    """Lightning's accumulation passes only the window's last closure, after the earlier backwards."""
    model, opt = _sam()
    model.losses(_batch()).mean().backward()
    with pytest.raises(ValueError, match="found gradients already in .grad"):
        opt.step(lambda: model.losses(_batch()).mean())


def test_a_step_without_a_closure_names_lightnings_16_mixed():
    """GradScaler.step(optimizer) calls optimizer.step() with nothing: Lightning's 16-mixed under automatic
    optimization."""
    model, opt = _sam()
    with pytest.raises(TypeError, match="16-mixed"):
        opt.step()


def test_lr_schedulers_accept_the_optimizer_and_move_the_base_lr():
    model, opt = _sam()
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.optimizer.param_groups
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for i in range(2):
        opt.step(model.losses, _batch(seed=i))
        scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)


class AutomaticSAM(L.LightningModule):
    """A plain LightningModule that returns DeltaSAMOptimizer from configure_optimizers (automatic optimization)."""

    def __init__(self, config):
        super().__init__()
        torch.manual_seed(0)
        self.model = MLP()
        self.config = config

    def training_step(self, batch, batch_idx):
        return self.model.losses(batch).mean()

    def configure_optimizers(self):
        sam = DeltaSAMOptimizer(self, torch.optim.SGD(self.parameters(), lr=0.1), self.config)
        return {"optimizer": sam, "lr_scheduler": torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.7)}


@pytest.mark.parametrize("method", ["sam", "asam", "gsam", "wsam", "fsam"])
def test_automatic_optimization_trains_the_plain_loops_weights(method):
    """Returned from configure_optimizers, with a StepLR: the weights of the hand-written loop, bit for bit (the
    family's rules, WSAM's term after the base step and F-SAM's running mean, included)."""
    config = DeltaSAMConfig(method=method, rho_schedule="constant")
    module = AutomaticSAM(config)
    trainer(max_epochs=2).fit(module, loader(n=32, batch_size=8))
    torch.manual_seed(0)
    model = MLP()
    sam = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    scheduler = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.7)
    for _ in range(2):
        for batch in loader(n=32, batch_size=8):
            sam.step(model.losses, batch)
        scheduler.step()
    torch.testing.assert_close(flat_params(module.model), flat_params(model), rtol=0, atol=0)


@pytest.mark.parametrize(
    "options",
    [dict(method="gsam"), dict(method="wsam"), dict(method="fsam"), dict(method="sam", reuse="looksam", interval=2)],
)
def test_automatic_optimization_refuses_lightnings_clipping_where_the_clean_gradient_is_read(options):
    """Lightning clips after each closure evaluation, the clean one at w too: the rules that read it (GSAM's, WSAM's,
    Friendly-SAM's, LookSAM's) would not be the method's (an independent tester measured WSAM 3e-2 off the plain
    loop's weights). SAM's ε only takes the clipped gradient's direction, unchanged by norm clipping: it runs."""
    config = DeltaSAMConfig(rho_schedule="constant", **options)
    with pytest.raises(ValueError, match=r"Trainer\(gradient_clip_val=0.1\) clips the gradient after each closure"):
        trainer(max_epochs=1, gradient_clip_val=0.1).fit(AutomaticSAM(config), loader(n=16, batch_size=8))
    trainer(max_epochs=1, gradient_clip_val=0.1).fit(AutomaticSAM(DeltaSAMConfig(method="sam")), loader(n=16))


def test_automatic_optimization_with_accumulation_is_refused_by_name():
    module = AutomaticSAM(DeltaSAMConfig(method="sam"))
    with pytest.raises(ValueError, match="found gradients already in .grad"):
        trainer(max_epochs=1, accumulate_grad_batches=2).fit(module, loader(n=32, batch_size=8))


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_the_mixin_refuses_strategies_a_double_step_cannot_run_under(kind):
    """Lightning's FSDPStrategy (FSDP1) failed the first step on a GPU with use_orig_params True and False."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from lit_deltasam.lightning.mixin import refuse_strategy

    strategy = FSDPStrategy() if kind == "fsdp" else DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    match = "does not support FSDPStrategy \\(FSDP1\\)" if kind == "fsdp" else "does not support DeepSpeedStrategy"
    with pytest.raises(NotImplementedError, match=match):
        refuse_strategy(strategy)
    refuse_strategy(SimpleNamespace())  # anything else runs


def test_replace_refills_the_defaults_for_a_new_method_from_what_was_given():
    """DeltaSAMConfig() gave nothing: its filled-in beta and estimator must not count as set for SAM (found by an
    independent tester: replace() treated an empty record like a config from an old checkpoint)."""
    assert DeltaSAMConfig().replace(method="sam").beta is None
    assert DeltaSAMConfig(method="deltasam").replace(method="asam").rho == 0.5
    assert DeltaSAMConfig(method="sam", rho=0.05).replace(method="asam").rho == 0.05


def test_a_scheduler_on_the_wrapper_moves_the_base_lr_after_a_resume():
    """load_state_dict swaps the base optimizer's param_groups: the wrapper must share the new ones, so that a
    resumed loop with a scheduler built on the wrapper ends where an uninterrupted one does."""

    def run(stop=None, saved=None):
        model, opt = _sam()
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        start = 0
        if saved is not None:
            opt.load_state_dict(saved["opt"])
            scheduler.load_state_dict(saved["scheduler"])
            model.load_state_dict(saved["model"])
            start = saved["done"]
        for i in range(start, 6):
            opt.step(model.losses, _batch(seed=i))
            scheduler.step()
            if i + 1 == stop:
                return {
                    "opt": opt.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "model": model.state_dict(),
                    "done": stop,
                }
        return flat_params(model), opt.optimizer.param_groups[0]["lr"]

    (weights, lr), (resumed, resumed_lr) = run(), run(saved=run(stop=3))
    assert resumed_lr == lr == pytest.approx(0.1 * 0.5**6)
    assert torch.equal(resumed, weights)
    _, opt = _sam()
    with pytest.raises(ValueError, match="takes what DeltaSAMOptimizer.state_dict\\(\\) returned"):
        opt.load_state_dict(torch.optim.SGD(MLP().parameters(), lr=0.1).state_dict())


LARGE_SCALE_CASES = {
    "sam": dict(method="sam", rho=0.05),
    "asam": dict(method="asam", rho=0.5),
    "m-sam loop": dict(method="sam", rho=0.05, m_sharpness=4, group_impl="loop"),
    "m-sam batched": dict(method="sam", rho=0.05, m_sharpness=4, group_impl="batched"),
    "m-asam batched": dict(method="asam", rho=0.5, m_sharpness=4, group_impl="batched"),
    "per-instance": dict(method="per_instance", rho=0.05),  # its instance gradients are not scaled: a control
}


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
@pytest.mark.parametrize("case", LARGE_SCALE_CASES)
def test_a_large_loss_scale_still_perturbs_when_only_the_norms_square_overflows(case, on_device):
    """At a GradScaler scale of 2**70 the scaled ascent gradient is finite but its squares overflow fp32: both paths
    must still take eps, and report the unscaled ||g|| (found by an independent tester: SAM silently became ERM;
    the device path and batched groups did so until they scaled the gradient by a power of two first)."""
    trained, norms = [], []
    options = dict(rho_schedule="constant", **LARGE_SCALE_CASES[case])
    method = options["method"] if "m_sharpness" not in options else "groups"
    for scale in (None, 2.0**70):
        scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=10**6)
        model, opt = _sam(options, scaler=scaler)
        with decisions_on_device(on_device):
            result = opt.step(model.losses, _batch())
        assert bool(result.perturbed) and float(result.sharpness) != 0
        if method == "sam":
            assert float(result.eps_norm) == pytest.approx(0.05)
        if result.grad_norm is not None:  # per-instance SAM has no one ||g||
            norms.append(float(result.grad_norm))  # DeltaSAMOptimizer reports it unscaled
        trained.append(flat_params(model))
    if norms:
        assert norms[1] == pytest.approx(norms[0], rel=1e-6)
    torch.testing.assert_close(trained[1], trained[0], rtol=1e-6, atol=1e-7)


def test_the_overflow_rescue_is_bit_for_bit_a_no_op_where_nothing_overflows():
    """On the device path the rescue runs every step (reading no value); where the squares did not overflow it must
    leave the gradient and the norm exactly as they were, so that training stays what it was."""
    from lit_deltasam.core.norms import total_norm, unoverflow_

    torch.manual_seed(0)
    tensors = [torch.randn(5, 3) * 1e3, torch.randn(7), torch.empty(0)]
    before = [t.clone() for t in tensors]
    norm = total_norm(tensors)
    rescued, power = unoverflow_(tensors, norm)
    assert float(power) == 1.0 and torch.equal(rescued, norm)
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    big = [t * 2.0**70 for t in before]
    rescued, power = unoverflow_(big, total_norm(big))
    assert math.log2(float(power)) == -(70 + math.frexp(max(float(t.abs().max()) for t in before[:2]))[1])
    assert float(rescued / power) == pytest.approx(float(norm) * 2.0**70, rel=1e-6)
    nonfinite = [torch.tensor([math.inf, 1.0])]
    assert float(unoverflow_(nonfinite, total_norm(nonfinite))[1]) == 1.0


def test_a_state_saved_under_another_loop_is_refused():
    model, saver = _sam(dict(method="sam", accumulate_grad_batches=3))
    saver.step(model.losses, _batch())  # an open window: its partial gradients are in the state
    _, loader_opt = _sam(dict(method="deltasam"))
    with pytest.raises(ValueError, match="saved with .*'accumulate_grad_batches': 3"):
        loader_opt.load_state_dict(saver.state_dict())


@pytest.mark.parametrize("method", ["sam", "asam"])
def test_the_plain_loop_under_bf16_autocast_takes_the_textbook_step(method):
    """DeltaSAMOptimizer.step inside torch.autocast(bfloat16), as a plain loop runs it: three steps give the weights of
    SAM / ASAM written out by hand under the same autocast (fp32 weights, bf16 matmuls), and differ from fp32's."""
    rho, eta = (0.05, 0.0) if method == "sam" else (0.5, 0.01)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def by_hand():
        torch.manual_seed(0)
        model = MLP()
        base = torch.optim.SGD(model.parameters(), lr=0.1)

        def loss(i):
            with autocast:
                return model.losses(_batch(seed=i)).mean()

        for i in range(3):
            sam_step_by_hand(lambda i=i: loss(i), base, rho, eta if method == "asam" else None)
        return flat_params(model)

    def ours(precision):
        options = dict(method=method, rho=rho, rho_schedule="constant")
        if method == "asam":
            options["asam_eta"] = eta
        model, opt = _sam(options)
        for i in range(3):
            with autocast if precision == "bf16" else torch.autocast("cpu", enabled=False):
                opt.step(model.losses, _batch(seed=i))
        assert all(p.dtype == torch.float32 for p in model.parameters())
        return flat_params(model)

    expected, half, full = by_hand(), ours("bf16"), ours("fp32")
    torch.testing.assert_close(half, expected, rtol=0, atol=1e-6)
    assert (half - full).abs().max() > 1e-5  # autocast was in force: bf16 rounding shows (fp32 agrees to 1e-8)


@pytest.mark.parametrize(
    "options",
    [
        dict(method="deltasam"),
        dict(method="sam", m_sharpness=4, group_impl="loop"),
        dict(method="sam", m_sharpness=4, group_impl="batched"),
        dict(method="per_instance"),
        dict(method="sam", interval=2, reuse="looksam"),
    ],
    ids=["deltasam", "m-sam loop", "m-sam batched", "per-instance", "looksam"],
)
def test_a_step_inside_one_autocast_region_perturbs_as_without_the_cast_cache(options):
    """One ``torch.autocast`` around the whole step (its cache on, the default): every pass must see the weights as
    they are then, as with the cache off (Lightning's own autocast); before the fix the cache served the first
    forward's bf16 copies of w to the descent, an ERM step."""
    trained = {}
    for cache in (True, False):
        model, opt = _sam(dict(rho=0.05, rho_schedule="constant", **options))
        for i in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache):
                opt.step(model.losses, _batch(seed=i))
        trained[cache] = flat_params(model)
    torch.testing.assert_close(trained[True], trained[False], rtol=0, atol=0)


@pytest.mark.parametrize("through", ["base", "wrapper"])
def test_a_group_added_mid_training_is_perturbed_and_stepped_like_the_others(through):
    """Progressive unfreezing: the backbone joins the optimizer after two steps (added to the base optimizer, as
    Lightning's BackboneFinetuning does, or to the wrapper). The third step must be SAM over every parameter,
    written out by hand (before the fix the new parameters kept their ascent gradient in G)."""
    rho = 0.05

    def fresh():
        torch.manual_seed(0)
        model = MLP()
        first = model.net[0]
        for p in first.parameters():
            p.requires_grad_(False)
        return model, first

    def unfreeze(model, first, base, opt):
        for p in first.parameters():
            p.requires_grad_(True)
        (base if through == "base" else opt).add_param_group({"params": list(first.parameters())})

    model, first = fresh()
    base = torch.optim.SGD(model.net[-1].parameters(), lr=0.1)
    opt = DeltaSAMOptimizer(model, base, DeltaSAMConfig(method="sam", rho=rho, rho_schedule="constant"))
    for i in range(3):
        if i == 2:
            unfreeze(model, first, base, opt)
        opt.step(model.losses, _batch(seed=i))
    assert len(opt.param_groups) == 2 and opt.param_groups is base.param_groups

    expected, first = fresh()
    hand = torch.optim.SGD(expected.net[-1].parameters(), lr=0.1)
    for i in range(3):
        if i == 2:
            unfreeze(expected, first, hand, hand)
        sam_step_by_hand(lambda i=i: expected.losses(_batch(seed=i)).mean(), hand, rho)
    torch.testing.assert_close(flat_params(model), flat_params(expected), rtol=0, atol=1e-7)


def test_a_state_loaded_into_the_base_optimizer_keeps_the_wrappers_scheduler_in_charge():
    """torch's load_state_dict gives the base optimizer new param_groups; a scheduler built on the wrapper must go
    on moving the base's LR (found by an independent tester: the base stepped at the old LR)."""
    model, opt = _sam()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.optimizer.load_state_dict(opt.optimizer.state_dict())
    for i in range(3):
        opt.step(model.losses, _batch(seed=i))
        scheduler.step()
    assert opt.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert opt.param_groups is opt.optimizer.param_groups and opt.state is opt.optimizer.state


def test_a_disabled_grad_scaler_leaves_the_non_finite_skip_on():
    """GradScaler(enabled=False) (what GradScaler() gives without CUDA) checks nothing: the step's own check must
    still skip a NaN loss (found by an independent tester: the weights became NaN)."""
    for scaler in (None, torch.amp.GradScaler("cpu", enabled=False)):
        model, opt = _sam(scaler=scaler)
        before = flat_params(model)
        with pytest.warns(RuntimeWarning, match="non-finite loss or gradient"):
            result = opt.step(lambda b, model=model: model.losses(b) * math.nan, _batch())
        assert not result.stepped and opt.steps == 0 and torch.equal(flat_params(model), before)


def test_the_reported_grad_norm_is_unscaled_by_the_scale_its_passes_used():
    """The scale grows after every step here (growth_interval=1): ||g|| must be divided by the scale the ascent
    ran at, not the one after the update (found by an independent tester: half the value on every growth)."""
    norms = {}
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1)):
        model, opt = _sam(scaler=scaler)
        norms[scaler is None] = [float(opt.step(model.losses, _batch(seed=i)).grad_norm) for i in range(3)]
        assert scaler is None or scaler.get_scale() == 2.0**11
    assert norms[False] == pytest.approx(norms[True], rel=1e-6)


def test_a_backward_before_step_is_refused_and_zeroed_gradients_are_not():
    """davda54/sam's loop runs loss.backward() before first_step; here the step runs both passes, and the stale
    gradient would be added to G (found by an independent tester: ||G|| 1.24 against 0.63, silently)."""
    model, opt = _sam()
    model.losses(_batch()).mean().backward()
    with pytest.raises(ValueError, match="found gradients already in .grad at the start of optimizer step 0"):
        opt.step(model.losses, _batch())
    assert all(p.grad is not None for p in model.parameters())  # refused before anything ran
    opt.zero_grad(set_to_none=False)
    reference, ref_opt = _sam()
    for i in range(2):
        opt.step(model.losses, _batch(seed=i))
        opt.zero_grad(set_to_none=False)
        ref_opt.step(reference.losses, _batch(seed=i))
    assert torch.equal(flat_params(model), flat_params(reference))


def test_m_sharpness_with_a_scalar_loss_reports_the_batch_means_when_m_does_not_divide_n():
    """n = 10, m = 4: groups of 4, 4 and 2. A scalar loss gives each group's mean; the reported loss and sharpness
    must weigh them by size, as the per-instance losses do (found by an independent tester: plain means of the
    three group means)."""
    results, trained = {}, {}
    for reduction in ("none", "mean"):
        model, opt = _sam(dict(method="sam", rho=0.05, rho_schedule="constant", m_sharpness=4))

        def loss_fn(batch, model=model, reduction=reduction):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y, reduction=reduction)

        results[reduction] = opt.step(loss_fn, _batch(n=10))
        trained[reduction] = flat_params(model)
    per_instance, scalar = results["none"], results["mean"]
    assert float(scalar.loss) == pytest.approx(float(per_instance.loss), rel=1e-6)
    assert float(scalar.sharpness) == pytest.approx(float(per_instance.sharpness), rel=1e-5)
    torch.testing.assert_close(trained["mean"], trained["none"], rtol=0, atol=1e-7)


def test_sparse_gradient_layers_are_refused_by_name():
    """nn.Embedding(sparse=True) gave torch's raw 'SparseCPU backend' error mid-step, for every method."""

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4, sparse=True)
            self.out = torch.nn.Linear(4, 2)

    for method in ("erm", "sam"):
        model = Bag()
        with pytest.raises(ValueError, match=r"sparse-gradient layers \['embed'\].*sparse=False"):
            DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), DeltaSAMConfig(method=method))


def test_a_closure_runs_deltasam_without_instance_weights():
    """method='deltasam' with beta=0 has no instance weights: a closure (one scalar loss) runs it, as SAM."""
    torch.manual_seed(0)
    model = MLP()
    config = DeltaSAMConfig(method="deltasam", beta=0.0, rho_schedule="constant")
    sam = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    batch = next(iter(loader(n=8, batch_size=8)))

    def closure():
        sam.zero_grad()
        loss = model.losses(batch).mean()
        loss.backward()
        return loss

    assert sam.step(closure) is not None


def test_looksam_with_a_group_added_mid_window_steps_the_new_parameters_plainly_until_the_next_full_step():
    """LookSAM (interval 3) with the backbone added before a plain step: the new parameters have no stored g_v, so
    their update on that step is the base step on their plain gradient at w, while the head still gets the reused
    direction; the next full step records g_v over all of them (before, the added group was refused)."""
    torch.manual_seed(0)
    model = MLP()
    first = list(model.net[0].parameters())
    for p in first:
        p.requires_grad_(False)
    head = [p for p in model.parameters() if p.requires_grad]
    config = DeltaSAMConfig(method="sam", rho=0.05, rho_schedule="constant", interval=3, reuse="looksam")
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(head, lr=0.1), config)
    for i in range(2):
        opt.step(model.losses, _batch(seed=i))
    for p in first:
        p.requires_grad_(True)
    opt.optimizer.add_param_group({"params": first})
    before = [p.detach().clone() for p in model.parameters()]
    model.zero_grad()
    model.losses(_batch(seed=2)).mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    opt.step(model.losses, _batch(seed=2))
    for p, w, g in zip(first, before[: len(first)], plain[: len(first)]):
        torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=0, atol=1e-7)
    moved = torch.cat([(p.detach() - w).flatten() for p, w in zip(head, before[len(first) :])])
    plain_step = torch.cat([(-0.1 * g).flatten() for g in plain[len(first) :]])
    assert (moved - plain_step).abs().max() > 1e-5, "the head must still get LookSAM's reused direction"
    opt.step(model.losses, _batch(seed=3))  # a full step, over every parameter
    assert len(opt.driver.state.reuse_direction) == len(list(model.parameters()))


@pytest.mark.parametrize("total_steps", [0, -5, 2.5, "10", True])
def test_total_steps_must_be_a_positive_int(total_steps):
    model = MLP()
    with pytest.raises(ValueError, match=rf"total_steps={total_steps!r}.*int >= 1"):
        DeltaSAMOptimizer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            DeltaSAMConfig(method="sam", policy="adaptive"),
            total_steps=total_steps,
        )


GROUP_ADDED_CASES = {
    "fsam": dict(method="fsam", rho=0.05, rho_schedule="constant"),
    "looksam": dict(method="sam", rho=0.05, rho_schedule="constant", interval=2, reuse="looksam"),
    "fsam_inside_a_window": dict(method="fsam", rho=0.05, rho_schedule="constant", accumulate_grad_batches=2),
    "sam_inside_a_window": dict(method="sam", rho=0.05, rho_schedule="constant", accumulate_grad_batches=2),
}


@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
@pytest.mark.parametrize("options", GROUP_ADDED_CASES.values(), ids=GROUP_ADDED_CASES)
def test_a_state_saved_after_a_group_was_added_resumes_bit_exactly(options, how):
    """The loop state (F-SAM's running mean, LookSAM's direction, an open window's gradients) lines up with the
    parameters it was built over; saved after a group was added and before the next step, or inside a window that
    started before it, the resumed run must train the weights of the run that never stopped (found in review:
    F-SAM's resume raised IndexError, LookSAM's drifted, a window's gradients did not load)."""
    config = DeltaSAMConfig(**options)
    inside = config.accumulate_grad_batches > 1
    batches = [_batch(seed=i) for i in range(8)]

    def build():
        torch.manual_seed(0)
        model = MLP()
        for p in model.net[0].parameters():
            p.requires_grad_(False)
        head = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.SGD(head, lr=0.1, momentum=0.9)

    def unfreeze(model, base):
        for p in model.net[0].parameters():
            p.requires_grad_(True)
        base.add_param_group({"params": list(model.net[0].parameters())})

    model, base = build()
    opt = DeltaSAMOptimizer(model, base, config, seed=0)
    cut = 3 if inside else 4  # inside a window: after its first micro-batch
    for batch in batches[:cut]:
        opt.step(model.losses, batch)
    unfreeze(model, base)
    if how == "state_dict":
        saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
        assert ("window_params" in saved) == inside
    else:
        copied_model, copied = copy.deepcopy((model, opt))
    for batch in batches[cut:]:
        opt.step(model.losses, batch)

    if how == "state_dict":
        copied_model, copied_base = build()
        copied_model.load_state_dict(weights)
        unfreeze(copied_model, copied_base)
        copied = DeltaSAMOptimizer(copied_model, copied_base, config, seed=0)
        copied.load_state_dict(saved)
    for batch in batches[cut:]:
        copied.step(copied_model.losses, batch)
    assert torch.equal(flat_params(copied_model), flat_params(model))


def test_a_loop_state_that_does_not_line_up_with_the_parameters_is_refused_by_name():
    """A state whose per-parameter lists cover other parameters than the optimizer's (here: an open window's
    gradients over the head alone, saved by a release that did not record the window's parameters) must not load
    by position."""
    torch.manual_seed(0)
    model = MLP()
    for p in model.net[0].parameters():
        p.requires_grad_(False)
    base = torch.optim.SGD(model.net[-1].parameters(), lr=0.1)
    config = DeltaSAMConfig(method="sam", rho=0.05, accumulate_grad_batches=2)
    opt = DeltaSAMOptimizer(model, base, config)
    opt.step(model.losses, _batch())
    for p in model.net[0].parameters():
        p.requires_grad_(True)
    base.add_param_group({"params": list(model.net[0].parameters())})
    saved = opt.state_dict()
    del saved["window_params"]
    fresh = DeltaSAMOptimizer(model, base, config)
    with pytest.raises(ValueError, match="'grads' covers 2 parameters, but this optimizer steps 4"):
        fresh.load_state_dict(saved)
