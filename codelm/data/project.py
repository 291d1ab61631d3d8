"""The project task's training data (``--task project``): repository-shaped sequences, as
StarCoder2 and Qwen2.5-Coder are pretrained on them, and project-completion examples, as
eval.py's project-completion task prompts them.

A split's code files are grouped by repository (a scraper record's ``repo``, else the source
directory a file's id starts with; a repository's files come one after another in a split). For
each repository:

- its sequence: the repository's opening, then its files in the composer's order for its first
  file (least relevant first, that file last), in the model's repository format
  (codelm.data.composers), cut into block-size pieces trained as text (no prompt, no EOS);
- per file, ``lines_per_file`` lines drawn (seeded; never a file's first line): the composed
  context of the repository's other files and the file's lines before it as the prompt, laid
  out as eval.py's project-completion lays it out, but with the lines before it cut to half the
  room the completion leaves so that the context always has the other half (eval gives them
  all the room they take, as LCA cuts a prompt at its left); the completion a newline, the line
  and the lines
  after it, up to half the example's tokens. eval.py stops a completion at its line's end, so
  the later lines are the repository text after that prompt: each of their tokens is trained,
  where a completion of the line alone would train a few tokens for a whole block's compute."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from codelm.data.composers import RepositoryIndex, Tokenizer, compose
from codelm.data.config import DataConfig
from codelm.data.sources import Doc
from codelm.runtime import process
from codelm.tokenization.batching import MIN_PARALLEL_CHARS, encode_continuation


class Pair(NamedTuple):
    """A supervised example's ids, as dataset.py stores them."""

    prompt: list[int]
    completion: list[int]
    eos_follows: bool  # an EOS is added after the completion
    code_span: tuple[int, int] = (0, 0)  # the prompt's span truncation cuts first
# Units of work a worker gets on average: a large repository's files spread over the workers.
UNITS_PER_WORKER = 4


def repository_name(doc: Doc) -> str:
    """The repository a code file belongs to: its record's, else its id's first part."""
    return doc.repo or doc.id.split("/", 1)[0]


def _path_in(doc: Doc, repo: str) -> str:
    """A file's path inside its repository."""
    return doc.id[len(repo) + 1 :] if doc.id.startswith(repo + "/") else doc.id


def repositories(docs: Sequence[Doc]) -> Iterator[tuple[str, dict[str, str]]]:
    """(name, path -> text) of each run of consecutive code files of one repository."""
    name, files = None, {}
    for doc in docs:
        if doc.target is not None or doc.chat:
            continue
        repo = repository_name(doc)
        if repo != name and files:
            yield name, files
            files = {}
        name = repo
        files[_path_in(doc, repo)] = doc.text
    if files:
        yield name, files


def repository_sequence(index: RepositoryIndex, composer: str, block_size: int) -> list[Pair]:
    """The repository as one text in the composer's order, in pieces of at most ``block_size``
    tokens; where no template start opens a piece, each after the first opens with the last
    token of the one before (as the fim task's plain chunks): every token after the text's
    first is a target once, and every piece has one."""
    if not len(index):
        return []
    anchor = index.paths[0]
    every = compose(index, composer, anchor, index.texts[0], [], 10**12)
    ids = [*every.ids[: len(every.ids) - len(index.opening_ids(anchor))], *index.file_ids(0)]
    lead = 0 if index.tok.template_prefix else 1  # the token a piece repeats from the last
    step = max(1, block_size - lead)
    return [Pair([], ids[start : start + block_size], eos_follows=False)
            for start in range(0, len(ids) - lead, step)]


def completion_pairs(index: RepositoryIndex, composer: str, cfg: DataConfig, room: int,
                     files: range | None = None) -> list[Pair]:
    """``cfg.lines_per_file`` line-completion examples of each file (of ``files``, positions in
    the index's paths; default all), each prompt (context and prefix) within ``room`` tokens
    with its completion (the line and the lines after it, at most half of ``room``); the prefix
    keeps at most half of what the completion leaves."""
    tok = index.tok
    pairs = []
    for i in files if files is not None else range(len(index)):
        path, text = index.paths[i], index.texts[i]
        lines = text.split("\n")
        overhead = index.openings_length(path)
        numbers = [n for n in range(1, len(lines)) if lines[n].strip()]
        rng = random.Random(f"{cfg.seed}\0{index.name}\0{path}")
        for number in sorted(rng.sample(numbers, min(cfg.lines_per_file, len(numbers)))):
            prefix = "\n".join(lines[:number])
            rest = "\n" + "\n".join(lines[number:])
            completion = encode_continuation(tok, rest)[: room // 2]
            budget = room - len(completion)
            prefix_ids = tok.encode(prefix, split_special_tokens=True)
            prefix_ids = prefix_ids[max(0, len(prefix_ids) - budget // 2) :]
            if budget - len(prefix_ids) < overhead:  # no room for the openings: a tiny block
                continue
            composed = compose(index, composer, path, prefix, prefix_ids, budget)
            pairs.append(Pair(composed.ids, completion, eos_follows=False))
    return pairs


@dataclass(frozen=True)
class _Unit:
    """A piece of a split's work: repository ``repository``'s files ``start`` to ``stop`` (in
    its index's path order); the piece that starts at its first file gives its sequence too."""

    repository: int
    start: int
    stop: int


class _ProjectBuild:
    """What every unit reads: the split's repositories, the tokenizer and the options; the
    index of the repository last worked on is kept (a process takes units in their order, so it
    never comes back to a repository it left)."""

    def __init__(self, repositories: list[tuple[str, dict[str, str]]], tok: Tokenizer,
                 cfg: DataConfig, room: int):
        self.repositories = repositories
        self.tok = tok
        self.cfg = cfg
        self.room = room
        self._index: tuple[int, RepositoryIndex] | None = None

    def index(self, repository: int) -> RepositoryIndex:
        if self._index is None or self._index[0] != repository:
            name, files = self.repositories[repository]
            self._index = (repository, RepositoryIndex(name, files, self.tok))
        return self._index[1]

    def pairs(self, unit: _Unit) -> list[Pair]:
        index = self.index(unit.repository)
        composer = self.cfg.project_composer
        pairs = repository_sequence(index, composer, self.room) if unit.start == 0 else []
        files = range(unit.start, unit.stop)
        return pairs + completion_pairs(index, composer, self.cfg, self.room, files)


def _units(repositories: list[tuple[str, dict[str, str]]], workers: int) -> list[_Unit]:
    """Each repository's files in units of at most one ``UNITS_PER_WORKER``-th of a worker's
    share of the split's files: a large repository spreads over the workers."""
    total = sum(len(files) for _, files in repositories)
    size = max(1, math.ceil(total / (workers * UNITS_PER_WORKER)))
    units = []
    for number, (_, files) in enumerate(repositories):
        for start in range(0, len(files), size):
            units.append(_Unit(number, start, min(start + size, len(files))))
    return units


_worker_build: _ProjectBuild | None = None


def _start_worker(build: _ProjectBuild) -> None:
    global _worker_build
    _worker_build = build


def _unit_pairs(unit: _Unit) -> list[Pair]:
    return _worker_build.pairs(unit)


def project_pairs(docs: Sequence[Doc], tok: Tokenizer, cfg: DataConfig, room: int
                  ) -> list[Pair]:
    """The project task's examples of a split's documents: each repository's sequence pieces,
    then its completion examples (``room``: the tokens an example may have). Units of the
    repositories' files run on ``cfg.workers`` processes where the documents are worth it;
    the examples and their order are the same on any number."""
    repositories_found = list(repositories(docs))
    build = _ProjectBuild(repositories_found, tok, cfg, room)
    chars = sum(len(text) for _, files in repositories_found for text in files.values())
    workers = cfg.workers if chars >= MIN_PARALLEL_CHARS else 1
    units = _units(repositories_found, workers)
    workers = min(workers, len(units))
    if workers <= 1:
        return [pair for unit in units for pair in build.pairs(unit)]
    with process.worker_pool(workers, _start_worker, (build,)) as pool:
        pieces = pool.map(_unit_pairs, units, chunksize=1)
        return [pair for piece in pieces for pair in piece]
