"""The front door and the docs site: the README's limits and order, every link it holds, every page one click from
it, and the site built strictly (broken links, anchors and API references fail)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"


def headings(text: str, level: str) -> list[str]:
    prose = re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)
    return re.findall(rf"^{level} (.+)$", prose, flags=re.M)


def test_the_readme_is_short_and_in_the_issued_order():
    """≤ 3,000 words; what it is and the reconstruction note, the two commands, the Lightning and the plain-PyTorch
    quick starts, which mode to use, the command line, the guide."""
    assert len(README.split()) <= 3000
    assert "documented reconstruction" in README.split("\n## ")[0]
    order = ["Two commands", "Quick start: the mixin", "Quick start: plain PyTorch", "What the evidence shows"]
    order += ["The command line"]
    order += ["The guide"]
    found = headings(README, "##")
    assert [next(i for i, h in enumerate(found) if h.startswith(name)) for name in order] == list(range(len(order)))


def test_the_readme_keeps_one_short_evidence_paragraph_with_links():
    """The study statistics live on the results page and the study pages: the README keeps one paragraph, no table,
    its numbers quoted through markers (tests/test_doc_numbers.py), linking to both."""
    section = README.split("## What the evidence shows")[1].split("\n## ")[0].strip()
    assert "\n\n" not in section and "|" not in section and len(section.split()) <= 200
    assert "](docs/results.md#which-mode-to-use-the-full-table)" in section and "](docs/benchmarks.md)" in section
    assert "<!-- q:" in section


def slugify(heading: str) -> str:
    """The anchor mkdocs.yml's toc gives a heading (pymdownx's slugify, lower case), as GitHub gives it."""
    from pymdownx.slugs import slugify as make

    return make(case="lower")(heading, "-")


def anchors(page: Path) -> set[str]:
    text = page.read_text()
    return {slugify(re.sub(r"[`*]", "", h)) for level in ("#", "##", "###", "####") for h in headings(text, level)}


def test_every_link_of_the_readme_resolves():
    """Every relative link names a file that exists, and every anchor a heading of that page."""
    pytest.importorskip("pymdownx")
    links = re.findall(r"\]\(([^)\s]+)\)", README)
    relative = [link for link in links if not re.match(r"https?://", link)]
    assert relative
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), link
        if anchor:
            assert anchor in anchors(target), f"{link}: no heading with that anchor"


def test_every_docs_page_is_one_click_from_the_readme():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    nav = set(pages(config["nav"]))
    assert nav == {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}  # no page left out of the site
    linked = {m.group(1) for m in re.finditer(r"\]\(docs/([\w-]+\.md)(#[\w-]+)?\)", README)}
    top = {page for page in nav if "/" not in page}
    assert top <= linked, sorted(top - linked)
    # a study page is one click from the benchmarks page, which the README links
    index = (DOCS / "benchmarks.md").read_text()
    studies = {page for page in nav if page.startswith("studies/")}
    assert studies and all(f"]({page})" in index for page in studies), studies


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="docs extra")
def test_the_docs_site_builds_strictly_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    mkdocs = Path(sys.executable).parent / "mkdocs"
    build = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent)},
    )
    assert build.returncode == 0, build.stderr[-3000:]
    api = (site / "api" / "index.html").read_text()
    from lit_deltasam import __all__

    for name in __all__:  # every public name has its own entry, documented from its docstring
        assert re.search(rf'id="lit_deltasam(\.\w+)*\.{name}"', api), name
    assert "How each training step perturbs the weights" in api  # DeltaSAMConfig's docstring, rendered


def test_the_sam_family_snippet_of_the_methods_page_runs(tmp_path):
    """docs/methods.md's SAM-family example runs as written: every method trains, GSAM and F-SAM print what they add,
    the policy its full steps."""
    page = (DOCS / "methods.md").read_text()
    section = page.split("## The SAM family", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert code is not None
    script = tmp_path / "family.py"
    script.write_text(code.group(1))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["gsam", "wsam", "fsam", "sam"]
    assert "gsam_perp_norm" in lines[0] and "fsam_removed_norm" in lines[2] and "full steps" in lines[3]
