"""Knowledge distillation: a student matches a teacher's next-token distributions, readable top to bottom.

    tether distill --config configs/distill_forward_kl.yaml [--divergence reverse_kl --mode on_policy ...]

One step (:func:`distill_step`), in order:

1. **Responses.** ``batch_size`` prompts (a seeded permutation, epoch after epoch) and one response each, from the
   source the mode names (:func:`response_source`): the dataset's (``off_policy``; the standard word-level KD of
   Hinton et al. 2015 applied per token), the teacher's samples (``seqkd``, sequence-level KD, Kim & Rush 2016), or —
   with probability ``lmbda``, decided by a seeded draw per step — the student's own samples, else the dataset's
   (``on_policy``, GKD: Agarwal et al. 2024, arXiv:2306.13649, Algorithm 1).
2. **Divergence.** At every response position the teacher's and the student's next-token distributions are compared
   over the full vocabulary by the configured divergence (``tether.losses.distill``), chunk by chunk over the LM head
   (``tether.head_divergence``: never a (positions, vocabulary) tensor for the batch); the loss is the token mean over
   the step's response tokens, plus ``nll_weight`` × the dataset response's NLL when the step scores dataset
   responses. Teacher hidden states on dataset responses are computed once and cached (``cache_teacher``).
   Modes with an objective of their own replace this step (each a small loss function, ``MICRO_LOSS``):

   * ``dckd`` (DCKD, Gao et al. 2025, arXiv:2502.17927; ``tether.losses.distill.dckd``): the exact forward
     KL(teacher ‖ student) per position on the dataset's chosen AND rejected responses, each side a token mean over
     its own tokens, plus ``nll_weight`` × the NLL of chosen; weights ``dckd_chosen_weight`` / ``dckd_rejected_weight``
     (the authors' recipe, gaoshiping/ADPA@a95c32f ``student_dckd.yaml``: w_c = w_r = 0.1 with NLL weight 1, lr
     5e-7, 3 epochs, cosine, warmup 0.1). The KL is exact over the full vocabulary
     (``dckd_teacher_top_k`` 0; the rejected side's teacher states are then computed every step, only chosen is
     cached), or — as the authors' pipeline stores it — over the teacher's top-k + remaining-mass bins
     (``dckd_teacher_top_k`` k, official 50), read from a store computed once for both sides (fingerprinted) and
     compared with the student's log-probs at the stored ids chunk by chunk; that drops rest_p × the KL of the two
     renormalized tails (``topk_forward_kl``). Departure: the teacher is whatever ``teacher_model`` is (the paper's
     is a DPO-trained teacher).
   * ``dpkd`` (DPKD, Li et al. 2024, arXiv:2406.19774; ``tether.losses.distill.dpkd_token``): the official
     token-level form under teacher forcing on the dataset response — at each position a Bradley–Terry loss (β
     ``dpkd_beta``) of the teacher's argmax token over the student's, the teacher as reference; token mean, plus
     ``nll_weight`` × NLL (official ``(1 − kd_ratio)·NLL + kd_ratio·L``: fold kd_ratio into the two weights). The
     argmaxes are found chunk by chunk over the LM heads (no (B, T, V) logits). Left out: the official ``lm_coef``
     pre-training term on a separate corpus.
   * ``minillm`` (MiniLLM, Gu et al. 2024, arXiv:2306.08543; ``tether.losses.distill.minillm``): each step samples
     one response per prompt, every token drawn from the teacher-mixed ``p̃ = α·p + (1 − α)·q`` (§2.2 Eq. 4;
     ``teacher_mixed_alpha`` α, ``tether.sampling.mixing.TeacherMixture``; α = 0 is the student alone), scores it
     once (rewards ``log p − log q_old``; per-token importance weights ``w_t = q_old/p̃`` of
     ``minillm_importance_weights``; the long-term advantages of ``minillm_advantages`` at its defaults — the official
     code's: γ 0.95, current reward included, length-normalized, whitened over the step), then takes ``ppo_epochs``
     updates over it (official 4), each: PPO-clip (ε 0.2) on the ratio ``(q_θ/q_old)·w_t`` times the advantage +
     the exact single-step reverse KL(q_θ ‖ p) per position over the full vocabulary (unweighted, as the official
     code), token mean. What this follows and where it departs from the paper (per-token weights instead of Eq. 5's
     prefix products: biased when α > 0; the return includes r_t; γ; whitening) is proved by enumeration in
     ``tests/losses/test_distill_objectives.py`` and listed in ``tether.losses.distill.minillm``. Departures from the
     official recipe: the rollout buffer is the step's ``batch_size`` responses, each epoch one update over all of
     them (official: 256 or 16 rollouts per buffer, mini-batches of 8 shuffled per epoch); no pre-training term;
     top-k / top-p are not applied (the official scripts use none either).
   * ``adpa`` (ADPA, Gao et al. 2025, arXiv:2502.17927; ``tether.losses.distill.adpa``): three models — the DPO
     teacher (``teacher_model``), its reference (``ref_model``) and the student. Each step samples one response per
     prompt from the student; at every position the loss is ``−Σ_{a ∈ top-k} q_θ(a|s_t)·A(s_t, a)`` with the DPO
     teacher's advantage ``A = log π_dpo − log π_ref`` on its top ``adpa_top_k`` tokens, token mean, plus
     ``nll_weight`` × the NLL of the dataset's chosen responses. Departures: online (the official pipeline stores
     both teachers' top-k offline, the reference known only on its own top-k: here exact), ADPA weight 1 (fold it
     into lr), ``prob_stabilize`` off. The authors' recipe (gaoshiping/ADPA@a95c32f ``student_adpa.yaml``): ADPA
     weight 1.6 with NLL weight 1 (so ``nll_weight`` 0.625 here), lr 5e-7, 3 epochs, started from the DCKD student
     (ADPA+).
3. **Update.** Micro-batches of ``micro_batch_size`` sequences accumulate one AdamW step (clipping, schedule).
4. **Record.** Metrics, checkpoints (exact resume), the final model, and ``distill_report.json``: the held-out
   teacher–student KL in both directions — KL(student ‖ teacher) on student samples and KL(teacher ‖ student) on
   teacher samples, each exact per token and per sequence with 95% CIs (``tether.eval.kl``) — and the student's rule
   reward, before and after (and the teacher's, sampled alike, once before).

The student is ``derived`` by default: the teacher with every ``student_stride``-th layer (``tether.models``). Teacher
and student must share one vocabulary (checked; a mismatch is a one-line error).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from tether import distributed
from tether.checkpoints import load_cache, save_checkpoint
from tether.data import load_preference_dataset, load_prompt_rows
from tether.distributed import Trainable, shard_rows
from tether.group_filter import prompt_schedule
from tether.head_divergence import head_divergence
from tether.logprobs import lm_head, token_stats
from tether.losses.distill import (
    TopK,
    adpa_advantages,
    adpa_per_position,
    dckd,
    dpkd_token_per_position,
    minillm,
    minillm_advantages,
    minillm_importance_weights,
    minillm_rewards,
    teacher_topk,
    topk_forward_kl_per_position,
)
from tether.models import (
    apply_lora,
    check_context_length,
    check_same_vocabulary,
    derive_student,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
)
from tether.recipes.configs import DistillConfig
from tether.reference import reference_context
from tether.rollout import Rollout, backbone_states, collate, evaluate_reward
from tether.sampling import Completions, render_prompts, sample
from tether.sampling.mixing import TeacherMixture
from tether.training import (
    RunLog,
    make_optimizer,
    make_scheduler,
    merged_copy,
    optimizer_step,
    read_metrics,
    release_freed_memory,
    resume_or_fresh,
    save_final,
    start_run,
)


@dataclass
class DistillRun:
    """The live state of a run: models, data, optimizer."""

    cfg: DistillConfig
    student: Any
    teacher: Any
    tokenizer: Any
    pad: int
    prompt_ids: list[list[int]]
    """Token ids of every training prompt (chat-templated)."""
    responses: list[list[int]] | None
    """The dataset response (``chosen``) of every training row, or None without a dataset."""
    rejected: list[list[int]] | None
    """The ``rejected`` response of every training row (read by dckd), or None without a dataset."""
    teacher_states: list[Tensor] | None
    """Cached teacher final hidden states at each dataset response's positions, (len(response), H) per row."""
    eval_rows: list[dict]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    reference: Any = None
    """adpa: the reference teacher (ref_model), frozen; None otherwise."""
    teacher_topk: dict[str, list[TopK]] | None = None
    """dckd with dckd_teacher_top_k: the teacher's stored top-k per position of every row's 'chosen' (and
    'rejected') response, one TopK of (len(response), K) per row; None otherwise."""
    trainable: Trainable | None = None
    """The student as the loop trains it (DDP / FSDP2 under torchrun: ``tether.distributed``)."""


@dataclass(frozen=True)
class DistillResult:
    output_dir: Path
    steps: int
    metrics: list[dict]
    report: dict | None = None


# ------------------------------------------------------------------------------------------------------------
# Set-up.
# ------------------------------------------------------------------------------------------------------------


def setup(cfg: DistillConfig) -> DistillRun:
    """Teacher, student (derived and cached when ``model: derived``), the training prompts and responses, the
    held-out rows and the optimizer."""
    teacher_tok = load_tokenizer(cfg.teacher_model)
    student_dir = derive_student(cfg.teacher_model, stride=cfg.student_stride) if cfg.model == "derived" \
        else cfg.model
    tokenizer = load_tokenizer(student_dir)
    check_same_vocabulary(teacher_tok, tokenizer, teacher=cfg.teacher_model, student=str(cfg.model))
    teacher = load_model(cfg.teacher_model).to(cfg.device).eval().requires_grad_(False)
    student = load_model(student_dir).to(cfg.device)
    for model, name in ((teacher, cfg.teacher_model), (student, str(cfg.model))):
        check_context_length(model, cfg.max_length, name=name)
    if teacher.get_output_embeddings().weight.shape != student.get_output_embeddings().weight.shape:
        raise ValueError(f"teacher '{cfg.teacher_model}' and student '{cfg.model}' have LM heads of different sizes; "
                         "distillation needs one shared vocabulary")
    reference = None
    if cfg.mode == "adpa":
        check_same_vocabulary(load_tokenizer(cfg.ref_model), tokenizer, teacher=cfg.ref_model, student=str(cfg.model))
        reference = load_model(cfg.ref_model).to(cfg.device).eval().requires_grad_(False)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    if cfg.lora:
        student = apply_lora(student, r=cfg.lora_r, alpha=cfg.lora_alpha)
    student.train()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids, responses, rejected = _training_data(cfg, tokenizer)
    teacher_states, teacher_topk = None, None
    if cfg.mode == "dckd" and cfg.dckd_teacher_top_k:
        sides = {"chosen": responses, "rejected": rejected if cfg.dckd_rejected_weight > 0 else None}
        teacher_topk = {side: _teacher_topk_store(cfg, teacher, prompt_ids, resp, pad, side)
                        for side, resp in sides.items() if resp is not None}
    elif responses is not None and cfg.cache_teacher and cfg.mode not in ("seqkd", "minillm", "adpa"):
        teacher_states = _cached_teacher_states(cfg, teacher, prompt_ids, responses, pad)
    if cfg.distributed == "fsdp2" and (cfg.lora or cfg.mode in ("minillm", "adpa")):
        raise ValueError(f"distributed: fsdp2 does not support lora or mode {cfg.mode} (its no-grad passes call the "
                         "student directly); use distributed: ddp")
    trainable = Trainable(student)  # each step's rows dealt to the ranks, the loss inside the wrapper's forward
    optimizer = make_optimizer(student, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               contiguous_state=not distributed.is_sharded(student))
    updates = cfg.steps * cfg.ppo_epochs  # the schedule counts optimizer updates
    scheduler = make_scheduler(optimizer, schedule=cfg.schedule, warmup_steps=int(cfg.warmup_ratio * updates),
                               total_steps=updates)
    return DistillRun(cfg, student, teacher, tokenizer, pad, prompt_ids, responses, rejected, teacher_states,
                      _eval_rows(cfg), optimizer, scheduler, reference, teacher_topk, trainable)


def _training_data(cfg: DistillConfig, tokenizer) -> tuple[list[list[int]], list[list[int]] | None,
                                                            list[list[int]] | None]:
    """Prompt ids and, from a preference-format file, the dataset response (``chosen``) and the ``rejected`` response
    of every row."""
    if cfg.train_file:
        examples, report = load_preference_dataset(
            cfg.train_file, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        print(report.summary())
        return ([ex.prompt_ids for ex in examples], [ex.chosen_ids for ex in examples],
                [ex.rejected_ids for ex in examples])
    from tether.tasks import make_instruction_prompts

    rows = make_instruction_prompts(64, seed=cfg.seed, split="train")
    return render_prompts(tokenizer, [r["prompt"] for r in rows]), None, None


def _eval_rows(cfg: DistillConfig) -> list[dict]:
    if cfg.eval_prompts_file:
        return load_prompt_rows(cfg.eval_prompts_file)
    if cfg.eval_prompts == 0:
        return []
    from tether.tasks import make_instruction_prompts

    return make_instruction_prompts(cfg.eval_prompts, seed=cfg.seed, split="heldout")


def _as_completions(prompt_ids: list[list[int]], responses: list[list[int]], tokenizer=None) -> Completions:
    """Dataset responses in the sampler's record (texts decoded only when a tokenizer is given)."""
    n = len(prompt_ids)
    texts = [tokenizer.decode(r, skip_special_tokens=True) if tokenizer else "" for r in responses]
    return Completions(prompt_index=list(range(n)), prompt_ids=[list(p) for p in prompt_ids],
                       completion_ids=[list(r) for r in responses], logprobs=[[0.0] * len(r) for r in responses],
                       texts=texts, finished=[True] * n)


@torch.no_grad()
def _teacher_states(teacher, rollout: Rollout) -> list[Tensor]:
    """The teacher's final hidden states at each row's response positions (the positions that predict a response
    token), one (len(response), H) tensor per row."""
    with reference_context(teacher):
        hidden = backbone_states(teacher, rollout, share_prompts=False)
    return [hidden[r][rollout.mask[r]] for r in range(rollout.size)]


def _cached_teacher_states(cfg: DistillConfig, teacher, prompt_ids, responses, pad: int) -> list[Tensor]:
    """Teacher hidden states on every dataset response, computed once and cached in ``output_dir`` under a
    fingerprint of the teacher and the token ids (another teacher or other data recomputes)."""
    h = hashlib.sha256(str(cfg.teacher_model).encode())
    for p, r in zip(prompt_ids, responses):
        h.update(json.dumps([p, r]).encode())
    fingerprint = torch.tensor(list(h.digest()), dtype=torch.uint8)
    path = Path(cfg.output_dir) / "teacher_states.safetensors"
    if path.exists() and (cached := load_cache(path)) is not None:  # a damaged cache is recomputed
        if torch.equal(cached["fingerprint"], fingerprint):
            lengths = cached["lengths"].tolist()
            return [s.to(cfg.device) for s in cached["states"].split(lengths)]
        print(f"{path} was computed for another teacher or other data; recomputing")
    states = []
    for start in range(0, len(prompt_ids), cfg.micro_batch_size):
        sl = slice(start, start + cfg.micro_batch_size)
        rollout = collate(_as_completions(prompt_ids[sl], responses[sl]), pad, cfg.device)
        states += _teacher_states(teacher, rollout)
    if distributed.current().main:  # every rank computed the same states; one writes them
        tmp = path.with_suffix(".tmp")
        save_file({"states": torch.cat(states).cpu().contiguous(), "lengths": torch.tensor([len(s) for s in states]),
                   "fingerprint": fingerprint}, tmp)
        tmp.replace(path)
    return states


def _teacher_topk_store(cfg: DistillConfig, teacher, prompt_ids, responses, pad: int, side: str) -> list[TopK]:
    """dckd: the teacher at every position of every ``side`` response compressed to its top ``dckd_teacher_top_k``
    probabilities and the remaining mass (``teacher_topk``; the DCKD pipeline's store), computed once chunk by chunk
    over the LM head and saved in ``output_dir`` under a fingerprint of the teacher, k, the side and the token ids."""
    k, vocab = cfg.dckd_teacher_top_k, lm_head(teacher)[0].shape[0]
    if k >= vocab:
        raise ValueError(f"dckd_teacher_top_k: {k} must be below the vocabulary size {vocab} (k = {vocab - 1} "
                         "already gives the exact KL: a one-token tail has nothing to drop)")
    h = hashlib.sha256(f"{cfg.teacher_model}|top{k}|{side}".encode())
    for p, r in zip(prompt_ids, responses):
        h.update(json.dumps([p, r]).encode())
    fingerprint = torch.tensor(list(h.digest()), dtype=torch.uint8)
    path = Path(cfg.output_dir) / f"teacher_top{k}_{side}.safetensors"
    lengths = [len(r) for r in responses]
    if path.exists() and (cached := load_cache(path)) is not None:  # a damaged cache is recomputed
        if torch.equal(cached["fingerprint"], fingerprint):
            parts = zip(*(cached[f].split(lengths) for f in TopK._fields))
            return [TopK(*(t.to(cfg.device) for t in part)) for part in parts]
        print(f"{path} was computed for another teacher, k or other data; recomputing")
    t_weight, t_bias = lm_head(teacher)
    rows: list[TopK] = []
    for start in range(0, len(prompt_ids), cfg.micro_batch_size):
        sl = slice(start, start + cfg.micro_batch_size)
        for states in _teacher_states(teacher, collate(_as_completions(prompt_ids[sl], responses[sl]), pad,
                                                                       cfg.device)):
            chunks = [teacher_topk(F.linear(states[c:c + cfg.chunk_size], t_weight, t_bias).float(), k)
                      for c in range(0, max(len(states), 1), cfg.chunk_size)]
            rows.append(TopK(*(torch.cat(f) for f in zip(*chunks))))
    if distributed.current().main:  # every rank computed the same store; one writes it
        tmp = path.with_suffix(".tmp")
        save_file({**{f: torch.cat([getattr(r, f) for r in rows]).cpu().contiguous() for f in TopK._fields},
                   "fingerprint": fingerprint}, tmp)
        tmp.replace(path)
    return rows


# ------------------------------------------------------------------------------------------------------------
# One step.
# ------------------------------------------------------------------------------------------------------------


def response_source(cfg: DistillConfig, step: int) -> str:
    """Who writes step ``step``'s responses: 'dataset', 'teacher' or 'student' — for on_policy a seeded Bernoulli(λ)
    draw per step (a function of seed and step, so a resumed run draws the same)."""
    if cfg.mode in ("off_policy", "dckd", "dpkd"):
        return "dataset"
    if cfg.mode == "seqkd":
        return "teacher"
    if cfg.mode in ("minillm", "adpa"):
        return "student"
    u = torch.rand((), generator=torch.Generator().manual_seed(cfg.seed * 1_000_033 + step)).item()
    return "student" if u < cfg.lmbda else "dataset"


def step_rows(n_rows: int, step: int, per_step: int, seed: int) -> list[int]:
    """Consecutive slices of seeded permutations of the rows, epoch after epoch (``tether.group_filter``)."""
    return prompt_schedule(n_rows, step, per_step=per_step, seed=seed)


@dataclass
class StepBatch:
    """One step's responses and what its objective reads besides the models."""

    rows: list[int]
    """The dataset row of each response (its prompt's row)."""
    rollout: Rollout
    """(B, T) prompt + response rows: the step's responses."""
    source: str
    """Who wrote the responses: 'dataset', 'teacher' or 'student'."""
    n_tokens: int
    """Response tokens of the step (at least 1): every token mean divides by it."""
    teacher_states: list[Tensor] | None = None
    """Teacher final hidden states at each row's response positions, (len(response), H) per row (None: computed
    per micro-batch)."""
    rejected: Rollout | None = None
    """dckd: the same prompts with the dataset's rejected responses (None when dckd_rejected_weight is 0)."""
    n_rejected: int = 1
    """dckd: rejected response tokens of the step (at least 1)."""
    old_logps: Tensor | None = None
    """minillm: (B, T) log q_old of each sampled token under the student at rollout time (0 off the mask)."""
    advantages: Tensor | None = None
    """minillm: (B, T) long-term advantages (``minillm_advantages`` at its documented defaults)."""
    weights: Tensor | None = None
    """minillm: (B, T) importance weights w_t = q_old/p̃ of the sampled tokens (None when teacher_mixed_alpha is 0)."""
    chosen: Rollout | None = None
    """adpa: the same prompts with the dataset's chosen responses, for the NLL (None when nll_weight is 0)."""
    n_chosen: int = 1
    """adpa: chosen response tokens of the step (at least 1)."""


def distill_step(run: DistillRun, step: int) -> dict[str, float]:
    """One optimizer step on ``batch_size`` responses from the step's source (minillm: ``ppo_epochs`` updates over
    them); returns its metrics (with several updates: the first one's, and ``*_last`` of the last one)."""
    cfg = run.cfg
    t0 = time.perf_counter()
    rows = step_rows(len(run.prompt_ids), step, cfg.batch_size, cfg.seed)
    source = response_source(cfg, step)
    prompts = [run.prompt_ids[i] for i in rows]
    if source == "dataset":
        done = _as_completions(prompts, [run.responses[i] for i in rows], run.tokenizer)
    else:
        mixing = [TeacherMixture(run.teacher, prompts, alpha=cfg.teacher_mixed_alpha, temperature=cfg.temperature,
                                 max_new_tokens=cfg.max_new_tokens)] if cfg.teacher_mixed_alpha > 0 else []
        with run.trainable.gathered() as student:  # every rank draws the same batch (same seed)
            done = sample(run.teacher if source == "teacher" else student, run.tokenizer, prompts, n=1,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          seed=cfg.seed * 100_003 + step, batch_size=cfg.batch_size, processors=mixing)
    rollout = collate(done, run.pad, cfg.device)
    t_gen = time.perf_counter() - t0
    batch = StepBatch(rows, rollout, source, max(int(rollout.mask.sum()), 1),
                      [run.teacher_states[i] for i in rows] if source == "dataset" and run.teacher_states else None)
    batch = PREPARE.get(cfg.mode, lambda run, batch: batch)(run, batch)
    first: dict[str, float] = {}
    for _ in range(cfg.ppo_epochs):  # 1 except minillm: updates over the same responses
        sums: dict[str, float] = {}
        starts = range(0, rollout.size, cfg.micro_batch_size)
        world = run.trainable.dist.world
        for k_micro, start in enumerate(starts):
            # Under torchrun each micro-batch's rows are dealt to the ranks; the losses are already shares of the
            # step's token mean, so W × this rank's share averages (DDP / FSDP2) to the step's loss.
            idx, weight = shard_rows(torch.arange(start, min(rollout.size, start + cfg.micro_batch_size)))
            with run.trainable.sync(k_micro == len(starts) - 1):
                loss, metrics = run.trainable(_micro_loss_of, run, batch, idx)
                release_freed_memory()
                (loss * (weight * world)).backward()
            for k, v in {"loss": float(loss.detach()), **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v * weight
        sums = distributed.all_sum(sums)
        sums["grad_norm"] = optimizer_step(run.student, run.optimizer, run.scheduler, max_grad_norm=cfg.max_grad_norm,
                                           step=step + 1)
        first = first or sums
    if cfg.ppo_epochs > 1:  # the first update's metrics, and where the last one stood
        first.update({f"{k}_last": sums[k] for k in ("loss", "clip_frac", "ratio_mean", "grad_norm")})
    return {**first, "source_student": float(source == "student"),
            "source_teacher": float(source == "teacher"), "response_len": batch.n_tokens / rollout.size,
            "lr": run.scheduler.get_last_lr()[0], "gen_s": t_gen, "step_s": time.perf_counter() - t0}


def _micro_loss_of(student, run: DistillRun, batch: StepBatch, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
    """The mode's micro-batch loss as the wrapper's forward calls it (``student`` is ``run.student``)."""
    return MICRO_LOSS.get(run.cfg.mode, divergence_loss)(run, batch, idx)


# Each mode's loss on micro-batch ``idx`` of the step: (its share of the step's loss, a differentiable 0-dim tensor;
# its share of each logged metric). Shares are exact: a token mean over the step is Σ_mb (sum over mb) / n_tokens.


def _teacher(run: DistillRun, batch: StepBatch, idx: Tensor, mb: Rollout) -> Tensor:
    """(N, H_t) teacher states at the micro-batch's response positions: cached, or a teacher forward pass."""
    states = [batch.teacher_states[i] for i in idx.tolist()] if batch.teacher_states is not None else None
    return torch.cat(states if states is not None else _teacher_states(run.teacher, mb))


def _per_position(run: DistillRun, hidden: Tensor, teacher: Tensor, mask: Tensor, divergence: str, **kw) -> Tensor:
    """(N,) divergence of the student (``hidden`` (B, T, H) at ``mask``) from the teacher (``teacher`` (N, H_t)),
    chunked over the LM head."""
    weight, bias = lm_head(run.student)
    t_weight, t_bias = lm_head(run.teacher)
    return head_divergence(hidden[mask], weight, teacher, t_weight, divergence=divergence, student_bias=bias,
                           teacher_bias=t_bias, chunk_size=run.cfg.chunk_size, **kw)


def _at(mask: Tensor, values: Tensor) -> Tensor:
    """(N,) values at the True entries of ``mask`` (row-major, as ``x[mask]``) → (B, T), 0 elsewhere."""
    return values.new_zeros(mask.shape).index_put(mask.nonzero(as_tuple=True), values)


def _logps(run: DistillRun, hidden: Tensor, labels: Tensor, **kw) -> Tensor:
    """(B, T) log q_θ(labels) (0 where IGNORE_INDEX), chunked over the LM head."""
    weight, bias = lm_head(run.student)
    return token_stats(hidden, weight, labels, bias=bias, chunk_size=run.cfg.chunk_size, **kw)["logps"]


def divergence_loss(run: DistillRun, batch: StepBatch, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
    """off_policy / seqkd / on_policy: the configured divergence at every response position (+ nll_weight × the
    dataset response's NLL when the step scores dataset responses)."""
    cfg = run.cfg
    mb = batch.rollout.rows(idx)
    hidden = backbone_states(run.student, mb, share_prompts=False, embedding_grad_in_place=True)
    divergence = _per_position(run, hidden, _teacher(run, batch, idx, mb), mb.mask, cfg.divergence,
                               temperature=cfg.divergence_temperature, **cfg.divergence_args).sum()
    nll = torch.zeros((), device=divergence.device)
    if batch.source == "dataset" and cfg.nll_weight > 0:
        nll = -_logps(run, hidden, mb.labels)[mb.mask].sum()
    loss = (divergence + cfg.nll_weight * nll) / batch.n_tokens
    return loss, {"divergence": float(divergence.detach()) / batch.n_tokens,
                  "nll": float(nll.detach()) / batch.n_tokens}


def _dckd_prepare(run: DistillRun, batch: StepBatch) -> StepBatch:
    if run.cfg.dckd_rejected_weight == 0:
        return batch
    rejected = collate(_as_completions([run.prompt_ids[i] for i in batch.rows], [run.rejected[i] for i in batch.rows]),
                       run.pad, run.cfg.device)
    return dataclasses.replace(batch, rejected=rejected, n_rejected=max(int(rejected.mask.sum()), 1))


def dckd_loss(run: DistillRun, batch: StepBatch, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
    """dckd: forward KL(teacher ‖ student) per position on the chosen and the rejected responses, + NLL on chosen,
    each a token mean over the step's tokens of its side (``tether.losses.distill.dckd``; weights scaled by the
    micro-batch's share of each side's tokens)."""
    cfg = run.cfg
    chosen = batch.rollout.rows(idx)
    hidden = backbone_states(run.student, chosen, share_prompts=False, embedding_grad_in_place=True)
    if run.teacher_topk is not None:
        kl_c = _topk_kl(run, hidden, chosen, _stored(run, "chosen", batch, idx))
    else:
        kl_c = _at(chosen.mask, _per_position(run, hidden, _teacher(run, batch, idx, chosen), chosen.mask,
                                              "forward_kl"))
    n_c = int(chosen.mask.sum())
    logps = _logps(run, hidden, chosen.labels) if cfg.nll_weight > 0 else None
    kl_r, mask_r, n_r = None, None, 0
    if batch.rejected is not None:
        rejected = batch.rejected.rows(idx)
        hidden_r = backbone_states(run.student, rejected, share_prompts=False, embedding_grad_in_place=True)
        mask_r, n_r = rejected.mask, int(rejected.mask.sum())
        if run.teacher_topk is not None:
            kl_r = _topk_kl(run, hidden_r, rejected, _stored(run, "rejected", batch, idx))
        else:
            teacher_r = torch.cat(_teacher_states(run.teacher, rejected))
            kl_r = _at(mask_r, _per_position(run, hidden_r, teacher_r, mask_r, "forward_kl"))
    c_share, r_share = n_c / batch.n_tokens, n_r / batch.n_rejected
    out = dckd(kl_c, chosen.mask, sft_weight=cfg.nll_weight * c_share, chosen_weight=cfg.dckd_chosen_weight * c_share,
               rejected_weight=cfg.dckd_rejected_weight * r_share, chosen_logps=logps, rejected_kl=kl_r,
               rejected_mask=mask_r)
    return out.loss, {"kl_chosen": float(kl_c.detach().sum()) / batch.n_tokens,
                      "kl_rejected": 0.0 if kl_r is None else float(kl_r.detach().sum()) / batch.n_rejected,
                      "nll": 0.0 if logps is None else -float(logps.detach()[chosen.mask].sum()) / batch.n_tokens,
                      "chosen_tokens": float(n_c), "rejected_tokens": float(n_r)}


def _stored(run: DistillRun, side: str, batch: StepBatch, idx: Tensor) -> TopK:
    """The stored teacher top-k of the micro-batch's ``side`` responses, (N, K) / (N,), rows in micro-batch order."""
    rows = [run.teacher_topk[side][batch.rows[i]] for i in idx.tolist()]
    return TopK(*(torch.cat(f) for f in zip(*rows)))


def _topk_kl(run: DistillRun, hidden: Tensor, mb: Rollout, top: TopK) -> Tensor:
    """(B, T) DCKD's binned forward KL at the response positions (0 elsewhere): log q_θ at the stored ids chunk by
    chunk over the LM head (``token_stats`` ``support_logps``), then ``topk_forward_kl_per_position``."""
    support = mb.labels.new_zeros(*mb.mask.shape, top.ids.shape[-1]).index_put(mb.mask.nonzero(as_tuple=True),
                                                                                top.ids)
    weight, bias = lm_head(run.student)
    logps = token_stats(hidden, weight, mb.labels, bias=bias, stats=("support_logps",), support_ids=support,
                        chunk_size=run.cfg.chunk_size)["support_logps"][mb.mask]
    return _at(mb.mask, topk_forward_kl_per_position(logps, top))

@torch.no_grad()
def _argmaxes(run: DistillRun, hidden: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DPKD's two tokens per position and the teacher's log-probs at them, chunk by chunk over the LM heads (no
    gradient): ``(a_T, a_S, log p(a_T), log p(a_S))``, each (N,), from (N, H) student and (N, H_t) teacher states."""
    weight, bias = lm_head(run.student)
    t_weight, t_bias = lm_head(run.teacher)
    out = []
    for start in range(0, hidden.shape[0], run.cfg.chunk_size):
        sl = slice(start, start + run.cfg.chunk_size)
        a_s = F.linear(hidden[sl], weight, bias).argmax(-1, keepdim=True)
        teacher_logp = F.linear(teacher[sl], t_weight, t_bias).float().log_softmax(-1)
        a_t = teacher_logp.argmax(-1, keepdim=True)
        out.append(torch.cat([a_t, a_s, teacher_logp.gather(-1, a_t), teacher_logp.gather(-1, a_s)], -1))
    a_t, a_s, t_t, t_s = torch.cat(out).unbind(-1) if out else hidden.new_zeros(4, 0).unbind(0)
    return a_t.long(), a_s.long(), t_t, t_s


def dpkd_loss(run: DistillRun, batch: StepBatch, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
    """dpkd: the official token-level DPKD (``dpkd_token``) under teacher forcing on the dataset response — at each
    position a Bradley–Terry loss of the teacher's argmax token over the student's, the teacher as reference — token
    mean over the step, + nll_weight × NLL. Never (B, T, V) logits: the argmaxes come chunk by chunk without
    gradient, then the student's log-probs at them chunk by chunk with gradient (``dpkd_token_per_position``)."""
    cfg = run.cfg
    mb = batch.rollout.rows(idx)
    hidden = backbone_states(run.student, mb, share_prompts=False, embedding_grad_in_place=True)
    a_t, a_s, t_t, t_s = _argmaxes(run, hidden[mb.mask].detach(), _teacher(run, batch, idx, mb))
    s_t = _logps(run, hidden, mb.labels.masked_scatter(mb.mask, a_t))[mb.mask]
    s_s = _logps(run, hidden, mb.labels.masked_scatter(mb.mask, a_s))[mb.mask]
    per_position = dpkd_token_per_position(s_t, s_s, t_t, t_s, beta=cfg.dpkd_beta).sum()
    nll = -_logps(run, hidden, mb.labels)[mb.mask].sum() if cfg.nll_weight > 0 else per_position.new_zeros(())
    return (per_position + cfg.nll_weight * nll) / batch.n_tokens, {
        "dpkd": float(per_position.detach()) / batch.n_tokens, "nll": float(nll.detach()) / batch.n_tokens,
        "argmax_agree": float((a_t == a_s).sum()) / batch.n_tokens}



@torch.no_grad()
def _minillm_prepare(run: DistillRun, batch: StepBatch) -> StepBatch:
    """The student's samples scored once before the update: log q_old and log p of every sampled token (at the
    sampling temperature), rewards r = log p − log q_old, the long-term advantages over the whole step (whitened
    across it), and the teacher states the single-step KL reads."""
    cfg, r = run.cfg, batch.rollout
    old = torch.zeros(r.mask.shape, device=r.mask.device)
    teacher_logps, states = torch.zeros_like(old), []
    t_weight, t_bias = lm_head(run.teacher)
    for start in range(0, r.size, cfg.micro_batch_size):
        idx = torch.arange(start, min(r.size, start + cfg.micro_batch_size))
        mb = r.rows(idx)
        hidden = backbone_states(run.student, mb, share_prompts=False)
        old[idx, :mb.width] = _logps(run, hidden, mb.labels, temperature=cfg.temperature)
        states += _teacher_states(run.teacher, mb)
        flat = token_stats(torch.cat(states[start:])[None], t_weight, mb.labels[mb.mask][None], bias=t_bias,
                           chunk_size=cfg.chunk_size, temperature=cfg.temperature)["logps"][0]
        teacher_logps[idx, :mb.width] = _at(mb.mask, flat)
    advantages = minillm_advantages(minillm_rewards(teacher_logps, old, r.mask), r.mask)
    weights = None
    if cfg.teacher_mixed_alpha > 0:
        weights = minillm_importance_weights(old, teacher_logps, r.mask, alpha=cfg.teacher_mixed_alpha)
    return dataclasses.replace(batch, teacher_states=states, old_logps=old, advantages=advantages, weights=weights)


def minillm_loss(run: DistillRun, batch: StepBatch, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
    """minillm (``tether.losses.distill.minillm`` at its documented defaults): the PPO-clipped long-term term on the
    sampled tokens + the exact single-step reverse KL(q_θ ‖ p) per position (``head_divergence`` 'reverse_kl'), a
    token mean over the step."""
    cfg = run.cfg
    mb = batch.rollout.rows(idx)
    hidden = backbone_states(run.student, mb, share_prompts=False, embedding_grad_in_place=True)
    logps = _logps(run, hidden, mb.labels, temperature=cfg.temperature)
    single = _at(mb.mask, _per_position(run, hidden, _teacher(run, batch, idx, mb), mb.mask, "reverse_kl",
                                        temperature=cfg.temperature))
    weights = None if batch.weights is None else batch.weights[idx, :mb.width]
    out = minillm(logps, batch.old_logps[idx, :mb.width], batch.advantages[idx, :mb.width], mb.mask,
                  weights=weights, single_step_kl=single)
    share = int(mb.mask.sum()) / batch.n_tokens
    return out.loss * share, {k: out.metrics[k] * share for k in ("long_term", "single_step_kl", "clip_frac",
                                                                  "ratio_mean", "weight_mean")}



def _adpa_prepare(run: DistillRun, batch: StepBatch) -> StepBatch:
    if run.cfg.nll_weight == 0:
        return batch
    chosen = collate(_as_completions([run.prompt_ids[i] for i in batch.rows], [run.responses[i] for i in batch.rows]),
                     run.pad, run.cfg.device)
    return dataclasses.replace(batch, chosen=chosen, n_chosen=max(int(chosen.mask.sum()), 1))


@torch.no_grad()
def _adpa_targets(run: DistillRun, mb: Rollout) -> tuple[Tensor, Tensor]:
    """The DPO teacher's top-k ids and advantages log π_dpo − log π_ref at the micro-batch's response positions,
    (N, K) each, chunk by chunk over the two teachers' LM heads (``adpa_advantages``, exact reference)."""
    dpo, ref = torch.cat(_teacher_states(run.teacher, mb)), torch.cat(_teacher_states(run.reference, mb))
    (w, b), (ref_w, ref_b) = lm_head(run.teacher), lm_head(run.reference)
    ids, adv = [], []
    for start in range(0, dpo.shape[0], run.cfg.chunk_size):
        sl = slice(start, start + run.cfg.chunk_size)
        i, a = adpa_advantages(F.linear(dpo[sl], w, b).float(), F.linear(ref[sl], ref_w, ref_b).float(),
                               top_k=run.cfg.adpa_top_k)
        ids.append(i)
        adv.append(a)
    k = run.cfg.adpa_top_k
    return (torch.cat(ids), torch.cat(adv)) if ids else (mb.labels.new_zeros(0, k), dpo.new_zeros(0, k))


def adpa_loss(run: DistillRun, batch: StepBatch, idx: Tensor) -> tuple[Tensor, dict[str, float]]:
    """adpa: ``−Σ_{a ∈ top-k} q_θ(a|s_t)·A(s_t, a)`` at every position of the student's own samples
    (``adpa_per_position``; log q_θ at the ids chunk by chunk, ``token_stats`` ``support_logps``), token mean over
    the step, + nll_weight × the token-mean NLL of the rows' chosen responses."""
    cfg = run.cfg
    mb = batch.rollout.rows(idx)
    hidden = backbone_states(run.student, mb, share_prompts=False, embedding_grad_in_place=True)
    ids, adv = _adpa_targets(run, mb)
    support = mb.labels.new_zeros(*mb.mask.shape, ids.shape[-1]).index_put(mb.mask.nonzero(as_tuple=True), ids)
    weight, bias = lm_head(run.student)
    logps_at_ids = token_stats(hidden, weight, mb.labels, bias=bias, stats=("support_logps",), support_ids=support,
                               chunk_size=cfg.chunk_size)["support_logps"][mb.mask]
    term = adpa_per_position(logps_at_ids, adv).sum() / batch.n_tokens
    nll = term.new_zeros(())
    if batch.chosen is not None:
        chosen = batch.chosen.rows(idx)
        hidden_c = backbone_states(run.student, chosen, share_prompts=False, embedding_grad_in_place=True)
        nll = -_logps(run, hidden_c, chosen.labels)[chosen.mask].sum() / batch.n_chosen
    return term + cfg.nll_weight * nll, {"adpa": float(term.detach()), "nll": float(nll.detach()),
                                         "advantage_mean": float(adv.mean(-1).sum()) / batch.n_tokens}


PREPARE = {"dckd": _dckd_prepare, "minillm": _minillm_prepare, "adpa": _adpa_prepare}
"""Mode → what the step's objective reads besides the responses (computed once per step, before the micro-batches)."""
MICRO_LOSS = {"dckd": dckd_loss, "dpkd": dpkd_loss, "minillm": minillm_loss, "adpa": adpa_loss}
"""Mode → its loss on one micro-batch (the divergence modes: :func:`divergence_loss`)."""


# ------------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------------


def held_out(run: DistillRun, student, *, with_teacher: bool = False) -> dict:
    """The student's rule reward and the teacher–student KL in both directions on the held-out prompts;
    ``with_teacher``: also the teacher's rule reward (``teacher_reward``), sampled with the same settings and seed —
    what the student is moving toward (the run measures it once, before training)."""
    from tether.eval.kl import measure_kl
    from tether.rewards import InstructionFollowingReward

    cfg = run.cfg
    prompts = [r["prompt"] for r in run.eval_rows]
    kw = dict(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch_size=64, chunk_size=cfg.chunk_size,
              samples_per_prompt=cfg.kl_samples_per_prompt)
    out = {"kl_student_teacher": measure_kl(student, run.teacher, run.tokenizer, prompts, **kw),
           "kl_teacher_student": measure_kl(run.teacher, student, run.tokenizer, prompts, **kw)}
    if all("constraints" in r for r in run.eval_rows):
        for key, model in (("reward", student), ("teacher_reward", run.teacher if with_teacher else None)):
            if model is not None:
                out[key] = evaluate_reward(model, run.tokenizer, run.eval_rows, InstructionFollowingReward(),
                                           samples_per_prompt=cfg.eval_samples_per_prompt,
                                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                           seed=cfg.seed + 7919, batch_size=64)
    return out


def _summary(name: str, h: dict) -> str:
    rev, fwd = h["kl_student_teacher"], h["kl_teacher_student"]
    line = (f"{name}: KL(student‖teacher) {rev['token_kl']['mean']:.3f} nats/token, "
            f"{rev['sequence_kl_rao_blackwell']['mean']:.2f} ± "
            f"{rev['sequence_kl_rao_blackwell']['mean'] - rev['sequence_kl_rao_blackwell']['ci95'][0]:.2f}/seq; "
            f"KL(teacher‖student) {fwd['token_kl']['mean']:.3f} nats/token, "
            f"{fwd['sequence_kl_rao_blackwell']['mean']:.2f} ± "
            f"{fwd['sequence_kl_rao_blackwell']['mean'] - fwd['sequence_kl_rao_blackwell']['ci95'][0]:.2f}/seq")
    if "reward" in h:
        line += f"; rule reward {h['reward']['reward_mean']:.3f} ± {h['reward']['reward_ci95_halfwidth']:.3f}"
    if "teacher_reward" in h:
        line += (f" (teacher {h['teacher_reward']['reward_mean']:.3f} ± "
                 f"{h['teacher_reward']['reward_ci95_halfwidth']:.3f})")
    return line


def _on_main(run: DistillRun, fn):
    """``fn(student)`` on rank 0 (None elsewhere), with the student's full weights (``Trainable.gathered``)."""
    with run.trainable.gathered() as student:
        out = fn(student) if run.trainable.dist.main else None
    distributed.barrier()
    return out


def train(cfg: DistillConfig) -> DistillResult:
    out_dir = start_run(cfg)
    run = setup(cfg)
    state = resume_or_fresh(out_dir, resume=cfg.resume, model=run.student, optimizer=run.optimizer,
                            scheduler=run.scheduler, lora=cfg.lora, total=cfg.steps)
    step = 0 if state is None else state["step"]
    if step == 0 and run.eval_rows and (before := _on_main(run, functools.partial(held_out, run, with_teacher=True))):
        (out_dir / "held_out_before.json").write_text(json.dumps(before))
        print(_summary("before", before))
    log = RunLog(out_dir, total=cfg.steps, start=step, desc=f"distill {cfg.divergence}",
                 show=("loss", "divergence", "response_len"), finite=("loss", "grad_norm"),
                 save_every=cfg.save_every, stop_after=cfg.stop_after, tensorboard=cfg.tensorboard,
                 progress=cfg.progress)

    def checkpoint() -> None:
        save_checkpoint(out_dir, step, model=run.student, tokenizer=run.tokenizer, optimizer=run.optimizer,
                        scheduler=run.scheduler)

    while step < cfg.steps:
        row = distill_step(run, step)
        step += 1
        if log.end_step(step, row, checkpoint=checkpoint):
            break
    log.close()
    result = DistillResult(out_dir, step, read_metrics(out_dir))
    if step < cfg.steps:
        return result
    save_final(run.student, run.tokenizer, out_dir / "final", lora=cfg.lora)
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "steps": step}
    after = _on_main(run, lambda student: held_out(run, merged_copy(student) if cfg.lora else student)) \
        if run.eval_rows else None
    if not run.trainable.dist.main:
        return result
    if run.eval_rows:
        report["before"] = json.loads((out_dir / "held_out_before.json").read_text())
        report["after"] = after
        print(_summary("after", report["after"]))
    report["train_metrics_last"] = result.metrics[-1] if result.metrics else {}
    (out_dir / "distill_report.json").write_text(json.dumps(report, indent=2))
    return dataclasses.replace(result, report=report)
