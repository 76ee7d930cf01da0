"""Tasks from your own data: every format, both split modes, label kinds, and each bad-data error.

Files are written in ``tmp_path``; ``datasets`` caches what it reads there too.
"""

import random
import re
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch

from lit_deltasam.data import TextDataModule, build_metrics, files_task, hub_task, read_table


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write(path: Path, columns: dict) -> Path:
    """``columns`` as a file in the format its suffix names, written by pandas as a user's tool would."""
    frame = pd.DataFrame(columns)
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        raise AssertionError(suffix)
    return path


TRAIN = {
    "review": ['a "great", film', "  dull   plot ", "fine", "superb acting", "boring", "okay-ish", "loved it", "meh"],
    "sentiment": ["pos", "neg", "neu", "pos", "neg", "neu", "pos", "neg"],
}
TEST = {"review": ["wonderful", "awful", "so so"], "sentiment": ["pos", "neg", "neu"]}
VALIDATION = {"review": ["nice", "bad"], "sentiment": ["pos", "neg"]}


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_gives_the_same_examples(suffix, tmp_path):
    paths = {name: write(tmp_path / f"{name}{suffix}", data) for name, data in [("train", TRAIN), ("val", VALIDATION)]}
    test = write(tmp_path / f"test{suffix}", TEST)
    task = files_task(paths["train"], paths["val"], test, text_column="review", label_column="sentiment")
    assert task.name == "files" and task.kind == "classification"
    assert task.label_names == ("neg", "neu", "pos"), "string labels in sorted order"
    assert task.metric_names == ("acc", "macro_f1") and task.text_fields == ("text",)
    splits = task.load()
    assert splits["test"] == [
        {"text": "wonderful", "label": 2},
        {"text": "awful", "label": 0},
        {"text": "so so", "label": 1},
    ], "given splits keep their order"
    assert splits["validation"] == [{"text": "nice", "label": 2}, {"text": "bad", "label": 0}]
    expected = [('a "great", film', 2), ("dull plot", 0), ("fine", 1), ("superb acting", 2)]
    expected += [("boring", 0), ("okay-ish", 1), ("loved it", 2), ("meh", 0)]
    assert sorted((e["text"], e["label"]) for e in splits["train"]) == sorted(expected)
    assert set(build_metrics(task)) == {"acc", "macro_f1", "majority_share"}


def labelled(n_per_class: dict, key="label") -> dict:
    rows = [(f"text {label} {i}", label) for label, n in n_per_class.items() for i in range(n)]
    random.Random(1).shuffle(rows)
    return {"text": [t for t, _ in rows], key: [y for _, y in rows]}


def test_only_train_is_split_80_10_10_seeded_and_stratified(tmp_path):
    path = write(tmp_path / "all.csv", labelled({"b": 60, "a": 40}))
    random.seed(5)
    torch.manual_seed(5)
    splits = files_task(path).load()
    random.seed(6)
    assert files_task(path).load() == splits, "the split does not depend on the global RNG"
    assert {name: len(split) for name, split in splits.items()} == {"train": 80, "validation": 10, "test": 10}
    for name in ("validation", "test"):
        assert Counter(e["label"] for e in splits[name]) == {0: 4, 1: 6}, "10% of each class"
    texts = [e["text"] for split in splits.values() for e in split]
    assert len(set(texts)) == 100 == len(texts), "disjoint splits that cover the file"
    assert all(e["label"] == ("ab".index(e["text"].split()[1])) for split in splits.values() for e in split)


def test_a_missing_split_is_held_out_of_train(tmp_path):
    train = write(tmp_path / "train.jsonl", labelled({"x": 30, "y": 20}))
    test = write(tmp_path / "test.jsonl", labelled({"x": 3, "y": 3}))
    splits = files_task(train, test=test).load()
    assert {name: len(split) for name, split in splits.items()} == {"train": 45, "validation": 5, "test": 6}
    assert Counter(e["label"] for e in splits["validation"]) == {0: 3, 1: 2}
    splits = files_task(train, validation=test).load()
    assert {name: len(split) for name, split in splits.items()} == {"train": 45, "validation": 6, "test": 5}


def test_load_returns_copies(tmp_path):
    task = files_task(write(tmp_path / "t.csv", labelled({"a": 10, "b": 10})))
    first = task.load()
    first["train"] = first["train"][:2]
    first["test"].clear()
    assert len(task.load()["train"]) == 16 and len(task.load()["test"]) == 2


@pytest.mark.parametrize(
    ("labels", "kind", "expected_kind", "names", "expected"),
    [
        ([0.5, 1.0, -2.25, 3.0], "auto", "regression", (), [0.5, 1.0, -2.25, 3.0]),
        ([10, 2, 10, 2], "auto", "classification", ("2", "10"), [1, 0, 1, 0]),  # numbers sorted as numbers
        ([True, False, True, False], "auto", "classification", ("False", "True"), [1, 0, 1, 0]),
        (["b", "a", "c", "a"], "auto", "classification", ("a", "b", "c"), [1, 0, 2, 0]),
        ([1.5, 0.5, 1.5, 0.5], "classification", "classification", ("0.5", "1.5"), [1, 0, 1, 0]),
        ([3, 1, 4, 1], "regression", "regression", (), [3.0, 1.0, 4.0, 1.0]),
        (["3.5", "1", "-2e1", "0"], "regression", "regression", (), [3.5, 1.0, -20.0, 0.0]),
    ],
)
def test_label_kinds(labels, kind, expected_kind, names, expected, tmp_path):
    data = {"text": [f"t{i}" for i in range(4)], "label": labels}
    train, test = write(tmp_path / "train.parquet", data), write(tmp_path / "test.parquet", data)
    task = files_task(train, validation=test, test=test, kind=kind)
    assert (task.kind, task.label_names) == (expected_kind, names)
    assert task.num_labels == (1 if expected_kind == "regression" else len(names))
    assert task.metric_names == (("pearson", "spearman") if expected_kind == "regression" else ("acc", "macro_f1"))
    assert [e["label"] for e in task.load()["test"]] == expected
    assert all(type(e["label"]) is (float if expected_kind == "regression" else int) for e in task.load()["test"])


def test_sentence_pairs_and_a_datamodule_over_a_task(tmp_path):
    data = {"q": ["is it red", "", "big?", "small?"], "a": ["yes red", "no", "  ", "tiny"], "y": [1, 0, 1, 0]}
    path = write(tmp_path / "pairs.jsonl", data)
    with pytest.warns(UserWarning, match=r"pairs.jsonl: dropped 2 of 4 rows whose text \(column 'q' or 'a'\)"):
        task = files_task(path, path, path, text_column="q", text_pair_column="a", label_column="y")
    assert task.text_fields == ("text", "text_pair")
    assert task.load()["test"] == [
        {"text": "is it red", "text_pair": "yes red", "label": 1},
        {"text": "small?", "text_pair": "tiny", "label": 0},
    ]
    from lit_deltasam.models import fit_wordpiece

    tokenizer = fit_wordpiece(["is it red yes small tiny"], 50)
    dm = TextDataModule(task, tokenizer, eval_batch_size=4)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["labels"].tolist() == [1, 0] and dm.hparams.task == "files" and dm.num_labels == 2


def test_empty_texts_are_dropped_and_counted(tmp_path):
    data = {"text": ["good", " ", "bad", "", "fine  ", "\t", "ok", "nice"], "label": ["a", "b", "a", "b"] * 2}
    path = write(tmp_path / "t.csv", data)
    with pytest.warns(UserWarning, match=r"t.csv: dropped 3 of 8 rows whose text \(column 'text'\) is empty"):
        task = files_task(path, path, path)
    assert [e["text"] for e in task.load()["test"]] == ["good", "bad", "fine", "ok", "nice"]


def test_hub_dataset_saved_to_disk(tmp_path):
    names = datasets.ClassLabel(names=["world", "sports", "business"])
    features = datasets.Features({"title": datasets.Value("string"), "topic": names})

    def split(n, offset=0):
        return datasets.Dataset.from_dict(
            {"title": [f"headline {offset + i}" for i in range(n)], "topic": [i % 3 for i in range(n)]}, features
        )

    folder = tmp_path / "news"
    datasets.DatasetDict({"train": split(30), "dev": split(6, 100), "test": split(3, 200)}).save_to_disk(folder)
    task = hub_task(data_dir=folder, validation="dev", test="test", text_column="title", label_column="topic")
    assert (task.name, task.kind, task.label_names) == ("hub", "classification", ("world", "sports", "business"))
    splits = task.load()
    assert {name: len(s) for name, s in splits.items()} == {"train": 30, "validation": 6, "test": 3}
    assert splits["test"] == [{"text": f"headline {200 + i}", "label": i} for i in range(3)]

    held_out = hub_task(data_dir=folder, text_column="title", label_column="topic").load()
    assert {name: len(s) for name, s in held_out.items()} == {"train": 24, "validation": 3, "test": 3}
    missing = f"{folder} has no split 'validation' (task.validation); its splits are: train, dev, test"
    with pytest.raises(ValueError, match=re.escape(missing)):
        hub_task(data_dir=folder, validation="validation", text_column="title", label_column="topic")
    with pytest.raises(ValueError, match="task=hub needs task.dataset=<a hub id> or task.data_dir="):
        hub_task()

    hidden = datasets.Dataset.from_dict({"title": ["a", "b"], "topic": [-1, -1]}, features)
    datasets.DatasetDict({"train": split(30), "test": hidden}).save_to_disk(tmp_path / "hidden")
    unlabelled = r"split 'test', column 'topic': rows 1, 2 \(counting data rows from 1\) have no label"
    with pytest.raises(ValueError, match=unlabelled):
        hub_task(data_dir=tmp_path / "hidden", test="test", text_column="title", label_column="topic")


# --- bad data ----------------------------------------------------------------------------


def bad(tmp_path, name, columns=None, raw=None) -> Path:
    path = tmp_path / name
    if raw is not None:
        path.write_text(raw)
        return path
    return write(path, columns)


GOOD = {"text": [f"t{i}" for i in range(20)], "label": ["a", "b"] * 10}


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (
            lambda p: bad(p, "r.csv", {"review": ["x", "y"], "sentiment": ["a", "b"]}),
            {"text_column": "review"},
            "r.csv has no column 'label' (task.label_column); its columns are: review, sentiment. "
            "Set task.label_column to one of them",
        ),
        (
            lambda p: bad(p, "r.tsv", {"review": ["x", "y"], "label": ["a", "b"]}),
            {},
            "r.tsv has no column 'text' (task.text_column); its columns are: review, label",
        ),
        (lambda p: bad(p, "empty.csv", raw=""), {}, "empty.csv (task.train) is empty: it needs at least one row"),
        (lambda p: bad(p, "header.csv", raw="text,label\n"), {}, "header.csv (task.train) has no rows of data, only"),
        (lambda p: bad(p, "blank.jsonl", raw="\n\n"), {}, "blank.jsonl (task.train) has no rows of data"),
        (
            lambda p: bad(p, "empty.parquet", {"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=str)}),
            {},
            "empty.parquet (task.train) is empty",
        ),
        (
            lambda p: bad(p, "one.csv", {"text": ["x", "y", "z"], "label": ["pos"] * 3}),
            {},
            "one.csv, column 'label': every example has the label 'pos'; a classifier needs at least two classes",
        ),
        (
            lambda p: bad(p, "one.jsonl", {"text": ["x", "y", "z"], "label": [4, 4, 4]}),
            {},
            "every example has the label 4; a classifier needs at least two classes, so add examples of another "
            "class (or set task.kind=regression if the label is a numeric target)",
        ),
        (
            lambda p: bad(p, "s.csv", {"text": ["x", "y", "z"], "label": ["1.5", "high", "2"]}),
            {"kind": "regression"},
            "s.csv, column 'label', row 2: 'high' is not a number, and task.kind=regression needs numeric labels; "
            "fix the value, or set task.kind=classification",
        ),
        (
            lambda p: bad(p, "inf.csv", {"text": ["x", "y", "z"], "label": ["1.5", "2", "inf"]}),
            {"kind": "regression"},
            "inf.csv, column 'label', row 3: the label inf is not finite; a regression target must be a finite "
            "number, so fix or delete the row",
        ),
        (
            lambda p: bad(p, "gap.csv", raw="text,label\nx,a\ny,\nz,b\nw, \n"),
            {},
            "gap.csv, column 'label': rows 2, 4 (counting data rows from 1) have no label; fill them in or delete",
        ),
        (
            lambda p: bad(p, "blank.csv", {"text": [" ", ""], "label": ["a", "b"]}),
            {},
            "blank.csv: every row has an empty text (column 'text'), nothing is left; fill in the texts",
        ),
        (
            lambda p: bad(p, "few.csv", {"text": ["a", "b", "c", "d", "e", "f"], "label": ["x", "y"] * 3}),
            {},
            "the validation split is empty: 10% of the 6 training examples of ",
        ),
        (lambda p: bad(p, "t.xlsx", raw="x"), {}, "task.train='"),
        (lambda p: bad(p, "t.csv", GOOD), {"kind": "ordinal"}, "task.kind='ordinal' is not valid; choose one of"),
        (lambda p: bad(p, "broken.csv", raw='text,label\n"a,1\nb,2\n'), {}, "could not read "),
    ],
    ids=[
        "missing-label-column",
        "missing-text-column",
        "empty-file",
        "header-only",
        "blank-jsonl",
        "empty-parquet",
        "single-class",
        "single-numeric-class",
        "non-numeric-target",
        "non-finite-target",
        "missing-labels",
        "all-texts-empty",
        "empty-held-out-split",
        "unknown-suffix",
        "bad-kind",
        "unparsable",
    ],
)
def test_bad_data_is_a_clear_error(make, options, message, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ValueError) as error:
        files_task(path, **options)
    assert message in str(error.value)


def test_a_label_train_never_had(tmp_path):
    train = write(tmp_path / "train.csv", GOOD)
    test = write(tmp_path / "test.csv", {"text": ["p", "q", "r", "s"], "label": ["a", "zzz", "b", "zzz"]})
    with pytest.raises(ValueError) as error:
        files_task(train, test=test)
    assert str(error.value) == (
        f"{test}, column 'label': the label 'zzz' (rows 2, 4, counting data rows from 1) never occurs in the "
        f"training data ({train}); add training examples with it, or remove those rows"
    )
    few = write(tmp_path / "few.csv", {"text": ["p"] * 3, "label": ["a"] * 3})  # a single class is in train, not test
    with pytest.raises(ValueError, match="the label 'a' .* never occurs in the training data"):
        files_task(write(tmp_path / "train2.csv", {"text": ["x", "y"], "label": ["b", "c"]}), few, few)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"task.validation='.*nope.csv': no such file \(a relative path"):
        files_task(write(tmp_path / "t.csv", GOOD), tmp_path / "nope.csv")
    (tmp_path / "t.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"cannot tell the format from the suffix '.xlsx'; use one of .csv, .tsv"):
        read_table(tmp_path / "t.xlsx", "task.train")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(ValueError) as error:
        read_table(tmp_path / "blank.jsonl", "task.test")
    assert str(error.value) == f"{tmp_path / 'blank.jsonl'} (task.test) has no rows of data"
    (tmp_path / "lines.txt").write_text("first text\nsecond, with a comma\n")
    assert read_table(tmp_path / "lines.txt")["text"] == ["first text", "second, with a comma"]


@pytest.mark.parametrize("suffix,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_a_row_with_an_unquoted_delimiter_is_refused_by_name(tmp_path, suffix, delimiter):
    """pandas reads a row with one field more than the header as (index, value): the texts to predict would lose
    their first part, silently (an independent tester predicted ' loved it' for 'great film, loved it')."""
    path = tmp_path / f"texts{suffix}"
    path.write_text(f"text\ngreat film{delimiter} loved it\nboring and too long\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} \(predict.input\): some rows have more fields"):
        read_table(path, "predict.input")
    path.write_text(f'text\n"great film{delimiter} loved it"\nboring and too long\n')
    assert read_table(path, "predict.input")["text"] == [f"great film{delimiter} loved it", "boring and too long"]


def test_csv_cells_are_read_literally(tmp_path):
    """Only an empty cell is missing: "NA", "None" or "null" are texts and class names, as written."""
    path = bad(tmp_path, "na.csv", raw="text,label\nNA,None\nnull,NA\nNone,None\nn/a,NA\n")
    task = files_task(path, path, path)
    assert task.label_names == ("NA", "None")
    assert task.load()["test"] == [
        {"text": "NA", "label": 1},
        {"text": "null", "label": 0},
        {"text": "None", "label": 1},
        {"text": "n/a", "label": 0},
    ]
