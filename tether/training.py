"""Plumbing shared by the training recipes: seeding, optimizer and schedule, starting or resuming a run, metric
logging, the optimizer step, the final model.

Small functions and one small class, no base class: a recipe calls what it needs. A training loop reads::

    out_dir = start_run(cfg)                                    # directory, lock, checks, config, seeds
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

Checkpoints (``save_checkpoint``, atomic, verified by their manifest) and every atomic write are
``tether.checkpoints``; the lock and the run's fingerprint are ``tether.run_dir``.

Output directory safety (``start_run``): one run per directory (``tether.lock``), a fresh run does not delete an
earlier run's checkpoints without ``overwrite``, ``resume`` without a checkpoint is an error, the config is saved as
``tether_config.yaml``, and every file that is rewritten is replaced atomically (``atomic_write``).

Rank-aware (``tether.distributed``): in a run of several processes only rank 0 writes the config, logs, progress
bar, checkpoints and final model; the others take part in the collectives.
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
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from tether import distributed
from tether.checkpoints import (
    NonFiniteError,
    atomic_write,
    clean_leftovers,
    full_states,
    latest_checkpoint,
    load_module_state,
    load_trainer_state,
    load_weights,
    refuse_non_finite_weights,
    remove_checkpoints,
    save_pretrained_atomic,
)
from tether.run_dir import (
    CONFIG_FILE,
    MAY_CHANGE_ON_RESUME,
    RUN_FILE,
    acquire_lock,
    fingerprint_changes,
    register_run,
    registered_run,
    release_lock,
    run_fingerprint,
)

__all__ = ["set_seed", "make_optimizer", "contiguous_adam_state", "release_freed_memory", "make_scheduler",
           "start_run", "resume_or_fresh", "MetricsLogger", "read_metrics", "optimizer_step", "RunLog", "merged_copy",
           "save_final"]


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


# ------------------------------------------------------------------------------------------------------------
# Starting or resuming a run.
# ------------------------------------------------------------------------------------------------------------


def _check_start(cfg, out_dir: Path) -> tuple[str | None, Path | None]:
    """Rank 0's checks before a run starts: (a one-line problem or None, the checkpoint to resume from)."""
    resume, overwrite = bool(getattr(cfg, "resume", False)), bool(getattr(cfg, "overwrite", False))
    root = out_dir / "checkpoints"
    if root.is_dir() and (gone := clean_leftovers(root)):
        print(f"{root}: removed {len(gone)} leftover(s) of an interrupted checkpoint write or prune: "
              f"{', '.join(gone)}")
    for stale in out_dir.glob(".*.tmp"):  # an atomic_write killed before its rename
        stale.unlink(missing_ok=True)
    earlier = sorted((p.name for p in root.glob("step-*") if p.is_dir()), key=lambda n: (len(n), n)) \
        if root.is_dir() else []
    if not resume:
        if earlier and not overwrite:
            return (f"output_dir {out_dir} holds the checkpoints of an earlier run ({', '.join(earlier)}): set "
                    "resume: true to continue that run, or overwrite: true to delete them and start over "
                    "(or choose another output_dir)"), None
        return None, None
    ckpt = latest_checkpoint(out_dir, verify=True)
    if ckpt is None:
        what = f"none of {', '.join(earlier)} is intact" if earlier else "there is none"
        return (f"resume: no checkpoint to resume from in {root} ({what}); run without resume to start "
                "fresh"), None
    saved_path = ckpt / RUN_FILE
    if saved_path.is_file():
        refused, allowed = fingerprint_changes(json.loads(saved_path.read_text()), run_fingerprint(cfg))
        if refused:
            return (f"resume refused: since checkpoint {ckpt.name} the run's config or data changed — "
                    f"{'; '.join(refused)}; only {', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change on resume. "
                    "Resume with the original values, or start over with overwrite: true"), None
        if allowed:
            print(f"resuming {ckpt.name} with changed {'; '.join(allowed)}")
    else:
        print(f"{ckpt} records no config fingerprint (an older tether wrote it); resuming without that check")
    return None, ckpt


def start_run(cfg) -> Path:
    """Join the run's processes (``cfg.distributed``: ``tether.distributed.init``), create ``cfg.output_dir``, lock
    it (:func:`acquire_lock`), check the start, write the config there as ``tether_config.yaml`` (rank 0), and seed
    every RNG with ``cfg.seed`` (the same on every rank).

    The checks, before any model is loaded: ``output_dir`` is not (inside) an input model directory
    (``tether.config.check_output_dir``); leftovers of an interrupted checkpoint write or prune are removed; a
    fresh run in a directory holding an earlier run's checkpoints needs ``overwrite: true``; ``resume: true`` needs
    an intact checkpoint (the newest one that passes its manifest's sha256 check) whose recorded config and data
    (:func:`run_fingerprint`) match this run's except in :data:`MAY_CHANGE_ON_RESUME`. Each failure is a one-line
    ``ValueError``."""
    from tether.config import check_output_dir

    dist = distributed.init(getattr(cfg, "distributed", "none"), getattr(cfg, "device", "cpu"))
    out_dir = Path(cfg.output_dir)
    problem = ckpt = None
    if dist.main:
        try:
            check_output_dir(cfg)
            out_dir.mkdir(parents=True, exist_ok=True)
            acquire_lock(out_dir)
            problem, ckpt = _check_start(cfg, out_dir)
        except ValueError as err:
            problem = str(err)
        if problem is None:
            register_run(out_dir, fingerprint=run_fingerprint(cfg), resume_from=ckpt)
            atomic_write(out_dir / CONFIG_FILE, _yaml_dump(dataclasses.asdict(cfg)))
    problem = distributed.broadcast_object(problem)
    if problem is not None:
        raise ValueError(problem)
    set_seed(cfg.seed)
    return out_dir


def _yaml_dump(values: dict) -> str:
    import yaml

    return "# the config of this run (tether); pass it back with --config\n" + yaml.safe_dump(
        json.loads(json.dumps(values, default=str)), sort_keys=False)


def resume_or_fresh(out_dir: Path, *, resume: bool, model, optimizer, scheduler, lora: bool,
                    modules: dict | None = None, total: int | None = None) -> dict | None:
    """With ``resume``, restore the newest intact checkpoint (the one :func:`start_run` checked, else
    ``latest_checkpoint(verify=True)``) — weights (the adapter only with LoRA), optimizer, scheduler, RNG states and
    the named ``modules`` (e.g. a reference that moves) — and return its state (``step``, ``extra``). Otherwise
    return None after removing an earlier run's checkpoints (which would outrank this run's in pruning and in a
    later resume; :func:`start_run` refuses that without ``overwrite``), saying which."""
    dist = distributed.current()
    if resume:
        ckpt = None
        if dist.main:
            run = registered_run(out_dir)
            ckpt = run["resume_from"] if run and run["resume_from"] else latest_checkpoint(out_dir, verify=True)
        ckpt = distributed.broadcast_object(ckpt)
        if ckpt is None:
            raise ValueError(f"resume: no intact checkpoint in {Path(out_dir) / 'checkpoints'}; run without resume "
                             "to start fresh")
        load_weights(model, ckpt, lora=lora)
        state = load_trainer_state(ckpt, optimizer=optimizer, scheduler=scheduler, model=model)
        for name, module in (modules or {}).items():
            load_module_state(module, ckpt, name)
        if dist.main:
            print(f"resumed from {ckpt} at step {state['step']}" + (f"/{total}" if total else ""))
        return state
    if dist.main and (removed := remove_checkpoints(out_dir)):
        print(f"fresh run (overwrite): removed the checkpoints of an earlier run in "
              f"{Path(out_dir) / 'checkpoints'} ({', '.join(removed)})")
    distributed.barrier()
    return None


# ------------------------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl and TensorBoard.
# ------------------------------------------------------------------------------------------------------------


def _metric_lines(path: Path) -> tuple[list[str], bool]:
    """(the intact lines of ``metrics.jsonl``, whether a torn last line was dropped). Lines are only ever
    appended, so an unparsable LAST line is an append cut short (a kill, a full disk) and is dropped; an
    unparsable line elsewhere is damage, a ``ValueError`` naming the line."""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        try:
            ok = isinstance(json.loads(ln), dict)
        except ValueError:
            ok = False
        if not ok:
            if i == len(lines) - 1:
                return lines[:-1], True
            raise ValueError(f"{path}: line {i + 1} is not a JSON object ({ln[:40]!r}); the file is damaged — "
                             "delete that line and run again")
    return lines, False


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    On resume, lines after the resumed step (and a torn last line) are removed first, so the file always reads as
    one uninterrupted run; that rewrite is atomic (:func:`atomic_write`): a kill during it leaves the old file.
    """

    def __init__(self, output_dir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step > 0 and self.path.exists():
            lines, torn = _metric_lines(self.path)
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            if torn or len(kept) < len(lines) or not self.path.read_bytes().endswith(b"\n"):
                atomic_write(self.path, "".join(ln + "\n" for ln in kept))
                dropped = len(lines) - len(kept)
                if dropped or torn:
                    print(f"{self.path}: removed {dropped} line(s) logged after step {resume_step} (the checkpoint "
                          "resumed from)" + (" and a torn last line" if torn else ""))
        elif resume_step == 0 and self.path.exists():
            self.path.unlink()
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
    """The rows of ``metrics.jsonl`` (a torn last line left out)."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in _metric_lines(path)[0]] if path.exists() else []


# ------------------------------------------------------------------------------------------------------------
# The steps every recipe's loop takes.
# ------------------------------------------------------------------------------------------------------------


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
        self.total, self.show, self.finite, self.out_dir, self.step = total, show, finite, out_dir, start
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
        self.step = step
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
        """Close the bar and the logs; a run stopped before its last step (``stop_after``) gives up its lock on the
        output directory here (a finished one in :func:`save_final`)."""
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.step < self.total:
            release_lock(self.out_dir)


def merged_copy(model):
    """A plain model with the LoRA adapters of ``model`` merged in, leaving ``model`` itself untouched (peft's
    ``merge_and_unload`` works in place: called on the live policy it would turn the policy and its reference —
    the same module with adapters off — into one model, and every later KL would read 0)."""
    return copy.deepcopy(model).merge_and_unload()


def save_final(model, tokenizer, target: Path, *, lora: bool) -> Path:
    """The final model in Hugging Face format at ``target``, written atomically; with LoRA, the adapters merged
    into a copy (the live model keeps its adapters). In a distributed run every rank calls this (FSDP2 gathers the
    shards) and rank 0 writes."""
    state, _ = full_states(model, None)
    refuse_non_finite_weights(model if state is None else state, f"the final model {target}")
    if distributed.current().main:
        save_pretrained_atomic(merged_copy(model) if lora else model, tokenizer, target, state_dict=state)
        release_lock(target.parent)  # the run's output is complete: another run may use the directory
    distributed.barrier()
    return target
