"""Every number the README and the docs quote from a study, rebuilt from the committed results.

A page quotes a number between inline markers, ``<!-- q:NAME -->+0.09 [−0.47, +0.64]<!-- /q -->``, and
:mod:`benchmarks.lab.fill_docs` writes :data:`QUOTES` ``[NAME]()`` there; tests/test_doc_numbers.py rebuilds every
marker of every page and fails on any difference, so a number edited by hand (or a row changed under it) is caught.
Each quote reads the committed JSON in docs/results (and, where a study's JSON keeps no such number as a field,
the cells of its ``table`` or its rows).
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from collections.abc import Callable
from typing import Any, Sequence

from benchmarks.lab.common import RESULTS, load_jsonl
from benchmarks.lab.stats import bootstrap, holm, paired

QUOTES: dict[str, Callable[[], str]] = {}


def quote(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a quote; a method's name becomes a marker's (``sam, m=4 (batched)`` → ``sam_m_4_batched``)."""

    def register(fn: Callable[[], str]) -> Callable[[], str]:
        QUOTES[re.sub(r"[^a-z0-9_.]+", "_", name.lower()).strip("_")] = fn
        return fn

    return register


def slug(name: str) -> str:
    """A method's name as one part of a quote's name: ``deltasam(probe K=3, all)`` → ``deltasam_probe_k_3_all``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


@functools.lru_cache(maxsize=None)
def saved(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def num(x: float, digits: int = 2, sign: bool = True) -> str:
    """A number as the prose writes it: a real minus sign, ``+`` on a positive difference."""
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text.replace("-", "−")


def span(xs: Sequence[float], digits: int = 2) -> str:
    """``low–high`` of ``xs``."""
    return f"{num(min(xs), digits, sign=False)}–{num(max(xs), digits, sign=False)}"


def interval(d: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    """``mean [low, high]``."""
    low, high = d["ci"]
    return f"{num(scale * d['mean'], digits)} [{num(scale * low, digits)}, {num(scale * high, digits)}]"


def wtl(d: dict[str, Any]) -> str:
    return f"{d['wins']}/{d['ties']}/{d['losses']}"


def p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def p_short(p: float) -> str:
    """A Holm p as a sentence gives it in passing: two decimals, 1.0 where Holm capped it."""
    return "< 0.001" if p < 0.001 else "1.0" if p >= 0.995 else f"{p:.2f}"


@functools.lru_cache(maxsize=None)
def _table_rows(name: str) -> tuple[tuple[str, dict[str, str]], ...]:
    """The rows of the markdown tables in a study JSON's ``table``, each with the bold title above its table."""
    out: list[tuple[str, dict[str, str]]] = []
    title, header = "", None
    for line in saved(name)["table"].splitlines():
        if line.startswith("**"):
            title, header = line.split("**")[1], None
        elif not line.startswith("|"):
            header = None
        elif header is None:
            header = [c.strip() for c in line.strip("|").split("|")]
        elif not set(line) <= set("|-"):
            out.append((title, dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))))
    return tuple(out)


def cell(name: str, column: str, title: str = "", **where: str) -> str:
    """The cell of ``column`` in the one row of a study's tables that ``where`` picks (under a title that starts
    with ``title``): for a number the JSON keeps only in its table."""
    (found,) = [
        row[column]
        for head, row in _table_rows(name)
        if head.startswith(title) and all(row.get(k) == v for k, v in where.items())
    ]
    return found


# --- the premise ---------------------------------------------------------------------------------------------------


def _premise() -> dict[str, Any]:
    return saved("premise_gpu")["comparison"]["tweets, 20% noise"]


def _premise_diff(label: str) -> dict[str, Any]:
    return _premise()["differences"][label]


quote("premise.pi_sam")(lambda: interval(_premise_diff("final − sam (final)")))
quote("premise.pi_sam.wtl")(lambda: wtl(_premise_diff("final − sam (final)")))
quote("premise.pi_same_rho")(lambda: interval(_premise_diff("final − sam at the same ρ (final)")))
quote("premise.pi_same_rho.wtl")(lambda: wtl(_premise_diff("final − sam at the same ρ (final)")))
quote("premise.pi_erm_best")(lambda: interval(_premise_diff("best-val − early-stopped erm")))
quote("premise.pi_erm_best.p_holm")(lambda: p_value(_premise_diff("best-val − early-stopped erm")["p_holm"]))
quote("premise.pi_erm_final")(lambda: interval(_premise_diff("final − early-stopped erm")))
quote("premise.pi_erm_final.p_holm")(lambda: p_value(_premise_diff("final − early-stopped erm")["p_holm"]))


def _sam_over_erm() -> dict[str, Any]:
    """SAM's final weights − early-stopped ERM on the premise's seeds: a contrast outside the declared family."""
    c = _premise()
    return paired([100 * (s - e) for s, e in zip(c["test_final"]["sam"], c["test_best"]["erm"])])


quote("premise.sam_erm_best")(
    lambda: f"{num(_sam_over_erm()['mean'])} [{num(_sam_over_erm()['ci'][0])}, {num(_sam_over_erm()['ci'][1])}]"
)
quote("premise.sam_erm_best.p")(lambda: p_value(_sam_over_erm()["p"]))


def _premise_val(setting: str) -> dict[str, Any]:
    return saved("premise_gpu")["selection"][setting]


quote("premise.mr_val")(
    lambda: (
        f"{100 * _premise_val('mr, 20% noise')['val']:.2f} against {100 * _premise_val('mr, 20% noise')['sam_val']:.2f}"
    )
)

# --- the regimes ---------------------------------------------------------------------------------------------------


def _arm(name: str) -> dict[str, Any]:
    return saved("regimes")["arms"][name]


def _regimes_diff(name: str, label: str) -> dict[str, Any]:
    return _arm(name)["differences"][label]


def _distinct() -> list[tuple[str, str, dict[str, Any]]]:
    from benchmarks.regimes import distinct

    return distinct(saved("regimes")["arms"])


def _distinct_holm(name: str, label: str) -> float:
    tests = _distinct()
    adjusted = holm([d["p"] for *_, d in tests])
    d = _regimes_diff(name, label)
    key = (d["n"], round(d["mean"], 12), round(d["p"], 12))
    return next(p for (_, _, t), p in zip(tests, adjusted) if (t["n"], round(t["mean"], 12), round(t["p"], 12)) == key)


quote("regimes.family")(lambda: str(saved("regimes")["family"]))
quote("regimes.distinct")(lambda: str(len(_distinct())))
quote("regimes.repeats")(lambda: str(saved("regimes")["family"] - len(_distinct())))


for _name, _arm_key, _label in (
    ("interval5_erm", "noisy1k/sam interval=5", "ERM final"),
    ("sam02_40_erm", "noisy40/sam at m-sam's ρ", "ERM final"),
    ("sam02_20_erm", "noisy1k/sam at m-sam's ρ", "ERM final"),
    ("sam02_40_erm_best", "noisy40/sam at m-sam's ρ", "early-stopped ERM"),
    ("m4_tweets_erm_best", "tweets noisy1k/m-sam m=4", "early-stopped ERM"),
    ("m4_tweets_sam", "tweets noisy1k/m-sam m=4", "SAM final, same ρ"),
    ("deltasam_sam_mr", "noisy1k/deltasam", "SAM final"),
    ("sam40_erm", "noisy40/sam", "ERM final"),
    ("looksam_erm", "noisy1k/sam looksam k=5", "ERM final"),
    ("m8_sam", "noisy1k/m-sam m=8", "SAM final, same ρ"),
    ("m4_sam", "noisy1k/m-sam m=4", "SAM final, same ρ"),
    ("interval5_erm_best", "noisy1k/sam interval=5", "early-stopped ERM"),
    ("sam02_20_erm_best", "noisy1k/sam at m-sam's ρ", "early-stopped ERM"),
    ("m8_sam05", "noisy1k/m-sam m=8", "SAM final"),
    ("sam02_sam05", "noisy1k/sam at m-sam's ρ", "SAM final"),
    ("per_instance_sam", "noisy1k/per-instance (m=1)", "SAM final, same ρ"),
    ("deltasam_b1_sam", "noisy1k/deltasam β=+1", "SAM final"),
    ("deltasam_sam_40", "noisy40/deltasam", "SAM final"),
    ("sam_erm", "noisy1k/sam", "ERM final"),
    ("interval5_sam", "noisy1k/sam interval=5", "SAM final"),
    ("m8_erm", "noisy1k/m-sam m=8", "ERM final"),
    ("m8_erm_best", "noisy1k/m-sam m=8", "early-stopped ERM"),
    ("erm_erm_best", "noisy1k/erm", "early-stopped ERM"),
    ("sam40_both_best", "noisy40/sam", "early-stopped ERM, arm early-stopped too"),
    ("deltasam40_both_best", "noisy40/deltasam", "early-stopped ERM, arm early-stopped too"),
    ("m4_40_both_best", "noisy40/m-sam m=4", "early-stopped ERM, arm early-stopped too"),
    ("m4_tweets_sam05", "tweets noisy1k/m-sam m=4", "SAM final"),
    ("sam_tweets_erm_best", "tweets noisy1k/sam", "early-stopped ERM"),
    ("sam02_tweets_erm_best", "tweets noisy1k/sam at m-sam's ρ", "early-stopped ERM"),
    ("deltasam_tweets_erm_best", "tweets noisy1k/deltasam", "early-stopped ERM"),
    ("deltasam_tweets_sam", "tweets noisy1k/deltasam", "SAM final"),
    ("erm_tweets_erm_best", "tweets noisy1k/erm", "early-stopped ERM"),
):
    quote(f"regimes.{_name}")(lambda a=_arm_key, lab=_label: interval(_regimes_diff(a, lab), scale=1.0))
    quote(f"regimes.{_name}.mean")(lambda a=_arm_key, lab=_label: num(_regimes_diff(a, lab)["mean"]))
    quote(f"regimes.{_name}.wtl")(lambda a=_arm_key, lab=_label: wtl(_regimes_diff(a, lab)))
    quote(f"regimes.{_name}.p_holm")(lambda a=_arm_key, lab=_label: p_value(_regimes_diff(a, lab)["p_holm"]))
    quote(f"regimes.{_name}.p_short")(lambda a=_arm_key, lab=_label: p_short(_regimes_diff(a, lab)["p_holm"]))
quote("regimes.sam02_40_erm.p_holm_distinct")(lambda: p_value(_distinct_holm("noisy40/sam at m-sam's ρ", "ERM final")))
quote("regimes.interval5_erm.p_holm_distinct")(lambda: p_value(_distinct_holm("noisy1k/sam interval=5", "ERM final")))
for _name, _arm_key in (
    ("sam05_40", "noisy40/sam"),
    ("msam_40", "noisy40/m-sam m=4"),
    ("sam02_40", "noisy40/sam at m-sam's ρ"),
    ("looksam", "noisy1k/sam looksam k=5"),
    ("deltasam05_40", "noisy40/deltasam"),
    ("per_instance", "noisy1k/per-instance (m=1)"),
):
    quote(f"regimes.{_name}.stalled")(lambda a=_arm_key: f"{_arm(a)['stalled']} of {len(_arm(a)['seeds'])}")
for _name, _arm_key in (
    ("sam", "noisy1k/sam"),
    ("sam02_20", "noisy1k/sam at m-sam's ρ"),
    ("sam02_40", "noisy40/sam at m-sam's ρ"),
    ("m8", "noisy1k/m-sam m=8"),
    ("m4", "noisy1k/m-sam m=4"),
    ("per_instance", "noisy1k/per-instance (m=1)"),
    ("looksam", "noisy1k/sam looksam k=5"),
    ("interval5", "noisy1k/sam interval=5"),
    ("m4_tweets", "tweets noisy1k/m-sam m=4"),
):
    quote(f"regimes.{_name}.cost")(lambda a=_arm_key: num(_arm(a)["cost_vs_erm"], sign=False))
    quote(f"regimes.{_name}.cost.rounded")(lambda a=_arm_key: num(_arm(a)["cost_vs_erm"], 1, sign=False))


def _unstalled_range() -> str:
    """mr's arms that stall on no seed, final weights − early-stopped ERM: the smallest and the largest mean."""
    means = [
        a["differences"]["early-stopped ERM"]["mean"]
        for name, a in saved("regimes")["arms"].items()
        if name.startswith(("noisy1k/", "noisy40/")) and not name.endswith("/erm") and a["stalled"] == 0
    ]
    return f"{num(min(means))} to {num(max(means))}"


quote("regimes.mr_unstalled_range")(_unstalled_range)


def _stalled_40_range() -> str:
    """How far below ERM's final weights the arms that stall at 40% noise end: the smallest and the largest."""
    gaps = [-_regimes_diff(f"noisy40/{a}", "ERM final")["mean"] for a in ("sam", "deltasam", "m-sam m=4")]
    return span(gaps, 1)


quote("regimes.stalled_40_range")(_stalled_40_range)


def _unstalled_scores(name: str) -> str:
    """Test accuracy of an arm's seeds that did not stall (the stalled ones named in the study's stall table)."""
    setting, arm = name.split("/")
    stalled = {
        int(r["seed"])
        for head, r in _table_rows("regimes")
        if head.startswith("Stalled") and (r["setting"], r["arm"]) == (setting, arm)
    }
    a = _arm(name)
    return " and ".join(num(100 * x, 1, sign=False) for s, x in zip(a["seeds"], a["test_final"]) if s not in stalled)


def _stall_eigen(arm: str, erm: bool) -> list[float]:
    """The final largest-magnitude Hessian eigenvalue of an arm's stalled noisy1k runs (or of ERM's, same seeds)."""
    column = "final largest-magnitude Hessian eigenvalue (ERM, same seed)"
    cells = [r[column] for head, r in _table_rows("regimes") if head.startswith("Stalled") and r["arm"] == arm]
    return [float(c.split(" (")[1].rstrip(")") if erm else c.split(" (")[0]) for c in cells]


for _erm, _name, _digits in ((False, "eigen_range", 1), (True, "erm_eigen_range", 0)):
    quote(f"regimes.looksam.{_name}")(
        lambda e=_erm, d=_digits: "–".join(
            num(f(_stall_eigen("sam looksam k=5", e)), d, sign=False) for f in (min, max)
        )
    )
quote("regimes.per_instance.unstalled")(lambda: _unstalled_scores("noisy1k/per-instance (m=1)"))
quote("regimes.noisy40.erm.test")(
    lambda: cell("regimes", "test acc, final", "Comparison", setting="noisy40", arm="erm")
)


def _val_40(name: str) -> list[float]:
    return _arm(f"noisy40/{name}")["val_final"]


for _name, _arm_key in (("sam02", "sam at m-sam's ρ"), ("sam05", "sam")):
    quote(f"regimes.noisy40.{_name}.val")(lambda a=_arm_key: num(100 * statistics.mean(_val_40(a)), 1, sign=False))


def _ahead_on_val_40() -> str:
    """On how many seeds SAM at 0.02 ends above SAM at 0.05 on noisy40's validation split."""
    low, high = _val_40("sam at m-sam's ρ"), _val_40("sam")
    return f"{sum(x > y for x, y in zip(low, high))} of {len(high)}"


quote("regimes.noisy40.sam02_ahead_on_val")(_ahead_on_val_40)
for _rho in ("0.02", "0.05"):
    quote(f"regimes.selection.sam.rho{_rho}")(
        lambda r=_rho: cell("regimes", "mean", "Step 1", family="SAM", **{"ρ": r})
    )


def _step0(setting: str, lr: str) -> str:
    return cell("regimes", "mean", "Step 0", setting=setting, lr=lr)


for _setting in ("noisy1k", "tweets noisy1k"):
    for _lr in ("5e-05", "0.0001", "0.0002"):
        quote(f"regimes.step0.{_setting}.{_lr}")(lambda s=_setting, lr=_lr: _step0(s, lr))
for _lr in ("0.0001", "0.0002"):
    quote(f"regimes.step0.noisy1k.ahead_of_{_lr}")(
        lambda lr=_lr: num(float(_step0("noisy1k", "5e-05")) - float(_step0("noisy1k", lr)), 1, sign=False)
    )

# --- the recipe and its tuning tasks -------------------------------------------------------------------------------

SHIPPED = "lr=0.0002 weight_decay=0.1"
PREDECLARED = "lr=0.0001 layer_decay=0.8"
GRID = ("lr=5e-05", "lr=0.0001", "lr=0.0002", "lr=0.0003")


def _tuning(task: str, label: str) -> dict[str, Any]:
    return saved("tuning_gpu")["by_task"][task][label]


def _behind(task: str, label: str, field: str, among: tuple[str, ...] | None) -> str:
    """Points by which ``label`` falls below the best of ``among`` (every candidate when None) on ``field``."""
    table = saved("tuning_gpu")["by_task"][task]
    best = max(e[field] for name, e in table.items() if among is None or name in among)
    return num(100 * (best - table[label][field]), sign=False)


for _task in ("20ng", "r52"):
    for _who, _label in (("shipped", SHIPPED), ("predeclared", PREDECLARED), ("old", "lr=5e-05")):
        for _field, _short in (("val", "val"), ("test_final", "test")):
            quote(f"tuning.{_task}.{_who}.{_short}_behind_grid")(
                lambda t=_task, lab=_label, f=_field: _behind(t, lab, f, GRID)
            )
            quote(f"tuning.{_task}.{_who}.{_short}_behind_any")(
                lambda t=_task, lab=_label, f=_field: _behind(t, lab, f, None)
            )
    quote(f"tuning.{_task}.sweep_picks")(lambda t=_task: " and ".join(saved("tuning_gpu")["lr_sweep"][t]["picks"]))
quote("tuning.20ng.shipped.test")(lambda: num(100 * _tuning("20ng", SHIPPED)["test_final"], sign=False))
quote("tuning.20ng.old.test")(lambda: num(100 * _tuning("20ng", "lr=5e-05")["test_final"], sign=False))
quote("tuning.20ng.grid_best.test")(lambda: num(100 * max(_tuning("20ng", g)["test_final"] for g in GRID), sign=False))
quote("tuning.r52.shipped.test")(lambda: num(100 * _tuning("r52", SHIPPED)["test_final"], sign=False))
quote("tuning.r52.any_best.test")(
    lambda: num(100 * max(e["test_final"] for e in saved("tuning_gpu")["by_task"]["r52"].values()), sign=False)
)


def _worst(label: str, field: str = "val", platform: str = "gpu") -> str:
    name = "recipe_suite_gpu" if platform == "gpu" else "recipe_suite"
    return num(100 * max(saved(name)["regret"][field][label].values()), sign=False)


quote("suite.shipped.worst")(lambda: _worst(SHIPPED))
quote("suite.shipped.worst_best_ckpt")(lambda: _worst(SHIPPED, "val_best"))
quote("suite.predeclared.worst")(lambda: _worst(PREDECLARED))
quote("suite.old.worst")(lambda: _worst("lr=5e-05"))
quote("suite.tune_lr.worst")(lambda: _worst("tune_lr rule=minimum"))
TARGET = 1.0
"""The issue's target for the worst-case regret, in points."""
quote("suite.sweep.worst")(
    lambda: num(100 * max(v["regret"] for v in saved("recipe_suite_gpu")["lr_sweep"].values()), sign=False)
)
quote("suite.sweep.above_target")(
    lambda: num(100 * max(v["regret"] for v in saved("recipe_suite_gpu")["lr_sweep"].values()) - TARGET, sign=False)
)


def _confirm(row: str, field: str = "test_best", platform: str = "cpu") -> dict[str, Any]:
    name = "recipe_suite" if platform == "cpu" else "recipe_suite_gpu"
    c = saved(name)["main_job"][row][field]
    return {"mean": c["diff"], "ci": c["ci"], "chosen": c["chosen"], "old": c["old"]}


quote("suite.cpu.noisy_mr_erm.best")(lambda: interval(_confirm("mr noisy1k erm")))
quote("suite.cpu.noisy_mr_erm.final")(lambda: interval(_confirm("mr noisy1k erm", "test_final")))
quote("suite.cpu.noisy_mr_erm.seeds")(lambda: str(len(_confirm("mr noisy1k erm")["chosen"])))
quote("suite.cpu.main_job_deltasam")(lambda: interval(_confirm("mr full1ep deltasam rho=0.02 follow_lr")))
quote("suite.cpu.main_job_deltasam.by_seed")(
    lambda: ", ".join(
        num(100 * (a - b))
        for a, b in zip(*(_confirm("mr full1ep deltasam rho=0.02 follow_lr")[k] for k in ("chosen", "old")))
    )
)


def _confirmation(row: str, field: str = "test_best") -> dict[str, Any]:
    """A candidate's pre-declared confirmation on the H200 (its ``main_job`` rows are the CPU's)."""
    c = saved("recipe_suite_gpu")["confirmation"][row][field]
    return {"mean": c["diff"], "ci": c["ci"], "chosen": c["chosen"], "old": c["old"]}


def _seed_wtl(c: dict[str, Any]) -> str:
    pairs = list(zip(c["chosen"], c["old"]))
    return f"{sum(a > b for a, b in pairs)}/{sum(a == b for a, b in pairs)}/{sum(a < b for a, b in pairs)}"


def _by_seed(c: dict[str, Any]) -> str:
    return ", ".join(num(100 * (a - b)) for a, b in zip(c["chosen"], c["old"]))


for _name, _row in (
    ("noisy_mr_erm", "mr noisy1k erm"),
    ("noisy_mr_deltasam", "mr noisy1k deltasam rho=0.02 follow_lr"),
    ("noisy_mr_sam", "mr noisy1k sam rho=0.02 follow_lr"),
    ("r8_erm", "r8 2k3ep erm"),
    ("mr2k_erm", "mr 2k3ep erm"),
):
    for _field, _short in (("test_best", "best"), ("test_final", "final")):
        if _name != "noisy_mr_erm":
            quote(f"suite.cpu.{_name}.{_short}")(lambda r=_row, f=_field: interval(_confirm(r, f)))
        quote(f"suite.cpu.{_name}.{_short}.wtl")(lambda r=_row, f=_field: _seed_wtl(_confirm(r, f)))
    quote(f"suite.cpu.{_name}.by_seed")(lambda r=_row: _by_seed(_confirm(r)))
for _name, _row in (
    ("main_job_sam", "mr full1ep sam rho=0.02 follow_lr"),
    ("main_job_deltasam", "mr full1ep deltasam rho=0.02 follow_lr"),
    ("noisy_mr_sam", "mr noisy1k sam rho=0.02 follow_lr"),
    ("noisy_mr_deltasam", "mr noisy1k deltasam rho=0.02 follow_lr"),
):
    quote(f"suite.gpu.{_name}")(lambda r=_row: interval(_confirmation(r)))
quote("suite.gpu.main_job_erm.cost")(lambda: num(-100 * _confirmation("mr full1ep erm")["mean"], sign=False))
quote("suite.gpu.main_job_erm.ci")(lambda: interval(_confirmation("mr full1ep erm")).split(" ", 1)[1])
for _platform, _name, _settings, _candidates in (
    ("gpu", "recipe_suite_gpu", ("mr noisy1k", "r8 2k3ep", "mr full1ep"), (*GRID, SHIPPED)),
    ("cpu", "recipe_suite", ("mr noisy1k", "r8 2k3ep"), ("lr=5e-05", "lr=0.0003")),
):
    for _setting in _settings:
        for _candidate in _candidates:
            quote(f"suite.{_platform}.{slug(_setting)}.{slug(_candidate)}.val")(
                lambda n=_name, s=_setting, c=_candidate: num(100 * saved(n)["selection"][s][c]["val"], sign=False)
            )


quote("suite.lr_2e_4.worst")(lambda: _worst("lr=0.0002"))
quote("suite.old.worst_best_ckpt")(lambda: _worst("lr=5e-05", "val_best"))
quote("suite.tune_lr.worst_best_ckpt")(lambda: _worst("tune_lr rule=minimum", "val_best"))
quote("suite.shipped.worst_elsewhere")(
    lambda: num(
        100 * max(v for s, v in saved("recipe_suite_gpu")["regret"]["val"][SHIPPED].items() if s != "mr noisy1k"),
        sign=False,
    )
)
quote("suite.shipped.main_over_old")(
    lambda: num(
        100
        * (
            saved("recipe_suite_gpu")["selection"]["mr full1ep"][SHIPPED]["val"]
            - saved("recipe_suite_gpu")["selection"]["mr full1ep"]["lr=5e-05"]["val"]
        ),
        sign=False,
    )
)
quote("suite.cpu.sweep.worst")(
    lambda: num(100 * max(v["regret"] for v in saved("recipe_suite")["lr_sweep"].values() if v), sign=False)
)
quote("tuning.20ng.tune_lr.val_behind_grid")(lambda: _behind("20ng", "tune_lr rule=minimum", "val", GRID))
for _task in ("20ng", "r52"):
    quote(f"tuning.{_task}.sweep.test_behind_grid")(
        lambda t=_task: num(100 * saved("tuning_gpu")["lr_sweep"][t]["shortfall_test_final"], sign=False)
    )


def _regression(key: str) -> float:
    """The CPU's regression setting (``mr_rating``): validation Pearson at the shipped recipe, at 5e-5, the gap."""
    return saved("recipe_suite")["regression"][key]


quote("suite.cpu.regression.shipped")(lambda: num(_regression("shipped"), 4, sign=False))
quote("suite.cpu.regression.old")(lambda: num(_regression("old"), 4, sign=False))
quote("suite.cpu.regression.diff")(lambda: num(_regression("diff"), 4))


# --- the base recipe (CPU, 2026-12-02) -----------------------------------------------------------------------------


def _recipe(setting: str, arm: str) -> dict[str, Any]:
    return saved("recipe")["settings"][setting][arm]


def lr_text(lr: float) -> str:
    """An LR as the prose writes it: ``1.3e-4``."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _recipe_val_gap(setting: str, a: str, b: str, digits: int, field: str = "val_acc") -> str:
    return num(100 * (_recipe(setting, a)[field] - _recipe(setting, b)[field]), digits, sign=False)


for _setting, _short in (("r8 2k3ep", "r8"), ("mr noisy1k", "noisy_mr")):
    for _recipe_arm in (
        "erm lr=5e-05",
        "erm lr=0.0001",
        "erm lr=0.0002",
        "erm tune_lr rule=minimum",
        "erm tune_lr rule=steepest",
    ):
        quote(f"recipe.{_short}.{slug(_recipe_arm)}.val")(
            lambda s=_setting, a=_recipe_arm: num(100 * _recipe(s, a)["val_acc"], sign=False)
        )
for _setting, _short in (("r8 2k3ep", "r8"), ("mr noisy1k", "noisy_mr")):
    quote(f"recipe.{_short}.tune_lr.lrs")(
        lambda s=_setting: " and ".join(lr_text(x) for x in _recipe(s, "erm tune_lr rule=minimum")["lr"])
    )
quote("recipe.r8.steepest.lr_range")(
    lambda: " to ".join(lr_text(x) for x in sorted(_recipe("r8 2k3ep", "erm tune_lr rule=steepest")["lr"]))
)
quote("recipe.noisy_mr.steepest.lr_max")(lambda: lr_text(max(_recipe("mr noisy1k", "erm tune_lr rule=steepest")["lr"])))
quote("recipe.r8.old_behind.val")(lambda: _recipe_val_gap("r8 2k3ep", "erm lr=0.0002", "erm lr=5e-05", 1))
quote("recipe.r8.old_behind.test")(lambda: _recipe_val_gap("r8 2k3ep", "erm lr=0.0002", "erm lr=5e-05", 1, "test_acc"))
quote("recipe.r8.tune_lr.below_best")(
    lambda: _recipe_val_gap("r8 2k3ep", "erm lr=0.0002", "erm tune_lr rule=minimum", 2)
)
quote("recipe.r8.tune_lr.above_old")(lambda: _recipe_val_gap("r8 2k3ep", "erm tune_lr rule=minimum", "erm lr=5e-05", 1))
quote("recipe.noisy_mr.tune_lr.below_old")(
    lambda: _recipe_val_gap("mr noisy1k", "erm lr=5e-05", "erm tune_lr rule=minimum", 2)
)
quote("recipe.noisy_mr.tune_lr.above_1e_4")(
    lambda: _recipe_val_gap("mr noisy1k", "erm tune_lr rule=minimum", "erm lr=0.0001", 1)
)

# --- fidelity and generalization -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fidelity_pooled() -> tuple[float, tuple[float, float], int]:
    """δ-SAM (shipped) − SAM, cos to per-instance SAM, on ERM, SAM and δ-SAM trajectories of both tasks, by batch."""
    shipped = saved("fidelity")["summary"]["shipped"]
    rows = load_jsonl(RESULTS / "fidelity_rows.jsonl")
    gain = [
        r["variants"][shipped]["cos"] - r["variants"]["sam"]["cos"]
        for r in rows
        if r["trajectory"] in ("erm", "sam", "deltasam") and r.get("model", "minilm") == "minilm"
    ]
    return statistics.mean(gain), bootstrap(gain), len(gain)


quote("fidelity.pooled")(
    lambda: f"{num(_fidelity_pooled()[0], 3)} [{num(_fidelity_pooled()[1][0], 3)}, {num(_fidelity_pooled()[1][1], 3)}]"
)
quote("fidelity.pooled.n")(lambda: str(_fidelity_pooled()[2]))
quote("generalization.noisy_mr_sam_erm")(
    lambda: interval(saved("generalization")["differences"]["mr/noisy1k/sam-erm"], scale=1.0)
)

# --- fidelity: the reading -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _fidelity_rows() -> tuple[dict[str, Any], ...]:
    return tuple(r for r in load_jsonl(RESULTS / "fidelity_rows.jsonl") if r.get("model", "minilm") == "minilm")


def _fid(task: str | None = None, trajectories: tuple[str, ...] = ("erm", "sam", "deltasam")) -> list[dict[str, Any]]:
    """fidelity's probe rows of ``task`` (both when None) along ``trajectories``, in the order the study reads them."""
    return [r for r in _fidelity_rows() if task in (None, r["task"]) and r["trajectory"] in trajectories]


def _stage(rows: list[dict[str, Any]], stage: str) -> list[dict[str, Any]]:
    """The rows of one stage (benchmarks.fidelity.stage): early < 30% of the trajectory ≤ mid < 70% ≤ late."""
    cut = {"early": (0.0, 0.3), "mid": (0.3, 0.7), "late": (0.7, math.inf)}[stage]
    return [r for r in rows if cut[0] <= r["step"] / r["total_steps"] < cut[1]]


def _cos(rows: list[dict[str, Any]], variant: str) -> float:
    return statistics.mean(r["variants"][variant]["cos"] for r in rows if variant in r["variants"])


def _shipped() -> str:
    return saved("fidelity")["summary"]["shipped"]


def _gains(rows: list[dict[str, Any]], variant: str | None = None) -> list[float]:
    """``variant`` (the shipped one when None) − SAM, cos on the same batch."""
    v = variant or _shipped()
    return [r["variants"][v]["cos"] - r["variants"]["sam"]["cos"] for r in rows if v in r["variants"]]


def _gain(rows: list[dict[str, Any]], variant: str | None = None) -> dict[str, Any]:
    gain = _gains(rows, variant)
    return {"mean": statistics.mean(gain), "ci": bootstrap(gain)}


def _won(rows: list[dict[str, Any]]) -> str:
    """The share of batches on which the shipped variant is closer than SAM."""
    return f"{100 * statistics.mean(g > 0 for g in _gains(rows)):.0f}%"


@functools.lru_cache(maxsize=None)
def _in_situ(task: str | None) -> dict[str, Any]:
    """The shipped δ-SAM at δ-SAM's weights − SAM at SAM's, paired by (task, probe point, batch)."""
    at = {(r["task"], r["trajectory"], r["step"], r["batch"]): r for r in _fid(task, ("sam", "deltasam"))}
    gain = [
        r["variants"][_shipped()]["cos"] - at[(t, "sam", s, b)]["variants"]["sam"]["cos"]
        for (t, traj, s, b), r in sorted(at.items())
        if traj == "deltasam" and (t, "sam", s, b) in at
    ]
    return {"mean": statistics.mean(gain), "ci": bootstrap(gain), "n": len(gain)}


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    """An entry of fidelity.json's summary as :func:`interval` reads it."""
    return {"mean": d["gain"], "ci": d["gain_ci"]}


def _cos_range(rows: list[dict[str, Any]], prefix: str) -> str:
    cos = [_cos(rows, v) for v in dict.fromkeys(n for r in rows for n in r["variants"]) if v.startswith(prefix)]
    return span(cos)


def _rel_errs() -> list[float]:
    """Every variant's mean relative error on each (task, trajectory)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in _fidelity_rows():
        groups.setdefault((r["task"], r["trajectory"]), []).append(r)
    names = {n for r in _fidelity_rows() for n in r["variants"]}
    return [
        statistics.mean(r["variants"][n]["rel_err"] for r in rs if n in r["variants"])
        for rs in groups.values()
        for n in names
        if any(n in r["variants"] for r in rs)
    ]


def _variant_slug(variant: str) -> str:
    """A variant in a quote's name: ``head:-1`` → ``head_neg1``, ``head:1`` → ``head_1``, ``sam`` → ``sam``."""
    return "_".join(variant.replace(":-", ":neg").split(":"))


SIDES: dict[str, Callable[[], tuple[list[dict[str, Any]], list[dict[str, Any]]]]] = {
    "mr.in_situ": lambda: (_fid("mr", ("sam",)), _fid("mr", ("deltasam",))),
    "tweets.in_situ": lambda: (_fid("tweets", ("sam",)), _fid("tweets", ("deltasam",))),
    "mr.pooled": lambda: (_fid("mr"),) * 2,
    "tweets.pooled": lambda: (_fid("tweets"),) * 2,
    "pooled": lambda: (_fid(),) * 2,
    "tweets.along_erm": lambda: (_fid("tweets", ("erm",)),) * 2,
    "tweets.along_sam": lambda: (_fid("tweets", ("sam",)),) * 2,
    "per_instance": lambda: (_fid("mr", ("per_instance",)),) * 2,
    **{
        f"per_instance.{_s}": lambda s=_s: (_stage(_fid("mr", ("per_instance",)), s),) * 2
        for _s in ("early", "mid", "late")
    },
}
"""The rows SAM's and the shipped δ-SAM's cosines are read on, by the name their quotes use (in situ: each
method's own trajectory; pooled: the ERM, SAM and δ-SAM trajectories)."""

for _where, _sides in SIDES.items():
    quote(f"fidelity.{_where}.sam")(lambda s=_sides: num(_cos(s()[0], "sam"), 3, sign=False))
    quote(f"fidelity.{_where}.deltasam")(lambda s=_sides: num(_cos(s()[1], _shipped()), 3, sign=False))
for _where in ("mr.pooled", "tweets.pooled", "per_instance"):
    quote(f"fidelity.{_where}.n")(lambda s=SIDES[_where]: str(len(s()[1])))
for _task in ("mr", "tweets", None):
    _name = "fidelity.in_situ" if _task is None else f"fidelity.{_task}.in_situ"
    quote(_name)(lambda t=_task: interval(_in_situ(t), scale=1.0, digits=3))
    quote(f"{_name}.ci")(lambda t=_task: f"[{num(_in_situ(t)['ci'][0], 3)}, {num(_in_situ(t)['ci'][1], 3)}]")
    quote(f"{_name}.n")(lambda t=_task: str(_in_situ(t)["n"]))
    quote(f"{_name}.mean")(lambda t=_task: num(_in_situ(t)["mean"], 3))
for _task in ("mr", "tweets"):
    quote(f"fidelity.{_task}.pooled")(lambda t=_task: interval(_gain(_fid(t)), scale=1.0, digits=3))
    quote(f"fidelity.{_task}.pooled.win")(lambda t=_task: _won(_fid(t)))
    quote(f"fidelity.{_task}.sam_cos")(lambda t=_task: num(_cos(_fid(t), "sam"), sign=False))
    quote(f"fidelity.{_task}.curvature")(lambda t=_task: _cos_range(_fid(t), "curvature:"))
for _traj in ("erm", "sam"):
    quote(f"fidelity.tweets.along_{_traj}")(
        lambda tr=_traj: interval(_gain(_fid("tweets", (tr,))), scale=1.0, digits=3)
    )
    quote(f"fidelity.tweets.along_{_traj}.win")(lambda tr=_traj: _won(_fid("tweets", (tr,))))
quote("fidelity.mr.erm_mid_late")(
    lambda: " to ".join(num(g) for g in sorted(_gain(_stage(_fid("mr", ("erm",)), s))["mean"] for s in ("mid", "late")))
)
for _variant in ("probe:-0.5", "probe:-0.5:raw"):
    quote(f"fidelity.mr.{_variant_slug(_variant)}")(lambda v=_variant: num(_cos(_fid("mr"), v), 3, sign=False))
for _variant in ("head:-1", "head:-0.5", "exact:-1"):
    quote(f"fidelity.tweets.{_variant_slug(_variant)}")(lambda v=_variant: num(_gain(_fid("tweets"), v)["mean"], 3))
quote("fidelity.pooled.win")(lambda: _won(_fid()))
for _variant, _name in (("sam", "sam"), (None, "deltasam")):
    quote(f"fidelity.mr.elsewhere.{_name}")(
        lambda v=_variant: span([_cos(_fid("mr", (tr,)), v or _shipped()) for tr in ("erm", "sam", "deltasam")])
    )
quote("fidelity.per_instance")(
    lambda: interval(_summary(saved("fidelity")["summary"]["by_trajectory"]["per_instance"][_shipped()]), 1.0, 3)
)
quote("fidelity.rel_err_range")(lambda: span(_rel_errs()))
quote("fidelity.rel_err_floor")(lambda: f"{math.floor(10 * min(_rel_errs())) / 10:.1f}")
quote("fidelity.batches")(lambda: str(saved("fidelity")["summary"]["overall"]["sam"]["n"]))
for _task in ("mr", "tweets"):
    quote(f"fidelity.{_task}.batches")(lambda t=_task: str(sum(r["task"] == t for r in _fidelity_rows())))
for _variant in ("exact:-0.5", "probe:-0.5", "head:-1"):
    quote(f"fidelity.vs_shipped.{_variant_slug(_variant)}")(
        lambda v=_variant: interval(_summary(saved("fidelity")["summary"]["against_shipped"][v]), 1.0, 3)
    )

# --- generalization, robust defaults and the checks of the default ---------------------------------------------------


def _general(key: str) -> dict[str, Any]:
    return saved("generalization")["differences"][key]


def _general_cell(task: str, setting: str, family: str, column: str) -> str:
    """A method's cell of the generalization study's final comparison (its ρ the one chosen on validation)."""
    method = "erm" if family == "erm" else saved("generalization")["chosen"][f"{task}/{setting}/{family}"]
    return cell("generalization", column, "Final comparison", task=task, setting=setting, method=method)


def _mean_of(text: str, digits: int) -> str:
    """The mean of a table's ``mean ± std`` cell, to ``digits`` decimals."""
    return num(float(text.split(" ± ")[0]), digits, sign=False)


SETTINGS = ("clean1k", "noisy1k")
FINAL, BEST = "test acc, final weights", "test acc, best-val checkpoint"
SHARPNESS, EIGEN = "SAM sharpness at ρ₀ = 0.05", "Hessian eigenvalue of largest magnitude"
for _task in ("mr", "tweets"):
    for _setting in SETTINGS:
        _pairs = ("sam-erm", "deltasam-erm", "deltasam-sam")
        _families = ("erm", "sam", "deltasam")
        if (_task, _setting) == ("mr", "clean1k"):
            _pairs += ("per_instance-erm", "per_instance-sam")
            _families += ("per_instance",)
        for _pair in _pairs:
            _key = f"{_task}/{_setting}/{_pair}"
            _name = f"generalization.{_task}.{_setting}.{_pair}"
            quote(_name)(lambda k=_key: interval(_general(k), scale=1.0))
            quote(f"{_name}.mean")(lambda k=_key: num(_general(k)["mean"]))
            quote(f"{_name}.ci")(lambda k=_key: interval(_general(k), scale=1.0).split(" ", 1)[1])
            quote(f"{_name}.wins")(lambda k=_key: f"{_general(k)['wins']} of {_general(k)['n']}")
            quote(f"{_name}.best_val")(lambda k=_key: interval(_general(k)["best_val"], scale=1.0))
        for _fam in _families:
            _name = f"generalization.{_task}.{_setting}.{_fam}"
            _args = (_task, _setting, _fam)
            quote(_name)(lambda a=_args: _general_cell(*a, FINAL).split(" ± ")[0])
            quote(f"{_name}.mean_std")(lambda a=_args: _general_cell(*a, FINAL))
            quote(f"{_name}.best_val")(lambda a=_args: _general_cell(*a, BEST).split(" ± ")[0])
            quote(f"{_name}.sharpness")(lambda a=_args: _mean_of(_general_cell(*a, SHARPNESS), 3))
            quote(f"{_name}.eigen")(lambda a=_args: _mean_of(_general_cell(*a, EIGEN), 0))
            quote(f"{_name}.eigen.mean_std")(lambda a=_args: _general_cell(*a, EIGEN))
quote("generalization.differences")(lambda: str(len(saved("generalization")["differences"])))
quote("generalization.intervals")(
    lambda: str(sum(1 + (d["best_val"] is not None) for d in saved("generalization")["differences"].values()))
)
quote("generalization.deltasam_sam.within")(
    lambda: num(
        max(abs(_general(f"{t}/{s}/deltasam-sam")["mean"]) for t in ("mr", "tweets") for s in SETTINGS), 1, False
    )
)


def _checkpoint_shift() -> float:
    """How much the best-validation checkpoint moves SAM − ERM and δ-SAM − ERM, outside noisy mr: the largest."""
    return max(
        abs(d["best_val"]["mean"] - d["mean"])
        for k, d in saved("generalization")["differences"].items()
        if k.endswith(("/sam-erm", "/deltasam-erm")) and not k.startswith("mr/noisy1k/")
    )


quote("generalization.checkpoint_shift.within")(lambda: num(_checkpoint_shift(), 1, sign=False))
quote("generalization.clean.sam_erm_range")(
    lambda: " to ".join(num(m) for m in sorted(_general(f"{t}/clean1k/sam-erm")["mean"] for t in ("mr", "tweets")))
)


def _general_stds() -> list[float]:
    rows = [r for head, r in _table_rows("generalization") if head.startswith("Final comparison")]
    return [float(r[FINAL].split(" ± ")[1]) for r in rows]


quote("generalization.std_range")(lambda: f"{min(_general_stds()):.1f}–{max(_general_stds()):.1f}")


def _runs_4k(task: str, method: str, metric: str) -> float:
    """The mean of ``metric`` over the seeds of one arm of the 2026-11-28 study (4,000 instances, one epoch)."""
    runs = saved("generalization_4k_one_epoch")["runs"]
    return statistics.mean(r["metrics"][metric] for r in runs if (r["task"], r["method"]) == (task, method))


for _task, _arms_4k, _digits in (
    ("mr", ("erm", "sam", "deltasam", "per_instance"), 1),
    ("r8", ("erm", "sam", "deltasam"), 2),
    ("tweets", ("erm", "sam", "deltasam"), 2),
):
    for _method in _arms_4k:
        quote(f"generalization_4k.{_task}.{_method}")(
            lambda t=_task, m=_method: cell("generalization_4k_one_epoch", "test acc", task=t, method=m)
        )
    quote(f"generalization_4k.{_task}.deltasam_sam")(
        lambda t=_task, d=_digits: num(100 * (_runs_4k(t, "deltasam", "test/acc") - _runs_4k(t, "sam", "test/acc")), d)
    )
quote("generalization_4k.mr.per_instance.test")(
    lambda: num(100 * _runs_4k("mr", "per_instance", "test/acc"), sign=False)
)


def _curve_4k(method: str | None, point: int) -> list[float]:
    """Validation accuracy (%) of mr's runs (one method's, or all) at one validation point of the epoch."""
    runs = saved("generalization_4k_one_epoch")["runs"]
    return [100 * r["curve"][point][1] for r in runs if r["task"] == "mr" and method in (None, r["method"])]


quote("generalization_4k.mr.first_point")(lambda: num(max(_curve_4k(None, 0)), 1, sign=False))
quote("generalization_4k.mr.erm.second_point")(lambda: f"{min(_curve_4k('erm', 1)):.0f}–{max(_curve_4k('erm', 1)):.0f}")
for _method in ("sam", "per_instance"):
    quote(f"generalization_4k.mr.{_method}.sharpness")(
        lambda m=_method: num(_runs_4k("mr", m, "sam/sharpness_mean"), 3, sign=False)
    )
ROBUST = {
    "rho05_constant": "sam rho=0.05 constant",
    "rho05_warmup": "sam rho=0.05 warmup",
    "rho05_follow_lr": "sam rho=0.05 follow_lr",
    "rho05_start_step": "sam rho=0.05 start_step",
    "rho02_constant": "sam rho=0.02 constant",
    "rho02_follow_lr": "sam rho=0.02 follow_lr",
}
"""The robust-defaults study's SAM arms by the name their quotes use."""
ALL_SETTINGS = {"val": "val − ERM (points, paired)", "test": "test − ERM (points, paired)", "worst": "worst val − ERM"}


def _robust(column: str, title: str, method: str) -> str:
    return cell("robust_defaults", column, title, method=method)


def _robust_same(column: str, title: str, methods: tuple[str, ...]) -> str:
    """One cell of several arms, written once where they agree (``57.8``), else each (``68.8 / 69.1``)."""
    return " / ".join(dict.fromkeys(_robust(column, title, m) for m in methods))


for _slug, _method in ROBUST.items():
    quote(f"robust.all.{_slug}.runs")(lambda m=_method: _robust("runs", "All settings", m))
    quote(f"robust.all.{_slug}.stalled")(lambda m=_method: _robust("stalled", "All settings", m))
    for _short, _column in ALL_SETTINGS.items():
        quote(f"robust.all.{_slug}.{_short}")(lambda m=_method, c=_column: num(float(_robust(c, "All settings", m)), 1))
for _setting, _slugs in (
    ("mr, noisy1k", ("erm", "rho05_follow_lr", "rho02_constant", "rho02_follow_lr")),
    ("mr, 4k1ep", ("erm", "rho02_constant", "rho02_follow_lr")),
    ("tweets, noisy1k", ("erm",)),
):
    for _slug in _slugs:
        for _short, _column in (("val", "val acc"), ("test", "test acc (final weights)")):
            quote(f"robust.{slug(_setting)}.{_slug}.{_short}")(
                lambda s=_setting, m={"erm": "erm", **ROBUST}[_slug], c=_column: _robust(c, s, m)
            )
for _setting, _slugs in (
    ("mr, noisy1k", ("rho05_constant", "rho05_warmup", "rho05_start_step")),
    ("tweets, noisy1k", ("rho05_constant", "rho05_warmup", "rho05_follow_lr")),
):
    for _short, _column in (("val", "val acc"), ("test", "test acc (final weights)")):
        quote(f"robust.{slug(_setting)}.{'_'.join(s.split('_', 1)[1] for s in _slugs)}.{_short}")(
            lambda s=_setting, ms=tuple(ROBUST[x] for x in _slugs), c=_column: _robust_same(c, s, ms)
        )
quote("robust.rho05.constant")(lambda: _robust("val acc", "mr, noisy1k", ROBUST["rho05_constant"]))
quote("robust.rho05.follow_lr")(lambda: _robust("val acc", "mr, noisy1k", ROBUST["rho05_follow_lr"]))
quote("robust.rho02.runs")(
    lambda: str(sum(int(_robust("runs", "All settings", ROBUST[s])) for s in ("rho02_constant", "rho02_follow_lr")))
)
quote("robust.rho02.follow_lr.val")(
    lambda: num(float(_robust(ALL_SETTINGS["val"], "All settings", ROBUST["rho02_follow_lr"])), 1)
)
quote("robust.rho02.follow_lr.runs")(lambda: _robust("runs", "All settings", ROBUST["rho02_follow_lr"]))
quote("robust.rho02.val")(
    lambda: " / ".join(
        dict.fromkeys(
            num(float(_robust(ALL_SETTINGS["val"], "All settings", ROBUST[s])), 1)
            for s in ("rho02_constant", "rho02_follow_lr")
        )
    )
)
quote("robust.rho02.worst")(
    lambda: num(
        -min(
            float(_robust(ALL_SETTINGS["worst"], "All settings", ROBUST[s]))
            for s in ("rho02_constant", "rho02_follow_lr")
        ),
        1,
        sign=False,
    )
)
quote("robust.4k1ep.rho02_follow_lr.val_std")(
    lambda: _robust("val acc", "mr, 4k1ep", ROBUST["rho02_follow_lr"]).split(" ± ")[1]
)


def _old_default_run() -> dict[str, Any]:
    """δ-SAM at ρ = 0.05 constant on 4,000 mr reviews, seed 1 (the 2026-11-28 study): the check's reference."""
    (run,) = [
        r
        for r in saved("generalization_4k_one_epoch")["runs"]
        if (r["task"], r["method"], r["seed"]) == ("mr", "deltasam", 1)
    ]
    return run


quote("default.val")(lambda: num(100 * saved("default_check")["metrics"]["val/acc"], 1, sign=False))
quote("default.test")(lambda: num(100 * saved("default_check")["metrics"]["test/acc"], 1, sign=False))
quote("default.val_majority")(lambda: f"{100 * saved('default_check')['metrics']['val/majority_share']:.0f}")
quote("default.seconds")(lambda: f"{saved('default_check')['metrics']['time/total_s']:.0f}")
quote("default.old_rho.test")(lambda: num(100 * _old_default_run()["metrics"]["test/acc"], 1, sign=False))
quote("make_train.test")(lambda: num(100 * saved("make_train")["metrics"]["test/acc"], sign=False))
quote("make_train.val")(lambda: num(100 * saved("make_train")["metrics"]["val/acc"], sign=False))
quote("make_train.minutes")(lambda: num(saved("make_train")["wall_s"] / 60, 1, sign=False))
quote("make_train.previous.test")(lambda: num(100 * saved("make_train")["previous"]["test/acc"], sign=False))
quote("make_train.previous.val")(lambda: num(100 * saved("make_train")["previous"]["val/acc"], sign=False))

# --- step costs ----------------------------------------------------------------------------------------------------


def step_costs(name: str, model: str = "minilm") -> dict[str, Any]:
    """A step-cost benchmark's rows by method (``name``.json's ``cost`` or ``results``, one model)."""
    data = saved(name)
    return (data["cost"] if "cost" in data else data["results"])[model]["methods"]


def _cost(name: str, method: str, model: str = "minilm") -> str:
    return num(step_costs(name, model)[method]["vs_erm"], sign=False)


for _method in ("sam", "deltasam(head)", "per_instance"):
    quote(f"overhead.cpu.{_method}")(lambda m=_method: _cost("overhead", m))
for _method in ("sam", "deltasam(head)", "per_instance", "per_instance (batched, chunk 16)", "sam, m=4 (batched)"):
    quote(f"overhead.h200.{_method}")(lambda m=_method: _cost("gpu_check", m))
for _method in ("sam, m=4", "sam, m=4 (batched)", "per_instance", "per_instance (batched, chunk 16)"):
    quote(f"overhead.groups32.{_method}")(lambda m=_method: _cost("overhead_groups_32", m))
FAMILY_COSTS = {
    "sam": "sam",
    "gsam": "gsam",
    "wsam": "wsam",
    "fsam": "fsam",
    "gc": "sam, gradient centralization",
    "policy": "sam, adaptive policy",
    "deltasam": "deltasam(head)",
    "dgsam": "δ-gsam(head)",
    "dfsam": "δ-fsam(head)",
}
"""The overhead benchmark's family rows (``--preset family``) by the name their quotes use."""


def _family(model: str, method: str) -> dict[str, Any]:
    return saved("overhead_family")["results"][model]["methods"][FAMILY_COSTS[method]]


for _slug in FAMILY_COSTS:
    for _model in ("minilm", "small"):
        for _key in ("vs_sam", "vs_erm"):
            quote(f"overhead.family.{_model}.{_slug}.{_key}")(
                lambda s=_slug, k=_key, m=_model: num(_family(m, s)[k], sign=False)
            )
        quote(f"overhead.family.{_model}.{_slug}.copies")(
            lambda s=_slug, m=_model: num(_family(m, s)["parameter_copies"], sign=False)
        )
        quote(f"overhead.family.{_model}.policy_full")(
            lambda m=_model: f"{100 * _family(m, 'policy')['full_fraction']:.0f}%"
        )
quote("regimes.interval5_erm.cost")(lambda: num(_arm("noisy1k/sam interval=5")["cost_vs_erm"], sign=False))

for _method in (
    "erm",
    "sam",
    "asam",
    "deltasam(head)",
    "deltasam(probe K=3, all)",
    "deltasam(probe K=3, top)",
    "deltasam(probe K=3, head)",
    "per_instance",
):
    for _key in ("vs_sam", "vs_erm"):
        quote(f"overhead.cpu.{slug(_method)}.{_key}")(
            lambda m=_method, k=_key: num(step_costs("overhead")[m][k], sign=False)
        )
    quote(f"overhead.cpu.{slug(_method)}.rounded")(
        lambda m=_method: num(step_costs("overhead")[m]["vs_erm"], 1, sign=False)
    )
for _method in ("sam, interval=5", "sam, looksam k=5", "sam, looksam k=10", "deltasam(head), looksam k=5"):
    quote(f"overhead.amortized.{_method}")(lambda m=_method: _cost("overhead_amortized", m))
quote("overhead.amortized.per_instance")(
    lambda: num(step_costs("overhead_amortized")["per_instance"]["vs_erm"], 1, sign=False)
)
quote("overhead.h200.per_instance_batched.rounded")(
    lambda: num(step_costs("gpu_check")["per_instance (batched, chunk 16)"]["vs_erm"], 1, sign=False)
)

BATCHED = {
    "m8": ("sam, m=8", ("sam, m=8 (batched)",)),
    "m4": ("sam, m=4", ("sam, m=4 (batched)",)),
    "per_instance": ("per_instance", ("per_instance (batched, chunk 8)", "per_instance (batched, chunk 16)")),
}
"""The H200 rows of the batched groups: the loop's row and its batched rows."""


def _speedups(loop: str, batched: tuple[str, ...]) -> list[float]:
    """How many times faster the batched passes ran than the loop on the H200, MiniLM and BERT-base."""
    out = []
    for name, model in (("gpu_check", "minilm"), ("gpu_check_bert", "bert-base")):
        rows = step_costs(name, model)
        out += [rows[loop]["median_s"] / rows[b]["median_s"] for b in batched]
    return out


for _group, (_loop, _batched) in BATCHED.items():
    quote(f"overhead.h200.batched_speedup.{_group}")(lambda lo=_loop, b=_batched: span(_speedups(lo, b), 1))
quote("overhead.h200.batched_speedup")(lambda: span([x for lo, b in BATCHED.values() for x in _speedups(lo, b)], 1))


quote("staleness.lag1")(lambda: num(saved("staleness")["cos_by_lag"]["1"], sign=False))

# --- fidelity along a SAM trajectory and its radii (2026-11-28) -----------------------------------------------------


def _sam_traj(variant: str, name: str = "fidelity_sam_trajectory") -> dict[str, Any]:
    return saved(name)["summary"][variant]


def _sam_traj_step(variant: str, step: int) -> float:
    """A variant's mean cos over the probes of one step (every task that reached it)."""
    rows = saved("fidelity_sam_trajectory")["rows"]
    return statistics.mean(r["cos"] for r in rows if (r["variant"], r["step"]) == (variant, step))


SAM_TRAJECTORY = tuple(f"{e}:{b}" for e in ("head", "probe", "probe_top", "exact") for b in ("-1", "-0.5", "0.5", "1"))
for _variant in ("sam", *SAM_TRAJECTORY):
    _name = f"fidelity_sam_trajectory.{_variant_slug(_variant)}"
    quote(_name)(lambda v=_variant: num(_sam_traj(v)["mean"], 3, sign=False))
    quote(f"{_name}.mean_std")(lambda v=_variant: f"{_sam_traj(v)['mean']:.3f} ± {_sam_traj(v)['std']:.3f}")
    quote(f"{_name}.beats")(lambda v=_variant: f"{100 * _sam_traj(v)['beats_sam']:.0f}%")
    for _task in ("mr", "r8", "tweets"):
        quote(f"{_name}.{_task}")(lambda v=_variant, t=_task: num(_sam_traj(v)["per_task"][t], 3, sign=False))
    for _step in (0, 100, 200):
        quote(f"{_name}.step{_step}")(lambda v=_variant, s=_step: num(_sam_traj_step(v, s), 3, sign=False))
quote("fidelity_sam_trajectory.n")(lambda: str(_sam_traj("sam")["n"]))
for _rho in ("0.005", "0.02", "0.1"):
    for _variant in ("sam", "head:-0.5", "head:-1", "exact:-0.5", "exact:-1"):
        _name = f"fidelity_rho.{_rho}.{_variant_slug(_variant)}"
        _file = f"fidelity_rho{_rho}"
        quote(_name)(lambda v=_variant, f=_file: num(_sam_traj(v, f)["mean"], 3, sign=False))
        quote(f"{_name}.beats")(lambda v=_variant, f=_file: f"{100 * _sam_traj(v, f)['beats_sam']:.0f}%")
quote("fidelity_rho.n")(lambda: str(_sam_traj("sam", "fidelity_rho0.02")["n"]))


# ------------------------------------------------------------------------------------- the variants study (issue 48)


def _variants_entry(task: str, arm: str, base: str) -> dict[str, Any] | None:
    found = saved("variants")
    baseline = "early-stopped erm" if base == "erm" else base
    for e in found["primary"] + found["secondary"]:
        if (e["task"], e["arm"], e["baseline"]) == (task, arm, baseline):
            return e
    return None


def _variants_test(task: str, arm: str, base: str) -> str:
    """``mean [low, high] points (W/T/L, n seeds, Holm p)``, or that it has not run."""
    e = _variants_entry(task, arm, base)
    if e is None:
        return "not run yet"
    return f"{interval(e)} points ({wtl(e)} over {e['n']} seeds, Holm p {p_value(e['p_holm'])})"


def _variants_chosen(task: str, arm: str) -> str:
    rho = saved("variants")["chosen"][task][arm]
    return "not chosen yet" if rho is None else f"{rho:g}"


for _v_arm, _v_base in [
    *[(a, "sam") for a in ("gsam", "wsam", "fsam", "ae-sam", "δ-sam")],
    *[(a, "erm") for a in ("sam", "δ-sam", "gsam", "wsam", "fsam", "ae-sam")],
    *[(a, b) for a in ("δ-gsam", "δ-fsam") for b in ("sam", "δ-sam", "gsam", "wsam", "fsam", "ae-sam")],
]:
    _v_name = f"variants.mr.{slug(_v_arm.replace('δ-', 'delta_'))}.{slug(_v_base.replace('δ-', 'delta_'))}"
    quote(_v_name)(lambda a=_v_arm, b=_v_base: _variants_test("mr", a, b))
    quote(f"{_v_name}.p")(
        lambda a=_v_arm, b=_v_base: "–" if (e := _variants_entry("mr", a, b)) is None else f"{e['p']:.2f}"
    )
for _v_arm in ("sam", "gsam", "wsam", "fsam", "ae-sam", "δ-sam", "δ-gsam", "δ-fsam"):
    quote(f"variants.mr.{slug(_v_arm.replace('δ-', 'delta_'))}.rho")(lambda a=_v_arm: _variants_chosen("mr", a))


def _variants_full(task: str) -> str:
    """AE-SAM's share of full steps over its comparison runs: the mean, and the range over seeds."""
    shares = saved("variants")["comparison"][task].get("ae-sam", {}).get("full_fraction") or []
    if not shares:
        return "not run yet"
    return f"{100 * statistics.mean(shares):.0f}% ({span([100 * x for x in shares], 0)}% over {len(shares)} seeds)"


quote("variants.mr.ae_sam.full_fraction")(lambda: _variants_full("mr"))
quote("variants.mr.half_widths")(
    lambda: span(
        [
            100 * (e["ci"][1] - e["ci"][0]) / 2
            for e in saved("variants")["primary"]
            if (e["task"], e["arm"], e["baseline"]) != ("mr", "δ-sam", "sam")
        ],
        1,
    )
)
quote("variants.mr.sam_widths")(
    lambda: span(
        [
            100 * (e["ci"][1] - e["ci"][0])
            for e in saved("variants")["primary"]
            if e["task"] == "mr" and e["baseline"] == "sam" and e["arm"] != "δ-sam"
        ],
        1,
    )
)


def _variants_reweighting(task: str) -> str:
    """The span of the 95% intervals of each δ- arm against the method it reweights: ``low to high`` points."""
    found = [_variants_entry(task, f"δ-{b}", b) for b in ("sam", "gsam", "fsam")]
    if any(e is None for e in found):
        return "not run yet"
    lows, highs = zip(*(e["ci"] for e in found if e is not None), strict=True)
    return f"{num(100 * min(lows), 2)} to {num(100 * max(highs), 2)}"


quote("variants.mr.reweighting_span")(lambda: _variants_reweighting("mr"))


quote("variants.mr.minutes")(
    lambda: span(
        [
            t / 60
            for part in ("selection", "comparison")
            for arm in saved("variants")[part]["mr"].values()
            for t in arm["time_s"]
        ],
        0,
    )
)

quote("fidelity.intervals")(lambda: str(len(re.findall(r"\[[^\[\]]+, [^\[\]]+\]", saved("fidelity")["table"]))))


# --- run times, sizes and single measurements quoted in prose ------------------------------------------------------


def sci(x: float, digits: int = 1) -> str:
    """A small number as the prose writes it: ``1.8e-4``, ``9e-7`` (``digits`` after the point)."""
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@functools.lru_cache(maxsize=None)
def study_rows(name: str) -> tuple[dict[str, Any], ...]:
    """The rows of runs.jsonl (runs_gpu.jsonl) that a study's report reads: its run times, curves and seeds."""
    from benchmarks.lab import provenance

    return tuple(provenance.rows(name))


def _family_of(row: dict[str, Any]) -> str:
    return row["method"].split()[0]


def _seconds(rows: Sequence[dict[str, Any]]) -> str:
    """The shortest and the longest ``time_s`` of ``rows``, whole seconds."""
    return span([r["time_s"] for r in rows], 0)


def _general_runs(per_instance: bool = False) -> list[dict[str, Any]]:
    return [r for r in study_rows("generalization") if (_family_of(r) == "per_instance") == per_instance]


quote("generalization.runs.hours")(
    lambda: num(sum(r["time_s"] for r in study_rows("generalization")) / 3600, 1, sign=False)
)
quote("generalization.runs.hours.whole")(
    lambda: num(sum(r["time_s"] for r in study_rows("generalization")) / 3600, 0, sign=False)
)
quote("generalization.runs.main.n")(lambda: str(len(_general_runs())))
quote("generalization.runs.main.hours")(lambda: num(sum(r["time_s"] for r in _general_runs()) / 3600, 1, sign=False))
for _task in ("mr", "tweets"):
    for _who, _fams in (("sam", ("sam", "deltasam")), ("erm", ("erm",))):
        quote(f"generalization.runs.{_task}.{_who}.seconds")(
            lambda t=_task, f=_fams: _seconds([r for r in _general_runs() if r["task"] == t and _family_of(r) in f])
        )
quote("generalization.runs.per_instance.seconds")(lambda: _seconds(_general_runs(True)))
quote("generalization.runs.per_instance.minutes")(
    lambda: num(sum(r["time_s"] for r in _general_runs(True)) / 60, 0, sign=False)
)
quote("generalization.runs.per_instance.vs_sam")(
    lambda: num(
        statistics.mean(r["time_s"] for r in _general_runs(True))
        / statistics.mean(
            r["time_s"]
            for r in _general_runs()
            if (r["task"], r["setting"], r["method"]) == ("mr", "clean1k", "sam rho=0.02 follow_lr")
        ),
        1,
        sign=False,
    )
)


def _general_curve(task: str, setting: str, family: str, epoch: int) -> float:
    """Validation accuracy (%) after ``epoch`` (1-based) of one method's comparison runs, mean over seeds."""
    method = "erm" if family == "erm" else saved("generalization")["chosen"][f"{task}/{setting}/{family}"]
    runs = [
        r
        for r in study_rows("generalization")
        if (r["task"], r["setting"], r["method"]) == (task, setting, method) and r["seed"] < 100
    ]
    return 100 * statistics.mean(r["curve"][epoch - 1][1] for r in runs)


quote("generalization.curve.mr.plateau")(
    lambda: num(max(_general_curve("mr", s, f, 1) for s in SETTINGS for f in ("erm", "sam", "deltasam")), 1, sign=False)
)
quote("generalization.curve.mr_noisy.epoch2.slowest")(
    lambda: num(min(_general_curve("mr", "noisy1k", f, 2) for f in ("sam", "deltasam")), 1, sign=False)
)
quote("generalization.curve.mr_noisy.epoch2.erm")(lambda: num(_general_curve("mr", "noisy1k", "erm", 2), 1, sign=False))
for _task in ("mr", "tweets"):
    quote(f"generalization_4k.{_task}.behind_erm")(
        lambda t=_task: num(
            statistics.mean(_runs_4k(t, m, "test/acc") for m in ("sam", "deltasam")) * 100
            - 100 * _runs_4k(t, "erm", "test/acc"),
            0,
        )
    )


def _robust_runs(family: str) -> list[dict[str, Any]]:
    """robust-defaults' mr rows of one family (for SAM only the ρ = 0.02 grid)."""
    return [
        r
        for r in study_rows("robust_defaults")
        if r["task"] == "mr" and _family_of(r) == family and (family == "erm" or "rho=0.02" in r["method"])
    ]


for _fam in ("sam", "erm"):
    quote(f"robust.runs.{_fam}.seconds")(lambda f=_fam: _seconds(_robust_runs(f)))
    quote(f"robust.runs.{_fam}.minutes")(
        lambda f=_fam: num(statistics.mean(r["time_s"] for r in _robust_runs(f)) / 60, 0, sign=False)
    )


def _robust_others_max() -> str:
    """The longest mr run of robust-defaults outside :func:`_robust_runs`."""
    quoted = _robust_runs("sam") + _robust_runs("erm")
    return f"{max(r['time_s'] for r in study_rows('robust_defaults') if r['task'] == 'mr' and r not in quoted):.0f}"


quote("robust.runs.others.max_seconds")(_robust_others_max)


def _robust_test_gain(method: str) -> str:
    """SAM's test accuracy − ERM's on mr noisy1k (final weights, means over the seeds), from the study's rows."""

    def mean(m: str) -> float:
        return statistics.mean(
            r["metrics"]["test_final/acc"]
            for r in study_rows("robust_defaults")
            if (r["task"], r["setting"], r["method"]) == ("mr", "noisy1k", m)
        )

    return num(100 * (mean(method) - mean("erm")), 1)


for _slug in ("rho02_constant", "rho02_follow_lr"):
    quote(f"robust.mr_noisy1k.{_slug}.test_gain")(lambda m=ROBUST[_slug]: _robust_test_gain(m))


def _premise_mr(arm: str, i: int) -> str:
    """The ``i``-th selection seed's final validation accuracy on noisy mr (0: seed 101, 1: seed 102)."""
    return f"{100 * saved('premise_gpu')['selection']['mr, 20% noise']['arms'][arm]['val'][i]:.2f}"


for _i, _seed in enumerate((101, 102)):
    quote(f"premise.mr_val.seed{_seed}")(
        lambda i=_i: (
            f"{_premise_mr('per_instance rho=0.01 follow_lr', i)} against SAM's "
            f"{_premise_mr('sam rho=0.05 follow_lr', i)}"
        )
    )
quote("premise.tweets_val")(
    lambda: (
        f"{100 * _premise_val('tweets, 20% noise')['val']:.2f} against "
        f"{100 * _premise_val('tweets, 20% noise')['sam_val']:.2f}"
    )
)


def _premise_stalls() -> str:
    """Stalled per-instance SAM runs of the premise study: every selection run and the comparison's."""
    runs = [
        a
        for s in saved("premise_gpu")["selection"].values()
        for name, a in s["arms"].items()
        if name.startswith("per_instance")
    ]
    c = _premise()
    stalled = sum(a["stalled"] for a in runs) + c["stalled"]["per-instance"]
    return f"{stalled} of {sum(len(a['val']) for a in runs) + len(c['seeds'])}"


quote("premise.pi_stalled")(_premise_stalls)
quote("regimes.per_instance_sam.lost")(
    lambda: num(-_regimes_diff("noisy1k/per-instance (m=1)", "SAM final, same ρ")["mean"], 0, sign=False)
)
quote("regimes.deltasam05_40.stalled.n")(lambda: str(_arm("noisy40/deltasam")["stalled"]))
quote("regimes.noisy40.seed13.val")(
    lambda: span(
        [
            100 * _arm(f"noisy40/{a}")["val_final"][_arm(f"noisy40/{a}")["seeds"].index(13)]
            for a in ("sam", "deltasam", "m-sam m=4")
        ],
        1,
    )
)


def _unstalled_erm_final() -> list[float]:
    return [
        a["differences"]["ERM final"]["mean"]
        for name, a in saved("regimes")["arms"].items()
        if name.startswith(("noisy1k/", "noisy40/")) and not name.endswith("/erm") and a["stalled"] == 0
    ]


quote("regimes.mr_unstalled_erm_final_range")(lambda: span(_unstalled_erm_final(), 1))
for _name, _arm_name in (("erm_erm_best", "noisy1k/erm"), ("erm40_erm_best", "noisy40/erm")):
    quote(f"regimes.{_name}.gap")(lambda a=_arm_name: num(-_regimes_diff(a, "early-stopped ERM")["mean"], sign=False))
for _method in ("sam, m=8", "sam, m=4"):
    quote(f"overhead.regimes.{_method}.vs_sam.rounded")(
        lambda m=_method: num(step_costs("overhead_regimes")[m]["vs_sam"], 1, sign=False)
    )
quote("overhead.cpu.sam.whole")(lambda: num(step_costs("overhead")["sam"]["vs_erm"], 0, sign=False))
quote("overhead.cpu.per_instance.vs_sam.whole")(
    lambda: num(step_costs("overhead")["per_instance"]["vs_sam"], 0, sign=False)
)
quote("regimes.m4.cost.whole")(lambda: num(_arm("noisy1k/m-sam m=4")["cost_vs_erm"], 0, sign=False))


def _looksam_bookkeeping() -> list[float]:
    """LookSAM's measured step × ERM less a cycle's (k + 1)/k ERM steps (one full step of 2, k − 1 plain ones)."""
    rows = step_costs("overhead_amortized")
    return [rows[f"sam, looksam k={k}"]["vs_erm"] - (k + 1) / k for k in (5, 10)]


quote("overhead.amortized.looksam_bookkeeping")(lambda: span(_looksam_bookkeeping()))
for _where, _name in (("cpu", "compile_cpu"), ("h200", "gpu_check")):
    for _m in ("erm", "sam"):
        quote(f"compile.{_where}.{_m}")(
            lambda n=_name, m=_m: num(saved(n)["compile"][m]["compiled_vs_eager"], sign=False)
        )
    quote(f"compile.{_where}.weights")(
        lambda n=_name: sci(max(saved(n)["compile"][m]["max_weight_difference"] for m in ("erm", "sam")))
    )


def _largest(study: str, part: str, key: str) -> float:
    """The largest ``key`` over the entries of ``study``.json's ``part`` that record it."""
    return max(v[key] for v in saved(study)[part].values() if isinstance(v, dict) and key in v)


quote("gpu.syncs.weights")(lambda: sci(_largest("gpu_check", "syncs", "max_weight_difference_to_host_path"), 0))
quote("fidelity_check.cos")(lambda: sci(max(v["max_abs_diff_cos"] for v in saved("fidelity_check")["max"].values())))
quote("fidelity_check.rel_err")(
    lambda: sci(max(v["max_abs_diff_rel_err"] for v in saved("fidelity_check")["max"].values()))
)
quote("fidelity.pooled.mean")(lambda: num(_fidelity_pooled()[0], 3))
quote("fidelity.pooled.ci")(lambda: f"[{num(_fidelity_pooled()[1][0], 3)}, {num(_fidelity_pooled()[1][1], 3)}]")
quote("run_size.checkpoint_mb")(
    lambda: f"{saved('run_size')['after']['runs']['debug_fast']['files_over_1MB']['checkpoints/step4.ckpt'] / 1e6:.0f}"
)
quote("run_size.debug_fast_mb")(lambda: f"{saved('run_size')['after']['runs']['debug_fast']['bytes'] / 1e6:.0f}")
quote("run_size.optuna_trial_kb")(lambda: f"{saved('run_size')['after']['runs']['optuna_trial']['bytes'] / 1e3:.0f}")


def _landscape(who: str) -> dict[str, Any]:
    return saved("landscape_mr_noisy_s11")["checkpoints"][who]


for _who in ("ERM", "SAM"):
    quote(f"landscape.{_who.lower()}.loss_at_w")(
        lambda w=_who: num(
            _landscape(w)["loss"][
                min(
                    range(len(saved("landscape_mr_noisy_s11")["axis"])),
                    key=lambda i: abs(saved("landscape_mr_noisy_s11")["axis"][i]),
                )
            ],
            3,
            sign=False,
        )
    )
    quote(f"landscape.{_who.lower()}.eigen")(lambda w=_who: f"{max(_landscape(w)['hessian_top'], key=abs):.0f}")


def _stall_curves() -> tuple[list[list[list[float]]], list[list[list[float]]]]:
    """The validation curves of runs.jsonl's fine-tuning rows (tests/test_stall.py's): unstalled, stalled."""
    rows = [r for r in load_jsonl(RESULTS / "runs.jsonl") if r.get("curve")]
    return [r["curve"] for r in rows if not r["stalled"]], [r["curve"] for r in rows if r["stalled"]]


def _warned(curve: list[list[float]]) -> bool:
    from lit_deltasam.models.classifier import PLATEAU_SHARE, PLATEAU_STEPS

    total = curve[-1][0] + 1
    return any(share == 1.0 and s + 1 >= max(PLATEAU_STEPS, PLATEAU_SHARE * total) for s, _, share in curve)


quote("stall.healthy.n")(lambda: str(len(_stall_curves()[0])))
quote("stall.healthy.last_step")(
    lambda: f"{max(s + 1 for c in _stall_curves()[0] for s, _, share in c if share == 1.0):.0f}"
)
quote("stall.healthy.last_share")(
    lambda: (
        f"{100 * max((s + 1) / (c[-1][0] + 1) for c in _stall_curves()[0] for s, _, share in c if share == 1.0):.0f}%"
    )
)
quote("stall.stalled.warned")(lambda: f"{sum(_warned(c) for c in _stall_curves()[1])} of the {len(_stall_curves()[1])}")


def _superseded_lr(task: str) -> str:
    (row,) = [r for r in load_jsonl(RESULTS / "runs_superseded.jsonl") if r["task"] == task]
    return lr_text(row["metrics"]["tune_lr/lr"])


for _task in ("mr", "r8"):
    quote(f"recipe.superseded.{_task}.lr")(lambda t=_task: _superseded_lr(t))


def _recipe_seeds(lr: str) -> str:
    """r8 2k3ep ERM at one fixed LR: final validation accuracy (%) of each selection seed, ``a / b``."""
    runs = sorted(
        (
            r
            for r in study_rows("recipe")
            if (r["task"], r["setting"], r["method"]) == ("r8", "2k3ep", "erm")
            and f"optim.lr={lr}" in r["overrides"]
            and not any("tune_lr" in o for o in r["overrides"])
        ),
        key=lambda r: r["seed"],
    )
    return " / ".join(f"{100 * r['metrics']['val/acc']:.2f}" for r in runs)


for _lr in ("5e-05", "0.0002"):
    quote(f"recipe.r8.{slug(_lr)}.val_by_seed")(lambda lr=_lr: _recipe_seeds(lr))


def _phase3_minutes() -> str:
    """From the first start to the last end of the CPU suite's phase 3 (δ-SAM on the main job), by the rows'
    ``date`` (their end, to the minute) less ``time_s``."""
    import datetime as dt

    rows = [r for r in study_rows("recipe_suite") if r["setting"] == "full1ep" and _family_of(r) == "deltasam"]
    ends = [dt.datetime.strptime(r["date"], "%Y-%m-%d %H:%M UTC") for r in rows]
    starts = [e - dt.timedelta(seconds=r["time_s"]) for e, r in zip(ends, rows)]
    return f"{(max(ends) - min(starts)).total_seconds() / 60:.0f}"


quote("suite.cpu.phase3.minutes")(_phase3_minutes)
quote("suite.cpu.phase3.runs")(
    lambda: str(sum(r["setting"] == "full1ep" and _family_of(r) == "deltasam" for r in study_rows("recipe_suite")))
)

# --- the prose around the generated step-cost tables (benchmarks/lab/tables.py) -------------------------------------


def _extra(x: float) -> str:
    """A step's cost over SAM's as the prose writes it: ``+77%``."""
    return f"{num(100 * (x - 1), 0)}%"


for _model, _where in (("minilm", "cpu"), ("small", "small")):
    for _method in ("deltasam(probe K=3, all)", "deltasam(probe K=3, top)", "deltasam(probe K=3, head)"):
        quote(f"overhead.{_where}.{slug(_method)}.extra")(
            lambda m=_method, mo=_model: _extra(step_costs("overhead", mo)[m]["vs_sam"])
        )
quote("overhead.cpu.per_instance.vs_sam.rounded")(
    lambda: num(step_costs("overhead")["per_instance"]["vs_sam"], 1, sign=False)
)
quote("overhead.cpu.erm.median_s")(lambda: num(step_costs("overhead")["erm"]["median_s"], sign=False))
quote("overhead.amortized.sam_interval_5.vs_sam")(
    lambda: num(step_costs("overhead_amortized")["sam, interval=5"]["vs_sam"], sign=False)
)
REGIMES_COSTS = (
    "erm",
    "sam",
    "deltasam(head)",
    "per_instance",
    "sam, m=8",
    "sam, m=4",
    "sam, interval=5",
    "sam, looksam k=5",
    "sam, looksam k=10",
    "deltasam(head), looksam k=5",
)
"""The rows of overhead_regimes.json (``--preset regimes``)."""


def _over_plain(method: str) -> float:
    """A method's peak tensor memory in parameter copies over the plain loop's (no engine)."""
    result = saved("overhead_regimes")["results"]["minilm"]
    return result["methods"][method]["parameter_copies"] - result["memory_reference"]["parameter_copies"]


for _method in REGIMES_COSTS:
    for _key in ("vs_sam", "vs_erm"):
        quote(f"overhead.regimes.{slug(_method)}.{_key}")(
            lambda m=_method, k=_key: num(step_costs("overhead_regimes")[m][k], sign=False)
        )
    quote(f"overhead.regimes.{slug(_method)}.copies")(lambda m=_method: num(_over_plain(m)))
    quote(f"overhead.regimes.{slug(_method)}.copies.rounded")(lambda m=_method: num(_over_plain(m), 1))
quote("overhead.regimes.per_instance.vs_erm.rounded")(
    lambda: num(step_costs("overhead_regimes")["per_instance"]["vs_erm"], 1, sign=False)
)
quote("overhead.regimes.looksam_headroom")(
    lambda: num(
        saved("overhead_regimes")["targets"]["sam, looksam k=5 vs_erm"]
        - step_costs("overhead_regimes")["sam, interval=5"]["vs_erm"],
        sign=False,
    )
)
quote("overhead.regimes.looksam_bookkeeping")(
    lambda: num(
        step_costs("overhead_regimes")["sam, looksam k=5"]["vs_erm"]
        - step_costs("overhead_regimes")["sam, interval=5"]["vs_erm"]
    )
)


SIDE_BY_SIDE = ("c5cf503", "HEAD")
"""The two codes run side by side on 2026-12-02: the 11-28 code and that day's."""


def _side_by_side_runs(root: str, length: int) -> list[dict[str, Any]]:
    """The runs of one code at one length, in the order they alternated."""
    rows = load_jsonl(RESULTS / "per_instance_side_by_side.jsonl")
    return [r for r in rows if r["length"] == length and r["root"].startswith(root)]


def _side_by_side_spread() -> float:
    """The largest difference between two runs of one code at one length, in percent of the smaller."""
    return max(
        100 * (max(costs) / min(costs) - 1)
        for root in SIDE_BY_SIDE
        for length in (32, 48)
        for costs in [[r["loop_x_erm"] for r in _side_by_side_runs(root, length)]]
    )


quote("overhead.side_by_side.before")(lambda: span([r["loop_x_erm"] for r in _side_by_side_runs("c5cf503", 48)]))
quote("overhead.side_by_side.now")(lambda: span([r["loop_x_erm"] for r in _side_by_side_runs("HEAD", 48)]))
quote("overhead.side_by_side.now.low")(
    lambda: num(min(r["loop_x_erm"] for r in _side_by_side_runs("HEAD", 48)), 1, sign=False)
)
quote("overhead.side_by_side.spread")(lambda: f"{_side_by_side_spread():.0f}%")


def _side_by_side_change(lengths: tuple[int, ...] = (32, 48)) -> list[float]:
    """Today's loop × ERM against the 11-28 code's run beside it (the n-th of each), in percent."""
    return [
        100 * (now["loop_x_erm"] / then["loop_x_erm"] - 1)
        for length in lengths
        for then, now in zip(_side_by_side_runs("c5cf503", length), _side_by_side_runs("HEAD", length))
    ]


quote("overhead.side_by_side.before.erm48")(
    lambda: num(statistics.mean(r["erm"] for r in _side_by_side_runs("c5cf503", 48)), sign=False)
)
for _name, _lengths in (("change", (32, 48)), ("change32", (32,))):
    quote(f"overhead.side_by_side.{_name}")(
        lambda n=_lengths: f"{num(min(_side_by_side_change(n)), 1)}% to {num(max(_side_by_side_change(n)), 1)}%"
    )
quote("overhead.side_by_side.vmap_over_loop")(
    lambda: span(
        [r["vmap_x_erm"] / r["loop_x_erm"] for r in load_jsonl(RESULTS / "per_instance_side_by_side.jsonl")], 1
    )
)
PROFILE_OPS = {
    "mm": ("aten::mm",),
    "addmm": ("aten::addmm",),
    "bmm": ("aten::bmm",),
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "fill": ("aten::fill_",),
    "add": ("aten::add_",),
    "copy": ("aten::copy_",),
    "norm": ("aten::linalg_vector_norm",),
    "elementwise": ("aten::fill_", "aten::add_", "aten::copy_", "aten::linalg_vector_norm"),
}
"""The operators of profile_per_instance.json that each share the overhead page quotes adds up."""


def _profile_share(ops: tuple[str, ...]) -> float:
    return 100 * sum(o["share"] for o in saved("profile_per_instance")["ops"] if o["op"] in ops)


for _short, _ops in PROFILE_OPS.items():
    quote(f"profile.per_instance.{_short}")(
        lambda o=_ops, s=_short: num(_profile_share(o), 0 if s == "elementwise" else 1, sign=False)
    )
quote("profile.per_instance.seconds")(lambda: num(saved("profile_per_instance")["self_cpu_s"], 1, sign=False))
H200_COSTS = ("sam, m=4 (batched)", "per_instance (batched, chunk 16)")
for _method in H200_COSTS:
    quote(f"overhead.h200.{slug(_method)}.vs_sam")(
        lambda m=_method: num(step_costs("gpu_check")[m]["vs_sam"], sign=False)
    )
    for _key in ("vs_sam", "vs_erm"):
        quote(f"overhead.h200.bert.{slug(_method)}.{_key}")(
            lambda m=_method, k=_key: num(step_costs("gpu_check_bert", "bert-base")[m][k], sign=False)
        )
quote("gpu.fp16.scales")(
    lambda: " → ".join(
        f"{s:,.0f}"
        for s in dict.fromkeys(saved("gpu_check")["precision"]["16-mixed sam"]["scales"])  # in order, once
    )
)
quote("gpu.ascent_overflow.rel")(
    lambda: sci(_largest("gpu_check_bert", "ascent_overflow", "update_relative_difference_to_erm"))
)
quote("gpu.syncs.m8")(lambda: str(max(saved("gpu_check")["syncs"]["sam, m=8"]["cuda_syncs_per_step"])))


def _syncs(*methods: str, step: slice = slice(None)) -> str:
    """The CUDA synchronizing calls per step of ``methods`` (every one but the m-sharpness loop when none) on the
    H200, as ``n`` or ``low–high``."""
    rows = saved("gpu_check")["syncs"]
    names = methods or [m for m, v in rows.items() if isinstance(v, dict) and m != "sam, m=8" and "Lightning" not in m]
    counts = [n for m in names for n in rows[m]["cuda_syncs_per_step"][step]]
    return str(counts[0]) if min(counts) == max(counts) else span(counts, 0)


quote("gpu.syncs.cuda")(lambda: _syncs(step=slice(1, None)))
quote("gpu.syncs.erm_first")(lambda: _syncs("erm", step=slice(0, 1)))
quote("gpu.syncs.lightning")(lambda: _syncs("mixin sam, Lightning logging every step"))

quote("gpu.syncs.host_reads")(
    lambda: "/".join(
        sorted(
            {
                str(n)
                for v in saved("gpu_check")["syncs"].values()
                if isinstance(v, dict)
                for n in v.get("host_reads_per_step", [])
            }
        )
    )
)
for _method, _key in (("sam, m=4", "vs_sam"), ("per_instance", "vs_erm")):
    quote(f"overhead.groups32.{slug(_method)}.miss")(
        lambda m=_method, k=_key: num(
            step_costs("overhead_groups_32")[m][k] - saved("overhead_groups_32")["targets"][f"{m} {k}"], sign=False
        )
    )
quote("staleness.later")(
    lambda: num(statistics.mean(c for lag, c in saved("staleness")["cos_by_lag"].items() if lag != "1"), sign=False)
)
