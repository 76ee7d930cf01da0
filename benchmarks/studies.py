"""Several studies in one pool of runs, phase by phase: every study's first phase before any study's second, so that
the workers stay busy while a study waits for the rows its next phase is chosen from (a GPU runs many MiniLM runs at
once). The rows go to the platform's store; each study's ``--report`` builds its tables from them.

    python -m benchmarks.studies recipe premise --platform gpu --jobs 12 --deadline 540 --store $OUT/runs_gpu.jsonl
"""

from __future__ import annotations

import argparse
import importlib

from benchmarks.lab.runs import use_platform
from benchmarks.lab.scheduler import add_study_arguments, phased, schedule

STUDIES = ("recipe", "premise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", choices=STUDIES)
    add_study_arguments(parser)
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    phases = [importlib.import_module(f"benchmarks.{name}").PHASES for name in args.studies]
    schedule(phased(*phases), "studies", args.jobs, args.deadline)


if __name__ == "__main__":
    main()
