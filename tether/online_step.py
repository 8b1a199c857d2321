"""The stages of one online-RL step, over typed records: what the online recipe (``tether.recipes.online_rl``)
composes into ``rl_step``.

* :class:`StepPlan` — what every step computes (objective, aggregation, which passes produce which statistics, the
  KL placement, the group filter), decided once from the config.
* :class:`RLRun` — the live state of a run: models, data, reward, optimizer, KL controller.
* :func:`draw` — prompts, completions and rewards of a step (with the group filter's refill rounds), as a
  :class:`Drawn` record; :func:`generate` samples one round.
* :func:`targets` — GRPO-CARE's bonus, KL-shaped rewards and advantages (:class:`Targets`).
* :func:`update` — ``ppo_epochs`` × ``mini_batches`` optimizer steps over micro-batches (:func:`micro_batches`,
  :func:`micro_loss`: the objective called by name through ``ONLINE_OBJECTIVES``, plus β·KL when it is in the loss).

Under torchrun (``distributed: ddp | fsdp2``, ``tether.distributed``) a step computes what one process computes:
each rank samples its share of the step's sampling batches (the same RNG streams: ``sample(first_batch=...)``) and
the completions are gathered, so rewards, scores, advantages and the group filter see the whole batch on every rank
(they are computed on every rank, which costs a scoring pass per rank but keeps the batch-level normalizations
exact); in the update each micro-batch's groups are dealt to the ranks and each loss runs inside the wrapper's
forward (``RLRun.trainable``). Objectives that are not splittable into micro-batches run their whole mini-batch on
every rank (exact; no speed-up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tether import distributed
from tether.distributed import Trainable, shard_rows
from tether.group_filter import GroupFilter, draw_groups, prompt_schedule, round_seed
from tether.logprobs import lm_head, token_stats
from tether.losses.policy import (
    AGG_MODES,
    ONLINE_OBJECTIVES,
    AdaptiveKLController,
    FixedKLController,
    OnlineObjective,
    call_objective,
    grpo_care_bonus,
    kl_in_reward,
    kl_penalty,
    objective_agg_mode,
)
from tether.losses.policy import advantages as adv
from tether.losses.policy.registry import stat_arg
from tether.reference import ReferenceSync
from tether.rollout import (
    RewardedBatch,
    TokenScores,
    answer_mask,
    assemble,
    backbone_states,
    score_completions,
)
from tether.sampling import Completions, sample
from tether.sampling.constraints import rollout_processors
from tether.sampling.sampler import kl_cost_summary
from tether.training import (
    optimizer_step,
    release_freed_memory,
)

GROUP_ADVANTAGES = {"grpo": adv.grpo_advantages, "drgrpo": adv.drgrpo_advantages, "rloo": adv.rloo_advantages,
                    "gpg": adv.gpg_advantages}


@dataclass(frozen=True)
class StepPlan:
    """What every step of a run computes, decided once from the config."""

    objective: OnlineObjective
    agg: str
    """The objective's aggregation mode (the micro-batch shares and the KL term follow it)."""
    one_update: bool
    """One on-policy update per rollout with the KL in the loss: the update pass is also the scoring pass (old
    log-probs are its own, detached; reference log-probs, exact KL and entropy come from it)."""
    kl_in_loss: bool
    kl_in_reward: bool
    update_stats: tuple[str, ...]
    """Per-token statistics the update pass computes (``tether.logprobs.token_stats``)."""
    support_size: int
    """K of the rollout policy's top-K support the scoring pass stores (TROLL's ``max_support``); 0 = none."""
    ref_max_temperature: float | None
    """T' of the reference's max log-prob the scoring pass computes (the critical-token KL); None = none."""
    care: bool
    """GRPO-CARE's bonus is added to the rewards (the scoring pass then computes the reference log-probs)."""
    group_filter: GroupFilter

    @classmethod
    def of(cls, cfg) -> StepPlan:
        """The plan of an ``RLConfig``."""
        spec = ONLINE_OBJECTIVES[cfg.loss]
        support = stat_arg(cfg.loss, cfg.loss_args, "max_support") if spec.needs("support_ids") else 0
        one_update = cfg.ppo_epochs == 1 and cfg.mini_batches == 1 and cfg.kl_placement == "loss" and not support
        kl_in_loss = cfg.kl_placement == "loss" and cfg.beta > 0 and not spec.own_kl
        stats = ["logps"]
        if one_update:
            stats += ["ref_logps", "kl", "entropy"]
        elif kl_in_loss and cfg.kl_estimator == "exact":
            stats += ["kl"]
        if spec.needs("entropy") and "entropy" not in stats:
            stats += ["entropy"]
        if support:
            stats += ["support_logps", "support_rest"]
        ref_t = stat_arg(cfg.loss, cfg.loss_args, "ref_temperature") if spec.needs("ref_max_logp") else None
        return cls(spec, objective_agg_mode(cfg.loss, cfg.loss_args), one_update, kl_in_loss,
                   cfg.kl_placement == "reward" and cfg.beta > 0, tuple(stats), int(support), ref_t,
                   cfg.care_bonus > 0, GroupFilter(cfg.drop_uniform_groups, cfg.difficulty_low,
                                                   cfg.difficulty_high, cfg.pass_threshold))


@dataclass
class RLRun:
    """The live state of a run: what every step reads, and what its updates change."""

    cfg: Any
    """The run's ``tether.recipes.configs.RLConfig``."""
    plan: StepPlan
    policy: Any
    reference: Any
    teacher: Any | None
    """A separate teacher model (KDRL), or None when the teacher is the reference."""
    tokenizer: Any
    pad: int
    reward: Any
    train_rows: list[dict]
    prompt_ids: list[list[int]]
    eval_rows: list[dict]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_ctl: AdaptiveKLController | FixedKLController
    engine: Any | None = None
    reward_transform: Any | None = None
    """``cfg.reward_transform`` as a ``tether.inference.transforms.ReferenceCalibration``, or None."""
    sync: ReferenceSync | None = None
    """How the reference moves (``ref_strategy``: EMA anchor, ProRL reset, TR-DPO sync), stepped after every
    optimizer step; None or a non-moving strategy = a fixed reference."""
    values: Tensor | None = None
    """(n_train_rows,) A*-PO's V*(x) of every training prompt, or None."""
    trainable: Trainable | None = None
    """The policy as the update trains it (DDP / FSDP2 under torchrun); None = ``Trainable(policy)``, one process."""

    def __post_init__(self) -> None:
        if self.trainable is None:
            self.trainable = Trainable(self.policy, distributed.Dist())


@dataclass(frozen=True)
class Drawn:
    """A step's batch after the group filter and its refill rounds."""

    batch: RewardedBatch
    rows: list[dict]
    """(Q,) the prompt row of each group."""
    row_ids: Tensor
    """(Q,) long: each group's index in the training pool."""
    metrics: dict[str, float]
    """Times of sampling and reward, the filter's counts, and — when the rollouts were sampled through logits
    processors (a constraint, exclusion, …) — their KL cost ``intervention_kl`` (nats per completion, mean over
    prompts) and its 95% CI half-width ``intervention_kl_ci95`` (``tether.sampling.sampler.kl_cost_summary``)."""


@dataclass(frozen=True)
class Targets:
    rewards: Tensor
    """(B,) rewards after KL shaping (what reward-taking objectives normalise)."""
    advantages: Tensor | None
    """(B,) or (B, T) advantages; None for objectives that take rewards."""
    values: Tensor | None = None
    """(B,) A*-PO's V*(x) of each row's prompt."""
    bonus: Tensor | None = None
    """(B,) GRPO-CARE's bonus added to the rewards."""


def draw(run: RLRun, step: int) -> Drawn:
    """Step ``step``'s groups: sampled, rewarded and filtered, dropped groups replaced by groups of new prompts for
    up to ``max_refill_rounds`` rounds (``tether.group_filter.draw_groups``). Without a filter: every group kept."""
    cfg, G, pool = run.cfg, run.cfg.group_size, run.train_rows
    if run.engine is not None:
        run.engine.sync_weights(run.policy)
    got = draw_groups(prompt_schedule(len(pool), step, per_step=cfg.prompts_per_step, seed=cfg.seed),
                      lambda chosen, round_: generate(run, step, chosen, round_)[1],
                      lambda chosen, done: score_completions(run.reward, [pool[i] for i in chosen], done),
                      n_rows=len(pool), step=step, seed=cfg.seed, group_filter=run.plan.group_filter, group_size=G,
                      max_refill_rounds=cfg.max_refill_rounds)
    batch = assemble(got.raw, got.done, pad=run.pad, group_size=G, device=cfg.device,
                     in_loss=got.kept if run.plan.group_filter.active else None)
    return Drawn(batch, [pool[i] for i in got.rows], torch.tensor(got.rows), {**got.metrics,
                                                                              **kl_cost_summary(got.done)})


def generate(run: RLRun, step: int, chosen: list[int] | None = None, round_: int = 0) -> tuple[list[dict], Completions]:
    """Prompt rows ``chosen`` (default: step ``step``'s schedule) and ``group_size`` completions of each, grouped
    prompt-major, sampled with the seed of round ``round_`` of the step (``tether.group_filter.round_seed``)."""
    cfg = run.cfg
    if chosen is None:
        chosen = prompt_schedule(len(run.train_rows), step, per_step=cfg.prompts_per_step, seed=cfg.seed)
    ids = [run.prompt_ids[i] for i in chosen]
    kwargs = dict(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                  top_k=cfg.top_k, stop_strings=cfg.stop_strings, seed=round_seed(cfg.seed, step, round_))
    if run.engine is not None:
        done = run.engine.sample(ids, **kwargs)
    else:  # cfg.constraint: the rollouts' grammar (one processor per call; config-checked to need this engine)
        done = _sample_sharded(run, ids, processors=rollout_processors(cfg.constraint, cfg.constraint_delimiters,
                                                                       run.tokenizer), **kwargs)
    return [run.train_rows[i] for i in chosen], done


def _sample_sharded(run: RLRun, ids: list[list[int]], **kwargs) -> Completions:
    """``sample`` over ``ids``; under torchrun rank r samples the sampling batches r, r+W, … (each with its own RNG
    stream, as one process draws it) and every rank gets all completions, in order."""
    cfg, dist = run.cfg, run.trainable.dist
    common = dict(batch_size=cfg.sample_batch_size, engine=cfg.engine, **kwargs)
    if dist.world == 1:
        return sample(run.policy, run.tokenizer, ids, **common)
    per = max(1, cfg.sample_batch_size // cfg.group_size)  # sample()'s prompts per batch
    starts = list(range(0, len(ids), per))[dist.rank::dist.world]
    with run.trainable.gathered() as policy:
        mine = [(start, sample(policy, run.tokenizer, ids[start:start + per], first_batch=start // per, **common))
                for start in starts]
    parts = sorted((p for parts in distributed.gather_objects(mine) for p in parts), key=lambda p: p[0])
    merged = {}
    for f in dataclasses.fields(Completions):  # every per-completion field, concatenated; None stays None
        values = [getattr(part, f.name) for _, part in parts]
        if any(v is None for v in values):
            merged[f.name] = None
        elif isinstance(values[0], torch.Tensor):
            merged[f.name] = torch.cat(values)
        else:
            merged[f.name] = [x for v in values for x in v]
    merged["prompt_index"] = [start + i for start, part in parts for i in part.prompt_index]
    return Completions(**merged)


def targets(run: RLRun, batch: RewardedBatch, row_ids: Tensor, scores: TokenScores, beta: float) -> Targets:
    """Rewards with GRPO-CARE's bonus (``care_bonus``) and KL shaping (``kl_placement: reward``), A*-PO's V* of each
    row, and the advantages of objectives that take them.

    The bonus's accuracy is pass/fail (reward ≥ ``pass_threshold``, no-opinion rows fail) — tether's rewards are one
    number per completion, so "accurate" means full marks by default; its confidence is the EMA reference's mean
    log-prob over the completion's answer span (``tether.rollout.answer_mask``)."""
    cfg, plan, G = run.cfg, run.plan, run.cfg.group_size
    mask, rewards, token_rewards, bonus = batch.rollout.mask, batch.rewards, None, None
    if plan.care:
        accuracy = ((batch.rewards >= cfg.pass_threshold) & batch.scored).to(rewards.dtype)
        bonus = grpo_care_bonus(accuracy, scores.ref_logps, answer_mask(run.tokenizer, batch.rollout), group_size=G,
                                bonus_coef=cfg.care_bonus, **cfg.care_args)
        rewards = rewards + bonus
    values = None if run.values is None else run.values[row_ids].repeat_interleave(G).to(rewards.device)
    if plan.kl_in_reward:
        token_rewards = kl_in_reward(rewards, scores.logps, scores.ref_logps, mask, coef=beta,
                                     estimator=cfg.kl_estimator)
        rewards = token_rewards.sum(-1)
    if plan.objective.takes_rewards:
        return Targets(rewards, None, values, bonus)
    if cfg.advantage_name == "reinforce_pp":  # token-level: returns of the (KL-shaped) token rewards
        return Targets(rewards, adv.reinforce_pp_advantages(token_rewards if token_rewards is not None else rewards,
                                                            mask), values, bonus)
    return Targets(rewards, GROUP_ADVANTAGES[cfg.advantage_name](rewards, group_size=G), values, bonus)


def update(run: RLRun, batch: RewardedBatch, scores: TokenScores, goals: Targets, beta: float,
           step: int) -> tuple[dict[str, float], dict[str, Tensor]]:
    """``ppo_epochs`` × ``mini_batches`` optimizer steps. Returns the metrics averaged over them and, from the
    first pass, the (B, T) exact KL and entropy the update pass computed (for a one-update plan)."""
    cfg, G = run.cfg, run.cfg.group_size
    dist, splittable = run.trainable.dist, run.plan.objective.splittable
    sums: dict[str, float] = {}
    grad_norms = 0.0
    moved = 0
    seen = {k: torch.zeros_like(batch.rollout.sampler_logps) for k in ("kl", "entropy")}
    n_groups = batch.rollout.size // G
    per_mini = n_groups // cfg.mini_batches
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(cfg.seed * 31 + step * 1009 + epoch))
        for m in range(cfg.mini_batches):
            rows = (order[m * per_mini:(m + 1) * per_mini, None] * G + torch.arange(G)).reshape(-1)
            pieces = micro_batches(run, batch.loss_mask, rows)
            for k_micro, (idx, share, weight) in enumerate(_my_pieces(run, batch.loss_mask, pieces)):
                with run.trainable.sync(k_micro == len(pieces) - 1):  # reduce gradients once per mini-batch
                    loss, metrics, tok = run.trainable(_micro_loss_of, run, batch, scores, goals, idx, beta)
                    release_freed_memory()  # lower peak RSS: the backward pass is where the gradients appear
                    # DDP / FSDP2 average over ranks: W × this rank's share of a split piece; a whole piece
                    # computed on every rank (unsplittable objective) is already the average.
                    (loss * (share * weight * (dist.world if splittable else 1))).backward()
                writes = weight > 0 and (splittable or dist.main)  # each row's statistics from one rank
                for k in seen:
                    if k in tok and epoch == 0 and writes:
                        seen[k][idx.to(seen[k].device), :tok[k].shape[1]] = tok[k].detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * share * (weight if splittable else 1 / dist.world)
            grad_norms += optimizer_step(run.policy, run.optimizer, run.scheduler, max_grad_norm=cfg.max_grad_norm,
                                         step=step + 1)
            if run.sync is not None and run.sync.moving:  # every K optimizer steps θ_ref ← (1−r)·θ_ref + r·θ
                moved += run.sync.step(run.reference, run.policy, run.optimizer)
    sums = distributed.all_sum(sums, dist)
    for k in seen:
        distributed.all_sum_(seen[k], dist)
    sums["grad_norm"] = grad_norms  # the same on every rank
    n_updates = cfg.ppo_epochs * cfg.mini_batches
    metrics = {k: v / n_updates for k, v in sums.items()}  # each update's shares sum to 1
    moving = run.sync is not None and run.sync.moving
    return ({**metrics, "ref/updates": float(moved)} if moving else metrics), seen


def micro_batches(run: RLRun, loss_mask: Tensor, rows: Tensor) -> list[tuple[Tensor, float]]:
    """Micro-batches (whole groups) of one mini-batch, each with the share of the mini-batch loss it carries:
    its share of the loss tokens (token-mean) or of the sequences with a loss token (sequence means)."""
    G = run.cfg.group_size
    size = run.cfg.micro_batch_size if run.plan.objective.splittable else len(rows)
    size = max(G, size - size % G)
    pieces = [rows[i:i + size] for i in range(0, len(rows), size)]
    weight = _piece_weight(run, loss_mask)
    total = max(sum(weight(p) for p in pieces), 1.0)
    return [(p, weight(p) / total) for p in pieces]


def _piece_weight(run: RLRun, loss_mask: Tensor):
    """What a set of rows weighs in its mini-batch's loss: its loss tokens (token-mean) or its sequences with a
    loss token (sequence means)."""
    mask = loss_mask.cpu()
    if run.plan.agg == "token-mean":
        return lambda p: float(mask[p].sum())
    return lambda p: float((mask[p].sum(-1) > 0).sum())


def _my_pieces(run: RLRun, loss_mask: Tensor, pieces: list[tuple[Tensor, float]]
               ) -> list[tuple[Tensor, float, float]]:
    """This rank's part of each micro-batch piece: ``(rows, share of the mini-batch loss, weight)``. One process:
    the pieces themselves (weight 1). Under torchrun the piece's groups are dealt to the ranks (``shard_rows``) and
    the share is recomputed for the rows this rank holds (weight 0 for a stand-in group); an objective that is not
    splittable keeps its one piece whole on every rank."""
    dist, G = run.trainable.dist, run.cfg.group_size
    if dist.world == 1 or not run.plan.objective.splittable:
        return [(idx, share, 1.0) for idx, share in pieces]
    weigh = _piece_weight(run, loss_mask)
    total = max(sum(weigh(p) for p, _ in pieces), 1.0)
    out = []
    for idx, _ in pieces:
        groups, weight = shard_rows(idx.view(-1, G), dist)
        mine = groups.reshape(-1)
        out.append((mine, weigh(mine) / total, weight))
    return out


def _micro_loss_of(policy, run: RLRun, *args) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
    """:func:`micro_loss` as the wrapper's forward calls it (``policy`` is ``run.policy``, its parameters gathered)."""
    return micro_loss(run, *args)


def micro_loss(run: RLRun, batch: RewardedBatch, scores: TokenScores, goals: Targets, idx: Tensor,
               beta: float) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
    """The loss of rows ``idx`` (objective + β·KL term when the KL is in the loss), its metrics, and the per-token
    statistics of the forward pass."""
    cfg, plan = run.cfg, run.plan
    mb = batch.rollout.rows(idx)
    idx, width = idx.to(mb.mask.device), mb.width
    hidden = backbone_states(run.policy, mb, cfg.share_prompts, embedding_grad_in_place=True)
    sc, ref_kw = scores.rows(idx, width), {}
    if "kl" in plan.update_stats:
        rw, rb = lm_head(run.reference)
        ref_kw = dict(ref_hidden=sc.ref_hidden, ref_weight=rw, ref_bias=rb)
    weight, bias = lm_head(run.policy)
    tok = token_stats(hidden, weight, mb.labels, bias=bias, stats=plan.update_stats, chunk_size=cfg.chunk_size,
                      temperature=cfg.temperature, support_ids=sc.topk_ids, **ref_kw)
    logps = tok["logps"]
    old = logps.detach() if plan.one_update else sc.logps
    ref_logps = tok["ref_logps"] if plan.one_update else sc.ref_logps
    loss_mask = batch.loss_mask[idx, :width]
    advantages = goals.advantages
    if advantages is not None:
        advantages = advantages[idx] if advantages.dim() == 1 else advantages[idx, :width]
    available = dict(
        logps=logps, old_logps=old, ref_logps=ref_logps, entropy=tok.get("entropy"), advantages=advantages,
        teacher_logps=sc.teacher_logps if sc.teacher_logps is not None else ref_logps, rewards=goals.rewards[idx],
        mask=loss_mask, group_size=cfg.group_size, max_len=cfg.max_new_tokens, tokens=mb.labels.clamp_min(0),
        support_ids=sc.topk_ids, old_support_logps=sc.topk_logps, old_rest_logp=sc.topk_rest,
        support_logps=tok.get("support_logps"), rest_logp=tok.get("support_rest"), ref_max_logp=sc.ref_max_logp,
        vocab_size=weight.shape[0], values=None if goals.values is None else goals.values[idx])
    out = call_objective(cfg.loss, available, cfg.loss_args)
    loss, metrics = out.loss, dict(out.metrics)
    if plan.kl_in_loss:
        kl_term = kl_penalty(logps, ref_logps, loss_mask, estimator=cfg.kl_estimator, old_logps=old,
                             importance_weight=cfg.kl_importance_weight, token_kl=tok.get("kl"),
                             agg=plan.agg if plan.agg in AGG_MODES else "token-mean", max_len=cfg.max_new_tokens)
        loss = loss + beta * kl_term
        metrics["kl_term"] = kl_term.item()
    metrics["loss"] = loss.item()
    return loss, metrics, tok
