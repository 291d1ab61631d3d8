"""The supervised tasks' examples as text (``Example``: head, body, tail -> completion): line
completion, method generation, docstrings, refactoring pairs and chat turns; and the held-out
prompt of a run's end-of-run sample."""

from __future__ import annotations

import ast
import random
import tokenize
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from codelm.data.config import REFACTOR_TEMPLATE, DataConfig, DataError, docstring_template
from codelm.data.sources import Doc, no_files_error, source_listing
from codelm.runtime.console import progress_bar
from codelm.tokenization.chat import chat_turns, end_of_turn_ids
from codelm.tokenization.source import (
    PYTHON_PARSE_ERRORS,
    docstring_statement,
    line_comment,
    source_lines,
)


def _shares_line(lines: Sequence[str], node: ast.AST) -> bool:
    """Whether code stands beside ``node`` on its first or last line (ast columns count bytes)."""
    before = lines[node.lineno - 1].encode("utf-8")[: node.col_offset]
    after = lines[node.end_lineno - 1].encode("utf-8")[node.end_col_offset :]
    return bool(before.strip() or after.decode("utf-8", "replace").split("#")[0].strip())


class SamplePrompt(typing.NamedTuple):
    """A prompt for a sample completion, and whether its completion ends with its function."""

    text: str
    ends_function: bool


@dataclass
class Example:
    """A supervised example before tokenization: prompt = head + body + tail; ``body`` (the code
    inside an instruction, at most ``body_budget`` tokens) is what a long prompt loses first.
    ``id`` names an evaluated example in eval.py's predictions (its document's id, #N)."""

    head: str
    completion: str
    body: str = ""
    tail: str = ""
    body_budget: int | None = None
    pair: bool = False  # from a pair record: ``pair_special_tokens`` reads its special tokens
    id: str = ""
    ends: bool = True  # the completion ends its text (EOS follows it); a window's does not

    @property
    def prompt(self) -> str:
        return self.head + self.body + self.tail


_DOCUMENTED = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class _Parsed(typing.NamedTuple):
    tree: ast.Module
    lines: list[str]  # numbered as ast numbers them (source_lines), without their ends
    in_string: set[int]  # numbers of the lines that start inside a multi-line string literal


def _parse(doc: Doc) -> _Parsed | None:
    """A Python document parsed, or None when it does not parse."""
    lines = source_lines(doc.text, keepends=True)
    try:
        tree = ast.parse(doc.text)
        tokens = tokenize.generate_tokens(iter(lines).__next__)
        in_string = {row for t in tokens for row in range(t.start[0] + 1, t.end[0] + 1)}
    except PYTHON_PARSE_ERRORS:
        return None
    lines = [line.rstrip("\r\n") for line in lines]
    for node in ast.walk(tree):
        ds = docstring_statement(node) if isinstance(node, _DOCUMENTED) else None
        if ds is not None and _docstring_can_move(ds, lines):
            in_string -= set(range(ds.lineno + 1, ds.end_lineno + 1))
    return _Parsed(tree, lines, in_string)


def _docstring_can_move(ds: ast.Expr, lines: list[str]) -> bool:
    """Whether a docstring's cleaned value survives dedenting its lines by its statement's
    indentation: they are indented that far, and no backslash joins two (an odd run ends one)."""
    inside = lines[ds.lineno : ds.end_lineno]
    indented = all(len(line) - len(line.lstrip(" \t")) >= ds.col_offset or not line.strip()
                   for line in inside)
    return indented and not any((len(line) - len(line.rstrip("\\"))) % 2
                                for line in lines[ds.lineno - 1 : ds.end_lineno - 1])


def line_completion_examples(doc: Doc, n: int, seed: int) -> list[Example]:
    """CodeXGLUE line completion: the file up to a line boundary -> the next (non-blank) line."""
    lines = source_lines(doc.text, keepends=True)
    candidates = [i for i in range(1, len(lines)) if lines[i].strip()]
    rng = random.Random(f"{seed}\0{doc.id}")
    chosen = sorted(rng.sample(candidates, min(n, len(candidates))))
    return [Example("".join(lines[:i]), lines[i].rstrip("\n")) for i in chosen]


def _dedent(parsed: _Parsed, first: int, last: int, indent: int) -> list[str]:
    """Lines ``first``..``last`` moved ``indent`` columns left (at most their own whitespace);
    lines inside a multi-line string keep theirs, so its value is kept."""
    out = []
    for row in range(first, last + 1):
        line = parsed.lines[row - 1]
        if row not in parsed.in_string:
            line = line[min(indent, len(line) - len(line.lstrip(" \t\f"))) :]
        out.append(line)
    return out


def method_examples(doc: Doc, parsed: _Parsed | None = None) -> list[Example]:
    """CodeXGLUE method generation: signature + docstring -> body; the docstring is the
    example's ``body``, so a long prompt loses the end of its docstring, not its signature."""
    parsed = parsed or _parse(doc)
    if parsed is None:
        return []
    out = []
    for node in ast.walk(parsed.tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        ds = docstring_statement(node)
        if (ds is None or len(node.body) < 2 or ds.lineno == node.lineno
                or node.body[1].lineno <= ds.end_lineno):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        head = _dedent(parsed, start, ds.end_lineno, node.col_offset)
        body = _dedent(parsed, ds.end_lineno + 1, node.end_lineno, node.col_offset)
        if not "".join(body).strip():
            continue
        n_sig = ds.lineno - start  # the decorator and def lines before the docstring
        sig, docstring = ("".join(line + "\n" for line in part)
                          for part in (head[:n_sig], head[n_sig:]))
        # Cut, a docstring whose closing quotes have a line of their own loses the end of its
        # text, never that line (the prompt stays a header with a closed docstring).
        last = docstring.rstrip("\n").rpartition("\n")[2]
        closing = len(docstring) - len(last) - 1 if last.strip() in ('"""', "'''") else None
        if closing is None or closing <= 0:
            out.append(Example(sig, "\n".join(body).rstrip(), body=docstring))
        else:
            out.append(Example(sig, "\n".join(body).rstrip(), body=docstring[:closing],
                               tail=docstring[closing:]))
    return out


def docstring_examples(doc: Doc, targets: str, prompt: str, code_tokens: int,
                       parsed: _Parsed | None = None) -> list[Example]:
    """A class (or function) with its docstring removed -> the docstring."""
    parsed = parsed or _parse(doc)
    if parsed is None:
        return []
    kinds = {"class": ast.ClassDef, "function": _DOCUMENTED[1:], "both": _DOCUMENTED}[targets]
    out = []
    for node in ast.walk(parsed.tree):
        if not isinstance(node, kinds):
            continue
        ds = docstring_statement(node)
        if ds is None or ds.lineno == node.lineno or _shares_line(parsed.lines, ds):
            continue
        # strip: Python < 3.13 keeps a last line of indentation before the closing quotes
        docstring = (ast.get_docstring(node, clean=True) or "").strip()
        if not docstring:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        indent = node.col_offset
        code = _dedent(parsed, start, ds.lineno - 1, indent)
        if len(node.body) == 1:
            code.append(" " * (ds.col_offset - indent) + "pass")
        code += _dedent(parsed, ds.end_lineno + 1, node.end_lineno, indent)
        source = "\n".join(code)
        template = docstring_template(prompt)
        if not isinstance(node, ast.ClassDef):  # a function's prompt names a function
            template = template.replace("Class", "Function").replace(" class.", " function.")
        head, tail = template.replace("{class_name}", node.name).split("{source_code}")
        out.append(Example(head, docstring, body=source, tail=tail, body_budget=code_tokens))
    return out


# The template's first line: an input that opens with it gets it twice
REFACTOR_HEADER = REFACTOR_TEMPLATE.partition("\n")[0]


def refactor_example(doc: Doc) -> Example:
    """A pair through REFACTOR_TEMPLATE (the input as the body); prompt/completion ones verbatim."""
    if doc.raw_pair:
        return Example(doc.text, doc.target, pair=True)
    head, tail = REFACTOR_TEMPLATE.split("{input}")
    return Example(head, doc.target, body=doc.text, tail=tail, pair=True)


def check_sources(cfg: DataConfig) -> None:
    """What reading the sources for cfg.task would refuse, found by listing them (no code or
    record is read): a source missing or of no kind codelm reads, sources that hold no files of
    cfg.extensions and no records, code files alone for the refactor task."""
    listings = [(source, source_listing(source, cfg.extensions))
                for _, source in cfg.sources_by_split()]
    if not any(listing.files for _, listing in listings):
        raise no_files_error(cfg)
    if cfg.task == "refactor" and not any(listing.records for _, listing in listings):
        source, listing = next((s, li) for s, li in listings if li.files)
        first = listing.files[0].relative_to(listing.root).as_posix()
        raise refactor_needs_pairs(f"{source}/{first}")


def refactor_needs_pairs(code_id: str) -> DataError:
    """The refactor task's error for code data (``code_id``: one of its files)."""
    return DataError(f"the refactor task needs JSONL pair records {{'input', 'output'}}; the data "
                     f"holds code files (e.g. {code_id}: a directory's file or a scraper's "
                     "{'text'} record)")


def examples_for(doc: Doc, cfg: DataConfig, events: Counter) -> list[Example]:
    if cfg.task == "refactor":
        if doc.target is None:
            raise refactor_needs_pairs(doc.id)
        if not doc.raw_pair and doc.text.lstrip().startswith(REFACTOR_HEADER):
            events["input_holds_refactor_header"] += 1
        return [refactor_example(doc)]
    if doc.target is not None:  # pairs in any other task: used as given
        return [Example(doc.text, doc.target, pair=True)]
    if cfg.task == "completion":
        return line_completion_examples(doc, cfg.lines_per_file, cfg.seed)
    if not doc.is_python:  # method and docstring targets come from Python files only
        events["not_python_file"] += 1
        return []
    parsed = _parse(doc)
    if parsed is None:
        events["skipped_syntax_error_file"] += 1
        return []
    if cfg.task == "method":
        return method_examples(doc, parsed)
    if cfg.task == "docstring":
        return docstring_examples(doc, cfg.docstring_targets, cfg.docstring_prompt,
                                  cfg.docstring_code_tokens, parsed)
    raise AssertionError(cfg.task)


def held_out_prompt(docs: Iterable[Doc], cfg: DataConfig,
                    fitted: Callable[[Example], str] = lambda example: example.prompt
                    ) -> SamplePrompt | None:
    """An end-of-run sample's prompt from held-out documents (a pair task's first example, or
    completion's first pair, its prompt as ``fitted`` cuts it for training:
    encoding.fitted_prompt; else the first top-level
    function with a docstring, its header and docstring, else the first function's header;
    else, in another language's code, a file's opening through its first block's ``{``), and
    whether its completion ends with its function."""
    header = None
    opening = None
    if cfg.task == "chat":  # its prompts need the tokenizer's template
        return None
    for doc in docs:
        pair = bool(doc.target) and cfg.task == "completion"  # a prompt and its completion
        if cfg.task not in ("lm", "fim", "completion", "project") or pair:
            if doc.target or cfg.task != "refactor":
                if examples := examples_for(doc, cfg, Counter()):
                    return SamplePrompt(fitted(examples[0]), cfg.task in ("method", "completion"))
            continue
        if opening is None and not doc.is_python and not doc.target:
            opening = _block_opening(doc)
        parsed = _parse(doc) if doc.is_python else None  # is_python: not a pair
        for fn in parsed.tree.body if parsed else []:
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            docstring = docstring_statement(fn)
            end = docstring.end_lineno if docstring else fn.body[0].lineno - 1
            if end >= fn.lineno:  # not a one-line `def f(): ...`
                start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
                text = "\n".join(parsed.lines[start - 1 : end]) + "\n"
                if docstring:
                    return SamplePrompt(text, True)
                header = header or text
    if header is not None:
        return SamplePrompt(header, True)
    return None if opening is None else SamplePrompt(opening, False)


# A file's opening shown as a sample prompt ends within this many lines.
OPENING_LINES = 30


def _block_opening(doc: Doc) -> str | None:
    """A code file's lines through the first that opens a block (ends with ``{``: a class or a
    function of C's family, Kotlin, Go, Rust, JavaScript), within its first OPENING_LINES; None
    for other files."""
    if line_comment(doc.id, unknown=None) is None:  # no code of a known language
        return None
    lines = source_lines(doc.text)[:OPENING_LINES]
    for number, line in enumerate(lines, 1):
        if line.rstrip().endswith("{") and line.strip() != "{":
            return "\n".join(lines[:number]) + "\n"
    return None


def stop_ids_of(tok, eos_ids: Sequence[int], task: str | None) -> list[int]:
    """``eos_ids``, and for the chat task the template's end-of-turn token (``end_of_turn_ids``),
    which its answers are trained to end with."""
    if task != "chat":
        return list(eos_ids)
    return list(dict.fromkeys([*eos_ids, *end_of_turn_ids(tok)]))


def chat_examples(docs: list[Doc], tokenizer, cfg: DataConfig, split: str, events: Counter
                  ) -> list[Example]:
    """One example an assistant turn of each conversation (``chat_turns``): the
    conversation before it, rendered with the model's chat template, then the answer. A
    conversation whose one answer opens it (a greeting, no answer after the user's turn) makes
    none: counted in ``events`` (``skipped_answer_opens_conversation``) where its template
    renders it, refused with the template's own error where not (roles that must alternate,
    as Mistral's and Llama 2's templates check)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("the chat task needs the tokenizer of an instruct model, whose "
                        "tokenizer_config.json holds a chat_template (--init-from, --tokenizer)")
    examples = []
    for doc in progress_bar(docs, desc=f"chat {split}", enabled=cfg.progress):
        if not doc.chat:
            raise DataError(f"the chat task needs JSONL conversation records {{'messages': "
                            f"[{{'role', 'content'}}, ...]}}; the data holds {doc.id}, which is "
                            "not one")
        try:
            turns = chat_turns(tokenizer, doc.messages, doc.tools)
            if not turns:  # rendered whole, as TRL's SFT renders a conversation
                tokenizer.apply_chat_template(doc.messages, tools=doc.tools)
        except ValueError as e:  # the template's own error (raise_exception, an unknown role)
            raise DataError(f"{doc.id}: {e}") from None
        if not turns:
            events["skipped_answer_opens_conversation"] += 1
        for turn in turns:
            examples.append(Example(turn.prompt, turn.answer, pair=True))
    return examples
