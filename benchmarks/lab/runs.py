"""One fine-tuning run of the app as one JSON row: the runner every fine-tuning study shares.

A run is ``train.py`` with a setting (training subset, epochs, label noise), a method
(ρ, schedule, estimator, β), an optimizer recipe and a seed. Its row is keyed by the canonical list of
overrides, so a run made for one study counts for the other when its configuration is
identical. Rows are appended to the platform's store (``docs/results/runs.jsonl``; ``runs_gpu.jsonl`` for
``--platform gpu``, the shipped ``trainer=gpu``) as runs finish; a rerun skips every key already there.
:func:`schedule` runs a study's phases, in a pool of worker processes with ``jobs`` > 1.

The optimizer recipe is written out in every row: :data:`LEGACY_OPTIM` (AdamW 5e-5, weight decay 0.01, linear
warm-up over 10% then decay) unless a unit gives its own, never the app's current default; MiniLM, batch 32, at
maximum length 32 unless a setting gives its own. Validation runs at
the end of every epoch (four times in the one-epoch setting). The test split is scored twice: with the final weights
and with the best-validation checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from omegaconf import OmegaConf

from benchmarks.lab.common import PROVENANCE, RESULTS, ROOT, compose_config
from lit_deltasam import DeltaSAMConfig

STORE = RESULTS / "runs.jsonl"
PLATFORMS: dict[str, tuple[tuple[str, ...], Path]] = {
    "cpu": ((), STORE),
    # the shipped GPU trainer (bf16-mixed): its rows are keyed apart and kept in their own store
    "gpu": (("trainer=gpu",), RESULTS / "runs_gpu.jsonl"),
}
"""Where a study runs: the overrides every run of that platform adds, and the store of its rows."""
MAX_LENGTH = 32
STALL_SHARE = 0.95
"""A run has stalled when at least this share of its final validation predictions is one class."""

SETTINGS: dict[str, dict[str, Any]] = {
    "clean1k": {"data.train_limit": 1000, "trainer.max_epochs": 5},
    "noisy1k": {"data.train_limit": 1000, "trainer.max_epochs": 5, "data.label_noise": 0.2},
    "4k1ep": {"data.train_limit": 4000, "trainer.max_epochs": 1, "trainer.val_check_interval": 0.25},
    "noisy40": {"data.train_limit": 1000, "trainer.max_epochs": 5, "data.label_noise": 0.4},
    # a short many-class run (the base-recipe study, on r8)
    "2k3ep": {"data.train_limit": 2000, "trainer.max_epochs": 3, "data.max_length": 64},
    # the main job: the whole training split for one epoch at the app's length (the recipe suite)
    "full1ep": {"trainer.max_epochs": 1, "data.max_length": 48},
    # the recipe's many-class tuning tasks (benchmarks/tuning.py writes their files), as a user's own CSVs
    **{
        f"{task}2k3ep": {
            **{
                f"task.{split}": f"${{paths.cache_dir}}/tuning/{task}/{split}.csv"
                for split in ("train", "validation", "test")
            },
            "trainer.max_epochs": 3,
            "data.max_length": 64,
        }
        for task in ("20ng", "r52")
    },
    # a few batches of everything a run does, to try a platform before a study (runs.py --smoke)
    "smoke": {
        "data.train_limit": 64,
        "trainer.max_epochs": 1,
        "trainer.limit_val_batches": 1,
        "trainer.limit_test_batches": 1,
    },
}


LEGACY_OPTIM: dict[str, float] = {
    "lr": 5e-5,
    "weight_decay": 0.01,
    "warmup_ratio": 0.1,
    "head_lr_mult": 1.0,
    "layer_decay": 1.0,
}
"""What a row ran at for each ``optim.*`` field its overrides leave out: every row made before rows wrote a field
ran at these values, whatever the app's default is now. Studies that give no value (``lr=None``) mean these."""
LEGACY_LR = LEGACY_OPTIM["lr"]


def legacy_optim() -> list[str]:
    """``optim.*`` overrides at :data:`LEGACY_OPTIM`: for a study whose committed rows or tables do not record the
    optimizer recipe (fidelity, staleness), so that its runs stay at the recipe those were made with."""
    return [_optim(k, v) for k, v in LEGACY_OPTIM.items()]


_platform: dict[str, Any] = {"name": "cpu", "store": STORE}


def use_platform(name: str, store: Optional[Path] = None) -> None:
    """Run (and key) every later run on platform ``name``, its rows in ``store`` (default: the platform's)."""
    if name not in PLATFORMS:
        raise ValueError(f"platform={name!r} is not one of {sorted(PLATFORMS)}")
    _platform.update(name=name, store=Path(store) if store is not None else PLATFORMS[name][1])


def platform_name() -> str:
    """The platform every later run runs on (:func:`use_platform`)."""
    return _platform["name"]


def store() -> Path:
    """The store of the current platform's rows."""
    return _platform["store"]


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


TUNE = "tune"
"""The ``lr`` of a run whose learning rate Lightning's range test chooses (``tune_lr=true``); ``"tune:<rule>"``
reads it off the curve with another ``lr_find.rule``."""
LEGACY_LR_FIND = dict(
    min_lr=1e-07, max_lr=0.01, num_training=100, mode="exponential", early_stop_threshold=4.0, rule="steepest"
)
"""The range test of every ``tune_lr=true`` row made before rows recorded its ``lr_find.*`` values."""


def lr_overrides(lr: float | str, search: Optional[dict[str, Any]] = None) -> list[str]:
    """``optim.lr=...``; for :data:`TUNE`, ``tune_lr=true`` and the range test's settings (``search``, else the
    current defaults), so that a default changed later cannot make an old row count for the new search."""
    if not is_tuned(lr):
        return [_optim("lr", lr)]
    from lit_deltasam.app.schema import LrFindSchema

    search = dataclasses.asdict(LrFindSchema()) if search is None else search
    if str(lr) != TUNE:
        search = {**search, "rule": str(lr).split(":", 1)[1]}
    return ["tune_lr=true"] + [f"lr_find.{k}={v}" for k, v in search.items()]


def is_tuned(lr: float | str) -> bool:
    return isinstance(lr, str) and (lr == TUNE or lr.startswith(TUNE + ":"))


def _optim(name: str, value: Any) -> str:
    return f"optim.{name}={float(value)!r}"


def explicit(data: list[str]) -> list[str]:
    """``data`` with every ``optim.*`` value written out in one form: those it sets, and the others at
    :data:`LEGACY_OPTIM` (``optim.lr`` too unless the range test sets it)."""
    given = {}
    rest = []
    for o in data:
        name, _, value = o.partition("=")
        if name.startswith("optim."):
            given[name.removeprefix("optim.")] = value
        else:
            rest.append(o)
    unknown = set(given) - set(LEGACY_OPTIM)
    if unknown:
        raise ValueError(f"optim fields {sorted(unknown)} have no legacy value: add them to LEGACY_OPTIM")
    tuned = "tune_lr=true" in rest
    out = {k: given.get(k, v) for k, v in LEGACY_OPTIM.items() if not (k == "lr" and tuned and k not in given)}
    return sorted(rest + [_optim(k, v) for k, v in out.items()])


def data_overrides(
    task: str, setting: str, seed: int, lr: Optional[float | str] = None, optim: tuple[tuple[str, float], ...] = ()
) -> list[str]:
    """Everything but the method, every ``optim.*`` field written out: ``lr`` (``None``: :data:`LEGACY_LR`, as in
    the rows of the studies that gave none; :data:`TUNE`: the range test's) and ``optim`` (the other fields; those
    left out at :data:`LEGACY_OPTIM`)."""
    out = [f"task={task}", f"seed={seed}", *PLATFORMS[_platform["name"]][0]]
    out += [] if "data.max_length" in SETTINGS[setting] else [f"data.max_length={MAX_LENGTH}"]
    out += lr_overrides(LEGACY_LR if lr is None else lr)
    out += [_optim(k, v) for k, v in optim]
    return explicit(out + [f"{k}={v}" for k, v in SETTINGS[setting].items()])


def overrides(
    task: str,
    setting: str,
    method: Method,
    seed: int,
    lr: Optional[float | str] = None,
    optim: tuple[tuple[str, float], ...] = (),
) -> list[str]:
    """The run's configuration: everything that sets it apart from ``python train.py`` with the defaults of
    :data:`LEGACY_OPTIM`."""
    return sorted(data_overrides(task, setting, seed, lr, optim) + method.overrides())


def relevant(config: DeltaSAMConfig) -> dict[str, Any]:
    """The fields that change what ``config`` computes (ERM ignores ρ, SAM ignores β, and so on)."""
    fields = ["method", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "share_dropout"]
    fields += ["seed_steps", "ascent"]
    if config.perturbs:
        fields += ["rho", "rho_schedule", "interval", "reuse"]
        fields += ["rho_warmup"] if config.rho_schedule in ("warmup", "start_step") else []
        # absent from rows made before m-sharpness existed, which all perturbed the whole batch
        fields += ["m_sharpness"] if config.m_sharpness is not None else []
        fields += ["reuse_alpha"] if config.reuse is not None else []
    fields += {"gsam": ["gsam_alpha"], "wsam": ["wsam_gamma"], "fsam": ["fsam_sigma", "fsam_lambda"]}.get(
        config.method, []
    )
    fields += ["wsam_decouple"] if config.wsam_decouple is False else []  # rows made before it: decoupled
    # absent from rows made before the family existed: none centred the ascent or ran a policy
    fields += ["gradient_centralization"] if config.gradient_centralization else []
    fields += ["policy", "policy_delta", "policy_c_start", "policy_c_end"] if config.policy is not None else []
    if config.asam_scaled:  # ASAM, or a family method scaled as ASAM (absent from rows made before that existed)
        fields.append("asam_eta")
        # absent from rows made before asam_scope existed, which all scaled every parameter
        fields += ["asam_scope"] if config.asam_scope != "all" else []
    if config.reweights:
        fields += ["beta", "estimator", "weight_floor", "weight_min", "weight_max", "weighted_descent", "head"]
        if config.estimator in ("probe", "curvature"):
            fields += ["probe_samples", "probe_sigma", "probe_antithetic", "probe_params", "probe_truncate"]
    if config.method == "per_instance" or (config.reweights and config.estimator == "exact"):
        fields += ["per_instance_impl", "per_instance_chunk"]
    values = dataclasses.asdict(config)
    return {name: values[name] for name in fields}


@functools.lru_cache(maxsize=None)
def _resolved(method_overrides: tuple[str, ...]) -> str:
    cfg = compose_config(list(method_overrides), ROOT / "outputs" / "benchmarks" / "compose")
    config = DeltaSAMConfig.coerce(OmegaConf.to_container(cfg.method, resolve=True))
    return json.dumps(relevant(config), sort_keys=True)


def resolved_method(method_overrides: list[str]) -> dict[str, Any]:
    """The relevant fields of the DeltaSAMConfig that ``method_overrides`` give with the code's current defaults."""
    return json.loads(_resolved(tuple(sorted(method_overrides))))


def _key(data: list[str], method_config: dict[str, Any]) -> str:
    return json.dumps({"data": sorted(data), "method": method_config}, sort_keys=True)


def key(
    task: str,
    setting: str,
    method: Method,
    seed: int,
    lr: Optional[float | str] = None,
    optim: tuple[tuple[str, float], ...] = (),
) -> str:
    """A run's identity: its data, every ``optim.*`` value and the whole resolved method config, so that a
    default changed later cannot make an old row count for the new default, and equal configurations share one row."""
    return _key(data_overrides(task, setting, seed, lr, optim), resolved_method(method.overrides()))


RENAMED = {"/heldout/": "/tuning/"}
"""Paths renamed after rows were written with them: the tuning tasks' CSV folder was ``<cache>/heldout/`` until
they were named for what they are. A row keeps what it ran; its key reads the new name."""


def _renamed(override: str) -> str:
    for old, new in RENAMED.items():
        override = override.replace(old, new)
    return override


def load(path: Optional[Path] = None) -> list[dict]:
    path = path or store()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Rows(dict):
    """A store's rows by key that remembers the rows a report read (``get`` or ``[]``): the rows its tables rest on,
    whose commits, trees and machines :mod:`benchmarks.lab.provenance` reports."""

    read: list[dict] = []

    def get(self, k: Any, default: Any = None) -> Any:
        row = super().get(k, default)
        if row is not None and row is not default:
            Rows.read.append(row)
        return row

    def __getitem__(self, k: Any) -> Any:
        row = super().__getitem__(k)
        Rows.read.append(row)
        return row


def rows_by_key(path: Optional[Path] = None) -> dict[str, dict]:
    """Rows keyed as :func:`key` does: each ``optim.*`` field a row leaves out at :data:`LEGACY_OPTIM`, never at
    the current default. A row made before rows recorded their method config is resolved with the current
    defaults (it must then be migrated before a default changes: :func:`migrate`)."""
    out = Rows()
    for row in load(path):
        method_config = row.get("method_config")
        if method_config is None:
            method_config = resolved_method([o for o in row["overrides"] if o.startswith("method")])
        data = explicit([_renamed(o) for o in row["overrides"] if not o.startswith("method")])
        if "tune_lr=true" in data and not any(o.startswith("lr_find.") for o in data):
            # the same run with its range test written out
            data = [o for o in data if o != "tune_lr=true"] + lr_overrides(TUNE, LEGACY_LR_FIND)
        out[_key(data, method_config)] = row
    return out


def migrate(path: Optional[Path] = None) -> int:
    """Write the resolved method config into rows that lack it; returns how many changed."""
    path = path or store()
    rows = load(path)
    changed = 0
    for row in rows:
        if "method_config" not in row:
            row["method_config"] = resolved_method([o for o in row["overrides"] if o.startswith("method")])
            changed += 1
    if changed:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return changed


class FinalFlatness(L.Callback):
    """Flatness of the final weights, one measure for every method, on the first ``batch_size`` validation
    instances in eval mode: the Hessian eigenvalue of largest magnitude (power iteration; negative where the
    dominant curvature is) and the SAM sharpness ``L(w + ρ₀ g/‖g‖) − L(w)`` at a fixed ``rho`` (each method's
    own ``sam/sharpness_mean`` is at its own ρ)."""

    def __init__(self, batch_size: int = 32, iters: int = 20, rho: float = 0.05) -> None:
        self.batch_size, self.iters, self.rho = batch_size, iters, rho

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from lit_deltasam.core.batch import slice_batch
        from lit_deltasam.core.diagnostics import top_hessian_eigenvalue

        batch = slice_batch(next(iter(trainer.val_dataloaders)), slice(0, self.batch_size))
        batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.enable_grad():
                eig = top_hessian_eigenvalue(
                    pl_module,
                    pl_module.per_sample_loss,
                    batch,
                    params,
                    iters=self.iters,
                    generator=torch.Generator().manual_seed(0),
                )
                sharpness = self._sam_sharpness(pl_module, batch, params)
        finally:
            for m, mode in modes.items():
                m.training = mode
        trainer.callback_metrics["final/hessian_top_eig"] = torch.tensor(eig)
        trainer.callback_metrics["final/sam_sharpness"] = torch.tensor(sharpness)

    def _sam_sharpness(self, module: L.LightningModule, batch: Any, params: list[torch.Tensor]) -> float:
        from lit_deltasam.core import perturb
        from lit_deltasam.core.snapshot import Snapshot

        loss = module.per_sample_loss(batch).mean()
        grads = torch.autograd.grad(loss, params)
        snapshot = Snapshot(params)
        snapshot.capture()
        try:
            perturb(params, grads, self.rho)
            with torch.no_grad():
                perturbed = module.per_sample_loss(batch).mean()
        finally:
            snapshot.restore()
        return float(perturbed - loss.detach())


def _curve(out: Path, monitor: str) -> list[list[float]]:
    # the newest CSV logger version: an interrupted earlier attempt may have left an older one
    newest = max(out.glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1]))
    points = []
    with open(newest / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get(monitor):
                points.append([int(row["step"]), float(row[monitor]), float(row.get("val/majority_share") or "nan")])
    return sorted(points)


def run(
    task: str,
    setting: str,
    method: Method,
    seed: int,
    out: Path,
    lr: Optional[float | str] = None,
    optim: tuple[tuple[str, float], ...] = (),
) -> dict:
    """Fine-tune once and return the row."""
    from train import train

    args = overrides(task, setting, method, seed, lr, optim)
    if _platform["name"] == "gpu":
        torch.set_float32_matmul_precision("high")  # as train.py's command line sets it
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
            "+callbacks.final_flatness._target_=benchmarks.lab.runs.FinalFlatness",
            "test_final=true",
        ],
        out,
    )
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # an interrupted attempt's: no stale file beside ours
    start = time.perf_counter()
    metrics = train(cfg)
    elapsed = time.perf_counter() - start
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    share = metrics.get("val/majority_share")
    return {
        "key": key(task, setting, method, seed, lr, optim),
        "overrides": args,
        "method_config": resolved_method(method.overrides()),
        **PROVENANCE,
        "task": task,
        "setting": setting,
        "method": method.label,
        "seed": seed,
        "metrics": metrics,
        "curve": _curve(out, cfg.task.monitor),
        "stalled": bool(share is not None and share >= STALL_SHARE),
        "time_s": elapsed,
        "torch_threads": torch.get_num_threads(),
        "device": _device(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
