"""Put a study's committed tables into the docs between its markers, so that the pages and the JSON agree.

docs/benchmarks.md gets the JSON's ``table``; docs/results.md gets its ``headline``, where the JSON has one.

python -m benchmarks.lab.fill_docs regimes
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.lab.common import RESULTS, ROOT


def fill(name: str) -> None:
    saved = json.loads((RESULTS / f"{name}.json").read_text())
    write(ROOT / "docs" / "benchmarks.md", name, saved["table"])
    if "headline" in saved:
        write(ROOT / "docs" / "results.md", f"{name}-headline", saved["headline"])


def write(page: Path, name: str, table: str) -> None:
    text = page.read_text()
    study = name.split("-")[0]
    begin = f"<!-- {name}:begin (written by the command below from {study}.json) -->"
    end = f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{page.relative_to(ROOT)} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n\n{table.strip()}\n\n`python -m benchmarks.lab.fill_docs {study}`\n{end}{tail}")


if __name__ == "__main__":
    fill(sys.argv[1] if len(sys.argv) > 1 else "regimes")
