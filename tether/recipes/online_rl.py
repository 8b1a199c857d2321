"""Online RL (GRPO and its family) with verifiable or model rewards, readable top to bottom.

    tether rl --config configs/grpo_instructions.yaml [--loss dapo --kl_estimator k2 ...]

One step (:func:`rl_step`), in order, each stage a function over typed records:

1. **Rollout** (:func:`generate`). ``prompts_per_step`` prompts (a seeded permutation of the pool, epoch after
   epoch), ``group_size`` completions each, sampled by the current policy (``tether.sampling``; ``engine: vllm`` on
   GPU machines). Seeds are a function of (seed, step), so a resumed run draws the same completions.
2. **Reward** (``tether.rollout.rewarded``). Each completion is scored by the configured rewards; "no opinion" (None) is
   counted and kept out of the loss, and so are groups whose rewards are all equal when ``drop_uniform_groups``.
   Code-executing rewards run sandboxed: a timeout or crash is a failed sample, never a failed run. With
   ``reward_transform`` each reward then becomes its calibrated / CTRL / vBoN transform against the reference's own
   samples for the prompt (``tether.inference.transforms.ReferenceCalibration``).
3. **Score** (``tether.rollout.score``). One no-grad pass of the reference — and of the policy when the step takes
   several updates or shapes the reward — gives per-token log-probs, the exact full-vocabulary KL(π‖π_ref) and the
   entropy. With one on-policy update the update pass itself provides them (the reference head runs once).
4. **KL placement and advantages** (:func:`targets`). ``kl_placement: reward`` subtracts β·k (k1/k2/k3) from each
   sequence's reward; ``kl_placement: loss`` adds β·``kl_penalty`` in the update. Advantages by GRPO, Dr.GRPO, RLOO,
   REINFORCE++ or GPG; objectives that take raw rewards (GVPO, DisCO, APO, KDRL) normalise within groups themselves.
   β is fixed or adapted towards ``target_kl`` from the measured exact sequence KL.
5. **Update** (:func:`update`). ``ppo_epochs`` passes over the batch in ``mini_batches`` seeded mini-batches of
   whole groups, each one optimizer step accumulated over micro-batches of ``micro_batch_size`` rows; the objective
   is called by name through ``tether.losses.policy.ONLINE_OBJECTIVES``, with the inputs its entry declares.
6. **Record.** Reward, exact token and sequence KL of the policy that sampled, the estimator's value, entropy, clip
   fractions, lengths and the time of each stage go to the progress bar, ``metrics.jsonl`` and TensorBoard; atomic
   checkpoints; ``resume=True`` continues with exactly the trajectory of an uninterrupted run.

Before the first step and after the last the held-out reward is measured on paired samples (fixed seeds), and at
the end KL(trained ‖ reference) with 95% CIs (``tether.eval.kl``); both go to ``rl_report.json``.

What each step computes is decided once per run (:class:`StepPlan`); the live models, data and optimizer travel in
one record (:class:`RLRun`). ``ref_reset_every`` is ProRL's reset (Liu et al. 2025): the reference becomes the
policy *and* the optimizer state is re-initialized (``tether.reference.reset_reference_``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tether.logprobs import lm_head, token_stats
from tether.losses.policy import (
    AGG_MODES,
    ONLINE_OBJECTIVES,
    AdaptiveKLController,
    FixedKLController,
    OnlineObjective,
    call_objective,
    kl_in_reward,
    kl_penalty,
    objective_agg_mode,
)
from tether.losses.policy import advantages as adv
from tether.models import apply_lora, enable_gradient_checkpointing, load_model, load_tokenizer
from tether.recipes.configs import RLConfig
from tether.reference import frozen_copy, reset_reference_
from tether.rollout import (
    RewardedBatch,
    TokenScores,
    backbone_states,
    evaluate_reward,
    rewarded,
    score,
)
from tether.sampling import Completions, render_prompts, sample
from tether.stats import mean_ci95
from tether.training import (
    RunLog,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    read_metrics,
    release_freed_memory,
    resume_or_fresh,
    save_checkpoint,
    save_final,
    start_run,
)

GROUP_ADVANTAGES = {"grpo": adv.grpo_advantages, "drgrpo": adv.drgrpo_advantages, "rloo": adv.rloo_advantages,
                    "gpg": adv.gpg_advantages}
TASK_REWARDS = {"instructions": {"instructions": 1.0}, "arithmetic": {"math": 1.0}}


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

    @classmethod
    def of(cls, cfg: RLConfig) -> StepPlan:
        spec = ONLINE_OBJECTIVES[cfg.loss]
        one_update = cfg.ppo_epochs == 1 and cfg.mini_batches == 1 and cfg.kl_placement == "loss"
        kl_in_loss = cfg.kl_placement == "loss" and cfg.beta > 0 and not spec.own_kl
        stats = ["logps"]
        if one_update:
            stats += ["ref_logps", "kl", "entropy"]
        elif kl_in_loss and cfg.kl_estimator == "exact":
            stats += ["kl"]
        if spec.needs("entropy") and "entropy" not in stats:
            stats += ["entropy"]
        return cls(spec, objective_agg_mode(cfg.loss, cfg.loss_args), one_update, kl_in_loss,
                   cfg.kl_placement == "reward" and cfg.beta > 0, tuple(stats))


@dataclass
class RLRun:
    """The live state of a run: what every step reads, and what its updates change."""

    cfg: RLConfig
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


@dataclass(frozen=True)
class Targets:
    rewards: Tensor
    """(B,) rewards after KL shaping (what reward-taking objectives normalise)."""
    advantages: Tensor | None
    """(B,) or (B, T) advantages; None for objectives that take rewards."""


@dataclass(frozen=True)
class RLResult:
    output_dir: Path
    steps: int
    metrics: list[dict]
    report: dict | None = None


# ------------------------------------------------------------------------------------------------------------
# Set-up: data, reward, models, optimizer.
# ------------------------------------------------------------------------------------------------------------


def task_rows(cfg: RLConfig) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompt rows: from files, or the generated task's splits."""
    from tether.data import load_prompt_rows
    from tether.tasks import make_instruction_prompts
    from tether.tasks.arithmetic import make_arithmetic_prompts

    make = make_instruction_prompts if cfg.task == "instructions" else make_arithmetic_prompts
    train_rows = (load_prompt_rows(cfg.prompts_file) if cfg.prompts_file
                  else make(cfg.train_prompts, seed=cfg.seed, split="train"))
    if cfg.eval_prompts_file:
        return train_rows, load_prompt_rows(cfg.eval_prompts_file)
    if cfg.prompts_file or cfg.eval_prompts == 0:
        return train_rows, []
    return train_rows, make(cfg.eval_prompts, seed=cfg.seed, split="heldout")


def setup(cfg: RLConfig, *, reward=None, train_rows: list[dict] | None = None) -> RLRun:
    """Load models, data, reward and optimizer. The reference is a frozen copy of the start, another model, or —
    with LoRA — the policy's own base with its adapters off. Gradient checkpointing is enabled before LoRA wraps
    the model (``tether.models.enable_gradient_checkpointing``)."""
    from tether.rewards import build_reward

    if reward is None:
        reward = build_reward(cfg.rewards if cfg.rewards is not None else TASK_REWARDS[cfg.task],
                              reward_model=cfg.reward_model, reward_model_weight=cfg.reward_model_weight,
                              max_new_tokens=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer)
    rows, eval_rows = task_rows(cfg)
    train_rows = rows if train_rows is None else train_rows
    tokenizer = load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = load_model(cfg.model).to(cfg.device)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if cfg.lora:
        reference = policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha)
    else:
        reference = load_model(cfg.ref_model).to(cfg.device).eval() if cfg.ref_model else frozen_copy(policy)
        reference.requires_grad_(False)
    plan = StepPlan.of(cfg)
    teacher = None
    if plan.objective.needs("teacher_logps") and cfg.teacher_model:
        teacher = load_model(cfg.teacher_model).to(cfg.device).eval().requires_grad_(False)
    policy.train()
    total_updates = cfg.steps * cfg.ppo_epochs * cfg.mini_batches
    optimizer = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=cfg.schedule, warmup_steps=int(cfg.warmup_ratio * total_updates),
                               total_steps=total_updates)
    kl_ctl = (AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
              else FixedKLController(cfg.beta))
    engine = None
    if cfg.engine == "vllm":
        from tether.sampling.vllm import VLLMEngine

        start_dir = save_final(policy, tokenizer, Path(cfg.output_dir) / "start", lora=cfg.lora)
        engine = VLLMEngine(str(start_dir), seed=cfg.seed)
    transform = None
    if cfg.reward_transform:  # rewards → calibrated / CTRL / vBoN against the reference's own samples per prompt
        from tether.inference.transforms import ReferenceCalibration

        transform = ReferenceCalibration(cfg.reward_transform, cfg.reward_transform_args, reference=reference,
                                         tokenizer=tokenizer, reward=reward, max_new_tokens=cfg.max_new_tokens,
                                         temperature=cfg.temperature, seed=cfg.seed,
                                         batch_size=cfg.sample_batch_size, stop_strings=cfg.stop_strings)
    return RLRun(cfg, plan, policy, reference, teacher, tokenizer, pad, reward, train_rows,
                 render_prompts(tokenizer, [r["prompt"] for r in train_rows]), eval_rows, optimizer, scheduler,
                 kl_ctl, engine, transform)


# ------------------------------------------------------------------------------------------------------------
# One step.
# ------------------------------------------------------------------------------------------------------------


def rl_step(run: RLRun, step: int) -> dict[str, float]:
    """One rollout → reward → score → advantage → update cycle; returns the step's metrics."""
    cfg, plan = run.cfg, run.plan
    seconds, t0 = {}, time.perf_counter()
    rows, done = generate(run, step)
    seconds["gen_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    batch = rewarded(run.reward, rows, done, pad=run.pad, group_size=cfg.group_size,
                     drop_uniform_groups=cfg.drop_uniform_groups, device=cfg.device)
    if run.reward_transform is not None:  # cfg.reward_transform, applied right after the rewards are computed
        batch = run.reward_transform(batch, rows, group_size=cfg.group_size,
                                     drop_uniform_groups=cfg.drop_uniform_groups)
    seconds["reward_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    scores = score(run.policy, run.reference, batch.rollout, temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                   micro_batch_size=cfg.micro_batch_size, need_policy=not plan.one_update,
                   need_ref_logps=not plan.one_update, teacher=run.teacher, share_prompts=cfg.share_prompts)
    beta = run.kl_ctl.value
    goals = targets(cfg, plan, batch, scores, beta)
    seconds["score_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    metrics, seen = update(run, batch, scores, goals, beta, step)
    seconds["update_s"] = time.perf_counter() - t0

    # The exact KL and entropy of the policy that sampled this batch: from the update pass when it was on-policy.
    kl, entropy = (seen["kl"], seen["entropy"]) if plan.one_update else (scores.kl, scores.entropy)
    mask = batch.rollout.mask
    n_tokens = max(int(mask.sum()), 1)
    seq_kl = (kl * mask).sum(-1)
    run.kl_ctl.update(float(seq_kl.mean()), n_steps=batch.rollout.size)
    scored = batch.scored
    metrics.update({
        "reward": float(batch.rewards[scored].mean()) if scored.any() else float("nan"),
        "reward_std": float(batch.rewards[scored].std()) if int(scored.sum()) > 1 else 0.0,
        "token_kl": float((kl * mask).sum()) / n_tokens, "seq_kl": float(seq_kl.mean()), "kl_coef": beta,
        "entropy": float((entropy * mask).sum()) / n_tokens,
        "completion_len": float(mask.sum(-1).float().mean()),
        "cut_frac": 1.0 - float(batch.rollout.finished.float().mean()),
        "uniform_groups": float(batch.uniform.float().mean()), "no_opinion": float((~scored).sum()),
        "lr": run.scheduler.get_last_lr()[0], **seconds, "gen_tokens_per_s": n_tokens / max(seconds["gen_s"], 1e-9),
    })
    if plan.kl_in_reward:  # β·Σ_t k_t subtracted from each sequence's reward, on average
        metrics["reward_kl_penalty"] = float((batch.rewards - goals.rewards).mean())
    if not plan.one_update:  # how far the scoring pass is from what the sampler recorded (engine differences)
        gap = (batch.rollout.sampler_logps - scores.logps).abs() * mask
        metrics["sampler_logp_gap"] = float(gap.sum()) / n_tokens
    return metrics


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


def generate(run: RLRun, step: int) -> tuple[list[dict], Completions]:
    """Step ``step``'s prompt rows and ``group_size`` completions of each, grouped prompt-major."""
    cfg = run.cfg
    chosen = prompt_schedule(len(run.train_rows), step, per_step=cfg.prompts_per_step, seed=cfg.seed)
    ids = [run.prompt_ids[i] for i in chosen]
    kwargs = dict(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                  top_k=cfg.top_k, stop_strings=cfg.stop_strings, seed=cfg.seed * 100_003 + step)
    if run.engine is not None:
        run.engine.sync_weights(run.policy)
        done = run.engine.sample(ids, **kwargs)
    else:
        done = sample(run.policy, run.tokenizer, ids, batch_size=cfg.sample_batch_size, engine=cfg.engine, **kwargs)
    return [run.train_rows[i] for i in chosen], done


def targets(cfg: RLConfig, plan: StepPlan, batch: RewardedBatch, scores: TokenScores, beta: float) -> Targets:
    """KL-shaped rewards (``kl_placement: reward``) and the advantages of objectives that take them."""
    mask, rewards, token_rewards = batch.rollout.mask, batch.rewards, None
    if plan.kl_in_reward:
        token_rewards = kl_in_reward(rewards, scores.logps, scores.ref_logps, mask, coef=beta,
                                     estimator=cfg.kl_estimator)
        rewards = token_rewards.sum(-1)
    if plan.objective.takes_rewards:
        return Targets(rewards, None)
    if cfg.advantage_name == "reinforce_pp":  # token-level: returns of the (KL-shaped) token rewards
        return Targets(rewards, adv.reinforce_pp_advantages(token_rewards if token_rewards is not None else rewards,
                                                            mask))
    return Targets(rewards, GROUP_ADVANTAGES[cfg.advantage_name](rewards, group_size=cfg.group_size))


def update(run: RLRun, batch: RewardedBatch, scores: TokenScores, goals: Targets, beta: float,
           step: int) -> tuple[dict[str, float], dict[str, Tensor]]:
    """``ppo_epochs`` × ``mini_batches`` optimizer steps. Returns the metrics averaged over them and, from the
    first pass, the (B, T) exact KL and entropy the update pass computed (for a one-update plan)."""
    cfg, G = run.cfg, run.cfg.group_size
    sums: dict[str, float] = {}
    seen = {k: torch.zeros_like(batch.rollout.sampler_logps) for k in ("kl", "entropy")}
    n_groups = batch.rollout.size // G
    per_mini = n_groups // cfg.mini_batches
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(cfg.seed * 31 + step * 1009 + epoch))
        for m in range(cfg.mini_batches):
            rows = (order[m * per_mini:(m + 1) * per_mini, None] * G + torch.arange(G)).reshape(-1)
            for idx, share in micro_batches(run, batch.loss_mask, rows):
                loss, metrics, tok = micro_loss(run, batch, scores, goals, idx, beta)
                release_freed_memory()  # lower peak RSS: the backward pass is where the gradients appear
                (loss * share).backward()
                for k in seen:
                    if k in tok and epoch == 0:
                        seen[k][idx.to(seen[k].device), :tok[k].shape[1]] = tok[k].detach()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * share
            grad_norm = optimizer_step(run.policy, run.optimizer, run.scheduler, max_grad_norm=cfg.max_grad_norm,
                                       step=step + 1)
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + grad_norm
    n_updates = cfg.ppo_epochs * cfg.mini_batches
    return {k: v / n_updates for k, v in sums.items()}, seen  # each update's shares sum to 1


def micro_batches(run: RLRun, loss_mask: Tensor, rows: Tensor) -> list[tuple[Tensor, float]]:
    """Micro-batches (whole groups) of one mini-batch, each with the share of the mini-batch loss it carries:
    its share of the loss tokens (token-mean) or of the sequences with a loss token (sequence means)."""
    G = run.cfg.group_size
    size = run.cfg.micro_batch_size if run.plan.objective.splittable else len(rows)
    size = max(G, size - size % G)
    pieces = [rows[i:i + size] for i in range(0, len(rows), size)]
    mask = loss_mask.cpu()
    weight = (lambda p: float(mask[p].sum())) if run.plan.agg == "token-mean" else (
        lambda p: float((mask[p].sum(-1) > 0).sum()))
    total = max(sum(weight(p) for p in pieces), 1.0)
    return [(p, weight(p) / total) for p in pieces]


def micro_loss(run: RLRun, batch: RewardedBatch, scores: TokenScores, goals: Targets, idx: Tensor,
               beta: float) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
    """The loss of rows ``idx`` (objective + β·KL term when the KL is in the loss), its metrics, and the per-token
    statistics of the forward pass."""
    cfg, plan = run.cfg, run.plan
    mb = batch.rollout.rows(idx)
    idx, width = idx.to(mb.mask.device), mb.width
    hidden = backbone_states(run.policy, mb, cfg.share_prompts, embedding_grad_in_place=True)
    ref_kw = {}
    if "kl" in plan.update_stats:
        rw, rb = lm_head(run.reference)
        ref_kw = dict(ref_hidden=scores.ref_hidden[idx, :width], ref_weight=rw, ref_bias=rb)
    weight, bias = lm_head(run.policy)
    tok = token_stats(hidden, weight, mb.labels, bias=bias, stats=plan.update_stats, chunk_size=cfg.chunk_size,
                      temperature=cfg.temperature, **ref_kw)
    logps = tok["logps"]
    old = logps.detach() if plan.one_update else scores.logps[idx, :width]
    ref_logps = tok["ref_logps"] if plan.one_update else scores.ref_logps[idx, :width]
    teacher = scores.teacher_logps[idx, :width] if scores.teacher_logps is not None else ref_logps
    loss_mask = batch.loss_mask[idx, :width]
    advantages = goals.advantages
    if advantages is not None:
        advantages = advantages[idx] if advantages.dim() == 1 else advantages[idx, :width]
    out = call_objective(cfg.loss, dict(logps=logps, old_logps=old, ref_logps=ref_logps, teacher_logps=teacher,
                                        entropy=tok.get("entropy"), advantages=advantages,
                                        rewards=goals.rewards[idx], mask=loss_mask, group_size=cfg.group_size,
                                        max_len=cfg.max_new_tokens), cfg.loss_args)
    loss, metrics = out.loss, dict(out.metrics)
    if plan.kl_in_loss:
        kl_term = kl_penalty(logps, ref_logps, loss_mask, estimator=cfg.kl_estimator, old_logps=old,
                             importance_weight=cfg.kl_importance_weight, token_kl=tok.get("kl"),
                             agg=plan.agg if plan.agg in AGG_MODES else "token-mean", max_len=cfg.max_new_tokens)
        loss = loss + beta * kl_term
        metrics["kl_term"] = kl_term.item()
    metrics["loss"] = loss.item()
    return loss, metrics, tok


# ------------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------------


def held_out_reward(run: RLRun, model) -> dict:
    """Mean held-out reward with the run's fixed evaluation seeds (paired across calls)."""
    cfg = run.cfg
    return evaluate_reward(model, run.tokenizer, run.eval_rows, run.reward,
                           samples_per_prompt=cfg.eval_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop_strings=cfg.stop_strings,
                           seed=cfg.seed + 7919, batch_size=cfg.sample_batch_size, progress=cfg.progress)


def train(cfg: RLConfig, *, reward=None) -> RLResult:
    """Run the recipe. ``reward`` (a callable ``(prompt, completion, row) -> float | None``) replaces the configured
    rewards — for rewards defined in Python."""
    out_dir = start_run(cfg)
    run = setup(cfg, reward=reward)
    moving = {"reference": run.reference} if cfg.ref_reset_every else None
    state = resume_or_fresh(out_dir, resume=cfg.resume, model=run.policy, optimizer=run.optimizer,
                            scheduler=run.scheduler, lora=cfg.lora, modules=moving, total=cfg.steps)
    step = 0 if state is None else state["step"]
    if state is not None:
        run.kl_ctl.value = state["extra"]["kl_coef"]
    log = RunLog(out_dir, total=cfg.steps, start=step, desc=cfg.loss, show=("reward", "token_kl", "loss", "entropy"),
                 finite=("loss", "token_kl", "grad_norm"), save_every=cfg.save_every, stop_after=cfg.stop_after,
                 tensorboard=cfg.tensorboard, progress=cfg.progress)
    if step == 0 and run.eval_rows:
        before = held_out_reward(run, run.policy)
        log.log(0, {"eval_reward": before["reward_mean"], "eval_reward_ci95": before["reward_ci95_halfwidth"]})
        (out_dir / "eval_before.json").write_text(json.dumps(before))

    def checkpoint() -> None:
        save_checkpoint(out_dir, step, model=run.policy, tokenizer=run.tokenizer, optimizer=run.optimizer,
                        scheduler=run.scheduler, extra={"kl_coef": run.kl_ctl.value}, modules=moving)

    while step < cfg.steps:
        row = rl_step(run, step)
        step += 1
        if cfg.ref_reset_every and step % cfg.ref_reset_every == 0:
            reset_reference_(run.reference, run.policy, run.optimizer)
            row["ref_reset"] = 1.0
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and run.eval_rows:
            row["eval_reward"] = held_out_reward(run, run.policy)["reward_mean"]
        if log.end_step(step, row, checkpoint=checkpoint):
            break
    log.close()
    result = RLResult(out_dir, step, read_metrics(out_dir))
    if step < cfg.steps:
        return result
    save_final(run.policy, run.tokenizer, out_dir / "final", lora=cfg.lora)
    return dataclasses.replace(result, report=final_report(run, out_dir, result.metrics))


def final_report(run: RLRun, out_dir: Path, metrics: list[dict]) -> dict:
    """Held-out reward before and after (paired, with the CI of the gain) and KL(trained ‖ reference) with CIs;
    written to ``rl_report.json``."""
    cfg = run.cfg
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "steps": cfg.steps}
    if run.eval_rows:
        from tether.eval.kl import format_kl_report, measure_kl
        from tether.training import merged_copy

        before = json.loads((out_dir / "eval_before.json").read_text())
        after = held_out_reward(run, run.policy)
        deltas = [a - b for a, b in zip(after["scores"], before["scores"])]
        report.update(reward_before={k: v for k, v in before.items() if k != "scores"},
                      reward_after={k: v for k, v in after.items() if k != "scores"},
                      reward_gain=after["reward_mean"] - before["reward_mean"],
                      reward_gain_ci95_halfwidth=mean_ci95(deltas)[1])
        policy, reference = run.policy, run.reference
        if cfg.lora:  # two plain models: adapters merged (policy) and removed (reference), the live model untouched
            policy, reference = merged_copy(run.policy), frozen_copy(run.policy).unload()
        report["kl"] = measure_kl(policy, reference, run.tokenizer, [r["prompt"] for r in run.eval_rows],
                                  samples_per_prompt=cfg.kl_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                  seed=cfg.seed, batch_size=cfg.sample_batch_size, chunk_size=cfg.chunk_size,
                                  progress=cfg.progress)
        print(f"held-out reward: before {before['reward_mean']:.3f} ± {before['reward_ci95_halfwidth']:.3f}, after "
              f"{after['reward_mean']:.3f} ± {after['reward_ci95_halfwidth']:.3f}  (gain {report['reward_gain']:+.3f}"
              f" ± {report['reward_gain_ci95_halfwidth']:.3f}, 95% CI, n={after['n']})")
        print(format_kl_report(report["kl"]))
    report["train_metrics_last"] = metrics[-1] if metrics else {}
    (out_dir / "rl_report.json").write_text(json.dumps(report, indent=2))
    return report
