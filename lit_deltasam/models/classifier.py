"""A text classifier (or regressor) trained with :class:`~lit_deltasam.DeltaSAMMixin`."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from transformers import get_linear_schedule_with_warmup

from ..config import DeltaSAMConfig
from ..lightning.mixin import DeltaSAMMixin


class TextClassifier(DeltaSAMMixin, L.LightningModule):
    """An encoder from :mod:`lit_deltasam.models.encoders` with a per-instance loss.

    Cross-entropy for classification, squared error for regression (``num_labels == 1``).
    AdamW with weight decay off for biases and norms, and a linear warmup-then-decay
    schedule over the run's optimizer steps.

    Args:
        encoder: maps ``input_ids``, ``attention_mask``, ``token_type_ids`` to logits.
        deltasam: the sharpness-aware method.
        num_labels: classes, or 1 for regression.
        metrics: validation and test metrics, fed with predictions and labels.
        lr, weight_decay, warmup_ratio: the optimizer and its schedule.
    """

    def __init__(
        self,
        encoder: nn.Module,
        deltasam: DeltaSAMConfig,
        num_labels: int,
        metrics: Optional[MetricCollection] = None,
        lr: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "deltasam", "metrics"])
        self.encoder = encoder
        self.deltasam = deltasam
        self.regression = num_labels == 1
        metrics = metrics if metrics is not None else MetricCollection({})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.encoder(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def _losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.regression:
            return (logits.squeeze(-1).float() - labels.float()) ** 2
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def per_sample_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self._losses(self(batch), batch["labels"])

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1).float() if self.regression else logits.argmax(-1)

    def _evaluate(self, batch: dict[str, Tensor], stage: str, metrics: MetricCollection) -> None:
        logits = self(batch)
        loss = self._losses(logits, batch["labels"]).mean()
        metrics.update(self.predictions(logits), batch["labels"])
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True, batch_size=batch["labels"].shape[0])

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), sync_dist=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.predictions(self(batch))

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        hp = self.hparams
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # A fused optimizer unscales inside its step, which leaves no point at which to clip G under fp16.
        fused = self.device.type in ("cpu", "cuda") and getattr(self.trainer.precision_plugin, "scaler", None) is None
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, fused=fused)
        total = optimizer_steps(self.trainer, self._deltasam_config().accumulate_grad_batches)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def optimizer_steps(trainer: L.Trainer, accumulate: int) -> int:
    """Optimizer steps in the run: accumulation windows per epoch (the last may be partial) × epochs, to max_steps."""
    _ = trainer.estimated_stepping_batches  # loads the train dataloader, which sets num_training_batches
    per_epoch = math.ceil(trainer.num_training_batches / accumulate)
    total = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
    if trainer.max_steps and trainer.max_steps > 0:
        total = min(total, trainer.max_steps)
    if math.isinf(total):
        raise ValueError("the LR schedule needs a finite run: set trainer.max_epochs or trainer.max_steps")
    return max(1, int(total))
