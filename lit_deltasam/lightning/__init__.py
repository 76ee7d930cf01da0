"""The Lightning layer: the mixin and the sharpness-probe callback."""

from .callbacks import SharpnessProbe
from .mixin import DeltaSAMMixin
from .schedulers import optimizer_steps

__all__ = ["DeltaSAMMixin", "SharpnessProbe", "optimizer_steps"]
