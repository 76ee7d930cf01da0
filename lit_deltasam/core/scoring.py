"""The ascent's instance weights λ: uniform, or ``λ_i ∝ s_i ** beta`` from a guardedness estimator's scores."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from .batch import Batch, LossFn
from .distributed import gather_instances, rank, world_size
from .guardedness import ForwardCache, HeadTap, Prober, find_head, select_params
from .parts import NoSync, Parts
from .randomness import RandomState
from .weighting import instance_weights


class Scorer:
    """λ over a batch for ``parts.config``: the estimator (``head``, ``probe``, ``curvature``, ``exact``) is built
    once, here."""

    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        config = parts.config
        self.weighting = config.weighting
        self.head: Optional[HeadTap] = None
        self.prober: Optional[Prober] = None
        self.probed: list[int] = []
        self._warned_16_bit = False
        if self.weighting is not None and self.weighting.estimator == "head":
            self.head = HeadTap(*find_head(parts.module, config.head), parts.module)
        probing = config.probing
        if probing is not None:
            self.probed = select_params(parts.names, probing.params)
            probed = [parts.params[i] for i in self.probed]
            cache = ForwardCache(parts.module, probed, config.share_dropout) if probing.truncate else None
            self.prober = Prober(probed, probing.samples, probing.sigma, probing.antithetic, cache, probing.curvature)

    def weights(
        self, loss_fn: LossFn, batch: Batch, losses: Tensor, random_state: Optional[RandomState], no_sync: NoSync
    ) -> tuple[Tensor, slice]:
        """λ over the batch it is normalized on (the global batch under ``ascent="global"``), and this rank's
        slice of it."""
        n = losses.shape[0]
        global_ascent = self.parts.config.ascent == "global"
        if self.weighting is None:
            ranks, r = (world_size(), rank()) if global_ascent else (1, 0)
            uniform = torch.full((n * ranks,), 1.0 / (n * ranks), dtype=torch.float64, device=losses.device)
            return uniform, slice(r * n, (r + 1) * n)
        with no_sync():  # scoring is local: its forwards must not arm DDP's all-reduce or buffer broadcast
            scores = self._scores(loss_fn, batch, losses, random_state)
        if global_ascent:
            scores, mine = gather_instances(scores)
        else:
            mine = slice(0, n)
        return self.group_weights(scores), mine

    def group_weights(self, scores: Tensor) -> Tensor:
        """One group's λ from its instances' scores."""
        w = self.weighting
        assert w is not None  # only a reweighted ascent scores
        return instance_weights(scores, w.beta, floor=w.floor, clip=(w.low, w.high))

    def _scores(self, loss_fn: LossFn, batch: Batch, losses: Tensor, random_state: Optional[RandomState]) -> Tensor:
        if self.head is not None:
            return self.head.scores(losses)
        if self.prober is not None:
            self._warn_if_probing_in_16_bit()
            probed, parts = self.probed, self.parts
            restore = lambda: parts.params_before.restore(probed)  # noqa: E731
            scores = self.prober.scores(loss_fn, batch, losses, random_state, restore)
            parts.buffers_clean.restore()
            # negative curvature along the probes: no more exposed than a flat direction
            return scores.clamp_min(0.0) if self.prober.curvature else scores
        return self.parts.instances.grad_norms(loss_fn, batch)

    def _warn_if_probing_in_16_bit(self) -> None:
        if self._warned_16_bit:
            return
        kind, half = self.parts.device.type, (torch.float16, torch.bfloat16)
        dtype = self.parts.params[0].dtype
        if dtype not in half and torch.is_autocast_enabled(kind):
            dtype = torch.get_autocast_dtype(kind)
        if dtype in half and self.prober is not None:
            self._warned_16_bit = True
            warnings.warn(
                f"the {self.parts.config.estimator} estimator runs in {dtype}: its per-element perturbation "
                f"({self.prober.scale:.1e}) is likely below the 16-bit rounding of the weights, so the scores measure "
                "rounding noise; use estimator='head', a larger probe_sigma, or 32-bit precision",
                RuntimeWarning,
                stacklevel=7,
            )
