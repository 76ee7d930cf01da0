"""ρ schedules: the radius at each step in closed form, and the Lightning trajectory that uses it."""

import lightning as L
import pytest
import torch
from helpers import least_squares_problem, ls_grad, trainer
from lightning.pytorch.callbacks import Callback

from lit_deltasam import DeltaSAM, DeltaSAMConfig, DeltaSAMMixin, scheduled_rho

RHO, LR, STEPS = 0.2, 0.05, 8


def test_constant_is_rho_at_every_step():
    cfg = DeltaSAMConfig(method="sam", rho=RHO)
    assert [scheduled_rho(cfg, t) for t in (0, 5, 1000)] == [RHO] * 3


def test_warmup_ramps_linearly_over_steps_or_a_fraction_of_training():
    steps = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="warmup", rho_warmup=4)
    assert [scheduled_rho(steps, t) for t in range(6)] == pytest.approx([0, RHO / 4, RHO / 2, 3 * RHO / 4, RHO, RHO])
    fraction = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="warmup", rho_warmup=0.25)
    assert [scheduled_rho(fraction, t, total_steps=16) for t in (0, 2, 4, 10)] == pytest.approx([0, RHO / 2, RHO, RHO])


def test_follow_lr_scales_rho_with_the_learning_rate():
    cfg = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="follow_lr")
    assert [scheduled_rho(cfg, 0, lr_ratio=r) for r in (0.0, 0.5, 1.0, 1.5)] == pytest.approx([0, RHO / 2, RHO, RHO])


def test_start_step_takes_plain_steps_first():
    cfg = DeltaSAMConfig(method="asam", rho=RHO, rho_schedule="start_step", rho_warmup=3)
    assert [scheduled_rho(cfg, t) for t in range(5)] == [0.0, 0.0, 0.0, RHO, RHO]


def test_a_fraction_needs_the_length_of_training():
    cfg = DeltaSAMConfig(method="sam", rho_schedule="warmup", rho_warmup=0.1)
    with pytest.raises(ValueError, match="rho_warmup=0.1 is a fraction of training.*pass total_steps"):
        scheduled_rho(cfg, 3)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(rho_schedule="cosine"), r"rho_schedule='cosine' is not valid; choose one of \['constant', 'warmup'"),
        (dict(rho_warmup=2.5), r"rho_warmup=2.5 is not valid; it must be a whole number of optimizer steps"),
        (dict(rho_warmup=-1), r"rho_warmup=-1 is not valid"),
    ],
)
def test_bad_schedules_fail_naming_the_value(fields, match):
    with pytest.raises(ValueError, match=match):
        DeltaSAMConfig(**fields)


def test_the_engine_takes_a_plain_step_at_rho_zero():
    x, y, w = least_squares_problem()
    model = LeastSquaresModule(DeltaSAMConfig(method="sam", rho=RHO), x, y, w)
    result = DeltaSAM(model, model.deltasam).step(model.per_sample_loss, (x, y), rho=0.0)
    torch.testing.assert_close(model.w.grad, ls_grad(x, y, w), atol=1e-12, rtol=0)
    assert result.perturbed_losses is None


class LeastSquaresModule(DeltaSAMMixin, L.LightningModule):
    """Full-batch least squares under SGD, optionally with the LR warming up over 4 steps."""

    def __init__(self, config, x, y, w, lr_warmup=False):
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.x, self.y = x, y
        self.deltasam = config
        self.lr_warmup = lr_warmup

    def per_sample_loss(self, batch):
        x, y = batch
        return 0.5 * (x @ self.w - y) ** 2

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        if not self.lr_warmup:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(self.x.repeat(STEPS, 1), self.y.repeat(STEPS))
        return torch.utils.data.DataLoader(data, batch_size=len(self.y))


class RecordRho(Callback):
    def __init__(self):
        self.rhos = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.rhos.append(float(trainer.callback_metrics["sam/rho"]))


def closed_form_trajectory(x, y, w, rhos, lrs):
    for rho, lr in zip(rhos, lrs):
        g = ls_grad(x, y, w)
        w = w - lr * ls_grad(x, y, w + rho * g / g.norm())
    return w


@pytest.mark.parametrize(
    "schedule, warmup, lr_warmup, expected_rhos",
    [
        ("constant", 0.1, False, [RHO] * STEPS),
        ("warmup", 4, False, [0, RHO / 4, RHO / 2, 3 * RHO / 4] + [RHO] * 4),
        ("warmup", 0.5, False, [0, RHO / 4, RHO / 2, 3 * RHO / 4] + [RHO] * 4),
        ("start_step", 3, False, [0, 0, 0] + [RHO] * 5),
        ("follow_lr", 0.1, True, [RHO / 4, RHO / 2, 3 * RHO / 4] + [RHO] * 5),
    ],
)
def test_each_step_of_a_lightning_run_uses_its_scheduled_rho(schedule, warmup, lr_warmup, expected_rhos):
    x, y, w = least_squares_problem()
    span = dict(rho_warmup=warmup) if schedule in ("warmup", "start_step") else {}
    config = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule=schedule, **span)
    module = LeastSquaresModule(config, x, y, w, lr_warmup=lr_warmup)
    record = RecordRho()
    trainer(max_epochs=1, callbacks=[record]).fit(module)
    assert record.rhos == pytest.approx(expected_rhos, abs=1e-7)
    lrs = [LR * min(1.0, (t + 1) / 4) if lr_warmup else LR for t in range(STEPS)]
    expected = closed_form_trajectory(x, y, w, expected_rhos, lrs)
    torch.testing.assert_close(module.w.detach(), expected, atol=1e-10, rtol=0)


class SaveAfter(Callback):
    def __init__(self, path, step):
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_a_resumed_run_continues_the_schedule(tmp_path):
    x, y, w = least_squares_problem()
    config = DeltaSAMConfig(method="sam", rho=RHO, rho_schedule="warmup", rho_warmup=6)
    trainer(max_epochs=1, callbacks=[SaveAfter(tmp_path / "mid.ckpt", 3)]).fit(
        LeastSquaresModule(config, x, y, w, lr_warmup=True)
    )
    resumed = LeastSquaresModule(config, x, y, w, lr_warmup=True)
    record = RecordRho()
    trainer(max_epochs=1, callbacks=[record]).fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    assert record.rhos == pytest.approx([RHO / 2, 2 * RHO / 3, 5 * RHO / 6, RHO, RHO], abs=1e-7)
    rhos = [RHO * min(1.0, t / 6) for t in range(STEPS)]
    lrs = [LR * min(1.0, (t + 1) / 4) for t in range(STEPS)]
    torch.testing.assert_close(resumed.w.detach(), closed_form_trajectory(x, y, w, rhos, lrs), atol=1e-10, rtol=0)


def test_follow_lr_remembers_the_peak_learning_rate_without_a_base_lr():
    """ReduceLROnPlateau sets no initial_lr: the largest LR seen (checkpointed) is lr_max."""
    from lit_deltasam.core.schedule import lr_ratio

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ratio, peak = lr_ratio(opt)
    assert (ratio, peak) == (1.0, 0.1)
    opt.param_groups[0]["lr"] = 0.025  # a plateau cut
    assert lr_ratio(opt, peak) == (0.25, 0.1)
