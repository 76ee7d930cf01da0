"""The scheduler every fine-tuning study shares: run a study's missing units, phase by phase, in a pool of worker
processes, appending each row to the platform's store as it finishes (:mod:`benchmarks.lab.runs`).

    python -m benchmarks.lab.scheduler --smoke --platform gpu --store $OUT/smoke.jsonl   # try a platform first
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Optional

import torch

from benchmarks.lab.common import ROOT
from benchmarks.lab.runs import (
    PLATFORMS,
    TUNE,
    Method,
    is_tuned,
    key,
    platform_name,
    rows_by_key,
    run,
    store,
    use_platform,
)


def slug(unit: tuple) -> str:
    """The run folder's name of ``unit``."""
    task, setting, method, seed, *rest = unit
    out = f"{task}-{setting}-{method.label.replace(' ', '_').replace('=', '')}-s{seed}"
    if rest and rest[0] is not None:
        lr = rest[0]
        out += f"-lr{lr:g}" if not is_tuned(lr) else "-" + str(lr).replace(TUNE, "tune_lr", 1)
    return out + "".join(f"-{f}{v:g}" for f, v in (rest[1] if len(rest) > 1 else ()))


def _run_unit(unit: tuple, name: str) -> dict:
    task, setting, method, seed, *rest = unit
    return run(task, setting, method, seed, ROOT / "outputs" / "benchmarks" / name / slug(unit), *rest)


def _start_worker(platform: str, threads: int) -> None:
    use_platform(platform)
    torch.set_num_threads(threads)


def schedule(
    plan: Callable[[dict[str, dict]], list[tuple]],
    name: str,
    jobs: int = 1,
    deadline: Optional[float] = None,
    on_row: Optional[Callable[[dict[str, dict]], None]] = None,
) -> dict[str, dict]:
    """Run every unit ``(task, setting, method, seed[, lr[, optim]])`` of ``plan(rows)`` whose row is missing, in its
    order, appending each row to :func:`store` as it finishes; returns the rows by key.

    ``plan`` is asked again after every row, so that a phase chosen from earlier rows starts as soon as they are in.
    ``jobs`` > 1 runs that many worker processes (each with ``torch_threads = cores // jobs``); ``deadline``: seconds
    after which no new run starts. A run that raises is reported and not retried in this call; the call then exits
    non-zero once the others are done."""
    path = store()
    rows = rows_by_key(path)
    began = time.monotonic()
    failed: dict[str, str] = {}
    running: dict[Future, tuple[str, tuple]] = {}

    def wanted() -> list[tuple[str, tuple]]:
        out: dict[str, tuple] = {}
        for unit in plan(rows):
            k = key(*unit)
            if k not in rows and k not in failed and k not in out and all(k != r[0] for r in running.values()):
                out[k] = unit
        return list(out.items())

    def finished(k: str, unit: tuple, row: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows[k] = row
        metric = "pearson" if "val/pearson" in row["metrics"] else "acc"  # a regression task's, or accuracy
        print(
            f"[{name}] {slug(unit)}: val {row['metrics'].get(f'val/{metric}', float('nan')):.4f} "
            f"test {row['metrics'].get(f'test/{metric}', float('nan')):.4f} ({row['time_s']:.0f} s, "
            f"{time.monotonic() - began:.0f} s in)",
            flush=True,
        )
        if on_row is not None:
            on_row(rows)

    def late() -> bool:
        return deadline is not None and time.monotonic() - began > deadline

    if jobs <= 1:
        while not late() and (todo := wanted()):
            k, unit = todo[0]
            try:
                row = _run_unit(unit, name)
            except Exception:
                failed[k] = traceback.format_exc()
                print(f"[{name}] {slug(unit)} failed:\n{failed[k]}", flush=True)
                continue
            finished(k, unit, row)
    else:
        threads = max(1, (os.cpu_count() or jobs) // jobs)
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        with ProcessPoolExecutor(jobs, context, _start_worker, (platform_name(), threads)) as pool:
            while True:
                if not late():
                    for k, unit in wanted()[: jobs - len(running)]:
                        running[pool.submit(_run_unit, unit, name)] = (k, unit)
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    k, unit = running.pop(future)
                    try:
                        finished(k, unit, future.result())
                    except Exception:
                        failed[k] = traceback.format_exc()
                        print(f"[{name}] {slug(unit)} failed:\n{failed[k]}", flush=True)
    if late():
        print(f"[{name}] deadline of {deadline:.0f} s reached; {len(wanted())} runs left for a rerun", flush=True)
    if failed:
        raise SystemExit(f"[{name}] {len(failed)} runs failed; their tracebacks are above")
    return rows


def phased(*studies: Sequence[Callable[[dict[str, dict]], list[tuple]]]) -> Callable[[dict[str, dict]], list[tuple]]:
    """A :func:`schedule` plan of the studies' phases: every study's first phase before any study's second."""
    depth = max(len(phases) for phases in studies)
    return lambda rows: [u for i in range(depth) for phases in studies if i < len(phases) for u in phases[i](rows)]


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """``--platform``, ``--store``, ``--jobs`` and ``--deadline``: where and how a study's runs run."""
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="cpu", help="where the runs run (keyed apart)")
    parser.add_argument("--store", type=Path, help="the rows' JSONL file (default: the platform's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--deadline", type=float, help="seconds after which no new run starts")


def report_name(name: str, platform: str) -> str:
    """The results JSON of a study's tables on ``platform`` (``name`` on the CPU, ``name_<platform>`` elsewhere)."""
    return name if platform == "cpu" else f"{name}_{platform}"


def save_report(name: str, module: str, platform: str, text: str, summary: dict) -> str:
    """Write study ``name``'s tables (``text``) and numbers on ``platform`` to its results JSON, with the command
    that rebuilds them (``python -m benchmarks.<module> --report``); returns ``text``."""
    from benchmarks.lab.common import save

    command = f"python -m benchmarks.{module} --platform {platform} --report"
    save(report_name(name, platform), {"command": command, "table": text, **summary})
    return text


def run_all(units: Iterable[tuple], name: str) -> dict[str, dict]:
    """Run every unit whose row is missing, one at a time (:func:`schedule`)."""
    units = list(units)
    return schedule(lambda _: units, name)


def main() -> None:
    parser = argparse.ArgumentParser(description="try a platform: a few batches of each kind of run, in parallel")
    parser.add_argument("--smoke", action="store_true", required=True)
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="cpu")
    parser.add_argument("--store", type=Path, required=True, help="where the smoke rows go")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    methods = [Method("erm"), Method("sam", 0.05, "follow_lr"), Method("per_instance", 0.01, "follow_lr")]
    units = [("mr", "smoke", m, 1) for m in methods] + [("tweets", "smoke", Method("erm"), 1, f"{TUNE}:minimum")]
    units += [("r8", "smoke", Method("erm"), 1, 1e-4, (("head_lr_mult", 10.0), ("layer_decay", 0.8)))]
    rows = schedule(lambda _: units, "smoke", jobs=args.jobs)
    print(json.dumps({slug(u): rows[key(*u)]["metrics"].get("val/acc") for u in units}))


if __name__ == "__main__":
    main()
