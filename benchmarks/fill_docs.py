"""Put a study's committed tables into docs/benchmarks.md between its markers, so that the page and the JSON agree.

python benchmarks/fill_docs.py regimes
"""

from __future__ import annotations

import json
import sys

from common import RESULTS, ROOT


def fill(name: str) -> None:
    page = ROOT / "docs" / "benchmarks.md"
    text = page.read_text()
    begin = f"<!-- {name}:begin (written by the command below from {name}.json) -->"
    end = f"<!-- {name}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"docs/benchmarks.md has no {begin} ... {end} markers")
    table = json.loads((RESULTS / f"{name}.json").read_text())["table"].strip()
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n\n{table}\n\n`python benchmarks/fill_docs.py {name}`\n{end}{tail}")


if __name__ == "__main__":
    fill(sys.argv[1] if len(sys.argv) > 1 else "regimes")
