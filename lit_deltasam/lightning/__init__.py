"""The Lightning layer: the mixin and the sharpness-probe callback."""

from .mixin import DeltaSAMMixin

__all__ = ["DeltaSAMMixin"]
