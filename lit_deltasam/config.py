"""The one place where δ-SAM's hyperparameters and their defaults live."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Union

METHODS = ("erm", "sam", "asam", "deltasam", "per_instance")
ESTIMATORS = ("head", "probe", "curvature", "exact")
PROBING = ("probe", "curvature")
"""Estimators that score instances with random weight perturbations."""
ASCENTS = ("local", "global")
PER_INSTANCE_IMPLS = ("loop", "vmap")
CLIP_ALGORITHMS = ("norm", "value")
RHO_SCHEDULES = ("constant", "warmup", "follow_lr", "start_step")
REUSES = (None, "looksam")
M_SHARPNESS_METHODS = ("sam", "asam", "deltasam")


def _choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    if value not in choices:
        raise ValueError(f"DeltaSAMConfig.{name}={value!r} is not valid; choose one of {list(choices)}")


def _number(
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    open_low: bool = False,
    allow_inf: bool = False,
) -> None:
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    ok = not math.isnan(number) and (allow_inf or math.isfinite(number))
    if ok:
        ok = (number > low if open_low else number >= low) and number <= high
    if not ok:
        kind = "a number" if allow_inf else "a finite number"
        bound = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"DeltaSAMConfig.{name}={value!r} is not valid; it must be {kind} in {bound}")


def _flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"DeltaSAMConfig.{name}={value!r} is not valid; it must be True or False")


def _integer(name: str, value: object, *, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"DeltaSAMConfig.{name}={value!r} is not valid; it must be an integer >= {low}")


@dataclass(frozen=True)
class DeltaSAMConfig:
    """How each training step perturbs the weights before the descent.

    Every method ends in exactly one step of the base optimizer on a gradient G
    (see ``docs/method-card.md`` for the derivation):

    * ``erm``: G is the plain batch gradient.
    * ``sam``: G is the gradient at ``w + rho * g / ||g||``.
    * ``asam``: as SAM with the element-wise scaling ``T = |w| + asam_eta``.
    * ``deltasam``: the perturbation follows ``g_lambda = sum_i lambda_i g_i`` with
      ``lambda_i ∝ s_i ** beta``, where ``s_i`` estimates the per-instance gradient
      norm with ``estimator``. ``beta = 0`` is SAM; ``beta < 0`` up-weights the
      unguarded instances (small gradients); ``beta = -1`` matches per-instance SAM's
      diagonal second-order terms.
    * ``per_instance``: exact per-instance SAM, ``G = mean_i grad l_i(w + rho ĝ_i)``.

    Args:
        method: one of ``erm``, ``sam``, ``asam``, ``deltasam``, ``per_instance``.
        rho: perturbation radius, ``>= 0``.
        rho_schedule: ρ along training (:mod:`lit_deltasam.core.schedule`): ``constant``;
            ``warmup`` (linear from 0 over ``rho_warmup``); ``follow_lr``
            (``rho * lr_t / lr_max``, GSAM); ``start_step`` (plain steps for
            ``rho_warmup``, then ``rho``). A step whose ρ is 0 is a plain ERM step.
        rho_warmup: length of the ``warmup`` ramp and of the plain steps of
            ``start_step``: optimizer steps when ``>= 1``, a fraction of training when ``< 1``.
        beta: exponent of the instance weights, ``lambda_i ∝ s_i ** beta``.
        estimator: where ``s_i`` comes from: ``head`` (free, the classifier layer's
            per-instance gradient norm in closed form), ``probe`` (random weight
            perturbations, ``probe_samples`` no-grad forwards), ``curvature`` (the
            curvature along random directions, ``mean_k (l_i(w+u_k) + l_i(w-u_k) - 2 l_i(w)) / 2``
            ≈ ``u_kᵀ H_i u_k / 2``, clamped at 0, from ``probe_samples`` forwards in
            antithetic pairs) or ``exact`` (per-instance gradient norms, computed as
            ``per_instance_impl`` says).
        weight_floor: ``s_i`` is floored at this fraction of the batch median.
        weight_min: lower bound of ``n * lambda_i`` (``<= 1``), met after normalization.
        weight_max: upper bound of ``n * lambda_i`` (``>= 1``; ``inf`` disables), met after normalization.
        weighted_descent: descend on ``sum_i lambda_i l_i(w + eps)`` instead of the mean.
        asam_eta: ASAM's offset ``eta`` in ``T = |w| + eta``.
        probe_samples: forwards per step of the ``probe`` estimator (K).
        probe_sigma: RMS norm of each probe perturbation; ``None`` means ``rho``.
        probe_antithetic: probe with pairs ``±u`` (``probe_samples`` must be even).
        probe_params: ``fnmatch`` patterns of parameter names to probe (``None``: all).
        probe_truncate: with ``probe_params``, start the probe forwards at the first
            probed layer, reusing the clean forward's activations below it.
        head: module path of the final linear layer for the ``head`` estimator
            (``None``: the last ``nn.Linear`` of the module).
        share_dropout: replay the random state so that the forwards that are
            compared (clean, probes, perturbed) draw the same dropout masks.
        ascent: under data parallelism, ``local`` perturbs each rank with its own
            sub-batch (no all-reduce); ``global`` all-reduces the ascent gradient.
        per_instance_impl: ``loop`` (one instance at a time, any model) or ``vmap``
            (``torch.func``, small dropout-free models) for the ``exact`` estimator and
            the ``per_instance`` method.
        per_instance_chunk: instances per ``vmap`` call (``None``: the whole batch).
        m_sharpness: one perturbation per group of ``m_sharpness`` instances (m-sharpness,
            Foret et al., 2021): the local batch is split into contiguous groups of m in
            batch order (the last one smaller when m does not divide n); group k's
            perturbation comes from its own ascent gradient (λ normalized within the group
            for ``deltasam``), and ``G = (1/n) sum_i grad l_i(w + eps_k(i))``. ``None``: the
            whole local batch, as does any m >= n. ``sam`` with m = 1 is ``per_instance``.
            Methods ``sam``, ``asam`` and ``deltasam``; a local ascent only.
        interval: a full sharpness-aware step every ``interval`` optimizer steps (counted
            by ``global_step``, across epochs), a plain ERM step otherwise.
        reuse: between full steps, ``None`` takes plain steps; ``looksam`` adds the last
            full step's sharpness direction orthogonal to the plain gradient, rescaled to
            the plain gradient's norm (LookSAM, Liu et al., 2022).
        reuse_alpha: LookSAM's weight of the reused direction.
        accumulate_grad_batches: micro-batches per optimizer step.
        gradient_clip_val: clip G (never the ascent gradient); ``None`` disables.
        gradient_clip_algorithm: ``norm`` or ``value``.
        histogram_every_n_steps: log histograms of lambda and of the per-instance
            loss change every N optimizer steps; ``0`` disables.
        seed_steps: draw each step's randomness from a seed derived from
            (seed, micro-batches run so far, rank) so that a resumed run is exact.

    Example:
        >>> cfg = DeltaSAMConfig(method="deltasam", rho=0.05, beta=-1.0, estimator="head")
        >>> cfg.rho
        0.05
    """

    method: str = "deltasam"
    # rho = 0.02 following the LR: no stall in any run of the robust-defaults study, where rho = 0.05 held
    # mr on the majority-class plateau under every schedule but follow_lr (docs/benchmarks.md#robust-defaults)
    rho: float = 0.02
    rho_schedule: str = "follow_lr"
    rho_warmup: float = 0.1
    # beta = -0.5 with the head estimator had the best fidelity to per-instance SAM among the
    # δ-SAM variants measured (docs/benchmarks.md, "Fidelity"); beta = -1 is the second-order candidate.
    beta: float = -0.5
    estimator: str = "head"
    weight_floor: float = 0.1
    weight_min: float = 0.1
    weight_max: float = 10.0
    weighted_descent: bool = False
    asam_eta: float = 0.01
    probe_samples: int = 3
    probe_sigma: Optional[float] = None
    probe_antithetic: bool = False
    probe_params: Optional[List[str]] = None
    probe_truncate: bool = True
    head: Optional[str] = None
    share_dropout: bool = True
    ascent: str = "local"
    per_instance_impl: str = "loop"
    per_instance_chunk: Optional[int] = None
    m_sharpness: Optional[int] = None
    interval: int = 1
    reuse: Optional[str] = None
    reuse_alpha: float = 0.7
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"
    histogram_every_n_steps: int = 100
    seed_steps: bool = True

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("estimator", self.estimator, ESTIMATORS)
        _choice("ascent", self.ascent, ASCENTS)
        _choice("per_instance_impl", self.per_instance_impl, PER_INSTANCE_IMPLS)
        _choice("gradient_clip_algorithm", self.gradient_clip_algorithm, CLIP_ALGORITHMS)
        _number("rho", self.rho, low=0.0)
        _choice("rho_schedule", self.rho_schedule, RHO_SCHEDULES)
        _number("rho_warmup", self.rho_warmup, low=0.0)
        if self.rho_warmup >= 1 and self.rho_warmup != int(self.rho_warmup):
            raise ValueError(
                f"DeltaSAMConfig.rho_warmup={self.rho_warmup!r} is not valid; it must be a whole number of optimizer "
                "steps (>= 1) or a fraction of training (< 1)"
            )
        _number("beta", self.beta)
        _number("weight_floor", self.weight_floor, low=0.0, high=1.0)
        _number("weight_min", self.weight_min, low=0.0, high=1.0)
        _number("weight_max", self.weight_max, low=1.0, allow_inf=True)
        _number("asam_eta", self.asam_eta, low=0.0)
        _integer("probe_samples", self.probe_samples, low=1)
        _integer("accumulate_grad_batches", self.accumulate_grad_batches, low=1)
        _integer("interval", self.interval, low=1)
        _choice("reuse", self.reuse, REUSES)
        _number("reuse_alpha", self.reuse_alpha, low=0.0)
        if self.reuse is not None and (self.interval == 1 or self.method == "erm"):
            raise ValueError(
                f"DeltaSAMConfig.reuse={self.reuse!r} reuses a full step's direction between full steps, but "
                f"{'method=erm takes none' if self.method == 'erm' else 'interval=1 makes every step full'}; "
                "set interval > 1 with a sharpness-aware method, or reuse=None"
            )
        if self.m_sharpness is not None:
            _integer("m_sharpness", self.m_sharpness, low=1)
            if self.method not in M_SHARPNESS_METHODS:
                raise ValueError(
                    f"DeltaSAMConfig.m_sharpness={self.m_sharpness} splits the ascent into groups, but "
                    f"method={self.method!r} "
                    f"{'takes no ascent' if self.method == 'erm' else 'perturbs each instance'}; "
                    f"choose one of {list(M_SHARPNESS_METHODS)}, or m_sharpness=None"
                )
            if self.ascent == "global":
                raise ValueError(
                    f"DeltaSAMConfig.m_sharpness={self.m_sharpness} perturbs groups of each rank's local batch, which "
                    "a global ascent (one all-reduced perturbation) cannot; use ascent='local' or m_sharpness=None"
                )
        _integer("histogram_every_n_steps", self.histogram_every_n_steps, low=0)
        if self.per_instance_chunk is not None:
            _integer("per_instance_chunk", self.per_instance_chunk, low=1)
        if self.probe_sigma is not None:
            _number("probe_sigma", self.probe_sigma, low=0.0, open_low=True)
        if self.gradient_clip_val is not None:
            _number("gradient_clip_val", self.gradient_clip_val, low=0.0, open_low=True)
        if (self.probe_antithetic or self.estimator == "curvature") and self.probe_samples % 2:
            why = "estimator='curvature'" if self.estimator == "curvature" else "probe_antithetic=True"
            raise ValueError(
                f"DeltaSAMConfig.probe_samples={self.probe_samples} must be even with {why}: it probes with "
                "antithetic pairs ±u, two forwards each; e.g. probe_samples=2 or 4"
            )
        for name in ("weighted_descent", "probe_antithetic", "probe_truncate", "share_dropout", "seed_steps"):
            _flag(name, getattr(self, name))
        if self.head is not None and not isinstance(self.head, str):
            raise ValueError(f"DeltaSAMConfig.head={self.head!r} is not valid; it must be a module path or None")
        if self.probe_params is not None:
            patterns = self.probe_params
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(
                    f"DeltaSAMConfig.probe_params={patterns!r} is not valid; it must be a list of name patterns, "
                    f"e.g. {[patterns] if isinstance(patterns, str) else ['encoder.layer.5.*']}"
                )
            object.__setattr__(self, "probe_params", list(patterns))
            if not self.probe_params:
                raise ValueError("DeltaSAMConfig.probe_params=[] selects nothing; use None to probe every parameter")

    @classmethod
    def coerce(cls, value: Union[DeltaSAMConfig, Mapping[str, Any]]) -> DeltaSAMConfig:
        """A config from itself or from a mapping of its fields (a Hydra node's ``_target_`` is ignored)."""
        if isinstance(value, DeltaSAMConfig):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in value if k not in known and k != "_target_")
        if unknown:
            raise ValueError(f"DeltaSAMConfig has no field {unknown}; valid fields are {sorted(known)}")
        return cls(**{k: v for k, v in value.items() if k != "_target_"})

    @property
    def perturbs(self) -> bool:
        """Whether the method takes an ascent step at all."""
        return self.method != "erm"

    @property
    def reweights(self) -> bool:
        """Whether the ascent uses instance weights other than uniform."""
        return self.method == "deltasam" and self.beta != 0.0
