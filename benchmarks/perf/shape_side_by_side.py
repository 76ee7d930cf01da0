"""The step's cost in one checkout, for timing the redesigned core against the old one side by side (issue 46).

Times ``DeltaSAMOptimizer.step`` (the hand-written loop's entry point) for a set of configs on a small MLP, where the
library's own orchestration is a large share of the step, and on a wider one, interleaved in one process; prints one
JSON line with the median step time of each config. Alternate the checkouts on an idle machine::

    git worktree add /tmp/old 1bf3b72
    for i in 1 2 3; do for root in /tmp/old .; do
        PYTHONPATH=$root python benchmarks/perf/shape_side_by_side.py 200 >> docs/results/shape_side_by_side.jsonl
    done; done

It imports nothing of the benchmarks, only ``lit_deltasam``: the copy ``PYTHONPATH`` names is the one timed.
"""

import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lit_deltasam
from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 200
ROOT = Path(lit_deltasam.__file__).resolve().parents[1]
CONFIGS = {
    "erm": dict(method="erm"),
    "sam": dict(method="sam", rho=0.05),
    "asam": dict(method="asam"),
    "deltasam": dict(method="deltasam", rho=0.05),
    "m_sam_loop": dict(method="sam", rho=0.05, m_sharpness=8, group_impl="loop"),
    "looksam": dict(method="sam", rho=0.05, interval=2, reuse="looksam"),
    "accumulate_clip": dict(method="sam", rho=0.05, accumulate_grad_batches=2, gradient_clip_val=1.0),
}
SIZES = {"small": (16, 32), "wide": (64, 512)}


def commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip()


def main() -> None:
    torch.manual_seed(0)
    out: dict = {"root": str(ROOT), "commit": commit(), "rounds": ROUNDS, "threads": torch.get_num_threads()}
    out["machine"] = f"{platform.machine()} {platform.processor() or platform.system()}"
    for size, (d, hidden) in SIZES.items():
        x, y = torch.randn(32, d), torch.randint(0, 4, (32,))
        runs = {}
        for name, options in CONFIGS.items():
            model = nn.Sequential(
                nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 4)
            )
            opt = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01), DeltaSAMConfig(**options))

            def loss_fn(batch, model=model):
                return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

            runs[name] = (opt, loss_fn)
        times: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(ROUNDS + 10):  # the first rounds warm up
            for name, (opt, loss_fn) in runs.items():
                start = time.perf_counter()
                opt.step(loss_fn, (x, y))
                if r >= 10:
                    times[name].append(time.perf_counter() - start)
        out[size] = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
