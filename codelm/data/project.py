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

import random
from collections.abc import Iterator, Sequence

from codelm.data.composers import RepositoryIndex, Tokenizer, compose
from codelm.data.config import DataConfig
from codelm.data.sources import Doc
from codelm.tokenization.batching import encode_continuation

# (prompt ids, completion ids, EOS follows, the prompt's span truncation cuts first)
Pair = tuple[list[int], list[int], bool, tuple[int, int]]


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
    """The repository as one text in the composer's order, in block-size pieces."""
    if not len(index):
        return []
    anchor = index.paths[0]
    every = compose(index, composer, anchor, index.texts[0], [], 10**12)
    ids = [*every.ids[: len(every.ids) - len(index.opening_ids(anchor))], *index.file_ids(0)]
    return [([], ids[start : start + block_size], False, (0, 0))
            for start in range(0, len(ids), block_size)]


def completion_pairs(index: RepositoryIndex, composer: str, cfg: DataConfig,
                     room: int) -> list[Pair]:
    """``cfg.lines_per_file`` line-completion examples of each file, each prompt (context and
    prefix) within ``room`` tokens with its completion (the line and the lines after it, at most
    half of ``room``); the prefix keeps at most half of what the completion leaves."""
    tok = index.tok
    pairs = []
    for path, text in zip(index.paths, index.texts):
        lines = text.split("\n")
        overhead = len(index.header_ids()) + len(index.opening_ids(path))
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
            pairs.append((composed.ids, completion, False, (0, 0)))
    return pairs


def project_pairs(docs: Sequence[Doc], tok: Tokenizer, cfg: DataConfig, room: int
                  ) -> list[Pair]:
    """The project task's examples of a split's documents: each repository's sequence pieces,
    then its completion examples (``room``: the tokens an example may have)."""
    pairs: list[Pair] = []
    for name, files in repositories(docs):
        index = RepositoryIndex(name, files, tok)
        pairs += repository_sequence(index, cfg.project_composer, room)
        pairs += completion_pairs(index, cfg.project_composer, cfg, room)
    return pairs
