"""What a new user reads and keeps: paths printed whole, a run folder sized to the run, a log file of the run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_deltasam.app import schema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMALL = ["model=small", "debug=fast"]
PATH = re.compile(r"(?<![\w./-])(?:/|\./|outputs/|multirun/)[\w.\-/]*\w")
"""A path on the screen: absolute, or under the folders Hydra writes to; what a wrapped line leaves of one, too."""


def cli(script, *args, cwd, columns):
    env = {**os.environ, "COLUMNS": str(columns), "WANDB_MODE": "offline", "WANDB_DIR": str(cwd)}
    run = subprocess.run(
        [sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def labelled_paths(screen):
    """``(label, path)`` for every ``label:`` line followed by a line that is a path, whole."""
    lines = screen.splitlines()
    return [(a[:-1], b) for a, b in zip(lines, lines[1:]) if a.endswith(":") and b.startswith("/") and " " not in b]


def check_paths(run, cwd):
    """Every path printed exists (a path cut by a line wrap does not), and the labelled ones are whole lines."""
    screen = run.stdout + run.stderr
    found = PATH.findall(screen)
    assert found
    for path in found:
        assert (cwd / path).exists() or Path(path).is_symlink(), f"{path!r} printed, but there is no such path"
    return labelled_paths(run.stdout)


@pytest.mark.parametrize("columns", [80, 160])
def test_every_printed_path_is_whole_and_exists(columns, tmp_path):
    """At 80 columns a run (W&B offline) and eval.py on its last checkpoint; at 160 a multirun of two jobs."""
    if columns == 160:
        run = cli("train.py", "-m", *SMALL, "logger=none", "seed=1,2", cwd=tmp_path, columns=columns)
        folders = [path for label, path in check_paths(run, tmp_path) if label == "run folder"]
        jobs = sorted(str(p) for p in tmp_path.glob("multirun/*/*/[0-9]"))
        assert run.stdout.count("run folder:") == 2 and len(jobs) == 2 and set(folders) == set(jobs)
        for job, other in (jobs, jobs[::-1]):  # each job's log holds its own run, not the other's
            log = (Path(job) / "train.log").read_text()
            assert f"run folder:\n{job}\n" in log and other not in log
        return
    run = cli("train.py", *SMALL, cwd=tmp_path, columns=columns)
    paths = dict(check_paths(run, tmp_path))
    (folder,) = tmp_path.glob("outputs/*/*")
    assert paths["run folder"] == str(folder)
    assert paths["best checkpoint (val/acc), tested above"] == str(folder / "checkpoints" / "step4.ckpt")
    last = paths["last checkpoint (a link to the best: the last step was the best)"]
    assert last == str(folder / "checkpoints" / "last.ckpt")
    log = (folder / "train.log").read_text()  # the log file holds the run: Lightning's lines and the final report
    for line in ("`Trainer.fit` stopped: `max_steps=4` reached.", "│ test/acc ", f"run folder:\n{folder}\n"):
        assert line in log
    evaluated = cli("eval.py", f"ckpt_path={last}", cwd=tmp_path, columns=columns)
    paths = dict(check_paths(evaluated, tmp_path))
    assert paths["checkpoint"] == last and Path(paths["run folder"]).parent.parent == tmp_path / "outputs" / "eval"


def run_size(folder):
    """Bytes the run folder takes: its files, a link counted as a link."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def test_a_debug_run_keeps_one_checkpoint(tmp_path):
    """The last step is the best one: last.ckpt is a link to it, and the run folder is about one checkpoint."""
    from train import train

    train(schema.compose(ROOT / "conf", [*SMALL, "logger=none"], tmp_path))
    saved = tmp_path / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["last.ckpt", "step4.ckpt"]
    assert (saved / "last.ckpt").is_symlink() and (saved / "last.ckpt").resolve() == saved / "step4.ckpt"
    one = (saved / "step4.ckpt").stat().st_size
    assert one > 10e6 and run_size(tmp_path) < one + 1e6


def test_last_is_a_copy_of_the_last_step_when_an_earlier_step_is_best(tmp_path):
    """Best at step 2 (monitoring the step, smallest first), last at step 4: two files, each its own step's."""
    from train import train

    overrides = [*SMALL, "logger=none", "trainer.val_check_interval=2", "task.monitor=step", "task.mode=min"]
    train(schema.compose(ROOT / "conf", overrides, tmp_path))
    saved = tmp_path / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["last.ckpt", "step2.ckpt"]
    assert not (saved / "last.ckpt").is_symlink()  # at step 2 it was a link; step 4 replaced it, not its target
    best, last = (torch.load(saved / name, weights_only=True) for name in ("step2.ckpt", "last.ckpt"))
    assert (best["global_step"], last["global_step"]) == (2, 4)
    assert any(not torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())
