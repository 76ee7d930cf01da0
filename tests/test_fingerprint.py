"""The redesign's safety net: the final weights of a few steps of every method and mode, through the public API, on
the hand-written loop and on the mixin, hashed and compared with the hashes recorded before the redesign began
(main at 1bf3b72). A change that trains any of these configs differently, by one bit, fails here.

``FINGERPRINT_WRITE=1 pytest tests/test_fingerprint.py`` records them again; only a change that is meant to train
differently does that, and its commit says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TinyModule, loader, trainer

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

RECORD = Path(__file__).with_name("fingerprints.json")
N, BATCH, EPOCHS, SEED, LR = 48, 8, 2, 11, 0.01
SCHEDULER = dict(kind="step", interval="step", frequency=2)

CONFIGS: dict[str, dict] = {
    "erm": dict(method="erm"),
    "sam": dict(method="sam", rho=0.1),  # rho_schedule="follow_lr", the default
    "asam-all": dict(method="asam", rho=0.5),
    "asam-weights": dict(method="asam", rho=0.5, asam_scope="weights"),
    "asam-beta": dict(method="asam", rho=0.5, beta=-0.5),
    "deltasam-head": dict(method="deltasam", rho=0.1),
    "deltasam-head-weighted": dict(method="deltasam", rho=0.1, beta=-1.0, weighted_descent=True),
    "deltasam-probe": dict(method="deltasam", rho=0.1, estimator="probe"),
    "deltasam-probe-antithetic": dict(
        method="deltasam", rho=0.1, estimator="probe", probe_samples=2, probe_antithetic=True
    ),
    "deltasam-curvature": dict(method="deltasam", rho=0.1, beta=0.5, estimator="curvature", probe_samples=2),
    "deltasam-exact-loop": dict(method="deltasam", rho=0.1, estimator="exact"),
    "deltasam-exact-vmap": dict(
        method="deltasam", rho=0.1, estimator="exact", per_instance_impl="vmap", share_dropout=False
    ),
    "m-sam-loop": dict(method="sam", rho=0.1, m_sharpness=3, group_impl="loop"),
    "m-sam-batched": dict(method="sam", rho=0.1, m_sharpness=3, group_impl="batched"),
    "m-asam-batched": dict(method="asam", rho=0.5, m_sharpness=4, group_impl="batched", group_chunk=1),
    "m-deltasam-loop": dict(method="deltasam", rho=0.1, m_sharpness=4, group_impl="loop"),
    "per-instance-loop": dict(method="per_instance", rho=0.1, group_impl="loop"),
    "per-instance-batched": dict(method="per_instance", rho=0.1, group_impl="batched", group_chunk=3),
    "per-instance-vmap": dict(
        method="per_instance", rho=0.1, group_impl="loop", per_instance_impl="vmap", share_dropout=False
    ),
    "interval": dict(method="sam", rho=0.1, interval=3),
    "looksam": dict(method="sam", rho=0.1, interval=2, reuse="looksam"),
    "looksam-deltasam": dict(method="deltasam", rho=0.1, interval=3, reuse="looksam", reuse_alpha=0.5),
    "accumulate-clip-norm": dict(method="sam", rho=0.1, accumulate_grad_batches=2, gradient_clip_val=0.05),
    "accumulate-clip-value": dict(
        method="deltasam", rho=0.1, accumulate_grad_batches=3, gradient_clip_val=0.01, gradient_clip_algorithm="value"
    ),
    "warmup": dict(method="sam", rho=0.1, rho_schedule="warmup", rho_warmup=0.5),
    "warmup-steps": dict(method="sam", rho=0.1, rho_schedule="warmup", rho_warmup=3),
    "independent-dropout": dict(method="sam", rho=0.1, share_dropout=False, seed_steps=False),
    "start-step": dict(method="asam", rho=0.5, rho_schedule="start_step", rho_warmup=2),
    "constant": dict(method="sam", rho=0.1, rho_schedule="constant"),
}


def module_of(options: dict) -> TinyModule:
    L.seed_everything(SEED, verbose=False)
    return TinyModule(DeltaSAMConfig(**options), optimizer="adamw", lr=LR, dropout=0.1, scheduler=SCHEDULER)


def digest(module: torch.nn.Module) -> str:
    weights = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    return hashlib.sha256(weights.numpy().tobytes()).hexdigest()


def loop_fit(options: dict) -> str:
    module = module_of(options)
    optimizer = torch.optim.AdamW(module.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    batches = N // BATCH
    k = module.deltasam.accumulate_grad_batches
    sam = DeltaSAMOptimizer(module, optimizer, module.deltasam, total_steps=-(-batches // k) * EPOCHS, seed=SEED)
    data = loader(n=N, batch_size=BATCH, shuffle=True)
    for epoch in range(EPOCHS):
        data.sampler.set_epoch(epoch)
        for i, batch in enumerate(data):
            result = sam.step(module.per_sample_loss, batch, last=True if i == batches - 1 else None)
            if result.stepped and (i + 1) % SCHEDULER["frequency"] == 0:
                scheduler.step()
    return digest(module)


def mixin_fit(options: dict) -> str:
    module = module_of(options)
    trainer(max_epochs=EPOCHS).fit(module, loader(n=N, batch_size=BATCH, shuffle=True))
    return digest(module)


ENTRY_POINTS = {"loop": loop_fit, "mixin": mixin_fit}


def test_every_method_and_mode_trains_the_recorded_weights():
    fingerprints = {f"{name}/{entry}": fit(CONFIGS[name]) for name in CONFIGS for entry, fit in ENTRY_POINTS.items()}
    if os.environ.get("FINGERPRINT_WRITE") == "1":
        RECORD.write_text(json.dumps(fingerprints, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {len(fingerprints)} fingerprints in {RECORD.name}")
    recorded = json.loads(RECORD.read_text())
    assert set(recorded) == set(fingerprints), "the configs changed: record the fingerprints again at the old commit"
    changed = sorted(key for key in fingerprints if fingerprints[key] != recorded[key])
    assert not changed, f"these configs now train different weights: {changed}"
