"""Where a study's table comes from: the commits, trees and machines of the rows it reads.

Rows written since this module record ``commit``, ``dirty`` and ``machine`` (:data:`benchmarks.lab.common.PROVENANCE`).
Older rows are read honestly: ``commit`` as they wrote it (rows from ``f9fd7cd`` on; a ``+dirty`` suffix meant that
``lit_deltasam/`` differed from that commit), ``unknown`` before; the machine from ``device`` where a row has it,
else the store's platform (the CPU store's rows ran on this project's 2-core CPU machine).

    python -m benchmarks.lab.provenance          # writes each study JSON's "provenance" from its rows
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from benchmarks.lab import runs
from benchmarks.lab.common import RESULTS


def _studies() -> dict[str, tuple[str, Callable[[dict[str, Any]], Any]]]:
    from benchmarks import generalization, premise, recipe, regimes, robust_defaults, tuning, variants

    return {
        "regimes": ("cpu", lambda s: regimes.report(SimpleNamespace(**s["args"]))),
        "generalization": ("cpu", lambda s: generalization.report(SimpleNamespace(**s["args"]))),
        "robust_defaults": ("cpu", lambda s: robust_defaults.report(SimpleNamespace(**s["args"]))),
        "recipe": ("cpu", lambda s: recipe.report(SimpleNamespace(**s["args"]))),
        "recipe_suite": ("cpu", lambda s: recipe.suite_report()),
        "recipe_suite_gpu": ("gpu", lambda s: recipe.suite_report()),
        "premise_gpu": ("gpu", lambda s: premise.report()),
        "tuning_gpu": ("gpu", lambda s: tuning.report()),
        "variants": ("cpu", lambda s: variants.report()),
    }


def of_row(row: dict[str, Any], platform: str) -> tuple[str, str, str]:
    """``(commit, dirty, machine)`` of one row, each ``unknown`` where the row cannot say."""
    written = row.get("commit")
    commit = "unknown" if written is None else written.removesuffix("+dirty")
    if "dirty" in row:
        dirty = {True: "dirty", False: "clean", None: "unknown"}[row["dirty"]]
    else:
        dirty = "unknown" if written is None else "dirty" if written.endswith("+dirty") else "clean"
    machine = row.get("machine") or row.get("device")
    if machine is None:
        machine = "cpu" if platform == "cpu" else "unknown"
    return commit, dirty, machine


def summarize(rows: list[dict[str, Any]], platform: str) -> dict[str, Any]:
    unique = list({id(r): r for r in rows}.values())
    seen = [of_row(r, platform) for r in unique]
    dirty = [
        f"{r.get('task')} {r.get('setting')} {r.get('method')} seed {r.get('seed')} ({c})"
        for r, (c, d, _) in zip(unique, seen)
        if d == "dirty"
    ]
    return {
        "rows": len(unique),
        "commits": dict(sorted(Counter(c for c, _, _ in seen).items(), key=lambda kv: (-kv[1], kv[0]))),
        "machines": dict(Counter(m for _, _, m in seen).most_common()),
        "trees": dict(Counter(d for _, d, _ in seen).most_common()),
        "dirty_rows": sorted(dirty),
    }


def rows(name: str) -> list[dict[str, Any]]:
    """The rows a study's report reads, each once, in the order it first reads them."""
    platform, call = _studies()[name]
    saved = json.loads((RESULTS / f"{name}.json").read_text())
    runs.use_platform(platform)
    runs.Rows.read = []
    try:
        call(saved)
    finally:
        runs.use_platform("cpu")
    return list({id(r): r for r in runs.Rows.read}.values())


def compute(name: str) -> dict[str, Any]:
    return summarize(rows(name), _studies()[name][0])


def render(p: dict[str, Any]) -> str:
    """The line under a table: how many rows, from which commits, trees and machines; a dirty-tree row by name."""
    commits = ", ".join(f"{c} ×{n}" for c, n in p["commits"].items())
    machines = ", ".join(f"{m} ×{n}" for m, n in p["machines"].items())
    trees = ", ".join(f"{d} ×{n}" for d, n in p["trees"].items())
    if len(p["commits"]) == 1:
        text = f"**Provenance.** {p['rows']} rows, all at commit {commits}."
    else:
        text = (
            f"**Provenance.** {p['rows']} rows, reused across {len(p['commits'])} code commits (a row is keyed by its "
            f"configuration, not its commit, on the assumption that no commit between changed what it computes): "
            f"{commits}."
        )
    text += f" Trees (clean: the code matched its commit): {trees}. Machines: {machines}."
    if p["dirty_rows"]:
        text += " **From a dirty tree** (`lit_deltasam/` differed from its commit): " + "; ".join(p["dirty_rows"]) + "."
    return text


def main() -> None:
    for name in _studies():
        path = RESULTS / f"{name}.json"
        saved = json.loads(path.read_text())
        saved["provenance"] = compute(name)
        path.write_text(json.dumps(saved, indent=2))
        print(name, render(saved["provenance"]))


if __name__ == "__main__":
    main()
