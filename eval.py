"""Evaluate a checkpoint of train.py on the test split of the task it was trained on.

python eval.py ckpt_path=outputs/2026-01-01/12-00-00/checkpoints/last.ckpt
python eval.py ckpt_path=... task.test=more_labelled.csv     # the same task, another labelled test file
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lit_deltasam.app import assemble, checkpoint, console, report, schema
from lit_deltasam.data import TextDataModule, build_metrics

schema.register()
console.quiet()


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint's model; the model, tokenizer, task and ``max_length`` come from the checkpoint.

    ``cfg.task`` holds overrides of the saved task config. Returns the test metrics, also
    written to ``metrics.json``.
    """
    saved = checkpoint.read(cfg.ckpt_path)
    record = saved[checkpoint.RECORD_KEY]
    overrides = {key: value for key, value in schema.to_dict(cfg.task).items() if value is not None}
    task_cfg = schema.task_config(record["task"], overrides)
    task = assemble.build_task(task_cfg)
    checkpoint.check_labels(saved, task)
    if not overrides:
        checkpoint.check_test_split(saved, task)
    module, tokenizer = checkpoint.rebuild(saved, cfg.paths.cache_dir, build_metrics(task))
    datamodule = TextDataModule(
        task,
        tokenizer,
        eval_batch_size=cfg.batch_size,
        max_length=cfg.max_length or record["max_length"],
        cache_dir=cfg.paths.cache_dir,
        data_dir=assemble.task_data_dir(task_cfg),
    )
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    metrics = {k: float(v) for result in trainer.test(module, datamodule, verbose=False) for k, v in result.items()}
    if trainer.is_global_zero:
        resolved = {**schema.to_dict(cfg, resolve=True), "task": schema.to_dict(task_cfg)}
        report.write_metrics(cfg.paths.output_dir, metrics, resolved)
        report.print_table(f"a checkpoint on {task.name}", metrics)
        report.print_paths(
            {"checkpoint": Path(cfg.ckpt_path).expanduser().absolute(), "run folder": cfg.paths.output_dir}
        )
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    console.log_to_file()
    console.report_errors(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
