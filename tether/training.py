"""Plumbing shared by the training recipes: seeding, optimizer and schedule, atomic checkpoints, metric logging.

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

Checkpoints are directories ``<output_dir>/checkpoints/step-<k>/`` holding the model in Hugging Face format
(``save_pretrained``, safetensors; only the adapter when training with LoRA), the tokenizer, and
``trainer_state.pt`` (optimizer, scheduler and RNG states — tensors and plain Python values only, read back with
``torch.load(weights_only=True)``). Each is written to a temporary directory and renamed into place, so a
checkpoint directory either exists complete or not at all; a run killed mid-write leaves only a temporary
directory, which is ignored and cleaned up on the next save. Each also holds ``run.json`` (the run's config and the
sha256 of its data files: a resume with changed values is refused) and, written last, ``manifest.json`` (every
file's size and sha256: a truncated or corrupt checkpoint is skipped for the previous intact one).

Output directory safety (``start_run``): one run per directory (``tether.lock``), a fresh run does not delete an
earlier run's checkpoints without ``overwrite``, ``resume`` without a checkpoint is an error, the config is saved as
``tether_config.yaml``, and every file that is rewritten is replaced atomically (``atomic_write``).

Rank-aware (``tether.distributed``): in a run of several processes only rank 0 writes the config, logs, progress
bar, checkpoints and final model; the others take part in the collectives. A checkpoint holds the full model (under
FSDP2 gathered from the shards, so any number of processes — one included — loads it), rank 0's trainer state (under
FSDP2 the optimizer as a full, name-keyed state dict) and each other rank's RNG state (``rng-rank<r>.pt``).
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import random
import shutil
import signal
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
           "resume_or_fresh", "optimizer_step", "RunLog", "save_final", "merged_copy", "atomic_write",
           "verify_checkpoint", "remove_checkpoints", "acquire_lock", "release_lock", "run_fingerprint",
           "is_write_failure", "load_cache", "MAY_CHANGE_ON_RESUME", "CONFIG_FILE"]


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
    this (FSDP2 gathers the shards; each rank's RNG state is kept); rank 0 writes.

    Durability: the files are written into a temporary directory, the run's fingerprint (``run.json``, see
    :func:`start_run`) added, every file fsynced and listed with its size and sha256 in ``manifest.json`` (written
    last), and only then is the directory renamed to ``step-<step>``; a checkpoint without an intact manifest is
    never resumed from (:func:`latest_checkpoint`). Older checkpoints are pruned by renaming them to hidden
    ``.trash-*`` directories first and deleting those afterwards, so a kill mid-prune leaves no half-deleted
    ``step-*``. A write that fails for lack of space (or any OS error) removes the temporary directory and raises
    a one-line ``OSError`` saying the previous checkpoint is intact."""
    dist = distributed.current()
    root = Path(output_dir) / "checkpoints"
    model_state, optim_state = _full_states(model, optimizer)  # collective under FSDP2
    _refuse_non_finite_weights(model if model_state is None else model_state, f"checkpoint step-{step}")
    tmp = failure = None
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(root)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    tmp = Path(distributed.broadcast_object(tmp))
    if not dist.main:
        torch.save(_rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    final = root / f"step-{step}"
    if dist.main:
        try:
            model.save_pretrained(tmp, safe_serialization=True, **({} if model_state is None else
                                                                    {"state_dict": model_state}))
            tokenizer.save_pretrained(tmp)
            state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                     "rng": _rng_state(), "extra": extra or {}, "optimizer_by_name": model_state is not None}
            torch.save(state, tmp / "trainer_state.pt")
            for name, module in (modules or {}).items():
                from safetensors.torch import save_model

                save_model(module, str(tmp / f"{name}.safetensors"))  # tied weights are stored once
            if (run := _RUNS.get(_run_key(output_dir))) is not None:
                (tmp / RUN_FILE).write_text(json.dumps(run["fingerprint"], indent=1, default=str))
        except Exception as err:
            failure = _write_failure_message(err, tmp, root, step)
    distributed.barrier()  # every rank's RNG file is in place
    if dist.main and failure is None:
        try:
            _write_manifest(tmp)
            _fault(f"checkpoint-rename:{final.name}")
            if final.exists():
                _remove_dir(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except Exception as err:
            failure = _write_failure_message(err, tmp, root, step)
    failure = distributed.broadcast_object(failure)
    if failure is not None:
        raise OSError(errno.ENOSPC, failure)
    if dist.main:
        for old in sorted(_complete(root), key=_step_of)[:-keep]:
            _remove_dir(old)
    distributed.barrier()
    return final


def is_write_failure(err: BaseException) -> bool:
    """True for an error a failed write raises: an ``OSError`` (disk full, quota, read-only, I/O), or what torch's
    zip writer and safetensors raise instead when a write fails part-way (a ``RuntimeError`` "unexpected pos 17024
    vs 16916" / "PytorchStreamWriter failed writing file", a ``SafetensorError`` "... StorageFull ...")."""
    if isinstance(err, OSError):
        return True
    return (isinstance(err, RuntimeError) or type(err).__name__ == "SafetensorError") and any(
        s in str(err) for s in _WRITE_FAILURES)


_WRITE_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed", "No space left on device",
                   "StorageFull", "os error 28", "Disk quota exceeded")


def _write_failure_message(err: Exception, tmp: Path, root: Path, step: int) -> str:
    if not is_write_failure(err):
        raise err
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(err, OSError) and err.strerror:
        why = err.strerror
    else:
        why = " ".join(str(err).split())[:200]
    previous = latest_checkpoint(root.parent)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    return (f"checkpoint step-{step} could not be written in {root} ({why}); nothing of it was kept and {kept} — "
            "free disk space (or choose another output_dir) and continue with resume: true")


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


MANIFEST = "manifest.json"
RUN_FILE = "run.json"


def _is_step_dir(path: Path) -> bool:
    name = path.name
    return name.startswith("step-") and name[5:].isdigit() and path.is_dir()


def _complete(root: Path) -> list[Path]:
    """The ``step-*`` directories whose manifest is in place (written last) — without reading their files."""
    return [p for p in root.glob("step-*") if _is_step_dir(p) and (p / MANIFEST).is_file()]


def _sha256_and_sync(path: Path) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        os.fsync(f.fileno())
    return digest


def _write_manifest(directory: Path) -> None:
    """fsync every file of ``directory`` and record its size and sha256 in ``manifest.json``, written last."""
    files = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        files[f.relative_to(directory).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256_and_sync(f)}
    atomic_write(directory / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_checkpoint(ckpt: Path, *, hashes: bool = True) -> str | None:
    """None when every file listed in ``ckpt``'s manifest is there with its size (and, with ``hashes``, its
    sha256); otherwise what is wrong, in words."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
        items = [(str(name), int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is missing or unreadable"
    for name, size, digest in items:
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes where the manifest says {size}"
        if hashes and _sha256_and_sync(f) != digest:
            return f"{name} does not match its sha256 in the manifest"
    return None


def latest_checkpoint(output_dir: str | os.PathLike, *, verify: bool = False) -> Path | None:
    """The newest checkpoint of ``output_dir`` whose manifest is in place and whose files have their recorded
    sizes; with ``verify``, also their sha256. A damaged checkpoint is skipped (saying why, on rank 0), so a
    truncated or corrupt latest checkpoint falls back to the previous intact one."""
    root = Path(output_dir) / "checkpoints"
    found = sorted(_complete(root), key=_step_of, reverse=True) if root.is_dir() else []
    for ckpt in found:
        problem = verify_checkpoint(ckpt, hashes=verify)
        if problem is None:
            return ckpt
        if distributed.current().main:
            print(f"checkpoint {ckpt} is damaged ({problem}); skipping it for an older one")
    return None


def remove_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Delete ``<output_dir>/checkpoints/step-*`` (and unfinished ``.tmp-*`` writes, ``.trash-*`` leftovers of an
    interrupted prune); return the removed names. Each directory is renamed to a hidden ``.trash-*`` name before it
    is deleted, so an interruption never leaves a half-deleted ``step-*``.

    A fresh run with ``overwrite`` calls this before its first step: otherwise checkpoints left by an earlier,
    longer run in the same directory would outrank the new run's in ``save_checkpoint``'s pruning (the new ones
    would be deleted) and in ``latest_checkpoint`` (a later ``resume`` would continue the old run)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    removed = sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: (len(p.name), p.name))
    for path in removed:
        _remove_dir(path)
    _clean_leftovers(root)
    return [p.name for p in removed]


def _remove_dir(path: Path) -> None:
    """Rename ``path`` to a hidden ``.trash-*`` sibling, then delete that: a kill mid-delete leaves only a
    ``.trash-*`` directory (removed by the next save or start), never a half-deleted directory under its name."""
    trash = path.parent / f".trash-{path.name}-{os.urandom(4).hex()}"  # os.urandom: the run's RNGs stay untouched
    os.replace(path, trash)
    _fault("prune")
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(root: Path) -> list[str]:
    """Remove what an interrupted write (``.tmp-*``) or prune (``.trash-*``) left in ``root``; return the names."""
    gone = sorted(p.name for p in list(root.glob(".tmp-*")) + list(root.glob(".trash-*")))
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    return gone


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


def _fault(point: str) -> None:
    """Test hook: with ``TETHER_TEST_KILL_AT=<point>`` in the environment this process kills itself with SIGKILL at
    ``point`` ('prune', 'checkpoint-rename:step-<k>', 'rewrite:<file name>'), so the kill-and-resume tests interrupt a
    write at a chosen moment. Does nothing otherwise."""
    if os.environ.get("TETHER_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Replace ``path`` by ``data`` atomically: a temporary sibling (``.<name>.*.tmp``) is written, fsynced and
    renamed over it, then the directory is fsynced — a kill or a full disk leaves the old file or the new one,
    never a mix (the temporary file is removed on an error; a killed one is cleaned by ``start_run``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _fault(f"rewrite:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_cache(path: str | os.PathLike) -> dict | None:
    """The tensors of a safetensors cache file, or None when it cannot be read (truncated or corrupt by a kill or
    a full disk: the caller recomputes it; said on stdout)."""
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own error type for a damaged file
        print(f"{path} is unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]}); recomputing")
        return None


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
        _remove_dir(target)  # renamed away first: a kill here leaves the new copy in tmp, never half a model
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


#: Config fields that may differ between a checkpoint and the run resuming from it: the length of the run, its
#: cadence, where and how it reports, where it runs. Every other field (lr, batch sizes, loss, β, model, data, …)
#: shapes the trajectory, so a resume with a changed value is refused (:func:`start_run`).
MAY_CHANGE_ON_RESUME = frozenset({"resume", "overwrite", "stop_after", "steps", "max_steps", "save_every",
                                  "eval_every", "log_every", "tensorboard", "progress", "output_dir", "device",
                                  "distributed"})
CONFIG_FILE = "tether_config.yaml"  # not config.json: a Hugging Face model directory's config has that name
LOCK_FILE = "tether.lock"
_RUNS: dict[str, dict] = {}  # output_dir (resolved) → this process's run there: fingerprint, checkpoint to resume
_LOCKS: dict[str, int] = {}  # output_dir (resolved) → the open, flock'ed lock file of this process


def _run_key(output_dir) -> str:
    return str(Path(output_dir).resolve())


def _data_hash(path: Path) -> str:
    """sha256 of a data file, or of a dataset directory's files (names and contents)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if f != path else b"")
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest()


def run_fingerprint(cfg) -> dict:
    """What a checkpoint records of the run that wrote it: every config field's value and the sha256 of every
    input data file (fields named ``*_file``, which may be dataset directories)."""
    config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    data = {}
    for name, value in config.items():
        if name.endswith("_file") and isinstance(value, str) and value and Path(value).exists():
            data[name] = _data_hash(Path(value))
    return {"config": config, "data": data}


def _fingerprint_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
    """(changes that refuse a resume, changes that may happen), each as 'field: old → new' in words."""
    refused, allowed = [], []
    old_cfg, new_cfg = saved.get("config", {}), now["config"]
    for name in sorted(set(old_cfg) | set(new_cfg)):
        a, b = old_cfg.get(name, "<absent>"), new_cfg.get(name, "<absent>")
        if a != b:
            if name not in ("resume", "stop_after", "overwrite", "progress", "tensorboard"):  # expected: not said
                (allowed if name in MAY_CHANGE_ON_RESUME else refused).append(f"{name}: {a!r} → {b!r}")
    old_data, new_data = saved.get("data", {}), now["data"]
    for name in sorted(set(old_data) | set(new_data)):
        if old_data.get(name) != new_data.get(name) and old_cfg.get(name) == new_cfg.get(name):
            refused.append(f"the contents of {name} ({new_cfg.get(name)})")
    return refused, allowed


def _pid_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except (OSError, IndexError):
        return None


def acquire_lock(output_dir: str | os.PathLike) -> None:
    """Hold ``<output_dir>/tether.lock`` (``flock``, exclusive) for the rest of this process: a second run in the
    same directory is refused with a one-line error naming the holder's pid. The kernel releases the lock when its
    process ends, however it ends, so the lock of a killed run is stale and is taken over. (Local file systems:
    flock over NFS depends on the mount.) Taking it again in the same process is a no-op. A training run gives it
    up when its final model is saved or it stops at ``stop_after`` (:func:`release_lock`); otherwise (an error,
    ``tether sample``) it is held until the process ends."""
    import fcntl

    key = _run_key(output_dir)
    if key in _LOCKS:
        return
    path = Path(output_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]}" if holder and holder[0].isdigit() else "another process"
        raise ValueError(f"output_dir {output_dir} is in use by another tether run ({who} holds {path}); wait for "
                         "it to finish or choose another output_dir") from None
    except OSError:
        os.close(fd)
        raise
    stale = os.pread(fd, 200, 0).decode(errors="replace").split()
    if stale and stale[0].isdigit() and int(stale[0]) != os.getpid():
        print(f"{path}: taking over the lock of pid {stale[0]}, which no longer runs")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {_pid_start(os.getpid()) or ''}\n".encode(), 0)
    _LOCKS[key] = fd


def release_lock(output_dir: str | os.PathLike) -> None:
    """Give up this process's lock on ``output_dir`` (the lock file stays, unlocked)."""
    fd = _LOCKS.pop(_run_key(output_dir), None)
    if fd is not None:
        os.close(fd)


def _check_start(cfg, out_dir: Path) -> tuple[str | None, Path | None]:
    """Rank 0's checks before a run starts: (a one-line problem or None, the checkpoint to resume from)."""
    resume, overwrite = bool(getattr(cfg, "resume", False)), bool(getattr(cfg, "overwrite", False))
    root = out_dir / "checkpoints"
    if root.is_dir() and (gone := _clean_leftovers(root)):
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
        refused, allowed = _fingerprint_changes(json.loads(saved_path.read_text()), run_fingerprint(cfg))
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
            _RUNS[_run_key(out_dir)] = {"fingerprint": run_fingerprint(cfg), "resume_from": ckpt}
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
            run = _RUNS.get(_run_key(out_dir))
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
    state, _ = _full_states(model, None)
    _refuse_non_finite_weights(model if state is None else state, f"the final model {target}")
    if distributed.current().main:
        save_pretrained_atomic(merged_copy(model) if lora else model, tokenizer, target, state_dict=state)
        release_lock(target.parent)  # the run's output is complete: another run may use the directory
    distributed.barrier()
    return target
