"""The generalization study: flatness against least-squares closed forms; ρ selection, pairing; the committed tables."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from benchmarks import generalization as gen
from benchmarks import recipe, variants
from benchmarks import regimes as reg
from benchmarks.lab import runs, scheduler
from benchmarks.perf import overhead
from lit_deltasam import DeltaSAMConfig


class LeastSquares(L.LightningModule):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(dim, 1, bias=False, dtype=torch.float64)

    def per_sample_loss(self, batch):
        x, y = batch
        return 0.5 * (self.linear(x).squeeze(-1) - y) ** 2


def test_final_flatness_matches_least_squares_closed_form():
    torch.manual_seed(0)
    n, dim, rho = 40, 6, 0.3
    x, y = torch.randn(n, dim, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    module = LeastSquares(dim)
    w = module.linear.weight.detach().clone().squeeze(0)
    before = w.clone()
    trainer = SimpleNamespace(val_dataloaders=[(x, y)], callback_metrics={})

    runs.FinalFlatness(batch_size=32, iters=200, rho=rho).on_train_end(trainer, module)

    xs, ys = x[:32], y[:32]
    hessian = xs.T @ xs / 32
    g = hessian @ w - xs.T @ ys / 32
    # L(w + ρ g/‖g‖) − L(w) = ρ‖g‖ + ρ²/2 · gᵀHg/‖g‖², exact for a quadratic
    sharpness = rho * g.norm() + 0.5 * rho**2 * (g @ hessian @ g) / (g @ g)
    top = torch.linalg.eigvalsh(hessian).max()
    metrics = trainer.callback_metrics  # float32 values
    assert metrics["final/sam_sharpness"].item() == pytest.approx(sharpness.item(), rel=1e-6)
    # power iteration stops once the estimate changes by less than 1e-3
    assert metrics["final/hessian_top_eig"].item() == pytest.approx(top.item(), rel=1e-2)
    assert torch.equal(module.linear.weight.detach().squeeze(0), before)


def _study_pages() -> str:
    return "".join(
        p.read_text() for p in sorted((Path(__file__).resolve().parents[1] / "docs" / "studies").glob("*.md"))
    )


def _row(val, test_final, test_best=None):
    return {
        "metrics": {"val/acc": val, "test_final/acc": test_final, "test/acc": test_best or test_final},
        "stalled": False,
        "time_s": 1.0,
    }


def test_generalization_chooses_rho_on_validation_and_pairs_runs_by_seed():
    args = SimpleNamespace(
        tasks=["mr"],
        settings=["clean1k", "noisy1k"],
        rhos=[0.02, 0.05],
        select_seeds=[101, 102],
        select_on="clean1k",
        seeds=[11, 12, 13],
        variant=(),
        per_instance=True,
    )
    rows = {}
    # ρ = 0.05 wins on mean validation accuracy for SAM although it loses on seed 101; test scores are decoys
    for family, accs in {"sam": {0.02: (0.80, 0.70), 0.05: (0.78, 0.74)}, "deltasam": {0.02: (0.8, 0.8)}}.items():
        for rho, (a, b) in accs.items():
            for seed, v in zip(args.select_seeds, (a, b)):
                rows[runs.key("mr", "clean1k", gen.shipped(family, rho), seed)] = _row(v, 1.0 - v)
    units, chosen = gen.final_units(args, rows)
    assert chosen[("mr", "clean1k", "sam")].rho == 0.05
    assert chosen[("mr", "noisy1k", "sam")].rho == 0.05  # chosen on clean1k, used in both settings
    assert ("mr", "clean1k", "deltasam") not in chosen  # its ρ = 0.05 selection runs are missing
    assert chosen[("mr", "clean1k", "per_instance")] == gen.shipped("per_instance", 0.05)
    assert ("mr", "noisy1k", "per_instance") not in chosen
    # ERM and SAM in both settings for every seed, per-instance SAM last
    assert len(units) == 2 * 2 * 3 + 3
    assert all(u[2].method == "per_instance" for u in units[-3:])
    assert [u[3] for u in units[:-3]] == sorted(u[3] for u in units[:-3])

    for seed, (erm, sam) in zip(args.seeds, ((0.80, 0.83), (0.81, 0.82), (0.79, 0.80))):
        rows[runs.key("mr", "clean1k", runs.Method("erm"), seed)] = _row(0.5, erm)
        rows[runs.key("mr", "clean1k", chosen[("mr", "clean1k", "sam")], seed)] = _row(0.5, sam, test_best=erm)
    rows.pop(runs.key("mr", "clean1k", runs.Method("erm"), 13))  # unpaired: seed 13 has SAM only
    d = gen.differences(
        {s: rows[runs.key("mr", "clean1k", runs.Method("erm"), s)] for s in (11, 12)},
        {s: rows[runs.key("mr", "clean1k", chosen[("mr", "clean1k", "sam")], s)] for s in (11, 12, 13)},
        gen.test_final,
    )
    assert d["n"] == 2 and d["wins"] == 0
    assert d["mean"] == pytest.approx(-2.0)  # points: (−3 − 1) / 2
    assert d["ci"][0] <= d["mean"] <= d["ci"][1]


def test_committed_generalization_tables_come_from_the_committed_rows():
    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "docs" / "results" / "generalization.json").read_text())

    text, summary = gen.report(SimpleNamespace(**saved["args"]))

    assert text == saved["table"]
    assert summary["chosen"] == saved["chosen"]
    assert summary["differences"] == saved["differences"]
    assert saved["table"].strip() in _study_pages()


def test_regimes_chooses_on_validation_in_order_and_pairs_by_seed(monkeypatch):
    """Step 0 (LR per setting), step 1 (ρ for SAM and m = 4, on setting 1), then setting 2's m-SAM arm, each on
    validation only, each opening the next step's units; the comparison is seed-major and paired."""
    args = SimpleNamespace(
        lrs=[5e-5, 2e-4],
        rhos=[0.02, 0.05],
        select_seeds=[101, 102],
        seeds=[11, 12],
        strong_seeds=1,
        per_instance_seeds=1,
        tweets_seeds=0,
    )
    rows = {}
    assert len(reg.Protocol(args, rows).selection_units()) == 2 * 2 * 2  # seeds × settings × LRs, nothing else
    for setting, best in ((reg.HEADLINE, 2e-4), (reg.STRONG, 5e-5)):
        for lr in args.lrs:
            for seed in args.select_seeds:
                rows[runs.key("mr", setting, runs.Method("erm"), seed, lr)] = _row(0.7 if lr == best else 0.6, 0.0)
    protocol = reg.Protocol(args, rows)
    assert protocol.lr == {reg.HEADLINE: 2e-4, reg.STRONG: 5e-5} and not protocol.rho
    assert len(protocol.selection_units()) == 8 + 2 * 2 * 2  # + ρ grids of SAM and m = 4 at setting 1's LR
    for rho, (sam, m4) in {0.02: (0.71, 0.75), 0.05: (0.73, 0.72)}.items():
        for seed in args.select_seeds:
            rows[runs.key("mr", reg.HEADLINE, reg.shipped("sam", rho), seed, 2e-4)] = _row(sam, 1.0)
            m = reg.shipped("sam", rho, (("m_sharpness", 4),))
            rows[runs.key("mr", reg.HEADLINE, m, seed, 2e-4)] = _row(m4, 1.0)
    protocol = reg.Protocol(args, rows)
    assert protocol.rho == {"sam": 0.05, "m4": 0.02} and protocol.m_arm is None  # m = 8's runs are missing
    for seed in args.select_seeds:
        rows[runs.key("mr", reg.HEADLINE, reg.arm("m-sam m=8", protocol.rho), seed, 2e-4)] = _row(0.76, 0.0)
    protocol = reg.Protocol(args, rows)
    assert protocol.m_arm == "m-sam m=8" and protocol.ready()
    units = protocol.comparison_units()
    assert [u[3] for u in units] == sorted(u[3] for u in units)  # seed-major
    assert {u[4] for u in units if u[1] == reg.STRONG} == {5e-5}  # setting 2 at its own LR
    assert sum(u[2].method == "per_instance" for u in units) == 1 and all(
        u[3] == 11 for u in units if u[1] == reg.STRONG
    )
    assert reg.arm("deltasam", protocol.rho).rho == 0.05 and reg.arm("per-instance (m=1)", protocol.rho).rho == 0.02
    # the tweets repeat: its own step 0 among the selection units, its comparison after all of mr's, at its own LR
    args.tweets_seeds = 1
    assert len(reg.Protocol(args, rows).selection_units()) == len(protocol.selection_units()) + 2 * 2
    assert reg.Protocol(args, rows).comparison_units() == units  # no tweets unit before its LR is chosen
    for lr in args.lrs:
        for seed in args.select_seeds:
            rows[runs.key("tweets", "noisy1k", runs.Method("erm"), seed, lr)] = _row(0.8 if lr == 5e-5 else 0.6, 0.0)
    tweets = reg.Protocol(args, rows)
    assert tweets.lr[reg.TWEETS] == 5e-5 and tweets.comparison_units()[: len(units)] == units
    extra = tweets.comparison_units()[len(units) :]
    assert {(u[0], u[1], u[3], u[4]) for u in extra} == {("tweets", "noisy1k", 11, 5e-5)}
    assert [u[2] for u in extra] == [reg.arm(n, protocol.rho) for n in tweets.arms(reg.STRONG)]
    args.tweets_seeds = 0
    d = reg.differences(
        {11: _row(0.5, 0.80), 12: _row(0.5, 0.84)}, reg.test_final, {11: _row(0.5, 0.79)}, reg.test_final
    )
    assert d is None  # one pair: no interval
    # m-SAM is compared with SAM at its own ρ (0.02) as well as with SAM at SAM's (0.05)
    assert reg.arm(reg.SAME_RHO, protocol.rho).rho == 0.02 and reg.SAME_RHO in protocol.arms(reg.STRONG)
    for seed, accs in {11: (0.70, 0.74, 0.75, 0.72), 12: (0.71, 0.76, 0.78, 0.70)}.items():
        for name, acc in zip(("sam", reg.SAME_RHO, "m-sam m=8", "deltasam"), accs):
            rows[runs.key("mr", reg.HEADLINE, reg.arm(name, protocol.rho), seed, 2e-4)] = {
                **_row(0.5, acc),
                "time_s": 1,
            }
    monkeypatch.setattr(reg, "rows_by_key", lambda: rows)
    diffs = {name: d["differences"] for name, d in reg.report(args)[1]["arms"].items()}
    m8, delta = diffs[f"{reg.HEADLINE}/m-sam m=8"], diffs[f"{reg.HEADLINE}/deltasam"]
    assert m8["SAM final"]["mean"] == pytest.approx(6.0) and m8["SAM final, same ρ"]["mean"] == pytest.approx(1.5)
    assert delta["SAM final, same ρ"] == delta["SAM final"] and delta["SAM final"]["mean"] == pytest.approx(0.5)


def test_variants_selects_rho_per_arm_on_validation_and_tests_the_declared_families(monkeypatch):
    """The protocol of docs/studies/variants-protocol.md: ERM's and each arm's selection runs first; an arm's
    comparison runs open once its own ρ is chosen (a tie: the smaller ρ); the families count every declared test in
    Holm, run or not; sharpness-aware arms are read at their final weights, ERM early-stopped."""
    runs.use_platform("cpu")
    rows: dict = {}
    plan = variants.units(("sam", "gsam"))
    first = plan(rows)
    assert len(first) == 3 + 2 * 2 * 3 + 5  # ERM's selection, two arms × two radii × three seeds, ERM's comparison
    assert all(u[3] in variants.SELECT_SEEDS for u in first[:15]) and first[-1][2] == variants.ERM
    for seed in variants.SELECT_SEEDS:
        for rho, (sam, gsam) in {0.02: (0.70, 0.72), 0.05: (0.73, 0.72)}.items():
            rows[runs.key("mr", variants.SETTING, variants.arm_method("sam", rho), seed)] = _row(sam, 0.0)
            rows[runs.key("mr", variants.SETTING, variants.arm_method("gsam", rho), seed)] = _row(gsam, 0.0)
    assert variants.selected(rows, "mr", "sam") == 0.05 and variants.selected(rows, "mr", "gsam") == 0.02
    assert variants.selected(rows, "mr", "wsam") is None
    opened = plan(rows)[len(first) - 5 :]
    assert [(u[2].method, u[2].rho, u[3]) for u in opened[:10]] == [
        *((m, rho, s) for m, rho in (("sam", 0.05), ("gsam", 0.02)) for s in variants.SEEDS["cpu"])
    ]
    for i, seed in enumerate(variants.SEEDS["cpu"]):
        rows[runs.key("mr", variants.SETTING, variants.ERM, seed)] = _row(0.5, 0.70, test_best=0.72)
        rows[runs.key("mr", variants.SETTING, variants.arm_method("sam", 0.05), seed)] = _row(0.5, 0.73 + 0.01 * i)
        rows[runs.key("mr", variants.SETTING, variants.arm_method("gsam", 0.02), seed)] = _row(0.5, 0.74 + 0.01 * i)
    monkeypatch.setattr(variants, "rows_by_key", lambda: rows)
    _, out = variants.report()
    tests = {(d["arm"], d["baseline"]): d for d in out["primary"]}
    assert set(tests) == {("gsam", "sam"), ("sam", "early-stopped erm"), ("gsam", "early-stopped erm")}
    assert tests["gsam", "sam"]["mean"] == pytest.approx(0.01) and tests["gsam", "sam"]["wins"] == 5
    assert tests["sam", "early-stopped erm"]["mean"] == pytest.approx(0.03)  # against ERM's best checkpoint
    assert out["declared"] == {"primary": 11, "secondary": 12} and out["complete"]["primary"] is False
    p = [d["p"] for d in out["primary"]]
    smallest = min(range(3), key=p.__getitem__)
    assert out["primary"][smallest]["p_holm"] == pytest.approx(min(1.0, 11 * p[smallest]))  # 11 tests, not 3
    assert out["descriptive"]["mr"]["sam − final erm"]["mean"] == pytest.approx(0.05)
    text, _ = variants.report()
    assert "(3 of 11 declared tests on all 5 seeds; untested" in text
    del rows[runs.key("mr", variants.SETTING, variants.arm_method("gsam", 0.02), variants.SEEDS["cpu"][0])]
    text, out = variants.report()  # gsam's two tests now read 4 seeds: shown, and said to be interim
    assert len(out["primary"]) == 3 and "(1 of 11 declared tests on all 5 seeds, 2 on fewer, interim;" in text


def test_committed_variants_tables_come_from_the_committed_rows():
    """The study runs across sessions: whatever rows are committed, variants.json and its page are rebuilt from them
    (``python -m benchmarks.variants --report``, then ``benchmarks.lab.fill_docs``)."""
    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "docs" / "results" / "variants.json").read_text())
    runs.use_platform("cpu")
    text, summary = variants.report()
    assert text == saved["table"]
    assert summary["status"] == saved["status"] and summary["chosen"] == saved["chosen"]
    assert saved["table"].strip() in _study_pages()


def test_committed_regimes_tables_come_from_the_committed_rows():
    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "docs" / "results" / "regimes.json").read_text())
    text, summary = reg.report(SimpleNamespace(**saved["args"]))
    assert text == saved["table"]
    assert (
        json.loads(json.dumps(summary["arms"])) == saved["arms"]
        and summary["m_arm_setting_2"] == saved["m_arm_setting_2"]
    )
    assert saved["table"].strip() in _study_pages()
    assert summary["headline"] == saved["headline"]
    assert saved["headline"].strip() in (root / "docs" / "results.md").read_text()


def test_committed_recipe_table_comes_from_the_committed_rows():
    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "docs" / "results" / "recipe.json").read_text())
    text, summary = recipe.report(SimpleNamespace(**saved["args"]))
    assert text == saved["table"] and json.loads(json.dumps(summary["settings"])) == saved["settings"]
    assert saved["table"].strip() in _study_pages()


def test_a_tuned_lr_is_its_own_run_key(tmp_path):
    """``tune_lr=true`` rows never stand in for a fixed LR's, nor for the rows made before LRs were written (which
    ran at 5e-5: no LR and 5e-5 are one key)."""
    erm = runs.Method("erm")
    keys = {runs.key("r8", "2k3ep", erm, 1, lr) for lr in (runs.TUNE, 5e-5, None)}
    assert len(keys) == 2 and runs.key("r8", "2k3ep", erm, 1, None) == runs.key("r8", "2k3ep", erm, 1, 5e-5)
    assert {"tune_lr=true", "lr_find.num_training=100"} <= set(runs.overrides("r8", "2k3ep", erm, 1, runs.TUNE))
    assert "data.max_length=64" in runs.overrides("r8", "2k3ep", erm, 1, runs.TUNE)
    assert f"data.max_length={runs.MAX_LENGTH}" in runs.overrides("mr", "noisy1k", erm, 1, runs.TUNE)
    # a row made before rows wrote the range test's settings counts for the settings of its time
    written = [o for o in runs.overrides("r8", "2k3ep", erm, 1, runs.TUNE) if not o.startswith("lr_find.")]
    store = tmp_path / "rows.jsonl"
    store.write_text(json.dumps({"overrides": written, "method_config": runs.resolved_method(erm.overrides())}) + "\n")
    tuned = runs.data_overrides("r8", "2k3ep", 1, runs.TUNE)
    legacy = [o for o in tuned if not o.startswith(("lr_find.", "tune_lr="))]
    legacy += runs.lr_overrides(runs.TUNE, runs.LEGACY_LR_FIND)
    assert runs._key(legacy, runs.resolved_method(["method=erm"])) in runs.rows_by_key(store)


def test_profile_names_the_ops_of_a_step():
    """overhead.py --profile: the shares are of one step's self CPU time, largest first, and a SAM step's
    matrix products are among them."""
    result = overhead.profile("small", "sam", 4, 16)
    shares = [op["share"] for op in result["ops"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert {"aten::mm", "aten::addmm"} & {op["op"] for op in result["ops"]}
    with pytest.raises(SystemExit, match="'sharp' is not a method"):
        overhead.profile("small", "sharp", 4, 16)


def test_the_overhead_benchmark_has_a_row_per_family_method():
    """Issue 48: GSAM, WSAM, Friendly-SAM, gradient centralization and the adaptive policy each get a row, measured
    beside SAM and ERM (the preset); the policy's loop is given the run's length, which its threshold needs, so a step
    of it runs (profiled here, the cheapest whole step the benchmark takes)."""
    rows = overhead.methods("small")
    assert set(overhead.FAMILY_METHODS) <= set(rows)
    assert {rows[name].method for name in overhead.FAMILY_METHODS} >= {"gsam", "wsam", "fsam"}
    assert overhead.PRESETS["family"]["methods"] == overhead.FAMILY_METHODS
    result = overhead.profile("small", "sam, adaptive policy", 4, 16)
    assert result["ops"] and result["self_cpu_s"] > 0


@pytest.mark.slow
def test_the_gpu_check_runs_in_its_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py --smoke: every part runs on the CPU; the injected overflow is skipped under bf16."""
    import subprocess

    out = tmp_path / "gpu_check.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"  # the path the GPU bundle runs
    run = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("bf16-mixed sam", "bf16-mixed deltasam"):
        part = result["precision"][name]
        assert part["ok"] and part["moved"][1] is False and part["steps_skipped"] == 1.0, part
    assert "skipped" in result["precision"]["16-mixed sam"] and "skipped" in result["fsdp"]
    rows = result["cost"]["small"]["methods"]
    assert {"erm", "sam", "deltasam(head)"} <= set(rows) and rows["sam"]["vs_erm"] > 1
    assert result["memory"]["small"]["sam"] > 0
    for name in ("erm", "sam"):
        assert result["compile"][name]["max_weight_difference"] < 1e-3
    for name, part in result["syncs"].items():
        if name != "wall_s":
            assert part["forced_on_cpu"] and part["host_reads_per_step"] == [1, 1, 1], (name, part)
            assert part["max_weight_difference_to_host_path"] < 1e-4, (name, part)  # AdamW at lr 1e-5, 4 steps


def test_schedule_asks_the_plan_again_after_each_row_and_reports_failures(tmp_path, monkeypatch):
    """A later phase chosen from earlier rows runs in the same call; a finished unit is skipped on a rerun; a unit
    that raises is reported, the others still run, and the call then exits non-zero; the deadline stops new runs."""
    erm = runs.Method("erm")
    first = [("mr", "noisy1k", erm, seed) for seed in (1, 2)]
    second = ("mr", "noisy1k", erm, 3)
    broken = ("mr", "noisy1k", erm, 4)
    ran = []

    def fake(unit, name):
        ran.append(unit[3])
        if unit == broken:
            raise RuntimeError("boom")
        return {
            "overrides": runs.overrides(*unit),
            "method_config": runs.resolved_method(unit[2].overrides()),
            "metrics": {"val/acc": 0.5, "test/acc": 0.5},
            "time_s": 0.0,
        }

    def plan(rows):
        done = all(runs.key(*u) in rows for u in first)
        return first + ([broken, second] if done else [])

    monkeypatch.setattr(scheduler, "_run_unit", fake)
    runs.use_platform("cpu", tmp_path / "rows.jsonl")
    try:
        with pytest.raises(SystemExit, match="1 runs failed"):
            scheduler.schedule(plan, "test")
        assert ran == [1, 2, 4, 3] and len(runs.load()) == 3
        ran.clear()
        with pytest.raises(SystemExit):
            scheduler.schedule(plan, "test")
        assert ran == [4]  # only the failed one again
        ran.clear()
        scheduler.schedule(lambda _: [("mr", "noisy1k", erm, 5)], "test", deadline=-1.0)
        assert ran == []
    finally:
        runs.use_platform("cpu")


def test_committed_fidelity_tables_come_from_the_committed_rows():
    from benchmarks import fidelity

    root = Path(__file__).resolve().parents[1]
    saved = json.loads((root / "docs" / "results" / "fidelity.json").read_text())
    text, summary = fidelity.report(fidelity.load())
    assert text == saved["table"]
    assert json.loads(json.dumps(summary)) == saved["summary"]


def test_a_family_method_scaled_as_asam_has_its_own_row_key():
    """asam_eta on GSAM, WSAM or F-SAM changes the ascent: the study store must not serve the unscaled run's row
    for it (found in review: both keyed alike)."""
    for method in ("gsam", "wsam", "fsam"):
        plain = runs.relevant(DeltaSAMConfig(method=method, rho=0.05))
        scaled = runs.relevant(DeltaSAMConfig(method=method, rho=0.05, asam_eta=0.01))
        assert plain != scaled and scaled["asam_eta"] == 0.01 and "asam_eta" not in plain
