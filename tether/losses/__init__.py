"""Loss functions: pure functions of tensors (log-probs, masks, hyperparameters in; losses out).

Offline preference objectives live in the ``preference`` package (``dpo.py``, ``token_level.py``, ``variants.py``,
``reference_free.py``, ``kto.py``); online policy-gradient objectives (PPO-clip, GRPO, DAPO,
GPG, CPGD) in ``policy.py``; KL-regularized successors in the ``regularized`` package — GVPO, DisCO, RPG, KDRL, APO in
``regularized/kl_objectives.py``, TROLL, Archer, critical-token KL in ``regularized/token_selective.py``, and the loop
helpers (GRPO-CARE bonus and EMA reference, difficulty filter, reference resets) in ``regularized/loop_helpers.py``.
Every one is importable from ``tether.losses`` by name.

``PREFERENCE_LOSSES`` maps the config name of each offline preference objective to a :class:`LossSpec` that
tells the preference recipe which extra inputs to compute and whether the reference must run online over the
full vocabulary. Config names are the function names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tether.losses.policy import (
    AGG_MODES,
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    PolicyLossOutput,
    aggregate,
    cpgd,
    dapo,
    dapo_dynamic_sampling_mask,
    gpg,
    grpo,
    kl_in_reward,
    kl_penalty,
    ppo_clip,
    ppo_clip_per_token,
)
from tether.losses.preference import (
    F_DIVERGENCES,
    PreferenceLossOutput,
    dpo,
    f_dpo,
    hdpo,
    hinge_dpo,
    ipo,
    kto,
    longpo,
    orpo,
    ra_dpo,
    robust_dpo,
    simpo,
    tdpo,
    tdpo1,
    tdpo2,
)
from tether.losses.regularized import (
    APOShaping,
    EMAReference,
    ReferenceResetSchedule,
    TrustRegionProjection,
    apo,
    apo_shaping,
    archer,
    critical_token_kl,
    difficulty_filter,
    disco,
    ema_update_,
    grpo_care_bonus,
    gvpo,
    kdrl,
    rpg,
    troll,
    troll_project,
)

#: Keyword inputs a preference objective may need beyond the four positional log-prob tensors.
#: "lengths" -> chosen_lengths/rejected_lengths, "seq_kl" -> chosen_seq_kl/rejected_seq_kl,
#: "seq_risk" -> chosen_seq_risk/rejected_seq_risk, "kl_reference" -> kl_reference,
#: "chosen_nll" -> chosen_nll.
PREFERENCE_INPUTS = frozenset({"lengths", "seq_kl", "seq_risk", "kl_reference", "chosen_nll"})


@dataclass(frozen=True)
class LossSpec:
    """How the preference recipe must call one objective.

    Fields:
        fn: the loss function, called as ``fn(pc, pr, rc, rr, **extras, **hyperparameters)``.
        needs: which keyword inputs of ``PREFERENCE_INPUTS`` the recipe must supply.
        full_vocab: True when the reference must run online and the extras need full-vocabulary distributions
            of policy and reference at every response position (TDPO, Ra-DPO); False when summed reference
            log-probs (possibly precomputed) suffice.
        uses_reference: False for reference-free objectives (SimPO, ORPO): the recipe may skip the reference
            model and pass None for its log-probs.
    """

    fn: Callable[..., PreferenceLossOutput]
    needs: frozenset[str] = frozenset()
    full_vocab: bool = False
    uses_reference: bool = True

    def __post_init__(self) -> None:
        unknown = self.needs - PREFERENCE_INPUTS
        if unknown:
            raise ValueError(
                f"LossSpec.needs has unknown inputs {sorted(unknown)}; allowed: {sorted(PREFERENCE_INPUTS)}"
            )


PREFERENCE_LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(dpo),
    "ipo": LossSpec(ipo, frozenset({"lengths"})),
    "hinge_dpo": LossSpec(hinge_dpo),
    "robust_dpo": LossSpec(robust_dpo),
    "f_dpo": LossSpec(f_dpo),
    "tdpo": LossSpec(tdpo, frozenset({"seq_kl"}), full_vocab=True),
    "tdpo1": LossSpec(tdpo1, frozenset({"seq_kl"}), full_vocab=True),
    "tdpo2": LossSpec(tdpo2, frozenset({"seq_kl"}), full_vocab=True),
    "hdpo": LossSpec(hdpo),
    "ra_dpo": LossSpec(ra_dpo, frozenset({"seq_risk"}), full_vocab=True),
    "longpo": LossSpec(longpo, frozenset({"chosen_nll"})),
    "simpo": LossSpec(simpo, frozenset({"lengths"}), uses_reference=False),
    "orpo": LossSpec(orpo, frozenset({"lengths"}), uses_reference=False),
    "kto": LossSpec(kto, frozenset({"kl_reference"})),
}

__all__ = [
    # preference
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
    "simpo",
    "tdpo",
    "tdpo1",
    "tdpo2",
    # policy gradient
    "AGG_MODES", "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "PolicyLossOutput", "aggregate",
    "cpgd", "dapo", "dapo_dynamic_sampling_mask", "gpg", "grpo", "kl_in_reward", "kl_penalty", "ppo_clip",
    "ppo_clip_per_token",
    # KL-regularized successors
    "APOShaping", "EMAReference", "ReferenceResetSchedule", "TrustRegionProjection", "apo", "apo_shaping", "archer",
    "critical_token_kl", "difficulty_filter", "disco", "ema_update_", "grpo_care_bonus", "gvpo", "kdrl", "rpg",
    "troll", "troll_project",
]
