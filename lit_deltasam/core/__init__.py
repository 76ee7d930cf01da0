"""The functional core: plain PyTorch, no Lightning import. Where each piece of the step lives
(derivation: ``docs/method-card.md``):

* ε, the ascent of every method: ``ascent`` (direction, the factor ρ/‖g‖, the move; host and device arithmetic).
* λ, the instance weights: ``scoring`` (from ``guardedness``'s head/probe/curvature scores, ``per_instance``'s exact
  norms) and ``weighting`` (λ ∝ s^β, floored and clipped).
* The double step, one strategy chosen per engine: ``steps`` (Plain, TwoPass, Grouped, PerInstanceSAM; batched
  groups in ``groups``), run by ``engine.DeltaSAM`` over its ``parts``; what it measured: ``result``.
* ρ along training: ``schedule.RhoSchedule``. LookSAM's stored direction: ``amortized``.
* The window, accumulation, skips and the base step: ``driver.Driver``; its torch shell ``loop.DeltaSAMOptimizer``
  (``closure``: torch's ``step(closure)``).
"""

from .ascent import perturb
from .engine import DeltaSAM, StepResult
from .guardedness import HeadTap, Prober
from .norms import total_norm
from .per_instance import PerInstance
from .weighting import effective_sample_size, instance_weights

__all__ = [
    "DeltaSAM",
    "HeadTap",
    "PerInstance",
    "Prober",
    "StepResult",
    "effective_sample_size",
    "instance_weights",
    "perturb",
    "total_norm",
]
