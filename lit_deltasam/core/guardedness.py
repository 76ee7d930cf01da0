"""Guardedness estimators: scores s_i that estimate the per-instance gradient norms ||g_i||.

An instance with a small ``||g_i||`` is *unguarded* under SAM: the batch perturbation,
dominated by large gradients, hardly raises its loss. δ-SAM up-weights it through
``lambda_i ∝ s_i ** beta``. Cheapest first:

* :class:`HeadTap` (``head``): the exact per-instance gradient norm of the final
  linear layer ``z = W h + b``, ``||dl_i/dz_i|| * sqrt(||h_i||² + 1)``, from the forward.
* :class:`Prober` (``probe``): ``s_i ∝ sqrt(mean_k (l_i(w + u_k) - l_i(w))²)`` over K
  random Gaussian perturbations ``u_k`` with ``E||u_k||² = sigma²``, since
  ``E[(g_i·u)²] = sigma² ||g_i||² / d``.
* :class:`Prober` with ``curvature`` (``curvature``): the second difference along
  antithetic pairs, ``s_i = mean_k (l_i(w + u_k) + l_i(w - u_k) - 2 l_i(w)) / 2``, which is
  ``mean_k u_kᵀ H_i u_k / 2`` for a quadratic loss: the other reading of "instances with
  larger gradient changes are up-weighted". It can be negative.
* ``exact``: :meth:`lit_deltasam.core.per_instance.PerInstance.grad_norms`.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .batch import Batch, LossFn, check_losses
from .randomness import RandomState
from .sharding import local


def find_head(module: nn.Module, path: Optional[str]) -> tuple[str, Optional[nn.Linear]]:
    """The final linear layer at ``path``; with none, ``(name, None)``: HeadTap takes the last one called."""
    if path is not None:
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            linears = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
            raise ValueError(f"head={path!r} names no submodule; the linear layers are {linears}") from None
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"head={path!r} is a {type(layer).__name__}; the head estimator needs an nn.Linear")
        return path, layer
    if not any(isinstance(m, nn.Linear) for m in module.modules()):
        raise ValueError(
            f"estimator='head' needs a final nn.Linear layer and {type(module).__name__} has none; "
            "use estimator='probe' or 'exact'"
        )
    return "", None


_NO_CALL = (
    "estimator='head' saw no nn.Linear run in the forward: its forward hooks did not fire. Inside a "
    "torch.compile'd module they never do; compile the body and leave the classifier eager (e.g. "
    "model.encoder = torch.compile(model.encoder)), or use estimator='probe' or 'exact'"
)

# fp16 keeps about 3 significant digits and flushes below 6e-8: the head's output gradients are computed
# at this scale, inside fp16's range while they stay below 16 in magnitude (cross-entropy's are at most 1)
_FP16_GRAD_SCALE = 4096.0


class HeadTap:
    """Captures the final linear layer's input and output during one forward.

    Use as a context manager around the clean forward, then call :meth:`scores`
    before the graph is freed by the backward. Without a given layer, the first forward
    watches every ``nn.Linear`` of ``module`` and :meth:`_detect` chooses the head.
    """

    def __init__(self, name: str, layer: Optional[nn.Linear], module: Optional[nn.Module] = None) -> None:
        self.name = name
        self.layer = layer
        self._module = module
        self._handles: list[Any] = []
        self._calls = 0
        self._order: list[tuple[str, nn.Linear, Tensor, Tensor]] = []
        self._input: Optional[Tensor] = None
        self._output: Optional[Tensor] = None
        self._checked = False
        self._deferred = False

    def __enter__(self) -> HeadTap:
        self._calls, self._input, self._output, self._order = 0, None, None, []
        if self.layer is not None:
            self._handles = [self.layer.register_forward_hook(self._hook, with_kwargs=True)]
        else:
            assert self._module is not None
            self._handles = [
                m.register_forward_hook(self._watch(name, m), with_kwargs=True)
                for name, m in self._module.named_modules()
                if isinstance(m, nn.Linear)
            ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _watch(self, name: str, layer: nn.Linear) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
            self._order.append((name, layer, _linear_input(args, kwargs).detach(), output))

        return hook

    def _detect(self, losses: Tensor) -> bool:
        """Take as the head the last ``nn.Linear`` called whose ``[n, C]`` output reaches the loss; return whether
        this batch could tell.

        A layer called after it whose output does not reach the loss (an auxiliary projection)
        is passed over; two such layers of which neither feeds the other (parallel heads) are
        ambiguous, and ``head=`` must choose. A batch whose losses are not finite, or whose gradient is zero or
        not finite at every layer that the loss reaches (every label ignored, every margin met), tells nothing:
        the head is detected on a later batch.
        """
        n = losses.shape[0]
        calls, self._order = self._order, []
        rows = [c for c in calls if c[3].ndim == 2 and c[3].shape[0] == n and c[3].requires_grad]
        if not calls:
            raise RuntimeError(_NO_CALL)
        grads = torch.autograd.grad(losses.sum(), [c[3] for c in rows], retain_graph=True, allow_unused=True)
        finite = bool(torch.isfinite(losses).all())
        reaching = [c for c, g in zip(rows, grads) if g is not None and finite and _informative(g)]
        if not reaching and any(g is not None for g in grads):
            return False
        if not reaching:
            names = sorted({c[0] for c in calls})
            raise ValueError(
                f"estimator='head' found no nn.Linear whose [n, C] output reaches the loss (called: {names}); set "
                "DeltaSAMConfig.head to the classifier layer, or use estimator='probe' or 'exact'"
            )
        name, layer, h, z = reaching[-1]
        others = [c for c in reaching if c[1] is not layer]
        if others:
            feeds = torch.autograd.grad(z.sum(), [c[3] for c in others], retain_graph=True, allow_unused=True)
            parallel = sorted({c[0] for c, d in zip(others, feeds) if d is None})
            if parallel:
                raise ValueError(
                    f"estimator='head' cannot tell the classifier layer: the outputs of {sorted(parallel + [name])}"
                    " all reach the loss and none feeds the other; set DeltaSAMConfig.head to one of them"
                )
        self.name, self.layer = name, layer
        self._calls = sum(c[1] is layer for c in calls)
        self._input, self._output = h, z
        return True

    def _hook(self, layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> None:
        self._calls += 1
        if self._calls == 1:
            self._input, self._output = _linear_input(args, kwargs).detach(), output

    def scores(self, losses: Tensor) -> Tensor:
        """``[n]`` per-instance gradient norms of the head's weight and bias; equal scores (every instance weighs
        the same, SAM's step) on a batch that cannot tell the head, before it is detected."""
        try:
            if self.layer is None and not self._detect(losses):
                self._warn_of_deferral(losses)
                return torch.ones_like(losses, dtype=torch.float32)
            scores, dz = self._scores(losses)
            # a batch whose loss gradient is zero or not finite at the head (every label ignored) tells nothing
            # about the layer: the check waits for one that does (and reads nothing from the device after it)
            if not self._checked and (dz is None or (bool(torch.isfinite(losses).all()) and _informative(dz))):
                self._checked = True
                self._warn_if_uninformative(scores, dz is None)
            return scores
        finally:
            self._input, self._output, self._order = None, None, []  # the forward's graph is not kept past the step

    def _warn_of_deferral(self, losses: Tensor) -> None:
        """Once: this batch could not tell the head layer, and its step is SAM's."""
        if self._deferred:
            return
        self._deferred = True
        finite = bool(torch.isfinite(losses).all())
        why = "the loss gradient is zero or not finite at every nn.Linear" if finite else "the losses are not finite"
        warnings.warn(
            f"estimator='head' cannot tell the classifier layer from this batch ({why}): this "
            "step weighs every instance the same (SAM's step), and the head is detected on the next batch with a "
            "gradient (set DeltaSAMConfig.head to skip the detection)",
            RuntimeWarning,
            stacklevel=6,
        )

    def _warn_if_uninformative(self, scores: Tensor, unreached: bool) -> None:
        """Once, on the first batch with a loss gradient at the head: scores that are all zero or all equal make
        δ-SAM a plain SAM step."""
        if scores.numel() > 1 and bool((scores.max() - scores.min()) <= 1e-6 * scores.abs().max()):
            why = "all zero: its output does not reach the loss" if unreached else "all equal"
            warnings.warn(
                f"the head estimator's scores from layer {self.name!r} are {why}, so every instance weighs the same "
                "and δ-SAM takes SAM's step; set DeltaSAMConfig.head to the classifier layer",
                RuntimeWarning,
                stacklevel=6,
            )

    def _scores(self, losses: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The scores, and the loss gradient at the head's output (``None``: the output does not reach the loss)."""
        n = losses.shape[0]
        if self._calls == 0:
            raise RuntimeError(_NO_CALL)
        if self._calls != 1:
            raise RuntimeError(
                f"head layer {self.name!r} ran {self._calls} times in one forward; the head estimator needs exactly "
                "one call per forward (set DeltaSAMConfig.head to the classifier layer)"
            )
        z, h = self._output, self._input
        assert z is not None and h is not None and self.layer is not None
        if z.ndim != 2 or h.ndim != 2 or z.shape[0] != n:
            raise ValueError(
                f"head layer {self.name!r} maps {list(h.shape)} to {list(z.shape)}; the head estimator needs one "
                f"row per instance, [{n}, D] -> [{n}, C] (set DeltaSAMConfig.head to the classifier layer)"
            )
        if not z.requires_grad:
            raise ValueError(f"head layer {self.name!r} produced an output without gradient; is it frozen?")
        scale = _FP16_GRAD_SCALE if z.dtype == torch.float16 else 1.0
        (dz,) = torch.autograd.grad(losses.sum() * scale, z, retain_graph=True, allow_unused=True)
        if dz is None:  # the layer's output does not reach the loss
            return torch.zeros(n, device=z.device), None
        if scale != 1.0 and not torch.isfinite(dz).all():  # gradients too large for the scale: take them as they are
            scale = 1.0
            (dz,) = torch.autograd.grad(losses.sum(), z, retain_graph=True)
        bias = 1.0 if self.layer.bias is not None else 0.0
        return dz.float().norm(dim=1) / scale * (h.float().pow(2).sum(dim=1) + bias).sqrt(), dz


def _informative(grad: Tensor) -> bool:
    """A layer output's gradient that shows the layer reaches the loss: finite and not all zero."""
    return bool(torch.isfinite(grad).all() & (grad != 0).any())


def _linear_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["input"]


def select_params(names: Sequence[str], patterns: Optional[Sequence[str]]) -> list[int]:
    """Indices of the names matched by any ``fnmatch`` pattern (all of them for ``None``)."""
    if patterns is None:
        return list(range(len(names)))
    chosen = [i for i, name in enumerate(names) if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(f"probe_params={list(patterns)} match no parameter; the names are: {shown}")
    return chosen


class ForwardCache:
    """Lets the probe forwards start at the first probed layer instead of the input.

    Perturbing only the top layers leaves everything computed before them unchanged.
    During the clean forward, :meth:`record` keeps the output of every maximal submodule
    that holds no probed parameter, runs once, and finishes before the first module
    holding a probed parameter starts; during a probe, :meth:`reuse` makes those
    submodules return the kept output instead of running. With ``replay_random`` the
    random state at the cut is kept too, so the dropout masks replayed downstream are
    the clean forward's.

    Truncation is skipped for a step whenever it could be wrong: a module holding a
    probed parameter did not run as a module (its parameter was used directly, other than
    by a parent that holds probed parameters too), or a kept output was modified in place
    after its module returned.
    """

    def __init__(self, module: nn.Module, probed: Sequence[Tensor], replay_random: bool) -> None:
        ids = {id(p) for p in probed}
        self._probed = list(probed)
        self.replay_random = replay_random
        self.owners = [m for m in module.modules() if any(id(p) in ids for p in m._parameters.values())]
        owner_ids = {id(m) for m in self.owners}
        # a parent owner may use its children's parameters without calling them (nn.MultiheadAttention's out_proj)
        self._parent_owner = {
            id(child): id(parent) for parent in self.owners for child in parent.children() if id(child) in owner_ids
        }
        self.candidates: list[nn.Module] = []

        def visit(parent: nn.Module) -> None:
            for child in parent.children():
                # containers are never called themselves: their members are the candidates
                if any(id(p) in ids for p in child.parameters()) or isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                    visit(child)
                else:
                    self.candidates.append(child)

        visit(module)
        self._kept: list[tuple[nn.Module, Any]] = []
        self._state: Optional[RandomState] = None

    @contextmanager
    def record(self) -> Iterator[None]:
        calls: dict[int, int] = {}
        exits: list[tuple[nn.Module, Any, list[int], Optional[RandomState]]] = []
        entered: set[int] = set()

        def on_exit(layer: nn.Module, args: Any, output: Any) -> None:
            calls[id(layer)] = calls.get(id(layer), 0) + 1
            if not entered:
                state = None
                if self.replay_random:
                    state = RandomState(self._probed[0].device)
                    state.capture()
                exits.append((layer, output, _versions(output), state))

        def on_owner(layer: nn.Module, args: Any) -> None:
            entered.add(id(layer))

        handles = [m.register_forward_hook(on_exit) for m in self.candidates]
        handles += [m.register_forward_pre_hook(on_owner) for m in self.owners]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        kept = [(layer, output, versions, state) for layer, output, versions, state in exits if calls[id(layer)] == 1]
        skipped = [m for m in self.owners if id(m) not in entered and self._parent_owner.get(id(m)) not in entered]
        unsafe = bool(skipped) or any(_versions(o) != v for _, o, v, _ in kept)
        self._kept = [] if unsafe else [(layer, output) for layer, output, _, _ in kept]
        self._state = kept[-1][3] if kept and not unsafe else None

    @contextmanager
    def reuse(self) -> Iterator[None]:
        last = len(self._kept) - 1
        # a forward already patched on the instance (accelerate's hooks, say) comes back afterwards
        patched = [layer.__dict__.get("forward") for layer, _ in self._kept]
        for i, (layer, output) in enumerate(self._kept):
            layer.forward = self._replay(output, self._state if i == last else None)
        try:
            yield
        finally:
            for (layer, _), previous in zip(self._kept, patched):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    def clear(self) -> None:
        self._kept, self._state = [], None

    @staticmethod
    def _replay(output: Any, state: Optional[RandomState]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if state is not None:
                state.restore()
            return output

        return forward


def _versions(output: Any) -> list[int]:
    """Autograd version counters of the tensors in a module's output (they change on in-place writes)."""
    leaves, _ = tree_flatten(output)
    return [leaf._version for leaf in leaves if isinstance(leaf, Tensor)]


class Prober:
    """Scores from K no-grad forwards at random Gaussian perturbations of a parameter subset.

    The RMS first difference by default (``probe``), the mean second difference with
    ``curvature`` (``curvature``).

    The noise is drawn into one flat buffer per (device, dtype), reused across steps,
    and added with a single ``foreach`` call; the parameters are restored by copying
    back. The probes run while the clean forward's graph is alive, so they write
    through ``.data`` (the local shard of a sharded parameter), which leaves autograd's
    version counters alone. With a :class:`ForwardCache` the probe forwards start at
    the first probed layer.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        samples: int,
        sigma: float,
        antithetic: bool,
        cache: Optional[ForwardCache] = None,
        curvature: bool = False,
    ) -> None:
        if curvature and not antithetic:
            raise ValueError("the curvature scores need antithetic probes")
        self.cache = cache
        self.curvature = curvature
        self.scale = sigma / math.sqrt(sum(p.numel() for p in params))  # numel counts every shard
        self.params = list(params)
        self.samples = samples
        self.antithetic = antithetic
        self._flats: list[Tensor] = []
        self._views: list[Tensor] = []

    def _noise_buffers(self, targets: Sequence[Tensor]) -> None:
        if len(self._views) == len(targets) and all(
            v.shape == t.shape and v.dtype == t.dtype and v.device == t.device for v, t in zip(self._views, targets)
        ):
            return
        self._flats, self._views = [], [torch.empty(0)] * len(targets)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(targets):
            groups.setdefault((t.device, t.dtype), []).append(i)
        for (device, dtype), idx in groups.items():
            flat = torch.empty(sum(targets[i].numel() for i in idx), device=device, dtype=dtype)
            self._flats.append(flat)
            for i, view in zip(idx, flat.split([targets[i].numel() for i in idx])):
                self._views[i] = view.view_as(targets[i])

    @torch.no_grad()
    def scores(
        self,
        loss_fn: LossFn,
        batch: Batch,
        clean_losses: Tensor,
        random_state: Optional[RandomState],
        restore: Callable[[], None],
    ) -> Tensor:
        """``[n]`` scores; ``restore`` must put the probed parameters back to ``w``."""
        device = clean_losses.device
        targets = [local(p) for p in self.params]
        self._noise_buffers(targets)
        directions = self.samples // 2 if self.antithetic else self.samples
        clean = clean_losses.detach().float()
        if self.curvature:
            # the second difference is tiny: the clean loss comes from the same (no-grad) kernels as ℓ(w ± u)
            clean = self._forward(loss_fn, batch, random_state, device)
        total = torch.zeros_like(clean_losses, dtype=torch.float32)
        try:
            for _ in range(directions):
                for flat in self._flats:
                    flat.normal_()
                try:
                    torch._foreach_add_(targets, self._views, alpha=self.scale)
                    plus = self._forward(loss_fn, batch, random_state, device)
                    if self.antithetic:
                        torch._foreach_add_(targets, self._views, alpha=-2.0 * self.scale)
                        minus = self._forward(loss_fn, batch, random_state, device)
                        if self.curvature:
                            total += (plus + minus - 2 * clean) / 2
                        else:
                            total += ((plus - minus) / 2).pow(2)
                    else:
                        total += (plus - clean).pow(2)
                finally:
                    restore()
        finally:
            if self.cache is not None:
                self.cache.clear()
        return total / directions if self.curvature else (total / directions).sqrt()

    def _forward(
        self, loss_fn: LossFn, batch: Batch, random_state: Optional[RandomState], device: torch.device
    ) -> Tensor:
        with (
            random_state.replay() if random_state is not None else nullcontext(),
            self.cache.reuse() if self.cache is not None else nullcontext(),
        ):
            return check_losses(loss_fn(batch), batch, device).float()
