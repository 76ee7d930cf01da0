"""The shapes users bring: one module under two names, a layer the loss never reaches, a first batch that tells
the head estimator nothing. Each trains as the loop path, SAM or a hand-written reference does."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_deltasam import DeltaSAM, DeltaSAMConfig, DeltaSAMOptimizer

RHO = 0.1


def config(**options) -> DeltaSAMConfig:
    return DeltaSAMConfig(rho=RHO, rho_schedule="constant", **options)


def batches(steps: int = 3, n: int = 8, d: int = 6, classes: int = 3) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
        for _ in range(steps)
    ]


def train(model: nn.Module, cfg: DeltaSAMConfig, data, optimizer=None) -> DeltaSAMOptimizer:
    """``DeltaSAMOptimizer.step`` on each batch of ``data``, as a hand-written loop would."""
    base = optimizer or torch.optim.SGD(model.parameters(), lr=0.5)
    opt = DeltaSAMOptimizer(model, base, cfg)
    for batch in data:
        opt.step(lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"), batch)
    return opt


class Repeated(nn.Module):
    """One block run twice: ``nn.ModuleList([block, block])``."""

    def __init__(self) -> None:
        super().__init__()
        block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.blocks = nn.ModuleList([block, block])
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class Aliased(nn.Module):
    """One layer under two attribute names, called by each."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = self.first
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


SHARED_PATHS = {
    "m-sharpness batched": (dict(method="sam", m_sharpness=4, group_impl="loop"), dict(group_impl="batched")),
    "per-instance batched": (dict(method="per_instance", group_impl="loop"), dict(group_impl="batched")),
    "per-instance vmap": (dict(method="per_instance", group_impl="loop"), dict(per_instance_impl="vmap")),
}


@pytest.mark.parametrize("shape", [Repeated, Aliased], ids=lambda c: c.__name__)
@pytest.mark.parametrize("path", SHARED_PATHS, ids=str)
def test_a_module_under_two_names_trains_as_on_the_loop_path(shape, path):
    loop_options, other = SHARED_PATHS[path]
    data = batches()
    torch.manual_seed(0)
    reference = shape().double()
    train(reference, config(**loop_options), data)
    torch.manual_seed(0)
    model = shape().double()
    parameters = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batched, not the loop fallback
        opt = train(model, config(**{**loop_options, **other}), data)
    for layer in model.modules():  # every place still holds the model's own Parameter, the one the optimizer steps
        for name, p in layer._parameters.items():
            assert type(p) is nn.Parameter, f"{type(layer).__name__}.{name} holds a {type(p).__name__}"
    assert [id(p) for p in model.parameters()] == [id(p) for p in parameters]
    assert [id(p) for g in opt.param_groups for p in g["params"]] == [id(p) for p in parameters]
    model(data[0][0]).sum().backward()  # the next forward and backward, outside the step
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), atol=1e-12, rtol=0)


class WithUnused(nn.Module):
    """A trainable layer that the loss never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))
        self.unused = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


UNUSED_PATHS = {
    "per-instance loop": dict(method="per_instance", group_impl="loop"),
    "per-instance batched": dict(method="per_instance", group_impl="batched"),
    "per-instance vmap": dict(method="per_instance", per_instance_impl="vmap"),
    "deltasam exact loop": dict(method="deltasam", estimator="exact"),
    "deltasam exact vmap": dict(method="deltasam", estimator="exact", per_instance_impl="vmap"),
    "sam": dict(method="sam"),
}

DECAYING = {
    "AdamW": lambda params: torch.optim.AdamW(params, lr=0.1, weight_decay=0.1),
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=0.1, momentum=0.9),
}


@pytest.mark.parametrize("optimizer", DECAYING, ids=str)
@pytest.mark.parametrize("path", UNUSED_PATHS, ids=str)
def test_a_layer_the_loss_never_reaches_keeps_no_gradient_and_does_not_decay(path, optimizer):
    """Weight decay moves a parameter with a zero ``.grad`` and skips one with ``None``, as ERM and SAM leave it."""
    torch.manual_seed(0)
    model = WithUnused().double()
    x, y = batches()[0]
    DeltaSAM(model, config(**UNUSED_PATHS[path])).step(
        lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"), (x, y)
    )
    assert model.unused.weight.grad is None and model.unused.bias.grad is None
    assert all(p.grad is not None for p in model.body.parameters())
    model.zero_grad()
    before = [p.detach().clone() for p in model.unused.parameters()]
    used = [p.detach().clone() for p in model.body.parameters()]
    train(model, config(**UNUSED_PATHS[path]), batches(), DECAYING[optimizer](model.parameters()))
    for a, b in zip(before, model.unused.parameters()):
        assert torch.equal(a, b.detach())
    assert any(not torch.equal(a, b.detach()) for a, b in zip(used, model.body.parameters()))


def ignored_labels(batch):
    return batch[0], torch.full_like(batch[1], -100)  # every label ignore_index: loss 0, gradient 0


def non_finite_inputs(batch):
    return torch.full_like(batch[0], float("nan")), batch[1]


def snapshots(model: nn.Module, cfg: DeltaSAMConfig, data) -> tuple[list[list[Tensor]], list[str]]:
    """The weights after each ``DeltaSAMOptimizer.step`` on ``data``, and the warnings said."""
    torch.manual_seed(0)
    opt = DeltaSAMOptimizer(model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1), cfg)
    out = []
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for batch in data:
            opt.step(lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"), batch)
            out.append([p.detach().clone() for p in model.parameters()])
    return out, [str(w.message) for w in said]


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3)).double()


@pytest.mark.parametrize("degenerate", [ignored_labels, non_finite_inputs], ids=lambda f: f.__name__)
def test_deltasam_steps_as_sam_on_a_first_batch_that_cannot_tell_the_head(degenerate):
    """A first batch with zero loss gradient takes SAM's step (eps = 0); a non-finite one is skipped with SAM's
    warning; the head is detected on the next batch, as the one given by name."""
    good = batches()
    data = [degenerate(good[0]), *good[1:]]
    sam, sam_said = snapshots(classifier(), config(method="sam"), data)
    detected, said = snapshots(classifier(), config(method="deltasam"), data)
    named, named_said = snapshots(classifier(), config(method="deltasam", head="2"), data)
    for a, b in zip(sam[0], detected[0]):
        assert torch.equal(a, b)
    for step in (1, 2):
        for a, b in zip(named[step], detected[step]):
            assert torch.equal(a, b)
    assert any("cannot tell the classifier layer from this batch" in s for s in said)
    # a named head is not said to miss the loss because the first batch had no gradient there
    assert not any("scores from layer" in s for s in named_said)
    skipped = [s for s in said if "optimizer step is skipped" in s]
    assert skipped == [s for s in sam_said if "optimizer step is skipped" in s]
    assert bool(skipped) == (degenerate is non_finite_inputs)
