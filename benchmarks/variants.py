"""The variants study (issue 48): does a member of the SAM family, or δ-SAM, beat SAM, and does any beat
early-stopped ERM? Secondary: is δ-GSAM or δ-Friendly-SAM ahead of every single method?

The protocol, committed before the first run, is ``docs/studies/variants-protocol.md``; this module is its runner
and its report, nothing more. MiniLM on noisy mr (the CPU plan; noisy tweets too on the GPU), 1,000 training texts,
20% of the labels flipped, 5 epochs, max length 32, AdamW 5e-5 (``runs.LEGACY_OPTIM``), every sharpness-aware arm
at ``rho_schedule=follow_lr``:

* selection (seeds 201–203): each sharpness-aware arm at ρ ∈ :data:`RADII`, ERM once; an arm's ρ is the one with
  the higher mean final validation accuracy (a tie: the smaller ρ);
* comparison (seeds 21–25 on the CPU, 21–28 on the GPU): every arm at its selected ρ, and ERM; paired test
  differences by seed, Student-t 95% intervals, W/T/L, Holm over the declared families (:data:`PRIMARY`,
  :data:`SECONDARY`).

An arm's comparison runs start as soon as its own selection is complete (the protocol fixes what runs, not the
order). Resumable through the platform's store; ``--arms`` runs a subset of the arms (the others' rows are kept
and reported).

    nice -n 5 python -m benchmarks.variants --platform cpu
    python -m benchmarks.variants --platform cpu --report     # docs/results/variants.json
    python -m benchmarks.variants --platform gpu --jobs 4     # the GPU plan
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Optional

from benchmarks.lab.runs import Method, key, platform_name, rows_by_key, use_platform
from benchmarks.lab.scheduler import add_study_arguments, save_report, schedule
from benchmarks.lab.stats import holm, paired

SETTING = "noisy1k"
TASKS = {"cpu": ("mr",), "gpu": ("mr", "tweets")}
RADII = (0.02, 0.05)
SCHEDULE = "follow_lr"
SELECT_SEEDS = (201, 202, 203)
SEEDS = {"cpu": tuple(range(21, 26)), "gpu": tuple(range(21, 29))}

_DELTA = (("beta", -0.5), ("estimator", "head"))
ARMS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "sam": ("sam", ()),
    "gsam": ("gsam", (("gsam_alpha", 0.4),)),
    "wsam": ("wsam", (("wsam_gamma", 0.9),)),
    "fsam": ("fsam", (("fsam_sigma", 1.0), ("fsam_lambda", 0.9))),
    "ae-sam": ("sam", (("policy", "adaptive"),)),
    "δ-sam": ("deltasam", ()),  # the shipped δ-SAM: head estimator, β −0.5
    "δ-gsam": ("gsam", (("gsam_alpha", 0.4), *_DELTA)),
    "δ-fsam": ("fsam", (("fsam_sigma", 1.0), ("fsam_lambda", 0.9), *_DELTA)),
}
"""The sharpness-aware arms, in the order their runs are scheduled (the family first: δ-SAM has rows in four
studies already); ERM is the ninth arm, read twice."""
SINGLE = ("sam", "δ-sam", "gsam", "wsam", "fsam", "ae-sam")
COMBINED = ("δ-gsam", "δ-fsam")
ERM = Method("erm")
FULL = "sam/full_fraction"

PRIMARY = [(arm, "sam") for arm in ("gsam", "wsam", "fsam", "ae-sam", "δ-sam")] + [(arm, "erm") for arm in SINGLE]
"""The primary Holm family, per task: (arm, baseline); ``erm`` is early-stopped ERM (its best-validation
checkpoint), every sharpness-aware arm is read at its final weights."""
SECONDARY = [(arm, other) for arm in COMBINED for other in SINGLE]
"""The secondary (moonshot) family, per task: each combination against each single method."""


def arm_method(arm: str, rho: float) -> Method:
    name, extra = ARMS[arm]
    return Method(name, rho, SCHEDULE, extra=extra)


def _rows(rows: dict, task: str, m: Method, seeds: tuple[int, ...]) -> list[Optional[dict]]:
    return [rows.get(key(task, SETTING, m, s)) for s in seeds]


def selected(rows: dict, task: str, arm: str) -> Optional[float]:
    """The arm's ρ on ``task``: the higher mean final validation accuracy over the selection seeds (a tie: the
    smaller ρ); ``None`` until every selection run of the arm is in."""
    means = {}
    for rho in RADII:
        found = _rows(rows, task, arm_method(arm, rho), SELECT_SEEDS)
        if any(r is None for r in found):
            return None
        means[rho] = statistics.mean(r["metrics"]["val/acc"] for r in found if r is not None)
    return max(RADII, key=lambda rho: (means[rho], -rho))


def _tasks() -> tuple[str, ...]:
    return TASKS[platform_name()]


def _seeds() -> tuple[int, ...]:
    return SEEDS[platform_name()]


def units(arms: tuple[str, ...]) -> Any:
    """The study's plan for :func:`schedule`: ERM's selection runs, then per arm its selection runs and, once its ρ
    is chosen, its comparison runs; ERM's comparison runs last."""

    def plan(rows: dict) -> list[tuple]:
        out: list[tuple] = []
        for task in _tasks():
            out += [(task, SETTING, ERM, s) for s in SELECT_SEEDS]
            for arm in arms:
                out += [(task, SETTING, arm_method(arm, rho), s) for rho in RADII for s in SELECT_SEEDS]
            for arm in arms:
                rho = selected(rows, task, arm)
                out += [] if rho is None else [(task, SETTING, arm_method(arm, rho), s) for s in _seeds()]
            out += [(task, SETTING, ERM, s) for s in _seeds()]
        return out

    return plan


def _selection(rows: dict, task: str) -> tuple[list[str], dict[str, Any]]:
    lines = []
    out: dict[str, Any] = {}
    for arm, rho, m in [("erm", None, ERM)] + [(a, r, arm_method(a, r)) for a in ARMS for r in RADII]:
        found = _rows(rows, task, m, SELECT_SEEDS)
        done = [r for r in found if r is not None]
        vals = [r["metrics"]["val/acc"] for r in done]
        label = arm if rho is None else f"{arm} ρ={rho:g}"
        out[label] = {"val": vals, "stalled": sum(r["stalled"] for r in done), "time_s": [r["time_s"] for r in done]}
        mean = f"{100 * statistics.mean(vals):.2f}" if len(vals) == len(SELECT_SEEDS) else "–"
        per_seed = ", ".join("–" if r is None else f"{100 * r['metrics']['val/acc']:.2f}" for r in found)
        lines.append(f"| {task} | {label} | {per_seed} | {mean} | {out[label]['stalled']} |")
    return lines, out


def _comparison(rows: dict, task: str, chosen: dict[str, Optional[float]]) -> dict[str, Any]:
    """Per arm with its ρ chosen: the comparison rows by seed (``None`` where missing)."""
    found = {"erm": _rows(rows, task, ERM, _seeds())}
    for arm, rho in chosen.items():
        if rho is not None:
            found[arm] = _rows(rows, task, arm_method(arm, rho), _seeds())
    return found


def _difference(found: dict[str, list], arm: str, other: str) -> Optional[dict[str, Any]]:
    if arm not in found or other not in found:
        return None
    seeds = _seeds()
    pairs = [(a, b, s) for a, b, s in zip(found[arm], found[other], seeds) if a is not None and b is not None]
    if len(pairs) < 2:
        return None
    base = "test/acc" if other == "erm" else "test_final/acc"
    d = paired([a["metrics"]["test_final/acc"] - b["metrics"][base] for a, b, _ in pairs])
    return {**d, "seeds": [s for _, _, s in pairs]}


def _family(found: dict[str, list], tests: list[tuple[str, str]], task: str) -> list[tuple[str, str, str, dict]]:
    return [(task, a, b, d) for a, b in tests if (d := _difference(found, a, b)) is not None]


def _table(family: list[tuple[str, str, str, dict]], declared: int) -> list[str]:
    adjusted = holm([d["p"] for *_, d in family] + [1.0] * (declared - len(family))) if family else []
    lines = ["| task | difference | seeds | mean [95% CI] (points) | W/T/L | p | p (Holm) |", "|---" * 7 + "|"]
    for (task, a, b, d), p_holm in zip(family, adjusted):
        d["p_holm"] = p_holm
        lo, hi = d["ci"]
        other = "early-stopped erm" if b == "erm" else b
        lines.append(
            f"| {task} | {a} − {other} | {d['n']} | {100 * d['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
            f"{d['wins']}/{d['ties']}/{d['losses']} | {d['p']:.3f} | {p_holm:.3f} |"
        )
    return lines


def report() -> tuple[str, dict[str, Any]]:
    rows = rows_by_key()
    out: dict[str, Any] = {"selection": {}, "chosen": {}, "comparison": {}, "descriptive": {}}
    select = ["| task | arm | val acc per seed (201, 202, 203) | mean | stalled |", "|---|---|---|---|---|"]
    primary: list[tuple[str, str, str, dict]] = []
    secondary: list[tuple[str, str, str, dict]] = []
    for task in _tasks():
        lines, out["selection"][task] = _selection(rows, task)
        select += lines
        chosen = out["chosen"][task] = {arm: selected(rows, task, arm) for arm in ARMS}
        found = _comparison(rows, task, chosen)
        primary += _family(found, PRIMARY, task)
        secondary += _family(found, SECONDARY, task)
        out["comparison"][task] = {
            arm: {
                "seeds": [s for s, r in zip(_seeds(), rs) if r is not None],
                "test_final": [r["metrics"]["test_final/acc"] for r in rs if r is not None],
                "test_best": [r["metrics"]["test/acc"] for r in rs if r is not None],
                "stalled": sum(r["stalled"] for r in rs if r is not None),
                "time_s": [r["time_s"] for r in rs if r is not None],
                "full_fraction": [
                    r["metrics"]["sam/full_fraction"]
                    for r in rs
                    if r is not None and "sam/full_fraction" in r["metrics"]
                ],
            }
            for arm, rs in found.items()
        }
        out["descriptive"][task] = {
            f"{arm} − final erm": d for arm in SINGLE + COMBINED if (d := _final_erm(found, arm)) is not None
        }
    n_tasks = len(_tasks())
    out["status"] = status = _status(rows)
    text = (
        f"**Status**: {status['selection']} of {status['selection_planned']} selection runs and "
        f"{status['comparison']} of {status['comparison_planned']} comparison runs in.\n\n"
    )
    text += "**Selection** (final validation accuracy)\n\n" + "\n".join(select)
    chosen_line = "; ".join(
        f"{task}: "
        + ", ".join(f"{arm} {'–' if rho is None else f'{rho:g}'}" for arm, rho in out["chosen"][task].items())
        for task in _tasks()
    )
    text += "\n\n**Selected ρ**" + (" (– : selection not complete)" if "–" in chosen_line else "") + f": {chosen_line}"
    out["declared"] = {"primary": len(PRIMARY) * n_tasks, "secondary": len(SECONDARY) * n_tasks}
    full = {
        name: sum(d["n"] == len(_seeds()) for *_, d in family)
        for name, family in (("primary", primary), ("secondary", secondary))
    }
    out["complete"] = {k: full[k] == v for k, v in out["declared"].items()}
    for name, family in (("primary", primary), ("secondary", secondary)):
        table = _table(family, out["declared"][name])  # writes each test's Holm p first
        out[name] = [_entry(t) for t in family]
        if family:
            partial = len(family) - full[name]
            text += (
                f"\n\n**{name.capitalize()} family** ({full[name]} of {out['declared'][name]} declared tests on all "
            )
            text += f"{len(_seeds())} seeds" + (f", {partial} on fewer, interim" if partial else "")
            untested = len(family) < out["declared"][name]
            text += ("; untested ones count at p = 1 in Holm" if untested else "") + ")\n\n" + "\n".join(table)
    return text, out


def _status(rows: dict) -> dict[str, int]:
    """How many of the plan's runs are in: the selection's (ERM and every arm at every radius) and the comparison's
    (every arm at its chosen ρ, when chosen, and ERM)."""
    selection = comparison = 0
    for task in _tasks():
        units = [(ERM, s) for s in SELECT_SEEDS]
        units += [(arm_method(a, r), s) for a in ARMS for r in RADII for s in SELECT_SEEDS]
        selection += sum(rows.get(key(task, SETTING, m, s)) is not None for m, s in units)
        chosen = [(arm_method(a, r)) for a in ARMS if (r := selected(rows, task, a)) is not None] + [ERM]
        comparison += sum(rows.get(key(task, SETTING, m, s)) is not None for m in chosen for s in _seeds())
    n = len(_tasks())
    return {
        "selection": selection,
        "selection_planned": n * len(SELECT_SEEDS) * (1 + len(ARMS) * len(RADII)),
        "comparison": comparison,
        "comparison_planned": n * len(_seeds()) * (1 + len(ARMS)),
    }


def _final_erm(found: dict[str, list], arm: str) -> Optional[dict[str, Any]]:
    if arm not in found:
        return None
    pairs = [(a, b) for a, b in zip(found[arm], found["erm"]) if a is not None and b is not None]
    if len(pairs) < 2:
        return None
    return paired([a["metrics"]["test_final/acc"] - b["metrics"]["test_final/acc"] for a, b in pairs])


def _entry(t: tuple[str, str, str, dict]) -> dict[str, Any]:
    task, a, b, d = t
    return {"task": task, "arm": a, "baseline": "early-stopped erm" if b == "erm" else b, **d}


def write_reports(platform: str = "cpu") -> str:
    text, summary = report()
    return save_report("variants", "variants", platform, text, summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only build the JSON and the tables")
    parser.add_argument(
        "--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="the sharpness-aware arms to run (ERM always)"
    )
    add_study_arguments(parser)
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    if not args.report:
        schedule(units(tuple(a for a in ARMS if a in args.arms)), "variants", args.jobs, args.deadline)
    print(write_reports(args.platform))


if __name__ == "__main__":
    main()
