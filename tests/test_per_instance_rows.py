"""Per-instance SAM's loop on an embedding table: only the rows an instance touches are perturbed, restored and
accumulated, and the result equals a dense per-instance computation written out here."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lit_deltasam import DeltaSAM, DeltaSAMConfig
from lit_deltasam.core.decisions import decisions_on_device

RHO = 0.05


class Bag(nn.Module):
    """Mean of token embeddings (padding id 0), then a linear classifier."""

    def __init__(self, vocab: int = 40, dim: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.out = nn.Linear(dim, classes)

    def forward(self, ids):
        return self.out(self.embed(ids).mean(1))

    def losses(self, batch):
        ids, y = batch
        return F.cross_entropy(self(ids), y, reduction="none")


def data(n: int = 6, length: int = 7, vocab: int = 40):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 12, (n, length), generator=g)  # few ids: tokens repeat within an instance
    ids[:, -2:] = 0  # padding
    return ids, torch.randint(0, 3, (n,), generator=g)


def reference(model: nn.Module, batch, rho: float):
    """G = mean_i grad l_i(w + rho g_i / ||g_i||), dense, one instance at a time."""
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = []
    for i in range(batch[0].shape[0]):
        one = (batch[0][i : i + 1], batch[1][i : i + 1])
        grads = torch.autograd.grad(model.losses(one)[0], list(params.values()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        norms.append(norm)
        moved = {k: p.detach() + rho * g / norm for (k, p), g in zip(params.items(), grads)}
        moved = {k: v.requires_grad_() for k, v in moved.items()}
        loss = functional_call(model, moved, (one[0],))
        loss = F.cross_entropy(loss, one[1])
        for k, g in zip(moved, torch.autograd.grad(loss, list(moved.values()))):
            total[k] += g / batch[0].shape[0]
    return total, torch.stack(norms)


@pytest.mark.parametrize("on_device", [False, True])
def test_per_instance_sam_on_embedding_rows_equals_the_dense_computation(on_device):
    torch.manual_seed(0)
    model = Bag().double()
    batch = data()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    expected, _ = reference(model, batch, RHO)
    seen = []
    model.embed.weight.register_hook(lambda g: seen.append(g.is_sparse))
    with decisions_on_device(on_device):
        DeltaSAM(model, DeltaSAMConfig(method="per_instance", rho=RHO, rho_schedule="constant")).step(
            model.losses, batch
        )
    # each instance's two gradients came back as rows (on the host path); the last is G through the caller's backward
    assert seen == [not on_device] * (2 * batch[0].shape[0]) + [False]
    assert model.embed.sparse is False  # the layer's own setting is back
    for k, p in model.named_parameters():
        assert torch.equal(p.detach(), before[k]), k  # restored exactly, rows and the rest
        # the device path rounds rho / ||g_i|| to float32 (decisions.scale_or_zero)
        torch.testing.assert_close(p.grad, expected[k], atol=1e-9 if on_device else 1e-13, rtol=0)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[batch[0].unique()] = False
    assert torch.equal(model.embed.weight.grad[untouched], torch.zeros_like(model.embed.weight.grad[untouched]))


def test_exact_scores_on_embedding_rows_equal_the_dense_norms():
    torch.manual_seed(0)
    model = Bag().double()
    batch = data()
    _, norms = reference(model, batch, RHO)
    engine = DeltaSAM(model, DeltaSAMConfig(method="deltasam", estimator="exact", rho=RHO, rho_schedule="constant"))
    scores = engine.parts.instances.grad_norms(model.losses, batch)
    torch.testing.assert_close(scores, norms, atol=1e-13, rtol=0)


def test_a_failing_perturbed_forward_restores_every_row():
    torch.manual_seed(0)
    model = Bag().double()
    batch = data()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def failing(b):
        calls.append(1)
        if len(calls) == 4:  # the second instance's perturbed forward
            raise RuntimeError("injected")
        return model.losses(b)

    engine = DeltaSAM(model, DeltaSAMConfig(method="per_instance", rho=RHO, rho_schedule="constant"))
    with pytest.raises(RuntimeError, match="injected"):
        engine.step(failing, batch)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)
    assert model.embed.sparse is False


@pytest.mark.slow
def test_minilm_per_instance_correction_on_rows_equals_the_dense_one():
    """The claim-(a) oracle on MiniLM (eval mode, batch 8, length 16): the sharpness correction C = G - ḡ of
    per-instance SAM with the embedding rows equals the dense computation's to float32 rounding."""
    from benchmarks.perf.overhead import setup

    torch.manual_seed(0)
    module, batch, _, _ = setup("minilm", 8, 16)
    module.eval()
    corrections = []
    for rows in (True, False):
        engine = DeltaSAM(module, DeltaSAMConfig(method="per_instance", rho=0.05, rho_schedule="constant"))
        if not rows:
            engine.parts.instances.rows.layers = []
        module.zero_grad(set_to_none=True)
        result = engine.step(module.per_sample_loss, batch, plain_grad=True)
        g = torch.cat([p.grad.reshape(-1) for p in engine.params])
        corrections.append(g - torch.cat([p.reshape(-1) for p in result.plain_grad]))
    rows, dense = corrections
    assert ((rows - dense).norm() / dense.norm()).item() < 1e-4
    assert torch.nn.functional.cosine_similarity(rows, dense, dim=0).item() > 1 - 1e-6
