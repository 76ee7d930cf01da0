"""One fine-tuning run of the app as one JSON row: the runner the robust-defaults and generalization studies share.

A run is ``train.py`` with a setting (training subset, epochs, label noise), a method
(ρ, schedule, estimator, β) and a seed. Its row is keyed by the canonical list of
overrides, so a run made for one study counts for the other when its configuration is
identical. Rows are appended to ``docs/results/runs.jsonl`` as runs finish; a rerun
skips every key already there.

The fine-tuning recipe is the app's (MiniLM, AdamW 5e-5, linear warm-up over 10% then
decay, batch 32), at maximum length 32. Validation runs at the end of every epoch (four
times in the one-epoch setting). The test split is scored twice: with the final weights
and with the best-validation checkpoint.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from common import RESULTS, ROOT, compose_config

STORE = RESULTS / "runs.jsonl"
MAX_LENGTH = 32
STALL_SHARE = 0.95
"""A run has stalled when at least this share of its final validation predictions is one class."""

SETTINGS: dict[str, dict[str, Any]] = {
    "clean1k": {"data.train_limit": 1000, "trainer.max_epochs": 5},
    "noisy1k": {"data.train_limit": 1000, "trainer.max_epochs": 5, "data.label_noise": 0.2},
    "4k1ep": {"data.train_limit": 4000, "trainer.max_epochs": 1, "trainer.val_check_interval": 0.25},
}


@dataclass(frozen=True)
class Method:
    """A method as the studies name it; ``extra`` holds further ``method.*`` fields (estimator, β)."""

    method: str
    rho: Optional[float] = None
    schedule: str = "constant"
    warmup: Optional[float] = None
    extra: tuple[tuple[str, Any], ...] = field(default=())

    @property
    def label(self) -> str:
        if self.method == "erm":
            return "erm"
        parts = [self.method, f"rho={self.rho:g}", self.schedule]
        if self.warmup is not None:
            parts.append(f"warmup={self.warmup:g}")
        parts += [f"{k}={v}" for k, v in self.extra]
        return " ".join(parts)

    def overrides(self) -> list[str]:
        out = [f"method={self.method}"]
        if self.method == "erm":
            return out
        out += [f"method.rho={self.rho}", f"method.rho_schedule={self.schedule}"]
        if self.warmup is not None:
            out.append(f"method.rho_warmup={self.warmup}")
        return out + [f"method.{k}={v}" for k, v in self.extra]


def overrides(task: str, setting: str, method: Method, seed: int) -> list[str]:
    """The run's configuration: everything that sets it apart from ``python train.py``."""
    out = [f"task={task}", f"seed={seed}", f"data.max_length={MAX_LENGTH}"]
    out += [f"{k}={v}" for k, v in SETTINGS[setting].items()]
    return sorted(out + method.overrides())


def key(task: str, setting: str, method: Method, seed: int) -> str:
    return " ".join(overrides(task, setting, method, seed))


def load(path: Path = STORE) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_by_key(path: Path = STORE) -> dict[str, dict]:
    return {row["key"]: row for row in load(path)}


class FinalHessian(L.Callback):
    """The top Hessian eigenvalue of the final weights on the first validation batch (eval mode)."""

    def __init__(self, batch_size: int = 16, iters: int = 20) -> None:
        self.batch_size, self.iters = batch_size, iters
        self.value: Optional[float] = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_deltasam.core.batch import slice_batch
        from lit_deltasam.core.diagnostics import top_hessian_eigenvalue

        loader = trainer.val_dataloaders
        batch = slice_batch(next(iter(loader)), slice(0, self.batch_size))
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.enable_grad():
                self.value = top_hessian_eigenvalue(
                    pl_module,
                    pl_module.per_sample_loss,
                    batch,
                    iters=self.iters,
                    generator=torch.Generator().manual_seed(0),
                )
        finally:
            for m, mode in modes.items():
                m.training = mode
        trainer.callback_metrics["final/hessian_top_eig"] = torch.tensor(self.value)


def _curve(out: Path, monitor: str) -> list[list[float]]:
    # the newest CSV logger version: an interrupted earlier attempt may have left an older one
    newest = max(out.glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1]))
    points = []
    with open(newest / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get(monitor):
                points.append([int(row["step"]), float(row[monitor]), float(row.get("val/majority_share") or "nan")])
    return sorted(points)


def run(task: str, setting: str, method: Method, seed: int, out: Path) -> dict:
    """Fine-tune once and return the row."""
    from train import train

    args = overrides(task, setting, method, seed)
    cfg = compose_config(
        args
        + [
            "data.eval_batch_size=256",
            "logger=csv",
            "callbacks=default",
            "~callbacks.sharpness_probe",
            "~callbacks.lr_monitor",
            "~callbacks.progress_bar",
            "callbacks.model_checkpoint.save_last=false",
            "+callbacks.model_checkpoint.save_weights_only=true",
            "+callbacks.final_hessian._target_=runs.FinalHessian",
            "test_final=true",
        ],
        out,
    )
    start = time.perf_counter()
    metrics = train(cfg)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    share = metrics.get("val/majority_share")
    return {
        "key": " ".join(args),
        "overrides": args,
        "task": task,
        "setting": setting,
        "method": method.label,
        "seed": seed,
        "metrics": metrics,
        "curve": _curve(out, "val/acc"),
        "stalled": bool(share is not None and share >= STALL_SHARE),
        "time_s": elapsed,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def run_all(
    units: Iterable[tuple[str, str, Method, int]], name: str, path: Path = STORE
) -> Iterator[tuple[tuple[str, str, Method, int], dict]]:
    """Run every unit whose row is missing, appending each row as it finishes; yield every unit with its row."""
    done = rows_by_key(path)
    for unit in units:
        k = key(*unit)
        if k not in done:
            task, setting, method, seed = unit
            slug = f"{task}-{setting}-{method.label.replace(' ', '_').replace('=', '')}-s{seed}"
            row = run(task, setting, method, seed, ROOT / "outputs" / "benchmarks" / name / slug)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
            done[k] = row
            print(
                f"[{name}] {slug}: val {row['metrics'].get('val/acc', float('nan')):.4f} "
                f"test {row['metrics'].get('test/acc', float('nan')):.4f} ({row['time_s']:.0f} s)",
                flush=True,
            )
        yield unit, done[k]
