"""Rewards: callables ``reward(prompt: str, completion: str, metadata: dict) -> float | None``.

``metadata`` is the dataset row the prompt came from; a reward reads the keys it needs. ``None`` means "no
opinion on this row" (the caller skips the row for this reward instead of scoring it 0). Completions are
decoded text without special tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from tether.rewards.build import REWARD_NAMES, build_reward
from tether.rewards.format import CombinedRuleReward, TagFormatReward, weighted_sum
from tether.rewards.math import MathAnswerReward, extract_answer
from tether.rewards.model import RewardModel
from tether.rewards.rules import (
    CONSTRAINT_TYPES,
    AllCaps,
    Constraint,
    EndWith,
    ExcludeWord,
    IncludeKeyword,
    InstructionFollowingReward,
    Lowercase,
    MaxWords,
    MinWords,
    NoCommas,
    NumBullets,
    StartWith,
    WrapInQuotes,
    count_words,
    find_conflict,
    from_dict,
    rule_reward,
    satisfied,
    to_dict,
    words,
)
from tether.rewards.sandbox import CodeTestReward, SandboxResult, extract_code, run_sandboxed
from tether.rewards.shaping import OverlongPenalty, dapo_overlong_penalty


class RewardFn(Protocol):
    """The library's reward interface (see the module docstring)."""

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None: ...


__all__ = [
    "REWARD_NAMES",
    "build_reward",
    "CONSTRAINT_TYPES",
    "AllCaps",
    "CodeTestReward",
    "CombinedRuleReward",
    "Constraint",
    "EndWith",
    "ExcludeWord",
    "IncludeKeyword",
    "InstructionFollowingReward",
    "Lowercase",
    "MathAnswerReward",
    "MaxWords",
    "MinWords",
    "NoCommas",
    "NumBullets",
    "OverlongPenalty",
    "RewardFn",
    "RewardModel",
    "SandboxResult",
    "StartWith",
    "TagFormatReward",
    "WrapInQuotes",
    "count_words",
    "dapo_overlong_penalty",
    "extract_answer",
    "extract_code",
    "find_conflict",
    "from_dict",
    "rule_reward",
    "run_sandboxed",
    "satisfied",
    "to_dict",
    "weighted_sum",
    "words",
]
