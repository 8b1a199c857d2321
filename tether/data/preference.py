"""Preference data in TRL's format: load, validate, chat-template, tokenize, collate, order by curriculum.

Rows (the two TRL formats; any other field is kept as metadata, e.g. ``n_constraints``):

    standard:        {"prompt": str, "chosen": str, "rejected": str}
    conversational:  {"prompt": [{"role", "content"}, ...],
                      "chosen": [{"role": "assistant", "content"}, ...], "rejected": [...same...]}

Sources: a JSONL file (one JSON object per line), a Parquet file, or a directory written by
``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` must have a "train" split).

Every bad row yields exactly ONE message line (its first problem), of the form

    "{source}: row {i}: field '{field}': {what is wrong}; {how to fix}"

``row i`` is always the 0-based index of the row in the list ``load_rows`` returns
(= ``PreferenceExample.index``). In a JSONL file every line is a row, blank lines included, so row i is
line i+1 of the file. A problem with the row as a whole (not JSON, not an object) names field '<row>'; a
field inside a chat message is named like ``chosen[0].role``. Under ``on_error="raise"`` all rows are
checked first, then one ``DataError`` lists the first few lines and the total; under ``on_error="skip"``
bad rows are dropped and counted in the ``DataReport``, whose ``summary()`` the caller prints. Drop
reasons (keys of ``DataReport.dropped``): unreadable, undecodable, missing_field, wrong_type,
mixed_format, empty, identical_pair, template_error, no_chat_template, prompt_too_long, too_long.

Tokenization. The prompt is tokenized once and both completions separately, so chosen and rejected share
the exact same prompt ids. With a chat template, the completion text is what the template adds after
the generation prompt: ``template(prompt + completion)[len(template(prompt, add_generation_prompt=True)):]``
(for ChatML that ends with ``<|im_end|>\\n``, so the end-of-turn token is trained). Standard rows are
wrapped as one user and one assistant message. Without a template, raw strings are used and eos is
appended to each completion. All tokenization uses ``add_special_tokens=False``.

Departures from the TRL DPO data path:
1. The prompt is never truncated. TRL-style pipelines cut prompts over ``max_prompt_length`` (keeping the
   end); here such a row is a bad row (``prompt_too_long``), because a cut prompt silently changes the task.
2. When prompt + completion exceeds ``max_length`` the completion is cut (``truncation="truncate"``) and
   the cut completions are counted per field in the report; ``"drop"`` and ``"error"`` are the alternatives.
3. A pair whose completions are identical, before or after truncation, is a bad row: it states no
   preference and gives exactly zero DPO gradient while still counting in the batch mean.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from tether.data.chat import control_token_problem, message_problem, special_tokens, texts_of

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

OnError = Literal["raise", "skip"]
Truncation = Literal["truncate", "drop", "error"]

FIELDS = ("prompt", "chosen", "rejected")
SHOWN_IN_ERROR = 5  # message lines quoted in a DataError / summary()


class DataError(ValueError):
    """Bad preference data. ``report`` (when set) holds the full count and every message line."""

    def __init__(self, message: str, report: DataReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass
class DataReport:
    """What happened to every row: nothing is dropped or truncated without being counted here."""

    source: str
    rows_read: int = 0
    """Rows seen (for JSONL: lines, blank and unreadable ones included)."""
    rows_kept: int = 0
    """Rows that became a ``PreferenceExample``."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> number of rows dropped for it (reasons are listed in the module docstring)."""
    truncated: dict[str, int] = field(default_factory=lambda: {"chosen": 0, "rejected": 0})
    """Field -> number of kept rows whose completion was cut to fit ``max_length``."""
    messages: list[str] = field(default_factory=list)
    """One line per dropped row, in row order."""

    def summary(self, max_messages: int = SHOWN_IN_ERROR) -> str:
        n_dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items()))
        lines = [
            f"{self.source}: read {self.rows_read} rows, kept {self.rows_kept}, dropped {n_dropped}"
            + (f" ({reasons})" if reasons else "")
            + f"; truncated completions: chosen {self.truncated['chosen']}, "
            + f"rejected {self.truncated['rejected']}"
        ]
        lines += [f"  {m}" for m in self.messages[:max_messages]]
        if len(self.messages) > max_messages:
            lines.append(f"  ... and {len(self.messages) - max_messages} more (see DataReport.messages)")
        return "\n".join(lines)


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenized preference pair. Completion ids exclude the prompt; both share ``prompt_ids``."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    metadata: dict
    """Every row field other than prompt / chosen / rejected."""
    index: int
    """0-based row index in the source (for JSONL the row's line number is index + 1)."""


class UnreadableRow(dict):
    """Stands in (as an empty dict) for a JSONL line that could not be read, so row i stays line i+1."""

    def __init__(self, reason: str, problem: str):
        super().__init__()
        self.reason = reason
        self.problem = problem


class _RowProblem(Exception):
    """A bad row: the reason key for the report, the field, and the 'what is wrong; how to fix' text."""

    def __init__(self, reason: str, field_name: str, text: str, is_error: bool = True):
        super().__init__(text)
        self.reason, self.field_name, self.text = reason, field_name, text
        self.is_error = is_error  # False: dropped by policy (truncation="drop"), never raised


# ---------------------------------------------------------------------------------------------------- loading


def load_rows(path: str | Path) -> list[dict]:
    """Read all rows of a ``.jsonl`` / ``.parquet`` file or a ``save_to_disk`` directory, in order.

    A JSONL line that cannot be read (invalid UTF-8, invalid JSON, blank, not an object) does not stop
    loading: it becomes an ``UnreadableRow`` (an empty dict carrying the problem) that validation reports
    as that row.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory; check the path (cwd is {Path.cwd()})")
    if path.is_dir():
        return _load_dataset_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise DataError(
        f"{path}: unknown extension {suffix!r}; use a .jsonl file (one JSON object per line), a .parquet "
        "file, or a directory written by datasets' save_to_disk (a .json file with one object per line: "
        "rename it to .jsonl)"
    )


def _load_jsonl(path: Path) -> list[dict]:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is harmless
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last line does not start another
        lines.pop()
    return [_parse_jsonl_line(raw.removesuffix(b"\r"), line_no) for line_no, raw in enumerate(lines, start=1)]


def _parse_jsonl_line(raw: bytes, line_no: int) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return UnreadableRow(
            "undecodable",
            f"line {line_no} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start}); "
            "re-encode the file as UTF-8",
        )
    if not text.strip():
        return UnreadableRow(
            "unreadable", f"line {line_no} is blank; delete it (every JSONL line must hold one JSON object)"
        )
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return UnreadableRow(
            "unreadable",
            f"line {line_no} is not valid JSON ({e.msg} at column {e.colno}); fix the JSON syntax",
        )
    except RecursionError:
        return UnreadableRow(
            "unreadable",
            f"line {line_no} nests JSON arrays/objects deeper than the parser's recursion limit; flatten the row",
        )
    if not isinstance(row, dict):
        return UnreadableRow(
            "wrong_type",
            f"line {line_no} holds a JSON {type(row).__name__}, not an object; "
            'put one {"prompt": ..., "chosen": ..., "rejected": ...} object on each line',
        )
    return row


def _load_dataset_dir(path: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise DataError(
            f"{path}: is a directory but not a dataset written by save_to_disk ({e}); "
            "pass a .jsonl or .parquet file, or the directory given to Dataset.save_to_disk"
        ) from e
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(
                f"{path}: DatasetDict has no 'train' split (splits: {sorted(ds)}); save the split you want "
                "to train on as 'train', or save that split alone with Dataset.save_to_disk"
            )
        ds = ds["train"]
    return ds.to_list()


# ------------------------------------------------------------------------------------------------- validation


def _validate_structure(row: Any) -> tuple[str, dict]:
    """Check one row's fields; return its format ("standard" | "conversational") and metadata, or raise."""
    if isinstance(row, UnreadableRow):
        raise _RowProblem(row.reason, "<row>", row.problem)
    if not isinstance(row, dict):
        raise _RowProblem(
            "wrong_type",
            "<row>",
            f"row is a {type(row).__name__}, not a dict; "
            "give each row 'prompt', 'chosen' and 'rejected' fields",
        )
    for name in FIELDS:
        if row.get(name) is None:
            found = sorted(map(str, row))[:10]
            raise _RowProblem(
                "missing_field",
                name,
                f"is missing{' (null)' if name in row else ''}; every row needs 'prompt', 'chosen' and "
                f"'rejected' (found fields: {found}); rename the field or drop the row",
            )
    kinds = {name: _check_field(name, row[name]) for name in FIELDS}
    for name in FIELDS:
        _check_encodable(name, row[name])
    for name in FIELDS:
        if found := control_token_problem(texts_of(row[name])):
            raise _RowProblem("control_token", name + found[0], found[1])
    if len(set(kinds.values())) > 1:
        other = next(n for n in FIELDS if kinds[n] != kinds["prompt"])
        raise _RowProblem(
            "mixed_format",
            other,
            f"is {_describe(kinds[other])} but 'prompt' is {_describe(kinds['prompt'])}; make prompt, chosen "
            "and rejected all strings (standard) or all message lists (conversational)",
        )
    for name in FIELDS:
        if _is_blank(row[name]):
            what = "completion" if name != "prompt" else "prompt"
            raise _RowProblem(
                "empty", name, f"is empty or whitespace-only; give a non-empty {what} or drop the row"
            )
    if row["chosen"] == row["rejected"]:
        raise _RowProblem(
            "identical_pair",
            "rejected",
            "is identical to 'chosen', so the pair states no preference; fix the pair or drop the row",
        )
    kind = kinds["prompt"]
    return kind, {k: v for k, v in row.items() if k not in FIELDS}


def _check_field(name: str, value: Any) -> str:
    if isinstance(value, str):
        return "standard"
    if not isinstance(value, list):
        raise _RowProblem(
            "wrong_type",
            name,
            f"expected a string or a list of {{'role', 'content'}} messages, got {type(value).__name__}; "
            "convert the field to one of those",
        )
    if value and (found := message_problem(value, completion=name != "prompt")):
        raise _RowProblem("wrong_type", name + found[0], found[1])
    return "conversational"


def _describe(kind: str) -> str:
    return "a string (standard)" if kind == "standard" else "a list of messages (conversational)"


def _texts(value: str | list[dict]) -> list[tuple[str, str]]:
    """(field suffix, text) for every string in a validated field."""
    if isinstance(value, str):
        return [("", value)]
    return [(f"[{j}].{k}", m[k]) for j, m in enumerate(value) for k in ("role", "content")]


def _check_encodable(name: str, value: str | list[dict]) -> None:
    for suffix, text in _texts(value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise _RowProblem(
                "undecodable",
                name + suffix,
                f"character {e.start} is {text[e.start]!r}, a lone surrogate that is not valid Unicode text "
                "(often half of an emoji cut by a broken export); repair the source text or drop the row",
            ) from None


def _is_blank(value: str | list[dict]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return all(not m["content"].strip() for m in value)  # also True for an empty list


# ----------------------------------------------------------------------------------------------- tokenization


def tokenize_preference_rows(
    rows: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
    source: str,
    use_chat_template: bool = True,
    on_error: OnError = "raise",
    truncation: Truncation = "truncate",
) -> tuple[list[PreferenceExample], DataReport]:
    """Validate and tokenize preference rows; return the kept examples and a report of every row.

    Args:
        rows: row dicts (e.g. from ``load_rows``); anything else is reported as a bad row.
        tokenizer: a Hugging Face tokenizer; its chat template is used when present and ``use_chat_template``.
        max_length: most tokens of prompt + one completion; longer completions follow ``truncation``.
        max_prompt_length: most prompt tokens (after the chat template); a longer prompt is a bad row.
        source: names the data in every message (``load_preference_dataset`` passes the path).
        use_chat_template: False uses raw strings (+ eos) even when the tokenizer has a template.
        on_error: "raise" -> one ``DataError`` listing the first bad rows and the count; "skip" -> drop
            and count them.
        truncation: "truncate" cuts the completion to fit (counted); "drop" drops the row (counted, with a
            message); "error" makes it a bad row handled by ``on_error``.

    Raises:
        DataError: bad rows under ``on_error="raise"``, no rows at all, no row kept, or a chat template whose
            full conversation does not start with its generation prompt.
    """
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"need 1 <= max_prompt_length < max_length, got max_prompt_length={max_prompt_length}, "
            f"max_length={max_length}; leave room for at least one completion token"
        )
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; use 'raise' or 'skip'")
    if truncation not in ("truncate", "drop", "error"):
        raise ValueError(f"truncation={truncation!r}; use 'truncate', 'drop' or 'error'")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    templated = use_chat_template and has_template
    if not templated and tokenizer.eos_token_id is None:
        raise ValueError(
            f"{source}: raw (no chat template) tokenization appends eos to each completion, but the "
            "tokenizer has no eos token; set tokenizer.eos_token or give it a chat template"
        )

    if not rows:
        raise DataError(f"{source}: no rows; check that the file holds preference data")
    special = special_tokens(tokenizer)
    report = DataReport(source=source, rows_read=len(rows))
    dropped: Counter[str] = Counter()
    errors = []  # the dropped rows that are errors (all but truncation="drop"), for on_error="raise"
    examples = []
    for i, row in enumerate(rows):
        try:
            example, cut = _row_example(row, i, tokenizer, special=special, templated=templated,
                                        has_template=has_template,
                                        source=source, max_length=max_length, max_prompt_length=max_prompt_length,
                                        truncation=truncation)
        except _RowProblem as p:
            dropped[p.reason] += 1
            report.messages.append(f"{source}: row {i}: field '{p.field_name}': {p.text}")
            if p.is_error:
                errors.append(report.messages[-1])
            continue
        for name in cut:
            report.truncated[name] += 1
        examples.append(example)

    report.rows_kept = len(examples)
    report.dropped = dict(dropped)
    if errors and on_error == "raise":
        raise DataError(
            _listing(f"{source}: {len(errors)} of {len(rows)} rows are bad", errors)
            + "\nfix these rows, or pass on_error='skip' to drop and count them (print DataReport.summary())",
            report,
        )
    if not examples:
        raise DataError(
            _listing(f"{source}: none of the {len(rows)} rows is usable", report.messages)
            + "\nfix the rows listed above",
            report,
        )
    return examples, report


def _row_example(row, i: int, tokenizer, *, special: frozenset[str] = frozenset(), templated: bool,
                 has_template: bool, source: str, max_length: int,
                 max_prompt_length: int, truncation: Truncation) -> tuple[PreferenceExample, list[str]]:
    """The example of one row and which completions were truncated; a bad row raises ``_RowProblem``."""
    kind, metadata = _validate_structure(row)
    for name in FIELDS:  # the tokenizer's own special tokens (``<filename>``, ``</s>`` …) beyond the <|…|> form
        if found := control_token_problem(texts_of(row[name]), special):
            raise _RowProblem("control_token", name + found[0], found[1])
    if kind == "conversational" and not templated:
        why = "use_chat_template=False" if has_template else "the tokenizer has no chat template"
        raise _RowProblem(
            "no_chat_template",
            "prompt",
            f"is a list of messages, which needs a chat template, but {why}; set "
            "use_chat_template=True or a tokenizer.chat_template, or convert the row to plain "
            "strings",
        )
    prompt_ids, completions = _tokenize_row(row, kind, tokenizer, templated, source, i)
    if len(prompt_ids) > max_prompt_length:
        raise _RowProblem(
            "prompt_too_long",
            "prompt",
            f"is {len(prompt_ids)} tokens{' after the chat template' if templated else ''}, more "
            f"than max_prompt_length={max_prompt_length}; shorten the prompt or raise "
            "max_prompt_length (prompts are never truncated)",
        )
    budget = max_length - len(prompt_ids)
    cut = [name for name in ("chosen", "rejected") if len(completions[name]) > budget]
    if cut and truncation != "truncate":
        name = cut[0]
        raise _RowProblem(
            "too_long",
            name,
            f"prompt + {name} is {len(prompt_ids) + len(completions[name])} tokens, more than "
            f"max_length={max_length}; raise max_length, or pass truncation='truncate' to cut "
            "completions",
            is_error=truncation == "error",
        )
    chosen_ids, rejected_ids = completions["chosen"][:budget], completions["rejected"][:budget]
    if chosen_ids == rejected_ids:
        raise _RowProblem(
            "identical_pair",
            "rejected",
            f"is identical to 'chosen' after both are cut to max_length={max_length} tokens (they "
            "differ only after that); raise max_length or drop the row",
        )
    return PreferenceExample(prompt_ids, chosen_ids, rejected_ids, metadata, i), cut


def _listing(head: str, lines: list[str]) -> str:
    more = [f"... and {len(lines) - SHOWN_IN_ERROR} more"] if len(lines) > SHOWN_IN_ERROR else []
    return "\n  ".join([head + ":", *lines[:SHOWN_IN_ERROR], *more])


def _tokenize_row(
    row: dict, kind: str, tokenizer, templated: bool, source: str, i: int
) -> tuple[list[int], dict[str, list[int]]]:
    """Prompt ids and the untruncated completion ids of a structurally valid row."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if not templated:
        return encode(row["prompt"]), {
            n: encode(row[n]) + [tokenizer.eos_token_id] for n in ("chosen", "rejected")
        }

    def as_messages(value, role):
        return [{"role": role, "content": value}] if kind == "standard" else value

    from jinja2 import TemplateError

    prompt_msgs = as_messages(row["prompt"], "user")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt_msgs, add_generation_prompt=True, tokenize=False)
        fulls = {
            n: tokenizer.apply_chat_template(prompt_msgs + as_messages(row[n], "assistant"), tokenize=False)
            for n in ("chosen", "rejected")
        }
    except (TemplateError, ValueError) as e:
        raise _RowProblem(
            "template_error",
            "prompt",
            f"the chat template rejects this conversation ({e}); "
            "make the messages follow the template's rules",
        ) from None
    completions = {}
    for name, full in fulls.items():
        if not full.startswith(prompt_text):
            raise DataError(
                f"{source}: row {i}: field '{name}': the chat template's text for prompt + {name} does "
                f"not start with its text for the prompt alone (prompt ends {prompt_text[-40:]!r}, full "
                f"reads {full[max(0, len(prompt_text) - 40) : len(prompt_text) + 20]!r} there), so the "
                "completion cannot be split off; use a template that renders earlier turns unchanged, or "
                "use_chat_template=False"
            )
        completions[name] = encode(full[len(prompt_text) :])
    return encode(prompt_text), completions


def load_preference_dataset(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int,
    use_chat_template: bool = True,
    on_error: OnError = "raise",
    truncation: Truncation = "truncate",
) -> tuple[list[PreferenceExample], DataReport]:
    """``load_rows(path)`` then ``tokenize_preference_rows(..., source=str(path))``; see both."""
    return tokenize_preference_rows(
        load_rows(path),
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        source=str(path),
        use_chat_template=use_chat_template,
        on_error=on_error,
        truncation=truncation,
    )


def check_preference_file(path: str | Path, *, on_error: OnError = "raise") -> int:
    """Check a preference file's rows before any model is loaded: readable lines, the three fields, message
    structure and roles, control-token text (what ``tokenize_preference_rows`` checks without a tokenizer; lengths
    wait for it). Under ``on_error="raise"`` bad rows raise one ``DataError`` naming them; return how many rows are
    bad (``"skip"`` drops and counts them later)."""
    rows = load_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows; check that the file holds preference data")
    errors = []
    for i, row in enumerate(rows):
        try:
            _validate_structure(row)
        except _RowProblem as p:
            errors.append(f"{path}: row {i}: field '{p.field_name}': {p.text}")
    if errors and on_error == "raise":
        raise DataError(_listing(f"{path}: {len(errors)} of {len(rows)} rows are bad", errors)
                        + "\nfix these rows, or set on_error: skip to drop and count them")
    return len(errors)


# -------------------------------------------------------------------------------------------------- collation


def collate_preference(examples: Sequence[PreferenceExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack B pairs into one (2B, T) batch for one forward pass: rows [0, B) chosen, [B, 2B) rejected.

    Row r holds ``prompt_ids + completion_ids``, right-padded with ``pad_token_id`` to T = the longest row.

    Label alignment (already shifted, unlike Hugging Face's ``labels``): ``labels[:, t]`` is the token the
    model should predict FROM position t, i.e. ``labels[:, t] = input_ids[:, t+1]`` when token t+1 is a
    completion token, and -100 otherwise (prompt, padding, and the last position). So the log-prob of the
    realized tokens is ``log_softmax(logits[:, t]).gather(labels[:, t])`` at every t with
    ``labels[:, t] != -100`` -- no further shift. Do not pass these labels to ``model(labels=...)``, which
    would shift them a second time.

    Returns (all int64):
        input_ids: (2B, T)
        attention_mask: (2B, T), 1 on real tokens, 0 on padding.
        labels: (2B, T), as above; exactly ``lengths[r]`` entries of row r are not -100.
        lengths: (2B,), completion tokens per row.
    """
    if not examples:
        raise ValueError("collate_preference got no examples; pass at least one PreferenceExample")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
    pairs = [(ex.prompt_ids, ex.chosen_ids) for ex in examples] + [
        (ex.prompt_ids, ex.rejected_ids) for ex in examples
    ]
    T = max(len(p) + len(c) for p, c in pairs)
    input_ids = torch.full((len(pairs), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), T), dtype=torch.long)
    labels = torch.full((len(pairs), T), -100, dtype=torch.long)
    for r, (prompt, completion) in enumerate(pairs):
        P, C = len(prompt), len(completion)
        input_ids[r, : P + C] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[r, : P + C] = 1
        labels[r, P - 1 : P + C - 1] = torch.tensor(completion, dtype=torch.long)
    lengths = torch.tensor([len(c) for _, c in pairs], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "lengths": lengths}


# ------------------------------------------------------------------------------------------------- curriculum


def _curriculum_key(examples: Sequence[PreferenceExample], key: str) -> list[float]:
    values = []
    for j, ex in enumerate(examples):
        if key not in ex.metadata:
            raise DataError(
                f"example {j} (source row {ex.index}): metadata has no {key!r} "
                f"(fields: {sorted(ex.metadata)}); add {key!r} to every row, or pass the name of the "
                "difficulty field as key="
            )
        v = ex.metadata[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
            raise DataError(
                f"example {j} (source row {ex.index}): metadata {key!r} is {v!r}; the curriculum key must be "
                "a number in every row"
            )
        values.append(v)
    return values


def curriculum_order(
    examples: Sequence[PreferenceExample], key: str = "n_constraints", seed: int = 0
) -> list[int]:
    """Positions of ``examples`` sorted ascending by ``metadata[key]``; ties in a seeded random order.

    The same (examples, key, seed) always gives the same order. Spec §10 (soft-constraint curriculum DPO):
    easy pairs (few constraints) before hard ones.
    """
    values = _curriculum_key(examples, key)
    tiebreak = list(range(len(examples)))
    random.Random(seed).shuffle(tiebreak)
    return sorted(range(len(examples)), key=lambda j: (values[j], tiebreak[j]))


def curriculum_stages(
    examples: Sequence[PreferenceExample],
    key: str = "n_constraints",
    boundaries: Sequence[int | float] = (2,),
    seed: int = 0,
) -> list[list[int]]:
    """Split ``curriculum_order`` into ``len(boundaries) + 1`` stages by the key's value n.

    Stage 0 holds n <= boundaries[0], stage k holds boundaries[k-1] < n <= boundaries[k], the last stage
    n > boundaries[-1]; e.g. ``boundaries=[2]`` gives an easy (n <= 2) and a hard (n > 2) stage of instructions
    by their number of constraints. The stages concatenated equal ``curriculum_order(examples, key,
    seed)``, so the sample stream is non-decreasing in n across stages; ``boundaries=[]`` gives one stage
    with all data. A stage may be empty: the recipe should say so rather than train on nothing.
    """
    boundaries = list(boundaries)
    if any(b >= c for b, c in zip(boundaries, boundaries[1:])):
        raise ValueError(f"boundaries={boundaries} must be strictly increasing, e.g. [2] or [1, 3]")
    values = _curriculum_key(examples, key)
    stages: list[list[int]] = [[] for _ in range(len(boundaries) + 1)]
    for j in curriculum_order(examples, key, seed):
        stages[sum(values[j] > b for b in boundaries)].append(j)
    return stages
