"""Tasks from your own data: local files (CSV, TSV, JSON Lines, Parquet) or any Hugging Face dataset.

A custom task is read and checked when it is built, so a bad file fails before a run
writes anything. Every error names the file (or split), the column, the value or rows, and
the fix. Rows whose text is empty or whitespace are dropped with a warning that counts them.

Labels:

* ``kind="auto"`` makes a float label column a regression target and anything else
  (strings, integers, booleans, a ``ClassLabel``) classes.
* Class names are the distinct training labels in sorted order (numbers sorted as
  numbers), or a ``ClassLabel``'s own names in its order. Label index i is class
  ``label_names[i]``.
* Validation and test labels must be classes the training split has.

Splits: the training data is required. A missing validation or test split is a seeded
10% of it (stratified by class for classification, as the built-in tasks do), so with
training data alone the split is 80/10/10.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal

from .tasks import Example, PathLike, Splits, Task, _clean, _split

Kind = Literal["classification", "regression", "auto"]
KINDS = ("classification", "regression", "auto")
HELD_OUT = 0.1
FORMATS: dict[str, tuple[str, dict[str, Any]]] = {  # suffix: (datasets builder, its options)
    ".csv": ("csv", {"keep_default_na": False, "na_values": [""]}),  # "NA" or "None" is a text, not a gap
    ".tsv": ("csv", {"delimiter": "\t", "keep_default_na": False, "na_values": [""]}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {}),
}
"""File formats by suffix; ``.txt`` (one text per line, column ``text``) is for texts to predict."""
METRICS = {"classification": ("acc", "macro_f1"), "regression": ("pearson", "spearman")}
_SHOWN = 5  # rows listed in an error before "and N more"


def read_table(path: PathLike, option: str = "file") -> Any:
    """A local file as a ``datasets.Dataset``, read by the ``datasets`` builder for its suffix.

    Args:
        path: a ``.csv``, ``.tsv``, ``.jsonl``/``.json`` (JSON Lines), ``.parquet`` or ``.txt`` file.
        option: the setting that named the file, for error messages, e.g. ``"task.train"``.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: an unknown suffix, an empty file, or one ``datasets`` cannot parse.
    """
    import datasets

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{option}={str(path)!r}: no such file (a relative path is taken from the directory you run in)"
        )
    if path.suffix.lower() not in FORMATS:
        raise ValueError(
            f"{option}={str(path)!r}: cannot tell the format from the suffix {path.suffix!r}; "
            f"use one of {', '.join(FORMATS)}"
        )
    builder, options = FORMATS[path.suffix.lower()]
    if path.stat().st_size == 0 or (builder == "parquet" and _parquet_rows(path) == 0):
        raise ValueError(f"{path} ({option}) is empty: it needs at least one row of data")
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # a header and no rows, or blank lines
            header = ", only a header" if builder == "csv" else ""
            raise ValueError(f"{path} ({option}) has no rows of data{header}") from error
        raise ValueError(f"could not read {path} ({option}) as {builder}: {error}") from error
    except Exception as error:  # the builders wrap the parser's error (pandas, pyarrow) in their own
        raise ValueError(f"could not read {path} ({option}) as {builder}: {error.__cause__ or error}") from error
    if len(table) == 0:
        raise ValueError(f"{path} ({option}) has no rows of data")
    if "__index_level_0__" in table.column_names:  # pandas took the first field for an index: rows too long
        delimiter = options.get("delimiter", ",")
        raise ValueError(
            f"{path} ({option}): some rows have more fields than the header "
            f"({', '.join(c for c in table.column_names if c != '__index_level_0__')}), so they were misread; "
            f'quote each value that holds the delimiter {delimiter!r}, e.g. "great film{delimiter} loved it"'
        )
    return table


def require_columns(where: str, table: Any, columns: Mapping[str, str | None]) -> None:
    """Raise unless ``table`` has every column that ``{option: column}`` names (a None column is not needed)."""
    for option, column in columns.items():
        if column is not None and column not in table.column_names:
            raise ValueError(
                f"{where} has no column {column!r} ({option}); its columns are: {', '.join(table.column_names)}. "
                f"Set {option} to one of them"
            )


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def files_task(
    train: PathLike,
    validation: PathLike | None = None,
    test: PathLike | None = None,
    *,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    kind: Kind = "auto",
) -> Task:
    """A task read from local files (``task=files``); see the module docstring for labels and splits.

    Args:
        train, validation, test: paths of CSV, TSV, JSON Lines or Parquet files, told apart
            by their suffix. A missing validation or test file is a seeded 10% of train.
        text_column: the column holding the text.
        text_pair_column: the column holding the second text of a sentence pair, if any.
        label_column: the column holding the class or the regression target.
        kind: ``"classification"``, ``"regression"``, or ``"auto"``: floats are regression.

    Example:
        >>> task = files_task("reviews.csv", text_column="review", label_column="sentiment")  # doctest: +SKIP
        >>> task.label_names, {name: len(split) for name, split in task.load().items()}  # doctest: +SKIP
        (('negative', 'positive'), {'train': 800, 'validation': 100, 'test': 100})
    """
    paths = {"train": train, "validation": validation, "test": test}
    tables = {
        split: (str(Path(path).expanduser()), read_table(path, f"task.{split}"))
        for split, path in paths.items()
        if path is not None
    }
    return _build("files", tables, text_column, text_pair_column, label_column, kind)


def hub_task(
    dataset: str | None = None,
    config: str | None = None,
    *,
    data_dir: PathLike | None = None,
    train: str = "train",
    validation: str | None = None,
    test: str | None = None,
    text_column: str = "text",
    text_pair_column: str | None = None,
    label_column: str = "label",
    kind: Kind = "auto",
) -> Task:
    """A task from a Hugging Face dataset (``task=hub``): by hub id, or a folder written by ``save_to_disk``.

    Args:
        dataset: the hub id, e.g. ``"stanfordnlp/imdb"``; downloaded and cached by ``datasets``.
        config: the dataset's configuration (subset) name, if it has several.
        data_dir: a ``DatasetDict.save_to_disk`` folder to read instead of the hub.
        train, validation, test: split names. A missing validation or test split is a seeded 10% of train.
        text_column, text_pair_column, label_column, kind: as in :func:`files_task`.
    """
    import datasets

    if data_dir is not None:
        source = str(Path(data_dir).expanduser())
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.Dataset):
            data = {"train": data}
    elif dataset is not None:
        source = dataset if config is None else f"{dataset} ({config})"
        data = datasets.load_dataset(dataset, config)
    else:
        raise ValueError("task=hub needs task.dataset=<a hub id> or task.data_dir=<a folder written by save_to_disk>")
    tables = {}
    for split, name in {"train": train, "validation": validation, "test": test}.items():
        if name is None:
            continue
        if name not in data:
            raise ValueError(f"{source} has no split {name!r} (task.{split}); its splits are: {', '.join(data)}")
        tables[split] = (f"{source}, split {name!r}", data[name])
    return _build("hub", tables, text_column, text_pair_column, label_column, kind)


def _build(
    name: str,
    tables: Mapping[str, tuple[str, Any]],
    text_column: str,
    text_pair_column: str | None,
    label_column: str,
    kind: Kind,
) -> Task:
    """Check and convert ``{split: (where, table)}`` into a task whose loader returns copies of the splits."""
    if kind not in KINDS:
        raise ValueError(f"task.kind={kind!r} is not valid; choose one of {list(KINDS)}")
    columns = {"task.text_column": text_column, "task.text_pair_column": text_pair_column}
    columns["task.label_column"] = label_column
    for where, table in tables.values():
        if len(table) == 0:
            raise ValueError(f"{where} has no rows of data")
        require_columns(where, table, columns)
    train_where, train_table = tables["train"]
    feature = train_table.features[label_column]
    classes = _class_label_names(feature)
    if kind == "auto":
        kind = "regression" if classes is None and _is_float(feature) else "classification"

    texts = {split: row_texts(table, text_column, text_pair_column) for split, (_, table) in tables.items()}
    labels = {split: list(table[label_column]) for split, (_, table) in tables.items()}
    text_columns = repr(text_column) + (f" or {text_pair_column!r}" if text_pair_column else "")
    kept = _kept_rows(tables, texts, text_columns)
    if kind == "regression":
        label_names: tuple[str, ...] = ()
        targets = {split: _targets(tables[split][0], label_column, labels[split], kept[split]) for split in tables}
    else:
        label_names, targets = _class_targets(tables, label_column, labels, kept, classes)

    kept_texts = {split: [text for text in texts[split] if text is not None] for split in tables}  # rows of kept
    examples: dict[str, list[Example]] = {
        split: [{**text, "label": target} for text, target in zip(kept_texts[split], targets[split], strict=True)]
        for split in tables
    }
    splits = _held_out_splits(examples, tables, kind, train_where)
    fields = ("text", "text_pair") if text_pair_column is not None else ("text",)
    return Task(name, kind, label_names, METRICS[kind], partial(_copies, splits), fields)


def _kept_rows(
    tables: Mapping[str, tuple[str, Any]], texts: Mapping[str, list[dict[str, str] | None]], text_columns: str
) -> dict[str, list[int]]:
    """Each split's rows with a text; warn of the rows dropped, refuse a split left with none."""
    kept = {split: [i for i, text in enumerate(texts[split]) if text is not None] for split in tables}
    for split, (where, table) in tables.items():
        if not kept[split]:
            raise ValueError(
                f"{where}: every row has an empty text (column {text_columns}), nothing is left; fill in the texts"
            )
        dropped = len(table) - len(kept[split])
        if dropped:
            warnings.warn(
                f"{where}: dropped {dropped} of {len(table)} rows whose text (column {text_columns}) is empty or "
                "whitespace",
                UserWarning,
                stacklevel=4,  # the caller of files_task or hub_task
            )
    return kept


def _class_targets(
    tables: Mapping[str, tuple[str, Any]],
    label_column: str,
    labels: Mapping[str, list[Any]],
    kept: Mapping[str, list[int]],
    classes: list[str] | None,
) -> tuple[tuple[str, ...], dict[str, list[Any]]]:
    """The class names and each split's label indices; refuse a training split of one class, or another split's
    class that training never saw."""
    train_where = tables["train"][0]
    train_labels = _class_values(train_where, label_column, labels["train"], kept["train"], classes)
    present = sorted(set(train_labels), key=_class_order)
    if len(present) < 2:
        numeric = classes is None and all(isinstance(value, int | float) for value in present)
        raise ValueError(
            f"{train_where}, column {label_column!r}: every example has the label {_shown(present)}; a classifier "
            "needs at least two classes, so add examples of another class"
            + (" (or set task.kind=regression if the label is a numeric target)" if numeric else "")
        )
    label_names = tuple(classes) if classes is not None else tuple(str(value) for value in present)
    index = {value: i for i, value in enumerate(present)} if classes is None else {}
    targets = {}
    for split, (where, _) in tables.items():
        values = (
            train_labels
            if split == "train"
            else _class_values(where, label_column, labels[split], kept[split], classes)
        )
        _check_seen(where, label_column, values, kept[split], set(present), train_where, classes)
        targets[split] = [index[value] if classes is None else value for value in values]
    return label_names, targets


def _held_out_splits(
    examples: dict[str, list[Example]], tables: Mapping[str, tuple[str, Any]], kind: str, train_where: str
) -> Splits:
    """The given splits, with a seeded 10% of train for each missing validation or test split."""
    held_out = {split: HELD_OUT for split in ("validation", "test") if split not in tables}
    splits = _split(examples["train"], held_out, stratify=kind == "classification")
    splits.update({split: examples[split] for split in ("validation", "test") if split in tables})
    for split in held_out:
        if not splits[split]:
            raise ValueError(
                f"the {split} split is empty: {HELD_OUT:.0%} of the {len(examples['train'])} training examples of "
                f"{train_where}" + (" (per class)" if kind == "classification" else "") + " rounds to none; "
                f"add training examples or give a {split} file or split (task.{split}=...)"
            )
    return splits


def _copies(splits: Splits, cache_dir: PathLike | None = None) -> Splits:
    """Fresh lists of the same examples: callers may replace a split (``train_limit``) without touching the task's."""
    return {split: list(examples) for split, examples in splits.items()}


def row_texts(table: Any, text_column: str, text_pair_column: str | None) -> list[dict[str, str] | None]:
    """Each row's cleaned text (and pair), or None when one of them is empty or missing."""
    columns = [table[text_column]] + ([table[text_pair_column]] if text_pair_column is not None else [])
    keys = ("text", "text_pair")
    out: list[dict[str, str] | None] = []
    for row in zip(*columns, strict=True):
        cleaned = [_clean(str(value)) if value is not None else "" for value in row]
        out.append(dict(zip(keys, cleaned, strict=False)) if all(cleaned) else None)
    return out


def _class_label_names(feature: Any) -> list[str] | None:
    import datasets

    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _is_float(feature: Any) -> bool:
    import datasets
    import pyarrow as pa

    return isinstance(feature, datasets.Value) and pa.types.is_floating(feature.pa_type)


def _is_missing(value: Any) -> bool:
    return (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
    )


def _class_order(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int | float) else (1, value)


def _rows(indices: Iterable[int]) -> str:
    """1-based row numbers, as a person counts the data rows of a file."""
    rows = [str(i + 1) for i in indices]
    more = f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else ""
    return ("row " if len(rows) == 1 else "rows ") + ", ".join(rows[:_SHOWN]) + more


def _shown(values: list[Any]) -> str:
    return ", ".join(repr(value) for value in values)


def _missing_labels(where: str, label_column: str, missing: list[int]) -> ValueError:
    return ValueError(
        f"{where}, column {label_column!r}: {_rows(missing)} (counting data rows from 1) "
        f"{'has' if len(missing) == 1 else 'have'} no label; fill {'it' if len(missing) == 1 else 'them'} in "
        "or delete those rows"
    )


def _class_values(
    where: str, label_column: str, labels: list[Any], kept: list[int], classes: list[str] | None = None
) -> list[Any]:
    """The class values of the kept rows (strings stripped); missing ones are an error."""
    values = [labels[i].strip() if isinstance(labels[i], str) else labels[i] for i in kept]
    missing = [i for i, value in zip(kept, values, strict=True) if _is_missing(value)]
    if classes is not None:  # a ClassLabel marks an unlabelled row with -1 (e.g. hidden test labels)
        missing += [i for i, value in zip(kept, values, strict=True) if value == -1]
    if missing:
        raise _missing_labels(where, label_column, sorted(missing))
    return values


def _check_seen(
    where: str,
    label_column: str,
    values: list[Any],
    kept: list[int],
    seen: set[Any],
    train_where: str,
    classes: list[str] | None,
) -> None:
    """A validation or test label that the training split lacks is an error that names it and its rows."""
    unseen: dict[Any, list[int]] = {}
    for i, value in zip(kept, values, strict=True):
        if value not in seen:
            unseen.setdefault(value, []).append(i)
    if not unseen:
        return
    names = [repr(classes[value]) if classes is not None else repr(value) for value in unseen]
    value, rows = next(iter(unseen.items()))
    others = f" (other unseen labels: {', '.join(names[1:])})" if len(names) > 1 else ""
    raise ValueError(
        f"{where}, column {label_column!r}: the label {names[0]} ({_rows(rows)}, counting data rows from 1) never "
        f"occurs in the training data ({train_where}){others}; add training examples with it, or remove those rows"
    )


def _targets(where: str, label_column: str, labels: list[Any], kept: list[int]) -> list[float]:
    """The kept rows' regression targets as floats; a missing, non-numeric or non-finite one is an error."""
    missing = [i for i in kept if _is_missing(labels[i])]
    if missing:
        raise _missing_labels(where, label_column, missing)
    targets = []
    for i in kept:
        value = labels[i]
        try:
            if isinstance(value, bool):
                raise ValueError
            target = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}, column {label_column!r}, {_rows([i])}: {value!r} is not a number, and task.kind=regression "
                "needs numeric labels; fix the value, or set task.kind=classification if the labels are classes"
            ) from None
        if not math.isfinite(target):
            raise ValueError(
                f"{where}, column {label_column!r}, {_rows([i])}: the label {value!r} is not finite; a regression "
                "target must be a finite number, so fix or delete the row"
            )
        targets.append(target)
    return targets
