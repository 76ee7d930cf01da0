"""Fault injection: an exception or a KeyboardInterrupt in any phase of a step loses nothing."""

import math
import warnings

import pytest
import torch
from helpers import TinyModule, loader, trainer
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus

from lit_deltasam import DeltaSAMConfig

FAIL_AT_STEP = 2  # two steps succeed, the third fails


class Injected(Exception):
    pass


class Faulty(TinyModule):
    """Raises ``exc`` in the chosen phase of the third step."""

    def __init__(self, config, phase, exc, **kwargs):
        super().__init__(config, batchnorm=True, dropout=0.1, **kwargs)
        self.phase, self.exc = phase, exc
        self.losses_called = self.backwards_called = 0

    def armed(self):
        return self.trainer.global_step == FAIL_AT_STEP

    def on_train_batch_start(self, batch, batch_idx):
        self.losses_called = self.backwards_called = 0

    def per_sample_loss(self, batch):
        losses = super().per_sample_loss(batch)
        self.losses_called += 1
        last = 2 + (self.deltasam.probe_samples if self.deltasam.estimator == "probe" else 0)
        if self.armed() and (
            (self.phase == "probe" and self.losses_called == 2)
            or (self.phase == "perturbed_forward" and self.losses_called == last)
        ):
            raise self.exc("injected")
        return losses

    def manual_backward(self, loss, *args, **kwargs):
        self.backwards_called += 1
        if self.armed() and (
            (self.phase == "ascent_backward" and self.backwards_called == 1)
            or (self.phase == "descent_backward" and self.backwards_called == 2)
        ):
            first = next(self.parameters())
            first.register_hook(lambda grad: (_ for _ in ()).throw(self.exc("injected in backward")))
        super().manual_backward(loss, *args, **kwargs)

    def clip_gradients(self, *args, **kwargs):
        if self.armed() and self.phase == "clipping":
            raise self.exc("injected")
        super().clip_gradients(*args, **kwargs)

    def configure_optimizers(self):
        module = self

        class HalfwaySGD(torch.optim.SGD):
            """Updates the first parameter, then fails: a partial optimizer step."""

            def step(self, closure=None):
                if module.armed() and module.phase == "optimizer_step":
                    with torch.no_grad():
                        self.param_groups[0]["params"][0].add_(1.0)
                    raise module.exc("injected")
                return super().step(closure)

        return HalfwaySGD(self.parameters(), lr=0.1)


class Snapshot(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


PHASES = ["probe", "ascent_backward", "perturbed_forward", "descent_backward", "clipping", "optimizer_step"]


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("phase", PHASES)
def test_a_failing_phase_leaves_weights_buffers_and_checkpoints_clean(phase, exc, tmp_path):
    config = DeltaSAMConfig(method="deltasam", estimator="probe", probe_samples=2, rho=1.0, gradient_clip_val=1.0)
    module = Faulty(config, phase, exc)
    snapshot = Snapshot()
    fit = trainer(max_steps=5, callbacks=[snapshot, OnExceptionCheckpoint(tmp_path)], enable_checkpointing=True)
    with pytest.raises(Injected if exc is Injected else SystemExit):
        fit.fit(module, loader(n=64))
    assert fit.global_step == FAIL_AT_STEP
    assert fit.state.status == TrainerStatus.INTERRUPTED
    for key, value in module.state_dict().items():
        assert torch.equal(value, snapshot.state[key]), key
    saved = torch.load(tmp_path / "on_exception.ckpt", weights_only=False)["state_dict"]
    for key, value in saved.items():
        assert torch.equal(value, snapshot.state[key]), key


@pytest.mark.parametrize("where", ["clean", "perturbed"])
def test_non_finite_loss_skips_the_step_with_a_warning_and_a_count(where):
    class Poisoned(TinyModule):
        """Returns NaN losses in the clean or the perturbed forward of the second batch."""

        def on_train_batch_start(self, batch, batch_idx):
            self.batch_idx, self.calls = batch_idx, 0

        def per_sample_loss(self, batch):
            losses = super().per_sample_loss(batch)
            self.calls += 1
            poisoned = self.batch_idx == 1 and self.calls == (1 if where == "clean" else 2)
            return losses * math.nan if poisoned else losses

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.parameters()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                self.unchanged = all(torch.equal(a, b) for a, b in zip(self.before, pl_module.parameters()))

    watch = Watch()
    module = Poisoned(DeltaSAMConfig(method="sam"))
    fit = trainer(max_steps=3, max_epochs=1, callbacks=[watch])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(module, loader(n=64))
    assert any("non-finite loss or gradient" in str(w.message) for w in caught)
    assert watch.unchanged
    assert module._deltasam_state.steps_skipped == 1
    assert fit.global_step == 3  # the skipped batch did not count as an optimizer step
    assert fit.callback_metrics["sam/steps_skipped"] == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_optimizer_with_parameters_the_module_does_not_own():
    class Stranger(TinyModule):
        def configure_optimizers(self):
            return torch.optim.SGD([*self.parameters(), torch.nn.Parameter(torch.zeros(2))], lr=0.1)

    with pytest.raises(ValueError, match=r"parameter #\d+ \(shape \[2\]\) is not owned by Stranger"):
        trainer(max_steps=1).fit(Stranger(DeltaSAMConfig()), loader())


def test_optimizer_with_a_frozen_parameter():
    class Frozen(TinyModule):
        def configure_optimizers(self):
            self.model.net[0].bias.requires_grad_(False)
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match=r"'model.net.0.bias' is frozen"):
        trainer(max_steps=1).fit(Frozen(DeltaSAMConfig()), loader())


def test_two_optimizers_are_refused():
    class Two(TinyModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.net[0].parameters(), lr=0.1), torch.optim.SGD(
                self.model.net[3].parameters(), lr=0.1
            )

    with pytest.raises(ValueError, match="drives exactly one optimizer; configure_optimizers returned 2"):
        trainer(max_steps=1).fit(Two(DeltaSAMConfig()), loader())
