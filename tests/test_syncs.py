"""Host synchronizations per optimizer step, counted by patching the Tensor methods that copy to the host.

Today: ERM 1 (the joint decision whether the update is finite), SAM and ASAM 2 (plus the norm that decides
whether ε is applied or skipped), δ-SAM 3 (plus the check whether the weights need their bounds), m-sharpness one
more per group. The GPU target, at most one per step, needs those decisions on the device; it is not met yet,
and these counts keep it from getting worse.
"""

import collections

import pytest
import torch
from helpers import MLP, classification_data

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

HOST = ("item", "tolist", "__bool__", "__float__", "__int__")


def syncs_of_one_step(options):
    x, y = classification_data(n=16)
    torch.manual_seed(0)
    model = MLP()
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), DeltaSAMConfig(**options))
    opt.step(model.losses, (x, y))  # first steps may check more, once
    counts = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST}

    def counting(name, method):
        def wrapped(self, *args, **kwargs):
            counts[name] += 1
            return method(self, *args, **kwargs)

        return wrapped

    try:
        for name, method in originals.items():
            setattr(torch.Tensor, name, counting(name, method))
        opt.step(model.losses, (x, y))
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)
    return sum(counts.values())


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
