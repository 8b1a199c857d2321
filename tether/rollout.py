"""Rollouts: sampled completions as typed tensor records, their rewards, and their per-token statistics.

Everything that turns the sampler's output into something a loss or a report can read lives here, once, for the
online recipe, the KL measurement (``tether.eval.kl``) and the quickstart:

* :class:`Rollout` — a batch of prompt + completion rows as right-padded tensors, grouped prompt-major, with the
  sampler's own per-token log-probs; built by :func:`collate` from ``tether.sampling.Completions``.
* :func:`score` — one no-grad pass giving :class:`TokenScores`: reference log-probs, and when asked the policy's
  log-probs, exact full-vocabulary KL(π‖π_ref) and entropy per token, and a teacher's log-probs.
* :func:`rewarded` — a :class:`RewardedBatch`: the rollout with the reward of every completion (``None`` = no
  opinion: counted, kept out of the loss) and the rows that enter the loss.
* :func:`evaluate_reward` — the mean held-out reward of a model with fixed sampling seeds, so two models are compared
  on paired draws.
* :func:`answer_mask` — the tokens of each completion that state its final answer (GRPO-CARE's consistency bonus).
* :func:`reference_values` — A*-PO's stage 1: the optimal value V*(x) of every prompt from reference samples.

Records are frozen: a stage returns a new record (``rollout.rows(idx)``) instead of writing into the one it got.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tether.logprobs import IGNORE_INDEX, hidden_states, lm_head, token_stats
from tether.losses.policy import astar_po_values, dapo_dynamic_sampling_mask
from tether.prefix import shared_prefix_hidden_states
from tether.reference import reference_context
from tether.rewards import extract_answer
from tether.sampling import Completions, render_prompts, sample
from tether.stats import mean_ci95

__all__ = ["RewardedBatch", "Rollout", "TokenScores", "answer_mask", "assemble", "backbone_states", "batch_metrics",
           "collate", "evaluate_reward", "fill_no_opinion", "reference_values", "rewarded", "score",
           "score_completions"]

Reward = Callable[[str, str, dict], "float | None"]


@dataclass(frozen=True)
class Rollout:
    """B completions as right-padded (B, T) rows of prompt + completion, grouped prompt-major (the completions of one
    prompt are consecutive rows). Position t of ``labels``/``mask``/``sampler_logps`` describes the token predicted
    from position t, so every per-token tensor of this module lines up with them."""

    input_ids: Tensor
    """(B, T) long: prompt ids, completion ids, then padding."""
    attention_mask: Tensor
    """(B, T) long: 1 on prompt and completion tokens."""
    labels: Tensor
    """(B, T) long: the next completion token at each position that predicts one, ``IGNORE_INDEX`` elsewhere."""
    mask: Tensor
    """(B, T) bool: ``labels != IGNORE_INDEX`` — the response tokens."""
    prompt_len: Tensor
    """(B,) long: prompt tokens of each row."""
    group: Tensor
    """(B,) long: index of each row's prompt (rows of one group share it)."""
    sampler_logps: Tensor
    """(B, T) float: log-probs the sampler recorded for each response token (0 elsewhere)."""
    finished: Tensor
    """(B,) bool: False when the completion was cut at ``max_new_tokens``."""

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, idx: Tensor) -> Rollout:
        """The sub-batch of rows ``idx`` (in that order), trimmed to its longest row."""
        idx = idx.to(self.input_ids.device)
        width = int(self.attention_mask[idx].sum(-1).max())
        return Rollout(**{f.name: (v[idx, :width] if v.dim() == 2 else v[idx])
                          for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    def to(self, device: str | torch.device) -> Rollout:
        return Rollout(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


@dataclass(frozen=True)
class TokenScores:
    """No-grad per-token statistics of a :class:`Rollout`, each (B, T) aligned with its labels (0 at padding);
    a field is None when it was not asked for."""

    ref_hidden: Tensor
    """(B, T, H) the reference's final hidden states (kept so an update pass can compute the exact KL)."""
    ref_logps: Tensor | None = None
    """log π_ref of each response token."""
    logps: Tensor | None = None
    """log π of each response token under the policy as it was when scored (the "old" policy of the updates)."""
    kl: Tensor | None = None
    """Exact KL(π(·|s_t) ‖ π_ref(·|s_t)) over the full vocabulary at each response position."""
    entropy: Tensor | None = None
    """Entropy of π(·|s_t) at each response position."""
    teacher_logps: Tensor | None = None
    """log π_teacher of each response token."""
    topk_ids: Tensor | None = None
    """(B, T, K) the K most probable tokens of the policy as it was when scored, most probable first (TROLL's
    support)."""
    topk_logps: Tensor | None = None
    """(B, T, K) their log-probs."""
    topk_rest: Tensor | None = None
    """(B, T) the log-mass of every other token."""
    ref_max_logp: Tensor | None = None
    """(B, T) max_v log π_ref^{(T')}(v|s_t), the reference's largest log-prob at temperature T'."""

    def rows(self, idx: Tensor, width: int) -> TokenScores:
        """Rows ``idx`` (in that order) of every statistic, trimmed to ``width`` positions."""
        return TokenScores(**{f.name: None if v is None else v[idx, :width]
                              for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})


def collate(done: Completions, pad_token_id: int, device: str | torch.device = "cpu") -> Rollout:
    """The :class:`Rollout` of sampled completions: right-padded rows, labels on completion tokens only."""
    rows = list(zip(done.prompt_ids, done.completion_ids))
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    sampler = torch.zeros(len(rows), T)
    for r, ((p, c), lp) in enumerate(zip(rows, done.logprobs)):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        attn[r, :len(p) + len(c)] = 1
        if c:
            labels[r, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
            sampler[r, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(lp, dtype=torch.float32)
    rollout = Rollout(input_ids=ids, attention_mask=attn, labels=labels, mask=labels != IGNORE_INDEX,
                      prompt_len=torch.tensor([len(p) for p in done.prompt_ids]),
                      group=torch.tensor(done.prompt_index), sampler_logps=sampler,
                      finished=torch.tensor(done.finished, dtype=torch.bool))
    return rollout.to(device)


def backbone_states(model, rollout: Rollout, share_prompts: bool, *,
                    embedding_grad_in_place: bool = False) -> Tensor:
    """(B, T, H) final hidden states of a rollout: each group's prompt run once when ``share_prompts``
    (``tether.prefix``), else every row in full. Both give the same values and gradients at every labelled
    position. ``embedding_grad_in_place``: see ``tether.logprobs.hidden_states`` (the caller runs ``.backward()``)."""
    if share_prompts:
        return shared_prefix_hidden_states(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_len,
                                           rollout.group, embedding_grad_in_place=embedding_grad_in_place)
    return hidden_states(model, rollout.input_ids, rollout.attention_mask,
                         embedding_grad_in_place=embedding_grad_in_place)


@torch.no_grad()
def score(policy, reference, rollout: Rollout, *, temperature: float, chunk_size: int, micro_batch_size: int,
          need_policy: bool, need_ref_logps: bool = True, teacher=None, share_prompts: bool = True, top_k: int = 0,
          ref_max_temperature: float | None = None) -> TokenScores:
    """One no-grad pass over ``rollout`` in micro-batches of ``micro_batch_size`` rows.

    Always: the reference's hidden states. ``need_ref_logps``: the reference log-probs. ``need_policy``: the
    policy's log-probs, the exact KL(π‖π_ref) and the entropy per token (and the reference log-probs with them).
    ``teacher``: a third model's log-probs. ``top_k`` > 0 (with ``need_policy``): the policy's top-K support
    (``topk_ids``, ``topk_logps``, ``topk_rest``). ``ref_max_temperature``: the reference's max log-prob at that
    temperature (``ref_max_logp``). An update pass that computes the exact KL from ``ref_hidden`` gets the reference
    log-probs there too, so a step with one on-policy update runs the reference head once
    (``need_policy=False, need_ref_logps=False``)."""
    policy_stats = ("logps", "ref_logps", "kl", "entropy") + (("topk_ids", "topk_logps", "topk_rest") if top_k else ())
    ref_stats = (("ref_logps",) if need_ref_logps and not need_policy else ()) + (
        ("ref_max_logp",) if ref_max_temperature else ())
    head = dict(chunk_size=chunk_size, temperature=temperature, ref_max_temperature=ref_max_temperature or 1.0)
    parts: dict[str, list[Tensor]] = {}
    w, b = lm_head(policy)
    for start in range(0, rollout.size, micro_batch_size):
        mb = rollout.rows(torch.arange(start, min(rollout.size, start + micro_batch_size)))
        with reference_context(reference):
            ref_hidden = backbone_states(reference, mb, share_prompts)
            rw, rb = lm_head(reference)
        pieces = {"ref_hidden": ref_hidden}
        if need_policy:
            hidden = backbone_states(policy, mb, share_prompts)
            pieces.update(token_stats(hidden, w, mb.labels, bias=b, ref_hidden=ref_hidden, ref_weight=rw,
                                      ref_bias=rb, stats=policy_stats, top_k=top_k, **head))
        if ref_stats:  # the reference as "the reference" of a call whose policy statistics are not asked for
            pieces.update(token_stats(ref_hidden, rw, mb.labels, bias=rb, ref_hidden=ref_hidden, ref_weight=rw,
                                      ref_bias=rb, stats=ref_stats, **head))
        if teacher is not None:
            with reference_context(teacher):
                tw, tb = lm_head(teacher)
                th = backbone_states(teacher, mb, share_prompts)
                pieces["teacher_logps"] = token_stats(th, tw, mb.labels, bias=tb, chunk_size=chunk_size,
                                                      temperature=temperature)["logps"]
        for k, v in pieces.items():
            parts.setdefault(k, []).append(v)

    def padded(vs: list[Tensor]) -> Tensor:
        return torch.cat([torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, rollout.width - v.shape[1]))
                          for v in vs])

    return TokenScores(**{k: padded(vs) for k, vs in parts.items()})


@dataclass(frozen=True)
class RewardedBatch:
    """A rollout with its rewards (B rows, Q = B / G groups)."""

    rollout: Rollout
    rewards: Tensor
    """(B,) rewards; a no-opinion completion holds its group's mean of the scored ones."""
    scored: Tensor
    """(B,) bool: the reward had an opinion."""
    loss_mask: Tensor
    """(B, T) bool: response tokens that enter the loss (no-opinion rows and dropped uniform groups are out)."""
    uniform: Tensor
    """(Q,) bool: groups whose rewards are all equal."""


def rewarded(reward: Reward, rows: Sequence[dict], done: Completions, *, pad: int, group_size: int,
             drop_uniform_groups: bool = False, device: str | torch.device = "cpu") -> RewardedBatch:
    """The collated rollout of ``done`` with the reward of every completion and the rows that enter the loss:
    no-opinion completions never do, and with ``drop_uniform_groups`` (DAPO's dynamic sampling) neither do groups
    whose rewards are all equal (they carry no group-relative signal)."""
    raw = score_completions(reward, rows, done)
    rewards, _ = fill_no_opinion(raw, group_size)
    keep = ~uniform_groups(rewards, group_size) if drop_uniform_groups else None
    return assemble(raw, done, pad=pad, group_size=group_size, in_loss=keep, device=device)


def uniform_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(Q,) bool: groups whose rewards are all exactly equal; a group of one completion is never called uniform (it
    has no group statistics to be uniform in)."""
    if group_size == 1:
        return torch.zeros(rewards.shape[0], dtype=torch.bool)
    return ~dapo_dynamic_sampling_mask(rewards, group_size=group_size)


def assemble(raw: Sequence[float | None], done: Completions, *, pad: int, group_size: int,
             in_loss: Tensor | None = None, device: str | torch.device = "cpu") -> RewardedBatch:
    """The :class:`RewardedBatch` of completions whose rewards ``raw`` are already computed (None = no opinion);
    ``in_loss`` (Q,) bool names the groups that may enter the loss (None = all)."""
    rewards, scored = fill_no_opinion(raw, group_size)
    rollout = collate(done, pad, device)
    keep = scored if in_loss is None else scored & in_loss.repeat_interleave(group_size)
    return RewardedBatch(rollout, rewards.to(rollout.mask.device), scored,
                         rollout.mask & keep.to(rollout.mask.device)[:, None], uniform_groups(rewards, group_size))


def batch_metrics(batch: RewardedBatch, kl: Tensor, entropy: Tensor) -> dict[str, float]:
    """What a rewarded batch looked like: the mean and std of its scored rewards, the token-mean and per-sequence
    exact KL and entropy ((B, T) ``kl`` and ``entropy``, zero off the response), completion length, the share cut
    at the length limit, the share of uniform groups and the no-opinion count."""
    mask, scored = batch.rollout.mask, batch.scored
    n_tokens = max(int(mask.sum()), 1)
    return {"reward": float(batch.rewards[scored].mean()) if scored.any() else float("nan"),
            "reward_std": float(batch.rewards[scored].std()) if int(scored.sum()) > 1 else 0.0,
            "token_kl": float((kl * mask).sum()) / n_tokens, "seq_kl": float((kl * mask).sum(-1).mean()),
            "entropy": float((entropy * mask).sum()) / n_tokens, "completion_len": float(mask.sum(-1).float().mean()),
            "cut_frac": 1.0 - float(batch.rollout.finished.float().mean()),
            "uniform_groups": float(batch.uniform.float().mean()), "no_opinion": float((~scored).sum())}


def _prompt_text(prompt: str | list[dict]) -> str:
    """What a reward sees as the prompt: the string, or the last message of a chat prompt."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def score_completions(reward: Reward, rows: Sequence[dict], done: Completions) -> list[float | None]:
    """Reward of every completion (None = no opinion). Each call gets the prompt, the completion's text and the
    prompt's row (the reward's metadata) plus the completion's token count (``completion_tokens``, for length
    shaping). A value that is neither None nor a finite real number (NaN, ±inf, a string …) raises ``ValueError``
    naming the reward and the row: it would otherwise reach the advantages and the weights."""
    out = []
    for i, text, ids in zip(done.prompt_index, done.texts, done.completion_ids):
        value = reward(_prompt_text(rows[i]["prompt"]), text, {**rows[i], "completion_tokens": len(ids)})
        if value is not None and not _finite_number(value):
            name = getattr(reward, "name", None) or getattr(reward, "__name__", None) or type(reward).__name__
            row = f"row id={rows[i]['id']!r}" if "id" in rows[i] else f"row {i} of the {len(rows)} rows scored"
            prompt = _prompt_text(rows[i]["prompt"])[:60]
            raise ValueError(f"reward {name!r} returned {value!r} for {row} (prompt {prompt!r}); a reward must be "
                             "a finite number, or None for no opinion — nothing was trained on it")
        out.append(value)
    return out


def _finite_number(value) -> bool:
    if isinstance(value, (str, bytes)):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fill_no_opinion(raw: Sequence[float | None], group_size: int) -> tuple[Tensor, Tensor]:
    """Rewards (B,) as a float tensor where None is replaced by the mean of its group's scored completions (so it
    adds nothing to the group's centre), and the bool mask (B,) of scored completions."""
    scored = torch.tensor([r is not None for r in raw])
    values = torch.tensor([0.0 if r is None else float(r) for r in raw], dtype=torch.float32)
    for g in range(0, len(raw), group_size):
        sl = slice(g, g + group_size)
        if scored[sl].any():
            values[sl] = torch.where(scored[sl], values[sl], values[sl][scored[sl]].mean())
    return values, scored


def evaluate_reward(model, tokenizer, rows: Sequence[dict], reward: Reward, *, samples_per_prompt: int,
                    max_new_tokens: int, temperature: float, seed: int, batch_size: int, top_p: float = 1.0,
                    top_k: int = 0, stop_strings: Sequence[str] = (), progress: bool = False,
                    examples: int = 0) -> dict:
    """Mean reward (with its 95% CI) of ``samples_per_prompt`` completions per prompt, sampled with fixed seeds, so
    that two models evaluated with the same arguments are compared on paired draws. A completion the reward has no
    opinion on scores 0 (counted in ``no_opinion``). ``scores`` holds every score in prompt-major order;
    ``examples`` > 0 adds the first completion of that many prompts."""
    done = sample(model, tokenizer, render_prompts(tokenizer, [r["prompt"] for r in rows]), n=samples_per_prompt,
                  max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  stop_strings=stop_strings, seed=seed, batch_size=batch_size, progress=progress,
                  desc="held-out reward")
    raw = score_completions(reward, rows, done)
    scores = [0.0 if s is None else float(s) for s in raw]
    mean, half = mean_ci95(scores)
    out = {"reward_mean": mean, "reward_ci95_halfwidth": half, "n": len(scores),
           "no_opinion": sum(s is None for s in raw), "scores": scores}
    if examples:
        firsts = list(zip(done.prompt_index, done.texts, scores))[::samples_per_prompt][:examples]
        out["examples"] = [{"prompt": rows[i]["prompt"], "completion": t, "reward": s} for i, t, s in firsts]
    return out


def answer_mask(tokenizer, rollout: Rollout) -> Tensor:
    """(B, T) bool, aligned with ``rollout.labels``: the tokens of each completion that state its final answer.

    The answer is what ``tether.rewards.extract_answer`` finds in the decoded completion (the last ``\\boxed{…}``,
    ``<answer>…</answer>`` or "the answer is …"), located at its last occurrence in the text; its tokens are those
    whose decoded characters overlap it. A completion that states no answer in those forms — an instruction-following
    response, whose constraints apply to the whole text — is its own answer: every token. (GRPO-CARE reads the span
    inside ``<answer>`` tags; tokenizer-dependent tag detection is replaced by character offsets of the decoded
    text, found by binary search over decoded prefixes.)
    """
    out = torch.zeros_like(rollout.mask)
    for r in range(rollout.size):
        positions = rollout.mask[r].nonzero().squeeze(-1)
        ids = rollout.labels[r, positions].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=True)
        answer = extract_answer(text)
        if not answer or answer not in text:
            out[r, positions] = True
            continue
        start = text.rindex(answer)
        first = _first_token_past(tokenizer, ids, start)
        last = _first_token_past(tokenizer, ids, start + len(answer) - 1)
        out[r, positions[first:last + 1]] = True
    return out


def _first_token_past(tokenizer, ids: list[int], char: int) -> int:
    """The smallest k such that the decoded ``ids[:k + 1]`` is longer than ``char`` (the token holding that
    character), by binary search over prefix lengths."""
    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid + 1], skip_special_tokens=True)) > char:
            hi = mid
        else:
            lo = mid + 1
    return lo


@torch.no_grad()
def reference_values(reference, tokenizer, prompt_ids: Sequence[Sequence[int]], rows: Sequence[dict],
                     reward: Reward, *, samples: int, beta: float, max_new_tokens: int, temperature: float,
                     seed: int, batch_size: int, top_p: float = 1.0, top_k: int = 0,
                     stop_strings: Sequence[str] = (), progress: bool = False) -> tuple[Tensor, int]:
    """A*-PO stage 1: V*(x) = β₁·log((1/N) Σ_j exp(r_j/β₁)) of every prompt from N = ``samples`` reference
    completions (``tether.losses.policy.astar_po_values``; Brantley et al. 2025, arXiv:2505.20686).

    Sampling runs the reference (LoRA adapters off) with fixed seeds, so the values are a function of (reference,
    seed): a resumed run recomputes the same numbers. A no-opinion sample counts as its prompt's mean scored reward
    (the fill of the training batch); a prompt with no scored sample gets V* = 0. Returns the (n_prompts,) values
    and the number of such prompts."""
    with reference_context(reference):
        done = sample(reference, tokenizer, prompt_ids, n=samples, max_new_tokens=max_new_tokens,
                      temperature=temperature, top_p=top_p, top_k=top_k, stop_strings=stop_strings, seed=seed,
                      batch_size=batch_size, progress=progress, desc="A*-PO values")
    rewards, scored = fill_no_opinion(score_completions(reward, rows, done), samples)
    unscored = int((~scored.view(-1, samples).any(-1)).sum())
    return astar_po_values(rewards, group_size=samples, beta=beta), unscored
