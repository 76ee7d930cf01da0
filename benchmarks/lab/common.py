"""Shared by the benchmarks: compose the app's config, and describe the machine a result came from."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from lit_deltasam.app import schema

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


def _provenance() -> dict[str, Any]:
    """The code this process runs: ``commit`` (short hash; ``LIT_DELTASAM_COMMIT`` where the tree has no git, as on a
    device), ``dirty`` (whether the code differs from that commit: the package, the benchmarks, conf/ or train.py;
    ``None`` where unknown) and ``machine`` (the kind: the GPU's name, else ``cpu``)."""
    kind = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if os.environ.get("LIT_DELTASAM_COMMIT"):
        commit = os.environ["LIT_DELTASAM_COMMIT"]
        dirty = {"1": True, "0": False}.get(os.environ.get("LIT_DELTASAM_DIRTY", ""))
        return {"commit": commit, "dirty": dirty, "machine": kind}
    code = ["lit_deltasam", "benchmarks", "conf", "train.py"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *code], cwd=ROOT).returncode != 0
    except OSError:
        return {"commit": "unknown", "dirty": None, "machine": kind}
    if head.returncode != 0:
        return {"commit": "unknown", "dirty": None, "machine": kind}
    return {"commit": head.stdout.strip(), "dirty": changed, "machine": kind}


PROVENANCE = _provenance()
"""Read once at start: later commits do not reach a running study. Every row and every results JSON records it."""


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
        **PROVENANCE,
    }


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path


def load_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON Lines file; none if it does not exist yet."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
