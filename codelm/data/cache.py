"""The data cache: entry keys (``hash_json``), publishing an entry whole
(``publish_cache_entry``), the shards of an entry under way (``building``) and what killed
builds leave behind (``sweep_cache``), and a full disk named."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from codelm.runtime import process


def hash_json(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


# A build keeps its shards beside its cache entry ENTRY, in ``ENTRY.shards``, until ENTRY is
# published; then they are garbage. Publishing and removing them are two steps, and a kill
# between them leaves the shards for the next lookup of the cache (``sweep_cache``) to remove.
_SHARDS_OF = re.compile(r"(?P<entry>[a-z]+-[0-9a-f]{24})\.shards")
# A process building ENTRY marks it with an empty file named as its temporaries are
# (``.ENTRY.shards.tmp-<owner tag>building-...``): a later writer removes it once that process
# has died, and until then no other process removes the shards.
_BUILDING = "building-"
# An unfinished build's shards no build has added to for this long are removed: nothing asks
# for its key any more (the sources or options changed), or its continuation is that far off.
SHARDS_KEPT_DAYS = 7


def shards_dir(entry: Path) -> Path:
    """Where the build of the cache entry ``entry`` keeps its shards until it is published."""
    return entry.with_name(f"{entry.name}.shards")


@contextlib.contextmanager
def building(entry: Path, fresh: bool, final_errors: tuple[type[Exception], ...] = ()
             ) -> Iterator[Path]:
    """Within: this process builds the cache entry ``entry`` through its shards directory
    (yielded; ``fresh``: an earlier build's shards removed first, unless another live process
    builds them now: its shards are of the same inputs), marked as under way. Once
    the body has published the entry its shards go, unless another live process builds it too
    (which removes them when done); an interrupted body keeps them for the next build, one
    stopped by ``final_errors`` (the inputs' own: the same inputs fail the same way) does not."""
    marker = process.partial_path(shards_dir(entry), "tmp", _BUILDING + os.urandom(4).hex())
    with cache_writes(entry):
        entry.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    try:
        if fresh and not _builders(entry, besides=marker):  # never a live build's shards
            remove_shards(entry)
        yield shards_dir(entry)
        if not _builders(entry, besides=marker):
            remove_shards(entry)
    except final_errors:  # no build continues these shards
        if not _builders(entry, besides=marker):
            remove_shards(entry)
        raise
    finally:
        marker.unlink(missing_ok=True)


def _builders(entry: Path, besides: Path | None = None) -> list[Path]:
    """The markers (``building``) of the processes building ``entry`` that have not died, but
    ``besides``."""
    pattern = re.compile(re.escape(f".{shards_dir(entry).name}.tmp-") + process.OWNER_PATTERN
                         + _BUILDING)
    try:
        entries = list(entry.parent.iterdir())
    except OSError:  # no cache: no builder
        return []
    building = []
    for path in entries:
        match = pattern.match(path.name)
        if path != besides and match and not process.owner_is_dead(match):
            building.append(path)
    return building


def remove_shards(entry: Path) -> None:
    """Remove the shards of ``entry``'s build: renamed aside first to a name tagged with this
    process (``process.partial_path``), so they go whole for any other process, and a kill
    while deleting leaves a temporary that later writers remove."""
    work = shards_dir(entry)
    aside = process.partial_path(work, "tmp", os.urandom(4).hex())
    try:
        os.rename(work, aside)
    except OSError:  # none, another process removed them first, or a read-only cache
        return
    shutil.rmtree(aside, ignore_errors=True)


def sweep_cache(cache_dir: str | Path) -> None:
    """Remove what killed builds left in the data cache: the temporaries and markers of dead
    writers, and the shards that no live process builds of every published entry, and of an
    entry not published whose shards no build has added to for SHARDS_KEPT_DAYS (its inputs or
    options changed since, so its key is no longer asked for). Other shards of an entry not
    published are kept: its next build continues after them."""
    process.recover_partial_writes(cache_dir)
    try:
        names = [path.name for path in Path(cache_dir).iterdir()]
    except OSError:  # no cache yet, or unreadable: nothing to sweep
        return
    for name in names:
        match = _SHARDS_OF.fullmatch(name)
        if match is None:
            continue
        entry = Path(cache_dir) / match["entry"]
        if not (entry.is_dir() or _untouched_for(shards_dir(entry), SHARDS_KEPT_DAYS)):
            continue
        if not _builders(entry):
            remove_shards(entry)


def _untouched_for(directory: Path, days: float) -> bool:
    """Whether nothing in ``directory`` (its newest file, or itself) changed for ``days``."""
    try:
        newest = max([directory.stat().st_mtime,
                      *(path.stat().st_mtime for path in directory.iterdir())])
    except OSError:  # gone meanwhile
        return False
    return time.time() - newest > days * 86400


def publish_cache_entry(final: Path, build: Callable[[Path], object], replace: bool = False,
                        marker: str | None = None) -> None:
    """Build the cache entry ``final`` with ``process.write_dir_atomically``, its files' sizes
    and digests in its manifest; a full disk names the cache directory. Without ``replace`` the
    first complete build stays (another process may be reading it), unless the entry there as
    the build starts is broken (``entry_problem`` of its ``marker`` file)."""

    def build_recorded(tmp: Path) -> None:
        build(tmp)
        process.write_manifest(tmp)

    if marker is not None and final.exists() and entry_problem(final, marker) is not None:
        replace = True
    with cache_writes(final):
        process.write_dir_atomically(final, build_recorded, replace=replace)


def entry_problem(entry: Path, marker: str) -> str | None:
    """Why the published cache entry ``entry`` (its ``marker`` file written last) cannot be
    read as it is (a file missing or not the size its manifest recorded), or None."""
    if not (entry / marker).exists():
        return f"no {marker}"
    return process.manifest_problem(entry, sizes_only=True)


def usable_entry(entry: Path, marker: str) -> bool:
    """Whether the cache entry ``entry`` is there and readable (``entry_problem``); one cut
    short or missing a file (a disk that filled, a hand edit) is said, and built again."""
    if not entry.exists():
        return False
    problem = entry_problem(entry, marker)
    if problem is not None:
        print(f"note: data cache entry {entry}: {problem}; it is built again", file=sys.stderr)
    return problem is None


@contextlib.contextmanager
def cache_writes(entry: Path) -> Iterator[None]:
    """Within: an OSError of a full disk (or without a file name) while writing ``entry`` of the
    cache names the cache directory, and how to move it."""
    try:
        yield
    except OSError as err:
        full = process.is_disk_full(err)
        if err.filename is not None and not full:
            raise
        advice = (": free space, or move the data cache with CODELM_CACHE=DIR (or the cache_dir "
                  "data option)") if full else ""
        raise OSError(err.errno, f"{err.strerror or err} while writing {entry.name} there; "
                      f"nothing half-built was kept{advice}", str(entry.parent)) from None


def make_cache_dir(cache_dir: str, option: str | None) -> None:
    """Create the data cache directory, or say why naming where it was set: ``option`` (the flag
    or key), else ``CODELM_CACHE`` or its default."""
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if option is not None:
            raise ValueError(f"{option} {cache_dir}: cannot create it ({err.strerror})") from None
        origin = (f"CODELM_CACHE={os.environ['CODELM_CACHE']} puts it there; point CODELM_CACHE"
                  if os.environ.get("CODELM_CACHE") else "set CODELM_CACHE")
        raise ValueError(f"{cache_dir}: cannot create the data cache ({err.strerror}); {origin} "
                         "to a writable directory (or set data_options.cache_dir)") from None
