"""Raw DistributedDataParallel (no Lightning), 2 gloo processes: one DeltaSAM step per micro-batch, recorded per rank.

Usage: python raw_ddp_worker.py '<json args>' with ``out``, ``config``, ``sizes`` (per-rank batch sizes),
``micro`` (micro-batches; the descent is synchronized on the last only), ``lr`` and optionally ``static_graph``;
or ``jobs``, a list of such args (each with its own ``out``), run one after another in the same two processes; a
job with ``refused`` is expected to raise a ValueError on every rank, written to ``refused<rank>.txt``.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import MLP, classification_data
from torch.nn.parallel import DistributedDataParallel

from lit_deltasam import DeltaSAM, DeltaSAMConfig


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def worker(rank: int, args: dict) -> None:
    # a file rendezvous in the test's own folder: no port to race for with other runs on the machine
    store = Path(args["out"]) / "rendezvous"
    dist.init_process_group("gloo", init_method=store.absolute().as_uri(), rank=rank, world_size=2)
    for job in args.get("jobs", [args]):  # several runs in one launch, each under its own ``out``
        try:
            run(rank, job)
        except ValueError as error:  # a run expected to be refused (on every rank) writes why, and the next runs
            if not job.get("refused"):
                raise
            (Path(job["out"]) / f"refused{rank}.txt").write_text(f"{type(error).__name__}: {error}")
        dist.barrier()
    # Twice in about ten suite runs a rank hung in gloo's teardown after both ranks had saved their
    # records (a 300 s timeout with rank0.pt and rank1.pt written); the records are complete, so skip it.
    os._exit(0)


def run(rank: int, args: dict) -> None:
    torch.manual_seed(0)
    model = MLP()
    ddp = DistributedDataParallel(model, static_graph=args.get("static_graph", False))
    engine = DeltaSAM(model, DeltaSAMConfig(**args["config"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=args["lr"])
    seen = []

    def losses(batch):
        seen.append(flat(model.parameters()))
        x, y = batch
        return torch.nn.functional.cross_entropy(ddp(x), y, reduction="none")

    records = []
    micro = args.get("micro", 1)
    for i in range(micro):
        x, y = classification_data(n=args["sizes"][rank], seed=10 * i + rank + 1)
        seen.clear()
        w = flat(model.parameters())
        engine.step(losses, (x, y), no_sync=ddp.no_sync, sync_descent=i == micro - 1)
        records.append(
            {"w": w, "eps": seen[-1] - seen[0], "grad": flat(p.grad for p in model.parameters()), "x": x, "y": y}
        )
    optimizer.step()
    torch.save({"records": records, "params": flat(model.parameters())}, Path(args["out"]) / f"rank{rank}.pt")


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    mp.spawn(worker, args=(args,), nprocs=2, join=True)
