"""Predict with a checkpoint of train.py: one output row per input row, written as CSV.

python predict.py ckpt_path=outputs/2026-01-01/12-00-00/checkpoints/last.ckpt input=new.csv output=predictions.csv
python predict.py ckpt_path=... input=tweets.txt                        # .txt: one text per line
"""

from __future__ import annotations

import warnings
from collections import Counter
from functools import partial
from pathlib import Path
from typing import cast

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lit_deltasam.app import checkpoint, console, report, schema
from lit_deltasam.data import read_table
from lit_deltasam.data.custom import require_columns, row_texts
from lit_deltasam.data.datamodule import collate

schema.register()
console.quiet()


def predict(cfg: DictConfig) -> Path:
    """Write ``cfg.output``: the input's columns, ``prediction``, and ``prob_<class>`` for each class.

    ``prediction`` is the class name (the value, for regression). A row whose text is empty
    or whitespace keeps empty prediction cells. The texts are in the column the model was
    trained on unless ``text_column`` says otherwise; a ``.txt`` file's lines are its texts.
    Runs on one device of ``cfg.trainer``. Returns the path of the CSV.
    """
    saved = checkpoint.read(cfg.ckpt_path)
    record = saved[checkpoint.RECORD_KEY]
    names = checkpoint.label_names(saved)
    trained = record["text_columns"]
    text_column = cfg.text_column or ("text" if Path(cfg.input).suffix.lower() == ".txt" else trained[0])
    pair_column = cfg.text_pair_column or (trained[1] if len(trained) > 1 else None)
    table = read_table(cfg.input, "input")
    require_columns(cfg.input, table, {"text_column": text_column, "text_pair_column": pair_column})
    added = ["prediction", *(f"prob_{name}" for name in names)]
    if clash := [column for column in added if column in table.column_names]:
        raise ValueError(f"{cfg.input} already has the column(s) {clash} that predict.py writes; rename them")
    rows = row_texts(table, text_column, pair_column)
    kept = [i for i, texts in enumerate(rows) if texts is not None]
    if not kept:
        raise ValueError(f"{cfg.input}: every row has an empty text (column {text_column!r}); nothing to predict")
    if len(kept) < len(rows):
        warnings.warn(
            f"{cfg.input}: {len(rows) - len(kept)} of {len(rows)} rows have an empty text; their predictions are empty",
            UserWarning,
            stacklevel=2,
        )

    module, tokenizer = checkpoint.rebuild(saved, cfg.paths.cache_dir)
    collate_fn = partial(
        collate, tokenizer=tokenizer, max_length=cfg.max_length or record["max_length"], label_dtype=torch.long
    )
    texts = [row for row in rows if row is not None]  # the rows of kept, in order
    loader = DataLoader(cast("Dataset[dict[str, str]]", texts), batch_size=cfg.batch_size, collate_fn=collate_fn)
    trainer: L.Trainer = instantiate(cfg.trainer, devices=1, logger=False, callbacks=[], enable_checkpointing=False)
    # one loader: a list of predict_step's outputs; one device: in the order of the rows
    outputs = cast("list[dict[str, torch.Tensor]]", trainer.predict(module, loader))
    predicted = torch.cat([output["prediction"] for output in outputs]).tolist()
    columns = {"prediction": [names[i] for i in predicted] if names else predicted}
    if names:
        probabilities = torch.cat([output["probabilities"] for output in outputs]).tolist()
        columns.update({f"prob_{name}": [p[j] for p in probabilities] for j, name in enumerate(names)})
    for column, values in columns.items():
        full = [None] * len(rows)
        for i, value in zip(kept, values, strict=True):
            full[i] = value
        table = table.add_column(column, full)
    output = Path(cfg.output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(str(output), index=False)
    counts = f" {dict(Counter(columns['prediction']).most_common())}" if names else ""
    print(f"{len(kept)} predictions{counts}")
    report.print_paths({"written to": output.absolute()})
    return output


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    console.log_to_file()
    console.report_errors(lambda: predict(cfg))


if __name__ == "__main__":
    main()
