"""The step's cost of this checkout's core against an earlier one's, side by side in one process (issue 46).

The earlier checkout's package is imported under another name (it imports itself only relatively), and both time
``DeltaSAMOptimizer.step`` (the hand-written loop's entry point) round by round, alternating, for a set of configs on
a small MLP, where the library's own orchestration is a large share of the step, and on a wider one. Because the two
alternate step by step, a load on the machine slows both alike; the per-round ratio's median is the figure::

    git worktree add /tmp/old 1bf3b72
    python benchmarks/perf/shape_side_by_side.py /tmp/old 200 --out docs/results/shape_side_by_side.json
"""

import argparse
import importlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import lit_deltasam

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


def commit(root: Path) -> str:
    out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip()


def earlier(root: Path):
    """The package of the checkout at ``root``, imported as ``lit_deltasam_before``."""
    holder = Path(tempfile.mkdtemp())
    (holder / "lit_deltasam_before").symlink_to(root / "lit_deltasam")
    sys.path.insert(0, str(holder))
    return importlib.import_module("lit_deltasam_before")


def stepper(package, options: dict, d: int, hidden: int):
    torch.manual_seed(0)
    layers = [nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 4)]
    model = nn.Sequential(*layers)
    opt = package.DeltaSAMOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.01), package.DeltaSAMConfig(**options)
    )

    def loss_fn(batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    return lambda batch: opt.step(loss_fn, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path, help="the earlier checkout")
    parser.add_argument("rounds", type=int, nargs="?", default=200)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    before = earlier(args.before.resolve())
    now_root = Path(lit_deltasam.__file__).resolve().parents[1]
    out: dict = {
        "command": "python benchmarks/perf/shape_side_by_side.py " + " ".join(sys.argv[1:]),
        "before": commit(args.before),
        "now": commit(now_root),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.system()}, {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": {},
    }
    for size, (d, hidden) in SIZES.items():
        x, y = torch.randn(32, d), torch.randint(0, 4, (32,))
        for name, options in CONFIGS.items():
            steps = {"before": stepper(before, options, d, hidden), "now": stepper(lit_deltasam, options, d, hidden)}
            times: dict[str, list[float]] = {"before": [], "now": []}
            for r in range(args.rounds + 10):  # the first rounds warm up
                for which, step in steps.items():
                    start = time.perf_counter()
                    step((x, y))
                    if r >= 10:
                        times[which].append(time.perf_counter() - start)
            ratios = [n / b for n, b in zip(times["now"], times["before"])]
            out["rows"][f"{size}/{name}"] = {
                "before_ms": statistics.median(times["before"]) * 1e3,
                "now_ms": statistics.median(times["now"]) * 1e3,
                "ratio_median": statistics.median(ratios),
            }
    text = json.dumps(out, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
