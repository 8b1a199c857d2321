"""Hidden states of completion groups that share their prompt, with each prompt run through the model once.

An online-RL batch holds G completions of every prompt. The plain forward pass (``tether.logprobs.hidden_states``
over right-padded prompt + completion rows) pushes each prompt through the backbone G times. Here every prompt is
run once, its per-layer keys and values are picked for each of its rows, and the completions continue from them —
two batched passes for the whole micro-batch, however many groups it holds:

    prefix  = backbone(prompts)                      (n, L, H)  right-padded, + cache of the L prompt slots
    suffix  = backbone(completions | cache[group])   (B, C, H)  position ids prompt_len … prompt_len + C − 1

A shorter prompt's padding slots sit between its last token and its completion in the cache; the attention mask
hides them, and the position ids continue from the prompt's true length, so RoPE sees the plain pass's positions.

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
                                group: Tensor, *, embedding_grad_in_place: bool = False) -> Tensor:
    """(B, T, H) final hidden states of right-padded rows, running each group's shared prompt once.

    Args:
        model: a Hugging Face causal LM (plain or wrapped by peft) whose backbone accepts a key/value cache.
        input_ids, attention_mask: (B, T) right-padded prompt + completion rows (as ``collate_rollouts`` builds).
        prompt_len: (B,) prompt length of each row.
        group: (B,) group id of each row; rows with the same id must have the same prompt (checked).
        embedding_grad_in_place: as in ``tether.logprobs.hidden_states`` (for ``.backward()`` callers).

    Gradient checkpointing in HF models turns the cache off in training mode, so a checkpointed model falls back
    to the plain pass (``tether.logprobs.hidden_states``), which gives the same values.
    """
    from transformers import DynamicCache

    from tether.logprobs import backbone_inputs, hidden_states

    base = _unwrap(model)
    backbone = base.get_decoder()
    # transformers ≥ 5.24 calls the cache argument `cache`; earlier versions `past_key_values`.
    cache_kw = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
    checkpointed = getattr(base, "is_activation_checkpointing", None)  # transformers ≥ 5.x name
    if checkpointed is None:
        checkpointed = getattr(base, "is_gradient_checkpointing", False)
    if checkpointed and base.training:
        return hidden_states(model, input_ids, attention_mask,
                             embedding_grad_in_place=embedding_grad_in_place) * attention_mask.unsqueeze(-1)
    B, T = input_ids.shape
    device = input_ids.device
    lengths = attention_mask.sum(-1)
    # Groups → 0..n-1; each group's prompt is taken from its first row and checked against every row.
    _, row_group = torch.unique(group, return_inverse=True)
    n = int(row_group.max()) + 1
    first = torch.full((n,), B, device=device).scatter_reduce(0, row_group, torch.arange(B, device=device), "amin")
    group_len = prompt_len[first]
    L = int(group_len.max())
    prompts = input_ids[first, :L] * (torch.arange(L, device=device) < group_len[:, None])
    row_len = group_len[row_group]
    in_prompt = torch.arange(L, device=device) < row_len[:, None]
    if bool((prompt_len != row_len).any()) or not torch.equal(input_ids[:, :L] * in_prompt, prompts[row_group]):
        bad = sorted({int(group[r]) for r in range(B) if int(prompt_len[r]) != int(row_len[r]) or
                      not torch.equal(input_ids[r, :int(row_len[r])], prompts[row_group[r], :int(row_len[r])])})
        raise ValueError(f"shared_prefix_hidden_states: the rows of group(s) {bad} do not share a prompt")
    prompt_mask = (torch.arange(L, device=device) < group_len[:, None]).long()

    # 1. Every prompt once, right-padded: (n, L, H) states + per-layer keys/values at positions 0 … L − 1.
    cache = DynamicCache()
    prefix = backbone(attention_mask=prompt_mask, use_cache=True, **{cache_kw: cache},
                      **backbone_inputs(backbone, prompts, embedding_grad_in_place)).last_hidden_state
    # 2. Every completion, continuing from its own prompt's keys/values (rows of the cache picked per row).
    C = int((lengths - prompt_len).max())
    states = [prefix.index_select(0, row_group)]
    if C > 0:
        cache.batch_select_indices(row_group)
        t = torch.arange(C, device=device)
        cols = (prompt_len[:, None] + t).clamp(max=T - 1)
        completion = torch.gather(input_ids, 1, cols)
        completion_mask = (prompt_len[:, None] + t < lengths[:, None]).long()
        positions = prompt_len[:, None] + t
        suffix_mask = torch.cat([prompt_mask[row_group], completion_mask], dim=1)
        states.append(backbone(attention_mask=suffix_mask, position_ids=positions, use_cache=True, **{cache_kw: cache},
                               **backbone_inputs(backbone, completion, embedding_grad_in_place)).last_hidden_state)
    joined = torch.cat(states, dim=1)  # (B, L + C, H): [prompt slots | completion slots]
    # 3. Back to the rows' layout: position t < prompt_len is prompt slot t, later ones completion slot t − len.
    t = torch.arange(T, device=device)
    source = torch.where(t < prompt_len[:, None], t, L + t - prompt_len[:, None]).clamp(max=joined.shape[1] - 1)
    out = torch.gather(joined, 1, source[..., None].expand(B, T, joined.shape[-1]))
    return out * attention_mask.unsqueeze(-1)
