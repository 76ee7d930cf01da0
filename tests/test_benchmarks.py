"""The flatness measures behind the generalization study, against closed forms on least squares."""

import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
runs = pytest.importorskip("runs")


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
