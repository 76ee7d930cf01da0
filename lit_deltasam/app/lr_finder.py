"""``tune_lr=true``: Lightning's LR range test on an ERM copy of the run, before the run.

The range test (Smith, 2017; Lightning's ``Tuner.lr_find``) trains for ``num_training``
steps while the LR grows from ``min_lr`` to ``max_lr`` and suggests the LR where the
smoothed loss falls fastest. It runs on a throw-away ERM copy of the model, built from the
same seed, config and data: the LR is chosen for ERM and every method then trains at it
(the regimes study's base-recipe rule), and the sharpness-aware state of the real run is
never touched. The run that follows is the run ``optim.lr=<suggestion>`` would be.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from . import assemble, schema

LOOP_FIELDS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "seed_steps")
"""The method's loop fields the range test keeps: they change what an LR does to a step."""


def apply(cfg: DictConfig) -> dict[str, float]:
    """With ``tune_lr``, set ``optim.lr`` to the range test's suggestion and return ``{"tune_lr/lr": lr}``;
    without it, refuse any ``lr_find.*`` value that differs from its default (it would do nothing)."""
    if not cfg.tune_lr:
        defaults = schema.LrFindSchema()
        changed = [f"lr_find.{k}={v}" for k, v in cfg.lr_find.items() if v != getattr(defaults, k)]
        if changed:
            raise ValueError(f"{', '.join(changed)} set with tune_lr=false: add tune_lr=true, or drop them")
        return {}
    check(cfg.lr_find)
    found = find_lr(cfg)
    cfg.optim.lr = found["lr"]
    rank_zero_info(
        f"tune_lr: Lightning's LR range test ({len(found['lrs'])} ERM steps) suggests optim.lr={found['lr']:.3g}; "
        f"the curve is in {Path(cfg.paths.output_dir) / 'lr_find.json'}"
    )
    return {"tune_lr/lr": found["lr"]}


MODES = ("exponential", "linear")
MIN_STEPS = 12
"""Lightning's suggestion skips the curve's first 10 points and its last."""


def check(search: DictConfig) -> None:
    if search.mode not in MODES:
        raise ValueError(f"lr_find.mode={search.mode!r}: choose one of {list(MODES)}")
    if search.num_training < MIN_STEPS:
        raise ValueError(
            f"lr_find.num_training={search.num_training}: the suggestion needs at least {MIN_STEPS} steps "
            "(Lightning skips the curve's first 10 points and its last)"
        )
    if not 0 < search.min_lr < search.max_lr:
        raise ValueError(f"lr_find.min_lr={search.min_lr}, lr_find.max_lr={search.max_lr}: need 0 < min_lr < max_lr")
    if search.early_stop_threshold is not None and not search.early_stop_threshold > 1:
        raise ValueError(
            f"lr_find.early_stop_threshold={search.early_stop_threshold}: the search stops once the loss exceeds "
            "this many times its best; give a value above 1, or null to never stop early"
        )


def refuse_explicit_lr(cfg: DictConfig) -> None:
    """``tune_lr=true`` sets ``optim.lr``; an ``optim.lr`` given on the command line as well would be lost."""
    if not HydraConfig.initialized():
        return
    for override in HydraConfig.get().overrides.task:
        if override.lstrip("+~").split("=", 1)[0] == "optim.lr":
            raise ValueError(
                f"{override!r} and tune_lr=true: the LR finder chooses optim.lr; drop one of them "
                f"(the range test spans lr_find.min_lr={cfg.lr_find.min_lr} to lr_find.max_lr={cfg.lr_find.max_lr})"
            )


def find_lr(cfg: DictConfig) -> dict[str, Any]:
    """Run the range test; return ``{"lr": suggestion, "lrs": [...], "losses": [...]}`` and plot it.

    Raises ``RuntimeError`` when the test finds no descent (too few steps, or a flat loss).
    """
    refuse_explicit_lr(cfg)
    search = cfg.lr_find
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = assemble.build(cfg)
    method = module.deltasam
    module.deltasam = type(method)(method="erm", **{f: getattr(method, f) for f in LOOP_FIELDS})
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=-1,
        max_steps=search.num_training,
        check_val_every_n_epoch=None,
        val_check_interval=10**9,  # the range test needs no validation
        default_root_dir=cfg.paths.output_dir,  # for its checkpoint of the start, which it deletes
    )
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=search.min_lr,
        max_lr=search.max_lr,
        num_training=search.num_training,
        mode=search.mode,
        early_stop_threshold=search.early_stop_threshold,
    )
    assert finder is not None
    lr = finder.suggestion()
    if lr is None or not math.isfinite(lr):
        raise RuntimeError(
            f"the LR range test found no descent in {len(finder.results['lr'])} steps from "
            f"{search.min_lr} to {search.max_lr}: raise lr_find.num_training or widen the range, or set optim.lr"
        )
    if trainer.is_global_zero:
        save_curve(finder, Path(cfg.paths.output_dir))
    return {"lr": float(lr), "lrs": finder.results["lr"], "losses": finder.results["loss"]}


def save_curve(finder: Any, out: Path) -> None:
    """``lr_find.json`` (the curve and the suggestion) and, where matplotlib is installed, ``lr_find.png``."""
    out.mkdir(parents=True, exist_ok=True)
    curve = {"suggestion": finder.suggestion(), **finder.results}
    (out / "lr_find.json").write_text(json.dumps(curve, indent=1))
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return
    figure = finder.plot(suggest=True)
    assert isinstance(figure, Figure)
    figure.savefig(out / "lr_find.png", dpi=120, bbox_inches="tight")
