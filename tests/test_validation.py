"""Bad input fails early with an error that names the bad value and the valid choices."""

import math

import pytest
import torch
from helpers import MLP, TinyModule, classification_data, loader, trainer

from lit_deltasam import DeltaSAM, DeltaSAMConfig


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(rho=-0.1), r"rho=-0.1 .*a finite number >= 0.0"),
        (dict(rho=math.inf), r"rho=inf"),
        (
            dict(method="sharp"),
            r"method='sharp' .*\['erm', 'sam', 'asam', 'deltasam', 'per_instance', 'gsam', 'wsam', 'fsam'\]",
        ),
        (dict(estimator="oracle"), r"estimator='oracle' .*\['head', 'probe', 'curvature', 'exact'\]"),
        (dict(beta=math.nan), r"beta=nan"),
        (dict(beta=math.inf), r"beta=inf"),
        (dict(ascent="everywhere"), r"ascent='everywhere' .*\['local', 'global'\]"),
        (dict(weight_min=2.0), r"weight_min=2.0"),
        (dict(weight_max=0.5), r"weight_max=0.5"),
        (dict(probe_samples=0), r"probe_samples=0"),
        (dict(estimator="probe", probe_samples=3, probe_antithetic=True), r"probe_samples=3 must be even"),
        (dict(accumulate_grad_batches=0), r"accumulate_grad_batches=0"),
        (dict(gradient_clip_val=0.0), r"gradient_clip_val=0.0"),
        (dict(gradient_clip_algorithm="l3"), r"gradient_clip_algorithm='l3' .*\['norm', 'value'\]"),
        (dict(per_instance_impl="jit"), r"per_instance_impl='jit' .*\['loop', 'vmap'\]"),
        (dict(probe_params=[]), r"probe_params=\[\] selects nothing"),
        (dict(rho="0.05"), r"rho='0.05'"),
        (dict(probe_params="encoder.layer.5.*"), r"probe_params='encoder.layer.5.\*' .*\['encoder.layer.5.\*'\]"),
        (dict(probe_params=[1]), r"probe_params=\[1\] .*list of name patterns"),
        (dict(share_dropout="no"), r"share_dropout='no' .*True or False"),
        (dict(seed_steps=1), r"seed_steps=1 .*True or False"),
    ],
)
def test_config_errors_name_the_value_and_the_choices(options, match):
    with pytest.raises(ValueError, match=match):
        DeltaSAMConfig(**options)


def test_unknown_config_keys_are_named_with_the_valid_fields():
    with pytest.raises(ValueError, match=r"no field \['rhoo'\]; valid fields are \[.*'rho'.*\]"):
        DeltaSAMConfig.coerce({"rhoo": 0.1, "_target_": "lit_deltasam.DeltaSAMConfig"})


def test_config_is_immutable():
    with pytest.raises(AttributeError):
        DeltaSAMConfig().rho = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (lambda out: out[:4], ValueError, r"returned shape \[4\] .* shape \[8\]"),
        (lambda out: out[:, None], ValueError, r"returned shape \[8, 1\]"),
        (lambda out: out.long(), TypeError, r"dtype torch.int64"),
        (lambda out: out.tolist(), TypeError, r"must return a Tensor .* got list"),
        (lambda out: out.to("meta"), ValueError, r"on meta, but the parameters are on cpu"),
    ],
)
@pytest.mark.parametrize("method", ["erm", "sam", "deltasam"])
def test_per_sample_loss_of_the_wrong_kind(bad, error, match, method):
    model = MLP()
    sam = DeltaSAM(model, DeltaSAMConfig(method=method))
    with pytest.raises(error, match=match):
        sam.step(lambda b: bad(model.losses(b)), classification_data(n=8))


def test_a_scalar_loss_is_refused_where_the_method_needs_one_per_instance():
    """ERM, SAM and ASAM take a scalar mean loss (test_api_edges.py); δ-SAM and per-instance SAM cannot."""
    model = MLP()
    for method in ("deltasam", "per_instance"):
        sam = DeltaSAM(model, DeltaSAMConfig(method=method))
        with pytest.raises(ValueError, match=r"returned shape \[\] .* \(a scalar mean loss serves"):
            sam.step(lambda b: model.losses(b).mean(), classification_data(n=8))


def test_empty_batch():
    model = MLP()
    x, y = classification_data(n=8)
    with pytest.raises(ValueError, match=r"empty batch \(0 instances\)"):
        DeltaSAM(model, DeltaSAMConfig()).step(model.losses, (x[:0], y[:0]))


def test_parameter_the_module_does_not_own():
    model = MLP()
    stranger = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"parameter #\d+ \(shape \[3, 2\]\) is not owned by MLP"):
        DeltaSAM(model, DeltaSAMConfig(), [*model.parameters(), stranger])


def test_frozen_parameter():
    model = MLP()
    model.net[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'net.0.bias' is frozen \(requires_grad=False\)"):
        DeltaSAM(model, DeltaSAMConfig(), list(model.parameters()))
    DeltaSAM(model, DeltaSAMConfig())  # the default takes only trainable parameters


def test_head_that_is_not_a_linear_layer():
    with pytest.raises(ValueError, match=r"head='net.1' is a Tanh"):
        DeltaSAM(MLP(), DeltaSAMConfig(head="net.1"))
    with pytest.raises(
        ValueError, match=r"head='net.9' names no submodule; the linear layers are \['net.0', 'net.3'\]"
    ):
        DeltaSAM(MLP(), DeltaSAMConfig(head="net.9"))


def test_probe_params_that_match_nothing():
    with pytest.raises(
        ValueError, match=r"probe_params=\['encoder.\*'\] match no parameter; the names are: net.0.weight"
    ):
        DeltaSAM(MLP(), DeltaSAMConfig(estimator="probe", probe_params=["encoder.*"]))


def test_per_instance_rejects_batchnorm_in_training_mode():
    model = MLP(batchnorm=True)
    with pytest.raises(ValueError, match=r"'net.1' is a BatchNorm1d in training mode"):
        DeltaSAM(model, DeltaSAMConfig(method="per_instance")).step(model.losses, classification_data(n=8))


def test_per_instance_needs_every_trainable_parameter():
    model = MLP()
    with pytest.raises(ValueError, match=r"other trainable parameters \['net.0.weight', 'net.0.bias'\]"):
        DeltaSAM(model, DeltaSAMConfig(method="per_instance"), params=list(model.net[-1].parameters()))


def test_mixin_without_a_config():
    module = TinyModule(DeltaSAMConfig())
    del module.deltasam
    with pytest.raises(TypeError, match=r"TinyModule.deltasam must be a DeltaSAMConfig"):
        trainer(max_steps=1).fit(module, loader())


def test_mixin_accepts_a_mapping_config():
    module = TinyModule(DeltaSAMConfig())
    module.deltasam = {"_target_": "lit_deltasam.DeltaSAMConfig", "method": "sam", "rho": 0.1}
    trainer(max_steps=1).fit(module, loader())
    assert module.deltasam == DeltaSAMConfig(method="sam", rho=0.1)


def test_mixin_refuses_automatic_optimization():
    with pytest.raises(ValueError, match="automatic_optimization cannot be set to True"):
        TinyModule(DeltaSAMConfig()).automatic_optimization = True


def test_the_mixin_listed_after_lightning_module_is_refused_naming_the_fix():
    import lightning as L

    from lit_deltasam import DeltaSAMMixin

    with pytest.raises(TypeError, match=r"class Wrong\(DeltaSAMMixin, L.LightningModule\)"):

        class Wrong(L.LightningModule, DeltaSAMMixin):
            pass


def test_every_config_error_is_a_config_error_and_a_value_error():
    from lit_deltasam.config import ConfigError

    for options in (dict(rho=-1.0), dict(method="sam", beta=-1.0), dict(reuse="looksam"), dict(probe_params=[])):
        with pytest.raises(ConfigError) as caught:
            DeltaSAMConfig(**options)
        assert isinstance(caught.value, ValueError)


def test_every_field_has_one_spec_row():
    import dataclasses

    from lit_deltasam.config import SPEC

    assert list(SPEC) == [f.name for f in dataclasses.fields(DeltaSAMConfig)]


@pytest.mark.parametrize("impl", ["loop", "vmap"])
def test_per_instance_impl_chosen_for_per_instance_sam_is_honoured_on_every_device(impl):
    """``group_impl="auto"`` batches per-instance SAM on CUDA, where ``per_instance_impl`` is not read: a user who
    chose it gets the per-instance loop it runs in, on every device."""
    from lit_deltasam.core.groups import group_impl

    config = DeltaSAMConfig(method="per_instance", per_instance_impl=impl)
    assert config.group_impl == "loop" and config.per_instance_impl == impl
    assert group_impl(config, torch.device("cuda")) == "loop"
    assert group_impl(DeltaSAMConfig(method="per_instance"), torch.device("cuda")) == "batched"  # unchosen: auto
    with pytest.raises(ValueError, match=rf"per_instance_impl='{impl}' does nothing with method='per_instance'"):
        DeltaSAMConfig(method="per_instance", per_instance_impl=impl, group_impl="batched")


def test_the_resolved_views_have_no_unset_fields():
    config = DeltaSAMConfig(method="deltasam", estimator="probe", rho=0.05)
    assert config.weighting is not None and config.weighting.beta == -0.5 and config.weighting.estimator == "probe"
    assert config.probing is not None and config.probing.sigma == 0.05 and config.probing.samples == 3
    assert DeltaSAMConfig(method="sam").weighting is None and DeltaSAMConfig(method="sam").probing is None
    assert DeltaSAMConfig(method="sam", interval=2, reuse="looksam").loop.reuse_alpha == 0.7


def test_a_clip_algorithm_without_a_value_is_refused_where_nothing_reads_it():
    """``gradient_clip_algorithm`` alone clips nothing in a hand-written loop, nor in the mixin unless the module
    overrides ``configure_gradient_clipping`` (which Lightning's loop hands it to: honoured there)."""
    from lit_deltasam import DeltaSAMOptimizer

    config = DeltaSAMConfig(method="sam", gradient_clip_algorithm="value")
    model = MLP()
    with pytest.raises(ValueError, match=r"gradient_clip_algorithm='value' without gradient_clip_val clips nothing"):
        DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    with pytest.raises(ValueError, match=r"gradient_clip_algorithm='value' without gradient_clip_val .* override"):
        trainer(max_steps=1).fit(TinyModule(config), loader())

    class OwnClipping(TinyModule):
        seen: list = []

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.seen.append(gradient_clip_algorithm)

    module = OwnClipping(config)
    trainer(max_steps=2).fit(module, loader())
    assert module.seen == ["value", "value"]
