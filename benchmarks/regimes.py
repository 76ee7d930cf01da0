"""Where sharpness-aware fine-tuning pays, and at what cost: m-sharpness, stronger label noise, the cheap modes.

Protocol (MiniLM on mr, and tweets for a repeat, max length 32, the app's recipe but for the learning rate; rows
through benchmarks/lab/runs.py, shared with the earlier studies wherever a configuration is
identical):

* settings: ``noisy1k`` (setting 1, the headline: seeded 1,000-instance training subsets,
  5 epochs, 20% of the training labels flipped) and ``noisy40`` (setting 2: the same with
  40% flipped); validation and test are the full, clean splits;
* step 0, the base recipe: ERM's learning rate, chosen from ``--lrs`` on mean final
  validation accuracy over the selection seeds, in each setting; every arm of a setting runs
  at its LR, and every row writes its LR into its overrides;
* step 1, ρ: for SAM and for m-SAM with m = 4, from ``--rhos`` with the shipped ``follow_lr``
  schedule, on mean final validation accuracy over the selection seeds in setting 1 (used in
  both settings). The δ-SAM arms, ``interval`` and LookSAM take SAM's ρ; m = 8 and exact
  per-instance SAM take m = 4's. m = 8 also runs on the selection seeds, so that the m-SAM arm
  of setting 2 (the better of m = 4 and m = 8) is chosen on validation before any comparison;
* arms of setting 1: ERM; SAM; SAM at m-SAM's ρ (the m-SAM arms' reference at equal radius);
  δ-SAM as shipped; δ-SAM with β = +1 (up-weights sharp instances, the RW-SAM reading); m-SAM
  with m = 8 and m = 4; exact per-instance SAM (m = 1); SAM with ``interval=5``; SAM with
  LookSAM, k = 5. Arms of setting 2: ERM, SAM, SAM at m-SAM's ρ, δ-SAM and the chosen m-SAM arm;
* the tweets repeat, so that the reading does not rest on one task: ``tweets noisy1k`` (tweets, otherwise
  setting 1), with its own step 0 and setting 2's arms at setting 1's ρ, on the first ``--tweets-seeds`` of
  ``--seeds``; its comparison runs after the mr comparison is complete, as it is the budget's remainder;
* seeds: ``--seeds`` (11-18) for every arm, seed-major so that partial results stay paired
  and balanced; ``--per-instance-seeds`` bounds the costly per-instance arm (5 by default: at
  10.6× ERM a step it is a third of a seed's CPU time);
* never chosen on test; no seed dropped. The test split is scored with the final weights
  and with the best-validation checkpoint; every arm is compared, paired by seed, against
  ERM's final weights, ERM's best-validation checkpoint (early-stopped ERM) and SAM, with
  Student-t 95% intervals (df = pairs − 1), wins/ties/losses and the paired t-test's p, Holm-adjusted over every
  difference of the comparison table; the arms and settings added after the first results (``POST_HOC``) are marked;
* cost: each arm's step cost × ERM from ``benchmarks/perf/overhead.py --preset regimes`` (one
  interleaved run at batch 32, length 32, on an idle machine), read from
  ``docs/results/overhead_regimes.json`` when it is there.

Resumable: finished runs are rows of docs/results/runs.jsonl and are skipped.

    python -m benchmarks.regimes                   # the whole protocol (about 6 h of CPU)
    python -m benchmarks.regimes --stage select    # steps 0 and 1 only
    python -m benchmarks.regimes --report          # docs/results/regimes.json, frontier.png, m_curve.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Optional

from benchmarks.generalization import test_best, test_final, val
from benchmarks.lab.common import RESULTS, save
from benchmarks.lab.runs import SETTINGS, STALL_SHARE, Method, key, rows_by_key
from benchmarks.lab.scheduler import run_all
from benchmarks.lab.stats import holm, mean_std, paired
from lit_deltasam import DeltaSAMConfig

HEADLINE, STRONG, TWEETS = "noisy1k", "noisy40", "tweets noisy1k"
PLACES = {HEADLINE: ("mr", "noisy1k"), STRONG: ("mr", "noisy40"), TWEETS: ("tweets", "noisy1k")}
"""Each study setting's task and its benchmarks/lab/runs.py setting."""
COST_FILE = RESULTS / "overhead_regimes.json"


def shipped(method: str, rho: Optional[float] = None, extra: tuple = ()) -> Method:
    d = DeltaSAMConfig()
    if method == "erm":
        return Method("erm")
    warmup = None if d.rho_schedule in ("constant", "follow_lr") else d.rho_warmup
    return Method(method, rho, d.rho_schedule, warmup, extra)


SAME_RHO = "sam at m-sam's ρ"  # SAM at the ρ of the m-SAM and per-instance arms: their reference at equal radius
ARMS: dict[str, tuple[str, str, tuple]] = {
    # name: (method, whose ρ, extra method fields)
    "erm": ("erm", "", ()),
    "sam": ("sam", "sam", ()),
    SAME_RHO: ("sam", "m4", ()),
    "deltasam": ("deltasam", "sam", ()),
    "deltasam β=+1": ("deltasam", "sam", (("beta", 1.0),)),
    "m-sam m=8": ("sam", "m4", (("m_sharpness", 8),)),
    "m-sam m=4": ("sam", "m4", (("m_sharpness", 4),)),
    "per-instance (m=1)": ("per_instance", "m4", ()),
    "sam interval=5": ("sam", "sam", (("interval", 5),)),
    "sam looksam k=5": ("sam", "sam", (("interval", 5), ("reuse", "looksam"))),
}
M_ARMS = ("m-sam m=8", "m-sam m=4")
COST_NAMES = {  # arm → its row in benchmarks/perf/overhead.py
    "erm": "erm",
    "sam": "sam",
    SAME_RHO: "sam",
    "deltasam": "deltasam(head)",
    "deltasam β=+1": "deltasam(head)",
    "m-sam m=8": "sam, m=8",
    "m-sam m=4": "sam, m=4",
    "per-instance (m=1)": "per_instance",
    "sam interval=5": "sam, interval=5",
    "sam looksam k=5": "sam, looksam k=5",
}
M_OF = {"per-instance (m=1)": 1, "m-sam m=4": 4, "m-sam m=8": 8, SAME_RHO: 32}


def arm(name: str, rhos: dict[str, float]) -> Method:
    method, whose, extra = ARMS[name]
    return shipped(method, rhos.get(whose), extra)


def best_of(rows: dict, candidates: dict[Any, list[str]]) -> Optional[Any]:
    """The candidate with the highest mean validation accuracy over its rows' keys; None until all are there."""
    scores = {}
    for candidate, keys in candidates.items():
        found = [rows.get(k) for k in keys]
        if any(r is None for r in found):
            return None
        scores[candidate] = statistics.mean(val(r) for r in found)
    return max(scores, key=scores.get)


class Protocol:
    """The study's choices as far as the rows there are allow, and the units still to run."""

    def __init__(self, args: argparse.Namespace, rows: dict) -> None:
        self.args, self.rows = args, rows
        self.settings = (HEADLINE, STRONG) + ((TWEETS,) if args.tweets_seeds else ())
        self.lr: dict[str, float] = {}
        for setting in self.settings:
            pick = best_of(rows, {lr: self._keys(setting, Method("erm"), lr) for lr in args.lrs})
            if pick is not None:
                self.lr[setting] = pick
        self.rho: dict[str, float] = {}
        if HEADLINE in self.lr:
            for family, extra in (("sam", ()), ("m4", (("m_sharpness", 4),))):
                grid = {r: self._keys(HEADLINE, shipped("sam", r, extra), self.lr[HEADLINE]) for r in args.rhos}
                pick = best_of(rows, grid)
                if pick is not None:
                    self.rho[family] = pick
        self.m_arm: Optional[str] = None
        if "m4" in self.rho:
            grid = {a: self._keys(HEADLINE, arm(a, self.rho), self.lr[HEADLINE]) for a in M_ARMS}
            self.m_arm = best_of(rows, grid)

    def _keys(self, setting: str, method: Method, lr: float) -> list[str]:
        return [key(*PLACES[setting], method, s, lr) for s in self.args.select_seeds]

    def selection_units(self) -> list[tuple]:
        """Step 0, then step 1, each as far as the choices before it are made."""
        a = self.args
        erm = Method("erm")
        units = [(*PLACES[s], erm, seed, lr) for seed in a.select_seeds for s in self.settings for lr in a.lrs]
        if HEADLINE in self.lr:
            lr = self.lr[HEADLINE]
            for seed in a.select_seeds:
                for extra in ((), (("m_sharpness", 4),)):
                    units += [(*PLACES[HEADLINE], shipped("sam", r, extra), seed, lr) for r in a.rhos]
        if "m4" in self.rho:
            units += [(*PLACES[HEADLINE], arm("m-sam m=8", self.rho), s, self.lr[HEADLINE]) for s in a.select_seeds]
        return units

    def arms(self, setting: str) -> list[str]:
        if setting == HEADLINE:
            return list(ARMS)
        return ["erm", "sam", SAME_RHO, "deltasam"] + ([self.m_arm] if self.m_arm else [])

    def ready(self) -> bool:
        return {HEADLINE, STRONG} <= set(self.lr) and len(self.rho) == 2 and self.m_arm is not None

    def comparison_units(self) -> list[tuple]:
        """Seed-major: every arm of both mr settings for one seed before the next seed; then the tweets repeat,
        seed-major too, as it runs only if the budget remains."""
        if not self.ready():
            return []
        a = self.args
        units = []
        for i, seed in enumerate(a.seeds):
            for setting in (HEADLINE, STRONG):
                if setting == STRONG and i >= a.strong_seeds:
                    continue
                for name in self.arms(setting):
                    if name == "per-instance (m=1)" and i >= a.per_instance_seeds:
                        continue
                    units.append((*PLACES[setting], arm(name, self.rho), seed, self.lr[setting]))
        if TWEETS in self.lr:
            for seed in a.seeds[: a.tweets_seeds]:
                units += [(*PLACES[TWEETS], arm(n, self.rho), seed, self.lr[TWEETS]) for n in self.arms(TWEETS)]
        return units

    def arm_rows(self, setting: str, name: str) -> dict[int, dict]:
        if setting not in self.lr or not self.ready():
            return {}
        method, lr = arm(name, self.rho), self.lr[setting]
        keys = {s: key(*PLACES[setting], method, s, lr) for s in self.args.seeds}
        return {s: self.rows[k] for s, k in keys.items() if k in self.rows}


def differences(a: dict[int, dict], score_a, b: dict[int, dict], score_b) -> Optional[dict[str, Any]]:
    """Paired differences in points over the seeds both have (``common.paired``: mean, Student-t 95% CI, p, and
    ``a``'s wins, ties and losses)."""
    seeds = sorted(set(a) & set(b))
    d = [100 * (score_a(a[s]) - score_b(b[s])) for s in seeds]
    return paired(d) if len(d) >= 2 else None


def distinct(arms_out: dict[str, dict]) -> list[tuple[str, str, dict[str, Any]]]:
    """The family's distinct tests, as (arm, reference, difference): a difference listed under two references (the
    same arm, the same runs: δ-SAM's SAM at the same ρ is SAM, a stalled arm scores the same early-stopped or not)
    once."""
    seen: dict[tuple, tuple[str, str, dict[str, Any]]] = {}
    for name, entry in arms_out.items():
        for label, d in entry["differences"].items():
            if d is not None:
                seen.setdefault((d["n"], round(d["mean"], 12), round(d["p"], 12)), (name, label, d))
    return list(seen.values())


def adjust(arms_out: dict[str, dict]) -> int:
    """Holm's adjustment over the study's whole family: every paired difference of the comparison table, all settings
    and references together. Writes each one's ``p_holm``; returns the family's size."""
    family = [d for entry in arms_out.values() for d in entry["differences"].values() if d is not None]
    for d, adjusted in zip(family, holm([d["p"] for d in family])):
        d["p_holm"] = adjusted
    return len(family)


REFERENCES = (  # (label, the arm's score, reference arm, the reference's score)
    ("ERM final", test_final, "erm", test_final),
    ("early-stopped ERM", test_final, "erm", test_best),
    ("SAM final", test_final, "sam", test_final),
    ("SAM final, same ρ", test_final, "same-ρ sam", test_final),
    ("early-stopped ERM, arm early-stopped too", test_best, "erm", test_best),
)


COLUMNS = {
    "ERM final": "final − ERM final",
    "early-stopped ERM": "final − early-stopped ERM",
    "SAM final": "final − SAM final",
    "SAM final, same ρ": "final − SAM final at the same ρ",
    "early-stopped ERM, arm early-stopped too": "best-val − early-stopped ERM",
}


def costs() -> dict[str, float]:
    """Step cost × ERM per arm, from the interleaved overhead run at the study's batch and length."""
    if not COST_FILE.exists():
        return {}
    methods = json.loads(COST_FILE.read_text())["results"]["minilm"]["methods"]
    return {name: methods[row]["vs_erm"] for name, row in COST_NAMES.items() if row in methods}


POST_HOC = {SAME_RHO, TWEETS}
"""Added after the first comparison results were in (the equal-radius SAM arm, the tweets repeat): marked in every
table, as their comparisons were not planned before the data were seen."""
MARK = " (post hoc)"


def _fmt(d: Optional[dict]) -> str:
    """``mean [CI] (wins/ties/losses, Holm p)``."""
    if d is None:
        return "–"
    return (
        f"{d['mean']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] "
        f"({d['wins']}/{d['ties']}/{d['losses']}, {_p(d['p_holm'])})"
    )


def _p(p: float) -> str:
    return "p_H < 0.001" if p < 0.001 else f"p_H {p:.3f}"


def _named(name: str) -> str:
    return name + MARK if name in POST_HOC else name


def report(args: argparse.Namespace) -> tuple[str, dict]:
    """The study's tables and their numbers: the two selection steps, the comparison, the stalled runs."""
    rows = rows_by_key()
    p = Protocol(args, rows)
    cost = costs()
    out: dict[str, Any] = {"lr": p.lr, "rho": p.rho, "m_arm_setting_2": p.m_arm, "cost_vs_erm": cost}
    lines = lr_table(p, args, rows)
    rho_lines, out["selection"] = rho_table(p, args, rows)
    lines += rho_lines
    if "m4" in p.rho:
        lines += ["", f"m-SAM arm for setting {STRONG} (mean selection-seed validation accuracy): **{p.m_arm or '–'}**"]
    arms_out = comparison(p, cost)
    family = adjust(arms_out)
    out["arms"] = arms_out
    out["family"] = family
    out["headline"] = headline(arms_out, family, len(distinct(arms_out)))
    lines += [
        "",
        "**Comparison** (test accuracy, mean ± std over seeds; paired differences by seed of the arm's final weights, "
        "or of its best-validation checkpoint, against a reference)\n",
        multiplicity(family, len(distinct(arms_out))) + "\n",
    ]
    lines += comparison_table(arms_out)
    lines += stalled_table(p)
    return "\n".join(lines) + "\n", out


def lr_table(p: Protocol, args: argparse.Namespace, rows: dict[str, dict]) -> list[str]:
    """Step 0: ERM's final validation accuracy at each LR on the selection seeds, the chosen LR marked."""
    lines = ["**Step 0: ERM's learning rate** (final validation accuracy, selection seeds)\n"]
    lines += ["| setting | lr | val acc per seed | mean | stalled | chosen |", "|---|---|---|---|---|---|"]
    for setting in p.settings:
        for lr in args.lrs:
            found = [rows.get(k) for k in (key(*PLACES[setting], Method("erm"), s, lr) for s in args.select_seeds)]
            accs = [100 * val(r) for r in found if r]
            lines.append(
                f"| {setting} | {lr:g} | {', '.join(f'{x:.2f}' for x in accs) or '–'} | "
                f"{f'{statistics.mean(accs):.2f}' if accs else '–'} | {sum(r['stalled'] for r in found if r)} | "
                f"{'✓' if p.lr.get(setting) == lr else ''} |"
            )
    return lines


def rho_table(p: Protocol, args: argparse.Namespace, rows: dict[str, dict]) -> tuple[list[str], dict[str, dict]]:
    """Step 1: SAM's and m = 4's validation accuracy at each ρ on the headline setting, the chosen ρ marked."""
    lines = ["", f"**Step 1: ρ** (setting {HEADLINE}, lr {p.lr.get(HEADLINE, '–')}, selection seeds)\n"]
    lines += ["| family | ρ | val acc per seed | mean | stalled | chosen |", "|---|---|---|---|---|---|"]
    selection: dict[str, dict] = {}
    for family, extra in (("sam", ()), ("m4", (("m_sharpness", 4),))):
        for r in args.rhos:
            if HEADLINE not in p.lr:
                continue
            method = shipped("sam", r, extra)
            found = [rows.get(key(*PLACES[HEADLINE], method, s, p.lr[HEADLINE])) for s in args.select_seeds]
            accs = [100 * val(x) for x in found if x]
            stalled = sum(x["stalled"] for x in found if x)
            selection[f"{family} rho={r:g}"] = {"val": accs, "stalled": stalled, "runs": len(accs)}
            lines.append(
                f"| {'SAM' if family == 'sam' else 'm-SAM m=4'} | {r:g} | {', '.join(f'{x:.2f}' for x in accs) or '–'} "
                f"| {f'{statistics.mean(accs):.2f}' if accs else '–'} | {stalled}/{len(accs)} | "
                f"{'✓' if p.rho.get(family) == r else ''} |"
            )
    return lines, selection


def comparison(p: Protocol, cost: dict[str, float]) -> dict[str, dict]:
    """Every arm of every setting: its scores by seed and its paired differences against each reference (not yet
    adjusted: :func:`adjust`)."""
    arms_out: dict[str, dict] = {}
    for setting in p.settings:
        if not p.ready():
            break
        sam_at = {arm(n, p.rho).rho: p.arm_rows(setting, n) for n in (SAME_RHO, "sam")}
        for name in p.arms(setting):
            rs = p.arm_rows(setting, name)
            if not rs:
                continue
            method = arm(name, p.rho)
            refs = {
                "erm": p.arm_rows(setting, "erm"),
                "sam": sam_at[p.rho["sam"]],
                "same-ρ sam": sam_at.get(method.rho, {}),
            }
            diffs = {label: differences(rs, mine, refs[ref], theirs) for label, mine, ref, theirs in REFERENCES}
            if name == "erm":
                diffs = {label: d if label == "early-stopped ERM" else None for label, d in diffs.items()}
            if name == "sam":
                diffs["SAM final"] = None
            if name in ("sam", SAME_RHO):
                diffs["SAM final, same ρ"] = None
            by_seed = [rs[s] for s in sorted(rs)]
            arms_out[f"{setting}/{name}"] = {
                "label": method.label,
                "rho": method.rho,
                "seeds": sorted(rs),
                "stalled": sum(r["stalled"] for r in by_seed),
                "val_final": [val(r) for r in by_seed],
                "test_final": [test_final(r) for r in by_seed],
                "test_best": [test_best(r) for r in by_seed],
                "time_s": [r["time_s"] for r in by_seed],
                "differences": diffs,
                "cost_vs_erm": cost.get(name),
            }
    return arms_out


def comparison_table(arms_out: dict[str, dict]) -> list[str]:
    """The comparison: one line per arm, scores and every reference's difference with its Holm p."""
    table = [
        "| setting | arm | ρ | seeds | stalled | cost × ERM | val acc, final | test acc, final | test acc, best-val | "
        + " | ".join(f"{COLUMNS[name]} (points, t-95% CI, W/T/L, Holm p)" for name, *_ in REFERENCES)
        + " |",
        "|---" * (9 + len(REFERENCES)) + "|",
    ]
    for name, entry in arms_out.items():
        setting, arm_name = name.split("/", 1)
        rho, cost_x = entry["rho"], entry["cost_vs_erm"]
        table.append(
            f"| {_named(setting)} | {_named(arm_name)} | {'–' if rho is None else f'{rho:g}'} | "
            f"{len(entry['seeds'])} | {entry['stalled']} | {'–' if cost_x is None else f'{cost_x:.2f}'} | "
            f"{mean_std(entry['val_final'])} | {mean_std(entry['test_final'])} | {mean_std(entry['test_best'])} | "
            + " | ".join(_fmt(entry["differences"][label]) for label, *_ in REFERENCES)
            + " |"
        )
    return table


def stalled_table(p: Protocol) -> list[str]:
    """The stalled comparison runs, where there are any."""
    stalls = stall_table(p)
    if not stalls:
        return []
    return [
        "",
        f"**Stalled comparison runs** (≥ {STALL_SHARE:.0%} of the final validation predictions one class): from "
        "which epoch on, what the run had reached before, its final validation loss (ln 2 = 0.6931 is a constant "
        "50/50 output) and how flat it ended against ERM on the same seed\n",
        "| setting | arm | seed | one class from epoch | best val acc before | final val loss | "
        "final largest-magnitude Hessian eigenvalue (ERM, same seed) |",
        "|---|---|---|---|---|---|---|",
        *stalls,
    ]


def headline(arms_out: dict[str, dict], family: int, tests: int) -> str:
    """The results page's short table: every arm's cost, stalls and gains, from the same numbers as the full one."""
    lines = [
        "| setting | arm | cost × ERM | seeds (stalled) | final − early-stopped ERM | final − SAM at the same ρ | "
        "best-val − early-stopped ERM |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, d in arms_out.items():
        setting, arm_name = name.split("/", 1)
        diffs = d["differences"]
        cost = "–" if d["cost_vs_erm"] is None else f"{d['cost_vs_erm']:.2f}"
        rho = "" if d["rho"] is None else f", ρ {d['rho']:g}"
        lines.append(
            f"| {SETTINGS_SHORT[setting]}{MARK if setting in POST_HOC else ''} | {_named(arm_name)}{rho} | {cost} | "
            f"{len(d['seeds'])} ({d['stalled']}) | "
            f"{_fmt(diffs['early-stopped ERM'])} | {_fmt(diffs['SAM final, same ρ'])} | "
            f"{_fmt(diffs['early-stopped ERM, arm early-stopped too'])} |"
        )
    return "\n".join(lines) + "\n\n" + multiplicity(family, tests) + "\n"


def multiplicity(family: int, tests: int) -> str:
    return (
        f"W/T/L: the seeds on which the arm won, tied (exactly the same test accuracy) and lost. Holm p: the paired "
        f"t-test's two-sided p, Holm-adjusted over all {family} entries of the comparison table (every setting and "
        f"reference), which hold {tests} distinct tests ({family - tests} are listed twice, so the adjustment is "
        f"slightly conservative); an interval that excludes 0 with a Holm p above 0.05 does not survive the "
        f"correction. "
        f'"{MARK.strip()}" marks an arm or a setting added after the first comparison results were in.'
    )


SETTINGS_SHORT = {HEADLINE: "mr, 20% noise", STRONG: "mr, 40% noise", TWEETS: "tweets, 20% noise"}


def stall_table(p: Protocol) -> list[str]:
    """One line per stalled comparison run: the epoch from which the majority share stays ≥ STALL_SHARE."""
    lines = []
    for setting in p.settings:
        erm = p.arm_rows(setting, "erm")
        for name in p.arms(setting) if p.ready() else ():
            for seed, r in sorted(p.arm_rows(setting, name).items()):
                if not r["stalled"]:
                    continue
                curve = r["curve"]
                epoch = len(curve)
                while epoch > 1 and curve[epoch - 2][2] >= STALL_SHARE:
                    epoch -= 1
                before = [c[1] for c in curve[: epoch - 1]]
                ref = erm.get(seed)
                eig = r["metrics"].get("final/hessian_top_eig")
                ref_eig = ref["metrics"].get("final/hessian_top_eig") if ref else None
                lines.append(
                    f"| {setting} | {name} | {seed} | {epoch} of {len(curve)} | "
                    f"{f'{100 * max(before):.1f}' if before else '–'} | {r['metrics']['val/loss']:.4f} | "
                    f"{'–' if eig is None else f'{eig:.2f}'} ({'–' if ref_eig is None else f'{ref_eig:.2f}'}) |"
                )
    return lines


def plot_frontier(summary: dict, path: Path) -> None:
    """Cost against the gain over early-stopped ERM. An arm whose mean falls far below the others (it stalled on
    some seeds) is drawn as a triangle on the lower edge with its mean written beside it, so that it cannot
    squeeze the intervals of the others into a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in PLACES if any(name.startswith(f"{s}/") for name in summary["arms"])]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        points = []
        for name, d in summary["arms"].items():
            s, arm_name = name.split("/", 1)
            gain = d["differences"]["early-stopped ERM"]
            if s == setting and gain is not None and d["cost_vs_erm"] is not None:
                points.append((arm_name, d, gain))
        unstalled = [g["ci"][0] for _, d, g in points if not d["stalled"]]
        floor = min(unstalled) - 1.0 if unstalled else None
        for arm_name, d, gain in points:
            x, (lo, hi), mean = d["cost_vs_erm"], gain["ci"], gain["mean"]
            label = f"{arm_name} (n={gain['n']}" + (f", stalled {d['stalled']})" if d["stalled"] else ")")
            if floor is not None and lo < floor:
                ax.plot(x, floor, "v", color="tab:red")
                ax.annotate(
                    f"{label}: {mean:+.1f} [{lo:+.1f}, {hi:+.1f}]",
                    (x, floor),
                    xytext=(-4, 4),
                    textcoords="offset points",
                    ha="right",
                    fontsize=7,
                    color="tab:red",
                )
                continue
            ax.errorbar(x, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=3)
            ax.annotate(label, (x, mean), fontsize=7)
        if floor is not None:
            ax.set_ylim(bottom=floor - 0.5)
        ax.axhline(0.0, color="grey", linestyle="--")
        ax.set_xscale("log")
        ax.set_xlabel("step cost × ERM (MiniLM, batch 32, length 32, CPU)")
        ax.set_ylabel("test acc − early-stopped ERM (points, t-95% CI)")
        ax.set_title(f"{SETTINGS_SHORT[setting]}: final weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_m_curve(summary: dict, path: Path) -> None:
    """Gain against m, final weights, every m at m-SAM's ρ (m = 32 is SAM, one perturbation per batch); each tick
    says the arm's ρ and its stalls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ticks = {}
    for (label, marker), shift in zip((("early-stopped ERM", "o"), ("ERM final", "s")), (0.96, 1.04)):
        points = []
        for name, m in M_OF.items():
            d = summary["arms"].get(f"{HEADLINE}/{name}")
            gain = d and d["differences"][label]
            if gain:
                points.append((m, gain))
                rho = arm(name, summary.get("rho", {})).rho
                ticks[m] = f"{m}{' (SAM)' if name == SAME_RHO else ''}\nρ {rho:g}" + (
                    f"\nstalled {d['stalled']}/{gain['n']}" if d["stalled"] else ""
                )
        points.sort(key=lambda x: x[0])
        if points:
            ax.errorbar(
                [m * shift for m, _ in points],
                [g["mean"] for _, g in points],
                yerr=[[g["mean"] - g["ci"][0] for _, g in points], [g["ci"][1] - g["mean"] for _, g in points]],
                marker=marker,
                capsize=3,
                label=f"final − {label}",
            )
    ax.axhline(0.0, color="grey", linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [ticks[m] for m in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("instances per perturbation, m")
    ax.set_ylabel("test acc gain (points, t-95% CI)")
    ax.set_title(f"mr, {HEADLINE}: m-sharpness")
    if ticks:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-5, 1e-4, 2e-4], help="ERM's LR grid (step 0)")
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.02, 0.05, 0.1], help="ρ grid (step 1)")
    parser.add_argument("--select-seeds", nargs="+", type=int, default=[101, 102], help="seeds of steps 0 and 1")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(11, 19)), help="comparison seeds")
    parser.add_argument(
        "--strong-seeds", type=int, default=8, help=f"how many of --seeds setting {STRONG} runs (at least 5)"
    )
    parser.add_argument("--per-instance-seeds", type=int, default=5, help="how many of --seeds per-instance runs")
    parser.add_argument(
        "--tweets-seeds",
        type=int,
        default=5,
        help="how many of --seeds the tweets repeat runs, after the mr comparison is complete (0: none)",
    )
    parser.add_argument("--stage", choices=["select", "all"], default="all", help="stop after steps 0 and 1")
    parser.add_argument("--report", action="store_true", help="only build the JSON, plots and tables")
    args = parser.parse_args()
    assert all(setting in SETTINGS for _, setting in PLACES.values())
    if not args.report:
        while True:  # each stage's choices open the next stage's units
            units = Protocol(args, rows_by_key()).selection_units()
            before = len(units)
            run_all(units, "regimes")
            if len(Protocol(args, rows_by_key()).selection_units()) == before:
                break
        if args.stage == "all":
            protocol = Protocol(args, rows_by_key())
            if not protocol.ready():
                raise SystemExit("the selection is incomplete; rerun to finish it")
            run_all(protocol.comparison_units(), "regimes")
    text, summary = report(args)
    save("regimes", {"args": vars(args), "table": text, **summary})
    if summary["arms"]:
        plot_frontier(summary, RESULTS / "frontier.png")
        plot_m_curve(summary, RESULTS / "m_curve.png")
    print(text)


if __name__ == "__main__":
    main()
