"""Grammar constraints on the embedded SmolLM2-135M-Instruct: 100 sampled completions (one batch of 100 rows,
temperature 1, each row its own draw) under a nested JSON schema all parse and validate with ``jsonschema``, and 100
under a date regex all full-match it; an unconstrained control of the same prompts (same seed, same length limit)
counts how often the model alone would not — printed, and recorded in the issue note.

The schema bounds every string (ASCII letters and spaces, ≤ 8) and number, so the longest valid object is 74
characters, and every non-special token carries at least one: 80 new tokens always suffice, and every constrained
row finishes (asserted: nothing cut, nothing dropped). The JSON control draws 50 rows (its rows mostly run the full
budget; this keeps the file near one minute on a quiet 2-core CPU)."""

import json
import re

import jsonschema
import pytest

from tether.models import load_model, load_tokenizer
from tether.sampling import render_prompts, sample
from tether.sampling.constraints import Constraint, ConstraintProcessor

ROWS = 100

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,8}$"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
JSON_PROMPT = ('Reply with only a JSON object describing a person: {"name": ..., "age": ..., '
               '"address": {"city": ..., "zip": "5 digits"}}.')
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
DATE_PROMPT = "Reply with only a date in the format YYYY-MM-DD, for a day in this century."


@pytest.fixture(scope="module")
def smollm2():
    return load_model(), load_tokenizer()


def _valid_json(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def test_nested_json_schema_always_validates(smollm2):
    model, tok = smollm2
    prompt = render_prompts(tok, [JSON_PROMPT])
    kwargs = dict(max_new_tokens=80, temperature=1.0, seed=0)
    held = sample(model, tok, prompt, n=ROWS, batch_size=ROWS,
                  processors=[ConstraintProcessor(Constraint.json_schema(SCHEMA), tok)], **kwargs)
    assert len(held.texts) == ROWS and all(held.finished), sum(held.finished)
    bad = [t for t in held.texts if not _valid_json(t)]
    assert not bad, bad[:3]
    control = 50
    free = sample(model, tok, prompt, n=control, batch_size=control, **kwargs)
    invalid = sum(not _valid_json(t.strip()) for t in free.texts)
    inner = sum(_valid_json(t[t.find("{"):t.rfind("}") + 1]) for t in free.texts)  # lenient: the outermost {...}
    print(f"\nJSON schema: constrained {ROWS}/{ROWS} valid (mean {sum(map(len, held.completion_ids)) / ROWS:.1f} "
          f"tokens); unconstrained control {control - invalid}/{control} valid ({invalid} invalid, "
          f"{control - sum(free.finished)} cut at 80 tokens; {inner}/{control} with a valid outermost {{...}})")


def test_regex_always_matches(smollm2):
    model, tok = smollm2
    prompt = render_prompts(tok, [DATE_PROMPT])
    kwargs = dict(n=ROWS, max_new_tokens=16, temperature=1.0, seed=0, batch_size=ROWS)
    held = sample(model, tok, prompt, processors=[ConstraintProcessor(Constraint.regex(DATE), tok)], **kwargs)
    assert len(held.texts) == ROWS and all(held.finished)
    bad = [t for t in held.texts if not re.fullmatch(DATE, t)]
    assert not bad, bad[:3]
    free = sample(model, tok, prompt, **kwargs)
    misses = sum(not re.fullmatch(DATE, t.strip()) for t in free.texts)
    inside = sum(bool(re.search(DATE, t)) for t in free.texts)  # lenient: a date anywhere in the text
    print(f"\nregex {DATE}: constrained {ROWS}/{ROWS} match; unconstrained control {ROWS - misses}/{ROWS} match "
          f"({misses} do not; {inside}/{ROWS} contain a match)")
