"""What a training loop calls around the loss: GRPO-CARE's consistency bonus and EMA reference (§18), online
difficulty filtering (§19) and ProRL's periodic reference resets (§20).

Notation: see ``tether.losses.regularized`` (``spec §N`` = section N of ``methods/online-rl.md``). None of these is a
loss: the bonus is added to the reward, the filter drops prompts before the update, and the two schedules say when to
move the reference model's weights toward (EMA) or onto (reset) the policy's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tether.losses.regularized._common import groups

__all__ = ["EMAReference", "ReferenceResetSchedule", "difficulty_filter", "ema_update_", "grpo_care_bonus"]


# ----------------------------------------------------------------------------------------------------------
# §18 GRPO-CARE: consistency bonus and EMA reference
# ----------------------------------------------------------------------------------------------------------


def grpo_care_bonus(
    accuracy: Tensor,
    ref_logps: Tensor,
    answer_mask: Tensor,
    *,
    group_size: int,
    bonus_coef: float = 0.5,
    confidence_cap: float | None = 0.95,
    margin: float = 0.01,
) -> Tensor:
    """GRPO-CARE's consistency bonus: reward correct answers that the EMA reference finds likely (spec §18).

    Equation (code ``src/r1-v/src/open_r1/trainer/grpo_trainer_ref_ema.py``, ``use_care``)::

        conf_i = min( exp( Σ_{t∈answer} log π_ref(y_{i,t}) / (|answer_i| + 1e-6) ), u )
        A      = { i : acc_i > 0.1 and acc_i ≥ mean_G acc }               (relative high-accuracy set)
        τ      = mean_{i∈A} conf_i − margin
        b_i    = λ·acc_i  if i ∈ A and conf_i ≥ τ,  else 0                 (add to the reward: R_i ← R_i + b_i)

    Paper: Chen et al. 2025, "GRPO-CARE: Consistency-Aware Reinforcement Learning for Multimodal Reasoning".
    Code: ``TencentARC/GRPO-CARE`` (read: the block above, verified line by line).

    Shapes: ``accuracy`` ``(B,)`` (the accuracy reward alone, not the total); ``ref_logps`` ``(B, T)`` log-probs of the
    sampled tokens under the EMA reference; ``answer_mask`` ``(B, T)`` marks the final-answer span (tokenizer-dependent
    ``<answer>`` detection is the caller's). Returns the bonus ``(B,)``, detached.

    Defaults (``scripts/run_grpo_care_margin0.01_seed_bench_r1.sh``): ``λ = 0.5``, ``u = 0.95``, ``margin = 0.01``.
    Departure: groups are the G responses of one prompt; the official "group" is the per-device batch (1 prompt × 8
    generations in its scripts, the same thing there). An empty answer span gives conf = exp(0) = 1 → u, as in the code.
    """
    with torch.no_grad():
        am = answer_mask.to(torch.bool)
        mean_logp = torch.where(am, ref_logps, torch.zeros_like(ref_logps)).sum(-1) / (am.sum(-1) + 1e-6)
        conf = torch.exp(mean_logp)
        if confidence_cap is not None:
            conf = conf.clamp(max=confidence_cap)
        acc = groups(accuracy.detach().to(conf.dtype), group_size, "grpo_care_bonus")
        conf = groups(conf, group_size, "grpo_care_bonus")
        accurate = (acc > 0.1) & (acc >= acc.mean(-1, keepdim=True))
        n_acc = accurate.sum(-1, keepdim=True)
        threshold = torch.where(accurate, conf, torch.zeros_like(conf)).sum(-1, keepdim=True)
        threshold = threshold / n_acc.clamp_min(1) - margin
        bonus = torch.where(accurate & (conf >= threshold), bonus_coef * acc, torch.zeros_like(acc))
    return bonus.reshape(-1)


@torch.no_grad()
def ema_update_(ref_state: MutableMapping[str, Tensor], policy_state: Mapping[str, Tensor], decay: float) -> None:
    """In place: ``θ_ref ← decay·θ_ref + (1 − decay)·θ`` for every floating tensor; other tensors are copied.

    GRPO-CARE (``ema_trainer.py::moving_average``: ``param_ema.copy_(lerp(param, param_ema, β))``, β = 0.995 in the
    scripts; ``decay = 0`` copies). Works on ``model.state_dict()`` (tensors share storage with the parameters).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1] (0 = copy the policy), got {decay}")
    missing = set(ref_state) ^ set(policy_state)
    if missing:
        raise KeyError(f"ema_update_: reference and policy state dicts differ in keys {sorted(missing)[:5]}")
    for name, ref in ref_state.items():
        new = policy_state[name].to(device=ref.device, dtype=ref.dtype)
        if ref.is_floating_point() and decay > 0.0:
            ref.lerp_(new, 1.0 - decay)
        else:
            ref.copy_(new)


@dataclass
class EMAReference:
    """GRPO-CARE's slowly moving reference: every ``every`` optimizer steps, ``θ_ref ← d·θ_ref + (1−d)·θ`` (§18).

    Fields:
        decay: d = 0.995 (script); 0 turns it into a hard copy ("reset every K steps").
        every: K = 10 (script): the update happens on calls K, 2K, 3K, …
        steps: calls to :meth:`step` so far (state).
    """

    decay: float = 0.995
    every: int = 10
    steps: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"EMAReference.every must be ≥ 1 (optimizer steps between updates), got {self.every}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"EMAReference.decay must be in [0, 1], got {self.decay}")

    def step(self, ref_state: MutableMapping[str, Tensor], policy_state: Mapping[str, Tensor]) -> bool:
        """Call once per optimizer step; returns True when the reference was updated."""
        self.steps += 1
        if self.steps % self.every:
            return False
        ema_update_(ref_state, policy_state, self.decay)
        return True


# ----------------------------------------------------------------------------------------------------------
# §19 online difficulty filtering, §20 ProRL reference resets
# ----------------------------------------------------------------------------------------------------------


def difficulty_filter(pass_rates: Tensor, low: float, high: float) -> Tensor:
    """Balanced online difficulty filtering: keep prompts with ``low ≤ p̂ ≤ high`` (spec §19).

    ``p̂ = #correct/G`` over a prompt's G rollouts, ``Shape: (Q,)`` → boolean keep mask ``(Q,)``. The caller refills the
    batch with new prompts until it is full ("stack" rollout) and should log how many were dropped.

    Paper: Bae et al. 2025, "Online Difficulty Filtering for Reasoning Oriented Reinforcement Learning",
    arXiv:2504.03380 (abstract read: expected improvement is lower-bounded by the variance p(1−p) of the success
    probability, so intermediate difficulty is best). The band has no default: our recollection [0.25, 0.75] is
    UNVERIFIED. DAPO's dynamic sampling (``0 < p̂ < 1``) is the special case ``low=1/G, high=1−1/G``.
    Both ends are inclusive with a 1e-9 tolerance, so ``k/G`` on a bound is kept despite float rounding.
    """
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"difficulty_filter: need 0 ≤ low ≤ high ≤ 1, got low={low}, high={high}")
    p = pass_rates.detach()
    return (p >= low - 1e-9) & (p <= high + 1e-9)


@dataclass
class ReferenceResetSchedule:
    """ProRL's periodic hard reset of the reference to the current policy (spec §20).

    ProRL (Liu et al. 2025, "ProRL: Prolonged Reinforcement Learning Expands Reasoning Boundaries in Large Language
    Models", arXiv:2505.24864) keeps a KL penalty to a reference and, when validation stalls or degrades, resets the
    reference to the current policy and re-initializes the optimizer. The trigger and schedule are UNVERIFIED (the
    paper describes resets at stage boundaries / when validation degrades), so this helper supports both:

    Fields:
        every: reset every ``every`` optimizer steps (None: off).
        at_steps: explicit optimizer steps at which to reset.
        patience: reset after this many consecutive validations without improvement (None: off).
        min_delta: an improvement must exceed this to count.
        higher_is_better: direction of the validation metric.

    On a reset the caller must: copy the policy weights into the reference (``ref.load_state_dict(policy.state_dict())``
    or ``ema_update_(…, decay=0)``) **and** re-create the optimizer (moments to zero). Immediately afterwards the KL
    term and its gradient are exactly zero.
    """

    every: int | None = None
    at_steps: tuple[int, ...] = ()
    patience: int | None = None
    min_delta: float = 0.0
    higher_is_better: bool = True
    steps: int = field(default=0, init=False)
    resets: int = field(default=0, init=False)
    _best: float | None = field(default=None, init=False, repr=False)
    _bad: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError(f"ReferenceResetSchedule.every must be ≥ 1 or None, got {self.every}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"ReferenceResetSchedule.patience must be ≥ 1 or None, got {self.patience}")

    def step(self) -> bool:
        """Call once per optimizer step; True when the reference must be reset now (periodic / listed steps)."""
        self.steps += 1
        due = (self.every is not None and self.steps % self.every == 0) or self.steps in self.at_steps
        if due:
            self._reset()
        return due

    def observe(self, value: float) -> bool:
        """Report a validation metric; True when it has not improved for ``patience`` evaluations (reset now)."""
        if self.patience is None:
            return False
        score = value if self.higher_is_better else -value
        if self._best is None or score > self._best + self.min_delta:
            self._best, self._bad = score, 0
            return False
        self._bad += 1
        if self._bad >= self.patience:
            self._reset()
            return True
        return False

    def _reset(self) -> None:
        self.resets += 1
        self._bad = 0
        self._best = None
