"""The statistics behind the results' caveats: paired t-test p, wins/ties/losses, Holm's adjustment."""

import json
import random
from pathlib import Path

import pytest

from benchmarks.lab import stats

ROOT = Path(__file__).resolve().parents[1]


def holm_rejects(ps: list[float], alpha: float) -> set[int]:
    """Holm's procedure as Holm (1979) states it: walk the p-values upwards, reject the k-th smallest while it is
    ≤ α / (m − k), stop at the first that is not."""
    rejected = set()
    for k, i in enumerate(sorted(range(len(ps)), key=ps.__getitem__)):
        if ps[i] > alpha / (len(ps) - k):
            break
        rejected.add(i)
    return rejected


def test_holm_adjusted_p_rejects_what_the_procedure_rejects():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    rng = random.Random(0)
    for _ in range(200):
        ps = [rng.random() ** 3 for _ in range(rng.randint(1, 12))]
        adjusted = stats.holm(ps)
        for alpha in (0.001, 0.01, 0.05, 0.1, 0.5):
            assert {i for i, p in enumerate(adjusted) if p <= alpha} == holm_rejects(ps, alpha)


def test_paired_differences_p_and_wins_ties_losses():
    # df = 2: the t distribution's CDF is 1/2 + t / (2 sqrt(2 + t²)), so the two-sided p is 1 − t / sqrt(2 + t²)
    d = [1.0, 2.0, 3.0]
    t = 2.0 / (1.0 / 3**0.5)
    summary = stats.paired(d)
    assert summary["p"] == pytest.approx(1 - t / (2 + t * t) ** 0.5)
    assert summary["ci"][0] < 2.0 < summary["ci"][1] and summary["mean"] == 2.0
    assert [stats.paired([1.0, 0.0, -1.0, 2.0])[k] for k in ("wins", "ties", "losses")] == [2, 1, 1]
    assert stats.paired([0.5, 0.5])["p"] == 0.0 and stats.paired([0.0, 0.0])["p"] == 1.0


def test_the_regimes_results_carry_their_multiplicity():
    """Every interval of the committed regimes study has a Holm p over the whole table's family, and its tables say
    so; the post-hoc arms are marked wherever they appear."""
    saved = json.loads((ROOT / "docs" / "results" / "regimes.json").read_text())
    family = [d for a in saved["arms"].values() for d in a["differences"].values() if d is not None]
    from benchmarks.regimes import distinct

    tests = len(distinct(saved["arms"]))
    assert len(family) == saved["family"] and f"over all {saved['family']} entries" in saved["headline"]
    assert f"which hold {tests} distinct tests ({saved['family'] - tests} are listed twice" in saved["headline"]
    assert [d["p_holm"] for d in family] == pytest.approx(stats.holm([d["p"] for d in family]))
    assert all(d["wins"] + d["ties"] + d["losses"] == d["n"] for d in family)
    comparison = saved["table"].split("**Comparison**")[1].split("**Stalled")[0]
    rows = [line for text in (saved["headline"], comparison) for line in text.splitlines() if line.startswith("| ")]
    post_hoc = [line for line in rows if "m-sam's ρ" in line or line.startswith("| tweets")]
    assert len(post_hoc) == 2 * (2 + 5) and all("(post hoc)" in line for line in post_hoc)
    assert all("(post hoc)" not in line for line in rows if line not in post_hoc)
