"""The base recipe, chosen across regimes: candidate optimizer recipes on a suite of short runs, by worst-case regret.

Protocol (MiniLM, ERM, the app's recipe but for the ``optim.*`` fields a candidate sets; rows through
benchmarks/lab/runs.py, shared with the other studies where a configuration is identical):

* suite (:data:`SUITE`, cheapest first): ``mr noisy1k`` (1,000 reviews, 20% of the labels flipped, 5 epochs,
  max length 32), ``r8 2k3ep``, ``mr 2k3ep`` and ``tweets 2k3ep`` (2,000 clean training texts, 3 epochs, max
  length 64), and the main job ``mr full1ep`` (the whole training split, one epoch, max length 48);
* candidates (:data:`CANDIDATES`): the LR grid 5e-5 (the old default), 1e-4, 2e-4, 3e-4; then the levers at
  the higher LRs (layer-wise LR decay, a larger LR for the classifier head, a longer warm-up, more weight
  decay); then ``tune_lr=true`` (``lr_find.rule=minimum``), reported beside the fixed recipes and never chosen;
* selection (seeds 101–102, validation only): a candidate's regret on a setting is the best candidate's mean
  final validation accuracy there minus its own; the recipe chosen has the least worst-case regret over the suite
  (ties: the earlier candidate), once every fixed candidate has both seeds on every setting. The same regret with
  the best-validation checkpoint's accuracy (the curve's maximum, what the CLI's ``test/*`` uses) is reported
  beside it and chooses nothing;
* confirmation (seeds 103–105): the chosen recipe against the old default (5e-5) on every setting, on test
  (the best-validation checkpoint's ``test/acc`` and the final weights'), paired by seed with Student-t 95%
  intervals; then SAM and δ-SAM (the shipped ρ = 0.02 following the LR) at both recipes on ``mr full1ep`` and
  ``mr noisy1k``.

A row whose overrides leave an ``optim.*`` field out ran at :data:`runs.LEGACY_OPTIM` (``optim.lr`` 5e-5), never
at the current default. Resumable: finished runs are rows of docs/results/runs.jsonl and are skipped; the
tables (docs/results/recipe_suite.json) are rewritten after every new row. Run it with one thread so that a core
stays free (at one thread on the shared 2-core machine a run takes about 5–15 minutes: the 28 new runs of the LR
grid about 4–5 hours, the levers about 8 more, the confirmation about 5 more); the same command resumes it:

    git worktree add --detach /work/study HEAD   # a checkout no one edits while the study reads its conf/
    cd /work/study
    OMP_NUM_THREADS=1 nohup /work/main/.venv/bin/python -m benchmarks.recipe >> /tmp/recipe_study.log 2>&1 &
    echo $! > /tmp/recipe_study.pid

(rows land in that checkout's docs/results/runs.jsonl: copy the new lines to the main tree's, then ``--report``.)
    python -m benchmarks.recipe --report   # docs/results/recipe_suite.json and recipe.json from the rows
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from benchmarks.lab.common import RESULTS, save
from benchmarks.lab.runs import LEGACY_LR, TUNE, Method, is_tuned, key, rows_by_key, use_platform
from benchmarks.lab.scheduler import add_study_arguments, phased, save_report, schedule
from benchmarks.lab.stats import t_interval
from lit_deltasam import DeltaSAMConfig

SUITE = (("mr", "noisy1k"), ("r8", "2k3ep"), ("mr", "2k3ep"), ("tweets", "2k3ep"), ("mr", "full1ep"))
SELECT_SEEDS = (101, 102)
CONFIRM_SEEDS = (103, 104, 105)
METHOD_SETTINGS = (("mr", "full1ep"), ("mr", "noisy1k"))


@dataclass(frozen=True)
class Recipe:
    """A candidate: the LR (or :data:`runs.TUNE`) and the other ``optim.*`` fields it sets."""

    lr: float | str
    optim: tuple[tuple[str, float], ...] = ()

    @property
    def label(self) -> str:
        base = f"lr={self.lr:g}" if not is_tuned(self.lr) else f"tune_lr rule={str(self.lr).split(':', 1)[1]}"
        return " ".join([base] + [f"{k}={v:g}" for k, v in self.optim])

    def unit(self, task: str, setting: str, method: Method, seed: int) -> tuple:
        return (task, setting, method, seed, self.lr, self.optim)


OLD = Recipe(LEGACY_LR)
GRID = tuple(Recipe(lr) for lr in (5e-5, 1e-4, 2e-4, 3e-4))
LEVERS = (
    Recipe(2e-4, (("layer_decay", 0.8),)),
    Recipe(5e-5, (("head_lr_mult", 20.0),)),
    Recipe(1e-4, (("head_lr_mult", 10.0), ("layer_decay", 0.8))),
    Recipe(1e-4, (("layer_decay", 0.8),)),
    Recipe(2e-4, (("warmup_ratio", 0.2),)),
    Recipe(2e-4, (("weight_decay", 0.1),)),
)
TUNED = Recipe(f"{TUNE}:minimum")
CANDIDATES = GRID + LEVERS + (TUNED,)
ERM = Method("erm")
SHIPPED = LEVERS[5]
"""The recipe conf/ ships (``optim.lr`` 2e-4, ``optim.weight_decay`` 0.1), chosen post hoc, after the tuning tasks'
rows were in (benchmarks/tuning.py): the least worst-case regret among the candidates within 2 validation points of
the best fixed LR of the grid on both tuning tasks (20 Newsgroups, R52). The pre-declared rule (:func:`choose`)
picked ``lr=1e-4 layer_decay=0.8``, which fell short on those tasks (docs/studies/recipe.md)."""


def shipped(method: str) -> Method:
    d = DeltaSAMConfig()
    return Method(method, d.rho, d.rho_schedule)


def selection_units() -> list[tuple]:
    """The grid on every setting (cheapest first, seed by seed), then the levers, then ``tune_lr``."""
    phases = (GRID, LEVERS, (TUNED,))
    return [r.unit(*s, ERM, seed) for phase in phases for s in SUITE for seed in SELECT_SEEDS for r in phase]


def val_final(row: dict) -> float:
    return row["metrics"]["val/acc"]


def val_best(row: dict) -> float:
    return max(point[1] for point in row["curve"])


def selection(rows: dict[str, dict]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{setting: {candidate: {"seeds", "val", "val_best"}}}``: mean validation accuracies on the selection seeds,
    only where both are done."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, setting in SUITE:
        name = f"{task} {setting}"
        out[name] = {}
        for recipe in CANDIDATES:
            found = [rows.get(key(*recipe.unit(task, setting, ERM, s))) for s in SELECT_SEEDS]
            done = [r for r in found if r is not None]
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in done]}
            if len(done) == len(SELECT_SEEDS):
                entry["val"] = statistics.mean(val_final(r) for r in done)
                entry["val_best"] = statistics.mean(val_best(r) for r in done)
                if is_tuned(recipe.lr):
                    entry["lr"] = [r["metrics"]["tune_lr/lr"] for r in done]
            out[name][recipe.label] = entry
    return out


def lr_sweep(
    rows: dict[str, dict], task: str, setting: str, judged: Callable[[dict], float], seeds: Sequence[int] = SELECT_SEEDS
) -> Optional[dict[str, Any]]:
    """What ``experiment=lr_sweep`` gives a user (post hoc, defined after the selection): the grid's LR with the
    best final validation accuracy on one seed, ``judged`` on another seed's run at that LR (each ordered pair of
    ``seeds``). ``{"picks", "value"}`` (the mean judged value), or ``None`` while a run is missing."""
    picks, values = [], []
    for a, b in itertools.permutations(seeds, 2):
        found = {
            r: (rows.get(key(*r.unit(task, setting, ERM, a))), rows.get(key(*r.unit(task, setting, ERM, b))))
            for r in GRID
        }
        if any(x is None for pair in found.values() for x in pair):
            return None
        pick = max(GRID, key=lambda r: val_final(found[r][0]))  # type: ignore[arg-type]
        picks.append(pick.label)
        values.append(judged(found[pick][1]))  # type: ignore[arg-type]
    return {"picks": picks, "value": statistics.mean(values)}


def regrets(table: dict[str, dict[str, dict[str, Any]]], field: str) -> dict[str, dict[str, float]]:
    """``{candidate: {setting: regret}}`` on the settings where the candidate is done: the best done candidate's
    ``field`` minus its own."""
    out: dict[str, dict[str, float]] = {r.label: {} for r in CANDIDATES}
    for setting, entries in table.items():
        done = {label: e[field] for label, e in entries.items() if field in e}
        for label, value in done.items():
            out[label][setting] = max(done.values()) - value
    return out


def choose(table: dict[str, dict[str, dict[str, Any]]]) -> Optional[str]:
    """The fixed candidate with the least worst-case regret (ties: the earlier), once every fixed candidate is done
    on every setting; ``None`` before."""
    fixed = [r.label for r in CANDIDATES if not is_tuned(r.lr)]
    if any("val" not in table[s][label] for s in table for label in fixed):
        return None
    worst = regrets(table, "val")
    return min(fixed, key=lambda label: max(worst[label].values()))


def chosen_recipe(rows: dict[str, dict]) -> Optional[Recipe]:
    label = choose(selection(rows))
    return next(r for r in CANDIDATES if r.label == label) if label else None


def confirmation_units(rows: dict[str, dict]) -> list[tuple]:
    """Once chosen: the chosen recipe and the old default on every setting (ERM), then SAM and δ-SAM at both on
    :data:`METHOD_SETTINGS`; nothing before."""
    chosen = chosen_recipe(rows)
    if chosen is None:
        return []
    pair = [chosen, OLD] if chosen != OLD else [OLD]
    units = [r.unit(*s, ERM, seed) for s in SUITE for seed in CONFIRM_SEEDS for r in pair]
    methods = [shipped("deltasam"), shipped("sam")]
    units += [r.unit(*s, m, seed) for s in METHOD_SETTINGS for seed in CONFIRM_SEEDS for m in methods for r in pair]
    return units


def main_job_units(_: dict) -> list[tuple]:
    """δ-SAM as shipped at the shipped recipe and the old: the main job as ``make train`` runs it (mr, one epoch),
    then noisy mr."""
    return [r.unit(*p, shipped("deltasam"), s) for p in METHOD_SETTINGS for s in CONFIRM_SEEDS for r in (SHIPPED, OLD)]


def shipped_units(_: dict) -> list[tuple]:
    """The shipped recipe against the old on every setting (ERM, confirmation seeds, cheapest setting first)."""
    return [r.unit(*s, ERM, seed) for s in SUITE for seed in CONFIRM_SEEDS for r in (SHIPPED, OLD)]


def shipped_sam_units(_: dict) -> list[tuple]:
    """SAM as shipped at the shipped recipe and the old on noisy mr, where δ-SAM lost at the shipped recipe."""
    return [r.unit("mr", "noisy1k", shipped("sam"), s) for s in CONFIRM_SEEDS for r in (SHIPPED, OLD)]


REGRESSION = ("mr_rating", "2k3ep")
"""A regime the suite misses: regression (mean ratings of review snippets, ``val/pearson``), 2,000 texts, 3 epochs."""


def regression_units(_: dict) -> list[tuple]:
    """The shipped recipe against the old on :data:`REGRESSION` (ERM, the selection seeds: a check, not a selection)."""
    return [r.unit(*REGRESSION, ERM, seed) for seed in SELECT_SEEDS for r in (SHIPPED, OLD)]


PHASES = (
    lambda _: selection_units(),
    confirmation_units,
    main_job_units,
    shipped_units,
    shipped_sam_units,
    regression_units,
)
"""The study's runs, phase by phase, each from the rows so far (:func:`runs.schedule`)."""


def test_best(row: dict) -> float:
    return row["metrics"]["test/acc"]


def test_final(row: dict) -> float:
    return row["metrics"].get("test_final/acc", row["metrics"]["test/acc"])


def confirmation(rows: dict[str, dict], chosen: Recipe, cases: Optional[list] = None) -> dict[str, Any]:
    """Paired by seed, chosen minus old, per setting and method (``cases``; default: the confirmation's): test
    accuracy of the best-validation checkpoint and of the final weights, with Student-t 95% intervals."""
    out: dict[str, Any] = {}
    if cases is None:
        cases = [(s, ERM) for s in SUITE] + [(s, shipped(m)) for s in METHOD_SETTINGS for m in ("deltasam", "sam")]
    for (task, setting), method in cases:
        pairs = [
            (rows.get(key(*chosen.unit(task, setting, method, s))), rows.get(key(*OLD.unit(task, setting, method, s))))
            for s in CONFIRM_SEEDS
        ]
        done = [(a, b) for a, b in pairs if a is not None and b is not None]
        entry: dict[str, Any] = {"seeds": [a["seed"] for a, _ in done]}
        for name, metric in (("test_best", test_best), ("test_final", test_final)):
            d = [metric(a) - metric(b) for a, b in done]
            entry[name] = {
                "chosen": [metric(a) for a, _ in done],
                "old": [metric(b) for _, b in done],
                "diff": statistics.mean(d) if d else None,
                "ci": list(t_interval(d)) if len(d) > 1 else None,
            }
        out[f"{task} {setting} {method.label}"] = entry
    return out


def suite_report() -> tuple[str, dict[str, Any]]:
    rows = rows_by_key()
    table = selection(rows)
    regret = {field: regrets(table, field) for field in ("val", "val_best")}
    settings = list(table)
    lines = [
        "| candidate | " + " | ".join(settings) + " | worst regret | worst regret (best checkpoint) |",
        "|---|" + "---|" * (len(settings) + 2),
    ]
    for recipe in CANDIDATES:
        label = recipe.label
        cells = [_pct(table[s][label].get("val")) for s in settings]
        worst = [max(regret[f][label].values(), default=None) for f in ("val", "val_best")]
        partial = len(regret["val"][label]) < len(settings)
        lines.append(
            f"| {label} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(_pct(w) + (" (partial)" if partial and w is not None else "") for w in worst)
            + " |"
        )
    sweeps = {f"{t} {s}": lr_sweep(rows, t, s, val_final) for t, s in SUITE}
    for name, sweep in sweeps.items():
        done = [e["val"] for e in table[name].values() if "val" in e]
        if sweep is not None and done:
            sweep["regret"] = max(done) - sweep["value"]
    cells = [_pct(sweeps[s]["value"]) if sweeps[s] else "–" for s in settings]
    worst_sweep = max((sw["regret"] for sw in sweeps.values() if sw and "regret" in sw), default=None)
    sweep_partial = " (partial)" if worst_sweep is not None and any(sweeps[s] is None for s in settings) else ""
    lines.append(
        "| experiment=lr_sweep (post hoc) | " + " | ".join(cells) + f" | {_pct(worst_sweep)}{sweep_partial} | – |"
    )
    label = choose(table)
    out: dict[str, Any] = {"selection": table, "regret": regret, "lr_sweep": sweeps, "chosen": label}
    lines += [
        "",
        "experiment=lr_sweep: the grid's LR with the best final validation accuracy on one selection seed, its "
        "run on the other seed (the mean of both ways round); defined after the selection, chooses nothing",
    ]
    lines += ["", f"chosen (least worst-case regret of final validation accuracy): {label or 'not yet (rows missing)'}"]
    if label:
        chosen = next(r for r in CANDIDATES if r.label == label)
        out["confirmation"] = confirmation(rows, chosen)
        lines += ["", f"| setting, method | seeds | test (best ckpt): {label} − lr=5e-05, 95% CI | test (final) |"]
        lines += ["|---|---|---|---|"]
        for case, e in out["confirmation"].items():
            lines.append(f"| {case} | {len(e['seeds'])} | {_diff(e['test_best'])} | {_diff(e['test_final'])} |")
    out["shipped"] = SHIPPED.label
    out["main_job"] = confirmation(
        rows,
        SHIPPED,
        [(p, shipped("deltasam")) for p in METHOD_SETTINGS]
        + [(("mr", "noisy1k"), shipped("sam"))]
        + [(setting, ERM) for setting in SUITE],
    )
    lines += ["", f"shipped (post hoc, after the tuning tasks): {SHIPPED.label}"]
    lines += ["", f"| setting, method | seeds | test (best ckpt): {SHIPPED.label} − lr=5e-05 | test (final) |"]
    lines += ["|---|---|---|---|"]
    for case, e in out["main_job"].items():
        lines.append(f"| {case} | {len(e['seeds'])} | {_diff(e['test_best'])} | {_diff(e['test_final'])} |")
    regression = regression_check(rows)
    out["regression"] = regression
    lines += ["", f"| {' '.join(REGRESSION)}, ERM | seeds | val pearson: {SHIPPED.label} | lr=5e-05 | difference |"]
    lines += ["|---|---|---|---|---|"]
    lines.append(
        f"| final weights | {len(regression['seeds'])} | {_num(regression.get('shipped'))} | "
        f"{_num(regression.get('old'))} | {_num(regression.get('diff'), sign=True)} |"
    )
    return "\n".join(lines), out


def regression_check(rows: dict[str, dict]) -> dict[str, Any]:
    """Mean final ``val/pearson`` of the shipped and the old recipe on :data:`REGRESSION`, over the seeds with both."""
    pairs = [
        (rows.get(key(*SHIPPED.unit(*REGRESSION, ERM, s))), rows.get(key(*OLD.unit(*REGRESSION, ERM, s))))
        for s in SELECT_SEEDS
    ]
    done = [(a, b) for a, b in pairs if a is not None and b is not None]
    out: dict[str, Any] = {"seeds": [a["seed"] for a, _ in done]}
    if done:
        out["shipped"] = statistics.mean(a["metrics"]["val/pearson"] for a, _ in done)
        out["old"] = statistics.mean(b["metrics"]["val/pearson"] for _, b in done)
        out["diff"] = out["shipped"] - out["old"]
        out["per_seed"] = [a["metrics"]["val/pearson"] - b["metrics"]["val/pearson"] for a, b in done]
    return out


def _num(value: Optional[float], sign: bool = False) -> str:
    return "–" if value is None else (f"{value:+.4f}" if sign else f"{value:.4f}")


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _diff(entry: dict[str, Any]) -> str:
    if entry["diff"] is None:
        return "–"
    ci = entry["ci"]
    return f"{100 * entry['diff']:+.2f}" + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci else "")


# The earlier study (r8 and noisy mr, ERM at fixed LRs against tune_lr): docs/results/recipe.json.
EARLY_SETTINGS = (("r8", "2k3ep"), ("mr", "noisy1k"))
EARLY_ARGS = {"lrs": [5e-5, 1e-4, 2e-4], "seeds": [101, 102], "report": True}


def deltasam() -> Method:
    return shipped("deltasam")


def arms(task: str, lrs: list[float]) -> list[tuple[str, Method, float | str]]:
    """Every arm on r8; on mr, whose fixed-LR δ-SAM runs are the regimes study's, ERM's only."""
    out: list[tuple[str, Method, float | str]] = [(f"erm lr={lr:g}", ERM, lr) for lr in lrs]
    out += [("erm tune_lr rule=minimum", ERM, f"{TUNE}:minimum")]
    out += [("erm tune_lr rule=steepest", ERM, f"{TUNE}:steepest")]
    if task == "r8":
        out += [(f"deltasam lr={LEGACY_LR:g}", deltasam(), LEGACY_LR)]
        out += [("deltasam tune_lr rule=minimum", deltasam(), f"{TUNE}:minimum")]
    return out


def report(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    rows = rows_by_key()
    table: dict[str, dict[str, Any]] = {}
    lines = [
        "| setting | arm | LR (per seed) | val acc (final) | test acc (final) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for task, setting in EARLY_SETTINGS:
        name = f"{task} {setting}"
        table[name] = {}
        for label, method, lr in arms(task, args.lrs):
            found = [rows.get(key(task, setting, method, seed, lr)) for seed in args.seeds]
            done = [r for r in found if r is not None]
            entry: dict[str, Any] = {"seeds": [r["seed"] for r in done]}
            if done:
                m = [r["metrics"] for r in done]
                entry["lr"] = [x.get("tune_lr/lr", lr) for x in m]
                entry["val_acc"] = statistics.mean(x["val/acc"] for x in m)
                entry["test_acc"] = statistics.mean(x.get("test_final/acc", x["test/acc"]) for x in m)
                entry["stalled"] = sum(bool(r["stalled"]) for r in done)
            table[name][label] = entry
            lrs = ", ".join(f"{x:.2g}" for x in entry.get("lr", []))
            lines.append(
                f"| {name} | {label} | {lrs or '–'} | {_pct(entry.get('val_acc'))} | "
                f"{_pct(entry.get('test_acc'))} | {len(done)}/{len(args.seeds)} |"
            )
        fixed = {a: e for a, e in table[name].items() if a.startswith("erm lr=") and len(e["seeds"]) == len(args.seeds)}
        table[name]["best fixed LR on validation"] = max(fixed, key=lambda a: fixed[a]["val_acc"]) if fixed else None
    text = "\n".join(lines)
    return text, {"settings": table}


def write_reports(platform: str = "cpu") -> str:
    text, summary = suite_report()
    save_report("recipe_suite", "recipe", platform, text, summary)
    if platform == "cpu":
        early, early_summary = report(argparse.Namespace(**EARLY_ARGS))
        saved = RESULTS / "recipe.json"
        if not saved.exists() or json.loads(saved.read_text())["table"] != early:
            save("recipe", {"args": EARLY_ARGS, "table": early, **early_summary})
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only build the JSONs and the table")
    add_study_arguments(parser)
    parser.add_argument(
        "--phase",
        type=int,
        action="append",
        choices=range(1, len(PHASES) + 1),
        help="run only these phases (1 selection, 2 confirmation, 3 δ-SAM at the shipped recipe: the main job, "
        "noisy mr; 4 the shipped recipe's ERM confirmation; 5 SAM at the shipped recipe on noisy mr; 6 the shipped "
        "recipe on a regression task); default all",
    )
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    phases = [PHASES[i - 1] for i in args.phase] if args.phase else PHASES
    if not args.report:

        def tables(_: dict) -> None:
            try:
                write_reports(args.platform)
            except Exception as error:  # the rows are written; the tables can be rebuilt with --report
                print(f"[recipe] tables not rewritten ({error!r}); python -m benchmarks.recipe --report rebuilds them")

        schedule(phased(phases), "recipe", args.jobs, args.deadline, tables)
    print(write_reports(args.platform))


if __name__ == "__main__":
    main()
