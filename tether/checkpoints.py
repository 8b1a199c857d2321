"""Durable files of a training run: atomic writes, checkpoints that exist complete or not at all, the final model.

Checkpoints are directories ``<output_dir>/checkpoints/step-<k>/`` holding the model in Hugging Face format
(``save_pretrained``, safetensors; only the adapter when training with LoRA), the tokenizer, and
``trainer_state.pt`` (optimizer, scheduler and RNG states — tensors and plain Python values only, read back with
``torch.load(weights_only=True)``). Each is written to a temporary directory and renamed into place, so a
checkpoint directory either exists complete or not at all; a run killed mid-write leaves only a temporary
directory, which is ignored and cleaned up on the next save. Each also holds ``run.json`` (the run's config and the
sha256 of its data files, ``tether.run_dir``: a resume with changed values is refused) and, written last,
``manifest.json`` (every file's size and sha256: a truncated or corrupt checkpoint is skipped for the previous
intact one). Weights holding NaN or inf are never saved (:class:`NonFiniteError`).

Every other file a run rewrites (its config, ``metrics.jsonl``, caches) is replaced atomically (:func:`atomic_write`),
and the final model is renamed into place (:func:`save_pretrained_atomic`).

Rank-aware (``tether.distributed``): in a run of several processes every rank calls :func:`save_checkpoint` and
rank 0 writes. A checkpoint holds the full model (under FSDP2 gathered from the shards, so any number of
processes — one included — loads it), rank 0's trainer state (under FSDP2 the optimizer as a full, name-keyed state
dict) and each other rank's RNG state (``rng-rank<r>.pt``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from tether import distributed
from tether.run_dir import RUN_FILE, registered_run

__all__ = ["atomic_write", "load_cache", "NonFiniteError", "refuse_non_finite_weights", "full_states",
           "save_checkpoint", "is_write_failure", "MANIFEST", "verify_checkpoint", "latest_checkpoint",
           "remove_checkpoints", "clean_leftovers", "load_weights", "load_trainer_state", "load_module_state",
           "save_pretrained_atomic"]


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
    never a mix (the temporary file is removed on an error; a killed one is cleaned by
    ``tether.training.start_run``)."""
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


# ------------------------------------------------------------------------------------------------------------
# Checkpoints: written whole, pruned safely, verified before a resume.
# ------------------------------------------------------------------------------------------------------------


class NonFiniteError(ValueError):
    """A loss or gradient became NaN or infinite: the step is refused before it reaches the weights (raised by
    ``tether.training``'s loop); or a weight did: it is not saved (:func:`refuse_non_finite_weights`)."""


def refuse_non_finite_weights(source, what: str) -> None:
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


def full_states(model, optimizer) -> tuple[dict | None, dict]:
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
    ``tether.run_dir``) added, every file fsynced and listed with its size and sha256 in ``manifest.json`` (written
    last), and only then is the directory renamed to ``step-<step>``; a checkpoint without an intact manifest is
    never resumed from (:func:`latest_checkpoint`). Older checkpoints are pruned by renaming them to hidden
    ``.trash-*`` directories first and deleting those afterwards, so a kill mid-prune leaves no half-deleted
    ``step-*``. A write that fails for lack of space (or any OS error) removes the temporary directory and raises
    a one-line ``OSError`` saying the previous checkpoint is intact."""
    dist = distributed.current()
    root = Path(output_dir) / "checkpoints"
    model_state, optim_state = full_states(model, optimizer)  # collective under FSDP2
    refuse_non_finite_weights(model if model_state is None else model_state, f"checkpoint step-{step}")
    tmp = failure = None
    if dist.main:
        root.mkdir(parents=True, exist_ok=True)
        clean_leftovers(root)
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
            if (run := registered_run(output_dir)) is not None:
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


def _step_of(path: Path) -> int:
    return int(path.name.split("-", 1)[1])


MANIFEST = "manifest.json"


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
    clean_leftovers(root)
    return [p.name for p in removed]


def _remove_dir(path: Path) -> None:
    """Rename ``path`` to a hidden ``.trash-*`` sibling, then delete that: a kill mid-delete leaves only a
    ``.trash-*`` directory (removed by the next save or start), never a half-deleted directory under its name."""
    trash = path.parent / f".trash-{path.name}-{os.urandom(4).hex()}"  # os.urandom: the run's RNGs stay untouched
    os.replace(path, trash)
    _fault("prune")
    shutil.rmtree(trash, ignore_errors=True)


def clean_leftovers(root: Path) -> list[str]:
    """Remove what an interrupted write (``.tmp-*``) or prune (``.trash-*``) left in ``root``; return the names."""
    gone = sorted(p.name for p in list(root.glob(".tmp-*")) + list(root.glob(".trash-*")))
    for name in gone:
        shutil.rmtree(root / name, ignore_errors=True)
    return gone


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


def load_module_state(module, checkpoint: Path, name: str) -> None:
    """Load ``<checkpoint>/<name>.safetensors`` written by ``save_checkpoint(modules={name: module})``."""
    from safetensors.torch import load_model

    load_model(module, str(checkpoint / f"{name}.safetensors"))


def save_pretrained_atomic(model, tokenizer, target: Path, *, state_dict: dict | None = None) -> None:
    """``save_pretrained`` (of ``state_dict`` when given) into a temporary sibling directory, then rename it to
    ``target``."""
    tmp = Path(tempfile.mkdtemp(prefix=".final-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True, **({} if state_dict is None else {"state_dict": state_dict}))
    tokenizer.save_pretrained(tmp)
    if target.exists():
        _remove_dir(target)  # renamed away first: a kill here leaves the new copy in tmp, never half a model
    os.replace(tmp, target)
