"""Config dataclasses from JSON/YAML files and command-line flags (``--lora-r`` for ``lora_r``),
read alike by every script; every error names the file (or the command line) and the key."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
import sys
import tokenize
import types
import typing
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

# Top-level keys of a recipe (configs/*.json): one section per script that reads it
# (trainingmanager.py, eval.py, hyperparam_tune.py).
RECIPE_SECTIONS = ("train", "eval", "tune")

# What an Optional field's flag reads as None (any case): ``--eval-examples none``.
NONE_WORDS = ("none", "null")

def _field_type(hint: Any) -> tuple[Any, bool]:
    """(base type, optional): ``int | None`` -> (int, True); ``list[str]`` -> (list[str], False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return hint, False


def cache_root() -> Path:
    """Where codelm keeps what it can make again: ``CODELM_CACHE``, else ~/.cache/codelm (an
    empty ``CODELM_CACHE``, as in ``CODELM_CACHE= cmd``, is unset, not the current directory)."""
    return Path(os.environ.get("CODELM_CACHE") or "~/.cache/codelm").expanduser()


def home_expanded(path: Any) -> Any:
    """A directory setting's ``path`` with a leading ``~`` made the home directory, as a shell
    makes it of a word it expands (a config file's value, ``--out-dir=~/runs``: none does);
    anything but a string as it is."""
    return os.path.expanduser(path) if isinstance(path, str) else path


def bundled(*parts: str) -> Path:
    """A file shipped with codelm (data/, configs/): at the root of a checkout or an editable
    install, else under ``<prefix>/share/codelm`` (where ``pip install .`` puts it)."""
    here = Path(__file__).resolve().parents[2].joinpath(*parts)  # codelm/runtime/ -> the checkout
    return here if here.exists() else Path(sys.prefix, "share", "codelm", *parts)


def _item_type(base: Any) -> Any:
    return (typing.get_args(base) or (str,))[0]


def _is_sequence(base: Any) -> bool:
    """Whether a field of type ``base`` holds items: a list, or a tuple of one item type."""
    origin = typing.get_origin(base) or base
    return origin is list or origin is tuple and typing.get_args(base)[1:] == (Ellipsis,)


def _describe(base: Any) -> str:
    if _is_sequence(base):
        return "a list of " + {int: "integers", float: "numbers"}.get(_item_type(base), "strings")
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             dict: "a JSON object"}
    return names.get(base, getattr(base, "__name__", str(base)))


def _matches(base: Any, value: Any) -> bool:
    origin = typing.get_origin(base) or base
    if _is_sequence(base):
        return isinstance(value, (list, tuple)) and all(_matches(_item_type(base), v)
                                                        for v in value)
    if origin is bool:
        return isinstance(value, bool)
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, origin)


def is_number(value: Any, kind: type = float) -> bool:
    """Whether ``value`` is an int (``kind`` int) or a number (float); JSON's true/false is not."""
    return _matches(kind, value)


def type_error(hint: Any, value: Any) -> str | None:
    """Why ``value`` does not fit a field typed ``hint`` ("must be a list of strings, got '.kt'"),
    or None when it fits (an int fits a float field)."""
    base, optional = _field_type(hint)
    if value is None:
        return None if optional else "must not be null"
    return None if _matches(base, value) else f"must be {_describe(base)}, got {value!r}"


def _spelling(name: str) -> str:
    """A key or flag as compared for a hint: ``--Learning-Rate`` and ``learning_rate`` alike."""
    return name.strip().lstrip("-").replace("-", "_").lower()


def closest_key(key: str, known: Collection[str],
                aliases: Mapping[str, Sequence[str]] | None = None) -> str | None:
    """The known key an unknown ``key`` stands for: the same key spelt as a flag (dashes, case),
    another spelling of it (``aliases``: key -> its other flags, as ``add_config_flags`` takes
    them: ``learning_rate`` for lr), or the close match of a typo; None if none is close."""
    names = {_spelling(name): k for k, spellings in (aliases or {}).items() if k in known
             for name in spellings}
    names.update({_spelling(k): k for k in known})  # a key's own spelling wins
    spelled = _spelling(key)
    if spelled in names:
        return names[spelled]
    close = difflib.get_close_matches(spelled, list(names), n=1, cutoff=0.75)
    return names[close[0]] if close else None


def key_hint(key: str, known: Collection[str], kind: str,
             aliases: Mapping[str, Sequence[str]] | None = None) -> str:
    """What to say of an unknown ``key``: the key it stands for (``closest_key``), else every
    known key."""
    if (close := closest_key(key, known, aliases)) is not None:
        return f"did you mean {close!r}?"
    return f"{kind} keys are: {', '.join(sorted(known))}"


def config_from_dict(cls: type, values: Mapping[str, Any], source: str = "<dict>",
                     choices: Mapping[str, Sequence] | None = None,
                     aliases: Mapping[str, Sequence[str]] | None = None) -> Any:
    """An instance of the dataclass ``cls`` from JSON-like values, type-checked key by key (a
    list of strings may be given as its one string); an unknown key is refused with the key it
    stands for (``key_hint``: ``aliases`` are the other spellings of the script's flags)."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    if "model_type" in values and "model_type" not in known:
        raise ValueError(f"{source}: a model's config.json (model_type "
                         f"{values['model_type']!r}), not a {cls.__name__} file")
    checked = dict(values)
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"{source}: unknown key {key!r}; "
                             f"{key_hint(key, known, cls.__name__, aliases)}")
        base, _ = _field_type(hints[key])
        if isinstance(value, str) and base == list[str]:
            value = checked[key] = [value]  # one item written alone, as its flag takes one
        if problem := type_error(hints[key], value):
            raise ValueError(f"{source}: key {key!r} {problem}")
        allowed = (choices or {}).get(key)
        if value is not None and allowed is not None and value not in allowed:
            raise ValueError(f"{source}: key {key!r} must be one of {tuple(allowed)}, "
                             f"got {value!r}")
        if value is not None and base is float:
            checked[key] = float(value)
        if value is not None and (typing.get_origin(base) or base) is tuple:
            checked[key] = tuple(value)  # a JSON list or a flag's items
    return cls(**checked)


def option_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-like values for the dataclass ``cls`` (a config's ``data_options``, a recipe's
    section) as ``config_from_dict`` takes them: a list-of-strings key's one string made that
    list; the other keys as given."""
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and key in hints and _field_type(hints[key])[0] == list[str]:
            out[key] = [value]
    return out


def fields_of(kind: type, config: Any, **given: Any) -> dict[str, Any]:
    """The values of dataclass ``kind``'s fields: ``given``'s, the others ``config``'s of the
    same names, where it has them, else their defaults (``Kind(**fields_of(Kind, cfg))``: the
    part of a config one reader takes)."""
    names = {f.name for f in dataclasses.fields(kind)}
    if unknown := set(given) - names:
        raise TypeError(f"{kind.__name__} has no field {sorted(unknown)[0]!r}")
    values = {}
    for f in dataclasses.fields(kind):
        if f.name in given:
            values[f.name] = given[f.name]
        elif hasattr(config, f.name) or f.default is dataclasses.MISSING:
            values[f.name] = getattr(config, f.name)
    return values


def read_json_object(path: str | Path, what: str = "file", strict: bool = False) -> dict:
    """The one JSON object a file holds (YAML for .yaml/.yml); failures name the file and line.
    ``strict`` (files users write): a key given twice is an error; other tools' files (HF
    config.json) load as their tools load them, the last of a repeated key winning."""
    value = read_json(path, what, strict)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: the {what} must be one JSON object, not {_json_kind(value)}")
    return value


def _json_kind(value: object) -> str:
    """A JSON value's kind in words: "an array", "a string", ..."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true/false",
             type(None): "null"}
    return kinds.get(type(value), "a number")


def read_json(path: str | Path, what: str = "file", strict: bool = False) -> object:
    """The JSON value a file holds (YAML for .yaml/.yml), as ``read_json_object`` reads it."""
    path = Path(path)
    try:
        with reading(path, what):  # utf-8-sig: an editor's byte-order mark is no reason to refuse
            text = path.read_text("utf-8-sig")
            value = (_yaml_object(text, path) if path.suffix in (".yaml", ".yml") else
                     json.loads(text, object_pairs_hook=_unique_keys if strict else None))
    except _RepeatedKey as err:
        raise ValueError(f"{path}: key {err.args[0]!r} is given twice in one object; keep the "
                         "one you mean") from None
    return value


@dataclasses.dataclass
class ReadPlace:
    """How far a reader of a user's file got: ``count`` whole lines (or rows) read."""

    unit: str = "line"
    count: int = 0


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading, decompressing or decoding a damaged file raises (pyarrow's once imported:
    no pyarrow error comes before)."""
    import lzma
    import zlib

    arrow = sys.modules.get("pyarrow")
    return (OSError, EOFError, zlib.error, lzma.LZMAError, UnicodeDecodeError,
            *((arrow.ArrowException,) if arrow is not None else ()))


def _read_failure(err: BaseException) -> str:
    """Why a file did not read, in one line, with the fix its cause calls for."""
    detail = " ".join(str(err).split())  # pyarrow's messages end in a newline
    if isinstance(err, OSError) and err.errno is not None:  # not gzip's, bz2's or pyarrow's
        return err.strerror or detail
    if isinstance(err, UnicodeDecodeError):
        return f"{detail} (not UTF-8 text: save it as UTF-8)"
    return f"{detail} (damaged or truncated: download or write it again)"


@contextlib.contextmanager
def reading(path: str | Path, what: str = "file", error: type[ValueError] = ValueError,
            unit: str = "line") -> Iterator[ReadPlace]:
    """Around the reads of a user's file ``path``: a failure to read, decompress or decode it
    (damaged or truncated gzip, bz2 or xz data, bytes that are not UTF-8, invalid JSON, a
    damaged parquet or Arrow file, an OS error) raised as ``error``, one line naming the file
    and, when the reader counts them in the ReadPlace yielded, the whole lines read before it.
    Errors the reader raises itself (a ValueError naming a record) pass as they are."""
    place = ReadPlace(unit)
    try:
        yield place
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except json.JSONDecodeError as err:
        raise error(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: "
                    f"{err.msg}") from None
    except _read_errors() as err:
        after = f" after {place.unit} {place.count}" if place.count else ""
        raise error(f"{path}: cannot read the {what}{after}: {_read_failure(err)}") from None


def _yaml_object(text: str, path: Path) -> Any:
    """A YAML document, read safely (plain data, no tags), a repeated key refused as in JSON."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            if repeated := next((k for k in keys if keys.count(k) > 1), None):
                raise _RepeatedKey(repeated)
            return super().construct_mapping(node, deep)

    _read_exponents_as_floats(UniqueKeys)
    try:
        return yaml.load(text, UniqueKeys)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path}: invalid YAML{at}: {getattr(err, 'problem', err)}") from None


def _read_exponents_as_floats(cls: type) -> None:
    """A YAML loader or dumper class taking 2e-3 (no dot) for a number: YAML 1.1 reads it as
    text; YAML 1.2 and every user read it as a number (a dumper then quotes such text)."""
    cls.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


class _RepeatedKey(Exception):
    """A key given twice in one JSON object (its name in args[0])."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json keeps the last of a repeated key: a copy-pasted key would silently win."""
    value = {}
    for key, item in pairs:
        if key in value:
            raise _RepeatedKey(key)
        value[key] = item
    return value


def check_recipe_keys(recipe: Mapping[str, Any], path: str | Path) -> None:
    """Refuse top-level recipe keys other than its sections and ``_`` notes: a training key beside
    the sections (not in ``train``) would be silently ignored."""
    unknown = [k for k in recipe if not k.startswith("_") and k not in RECIPE_SECTIONS]
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; a recipe has "
                         f"{', '.join(map(repr, RECIPE_SECTIONS))} and '_'-prefixed notes")


def read_config_file(path: str | Path, section: str) -> tuple[dict, str]:
    """(values, source name) of a config file (a leading ``~``: the home directory, which no
    shell expands in ``--config=~/...``): a recipe's ``section``, else the whole object, without
    the ``_``-prefixed notes."""
    path = Path(path).expanduser()
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


def add_print_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", choices=("json", "yaml"),
                        help="print the resolved config in this format (a file --config reads "
                        "back to the same settings) and do nothing else")


def printed_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None, cfg: Any,
                   section: str) -> bool:
    """Whether ``argv`` asked for --print-config; if so ``cfg`` is printed as a --config file
    (``section``: the recipe section --config reads), a value derived where none is given
    printed unset (``printed_values``)."""
    args = vars(parser.parse_args(argv))
    fmt = args.get("print_config")
    given = {key for key in args if key not in ("config", "print_config")}
    if fmt and args.get("config") is not None:
        given |= read_config_file(args["config"], section)[0].keys()
    values = printed_values(cfg, given) if fmt else {}
    if fmt == "json":
        print(json.dumps(values, indent=1))
    elif fmt == "yaml":
        import yaml

        class Dumper(yaml.SafeDumper):
            pass

        _read_exponents_as_floats(Dumper)  # text such as "2e3" quoted, as --config reads it
        print(yaml.dump(values, Dumper=Dumper, sort_keys=False), end="")
    return bool(fmt)


def printed_values(cfg: Any, given: Collection[str]) -> dict[str, Any]:
    """The dataclass ``cfg``'s values as a --config file holds them: each as it is, but a value
    its ``__post_init__`` derives from None (eval.py's max_new_tokens, chat's or not) that no
    key of ``given`` set is None, so that the file derives it again beside other flags."""
    values = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.name in given or not f.init or f.default is not None or values[f.name] is None:
            continue
        if getattr(dataclasses.replace(cfg, **{f.name: None}), f.name) == getattr(cfg, f.name):
            values[f.name] = None
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"not a JSON object: {err.msg}; JSON needs double quotes around keys and strings, "
            """and a shell single ones around the whole value: '{"key": "value"}'""") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def _is_none(text: str) -> bool:
    return text.strip().lower() in NONE_WORDS


def _or_none(convert: Any) -> Any:
    """An Optional field's flag type: a word of ``NONE_WORDS`` gives None."""

    def parse(text: str) -> Any:
        return None if _is_none(text) else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse: "invalid int value: 'x'"
    return parse


def _none_word(text: str) -> None:
    """An Optional bool field's flag value: a word of ``NONE_WORDS`` (None, the default)."""
    if not _is_none(text):
        raise argparse.ArgumentTypeError(f"expected no value or none, got {text!r}")
    return None


def _list_flag(item: type, optional: bool = False, split: bool = True) -> type[argparse.Action]:
    """A list field's action: ``--flag a b`` and ``--flag a,b`` give ``[a, b]`` (``split``
    False: each item whole, commas and all); a lone ``none`` gives None for an Optional field."""

    class ListFlag(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parts = [x for v in values for x in (v.split(",") if split else [v]) if x]
            if optional and len(parts) == 1 and _is_none(parts[0]):
                setattr(namespace, self.dest, None)
                return
            try:
                setattr(namespace, self.dest, [item(x) for x in parts])
            except ValueError:
                parser.error(f"{option_string}: expected {_describe(list[item])}, got {values}")

    return ListFlag


def field_docs(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    """(help, section) of the dataclass's fields from its source comments: a field's trailing
    comment, continued on "#   " lines below it (else ``metadata["help"]``); any other comment
    line titles the fields below it. Read once a class (a parser is built several times a
    run), each caller given its own dicts."""
    helps, sections = _field_docs(cls)
    return dict(helps), dict(sections)


@functools.lru_cache(maxsize=64)
def _field_docs(cls: type) -> tuple[dict[str, str], dict[str, str]]:
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):  # no source (a frozen or interactive class): metadata only
        lines = []
    comments = {tok.start[0]: tok.string[1:] for tok in tokenize.generate_tokens(iter(lines).__next__)
                if tok.type == tokenize.COMMENT}
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    helps, sections = {}, {}
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
    return {f.name: helps.get(f.name) or f.metadata.get("help", "") for f in fields}, sections


def _help_text(doc: str, default: Any, optional: bool) -> str:
    """``doc``, the default unless it states one, and what 'none' gives (the default, where that
    is None; else None, which ``doc`` explains); '%' escaped for argparse."""
    notes = []
    if default is not dataclasses.MISSING and "default:" not in doc:
        notes.append(f"default: {default!r}")
    if optional and default is None:
        notes.append("'none': the default")
    elif optional:
        notes.append("'none' for None")
    note = "; ".join(notes)
    text = f"{doc} ({note})" if doc and note else doc or note
    return text.replace("%", "%%")


def _flag_kwargs(f: dataclasses.Field, base: Any, optional: bool,
                 allowed: Sequence | None) -> dict[str, Any]:
    """How argparse reads a field's flag, by the field's type."""
    origin = typing.get_origin(base) or base
    if origin is bool and optional:  # --x True, --x none None; --no-x (add_config_flags) False
        return {"nargs": "?", "const": True, "type": _none_word, "metavar": "none"}
    if origin is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is list and f.metadata.get("repeat"):  # JSON values hold commas: no splitting
        return {"action": "append", "type": _item_type(base)}
    if _is_sequence(base):
        split = not f.metadata.get("whole_items")
        return {"nargs": "+", "action": _list_flag(_item_type(base), optional, split),
                "metavar": "ITEM"}
    if origin is dict:
        return {"type": _or_none(_json_object) if optional else _json_object, "metavar": "JSON"}
    if optional and allowed is not None:
        return {"type": _or_none(origin), "choices": (*allowed, None),
                "metavar": "{" + ",".join(map(str, (*allowed, "none"))) + "}"}
    if optional:
        return {"type": _or_none(origin)}
    return {"type": origin, "choices": allowed}


def flag_of(key: str) -> str:
    """The flag of config field ``key``: ``--warmup-steps`` for warmup_steps."""
    return "--" + key.replace("_", "-")


def setting(cfg: object, key: str, where_set: Callable[[str], str] = flag_of) -> str:
    """Field ``key`` as an error names it: "warmup_steps (200, --config run.json)"."""
    return f"{key} ({getattr(cfg, key)!r}, {where_set(key)})"


class ValueRange(NamedTuple):
    """The range of a config's numeric keys (``check_ranges``): a value left None passes."""

    keys: tuple[str, ...]
    holds: Callable[[Any], bool]
    why: str  # what the error says of a value outside it: "must be >= 1"


def check_ranges(cfg: Any, ranges: Sequence[ValueRange],
                 where_set: Callable[[str], str] = flag_of,
                 only: Collection[str] | None = None) -> None:
    """Each of ``cfg``'s keys ``ranges`` name (``only``: these alone) in its range, else a
    ValueError naming the key, its value and where it was set."""
    for value_range in ranges:
        for key in value_range.keys:
            if only is not None and key not in only:
                continue
            value = getattr(cfg, key)
            if value is not None and not value_range.holds(value):
                raise ValueError(f"{setting(cfg, key, where_set)}: {value_range.why}")


def off_switch(key: str, where_set: Callable[[str], str] = flag_of) -> str:
    """How to turn boolean field ``key`` off: ``--no-KEY``, else "KEY false (where it was set)"."""
    where = where_set(key)
    return f"--no-{flag_of(key)[2:]}" if where == flag_of(key) else f"{key} false ({where})"


def where_set_in(args: Mapping[str, Any], section: str, rest: str | None = None,
                 spelled: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """Where the user set field ``key``, for errors: its flag when typed (as ``spelled`` has
    it where another spelling was typed: ``--learning_rate``), else the ``--config`` file when
    that sets it, else ``rest`` (a resumed run's config.json), else its flag."""
    config = args.get("config")
    in_file = {}
    if config is not None:
        in_file, _ = read_config_file(config, section)

    def where(key: str) -> str:
        if key in args and key != "config":
            return (spelled or {}).get(key, flag_of(key))
        if key in in_file:
            return f"--config {config}"
        return rest or flag_of(key)

    return where


# a value among unrecognized arguments, not a flag
_NEGATIVE_NUMBER = re.compile(r"-(\.?\d|inf|nan)", re.IGNORECASE)
# a flag's value, not a flag: argparse's own pattern takes -1 and -.5, not -1e-3 or -inf
_NEGATIVE_VALUE = re.compile(r"^-(\d+\.?\d*(e[-+]?\d+)?|\.\d+(e[-+]?\d+)?|inf(inity)?|nan)$",
                             re.IGNORECASE)


# A switch's value, as HF's HfArgumentParser reads one (string_to_bool, any case): true or false.
TRUE_WORDS = ("yes", "true", "t", "y", "1")
FALSE_WORDS = ("no", "false", "f", "n", "0")


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every script (and its subcommands: ``add_subparsers`` makes parsers of the
    parent's class) uses it: no prefix abbreviation (``--max-step`` is not ``--max-steps``), a
    switch given a true/false word as HF Trainer's flags take one (``--bf16 True``), and
    a mistake on the command line answered in one line, exit 2, without the usage block: an
    unknown flag naming the closest flags, any other the error and a pointer to ``--help``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self._negative_number_matcher = _NEGATIVE_VALUE  # --lr -1e-3: the value, then its check
        self.foreign_flags: dict[str, str] = {}  # another command's flag -> what to do here

    def parse_known_args(self, args=None, namespace=None):
        words = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._switches_alone(words), namespace)

    def _switches_alone(self, words: list[str]) -> list[str]:
        """``words`` with each switch given a word of TRUE_WORDS or FALSE_WORDS (``--bf16 True``,
        ``--progress=false``) written as a switch alone: a true one as typed, a false one as
        its other flag (``--no-progress``); words after ``--`` as they are."""
        end = words.index("--") if "--" in words else len(words)
        out = []
        i = 0
        while i < end:
            flag, equals, value = words[i].partition("=")
            taken = 1 if equals else 2  # the words the switch and its value fill
            if not equals:
                value = words[i + 1] if i + 1 < end else ""
            if not self._is_switch(flag) or value.lower() not in (*TRUE_WORDS, *FALSE_WORDS):
                out.append(words[i])
                i += 1
                continue
            out.append(flag if value.lower() in TRUE_WORDS else self._other_switch(flag, value))
            i += taken
        return out + words[end:]

    def _is_switch(self, flag: str) -> bool:
        """Whether ``flag`` is a switch of this parser: a bool field's (``--x``/``--no-x``, or
        an Optional one's ``--x``) or another flag that stores a constant (``--bf16``)."""
        action = self._option_string_actions.get(flag)
        if action is None or not flag.startswith("--"):
            return False
        optional_bool = action.nargs == "?" and action.const is True
        return optional_bool or isinstance(action, (argparse.BooleanOptionalAction,
                                                    argparse._StoreConstAction))

    def _other_switch(self, flag: str, value: str) -> str:
        """The flag that turns switch ``flag`` the other way (``--no-x`` of ``--x``, ``--x`` of
        ``--no-x``); a switch without one is refused, ``value`` named."""
        other = "--" + flag[5:] if flag.startswith("--no-") else "--no-" + flag[2:]
        action = self._option_string_actions.get(other)
        if action is None or action.dest != self._option_string_actions[flag].dest:
            self._refuse(f"{flag} {value}: {flag} has no false value; leave it out")
        return other

    def error(self, message: str) -> typing.NoReturn:
        message = " ".join(message.split())  # one line, whatever a type's error holds
        unrecognized = re.match(r"unrecognized arguments: (.*)", message)
        words = [] if unrecognized is None else unrecognized[1].split()
        words = words[: words.index("--")] if "--" in words else words  # operands follow --
        typed = list(dict.fromkeys(
            word.split("=")[0] for word in words
            if word.startswith("-") and word != "-" and not _NEGATIVE_NUMBER.match(word)))
        if not typed or not words[0].startswith("-"):  # a stray operand: argparse's words
            self._refuse(f"{message} (--help lists the flags)")
        if len(typed) == 1:
            self._refuse(f"unknown flag {typed[0]}{self._unknown_flag_hint(typed[0])}")
        self._refuse("unknown flags " + "; ".join(f"{flag}{self._unknown_flag_hint(flag)}"
                                                  for flag in typed))

    def _unknown_flag_hint(self, flag: str) -> str:
        """What to type instead of an unknown flag: the subcommand it belongs to, the flags it
        begins or resembles, or --help."""
        if owners := self._subcommands_taking(flag):  # another subcommand's flag
            return f" here: it belongs to {' and '.join(f'`{o}`' for o in owners)}"
        if flag in self.foreign_flags:
            return f": {self.foreign_flags[flag]}"
        flags = self._flags()
        close = [name for name in sorted(flags) if name.startswith(flag)]  # --out: --out-dir
        close += difflib.get_close_matches(flag, sorted(flags), n=3, cutoff=0.6)
        close = list(dict.fromkeys(flags[c] for c in close))[:3]  # an alias's match: its flag
        return f": did you mean {' or '.join(close)}?" if close else ": --help lists the flags"

    def _subcommands_taking(self, flag: str) -> list[str]:
        """The subcommands (``prog sub``) whose flags hold ``flag``, where it is none of the
        others': the one typed, then, took a flag that belongs elsewhere."""
        subs = [sub for action in self._actions if isinstance(action, argparse._SubParsersAction)
                for sub in action.choices.values() if isinstance(sub, ArgumentParser)]
        owners = [sub.prog for sub in subs if flag in sub._flags()]
        return owners if len(owners) < len(subs) else []

    def _refuse(self, message: str) -> typing.NoReturn:
        """Exit 2; the error said by one process of a torchrun job (rank 0), not once a rank
        (torchrun's RANK, as process.is_rank_zero reads it: settings imports nothing of the
        project)."""
        said = os.environ.get("RANK", "0") == "0"
        self.exit(2, f"{self.prog}: error: {message}\n" if said else None)

    def _flags(self) -> dict[str, str]:
        """The --flags of this parser and its subcommands' (a subcommand's unknown flag is
        reported by the top parser), each to the flag --help shows for it: a hidden other
        spelling (HF Trainer's ``--learning_rate``) to the shown flag of its setting."""
        options = {o: a for o, a in self._option_string_actions.items() if o.startswith("--")}
        flags = {o: o for o, action in options.items() if action.help != argparse.SUPPRESS}
        shown: dict[str, str] = {}  # a setting's first shown flag
        for o in flags:
            shown.setdefault(options[o].dest, o)
        flags |= {o: shown[action.dest] for o, action in options.items()
                  if o not in flags and action.dest in shown}
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    flags |= sub._flags() if isinstance(sub, ArgumentParser) else {}
        return flags


def add_config_flags(parser: argparse.ArgumentParser, cls: type,
                     choices: Mapping[str, Sequence] | None = None,
                     positional: Collection[str] = (),
                     aliases: Mapping[str, Sequence[str]] | None = None
                     ) -> argparse.ArgumentParser:
    """One flag per dataclass field, helped and grouped by ``field_docs``; a field without a
    default is required, or an operand if in ``positional``. The parser needs
    ``argument_default=argparse.SUPPRESS`` (only typed flags override the file). Field metadata:
    ``repeat`` (given once per item), ``whole_items`` (items never split at commas: text),
    ``metavar``, ``choices``, ``none_is_a_value``, ``hidden``
    (a flag the program passes itself, left out of --help). ``aliases``:
    hidden other spellings of a flag."""
    hints = typing.get_type_hints(cls)
    helps, sections = field_docs(cls)
    groups: dict[str | None, Any] = {}
    for f in dataclasses.fields(cls):
        base, optional = _field_type(hints[f.name])
        optional = optional and not f.metadata.get("none_is_a_value")
        default = (f.default if f.default_factory is dataclasses.MISSING
                   else f.default_factory())  # MISSING: the user must give it
        help_text = _help_text(helps.get(f.name, ""), default, optional)
        title = sections.get(f.name)
        if title not in groups:
            groups[title] = parser.add_argument_group(title) if title else parser
        target = groups[title]
        if f.name in positional:  # a list operand keeps its values whole: file names hold commas
            kwargs = ({"nargs": "+", "type": _item_type(base)} if typing.get_origin(base) is list
                      else {"type": base})
            target.add_argument(f.name, help=help_text, **kwargs)
            continue
        allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
        kwargs = _flag_kwargs(f, base, optional, allowed)
        if "metavar" in f.metadata:
            kwargs["metavar"] = f.metadata["metavar"]
        hidden = f.metadata.get("hidden")  # a flag the program passes itself
        target.add_argument(flag_of(f.name), help=argparse.SUPPRESS if hidden else help_text,
                            required=default is dataclasses.MISSING, **kwargs)
        if base is bool and optional:  # the Optional bool's False
            target.add_argument("--no-" + flag_of(f.name)[2:], dest=f.name, action="store_const",
                                const=False, help=argparse.SUPPRESS if hidden else f"{f.name}: False")
        for alias in (aliases or {}).get(f.name, ()):
            target.add_argument(alias, dest=f.name, help=argparse.SUPPRESS, **kwargs)
    return parser


def parse_config_flags(cls: type, argv: Sequence[str] | None, description: str,
                       choices: Mapping[str, Sequence] | None = None) -> Any:
    """An instance of the dataclass ``cls`` from ``argv``'s flags alone (one a field,
    ``add_config_flags``; no config file), the others its defaults: a script's settings (the
    bench/ scripts'). ``description`` heads its help as written; a value outside ``choices`` is
    a usage error."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    add_config_flags(parser, cls, choices)
    return cls(**vars(parser.parse_args(argv)))


def resolve_config(cls: type, args: Mapping[str, Any], section: str,
                   base: Mapping[str, Any] | None = None,
                   choices: Mapping[str, Sequence] | None = None,
                   aliases: Mapping[str, Sequence[str]] | None = None) -> Any:
    """Defaults < ``base`` < the ``--config`` file (``args["config"]``) < the typed flags;
    a dict flag (``--data-options``) updates the dict below it key by key, as ``--set
    train.data_options.KEY`` does. ``aliases`` as ``add_config_flags`` took them, for the hint
    at an unknown key."""
    values = dict(base or {})
    if args.get("config") is not None:
        file_values, source = read_config_file(args["config"], section)
        config_from_dict(cls, file_values, source, choices, aliases)  # errors name the file
        values.update(updated_over(values, file_values))
    flags = {k: v for k, v in args.items() if k not in ("config", "print_config")}
    values.update(updated_over(values, flags))
    return config_from_dict(cls, values, "command line", choices, aliases)


def updated_over(below: Mapping[str, Any], above: Mapping[str, Any]) -> dict[str, Any]:
    """``above``'s values, each dict merged over the dict ``below`` holds under its key."""
    out = dict(above)
    for key, value in above.items():
        if isinstance(value, dict) and isinstance(below.get(key), dict):
            out[key] = {**below[key], **value}
    return out
