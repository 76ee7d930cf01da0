"""``tune_lr=true``: Lightning's LR range test on an ERM copy of the run, before the run.

The range test (Smith, 2017; Lightning's ``Tuner.lr_find``) trains for ``num_training``
steps while the LR grows from ``min_lr`` to ``max_lr``; a rule (:data:`RULES`) reads the
LR off the smoothed loss curve. It runs on a throw-away ERM copy of the model, built from the
same seed, config and data: the LR is chosen for ERM and every method then trains at it
(the regimes study's base-recipe rule), and the sharpness-aware state of the real run is
never touched. The run that follows is the run ``optim.lr=<suggestion>`` would be.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from . import assemble, schema

LOOP_FIELDS = ("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "seed_steps")
"""The method's loop fields the range test keeps: they change what an LR does to a step."""


def apply(cfg: DictConfig) -> dict[str, float]:
    """With ``tune_lr``, set ``optim.lr`` to the range test's suggestion and return ``{"tune_lr/lr": lr,
    "time/tune_s": seconds}``; without it, refuse any ``lr_find.*`` value that differs from its default
    (it would do nothing)."""
    if not cfg.tune_lr:
        defaults = schema.LrFindSchema()
        changed = [f"lr_find.{k}={v}" for k, v in cfg.lr_find.items() if v != getattr(defaults, k)]
        if changed:
            raise ValueError(f"{', '.join(changed)} set with tune_lr=false: add tune_lr=true, or drop them")
        return {}
    check(cfg)
    start = time.perf_counter()
    found = find_lr(cfg)
    cfg.optim.lr = found["lr"]
    rank_zero_info(
        f"tune_lr: Lightning's LR range test ({len(found['lrs'])} ERM steps) suggests optim.lr={found['lr']:.3g}; "
        f"the curve is in {Path(cfg.paths.output_dir) / 'lr_find.json'}"
    )
    return {"tune_lr/lr": found["lr"], "time/tune_s": time.perf_counter() - start}


MODES = ("exponential", "linear")
RULES = ("minimum", "steepest")
"""``minimum`` (the default): a tenth of the LR at the lowest smoothed loss (Smith, 2017; fastai's ``lr_min``);
``steepest``: where the smoothed loss falls fastest (Lightning's rule, read off the corrected curve)."""
SKIP_BEGIN, SKIP_END = 10, 1
"""The curve's points both rules pass over (Lightning's defaults)."""
MIN_STEPS = SKIP_BEGIN + SKIP_END + 1


def check(cfg: DictConfig) -> None:
    """Refuse a search that cannot run or suggest, and every setting the suggestion would overwrite or not reach."""
    search = cfg.lr_find
    if search.mode not in MODES:
        raise ValueError(f"lr_find.mode={search.mode!r}: choose one of {list(MODES)}")
    if search.rule not in RULES:
        raise ValueError(f"lr_find.rule={search.rule!r}: choose one of {list(RULES)}")
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
    if cfg.ckpt_path is not None:
        raise ValueError(
            f"ckpt_path={cfg.ckpt_path!r} and tune_lr=true: a resumed run continues at its checkpoint's LR "
            "schedule; drop tune_lr to resume"
        )
    if cfg.trainer.get("fast_dev_run"):
        raise ValueError("trainer.fast_dev_run and tune_lr=true: Lightning skips the LR finder in a fast dev run")
    refuse_explicit_lr(cfg)


def refuse_explicit_lr(cfg: DictConfig) -> None:
    """``tune_lr=true`` sets ``optim.lr``: one given on the command line, or by a config, would be lost."""
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    given = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] in ("optim", "optim.lr")]
    default = schema.OptimSchema().lr
    if given or cfg.optim.lr != default:
        where = repr(given[0]) if given else f"optim.lr={cfg.optim.lr} (from a config)"
        raise ValueError(
            f"{where} and tune_lr=true: the LR finder chooses optim.lr; drop one of them "
            f"(the range test spans lr_find.min_lr={cfg.lr_find.min_lr} to lr_find.max_lr={cfg.lr_find.max_lr})"
        )


def find_lr(cfg: DictConfig) -> dict[str, Any]:
    """Run the range test and save its curve; return ``{"lr": suggestion, "lrs": [...], "losses": [...]}``,
    one point per optimizer step.

    Raises ``ValueError`` when the curve gives no suggestion (a flat loss, or a search that
    diverged within its first points); the curve is saved first.
    """
    search = cfg.lr_find
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = assemble.build(cfg)
    method = module.deltasam
    module.deltasam = type(method)(method="erm", **{f: getattr(method, f) for f in LOOP_FIELDS})
    recorded = record_losses(module)
    trainer = range_test_trainer(cfg)
    finder = Tuner(trainer).lr_find(
        module,
        datamodule=datamodule,
        min_lr=search.min_lr,
        max_lr=search.max_lr,
        num_training=search.num_training,
        mode=search.mode,
        early_stop_threshold=search.early_stop_threshold,
        update_attr=False,
    )
    assert finder is not None  # None only in a fast dev run, refused above
    finder.results = trainer.strategy.broadcast(smoothed_curve(recorded))  # rank 0's, as Lightning's own
    lr = suggestion(finder, search.rule)
    if trainer.is_global_zero:
        save_curve(finder, lr, search.rule, Path(cfg.paths.output_dir))
    if lr is None or not math.isfinite(lr):
        raise no_suggestion(finder.results["lr"], search, Path(cfg.paths.output_dir))
    return {"lr": float(lr), "lrs": finder.results["lr"], "losses": finder.results["loss"]}


def range_test_trainer(cfg: DictConfig) -> L.Trainer:
    """The run's trainer as the range test needs it: no loggers, callbacks, checkpoints or validation, and
    ``lr_find.num_training`` steps at most."""
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=-1,
        max_steps=cfg.lr_find.num_training,
        min_epochs=None,  # a minimum would hold off the stop on divergence
        min_steps=None,
        max_time=None,
        check_val_every_n_epoch=None,
        val_check_interval=10**9,  # the range test needs no validation
        default_root_dir=cfg.paths.output_dir,  # for its checkpoint of the start, which it deletes
    )
    return trainer


def no_suggestion(lrs: list[float], search: Any, output_dir: Path) -> ValueError:
    """The error for a curve that gave no suggestion: diverged early (``lrs`` stopped short) or barely moved."""
    points = len(lrs)
    stopped = points < search.num_training
    return ValueError(
        f"the LR range test gave no suggestion from {points} points between lr_find.min_lr={search.min_lr} and "
        + (
            f"{lrs[-1]:.3g}, where the loss diverged: lower lr_find.max_lr or raise lr_find.early_stop_threshold"
            if stopped
            else f"lr_find.max_lr={search.max_lr}: the loss barely moved; raise lr_find.num_training or max_lr"
        )
        + f"; the curve is in {output_dir / 'lr_find.json'}. Or set optim.lr and drop tune_lr"
    )


BETA = 0.98
"""The smoothing of the loss curve (Lightning's)."""


def record_losses(module: Any) -> list[tuple[float, float]]:
    """Record ``(lr, loss)`` of every training step of ``module`` (micro-batches, with accumulation).

    Lightning's callback keeps only its smoothed curve, whose bias correction divides by one
    term too many (``1 - β^(global_step + 1)`` after ``global_step`` losses), which pulls the
    first points down by up to half (the rising start of its curves, Lightning-AI/pytorch-lightning#14167):
    on a flat curve the lowest point is then the first one.
    The raw losses let :func:`smoothed_curve` smooth them as they were.
    """
    records: list[tuple[float, float]] = []
    step = module.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        lr = module.trainer.optimizers[0].param_groups[0]["lr"]  # the LR this step's update uses
        loss = step(*args, **kwargs)
        records.append((float(lr), float(loss)))
        return loss

    module.training_step = training_step
    return records


def smoothed_curve(records: list[tuple[float, float]], beta: float = BETA) -> dict[str, list[float]]:
    """One point per optimizer step (the mean loss of its micro-batches: the LR moves once per window, and a
    skipped step repeats its LR), smoothed by a bias-corrected exponential moving average."""
    lrs: list[float] = []
    means: list[float] = []
    count = 0
    for lr, loss in records:
        if lrs and lr == lrs[-1]:
            count += 1
            means[-1] += (loss - means[-1]) / count
        else:
            lrs.append(lr)
            means.append(loss)
            count = 1
    smoothed, average = [], 0.0
    for i, loss in enumerate(means):
        average = beta * average + (1 - beta) * loss
        smoothed.append(average / (1 - beta ** (i + 1)))
    return {"lr": lrs, "loss": smoothed, "raw_loss": means}


def suggestion(finder: Any, rule: str) -> Optional[float]:
    """The LR that ``rule`` (one of :data:`RULES`) reads off the curve; ``None`` where it finds none."""
    if rule == "steepest":
        return finder.suggestion(skip_begin=SKIP_BEGIN, skip_end=SKIP_END)
    lrs = finder.results["lr"][SKIP_BEGIN:-SKIP_END]
    losses = np.asarray(finder.results["loss"][SKIP_BEGIN:-SKIP_END], dtype=float)
    if not np.isfinite(losses).any():
        return None
    return float(lrs[int(np.nanargmin(np.where(np.isfinite(losses), losses, np.nan)))]) / 10


def save_curve(finder: Any, lr: Optional[float], rule: str, out: Path) -> None:
    """``lr_find.json`` (the curve and the suggestion) and, where matplotlib is installed, ``lr_find.png``."""
    out.mkdir(parents=True, exist_ok=True)
    curve = {"suggestion": lr, "rule": rule, **finder.results}
    (out / "lr_find.json").write_text(json.dumps(curve, indent=1))
    try:
        import matplotlib.pyplot as plt
        from matplotlib.figure import Figure
    except ImportError:
        return
    figure = finder.plot(suggest=False)  # plots results["lr"] and results["loss"]
    assert isinstance(figure, Figure)
    if lr is not None:
        figure.axes[0].axvline(lr, color="red", linestyle="--", label=f"{rule}: {lr:.3g}")
        figure.axes[0].legend()
    figure.savefig(out / "lr_find.png", dpi=120, bbox_inches="tight")
    plt.close(figure)
