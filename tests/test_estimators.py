"""The guardedness estimators against the exact per-instance gradient norms, and the truncated probe forwards."""

import math
from contextlib import nullcontext

import pytest
import torch
from helpers import EXACT_WEIGHTS, MLP, LeastSquares, classification_data, least_squares_problem, ls_instance_grads
from torch import nn

from lit_deltasam import DeltaSAM, DeltaSAMConfig
from lit_deltasam.core.guardedness import ForwardCache, Prober
from lit_deltasam.core.per_instance import PerInstance
from lit_deltasam.core.randomness import RandomState
from lit_deltasam.core.snapshot import Snapshot


@pytest.mark.parametrize("antithetic", [True, False])
def test_probe_scores_estimate_the_gradient_norms(antithetic):
    """E[(g_i·u)²] = sigma² ||g_i||² / d, so sqrt(mean_k delta²) -> sigma ||g_i|| / sqrt(d).

    One-sided differences (the shipped setting) add (x_i·u)²/2, of order sigma², negligible at small sigma.
    """
    x, y, w = least_squares_problem(n=6, d=4)
    model = LeastSquares(w)
    params = list(model.parameters())
    sigma, d = 1e-4, w.numel()
    snapshot = Snapshot(params)
    snapshot.capture()
    torch.manual_seed(0)
    scores = Prober(params, samples=20000, sigma=sigma, antithetic=antithetic).scores(
        model.losses, (x, y), model.losses((x, y)), None, snapshot.restore
    )
    expected = sigma * ls_instance_grads(x, y, w).norm(dim=1) / math.sqrt(d)
    torch.testing.assert_close(scores.double(), expected, rtol=0.03, atol=0)
    assert torch.equal(model.w.detach(), w)


def test_shipped_probe_scores_are_the_rms_of_three_one_sided_differences():
    """The default probe (K = 3, not antithetic) against the least-squares closed form at the reproduced draws:
    l_i(w + u) - l_i(w) = (x_i·u)(x_i·w - y_i) + (x_i·u)²/2, and s_i = sqrt(mean_k (l_i(w + u_k) - l_i(w))²)."""
    x, y, w = least_squares_problem(n=6, d=4)
    model = LeastSquares(w)
    sigma = 0.5  # wide enough that float32 differences of the losses keep 6 digits
    prober = DeltaSAM(model, DeltaSAMConfig(method="deltasam", estimator="probe", probe_sigma=sigma)).scorer.prober
    assert (prober.samples, prober.antithetic, prober.curvature) == (3, False, False)
    snapshot = Snapshot([model.w])
    snapshot.capture()
    torch.manual_seed(0)
    scores = prober.scores(model.losses, (x, y), model.losses((x, y)), None, snapshot.restore)
    us = reproduced_directions(4, 3, sigma, seed=0)
    deltas = torch.stack([(x @ u) * (x @ w - y) + (x @ u) ** 2 / 2 for u in us])
    expected = deltas.pow(2).mean(0).sqrt()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=0)
    assert torch.equal(model.w.detach(), w)


def test_exact_scores_by_vmap_and_by_loop_agree():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = classification_data(n=12)
    params, names = zip(*[(p, n) for n, p in model.named_parameters()])
    norms = [
        PerInstance(model, params, names, impl, chunk=5).grad_norms(model.losses, (x.double(), y))
        for impl in ("vmap", "loop")
    ]
    torch.testing.assert_close(norms[0], norms[1])


class CountingEmbedding(nn.Embedding):
    calls = 0

    def forward(self, ids):
        CountingEmbedding.calls += 1
        return super().forward(ids)


class Tower(nn.Module):
    """Embedding, three dropout blocks and a head: only the top block and the head are probed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = CountingEmbedding(50, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.3)) for _ in range(3))
        self.head = nn.Linear(16, 3)

    def losses(self, batch):
        ids, y = batch
        h = self.embed(ids).mean(1)
        for block in self.blocks:
            h = h + block(h)
        return nn.functional.cross_entropy(self.head(h), y, reduction="none")


def test_truncated_probes_equal_full_probes_and_skip_the_bottom_layers():
    torch.manual_seed(0)
    model = Tower()
    batch = (torch.randint(0, 50, (8, 5)), torch.randint(0, 3, (8,)))
    probed = [*model.blocks[2].parameters(), *model.head.parameters()]
    snapshot = Snapshot(probed)
    snapshot.capture()
    scores, calls = {}, {}
    for truncate in (False, True):
        cache = ForwardCache(model, probed, replay_random=True) if truncate else None
        state = RandomState(torch.device("cpu"))
        torch.manual_seed(1)
        state.capture()
        CountingEmbedding.calls = 0
        with cache.record() if cache else torch.enable_grad():
            losses = model.losses(batch)
        torch.manual_seed(2)
        scores[truncate] = Prober(probed, 4, 0.1, False, cache).scores(
            model.losses, batch, losses, state, snapshot.restore
        )
        calls[truncate] = CountingEmbedding.calls
    assert torch.equal(scores[True], scores[False])
    assert calls == {False: 1 + 4, True: 1}


def test_engine_truncates_only_with_a_parameter_subset():
    model = Tower()
    full = DeltaSAM(model, DeltaSAMConfig(estimator="probe"))
    top = DeltaSAM(model, DeltaSAMConfig(estimator="probe", probe_params=["blocks.2.*", "head.*"]))
    off = DeltaSAM(
        model, DeltaSAMConfig(estimator="probe", probe_params=["blocks.2.*", "head.*"], probe_truncate=False)
    )
    assert full.scorer.prober.cache is None and off.scorer.prober.cache is None and top.scorer.prober.cache is not None
    torch.manual_seed(0)
    batch = (torch.randint(0, 50, (8, 5)), torch.randint(0, 3, (8,)))
    CountingEmbedding.calls = 0
    top.step(model.losses, batch)
    assert CountingEmbedding.calls == 2  # the clean and the perturbed forward; the 3 probes start above the embedding


class Scaled(Tower):
    """A probed parameter used directly, below modules that hold no probed parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU())

    def losses(self, batch):
        ids, y = batch
        h = self.body(self.embed(ids).mean(1) * self.scale)
        return nn.functional.cross_entropy(self.head(h), y, reduction="none")


def probe_scores(model, probed, truncate, share=True, samples=4):
    snapshot = Snapshot(probed)
    snapshot.capture()
    cache = ForwardCache(model, probed, replay_random=share) if truncate else None
    state = RandomState(torch.device("cpu"))
    torch.manual_seed(1)
    state.capture()
    batch = (
        torch.randint(0, 50, (8, 5), generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1, 2] * 2 + [0, 1]),
    )
    with cache.record() if cache else torch.enable_grad():
        losses = model.losses(batch)
    torch.manual_seed(2)
    return Prober(probed, samples, 0.1, False, cache).scores(
        model.losses, batch, losses, state if share else None, snapshot.restore
    ), cache


def test_truncation_steps_aside_when_a_probed_parameter_is_used_outside_its_module():
    torch.manual_seed(0)
    model = Scaled().eval()
    probed = [model.scale, *model.head.parameters()]
    truncated, cache = probe_scores(model, probed, truncate=True)
    full, _ = probe_scores(model, probed, truncate=False)
    assert torch.equal(truncated, full) and truncated.abs().sum() > 0


def test_truncation_steps_aside_after_an_in_place_write_on_a_kept_output():
    torch.manual_seed(0)
    model = Tower()

    def losses(batch):
        ids, y = batch
        h = model.embed(ids).mean(1)
        out = model.blocks[0](h)
        out.mul_(2.0)  # writes into blocks[0]'s kept output after it returned
        h = h + out
        for block in model.blocks[1:]:
            h = h + block(h)
        return nn.functional.cross_entropy(model.head(h), y, reduction="none")

    model.losses = losses
    probed = [*model.blocks[2].parameters(), *model.head.parameters()]
    truncated, cache = probe_scores(model, probed, truncate=True)
    full, _ = probe_scores(model, probed, truncate=False)
    assert torch.equal(truncated, full)


def test_without_shared_masks_each_probe_draws_its_own_noise():
    torch.manual_seed(0)
    model = Tower()
    probed = [*model.blocks[2].parameters(), *model.head.parameters()]
    draws = []
    original = torch.Tensor.normal_

    def spy(tensor, *args, **kwargs):
        out = original(tensor, *args, **kwargs)
        draws.append(tensor.clone())
        return out

    torch.Tensor.normal_ = spy
    try:
        probe_scores(model, probed, truncate=True, share=False, samples=4)
    finally:
        torch.Tensor.normal_ = original
    assert len(draws) == 4 and all(not torch.equal(draws[0], d) for d in draws[1:])


def test_truncation_through_multihead_attention_equals_full_probes():
    """nn.MultiheadAttention uses out_proj's parameters without calling out_proj; truncation still applies."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), layer).eval()
    probed = list(layer.parameters())
    x = torch.randn(3, 5, 4)

    def losses(batch):
        return model(batch).pow(2).mean((1, 2))

    def scores(truncate):
        cache = ForwardCache(model, probed, replay_random=False) if truncate else None
        with cache.record() if cache else nullcontext():
            clean = losses(x)
        kept = [type(m).__name__ for m, _ in cache._kept] if cache else None
        torch.manual_seed(2)
        snapshot = Snapshot(probed)
        snapshot.capture()
        return Prober(probed, 3, 0.1, False, cache).scores(losses, x, clean, None, snapshot.restore), kept

    truncated, kept = scores(True)
    full, _ = scores(False)
    assert kept == ["Linear", "Tanh"]
    torch.testing.assert_close(truncated, full)


class Quadratics(nn.Module):
    """l_i(w) = (w - c_i)ᵀ A_i (w - c_i) / 2 with symmetric, some indefinite, A_i: the curvature along u is uᵀ A_i u."""

    def __init__(self, n: int = 6, d: int = 5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(torch.randn(d, generator=g, dtype=torch.float64))
        b = torch.randn(n, d, d, generator=g, dtype=torch.float64)
        self.a = (b + b.transpose(1, 2)) / 2  # symmetric, with eigenvalues of both signs
        self.a[:2] = b[:2] @ b[:2].transpose(1, 2)  # two positive semi-definite instances

    def losses(self, batch) -> torch.Tensor:
        centers = batch
        diff = self.w - centers
        return 0.5 * torch.einsum("nd,nde,ne->n", diff, self.a, diff)


def reproduced_directions(d: int, directions: int, sigma: float, seed: int) -> list[torch.Tensor]:
    """The Gaussian probes a Prober over one d-dimensional float64 parameter draws after ``manual_seed(seed)``."""
    torch.manual_seed(seed)
    return [torch.empty(d, dtype=torch.float64).normal_() * sigma / math.sqrt(d) for _ in range(directions)]


def test_curvature_scores_are_the_mean_quadratic_form_of_the_probes():
    """For a quadratic l_i, (l_i(w+u) + l_i(w-u) - 2 l_i(w)) / 2 = uᵀ A_i u / 2 exactly."""
    model = Quadratics()
    centers = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    before = model.w.detach().clone()
    snapshot = Snapshot([model.w])
    snapshot.capture()
    torch.manual_seed(0)
    scores = Prober([model.w], samples=6, sigma=0.5, antithetic=True, curvature=True).scores(
        model.losses, centers, model.losses(centers), None, snapshot.restore
    )
    us = reproduced_directions(5, 3, 0.5, seed=0)
    expected = torch.stack([torch.einsum("d,nde,e->n", u, model.a, u) / 2 for u in us]).mean(0)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-7)
    assert (expected < 0).any() and (expected > 0).any()
    assert torch.equal(model.w.detach(), before)


def test_curvature_weights_follow_the_clamped_scores():
    model = Quadratics()
    centers = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    beta = 1.0
    config = DeltaSAMConfig(
        method="deltasam", estimator="curvature", beta=beta, probe_samples=4, rho=0.1, probe_sigma=0.5, **EXACT_WEIGHTS
    )
    torch.manual_seed(0)
    result = DeltaSAM(model, config).step(model.losses, centers)
    us = reproduced_directions(5, 2, 0.5, seed=0)
    scores = torch.stack([torch.einsum("d,nde,e->n", u, model.a, u) / 2 for u in us]).mean(0).clamp_min(0)
    expected = scores / scores.sum()  # beta = 1: lambda ∝ s
    torch.testing.assert_close(result.weights, expected, rtol=1e-5, atol=1e-7)
    assert (result.weights < 1e-100).any()  # negative curvature: no weight at beta > 0


def test_curvature_needs_antithetic_pairs():
    with pytest.raises(
        ValueError, match=r"probe_samples=3 must be even with estimator='curvature'.*probe_samples=2 or 4"
    ):
        DeltaSAMConfig(estimator="curvature", probe_samples=3)


def test_truncation_keeps_a_forward_patched_on_the_instance():
    """accelerate-style hooks replace ``module.forward`` on the instance; a truncated probe puts them back."""
    torch.manual_seed(0)
    model = Tower()
    calls = []

    def patched(ids, _original=model.embed.forward):
        calls.append(1)
        return _original(ids)

    model.embed.forward = patched
    engine = DeltaSAM(model, DeltaSAMConfig(estimator="probe", probe_params=["blocks.2.*", "head.*"]))
    batch = (torch.randint(0, 50, (8, 5)), torch.randint(0, 3, (8,)))
    engine.step(model.losses, batch)
    assert model.embed.__dict__["forward"] is patched
    assert len(calls) == 2  # the clean and the perturbed forward
