"""The one place where δ-SAM's hyperparameters and their defaults live.

:class:`DeltaSAMConfig` is the flat public façade (Hydra users type ``method.rho=0.05``). Behind it, :data:`SPEC`
holds one row per field: its check, its default (which may depend on the method), and where it applies and why.
``__post_init__`` runs the rows, fills the defaults and refuses the fields set where they do nothing; a few
cross-field rules follow. The resolved, typed views that the engine and the loop read are :meth:`DeltaSAMConfig.
weighting`, :meth:`~DeltaSAMConfig.probing` and :meth:`~DeltaSAMConfig.loop`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, List, Optional, Union

METHODS = ("erm", "sam", "asam", "deltasam", "per_instance", "gsam", "wsam", "fsam")
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
FAMILY = ("gsam", "wsam", "fsam")
"""SAM's ascent with a rule of their own at the window's end (GSAM, WSAM) or in the ascent's direction (F-SAM)."""
POLICIES = (None, "adaptive")
ASAM_SCOPES = ("all", "weights")
"""ASAM's scaling T = |w| + eta on every parameter (``all``), or, as the ASAM authors' code, on the parameters
whose name contains "weight" only, with T = 1 on the others (biases)."""
REWEIGHTING = ("deltasam", "asam", "gsam", "wsam", "fsam")
"""Methods that take ``beta``: δ-SAM; ASAM as an adaptive δ-SAM; the family's methods as δ-GSAM, δ-WSAM and
δ-Friendly-SAM (their ascent from the reweighted gradient, their own rule after it)."""


class ConfigError(ValueError):
    """A :class:`DeltaSAMConfig` field has a bad value, or is set where it does nothing; the message names the
    field, the value and the fix."""


Check = Callable[[str, Any], Any]
"""Validates the value of field ``name`` (raising :class:`ConfigError`) and returns it, normalized."""


def _bad(name: str, value: object, must: str) -> ConfigError:
    return ConfigError(f"DeltaSAMConfig.{name}={value!r} is not valid; {must}")


def choice(*choices: object) -> Check:
    def check(name: str, value: Any) -> Any:
        if value not in choices:
            raise _bad(name, value, f"choose one of {list(choices)}")
        return value

    return check


def number(
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
    allow_inf: bool = False,
) -> Check:
    def check(name: str, value: Any) -> Any:
        x = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        ok = not math.isnan(x) and (allow_inf or math.isfinite(x)) and (x > low if open_low else x >= low)
        if not (ok and (x < high if open_high else x <= high)):
            kind = "a number" if allow_inf else "a finite number"
            above = f"{'>' if open_low else '>='} {low}"
            below = f"{'<' if open_high else '<='} {high}"
            if math.isinf(low) and math.isinf(high):
                bounds = ""
            elif math.isinf(high):
                bounds = f" {above}"
            elif math.isinf(low):
                bounds = f" {below}"
            else:
                bounds = f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
            raise _bad(name, value, f"it must be {kind}{bounds}")
        return value

    return check


def integer(low: int) -> Check:
    def check(name: str, value: Any) -> Any:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise _bad(name, value, f"it must be an integer >= {low}")
        return value

    return check


def flag(name: str, value: Any) -> Any:
    if not isinstance(value, bool):
        raise _bad(name, value, "it must be True or False")
    return value


def _steps_or_fraction(name: str, value: Any) -> Any:
    number(0.0)(name, value)
    if value >= 1 and value != int(value):
        raise _bad(name, value, "it must be a whole number of optimizer steps (>= 1) or a fraction of training (< 1)")
    return value


def _module_path(name: str, value: Any) -> Any:
    if not isinstance(value, str):
        raise _bad(name, value, "it must be a module path or None")
    return value


def _patterns(name: str, value: Any) -> Any:
    if isinstance(value, str) or not all(isinstance(p, str) for p in value):
        example = [value] if isinstance(value, str) else ["encoder.layer.5.*"]
        raise _bad(name, value, f"it must be a list of name patterns, e.g. {example}")
    if not list(value):
        raise ConfigError(f"DeltaSAMConfig.{name}=[] selects nothing; use None to probe every parameter")
    return list(value)


def _caller_outside() -> int:
    """The ``stacklevel`` of the first caller outside this package and the config machinery (Hydra, OmegaConf, a
    dataclass's generated ``__init__``), for a warning about a config: where the config was written, not where it was
    built (a CLI run's is Hydra's instantiate)."""
    inside = [os.path.dirname(__file__)]
    for name in ("hydra", "omegaconf"):
        module = sys.modules.get(name)
        if module is not None and module.__file__ is not None:
            inside.append(os.path.dirname(module.__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        frame.f_code.co_filename.startswith(tuple(inside)) or frame.f_code.co_filename.startswith("<")
    ):
        frame, level = frame.f_back, level + 1
    return level


@dataclass(frozen=True)
class Field:
    """One field's row of :data:`SPEC`."""

    check: Check
    """Validates a value (``None`` passes where the field's default is ``None``)."""
    default: Any = None
    """Fills the field, unset (``None``), where it applies: a value, or a function of the config."""
    applies: Optional[Callable[[DeltaSAMConfig], bool]] = None
    """Whether the field changes what the config computes; ``None``: always (accumulation, clipping, seeds)."""
    why: str = ""
    """Why it does nothing where it does not apply (the refusal's reason)."""


@dataclass(frozen=True)
class Weighting:
    """The instance weights of a reweighted ascent, resolved: ``lambda_i ∝ s_i ** beta``."""

    beta: float
    estimator: str
    floor: float
    low: float
    high: float
    descent: bool
    """Whether the descent is weighted too (``weighted_descent``)."""


@dataclass(frozen=True)
class Probing:
    """The probes of ``estimator="probe"`` and ``"curvature"``, resolved."""

    samples: int
    sigma: float
    antithetic: bool
    params: Optional[List[str]]
    truncate: bool
    curvature: bool


@dataclass(frozen=True)
class Loop:
    """The training loop's fields, resolved: what :class:`~lit_deltasam.DeltaSAMOptimizer` applies around steps."""

    accumulate: int
    interval: int
    reuse: Optional[str]
    reuse_alpha: float
    clip_val: Optional[float]
    clip_algorithm: str
    seed_steps: bool


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
    * ``gsam``: SAM's eps; ``G = g_adv - gsam_alpha * g_perp`` (GSAM, Zhuang et al., 2022).
    * ``wsam``: SAM's eps; the base step on the clean gradient, then the weighted sharpness term (WSAM).
    * ``fsam``: eps along ``g - fsam_sigma * m``, m the EMA of past gradients (Friendly-SAM, Li et al., 2024).

    A field that the chosen method (with its ``beta`` and ``estimator``) never reads must be left unset: setting it
    raises :class:`ConfigError` (a ``ValueError``) naming it, so that nothing set is silently ignored. Unset fields
    (``None``) that the method reads take the per-method defaults below; the others stay ``None``.

    Args:
        method: one of ``erm``, ``sam``, ``asam``, ``deltasam``, ``per_instance``, ``gsam``, ``wsam``, ``fsam``.
        rho: perturbation radius, ``>= 0``; default 0.02, and 0.5 for ``asam`` and ASAM's scaling of the family
            (whose ``||eps||`` is about ``rho * |w|``). Not used by ``erm``.
        rho_schedule: ρ along training (:mod:`lit_deltasam.core.schedule`): ``constant``;
            ``warmup`` (linear from 0 over ``rho_warmup``); ``follow_lr``
            (``rho * lr_t / lr_max``, GSAM); ``start_step`` (plain steps for
            ``rho_warmup``, then ``rho``). A step whose ρ is 0 is a plain ERM step.
        rho_warmup: length of the ``warmup`` ramp and of the plain steps of
            ``start_step``: optimizer steps when ``>= 1``, a fraction of training when ``< 1`` (default 0.1).
        beta: exponent of the instance weights, ``lambda_i ∝ s_i ** beta``: default -0.5 for ``deltasam``;
            with ``asam``, unset is plain ASAM and a value reweights ASAM's ascent (an adaptive δ-SAM); with
            ``gsam``, ``wsam`` or ``fsam``, a value reweights their ascent (δ-GSAM, δ-WSAM, δ-Friendly-SAM: the
            clean gradient of GSAM's and WSAM's rule is the descent's, the plain mean or, with
            ``weighted_descent``, the reweighted one; Friendly-SAM's running mean is of the reweighted ascent).
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
        asam_eta: ASAM's offset ``eta`` in ``T = |w| + eta`` (default 0.01). With ``gsam``, ``wsam`` or ``fsam``,
            unset is the method's own ascent and a value scales it as ASAM's (the reference's ``adaptive=True``
            is ``asam_eta=0``, ``asam_scope="all"``).
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
            the ``per_instance`` method. Set for ``per_instance``, it also makes ``group_impl`` default to
            ``loop``, the path that reads it (``auto`` batches on CUDA, where it would not be read).
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
        gsam_alpha: GSAM's weight of the surrogate-gap direction (``method="gsam"``, default 0.4, in [0, 1)):
            ``G = g_adv - alpha * g_perp``, ``g_perp`` the part of the clean gradient orthogonal to ``g_adv``.
        wsam_gamma: WSAM's weight of the sharpness term (``method="wsam"``, default 0.9, in [0, 1)); decoupled:
            the base optimizer steps on the clean gradient, then ``w -= lr * gamma / (1 - gamma) * (g_adv - g)``.
        wsam_decouple: WSAM's form (default ``True``, the reference's): ``False`` is the coupled form, one base
            step on ``g + gamma / (1 - gamma) * (g_adv - g)`` (``wsam_gamma=0.5`` coupled is SAM).
        fsam_sigma: Friendly-SAM's share of the gradient's running mean removed from the ascent direction
            (``method="fsam"``, default 1.0).
        fsam_lambda: Friendly-SAM's EMA decay of that running mean (default 0.9, in [0, 1)).
        gradient_centralization: centre each ascent gradient of rank > 1 over every dimension but the first
            before normalizing it (every perturbing method but ``per_instance``); the descent is not centred.
        policy: ``adaptive`` takes a full step only when ``||g||²`` is large against its running mean and
            variance (AE-SAM, Jiang et al., 2023), a plain step otherwise; ``None``: every step is full (or
            as ``interval`` says).
        policy_delta: the decay of the policy's running moments (default 0.9).
        policy_c_start: the threshold ``mu + c sigma``'s c at the first step (default 1.0) ...
        policy_c_end: ... moving linearly to this value at the last (default -1.0); the run's optimizer steps
            come from ``total_steps`` (the mixin reads the trainer's).

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
    gsam_alpha: Optional[float] = None
    wsam_gamma: Optional[float] = None
    wsam_decouple: Optional[bool] = None
    fsam_sigma: Optional[float] = None
    fsam_lambda: Optional[float] = None
    gradient_centralization: bool = False
    policy: Optional[str] = None
    policy_delta: Optional[float] = None
    policy_c_start: Optional[float] = None
    policy_c_end: Optional[float] = None

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}
        object.__setattr__(self, "_given", given)  # not a field: what replace() starts from
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None or f.default is not None:
                object.__setattr__(self, f.name, SPEC[f.name].check(f.name, value))
        _refuse_combinations(self)
        for f in fields(self):  # the per-method defaults, where the method reads the field
            rule = SPEC[f.name]
            if getattr(self, f.name) is None and rule.default is not None and self.applies(f.name):
                object.__setattr__(self, f.name, rule.default(self) if callable(rule.default) else rule.default)
        self._refuse_unused([name for name in given if SPEC[name].applies is not None])
        _refuse_resolved(self)

    @classmethod
    def coerce(cls, value: Union[DeltaSAMConfig, Mapping[str, Any]]) -> DeltaSAMConfig:
        """A config from itself or from a mapping of its fields (a Hydra node's ``_target_`` is ignored)."""
        if isinstance(value, DeltaSAMConfig):
            return value
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in value if k not in known and k != "_target_")
        if unknown:
            raise ConfigError(f"DeltaSAMConfig has no field {unknown}; valid fields are {sorted(known)}")
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
    def given(self) -> dict[str, Any]:
        """The fields set away from their defaults, as they were given."""
        return dict(self.__dict__.get("_given", {}))

    @property
    def perturbs(self) -> bool:
        """Whether the method takes an ascent step at all."""
        return self.method != "erm"

    @property
    def reweights(self) -> bool:
        """Whether the ascent uses instance weights other than uniform: δ-SAM with beta != 0, or ASAM or a family
        method given a beta (an adaptive δ-SAM, δ-GSAM, δ-WSAM, δ-Friendly-SAM)."""
        return self.method in REWEIGHTING and self.beta is not None and self.beta != 0.0

    @property
    def asam_scaled(self) -> bool:
        """Whether the ascent is scaled element-wise as ASAM's, ``T = |w| + asam_eta``: ASAM, and GSAM, WSAM or
        Friendly-SAM given an ``asam_eta`` (the reference library's ``adaptive=True``)."""
        return self.method == "asam" or (self.method in FAMILY and self.asam_eta is not None)

    @property
    def radius(self) -> float:
        """ρ, resolved: 0 for ERM."""
        return self.rho if self.rho is not None else 0.0

    @property
    def weighting(self) -> Optional[Weighting]:
        """The instance weights, resolved; ``None`` where the ascent is uniform."""
        if not self.reweights:
            return None
        beta, floor, low, high, estimator = (
            self.beta,
            self.weight_floor,
            self.weight_min,
            self.weight_max,
            self.estimator,
        )
        assert beta is not None and floor is not None and low is not None and high is not None and estimator
        return Weighting(beta, estimator, floor, low, high, self.weighted_descent)

    @property
    def probing(self) -> Optional[Probing]:
        """The probes, resolved; ``None`` where the estimator takes none."""
        if not _probes(self):
            return None
        assert self.probe_samples is not None and self.estimator is not None and self.rho is not None
        sigma = self.probe_sigma if self.probe_sigma is not None else self.rho
        truncate = bool(self.probe_truncate) and self.probe_params is not None
        curvature = self.estimator == "curvature"
        antithetic = self.probe_antithetic or curvature
        return Probing(self.probe_samples, sigma, antithetic, self.probe_params, truncate, curvature)

    @property
    def loop(self) -> Loop:
        """The training loop's fields, resolved."""
        alpha = self.reuse_alpha if self.reuse_alpha is not None else 0.0
        return Loop(
            self.accumulate_grad_batches,
            self.interval,
            self.reuse,
            alpha,
            self.gradient_clip_val,
            self.gradient_clip_algorithm,
            self.seed_steps,
        )

    def applies(self, name: str) -> bool:
        """Whether field ``name`` changes what this config computes (with the method, beta and estimator given)."""
        rule = SPEC[name].applies
        return rule is None or rule(self)

    def _refuse_unused(self, given: list[str]) -> None:
        """A field set away from its default that the method, beta or estimator never reads is an error; under
        ERM, the baseline of every comparison sweep, which reads no method field, a warning naming them."""
        unused = [name for name in given if not self.applies(name)]
        if not unused:
            return
        if self.method == "erm":
            settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in unused)
            warnings.warn(
                f"DeltaSAMConfig(method='erm') takes plain steps: {settings} "
                f"{'have' if len(unused) > 1 else 'has'} no effect",
                UserWarning,
                stacklevel=_caller_outside(),
            )
            return
        name = unused[0]
        raise ConfigError(
            f"DeltaSAMConfig.{name}={getattr(self, name)!r} does nothing with {self._context()}: {SPEC[name].why}; "
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


def _refuse_combinations(c: DeltaSAMConfig) -> None:
    """The cross-field rules that no single row states."""
    if c.reuse is not None and (c.interval == 1 or c.method == "erm"):
        raise ConfigError(
            f"DeltaSAMConfig.reuse={c.reuse!r} reuses a full step's direction between full steps, but "
            f"{'method=erm takes none' if c.method == 'erm' else 'interval=1 makes every step full'}; "
            "set interval > 1 with a sharpness-aware method, or reuse=None"
        )
    if c.m_sharpness is not None and c.method not in M_SHARPNESS_METHODS:
        why = {"erm": "takes no ascent", "per_instance": "perturbs each instance"}.get(
            c.method, "applies its rule to the whole batch's gradients (not implemented per group)"
        )
        raise ConfigError(
            f"DeltaSAMConfig.m_sharpness={c.m_sharpness} splits the ascent into groups, but method={c.method!r} "
            f"{why}; choose one of {list(M_SHARPNESS_METHODS)}, or m_sharpness=None"
        )
    if c.reuse is not None and c.method in FAMILY:
        raise ConfigError(
            f"DeltaSAMConfig.reuse={c.reuse!r} with method={c.method!r}: LookSAM's reused direction and "
            f"{c.method}'s own rule both act on the full steps' clean gradient, and their combination is not "
            "defined; use reuse=None (interval=k alone takes plain steps between full ones)"
        )
    if c.m_sharpness is not None and c.ascent == "global":
        raise ConfigError(
            f"DeltaSAMConfig.m_sharpness={c.m_sharpness} perturbs groups of each rank's local batch, which a global "
            "ascent (one all-reduced perturbation) cannot; use ascent='local' or m_sharpness=None"
        )


def _refuse_resolved(c: DeltaSAMConfig) -> None:
    """The rules that read the per-method defaults: antithetic probes come in pairs ±u; the adaptive policy's plain
    steps need a uniform ascent over the whole batch."""
    if c.policy is not None and (c.reweights or c.method == "per_instance" or c.m_sharpness is not None):
        what = (
            "m_sharpness"
            if c.m_sharpness is not None
            else f"method={c.method!r}"
            if c.method in ("deltasam", "per_instance")
            else f"beta={c.beta} (method={c.method!r})"
        )
        raise ConfigError(
            f"DeltaSAMConfig.policy={c.policy!r} with {what}: its plain steps step on the batch's ascent gradient, "
            "which is the plain gradient only for a uniform ascent over the whole batch; use method='sam', 'asam', "
            "'gsam', 'wsam' or 'fsam' without m_sharpness (and without beta)"
        )
    if c.policy is not None and c.interval > 1:
        raise ConfigError(
            f"DeltaSAMConfig.policy={c.policy!r} and interval={c.interval} both choose the full steps; set one"
        )

    if _probes(c) and (c.probe_antithetic or c.estimator == "curvature") and (c.probe_samples or 0) % 2:
        why = "estimator='curvature'" if c.estimator == "curvature" else "probe_antithetic=True"
        raise ConfigError(
            f"DeltaSAMConfig.probe_samples={c.probe_samples} must be even with {why}: it probes with antithetic "
            "pairs ±u, two forwards each; e.g. probe_samples=2 or 4"
        )


def _probes(c: DeltaSAMConfig) -> bool:
    return c.reweights and c.estimator in PROBING


def _per_instance_oracle(c: DeltaSAMConfig) -> bool:
    return c.method == "per_instance" or (c.reweights and c.estimator == "exact")


def _perturbs(c: DeltaSAMConfig) -> bool:
    return c.perturbs


def _reweights(c: DeltaSAMConfig) -> bool:
    return c.reweights


def _group_impl(c: DeltaSAMConfig) -> str:
    """``auto``, but the loop where the user chose how per-instance SAM's instances run (``per_instance_impl``),
    which only the loop reads."""
    chosen = c.method == "per_instance" and "per_instance_impl" in c.given
    return "loop" if chosen else "auto"


_ERM = "ERM takes no ascent"
_POLICY = "it sets policy='adaptive'"


def _adaptive(c: DeltaSAMConfig) -> bool:
    return c.policy == "adaptive"


_WEIGHTS = "it bounds the instance weights of a reweighted ascent (beta != 0)"
_PROBES = "it sets the probes of estimator='probe' or 'curvature'"

SPEC: dict[str, Field] = {
    "method": Field(choice(*METHODS)),
    "rho": Field(number(0.0), lambda c: 0.5 if c.asam_scaled else 0.02, _perturbs, _ERM),
    "rho_schedule": Field(choice(*RHO_SCHEDULES), None, _perturbs, _ERM),
    "rho_warmup": Field(
        _steps_or_fraction,
        0.1,
        lambda c: c.perturbs and c.rho_schedule in ("warmup", "start_step"),
        "it is the length of rho_schedule='warmup' and 'start_step'",
    ),
    "beta": Field(
        number(),
        lambda c: -0.5 if c.method == "deltasam" else None,
        lambda c: c.method in REWEIGHTING,
        f"instance weights apply to methods {list(REWEIGHTING)}",
    ),
    "estimator": Field(
        choice(*ESTIMATORS),
        "head",
        _reweights,
        "it scores instances for the weights, which need beta != 0 (methods 'deltasam', 'asam', 'gsam', 'wsam', "
        "'fsam')",
    ),
    "weight_floor": Field(number(0.0, 1.0), 0.1, _reweights, _WEIGHTS),
    "weight_min": Field(number(0.0, 1.0), 0.1, _reweights, _WEIGHTS),
    "weight_max": Field(number(1.0, allow_inf=True), 10.0, _reweights, _WEIGHTS),
    "weighted_descent": Field(
        flag,
        None,
        _reweights,
        "it weights the descent by the instance weights (a reweighted ascent, beta != 0)",
    ),
    "asam_eta": Field(
        number(0.0),
        lambda c: 0.01 if c.method == "asam" else None,
        lambda c: c.method == "asam" or c.method in FAMILY,
        "it is ASAM's offset (method='asam', or 'gsam', 'wsam', 'fsam' for ASAM's scaling of their ascent)",
    ),
    "asam_scope": Field(
        choice(*ASAM_SCOPES),
        "all",
        lambda c: c.asam_scaled,
        "it is ASAM's scaling rule (method='asam', or 'gsam', 'wsam', 'fsam' with asam_eta set)",
    ),
    "probe_samples": Field(integer(1), 3, _probes, _PROBES),
    "probe_sigma": Field(number(0.0, open_low=True), None, _probes, _PROBES),
    "probe_antithetic": Field(flag, None, _probes, _PROBES),
    "probe_params": Field(_patterns, None, _probes, "it selects what estimator='probe' or 'curvature' perturbs"),
    "probe_truncate": Field(
        flag, True, lambda c: _probes(c) and c.probe_params is not None, "it applies with probe_params"
    ),
    "head": Field(
        _module_path,
        None,
        lambda c: c.reweights and c.estimator in (None, "head"),
        "it names the layer of estimator='head'",
    ),
    "share_dropout": Field(flag, None, _perturbs, "ERM takes one forward"),
    "ascent": Field(choice(*ASCENTS), None, _perturbs, _ERM),
    "per_instance_impl": Field(
        choice(*PER_INSTANCE_IMPLS),
        "loop",
        lambda c: (
            (c.reweights and c.estimator == "exact") or (c.method == "per_instance" and c.group_impl != "batched")
        ),
        "it runs the per-instance gradients of method='per_instance' and estimator='exact'",
    ),
    "per_instance_chunk": Field(
        integer(1),
        None,
        lambda c: _per_instance_oracle(c) and c.per_instance_impl == "vmap",
        "it sizes the batched calls of per_instance_impl='vmap'",
    ),
    "m_sharpness": Field(integer(1)),
    "group_impl": Field(
        choice(*GROUP_IMPLS),
        _group_impl,
        lambda c: c.m_sharpness is not None or c.method == "per_instance",
        "it runs the groups of m_sharpness and of method='per_instance'",
    ),
    "group_chunk": Field(
        integer(1),
        None,
        lambda c: c.group_impl in ("batched", "auto"),
        "it sizes the passes of group_impl='batched' (and of 'auto' on CUDA)",
    ),
    "interval": Field(integer(1), None, _perturbs, "ERM takes no sharpness-aware step"),
    "reuse": Field(choice(*REUSES)),
    "reuse_alpha": Field(number(0.0), 0.7, lambda c: c.reuse is not None, "it weights reuse='looksam'"),
    "accumulate_grad_batches": Field(integer(1)),
    "gradient_clip_val": Field(number(0.0, open_low=True)),
    "gradient_clip_algorithm": Field(choice(*CLIP_ALGORITHMS)),
    "histogram_every_n_steps": Field(integer(0), None, _perturbs, "ERM logs no sharpness histograms"),
    "seed_steps": Field(flag),
    "gsam_alpha": Field(
        number(0.0, 1.0, open_high=True), 0.4, lambda c: c.method == "gsam", "it is GSAM's weight (method='gsam')"
    ),
    "wsam_gamma": Field(
        number(0.0, 1.0, open_high=True), 0.9, lambda c: c.method == "wsam", "it is WSAM's weight (method='wsam')"
    ),
    "wsam_decouple": Field(
        flag,
        True,
        lambda c: c.method == "wsam" and c.wsam_gamma != 0,
        "it is WSAM's form (method='wsam'; with wsam_gamma=0 both forms are ERM's step)",
    ),
    "fsam_sigma": Field(number(0.0), 1.0, lambda c: c.method == "fsam", "it is Friendly-SAM's (method='fsam')"),
    "fsam_lambda": Field(
        number(0.0, 1.0, open_high=True),
        0.9,
        lambda c: c.method == "fsam" and c.fsam_sigma != 0,
        "it is the decay of Friendly-SAM's running mean (method='fsam'), which fsam_sigma=0 removes none of",
    ),
    "gradient_centralization": Field(
        flag,
        None,
        lambda c: c.perturbs and c.method != "per_instance",
        "it centres the ascent gradient of a batch perturbation, which ERM and per-instance SAM take none of",
    ),
    "policy": Field(choice(*POLICIES), None, _perturbs, "ERM takes no sharpness-aware step"),
    "policy_delta": Field(number(0.0, 1.0, open_low=True, open_high=True), 0.9, _adaptive, _POLICY),
    "policy_c_start": Field(number(), 1.0, _adaptive, _POLICY),
    "policy_c_end": Field(number(), -1.0, _adaptive, _POLICY),
}
"""One row per field of :class:`DeltaSAMConfig`: its check, its per-method default, and where it applies."""
