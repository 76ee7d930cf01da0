"""What only a GPU can measure, in one command that finishes in under 8 minutes on one GPU and writes one JSON.

* **precision**: ``16-mixed`` and ``bf16-mixed`` fits of SAM and δ-SAM (MiniLM) through Lightning, with an
  overflow injected into one step: under fp16 the loss scaler must skip it (weights unchanged, scale halved),
  under bf16 the mixin skips it (``sam/steps_skipped``); every other step moves the weights;
* **cost**: step-cost ratios of the methods at batch 32 and length 128, for MiniLM and a BERT-base-sized
  encoder with random weights (``BertConfig()``), interleaved as ``overhead.py`` does;
* **ascent overflow**: fp16 with a GradScaler whose ascent gradients overflow (each clean loss × 1e4): every
  group of SAM, m-sharpness (loop and batched) and batched per-instance SAM takes eps = 0, and the step is the
  ERM step, taken, with finite weights; runs with the cost part, on CUDA only;
* **memory**: ``torch.cuda.max_memory_allocated`` of two steps per method, each in a fresh process (the cost
  part's ``peak_mb``, repeated per model);
* **compile**: ``torch.compile`` against eager for ERM and SAM (speed ratio, and how far the weights drift);
* **fsdp**: Lightning's FSDP on one GPU with δ-SAM (head estimator, global ascent);
* **syncs**: host reads per optimizer step with the step's decisions on the device (one is the target: the
  finite check), the synchronizing CUDA calls per step (``torch.cuda.set_sync_debug_mode``, which also sees
  blocking copies), the same for a Lightning fit with the mixin (its logging included), and how far three
  steps' weights are from those of the host path.

``--smoke`` runs a few steps of each part on the CPU with the small model at batch 8 and length 32 (FSDP and
fp16 need CUDA and are reported as skipped), as the test suite does, so that the GPU run is known to work
before a GPU is lent.

    python -m benchmarks.perf.gpu_check                     # on the GPU machine: docs/results/gpu_check.json
    python -m benchmarks.perf.gpu_check --smoke --out /tmp/gpu_check_smoke.json
    python -m benchmarks.perf.gpu_check --parts compile --out docs/results/compile_cpu.json   # one part, here the CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from benchmarks.lab.common import RESULTS, machine
from benchmarks.perf.overhead import batched, measure, setup
from lit_deltasam import DeltaSAM, DeltaSAMConfig, DeltaSAMOptimizer
from lit_deltasam.core.decisions import HostReads, decisions_on_device

METHODS = {"sam": dict(method="sam"), "deltasam": dict(method="deltasam", estimator="head")}
COST_METHODS = [
    "deltasam(head)",
    "per_instance",
    "sam, m=8",
    "sam, m=4",
    "sam, m=8 (batched)",
    "sam, m=4 (batched)",
    "per_instance (batched, chunk 8)",
    "per_instance (batched, chunk 16)",
    "sam, looksam k=5",
    "sam, interval=5",
]
SMOKE_COST_METHODS = ["deltasam(head)", "sam, m=4 (batched)", "per_instance (batched, chunk 8)"]
GPU_TARGETS = {("sam, m=4 (batched)", "vs_sam"): 1.2, ("per_instance (batched, chunk 8)", "vs_erm"): 3.0}


def _timed(part: Callable[[], Any]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        out = part()
    except Exception as error:  # a part that fails is reported, and the others still run
        out = {"error": f"{type(error).__name__}: {error}"}
    return {**out, "wall_s": time.perf_counter() - start} if isinstance(out, dict) else out


class Poisoned(L.Callback):
    """Makes the loss of the training batch ``at`` infinite, and records which steps moved the weights."""

    def __init__(self, at: int) -> None:
        self.at, self.moved, self.scales = at, [], []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.before = torch.cat([p.detach().reshape(-1).float().clone() for p in pl_module.parameters()])
        if idx == self.at:
            pl_module.poison = True  # read by the module's per_sample_loss
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(None if scaler is None else float(scaler.get_scale()))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        pl_module.poison = False
        after = torch.cat([p.detach().reshape(-1).float() for p in pl_module.parameters()])
        self.moved.append(not torch.equal(after, self.before))


def precision_part(model_name: str, steps: int, smoke: bool) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {}
    for precision in ("16-mixed", "bf16-mixed"):
        for name, options in METHODS.items():
            key = f"{precision} {name}"
            if precision == "16-mixed" and not cuda:
                out[key] = {"skipped": "fp16 mixed precision with a loss scaler needs CUDA"}
                continue
            module, batch, _, device = setup(model_name, 16, 64)
            module.deltasam = DeltaSAMConfig(rho_schedule="constant", **options)
            module.poison = False
            per_sample = module.per_sample_loss

            def poisoned_loss(b: dict, module: Any = module, per_sample: Callable = per_sample) -> torch.Tensor:
                losses = per_sample(b)
                return losses * float("inf") if module.poison else losses

            module.per_sample_loss = poisoned_loss
            data = torch.utils.data.DataLoader([batch] * steps, batch_size=None)
            watch = Poisoned(at=1)
            trainer = L.Trainer(
                accelerator="gpu" if cuda else "cpu",
                devices=1,
                precision=precision,
                max_steps=steps,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[watch],
            )
            trainer.fit(module, data)
            out[key] = {
                "steps": trainer.global_step,
                "moved": watch.moved,
                "scales": watch.scales,
                "steps_skipped": float(trainer.callback_metrics.get("sam/steps_skipped", torch.tensor(0.0))),
                "finite": bool(all(torch.isfinite(p).all() for p in module.parameters())),
                "ok": not watch.moved[1] and all(watch.moved[:1] + watch.moved[2:]),
            }
    return out


def compile_part(model_name: str, rounds: int, batch_size: int, length: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("erm", "sam"):
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        finals = {}
        for mode in ("eager", "compiled"):
            torch.manual_seed(0)
            module, batch, optimizer, device = setup(model_name, batch_size, length)
            if mode == "compiled":
                module.encoder = torch.compile(module.encoder)
            schedule = {} if name == "erm" else dict(rho_schedule="constant")
            loop = DeltaSAMOptimizer(module, optimizer, DeltaSAMConfig(method=name, **schedule))
            for r in range(rounds + 2):  # two warm-up steps: the compilation
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                loop.step(module.per_sample_loss, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if r >= 2:
                    times[mode].append(time.perf_counter() - start)
            finals[mode] = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
        out[name] = {
            "compiled_vs_eager": statistics.median(times["compiled"]) / statistics.median(times["eager"]),
            "max_weight_difference": (finals["compiled"] - finals["eager"]).abs().max().item(),
        }
    return out


OVERFLOW_METHODS = {
    "sam": DeltaSAMConfig(method="sam", rho_schedule="constant"),
    "sam, m=4": DeltaSAMConfig(method="sam", m_sharpness=4, rho_schedule="constant"),
    "sam, m=4 (batched)": batched(DeltaSAMConfig(method="sam", m_sharpness=4, rho_schedule="constant")),
    "per_instance (batched, chunk 8)": batched(DeltaSAMConfig(method="per_instance", rho_schedule="constant"), 8),
}


def scaled_backward(scaler: torch.amp.GradScaler, loss: torch.Tensor) -> None:
    scaler.scale(loss).backward()


def ascent_overflow_part(model_name: str) -> dict[str, Any]:
    """fp16 autocast with a GradScaler whose ascent overflows: every clean forward's loss is multiplied by 1e4, so
    the scaled ascent gradients are inf in fp16 while the descent's are finite. Each group (instance) must then take
    eps = 0 and the step must be an ERM step, taken (the scale not backed off), with finite weights. Eval mode: the
    step is compared with an ERM step from the same weights."""
    if not torch.cuda.is_available():
        return {"skipped": "fp16 autocast with a loss scaler needs CUDA"}
    out: dict[str, Any] = {}
    for name, config in {"erm": DeltaSAMConfig(method="erm"), **OVERFLOW_METHODS}.items():
        torch.manual_seed(0)
        module, batch, _, _ = setup(model_name, 16, 64)
        module.eval()
        # SGD at lr 1: the weights move by -G exactly, so G is compared (AdamW's first step is lr * sign(G),
        # which flips where rounding moves a near-zero coordinate)
        optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
        before = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
        engine = DeltaSAM(module, config)
        calls = [0]

        def loss_fn(b: dict, module: Any = module, calls: list = calls, poison: bool = name != "erm") -> torch.Tensor:
            calls[0] += 1
            with torch.autocast("cuda", dtype=torch.float16):
                losses = module.per_sample_loss(b)
            return losses * 1e4 if poison and calls[0] % 2 == 1 else losses  # the clean forwards

        backward = partial(scaled_backward, scaler)
        result = engine.step(loss_fn, batch, backward=backward, check_finite=False)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        after = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
        out[name] = {
            "perturbed": bool(result.perturbed),
            "eps_norm": None if result.eps_norm is None else float(result.eps_norm),
            "scale_kept": scaler.get_scale() >= scale,
            "finite": bool(torch.isfinite(after).all()),
            "moved": not torch.equal(after, before),
            "update": after - before,
        }
    erm = out["erm"].pop("update")
    for name in OVERFLOW_METHODS:
        row = out[name]
        difference = (row.pop("update") - erm).norm() / erm.norm()
        row["update_relative_difference_to_erm"] = difference.item()
        # groups sum their fp16 gradients in another order than the whole batch: rounding, far below 1e-2
        close = row["update_relative_difference_to_erm"] < 1e-2
        row["ok"] = row["scale_kept"] and row["finite"] and row["moved"] and close
    return out


SYNC_METHODS = {
    "erm": dict(method="erm"),
    "sam": dict(method="sam"),
    "deltasam(head)": dict(method="deltasam", estimator="head"),
    "sam, m=8": dict(method="sam", m_sharpness=8),
    "per_instance": dict(method="per_instance"),
    "sam, looksam k=2": dict(method="sam", interval=2, reuse="looksam"),
}


def syncs_part(model_name: str, batch_size: int, length: int) -> dict[str, Any]:
    """Host reads per optimizer step with the decisions on the device (forced on the CPU in smoke mode), and how
    far three steps' weights are from the host path's."""
    out: dict[str, Any] = {}
    torch.manual_seed(0)
    module, batch, optimizer, device = setup(model_name, batch_size, length)
    initial = copy.deepcopy(module.state_dict())
    for name, options in SYNC_METHODS.items():
        finals, reads, syncs = {}, [], []
        for on_device in (True, False):
            module.load_state_dict(initial)
            optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)  # as setup builds it
            schedule = {} if options["method"] == "erm" else dict(rho_schedule="constant")
            loop = DeltaSAMOptimizer(module, optimizer, DeltaSAMConfig(**schedule, **options), seed=0)
            with decisions_on_device(on_device):
                loop.step(module.per_sample_loss, batch)  # the first step checks more, once
                for _ in range(3):
                    with HostReads() as counted, cuda_syncs(device) as synced:
                        loop.step(module.per_sample_loss, batch)
                    if on_device:
                        reads.append(counted.count)
                        syncs.append(sum("synchroniz" in str(w.message) for w in synced))
            finals[on_device] = torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])
        out[name] = {
            "host_reads_per_step": reads,
            "cuda_syncs_per_step": syncs if device.type == "cuda" else None,
            "max_weight_difference_to_host_path": (finals[True] - finals[False]).abs().max().item(),
            "forced_on_cpu": device.type == "cpu",
        }
    if device.type == "cuda":  # the mixin, with Lightning's own logging and progress bar: what a user's fit costs
        module.load_state_dict(initial)
        module.deltasam = DeltaSAMConfig(method="sam", rho_schedule="constant")
        counter = SyncsPerStep()
        trainer = L.Trainer(
            accelerator="gpu", devices=1, max_steps=6, logger=False, enable_checkpointing=False, callbacks=[counter]
        )
        trainer.fit(module, torch.utils.data.DataLoader([batch] * 6, batch_size=None))
        out["mixin sam, Lightning logging every step"] = {"cuda_syncs_per_step": counter.counts}
    return out


@contextmanager
def cuda_syncs(device: torch.device) -> Iterator[list]:
    """The synchronizing CUDA calls (``.item()``, blocking copies, ...) made inside, from
    ``torch.cuda.set_sync_debug_mode``'s warnings; nothing on the CPU."""
    if device.type != "cuda":
        yield []
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


class SyncsPerStep(L.Callback):
    """Counts the synchronizing CUDA calls of each training batch after the first."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._caught = warnings.catch_warnings(record=True)
        self._records = self._caught.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(None, None, None)
        if trainer.global_step > 1:
            self.counts.append(sum("synchroniz" in str(w.message) for w in self._records))


def fsdp_part(model_name: str, steps: int) -> dict[str, Any]:
    """Lightning's FSDPStrategy (FSDP1) on one GPU with δ-SAM, with ``use_orig_params`` as Lightning sets it (True,
    refused by the mixin) and False; each variant's steps, loss and weights' finiteness, or its error."""
    if not torch.cuda.is_available():
        return {"skipped": "Lightning's FSDPStrategy needs CUDA"}
    from lightning.pytorch.strategies import FSDPStrategy

    out: dict[str, Any] = {}
    for orig in (True, False):
        module, batch, _, _ = setup(model_name, 16, 64)
        module.deltasam = DeltaSAMConfig(method="deltasam", estimator="head", ascent="global")
        before = torch.cat([p.detach().reshape(-1).float().cpu() for p in module.parameters()])
        trainer = L.Trainer(
            accelerator="gpu",
            devices=1,
            strategy=FSDPStrategy(use_orig_params=orig),
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        try:
            trainer.fit(module, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
        except Exception as error:  # each variant is reported
            out[f"use_orig_params={orig}"] = {"error": f"{type(error).__name__}: {str(error)[:400]}"}
            continue
        after = torch.cat([p.detach().reshape(-1).float().cpu() for p in trainer.lightning_module.parameters()])
        out[f"use_orig_params={orig}"] = {
            "steps": trainer.global_step,
            "loss": float(trainer.callback_metrics["train/loss"]),
            "finite": bool(torch.isfinite(after).all()),
            "moved": after.numel() == before.numel() and not torch.equal(after, before),
        }
    return out


PARTS = ("precision", "cost", "compile", "fsdp", "syncs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a few steps of each part, on the CPU, small model")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    parser.add_argument("--models", nargs="+", choices=("minilm", "bert-base"), help="the cost part's models")
    args = parser.parse_args()
    models = ["small"] if args.smoke else (args.models or ["minilm", "bert-base"])
    main_model = models[0]
    rounds, steps = (1, 3) if args.smoke else (8, 6)
    batch_size, length = (8, 32) if args.smoke else (32, 128)
    result: dict[str, Any] = {"machine": machine(), "smoke": args.smoke, "cuda": torch.cuda.is_available()}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so that a run cut short by a time limit keeps the parts it finished
        args.out.write_text(json.dumps(result, indent=2))
        print(f"[gpu_check] {list(result)[-1]} done", flush=True)

    if "precision" in args.parts:
        result["precision"] = _timed(lambda: precision_part(main_model, steps, args.smoke))
        save()
    if "cost" in args.parts:
        cost_methods = SMOKE_COST_METHODS if args.smoke else COST_METHODS
        cost = {m: _timed(lambda m=m: measure(m, rounds, 1, batch_size, length, cost_methods)) for m in models}
        for m in models:  # the per-round times are long and in the cost rows' medians already
            cost[m].pop("times", None)
            for (name, key), target in GPU_TARGETS.items():
                row = cost[m].get("methods", {}).get(name)
                if row is not None:
                    row[f"gpu_target_{key}"] = {"target": target, "met": row[key] <= target}
        result["cost"] = cost
        result["ascent_overflow"] = _timed(lambda: ascent_overflow_part(main_model))
        result["memory"] = {
            m: {name: row.get("peak_mb") for name, row in cost[m].get("methods", {}).items()} for m in models
        }
        save()
    if "compile" in args.parts:
        result["compile"] = _timed(lambda: compile_part(main_model, rounds, batch_size, length))
        save()
    if "fsdp" in args.parts:
        result["fsdp"] = _timed(lambda: fsdp_part(main_model, steps))
        save()
    if "syncs" in args.parts:
        result["syncs"] = _timed(lambda: syncs_part(main_model, batch_size, length))
        save()
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1)[:4000])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
