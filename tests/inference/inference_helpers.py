"""A model whose next-token logits are a fixed table indexed by the previous token, and the exact law of its
completions — a sequence space small enough to enumerate.

Tokens: 0 = end of sequence, 1 = 'a', 2 = 'b'. Completions stop at the end-of-sequence token or after
``MAX_NEW`` = 3 tokens, so there are 1 + 2 + 4 (ending in EOS after 0, 1, 2 letters) + 8 (three letters, cut)
= 15 outcomes, and a completion's text (EOS dropped) names its outcome: texts of ≤ 2 letters finished, of 3
letters were cut."""

from __future__ import annotations

import functools
import itertools
import math

import torch

from tether import testing

EOS, MAX_NEW = 0, 3
TABLE = torch.tensor([[0.0, 0.0, 0.0],     # after EOS (never used)
                      [-0.4, 0.6, 0.1],    # after 'a'
                      [0.2, -0.3, 0.5]])   # after 'b'
PROMPT = [1]


TableLM = functools.partial(testing.TableLM, TABLE)  # the model of the tests: logits = TABLE[current token]
CharTokenizer = functools.partial(testing.CharTokenizer, " ab")

def outcomes(temperature: float = 1.0) -> tuple[list[str], torch.Tensor]:
    """Every completion text of the prompt ``PROMPT`` and its exact probability (float64), in a fixed order."""
    logp = (TABLE.double() / temperature).log_softmax(-1)
    texts, probs = [], []
    for length in range(MAX_NEW + 1):
        for letters in itertools.product((1, 2), repeat=length):
            prev, lp = PROMPT[-1], 0.0
            for tok in letters:
                lp += float(logp[prev, tok])
                prev = tok
            if length < MAX_NEW:
                lp += float(logp[prev, EOS])
            texts.append("".join(" ab"[t] for t in letters))
            probs.append(math.exp(lp))
    return texts, torch.tensor(probs, dtype=torch.float64)


TEXTS, REF = outcomes()
DISTINCT = {t: float(v) for t, v in zip(TEXTS, torch.randperm(len(TEXTS), generator=torch.Generator().manual_seed(0)))}
"""A reward with a distinct value per outcome (a fixed permutation of 0 … 14)."""


def distinct_reward(prompt, completion, row):
    return DISTINCT[completion]


def count_b_reward(prompt, completion, row):
    """Number of 'b's: four levels 0 … 3, with ties."""
    return float(completion.count("b"))


def rewards_of(reward) -> torch.Tensor:
    return torch.tensor([reward("", t, {}) for t in TEXTS], dtype=torch.float64)


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's χ² goodness-of-fit p-value of counts against probabilities; cells with an expected count below 5
    are pooled into one (the usual validity condition of the χ² approximation)."""
    from scipy.stats import chi2

    total = float(observed.sum())
    expected = expected_probs.double() * total
    small = expected < 5
    obs = torch.cat([observed.double()[~small], observed.double()[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, df=len(exp) - 1))


def histogram(texts: list[str]) -> torch.Tensor:
    index = {t: k for k, t in enumerate(TEXTS)}
    counts = torch.zeros(len(TEXTS), dtype=torch.float64)
    for t in texts:
        counts[index[t]] += 1
    return counts
