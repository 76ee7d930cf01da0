"""From a composed Hydra config to the objects of a run."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from omegaconf import DictConfig

from ..config import DeltaSAMConfig
from ..data import Task, TextDataModule, build_metrics, files_task, get_task, hub_task
from ..models import TextClassifier

CUSTOM_TASKS = ("files", "hub")
_COLUMNS = ("text_column", "text_pair_column", "label_column", "kind")
_READ_BY = {  # task keys that only some tasks read
    **dict.fromkeys(("train", "validation", "test", *_COLUMNS), CUSTOM_TASKS),
    "dataset": ("hub",),
    "config": ("hub",),
}


def build_task(task: DictConfig) -> Task:
    """The task a ``task`` config names; ``task=files`` and ``task=hub`` read and check their data here."""
    for key, readers in _READ_BY.items():
        if task.get(key) is not None and task.name not in readers:
            raise ValueError(
                f"task.{key} is read by {' and '.join(f'task={r}' for r in readers)} only, not by task {task.name!r}"
            )
    if task.name not in CUSTOM_TASKS:
        return get_task(task.name)
    columns = {key: task[key] for key in _COLUMNS if task[key] is not None}
    if task.name == "files":
        if task.data_dir is not None:
            raise ValueError("task.data_dir is read by task=hub and glue/* tasks, not by task=files: use task.train")
        return files_task(task.train, task.validation, task.test, **columns)
    splits = {key: task[key] for key in ("train", "validation", "test") if task[key] is not None}
    return hub_task(task.dataset, task.config, data_dir=task.data_dir, **splits, **columns)


def task_data_dir(task: DictConfig) -> str | None:
    """The ``data_dir`` a datamodule passes to its task: a custom task has read its own already."""
    return None if task.name in CUSTOM_TASKS else task.data_dir


def method_config(method: DictConfig) -> DeltaSAMConfig:
    """The method ``cfg.method`` configures; a value it refuses raises its own error (a ``ValueError`` naming the
    value and the choices), not Hydra's wrapper of it."""
    try:
        return instantiate(method)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, TypeError)):
            raise error.__cause__ from None
        raise


def build(cfg: DictConfig) -> tuple[TextDataModule, TextClassifier]:
    """The datamodule and the module for ``cfg``: task, tokenizer, encoder and method.

    The task comes first, so that a custom task's bad data stops the run before anything is
    written; a null ``task.monitor`` becomes the task's first validation metric.
    """
    task = build_task(cfg.task)
    if cfg.task.monitor is None:
        cfg.task.monitor = f"val/{task.metric_names[0]}"
    cache_dir, data_dir = cfg.paths.cache_dir, task_data_dir(cfg.task)
    spec = instantiate(cfg.model)

    def train_texts() -> Iterator[str]:
        for example in task.load(cache_dir, data_dir)["train"]:
            yield from (str(example[field]) for field in task.text_fields)  # texts are str already

    tokenizer = spec.tokenizer(train_texts)
    datamodule = TextDataModule(task, tokenizer, seed=cfg.seed, cache_dir=cache_dir, data_dir=data_dir, **cfg.data)
    module = TextClassifier(
        spec.build(task.num_labels, tokenizer),
        method_config(cfg.method),
        task.num_labels,
        build_metrics(task),
        label_names=task.label_names,
        **cfg.optim,
    )
    return datamodule, module


def instantiate_all(group: Any) -> list[Any]:
    """Instantiate every entry of a group of named configs (callbacks, loggers)."""
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def callbacks(cfg: DictConfig, with_logger: bool) -> list[Callback]:
    """The configured callbacks; the learning-rate monitor only when there is a logger to write to."""
    return [cb for cb in instantiate_all(cfg.callbacks) if with_logger or not isinstance(cb, LearningRateMonitor)]
