"""Does δ-SAM generalize better than SAM and ERM? MiniLM on mr, r8 and tweets, several seeds.

Each run is ``train.py`` with the given overrides: a seeded training subset for a CPU
budget, one epoch, validation four times along the way (the curve is plotted), and the
test split evaluated once, at the end, with the final weights: nothing is selected on it.

    python benchmarks/generalization.py                                   # ~2 h on 2 CPU cores
    python benchmarks/generalization.py --tasks mr --methods erm deltasam --seeds 1
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

from common import RESULTS, ROOT, compose_config, save

from train import train

MONITOR = {"mr": "acc", "r8": "acc", "tweets": "acc", "mr_rating": "pearson"}
COLORS = {"erm": "tab:orange", "sam": "tab:green", "deltasam": "tab:blue", "per_instance": "tab:red"}


def run(task: str, method: str, seed: int, train_limit: int, out: Path) -> dict:
    overrides = [
        f"task={task}",
        f"method={method}",
        f"seed={seed}",
        f"data.train_limit={train_limit}",
        "data.eval_batch_size=256",
        "trainer.max_epochs=1",
        "trainer.val_check_interval=0.25",
        "logger=csv",
        "callbacks=none",
        "trainer.enable_checkpointing=false",
    ]
    cfg = compose_config(overrides, out)
    metrics = train(cfg)
    curve = []
    # the newest CSV logger version: an interrupted earlier attempt may have left an older one
    newest = max(out.glob("csv/version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            if row.get(f"val/{MONITOR[task]}"):
                curve.append((int(row["step"]), float(row[f"val/{MONITOR[task]}"])))
    return {
        "task": task,
        "method": method,
        "seed": seed,
        "overrides": overrides,
        "metrics": metrics,
        "curve": sorted(curve),
    }


def table(runs: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["task"], r["method"])].append(r)
    lines = [
        "| task | method | seeds | val acc | test acc | mean sharpness |",
        "|---|---|---|---|---|---|",
    ]

    def cell(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
        if len(values) == 1:
            return f"{scale * values[0]:.{digits}f}"
        return f"{scale * statistics.mean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"

    for (task, method), rs in groups.items():
        key = MONITOR[task]
        sharp = [r["metrics"]["sam/sharpness_mean"] for r in rs if "sam/sharpness_mean" in r["metrics"]]
        lines.append(
            f"| {task} | {method} | {len(rs)} | {cell([r['metrics'][f'val/{key}'] for r in rs])} | "
            f"{cell([r['metrics'][f'test/{key}'] for r in rs])} | {cell(sharp, 1.0, 4) if sharp else '–'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mr", "r8", "tweets"])
    parser.add_argument("--methods", nargs="+", default=["erm", "sam", "deltasam"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--train-limit", type=int, default=4000)
    parser.add_argument("--extra", nargs="*", default=["mr:per_instance"], help="task:method runs added to the grid")
    parser.add_argument("--name", default="generalization")
    args = parser.parse_args()

    grid = [(t, m) for t in args.tasks for m in args.methods] + [tuple(e.split(":")) for e in args.extra]
    state = RESULTS / f"{args.name}.partial.json"
    runs = json.loads(state.read_text()) if state.exists() else []
    done = {(r["task"], r["method"], r["seed"]) for r in runs}
    for task, method in grid:
        for seed in args.seeds:
            if (task, method, seed) in done:
                continue
            out = ROOT / "outputs" / "benchmarks" / args.name / f"{task}-{method}-s{seed}"
            runs.append(run(task, method, seed, args.train_limit, out))
            state.parent.mkdir(parents=True, exist_ok=True)
            state.write_text(json.dumps(runs))
            print(table(runs))
    path = save(args.name, {"args": vars(args), "runs": runs, "table": table(runs)})
    state.unlink(missing_ok=True)
    plot(runs, RESULTS / f"{args.name}.png")
    print(table(runs))
    print(f"wrote {path}")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by_method: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
        for r in runs:
            if r["task"] == task and r["curve"]:
                by_method[r["method"]].append(r["curve"])
        for method, curves in sorted(by_method.items()):
            steps = [s for s, _ in curves[0]]
            means = [statistics.mean(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
            ax.plot(
                steps,
                [100 * m for m in means],
                marker="o",
                color=COLORS.get(method),
                label=f"{method} ({len(curves)} seeds)",
            )
        ax.set_title(task)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"validation {MONITOR[task]} (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
