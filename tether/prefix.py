"""Hidden states of completion groups that share their prompt, with each prompt run through the model once.

An online-RL batch holds G completions of every prompt. The plain forward pass (``tether.logprobs.hidden_states``
over right-padded prompt + completion rows) pushes each prompt through the backbone G times. Here each group's
prompt is run once, its per-layer keys and values are repeated G times, and the completions continue from them:

    prefix  = backbone(prompt)                       (1, L, H)  + cache of the L prompt positions
    suffix  = backbone(completions | cache)          (G, C, H)  positions L … L + C − 1

Causal attention makes this the same computation as the plain pass at every non-padding position (the prompt's
states do not depend on what follows; a completion token attends to the prompt's keys/values, which are the same
tensors either way), and autograd carries each completion's gradient back through the repeated cache into the one
prompt pass, so gradients are the sum over the group exactly as in the plain pass. With prompts of ~65 tokens and
completions of ~45, G = 8, the backbone sees ~45% of the plain pass's tokens.

``shared_prefix_hidden_states`` is the optimized twin of ``hidden_states``; the tests compare the two (values and
gradients, fp32 1e-5). States at padding positions are zero here (the plain pass leaves arbitrary values there);
no loss reads them.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from tether.logprobs import _unwrap


def shared_prefix_hidden_states(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: Tensor,
                                group: Tensor) -> Tensor:
    """(B, T, H) final hidden states of right-padded rows, running each group's shared prompt once.

    Args:
        model: a Hugging Face causal LM (plain or wrapped by peft) whose backbone accepts a key/value cache.
        input_ids, attention_mask: (B, T) right-padded prompt + completion rows (as ``collate_rollouts`` builds).
        prompt_len: (B,) prompt length of each row.
        group: (B,) group id of each row; rows with the same id must have the same prompt (checked).

    Gradient checkpointing in HF models turns the cache off in training mode, so a checkpointed model falls back
    to the plain pass (``tether.logprobs.hidden_states``), which gives the same values.
    """
    from transformers import DynamicCache

    from tether.logprobs import hidden_states

    base = _unwrap(model)
    backbone = base.get_decoder()
    # transformers ≥ 5.24 calls the cache argument `cache`; earlier versions `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    checkpointed = getattr(base, "is_activation_checkpointing", None)  # transformers ≥ 5.x name
    if checkpointed is None:
        checkpointed = getattr(base, "is_gradient_checkpointing", False)
    if checkpointed and base.training:
        return hidden_states(model, input_ids, attention_mask) * attention_mask.unsqueeze(-1)
    B, T = input_ids.shape
    lengths = attention_mask.sum(-1)
    device = input_ids.device
    pieces, order = [], []
    for g in torch.unique(group, sorted=False).tolist():
        rows = (group == g).nonzero().squeeze(-1)
        L = int(prompt_len[rows[0]])
        prompt = input_ids[rows[0], :L]
        if bool((prompt_len[rows] != L).any()) or not torch.equal(input_ids[rows, :L], prompt.expand(len(rows), L)):
            raise ValueError(f"shared_prefix_hidden_states: rows {rows.tolist()} of group {g} do not share a prompt")
        cache = DynamicCache()
        prefix = backbone(input_ids=prompt[None], use_cache=True, **{cache_kw: cache}).last_hidden_state
        parts = [prefix.expand(len(rows), L, prefix.shape[-1])]
        width = int(lengths[rows].max()) - L
        if width > 0:
            cache.batch_repeat_interleave(len(rows))
            positions = torch.arange(L, L + width, device=device).expand(len(rows), width)
            parts.append(backbone(input_ids=input_ids[rows, L:L + width], position_ids=positions, use_cache=True,
                                  **{cache_kw: cache}).last_hidden_state)
        h = torch.cat(parts, dim=1)
        keep = (torch.arange(h.shape[1], device=device) < lengths[rows, None]).unsqueeze(-1)
        pieces.append(torch.nn.functional.pad(h * keep, (0, 0, 0, T - h.shape[1])))
        order.append(rows)
    out = torch.cat(pieces)
    return out[torch.argsort(torch.cat(order))]
