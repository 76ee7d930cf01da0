"""Pictures of flatness: checkpoints of train.py compared along the same random filter-normalized directions.

python landscape.py 'ckpt_paths=[outputs/A/checkpoints/last.ckpt,outputs/B/checkpoints/last.ckpt]'
python landscape.py 'ckpt_paths=[...]' dims=2 points=11 'labels=[ERM,"δ-SAM"]'

Quote every list for the shell; quote a label inside it as well when it holds more than ASCII letters, digits and
``_-+./`` (Hydra's grammar for an unquoted value).

Writes ``landscape.json`` and ``landscape.png`` to the run folder (``outputs/landscape/<date>/<time>/``).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from rich.progress import Progress

from lit_deltasam.app import assemble, checkpoint, console, report, schema
from lit_deltasam.core.diagnostics import top_hessian_eigenvalues
from lit_deltasam.core.landscape import filter_normalized, random_directions, surface
from lit_deltasam.data import TextDataModule
from lit_deltasam.models import TextClassifier

schema.register()
console.quiet()
SPLITS = ("train", "validation", "test")


def _sample(saved: dict[str, Any], tokenizer: Any, cfg: DictConfig) -> tuple[list[dict], Any]:
    """A seeded sample of ``cfg.split`` of the checkpoint's task, as batches, and the task."""
    record = saved[checkpoint.RECORD_KEY]
    task_cfg = schema.task_config(record["task"])
    task = assemble.build_task(task_cfg)
    data = TextDataModule(
        task,
        tokenizer,
        eval_batch_size=cfg.batch_size,
        max_length=record["max_length"],
        cache_dir=cfg.paths.cache_dir,
        data_dir=assemble.task_data_dir(task_cfg),
    )
    data.setup()
    examples = data.split(cfg.split)
    examples = random.Random(cfg.seed).sample(examples, min(cfg.samples, len(examples)))
    return [b for b in data.loader(examples, cfg.batch_size)], task


def _metrics(module: TextClassifier, batches: list[dict], regression: bool) -> dict[str, float]:
    total, correct, n = 0.0, 0.0, 0
    for batch in batches:
        logits = module(batch)
        total += module.losses(logits, batch["labels"]).sum().item()
        if not regression:
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        n += batch["labels"].shape[0]
    out = {"loss": total / n}
    if not regression:
        out["acc"] = correct / n
    return out


class _Lines:
    """Progress as a line every tenth of the points, where stdout is no terminal (a pipe, a log file) and a bar
    would print nothing."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = total, 0, time.perf_counter()

    def advance(self) -> None:
        self.done += 1
        if self.done * 10 // self.total > (self.done - 1) * 10 // self.total:
            elapsed = time.perf_counter() - self.start
            print(f"loss landscape: {self.done}/{self.total} points, {elapsed:.0f} s", flush=True)


def landscape(cfg: DictConfig) -> dict[str, Any]:
    """The loss (and accuracy) of every checkpoint at ``w + a d1 (+ b d2)``, and its ``hessian_k`` largest-magnitude
    Hessian eigenvalues, largest magnitude first."""
    if cfg.dims not in (1, 2):
        raise ValueError(f"dims={cfg.dims} is not valid; choose 1 (a slice) or 2 (a contour)")
    if cfg.split not in SPLITS:
        raise ValueError(f"split={cfg.split!r} is not valid; choose one of {list(SPLITS)}")
    if cfg.points < 2:
        raise ValueError(f"points={cfg.points} is not valid; it must be at least 2")
    paths = [str(p) for p in cfg.ckpt_paths]
    labels = list(cfg.labels) if cfg.labels is not None else [Path(p).parent.parent.name or p for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"labels={labels} names {len(labels)} checkpoints, but ckpt_paths has {len(paths)}")
    axis = torch.linspace(-cfg.span, cfg.span, cfg.points).tolist()
    grid = [(a,) for a in axis] if cfg.dims == 1 else [(a, b) for b in axis for a in axis]
    out: dict[str, Any] = {"axis": axis, "dims": cfg.dims, "split": cfg.split, "seed": cfg.seed, "checkpoints": {}}
    directions = None
    terminal = sys.stdout.isatty()
    with Progress(transient=True, disable=not terminal) as progress:
        job = progress.add_task("loss landscape", total=len(paths) * len(grid))
        advance = partial(progress.advance, job) if terminal else _Lines(len(paths) * len(grid)).advance
        for path, label in zip(paths, labels):
            saved = checkpoint.read(path)
            module, tokenizer = checkpoint.rebuild(saved, cfg.paths.cache_dir)
            batches, task = _sample(saved, tokenizer, cfg)
            params = [p for p in module.parameters() if p.requires_grad]
            if directions is None:  # drawn once: every checkpoint is seen along the same directions
                directions = random_directions(params, cfg.dims, cfg.seed)
                shapes = [p.shape for p in params]
            elif [p.shape for p in params] != shapes:
                raise ValueError(f"{path} has another architecture than {paths[0]}; compare checkpoints of one model")
            scaled = [filter_normalized(d, params) for d in directions]
            evaluate = partial(_metrics, module, batches, task.kind == "regression")
            points = surface(params, scaled, grid, evaluate, advance)
            samples = sum(len(b["labels"]) for b in batches)
            result: dict[str, Any] = {"path": path, "task": task.name, "samples": samples}
            for key in points[0]:
                result[key] = [p[key] for p in points]
            if cfg.hessian_k:
                print(f"{label}: the {cfg.hessian_k} largest-magnitude Hessian eigenvalues", flush=True)
                hessian_batch = {k: v[: cfg.hessian_batch] for k, v in batches[0].items()}
                with torch.enable_grad():
                    eigenvalues = top_hessian_eigenvalues(
                        module,
                        module.per_sample_loss,
                        hessian_batch,
                        k=cfg.hessian_k,
                        iters=cfg.hessian_iters,
                        generator=torch.Generator().manual_seed(cfg.seed),
                    )
                # deflation finds them roughly in that order, but not exactly after few iterations
                result["hessian_top"] = sorted(eigenvalues, key=abs, reverse=True)
            out["checkpoints"][label] = result
    folder = Path(cfg.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "landscape.json").write_text(json.dumps(out, indent=2))
    plot(out, folder / "landscape.png")
    for label, result in out["checkpoints"].items():
        centre = result["loss"][len(grid) // 2]
        eig = ", ".join(f"{v:.4g}" for v in result.get("hessian_top", []))
        print(f"{label}: loss at w {centre:.4f}; largest-magnitude Hessian eigenvalues [{eig}]")
    report.print_paths({"values": folder / "landscape.json", "plot": folder / "landscape.png"})
    return out


def significant(values: list[float], digits: int = 2) -> list[str]:
    """``values`` in plain decimals, each to at least ``digits`` significant digits, and more until the distinct
    values read apart (4.9 and 4.6, not 5 and 5)."""

    def plain(value: float, digits: int) -> str:
        if value == 0 or not math.isfinite(value):
            return f"{value:g}"
        return f"{value:.{max(0, digits - 1 - math.floor(math.log10(abs(value))))}f}"

    for more in range(digits, 17):
        labels = [plain(v, more) for v in values]
        if len(set(labels)) == len(set(values)):
            return labels
    return [repr(v) for v in values]


def plot(result: dict[str, Any], path: Path) -> Any:
    """Draw ``result`` to ``path``; returns the (closed) matplotlib figure. α = 0 (each checkpoint's own weights) is
    marked; the legend gives each checkpoint's largest-magnitude eigenvalue λ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis, checkpoints = result["axis"], result["checkpoints"]
    if result["dims"] == 1:
        metrics = [m for m in ("loss", "acc") if all(m in r for r in checkpoints.values())]
        fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6), squeeze=False)
        tops = [r["hessian_top"][0] for r in checkpoints.values() if r.get("hessian_top")]
        lam = dict(zip(tops, significant(tops)))
        for ax, metric in zip(axes[0], metrics):
            ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":", label="α = 0: the checkpoint")
            for label, r in checkpoints.items():
                eig = r.get("hessian_top")
                ax.plot(axis, r[metric], label=label + (f" (λ {lam[eig[0]]})" if eig else ""))
            ax.set_xlabel("α along a filter-normalized direction")
            ax.set_ylabel(f"{result['split']} {metric}")
            ax.legend(fontsize=7)
        fig.suptitle("1-D slice through each checkpoint, the same direction for all")
    else:
        fig, axes = plt.subplots(1, len(checkpoints), figsize=(4.5 * len(checkpoints), 4), squeeze=False)
        n = len(axis)
        lows = min(min(r["loss"]) for r in checkpoints.values())
        highs = max(max(r["loss"]) for r in checkpoints.values())
        levels = torch.linspace(lows, highs, 15).tolist()
        for ax, (label, r) in zip(axes[0], checkpoints.items()):
            z = torch.tensor(r["loss"]).reshape(n, n)
            contour = ax.contour(axis, axis, z.numpy(), levels=levels)
            ax.clabel(contour, fontsize=6)
            ax.plot([0.0], [0.0], marker="+", color="black", markersize=9, linestyle="none", label="α = β = 0")
            ax.set_title(label)
            ax.set_xlabel("α (direction 1)")
            ax.set_ylabel("β (direction 2)")
        fig.suptitle(f"{result['split']} loss around each checkpoint, the same directions for all")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


@hydra.main(version_base="1.3", config_path="conf", config_name="landscape")
def main(cfg: DictConfig) -> None:
    console.log_to_file()
    console.report_errors(lambda: landscape(cfg))


if __name__ == "__main__":
    main()
