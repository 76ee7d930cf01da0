"""How well does each perturbation approximate per-instance SAM? cos(C_X, C_PI) along training.

For each task, MiniLM is fine-tuned with SAM; at several steps, on fixed held-out
batches (model in eval mode), the sharpness correction C_X = G_X - ḡ of SAM and of
δ-SAM for every estimator and beta is compared with per-instance SAM's, C_PI.

    python benchmarks/fidelity.py                       # mr, r8, tweets; ~25 min on 2 CPU cores
    python benchmarks/fidelity.py --tasks mr --steps 0 50 --batches 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from common import RESULTS, compose_config, save
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from lit_deltasam import DeltaSAMConfig
from lit_deltasam.app import assemble
from lit_deltasam.core.batch import slice_batch
from lit_deltasam.core.diagnostics import fidelity

TOP_LAYERS = ["encoder.model.bert.encoder.layer.5.*", "encoder.model.bert.pooler.*", "encoder.model.classifier.*"]
BETAS = [-1.0, -0.5, 0.5, 1.0]
ESTIMATORS = {
    "head": dict(estimator="head"),
    "probe": dict(estimator="probe"),
    "probe_top": dict(estimator="probe", probe_params=TOP_LAYERS),
    "exact": dict(estimator="exact", per_instance_impl="loop"),
}


def variants(rho: float, only: list[str] | None = None) -> dict[str, DeltaSAMConfig]:
    out = {"sam": DeltaSAMConfig(method="sam", rho=rho)}
    for name, options in ESTIMATORS.items():
        for beta in BETAS:
            out[f"{name}:{beta:g}"] = DeltaSAMConfig(method="deltasam", rho=rho, beta=beta, **options)
    return {k: v for k, v in out.items() if only is None or k in only or k == "sam"}


class Probe(Callback):
    def __init__(self, task: str, steps: list[int], batches: list, rho: float, rows: list, only=None) -> None:
        self.task, self.steps, self.batches, self.rho, self.rows = task, set(steps), batches, rho, rows
        self.only = only
        self.done: set[int] = set()

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step not in self.steps or step in self.done:
            return
        self.done.add(step)
        params = [p for g in module.optimizers(use_pl_optimizer=False).param_groups for p in g["params"]]
        module.eval()
        torch.manual_seed(step)
        with torch.enable_grad():
            for index, batch in enumerate(self.batches):
                cos = fidelity(
                    module, module.per_sample_loss, batch, variants(self.rho, self.only), params, impl="loop"
                )
                for name, value in cos.items():
                    self.rows.append(dict(task=self.task, step=step, batch=index, variant=name, cos=value))
                print(f"{self.task} step {step} batch {index}: " + " ".join(f"{k}={v:.3f}" for k, v in cos.items()))
        module.train()

    def on_train_start(self, trainer, module):
        self.run(trainer, module)

    def on_train_batch_end(self, trainer, module, *args):
        self.run(trainer, module)


def summarize(rows: list[dict]) -> dict[str, dict]:
    by_variant: dict[str, list[float]] = defaultdict(list)
    by_task: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in rows:
        by_variant[row["variant"]].append(row["cos"])
        by_task[(row["variant"], row["task"])].append(row["cos"])
    sam = {(r["task"], r["step"], r["batch"]): r["cos"] for r in rows if r["variant"] == "sam"}
    out = {}
    for name, values in by_variant.items():
        wins = [r["cos"] > sam[(r["task"], r["step"], r["batch"])] for r in rows if r["variant"] == name]
        out[name] = {
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values),
            "beats_sam": sum(wins) / len(wins),
            "per_task": {t: statistics.mean(v) for (n, t), v in by_task.items() if n == name},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mr", "r8", "tweets"])
    parser.add_argument("--steps", nargs="+", type=int, default=[0, 100, 200])
    parser.add_argument("--batches", type=int, default=4, help="held-out batches per probe")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    parser.add_argument("--name", default="fidelity")
    args = parser.parse_args()

    rows: list[dict] = []
    for task in args.tasks:
        L.seed_everything(0)
        out = Path(tempfile.mkdtemp(prefix=f"fidelity-{task}-"))
        cfg = compose_config(
            [
                f"task={task}",
                "method=sam",
                f"method.rho={args.rho}",
                "logger=none",
                "callbacks=none",
                f"trainer.max_steps={max(args.steps)}",
                "trainer.limit_val_batches=0",
                "test=false",
            ],
            out,
        )
        datamodule, module = assemble.build(cfg)
        datamodule.setup("fit")
        loader = iter(datamodule.val_dataloader())
        batches = [slice_batch(next(loader), slice(0, args.batch_size)) for _ in range(args.batches)]
        trainer = instantiate(
            cfg.trainer,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            callbacks=[Probe(task, args.steps, batches, args.rho, rows, args.only)],
        )
        trainer.fit(module, datamodule)

    summary = summarize(rows)
    path = save(args.name, {"args": vars(args), "top_layers": TOP_LAYERS, "rows": rows, "summary": summary})
    plot(rows, summary, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")
    for name, s in sorted(summary.items(), key=lambda kv: -kv[1]["mean"]):
        print(f"{name:14s} cos={s['mean']:.3f}±{s['std']:.3f} beats SAM {100 * s['beats_sam']:.0f}%")


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sam = summary["sam"]["mean"]
    ax.axhline(sam, color="black", linestyle="--", label=f"SAM ({sam:.3f})")
    for name in [e for e in ESTIMATORS if all(f"{e}:{b:g}" in summary for b in BETAS)]:
        xs = [b for b in [-1.0, -0.5, 0.0, 0.5, 1.0]]
        ys = [summary[f"{name}:{b:g}"]["mean"] if b != 0.0 else sam for b in xs]
        ax.plot(xs, ys, marker="o", label=f"δ-SAM, {name}")
    ax.set_xlabel("β (λ ∝ s^β)")
    ax.set_ylabel("mean cos(C_X, C_PI)")
    ax.set_title("Fidelity to per-instance SAM (MiniLM)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
