"""Length shaping: DAPO's soft overlong punishment (Yu et al., 2025, arXiv:2503.14476, Eq. 13).

With maximum length ``L_max`` (``max_len``), cache/buffer ``L_cache`` (``cache_len``) and factor ``κ``
(``penalty_factor``, 1 in the paper):

    R_len(|y|) = 0                                    if |y| ≤ L_max − L_cache
               = κ · ((L_max − L_cache) − |y|) / L_cache   if L_max − L_cache < |y| ≤ L_max
               = −κ                                   if |y| > L_max

It is *added* to the task reward (``weighted_sum(..., renormalize=False)``, see ``OverlongPenalty``).
With ``L_max = 20480, L_cache = 4096``: ``16384 → 0``, ``18432 → −0.5``, ``20480 → −1``, ``30000 → −1``.

Departure from verl's ``reward_manager/dapo.py``: verl computes ``min(−(|y| − (L_max − L_cache)) / L_cache · κ,
0)`` without the floor at ``−κ``; it never needs one because its responses are truncated at ``L_max``. Here
lengths above ``L_max`` are possible (the caller may pass any count), so the paper's ``−1`` branch is kept.

``|y|`` must be the *valid* response length: tokens generated up to and including EOS, padding excluded
(a pitfall noted in the spec: counting padding penalises short answers in long batches).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def dapo_overlong_penalty(length: int, max_len: int, cache_len: int, penalty_factor: float = 1.0) -> float:
    """DAPO's overlong term ``R_len(|y|)`` (module docstring), in ``[-penalty_factor, 0]``.

    ``dapo_overlong_penalty(18432, 20480, 4096) == -0.5``. Requires ``0 < cache_len <= max_len`` and
    ``length >= 0``; raises ``ValueError`` otherwise.
    """
    _require_int("length", length, 0)
    _require_int("max_len", max_len, 1)
    _require_int("cache_len", cache_len, 1)
    if cache_len > max_len:
        raise ValueError(f"cache_len ({cache_len}) must be <= max_len ({max_len})")
    expected = max_len - cache_len
    if length <= expected:
        return 0.0
    if length <= max_len:
        return penalty_factor * (expected - length) / cache_len
    return -penalty_factor


class OverlongPenalty:
    """Reward wrapper of ``dapo_overlong_penalty`` reading ``metadata["completion_tokens"]``.

    ``metadata`` is normally the dataset row; the caller adds the per-completion valid length (EOS included,
    padding excluded) as ``{**row, "completion_tokens": n}``. A missing count raises ``KeyError`` (silently
    skipping the shaping would change the objective unnoticed). Returns a value in ``[-penalty_factor, 0]``.

    DAPO's reward is ``weighted_sum({"acc": (acc_reward, 1.0), "overlong": (OverlongPenalty(20480, 4096), 1.0)},
    renormalize=False)``.
    """

    name = "overlong_penalty"

    def __init__(self, max_len: int, cache_len: int, penalty_factor: float = 1.0):
        dapo_overlong_penalty(0, max_len, cache_len)  # validates the arguments
        self.max_len = max_len
        self.cache_len = cache_len
        self.penalty_factor = penalty_factor

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        if "completion_tokens" not in metadata:
            row = metadata.get("id", "<no id>")
            raise KeyError(
                f"row id={row!r}: OverlongPenalty needs metadata['completion_tokens'] (the completion's token "
                "count, EOS included, padding excluded); pass {**row, 'completion_tokens': n}"
            )
        return dapo_overlong_penalty(metadata["completion_tokens"], self.max_len, self.cache_len, self.penalty_factor)
