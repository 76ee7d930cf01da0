"""How stale does LookSAM's reused direction get? cos(g_v(t - k), g_v(t)) along a real fine-tuning run.

MiniLM is fine-tuned on mr with SAM (AdamW 5e-5, linear warm-up over 10% then decay,
batch 32, length 32). At every step the direction LookSAM would store, the part of the
sharpness-aware gradient orthogonal to the plain gradient, ``g_v``, is computed; the
report gives, for each lag k, the mean cosine between ``g_v`` and the one k steps
earlier. Between two full steps at interval k, the reused direction is 1 to k - 1 steps
old, so the mean over lags 1..k-1 is what LookSAM with interval k works with.

    python -m benchmarks.perf.staleness                   # 200 steps, lags 1-10, ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import statistics
from collections import deque

import lightning as L
import torch
from transformers import get_linear_schedule_with_warmup

from benchmarks.lab.common import ROOT, compose_config, save
from benchmarks.lab.runs import legacy_optim
from lit_deltasam import DeltaSAM, DeltaSAMConfig
from lit_deltasam.app import assemble
from lit_deltasam.core.amortized import Reuse
from lit_deltasam.core.diagnostics import cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lags", type=int, default=10)
    parser.add_argument("--rho", type=float, default=DeltaSAMConfig().rho, help="constant ρ (default: the shipped ρ)")
    parser.add_argument("--task", default="mr")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    L.seed_everything(args.seed)
    out = ROOT / "outputs" / "benchmarks" / "staleness"
    pinned = legacy_optim()  # the committed staleness.json ran at it
    cfg = compose_config(
        [f"task={args.task}", f"model={args.model}", "data.max_length=32", "logger=none", *pinned], out
    )
    datamodule, module = assemble.build(cfg)
    datamodule.setup("fit")
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.1 * args.steps), args.steps)
    engine = DeltaSAM(module, DeltaSAMConfig(method="sam", rho=args.rho, rho_schedule="constant"), params)
    history: deque[list[torch.Tensor]] = deque(maxlen=args.lags)
    cosines: dict[int, list[float]] = {k: [] for k in range(1, args.lags + 1)}
    step = 0
    while step < args.steps:
        for batch in datamodule.train_dataloader():
            result = engine.step(module.per_sample_loss, batch, plain_grad=True)
            reuse = Reuse(alpha=1.0)
            reuse.record([p.grad for p in params], result.plain_grad)
            fresh = reuse.direction
            for k, old in enumerate(reversed(history), start=1):
                cosines[k].append(cosine(old, fresh).item())
            history.append(fresh)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % 20 == 0:
                print(f"step {step}: lag 1 {statistics.mean(cosines[1][-20:]):.3f}", flush=True)
            if step >= args.steps:
                break

    lag = {k: statistics.mean(v) for k, v in cosines.items() if v}
    rows = ["| k (interval) | cos at lag k | mean cos over lags 1..k-1 |", "|---|---|---|"]
    for k in range(2, args.lags + 1):
        within = statistics.mean(lag[j] for j in range(1, k))
        rows.append(f"| {k} | {lag[k]:.3f} | {within:.3f} |")
    table = "\n".join(rows) + "\n"
    path = save("staleness", {"args": vars(args), "cos_by_lag": lag, "table": table})
    plot(lag, path.with_suffix(".png"))
    print(table)
    print(f"wrote {path}")


def plot(lag: dict[int, float], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(list(lag), list(lag.values()), marker="o")
    ax.set_xlabel("lag k (optimizer steps)")
    ax.set_ylabel("mean cos(g_v(t − k), g_v(t))")
    ax.set_title("LookSAM: how stale the reused direction gets")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
