"""Soak: a long δ-SAM run under DDP stays in agreement across ranks and does not grow in memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_two_thousand_steps_under_ddp(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(HERE / "soak_worker.py"), str(tmp_path), "2000"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads((tmp_path / "soak.json").read_text())
    assert [r["step"] for r in rows] == list(range(100, 2001, 100))
    assert max(r["max_rank_diff"] for r in rows) == 0.0
    warm = rows[1]["rss_mb"]  # after 200 steps: allocator pools and caches are filled
    assert rows[-1]["rss_mb"] <= 1.10 * warm, rows
