"""A text classifier (or regressor) trained with :class:`~lit_deltasam.DeltaSAMMixin`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from transformers import get_linear_schedule_with_warmup

from ..config import DeltaSAMConfig
from ..core.schedule import warmup_steps
from ..lightning.mixin import DeltaSAMMixin
from ..lightning.schedulers import optimizer_steps


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
        label_names: the class names in label-index order (empty for regression); saved with
            the hyperparameters, so a checkpoint's predictions can be read as names.
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
        label_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if label_names and len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label_names for num_labels={num_labels}: {list(label_names)}")
        self.save_hyperparameters(ignore=["encoder", "deltasam", "metrics"])
        self.encoder = encoder
        self.deltasam = deltasam
        self.regression = num_labels == 1
        metrics = metrics if metrics is not None else MetricCollection({})
        self.warmup_steps = 0
        self.warned_stall = False
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
        computed = self.val_metrics.compute()
        self.log_dict(computed, sync_dist=True)
        self.val_metrics.reset()
        share = computed.get("val/majority_share")
        if share is not None and not self.trainer.sanity_checking:
            self._warn_if_stalled(float(share))

    def _warn_if_stalled(self, share: float) -> None:
        """Warn once (on rank 0) when, past every warm-up, validation predictions are all one class."""
        if share < 1.0 or self.global_step < self.warmup_steps or self.warned_stall:
            return
        self.warned_stall = True
        if self.global_rank != 0:
            return
        cfg = self._deltasam_config()
        method = f"method={cfg.method!r}" + (
            f", rho={cfg.rho}, rho_schedule={cfg.rho_schedule!r}" if cfg.perturbs else ""
        )
        if cfg.perturbs:
            schedules = [s for s in ("follow_lr", "warmup") if s != cfg.rho_schedule]
            advice = f"try a smaller rho (now {cfg.rho}), rho_schedule={schedules[0]!r}, more steps or another LR"
        else:
            advice = "try more steps or another learning rate"
        warnings.warn(
            f"every validation prediction is one class at global_step={self.global_step} ({method}): the model "
            "predicts a single class for every input. Sharpness-aware steps can hold it there on small or noisy "
            f"data; {advice}",
            RuntimeWarning,
            stacklevel=2,
        )

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute(), sync_dist=True)
        self.test_metrics.reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """``prediction`` ``[n]`` (the class index, or the value for regression) and, for classification,
        ``probabilities`` ``[n, num_labels]``."""
        logits = self(batch)
        if self.regression:
            return {"prediction": self.predictions(logits)}
        return {"prediction": self.predictions(logits), "probabilities": logits.float().softmax(-1)}

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
        cfg = self._deltasam_config()
        total = optimizer_steps(self.trainer, cfg.accumulate_grad_batches)
        lr_warmup = int(hp.warmup_ratio * total)
        rho_warmup = warmup_steps(cfg, total) if cfg.rho_schedule in ("warmup", "start_step") else 0
        self.warmup_steps = max(lr_warmup, rho_warmup)  # the stall warning waits for both
        scheduler = get_linear_schedule_with_warmup(optimizer, lr_warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
