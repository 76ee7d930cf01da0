"""Whether a change keeps training bit-identical: sha256 of the weights after 6 plain-loop steps for 11 configs.

Run it in two trees and compare the output, e.g. the session's start against HEAD:

    git worktree add /tmp/base <commit>
    PYTHONPATH=/tmp/base python benchmarks/perf/bit_identity.py > /tmp/base.json
    PYTHONPATH=. python benchmarks/perf/bit_identity.py > /tmp/head.json && diff /tmp/base.json /tmp/head.json

(2026-12-04: a4f9570 and e65f730 print the same hashes.)
"""

import hashlib
import json

import torch
import torch.nn.functional as F
from torch import nn

from lit_deltasam import DeltaSAMConfig, DeltaSAMOptimizer

CONFIGS = {
    "erm": dict(method="erm"),
    "sam": dict(method="sam"),
    "asam": dict(method="asam", rho=0.5),
    "deltasam": dict(),
    "deltasam-probe": dict(estimator="probe"),
    "deltasam-exact": dict(estimator="exact"),
    "per_instance": dict(method="per_instance"),
    "m-sam-3": dict(method="sam", m_sharpness=3),
    "looksam": dict(method="sam", interval=2, reuse="looksam"),
    "acc-clip": dict(method="sam", accumulate_grad_batches=2, gradient_clip_val=0.5),
    "warmup": dict(method="sam", rho_schedule="warmup", rho_warmup=3),
}
out = {}
for name, options in CONFIGS.items():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.1), nn.Linear(12, 3))
    base = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(base, step_size=1, gamma=0.8)
    opt = DeltaSAMOptimizer(model, base, DeltaSAMConfig(**options), seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        r = opt.step(lambda b, model=model: F.cross_entropy(model(b[0]), b[1], reduction="none"), (x, y))
        if r.stepped:
            sched.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy().tobytes()
    out[name] = hashlib.sha256(flat).hexdigest()[:16]
print(json.dumps(out, indent=1))
