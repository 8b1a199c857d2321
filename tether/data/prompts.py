"""Prompt files for sampling, online RL and KL measurement: rows with a ``prompt`` (a string or chat messages) plus
whatever the rewards read (``answer``, ``constraints``, ``tests`` …), validated row by row to the preference
loader's standard: every bad row is named with its file, row and field and the fix; nothing is dropped silently.

Checked: readable JSON lines (a line nested past the parser's recursion limit is a bad row, not a crash), a
``prompt`` that is a non-empty string or a list of ``{"role", "content"}`` messages with string content and a known
role (``tether.data.chat.ROLES``), and no control-token text (``<|im_start|>`` …; refused, see ``tether.data.chat``).
A prompt longer than the model's context is refused where the prompts are tokenized (``tether.sampling``).
"""

from __future__ import annotations

from pathlib import Path

from tether.data.chat import control_token_problem, message_problem, texts_of
from tether.data.preference import SHOWN_IN_ERROR, DataError, UnreadableRow, load_rows

__all__ = ["load_prompt_rows", "load_prompts", "prompt_problem"]


def prompt_problem(prompt) -> tuple[str, str] | None:
    """``(field, problem)`` for a bad ``prompt`` value, or None."""
    if isinstance(prompt, str):
        if not prompt.strip():
            return "prompt", "is empty or whitespace-only"
    elif isinstance(prompt, list):
        if found := message_problem(prompt):
            return "prompt" + found[0], found[1]
    elif prompt is None:
        return "prompt", "is missing (or null)"
    else:
        return "prompt", f"is a {type(prompt).__name__}, not a string or a list of chat messages"
    if found := control_token_problem(texts_of(prompt)):
        return "prompt" + found[0], found[1]
    return None


def load_prompt_rows(path: str | Path) -> list[dict]:
    """Every row of a JSONL / Parquet / ``save_to_disk`` file, each with a usable ``prompt`` (module docstring);
    bad rows stop loading with one ``DataError`` naming the file, each row (the first few) and its field."""
    rows = load_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows; a prompts file needs one object with a 'prompt' per line")
    errors = []
    for i, row in enumerate(rows):
        if isinstance(row, UnreadableRow):
            found = ("<row>", row.problem)
        elif not isinstance(row, dict):
            found = ("<row>", f"is a {type(row).__name__}, not an object with a 'prompt'")
        else:
            found = prompt_problem(row.get("prompt"))
        if found:
            errors.append(f"row {i}: field '{found[0]}': {found[1]}")
    if errors:
        shown = "; ".join(errors[:SHOWN_IN_ERROR]) + (f"; … and {len(errors) - SHOWN_IN_ERROR} more"
                                                       if len(errors) > SHOWN_IN_ERROR else "")
        raise DataError(f"{path}: {len(errors)} of {len(rows)} rows are bad: {shown} — every row needs a 'prompt': "
                        "a non-empty string or a list of chat messages")
    return rows


def load_prompts(path: str | Path) -> list[str | list[dict]]:
    """The validated ``prompt`` of every row of ``path`` (see :func:`load_prompt_rows`)."""
    return [row["prompt"] for row in load_prompt_rows(path)]
