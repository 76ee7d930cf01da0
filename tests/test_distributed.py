"""DDP semantics with 2 CPU processes on gloo: local and global ascent, synced descent, checkpoints, resume."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import METHODS, MLP

from lit_deltasam import DeltaSAM, DeltaSAMConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def run_script(script: str, out: Path, cwd: Path, timeout: int, **args) -> subprocess.CompletedProcess:
    """Run a 2-process worker script with ``args`` (JSON), writing under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(HERE / script), json.dumps({"out": str(out), **args})],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ranks_of(result: subprocess.CompletedProcess, out: Path) -> list[dict]:
    """Each rank's records, once the worker has succeeded."""
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def run_worker(out: Path, **args) -> subprocess.CompletedProcess:
    """Run ddp_worker.py (2 processes, Lightning) with ``args``."""
    return run_script("ddp_worker.py", out, out, 600, **args)


def run_ddp(out: Path, **args) -> list[dict]:
    """Run ddp_worker.py with 2 processes; return each rank's records."""
    return ranks_of(run_worker(out, **args), out)


class Jobs:
    """Jobs (a worker script's arguments by name) run one after another in one launch of the script's 2 processes,
    so that they start once, not once per test; each job seeds itself and writes under ``folder / name`` what a
    launch of its own writes, bit for bit."""

    def __init__(self, script: str, jobs: dict[str, dict], folder: Path, cwd: Path, timeout: int) -> None:
        for name in jobs:
            (folder / name).mkdir()
        listed = [{**args, "out": str(folder / name)} for name, args in jobs.items()]
        self.folder, self.result = folder, run_script(script, folder, cwd, timeout, jobs=listed)

    def __call__(self, name: str) -> list[dict]:
        """Each rank's records of job ``name``."""
        return ranks_of(self.result, self.folder / name)


JOBS: dict[str, dict] = {}
"""ddp_worker.py's arguments of the fits that succeed, by name; ``ddp_runs`` runs them all in one launch."""


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Jobs:
    """``ddp_runs(name)``: each rank's records of JOBS[name], every job fit in the same 2 processes."""
    folder = tmp_path_factory.mktemp("ddp_jobs")
    return Jobs("ddp_worker.py", JOBS, folder, folder, 600)


def method_id(config: dict) -> str:
    return "-".join(str(v) for v in config.values())


def reference_eps(config: DeltaSAMConfig, w: torch.Tensor, batch) -> torch.Tensor:
    """eps of a single-process step from weights ``w`` on ``batch``."""
    model = MLP()
    torch.nn.utils.vector_to_parameters(w, model.parameters())
    seen = []

    def losses(b):
        seen.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
        return model.losses(b)

    DeltaSAM(model, config).step(losses, batch)
    return seen[-1] - seen[0]


CONFIGS = {
    "sam": dict(method="sam", rho=0.5),
    "deltasam": dict(method="deltasam", rho=0.5, estimator="exact", beta=-1.0),
}


LOCAL_CONFIGS = {**CONFIGS, "m-sam": dict(method="sam", rho=0.5, m_sharpness=3)}
JOBS.update({f"local-{name}": dict(config={**c, "ascent": "local"}, steps=2) for name, c in LOCAL_CONFIGS.items()})
JOBS.update({f"global-{name}": dict(config={**c, "ascent": "global"}, steps=2) for name, c in CONFIGS.items()})


@pytest.mark.parametrize("name", sorted(LOCAL_CONFIGS))
def test_local_ascent_perturbs_each_rank_with_its_own_sub_batch(name, ddp_runs):
    """m-sharpness subdivides each rank's sub-batch; eps is that of its last group."""
    config = DeltaSAMConfig(ascent="local", **LOCAL_CONFIGS[name])
    ranks = ddp_runs(f"local-{name}")
    for step in range(2):
        a, b = (r["records"][step] for r in ranks)
        assert torch.equal(a["w"], b["w"])
        assert not torch.allclose(a["eps"], b["eps"])
        for record in (a, b):
            expected = reference_eps(config, record["w"], (record["x"], record["y"]))
            torch.testing.assert_close(record["eps"], expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_global_ascent_perturbs_every_rank_with_the_full_batch(name, ddp_runs):
    config = DeltaSAMConfig(ascent="global", **CONFIGS[name])
    ranks = ddp_runs(f"global-{name}")
    for step in range(2):
        a, b = (r["records"][step] for r in ranks)
        torch.testing.assert_close(a["eps"], b["eps"], atol=1e-7, rtol=0)
        full = (torch.cat([a["x"], b["x"]]), torch.cat([a["y"], b["y"]]))
        torch.testing.assert_close(a["eps"], reference_eps(config, a["w"], full), atol=1e-6, rtol=1e-5)


DDP_METHODS = [
    *METHODS,
    dict(method="deltasam", estimator="exact", ascent="global"),
    dict(method="deltasam", accumulate_grad_batches=2),
    dict(method="sam", interval=2, reuse="looksam"),
    dict(method="deltasam", interval=3, reuse="looksam", accumulate_grad_batches=2),
    dict(method="deltasam", m_sharpness=3, accumulate_grad_batches=2),
]
JOBS.update(
    {
        f"identical-{method_id(c)}": dict(config=c, steps=4, dropout=0.1, optimizer="adamw", lr=0.01, shuffle=True)
        for c in DDP_METHODS
    }
)


@pytest.mark.parametrize("config", DDP_METHODS, ids=method_id)
def test_parameters_are_identical_across_ranks_after_every_step(config, ddp_runs):
    ranks = ddp_runs(f"identical-{method_id(config)}")
    for a, b in zip(ranks[0]["records"], ranks[1]["records"]):
        assert torch.equal(a["w"], b["w"])
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert not torch.equal(ranks[0]["records"][0]["w"], ranks[0]["params"])


JOBS["non-finite"] = dict(config=dict(method="deltasam"), steps=3, poison={"rank": 1, "batch": 1})


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(ddp_runs):
    ranks = ddp_runs("non-finite")
    for r in ranks:
        records = r["records"]
        assert torch.equal(records[1]["w"], records[2]["w"])  # batch 1 took no step
        assert not torch.equal(records[0]["w"], records[1]["w"])
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


CHECKPOINTED = dict(
    config=dict(method="deltasam", estimator="probe", accumulate_grad_batches=2),
    dropout=0.1,
    optimizer="adamw",
    lr=0.01,
    shuffle=True,
    n=128,
    steps=10,
)
MID_WINDOW = dict(
    config=dict(method="sam", accumulate_grad_batches=4),
    dropout=0.1,
    optimizer="adamw",
    lr=0.01,
    shuffle=True,
    n=128,
    steps=6,
)
JOBS["checkpointed"] = dict(checkpoint_every=3, **CHECKPOINTED)
JOBS["mid-window"] = dict(save_at_batch=5, **MID_WINDOW)


@pytest.fixture(scope="module")
def ddp_resumed(ddp_runs, tmp_path_factory) -> Jobs:
    """The fits of ``checkpointed`` and ``mid-window`` resumed from what they saved in ``ddp_runs`` (the first of
    three checkpoints; mid-window), in a launch of fresh processes."""
    resumed = {
        "checkpointed": dict(
            resume=str(ddp_runs.folder / "checkpointed" / "checkpoints" / "step=3.ckpt"), **CHECKPOINTED
        ),
        "mid-window": dict(resume=str(ddp_runs.folder / "mid-window" / "mid.ckpt"), **MID_WINDOW),
    }
    folder = tmp_path_factory.mktemp("ddp_resumed")
    return Jobs("ddp_worker.py", resumed, folder, folder, 600)


def test_one_checkpoint_and_exact_resume_under_ddp(ddp_runs, ddp_resumed):
    full = ddp_runs("checkpointed")
    saved = sorted((ddp_runs.folder / "checkpointed" / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in saved] == ["step=3.ckpt", "step=6.ckpt", "step=9.ckpt"]
    resumed = ddp_resumed("checkpointed")  # from saved[0]
    for r in range(2):
        assert torch.equal(resumed[r]["params"], full[r]["params"])


def test_train_py_under_ddp_writes_one_run(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    args = ["model=small", "debug=fast", "trainer=ddp_cpu", "trainer.devices=2", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    saved = sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(saved) == 2 and "last.ckpt" in saved, saved
    assert len(list(tmp_path.glob("metrics.json"))) == 1
    assert len(list(tmp_path.parent.glob(f"{tmp_path.name}*"))) == 1
    assert result.stdout.count("test/acc") == 1


def test_tune_lr_under_ddp_chooses_one_lr_for_the_run(tmp_path):
    """The range test runs on both ranks (Lightning broadcasts its curve) and the run trains at its suggestion."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    args = ["model=small", "debug=fast", "logger=none", "trainer=ddp_cpu", "tune_lr=true", "lr_find.num_training=15"]
    args.append(f"hydra.run.dir={tmp_path}")
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    curve = json.loads((tmp_path / "lr_find.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["metrics"]["tune_lr/lr"] == curve["suggestion"] and len(curve["lr"]) == 15
    assert metrics["config"]["optim"]["lr"] == curve["suggestion"]


EQUIVALENT = [
    ("ddp", dict(method="sam")),
    ("ddp", dict(method="deltasam", estimator="exact", weighted_descent=True)),
    ("fsdp2", dict(method="sam")),
    ("fsdp2", dict(method="asam")),
    ("fsdp2", dict(method="deltasam", estimator="head", beta=-1.0, weighted_descent=True)),
]
JOBS.update(
    {
        f"equivalent-{strategy}-{method_id(c)}": dict(
            config={**c, "rho": 0.5, "ascent": "global"}, steps=3, strategy=strategy, lr=0.5
        )
        for strategy, c in EQUIVALENT
    }
)


@pytest.mark.parametrize("strategy,config", EQUIVALENT, ids=lambda v: v if isinstance(v, str) else method_id(v))
def test_a_global_ascent_step_equals_the_full_batch_step(strategy, config, ddp_runs):
    """Under DDP, and with sharded parameters (FSDP2: norms summed over shards, perturbation and restore per
    shard), a step with a global ascent is the single-process step on the concatenated batch."""
    ranks = ddp_runs(f"equivalent-{strategy}-{method_id(config)}")
    config = {**config, "rho": 0.5, "ascent": "global"}
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    model = MLP()
    torch.nn.utils.vector_to_parameters(ranks[0]["records"][0]["w"], model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for a, b in zip(ranks[0]["records"], ranks[1]["records"]):
        full = (torch.cat([a["x"], b["x"]]), torch.cat([a["y"], b["y"]]))
        torch.testing.assert_close(torch.nn.utils.parameters_to_vector(model.parameters()), a["w"], atol=1e-6, rtol=0)
        optimizer.zero_grad()
        result = DeltaSAM(model, DeltaSAMConfig(**config)).step(model.losses, full)
        optimizer.step()
        assert a["ess"].item() == pytest.approx(result.effective_sample_size.item()) == b["ess"].item()
    torch.testing.assert_close(
        torch.nn.utils.parameters_to_vector(model.parameters()), ranks[0]["params"], atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(
    "config",
    [
        dict(method="gsam", gsam_alpha=0.4),
        dict(method="wsam", wsam_gamma=0.8),
        dict(method="fsam", fsam_sigma=1.0),
        dict(method="sam", gradient_centralization=True),
        dict(method="gsam", beta=-0.5),
        dict(method="fsam", beta=-0.5),
        dict(method="fsam", policy="adaptive", policy_c_start=3.0, policy_c_end=3.0),
    ],
    ids=lambda c: (
        ("δ-" if "beta" in c else "")
        + c["method"]
        + ("-gc" if "gradient_centralization" in c else "")
        + ("-policy" if "policy" in c else "")
    ),
)
def test_the_sam_family_under_ddp_equals_one_process_on_the_global_batch(config, tmp_path):
    """GSAM's decomposition, WSAM's term after the base step and Friendly-SAM's running mean act on the averaged
    gradients (family-spec.md, deliberate difference (2) of GSAM): with a global ascent, 2 ranks step as one process
    does with DeltaSAMOptimizer on the concatenated batches, step after step (F-SAM's running mean carried)."""
    from lit_deltasam import DeltaSAMOptimizer

    config = {**config, "rho": 0.5, "ascent": "global", "rho_schedule": "constant"}
    ranks = run_ddp(tmp_path, config=config, steps=4, lr=0.5)
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    model = MLP()
    torch.nn.utils.vector_to_parameters(ranks[0]["records"][0]["w"], model.parameters())
    steps = dict(total_steps=4) if "policy" in config else {}
    single = DeltaSAMOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.5), DeltaSAMConfig(**config), **steps)
    for a, b in zip(ranks[0]["records"], ranks[1]["records"]):
        torch.testing.assert_close(torch.nn.utils.parameters_to_vector(model.parameters()), a["w"], atol=1e-6, rtol=0)
        single.step(model.losses, (torch.cat([a["x"], b["x"]]), torch.cat([a["y"], b["y"]])))
    torch.testing.assert_close(
        torch.nn.utils.parameters_to_vector(model.parameters()), ranks[0]["params"], atol=1e-6, rtol=0
    )
    if config["method"] == "fsam":
        assert single.loop_state.fsam_momentum is not None
    if "policy" in config:  # the same decisions on both ranks as in one process, plain and full steps both taken
        assert 0 < single.loop_state.policy_full < single.loop_state.policy_decided == 4


def test_the_adaptive_policy_with_a_local_ascent_is_refused_under_ddp(tmp_path):
    """Each rank would decide from its own ||g||² and could take the other branch: refused by name, before a step,
    naming the global ascent that decides once for all ranks."""
    result = run_worker(tmp_path, config=dict(method="sam", policy="adaptive"), steps=1)
    assert result.returncode != 0
    assert "DeltaSAMConfig.policy='adaptive' with ascent='local' decides from each rank's own" in result.stderr
    assert "set ascent='global'" in result.stderr


def test_resume_inside_an_accumulation_window_under_ddp(ddp_runs, ddp_resumed):
    """The window's partial gradients, not yet all-reduced, are saved summed over ranks: exact up to the order of
    the additions."""
    full = ddp_runs("mid-window")  # saved mid.ckpt after its batch 5
    resumed = ddp_resumed("mid-window")
    for r in range(2):
        torch.testing.assert_close(resumed[r]["params"], full[r]["params"], atol=1e-6, rtol=0)
    assert torch.equal(resumed[0]["params"], resumed[1]["params"])


def test_ranks_share_rank_zeros_step_seed_without_seed_everything(tmp_path):
    """Per-step seeds derive from rank 0's base seed on every rank, so a checkpoint (rank 0's) resumes all ranks."""
    ranks = run_ddp(tmp_path, config={"method": "sam"}, steps=1, seed=None)
    assert ranks[0]["base_seed"] is not None
    assert ranks[0]["base_seed"] == ranks[1]["base_seed"]


def failing_fsdp_run(out: Path, **args) -> str:
    """Run ddp_worker.py with FSDP2 on 2 processes, expecting it to fail; return its stderr."""
    result = run_worker(out, strategy="fsdp2", **args)
    assert result.returncode != 0
    return result.stderr


def test_what_cannot_run_on_sharded_parameters_is_refused_naming_what_can():
    """The check the engine runs on FSDP's sharded parameters, in process; the tests below reach it through FSDP2 on
    2 processes (two of them marked slow)."""
    from lit_deltasam.core.engine import _refuse_sharded

    refused = [
        (dict(method="sam", ascent="local"), "ascent='local' is not available with sharded parameters (FSDP)"),
        (dict(method="per_instance", ascent="global"), "method='per_instance' is not available under FSDP"),
        (dict(method="deltasam", estimator="probe", ascent="global"), "estimator='probe' is not available under FSDP"),
        (dict(method="deltasam", estimator="exact", ascent="global"), "estimator='exact' is not available under FSDP"),
        (dict(method="sam", ascent="global", interval=2, reuse="looksam"), "reuse='looksam' is not available under"),
    ]
    for options, message in refused:
        with pytest.raises((ValueError, NotImplementedError), match=re.escape(message)):
            _refuse_sharded(DeltaSAMConfig(**options))
    for options in (dict(method="sam"), dict(method="asam"), dict(method="deltasam", estimator="head")):
        _refuse_sharded(DeltaSAMConfig(ascent="global", **options))


@pytest.mark.slow
def test_fsdp_rejects_a_local_ascent(tmp_path):
    stderr = failing_fsdp_run(tmp_path, config={"method": "sam", "ascent": "local"}, steps=1)
    assert "ascent='local' is not available with sharded parameters (FSDP)" in stderr


def test_fsdp_refuses_estimators_that_need_whole_parameters(tmp_path):
    config = {"method": "deltasam", "estimator": "probe", "ascent": "global"}
    stderr = failing_fsdp_run(tmp_path, config=config, steps=1)
    assert "estimator='probe' is not available under FSDP" in stderr
    assert "choose one of ['head']" in stderr


@pytest.mark.slow
def test_fsdp_refuses_looksam(tmp_path):
    config = {"method": "sam", "ascent": "global", "interval": 2, "reuse": "looksam"}
    stderr = failing_fsdp_run(tmp_path, config=config, steps=1)
    assert "reuse='looksam' is not available under FSDP: its stored direction is a shard per rank" in stderr


def test_fsdp_refuses_a_checkpoint_inside_an_accumulation_window(tmp_path):
    config = {"method": "sam", "ascent": "global", "accumulate_grad_batches": 2}
    stderr = failing_fsdp_run(tmp_path, config=config, steps=1, save_at_batch=0)
    assert "cannot checkpoint inside a gradient accumulation window under FSDP (micro-batch 1 of 2)" in stderr
    assert not (tmp_path / "mid.ckpt").exists()


def reference_update(config: DeltaSAMConfig, w: torch.Tensor, batch) -> torch.Tensor:
    """G of a single-process step from weights ``w`` on ``batch``."""
    model = MLP()
    torch.nn.utils.vector_to_parameters(w, model.parameters())
    DeltaSAM(model, config).step(model.losses, batch)
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


RAW = {
    "exact": dict(method="deltasam", estimator="exact", beta=-1.0, rho=0.5),
    "per_instance": dict(method="per_instance", rho=0.5),
}
RAW_JOBS = {
    **{f"unequal-{name}": dict(config=c, sizes=[6, 10], lr=0.5) for name, c in RAW.items()},
    **{f"no-sync-{name}": dict(config=c, sizes=[8, 8], lr=0.5, micro=2) for name, c in RAW.items()},
    # refused on both ranks before any collective: the worker writes each rank's error and goes on (``refused``)
    "static-graph": dict(config=dict(method="sam"), sizes=[8, 8], lr=0.1, static_graph=True, refused=True),
}
"""raw_ddp_worker.py's arguments by name; ``raw_ddp_runs`` runs them all in one launch."""


@pytest.fixture(scope="module")
def raw_ddp_runs(tmp_path_factory) -> Jobs:
    """``raw_ddp_runs(name)``: each rank's records of RAW_JOBS[name], every job run in the same 2 processes."""
    return Jobs("raw_ddp_worker.py", RAW_JOBS, tmp_path_factory.mktemp("raw_ddp_jobs"), HERE, 300)


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_ddp_keeps_per_instance_passes_local_and_the_descent_synchronized(name, raw_ddp_runs):
    """Unequal batches per rank; each rank's ascent (and its exact scores) is its own, the descent is averaged."""
    config = DeltaSAMConfig(**RAW[name])
    ranks = raw_ddp_runs(f"unequal-{name}")
    a, b = (r["records"][0] for r in ranks)
    assert torch.equal(a["w"], b["w"])
    updates = [reference_update(config, r["w"], (r["x"], r["y"])) for r in (a, b)]
    torch.testing.assert_close(a["grad"], (updates[0] + updates[1]) / 2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["params"], ranks[1]["params"], atol=0, rtol=0)
    if name == "exact":
        assert not torch.allclose(a["eps"], b["eps"])
        for r in (a, b):
            torch.testing.assert_close(r["eps"], reference_eps(config, r["w"], (r["x"], r["y"])), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(RAW))
def test_raw_ddp_sync_descent_false_leaves_the_micro_batch_local(name, raw_ddp_runs):
    config = DeltaSAMConfig(**RAW[name])
    ranks = raw_ddp_runs(f"no-sync-{name}")
    first = [r["records"][0] for r in ranks]
    for r in first:  # not all-reduced: each rank holds its own micro-batch's G
        torch.testing.assert_close(r["grad"], reference_update(config, r["w"], (r["x"], r["y"])), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(first[0]["grad"], first[1]["grad"])
    last = [r["records"][1] for r in ranks]
    torch.testing.assert_close(last[0]["grad"], last[1]["grad"], atol=1e-6, rtol=0)


def test_raw_ddp_with_a_static_graph_is_refused(raw_ddp_runs):
    assert raw_ddp_runs.result.returncode == 0, raw_ddp_runs.result.stderr[-4000:]
    for rank in range(2):
        error = (raw_ddp_runs.folder / "static-graph" / f"refused{rank}.txt").read_text()
        assert error.startswith("ValueError: DistributedDataParallel(static_graph=True) is not supported"), error
