"""Every study number the README and the docs quote is rebuilt from the committed results, and a hand edit fails.

The pages mark each quoted number (``<!-- q:NAME -->…<!-- /q -->``), each table a study JSON stores
(``<!-- NAME:begin … -->``) and each table rendered from a JSON's numbers (``<!-- t:NAME -->…<!-- /t -->``);
``python -m benchmarks.lab.fill_docs`` writes them from docs/results, and this test rebuilds them all."""

import json
import re

import pytest

from benchmarks.lab import fill_docs, provenance
from benchmarks.lab.common import RESULTS, ROOT
from benchmarks.lab.quotes import QUOTES
from benchmarks.lab.tables import TABLES


@pytest.mark.parametrize("page", fill_docs.pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_quoted_number_and_table_is_what_the_committed_results_give(page):
    assert fill_docs.differences(page.read_text()) == []


def test_the_pages_quote_numbers_through_markers():
    """The README carries quote markers, every study page quotes through markers (numbers or tables), and every quote
    and every table a page names exists."""
    texts = {p: p.read_text() for p in fill_docs.pages()}
    used = {name for text in texts.values() for name in fill_docs.QUOTE.findall(text) for name in [name[0]]}
    assert used <= set(QUOTES)
    assert {m.group(1) for text in texts.values() for m in fill_docs.TABLE.finditer(text)} <= set(TABLES)
    assert fill_docs.QUOTE.search(texts[ROOT / "README.md"])
    for page in (ROOT / "docs" / "studies").glob("*.md"):
        if page.name.endswith("-protocol.md"):  # declared before its study runs: it has no results to quote yet
            continue
        assert any(marker.search(texts[page]) for marker in (fill_docs.QUOTE, fill_docs.BLOCK, fill_docs.TABLE)), page


@pytest.mark.parametrize("name", ["studies/overhead.md", "studies/batched-groups.md", "distributed.md"])
def test_no_table_of_measurements_is_typed_by_hand(name):
    """On the pages of step costs and collectives, every table row with a digit in it sits inside a marker."""
    text = (ROOT / "docs" / name).read_text()
    bare = fill_docs.QUOTE.sub("", fill_docs.TABLE.sub("", fill_docs.BLOCK.sub("", text)))
    assert [line for line in bare.splitlines() if line.startswith("|") and re.search(r"\d", line)] == []


def test_a_number_edited_by_hand_is_reported(tmp_path):
    """A copy of the premise page with one quoted number changed by hand: the check names the quote; the same for a
    number inside a filled table."""
    page = (ROOT / "docs" / "studies" / "premise.md").read_text()
    quoted = fill_docs.QUOTE.search(page)
    name, value = quoted.group(1), quoted.group(2)
    edited = page.replace(quoted.group(0), f"<!-- q:{name} -->{value.replace('0', '1', 1)}<!-- /q -->", 1)
    assert edited != page
    copy = tmp_path / "premise.md"
    copy.write_text(edited)
    found = fill_docs.differences(copy.read_text())
    assert len(found) == 1 and found[0].startswith(f"{name}:"), found
    table = page.replace("| 0.725 |", "| 0.752 |", 1)
    assert table != page and fill_docs.differences(table)[0].startswith("premise_gpu:")
    assert fill_docs.differences(page) == []


def test_a_cell_of_a_rendered_table_edited_by_hand_is_reported():
    """The overhead page with one cell of its H200 table changed by hand: the check names the table and the row."""
    page = (ROOT / "docs" / "studies" / "overhead.md").read_text()
    assert fill_docs.differences(page) == []
    edited = page.replace("| 57.17 |", "| 51.17 |", 1)
    assert edited != page
    (found,) = fill_docs.differences(edited)
    assert found.startswith("overhead.h200:") and "per-instance SAM, loop" in found, found


def test_sentences_around_the_markers_cannot_carry_a_stale_copy():
    """No quoted figure is also typed by hand outside its marker on the same page (a copy would not be checked)."""
    for page in fill_docs.pages():
        text = page.read_text()
        bare = fill_docs.QUOTE.sub("", fill_docs.BLOCK.sub("", text))
        for name in dict.fromkeys(m.group(1) for m in fill_docs.QUOTE.finditer(text)):
            value = QUOTES[name]()
            if re.search(r"\[.*\]", value):  # an interval: distinctive enough to look for
                assert value not in bare, (page, name, value)


@pytest.mark.parametrize("name", ["premise_gpu", "tuning_gpu", "recipe_suite", "regimes"])
def test_the_provenance_under_each_table_is_that_of_the_rows_it_reads(name):
    saved = json.loads((RESULTS / f"{name}.json").read_text())
    assert provenance.compute(name) == saved["provenance"]


def test_a_dirty_tree_row_is_named_where_it_appears():
    saved = json.loads((RESULTS / "recipe_suite.json").read_text())
    assert saved["provenance"]["dirty_rows"] == ["mr noisy1k erm seed 101 (0a404ce)"]
    assert "**From a dirty tree**" in (ROOT / "docs" / "studies" / "recipe.md").read_text()
