"""``python benchmarks/gpu_check.py ...``: the path the GPU bundle runs; the check is :mod:`benchmarks.perf.gpu_check`
(``python -m benchmarks.perf.gpu_check ...``, the same arguments). Run as a path, this file starts the module with
this checkout on ``PYTHONPATH``, so that it works from any directory."""

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    root = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "benchmarks.perf.gpu_check", *sys.argv[1:]]
    os.execve(sys.executable, command, {**os.environ, "PYTHONPATH": path})
