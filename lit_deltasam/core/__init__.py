"""The functional core: plain PyTorch, no Lightning import."""

from .ascent import perturb
from .engine import DeltaSAM, StepResult
from .guardedness import HeadTap, Prober
from .norms import total_norm
from .per_instance import PerInstance
from .weighting import effective_sample_size, instance_weights

__all__ = [
    "DeltaSAM",
    "HeadTap",
    "PerInstance",
    "Prober",
    "StepResult",
    "effective_sample_size",
    "instance_weights",
    "perturb",
    "total_norm",
]
