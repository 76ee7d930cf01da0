"""Fit a TinyModule with 2 CPU processes on gloo, under DDP or FSDP2, and save what each rank saw.

Run by tests/test_distributed.py as ``python ddp_worker.py '<json>'`` (``{"jobs": [<json>, ...]}`` for several
fits in one launch); Lightning re-runs the same command for rank 1. Each rank writes ``rank<r>.pt`` with, per
optimizer step, the sub-batch it got, the weights w at the clean forward, and eps (the weights at the
perturbed forward minus w); and its final flat parameters (all shards gathered).
"""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).parent))
from helpers import TinyData, TinyModule  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from lit_deltasam import DeltaSAMConfig  # noqa: E402


def flat_params(module):
    """All parameters as one vector, each gathered whole if it is sharded."""
    full = [p.full_tensor() if isinstance(p, DTensor) else p for p in module.parameters()]
    return torch.cat([p.detach().reshape(-1).clone() for p in full])


class Recording(TinyModule):
    def configure_model(self):
        if self.shard:
            for layer in (self.model.net[0], self.model.net[-1], self.model):
                fully_shard(layer)

    def on_train_batch_start(self, batch, batch_idx):
        self.calls = []

    def per_sample_loss(self, batch):
        self.calls.append(flat_params(self))
        losses = super().per_sample_loss(batch)
        poison = self.poison or {}
        if self.global_rank == poison.get("rank") and len(self.records) == poison.get("batch") and len(self.calls) == 1:
            return losses * float("nan")
        return losses

    def deltasam_step(self, batch):
        result = super().deltasam_step(batch)
        self.ess = result.effective_sample_size
        return result

    def on_train_batch_end(self, outputs, batch, batch_idx):
        x, y = batch
        self.records.append(
            {"x": x, "y": y, "w": self.calls[0], "eps": self.calls[-1] - self.calls[0], "ess": self.ess}
        )
        if self.save_at == len(self.records) - 1:
            self.trainer.save_checkpoint(self.out / "mid.ckpt")


def main(args: dict) -> None:
    out = Path(args["out"])
    if args.get("seed", 0) is None:
        os.environ.pop("PL_GLOBAL_SEED", None)  # each rank keeps its own random initial seed
    else:
        L.seed_everything(args.get("seed", 0))
    module = Recording(
        DeltaSAMConfig(**args["config"]),
        lr=args.get("lr", 0.1),
        optimizer=args.get("optimizer", "sgd"),
        dropout=args.get("dropout", 0.0),
    )
    module.records = []
    module.shard = args.get("strategy") == "fsdp2"
    module.poison = args.get("poison")
    module.save_at, module.out = args.get("save_at_batch"), out
    callbacks = []
    if args.get("checkpoint_every"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                every_n_train_steps=args["checkpoint_every"],
                save_top_k=-1,
                filename="{step}",
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if module.shard else "ddp",
        max_steps=args["steps"],
        logger=False,
        enable_checkpointing=bool(callbacks),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    data = TinyData(n=args.get("n", 64), batch_size=args.get("batch_size", 8), shuffle=args.get("shuffle", False))
    trainer.fit(module, datamodule=data, ckpt_path=args.get("resume"))
    saved = {"records": module.records, "params": flat_params(module), "base_seed": module._deltasam_state.base_seed}
    torch.save(saved, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    # ``jobs``: several fits, one after another in the same two processes (each seeds itself and writes under its
    # own ``out``), so that a test module pays the processes' start once
    for job in args.get("jobs", [args]):
        main(job)
    # gloo's threads, left running to interpreter exit, can abort the process ("terminate called without an active
    # exception", seen once in CI after every rank had written its results)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
