"""A text classifier (or regressor) trained with :class:`~lit_deltasam.DeltaSAMMixin`."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Optional, Protocol, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MetricCollection
from transformers import get_linear_schedule_with_warmup

from ..config import DeltaSAMConfig
from ..core.schedule import warmup_steps
from ..lightning.mixin import DeltaSAMMixin
from ..lightning.schedulers import optimizer_steps

log = logging.getLogger(__name__)
PLATEAU_STEPS = 100
PLATEAU_SHARE = 0.75
"""The plateau warning waits until both: later than a fine-tuning run that recovers predicts one class, while nearly
every run that stalls still does (docs/diagnostics.md, "The plateau warning"; tests/test_stall.py checks the runs)."""


class OptimHparams(Protocol):
    """The saved arguments of :class:`TextClassifier` (``hparams``) that its optimizer reads, typed."""

    lr: float
    weight_decay: float
    warmup_ratio: float
    head_lr_mult: float
    layer_decay: float


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
        head_lr_mult: the classifier head's LR (the encoder's last ``nn.Linear``, freshly initialised) is
            ``lr * head_lr_mult``.
        layer_decay: layer-wise LR decay: a parameter ``d`` layers below the top trains at ``lr * layer_decay**d``
            (embeddings at the bottom, each numbered layer, ``layer.<i>`` or ``layers.<i>``, one step up;
            the rest, head included, at the top); 1 for none.
        label_names: the class names in label-index order (empty for regression); saved with
            the hyperparameters, so a checkpoint's predictions can be read as names.
    """

    def __init__(
        self,
        encoder: nn.Module,
        deltasam: DeltaSAMConfig,
        num_labels: int,
        metrics: Optional[MetricCollection] = None,
        lr: float = 2e-4,
        weight_decay: float = 0.1,
        warmup_ratio: float = 0.1,
        label_names: Sequence[str] = (),
        head_lr_mult: float = 1.0,
        layer_decay: float = 1.0,
    ) -> None:
        super().__init__()
        check_optim(
            lr=lr,
            weight_decay=weight_decay,
            warmup_ratio=warmup_ratio,
            head_lr_mult=head_lr_mult,
            layer_decay=layer_decay,
        )
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

    def losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss of each example, ``[n]`` in float32: cross-entropy of ``logits`` ``[n, num_labels]`` against
        class indices, or for regression the squared error of ``logits`` ``[n, 1]`` against values."""
        if self.regression:
            return (logits.squeeze(-1).float() - labels.float()) ** 2
        return F.cross_entropy(logits.float(), labels, reduction="none")

    def per_sample_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.losses(self(batch), batch["labels"])

    def predictions(self, logits: Tensor) -> Tensor:
        return logits.squeeze(-1).float() if self.regression else logits.argmax(-1)

    def _evaluate(self, batch: dict[str, Tensor], stage: str, metrics: MetricCollection) -> None:
        logits = self(batch)
        loss = self.losses(logits, batch["labels"]).mean()
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
        """Warn once (on rank 0) when validation predictions are all one class later than a healthy run's are:
        past every warm-up, :data:`PLATEAU_STEPS` optimizer steps and :data:`PLATEAU_SHARE` of the run."""
        cfg = self._deltasam_config()
        total = optimizer_steps(self.trainer, cfg.accumulate_grad_batches)
        wait = max(self.warmup_steps, PLATEAU_STEPS, PLATEAU_SHARE * total)
        if share < 1.0 or self.global_step < wait or self.warned_stall:
            return
        self.warned_stall = True
        if self.global_rank != 0:
            return
        if cfg.perturbs:
            setting = f"method={cfg.method!r}, rho={cfg.rho}, rho_schedule={cfg.rho_schedule!r}"
            schedule = next(s for s in ("follow_lr", "warmup") if s != cfg.rho_schedule)
            cause = "the perturbation can hold it there on small or noisy data"
            advice = f"a smaller rho (now {cfg.rho}), rho_schedule={schedule!r}, more steps or another learning rate"
        else:
            setting = f"method={cfg.method!r}"
            cause = "too high or too low a learning rate, noisy labels or too few steps can hold it there"
            advice = "another learning rate or more steps"
        log.warning(
            f"every validation prediction is one class at step {self.global_step} of {total} ({setting}), later "
            f"than in runs that recover: {cause}; try {advice}"
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

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = cast(OptimHparams, self.hparams)  # Lightning types hparams as any mapping
        groups = param_groups(self, hp.lr, hp.weight_decay, hp.head_lr_mult, hp.layer_decay)
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


def check_optim(**values: float) -> None:
    """Refuse, by name, an optimizer setting outside its range."""
    ranges = {
        "lr": (lambda v: v > 0, "> 0"),
        "weight_decay": (lambda v: v >= 0, ">= 0"),
        "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "head_lr_mult": (lambda v: v > 0, "> 0"),
        "layer_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    }
    for name, value in values.items():
        ok, expected = ranges[name]
        if not ok(value):
            raise ValueError(f"optim.{name}={value}: must be {expected}")


def layer_depths(module: nn.Module) -> dict[str, Optional[int]]:
    """Each parameter's layer from the bottom: 0 for embeddings (an ``nn.Embedding``'s, or a name with
    ``embed``), ``i + 1`` for ``layer.<i>``/``layers.<i>``, ``None`` (the top) for the rest."""
    embedded = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    out: dict[str, Optional[int]] = {}
    for name, p in module.named_parameters():
        found = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
        out[name] = int(found.group(1)) + 1 if found else 0 if "embed" in name or id(p) in embedded else None
    return out


def param_groups(
    module: nn.Module, lr: float, weight_decay: float, head_lr_mult: float = 1.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW's parameter groups: weight decay on matrices only; each group's ``lr`` scaled by the head
    multiplier and the layer-wise decay (groups in order of their scale's first parameter, decayed first:
    with both at 1, the two groups of the unscaled recipe)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    head = {id(p) for p in linears[-1].parameters()} if linears else set()
    if head_lr_mult != 1.0 and not head:
        raise ValueError(f"optim.head_lr_mult={head_lr_mult}: the model has no nn.Linear head to apply it to")
    depths = layer_depths(module)
    top = max([d for d in depths.values() if d is not None], default=0) + 1
    if layer_decay != 1.0 and top == 1:
        raise ValueError(
            f"optim.layer_decay={layer_decay}: no parameter name has a numbered layer ('layer.<i>.' or "
            "'layers.<i>.'), so there are no layers to decay over"
        )
    buckets: dict[float, tuple[list, list]] = {}
    for name, p in named:
        depth = depths[name]
        scale = layer_decay ** (top - (top if depth is None else depth))
        scale *= head_lr_mult if id(p) in head else 1.0
        buckets.setdefault(scale, ([], []))[p.ndim < 2].append(p)
    groups = []
    for scale, (decay, no_decay) in buckets.items():
        groups += [{"params": decay, "weight_decay": weight_decay, "lr": lr * scale}]
        groups += [{"params": no_decay, "weight_decay": 0.0, "lr": lr * scale}]
    return [g for g in groups if g["params"]]
