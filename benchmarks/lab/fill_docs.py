"""Write every study number the docs quote, from the committed results, between its markers.

Three kinds of marker, on any page (the README and docs/**.md):

* a block, ``<!-- NAME:begin (written by the command below from STUDY.json) -->`` … ``<!-- NAME:end -->``: the JSON's
  ``table`` (NAME = STUDY), its ``headline`` (NAME = ``STUDY-headline``) or the provenance of its rows
  (NAME = ``STUDY-provenance``: :mod:`benchmarks.lab.provenance`);
* a table whose JSON keeps the numbers but not the table, ``<!-- t:NAME -->`` … ``<!-- /t -->``:
  :data:`benchmarks.lab.tables.TABLES` ``[NAME]``;
* a number inside a sentence, ``<!-- q:NAME -->…<!-- /q -->``: :data:`benchmarks.lab.quotes.QUOTES` ``[NAME]``.

    python -m benchmarks.lab.fill_docs             # every page
    python -m benchmarks.lab.fill_docs --check     # exit 1 and name each marker whose text differs

tests/test_doc_numbers.py runs the check on every page, and shows that it catches a number edited by hand.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from benchmarks.lab.common import RESULTS, ROOT
from benchmarks.lab.provenance import render as render_provenance
from benchmarks.lab.quotes import QUOTES
from benchmarks.lab.tables import TABLES

BLOCK = re.compile(
    r"<!-- ([a-z0-9_]+)(-headline|-provenance|):begin \(written by the command below from [a-z0-9_]+\.json\) -->"
    r"(.*?)<!-- \1\2:end -->",
    re.S,
)
TABLE = re.compile(r"<!-- t:([a-z0-9_.]+) -->(.*?)<!-- /t -->", re.S)
QUOTE = re.compile(r"<!-- q:([a-z0-9_.]+) -->(.*?)<!-- /q -->", re.S)


def pages() -> list[Path]:
    """Every page that may quote a study: the README and the docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def block(study: str, kind: str) -> str:
    saved = json.loads((RESULTS / f"{study}.json").read_text())
    if kind == "-headline":
        return saved["headline"]
    if kind == "-provenance":
        return render_provenance(saved["provenance"])
    return saved["table"]


def render(text: str) -> str:
    """``text`` with every marker's content rebuilt from the committed results."""

    def fill_block(m: re.Match) -> str:
        study, kind = m.group(1), m.group(2)
        begin = f"<!-- {study}{kind}:begin (written by the command below from {study}.json) -->"
        body = block(study, kind).strip()
        return f"{begin}\n\n{body}\n\n`python -m benchmarks.lab.fill_docs`\n<!-- {study}{kind}:end -->"

    def fill_table(m: re.Match) -> str:
        name = m.group(1)
        if name not in TABLES:
            raise SystemExit(f"no table named {name!r} in benchmarks/lab/tables.py")
        return f"<!-- t:{name} -->\n\n{TABLES[name]().strip()}\n\n<!-- /t -->"

    def fill_quote(m: re.Match) -> str:
        name = m.group(1)
        if name not in QUOTES:
            raise SystemExit(f"no quote named {name!r} in benchmarks/lab/quotes.py")
        return f"<!-- q:{name} -->{QUOTES[name]()}<!-- /q -->"

    return QUOTE.sub(fill_quote, TABLE.sub(fill_table, BLOCK.sub(fill_block, text)))


def differences(text: str) -> list[str]:
    """Each marker of ``text`` whose content is not what the committed results give, as ``NAME: found ≠ expected``."""
    expected = render(text)
    if expected == text:
        return []
    out = []
    for pattern in (BLOCK, TABLE, QUOTE):
        for found, wanted in zip(pattern.finditer(text), pattern.finditer(expected)):
            if found.group(0) != wanted.group(0):
                name = "".join(g or "" for g in found.groups()[:2]) if pattern is BLOCK else found.group(1)
                was, now = found.group(pattern.groups), wanted.group(pattern.groups)
                if pattern is TABLE:  # the first row that differs
                    was, now = next(((a, b) for a, b in zip(was.splitlines(), now.splitlines()) if a != b), (was, now))
                out.append(f"{name}: {was[:80]!r} ≠ {now[:80]!r}")
    return out or ["the page differs from its rebuilt form"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page differs")
    args = parser.parse_args()
    failed = False
    for page in pages():
        text = page.read_text()
        if args.check:
            for line in differences(text):
                print(f"{page.relative_to(ROOT)}: {line}")
                failed = True
        elif render(text) != text:
            page.write_text(render(text))
            print(f"wrote {page.relative_to(ROOT)}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
