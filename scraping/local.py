"""Collect source files by extension from local directories or git URLs (shallow-cloned into a
temporary directory). Each source is committed as it finishes, so a stopped run resumes; its
licence is read from its top-level licence file, unless ``--license`` names one."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from codelm.runtime import process
from codelm.runtime.console import progress_bar
from scraping.common import (
    INSTALLED_CODE,
    FileFilter,
    ResumableOutput,
    Summary,
    canonical_license,
    decode_source,
    expand_licenses,
    git_blob_sha,
    is_utf8,
    license_allowed,
    log,
    make_record,
    output_paths,
    redact_url,
    walk_source_tree,
)
from scraping.license_file import detect_license

_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@github.com:owner/repo.git

# Clones in $TMPDIR carry their owner's tag: a run removes those of killed runs, never a live one's.
CLONE_PREFIX = "codelm-clone-"

# The ``license`` a run's settings hold when each source's licence file names it (no --license).
LICENSE_FROM_FILES = "from each source's licence file"


@dataclass
class LocalConfig:
    sources: list[str]  # directories or git URLs to collect from
    out: str  # output JSONL file (a stopped run resumes via OUT.state)
    extensions: list[str] = field(default_factory=lambda: [".py"])  # file extensions to keep
    min_bytes: int = 1  # smallest file kept, in bytes
    max_bytes: int = 1_000_000  # largest file kept, in bytes
    branch: str | None = None  # branch or tag to clone (default: the remote's HEAD)
    license: str | None = None  # SPDX licence id of every source (default: each source's
    #   LICENSE/COPYING file)
    licenses: list[str] | None = field(default=None, metadata={"none_is_a_value": True})
    #   SPDX licence ids to accept, as 'scraping github --licenses' ('permissive', 'none' = no
    #   licence file); default: any
    state: str | None = None  # resume state file (default: OUT.state)
    progress: bool = True  # show progress bars


def is_git_source(source: str) -> bool:
    """Whether ``source`` is cloned rather than walked: a URL, ``user@host:path``, or a bare
    repository on disk (the one rule of every caller)."""
    if "://" in source or _SCP_LIKE.match(source):
        return True
    p = Path(source)  # a bare repository on disk is cloned, not walked
    return p.is_dir() and (p / "HEAD").is_file() and (p / "objects").is_dir()


# A clone's checkout writes each file as its blob holds it: no end-of-line conversion, $Id$
# expansion, filter (Git LFS's smudge) or re-encoding that the repository's .gitattributes or
# the user's git config asks for ($GIT_DIR/info/attributes outranks .gitattributes).
_BLOB_BYTES_ATTRIBUTES = "* -text -eol -ident -filter -working-tree-encoding\n"


def shallow_clone(url: str, dest: Path, branch: str | None = None) -> None:
    """``git clone --depth 1`` whose files are their blobs' bytes (as GitHub serves them); a
    failure is a ValueError carrying git's own message."""
    template = dest.with_name(dest.name + ".template")  # copied into the clone's .git
    (template / "info").mkdir(parents=True, exist_ok=True)
    (template / "info" / "attributes").write_text(_BLOB_BYTES_ATTRIBUTES)
    cmd = ["git", "clone", "--quiet", "--depth", "1", "--single-branch", "--template",
           str(template)]
    if branch:
        cmd += ["--branch", branch]
    if "://" not in url and not _SCP_LIKE.match(url):
        url = Path(url).resolve().as_uri()  # file:// so --depth applies to local repos too
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    result = subprocess.run(cmd + ["--", url, str(dest)], capture_output=True, text=True, env=env,
                            timeout=3600)  # no git installed: an OSError naming it
    if result.returncode != 0:  # git's first line says why; the rest is its advice
        lines = [line for line in result.stderr.splitlines() if line.strip()] or ["no message"]
        why = lines[0].replace(url, redact_url(url))
        raise ValueError(f"git clone {redact_url(url)} failed: {why}; check the URL and access "
                         "to it, or name a checkout's directory")


def collect_directory(root: Path, repo: str, file_filter: FileFilter, license_id: str | None,
                      summary: Summary, seen: set[str], progress: bool = True) -> list[dict]:
    """Records for every wanted file under ``root``; ``seen`` holds blob SHAs already kept."""
    records = []
    installed = []  # the directories of installed code left out
    tree = list(walk_source_tree(root, file_filter.extensions))
    for rel, path, reason in progress_bar(tree, desc=repo[-40:], unit="file", enabled=progress):
        if not is_utf8(rel):
            summary.files["not_utf8_name"] += 1
            continue
        if reason == INSTALLED_CODE:  # no file: said below where the source gave none
            installed.append(rel)
            continue
        try:
            reason = reason or file_filter.reject_reason(rel, path.stat().st_size)
            data = b"" if reason else path.read_bytes()
            reason = reason or file_filter.reject_reason(rel, len(data))  # the bytes kept
        except OSError as e:
            log.warning("%s: cannot read it (%s); left out", path, e.strerror or e)
            reason = "unreadable"
        if reason:
            summary.files[reason] += 1
            continue
        text, reason = decode_source(data)
        sha = git_blob_sha(data)
        if text is not None and sha in seen:
            text, reason = None, "duplicate_sha"
        if text is None:
            summary.files[reason] += 1
            continue
        seen.add(sha)
        records.append(make_record(repo, rel, sha, license_id, None, text))
        summary.files["kept"] += 1
        summary.bytes_kept += len(data)
    if installed and not records:
        _say_installed_code(root, installed)
    return records


def _say_installed_code(root: Path, installed: list[str]) -> None:
    """Why a source that holds installed third-party code (``installed``: its directories)
    gave no file, and how to collect a package of it."""
    shown = ", ".join(installed[:3]) + (", ..." if len(installed) > 3 else "")
    log.warning("%s: no file kept; installed third-party code is left out (%s): to collect a "
                "package of it, name the package's own directory as a source (%s/NAME)", root,
                shown, root / installed[0])


def repository_of_url(url: str) -> str:
    """The ``repo`` of a git URL's records (``url`` without credentials): its path on the host
    without ``.git`` (``owner/name``, as the GitHub scraper names a repository); a ``file://``
    URL whole, the one name of a repository on this machine."""
    if url.startswith("file:"):
        return url
    if _SCP_LIKE.match(url):  # git@github.com:owner/name.git
        path = url.split(":", 1)[1]
    else:
        path = urlsplit(url).path
    return path.strip("/").removesuffix(".git").strip("/")


def _recorded_repo(key: str) -> str:
    """The ``repo`` of the records of the source finished under ``key`` (a ``Source.key``)."""
    if "://" in key or _SCP_LIKE.match(key):
        return repository_of_url(key)
    return Path(key).name


class Source(NamedTuple):
    """A source of the command line, checked: the key its finished state is recorded under,
    the ``repo`` of its records, and its directory (None: a git URL or bare repository, cloned)."""

    given: str
    key: str
    repo: str
    root: Path | None


def _source(source: str) -> Source:
    """``source`` checked, with its key and repository name."""
    if "://" in source or _SCP_LIKE.match(source):
        key = redact_url(source)
        return Source(source, key, repository_of_url(key), None)
    if is_git_source(source):  # a bare repository on disk: one key however its path is spelled
        key = Path(source).resolve().as_uri()
        return Source(source, key, repository_of_url(key), None)
    if not Path(source).is_dir():
        raise ValueError(f"{source}: not a directory or a git URL: give a directory of code, a "
                         "git checkout or a repository's URL")
    root = Path(source).resolve()
    if not is_utf8(root.name):
        raise ValueError(f"{source!r}: the directory name, which names the repo of its records, "
                         "is not valid UTF-8; rename it")
    return Source(source, str(root), root.name, root)


def _refuse_names_collected_before(sources: list[Source], done: set[str], out: Path) -> None:
    """Refuse a source whose repository name a source finished into ``out`` under another key
    already holds: their records would be read as one repository."""
    earlier = {_recorded_repo(key): key for key in done}
    for source in sources:
        key = earlier.get(source.repo)
        if key is not None and source.key not in done:
            raise ValueError(f"{source.given} is repository {source.repo!r}, as {key} "
                             f"collected into {out} before (a directory's name, a URL's path), "
                             "so the two would be read as one; collect it into another --out")


def collect_local(cfg: LocalConfig) -> Summary:
    """Append every wanted file of every source to ``cfg.out``, one source at a time (sources a
    stopped run with the same filters finished are skipped); returns the counts."""
    if not cfg.sources:
        raise ValueError("give at least one directory or git URL to collect from")
    file_filter = FileFilter(cfg.extensions, cfg.min_bytes, cfg.max_bytes)
    license_id = canonical_license(cfg.license)
    allowed = expand_licenses(cfg.licenses)
    if license_id is not None and not license_allowed(license_id, allowed):
        raise ValueError(f"--license {license_id} is not one of --licenses: every source "
                         "would be skipped")
    out, state = output_paths(cfg.out, cfg.state)
    sources = [_source(source) for source in cfg.sources]  # all checked up front
    names = [source.repo for source in sources]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        named = [source for source in sources if source.repo == twice[0]]
        rename = ", or rename a directory" if any(s.root is not None for s in named) else ""
        raise ValueError(f"{named[0].given} and {named[1].given} are both repository "
                         f"{twice[0]!r} (a directory's name, a URL's path), so the two would be "
                         f"read as one; collect them apart (another --out){rename}")
    settings = {"extensions": list(file_filter.extensions), "min_bytes": cfg.min_bytes,
                "max_bytes": cfg.max_bytes, "branch": cfg.branch,
                "license": license_id or LICENSE_FROM_FILES,
                "licenses": sorted(allowed) if allowed is not None else None}
    summary = Summary()
    process.remove_dead_owners(tempfile.gettempdir(), CLONE_PREFIX)
    with ResumableOutput(out, state, settings) as store:
        _refuse_names_collected_before(sources, store.done, out)

        def read_source(root: Path, repo: str) -> tuple[str, list[dict]]:
            """(how the source ends, its records): ``license`` when outside --licenses."""
            source_license = license_id or detect_license(root)
            if not license_allowed(source_license, allowed):
                return "license", []
            return "collected", collect_directory(root, repo, file_filter, source_license,
                                                  summary, store.shas, cfg.progress)

        for source in sources:
            if source.key in store.done:
                summary.repos["already_done"] += 1
                continue
            if source.root is None:
                # cleanup errors ignored: git's children may still write after an interrupt
                with tempfile.TemporaryDirectory(prefix=CLONE_PREFIX + process.owner_tag(),
                                                 ignore_cleanup_errors=True) as tmp:
                    shallow_clone(source.given, Path(tmp) / "repo", cfg.branch)
                    how, records = read_source(Path(tmp) / "repo", source.repo)
            else:
                how, records = read_source(source.root, source.repo)
            store.commit(source.key, records)
            summary.repos[how] += 1
    return summary
