"""Sharpness-aware minimization with dynamic reweighting (δ-SAM) for PyTorch and Lightning.

``DeltaSAMOptimizer`` (the training loop's rules around the double step), ``DeltaSAM``
(one micro-batch's double step) and ``DeltaSAMConfig`` are plain PyTorch; the Lightning
pieces are imported on first use, so a hand-written loop never imports Lightning.
"""

from importlib import import_module
from typing import Any

from .config import ConfigError, DeltaSAMConfig
from .core import DeltaSAM, StepResult, instance_weights
from .core.loop import DeltaSAMOptimizer
from .core.schedule import scheduled_rho

__all__ = [
    "ConfigError",
    "DeltaSAM",
    "DeltaSAMConfig",
    "DeltaSAMMixin",
    "DeltaSAMOptimizer",
    "SharpnessProbe",
    "StepResult",
    "instance_weights",
    "optimizer_steps",
    "scheduled_rho",
]
__version__ = "0.1.0"

_LIGHTNING = {
    "DeltaSAMMixin": "lit_deltasam.lightning.mixin",
    "SharpnessProbe": "lit_deltasam.lightning.callbacks",
    "optimizer_steps": "lit_deltasam.lightning.schedulers",
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        return getattr(import_module(_LIGHTNING[name]), name)
    raise AttributeError(f"module 'lit_deltasam' has no attribute {name!r}")
