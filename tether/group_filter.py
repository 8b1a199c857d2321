"""Which prompts' groups a step of online RL trains on: the prompt schedule, group filters, and refill rounds.

A step draws ``prompts_per_step`` prompts (:func:`prompt_schedule`) and samples G completions of each. A
:class:`GroupFilter` then decides which groups carry a learning signal:

* **DAPO's dynamic sampling** (Yu et al. 2025, arXiv:2503.14476, §3.2, Eq. 11's constraint 0 < #correct < G): drop
  groups whose rewards are all equal (``tether.losses.policy.dapo_dynamic_sampling_mask``);
* **online difficulty filtering** (Bae et al. 2025, arXiv:2504.03380): drop groups whose pass rate p̂ = #passing/G
  falls outside [low, high] (``tether.losses.policy.difficulty_filter``); a completion passes when its reward is at
  least ``pass_threshold``.

The batch has one slot per prompt. Round 0 fills every slot; each refill round r = 1, 2, … (at most
``max_refill_rounds``) draws as many new prompts as there are slots holding a dropped group
(:func:`refill_prompts`), samples them, and puts each kept new group into the next such slot, in order. After the last
round a slot still holding a dropped group keeps it, out of the loss (counted) — the batch keeps its shape, and with
no refill rounds this is exactly "drop without refill". Prompts and sampling seeds of every round are functions of
(seed, step, round), never of earlier steps' refills, so a resumed run redraws the same batch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.losses.policy import dapo_dynamic_sampling_mask, difficulty_filter
from tether.rollout import fill_no_opinion
from tether.sampling import Completions

__all__ = ["GroupDraw", "GroupFilter", "SampledGroup", "draw_groups", "fill_slots", "merge_slots", "prompt_schedule",
           "refill_prompts", "round_seed", "sampled_groups", "take_groups"]


def prompt_schedule(n_rows: int, step: int, *, per_step: int, seed: int) -> list[int]:
    """Row indices of step ``step``'s prompts: consecutive slices of seeded permutations, epoch after epoch."""
    out: list[int] = []
    position = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(position, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist()
        take = perm[offset:offset + per_step - len(out)]
        out += take
        position += len(take)
    return out


def refill_prompts(n_rows: int, step: int, round_: int, count: int, *, seed: int, exclude: Sequence[int]) -> list[int]:
    """``count`` row indices for refill round ``round_`` ≥ 1 of step ``step``: a permutation seeded by (seed, step,
    round), prompts already drawn this step (``exclude``) first skipped — repeated only when the pool runs out."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + round_)
    perm = torch.randperm(n_rows, generator=g).tolist()
    used = set(exclude)
    fresh = [i for i in perm if i not in used]
    return (fresh + perm * (1 + count // n_rows))[:count]


def round_seed(seed: int, step: int, round_: int) -> int:
    """The sampling seed of round ``round_`` of step ``step``; round 0 keeps the unfiltered recipe's seed."""
    base = seed * 100_003 + step
    return base if round_ == 0 else base + 1_000_000_007 * round_


@dataclass(frozen=True)
class GroupFilter:
    """Which groups carry a learning signal (module docstring).

    Fields:
        drop_uniform: DAPO's dynamic sampling — drop groups whose rewards are all equal.
        low, high: the pass-rate band [low, high] (both inclusive); (0, 1) = no band.
        pass_threshold: a completion passes when its reward is ≥ this.
    """

    drop_uniform: bool = False
    low: float = 0.0
    high: float = 1.0
    pass_threshold: float = 1.0

    @property
    def active(self) -> bool:
        return self.drop_uniform or self.low > 0.0 or self.high < 1.0

    def pass_rates(self, rewards: Tensor, scored: Tensor, group_size: int) -> Tensor:
        """(Q,) the share of each group's scored completions that pass (NaN for a group with none scored)."""
        passing = ((rewards >= self.pass_threshold) & scored).view(-1, group_size).sum(-1)
        return passing / scored.view(-1, group_size).sum(-1)

    def keep(self, rewards: Tensor, scored: Tensor, group_size: int) -> Tensor:
        """(Q,) bool: the groups to train on, from (B,) rewards (no-opinion rows filled) and the (B,) scored mask.
        A group with no scored completion is dropped by the band (it has no pass rate)."""
        keep = torch.ones(rewards.shape[0] // group_size, dtype=torch.bool)
        if self.drop_uniform and group_size > 1:
            keep &= dapo_dynamic_sampling_mask(rewards, group_size=group_size)
        if self.low > 0.0 or self.high < 1.0:
            rates = self.pass_rates(rewards, scored, group_size)
            keep &= difficulty_filter(rates, self.low, self.high) & ~rates.isnan()
        return keep


def take_groups(picks: Sequence[tuple[Completions, int]], group_size: int) -> Completions:
    """One :class:`Completions` of the groups ``picks`` = [(completions of a round, group index in it), …], in that
    order; ``prompt_index`` becomes the position in ``picks``."""
    rows = [(done, r) for done, q in picks for r in range(q * group_size, (q + 1) * group_size)]
    fields = {}
    for f in dataclasses.fields(Completions):  # per-completion lists, or a tensor (kl_cost) that may be None
        values = [getattr(done, f.name) for done, _ in rows]
        if any(v is None for v in values):
            fields[f.name] = None
        elif isinstance(values[0], torch.Tensor):
            fields[f.name] = torch.stack([v[r] for v, (_, r) in zip(values, rows)]) if rows else values[0][:0]
        else:
            fields[f.name] = [v[r] for v, (_, r) in zip(values, rows)]
    fields["prompt_index"] = [slot for slot in range(len(picks)) for _ in range(group_size)]
    return Completions(**fields)


@dataclass(frozen=True)
class SampledGroup:
    """The G completions of one prompt from one sampling round, with their rewards and the filter's verdict."""

    row: int
    """Index of the prompt in the training pool."""
    completions: Completions
    """The round's completions (all of its groups)."""
    index: int
    """Which group of ``completions`` this is."""
    raw: tuple[float | None, ...]
    """(G,) rewards, None = no opinion."""
    kept: bool
    """The filter keeps it (it carries a learning signal)."""


def sampled_groups(rows: Sequence[int], done: Completions, raw: Sequence[float | None], keep: Tensor,
                   group_size: int) -> list[SampledGroup]:
    """One :class:`SampledGroup` per prompt of a round (``rows`` in sampling order, ``keep`` (Q,) from
    :meth:`GroupFilter.keep`)."""
    return [SampledGroup(row, done, q, tuple(raw[q * group_size:(q + 1) * group_size]), bool(keep[q]))
            for q, row in enumerate(rows)]


def fill_slots(slots: Sequence[SampledGroup], new: Sequence[SampledGroup]) -> list[SampledGroup]:
    """The batch after a refill round: the kept groups of ``new`` take the slots holding dropped groups, in order
    (a slot keeps its dropped group when no kept group is left for it)."""
    fresh = iter([g for g in new if g.kept])
    return [g if g.kept else next(fresh, g) for g in slots]


def merge_slots(slots: Sequence[SampledGroup], group_size: int) -> tuple[Completions, list[float | None], Tensor]:
    """The batch of the slots: its completions (``prompt_index`` = slot), its rewards (B,), and the (Q,) bool mask
    of slots whose group is kept."""
    done = take_groups([(g.completions, g.index) for g in slots], group_size)
    return done, [r for g in slots for r in g.raw], torch.tensor([g.kept for g in slots], dtype=torch.bool)


@dataclass(frozen=True)
class GroupDraw:
    """A step's groups after the filter and its refill rounds (Q = prompts per step, B = Q·G)."""

    done: Completions
    """The B completions, grouped by slot (``prompt_index`` = slot)."""
    raw: list[float | None]
    """(B,) rewards, None = no opinion."""
    kept: Tensor
    """(Q,) bool: the slot's group passed the filter (all True without a filter)."""
    rows: list[int]
    """(Q,) the training-pool index of each slot's prompt."""
    metrics: dict[str, float]
    """``gen_s``, ``reward_s`` and, with an active filter, ``refill_rounds``, ``dropped_groups`` (over all rounds),
    ``refilled_groups`` (slots a refill round filled) and ``out_of_loss_groups`` (dropped groups left in the batch)."""


def draw_groups(first: list[int], generate: Callable[[list[int], int], Completions],
                reward: Callable[[list[int], Completions], list[float | None]], *, n_rows: int, step: int, seed: int,
                group_filter: GroupFilter, group_size: int, max_refill_rounds: int) -> GroupDraw:
    """Sample and reward the prompts ``first`` (round 0), then refill the slots of dropped groups for up to
    ``max_refill_rounds`` rounds (module docstring). ``generate(rows, round)`` samples G completions of each prompt
    row (seeded by :func:`round_seed`); ``reward(rows, completions)`` scores them. Stops as soon as every slot holds
    a kept group."""
    chosen, used, slots, dropped, refilled = first, list(first), [], 0, 0
    times = {"gen_s": 0.0, "reward_s": 0.0}
    for round_ in range(max_refill_rounds + 1):
        if round_:
            chosen = refill_prompts(n_rows, step, round_, sum(not g.kept for g in slots), seed=seed, exclude=used)
            used += chosen
        t0 = time.perf_counter()
        done = generate(chosen, round_)
        t1 = time.perf_counter()
        raw = reward(chosen, done)
        times["gen_s"], times["reward_s"] = times["gen_s"] + t1 - t0, times["reward_s"] + time.perf_counter() - t1
        keep = group_filter.keep(*fill_no_opinion(raw, group_size), group_size)
        dropped += int((~keep).sum())
        new = sampled_groups(chosen, done, raw, keep, group_size)
        if round_:
            refilled += min(sum(g.kept for g in new), sum(not g.kept for g in slots))
        slots = fill_slots(slots, new) if round_ else new
        if all(g.kept for g in slots):
            break
    done, raw, kept = merge_slots(slots, group_size)
    if group_filter.active:
        times.update(refill_rounds=float(round_), dropped_groups=float(dropped), refilled_groups=float(refilled),
                     out_of_loss_groups=float((~kept).sum()))
    return GroupDraw(done, raw, kept, [g.row for g in slots], times)
