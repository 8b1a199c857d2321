"""Sampling completions from a causal LM (Hugging Face ``generate`` with KV cache), seeded and batched.

Used by the quickstart (building preference pairs), by evaluation (held-out reward, KL measurement) and by
best-of-N style decoding. Prompts are token-id lists (``render_prompts`` applies the chat template); each
prompt gets ``n`` completions. A completion ends at the tokenizer's end-of-sequence token (kept in its ids) or at
``max_new_tokens`` (``finished=False``, counted by callers, never hidden).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

__all__ = ["Completions", "render_prompts", "sample"]


@dataclass
class Completions:
    """``len(prompt_index)`` completions; field ``k`` of each list describes completion k."""

    prompt_index: list[int]
    """Which prompt (position in the input list) each completion answers."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    """Generated ids up to and including the end-of-sequence token, no padding."""
    texts: list[str]
    """Decoded completions without special tokens."""
    finished: list[bool]
    """True when the completion ended with the end-of-sequence token, False when cut at max_new_tokens."""


def render_prompts(tokenizer, prompts: Sequence[str | list[dict]], *, use_chat_template: bool = True) -> list[list[int]]:
    """Token ids of each prompt: a string becomes one user turn (with the chat template), a message list is
    templated as is; ``add_generation_prompt=True`` so the model answers as the assistant."""
    out = []
    for p in prompts:
        if use_chat_template and tokenizer.chat_template:
            messages = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        elif isinstance(p, str):
            text = p
        else:
            raise ValueError("chat-message prompts need a tokenizer with a chat template")
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


@torch.no_grad()
def sample(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 16,
           progress: bool = False, desc: str = "sampling") -> Completions:
    """``n`` completions for each prompt. ``temperature=0`` is greedy. Deterministic for a given seed and batch
    size: each batch reseeds a private RNG stream from (seed, batch number)."""
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:
        pad = eos
    jobs = [(i, list(p)) for i, p in enumerate(prompt_ids) for _ in range(n)]
    result = Completions([], [], [], [], [])
    was_training = model.training
    model.eval()
    for b, start in enumerate(tqdm(range(0, len(jobs), batch_size), desc=desc, disable=not progress, leave=False)):
        chunk = jobs[start:start + batch_size]
        width = max(len(p) for _, p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (_, p) in enumerate(chunk):  # left padding, so every prompt ends where generation starts
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + b)
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        for r, (i, p) in enumerate(chunk):
            gen = out[r, width:].tolist()
            finished = eos in gen
            gen = gen[: gen.index(eos) + 1] if finished else gen
            result.prompt_index.append(i)
            result.prompt_ids.append(p)
            result.completion_ids.append(gen)
            result.texts.append(tokenizer.decode(gen, skip_special_tokens=True))
            result.finished.append(finished)
    model.train(was_training)
    return result
