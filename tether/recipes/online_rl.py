"""Online RL (GRPO and its family) with verifiable or model rewards, readable top to bottom.

    tether rl --config configs/grpo_instructions.yaml [--loss dapo --kl_estimator k2 ...]

One step (:func:`rl_step`), in order, each stage a function over typed records:

1. **Rollout and reward** (:func:`draw`). ``prompts_per_step`` prompts (a seeded permutation of the pool, epoch after
   epoch), ``group_size`` completions each, sampled by the current policy (``tether.sampling``; ``engine: vllm`` on
   GPU machines) and scored by the configured rewards (sandboxed code rewards: a crash is a failed sample); "no
   opinion" (None) is counted and kept out of the loss. Groups without a learning signal — all rewards equal
   (``drop_uniform_groups``, DAPO) or a pass rate outside [``difficulty_low``, ``difficulty_high``] (online
   difficulty filtering) — leave the loss, or are replaced by groups of new prompts for up to ``max_refill_rounds``
   rounds (``tether.group_filter``). Prompts and seeds are functions of (seed, step, round): a resumed run redraws
   the same batch. ``reward_transform`` then maps each reward to its calibrated / CTRL / vBoN transform against the
   reference's own samples for the prompt (``tether.inference.transforms.ReferenceCalibration``).
2. **Score** (``tether.rollout.score``). One no-grad pass of the reference — and of the policy when the step takes
   several updates or shapes the reward — gives per-token log-probs, the exact full-vocabulary KL(π‖π_ref), the
   entropy and what the objective declares (TROLL: the policy's top-K support; the critical-token KL: the
   reference's max log-prob at T'), in chunks, never a batch's logits. With one on-policy update the update pass
   itself provides them (the reference head runs once).
3. **Bonus, KL placement and advantages** (:func:`targets`). ``care_bonus`` adds GRPO-CARE's consistency bonus to
   passing completions. ``kl_placement: reward`` subtracts β·k (k1/k2/k3) from each sequence's reward;
   ``kl_placement: loss`` adds β·``kl_penalty`` in the update. Advantages by GRPO, Dr.GRPO, RLOO, REINFORCE++ or
   GPG; objectives that take raw rewards (GVPO, DisCO, APO, KDRL, A*-PO) use them as they need. β is fixed or adapted
   towards ``target_kl`` from the measured exact sequence KL.
4. **Update** (:func:`update`). ``ppo_epochs`` passes over the batch in ``mini_batches`` seeded mini-batches of
   whole groups, each one optimizer step accumulated over micro-batches of ``micro_batch_size`` rows; the objective
   is called by name through ``tether.losses.policy.ONLINE_OBJECTIVES``, with the inputs its entry declares.
5. **Record.** Reward, exact KL of the policy that sampled, entropy, the objective's and the filter's counts, lengths
   and stage times go to the progress bar, ``metrics.jsonl`` and TensorBoard; atomic checkpoints; ``resume=True``
   continues with exactly the trajectory of an uninterrupted run.

Before the first step and after the last the held-out reward is measured on paired samples (fixed seeds), and at
the end KL(trained ‖ reference) with 95% CIs (``tether.eval.kl``); both go to ``rl_report.json``.

The stages are building blocks of ``tether.online_step``, composed here: what each step computes is decided once per
run (:class:`StepPlan`); the live models, data and optimizer travel in one record (:class:`RLRun`).
The reference is chosen by ``ref_strategy`` (``tether.reference.ReferenceSync``): fixed, a soup of model directories
(SALSA), or moving — WARP's / GRPO-CARE's EMA anchor, ProRL's reset (which also clears the optimizer state),
TR-DPO's soft / hard sync — updated after every ``ref_every``-th optimizer step and checkpointed with the run. A
step's KL terms are to the reference in force at its scoring pass; an update made between the mini-batches of a
step takes effect at the next step. Every step logs ``ref/version``, ``ref/steps_since_sync`` and ``ref/rate``
of that reference, and ``ref/updates`` (updates made during the step). A*-PO (``loss: astar_po``)
first estimates V*(x) of every training prompt from reference samples (``tether.rollout.reference_values``); its
paper samples one completion per prompt and step (``group_size: 1``), a larger G gives G independent samples.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether import distributed
from tether.checkpoints import save_checkpoint
from tether.distributed import Trainable
from tether.group_filter import prompt_schedule  # noqa: F401  (re-exported: the schedule of rl_step's prompts)
from tether.losses.policy import (
    AdaptiveKLController,
    FixedKLController,
)
from tether.models import apply_lora, enable_gradient_checkpointing, load_model, load_tokenizer
from tether.online_step import RLRun, StepPlan, draw, generate, targets, update  # noqa: F401  (generate: re-exported)
from tether.recipes.configs import RLConfig
from tether.reference import frozen_copy, soup_state
from tether.rollout import (
    batch_metrics,
    evaluate_reward,
    reference_values,
    score,
)
from tether.sampling import render_prompts
from tether.tasks.rows import TASK_REWARDS, task_rows
from tether.training import (
    RunLog,
    make_optimizer,
    make_scheduler,
    read_metrics,
    resume_or_fresh,
    save_final,
    start_run,
)


@dataclass(frozen=True)
class RLResult:
    output_dir: Path
    steps: int
    metrics: list[dict]
    report: dict | None = None


# ------------------------------------------------------------------------------------------------------------
# Set-up: data, reward, models, optimizer.
# ------------------------------------------------------------------------------------------------------------


def setup(cfg: RLConfig, *, reward=None, train_rows: list[dict] | None = None) -> RLRun:
    """Load models, data, reward and optimizer. The reference is a frozen copy of the start, another model, or —
    with LoRA — the policy's own base with its adapters off. Gradient checkpointing is enabled before LoRA wraps
    the model (``tether.models.enable_gradient_checkpointing``)."""
    from tether.rewards import build_reward

    if reward is None:
        reward = build_reward(cfg.rewards if cfg.rewards is not None else TASK_REWARDS[cfg.task],
                              reward_model=cfg.reward_model, reward_model_weight=cfg.reward_model_weight,
                              max_new_tokens=cfg.max_new_tokens, overlong_buffer=cfg.overlong_buffer)
    rows, eval_rows = task_rows(cfg.task, prompts_file=cfg.prompts_file, eval_prompts_file=cfg.eval_prompts_file,
                                train_prompts=cfg.train_prompts, eval_prompts=cfg.eval_prompts, seed=cfg.seed)
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
        if cfg.ref_strategy == "soup":  # SALSA: the uniform average of the given models
            reference.load_state_dict(soup_state([load_model(d).state_dict() for d in cfg.ref_soup],
                                                 names=list(cfg.ref_soup)))
    plan = StepPlan.of(cfg)
    teacher = None
    if plan.objective.needs("teacher_logps") and cfg.teacher_model:
        teacher = load_model(cfg.teacher_model).to(cfg.device).eval().requires_grad_(False)
    policy.train()
    _check_distributed(cfg)
    trainable = Trainable(policy)  # DDP / FSDP2 under torchrun; the optimizer then holds this rank's shards
    total_updates = cfg.steps * cfg.ppo_epochs * cfg.mini_batches
    optimizer = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               contiguous_state=not distributed.is_sharded(policy))
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
    prompt_ids = render_prompts(tokenizer, [r["prompt"] for r in train_rows])
    values = None
    if plan.objective.needs("values"):  # A*-PO stage 1, from the starting reference (recomputed alike on resume)
        values, unscored = reference_values(
            reference, tokenizer, prompt_ids, train_rows, reward, samples=cfg.astar_value_samples,
            beta=cfg.astar_value_beta, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, top_k=cfg.top_k, stop_strings=cfg.stop_strings, seed=cfg.seed * 7_907 + 1,
            batch_size=cfg.sample_batch_size, progress=cfg.progress)
        if unscored:
            print(f"A*-PO: {unscored} of {len(train_rows)} prompts had no scored reference sample (V* = 0)")
    return RLRun(cfg, plan, policy, reference, teacher, tokenizer, pad, reward, train_rows, prompt_ids, eval_rows,
                 optimizer, scheduler, kl_ctl, engine, transform, cfg.reference_sync(), values, trainable)


def _check_distributed(cfg: RLConfig) -> None:
    """Refuse, in one line, what multi-process runs do not support."""
    if cfg.distributed == "none":
        return
    if cfg.engine == "vllm":
        raise ValueError(f"engine: vllm with distributed: {cfg.distributed} is not supported; use engine: tether")
    if cfg.distributed == "fsdp2" and (cfg.lora or cfg.reference_sync().moving):
        raise ValueError("distributed: fsdp2 does not support lora or a reference that moves (it reads the policy's "
                         "full weights between steps); use distributed: ddp")


# ------------------------------------------------------------------------------------------------------------
# One step.
# ------------------------------------------------------------------------------------------------------------


def rl_step(run: RLRun, step: int) -> dict[str, float]:
    """One rollout → reward → score → advantage → update cycle; returns the step's metrics."""
    cfg, plan = run.cfg, run.plan
    drawn = draw(run, step)
    batch, seconds, t0 = drawn.batch, dict(drawn.metrics), time.perf_counter()
    if run.reward_transform is not None:  # cfg.reward_transform, applied right after the rewards are computed
        batch = run.reward_transform(batch, drawn.rows, group_size=cfg.group_size,
                                     drop_uniform_groups=cfg.drop_uniform_groups)
        seconds["reward_s"], t0 = seconds["reward_s"] + time.perf_counter() - t0, time.perf_counter()
    with run.trainable.gathered() as policy:  # FSDP2: a plain copy with the full weights, for the no-grad pass
        scores = score(policy, run.reference, batch.rollout, temperature=cfg.temperature,
                       chunk_size=cfg.chunk_size, micro_batch_size=cfg.micro_batch_size,
                       need_policy=not plan.one_update, need_ref_logps=not plan.one_update or plan.care,
                       teacher=run.teacher, share_prompts=cfg.share_prompts, top_k=plan.support_size,
                       ref_max_temperature=plan.ref_max_temperature)
    beta = run.kl_ctl.value
    goals = targets(run, batch, drawn.row_ids, scores, beta)
    seconds["score_s"], t0 = time.perf_counter() - t0, time.perf_counter()
    metrics, seen = update(run, batch, scores, goals, beta, step)
    seconds["update_s"] = time.perf_counter() - t0

    # The exact KL and entropy of the policy that sampled this batch: from the update pass when it was on-policy.
    kl, entropy = (seen["kl"], seen["entropy"]) if plan.one_update else (scores.kl, scores.entropy)
    metrics.update(batch_metrics(batch, kl, entropy), kl_coef=beta, lr=run.scheduler.get_last_lr()[0], **seconds,
                   gen_tokens_per_s=float(batch.rollout.mask.sum()) / max(seconds["gen_s"], 1e-9))
    run.kl_ctl.update(metrics["seq_kl"], n_steps=batch.rollout.size)
    if plan.kl_in_reward:  # β·Σ_t k_t subtracted from each sequence's reward, on average
        shaped_from = batch.rewards if goals.bonus is None else batch.rewards + goals.bonus
        metrics["reward_kl_penalty"] = float((shaped_from - goals.rewards).mean())
    if plan.care:
        metrics["care_bonus"] = float(goals.bonus.mean())
    if not plan.one_update:  # how far the scoring pass is from what the sampler recorded (engine differences)
        mask = batch.rollout.mask
        gap = (batch.rollout.sampler_logps - scores.logps).abs() * mask
        metrics["sampler_logp_gap"] = float(gap.sum()) / max(int(mask.sum()), 1)
    return metrics














# ------------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------------


def held_out_reward(run: RLRun, model) -> dict:
    """Mean held-out reward with the run's fixed evaluation seeds (paired across calls). Under torchrun, rank 0
    evaluates (:func:`_on_main`)."""
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
    moving = {"reference": run.reference} if run.sync.moving else None
    state = resume_or_fresh(out_dir, resume=cfg.resume, model=run.policy, optimizer=run.optimizer,
                            scheduler=run.scheduler, lora=cfg.lora, modules=moving, total=cfg.steps)
    step = 0 if state is None else state["step"]
    if state is not None:
        run.kl_ctl.value = state["extra"]["kl_coef"]
        run.sync.load_state_dict(state["extra"]["reference_sync"])
    log = RunLog(out_dir, total=cfg.steps, start=step, desc=cfg.loss, show=("reward", "token_kl", "loss", "entropy"),
                 finite=("loss", "token_kl", "grad_norm"), save_every=cfg.save_every, stop_after=cfg.stop_after,
                 tensorboard=cfg.tensorboard, progress=cfg.progress)
    if step == 0 and run.eval_rows and (before := _on_main(run, lambda policy: held_out_reward(run, policy))):
        log.log(0, {"eval_reward": before["reward_mean"], "eval_reward_ci95": before["reward_ci95_halfwidth"]})
        (out_dir / "eval_before.json").write_text(json.dumps(before))

    def checkpoint() -> None:
        save_checkpoint(out_dir, step, model=run.policy, tokenizer=run.tokenizer, optimizer=run.optimizer,
                        scheduler=run.scheduler, modules=moving,
                        extra={"kl_coef": run.kl_ctl.value, "reference_sync": run.sync.state_dict()})

    while step < cfg.steps:
        in_force = run.sync.metrics()  # the reference this step's scoring pass uses
        row = {**rl_step(run, step), **in_force}
        step += 1
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and run.eval_rows and (
                mid := _on_main(run, lambda policy: held_out_reward(run, policy))):
            row["eval_reward"] = mid["reward_mean"]
        if log.end_step(step, row, checkpoint=checkpoint):
            break
    log.close()
    result = RLResult(out_dir, step, read_metrics(out_dir))
    if step < cfg.steps:
        return result
    save_final(run.policy, run.tokenizer, out_dir / "final", lora=cfg.lora)
    report = _on_main(run, lambda policy: final_report(run, out_dir, result.metrics, policy))
    return dataclasses.replace(result, report=report)


def _on_main(run: RLRun, fn):
    """``fn(policy)`` on rank 0 (None elsewhere), with the policy's full weights (every rank enters ``gathered``
    together; the others wait at the barrier)."""
    with run.trainable.gathered() as policy:
        out = fn(policy) if run.trainable.dist.main else None
    distributed.barrier()
    return out


def final_report(run: RLRun, out_dir: Path, metrics: list[dict], policy=None) -> dict:
    """Held-out reward before and after (paired, with the CI of the gain) and KL(trained ‖ reference) with CIs
    (with a moving or soup reference: KL to the starting model); written to ``rl_report.json``."""
    cfg = run.cfg
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "steps": cfg.steps}
    if run.eval_rows:
        from tether.eval.kl import format_kl_report, measure_kl
        from tether.eval.reward import format_reward_gain, reward_gain
        from tether.training import merged_copy

        before = json.loads((out_dir / "eval_before.json").read_text())
        policy = run.policy if policy is None else policy  # under FSDP2: the gathered plain copy
        report.update(reward_gain(before, held_out_reward(run, policy)))
        # A moving reference (ema, reset, trdpo_*) ends wherever its last update put it — after a hard sync, at the
        # final policy itself — and a soup is not where the policy started: the report's KL is to the starting
        # model for both, as in tether dpo's report (how far training moved the model).
        reference = load_model(cfg.model).to(cfg.device).eval() if cfg.ref_strategy != "fixed" else run.reference
        if cfg.lora:  # two plain models: adapters merged (policy) and removed (reference), the live model untouched
            policy, reference = merged_copy(run.policy), frozen_copy(run.policy).unload()
        report["kl"] = measure_kl(policy, reference, run.tokenizer, [r["prompt"] for r in run.eval_rows],
                                  samples_per_prompt=cfg.kl_samples_per_prompt, max_new_tokens=cfg.max_new_tokens,
                                  seed=cfg.seed, batch_size=cfg.sample_batch_size, chunk_size=cfg.chunk_size,
                                  progress=cfg.progress)
        print(format_reward_gain(report))
        print(format_kl_report(report["kl"]))
    report["train_metrics_last"] = metrics[-1] if metrics else {}
    (out_dir / "rl_report.json").write_text(json.dumps(report, indent=2))
    return report
