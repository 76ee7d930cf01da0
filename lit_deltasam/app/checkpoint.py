"""What a checkpoint of ``train.py`` carries beyond the weights, and how ``eval.py`` and ``predict.py`` rebuild it.

Every checkpoint holds a run record under :data:`RECORD_KEY`: the model config, the
tokenizer's files (a tokenizer fit on the training texts cannot be fit again without
them), the task config with its file paths made absolute, ``max_length`` and, for your own
data, a digest of the test split, so that ``eval.py`` notices when the files changed. The class
names are the module's ``label_names`` hyperparameter; ``labels.json`` in the run folder
repeats them with the task kind.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torchmetrics import MetricCollection
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..config import DeltaSAMConfig
from ..data import Task
from ..models import TextClassifier
from ..models.encoders import HFClassifier
from .assemble import CUSTOM_TASKS
from .schema import to_dict

RECORD_KEY = "lit_deltasam_run"


class RunRecord(Callback):
    """Adds the run record to every checkpoint and writes ``labels.json`` to the run folder when fitting starts.

    Args:
        cfg: the run's config; ``task.monitor`` already filled in by :func:`~lit_deltasam.app.assemble.build`.
        task: the task the run trains on.
        tokenizer: the tokenizer the run uses.
    """

    def __init__(self, cfg: DictConfig, task: Task, tokenizer: PreTrainedTokenizerBase) -> None:
        self.output_dir = Path(cfg.paths.output_dir)
        self.labels = {"task": task.name, "kind": task.kind, "label_names": list(task.label_names)}
        task_cfg = to_dict(cfg.task, resolve=True)
        columns = ["text", "text_pair"][: len(task.text_fields)]
        if task.name in CUSTOM_TASKS:
            columns = [task_cfg["text_column"] or "text", task_cfg["text_pair_column"]][: len(task.text_fields)]
        self.record = {
            "model": to_dict(cfg.model, resolve=True),
            "task": _absolute_paths(task_cfg),
            "text_columns": columns,
            "max_length": int(cfg.data.max_length),
            "tokenizer": _tokenizer_files(tokenizer),
        }
        if task.name in CUSTOM_TASKS:
            self.record["test_digest"] = split_digest(task.load()["test"])

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "labels.json").write_text(json.dumps(self.labels, indent=2) + "\n")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        record = dict(self.record)
        encoder = getattr(pl_module, "encoder", None)
        if isinstance(encoder, HFClassifier):
            record["architecture"] = encoder.architecture()
        checkpoint[RECORD_KEY] = record


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` (``save_last=True``) holds the last validated step and is
    a link to the top-k checkpoint of that step when there is one: one file when the last step is the best.

    Lightning writes ``last.ckpt`` only at a step that saved a top-k file, so with ``save_top_k=1`` it is a second
    copy of the best checkpoint, and not the last step's weights, whenever the last validation was not the best.
    """

    def __init__(self, save_last: bool = True, **kwargs: Any) -> None:
        if not isinstance(save_last, bool):
            raise ValueError(f"callbacks.model_checkpoint.save_last={save_last!r} is not valid; choose true or false")
        super().__init__(save_last=save_last, **kwargs)
        self._saved_now = False

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        before = self._last_checkpoint_saved
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        self._saved_now = self._last_checkpoint_saved != before
        if self.save_last:
            self._last_global_step_saved = trainer.global_step  # so that Lightning goes on to write last.ckpt

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not self.save_last:
            return
        last = Path(self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST))
        if not self._saved_now and trainer.is_global_zero and last.is_symlink():
            last.unlink()  # a copy written through the link would overwrite the file it points to
        self.save_last = "link" if self._saved_now else True
        try:
            super()._save_last_checkpoint(trainer, monitor_candidates)
        finally:
            self.save_last, self._saved_now = True, False


def kept(saved: ModelCheckpoint, tested: bool) -> dict[str, str]:
    """The checkpoints a run keeps, under the labels the end of a run prints them with. Read before testing:
    ``trainer.test(ckpt_path=...)`` loads the callback's state as the checkpoint saved it."""
    best, last = saved.best_model_path, saved.last_model_path
    paths = {f"best checkpoint ({saved.monitor})" + (", tested above" if tested else ""): best}
    if last and Path(last).is_symlink() and Path(last).resolve() == Path(best).resolve():
        paths["last checkpoint (a link to the best: the last step was the best)"] = last
    else:
        paths["last checkpoint"] = last
    return {label: path for label, path in paths.items() if path}


def delete(paths: Iterable[str]) -> None:
    """Delete checkpoint files, and their folder if that leaves it empty."""
    for path in (Path(p) for p in paths if p):
        path.unlink(missing_ok=True)
        if path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()


def _absolute_paths(task: dict[str, Any]) -> dict[str, Any]:
    """The task config with its files and folders as absolute paths, so that it can be read from anywhere."""
    keys = ("data_dir", "train", "validation", "test") if task["name"] == "files" else ("data_dir",)
    return {key: str(Path(v).expanduser().resolve()) if key in keys and v else v for key, v in task.items()}


def split_digest(examples: list[dict[str, Any]]) -> str:
    """A fingerprint of a split's examples, in order."""
    return hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest()


def check_test_split(checkpoint: dict[str, Any], task: Task) -> None:
    """Raise if ``task``'s test split is not the one the checkpoint's run was tested on.

    Only for your own data read with the run's own task settings: a test split carved from a
    training file that has changed since would silently differ, and could hold examples the
    model was trained on.
    """
    record = checkpoint[RECORD_KEY]
    if "test_digest" not in record or split_digest(task.load()["test"]) == record["test_digest"]:
        return
    settings = record["task"]
    sources = ("train", "validation", "test", "data_dir", "dataset")
    files = ", ".join(str(settings[key]) for key in sources if settings.get(key))
    raise ValueError(
        f"the test split rebuilt from {files} differs from the one this checkpoint's run was tested on: the data "
        "changed since training, and a test split carved from changed training data can hold training examples; "
        "restore the files, or evaluate on a labelled file of your own with task.test=<path>"
    )


def _tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in Path(folder).iterdir() if path.is_file()}


def read(ckpt_path: str | Path) -> dict[str, Any]:
    """A checkpoint written by ``train.py``, on the CPU.

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: the checkpoint has no run record (it was not written by ``train.py``).
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={str(path)!r}: no such file; train.py writes its checkpoints to <run folder>/checkpoints/"
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if RECORD_KEY not in checkpoint:
        raise ValueError(
            f"{path} holds no run record (the model config and tokenizer that eval.py and predict.py rebuild the "
            "model from): it was not written by this version of train.py"
        )
    return checkpoint


def label_names(checkpoint: dict[str, Any]) -> list[str]:
    """The class names of a checkpoint's model in label-index order; empty for regression."""
    return list(checkpoint["hyper_parameters"].get("label_names", ()))


def check_labels(checkpoint: dict[str, Any], task: Task) -> None:
    """Raise unless ``task`` has the kind and the classes (in the same order) of the checkpoint's model."""
    names = label_names(checkpoint)
    kind = "regression" if checkpoint["hyper_parameters"]["num_labels"] == 1 else "classification"
    if (task.kind, list(task.label_names)) != (kind, names):

        def described(kind: str, names: list[str]) -> str:
            return kind + (f" with the classes {names}" if names else "")

        raise ValueError(
            f"the checkpoint's model was trained for {described(kind, names)}, but task {task.name!r} is "
            f"{described(task.kind, list(task.label_names))}; evaluate on data with the model's labels"
        )


def rebuild(
    checkpoint: dict[str, Any], cache_dir: str, metrics: MetricCollection | None = None
) -> tuple[TextClassifier, PreTrainedTokenizerBase]:
    """The trained module, in eval mode, and its tokenizer.

    A pretrained encoder is rebuilt from the architecture the checkpoint records and then
    loaded with its weights, with no download: the base model is never fetched again.

    Args:
        checkpoint: from :func:`read`.
        cache_dir: where this machine keeps pinned archives, in place of the training
            machine's (read only for a checkpoint older than the recorded architecture).
        metrics: the test metrics of the module.
    """
    record = checkpoint[RECORD_KEY]
    with tempfile.TemporaryDirectory() as folder:
        for name, data in record["tokenizer"].items():
            (Path(folder) / name).write_bytes(data)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    model = dict(record["model"])
    if "cache_dir" in model:
        model["cache_dir"] = cache_dir
    hparams = checkpoint["hyper_parameters"]
    num_labels = hparams["num_labels"]
    if "architecture" in record:  # a pretrained encoder: its architecture, never its base weights again
        spec = instantiate(model)
        encoder = HFClassifier(spec.name_or_path, num_labels, spec.attn_implementation, record["architecture"])
    else:
        encoder = instantiate(model).build(num_labels, tokenizer)
    module = TextClassifier(
        encoder, DeltaSAMConfig(method="erm"), num_labels, metrics, label_names=label_names(checkpoint)
    )
    module.load_state_dict(checkpoint["state_dict"])
    return module.eval(), tokenizer
