"""Every number the README and the docs quote from a study, rebuilt from the committed results.

A page quotes a number between inline markers, ``<!-- q:NAME -->+0.09 [−0.47, +0.64]<!-- /q -->``, and
:mod:`benchmarks.lab.fill_docs` writes :data:`QUOTES` ``[NAME]()`` there; tests/test_doc_numbers.py rebuilds every
marker of every page and fails on any difference, so a number edited by hand (or a row changed under it) is caught.
Each quote reads the committed JSON in docs/results (and, where a study's JSON keeps no such number, its rows).
"""

from __future__ import annotations

import functools
import json
import re
import statistics
from collections.abc import Callable
from typing import Any

from benchmarks.lab.common import RESULTS, load_jsonl
from benchmarks.lab.stats import bootstrap, holm, paired

QUOTES: dict[str, Callable[[], str]] = {}


def quote(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a quote; a method's name becomes a marker's (``sam, m=4 (batched)`` → ``sam_m_4_batched``)."""

    def register(fn: Callable[[], str]) -> Callable[[], str]:
        QUOTES[re.sub(r"[^a-z0-9_.]+", "_", name.lower()).strip("_")] = fn
        return fn

    return register


@functools.lru_cache(maxsize=None)
def saved(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text())


def num(x: float, digits: int = 2, sign: bool = True) -> str:
    """A number as the prose writes it: a real minus sign, ``+`` on a positive difference."""
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text.replace("-", "−")


def interval(d: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    """``mean [low, high]``."""
    low, high = d["ci"]
    return f"{num(scale * d['mean'], digits)} [{num(scale * low, digits)}, {num(scale * high, digits)}]"


def wtl(d: dict[str, Any]) -> str:
    return f"{d['wins']}/{d['ties']}/{d['losses']}"


def p_value(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


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


def _unique(diffs: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for d in diffs.values():
        if d is not None and all(d != o for o in out):
            out.append(d)
    return out


quote("regimes.family")(lambda: str(saved("regimes")["family"]))
quote("regimes.distinct")(lambda: str(len(_distinct())))
quote("regimes.repeats")(lambda: str(saved("regimes")["family"] - len(_distinct())))


def _surviving_arms() -> str:
    arms = [
        name
        for name, a in saved("regimes")["arms"].items()
        if any(d["p_holm"] <= 0.05 for d in _unique(a["differences"]))
    ]
    return str(len(arms))


quote("regimes.surviving_arms")(_surviving_arms)
for _name, _arm_key, _label in (
    ("interval5_erm", "noisy1k/sam interval=5", "ERM final"),
    ("sam02_40_erm", "noisy40/sam at m-sam's ρ", "ERM final"),
    ("sam02_20_erm", "noisy1k/sam at m-sam's ρ", "ERM final"),
    ("sam02_40_erm_best", "noisy40/sam at m-sam's ρ", "early-stopped ERM"),
    ("m4_tweets_erm_best", "tweets noisy1k/m-sam m=4", "early-stopped ERM"),
    ("m4_tweets_sam", "tweets noisy1k/m-sam m=4", "SAM final, same ρ"),
    ("deltasam_sam_mr", "noisy1k/deltasam", "SAM final"),
    ("sam40_erm", "noisy40/sam", "ERM final"),
):
    quote(f"regimes.{_name}")(lambda a=_arm_key, lab=_label: interval(_regimes_diff(a, lab), scale=1.0))
    quote(f"regimes.{_name}.wtl")(lambda a=_arm_key, lab=_label: wtl(_regimes_diff(a, lab)))
    quote(f"regimes.{_name}.p_holm")(lambda a=_arm_key, lab=_label: p_value(_regimes_diff(a, lab)["p_holm"]))
quote("regimes.sam02_40_erm.p_holm_distinct")(lambda: p_value(_distinct_holm("noisy40/sam at m-sam's ρ", "ERM final")))
quote("regimes.interval5_erm.p_holm_distinct")(lambda: p_value(_distinct_holm("noisy1k/sam interval=5", "ERM final")))
for _name, _arm_key in (
    ("sam05_40", "noisy40/sam"),
    ("msam_40", "noisy40/m-sam m=4"),
    ("sam02_40", "noisy40/sam at m-sam's ρ"),
    ("looksam", "noisy1k/sam looksam k=5"),
    ("deltasam05_40", "noisy40/deltasam"),
):
    quote(f"regimes.{_name}.stalled")(lambda a=_arm_key: f"{_arm(a)['stalled']} of {len(_arm(a)['seeds'])}")


def _unstalled_range() -> str:
    """mr's arms that stall on no seed, final weights − early-stopped ERM: the smallest and the largest mean."""
    means = [
        a["differences"]["early-stopped ERM"]["mean"]
        for name, a in saved("regimes")["arms"].items()
        if name.startswith(("noisy1k/", "noisy40/")) and not name.endswith("/erm") and a["stalled"] == 0
    ]
    return f"{num(min(means))} to {num(max(means))}"


quote("regimes.mr_unstalled_range")(_unstalled_range)

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
quote("suite.sweep.worst")(
    lambda: num(100 * max(v["regret"] for v in saved("recipe_suite_gpu")["lr_sweep"].values()), sign=False)
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

# --- fidelity and generalization -----------------------------------------------------------------------------------


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

# --- step costs ----------------------------------------------------------------------------------------------------


def _cost(name: str, method: str, model: str = "minilm") -> str:
    data = saved(name)
    methods = (data["cost"] if "cost" in data else data["results"])[model]["methods"]
    return num(methods[method]["vs_erm"], sign=False)


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
