"""Several studies in one pool of runs, phase by phase: every study's first phase before any study's second, so that
the workers stay busy while a study waits for the rows its next phase is chosen from (a GPU runs many MiniLM runs at
once). The rows go to the platform's store; each study's ``--report`` builds its tables from them.

    python benchmarks/studies.py recipe premise --platform gpu --jobs 12 --deadline 540 --store $OUT/runs_gpu.jsonl
"""

from __future__ import annotations

import argparse
import importlib

from runs import add_study_arguments, phased, schedule, use_platform

STUDIES = ("recipe", "premise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", choices=STUDIES)
    add_study_arguments(parser)
    args = parser.parse_args()
    use_platform(args.platform, args.store)
    schedule(
        phased(*(importlib.import_module(name).PHASES for name in args.studies)), "studies", args.jobs, args.deadline
    )


if __name__ == "__main__":
    main()
