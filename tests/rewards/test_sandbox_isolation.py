"""The sandbox as a security boundary: every escape found against the old guard-only sandbox must stay blocked by
the operating system alone, so the untrusted code here runs with ``guard=False`` (or disables the guard the way
an attacker did, through ``gc``).

Each escape is first shown to work with ``isolation="none"`` (a control: the test would catch a regression, it
cannot pass because the attack itself is broken), then shown blocked with ``isolation="full"``. The targets are
stand-ins for the caller where a real hit would kill the test run: a ``sleep`` process owned by the same user,
with a secret planted in its environment. A world-writable directory in ``/tmp`` is the write target, so file
permissions alone would allow the write: only Landlock (and the mount namespace) can refuse it.

Where the kernel does not allow full isolation the whole module skips, naming the step that failed.
"""

import errno
import functools
import os
import socket
import subprocess
import tempfile
import time

import pytest
from sandbox_helpers import live_in_pid_namespace

from tether.rewards import run_sandboxed as _run_sandboxed
from tether.rewards.sandbox import _returncode

# Every program here is expected to finish: a generous wall clock, so a loaded machine cannot turn a blocked
# attempt into a timeout (the accident tests in test_sandbox.py cover the timeout itself).
run_sandboxed = functools.partial(_run_sandboxed, timeout_s=30)


def _isolation_error() -> str | None:
    try:
        run_sandboxed("pass", timeout_s=10)
    except OSError as e:
        return str(e)
    return None


_UNAVAILABLE = _isolation_error()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"full isolation unavailable: {_UNAVAILABLE}")

SECRET = "tether-test-secret-7d1f0c"

# Prints "<name> OK" or "<name> ERR <errno>" for each attempt; never raises.
_PRELUDE = """
import os, stat, signal, errno
def attempt(name, f):
    try:
        f()
        print(name, "OK", flush=True)
    except OSError as e:
        print(name, "ERR", e.errno, flush=True)
    except Exception as e:  # sqlite3.OperationalError carries no errno
        print(name, "ERR", type(e).__name__, flush=True)
"""


def _attempts(stdout: str) -> dict[str, str]:
    return {line.split()[0]: line.split(None, 1)[1] for line in stdout.splitlines() if line.split()[1:2]
            in (["OK"], ["ERR"])}


@pytest.fixture
def victim():
    """A process of the caller's user with a secret in its environment (the caller's stand-in)."""
    proc = subprocess.Popen(["sleep", "60"], env={"TETHER_SECRET": SECRET})
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def open_dir():
    """A world-writable directory outside the sandbox: file permissions do not stop a write there."""
    d = tempfile.mkdtemp(prefix="tether-victim-", dir="/tmp")
    os.chmod(d, 0o777)
    yield d
    for name in os.listdir(d):
        os.remove(os.path.join(d, name))
    os.rmdir(d)


WRITE_ESCAPES = """
attempt("dir_fd", lambda: os.close(os.open("via_dirfd", os.O_WRONLY | os.O_CREAT,
                                            dir_fd=os.open(DIR, os.O_PATH | os.O_DIRECTORY))))
attempt("mkfifo", lambda: os.mkfifo(DIR + "/fifo"))
attempt("mknod", lambda: os.mknod(DIR + "/node", stat.S_IFREG | 0o644))
import sqlite3
attempt("sqlite3", lambda: sqlite3.connect(DIR + "/db.sqlite").execute("create table t (x)"))
attempt("open", lambda: open(DIR + "/plain", "w").close())
"""


@pytest.mark.parametrize("isolation", ["none", "full"])
def test_writes_outside_the_working_dir(isolation, open_dir):
    """dir_fd-relative create, mkfifo, mknod, sqlite3 and a plain open all write into a world-writable directory
    without isolation; with it every one is refused (EACCES from Landlock) and nothing appears."""
    r = run_sandboxed(f"{_PRELUDE}\nDIR = {open_dir!r}\n{WRITE_ESCAPES}", guard=False, isolation=isolation)
    got = _attempts(r.stdout)
    assert set(got) == {"dir_fd", "mkfifo", "mknod", "sqlite3", "open"}, r
    if isolation == "none":
        assert set(got.values()) == {"OK"}, got
        assert sorted(os.listdir(open_dir)) == ["db.sqlite", "fifo", "node", "plain", "via_dirfd"]
    else:
        assert got["sqlite3"] == "ERR OperationalError", got
        assert {got[k] for k in got if k != "sqlite3"} == {f"ERR {errno.EACCES}"}, got
        assert os.listdir(open_dir) == []


PROCESS_ESCAPES = """
attempt("pidfd_caller", lambda: os.close(os.pidfd_open(CALLER)))
attempt("kill0_caller", lambda: os.kill(CALLER, 0))
attempt("environ_victim", lambda: print("LEAK", open(f"/proc/{VICTIM}/environ", "rb").read(), flush=True))
attempt("environ_caller", lambda: open(f"/proc/{CALLER}/environ", "rb").read())
attempt("mem_rw_caller", lambda: open(f"/proc/{CALLER}/mem", "r+b").close())
attempt("mem_rw_victim", lambda: open(f"/proc/{VICTIM}/mem", "r+b").close())
attempt("pidfd_kill_victim", lambda: signal.pidfd_send_signal(os.pidfd_open(VICTIM), signal.SIGKILL))
"""


@pytest.mark.parametrize("isolation", ["none", "full"])
def test_caller_processes_unreachable(isolation, victim):
    """Without isolation the code can SIGKILL a process of the caller's user through pidfd_open +
    pidfd_send_signal, read its environment (the planted secret) and open its memory read-write. With isolation
    the caller's processes do not exist in the sandbox's PID namespace: ESRCH / ENOENT, and the victim lives."""
    caller = os.getpid()
    code = f"{_PRELUDE}\nVICTIM, CALLER = {victim.pid}, {caller}\n{PROCESS_ESCAPES}"
    if isolation == "none":  # the control never touches the real caller: only the victim is attacked
        code = code.replace("CALLER)", "VICTIM)").replace("{CALLER}", "{VICTIM}")
    r = run_sandboxed(code, guard=False, isolation=isolation)
    got = _attempts(r.stdout)
    assert len(got) == 7, r
    if isolation == "none":
        assert got["pidfd_kill_victim"] == "OK" and victim.wait(timeout=5) == -9
        assert SECRET in r.stdout
    else:
        assert got == {
            "pidfd_kill_victim": f"ERR {errno.ESRCH}",
            "pidfd_caller": f"ERR {errno.ESRCH}",
            "kill0_caller": f"ERR {errno.ESRCH}",
            "environ_victim": f"ERR {errno.ENOENT}",
            "environ_caller": f"ERR {errno.ENOENT}",
            "mem_rw_caller": f"ERR {errno.ENOENT}",
            "mem_rw_victim": f"ERR {errno.ENOENT}",
        }
        assert victim.poll() is None and SECRET not in r.stdout


def test_no_network(tmp_path):
    """A TCP listener of the caller on 127.0.0.1 is reachable without isolation; with it the code has its own
    network namespace (only a down loopback) and Landlock refuses TCP connect: nothing reaches the listener."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0)
    port = srv.getsockname()[1]
    code = (f"{_PRELUDE}\nimport socket\n"
            f"attempt('connect', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2).close())\n"
            "print('IFACES', [name for _, name in socket.if_nameindex()])")
    try:
        assert _attempts(run_sandboxed(code, guard=False, isolation="none").stdout)["connect"] == "OK"
        srv.accept()[0].close()
        r = run_sandboxed(code, guard=False)
        assert _attempts(r.stdout)["connect"].startswith("ERR"), r
        assert "IFACES ['lo']" in r.stdout, r
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()


GC_DISABLE_GUARD = """
import gc
for o in gc.get_objects():
    if type(o) is list and o == [False]:
        o[0] = True
import ctypes  # refused while the guard works
"""

SLEEPERS = """
import os, sys, time
print("NS", os.readlink("/proc/self/ns/pid"), flush=True)
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        os.setsid()  # leave the process group that the caller kills
        os.close(1)  # and the output pipes, so the call returns while the sleepers live on
        os.close(2)
        time.sleep(60)
        os._exit(0)
    print("PID", pid, flush=True)
print("FORKED", {n}, flush=True)
"""


def test_guard_disabled_through_gc_then_200_detached_sleepers_die_with_the_call():
    """Three lines through ``gc`` switch the audit guard off (shown: ``import ctypes`` then succeeds), after which
    the old sandbox let setsid()-detached processes outlive the call. Now the program is in its own PID
    namespace: when it exits, the namespace's init exits and the kernel kills every process left in it, so
    none of the 200 sleepers is alive when ``run_sandboxed`` returns (RLIMIT_NPROC raised to let all fork)."""
    n = 200
    r = run_sandboxed(GC_DISABLE_GUARD + SLEEPERS.format(n=n), timeout_s=60, max_procs=n + 16)
    assert r.ok and f"FORKED {n}" in r.stdout, r
    ns = r.stdout.split()[1]
    assert ns.startswith("pid:[") and ns != os.readlink("/proc/self/ns/pid")
    assert live_in_pid_namespace(ns) == []


def test_detached_sleepers_outlive_the_call_without_isolation():
    """The control for the test above: the same program with ``isolation="none"`` leaves its sleepers running
    (they are then killed here by pid)."""
    r = run_sandboxed(GC_DISABLE_GUARD + SLEEPERS.format(n=3), isolation="none")
    pids = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PID")]
    try:
        assert r.ok and len(pids) == 3, r
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def test_disk_cap():
    """The working directory is a tmpfs of max_disk_mb MiB: writing 1 MiB files (each under max_file_mb) stops
    with ENOSPC ("disk_limit") after at most 8 of them; an inode cap (max_files) stops many empty files."""
    code = ("n = 0\nwhile True:\n    with open(f'f{n}', 'wb') as f:\n        f.write(b'x' * (1 << 20))\n"
            "    n += 1\n    print(n, flush=True)")
    r = run_sandboxed(code, max_disk_mb=8, max_file_mb=4)
    assert r.killed_reason == "disk_limit", r
    assert 6 <= int(r.stdout.split()[-1]) <= 8  # main.py and metadata take a few pages of the 8 MiB
    r = run_sandboxed("i = 0\nwhile True:\n    open(f'e{i}', 'w').close()\n    i += 1", max_files=50)
    assert r.killed_reason == "disk_limit", r


def test_isolation_facts():
    """Inside: PID 2 (the harness is PID 1), uid nobody when the caller is root, hostname "sandbox", no caller
    file readable (``/work``, ``/tmp``, the home directory), the standard library still importable."""
    code = (f"{_PRELUDE}\nimport socket, json, sqlite3, decimal\n"
            "print('ID', os.getpid(), os.getuid(), socket.gethostname(), flush=True)\n"
            f"attempt('read_cwd_parent', lambda: os.listdir({os.getcwd()!r}))\n"
            "attempt('read_tmp', lambda: os.listdir('/tmp'))\n"
            f"attempt('read_home', lambda: os.listdir({os.path.expanduser('~')!r}))\n")
    r = run_sandboxed(code, guard=False)
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert f"ID 2 {uid} sandbox" in r.stdout, r
    assert all(v.startswith("ERR") for v in _attempts(r.stdout).values()), r


def test_forged_status_lines_cannot_make_the_caller_raise():
    """Only the harness holds the status pipe; a program writing fake setup errors to every fd just fails.
    A real setup error (before "ready") is one OSError naming the failed step and the opt-out."""
    code = "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'setup-error forged\\n')\n" \
           "    except OSError:\n        pass\nprint('done')"
    r = run_sandboxed(code, guard=False)
    assert r.ok and r.stdout == "done\n", r
    with pytest.raises(OSError, match=r'isolation unavailable: unshare\(.*\) failed.*isolation="none"'):
        _returncode(b"setup-error unshare(mount, pid) failed: [Errno 1] Operation not permitted\n", 70, "full")
    assert _returncode(b"ready\nexit 2816\n", 0, "full") == 11
    assert _returncode(b"ready\n", -9, "full") == -9
    assert _returncode(b"", -9, "full", killed=True) == -9  # the wall clock passed during a slow start
    r = run_sandboxed("print(1)", timeout_s=0.001)
    assert r.killed_reason == "timeout" and not r.ok


PRIVILEGE_ESCAPES = """
import ctypes, resource
libc = ctypes.CDLL(None, use_errno=True)
def c(ret):
    if ret != 0:
        raise OSError(ctypes.get_errno(), "libc")
attempt("umount_home_cover", lambda: c(libc.umount2(HOME.encode(), 2)))
attempt("mount_tmpfs", lambda: c(libc.mount(b"t", b".", b"tmpfs", 0, None)))
attempt("setuid_0", lambda: os.setuid(0))
attempt("raise_hard_nproc", lambda: resource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6)))
attempt("pid1_fds", lambda: os.listdir("/proc/1/fd"))
attempt("link_out", lambda: os.link("main.py", DIR + "/stolen"))
attempt("symlink_out", lambda: (os.symlink(DIR + "/evil", "lnk"), open("lnk", "w").close()))
attempt("dev_shm", lambda: open("/dev/shm/tether-evil", "w").close())
c(libc.unshare(0x10000000))  # a nested user namespace: "root" inside it, still inside Landlock and the uid
attempt("userns_write", lambda: open(DIR + "/evil2", "w").close())
attempt("userns_mount", lambda: c(libc.mount(b"t", b".", b"tmpfs", 0, None)))
"""


def test_privilege_and_mount_escapes(open_dir):
    """With ctypes: unmounting the cover over the home directory, mounting, setuid(0), raising a hard limit,
    reading PID 1's fds (the status pipe), links and symlinks out, /dev/shm, and a nested user namespace (whose
    capabilities do not lift Landlock) all fail; nothing appears outside."""
    home = os.path.expanduser("~")
    r = run_sandboxed(f"{_PRELUDE}\nDIR, HOME = {open_dir!r}, {home!r}\n{PRIVILEGE_ESCAPES}", guard=False)
    got = _attempts(r.stdout)
    assert len(got) == 10 and all(v.startswith("ERR") for v in got.values()), (got, r.stderr)
    assert got["mount_tmpfs"] == got["userns_mount"] == f"ERR {errno.EPERM}"
    assert os.listdir(open_dir) == [] and not os.path.exists("/dev/shm/tether-evil")


def test_setup_failure_is_one_oserror_naming_the_step(monkeypatch):
    """End to end: a harness whose ``unshare`` fails (an invalid flag: EINVAL, as a kernel without namespaces
    answers EPERM) makes the call raise one line that names the failed step and the explicit opt-out; nothing
    of the code runs."""
    import tether.rewards.sandbox as sandbox

    source = sandbox._harness()
    line = "    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS\n"
    assert line in source
    monkeypatch.setattr(sandbox, "_harness_source", source.replace(line, "    flags = -1\n"))
    with pytest.raises(OSError) as info:
        run_sandboxed("print('ran')")
    message = str(info.value)
    assert "\n" not in message and message.startswith("sandbox isolation unavailable: unshare(")
    assert f"[Errno {errno.EINVAL}]" in message and 'isolation="none"' in message


def test_trivial_call_overhead_is_small():
    """A trivial call stays well under a second even on a loaded 2-core machine (measured medians are in the
    module docstring)."""
    t0 = time.monotonic()
    assert run_sandboxed("print(1)").stdout == "1\n"
    assert time.monotonic() - t0 < 5


NON_ROOT_CALLER = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("tether_sandbox", sys.argv[1])
sandbox = importlib.util.module_from_spec(spec)
sys.modules["tether_sandbox"] = sandbox  # dataclasses looks the module up
spec.loader.exec_module(sandbox)
r = sandbox.run_sandboxed(sys.argv[2], guard=False, timeout_s=30)
print(json.dumps({"caller_uid": os.getuid(), "stdout": r.stdout, "stderr": r.stderr}))
"""


def _interpreter_for(uid: int) -> str | None:
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand):
            probe = subprocess.run([cand, "-c", "import sys; assert sys.version_info >= (3, 10)"], user=uid,
                                   group=uid, extra_groups=[], capture_output=True)
            if probe.returncode == 0:
                return cand
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="the caller is not root: every other test already runs this path")
def test_non_root_caller_gets_a_user_namespace(open_dir):
    """A non-root caller (here uid 65534, started from root) cannot setuid: the harness maps its own uid in a new
    user namespace and gets the same PID/mount/network namespaces, tmpfs and Landlock. The module is loaded
    from its file so the caller needs only the standard library."""
    import json

    import tether.rewards.sandbox as sandbox

    python = _interpreter_for(65534)
    if python is None:
        pytest.skip("no interpreter (>= 3.10) executable by uid 65534")
    code = (f"{_PRELUDE}\nDIR = {open_dir!r}\n{WRITE_ESCAPES}\nimport socket\n"
            "print('ID', os.getpid(), os.getuid(), socket.gethostname(), flush=True)\n"
            "attempt('connect', lambda: socket.create_connection(('127.0.0.1', 9), timeout=2).close())\n")
    out = subprocess.run([python, "-c", NON_ROOT_CALLER, sandbox.__file__, code], user=65534, group=65534,
                         extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["caller_uid"] == 65534 and "ID 2 65534 sandbox" in r["stdout"], r
    got = _attempts(r["stdout"])
    assert len(got) == 6 and all(v.startswith("ERR") for v in got.values()), got
    assert os.listdir(open_dir) == []
