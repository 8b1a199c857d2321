"""Checks every reader of prompts and preference data shares: chat-message structure and control-token text.

- **Messages.** A conversational field is a non-empty list of ``{"role": str, "content": str}`` objects whose role
  is one of :data:`ROLES` (the roles chat templates render; an unknown role is usually a typo, and templates drop
  or misrender it).
- **Control-token text is refused, not neutralized.** Tokenizers match the literal text of their special tokens
  (``<|im_start|>``, ``<|eot_id|>``, …) inside ordinary text, so a row holding that text would be tokenized as the
  control token itself and could open or close a turn (a "system" turn injected by the data). Escaping it would
  change what the row says without the author knowing, so a row containing such text is a bad row, named with its
  field and the token. Caught: the ``<|name|>`` form of ChatML, Llama 3, Phi and SmolLM2 (regex
  :data:`CONTROL_TOKEN`), plus any special token of a tokenizer passed as ``special``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["CONTROL_TOKEN", "ROLES", "control_token_problem", "message_problem", "special_tokens"]

ROLES = ("system", "user", "assistant", "tool")
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_\-.:]{1,48}\|>")


def message_problem(messages: Any, *, completion: bool = False) -> tuple[str, str] | None:
    """``(where, problem)`` for the first structural problem of a chat-message list, or None.

    ``where`` is ``""`` or ``"[j]"`` / ``"[j].role"`` / ``"[j].content"``; ``completion`` also requires every
    role to be ``assistant`` (a completion holds only the model's turns)."""
    if not isinstance(messages, list):
        return "", f"expected a list of {{'role', 'content'}} messages, got {type(messages).__name__}"
    if not messages:
        return "", "is an empty message list; give at least one message"
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict):
            return f"[{j}]", (f"expected a {{'role', 'content'}} message object, got {type(msg).__name__}; write "
                              "each message as {'role': ..., 'content': ...}")
        for key in ("role", "content"):
            if key not in msg:
                return f"[{j}]", f"message has no '{key}' (keys: {sorted(map(str, msg))}); add '{key}'"
            if not isinstance(msg[key], str):
                return f"[{j}].{key}", (f"expected a string, got {type(msg[key]).__name__}"
                                        f"{' (null)' if msg[key] is None else ''}; make the message {key} a "
                                        "plain string")
        if msg["role"] not in ROLES:
            return f"[{j}].role", f"unknown role {msg['role']!r}; use one of {list(ROLES)}"
        if completion and msg["role"] != "assistant":
            return f"[{j}].role", (f"is {msg['role']!r} but completions hold only assistant messages; move "
                                   "earlier turns into 'prompt'")
    return None


def special_tokens(tokenizer) -> frozenset[str]:
    """The text of every special token of a Hugging Face tokenizer (added special tokens included)."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok))
    return frozenset(t for t in found if t)


def control_token_problem(texts: Iterable[tuple[str, str]], special: Iterable[str] = ()) -> tuple[str, str] | None:
    """``(where, problem)`` for the first text holding control-token text (module docstring), or None.

    ``texts``: ``(where, text)`` pairs, e.g. ``("", prompt)`` or ``("[0].content", ...)``."""
    special = [s for s in special if s]
    for where, text in texts:
        m = CONTROL_TOKEN.search(text)
        token = m.group(0) if m else next((s for s in special if s in text), None)
        if token is not None:
            return where, (f"holds the literal text of the control token {token!r}, which the tokenizer would "
                           "read as the token itself (it can start or end a chat turn); remove or reword it — "
                           "such rows are refused, not rewritten")
    return None


def texts_of(value: str | list[dict]) -> list[tuple[str, str]]:
    """``(where, text)`` for a string field or every role and content of a validated message list."""
    if isinstance(value, str):
        return [("", value)]
    return [(f"[{j}].{k}", m[k]) for j, m in enumerate(value) for k in ("role", "content")]
