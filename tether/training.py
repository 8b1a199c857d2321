"""Plumbing shared by the training recipes: seeding, optimizer and schedule, atomic checkpoints, metric logging.

Small functions and one small class, no base class: a recipe calls what it needs. A training loop reads::

    out_dir = start_run(cfg)                                    # directory, config.json, seeds
    state = resume_or_fresh(out_dir, resume=cfg.resume, model=policy, optimizer=opt, scheduler=sched, lora=...)
    log = RunLog(out_dir, total=steps, start=step, ...)         # progress bar, metrics.jsonl, TensorBoard, cadence
    while step < steps:
        ... loss.backward() ...
        grad_norm = optimizer_step(policy, opt, sched, max_grad_norm=cfg.max_grad_norm)
        step += 1
        if log.end_step(step, metrics, checkpoint=lambda: save_checkpoint(...)):
            break                                               # stop_after
    log.close()
    save_final(policy, tokenizer, out_dir / "final", lora=cfg.lora)   # LoRA merged into a copy

Checkpoints are directories ``<output_dir>/checkpoints/step-<k>/`` holding the model in Hugging Face format
(``save_pretrained``, safetensors; only the adapter when training with LoRA), the tokenizer, and
``trainer_state.pt`` (optimizer, scheduler and RNG states — tensors and plain Python values only, read back with
``torch.load(weights_only=True)``). Each is written to a temporary directory and renamed into place, so a
checkpoint directory either exists complete or not at all; a run killed mid-write leaves only a temporary
directory, which is ignored and cleaned up on the next save.

Rank-aware (``tether.distributed``): in a run of several processes only rank 0 writes the config, logs, progress
bar, checkpoints and final model; the others take part in the collectives. A checkpoint holds the full model (under
FSDP2 gathered from the shards, so any number of processes — one included — loads it), rank 0's trainer state (under
FSDP2 the optimizer as a full, name-keyed state dict) and each other rank's RNG state (``rng-rank<r>.pt``).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tether import distributed

__all__ = ["set_seed", "make_optimizer", "contiguous_adam_state", "release_freed_memory", "make_scheduler",
           "save_checkpoint", "latest_checkpoint", "load_trainer_state", "load_module_state", "load_weights",
           "save_pretrained_atomic", "MetricsLogger", "read_metrics", "NonFiniteError", "start_run",
           "resume_or_fresh", "optimizer_step", "RunLog", "save_final", "merged_copy"]


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model, *, lr: float, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                   eps: float = 1e-8, contiguous_state: bool = True) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors).

    The fused implementation updates each parameter in one pass: on CPU it is ~5× faster than the default
    multi-tensor ("foreach") path and allocates no parameter-sized temporaries, which lowers peak memory.

    ``contiguous_state``: AdamW's moments are created, at the first step as torch does, as views into one
    contiguous buffer per (device, dtype) (``contiguous_adam_state``) instead of two allocations per parameter.
    The values and the update are identical; only where the memory lives changes (see that function).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)
    if contiguous_state:
        optimizer.register_step_pre_hook(contiguous_adam_state)
    return optimizer


def contiguous_adam_state(optimizer: torch.optim.Optimizer, args=(), kwargs=None) -> None:
    """Create the state of every parameter about to get its first AdamW update — ``step`` = 0 and zero
    ``exp_avg`` / ``exp_avg_sq`` — with both moments as views into ONE contiguous zero buffer per (device, dtype).

    A step pre-hook (``make_optimizer`` registers it), so the state appears exactly when torch's lazy
    initialization would create it, for the same parameters (those with a gradient), with the same values, dtypes
    and shapes (``tests/test_training.py`` checks the updates against a plain AdamW bit for bit). Parameters that
    already have state (e.g. after ``load_state_dict``) are left alone; only fused, non-amsgrad AdamW groups are
    handled, others keep torch's own initialization.

    Why: torch allocates the moments as two tensors per parameter, mostly 0.4–3.5 MB each for a small LM, from the
    allocator's heap (glibc malloc on Linux), at the first step, in the gaps left by that step's freed
    activations. These live for the whole run and pin the heap around them, so freed activation memory between them
    stays resident. One buffer (1 GB for SmolLM2-135M) is a separate mapping outside the heap. Measured on the DPO
    step of ``bench/dpo_vs_trl.py`` (SmolLM2-135M, fp32, CPU): ~60 MB lower peak RSS, no speed change.
    """
    new: dict[tuple, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        if not group.get("fused") or group.get("amsgrad"):
            continue
        for p in group["params"]:
            if p.grad is not None and not optimizer.state[p] and p.is_contiguous():
                new.setdefault((p.device, p.dtype), []).append(p)
    if new:
        release_freed_memory()  # the first step's freed activations would otherwise stay resident under the state
    for (device, dtype), params in new.items():
        sizes = [p.numel() for p in params]
        moments = torch.zeros(2, sum(sizes), device=device, dtype=dtype).split(sizes, dim=1)
        for p, m in zip(params, moments):
            optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),  # torch's fused init
                                  "exp_avg": m[0].view_as(p), "exp_avg_sq": m[1].view_as(p)}


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim(0)``; a no-op elsewhere).

    glibc keeps memory freed by torch's CPU tensors (activations of ~1–25 MB) in its heap, where the long-lived
    allocations around it pin it: a training step's peak RSS then carries a few hundred MB of memory that is free
    but resident. The recipes call this before each backward pass and ``contiguous_adam_state`` before creating the
    optimizer state (the step where the moments are allocated). A call takes milliseconds; pages it releases are
    faulted back in when reused. Measured on the DPO step of ``bench/dpo_vs_trl.py``: see bench/README.md.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def make_scheduler(optimizer, *, schedule: str, warmup_steps: int, total_steps: int):
    """Linear warm-up from 0 over ``warmup_steps``, then ``constant``, ``linear`` decay to 0, or ``cosine`` to 0."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached_gaussian"]))


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model, tokenizer, optimizer, scheduler,
                    extra: dict | None = None, modules: dict | None = None, keep: int = 2) -> Path:
    """Write ``checkpoints/step-<step>`` atomically and keep only the newest ``keep`` checkpoints.

    ``modules`` (name → ``nn.Module``) are saved alongside as ``<name>.safetensors`` (e.g. a reference model that
    changes during training); read them back with :func:`load_module_state`. In a distributed run every rank calls
    this (FSDP2 gathers the shards; each rank's RNG state is kept); rank 0 writes."""
    dist = distributed.current()
    root = Path(output_dir) / "checkpoints"
    model_state, optim_state = _full_states(model, optimizer)  # collective under FSDP2
    _refuse_non_finite_weights(model if model_state is None else model_state, f"checkpoint step-{step}")
    tmp = None
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    tmp = Path(distributed.broadcast_object(tmp))
    if not dist.main:
        torch.save(_rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    final = root / f"step-{step}"
    if dist.main:
        model.save_pretrained(tmp, safe_serialization=True, **({} if model_state is None else
                                                                {"state_dict": model_state}))
        tokenizer.save_pretrained(tmp)
        state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "rng": _rng_state(), "extra": extra or {}, "optimizer_by_name": model_state is not None}
        torch.save(state, tmp / "trainer_state.pt")
        for name, module in (modules or {}).items():
            from safetensors.torch import save_model

            save_model(module, str(tmp / f"{name}.safetensors"))  # tied weights are stored once
    distributed.barrier()  # every rank's RNG file is in place
    if dist.main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(_complete(root), key=_step_of)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _full_states(model, optimizer) -> tuple[dict | None, dict]:
    """(model state dict or None, optimizer state dict) to save. Under FSDP2 both are gathered from the shards
    into full state dicts on the CPU (the optimizer's keyed by parameter name); otherwise (None: the model saves
    itself, the optimizer's own ``state_dict``)."""
    if not distributed.is_sharded(model):
        return None, None if optimizer is None else optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            None if optimizer is None else get_optimizer_state_dict(model, optimizer, options=opts))


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


def _complete(root: Path) -> list[Path]:
    return [p for p in root.glob("step-*") if (p / "trainer_state.pt").is_file()]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    found = _complete(root) if root.is_dir() else []
    return max(found, key=_step_of) if found else None


def remove_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete ``<output_dir>/checkpoints/step-*`` (and unfinished ``.tmp-*`` writes); return the removed names.

    A fresh run calls this before its first step: otherwise checkpoints left by an earlier, longer run in the same
    directory would outrank the new run's in ``save_checkpoint``'s pruning (the new ones would be deleted) and in
    ``latest_checkpoint`` (a later ``resume`` would continue the old run)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    removed = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: (len(p.name), p.name))
    for path in removed + list(root.glob(".tmp-*")):
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in removed]


def load_module_state(module, checkpoint: Path, name: str) -> None:
    """Load ``<checkpoint>/<name>.safetensors`` written by ``save_checkpoint(modules={name: module})``."""
    from safetensors.torch import load_model

    load_model(module, str(checkpoint / f"{name}.safetensors"))


def load_trainer_state(checkpoint: Path, *, optimizer, scheduler, model=None) -> dict:
    """Restore optimizer, scheduler and RNG states (this rank's own, in a distributed run); return the saved dict
    (``step``, ``extra``). ``model``: the trained model, needed when the optimizer is sharded (FSDP2)."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    sharded = model is not None and distributed.is_sharded(model)
    if bool(state.get("optimizer_by_name", False)) != sharded:
        raise ValueError(f"{checkpoint}: its optimizer state was saved {'with' if not sharded else 'without'} "
                         "FSDP2 sharding; resume with the same distributed setting (weights load anywhere)")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rank = distributed.current().rank
    own = checkpoint / f"rng-rank{rank}.pt"
    _set_rng_state(torch.load(own, weights_only=True) if rank > 0 and own.is_file() else state["rng"])
    return state


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, lines after the resumed step are removed first, so the file always reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        elif resume_step == 0 and self.path.exists():
            self.path.unlink()
        if kept:
            self.path.write_text("\n".join(kept) + "\n")
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def load_weights(policy, ckpt: Path, *, lora: bool) -> None:
    """Load a checkpoint's weights into the live model (keeps parameter identity for the optimizer); with LoRA only
    the adapter is read."""
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, load_file(ckpt / "adapter_model.safetensors"))
        return
    state = {}
    for shard in sorted(ckpt.glob("model*.safetensors")):  # save_pretrained's file or shards, nothing else
        state.update(load_file(shard))
    if distributed.is_sharded(policy):  # FSDP2: each rank keeps its shard of the full tensors
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        missing, unexpected = set_model_state_dict(policy, state, options=StateDictOptions(full_state_dict=True,
                                                                                          strict=False))
    else:
        missing, unexpected = policy.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(policy.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {ckpt} does not match the model: missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)}")


def save_pretrained_atomic(model, tokenizer, target: Path, *, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (of ``state_dict`` when given) into a temporary sibling directory, then rename it to
    ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


# ------------------------------------------------------------------------------------------------------------
# The steps every recipe's loop takes.
# ------------------------------------------------------------------------------------------------------------


class NonFiniteError(ValueError):
    """A loss or gradient became NaN or infinite: the step is refused before it reaches the weights."""


def _refuse_non_finite_weights(source, what: str) -> None:
    """Raise :class:`NonFiniteError` instead of saving ``what`` when a floating-point weight of ``source`` (a
    module, or a full state dict on rank 0) holds NaN or inf; the decision is rank 0's, broadcast to every rank.
    A step whose gradient was finite can still push a weight past the float range (a huge learning rate); this
    keeps such weights out of every checkpoint and final model."""
    bad = None
    if distributed.current().main:
        items = source.items() if isinstance(source, dict) else source.named_parameters()
        bad = [name for name, t in items if torch.is_tensor(t) and t.is_floating_point()
               and not bool(torch.isfinite(t).all())]
    bad = distributed.broadcast_object(bad)
    if bad:
        raise NonFiniteError(f"{what}: weights {bad[:3]}{' …' if len(bad) > 3 else ''} hold NaN or inf; not saved "
                             "(the previous checkpoint holds finite weights) — lower lr or max_grad_norm")


def start_run(cfg) -> Path:
    """Join the run's processes (``cfg.distributed``: ``tether.distributed.init``), create ``cfg.output_dir``, write
    the config there as ``config.json`` (rank 0), and seed every RNG with ``cfg.seed`` (the same on every rank)."""
    dist = distributed.init(getattr(cfg, "distributed", "none"), getattr(cfg, "device", "cpu"))
    out_dir = Path(cfg.output_dir)
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    distributed.barrier()
    set_seed(cfg.seed)
    return out_dir


def resume_or_fresh(out_dir: Path, *, resume: bool, model, optimizer, scheduler, lora: bool,
                    modules: dict | None = None, total: int | None = None) -> dict | None:
    """With ``resume``, restore the newest checkpoint — weights (the adapter only with LoRA), optimizer, scheduler,
    RNG states and the named ``modules`` (e.g. a reference that moves) — and return its state (``step``, ``extra``).
    Otherwise, or when there is none, return None after removing an earlier run's checkpoints (which would outrank
    this run's in pruning and in a later resume), saying which."""
    dist = distributed.current()
    if resume and (ckpt := distributed.broadcast_object(latest_checkpoint(out_dir))) is not None:
        load_weights(model, ckpt, lora=lora)
        state = load_trainer_state(ckpt, optimizer=optimizer, scheduler=scheduler, model=model)
        for name, module in (modules or {}).items():
            load_module_state(module, ckpt, name)
        if dist.main:
            print(f"resumed from {ckpt} at step {state['step']}" + (f"/{total}" if total else ""))
        return state
    if dist.main and (removed := remove_checkpoints(out_dir)):
        print(f"fresh run: removed the checkpoints of an earlier run in {Path(out_dir) / 'checkpoints'} "
              f"({', '.join(removed)}); resume=True continues a run instead")
    distributed.barrier()
    return None


def optimizer_step(model, optimizer, scheduler, *, max_grad_norm: float, step: int | None = None) -> float:
    """Clip the gradient norm to ``max_grad_norm`` (0: no clipping), step optimizer and schedule, zero the gradients;
    return the gradient norm before clipping. A non-finite norm (a NaN or inf anywhere in the gradient) raises
    :class:`NonFiniteError` before the optimizer touches the weights."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP2: the norm of all shards
    if not math.isfinite(norm):
        where = f"step {step}: " if step is not None else ""
        raise NonFiniteError(f"{where}the gradient norm is {norm}: the loss or a reward is not finite (or lr is too "
                             "high); no update was applied — the last checkpoint holds finite weights")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class RunLog:
    """What a training loop reports and when it checkpoints: a progress bar showing the ``show`` metrics,
    ``metrics.jsonl`` and TensorBoard (``MetricsLogger``), a checkpoint every ``save_every`` steps, at the last step
    and at ``stop_after``, and the stop at ``stop_after``. A ``finite`` metric that is NaN or inf stops the run with
    :class:`NonFiniteError` before it is logged or checkpointed."""

    def __init__(self, out_dir: Path, *, total: int, start: int, desc: str, show: tuple[str, ...],
                 finite: tuple[str, ...] = ("loss",), save_every: int = 0, stop_after: int | None = None,
                 tensorboard: bool = True, progress: bool = True):
        self.total, self.show, self.finite = total, show, finite
        self.save_every, self.stop_after = save_every, stop_after
        main = distributed.current().main  # other ranks write nothing but still checkpoint (a collective) and stop
        self.metrics = MetricsLogger(out_dir, resume_step=start, tensorboard=tensorboard) if main else None
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=not (progress and main), dynamic_ncols=True)

    def log(self, step: int, row: dict[str, float]) -> None:
        """Record metrics without ending a step (e.g. an evaluation before the first step)."""
        if self.metrics is not None:
            self.metrics.log(step, row)

    def end_step(self, step: int, row: dict[str, float], *, checkpoint) -> bool:
        """Record step ``step``'s metrics, call ``checkpoint()`` when one is due; True when the loop must stop here
        (``stop_after``, before the last step)."""
        bad = [k for k in self.finite if k in row and not math.isfinite(row[k])]
        if bad:
            raise NonFiniteError(f"step {step}: {', '.join(f'{k}={row[k]}' for k in bad)} is not finite; stopping "
                                 "(the last checkpoint holds the weights before this step)")
        self.log(step, row)
        self.bar.set_postfix({k: f"{row[k]:.3g}" for k in self.show if k in row})
        self.bar.update(1)
        if (self.save_every and step % self.save_every == 0) or step == self.total or step == self.stop_after:
            checkpoint()
        if self.stop_after is not None and self.stop_after <= step < self.total:
            if self.metrics is not None:
                print(f"stopped after step {step} (stop_after); continue with resume=True")
            return True
        return False

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()


def merged_copy(model):
    """A plain model with the LoRA adapters of ``model`` merged in, leaving ``model`` itself untouched (peft's
    ``merge_and_unload`` works in place: called on the live policy it would turn the policy and its reference —
    the same module with adapters off — into one model, and every later KL would read 0)."""
    return copy.deepcopy(model).merge_and_unload()


def save_final(model, tokenizer, target: Path, *, lora: bool) -> Path:
    """The final model in Hugging Face format at ``target``, written atomically; with LoRA, the adapters merged
    into a copy (the live model keeps its adapters). In a distributed run every rank calls this (FSDP2 gathers the
    shards) and rank 0 writes."""
    state, _ = _full_states(model, None)
    _refuse_non_finite_weights(model if state is None else state, f"the final model {target}")
    if distributed.current().main:
        save_pretrained_atomic(merged_copy(model) if lora else model, tokenizer, target, state_dict=state)
    distributed.barrier()
    return target
