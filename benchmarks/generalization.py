"""Claim (b): does δ-SAM generalize better than SAM, and SAM better than ERM, where sharpness-aware training can help?

Protocol (MiniLM, max length 32, the app's recipe; rows through benchmarks/lab/runs.py, shared
with the robust-defaults study):

* settings: ``clean1k`` (seeded 1,000-instance training subsets, 5 epochs) and ``noisy1k``
  (the same subsets with 20% of the training labels flipped to another class); validation
  and test are the full, clean splits;
* methods: ERM; SAM and δ-SAM with the shipped defaults (so SAM, too, runs the shipped ρ
  schedule, ``follow_lr``); ``--variant``, the best δ-SAM variant of the fidelity study
  (read from docs/results/fidelity.json by default: the closest to per-instance SAM among
  the variants closer than the shipped one with a paired CI above 0; none if there is none);
  exact per-instance SAM on mr clean1k (``--no-per-instance`` leaves it out);
* ρ: for each sharpness-aware method and task, chosen from ``--rhos`` on mean final
  validation accuracy over ``--select-seeds`` in the ``--select-on`` setting and used in
  both settings (``--select-on each`` chooses per setting, at twice the cost); the
  selection seeds are not compared on test, and the comparison seeds did not choose the
  shipped defaults (the robust-defaults study used seeds 1-3); never chosen on test;
* final comparison: ``--seeds`` at the chosen ρ. The subset, the label noise and the data
  order depend on the seed only, so runs of one seed are paired across methods;
* headline: test accuracy of the final weights; the best-validation checkpoint's is
  reported beside it. Flatness of the final weights, measured the same way for every
  method on 32 validation instances: the Hessian eigenvalue of largest magnitude (power
  iteration) and the SAM sharpness at ρ₀ = 0.05 (runs.FinalFlatness).

Resumable: finished runs are rows of docs/results/runs.jsonl and are skipped.

    python -m benchmarks.generalization                       # the whole protocol
    python -m benchmarks.generalization --report              # tables and plots from the rows there are
    python -m benchmarks.generalization --tasks mr --settings noisy1k --seeds 11 12
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

from benchmarks.fidelity import variant_overrides
from benchmarks.lab.common import RESULTS, save
from benchmarks.lab.runs import SETTINGS, Method, key, resolved_method, rows_by_key
from benchmarks.lab.scheduler import run_all
from benchmarks.lab.stats import mean_std, t_interval
from lit_deltasam import DeltaSAMConfig


def shipped(method: str, rho: float, extra: tuple = ()) -> Method:
    d = DeltaSAMConfig()
    warmup = None if d.rho_schedule in ("constant", "follow_lr") else d.rho_warmup
    return Method(method, rho, d.rho_schedule, warmup, extra)


def parse_variant(text: str) -> tuple:
    """``--variant``: ``auto`` (the fidelity study's best), ``none``, a fidelity variant name such as
    ``exact:-1:raw``, or ``method.*`` fields such as ``estimator=exact,beta=-1.0``."""
    if text == "none":
        return ()
    if text == "auto":
        path = RESULTS / "fidelity.json"
        if not path.exists():
            raise SystemExit(
                f"--variant auto reads the fidelity study's best variant from {path}, which is missing; "
                "run benchmarks/fidelity.py, or pass --variant NAME or --variant none"
            )
        against = json.loads(path.read_text())["summary"]["against_shipped"]
        better = [name for name, d in against.items() if d["gain_ci"][0] > 0]
        if not better:
            print(
                "--variant auto: no fidelity variant is closer to per-instance SAM than the shipped δ-SAM with a CI "
                "above 0; no variant arm"
            )
            return ()
        text = max(better, key=lambda name: against[name]["gain"])
    if "=" not in text:
        return variant_overrides(text)
    return tuple(tuple(part.split("=", 1)) for part in text.split(","))


def grids(args: argparse.Namespace) -> dict[str, list[Method]]:
    """Each sharpness-aware family whose ρ is chosen, with its grid; the variant only where it differs
    from the shipped δ-SAM."""
    out = {
        "sam": [shipped("sam", r) for r in args.rhos],
        "deltasam": [shipped("deltasam", r) for r in args.rhos],
    }
    variant = [shipped("deltasam", r, args.variant) for r in args.rhos]
    if args.variant and resolved_method(variant[0].overrides()) != resolved_method(out["deltasam"][0].overrides()):
        out["deltasam_variant"] = variant
    return out


def selection_setting(args: argparse.Namespace, setting: str) -> str:
    return setting if args.select_on == "each" else args.select_on


def selection_units(args: argparse.Namespace) -> list[tuple]:
    settings = dict.fromkeys(selection_setting(args, s) for s in args.settings)
    return [
        (task, setting, method, seed)
        for seed in args.select_seeds
        for task in args.tasks
        for setting in settings
        for grid in grids(args).values()
        for method in grid
    ]


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


def selection_table(args: argparse.Namespace, rows: dict) -> str:
    """Validation accuracy of every selection run, per family and ρ, with the choice marked."""
    lines = ["| task | chosen on | family | ρ | val acc per seed | mean | chosen |", "|---|---|---|---|---|---|---|"]
    for task in args.tasks:
        for setting in dict.fromkeys(selection_setting(args, s) for s in args.settings):
            for family, grid in grids(args).items():
                pick = choose(rows, task, setting, grid, args.select_seeds)
                for method in grid:
                    found = [rows.get(key(task, setting, method, s)) for s in args.select_seeds]
                    accs = [100 * val(r) for r in found if r is not None]
                    lines.append(
                        f"| {task} | {setting} | {family} | {method.rho:g} | "
                        f"{', '.join(f'{a:.2f}' for a in accs) or '–'} | "
                        f"{f'{statistics.mean(accs):.2f}' if accs else '–'} | {'✓' if method == pick else ''} |"
                    )
    return "\n".join(lines)


def final_units(args: argparse.Namespace, rows: dict) -> tuple[list[tuple], dict]:
    """The final comparison's runs, seed by seed (per-instance SAM last), for the families whose ρ is chosen.

    Per-instance SAM (mr clean1k) runs at SAM's chosen ρ: a grid of its own would cost six
    runs of about ten minutes."""
    units, chosen = [], {}
    for task in args.tasks:
        for setting in args.settings:
            units += [(task, setting, Method("erm"), seed) for seed in args.seeds]
            for family, grid in grids(args).items():
                pick = choose(rows, task, selection_setting(args, setting), grid, args.select_seeds)
                if pick is None:
                    continue
                chosen[(task, setting, family)] = pick
                units += [(task, setting, pick, seed) for seed in args.seeds]
            if args.per_instance and (task, setting) == ("mr", "clean1k") and (task, setting, "sam") in chosen:
                pick = shipped("per_instance", chosen[(task, setting, "sam")].rho)
                chosen[(task, setting, "per_instance")] = pick
                units += [(task, setting, pick, seed) for seed in args.seeds]
    units.sort(key=lambda u: (u[2].method == "per_instance", args.seeds.index(u[3])))
    return units, chosen


def flatness(rows: list[dict], name: str) -> list[float]:
    return [r["metrics"][name] for r in rows if name in r["metrics"]]


def differences(a: dict[int, dict], b: dict[int, dict], score) -> Optional[dict[str, Any]]:
    """Paired differences in points over the seeds both have: mean, Student-t 95% CI (df = pairs − 1; a
    percentile bootstrap over a handful of pairs is too narrow), wins of ``a``."""
    seeds = sorted(set(a) & set(b))
    d = [100 * (score(a[s]) - score(b[s])) for s in seeds]
    if len(d) < 2:
        return None
    return {"mean": statistics.mean(d), "ci": list(t_interval(d)), "n": len(d), "wins": sum(x > 0 for x in d)}


COMPARISONS = (
    ("sam", "erm"),
    ("deltasam", "erm"),
    ("deltasam", "sam"),
    ("deltasam_variant", "erm"),
    ("deltasam_variant", "sam"),
    ("per_instance", "erm"),
    ("per_instance", "sam"),
)


def report(args: argparse.Namespace) -> tuple[str, dict]:
    rows = rows_by_key()
    _, chosen = final_units(args, rows)
    lines = [
        "| task | setting | method | ρ (chosen on val) | seeds | stalled | test acc, final weights | "
        "test acc, best-val checkpoint | SAM sharpness at ρ₀ = 0.05 | Hessian eigenvalue of largest magnitude |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    diffs_lines = [
        "| task | setting | comparison | pairs | final weights: mean (points) [95% CI] | wins | "
        "best-val checkpoint: mean [95% CI] |",
        "|---|---|---|---|---|---|---|",
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
                lines.append(
                    f"| {task} | {setting} | {method.label} | {'–' if method.rho is None else f'{method.rho:g}'} | "
                    f"{len(rs)} | {sum(r['stalled'] for r in rs.values())} | "
                    f"{mean_std([test_final(r) for r in rs.values()])} | "
                    f"{mean_std([test_best(r) for r in rs.values()])} | "
                    f"{mean_std(flatness(list(rs.values()), 'final/sam_sharpness'), 1.0, 4)} | "
                    f"{mean_std(flatness(list(rs.values()), 'final/hessian_top_eig'), 1.0, 1)} |"
                )
            for a, b in COMPARISONS:
                if a not in per_family or b not in per_family:
                    continue
                final = differences(per_family[a], per_family[b], test_final)
                best = differences(per_family[a], per_family[b], test_best)
                if final is None:
                    continue
                summary[f"{task}/{setting}/{a}-{b}"] = {**final, "best_val": best}
                diffs_lines.append(
                    f"| {task} | {setting} | {a} − {b} | {final['n']} | {final['mean']:+.2f} "
                    f"[{final['ci'][0]:+.2f}, {final['ci'][1]:+.2f}] | {final['wins']}/{final['n']} | "
                    f"{best['mean']:+.2f} [{best['ci'][0]:+.2f}, {best['ci'][1]:+.2f}] |"
                )
    text = (
        "**ρ chosen on validation accuracy** (selection seeds "
        + ", ".join(map(str, args.select_seeds))
        + ")\n\n"
        + selection_table(args, rows)
        + "\n\n**Final comparison** (seeds "
        + ", ".join(map(str, args.seeds))
        + "; mean ± std over the seeds there are)\n\n"
        + "\n".join(lines)
        + "\n\n**Paired differences in test accuracy**\n\n"
        + "\n".join(diffs_lines)
    )
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
        if ax.lines:
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
    ax.set_xlabel("paired difference in test accuracy, final weights (points, Student-t 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mr", "tweets"])
    parser.add_argument("--settings", nargs="+", default=["clean1k", "noisy1k"])
    parser.add_argument(
        "--rhos",
        nargs="+",
        type=float,
        default=[0.02, 0.05],
        help="the ρ grid: the shipped default and the common choice for fine-tuning (a third value costs ~45 min)",
    )
    parser.add_argument(
        "--select-seeds", nargs="+", type=int, default=[101, 102], help="seeds that choose ρ (not compared on test)"
    )
    parser.add_argument(
        "--select-on",
        default="clean1k",
        help="the setting whose validation accuracy chooses ρ for every setting, or 'each' (default: clean1k)",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[11, 12, 13, 14, 15], help="seeds of the comparison")
    parser.add_argument(
        "--variant",
        default="auto",
        help="the δ-SAM variant beside the shipped one: 'auto' (the fidelity variant closest to per-instance SAM "
        "among those that beat the shipped one with a paired CI above 0, from "
        "docs/results/fidelity.json), a fidelity variant name such as 'exact:-1:raw', method fields such as "
        "'estimator=exact,beta=-1.0', or 'none'",
    )
    parser.add_argument(
        "--no-per-instance",
        dest="per_instance",
        action="store_false",
        help="leave out exact per-instance SAM (mr clean1k, at SAM's chosen ρ; about 3× a SAM run)",
    )
    parser.add_argument("--report", action="store_true", help="only build the tables and plots")
    args = parser.parse_args()
    for setting in args.settings:
        if setting not in SETTINGS:
            parser.error(f"--settings {setting!r} is not a setting; choose from {sorted(SETTINGS)}")
    if args.select_on != "each" and args.select_on not in SETTINGS:
        parser.error(f"--select-on {args.select_on!r} is not valid; choose 'each' or one of {sorted(SETTINGS)}")
    args.variant = parse_variant(args.variant)
    if not args.report:
        run_all(selection_units(args), "generalization")
        units, _ = final_units(args, rows_by_key())
        run_all(units, "generalization")
    text, summary = report(args)
    save("generalization", {"args": vars(args), "table": text, **summary})
    plot(args, RESULTS / "generalization.png")
    plot_differences(summary["differences"], RESULTS / "generalization_differences.png")
    print(text)


if __name__ == "__main__":
    main()
