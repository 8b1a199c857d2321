"""The sandbox's in-child harness: run by ``run_sandboxed`` as ``python -I -S -c <this file's text> <json>``.

Importing this module does nothing; it is a separate file only so that it is linted and readable. It runs in a
fresh, single-threaded interpreter *before* any untrusted code, so it may use ``ctypes`` and ``fork`` freely
(the caller never runs a ``preexec_fn``). The steps, for ``isolation="full"`` (``tether.rewards.sandbox`` says
what each one guarantees):

1. outer process (in the caller's PID namespace): ``unshare`` new mount, PID, network, IPC and UTS namespaces
   (plus a user namespace mapping only the caller's own uid when the caller is not root), then ``fork``;
2. the child is PID 1 ("init") of the new PID namespace: it makes every mount private, mounts a fresh
   ``/proc``, mounts a size- and inode-capped tmpfs over the working directory, hides directories the target
   user cannot traverse (``/root``) except the interpreter's own tree, drops to the unprivileged uid, sets
   ``no_new_privs``, applies Landlock, sets the resource limits and ``PR_SET_PDEATHSIG``, reports ``ready`` on
   the status pipe, forks the worker and reaps until the worker exits; its exit kills the whole namespace;
3. the worker closes the status pipe, installs the audit guard (optional) and runs ``main.py``.

Status pipe protocol (one line each, written only by the harness, never reachable from the worker):
``ready`` | ``setup-error <text>`` (before ``ready``) | ``exit <raw wait status of the worker>``.
"""

import json
import os
import sys

# Linux UAPI constants (identical on x86_64 and aarch64; Landlock's syscall numbers are in the unified table).
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 1, 4, 38
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
LL_TRUNCATE = 1 << 14  # ABI 3
LL_FS_BITS_BY_ABI = {1: 13, 2: 14, 3: 15, 4: 15, 5: 16}  # handled fs rights = (1 << n) - 1; ABI >= 5: 16
LL_NET_ALL = 0b11  # ABI 4: bind and connect TCP
LL_SCOPE_ALL = 0b11  # ABI 6: abstract unix sockets and signals outside the domain
READ_ONLY_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc")  # shared libs, ld.so.cache, zoneinfo
READ_ONLY_FILES = ("/dev/urandom", "/dev/random", "/dev/zero")


class SetupError(Exception):
    pass


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("unshare", "mount", "prctl", "sethostname"):
        getattr(libc, name).restype = ctypes.c_int
    libc.syscall.restype = ctypes.c_long
    return ctypes, libc


def _check(ctypes, ret, what):
    if ret < 0:
        err = ctypes.get_errno()
        raise SetupError(f"{what} failed: [Errno {err}] {os.strerror(err)}")
    return ret


def _say(fd, line):
    os.write(fd, (line + "\n").encode())


def _mount(ctypes, libc, src, target, fstype, flags, data):
    enc = (lambda s: None if s is None else s.encode())
    _check(ctypes, libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {fstype or src} on {target}")


def _hidden_ancestor(path):
    """The top-most ancestor of ``path`` that others cannot traverse (``/root`` is mode 0700), or None."""
    parts = path.strip("/").split("/")
    for i in range(1, len(parts) + 1):
        q = "/" + "/".join(parts[:i])
        if not os.stat(q).st_mode & 0o001:
            return q
    return None


def _reveal(ctypes, libc, paths):
    """Cover each untraversable ancestor of ``paths`` with an empty tmpfs and bind the paths themselves back,
    read-only, so the unprivileged user can import the standard library while the rest stays hidden."""
    by_cover = {}
    for p in paths:
        cover = _hidden_ancestor(p)
        if cover is not None:
            by_cover.setdefault(cover, []).append(p)
    for cover, inside in by_cover.items():
        fds = [(p, os.open(p, os.O_PATH)) for p in inside]  # keep the real dirs reachable once covered
        _mount(ctypes, libc, "tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,nr_inodes=256,mode=0755")
        for p, fd in fds:
            os.makedirs(p, mode=0o755, exist_ok=True)
            _mount(ctypes, libc, f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC, None)
            _mount(ctypes, libc, None, p, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
            os.close(fd)


def _minimal(paths):
    """Existing real paths, with those inside another one dropped."""
    real = sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})
    keep = []
    for p in real:
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in keep):
            keep.append(p)
    return keep


def _landlock(ctypes, libc, workdir, read_dirs, devnull="/dev/null"):
    """Writes only inside ``workdir`` (and ``/dev/null``); reads only there, in ``read_dirs``, the system library
    directories, a few ``/dev`` files and the (fresh) ``/proc``; no TCP (ABI 4), no signals or abstract unix
    sockets outside the sandbox (ABI 6). Every filesystem right of the running ABI (up to ABI 7, the newest
    this was written for) is handled, so none of them is left open by omission."""
    abi = _check(ctypes, libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1)),
                 "landlock_create_ruleset (Landlock ABI probe)")
    fs_all = (1 << LL_FS_BITS_BY_ABI.get(abi, 16)) - 1
    fields = [fs_all, LL_NET_ALL if abi >= 4 else 0, LL_SCOPE_ALL if abi >= 6 else 0]
    nfields = 3 if abi >= 6 else 2 if abi >= 4 else 1
    attr = (ctypes.c_uint64 * nfields)(*fields[:nfields])
    rs = _check(ctypes, libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(8 * nfields),
                                     ctypes.c_uint32(0)), "landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    file_rights = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | (LL_TRUNCATE if abi >= 3 else 0)
    read_rights = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR

    def allow(path, rights):
        if not os.path.exists(path):
            return
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            if not os.path.isdir(path):
                rights &= file_rights
            rule = PathBeneath(rights & fs_all, fd)
            _check(ctypes, libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(rs), ctypes.c_int(1), ctypes.byref(rule),
                                        ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        finally:
            os.close(fd)

    allow(workdir, fs_all)
    allow(devnull, LL_READ_FILE | LL_WRITE_FILE | LL_TRUNCATE)
    for p in (*read_dirs, *READ_ONLY_DIRS, "/proc"):
        allow(p, read_rights)
    for p in READ_ONLY_FILES:
        allow(p, LL_READ_FILE)
    _check(ctypes, libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(rs), ctypes.c_uint32(0)),
           "landlock_restrict_self")
    os.close(rs)


def _drop_capabilities(ctypes, libc):
    """Empty effective, permitted and inheritable sets (capset, version 3 header)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    _check(ctypes, libc.capset(ctypes.byref(header), ctypes.byref(data)), "capset (drop capabilities)")


def _set_rlimits(rlimits):
    import resource

    for name, soft, hard in rlimits:
        r = getattr(resource, name)
        _, cur_hard = resource.getrlimit(r)
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        resource.setrlimit(r, (soft, hard))


def _isolate_outer(ctypes, libc, lim):
    """In the caller's PID namespace: new namespaces; returns with this process ready to fork their init."""
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if lim["userns"]:
        uid, gid = os.getuid(), os.getgid()
        _check(ctypes, libc.unshare(flags | CLONE_NEWUSER), "unshare(user, mount, pid, net, ipc, uts namespaces)")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        _check(ctypes, libc.unshare(flags), "unshare(mount, pid, net, ipc, uts namespaces)")


def _isolate_init(ctypes, libc, lim, workdir):
    """PID 1 of the new namespace, still privileged: mounts, then drop to the target user and lock down."""
    uid, gid = lim["uid"], lim["gid"]
    _mount(ctypes, libc, None, "/", None, MS_REC | MS_PRIVATE, None)
    _mount(ctypes, libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
    read_dirs = _minimal([sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, *sys.path])
    if uid != os.getuid():  # the working directory too: the caller's TMPDIR may be under /root
        _reveal(ctypes, libc, _minimal([*read_dirs, workdir]))
    with open("main.py", "rb") as f:
        src = f.read()
    _mount(ctypes, libc, "tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={lim['disk_mb']}m,nr_inodes={lim['max_inodes']},mode=0700,uid={uid},gid={gid}")
    os.chdir(workdir)  # the old cwd is the directory now underneath the tmpfs
    with open("main.py", "wb") as f:
        f.write(src)
    os.chown("main.py", uid, gid)
    _check(ctypes, libc.sethostname(b"sandbox", ctypes.c_size_t(7)), "sethostname")
    if lim["userns"]:
        _drop_capabilities(ctypes, libc)
    else:
        for fd in (1, 2):  # the caller's pipes: let the target user reopen them as /dev/stdout, /dev/stderr
            os.fchown(fd, uid, gid)
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    _check(ctypes, libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _landlock(ctypes, libc, workdir, read_dirs)
    # After the uid change, which clears both: die with the outer process, and keep this process's /proc
    # entries (fds: the status pipe) closed to the worker, which runs as the same uid.
    _check(ctypes, libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    _check(ctypes, libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def _install_guard(lim, root, marker):
    deny = frozenset(lim["deny_events"])
    deny_imports = frozenset(lim["deny_imports"])
    paths = {k: tuple(v) for k, v in lim["path_events"].items()}
    dev_ok = frozenset(("/dev/null", "/dev/stdout", "/dev/stderr"))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # Bound here so that code rebinding builtins or os attributes cannot change what the hook calls.
    fsdecode, realpath, _isinstance, _any, _len, _PermissionError = (
        os.fsdecode, os.path.realpath, isinstance, any, len, PermissionError)
    busy = [False]

    def inside(p):
        p = fsdecode(p)
        return p in dev_ok or (lambda q: q == root or q.startswith(root + "/"))(realpath(p))

    def hook(event, args):
        if busy[0]:
            return
        busy[0] = True
        try:
            if event in deny:
                raise _PermissionError(f"{marker}: {event} is blocked")
            if event == "import" and args[0] in deny_imports:
                raise _PermissionError(f"{marker}: import {args[0]} is blocked")
            if event == "open":
                path, mode, flags = args
                writes = (_isinstance(flags, int) and flags & write_flags) or (
                    _isinstance(mode, str) and _any(c in mode for c in "wax+"))
                if writes and not _isinstance(path, int) and not inside(path):
                    raise _PermissionError(f"{marker}: writing {path!r} outside the working dir is blocked")
            elif event in paths:
                path_idx, fd_idx = paths[event]
                if _any(i < _len(args) and args[i] not in (None, -1) for i in fd_idx):
                    raise _PermissionError(f"{marker}: {event} with dir_fd is blocked")
                for i in path_idx:
                    if _isinstance(args[i], int) or not inside(args[i]):
                        raise _PermissionError(f"{marker}: {event} on {args[i]!r} outside the working dir")
        finally:
            busy[0] = False

    # The harness imported ctypes; forget it so that the guard sees (and refuses) the code's own import.
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    sys.addaudithook(hook)


def _run_main(lim, src):
    """Run ``main.py`` as ``__main__`` (this process never returns into the harness)."""
    import types

    root = os.path.realpath(os.getcwd())
    os.environ["TMPDIR"] = root
    sys.argv = ["main.py"]
    if lim["guard"]:
        _install_guard(lim, root, lim["marker"])
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    module.__builtins__ = __builtins__
    sys.modules["__main__"] = module
    exec(compile(src, "main.py", "exec"), module.__dict__)
    raise SystemExit(0)


def main():
    lim = json.loads(sys.argv[1])
    status = lim["status_fd"]
    workdir = os.path.realpath(os.getcwd())
    if lim["isolation"] == "none":
        _set_rlimits(lim["rlimits"])
        with open("main.py", encoding="utf-8") as f:
            src = f.read()
        _say(status, "ready")
        os.close(status)
        _run_main(lim, src)
    try:
        ctypes, libc = _libc()
        _isolate_outer(ctypes, libc, lim)
        init = os.fork()
    except (SetupError, OSError) as e:
        _say(status, f"setup-error {e}")
        os._exit(70)
    if init:  # outer process: wait for the namespace's init and pass on its exit code
        os.close(status)
        _, wstatus = os.waitpid(init, 0)
        os._exit(os.waitstatus_to_exitcode(wstatus) if os.WIFEXITED(wstatus) else 71)
    try:
        _isolate_init(ctypes, libc, lim, workdir)
        _set_rlimits(lim["rlimits"])
        with open("main.py", encoding="utf-8") as f:
            src = f.read()
    except (SetupError, OSError) as e:
        _say(status, f"setup-error {e}")
        os._exit(70)
    _say(status, "ready")
    worker = os.fork()
    if worker == 0:
        os.close(status)
        libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the code may read its own /proc/self (init stays closed)
        del ctypes, libc
        _run_main(lim, src)
    while True:  # reap orphans re-parented to us until the worker itself exits
        pid, wstatus = os.waitpid(-1, 0)
        if pid == worker:
            _say(status, f"exit {wstatus}")
            os._exit(0)  # as PID 1: the kernel now kills every other process of the namespace


if __name__ == "__main__":
    main()
