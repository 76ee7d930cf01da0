"""Small models with closed-form gradients, and a tiny LightningModule using the mixin."""

from __future__ import annotations

from typing import Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from lit_deltasam import DeltaSAMConfig, DeltaSAMMixin

EXACT_WEIGHTS = dict(weight_floor=0.0, weight_min=0.0, weight_max=float("inf"))
"""Weighting options that switch off the floor and the clip, so lambda ∝ s**beta exactly."""

METHODS = [
    dict(method="erm"),
    dict(method="sam"),
    dict(method="asam"),
    dict(method="deltasam", estimator="head"),
    dict(method="deltasam", estimator="probe"),
    dict(method="deltasam", estimator="exact"),
    dict(method="per_instance"),
]
"""One configuration of every method and estimator."""


class LeastSquares(nn.Module):
    """l_i(w) = (x_i·w - y_i)² / 2, whose per-instance gradients are (x_i·w - y_i) x_i."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.w

    def losses(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * (self(x) - y) ** 2


def least_squares_problem(n: int = 8, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    return x, y, w


def ls_grad(x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """Gradient of the mean least-squares loss at v."""
    return x.T @ (x @ v - y) / x.shape[0]


def ls_instance_grads(x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    return (x @ v - y)[:, None] * x


class MLP(nn.Module):
    def __init__(
        self, d_in: int = 6, hidden: int = 12, classes: int = 3, dropout: float = 0.0, batchnorm: bool = False
    ):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def losses(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="none")


def classification_data(n: int = 64, d: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


class TinyModule(DeltaSAMMixin, L.LightningModule):
    """A classifier with the mixin; optimizer and scheduler chosen per test."""

    def __init__(
        self,
        config: DeltaSAMConfig,
        lr: float = 0.1,
        optimizer: str = "sgd",
        scheduler: dict | None = None,
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.model = MLP(dropout=dropout, batchnorm=batchnorm)
        self.deltasam = config
        self.lr = lr
        self.optimizer_name = optimizer
        self.scheduler = scheduler

    def per_sample_loss(self, batch):
        return self.model.losses(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.model.losses(batch).mean())

    def configure_optimizers(self):
        params = self.parameters()
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr)
        if self.scheduler is None:
            return opt
        kind = self.scheduler.get("kind", "step")
        if kind == "plateau":
            mode = self.scheduler.get("mode", "max")
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, patience=0, factor=0.5)
        else:
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        conf = {k: v for k, v in self.scheduler.items() if k not in ("kind", "mode")}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, **conf}}


def loader(n: int = 64, batch_size: int = 8, seed: int = 0, shuffle: bool = False, world: int = 1, rank: int = 0):
    """A resumable loader; shuffled by (seed, epoch) like TextDataModule's, one rank's share of it."""
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

    x, y = classification_data(n, seed=seed)
    data = torch.utils.data.TensorDataset(x, y)
    sampler = StatefulDistributedSampler(data, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
    return StatefulDataLoader(data, batch_size=batch_size, sampler=sampler)


class TinyData(L.LightningDataModule):
    """``loader`` for the trainer's rank: the same sampler in one process or under DDP."""

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.kwargs = kwargs

    def train_dataloader(self):
        return loader(world=self.trainer.world_size, rank=self.trainer.global_rank, **self.kwargs)


class Recorder(Logger):
    """Records (metrics, step) of every log_metrics call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[dict, Optional[int]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((dict(metrics), step))


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def flat_params(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def ls_sam_update(x: Tensor, y: Tensor, w: Tensor, rho: float, method: str = "sam") -> Tensor:
    """G of one (micro-)batch of least squares in closed form.

    ``erm``: the gradient at w. ``sam``: the gradient at ``w + rho g / ||g||``. ``deltasam``: the
    exact-score δ-SAM step with beta = -1 and no floor or clip (lambda_i ∝ 1 / ||g_i||).
    ``per_instance``: ``mean_i g_i(w + rho g_i / ||g_i||)``.
    """
    if method == "erm":
        return ls_grad(x, y, w)
    g_i = ls_instance_grads(x, y, w)
    if method == "per_instance":
        moved = w + rho * g_i / g_i.norm(dim=1, keepdim=True)
        return torch.stack([(x[i] @ moved[i] - y[i]) * x[i] for i in range(x.shape[0])]).mean(0)
    if method == "sam":
        lam = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=x.dtype)
    elif method == "deltasam":
        lam = (1 / g_i.norm(dim=1)) / (1 / g_i.norm(dim=1)).sum()
    else:
        raise ValueError(method)
    direction = (lam[:, None] * g_i).sum(0)
    return ls_grad(x, y, w + rho * direction / direction.norm())


LS_CONFIGS = {
    "erm": dict(method="erm"),
    "sam": dict(method="sam"),
    "deltasam": dict(method="deltasam", estimator="exact", beta=-1.0, **EXACT_WEIGHTS),
    "per_instance": dict(method="per_instance"),
}
"""The DeltaSAMConfig options whose least-squares update ``ls_sam_update`` computes, by method."""


def probe_draws(params: list[Tensor], directions: int, sigma: float, seed: int) -> list[list[Tensor]]:
    """The Gaussian directions u_k, one tensor per parameter, that a Prober over ``params`` draws after
    ``torch.manual_seed(seed)``: one flat standard normal per direction over all (same-dtype) parameters in order,
    scaled by ``sigma / sqrt(numel)``."""
    sizes = [p.numel() for p in params]
    assert len({p.dtype for p in params}) == 1
    scale = sigma / sum(sizes) ** 0.5
    torch.manual_seed(seed)
    draws = []
    for _ in range(directions):
        flat = torch.empty(sum(sizes), dtype=params[0].dtype).normal_() * scale
        draws.append([v.view_as(p) for v, p in zip(flat.split(sizes), params)])
    return draws


class LeastSquaresModule(DeltaSAMMixin, L.LightningModule):
    """Least squares (``LeastSquares``) trained by plain SGD under the mixin."""

    def __init__(self, config: DeltaSAMConfig, w: Tensor, lr: float) -> None:
        super().__init__()
        self.model = LeastSquares(w)
        self.deltasam = config
        self.lr = lr

    def per_sample_loss(self, batch):
        return self.model.losses(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def wandb_history(path) -> tuple[list[dict], bool, dict]:
    """The history rows (``run.log`` calls) of an offline W&B run file as ``{key: value}`` dicts, whether the
    file holds the run's final ``exit`` record (the writer may lag behind ``wandb.finish()``), and the run summary.

    The ``.wandb`` file is a LevelDB-format log (``:W&B`` header, 32 KiB blocks of checksummed chunks) of
    ``wandb_internal_pb2.Record`` messages. wandb 0.31 no longer ships a Python reader (its
    ``wandb.sdk.internal.datastore.DataStore`` is gone), so this reads the format directly; a record still being
    written at the end of the file is left out.
    """
    import json
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, pos, chunks, rows, finished, summary = 32768, 7, [], [], False, {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's trailer: too short for a chunk header
            pos += left
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of a block
            pos += left
            continue
        body = data[pos + 7 : pos + 7 + length]
        if len(body) < length:  # still being written
            break
        assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == checksum, f"corrupt chunk at byte {pos} of {path}"
        pos += 7 + length
        chunks.append(body)
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            kind_of_record = record.WhichOneof("record_type")
            finished = finished or kind_of_record == "exit"
            if kind_of_record == "history":
                rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
            if kind_of_record == "summary":
                items = record.summary.update
                summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in items})
    return rows, finished, summary


def with_rho(options: dict, rho: float) -> dict:
    """``options`` with radius ``rho``, which ERM takes none of (DeltaSAMConfig refuses a rho for ERM)."""
    return dict(options) if options.get("method") == "erm" else {"rho": rho, **options}


def sam_step_by_hand(
    loss: Callable[[], Tensor], optimizer: torch.optim.Optimizer, rho: float, adaptive_eta: Optional[float] = None
) -> None:
    """One SAM (ASAM with ``adaptive_eta``) step written out: eps = rho T² g / ||T g|| (T = |w| + eta, or 1), the
    descent gradient at w + eps into ``.grad``, w restored, ``optimizer.step()``. ``loss()`` is the batch's mean loss
    (under whatever autocast the caller wants, entered per call)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        t = [p.abs() + adaptive_eta if adaptive_eta is not None else torch.ones_like(p) for p in params]
        norm = torch.cat([(ti * g).flatten() for ti, g in zip(t, grads)]).norm()
        eps = [rho * ti * ti * g / norm for ti, g in zip(t, grads)]
        torch._foreach_add_(params, eps)
    descent = torch.autograd.grad(loss(), params)
    with torch.no_grad():
        torch._foreach_sub_(params, eps)
    for p, g in zip(params, descent):
        p.grad = g
    optimizer.step()
