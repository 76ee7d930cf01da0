"""The base recipe on a short many-class run: fixed learning rates against Lightning's LR range test (``tune_lr``).

Protocol (MiniLM, the app's recipe but for the learning rate; rows through benchmarks/runs.py,
shared with the regimes study where a configuration is identical):

* settings: ``r8 2k3ep`` (Reuters R8, 8 topics: 2,000 training texts, 3 epochs, max length
  64; validation is the held-out 10% of train, test the official split) and ``mr noisy1k``
  (the regimes study's headline setting: 1,000 movie reviews, 20% of the labels flipped,
  5 epochs, max length 32), whose fixed-LR ERM rows are the regimes study's step 0;
* arms: ERM at each LR of ``--lrs`` and ERM with ``tune_lr=true``, with ``lr_find.rule=minimum``
  (the default) and with ``lr_find.rule=steepest`` (Lightning's rule); on r8 also δ-SAM as shipped
  (5e-5) and δ-SAM with ``tune_lr=true`` (the range test runs on an ERM copy; δ-SAM trains
  at its LR);
* seeds: ``--seeds`` (the regimes study's selection seeds), on validation: the recipe is
  chosen on mean final validation accuracy; test accuracy (final weights) is reported beside
  it and chooses nothing.

Resumable: finished runs are rows of docs/results/runs.jsonl and are skipped.

    python benchmarks/recipe.py            # the runs (about 40 min of CPU), then the table
    python benchmarks/recipe.py --report   # docs/results/recipe.json from the rows
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any, Optional

from common import save
from runs import TUNE, Method, key, rows_by_key, run_all

from lit_deltasam import DeltaSAMConfig
from lit_deltasam.app.schema import OptimSchema

SETTINGS = (("r8", "2k3ep"), ("mr", "noisy1k"))
SHIPPED_LR = OptimSchema().lr


def deltasam() -> Method:
    d = DeltaSAMConfig()
    return Method("deltasam", d.rho, d.rho_schedule)


def arms(task: str, lrs: list[float]) -> list[tuple[str, Method, float | str]]:
    """Every arm on r8; on mr, whose fixed-LR δ-SAM runs are the regimes study's, ERM's only."""
    out: list[tuple[str, Method, float | str]] = [(f"erm lr={lr:g}", Method("erm"), lr) for lr in lrs]
    out += [("erm tune_lr rule=minimum", Method("erm"), f"{TUNE}:minimum")]
    out += [("erm tune_lr rule=steepest", Method("erm"), f"{TUNE}:steepest")]
    if task == "r8":
        out += [(f"deltasam lr={SHIPPED_LR:g}", deltasam(), SHIPPED_LR)]
        out += [("deltasam tune_lr rule=minimum", deltasam(), f"{TUNE}:minimum")]
    return out


def units(args: argparse.Namespace) -> list[tuple]:
    """ERM's arms seed by seed first (they choose the recipe), then δ-SAM's."""
    every = [
        (task, setting, method, seed, lr)
        for seed in args.seeds
        for task, setting in SETTINGS
        for _, method, lr in arms(task, args.lrs)
    ]
    return sorted(every, key=lambda unit: unit[2].method != "erm")


def report(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    rows = rows_by_key()
    table: dict[str, dict[str, Any]] = {}
    lines = [
        "| setting | arm | LR (per seed) | val acc (final) | test acc (final) | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for task, setting in SETTINGS:
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


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1e-4, 2e-4], help="the fixed LRs")
    parser.add_argument("--seeds", nargs="+", type=int, default=[101, 102], help="seeds (validation only)")
    parser.add_argument("--report", action="store_true", help="only build the JSON and the table")
    args = parser.parse_args()
    if not args.report:
        for _ in run_all(units(args), "recipe"):
            pass
    text, summary = report(args)
    save("recipe", {"args": vars(args), "table": text, **summary})
    print(text)


if __name__ == "__main__":
    main()
