"""Generations kept on disk as they finish, so an evaluation stopped mid-way (a kill, a crash, a
lost machine) samples on its next run only the prompts it had not finished.

eval.py opens a journal for each model it evaluates (``journaled``); the engine's generations
inside it append each finished sequence's new tokens to a file named by a digest of everything
that decides them: the model's weights, the task, the prompts' ids, the sampling settings and
the seed. Prompt i samples with its own generator (seed + i) in a batch it does not depend on,
so a generation continued from the journal gives the tokens an uninterrupted one gives. A file
of another digest is never read; a torn last line (a kill mid-write) is generated again."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

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


def generation_file(task: str, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                    seed: int, chat: bool) -> Path | None:
    """The file the open journal keeps this generation's sequences in (None: no journal open)."""
    journal = _OPEN.get()
    if journal is None:
        return None
    decided_by = [journal.model_key, task, chat, seed, gen.max_new_tokens, gen.temperature,
                  gen.top_k, gen.top_p, gen.eos_id, gen.stop, gen.pad_id, list(map(list, prompts))]
    digest = hashlib.blake2b(json.dumps(decided_by).encode(), digest_size=12).hexdigest()
    return journal.directory / f"{task}-{digest}.jsonl"


def finished(path: Path | None) -> dict[int, list[int]]:
    """The new tokens of each prompt the file holds, by the prompt's index ({} for none)."""
    if path is None or not path.is_file():
        return {}
    done = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line a kill cut short
            continue
        done[record["prompt"]] = record["new_ids"]
    return done


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


def keep(file: TextIO | None, prompt: int, new_ids: list[int]) -> None:
    """Append one finished sequence; on its own line, written through to the system at once."""
    if file is None:
        return
    file.write(json.dumps({"prompt": prompt, "new_ids": new_ids}) + "\n")
    file.flush()
