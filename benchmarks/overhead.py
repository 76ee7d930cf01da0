"""Cost of one training step per method, measured side by side in one interleaved run.

Each round runs one full step (the double step and the AdamW step) of every method,
in a shuffled order, on the same batch; an amortized method (``interval=k``, with or
without LookSAM reuse) runs one whole cycle of k steps, timed per step. The report gives
median times, the ratios to SAM and to ERM (medians of per-round ratios), and the peak
memory of the step (of the cycle's full step, for an amortized method).

    python benchmarks/overhead.py                      # MiniLM and the small model, batch 32, length 48
    python benchmarks/overhead.py --models small --rounds 5
"""

from __future__ import annotations

import argparse
import ctypes
import random
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
from common import RESULTS, save

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer
from lit_deltasam.data import get_task
from lit_deltasam.models import MiniLM, Small, TextClassifier

TOP_LAYERS = {  # the last Transformer layer and everything above it
    "minilm": ["encoder.model.bert.encoder.layer.5.*", "encoder.model.bert.pooler.*", "encoder.model.classifier.*"],
    "small": ["encoder.encoder.layers.1.*", "encoder.norm.*", "encoder.classifier.*"],
}
HEAD = {  # only what sits above the last Transformer layer
    "minilm": ["encoder.model.bert.pooler.*", "encoder.model.classifier.*"],
    "small": ["encoder.norm.*", "encoder.classifier.*"],
}


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
        "deltasam(head), m=4": DeltaSAMConfig(method="deltasam", estimator="head", m_sharpness=4),
        "sam, interval=5": DeltaSAMConfig(method="sam", interval=5),
        "sam, looksam k=5": DeltaSAMConfig(method="sam", interval=5, reuse="looksam"),
        "sam, looksam k=10": DeltaSAMConfig(method="sam", interval=10, reuse="looksam"),
        "deltasam(head), looksam k=5": DeltaSAMConfig(method="deltasam", estimator="head", interval=5, reuse="looksam"),
    }


def batch_of(tokenizer, size: int, length: int, num_labels: int) -> dict[str, torch.Tensor]:
    examples = get_task("mr").load()["train"][:size]
    batch = tokenizer(
        [e["text"] for e in examples], truncation=True, max_length=length, padding="max_length", return_tensors="pt"
    )
    batch = dict(batch)
    batch["labels"] = torch.tensor([e["label"] for e in examples]) % num_labels
    return batch


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the kernel's peak-RSS counter to the current RSS, and return it."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(
    model_name: str, rounds: int, warmup: int, batch_size: int, length: int, names: Optional[list[str]] = None
) -> dict:
    spec = MiniLM() if model_name == "minilm" else Small()
    tokenizer = spec.tokenizer(lambda: (e["text"] for e in get_task("mr").load()["train"]))
    module = TextClassifier(spec.build(2, tokenizer), DeltaSAMConfig(), num_labels=2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module.to(device).train()
    batch = {k: v.to(device) for k, v in batch_of(tokenizer, batch_size, length, 2).items()}
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
    configs = methods(model_name)
    if names:
        unknown = sorted(set(names) - set(configs))
        if unknown:
            raise SystemExit(f"--methods {unknown} are not methods; choose from {sorted(configs)}")
        configs = {n: c for n, c in configs.items() if n in names or n in ("erm", "sam")}
    # every method drives the one base optimizer through the loop a user runs: schedule, interval, LookSAM
    engines = {name: DeltaSAMOptimizer(module, optimizer, cfg) for name, cfg in configs.items()}

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

    memory = {}  # the step's peak working set above the resting state (CPU: resident memory)
    for name, engine in engines.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(engine)
            memory[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            base = reset_peak_rss()
            step(engine)
            memory[name] = (peak_rss_bytes() - base) / 2**20

    def ratio(name: str, reference: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    rows = {
        name: {
            "median_s": statistics.median(times[name]),
            "vs_sam": ratio(name, "sam"),
            "vs_erm": ratio(name, "erm"),
            "peak_mb": memory[name],
        }
        for name in engines
    }
    return {
        "parameters": sum(p.numel() for p in module.parameters()),
        "batch_size": batch_size,
        "length": length,
        "rounds": rounds,
        "device": str(device),
        "methods": rows,
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
}
PRESETS = {
    # the regimes study's arms at its batch and length (benchmarks/regimes.py reads overhead_regimes.json)
    "regimes": dict(
        models=["minilm"],
        length=32,
        name="overhead_regimes",
        methods=["deltasam(head)", "sam, m=8", "sam, m=4", "per_instance", "sam, interval=5", "sam, looksam k=5"],
    ),
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
    args = parser.parse_args()
    for k, v in PRESETS.get(args.preset, {}).items():
        setattr(args, k, v)

    results = {m: measure(m, args.rounds, args.warmup, args.batch_size, args.length, args.methods) for m in args.models}
    path = save(
        args.name,
        {"args": vars(args), "results": results, "targets": {f"{k[0]} {k[1]}": v for k, v in TARGETS.items()}},
    )
    for model, result in results.items():
        print(
            f"\n{model} ({result['parameters'] / 1e6:.1f}M parameters, batch {args.batch_size}, length {args.length})"
        )
        print("| method | median step (s) | × SAM | × ERM | peak extra memory (MB) |")
        print("|---|---|---|---|---|")
        for name, row in result["methods"].items():
            print(
                f"| {name} | {row['median_s']:.3f} | {row['vs_sam']:.2f} | {row['vs_erm']:.2f} | {row['peak_mb']:.0f} |"
            )
        for (name, key), target in TARGETS.items():
            if name not in result["methods"]:
                continue
            value = result["methods"][name][key]
            print(f"target {name} {key} <= {target}: {value:.3f} {'met' if value <= target else 'MISSED'}")
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
