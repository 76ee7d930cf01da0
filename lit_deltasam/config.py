"""The one place where δ-SAM's hyperparameters and their defaults live."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Union

METHODS = ("erm", "sam", "asam", "deltasam", "per_instance")
ESTIMATORS = ("head", "probe", "curvature", "exact")
PROBING = ("probe", "curvature")
"""Estimators that score instances with random weight perturbations."""
ASCENTS = ("local", "global")
PER_INSTANCE_IMPLS = ("loop", "vmap")
GROUP_IMPLS = ("auto", "loop", "batched")
CLIP_ALGORITHMS = ("norm", "value")
RHO_SCHEDULES = ("constant", "warmup", "follow_lr", "start_step")
REUSES = (None, "looksam")
M_SHARPNESS_METHODS = ("sam", "asam", "deltasam")


def _choice(name: str, value: object, choices: tuple[object, ...], *, optional: bool = False) -> None:
    if value not in choices and not (optional and value is None):
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

    A field that the chosen method (with its ``beta`` and ``estimator``) never reads must be left unset: setting it
    raises ``ValueError`` naming it, so that nothing set is silently ignored. Unset fields (``None``) that the
    method reads take the per-method defaults below; the others stay ``None``.

    Args:
        method: one of ``erm``, ``sam``, ``asam``, ``deltasam``, ``per_instance``.
        rho: perturbation radius, ``>= 0``; default 0.02, and 0.5 for ``asam`` (whose ``||eps||`` is
            about ``rho * |w|``). Not used by ``erm``.
        rho_schedule: ρ along training (:mod:`lit_deltasam.core.schedule`): ``constant``;
            ``warmup`` (linear from 0 over ``rho_warmup``); ``follow_lr``
            (``rho * lr_t / lr_max``, GSAM); ``start_step`` (plain steps for
            ``rho_warmup``, then ``rho``). A step whose ρ is 0 is a plain ERM step.
        rho_warmup: length of the ``warmup`` ramp and of the plain steps of
            ``start_step``: optimizer steps when ``>= 1``, a fraction of training when ``< 1`` (default 0.1).
        beta: exponent of the instance weights, ``lambda_i ∝ s_i ** beta``: default -0.5 for ``deltasam``;
            with ``asam``, unset is plain ASAM and a value reweights ASAM's ascent (an adaptive δ-SAM).
        estimator: where ``s_i`` comes from (default ``head``): ``head`` (free, the classifier layer's
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
        asam_eta: ASAM's offset ``eta`` in ``T = |w| + eta`` (default 0.01).
        asam_scope: where ASAM's ``T`` applies: ``all`` (default: every parameter, biases included) or
            ``weights`` (the ASAM authors' code: parameters whose name contains "weight"; ``T = 1`` elsewhere).
        probe_samples: forwards per step of the ``probe`` estimator (K; default 3).
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
        group_impl: how m-sharpness's groups and per-instance SAM's instances run: ``loop`` (a pair of passes per
            group, any model), ``batched`` (a chunk's groups in one vmapped ascent and one vmapped descent, about G
            extra parameter copies; BatchNorm in training, hooks, DDP/FSDP, 16-bit weights and the probe,
            curvature and exact estimators run the loop, said once; otherwise the loop's G to float tolerance, a
            module under two names included, and ``.grad`` left ``None`` where the loss never reaches, as in the
            loop) or ``auto`` (default: ``batched`` on CUDA, where it measured 2.7-7.9x faster than the loop,
            ``loop`` elsewhere, where it was faster on the CPU).
        group_chunk: groups (instances, for ``per_instance``) per batched pass; ``None``: all of a batch's groups.
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
    # mr on the majority-class plateau under every schedule but follow_lr (docs/benchmarks.md#robust-defaults);
    # ASAM's 0.5 acts on |w|-scaled coordinates (its ||eps|| is about rho * |w|).
    rho: Optional[float] = None
    rho_schedule: str = "follow_lr"
    rho_warmup: Optional[float] = None
    # beta = -0.5 with the head estimator had the best fidelity to per-instance SAM among the
    # δ-SAM variants measured (docs/benchmarks.md, "Fidelity"); beta = -1 is the second-order candidate.
    beta: Optional[float] = None
    estimator: Optional[str] = None
    weight_floor: Optional[float] = None
    weight_min: Optional[float] = None
    weight_max: Optional[float] = None
    weighted_descent: bool = False
    asam_eta: Optional[float] = None
    asam_scope: Optional[str] = None
    probe_samples: Optional[int] = None
    probe_sigma: Optional[float] = None
    probe_antithetic: bool = False
    probe_params: Optional[List[str]] = None
    probe_truncate: Optional[bool] = None
    head: Optional[str] = None
    share_dropout: bool = True
    ascent: str = "local"
    per_instance_impl: Optional[str] = None
    per_instance_chunk: Optional[int] = None
    m_sharpness: Optional[int] = None
    group_impl: Optional[str] = None
    group_chunk: Optional[int] = None
    interval: int = 1
    reuse: Optional[str] = None
    reuse_alpha: Optional[float] = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None
    gradient_clip_algorithm: str = "norm"
    histogram_every_n_steps: int = 100
    seed_steps: bool = True

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        as_given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}
        object.__setattr__(self, "_given", as_given)  # not a field: what replace() starts from
        given = [name for name in as_given if name in _APPLIES]
        _choice("estimator", self.estimator, ESTIMATORS, optional=True)
        _choice("ascent", self.ascent, ASCENTS)
        _choice("asam_scope", self.asam_scope, ASAM_SCOPES, optional=True)
        _choice("per_instance_impl", self.per_instance_impl, PER_INSTANCE_IMPLS, optional=True)
        _choice("group_impl", self.group_impl, GROUP_IMPLS, optional=True)
        if self.group_chunk is not None:
            _integer("group_chunk", self.group_chunk, low=1)
        _choice("gradient_clip_algorithm", self.gradient_clip_algorithm, CLIP_ALGORITHMS)
        if self.rho is not None:
            _number("rho", self.rho, low=0.0)
        _choice("rho_schedule", self.rho_schedule, RHO_SCHEDULES)
        if self.rho_warmup is not None:
            _number("rho_warmup", self.rho_warmup, low=0.0)
        if self.rho_warmup is not None and self.rho_warmup >= 1 and self.rho_warmup != int(self.rho_warmup):
            raise ValueError(
                f"DeltaSAMConfig.rho_warmup={self.rho_warmup!r} is not valid; it must be a whole number of optimizer "
                "steps (>= 1) or a fraction of training (< 1)"
            )
        for name, low, high, allow_inf in _NUMBERS:
            if getattr(self, name) is not None:
                _number(name, getattr(self, name), low=low, high=high, allow_inf=allow_inf)
        if self.probe_samples is not None:
            _integer("probe_samples", self.probe_samples, low=1)
        _integer("accumulate_grad_batches", self.accumulate_grad_batches, low=1)
        _integer("interval", self.interval, low=1)
        _choice("reuse", self.reuse, REUSES)
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
        for name in ("weighted_descent", "probe_antithetic", "share_dropout", "seed_steps"):
            _flag(name, getattr(self, name))
        if self.probe_truncate is not None:
            _flag("probe_truncate", self.probe_truncate)
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
        self._resolve()
        self._refuse_unused(given)
        if _probes(self) and (self.probe_antithetic or self.estimator == "curvature") and (self.probe_samples or 0) % 2:
            why = "estimator='curvature'" if self.estimator == "curvature" else "probe_antithetic=True"
            raise ValueError(
                f"DeltaSAMConfig.probe_samples={self.probe_samples} must be even with {why}: it probes with "
                "antithetic pairs ±u, two forwards each; e.g. probe_samples=2 or 4"
            )

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

    def replace(self, **changes: Any) -> DeltaSAMConfig:
        """This config with ``changes``, from the fields as they were given: the per-method defaults are filled
        again for the new method. (``dataclasses.replace`` passes the filled-in defaults as if set, and a change
        of method can then refuse one of them by name.)"""
        # a config unpickled from before this existed has no record of what was given: all its fields count
        if "_given" in self.__dict__:
            given = self.__dict__["_given"]
        else:
            given = {f.name: getattr(self, f.name) for f in fields(self)}
        return DeltaSAMConfig(**{**given, **changes})

    @property
    def perturbs(self) -> bool:
        """Whether the method takes an ascent step at all."""
        return self.method != "erm"

    @property
    def reweights(self) -> bool:
        """Whether the ascent uses instance weights other than uniform: δ-SAM with beta != 0, or ASAM given a
        beta (an adaptive δ-SAM)."""
        return self.method in REWEIGHTING and self.beta is not None and self.beta != 0.0

    def applies(self, name: str) -> bool:
        """Whether field ``name`` changes what this config computes (with the method, beta and estimator given)."""
        entry = _APPLIES.get(name)
        return entry is None or entry[0](self)

    def _refuse_unused(self, given: list[str]) -> None:
        """A field set away from its default that the method, beta or estimator never reads is an error; under
        ERM, the baseline of every comparison sweep, which reads no method field, a warning naming them."""
        unused = [name for name in given if not self.applies(name)]
        if not unused:
            return
        if self.method == "erm":
            settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in unused)
            warnings.warn(
                f"DeltaSAMConfig(method='erm') takes plain steps: {settings} have no effect",
                UserWarning,
                stacklevel=4,
            )
            return
        name = unused[0]
        raise ValueError(
            f"DeltaSAMConfig.{name}={getattr(self, name)!r} does nothing with {self._context()}: {_APPLIES[name][1]}; "
            f"remove it (leave it unset) or change the method"
            + (f" (also unused: {', '.join(unused[1:])})" if unused[1:] else "")
        )

    def _context(self) -> str:
        out = f"method={self.method!r}"
        if self.method in REWEIGHTING and self.beta is not None:
            out += f", beta={self.beta!r}"
        if self.estimator is not None:
            out += f", estimator={self.estimator!r}"
        return out

    def _resolve(self) -> None:
        """Fill the unset fields that this method reads with their per-method defaults (one place for them)."""
        for name, default in _DEFAULTS.items():
            if getattr(self, name) is None and self.applies(name):
                object.__setattr__(self, name, default(self) if callable(default) else default)


ASAM_SCOPES = ("all", "weights")
"""ASAM's scaling T = |w| + eta on every parameter (``all``), or, as the ASAM authors' code, on the parameters
whose name contains "weight" only, with T = 1 on the others (biases)."""
REWEIGHTING = ("deltasam", "asam")
"""Methods that take ``beta``: δ-SAM, and ASAM as an adaptive δ-SAM."""

_NUMBERS = (
    ("beta", -math.inf, math.inf, False),
    ("weight_floor", 0.0, 1.0, False),
    ("weight_min", 0.0, 1.0, False),
    ("weight_max", 1.0, math.inf, True),
    ("asam_eta", 0.0, math.inf, False),
    ("reuse_alpha", 0.0, math.inf, False),
)


def _probes(c: DeltaSAMConfig) -> bool:
    return c.reweights and c.estimator in PROBING


def _per_instance_oracle(c: DeltaSAMConfig) -> bool:
    return c.method == "per_instance" or (c.reweights and c.estimator == "exact")


_APPLIES: dict[str, tuple[Callable[[DeltaSAMConfig], bool], str]] = {
    "rho": (
        lambda c: c.perturbs,
        "ERM takes no ascent",
    ),
    "rho_schedule": (
        lambda c: c.perturbs,
        "ERM takes no ascent",
    ),
    "rho_warmup": (
        lambda c: c.perturbs and c.rho_schedule in ("warmup", "start_step"),
        "it is the length of rho_schedule='warmup' and 'start_step'",
    ),
    "beta": (
        lambda c: c.method in REWEIGHTING,
        f"instance weights apply to methods {list(REWEIGHTING)}",
    ),
    "estimator": (
        lambda c: c.reweights,
        "it scores instances for the weights, which need method='deltasam' (or 'asam') with beta != 0",
    ),
    "weight_floor": (
        lambda c: c.reweights,
        "it bounds the instance weights of method='deltasam' (or 'asam') with beta != 0",
    ),
    "weight_min": (
        lambda c: c.reweights,
        "it bounds the instance weights of method='deltasam' (or 'asam') with beta != 0",
    ),
    "weight_max": (
        lambda c: c.reweights,
        "it bounds the instance weights of method='deltasam' (or 'asam') with beta != 0",
    ),
    "weighted_descent": (
        lambda c: c.reweights,
        "it weights the descent by the instance weights (method='deltasam' or 'asam', beta != 0)",
    ),
    "head": (
        lambda c: c.reweights and c.estimator in (None, "head"),
        "it names the layer of estimator='head'",
    ),
    "asam_eta": (
        lambda c: c.method == "asam",
        "it is ASAM's offset (method='asam')",
    ),
    "asam_scope": (
        lambda c: c.method == "asam",
        "it is ASAM's scaling rule (method='asam')",
    ),
    "probe_samples": (
        _probes,
        "it sets the probes of estimator='probe' or 'curvature'",
    ),
    "probe_sigma": (
        _probes,
        "it sets the probes of estimator='probe' or 'curvature'",
    ),
    "probe_antithetic": (
        _probes,
        "it sets the probes of estimator='probe' or 'curvature'",
    ),
    "probe_params": (
        _probes,
        "it selects what estimator='probe' or 'curvature' perturbs",
    ),
    "probe_truncate": (
        lambda c: _probes(c) and c.probe_params is not None,
        "it applies with probe_params",
    ),
    "per_instance_impl": (
        lambda c: (
            (c.reweights and c.estimator == "exact") or (c.method == "per_instance" and c.group_impl != "batched")
        ),
        "it runs the per-instance gradients of method='per_instance' and estimator='exact'",
    ),
    "per_instance_chunk": (
        lambda c: _per_instance_oracle(c) and c.per_instance_impl == "vmap",
        "it sizes the batched calls of per_instance_impl='vmap'",
    ),
    "group_impl": (
        lambda c: c.m_sharpness is not None or c.method == "per_instance",
        "it runs the groups of m_sharpness and of method='per_instance'",
    ),
    "group_chunk": (
        lambda c: c.group_impl in ("batched", "auto"),
        "it sizes the passes of group_impl='batched' (and of 'auto' on CUDA)",
    ),
    "share_dropout": (
        lambda c: c.perturbs,
        "ERM takes one forward",
    ),
    "ascent": (
        lambda c: c.perturbs,
        "ERM takes no ascent",
    ),
    "interval": (
        lambda c: c.perturbs,
        "ERM takes no sharpness-aware step",
    ),
    "reuse_alpha": (
        lambda c: c.reuse is not None,
        "it weights reuse='looksam'",
    ),
    "histogram_every_n_steps": (
        lambda c: c.perturbs,
        "ERM logs no sharpness histograms",
    ),
}
"""When each method-specific field is read, and where it applies (for the refusal); the others (accumulation,
clipping, seeds) always are."""

_DEFAULTS: dict[str, Any] = {
    "rho": lambda c: 0.5 if c.method == "asam" else 0.02,
    "rho_warmup": 0.1,
    "beta": lambda c: -0.5 if c.method == "deltasam" else None,
    "estimator": "head",
    "weight_floor": 0.1,
    "weight_min": 0.1,
    "weight_max": 10.0,
    "asam_eta": 0.01,
    "asam_scope": "all",
    "probe_samples": 3,
    "probe_truncate": True,
    "group_impl": "auto",
    "per_instance_impl": "loop",
    "reuse_alpha": 0.7,
}
"""Per-method defaults of the fields left unset, filled where the method reads them."""
