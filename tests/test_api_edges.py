"""The API's edges (issue 36): decisions on the device against their host twins on non-finite input, a loss scaler
in the plain loop, radii and settings that would otherwise be ignored."""

import math

import pytest
import torch
from helpers import MLP, classification_data

from lit_deltasam import DeltaSAM, DeltaSAMConfig
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
