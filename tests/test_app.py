"""The Hydra application: configs compose, every task and method runs, loggers and sweeps work."""

import csv
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from helpers import wandb_history
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lit_deltasam import DeltaSAMConfig
from lit_deltasam.app import schema

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["model", "task", "method", "trainer", "logger", "callbacks", "experiment", "hparams_search", "debug"]
FAST = ["model=small", "debug=fast", "logger=none"]
SWEEP = [*FAST, "~callbacks.sharpness_probe"]
"""FAST for the sweeps' jobs, whose tests read no probe value: the probe is about a third of such a run."""

sys.path.insert(0, str(ROOT))
from train import train  # noqa: E402


def compose_train(overrides, output_dir):
    """The config ``python train.py <overrides>`` would run, with its outputs in ``output_dir``."""
    return schema.compose(CONF, overrides, output_dir)


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_config_composes(group, tmp_path):
    for option in options(group):
        cfg = compose_train([f"{group}={option}"], tmp_path)
        OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(instantiate(cfg.method), DeltaSAMConfig)
        instantiate(cfg.model)


def test_values_written_in_train_yaml_take_effect(tmp_path):
    """train.yaml comes after the schema in its defaults list, so its values win over the schema's."""
    cfg = compose_train(["seed=3", "task=r8", "method=sam"], tmp_path)
    assert cfg.run_name == "r8-minilm-sam-s3"
    written = yaml.safe_load((CONF / "train.yaml").read_text())
    assert cfg.data.max_length == written["data"]["max_length"]


def test_a_data_error_prints_its_message_without_a_traceback(tmp_path):
    run = run_cli("task=files", "task.train=missing.csv", "logger=none", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert run.returncode == 1
    assert "Error: task.train='missing.csv': no such file" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_method_configs_take_their_defaults_from_the_dataclass(tmp_path):
    cfg = compose_train(["method=deltasam"], tmp_path)
    assert instantiate(cfg.method) == DeltaSAMConfig(method="deltasam", estimator="head")


METHODS = options("method")
SLOW_METHODS = ["fsam", "wsam"]
"""Run only under ``-m slow`` (test_the_rest_of_the_sam_family_trains_from_the_cli); gsam stands for the family in
the default suite."""

TASKS = ["mr", "r8", "tweets", "mr_rating"]
ONE_EACH = {"mr": ["erm", "sam", "deltasam_probe"], "r8": ["asam", "deltasam_curvature"], "tweets": ["per_instance"]}
ONE_EACH["mr_rating"] = ["deltasam", "gsam"]  # the head's scores on a regression head
"""The pairs the default suite runs: every method once (the family's but gsam under ``-m slow``), every task at least
once; the other pairs are marked slow."""


def test_the_default_pairs_cover_every_task_and_every_method():
    assert sorted(ONE_EACH) == sorted(TASKS)
    default = sorted(method for methods in ONE_EACH.values() for method in methods)
    assert default == sorted(m for m in METHODS if m not in SLOW_METHODS)


@pytest.mark.parametrize(
    "task, method",
    [pytest.param(t, m, marks=() if m in ONE_EACH[t] else pytest.mark.slow) for t in TASKS for m in METHODS],
)
def test_each_task_with_the_small_model_and_each_method(task, method, tmp_path):
    metrics = train(compose_train([*FAST, f"task={task}", f"method={method}"], tmp_path))
    monitor = "test/pearson" if task == "mr_rating" else "test/acc"
    assert monitor in metrics, (method, sorted(metrics))
    assert (tmp_path / "metrics.json").exists()
    assert list((tmp_path / "checkpoints").glob("*.ckpt"))
    if task == "mr":  # ERM makes no correction whose fidelity the probe could measure; SAM's is still probed
        assert ("probe/cos_erm" in metrics, "probe/cos_sam" in metrics) == (False, True) or method != "erm"


@pytest.mark.slow
@pytest.mark.parametrize("method", SLOW_METHODS)
def test_the_rest_of_the_sam_family_trains_from_the_cli(method, tmp_path):
    metrics = train(compose_train([*FAST, "task=mr", f"method={method}"], tmp_path))
    assert "test/acc" in metrics and (tmp_path / "metrics.json").exists()


def test_the_family_configs_and_their_fields_compose(tmp_path):
    """conf/method/{gsam,wsam,fsam}.yaml are the dataclass's defaults; the new fields are in the generated schema
    (settable and type-checked from the command line) and refused by name where they do nothing."""
    for method in ("gsam", "wsam", "fsam"):
        assert instantiate(compose_train([f"method={method}"], tmp_path).method) == DeltaSAMConfig(method=method)
    cfg = compose_train(["method=gsam", "method.gsam_alpha=0.2", "method.gradient_centralization=true"], tmp_path)
    assert (instantiate(cfg.method).gsam_alpha, instantiate(cfg.method).gradient_centralization) == (0.2, True)
    cfg = compose_train(["method=fsam", "method.fsam_sigma=0.5", "method.fsam_lambda=0.8"], tmp_path)
    assert (instantiate(cfg.method).fsam_sigma, instantiate(cfg.method).fsam_lambda) == (0.5, 0.8)
    overrides = ["method=sam", "method.policy=adaptive", "method.policy_c_start=2", "method.policy_delta=0.8"]
    policy = instantiate(compose_train(overrides, tmp_path).method)
    assert (policy.policy, policy.policy_c_start, policy.policy_delta, policy.policy_c_end) == (
        "adaptive",
        2,
        0.8,
        -1.0,
    )
    with pytest.raises(Exception, match="wsam_gamma=0.5 does nothing with method='gsam'"):
        instantiate(compose_train(["method=gsam", "method.wsam_gamma=0.5"], tmp_path).method)


def test_the_adaptive_policy_trains_from_the_cli(tmp_path):
    """The app's mixin hands the policy the run's optimizer steps (it needs them for its threshold) and logs the
    fraction of full steps."""
    metrics = train(compose_train([*FAST, "task=mr", "method=sam", "method.policy=adaptive"], tmp_path))
    assert "test/acc" in metrics
    assert 0 < metrics["sam/full_fraction"] <= 1


def test_wandb_offline_run_holds_the_sharpness_values(tmp_path, monkeypatch):
    """The values read back from the offline run file mean what their names say: one row of sharpness metrics per
    optimizer step, the probe's every 2 steps, and histograms of lambda and l_i(w+eps) - l_i(w) that agree with the
    metrics logged at the same step."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = ["model=small", "debug=fast", "logger=wandb", "method.rho_schedule=constant"]
    cfg = compose_train([*overrides, "method.histogram_every_n_steps=2"], tmp_path)
    train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    deadline = time.monotonic() + 60
    while True:  # wandb.finish() can return before its writer has flushed the run file
        rows, finished, summary = wandb_history(next(runs[0].glob("run-*.wandb")))
        if finished or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert finished, "the offline run file never received its exit record"
    # the same history, read without W&B: every value W&B holds is in history/metrics.csv at the same step
    with open(tmp_path / "history" / "metrics.csv") as handle:
        local = {(int(row["step"]), k): float(v) for row in csv.DictReader(handle) for k, v in row.items() if v}
    logged = {
        (row["trainer/global_step"], k): v
        for row in rows
        for k, v in row.items()
        if isinstance(v, (int, float)) and not k.startswith(("_", "trainer/"))
    }
    assert len(logged) > 50 and {k for _, k in logged} >= {"train/loss", "sam/sharpness", "val/acc", "probe/cos_sam"}
    assert {key: local.get(key) for key in logged} == pytest.approx(logged, rel=1e-12)
    # the final table's values are the run summary, the test metrics and the sharpness means included
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for key in ("test/acc", "sam/sharpness_mean", "time/fit_s", "val/acc"):
        assert summary[key] == pytest.approx(metrics[key], rel=1e-6), key
    method, n, steps_run = instantiate(cfg.method), cfg.data.batch_size, cfg.trainer.max_steps
    assert (method.method, method.estimator, method.accumulate_grad_batches) == ("deltasam", "head", 1)
    steps = {row["trainer/global_step"]: row for row in rows if "sam/sharpness" in row}
    assert sorted(steps) == list(range(steps_run))
    for row in steps.values():
        assert row["sam/rho"] == pytest.approx(method.rho, rel=1e-6)
        assert row["sam/eps_norm"] == pytest.approx(method.rho, rel=1e-5)  # fp32 weights: eps moves them in full
        assert math.isfinite(row["sam/sharpness"])
        assert row["sam/sharpness"] == pytest.approx(row["sam/perturbed_loss"] - row["train/loss"], abs=1e-5)
        assert 0 < row["sam/grad_norm"] < math.inf and 0 < row["sam/update_norm"] < math.inf
        # the head scores vary: max n·lambda is above 1 and within the clip; sum lambda² <= max lambda bounds ess
        assert 1 < row["sam/max_weight"] <= method.weight_max
        assert n / row["sam/max_weight"] * (1 - 1e-5) <= row["sam/ess"] < n
        assert row["sam/steps_skipped"] == 0 and row["sam/perturbation_skipped"] == 0
    probes = [row for row in rows if "probe/cos_sam" in row]
    assert len(probes) == steps_run // cfg.callbacks.sharpness_probe.every_n_steps
    for row in probes:
        assert -1 <= row["probe/cos_sam"] <= 1 and -1 <= row["probe/cos_deltasam"] <= 1
        assert math.isfinite(row["probe/hessian_top_eig"])
    histograms = [row for row in rows if "sam/lambda/values" in row]
    assert len(histograms) == steps_run // method.histogram_every_n_steps
    for row in histograms:
        step = steps[row["trainer/global_step"]]  # the batch the histograms describe, on self.log's step axis
        for name in ("sam/lambda", "sam/loss_change"):
            assert row[f"{name}/_type"] == "histogram" and sum(row[f"{name}/values"]) == n
        lam = row["sam/lambda/bins"]
        assert lam[0] > 0 and n * lam[-1] == pytest.approx(step["sam/max_weight"], rel=1e-5)
        for name, mean in (("sam/lambda", 1 / n), ("sam/loss_change", step["sam/sharpness"])):
            bins, counts = torch.tensor(row[f"{name}/bins"]), torch.tensor(row[f"{name}/values"])
            centers = (bins[1:] + bins[:-1]) / 2
            assert ((counts * centers).sum() / n).item() == pytest.approx(mean, abs=(bins[1] - bins[0]).item() / 2)


def test_glue_through_hf_datasets_saved_locally(tmp_path):
    rows = {
        "sentence1": ["a cat sat on the mat", "stocks fell sharply", "he plays guitar", "the sun is hot"] * 4,
        "sentence2": ["a cat is on a mat", "markets dropped", "she sings", "it is cold"] * 4,
        "label": [1, 1, 0, 0] * 4,
        "idx": list(range(16)),
    }
    splits = {name: datasets.Dataset.from_dict(rows) for name in ("train", "validation", "test")}
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "mrpc")
    cfg = compose_train([*FAST, "task=glue", "task.name=glue/mrpc", f"task.data_dir={tmp_path / 'mrpc'}"], tmp_path)
    metrics = train(cfg)
    assert {"test/acc", "test/f1"} <= set(metrics)


def run_cli(*args, cwd=ROOT, env=None):
    """``python train.py <args>`` in a subprocess (W&B disabled unless ``env`` says otherwise)."""
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    command = [sys.executable, str(ROOT / "train.py"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def test_a_misspelled_key_is_refused_naming_the_key_it_resembles(capsys):
    """The check train.py runs before Hydra, in process, for both typed groups the command line below tries."""
    from lit_deltasam.app import console

    for override, message in BAD_KEYS:
        with pytest.raises(SystemExit) as stopped:
            console.check_override_keys([*FAST, override], schema.TYPED_GROUPS)
        assert stopped.value.code == 1 and message in capsys.readouterr().err


def test_a_config_option_that_does_not_exist_is_refused_in_process(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="Could not find 'method/sharp'"):
        compose_train(["method=sharp"], tmp_path)


BAD_KEYS = [
    ("method.rhoo=0.1", "method has no key 'rhoo'. Did you mean method.rho? Valid keys of method: "),
    ("data.batchsize=8", "Did you mean data.batch_size? Valid keys of data: batch_size, eval_batch_size"),
]


# each a train.py process; the slow ones' messages are also checked in process (the misspelled keys above, the
# estimator in test_validation.py, the task in test_data.py), and a ValueError's way out of train.py by the tests of
# a bad method value and a data error
@pytest.mark.parametrize(
    "override,message",
    [
        BAD_KEYS[0],
        pytest.param(*BAD_KEYS[1], marks=pytest.mark.slow),
        ("method.rho=big", "Value 'big' of type 'str' could not be converted to Float"),
        pytest.param("method=sharp", "Could not find 'method/sharp'", marks=pytest.mark.slow),
        pytest.param(
            "method.estimator=oracle",
            "estimator='oracle' is not valid; choose one of ['head', 'probe', 'curvature', 'exact']",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "task.name=sst",
            "unknown task 'sst'; valid tasks: mr, r8, tweets, mr_rating, glue/sst2",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_bad_override_stops_with_a_clear_error(override, message, tmp_path):
    result = run_cli(*FAST, override, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_multirun_sweep_writes_a_comparison_table(tmp_path):
    result = run_cli(
        "-m", *SWEEP, "experiment=comparison", "method=erm,deltasam", "seed=1,2", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("*/metrics.json"))) == 4
    table = (tmp_path / "comparison.md").read_text()
    assert "| erm | 2 |" in table and "| deltasam | 2 |" in table


def test_an_lr_sweep_chooses_the_lr_whose_run_scores_best_on_validation(tmp_path):
    result = run_cli("-m", *SWEEP, "experiment=lr_sweep", "optim.lr=1e-3,1e-5", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert sorted(r["config"]["optim"]["lr"] for r in runs) == [1e-5, 1e-3]
    best = max(runs, key=lambda r: r["metrics"]["val/acc"])
    lr = best["config"]["optim"]["lr"]
    table = (tmp_path / "comparison.md").read_text()
    assert "| 0.001 | 1 |" in table and "| 1e-05 | 1 |" in table
    assert table.rstrip().endswith(f"optim.lr={lr}")
    folder = next(p.parent for p in tmp_path.glob("*/metrics.json") if json.loads(p.read_text()) == best)
    assert f"run with optim.lr={lr}:\n{folder}\n" in result.stdout


def _run(lr, seed, value, monitor="val/loss", mode="min"):
    return {
        "choices": {"method": "erm"},
        "config": {"optim": {"lr": lr}, "seed": seed, "task": {"monitor": monitor, "mode": mode}},
        "metrics": {monitor: value},
    }


def test_the_choice_on_validation_takes_each_lrs_mean_over_seeds_in_the_monitors_direction():
    from lit_deltasam.app.report import chosen_on_validation, comparison_markdown

    # 1e-4 has the single best run (0.1) but the worse mean ((0.1 + 0.9) / 2 = 0.5 against 0.4)
    runs = [_run(1e-4, 1, 0.1), _run(1e-4, 2, 0.9), _run(2e-4, 1, 0.35), _run(2e-4, 2, 0.45)]
    assert chosen_on_validation(runs, "optim.lr") == ("0.0002", "val/loss", pytest.approx(0.4))
    maximised = [_run(r["config"]["optim"]["lr"], 1, r["metrics"]["val/loss"], "val/acc", "max") for r in runs]
    assert chosen_on_validation(maximised, "optim.lr")[0] == "0.0001"
    assert "| method | 4 |" not in comparison_markdown(runs, group_by="optim.lr")
    assert "| erm | 4 |" in comparison_markdown(runs, group_by="method")
    with pytest.raises(ValueError, match="group_by='optim.learning_rate' is neither a config group \\(method\\)"):
        comparison_markdown(runs, group_by="optim.learning_rate")
    with pytest.raises(ValueError, match="monitor different metrics"):
        chosen_on_validation([runs[0], maximised[1]], "optim.lr")


def test_optuna_sweep_over_rho_and_beta(tmp_path):
    result = run_cli("-m", *SWEEP, "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert {"method.rho", "method.beta"} == set(best["best_params"])
    assert len(list(tmp_path.glob("*/metrics.json"))) == 2
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.glob("*/checkpoints"))  # tested, then deleted
    assert "best checkpoint" not in result.stdout


def test_multirun_jobs_have_distinct_wandb_names(tmp_path):
    """Optuna trials and multirun jobs: the W&B name ends in the job's number; a single run keeps run_name."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict, read_write

    cfg = compose_train(["logger=wandb"], tmp_path)
    assert instantiate(cfg.logger.wandb)._wandb_init["name"] == cfg.run_name == "mr-minilm-deltasam-s0"
    names = set()
    for job in (0, 1):
        with read_write(HydraConfig.get()), open_dict(HydraConfig.get()):
            HydraConfig.get().mode, HydraConfig.get().job.num = RunMode.MULTIRUN, job
        names.add(instantiate(cfg.logger.wandb)._wandb_init["name"])
    assert names == {"mr-minilm-deltasam-s0-job0", "mr-minilm-deltasam-s0-job1"}


def test_a_bad_method_value_stops_before_the_model_loads(tmp_path):
    run = run_cli("method.rho=-1", "logger=none", cwd=tmp_path, env={"HYDRA_FULL_ERROR": "0"})
    assert run.returncode == 1
    first, *rest = run.stderr.strip().splitlines()
    assert first == "Error: DeltaSAMConfig.rho=-1.0 is not valid; it must be a finite number >= 0.0"
    assert rest == ["", "Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace."]
    assert "Seed set" not in run.stdout + run.stderr  # stopped before the seed, the LR test and the model


def test_the_final_table_reads_small_values_and_leaves_out_what_the_method_lacks():
    from rich.console import Console

    from lit_deltasam.app.report import cell, print_table, shown

    assert [cell(v) for v in (6.25e-06, 0.0, 0.8398, 26.5344, 0.004543, 123456.0)] == [
        "6.25e-06",
        "0.0000",
        "0.8398",
        "26.5344",
        "0.004543",
        "1.235e+05",
    ]
    metrics = {"lr-AdamW/pg1": 6.25e-06, "sam/update_norm": 0.9, "sam/steps_skipped": 0.0, "val/acc": 0.84}
    assert set(shown(metrics, "erm")) == {"lr-AdamW/pg1", "sam/steps_skipped", "val/acc"}
    assert shown(metrics, "sam") == metrics
    screen = Console(record=True, width=80)
    print_table("run", metrics, console=screen)
    assert re.search(r"│ lr-AdamW/pg1 +│ 6\.25e-06 │", screen.export_text())


def test_wandb_sweep_yaml_drives_train_through_hydra_overrides(tmp_path):
    sweep = yaml.safe_load((ROOT / "sweeps" / "wandb_deltasam.yaml").read_text())
    assert sweep["program"] == "train.py"
    assert "${args_no_hyphens}" in sweep["command"]
    point = {name: spec["values"][0] for name, spec in sweep["parameters"].items()}
    args = [f"{name}={value}" for name, value in point.items()]  # what wandb agent passes as ${args_no_hyphens}
    result = run_cli("model=small", "debug=fast", *args, f"hydra.run.dir={tmp_path}", env={"WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "metrics.json").read_text())["config"]
    assert config["method"]["rho"] == point["method.rho"]


@pytest.mark.parametrize(
    "batches,epochs,max_steps,accumulate,expected",
    [(10, 3, -1, 1, 30), (10, 3, -1, 4, 9), (10, 3, 5, 4, 5), (10, -1, 7, 2, 7), (10, 2, 100, 3, 8)],
)
def test_the_lr_schedule_spans_the_run_in_optimizer_steps(batches, epochs, max_steps, accumulate, expected):
    from types import SimpleNamespace

    from lit_deltasam.lightning import optimizer_steps

    fake = SimpleNamespace(
        estimated_stepping_batches=0,
        num_training_batches=batches,
        max_epochs=epochs,
        max_steps=max_steps,
        fit_loop=SimpleNamespace(_combined_loader=object()),  # the loader already set up
    )
    assert optimizer_steps(fake, accumulate) == expected


def test_the_cluster_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=cluster"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.timeout_min == 240


def test_the_first_screen_holds_no_third_party_noise(tmp_path):
    """A default run (MiniLM, W&B offline) prints none of the notices quiet() silences, and still trains."""
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    run = run_cli("debug=fast", "trainer.max_steps=1", "test=false", cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    screen = run.stdout + run.stderr
    for noise in ("LOAD REPORT", "Tip: For seamless", "was configured so", "set_vital", "LeafSpec", "anonymous"):
        assert noise not in screen, noise
    assert "train/loss" in screen


def test_a_load_report_naming_more_than_the_new_head_stays():
    import logging

    from lit_deltasam.app.console import _DropNewHeadReport

    def record(rows):
        table = "Key | Status | \n---+---+-\n" + "\n".join(f"{k} | {s} | " for k, s in rows)
        message = f"X LOAD REPORT\n{table}"
        return logging.LogRecord("transformers.modeling_utils", logging.WARNING, "", 0, message, (), None)

    keep = _DropNewHeadReport().filter
    assert not keep(record([("classifier.weight", "MISSING"), ("classifier.bias", "MISSING")]))
    assert keep(record([("classifier.weight", "MISSING"), ("bert.encoder.layer.0.output.dense.weight", "MISSING")]))
    assert keep(record([("classifier.weight", "UNEXPECTED")]))
    assert keep(logging.LogRecord("t", logging.WARNING, "", 0, "another warning", (), None))


def test_the_small_models_vocabulary_is_fit_once_per_training_set(tmp_path, monkeypatch):
    """HF's WordPiece trainer breaks frequency ties differently per process; the cached fit makes runs repeat."""
    from lit_deltasam.models import builders

    texts = [f"word{i % 97} token{i % 13} thing{i * 7 % 31} alpha beta gamma" for i in range(500)]
    first = builders.Small(vocab_size=150, cache_dir=str(tmp_path)).tokenizer(lambda: iter(texts))
    (cached,) = (tmp_path / "wordpiece").glob("*.json")

    def no_fit(*args):
        raise AssertionError("fit again")

    monkeypatch.setattr(builders, "fit_wordpiece", no_fit)
    again = builders.Small(vocab_size=150, cache_dir=str(tmp_path)).tokenizer(lambda: iter(texts))
    assert again.get_vocab() == first.get_vocab()
    assert again("word12 token3 alphabet")["input_ids"] == first("word12 token3 alphabet")["input_ids"]
    with pytest.raises(AssertionError, match="fit again"):  # another training set, or another size, is fit anew
        builders.Small(vocab_size=150, cache_dir=str(tmp_path)).tokenizer(lambda: iter(texts[:-1]))
    with pytest.raises(AssertionError, match="fit again"):
        builders.Small(vocab_size=149, cache_dir=str(tmp_path)).tokenizer(lambda: iter(texts))
    assert cached.exists()


def test_wandb_mode_disabled_holds_for_every_job_of_a_multirun(monkeypatch, tmp_path):
    """The config's offline=True made Lightning set WANDB_MODE=dryrun at the first job, so the second job of a
    multirun wrote an offline run although the user disabled W&B (found by an independent review)."""
    import wandb

    from lit_deltasam.app.console import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    for job in range(2):
        logger = wandb_logger(offline=True, project="p", save_dir=str(tmp_path / str(job)))
        assert type(logger.experiment).__name__ == "NoopRun"
        wandb.finish()  # the job's end, as the app's teardown does
    assert not list(tmp_path.rglob("offline-run-*"))
