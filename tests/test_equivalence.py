"""One config, one result: a hand-written loop over DeltaSAMOptimizer trains the weights the mixin trains, bit for
bit, for every ρ schedule, interval and LookSAM, clipping and accumulation."""

import math

import lightning as L
import pytest
import torch
from helpers import TinyModule, flat_params, loader, trainer, with_rho

from lit_deltasam import DeltaSAM, DeltaSAMConfig, DeltaSAMOptimizer

N, BATCH, EPOCHS, SEED = 72, 8, 2, 3
CONFIGS = [
    dict(method="sam", rho_schedule="constant"),
    dict(method="sam", rho_schedule="follow_lr"),
    dict(method="sam", rho_schedule="warmup", rho_warmup=0.3),
    dict(method="sam", rho_schedule="start_step", rho_warmup=3),
    dict(method="deltasam", estimator="probe"),
    dict(method="sam", interval=3, reuse="looksam"),
    dict(method="deltasam", interval=2, reuse="looksam", accumulate_grad_batches=2),
    dict(method="sam", interval=4, accumulate_grad_batches=3),
    dict(method="sam", gradient_clip_val=0.05),
    dict(method="deltasam", gradient_clip_val=0.1, gradient_clip_algorithm="value", accumulate_grad_batches=2),
    dict(method="sam", m_sharpness=3, accumulate_grad_batches=3),
    dict(method="per_instance", accumulate_grad_batches=2),
    dict(method="erm", accumulate_grad_batches=2),
    dict(method="gsam", accumulate_grad_batches=2, gradient_clip_val=0.05),
    dict(method="gsam", rho_schedule="follow_lr", gsam_alpha=0.2),
    dict(method="wsam", gradient_clip_val=0.1, gradient_clip_algorithm="value", accumulate_grad_batches=2),
    dict(method="fsam", accumulate_grad_batches=2, gradient_clip_val=0.05),
    dict(method="fsam", interval=2, fsam_sigma=0.5),
    dict(method="sam", gradient_centralization=True, accumulate_grad_batches=2),
    dict(method="sam", policy="adaptive"),
    dict(method="fsam", policy="adaptive", accumulate_grad_batches=2, gradient_clip_val=0.05),
    dict(method="gsam", beta=-0.5, accumulate_grad_batches=2, gradient_clip_val=0.05),
    dict(method="wsam", beta=-0.5, weighted_descent=True),
    dict(method="wsam", wsam_decouple=False, accumulate_grad_batches=2, gradient_clip_val=0.05),
    dict(method="fsam", beta=-0.5, estimator="probe", accumulate_grad_batches=2),
]
SCHEDULER = dict(kind="step", interval="step", frequency=2)


def config_of(options: dict) -> DeltaSAMConfig:
    return DeltaSAMConfig(**with_rho(options, 0.2))


def module_of(options: dict, dropout: float = 0.2) -> TinyModule:
    L.seed_everything(SEED, verbose=False)
    return TinyModule(config_of(options), optimizer="adamw", lr=0.01, dropout=dropout, scheduler=SCHEDULER)


def mixin_fit(options: dict, dropout: float = 0.2) -> torch.Tensor:
    module = module_of(options, dropout)
    trainer(max_epochs=EPOCHS).fit(module, loader(n=N, batch_size=BATCH, shuffle=True))
    return flat_params(module)


def plain_fit(options: dict, stop_after=None, resume=None, dropout: float = 0.2):
    """The loop a plain-PyTorch user writes; optionally stopped after ``stop_after`` micro-batches (returning
    the state dicts) or resumed from them."""
    module = module_of(options, dropout)
    config = module.deltasam
    optimizer = torch.optim.AdamW(module.parameters(), lr=module.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batches = math.ceil(N / BATCH)
    total = math.ceil(batches / config.accumulate_grad_batches) * EPOCHS
    sam = DeltaSAMOptimizer(module, optimizer, config, total_steps=total, seed=SEED)
    data = loader(n=N, batch_size=BATCH, shuffle=True)
    done = 0
    if resume is not None:
        sam.load_state_dict(resume["sam"])
        scheduler.load_state_dict(resume["scheduler"])
        module.load_state_dict(resume["module"])
        data.load_state_dict(resume["data"])
        done = resume["done"]
    for epoch in range(done // batches, EPOCHS):
        data.sampler.set_epoch(epoch)
        for i, batch in enumerate(data, start=done % batches if epoch == done // batches else 0):
            result = sam.step(module.per_sample_loss, batch, last=True if i == batches - 1 else None)
            # Lightning's rule: a step scheduler's frequency counts the epoch's batches, checked at optimizer steps
            if result.stepped and (i + 1) % SCHEDULER["frequency"] == 0:
                scheduler.step()
            done += 1
            if done == stop_after:
                return {
                    "sam": sam.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "module": module.state_dict(),
                    "data": data.state_dict(),
                    "done": done,
                }
    return flat_params(module)


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_plain_loop_and_the_mixin_train_the_same_weights(options):
    assert torch.equal(plain_fit(options), mixin_fit(options))


REFERENCE_CONFIGS = [
    dict(method="sam", rho_schedule="constant"),
    dict(method="sam", rho_schedule="follow_lr"),
    dict(method="sam", rho_schedule="warmup", rho_warmup=0.3, accumulate_grad_batches=2),
    dict(method="sam", rho_schedule="start_step", rho_warmup=3),
    dict(method="sam", rho_schedule="constant", interval=4, accumulate_grad_batches=3),
    dict(method="sam", rho_schedule="constant", gradient_clip_val=0.05),
    dict(method="erm", accumulate_grad_batches=2),
]


def reference_fit(options: dict) -> torch.Tensor:
    """SAM written out from its definition, sharing no code with the library's loop: per micro-batch
    G_j = grad L(w + rho_t g/||g||), averaged over the window, clipped, one AdamW step, the step scheduler on
    Lightning's rule, and rho_t from the schedule's formula."""
    L.seed_everything(SEED, verbose=False)
    module = TinyModule(config_of(options), optimizer="adamw", lr=0.01, dropout=0.0, scheduler=SCHEDULER)
    params = list(module.parameters())
    optimizer = torch.optim.AdamW(params, lr=module.lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    k, interval = options.get("accumulate_grad_batches", 1), options.get("interval", 1)
    batches = math.ceil(N / BATCH)
    total = math.ceil(batches / k) * EPOCHS
    span = options.get("rho_warmup", 0)
    span = int(span * total) if 0 < span < 1 else int(span)

    def radius(t: int) -> float:
        schedule = options.get("rho_schedule")
        if options["method"] == "erm" or t % interval:
            return 0.0
        if schedule == "follow_lr":
            return 0.2 * optimizer.param_groups[0]["lr"] / module.lr
        if schedule == "warmup":
            return 0.2 * min(t / span, 1.0)
        if schedule == "start_step":
            return 0.0 if t < span else 0.2
        return 0.2

    def grad_at(batch, shift):
        with torch.no_grad():
            for p, e in zip(params, shift):
                p.add_(e)
        grads = torch.autograd.grad(module.per_sample_loss(batch).mean(), params)
        with torch.no_grad():
            for p, e in zip(params, shift):
                p.sub_(e)
        return grads

    t, window = 0, []
    data = loader(n=N, batch_size=BATCH, shuffle=True)
    for epoch in range(EPOCHS):
        data.sampler.set_epoch(epoch)
        for i, batch in enumerate(data):
            rho = radius(t)
            zero = [torch.zeros_like(p) for p in params]
            g = grad_at(batch, zero)
            if rho > 0:
                norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
                g = grad_at(batch, [rho * x / norm.float() for x in g])
            window.append(g)
            if len(window) == k or i == batches - 1:
                for p, parts in zip(params, zip(*window)):
                    p.grad = torch.stack(parts).sum(0) / len(window)
                if "gradient_clip_val" in options:
                    torch.nn.utils.clip_grad_norm_(params, options["gradient_clip_val"])
                optimizer.step()
                optimizer.zero_grad()
                window, t = [], t + 1
                if (i + 1) % SCHEDULER["frequency"] == 0:
                    scheduler.step()
    return flat_params(module)


@pytest.mark.parametrize("options", REFERENCE_CONFIGS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_the_mixin_and_the_plain_loop_train_a_hand_written_references_weights(options):
    expected = reference_fit(options)
    for fit in (mixin_fit, plain_fit):
        torch.testing.assert_close(fit(options, dropout=0.0), expected, rtol=0, atol=2e-6)


RESUMED = [
    dict(method="deltasam", interval=2, reuse="looksam", accumulate_grad_batches=2),
    dict(method="fsam", accumulate_grad_batches=2, gradient_clip_val=0.05),
    dict(method="gsam", accumulate_grad_batches=2),
    dict(method="fsam", policy="adaptive", accumulate_grad_batches=2),
    dict(method="fsam", beta=-0.5, accumulate_grad_batches=2),
]


@pytest.mark.parametrize("options", RESUMED, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("at", [5, 6])
def test_the_plain_loop_resumes_exactly_from_its_state_dict(at, options):
    """Micro-batch 5 is inside an accumulation window (and after a LookSAM full step; with F-SAM and GSAM the
    window's partial sum of clean gradients, and F-SAM's running mean, travel in the state dict), 6 ends one."""
    saved = plain_fit(options, stop_after=at)
    assert ("grads" in saved["sam"]) == (at % 2 == 1)
    assert torch.equal(plain_fit(options, resume=saved), plain_fit(options))


def test_the_engine_alone_names_the_loop_fields_it_leaves_to_the_loop():
    model = TinyModule(config_of({})).model
    config = DeltaSAMConfig(method="sam", interval=2, accumulate_grad_batches=2, gradient_clip_val=1.0)
    with pytest.warns(RuntimeWarning, match=r"accumulate_grad_batches=2, gradient_clip_val=1.0, interval=2 .*Opt"):
        DeltaSAM(model, config)
    engine = DeltaSAM(model, DeltaSAMConfig(method="sam", rho_schedule="follow_lr"))
    batch = next(iter(loader()))
    with pytest.warns(RuntimeWarning, match="rho_schedule='follow_lr' is applied by DeltaSAMOptimizer"):
        engine.step(model.losses, batch)
