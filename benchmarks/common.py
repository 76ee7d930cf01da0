"""Shared by the benchmarks: compose the app's config, and describe the machine a result came from."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

sys.path.insert(0, str(ROOT))
from lit_deltasam.app import schema  # noqa: E402


def compose_config(overrides: list[str], output_dir: Path) -> DictConfig:
    """The config ``python train.py <overrides>`` would run, writing under ``output_dir``."""
    return schema.compose(ROOT / "conf", overrides, output_dir)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def bootstrap(values: list[float], n: int = 5000, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean of ``values``."""
    rng = random.Random(seed)
    draws = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The Student-t interval of the mean of ``values`` (df = n − 1), the one for a handful of paired seeds."""
    from scipy import stats

    n = len(values)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / n**0.5
    m = statistics.mean(values)
    return m - half, m + half


def paired(d: list[float]) -> dict[str, Any]:
    """Paired differences by seed: mean, Student-t 95% interval, the two-sided one-sample t-test's p (df = n − 1),
    and wins, ties and losses (a tie is a difference of exactly 0: the same test predictions scored right)."""
    from scipy import stats

    p = float(stats.ttest_1samp(d, 0.0).pvalue) if statistics.stdev(d) > 0 else float(statistics.mean(d) == 0)
    return {
        "mean": statistics.mean(d),
        "ci": list(t_interval(d)),
        "n": len(d),
        "wins": sum(x > 0 for x in d),
        "ties": sum(x == 0 for x in d),
        "losses": sum(x < 0 for x in d),
        "p": p,
    }


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values of a family of tests, in the order given: a test is rejected at level α by
    Holm's procedure exactly when its adjusted p is ≤ α."""
    order = sorted(range(len(ps)), key=ps.__getitem__)
    adjusted, running = [1.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± std`` of ``values`` times ``scale`` (one value alone; ``–`` for none)."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file; none if it does not exist yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
