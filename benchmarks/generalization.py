"""Claim (b): does δ-SAM generalize better than SAM, and SAM better than ERM, where sharpness-aware training can help?

Protocol (MiniLM, max length 32, the app's recipe; rows through benchmarks/runs.py, shared
with the robust-defaults study):

* settings: ``clean1k`` (seeded 1,000-instance training subsets, 5 epochs) and ``noisy1k``
  (the same with 20% of the training labels flipped to another class); validation and
  test are the full, clean splits;
* methods: ERM, SAM and δ-SAM with the shipped ρ schedule, and ``--variant`` (the best
  δ-SAM variant of the fidelity study); exact per-instance SAM on mr clean1k only
  (``--per-instance``);
* ρ: for each sharpness-aware method, task and setting, chosen from ``--rhos`` on mean
  final validation accuracy over ``--select-seeds``, which the comparison does not use
  (their test scores would be correlated with the selection); never on test;
* final comparison: ``--seeds`` at the chosen ρ. The subset, the label noise and the data
  order depend on the seed only, so runs of one seed are paired across methods;
* headline: test accuracy of the final weights (the best-validation checkpoint's is
  reported beside it).

Resumable: finished runs are rows of docs/results/runs.jsonl and are skipped.

    python benchmarks/generalization.py                       # the whole protocol
    python benchmarks/generalization.py --report              # tables and plots from the rows there are
    python benchmarks/generalization.py --tasks mr --settings noisy1k --seeds 1 2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Optional

from common import RESULTS, bootstrap, mean_std, save
from runs import Method, key, rows_by_key, run_all

from lit_deltasam import DeltaSAMConfig


def shipped(method: str, rho: float, extra: tuple = ()) -> Method:
    d = DeltaSAMConfig()
    warmup = None if d.rho_schedule in ("constant", "follow_lr") else d.rho_warmup
    return Method(method, rho, d.rho_schedule, warmup, extra)


def parse_variant(text: Optional[str]) -> tuple:
    if not text:
        return ()
    return tuple(tuple(part.split("=", 1)) for part in text.split(","))


def candidates(args: argparse.Namespace, task: str, setting: str) -> dict[str, list[Method]]:
    """Each method family with its ρ grid."""
    out = {
        "sam": [shipped("sam", r) for r in args.rhos],
        "deltasam": [shipped("deltasam", r) for r in args.rhos],
    }
    if args.variant:
        out["deltasam_variant"] = [shipped("deltasam", r, parse_variant(args.variant)) for r in args.rhos]
    if args.per_instance and task == "mr" and setting == "clean1k":
        out["per_instance"] = [shipped("per_instance", r) for r in args.rhos]
    return out


def val(row: dict) -> float:
    return row["metrics"]["val/acc"]


def test_final(row: dict) -> float:
    return row["metrics"]["test_final/acc"]


def test_best(row: dict) -> float:
    return row["metrics"]["test/acc"]


def choose(rows: dict, task: str, setting: str, grid: list[Method], seeds: list[int]) -> Optional[Method]:
    """The ρ with the best mean validation accuracy over ``seeds``; None until every run is there."""
    scores = {}
    for method in grid:
        found = [rows.get(key(task, setting, method, s)) for s in seeds]
        if any(r is None for r in found):
            return None
        scores[method] = statistics.mean(val(r) for r in found)
    return max(scores, key=scores.get)


def final_units(args: argparse.Namespace, rows: dict) -> tuple[list[tuple], dict]:
    """The final comparison's runs, for the (task, setting, family) whose ρ is chosen already."""
    units, chosen = [], {}
    for task in args.tasks:
        for setting in args.settings:
            for seed in args.seeds:
                units.append((task, setting, Method("erm"), seed))
            for family, grid in candidates(args, task, setting).items():
                pick = choose(rows, task, setting, grid, args.select_seeds)
                if pick is None:
                    continue
                chosen[(task, setting, family)] = pick
                units += [(task, setting, pick, seed) for seed in args.seeds]
    return units, chosen


def report(args: argparse.Namespace) -> tuple[str, dict]:
    rows = rows_by_key()
    _, chosen = final_units(args, rows)
    lines = [
        "| task | setting | method | ρ (chosen on val) | seeds | stalled | test acc, final weights | "
        "test acc, best-val checkpoint | mean sharpness | final top Hessian eig. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    diffs_lines = [
        "| task | setting | comparison | pairs | mean difference (points) | 95% bootstrap CI |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict = {}
    for task in args.tasks:
        for setting in args.settings:
            families = {"erm": Method("erm")}
            families.update({f: m for (t, st, f), m in chosen.items() if (t, st) == (task, setting)})
            per_family = {}
            for family, method in families.items():
                rs = {s: rows[k] for s in args.seeds if (k := key(task, setting, method, s)) in rows}
                if not rs:
                    continue
                per_family[family] = rs
                sharp = [
                    r["metrics"]["sam/sharpness_mean"] for r in rs.values() if "sam/sharpness_mean" in r["metrics"]
                ]
                eig = [
                    r["metrics"]["final/hessian_top_eig"]
                    for r in rs.values()
                    if "final/hessian_top_eig" in r["metrics"]
                ]
                lines.append(
                    f"| {task} | {setting} | {method.label} | {'–' if method.rho is None else f'{method.rho:g}'} | "
                    f"{len(rs)} | {sum(r['stalled'] for r in rs.values())} | "
                    f"{mean_std([test_final(r) for r in rs.values()])} | "
                    f"{mean_std([test_best(r) for r in rs.values()])} | "
                    f"{mean_std(sharp, 1.0, 4)} | {mean_std(eig, 1.0, 2)} |"
                )
            for a, b in (
                ("sam", "erm"),
                ("deltasam", "erm"),
                ("deltasam", "sam"),
                ("deltasam_variant", "sam"),
                ("deltasam_variant", "erm"),
                ("per_instance", "sam"),
            ):
                if a not in per_family or b not in per_family:
                    continue
                seeds = sorted(set(per_family[a]) & set(per_family[b]))
                d = [100 * (test_final(per_family[a][s]) - test_final(per_family[b][s])) for s in seeds]
                if len(d) < 2:
                    continue
                low, high = bootstrap(d)
                summary[f"{task}/{setting}/{a}-{b}"] = {"mean": statistics.mean(d), "ci": [low, high], "n": len(d)}
                diffs_lines.append(
                    f"| {task} | {setting} | {a} − {b} | {len(d)} | {statistics.mean(d):+.2f} | "
                    f"[{low:+.2f}, {high:+.2f}] |"
                )
    text = "\n".join(lines) + "\n\n**Paired differences in test accuracy (final weights)**\n\n" + "\n".join(diffs_lines)
    return text + "\n", {"chosen": {"/".join(k): v.label for k, v in chosen.items()}, "differences": summary}


def plot(args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows_by_key()
    _, chosen = final_units(args, rows)
    panels = [(t, s) for t in args.tasks for s in args.settings]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    colors = {
        "erm": "tab:orange",
        "sam": "tab:green",
        "deltasam": "tab:blue",
        "deltasam_variant": "tab:purple",
        "per_instance": "tab:red",
    }
    for ax, (task, setting) in zip(axes[0], panels):
        families = {"erm": Method("erm")}
        families.update({f: m for (t, st, f), m in chosen.items() if (t, st) == (task, setting)})
        for family, method in families.items():
            curves = [rows[k]["curve"] for s in args.seeds if (k := key(task, setting, method, s)) in rows]
            if not curves:
                continue
            steps = [p[0] for p in curves[0]]
            means = [statistics.mean(c[i][1] for c in curves if i < len(c)) for i in range(len(steps))]
            ax.plot(steps, [100 * m for m in means], marker="o", color=colors.get(family), label=method.label)
        ax.set_title(f"{task}, {setting}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation accuracy (%)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_differences(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(summary)
    if not names:
        return
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    for i, name in enumerate(names):
        d = summary[name]
        ax.errorbar(d["mean"], i, xerr=[[d["mean"] - d["ci"][0]], [d["ci"][1] - d["mean"]]], fmt="o", color="black")
    ax.axvline(0.0, color="grey", linestyle="--")
    ax.set_yticks(range(len(names)), [n.replace("/", ", ") for n in names], fontsize=7)
    ax.set_xlabel("paired difference in test accuracy, final weights (points, 95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mr", "tweets"])
    parser.add_argument("--settings", nargs="+", default=["clean1k", "noisy1k"])
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.01, 0.02, 0.05], help="the ρ grid")
    parser.add_argument(
        "--select-seeds", nargs="+", type=int, default=[101, 102], help="seeds that choose ρ (not compared on test)"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5], help="seeds of the comparison")
    parser.add_argument("--variant", default=None, help="the best δ-SAM variant, e.g. 'estimator=exact,beta=-1.0'")
    parser.add_argument("--per-instance", action="store_true", help="add exact per-instance SAM on mr clean1k")
    parser.add_argument("--report", action="store_true", help="only build the tables and plots")
    args = parser.parse_args()
    if not args.report:
        selection = [
            (task, setting, method, seed)
            for seed in args.select_seeds
            for task in args.tasks
            for setting in args.settings
            for grid in candidates(args, task, setting).values()
            for method in grid
        ]
        for _ in run_all(selection, "generalization"):
            pass
        units, _ = final_units(args, rows_by_key())
        for _ in run_all(units, "generalization"):
            pass
    text, summary = report(args)
    save("generalization", {"args": vars(args), "table": text, **summary})
    plot(args, RESULTS / "generalization.png")
    plot_differences(summary["differences"], RESULTS / "generalization_differences.png")
    print(text)


if __name__ == "__main__":
    main()
