"""Your own data through the application: train on a hand-made CSV, evaluate the checkpoint, predict new texts."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from lit_deltasam.app import assemble, checkpoint, schema

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FAST = ["model=small", "debug=fast", "logger=none", "~callbacks.sharpness_probe"]
NAMES = ["negative", "neutral", "positive"]

sys.path.insert(0, str(ROOT))
from eval import evaluate  # noqa: E402
from predict import predict  # noqa: E402
from train import train  # noqa: E402

WORDS = {"positive": ["great", "lovely", "superb"], "negative": ["awful", "boring", "dull"], "neutral": ["fine"]}


def reviews(counts: dict[str, int], start: int = 0) -> list[tuple[str, str]]:
    return [(f"a {WORDS[y][i % len(WORDS[y])]} film, take {start + i}", y) for y in counts for i in range(counts[y])]


def write_csv(path: Path, rows: list[tuple], header=("review", "sentiment")) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def compose(overrides, output_dir, config_name="train"):
    return schema.compose(CONF, overrides, output_dir, config_name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run on a hand-made CSV of string labels (18 positive, 12 negative, 6 neutral, 80/10/10 split)."""
    folder = tmp_path_factory.mktemp("own_data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(folder / "hf_cache"))
        data = write_csv(folder / "reviews.csv", reviews({"positive": 18, "negative": 12, "neutral": 6}))
        overrides = [*FAST, "task=files", f"task.train={data}", "task.text_column=review"]
        metrics = train(compose([*overrides, "task.label_column=sentiment"], folder / "run"))
    return folder, metrics


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_the_run_keeps_the_label_names(trained):
    folder, metrics = trained
    run = folder / "run"
    assert json.loads((run / "labels.json").read_text()) == {
        "task": "files",
        "kind": "classification",
        "label_names": NAMES,
    }
    saved = checkpoint.read(run / "checkpoints" / "last.ckpt")
    assert checkpoint.label_names(saved) == NAMES
    record = saved[checkpoint.RECORD_KEY]
    assert record["task"]["train"] == str(folder / "reviews.csv") and Path(record["task"]["train"]).is_absolute()
    assert record["task"]["monitor"] == "val/acc" and record["text_columns"] == ["review"]
    assert record["max_length"] == 48 and record["model"]["_target_"] == "lit_deltasam.models.Small"
    config = json.loads((run / "metrics.json").read_text())["config"]
    assert config["task"]["monitor"] == "val/acc", "a null monitor becomes the task's first metric"
    assert {"test/acc", "test/macro_f1", "test/majority_share"} <= set(metrics)


def test_eval_reproduces_the_runs_test_metrics(trained, tmp_path):
    folder, metrics = trained
    best = folder / "run" / "checkpoints" / "step4.ckpt"  # one validation, so the best is the last step
    assert best.exists()
    result = evaluate(compose([f"ckpt_path={best}"], tmp_path / "eval", "eval"))
    assert set(result) == {"test/loss", "test/acc", "test/macro_f1", "test/majority_share"}
    for key, value in result.items():
        assert value == pytest.approx(metrics[key], abs=1e-6), key
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"] == result


def test_eval_refuses_a_test_split_carved_from_changed_training_data(trained, tmp_path):
    folder, _ = trained
    data = folder / "reviews.csv"
    original = data.read_bytes()
    cfg = compose([f"ckpt_path={folder / 'run' / 'checkpoints' / 'last.ckpt'}"], tmp_path, "eval")
    try:
        write_csv(data, reviews({"positive": 18, "negative": 12, "neutral": 6}, start=1))
        with pytest.raises(ValueError, match=f"the test split rebuilt from {data} differs from the one this"):
            evaluate(cfg)
    finally:
        data.write_bytes(original)
    evaluate(cfg)


def test_predict_gives_names_and_probabilities_that_agree_with_eval(trained, tmp_path):
    folder, _ = trained
    ckpt = folder / "run" / "checkpoints" / "last.ckpt"
    rows = reviews({"positive": 5, "negative": 3, "neutral": 2}, start=100)  # shares 0.5, 0.3, 0.2 tell classes apart
    rows.insert(4, ("   ", "neutral"))
    labelled = write_csv(tmp_path / "labelled.csv", rows)

    with pytest.warns(UserWarning, match="1 of 11 rows have an empty text"):
        output = predict(compose([f"ckpt_path={ckpt}", f"input={labelled}", "output=out/p.csv"], tmp_path, "predict"))
    assert output == Path("out/p.csv") and output.exists()
    predicted = read_csv(output)
    assert list(predicted[0]) == ["review", "sentiment", "prediction", *(f"prob_{name}" for name in NAMES)]
    assert [row["review"] for row in predicted] == [text for text, _ in rows]
    assert predicted[4]["prediction"] == "" and predicted[4]["prob_neutral"] == ""
    del predicted[4]
    for row in predicted:
        probabilities = [float(row[f"prob_{name}"]) for name in NAMES]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-6)
        assert row["prediction"] == NAMES[max(range(3), key=probabilities.__getitem__)]

    with pytest.warns(UserWarning, match="dropped 1 of 11 rows"):
        result = evaluate(compose([f"ckpt_path={ckpt}", f"task.test={labelled}"], tmp_path / "eval", "eval"))
    accuracy = sum(row["prediction"] == row["sentiment"] for row in predicted) / len(predicted)
    assert result["test/acc"] == pytest.approx(accuracy, abs=1e-6), "the names predict.py writes are eval.py's classes"


def test_eval_refuses_data_with_other_labels(trained, tmp_path):
    folder, _ = trained
    other = write_csv(tmp_path / "other.csv", reviews({"positive": 10, "negative": 10}))
    ckpt = folder / "run" / "checkpoints" / "last.ckpt"
    cfg = compose([f"ckpt_path={ckpt}", f"task.train={other}"], tmp_path, "eval")
    with pytest.raises(ValueError) as error:
        evaluate(cfg)
    assert str(error.value) == (
        "the checkpoint's model was trained for classification with the classes ['negative', 'neutral', 'positive'], "
        "but task 'files' is classification with the classes ['negative', 'positive']; evaluate on data with the "
        "model's labels"
    )


def test_predict_names_a_missing_text_column(trained, tmp_path):
    folder, _ = trained
    texts = write_csv(tmp_path / "texts.csv", [("1", "nice")], header=("id", "comment"))
    cfg = compose([f"ckpt_path={folder / 'run' / 'checkpoints' / 'last.ckpt'}", f"input={texts}"], tmp_path, "predict")
    with pytest.raises(ValueError) as error:
        predict(cfg)
    assert str(error.value) == (
        f"{texts} has no column 'review' (text_column); its columns are: id, comment. Set text_column to one of them"
    )
    assert not (tmp_path / "predictions.csv").exists()
    cfg.text_column = "comment"
    assert [row["prediction"] in NAMES for row in read_csv(predict(cfg))] == [True]


def test_regression_from_a_saved_hub_dataset(tmp_path):
    def split(n, offset):
        texts = [f"{'good ' * (i % 4)}movie {offset + i}" for i in range(n)]
        return datasets.Dataset.from_dict({"sentence": texts, "score": [float(i % 4) / 2 for i in range(n)]})

    datasets.DatasetDict({"train": split(40, 0), "test": split(8, 100)}).save_to_disk(tmp_path / "scores")
    overrides = [*FAST, "task=hub", f"task.data_dir={tmp_path / 'scores'}", "task.test=test"]
    cfg = compose([*overrides, "task.text_column=sentence", "task.label_column=score"], tmp_path / "run")
    metrics = train(cfg)
    assert cfg.task.monitor == "val/pearson" and {"test/pearson", "test/spearman"} <= set(metrics)
    assert "test/acc" not in metrics
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["kind"] == "regression"
    assert (tmp_path / "run" / "checkpoints" / "step4.ckpt").exists(), "the checkpoint callback monitored val/pearson"

    test = split(8, 100)
    (tmp_path / "texts.txt").write_text("".join(f"{text}\n" for text in test["sentence"]))
    ckpt = tmp_path / "run" / "checkpoints" / "step4.ckpt"
    output = predict(compose([f"ckpt_path={ckpt}", f"input={tmp_path / 'texts.txt'}"], tmp_path / "p", "predict"))
    assert output == tmp_path / "p" / "predictions.csv", "by default in the run folder"
    predicted = read_csv(output)
    assert list(predicted[0]) == ["text", "prediction"] and len(predicted) == 8
    values = torch.tensor([float(row["prediction"]) for row in predicted])
    pearson = torch.corrcoef(torch.stack([values, torch.tensor(test["score"])]))[0, 1].item()
    assert not math.isnan(pearson)
    assert pearson == pytest.approx(metrics["test/pearson"], abs=1e-5), "the same values as the run's test"


def test_bad_data_stops_the_run_before_it_writes_anything(tmp_path):
    train_file = write_csv(tmp_path / "train.csv", reviews({"positive": 10, "negative": 10}))
    test_file = write_csv(tmp_path / "test.csv", [("a fine film", "neutral")])
    out = tmp_path / "run"
    overrides = [*FAST, "task=files", f"task.train={train_file}", f"task.test={test_file}", "task.text_column=review"]
    with pytest.raises(ValueError, match="the label 'neutral' \\(row 1, counting data rows from 1\\) never occurs"):
        train(compose([*overrides, "task.label_column=sentiment", "logger=csv"], out))
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=mr", "task.train=x.csv"], "task.train is read by task=files and task=hub only, not by task 'mr'"),
        (["task=files", "task.train=x.csv", "task.dataset=imdb"], "task.dataset is read by task=hub only"),
        (["task=files", "task.train=x.csv", "task.data_dir=/d"], "task.data_dir is read by task=hub and glue/*"),
        (["task=hub"], "task=hub needs task.dataset=<a hub id> or task.data_dir="),
    ],
)
def test_task_settings_are_checked(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        assemble.build_task(compose(overrides, tmp_path).task)


def run(script, *args, cwd):
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_CACHE": str(cwd / "hf_cache")}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True)


TRAIN = "python train.py task=files task.train=reviews.csv"
EVAL = "python eval.py ckpt_path="
PREDICT = "python predict.py ckpt_path="


def test_the_readme_commands_train_evaluate_and_predict(tmp_path):
    readme = (ROOT / "README.md").read_text()
    assert TRAIN in readme and EVAL in readme and PREDICT in readme and "input=new_reviews.csv" in readme
    rows = reviews({"positive": 15, "negative": 15}, start=0)
    write_csv(tmp_path / "reviews.csv", rows, header=("text", "label"))
    (tmp_path / "new_reviews.csv").write_text("text\nsuch a lovely film\nawful and boring\n")

    result = run("train.py", *TRAIN.split()[2:], *FAST, "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = run("eval.py", f"ckpt_path={ckpt}", "hydra.run.dir=eval", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test/acc" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    outputs = ["input=new_reviews.csv", "output=predictions.csv", "hydra.run.dir=p"]
    result = run("predict.py", f"ckpt_path={ckpt}", *outputs, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = read_csv(tmp_path / "predictions.csv")
    assert [row["text"] for row in predicted] == ["such a lovely film", "awful and boring"]
    assert all(row["prediction"] in ("negative", "positive") for row in predicted)


@pytest.mark.slow  # a train.py process; the message is checked in process in test_custom_data.py
def test_the_readme_command_names_a_label_column_the_file_lacks(tmp_path):
    write_csv(tmp_path / "reviews.csv", reviews({"positive": 15, "negative": 15}, start=0), header=("text", "label"))
    result = run("train.py", "task=files", "task.train=reviews.csv", "task.label_column=stars", *FAST, cwd=tmp_path)
    assert result.returncode != 0
    assert "has no column 'stars' (task.label_column); its columns are: text, label" in result.stderr


def test_predict_and_eval_need_nothing_but_the_checkpoint(tmp_path, monkeypatch):
    """A pretrained encoder (a tiny BERT in a local folder), trained, then its folder deleted, the cache empty and
    every index unreachable: eval and predict rebuild it from the checkpoint alone."""
    import shutil

    from transformers import BertConfig, BertForSequenceClassification

    from lit_deltasam.models.builders import fit_wordpiece

    base = tmp_path / "tiny-bert"
    rows = reviews({"positive": 18, "negative": 12, "neutral": 6})
    tokenizer = fit_wordpiece((text for text, _ in rows), 200)
    tokenizer.save_pretrained(base)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    BertForSequenceClassification(config.__class__(**{**config.to_dict(), "intermediate_size": 64})).save_pretrained(
        base
    )
    data = write_csv(tmp_path / "reviews.csv", rows)
    overrides = ["model=hf", f"model.name_or_path={base}", "debug=fast", "logger=none", "task=files"]
    overrides += [f"task.train={data}", "task.text_column=review", "task.label_column=sentiment"]
    metrics = train(compose(overrides, tmp_path / "run"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"

    shutil.rmtree(base)
    for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIP_NO_INDEX": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    result = evaluate(compose([f"ckpt_path={ckpt}", f"paths.cache_dir={empty}"], tmp_path / "eval", "eval"))
    assert result["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    labelled = write_csv(tmp_path / "labelled.csv", reviews({"positive": 2, "negative": 2}, start=50))
    output = predict(
        compose([f"ckpt_path={ckpt}", f"input={labelled}", f"paths.cache_dir={empty}"], tmp_path / "p", "predict")
    )
    assert len(read_csv(output)) == 4
    assert not any(empty.iterdir())
