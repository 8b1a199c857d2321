"""Regression oracle for ``tether.sampling.sample``: token ids and log-probs recorded from the sampler as it was
before the logits-processor hook (commit e142ae9, top-k/top-p inlined in the loop), replayed now.

Each case in ``CASES`` is one ``sample()`` call on a tiny Llama (4 prompts of different lengths, several batches
each: ``batch_size // n`` prompts per batch, each batch drawing from its own RNG stream), through tether's loop
(lean decode steps, and the model's own forward with ``lean_decode=False``) and through ``model.generate``
(``engine="hf"``). The test asserts the same prompt indices, completion ids and ``finished`` flags, and log-probs
within 1e-5.

Why this holds on another x86-64 CPU. Other BLAS kernels round fp32 differently; on this model the fp32 logits
differ from float64 ones by ≤ 8.4e-6 and the normalised cumulative probabilities by ≤ 4.9e-7 (measured on the
recorded completions, teacher-forced). A token can flip only at a decision that close to a tie, so ``record()``
measures each decision of each case and stores the smallest margin in ``sampler_golden.json``; every one is ≥ 10×
that noise (``test_golden_cases_exercise_what_they_claim``):

* greedy: largest minus second-largest logit (teacher-forced), smallest 9.1e-3;
* top-k: k-th minus (k+1)-th scaled logit, smallest 1.7e-4;
* top-p: distance between ``top_p`` and the probability mass above each token, smallest 2.6e-5;
* inverse-CDF draws (tether's loop): distance of the uniform draw from the edges of the chosen token's interval,
  as a fraction of the total mass, smallest 1.1e-5.

``model.generate``'s multinomial draws cannot be measured this way; instead every case is also replayed with the
model in float64 (``test_recorded_tokens_are_those_of_exact_arithmetic``) and gives the recorded tokens, so they
follow from the model's exact logits rather than this CPU's rounding. Log-probs: the recorded fp32 values are
within 4e-6 of float64 ones, so another CPU's are within 1e-5 of the record. (The refactored sampler reproduced
them exactly, difference 0, on the recording machine.) The hf cases' draws also follow torch's ``multinomial``
and transformers' seeding: after an upgrade of either, check them against ``test_sampler.py`` (greedy =
``generate``, log-probs = teacher forcing) and re-record.

Re-record (only when a change is *meant* to alter what is sampled): ``python tests/sampling/test_sampler_golden.py``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

from tether.sampling import render_prompts, sample
from tether.testing import assert_close, tiny_tokenizer

GOLDEN = Path(__file__).with_name("sampler_golden.json")
PROMPTS = ["hi", "a much longer prompt here", [{"role": "user", "content": "x"}], "tell me more"]

CASES: dict[str, dict] = {
    "tether_greedy": dict(engine="tether", n=2, max_new_tokens=12, temperature=0.0, batch_size=4),
    "tether_t1": dict(engine="tether", n=3, max_new_tokens=10, temperature=1.0, seed=1, batch_size=5),
    "tether_t07_topk": dict(engine="tether", n=2, max_new_tokens=10, temperature=0.7, top_k=20, seed=2, batch_size=3),
    "tether_t1_topp": dict(engine="tether", n=2, max_new_tokens=10, temperature=1.0, top_p=0.8, seed=11, batch_size=4),
    "tether_topk_topp": dict(engine="tether", n=3, max_new_tokens=8, temperature=0.7, top_k=40, top_p=0.9, seed=4,
                             batch_size=6),
    "tether_stop": dict(engine="tether", n=3, max_new_tokens=14, temperature=1.0, seed=10, batch_size=9,
                        stop_strings=("M", "rr", "@")),
    "tether_plain_greedy": dict(engine="tether", n=2, max_new_tokens=12, temperature=0.0, batch_size=4,
                                lean_decode=False),
    "tether_plain_stop_topk": dict(engine="tether", n=3, max_new_tokens=14, temperature=0.7, top_k=30, seed=5,
                                   batch_size=9, stop_strings=("M", "rr", "@"), lean_decode=False),
    "hf_greedy": dict(engine="hf", n=2, max_new_tokens=12, temperature=0.0, batch_size=4),
    "hf_t1": dict(engine="hf", n=3, max_new_tokens=10, temperature=1.0, seed=1, batch_size=5),
    "hf_t07_topk": dict(engine="hf", n=2, max_new_tokens=10, temperature=0.7, top_k=20, seed=2, batch_size=3),
    "hf_t1_topp_stop": dict(engine="hf", n=2, max_new_tokens=10, temperature=1.0, top_p=0.8, seed=5, batch_size=4,
                            stop_strings=("M", "rr", "@")),
}


def golden_model():
    """A tiny Llama of its own (the record must never change with ``tether.testing``'s defaults): untied output
    layer, initialiser scale 0.2 so the logits are of order one (the distributions are not near-uniform, top-p cuts a
    real tail), and the end-of-sequence row of the output layer ×2 so some samples end there. (``tiny_model``'s tied
    embeddings make greedy decoding repeat the prompt's last token forever, a weak oracle.) Uneven sizes are left to
    ``test_decode.py``; this model qualifies for the lean decode steps."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= 2.0
    return model, tok, render_prompts(tok, PROMPTS)


def run_case(model, tok, prompts, spec: dict):
    return sample(model, tok, prompts, **spec)


@pytest.fixture(scope="module")
def setup():
    return golden_model()


@pytest.fixture(scope="module")
def golden():
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", list(CASES))
def test_sample_matches_recorded_tokens_and_logprobs(name, setup, golden):
    model, tok, prompts = setup
    want = golden["cases"][name]
    assert want["spec"] == {k: list(v) if isinstance(v, tuple) else v for k, v in CASES[name].items()}
    got = run_case(model, tok, prompts, CASES[name])
    assert got.prompt_index == want["prompt_index"]
    for k, (ids, ref) in enumerate(zip(got.completion_ids, want["completion_ids"])):
        first = next((t for t, (a, b) in enumerate(zip(ids, ref)) if a != b), min(len(ids), len(ref)))
        assert ids == ref, f"{name}, completion {k}: first difference at token {first}: {ids} vs {ref}"
    assert got.finished == want["finished"]
    for k, (lp, ref) in enumerate(zip(got.logprobs, want["logprobs"])):
        assert_close(torch.tensor(lp), torch.tensor(ref), f"{name}, completion {k}, log-probs", atol=1e-5)


def test_golden_cases_exercise_what_they_claim(golden):
    """The record covers rows that stop early and rows that run to the length cap, several batches and n > 1, and
    every decision in it is at least 10× the float noise away from a tie (see the module docstring)."""
    stop = golden["cases"]["tether_stop"]
    assert any(stop["finished"]) and not all(stop["finished"])
    assert all(len(golden["cases"][c]["completion_ids"]) == len(PROMPTS) * CASES[c]["n"] for c in CASES)
    floor = dict(greedy=1e-4, top_k=1e-4, top_p=1e-5, draw=1e-5)  # logit units, probability units
    for name, case in golden["cases"].items():
        for kind, margin in case["margins"].items():
            assert margin is None or margin >= floor[kind], (name, kind, margin)


@pytest.mark.parametrize("name", list(CASES))
def test_recorded_tokens_are_those_of_exact_arithmetic(name, setup, golden):
    """The same calls with the model in float64 (logits rounded once to fp32) give the recorded tokens: they follow
    from the model's exact logits, not from this CPU's fp32 rounding. The log-probs then differ from the record by
    the fp32 error of the recording, ≤ 4e-6 measured."""
    model, tok, prompts = setup
    want = golden["cases"][name]
    got = run_case(copy.deepcopy(model).double(), tok, prompts, CASES[name])
    assert got.completion_ids == want["completion_ids"]
    for lp, ref in zip(got.logprobs, want["logprobs"]):
        assert_close(torch.tensor(lp), torch.tensor(ref), name, atol=1e-5)


# --------------------------------------------------------------------------------------------------- recording

def _teacher_forced_margins(model, prompts, spec, out) -> dict:
    """Smallest margin of each decision kind over every generated token (see the module docstring)."""
    temperature, top_k, top_p = spec["temperature"], spec.get("top_k", 0), spec.get("top_p", 1.0)
    greedy = topk = topp = float("inf")
    for i, c in zip(out.prompt_index, out.completion_ids):
        p = prompts[i]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:len(p) + len(c) - 1].double()
        if temperature == 0:
            top2 = logits.topk(2, dim=-1).values
            greedy = min(greedy, float((top2[:, 0] - top2[:, 1]).min()))
            continue
        scaled = logits / temperature
        if top_k:
            vals = scaled.topk(top_k + 1, dim=-1).values
            topk = min(topk, float((vals[:, -2] - vals[:, -1]).min()))
            scaled = scaled.masked_fill(scaled < vals[:, -2:-1], float("-inf"))
        if top_p < 1:
            probs = scaled.softmax(-1).sort(descending=True, dim=-1).values
            above = probs.cumsum(-1) - probs
            topp = min(topp, float((above - top_p).abs().min()))
    return {k: (None if v == float("inf") else v) for k, v in dict(greedy=greedy, top_k=topk, top_p=topp).items()}


def record() -> None:
    """Run every case and write ``sampler_golden.json`` (with the margins of its decisions)."""
    import tether.sampling.sampler as sampler

    model, tok, prompts = golden_model()
    draw = sampler._draw
    draw_margin = [float("inf")]

    def measured_draw(probs, gen):  # the same draw, also measuring how far u is from the chosen interval's edges
        state = gen.get_state()
        tokens = draw(probs, gen)
        after = gen.get_state()
        gen.set_state(state)
        cdf = probs.double().cumsum(-1)
        u = torch.rand(probs.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
        gen.set_state(after)
        hi = cdf.gather(-1, tokens[:, None])
        lo = hi - probs.double().gather(-1, tokens[:, None])
        draw_margin[0] = min(draw_margin[0], float((torch.minimum(u - lo, hi - u) / cdf[:, -1:]).min()))
        return tokens

    cases = {}
    sampler._draw = measured_draw
    try:
        for name, spec in CASES.items():
            draw_margin[0] = float("inf")
            out = run_case(model, tok, prompts, spec)
            margins = _teacher_forced_margins(model, prompts, spec, out)
            margins["draw"] = None if draw_margin[0] == float("inf") else draw_margin[0]
            cases[name] = dict(spec={k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()},
                               prompt_index=out.prompt_index, completion_ids=out.completion_ids,
                               finished=out.finished, logprobs=out.logprobs, margins=margins)
            print(name, margins, sum(out.finished), "/", len(out.finished), "finished", file=sys.stderr)
    finally:
        sampler._draw = draw
    import transformers
    meta = dict(torch=torch.__version__, transformers=transformers.__version__,
                note="written by tests/sampling/test_sampler_golden.py::record")
    GOLDEN.write_text(json.dumps(dict(meta=meta, cases=cases), indent=1) + "\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    record()
