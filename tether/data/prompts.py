"""Prompt files for sampling, online RL and KL measurement: rows with a ``prompt`` (a string or chat messages) plus
whatever the rewards read (``answer``, ``constraints``, ``tests`` …), validated row by row."""

from __future__ import annotations

from pathlib import Path

from tether.data.preference import DataError, load_rows

__all__ = ["load_prompt_rows", "load_prompts"]


def _prompt_problem(prompt) -> str | None:
    if isinstance(prompt, str):
        return None if prompt.strip() else "empty"
    if isinstance(prompt, list):
        if not prompt:
            return "an empty message list"
        for k, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                return f"message {k} is not an object with a string 'content'"
        return None
    return "missing, or neither a string nor a list of chat messages" if prompt is None else \
        f"a {type(prompt).__name__}, not a string or a list of chat messages"


def load_prompt_rows(path: str | Path) -> list[dict]:
    """Every row of a JSONL / Parquet / ``save_to_disk`` file, each with a usable ``prompt``; the first bad row
    stops loading with the file, row and field named (nothing is dropped silently)."""
    rows = load_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows; a prompts file needs one object with a 'prompt' per line")
    for i, row in enumerate(rows):
        problem = getattr(row, "problem", None) or _prompt_problem(row.get("prompt") if isinstance(row, dict)
                                                                  else None)
        if problem:
            raise DataError(f"{path}: row {i}: field 'prompt': {problem}; every row needs a prompt (a non-empty "
                            "string or a list of chat messages)")
    return rows


def load_prompts(path: str | Path) -> list[str | list[dict]]:
    """The validated ``prompt`` of every row of ``path`` (see :func:`load_prompt_rows`)."""
    return [row["prompt"] for row in load_prompt_rows(path)]
