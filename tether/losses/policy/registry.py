"""The online recipe's table of objectives: what each policy loss is called with, and what it needs computed.

Each entry names a pure function of ``tether.losses.policy`` and declares, by parameter name, which of the
recipe's per-micro-batch inputs it takes (``inputs``) and which arguments the recipe pins (``fixed``). The recipe
(``tether.recipes.online_rl``) builds every input an entry declares and calls :func:`call_objective`, which passes
exactly those by keyword — there is no branching on objective names anywhere. A new objective is one entry here.

Inputs the recipe can provide (shapes for a micro-batch of B rows, T positions):

==================  ==========  =========================================================================
name                shape       what
==================  ==========  =========================================================================
``logps``           (B, T)      log π_θ of the sampled tokens (differentiable)
``old_logps``       (B, T)      log π_old, the policy that sampled (constant)
``ref_logps``       (B, T)      log π_ref (constant)
``teacher_logps``   (B, T)      log π_teacher (KDRL; the reference when no teacher is configured)
``entropy``         (B, T)      entropy of π_θ(·|s_t) (differentiable)
``advantages``      (B,)/(B,T)  from the run's advantage estimator (``tether.losses.policy.advantages``)
``rewards``         (B,)        the group's raw (possibly KL-shaped) rewards; the objective normalises them
``mask``            (B, T)      response tokens that enter the loss
``group_size``      int         G: rows ``g·G … g·G+G−1`` answer one prompt
``max_len``         int         the rollout's ``max_new_tokens`` (constant-normaliser aggregation)
``tokens``          (B, T)      the sampled token ids (0 at padding)
``support_ids``     (B, T, K)   π_old's K most probable tokens, most probable first (TROLL's support)
``old_support_logps`` (B,T,K)   log π_old at ``support_ids``; ``old_rest_logp`` (B, T) its log-mass off them
``support_logps``   (B, T, K)   log π_θ at ``support_ids`` (differentiable); ``rest_logp`` (B, T) likewise
``ref_max_logp``    (B, T)      max_v log π_ref^{(T')}(v|s_t), the reference's certainty at temperature T'
``vocab_size``      int         |V| of the policy's softmax
``values``          (B,)        A*-PO's optimal value V*(x) of each row's prompt (stage 1, from the reference)
==================  ==========  =========================================================================

Hyperparameters a config sets through ``loss_args`` are the objective's keyword-only parameters, plus its
``stat_args``: those the recipe reads itself because they shape a statistics pass rather than the loss (TROLL's
support size K = ``max_support``; the critical-token KL's reference temperature T' = ``ref_temperature``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tether.losses.policy.astar_po import astar_po
from tether.losses.policy.chunked_forms import ppo_critical_token_kl, troll_sparse
from tether.losses.policy.kl_objectives import apo, disco, gvpo, kdrl, rpg
from tether.losses.policy.surrogates import AGG_MODES, PolicyLossOutput, cpgd, dapo, gpg, grpo, ppo_clip
from tether.losses.policy.token_selective import archer

__all__ = ["OBJECTIVE_INPUTS", "ONLINE_OBJECTIVES", "OnlineObjective", "call_objective", "check_loss_args",
           "objective_agg_mode", "stat_arg"]

OBJECTIVE_INPUTS = frozenset({"logps", "old_logps", "ref_logps", "teacher_logps", "entropy", "advantages",
                              "rewards", "mask", "group_size", "max_len", "tokens", "support_ids",
                              "old_support_logps", "old_rest_logp", "support_logps", "rest_logp", "ref_max_logp",
                              "vocab_size", "values"})
_ADVANTAGE_INPUTS = ("logps", "old_logps", "advantages", "mask", "max_len")
_REWARD_INPUTS = ("logps", "old_logps", "rewards", "mask", "group_size")


@dataclass(frozen=True)
class OnlineObjective:
    """How the online recipe calls one policy objective.

    Fields:
        fn: the loss function (``tether.losses.policy.<name>``).
        inputs: the recipe inputs it takes, by parameter name (see the module docstring).
        fixed: arguments the recipe pins (GRPO's own KL term is off: the recipe adds ``kl_penalty`` itself, for
            every objective alike).
        own_kl: True when the objective carries its own regularizer to the reference / teacher (set its β through
            ``loss_args``); the recipe then adds no KL term of its own.
        default_advantage: advantage estimator used when the config names none (objectives taking ``rewards``
            normalise within their groups themselves and ignore it).
        default_kl_coef: β of the recipe's KL term when the config sets none (GRPO: 0.04, k3 in the loss).
        splittable: the mini-batch loss equals the share-weighted mean of its micro-batch losses (means over
            tokens or sequences). False for losses over the whole batch (GVPO sums groups; DisCO's constraint is a
            batch mean): the recipe then never splits a mini-batch into micro-batches.
        stat_args: hyperparameters (name → default) the recipe reads for its statistics passes rather than passing
            them to ``fn`` (TROLL's K, the critical-token KL's T'); set through ``loss_args`` like the others.
        grouped: the objective uses the G completions of a prompt together (group baselines, group means). False
            for A*-PO, which regresses every completion on its own, so ``group_size`` may be 1.
    """

    fn: Callable[..., PolicyLossOutput]
    inputs: tuple[str, ...] = _ADVANTAGE_INPUTS
    fixed: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    own_kl: bool = False
    default_advantage: str = "grpo"
    default_kl_coef: float = 0.0
    splittable: bool = True
    stat_args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    grouped: bool = True

    @property
    def takes_rewards(self) -> bool:
        return "rewards" in self.inputs

    def needs(self, name: str) -> bool:
        return name in self.inputs

    def hyperparameters(self) -> set[str]:
        """Keyword-only parameters a config may set through ``loss_args``."""
        params = inspect.signature(self.fn).parameters
        own = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - set(self.inputs) - set(self.fixed) - {
            "ref_logps", "entropy", "logits", "token_kl", "kl_coef", "kl_estimator", "kl_importance_weight"}
        return own | set(self.stat_args)


ONLINE_OBJECTIVES: dict[str, OnlineObjective] = {
    "ppo_clip": OnlineObjective(ppo_clip),
    "grpo": OnlineObjective(grpo, fixed=MappingProxyType({"kl_coef": 0.0}), default_kl_coef=0.04),
    "dapo": OnlineObjective(dapo),
    "gpg": OnlineObjective(gpg, default_advantage="gpg"),
    "cpgd": OnlineObjective(cpgd),
    "rpg": OnlineObjective(rpg, inputs=(*_ADVANTAGE_INPUTS, "ref_logps"), own_kl=True),
    "archer": OnlineObjective(archer, inputs=(*_ADVANTAGE_INPUTS, "ref_logps", "entropy"), own_kl=True),
    "gvpo": OnlineObjective(gvpo, inputs=_REWARD_INPUTS, own_kl=True, splittable=False),
    "disco": OnlineObjective(disco, inputs=_REWARD_INPUTS, splittable=False),
    "apo": OnlineObjective(apo, inputs=(*_REWARD_INPUTS, "ref_logps", "max_len"), own_kl=True),
    "kdrl": OnlineObjective(kdrl, inputs=(*_REWARD_INPUTS, "teacher_logps", "max_len"), own_kl=True),
    "troll": OnlineObjective(troll_sparse, inputs=(
        "logps", "old_logps", "support_logps", "rest_logp", "old_support_logps", "old_rest_logp", "support_ids",
        "tokens", "advantages", "mask", "max_len"), stat_args=MappingProxyType({"max_support": 16})),
    "critical_token_kl": OnlineObjective(ppo_critical_token_kl, inputs=(
        "logps", "old_logps", "ref_logps", "ref_max_logp", "advantages", "mask", "vocab_size", "max_len"),
        own_kl=True, stat_args=MappingProxyType({"ref_temperature": 4.0})),
    "astar_po": OnlineObjective(astar_po, inputs=("logps", "ref_logps", "rewards", "values", "mask"), own_kl=True,
                                grouped=False),
}


def check_loss_args(name: str, loss_args: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the field when ``loss_args`` sets something objective ``name`` does not take."""
    if name not in ONLINE_OBJECTIVES:
        raise ValueError(f"loss: unknown objective {name!r}; choose one of {sorted(ONLINE_OBJECTIVES)}")
    allowed = ONLINE_OBJECTIVES[name].hyperparameters()
    unknown = set(loss_args) - allowed
    if unknown:
        raise ValueError(f"loss_args: {sorted(unknown)} are not hyperparameters of {name!r}; it accepts "
                         f"{sorted(allowed)} (the KL term is set by kl_coef / kl_estimator / kl_placement)")
    for key in ("agg", "loss_agg_mode"):
        if key in loss_args and loss_args[key] not in AGG_MODES:
            raise ValueError(f"loss_args.{key}: {loss_args[key]!r} is not one of {AGG_MODES}")


def stat_arg(name: str, loss_args: Mapping[str, Any], key: str) -> Any:
    """The value of statistics hyperparameter ``key`` of objective ``name``: from ``loss_args``, else its default."""
    return loss_args.get(key, ONLINE_OBJECTIVES[name].stat_args[key])


def objective_agg_mode(name: str, loss_args: Mapping[str, Any]) -> str:
    """The aggregation mode the objective will use (its ``agg``/``loss_agg_mode`` argument or default);
    ``"sequence"`` for GVPO / DisCO, which reduce over groups themselves."""
    params = inspect.signature(ONLINE_OBJECTIVES[name].fn).parameters
    for key in ("agg", "loss_agg_mode"):
        if key in params:
            return str(loss_args.get(key, params[key].default))
    return "sequence"


def call_objective(name: str, available: Mapping[str, Any], loss_args: Mapping[str, Any]) -> PolicyLossOutput:
    """Call objective ``name`` with the inputs its entry declares (taken from ``available`` by name), the arguments
    it pins, and the config's hyperparameters."""
    spec = ONLINE_OBJECTIVES[name]
    missing = [k for k in spec.inputs if available.get(k) is None]
    if missing:
        raise ValueError(f"objective {name!r} needs {missing}, which the caller did not compute")
    own = {k: v for k, v in loss_args.items() if k not in spec.stat_args}
    return spec.fn(**{k: available[k] for k in spec.inputs}, **spec.fixed, **own)
