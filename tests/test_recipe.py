"""The recipe levers (head LR, layer-wise LR decay) against closed forms; old rows keep their optimizer; the suite's
selection rule against brute force."""

import dataclasses
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from helpers import trainer
from torch import nn

from benchmarks import fidelity, recipe, tuning
from benchmarks.lab import runs
from lit_deltasam import DeltaSAMConfig
from lit_deltasam.app import schema
from lit_deltasam.models import TextClassifier
from lit_deltasam.models.classifier import param_groups
from lit_deltasam.models.encoders import SmallEncoder

ROOT = Path(__file__).resolve().parents[1]

VOCAB, LAYERS = 30, 2


def encoder() -> SmallEncoder:
    torch.manual_seed(0)
    return SmallEncoder(VOCAB, 3, dim=8, layers=LAYERS, heads=2, ffn=16, dropout=0.0, max_length=8)


def expected_scale(name: str, head_lr_mult: float, layer_decay: float) -> float:
    """SmallEncoder's layers written out: embeddings at the bottom, then each Transformer layer, then the top
    (the final norm and the classifier, the head)."""
    top = LAYERS + 1
    if name.startswith(("embed.", "position.")):
        depth = 0
    elif name.startswith("encoder.layers."):
        depth = int(name.split(".")[2]) + 1
    else:
        depth = top
    return layer_decay ** (top - depth) * (head_lr_mult if name.startswith("classifier.") else 1.0)


def test_param_groups_scale_each_layer_and_the_head_as_written_out():
    module = encoder()
    groups = param_groups(module, 1e-3, 0.01, head_lr_mult=10.0, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    names = dict(module.named_parameters())
    assert len(lr_of) == len(names)
    for name, p in names.items():
        lr, wd = lr_of[id(p)]
        assert lr == pytest.approx(1e-3 * expected_scale(name, 10.0, 0.5), rel=1e-12), name
        assert wd == (0.01 if p.ndim >= 2 else 0.0), name
    assert {round(g["lr"] / 1e-3, 9) for g in groups} == {0.125, 0.25, 0.5, 1.0, 10.0}


def test_default_levers_give_the_two_groups_of_the_unscaled_recipe():
    module = encoder()
    params = [p for p in module.parameters()]
    groups = param_groups(module, 2e-5, 0.01)
    assert [g["lr"] for g in groups] == [2e-5, 2e-5]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in params if p.ndim >= 2]
    assert [id(p) for p in groups[1]["params"]] == [id(p) for p in params if p.ndim < 2]


def batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (8, 6), generator=g)
    return torch.utils.data.DataLoader(
        [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[:, 0] % 3}], batch_size=None
    )


def test_one_adamw_step_moves_each_parameter_by_its_own_lr():
    """Adam's first step moves every coordinate with a gradient by lr · g/(|g| + eps) ≈ ±lr: the largest move of each
    parameter is its group's LR, the closed form of the levers through TextClassifier, its schedule and Lightning."""
    module = TextClassifier(
        encoder(), DeltaSAMConfig(method="erm"), 3, lr=1e-3, weight_decay=0.0, warmup_ratio=0.0, head_lr_mult=10.0,
        layer_decay=0.5,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in module.encoder.named_parameters()}
    trainer(max_steps=1, limit_val_batches=0).fit(module, batches())
    for name, p in module.encoder.named_parameters():
        moved = (p.detach() - before[name]).abs().max().item()
        assert moved == pytest.approx(1e-3 * expected_scale(name, 10.0, 0.5), rel=1e-3), name


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"head_lr_mult": 0.0}, "optim.head_lr_mult=0.0"),
        ({"layer_decay": 1.5}, "optim.layer_decay=1.5"),
        ({"layer_decay": 0.0}, "optim.layer_decay=0.0"),
        ({"warmup_ratio": 1.0}, "optim.warmup_ratio=1.0"),
        ({"weight_decay": -0.1}, "optim.weight_decay=-0.1"),
        ({"lr": 0.0}, "optim.lr=0.0"),
    ],
)
def test_an_optimizer_setting_out_of_range_is_refused_by_name(kwargs, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        TextClassifier(encoder(), DeltaSAMConfig(method="erm"), 3, **kwargs)


def test_levers_a_model_cannot_take_are_refused_by_name():
    flat = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"optim\.layer_decay=0\.8: no parameter name has a numbered layer"):
        param_groups(flat, 1e-3, 0.0, layer_decay=0.8)
    with pytest.raises(ValueError, match=r"optim\.head_lr_mult=2\.0: the model has no nn\.Linear head"):
        param_groups(nn.Embedding(VOCAB, 4), 1e-3, 0.0, head_lr_mult=2.0)


def test_every_optim_field_of_the_config_reaches_the_module(tmp_path):
    cfg = schema.compose(
        ROOT / "conf", ["optim.head_lr_mult=4", "optim.layer_decay=0.7", "optim.warmup_ratio=0.2"], tmp_path
    )
    assert set(cfg.optim) == {f.name for f in dataclasses.fields(schema.OptimSchema)}
    module = TextClassifier(encoder(), DeltaSAMConfig(method="erm"), 3, **cfg.optim)
    assert (module.hparams.head_lr_mult, module.hparams.layer_decay, module.hparams.warmup_ratio) == (4, 0.7, 0.2)


# --- old rows keep their optimizer ---------------------------------------------------------------------------------

OLD_ROW_OVERRIDES = [
    "data.label_noise=0.2", "data.max_length=32", "data.train_limit=1000", "method=erm", "seed=11", "task=mr",
    "trainer.max_epochs=5",
]  # fmt: skip


def test_legacy_optimizer_is_what_the_committed_rows_ran_at():
    """Facts about rows already written (before they wrote these fields): never to follow the app's defaults."""
    assert runs.LEGACY_OPTIM == {
        "lr": 5e-5, "weight_decay": 0.01, "warmup_ratio": 0.1, "head_lr_mult": 1.0, "layer_decay": 1.0,
    }  # fmt: skip
    assert set(runs.LEGACY_OPTIM) == {f.name for f in dataclasses.fields(schema.OptimSchema)}


def test_a_default_change_does_not_relabel_an_old_row(tmp_path, monkeypatch):
    store = tmp_path / "rows.jsonl"
    erm = runs.Method("erm")
    row = {"overrides": OLD_ROW_OVERRIDES, "method_config": runs.resolved_method(erm.overrides()), "seed": 11}
    store.write_text(json.dumps(row) + "\n")

    def lookups():
        found = runs.rows_by_key(store)
        return {
            "none": runs.key("mr", "noisy1k", erm, 11) in found,
            "5e-5": runs.key("mr", "noisy1k", erm, 11, 5e-5) in found,
            "5e-5 written out": runs.key("mr", "noisy1k", erm, 11, 5e-5, (("layer_decay", 1.0),)) in found,
            "2e-4": runs.key("mr", "noisy1k", erm, 11, 2e-4) in found,
            "head x10": runs.key("mr", "noisy1k", erm, 11, 5e-5, (("head_lr_mult", 10.0),)) in found,
            "run": runs.overrides("mr", "noisy1k", erm, 11),
        }

    before = lookups()
    assert before["none"] and before["5e-5"] and before["5e-5 written out"]
    assert not before["2e-4"] and not before["head x10"]
    assert {"optim.lr=5e-05", "optim.head_lr_mult=1.0", "optim.layer_decay=1.0"} <= set(before["run"])

    @dataclasses.dataclass
    class NewDefaults:
        lr: float = 2e-4
        weight_decay: float = 0.1
        warmup_ratio: float = 0.06
        head_lr_mult: float = 10.0
        layer_decay: float = 0.8

    monkeypatch.setattr(schema, "OptimSchema", NewDefaults)
    assert lookups() == before


def test_an_optim_field_without_a_legacy_value_is_refused():
    with pytest.raises(ValueError, match="optim fields \\['momentum'\\] have no legacy value"):
        runs.explicit(["task=mr", "optim.momentum=0.9"])


# --- the suite -----------------------------------------------------------------------------------------------------


def test_selection_runs_the_grid_on_every_setting_before_any_lever_and_cheap_settings_first():
    units = recipe.selection_units()
    kinds = [0 if recipe.Recipe(u[4], u[5]) in recipe.GRID else 1 if recipe.Recipe(u[4], u[5]) in recipe.LEVERS else 2
             for u in units]  # fmt: skip
    assert kinds == sorted(kinds)
    grid = [u[:2] for u, k in zip(units, kinds) if k == 0]
    assert [s for s, _ in itertools.groupby(grid)] == list(recipe.SUITE)
    assert len(units) == len(recipe.SUITE) * len(recipe.SELECT_SEEDS) * len(recipe.CANDIDATES)


def test_the_recipe_chosen_has_the_least_worst_case_regret_and_waits_for_every_row():
    rng = random.Random(0)
    labels = [r.label for r in recipe.CANDIDATES]
    settings = [f"{t} {s}" for t, s in recipe.SUITE]
    table = {s: {label: {"val": rng.uniform(0.6, 0.9)} for label in labels} for s in settings}
    fixed = [r.label for r in recipe.CANDIDATES if not runs.is_tuned(r.lr)]
    brute = {
        label: max(max(table[s][c]["val"] for c in labels) - table[s][label]["val"] for s in settings)
        for label in fixed
    }
    assert recipe.choose(table) == min(brute, key=brute.get)
    regret = recipe.regrets(table, "val")
    assert all(regret[label][s] == pytest.approx(max(table[s][c]["val"] for c in labels) - table[s][label]["val"])
               for label in labels for s in settings)  # fmt: skip
    del table[settings[-1]][fixed[-1]]["val"]
    assert recipe.choose(table) is None


def test_the_lr_sweep_picks_on_one_seeds_validation_and_is_judged_on_the_others():
    """Seed 101 ranks 1e-4 first, seed 102 ranks 2e-4 first: each pick is judged on the other seed's run at its LR
    (0.70 and 0.71), not on the best run of that seed."""
    vals = {101: (0.70, 0.72, 0.71, 0.60), 102: (0.69, 0.70, 0.74, 0.50)}
    rows = {
        runs.key(*r.unit("mr", "noisy1k", recipe.ERM, seed)): {"metrics": {"val/acc": v}}
        for seed, values in vals.items()
        for r, v in zip(recipe.GRID, values)
    }
    sweep = recipe.lr_sweep(rows, "mr", "noisy1k", recipe.val_final)
    assert sweep == {"picks": ["lr=0.0001", "lr=0.0002"], "value": pytest.approx(0.705)}
    del rows[runs.key(*recipe.GRID[3].unit("mr", "noisy1k", recipe.ERM, 102))]
    assert recipe.lr_sweep(rows, "mr", "noisy1k", recipe.val_final) is None


def test_nothing_is_confirmed_before_a_recipe_is_chosen():
    assert recipe.confirmation_units({}) == []


@pytest.mark.parametrize("platform, name", [("cpu", "recipe_suite"), ("gpu", "recipe_suite_gpu")])
def test_committed_suite_table_comes_from_the_committed_rows(platform, name):
    saved = json.loads((ROOT / "docs" / "results" / f"{name}.json").read_text())
    runs.use_platform(platform)
    try:
        text, summary = recipe.suite_report()
    finally:
        runs.use_platform("cpu")
    assert text == saved["table"]
    assert json.loads(json.dumps(summary["regret"])) == saved["regret"] and summary["chosen"] == saved["chosen"]


# --- the shipped recipe --------------------------------------------------------------------------------------------


def test_the_app_ships_the_recipe_the_study_chose(tmp_path):
    """conf/, the schema and TextClassifier's own defaults are one recipe: benchmarks/recipe.py's SHIPPED, the
    other fields at what every study row without them ran at."""
    import inspect

    shipped = {**runs.LEGACY_OPTIM, "lr": recipe.SHIPPED.lr, **dict(recipe.SHIPPED.optim)}
    assert dict(schema.compose(ROOT / "conf", [], tmp_path).optim) == shipped
    assert dataclasses.asdict(schema.OptimSchema()) == shipped
    signature = inspect.signature(TextClassifier).parameters
    assert {k: signature[k].default for k in shipped} == shipped


def test_the_shipped_recipe_is_what_the_committed_rows_choose():
    """The post-hoc rule (least worst-case suite regret among candidates within 2 points of the best fixed LR on
    both tuning tasks' validation) applied to the committed GPU rows gives SHIPPED; the pre-declared rule
    (least worst-case regret alone) gives another recipe, which the docs report."""
    runs.use_platform("gpu")
    try:
        rows = runs.rows_by_key()
        text, summary = tuning.report()
        assert text == json.loads((ROOT / "docs" / "results" / "tuning_gpu.json").read_text())["table"]
        assert summary["shipped_rule"] == recipe.SHIPPED.label
        assert recipe.choose(recipe.selection(rows)) == "lr=0.0001 layer_decay=0.8"
    finally:
        runs.use_platform("cpu")


def test_studies_whose_rows_do_not_record_the_recipe_stay_at_the_one_they_ran_at(tmp_path, monkeypatch):
    """fidelity.py's trajectories (their rows skip finished probe points by an identity without the optimizer) and
    staleness.py run at runs.LEGACY_OPTIM, not at the app's default, which has moved since their rows were made."""
    import argparse

    args = argparse.Namespace(model="minilm", seed=0, max_length=32)
    cfg = schema.compose(ROOT / "conf", fidelity.trajectory_overrides("mr", "sam", args), tmp_path)
    assert dict(cfg.optim) == runs.LEGACY_OPTIM != dataclasses.asdict(schema.OptimSchema())
    assert runs.legacy_optim() == [f"optim.{k}={float(v)!r}" for k, v in runs.LEGACY_OPTIM.items()]


def test_a_resumed_fidelity_run_recognises_every_committed_trajectory(tmp_path):
    """The committed probe rows record the defaults in config fields that do not apply to their method (beta and
    the estimator of an ERM trajectory); configs now hold None there. Resuming must still find the rows, or the
    full run redoes hours of trajectories. The identity is the one trajectory() builds from the composed config."""
    import argparse

    from lit_deltasam.app import assemble

    rows = fidelity.load()
    for task, method in sorted({(r["task"], r["trajectory"]) for r in rows}):
        row = next(r for r in rows if (r["task"], r["trajectory"]) == (task, method))
        args = argparse.Namespace(
            model=row["model"], seed=row["seed"], max_length=row["max_length"], rho=row["probe_rho"]
        )
        args.batch_size = row["batch_size"]
        cfg = schema.compose(ROOT / "conf", fidelity.trajectory_overrides(task, method, args), tmp_path)
        ident = fidelity.identity(task, method, assemble.method_config(cfg.method), args, row["total_steps"])
        assert fidelity.same_trajectory(row, ident), (task, method)
        other = {**ident, "trajectory_config": {**ident["trajectory_config"], "rho": 0.5}}
        assert not fidelity.same_trajectory(row, other)
