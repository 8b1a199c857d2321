"""Run model-written Python in an isolated, resource-limited subprocess, and a pass-fraction reward built on it.

``run_sandboxed`` has two modes. ``isolation="full"`` (the default) puts the code behind kernel mechanisms that
hold even when the code controls the whole Python interpreter (``ctypes``, the audit guard switched off through
``gc``, raw system calls). ``isolation="none"`` keeps only the resource limits and the Python-level guard: it is
for trusted code, and must be asked for by name. When full isolation cannot be set up (a kernel without
Landlock, user namespaces disabled, a container that forbids ``unshare`` or ``mount``) the call raises
``OSError`` naming the step that failed and this option; it never falls back silently.

How a call runs (``isolation="full"``; the harness is ``_sandbox_harness.py``, run as ``python -I -S -c``, so the
caller never forks with a ``preexec_fn``, which CPython documents as unsafe in a threaded trainer):

1. **Fresh process, empty environment.** ``-I -S`` (no ``PYTHON*`` variables, no user site, no ``site``:
   only the standard library imports), ``env={}``, stdin from a file, a new session / process group.
2. **Namespaces** (``unshare``, before any untrusted code): new **PID** namespace (the code is PID 2; the
   caller and every other process on the machine are invisible, so ``kill``, ``pidfd_open``,
   ``/proc/<pid>/environ`` and ``/proc/<pid>/mem`` of the caller fail with ``ESRCH`` / ``ENOENT``; a fresh
   ``/proc`` is mounted), new **network** namespace (only a loopback device that is down: no network at all,
   abstract unix sockets of the host unreachable), new **mount**, **IPC** (no host System V / POSIX message
   queues) and **UTS** namespaces. A non-root caller first creates a **user** namespace that maps only its own
   uid and gid, which is what allows the others without privileges.
3. **Unprivileged identity.** A root caller's code runs as uid/gid 65534 (``nobody``, or ``user=``) with no
   supplementary groups; a non-root caller's code runs as itself with every capability dropped. Then
   ``PR_SET_NO_NEW_PRIVS`` (no setuid binary can raise privileges). Directories the target uid cannot traverse
   that hold the interpreter (a pyenv under ``/root``) are covered by an empty tmpfs with only the
   interpreter's tree bound back read-only, so the rest of that home directory is not even visible.
4. **Landlock** (every access right of the kernel's ABI, up to ABI 7, is handled, so none is left open by
   omission): **writes** only inside the working directory and to ``/dev/null``; **reads** only in the working
   directory, the interpreter's tree, ``/usr``, ``/lib*``, ``/bin``, ``/sbin``, ``/etc``, the fresh ``/proc``
   and ``/dev/{urandom,random,zero,null}`` (not ``/tmp``, ``/work``, ``/home``, ``/root``, ``/sys``); no TCP
   bind/connect (ABI ≥ 4); no signals to and no abstract unix sockets of processes outside the sandbox
   (ABI ≥ 6). ``dir_fd``-relative calls, ``mkfifo``, ``mknod``, hard links, renames and ``sqlite3`` are all
   checked by the kernel, whatever API reaches them.
5. **Capped disk.** The working directory is a tmpfs mounted over the fresh temporary directory in the new
   mount namespace: ``max_disk_mb`` for all files together (``ENOSPC`` beyond, ``killed_reason="disk_limit"``)
   and ``max_files`` inodes. Its pages are RAM, charged on top of ``memory_mb``; it vanishes with the namespace.
6. **Resource limits** (``setrlimit``, soft = hard except CPU, set after the uid change):
   ``RLIMIT_AS = memory_mb`` per process, ``RLIMIT_CPU = cpu_s`` (``SIGXCPU``, ``SIGKILL`` a second later),
   ``RLIMIT_FSIZE = max_file_mb`` per file (``EFBIG``), ``RLIMIT_NPROC = max_procs``, ``RLIMIT_NOFILE = 64``,
   ``RLIMIT_CORE = 0``.
7. **Nothing outlives the call.** The harness's PID 1 of the namespace forks the code, reaps orphans, and
   exits as soon as the code's main process exits; the kernel then kills every process left in the namespace
   (``setsid`` or double forks do not escape it). PID 1 also dies with the outer harness
   (``PR_SET_PDEATHSIG``). The **wall-clock limit** (``timeout_s``) and the **output caps** (``max_output_bytes``
   per stream, read as produced) SIGKILL the process group, which contains PID 1.
8. **Audit guard** (``guard=True``): a ``sys.addaudithook`` hook refuses process creation, signals, sockets,
   limit changes, ``ctypes`` and writes outside the working directory with a ``PermissionError`` naming the call
   (``killed_reason="blocked"``). It turns common accidents into clear messages; it is **not** a boundary
   (PEP 578 says so; three lines through ``gc`` switch it off), and nothing above relies on it.

Guaranteed with ``isolation="full"``, for code that takes over its interpreter: it cannot write, create or
delete anything outside its working directory; cannot read the caller's files outside the allow-list of
item 4; cannot see, signal, trace or read the memory or environment of any process outside its PID namespace;
has no network; cannot gain privileges; cannot use more than ``max_disk_mb`` of disk; leaves no process behind
when the call returns (except for the race below); is killed at ``timeout_s``.

Not guaranteed:

- **Kernel bugs.** This is the kernel's attack surface (no seccomp filter: every system call is reachable,
  and the code may create nested user namespaces, whose capabilities lift neither Landlock nor the uid).
  For code from the internet, prefer a VM or gVisor / Firecracker in addition.
- **Shared budgets.** ``RLIMIT_NPROC`` counts every process of the uid (all concurrent root-started sandboxes
  share ``nobody``'s count; a non-root caller shares its own count with the sandbox). ``RLIMIT_AS`` is per
  process, so ``max_procs`` processes can each use ``memory_mb`` (plus the tmpfs); there is no cgroup, so CPU,
  memory bandwidth and wall time are not shared fairly. The code can read world-readable system files under
  ``/usr`` and ``/etc`` and see the machine's CPU and memory counts in ``/proc``.
- **The caller dying** before its kill: the code still stops at ``RLIMIT_CPU`` if it spins, but a sleeping
  program lives until PID 1's parent dies (the outer harness, which waits for it). A kill that lands in the
  few microseconds between PID 1's fork and its ``PR_SET_PDEATHSIG`` is not caught.
- **Scoring honesty.** ``killed_reason`` values read from stderr (``memory_limit``, ``file_size_limit``,
  ``disk_limit``, ``blocked``) can be faked by the code; they are for logging, not for scoring.

``isolation="none"`` keeps items 1, 6 and 8 and the group kill of item 7, in a fresh working directory on the
real filesystem: the code runs as the caller (or ``user=`` with a ``python=`` that user can execute), reads
everything the caller can, and with the guard off can write anywhere the caller can, signal the caller, use the
network and leave detached processes behind. Use it only for code you would run yourself.

Measured cost of a trivial call (``print(1)``), median of 30 interleaved calls on the shared 2-core
development machine (loaded, so read the ratio, not the absolute): the guard-only sandbox this replaced
82 / 60 ms at load average 15 / 8, ``isolation="full"`` 126 / 96 ms (1.54x / 1.60x), ``isolation="none"``
92 / 70 ms. The added ~35-45 ms are ``import ctypes``, a second and third ``fork``, the mounts and the
namespace teardown; the interpreter's own start (~35 ms) is the largest part of both.

Errors: bad *code* never raises (syntax errors, crashes, limits all come back as a ``SandboxResult``). A
sandbox that cannot start at all (interpreter not executable, isolation unavailable) raises ``OSError``, so
broken infrastructure is never mistaken for wrong answers. Only the harness writes the status pipe that can
cause that ``OSError``, and only before the code starts, so model-written code cannot make the caller raise.

``CodeTestReward`` runs a completion's fenced Python block against ``metadata["tests"]`` and returns the pass
fraction (formats in its docstring).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_OPEN_FILES = 64
NOBODY = 65534  # the uid a root caller's sandbox runs as by default
_MARKER = "tether-sandbox"

_HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_harness.py")
_harness_source: str | None = None


def _harness() -> str:
    """The in-child harness's source (``_sandbox_harness.py``), run as ``python -I -S -c``."""
    global _harness_source
    if _harness_source is None:
        with open(_HARNESS_PATH, encoding="utf-8") as f:
            _harness_source = f.read()
    return _harness_source


# Events refused outright by the guard.
_DENY_EVENTS = (
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.spawn",
    "os.exec",
    "os.system",
    "os.startfile",
    "subprocess.Popen",
    "os.kill",
    "os.killpg",
    "socket.__new__",
    "resource.setrlimit",
    "resource.prlimit",
)
_DENY_IMPORTS = ("ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters")
# event -> (indices of path arguments that must lie in the working dir, indices of dir_fd arguments).
_PATH_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "os.remove": ((0,), (1,)),
    "os.rmdir": ((0,), (1,)),
    "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)),
    "os.link": ((0, 1), (2, 3)),
    "os.symlink": ((1,), (2,)),
    "os.chmod": ((0,), (2,)),
    "os.chown": ((0,), (3,)),
    "os.truncate": ((0,), ()),
    "os.utime": ((0,), (3,)),
    "os.chflags": ((0,), ()),
    "os.lchflags": ((0,), ()),
    "os.setxattr": ((0,), ()),
    "os.removexattr": ((0,), ()),
    "shutil.rmtree": ((0,), (1,)),
}


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one ``run_sandboxed`` call.

    Fields:
        ok: ``returncode == 0`` and no limit stopped the program (``killed_reason is None``).
        stdout, stderr: decoded UTF-8 (invalid bytes replaced), each at most ``max_output_bytes`` bytes.
        returncode: the exit status; ``-N`` when killed by signal ``N`` (``-9`` after a timeout).
        timed_out: the wall-clock limit was hit and the group killed.
        killed_reason: which limit stopped the program, or None: ``"timeout"``, ``"output_limit"``,
            ``"cpu_limit"`` (SIGXCPU), ``"signal:SIGSEGV"`` (any other signal), ``"memory_limit"`` (the last
            stderr line is a ``MemoryError``), ``"file_size_limit"`` (an ``OSError`` EFBIG: Python ignores
            SIGXFSZ), ``"disk_limit"`` (an ``OSError`` ENOSPC: the tmpfs working directory is full), ``"blocked"`` (the
            guard's ``PermissionError``). The last four are read from the last stderr line, so the code can
            fake them; they are for logging, not for scoring.
        wall_s: seconds from start to the end of cleanup.
    """

    ok: bool
    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    killed_reason: str | None
    wall_s: float


def _rlimits(memory_mb: int, cpu_s: int, max_file_mb: int, max_procs: int) -> list[tuple[str, int, int]]:
    mb = 1 << 20
    return [
        ("RLIMIT_AS", memory_mb * mb, memory_mb * mb),
        ("RLIMIT_CPU", cpu_s, cpu_s + 1),
        ("RLIMIT_FSIZE", max_file_mb * mb, max_file_mb * mb),
        ("RLIMIT_NPROC", max_procs, max_procs),
        ("RLIMIT_NOFILE", MAX_OPEN_FILES, MAX_OPEN_FILES),
        ("RLIMIT_CORE", 0, 0),
    ]


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reason_from_exit(returncode: int, stderr: str) -> str | None:
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU:
            return "cpu_limit"
        if sig == signal.SIGXFSZ:
            return "file_size_limit"
        try:
            return f"signal:{signal.Signals(sig).name}"
        except ValueError:
            return f"signal:{sig}"
    if returncode != 0:
        lines = stderr.rstrip().splitlines()
        last = lines[-1] if lines else ""
        if last.startswith("MemoryError"):
            return "memory_limit"
        if last.startswith("OSError") and f"[Errno {errno.EFBIG}]" in last:
            return "file_size_limit"  # Python ignores SIGXFSZ, so an oversized write raises EFBIG instead
        if last.startswith("OSError") and f"[Errno {errno.ENOSPC}]" in last:
            return "disk_limit"  # the tmpfs working directory (max_disk_mb) is full
        if last.startswith("PermissionError") and _MARKER in last:
            return "blocked"
    return None


def run_sandboxed(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    cpu_s: int | None = None,
    max_output_bytes: int = 1 << 20,
    max_file_mb: int = 16,
    max_disk_mb: int = 64,
    max_files: int = 4096,
    max_procs: int = 32,
    guard: bool = True,
    isolation: str = "full",
    user: int | None = None,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in an isolated, limited subprocess (module docstring); never raises on bad code.

    Args:
        code: Python source; written to ``main.py`` in a fresh working directory.
        stdin: fed to the program's standard input (from a file, so an unread stdin never blocks).
        timeout_s: wall-clock limit in seconds; the process group (and with it the PID namespace) is SIGKILLed
            when it passes.
        memory_mb: ``RLIMIT_AS`` in MiB (virtual address space per process; ≥ 64, the interpreter needs ~15).
        cpu_s: ``RLIMIT_CPU`` soft limit in seconds; default ``ceil(timeout_s) + 1``. A backstop behind the wall
            clock: it still stops a spinning child if the caller dies before its kill.
        max_output_bytes: cap per stream (stdout, stderr); passing it kills the group.
        max_file_mb: ``RLIMIT_FSIZE`` in MiB: the largest file the program may write.
        max_disk_mb: ``isolation="full"``: size of the tmpfs working directory, all files together (a write
            beyond it fails with ``ENOSPC``). Its pages are RAM, on top of ``memory_mb``.
        max_files: ``isolation="full"``: inode cap of that tmpfs (files + directories).
        max_procs: ``RLIMIT_NPROC``: processes + threads of the sandbox's uid (the harness's PID 1 included).
        guard: install the audit-hook guard (module docstring: a convenience that names the blocked call, not a
            boundary).
        isolation: ``"full"`` (namespaces, unprivileged uid, Landlock, tmpfs; ``OSError`` if the kernel or
            the environment does not allow it) or ``"none"`` (resource limits and the guard only: for trusted
            code, the caller's own user and filesystem).
        user: uid (and gid) to run as. ``"full"``: when the caller is root, default 65534 (nobody); a non-root
            caller always runs as itself inside a user namespace. ``"none"``: needs root; the working directory
            is chowned to it and ``python`` must be executable by it.
        python: interpreter to run; default ``sys.executable``.

    Raises ``ValueError`` for invalid arguments and ``OSError`` only if the sandbox cannot start (including
    ``isolation="full"`` being unavailable: the message names the step that failed).
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if memory_mb < 64:
        raise ValueError(f"memory_mb must be >= 64 (the interpreter itself needs ~15 MiB), got {memory_mb}")
    if isolation not in ("full", "none"):
        raise ValueError(f'isolation must be "full" or "none" (trusted code only), got {isolation!r}')
    if cpu_s is None:
        cpu_s = math.ceil(timeout_s) + 1
    for name, value in (
        ("cpu_s", cpu_s),
        ("max_output_bytes", max_output_bytes),
        ("max_file_mb", max_file_mb),
        ("max_disk_mb", max_disk_mb),
        ("max_files", max_files),
        ("max_procs", max_procs),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    root = os.geteuid() == 0
    if isolation == "full":
        if not root and user not in (None, os.geteuid()):
            raise ValueError(f"user={user} needs a root caller; a non-root caller's sandbox runs as its own uid")
        uid = (NOBODY if user is None else user) if root else os.geteuid()
        if uid == 0:
            raise ValueError('user=0 would run the code as root with every capability; give an unprivileged uid')
        gid = uid if root else os.getegid()
    python = python or sys.executable
    status_r, status_w = os.pipe()
    limits = {
        "rlimits": _rlimits(memory_mb, cpu_s, max_file_mb, max_procs),
        "guard": guard,
        "deny_events": _DENY_EVENTS,
        "deny_imports": _DENY_IMPORTS,
        "path_events": _PATH_EVENTS,
        "marker": _MARKER,
        "status_fd": status_w,
        "isolation": isolation,
    }
    ids: dict[str, Any] = {}
    if isolation == "full":
        limits.update(uid=uid, gid=gid, userns=not root, disk_mb=max_disk_mb, max_inodes=max_files)
    elif user is not None:
        ids = {"user": user, "group": user, "extra_groups": []}

    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="tether-sandbox-")
    try:
        main = os.path.join(workdir, "main.py")
        with open(main, "w", encoding="utf-8", errors="replace") as f:
            f.write(code)
        stdin_path = os.path.join(workdir, ".stdin")
        with open(stdin_path, "w", encoding="utf-8", errors="replace") as f:
            f.write(stdin)
        if ids:
            for p in (workdir, main, stdin_path):
                os.chown(p, user, user)
        try:
            with open(stdin_path, "rb") as stdin_file:
                proc = subprocess.Popen(
                    [python, "-I", "-S", "-c", _harness(), json.dumps(limits)],
                    stdin=stdin_file,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir,
                    env={},
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(status_w,),
                    **ids,
                )
        finally:
            os.close(status_w)
        out, err, status, reason = _collect(proc, status_r, deadline=t0 + timeout_s, cap=max_output_bytes)
    finally:
        os.close(status_r)
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(workdir):
            warnings.warn(f"sandbox working directory {workdir} could not be fully deleted", stacklevel=2)
    returncode = _returncode(status, proc.returncode, isolation, err, killed=reason is not None)
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    if reason is None:
        reason = _reason_from_exit(returncode, stderr)
    return SandboxResult(
        ok=returncode == 0 and reason is None,
        stdout=stdout,
        stderr=stderr,
        returncode=returncode,
        timed_out=reason == "timeout",
        killed_reason=reason,
        wall_s=time.monotonic() - t0,
    )


def _returncode(
    status: bytes, outer_returncode: int | None, isolation: str, stderr: bytes = b"", killed: bool = False
) -> int | None:
    """The program's exit status from the harness's status lines; ``OSError`` if the sandbox never got ready.

    Only lines before ``ready`` can raise, and only the harness writes them, so model-written code cannot make
    the caller raise. A harness we killed (``killed``: the wall clock passed during a slow start) is a timeout,
    not a setup failure, unless it had already reported one. Without an ``exit`` line (killed by the wall clock
    or the output cap; or ``isolation="none"``, where the program is the outer process itself) the outer
    process's status is the program's."""
    lines = status.decode("utf-8", errors="replace").splitlines()
    if "ready" not in lines:
        errors = [line.removeprefix("setup-error ") for line in lines if line.startswith("setup-error ")]
        if killed and not errors:
            return outer_returncode
        if not errors:  # the harness itself crashed (no code had run yet): its last stderr line says why
            last = stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:]
            errors = [f"the harness died before it was ready ({last[0] if last else f'exit {outer_returncode}'})"]
        if isolation == "full":
            raise OSError(
                f"sandbox isolation unavailable: {errors[0]}; "
                'run where namespaces and Landlock are allowed, or pass isolation="none" for trusted code only'
            )
        raise OSError(f"sandbox did not start: {errors[0]}")
    exits = [line for line in lines[lines.index("ready"):] if line.startswith("exit ")]
    if exits:
        return os.waitstatus_to_exitcode(int(exits[0].split()[1]))
    return outer_returncode


def _collect(
    proc: subprocess.Popen, status_fd: int, deadline: float, cap: int
) -> tuple[bytes, bytes, bytes, str | None]:
    """Read both pipes (and the harness's status pipe) until EOF, the deadline or the cap; always kill the group
    and reap the child."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    reason = None
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    try:
        while sel.get_map() and reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = "timeout"
                break
            for key, _ in sel.select(timeout=min(remaining, 0.1)):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                if key.fd == status_fd:
                    buf += chunk[: 4096 - len(buf)]  # a few short lines from the harness
                    continue
                buf += chunk[: cap - len(buf) + 1]
                if len(buf) > cap:
                    del buf[cap:]
                    reason = "output_limit"
                    break
            if proc.poll() is not None:
                _kill_group(proc.pid)  # stragglers holding the pipes open
        if reason is None:  # pipes closed: wait for the exit status within the deadline
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                reason = "timeout"
    finally:
        _kill_group(proc.pid)
        proc.wait()
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), bytes(bufs[status_fd]), reason


# ----------------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------------

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "python3", "py")


def extract_code(completion: str) -> str | None:
    """The last fenced block tagged ``python`` / ``python3`` / ``py`` (any case); else the last untagged block.

    Blocks tagged with another language are ignored; an unclosed final fence (a truncated completion) does not
    count. None when there is no such block.
    """
    blocks = _FENCE_RE.findall(completion)
    tagged = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    if tagged:
        return tagged[-1]
    untagged = [body for tag, body in blocks if not tag]
    return untagged[-1] if untagged else None


def _normalize_output(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


class CodeTestReward:
    """Reward: fraction of ``metadata["tests"]`` that the completion's code passes, in [0, 1].

    The code is ``extract_code(completion)``; no block scores 0.0. Each test runs in its own
    ``run_sandboxed`` call, so one crash or timeout fails only that test. ``metadata["tests"]`` is a list whose
    items are either

    - a **string** of Python (typically ``assert`` statements), run after the code in the same module, with
      empty stdin: ``code + "\\n\\n" + test + "\\nprint(<nonce>)"``. It passes iff the program exits 0 and the
      random per-run nonce was printed, so a solution that exits early (``sys.exit(0)``,
      ``os._exit(0)``) before the asserts fails;
    - a **dict** ``{"input": str, "output": str}``: the code runs with ``input`` on stdin and passes iff it exits
      0 and its stdout equals ``output`` after stripping trailing whitespace from every line and dropping
      trailing empty lines (``"3 \\n\\n"`` equals ``"3"``).

    Returns None when ``"tests"`` is missing or empty; raises ``ValueError`` naming the row ``id`` and the index
    of a test of any other shape. Timeouts, crashes and limit hits score that test 0 and never raise.

    Limits: a policy that reads its own source can print the nonce and fake a pass; inspect the high-reward
    samples. Cost: up to ``len(tests) * timeout_s`` seconds per completion, sequentially.

    Args:
        timeout_s, memory_mb: per-test limits passed to ``run_sandboxed``.
        **sandbox_options: any other keyword of ``run_sandboxed`` (``max_output_bytes``, ``max_disk_mb``,
            ``guard``, ``isolation``, ``user``, ``python``, ...), checked at construction. The default is full
            isolation; where the kernel cannot provide it, every call raises ``OSError`` (the run stops at the
            first reward) rather than scoring untrusted code unisolated, unless ``isolation="none"`` is given.
    """

    name = "code_tests"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, **sandbox_options: Any):
        known = {"cpu_s", "max_output_bytes", "max_file_mb", "max_disk_mb", "max_files", "max_procs", "guard",
                 "isolation", "user", "python"}
        unknown = sorted(set(sandbox_options) - known)
        if unknown:
            raise ValueError(f"unknown sandbox options {unknown}; known: {sorted(known)}")
        self.options = {"timeout_s": timeout_s, "memory_mb": memory_mb, **sandbox_options}

    def check(self, code: str, tests: Sequence[str | Mapping[str, str]], row: Any = "<no id>") -> list[bool]:
        """Whether ``code`` passes each test, in order."""
        passed = []
        for i, test in enumerate(tests):
            if isinstance(test, str):
                nonce = f"{_MARKER}-pass-{secrets.token_hex(16)}"
                result = run_sandboxed(f"{code}\n\n{test}\nprint({nonce!r})\n", **self.options)
                passed.append(result.ok and nonce in result.stdout)
            elif (
                isinstance(test, Mapping) and isinstance(test.get("input"), str) and isinstance(test.get("output"), str)
            ):
                result = run_sandboxed(code, stdin=test["input"], **self.options)
                passed.append(result.ok and _normalize_output(result.stdout) == _normalize_output(test["output"]))
            else:
                raise ValueError(
                    f"row id={row!r}: metadata['tests'][{i}] must be a string of Python or a dict with string "
                    f"'input' and 'output', got {test!r}"
                )
        return passed

    def __call__(self, prompt: str, completion: str, metadata: Mapping[str, Any]) -> float | None:
        tests = metadata.get("tests")
        if not tests:
            return None
        code = extract_code(completion)
        if code is None:
            return 0.0
        passed = self.check(code, tests, row=metadata.get("id", "<no id>"))
        return sum(passed) / len(passed)
