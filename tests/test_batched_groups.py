"""Batched groups (m-sharpness and per-instance SAM in vmapped passes) against closed forms and the loop; the
loop's fallbacks; dropout; BatchNorm's running statistics under m-sharpness."""

import warnings

import pytest
import torch
from helpers import (
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
from torch import nn

from lit_deltasam import DeltaSAM, DeltaSAMConfig

RHO = 0.1


def grouped(impl: str, chunk=None, **options) -> DeltaSAMConfig:
    """A config whose groups run as ``impl`` says, ``chunk`` groups to a batched pass."""
    chunked = dict(group_chunk=chunk) if impl == "batched" else {}
    return DeltaSAMConfig(rho_schedule="constant", group_impl=impl, **chunked, **options)


def groups(n: int, m: int) -> list[slice]:
    return [slice(start, min(start + m, n)) for start in range(0, n, m)]


@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("m", [4, 5, 1])
def test_least_squares_closed_form(m, chunk):
    """m = 4 divides n = 16, m = 5 leaves a group of 1, m = 1 is per-instance SAM; chunk = 2 splits the passes."""
    x, y, w = least_squares_problem(n=16)
    model = LeastSquares(w)
    engine = DeltaSAM(model, grouped("batched", chunk, method="sam", rho=RHO, m_sharpness=m))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        result = engine.step(model.losses, (x, y))
    expected = sum((k.stop - k.start) / 16 * ls_sam_update(x[k], y[k], w, RHO, "sam") for k in groups(16, m))
    torch.testing.assert_close(model.w.grad, expected, atol=1e-12, rtol=0)
    assert torch.equal(model.w.detach(), w)
    moved = []
    for k in groups(16, m):
        g = x[k].T @ (x[k] @ w - y[k]) / (k.stop - k.start)
        moved.append(0.5 * (x[k] @ (w + RHO * g / g.norm()) - y[k]) ** 2)
    torch.testing.assert_close(result.perturbed_losses, torch.cat(moved), atol=1e-12, rtol=0)
    torch.testing.assert_close(result.losses, 0.5 * (x @ w - y) ** 2, atol=1e-12, rtol=0)


@pytest.mark.parametrize("chunk", [None, 3])
def test_per_instance_least_squares_closed_form(chunk):
    x, y, w = least_squares_problem(n=10)
    model = LeastSquares(w)
    DeltaSAM(model, grouped("batched", chunk, method="per_instance", rho=RHO)).step(model.losses, (x, y))
    torch.testing.assert_close(model.w.grad, ls_sam_update(x, y, w, RHO, "per_instance"), atol=1e-12, rtol=0)


def run(config, model_seed=0, n=16, dropout=0.0, plain_grad=False, prior_grad=True):
    x, y = classification_data(n=n)
    torch.manual_seed(model_seed)
    model = MLP(dropout=dropout).double()
    if prior_grad:  # G is added to what .grad held
        for p in model.parameters():
            p.grad = torch.full_like(p, 0.5)
    torch.manual_seed(1)
    result = DeltaSAM(model, config).step(model.losses, (x.double(), y), plain_grad=plain_grad)
    return model, result


@pytest.mark.parametrize("options", [dict(method="sam"), dict(method="asam", rho=0.5)], ids=str)
@pytest.mark.parametrize("m", [4, 5])
def test_batched_equals_the_loop(options, m):
    options = {"rho": RHO, **options, "m_sharpness": m}
    (loop_model, loop), (model, batched) = (
        run(grouped(impl, **options), plain_grad=True) for impl in ("loop", "batched")
    )
    for a, b in zip(loop_model.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=0)
        assert torch.equal(a.detach(), b.detach())
    for field in ("losses", "perturbed_losses", "weights", "grad_norm", "eps_norm"):
        torch.testing.assert_close(getattr(batched, field), getattr(loop, field), atol=1e-12, rtol=0)
    for a, b in zip(loop.plain_grad, batched.plain_grad):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    assert batched.perturbed is True


def test_per_instance_batched_equals_the_loop():
    (loop_model, loop), (model, batched) = (
        run(grouped(impl, 4, method="per_instance", rho=RHO), n=10, plain_grad=True) for impl in ("loop", "batched")
    )
    for a, b in zip(loop_model.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(batched.perturbed_losses, loop.perturbed_losses, atol=1e-12, rtol=0)
    for a, b in zip(loop.plain_grad, batched.plain_grad):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


def test_a_group_with_zero_gradient_is_not_perturbed():
    """eps_k = 0 where ||g_k|| = 0, as in the loop: a group fitted exactly takes its plain gradient (zero)."""
    x, y, w = least_squares_problem(n=8)
    x[:4] = 0.0  # the first group of 4 has no gradient
    model = LeastSquares(w)
    result = DeltaSAM(model, grouped("batched", method="sam", rho=RHO, m_sharpness=4)).step(model.losses, (x, y))
    expected = 0.5 * ls_sam_update(x[4:], y[4:], w, RHO, "sam")
    torch.testing.assert_close(model.w.grad, expected, atol=1e-12, rtol=0)
    assert result.perturbed is False
    torch.testing.assert_close(result.eps_norm, torch.tensor(RHO / 2, dtype=torch.float64))


class Masks(nn.Module):
    """l_i = sum_j dropout(1)_ij * w_j: the losses show the dropout masks."""

    def __init__(self, d: int, p: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(d, dtype=torch.float64))
        self.drop = nn.Dropout(p)

    def losses(self, batch):
        (x,) = batch
        return (self.drop(torch.ones_like(x)) * self.w).sum(1)


@pytest.mark.parametrize("share", [True, False])
def test_dropout_masks_shared_by_an_instances_two_forwards(share):
    """With share_dropout, l_i(w + eps_k) - l_i(w) = z_i · eps_k, at most rho ||z_i||; other masks move it by O(1)."""
    n, d, p, rho = 32, 50, 0.3, 1e-6
    torch.manual_seed(0)
    model = Masks(d, p)
    config = grouped("batched", method="sam", rho=rho, m_sharpness=4, share_dropout=share)
    result = DeltaSAM(model, config).step(model.losses, (torch.zeros(n, d, dtype=torch.float64),))
    change = (result.perturbed_losses - result.losses).abs()
    if share:
        assert change.max() <= rho * d**0.5 / (1 - p)
    else:
        assert change.max() > 1.0


def test_dropout_masks_are_independent_draws_of_the_loops_distribution():
    """Each instance keeps each unit with probability 1 - p, independently across instances and groups."""
    n, d, p = 64, 200, 0.25
    kept = {}
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        model = Masks(d, p)
        config = grouped(impl, method="sam", rho=RHO, m_sharpness=4)
        result = DeltaSAM(model, config).step(model.losses, (torch.zeros(n, d, dtype=torch.float64),))
        kept[impl] = result.losses * (1 - p)  # units kept by each instance: Binomial(d, 1 - p)
    mean, var = d * (1 - p), d * p * (1 - p)
    for impl, k in kept.items():
        assert abs(k.mean() - mean) < 4 * (var / n) ** 0.5, impl
        assert 0.5 * var < k.var() < 1.6 * var, impl
    assert len(set(kept["batched"].tolist())) > n // 4  # not one mask repeated across groups


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda m: m.net.insert(1, nn.BatchNorm1d(12).double()), "BatchNorm1d in training mode"),
        (lambda m: m.net[0].register_forward_hook(lambda *a: None), "has hooks"),
    ],
    ids=["batchnorm", "hook"],
)
def test_unbatchable_models_run_the_loop_and_say_why_once(setup, match):
    x, y = classification_data(n=16)
    results = []
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        model = MLP().double()
        setup(model)
        engine = DeltaSAM(model, grouped(impl, method="sam", rho=RHO, m_sharpness=4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.manual_seed(1)
            for _ in range(2):
                engine.step(model.losses, (x.double(), y))
        said = [w for w in caught if "runs the loop instead" in str(w.message)]
        assert len(said) == (1 if impl == "batched" else 0)
        if said:
            assert match in str(said[0].message)
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weighted_descent", [False, True])
@pytest.mark.parametrize("m", [4, 5])
def test_deltasam_head_batched_equals_the_loop(m, weighted_descent):
    """δ-SAM with the head estimator: lambda from each group's head scores, normalized within the group. The
    first step finds the head layer in the loop; the second runs batched."""
    x, y = classification_data(n=16)
    options = dict(method="deltasam", estimator="head", beta=-1.0, rho=RHO, m_sharpness=m)
    out = {}
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        model = MLP().double()
        engine = DeltaSAM(model, grouped(impl, weighted_descent=weighted_descent, **options))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                result = engine.step(model.losses, (x.double(), y), plain_grad=True)
        out[impl] = ([p.grad.clone() for p in model.parameters()], result)
    (loop_grads, loop), (grads, batched) = out["loop"], out["batched"]
    for a, b in zip(loop_grads, grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    for field in ("losses", "perturbed_losses", "weights", "grad_norm", "eps_norm"):
        torch.testing.assert_close(getattr(batched, field), getattr(loop, field), atol=1e-12, rtol=0)
    for a, b in zip(loop.plain_grad, batched.plain_grad):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)
    assert not torch.allclose(batched.weights, torch.full_like(batched.weights, 1 / 16))  # lambda is not uniform


def test_deltasam_with_a_probing_estimator_runs_the_loop_and_says_why():
    x, y = classification_data(n=16)
    model = MLP().double()
    engine = DeltaSAM(model, grouped("batched", method="deltasam", estimator="probe", rho=RHO, m_sharpness=4))
    with pytest.warns(RuntimeWarning, match="estimator='probe' scores each group"):
        engine.step(model.losses, (x.double(), y))


def test_a_failing_batched_step_leaves_weights_and_gradients_as_they_were():
    x, y = classification_data(n=16)
    model = MLP()
    engine = DeltaSAM(model, grouped("batched", method="sam", rho=RHO, m_sharpness=4))
    engine.step(model.losses, (x, y))
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    calls = []

    def failing(batch):
        calls.append(1)
        if len(calls) == 2:  # the descent's forward
            raise ValueError("injected")
        return model.losses(batch)

    with pytest.raises(ValueError, match="injected"):
        engine.step(failing, (x, y))
    for p, b, g in zip(model.parameters(), before, grads):
        assert torch.equal(p.detach(), b)
        assert torch.equal(p.grad, g)


def test_m_sharpness_moves_batchnorm_statistics_once_per_step():
    """Issue 36 item 4: the running mean takes the whole batch's update; the running variance the share-weighted
    mean of the groups' (unbiased) variances; num_batches_tracked goes up by one."""
    n, m = 14, 4  # groups of 4, 4, 4 and 2
    x, y = classification_data(n=n)
    x = x.double()
    torch.manual_seed(0)
    model = MLP(batchnorm=True).double()
    bn = model.net[1]
    bn.running_mean.uniform_(-1, 1)
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    with torch.no_grad():
        h = model.net[0](x)
    DeltaSAM(model, grouped("loop", method="sam", rho=RHO, m_sharpness=m)).step(model.losses, (x, y))
    assert bn.num_batches_tracked.item() == 1
    mom = bn.momentum
    torch.testing.assert_close(bn.running_mean, (1 - mom) * mean0 + mom * h.mean(0), atol=1e-12, rtol=0)
    group_var = sum((k.stop - k.start) / n * h[k].var(0, unbiased=True) for k in groups(n, m))
    torch.testing.assert_close(bn.running_var, (1 - mom) * var0 + mom * group_var, atol=1e-12, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        dict(method="sam", m_sharpness=4),
        dict(method="deltasam", estimator="head", m_sharpness=4),
        dict(method="per_instance"),
    ],
    ids=str,
)
def test_minilm_weights_after_three_steps_equal_the_loops(options):
    """MiniLM in eval mode (no dropout: the two paths draw other masks), batch 8, AdamW, three steps (δ-SAM's
    first step finds the head layer in the loop)."""
    from benchmarks.perf.overhead import setup

    finals = {}
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        module, batch, optimizer, _ = setup("minilm", 8, 16)
        module.eval()
        engine = DeltaSAM(module, grouped(impl, 4, rho=0.05, **options))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback
            for _ in range(3):
                engine.step(module.per_sample_loss, batch)
                optimizer.step()
                optimizer.zero_grad()
        finals[impl] = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    torch.testing.assert_close(finals["batched"], finals["loop"], atol=2e-6, rtol=0)


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("impl", ["loop", "batched"])
def test_a_group_whose_ascent_overflows_descends_at_w(impl, on_device):
    """A non-finite ascent gradient in group 1 (as an fp16 scaler's overflow gives): eps_1 = 0 exactly, on the
    host path and on the device path (forced on the CPU), and the other groups are perturbed as usual."""
    from lit_deltasam.core.decisions import decisions_on_device

    x, y, w = least_squares_problem(n=16)
    poisoned = torch.arange(16) < 4
    model = LeastSquares(w)
    calls = []

    def loss_fn(batch):
        x, y, flags = batch
        calls.append(1)
        losses = model.losses((x, y))
        scale = torch.where(flags, float("inf"), 1.0).to(losses.dtype)
        return losses * scale if len(calls) % 2 == 1 else losses  # the clean passes

    with decisions_on_device(on_device):
        result = DeltaSAM(model, grouped(impl, method="sam", rho=RHO, m_sharpness=4)).step(loss_fn, (x, y, poisoned))
    expected = 0.25 * ls_sam_update(x[:4], y[:4], w, 0.0, "erm")
    expected += sum(0.25 * ls_sam_update(x[k], y[k], w, RHO, "sam") for k in groups(16, 4)[1:])
    # the loop's device path rounds rho / ||g|| to float32 (decisions.scale_or_zero)
    tolerance = 1e-8 if on_device and impl == "loop" else 1e-12
    torch.testing.assert_close(model.w.grad, expected, atol=tolerance, rtol=0)
    assert torch.equal(model.w.detach(), w)
    assert bool(result.perturbed) is False


class Branching(MLP):
    """Reads a value in its forward (data-dependent control flow), which vmap cannot batch."""

    def forward(self, x):
        return self.net(x) if x.sum() > -1e9 else -self.net(x)


def test_a_model_vmap_cannot_run_falls_back_to_the_loop_and_says_why_once():
    x, y = classification_data(n=16)
    grads = []
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        model = Branching().double()
        engine = DeltaSAM(model, grouped(impl, method="sam", rho=RHO, m_sharpness=4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            steps = []
            for _ in range(2):
                for p in model.parameters():  # G is added to what .grad held
                    p.grad = torch.full_like(p, 0.5)
                engine.step(model.losses, (x.double(), y))
                steps += [p.grad.clone() for p in model.parameters()]
        said = [w for w in caught if "runs the loop instead" in str(w.message)]
        assert len(said) == (impl == "batched")
        if said:
            assert "vmap cannot run this model" in str(said[0].message)
        grads.append(steps)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_hugging_face_attention_runs_eager_in_the_batched_passes_and_sdpa_after():
    """A BERT with SDPA: the batched passes use its eager attention (SDPA has no vmap batching rule, so vmap
    would warn and run it group by group), agree with the loop's SDPA step, and leave SDPA chosen."""
    from transformers import BertConfig

    from lit_deltasam.models.encoders import HFClassifier

    spec = BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, num_labels=2
    ).to_dict()
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(1, 30, (8, 6), generator=g), torch.randint(0, 2, (8,), generator=g)
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    grads = []
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        model = HFClassifier("tiny", 2, "sdpa", spec).double().eval()

        def losses(batch, model=model):
            return nn.functional.cross_entropy(model(batch[0], batch[1]), batch[2], reduction="none")

        with warnings.catch_warnings():
            warnings.simplefilter("error")  # vmap's "performance drop" warning for a kernel without a batching rule
            DeltaSAM(model, grouped(impl, method="sam", rho=RHO, m_sharpness=2)).step(losses, (ids, mask, labels))
        assert model.model.config._attn_implementation == "sdpa"
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-12, rtol=0)


def test_the_mixin_trains_the_same_weights_batched():
    """Through Lightning (manual_backward as the caller's backward): two epochs, AdamW, m = 4 and a group of 2."""

    def fit(impl):
        torch.manual_seed(0)
        module = TinyModule(grouped(impl, method="sam", rho=RHO, m_sharpness=4), optimizer="adamw", lr=0.01)
        trainer(max_epochs=2).fit(module, loader(n=60, batch_size=14))
        return flat_params(module)

    torch.testing.assert_close(fit("batched"), fit("loop"), atol=1e-6, rtol=0)


def test_auto_runs_the_loop_on_the_cpu_and_batches_on_cuda():
    """group_impl='auto' (the default) by measurement: the loop on the CPU (bit-identical to 'loop'), batched on
    CUDA, and a per-instance SAM that chose per_instance_impl='vmap' keeps it."""
    from lit_deltasam.core.groups import group_impl

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert DeltaSAMConfig(method="sam", m_sharpness=4).group_impl == "auto"
    assert group_impl(DeltaSAMConfig(method="sam", m_sharpness=4), cuda) == "batched"
    assert group_impl(DeltaSAMConfig(method="sam", m_sharpness=4), cpu) == "loop"
    assert group_impl(DeltaSAMConfig(method="per_instance", per_instance_impl="vmap"), cuda) == "loop"
    assert group_impl(DeltaSAMConfig(method="per_instance", group_impl="loop"), cuda) == "loop"
    grads = []
    for impl in ("auto", "loop"):
        torch.manual_seed(0)
        model = MLP(dropout=0.1)
        x, y = classification_data(n=16)
        DeltaSAM(model, DeltaSAMConfig(method="sam", m_sharpness=4, group_impl=impl)).step(model.losses, (x, y))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_a_scalar_loss_runs_the_loop_under_batched_groups():
    """Batched passes need one loss per instance; a scalar mean loss (allowed for SAM) falls back to the loop, said
    once, with the loop's G."""
    grads = []
    for impl in ("loop", "batched"):
        torch.manual_seed(0)
        model = MLP()
        x, y = classification_data(n=16)
        engine = DeltaSAM(model, grouped(impl, method="sam", rho=RHO, m_sharpness=4))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.step(lambda b, model=model: model.losses(b).mean(), (x, y))
        assert (impl == "batched") == any("one scalar per group" in str(w.message) for w in caught)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
