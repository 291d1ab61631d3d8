"""Python comment and docstring stripping, with Python's own tokenize and ast (never regexes);
each language's line-comment marker."""

from __future__ import annotations

import ast
import io
import posixpath
import tokenize
from collections.abc import Iterator

# Extensions whose line comments open with // (where # opens a preprocessor line or an
# attribute, never a comment), with -- and with #.
SLASH_COMMENTS = frozenset({".c", ".h", ".cc", ".cpp", ".hpp", ".cxx", ".java", ".kt", ".kts",
                            ".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".go", ".rs",
                            ".swift", ".cs", ".scala", ".dart", ".php", ".m", ".groovy", ".zig",
                            ".cu", ".proto"})
DASH_COMMENTS = frozenset({".lua", ".sql", ".hs"})
# Languages whose block comments nest (`/* a /* b */ still a comment */`).
NESTED_BLOCK_COMMENTS = frozenset({".kt", ".kts", ".scala", ".swift", ".rs", ".dart"})
HASH_COMMENTS = frozenset({".py", ".pyi", ".pyx", ".sh", ".bash", ".zsh", ".rb", ".pl", ".pm",
                           ".r", ".jl", ".yaml", ".yml", ".toml", ".ex", ".exs", ".nim", ".cr",
                           ".ps1", ".tcl", ".cmake", ".mk", ".awk"})


def line_comment(path: str, unknown: str | None = "#") -> str | None:
    """The marker that opens a line comment in the language of ``path``'s extension;
    ``unknown`` for an extension of none of these tables (a JSONL record's id)."""
    extension = posixpath.splitext(path)[1].lower()
    if extension in DASH_COMMENTS:
        return "--"
    if extension in SLASH_COMMENTS:
        return "//"
    return "#" if extension in HASH_COMMENTS else unknown

# What parsing or tokenizing untrusted Python text can raise.
PYTHON_PARSE_ERRORS = (SyntaxError, ValueError, tokenize.TokenError, RecursionError, MemoryError)


def source_lines(text: str, keepends: bool = False) -> list[str]:
    """Lines as Python's parser numbers them (``str.splitlines`` also breaks at \\f, U+2028...)."""
    lines = io.StringIO(text, newline="").readlines()
    return lines if keepends else [line.rstrip("\r\n") for line in lines]


def docstring_statement(node: ast.AST) -> ast.Expr | None:
    """The docstring statement of a module, class or function node, or None."""
    body = getattr(node, "body", None)
    first = body[0] if isinstance(body, list) and body else None
    is_string = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    return first if is_string and isinstance(first.value.value, str) else None


def _docstring_nodes(tree: ast.AST) -> Iterator[tuple[ast.Expr, bool]]:
    """(docstring statement, is it the only statement of its body) for every docstring."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = docstring_statement(node)
        if first is not None:
            yield first, len(node.body) == 1 and not isinstance(node, ast.Module)


def strip_comments_and_docstrings(source: str, comments: bool = True, docstrings: bool = True,
                                  strict: bool = False) -> str:
    """Remove ``#`` comments and/or docstrings from Python source, keeping it valid Python (a
    lone docstring becomes ``pass``). Invalid Python is returned unchanged, or with ``strict``
    raises one of ``PYTHON_PARSE_ERRORS``, as does a stripped text that does not parse."""
    lines = source_lines(source, keepends=True)
    try:
        tree = ast.parse(source)
        tokens = list(tokenize.generate_tokens(iter(lines).__next__)) if comments else []
    except PYTHON_PARSE_ERRORS:
        if strict:
            raise
        return source
    line_bytes = [line.encode("utf-8", "surrogatepass") for line in lines]

    def char_col(line_no: int, byte_col: int) -> int:
        return len(line_bytes[line_no - 1][:byte_col].decode("utf-8", "surrogatepass"))

    # (start line, start col, end line, end col, replacement); columns in characters.
    edits = [(*tok.start, *tok.end, "") for tok in tokens if tok.type == tokenize.COMMENT]
    for node, only_statement in _docstring_nodes(tree) if docstrings else []:
        col = char_col(node.lineno, node.col_offset)
        end_col = char_col(node.end_lineno, node.end_col_offset)
        # A docstring sharing its line with code (``def f(): "doc"; return 1``) becomes ``pass``.
        rest = lines[node.end_lineno - 1][end_col:].split("#", 1)[0]
        shares_line = lines[node.lineno - 1][:col].strip() != "" or rest.strip() != ""
        replacement = "pass" if only_statement or shares_line else ""
        edits.append((node.lineno, col, node.end_lineno, end_col, replacement))
    if not edits:
        return source
    edited_rows: set[int] = set()
    # From the end, so earlier positions stay valid; the rows an edit swallows are left empty.
    for row, col, end_row, end_col, replacement in sorted(edits, reverse=True):
        head, tail = lines[row - 1][:col], lines[end_row - 1][end_col:]
        if not replacement and not tail.strip():
            head = head.rstrip(" \t")
        lines[row - 1 : end_row] = [head + replacement + tail] + [""] * (end_row - row)
        edited_rows.update(range(row, end_row + 1))
    stripped = "".join(line for row, line in enumerate(lines, start=1)
                       if row not in edited_rows or line.strip())
    if strict:  # what a dataset keeps must parse, whatever this function got wrong
        ast.parse(stripped)
    return stripped
