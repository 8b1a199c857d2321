"""The online recipe's table of objectives: how each policy loss is called, and what it needs.

Every entry names a pure function of ``tether.losses``; the recipe (``tether.recipes.online_rl``) builds the inputs
listed in ``needs`` and calls it through :func:`call_objective`. Objectives that take raw group rewards (GVPO,
DisCO, APO, KDRL) do their own group normalisation; the others take advantages from ``tether.losses.policy.advantages``.

Objectives not in the table are still library functions, usable from your own loop: ``troll`` (needs the
policy's and the old policy's top-k logits), ``critical_token_kl`` (needs the reference's full logits) and A*-PO
(``astar_po_values``/``astar_po_targets``, which needs an offline pass of reference samples per prompt).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from tether.losses.policy.kl_objectives import apo, disco, gvpo, kdrl, rpg
from tether.losses.policy.surrogates import PolicyLossOutput, cpgd, dapo, gpg, grpo, ppo_clip
from tether.losses.policy.token_selective import archer

__all__ = ["ONLINE_OBJECTIVES", "OnlineObjective", "call_objective", "objective_agg_mode"]

OBJECTIVE_INPUTS = frozenset({"ref_logps", "entropy", "teacher_logps"})


@dataclass(frozen=True)
class OnlineObjective:
    """How the online recipe calls one policy objective.

    Fields:
        fn: the loss function (``tether.losses.<name>``).
        takes: ``"advantages"`` — called ``fn(logps, old_logps, advantages, mask, ...)``; ``"rewards"`` — called
            with the group's raw (possibly KL-shaped) rewards and ``group_size`` and normalises them itself.
        needs: extra per-token inputs from ``OBJECTIVE_INPUTS``.
        own_kl: True when the objective carries its own regularizer to the reference/teacher (set it through
            ``loss_args``); the recipe then adds no KL term of its own.
        default_advantage: advantage estimator used when the config does not name one.
        default_kl_coef: β of the recipe's KL term when the config does not set one (GRPO: 0.04, k3 in the loss).
        splittable: the mini-batch loss equals the share-weighted mean of its micro-batch losses (means over
            tokens or sequences). False for losses over the whole batch (GVPO sums groups; DisCO's constraint is a
            batch mean): the recipe then never splits a mini-batch into micro-batches.
    """

    fn: Callable[..., PolicyLossOutput]
    takes: str = "advantages"
    needs: frozenset[str] = frozenset()
    own_kl: bool = False
    default_advantage: str = "grpo"
    default_kl_coef: float = 0.0
    splittable: bool = True


ONLINE_OBJECTIVES: dict[str, OnlineObjective] = {
    "ppo_clip": OnlineObjective(ppo_clip),
    "grpo": OnlineObjective(grpo, default_kl_coef=0.04),
    "dapo": OnlineObjective(dapo),
    "gpg": OnlineObjective(gpg, default_advantage="gpg"),
    "cpgd": OnlineObjective(cpgd),
    "rpg": OnlineObjective(rpg, needs=frozenset({"ref_logps"}), own_kl=True),
    "archer": OnlineObjective(archer, needs=frozenset({"ref_logps", "entropy"}), own_kl=True),
    "gvpo": OnlineObjective(gvpo, takes="rewards", own_kl=True, splittable=False),
    "disco": OnlineObjective(disco, takes="rewards", splittable=False),
    "apo": OnlineObjective(apo, takes="rewards", needs=frozenset({"ref_logps"}), own_kl=True),
    "kdrl": OnlineObjective(kdrl, takes="rewards", needs=frozenset({"teacher_logps"}), own_kl=True),
}


def objective_agg_mode(name: str, loss_args: dict) -> str:
    """The aggregation mode the objective will use (its ``agg``/``loss_agg_mode`` argument or default)."""
    params = inspect.signature(ONLINE_OBJECTIVES[name].fn).parameters
    for key in ("agg", "loss_agg_mode"):
        if key in params:
            return str(loss_args.get(key, params[key].default))
    return "sequence"  # GVPO / DisCO: their own reductions over groups


def call_objective(name: str, *, logps: Tensor, old_logps: Tensor, mask: Tensor, advantages: Tensor | None,
                   rewards: Tensor | None, group_size: int, inputs: dict[str, Tensor], loss_args: dict,
                   max_len: int) -> PolicyLossOutput:
    """Call objective ``name`` on one micro-batch (rows grouped prompt-major, ``group_size`` per prompt)."""
    spec = ONLINE_OBJECTIVES[name]
    params = inspect.signature(spec.fn).parameters
    kwargs = dict(loss_args)
    if "max_len" in params:
        kwargs.setdefault("max_len", max_len)
    if name == "grpo":
        kwargs["kl_coef"] = 0.0  # the recipe adds the KL term itself (tether.losses.kl_penalty), for every objective
    if name == "archer":
        kwargs["entropy"] = inputs["entropy"]
    if name == "rpg":
        kwargs["ref_logps"] = inputs["ref_logps"]
    if spec.takes == "rewards":
        kwargs["group_size"] = group_size
        if name == "apo":
            return spec.fn(logps, old_logps, inputs["ref_logps"], rewards, mask, **kwargs)
        if name == "kdrl":
            return spec.fn(logps, old_logps, inputs["teacher_logps"], rewards, mask, **kwargs)
        return spec.fn(logps, old_logps, rewards, mask, **kwargs)
    if name == "archer":
        return spec.fn(logps, old_logps, inputs["ref_logps"], advantages, mask, **kwargs)
    return spec.fn(logps, old_logps, advantages, mask, **kwargs)
