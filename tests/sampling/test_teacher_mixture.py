"""Teacher-mixed sampling (``tether.sampling.mixing``): the mixture by hand, the incremental teacher against its plain
twin (a full forward pass over prompt + tokens so far) at every step while rows leave the batch, on both decode paths,
and the sampler's one-step law against the exact mixture with a fixed-logits model."""

from __future__ import annotations

import functools

import pytest
import torch

from tether import testing
from tether.sampling import sample
from tether.sampling.mixing import TeacherMixture, mixture_logprobs
from tether.testing import assert_close, tiny_model, tiny_tokenizer


def test_mixture_hand_values_and_banned_tokens():
    """q = [0.2, 0.8], p = [0.8, 0.2], α = 0.2 → p̃ = 0.2·p + 0.8·q = [0.32, 0.68]; α = 0 → q, α = 1 → p.
    A token the student's scores ban (−inf) stays banned whatever the teacher gives it."""
    q = torch.tensor([[0.2, 0.8]], dtype=torch.float64).log()
    p = torch.tensor([[0.8, 0.2]], dtype=torch.float64).log()
    assert_close(mixture_logprobs(q, p, 0.2).exp(), torch.tensor([[0.32, 0.68]], dtype=torch.float64), "p̃",
                 atol=1e-15)
    assert_close(mixture_logprobs(q, p, 0.0), q, "α=0", atol=1e-15)
    assert_close(mixture_logprobs(q, p, 1.0), p, "α=1", atol=1e-15)
    banned = torch.tensor([[0.0, float("-inf"), 1.0]])
    out = mixture_logprobs(banned, torch.tensor([[0.0, 5.0, 0.0]]), 0.5)
    assert torch.isneginf(out[0, 1]) and out[0].exp().sum() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="alpha is the teacher's share"):
        mixture_logprobs(q, p, 1.5)


class Recorder:
    """Wraps the mixture: keeps (rows, student scores in, scores out) of every call."""

    changes_logprobs = False

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def start(self, rows):
        self.inner.start(rows)

    def accept(self, tokens, rows):
        return self.inner.accept(tokens, rows)

    def __call__(self, scores, rows):
        out = self.inner(scores, rows)
        self.calls.append((rows.tolist(), scores.clone(), out.clone()))
        return out


class Finisher:
    """Ends completion r after r % 3 + 2 tokens (so rows leave the batch at different steps)."""

    changes_logprobs = False

    def start(self, rows):
        self.count = {r: 0 for r in rows.tolist()}

    def accept(self, tokens, rows):
        done = []
        for r in rows.tolist():
            self.count[r] += 1
            done.append(self.count[r] >= r % 3 + 2)
        return torch.tensor(done)

    def __call__(self, scores, rows):
        return scores


@pytest.mark.parametrize("lean", [False, True])
def test_incremental_teacher_matches_full_forward_as_rows_leave(lean):
    """Two tiny Llamas (student seed 0, teacher seed 1), prompts of 3 different lengths, n = 2, temperature 0.7,
    two batches (batch_size 4). At every step and for every live row, the processor's output equals the mixture of
    the student's scores it was given with the teacher's full-forward logits over prompt + the tokens drawn so far
    (float32; the lean decoder's logits match the model's forward to ≤ 1e-4, ``tests/sampling/test_decode.py``)."""
    tok = tiny_tokenizer()
    student = tiny_model(vocab_size=len(tok), seed=0)
    teacher = tiny_model(vocab_size=len(tok), seed=1)
    prompts = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
    mix = TeacherMixture(teacher, prompts, n=2, alpha=0.3, temperature=0.7, max_new_tokens=5 if lean else None)
    rec = Recorder(mix)
    out = sample(student, tok, prompts, n=2, max_new_tokens=5, temperature=0.7, seed=3, batch_size=4,
                 processors=[rec, Finisher()])
    assert (mix.stream.decoder is not None) == lean
    lengths = [len(c) for c in out.completion_ids]
    assert lengths == [r % 3 + 2 if r % 3 + 2 <= 5 else 5 for r in range(6)]
    step_of = {}  # completion → how many of its tokens were drawn before this call
    for rows, scores, got in rec.calls:
        prefixes = []
        for r in rows:
            t = step_of.get(r, 0)
            step_of[r] = t + 1
            prefixes.append(list(out.prompt_ids[r]) + out.completion_ids[r][:t])
        with torch.no_grad():
            z = torch.stack([teacher(input_ids=torch.tensor([x])).logits[0, -1] for x in prefixes])
        assert_close(got, mixture_logprobs(scores, z / 0.7, 0.3), f"rows {rows}", atol=1e-4 if lean else 1e-5)
    assert sorted(step_of.values()) == sorted(lengths)
    assert len({tuple(rows) for rows, _, _ in rec.calls}) > 2  # rows did leave the batch


TABLE_Q = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [-1.0, 2.0, 0.5, 1.5, -0.5, 0.0],
                        [-2.0, 0.3, 1.7, -0.2, 1.1, 0.9],
                        [-0.5, 1.2, 0.0, 2.2, 0.4, -1.0],
                        [-1.5, 0.8, 1.9, 0.1, 0.6, 1.4],
                        [-3.0, 1.0, -0.3, 0.7, 2.4, 0.2]])
TABLE_P = TABLE_Q.flip(-1) * 1.3


def test_one_step_frequencies_are_the_mixture():
    """One token from prompt [5], 8,000 draws at temperature 0.9, α = 0.4, with fixed-logits student and teacher:
    every token's frequency is within 4 standard errors of α·softmax(P[5]/T) + (1 − α)·softmax(Q[5]/T), and the
    recorded log-probs are the student's own."""
    student, teacher = testing.TableLM(TABLE_Q), testing.TableLM(TABLE_P)
    tok = functools.partial(testing.CharTokenizer, "abcdef")()
    n = 8000
    out = sample(student, tok, [[5]], n=n, max_new_tokens=1, temperature=0.9, seed=0, batch_size=n,
                 processors=[TeacherMixture(teacher, [[5]], n=n, alpha=0.4, temperature=0.9)])
    q, p = (TABLE_Q[5].double() / 0.9).softmax(-1), (TABLE_P[5].double() / 0.9).softmax(-1)
    mix = 0.4 * p + 0.6 * q
    freq = torch.bincount(torch.tensor([c[0] for c in out.completion_ids]), minlength=6).double() / n
    assert ((freq - mix).abs() <= 4 * (mix * (1 - mix) / n).sqrt()).all(), (freq, mix)
    assert (freq - q).abs().max() > 8 * (q * (1 - q) / n).sqrt().max()  # the draw is not the student's alone
    for c, lp in zip(out.completion_ids[:50], out.logprobs[:50]):
        assert lp[0] == pytest.approx(float(q[c[0]].log()), abs=1e-6)


def test_vocabulary_mismatch_is_refused():
    tok = tiny_tokenizer()
    student, teacher = tiny_model(vocab_size=len(tok), seed=0), tiny_model(vocab_size=len(tok) + 3, seed=1)
    with pytest.raises(ValueError, match="one shared vocabulary"):
        sample(student, tok, [[10, 11]], max_new_tokens=2,
               processors=[TeacherMixture(teacher, [[10, 11]], alpha=0.2)])
