"""Final-answer correctness for math problems, decided by ``math-verify``.

``MathAnswerReward`` implements the reward interface ``(prompt, completion, metadata) -> float | None``:

1. **Extract** one answer span from the completion, trying in this order and taking the *last* match of the
   first pattern that matches at all:

   a. ``\\boxed{...}`` (balanced braces, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``);
   b. ``<answer>...</answer>`` (case-insensitive tag, contents stripped);
   c. ``The answer is X`` / ``The final answer is X`` (case-insensitive, optional ``:``); ``X`` runs to the end
      of the line or to the first ``.`` that is followed by whitespace or ends the text, so
      ``"The answer is 0.5."`` gives ``0.5``.

   ``\\boxed`` comes first because it is the most specific convention (a model that boxes and also writes a
   tag has boxed what it means); the free-text phrase is the last resort. "Last" because models restate
   intermediate results before the final one.
2. **Parse** the span and the gold ``metadata["answer"]`` (str, int or float; ``str()`` is applied) with
   ``math_verify.parse`` after wrapping each in ``$...$`` (outer ``$`` already present are stripped first), so
   bare LaTeX such as ``\\dfrac{1}{2}`` is recognised.
3. **Verify** with ``math_verify.verify(gold, pred)``: ``1/2``, ``0.5``, ``\\frac{1}{2}`` and ``50\\%`` are all
   equal; ``x = 12`` matches ``12``; units and ``\\text{}`` are dropped (math-verify's normalisation).

Scores: 1.0 if verified equal, 0.0 if wrong *or* if no span was found or it did not parse (a policy is never
paid for an answer it did not state in one of the three forms). None ("no opinion") when the row has no
``"answer"`` (missing or None). An unparseable *gold* answer is a dataset bug and raises ``ValueError`` naming
the row.

Departures from math-verify's own defaults:

1. No anchor-free fallback: ``math_verify.parse(completion)`` on the raw text would accept the last number
   anywhere in the completion; here only the three explicit forms above count.
2. math-verify enforces its parse/verify timeouts with ``signal.alarm``, which only works in the main thread.
   Off the main thread the timeouts are switched off (rather than letting math-verify swallow the resulting
   error and score 0 silently); the extracted span is short, so runaway parses are unlikely.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from typing import Any

_BOXED = "\\boxed"
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*(.+?)(?=\.\s|\.$|\n|$)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` with balanced braces, or None (also for an unclosed brace)."""
    start = text.rfind(_BOXED + "{")
    while start != -1:
        i = start + len(_BOXED) + 1
        depth = 1
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j]
        start = text.rfind(_BOXED + "{", 0, start)  # unclosed: try an earlier one
    return None


def extract_answer(completion: str) -> str | None:
    """The answer span of ``completion`` (order and rules in the module docstring), stripped; None if none.

    ``extract_answer("so \\\\boxed{3} ... \\\\boxed{\\\\frac{1}{2}}") == "\\\\frac{1}{2}"``,
    ``extract_answer("<think>..</think><answer> 7 </answer>") == "7"``,
    ``extract_answer("The answer is 0.5.") == "0.5"``, ``extract_answer("it is 4") is None``.
    """
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    tags = _ANSWER_TAG_RE.findall(completion)
    if tags:
        return tags[-1].strip()
    phrases = _ANSWER_IS_RE.findall(completion)
    if phrases:
        return phrases[-1].strip()
    return None


def _as_math(span: str) -> str:
    return "$" + span.strip().strip("$").strip() + "$"


class MathAnswerReward:
    """Reward: 1.0 if the completion's final answer equals ``metadata["answer"]`` per math-verify, else 0.0.

    See the module docstring for extraction order and scoring. ``None`` when the row has no ``"answer"``.

    Args:
        timeout_s: math-verify's per-call parse/verify timeout in whole seconds (main thread only; see the
            module docstring, departure 2).
        float_rounding: decimal places math-verify rounds floats to before comparing (its default, 6).
    """

    name = "math_answer"

    def __init__(self, timeout_s: int = 5, float_rounding: int = 6):
        self.timeout_s = timeout_s
        self.float_rounding = float_rounding

    def _timeout(self) -> int | None:
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        from math_verify import parse, verify

        gold_raw = metadata.get("answer")
        if gold_raw is None:
            return None
        timeout = self._timeout()
        gold = parse(_as_math(str(gold_raw)), parsing_timeout=timeout)
        if not gold:
            row = metadata.get("id", "<no id>")
            raise ValueError(
                f"row id={row!r}: metadata['answer']={gold_raw!r} could not be parsed by math-verify; "
                "write it as a number or LaTeX expression"
            )
        span = extract_answer(completion)
        if span is None or not span.strip("$ \t\n"):
            return 0.0
        pred = parse(_as_math(span), parsing_timeout=timeout)
        if not pred:
            return 0.0
        ok = verify(gold, pred, float_rounding=self.float_rounding, timeout_seconds=timeout)
        return 1.0 if ok else 0.0
