"""From a composed Hydra config to the objects of a run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig

from ..data import TextDataModule, build_metrics, get_task
from ..models import TextClassifier


def build(cfg: DictConfig) -> tuple[TextDataModule, TextClassifier]:
    """The datamodule and the module for ``cfg``: task, tokenizer, encoder and method."""
    task = get_task(cfg.task.name)
    cache_dir, data_dir = cfg.paths.cache_dir, cfg.task.data_dir
    spec = instantiate(cfg.model)

    def train_texts() -> Iterator[str]:
        for example in task.load(cache_dir, data_dir)["train"]:
            yield from (example[field] for field in task.text_fields)

    tokenizer = spec.tokenizer(train_texts)
    datamodule = TextDataModule(
        cfg.task.name, tokenizer, seed=cfg.seed, cache_dir=cache_dir, data_dir=data_dir, **cfg.data
    )
    module = TextClassifier(
        spec.build(task.num_labels, tokenizer),
        instantiate(cfg.method),
        task.num_labels,
        build_metrics(task),
        **cfg.optim,
    )
    return datamodule, module


def instantiate_all(group: Any) -> list[Any]:
    """Instantiate every entry of a group of named configs (callbacks, loggers)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def callbacks(cfg: DictConfig, with_logger: bool) -> list[Callback]:
    """The configured callbacks; the learning-rate monitor only when there is a logger to write to."""
    return [cb for cb in instantiate_all(cfg.callbacks) if with_logger or not isinstance(cb, LearningRateMonitor)]
