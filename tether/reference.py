"""Reference models and the strategies that move them.

The reference π_ref is the anchor of every KL term tether reports or optimizes. It is not a loss: it is a set of
weights, and how those weights are chosen is a design decision of its own.

* ``frozen_copy(model)`` — the fixed reference: a deep copy with gradients off, which cannot drift.
* ``reference_context(model)`` — inside it a model computes the reference: LoRA adapters disabled (the frozen
  base is the reference, so no second copy of the weights exists), no gradients.
* ``ema_update_`` — the in-place update θ_ref ← d·θ_ref + (1−d)·θ every moving strategy applies (GRPO-CARE's EMA,
  Chen et al. 2025; WARP's EMA anchor, Ramé et al. 2024; TR-DPO's soft update; d = 0 copies).
* ``ReferenceResetSchedule`` — when ProRL's reset is due: periodically, at listed steps, or when a validation metric
  stalls (Liu et al. 2025).
* ``ReferenceSync`` — the reference strategies the training recipes take by name (``reference:`` in their configs):
  ``fixed``, ``ema`` (WARP's EMA anchor), ``reset`` (ProRL), ``soup`` (SALSA), ``trdpo_soft`` / ``trdpo_hard``
  (TR-DPO). All moving strategies are one update, θ_ref ← (1 − r)·θ_ref + r·θ every K optimizer steps, with their
  own r and K; ``ReferenceSync.metrics`` says which reference was in force at a step.
* ``soup_state`` — the weighted average of several models' state dicts (SALSA's reference; ``tether merge``'s soups).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["REFERENCE_STRATEGIES", "ReferenceResetSchedule", "ReferenceSync", "check_same_tensors", "ema_update_",
           "frozen_copy", "reference_context", "soup_state"]


def frozen_copy(model):
    """A deep copy with gradients off, in eval mode — a reference that cannot drift."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


@contextlib.contextmanager
def reference_context(model):
    """Inside this context ``model`` computes the reference: LoRA adapters disabled (peft), no gradients."""
    with contextlib.ExitStack() as stack:
        if hasattr(model, "disable_adapter"):
            stack.enter_context(model.disable_adapter())
        stack.enter_context(torch.no_grad())
        yield model


@torch.no_grad()
def ema_update_(ref_state: MutableMapping[str, Tensor], policy_state: Mapping[str, Tensor], decay: float) -> None:
    """In place: ``θ_ref ← decay·θ_ref + (1 − decay)·θ`` for every floating tensor; other tensors are copied.

    GRPO-CARE (``ema_trainer.py::moving_average``: ``param_ema.copy_(lerp(param, param_ema, β))``, β = 0.995 in the
    scripts; ``decay = 0`` copies). Works on ``model.state_dict()`` (tensors share storage with the parameters).
    A tensor that appears under several names (tied input embedding and LM head) is updated once: a second
    ``lerp_`` on the same storage would apply the decay twice.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update_: decay must be in [0, 1] (0 = copy the policy), got {decay}")
    missing = set(ref_state) ^ set(policy_state)
    if missing:
        raise KeyError(f"ema_update_: reference and policy state dicts differ in keys {sorted(missing)[:5]}")
    seen: set[int] = set()
    for name, ref in ref_state.items():
        if ref.data_ptr() in seen:
            continue
        seen.add(ref.data_ptr())
        new = policy_state[name].to(device=ref.device, dtype=ref.dtype)
        if ref.is_floating_point() and decay > 0.0:
            ref.lerp_(new, 1.0 - decay)
        else:
            ref.copy_(new)



@dataclass
class ReferenceResetSchedule:
    """ProRL's periodic hard reset of the reference to the current policy (Liu et al. 2025).

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

    On a reset the caller copies the policy weights into the reference **and** re-initializes the optimizer
    (``ReferenceSync("reset").step`` does both). Immediately afterwards the KL term and its gradient are exactly
    zero.
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


REFERENCE_STRATEGIES = ("fixed", "ema", "reset", "soup", "trdpo_soft", "trdpo_hard")
"""The reference strategies by name (``ReferenceSync.strategy``; the ``reference`` field of the recipes' configs)."""

MOVING_STRATEGIES = ("ema", "reset", "trdpo_soft", "trdpo_hard")


@dataclass
class ReferenceSync:
    """Which reference is in force at every optimizer step, and when it moves.

    Every moving strategy is the same update applied after optimizer steps K, 2K, 3K, …::

        θ_ref ← (1 − r)·θ_ref + r·θ          (r = rate, K = every)

    ========== ======================================= ============ ====== ===============================
    strategy   source                                   r            K      optimizer state
    ========== ======================================= ============ ====== ===============================
    fixed      the starting policy (or ``ref_model``)   —            —      kept
    soup       SALSA (Chegini et al. 2024): the         —            —      kept
               uniform average of ``ref_soup`` models
    ema        WARP's EMA anchor (Ramé et al. 2024,     μ (0.01)     1      kept
               θ_ema ← (1 − μ)·θ_ema + μ·θ)
    reset      ProRL (Liu et al. 2025, "reference       1            N      **cleared** (AdamW's moments
               policy reset")                                               and step count start again)
    trdpo_soft TR-DPO (Gorbatovski et al. 2024),        α (0.6)      τ      kept
               soft update π_ref ← α·π_θ + (1 − α)·π_ref
    trdpo_hard TR-DPO, hard update: π_ref ← π_θ         1            τ      kept
    ========== ======================================= ============ ====== ===============================

    μ = 0.01 is WARP's value as we recall it (arXiv:2406.16768), not checked against the paper here; α = 0.6 and
    τ = 512 are TRL's TR-DPO defaults.

    Limits that follow from the formula: r = 0 is the fixed reference; r = 1 with K = 1 makes the reference the
    policy of the previous step (at every step the KL to it starts at 0). TR-DPO's soft update is applied every τ
    steps, as TRL's ``SyncRefModelCallback`` does. ProRL's reset clears the optimizer's per-parameter state
    (ProRL, arXiv:2505.24864, "reference policy reset": the reference becomes a recent snapshot of the policy and
    the optimizer states are re-initialized): after a reset the first AdamW step is a fresh one (bias-corrected
    moments from zero, so a step of size ≈ lr·sign(g) per coordinate); the learning-rate schedule continues (it is
    the run's). ProRL's own trigger (validation stalls) is :class:`ReferenceResetSchedule`; here the reset is
    periodic.

    Fields:
        strategy: one of :data:`REFERENCE_STRATEGIES`.
        rate: r of the update (``ema``: μ; ``trdpo_soft``: α); ``reset`` and ``trdpo_hard`` use 1.
        every: K, optimizer steps between updates.
        steps: optimizer steps seen (state).
        version: updates applied so far (state): version v is the reference after the v-th update; 0 is the start.
        last_sync: the optimizer step of the last update, 0 before the first (state).
    """

    strategy: str = "fixed"
    rate: float = 1.0
    every: int = 1
    steps: int = field(default=0, init=False)
    version: int = field(default=0, init=False)
    last_sync: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.strategy not in REFERENCE_STRATEGIES:
            raise ValueError(f"reference: unknown strategy {self.strategy!r}; choose one of "
                             f"{', '.join(REFERENCE_STRATEGIES)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"ref_rate must be in [0, 1] (0 = fixed, 1 = copy the policy), got {self.rate}")
        if self.every < 1:
            raise ValueError(f"ref_every must be ≥ 1 (optimizer steps between reference updates), got {self.every}")
        if self.strategy in ("reset", "trdpo_hard"):
            self.rate = 1.0

    @property
    def moving(self) -> bool:
        """True when the reference changes during the run (it then has to be scored online and checkpointed)."""
        return self.strategy in MOVING_STRATEGIES

    @property
    def resets_optimizer(self) -> bool:
        return self.strategy == "reset"

    def due(self) -> bool:
        """Whether the optimizer step just taken (``steps + 1``) is followed by an update."""
        return self.moving and (self.steps + 1) % self.every == 0

    @torch.no_grad()
    def step(self, reference, policy, optimizer=None) -> bool:
        """Call after every optimizer step with the reference and policy modules; True when the reference moved.
        With ``reset`` the optimizer's per-parameter state is cleared too."""
        update = self.due()
        self.steps += 1
        if not update:
            return False
        ema_update_(reference.state_dict(), policy.state_dict(), 1.0 - self.rate)
        if self.resets_optimizer and optimizer is not None:
            optimizer.state.clear()
        self.version += 1
        self.last_sync = self.steps
        return True

    def metrics(self) -> dict[str, float]:
        """The reference in force for the coming step, for the run's metrics (numbers, so TensorBoard plots them and
        runs compare key by key; the strategy's name is the run's ``ref_strategy``): ``ref/version`` (updates
        applied so far), ``ref/steps_since_sync`` (optimizer steps taken since the reference last moved, or since
        the start) and ``ref/rate`` (r; 0 for a reference that does not move)."""
        return {"ref/version": float(self.version), "ref/steps_since_sync": float(self.steps - self.last_sync),
                "ref/rate": self.rate if self.moving else 0.0}

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "version": self.version, "last_sync": self.last_sync}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.steps, self.version, self.last_sync = int(state["steps"]), int(state["version"]), int(state["last_sync"])


@torch.no_grad()
def soup_state(states: list[Mapping[str, Tensor]], weights: list[float] | None = None, *,
               names: list[str] | None = None) -> dict[str, Tensor]:
    """The weighted average ``Σ_i w_i·θ_i`` of several state dicts (uniform ``w_i = 1/n`` by default), accumulated in
    float64 and returned in each tensor's own dtype; non-floating tensors must agree and are copied.

    SALSA (Chegini et al. 2024, arXiv:2411.01798) uses the soup of independently fine-tuned models as the KL
    reference; model soups (Wortsman et al. 2022) average fine-tuned weights. A soup of n identical fp32 models is
    that model exactly: the float64 sum's error is far below fp32's spacing, so it rounds back to θ.
    Mismatched keys or shapes are a one-line error naming the model (``names``) and the tensor.
    Weights need not sum to 1 (then it is an extrapolation, not an average).
    """
    if not states:
        raise ValueError("soup_state: no models to average")
    names = names or [f"model {i}" for i in range(len(states))]
    if weights is None:
        weights = [1.0 / len(states)] * len(states)
    if len(weights) != len(states):
        raise ValueError(f"soup_state: {len(weights)} weights for {len(states)} models; give one weight per model")
    check_same_tensors(states, names)
    first = states[0]
    out = {}
    for key, value in first.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        acc = torch.zeros(value.shape, dtype=torch.float64, device=value.device)
        for w, state in zip(weights, states):
            acc.add_(state[key].to(torch.float64), alpha=float(w))
        out[key] = acc.to(value.dtype)
    return out


def check_same_tensors(states: list[Mapping[str, Tensor]], names: list[str]) -> None:
    """One-line ``ValueError`` unless every state dict has the same tensor names and shapes as the first and the
    same values in its non-floating tensors (which cannot be averaged); ``names`` name the models in the message."""
    first = states[0]
    for name, state in zip(names[1:], states[1:]):
        if set(state) != set(first):
            diff = sorted(set(state) ^ set(first))
            raise ValueError(f"{name} and {names[0]} differ in tensors {diff[:3]} ({len(diff)} in all); only models "
                             "of one architecture can be merged")
        for key, value in state.items():
            if value.shape != first[key].shape:
                raise ValueError(f"tensor {key!r} is {tuple(value.shape)} in {name} but {tuple(first[key].shape)} in "
                                 f"{names[0]}; only models of one architecture can be merged")
            if not value.is_floating_point() and not torch.equal(value, first[key]):
                raise ValueError(f"integer tensor {key!r} differs between {name} and {names[0]}; it cannot be "
                                 "averaged")
