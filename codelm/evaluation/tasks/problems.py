"""A benchmark's problems file: the ``--problems`` entry that names it (TASK=PATH or PATH), the
file a source resolves to (a directory or Hugging Face dataset id: the split in it), and its
records read (JSONL, compressed or not, or parquet), each with where it is."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from codelm.data.sources import json_object, jsonl_lines
from codelm.runtime import hub, settings


class ProblemsEntry(NamedTuple):
    """One ``--problems`` entry: TASK=PATH, or a bare PATH (``task`` None)."""

    task: str | None
    path: str


_TASK_NAME = re.compile(r"[a-z][a-z0-9-]*")  # what reads as TASK in TASK=PATH, not a path


def problems_entry(entry: str) -> ProblemsEntry:
    """``entry`` read: TASK=PATH where the part before the first '=' is a task-like name (no
    '/', '.' or capital), else a bare PATH (``dir/a=b.jsonl``)."""
    task, sep, path = entry.partition("=")
    if sep and _TASK_NAME.fullmatch(task):
        return ProblemsEntry(task, path)
    return ProblemsEntry(None, entry)


def problem_file(source: str | Path, split_files: Sequence[str], task: str) -> Path:
    """Where ``task`` reads its problems from: ``source``, or, for a directory or a Hugging
    Face dataset id (from the hub cache), the split in it (``split_files``: where a dataset
    snapshot holds it, first match first): its file, or the directory where the split is
    several shards (``problem_records`` reads them all, in order). A leading ``~`` is the home
    directory (TASK=~/PATH: no shell expands it), as in --models LABEL=~/DIR."""
    path = Path(source).expanduser()
    if not path.exists() and hub.is_hub_id(str(path)):
        path = hub.checkpoint_dir(str(path), f"{task}'s problems (--problems {task}=PATH):",
                                  repo_type="dataset",
                                  local="a local JSONL or parquet file of its records (their "
                                  "fields: docs/contracts.md) or a dataset's directory")
    if path.is_dir():
        shards = split_shards(path, split_files)
        return shards[0] if len(shards) == 1 else path
    return path


def split_shards(directory: Path, split_files: Sequence[str]) -> list[Path]:
    """The files of the split in a dataset snapshot ``directory``, in order: those of the first
    of ``split_files`` that matches any."""
    found = next((sorted(directory.glob(p)) for p in split_files if any(directory.glob(p))), [])
    if not found:
        raise ValueError(f"{directory}: a directory without {' or '.join(split_files)} (the "
                         "split of a dataset snapshot the task reads)")
    return found


def problem_records(path: str | Path, split_files: Sequence[str], task: str
                    ) -> list[tuple[str, dict]]:
    """("file:line" or "file: row N", record) of a JSONL file (gzip, bz2 or xz compressed or
    not), a parquet file, or a directory or Hugging Face dataset id holding the split
    (``problem_file``); a file that does not read is one line naming it."""
    path = problem_file(path, split_files, task)
    shards = split_shards(path, split_files) if path.is_dir() else [path]
    records = []
    for shard in shards:
        records += _file_records(shard)
    return records


def record_id(record: dict, key: str, where: str) -> str:
    """A record's ``key`` as its id (0 included), or ``where`` it is in its file where it has
    none (absent, null or empty)."""
    value = record.get(key)
    return where if value is None or value == "" else str(value)


def _file_records(path: Path) -> list[tuple[str, dict]]:
    """("file:line" or "file: row N", record) of one JSONL or parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with settings.reading(path, "problems file"):
            rows = pq.read_table(path).to_pylist()
        return [(f"{path}: row {i}", row) for i, row in enumerate(rows, start=1)]
    return [(where, json_object(raw, where))
            for _, where, raw in jsonl_lines(path, "problems file")]
