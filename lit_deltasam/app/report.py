"""What a run reports: a sharpness summary, the final table, and comparison tables across runs."""

from __future__ import annotations

import io
import json
import logging
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

SUMMARIZED = ("sam/sharpness", "sam/ess", "sam/max_weight", "sam/grad_norm")
ERM_MEANINGLESS = ("sam/update_norm",)
"""Logged for every method, but named and read as the sharpness-aware step's: left out of an ERM run's table."""
FILE_LOG = logging.getLogger("lit_deltasam.report")
"""Writes to the log file of the run only (:func:`~lit_deltasam.app.console.log_to_file`): the screen has the
table already."""
FILE_LOG.propagate = False


class SharpnessSummary(Callback):
    """Running means, over the perturbed training batches (micro-batches), of the per-step sharpness diagnostics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        rho, full = trainer.callback_metrics.get("sam/rho"), trainer.callback_metrics.get("sam/full_step")
        if (rho is not None and float(rho) == 0.0) or (full is not None and float(full) == 0.0):
            return  # a plain step (ρ schedule, interval, LookSAM, the policy): the values there are the last full one's
        for key in SUMMARIZED:
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.sums[key] += float(value)
                self.counts[key] += 1

    def summary(self) -> dict[str, float]:
        return {f"{key}_mean": self.sums[key] / self.counts[key] for key in self.sums}


def cell(value: float) -> str:
    """A table cell: four decimals, or four significant digits where four decimals would hide the value
    (a learning rate of 6.25e-06) or overflow the column."""
    if value == 0 or not math.isfinite(value) or 1e-2 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.4g}"


def shown(metrics: dict[str, float], method: str) -> dict[str, float]:
    """The metrics of the final table: those that mean something for ``method``."""
    return {k: v for k, v in metrics.items() if not (method == "erm" and k in ERM_MEANINGLESS)}


def print_table(title: str, metrics: dict[str, float], console: Optional[Console] = None) -> None:
    """The final table, also written to the run's log file (``train.log``, ``eval.log``)."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(key, cell(metrics[key]))
    (console or Console()).print(table)
    buffer = io.StringIO()
    Console(file=buffer, width=100).print(table)
    FILE_LOG.info("%s", buffer.getvalue().rstrip())


def print_paths(paths: dict[str, Any]) -> None:
    """Each path whole on a line of its own under its label, never wrapped, to be copied into the next command;
    also written to the run's log file."""
    lines = [line for label, path in paths.items() if path for line in (f"{label}:", str(path))]
    print("\n".join(lines), flush=True)
    FILE_LOG.info("%s", "\n".join(lines))


def write_metrics(directory: str | Path, metrics: dict[str, float], config: dict[str, Any]) -> Path:
    """``metrics.json``: the metrics, the resolved config and the config-group choices of the run."""
    choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    path = Path(directory) / "metrics.json"
    path.write_text(json.dumps({"metrics": metrics, "config": config, "choices": choices}, indent=2, sort_keys=True))
    return path


def group_value(run: dict[str, Any], group_by: str) -> str:
    """The group of a run in a comparison: its choice in the config group ``group_by`` (``method``), or the value of
    the config key ``group_by`` (``optim.lr``)."""
    if group_by in run["choices"]:
        return str(run["choices"][group_by])
    node: Any = run["config"]
    for part in group_by.split("."):
        if not isinstance(node, dict) or part not in node:
            groups = sorted(k for k in run["choices"] if not k.startswith("hydra"))
            raise ValueError(
                f"group_by={group_by!r} is neither a config group ({', '.join(groups)}) nor a key of the runs' config"
            )
        node = node[part]
    return str(node)


def comparison_markdown(
    runs: list[dict[str, Any]], metrics: Optional[list[str]] = None, group_by: str = "method"
) -> str:
    """One row per group of runs (:func:`group_value`), mean ± std over the runs (seeds) in it.

    ``metrics`` defaults to every validation and test metric the runs report, and the fit time.
    """
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for run in runs:
        groups[group_value(run, group_by)].append(run["metrics"])
    if metrics is None:
        found = {key for run in runs for key in run["metrics"]}
        metrics = sorted(k for k in found if k.startswith(("val/", "test/")) and not k.endswith("loss"))
        metrics += ["sam/sharpness_mean", "time/fit_s"]
    header = f"| {group_by} | runs | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for name, values in groups.items():
        cells = []
        for metric in metrics:
            xs = [v[metric] for v in values if metric in v and not math.isnan(v[metric])]
            if not xs:
                cells.append("–")
            elif len(xs) == 1:
                cells.append(f"{xs[0]:.4f}")
            else:
                cells.append(f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}")
        lines.append(f"| {name} | {len(values)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chosen_on_validation(runs: list[dict[str, Any]], group_by: str) -> tuple[str, str, float]:
    """The group whose runs have the best mean of the runs' monitored validation metric (``task.monitor``, the
    final weights' value, in the direction ``task.mode``): ``(group, monitor, mean)``. Test metrics choose
    nothing."""
    monitors = {(run["config"]["task"]["monitor"], run["config"]["task"]["mode"]) for run in runs}
    if len(monitors) != 1:
        raise ValueError(f"the runs monitor different metrics ({sorted(monitors)}): nothing to choose between")
    ((monitor, mode),) = monitors
    groups: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        value = run["metrics"].get(monitor)
        if value is not None and not math.isnan(value):
            groups[group_value(run, group_by)].append(value)
    if not groups:
        raise ValueError(f"no run reports {monitor}: nothing to choose on")
    means = {group: statistics.mean(values) for group, values in groups.items()}
    pick = (max if mode == "max" else min)(means, key=means.__getitem__)
    return pick, monitor, means[pick]


class ComparisonTable(HydraCallback):
    """At the end of a multirun, collect every job's ``metrics.json`` into ``comparison.md`` in the sweep folder.

    With ``choose``, the table ends with the group chosen on validation (:func:`chosen_on_validation`) and the
    folders of its runs are printed.
    """

    def __init__(self, metrics: Optional[list[str]] = None, group_by: str = "method", choose: bool = False) -> None:
        self.metrics = list(metrics) if metrics is not None else None
        self.group_by = group_by
        self.choose = choose

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        found = sorted(sweep_dir.glob("*/metrics.json"))
        runs = [json.loads(p.read_text()) for p in found]
        if not runs:
            return
        table = comparison_markdown(runs, self.metrics, self.group_by)
        paths: dict[str, Any] = {"comparison table": sweep_dir / "comparison.md"}
        if self.choose:
            pick, monitor, mean = chosen_on_validation(runs, self.group_by)
            table += f"\nchosen on {monitor} (mean of its runs, {mean:.4f}): {self.group_by}={pick}\n"
            for path, run in zip(found, runs):
                if group_value(run, self.group_by) == pick:
                    paths[f"run with {self.group_by}={pick}"] = path.parent
        (sweep_dir / "comparison.md").write_text(table)
        print(table)  # as written: rich would read the markdown's brackets as markup and wrap its rows
        print_paths(paths)
