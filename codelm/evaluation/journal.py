"""Generations kept on disk as they finish, so an evaluation stopped mid-way (a kill, a crash, a
lost machine) samples on its next run only the prompts it had not finished.

eval.py opens a journal for each model or endpoint it evaluates (``journaled``); the engine's
generations inside it append each finished sequence's new tokens, an endpoint's each problem's
texts, to a file named by a digest of everything that decides them: the model's weights and
dtype (an endpoint's URL and served model), the task, the prompts, the sampling settings and
the seed. Prompt i samples with its own generator (seed + i) in a batch it does not depend on,
so a generation continued from the journal gives the tokens an uninterrupted one gives. A file
of another digest is never read; a torn last line (a kill mid-write) is generated again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from codelm.models.generation import GenerationConfig


@dataclass(frozen=True)
class Journal:
    """Where one model's generations are kept (``directory``), and what names the model there
    (``model_key``: its weights' fingerprint)."""

    directory: Path
    model_key: str


_OPEN: ContextVar[Journal | None] = ContextVar("codelm_generation_journal", default=None)


@contextlib.contextmanager
def journaled(directory: Path, model_key: str) -> Iterator[None]:
    """Keep the engine's generations in ``directory`` while the block runs."""
    token = _OPEN.set(Journal(directory, model_key))
    try:
        yield
    finally:
        _OPEN.reset(token)


def task_file(task: str, decided_by: list) -> Path | None:
    """The file the open journal keeps a task's outputs in, named by a digest of the model and
    ``decided_by`` (JSON: everything else that decides them); None where no journal is open."""
    journal = _OPEN.get()
    if journal is None:
        return None
    digested = json.dumps([journal.model_key, task, *decided_by])
    digest = hashlib.blake2b(digested.encode(), digest_size=12).hexdigest()
    return journal.directory / f"{task}-{digest}.jsonl"


def generation_file(task: str, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                    seed: int, chat: bool) -> Path | None:
    """The file the open journal keeps this generation's sequences in (None: no journal open)."""
    return task_file(task, [chat, seed, gen.max_new_tokens, gen.temperature, gen.top_k,
                            gen.top_p, gen.eos_id, gen.stop, gen.pad_id, list(map(list, prompts))])


def finished(path: Path | None) -> dict[int, Any]:
    """The output kept of each prompt the file holds, by the prompt's index ({} for none)."""
    if path is None or not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a kill cut short
            continue
        done[record["prompt"]] = record["output"]
    return done


def kept_outputs(path: Path | None, total: int, what: str) -> dict[int, Any]:
    """``finished(path)``, said on stderr where the file holds any (``what``: the model's task
    of ``total`` prompts that continues from it)."""
    done = finished(path)
    if done:
        print(f"note: {what}: {len(done)} of {total} prompts' outputs kept in {path}, not "
              "generated again", file=sys.stderr)
    elif path is not None and _others_of_its_task(path):
        print(f"note: {what}: {path.parent} keeps outputs of other settings (another model, "
              "prompt, sampling setting or --limit), not read: all are generated",
              file=sys.stderr)
    return done


def _others_of_its_task(path: Path) -> list[Path]:
    """The journal files beside ``path`` of its task, named by other digests."""
    task = path.name.rsplit("-", 1)[0]
    return [other for other in path.parent.glob(f"{task}-*.jsonl") if other != path]


@contextlib.contextmanager
def appending(path: Path | None) -> Iterator[TextIO | None]:
    """The file opened to append to (None where no journal is open)."""
    if path is None:
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:
        if file.tell() > 0:
            file.seek(file.tell() - 1)
            if file.read(1) != "\n":  # a line a kill cut short: the next starts on its own
                file.write("\n")
        yield file


def keep(file: TextIO | None, prompt: int, output: Any) -> None:
    """Append one prompt's finished output (a sequence's new tokens, an endpoint's texts); on
    its own line, written through to the system at once."""
    if file is None:
        return
    file.write(json.dumps({"prompt": prompt, "output": output}) + "\n")
    file.flush()
