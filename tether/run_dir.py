"""The output directory of a training run: who owns it, and what the run records of itself.

One run per directory: :func:`acquire_lock` holds ``<output_dir>/tether.lock`` (``flock``) for the life of the
process, so a second run in the same directory is refused, and the lock of a killed run is taken over. The run's
fingerprint (:func:`run_fingerprint`: every config value and the sha256 of every input data file) is registered here
by ``tether.training.start_run`` (:func:`register_run`) and written into each checkpoint as ``run.json`` by
``tether.checkpoints.save_checkpoint``; a resume whose config or data differ from it outside
:data:`MAY_CHANGE_ON_RESUME` is refused (:func:`fingerprint_changes` says what differs, in words).

This module writes nothing but the lock file; ``tether.training.start_run`` combines it with the checkpoints into the
checks a run makes before it starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

__all__ = ["MAY_CHANGE_ON_RESUME", "CONFIG_FILE", "LOCK_FILE", "RUN_FILE", "run_fingerprint", "fingerprint_changes",
           "register_run", "registered_run", "acquire_lock", "release_lock"]


#: Config fields that may differ between a checkpoint and the run resuming from it: the length of the run, its
#: cadence, where and how it reports, where it runs. Every other field (lr, batch sizes, loss, β, model, data, …)
#: shapes the trajectory, so a resume with a changed value is refused (``tether.training.start_run``).
MAY_CHANGE_ON_RESUME = frozenset({"resume", "overwrite", "stop_after", "steps", "max_steps", "save_every",
                                  "eval_every", "log_every", "tensorboard", "progress", "output_dir", "device",
                                  "distributed"})


CONFIG_FILE = "tether_config.yaml"  # not config.json: a Hugging Face model directory's config has that name
LOCK_FILE = "tether.lock"
RUN_FILE = "run.json"  # in each checkpoint: the fingerprint of the run that wrote it
_RUNS: dict[str, dict] = {}  # output_dir (resolved) → this process's run there: fingerprint, checkpoint to resume
_LOCKS: dict[str, int] = {}  # output_dir (resolved) → the open, flock'ed lock file of this process


def _run_key(output_dir) -> str:
    return str(Path(output_dir).resolve())


def register_run(output_dir: str | os.PathLike, *, fingerprint: dict, resume_from: Path | None) -> None:
    """Record this process's run in ``output_dir`` (``tether.training.start_run``, on rank 0): the fingerprint each
    of its checkpoints records, and the checkpoint it resumes from (None: a fresh run)."""
    _RUNS[_run_key(output_dir)] = {"fingerprint": fingerprint, "resume_from": resume_from}


def registered_run(output_dir: str | os.PathLike) -> dict | None:
    """What :func:`register_run` recorded for ``output_dir`` in this process (``fingerprint``, ``resume_from``), or
    None (no run started there in this process, or a rank other than 0)."""
    return _RUNS.get(_run_key(output_dir))


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


def fingerprint_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
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
