"""Held-out reward before and after training, compared on paired draws."""

from __future__ import annotations

from tether.stats import mean_ci95

__all__ = ["format_reward_gain", "reward_gain"]


def reward_gain(before: dict, after: dict) -> dict:
    """The report of two ``tether.rollout.evaluate_reward`` results on the same prompts and seeds: each summary
    (without its per-completion ``scores``), the gain of the mean and the 95% CI half-width of the paired
    differences (completion k after minus completion k before)."""
    deltas = [a - b for a, b in zip(after["scores"], before["scores"])]
    return {"reward_before": {k: v for k, v in before.items() if k != "scores"},
            "reward_after": {k: v for k, v in after.items() if k != "scores"},
            "reward_gain": after["reward_mean"] - before["reward_mean"],
            "reward_gain_ci95_halfwidth": mean_ci95(deltas)[1]}


def format_reward_gain(gain: dict) -> str:
    """One line: the means before and after with their CIs, and the gain with its paired CI."""
    before, after = gain["reward_before"], gain["reward_after"]
    return (f"held-out reward: before {before['reward_mean']:.3f} ± {before['reward_ci95_halfwidth']:.3f}, after "
            f"{after['reward_mean']:.3f} ± {after['reward_ci95_halfwidth']:.3f}  (gain {gain['reward_gain']:+.3f} ± "
            f"{gain['reward_gain_ci95_halfwidth']:.3f}, 95% CI, n={after['n']})")
