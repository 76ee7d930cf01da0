"""A LightningDataModule that serves any registered task as tokenized, dynamically padded batches."""

from __future__ import annotations

import os
import random
from functools import partial
from typing import Any, Protocol, cast

import lightning as L
import torch
from torch import Tensor
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
from transformers import PreTrainedTokenizerBase

from .tasks import Example, Splits, Task, get_task


def collate(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, label_dtype: torch.dtype
) -> dict[str, Tensor]:
    """Tokenize a list of examples, padded to the longest in the batch and truncated at ``max_length``.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them),
        each ``[n, length]``, and ``labels`` ``[n]`` of ``label_dtype`` when the examples have
        labels (texts to predict have none).
    """
    pairs = [example["text_pair"] for example in examples] if "text_pair" in examples[0] else None
    batch = tokenizer(
        [example["text"] for example in examples],
        text_pair=pairs,
        truncation=True,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    if "label" not in examples[0]:
        return dict(batch)
    return {**batch, "labels": torch.tensor([example["label"] for example in examples], dtype=label_dtype)}


def flip_labels(examples: list[Example], fraction: float, num_labels: int, rng: random.Random) -> list[Example]:
    """Copies of ``examples`` with ``round(fraction * n)`` labels, drawn by ``rng``, moved to another class."""
    flipped = set(rng.sample(range(len(examples)), round(fraction * len(examples))))
    out = []
    for i, example in enumerate(examples):
        if i in flipped:
            label = int(example["label"])
            example = {**example, "label": rng.choice([c for c in range(num_labels) if c != label])}
        out.append(example)
    return out


class DataHparams(Protocol):
    """The saved arguments of :class:`TextDataModule` (``hparams``), typed: ``task`` is the task's name."""

    task: str
    batch_size: int
    eval_batch_size: int
    max_length: int
    train_limit: int | None
    label_noise: float
    seed: int
    num_workers: int
    cache_dir: str | os.PathLike | None
    data_dir: str | os.PathLike | None


class TextDataModule(L.LightningDataModule):
    """Train, validation and test loaders for a task of :data:`~lit_deltasam.data.tasks.TASKS`, or your own.

    The loaders are ``StatefulDataLoader`` s and the train order comes from a seeded,
    stateful distributed sampler, so a run resumed mid-epoch sees exactly the remaining batches.

    Args:
        task: a task name, e.g. ``"mr"`` or ``"glue/sst2"``, or a :class:`~lit_deltasam.data.tasks.Task`
            such as :func:`~lit_deltasam.data.custom.files_task` builds.
        tokenizer: a Hugging Face tokenizer, called on each batch of texts.
        batch_size: train batch size.
        eval_batch_size: validation and test batch size.
        max_length: tokens per example (both texts of a pair together) after truncation.
        train_limit: if set, train on a seeded random subset of this many examples (for short CPU runs).
        label_noise: fraction of the training labels (classification) flipped, uniformly at
            random, to another class; validation and test stay clean.
        seed: seeds the train order, the ``train_limit`` subset and the label noise; the
            splits themselves are fixed.
        num_workers: dataloader worker processes.
        cache_dir: cache of the pinned archives; see :func:`~lit_deltasam.data.sources.cache_root`.
        data_dir: ``glue/*`` only: a ``DatasetDict.save_to_disk`` folder to read instead of the Hub.
    """

    def __init__(
        self,
        task: str | Task,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,
        eval_batch_size: int = 128,
        max_length: int = 64,
        train_limit: int | None = None,
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        data_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if train_limit is not None and train_limit < 1:
            raise ValueError(f"train_limit must be a positive number of examples or None, got {train_limit}")
        if not 0.0 <= label_noise < 1.0:
            raise ValueError(f"label_noise={label_noise!r} is not valid; it must be a fraction in [0, 1)")
        self.save_hyperparameters(ignore=["tokenizer", "task"])
        self.task: Task = task if isinstance(task, Task) else get_task(task)
        self.hparams["task"] = self.task.name  # a name, not the examples a custom task holds
        if label_noise and self.task.kind != "classification":
            raise ValueError(
                f"label_noise={label_noise} flips class labels; task {self.task.name!r} is {self.task.kind}"
            )
        self.tokenizer = tokenizer
        self.splits: Splits | None = None

    @property
    def _hp(self) -> DataHparams:
        """``hparams``, typed (Lightning types it as any mapping)."""
        return cast(DataHparams, self.hparams)

    @property
    def num_labels(self) -> int:
        """Output size of a model for the task (1 for regression)."""
        return self.task.num_labels

    def prepare_data(self) -> None:
        """Download and verify the data once (Lightning calls this on one process per node)."""
        self.task.load(self._hp.cache_dir, self._hp.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits and draw the ``train_limit`` subset."""
        if self.splits is not None:
            return
        splits = self.task.load(self._hp.cache_dir, self._hp.data_dir)
        limit = self._hp.train_limit
        if limit is not None and limit < len(splits["train"]):
            splits["train"] = random.Random(self._hp.seed).sample(splits["train"], limit)
        if self._hp.label_noise:
            splits["train"] = flip_labels(
                splits["train"], self._hp.label_noise, self.num_labels, random.Random(self._hp.seed)
            )
        self.splits = splits

    def train_dataloader(self) -> StatefulDataLoader:
        """Shuffled by a sampler that Lightning keeps under DDP and that resumes mid-epoch exactly.

        The order is a function of (seed, epoch, rank), so a resumed run, single-process or
        distributed, sees exactly the batches the uninterrupted run would have.
        """
        train = self.split("train")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = StatefulDistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=self._hp.seed)
        return self.loader(train, self._hp.batch_size, sampler=sampler)

    def val_dataloader(self) -> StatefulDataLoader:
        return self.loader(self.split("validation"), self._hp.eval_batch_size)

    def test_dataloader(self) -> StatefulDataLoader:
        return self.loader(self.split("test"), self._hp.eval_batch_size)

    def split(self, name: str) -> list[Example]:
        """The examples of split ``name`` (``"train"``, ``"validation"`` or ``"test"``) after :meth:`setup`: the
        ``train_limit`` subset and the label noise applied to ``"train"``."""
        if self.splits is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return self.splits[name]

    def loader(self, examples: list[Example], batch_size: int, **kwargs: Any) -> StatefulDataLoader:
        """A loader of ``examples`` in order (unless a ``sampler`` in ``kwargs`` says otherwise), collated as this
        module's own loaders are: tokenized, truncated at ``max_length`` and padded per batch, with labels of the
        task's dtype. ``kwargs`` go to ``StatefulDataLoader``."""
        label_dtype = torch.float32 if self.task.kind == "regression" else torch.long
        return StatefulDataLoader(
            examples,
            batch_size=batch_size,
            collate_fn=partial(
                collate, tokenizer=self.tokenizer, max_length=self._hp.max_length, label_dtype=label_dtype
            ),
            num_workers=self._hp.num_workers,
            persistent_workers=self._hp.num_workers > 0,
            **kwargs,
        )
