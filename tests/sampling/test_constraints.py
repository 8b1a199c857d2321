"""Grammar constraints (``tether.sampling.constraints``) on a tiny grammar and a tiny vocabulary, by enumeration.

The model is a ``TableLM`` (next-token logits = a fixed table row of the current token) over a 7-token Hugging Face
fast tokenizer built here: ``a b c ab < >`` and ``<eos>`` (id 6). The language is the finite set
``L = {ab, abc, c, cab, b}`` written three ways (regex, choice, Lark). Everything the sampler does is then
checkable against plain Python:

* the allowed set after a prefix (the oracle: a token is allowed when the text so far followed by its text is a
  prefix of a word of L; end-of-sequence when the text is a word of L) — for every reachable prefix, every kind;
* every sampled completion is a word of L, and its recorded log-probs are those of the model's law restricted to
  the allowed tokens and renormalised (float64 oracle); the empirical frequencies match that law;
* the gap between step-wise masking and the exact conditional p(y | y ∈ L) (see ``test_gap_to_exact_conditional``);
* a constraint that allows everything is the unconstrained sampler, token for token and log-prob for log-prob;
* CRANE: no opening delimiter → unconstrained decoding; with delimiters, every segment in L, text outside free,
  per-step log-probs against a text-level oracle of the switching;
* the ``transformers`` logits processor against tether's sampler (greedy, left-padded batch), the lean decode path
  against the model's forward, the bitmask unpacking against its plain twin, malformed specs as one-line errors.
"""

import math
import re

import pytest
import torch

from tether import testing
from tether.sampling import sample
from tether.sampling.constraints import (
    Constraint,
    ConstraintProcessor,
    HFConstraintProcessor,
    ban,
    ll_tokenizer,
    unpack_bitmask,
    unpack_bitmask_plain,
)
from tether.testing import assert_close, tiny_model, tiny_tokenizer

PIECES = ["a", "b", "c", "ab", "<", ">"]
EOS = 6
TEXT = PIECES + [""]
LANGUAGE = {"ab", "abc", "c", "cab", "b"}
SPECS = {"regex": Constraint.regex("ab(c)?|c(ab)?|b"),
         "choice": Constraint.choice(sorted(LANGUAGE)),
         "lark": Constraint.lark('start: x | y | "b"\nx: "ab" "c"?\ny: "c" "ab"?')}


def pieces_tokenizer():
    """A byte-level BPE fast tokenizer whose tokens are exactly PIECES (merge a+b → ab) plus ``<eos>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(PIECES)}, merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<eos>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


TOK = pieces_tokenizer()


def table(seed: int = 0, boost: dict[int, float] | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(7, 7, generator=gen, dtype=torch.float64) * 1.5
    for token, value in (boost or {}).items():
        t[:, token] += value
    return t.float()


def decode(ids) -> str:
    return "".join(TEXT[i] for i in ids)


def allowed(text: str, language) -> set[int]:
    """The oracle: tokens whose text extends ``text`` towards a word of ``language``; EOS when it is one."""
    out = {t for t, piece in enumerate(PIECES) if any(w.startswith(text + piece) for w in language)}
    if text in language:
        out.add(EOS)
    return out


def tokenizations(language, prefix=()):
    """Every token sequence (ending in EOS) that spells a word of ``language``."""
    for t in sorted(allowed(decode(prefix), language)):
        if t == EOS:
            yield list(prefix) + [EOS]
        else:
            yield from tokenizations(language, prefix + (t,))


def step_laws(tab: torch.Tensor, seq: list[int], language) -> tuple[float, float, list[float]]:
    """(log p(y), log q(y), [log q(y_t | y_<t)]) of one completion after the prompt [EOS], float64; q is the
    model's law restricted to the allowed tokens and renormalised."""
    log_p = log_q = 0.0
    steps = []
    for prev, tok, t in zip([EOS] + seq[:-1], seq, range(len(seq))):
        lp = tab[prev].double().log_softmax(-1)
        ok = torch.tensor(sorted(allowed(decode(seq[:t]), language)))
        step = float(lp[tok] - lp[ok].logsumexp(-1))
        log_p, log_q = log_p + float(lp[tok]), log_q + step
        steps.append(step)
    return log_p, log_q, steps


def mask_of(proc: ConstraintProcessor, row: int = 0) -> set[int]:
    out = proc(torch.zeros(1, len(TOK)), torch.tensor([row]))
    return set(torch.isfinite(out[0]).nonzero().flatten().tolist())


def feed(proc: ConstraintProcessor, tokens, row: int = 0) -> None:
    for t in tokens:
        proc.accept(torch.tensor([t]), torch.tensor([row]))


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_mask_equals_oracle_at_every_reachable_prefix(kind):
    """After every prefix of every tokenization of every word of L (non-canonical ones such as a·b for "ab"
    included), the processor allows exactly the oracle's tokens."""
    proc = ConstraintProcessor(SPECS[kind], TOK)
    seen = 0
    for seq in tokenizations(LANGUAGE):
        for t in range(len(seq)):
            proc.start(torch.tensor([0]))
            feed(proc, seq[:t])
            assert mask_of(proc) == allowed(decode(seq[:t]), LANGUAGE), (kind, seq[:t])
            seen += 1
    assert seen == sum(len(s) for s in tokenizations(LANGUAGE))


def test_samples_in_language_with_the_restricted_law():
    """4000 completions in one batch: each is a word of L, finished; each recorded log-prob is log q(y_t | y_<t)
    (fp32 sampler vs float64 oracle, 1e-5); each sequence's frequency is within 5 binomial standard deviations of
    q(y). The oracle's q sums to 1 over the tokenizations of L (checked)."""
    tab, N = table(0), 4000
    proc = ConstraintProcessor(SPECS["regex"], TOK)
    out = sample(testing.TableLM(tab), TOK, [[EOS]], n=N, max_new_tokens=6, temperature=1.0, seed=1, batch_size=N,
                 processors=[proc])
    q = {tuple(s): math.exp(step_laws(tab, s, LANGUAGE)[1]) for s in tokenizations(LANGUAGE)}
    assert abs(sum(q.values()) - 1) < 1e-12
    counts: dict[tuple, int] = {}
    for ids, logps, text, finished in zip(out.completion_ids, out.logprobs, out.texts, out.finished):
        assert finished and text in LANGUAGE, (ids, text)
        assert_close(torch.tensor(logps), torch.tensor(step_laws(tab, ids, LANGUAGE)[2]), f"logps {ids}")
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    for seq, qy in q.items():
        f = counts.get(seq, 0) / N
        assert abs(f - qy) <= 5 * math.sqrt(qy * (1 - qy) / N) + 1e-9, (seq, f, qy)


def test_gap_to_exact_conditional():
    """Step-wise masking samples q(y) = p(y) / Π_t m_t(y_<t) (m_t the model's mass on the allowed tokens at step
    t); the exact conditional is p(y | L) = p(y) / Z with Z = Σ_{y ∈ L} p(y) (over the tokenizations of L, each
    ending in EOS). So q(y) / p(y | L) = Z / Π_t m_t, checked for every y, and
    KL(q ‖ p(·|L)) = E_q[log Z − Σ_t log m_t] ≥ 0, computed both ways.

    For this table (seed 0), by enumeration of the 8 tokenizations of L: Z = 0.010665, KL(q ‖ p(·|L)) = 1.2932
    nats, total variation 0.6476. The ratio q/p(·|L) runs from 0.070 (y = c·EOS: 61% of the conditional mass, but
    after "c" the model puts only 15% of its mass on the allowed continuations, so q gives it 4%) to 178 (y = c·a·b:
    after "c" then "a" almost all of the model's mass is lost, yet the mask forces the path through). Step-wise
    masking is far from the conditional when the mass lost along a path differs between paths. The numbers are
    pinned (to 1e-4) so a change in the sampler's law shows up."""
    tab = table(0)
    seqs = list(tokenizations(LANGUAGE))
    laws = [step_laws(tab, s, LANGUAGE) for s in seqs]
    log_p = torch.tensor([lp for lp, _, _ in laws], dtype=torch.float64)
    log_q = torch.tensor([lq for _, lq, _ in laws], dtype=torch.float64)
    log_Z = log_p.logsumexp(0)
    log_cond = log_p - log_Z
    log_m = log_p - log_q  # Σ_t log m_t of each sequence
    assert_close(log_q - log_cond, log_Z - log_m, "q / p(.|L) = Z / prod m", atol=1e-12)
    kl = float((log_q.exp() * (log_q - log_cond)).sum())
    kl_identity = float((log_q.exp() * (log_Z - log_m)).sum())
    tv = 0.5 * float((log_q.exp() - log_cond.exp()).abs().sum())
    assert abs(kl - kl_identity) < 1e-12
    print(f"Z = {log_Z.exp():.5f}, KL(q || p(.|L)) = {kl:.4f}, TV = {tv:.4f}, "
          f"max q/p(.|L) = {float((log_q - log_cond).exp().max()):.3f}")
    ratio = (log_q - log_cond).exp()
    assert abs(float(log_Z.exp()) - 0.010665) < 1e-6 and abs(kl - 1.2932) < 1e-4 and abs(tv - 0.6476) < 1e-4
    assert abs(float(ratio.min()) - 0.0696) < 1e-4 and abs(float(ratio.max()) - 178.27) < 1e-2


def test_allow_everything_is_unconstrained():
    """A regex every token sequence satisfies (and that allows EOS everywhere) bans nothing: the same seed gives
    the same tokens and the same log-probs, bit for bit."""
    model = testing.TableLM(table(3))
    kwargs = dict(n=64, max_new_tokens=8, temperature=0.9, seed=5, batch_size=64)
    free = sample(model, TOK, [[EOS], [2, 4]], **kwargs)
    everything = ConstraintProcessor(Constraint.regex("[abc<>]*"), TOK)
    held = sample(model, TOK, [[EOS], [2, 4]], processors=[everything], **kwargs)
    assert held.completion_ids == free.completion_ids
    assert held.logprobs == free.logprobs


def test_crane_without_delimiter_is_unconstrained():
    """The model never writes "<" (logit −∞ in every row), so no segment opens: CRANE decoding is unconstrained
    decoding, token for token and log-prob for log-prob, for the same seed."""
    tab = table(4)
    tab[:, 4] = float("-inf")
    model = testing.TableLM(tab)
    kwargs = dict(n=64, max_new_tokens=10, temperature=1.0, seed=2, batch_size=64)
    free = sample(model, TOK, [[EOS], [1]], **kwargs)
    crane = ConstraintProcessor(SPECS["regex"], TOK, delimiters=("<<", ">>"))
    held = sample(model, TOK, [[EOS], [1]], processors=[crane], **kwargs)
    assert held.completion_ids == free.completion_ids
    assert held.logprobs == free.logprobs


def crane_oracle(tab: torch.Tensor, seq: list[int], prompt_last: int, open_: str, close: str) -> list[float]:
    """Per-step log q of a CRANE completion from the text alone: free (the model's law) until the text since the
    last segment contains ``open_``; then restricted to tokens extending the segment towards a word of
    L·close; after ``close``, free again. (No token here carries text past ``open_``: the tokens are ≤ 2 chars
    and "<" is the only piece with "<".)"""
    words = {w + close for w in LANGUAGE}
    out, free_text, segment = [], "", None
    for prev, tok in zip([prompt_last] + seq[:-1], seq):
        lp = tab[prev].double().log_softmax(-1)
        if segment is None:
            out.append(float(lp[tok]))
            free_text += TEXT[tok]
            if open_ in free_text:
                segment, free_text = "", ""
        else:
            ok = torch.tensor(sorted(allowed(segment, words) - {EOS}))
            assert tok in ok.tolist(), (seq, segment, tok)
            out.append(float(lp[tok] - lp[ok].logsumexp(-1)))
            segment += TEXT[tok]
            if segment in words:
                segment = None
    return out


def test_crane_segments_in_language_free_text_outside():
    """Delimiters "<<" / ">>" (each split over two "<" / ">" tokens), 1000 rows in one batch, each switching on its
    own: every closed segment is a word of L, an unclosed one (cut at max_new_tokens) is a prefix of a word of
    L·">>", and every step's recorded log-prob matches the text-level oracle of the switching (free steps: the
    model's law; segment steps: restricted and renormalised). Some rows open several segments (counted)."""
    tab = table(5, boost={4: 2.0})
    N = 1000
    crane = ConstraintProcessor(SPECS["regex"], TOK, delimiters=("<<", ">>"))
    out = sample(testing.TableLM(tab), TOK, [[EOS]], n=N, max_new_tokens=16, temperature=1.0, seed=7, batch_size=N,
                 processors=[crane])
    closed = opened_twice = 0
    for ids, logps, text, finished in zip(out.completion_ids, out.logprobs, out.texts, out.finished):
        assert_close(torch.tensor(logps), torch.tensor(crane_oracle(tab, ids, EOS, "<<", ">>")), f"logps {ids}")
        parts = text.split("<<")
        for k, part in enumerate(parts[1:]):
            if ">>" in part:
                assert part[:part.index(">>")] in LANGUAGE, text
                closed += 1
            else:  # still inside the segment: the completion must have been cut there
                assert k == len(parts) - 2 and not finished, text
                assert any((w + ">>").startswith(part) for w in LANGUAGE), text
        opened_twice += text.count("<<") >= 2
    print(f"CRANE: {closed} closed segments, {opened_twice} rows with ≥ 2 segments, of {N} rows")
    assert closed >= N // 4 and opened_twice >= 10
    assert crane.rejected_openings == 0


def test_bitmask_unpack_matches_plain_twin():
    """Random words (sign bit included), a vocabulary that ends inside a word and one past the mask's end."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.randint(-2**31, 2**31 - 1, (5, 7), generator=gen, dtype=torch.int64).to(torch.int32)
    for vocab in (1, 200, 224, 250):
        fast, plain = unpack_bitmask(mask, vocab), unpack_bitmask_plain(mask, vocab)
        assert torch.equal(fast, plain)
    word, bit = 3, 31
    assert bool(unpack_bitmask_plain(mask, 224)[0, 32 * word + bit]) == bool((int(mask[0, word]) >> bit) & 1)
    assert not unpack_bitmask(mask, 250)[:, 224:].any()


def test_ban_equals_masked_fill():
    """Bit for bit, with -inf and large scores already present, in float32, float16, bfloat16 and float64 (where
    3e38·3e38 = 9e76 is finite: the "infinity" must come from the dtype's own largest value)."""
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 101, generator=gen) * 1e4
    scores[0, 5] = float("-inf")
    allowed = torch.rand(3, 101, generator=gen) < 0.5
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        s = scores.to(dtype)
        assert torch.equal(ban(s, allowed), s.masked_fill(~allowed, float("-inf"))), dtype


@pytest.mark.parametrize("lean", [False, True])
def test_tiny_llama_sampler_constrained(lean):
    """A random tiny Llama with the byte-level tiny tokenizer, a batch of two prompts × 8, lean decode path on and
    off: every finished completion full-matches the regex; each recorded log-prob is the teacher-forced model's
    log-softmax restricted to the tokens the grammar allowed at that step, renormalised (replayed on a fresh
    matcher); the two decode paths draw the same tokens (their logits agree to ~1e-6)."""
    model, tok = tiny_model(), tiny_tokenizer()
    pattern = "(ab|c)+x"
    prompts = [tok("hello", add_special_tokens=False)["input_ids"], tok("hi", add_special_tokens=False)["input_ids"]]
    proc = ConstraintProcessor(Constraint.regex(pattern), tok)
    out = sample(model, tok, prompts, n=8, max_new_tokens=12, temperature=1.0, seed=4, batch_size=16,
                 processors=[proc], lean_decode=lean)
    other = sample(model, tok, prompts, n=8, max_new_tokens=12, temperature=1.0, seed=4, batch_size=16,
                   processors=[ConstraintProcessor(Constraint.regex(pattern), tok)], lean_decode=not lean)
    assert out.completion_ids == other.completion_ids
    assert any(out.finished)
    replay = ConstraintProcessor(Constraint.regex(pattern), tok)
    for r, (p, ids, logps, text, finished) in enumerate(zip(out.prompt_ids, out.completion_ids, out.logprobs,
                                                           out.texts, out.finished)):
        if finished:
            assert re.fullmatch(pattern, text), text
        with torch.no_grad():
            logits = model(torch.tensor([p + ids])).logits[0, len(p) - 1:-1].double()
        replay.start(torch.tensor([r]))
        want = []
        for t, token in enumerate(ids):
            ok = torch.isfinite(replay(torch.zeros(1, logits.shape[-1]), torch.tensor([r]))[0])
            lp = logits[t].masked_fill(~ok, float("-inf")).log_softmax(-1)
            want.append(float(lp[token]))
            replay.accept(torch.tensor([token]), torch.tensor([r]))
        assert_close(torch.tensor(logps), torch.tensor(want), f"row {r}", atol=1e-4)


def test_hf_processor_matches_tether_greedy():
    """``model.generate`` with :class:`HFConstraintProcessor` and tether's sampler with the same constraint, both
    greedy, on a left-padded batch of two prompts of different lengths: the same completions (each up to and
    including its end-of-sequence token), and they full-match the regex. The same processor object then serves a
    second ``generate`` call (fresh matchers)."""
    model, tok = tiny_model(), tiny_tokenizer()
    pattern = "[a-d]{2,5}(x|yz)"
    prompts = [tok(text, add_special_tokens=False)["input_ids"] for text in ("hello there", "hi")]
    ours = sample(model, tok, prompts, n=1, max_new_tokens=10, temperature=0.0,
                  processors=[ConstraintProcessor(Constraint.regex(pattern), tok)])
    hf = HFConstraintProcessor(Constraint.regex(pattern), tok)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    for _ in range(2):
        gen = model.generate(input_ids=ids, attention_mask=mask, logits_processor=[hf], do_sample=False,
                             max_new_tokens=10, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             temperature=None, top_p=None, top_k=None)[:, width:].tolist()
        for g, want, text in zip(gen, ours.completion_ids, ours.texts):
            assert g[:len(want)] == want
            assert re.fullmatch(pattern, text), text


def test_malformed_specs_are_one_line_errors():
    for text, words in (("regex:(ab", "unclosed group"), ("lark:start: foo", "unknown name"),
                        ('json_schema:{"type": "objectx"}', "objectx"), ("choice:[1]", "list of strings"),
                        ("json_schema:{nope", "not valid JSON"), ("yaml:a", "kind:spec"),
                        ("lark:@/nonexistent.lark", "not found")):
        with pytest.raises(ValueError) as err:
            Constraint.parse(text, field="constraint")
        message = str(err.value)
        assert message.startswith("constraint:") and words in message and "\n" not in message, message


def test_tokenizer_setup_is_cached():
    assert ll_tokenizer(TOK) is ll_tokenizer(TOK)
    assert ll_tokenizer(pieces_tokenizer()) is not ll_tokenizer(TOK)
