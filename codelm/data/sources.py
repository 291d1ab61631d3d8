"""The data sources and their documents: the standard library, directories of code files,
JSONL, parquet, a datasets directory or a Hugging Face dataset id, each read as ``Doc``s
(``iter_sources``), and what a cache key knows of them (``sources_fingerprint``)."""

from __future__ import annotations

import bz2
import difflib
import gzip
import hashlib
import json
import lzma
import re
import sys
import sysconfig
import typing
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from codelm.data.config import DataConfig, DataError
from codelm.runtime import hub, settings
from codelm.runtime.process import is_rank_zero
from scraping.common import (
    INSTALLED_CODE,
    has_extension,
    is_utf8,
    source_files,
    walk_source_tree,
)
from scraping.local import is_git_source

# The hub's name of a train split's data files, as datasets' default split patterns read it:
# "train" or "training" between separators (train-00000-of-00001.parquet, data/train.jsonl,
# train_0.jsonl, python-train.jsonl, train/...), not train_prefs or train_sft, which are splits
# of their own.
_TRAIN_SPLIT = re.compile(r"(?:^|[-._ 0-9/])train(?:ing)?(?:[-. 0-9/]|_[0-9]|$)")


def stdlib_root() -> Path:
    """Directory holding this interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every ``.py`` file of the standard library (not site-packages), sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    return source_files(root, (".py",))


@dataclass
class Doc:
    """One unit of the corpus: a code file, or a prompt/completion pair (``target`` set)."""

    id: str  # unique, stable: "repo/path", a file path, or "file.jsonl:line"
    text: str  # before cleaning as read: bytes, or None for a file over max_bytes (unread)
    repo: str | None = None
    target: str | None = None  # the completion of a pair; None for code files
    raw_pair: bool = False  # a {"prompt","completion"} pair: used verbatim, no template
    split: str | None = None  # "val"/"test" from val_sources/test_sources; None: by fraction
    chat: bool = False  # a conversation: ``text`` holds its messages as JSON
    tools: list[dict] | None = None  # a conversation's function definitions (TRL's field)

    @property
    def is_python(self) -> bool:
        return self.target is None and not self.chat and has_extension(self.id, (".py",))

    @property
    def messages(self) -> list[dict]:
        """A conversation's [{"role", "content", ...}, ...]."""
        return json.loads(self.text)


class SourceFiles(typing.NamedTuple):
    """A data source's files: record files, or code files named relative to ``root``."""

    records: bool  # JSONL, parquet, a datasets directory or a Hugging Face dataset id
    root: Path | None  # code: the directory its files' names are relative to
    files: list[Path]  # deterministic order
    skipped: Counter  # code: files of its extensions left unread, by the walker's reason
    #   (symlink, not_a_file, gitignored, nested_repo)


def source_listing(source: str, extensions: Sequence[str]) -> SourceFiles:
    """The files of ``source``: its records (``record_files``), or its code files (of
    ``extensions``: the stdlib, or a directory)."""
    records = record_files(source)
    if records is not None:
        if named := next((f for f in records if not is_utf8(f.name)), None):
            raise DataError(f"data source {source}: the file name {named.name!r}, which names "
                            "its records, is not valid UTF-8; rename the file")
        return SourceFiles(records=True, root=None, files=records, skipped=Counter())
    if source == "stdlib":
        return SourceFiles(records=False, root=stdlib_root(), files=stdlib_files(),
                           skipped=Counter())
    root = Path(source).expanduser()
    files, skipped = [], Counter()
    for _, path, skip in walk_source_tree(root, extensions, links_within=link_scope(root)):
        if skip is None:
            files.append(path)
        elif skip not in ("extension", INSTALLED_CODE):  # another language's file, a directory
            skipped[skip] += 1                            # of installed code: not this source's
    return SourceFiles(records=False, root=root, files=files, skipped=skipped)


def link_scope(root: Path) -> Path:
    """Where the links of a source directory may point and be read: inside it, or inside the
    repository folder of a Hugging Face hub snapshot (snapshots/<revision>/, whose files link
    into blobs/); a link out of it (a cloned repository's to a file elsewhere) is skipped."""
    resolved = root.resolve()
    if resolved.parent.name == "snapshots":
        return resolved.parent.parent
    return resolved


def record_files(source: str) -> list[Path] | None:
    """The files of a record source (JSONL, parquet, a datasets ``save_to_disk`` directory, a
    Hugging Face dataset id: its train split's files, or all); None for code (stdlib, a folder).
    A source that is none of these is refused here, naming the fix."""
    if source == "stdlib":
        return None
    if hub.is_hub_id(source):  # not a local path
        try:
            snapshot = hub.checkpoint_dir(source, "data source", repo_type="dataset")
        except ValueError as e:
            raise DataError(str(e)) from None
        return _hub_files(source, snapshot)
    if is_git_source(source):  # a URL or a bare repository: no files to walk
        raise DataError(f"data source {source}: a git repository is read from a checkout, or "
                        f"collected first: python -m scraping local {source} --out FILE.jsonl, "
                        "then --data FILE.jsonl")
    path = Path(source).expanduser()
    if not path.exists():
        where = "" if path.is_absolute() else f" (read from {Path.cwd()}, the current directory)"
        raise DataError(f"data source not found: {source}{where}")
    if path.is_file():
        if path.suffix != ".parquet" and not is_jsonl(path):
            raise DataError(f"data source {source}: a file source must be JSONL (*.jsonl, or "
                            "compressed: *.jsonl.gz, .bz2, .xz) or parquet (*.parquet)")
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise DataError(f"data source {source}: a datasets DatasetDict (splits {splits}); name "
                        f"one split's directory, e.g. {path / (splits or ['train'])[0]}")
    if not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        return None  # code (save_to_disk writes both)
    state = settings.read_json_object(path / "state.json", "datasets state")
    files = state.get("_data_files")
    if not (isinstance(files, list) and all(
            isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files)):
        raise DataError(f"{path / 'state.json'}: no '_data_files' list of {{filename}}, as "
                        "datasets' save_to_disk writes it; save the dataset again")
    return [path / f["filename"] for f in files]


def _hub_files(source: str, snapshot: Path) -> list[Path]:
    """The parquet and JSONL files of a hub dataset's ``snapshot``: its train split's, or all;
    refused where it holds none, or splits of other names alone."""
    files = sorted(p for p in snapshot.rglob("*") if p.suffix == ".parquet" or is_jsonl(p))
    names = [p.relative_to(snapshot).as_posix() for p in files]
    if not files:
        found = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*")
                       if p.is_file())
        raise DataError(f"data source {source}: no parquet or JSONL file in its snapshot "
                        f"{snapshot} (it holds {', '.join(found[:6]) or 'no file'}); codelm "
                        "reads parquet and JSON Lines (*.jsonl): convert the files and pass them")
    train = [p for p, name in zip(files, names) if _TRAIN_SPLIT.search(name)]
    if not train and any("train" in name for name in names):  # train_prefs, train_sft...
        raise DataError(f"data source {source}: no split named train among its files "
                        f"({', '.join(names[:6])}); pass the files of the split you mean from "
                        f"its snapshot, {snapshot}")
    return train or files


# What a refused record's line ends with: the data option that skips and counts such records.
SKIP_BAD = "to skip such records and count them: --data-options '{\"skip_bad\": true}'"


def _read_records(path: Path, cfg: DataConfig, counts: Counter) -> Iterator[Doc]:
    """The code or pair records of a JSONL, parquet or datasets Arrow file, as documents."""
    rows = jsonl_lines(path) if is_jsonl(path) else table_rows(path, cfg)
    for number, where, record in rows:
        try:
            record = json_object(record, where) if isinstance(record, bytes) else record
            doc = _record_to_doc(record, cfg, f"{path.name}:{number}", where)
        except DataError as exc:
            if not cfg.skip_bad:
                raise DataError(f"{exc} ({SKIP_BAD}, dataset.py's --skip-bad)") from None
            counts["bad_jsonl_line" if is_jsonl(path) else "bad_record"] += 1
            continue
        yield doc


# The names of a JSONL file, plain or compressed.
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.bz2", ".jsonl.xz")
RECORD_SUFFIXES = (*JSONL_SUFFIXES, ".parquet")  # files read as records, given one by one


def is_jsonl(path: Path) -> bool:
    return path.name.endswith(JSONL_SUFFIXES)


# A compressed file's first bytes, and how to open it: gzip, bz2, xz.
COMPRESSED_MAGIC = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}


def jsonl_lines(path: Path, what: str = "JSONL file") -> Iterator[tuple[int, str, bytes]]:
    """(line number, "file:line", its bytes) of each non-blank line; ``json_object`` reads one.
    A gzip, bz2 or xz file (its bytes say so, whatever its name) is read decompressed; one that
    does not read or decompress is a DataError naming it (``what``) and the lines read."""
    with settings.reading(path, what, DataError) as place:
        with open(path, "rb") as f:
            head = f.read(max(map(len, COMPRESSED_MAGIC)))
        opener = next((o for magic, o in COMPRESSED_MAGIC.items() if head.startswith(magic)), open)
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                place.count = lineno
                if raw.strip():  # rstrip: else an error at the line's end is json's "line 2"
                    yield lineno, f"{path}:{lineno}", raw.rstrip(b"\r\n")


def table_rows(file: Path, cfg: DataConfig) -> Iterator[tuple[int, str, dict]]:
    """A parquet or datasets Arrow file's rows, streamed a batch at a time, the named columns;
    a damaged file is a DataError naming it and the rows read."""
    kind = "parquet" if file.suffix == ".parquet" else "Arrow"
    with settings.reading(file, f"{kind} file", DataError, "row") as place:
        for number, where, row in _arrow_rows(file, cfg):
            place.count = number
            yield number, where, row


def _arrow_rows(file: Path, cfg: DataConfig) -> Iterator[tuple[int, str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if file.suffix == ".parquet":
        table = pq.ParquetFile(file, pre_buffer=False)  # pre-buffering holds every row group
        names = table.schema_arrow.names
    else:  # datasets' Arrow stream files, memory-mapped
        table = pa.ipc.open_stream(pa.memory_map(str(file)))
        names = table.schema.names
    named = _named_columns(cfg)
    if missing := [c for c in named if c not in names]:
        raise DataError(f"{file}: no column {missing[0]!r} (its columns: {', '.join(names)}); "
                        "set the data options text_column, or input_column and output_column")
    if file.suffix == ".parquet":
        wanted = [*named, *(c for c in (*REPO_KEYS, *PATH_KEYS) if c in names)] if named else None
        table = table.iter_batches(batch_size=64, columns=wanted)
    rows = (row for batch in table for row in batch.to_pylist())
    for number, row in enumerate(rows, start=1):
        yield number, f"{file}: row {number}", row


def _named_columns(cfg: DataConfig) -> list[str]:
    return [c for c in (cfg.text_column, cfg.input_column, cfg.output_column) if c]


# A code record's text: the scrapers' key, then that of some published corpora.
TEXT_KEYS = ("text", "file_text")
# A code record's repository and path: the scrapers' keys, then those of published corpora
# (codeparrot's and The Stack v2's repo_name; The Stack v1's and StarCoderData's max_stars_*).
REPO_KEYS = ("repo", "repo_name", "max_stars_repo_name")
PATH_KEYS = ("path", "max_stars_repo_path")


def _first_key(rec: dict, keys: Sequence[str]) -> str | None:
    """The first of ``keys`` a record holds a non-empty string under (None: none)."""
    return next((k for k in keys if isinstance(rec.get(k), str) and rec[k]), None)


def _first_string(rec: dict, keys: Sequence[str]) -> str | None:
    """The value of ``_first_key`` (None: none)."""
    key = _first_key(rec, keys)
    return None if key is None else rec[key]


def json_object(raw: bytes, where: str) -> dict:
    """One JSONL line's object; a DataError names ``where`` (file:line) and the column."""
    try:
        rec = json.loads(raw)
    except json.JSONDecodeError as exc:
        end = " (the end of the line)" if exc.pos >= len(exc.doc) else ""
        raise DataError(f"{where}: malformed JSON at column {exc.pos + 1}{end}: {exc.msg}") from None
    except (UnicodeDecodeError, RecursionError) as exc:  # json recurses once per nesting level
        raise DataError(f"{where}: malformed JSON ({exc})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def _record_to_doc(rec: dict, cfg: DataConfig, name: str, where: str) -> Doc:
    """One record's Doc (``name``: its id without a path); a DataError names ``where``, the key."""
    if named := _named_columns(cfg):  # the columns the data options name, as codelm's keys
        if missing := [c for c in named if c not in rec]:
            raise DataError(f"{where}: no key {missing[0]!r}, which the data options name")
        rec = ({"text": rec[named[0]], "repo": _first_string(rec, REPO_KEYS),
                "path": _first_string(rec, PATH_KEYS)}
               if cfg.text_column else {"input": rec[named[0]], "output": rec[named[1]]})
    # Every string a record contributes must be valid UTF-8 (JSON can spell lone surrogates).
    for key in (*TEXT_KEYS, "input", "output", "prompt", "completion"):
        if isinstance(rec.get(key), str) and not is_utf8(rec[key]):
            raise DataError(f"{where}: key {key!r} holds a lone surrogate (not valid UTF-8)")
    for keys in (REPO_KEYS, PATH_KEYS):  # the repository and path it is named by
        if (key := _first_key(rec, keys)) is not None and not is_utf8(rec[key]):
            raise DataError(f"{where}: key {key!r} holds a lone surrogate (not valid UTF-8)")
    if "messages" in rec:
        messages = checked_messages(rec["messages"], "messages", where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no 'assistant' message: nothing for the chat task to learn")
        return Doc(name, json.dumps(messages, ensure_ascii=False), chat=True,
                   tools=checked_tools(rec, where))
    for a, b in (("input", "output"), ("prompt", "completion")):
        if a in rec or b in rec:
            if not (isinstance(rec.get(a), str) and isinstance(rec.get(b), str)):
                raise DataError(f"{where}: a pair needs string keys {a!r} and {b!r}")
            return Doc(name, rec[a], target=rec[b], raw_pair=a == "prompt")
    key = next((k for k in TEXT_KEYS if k in rec), None)
    if key is None:
        keys = ", ".join(repr(k) for k in list(rec)[:8])
        raise DataError(f"{where}: record has none of the keys 'text' (or 'file_text'), "
                        f"'input'/'output', 'prompt'/'completion' (it has {keys}): name its "
                        "text column with the data option text_column (--data-options "
                        """'{"text_column": "content"}'; dataset.py --text-column), or """
                        "input_column/output_column")
    if not isinstance(rec[key], str):
        raise DataError(f"{where}: key {key!r} must be a string")
    repo = _first_string(rec, REPO_KEYS)
    rel = (_first_string(rec, PATH_KEYS) or name).lstrip("/")  # The Stack v2's open with /
    return Doc(f"{repo}/{rel}" if repo else rel, rec[key], repo=repo)


# The roles of a conversation's messages chat templates read: OpenAI's and TRL's, Llama 3.1's
# ipython (a tool's result), the older function; and ShareGPT's names for two of them.
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}


def checked_messages(messages: object, key: str, where: str) -> list[dict]:
    """A conversation's messages [{role, content, ...}, ...] (TRL's conversational format: each
    message as it is, its other keys (name, tool_calls) for the chat template, its content text
    or null); a DataError names ``where`` and ``key``."""
    if not (isinstance(messages, list) and messages):
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content", ""), str | None)):
            raise DataError(f"{where}: {key}[{i}] must be an object with a string 'role' and "
                            "a string (or null) 'content'")
        if not is_utf8(json.dumps(message, ensure_ascii=False)):
            raise DataError(f"{where}: {key}[{i}] holds a lone surrogate (not valid UTF-8)")
        if problem := _role_problem(message["role"]):
            raise DataError(f"{where}: {key}[{i}].role {message['role']!r}: {problem}")
    return [dict(message) for message in messages]


def _role_problem(role: str) -> str | None:
    """Why a message's role is a mistake (another case or spelling of a known role, ShareGPT's
    names), or None: a known role, or another template's own (GLM's observation), which the
    template renders as it is."""
    if role in CHAT_ROLES:
        return None
    if role.lower() in CHAT_ROLES:
        return f"roles are lower case: {role.lower()!r}"
    if role in SHAREGPT_ROLES:
        return (f"ShareGPT's name: chat templates read TRL's format, which spells it "
                f"{SHAREGPT_ROLES[role]!r}")
    close = difflib.get_close_matches(role, ("system", "user", "assistant"), n=1, cutoff=0.8)
    return f"did you mean {close[0]!r}?" if close else None


def checked_tools(record: dict, where: str) -> list[dict] | None:
    """A conversation record's ``tools`` (a list of function definitions, or its JSON text, as
    TRL reads it), which its chat template renders; None where it has none."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except ValueError:
            raise DataError(f"{where}: 'tools' is text that is not JSON") from None
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(tool, dict) for tool in tools)):
        raise DataError(f"{where}: 'tools' must be a list of function definitions (objects)")
    if tools is not None and not is_utf8(json.dumps(tools, ensure_ascii=False)):
        raise DataError(f"{where}: 'tools' holds a lone surrogate (not valid UTF-8)")
    return tools


def iter_sources(cfg: DataConfig, counts: Counter, pairs: list[int]) -> Iterator[Doc]:
    """Every document of every source, at most ``max_docs`` per role, counting each source's
    pair records in ``pairs``. A file over ``max_bytes`` is left unread (``text`` None)."""
    taken: Counter = Counter()  # documents yielded per role
    for i, (split, source) in enumerate(cfg.sources_by_split()):
        listing = source_listing(source, cfg.extensions)
        if listing.records and cfg.extensions != DataConfig().extensions and is_rank_zero():
            print(f"note: {source}: its records are all read: extensions {cfg.extensions} "
                  "choose the files of code directories only", file=sys.stderr)
        if listing.records:
            docs = (doc for f in listing.files for doc in _read_records(f, cfg, counts))
        else:
            docs = _read_files(source, listing, cfg, counts)
        for raw in docs:
            if cfg.max_docs is not None and taken[split] >= cfg.max_docs:
                break
            taken[split] += 1
            if raw.target is not None:
                pairs[i] += 1
            raw.split = split
            yield raw


def is_checkout(root: Path) -> bool:
    """Whether a directory source is a git checkout: the repository its name names."""
    return (root / ".git").exists()


def _read_files(source: str, listing: SourceFiles, cfg: DataConfig, counts: Counter
                ) -> Iterator[Doc]:
    # The name the cache key knows the folder by (its resolved path's), however it is spelled;
    # a git checkout is the repository of that name (split by repo as its scraped records are).
    prefix = "stdlib" if source == "stdlib" else listing.root.resolve().name
    repo = prefix if is_checkout(listing.root) else None
    counts.update(listing.skipped)
    for p in listing.files:
        doc_id = f"{prefix}/{p.relative_to(listing.root).as_posix()}"
        if not is_utf8(doc_id):  # os.walk spells undecodable name bytes as surrogates
            counts["not_utf8_name"] += 1
            continue
        try:
            data = p.read_bytes() if p.stat().st_size <= cfg.max_bytes else None
        except OSError:  # removed meanwhile, or no permission to read it
            counts["unreadable"] += 1
            continue
        yield Doc(doc_id, data, repo=repo)


def no_files_error(cfg: DataConfig) -> DataError:
    """The error of sources that hold no files of cfg.extensions and no records, with what
    code their directories hold instead."""
    return DataError(f"sources {cfg.sources} hold no files with extensions {cfg.extensions} "
                     "and no JSONL records (an empty .jsonl: a scrape that kept nothing?)"
                     + _extensions_hint(cfg.sources) + _checkout_hint(cfg.sources))


def _checkout_hint(sources: Sequence[str]) -> str:
    """A note naming the sources that are git clones without a checkout (only .git in them)."""
    bare = []
    for source in sources:
        try:
            if Path(source).is_dir() and [p.name for p in Path(source).iterdir()] == [".git"]:
                bare.append(source)
        except OSError:  # unreadable: the error it is part of says enough
            continue
    if not bare:
        return ""
    holds = "holds" if len(bare) == 1 else "hold"
    return (f"; {', '.join(bare)} {holds} only .git: a clone without a checkout (git checkout "
            "in it)")


_SOURCE_SUFFIXES = frozenset({".py", ".kt", ".kts", ".java", ".js", ".ts", ".tsx", ".jsx", ".go",
                              ".rs", ".c", ".h", ".cc", ".cpp", ".hpp", ".cs", ".rb", ".php",
                              ".swift", ".scala", ".lua", ".sql", ".sh", ".r", ".jl", ".dart"})


def _extensions_hint(sources: Sequence[str], most: int = 10_000) -> str:
    """What the source directories hold instead (their commonest source extensions among the
    first ``most`` files, else their commonest extensions: text, docs), and how to read it; ""
    where they hold no file with an extension."""
    code: Counter = Counter()
    records: Counter = Counter()
    other: Counter = Counter()
    for source in sources:
        root = Path(source)
        if not root.is_dir():
            continue
        for n, path in enumerate(root.rglob("*")):
            if n >= most:
                break
            suffix = path.suffix.lower()
            hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
            if not suffix or hidden or not path.is_file():  # not .git's hooks, .venv's files
                continue
            record_suffix = next((end for end in RECORD_SUFFIXES
                                  if path.name.lower().endswith(end)), None)
            if record_suffix is not None:
                records[record_suffix] += 1
            else:
                (code if suffix in _SOURCE_SUFFIXES else other)[suffix] += 1
    if records and not code:
        listed = ", ".join(f"{n} {suffix}" for suffix, n in records.most_common(3))
        example = f"{sources[0].rstrip('/')}/*{records.most_common(1)[0][0]}"
        return (f"; they hold {listed} files, whose records are read from files given as "
                f"sources: --data {example}")
    found = code or other
    if not found:
        return ""
    extensions = [extension for extension, _ in found.most_common(3)]
    listed = ", ".join(f"{found[e]} {e}" for e in extensions)
    return (f"; they hold {listed} files: read them with --data-options "
            f"'{{\"extensions\": {json.dumps(extensions)}}}' (dataset.py: --extensions "
            f"{' '.join(extensions)})")


def sources_fingerprint(sources: Sequence[str], extensions: Sequence[str]) -> list:
    """What the cache key knows of the sources: every file's path, size, mtime and ctime (an
    edit whose copy tool sets the mtime back, as cp -p, rsync -a and tar do, still changes the
    ctime, which no tool sets)."""
    out = []
    # a folder's documents are named by its name: one a name (the source given, its path)
    folders: dict[str, tuple[str, Path]] = {}
    for source in sources:
        # Every build computes its key first: sources are checked here.
        listing = source_listing(source, extensions)
        if not listing.records and source != "stdlib":
            root = listing.root.resolve()
            if root.name in folders:
                given, path = folders[root.name]
                if path == root:
                    raise DataError(f"data sources {given} and {source} are the same folder: "
                                    "give it once")
                raise DataError(f"data sources {given} and {source} are both folders "
                                f"named {root.name!r}, whose files would share their names (and "
                                "the project task would read them as one repository): give one "
                                "through a link or copy of another name")
            folders[root.name] = (source, root)
        if listing.records:
            for f in listing.files:
                st = f.stat()
                out.append([str(f.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns])
            continue
        names = hashlib.sha256()
        for p in listing.files:
            st = p.stat()
            entry = (f"{p.relative_to(listing.root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}"
                     f"\0{st.st_ctime_ns}\n")
            names.update(entry.encode("utf-8", "surrogateescape"))  # a non-UTF-8 name: its bytes
        where = source if source == "stdlib" else str(listing.root.resolve())
        entry = [where, names.hexdigest()]
        if is_checkout(listing.root):  # a repository (``_read_files``)
            entry.append("checkout")
        out.append(entry)
    return out


def plain_text(doc: Doc) -> str:
    if doc.chat:
        return "\n".join(m.get("content") or "" for m in doc.messages)
    return doc.text if doc.target is None else doc.text + "\n" + doc.target
