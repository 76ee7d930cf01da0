"""Pictures of flatness: filter-normalized slices against a quadratic's closed form, deflated eigenvalues against
the spectrum, and landscape.py on a small model's checkpoints."""

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_deltasam.app import schema
from lit_deltasam.core.diagnostics import top_hessian_eigenvalues
from lit_deltasam.core.landscape import filter_normalized, random_directions, surface

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class Quadratic(nn.Module):
    """L(W, b) = ½ Σ a (W − W*)² + ½ Σ (b − b*)²: the Hessian is diagonal with entries a (and 1 for b)."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3, 4, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.a = torch.rand(3, 4, generator=g, dtype=torch.float64) * 5
        self.w_star = torch.randn(3, 4, generator=g, dtype=torch.float64)
        self.b_star = torch.randn(3, generator=g, dtype=torch.float64)

    def losses(self, batch=None):
        value = 0.5 * (self.a * (self.w - self.w_star) ** 2).sum() + 0.5 * ((self.b - self.b_star) ** 2).sum()
        return value.reshape(1)


def test_the_slice_is_the_quadratics_parabola():
    model = Quadratic()
    params = list(model.parameters())
    (d,) = [filter_normalized(direction, params) for direction in random_directions(params, 1, seed=3)]
    w0 = model.w.detach().clone()
    axis = torch.linspace(-1, 1, 9).tolist()
    got = surface(params, [d], [(x,) for x in axis], lambda: {"loss": model.losses().item()})
    g = model.a * (w0 - model.w_star)
    at_w = model.losses().item()
    for x, point in zip(axis, got):
        expected = at_w + x * (g * d[0]).sum() + 0.5 * x**2 * (model.a * d[0] ** 2).sum()
        assert point["loss"] == pytest.approx(expected.item(), rel=1e-12)
    assert torch.equal(model.w.detach(), w0)
    assert torch.equal(d[1], torch.zeros(3, dtype=torch.float64))  # a bias gets no component


def test_filter_normalization_gives_each_row_its_weights_norm():
    model = Quadratic()
    params = list(model.parameters())
    (d,) = [filter_normalized(direction, params) for direction in random_directions(params, 1, seed=0)]
    torch.testing.assert_close(d[0].norm(dim=1), model.w.detach().norm(dim=1))
    again = filter_normalized(random_directions(params, 1, seed=0)[0], params)
    assert torch.equal(again[0], d[0])


def test_deflated_power_iteration_finds_the_largest_eigenvalues():
    model = Quadratic()
    got = top_hessian_eigenvalues(
        model, model.losses, None, k=3, iters=500, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    spectrum = sorted(torch.cat([model.a.reshape(-1), torch.ones(3, dtype=torch.float64)]).tolist(), reverse=True)
    assert got == pytest.approx(spectrum[:3], rel=1e-4)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from train import train

    folder = tmp_path_factory.mktemp("landscape_run")
    train(schema.compose(ROOT / "conf", ["model=small", "debug=fast", "logger=none"], folder))
    return folder / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("dims, points", [(1, 5), (2, 3)])
def test_landscape_py_on_two_checkpoints(small_checkpoint, dims, points, tmp_path, capsys):
    from landscape import landscape

    overrides = [f"ckpt_paths=[{small_checkpoint},{small_checkpoint}]", "labels=[a,b]", f"dims={dims}"]
    overrides += [f"points={points}", "samples=40", "hessian_k=2", "hessian_iters=3", f"output_dir={tmp_path}"]
    out = landscape(schema.compose(ROOT / "conf", overrides, tmp_path, "landscape"))
    total = 2 * points**dims  # stdout is no terminal here: progress comes as lines, the last at every point done
    assert f"loss landscape: {total}/{total} points" in capsys.readouterr().out
    saved = json.loads((tmp_path / "landscape.json").read_text())
    assert (tmp_path / "landscape.png").stat().st_size > 0
    assert set(saved["checkpoints"]) == {"a", "b"} and saved == json.loads(json.dumps(out))
    a, b = saved["checkpoints"]["a"], saved["checkpoints"]["b"]
    assert len(a["loss"]) == points**dims and a["loss"] == b["loss"]  # the same directions for every checkpoint
    assert a["samples"] == 40 and len(a["hessian_top"]) == 2 and all(0 <= x <= 1 for x in a["acc"])
    centre = a["loss"][points**dims // 2]
    assert centre < max(a["loss"])


def test_landscape_py_refuses_bad_options(small_checkpoint, tmp_path):
    from landscape import landscape

    for option, message in (("dims=3", "dims=3 is not valid"), ("split=dev", "split='dev' is not valid")):
        cfg = schema.compose(ROOT / "conf", [f"ckpt_paths=[{small_checkpoint}]", option], tmp_path, "landscape")
        with pytest.raises(ValueError, match=message):
            landscape(cfg)


def test_the_eigenvalues_come_largest_magnitude_first(small_checkpoint, tmp_path, monkeypatch, capsys):
    """Deflation after a few power iterations can return them out of order, as [4.9, 1.4, -2.0]."""
    import landscape as script

    monkeypatch.setattr(script, "top_hessian_eigenvalues", lambda *args, **kwargs: [4.9, 1.4, -2.0])
    overrides = [f"ckpt_paths=[{small_checkpoint}]", "points=3", "samples=8", f"output_dir={tmp_path}"]
    out = script.landscape(schema.compose(ROOT / "conf", overrides, tmp_path, "landscape"))
    (result,) = out["checkpoints"].values()
    assert result["hessian_top"] == [4.9, -2.0, 1.4]
    assert "largest-magnitude Hessian eigenvalues [4.9, -2, 1.4]" in capsys.readouterr().out


def test_lambda_labels_keep_the_digits_that_tell_them_apart():
    from landscape import significant

    assert significant([4.9, 4.6]) == ["4.9", "4.6"]  # rounded to integers both read 5
    assert significant([117.3, 111.0]) == ["117", "111"]
    assert significant([4.91, 4.94, 4.91]) == ["4.91", "4.94", "4.91"]
    assert significant([0.01234, -2.5]) == ["0.012", "-2.5"]


@pytest.mark.parametrize("dims", [1, 2])
def test_the_plot_marks_the_checkpoint_and_names_each_lambda(dims, tmp_path):
    from landscape import plot

    axis = [-1.0, 0.0, 1.0]
    n = len(axis) ** dims
    result = {"axis": axis, "dims": dims, "split": "validation"}
    result["checkpoints"] = {
        label: {"loss": [float(i % 4) for i in range(n)], "acc": [0.5] * n, "hessian_top": [lam, 1.0]}
        for label, lam in (("ERM", 4.9), ("SAM", 4.6))
    }
    figure = plot(result, tmp_path / "landscape.png")
    assert (tmp_path / "landscape.png").stat().st_size > 0
    for ax in figure.axes[: 2 if dims == 1 else 2]:
        marks = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()]
        if dims == 1:  # a vertical line at α = 0, and the legend's λ to one decimal
            assert ([0.0, 0.0], [0, 1]) in marks
            assert [t.get_text() for t in ax.get_legend().get_texts()][1:] == ["ERM (λ 4.9)", "SAM (λ 4.6)"]
        else:
            assert ([0.0], [0.0]) in marks
