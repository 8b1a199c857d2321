"""Reference models and the strategies that move them.

The reference π_ref is the anchor of every KL term tether reports or optimizes. It is not a loss: it is a set of
weights, and how those weights are chosen is a design decision of its own.

* ``frozen_copy(model)`` — the fixed reference: a deep copy with gradients off, which cannot drift.
* ``reference_context(model)`` — inside it a model computes the reference: LoRA adapters disabled (the frozen
  base is the reference, so no second copy of the weights exists), no gradients.
* ``ema_update_`` / ``EMAReference`` — a slowly moving reference θ_ref ← d·θ_ref + (1−d)·θ (GRPO-CARE, Chen et al.
  2025; WARP's EMA anchor, Ramé et al. 2024, is the same update).
* ``ReferenceResetSchedule`` — ProRL's periodic hard reset of the reference onto the policy (Liu et al. 2025), which
  also re-initializes the optimizer; ``reset_reference_`` does both.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["EMAReference", "ReferenceResetSchedule", "ema_update_", "frozen_copy", "reference_context",
           "reset_reference_"]


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
class EMAReference:
    """GRPO-CARE's slowly moving reference: every ``every`` optimizer steps, ``θ_ref ← d·θ_ref + (1−d)·θ``
    (Chen et al. 2025, GRPO-CARE; code ``TencentARC/GRPO-CARE``).

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
    (:func:`reset_reference_` does both). Immediately afterwards the KL term and its gradient are exactly zero.
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


def reset_reference_(reference, policy, optimizer) -> None:
    """ProRL's hard reset: copy the policy's weights into ``reference`` and re-initialize ``optimizer``.

    ProRL (Liu et al. 2025, arXiv:2505.24864, "Reference Policy Reset") resets the reference to a recent
    snapshot of the online policy *and* re-initializes the optimizer states; right after the reset the KL term and
    its gradient are exactly zero. Here the optimizer's per-parameter state (AdamW's moments and step count) is
    cleared, which is what a freshly built optimizer holds; the learning-rate schedule is not restarted (it is the
    run's, not the optimizer's).
    """
    reference.load_state_dict(policy.state_dict())
    optimizer.state.clear()
