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

import argparse
import csv
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from common import RESULTS, ROOT, compose_config
from omegaconf import OmegaConf

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
    # the held-out many-class tasks (benchmarks/heldout.py writes their files), as a user's own CSVs
    **{
        f"{task}2k3ep": {
            **{
                f"task.{split}": f"${{paths.cache_dir}}/heldout/{task}/{split}.csv"
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


def _code_commit() -> str:
    """The commit whose code this process runs (``LIT_DELTASAM_COMMIT`` where the tree has no git, as on a device)."""
    if os.environ.get("LIT_DELTASAM_COMMIT"):
        return os.environ["LIT_DELTASAM_COMMIT"]
    try:
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "lit_deltasam"], cwd=ROOT).returncode != 0
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "") if head.returncode == 0 else "unknown"


CODE_COMMIT = _code_commit()
"""The commit whose code this process runs: read once at start, as later commits do not reach a running study."""
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
    if config.method == "asam":
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


def load(path: Optional[Path] = None) -> list[dict]:
    path = path or store()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rows_by_key(path: Optional[Path] = None) -> dict[str, dict]:
    """Rows keyed as :func:`key` does: each ``optim.*`` field a row leaves out at :data:`LEGACY_OPTIM`, never at
    the current default. A row made before rows recorded their method config is resolved with the current
    defaults (it must then be migrated before a default changes: :func:`migrate`)."""
    out = {}
    for row in load(path):
        method_config = row.get("method_config")
        if method_config is None:
            method_config = resolved_method([o for o in row["overrides"] if o.startswith("method")])
        data = explicit([o for o in row["overrides"] if not o.startswith("method")])
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
            "+callbacks.final_flatness._target_=runs.FinalFlatness",
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
        "key": key(task, setting, method, seed, lr, optim),
        "overrides": args,
        "method_config": resolved_method(method.overrides()),
        "commit": CODE_COMMIT,
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


def slug(unit: tuple) -> str:
    """The run folder's name of ``unit``."""
    task, setting, method, seed, *rest = unit
    out = f"{task}-{setting}-{method.label.replace(' ', '_').replace('=', '')}-s{seed}"
    if rest and rest[0] is not None:
        lr = rest[0]
        out += f"-lr{lr:g}" if not is_tuned(lr) else "-" + str(lr).replace(TUNE, "tune_lr", 1)
    return out + "".join(f"-{f}{v:g}" for f, v in (rest[1] if len(rest) > 1 else ()))


def _run_unit(unit: tuple, name: str) -> dict:
    task, setting, method, seed, *rest = unit
    return run(task, setting, method, seed, ROOT / "outputs" / "benchmarks" / name / slug(unit), *rest)


def _start_worker(platform: str, threads: int) -> None:
    use_platform(platform)
    torch.set_num_threads(threads)


def schedule(
    plan: Callable[[dict[str, dict]], list[tuple]],
    name: str,
    jobs: int = 1,
    deadline: Optional[float] = None,
    on_row: Optional[Callable[[dict[str, dict]], None]] = None,
) -> dict[str, dict]:
    """Run every unit ``(task, setting, method, seed[, lr[, optim]])`` of ``plan(rows)`` whose row is missing, in its
    order, appending each row to :func:`store` as it finishes; returns the rows by key.

    ``plan`` is asked again after every row, so that a phase chosen from earlier rows starts as soon as they are in.
    ``jobs`` > 1 runs that many worker processes (each with ``torch_threads = cores // jobs``); ``deadline``: seconds
    after which no new run starts. A run that raises is reported and not retried in this call; the call then exits
    non-zero once the others are done."""
    path = store()
    rows = rows_by_key(path)
    began = time.monotonic()
    failed: dict[str, str] = {}
    running: dict[Future, tuple[str, tuple]] = {}

    def wanted() -> list[tuple[str, tuple]]:
        out: dict[str, tuple] = {}
        for unit in plan(rows):
            k = key(*unit)
            if k not in rows and k not in failed and k not in out and all(k != r[0] for r in running.values()):
                out[k] = unit
        return list(out.items())

    def finished(k: str, unit: tuple, row: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows[k] = row
        metric = "pearson" if "val/pearson" in row["metrics"] else "acc"  # a regression task's, or accuracy
        print(
            f"[{name}] {slug(unit)}: val {row['metrics'].get(f'val/{metric}', float('nan')):.4f} "
            f"test {row['metrics'].get(f'test/{metric}', float('nan')):.4f} ({row['time_s']:.0f} s, "
            f"{time.monotonic() - began:.0f} s in)",
            flush=True,
        )
        if on_row is not None:
            on_row(rows)

    def late() -> bool:
        return deadline is not None and time.monotonic() - began > deadline

    if jobs <= 1:
        while not late() and (todo := wanted()):
            k, unit = todo[0]
            try:
                row = _run_unit(unit, name)
            except Exception:
                failed[k] = traceback.format_exc()
                print(f"[{name}] {slug(unit)} failed:\n{failed[k]}", flush=True)
                continue
            finished(k, unit, row)
    else:
        threads = max(1, (os.cpu_count() or jobs) // jobs)
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(jobs, context, _start_worker, (_platform["name"], threads)) as pool:
            while True:
                if not late():
                    for k, unit in wanted()[: jobs - len(running)]:
                        running[pool.submit(_run_unit, unit, name)] = (k, unit)
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    k, unit = running.pop(future)
                    try:
                        finished(k, unit, future.result())
                    except Exception:
                        failed[k] = traceback.format_exc()
                        print(f"[{name}] {slug(unit)} failed:\n{failed[k]}", flush=True)
    if late():
        print(f"[{name}] deadline of {deadline:.0f} s reached; {len(wanted())} runs left for a rerun", flush=True)
    if failed:
        raise SystemExit(f"[{name}] {len(failed)} runs failed; their tracebacks are above")
    return rows


def phased(*studies: Sequence[Callable[[dict[str, dict]], list[tuple]]]) -> Callable[[dict[str, dict]], list[tuple]]:
    """A :func:`schedule` plan of the studies' phases: every study's first phase before any study's second."""
    depth = max(len(phases) for phases in studies)
    return lambda rows: [u for i in range(depth) for phases in studies if i < len(phases) for u in phases[i](rows)]


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """``--platform``, ``--store``, ``--jobs`` and ``--deadline``: where and how a study's runs run."""
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="cpu", help="where the runs run (keyed apart)")
    parser.add_argument("--store", type=Path, help="the rows' JSONL file (default: the platform's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--deadline", type=float, help="seconds after which no new run starts")


def report_name(name: str, platform: str) -> str:
    """The results JSON of a study's tables on ``platform`` (``name`` on the CPU, ``name_<platform>`` elsewhere)."""
    return name if platform == "cpu" else f"{name}_{platform}"


def run_all(units: Iterable[tuple], name: str) -> dict[str, dict]:
    """Run every unit whose row is missing, one at a time (:func:`schedule`)."""
    units = list(units)
    return schedule(lambda _: units, name)


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description="try a platform: a few batches of each kind of run, in parallel")
    parser.add_argument("--smoke", action="store_true", required=True)
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="cpu")
    parser.add_argument("--store", type=Path, required=True, help="where the smoke rows go")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    methods = [Method("erm"), Method("sam", 0.05, "follow_lr"), Method("per_instance", 0.01, "follow_lr")]
    units = [("mr", "smoke", m, 1) for m in methods] + [("tweets", "smoke", Method("erm"), 1, f"{TUNE}:minimum")]
    units += [("r8", "smoke", Method("erm"), 1, 1e-4, (("head_lr_mult", 10.0), ("layer_decay", 0.8)))]
    rows = schedule(lambda _: units, "smoke", jobs=args.jobs)
    print(json.dumps({slug(u): rows[key(*u)]["metrics"].get("val/acc") for u in units}))


if __name__ == "__main__":
    main()
