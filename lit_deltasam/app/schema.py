"""Structured configs: a misspelled key or a wrongly typed value fails with Hydra's own error.

The method schema is generated from :class:`~lit_deltasam.DeltaSAMConfig`, so its
defaults stay in one place.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Union, cast

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from ..config import DeltaSAMConfig


def _method_schema() -> type:
    hints = typing.get_type_hints(DeltaSAMConfig)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default="lit_deltasam.DeltaSAMConfig"))]
    fields += [(f.name, hints[f.name], field(default=f.default)) for f in dataclasses.fields(DeltaSAMConfig)]
    return dataclasses.make_dataclass("MethodSchema", fields)


MethodSchema = _method_schema()


@dataclass
class TaskSchema:
    name: str = "mr"
    data_dir: Optional[str] = None
    monitor: Optional[str] = "val/acc"  # null: the task's first validation metric
    mode: str = "max"
    # task=files (file paths) and task=hub (split names) only
    train: Optional[str] = None
    validation: Optional[str] = None
    test: Optional[str] = None
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    kind: Optional[str] = None
    # task=hub only
    dataset: Optional[str] = None
    config: Optional[str] = None


def _overrides(schema: type) -> type:
    """``schema`` with every field unset: the values given on the command line replace a saved config's."""
    hints = typing.get_type_hints(schema)
    fields = [(f.name, Optional[hints[f.name]], field(default=None)) for f in dataclasses.fields(schema)]
    return dataclasses.make_dataclass(f"{schema.__name__}Overrides", fields)


TaskOverrides = _overrides(TaskSchema)


def task_config(*sources: Any) -> DictConfig:
    """A task config: :class:`TaskSchema` with ``sources`` (mappings or configs, e.g. a checkpoint's saved task and
    command-line overrides) merged over it in order, each key checked against the schema."""
    merged = OmegaConf.merge(OmegaConf.structured(TaskSchema), *sources)
    if not isinstance(merged, DictConfig):  # merging mappings into a structured config always gives one
        raise TypeError(f"a task config must be a mapping, got {type(merged).__name__}")
    return merged


def to_dict(node: DictConfig, resolve: bool = False) -> dict[str, Any]:
    """``node`` as plain Python containers (``OmegaConf.to_container``), typed as the dict it is."""
    plain = OmegaConf.to_container(node, resolve=resolve)
    if not isinstance(plain, dict):  # only a ListConfig would give a list
        raise TypeError(f"expected a mapping config, got {type(plain).__name__}")
    return cast("dict[str, Any]", plain)  # OmegaConf types the keys broadly; a config's keys are names


@dataclass
class DataSchema:
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 48
    train_limit: Optional[int] = None
    label_noise: float = 0.0
    num_workers: int = 0


@dataclass
class OptimSchema:
    lr: float = 2e-4
    weight_decay: float = 0.1
    warmup_ratio: float = 0.1
    head_lr_mult: float = 1.0
    layer_decay: float = 1.0


@dataclass
class LrFindSchema:
    """Lightning's LR range test (``Tuner.lr_find``) for ``tune_lr=true``."""

    min_lr: float = 1e-7
    max_lr: float = 1e-2
    num_training: int = 100
    mode: str = "exponential"
    early_stop_threshold: Optional[float] = 4.0
    rule: str = "minimum"


@dataclass
class PathsSchema:
    cache_dir: str = "~/.cache/lit_deltasam"
    output_dir: str = "."


@dataclass
class TrainSchema:
    seed: int = 0
    run_name: str = "run"
    tags: List[str] = field(default_factory=list)
    data: DataSchema = field(default_factory=DataSchema)
    optim: OptimSchema = field(default_factory=OptimSchema)
    tune_lr: bool = False
    lr_find: LrFindSchema = field(default_factory=LrFindSchema)
    test: bool = True
    test_final: bool = False
    keep_checkpoints: bool = True
    ckpt_path: Optional[str] = None
    optimized_metric: Optional[str] = None
    task: TaskSchema = field(default_factory=TaskSchema)
    method: Any = field(default_factory=MethodSchema)
    paths: PathsSchema = field(default_factory=PathsSchema)
    model: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    experiment: Any = None
    hparams_search: Any = None
    debug: Any = None


TYPED_GROUPS: dict[str, type] = {
    "method": MethodSchema,
    "task": TaskSchema,
    "data": DataSchema,
    "optim": OptimSchema,
    "lr_find": LrFindSchema,
    "paths": PathsSchema,
}
"""The groups of train.py whose keys are fixed; a misspelled override of one is refused naming the valid keys."""


@dataclass
class EvalSchema:
    ckpt_path: str = MISSING
    # typed, not Any, so that task=null is refused; mypy takes TaskOverrides (from make_dataclass) for a variable
    task: TaskOverrides = field(default_factory=TaskOverrides)  # type: ignore[valid-type]  # a class made at import
    batch_size: int = 128
    max_length: Optional[int] = None
    paths: PathsSchema = field(default_factory=PathsSchema)
    trainer: Any = None


@dataclass
class PredictSchema:
    ckpt_path: str = MISSING
    input: str = MISSING
    output: str = "${paths.output_dir}/predictions.csv"
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    batch_size: int = 128
    max_length: Optional[int] = None
    paths: PathsSchema = field(default_factory=PathsSchema)
    trainer: Any = None


@dataclass
class LandscapeSchema:
    ckpt_paths: List[str] = MISSING
    labels: Optional[List[str]] = None
    dims: int = 1
    points: int = 21
    span: float = 1.0
    split: str = "validation"
    samples: int = 512
    seed: int = 0
    batch_size: int = 128
    hessian_k: int = 3
    hessian_batch: int = 32
    hessian_iters: int = 20
    output_dir: str = "."
    paths: PathsSchema = field(default_factory=PathsSchema)


def register() -> None:
    """Make the schemas available to the defaults lists of ``conf/train.yaml``, ``eval.yaml``, ``predict.yaml``
    and ``landscape.yaml``."""
    store = ConfigStore.instance()
    store.store(name="schema", node=TrainSchema)
    store.store(name="eval_schema", node=EvalSchema)
    store.store(name="predict_schema", node=PredictSchema)
    store.store(name="landscape_schema", node=LandscapeSchema)


def compose(
    config_dir: Union[str, Path], overrides: Sequence[str], output_dir: Union[str, Path], config_name: str = "train"
) -> DictConfig:
    """The config ``python train.py <overrides>`` would run, writing under ``output_dir``, without ``@hydra.main``.

    ``config_name`` ``"eval"``, ``"predict"`` or ``"landscape"`` composes the config of that script instead.

    For tests and benchmarks that call ``train(cfg)`` in-process: the ``${hydra:...}``
    interpolations resolve against a Hydra config set up as the CLI would.
    """
    register()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with initialize_config_dir(str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg
