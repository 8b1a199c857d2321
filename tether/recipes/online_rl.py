"""Online RL (GRPO and its family) with verifiable or model rewards, readable top to bottom.

    tether rl --config configs/grpo_instructions.yaml [--loss dapo --kl_estimator k2 ...]

One step, in order:

1. **Rollout.** ``prompts_per_step`` prompts (a seeded permutation of the pool, epoch after epoch), ``group_size``
   completions each, sampled with the KV cache by the current policy (``tether.sampling``; ``engine: vllm`` on GPU
   machines). Sampling seeds are a function of (seed, step), so a resumed run draws the same completions.
2. **Reward.** Each completion is scored by the configured rewards (``(prompt, completion, row) → float | None``);
   "no opinion" (None) completions are counted and excluded from the loss. Code-executing rewards run sandboxed:
   a timeout or crash is a failed sample, never a failed run.
3. **Score.** One no-grad pass of the reference (and of the policy when the step takes several updates) gives
   per-token log-probs of policy, old policy and reference, the exact full-vocabulary KL(π‖π_ref) per token and
   the entropy — the exact KL is logged every step, whatever estimator drives the gradient.
4. **KL placement.** ``kl_placement: reward`` subtracts β·k (k1/k2/k3 of the sampler's log-probs) from each
   sequence's reward before advantages; ``kl_placement: loss`` adds β·``kl_penalty`` (k1/k2/k3/k3_is/exact,
   importance-weighted when mini-batches are off-policy) to the loss. β is fixed or adapted towards
   ``target_kl`` (``AdaptiveKLController``, fed the measured exact sequence KL).
5. **Advantage.** GRPO, Dr.GRPO, RLOO, REINFORCE++ or GPG (``tether.losses.policy.advantages``); GVPO/DisCO/APO/KDRL
   normalise rewards within their groups themselves.
6. **Update.** ``ppo_epochs`` passes over the batch in ``mini_batches`` seeded mini-batches (whole groups), each
   one optimizer step (AdamW, warm-up + schedule, clipping), accumulated over micro-batches of
   ``micro_batch_size`` sequences; log-probs come from the chunked LM head (``tether.logprobs``).
   Scoring and update passes run each group's prompt through the backbone once (``tether.prefix``).
7. **Record.** Metrics (reward, exact KL, estimator value, entropy, clip fraction, lengths, timings of
   generation / scoring / update) to the progress bar, ``metrics.jsonl`` and TensorBoard; atomic checkpoints;
   ``resume=True`` continues with exactly the trajectory of an uninterrupted run.

Before the first step and after the last, the mean reward on held-out prompts is measured with fixed sampling
seeds (paired, so the difference has a small CI), and at the end the KL(trained ‖ reference) on those prompts
(``tether.eval.kl``); both go to ``rl_report.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from tether.eval import mean_ci95
from tether.logprobs import IGNORE_INDEX, hidden_states, lm_head, token_stats
from tether.losses import AGG_MODES, AdaptiveKLController, FixedKLController, kl_in_reward, kl_penalty
from tether.losses.policy import ONLINE_OBJECTIVES, call_objective, objective_agg_mode
from tether.losses.policy import advantages as adv
from tether.models import (
    apply_lora,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
)
from tether.prefix import shared_prefix_hidden_states
from tether.reference import frozen_copy, reference_context
from tether.sampling import Completions, render_prompts, sample
from tether.training import (
    MetricsLogger,
    latest_checkpoint,
    load_module_state,
    load_trainer_state,
    load_weights,
    make_optimizer,
    make_scheduler,
    read_metrics,
    release_freed_memory,
    remove_checkpoints,
    save_checkpoint,
    save_pretrained_atomic,
    set_seed,
)

ADVANTAGES = ("grpo", "drgrpo", "rloo", "reinforce_pp", "gpg")
REWARD_NAMES = ("instructions", "math", "format", "code")
TASK_REWARDS = {"instructions": {"instructions": 1.0}, "arithmetic": {"math": 1.0}}


@dataclass
class RLConfig:
    """Online RL with group sampling: `tether rl --config x.yaml [--field value ...]`."""

    output_dir: str = "runs/rl"
    """Where checkpoints, metrics.jsonl, TensorBoard logs, the final model and rl_report.json go."""
    model: str = "smollm2-135m-instruct"
    """Policy to train: 'smollm2-135m-instruct' (embedded) or a local Hugging Face model directory."""
    ref_model: str | None = None
    """Reference model (a local directory); None = the starting policy (a frozen copy, or LoRA's base)."""
    teacher_model: str | None = None
    """KDRL's teacher (a local directory); None = the reference."""
    task: Literal["instructions", "arithmetic"] = "instructions"
    """Generated task when prompts_file is not set: IFEval-style instructions, or small arithmetic word problems."""
    prompts_file: str | None = None
    """Training prompts: JSONL/Parquet/datasets rows with 'prompt' (string or chat messages) plus whatever the
    rewards read (e.g. 'answer', 'constraints', 'tests')."""
    eval_prompts_file: str | None = None
    """Held-out prompts (same format); None with a generated task = its held-out split."""
    train_prompts: int = 256
    """Size of the generated training pool."""
    eval_prompts: int = 32
    """Size of the generated held-out set (0 disables held-out evaluation)."""
    rewards: dict[str, float] | None = None
    """Reward components and weights, combined as a weighted mean: instructions, math, format, code. None = the
    task's rule reward."""
    reward_model: str | None = None
    """A local sequence-classification model directory added as a reward component 'reward_model'."""
    reward_model_weight: float = 1.0
    """Weight of the reward model in the combination."""
    overlong_buffer: int = 0
    """DAPO's soft overlong penalty over the last N tokens before max_new_tokens (added to the reward; 0 = off)."""
    loss: str = "grpo"
    """Objective by name: ppo_clip, grpo, dapo, gpg, cpgd, rpg, archer, gvpo, disco, apo, kdrl."""
    loss_args: dict[str, float | int | str | bool] = field(default_factory=dict)
    """Hyperparameters of the objective, by keyword (e.g. {clip_eps_high: 0.28}, {beta: 0.1}); checked against its
    signature."""
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp", "gpg"] | None = None
    """Advantage estimator; None = the objective's default (GPG: gpg, others: grpo)."""
    kl_coef: float | None = None
    """β of the KL to the reference; None = the objective's default (GRPO 0.04, others 0)."""
    kl_estimator: Literal["k1", "k2", "k3", "k3_is", "exact"] = "k3"
    """Which KL estimate carries the gradient (value and gradient of each: tether.kl, tether.losses.kl_penalty)."""
    kl_placement: Literal["loss", "reward"] = "loss"
    """Put β·k in the loss, or subtract it from the reward (k1/k2/k3 only)."""
    kl_importance_weight: bool = True
    """In the loss, weight k1/k2/k3 by sg(π/π_old) so off-policy mini-batches keep the on-policy gradient."""
    target_kl: float | None = None
    """Adapt β towards this sequence-level KL (nats per completion); None = fixed β."""
    kl_horizon: float = 10000.0
    """Adaptive controller horizon (in sequences)."""
    steps: int = 20
    """RL steps (rollout + updates)."""
    prompts_per_step: int = 4
    """Prompts per rollout."""
    group_size: int = 8
    """Completions per prompt (G)."""
    max_new_tokens: int = 48
    """Length limit of each completion (and Dr. GRPO's constant normaliser)."""
    temperature: float = 1.0
    """Sampling temperature (also used to compute the policy's log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    stop_strings: list[str] = field(default_factory=list)
    """Completions end at the first of these (kept in the completion)."""
    engine: Literal["tether", "hf", "vllm"] = "tether"
    """Rollout engine: tether's KV-cache loop, transformers' generate, or vLLM (GPU machines, optional extra)."""
    sample_batch_size: int = 64
    """Completions generated together."""
    drop_uniform_groups: bool = False
    """DAPO dynamic sampling (without refill): groups whose rewards are all equal leave the loss (counted)."""
    ppo_epochs: int = 1
    """Passes over each rollout batch."""
    mini_batches: int = 1
    """Optimizer steps per pass (the batch is split into this many mini-batches of whole groups)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward (memory knob; does not change the gradient)."""
    lr: float = 1e-6
    """Peak learning rate."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up."""
    warmup_ratio: float = 0.0
    """Fraction of optimizer steps of linear warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay (not applied to biases/norms)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    lora: bool = False
    """Train LoRA adapters; the reference is then the base with adapters off."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling α."""
    ref_reset_every: int = 0
    """ProRL-style reference reset: copy the policy into the reference every N steps (0 = never)."""
    chunk_size: int = 512
    """Response tokens per chunk of the LM head (memory ∝ chunk_size × vocab)."""
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass (less memory, one more forward pass)."""
    share_prompts: bool = True
    """Run each group's prompt through the backbone once in the scoring and update passes (same values and gradients
    as running it for every completion; ``tether.prefix``). Ignored under gradient checkpointing."""
    device: str = "cpu"
    """Where the models live ('cpu' or 'cuda')."""
    seed: int = 0
    """Seeds prompt order, sampling and everything random."""
    eval_samples_per_prompt: int = 4
    """Completions per held-out prompt for the reward before/after."""
    eval_every: int = 0
    """Also measure the held-out reward every N steps (0 = only before and after)."""
    kl_samples_per_prompt: int = 4
    """Completions per held-out prompt for the final KL measurement (temperature 1)."""
    save_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    stop_after: int | None = None
    """Stop (as if interrupted) after this step, after checkpointing."""
    tensorboard: bool = True
    """Also log metrics to TensorBoard (output_dir/tensorboard)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        if self.loss not in ONLINE_OBJECTIVES:
            raise ValueError(f"loss: unknown objective {self.loss!r}; choose one of {sorted(ONLINE_OBJECTIVES)}")
        spec = ONLINE_OBJECTIVES[self.loss]
        params = inspect.signature(spec.fn).parameters
        reserved = {"ref_logps", "entropy", "logits", "group_size", "max_len", "kl_coef", "kl_estimator",
                    "kl_importance_weight", "token_kl"}
        allowed = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - reserved
        unknown = set(self.loss_args) - allowed
        if unknown:
            raise ValueError(f"loss_args: {sorted(unknown)} are not hyperparameters of {self.loss!r}; it accepts "
                             f"{sorted(allowed)} (the KL term is set by kl_coef / kl_estimator / kl_placement)")
        for key in ("agg", "loss_agg_mode"):
            if key in self.loss_args and self.loss_args[key] not in AGG_MODES:
                raise ValueError(f"loss_args.{key}: {self.loss_args[key]!r} is not one of {AGG_MODES}")
        if spec.own_kl and self.kl_coef:
            raise ValueError(f"kl_coef: {self.loss!r} carries its own KL term (set its β in loss_args); "
                             "leave kl_coef unset or 0")
        if self.kl_placement == "reward" and self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"kl_estimator: {self.kl_estimator!r} cannot be placed in the reward; use k1, k2 or "
                             "k3 there (k1 gives the exact sequence-level reverse-KL gradient)")
        for name in (self.rewards or {}):
            if name not in REWARD_NAMES:
                raise ValueError(f"rewards: unknown reward {name!r}; choose from {REWARD_NAMES} (or reward_model)")
        for name, value, ok in (("steps", self.steps, self.steps >= 1),
                                ("prompts_per_step", self.prompts_per_step, self.prompts_per_step >= 1),
                                ("group_size", self.group_size, self.group_size >= 2),
                                ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1),
                                ("ppo_epochs", self.ppo_epochs, self.ppo_epochs >= 1),
                                ("mini_batches", self.mini_batches,
                                 1 <= self.mini_batches <= self.prompts_per_step),
                                ("micro_batch_size", self.micro_batch_size, self.micro_batch_size >= 1),
                                ("lr", self.lr, self.lr > 0),
                                ("kl_coef", self.kl_coef, self.kl_coef is None or self.kl_coef >= 0),
                                ("target_kl", self.target_kl, self.target_kl is None or self.target_kl > 0),
                                ("temperature", self.temperature, self.temperature > 0),
                                ("overlong_buffer", self.overlong_buffer,
                                 0 <= self.overlong_buffer < self.max_new_tokens)):
            if not ok:
                raise ValueError(f"{name}={value!r} is out of range; see `tether rl --help` for its meaning")
        if self.prompts_per_step % self.mini_batches:
            raise ValueError(f"mini_batches={self.mini_batches} must divide prompts_per_step="
                             f"{self.prompts_per_step} (mini-batches hold whole groups)")
        if self.ref_reset_every and self.lora:
            raise ValueError("ref_reset_every needs full fine-tuning: with LoRA the reference is the frozen base")

    @property
    def beta(self) -> float:
        """The initial KL coefficient: kl_coef, or the objective's default."""
        return ONLINE_OBJECTIVES[self.loss].default_kl_coef if self.kl_coef is None else self.kl_coef

    @property
    def advantage_name(self) -> str:
        return self.advantage or ONLINE_OBJECTIVES[self.loss].default_advantage


@dataclass
class RLResult:
    output_dir: Path
    steps: int
    metrics: list[dict]
    report: dict | None = None


# ------------------------------------------------------------------------------------------------------------
# Prompts and rewards.
# ------------------------------------------------------------------------------------------------------------


def load_prompt_rows(path: str | Path) -> list[dict]:
    """Rows with a usable 'prompt' (string or chat messages); a bad row stops with file, row and field named."""
    from tether.data import load_rows

    rows = load_rows(path)
    for i, row in enumerate(rows):
        prompt = row.get("prompt") if isinstance(row, dict) else None
        ok = (isinstance(prompt, str) and prompt.strip()) or (
            isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt))
        if not ok:
            problem = getattr(row, "problem", None) or "missing, empty, or neither a string nor a message list"
            raise ValueError(f"{path}: row {i}: field 'prompt': {problem}; every row needs a prompt")
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _task_rows(cfg: RLConfig) -> tuple[list[dict], list[dict]]:
    from tether.tasks import make_instruction_prompts
    from tether.tasks.arithmetic import make_arithmetic_prompts

    make = make_instruction_prompts if cfg.task == "instructions" else make_arithmetic_prompts
    train_rows = load_prompt_rows(cfg.prompts_file) if cfg.prompts_file else make(cfg.train_prompts, seed=cfg.seed,
                                                                                     split="train")
    if cfg.eval_prompts_file:
        eval_rows = load_prompt_rows(cfg.eval_prompts_file)
    elif cfg.prompts_file or cfg.eval_prompts == 0:
        eval_rows = []
    else:
        eval_rows = make(cfg.eval_prompts, seed=cfg.seed, split="heldout")
    return train_rows, eval_rows


def build_reward(cfg: RLConfig):
    """The configured reward: one component, or their weighted mean; plus DAPO's overlong shaping if enabled."""
    from tether.rewards import (
        CodeTestReward,
        InstructionFollowingReward,
        MathAnswerReward,
        OverlongPenalty,
        RewardModel,
        TagFormatReward,
        weighted_sum,
    )

    makers = {"instructions": InstructionFollowingReward, "math": MathAnswerReward, "format": TagFormatReward,
              "code": CodeTestReward}
    weights = dict(cfg.rewards if cfg.rewards is not None else TASK_REWARDS[cfg.task])
    components = {name: (makers[name](), float(w)) for name, w in weights.items()}
    if cfg.reward_model:
        components["reward_model"] = (RewardModel(cfg.reward_model), cfg.reward_model_weight)
    if not components:
        raise ValueError("rewards: no reward configured")
    reward = weighted_sum(components, renormalize=True)
    if cfg.overlong_buffer:
        reward = weighted_sum({"task": (reward, 1.0),
                               "overlong": (OverlongPenalty(cfg.max_new_tokens, cfg.overlong_buffer), 1.0)},
                              renormalize=False)
    return reward


def score_completions(reward, rows: list[dict], done: Completions) -> list[float | None]:
    """Reward of every completion (None = no opinion). The row is the reward's metadata, plus the completion's
    token count for length shaping."""
    return [reward(rows[i]["prompt"] if isinstance(rows[i]["prompt"], str) else rows[i]["prompt"][-1]["content"],
                   text, {**rows[i], "completion_tokens": len(ids)})
            for i, text, ids in zip(done.prompt_index, done.texts, done.completion_ids)]


def evaluate_reward(model, tokenizer, rows: list[dict], reward, cfg: RLConfig) -> dict:
    """Mean held-out reward (95% CI) with fixed sampling seeds, so two models are compared on paired draws."""
    done = sample(model, tokenizer, render_prompts(tokenizer, [r["prompt"] for r in rows]),
                  n=cfg.eval_samples_per_prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  top_p=cfg.top_p, top_k=cfg.top_k, stop_strings=cfg.stop_strings, seed=cfg.seed + 7919,
                  batch_size=cfg.sample_batch_size, progress=cfg.progress, desc="held-out reward")
    scores = [0.0 if s is None else float(s) for s in score_completions(reward, rows, done)]
    mean, half = mean_ci95(scores)
    return {"reward_mean": mean, "reward_ci95_halfwidth": half, "n": len(scores), "scores": scores}


# ------------------------------------------------------------------------------------------------------------
# Rollout batch: token tensors, rewards, per-token statistics.
# ------------------------------------------------------------------------------------------------------------


def collate_rollouts(done: Completions, pad_token_id: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Right-padded (B, T) prompt+completion ids, attention mask, next-token labels (completion tokens only), the
    (B, T) response mask aligned with the labels, and per row its prompt length and group (the prompt's index)."""
    rows = list(zip(done.prompt_ids, done.completion_ids))
    T = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for r, (p, c) in enumerate(rows):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        attn[r, :len(p) + len(c)] = 1
        if c:
            labels[r, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "labels": labels.to(device),
            "mask": (labels != IGNORE_INDEX).to(device),
            "prompt_len": torch.tensor([len(p) for p in done.prompt_ids], device=device),
            "group": torch.tensor(done.prompt_index, device=device)}


def backbone_states(model, mb: dict[str, Any], share_prompts: bool, *,
                    embedding_grad_in_place: bool = False) -> torch.Tensor:
    """(B, T, H) final hidden states of a rollout micro-batch: each group's prompt run once when ``share_prompts``
    (``tether.prefix``), else every row in full. Both give the same values and gradients at every labelled
    position. ``embedding_grad_in_place``: see ``tether.logprobs.hidden_states`` (the update's ``.backward()``)."""
    if share_prompts:
        return shared_prefix_hidden_states(model, mb["input_ids"], mb["attention_mask"], mb["prompt_len"],
                                           mb["group"], embedding_grad_in_place=embedding_grad_in_place)
    return hidden_states(model, mb["input_ids"], mb["attention_mask"], embedding_grad_in_place=embedding_grad_in_place)


def _rows(batch: dict[str, Any], idx: torch.Tensor) -> dict[str, Any]:
    """The sub-batch of rows ``idx``, trimmed to its longest sequence."""
    sub = {k: v[idx] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and
           v.shape[0] == batch["input_ids"].shape[0]}
    width = int(sub["attention_mask"].sum(-1).max())
    return {k: (v[:, :width] if v.dim() >= 2 else v) for k, v in sub.items()}


@torch.no_grad()
def score_rollouts(policy, reference, batch: dict, *, temperature: float, chunk_size: int, micro_batch_size: int,
                   need_policy: bool, teacher=None, share_prompts: bool = True,
                   ref_logps: bool = True) -> dict[str, torch.Tensor]:
    """No-grad per-token statistics of a rollout batch: reference log-probs, and — when ``need_policy`` — the
    policy's log-probs (the "old" policy of the coming updates), its entropy and the exact KL(π‖π_ref) per token.
    The reference's final hidden states are kept (``ref_hidden``) for the update pass, which computes the exact
    KL — and, with ``ref_logps=False`` (one on-policy update), the reference log-probs too, so the reference's
    LM head runs once per step."""
    B = batch["input_ids"].shape[0]
    out: dict[str, list[torch.Tensor]] = {}
    w, b = lm_head(policy)
    for start in range(0, B, micro_batch_size):
        idx = torch.arange(start, min(B, start + micro_batch_size), device=batch["input_ids"].device)
        mb = _rows(batch, idx)
        with reference_context(reference):
            ref_hidden = backbone_states(reference, mb, share_prompts)
            rw, rb = lm_head(reference)
        pieces = {"ref_hidden": ref_hidden}
        if need_policy:
            hidden = backbone_states(policy, mb, share_prompts)
            pieces.update(token_stats(hidden, w, mb["labels"], bias=b, ref_hidden=ref_hidden, ref_weight=rw,
                                      ref_bias=rb, stats=("logps", "ref_logps", "kl", "entropy"),
                                      chunk_size=chunk_size, temperature=temperature))
        elif ref_logps:
            pieces["ref_logps"] = token_stats(ref_hidden, rw, mb["labels"], bias=rb, chunk_size=chunk_size,
                                              temperature=temperature)["logps"]
        if teacher is not None:
            with reference_context(teacher):
                tw, tb = lm_head(teacher)
                th = backbone_states(teacher, mb, share_prompts)
                pieces["teacher_logps"] = token_stats(th, tw, mb["labels"], bias=tb, chunk_size=chunk_size,
                                                      temperature=temperature)["logps"]
        for k, v in pieces.items():
            out.setdefault(k, []).append(v)
    width = batch["input_ids"].shape[1]
    return {k: torch.cat([torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1]))
                          for v in vs]) for k, vs in out.items()}


def compute_advantages(name: str, rewards: torch.Tensor, mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) sequence advantages (group estimators) or (B, T) token advantages (REINFORCE++)."""
    if name == "grpo":
        return adv.grpo_advantages(rewards, group_size=group_size)
    if name == "drgrpo":
        return adv.drgrpo_advantages(rewards, group_size=group_size)
    if name == "rloo":
        return adv.rloo_advantages(rewards, group_size=group_size)
    if name == "gpg":
        return adv.gpg_advantages(rewards, group_size=group_size)
    if name == "reinforce_pp":
        return adv.reinforce_pp_advantages(rewards, mask)
    raise ValueError(f"advantage: unknown estimator {name!r}; choose one of {ADVANTAGES}")


def _fill_no_opinion(raw: list[float | None], group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards as a tensor where None is replaced by its group's mean of the scored completions (so it adds nothing
    to the group statistics' centre), and the bool mask of scored completions."""
    scored = torch.tensor([r is not None for r in raw])
    values = torch.tensor([0.0 if r is None else float(r) for r in raw], dtype=torch.float32)
    for g in range(0, len(raw), group_size):
        sl = slice(g, g + group_size)
        if scored[sl].any():
            values[sl] = torch.where(scored[sl], values[sl], values[sl][scored[sl]].mean())
    return values, scored


# ------------------------------------------------------------------------------------------------------------
# The recipe.
# ------------------------------------------------------------------------------------------------------------


def _prompt_schedule(n_rows: int, step: int, cfg: RLConfig) -> list[int]:
    """Row indices of step ``step``'s prompts: consecutive slices of seeded permutations, epoch after epoch."""
    out = []
    position = step * cfg.prompts_per_step
    while len(out) < cfg.prompts_per_step:
        epoch, offset = divmod(position, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(cfg.seed * 7_919 + epoch)).tolist()
        take = perm[offset:offset + cfg.prompts_per_step - len(out)]
        out += take
        position += len(take)
    return out


def _update_weights(cfg: RLConfig, batch: dict, agg: str) -> list[tuple[torch.Tensor, float]]:
    """Micro-batches of one mini-batch and the share each contributes to the mini-batch loss."""
    idx_all = batch["mini_idx"]
    spec = ONLINE_OBJECTIVES[cfg.loss]
    size = cfg.micro_batch_size if spec.splittable else len(idx_all)
    size = max(cfg.group_size, size - size % cfg.group_size)  # whole groups per micro-batch
    pieces = [idx_all[i:i + size] for i in range(0, len(idx_all), size)]
    mask = batch["loss_mask"]
    if agg == "token-mean":
        total = float(mask[idx_all].sum().clamp(min=1))
        return [(p, float(mask[p].sum()) / total) for p in pieces]
    total = float((mask[idx_all].sum(-1) > 0).sum().clamp(min=1))
    return [(p, float((mask[p].sum(-1) > 0).sum()) / total) for p in pieces]


def train(cfg: RLConfig, *, reward=None) -> RLResult:
    """Run the recipe. ``reward`` (a callable ``(prompt, completion, row) -> float | None``) replaces the configured
    rewards — for rewards defined in Python."""
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    set_seed(cfg.seed)
    spec = ONLINE_OBJECTIVES[cfg.loss]
    agg = objective_agg_mode(cfg.loss, cfg.loss_args)
    reward = reward if reward is not None else build_reward(cfg)
    train_rows, eval_rows = _task_rows(cfg)

    # Models: the policy, its reference (frozen copy of the start, another model, or LoRA's base), a teacher.
    tokenizer = load_tokenizer(cfg.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy = load_model(cfg.model).to(cfg.device)
    if cfg.lora:
        reference = policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha)
    else:
        reference = load_model(cfg.ref_model).to(cfg.device).eval() if cfg.ref_model else frozen_copy(policy)
        reference.requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    teacher = None
    if "teacher_logps" in spec.needs:
        teacher = load_model(cfg.teacher_model).to(cfg.device).eval() if cfg.teacher_model else reference
    policy.train()
    prompt_ids = render_prompts(tokenizer, [r["prompt"] for r in train_rows])

    # Optimizer and schedule: one optimizer step per mini-batch.
    total_updates = cfg.steps * cfg.ppo_epochs * cfg.mini_batches
    optimizer = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(optimizer, schedule=cfg.schedule, warmup_steps=int(cfg.warmup_ratio * total_updates),
                               total_steps=total_updates)
    kl_ctl = (AdaptiveKLController(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl
              else FixedKLController(cfg.beta))
    engine = None
    if cfg.engine == "vllm":
        from tether.sampling.vllm import VLLMEngine

        start_dir = out_dir / "start"
        save_pretrained_atomic(policy.merge_and_unload() if cfg.lora else policy, tokenizer, start_dir)
        engine = VLLMEngine(str(start_dir), seed=cfg.seed)

    step = 0
    if cfg.resume and (ckpt := latest_checkpoint(out_dir)) is not None:
        load_weights(policy, ckpt, lora=cfg.lora)
        state = load_trainer_state(ckpt, optimizer=optimizer, scheduler=scheduler)
        step = state["step"]
        kl_ctl.value = state["extra"]["kl_coef"]
        if cfg.ref_reset_every:
            load_module_state(reference, ckpt, "reference")
        print(f"resumed from {ckpt} at step {step}/{cfg.steps}")
    elif removed := remove_checkpoints(out_dir):
        print(f"fresh run: removed the checkpoints of an earlier run in {out_dir / 'checkpoints'} "
              f"({', '.join(removed)}); resume=True continues a run instead")
    logger = MetricsLogger(out_dir, resume_step=step, tensorboard=cfg.tensorboard)

    if step == 0 and eval_rows:
        before = evaluate_reward(policy, tokenizer, eval_rows, reward, cfg)
        logger.log(0, {"eval_reward": before["reward_mean"], "eval_reward_ci95": before["reward_ci95_halfwidth"]})
        (out_dir / "eval_before.json").write_text(json.dumps(before))

    bar = tqdm(total=cfg.steps, initial=step, desc=cfg.loss, disable=not cfg.progress, dynamic_ncols=True)
    while step < cfg.steps:
        row = rl_step(cfg, step, policy=policy, reference=reference, teacher=teacher, tokenizer=tokenizer, pad=pad,
                      train_rows=train_rows, prompt_ids=prompt_ids, reward=reward, optimizer=optimizer,
                      scheduler=scheduler, kl_ctl=kl_ctl, agg=agg, engine=engine)
        step += 1
        if cfg.ref_reset_every and step % cfg.ref_reset_every == 0:
            reference.load_state_dict(policy.state_dict())
            row["ref_reset"] = 1.0
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps and eval_rows:
            row["eval_reward"] = evaluate_reward(policy, tokenizer, eval_rows, reward, cfg)["reward_mean"]
        logger.log(step, row)
        bar.set_postfix({k: f"{row[k]:.3g}" for k in ("reward", "token_kl", "loss", "entropy") if k in row})
        bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps or step == cfg.stop_after:
            save_checkpoint(out_dir, step, model=policy, tokenizer=tokenizer, optimizer=optimizer,
                            scheduler=scheduler, extra={"kl_coef": kl_ctl.value},
                            modules={"reference": reference} if cfg.ref_reset_every else None)
        if cfg.stop_after is not None and step >= cfg.stop_after and step < cfg.steps:
            print(f"stopped after step {step} (stop_after); continue with resume=True")
            break
    bar.close()
    logger.close()
    result = RLResult(out_dir, step, read_metrics(out_dir))
    if step < cfg.steps:
        return result

    final = out_dir / "final"
    save_pretrained_atomic(policy.merge_and_unload() if cfg.lora else policy, tokenizer, final)
    result.report = _final_report(cfg, policy, reference, tokenizer, eval_rows, reward, out_dir, result.metrics)
    return result


def rl_step(cfg: RLConfig, step: int, *, policy, reference, teacher, tokenizer, pad: int, train_rows, prompt_ids,
            reward, optimizer, scheduler, kl_ctl, agg: str, engine=None) -> dict[str, float]:
    """One rollout → reward → score → advantage → updates cycle; returns the step's metrics."""
    spec = ONLINE_OBJECTIVES[cfg.loss]
    G = cfg.group_size
    # 1. Rollout.
    t0 = time.perf_counter()
    chosen = _prompt_schedule(len(train_rows), step, cfg)
    rows = [train_rows[i] for i in chosen]
    ids = [prompt_ids[i] for i in chosen]
    kwargs = dict(n=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                  top_k=cfg.top_k, stop_strings=cfg.stop_strings, seed=cfg.seed * 100_003 + step)
    if engine is not None:
        engine.sync_weights(policy)
        done = engine.sample(ids, **kwargs)
    else:
        done = sample(policy, tokenizer, ids, batch_size=cfg.sample_batch_size, engine=cfg.engine, **kwargs)
    t_gen = time.perf_counter() - t0

    # 2. Reward.
    t0 = time.perf_counter()
    raw = score_completions(reward, rows, done)
    rewards, scored = _fill_no_opinion(raw, G)
    batch = collate_rollouts(done, pad, cfg.device)
    mask = batch["mask"]
    loss_rows = scored.clone()
    uniform = rewards.view(-1, G).std(dim=1) == 0
    if cfg.drop_uniform_groups:
        loss_rows &= ~uniform.repeat_interleave(G)
    batch["loss_mask"] = mask & loss_rows.to(mask.device)[:, None]
    t_reward = time.perf_counter() - t0

    # 3. Score: reference (always), old policy (when updates go off-policy or the KL is in the reward).
    t0 = time.perf_counter()
    on_policy_single = cfg.ppo_epochs == 1 and cfg.mini_batches == 1 and cfg.kl_placement == "loss"
    stats = score_rollouts(policy, reference, batch, temperature=cfg.temperature, chunk_size=cfg.chunk_size,
                           micro_batch_size=cfg.micro_batch_size, need_policy=not on_policy_single,
                           teacher=teacher if "teacher_logps" in spec.needs else None, share_prompts=cfg.share_prompts,
                           ref_logps=not on_policy_single)
    beta = kl_ctl.value

    # 4-5. KL in the reward (from the sampler's log-probs) and advantages.
    shaped = rewards
    token_rewards = None
    if cfg.kl_placement == "reward" and beta > 0:
        token_rewards = kl_in_reward(rewards.to(mask.device), stats["logps"], stats["ref_logps"], mask, coef=beta,
                                     estimator=cfg.kl_estimator)
        shaped = token_rewards.sum(-1).cpu()
    advantages = None
    if spec.takes == "advantages":
        source = token_rewards if (cfg.advantage_name == "reinforce_pp" and token_rewards is not None) else shaped
        advantages = compute_advantages(cfg.advantage_name, source.to(mask.device), mask, G)
    t_score = time.perf_counter() - t0

    # 6. Updates.
    t0 = time.perf_counter()
    metric_sums: dict[str, float] = {}
    n_updates = 0
    weight, bias = lm_head(policy)
    need_stats = ["logps"] + (["entropy"] if "entropy" in spec.needs else [])
    exact_in_loss = cfg.kl_placement == "loss" and cfg.kl_estimator == "exact" and beta > 0
    if on_policy_single or exact_in_loss:
        need_stats.append("kl")
    if on_policy_single:  # the reference log-probs come from this pass's reference head (see score_rollouts)
        need_stats.append("ref_logps")
    n_groups = len(rows)
    per_mini = n_groups // cfg.mini_batches
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n_groups, generator=torch.Generator().manual_seed(cfg.seed * 31 + step * 1009 + epoch))
        for m in range(cfg.mini_batches):
            groups = order[m * per_mini:(m + 1) * per_mini]
            batch["mini_idx"] = (groups[:, None] * G + torch.arange(G)).reshape(-1)
            for idx, share in _update_weights(cfg, batch, agg):
                mb = _rows(batch, idx.to(mask.device))
                width = mb["input_ids"].shape[1]
                hidden = backbone_states(policy, mb, cfg.share_prompts, embedding_grad_in_place=True)
                ref_kw = {}
                if "kl" in need_stats:
                    rw, rb = lm_head(reference)
                    ref_kw = dict(ref_hidden=stats["ref_hidden"][idx, :width], ref_weight=rw, ref_bias=rb)
                tok = token_stats(hidden, weight, mb["labels"], bias=bias, stats=need_stats,
                                  chunk_size=cfg.chunk_size, temperature=cfg.temperature, **ref_kw)
                logps = tok["logps"]
                old = logps.detach() if on_policy_single else stats["logps"][idx, :width]
                ref_logps = tok["ref_logps"] if on_policy_single else stats["ref_logps"][idx, :width]
                loss_mask = mb["loss_mask"]
                inputs = {"ref_logps": ref_logps, "entropy": tok.get("entropy")}
                if "teacher_logps" in stats:
                    inputs["teacher_logps"] = stats["teacher_logps"][idx, :width]
                a = None if advantages is None else (advantages[idx] if advantages.dim() == 1
                                                     else advantages[idx, :width])
                out = call_objective(cfg.loss, logps=logps, old_logps=old, mask=loss_mask, advantages=a,
                                     rewards=shaped[idx].to(logps.device), group_size=G, inputs=inputs,
                                     loss_args=cfg.loss_args, max_len=cfg.max_new_tokens)
                loss = out.loss
                kl_agg = agg if agg in AGG_MODES else "token-mean"
                if cfg.kl_placement == "loss" and beta > 0 and not spec.own_kl:
                    kl_term = kl_penalty(logps, ref_logps, loss_mask, estimator=cfg.kl_estimator, old_logps=old,
                                         importance_weight=cfg.kl_importance_weight, token_kl=tok.get("kl"),
                                         agg=kl_agg, max_len=cfg.max_new_tokens)
                    loss = loss + beta * kl_term
                    out.metrics["kl_term"] = kl_term.item()
                release_freed_memory()  # lower peak RSS: the backward pass is where the gradients appear
                (loss * share).backward()
                out.metrics["loss"] = loss.item()
                if on_policy_single:  # the exact KL and entropy of the sampling policy, from this forward pass
                    stats.setdefault("kl_parts", []).append((tok["kl"].detach(), mb["mask"]))
                for k, v in out.metrics.items():
                    metric_sums[k] = metric_sums.get(k, 0.0) + v * share
            grad_norm = (torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                         if cfg.max_grad_norm > 0 else torch.tensor(float("nan")))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            metric_sums["grad_norm"] = metric_sums.get("grad_norm", 0.0) + float(grad_norm)
            n_updates += 1
    t_update = time.perf_counter() - t0

    # 7. Metrics. Exact KL of the policy that sampled this batch (before the updates).
    if on_policy_single:
        kl_sum = sum(float(k.sum()) for k, _ in stats["kl_parts"])
        seq_kl = torch.cat([(k * m).sum(-1) for k, m in stats["kl_parts"]])
    else:
        kl_sum = float((stats["kl"] * mask).sum())
        seq_kl = (stats["kl"] * mask).sum(-1)
    n_tokens = int(mask.sum())
    lengths = mask.sum(-1).float()
    kl_ctl.update(float(seq_kl.mean()), n_steps=len(lengths))
    row = {k: v / n_updates for k, v in metric_sums.items()}  # each update's shares sum to 1
    row.update({
        "reward": float(rewards[scored].mean()) if scored.any() else float("nan"),
        "reward_std": float(rewards[scored].std()) if int(scored.sum()) > 1 else 0.0,
        "token_kl": kl_sum / max(n_tokens, 1),
        "seq_kl": float(seq_kl.mean()),
        "kl_coef": beta,
        "completion_len": float(lengths.mean()),
        "cut_frac": 1.0 - sum(done.finished) / len(done.finished),
        "uniform_groups": float(uniform.float().mean()),
        "no_opinion": float((~scored).sum()),
        "lr": scheduler.get_last_lr()[0],
        "gen_s": t_gen, "reward_s": t_reward, "score_s": t_score, "update_s": t_update,
        "gen_tokens_per_s": n_tokens / max(t_gen, 1e-9),
    })
    if not on_policy_single:
        row["entropy"] = float((stats["entropy"] * mask).sum()) / max(n_tokens, 1)
        sampler = torch.zeros_like(stats["logps"])
        for r, lp in enumerate(done.logprobs):
            sampler[r, torch.nonzero(mask[r]).squeeze(-1)] = torch.tensor(lp, device=sampler.device)
        row["sampler_logp_gap"] = float(((sampler - stats["logps"]).abs() * mask).sum()) / max(n_tokens, 1)
    return row


def _final_report(cfg: RLConfig, policy, reference, tokenizer, eval_rows, reward, out_dir: Path,
                  metrics: list[dict]) -> dict:
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "steps": cfg.steps}
    if eval_rows:
        from tether.eval.kl import format_kl_report, measure_kl

        before_path = out_dir / "eval_before.json"
        before = json.loads(before_path.read_text())
        after = evaluate_reward(policy, tokenizer, eval_rows, reward, cfg)
        deltas = [a - b for a, b in zip(after["scores"], before["scores"])]
        report.update(
            reward_before={k: v for k, v in before.items() if k != "scores"},
            reward_after={k: v for k, v in after.items() if k != "scores"},
            reward_gain=after["reward_mean"] - before["reward_mean"],
            reward_gain_ci95_halfwidth=mean_ci95(deltas)[1])
        if cfg.lora:  # two plain models: adapters merged (policy) and removed (reference)
            policy, reference = copy.deepcopy(policy).merge_and_unload(), copy.deepcopy(policy).unload()
        report["kl"] = measure_kl(policy, reference, tokenizer, [r["prompt"] for r in eval_rows],
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
