"""Project-level completion cases from a git repository's history, as Long Code Arena builds its
project-level code completion data: a commit that adds a file gives the file to complete, the
snapshot of the commit's parent is the repository around it, and the file's lines are sorted into
LCA's categories (``line_categories``, the dataset card's definitions, in its order):

- committed: the line names a function or class declared in the other files the commit adds;
- inproject: else, one declared in the snapshot;
- infile: else, one declared in the completion file;
- common: else, one of LCA's common names (``COMMON_NAMES``: main, get, __init__, ...);
- non_informative: else, a line too short or too long, a comment, an import or a print (a
  line wholly inside a comment or a string: a block comment's or a docstring's);
- random: drawn from the lines that are none of these.

A line "names" an identifier it uses: a definition's own name on its ``def``/``class`` line does
not count (the name is new there). Declarations are the ``def`` and ``class`` names at any depth
of the snapshot's source files (Python's ast; a keyword pattern, comments left out, for other
languages and files that do not parse, and in C-family languages a method's return type or
body); prose (a README) declares nothing, and no keyword is a name. A file the commit adds that
the parent already holds (moved, or copied whole), that shares half the informative lines of the
larger of the two with one file the parent holds (copied and edited), four in five of its own (a
part of it copied), or half of whose informative lines the commit takes out of one (code moved),
is no case: its answer would be in its own context. A file whose text a newer case completes
already (added again after its removal, or by a commit on each of two branches) is no second
case: each text is scored once."""

from __future__ import annotations

import ast
import functools
import io
import keyword
import random
import re
import subprocess
import tokenize
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from codelm.tokenization.source import line_comment
from scraping.common import is_utf8

# LCA's list of common API names (lca-baselines, project_level_code_completion/eval).
COMMON_NAMES = frozenset({
    "index", "__init__", "__getitem__", "__len__", "__iter__", "main", "train", "run", "update",
    "reset", "forward", "__str__", "__repr__", "__call__", "delete", "save", "Migration", "Meta",
    "get", "__eq__", "setup", "load", "start", "setUp", "create", "tearDown", "test", "execute",
    "post", "Solution", "findDecision"})
CATEGORIES = ("committed", "inproject", "infile", "common", "non_informative", "random")
# A line is non-informative below/above these lengths (stripped characters).
SHORT_LINE, LONG_LINE = 5, 150
# Snapshot files of other extensions than the completion files' join the repository under this
# size (characters), as LCA's datapoints take non-Python files; dot-files and licenses never.
OTHER_FILE_CHARS = 16_000
MAX_FILE_BYTES = 1_000_000
# A file the commit adds and one of the parent sharing this share of the larger one's
# informative lines (a copy), or of the new one's that leave the other (code moved out of it):
# its answer would be in its own context ...
COPIED_SHARE = 0.5
# ... or that holds little else than one parent file's lines (a few of its functions copied).
SUBSET_SHARE = 0.8

# Files whose declarations count: source code (prose and data files declare nothing).
SOURCE_EXTENSIONS = (".py", ".pyi", ".kt", ".kts", ".java", ".scala", ".groovy", ".js", ".jsx",
                     ".ts", ".tsx", ".go", ".rs", ".swift", ".c", ".h", ".cc", ".cpp", ".hpp",
                     ".cs", ".rb", ".php", ".m", ".dart", ".lua")

# Type arguments, nested up to three deep (`<K, V : Map<K, List<V>>>`).
_TYPE_ARGS = r"<(?:[^<>]|<(?:[^<>]|<[^<>]*>)*>)*>"
# A declaration's name in other languages: after its keyword (not a keyword that follows it:
# Kotlin's `enum class X`, `fun interface X`), past a Kotlin function's type parameters and
# receiver (`fun <T> Box<T>.unwrap`) and a Go method's receiver (`func (r *Repo) Add`).
_DECLARATION = re.compile(
    r"\b(?:def|class|function|fn|struct|interface|trait|enum|object|type)\s+"
    r"(?!(?:class|interface|object)\b)([A-Za-z_]\w*)"
    r"|\bfun\s+(?!interface\b)(?:" + _TYPE_ARGS + r"\s*)?"
    r"(?:[\w.]+(?:" + _TYPE_ARGS + r")?\??\.)?([A-Za-z_]\w*)"
    r"|\bfunc\s+(?:\([^)]*\)\s*)?([A-Za-z_]\w*)")
# Languages whose methods and functions have no keyword (`public int count(String t) {`,
# `static int count(const char *t)`, TypeScript's `async save(e: E): Promise<void> {`).
C_FAMILY_EXTENSIONS = (".java", ".cs", ".c", ".h", ".cc", ".cpp", ".hpp", ".js", ".jsx", ".ts",
                       ".tsx", ".dart")
_C_MODIFIERS = ("public|private|protected|internal|static|final|abstract|synchronized|native|"
                "virtual|override|sealed|async|extern|inline|const|constexpr|unsafe|default|open|"
                "partial|readonly|strictfp|unsigned|signed|long|short|struct|enum|volatile|"
                "register|export")
_C_TYPE = r"[A-Za-z_][\w.:]*(?:" + _TYPE_ARGS + r")?(?:\[\])*\??"
# A method or function's head up to its parameters: at a line's start, annotations and
# modifiers, type parameters, a return type (none for constructors and TypeScript's or
# JavaScript's class methods), a name (C++'s Class::name, C#'s Get<T>), its parameters. What
# follows them is read by ``_body_follows``.
_C_DECLARATION = re.compile(
    r"^[ \t]*(?:@[\w.]+(?:\([^()]*\))?\s+)*(?:(?:" + _C_MODIFIERS + r")\s+)*"
    r"(?:" + _TYPE_ARGS + r"\s*)?(?:(" + _C_TYPE + r")(?:\s*[*&]+\s*|\s+))?"
    r"(?:[A-Za-z_]\w*::)*([A-Za-z_]\w*)\s*(?:" + _TYPE_ARGS + r"\s*)?"
    r"\((?:[^;{}()]|\([^;{}()]*\))*\)", re.MULTILINE)
# What takes a name's place before parentheses without declaring it, and no return type.
_NOT_DECLARED = frozenset({"if", "for", "while", "switch", "catch", "return", "else", "do", "try",
                           "using", "lock", "foreach", "synchronized", "sizeof", "typeof", "new",
                           "delete", "throw", "function", "await", "yield", "case", "super",
                           "this", "assert", "with", "when", "fixed", "constructor"})
_NAME = re.compile(r"[A-Za-z_]\w*")
# String literals (triple-quoted first) and comments (block, #, //), left to right.
_BLOCK_COMMENT = r"/\*[\s\S]*?\*/"
_TRIPLE_QUOTED = r'"""[\s\S]*?"""|' + r"'''[\s\S]*?'''"
_DOUBLE_QUOTED = r'"(?:\\.|[^"\\\n])*"'
_SINGLE_QUOTED = r"'(?:\\.|[^'\\\n])*'"
# Rust's: a quote opens a char literal of one character or escape ('a', '\n', '\u{1F600}'),
# else a lifetime (`&'a str`), which is code.
_RUST_CHAR = r"'(?:\\(?:x[0-9a-fA-F]{2}|u\{[0-9a-fA-F]{1,6}\}|[^\n])|[^'\\\n])'"
_HASH_COMMENT = r"#[^\n]*"
_SLASH_COMMENT = r"//[^\n]*"
_STRINGS_AND_COMMENTS = re.compile("|".join((
    _BLOCK_COMMENT, _TRIPLE_QUOTED, _DOUBLE_QUOTED, _SINGLE_QUOTED, _HASH_COMMENT,
    _SLASH_COMMENT)))
# The same where # opens no comment (line_comment's // languages: a C preprocessor line, a Rust
# attribute, a JavaScript private member `this.#count`).
_STRINGS_AND_SLASH_COMMENTS = re.compile("|".join((
    _BLOCK_COMMENT, _TRIPLE_QUOTED, _DOUBLE_QUOTED, _SINGLE_QUOTED, _SLASH_COMMENT)))
_RUST_STRINGS_AND_COMMENTS = re.compile("|".join((
    _BLOCK_COMMENT, _TRIPLE_QUOTED, _DOUBLE_QUOTED, _RUST_CHAR, _SLASH_COMMENT)))


def _strings_and_comments(path: str) -> re.Pattern:
    """The string literals and comments of ``path``'s language."""
    if path.endswith(".rs"):
        return _RUST_STRINGS_AND_COMMENTS
    slash = line_comment(path) == "//"
    return _STRINGS_AND_SLASH_COMMENTS if slash else _STRINGS_AND_COMMENTS


# Languages whose string literals hold code, and that code: ${expression} (one level of
# braces inside) or $name.
TEMPLATE_EXTENSIONS = (".kt", ".kts", ".groovy", ".scala", ".dart")
_TEMPLATE = re.compile(r"\$\{((?:[^{}]|\{[^{}]*\})*)\}|\$([A-Za-z_]\w*)")
_PY_DECLARATION = re.compile(r"^\s*(?:async\s+)?(?:def|class)\s+([A-Za-z_]\w*)")
_NON_INFORMATIVE = re.compile(r"(#|//|/\*|import\b|from\s+\S+\s+import\b|print\s*\()")
# The same kinds of line in other languages: a package or `use` line, and their prints
# (println, printf, System.out, console.log, fmt.Print, println!); a line wholly inside a block
# comment is one too (line_categories).
_OTHER_NON_INFORMATIVE = re.compile(
    r"(package\s|use\s|(?:System\.(?:out|err)\.)?print(?:ln|f)?!?\s*\("
    r"|console\.(?:log|error|warn|info|debug)\s*\(|fmt\.(?:Print|Fprint|Sprint)\w*\s*\()")


# ---- Line categories ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=1 << 16)  # a history's snapshots share most of their files
def declared_names(text: str, path: str = "x.py") -> frozenset[str]:
    """The names of the functions and classes a source file declares, at any depth; none for
    other files."""
    if not path.endswith(SOURCE_EXTENSIONS):
        return frozenset()
    if path.endswith(".py"):
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):  # too deep: regexes
            pass
        else:
            return frozenset(node.name for node in ast.walk(tree) if isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))
    code = _strings_and_comments(path).sub("", text)  # prose declares nothing
    return frozenset(name for name in _declarations(code, path) if not keyword.iskeyword(name))


def _declarations(code: str, path: str) -> list[str]:
    """The names ``_DECLARATION`` finds in ``code``, and in a C-family language's its methods
    and functions (``_C_DECLARATION``: typed and at their line's end, or with their body)."""
    names = [next(group for group in match.groups() if group is not None)
             for match in _DECLARATION.finditer(code)]
    if path.endswith(C_FAMILY_EXTENSIONS):
        for match in _C_DECLARATION.finditer(code):
            return_type, name = match.groups()
            if name in _NOT_DECLARED or return_type in _NOT_DECLARED:
                continue
            follows = _body_follows(code, match.end())
            if follows == "{" or (follows == "" and return_type is not None):
                names.append(name)
    return names


_SUFFIX_WORDS = ("const", "async", "override", "noexcept")


def _body_follows(code: str, at: int) -> str | None:
    """What follows a declaration's parameters at ``at``: "{" where its body opens (on its
    line or the next: a brace of its own; or an expression body, `=> x * x;`), "" where its
    line ends there; None where anything else does (a call's `;`, an operator). Passed over:
    const, async, a Java throws clause and a TypeScript return type (`: Promise<T>`)."""
    end = code.find("\n", at)
    end = len(code) if end < 0 else end
    rest = code[at:end].strip()
    for word in _SUFFIX_WORDS:
        if rest.startswith(word) and not rest[len(word):len(word) + 1].isidentifier():
            rest = rest[len(word):].lstrip()
    if rest.startswith(("throws ", ":")):  # up to the body's brace, with no statement between
        brace = rest.find("{")
        head = rest if brace < 0 else rest[:brace]
        if any(mark in head for mark in ";=()"):
            return None
        rest = "" if brace < 0 else rest[brace:]
    if rest.startswith(("{", "=>")):  # a body, or an expression-bodied member (C#, Dart)
        return "{"
    if rest:
        return None
    return "{" if code[end:].lstrip().startswith("{") else ""


def _blanked(text: str, path: str = "x.py") -> str:
    """``text`` with its string literals and comments left out, each line where it was; in a
    language with string templates (Kotlin's "${a.b()} $c"), the code of a template stays."""
    templates = path.endswith(TEMPLATE_EXTENSIONS)

    def blank(match: re.Match) -> str:
        literal = match.group()
        code = ""
        if templates and literal.startswith('"'):
            code = " ".join(expr or name for expr, name in _TEMPLATE.findall(literal))
        return code + "\n" * literal.count("\n")

    return _strings_and_comments(path).sub(blank, text)


def line_names(text: str, path: str = "x.py") -> list[set[str]]:
    """The identifiers each line of a file uses (its strings and comments left out), less the
    name a ``def``/``class`` on that line declares."""
    lines = text.split("\n")
    found: list[set[str]] = [set() for _ in lines]
    tokenized = False
    if path.endswith(".py"):
        try:
            for token in tokenize.generate_tokens(io.StringIO(text).readline):
                if token.type == tokenize.NAME and token.start[0] - 1 < len(lines):
                    found[token.start[0] - 1].add(token.string)
                elif token.type == tokenize.STRING:  # an f-string, before Python 3.12
                    for line, name in _f_string_names(token.string):
                        if token.start[0] - 2 + line < len(lines):
                            found[token.start[0] - 2 + line].add(name)
            tokenized = True
        except (tokenize.TokenError, SyntaxError, ValueError):
            found = [set() for _ in lines]
    if not tokenized:
        found = [set(_NAME.findall(line)) for line in _blanked(text, path).split("\n")]
    for names, line in zip(found, lines):
        declared = (_PY_DECLARATION.findall(line) if path.endswith(".py")
                    else _declarations(line, path))
        names.difference_update(declared)
    return found


def _f_string_names(literal: str) -> list[tuple[int, str]]:
    """The identifiers of an f-string's expressions, each with its line in the literal (from
    1): what Python 3.12's tokenizer gives as NAME tokens (keywords aside), where an older
    one gives the f-string as one STRING token; none for another string."""
    if "f" not in literal[: literal.find(literal[-1])].lower():
        return []
    try:  # a lone CR ends no line here (lines split at LF), as it does for the parser
        tree = ast.parse(literal.replace("\r\n", "\n").replace("\r", " "), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    names = []
    for node in ast.walk(tree):
        name = (node.id if isinstance(node, ast.Name) else node.attr
                if isinstance(node, ast.Attribute) else node.arg
                if isinstance(node, ast.keyword | ast.arg) else None)
        if name is not None:
            names.append((node.lineno, name))
    return names


def non_informative(line: str, path: str = "x.py") -> bool:
    """LCA's non-informative line: too short or too long, a comment, an import or a print (in
    another language than Python, its own comments, imports and prints too)."""
    stripped = line.strip()
    other = not path.endswith(".py") and _OTHER_NON_INFORMATIVE.match(stripped) is not None
    return (len(stripped) < SHORT_LINE or len(stripped) > LONG_LINE or other
            or _NON_INFORMATIVE.match(stripped) is not None)


def line_categories(text: str, path: str, snapshot: dict[str, str], committed: dict[str, str]
                    ) -> dict[str, list[int]]:
    """Every non-blank line of the completion file after its first (0-based numbers: a line
    to complete has a prefix) by its LCA category (``CATEGORIES``; ``random``: all the lines of
    no other category, before any draw)."""
    committed_names = set().union(*(declared_names(t, p) for p, t in committed.items()))
    project_names = set().union(*(declared_names(t, p) for p, t in snapshot.items()))
    file_names = declared_names(text, path)
    out: dict[str, list[int]] = {name: [] for name in CATEGORIES}
    lines = text.split("\n")
    # lines wholly inside a comment or a string: a block comment's, a docstring's
    prose = [bool(line.strip()) and not code.strip()
             for line, code in zip(lines, _blanked(text, path).split("\n"))]
    for number, (line, names) in enumerate(zip(lines, line_names(text, path))):
        if not line.strip() or number == 0:
            continue
        if names & committed_names:
            category = "committed"
        elif names & project_names:
            category = "inproject"
        elif names & file_names:
            category = "infile"
        elif names & COMMON_NAMES:
            category = "common"
        elif non_informative(line, path) or prose[number]:
            category = "non_informative"
        else:
            category = "random"
        out[category].append(number)
    return out


def sample_lines(categories: dict[str, list[int]], per_category: int, seed: int | str
                 ) -> dict[str, list[int]]:
    """At most ``per_category`` lines of each category, drawn with a seeded generator, sorted."""
    out = {}
    for name, numbers in categories.items():
        rng = random.Random(f"{seed}\0{name}")
        out[name] = sorted(rng.sample(numbers, min(per_category, len(numbers))))
    return out


# ---- Git history -------------------------------------------------------------------------------

@dataclass
class CompletionCase:
    """One file a commit adds: the file to complete, the parent's snapshot (path -> text) and
    the other files the commit adds; its lines by category (``line_categories``)."""

    repo: str
    commit: str
    parent: str
    path: str
    text: str
    snapshot: dict[str, str]
    committed: dict[str, str]
    lines: dict[str, list[int]] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.repo}@{self.commit[:12]}:{self.path}"


def _repository_directory(root: Path) -> Path:
    """The directory of the git repository that holds ``root``: its work tree's top, a bare
    repository's own directory, or the work tree whose .git directory ``root`` is in."""
    def rev_parse(option: str) -> str | None:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", option],
                              capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    top = rev_parse("--show-toplevel")  # none inside a git directory
    if top is not None:
        return Path(top).resolve()
    git_dir = Path(rev_parse("--absolute-git-dir") or root).resolve()
    return git_dir if rev_parse("--is-bare-repository") == "true" else git_dir.parent


class GitRepo:
    """A git repository read through the ``git`` command: its commits and blobs (each blob's
    text read once)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ValueError(f"{root}: no such directory; give a git repository's directory")
        done = subprocess.run(["git", "-C", str(self.root), "rev-parse", "--git-dir"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ValueError(f"{root}: not a git repository (git rev-parse finds none); give "
                             "the directory of a git clone")
        repository = _repository_directory(self.root)
        if repository != self.root.resolve():
            raise ValueError(f"{root}: inside the git repository {repository}, whose whole "
                             "history would be read; give that directory")
        self.name = self.root.resolve().name
        self._blobs: dict[str, str | None] = {}

    def _git(self, *args: str) -> bytes:
        done = subprocess.run(["git", "-C", str(self.root), "-c", "core.quotepath=off", *args],
                              capture_output=True)
        if done.returncode != 0:
            raise ValueError(f"{self.root}: git {args[0]} failed: "
                             f"{done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    def adding_commits(self) -> Iterable[tuple[str, str, list[str]]]:
        """(commit, its parent, the paths it adds) of each commit with one parent that adds
        files, newest first. A file moved (or moved and edited) is found as a rename, and one
        copied (or copied and edited) from a file the commit changes (a file moved to a new
        name whose old name gets a new file) as a copy, whatever the user's git config says,
        so it is not an added file. A path that is not UTF-8 is left out."""
        out = self._git("log", "--no-merges", "--diff-filter=A", "--name-only", "-z",
                        "--find-renames", "--find-copies", "-l0", "--format=%x01%H %P"
                        ).decode("utf-8", "surrogateescape")
        for block in out.split("\x01")[1:]:
            head, _, names = block.partition("\0")
            shas = head.split()
            added = [p for p in names.lstrip("\n").split("\0") if p and is_utf8(p)]
            if len(shas) == 2 and added:
                yield shas[0], shas[1], added

    def tree(self, commit: str) -> dict[str, tuple[str, int]]:
        """path -> (blob sha, size) of every file of a commit's tree (a path that is not
        UTF-8 left out, as ``adding_commits`` leaves it out)."""
        out = self._git("ls-tree", "-r", "-l", "-z", "--full-tree", commit)
        files = {}
        for entry in out.split(b"\0"):
            if not entry:
                continue
            meta, _, path = entry.partition(b"\t")
            _, kind, sha, size = meta.split()
            name = path.decode("utf-8", "surrogateescape")
            if kind == b"blob" and size != b"-" and is_utf8(name):
                files[name] = (sha.decode(), int(size))
        return files

    def texts(self, shas: Sequence[str]) -> dict[str, str | None]:
        """sha -> text of each blob (None: not UTF-8 text), read in one ``git cat-file``."""
        missing = [sha for sha in dict.fromkeys(shas) if sha not in self._blobs]
        if missing:
            done = subprocess.run(["git", "-C", str(self.root), "cat-file", "--batch"],
                                  input="".join(f"{sha}\n" for sha in missing).encode(),
                                  capture_output=True, check=True)
            data, at = done.stdout, 0
            for sha in missing:
                header_end = data.index(b"\n", at)
                size = int(data[at:header_end].split()[2])
                blob = data[header_end + 1 : header_end + 1 + size]
                at = header_end + 1 + size + 1
                try:
                    text = blob.decode("utf-8")
                except UnicodeDecodeError:
                    text = None
                self._blobs[sha] = None if text is None or "\0" in text else text
        return {sha: self._blobs[sha] for sha in shas}


def _in_snapshot(path: str, size: int, extensions: Sequence[str]) -> bool | None:
    """Whether a file joins a snapshot: one of ``extensions``, or a small other text file
    (None: decided by its length) that is no dot-file and no license."""
    if size > MAX_FILE_BYTES:
        return False
    if path.endswith(tuple(extensions)):
        return True
    if path.startswith(".") or "license" in path.lower():
        return False
    return None


def snapshot(repo: GitRepo, commit: str, extensions: Sequence[str],
             tree: dict[str, tuple[str, int]] | None = None) -> dict[str, str]:
    """The repository at ``commit`` as LCA's datapoints hold it: its files of ``extensions``,
    and its other text files under OTHER_FILE_CHARS (no dot-files, no licenses). ``tree``: the
    commit's (``GitRepo.tree``), where it was read already."""
    tree = repo.tree(commit) if tree is None else tree
    wanted = {p: entry for p, entry in tree.items()
              if _in_snapshot(p, entry[1], extensions) is not False}
    texts = repo.texts([sha for sha, _ in wanted.values()])
    files = {}
    for path, (sha, _) in wanted.items():
        text = texts[sha]
        if text is None:
            continue
        if _in_snapshot(path, len(text), extensions) or len(text) < OTHER_FILE_CHARS:
            files[path] = text
    return files


@functools.lru_cache(maxsize=1 << 16)
def _informative_lines(text: str, path: str) -> frozenset[str]:
    """A file's distinct stripped lines that a completion case could ask for: none of LCA's
    non-informative ones (short or long lines, comments, imports, prints: a licence header, a
    package line)."""
    stripped = (line.strip() for line in text.split("\n"))
    return frozenset(line for line in stripped if line and not non_informative(line, path))


def copied_from(text: str, path: str, parent_files: dict[str, str],
                later: Callable[[str], str]) -> str | None:
    """The file of the parent that ``text`` (at ``path``) copies, edited or not (the two share
    COPIED_SHARE of the larger one's informative lines, as git measures a copy, or SUBSET_SHARE
    of the new one's: a part of that file), or whose code the commit moved into it
    (COPIED_SHARE of its informative lines leave that file: ``later(file)`` is the file's text
    after the commit, "" where it is gone); None where neither. A licence header, imports, or
    lines a new test shares with an old one make none."""
    lines = _informative_lines(text, path)
    if not lines:
        return None
    for other_path, other in parent_files.items():
        other_lines = _informative_lines(other, other_path)
        shared = lines & other_lines
        if len(shared) < COPIED_SHARE * len(lines):
            continue
        copy = len(shared) >= COPIED_SHARE * len(other_lines)
        if copy or len(shared) >= SUBSET_SHARE * len(lines):
            return other_path
        moved = shared - _informative_lines(later(other_path), other_path)
        if len(moved) >= COPIED_SHARE * len(lines):
            return other_path
    return None


def _text_at(repo: GitRepo, tree: dict[str, tuple[str, int]], path: str) -> str:
    """The text of ``path`` in a commit's ``tree`` ("" where it holds no such text file)."""
    if path not in tree:
        return ""
    sha = tree[path][0]
    return repo.texts([sha])[sha] or ""


def completion_cases(root: str | Path, extensions: Sequence[str], limit: int,
                     per_category: int, seed: int, min_lines: int = 10) -> list[CompletionCase]:
    """Up to ``limit`` completion cases of a repository, newest commit first: each file of
    ``extensions`` (at least ``min_lines`` lines) a commit adds, its parent's snapshot, the
    commit's other added files, and ``per_category`` lines of each category drawn."""
    repo = GitRepo(root)
    cases: list[CompletionCase] = []
    completed: set[str] = set()  # the blobs of the cases taken: each text is one case
    commits = 0
    copies = 0  # added files of the size asked for that copy one of the parent's
    for commit, parent, added in repo.adding_commits():
        commits += 1
        wanted = [p for p in added if p.endswith(tuple(extensions))]
        if not wanted:
            continue
        tree = repo.tree(commit)
        added_files = {p: tree[p][0] for p in added if p in tree and tree[p][1] <= MAX_FILE_BYTES}
        texts = repo.texts(list(added_files.values()))
        added_texts = {p: texts[sha] for p, sha in added_files.items() if texts[sha] is not None}
        parent_tree: dict[str, tuple[str, int]] = {}
        parent_files: dict[str, str] | None = None
        after = functools.partial(_text_at, repo, tree)  # a file as the commit leaves it
        for path in wanted:
            text = added_texts.get(path)
            if text is None or len(text.split("\n")) < min_lines:
                continue
            if added_files[path] in completed:
                continue
            if not parent_tree:
                parent_tree = repo.tree(parent)
            if any(sha == added_files[path] for sha, _ in parent_tree.values()):
                copies += 1  # a copy of a file the parent holds
                continue
            if parent_files is None:
                parent_files = snapshot(repo, parent, extensions, parent_tree)
            if copied_from(text, path, parent_files, after) is not None:
                copies += 1  # a copy of a file the parent holds, edited
                continue
            committed = {p: t for p, t in added_texts.items() if p != path}
            case = CompletionCase(repo.name, commit, parent, path, text, parent_files, committed)
            categories = line_categories(text, path, parent_files, committed)
            case.lines = sample_lines(categories, per_category, f"{seed}\0{case.id}")
            cases.append(case)
            completed.add(added_files[path])
            if len(cases) >= limit:
                return cases
    if not cases:
        copied = (f"; {copies} such file(s) copy one the parent holds (edited or not: most of "
                  "their informative lines are in it), which a completion case would only "
                  "recall" if copies else "")
        raise ValueError(f"{root}: no commit adds a file of {', '.join(extensions)} with "
                         f"{min_lines}+ lines and a parent ({commits} adding commits read"
                         f"{copied}); give a repository with such history, or other extensions")
    return cases
