"""Rule checkers, the instruction-following reward, and the generated instruction task."""

from __future__ import annotations

import json

import pytest

from tether.rewards import (
    CONSTRAINT_TYPES,
    AllCaps,
    EndWith,
    ExcludeWord,
    IncludeKeyword,
    InstructionFollowingReward,
    Lowercase,
    MaxWords,
    MinWords,
    NoCommas,
    NumBullets,
    StartWith,
    WrapInQuotes,
    count_words,
    find_conflict,
    from_dict,
    rule_reward,
    to_dict,
    words,
)
from tether.tasks import (
    ALL_KINDS,
    BASE_REQUESTS,
    DEFAULT_KINDS,
    base_requests,
    make_instruction_prompts,
    write_jsonl,
)

# ----------------------------------------------------------------------------------------------------
# Words
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("   \n\t", []),
        ("Hello, world!", ["Hello", "world"]),
        ("Don't stop, 2 go!", ["Don't", "stop", "2", "go"]),
        ("'quoted' words’ don’t", ["quoted", "words", "don’t"]),
        ("snake_case 3.5 e-mail", ["snake", "case", "3", "5", "e", "mail"]),
        ("café naïve", ["café", "naïve"]),
        ("... --- !!!", []),
    ],
)
def test_words(text, expected):
    assert words(text) == expected
    assert count_words(text) == len(expected)


# ----------------------------------------------------------------------------------------------------
# Each rule: positive and negative cases
# ----------------------------------------------------------------------------------------------------

CASES = [
    # (constraint, text, satisfied)
    (Lowercase(), "hello, world! 42", True),
    (Lowercase(), "Hello", False),
    (Lowercase(), "hello World", False),
    (Lowercase(), "123 ...", True),
    (Lowercase(), "", False),
    (Lowercase(), "  \n ", False),
    (AllCaps(), "HELLO, WORLD! 42", True),
    (AllCaps(), "HELLO world", False),
    (AllCaps(), "", False),
    (MaxWords(3), "One, two; three!", True),
    (MaxWords(3), "one two three four", False),
    (MaxWords(3), "don't won't can't", True),
    (MaxWords(3), "", False),
    (MinWords(3), "one two three", True),
    (MinWords(3), "one two", False),
    (MinWords(3), "one-two-three", True),
    (IncludeKeyword("tea"), "I like tea.", True),
    (IncludeKeyword("tea"), "Tea, please", True),
    (IncludeKeyword("tea"), "I like TEA!", True),
    (IncludeKeyword("tea"), "tea_time", True),
    (IncludeKeyword("tea"), "a teapot", False),
    (IncludeKeyword("tea"), "two teas", False),
    (IncludeKeyword("tea"), "", False),
    (IncludeKeyword("don't"), "I Don't know", True),
    (IncludeKeyword("don't"), "I don know", False),
    (ExcludeWord("very"), "Every day is nice.", True),
    (ExcludeWord("very"), "It is VERY nice.", False),
    (ExcludeWord("very"), "very.", False),
    (ExcludeWord("very"), "", False),
    (EndWith("Hope this helps."), "Tea is good. Hope this helps.", True),
    (EndWith("Hope this helps."), "Tea is good. Hope this helps.\n  \t", True),
    (EndWith("Hope this helps."), "Tea is good. hope this helps.", False),
    (EndWith("Hope this helps."), "Tea is good. Hope this helps!", False),
    (EndWith("Hope this helps."), "Hope this helps. Bye", False),
    (EndWith("Hope this helps."), "Hope  this helps.", False),
    (EndWith("Hope this helps."), "", False),
    (StartWith("Sure!"), "Sure! Here it is.", True),
    (StartWith("Sure!"), "\n  Sure! Here it is.", True),
    (StartWith("Sure!"), "sure! Here it is.", False),
    (StartWith("Sure!"), "Sure, here it is.", False),
    (StartWith("Sure!"), "", False),
    (NoCommas(), "No commas here.", True),
    (NoCommas(), "One, two", False),
    (NoCommas(), "fullwidth，comma", True),
    (NoCommas(), "", False),
    (NumBullets(2), "Intro:\n* one\n- two", True),
    (NumBullets(2), "  - indented\n\t* tabbed", True),
    (NumBullets(2), "* one\n* two\n* three", False),
    (NumBullets(2), "*one\n-two", False),
    (NumBullets(2), "**bold**\n- one\n-5 degrees\n1. item", False),
    (NumBullets(1), "", False),
    (WrapInQuotes(), '"Hello there."', True),
    (WrapInQuotes(), '  "Hello there."\n', True),
    (WrapInQuotes(), '"Hello there.', False),
    (WrapInQuotes(), "“Hello there.”", False),
    (WrapInQuotes(), "'Hello there.'", False),
    (WrapInQuotes(), '"', False),
    (WrapInQuotes(), "", False),
]


@pytest.mark.parametrize("constraint, text, expected", CASES, ids=lambda x: repr(x)[:40])
def test_rule_cases(constraint, text, expected):
    assert constraint.check(text) is expected


def test_every_kind_has_positive_and_negative_cases():
    for kind in CONSTRAINT_TYPES:
        outcomes = {expected for c, _, expected in CASES if c.type == kind}
        assert outcomes == {True, False}, f"{kind} lacks a positive or a negative case"


def test_every_rule_fails_on_empty_completion():
    examples = {to_dict(c)["type"]: c for c, _, _ in CASES}
    for kind, c in examples.items():
        assert not c.check(""), kind
        assert not c.check(" \n\t "), kind


def test_instruction_sentences():
    assert Lowercase().instruction() == "Answer in lowercase letters only, with no capital letters."
    assert MaxWords(30).instruction() == "Answer in at most 30 words."
    assert IncludeKeyword("tea").instruction() == 'Include the word "tea" in your answer.'
    for kind, cls in CONSTRAINT_TYPES.items():
        c = next(c for c, _, _ in CASES if c.type == kind)
        sentence = c.instruction()
        assert isinstance(c, cls)
        assert sentence[0].isupper() and sentence.endswith("."), (kind, sentence)


# ----------------------------------------------------------------------------------------------------
# Dict form and validation
# ----------------------------------------------------------------------------------------------------


def test_dict_round_trip_of_every_kind():
    seen = set()
    for c, _, _ in CASES:
        d = to_dict(c)
        assert d["type"] == c.type
        assert from_dict(d) == c
        assert from_dict(json.loads(json.dumps(d))) == c
        seen.add(c.type)
    assert seen == set(CONSTRAINT_TYPES)
    assert to_dict(MaxWords(30)) == {"type": "max_words", "n": 30}
    assert to_dict(Lowercase()) == {"type": "lowercase"}
    assert to_dict(EndWith("That is all.")) == {"type": "end_with", "phrase": "That is all."}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n": 3}, "'type' key"),
        ({"type": "shout"}, "unknown constraint type 'shout'"),
        ({"type": "max_words"}, "takes arguments ['n'], got []"),
        ({"type": "max_words", "n": 3, "m": 4}, "takes arguments ['n'], got ['m', 'n']"),
        ({"type": "max_words", "n": 0}, "positive int"),
        ({"type": "max_words", "n": True}, "positive int"),
        ({"type": "max_words", "n": "30"}, "positive int"),
        ({"type": "include_keyword", "word": "two words"}, "single word"),
        ({"type": "exclude_word", "word": "tea,"}, "single word"),
        ({"type": "end_with", "phrase": ""}, "non-empty"),
        ({"type": "start_with", "phrase": " Sure!"}, "leading/trailing whitespace"),
    ],
)
def test_from_dict_rejects_malformed(bad, message):
    with pytest.raises(ValueError) as e:
        from_dict(bad)
    assert message in str(e.value)


# ----------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------


def test_rule_reward_fractions_by_hand():
    """Worked by hand.

    "Hello there, friend." has 3 words, one capital, one comma, contains "friend", ends with "friend.":
    lowercase False, max_words(5) True, no_commas False, include "friend" True -> 2/4 = 0.5.
    Add end_with("friend.") True -> 3/5 = 0.6. Only lowercase -> 0/1. Empty -> every rule fails -> 0.
    """
    text = "Hello there, friend."
    four = [Lowercase(), MaxWords(5), NoCommas(), IncludeKeyword("friend")]
    assert rule_reward(text, four) == 0.5
    assert rule_reward(text, [*four, EndWith("friend.")]) == 0.6
    assert rule_reward(text, [Lowercase()]) == 0.0
    assert rule_reward("hello there friend", four) == 1.0
    assert rule_reward("", four) == 0.0
    assert rule_reward("hi", [Lowercase(), Lowercase(), AllCaps()]) == pytest.approx(2 / 3, abs=1e-12)
    with pytest.raises(ValueError, match="at least one constraint"):
        rule_reward(text, [])


def test_instruction_following_reward():
    reward = InstructionFollowingReward()
    meta = {"id": "r1", "constraints": [{"type": "lowercase"}, {"type": "max_words", "n": 2}]}
    assert reward("Say hi.", "hi there", meta) == 1.0
    assert reward("Say hi.", "Hi there", meta) == 0.5
    assert reward("Say hi.", "Hi there you", meta) == 0.0
    assert reward("Say hi.", "", meta) == 0.0


@pytest.mark.parametrize("meta", [{}, {"constraints": []}, {"constraints": None}, {"id": "x", "other": 1}])
def test_reward_has_no_opinion_without_constraints(meta):
    assert InstructionFollowingReward()("p", "some completion", meta) is None


def test_reward_error_names_the_row():
    meta = {"id": "row-7", "constraints": [{"type": "max_words", "n": -1}]}
    with pytest.raises(ValueError, match="row id='row-7'.*positive int"):
        InstructionFollowingReward()("p", "c", meta)


# ----------------------------------------------------------------------------------------------------
# Conflicts
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pair",
    [
        (Lowercase(), AllCaps()),
        (MaxWords(20), MinWords(30)),
        (IncludeKeyword("Tea"), ExcludeWord("tea")),
        (Lowercase(), EndWith("Hope this helps.")),
        (Lowercase(), StartWith("Sure!")),
        (AllCaps(), StartWith("Sure!")),
        (NoCommas(), StartWith("Well, here is what I think:")),
        (MaxWords(2), EndWith("That is all.")),
        (ExcludeWord("this"), EndWith("Hope this helps.")),
        (WrapInQuotes(), StartWith("Sure!")),
        (WrapInQuotes(), EndWith("That is all.")),
        (StartWith("Sure!"), StartWith("Of course.")),
        (EndWith("That is all."), EndWith("Bye.")),
        (NumBullets(2), NumBullets(3)),
    ],
    ids=lambda p: f"{p[0].type}+{p[1].type}",
)
def test_find_conflict_flags_contradictions_in_both_orders(pair):
    a, b = pair
    assert find_conflict([a, b]) is not None
    assert find_conflict([b, a]) is not None
    assert find_conflict([IncludeKeyword("zebra"), a, b]) is not None


@pytest.mark.parametrize(
    "pair",
    [
        (Lowercase(), IncludeKeyword("Tea")),
        (AllCaps(), IncludeKeyword("tea")),
        (MaxWords(30), MinWords(30)),
        (StartWith("Sure!"), EndWith("That is all.")),
        (StartWith("Sure"), StartWith("Sure!")),
        (WrapInQuotes(), NumBullets(2)),
        (NoCommas(), EndWith("Hope this helps.")),
        (IncludeKeyword("tea"), ExcludeWord("teas")),
    ],
    ids=lambda p: f"{p[0].type}+{p[1].type}",
)
def test_find_conflict_accepts_compatible_pairs(pair):
    assert find_conflict(list(pair)) is None


# ----------------------------------------------------------------------------------------------------
# Generated task
# ----------------------------------------------------------------------------------------------------


def _witness(constraints) -> str:
    """Build a text that satisfies every constraint, independently of ``find_conflict``.

    Start phrase, keywords and filler on the first line; bullets next; end phrase last; then case and quotes.
    If the constraints contradict, some check on the result fails: the caller asserts they all pass.
    """
    by_type: dict[str, list] = {}
    for c in constraints:
        by_type.setdefault(c.type, []).append(c)
    excluded = {c.word.casefold() for c in by_type.get("exclude_word", [])}
    filler = next(w for w in ("note", "item", "point") if w not in excluded)
    starts = sorted((c.phrase for c in by_type.get("start_with", [])), key=len)
    ends = sorted((c.phrase for c in by_type.get("end_with", [])), key=len)
    first = [starts[-1]] if starts else []
    first += [c.word for c in by_type.get("include_keyword", [])] or [filler]
    bullets = [f"- {filler}"] * (by_type["num_bullets"][0].n if "num_bullets" in by_type else 0)
    last = [ends[-1]] if ends else []
    min_words = max([c.n for c in by_type.get("min_words", [])], default=0)
    lines = [" ".join(first), *bullets, " ".join(last)]
    while count_words("\n".join(lines)) < min_words:
        lines[0] += f" {filler}"
    text = "\n".join(line for line in lines if line)
    if "lowercase" in by_type:
        text = text.lower()
    if "all_caps" in by_type:
        text = text.upper()
    if "wrap_in_quotes" in by_type:
        text = f'"{text}"'
    return text


def test_witness_builder_is_an_oracle():
    """Sanity of the oracle itself: it satisfies a compatible set, and cannot satisfy a contradictory one."""
    ok = [StartWith("Sure!"), IncludeKeyword("tea"), NumBullets(2), EndWith("That is all."), MinWords(12)]
    assert rule_reward(_witness(ok), ok) == 1.0
    for bad in ([Lowercase(), StartWith("Sure!")], [WrapInQuotes(), EndWith("That is all.")]):
        assert rule_reward(_witness(bad), bad) < 1.0


def test_rows_have_the_promised_shape():
    rows = make_instruction_prompts(50, seed=3, min_constraints=1, max_constraints=3)
    assert len(rows) == 50
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "constraints", "n_constraints", "id"}
        assert row["id"] == f"if-train-3-{i:05d}"
        constraints = [from_dict(d) for d in row["constraints"]]
        assert row["n_constraints"] == len(constraints) and 1 <= len(constraints) <= 3
        assert len({c.type for c in constraints}) == len(constraints), "kinds repeat within a row"
        assert all(c.type in DEFAULT_KINDS for c in constraints)
        request = next(r for r in base_requests("train") if row["prompt"].startswith(r + " "))
        assert row["prompt"] == " ".join([request, *(c.instruction() for c in constraints)])
    assert len({r["id"] for r in rows}) == 50


def test_generator_is_deterministic():
    a = make_instruction_prompts(200, seed=0)
    assert a == make_instruction_prompts(200, seed=0)
    assert a[:37] == make_instruction_prompts(37, seed=0)
    b = make_instruction_prompts(200, seed=1)
    assert [r["prompt"] for r in a] != [r["prompt"] for r in b]
    h = make_instruction_prompts(200, seed=0, split="heldout")
    assert [r["prompt"] for r in a] != [r["prompt"] for r in h]


def test_train_and_heldout_use_disjoint_requests():
    train, heldout = set(base_requests("train")), set(base_requests("heldout"))
    assert not train & heldout
    assert train | heldout == set(BASE_REQUESTS)
    assert len(BASE_REQUESTS) == len(set(BASE_REQUESTS)) == 60
    assert (len(train), len(heldout)) == (40, 20)
    for split, allowed, forbidden in (("train", train, heldout), ("heldout", heldout, train)):
        for row in make_instruction_prompts(300, seed=5, split=split):
            assert any(row["prompt"].startswith(r + " ") for r in allowed), row
            assert not any(row["prompt"].startswith(r + " ") for r in forbidden), row
    with pytest.raises(ValueError, match="split must be one of"):
        base_requests("test")


def test_requests_are_covered_evenly():
    rows = make_instruction_prompts(45, seed=2, split="heldout")  # 20 requests: 2 full passes + 5
    counts = {r: sum(row["prompt"].startswith(r + " ") for row in rows) for r in base_requests("heldout")}
    assert sorted(set(counts.values())) == [2, 3]
    assert sum(counts.values()) == 45


@pytest.mark.parametrize(
    "kinds, max_constraints", [(DEFAULT_KINDS, 2), (DEFAULT_KINDS, 4), (ALL_KINDS, 3), (ALL_KINDS, 5)]
)
def test_no_contradictory_combinations(kinds, max_constraints):
    """2000 rows: every row's constraints are satisfied together by a constructed text (the oracle)."""
    rows = make_instruction_prompts(2000, seed=11, kinds=kinds, max_constraints=max_constraints)
    for row in rows:
        constraints = [from_dict(d) for d in row["constraints"]]
        text = _witness(constraints)
        assert rule_reward(text, constraints) == 1.0, (row, text)
        types = {c.type for c in constraints}
        assert not {"lowercase", "all_caps"} <= types
        maxw = [c.n for c in constraints if c.type == "max_words"]
        minw = [c.n for c in constraints if c.type == "min_words"]
        assert not (maxw and minw and maxw[0] < minw[0])
        inc = {c.word.casefold() for c in constraints if c.type == "include_keyword"}
        exc = {c.word.casefold() for c in constraints if c.type == "exclude_word"}
        assert not inc & exc
    n_seen = {row["n_constraints"] for row in rows}
    assert n_seen == set(range(1, max_constraints + 1))
    kinds_seen = {d["type"] for row in rows for d in row["constraints"]}
    assert kinds_seen == set(kinds)


def test_default_word_limits_in_range():
    rows = make_instruction_prompts(500, seed=0)
    limits = {d["n"] for row in rows for d in row["constraints"] if d["type"] == "max_words"}
    assert limits and min(limits) >= 20 and max(limits) <= 60


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": -1}, "non-negative int"),
        ({"min_constraints": 0}, "1 <= min_constraints"),
        ({"min_constraints": 3, "max_constraints": 2}, "1 <= min_constraints"),
        ({"max_constraints": 7}, "len(kinds) = 6"),
        ({"kinds": ("lowercase", "shout")}, "unknown constraint kinds ['shout']"),
        ({"kinds": ("lowercase", "lowercase")}, "must not repeat"),
        ({"split": "test"}, "split must be one of"),
    ],
)
def test_generator_rejects_bad_arguments(kwargs, message):
    args = {"n": 3, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as e:
        make_instruction_prompts(args.pop("n"), args.pop("seed"), **args)
    assert message in str(e.value)


def test_generator_reports_impossible_kind_sets():
    with pytest.raises(ValueError, match="could not draw 2 compatible constraints"):
        make_instruction_prompts(1, 0, kinds=("lowercase", "all_caps"), min_constraints=2, max_constraints=2)


def test_write_jsonl_round_trip(tmp_path):
    rows = make_instruction_prompts(5, seed=0)
    path = write_jsonl(rows, tmp_path / "sub" / "rows.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    reward = InstructionFollowingReward()
    for row in (json.loads(line) for line in lines):
        assert 0.0 <= reward(row["prompt"], "a short answer", row) <= 1.0
