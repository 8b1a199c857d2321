"""A generated, verifiable instruction-following task in the style of IFEval (no downloads).

Each row is an everyday request that a small instruct model can answer in a few sentences, followed by one or
more verifiable constraints (``tether.rewards.rules``):

   {"prompt": "Describe a rainy afternoon. Answer in at most 30 words. Do not use any commas in your answer.",
     "constraints": [{"type": "max_words", "n": 30}, {"type": "no_commas"}],
     "n_constraints": 2,
     "id": "if-train-0-00000"}

Scored with ``InstructionFollowingReward`` (the row is the reward's ``metadata``).

Design choices:

1. **Disjoint splits.** The shipped requests are split by position: every third one (index % 3 == 2) is
   ``"heldout"``, the rest ``"train"`` (40 / 20), so held-out reward is measured on unseen questions. The
   constraint vocabulary (keywords, phrases, word limits) is shared between splits.
2. **Kinds that carry signal.** ``DEFAULT_KINDS`` are the constraints a ~100M-parameter instruct model meets
   sometimes but not always (lowercase, a keyword, a start/end phrase, a word limit of 20..60, no commas), so
   best-vs-worst pairs differ in reward. ``all_caps``, ``min_words``, ``exclude_word``, ``num_bullets`` and
   ``wrap_in_quotes`` are available through ``kinds=ALL_KINDS``.
3. **No contradictions.** A row's kinds are distinct, and a draw whose constraints conflict
   (``find_conflict``: e.g. ``lowercase`` with a capitalised start phrase) is rejected and redrawn whole.
   This makes some pairs rarer than independent sampling would (``lowercase`` never meets
   ``start_with``/``end_with``, whose shipped phrases are all capitalised).
4. **Even coverage.** Requests are used in a shuffled order and reshuffled after each pass, so ``n`` rows use
   every request of the split ``n // len(split)`` or ``n // len(split) + 1`` times.
5. **Determinism.** Output depends only on ``(n, seed, split, min/max_constraints, kinds)``: the RNG is
   ``random.Random`` seeded with a string (stable across processes and ``PYTHONHASHSEED``); a smaller ``n``
   gives a prefix of a larger one.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.rewards.rules import (
    CONSTRAINT_TYPES,
    AllCaps,
    Constraint,
    EndWith,
    ExcludeWord,
    IncludeKeyword,
    Lowercase,
    MaxWords,
    MinWords,
    NoCommas,
    NumBullets,
    StartWith,
    WrapInQuotes,
    find_conflict,
    to_dict,
)

SPLITS = ("train", "heldout")

BASE_REQUESTS: tuple[str, ...] = (
    "Describe a rainy afternoon.",
    "Give advice for a first job interview.",
    "Explain why the sky looks blue.",
    "Suggest a simple breakfast for a busy morning.",
    "Describe your ideal weekend.",
    "Explain how to make a cup of tea.",
    "Give tips for sleeping better.",
    "Explain why exercise is good for your health.",
    "Describe a busy city street.",
    "Write a short thank-you note to a neighbor.",
    "What is a library for?",
    "Suggest ways to save money on groceries.",
    "Describe the taste of a fresh orange.",
    "Explain how plants make their food.",
    "Give advice to someone learning to ride a bike.",
    "Describe a walk on the beach.",
    "Why do people keep pets?",
    "Suggest a fun activity for a rainy day.",
    "Describe your favorite season and why you like it.",
    "Explain how to stay focused while studying.",
    "Write a short message inviting a friend to dinner.",
    "What makes a good friend?",
    "Describe a mountain at sunrise.",
    "Give advice for keeping a room tidy.",
    "Explain why we need to drink water.",
    "Describe the sounds of a forest at night.",
    "Suggest a healthy snack and explain why it is good.",
    "Explain how a bicycle works.",
    "Give advice for a long car trip.",
    "Describe a birthday party.",
    "Why is reading books useful?",
    "Write a short note to welcome a new coworker.",
    "Explain how to plant a tree.",
    "Describe a cozy kitchen.",
    "Give advice for making friends in a new city.",
    "Why does the moon seem to change shape?",
    "Suggest ways to relax after a long day at work.",
    "Describe a snowy morning.",
    "Explain how to cook rice.",
    "Give advice for speaking in public.",
    "Describe an old bookshop.",
    "Explain why recycling matters.",
    "Suggest a gift for a friend who loves cooking.",
    "Describe a train journey through the countryside.",
    "Explain how rainbows form.",
    "Give advice for learning a new language.",
    "Describe a garden in spring.",
    "Why is breakfast important?",
    "Write a short apology for being late to a meeting.",
    "Explain how to take care of a houseplant.",
    "Describe a farmers market on a Saturday morning.",
    "Give advice for staying safe in hot weather.",
    "Why is the ocean salty?",
    "Suggest ways to spend less time on a phone.",
    "Describe a quiet evening at home.",
    "Explain how to write a clear email.",
    "Give advice for running a first race.",
    "Describe a thunderstorm.",
    "Why are bees important?",
    "Suggest a plan for a relaxing Sunday.",
)
"""Everyday requests answerable in a few sentences; split into train/heldout by ``base_requests``."""

KEYWORDS = ("simple", "happy", "friend", "time", "light", "home", "calm", "nature", "energy", "together")
"""Words for ``include_keyword``: common enough to fit most answers, not so common they appear unasked."""

EXCLUDED_WORDS = ("very", "really", "also", "just", "many", "things")
"""Words for ``exclude_word``: ones small models use often, so avoiding them is a real choice."""

START_PHRASES = (
    "Sure!",
    "Here is my answer:",
    "Great question!",
    "Of course.",
    "Well, here is what I think:",
)
END_PHRASES = (
    "Hope this helps.",
    "Is there anything else I can help with?",
    "That is all.",
    "Thank you for reading.",
    "Have a nice day!",
)
MAX_WORDS_CHOICES = (20, 25, 30, 40, 50, 60)
MIN_WORDS_CHOICES = (30, 50, 80)
NUM_BULLETS_CHOICES = (2, 3, 4)

DEFAULT_KINDS = ("lowercase", "include_keyword", "end_with", "max_words", "no_commas", "start_with")
"""Constraint kinds used by default: the ones a small instruct model satisfies some of the time."""

ALL_KINDS = tuple(CONSTRAINT_TYPES)

_SAMPLERS: dict[str, Callable[[random.Random], Constraint]] = {
    "lowercase": lambda rng: Lowercase(),
    "all_caps": lambda rng: AllCaps(),
    "max_words": lambda rng: MaxWords(rng.choice(MAX_WORDS_CHOICES)),
    "min_words": lambda rng: MinWords(rng.choice(MIN_WORDS_CHOICES)),
    "include_keyword": lambda rng: IncludeKeyword(rng.choice(KEYWORDS)),
    "exclude_word": lambda rng: ExcludeWord(rng.choice(EXCLUDED_WORDS)),
    "end_with": lambda rng: EndWith(rng.choice(END_PHRASES)),
    "start_with": lambda rng: StartWith(rng.choice(START_PHRASES)),
    "no_commas": lambda rng: NoCommas(),
    "num_bullets": lambda rng: NumBullets(rng.choice(NUM_BULLETS_CHOICES)),
    "wrap_in_quotes": lambda rng: WrapInQuotes(),
}
_MAX_DRAWS = 1000


def base_requests(split: str) -> tuple[str, ...]:
    """Requests of ``split``: ``"heldout"`` = ``BASE_REQUESTS[i]`` with ``i % 3 == 2``; ``"train"``: the rest.

    Raises ``ValueError`` for any other split name.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    heldout = split == "heldout"
    return tuple(r for i, r in enumerate(BASE_REQUESTS) if (i % 3 == 2) == heldout)


def _draw_constraints(rng: random.Random, kinds: Sequence[str], k: int) -> list[Constraint]:
    for _ in range(_MAX_DRAWS):
        constraints = [_SAMPLERS[kind](rng) for kind in rng.sample(list(kinds), k)]
        if find_conflict(constraints) is None:
            return constraints
    raise ValueError(
        f"could not draw {k} compatible constraints from kinds {list(kinds)} in {_MAX_DRAWS} tries; "
        "lower max_constraints or add kinds"
    )


def make_instruction_prompts(
    n: int,
    seed: int,
    *,
    min_constraints: int = 1,
    max_constraints: int = 2,
    split: str = "train",
    kinds: Sequence[str] = DEFAULT_KINDS,
) -> list[dict[str, Any]]:
    """``n`` rows ``{"prompt", "constraints", "n_constraints", "id"}`` (see the module docstring).

    Each row has ``k ~ Uniform{min_constraints..max_constraints}`` constraints of distinct kinds drawn from
    ``kinds``, with no conflicting pair. ``prompt`` = request + " " + the constraints' instruction sentences
    joined by spaces; ``constraints`` holds their dict forms in the same order; ``id`` is
    ``f"if-{split}-{seed}-{i:05d}"``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    requests = base_requests(split)
    unknown = [k for k in kinds if k not in _SAMPLERS]
    if unknown:
        raise ValueError(f"unknown constraint kinds {unknown}; known: {sorted(_SAMPLERS)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must not repeat, got {list(kinds)}")
    if not 1 <= min_constraints <= max_constraints <= len(kinds):
        raise ValueError(
            f"need 1 <= min_constraints <= max_constraints <= len(kinds) = {len(kinds)}, "
            f"got min_constraints={min_constraints}, max_constraints={max_constraints}"
        )

    rng = random.Random(f"tether.tasks.instructions:{split}:{seed}")
    order: list[str] = []
    rows = []
    for i in range(n):
        if not order:
            order = list(requests)
            rng.shuffle(order)
        request = order.pop()
        k = rng.randint(min_constraints, max_constraints)
        constraints = _draw_constraints(rng, kinds, k)
        rows.append(
            {
                "prompt": " ".join([request, *(c.instruction() for c in constraints)]),
                "constraints": [to_dict(c) for c in constraints],
                "n_constraints": k,
                "id": f"if-{split}-{seed}-{i:05d}",
            }
        )
    return rows


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write one JSON object per line (UTF-8, non-ASCII kept), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
