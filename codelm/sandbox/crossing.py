"""What crosses between a sandboxed program and its trusted test: plain data
(``plain_encode`` / ``plain_decode``, also the bootstrap's settings), and the calls of the
program's functions the test makes through stand-ins (``serve`` on the program's side,
``run_trusted_test`` on the test's).

The bootstrap (``codelm.sandbox.bootstrap``) loads this file from beside itself in a run's
control directory, isolated as it is: the standard library alone (and numpy, by name, where
an array crosses).
"""

import array
import builtins
import collections.abc
import decimal
import fractions
import importlib
import os
import sys
import types

# ---- Plain data: the one form a trusted test's values cross in, and the bootstrap's settings ----


def plain_encode(value: object) -> str:
    """``value`` in a fixed text form that ``plain_decode`` reads: None, bool, int, float,
    complex, str, bytes, Fraction, Decimal, a range, an array.array (as one, its typecode kept),
    a numpy scalar or array of numbers or bools (as one, its dtype and shape kept; another numpy
    scalar as its item()), and lists, tuples, sets,
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
    elif isinstance(value, array.array):  # equal to arrays alone: it crosses as one
        out.append("W")
        _plain_parts((value.typecode, value.tolist()), out, read)
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
    elif _is_numpy_scalar(value) and value.dtype.kind in _ARRAY_KINDS:  # as itself: np.bool_
        out.append("Z")  # is no `True` (`is True` fails as in the harness), np.int64(6) == 6
        _plain_parts((value.dtype.str, _numpy_item(value)), out, read)
    elif _is_numpy_scalar(value):  # another kind (np.str_): as its item()
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
    one of numbers or bools crosses as itself, another as its ``item()``, which must be plain
    data in turn."""
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
    if tag == "W":  # an array.array: its typecode and items
        parts, end = _plain_value(text, at + 1)
        if not (type(parts) is tuple and len(parts) == 2 and parts[0] in array.typecodes
                and type(parts[1]) is list):
            raise ValueError("not plain data: a malformed array.array")
        return array.array(*parts), end
    if tag == "Z":  # a numpy scalar: the one item of an array of its dtype
        parts, end = _plain_value(text, at + 1)
        if not (type(parts) is tuple and len(parts) == 2):
            raise ValueError("not plain data: a malformed numpy scalar")
        return _numpy_array((parts[0], (1,), [parts[1]]))[0], end
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


# A trusted test's two processes speak in messages: a 4-byte length, then plain data in the
# fixed form of plain_encode.
_MAX_MESSAGE = 1 << 26


def send(fd, message):
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


def receive(fd):
    """The next message, or None at the end of the stream."""
    header = _read_exactly(fd, 4)
    size = int.from_bytes(header, "big") if header else 0
    if header is None or size > _MAX_MESSAGE:
        return None
    data = _read_exactly(fd, size)
    return None if data is None else plain_decode(data.decode("utf-8", "surrogatepass"))


def serve(namespace, calls, answers):
    """The candidate's side: its callables answer the test's calls, plain data both ways: a
    call (name, args, kwargs), an answer ("value", value, after, same) or ("raised",
    exception, message, after). ``after``: the arguments as the call left them, where it
    changed them in place (else None); ``same``: the position of the argument the value is
    (``return xs``), else None: as in the harness's one interpreter, the test sees both."""
    send(answers, "defined")
    while (call := receive(calls)) is not None:
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
        send(calls, (name, args, kwargs))
        answer = receive(answers)
        if answer is None:
            raise RuntimeError(f"the candidate's process ended, or answered past the size "
                               f"limit, during {name}()")
        if type(answer) is not tuple or len(answer) != 4 or answer[0] not in ("value", "raised"):
            raise RuntimeError(f"{name}(): the candidate's answer is malformed")
        returned = answer[0] == "value"
        if returned:
            _, value, after, same = answer
        else:
            _, raised_kinds, message, after = answer
            same = None
        # one object reached twice (an argument given twice, a list holding itself) has no
        # one value to write back: that call crosses as values alone
        shared = (crossing.shared and (after is not None or type(same) is int)
                  and not _aliased([*args, *kwargs.values()]))
        if after is not None:
            crossing.changed = True
            if shared:
                _write_back(args, kwargs, after)
        if returned:
            if (shared and type(same) is int and 0 <= same < len(args)
                    and not isinstance(args[same], collections.abc.Iterator)):  # read to cross
                return args[same]
            return value
        if type(raised_kinds) is not list:
            raise RuntimeError(f"{name}(): the candidate's answer is malformed")
        error = _rebuilt_error([str(kind) for kind in raised_kinds], str(message))
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


def run_trusted_test(test, calls, answers):
    """The test's side: the prompt's own definitions, then stand-ins for the functions under
    test (over any prompt stub or builtin of the same name, as the candidate's definitions are
    in the harness's one namespace), then the test; its assertions compare values built here.
    It runs as in the harness's one interpreter (a call's changes to its arguments seen);
    where a call changed them, it runs again with its arguments and results as values alone,
    and must pass that way too: an answer that holds only by changing what the test compares
    it with (emptying the list a test sorts for its expected value) is no pass."""
    if receive(answers) != "defined":
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
