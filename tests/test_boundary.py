"""What manual optimization bypasses, re-created or refused: validation inside a window, the hooks Lightning's
automatic loop calls (optimizer_step, optimizer_zero_grad, configure_gradient_clipping), epoch schedulers at
max_steps, lr_max for follow_lr, and head auto-detection."""

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyModule, flat_params, loader, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_deltasam import DeltaSAM, DeltaSAMConfig

SAM = dict(method="sam", rho=0.2, rho_schedule="constant")


class SaveAtValidation(Callback):
    """Saves a checkpoint at the end of the first validation run, and the gradients it saw."""

    def __init__(self, path):
        self.path, self.grads = path, None

    def on_validation_end(self, trainer, pl_module):
        if self.grads is None:
            self.grads = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]
            trainer.save_checkpoint(self.path)


def test_validation_inside_an_accumulation_window_leaves_the_step_alone(tmp_path):
    """Windows of 3 micro-batches, validation every 2: the fit equals one without validation, bit for bit, and
    the checkpoint saved at that validation holds the window's partial gradients."""

    def fit(validate, callbacks=(), ckpt_path=None):
        torch.manual_seed(0)
        module = TinyModule(DeltaSAMConfig(**SAM, accumulate_grad_batches=3), dropout=0.2)
        kwargs = dict(val_check_interval=2, limit_val_batches=1) if validate else dict(limit_val_batches=0)
        trainer(max_epochs=2, callbacks=list(callbacks), **kwargs).fit(
            module, loader(n=48, shuffle=True), loader(n=16) if validate else None, ckpt_path=ckpt_path
        )
        return flat_params(module)

    save = SaveAtValidation(tmp_path / "val.ckpt")
    full = fit(True, [save])
    assert torch.equal(full, fit(False))
    # resumed from the validation inside the window: exact, as Lightning's own mid-epoch resume is
    assert torch.equal(fit(True, ckpt_path=tmp_path / "val.ckpt"), full)
    assert all(g is not None and g.abs().sum() > 0 for g in save.grads)  # after 2 of 3 micro-batches
    saved = torch.load(tmp_path / "val.ckpt", weights_only=False)["deltasam"]
    assert saved["state"]["micro"] == 2
    for g, s in zip(save.grads, saved["grads"]):
        assert torch.equal(g, s)


class WarmUp(TinyModule):
    """Lightning's documented LR warm-up recipe: an optimizer_step override."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.calls = getattr(self, "calls", 0) + 1
        for group in optimizer.param_groups:
            group["lr"] = 0.0 if self.frozen else self.lr * min(1.0, (self.trainer.global_step + 1) / 4)
        optimizer.step(closure=optimizer_closure)


@pytest.mark.parametrize("frozen", [True, False])
def test_an_optimizer_step_override_is_honoured(frozen):
    module = WarmUp(DeltaSAMConfig(**SAM))
    module.frozen = frozen
    start = flat_params(module)
    trainer(max_steps=3).fit(module, loader())
    assert module.calls == 3
    assert torch.equal(flat_params(module), start) == frozen
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.0 if frozen else 0.1 * 3 / 4)


class Skips(TinyModule):
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        pass


def test_an_optimizer_step_override_that_never_steps_is_refused():
    module = Skips(DeltaSAMConfig(**SAM))
    start = flat_params(module)
    with pytest.raises(RuntimeError, match=r"optimizer_step returned without stepping.*optimizer\.step\(closure="):
        trainer(max_steps=2).fit(module, loader())
    assert torch.equal(flat_params(module), start)


class ClipsItself(TinyModule):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_args = (gradient_clip_val, gradient_clip_algorithm)
        self.clip_gradients(optimizer, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")


class ZeroesItself(TinyModule):
    def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
        self.zeroed = getattr(self, "zeroed", 0) + 1
        optimizer.zero_grad()


def test_configure_gradient_clipping_and_optimizer_zero_grad_overrides_are_honoured():
    def fit(cls, **options):
        torch.manual_seed(0)
        module = cls(DeltaSAMConfig(**SAM, **options))
        trainer(max_steps=3).fit(module, loader())
        return module

    own = fit(ClipsItself)
    assert own.clip_args == (None, "norm")
    assert torch.equal(flat_params(own), flat_params(fit(TinyModule, gradient_clip_val=1e-3)))
    assert not torch.equal(flat_params(own), flat_params(fit(TinyModule)))
    assert fit(ZeroesItself).zeroed == 3


def test_an_epoch_cut_short_by_max_steps_does_not_step_epoch_schedulers():
    """As in automatic optimization: max_steps=3 ends the 4-batch first epoch early, and the LR stays."""
    module = TinyModule(DeltaSAMConfig(**SAM), scheduler=dict(kind="step", interval="epoch", frequency=1))
    trainer(max_steps=3).fit(module, loader(n=32))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1)
    module = TinyModule(DeltaSAMConfig(**SAM), scheduler=dict(kind="step", interval="epoch", frequency=1))
    trainer(max_steps=4).fit(module, loader(n=32))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.05)


class Cyclic(TinyModule):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=4)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RecordRhoAndLR(Callback):
    def __init__(self):
        self.pairs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pairs.append((pl_module.deltasam_rho(), pl_module.optimizers().param_groups[0]["lr"]))


def test_follow_lr_reads_cyclic_lrs_maximum():
    record = RecordRhoAndLR()
    module = Cyclic(DeltaSAMConfig(method="sam", rho=0.2, rho_schedule="follow_lr"))
    trainer(max_steps=6, callbacks=[record]).fit(module, loader())
    for rho, lr in record.pairs:
        assert rho == pytest.approx(0.2 * lr / 0.1)
    assert record.pairs[0][0] == pytest.approx(0.02)


class ManualWarmUp(TinyModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr / 4)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        for group in optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (self.trainer.global_step + 1) / 4)


def test_follow_lr_warns_when_the_lr_rises_past_every_stated_maximum():
    module = ManualWarmUp(DeltaSAMConfig(method="sam", rho=0.2, rho_schedule="follow_lr"))
    with pytest.warns(RuntimeWarning, match="follow_lr' cannot tell lr_max"):
        trainer(max_steps=4).fit(module, loader())


class WithAux(nn.Module):
    """A classifier followed by an auxiliary projection that does not feed the loss; or, with ``parallel``,
    two heads that both do."""

    def __init__(self, parallel=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.classifier = nn.Linear(12, 3)
        self.aux = nn.Linear(12, 5)
        self.parallel = parallel

    def losses(self, batch):
        x, y = batch
        h = self.body(x)
        logits = self.classifier(h)
        extra = self.aux(h)
        loss = F.cross_entropy(logits, y, reduction="none")
        return loss + extra.pow(2).mean(1) if self.parallel else loss


def head_scores(model, config, batch):
    engine = DeltaSAM(model, config)
    with engine.scorer.head:
        losses = model.losses(batch)
    return engine.scorer.head.scores(losses), engine.scorer.head.name


def test_head_detection_passes_over_a_layer_whose_output_does_not_reach_the_loss():
    torch.manual_seed(0)
    model = WithAux()
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    auto, name = head_scores(model, DeltaSAMConfig(method="deltasam"), batch)
    explicit, _ = head_scores(model, DeltaSAMConfig(method="deltasam", head="classifier"), batch)
    assert name == "classifier"
    torch.testing.assert_close(auto, explicit)
    assert auto.std() > 0


def test_head_detection_refuses_parallel_heads_and_names_them():
    torch.manual_seed(0)
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match=r"\['aux', 'classifier'\].*set DeltaSAMConfig.head"):
        head_scores(WithAux(parallel=True), DeltaSAMConfig(method="deltasam"), batch)


def test_a_head_whose_output_does_not_reach_the_loss_warns_once():
    torch.manual_seed(0)
    model = WithAux()
    batch = (torch.randn(8, 6), torch.randint(0, 3, (8,)))
    engine = DeltaSAM(model, DeltaSAMConfig(method="deltasam", head="aux"))
    with pytest.warns(RuntimeWarning, match="'aux' are all zero: its output does not reach the loss"):
        engine.step(model.losses, batch)
    with warnings_as_errors():
        engine.step(model.losses, batch)


def warnings_as_errors():
    import warnings

    class Context:
        def __enter__(self):
            self.catch = warnings.catch_warnings()
            self.catch.__enter__()
            warnings.simplefilter("error", RuntimeWarning)

        def __exit__(self, *exc):
            return self.catch.__exit__(*exc)

    return Context()
