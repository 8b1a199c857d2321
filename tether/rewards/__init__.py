"""Rewards: callables ``reward(prompt: str, completion: str, metadata: dict) -> float | None``.

``metadata`` is the dataset row the prompt came from; a reward reads the keys it needs. ``None`` means "no
opinion on this row" (the caller skips the row for this reward instead of scoring it 0). Completions are
decoded text without special tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

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


class RewardFn(Protocol):
    """The library's reward interface (see the module docstring)."""

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None: ...


__all__ = [
    "CONSTRAINT_TYPES",
    "AllCaps",
    "Constraint",
    "EndWith",
    "ExcludeWord",
    "IncludeKeyword",
    "InstructionFollowingReward",
    "Lowercase",
    "MaxWords",
    "MinWords",
    "NoCommas",
    "NumBullets",
    "RewardFn",
    "StartWith",
    "WrapInQuotes",
    "count_words",
    "find_conflict",
    "from_dict",
    "rule_reward",
    "satisfied",
    "to_dict",
    "words",
]
