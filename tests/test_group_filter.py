"""Group filters and refill rounds (``tether.group_filter``), the answer span (``tether.rollout.answer_mask``) and the
EMA update on tied weights (``tether.reference.ema_update_``), with hand-worked cases."""

from __future__ import annotations

import pytest
import torch

from tether.group_filter import (
    GroupFilter,
    SampledGroup,
    draw_groups,
    fill_slots,
    prompt_schedule,
    refill_prompts,
    round_seed,
)
from tether.reference import ema_update_
from tether.rollout import answer_mask, collate
from tether.sampling import Completions
from tether.testing import tiny_model, tiny_tokenizer


def test_difficulty_band_keeps_two_to_six_of_eight():
    """Online difficulty filtering with G = 8 and the band [0.25, 0.75]: p̂ ∈ {0, 1/8, …, 1}, so prompts with 0, 1,
    7 or 8 passing completions are dropped and 2–6 kept (both ends inclusive: 2/8 = 0.25 and 6/8 = 0.75 stay)."""
    G = 8
    rewards = torch.tensor([[1.0] * k + [0.0] * (G - k) for k in range(G + 1)]).reshape(-1)
    scored = torch.ones_like(rewards, dtype=torch.bool)
    f = GroupFilter(low=0.25, high=0.75)
    torch.testing.assert_close(f.pass_rates(rewards, scored, G), torch.arange(G + 1) / G)
    assert f.keep(rewards, scored, G).tolist() == [k in range(2, 7) for k in range(G + 1)]


def test_dapo_drop_uniform_and_pass_threshold():
    """DAPO: [1,1,1,1] and [0.5,0.5,0.5,0.5] carry no group-relative signal; [1,0,0,0] does. With a pass threshold
    of 0.5 the second group passes 4/4, the third 1/4; a group with no scored completion has no pass rate and is
    dropped by a band."""
    rewards = torch.tensor([1.0, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 1, 0, 0, 0, 0.3, 0.3, 0.3, 0.3])
    scored = torch.ones(16, dtype=torch.bool)
    scored[12:] = False
    assert GroupFilter(drop_uniform=True).keep(rewards, scored, 4).tolist() == [False, False, True, False]
    f = GroupFilter(low=0.1, high=0.9, pass_threshold=0.5)
    rates = f.pass_rates(rewards, scored, 4)
    assert rates[:3].tolist() == [1.0, 1.0, 0.25] and rates[3].isnan()
    assert f.keep(rewards, scored, 4).tolist() == [False, False, True, False]
    assert not GroupFilter().active and GroupFilter().keep(rewards, scored, 4).all()


def test_refill_prompts_are_seeded_fresh_and_deterministic():
    """A function of (seed, step, round): the same call gives the same prompts; prompts already drawn this step come
    last (only when the pool runs out); other rounds or steps give other draws."""
    a = refill_prompts(10, 3, 1, 4, seed=0, exclude=[0, 1, 2])
    assert a == refill_prompts(10, 3, 1, 4, seed=0, exclude=[0, 1, 2])
    assert len(set(a)) == 4 and not set(a) & {0, 1, 2}
    assert a != refill_prompts(10, 3, 2, 4, seed=0, exclude=[0, 1, 2])
    full = refill_prompts(4, 0, 1, 6, seed=0, exclude=[0, 1])
    assert sorted(full[:2]) == [2, 3] and len(full) == 6  # fresh first, then repeats
    assert round_seed(5, 7, 0) == 5 * 100_003 + 7 and len({round_seed(5, 7, r) for r in range(4)}) == 4


def test_fill_slots_puts_kept_groups_into_dropped_slots_in_order():
    done = Completions()
    slots = [SampledGroup(r, done, 0, (), kept) for r, kept in ((10, True), (11, False), (12, False), (13, True))]
    new = [SampledGroup(r, done, 0, (), kept) for r, kept in ((20, False), (21, True))]
    assert [g.row for g in fill_slots(slots, new)] == [10, 21, 12, 13]


def _fake_round(rewards_of_row: dict[int, list[float]], calls: list):
    """generate/reward stand-ins: each prompt row's completions carry fixed rewards (two completions per prompt)."""

    def generate(rows, round_):
        calls.append((list(rows), round_))
        done = Completions()
        for q, row in enumerate(rows):
            for k in range(2):
                done.prompt_index.append(q)
                done.prompt_ids.append([row])
                done.completion_ids.append([row, k])
                done.logprobs.append([0.0, 0.0])
                done.texts.append(f"{row}.{k}")
                done.finished.append(True)
        return done

    def reward(rows, done):
        return [rewards_of_row[int(t.split(".")[0])][int(t.split(".")[1])] for t in done.texts]

    return generate, reward


def test_draw_groups_refills_dropped_slots_and_counts():
    """Pool of 6 prompts, G = 2, DAPO filter. Round 0 draws rows [0, 1, 2]: 1 is uniform. Round 1 draws one prompt,
    which is uniform again; round 2 draws one more, which is mixed and takes slot 1. Counted: 2 dropped groups, 2
    refill rounds, none left out of the loss; the refill prompts are never ones already drawn."""
    table = {0: [1, 0], 1: [1, 1], 2: [0, 1], 3: [0, 0], 4: [0, 0], 5: [1, 0]}
    calls = []
    generate, reward = _fake_round(table, calls)
    first_refill = refill_prompts(6, 0, 1, 1, seed=0, exclude=[0, 1, 2])[0]
    table[first_refill] = [0, 0]  # make round 1's prompt uniform, whichever it is
    mixed = [r for r in range(6) if r not in (0, 1, 2, first_refill)]
    for r in mixed:
        table[r] = [1, 0]
    got = draw_groups([0, 1, 2], generate, reward, n_rows=6, step=0, seed=0, group_filter=GroupFilter(True),
                      group_size=2, max_refill_rounds=3)
    assert [c[1] for c in calls] == [0, 1, 2]  # stopped after round 2: every slot kept
    second = calls[2][0][0]
    assert got.rows == [0, second, 2] and got.kept.all()
    assert got.metrics["dropped_groups"] == 2 and got.metrics["refill_rounds"] == 2
    assert got.metrics["out_of_loss_groups"] == 0 and got.metrics["refilled_groups"] == 1
    assert got.done.prompt_index == [0, 0, 1, 1, 2, 2] and got.raw == [1, 0, 1, 0, 0, 1]
    assert not {calls[1][0][0], second} & {0, 1, 2} and calls[1][0][0] != second


def test_draw_groups_without_refill_keeps_dropped_groups_out_of_the_loss():
    """max_refill_rounds 0 is drop-without-refill: one round, the dropped group keeps its slot, marked not kept."""
    calls = []
    generate, reward = _fake_round({0: [1, 1], 1: [1, 0]}, calls)
    got = draw_groups([0, 1], generate, reward, n_rows=2, step=4, seed=1, group_filter=GroupFilter(True),
                      group_size=2, max_refill_rounds=0)
    assert len(calls) == 1 and got.rows == [0, 1] and got.kept.tolist() == [False, True]
    assert got.metrics["out_of_loss_groups"] == 1 and got.metrics["refill_rounds"] == 0
    assert got.metrics["refilled_groups"] == 0
    assert prompt_schedule(8, 1, per_step=3, seed=0) == prompt_schedule(8, 1, per_step=3, seed=0)


@pytest.mark.parametrize("text, answer", [("so x = 41 then <answer> 42 </answer> ok", "42"),
                                          ("first \\boxed{1} and finally \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
                                          ("The answer is 0.5. Done", "0.5")])
def test_answer_mask_marks_the_stated_answer(text, answer):
    """Byte-level tokenizer: one token per character, so the span is exactly the answer's characters (at their last
    occurrence); a completion without a stated answer is all answer."""
    tok = tiny_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    plain = tok("no answer here", add_special_tokens=False)["input_ids"]
    done = Completions(prompt_index=[0, 0], prompt_ids=[[5, 6], [5, 6]], completion_ids=[ids, plain],
                       logprobs=[[0.0] * len(ids), [0.0] * len(plain)], texts=["", ""], finished=[True, True])
    rollout = collate(done, pad_token_id=256)
    mask = answer_mask(tok, rollout)
    marked = rollout.labels[0][mask[0]].tolist()
    assert tok.decode(marked) == answer
    start = text.rindex(answer)
    assert mask[0].nonzero().squeeze(-1).tolist() == list(range(1 + start, 1 + start + len(answer)))
    assert torch.equal(mask[1], rollout.mask[1])


def test_ema_update_on_tied_weights_applies_the_decay_once():
    """A tied input embedding / LM head appears twice in ``state_dict()``; θ_ref ← d·θ_ref + (1−d)·θ must be applied
    to it once (a second in-place lerp would give d²)."""
    ref, pol = tiny_model(seed=0), tiny_model(seed=1)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    ema_update_(ref.state_dict(), pol.state_dict(), 0.5)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(value, 0.5 * before[name] + 0.5 * pol.state_dict()[name], rtol=0, atol=1e-7,
                                   msg=name)
