"""Generations kept on disk as they finish, so an evaluation stopped mid-way (a kill, a crash, a
lost machine) samples on its next run only the prompts it had not finished.

eval.py opens a journal for each model or endpoint it evaluates (``journaled``); the engine's
generations inside it append each finished sequence's new tokens, an endpoint's each problem's
texts, to a file named by a digest of everything that decides them: the model's weights and
dtype (an endpoint's URL and served model), the task, the prompts, the sampling settings and
the seed. Prompt i samples with its own generator (seeded ``seed_of_sample``) in a batch it
does not depend on, so a generation continued from the journal gives the tokens an
uninterrupted one gives. A file of another digest is never read (its first line, the settings
that named it, says which of them differ); a torn last line (a kill mid-write) is generated
again."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from codelm.models.generation import SEED_SPREAD, GenerationConfig


class JournalFile(NamedTuple):
    """A task's outputs kept in the open journal: the file, and the settings that name it (its
    first line), each a short JSON value."""

    path: Path
    settings: dict[str, Any]


@dataclass(frozen=True)
class Journal:
    """Where one model's generations are kept (``directory``), and what names the model there
    (``model_key``: its weights' fingerprint)."""

    directory: Path
    model_key: str
    used: set[Path] = field(default_factory=set)  # the files this evaluation's tasks named


_OPEN: ContextVar[Journal | None] = ContextVar("codelm_generation_journal", default=None)


@contextlib.contextmanager
def journaled(directory: Path, model_key: str) -> Iterator[None]:
    """Keep the engine's generations in ``directory`` while the block runs."""
    token = _OPEN.set(Journal(directory, model_key))
    try:
        yield
    finally:
        _OPEN.reset(token)


def digest(value: object) -> str:
    """A short digest of a JSON value (prompts, a journal's settings)."""
    return hashlib.blake2b(json.dumps(value).encode(), digest_size=12).hexdigest()


def task_file(task: str, decided_by: dict[str, Any]) -> JournalFile | None:
    """The file the open journal keeps a task's outputs in, named by a digest of the model and
    ``decided_by`` (everything else that decides them, by the names a note shows: short JSON
    values, a long one as its ``digest``); None where no journal is open."""
    journal = _OPEN.get()
    if journal is None:
        return None
    settings = {"model": journal.model_key, "task": task, **decided_by}
    path = journal.directory / f"{task}-{digest(settings)}.jsonl"
    journal.used.add(path)
    return JournalFile(path, settings)


def generation_file(task: str, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
                    seed: int, chat: bool) -> JournalFile | None:
    """The file the open journal keeps this generation's sequences in (None: no journal open)."""
    return task_file(task, {
        "prompts": digest(list(map(list, prompts))), "chat": chat, "seed": seed,
        "seed_spread": SEED_SPREAD,
        "max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature, "top_k": gen.top_k,
        "top_p": gen.top_p, "eos_id": gen.eos_id, "stop": gen.stop, "pad_id": gen.pad_id})


def _records(path: Path) -> Iterator[dict]:
    """The JSON lines of a journal file, less a line a kill cut short."""
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue


def finished(kept_in: JournalFile | None) -> dict[int, Any]:
    """The output kept of each prompt the file holds, by the prompt's index ({} for none)."""
    if kept_in is None or not kept_in.path.is_file():
        return {}
    return {record["prompt"]: record["output"] for record in _records(kept_in.path)
            if "prompt" in record}


def kept_outputs(kept_in: JournalFile | None, total: int, what: str) -> dict[int, Any]:
    """``finished(kept_in)``, said on stderr where the file holds any (``what``: the model's
    task of ``total`` prompts that continues from it); where it holds none but the journal
    keeps the task's outputs of other settings, which of them differ."""
    done = finished(kept_in)
    if done:
        print(f"note: {what}: {len(done)} of {total} prompts' outputs kept in {kept_in.path}, "
              "not generated again", file=sys.stderr)
    elif kept_in is not None and (differ := _other_settings(kept_in)):
        print(f"note: {what}: {kept_in.path.parent} keeps outputs of other settings ({differ}), "
              "not read: all are generated", file=sys.stderr)
    return done


# what a differing setting is called in a note, where its name alone says too little
_SETTING_WORDS = {"model": "another model's weights, dtype or device",
                  "prompts": "other prompts: another --limit, --problems, data or block size",
                  "weights": "another served model's weights"}


def _other_settings(kept_in: JournalFile) -> str:
    """The settings that differ from ``kept_in``'s in the newest other journal file of its task
    that no task of this evaluation names ("" for none): "seed 0, now 7"."""
    task = kept_in.settings["task"]
    journal = _OPEN.get()
    used = journal.used if journal is not None else {kept_in.path}
    others = [other for other in kept_in.path.parent.glob(f"{task}-*.jsonl")
              if other.name.rsplit("-", 1)[0] == task and other not in used]
    if not others:
        return ""
    newest = max(others, key=lambda other: other.stat().st_mtime_ns)
    header = next(_records(newest), {})
    settings = header.get("settings", {})
    differ = []
    for name, value in kept_in.settings.items():
        if name not in settings or settings[name] == value:
            continue
        if name in _SETTING_WORDS:
            differ.append(_SETTING_WORDS[name])
        else:
            differ.append(f"{name} {json.dumps(settings[name])}, now {json.dumps(value)}")
    return "; ".join(differ) or "another model, prompt or sampling setting"


@contextlib.contextmanager
def appending(kept_in: JournalFile | None) -> Iterator[TextIO | None]:
    """The file opened to append to, its first line the settings that name it (None where no
    journal is open)."""
    if kept_in is None:
        yield None
        return
    kept_in.path.parent.mkdir(parents=True, exist_ok=True)
    with kept_in.path.open("a+") as file:
        if file.tell() == 0:
            file.write(json.dumps({"settings": kept_in.settings}) + "\n")
        else:
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
