"""Which ρ and ρ schedule keep sharpness-aware fine-tuning off the majority-class plateau?

SAM at ρ = 0.05 can hold MiniLM on the plateau where it predicts the majority class
(docs/benchmarks.md#robust-defaults). This study runs SAM with every ρ schedule at
ρ ∈ {0.02, 0.05}, δ-SAM with the chosen schedule, and ERM as the reference, on mr and
tweets in three settings (1,000 instances for 5 epochs, clean and with 20% of the
training labels flipped; 4,000 instances for one epoch), 3 seeds. It reports the stall
rate (final validation predictions ≥ 95% one class) and the accuracies against ERM.
The choice is made on validation accuracy; test accuracy is reported, never used.

Rows go to docs/results/runs.jsonl through benchmarks/lab/runs.py (shared with the
generalization study); finished runs are skipped on a rerun. Units run seed-major, so an
interrupted study has every setting at the first seeds.

    python -m benchmarks.robust_defaults                      # the whole grid, ~5 h on 2 CPU cores
    python -m benchmarks.robust_defaults --seeds 1 --report   # the tables from the rows there are
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict

from benchmarks.lab.common import RESULTS, save
from benchmarks.lab.runs import Method, key, rows_by_key
from benchmarks.lab.scheduler import run_all
from benchmarks.lab.stats import mean_std

SCHEDULES = ("constant", "warmup", "follow_lr", "start_step")
TASKS = ("mr", "tweets")
SETTINGS = ("noisy1k", "4k1ep", "clean1k")


def grid(args: argparse.Namespace) -> list[Method]:
    methods = [Method("erm")]
    methods += [Method("sam", rho, schedule) for rho in sorted(args.rhos, reverse=True) for schedule in args.schedules]
    if args.deltasam:
        methods.append(Method("deltasam", args.deltasam_rho, args.deltasam_schedule))
    return methods


def units(args: argparse.Namespace) -> list[tuple]:
    methods = grid(args)
    return [
        (task, setting, method, seed)
        for seed in args.seeds
        for setting in args.settings
        for task in args.tasks
        for method in methods
    ]


def summary(args: argparse.Namespace, rows: dict) -> str:
    """One line per method over every (task, setting, seed) it ran: stall rate and paired gaps to ERM."""
    lines = [
        "| method | runs | stalled | val − ERM (points, paired) | test − ERM (points, paired) | worst val − ERM |",
        "|---|---|---|---|---|---|",
    ]
    for method in grid(args)[1:]:
        stalls, dval, dtest = 0, [], []
        for task, setting, m, seed in units(args):
            if m != method:
                continue
            row, erm = rows.get(key(task, setting, m, seed)), rows.get(key(task, setting, Method("erm"), seed))
            if row is None or erm is None:
                continue
            stalls += row["stalled"]
            dval.append(100 * (row["metrics"]["val/acc"] - erm["metrics"]["val/acc"]))
            dtest.append(100 * (row["metrics"]["test_final/acc"] - erm["metrics"]["test_final/acc"]))
        if dval:
            lines.append(
                f"| {method.label} | {len(dval)} | {stalls}/{len(dval)} | {statistics.mean(dval):+.1f} | "
                f"{statistics.mean(dtest):+.1f} | {min(dval):+.1f} |"
            )
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> str:
    rows = rows_by_key()
    found: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for task, setting, method, seed in units(args):
        row = rows.get(key(task, setting, method, seed))
        if row is not None:
            found[(task, setting, method.label)].append(row)
    lines = ["**All settings together**\n", summary(args, rows)]
    for task in args.tasks:
        for setting in args.settings:
            erm = {r["seed"]: r for r in found.get((task, setting, "erm"), [])}
            if not any(k[:2] == (task, setting) for k in found):
                continue
            lines += [
                f"\n**{task}, {setting}**\n",
                "| method | runs | stalled | val acc | test acc (final weights) | val − ERM (paired) |",
                "|---|---|---|---|---|---|",
            ]
            for method in grid(args):
                rs = found.get((task, setting, method.label), [])
                if not rs:
                    continue
                val = [r["metrics"]["val/acc"] for r in rs]
                test = [r["metrics"]["test_final/acc"] for r in rs]
                diffs = [r["metrics"]["val/acc"] - erm[r["seed"]]["metrics"]["val/acc"] for r in rs if r["seed"] in erm]
                gap = f"{100 * statistics.mean(diffs):+.1f}" if diffs and method.method != "erm" else "–"
                stalled = sum(r["stalled"] for r in rs)
                lines.append(
                    f"| {method.label} | {len(rs)} | {stalled}/{len(rs)} | {mean_std(val)} | {mean_std(test)} | {gap} |"
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="of benchmarks/lab/runs.py SETTINGS")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.02, 0.05])
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--deltasam", action=argparse.BooleanOptionalAction, default=True, help="include δ-SAM")
    parser.add_argument(
        "--deltasam-schedule", default="follow_lr", help="the schedule δ-SAM runs with (default: the chosen one)"
    )
    parser.add_argument("--deltasam-rho", type=float, default=0.02, help="δ-SAM's ρ (default: the chosen one)")
    parser.add_argument("--report", action="store_true", help="only print and save the tables of the rows there are")
    args = parser.parse_args()
    if not args.report:
        run_all(units(args), "robust_defaults")
    text = report(args)
    save("robust_defaults", {"args": vars(args), "table": text})
    print(text)
    print(f"saved {RESULTS / 'robust_defaults.json'}")


if __name__ == "__main__":
    main()
