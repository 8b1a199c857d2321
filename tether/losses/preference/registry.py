"""The preference recipe's table of objectives: what each needs computed, and whether the reference runs online.

Config names are the function names. The recipe (``tether.recipes.preference``) builds the inputs an entry lists in
``needs`` and calls ``fn(pc, pr, rc, rr, **inputs, beta=..., **loss_args)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tether.losses.preference._common import PreferenceLossOutput
from tether.losses.preference.dpo import dpo, f_dpo, hinge_dpo, ipo, robust_dpo
from tether.losses.preference.kto import kto
from tether.losses.preference.reference_free import orpo, simpo
from tether.losses.preference.token_level import ra_dpo, tdpo, tdpo1, tdpo2
from tether.losses.preference.variants import hdpo, longpo

__all__ = ["PREFERENCE_INPUTS", "PREFERENCE_LOSSES", "LossSpec"]

#: Keyword inputs a preference objective may need beyond the four positional log-prob tensors.
#: "lengths" -> chosen_lengths/rejected_lengths, "seq_kl" -> chosen_seq_kl/rejected_seq_kl,
#: "seq_risk" -> chosen_seq_risk/rejected_seq_risk, "seq_risk_split" -> chosen_seq_risk_split/rejected_seq_risk_split
#: (Ra-DPO with ``split_risk_ratio=True``; no entry needs it by default), "kl_reference" -> kl_reference,
#: "chosen_nll" -> chosen_nll.
PREFERENCE_INPUTS = frozenset({"lengths", "seq_kl", "seq_risk", "seq_risk_split", "kl_reference", "chosen_nll"})


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
