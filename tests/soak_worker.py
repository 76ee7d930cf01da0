"""2,000 δ-SAM steps of the small encoder under 2-process CPU DDP, watching rank agreement and memory.

Run by tests/test_soak.py as ``python soak_worker.py <out> <steps>``. Every 100 steps each
rank all-gathers its flat parameters and records the largest difference between ranks,
and its resident memory; rank 0 writes ``soak.json``.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lit_deltasam import DeltaSAMConfig, DeltaSAMMixin
from lit_deltasam.models import SmallEncoder


class Soak(DeltaSAMMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = SmallEncoder(vocab_size=500, num_labels=3, dim=64, layers=2, heads=4, ffn=128, max_length=32)
        self.deltasam = DeltaSAMConfig(method="deltasam", estimator="head", histogram_every_n_steps=0)

    def per_sample_loss(self, batch):
        ids, mask, labels = batch
        return F.cross_entropy(self.encoder(ids, mask), labels, reduction="none")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Watch(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, *args):
        if trainer.global_step % 100:
            return
        flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        gathered = module.all_gather(flat)
        self.rows.append(
            {
                "step": trainer.global_step,
                "max_rank_diff": float((gathered[0] - gathered[1]).abs().max()),
                "rss_mb": rss_mb(),
            }
        )


def main(out: Path, steps: int) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, length = 4096, 16
    ids = torch.randint(1, 500, (n, length), generator=g)
    mask = (torch.arange(length) < torch.randint(4, length + 1, (n, 1), generator=g)).long()
    labels = (ids[:, 0] % 3).long()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(ids * mask, mask, labels), batch_size=16, shuffle=True
    )
    watch = Watch()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[watch],
    )
    trainer.fit(Soak(), loader)
    if trainer.global_rank == 0:
        (out / "soak.json").write_text(json.dumps(watch.rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
