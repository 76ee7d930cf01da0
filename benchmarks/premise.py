"""δ-SAM's premise, tested directly: do exact per-instance perturbations (per-instance SAM, m = 1) beat SAM here?

Protocol (MiniLM, the regimes study's setting 1 and its tweets repeat: 1,000 training texts, 20% of the labels
flipped, 5 epochs, max length 32, ERM's LR 5e-5 as that study chose in both; rows through benchmarks/lab/runs.py):

* selection (seeds 101–102, final validation accuracy): per-instance SAM at ρ ∈ :data:`RADII` (the regimes study's
  ρ 0.02 stalled on 3 of 5 seeds), beside SAM at the regimes study's ρ 0.05 and ERM; the radius with the higher
  mean is per-instance SAM's; it *beats SAM* in a setting when its mean is above SAM's there;
* comparison (seeds 11–18), only in a setting where it beats SAM: per-instance SAM at its radius, SAM at ρ 0.05,
  SAM at per-instance's radius (the equal-radius reference, declared here before any run) and ERM; paired by seed,
  Student-t 95% intervals, wins/ties/losses, Holm-adjusted p over every difference of the table: per-instance
  (final weights) − SAM, − SAM at the same radius, − ERM's best-validation checkpoint (early-stopped ERM), and
  best-validation checkpoint against early-stopped ERM;
* never chosen on test; no seed dropped.

Resumable through the platform's store (benchmarks/lab/runs.py); on a GPU with ``--platform gpu --jobs N``.

    python -m benchmarks.premise                      # the protocol on this machine
    python -m benchmarks.premise --report             # docs/results/premise.json (premise_gpu.json for the GPU)
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Optional

from benchmarks.lab.runs import Method, key, rows_by_key, use_platform
from benchmarks.lab.scheduler import add_study_arguments, phased, save_report, schedule
from benchmarks.lab.stats import holm, paired
from lit_deltasam import DeltaSAMConfig

PLACES = {"mr, 20% noise": ("mr", "noisy1k"), "tweets, 20% noise": ("tweets", "noisy1k")}
RADII = (0.005, 0.01)
SAM_RHO = 0.05
SELECT_SEEDS = (101, 102)
SEEDS = tuple(range(11, 19))


def method(name: str, rho: Optional[float] = None) -> Method:
    return Method("erm") if name == "erm" else Method(name, rho, DeltaSAMConfig().rho_schedule)


ERM, SAM = method("erm"), method("sam", SAM_RHO)


def candidates() -> list[Method]:
    return [method("per_instance", rho) for rho in RADII]


def _mean_val(rows: dict, place: tuple[str, str], m: Method, seeds: tuple[int, ...]) -> Optional[float]:
    found = [rows.get(key(*place, m, s)) for s in seeds]
    return None if any(r is None for r in found) else statistics.mean(r["metrics"]["val/acc"] for r in found)


def selection_units(_: dict) -> list[tuple]:
    return [(*place, m, s) for place in PLACES.values() for s in SELECT_SEEDS for m in [*candidates(), SAM, ERM]]


def chosen(rows: dict, place: tuple[str, str]) -> Optional[dict[str, Any]]:
    """Per-instance SAM's radius in ``place`` and whether it beats SAM on validation; ``None`` before the rows."""
    vals = {m: _mean_val(rows, place, m, SELECT_SEEDS) for m in [*candidates(), SAM]}
    if any(v is None for v in vals.values()):
        return None
    best = max(candidates(), key=lambda m: vals[m])  # ties: the smaller radius
    beats = vals[best] > vals[SAM]
    return {"method": best, "rho": best.rho, "val": vals[best], "sam_val": vals[SAM], "beats_sam": beats}


def arms(choice: dict[str, Any]) -> dict[str, Method]:
    return {
        "per-instance": choice["method"],
        "sam": SAM,
        "sam at per-instance's ρ": method("sam", choice["rho"]),
        "erm": ERM,
    }


def comparison_units(rows: dict) -> list[tuple]:
    out = []
    for place in PLACES.values():
        choice = chosen(rows, place)
        if choice is not None and choice["beats_sam"]:
            out += [(*place, m, s) for s in SEEDS for m in arms(choice).values()]
    return out


PHASES = (selection_units, comparison_units)
"""The study's runs, phase by phase, each from the rows so far (:func:`runs.schedule`)."""


def report() -> tuple[str, dict[str, Any]]:
    rows = rows_by_key()
    lines = ["| setting | arm | val acc per seed (101, 102) | mean | stalled |", "|---|---|---|---|---|"]
    out: dict[str, Any] = {"selection": {}, "comparison": {}}
    differences: list[tuple[str, str, dict[str, Any]]] = []
    for name, place in PLACES.items():
        entries = {}
        for m in [*candidates(), SAM, ERM]:
            found = [rows.get(key(*place, m, s)) for s in SELECT_SEEDS]
            done = [r for r in found if r is not None]
            vals = [r["metrics"]["val/acc"] for r in done]
            entries[m.label] = {"val": vals, "stalled": sum(r["stalled"] for r in done)}
            mean = f"{100 * statistics.mean(vals):.2f}" if len(vals) == len(SELECT_SEEDS) else "–"
            per_seed = ", ".join(f"{100 * v:.2f}" for v in vals) or "–"
            lines.append(f"| {name} | {m.label} | {per_seed} | {mean} | {entries[m.label]['stalled']} |")
        choice = chosen(rows, place)
        out["selection"][name] = {
            "arms": entries,
            **({k: v for k, v in choice.items() if k != "method"} if choice else {}),
        }
        if choice is None or not choice["beats_sam"]:
            continue
        found = {arm: [rows.get(key(*place, m, s)) for s in SEEDS] for arm, m in arms(choice).items()}
        seeds = [i for i in range(len(SEEDS)) if all(found[arm][i] is not None for arm in found)]
        if len(seeds) < 2:
            continue
        pick = {arm: [found[arm][i] for i in seeds] for arm in found}
        final = {arm: [r["metrics"]["test_final/acc"] for r in rs] for arm, rs in pick.items()}
        best = {arm: [r["metrics"]["test/acc"] for r in rs] for arm, rs in pick.items()}
        out["comparison"][name] = {
            "seeds": [SEEDS[i] for i in seeds],
            "test_final": final,
            "test_best": best,
            "stalled": {arm: sum(r["stalled"] for r in rs) for arm, rs in pick.items()},
        }
        pi = final["per-instance"]
        for label, other in (
            ("final − sam (final)", final["sam"]),
            ("final − sam at the same ρ (final)", final["sam at per-instance's ρ"]),
            ("final − early-stopped erm", best["erm"]),
            ("best-val − early-stopped erm", None),
        ):
            mine = best["per-instance"] if other is None else pi
            other = best["erm"] if other is None else other
            differences.append((name, label, paired([a - b for a, b in zip(mine, other)])))
    adjusted = holm([d["p"] for _, _, d in differences]) if differences else []
    table = ["| setting | per-instance SAM − … | seeds | mean [95% CI] | W/T/L | p (Holm) |", "|---" * 6 + "|"]
    for (name, label, d), p_holm in zip(differences, adjusted):
        d["p_holm"] = p_holm
        lo, hi = d["ci"]
        table.append(
            f"| {name} | {label} | {d['n']} | {100 * d['mean']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] | "
            f"{d['wins']}/{d['ties']}/{d['losses']} | {p_holm:.3f} |"
        )
        out["comparison"][name].setdefault("differences", {})[label] = d
    text = "**Selection** (final validation accuracy)\n\n" + "\n".join(lines)
    if differences:
        text += "\n\n**Comparison** (test accuracy, paired by seed)\n\n" + "\n".join(table)
    return text, out


def write_reports(platform: str = "cpu") -> str:
    text, summary = report()
    return save_report("premise", "premise", platform, text, summary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", action="store_true", help="only build the JSON and the table")
    add_study_arguments(parser)
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    if not args.report:
        schedule(phased(PHASES), "premise", args.jobs, args.deadline)
    print(write_reports(args.platform))


if __name__ == "__main__":
    main()
