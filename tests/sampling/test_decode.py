"""``tether.sampling.decode.LlamaDecoder`` (the optimized one-token step) against its plain twin, the model's own
forward with a ``DynamicCache``: logits step by step, row dropping, and whole sampling runs through either path
(``sample(..., lean_decode=True / False)``)."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from tether.models import apply_lora, enable_gradient_checkpointing
from tether.sampling import render_prompts, sample
from tether.sampling.decode import LlamaDecoder, supports
from tether.testing import tiny_model, tiny_tokenizer


def odd_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A Llama with uneven sizes (head_dim 6, 3 query heads per key/value head) and non-trivial norm weights, so
    a wrong head split, RoPE half or norm would show; larger init so the logits are O(1), not ≈ 0."""
    cfg = dict(vocab_size=101, hidden_size=36, intermediate_size=52, num_hidden_layers=3, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.2,
               rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    cfg.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        for name, p in model.named_parameters():
            if "norm" in name:
                p.data.uniform_(0.5, 1.5)
    return model


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids, mask


def prefill(model, ids, mask):
    cache = DynamicCache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                       past_key_values=cache).logits[:, -1]
    return cache, logits, positions[:, -1] + 1


def test_supports():
    assert supports(tiny_model()) and supports(odd_llama())
    assert not supports(odd_llama(attention_bias=True))
    assert not supports(odd_llama(mlp_bias=True))
    assert not supports(odd_llama(hidden_act="gelu"))
    assert not supports(odd_llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}))
    assert not supports(apply_lora(odd_llama(), r=2))
    checkpointed = odd_llama()
    enable_gradient_checkpointing(checkpointed)  # a recipe's gradient_checkpointing leaves no hook to skip
    assert getattr(checkpointed, "is_activation_checkpointing", None) or checkpointed.is_gradient_checkpointing
    assert supports(checkpointed)
    with pytest.raises(ValueError, match="LlamaDecoder: .* not a plain LlamaForCausalLM"):
        LlamaDecoder(odd_llama(mlp_bias=True))
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="lean_decode=True needs"):
        sample(odd_llama(mlp_bias=True, vocab_size=len(tok)), tok, [[1, 2]], lean_decode=True)
    with pytest.raises(ValueError, match="lean_decode=True needs engine='tether'"):
        sample(odd_llama(vocab_size=len(tok)), tok, [[1, 2]], lean_decode=True, engine="hf")


def test_steps_match_model_forward_with_row_dropping():
    """Five prompts of lengths 1-9 (left padding of up to 8), 7 steps; rows leave the batch after steps 2 and 4
    (with reordering), as finished rows do in sampling. fp32 logits of O(1): max abs error ≤ 1e-5."""
    model = odd_llama(seed=1)
    prompts = [[5, 9, 14, 2, 7, 7, 30, 1, 99], [3], [8, 8, 8, 8], [60, 61, 62, 63, 64, 65], [11, 12]]
    ids, mask = left_padded(prompts, pad=0)
    ref_cache, logits, pos = prefill(model, ids, mask)
    cache, _, _ = prefill(model, ids, mask)
    decoder = LlamaDecoder(model)
    decoder.start(cache, mask, max_new_tokens=8)
    ref_mask = mask
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for step in range(7):
        tokens = torch.randint(0, 101, (len(pos),), generator=gen)
        if step in (2, 4):
            keep = torch.tensor([3, 0, 2]) if step == 2 else torch.tensor([2, 0])
            ref_cache.batch_select_indices(keep)
            decoder.keep(keep)
            tokens, pos, ref_mask = tokens[keep], pos[keep], ref_mask[keep]
        ref_mask = torch.cat([ref_mask, ref_mask.new_ones(len(pos), 1)], dim=1)
        with torch.no_grad():
            ref = model(input_ids=tokens[:, None], attention_mask=ref_mask, position_ids=pos[:, None],
                        use_cache=True, past_key_values=ref_cache).logits[:, -1]
        got = decoder.step(tokens, pos)
        assert ref.abs().max() > 1.0  # logits of O(1): the comparison is not between near-zeros
        worst = max(worst, float((got - ref).abs().max()))
        pos = pos + 1
    assert worst <= 1e-5, worst


def test_decoder_sees_in_place_weight_updates():
    model = odd_llama(seed=2)
    ids, mask = left_padded([[1, 2, 3]], pad=0)
    cache, _, pos = prefill(model, ids, mask)
    decoder = LlamaDecoder(model)
    decoder.start(cache, mask, max_new_tokens=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # an optimizer step changes the tensors in place
        ref = model(input_ids=torch.tensor([[4]]), position_ids=pos[:, None], use_cache=True,
                    past_key_values=prefill(model, ids, mask)[0], attention_mask=torch.ones(1, 4)).logits[:, -1]
    assert torch.allclose(decoder.step(torch.tensor([4]), pos), ref, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_same_with_and_without_decoder(temperature):
    """Whole sampling runs (prompts of different lengths, rows leaving the batch at a stop string) give the same
    tokens and, within 1e-5, the same log-probs through either step implementation."""
    tok = tiny_tokenizer()
    model = odd_llama(seed=3, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.02)  # near-uniform next-token distributions: the vowels do come up
    prompts = render_prompts(tok, ["hi", "a much longer prompt here", "z"])
    kwargs = dict(n=3, max_new_tokens=14, temperature=temperature, seed=7, batch_size=9, stop_strings=tuple("aeiou"))
    fast = sample(model, tok, prompts, lean_decode=True, **kwargs)
    plain = sample(model, tok, prompts, lean_decode=False, **kwargs)  # the model's own forward for every step
    assert fast.completion_ids == plain.completion_ids
    assert fast.finished == plain.finished
    if temperature > 0:  # rows finished early (so rows left the batch) and rows ran to the length cap
        assert any(fast.finished) and not all(fast.finished), fast.finished
    for a, b in zip(fast.logprobs, plain.logprobs):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)


@pytest.mark.parametrize("rows", [13, 27])
def test_padded_row_counts_match_model_forward(rows):
    """Row counts of 16k + 11 … 16k + 15 are padded to a multiple of 16 inside the products (a CPU speed rule);
    the padding rows must not leak into the real rows' logits."""
    model = odd_llama(seed=4)
    gen = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(1, 101, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 8, (rows,), generator=gen)]
    ids, mask = left_padded(prompts, pad=0)
    ref_cache, _, pos = prefill(model, ids, mask)
    cache, _, _ = prefill(model, ids, mask)
    decoder = LlamaDecoder(model)
    decoder.start(cache, mask, max_new_tokens=3)
    tokens = torch.randint(0, 101, (rows,), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=tokens[:, None], attention_mask=torch.cat([mask, mask.new_ones(rows, 1)], dim=1),
                    position_ids=pos[:, None], use_cache=True, past_key_values=ref_cache).logits[:, -1]
    assert float((decoder.step(tokens, pos) - ref).abs().max()) <= 1e-5
