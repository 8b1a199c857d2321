"""A reward from names and weights, as the recipes' configs give them."""

from __future__ import annotations

from collections.abc import Mapping

from tether.rewards.format import TagFormatReward, weighted_sum
from tether.rewards.math import MathAnswerReward
from tether.rewards.model import RewardModel
from tether.rewards.rules import InstructionFollowingReward
from tether.rewards.sandbox import CodeTestReward
from tether.rewards.shaping import OverlongPenalty

REWARD_NAMES = {"instructions": InstructionFollowingReward, "math": MathAnswerReward, "format": TagFormatReward,
                "code": CodeTestReward}


def build_reward(weights: Mapping[str, float], *, reward_model: str | None = None, reward_model_weight: float = 1.0,
                 max_new_tokens: int = 0, overlong_buffer: int = 0):
    """The weighted mean of the named rule rewards (``REWARD_NAMES``) and, when given, a reward-model directory;
    plus DAPO's soft overlong penalty over the last ``overlong_buffer`` tokens before ``max_new_tokens``."""
    unknown = set(weights) - set(REWARD_NAMES)
    if unknown:
        raise ValueError(f"rewards: unknown reward(s) {sorted(unknown)}; choose from {sorted(REWARD_NAMES)} "
                         "(or reward_model)")
    components = {name: (REWARD_NAMES[name](), float(w)) for name, w in weights.items()}
    if reward_model:
        components["reward_model"] = (RewardModel(reward_model), reward_model_weight)
    if not components:
        raise ValueError("rewards: no reward configured")
    reward = weighted_sum(components, renormalize=True)
    if overlong_buffer:
        reward = weighted_sum({"task": (reward, 1.0),
                               "overlong": (OverlongPenalty(max_new_tokens, overlong_buffer), 1.0)},
                              renormalize=False)
    return reward
