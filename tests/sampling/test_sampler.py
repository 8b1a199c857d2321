"""tether's sampling loop against Hugging Face ``generate`` and against teacher-forced recomputation."""

import pytest
import torch

from tether.logprobs import IGNORE_INDEX, hidden_states, lm_head, token_stats
from tether.sampling import render_prompts, sample
from tether.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module", params=["hf", "tether"])
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=5)
    prompts = render_prompts(tok, ["hi", "a much longer prompt here", [{"role": "user", "content": "x"}]])
    return model, tok, prompts


def test_greedy_equals_hf_generate(setup, engine):
    model, tok, prompts = setup
    ours = sample(model, tok, prompts, engine=engine, n=2, max_new_tokens=12, temperature=0.0, batch_size=4)
    for k, (i, completion) in enumerate(zip(ours.prompt_index, ours.completion_ids)):
        ids = torch.tensor([prompts[i]])
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in ref:
            ref = ref[: ref.index(tok.eos_token_id) + 1]
        assert completion == ref, k
    assert ours.prompt_index == [0, 0, 1, 1, 2, 2]


def test_sampler_logprobs_match_teacher_forcing(setup, engine):
    model, tok, prompts = setup
    out = sample(model, tok, prompts, engine=engine, n=3, max_new_tokens=10, temperature=0.7, seed=1, batch_size=4)
    weight, bias = lm_head(model)
    for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        ids = torch.tensor([p + c])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
        with torch.no_grad():
            ref = token_stats(hidden_states(model, ids, torch.ones_like(ids)), weight, labels, bias=bias,
                              temperature=0.7)["logps"][labels != IGNORE_INDEX]
        assert torch.allclose(ref, torch.tensor(lp), atol=1e-4), (ref, lp)


def test_seeded_determinism_and_counts(setup, engine):
    model, tok, prompts = setup
    a = sample(model, tok, prompts, engine=engine, n=4, max_new_tokens=9, temperature=1.0, seed=3, batch_size=5)
    b = sample(model, tok, prompts, engine=engine, n=4, max_new_tokens=9, temperature=1.0, seed=3, batch_size=5)
    c = sample(model, tok, prompts, engine=engine, n=4, max_new_tokens=9, temperature=1.0, seed=4, batch_size=5)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids
    assert len(a.completion_ids) == 12
    for ids, fin in zip(a.completion_ids, a.finished):
        assert 1 <= len(ids) <= 9
        assert fin == (ids[-1] == tok.eos_token_id)


def test_top_k_one_and_tiny_top_p_are_greedy(setup, engine):
    model, tok, prompts = setup
    greedy = sample(model, tok, prompts, engine=engine, n=1, max_new_tokens=8, temperature=0.0)
    top1 = sample(model, tok, prompts, engine=engine, n=1, max_new_tokens=8, temperature=1.0, top_k=1, seed=9)
    nucleus = sample(model, tok, prompts, engine=engine, n=1, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=9)
    assert top1.completion_ids == greedy.completion_ids == nucleus.completion_ids


def test_stop_strings_end_the_completion(setup, engine):
    model, tok, prompts = setup
    free = sample(model, tok, prompts, engine=engine, n=2, max_new_tokens=16, temperature=1.0, seed=2)
    # Use a character the free-running samples actually produce, then check every stopped text ends right after it.
    char = next(ch for t in free.texts for ch in t if ch.isalpha())
    stopped = sample(model, tok, prompts, engine=engine, n=2, max_new_tokens=16, temperature=1.0, seed=2,
                     stop_strings=[char])
    hits = 0
    for text, fin, ids in zip(stopped.texts, stopped.finished, stopped.completion_ids):
        if char in text:
            hits += 1
            assert fin and text.endswith(char) and text.count(char) == 1, text
        else:
            assert len(ids) == 16 or ids[-1] == tok.eos_token_id
    assert hits >= 1


def test_bad_arguments_are_rejected(setup, engine):
    model, tok, prompts = setup
    with pytest.raises(ValueError, match="top_p"):
        sample(model, tok, prompts, engine=engine, top_p=0.0)


def test_inverse_cdf_draw_matches_the_distribution():
    """The sampler's token draw: zero-probability tokens never come out, and over 40,000 seeded draws every token's
    frequency is within 4 standard errors of its probability."""
    from tether.sampling.sampler import _draw

    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([_draw(probs.expand(400, -1), gen) for _ in range(100)])
    freq = torch.bincount(draws, minlength=len(probs)).double() / len(draws)
    assert freq[probs == 0].sum() == 0
    se = (probs.double() * (1 - probs.double()) / len(draws)).sqrt()
    assert ((freq - probs.double()).abs() <= 4 * se + 1e-12).all(), freq
