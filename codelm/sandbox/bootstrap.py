"""The program a sandboxed run starts, ``python -I -S -B bootstrap.py PROGRAM SETTINGS``.

codelm.sandbox.runner copies this file and ``crossing.py`` (the plain data both sides of a run
speak: its settings, a trusted test, the values that cross between a test and the program it
tests) into the run's control directory and starts it there, isolated: no site-packages, no
project module on its path, so it imports the standard library and the installed packages its
settings name (numpy for the pass@k tasks) alone. It reads the completion token (and a trusted
test) from stdin, sets the run's rlimits, gives up root and every capability, confines the
process with Landlock and a seccomp filter (forking first for a trusted test), installs the
audit hook, runs the program as ``__main__``, and on its end raises the event whose hook writes
the completion marker.
"""

import builtins
import os
import resource
import sys
import types

EXIT_MEMORY = 113  # the bootstrap's exit status when the sample ran out of memory
MAX_FDS = 64  # RLIMIT_NOFILE: also bounds what a sample keeps outside RLIMIT_AS and the disk scan


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
        for _, parent, paths in packages:  # a directory's tree, or a module's file
            rules += [(parent, 1 << 3)]  # READ_DIR
            rules += [(path, read if os.path.isdir(path) else read & ~(1 << 3)) for path in paths]
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
    """Signals only to this process, threads but no process, no exec, socket (a connected pair
    of Unix stream sockets, which reach nothing else, is allowed), memfd (outside RLIMIT_AS),
    rlimit change, ptrace or io_uring; the rest allowed. Returns whether it is on."""
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
              ("clone3", [], enosys, None),  # flags out of reach: glibc falls back to clone
              # a connected pair of Unix stream sockets (asyncio's self-pipe), with or
              # without SOCK_NONBLOCK and SOCK_CLOEXEC: a datagram one could send elsewhere
              ("socketpair", [(arg(0), (1,)), (arg(1), (1, 0x801, 0x80001, 0x80801))],
               allow, eperm)]
    rules += [(name, [], eperm, None) for name in
              ("tkill", "pidfd_send_signal", "pidfd_open", "fork", "vfork", "execve",
               "execveat", "socket", "memfd_create", "setrlimit", "ptrace",
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


def _importable(packages):
    """Make the named installed packages importable (``packages``: [name, directory on
    sys.path, [its paths]] each), and no other of their directory's: a finder of those
    names there, not the directory on sys.path. Without Landlock this keeps careless code from
    importing what else is installed (a C extension's writes raise no audit event); hostile code
    is Landlock's to stop."""
    import importlib.machinery

    where = {name: parent for name, parent, _ in packages}
    find = importlib.machinery.PathFinder.find_spec

    class InstalledPackages:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if path is not None or fullname not in where:  # a submodule: its package's path
                return None
            return find(fullname, [where[fullname]])

    sys.meta_path.append(InstalledPackages)


# Audit events the guard refuses: processes, signals, sockets, always; and in a process that
# holds the completion hook, what reaches the hook's cell or skips lines of the test (a trusted
# test's program runs in a process of its own that holds neither: there doctest and profilers
# trace, as in the harness).
_DENIED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill",
    "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn", "socket.__new__",
    "os.chroot", "resource.setrlimit",
    # a Unix socket pair's: an address elsewhere, or descriptors sent (which could keep the
    # run's output pipes open past its end)
    "socket.bind", "socket.connect", "socket.sendto", "socket.sendmsg"})
_REACHING_THE_HOOK = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents",
                                "sys.settrace", "sys.setprofile",
                                # another thread's frames: the hook's own, as it runs
                                "sys._current_frames"})


# A denied import raises ImportError, as a module not installed does: code that falls back
# without the module (numpy without ctypes) goes on, as it would where the harness runs.
def _install_guard(workdir, landlock, seccomp, holds_hook=True):
    """The audit hook that keeps the program's writes (and, without Landlock, its C-level
    writers) in ``workdir`` and refuses processes, signals, sockets (a Unix socket object where
    ``seccomp`` lets no socket but a connected pair be made), raw memory and, where the process
    ``holds_hook``, what reaches it; every table and helper it uses is its own closure's (made
    here, before the program runs)."""
    realpath, isdir, fsdecode, getpid = os.path.realpath, os.path.isdir, os.fsdecode, os.getpid
    prefix = workdir + os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    denied = set(_DENIED_EVENTS | _REACHING_THE_HOOK if holds_hook else _DENIED_EVENTS)
    # posix and _signal again would bring back the functions replaced below; a dotted name's
    # last part counts too ("x._posixsubprocess" is the real C module)
    denied_imports = {"ctypes", "_ctypes", "_posixsubprocess", "posix", "_signal"}
    # C modules that write with no audit event: "not installed", so dbm falls back to dbm.dumb
    unavailable = {"_dbm", "_gdbm", "_posixshmem", "_multiprocessing", "readline"}
    # event -> indices of path arguments that must stay inside the working directory
    path_events = {f"os.{name}": (0,) for name in (
        "chmod", "chown", "mkdir", "remove", "rmdir", "truncate", "utime", "chflags", "lchflags",
        "setxattr", "removexattr")} | {"os.link": (0, 1), "os.rename": (0, 1), "os.symlink": (1,)}
    # the path events whose last argument is a dir_fd
    with_dir_fd = {f"os.{name}" for name in ("chmod", "chown", "mkdir", "remove", "rmdir",
                                             "utime", "symlink")}
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
            # a path relative to a directory's descriptor: where it leads, the hook cannot see
            if event in ("os.link", "os.rename") and any(fd not in (None, -1) for fd in args[2:]):
                deny(f"{event} with dir_fd")
            if event in with_dir_fd and args[-1] not in (None, -1):
                deny(f"{event} with dir_fd")
        elif event == "socket.__new__" and seccomp and args[1] == 1:  # AF_UNIX
            return
        elif event in denied or event.startswith("ctypes."):
            deny(event)
        elif event == "import" and (denied_imports & {args[0], args[0].rpartition(".")[2]}
                                    or "\0" in args[0]  # C cuts the name there
                                    or args[0].startswith(("_test", "_xx"))):  # raw memory
            raise ImportError(f"sandbox: importing {args[0]} is not allowed", name=args[0])
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

    _replace_unaudited(deny, inside)
    if not landlock:  # nothing else stops sqlite's own ATTACH and VACUUM INTO: checked there
        _confine_sqlite(sqlite_authorizer)
    sys.addaudithook(guard)


def _no_signal_handlers():
    """No Python signal handler where the completion hook is held: a handler runs, and SIGINT's
    KeyboardInterrupt is raised, in whatever frame is running, the hook's too. SIGINT is the
    system's default (``_thread.interrupt_main`` then does nothing), and ``_signal.signal``
    (which signal.signal calls) takes SIG_DFL and SIG_IGN alone. Called before the guard, which
    refuses importing _signal."""
    import _signal

    install = _signal.signal

    def signal_without_handlers(signalnum, handler):
        if callable(handler):
            raise PermissionError("sandbox: a Python signal handler (where the completion hook "
                                  "is held) is not allowed")
        return install(signalnum, handler)

    install(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal = signal_without_handlers


def _replace_unaudited(deny, inside):
    """Functions with no audit event, replaced in posix, os and _signal (before signal.py copies
    it): refused, or confined to the working directory (``inside``)."""
    def refused(name):
        return lambda *args, **kwargs: deny(name)

    def confined(name, make):
        def make_inside(path, *args, dir_fd=None, **kwargs):
            if dir_fd is not None or not inside(path):
                deny(f"os.{name} on {path!r} (outside the working directory)")
            return make(path, *args, **kwargs)
        return make_inside

    # subprocess (which asyncio imports) loads _posixsubprocess, whose fork_exec raises no audit
    # event: a stand-in refuses it, so that subprocess and multiprocessing import, as where the
    # harness runs, and starting a process fails (its own audit events are refused)
    stand_in = types.ModuleType("_posixsubprocess")
    stand_in.fork_exec = refused("_posixsubprocess.fork_exec")
    sys.modules["_posixsubprocess"] = stand_in
    import _signal
    import posix
    replacements = [(posix, "pidfd_open", refused("os.pidfd_open")),
                    (posix, "memfd_create", refused("os.memfd_create")),  # outside RLIMIT_AS
                    (_signal, "pidfd_send_signal", refused("signal.pidfd_send_signal"))]
    replacements += [(posix, name, confined(name, getattr(posix, name)))
                     for name in ("mkfifo", "mknod") if hasattr(posix, name)]
    opener = posix.open

    def open_without_dir_fd(path, flags, mode=0o777, *, dir_fd=None):
        """os.open; its audit event does not carry dir_fd, so a dir_fd is refused here."""
        if dir_fd is not None:
            deny(f"os.open of {path!r} with dir_fd")
        return opener(path, flags, mode)

    replacements.append((posix, "open", open_without_dir_fd))
    for module, name, replacement in replacements:
        for target in (module, os):
            if hasattr(target, name):
                setattr(target, name, replacement)


def _confine_sqlite(authorizer):
    """sqlite3's connections made with ``authorizer`` on, which sees the ATTACHes."""
    try:
        import _sqlite3
    except ImportError:
        pass
    else:
        connect = _sqlite3.connect  # sqlite3 copies it on import

        def connect_confined(*args, **kwargs):
            connection = connect(*args, **kwargs)
            connection.set_authorizer(authorizer)
            return connection
        _sqlite3.connect = connect_confined


def _completion_hook(token, main_frame):
    """An audit hook, held by the interpreter alone, that writes the completion marker once, when
    "sandbox.completed" is raised while ``main_frame`` (the bootstrap's main) is on its last
    line, past the program. It raises no audit event itself (sys._getframe would): a hook the
    program added never runs while this one's frame, and the marker in it, is on the stack."""
    marker = f"\nsandbox: completed {token}\n".encode()
    done = []
    write = os.write  # its own: the program can reach this module's
    last_line = max(line for *_, line in main_frame.f_code.co_lines() if line is not None)

    def hook(event, args):
        if event == "sandbox.completed" and not done and main_frame.f_lineno == last_line:
            done.append(True)
            write(2, marker)
    sys.addaudithook(hook)


def _crossing():
    """``crossing.py``, beside this file, as a module (the run's path holds no project module:
    it is read and run here, before any confinement)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "crossing.py")
    module = types.ModuleType("crossing")
    module.__file__ = path
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), module.__dict__)
    return module


def _run_program(program, source, as_main):
    """The sample as __main__, as under `python program.py` (``as_main``), else as a module of
    another name, as a harness execs it; its namespace."""
    sys.argv = [program]
    code = compile(source, program, "exec")
    name = "__main__" if as_main else "__candidate__"
    module = types.ModuleType(name)
    module.__file__, module.__builtins__ = program, builtins
    sys.modules[name] = module
    # The program may have rebound sys.exit or os._exit: a raise is what ends the run here.
    try:
        exec(code, module.__dict__)
    except MemoryError:
        raise SystemExit(EXIT_MEMORY) from None
    except Exception as error:  # reported as Python reports it, from the program's frames on
        error.__traceback__ = error.__traceback__.tb_next
        sys.excepthook(type(error), error, error.__traceback__)
        raise SystemExit(1) from None
    return module.__dict__


def main():
    """Run the program ``sys.argv[1]`` under the settings ``sys.argv[2]`` (plain data), confined;
    on its end (or the trusted test's), raise the event that marks the run completed."""
    crossing = _crossing()
    program, cfg = sys.argv[1], crossing.plain_decode(sys.argv[2])
    trusted = cfg["trusted_test"]
    if not trusted:
        _take_stdin(sys._getframe())
    with open(program, encoding="utf-8-sig") as f:  # a leading BOM, as Python reads a file
        source = f.read()
    workdir = os.path.realpath(os.getcwd())
    _limits(cfg)
    if trusted:
        calls, answers = os.pipe(), os.pipe()  # the test's side -> the candidate's, and back
        # The candidate's stdout: not the test's, whose count lines it could otherwise reach
        # (a shared file offset); opened before Landlock forbids it.
        discard = os.open(os.devnull, os.O_WRONLY)
    abi, seccomp, caps, candidate = _kernel(cfg, workdir, program, split=trusted)
    if candidate:  # the program's side of a trusted test: it never sees the token or the test
        os.dup2(discard, 1)
        os.close(discard)
        _close_stdin()
        os.close(calls[1])
        os.close(answers[0])
        _install_guard(workdir, abi > 0, seccomp, holds_hook=False)
        _importable(cfg["packages"])  # what the program may import
        if crossing.receive(calls[0]) is not None:  # the test's side has written its line first
            crossing.serve(_run_program(program, source, cfg["as_main"]), calls[0],
                           answers[1])
        os._exit(0)
    if trusted:
        os.close(discard)
        os.close(calls[0])
        os.close(answers[1])
        test = _take_stdin(sys._getframe())
    sys.stderr.write(f"sandbox: landlock={abi} seccomp={int(seccomp)} caps={caps:x}\n")
    sys.stderr.flush()
    if not trusted:  # the test's side runs only the trusted test (which may import packages)
        _no_signal_handlers()
        _install_guard(workdir, abi > 0, seccomp)
    _importable(cfg["packages"])  # what the test (and program) may import
    if trusted:
        crossing.send(calls[1], "go")
        crossing.run_trusted_test(crossing.plain_decode(test), calls[1], answers[0])
    else:
        _run_program(program, source, cfg["as_main"])
    sys.stdout.flush()
    sys.stderr.flush()
    sys.audit("sandbox.completed")  # main's last line: the completion hook looks for it


if __name__ == "__main__":
    main()
