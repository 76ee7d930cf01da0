"""The mixin keeps everything Lightning does: steps, schedulers, precision, checkpoints, resume."""

import copy

import lightning as L
import pytest
import torch
from helpers import (
    LS_CONFIGS,
    METHODS,
    MLP,
    LeastSquaresModule,
    Recorder,
    TinyModule,
    classification_data,
    flat_params,
    least_squares_problem,
    loader,
    ls_sam_update,
    sam_step_by_hand,
    trainer,
    with_rho,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lit_deltasam import DeltaSAM, DeltaSAMConfig, DeltaSAMMixin, DeltaSAMOptimizer, SharpnessProbe


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1


@pytest.mark.parametrize("accumulate", [1, 3])
def test_global_step_counts_optimizer_steps(accumulate):
    counter = CountSteps()
    module = TinyModule(DeltaSAMConfig(method="deltasam", accumulate_grad_batches=accumulate))
    fit = trainer(max_epochs=2, callbacks=[counter])
    fit.fit(module, loader(n=64, batch_size=8))
    per_epoch = -(-8 // accumulate)  # the last, partial window steps at the end of the epoch
    assert counter.steps == 2 * per_epoch
    assert fit.global_step == counter.steps


@pytest.mark.parametrize("method", ["sam", "deltasam", "per_instance"])
def test_accumulated_update_is_the_mean_of_micro_batch_updates(method):
    """Least squares, 5 micro-batches of 4 with accumulate_grad_batches=3: a window of 3, then the epoch's partial
    window of 2. Each optimizer step is w - lr * mean_j G_j(w), G_j the closed-form update of micro-batch j."""
    x, y, w = least_squares_problem(n=20, d=5)
    lr, rho = 0.3, 0.1
    config = DeltaSAMConfig(rho=rho, accumulate_grad_batches=3, **LS_CONFIGS[method])
    module = LeastSquaresModule(config, w, lr=lr)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    fit = trainer(max_epochs=1)
    fit.fit(module, data)
    assert fit.global_step == 2
    expected = w.clone()
    for window in ([0, 1, 2], [3, 4]):
        parts = [slice(4 * j, 4 * j + 4) for j in window]
        update = sum(ls_sam_update(x[part], y[part], expected, rho, method) for part in parts) / len(parts)
        expected = expected - lr * update
    torch.testing.assert_close(module.model.w.detach(), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_acts_on_the_descent_gradient_only(algorithm):
    """Value clipping of the ascent gradient would turn eps; norm clipping would show in the ascent's norm."""
    clip = 1e-3
    config = DeltaSAMConfig(method="sam", rho=0.1, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    module = TinyModule(config, lr=1.0)
    reference = copy.deepcopy(module.model)
    results = []
    module.deltasam_step = lambda batch, f=module.deltasam_step: results.append(f(batch)) or results[-1]
    trainer(max_steps=1).fit(module, loader(n=8, batch_size=8))
    unclipped = DeltaSAM(reference, DeltaSAMConfig(method="sam", rho=0.1)).step(
        reference.losses, classification_data(n=8)
    )
    grads = [p.grad for p in reference.parameters()]
    norm = torch.cat([g.reshape(-1) for g in grads]).norm()
    assert norm > 10 * clip and max(g.abs().max() for g in grads) > 10 * clip
    assert results[0].grad_norm.item() == pytest.approx(unclipped.grad_norm.item())
    for p, ref, g in zip(module.model.parameters(), reference.parameters(), grads):
        step = g * clip / norm if algorithm == "norm" else g.clamp(-clip, clip)
        torch.testing.assert_close(p.detach(), ref.detach() - step, atol=1e-7, rtol=0)


class LRs(Callback):
    """The LR at the start of every training batch, and after the fit."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_end(self, trainer, pl_module):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


class Automatic(L.LightningModule):
    """TinyModule's optimizer and scheduler under Lightning's automatic optimization: the reference."""

    def __init__(self, scheduler):
        super().__init__()
        self.tiny = TinyModule(DeltaSAMConfig(method="erm"), scheduler=scheduler)

    def training_step(self, batch, batch_idx):
        return self.tiny.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return TinyModule.configure_optimizers(self.tiny)


@pytest.mark.parametrize(
    "scheduler",
    [
        dict(kind="step", interval="step", frequency=1),
        dict(kind="step", interval="step", frequency=2),
        dict(kind="step", interval="step", frequency=4),
        dict(kind="step", interval="epoch", frequency=1),
        dict(kind="step", interval="epoch", frequency=2),
    ],
    ids=lambda s: f"{s['interval']}-every-{s['frequency']}",
)
@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_lr_schedulers_step_as_under_automatic_optimization(scheduler, accumulate):
    """10 batches x 2 epochs: the LR before every batch equals automatic optimization's (Lightning counts a step
    scheduler's frequency in batches of the epoch, not in global steps: 4 halvings, not 5, at frequency 4)."""
    seen = []
    for automatic in (True, False):
        watch = LRs()
        if automatic:
            module = Automatic(scheduler)
            fit = trainer(max_epochs=2, accumulate_grad_batches=accumulate, callbacks=[watch])
        else:
            config = DeltaSAMConfig(method="sam", accumulate_grad_batches=accumulate)
            module, fit = TinyModule(config, scheduler=scheduler), trainer(max_epochs=2, callbacks=[watch])
        fit.fit(module, loader(n=80, batch_size=8))
        seen.append(watch.seen)
    assert seen[1] == seen[0]
    if accumulate == 1:
        assert len(set(seen[0])) > 1
    if accumulate == 1 and scheduler == dict(kind="step", interval="step", frequency=4):
        assert seen[0][-1] == pytest.approx(0.1 * 0.5**4)


@pytest.mark.parametrize("mode, halvings", [("max", 3), ("min", 0)])
def test_plateau_scheduler_reads_its_monitor(mode, halvings):
    """On a falling validation loss, mode='max' sees no improvement after the first epoch and halves the LR each
    epoch; mode='min' sees one every epoch and keeps it. A stale or missing monitor would halve it under both."""
    scheduler = dict(kind="plateau", interval="epoch", frequency=1, monitor="val/loss", mode=mode)
    module = TinyModule(DeltaSAMConfig(method="sam"), scheduler=scheduler)
    fit = trainer(max_epochs=4)
    fit.fit(module, loader(n=64), loader(n=64))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**halvings)


def test_plateau_monitor_survives_configure_optimizers_from_a_base_class():
    class Base(L.LightningModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val/loss"}}

    class Inherited(DeltaSAMMixin, Base):
        def __init__(self):
            super().__init__()
            self.model = TinyModule(DeltaSAMConfig()).model
            self.deltasam = DeltaSAMConfig(method="sam")

        def per_sample_loss(self, batch):
            return self.model.losses(batch)

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.model.losses(batch).mean())

    module = Inherited()
    trainer(max_epochs=3).fit(module, loader(n=64), loader(n=64))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_plateau_without_a_monitor_names_both_forms():
    module = TinyModule(DeltaSAMConfig(method="sam"), scheduler=dict(kind="plateau", interval="epoch"))
    with pytest.raises(Exception, match=r"scheduler #0\) needs a metric: .*\"monitor\".*\"monitor\""):
        trainer(max_epochs=2).fit(module, loader(n=16), loader(n=16))


def test_plateau_monitor_in_the_top_level_form():
    class TopLevel(TinyModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", patience=0, factor=0.5)
            return {"optimizer": opt, "lr_scheduler": sched, "monitor": "val/loss"}

    module = TopLevel(DeltaSAMConfig(method="sam"))
    trainer(max_epochs=3).fit(module, loader(n=64), loader(n=64))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_a_second_fit_with_a_new_trainer_starts_a_new_loop_state():
    """Epoch schedulers step in every fit; the first fit's counters do not carry over."""
    scheduler = dict(kind="step", interval="epoch", frequency=1)
    module = TinyModule(DeltaSAMConfig(method="sam", accumulate_grad_batches=3), scheduler=scheduler)
    trainer(max_epochs=2).fit(module, loader(n=40, batch_size=8))
    trainer(max_epochs=2).fit(module, loader(n=40, batch_size=8))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_a_checkpoint_loaded_outside_a_fit_does_not_leak_into_the_next_fit(tmp_path):
    scheduler = dict(kind="step", interval="epoch", frequency=1)
    module = TinyModule(DeltaSAMConfig(method="sam"), scheduler=scheduler)
    first = trainer(max_epochs=2)
    first.fit(module, loader(n=16))
    first.save_checkpoint(tmp_path / "end.ckpt")
    second = trainer(max_epochs=2)
    second.validate(module, loader(n=16), ckpt_path=tmp_path / "end.ckpt")
    second.fit(module, loader(n=16))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_sharpness_probe_restores_each_submodule_mode():
    module = TinyModule(DeltaSAMConfig(method="deltasam"), dropout=0.5)
    module.model.net[2].eval()  # a submodule the user keeps in eval mode
    modes = []

    class Modes(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            modes.append((pl_module.training, pl_module.model.net[2].training, pl_module.model.net[3].training))

    probe = SharpnessProbe(every_n_steps=1, batch_size=8, hessian_iters=2)
    trainer(max_steps=2, callbacks=[probe, Modes()]).fit(module, loader(n=16), loader(n=16))
    assert modes == [(True, False, True)] * 2


@pytest.mark.parametrize("options", METHODS)
def test_checkpoints_and_validation_never_see_perturbed_weights(options, tmp_path):
    """With lr = 0 every weight any hook or checkpoint sees must be the initial weight, bit for bit."""
    module = TinyModule(DeltaSAMConfig(rho=1.0, **options), lr=0.0, dropout=0.1)
    initial = flat_params(module)

    class Watch(Callback):
        def check(self, pl_module):
            assert torch.equal(flat_params(pl_module), initial)

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.check(pl_module)

        def on_validation_start(self, trainer, pl_module):
            self.check(pl_module)

    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    fit = trainer(max_steps=3, callbacks=[Watch(), ckpt], enable_checkpointing=True, val_check_interval=2)
    fit.fit(module, loader(n=32), loader(n=16, seed=1))
    saved = sorted(tmp_path.glob("*.ckpt"))
    assert len(saved) == 3
    for path in saved:
        state = torch.load(path, weights_only=False)["state_dict"]
        assert torch.equal(
            torch.cat([v.reshape(-1) for k, v in state.items() if "running" not in k and "num_batches" not in k]),
            initial,
        )


@pytest.mark.parametrize("options", METHODS)
def test_bf16_mixed_precision(options):
    """Under bf16 autocast every method runs its own passes (as many loss forwards per step as in fp32), perturbs the
    fp32 master weights by the logged ||eps|| exactly, and trains within bf16's rounding of the fp32 weights."""
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        torch.manual_seed(0)
        schedule = {} if options["method"] == "erm" else dict(rho_schedule="constant")
        module = SeesWeights(DeltaSAMConfig(**with_rho(options, 0.05), **schedule))
        start = flat_params(module)
        fit = trainer(max_steps=3, precision=precision)
        fit.fit(module, loader())
        assert fit.global_step == 3
        runs[precision] = (module, start, fit)
    (full, start, _), (half, _, fit) = runs["32-true"], runs["bf16-mixed"]
    assert len(half.seen) == len(full.seen) >= (1 if options["method"] == "erm" else 2)
    travelled = (flat_params(full) - start).norm()
    assert (flat_params(half) - flat_params(full)).norm() < 0.05 * travelled
    if options["method"] in ("sam", "asam", "deltasam"):  # fp32 master weights: eps applied as computed
        moved = (half.seen[-1] - half.seen[0]).norm().item()
        assert moved == pytest.approx(fit.callback_metrics["sam/eps_norm"].item(), rel=1e-3)
        assert fit.callback_metrics["sam/sharpness"].item() != 0.0


class SeesWeights(TinyModule):
    """Records the weights at every forward of the per-sample loss in the last training batch."""

    def on_train_batch_start(self, batch, batch_idx):
        self.seen = []

    def per_sample_loss(self, batch):
        self.seen.append(flat_params(self))
        return super().per_sample_loss(batch)


class ScaleWatch(Callback):
    """Records, per optimizer step, the loss scale before the step and whether the weights moved."""

    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = flat_params(pl_module)
        self.scale = trainer.precision_plugin.scaler.get_scale()

    def on_train_batch_end(self, trainer, pl_module, *args):
        moved = not torch.equal(flat_params(pl_module), self.before)
        self.records.append((self.scale, trainer.precision_plugin.scaler.get_scale(), moved))


@pytest.mark.parametrize(
    "options",
    [
        dict(method="sam"),
        dict(method="deltasam", estimator="probe"),
        *(dict(method=m) for m in ("gsam", "wsam", "fsam")),
    ],
)
def test_fp16_scaler_skips_overflowing_steps_and_never_unscales_twice(options):
    """CPU fp16 autocast with a GradScaler whose first scales overflow, with clipping (which unscales)."""
    watch = ScaleWatch()
    module = TinyModule(DeltaSAMConfig(gradient_clip_val=1.0, **options))
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**20))
    fit = trainer(max_steps=12, plugins=[plugin], callbacks=[watch])
    fit.fit(module, loader(n=96))
    skipped = [r for r in watch.records if r[1] < r[0]]
    taken = [r for r in watch.records if r[1] >= r[0]]
    assert skipped and taken
    assert not any(moved for _, _, moved in skipped)
    assert all(moved for _, _, moved in taken)
    assert torch.isfinite(flat_params(module)).all()


def test_fp16_clipping_acts_on_the_unscaled_gradient():
    """With a loss scale of 2**10 and clip 1e-3, every SGD step (lr 1) moves the weights by exactly 1e-3."""
    moves = []

    class Moves(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = flat_params(pl_module)

        def on_train_batch_end(self, trainer, pl_module, *args):
            moves.append((flat_params(pl_module) - self.before).norm().item())

    module = TinyModule(DeltaSAMConfig(method="sam", gradient_clip_val=1e-3), lr=1.0)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**10))
    trainer(max_steps=4, plugins=[plugin], callbacks=[Moves()]).fit(module, loader(n=64))
    assert moves == pytest.approx([1e-3] * 4, rel=1e-3)


def test_clipping_needs_the_hook_to_call_super():
    class Silent(TinyModule):
        def on_before_optimizer_step(self, optimizer):
            pass

    module = Silent(DeltaSAMConfig(gradient_clip_val=1.0), optimizer="adamw")
    before = flat_params(module).clone()
    with pytest.raises(RuntimeError, match="on_before_optimizer_step was overridden without calling super"):
        trainer(max_steps=1).fit(module, loader())
    assert torch.equal(flat_params(module), before)  # raised before the update
    assert not module.optimizers().optimizer.state


class SaveAt(Callback):
    """Saves a checkpoint after the given training batches (indices counted across epochs)."""

    def __init__(self, directory, at):
        self.directory, self.at, self.seen = directory, set(at), 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.seen in self.at:
            trainer.save_checkpoint(self.directory / f"batch{self.seen}.ckpt")
        self.seen += 1


RESUME_CONFIGS = [
    dict(method="deltasam", estimator="probe", accumulate_grad_batches=2),
    dict(method="sam", accumulate_grad_batches=1),
    dict(method="per_instance", accumulate_grad_batches=1),
    dict(method="sam", rho_schedule="follow_lr"),
    dict(method="sam", m_sharpness=3, accumulate_grad_batches=2),
    dict(method="fsam", accumulate_grad_batches=2),
    dict(method="gsam", accumulate_grad_batches=2, gradient_clip_val=0.05),
    dict(method="fsam", policy="adaptive", accumulate_grad_batches=2),
]


@pytest.mark.parametrize("options", RESUME_CONFIGS)
@pytest.mark.parametrize("at", [9, 10])
def test_resume_from_a_mid_epoch_checkpoint_is_exact(options, at, tmp_path):
    """Batch 9 ends an accumulation window mid-epoch, batch 10 is inside one."""
    L.seed_everything(7)

    def run(ckpt_path=None, callbacks=()):
        module = TinyModule(
            DeltaSAMConfig(**with_rho(options, 0.2)),
            optimizer="adamw",
            lr=0.01,
            dropout=0.2,
            scheduler=dict(kind="step", interval="step", frequency=3),
        )
        fit = trainer(max_epochs=3, callbacks=list(callbacks))
        fit.fit(module, loader(n=64, shuffle=True), ckpt_path=ckpt_path)
        return module, fit

    full, full_fit = run(callbacks=[SaveAt(tmp_path, [at])])
    resumed, resumed_fit = run(ckpt_path=tmp_path / f"batch{at}.ckpt")
    assert resumed_fit.global_step == full_fit.global_step
    assert torch.equal(flat_params(resumed), flat_params(full))
    assert resumed.optimizers().param_groups[0]["lr"] == full.optimizers().param_groups[0]["lr"]


class SizedSchedule(TinyModule):
    """A linear decay sized by ``optimizer_steps`` in configure_optimizers, as the application's classifier and our
    docs size theirs."""

    def configure_optimizers(self):
        from lit_deltasam.lightning import optimizer_steps

        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
        total = optimizer_steps(self.trainer)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_resume_is_exact_when_configure_optimizers_sizes_the_schedule(tmp_path):
    """optimizer_steps reads trainer.estimated_stepping_batches, which sets up the train loader before the
    checkpoint is restored; Lightning then never loads the saved position into it (Lightning issue #20550) and the
    resumed epoch starts from its first batch. Found by an independent tester on the CLI: a mid-epoch resume trained
    on other batches than the uninterrupted run."""

    def run(ckpt_path=None, callbacks=()):
        L.seed_everything(7)
        module = SizedSchedule(DeltaSAMConfig(method="sam", rho=0.2, rho_schedule="constant"), lr=0.01, dropout=0.2)
        fit = trainer(max_epochs=2, callbacks=list(callbacks))
        fit.fit(module, loader(n=64, shuffle=True), ckpt_path=ckpt_path)
        return module

    full = run(callbacks=[SaveAt(tmp_path, [10])])  # epoch 1, mid-epoch
    resumed = run(ckpt_path=tmp_path / "batch10.ckpt")
    assert torch.equal(flat_params(resumed), flat_params(full))


@pytest.mark.parametrize("max_steps", [-1, 8])
def test_a_checkpoint_saved_at_an_epochs_end_resumes_exactly_or_is_refused(max_steps, tmp_path):
    """Lightning resumes an end-of-epoch checkpoint exactly with max_steps=-1, but with max_steps set it counts the
    next epoch's batches as done and skips it untrained (an independent tester's CLI resume trained 0 steps). The
    first must stay exact; the second is refused by name."""

    def run(ckpt_path=None, callbacks=()):
        L.seed_everything(7)
        module = TinyModule(DeltaSAMConfig(method="sam", rho=0.2, rho_schedule="constant"), dropout=0.2)
        fit = trainer(max_epochs=2, max_steps=max_steps, callbacks=list(callbacks))
        fit.fit(module, loader(n=32, shuffle=True), ckpt_path=ckpt_path)
        return module, fit

    class AtEpochEnd(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 0:
                trainer.save_checkpoint(tmp_path / "epoch0.ckpt")

    full, full_fit = run(callbacks=[AtEpochEnd()])
    assert full_fit.global_step == 8
    if max_steps == -1:
        resumed, resumed_fit = run(ckpt_path=tmp_path / "epoch0.ckpt")
        assert resumed_fit.global_step == 8 and torch.equal(flat_params(resumed), flat_params(full))
    else:
        with pytest.raises(ValueError, match="end of epoch 0 .*max_steps=8, Lightning would skip epoch 1"):
            run(ckpt_path=tmp_path / "epoch0.ckpt")


def test_a_checkpoint_resumed_under_another_method_or_policy_is_refused_by_name(tmp_path):
    """The loop state (F-SAM's running mean, the policy's moments, an open window) means what it meant only under
    the method, policy and loop shape that saved it (an independent tester resumed gsam+policy as fsam unnoticed)."""

    def run(config, ckpt_path=None, callbacks=()):
        module = TinyModule(DeltaSAMConfig(rho_schedule="constant", **config))
        trainer(max_epochs=2, callbacks=list(callbacks)).fit(module, loader(n=32), ckpt_path=ckpt_path)

    run(dict(method="gsam", policy="adaptive"), callbacks=[SaveAt(tmp_path, [5])])
    for other, changed in ((dict(method="fsam"), "method"), (dict(method="gsam"), "policy")):
        with pytest.raises(ValueError, match=f"resuming from this checkpoint: the state was saved with .*'{changed}'"):
            run(other, ckpt_path=tmp_path / "batch5.ckpt")
    run(dict(method="gsam", policy="adaptive"), ckpt_path=tmp_path / "batch5.ckpt")


class PortedStep(TinyModule):
    """A module ported from automatic optimization that kept its training_step."""

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()


class CustomStep(TinyModule):
    def training_step(self, batch, batch_idx):
        result = self.deltasam_step(batch)
        self.log("custom/loss", result.loss)
        return result.loss


def test_a_leftover_training_step_fails_on_the_first_batch_and_trains_nothing():
    module = PortedStep(DeltaSAMConfig(method="sam"))
    before = flat_params(module)
    with pytest.raises(RuntimeError, match=r"PortedStep.training_step returned without calling self.deltasam_step"):
        trainer(max_steps=3).fit(module, loader(n=32, batch_size=8))
    assert torch.equal(flat_params(module), before)


def test_a_custom_training_step_that_calls_deltasam_step_trains():
    module = CustomStep(DeltaSAMConfig(method="sam"))
    fit = trainer(max_steps=3)
    fit.fit(module, loader(n=32, batch_size=8))
    assert fit.global_step == 3
    assert "custom/loss" in fit.callback_metrics


class PartialOptimizer(TinyModule):
    """Its optimizer holds only the last layer; the first layer stays trainable."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.net[-1].parameters(), lr=self.lr)


class GradsAfterStep(Callback):
    def __init__(self):
        self.grads = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.grads.append([p.grad for p in pl_module.model.net[0].parameters()])


def test_parameters_outside_the_optimizer_keep_no_stale_gradients():
    module = PartialOptimizer(DeltaSAMConfig(method="sam"))
    record = GradsAfterStep()
    first = [p.detach().clone() for p in module.model.net[0].parameters()]
    trainer(max_steps=3, callbacks=[record]).fit(module, loader(n=32, batch_size=8))
    assert all(g is None for grads in record.grads for g in grads)
    assert all(torch.equal(a, p) for a, p in zip(first, module.model.net[0].parameters()))


@pytest.mark.parametrize("method, logged", [("sam", False), ("asam", False), ("deltasam", True)])
def test_weight_diagnostics_only_where_the_weights_vary(method, logged):
    fit = trainer(max_steps=2)
    fit.fit(TinyModule(DeltaSAMConfig(method=method)), loader(n=32, batch_size=8))
    assert ("sam/ess" in fit.callback_metrics) is logged
    assert ("sam/max_weight" in fit.callback_metrics) is logged
    assert "sam/sharpness" in fit.callback_metrics


POLICY = dict(policy="adaptive", policy_c_start=2.0, policy_c_end=0.5)
"""A threshold high enough that 12 steps of TinyModule mix full and plain steps (the defaults, from moments that
start at 0, make them all full)."""


class KeepsResults(TinyModule):
    def deltasam_step(self, batch):
        result = super().deltasam_step(batch)
        self.results.append(result)
        return result


@pytest.mark.parametrize(
    "options, extra",
    [
        (dict(method="gsam"), "gsam_perp_norm"),
        (dict(method="fsam"), "fsam_removed_norm"),
        (dict(method="fsam", **POLICY), "fsam_removed_norm"),
        (dict(method="sam", **POLICY), None),
    ],
    ids=["gsam", "fsam", "fsam-policy", "sam-policy"],
)
def test_the_family_logs_what_it_adds(options, extra):
    """Each step's logged ``sam/<extra>`` is the step's ``result.extras`` (GSAM's ||g_perp||, F-SAM's sigma ||m||);
    under the policy ``sam/full_step`` is each step's decision and ``sam/full_fraction`` their running mean, which
    ends at loop_state.policy_full / policy_decided. On the policy's plain steps what only a full step measures is
    not logged (Lightning's logger connector would repeat the last full step's value; an independent tester saw
    it), and sam/grad_norm is the ||g|| the decision read."""
    recorder = Recorder()
    module = KeepsResults(DeltaSAMConfig(rho=0.5, rho_schedule="constant", **options))
    module.results = []
    fit = trainer(max_steps=12, logger=recorder, log_every_n_steps=1)
    fit.fit(module, loader(n=96, batch_size=8))
    rows = [metrics for metrics, _ in recorder.calls if "train/loss" in metrics]
    assert len(rows) == len(module.results) == 12
    if extra is not None:
        logged = [(row[f"sam/{extra}"], r.extras[extra]) for row, r in zip(rows, module.results) if extra in r.extras]
        assert len(logged) >= (3 if "policy" in options else 11)  # F-SAM's from its second full step
        for value, expected in logged:
            assert value == pytest.approx(float(expected), rel=1e-6) and value > 0
    if "policy" in options:
        decisions = [r.full_step for r in module.results]
        assert True in decisions and False in decisions
        assert [row["sam/full_step"] for row in rows] == [float(d) for d in decisions]
        running = [sum(decisions[: i + 1]) / (i + 1) for i in range(len(decisions))]
        assert [row["sam/full_fraction"] for row in rows] == pytest.approx(running)
        state = module._deltasam_state
        assert rows[-1]["sam/full_fraction"] == pytest.approx(state.policy_full / state.policy_decided)
        only_full = ["sam/sharpness", "sam/perturbed_loss"] + ([f"sam/{extra}"] if extra else [])
        for row, r in zip(rows, module.results):
            assert all((name in row) == r.full_step for name in only_full if name != "sam/fsam_removed_norm")
            assert "sam/fsam_removed_norm" not in row or r.full_step
            assert row["sam/grad_norm"] == pytest.approx(float(r.grad_norm), rel=1e-6) and row["sam/grad_norm"] > 0
    else:
        assert "sam/full_fraction" not in rows[-1] and "sam/full_step" not in rows[-1]


def test_probes_log_on_the_same_step_axis_as_self_log():
    """Under the mixin's accumulation, Lightning's logging step counts batches; the probe follows it."""
    recorder = Recorder()
    module = TinyModule(DeltaSAMConfig(method="deltasam", accumulate_grad_batches=2))
    probe = SharpnessProbe(every_n_steps=2, batch_size=4, hessian_iters=2)
    fit = trainer(max_steps=4, logger=recorder, log_every_n_steps=1, callbacks=[probe])
    data = loader(n=64, batch_size=8)
    fit.fit(module, train_dataloaders=data, val_dataloaders=loader(n=16, batch_size=8))
    probes = [i for i, (keys, _) in enumerate(recorder.calls) if "probe/cos_sam" in keys]
    assert probes
    for i in probes:
        following = next(step for keys, step in recorder.calls[i + 1 :] if "train/loss" in keys)
        assert recorder.calls[i][1] == following


class Finetuned(TinyModule):
    """The first layer is the backbone that Lightning's BackboneFinetuning freezes, then hands to the optimizer."""

    def __init__(self, config):
        super().__init__(config)
        self.backbone = self.model.net[0]

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def _finetuned(config):
    """A Finetuned module trained 2 epochs with BackboneFinetuning (the backbone joins at epoch 1, lr 0.01), and an
    MLP at the module's starting weights, to replay the run by hand."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    torch.manual_seed(0)
    module = Finetuned(config)
    model = MLP()
    model.load_state_dict(module.model.state_dict())
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)
    trainer(max_epochs=2, callbacks=[finetuning]).fit(module, loader(n=32, batch_size=8))
    assert len(module.optimizers().param_groups) == 2
    return module, model


def test_backbone_finetuning_perturbs_and_steps_the_unfrozen_backbone():
    """BackboneFinetuning adds the backbone's group to the optimizer at epoch 1 (lr 0.01); from then on every step
    must be SAM over the head and the backbone, written out by hand here (before the fix the backbone kept its
    ascent gradient in G)."""
    rho = 0.05
    module, model = _finetuned(DeltaSAMConfig(method="sam", rho=rho, rho_schedule="constant"))
    head = [p for name, p in model.named_parameters() if not name.startswith("net.0.")]
    base = torch.optim.SGD(head, lr=0.1)
    for epoch in range(2):
        if epoch == 1:
            base.add_param_group({"params": list(model.net[0].parameters()), "lr": 0.01})
        for batch in loader(n=32, batch_size=8):
            sam_step_by_hand(lambda batch=batch: model.losses(batch).mean(), base, rho)
    trained = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    torch.testing.assert_close(trained, flat_params(model), rtol=0, atol=1e-6)


def test_backbone_finetuning_under_friendly_sam_equals_the_plain_loop():
    """Friendly-SAM holds a running mean per parameter; BackboneFinetuning adds the backbone at epoch 1, whose mean
    starts at its first ascent gradient (the reference library's rule, tests/test_peer_reference.py). The mixin must
    equal DeltaSAMOptimizer with the group added at the same step (before, it refused the added group)."""
    config = DeltaSAMConfig(method="fsam", rho=0.05, rho_schedule="constant")
    module, model = _finetuned(config)
    for p in model.net[0].parameters():
        p.requires_grad_(False)
    head = [p for name, p in model.named_parameters() if not name.startswith("net.0.")]
    opt = DeltaSAMOptimizer(model, torch.optim.SGD(head, lr=0.1), config)
    for epoch in range(2):
        if epoch == 1:
            for p in model.net[0].parameters():
                p.requires_grad_(True)
            opt.optimizer.add_param_group({"params": list(model.net[0].parameters()), "lr": 0.01})
        for batch in loader(n=32, batch_size=8):
            opt.step(model.losses, batch)
    trained = torch.cat([p.detach().flatten() for p in module.model.parameters()])
    torch.testing.assert_close(trained, flat_params(model), rtol=0, atol=0)


@pytest.mark.parametrize("options", [dict(method="fsam"), dict(method="sam", interval=2, reuse="looksam")])
def test_resume_after_backbone_finetuning_added_a_group_is_exact(options, tmp_path):
    """The loop state over the grown optimizer (F-SAM's running mean, LookSAM's direction) goes into the checkpoint
    and comes back lined up with the parameters: a resume in epoch 1, after BackboneFinetuning added the backbone,
    trains the weights of the run that never stopped."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    class Resumable(BackboneFinetuning):
        """Lightning's BaseFinetuning restores the groups it added on resume but freezes their modules again
        (Lightning issue #21901); the engine refuses a frozen parameter in the optimizer by name, so this test
        unfreezes them as the issue's fix does."""

        fix = True

        def on_fit_start(self, trainer, pl_module):
            super().on_fit_start(trainer, pl_module)
            for group in trainer.optimizers[0].param_groups[1:] if self.fix else []:
                for p in group["params"]:
                    p.requires_grad_(True)

    def run(ckpt_path=None, callbacks=(), fix=True):
        torch.manual_seed(0)
        module = Finetuned(DeltaSAMConfig(rho=0.05, rho_schedule="constant", **options))
        finetuning = Resumable(unfreeze_backbone_at_epoch=1, backbone_initial_lr=0.01)
        finetuning.fix = fix
        fit = trainer(max_epochs=2, callbacks=[finetuning, *callbacks])
        fit.fit(module, loader(n=32, batch_size=8), ckpt_path=ckpt_path)
        return module

    full = run(callbacks=[SaveAt(tmp_path, [5])])
    resumed = run(ckpt_path=tmp_path / "batch5.ckpt")
    assert len(resumed.optimizers().param_groups) == 2
    with pytest.raises(ValueError, match="frozen .* Lightning issue #21901"):  # without the fix: refused, not frozen
        run(ckpt_path=tmp_path / "batch5.ckpt", fix=False)
    assert torch.equal(flat_params(resumed), flat_params(full))


def test_a_deltasam_optimizer_returned_under_the_mixin_is_refused_by_name():
    """The mixin runs the double step itself; a DeltaSAMOptimizer from configure_optimizers would be driven by it as
    a base optimizer. The error names both ways out (before, it blamed accumulation, which was not set)."""

    class Wrapped(TinyModule):
        def configure_optimizers(self):
            base = torch.optim.SGD(self.parameters(), lr=0.1)
            return DeltaSAMOptimizer(self, base, DeltaSAMConfig(method="gsam"))

    with pytest.raises(TypeError, match="returned a DeltaSAMOptimizer.*return its base optimizer.*drop DeltaSAMMixin"):
        trainer(max_steps=1).fit(Wrapped(DeltaSAMConfig(method="fsam")), loader(n=16, batch_size=8))


@pytest.mark.parametrize("method", ["gsam", "wsam", "fsam"])
def test_the_probe_measures_the_family_members_own_step(method):
    """probe/cos_<method> is the method's full step (GSAM's descent, WSAM's term, Friendly-SAM's ascent with the
    loop's running mean), recomputed here from the final weights and loop state; before, the probe measured SAM's
    step under the method's name (an independent tester found probe/cos_gsam equal to probe/cos_sam)."""
    from lit_deltasam.core.diagnostics import fidelity

    module = TinyModule(DeltaSAMConfig(method=method, rho_schedule="constant", rho=0.2))
    probe = SharpnessProbe(every_n_steps=2, batch_size=8, hessian_iters=0)
    fit = trainer(max_steps=4, callbacks=[probe])
    fit.fit(module, loader(n=64, batch_size=8), loader(n=16, batch_size=8))
    got = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("probe/cos_")}
    if method != "wsam":  # WSAM's correction is SAM's, scaled: the same cosine
        assert abs(got["probe/cos_sam"] - got[f"probe/cos_{method}"]) > 1e-4
    batch = probe._batch
    params = [p for p in module.parameters() if p.requires_grad]
    own = DeltaSAMConfig(method=method, rho_schedule="constant", rho=0.2)
    configs = {"sam": DeltaSAMConfig(method="sam", rho=0.2), method: own}
    momentum = module._deltasam_state.fsam_momentum
    assert (momentum is not None) == (method == "fsam")
    module.eval()
    with torch.enable_grad():
        cosines = fidelity(module, module.per_sample_loss, batch, configs, params, running_means={"fsam": momentum})
    assert got[f"probe/cos_{method}"] == pytest.approx(cosines[method], abs=1e-6)
    if method == "fsam":
        without = fidelity(module, module.per_sample_loss, batch, configs, params)
        assert abs(without["fsam"] - got["probe/cos_fsam"]) > 1e-6


def test_a_plain_step_logs_no_stale_full_step_values():
    """interval=2: Lightning hands a logger the last value of every key logged earlier in the epoch; the plain steps'
    rows must not carry the previous full step's sam/sharpness (and the rest a full step alone measures)."""
    recorder = Recorder()
    module = TinyModule(DeltaSAMConfig(method="deltasam", interval=2, rho_schedule="constant"))
    trainer(max_steps=6, logger=recorder, log_every_n_steps=1).fit(module, loader(n=64, batch_size=8))
    rows = [metrics for metrics, _ in recorder.calls if "train/loss" in metrics]
    assert [row["sam/full_step"] for row in rows] == [1.0, 0.0] * 3
    for row in rows:
        for name in ("sam/sharpness", "sam/perturbed_loss", "sam/grad_norm", "sam/eps_norm", "sam/ess"):
            assert (name in row) == (row["sam/full_step"] == 1.0), name
