"""Several studies in one pool of runs, phase by phase: every study's first phase before any study's second, so that
the workers stay busy while a study waits for the rows its next phase is chosen from (a GPU runs many MiniLM runs at
once). The rows go to the platform's store; each study's ``--report`` builds its tables from them.

    python benchmarks/studies.py recipe premise --platform gpu --jobs 12 --deadline 540 --store $OUT/runs_gpu.jsonl
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from runs import PLATFORMS, schedule, use_platform

STUDIES = ("recipe", "premise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", choices=STUDIES)
    parser.add_argument("--platform", choices=sorted(PLATFORMS), default="cpu")
    parser.add_argument("--store", type=Path, help="the rows' JSONL file (default: the platform's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--deadline", type=float, help="seconds after which no new run starts")
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    phases = [importlib.import_module(name).PHASES for name in args.studies]
    depth = max(len(p) for p in phases)
    plan = lambda rows: [u for i in range(depth) for p in phases if i < len(p) for u in p[i](rows)]  # noqa: E731
    schedule(plan, "studies", args.jobs, args.deadline)


if __name__ == "__main__":
    main()
