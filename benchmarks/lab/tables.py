"""Every table the docs fill from the committed results whose JSON keeps the numbers but not the table.

A page marks such a table ``<!-- t:NAME -->`` … ``<!-- /t -->`` and :mod:`benchmarks.lab.fill_docs` writes
:data:`TABLES` ``[NAME]()`` between the markers; tests/test_doc_numbers.py rebuilds them, so a cell edited by hand
(or a result changed under it) is caught. A study whose JSON stores its own ``table`` uses a block marker instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.lab.common import RESULTS, load_jsonl
from benchmarks.lab.quotes import num, saved, step_costs

TABLES: dict[str, Callable[[], str]] = {}


def table(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Register a table renderer under the name its marker uses."""

    def register(fn: Callable[[], str]) -> Callable[[], str]:
        TABLES[name] = fn
        return fn

    return register


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def ratio(x: float) -> str:
    return num(x, sign=False)


def _target(name: str, method: str, key: str) -> float:
    return saved(name)["targets"][f"{method} {key}"]


# --- CPU step costs (overhead.json, overhead_amortized.json, overhead_regimes.json) ---------------------------------


def _cpu_costs(model: str) -> str:
    rows = [
        [m, f"{r['median_s']:.3f}", ratio(r["vs_sam"]), ratio(r["vs_erm"]), f"{r['peak_mb']:.0f}"]
        for m, r in step_costs("overhead", model).items()
    ]
    return markdown(["method", "median step (s)", "× SAM", "× ERM", "peak extra memory (MB)"], rows)


for _model in ("minilm", "small"):
    table(f"overhead.cpu.{_model}")(lambda m=_model: _cpu_costs(m))

CPU_TARGETS = (
    ("SAM ≤ {t}× ERM", "sam", "vs_erm"),
    ("δ-SAM(head) ≤ {t}× SAM", "deltasam(head)", "vs_sam"),
    ("δ-SAM(probe K=3, top layers) ≤ {t}× SAM", "deltasam(probe K=3, top)", "vs_sam"),
)


@table("overhead.cpu.targets")
def _cpu_targets() -> str:
    rows = []
    for label, method, key in CPU_TARGETS:
        t = _target("overhead", method, key)
        cells = [label.format(t=f"{t:g}")]
        for model in ("minilm", "small"):
            x = step_costs("overhead", model)[method][key]
            cells.append(f"{ratio(x)} ({'met' if x <= t else '**missed**'})")
        rows.append(cells)
    return markdown(["target", "MiniLM", "small model"], rows)


AMORTIZED = (
    ("SAM", "sam", False),
    ("SAM, `interval=5`", "sam, interval=5", True),
    ("SAM, LookSAM k = 5", "sam, looksam k=5", True),
    ("SAM, LookSAM k = 10", "sam, looksam k=10", True),
    ("δ-SAM(head), LookSAM k = 5", "deltasam(head), looksam k=5", False),
)


@table("overhead.amortized")
def _amortized() -> str:
    rows = []
    for label, method, targeted in AMORTIZED:
        x = step_costs("overhead_amortized")[method]["vs_erm"]
        t = _target("overhead_amortized", method, "vs_erm") if targeted else None
        rows.append([label, ratio(x), "" if t is None else f"≤ {t:g}, {'met' if x <= t else 'missed'}"])
    return markdown(["method", "× ERM", "target"], rows)


def _reference_copies(name: str) -> float:
    return saved(name)["results"]["minilm"]["memory_reference"]["parameter_copies"]


@table("overhead.regimes")
def _regimes_costs() -> str:
    ref = saved("overhead_regimes")["results"]["minilm"]["memory_reference"]
    rows = [
        [
            "plain loop (no engine), the memory reference",
            *["–"] * 3,
            f"{ref['peak_mb']:.0f}",
            f"{ref['parameter_copies']:.2f}",
            "0",
        ]
    ]
    for m, r in step_costs("overhead_regimes").items():
        rows.append(
            [
                m,
                f"{r['median_s']:.3f}",
                ratio(r["vs_sam"]),
                ratio(r["vs_erm"]),
                f"{r['peak_mb']:.0f}",
                f"{r['parameter_copies']:.2f}",
                f"{r['parameter_copies'] - ref['parameter_copies']:+.2f}",
            ]
        )
    header = ["method", "median step (s)", "× SAM", "× ERM", "peak tensor memory (MB)", "parameter copies"]
    return markdown([*header, "copies over the plain loop"], rows)


@table("overhead.regimes.targets")
def _regimes_targets() -> str:
    r = step_costs("overhead_regimes")
    ref = _reference_copies("overhead_regimes")

    def timed(label: str, method: str, key: str, missed: str = "missed") -> list[str]:
        x, t = r[method][key], _target("overhead_regimes", method, key)
        return [label.format(t=f"{t:g}"), ratio(x), "met" if x <= t else missed]

    def met(ok: bool, why: str = "") -> str:
        """The verdict, and why it was met where the table says so."""
        return "met" + why if ok else "missed"

    sam_copies = r["sam"]["parameter_copies"]
    over_plain = sam_copies - ref
    memory_share = 100 * (r["deltasam(head)"]["peak_mb"] / r["sam"]["peak_mb"] - 1)
    m_sharpness = r["sam, m=8"]["parameter_copies"] - sam_copies
    looksam = r["sam, looksam k=5"]["parameter_copies"] - sam_copies
    rows = [
        timed("SAM ≤ {t}× ERM", "sam", "vs_erm"),
        timed("δ-SAM(head) ≤ {t}× SAM", "deltasam(head)", "vs_sam"),
        timed("`interval=5` ≤ {t}× ERM", "sam, interval=5", "vs_erm"),
        timed("LookSAM k = 5 ≤ {t}× ERM", "sam, looksam k=5", "vs_erm", "missed (below)"),
        timed("LookSAM k = 10 ≤ {t}× ERM", "sam, looksam k=10", "vs_erm", "missed (below)"),
        [
            "δ-SAM(head) with LookSAM k = 5",
            ratio(r["deltasam(head), looksam k=5"]["vs_erm"]),
            "the full step's extra backward for the plain gradient",
        ],
        timed("m = 8 ≤ {t}× SAM", "sam, m=8", "vs_sam"),
        timed("m = 4 ≤ {t}× SAM", "sam, m=4", "vs_sam"),
        [
            "SAM ≤ ERM + 1.1 parameter copies (against the plain loop)",
            f"{over_plain:+.2f}",
            met(over_plain <= 1.1, "; the floor of one copy (the snapshot of w) holds, so the measurement counts it"),
        ],
        ["δ-SAM(head) ≤ SAM + 2%", f"{memory_share:+.1f}%", met(memory_share <= 2)],
        [
            "m-sharpness = SAM",
            f"{m_sharpness:+.2f} copies",
            met(m_sharpness <= 0.005, " (smaller activations)" if m_sharpness < 0 else ""),
        ],
        ["LookSAM ≤ SAM + 1 parameter copy", f"{looksam:+.2f}", met(looksam <= 1.005)],
    ]
    return markdown(["target", "measured", ""], rows)


# --- per-instance SAM side by side (per_instance_side_by_side.jsonl) ------------------------------------------------


@table("overhead.side_by_side")
def _side_by_side_table() -> str:
    runs = load_jsonl(RESULTS / "per_instance_side_by_side.jsonl")
    rows = []
    for length in sorted({r["length"] for r in runs}):
        for root, code in (("c5cf503", "11-28"), ("HEAD", "today")):
            mine = [r for r in runs if r["length"] == length and r["root"].startswith(root)]
            rows.append(
                [
                    str(length),
                    code,
                    ", ".join(f"{r['loop_x_erm']:.2f}" for r in mine),
                    ", ".join(f"{r['vmap_x_erm']:.1f}" for r in mine),
                    ", ".join(f"{r['erm']:.2f}" for r in mine),
                ]
            )
    header = ["length", "code", "loop × ERM (two runs)", "vmap × ERM (two runs)", "ERM step (s)"]
    return markdown(header, rows)


# --- the H200 (gpu_check.json: MiniLM; gpu_check_bert.json: BERT-base) ---------------------------------------------

H200_ROWS = (
    ("ERM", "erm"),
    ("SAM", "sam"),
    ("δ-SAM (head)", "deltasam(head)"),
    ("SAM, `interval=5`", "sam, interval=5"),
    ("SAM, LookSAM k = 5", "sam, looksam k=5"),
    ("m-SAM m = 8, loop", "sam, m=8"),
    ("m-SAM m = 8, batched", "sam, m=8 (batched)"),
    ("m-SAM m = 4, loop", "sam, m=4"),
    ("m-SAM m = 4, batched", "sam, m=4 (batched)"),
    ("per-instance SAM, loop", "per_instance"),
    ("per-instance SAM, batched, chunk 8", "per_instance (batched, chunk 8)"),
    ("per-instance SAM, batched, chunk 16", "per_instance (batched, chunk 16)"),
)


@table("overhead.h200")
def _h200() -> str:
    minilm, bert = step_costs("gpu_check"), step_costs("gpu_check_bert", "bert-base")
    rows = [
        [
            label,
            ratio(minilm[m]["vs_erm"]),
            ratio(bert[m]["vs_erm"]),
            ratio(bert[m]["vs_sam"]),
            f"{bert[m]['parameter_copies']:.1f}",
        ]
        for label, m in H200_ROWS
    ]
    header = ["method", "MiniLM × ERM", "BERT-base × ERM", "BERT-base × SAM", "BERT-base peak, parameter copies"]
    return markdown(header, rows)


# --- batched groups on the CPU (overhead_groups_32.json, overhead_groups_48.json) ----------------------------------

GROUP_ROWS = (
    ("SAM", "sam"),
    ("m = 8, loop", "sam, m=8"),
    ("m = 8, batched", "sam, m=8 (batched)"),
    ("m = 4, loop", "sam, m=4"),
    ("m = 4, batched", "sam, m=4 (batched)"),
    ("δ-SAM(head) m = 4, loop", "deltasam(head), m=4"),
    ("δ-SAM(head) m = 4, batched", "deltasam(head), m=4 (batched)"),
    ("per-instance SAM, loop", "per_instance"),
    ("per-instance SAM, batched, chunk 8", "per_instance (batched, chunk 8)"),
    ("per-instance SAM, batched, chunk 16", "per_instance (batched, chunk 16)"),
)


@table("overhead.groups")
def _groups() -> str:
    at32, at48 = step_costs("overhead_groups_32"), step_costs("overhead_groups_48")
    rows = [
        [
            label,
            ratio(at32[m]["vs_sam"]),
            ratio(at32[m]["vs_erm"]),
            ratio(at48[m]["vs_sam"]),
            ratio(at48[m]["vs_erm"]),
            f"{at32[m]['parameter_copies']:.1f}",
        ]
        for label, m in GROUP_ROWS
    ]
    header = ["method", "× SAM, length 32", "× ERM, 32", "× SAM, 48", "× ERM, 48", "parameter copies, 32"]
    return markdown(header, rows)


# --- DDP communication (ddp_comm_minilm.json) -----------------------------------------------------------------------

DDP_METHODS = {"erm": "ERM", "sam": "SAM", "deltasam": "δ-SAM (head)"}


def _ddp(per_step: str) -> str:
    rows: list[dict[str, Any]] = saved("ddp_comm_minilm")["rows"]
    body = [
        [
            DDP_METHODS[r["method"]],
            "–" if r["method"] == "erm" else r["ascent"],
            f"{r['gradient_allreduces']:.0f}",
            f"{r['gradient_mb']:.1f}",
            f"{r['other_collectives']:.0f}",
            f"{r['other_bytes']:.0f}",
        ]
        for r in rows
    ]
    header = ["method", "ascent", f"gradient all-reduces{per_step}", f"gradient MB{per_step}"]
    return markdown([*header, f"other collectives{per_step}", "their bytes"], body)


table("ddp_comm.minilm")(lambda: _ddp(" / step"))
table("ddp_comm.minilm.short")(lambda: _ddp(""))
