"""What the CLI prints: third-party notices that tell the user nothing are silenced at their source, and the
app's own errors (bad data, a bad path) print as one message, as Hydra prints a config error."""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from lightning.pytorch.loggers import WandbLogger

T = TypeVar("T")
PACKAGE = Path(__file__).resolve().parents[1]

NOISE = (
    "💡 Tip: For seamless cloud logging",  # Lightning advertising litlogger
    "Loading `train_dataloader` to estimate",  # Lightning sizing the LR schedule
    "=1.0)` was configured so",  # Lightning echoing a limit_*_batches or val_check_interval set to its default
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in NOISE)


class _DropNewHeadReport(logging.Filter):
    """transformers' LOAD REPORT when all it reports is the classification head, which fine-tuning initializes
    anew by design; a report that names any other key (a wrong or truncated checkpoint) stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
        rows = [row for row in rows if len(row) >= 2 and row[0] and row[0] != "Key"]
        return not rows or not all(row[1] == "MISSING" and row[0].startswith("classifier.") for row in rows)


def quiet() -> None:
    """Silence the notices of Lightning, torchdata, W&B, Optuna's storage and transformers that say nothing
    about the run."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropNoise())
    logging.getLogger("transformers.modeling_utils").addFilter(_DropNewHeadReport())
    logging.getLogger("alembic").setLevel(logging.WARNING)  # Optuna's RDB storage migrations, once per sweep
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


LOGGED = ("lightning.pytorch", "lightning.fabric", "lit_deltasam.report")
"""Loggers that do not propagate to the root logger, whose file handler Hydra opens: Lightning's (imported before
Hydra configures logging, it prints through its own handler) and the final report's (the screen has it already)."""


def log_to_file() -> None:
    """Send the records of :data:`LOGGED` to the log files Hydra opened for the run (``train.log``), beside where
    they print now: without this the file stays empty."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    for name in LOGGED:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if logger.propagate:
            continue
        for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)  # the previous job's, in a multirun
        for handler in files:
            logger.addHandler(handler)


def report_errors(run: Callable[[], T]) -> T:
    """Run ``run``; an error that the app itself raised about the user's input (a ``ValueError``,
    ``FileNotFoundError`` or ``TypeError`` from inside lit_deltasam) prints as its message alone and exits
    with status 1. ``HYDRA_FULL_ERROR=1`` shows the whole trace, as for Hydra's own errors."""
    try:
        return run()
    except (ValueError, FileNotFoundError, TypeError) as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not _raised_here(error):
            raise
        print(
            f"Error: {error}\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.",
            file=sys.stderr,
        )
        sys.exit(1)


def _raised_here(error: BaseException) -> bool:
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)


def wandb_logger(**kwargs: Any) -> WandbLogger:
    """Lightning's ``WandbLogger``, without the ``anonymous=None`` it always hands ``wandb.init`` (which W&B
    answers with a deprecation warning on every run); in a multirun (Optuna trials included) the ``name`` ends in
    ``-job<N>``, Hydra's job number, so that the sweep's runs can be told apart. ``WANDB_MODE=disabled`` in the
    environment is honoured over the config's ``offline``, which W&B would otherwise take as the explicit mode."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.loggers import WandbLogger

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        kwargs["name"] = f"{kwargs.get('name') or 'run'}-job{HydraConfig.get().job.num}"
    if os.environ.get("WANDB_MODE") == "disabled":
        # offline=True would make Lightning set WANDB_MODE=dryrun, and the next job of a multirun would log
        kwargs.update(mode="disabled", offline=False)
    logger = WandbLogger(**kwargs)
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger


def check_override_keys(arguments: list[str], typed: dict[str, type]) -> None:
    """Stop before Hydra runs when a command-line override names a key that a typed config group lacks, naming
    the valid keys (Hydra's own error names only the bad one). ``typed`` maps a group to its dataclass schema."""
    import dataclasses
    import difflib

    for argument in arguments:
        key, equals, _ = argument.partition("=")
        if not equals or key.startswith(("+", "~", "hydra.", "-")) or "." not in key:
            continue
        group, name = key.split(".")[0], key.split(".")[1]
        schema = typed.get(group)
        if schema is None:
            continue
        valid = sorted(f.name for f in dataclasses.fields(schema) if not f.name.startswith("_"))
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {group}.{close[0]}?" if close else ""
            print(
                f"Error: {key}={argument.split('=', 1)[1]}: {group} has no key {name!r}.{hint} "
                f"Valid keys of {group}: {', '.join(valid)}",
                file=sys.stderr,
            )
            sys.exit(1)
