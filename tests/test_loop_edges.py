"""DeltaSAMOptimizer at the edges of what torch and Lightning expect of an optimizer (issue 45): what automatic
optimization logs, step hooks, copies, zeroed gradients, settings nothing reads, a step the loss scaler skips, and
what a newcomer writes first."""

from __future__ import annotations

import copy
import logging
import math
import pickle

import lightning as L
import pytest
import torch
import torchmetrics
from helpers import MLP, Recorder, TinyModule, classification_data, flat_params, loader, trainer
from lightning.pytorch.plugins import MixedPrecision
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

SAM = dict(method="sam", rho=0.05, rho_schedule="constant")


def _batch(seed=1, n=16):
    return classification_data(n=n, seed=seed)


def _sam(options=None, scaler=None, seed=0, momentum=0.0):
    torch.manual_seed(seed)
    model = MLP()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    return model, DeltaSAMOptimizer(model, base, DeltaSAMConfig(**(options or SAM)), scaler=scaler)


# ---- 2. automatic optimization logs L(w), once per batch ----


class LoggingSAM(L.LightningModule):
    """A plain LightningModule returning DeltaSAMOptimizer, logging as users do."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = MLP()
        self.updates = torchmetrics.aggregation.SumMetric()
        self.clean, self.outputs, self.perturbed_flags = [], [], []

    def training_step(self, batch, batch_idx):
        loss = self.model.losses(batch).mean()
        self.updates.update(1.0)
        self.perturbed_flags.append(self.optimizers().perturbed_pass)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("updates", self.updates, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_start(self, batch, batch_idx):
        with torch.no_grad():
            self.clean.append(float(self.model.losses(batch).mean()))  # L(w), before the step

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.outputs.append(float(outputs["loss"]))

    def configure_optimizers(self):
        return DeltaSAMOptimizer(self, torch.optim.SGD(self.parameters(), lr=0.1), DeltaSAMConfig(**SAM))


def test_automatic_optimization_logs_the_loss_at_w_once_per_batch():
    """training_step runs at w and at w + eps; before the fix the step's loss, its output and the epoch mean were
    the perturbed pass's, and a torchmetrics metric counted each batch twice (8 updates for 4 batches)."""
    module, logger = LoggingSAM(), Recorder()
    trainer(max_epochs=1, logger=logger, log_every_n_steps=1).fit(module, loader(n=32, batch_size=8))
    steps = [row["train_loss_step"] for row in [row for row, _ in logger.calls] if "train_loss_step" in row]
    assert steps == pytest.approx(module.clean, rel=1e-6)
    assert module.outputs == pytest.approx(module.clean, rel=1e-6)
    epoch = [row for row in [row for row, _ in logger.calls] if "train_loss_epoch" in row][0]
    assert epoch["train_loss_epoch"] == pytest.approx(sum(module.clean) / 4, rel=1e-6)
    assert epoch["updates"] == 4.0
    assert module.perturbed_flags == [False, True] * 4  # the public flag, for any other side effect


# ---- 3. step hooks fire once per real optimizer step ----


class HookCounts:
    """Local and global pre/post step hooks; the optimizers each global one saw."""

    def __init__(self, opt):
        self.calls = {"local_pre": 0, "local_post": 0, "global_pre": [], "global_post": []}
        self.handles = [
            opt.register_step_pre_hook(lambda o, a, k: self._local("local_pre", o, opt)),
            opt.register_step_post_hook(lambda o, a, k: self._local("local_post", o, opt)),
            register_optimizer_step_pre_hook(lambda o, a, k: self._global("global_pre", o)),
            register_optimizer_step_post_hook(lambda o, a, k: self._global("global_post", o)),
        ]

    def _local(self, name, seen, opt):
        assert seen is opt
        self.calls[name] += 1

    def _global(self, name, seen):
        self.calls[name].append(type(seen).__name__)

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def counts(self):
        return {k: v if isinstance(v, int) else len(v) for k, v in self.calls.items()}


def test_step_hooks_fire_once_per_step_under_accumulation():
    """Before the fix: local hooks 8 times for 2 steps, global ones 10 (the wrapper's 8 calls and the base's 2)."""
    model, opt = _sam(dict(SAM, accumulate_grad_batches=4))
    hooks = HookCounts(opt)
    try:
        for i in range(8):
            opt.step(model.losses, _batch(seed=i))
    finally:
        hooks.remove()
    assert opt.steps == 2
    assert hooks.counts() == dict(local_pre=2, local_post=2, global_pre=2, global_post=2)
    assert hooks.calls["global_pre"] == ["SGD", "SGD"]  # the optimizer that stepped


def test_step_hooks_do_not_fire_for_a_skipped_non_finite_step():
    model, opt = _sam()
    hooks = HookCounts(opt)
    try:
        with pytest.warns(RuntimeWarning, match="non-finite"):
            result = opt.step(lambda b: model.losses(b) * math.nan, _batch())
        opt.step(model.losses, _batch(seed=2))
    finally:
        hooks.remove()
    assert not result.stepped
    assert hooks.counts() == dict(local_pre=1, local_post=1, global_pre=1, global_post=1)


def test_step_hooks_do_not_fire_for_a_step_the_scaler_skipped():
    model, opt = _sam(scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    hooks = HookCounts(opt)
    x, y = _batch()
    x[0] = math.inf  # an inf in G
    try:
        opt.step(model.losses, (x, y))
        opt.step(model.losses, _batch(seed=2))
    finally:
        hooks.remove()
    assert opt.scaler.get_scale() == 2.0**9  # the first step was skipped
    assert hooks.counts() == dict(local_pre=1, local_post=1, global_pre=1, global_post=1)


def test_global_step_hooks_fire_once_per_step_under_automatic_optimization():
    """Lightning steps the wrapper; before the fix a global hook saw it and the base optimizer, twice a step."""
    module = LoggingSAM()
    seen = []
    handle = register_optimizer_step_post_hook(lambda o, a, k: seen.append(type(o).__name__))
    try:
        trainer(max_epochs=1).fit(module, loader(n=32, batch_size=8))
    finally:
        handle.remove()
    assert seen == ["SGD"] * 4


# ---- 6. copy.deepcopy and pickle ----


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize(
    "options",
    [dict(SAM), dict(method="deltasam", rho_schedule="constant", accumulate_grad_batches=2)],
    ids=["sam", "deltasam-window-open"],
)
def test_a_copied_optimizer_trains_the_originals_next_steps(how, options):
    """Before the fix: KeyError '_own_defaults', and the copy had no optimizer, engine or config."""
    model, opt = _sam(options, momentum=0.9)
    for i in range(3):  # with accumulation 2 the window is open after 3 micro-batches
        opt.step(model.losses, _batch(seed=i))
    pair = (model, opt)
    model2, opt2 = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    assert opt2.param_groups[0]["params"][0] is next(model2.parameters())
    assert opt2.config == opt.config and opt2.steps == opt.steps and opt2.loop_state.micro == opt.loop_state.micro
    assert opt2.state_dict()["optimizer"]["state"].keys() == opt.state_dict()["optimizer"]["state"].keys()
    for i in range(3, 6):
        opt.step(model.losses, _batch(seed=i))
        opt2.step(model2.losses, _batch(seed=i))
    assert torch.equal(flat_params(model2), flat_params(model))
    assert not torch.equal(flat_params(model2), flat_params(_sam(options)[0]))


# ---- 7. step(closure) takes the zeros of zero_grad(set_to_none=False) ----


def test_a_closure_step_accepts_zeroed_gradients():
    """step(loss_fn, batch) took them; step(closure) refused them as 'gradients already in .grad'."""
    trained = []
    for set_to_none in (True, False):
        model, opt = _sam()

        for i in range(3):
            batch = _batch(seed=i)

            def closure(model=model, opt=opt, set_to_none=set_to_none, batch=batch):
                opt.zero_grad(set_to_none=set_to_none)
                loss = model.losses(batch).mean()
                loss.backward()
                return loss

            model.losses(batch).mean().backward()  # e.g. a gradient read for a diagnostic, then zeroed
            opt.zero_grad(set_to_none=set_to_none)
            assert opt.step(closure).stepped
        trained.append(flat_params(model))
    assert torch.equal(trained[0], trained[1])
    model, opt = _sam()
    model.losses(_batch()).mean().backward()  # a real gradient is still refused
    with pytest.raises(ValueError, match="found gradients already in .grad"):
        opt.step(lambda: model.losses(_batch()).mean())


# ---- 8. histogram_every_n_steps, which only the mixin reads ----


def test_histogram_every_n_steps_in_a_hand_written_loop_is_refused_by_name():
    model = MLP()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="histogram_every_n_steps=10 is read only by DeltaSAMMixin"):
        DeltaSAMOptimizer(model, base, DeltaSAMConfig(method="sam", histogram_every_n_steps=10))
    DeltaSAMOptimizer(model, base, DeltaSAMConfig(method="sam"))  # the default is not a setting


# ---- a step the loss scaler skipped counts, in the loop as in Lightning ----


class Pattern(TinyModule):
    """Records, per batch, the optimizer step it belonged to and whether it perturbed."""

    def __init__(self, config):
        super().__init__(config)
        self.pattern = []

    def training_step(self, batch, batch_idx):
        step = self.global_step
        result = self.deltasam_step(batch)
        self.pattern.append((step, result.perturbed_losses is not None))
        return result.loss


def _overflowing_data():
    batches = [_batch(seed=i, n=8) for i in range(4)]
    batches[1][0][0] = math.inf  # an inf in the second step's gradient
    return torch.utils.data.DataLoader(batches, batch_size=None)


def test_a_step_the_scaler_skipped_counts_in_the_loop_as_in_lightnings_global_step():
    """interval=2: steps 0 and 2 perturb. Before the fix the loop did not count the skipped step 1 and took the
    pattern full, plain, plain, full where the mixin took full, plain, full, plain."""
    config = dict(method="sam", rho=0.05, rho_schedule="constant", interval=2)
    model, opt = _sam(config, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    loop = []
    for batch in _overflowing_data():
        step = opt.steps
        result = opt.step(model.losses, batch)
        loop.append((step, result.perturbed_losses is not None))
    assert opt.scaler.get_scale() == 2.0**9 and opt.steps == 4

    module = Pattern(DeltaSAMConfig(**config))
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    fit = trainer(max_epochs=1, plugins=[plugin])
    fit.fit(module, _overflowing_data())
    assert plugin.scaler.get_scale() == 2.0**9 and fit.global_step == 4
    assert loop == module.pattern == [(0, True), (1, False), (2, True), (3, False)]


# ---- repr ----


def test_the_repr_names_the_base_optimizer_the_method_and_the_settings():
    _, opt = _sam(dict(SAM, accumulate_grad_batches=2))
    text = repr(opt)
    assert text.startswith("DeltaSAMOptimizer(SGD, method='sam', rho=0.05, rho_schedule='constant'")
    assert "accumulate_grad_batches=2" in text and "lr: 0.1" in text


# ---- what a newcomer writes first ----


class ReturnsTheResult(TinyModule):
    def training_step(self, batch, batch_idx):
        return self.deltasam_step(batch)


def test_returning_the_step_result_from_training_step_trains():
    """Before the fix Lightning's error: training_step must return a Tensor."""
    module = ReturnsTheResult(DeltaSAMConfig(**SAM))
    before = flat_params(module)
    fit = trainer(max_steps=2)
    fit.fit(module, loader())
    assert fit.global_step == 2 and not torch.equal(flat_params(module), before)


@pytest.mark.parametrize(
    "flag, field",
    [
        (dict(accumulate_grad_batches=4), "DeltaSAMConfig\\(..., accumulate_grad_batches=4\\)"),
        (dict(gradient_clip_val=1.0), "DeltaSAMConfig\\(..., gradient_clip_val=1.0\\)"),
        (
            dict(gradient_clip_val=0.5, gradient_clip_algorithm="value"),
            "DeltaSAMConfig\\(..., gradient_clip_val=0.5, gradient_clip_algorithm='value'\\)",
        ),
    ],
)
def test_trainer_flags_of_automatic_optimization_name_the_config_field(flag, field):
    with pytest.raises(ValueError, match=field):
        trainer(max_steps=1, **flag).fit(TinyModule(DeltaSAMConfig(**SAM)), loader())


def test_16_mixed_on_the_cpu_says_what_runs():
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addHandler(handler)
    try:
        with pytest.warns(UserWarning, match="Using `precision='bf16-mixed'` instead"):
            fit = trainer(max_steps=2, precision="16-mixed")
        fit.fit(TinyModule(DeltaSAMConfig(**SAM)), loader())
    finally:
        logging.getLogger("lightning.pytorch.utilities.rank_zero").removeHandler(handler)
    said = [r for r in records if r.startswith("DeltaSAMMixin: precision bf16-mixed on the CPU")]
    assert len(said) == 1 and "MixedPrecision('16-mixed', 'cpu', torch.amp.GradScaler('cpu'))" in said[0]


# ---- Lightning's private API, read in one place ----


def test_the_private_api_of_lightning_that_is_read_is_there(monkeypatch):
    from lit_deltasam.lightning import private

    private.check()
    monkeypatch.setitem(private.USED, private.Closure, ("_result", "_dropped_by_an_upgrade"))
    with pytest.raises(
        RuntimeError, match="no longer have: lightning.pytorch.loops.optimization.automatic.Closure._dropped"
    ):
        private.check()
