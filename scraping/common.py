"""Pieces shared by the GitHub and local collectors: records, filters, summaries, safe output."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import subprocess
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from codelm.runtime import process

# ``--licenses permissive``: the ids GitHub reports that The Stack counts permissive (the Blue
# Oak Council's permissive list and ScanCode's permissive and public-domain categories): no
# copyleft, weak or strong.
PERMISSIVE_LICENSES = frozenset(
    {"MIT", "Apache-2.0", "BSD-2-Clause", "BSD-3-Clause", "ISC", "Unlicense", "0BSD", "Zlib",
     "MIT-0", "BSL-1.0", "PSF-2.0", "CC0-1.0", "NCSA", "AFL-3.0", "Artistic-2.0",
     "BlueOak-1.0.0", "BSD-2-Clause-Patent", "BSD-3-Clause-Clear", "BSD-4-Clause", "CC-BY-4.0",
     "ECL-2.0", "LPPL-1.3c", "MS-PL", "PostgreSQL", "UPL-1.0", "Vim", "WTFPL"}
)

# Every id GitHub reports as a repository's ``license.spdx_id`` (NOASSERTION: a licence file it
# does not recognise): what ``--licenses`` may name; any other id is a typo.
KNOWN_LICENSES = PERMISSIVE_LICENSES | frozenset(
    {"AFL-3.0", "AGPL-3.0", "Artistic-2.0", "BlueOak-1.0.0", "BSD-2-Clause-Patent",
     "BSD-3-Clause-Clear", "BSD-4-Clause", "CC-BY-4.0", "CC-BY-SA-4.0", "CECILL-2.1",
     "CERN-OHL-P-2.0", "CERN-OHL-S-2.0", "CERN-OHL-W-2.0", "ECL-2.0", "EPL-1.0", "EPL-2.0",
     "EUPL-1.1", "EUPL-1.2", "GFDL-1.3", "GPL-2.0", "GPL-3.0", "LGPL-2.1", "LGPL-3.0",
     "LPPL-1.3c", "MPL-2.0", "MS-PL", "MS-RL", "MulanPSL-2.0", "NCSA", "ODbL-1.0", "OFL-1.1",
     "OSL-3.0", "PostgreSQL", "UPL-1.0", "Vim", "WTFPL", "NOASSERTION"}
)

# ``--licenses none``: repositories without a licence file (``license`` null in their records).
NO_LICENSE = "none"

RECORD_KEYS = ("repo", "path", "sha", "license", "stars", "text")

# Directories no collector descends into: version control, caches, installed third-party code.
EXCLUDED_DIRS = frozenset(
    {".git", ".hg", ".svn", "__pycache__", "node_modules", ".venv", ".tox", ".nox",
     "site-packages", "dist-packages"}
)
# Of those, the ones that hold installed code, each a walk's entry of its own (INSTALLED_CODE).
THIRD_PARTY_DIRS = frozenset({"node_modules", ".venv", "site-packages", "dist-packages"})
INSTALLED_CODE = "installed_code_dir"

# The first line of a Git LFS pointer (under 1,024 bytes), held in place of the real file.
_LFS_POINTER = "version https://git-lfs.github.com/spec/"

log = logging.getLogger("scraping")


def git_blob_sha(data: bytes) -> str:
    """The SHA-1 git gives this content as a blob, so local and GitHub records share one id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def redact_url(url: str) -> str:
    """The URL without any user:password part, for records and messages."""
    parts = urlsplit(url)
    if parts.username or parts.password:  # the host as written: [::1] keeps its brackets
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    return url


def _license_id(name: str, flag: str, known: dict[str, str], give: str) -> str:
    """The canonical spelling of ``name`` in ``known`` (lower-case -> id), or a ValueError."""
    if name.lower() not in known:
        close = difflib.get_close_matches(name.lower(), known, n=1, cutoff=0.6)
        hint = f"did you mean {known[close[0]]!r}? " if close else ""
        raise ValueError(f"{flag} {name!r}: not a licence id GitHub reports; {hint}{give}")
    return known[name.lower()]


def expand_licenses(licenses: Iterable[str] | None) -> frozenset[str] | None:
    """SPDX ids to accept, spelled as GitHub does (``NO_LICENSE``: none); None: any licence. An
    id GitHub never reports, or none at all, is refused: it would skip every repository."""
    if licenses is None:
        return None
    licenses = list(licenses)
    if not licenses:
        raise ValueError("--licenses: give at least one licence id, or leave the flag out to "
                         "accept any licence")
    known = {k.lower(): k for k in (*KNOWN_LICENSES, "permissive", NO_LICENSE)}
    out: set[str] = set()
    for name in licenses:
        name = _license_id(name, "--licenses", known, "Give 'permissive', 'none' (no licence) "
                                                      "or SPDX ids such as MIT, Apache-2.0, "
                                                      "GPL-3.0")
        out |= PERMISSIVE_LICENSES if name == "permissive" else {name}
    return frozenset(out)


def canonical_license(name: str | None) -> str | None:
    """``scraping local --license``: one id of ``KNOWN_LICENSES``, spelled as GitHub does."""
    if name is None:
        return None
    return _license_id(name, "--license", {k.lower(): k for k in KNOWN_LICENSES},
                       "Give the one SPDX id of these sources, such as MIT, Apache-2.0, "
                       "GPL-3.0 (NOASSERTION for another licence)")


def license_allowed(license_id: str | None, allowed: frozenset[str] | None) -> bool:
    """Whether a licence (None: none detected) passes ``expand_licenses``'s ``allowed``."""
    return allowed is None or (license_id or NO_LICENSE) in allowed


@dataclass
class FileFilter:
    """Which files are kept: by extension (``py``, ``.PY``: ``.py``) and byte size (inclusive)."""

    extensions: Iterable[str]
    min_bytes: int
    max_bytes: int

    def __post_init__(self) -> None:
        self.extensions = tuple(sorted({("." + e.lstrip(".")).lower()
                                        for e in self.extensions if e.strip(".")}))
        if not self.extensions:
            raise ValueError("--extensions: give at least one file extension, e.g. .py")
        if self.min_bytes < 0 or self.max_bytes < self.min_bytes:
            raise ValueError(
                f"--min-bytes {self.min_bytes} / --max-bytes {self.max_bytes}: "
                "need 0 <= min-bytes <= max-bytes")

    def reject_reason(self, path: str, size: int) -> str | None:
        """Why a file is skipped before reading it, or None when it is wanted."""
        if not has_extension(path, self.extensions):
            return "extension"
        if size < self.min_bytes:
            return "too_small"
        if size > self.max_bytes:
            return "too_large"
        return None


def has_extension(path: str, extensions: Iterable[str]) -> bool:
    """Whether ``path`` ends in one of ``extensions``, in any case (``B.PY`` is Python too)."""
    return path.lower().endswith(tuple(e.lower() for e in extensions))


def walk_source_tree(root: Path, extensions: Iterable[str], links_within: Path | None = None
                     ) -> Iterator[tuple[str, Path, str | None]]:
    """(relative posix path, path, why it is skipped or None) of every file under ``root``,
    sorted (after the directories not walked): the one walker of ``scraping local`` and
    dataset.py. Skipped: ``extension``;
    where ``root`` belongs to a git repository, what a clone of it never holds: ``gitignored``,
    and ``nested_repo`` (a submodule or a repository cloned inside: another repository's code,
    under its own licence); ``symlink`` (a link that does not resolve inside ``links_within``,
    resolved; None: every link: a cloned tree must not pull in outside files),
    ``not_a_file``; a directory that cannot be listed comes as one entry, ``unreadable`` (its
    files unknown), with a warning naming it; the EXCLUDED_DIRS are not walked, those of
    installed code (THIRD_PARTY_DIRS) each coming as one entry, ``installed_code_dir``."""
    extensions = tuple(extensions)
    files, work_trees, unreadable, installed = _tree_files(root)
    for rel in installed:
        yield rel, root / rel, INSTALLED_CODE
    top = repository_top(root)
    if top is not None:
        work_trees = list(dict.fromkeys(["", *work_trees]))
    outermost = [tree for tree in work_trees
                 if not any(_is_under(tree, other) for other in work_trees)]
    nested = tuple(f"{tree}/" for tree in work_trees if tree not in outermost)
    ignored = set()
    for tree in outermost:  # the walked root's repository is the one already found
        listed = git_ignored_files(Path(root, tree), top if tree == "" else None)
        ignored.update(f"{tree}/{rel}" if tree else rel for rel in listed)
    for rel, path in _lost_directories(unreadable, root, top, outermost, nested):
        log.warning("%s: cannot list this directory (permission denied?); its files are left "
                    "out", path)
        yield rel, path, "unreadable"
    for rel, path in files:  # the extension first: it needs no system call
        if not has_extension(rel, extensions):
            yield rel, path, "extension"
        elif nested and rel.startswith(nested):
            yield rel, path, "nested_repo"
        elif path.is_symlink() and not _resolves_within(path, links_within):
            yield rel, path, "symlink"
        elif not path.is_file():  # a FIFO, a socket, a device
            yield rel, path, "not_a_file"
        else:
            yield rel, path, "gitignored" if rel in ignored else None


def _resolves_within(link: Path, scope: Path | None) -> bool:
    """Whether ``link`` points, through every link on the way, inside ``scope`` (resolved); a
    loop of links points nowhere."""
    if scope is None:
        return False
    try:
        target = link.resolve()
    except (RuntimeError, OSError):  # a loop: RuntimeError before Python 3.13, OSError after
        return False
    return target.is_relative_to(scope)


def _is_under(tree: str, other: str) -> bool:
    """Whether the relative directory ``tree`` lies inside ``other`` ("": the walked root)."""
    return tree != other and (other == "" or tree.startswith(f"{other}/"))


def repository_top(root: Path) -> Path | None:
    """The top of the git work tree that ``root`` belongs to: ``root`` itself where it holds
    ``.git``, or the nearest directory above holding one that tracks files under ``root``
    (a directory that a repository above only contains, as a home directory's dotfiles
    repository contains everything, is not its); None for none."""
    root = Path(root).resolve()
    if (root / ".git").exists():
        return root
    for top in root.parents:
        if (top / ".git").exists():
            tracked = _git(top, root, "ls-files", "-z", "--cached", "--", ".")
            return top if tracked else None
    return None


def git_ignored_files(root: Path, top: Path | None = None) -> frozenset[str]:
    """Relative paths of the untracked files git ignores under ``root``, a git work tree or a
    directory of one (``top``: its ``repository_top``, found here when not given; empty when
    it is none or git fails): a walked checkout gives the files a clone gives."""
    top = top or repository_top(root)
    if top is None:
        return frozenset()
    listed = _git(top, root, "ls-files", "-z", "--others", "--ignored", "--exclude-standard")
    if listed is None:  # its ignored files are read as any other's
        return frozenset()
    return frozenset(os.fsdecode(rel) for rel in listed.split(b"\0") if rel)


def _lost_directories(unreadable: list[tuple[str, Path]], root: Path, top: Path | None,
                      outermost: list[str], nested: tuple[str, ...]) -> list[tuple[str, Path]]:
    """Those of the ``unreadable`` directories whose files a clone would hold: none in a nested
    repository, none that their work tree's git ignores (asked of each outermost work tree)."""
    lost = [(rel, path) for rel, path in unreadable
            if not (nested and f"{rel}/".startswith(nested))]
    for tree in outermost:
        inside = [(rel, path) for rel, path in lost
                  if tree == "" or f"{rel}/".startswith(f"{tree}/")]
        if not inside:
            continue
        where = Path(root, tree)
        relative = [rel.removeprefix(f"{tree}/") if tree else rel for rel, _ in inside]
        listed = _git(top if tree == "" else where, where, "check-ignore", "-z", "--stdin",
                      stdin="\0".join(relative).encode(), ok=(0, 1))
        ignored = {os.fsdecode(rel) for rel in (listed or b"").split(b"\0") if rel}
        dropped = {entry for entry, rel in zip(inside, relative) if rel in ignored}
        lost = [entry for entry in lost if entry not in dropped]
    return lost


def _git(top: Path, where: Path, *args: str, stdin: bytes | None = None,
         ok: tuple[int, ...] = (0,)) -> bytes | None:
    """The output of git ``args`` run in ``where`` (paths relative to it) of the work tree
    ``top``, or None when git fails (a warning names why). No fsmonitor, and safe.directory:
    a checkout another user owns runs no command and is read. The user's global ignore file
    is not read: a directory gives the same files on every machine."""
    cmd = ["git", "-c", "core.fsmonitor=false", "-c", f"safe.directory={top}",
           "-c", f"core.excludesFile={os.devnull}",  # the repository's rules, not the user's
           "-C", str(where), *args]
    try:
        result = subprocess.run(cmd, input=stdin, capture_output=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("%s: git failed (%s); its ignored files are read too", where, error)
        return None
    if result.returncode not in ok:
        log.warning("%s: git could not list the files it ignores (%s); they are read too", where,
                    os.fsdecode(result.stderr).strip().partition("\n")[0])
        return None
    return result.stdout


def source_files(root: Path, extensions: Iterable[str], links_within: Path | None = None
                 ) -> list[Path]:
    """The files of ``root`` that ``walk_source_tree`` keeps, in its order."""
    return [path for _, path, skip in walk_source_tree(root, extensions, links_within)
            if skip is None]


class _Tree(NamedTuple):
    """What a walk of a directory met (``_tree_files``)."""

    files: list[tuple[str, Path]]  # every non-directory entry (relative path, path), sorted
    work_trees: list[str]  # the git work trees' relative paths ("" for the root)
    unreadable: list[tuple[str, Path]]  # the directories that could not be listed
    installed: list[str]  # the THIRD_PARTY_DIRS left out, relative paths


def _tree_files(root: Path) -> _Tree:
    """What is under ``root``: its files, the git work trees met (a submodule's ``.git`` is a
    file), the directories that could not be listed, those of installed code left out."""
    found, work_trees, unreadable, installed = [], [], [], []

    def note(error: OSError) -> None:
        path = Path(error.filename)
        unreadable.append((path.relative_to(root).as_posix(), path))

    for dirpath, dirnames, filenames in os.walk(root, onerror=note):
        if ".git" in dirnames or ".git" in filenames:
            top = Path(dirpath).relative_to(root).as_posix()
            work_trees.append("" if top == "." else top)
        for name in sorted(set(dirnames) & THIRD_PARTY_DIRS):
            installed.append(Path(dirpath, name).relative_to(root).as_posix())
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            found.append((path.relative_to(root).as_posix(), path))
    return _Tree(sorted(found, key=lambda entry: entry[0]), work_trees, sorted(unreadable),
                 installed)


def decode_source(data: bytes | str) -> tuple[str | None, str | None]:
    """(text, None) for source code, else (None, ``binary``/``not_utf8``/``lfs_pointer``)."""
    if (b"\0" if isinstance(data, bytes) else "\0") in data:
        return None, "binary"
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not_utf8"
    if data.startswith(_LFS_POINTER) and len(data.encode("utf-8", "surrogatepass")) < 1024:
        return None, "lfs_pointer"  # under 1,024 bytes, as Git LFS's spec sizes a pointer
    return data, None


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes as UTF-8 (a non-UTF-8 file name holds lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def output_paths(out: str, state: str | None) -> tuple[Path, Path]:
    """The output and its state file (default: OUT.state)."""
    return Path(out), Path(state) if state else Path(out).with_name(Path(out).name + ".state")


def make_record(repo: str, path: str, sha: str, license_id: str | None, stars: int | None,
                text: str) -> dict:
    return dict(zip(RECORD_KEYS, (repo, path, sha, license_id, stars, text)))


def encode_records(records: Iterable[dict]) -> bytes:
    # ASCII-only JSON: no U+2028 or similar inside a line, so any line splitter reads it back.
    return b"".join(json.dumps(r).encode("ascii") + b"\n" for r in records)


# Repositories a summary names (one line each); the rest are counted.
_NAMED_REPOS = 20


@dataclass
class Summary:
    """Kept/skipped counts by reason, printed at the end of a run, then a line for each repo
    worth naming (one left for the next run, one GitHub blocks)."""

    repos: Counter = field(default_factory=Counter)
    files: Counter = field(default_factory=Counter)
    bytes_kept: int = 0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"kept {self.files['kept']} files ({self.bytes_kept / 1e6:.2f} MB)"]
        lines += [f"  {title:5s} {reason:24s} {n}"
                  for title, counts in (("repos", self.repos), ("skipped", self.files))
                  for reason, n in sorted(counts.items()) if reason != "kept"]
        lines += [f"  {note}" for note in self.notes[:_NAMED_REPOS]]
        if len(self.notes) > _NAMED_REPOS:
            lines.append(f"  and {len(self.notes) - _NAMED_REPOS} more repos (the warnings "
                         "above name them)")
        return "\n".join(lines)


# The version of the scraper's state file (its first line: format_version and settings).
STATE_FORMAT_VERSION = 1


class ResumableOutput:
    """Output JSONL plus an append-only state log of finished repos, locked by one run. A repo's
    records are appended and fsynced, then a state line records the repo, the output's length and
    its blob SHAs; on open the output is cut back to the last recorded length, so a run killed at
    any point resumes with no partial or duplicate record."""

    def __init__(self, out: Path, state: Path, settings: dict):
        self.out, self.state = Path(out), Path(state)
        self.done: set[str] = set()
        self.shas: set[str] = set()
        self.end = 0
        self.started = False  # this run made the state file (no run before it)
        try:  # a bad path (a directory, under a file): refused naming the flag (exit status 2)
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._lock()
        except OSError as err:
            raise ValueError(f"--out {self.out}: cannot create it ({err.strerror or err}); "
                             "choose a path in a directory you can write") from None
        try:
            if self.state.exists():
                self._resume(settings)
            elif self.out.stat().st_size > 0:
                raise ValueError(f"{self.out} exists but its state file {self.state} does not; "
                                 "choose another --out or remove the file")
            else:
                process.write_atomic(self.state, json.dumps(
                    {"format_version": STATE_FORMAT_VERSION, "settings": settings}) + "\n")
                self.started = True
        except BaseException:
            self.close()
            raise

    def _lock(self) -> int:
        """Open (creating it empty) and lock the output, which is only ever cut and appended to."""
        fd = process.locked_fd(self.out, os.O_RDWR | os.O_CREAT)
        if fd is None:
            raise ValueError(f"{self.out} is being written by another run (same --out); wait "
                             "for it to end, or choose another --out")
        return fd

    def close(self) -> None:
        """Release the output for the next run (also done by the OS when the process dies)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResumableOutput:
        return self

    def __exit__(self, error_type, *exc) -> None:
        if error_type is not None and self.started and not self.done:  # failed before its
            #   first repo: no output or state is left to hold --out (a retry with other flags)
            self.state.unlink(missing_ok=True)
            self.out.unlink(missing_ok=True)
        self.close()

    @staticmethod
    def read_settings(state: Path) -> dict:
        """The settings a state file was started with, its format_version checked."""
        with open(state, "rb") as f:
            first = f.readline()
        try:
            head = json.loads(first)
            settings, version = head["settings"], head.get("format_version")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{state}:1: not a scraper state file (damaged, or another "
                             "file's): a new --out starts over") from None
        if version != STATE_FORMAT_VERSION:
            raise ValueError(f"{state}: a scraper state of format_version {version}, not "
                             f"{STATE_FORMAT_VERSION}: use a new --out to start over")
        return settings

    def _resume(self, settings: dict) -> None:
        previous = self.read_settings(self.state)
        changed = sorted(k for k in settings.keys() | previous.keys()
                         if settings.get(k) != previous.get(k))
        if changed:
            raise ValueError(
                f"{self.state} was started with other settings (those that differ: "
                f"{', '.join(changed)}); "
                f"use the same flags to resume, or a new --out (or delete {self.state.name} "
                "and the output) to start over")
        lines = self.state.read_bytes().split(b"\n")
        good = len(lines[0]) + 1
        for line in lines[1:-1]:  # the last piece is empty, or a line cut off by a kill
            try:
                entry = json.loads(line)
                repo, end, shas = entry["repo"], int(entry["end"]), entry["shas"]
            except (ValueError, KeyError, TypeError):
                break
            self.done.add(repo)
            self.shas.update(shas)
            self.end = end
            good += len(line) + 1
        size = self.out.stat().st_size
        if size < self.end:
            raise ValueError(
                f"{self.out} is shorter than {self.state} records ({size} < {self.end} "
                "bytes); it was changed outside the scraper. Use a new --out to start over")
        # Cut back only what a killed run left past its last record: a file left as it is keeps
        # its timestamp, which the data caches read (an unchanged output stays unchanged).
        if self.state.stat().st_size != good:
            os.truncate(self.state, good)
        if size != self.end:
            os.truncate(self.out, self.end)

    def commit(self, repo: str, records: list[dict]) -> None:
        data = encode_records(records)
        _append_synced(self.out, data)
        self.end += len(data)
        shas = [r["sha"] for r in records]
        line = json.dumps({"repo": repo, "end": self.end, "shas": shas}) + "\n"
        _append_synced(self.state, line.encode())
        self.done.add(repo)
        self.shas.update(shas)


def _append_synced(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
