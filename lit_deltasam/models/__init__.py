"""Encoders for NLU tasks and the LightningModule that trains them with δ-SAM."""

from .builders import MiniLM, Pretrained, Small, fit_wordpiece
from .classifier import TextClassifier
from .encoders import HFClassifier, SmallEncoder

__all__ = ["HFClassifier", "MiniLM", "Pretrained", "Small", "SmallEncoder", "TextClassifier", "fit_wordpiece"]
