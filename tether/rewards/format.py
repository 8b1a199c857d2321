"""Format rewards and the weighted combination of several rewards.

``TagFormatReward`` checks the reasoning/answer layout of R1-style completions (``<think>…</think>
<answer>…</answer>``). ``CombinedRuleReward`` (built with ``weighted_sum``) combines several rewards into one
number and reports each component for logging, which is how multi-objective rule rewards (correctness +
format + length, DocThinker-style) are assembled from the single-purpose rewards of this package.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

RewardCallable = Callable[[str, str, Mapping[str, Any]], "float | None"]


class TagFormatReward:
    """1.0 if the completion has each tag's block exactly once, in the given order; else 0.0. Never None.

    For ``tags=("think", "answer")`` the completion must contain exactly one ``<think>``, one ``</think>``,
    one ``<answer>`` and one ``</answer>`` (exact, case-sensitive, no attributes), positioned as
    ``<think> … </think> … <answer> … </answer>``, and every block's content must be non-empty after
    stripping whitespace (an empty ``<answer></answer>`` is not paid). Text before, between and after the
    blocks is allowed unless ``strict=True``, which allows only whitespace there.

    ``"<think>2+2</think> <answer>4</answer>"`` → 1.0; ``"<answer>4</answer><think>…</think>"`` → 0.0 (order);
    ``"<think>a</think><think>b</think><answer>4</answer>"`` → 0.0 (twice); ``"<think>a<answer>4</answer>"``
    → 0.0 (unclosed).
    """

    name = "tag_format"

    def __init__(self, tags: tuple[str, ...] = ("think", "answer"), strict: bool = False):
        if not tags or any(not re.fullmatch(r"[A-Za-z][\w-]*", t) for t in tags):
            raise ValueError(f"tags must be a non-empty tuple of tag names like 'think', got {tags!r}")
        if len(set(tags)) != len(tags):
            raise ValueError(f"tags must be distinct, got {tags!r}")
        self.tags = tuple(tags)
        self.strict = strict

    def check(self, completion: str) -> bool:
        """Whether ``completion`` has the required layout (see the class docstring)."""
        pos = 0
        outside = []
        for tag in self.tags:
            open_, close = f"<{tag}>", f"</{tag}>"
            if completion.count(open_) != 1 or completion.count(close) != 1:
                return False
            start, end = completion.find(open_), completion.find(close)
            if start < pos or end < start:
                return False
            if not completion[start + len(open_) : end].strip():
                return False
            outside.append(completion[pos:start])
            pos = end + len(close)
        outside.append(completion[pos:])
        return not self.strict or all(not s.strip() for s in outside)

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        return 1.0 if self.check(completion) else 0.0


class CombinedRuleReward:
    """A weighted combination of rewards that also reports each component.

    With components ``r_i`` (each a reward callable returning float or None) and weights ``w_i > 0``, let
    ``S`` be the components that did not return None on this row. Then

    - ``renormalize=True`` (default): ``R = Σ_{i∈S} w_i r_i / Σ_{i∈S} w_i``, a weighted *mean* over the
      components that have an opinion, so a row without, say, unit tests is scored on the rest on the same
      scale instead of being dragged toward 0;
    - ``renormalize=False``: ``R = Σ_{i∈S} w_i r_i`` (a plain weighted sum; use it for additive shaping such
      as DAPO's ``R = R_acc + R_overlong``, where averaging would halve the penalty).

    ``R`` is None when every component returns None. Example (worked in the tests): weights
    ``{math: 2, format: 1, code: 1}``, scores ``{1.0, 0.0, None}`` → ``(2·1 + 1·0) / (2 + 1) = 2/3``.

    Use ``components`` for per-component logging and ``combine`` on its output to avoid scoring twice;
    ``__call__`` does both. A component returning a non-number or NaN raises ``ValueError`` naming it.
    """

    name = "combined"

    def __init__(self, rewards: Mapping[str, tuple[RewardCallable, float]], renormalize: bool = True):
        if not rewards:
            raise ValueError("CombinedRuleReward needs at least one component")
        for name, entry in rewards.items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0])):
                raise ValueError(f"component {name!r} must be a (reward_callable, weight) pair, got {entry!r}")
            w = entry[1]
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"component {name!r}: weight must be a finite number > 0, got {w!r}")
        self.rewards = {name: (fn, float(w)) for name, (fn, w) in rewards.items()}
        self.renormalize = renormalize

    def components(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> dict[str, float | None]:
        """Each component's score (None = no opinion), in the order the components were given."""
        out: dict[str, float | None] = {}
        for name, (fn, _) in self.rewards.items():
            value = fn(prompt, completion, metadata)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                    raise ValueError(f"reward component {name!r} returned {value!r}; expected a float or None")
                value = float(value)
            out[name] = value
        return out

    def combine(self, scores: Mapping[str, float | None]) -> float | None:
        """The combined reward from ``components``' output (formula in the class docstring)."""
        present = [(self.rewards[name][1], s) for name, s in scores.items() if s is not None]
        if not present:
            return None
        total = sum(w * s for w, s in present)
        return total / sum(w for w, _ in present) if self.renormalize else total

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        return self.combine(self.components(prompt, completion, metadata))


def weighted_sum(rewards: Mapping[str, tuple[RewardCallable, float]], renormalize: bool = True) -> CombinedRuleReward:
    """``CombinedRuleReward(rewards, renormalize)``: ``weighted_sum({"acc": (MathAnswerReward(), 1.0),
    "format": (TagFormatReward(), 0.2)})``. See ``CombinedRuleReward`` for the formula and None handling."""
    return CombinedRuleReward(rewards, renormalize=renormalize)
