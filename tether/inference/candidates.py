"""Candidates: N completions per prompt plus M independent base draws, all from π_ref in one batched sampling call,
scored once.

π_ref here is the distribution actually sampled: the model at ``temperature`` (no top-k / top-p, so the sampler's
recorded log-probs are those of the sampled law and a completion's sequence log-prob log π_ref(y|x) is their sum,
end-of-sequence token included; a completion cut at ``max_new_tokens`` is an outcome of its own, with the
probability of its tokens). The base draws never enter a selection: they are the independent reference sample the
win rate is measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.rollout import score_completions
from tether.sampling import Completions, render_prompts, sample

__all__ = ["Candidates", "draw_candidates"]


@dataclass(frozen=True)
class Candidates:
    """P prompts, each with ``n`` candidates (columns 0 … n−1) then ``m`` base draws (columns n … n+m−1)."""

    done: Completions
    """The P·(n + m) completions, prompt-major in the column order above."""
    n: int
    m: int
    rewards: Tensor
    """(P, n + m) float64: the reward of each completion (0 where the reward had no opinion)."""
    scored: Tensor
    """(P, n + m) bool: the reward had an opinion."""
    seq_logprob: Tensor
    """(P, n + m) float64: log π_ref(y|x), the sum of the sampler's token log-probs."""

    @property
    def prompts(self) -> int:
        return self.rewards.shape[0]

    def flat(self, prompt: int, column: int) -> int:
        """Position of (prompt, column) in ``done``."""
        return prompt * (self.n + self.m) + column


def draw_candidates(model, tokenizer, rows: Sequence[dict], reward: Callable, *, n: int, base_samples: int,
                    max_new_tokens: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 64,
                    use_chat_template: bool = True, progress: bool = False, processors: Sequence = ()) -> Candidates:
    """Sample n + ``base_samples`` completions of every row's prompt in one ``tether.sampling.sample`` call (batched
    across prompts; seeded) and score each with ``reward`` (``tether.rollout.score_completions``). ``processors``:
    logits processors of the sampler (token exclusion, a constraint); the candidates then come from the processed
    sampler and ``done.kl_cost`` holds each draw's KL cost of them."""
    if n < 1 or base_samples < 0 or not temperature > 0:
        raise ValueError(f"draw_candidates: need n ≥ 1, base_samples ≥ 0 and temperature > 0, got n={n}, "
                         f"base_samples={base_samples}, temperature={temperature}")
    per = n + base_samples
    prompt_ids = render_prompts(tokenizer, [r["prompt"] for r in rows], use_chat_template=use_chat_template)
    done = sample(model, tokenizer, prompt_ids, n=per, max_new_tokens=max_new_tokens, temperature=temperature,
                  seed=seed, batch_size=batch_size, progress=progress, desc="candidates", processors=processors)
    raw = score_completions(reward, rows, done)
    P = len(rows)
    rewards = torch.tensor([0.0 if v is None else float(v) for v in raw], dtype=torch.float64).view(P, per)
    scored = torch.tensor([v is not None for v in raw]).view(P, per)
    seq = torch.tensor([sum(lp) for lp in done.logprobs], dtype=torch.float64).view(P, per)
    return Candidates(done, n, base_samples, rewards, scored, seq)
