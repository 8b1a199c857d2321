"""Loss functions: pure functions of tensors (log-probs, masks, hyperparameters in; a loss and metrics out).

Three families, each a package with its registry beside it:

* ``tether.losses.preference`` — offline preference objectives on per-sequence log-probs (DPO and its f-divergence,
  token-level, entropy, risk, long-context, reference-free and KTO variants); ``PREFERENCE_LOSSES`` tells the
  preference recipe what each needs.
* ``tether.losses.policy`` — online policy objectives on per-token log-probs (PPO-clip, GRPO, DAPO, GPG, CPGD, the KL
  penalty and its placements; GVPO, DisCO, RPG, KDRL, APO; TROLL, Archer, critical-token KL), their advantage
  estimators and reward shaping; ``ONLINE_OBJECTIVES`` tells the online recipe what each needs.
* ``tether.losses.distill`` — knowledge distillation: per-position divergences between teacher and student
  next-token distributions (``DIVERGENCES``) and the distillation objectives built on them.

Every public name of each is importable from ``tether.losses``. Nothing here imports from a layer above the math
(``tether.kl``): no model, sampler, recipe or config.
"""

from __future__ import annotations

from tether.losses import distill as _distill
from tether.losses import policy as _policy
from tether.losses import preference as _preference
from tether.losses.distill import *  # noqa: F401,F403
from tether.losses.policy import *  # noqa: F401,F403
from tether.losses.preference import *  # noqa: F401,F403

__all__ = sorted(set(_policy.__all__) | set(_preference.__all__) | set(_distill.__all__))
