"""Offline preference-optimization objectives, as pure functions of per-sequence log-probs.

Modules: ``dpo`` (DPO, IPO, hinge, robust DPO, f-DPO), ``token_level`` (TDPO 1/2, Ra-DPO and its risk), ``variants``
(H-DPO, LongPO), ``reference_free`` (SimPO, ORPO), ``kto``; ``registry`` maps config names to objectives
(``PREFERENCE_LOSSES``); ``_common`` holds the output record and shared helpers. Everything is re-exported here and from
``tether.losses``.

Notation (shared by every objective here): for a response
``y`` to a prompt ``x``, ``LP_θ(y)`` is the SUM of the policy's per-token log-probs over response tokens,
``LP_ref(y)`` the same under the frozen reference, ``ρ(y) = LP_θ(y) − LP_ref(y)`` the sequence log-ratio,
``Δ = ρ(y_w) − ρ(y_l)`` the DPO margin, ``|y|`` the number of response tokens, ``mLP(y) = LP(y)/|y|``.
``sg(·)`` is stop-gradient. ``−log σ(z)`` is always computed as ``softplus(−z)``.

Calling convention (the preference recipe relies on it exactly):

* positional: ``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)``, each
  ``Shape: (B,)``. Objectives without a reference (SimPO, ORPO) still take all four and ignore the last two
  (``None`` is accepted for them);
* keyword-only: extra per-sequence inputs (``chosen_lengths``/``rejected_lengths``, ``chosen_seq_kl``/
  ``rejected_seq_kl``, ``chosen_seq_risk``/``rejected_seq_risk`` or their ``*_split`` twins, ``kl_reference``,
  ``chosen_nll``) and hyperparameters, with the defaults documented on each function;
* returns a :class:`PreferenceLossOutput`: the per-example loss ``(B,)`` (the recipe takes the mean) and the
  detached implicit rewards the method defines, for logging margins and reward accuracy.

Departures shared by every function here (each function lists its own):

1. Batch reduction is left to the caller: we return per-example losses. The official Ra-DPO/TDPO code
   sums over the batch; TRL and the DPO reference code take the mean. Our recipe takes the mean.
2. Inputs are taken in whatever dtype they come; pass fp32 sequence log-probs (bf16 sums of hundreds of tokens
   lose the margin). Tests compare against float64 twins at fp32 ``atol 1e-5``.
"""

from __future__ import annotations

from tether.losses.preference._common import PreferenceLossOutput
from tether.losses.preference.dpo import F_DIVERGENCES, dpo, f_dpo, hinge_dpo, ipo, robust_dpo
from tether.losses.preference.kto import kto
from tether.losses.preference.reference_free import orpo, simpo
from tether.losses.preference.registry import PREFERENCE_INPUTS, PREFERENCE_LOSSES, LossSpec
from tether.losses.preference.token_level import ra_dpo, sequential_risk, tdpo, tdpo1, tdpo2, token_risk
from tether.losses.preference.variants import hdpo, longpo

__all__ = [
    "F_DIVERGENCES",
    "PREFERENCE_INPUTS",
    "PREFERENCE_LOSSES",
    "LossSpec",
    "PreferenceLossOutput",
    "dpo",
    "f_dpo",
    "hdpo",
    "hinge_dpo",
    "ipo",
    "kto",
    "longpo",
    "orpo",
    "ra_dpo",
    "robust_dpo",
    "sequential_risk",
    "simpo",
    "tdpo",
    "tdpo1",
    "tdpo2",
    "token_risk",
]
