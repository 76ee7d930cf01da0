"""Cost of one training step per method, measured side by side in one interleaved run.

Each round runs one full step (the double step and the AdamW step) of every method,
in a shuffled order, on the same batch; an amortized method (``interval=k``, with or
without LookSAM reuse) runs one whole cycle of k steps, timed per step. The report gives
median times, the ratios to SAM and to ERM (medians of per-round ratios), and the peak
tensor memory of two steps of each method, each in a fresh process (from the profiler's allocation
events on CPU, CUDA's allocator peak on a GPU), in MB and in copies of the parameters.

    python -m benchmarks.perf.overhead                      # MiniLM and the small model, batch 32, length 48
    python -m benchmarks.perf.overhead --models small --rounds 5
    python -m benchmarks.perf.overhead --profile per_instance --models minilm --length 32   # where its time goes
    python -m benchmarks.perf.overhead --preset groups --length 32 --name overhead_groups_32   # issue 37's group rows
    python -m benchmarks.perf.overhead --smoke              # the group methods once, small model, to /tmp
    python -m benchmarks.perf.overhead --preset family      # issue 48's SAM family against SAM and ERM
    python -m benchmarks.perf.overhead --smoke --preset family   # the family once, small model, to /tmp
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.lab.common import RESULTS, ROOT, machine, save
from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer
from lit_deltasam.data import get_task
from lit_deltasam.models import MiniLM, Small, TextClassifier

TOP_LAYERS = {  # the last Transformer layer and everything above it
    "minilm": ["encoder.model.bert.encoder.layer.5.*", "encoder.model.bert.pooler.*", "encoder.model.classifier.*"],
    "small": ["encoder.encoder.layers.1.*", "encoder.norm.*", "encoder.classifier.*"],
    "bert-base": ["encoder.model.bert.encoder.layer.11.*", "encoder.model.bert.pooler.*", "encoder.model.classifier.*"],
}
HEAD = {  # only what sits above the last Transformer layer
    "minilm": ["encoder.model.bert.pooler.*", "encoder.model.classifier.*"],
    "small": ["encoder.norm.*", "encoder.classifier.*"],
    "bert-base": ["encoder.model.bert.pooler.*", "encoder.model.classifier.*"],
}


def batched(config: DeltaSAMConfig, chunk: Optional[int] = None) -> DeltaSAMConfig:
    """``config`` with its groups (m-sharpness, per-instance SAM) in batched passes of ``chunk`` groups."""
    return config.replace(group_impl="batched", group_chunk=chunk)


def methods(model: str) -> dict[str, DeltaSAMConfig]:
    return {
        "erm": DeltaSAMConfig(method="erm"),
        "sam": DeltaSAMConfig(method="sam"),
        "asam": DeltaSAMConfig(method="asam", rho=0.5),
        "deltasam(head)": DeltaSAMConfig(method="deltasam", estimator="head"),
        "deltasam(probe K=3, all)": DeltaSAMConfig(method="deltasam", estimator="probe", probe_samples=3),
        "deltasam(probe K=3, top)": DeltaSAMConfig(
            method="deltasam", estimator="probe", probe_samples=3, probe_params=TOP_LAYERS[model]
        ),
        "deltasam(probe K=3, head)": DeltaSAMConfig(
            method="deltasam", estimator="probe", probe_samples=3, probe_params=HEAD[model]
        ),
        "per_instance": DeltaSAMConfig(method="per_instance", per_instance_impl="loop"),
        "per_instance(vmap)": DeltaSAMConfig(method="per_instance", per_instance_impl="vmap", share_dropout=False),
        "sam, m=8": DeltaSAMConfig(method="sam", m_sharpness=8),
        "sam, m=4": DeltaSAMConfig(method="sam", m_sharpness=4),
        "sam, m=8 (batched)": batched(DeltaSAMConfig(method="sam", m_sharpness=8)),
        "sam, m=4 (batched)": batched(DeltaSAMConfig(method="sam", m_sharpness=4)),
        "deltasam(head), m=4 (batched)": batched(DeltaSAMConfig(method="deltasam", estimator="head", m_sharpness=4)),
        "per_instance (batched, chunk 8)": batched(DeltaSAMConfig(method="per_instance"), 8),
        "per_instance (batched, chunk 16)": batched(DeltaSAMConfig(method="per_instance"), 16),
        "deltasam(head), m=4": DeltaSAMConfig(method="deltasam", estimator="head", m_sharpness=4),
        "sam, interval=5": DeltaSAMConfig(method="sam", interval=5),
        "sam, looksam k=5": DeltaSAMConfig(method="sam", interval=5, reuse="looksam"),
        "sam, looksam k=10": DeltaSAMConfig(method="sam", interval=10, reuse="looksam"),
        "deltasam(head), looksam k=5": DeltaSAMConfig(method="deltasam", estimator="head", interval=5, reuse="looksam"),
        "gsam": DeltaSAMConfig(method="gsam"),
        "wsam": DeltaSAMConfig(method="wsam"),
        "fsam": DeltaSAMConfig(method="fsam"),
        "sam, gradient centralization": DeltaSAMConfig(method="sam", gradient_centralization=True),
        "sam, adaptive policy": DeltaSAMConfig(method="sam", policy="adaptive"),
        "δ-gsam(head)": DeltaSAMConfig(method="gsam", beta=-0.5, estimator="head"),
        "δ-fsam(head)": DeltaSAMConfig(method="fsam", beta=-0.5, estimator="head"),
    }


def loop_of(module, optimizer, config: DeltaSAMConfig, steps: int) -> DeltaSAMOptimizer:
    """The loop a user runs over ``config`` for a run of ``steps`` optimizer steps (the adaptive policy moves its
    threshold over them)."""
    return DeltaSAMOptimizer(module, optimizer, config, total_steps=steps if config.policy is not None else None)


def batch_of(tokenizer, size: int, length: int, num_labels: int) -> dict[str, torch.Tensor]:
    examples = get_task("mr").load()["train"][:size]
    batch = tokenizer(
        [e["text"] for e in examples], truncation=True, max_length=length, padding="max_length", return_tensors="pt"
    )
    batch = dict(batch)
    batch["labels"] = torch.tensor([e["label"] for e in examples]) % num_labels
    return batch


PLAIN = "plain loop (no engine)"
"""The memory reference: ERM through the engine keeps a snapshot of w too, for a bit-exact rollback."""


def live_peak_bytes(profiler: torch.profiler.profile) -> int:
    """The most bytes tensors held at once during the profile, above what they held at its start: every
    allocation and free the profiler recorded, in time order (allocations are charged to the op that made them)."""
    events = sorted((e for e in profiler.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def memory_of(model_name: str, name: str, batch_size: int, length: int) -> dict:
    """Peak tensor memory of two optimizer steps (two cycles of an amortized method) of ``name``, counted from
    before its loop object exists, so that what it keeps across steps (the snapshot of w, LookSAM's direction)
    is counted with the gradients, the optimizer's state and the activations. On a GPU, CUDA's allocator peak."""
    module, batch, optimizer, device = setup(model_name, batch_size, length)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())

    def run() -> None:
        if name == PLAIN:  # the loop with no engine: backward, step; nothing kept for a rollback
            for _ in range(2):
                module.per_sample_loss(batch).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return
        config = methods(model_name)[name]
        engine = loop_of(module, optimizer, config, 2 * config.interval)
        for _ in range(2 * config.interval):
            engine.step(module.per_sample_loss, batch)

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            run()
        peak = live_peak_bytes(prof)
    return {"peak_mb": peak / 2**20, "parameter_copies": peak / param_bytes}


def memory_in_fresh_process(model_name: str, name: str, batch_size: int, length: int) -> dict:
    """:func:`memory_of` in a process of its own: nothing another method allocated or cached can blur it."""
    args = [sys.executable, "-m", "benchmarks.perf.overhead", "--memory-of", name, "--models", model_name]
    args += ["--batch-size", str(batch_size), "--length", str(length)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def profile(model_name: str, name: str, batch_size: int, length: int, top: int = 15) -> dict:
    """The ops that take the most self CPU time in one optimizer step (one cycle of an amortized method) of
    ``name``, after a warm-up step, from ``torch.profiler``; shares of the step's self CPU time."""
    configs = methods(model_name)
    if name not in configs:
        raise SystemExit(f"--profile {name!r} is not a method; choose from {sorted(configs)}")
    module, batch, optimizer, _ = setup(model_name, batch_size, length)
    loop = loop_of(module, optimizer, configs[name], 1 + configs[name].interval)
    loop.step(module.per_sample_loss, batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(configs[name].interval):
            loop.step(module.per_sample_loss, batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]
    ops = [{"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ranked]
    return {
        "model": model_name,
        "method": name,
        "batch_size": batch_size,
        "length": length,
        "self_cpu_s": total / 1e6,
        "ops": ops,
    }


MODELS = ("minilm", "small", "bert-base")


def build(model_name: str) -> tuple[TextClassifier, object]:
    """``minilm`` (pretrained), ``small`` (from scratch) or ``bert-base``: BERT-base's architecture with random
    weights (``BertConfig()``, 110M parameters, nothing to download) and MiniLM's uncased BERT vocabulary."""
    if model_name not in MODELS:
        raise SystemExit(f"model {model_name!r} is not one of {list(MODELS)}")
    spec = Small() if model_name == "small" else MiniLM()
    tokenizer = spec.tokenizer(lambda: (e["text"] for e in get_task("mr").load()["train"]))
    if model_name == "bert-base":
        from transformers import BertConfig

        from lit_deltasam.models.encoders import HFClassifier

        encoder = HFClassifier("bert-base (random)", 2, "sdpa", BertConfig(num_labels=2).to_dict())
    else:
        encoder = spec.build(2, tokenizer)
    return TextClassifier(encoder, DeltaSAMConfig(), num_labels=2), tokenizer


def setup(model_name: str, batch_size: int, length: int):
    """The module (in train mode), one batch and an AdamW base optimizer, on the GPU if there is one."""
    module, tokenizer = build(model_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).train()
    batch = {k: v.to(device) for k, v in batch_of(tokenizer, batch_size, length, 2).items()}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
    return module, batch, optimizer, device


def measure(
    model_name: str, rounds: int, warmup: int, batch_size: int, length: int, names: Optional[list[str]] = None
) -> dict:
    module, batch, optimizer, device = setup(model_name, batch_size, length)
    configs = methods(model_name)
    if names:
        unknown = sorted(set(names) - set(configs))
        if unknown:
            raise SystemExit(f"--methods {unknown} are not methods; choose from {sorted(configs)}")
        configs = {n: c for n, c in configs.items() if n in names or n in ("erm", "sam")}
    # every method drives the one base optimizer through the loop a user runs: schedule, interval, LookSAM
    engines = {name: loop_of(module, optimizer, cfg, warmup + rounds) for name, cfg in configs.items()}

    def step(engine: DeltaSAMOptimizer) -> None:
        """One optimizer step; for an amortized method, one whole cycle of ``interval`` steps."""
        for _ in range(engine.config.interval):
            engine.step(module.per_sample_loss, batch)

    times: dict[str, list[float]] = {name: [] for name in engines}
    order = list(engines)
    rng = random.Random(0)
    for r in range(warmup + rounds):
        rng.shuffle(order)
        for name in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(engines[name])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:  # per optimizer step
                times[name].append((time.perf_counter() - start) / engines[name].config.interval)

    memory = {name: memory_in_fresh_process(model_name, name, batch_size, length) for name in [PLAIN, *engines]}

    def ratio(name: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    rows = {
        name: {
            "median_s": statistics.median(times[name]),
            "vs_sam": ratio(name, "sam"),
            "vs_erm": ratio(name, "erm"),
            "peak_mb": memory[name]["peak_mb"],
            "parameter_copies": memory[name]["parameter_copies"],
        }
        for name in engines
    }
    for name, engine in engines.items():  # the adaptive policy's cost depends on how many of its steps were full
        if engine.config.policy is not None:
            state = engine.loop_state
            rows[name]["full_fraction"] = state.policy_full / max(state.policy_decided, 1)
    return {
        "parameters": sum(p.numel() for p in module.parameters()),
        "batch_size": batch_size,
        "length": length,
        "rounds": rounds,
        "device": str(device),
        "methods": rows,
        "memory_reference": memory[PLAIN],
        "times": times,
    }


TARGETS = {
    ("sam", "vs_erm"): 2.1,
    ("deltasam(head)", "vs_sam"): 1.05,
    ("deltasam(probe K=3, top)", "vs_sam"): 1.15,
    ("sam, interval=5", "vs_erm"): 1.25,
    ("sam, looksam k=5", "vs_erm"): 1.25,
    ("sam, looksam k=10", "vs_erm"): 1.15,
    ("sam, m=8", "vs_sam"): 1.25,
    ("sam, m=4", "vs_sam"): 1.5,
    ("sam, m=8 (batched)", "vs_sam"): 1.25,
    ("sam, m=4 (batched)", "vs_sam"): 1.5,
    ("per_instance", "vs_erm"): 6.0,
    ("per_instance (batched, chunk 8)", "vs_erm"): 6.0,
    ("per_instance (batched, chunk 16)", "vs_erm"): 6.0,
}
FAMILY_METHODS = [
    "gsam",
    "wsam",
    "fsam",
    "sam, gradient centralization",
    "sam, adaptive policy",
    "deltasam(head)",
    "δ-gsam(head)",
    "δ-fsam(head)",
]
"""Issue 48's SAM family: each one's step against SAM's and ERM's."""
GROUP_METHODS = [
    "sam, m=8",
    "sam, m=4",
    "sam, m=8 (batched)",
    "sam, m=4 (batched)",
    "deltasam(head), m=4",
    "deltasam(head), m=4 (batched)",
    "per_instance",
    "per_instance (batched, chunk 8)",
    "per_instance (batched, chunk 16)",
]
PRESETS = {
    # the regimes study's arms at its batch and length (benchmarks/regimes.py reads overhead_regimes.json), and
    # LookSAM's other targets (k = 10, δ-SAM(head) with k = 5)
    "regimes": dict(
        models=["minilm"],
        length=32,
        name="overhead_regimes",
        methods=[
            "deltasam(head)",
            "sam, m=8",
            "sam, m=4",
            "per_instance",
            "sam, interval=5",
            "sam, looksam k=5",
            "sam, looksam k=10",
            "deltasam(head), looksam k=5",
        ],
    ),
    # issue 37: the groups of m-sharpness and per-instance SAM, in the loop and batched (run at --length 32 and 48)
    "groups": dict(models=["minilm"], methods=GROUP_METHODS),
    # issue 48: GSAM, WSAM, Friendly-SAM, gradient centralization and the adaptive policy beside SAM and ERM
    "family": dict(models=["minilm", "small"], name="overhead_family", methods=FAMILY_METHODS),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "small"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--name", default="overhead")
    parser.add_argument("--methods", nargs="+", help="only these methods (besides ERM and SAM, the references)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="models, length, name and methods of a study")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the group methods (or the preset's) once on the small model (batch 8, length 16), to --out",
    )
    parser.add_argument("--out", type=Path, help="write the JSON here instead of docs/results/NAME.json")
    parser.add_argument("--memory-of", metavar="METHOD", help=argparse.SUPPRESS)  # one method's memory, as JSON
    parser.add_argument(
        "--profile", metavar="METHOD", help="where one step of METHOD spends its time (first of --models), as JSON"
    )
    args = parser.parse_args()
    if args.memory_of:
        print(json.dumps(memory_of(args.models[0], args.memory_of, args.batch_size, args.length)))
        return
    if args.profile:
        result = profile(args.models[0], args.profile, args.batch_size, args.length)
        slug = "".join(c if c.isalnum() else "_" for c in args.profile).strip("_")
        print(json.dumps(result, indent=1))
        print(f"wrote {save(f'profile_{slug}', {'args': vars(args), **result})}")
        return
    for k, v in PRESETS.get(args.preset, {}).items():
        setattr(args, k, v)
    if args.smoke:
        args.models, args.rounds, args.warmup, args.batch_size, args.length = ["small"], 1, 0, 8, 16
        args.methods = args.methods or GROUP_METHODS
        args.out = args.out or Path("/tmp/overhead_smoke.json")

    results = {m: measure(m, args.rounds, args.warmup, args.batch_size, args.length, args.methods) for m in args.models}
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
        "targets": {f"{k[0]} {k[1]}": v for k, v in TARGETS.items()},
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
        path = args.out
    else:
        path = save(args.name, payload)
    for model, result in results.items():
        print(
            f"\n{model} ({result['parameters'] / 1e6:.1f}M parameters, batch {args.batch_size}, length {args.length})"
        )
        print("| method | median step (s) | × SAM | × ERM | peak tensor memory (MB) | parameter copies |")
        print("|---|---|---|---|---|---|")
        for name, row in result["methods"].items():
            label = f"{name} ({row['full_fraction']:.0%} full)" if "full_fraction" in row else name
            print(
                f"| {label} | {row['median_s']:.3f} | {row['vs_sam']:.2f} | {row['vs_erm']:.2f} | "
                f"{row['peak_mb']:.0f} | {row['parameter_copies']:.2f} |"
            )
        for (name, key), target in TARGETS.items():
            if name not in result["methods"]:
                continue
            value = result["methods"][name][key]
            print(f"target {name} {key} <= {target}: {value:.3f} {'met' if value <= target else 'MISSED'}")
    if args.out is None:
        plot(results, RESULTS / f"{args.name}.png")
    print(f"wrote {path}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (model, result) in zip(axes[0], results.items()):
        names = list(result["methods"])
        ax.barh(names, [result["methods"][n]["vs_sam"] for n in names])
        ax.axvline(1.0, color="black", linestyle="--")
        ax.set_xlabel("step time / SAM step time")
        ax.set_title(f"{model}: step cost relative to SAM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
