"""Logits processors: the hook ``tether.sampling.sample`` calls at every decode step, between the model's
next-token logits and the token drawn.

Top-k and top-p live here (:class:`TopK`, :class:`TopP`); constraints (a grammar's token mask, one matcher per
row), token exclusion, reward tilting and guided decoding plug in through the same protocol.

The contract
------------
A processor is any object with

* ``changes_logprobs: bool`` — whether the log-probs ``sample`` records are taken *after* this processor.
  ``True`` for a constraint: the recorded log-prob of a token is then that of the constrained distribution the
  token was actually drawn from (a grammar mask renormalises over the allowed tokens). ``False`` when it only
  shapes the draw: the recorded log-probs stay those of the policy's own distribution, softmax(logits /
  temperature), which is what importance ratios against the policy need (top-k and top-p by default).
* ``__call__(scores, rows) -> scores``:

  - ``scores``: (R, V) float32, one row per *live* completion (rows leave the batch as they finish), the
    temperature-scaled logits (unscaled at temperature 0) as left by the processors before this one;
  - ``rows``: (R,) int64 on the same device, which completion each row is — its position in the returned
    :class:`~tether.sampling.Completions` (``prompt_index = rows // n``); stable across steps, so per-row state
    can be keyed by it (``rows.tolist()``);
  - returns (R, V) scores, float32, same device. ``-inf`` bans a token. Do not modify ``scores`` in place: return
    a new tensor (``masked_fill``, not ``masked_fill_``), or ``scores`` itself when nothing changes (the sampler
    then skips a softmax). Do not raise a score that an earlier processor set to ``-inf``.

and, for a processor with per-row state (a grammar matcher must be told each accepted token), both of

* ``start(rows) -> None``: a batch begins; ``rows`` (R0,) int64 are the completions of the batch, in its row
  order. Reset or create the state of those rows here (a processor object is reused across batches and calls).
* ``accept(tokens, rows) -> Tensor | None``: after every step, the token drawn for each live row (``tokens``
  (R,) int64, ``rows`` as in ``__call__``), including a row's last token (its end-of-sequence or stop token).
  Return ``None``, or an (R,) bool tensor: ``True`` finishes that row now, its completion ending with this token
  (``finished=True``, as at end-of-sequence).

The order
---------
Each step, ``sample`` computes ``scores = logits / temperature``, then runs the chain ``processors`` (the user's,
in order) followed by ``TopK(top_k)`` and ``TopP(top_p)`` (built from its arguments when they are active and the
temperature is positive; at temperature 0 they cannot change the arg-max). The processors with
``changes_logprobs=True`` must come first in the chain (``check_processors`` says so otherwise); the recorded
log-probs are ``log_softmax`` of the scores after them; the rest of the chain then shapes the scores the token is
drawn from (inverse CDF of their softmax, or their arg-max at temperature 0).

So, at temperature T, with constraint processors C and draw-only processors D:

    recorded log π(y_t) = log_softmax(C(logits / T))[y_t]
    y_t ~ softmax(D(C(logits / T)))            (y_t = argmax D(C(logits)) at T = 0, recorded with T = 1)

``engine="hf"`` (``model.generate``) honours stateless, draw-only processors (``TopK``/``TopP`` included), applied
in the same order through a ``transformers`` logits processor; it rejects the others with a ``ValueError``, as it
recomputes the log-probs by teacher forcing and has no per-row lifecycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["LogitsProcessor", "StatefulLogitsProcessor", "TopK", "TopP", "check_processors"]


class LogitsProcessor(Protocol):
    """A step of the chain between the logits and the draw (see the module docstring for the contract)."""

    changes_logprobs: bool

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor: ...


class StatefulLogitsProcessor(LogitsProcessor, Protocol):
    """A processor that keeps per-row state: told when a batch starts and which token each row drew."""

    def start(self, rows: torch.Tensor) -> None: ...

    def accept(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None: ...


def is_stateful(processor) -> bool:
    return hasattr(processor, "start") or hasattr(processor, "accept")


def check_processors(processors: Sequence) -> int:
    """Validate a chain; return how many processors at its head change the recorded log-probs.

    Raises ``ValueError`` naming the processor when one does not declare ``changes_logprobs`` as a bool, is not
    callable, has only one of ``start``/``accept``, or changes the log-probs after one that only shapes the draw.
    """
    reporting = 0
    for i, p in enumerate(processors):
        name = f"processors[{i}] ({type(p).__name__})"
        flag = getattr(p, "changes_logprobs", None)
        if not isinstance(flag, bool):
            raise ValueError(f"sample: {name} must declare changes_logprobs: bool — True when the recorded log-probs "
                             "are those of the distribution after it (a constraint), False when it only shapes the "
                             "draw (like top-k)")
        if not callable(p):
            raise ValueError(f"sample: {name} is not callable; a processor is called as processor(scores, rows)")
        if hasattr(p, "start") != hasattr(p, "accept"):
            raise ValueError(f"sample: {name} has only one of start/accept; a stateful processor needs both")
        if flag and reporting < i:
            raise ValueError(f"sample: {name} changes the recorded log-probs but comes after "
                             f"processors[{reporting}] ({type(processors[reporting]).__name__}), which only shapes "
                             "the draw; put the processors with changes_logprobs=True first")
        reporting += flag
    return reporting


@dataclass
class TopK:
    """Keep the ``k`` highest scores of each row (all tokens tied with the k-th), ban the rest.

    Args:
        k: how many tokens to keep; ``k ≥ V`` keeps all.
        changes_logprobs: ``False`` (default): the recorded log-probs stay those of the untruncated distribution.
    """

    k: int
    changes_logprobs: bool = False

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"TopK: k must be ≥ 1, got {self.k} (top_k=0 in sample() means no top-k)")

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.k >= scores.shape[-1]:
            return scores
        kth = torch.topk(scores, self.k, dim=-1).values[:, -1:]
        return scores.masked_fill(scores < kth, float("-inf"))


@dataclass
class TopP:
    """Nucleus sampling: keep the smallest set of highest-probability tokens whose mass reaches ``p``, ban the rest.

    A token is kept when the mass of the tokens ranked above it is ≤ ``p`` (so the most likely token always is).
    ``transformers``' ``TopPLogitsWarper`` keeps it when that mass is < ``p``: the two differ only at exact ties.

    Args:
        p: the mass to reach, 0 < p ≤ 1; ``p = 1`` keeps all.
        changes_logprobs: ``False`` (default): the recorded log-probs stay those of the untruncated distribution.
    """

    p: float
    changes_logprobs: bool = False

    def __post_init__(self):
        if not 0 < self.p <= 1:
            raise ValueError(f"TopP: need 0 < p ≤ 1, got {self.p}")

    def __call__(self, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.p >= 1.0:
            return scores
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > self.p  # keep the smallest prefix whose mass reaches p
        return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
