"""Dataclass configs from JSON files and command-line flags.

Every script's flags mirror its config dataclass (`--lora-r` for `lora_r`). This module is the one
implementation of that rule, so that every script reads JSON, recipes and flags the same way and
names the file (or the command line) and the key in its errors. It imports nothing of the project.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import difflib
import errno
import inspect
import json
import os
import re
import select
import shutil
import signal
import socket
import stat
import sys
import termios
import threading
import tokenize
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

# Top-level keys of a recipe (configs/*.json): one section per script that reads it.
RECIPE_SECTIONS = ("train", "eval")

# What an Optional field's flag reads as None (any case): ``--eval-examples none``.
NONE_WORDS = ("none", "null")

_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
          dict: "a JSON object"}


def _field_type(hint: Any) -> tuple[Any, bool]:
    """(base type, optional): ``int | None`` -> (int, True); ``list[str]`` -> (list[str], False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return hint, False


def _item_type(base: Any) -> Any:
    return (typing.get_args(base) or (str,))[0]


def _describe(base: Any) -> str:
    if (typing.get_origin(base) or base) is list:
        return "a list of " + {int: "integers", float: "numbers"}.get(_item_type(base), "strings")
    return _NAMES.get(base, getattr(base, "__name__", str(base)))


def _matches(base: Any, value: Any) -> bool:
    origin = typing.get_origin(base) or base
    if origin is list:
        return isinstance(value, list) and all(_matches(_item_type(base), v) for v in value)
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, origin)


def is_number(value: Any, kind: type = float) -> bool:
    """Whether ``value`` is an int (``kind`` int) or a number (float) as a config reads it: JSON's
    true and false are not numbers."""
    return _matches(kind, value)


def type_error(hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit a config field typed ``hint`` ("must be a list of strings, got
    '.kt'"), or None when it fits (an int fits a float field)."""
    base, optional = _field_type(hint)
    if value is None:
        return None if optional else "must not be null"
    return None if _matches(base, value) else f"must be {_describe(base)}, got {value!r}"


def key_hint(key: str, known: Collection[str], kind: str) -> str:
    """What to say of an unknown ``key``: the close match of a typo, else every known key."""
    if close := difflib.get_close_matches(key, list(known), n=1, cutoff=0.75):
        return f"did you mean {close[0]!r}?"
    return f"{kind} keys are: {', '.join(sorted(known))}"


def config_from_dict(cls: type, values: Mapping[str, Any], source: str = "<dict>",
                     choices: Mapping[str, Sequence] | None = None) -> Any:
    """An instance of the dataclass ``cls`` from JSON-like values, type-checked key by key
    (ints are accepted for floats); errors name ``source`` and the key."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in hints or key not in known:
            if "model_type" in values and "model_type" not in known:
                raise ValueError(f"{source}: a model's config.json (model_type "
                                 f"{values['model_type']!r}), not a {cls.__name__} file")
            raise ValueError(f"{source}: unknown key {key!r}; "
                             f"{key_hint(key, known, cls.__name__)}")
    checked = {}
    for key, value in values.items():
        base, _ = _field_type(hints[key])
        if problem := type_error(hints[key], value):
            raise ValueError(f"{source}: key {key!r} {problem}")
        if value is not None:
            if base is float:
                value = float(value)
            allowed = (choices or {}).get(key)
            if allowed is not None and value not in allowed:
                raise ValueError(f"{source}: key {key!r} must be one of {tuple(allowed)}, "
                                 f"got {value!r}")
        checked[key] = value
    return cls(**checked)


def read_json_object(path: str | Path, what: str = "file", strict: bool = False) -> dict:
    """The one JSON object a file holds. Every script reads its JSON files here, so each failure
    names the file (and the line) in one form. ``strict``, for the files users write (configs,
    recipes, search spaces): a key given twice in one object is an error; other tools' files
    (an HF config.json, PEFT's adapter_config.json) load as transformers and PEFT load them,
    the last value winning."""
    path = Path(path)
    try:  # utf-8-sig: a Windows editor's byte-order mark is not JSON, but no reason to refuse
        value = json.loads(path.read_text("utf-8-sig"),
                           object_pairs_hook=_unique_keys if strict else None)
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the {what}: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: "
                         f"{err.msg}") from None
    except _RepeatedKey as err:
        raise ValueError(f"{path}: key {err.args[0]!r} is given twice in one object; keep the "
                         "one you mean") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be one JSON object, not {_json_kind(value)}")
    return value


class _RepeatedKey(Exception):
    """A key given twice in one JSON object (its name in args[0])."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are all different: json keeps the last of a repeated key, so a
    copy-pasted key would silently replace the value above it."""
    value = {}
    for key, item in pairs:
        if key in value:
            raise _RepeatedKey(key)
        value[key] = item
    return value


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def check_recipe_keys(recipe: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a recipe's top-level keys other than its sections and ``_`` notes: a training key
    put beside the sections (not in ``train``) would be silently ignored."""
    unknown = [k for k in recipe if not k.startswith("_") and k not in RECIPE_SECTIONS]
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; a recipe has "
                         f"{', '.join(map(repr, RECIPE_SECTIONS))} and '_'-prefixed notes")


def read_config_file(path: str | Path, section: str) -> tuple[dict, str]:
    """(values, source name) of a JSON config file: the recipe's ``section`` when the file is a
    recipe, else the whole object. ``_``-prefixed keys are documentation and are dropped."""
    path = Path(path)
    values = read_json_object(path, "config file", strict=True)
    source = str(path)
    if section in values:
        check_recipe_keys(values, path)
        values, source = values[section], f"{path} ({section} section)"
        if not isinstance(values, dict):
            raise ValueError(f"{source}: the section must be a JSON object")
    elif any(s in values for s in RECIPE_SECTIONS):
        raise ValueError(f"{path}: a recipe without a {section!r} section")
    return {k: v for k, v in values.items() if not k.startswith("_")}, source


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not a JSON object: {err.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def _is_none(text: str) -> bool:
    return text.strip().lower() in NONE_WORDS


def _or_none(convert: Any) -> Any:
    """A flag type for an Optional field: a word of ``NONE_WORDS`` gives None, any other text
    ``convert(text)``; else a field documented as "None: the whole split" could not be set back to
    None from the command line."""

    def parse(text: str) -> Any:
        return None if _is_none(text) else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse: "invalid int value: 'x'"
    return parse


def _list_flag(item: type, optional: bool = False) -> type[argparse.Action]:
    """An action for a list field: ``--flag a b`` and ``--flag a,b`` both give ``[a, b]``; for an
    Optional field, a lone ``none`` gives None."""

    class ListFlag(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parts = [x for v in values for x in v.split(",") if x]
            if optional and len(parts) == 1 and _is_none(parts[0]):
                setattr(namespace, self.dest, None)
                return
            try:
                setattr(namespace, self.dest, [item(x) for x in parts])
            except ValueError:
                parser.error(f"{option_string}: expected {_describe(list[item])}, got {values}")

    return ListFlag


def field_docs(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """(help, section) of the fields of the dataclass ``cls``, read from its source. A field's
    help is its trailing comment, continued on the comment lines right below it that start with
    "#   "; any other comment line in the class body titles the fields below it. So the comments
    a config is documented with are what ``--help`` shows, written once. A field without a
    comment may carry its help as ``field(metadata={"help": ...})`` (scraping's configs)."""
    helps, sections = _comment_docs(cls)
    for f in dataclasses.fields(cls):
        if not helps.get(f.name) and f.metadata.get("help"):
            helps[f.name] = f.metadata["help"]
    return helps, sections


def _comment_docs(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """``field_docs`` from the comments of the class body alone."""
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (a frozen or interactive class): bare flags
        return {}, {}
    comments = {tok.start[0]: tok.string[1:] for tok in tokenize.generate_tokens(iter(lines).__next__)
                if tok.type == tokenize.COMMENT}
    names = {f.name for f in dataclasses.fields(cls)}
    helps: dict[str, str] = {}
    sections: dict[str, str] = {}
    section = current = None
    for number, line in enumerate(lines, 1):
        text, stripped = comments.get(number), line.strip()
        declared = re.match(r"\s+(\w+)\s*:", line)
        if declared and declared.group(1) in names:
            current = declared.group(1)
            helps[current] = (text or "").strip()
            if section:
                sections[current] = section
        elif stripped.startswith("#") and text is not None:
            if current is not None and text.startswith("   "):
                helps[current] = f"{helps[current]} {text.strip()}".strip()
            else:
                section, current = text.strip(), None
        elif stripped.startswith(("def ", "@")) and line[0].isspace():
            break  # the methods: no fields below
        elif stripped:
            current = None
    return helps, sections


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default, or ``dataclasses.MISSING`` for one the user must give."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _help_text(doc: str, default: Any, optional: bool) -> str:
    """``doc`` plus the default (unless it states one, or there is none) and "'none' for None"
    for an Optional flag; '%' escaped, as argparse formats help with %."""
    notes = []
    if default is not dataclasses.MISSING and "default:" not in doc:
        notes.append(f"default: {default!r}")
    if optional:
        notes.append("'none' for None")
    note = "; ".join(notes)
    text = f"{doc} ({note})" if doc and note else doc or note
    return text.replace("%", "%%")


def _flag_kwargs(f: dataclasses.Field, base: Any, optional: bool,
                 allowed: Sequence | None) -> dict[str, Any]:
    """How argparse reads a field's flag, by the field's type."""
    origin = typing.get_origin(base) or base
    if origin is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list and f.metadata.get("repeat"):  # JSON values hold commas: no splitting
        return {"action": "append", "type": _item_type(base)}
    if origin is list:
        return {"nargs": "+", "action": _list_flag(_item_type(base), optional), "metavar": "ITEM"}
    if origin is dict:
        return {"type": _or_none(_json_object) if optional else _json_object, "metavar": "JSON"}
    if optional and allowed is not None:
        return {"type": _or_none(origin), "choices": (*allowed, None),
                "metavar": "{" + ",".join(map(str, (*allowed, "none"))) + "}"}
    if optional:
        return {"type": _or_none(origin)}
    return {"type": origin, "choices": allowed}


def flag_of(key: str) -> str:
    """The flag of a config dataclass's field ``key`` (``--warmup-steps`` for warmup_steps): how
    a script's user sets it."""
    return "--" + key.replace("_", "-")


def setting(cfg, key: str, where_set: Callable[[str], str] = flag_of) -> str:
    """Config field ``key`` of ``cfg`` as an error names it: its value and where the user set
    it (``where_set``: a flag, the --config file, a recipe's section, a sweep's range):
    "warmup_steps (200, --config run.json)"."""
    return f"{key} ({getattr(cfg, key)!r}, {where_set(key)})"


def off_switch(key: str, where_set: Callable[[str], str] = flag_of) -> str:
    """How the user turns boolean config field ``key`` off, for advice: ``--no-KEY`` where
    ``where_set`` names its flag (``--KEY`` typed or left at its default: typing that keeps it
    on), else "KEY false" where they set it (the --config file, a recipe's section)."""
    where = where_set(key)
    return f"--no-{flag_of(key)[2:]}" if where == flag_of(key) else f"{key} false ({where})"


def where_set_by(typed: Collection[str], config: str | Path | None = None,
                 in_file: Collection[str] = (), rest: str | None = None
                 ) -> Callable[[str], str]:
    """Where a script's user set a config field ``key``, for its errors (``flag_of`` is the
    default of those who take one): its flag when typed (``typed``), the ``--config`` file
    when that sets it (``in_file``), else ``rest`` (where the other values come from, such
    as a resumed run's config.json), else its flag (the field is at its default)."""
    def where(key: str) -> str:
        if key in typed:
            return flag_of(key)
        if key in in_file:
            return f"--config {config}"
        return rest or flag_of(key)

    return where


def where_set_in(args: Mapping[str, Any], section: str) -> Callable[[str], str]:
    """``where_set_by`` of a script's parsed command line (``args``: its flags as typed, and
    ``config``, the --config file, whose ``section`` is read)."""
    typed = {k: v for k, v in args.items() if k != "config"}
    config = args.get("config")
    in_file = read_config_file(config, section)[0] if config is not None else {}
    return where_set_by(typed, config, in_file)


def add_config_flags(parser: argparse.ArgumentParser, cls: type,
                     choices: Mapping[str, Sequence] | None = None,
                     positional: Collection[str] = ()) -> argparse.ArgumentParser:
    """One flag per dataclass field, described by its comment and grouped under its section
    (``field_docs``); give the parser ``argument_default=argparse.SUPPRESS`` so that only the
    flags a user typed override the config file. An Optional field's flag reads ``none`` (or
    ``null``, any case) as None, and its help says so; a plain ``str`` field keeps "none" as text.
    A field without a default is a required flag, or, named in ``positional``, a required
    operand (a list one takes its values as given: file names may hold commas). A list field
    with ``metadata={"repeat": True}`` is given once per item (``--set a=1 --set b=2``), and
    ``metadata["metavar"]`` / ``metadata["choices"]`` name a flag's value / allowed values.
    ``metadata={"none_is_a_value": True}``: the flag reads ``none`` as text, a value of the field's
    own (``scraping github --licenses none``: repos without a licence, not "any licence")."""
    hints = typing.get_type_hints(cls)
    helps, sections = field_docs(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        base, optional = _field_type(hints[f.name])
        optional = optional and not f.metadata.get("none_is_a_value")
        default = _field_default(f)
        help_text = _help_text(helps.get(f.name, ""), default, optional and base is not bool)
        title = sections.get(f.name)
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title] if title else parser
        if f.name in positional:
            kwargs = ({"nargs": "+", "type": _item_type(base)} if typing.get_origin(base) is list
                      else {"type": base})
            target.add_argument(f.name, help=help_text, **kwargs)
            continue
        allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
        kwargs = _flag_kwargs(f, base, optional, allowed)
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        target.add_argument(flag_of(f.name), help=help_text,
                            required=default is dataclasses.MISSING, **kwargs)
    return parser


def resolve_config(cls: type, args: Mapping[str, Any], section: str,
                   base: Mapping[str, Any] | None = None,
                   choices: Mapping[str, Sequence] | None = None) -> Any:
    """Defaults < ``base`` < the ``--config`` file (``args["config"]``) < the typed flags."""
    values = dict(base or {})
    flags = dict(args)
    if flags.get("config") is not None:
        file_values, source = read_config_file(flags.pop("config"), section)
        config_from_dict(cls, file_values, source, choices)  # errors name the file
        values.update(file_values)
    flags.pop("config", None)
    values.update(flags)
    return config_from_dict(cls, values, "command line", choices)


# --------------------------------------------------------------------------------------------
# Stopping: Ctrl-C, SIGTERM and SIGHUP end every script the same way
# --------------------------------------------------------------------------------------------

# The signals that stop a script, each with the shell's exit code 128 + its number: Ctrl-C's
# SIGINT (130); SIGTERM (143), ``kill``'s and a scheduler's; SIGHUP (129), the hangup of the
# terminal the script runs in (a dropped SSH session, a closed terminal window).
# The one home of that set: every handler below, the trainer's step loop and a sweep's take it
# from here. (nohup, tmux or screen keep a run going past a hangup: nohup's ignored SIGHUP
# stays ignored, as every ignored signal does.)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REQUESTED_STOPS = (signal.SIGTERM, signal.SIGHUP)  # not Ctrl-C's: interrupt_on_sigterm's


def _is_terminal(fd: int) -> bool:
    """Whether ``fd`` is a terminal, or was one that hung up: ``os.isatty`` says False for
    that, since the kernel answers EIO for a hung-up terminal (and ENOTTY for no terminal)."""
    try:
        termios.tcgetattr(fd)
    except termios.error as err:
        return err.args[0] == errno.EIO
    except (OSError, ValueError):  # a closed descriptor
        return False
    return True


# How long a hangup waits for the reader of a pipe on stdout/stderr to go (``_reader_gone``).
HANGUP_PIPE_WAIT_S = 0.1


def _reader_gone(fd: int, wait_s: float = HANGUP_PIPE_WAIT_S) -> bool:
    """Whether ``fd`` is a pipe whose reader has gone, or goes within ``wait_s``: ``cmd 2>&1 |
    tee log``'s tee, which the same hangup ends (the whole job gets it), maybe a moment after
    this process. Every later write to such a pipe fails (EPIPE). A live reader's (a
    supervisor's) costs the wait and keeps the output."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
    except OSError:
        return False
    poller = select.poll()
    poller.register(fd, 0)  # no event asked for: POLLERR alone, once no reader is left
    return any(event & select.POLLERR for _, event in poller.poll(wait_s * 1000))


def leave_terminal_on_hangup(signum: int) -> None:
    """On a hangup (``signum`` SIGHUP; any other signal: nothing) stdout and stderr, where they
    are a terminal, or a pipe whose reader the hangup ended (``_reader_gone``: ``| tee log``),
    are pointed at /dev/null before the stop's work: a write to a hung-up terminal fails (EIO),
    one to a pipe without a reader too (EPIPE), so the next progress bar or message would end
    the process before its checkpoint or cleanup. What the stop says then goes nowhere; its
    work is done whole."""
    if signum != signal.SIGHUP:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # replaced (pytest's capture) or closed
            continue
        if _is_terminal(fd) or _reader_gone(fd):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Within: SIGTERM (``kill``, a scheduler's stop) or SIGHUP (a hangup) raises
    ``KeyboardInterrupt("SIGTERM")`` / ``KeyboardInterrupt("SIGHUP")`` as Ctrl-C raises
    KeyboardInterrupt, so ``finally`` blocks run (partial files removed, sandboxed children
    killed, finished work saved) instead of the process dying on the spot. A SIGHUP first
    leaves the terminal (``leave_terminal_on_hangup``). A SIGHUP the parent set to be ignored
    (nohup's) stays ignored; SIGTERM is taken whatever its disposition was, as it always was
    here (the other handlers keep any ignored signal ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:  # a forked pool worker (its pool ends it with SIGTERM): die
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        leave_terminal_on_hangup(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handle) for sig in REQUESTED_STOPS
                if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Within: a Ctrl-C, SIGTERM or SIGHUP waits and lands on leaving, as the handlers in place
    before would have taken it, so that what it would interrupt is done whole or not begun. Deferred
    by a handler: Python runs handlers in the main thread whichever thread the OS gave the signal to
    (one of torch's, often), where a signal mask blocks it for the calling thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def defer(signum, frame):
        leave_terminal_on_hangup(signum)  # now: what it would interrupt may write
        caught.append(signum)

    previous = {sig: signal.signal(sig, defer) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])


_START_UP_REPLACED: dict[int, Callable | int | None] = {}  # what quiet_start_up_stops replaced


def quiet_start_up_stops(quiet: bool = False) -> None:
    """A script's first statement, before its imports (torch loads for seconds): Ctrl-C, SIGTERM or
    SIGHUP there ends it as later (130 / 143 / 129, one line; ``quiet``: none, for a process whose
    parent reports it), not with a traceback from inside an import. A signal the parent set to be
    ignored (``cmd &`` in a script, nohup's SIGHUP) stays ignored. ``run_main`` puts the handlers
    back."""
    handler = partial(_stopped_while_starting, quiet)
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            _START_UP_REPLACED[sig] = signal.signal(sig, handler)


def _stopped_while_starting(quiet: bool, signum: int, frame) -> None:
    """Ends the process on the spot (``os._exit``): a SystemExit raised into the import under
    way was swallowed by an extension's init (torch's of numpy clears any error: the script ran
    on after its line) or aborted it from C++ (pybind11's terminate). Nothing is written yet."""
    leave_terminal_on_hangup(signum)
    if not quiet:
        with contextlib.suppress(OSError, ValueError):  # a closed stderr: the exit still comes
            sys.stderr.write("interrupted while starting: nothing was written\n")
            sys.stderr.flush()
    os._exit(interrupted_exit_code(signal.Signals(signum).name))


def run_main(main: Callable[[], int | None]) -> int | None:
    """Run a script's ``main`` once its imports are done (see ``quiet_start_up_stops``)."""
    while _START_UP_REPLACED:
        signal.signal(*_START_UP_REPLACED.popitem())
    try:
        return main()
    except BrokenPipeError:  # `script | head` stopped reading: no traceback, no second one
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # at exit's flush
        return 1
    finally:  # the first exit handler to run: they run in the reverse order of registration
        atexit.register(_stops_end_at_once)


def _stops_end_at_once() -> None:
    """The script is on its way out (its stop told, or its work done): a further Ctrl-C, SIGTERM or
    SIGHUP ends it at once, as the signal's default does, not with an "Exception ignored in atexit
    callback" traceback from inside torch's exit handlers (Ctrl-C pressed twice). An ignored signal
    stays ignored."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


def run_tool(work: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """The main of a library module's small command (tokenizer.py, pretrained.py, ...):
    ``work``'s exit code (None: 0), or one line and 2 for a user's mistake (a ValueError, an
    OSError naming its path), or ``interrupted`` and 130 / 143 / 129 for Ctrl-C, SIGTERM or
    SIGHUP."""
    try:
        with interrupt_on_sigterm():
            return work() or 0
    except KeyboardInterrupt as stop:
        print(interrupted, file=sys.stderr)
        return interrupted_exit_code(stop)
    except BrokenPipeError:  # the reader of stdout went away: run_main's to end quietly
        raise
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def stop_signal(stop: KeyboardInterrupt) -> signal.Signals:
    """The signal behind a KeyboardInterrupt: SIGTERM or SIGHUP under ``interrupt_on_sigterm``
    (or a name passed on in its args), else Ctrl-C's SIGINT."""
    names = [sig.name for sig in STOP_SIGNALS]
    named = stop.args[0] if stop.args and stop.args[0] in names else "SIGINT"
    return signal.Signals[named]


def interrupted_exit_code(stop: str | KeyboardInterrupt) -> int:
    """The shell's code for a script stopped by SIGINT (130), SIGTERM (143) or SIGHUP (129),
    given the signal's name or the KeyboardInterrupt it raised: non-zero, so ``train && eval``
    does not go on."""
    sig = stop_signal(stop) if isinstance(stop, KeyboardInterrupt) else signal.Signals[stop]
    return 128 + sig.value


# --------------------------------------------------------------------------------------------
# Output files and file-system errors
# --------------------------------------------------------------------------------------------

# Temp files and directories are named after the process that made them (``owner_tag``), so that
# a later process removes what dead ones left behind (``remove_dead_owners``: SIGKILL, a crash or a
# power loss runs no cleanup) and never what a live one is still writing. A PID names a process
# only on its machine and in its PID namespace (containers sharing /tmp or a disk, even with one
# host name), so a tag says all three, and only tags of this machine and namespace are judged.
OWNER_PATTERN = r"(?P<pid>\d+)@(?P<host>[^@]*)@(?P<pidns>\d*)@"


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS): PIDs are machine-wide
        return ""


def owner_tag() -> str:
    """``PID@HOST@PIDNS@`` of this process, for the names of the temp directories it makes."""
    return f"{os.getpid()}@{socket.gethostname()}@{_pid_namespace()}@"


def owner_is_dead(match: re.Match) -> bool:
    """Whether the process an ``OWNER_PATTERN`` match names has ended; False when it cannot be
    told (another machine or PID namespace, or another user's live process)."""
    if match["host"] != socket.gethostname() or match["pidns"] != _pid_namespace():
        return False
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_dead_owners(directory: str | Path, before: str,
                       remove_dir: Callable[[Path], None] | None = None) -> None:
    """Remove the entries of ``directory`` (files or directories) named ``<before><owner tag>...``,
    ``before`` a regex for the start of the name, whose owner has died: what a killed process left
    of a write, which nothing else would ever remove. A live owner's entry is never touched.
    ``remove_dir`` replaces rmtree where the directories need more (read-only contents)."""
    owned = re.compile(before + OWNER_PATTERN)
    try:
        entries = list(Path(directory).iterdir())
    except OSError:  # no such directory yet, or unreadable: nothing of ours to remove
        return
    for entry in entries:
        match = owned.match(entry.name)
        if not (match and owner_is_dead(match)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            (remove_dir or partial(shutil.rmtree, ignore_errors=True))(entry)
        else:
            with contextlib.suppress(OSError):  # another process removed it first
                entry.unlink()


# A write in progress lies beside its target NAME, named after the target and its owner, so that
# the next writer there knows what is whose: ``.NAME.tmp-<owner tag>`` is the new file or directory
# being written, ``.NAME.old-<owner tag>`` the directory it replaces, between its two renames. A
# directory's names end in a random suffix too (two threads may write the same target).
PARTIAL_WRITE = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-" + OWNER_PATTERN)


def partial_path(target: Path, kind: str, suffix: str = "") -> Path:
    """Where this process writes ``target`` (``kind`` "tmp") or keeps what it replaces ("old")."""
    return target.with_name(f".{target.name}.{kind}-{owner_tag()}{suffix}")


def recover_partial_writes(directory: str | Path, every_owner_gone: bool = False) -> None:
    """Settle what writers killed mid-write left in ``directory`` (SIGKILL and power loss run no
    cleanup): their temporary files and directories are removed, and a directory they had moved
    aside to replace is put back when its replacement never landed, else removed. Only dead
    owners' are touched, or every one's with ``every_owner_gone`` (under a lock that all writers
    hold, which also covers owners on other machines, whose death cannot be told)."""
    try:
        entries = list(Path(directory).iterdir())
    except OSError:  # no such directory yet: nothing to settle
        return
    for entry in entries:
        match = PARTIAL_WRITE.match(entry.name)
        if not match or not (every_owner_gone or owner_is_dead(match)):
            continue
        if match["kind"] == "old" and _put_back(entry, entry.with_name(match["name"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # another process removed it first
                entry.unlink()


def _put_back(old: Path, target: Path) -> bool:
    """Rename ``old`` back to ``target`` unless ``target`` is there (its replacement landed)."""
    if target.exists() or target.is_symlink():
        return False
    try:
        os.rename(old, target)
    except OSError:  # another writer published target meanwhile
        return False
    return True


def write_dir_atomically(target: str | Path, build: Callable[[Path], object],
                         replace: bool = True) -> bool:
    """``build`` fills a temporary directory beside ``target``, which is fsynced and renamed to
    ``target``: readers, and a kill or power loss at any point, see the previous directory or the
    new one, never half of one. A failed or interrupted ``build`` removes its copy; what killed
    writers left here is settled first (``recover_partial_writes``).

    ``replace``: an existing ``target`` is replaced (put back if the rename fails). Without it,
    the first complete publisher wins, as a cache entry wants: when ``target`` exists (another
    process built the same entry meanwhile) this copy is discarded and False returned; True means
    this call published ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_partial_writes(target.parent)
    suffix = os.urandom(4).hex()
    tmp = partial_path(target, "tmp", suffix)
    tmp.mkdir()
    try:
        build(tmp)
        _fsync_tree(tmp)
        return _publish(tmp, target, partial_path(target, "old", suffix) if replace else None)
    finally:  # gone once published; else a failed, interrupted or losing write's copy
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, target: Path, old: Path | None) -> bool:
    """Rename ``tmp`` to ``target``, moving an existing ``target`` to ``old`` first (None: keep an
    existing ``target`` and return False)."""
    if old is not None and (target.exists() or target.is_symlink()):
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if not _put_back(old, target):
                _discard(old)
            raise
        _fsync(target.parent)
        _discard(old)
        return True
    try:
        os.rename(tmp, target)
    except OSError as err:
        if old is None and err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            return False  # another process published target first: its entry stays
        raise
    _fsync(target.parent)
    return True


def is_disk_full(err: BaseException) -> bool:
    """Whether a failed write ran out of room (the disk, or the user's quota)."""
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def _discard(old: Path) -> None:
    """Remove a replaced target: a directory, or a link (which rmtree refuses, unseen)."""
    if old.is_symlink():
        with contextlib.suppress(OSError):
            old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``, so that the rename publishes data that is
    on disk (without it, a power loss can leave the new name over empty files)."""
    for parent, _, files in os.walk(root, topdown=False):
        for name in files:
            if not os.path.islink(Path(parent, name)):
                _fsync(Path(parent, name))
        _fsync(Path(parent))


def _fsync(path: Path) -> None:
    if os.name == "nt" and path.is_dir():  # Windows opens no directory (nor needs it synced)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What write_atomic writes: text (as UTF-8), bytes, or a function writing into the open binary
# file (a stream too large to hold in memory, such as model weights).
FileContent = str | bytes | Callable[[BinaryIO], object]


def write_atomic(path: str | Path, data: FileContent) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a kill
    or a full disk leaves the previous file whole, never half of one, and the temporary files of
    writers killed earlier are removed here. The OSError of a failed write names ``path`` (one
    from write() itself carries no file name)."""
    write_atomic_files({path: data})


def write_atomic_files(files: Mapping[str | Path, FileContent]) -> None:
    """``write_atomic`` for files that belong together (weights and their config): every one is
    written and fsynced to its temporary file before the first rename, and the renames go in
    the mapping's order, so a failed write leaves all the previous files as they were."""
    temps: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            temps.append((Path(path), _write_temp(Path(path), data)))
        with stops_deferred():  # a Ctrl-C between two renames would leave a mixed set
            for path, tmp in temps:
                with _naming(path, tmp):
                    os.replace(tmp, path)
    except BaseException:
        for _, tmp in temps:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


def _write_temp(path: Path, data: FileContent) -> Path:
    """``data`` written and fsynced to ``path``'s owner-tagged temporary file, which is gone
    again if the write fails."""
    remove_dead_owners(path.parent, re.escape(f".{path.name}.tmp-"))
    tmp = partial_path(path, "tmp")
    try:
        with _naming(path, tmp), open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return tmp


@contextlib.contextmanager
def _naming(path: Path, tmp: Path) -> Iterator[None]:
    """Re-raise an OSError about the temporary file (or about no file) as one about ``path``,
    the file the user asked for."""
    try:
        yield
    except OSError as err:
        if err.filename in (None, str(tmp)):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise


def os_error_message(e: OSError) -> str:
    """A file-system failure as one line naming the path (no traceback)."""
    paths = " -> ".join(str(p) for p in (e.filename, e.filename2) if p is not None)
    return f"{paths}: {e.strerror}" if paths and e.strerror else str(e)
