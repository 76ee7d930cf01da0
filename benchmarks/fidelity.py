"""Claim (a): does δ-SAM's perturbation approximate per-instance SAM better than SAM's? Measured in situ.

MiniLM is fine-tuned along four trajectories per task, each with its own dynamics: ERM,
SAM, δ-SAM (the shipped defaults) and exact per-instance SAM (mr only by default: it
costs about three SAM steps). Each runs for 400 optimizer steps or one epoch of the
training split, whichever is longer. At ``--points`` evenly spaced steps (the last
included), on ``--batches`` fixed validation batches of ``--batch-size`` in eval mode,
every variant's sharpness correction ``C_X = G_X - ḡ`` at radius ``--rho`` is compared
with per-instance SAM's ``C_PI``: ``cos(C_X, C_PI)`` and ``||C_X - C_PI|| / ||C_PI||``.

Variants: SAM, and δ-SAM with the head, exact, probe, probe_top (top layer and head) and
curvature estimators, at β ∈ {-1, -0.5, 0.5, 1}, each with the default floor and clip and
with them off (``:raw``). ``--variants`` measures a subset (SAM and the shipped δ-SAM always):
the exact estimator's per-instance loop makes it most of a probe's cost.

Resumable: one JSON row per (task, trajectory, step, batch) in
``docs/results/fidelity_rows.jsonl``; a trajectory resumes from the checkpoint of its last
finished probe point (kept under ``outputs/benchmarks/fidelity``), and a finished one is
skipped. ``--report`` only builds the tables and the plot from the rows there are.

    python -m benchmarks.fidelity                          # mr and tweets, all variants: ~5 h on 2 CPU cores
    python -m benchmarks.fidelity --report                 # tables and plot from the rows
    python -m benchmarks.fidelity --tasks mr --trajectories erm sam --points 3 --batches 2
    python -m benchmarks.fidelity --tasks tweets --variants 'head:*' exact:-1 exact:-0.5   # a subset
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from benchmarks.lab.common import RESULTS, ROOT, compose_config, load_jsonl, save
from benchmarks.lab.runs import legacy_optim
from benchmarks.lab.stats import bootstrap
from lit_deltasam import DeltaSAMConfig
from lit_deltasam.app import assemble
from lit_deltasam.core.batch import slice_batch
from lit_deltasam.core.diagnostics import corrections

STORE = RESULTS / "fidelity_rows.jsonl"
TOP_LAYERS = ["encoder.model.bert.encoder.layer.5.*", "encoder.model.bert.pooler.*", "encoder.model.classifier.*"]
BETAS = [-1.0, -0.5, 0.5, 1.0]
ESTIMATORS: dict[str, dict[str, Any]] = {
    "head": dict(estimator="head"),
    "exact": dict(estimator="exact", per_instance_impl="loop"),
    "probe": dict(estimator="probe"),
    "probe_top": dict(estimator="probe", probe_params=TOP_LAYERS),
    "curvature": dict(estimator="curvature", probe_samples=4),
}
RAW = dict(weight_floor=0.0, weight_min=0.0, weight_max=float("inf"))
TRAJECTORIES = ("erm", "sam", "deltasam", "per_instance")
MIN_STEPS = 400


def variants(rho: float, model: str, patterns: Sequence[str] = ("*",)) -> dict[str, DeltaSAMConfig]:
    """SAM, the shipped δ-SAM and the variants whose names match one of ``patterns`` (shell-style: ``exact:-*``)."""
    out = {"sam": DeltaSAMConfig(method="sam", rho=rho)}
    for name, options in ESTIMATORS.items():
        if name == "probe_top" and model != "minilm":
            continue
        for beta in BETAS:
            for suffix, guards in (("", {}), (":raw", RAW)):
                out[f"{name}:{beta:g}{suffix}"] = DeltaSAMConfig(
                    method="deltasam", rho=rho, beta=beta, **options, **guards
                )
    for pattern in patterns:
        if not fnmatch.filter(out, pattern):
            raise ValueError(f"--variants pattern {pattern!r} matches no variant; the variants are {list(out)}")
    keep = {"sam", shipped_variant()}
    return {n: cfg for n, cfg in out.items() if n in keep or any(fnmatch.fnmatchcase(n, p) for p in patterns)}


def variant_overrides(name: str) -> tuple[tuple[str, str], ...]:
    """A variant name of this study (e.g. ``exact:-1:raw``) as ``method.*`` fields for the app's config."""
    parts = name.split(":")
    if parts[0] not in ESTIMATORS or len(parts) not in (2, 3) or parts[2:] not in ([], ["raw"]):
        raise ValueError(
            f"variant {name!r} is not valid; it is <estimator>:<beta>[:raw] with an estimator of {list(ESTIMATORS)}"
        )

    def value(v: Any) -> str:
        return "[" + ",".join(f"'{x}'" for x in v) + "]" if isinstance(v, list) else str(v)

    fields = {**ESTIMATORS[parts[0]], "beta": float(parts[1]), **(RAW if parts[2:] else {})}
    return tuple((k, value(v)) for k, v in fields.items())


def shipped_variant() -> str:
    """The variant name of the shipped δ-SAM default."""
    d = DeltaSAMConfig()
    name = "probe_top" if d.estimator == "probe" and d.probe_params else d.estimator
    raw = d.weight_floor == 0 and d.weight_min == 0 and math.isinf(d.weight_max)
    return f"{name}:{d.beta:g}" + (":raw" if raw else "")


def load(path: Optional[Path] = None) -> list[dict]:
    return load_jsonl(path or STORE)


class Probe(Callback):
    """At each probe step: every variant on every held-out batch, one row per batch, then a resumable checkpoint."""

    def __init__(
        self, ident: dict, steps: list[int], batches: list, measured: dict[str, DeltaSAMConfig], ckpt_dir: Path
    ) -> None:
        self.ident, self.steps, self.batches, self.measured = ident, steps, batches, measured
        self.ckpt_dir = ckpt_dir
        self.done = {(r["step"], r["batch"]) for r in load() if all(r[k] == v for k, v in ident.items())}

    def run(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step not in self.steps or all((step, b) in self.done for b in range(len(self.batches))):
            return
        params = [p for g in module.optimizers(use_pl_optimizer=False).param_groups for p in g["params"]]
        modes = {m: m.training for m in module.modules()}
        module.eval()
        try:
            with torch.enable_grad():
                for index, batch in enumerate(self.batches):
                    if (step, index) in self.done:
                        continue
                    torch.manual_seed(1000 * step + index)
                    batch = module.transfer_batch_to_device(batch, module.device, 0)
                    measured = corrections(module, module.per_sample_loss, batch, self.measured, params, impl="loop")
                    row = {**self.ident, "step": step, "batch": index, "variants": measured}
                    with open(STORE, "a") as handle:
                        handle.write(json.dumps(row) + "\n")
                    self.done.add((step, index))
                    print(
                        f"{self.ident['task']}/{self.ident['trajectory']} step {step} batch {index}: "
                        f"sam {measured['sam']['cos']:.3f}, {shipped_variant()} "
                        f"{measured[shipped_variant()]['cos']:.3f}",
                        flush=True,
                    )
        finally:
            for m, mode in modes.items():
                m.training = mode
        if step != self.steps[-1]:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            path = self.ckpt_dir / f"step{step}.ckpt"
            trainer.save_checkpoint(path)
            for old in self.ckpt_dir.glob("step*.ckpt"):
                if old != path:
                    old.unlink()

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.run(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        self.run(trainer, module)


def trajectory_overrides(task: str, method: str, args: argparse.Namespace) -> list[str]:
    """The trajectory's config, the optimizer recipe pinned at what the committed rows ran at (unrecorded there)."""
    return [
        f"task={task}",
        f"model={args.model}",
        f"seed={args.seed}",
        f"data.max_length={args.max_length}",
        "logger=none",
        "callbacks=none",
        "trainer.limit_val_batches=0",
        "trainer.enable_checkpointing=false",
        "+trainer.enable_progress_bar=false",
        "test=false",
        f"method={method}",
        *legacy_optim(),
    ]


TRAJECTORY_FIELDS = ("method", "rho", "rho_schedule", "beta", "estimator", "rho_warmup")


def identity(task: str, method: str, config: DeltaSAMConfig, args: argparse.Namespace, total: int) -> dict:
    """What a probe row's trajectory is: the fields of its method's config that apply (a config holds ``None`` in
    those that do not), the probe's settings and the trajectory's length."""
    return {
        "task": task,
        "trajectory": method,
        "trajectory_config": {k: v for k, v in vars(config).items() if k in TRAJECTORY_FIELDS and v is not None},
        "model": args.model,
        "seed": args.seed,
        "probe_rho": args.rho,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "total_steps": total,
    }


def same_trajectory(row: dict, ident: dict) -> bool:
    """Whether ``row`` was probed on the trajectory ``ident`` names. Rows written before configs held ``None`` in
    the fields that do not apply to their method record the defaults there, which are not compared."""
    config = ident["trajectory_config"]
    return all(row[k] == v for k, v in ident.items() if k != "trajectory_config") and all(
        row["trajectory_config"].get(k) == v for k, v in config.items()
    )


def trajectory(task: str, method: str, args: argparse.Namespace) -> None:
    L.seed_everything(args.seed)
    out = ROOT / "outputs" / "benchmarks" / "fidelity" / f"{task}-{method}"
    cfg = compose_config(trajectory_overrides(task, method, args), out)
    datamodule, module = assemble.build(cfg)
    datamodule.setup("fit")
    per_epoch = math.ceil(len(datamodule.splits["train"]) / cfg.data.batch_size)
    total = args.max_steps or max(MIN_STEPS, per_epoch)
    steps = [round(total * (i + 1) / args.points) for i in range(args.points)]
    if method == "per_instance" and args.pi_rho is not None:
        module.deltasam = DeltaSAMConfig.coerce({**vars(module._deltasam_config()), "rho": args.pi_rho})
    ident = identity(task, method, module._deltasam_config(), args, total)
    rows = [r for r in load() if same_trajectory(r, ident)]
    finished = {s for s in steps if sum(r["step"] == s for r in rows) >= args.batches}
    if finished == set(steps):
        print(f"{task}/{method}: done")
        return
    ckpt_dir = out / "checkpoints"
    resume = next((ckpt_dir / f"step{s}.ckpt" for s in reversed(steps) if s in finished), None)
    resume = resume if resume is not None and resume.exists() else None
    loader = iter(datamodule.val_dataloader())
    batches = [slice_batch(next(loader), slice(0, args.batch_size)) for _ in range(args.batches)]
    probe = Probe(ident, steps, batches, variants(args.rho, args.model, args.variants), ckpt_dir)
    trainer = instantiate(cfg.trainer, max_epochs=-1, max_steps=total, logger=False, callbacks=[probe])
    print(f"{task}/{method}: {total} steps, probes at {steps}" + (f", resuming from {resume.name}" if resume else ""))
    trainer.fit(module, datamodule, ckpt_path=resume)


def summarize(rows: list[dict], names: list[str]) -> dict[str, dict[str, Any]]:
    """Mean cos and relative error per variant, and the paired win rate against SAM with a bootstrap 95% CI."""
    out = {}
    for name in names:
        present = [r for r in rows if name in r["variants"]]
        if not present:
            continue
        cos = [r["variants"][name]["cos"] for r in present]
        err = [r["variants"][name]["rel_err"] for r in present]
        gain = [r["variants"][name]["cos"] - r["variants"]["sam"]["cos"] for r in present]
        wins = [float(g > 0) for g in gain]
        out[name] = {
            "cos": statistics.mean(cos),
            "rel_err": statistics.mean(err),
            "gain": statistics.mean(gain),
            "gain_ci": bootstrap(gain),
            "win": statistics.mean(wins),
            "win_ci": bootstrap(wins),
            "n": len(present),
        }
    return out


def stage(row: dict) -> str:
    fraction = row["step"] / row["total_steps"]
    return "early" if fraction < 0.3 else "mid" if fraction < 0.7 else "late"


def fmt_win(s: dict) -> str:
    low, high = s["win_ci"]
    return f"{100 * s['win']:.0f}% [{100 * low:.0f}, {100 * high:.0f}]"


def fmt_gain(s: dict) -> str:
    low, high = s["gain_ci"]
    return f"{s['gain']:+.3f} [{low:+.3f}, {high:+.3f}]"


def variant_table(title: str, s: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        f"\n**{title}**\n",
        "| variant | cos | rel. error | cos − SAM's (95% CI) | beats SAM (95% CI) | batches |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(s, key=lambda n: -s[n]["cos"]):
        cells = "– | –" if name == "sam" else f"{fmt_gain(s[name])} | {fmt_win(s[name])}"
        lines.append(f"| {name} | {s[name]['cos']:.3f} | {s[name]['rel_err']:.2f} | {cells} | {s[name]['n']} |")
    return lines


def report(rows: list[dict]) -> tuple[str, dict]:
    """The study's tables and their numbers, each table from its own builder below."""
    if not rows:
        return "no rows yet\n", {}
    names = list(dict.fromkeys(n for r in rows for n in r["variants"]))
    shipped = shipped_variant()
    overall = summarize(rows, names)
    best = max((n for n in names if n != "sam"), key=lambda n: overall[n]["cos"])
    lines = stage_table(rows, list(dict.fromkeys(["sam", shipped, "exact:-1", "exact:-1:raw", best])))
    lines += in_situ_table(rows, shipped)
    lines += variant_tables(rows, names, overall)
    contender_lines, against_shipped = contender_table(rows, names, overall, shipped)
    lines += contender_lines
    sections = {}
    for traj in TRAJECTORIES:
        rs = [r for r in rows if r["trajectory"] == traj]
        if not rs:
            continue
        sections[traj] = summarize(rs, names)
        lines += variant_table(f"Every variant along the {traj} trajectory ({len(rs)} batches)", sections[traj])
    summary = {"overall": overall, "by_trajectory": sections, "best": best, "shipped": shipped}
    return "\n".join(lines) + "\n", {**summary, "against_shipped": against_shipped}


def stage_table(rows: list[dict], focus: list[str]) -> list[str]:
    """Trajectory × stage: the mean cosine of a few variants at each stage of each trajectory."""
    lines = ["**Trajectory × stage** (mean cos(C_X, C_PI); relative error in parentheses)\n"]
    lines.append("| task | trajectory | stage | steps | " + " | ".join(focus) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(focus))
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task"], r["trajectory"], stage(r))].append(r)
    for (task, traj, st), rs in sorted(
        groups.items(),
        key=lambda kv: (kv[0][0], TRAJECTORIES.index(kv[0][1]), ["early", "mid", "late"].index(kv[0][2])),
    ):
        s = summarize(rs, focus)
        steps = ",".join(str(x) for x in sorted({r["step"] for r in rs}))
        cells = [f"{s[n]['cos']:.3f} ({s[n]['rel_err']:.2f})" if n in s else "–" for n in focus]
        lines.append(f"| {task} | {traj} | {st} | {steps} | " + " | ".join(cells) + " |")
    return lines


def in_situ_table(rows: list[dict], shipped: str) -> list[str]:
    """Each method at its own trajectory's weights, and the paired δ-SAM − SAM gains in situ and at the target's."""
    lines = [
        "\n**In situ** (each method's update at its own trajectory's weights)\n",
        "| task | method on its own trajectory | cos | rel. error | units |",
        "|---|---|---|---|---|",
    ]
    for task in sorted({r["task"] for r in rows}):
        for traj, variant in (("sam", "sam"), ("deltasam", shipped)):
            rs = [r for r in rows if r["task"] == task and r["trajectory"] == traj]
            s = summarize(rs, [variant]).get(variant)
            if s:
                lines.append(f"| {task} | {traj} ({variant}) | {s['cos']:.3f} | {s['rel_err']:.2f} | {s['n']} |")
    paired = []
    for task in sorted({r["task"] for r in rows}):
        sam_rows = {(r["step"], r["batch"]): r for r in rows if r["task"] == task and r["trajectory"] == "sam"}
        d_rows = {(r["step"], r["batch"]): r for r in rows if r["task"] == task and r["trajectory"] == "deltasam"}
        for k in sorted(set(sam_rows) & set(d_rows)):
            paired.append(d_rows[k]["variants"][shipped]["cos"] - sam_rows[k]["variants"]["sam"]["cos"])
    if paired:
        low, high = bootstrap(paired)
        lines.append(
            f"\nδ-SAM in situ minus SAM in situ, paired by (task, probe point, batch): "
            f"{statistics.mean(paired):+.3f} cos, 95% CI [{low:+.3f}, {high:+.3f}], {len(paired)} pairs.\n"
        )
    at_target = [r for r in rows if r["trajectory"] == "per_instance"]
    if at_target:
        gain = [r["variants"][shipped]["cos"] - r["variants"]["sam"]["cos"] for r in at_target]
        low, high = bootstrap(gain)
        lines.append(
            f"At per-instance SAM's own weights (its trajectory), δ-SAM minus SAM, paired by batch: "
            f"{statistics.mean(gain):+.3f} cos, 95% CI [{low:+.3f}, {high:+.3f}], {len(gain)} batches.\n"
        )
    return lines


def variant_tables(rows: list[dict], names: list[str], overall: dict[str, dict]) -> list[str]:
    """Every variant, pooled over tasks, then task by task where there are several."""
    tasks = sorted({r["task"] for r in rows})
    lines = variant_table(f"Every variant, all trajectories and tasks pooled ({len(rows)} batches)", overall)
    if len(tasks) > 1:
        for task in tasks:
            rs = [r for r in rows if r["task"] == task]
            lines += variant_table(
                f"Every variant on {task}, all its trajectories ({len(rs)} batches)", summarize(rs, names)
            )
    return lines


def contender_table(
    rows: list[dict], names: list[str], overall: dict[str, dict], shipped: str
) -> tuple[list[str], dict[str, dict]]:
    """The six variants closest to per-instance SAM against the shipped one, paired over all batches."""
    same = [
        n
        for n in names
        if n != shipped and all(r["variants"][n] == r["variants"][shipped] for r in rows if n in r["variants"])
    ]
    others = [n for n in names if n not in ("sam", shipped, *same)]
    contenders = sorted(others, key=lambda n: -overall[n]["cos"])[:6]
    lines = [
        f"\n**The best variants against the shipped default {shipped}** (paired over all batches)\n",
        f"| variant | cos − {shipped}'s (95% CI) | closer than {shipped} on | batches |",
        "|---|---|---|---|",
    ]
    against_shipped = {}
    for name in contenders:
        gain = [r["variants"][name]["cos"] - r["variants"][shipped]["cos"] for r in rows if name in r["variants"]]
        low, high = bootstrap(gain)
        against_shipped[name] = {"gain": statistics.mean(gain), "gain_ci": [low, high], "n": len(gain)}
        wins = statistics.mean(float(g > 0) for g in gain)
        lines.append(
            f"| {name} | {statistics.mean(gain):+.3f} [{low:+.3f}, {high:+.3f}] | {100 * wins:.0f}% | {len(gain)} |"
        )
    if same:
        lines.append(f"\nIdentical to {shipped} on every batch (its floor and bounds never bind): {', '.join(same)}.")
    return lines, against_shipped


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trajs = [t for t in TRAJECTORIES if any(r["trajectory"] == t for r in rows)]
    shipped = shipped_variant()
    fig, axes = plt.subplots(1, len(trajs), figsize=(4.2 * len(trajs), 3.4), squeeze=False, sharey=True)
    for ax, traj in zip(axes[0], trajs):
        for task, style in (("mr", "-"), ("tweets", "--"), ("r8", ":")):
            rs = [r for r in rows if r["trajectory"] == traj and r["task"] == task]
            if not rs:
                continue
            for name, color in (
                ("sam", "black"),
                (shipped, "tab:blue"),
                ("exact:-1", "tab:red"),
                ("curvature:1", "tab:purple"),
            ):
                by_step: dict[int, list[float]] = defaultdict(list)
                for r in rs:
                    if name in r["variants"]:
                        by_step[r["step"]].append(r["variants"][name]["cos"])
                xs = sorted(by_step)
                ax.plot(
                    xs,
                    [statistics.mean(by_step[x]) for x in xs],
                    style,
                    marker="o",
                    color=color,
                    label=f"{name} ({task})",
                )
        ax.set_title(f"{traj} trajectory")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cos(C_X, C_PI)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def compare(rows: list[dict], reference: list[dict]) -> dict[str, Any]:
    """The largest absolute differences of each variant's cos and relative error between ``rows`` and the
    ``reference`` rows of the same trajectory, probe step and batch (same model, seed, radius, batch size, length)."""
    point = ("task", "trajectory", "model", "seed", "probe_rho", "batch_size", "max_length", "step", "batch")
    ref = {tuple(r[k] for k in point): r for r in reference}
    pairs = [(r, ref[tuple(r[k] for k in point)]) for r in rows if tuple(r[k] for k in point) in ref]
    out: dict[str, dict[str, float]] = {}
    for r, o in pairs:
        for name in set(r["variants"]) & set(o["variants"]):
            for field in ("cos", "rel_err"):
                d = abs(r["variants"][name][field] - o["variants"][name][field])
                out.setdefault(name, {}).setdefault(f"max_abs_diff_{field}", 0.0)
                out[name][f"max_abs_diff_{field}"] = max(out[name][f"max_abs_diff_{field}"], d)
    return {"probes_compared": len(pairs), "points": sorted({(r["step"], r["batch"]) for r, _ in pairs}), "max": out}


def main() -> None:
    global STORE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["mr", "tweets"])
    parser.add_argument("--trajectories", nargs="+", default=list(TRAJECTORIES), choices=TRAJECTORIES)
    parser.add_argument("--pi-tasks", nargs="+", default=["mr"], help="tasks with a per-instance trajectory")
    parser.add_argument(
        "--pi-rho", type=float, default=None, help="ρ of the per-instance trajectory (default: shipped)"
    )
    parser.add_argument("--points", type=int, default=5, help="probe points per trajectory, the last included")
    parser.add_argument("--batches", type=int, default=8, help="held-out batches per probe point")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rho", type=float, default=0.05, help="radius of every variant and of the oracle")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["*"],
        help="shell-style patterns of the variants to measure (default: all); SAM and the shipped δ-SAM are always "
        "measured, e.g. --variants 'head:*' 'exact:-*'",
    )
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=None, help="trajectory length (default: max(400, 1 epoch))")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="only build the tables and the plot")
    parser.add_argument("--store", type=Path, default=STORE, help="the JSONL file of rows")
    parser.add_argument("--name", default="fidelity", help="name of the summary JSON and plot in docs/results")
    parser.add_argument(
        "--compare",
        type=Path,
        help="only compare the rows of --store with this file's at the same probe points (into docs/results/<name>)",
    )
    args = parser.parse_args()
    STORE = args.store
    if args.compare:
        save(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, **compare(load(), load(args.compare))})
        return
    if not args.report:
        for task in args.tasks:
            for method in args.trajectories:
                if method != "per_instance" or task in args.pi_tasks:
                    trajectory(task, method, args)
    same = ("model", "seed", "probe_rho", "batch_size", "max_length")
    rows = [r for r in load() if all(r[k] == getattr(args, k.replace("probe_", "")) for k in same)]
    text, summary = report(rows)
    save(
        args.name,
        {
            "args": {k: str(v) for k, v in vars(args).items()},
            "top_layers": TOP_LAYERS,
            "table": text,
            "summary": summary,
        },
    )
    if rows:
        plot(rows, RESULTS / f"{args.name}.png")
    print(text)


if __name__ == "__main__":
    main()
