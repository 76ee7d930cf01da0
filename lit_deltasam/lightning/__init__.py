"""The Lightning layer: the mixin and the sharpness-probe callback."""

from .callbacks import SharpnessProbe
from .mixin import DeltaSAMMixin

__all__ = ["DeltaSAMMixin", "SharpnessProbe"]
