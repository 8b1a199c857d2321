"""Offline preference optimization (DPO and its family), readable top to bottom.

    tether dpo --config configs/dpo_smollm2.yaml [--lr 1e-5 --loss ipo ...]

What happens, in order:

1. load the policy (embedded SmolLM2 by default, or any local HF directory), optionally wrap it with LoRA;
2. load, validate and tokenize the preference data (``tether.data``) and print the data report;
3. reference log-probs: for sequence-level objectives they are computed once, in one no-grad pass, by the
   reference (a separate model, the starting policy — the LoRA base with adapters disabled when training with
   LoRA — or, with ``ref_strategy: soup``, the average of the ``ref_soup`` models), cached on disk, and the
   reference model is freed; objectives that need the reference's full distribution at every token (TDPO, Ra-DPO)
   keep it online. A moving reference (``ref_strategy``: ``ema``, ``reset``, ``trdpo_soft``, ``trdpo_hard``;
   ``tether.reference.ReferenceSync``) cannot be cached — its log-probs change whenever it moves — so it is kept
   online as a copy of the policy and every micro-batch's reference log-probs are computed in a no-grad pass
   (one extra forward per micro-batch); it moves after every ``ref_every``-th optimizer step;
4. the loop: AdamW, linear warm-up + schedule, gradient accumulation, gradient clipping; each micro-batch stacks
   chosen and rejected into one forward pass and computes per-token log-probs in chunks (``tether.logprobs``),
   never holding (batch, length, vocab) logits;
5. metrics to a progress bar, ``metrics.jsonl`` and TensorBoard (with the reference in force at each step:
   ``ref/version``, ``ref/steps_since_sync``, ``ref/rate``); atomic checkpoints (a moving reference with them);
   ``resume=True`` continues from the newest checkpoint with exactly the trajectory of an uninterrupted run.
   Under torchrun (``distributed: ddp`` or ``fsdp2``) each micro-batch's pairs are dealt to the ranks and the loss
   runs inside the wrapper's forward (``tether.distributed``): the same steps as one process;
6. the final model (HF format) in ``<output_dir>/final``, and — when ``eval_prompts_file`` is set — the exact KL
   to the reference measured on held-out prompts (``tether.eval.kl``).

Departures from the reference implementations: the batch loss is the mean of per-pair losses over the pairs of an
optimizer step (the Ra-DPO code sums); the last micro-batch of an epoch may be smaller (nothing is dropped).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from tether import distributed
from tether.checkpoints import atomic_write, save_checkpoint
from tether.data import collate_preference, curriculum_order, load_preference_dataset
from tether.distributed import Trainable, shard_rows
from tether.logprobs import hidden_states, lm_head, sequence_sums, token_stats
from tether.losses.preference import PREFERENCE_LOSSES
from tether.models import (
    apply_lora,
    check_context_length,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
)
from tether.recipes.configs import PreferenceConfig
from tether.reference import ReferenceSync, frozen_copy, reference_context, soup_state
from tether.sampling import render_prompts
from tether.training import (
    RunLog,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    read_metrics,
    release_freed_memory,
    resume_or_fresh,
    save_final,
    start_run,
)

log = logging.getLogger(__name__)
SHORT_CONTEXT_REFERENCE = {"longpo"}  # objectives whose reference sees a different (short) prompt


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics: list[dict]
    kl_report: dict | None = None


# ------------------------------------------------------------------------------------------------------------
# Reference log-probs: one no-grad pass, cached on disk.
# ------------------------------------------------------------------------------------------------------------


def _examples_fingerprint(examples, ref_name: str) -> str:
    h = hashlib.sha256(ref_name.encode())
    for ex in examples:
        h.update(json.dumps([ex.prompt_ids, ex.chosen_ids, ex.rejected_ids]).encode())
    return h.hexdigest()


def _on(batch: dict, device) -> dict:
    """The batch with its tensors moved to ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def reference_logps(model, examples, *, pad_token_id: int, batch_size: int, chunk_size: int,
                    progress: bool = False) -> torch.Tensor:
    """Summed reference log-probs of every pair: (N, 2) = [chosen, rejected], on the CPU. One forward pass per
    batch, on the model's device."""
    weight, bias = lm_head(model)
    out = []
    for start in tqdm(range(0, len(examples), batch_size), desc="reference log-probs", disable=not progress,
                      leave=False):
        batch = _on(collate_preference(examples[start:start + batch_size], pad_token_id), weight.device)
        hidden = hidden_states(model, batch["input_ids"], batch["attention_mask"])
        lp = sequence_sums(token_stats(hidden, weight, batch["labels"], bias=bias, chunk_size=chunk_size)["logps"],
                           batch["labels"])
        out.append(lp.view(2, -1).T.cpu())
    return torch.cat(out)


def _kl_pairs(examples):
    """KTO's mismatched pairs: prompt i with the rejected completion of pair i+1 (fixed, so the reference side
    can be cached). Returned as PreferenceExamples whose chosen and rejected are both that completion."""
    n = len(examples)
    return [dataclasses.replace(ex, chosen_ids=examples[(i + 1) % n].rejected_ids,
                                rejected_ids=examples[(i + 1) % n].rejected_ids) for i, ex in enumerate(examples)]


def _short_context_examples(cfg: PreferenceConfig, examples, tokenizer):
    """LongPO: the reference scores each completion given the row's short context (field ``ref_prompt``, kept in
    each example's metadata) instead of the long prompt the policy sees; only the prompt ids change. A row without
    the field is an error (a LongPO reference on the long prompt would silently turn the method into NLL + DPO)."""
    field = cfg.ref_prompt_field
    short = []
    for ex in examples:
        value = ex.metadata.get(field)
        where = f"{cfg.train_file}: row {ex.index}: field '{field}'"
        if not (isinstance(value, str) and value.strip()) and not (isinstance(value, list) and value):
            raise ValueError(f"{where}: missing or empty; {cfg.loss} scores the reference on a short context — add "
                             f"'{field}' (a string or chat messages) to every row")
        ids = render_prompts(tokenizer, [value], use_chat_template=cfg.use_chat_template)[0]
        if len(ids) > cfg.max_prompt_length:
            raise ValueError(f"{where}: is {len(ids)} tokens, more than max_prompt_length={cfg.max_prompt_length}")
        short.append(dataclasses.replace(ex, prompt_ids=ids))
    return short


def _cached_reference(cfg: PreferenceConfig, examples, ref, tokenizer, out_dir: Path, need_kl_pairs: bool):
    if cfg.loss in SHORT_CONTEXT_REFERENCE:
        examples = _short_context_examples(cfg, examples, tokenizer)
    path = out_dir / "reference_logps.safetensors"
    ref_name = "soup:" + "|".join(cfg.ref_soup) if cfg.ref_strategy == "soup" else str(cfg.ref_model or cfg.model)
    fingerprint = _examples_fingerprint(examples, ref_name)
    if path.exists():
        try:
            cached = load_file(path)
            same = cached["fingerprint"].tolist() == list(bytes.fromhex(fingerprint))
        except Exception as err:  # truncated or corrupt (a kill, a full disk): recompute, never a traceback
            cached, same = None, False
            print(f"{path} is unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]}); recomputing")
        if same and "logps" in cached and cached["logps"].shape == (len(examples), 2) \
                and (not need_kl_pairs or "kl_logps" in cached):
            return cached["logps"], cached.get("kl_logps")
        if cached is not None:
            log.warning("tether: %s was computed for other data or another reference; recomputing", path)
    kwargs = dict(pad_token_id=tokenizer.pad_token_id, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size,
                  progress=cfg.progress)
    with reference_context(ref):
        logps = reference_logps(ref, examples, **kwargs)
        kl_logps = reference_logps(ref, _kl_pairs(examples), **kwargs)[:, 0].contiguous() if need_kl_pairs else None
    tensors = {"logps": logps, "fingerprint": torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8)}
    if kl_logps is not None:
        tensors["kl_logps"] = kl_logps
    if distributed.current().main:  # every rank computed the same values; one writes them
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save(tensors))  # fsynced, renamed into place: a kill leaves the old file or the new
    return logps, kl_logps


# ------------------------------------------------------------------------------------------------------------
# One micro-batch: forward, objective, metrics.
# ------------------------------------------------------------------------------------------------------------


def preference_step(policy, batch, *, cfg: PreferenceConfig, ref_logps=None, ref_model=None, kl_batch=None,
                    kl_ref_logps=None):
    """Loss and metrics of one micro-batch of B pairs stacked as (2B, T): rows [0, B) chosen, [B, 2B) rejected.

    ``ref_logps`` (B, 2) are cached summed reference log-probs; for full-vocabulary objectives pass ``ref_model``
    instead, and the reference's hidden states are computed here (no grad).
    """
    spec = PREFERENCE_LOSSES[cfg.loss]
    ids, mask, labels, lengths = batch["input_ids"], batch["attention_mask"], batch["labels"], batch["lengths"]
    B = ids.shape[0] // 2
    weight, bias = lm_head(policy)
    stats = ["logps"]
    ref_kw = {}
    if spec.full_vocab:
        with reference_context(ref_model):
            ref_hidden = hidden_states(ref_model, ids, mask)
        ref_weight, ref_bias = lm_head(ref_model)
        ref_kw = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
        stats += ["ref_logps", "kl"]
        stats += ["forward_kl"] if "seq_kl" in spec.needs else []
        stats += ["risk"] if "seq_risk" in spec.needs else []
    # The callers run .backward(), so the embedding gradient may go straight into .grad (less peak memory).
    hidden = hidden_states(policy, ids, mask, embedding_grad_in_place=True)
    per_token = token_stats(hidden, weight, labels, bias=bias, stats=stats, chunk_size=cfg.chunk_size,
                            risk_confidence=cfg.risk_confidence, **ref_kw)
    seq = {name: sequence_sums(value, labels) for name, value in per_token.items()}

    policy_logps = seq["logps"]
    if spec.full_vocab:
        ref_seq = seq["ref_logps"]
    elif spec.uses_reference:
        ref_seq = torch.cat([ref_logps[:, 0], ref_logps[:, 1]])
    else:
        ref_seq = None
    extras = {}
    if "lengths" in spec.needs:
        extras.update(chosen_lengths=lengths[:B].float(), rejected_lengths=lengths[B:].float())
    if "seq_kl" in spec.needs:
        extras.update(chosen_seq_kl=seq["forward_kl"][:B], rejected_seq_kl=seq["forward_kl"][B:])
    if "seq_risk" in spec.needs:
        extras.update(chosen_seq_risk=seq["risk"][:B], rejected_seq_risk=seq["risk"][B:])
    if "chosen_nll" in spec.needs:
        extras["chosen_nll"] = -policy_logps[:B] / lengths[:B].clamp(min=1)
    if "kl_reference" in spec.needs:
        with torch.no_grad():
            kl_hidden = hidden_states(policy, kl_batch["input_ids"], kl_batch["attention_mask"])
            kl_policy = sequence_sums(token_stats(kl_hidden, weight, kl_batch["labels"], bias=bias,
                                                  chunk_size=cfg.chunk_size)["logps"], kl_batch["labels"])
            kl_policy = kl_policy[: kl_policy.shape[0] // 2]
        extras["kl_reference"] = (kl_policy - kl_ref_logps).mean().clamp(min=0)
    out = spec.fn(policy_logps[:B], policy_logps[B:],
                  None if ref_seq is None else ref_seq[:B], None if ref_seq is None else ref_seq[B:],
                  **({} if cfg.beta is None else {"beta": cfg.beta}), **extras, **cfg.loss_args)
    n_tokens = lengths.sum().clamp(min=1)
    metrics = {
        "loss": out.loss.mean().item(),
        "margin": (out.chosen_rewards - out.rejected_rewards).mean().item(),
        "accuracy": (out.chosen_rewards > out.rejected_rewards).float().mean().item(),
        "chosen_logps": (policy_logps[:B] / lengths[:B].clamp(min=1)).mean().item(),
    }
    if ref_seq is not None:
        # Mean per-token log-ratio log π/π_ref on the data's responses: how far the policy moved on the data (not a
        # KL — the responses are not samples of the policy).
        metrics["logratio"] = ((policy_logps - ref_seq).sum() / n_tokens).item()
    if "kl" in seq:  # exact full-vocabulary KL(π‖π_ref) per response token, available when the reference is online
        metrics["token_kl"] = (seq["kl"].sum() / n_tokens).item()
    return out.loss, metrics


# ------------------------------------------------------------------------------------------------------------
# The recipe.
# ------------------------------------------------------------------------------------------------------------


def _micro_batches(n_examples: int, cfg: PreferenceConfig, order: list[int] | None) -> list[list[int]]:
    """The whole run's micro-batches as lists of example indices: each epoch a seeded permutation (or the fixed
    curriculum order), cut into batch_size pieces. Deterministic, so resuming can skip exactly what was done."""
    batches = []
    for epoch in range(cfg.epochs):
        if order is None:
            g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
            perm = torch.randperm(n_examples, generator=g).tolist()
        else:
            perm = order
        batches += [perm[i:i + cfg.batch_size] for i in range(0, n_examples, cfg.batch_size)]
    return batches


def _reference(cfg: PreferenceConfig, spec, policy, examples, tokenizer, out_dir: Path, sync: ReferenceSync):
    """``(reference model or None, cached (N, 2) summed reference log-probs or None, KTO's cached mismatched-pair
    log-probs or None)``. The reference is the starting policy unless ``ref_model`` names another model: the policy
    itself scores the cache before its first update (no copy in memory); objectives that need the reference online
    get a frozen copy (or, with LoRA, the base model with adapters disabled — no copy either). ``ref_strategy: soup``
    makes it the average of the ``ref_soup`` models; a moving reference is a frozen copy kept online, never
    cached."""
    if not spec.uses_reference:
        return None, None, None
    if cfg.ref_model is not None:
        ref = load_model(cfg.ref_model).to(cfg.device)
    elif cfg.ref_strategy == "soup":  # SALSA: the uniform average of the given models
        ref = frozen_copy(policy)
        ref.load_state_dict(soup_state([load_model(d).state_dict() for d in cfg.ref_soup], names=list(cfg.ref_soup)))
    elif (spec.full_vocab or sync.moving) and not cfg.lora:
        ref = frozen_copy(policy)
    else:
        ref = policy  # the starting weights (checkpoints are loaded only after this step), or LoRA's base
    if spec.full_vocab or sync.moving:
        return ref, None, None
    ref_logps, kl_ref_logps = _cached_reference(cfg, examples, ref, tokenizer, out_dir,
                                                need_kl_pairs="kl_reference" in spec.needs)
    return None, ref_logps, kl_ref_logps  # training reads the cache; a separate reference model is freed here


def _accumulate(trainable: Trainable, micro: list[list[int]], *, cfg: PreferenceConfig, examples, kl_examples,
                pad: int, ref, ref_logps, kl_ref_logps) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step; the loss is the mean over its pairs.
    Returns the pair-weighted mean of the micro-batches' metrics and the step's token count.

    Under torchrun each micro-batch's pairs are dealt to the ranks (``shard_rows``); a rank's loss is its pairs'
    sum over the step's pairs times W, which DDP / FSDP2 average back to the mean over the step's pairs."""
    world = trainable.dist.world
    n_pairs = sum(len(m) for m in micro)
    live = ref is not None and not PREFERENCE_LOSSES[cfg.loss].full_vocab  # a moving reference, scored per batch
    sums: dict[str, float] = {}
    n_tokens = 0
    for k_micro, rows in enumerate(micro):
        idx, weight = shard_rows(rows)
        batch = _on(collate_preference([examples[i] for i in idx], pad), cfg.device)
        kl_batch = (_on(collate_preference([kl_examples[i] for i in idx], pad), cfg.device)
                    if kl_examples is not None else None)
        step_ref, step_kl_ref = (None if ref_logps is None else ref_logps[idx].to(cfg.device),
                                 None if kl_ref_logps is None else kl_ref_logps[idx].to(cfg.device))
        if live:  # the reference in force now: its log-probs on this micro-batch, one no-grad pass
            score = dict(pad_token_id=pad, batch_size=len(idx), chunk_size=cfg.chunk_size)
            step_ref = reference_logps(ref, [examples[i] for i in idx], **score).to(cfg.device)
            if kl_examples is not None:
                step_kl_ref = reference_logps(ref, [kl_examples[i] for i in idx], **score)[:, 0].to(cfg.device)
        with trainable.sync(k_micro == len(micro) - 1):  # gradients are reduced once, after the last micro-batch
            loss, metrics = trainable(
                preference_step, batch, cfg=cfg, ref_model=None if live else ref, ref_logps=step_ref,
                kl_batch=kl_batch, kl_ref_logps=step_kl_ref)
            release_freed_memory()  # lower peak RSS: the backward pass is where the gradients appear
            (loss.sum() * (weight * world / n_pairs)).backward()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * len(idx) * weight
        n_tokens += int(batch["attention_mask"].sum()) * int(weight)
    sums = distributed.all_sum({**sums, "tokens": float(n_tokens)})
    return {**{k: v / n_pairs for k, v in sums.items() if k != "tokens"}, "tokens": int(sums["tokens"])}


def train(cfg: PreferenceConfig) -> TrainResult:
    if not cfg.train_file:
        raise ValueError("train_file is required: a JSONL/Parquet file or datasets directory of preference pairs")
    out_dir = start_run(cfg)
    spec = PREFERENCE_LOSSES[cfg.loss]

    # 1. Models. Gradient checkpointing is enabled before LoRA wraps the model (tether.models).
    tokenizer = load_tokenizer(cfg.model)
    policy = load_model(cfg.model).to(cfg.device)
    check_context_length(policy, cfg.max_length, name=cfg.model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if cfg.lora:
        policy = apply_lora(policy, r=cfg.lora_r, alpha=cfg.lora_alpha)
    policy.train()

    # 2. Data.
    examples, report = load_preference_dataset(
        cfg.train_file, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
        use_chat_template=cfg.use_chat_template, on_error=cfg.on_error, truncation=cfg.truncation)
    print(report.summary())
    order = curriculum_order(examples, key=cfg.curriculum_key, seed=cfg.seed) if cfg.curriculum_key else None

    # 3. Reference: summed log-probs computed once and cached, or a model kept online (full-vocabulary objectives,
    #    a moving reference).
    sync = cfg.reference_sync()
    print(f"reference: {cfg.ref_strategy}" + (f" (rate {sync.rate}, every {sync.every} optimizer steps)"
                                               if sync.moving else ""))
    ref, ref_logps, kl_ref_logps = _reference(cfg, spec, policy, examples, tokenizer, out_dir, sync)
    kl_examples = _kl_pairs(examples) if "kl_reference" in spec.needs else None

    # 4. The policy as the loop trains it (DDP / FSDP2 under torchrun), optimizer, schedule, resume.
    if cfg.lora and cfg.distributed == "fsdp2":
        raise ValueError("lora with distributed: fsdp2 is not supported; use distributed: ddp (LoRA's adapters are "
                         "small: sharding them saves little)")
    trainable = Trainable(policy)
    batches = _micro_batches(len(examples), cfg, order)
    steps_available = -(-len(batches) // cfg.grad_accum)
    total_steps = min(steps_available, cfg.max_steps) if cfg.max_steps else steps_available
    optimizer = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               contiguous_state=not distributed.is_sharded(policy))
    scheduler = make_scheduler(optimizer, schedule=cfg.schedule, warmup_steps=int(cfg.warmup_ratio * total_steps),
                               total_steps=total_steps)
    moving = {"reference": ref} if sync.moving and ref is not None else None
    state = resume_or_fresh(out_dir, resume=cfg.resume, model=policy, optimizer=optimizer, scheduler=scheduler,
                            lora=cfg.lora, modules=moving, total=total_steps)
    step = 0 if state is None else state["step"]
    if state is not None and "reference_sync" in state["extra"]:
        sync.load_state_dict(state["extra"]["reference_sync"])
    log = RunLog(out_dir, total=total_steps, start=step, desc=cfg.loss,
                 show=("loss", "margin", "accuracy", "logratio", "token_kl"), finite=("loss", "grad_norm"),
                 save_every=cfg.save_every, stop_after=cfg.stop_after, tensorboard=cfg.tensorboard,
                 progress=cfg.progress)

    def checkpoint() -> None:
        save_checkpoint(out_dir, step, model=policy, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                        modules=moving, extra={"total_steps": total_steps, "reference_sync": sync.state_dict()})

    # 5. The loop: each optimizer step accumulates grad_accum micro-batches; the loss is the mean over its pairs.
    t_start = time.perf_counter()
    while step < total_steps:
        micro = batches[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]
        row = _accumulate(trainable, micro, cfg=cfg, examples=examples, kl_examples=kl_examples,
                          pad=tokenizer.pad_token_id, ref=ref, ref_logps=ref_logps, kl_ref_logps=kl_ref_logps)
        grad_norm = optimizer_step(policy, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm, step=step + 1)
        row.update(sync.metrics())  # the reference this step's loss was computed against
        if sync.moving:  # θ_ref ← (1−r)·θ_ref + r·θ after every ref_every-th step (reset: optimizer state cleared)
            row["ref/updates"] = float(sync.step(ref, policy, optimizer))
        step += 1
        row.update(grad_norm=grad_norm, lr=scheduler.get_last_lr()[0])
        if log.end_step(step, row, checkpoint=checkpoint):
            break
    log.close()
    elapsed = time.perf_counter() - t_start
    result = TrainResult(out_dir, step, read_metrics(out_dir))
    if step < total_steps:
        return result

    # 6. Final model (LoRA merged into a copy) and KL measurement (rank 0, from the saved model).
    final = save_final(policy, tokenizer, out_dir / "final", lora=cfg.lora)
    if not distributed.current().main:
        return result
    print(f"trained {step} steps in {elapsed:.0f}s; final model in {final}")
    if cfg.eval_prompts_file:
        from tether.eval.kl import measure_kl_from_files

        result.kl_report = measure_kl_from_files(
            policy=str(final), reference=cfg.ref_model or cfg.model, prompts_file=cfg.eval_prompts_file,
            samples_per_prompt=cfg.kl_samples_per_prompt, max_new_tokens=cfg.kl_max_new_tokens, seed=cfg.seed,
            output=out_dir / "kl_report.json", chunk_size=cfg.chunk_size, progress=cfg.progress, device=cfg.device)
    return result
