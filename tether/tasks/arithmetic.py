"""Easy arithmetic word problems with known integer answers, for RL demos on small (~135M) models.

Each row is a one-step word problem, ``a + b`` or ``a - b`` with operands in ``1..49``, and an instruction to
finish with "The answer is N.":

    {"prompt": "Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now? Finish with "
               "\\"The answer is N.\\" where N is a number.",
     "question": "Mia has 12 apples. She buys 7 more apples. How many apples does Mia have now?",
     "answer": 19, "a": 12, "b": 7, "op": "+", "id": "arith-train-0-00000"}

Scored with ``tether.rewards.math.MathAnswerReward`` (the row is the reward's ``metadata``), which also
accepts ``\\boxed{19}`` and ``<answer>19</answer>``.

Design choices:

1. **Easy on purpose.** Two operands below 50, ``+`` and ``-`` only, and ``a >= b`` for ``-`` so no answer is
   negative (0 ≤ answer ≤ 98). A 135M instruct model solves some but not all, which is what gives group-relative
   RL a signal.
2. **Disjoint splits by problem, not by wording.** The pool is every ``(a, op, b)``: 49·49 additions and
   49·50/2 subtractions = 3626 problems. It is shuffled once with a fixed RNG; the first 20 % (725) are
   ``"heldout"``, the rest (2901) ``"train"``. No ``(a, op, b)`` triple appears in both splits; the story
   templates and names are shared, so held-out measures arithmetic on unseen operand pairs, not unseen wording.
3. **No repeats.** A call draws ``n`` distinct problems of its split; ``n`` above the split size raises.
4. **Determinism.** Output depends only on ``(n, seed, split)``: RNGs are ``random.Random`` seeded with strings
   (stable across processes and ``PYTHONHASHSEED``); a smaller ``n`` gives a prefix of a larger one.
"""

from __future__ import annotations

import random
from typing import Any

SPLITS = ("train", "heldout")
MAX_OPERAND = 49
HELDOUT_FRACTION = 0.2
ANSWER_INSTRUCTION = 'Finish with "The answer is N." where N is a number.'

NAMES = ("Mia", "Tom", "Ana", "Ben", "Lea", "Sam", "Zoe", "Max")
OBJECTS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "shells")

# {name}, {a}, {b}, {obj}; "he/she" is avoided so any name fits.
ADD_TEMPLATES = (
    "{name} has {a} {obj}. {name} buys {b} more {obj}. How many {obj} does {name} have now?",
    "{name} had {a} {obj} and found {b} more. How many {obj} does {name} have in total?",
    "There are {a} {obj} in a box. {name} puts in {b} more. How many {obj} are in the box now?",
    "What is {a} plus {b}?",
)
SUB_TEMPLATES = (
    "{name} has {a} {obj}. {name} gives away {b} of them. How many {obj} does {name} have left?",
    "{name} had {a} {obj} and lost {b}. How many {obj} does {name} have now?",
    "There are {a} {obj} in a box. {name} takes out {b}. How many {obj} are left in the box?",
    "What is {a} minus {b}?",
)


def all_problems() -> list[tuple[int, str, int]]:
    """Every ``(a, op, b)``: ``a + b`` for ``a, b`` in 1..49, and ``a - b`` for ``1 <= b <= a <= 49``."""
    ops = range(1, MAX_OPERAND + 1)
    return [(a, "+", b) for a in ops for b in ops] + [(a, "-", b) for a in ops for b in ops if b <= a]


def problems(split: str) -> list[tuple[int, str, int]]:
    """The problems of ``split`` in a fixed order (see the module docstring, choice 2)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    pool = all_problems()
    random.Random("tether.tasks.arithmetic:split").shuffle(pool)
    n_heldout = round(HELDOUT_FRACTION * len(pool))
    return pool[:n_heldout] if split == "heldout" else pool[n_heldout:]


def solve(a: int, op: str, b: int) -> int:
    """``a + b`` or ``a - b``."""
    return a + b if op == "+" else a - b


def make_arithmetic_prompts(n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
    """``n`` distinct rows ``{"prompt", "question", "answer", "a", "b", "op", "id"}`` of ``split``.

    ``answer`` is an int; ``prompt`` = ``question + " " + ANSWER_INSTRUCTION``; ``id`` is
    ``f"arith-{split}-{seed}-{i:05d}"``. Raises ``ValueError`` if ``n`` exceeds the split's size
    (2901 train, 725 heldout).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    pool = problems(split)
    if n > len(pool):
        raise ValueError(f"split {split!r} has {len(pool)} distinct problems; asked for n={n}. Lower n.")
    rng = random.Random(f"tether.tasks.arithmetic:{split}:{seed}")
    order = list(pool)
    rng.shuffle(order)
    rows = []
    for i, (a, op, b) in enumerate(order[:n]):
        template = rng.choice(ADD_TEMPLATES if op == "+" else SUB_TEMPLATES)
        question = template.format(name=rng.choice(NAMES), obj=rng.choice(OBJECTS), a=a, b=b)
        rows.append(
            {
                "prompt": f"{question} {ANSWER_INSTRUCTION}",
                "question": question,
                "answer": solve(a, op, b),
                "a": a,
                "b": b,
                "op": op,
                "id": f"arith-{split}-{seed}-{i:05d}",
            }
        )
    return rows
