"""The Hydra application: configs compose, every task and method runs, loggers and sweeps work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lit_deltasam import DeltaSAMConfig
from lit_deltasam.app import schema

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["model", "task", "method", "trainer", "logger", "callbacks", "experiment", "hparams_search", "debug"]
FAST = ["model=small", "debug=fast", "logger=none"]

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


def test_method_configs_take_their_defaults_from_the_dataclass(tmp_path):
    cfg = compose_train(["method=deltasam"], tmp_path)
    assert instantiate(cfg.method) == DeltaSAMConfig(method="deltasam", estimator="head")


METHODS = options("method")


@pytest.mark.parametrize("task", ["mr", "r8", "tweets", "mr_rating"])
def test_each_task_with_the_small_model_and_each_method(task, tmp_path):
    for method in METHODS:
        out = tmp_path / method
        out.mkdir()
        metrics = train(compose_train([*FAST, f"task={task}", f"method={method}"], out))
        monitor = "test/pearson" if task == "mr_rating" else "test/acc"
        assert monitor in metrics, (method, sorted(metrics))
        assert (out / "metrics.json").exists()
        assert list((out / "checkpoints").glob("*.ckpt"))


def test_wandb_offline_run_holds_the_sharpness_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(compose_train(["model=small", "debug=fast", "logger=wandb"], tmp_path))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = next(runs[0].glob("run-*.wandb")).read_bytes()  # the run's protobuf record log
    keys = ["sam/sharpness", "sam/ess", "sam/max_weight", "sam/eps_norm", "sam/grad_norm", "sam/perturbed_loss"]
    keys += ["probe/cos_sam", "probe/cos_deltasam", "probe/hessian_top_eig", "sam/lambda", "sam/loss_change"]
    for key in keys:
        assert key.encode() in records, key


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
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    "override,message",
    [
        ("method.rhoo=0.1", "Key 'rhoo' not in 'MethodSchema'"),
        ("method.rho=big", "Value 'big' of type 'str' could not be converted to Float"),
        ("method=sharp", "Could not find 'method/sharp'"),
        (
            "method.estimator=oracle",
            "estimator='oracle' is not valid; choose one of ['head', 'probe', 'curvature', 'exact']",
        ),
        ("task.name=sst", "unknown task 'sst'; valid tasks: mr, r8, tweets, mr_rating, glue/sst2"),
    ],
)
def test_a_bad_override_stops_with_a_clear_error(override, message, tmp_path):
    result = run_cli(*FAST, override, f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert message in result.stderr + result.stdout


def test_multirun_sweep_writes_a_comparison_table(tmp_path):
    result = run_cli(
        "-m", *FAST, "experiment=comparison", "method=erm,deltasam", "seed=1,2", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(tmp_path.glob("*/metrics.json"))) == 4
    table = (tmp_path / "comparison.md").read_text()
    assert "| erm | 2 |" in table and "| deltasam | 2 |" in table


def test_optuna_sweep_over_rho_and_beta(tmp_path):
    result = run_cli("-m", *FAST, "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert {"method.rho", "method.beta"} == set(best["best_params"])


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
        estimated_stepping_batches=0, num_training_batches=batches, max_epochs=epochs, max_steps=max_steps
    )
    assert optimizer_steps(fake, accumulate) == expected


def test_the_cluster_launcher_config_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=cluster"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.timeout_min == 240
