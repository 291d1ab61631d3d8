"""The program a sandboxed run starts, ``python -I -S -B bootstrap.py PROGRAM SETTINGS``, and
the plain data both sides of a run speak.

codelm.sandbox.runner copies this file into the run's control directory and starts it there,
isolated: no site-packages, no project module on its path, so it imports the standard library
and the installed packages its settings name (numpy for the pass@k tasks) alone. It reads the completion token (and a trusted test) from stdin, sets the run's rlimits,
gives up root and every capability, confines the process with Landlock and a seccomp filter
(forking first for a trusted test), installs the audit hook, runs the program as ``__main__``,
and on its end raises the event whose hook writes the completion marker. ``plain_encode`` and
``plain_decode`` carry its settings (argv), a trusted test (stdin) and the values that cross
between a test and the program it tests.
"""

import builtins
import collections.abc
import decimal
import fractions
import importlib
import os
import resource
import sys
import types

EXIT_MEMORY = 113  # the bootstrap's exit status when the sample ran out of memory
MAX_FDS = 64  # RLIMIT_NOFILE: also bounds what a sample keeps outside RLIMIT_AS and the disk scan


# ---- Plain data: the one form a trusted test's values cross in, and the bootstrap's settings ----


def plain_encode(value: object) -> str:
    """``value`` in a fixed text form that ``plain_decode`` reads: None, bool, int, float,
    complex, str, bytes, Fraction, Decimal, a range, a numpy scalar (as its item()), a numpy
    array of numbers or bools (as one, its dtype and shape kept), and lists, tuples, sets,
    frozensets, deques, dicts and OrderedDicts of them, a dict's keys, values or items view,
    and an iterator (a generator, map, filter: its items, read here, cross as an iterator over
    them); a bytearray or memoryview as its bytes, a UserList, UserDict, UserString, ChainMap or
    mapping proxy as what it wraps (each equal to it). Another subclass (a Counter, a
    namedtuple) crosses as its base type; anything else is a TypeError."""
    out: list[str] = []
    _plain_parts(value, out)
    return "".join(out)


def _plain_parts(value: object, out: list[str], read: bool = True) -> None:
    """``value``'s plain text appended to ``out``; an iterator not ``read``: _UNREAD."""
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
    elif isinstance(value, dict):  # an OrderedDict as one: its == reads the order
        items = list(dict.items(value))
        out.append(f"{'O' if isinstance(value, collections.OrderedDict) else 'D'}{len(items)}:")
        for key, item in items:
            _plain_parts(key, out, read)
            _plain_parts(item, out, read)
    elif type(value) is list and _all_of(value, int):  # a test's big input: one join, not a walk
        out.append(f"Y{len(value)}:{','.join(map(hex, value))};")
    elif type(value) is list and _all_of(value, float):
        out.append(f"G{len(value)}:{','.join(map(float.__repr__, value))};")
    elif isinstance(value, (bytearray, memoryview)):  # each equal to its bytes
        _plain_parts(bytes(value), out, read)
    elif isinstance(value, (collections.UserList, collections.UserDict, collections.UserString)):
        _plain_parts(value.data, out, read)  # each equal to the list, dict or str it wraps
    elif isinstance(value, (collections.ChainMap, types.MappingProxyType)):
        _plain_parts(dict(value), out, read)
    elif isinstance(value, fractions.Fraction):
        out.append(f"q{int(value.numerator):x};{int(value.denominator):x};")
    elif isinstance(value, decimal.Decimal):
        text = str(decimal.Decimal.__str__(value))
        out.append(f"m{len(text)}:{text}")
    elif isinstance(value, range):  # a range equals a range, not a list: it crosses as one
        out.append("R3:")
        for bound in (value.start, value.stop, value.step):
            _plain_parts(bound, out, read)
    elif not read and isinstance(value, collections.abc.Iterator):  # left as it is
        out.append(_UNREAD)
    elif isinstance(value, tuple(_SEQUENCE_TAGS)):
        items = list(value)
        tag = next(tag for kind, tag in _SEQUENCE_TAGS.items() if isinstance(value, kind))
        out.append(f"{tag}{len(items)}:")
        for item in items:
            _plain_parts(item, out, read)
    elif _is_numpy_scalar(value):  # np.int64(6) crosses as 6, as a harness's test compares it
        _plain_parts(_numpy_item(value), out, read)
    elif _is_numpy_array(value):  # its dtype, shape and items, built as an array again
        if value.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"an array of dtype {value.dtype} is not plain data (it does not "
                            "cross to the test)")
        out.append("A")
        _plain_parts((value.dtype.str, tuple(value.shape), value.ravel().tolist()), out,
                     read)
    else:
        raise TypeError(f"a {type(value).__name__} is not plain data (it does not cross to the "
                        "test)")


_UNREAD = "\x00an iterator, not read\x00"  # in a text that only tells whether values changed


def _all_of(items: list, kind: type) -> bool:
    """Whether every item is exactly a ``kind`` (no bool for int, no subclass)."""
    return bool(items) and all(type(item) is kind for item in items)


_ARRAY_KINDS = "biufc"  # the numpy arrays that cross: bool, int, unsigned, float and complex


def _is_numpy_array(value: object) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, getattr(numpy, "ndarray", ()))


def _numpy_array(parts) -> object:
    """The array of plain ``parts`` (dtype text, shape, flat items), built with numpy; a
    ValueError for anything else."""
    try:  # a package the run's settings name (PasskTask.packages), where an array crosses
        numpy = importlib.import_module("numpy")
    except ImportError:
        raise ValueError("not plain data: an array, where numpy is not importable") from None
    if not (type(parts) is tuple and len(parts) == 3 and type(parts[0]) is str
            and type(parts[1]) is tuple and all(type(n) is int for n in parts[1])
            and type(parts[2]) is list):
        raise ValueError("not plain data: a malformed array")
    dtype = numpy.dtype(parts[0])
    if dtype.kind not in _ARRAY_KINDS:
        raise ValueError(f"not plain data: an array of dtype {dtype}")
    return numpy.array(parts[2], dtype=dtype).reshape(parts[1])


def _numpy_item(value):
    """A numpy scalar's Python value: its item(), and a long double's (whose item() is itself)
    the nearest float or complex."""
    item = value.item()
    if not _is_numpy_scalar(item):
        return item
    if isinstance(item, sys.modules["numpy"].complexfloating):
        return complex(item)
    return float(item)


def _is_numpy_scalar(value: object) -> bool:
    """Whether ``value`` is a numpy scalar (np.int64, np.bool_, ...; numpy imported already):
    it crosses as its ``item()``, which must be plain data in turn."""
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, getattr(numpy, "generic", ()))


# Containers by the tag their items cross under, the first type a value is an instance of.
_SEQUENCE_TAGS = {list: "l", tuple: "t", frozenset: "f", set: "S", collections.deque: "Q",
                  collections.abc.KeysView: "K", collections.abc.ItemsView: "E",
                  collections.abc.ValuesView: "V", collections.abc.Iterator: "I"}
_BUILT = {"l": list, "t": tuple, "S": set, "f": frozenset, "Q": collections.deque,
          "R": lambda bounds: range(*bounds),
          "K": lambda items: dict.fromkeys(items).keys(),
          "E": lambda items: dict(items).items(),
          "V": lambda items: dict(enumerate(items)).values(),
          "I": lambda items: iter(items)}


def plain_decode(text: str) -> object:
    """The value ``plain_encode`` wrote, built here of builtin and standard-library types
    only; ValueError for anything else."""
    try:
        value, end = _plain_value(text, 0)
    except (TypeError, ArithmeticError) as err:  # an unhashable key, a zero denominator
        raise ValueError(f"not plain data: {err}") from None
    if end != len(text):
        raise ValueError("not plain data: text after the value")
    return value


def _plain_value(text: str, at: int) -> tuple[object, int]:
    """The value starting at ``at``, and where it ends."""
    tag = text[at : at + 1]
    if tag in ("N", "T", "F"):
        return {"N": None, "T": True, "F": False}[tag], at + 1
    if tag in ("i", "d", "c", "q"):
        end = text.index(";", at + 1)
        if tag == "i":
            return int(text[at + 1 : end], 16), end + 1
        if tag == "d":
            return float(text[at + 1 : end]), end + 1
        second = text.index(";", end + 1)
        if tag == "q":
            fraction = fractions.Fraction(int(text[at + 1 : end], 16),
                                          int(text[end + 1 : second], 16))
            return fraction, second + 1
        return complex(float(text[at + 1 : end]), float(text[end + 1 : second])), second + 1
    if tag == "A":
        parts, end = _plain_value(text, at + 1)
        return _numpy_array(parts), end
    if tag not in ("s", "b", "m", "D", "O", "Y", "G", *_BUILT):
        raise ValueError(f"not plain data at {at}")
    colon = text.index(":", at + 1)
    count = int(text[at + 1 : colon])
    at = colon + 1
    if count < 0 or (tag in ("s", "b", "m") and at + count > len(text)):
        raise ValueError(f"not plain data at {at}")
    if tag == "s":
        return text[at : at + count], at + count
    if tag == "b":
        return text[at : at + count].encode("latin-1"), at + count
    if tag == "m":
        return decimal.Decimal(text[at : at + count]), at + count
    if tag in ("Y", "G"):  # a list of ints or floats, joined
        end = text.index(";", at)
        parts = text[at:end].split(",") if count else []
        if len(parts) != count:
            raise ValueError(f"not plain data at {at}")
        parse = float if tag == "G" else lambda part: int(part, 16)
        return [parse(part) for part in parts], end + 1
    items = []
    for _ in range(count * 2 if tag in ("D", "O") else count):
        item, at = _plain_value(text, at)
        items.append(item)
    if tag == "D":
        return dict(zip(items[::2], items[1::2])), at
    if tag == "O":
        return collections.OrderedDict(zip(items[::2], items[1::2])), at
    return _BUILT[tag](items), at




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


def _importable(packages):
    """Make the named installed packages importable (``packages``: [directory on sys.path,
    [the package's directories]] each), and no other of their directory's: a finder of those
    names there, not the directory on sys.path. Without Landlock this keeps careless code from
    importing what else is installed (a C extension's writes raise no audit event); hostile code
    is Landlock's to stop."""
    import importlib.machinery

    where = {os.path.basename(directories[0]): parent for parent, directories in packages}
    find = importlib.machinery.PathFinder.find_spec

    class InstalledPackages:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if path is not None or fullname not in where:  # a submodule: its package's path
                return None
            return find(fullname, [where[fullname]])

    sys.meta_path.append(InstalledPackages)


# A denied import raises ImportError, as a module not installed does: code that falls back
# without the module (numpy without ctypes) goes on, as it would where the harness runs.
def _install_guard(workdir, landlock):
    """The audit hook that keeps the program's writes (and, without Landlock, its C-level
    writers) in ``workdir`` and refuses processes, signals, sockets, raw memory and what reaches
    the completion hook; every table and helper it uses is its own closure's."""
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
        elif event in denied or event.startswith("ctypes."):
            deny(event)
        elif event == "import" and (denied_imports & {args[0], args[0].rpartition(".")[2]}
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
    ``main_frame`` (the bootstrap, after the program) raises "sandbox.completed"."""
    marker = f"\nsandbox: completed {token}\n".encode()
    done = []

    def hook(event, args):
        if event == "sandbox.completed" and not done and sys._getframe(1) is main_frame:
            done.append(True)
            os.write(2, marker)
    sys.addaudithook(hook)


# A trusted test's two processes speak in messages: a 4-byte length, then plain data in the
# fixed form of plain_encode.
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
    call (name, args, kwargs), an answer ("value", value, after, same) or ("raised",
    exception, message, after). ``after``: the arguments as the call left them, where it
    changed them in place (else None); ``same``: the position of the argument the value is
    (``return xs``), else None: as in the harness's one interpreter, the test sees both."""
    _send(answers, "defined")
    while (call := _receive(calls)) is not None:
        name, args, kwargs = call
        before = _arguments_text(args, kwargs)
        try:
            value = namespace[name](*args, **kwargs)
            same = next((i for i, arg in enumerate(args) if value is arg), None)
            answer = plain_encode(("value", value, _changed(args, kwargs, before), same))
        except Exception as err:  # a result that does not cross is the call's error
            try:
                after = _changed(args, kwargs, before)
            except TypeError:  # an argument the call filled with what does not cross
                after = None
            answer = plain_encode(("raised", _builtin_bases(type(err)), str(err)[:300], after))
        _send_text(answers, answer)


def _arguments_text(args, kwargs):
    """The arguments' plain text, any iterator among them left unread: what tells whether a
    call changed them."""
    out = []
    _plain_parts((args, kwargs), out, read=False)
    return "".join(out)


def _changed(args, kwargs, before):
    """(args, kwargs) where the call changed them from ``before`` (``_arguments_text``), else
    None; None too where an iterator came among them (writing it back would read it)."""
    if _UNREAD in before or _arguments_text(args, kwargs) == before:
        return None
    return (args, kwargs)


def _builtin_bases(kind):
    """The names of the builtin exception classes ``kind`` is, nearest first: a library's
    error (statistics.StatisticsError) crosses as the builtin it is (ValueError)."""
    return [base.__name__ for base in kind.__mro__
            if getattr(builtins, base.__name__, None) is base and issubclass(base, Exception)]


def _proxy(name, calls, answers, crossing):
    """A stand-in for the candidate's ``name``: the call's arguments go over as plain data, the
    answer comes back as plain data built here, or its exception (by builtin name) is raised.
    Under ``crossing.shared`` (the harness's one interpreter, seen from here) what the call
    changed in its arguments is written into the test's own (``_write_back``, noted in
    ``crossing.changed``) and an argument it returned is the test's own object; else the
    arguments stay as the test made them and the answer is a value."""
    def call(*args, **kwargs):
        _send(calls, (name, args, kwargs))
        answer = _receive(answers)
        if answer is None:
            raise RuntimeError(f"the candidate's process ended, or answered past the size "
                               f"limit, during {name}()")
        if type(answer) is not tuple or len(answer) != 4 or answer[0] not in ("value", "raised"):
            raise RuntimeError(f"{name}(): the candidate's answer is malformed")
        after = answer[3] if answer[0] == "raised" else answer[2]
        same = answer[3] if answer[0] == "value" else None
        # one object reached twice (an argument given twice, a list holding itself) has no
        # one value to write back: that call crosses as values alone
        shared = (crossing.shared and (after is not None or type(same) is int)
                  and not _aliased([*args, *kwargs.values()]))
        if after is not None:
            crossing.changed = True
            if shared:
                _write_back(args, kwargs, after)
        if answer[0] == "value":
            if (shared and type(same) is int and 0 <= same < len(args)
                    and not isinstance(args[same], collections.abc.Iterator)):  # read to cross
                return args[same]
            return answer[1]
        if type(answer[1]) is not list:
            raise RuntimeError(f"{name}(): the candidate's answer is malformed")
        error = _rebuilt_error([str(kind) for kind in answer[1]], str(answer[2]))
        error.add_note(f"raised by the candidate's {name}()")
        raise error
    call.__name__ = name
    return call


def _write_back(args, kwargs, after):
    """The candidate's changes to a call's arguments (``after``: (args, kwargs), or None for
    none) made in the test's own objects."""
    if type(after) is not tuple or len(after) != 2:
        return
    new_args, new_kwargs = after
    if type(new_args) is tuple and len(new_args) == len(args):
        for old, new in zip(args, new_args):
            _update(old, new)  # an argument itself is never replaced: the test holds it
    if type(new_kwargs) is dict:
        for key, old in kwargs.items():
            if key in new_kwargs:
                _update(old, new_kwargs[key])


def _update(old, new):
    """``old`` (the test's) made equal to ``new`` in place where it is a mutable container of
    ``new``'s kind, its items kept where they are such containers in turn (so that the test's
    references to them see the change too): True where done, False for the caller to put
    ``new`` in its place (a tuple whose items changed, a number, another kind)."""
    if isinstance(old, list) and type(new) is list:
        kinds = _container_kinds()
        if len(old) != len(new) or not any(isinstance(item, kinds) for item in old):
            old[:] = new  # (its items are values: no reference to them to keep)
            return True
        for i, item in enumerate(new):
            if not _update(old[i], item):
                old[i] = item
        return True
    if isinstance(old, dict) and type(new) in (dict, collections.OrderedDict):
        if list(old) != list(new):
            old.clear()
            old.update(new)
            return True
        for key, item in new.items():
            if not _update(old[key], item):
                old[key] = item
        return True
    if isinstance(old, set) and type(new) is set:
        if old != new:
            old.clear()
            old.update(new)
        return True
    if isinstance(old, collections.deque) and type(new) is collections.deque:
        if old != new:
            old.clear()
            old.extend(new)
        return True
    if _is_numpy_array(old) and _is_numpy_array(new):
        if old.shape != new.shape or old.dtype != new.dtype:
            return False
        old[...] = new
        return True
    if isinstance(old, tuple) and type(new) is tuple and len(old) == len(new):
        done = True  # its containers updated, its other items already equal
        for item, new_item in zip(old, new):
            if not (_update(item, new_item) or _equal(item, new_item)):
                done = False
        return done
    return _equal(old, new)


def _equal(a, b):
    """Whether ``a`` and ``b`` are of one type and ``a == b`` says so (an array's elementwise
    answer: no): 1 stays where True comes back, as the program would have left True."""
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except (ValueError, TypeError):
        return False


_CONTAINERS = (list, dict, set, collections.deque, tuple)


def _container_kinds():
    """The types ``_update`` changes in place or walks: _CONTAINERS, and numpy's arrays where
    numpy is loaded."""
    numpy = sys.modules.get("numpy")
    return _CONTAINERS + (numpy.ndarray,) if numpy is not None else _CONTAINERS


def _aliased(values):
    """Whether a mutable container is reached twice among ``values`` (and the items of their
    containers)."""
    kinds = _container_kinds()
    seen = set()
    stack = list(values)
    while stack:
        value = stack.pop()
        if not isinstance(value, kinds):
            continue
        if not isinstance(value, tuple):
            if id(value) in seen:
                return True
            seen.add(id(value))
        if isinstance(value, _CONTAINERS):  # an array's items are numbers
            items = value.values() if isinstance(value, dict) else value
            stack.extend(item for item in items if isinstance(item, kinds))
    return False


def _rebuilt_error(kinds, message):
    """The nearest builtin exception of ``kinds`` (names, nearest first) that a message alone
    builds (UnicodeDecodeError needs more: its base UnicodeError is built), else RuntimeError;
    never one that ends a loop (StopIteration)."""
    for kind in kinds:
        raised = getattr(builtins, kind, None)
        if not isinstance(raised, type) or not issubclass(raised, Exception):
            continue
        if issubclass(raised, (StopIteration, StopAsyncIteration)):  # these end loops
            return RuntimeError(message)
        try:
            return raised(message)
        except TypeError:  # its constructor takes other arguments
            continue
    return RuntimeError(message)


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
    in the harness's one namespace), then the test; its assertions compare values built here.
    It runs as in the harness's one interpreter (a call's changes to its arguments seen);
    where a call changed them, it runs again with its arguments and results as values alone,
    and must pass that way too: an answer that holds only by changing what the test compares
    it with (emptying the list a test sorts for its expected value) is no pass."""
    if _receive(answers) != "defined":
        raise SystemExit("the candidate's program failed before its functions were defined")
    crossing = types.SimpleNamespace(shared=True, changed=False)
    _test_once(test, calls, answers, crossing)
    if crossing.changed:
        crossing.shared = False
        _test_once(test, calls, answers, crossing)


def _test_once(test, calls, answers, crossing):
    """One run of the test in a namespace of its own, its calls crossing as ``crossing`` says."""
    prelude, test_code, functions, check = test
    namespace = {"__name__": "__test__", "__builtins__": builtins}
    exec(_prelude_code(prelude), namespace)
    for name in functions:
        namespace[name] = _proxy(name, calls, answers, crossing)
    exec(compile(test_code, "test", "exec"), namespace)
    if check is not None:
        namespace["check"](namespace[check])


def _run_program(program, source):
    """The sample as __main__, as under `python program.py`; its namespace."""
    sys.argv = [program]
    code = compile(source, program, "exec")
    module = types.ModuleType("__main__")
    module.__file__, module.__builtins__ = program, builtins
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    except MemoryError:
        os._exit(EXIT_MEMORY)
    return module.__dict__


def main():
    """Run the program ``sys.argv[1]`` under the settings ``sys.argv[2]`` (plain data), confined;
    on its end (or the trusted test's), raise the event that marks the run completed."""
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
        _install_guard(workdir, abi > 0)
        _importable(cfg["packages"])  # what the program may import
        if _receive(calls[0]) is not None:  # the test's side has written its line first
            _serve(_run_program(program, source), calls[0], answers[1])
        os._exit(0)
    if trusted:
        os.close(discard)
        os.close(calls[0])
        os.close(answers[1])
        test = _take_stdin(sys._getframe())
    sys.stderr.write(f"sandbox: landlock={abi} seccomp={int(seccomp)} caps={caps:x}\n")
    sys.stderr.flush()
    if not trusted:  # the test's side runs only the trusted test (which may import packages)
        _install_guard(workdir, abi > 0)
    _importable(cfg["packages"])  # what the test (and program) may import
    if trusted:
        _send(calls[1], "go")
        _run_trusted_test(plain_decode(test), calls[1], answers[0])
    else:
        _run_program(program, source)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.audit("sandbox.completed")


if __name__ == "__main__":
    main()
