"""Collectives per optimizer step under DDP: local vs global ascent, counted, not timed.

Gradient all-reduces are counted by a DDP communication hook (one call per bucket);
the library's own small collectives (diagnostics, global instance weights) by wrapping
``torch.distributed``. Runs 2 CPU processes on gloo.

    python -m benchmarks.perf.ddp_comm                  # MiniLM on MR, batch 16 per rank
    python -m benchmarks.perf.ddp_comm --model small
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from benchmarks.lab.common import compose_config, save
from lit_deltasam.app import assemble

COUNTS: dict[str, float] = defaultdict(float)


def counting_allreduce_hook(process_group, bucket):
    COUNTS["grad_allreduce_calls"] += 1
    COUNTS["grad_allreduce_bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(process_group, bucket)


def count(name: str, fn):
    def wrapped(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
            t for a in args if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)
        ]
        COUNTS[f"{name}_calls"] += 1
        COUNTS[f"{name}_bytes"] += sum(t.numel() * t.element_size() for t in tensors[:1])
        return fn(*args, **kwargs)

    return wrapped


class Window(Callback):
    """Counts only inside the training steps after the first (which builds DDP's buckets)."""

    def __init__(self) -> None:
        self.steps = 0
        self.totals: dict[str, float] = defaultdict(float)

    def on_train_start(self, trainer, module):
        # Lightning registers communication hooks on CUDA only; DDP takes them on gloo too.
        trainer.strategy.model.register_comm_hook(state=None, hook=counting_allreduce_hook)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        COUNTS.clear()

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step > 1:
            self.steps += 1
            for key, value in COUNTS.items():
                self.totals[key] += value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    dist.all_gather = count("all_gather", dist.all_gather)
    dist.all_reduce = count("all_reduce", dist.all_reduce)
    rows = []
    for method in ("erm", "sam", "deltasam"):
        for ascent in ("local", "global") if method != "erm" else ("local",):
            L.seed_everything(0)
            out = Path(tempfile.mkdtemp(prefix="comm-"))
            cfg = compose_config(
                [
                    f"model={args.model}",
                    f"method={method}",
                    f"method.ascent={ascent}",
                    "logger=none",
                    "callbacks=none",
                    "data.batch_size=16",
                    "test=false",
                    f"trainer.max_steps={args.steps}",
                    "trainer.limit_val_batches=0",
                ],
                out,
            )
            datamodule, module = assemble.build(cfg)
            window = Window()
            strategy = DDPStrategy()
            trainer = instantiate(
                cfg.trainer,
                devices=2,
                strategy=strategy,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[window],
            )
            HydraConfig.instance().cfg = None  # else Lightning relaunches rank 1 with Hydra overrides
            trainer.fit(module, datamodule)
            t = {k: v / window.steps for k, v in window.totals.items()}
            rows.append(
                {
                    "method": method,
                    "ascent": ascent,
                    "parameters": sum(p.numel() for p in module.parameters()),
                    "gradient_allreduces": t.get("grad_allreduce_calls", 0),
                    "gradient_mb": t.get("grad_allreduce_bytes", 0) / 2**20,
                    # the hook's own all_reduce calls went through the wrapper too
                    "other_collectives": t.get("all_gather_calls", 0)
                    + t.get("all_reduce_calls", 0)
                    - t.get("grad_allreduce_calls", 0),
                    "other_bytes": t.get("all_gather_bytes", 0)
                    + t.get("all_reduce_bytes", 0)
                    - t.get("grad_allreduce_bytes", 0),
                }
            )
    if not dist.is_initialized() or dist.get_rank() == 0:
        path = save(f"ddp_comm_{args.model}", {"rows": rows})
        print("| method | ascent | gradient all-reduces / step | MB / step | other collectives / step | bytes |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['method']} | {r['ascent']} | {r['gradient_allreduces']:.0f} | {r['gradient_mb']:.1f} | "
                f"{r['other_collectives']:.0f} | {r['other_bytes']:.0f} |"
            )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
