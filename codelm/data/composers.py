"""Project context for code completion, as Long Code Arena's project-level completion composes it:
files of the repository snapshot before the completion file, least relevant first, so that the
most relevant file sits nearest the completion point, within a token budget.

``RepositoryIndex`` is built once per snapshot (paths, identifiers, the import graph's module
names; a file's tokens are encoded the first time a context takes it). A composer ranks the
snapshot's files for one completion file, most relevant first (``COMPOSERS``): ``empty`` (no
project context: the file's prefix alone, LCA's zero-context baseline), ``path_distance`` (LCA's
path distance), ``imports`` (the files the prefix imports: Python's modules, Kotlin's and Java's
declarations; then its directory's, then the rest by path distance) and ``bm25`` (Okapi BM25, Lucene's form, over identifiers, the prefix's as the
query). ``compose`` fills the budget in the model's repository format (``repo_format``): its
``<repo_name>`` / ``<file_sep>`` tokens where the tokenizer has them (StarCoder2's, Qwen2.5-
Coder's spellings), a path comment before each file otherwise. The completion file itself never
enters its context: a composer sees the snapshot and the prefix, nothing after it."""

from __future__ import annotations

import keyword
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from codelm.data import history
from codelm.tokenization.source import line_comment
from tokenizer import Tokenizer

# Each family's spelling of its repository tokens (repository name, file separator): StarCoder2
# writes <repo_name>NAME<file_sep>PATH\nCODE..., Qwen2.5-Coder puts a newline after the name
# and after each file.
REPO_TOKENS = (("<repo_name>", "<file_sep>", ""), ("<|repo_name|>", "<|file_sep|>", "\n"))
BM25_K1 = 1.2  # Lucene's defaults (BM25Similarity)
BM25_B = 0.75

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Python's keywords; its soft keywords (match, case, type, _) are names in most code, and which
# words are soft keywords depends on the Python version (type from 3.12): they stay terms.
_KEYWORDS = frozenset(keyword.kwlist)
# from SOURCE import NAMES (a parenthesized list may span lines), or import MODULES
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+"
                     r"(?:\(([^)]*)\)?|([\w., \t]*))|import[ \t]+([\w., \t]+))", re.M)
# Kotlin and Java: a file's package, and its imports (import a.b.C, a.b.*, a.b.f as g, a comment
# after it; Java's import static a.B.m), a line ending in LF or CRLF
JVM_EXTENSIONS = (".kt", ".kts", ".java")
_PACKAGE = re.compile(r"^[ \t]*package[ \t]+([\w.]+)", re.M)
_JVM_IMPORT = re.compile(r"^[ \t]*import[ \t]+(?:static[ \t]+)?([\w.]+?)(?:\.\*)?[ \t]*"
                         r"(?:;|\r?$|as[ \t]|//|/\*)", re.M)

def identifiers(text: str) -> list[str]:
    """The identifiers of a text (keywords left out): the terms BM25 matches on."""
    return [word for word in _IDENTIFIER.findall(text) if word not in _KEYWORDS]


@dataclass(frozen=True)
class RepoFormat:
    """How a repository is written for a model: its repository tokens' ids (None: a path
    comment before each file), and the text after a repository's name and after a file."""

    repo_id: int | None
    file_id: int | None
    after: str = ""  # after the repository's name and after each file's code

    @property
    def tokens(self) -> bool:
        return self.repo_id is not None


def repo_format(tok: Tokenizer) -> RepoFormat:
    """The tokenizer's repository tokens (REPO_TOKENS, the first family it holds both of), else
    the path-comment format."""
    for repo, file, after in REPO_TOKENS:
        repo_id, file_id = _special_id(tok, repo), _special_id(tok, file)
        if repo_id is not None and file_id is not None:
            return RepoFormat(repo_id, file_id, after)
    return RepoFormat(None, None, "\n")


def _special_id(tok: Tokenizer, token: str) -> int | None:
    """The id of ``token`` where the tokenizer holds it as a special token."""
    i = tok.token_to_id(token)
    return i if i is not None and tok.is_special(i) else None


def _encode(tok: Tokenizer, text: str) -> list[int]:
    """A text's ids as data building encodes a document (a special token's text is text)."""
    return tok.encode(text, split_special_tokens=True)


@dataclass
class IndexCache:
    """What the indexes of one repository's snapshots share, by a file's path and text (the
    files two snapshots have in common are read once): its ids in the repository format, and
    its identifiers' counts."""

    ids: dict[str, list[int]] = field(default_factory=dict)
    terms: dict[str, Counter] = field(default_factory=dict)


class RepositoryIndex:
    """What composing reads of one repository snapshot (path -> text), built once: its paths
    and their directories, each file's identifiers for BM25, the module names its Python files
    answer to, and each file's ids in the repository format (encoded when a context first takes
    it); the path distances from the last completion file composed for."""

    def __init__(self, name: str, files: Mapping[str, str], tok: Tokenizer,
                 cache: IndexCache | None = None):
        self.name = name
        self.tok = tok
        self.format = repo_format(tok)
        self.paths = sorted(files)
        self.texts = [files[p] for p in self.paths]
        self.position = {p: i for i, p in enumerate(self.paths)}
        self.directories = [posixpath.dirname(p) for p in self.paths]
        self.cache = cache if cache is not None else IndexCache()
        self._distances: tuple[str | None, list[int]] = (None, [])  # the last completion path's
        self._bm25 = _Bm25([self._terms(path, text) for path, text in zip(self.paths, self.texts)])
        comments = Counter(line_comment(path) for path in self.paths)  # its files' own, the most
        self.comment = comments.most_common(1)[0][0] if comments else "#"
        self.modules: dict[str, list[int]] = {}  # Python's dotted module names
        self.jvm_names: dict[str, list[int]] = {}  # Kotlin's and Java's qualified names
        for i, (path, text) in enumerate(zip(self.paths, self.texts)):
            for module in _module_names(path):
                self.modules.setdefault(module, []).append(i)
            for name in _jvm_names(path, text):
                self.jvm_names.setdefault(name, []).append(i)

    def __len__(self) -> int:
        return len(self.paths)

    def distances(self, path: str) -> list[int]:
        """Each file's ``path_distance`` from ``path``, kept for the next call: a completion
        file's lines are composed one after another."""
        if self._distances[0] != path:
            self._distances = (path, [path_distance(path, other) for other in self.paths])
        return self._distances[1]

    def _terms(self, path: str, text: str) -> Counter:
        """A file's identifiers counted (BM25's terms and frequencies), once per path and text."""
        key = f"{path}\0{text}"
        terms = self.cache.terms.get(key)
        if terms is None:
            terms = Counter(identifiers(text))
            self.cache.terms[key] = terms
        return terms

    def header_ids(self) -> list[int]:
        """The ids that open a repository: its name after the repository token, or a comment."""
        fmt = self.format
        if fmt.tokens:
            return [fmt.repo_id, *_encode(self.tok, self.name + fmt.after)]
        return _encode(self.tok, f"{self.comment} repository: {self.name}\n")

    def _opened(self, path: str, text: str) -> list[int]:
        """A file's separator token, then its path line and ``text`` encoded as one text (a
        path comment in the plain format)."""
        fmt = self.format
        if fmt.tokens:
            return [fmt.file_id, *_encode(self.tok, f"{path}\n{text}")]
        return _encode(self.tok, f"{line_comment(path)} {path}\n{text}")

    def openings_length(self, path: str) -> int:
        """The tokens before a completion file's code: the repository's opening and the
        file's."""
        return len(self.header_ids()) + len(self.opening_ids(path))

    def opening_ids(self, path: str) -> list[int]:
        """The ids before a file's code: the file separator and its path, or a path comment."""
        return self._opened(path, "")

    def file_ids(self, i: int) -> list[int]:
        """File ``i`` in the repository format: its opening, its code, what follows a file."""
        path, text = self.paths[i], self.texts[i]
        key = f"{path}\0{text}"
        ids = self.cache.ids.get(key)
        if ids is None:
            after = self.format.after
            ids = self._opened(path, text + (after if not text.endswith(after) else ""))
            self.cache.ids[key] = ids
        return ids

    def bm25_scores(self, query: Sequence[str]) -> np.ndarray:
        """Each file's BM25 score for the query terms."""
        return self._bm25.scores(query)


def _module_names(path: str) -> list[str]:
    """The dotted names a Python file is imported by: its module path and each shorter tail of
    it (``src/pkg/mod.py``: src.pkg.mod, pkg.mod, mod), a package by its directory's."""
    stem, ext = posixpath.splitext(path)
    if ext != ".py":
        return []
    parts = stem.split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return [".".join(parts[i:]) for i in range(len(parts)) if parts[i:]]


def _jvm_names(path: str, text: str) -> list[str]:
    """The names a Kotlin or Java file is imported by: its package (a wildcard import's), and
    the package's name of its file stem and of each name its top level declares (a class, an
    object, a function, a property, a type alias)."""
    if not path.endswith(JVM_EXTENSIONS):
        return []
    package = _PACKAGE.search(text)
    prefix = f"{package.group(1)}." if package else ""
    stem = posixpath.splitext(posixpath.basename(path))[0]
    top_level = "\n".join(line for line in text.splitlines() if line[:1].strip())  # not indented
    declared = [stem, *sorted(history.declared_names(top_level, path))]
    names = [f"{prefix}{name}" for name in dict.fromkeys(declared)]
    return [package.group(1), *names] if package else names


def jvm_imports(prefix: str) -> list[str]:
    """The names a Kotlin or Java prefix imports, in order: a.b.C of ``import a.b.C`` (or of
    ``import a.b.C as D``), a.b of ``import a.b.*``."""
    return [match.group(1) for match in _JVM_IMPORT.finditer(prefix)]


def _imported_files(index: RepositoryIndex, path: str, prefix: str) -> list[int]:
    """The files the prefix imports, in import order: a Python module by its dotted name; a
    Kotlin or Java name by the file declaring it, else by its longest enclosing name a file
    answers to (a member of a class, a package's)."""
    if path.endswith(".py"):
        modules = imported_modules(prefix, path)
        return [i for module in modules for i in index.modules.get(module, [])]
    if not path.endswith(JVM_EXTENSIONS):
        return []
    files = []
    for name in jvm_imports(prefix):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            found = index.jvm_names.get(".".join(parts[:end]))
            if found:
                files += found
                break
    return files


class _Bm25:
    """Okapi BM25 in Lucene's form: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), a term's weight
    tf / (tf + k1 (1 - b + b |d| / avgdl)), N and avgdl over the documents with a term (Lucene's
    docCount: an empty __init__.py is none). Each term's idf and per-document weights are
    computed once, as arrays over the documents that hold it, so that a query costs its distinct
    terms' postings, not the corpus (a term the query repeats counts each time, as in Lucene's
    query of one clause per term)."""

    def __init__(self, docs: Sequence[Counter]):
        self.size = len(docs)
        lengths = np.array([sum(counts.values()) for counts in docs], np.float64)
        n = int(np.count_nonzero(lengths))
        average = float(lengths.sum()) / n if n else 1.0
        norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths / average)
        term_index: dict[str, int] = {}  # term -> its number, in order of first use
        posting_docs, posting_terms, posting_counts = [], [], []  # one entry a (doc, term)
        for doc, counts in enumerate(docs):
            for term, count in counts.items():
                posting_terms.append(term_index.setdefault(term, len(term_index)))
                posting_docs.append(doc)
                posting_counts.append(count)
        terms = np.array(posting_terms, np.int64)
        order = np.argsort(terms, kind="stable")  # by term, then document
        rows = np.array(posting_docs, np.int64)[order]
        tf = np.array(posting_counts, np.float64)[order]
        df = np.bincount(terms, minlength=len(term_index))
        idf = np.log(1 + (n - df + 0.5) / (df + 0.5))
        weights = tf / (tf + norm[rows])
        ends_array = np.cumsum(df)
        ends = ends_array.tolist()
        starts = (ends_array - df).tolist()
        idfs = idf.tolist()
        self.postings: dict[str, tuple[np.ndarray, float, np.ndarray]] = {}
        for term, k in term_index.items():
            span = slice(starts[k], ends[k])
            self.postings[term] = (rows[span], idfs[k], weights[span])

    def scores(self, query: Sequence[str]) -> np.ndarray:
        out = np.zeros(self.size)
        for term, count in Counter(query).items():
            posting = self.postings.get(term)
            if posting is None:
                continue
            rows, idf, weights = posting
            out[rows] += (count * idf) * weights
        return out


# ---- Composers: the snapshot's files ranked for one completion file, most relevant first ----

def path_distance(a: str, b: str) -> int:
    """LCA's path distance: the steps from ``a``'s directory up to the deepest directory both
    paths share, plus those down to ``b``."""
    parts_a, parts_b = a.split("/"), b.split("/")
    common = 0
    for x, y in zip(parts_a, parts_b):
        if x != y:
            break
        common += 1
    return (len(parts_a) - common - 1) + (len(parts_b) - common - 1)


def _others(index: RepositoryIndex, path: str) -> list[int]:
    """Every file of the snapshot but the completion file itself."""
    return [i for i, p in enumerate(index.paths) if p != path]


def rank_empty(index: RepositoryIndex, path: str, prefix: str) -> list[int]:
    """No project context."""
    return []


def rank_path_distance(index: RepositoryIndex, path: str, prefix: str) -> list[int]:
    """The nearest files by ``path_distance`` first; a tie keeps the paths' order."""
    return sorted(_others(index, path), key=index.distances(path).__getitem__)


def imported_modules(prefix: str, path: str) -> list[str]:
    """The dotted modules a Python prefix imports, relative imports resolved against ``path``'s
    package; ``from a import b`` names both a and a.b (b may be a module)."""
    package = posixpath.dirname(path).split("/") if posixpath.dirname(path) else []
    found = []
    for match in _IMPORT.finditer(prefix):
        source, listed, names, plain = match.groups()
        if plain is not None:
            found += [name.split()[0] for name in plain.split(",") if name.strip()]
            continue
        dots = len(source) - len(source.lstrip("."))
        base = source[dots:]
        if dots:
            above = package[: len(package) - (dots - 1)] if dots - 1 <= len(package) else []
            base = ".".join([*above, base] if base else above)
        if base:
            found.append(base)
        if listed is not None:  # a parenthesized list: its comments left out
            names = ",".join(line.split("#")[0] for line in listed.split("\n"))
        for name in names.split(","):
            name = name.split()[0] if name.split() else ""
            if name and name != "*":
                found.append(f"{base}.{name}" if base else name)
    return found


def rank_imports(index: RepositoryIndex, path: str, prefix: str) -> list[int]:
    """The files the prefix imports (by module name, in import order), then the files of the
    completion file's directory, then the rest by path distance."""
    others = set(_others(index, path))
    imported = [i for i in dict.fromkeys(_imported_files(index, path, prefix)) if i in others]
    directory = posixpath.dirname(path)
    taken = set(imported)
    near = [i for i in sorted(others - taken) if index.directories[i] == directory]
    taken.update(near)
    distance = index.distances(path)
    rest = sorted(others - taken, key=lambda i: (distance[i], i))
    return imported + near + rest


def rank_bm25(index: RepositoryIndex, path: str, prefix: str) -> list[int]:
    """The files by their BM25 score for the prefix's identifiers; files that match none of
    them follow by path distance."""
    scores = index.bm25_scores(identifiers(prefix))
    others = _others(index, path)
    matched = sorted((i for i in others if scores[i] > 0), key=lambda i: (-scores[i], i))
    distance = index.distances(path)
    rest = sorted((i for i in others if scores[i] <= 0), key=lambda i: (distance[i], i))
    return matched + rest


Rank = Callable[[RepositoryIndex, str, str], list[int]]
COMPOSERS: dict[str, Rank] = {"empty": rank_empty, "path_distance": rank_path_distance,
                              "imports": rank_imports, "bm25": rank_bm25}


@dataclass
class Composed:
    """A composed prompt: its ids (context, then the completion file's opening and prefix), the
    context's files in prompt order, and where the completion file's prefix starts."""

    ids: list[int]
    files: list[str]
    prefix_start: int


def compose(index: RepositoryIndex, composer: str, path: str, prefix: str,
            prefix_ids: Sequence[int], budget: int) -> Composed:
    """The prompt of ``composer`` for completing ``path`` after ``prefix`` (``prefix_ids`` its
    ids), at most ``budget`` tokens: the repository's opening, the ranked files least relevant
    first (the last one taken cut at its left, as LCA crops a context), the completion file's
    opening and its prefix. ``empty`` gives the prefix alone."""
    if composer == "empty":
        if len(prefix_ids) > budget:
            raise ValueError(_too_small(budget, len(prefix_ids), path))
        return Composed(list(prefix_ids), [], 0)
    head, opening = index.header_ids(), index.opening_ids(path)
    room = budget - len(head) - len(opening) - len(prefix_ids)
    if room < 0:
        raise ValueError(_too_small(budget, budget - room, path))
    chosen: list[list[int]] = []
    files: list[str] = []
    for i in COMPOSERS[composer](index, path, prefix):
        if room <= 0:
            break
        ids = index.file_ids(i)
        chosen.append(ids[-room:] if len(ids) > room else ids)
        files.append(index.paths[i])
        room -= len(chosen[-1])
    context = [t for ids in reversed(chosen) for t in ids]
    ids = [*head, *context, *opening, *prefix_ids]
    return Composed(ids, files[::-1], len(ids) - len(prefix_ids))


def _too_small(budget: int, needed: int, path: str) -> str:
    return (f"context budget {budget} tokens is smaller than the prefix of {path} ({needed} "
            "tokens with its opening): give a larger budget (--block-size) or a shorter prefix")
