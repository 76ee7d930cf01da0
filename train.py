"""Fine-tune an encoder on an NLU task with a sharpness-aware method.

python train.py                                   # MiniLM on MR with δ-SAM, CPU, W&B offline
python train.py method=sam task=r8 seed=1
python train.py -m method=erm,sam,deltasam seed=1,2,3
python train.py -m hparams_search=optuna
python train.py task=files task.train=reviews.csv     # your own data; then eval.py and predict.py
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig

from lit_deltasam.app import assemble, checkpoint, console, lr_finder, report, schema

schema.register()
console.quiet()


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint (and with ``test_final`` the final weights first, as ``test_final/*``).

    With ``tune_lr`` the LR comes from Lightning's range test first (:mod:`lit_deltasam.app.lr_finder`).
    Returns the metrics, also written to ``metrics.json``.
    """
    method = assemble.method_config(cfg.method)  # a bad method value stops the run before the model loads
    tuned = lr_finder.apply(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule, module = assemble.build(cfg)
    summary = report.SharpnessSummary()
    loggers = assemble.instantiate_all(cfg.logger)
    record = checkpoint.RunRecord(cfg, datamodule.task, datamodule.tokenizer)
    callbacks = [*assemble.callbacks(cfg, with_logger=bool(loggers)), summary, record]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    resolved = schema.to_dict(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    start = time.perf_counter()
    trainer.fit(module, datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {"time/fit_s": time.perf_counter() - start, **tuned}
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
    metrics.update(summary.summary())
    saved = trainer.checkpoint_callback if isinstance(trainer.checkpoint_callback, ModelCheckpoint) else None
    best = saved.best_model_path if saved else ""
    kept = checkpoint.kept(saved, tested=cfg.test) if saved else {}  # read before testing, which reloads them
    written = [*saved.best_k_models, saved.last_model_path] if saved else []
    if cfg.test:
        if cfg.test_final and best:
            for result in trainer.test(module, datamodule, verbose=False):
                metrics.update({k.replace("test/", "test_final/", 1): float(v) for k, v in result.items()})
        for result in trainer.test(module, datamodule, ckpt_path=best or None, verbose=False):
            metrics.update({k: float(v) for k, v in result.items()})
    metrics["time/total_s"] = time.perf_counter() - start

    if trainer.is_global_zero:
        report.write_metrics(cfg.paths.output_dir, metrics, resolved)
        report.print_table(cfg.run_name, report.shown(metrics, method.method))
        for logger in loggers:
            if isinstance(logger, WandbLogger):  # the final table, test and time values included
                logger.experiment.summary.update(metrics)
        if not cfg.keep_checkpoints:
            checkpoint.delete(written)
        report.print_paths({"run folder": cfg.paths.output_dir, **(kept if cfg.keep_checkpoints else {})})
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    torch.set_float32_matmul_precision("high")
    console.log_to_file()
    metrics = console.report_errors(lambda: train(cfg))
    return metrics.get(cfg.optimized_metric) if cfg.optimized_metric else None


if __name__ == "__main__":
    console.check_override_keys(sys.argv[1:], schema.TYPED_GROUPS)
    main()
