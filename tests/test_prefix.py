"""Shared-prompt forward (``tether.prefix``) against its plain twin (``tether.logprobs.hidden_states``): values at
every non-padding position and gradients of every parameter, fp32 1e-5 relative to the gradient's scale."""

from __future__ import annotations

import pytest
import torch

from tether.logprobs import hidden_states
from tether.models import enable_gradient_checkpointing
from tether.prefix import shared_prefix_hidden_states
from tether.testing import tiny_model

PAD = 256


def batch(prompts: list[list[int]], completions: list[list[list[int]]], order: list[int] | None = None):
    """Right-padded rows prompt + completion, with each row's prompt length and group, optionally reordered."""
    rows = [(g, p, c) for g, (p, cs) in enumerate(zip(prompts, completions)) for c in cs]
    if order is not None:
        rows = [rows[i] for i in order]
    T = max(len(p) + len(c) for _, p, c in rows)
    ids = torch.full((len(rows), T), PAD)
    mask = torch.zeros_like(ids)
    for r, (_, p, c) in enumerate(rows):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        mask[r, :len(p) + len(c)] = 1
    return (ids, mask, torch.tensor([len(p) for _, p, _ in rows]), torch.tensor([g for g, _, _ in rows]))


def assert_same_values_and_grads(model, ids, mask, prompt_len, group):
    params = [p for p in model.parameters() if p.requires_grad]
    plain = hidden_states(model, ids, mask)
    shared = shared_prefix_hidden_states(model, ids, mask, prompt_len, group)
    keep = mask.bool()
    torch.testing.assert_close(shared[keep], plain[keep], rtol=1e-5, atol=1e-5)
    assert shared[~keep].abs().max() == 0 if (~keep).any() else True
    weights = torch.randn(plain.shape, generator=torch.Generator().manual_seed(1)) * keep[..., None]
    g_plain = torch.autograd.grad((plain * weights).sum(), params)
    g_shared = torch.autograd.grad((shared * weights).sum(), params)
    for a, b in zip(g_shared, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [40, 41, 42, 43]]
COMPLETIONS = [[[1, 2, 3], [4], [7, 7, 7, 7, 7]], [[20, 21], [22, 23, 24, 25], [26]], [[30], [31, 32]]]


@pytest.mark.parametrize("order", [None, [4, 0, 7, 2, 5, 1, 6, 3]])
def test_shared_prompt_forward_matches_plain(order):
    model = tiny_model(hidden_size=64, num_layers=2).train()
    assert_same_values_and_grads(model, *batch(PROMPTS, COMPLETIONS, order))


def test_group_ids_are_labels_not_positions():
    """A mini-batch holds some of a step's groups: ids like 7, 3, 12 (the prompts' indices), in any order."""
    model = tiny_model(hidden_size=64, num_layers=2).train()
    ids, mask, prompt_len, group = batch(PROMPTS, COMPLETIONS, [4, 0, 7, 2, 5, 1, 6, 3])
    assert_same_values_and_grads(model, ids, mask, prompt_len, torch.tensor([7, 3, 12])[group])


def test_rows_without_completion_and_single_rows():
    model = tiny_model(hidden_size=64, num_layers=2).train()
    assert_same_values_and_grads(model, *batch([[5, 6, 7], [8, 9]], [[[], []], [[3, 4, 5]]]))


def test_lora_model_matches_plain():
    from tether.models import apply_lora

    model = apply_lora(tiny_model(hidden_size=64, num_layers=2), r=4, alpha=8).train()
    with torch.no_grad():  # non-zero adapters, so their gradients are not trivially zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert_same_values_and_grads(model, *batch(PROMPTS, COMPLETIONS))


def test_checkpointed_model_takes_the_plain_path():
    model = tiny_model(hidden_size=64, num_layers=2).train()
    enable_gradient_checkpointing(model)
    assert_same_values_and_grads(model, *batch(PROMPTS, COMPLETIONS))


def test_rows_of_a_group_must_share_the_prompt():
    ids, mask, prompt_len, group = batch(PROMPTS, COMPLETIONS)
    group[3] = 0  # a row of the second prompt claimed by the first group
    with pytest.raises(ValueError, match="do not share a prompt"):
        shared_prefix_hidden_states(tiny_model(), ids, mask, prompt_len, group)


def test_embedding_grad_in_place_gives_the_same_grads():
    """With ``embedding_grad_in_place`` (the recipe's update) the input-embedding gradient is added straight into
    ``.grad`` from both passes (prompts and completions); after ``.backward()`` every parameter's ``.grad`` equals
    the plain pass's, the tied embedding / LM-head weight included."""
    ids, mask, prompt_len, group = batch(PROMPTS, COMPLETIONS, [4, 0, 7, 2, 5, 1, 6, 3])
    weights = torch.randn(*ids.shape, 64, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    grads = []
    for shared in (False, True):
        model = tiny_model(hidden_size=64, num_layers=2).train()
        if shared:
            h = shared_prefix_hidden_states(model, ids, mask, prompt_len, group, embedding_grad_in_place=True)
        else:
            h = hidden_states(model, ids, mask)
        h = h * mask[..., None]  # padding states differ between the two (zero here, arbitrary there)
        (model.lm_head(h).logsumexp(-1).sum() + (h * weights).sum()).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()), msg=name)
