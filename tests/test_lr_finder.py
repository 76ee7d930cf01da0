"""``tune_lr=true``: Lightning's LR range test on an ERM copy, then the run at its suggestion."""

import json
import re
from pathlib import Path

import pytest
from test_app import FAST, compose_train, run_cli, train

SEARCH = ["tune_lr=true", "lr_find.num_training=24", "lr_find.min_lr=1e-6", "lr_find.max_lr=1.0"]
NO_PROBE = "~callbacks.sharpness_probe"  # the runs below read no probe value; it is about a third of such a run


def test_a_tuned_run_is_the_run_at_the_suggested_lr(tmp_path):
    tuned = train(compose_train([*FAST, NO_PROBE, "method=deltasam", *SEARCH], tmp_path / "tuned"))
    lr = tuned["tune_lr/lr"]
    assert lr != 5e-5 and 1e-6 <= lr <= 1.0
    assert json.loads((tmp_path / "tuned" / "lr_find.json").read_text())["suggestion"] == lr
    assert (tmp_path / "tuned" / "lr_find.png").stat().st_size > 0
    assert not list((tmp_path / "tuned").glob(".lr_find_*.ckpt"))  # the range test's start is deleted
    plain = train(compose_train([*FAST, NO_PROBE, "method=deltasam", f"optim.lr={lr!r}"], tmp_path / "plain"))
    for name in ("train/loss", "val/loss", "test/loss", "sam/sharpness_mean"):
        assert tuned[name] == plain[name], name


def test_the_range_test_trains_erm_and_leaves_the_method_alone(tmp_path, monkeypatch):
    from lit_deltasam.app import lr_finder

    seen = []
    real = lr_finder.Tuner.lr_find

    def spy(self, model, **kwargs):
        seen.append(model.deltasam)
        return real(self, model, **kwargs)

    monkeypatch.setattr(lr_finder.Tuner, "lr_find", spy)
    cfg = compose_train([*FAST, NO_PROBE, "method=sam", "method.accumulate_grad_batches=2", *SEARCH], tmp_path)
    metrics = train(cfg)
    assert [(c.method, c.accumulate_grad_batches) for c in seen] == [("erm", 2)]
    assert cfg.method.method == "sam" and cfg.optim.lr == metrics["tune_lr/lr"]
    assert "sam/sharpness_mean" in metrics
    # one point per optimizer step, not per micro-batch: the LR moves once per accumulation window
    curve = json.loads((tmp_path / "lr_find.json").read_text())
    assert len(curve["lr"]) == 24 and len(set(curve["lr"])) == 24
    assert curve["suggestion"] > 10 * curve["lr"][0]
    assert curve["loss"][0] == pytest.approx(curve["raw_loss"][0])  # no pull toward zero at the start


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr=1e-3"], "and tune_lr=true: the LR finder chooses optim.lr; drop one of them"),
        (["ckpt_path=last.ckpt"], "ckpt_path='last.ckpt' and tune_lr=true: a resumed run continues"),
        (["+trainer.fast_dev_run=true"], "trainer.fast_dev_run and tune_lr=true"),
    ],
)
def test_settings_a_tuned_run_would_overwrite_are_refused_in_process(overrides, message, tmp_path):
    from lit_deltasam.app import lr_finder

    with pytest.raises(ValueError, match=re.escape(message)):
        lr_finder.apply(compose_train([*FAST, *SEARCH, *overrides], tmp_path))
    assert not list(tmp_path.rglob("*.ckpt"))


LOST = [
    (["tune_lr=true", "optim.lr=1e-3"], "'optim.lr=1e-3' and tune_lr=true: the LR finder chooses optim.lr"),
    (["lr_find.num_training=50"], "lr_find.num_training=50 set with tune_lr=false: add tune_lr=true"),
    (["tune_lr=true", "lr_find.mode=cosine"], "lr_find.mode='cosine': choose one of ['exponential', 'linear']"),
    (["tune_lr=true", "lr_find.rule=valley"], "lr_find.rule='valley': choose one of ['minimum', 'steepest']"),
    (["tune_lr=true", "lr_find.num_training=5"], "lr_find.num_training=5: the suggestion needs at least 12"),
    (["tune_lr=true", "lr_find.min_lr=0.1"], "lr_find.min_lr=0.1, lr_find.max_lr=0.01: need 0 < min_lr < max_lr"),
    (["tune_lr=true", "lr_find.early_stop_threshold=0.5"], "lr_find.early_stop_threshold=0.5: the search"),
]
"""Settings the LR finder would lose, and the message that refuses each."""


@pytest.mark.parametrize("overrides, message", LOST)
def test_settings_the_lr_finder_would_lose_are_refused_before_anything_runs(overrides, message, tmp_path):
    from lit_deltasam.app import lr_finder

    with pytest.raises(ValueError, match=re.escape(message)):
        lr_finder.apply(compose_train([*FAST, *overrides], tmp_path))
    assert not list(tmp_path.rglob("*.ckpt"))


# each a train.py process; the in-process test above checks every message, this one the command line's exit
@pytest.mark.parametrize(
    "overrides, message", [LOST[0], *(pytest.param(*case, marks=pytest.mark.slow) for case in LOST[1:])]
)
def test_settings_the_lr_finder_would_lose_are_refused(overrides, message, tmp_path):
    run = run_cli(*FAST, *overrides, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert run.returncode == 1, run.stderr
    assert message in run.stderr
    assert not list(Path(tmp_path).rglob("*.ckpt"))


def test_an_lr_a_config_sets_is_refused_with_tune_lr(tmp_path):
    from lit_deltasam.app import lr_finder

    cfg = compose_train([*FAST, *SEARCH], tmp_path)
    cfg.optim.lr = 3e-4  # as an experiment config would set it
    with pytest.raises(ValueError, match=re.escape("optim.lr=0.0003 (from a config) and tune_lr=true")):
        lr_finder.apply(cfg)


def test_the_rules_read_the_curve():
    """``minimum``: a tenth of the LR at the lowest loss past the skipped points; ``steepest``: Lightning's."""
    from types import SimpleNamespace

    from lightning.pytorch.tuner.lr_finder import _LRFinder

    from lit_deltasam.app import lr_finder

    lrs = [10 ** (-6 + i / 5) for i in range(30)]
    losses = [2.0] * 12 + [2.0 - 0.1 * i for i in range(10)] + [5.0] * 8  # lowest at index 21
    finder = _LRFinder("exponential", lrs[0], lrs[-1], len(lrs))
    finder.results = {"lr": lrs, "loss": losses}
    assert lr_finder.suggestion(finder, "minimum") == pytest.approx(lrs[21] / 10)
    assert lr_finder.suggestion(finder, "steepest") == finder.suggestion(skip_begin=10, skip_end=1)
    assert lr_finder.suggestion(SimpleNamespace(results={"lr": lrs, "loss": [float("nan")] * 30}), "minimum") is None
    # the mixin's accumulation: every LR k times, one point per optimizer step (the mean of its window)
    curve = lr_finder.smoothed_curve([(1, 9.0), (1, 7.0), (2, 6.0), (2, 4.0), (3, 5.0), (3, 5.0)], beta=0.5)
    assert curve["lr"] == [1, 2, 3] and curve["raw_loss"] == [8.0, 5.0, 5.0]
    # bias-corrected: the first point is the first loss, then EMA / (1 - beta^(i+1))
    assert curve["loss"] == pytest.approx([8.0, (0.25 * 8 + 0.5 * 5) / 0.75, (0.125 * 8 + 0.25 * 5 + 0.5 * 5) / 0.875])
