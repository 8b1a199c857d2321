"""Preference data: loading, one message per bad row, chat template, truncation, collation, curriculum.

The tokenizer is tether.testing.tiny_tokenizer(): byte-level (one token per UTF-8 byte) with a ChatML
template, so token counts and decoded texts can be worked out by hand.
"""

from __future__ import annotations

import copy
import json
import random
import re

import pytest
import torch

from tether.data import (
    DataError,
    PreferenceExample,
    collate_preference,
    curriculum_order,
    curriculum_stages,
    load_preference_dataset,
    load_rows,
    tokenize_preference_rows,
)
from tether.testing import tiny_tokenizer

GOOD = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}
CONV = {
    "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    "chosen": [{"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "assistant", "content": "I like turtles."}],
}
MAX_LEN, MAX_PROMPT = 128, 64


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def load(path, tok, **kw):
    kw = {"max_length": MAX_LEN, "max_prompt_length": MAX_PROMPT, "on_error": "skip", **kw}
    return load_preference_dataset(path, tok, **kw)


def chatml(*messages, generation_prompt=False):
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


# ------------------------------------------------------------------------------------ one message per bad row


def with_fields(base, **fields):
    row = copy.deepcopy(base)
    for k, v in fields.items():
        if v is KeyError:
            del row[k]
        else:
            row[k] = v
    return row


BAD_ROWS = {
    # name: (row, reason, field, phrase)
    "missing field": (with_fields(GOOD, rejected=KeyError), "missing_field", "rejected", "is missing"),
    "null field": (with_fields(GOOD, chosen=None), "missing_field", "chosen", "missing (null)"),
    "chosen is an int": (with_fields(GOOD, chosen=3), "wrong_type", "chosen", "got int"),
    "nested junk": (with_fields(GOOD, prompt={"a": [1]}), "wrong_type", "prompt", "got dict"),
    "message not a dict": (with_fields(CONV, chosen=["Blue."]), "wrong_type", "chosen[0]", "got str"),
    "message without role": (
        with_fields(CONV, chosen=[{"content": "Blue."}]),
        "wrong_type",
        "chosen[0]",
        "has no 'role'",
    ),
    "message without content": (
        with_fields(CONV, rejected=[{"role": "assistant"}]),
        "wrong_type",
        "rejected[0]",
        "has no 'content'",
    ),
    "role not a string": (
        with_fields(CONV, prompt=[{"role": 1, "content": "x"}]),
        "wrong_type",
        "prompt[0].role",
        "got int",
    ),
    "content not a string": (
        with_fields(CONV, chosen=[{"role": "assistant", "content": ["x"]}]),
        "wrong_type",
        "chosen[0].content",
        "got list",
    ),
    "user turn in completion": (
        with_fields(CONV, chosen=[{"role": "user", "content": "x"}]),
        "wrong_type",
        "chosen[0].role",
        "'user'",
    ),
    "empty completion": (with_fields(GOOD, chosen=""), "empty", "chosen", "empty or whitespace-only"),
    "whitespace completion": (with_fields(GOOD, rejected=" \n\t"), "empty", "rejected", "whitespace-only"),
    "whitespace message": (
        with_fields(CONV, chosen=[{"role": "assistant", "content": "  "}]),
        "empty",
        "chosen",
        "empty",
    ),
    "no messages": (with_fields(CONV, rejected=[]), "empty", "rejected", "empty"),
    "identical pair": (
        with_fields(GOOD, rejected="Hi!"),
        "identical_pair",
        "rejected",
        "identical to 'chosen'",
    ),
    "giant prompt": (
        with_fields(GOOD, prompt="x" * 200),
        "prompt_too_long",
        "prompt",
        "more than max_prompt_length=64",
    ),
    "lone surrogate": (with_fields(GOOD, chosen="ok \ud800"), "undecodable", "chosen", "lone surrogate"),
    "surrogate in message": (
        with_fields(CONV, prompt=[{"role": "user", "content": "\udfff"}]),
        "undecodable",
        "prompt[0].content",
        "lone surrogate",
    ),
    "conversational prompt, string chosen": (
        with_fields(CONV, chosen="Blue."),
        "mixed_format",
        "chosen",
        "but 'prompt' is a list of messages",
    ),
    "string prompt, message completions": (
        with_fields(CONV, prompt="Name a colour."),
        "mixed_format",
        "chosen",
        "but 'prompt' is a string",
    ),
}
BAD_LINES = {
    # name: (raw bytes of line 2, reason, phrase)
    "invalid JSON": (b'{"prompt": "p", "chosen": ', "unreadable", "line 2 is not valid JSON"),
    "blank line": (b"   ", "unreadable", "line 2 is blank"),
    "not an object": (b'["p", "c", "r"]', "wrong_type", "line 2 holds a JSON list"),
    "invalid UTF-8 bytes": (
        b'{"prompt": "p\xff", "chosen": "c", "rejected": "r"}',
        "undecodable",
        "line 2 is not valid UTF-8 (byte 0xff",
    ),
}


def check_one_bad_row(path, tok, reason, field, phrase):
    """Rows 0 and 2 are good, row 1 is bad: exactly one drop, one message naming file, row and field."""
    examples, report = load(path, tok)
    assert [ex.index for ex in examples] == [0, 2]
    assert (report.rows_read, report.rows_kept, report.dropped) == (3, 2, {reason: 1})
    [line] = report.messages
    assert line.startswith(f"{path}: row 1: field '{field}': "), line
    assert phrase in line and "; " in line and "\n" not in line, line
    with pytest.raises(DataError) as err:
        load(path, tok, on_error="raise")
    assert line in str(err.value) and "1 of 3 rows are bad" in str(err.value)
    assert err.value.report.messages == [line]


@pytest.mark.parametrize("name", BAD_ROWS)
def test_each_bad_row_has_its_own_message(name, tok, tmp_path):
    row, reason, field, phrase = BAD_ROWS[name]
    good = CONV if isinstance(row.get("prompt"), list) else GOOD
    check_one_bad_row(write_jsonl(tmp_path / "d.jsonl", [good, row, good]), tok, reason, field, phrase)


@pytest.mark.parametrize("name", BAD_LINES)
def test_each_unreadable_jsonl_line_has_its_own_message(name, tok, tmp_path):
    raw, reason, phrase = BAD_LINES[name]
    good = json.dumps(GOOD).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(good + b"\n" + raw + b"\n" + good + b"\n")
    check_one_bad_row(path, tok, reason, "<row>", phrase)


def test_raise_lists_first_rows_and_total(tok):
    rows = [GOOD] + [with_fields(GOOD, chosen=i) for i in range(8)]
    with pytest.raises(DataError) as err:
        tokenize_preference_rows(rows, tok, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT, source="mem")
    text = str(err.value)
    assert "8 of 9 rows are bad" in text and "... and 3 more" in text and "on_error='skip'" in text
    assert [f"mem: row {i}: field 'chosen'" in text for i in range(1, 9)] == [True] * 5 + [False] * 3
    assert len(err.value.report.messages) == 8


def test_nothing_kept_raises_even_when_skipping(tok):
    with pytest.raises(DataError, match="none of the 2 rows is usable"):
        tokenize_preference_rows(
            [None, {"prompt": "p"}],
            tok,
            max_length=MAX_LEN,
            max_prompt_length=MAX_PROMPT,
            source="mem",
            on_error="skip",
        )


def test_conversational_rows_without_template_are_reported(tok):
    _, report = tokenize_preference_rows(
        [GOOD, CONV],
        tok,
        max_length=MAX_LEN,
        max_prompt_length=MAX_PROMPT,
        source="mem",
        use_chat_template=False,
        on_error="skip",
    )
    assert report.dropped == {"no_chat_template": 1}
    assert (
        report.messages[0].startswith("mem: row 1: field 'prompt': ")
        and "use_chat_template=False" in report.messages[0]
    )


def test_template_that_rewrites_the_prompt_is_a_clear_error(tok):
    tok = copy.deepcopy(tok)  # a template that renders the last user turn differently once an answer follows
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + (';' if loop.last else '|') }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"mem: row 0: field 'chosen': .*does not start"):
        tokenize_preference_rows([GOOD], tok, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT, source="mem")


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("base", [GOOD, CONV], ids=["standard", "conversational"])
def test_jsonl_parquet_and_save_to_disk_give_identical_examples(base, tok, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(5):
        row = copy.deepcopy(base)
        if isinstance(row["chosen"], str):
            row["chosen"] += f" #{i} é"
        else:
            row["chosen"][0]["content"] += f" #{i} é"
        rows.append({**row, "n_constraints": i % 3, "constraints": [f"c{j}" for j in range(i % 3)]})
    write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))

    results = {
        name: load(tmp_path / name, tok, on_error="raise") for name in ("d.jsonl", "d.parquet", "ds", "dd")
    }
    reference, _ = results["d.jsonl"]
    assert len(reference) == 5 and reference[4].metadata == {"n_constraints": 1, "constraints": ["c0"]}
    for name, (examples, report) in results.items():
        assert examples == reference, name
        assert report.source == str(tmp_path / name) and report.rows_kept == 5


def test_load_errors_name_the_path_and_the_fix(tmp_path):
    import datasets

    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        load_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown extension '\.csv'; use a \.jsonl"):
        load_rows(tmp_path / "d.csv")
    datasets.DatasetDict({"test": datasets.Dataset.from_list([GOOD])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"no 'train' split \(splits: \['test'\]\)"):
        load_rows(tmp_path / "dd")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="not a dataset written by save_to_disk"):
        load_rows(tmp_path / "empty_dir")


def test_jsonl_rows_are_lines(tmp_path):
    """Row i is line i+1: CRLF endings and a byte-order mark are fine, a blank line is a (bad) row."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\n" + json.dumps(CONV).encode())
    rows = load_rows(path)
    assert rows[0] == GOOD and rows[2] == CONV and rows[1] == {} and "line 2 is blank" in rows[1].problem


# ----------------------------------------------------------------------------------------------- tokenization


def test_chat_template_is_applied_and_prompt_ids_are_shared(tok):
    """Byte-level ids decode back to the exact ChatML text; prompt + completion ids tokenize the full chat."""
    (std, conv), _ = tokenize_preference_rows(
        [GOOD, CONV], tok, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT, source="mem"
    )
    assert tok.decode(std.prompt_ids) == chatml(("user", "Say hi."), generation_prompt=True)
    assert tok.decode(std.chosen_ids) == "Hi!<|im_end|>\n"
    assert tok.decode(std.rejected_ids) == "No.<|im_end|>\n"
    assert tok.decode(conv.prompt_ids) == chatml(
        ("system", "Be brief."), ("user", "Name a colour."), generation_prompt=True
    )
    assert tok.decode(conv.rejected_ids) == "I like turtles.<|im_end|>\n"
    for ex, row in ((std, GOOD), (conv, CONV)):
        msgs = (
            [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        )
        for name in ("chosen", "rejected"):
            done = [{"role": "assistant", "content": row[name]}] if isinstance(row[name], str) else row[name]
            full = tok(tok.apply_chat_template(msgs + done, tokenize=False), add_special_tokens=False)[
                "input_ids"
            ]
            assert full == ex.prompt_ids + getattr(ex, f"{name}_ids")


def test_raw_strings_get_eos_without_template(tok):
    (ex,), _ = tokenize_preference_rows(
        [GOOD], tok, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT, source="mem", use_chat_template=False
    )
    assert tok.decode(ex.prompt_ids) == "Say hi."
    assert tok.decode(ex.chosen_ids) == "Hi!<|im_end|>" and ex.chosen_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.rejected_ids) == "No.<|im_end|>"


def test_truncation_cuts_the_completion_never_the_prompt_and_counts_it(tok):
    """Prompt = 26 tokens: <|im_start|> + 'user\\n' (5) + 'Say hi.' (7) + <|im_end|> + '\\n' + <|im_start|>
    + 'assistant\\n' (10). max_length 40 leaves 14 completion tokens; 'A' * 30 + <|im_end|> + '\\n' is 32."""
    rows = [with_fields(GOOD, chosen="A" * 30), GOOD, with_fields(GOOD, chosen="B" * 30, rejected="C" * 30)]
    examples, report = tokenize_preference_rows(rows, tok, max_length=40, max_prompt_length=30, source="mem")
    prompt_ids = tok(chatml(("user", "Say hi."), generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    assert len(prompt_ids) == 26
    assert all(ex.prompt_ids == prompt_ids for ex in examples)
    assert (
        tok.decode(examples[0].chosen_ids) == "A" * 14
        and tok.decode(examples[0].rejected_ids) == "No.<|im_end|>\n"
    )
    assert tok.decode(examples[1].chosen_ids) == "Hi!<|im_end|>\n"
    assert tok.decode(examples[2].rejected_ids) == "C" * 14
    assert (
        report.truncated == {"chosen": 2, "rejected": 1} and report.rows_kept == 3 and report.messages == []
    )
    assert "truncated completions: chosen 2, rejected 1" in report.summary()

    examples, report = tokenize_preference_rows(
        rows, tok, max_length=40, max_prompt_length=30, source="mem", truncation="drop"
    )
    assert [ex.index for ex in examples] == [1] and report.dropped == {"too_long": 2}
    assert report.truncated == {"chosen": 0, "rejected": 0}
    assert report.messages[0].startswith(
        "mem: row 0: field 'chosen': prompt + chosen is 58 tokens, more than max_length=40"
    )
    with pytest.raises(DataError, match="mem: row 2: field 'chosen': prompt \\+ chosen is 58 tokens"):
        tokenize_preference_rows(
            rows, tok, max_length=40, max_prompt_length=30, source="mem", truncation="error"
        )


def test_pair_identical_after_truncation_is_dropped(tok):
    rows = [GOOD, with_fields(GOOD, chosen="A" * 20 + "x", rejected="A" * 20 + "y")]
    _, report = tokenize_preference_rows(
        rows, tok, max_length=40, max_prompt_length=30, source="mem", on_error="skip"
    )
    assert report.dropped == {"identical_pair": 1}
    assert report.messages[0].startswith(
        "mem: row 1: field 'rejected': is identical to 'chosen' after both are cut"
    )


def test_bad_arguments_say_what_to_change(tok):
    with pytest.raises(ValueError, match="max_prompt_length < max_length"):
        tokenize_preference_rows([GOOD], tok, max_length=8, max_prompt_length=8, source="mem")
    with pytest.raises(ValueError, match="use 'raise' or 'skip'"):
        tokenize_preference_rows(
            [GOOD], tok, max_length=9, max_prompt_length=8, source="mem", on_error="warn"
        )
    with pytest.raises(DataError, match="mem: no rows"):
        tokenize_preference_rows([], tok, max_length=9, max_prompt_length=8, source="mem")


# ------------------------------------------------------------------------------------------------------- fuzz


def random_text(rng, prefix):
    alphabet = "abc XYZ.,!?\n\té中😀"
    return prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def random_row(rng):
    """A valid row (chosen starts 'C', rejected 'R': they differ on their first token), then 0-2 mutations."""
    conv = rng.random() < 0.5
    row = {
        "prompt": random_text(rng, "P"),
        "chosen": random_text(rng, "C"),
        "rejected": random_text(rng, "R"),
    }
    if conv:
        row["prompt"] = [{"role": "user", "content": row["prompt"]}]
        row["chosen"] = [{"role": "assistant", "content": row["chosen"]}]
        row["rejected"] = [{"role": "assistant", "content": row["rejected"]}]
    if rng.random() < 0.3:
        row["n_constraints"] = rng.randint(0, 5)
    junk = [
        0,
        1.5,
        True,
        None,
        {"a": [1, {"b": None}]},
        [1, None],
        [["x"]],
        [{"role": "assistant"}],
        [{"role": None, "content": "x"}],
        [{"role": "assistant", "content": 3}],
        [],
        "",
        " \n",
        "\ud800",
        [{"role": "user", "content": "hi"}],
        "x" * 400,
        [{"role": "assistant", "content": "x\udc00"}],
    ]
    for _ in range(rng.choice([0, 0, 1, 1, 2])):
        name = rng.choice(["prompt", "chosen", "rejected"])
        kind = rng.randrange(7)
        if kind == 0:
            row.pop(name, None)
        elif kind == 1:
            row[name] = copy.deepcopy(rng.choice(junk))
        elif kind == 2:
            row["rejected"] = copy.deepcopy(row.get("chosen"))
        elif kind == 3 and isinstance(row.get(name), str):
            row[name] += "\ud83d" if rng.random() < 0.5 else " " + "y" * rng.randint(30, 300)
        elif kind == 4:  # swap this field's format
            v = row.get(name)
            if isinstance(v, str):
                row[name] = [{"role": "user" if name == "prompt" else "assistant", "content": v}]
            elif isinstance(v, list) and v and isinstance(v[0], dict):
                row[name] = str(v[0].get("content"))
        elif kind == 5:
            return copy.deepcopy(rng.choice([None, [], "row", 7, {"other": 1}, {}]))
        elif kind == 6 and isinstance(row.get(name), list) and row[name]:
            row[name][0] = rng.choice(["x", None, {"content": "x"}, {"role": "assistant", "content": "  "}])
    return row


def oracle_valid(row, tok, max_prompt_length):
    """Independent statement of a valid row (completions here never become identical by truncation)."""
    if not isinstance(row, dict) or any(row.get(k) is None for k in ("prompt", "chosen", "rejected")):
        return False

    def kind(v, completion):
        if isinstance(v, str):
            ok = bool(v.strip())
            texts = [v]
        else:
            ok = (
                isinstance(v, list)
                and bool(v)
                and all(
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                    and (not completion or m["role"] == "assistant")
                    for m in v
                )
                and any(m["content"].strip() for m in v)
            )
            texts = [s for m in v for s in (m["role"], m["content"])] if ok else []
        try:
            for t in texts:
                t.encode("utf-8")
        except UnicodeEncodeError:
            return None
        return type(v) if ok else None

    kinds = {kind(row["prompt"], False), kind(row["chosen"], True), kind(row["rejected"], True)}
    if None in kinds or len(kinds) != 1 or row["chosen"] == row["rejected"]:
        return False
    prompt = (
        row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
    )
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"]) <= max_prompt_length


def test_fuzz_random_malformed_rows(tok):
    rng = random.Random(1234)
    rows = [random_row(rng) for _ in range(300)]
    max_length, max_prompt = 80, 64
    examples, report = tokenize_preference_rows(
        rows, tok, max_length=max_length, max_prompt_length=max_prompt, source="fuzz", on_error="skip"
    )
    kept = [ex.index for ex in examples]
    assert report.rows_read == 300 and report.rows_kept == len(kept)
    assert report.rows_kept + sum(report.dropped.values()) == report.rows_read
    assert 40 < len(kept) < 260, "the generator should produce a real mix"
    assert len(report.dropped) >= 7, report.dropped

    line = re.compile(r"^fuzz: row (\d+): field '([^']+)': [^\n]+; [^\n]+$")
    message_rows = [int(line.match(m).group(1)) for m in report.messages]
    assert sorted(message_rows) == message_rows  # one line per dropped row, in row order, none twice
    assert set(message_rows) == set(range(300)) - set(kept) and len(message_rows) == len(set(message_rows))

    assert kept == [i for i, row in enumerate(rows) if oracle_valid(row, tok, max_prompt)]
    for ex in examples:
        assert len(ex.prompt_ids) <= max_prompt and ex.chosen_ids and ex.rejected_ids
        assert max(len(ex.chosen_ids), len(ex.rejected_ids)) + len(ex.prompt_ids) <= max_length
        assert ex.chosen_ids != ex.rejected_ids
        assert ex.metadata == {
            k: v for k, v in rows[ex.index].items() if k not in ("prompt", "chosen", "rejected")
        }


def test_fuzz_corrupted_jsonl_bytes(tok, tmp_path):
    """Random byte damage to a JSONL file: every line is accounted for, none crashes the loader."""
    rng = random.Random(99)
    lines = []
    for i in range(60):
        raw = bytearray(json.dumps(with_fields(GOOD, chosen=f"Hi {i}")).encode())
        if rng.random() < 0.5:
            raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xC3, ord("{"), ord('"'), ord("\\"), 0x00])
        lines.append(bytes(raw).replace(b"\n", b" "))
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    examples, report = load(path, tok)
    assert report.rows_read == 60 and report.rows_kept + sum(report.dropped.values()) == 60
    assert len(report.messages) == 60 - len(examples)
    assert all(
        re.match(rf"^{re.escape(str(path))}: row \d+: field '[^']+': .+; .+$", m) for m in report.messages
    )


# -------------------------------------------------------------------------------------------------- collation


def test_collate_alignment_by_hand():
    """Pair 0: prompt [1,2,3], chosen [4,5], rejected [6]; pair 1: prompt [7], chosen [8], rejected [9,10,11].

    Rows 0-1 chosen, rows 2-3 rejected, T = 5, pad 0. labels[:, t] = input_ids[:, t+1] when t+1 is a
    completion token: e.g. row 0 predicts 4 from position 2 (token 3) and 5 from position 3; position 4 has
    nothing to predict.
    """
    examples = [
        PreferenceExample([1, 2, 3], [4, 5], [6], {}, 0),
        PreferenceExample([7], [8], [9, 10, 11], {}, 1),
    ]
    batch = collate_preference(examples, pad_token_id=0)
    x = -100
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, 0, 0, 0],
        [1, 2, 3, 6, 0],
        [7, 9, 10, 11, 0],
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ]
    assert batch["labels"].tolist() == [[x, x, 4, 5, x], [8, x, x, x, x], [x, x, 6, x, x], [9, 10, 11, x, x]]
    assert batch["lengths"].tolist() == [2, 1, 1, 3]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_gather_recovers_completion_logprobs(tok):
    """With 'logits' = one-hot of the next input token, gathering at labels gives log 1 = 0 on every
    completion token, and the gather picks exactly the completion tokens (the examples' own ids)."""
    examples, _ = tokenize_preference_rows(
        [GOOD, CONV], tok, max_length=MAX_LEN, max_prompt_length=MAX_PROMPT, source="mem"
    )
    batch = collate_preference(examples, tok.pad_token_id)
    labels, mask = batch["labels"], batch["labels"] != -100
    gathered = [labels[r][mask[r]].tolist() for r in range(4)]
    assert gathered == [ex.chosen_ids for ex in examples] + [ex.rejected_ids for ex in examples]
    next_token = torch.roll(batch["input_ids"], -1, dims=1)
    logits = torch.full((*labels.shape, len(tok)), -1e4).scatter(2, next_token.unsqueeze(-1), 0.0)
    logp = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.all(logp[mask].abs() < 1e-6)
    assert mask.sum(1).tolist() == batch["lengths"].tolist()


# ------------------------------------------------------------------------------------------------- curriculum


def curriculum_examples(n=40, seed=0):
    rng = random.Random(seed)
    return [PreferenceExample([1], [2], [3], {"n_constraints": rng.randint(1, 5)}, i) for i in range(n)]


def test_curriculum_order_is_sorted_and_seed_deterministic():
    examples = curriculum_examples()
    order = curriculum_order(examples, seed=0)
    values = [examples[j].metadata["n_constraints"] for j in order]
    assert sorted(order) == list(range(40)) and values == sorted(values)
    assert order == curriculum_order(examples, seed=0)
    assert order != curriculum_order(examples, seed=1)  # 40 items over 5 values: ties are reshuffled


def test_curriculum_stages():
    examples = curriculum_examples()
    [one] = curriculum_stages(examples, boundaries=[], seed=3)
    assert set(one) == set(range(40)) and one == curriculum_order(examples, seed=3)
    easy, hard = curriculum_stages(examples, boundaries=[2], seed=3)
    assert all(examples[j].metadata["n_constraints"] <= 2 for j in easy)
    assert all(examples[j].metadata["n_constraints"] > 2 for j in hard)
    assert easy + hard == curriculum_order(examples, seed=3)
    with pytest.raises(ValueError, match="strictly increasing"):
        curriculum_stages(examples, boundaries=[3, 2])


def test_curriculum_errors_name_the_row():
    examples = curriculum_examples(5)
    examples[3] = PreferenceExample([1], [2], [3], {"other": 1}, 17)
    with pytest.raises(DataError, match=r"example 3 \(source row 17\): metadata has no 'n_constraints'"):
        curriculum_order(examples)
    examples[3] = PreferenceExample([1], [2], [3], {"n_constraints": "two"}, 17)
    with pytest.raises(DataError, match="must be a number"):
        curriculum_stages(examples, boundaries=[2])
