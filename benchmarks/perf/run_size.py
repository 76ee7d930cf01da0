"""What a run keeps on disk: the size of a `debug=fast` run folder (MiniLM, W&B offline, the defaults), and of an
Optuna trial's, file by file, measured by running train.py from a checkout.

python -m benchmarks.perf.run_size --label after                            # this checkout
python -m benchmarks.perf.run_size --label before --root /path/to/old/checkout

Writes (merges into) docs/results/run_size.json, one entry per label.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "results" / "run_size.json"
RUNS = {
    "debug_fast": ["debug=fast"],
    "optuna_trial": ["-m", "debug=fast", "hparams_search=optuna", "hydra.sweeper.n_trials=1"],
}


def files(folder: Path) -> dict[str, int]:
    """Bytes per file (a link counted as a link) under ``folder``."""
    return {
        str(p.relative_to(folder)): p.lstat().st_size
        for p in sorted(folder.rglob("*"))
        if not p.is_dir() or p.is_symlink()
    }


def measure(root: Path, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(root)}
        where = f"hydra.sweep.dir={scratch}/sweep" if "-m" in args else f"hydra.run.dir={scratch}/run"
        run = subprocess.run(
            [sys.executable, str(root / "train.py"), *args, where], cwd=scratch, env=env, capture_output=True, text=True
        )
        if run.returncode:
            raise SystemExit(run.stderr[-3000:])
        sizes = files(Path(scratch) / ("sweep/0" if "-m" in args else "run"))
        big = {name: size for name, size in sizes.items() if size > 1e6}
        return {"command": "python train.py " + " ".join(args), "bytes": sum(sizes.values()), "files_over_1MB": big}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    options = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=options.root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=options.root).returncode != 0
    entry = {
        "commit": commit.stdout.strip() + ("+uncommitted changes" if dirty else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": {name: measure(options.root, RUNS[name]) for name in options.runs},
    }
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    results[options.label] = entry
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


if __name__ == "__main__":
    main()
