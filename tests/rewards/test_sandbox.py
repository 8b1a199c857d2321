"""The sandbox: every way model-written code can misbehave comes back as a failed result, fast, and the test
process (the "trainer") survives all of them. (Attacks on the isolation itself: test_sandbox_isolation.py.)"""

import functools
import os
import shutil
import signal
import time

import pytest
from sandbox_helpers import live_in_pid_namespace

from tether.rewards import CodeTestReward, extract_code
from tether.rewards import run_sandboxed as _run_sandboxed
from tether.rewards.sandbox import _reason_from_exit


def _isolation() -> str:
    """"full" where the kernel allows it (as on this project's CI machines); else "none", so that these accident
    tests still run where test_sandbox_isolation.py skips (it names the reason)."""
    try:
        _run_sandboxed("pass", timeout_s=10)
        return "full"
    except OSError:
        return "none"


ISOLATION = _isolation()
run_sandboxed = functools.partial(_run_sandboxed, isolation=ISOLATION)

TIMEOUT = 0.5  # for programs expected to fail; programs expected to pass get the default 5 s (loaded CI machines)
SLACK = 2.0  # every failure must be reported within timeout + 2 s
MEMORY_MB = 128  # the growing list touches every page up to the limit; 512 MiB takes > 1 s on a shared core

BAD_PROGRAMS = {
    # name: (code, the killed_reason it must report)
    "infinite_loop": ("while True:\n    pass", "timeout"),
    "sleep": ("import time\ntime.sleep(60)", "timeout"),
    "huge_alloc": ("x = bytearray(10**10)", "memory_limit"),
    "growing_list": ("xs = []\nwhile True:\n    xs.append(bytearray(10**6))", "memory_limit"),
    "growing_lazy": ("xs = []\nwhile True:\n    xs.append(bytes(10**7))", "memory_limit"),
    "exit_3": ("raise SystemExit(3)", None),
    "exception": ("1 / 0", None),
    "syntax_error": ("def f(:\n", None),
    "ctypes_segfault": ("import ctypes\nctypes.string_at(0)", "blocked"),  # guard refuses ctypes
    "real_segfault": ("import faulthandler\nfaulthandler._sigsegv()", "signal:SIGSEGV"),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()", "blocked"),
    "fork_bomb_retrying": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "timeout",
    ),
    "huge_stdout": ("while True:\n    print('x' * 10000)", "output_limit"),
    "huge_stderr": ("import sys\nwhile True:\n    sys.stderr.write('y' * 10000)", "output_limit"),
    "kill_parent": ("import os\nos.kill(os.getppid(), 9)", "blocked"),
    "subprocess": ("import subprocess\nsubprocess.run(['true'])", "blocked"),
    "socket": ("import socket\nsocket.socket()", "blocked"),
    "raise_limits": ("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "blocked"),
}


@pytest.mark.parametrize("name", list(BAD_PROGRAMS))
def test_bad_program_fails_fast(name):
    code, reason = BAD_PROGRAMS[name]
    t0 = time.monotonic()
    # Only the programs that must time out get the short limit, so a slow start on a loaded machine cannot turn
    # another failure into a timeout; all of them must still be reported within TIMEOUT + SLACK.
    r = run_sandboxed(code, timeout_s=TIMEOUT if reason == "timeout" else 5.0, memory_mb=MEMORY_MB)
    elapsed = time.monotonic() - t0
    assert not r.ok, r
    assert r.killed_reason == reason, r
    assert r.timed_out == (reason == "timeout")
    assert elapsed < TIMEOUT + SLACK, f"{name} took {elapsed:.2f} s"
    assert len(r.stdout.encode()) <= 1 << 20 and len(r.stderr.encode()) <= 1 << 20


def test_good_program_passes_with_stdin():
    r = run_sandboxed("a, b = map(int, input().split())\nprint(a + b)", stdin="2 40\n")
    assert r.ok and r.returncode == 0 and r.killed_reason is None and not r.timed_out
    assert r.stdout == "42\n" and r.stderr == ""


def test_real_segfault_without_guard():
    """With the guard off, ctypes really dereferences NULL: SIGSEGV (rc −11), no core dump, caller unharmed."""
    r = run_sandboxed("import ctypes\nctypes.string_at(0)", guard=False)
    assert (r.ok, r.returncode, r.killed_reason) == (False, -11, "signal:SIGSEGV")


def test_limits_are_applied():
    """The child reads back its own limits: AS = 256 MiB, CPU soft 3 s (= ceil(1.5) + 1) / hard 4 s,
    FSIZE = 2 MiB, NPROC = 16, NOFILE = 64, CORE = 0."""
    code = (
        "import resource as r\n"
        "for n in ('AS', 'CPU', 'FSIZE', 'NPROC', 'NOFILE', 'CORE'):\n"
        "    print(n, *r.getrlimit(getattr(r, 'RLIMIT_' + n)))"
    )
    r = run_sandboxed(code, timeout_s=1.5, memory_mb=256, max_file_mb=2, max_procs=16)
    mib = 1 << 20
    assert r.stdout.splitlines() == [
        f"AS {256 * mib} {256 * mib}",
        "CPU 3 4",
        f"FSIZE {2 * mib} {2 * mib}",
        "NPROC 16 16",
        "NOFILE 64 64",
        "CORE 0 0",
    ]


def test_exit_reasons():
    """Signals map to reasons; SIGXCPU (RLIMIT_CPU's soft signal) is "cpu_limit"."""
    assert _reason_from_exit(-signal.SIGXCPU, "") == "cpu_limit"
    assert _reason_from_exit(-signal.SIGSEGV, "") == "signal:SIGSEGV"
    assert _reason_from_exit(1, "Traceback ...\nMemoryError\n") == "memory_limit"
    assert _reason_from_exit(1, "Traceback ...\nValueError: x\n") is None
    assert _reason_from_exit(0, "MemoryError") is None


def test_file_size_limit():
    r = run_sandboxed("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10**6)", max_file_mb=2)
    assert not r.ok and r.killed_reason == "file_size_limit"


def test_filesystem_guard_and_workdir_cleanup(tmp_path):
    """Writes outside the fresh working dir are refused; inside it (and via tempfile) they work; the dir is gone
    afterwards."""
    target = tmp_path / "victim.txt"
    target.write_text("keep")
    for code in (
        f"open({str(target)!r}, 'w').write('gone')",
        f"import os\nos.remove({str(target)!r})",
        f"import os\nos.rename({str(target)!r}, 'stolen')",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('gone')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
    ):
        r = run_sandboxed(code)
        assert r.killed_reason == "blocked", (code, r)
    assert target.read_text() == "keep"

    code = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('hi')\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n"
        "print(os.getcwd())\nprint(open('scratch.txt').read())"
    )
    r = run_sandboxed(code)
    assert r.ok, r
    workdir, content = r.stdout.split()
    assert content == "hi" and os.path.basename(workdir).startswith("tether-sandbox-")
    assert not os.path.exists(workdir)


def test_empty_environment(monkeypatch):
    monkeypatch.setenv("TETHER_SECRET_TOKEN", "s3cret")
    r = run_sandboxed("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated, sys.flags.no_site)")
    names, flags = r.stdout.splitlines()
    assert "TETHER_SECRET_TOKEN" not in names and "PATH" not in names and "HOME" not in names
    assert flags == "1 1"


def _nobody_python():
    """An interpreter uid 65534 can run, when we are root (needed to test RLIMIT_NPROC: root is exempt)."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if cand and os.path.exists(cand):
            try:
                if run_sandboxed("print(1)", user=65534, python=cand, timeout_s=5).stdout == "1\n":
                    return cand
            except OSError:
                continue
    return None


def test_fork_bomb_bounded_by_nproc():
    """With the guard off, only RLIMIT_NPROC stops a retrying fork bomb. The kernel ignores it for root, so as
    root the bomb runs as uid 65534 (the default with full isolation). It is killed at the timeout and none of
    its processes survives: with full isolation none in its PID namespace, else none in its process group."""
    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc to list the surviving processes")
    bomb = (
        "import os\nprint(os.getpid(), os.readlink('/proc/self/ns/pid'), flush=True)\n"
        "while True:\n    try:\n        if os.fork() == 0:\n            print('child', flush=True)\n"
        "    except OSError:\n        pass"
    )
    kwargs = {}
    if os.geteuid() == 0 and ISOLATION == "none":
        python = _nobody_python()
        if python is None:
            pytest.skip("running as root and no interpreter executable by uid 65534: RLIMIT_NPROC cannot apply")
        kwargs = {"user": 65534, "python": python}
    t0 = time.monotonic()
    r = run_sandboxed(bomb, timeout_s=TIMEOUT, guard=False, max_procs=16, **kwargs)
    assert r.killed_reason == "timeout" and time.monotonic() - t0 < TIMEOUT + SLACK
    pid, ns = r.stdout.split()[:2]
    # NPROC = 16 processes of the user: the bomb's first one (and, isolated, the harness's PID 1) included
    assert r.stdout.count("child") <= 15
    if ISOLATION == "full":
        assert pid == "2" and ns != os.readlink("/proc/self/ns/pid")
        live = functools.partial(live_in_pid_namespace, ns)
    else:
        live = functools.partial(_live_members, int(pid))
    deadline = time.monotonic() + SLACK
    while live() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live(), f"processes of {ns if ISOLATION == 'full' else 'group ' + pid} survived the sandbox"


def _live_members(pgid: int) -> list[int]:
    """Pids in process group ``pgid`` that are not zombies (killed orphans wait as zombies until init reaps
    them, which can take seconds in a container)."""
    live = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                live.append(int(entry))
    return live


def test_invalid_limits_raise():
    with pytest.raises(ValueError, match="memory_mb"):
        run_sandboxed("pass", memory_mb=8)
    with pytest.raises(ValueError, match="timeout_s"):
        run_sandboxed("pass", timeout_s=0)
    with pytest.raises(ValueError, match="max_disk_mb"):
        run_sandboxed("pass", max_disk_mb=0)
    with pytest.raises(ValueError, match='isolation must be "full" or "none"'):
        _run_sandboxed("pass", isolation="partial")
    if os.geteuid() == 0:
        with pytest.raises(ValueError, match="user=0 would run the code as root"):
            _run_sandboxed("pass", user=0)


# ----------------------------------------------------------------------------------------------------
# CodeTestReward
# ----------------------------------------------------------------------------------------------------


def _md(code: str) -> str:
    return f"Here is my solution:\n```python\n{code}\n```\nDone."


def test_code_reward_assert_tests():
    """3 asserts, the solution breaks the negative case: 2/3."""
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, -1) == -2"]
    good = CodeTestReward(isolation=ISOLATION)
    assert good("p", _md("def add(a, b):\n    return a + b"), {"tests": tests}) == 1.0
    assert good("p", _md("def add(a, b):\n    return abs(a) + abs(b)"), {"tests": tests}) == pytest.approx(2 / 3)


def test_code_reward_stdin_stdout_tests():
    """Trailing spaces and blank lines do not matter; the third expectation is wrong: 2/3."""
    tests = [
        {"input": "1 2\n", "output": "3\n"},
        {"input": "5 5", "output": "10  \n\n"},
        {"input": "1 1", "output": "3"},
    ]
    code = "a, b = map(int, input().split())\nprint(a + b)"
    assert CodeTestReward(isolation=ISOLATION)("p", _md(code), {"tests": tests}) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)",  # exits 0 before the asserts run
        "import os\nos._exit(0)",
        "while True:\n    pass",
        "x = bytearray(10**10)",
        "raise SystemExit(3)",
        "while True:\n    print('x' * 10000)",
    ],
)
def test_code_reward_failures_score_zero(code):
    t0 = time.monotonic()
    reward = CodeTestReward(timeout_s=TIMEOUT, isolation=ISOLATION)
    assert reward("p", _md(code), {"tests": ["assert True"]}) == 0.0
    assert time.monotonic() - t0 < TIMEOUT + SLACK


def test_code_reward_none_zero_and_errors():
    r = CodeTestReward(isolation=ISOLATION)
    assert r("p", _md("print(1)"), {}) is None
    assert r("p", _md("print(1)"), {"tests": []}) is None
    assert r("p", "no code here", {"tests": ["assert True"]}) == 0.0
    with pytest.raises(ValueError, match=r"row id='c9': metadata\['tests'\]\[1\]"):
        r("p", _md("x = 1"), {"tests": ["assert x == 1", {"input": "1"}], "id": "c9"})
    with pytest.raises(ValueError, match="unknown sandbox options"):
        CodeTestReward(memory=100)


def test_extract_code():
    assert extract_code("```python\na = 1\n```\n```\nb = 2\n```") == "a = 1\n"
    assert extract_code("```py\na = 1\n```\n```Python3\nc = 3\n```") == "c = 3\n"
    assert extract_code("```cpp\nint x;\n```\n```\nb = 2\n```") == "b = 2\n"
    assert extract_code("```cpp\nint x;\n```") is None
    assert extract_code("```python\na = 1\n```\n```python\nunfinished") == "a = 1\n"
