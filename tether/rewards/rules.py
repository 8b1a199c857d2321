"""Verifiable instruction-following rules (IFEval style) and the reward built from them.

A *constraint* is a frozen dataclass with its arguments (``MaxWords(n=30)``); each kind has

- ``check(text) -> bool``: a deterministic, pure test of the completion text, documented below with exactly
  what counts as satisfied;
- ``instruction() -> str``: the sentence that asks for it in a prompt;
- a plain-dict form ``{"type": "max_words", "n": 30}`` for JSONL metadata (``to_dict`` / ``from_dict``).

The reward interface of the library is a callable

    reward(prompt: str, completion: str, metadata: dict) -> float | None

where ``metadata`` is the dataset row (a reward reads the keys it needs and ignores the rest) and
``None`` means "no opinion on this row" (the caller skips it rather than scoring it 0).
``InstructionFollowingReward`` implements it as the fraction of ``metadata["constraints"]`` that the
completion satisfies, in [0, 1].

Shared definitions used by the checks:

- **word**: a match of ``[^\\W_]+(?:['’][^\\W_]+)*``, i.e. a maximal run of letters and digits (anything
  ``str.isalnum`` accepts), where one apostrophe (``'`` or ``’``) *between* two letters/digits joins the runs.
  So ``don't`` is one word, ``'quoted'`` is the word ``quoted``, ``snake_case`` is two words, ``3.5`` is two
  words, and punctuation never belongs to a word (``"hello,"`` contains the word ``hello``).
- **case-insensitive** comparison uses ``str.casefold``.
- **empty**: a completion that is empty or whitespace-only satisfies *no* rule, not even the ones it would
  satisfy vacuously (``lowercase``, ``no_commas``, ``max_words``, ``exclude_word``).

Assumption: the caller passes the *decoded* completion without special tokens (``skip_special_tokens=True``,
no ``<|im_end|>`` text). A literal end-of-turn string left in the text is scored as text (it would, e.g.,
break ``end_with``).

Departures from IFEval (Zhou et al., 2023, arXiv:2311.07911):

1. Empty completions fail every rule (IFEval passes e.g. ``lowercase`` on ""), so a policy is never paid for
   saying nothing.
2. Words are counted with the regex above, not NLTK's tokenizer (no dependency, fully specified).
3. Only the "strict" check; no "loose" variant that first strips markdown or the first/last line.
4. The reward is the fraction of satisfied constraints (IFEval's instruction-level accuracy for one prompt),
   not the all-or-nothing prompt-level accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

_WORD_RE = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_BULLET_MARKERS = ("* ", "- ")


def words(text: str) -> list[str]:
    """The words of ``text`` in order (see the module docstring for the exact definition)."""
    return _WORD_RE.findall(text)


def count_words(text: str) -> int:
    """Number of words in ``text``: ``count_words("Don't stop, 2 go!") == 4``."""
    return len(words(text))


def _is_empty(text: str) -> bool:
    return not text.strip()


def _require_positive_int(owner: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.n must be a positive int, got {value!r}")


def _require_word(owner: str, value: Any) -> None:
    if not isinstance(value, str) or _WORD_RE.fullmatch(value) is None:
        raise ValueError(
            f"{owner}.word must be a single word (letters/digits, inner apostrophes allowed), got {value!r}"
        )


def _require_phrase(owner: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(
            f"{owner}.phrase must be a non-empty string without leading/trailing whitespace, got {value!r}"
        )


# ----------------------------------------------------------------------------------------------------
# Constraint kinds
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lowercase:
    """Satisfied iff the text is non-empty and has no character ``c`` with ``c.isupper()``.

    Digits, punctuation and letters without case count as lowercase: ``"hello, 42!"`` passes,
    ``"Hello"`` fails.
    """

    type: ClassVar[str] = "lowercase"

    def check(self, text: str) -> bool:
        return not _is_empty(text) and not any(c.isupper() for c in text)

    def instruction(self) -> str:
        return "Answer in lowercase letters only, with no capital letters."


@dataclass(frozen=True)
class AllCaps:
    """Satisfied iff the text is non-empty and has no character ``c`` with ``c.islower()``.

    ``"HELLO, 42!"`` passes, ``"HELLO world"`` fails.
    """

    type: ClassVar[str] = "all_caps"

    def check(self, text: str) -> bool:
        return not _is_empty(text) and not any(c.islower() for c in text)

    def instruction(self) -> str:
        return "Answer in capital letters only, with no lowercase letters."


@dataclass(frozen=True)
class MaxWords:
    """Satisfied iff the text is non-empty and has at most ``n`` words (``count_words(text) <= n``)."""

    n: int
    type: ClassVar[str] = "max_words"

    def __post_init__(self) -> None:
        _require_positive_int("MaxWords", self.n)

    def check(self, text: str) -> bool:
        return not _is_empty(text) and count_words(text) <= self.n

    def instruction(self) -> str:
        return f"Answer in at most {self.n} words."


@dataclass(frozen=True)
class MinWords:
    """Satisfied iff the text has at least ``n`` words (``count_words(text) >= n``)."""

    n: int
    type: ClassVar[str] = "min_words"

    def __post_init__(self) -> None:
        _require_positive_int("MinWords", self.n)

    def check(self, text: str) -> bool:
        return not _is_empty(text) and count_words(text) >= self.n

    def instruction(self) -> str:
        return f"Answer in at least {self.n} words."


@dataclass(frozen=True)
class IncludeKeyword:
    """Satisfied iff some word of the text equals ``word`` case-insensitively (whole word).

    For ``word="tea"``: ``"Tea."``, ``"I like TEA, really"`` and ``"tea_time"`` pass (``_`` separates words);
    ``"teapot"`` and ``"teas"`` fail.
    """

    word: str
    type: ClassVar[str] = "include_keyword"

    def __post_init__(self) -> None:
        _require_word("IncludeKeyword", self.word)

    def check(self, text: str) -> bool:
        target = self.word.casefold()
        return not _is_empty(text) and any(w.casefold() == target for w in words(text))

    def instruction(self) -> str:
        return f'Include the word "{self.word}" in your answer.'


@dataclass(frozen=True)
class ExcludeWord:
    """Satisfied iff the text is non-empty and no word of it equals ``word`` case-insensitively.

    For ``word="very"``: ``"Every day."`` passes (``every`` is another word), ``"VERY good"`` fails.
    """

    word: str
    type: ClassVar[str] = "exclude_word"

    def __post_init__(self) -> None:
        _require_word("ExcludeWord", self.word)

    def check(self, text: str) -> bool:
        target = self.word.casefold()
        return not _is_empty(text) and all(w.casefold() != target for w in words(text))

    def instruction(self) -> str:
        return f'Do not use the word "{self.word}" anywhere in your answer.'


@dataclass(frozen=True)
class EndWith:
    """Satisfied iff ``text.rstrip()`` ends with ``phrase`` exactly (case, punctuation, inner spaces count).

    For ``phrase="Hope this helps."``: ``"... Hope this helps.\\n  "`` passes; ``"... hope this helps."``,
    ``"... Hope this helps!"`` and ``"... Hope this helps. Bye"`` fail.
    """

    phrase: str
    type: ClassVar[str] = "end_with"

    def __post_init__(self) -> None:
        _require_phrase("EndWith", self.phrase)

    def check(self, text: str) -> bool:
        return text.rstrip().endswith(self.phrase)

    def instruction(self) -> str:
        return f'End your answer with the exact phrase "{self.phrase}" and write nothing after it.'


@dataclass(frozen=True)
class StartWith:
    """Satisfied iff ``text.lstrip()`` starts with ``phrase`` exactly (a plain string prefix, case-sensitive).

    For ``phrase="Sure!"``: ``"\\n Sure! Here..."`` passes; ``"sure! ..."`` and ``"Sure, ..."`` fail.
    """

    phrase: str
    type: ClassVar[str] = "start_with"

    def __post_init__(self) -> None:
        _require_phrase("StartWith", self.phrase)

    def check(self, text: str) -> bool:
        return text.lstrip().startswith(self.phrase)

    def instruction(self) -> str:
        return f'Start your answer with the exact phrase "{self.phrase}".'


@dataclass(frozen=True)
class NoCommas:
    """Satisfied iff the text is non-empty and contains no ASCII comma ``,`` (U+002C).

    Other comma-like characters (``，``, ``、``) are not checked.
    """

    type: ClassVar[str] = "no_commas"

    def check(self, text: str) -> bool:
        return not _is_empty(text) and "," not in text

    def instruction(self) -> str:
        return "Do not use any commas in your answer."


@dataclass(frozen=True)
class NumBullets:
    """Satisfied iff exactly ``n`` lines are bullets.

    Lines are ``text.split("\\n")``; a line is a bullet iff, after removing leading spaces and tabs, it starts
    with ``"* "`` or ``"- "`` (marker then one space). ``"**bold**"``, ``"-5 degrees"`` and ``"1. item"`` are
    not bullets; ``"  - indented"`` is.
    """

    n: int
    type: ClassVar[str] = "num_bullets"

    def __post_init__(self) -> None:
        _require_positive_int("NumBullets", self.n)

    def check(self, text: str) -> bool:
        n_bullets = sum(line.lstrip(" \t").startswith(_BULLET_MARKERS) for line in text.split("\n"))
        return n_bullets == self.n

    def instruction(self) -> str:
        return f'Answer with exactly {self.n} bullet points, each on its own line starting with "- ".'


@dataclass(frozen=True)
class WrapInQuotes:
    """Satisfied iff ``s = text.strip()`` has ``len(s) >= 2``, ``s[0] == '"'`` and ``s[-1] == '"'``.

    Only the ASCII double quote (U+0022) counts; curly quotes and single quotes do not.
    """

    type: ClassVar[str] = "wrap_in_quotes"

    def check(self, text: str) -> bool:
        s = text.strip()
        return len(s) >= 2 and s[0] == '"' and s[-1] == '"'

    def instruction(self) -> str:
        return "Wrap your entire answer in double quotation marks."


Constraint = (
    Lowercase
    | AllCaps
    | MaxWords
    | MinWords
    | IncludeKeyword
    | ExcludeWord
    | EndWith
    | StartWith
    | NoCommas
    | NumBullets
    | WrapInQuotes
)

CONSTRAINT_TYPES: dict[str, type[Constraint]] = {
    cls.type: cls
    for cls in (
        Lowercase,
        AllCaps,
        MaxWords,
        MinWords,
        IncludeKeyword,
        ExcludeWord,
        EndWith,
        StartWith,
        NoCommas,
        NumBullets,
        WrapInQuotes,
    )
}
"""Constraint classes by their ``type`` string (the ``"type"`` key of the dict form)."""


# ----------------------------------------------------------------------------------------------------
# Dict form
# ----------------------------------------------------------------------------------------------------


def to_dict(constraint: Constraint) -> dict[str, Any]:
    """The plain-dict form: ``to_dict(MaxWords(30)) == {"type": "max_words", "n": 30}``."""
    return {"type": constraint.type, **{f.name: getattr(constraint, f.name) for f in fields(constraint)}}


def from_dict(d: Mapping[str, Any]) -> Constraint:
    """Inverse of ``to_dict``; raises ``ValueError`` naming the bad key and the accepted ones."""
    if not isinstance(d, Mapping) or "type" not in d:
        raise ValueError(f"a constraint must be a dict with a 'type' key, got {d!r}")
    kind = d["type"]
    cls = CONSTRAINT_TYPES.get(kind)
    if cls is None:
        raise ValueError(
            f"unknown constraint type {kind!r} in {dict(d)!r}; known: {sorted(CONSTRAINT_TYPES)}"
        )
    expected = sorted(f.name for f in fields(cls))
    got = sorted(k for k in d if k != "type")
    if got != expected:
        raise ValueError(f"constraint {dict(d)!r}: type {kind!r} takes arguments {expected}, got {got}")
    return cls(**{k: d[k] for k in expected})


# ----------------------------------------------------------------------------------------------------
# Compatibility
# ----------------------------------------------------------------------------------------------------


def _same_word(a: str, b: str) -> bool:
    return a.casefold() == b.casefold()


def _phrase_of(c: Constraint) -> str | None:
    return c.phrase if isinstance(c, StartWith | EndWith) else None


def _pair_conflict(a: Constraint, b: Constraint) -> str | None:
    """Why ``a`` and ``b`` cannot both hold, or None; checks ``a`` against ``b`` in this order only."""
    pb = _phrase_of(b)
    if isinstance(a, Lowercase) and isinstance(b, AllCaps):
        return "lowercase and all_caps"
    if isinstance(a, Lowercase) and pb is not None and any(c.isupper() for c in pb):
        return f"lowercase but {b.type} phrase {pb!r} has capitals"
    if isinstance(a, AllCaps) and pb is not None and any(c.islower() for c in pb):
        return f"all_caps but {b.type} phrase {pb!r} has lowercase letters"
    if isinstance(a, NoCommas) and pb is not None and "," in pb:
        return f"no_commas but {b.type} phrase {pb!r} has a comma"
    if isinstance(a, MaxWords) and isinstance(b, MinWords) and a.n < b.n:
        return f"max_words({a.n}) < min_words({b.n})"
    if isinstance(a, MaxWords) and pb is not None and count_words(pb) > a.n:
        return f"max_words({a.n}) but {b.type} phrase {pb!r} has {count_words(pb)} words"
    if isinstance(a, IncludeKeyword) and isinstance(b, ExcludeWord) and _same_word(a.word, b.word):
        return f"include_keyword and exclude_word of the same word {a.word!r}"
    if isinstance(a, ExcludeWord) and pb is not None and any(_same_word(a.word, w) for w in words(pb)):
        return f"exclude_word({a.word!r}) but {b.type} phrase {pb!r} contains it"
    if isinstance(a, WrapInQuotes) and isinstance(b, StartWith) and not b.phrase.startswith('"'):
        return f"wrap_in_quotes but start_with phrase {b.phrase!r} does not start with a double quote"
    if isinstance(a, WrapInQuotes) and isinstance(b, EndWith) and not b.phrase.endswith('"'):
        return f"wrap_in_quotes but end_with phrase {b.phrase!r} does not end with a double quote"
    if isinstance(a, StartWith) and isinstance(b, StartWith):
        if not (a.phrase.startswith(b.phrase) or b.phrase.startswith(a.phrase)):
            return f"two start_with phrases {a.phrase!r} and {b.phrase!r}"
    if isinstance(a, EndWith) and isinstance(b, EndWith):
        if not (a.phrase.endswith(b.phrase) or b.phrase.endswith(a.phrase)):
            return f"two end_with phrases {a.phrase!r} and {b.phrase!r}"
    if isinstance(a, NumBullets) and isinstance(b, NumBullets) and a.n != b.n:
        return f"num_bullets({a.n}) and num_bullets({b.n})"
    return None


def find_conflict(constraints: Sequence[Constraint]) -> str | None:
    """A reason why two of ``constraints`` contradict each other, or None if no pair does.

    Checks pairs only (e.g. ``lowercase`` + ``all_caps``, ``max_words(20)`` + ``min_words(30)``,
    ``lowercase`` + ``end_with("Hope this helps.")``, ``include_keyword(x)`` + ``exclude_word(x)``,
    ``no_commas`` + a phrase with a comma, ``wrap_in_quotes`` + ``start_with``). Three-way conflicts (two
    phrases together longer than ``max_words``) are not detected; the shipped task generator cannot produce
    them (its phrases are far shorter than its smallest word limit), which its tests verify by constructing a
    satisfying text for every generated row.
    """
    for i, a in enumerate(constraints):
        for b in constraints[i + 1 :]:
            reason = _pair_conflict(a, b) or _pair_conflict(b, a)
            if reason is not None:
                return reason
    return None


# ----------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------


def satisfied(completion: str, constraints: Sequence[Constraint]) -> list[bool]:
    """``[c.check(completion) for c in constraints]``: which constraints hold, in order."""
    return [c.check(completion) for c in constraints]


def rule_reward(completion: str, constraints: Sequence[Constraint]) -> float:
    """Fraction of ``constraints`` the completion satisfies, in [0, 1].

    ``rule_reward("hello there", [Lowercase(), MaxWords(1)]) == 0.5``. Raises ``ValueError`` on an empty list
    (the fraction is undefined; ``InstructionFollowingReward`` returns None for such rows instead).
    """
    if not constraints:
        raise ValueError("rule_reward needs at least one constraint")
    results = satisfied(completion, constraints)
    return sum(results) / len(results)


class InstructionFollowingReward:
    """Reward ``(prompt, completion, metadata) -> float | None``: fraction of ``metadata["constraints"]`` met.

    ``metadata["constraints"]`` is a list of constraint dicts (``to_dict`` form). Returns None ("no opinion")
    when the key is missing, None or an empty list. ``prompt`` is not read: the constraints carry everything.
    The completion must be decoded without special tokens (see the module docstring).
    Raises ``ValueError`` naming the row's ``id`` (if any) and the bad constraint when a dict is malformed.
    """

    name = "instruction_following"

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        raw = metadata.get("constraints")
        if not raw:
            return None
        try:
            constraints = [from_dict(d) for d in raw]
        except ValueError as e:
            row = metadata.get("id", "<no id>")
            raise ValueError(f"row id={row!r}: bad metadata['constraints']: {e}") from e
        return rule_reward(completion, constraints)
