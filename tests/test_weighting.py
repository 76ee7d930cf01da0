"""lambda ∝ s**beta with a median floor and a clip of n*lambda."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from helpers import LeastSquares, least_squares_problem
from hypothesis import given, settings
from hypothesis import strategies as st

from lit_deltasam import DeltaSAM, DeltaSAMConfig, instance_weights
from lit_deltasam.core import effective_sample_size

NO_FLOOR_OR_CLIP = dict(floor=0.0, clip=(0.0, math.inf))


def test_power_law_without_floor_or_clip():
    s = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    for beta in (-1.0, -0.5, 0.5, 1.0, 2.0):
        expected = s**beta / (s**beta).sum()
        torch.testing.assert_close(instance_weights(s, beta, **NO_FLOOR_OR_CLIP), expected)


def test_beta_zero_is_uniform():
    s = torch.tensor([0.0, 3.0, 1e9, float("nan")])
    assert torch.equal(instance_weights(s, 0.0), torch.full((4,), 0.25, dtype=torch.float64))


def test_floor_at_a_fraction_of_the_median():
    s = torch.tensor([1e-6, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    floored = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)  # median 2, floor 0.25 -> 0.5
    expected = (1 / floored) / (1 / floored).sum()
    torch.testing.assert_close(instance_weights(s, -1.0, floor=0.25, clip=(0.0, math.inf)), expected)


def test_clip_bounds_n_lambda_after_normalizing():
    s = torch.tensor([1.0, 1.0, 1.0, 100.0], dtype=torch.float64)
    # beta = 1: the large score is held at n*lambda = 2, the other three share the rest equally
    expected = torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2], dtype=torch.float64)
    torch.testing.assert_close(instance_weights(s, 1.0, floor=0.0, clip=(0.5, 2.0)), expected)


def test_one_tiny_score_among_a_hundred_stays_under_weight_max():
    s = torch.ones(100, dtype=torch.float64)
    s[0] = 1e-3
    w = instance_weights(s, -2.0, floor=0.0, clip=(0.1, 10.0))
    assert 100 * w.max().item() == pytest.approx(10.0)
    torch.testing.assert_close(w[1:], torch.full((99,), 0.9 / 99, dtype=torch.float64))


def test_effective_sample_size():
    assert effective_sample_size(torch.full((8,), 1 / 8)).item() == pytest.approx(8)
    assert effective_sample_size(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(1)


scores = st.lists(
    st.one_of(
        st.floats(min_value=0.0, max_value=1e300, allow_nan=False),
        st.sampled_from([0.0, 1e-300, float("inf"), float("nan")]),
    ),
    min_size=1,
    max_size=64,
)


@settings(max_examples=300, deadline=None)
@given(
    s=scores,
    beta=st.floats(min_value=-4.0, max_value=4.0),
    floor=st.floats(min_value=0.0, max_value=1.0),
    # a subnormal bound does not survive the division by n: 5e-324 / 2 rounds to 0
    low=st.floats(min_value=0.0, max_value=1.0, allow_subnormal=False),
    high=st.one_of(st.floats(min_value=1.0, max_value=1e6), st.just(math.inf)),
)
def test_weights_are_always_a_distribution(s, beta, floor, low, high):
    w = instance_weights(torch.tensor(s, dtype=torch.float64), beta, floor=floor, clip=(low, high))
    assert w.shape == (len(s),)
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-9)
    n = len(s)
    if beta != 0.0:
        assert (n * w >= low * (1 - 1e-6)).all() and (n * w <= high * (1 + 1e-6)).all()


@settings(max_examples=200, deadline=None)
@given(s=st.lists(st.floats(min_value=1e-3, max_value=1e3), min_size=2, max_size=32))
def test_negative_beta_never_gives_a_larger_score_more_weight(s):
    t = torch.tensor(s, dtype=torch.float64)
    w = instance_weights(t, -1.0, floor=0.1, clip=(0.1, 10.0))
    order = torch.argsort(t)
    assert (w[order].diff() <= 1e-12).all()


@pytest.mark.parametrize("beta", [-1.0, 1.0])
def test_a_non_finite_score_counts_as_the_largest_finite_one(beta):
    """An overflowed gradient norm is as exposed as the largest finite one, neither weightless nor dominant."""
    got = instance_weights(torch.tensor([1.0, 2.0, 4.0, math.inf]), beta, **NO_FLOOR_OR_CLIP)
    torch.testing.assert_close(got, instance_weights(torch.tensor([1.0, 2.0, 4.0, 4.0]), beta, **NO_FLOOR_OR_CLIP))


def test_scores_clamped_at_zero_do_not_pull_the_floor_down():
    """Curvature scores: half clamped at 0. The floor is 0.5 × the median of the positive scores (4), so under
    beta < 0 the clamped instances weigh as much as a score of 2 (not all of the weight), and under beta > 0 least."""
    scores = torch.tensor([0.0, 0.0, 0.0, 2.0, 4.0, 8.0])
    floored = torch.tensor([2.0, 2.0, 2.0, 2.0, 4.0, 8.0])
    for beta in (-1.0, 0.5):
        got = instance_weights(scores, beta, floor=0.5, clip=(0.0, math.inf))
        torch.testing.assert_close(got, instance_weights(floored, beta, **NO_FLOOR_OR_CLIP))


def test_the_shipped_curvature_method_up_weights_large_curvature():
    """Least squares has Hessian x_i x_iᵀ: the instance whose x is 10x larger has 100x the curvature along every
    direction, and the shipped curvature config (beta > 0) must give it the largest weight, above uniform."""
    from omegaconf import OmegaConf

    shipped = OmegaConf.load(Path(__file__).parents[1] / "conf" / "method" / "deltasam_curvature.yaml")
    config = dataclasses.replace(DeltaSAMConfig.coerce(OmegaConf.to_container(shipped)), rho_schedule="constant")
    x, y, w = least_squares_problem(n=8)
    x[3] *= 10
    model = LeastSquares(w)
    torch.manual_seed(0)
    result = DeltaSAM(model, config).step(model.losses, (x, y))
    assert int(result.weights.argmax()) == 3 and float(result.weights[3]) > 1 / 8
    assert float(result.weights[3]) > 2 * float(result.weights[torch.arange(8) != 3].max())
