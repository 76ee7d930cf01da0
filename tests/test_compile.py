"""torch.compile: a compiled model trains as the eager one does, through the plain loop and the mixin, with the
head estimator's one limit (its hooks cannot see inside a compiled graph) refused by name."""

import pytest
import torch
from helpers import MLP, TinyModule, classification_data, flat_params, loader, trainer

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

SAM = dict(method="sam", rho=0.1, rho_schedule="constant")
HEAD = dict(method="deltasam", estimator="head", rho=0.1, rho_schedule="constant")


def plain_fit(options, compile_part):
    torch.manual_seed(0)
    model = MLP()
    if compile_part == "all":
        model.net = torch.compile(model.net)
    elif compile_part == "body":
        model.net[0] = torch.compile(model.net[0])
    x, y = classification_data(n=32)
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), DeltaSAMConfig(**options))
    for i in range(0, 32, 8):
        opt.step(model.losses, (x[i : i + 8], y[i : i + 8]))
    return flat_params(model)


@pytest.mark.parametrize("options, part", [(SAM, "all"), (HEAD, "body")], ids=["sam-all", "deltasam-head-body"])
def test_the_plain_loop_trains_a_compiled_model_as_the_eager_one(options, part):
    torch.testing.assert_close(plain_fit(options, part), plain_fit(options, None), atol=1e-6, rtol=0)


def test_the_head_estimator_inside_a_compiled_graph_is_refused_by_name():
    with pytest.raises(RuntimeError, match="torch.compile'd module.*leave the classifier eager"):
        plain_fit(HEAD, "all")


class Compiled(TinyModule):
    def __init__(self, config):
        super().__init__(config, optimizer="adamw", lr=0.01)
        self.model.net = torch.compile(self.model.net)


@pytest.mark.parametrize("method", ["erm", "sam"])
def test_the_mixin_trains_a_compiled_model_as_the_eager_one(method):
    def fit(compiled):
        torch.manual_seed(0)
        config = DeltaSAMConfig(**{**SAM, "method": method})
        module = Compiled(config) if compiled else TinyModule(config, optimizer="adamw", lr=0.01)
        trainer(max_steps=4).fit(module, loader(n=32))
        return flat_params(module)

    torch.testing.assert_close(fit(True), fit(False), atol=1e-6, rtol=0)
