"""Per-instance SAM (loop and vmap) against ERM with one checkout's engine: for timing two checkouts side by side.

Each call times ERM, per-instance SAM with ``per_instance_impl="loop"`` and with ``"vmap"``
(``share_dropout=False``, which vmap needs with dropout on), interleaved in one process,
on MiniLM with a batch of 32 mr reviews padded to ``length``; it prints one JSON line with
the median step times and the medians of per-round ratios to ERM. Alternate checkouts on
an idle machine (the 2026-12-02 run: docs/results/per_instance_side_by_side.jsonl)::

    git worktree add /tmp/old c5cf503
    for L in 32 48; do for i in 1 2; do for root in /tmp/old .; do
        PYTHONPATH=$root python benchmarks/perf/side_by_side.py 3 $L >> docs/results/per_instance_side_by_side.jsonl
    done; done; done

It imports nothing of the benchmarks, only ``lit_deltasam``: the copy ``PYTHONPATH`` names is the one timed.
(The 2026-12-02 rows were made by the earlier form, ``python benchmarks/side_by_side.py $root 3 $L``.)
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import lit_deltasam
from lit_deltasam import DeltaSAM, DeltaSAMConfig
from lit_deltasam.data import get_task
from lit_deltasam.models import MiniLM, TextClassifier

ROUNDS, LENGTH = int(sys.argv[1]), int(sys.argv[2])
ROOT = str(Path(lit_deltasam.__file__).resolve().parents[1])  # the checkout under test


def main() -> None:
    spec = MiniLM()
    tokenizer = spec.tokenizer(lambda: (e["text"] for e in get_task("mr").load()["train"]))
    module = TextClassifier(spec.build(2, tokenizer), DeltaSAMConfig(), num_labels=2).train()
    examples = get_task("mr").load()["train"][:32]
    texts = [e["text"] for e in examples]
    batch = dict(tokenizer(texts, truncation=True, max_length=LENGTH, padding="max_length", return_tensors="pt"))
    batch["labels"] = torch.tensor([e["label"] for e in examples])
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, fused=True)
    configs = {
        "erm": DeltaSAMConfig(method="erm"),
        "loop": DeltaSAMConfig(method="per_instance", per_instance_impl="loop"),
        "vmap": DeltaSAMConfig(method="per_instance", per_instance_impl="vmap", share_dropout=False),
    }
    engines = {name: DeltaSAM(module, config, list(module.parameters())) for name, config in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(ROUNDS + 1):  # the first round warms up
        for name, engine in engines.items():
            start = time.perf_counter()
            engine.step(module.per_sample_loss, batch)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if r:
                times[name].append(time.perf_counter() - start)
    out: dict = {"root": ROOT, "length": LENGTH, "threads": torch.get_num_threads(), "failed": {}}
    for name, values in times.items():
        out[name] = statistics.median(values)
        out[f"{name}_x_erm"] = statistics.median(a / b for a, b in zip(values, times["erm"]))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
