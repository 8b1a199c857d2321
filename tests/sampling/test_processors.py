"""The logits-processor hook of ``tether.sampling.sample``, tested with a mock model whose next-token logits are a
fixed table indexed by the previous token, so every step's exact distribution is known: seeding, greedy
decoding, counts, the order of the chain, which distribution the recorded log-probs are of (draw-only processors
vs constraints, worked out by hand in float64), the per-row lifecycle of a stateful processor (start, accept,
finishing a row) and the ``engine="hf"`` adapter."""

import functools

import pytest
import torch

from tether import testing
from tether.sampling import sample
from tether.sampling.processors import TopK, TopP, check_processors
from tether.testing import assert_close, tiny_model, tiny_tokenizer

V = 6
EOS = 0
# TABLE[prev] are the next-token logits after token `prev`; row 0 is never used (EOS ends a completion).
TABLE = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [-1.0, 2.0, 0.5, 1.5, -0.5, 0.0],
                      [-2.0, 0.3, 1.7, -0.2, 1.1, 0.9],
                      [-0.5, 1.2, 0.0, 2.2, 0.4, -1.0],
                      [-1.5, 0.8, 1.9, 0.1, 0.6, 1.4],
                      [-3.0, 1.0, -0.3, 0.7, 2.4, 0.2]])


TableLM = functools.partial(testing.TableLM, TABLE)  # the model of the tests: logits = TABLE[current token]
CharTokenizer = functools.partial(testing.CharTokenizer, "abcdef")

PROMPTS = [[1], [2, 3], [5], [4, 4, 1]]


def policy_logp(prev: int, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(TABLE[prev] / T), float64."""
    return (TABLE[prev].double() / (temperature or 1.0)).log_softmax(-1)


def walk(prompt, completion):
    """(previous token, token) of every generated position."""
    return list(zip([prompt[-1]] + completion[:-1], completion))


class Ban:
    """Bans ``token`` in every row (a stateless processor); ``changes_logprobs`` as given."""

    def __init__(self, token: int, changes_logprobs: bool):
        self.token, self.changes_logprobs = token, changes_logprobs
        self.rows_seen: list[list[int]] = []

    def __call__(self, scores, rows):
        self.rows_seen.append(rows.tolist())
        return scores.index_fill(-1, torch.tensor([self.token]), float("-inf"))


def test_same_seed_same_output_and_counts():
    model, tok = TableLM(), CharTokenizer()
    kwargs = dict(n=5, max_new_tokens=7, temperature=1.0, batch_size=10)
    a = sample(model, tok, PROMPTS, seed=3, **kwargs)
    b = sample(model, tok, PROMPTS, seed=3, **kwargs)
    c = sample(model, tok, PROMPTS, seed=4, **kwargs)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids
    assert a.prompt_index == [i for i in range(4) for _ in range(5)]
    for ids, fin in zip(a.completion_ids, a.finished):
        assert 1 <= len(ids) <= 7 and fin == (ids[-1] == EOS)


def test_greedy_is_the_argmax_whatever_the_seed():
    """At temperature 0 every token is argmax TABLE[previous]: 1 → 1 → …, 2 → 2, 3 → 3, 4 → 2, 5 → 4 → 2 → 2; the
    recorded log-probs are those of temperature 1."""
    runs = [sample(TableLM(), CharTokenizer(), PROMPTS, n=2, max_new_tokens=4, temperature=0.0, seed=s)
            for s in (0, 1)]
    assert runs[0].completion_ids == runs[1].completion_ids
    expected = {0: [1, 1, 1, 1], 1: [3, 3, 3, 3], 2: [4, 2, 2, 2], 3: [1, 1, 1, 1]}
    for p, i, ids, lp in zip(runs[0].prompt_ids, runs[0].prompt_index, runs[0].completion_ids, runs[0].logprobs):
        assert ids == expected[i]
        assert_close(torch.tensor(lp), torch.stack([policy_logp(a)[b] for a, b in walk(p, ids)]), atol=1e-6)


@pytest.mark.parametrize("top", [dict(top_k=2), dict(top_p=0.6)])
def test_top_k_top_p_truncate_the_draw_not_the_recorded_logprobs(top):
    """Tokens come only from the kept set (top-2, or the nucleus of mass 0.6), while the recorded log-probs are
    the policy's untruncated log softmax(TABLE[prev] / 0.8)."""
    T = 0.8
    out = sample(TableLM(), CharTokenizer(), PROMPTS, n=8, max_new_tokens=6, temperature=T, seed=1, **top)
    for p, ids, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        for (a, b), got in zip(walk(p, ids), lp):
            ref = policy_logp(a, T)
            order = ref.argsort(descending=True).tolist()
            mass_above = ref.exp()[order].cumsum(0) - ref.exp()[order]
            kept = order[:2] if "top_k" in top else [t for t, m in zip(order, mass_above.tolist()) if m <= 0.6]
            assert b in kept, (a, b, kept)
            assert abs(got - float(ref[b])) <= 1e-6


@pytest.mark.parametrize("changes_logprobs", [False, True])
def test_banned_token_is_never_drawn_and_the_logprobs_follow_the_declaration(changes_logprobs):
    """Ban token 3 (the most likely after 3). Draw-only: the recorded log-prob of b after a is the policy's,
    log p(b | a). Constraint: that of the renormalised distribution, log p(b | a) − log(1 − p(3 | a))."""
    out = sample(TableLM(), CharTokenizer(), PROMPTS, n=10, max_new_tokens=6, temperature=1.0, seed=2,
                 processors=[Ban(3, changes_logprobs)])
    drawn = [t for ids in out.completion_ids for t in ids]
    assert 3 not in drawn and len(set(drawn)) >= 4
    for p, ids, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        ref = []
        for a, b in walk(p, ids):
            logp = policy_logp(a)
            ref.append(logp[b] - (torch.log1p(-logp[3].exp()) if changes_logprobs else 0.0))
        assert_close(torch.tensor(lp), torch.stack(ref), f"changes_logprobs={changes_logprobs}", atol=1e-6)


@pytest.mark.parametrize("engine", ["tether", "hf"])
def test_one_step_frequencies_are_the_processed_distribution(engine):
    """One token from prompt [5] (tether's mock) or a tiny Llama (hf needs a real model), 6,000 draws, with token
    4 banned then top-k 3: the draw is softmax over the top 3 of the other tokens, so the frequencies of those
    are within 4 standard errors of their renormalised probabilities and the rest never appear."""
    if engine == "tether":
        model, tok, prompts = TableLM(), CharTokenizer(), [[5]]
        logits = TABLE[5].double()
    else:
        tok = tiny_tokenizer()
        model, prompts = tiny_model(vocab_size=len(tok), seed=3), [[10, 11, 12]]
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(5.0)  # top 3 after the ban: 0.48, 0.28, 0.25 of the mass
            logits = model(input_ids=torch.tensor(prompts)).logits[0, -1].double()
    banned = int(logits.argmax())
    n = 6000
    out = sample(model, tok, prompts, n=n, max_new_tokens=1, temperature=1.0, top_k=3, seed=0, batch_size=n,
                 engine=engine, processors=[Ban(banned, changes_logprobs=False)])
    kept = logits.index_fill(0, torch.tensor([banned]), float("-inf")).topk(3).indices
    probs = torch.zeros_like(logits)
    probs[kept] = logits[kept].softmax(-1)
    freq = torch.bincount(torch.tensor([ids[0] for ids in out.completion_ids]), minlength=len(logits)).double() / n
    se = (probs * (1 - probs) / n).sqrt()
    assert freq[probs == 0].sum() == 0
    assert ((freq - probs).abs() <= 4 * se + 1e-12).all(), (freq[kept], probs[kept])


def test_processors_run_before_top_k():
    """Greedy over the chain [Ban(best)] + TopK(1): the second-best token, at every step (ban first, then top-k;
    the other order would leave no token). At temperature 0 top-k is not built; at temperature 1 it is, and
    top-1 after the ban is the same sequence."""
    ban = Ban(1, changes_logprobs=False)  # after prompt [1]: best 1 (banned), then 3; after 3: best 3
    greedy = sample(TableLM(), CharTokenizer(), [[1]], max_new_tokens=3, temperature=0.0, processors=[ban])
    top1 = sample(TableLM(), CharTokenizer(), [[1]], max_new_tokens=3, temperature=1.0, top_k=1, seed=5,
                  processors=[ban])
    assert greedy.completion_ids == top1.completion_ids == [[3, 3, 3]]


class Script:
    """A per-row 'grammar': completion r must spell ``target(r)`` and ends when it has (``accept`` finishes the
    row). A constraint (``changes_logprobs=True``): one token is allowed, so every recorded log-prob is log 1 = 0.
    Records what the sampler tells it."""

    changes_logprobs = True

    def __init__(self):
        self.state: dict[int, int] = {}
        self.started: list[list[int]] = []
        self.accepted: dict[int, list[int]] = {}

    @staticmethod
    def target(r: int) -> list[int]:
        return [1 + (r + t) % 5 for t in range(1 + r % 4)]  # lengths 1-4: rows leave at different steps

    def start(self, rows):
        self.started.append(rows.tolist())
        for r in rows.tolist():
            self.state[r] = 0
            self.accepted[r] = []

    def __call__(self, scores, rows):
        allowed = torch.tensor([self.target(r)[self.state[r]] for r in rows.tolist()])
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, allowed[:, None], True)
        return scores.masked_fill(~keep, float("-inf"))

    def accept(self, tokens, rows):
        done = []
        for t, r in zip(tokens.tolist(), rows.tolist()):
            assert t == self.target(r)[self.state[r]]
            self.accepted[r].append(t)
            self.state[r] += 1
            done.append(self.state[r] == len(self.target(r)))
        return torch.tensor(done)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stateful_processor_sees_each_row_start_accept_and_finish(temperature):
    """3 prompts × n=3 in batches of 6 rows (2 prompts): ``start`` gets each batch's completion indices, every
    completion spells its target and ends there (finished), ``accept`` saw exactly its tokens, the rows passed to
    ``__call__`` are those still live, and the recorded log-probs are 0 (one allowed token)."""
    script = Script()
    draw_only = Ban(EOS, changes_logprobs=False)  # after the constraint; records the live rows of each step
    out = sample(TableLM(), CharTokenizer(), PROMPTS[:3], n=3, max_new_tokens=8, temperature=temperature, seed=1,
                 batch_size=6, processors=[script, draw_only])
    assert script.started == [[0, 1, 2, 3, 4, 5], [6, 7, 8]]
    for r, (ids, lp, fin) in enumerate(zip(out.completion_ids, out.logprobs, out.finished)):
        assert ids == Script.target(r) == script.accepted[r] and fin
        assert lp == [0.0] * len(ids)
    first_batch = [rows for rows in draw_only.rows_seen if rows[0] < 6]
    assert first_batch == [[0, 1, 2, 3, 4, 5], [1, 2, 3, 5], [2, 3], [3]]  # target lengths 1, 2, 3, 4, 1, 2


def test_chain_is_validated():
    class NoFlag:
        def __call__(self, scores, rows):
            return scores

    class HalfStateful(Ban):
        def start(self, rows):
            pass

    with pytest.raises(ValueError, match=r"processors\[0\] \(NoFlag\) must declare changes_logprobs"):
        check_processors([NoFlag()])
    with pytest.raises(ValueError, match="only one of start/accept"):
        check_processors([HalfStateful(1, False)])
    with pytest.raises(ValueError, match=r"processors\[1\] \(Ban\) changes the recorded log-probs but comes after "
                                         r"processors\[0\] \(TopK\)"):
        sample(TableLM(), CharTokenizer(), PROMPTS, processors=[TopK(2), Ban(1, True)])
    assert check_processors([Ban(1, True), TopK(2, changes_logprobs=True), TopP(0.5), Ban(2, False)]) == 2
    with pytest.raises(ValueError, match="TopK: k must be"):
        TopK(0)


def test_a_row_left_without_tokens_is_an_error():
    everything = [Ban(t, changes_logprobs=False) for t in range(V)]
    with pytest.raises(ValueError, match=r"left completion\(s\) \[0, 1\] with no allowed token"):
        sample(TableLM(), CharTokenizer(), [[1]], n=2, processors=everything)


def test_hf_engine_honours_draw_only_processors_and_rejects_the_others():
    """Through ``model.generate``: a draw-only ban holds at temperature 0 and 1 and sees the batch's completion
    indices; a constraint or a stateful processor is refused (it could not be honoured there)."""
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok), seed=5)
    prompts = [[10, 11], [12, 13, 14], [15]]
    greedy = sample(model, tok, prompts, engine="hf", max_new_tokens=5, temperature=0.0)
    common = greedy.completion_ids[0][0]
    ban = Ban(common, changes_logprobs=False)
    for temperature in (0.0, 1.0):
        out = sample(model, tok, prompts, engine="hf", n=2, max_new_tokens=5, temperature=temperature, batch_size=4,
                     seed=1, processors=[ban])
        assert all(common not in ids for ids in out.completion_ids)
    assert {tuple(rows) for rows in ban.rows_seen} == {(0, 1, 2, 3), (4, 5)}
    class Counting(Ban):  # stateful but draw-only
        def start(self, rows):
            pass

        def accept(self, tokens, rows):
            return None

    for bad, why in ((Ban(common, changes_logprobs=True), "changes the recorded log-probs"),
                     (Counting(common, changes_logprobs=False), "keeps per-row state")):
        with pytest.raises(ValueError, match=f"engine='hf'.*{why}.*use engine='tether'"):
            sample(model, tok, prompts, engine="hf", processors=[bad])
