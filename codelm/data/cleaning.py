"""Cleaning one document (``clean_one``): decoding, licence headers, credentials and e-mails
redacted, comment and docstring stripping, autopep8, and the size, line and literal limits."""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
import tokenize
from collections.abc import Iterator
from dataclasses import replace

from codelm.data.sources import Doc
from codelm.tokenization.source import (
    NESTED_BLOCK_COMMENTS,
    PYTHON_PARSE_ERRORS,
    line_comment,
    source_lines,
    strip_comments_and_docstrings,
)
from scraping.common import decode_source

# What only a notice says (not a comment that mentions a licence, "# License keys: ..."): the
# leading blocks that say it are removed, and a /** */ block counts as one where it says it.
_NOTICE = re.compile(
    r"copyright|\(c\)|©|spdx-license-identifier|licen[cs]ed (?:under|to)|all rights reserved|"
    r"@license|permission is hereby granted|without warrant(?:y|ies)|licenses?/|"
    r"licen[cs]e,? (?:v(?:ersion)?\.? ?)?\d|free software|free and unencumbered|unlicense|"
    r"mozilla public licen[cs]e|this source code form is subject|for licen[cs]e information|"
    r"governed by (?:an? |the )?[\w.-]+(?: [\w.-]+)? licen[cs]e|licen[cs]e\.(?:txt|md|rst)\b|"
    r"(?:distributed|released|available|provided|published) under\b[^\n]{0,60}licen[cs]e|"
    r"under the terms of\b[^\n]{0,60}licen[cs]e|\([\w .-]*licen[cs]e\)|"
    r"^[^\w\n]*licen[cs]e\s*:", re.I | re.M)  # the last: a "License: MIT" line
_ENCODING_LINE = re.compile(r"^[ \t\f]*#.*?coding[:=]")
# A quoted one-line literal (a raw string """...""" first: the quotes inside are its text) or,
# outside one, a `//`, `#` or `/*` comment start; a number.
_STRING_OR_COMMENT = re.compile(r'"""(?:(?!""").)*"""'
                                r"|\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|//|#|/\*")
_NUMBER_LITERAL = re.compile(r"(?<![\w.])\d[\w.]*")
# Python tokens that are literals (Python 3.12 splits f-strings: their text is FSTRING_MIDDLE).
_LITERAL_TOKENS = {tokenize.STRING, tokenize.NUMBER, getattr(tokenize, "FSTRING_MIDDLE", -1)}


def strip_license_header(text: str, comment: str | None = "#", nested: bool = False
                         ) -> tuple[str, bool]:
    """Remove the comment blocks before a file's code that are copyright/licence notices
    (``/* */``, nested where the language nests them, or lines opening with ``comment``, the
    language's line-comment marker: a C file's ``#include`` lines are code; None, a file of no
    known language: ``#`` where its first comment line opens with one, else ``//``), each with
    the blank lines after it (``_NOTICE``: copyright, SPDX, "licensed under", a "License:"
    line, ...; not a comment that mentions a licence). The other comments of the header stay,
    a linter's directive before the notice too, and Kotlin's ``@file:`` annotations; a ``/**
    */`` block a declaration follows at once, and no notice, is that declaration's
    documentation, kept. A shebang and an encoding line stay. Returns (text, removed)."""
    lines = source_lines(text, keepends=True)
    keep: list[str] = []
    i = 0
    while i < min(2, len(lines)) and ((i == 0 and lines[i].startswith("#!"))
                                      or _ENCODING_LINE.match(lines[i])):
        keep.append(lines[i])
        i += 1
    if comment is None:
        first = _past_blank_lines(lines, i)
        comment = "#" if lines[first : first + 1] and lines[first].lstrip().startswith("#") else "//"
    removed = False
    header_lines = False  # a comment or annotation of the header's own kept
    rest: list[str] = []  # code after the closing */ on its line (`/* (c) X, MIT */ package a`)
    while True:
        start = _past_blank_lines(lines, i)
        if start < len(lines) and lines[start].startswith("@file:"):  # Kotlin's, kept
            keep += lines[i : start + 1]
            header_lines = True
            i = start + 1
            continue
        end, rest = _comment_block(lines, start, comment, nested)
        block = "".join(lines[start:end])
        if rest:  # the comment alone, not the code after its */
            block = block[: len(block) - len(rest[0])]
        if end == start or _documents(lines, start, end, block):  # the code begins
            rest = []
            break
        if not _NOTICE.search(block):
            if rest:  # the code begins after it, on its last line
                rest = []
                break
            keep += lines[i:end]  # the header's own comment: a description, a linter's directive
            header_lines = True
            i = end
            continue
        if header_lines:  # the blank lines after them stay
            keep += lines[i:start]
        removed = True
        if rest:
            i = end
            break
        i = _past_blank_lines(lines, end)
    if not removed:
        return text, False
    return "".join(keep + rest + lines[i:]), True


def _past_blank_lines(lines: list[str], i: int) -> int:
    while i < len(lines) and not lines[i].strip():
        i += 1
    return i


def _comment_block(lines: list[str], i: int, comment: str, nested: bool
                   ) -> tuple[int, list[str]]:
    """Where the comment block opening at line ``i`` ends (the line after it; ``i`` for none),
    and the code after a ``*/`` on its last line."""
    if i < len(lines) and lines[i].lstrip().startswith("/*"):
        depth = 0
        for j in range(i, len(lines)):
            for match in re.finditer(r"/\*|\*/", lines[j]):
                if match.group() == "/*" and (nested or depth == 0):
                    depth += 1
                elif match.group() == "*/":
                    depth -= 1
                    if depth == 0:
                        after = lines[j][match.end():].lstrip(" \t")
                        return j + 1, [after] if after.strip() else []
        return len(lines), []
    while i < len(lines) and lines[i].lstrip().startswith(comment):
        i += 1
    return i, []


def _documents(lines: list[str], start: int, end: int, block: str) -> bool:
    """Whether the block of lines [start, end) is a ``/** */`` documentation comment of the
    declaration right after it (no blank line, package or import between), not a notice."""
    if not lines[start].lstrip().startswith("/**") or end >= len(lines) or _NOTICE.search(block):
        return False
    after = lines[end].lstrip()
    return bool(after.strip()) and not after.startswith(("package", "import", "@file:", "/*",
                                                          "//", "#"))


# Credential shapes specific enough to redact in code without false hits: (pattern, placeholder,
# markers; a text holding none of the markers is not searched, which keeps the scan fast).
SECRET_PATTERNS: tuple[tuple[re.Pattern, str, tuple[str, ...]], ...] = (
    (re.compile(r"(-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY)-----)"
                r"(?:[A-Za-z0-9+/=\s:,.-]|\\[nr]){16,}?(-----END \2-----)"),
     r"\1<PRIVATE_KEY>\3", ("PRIVATE KEY-----",)),
    (re.compile(r"\b(?:AKIA|ASIA)(?![0-9A-Z]{0,9}EXAMPLE)[0-9A-Z]{16}\b"), "<AWS_ACCESS_KEY_ID>",
     ("AKIA", "ASIA")),  # not AWS's documentation ones (AKIAIOSFODNN7EXAMPLE): no one's key
    (re.compile(r"(?i)(aws_?secret_?(?:access_?)?key\W{1,6})[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])"),
     r"\1<AWS_SECRET_ACCESS_KEY>", ("secret", "SECRET", "Secret")),
    (re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9_]{80,})\b"),
     "<GITHUB_TOKEN>", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}|\bhttps://hooks\.slack\.com/services/"
                r"[A-Za-z0-9/]+"), "<SLACK_TOKEN>", ("xox", "hooks.slack.com")),
    (re.compile(r"(://(?<=[A-Za-z0-9+.-]://)[^\s:@/\"'{}<>\[\]]+:)"
                r"(?![%$]|(?i:\*+|x+|p|pass|passwd|password|pwd|secret|token|tiger)@)"
                r"[^\s:@/\"'{}<>\[\]]+@"),
     r"\1<PASSWORD>@", ("://",)),  # not a %s or $VAR a template fills in, a mask (***) or a
    #   documentation's placeholder (user:pass, scott:tiger); no [ ] (a syntax's "[user:pw@]")
)
# Not a matrix product calling a method (q@k.transpose(-2, -1)) nor git's user@host:path.
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
                   r"(?!\(|:[\w~/])")


def redact_secrets(text: str) -> tuple[str, int]:
    """Replace each credential SECRET_PATTERNS finds with its placeholder (a private key keeps its
    BEGIN/END lines, a URL its user). Returns (text, credentials replaced)."""
    total = 0
    for pattern, placeholder, markers in SECRET_PATTERNS:
        if any(marker in text for marker in markers):
            text, n = pattern.subn(placeholder, text)
            total += n
    return text, total


def longest_literal(text: str, at_least: int = 0, python: bool = False,
                    block_comments: bool = False) -> int:
    """Length of the longest one-line string literal or number (exact above ``at_least``); Python
    through ``tokenize``, other text line by line by a pattern that skips comments
    (``block_comments``: the language's /* */ ones too, see ``_longest_in_line``)."""
    lines = [line for line in source_lines(text) if len(line) > at_least]
    if lines and python:
        with contextlib.suppress(*PYTHON_PARSE_ERRORS):
            tokens = tokenize.generate_tokens(io.StringIO(text).readline)
            return max((len(t.string) for t in tokens
                        if t.type in _LITERAL_TOKENS and t.start[0] == t.end[0]), default=0)
    return max((_longest_in_line(line, block_comments) for line in lines), default=0)


def _longest_in_line(line: str, block_comments: bool) -> int:
    """The longest string or number literal of one line of code that is not Python: none after
    a line comment; where ``block_comments``, none inside a /* */ comment opening on the line
    nor on a line opening with * and a space (a block comment's inner line, as KDoc and Javadoc
    write them; C's ``*p = ...`` is code, and so is what follows a ``*/``)."""
    stripped = line.lstrip()
    if block_comments and stripped.startswith("*/"):  # a comment's end: the code after it
        line = stripped[2:]
    elif block_comments and re.match(r"\*(\s|$)", stripped):  # a /** */ comment's inner line
        return 0
    longest = 0
    code = []  # the line without its strings and comments, where numbers are read
    position = 0
    while match := _STRING_OR_COMMENT.search(line, position):
        code.append(line[position : match.start()])
        position = match.end()
        if match.group() in ("//", "#"):
            position = len(line)
        elif match.group() == "/*" and not block_comments:
            code.append(match.group())
        elif match.group() == "/*":
            close = line.find("*/", position)
            position = len(line) if close < 0 else close + 2
        else:
            longest = max(longest, len(match.group()))
            code.append(" ")
    code.append(line[position:])
    numbers = [len(m.group()) for m in _NUMBER_LITERAL.finditer("".join(code))]
    return max([longest, *numbers])


def _autopep8(text: str) -> tuple[str, str | None]:
    """autopep8's formatting, and the modification: ``autopep8_changed``, ``autopep8_failed`` or
    None. No time limit: a file autopep8 takes minutes over stalls the build."""
    import autopep8

    try:
        fixed = autopep8.fix_code(text)
    except Exception:  # autopep8 itself fails on some odd files; keep them as they are
        return text, "autopep8_failed"
    return fixed, "autopep8_changed" if fixed != text else None


def _redact(texts: list[str], opt: dict) -> tuple[list[str], list[str]]:
    """``texts`` (a document, a pair's two, or a conversation's) with credentials (and
    e-mails) replaced; the mods."""
    mods = []
    if opt["redact_secrets"]:
        texts, counts = zip(*map(redact_secrets, texts))
        if any(counts):
            mods.append("secrets_redacted")
    if opt["redact_emails"] and any("@" in t for t in texts):
        texts, counts = zip(*(EMAIL.subn("<EMAIL>", t) for t in texts))
        if any(counts):
            mods.append("emails_redacted")
    return list(texts), mods


def _strings_in(value: object) -> list[str]:
    """Every string a message's JSON value holds (not its keys), in order: the content, a tool
    call's arguments, the reasoning, each of which a chat template can render."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [text for item in value for text in _strings_in(item)]
    return []


def _with_strings(value: object, texts: Iterator[str]) -> object:
    """``value`` with its strings replaced, in ``_strings_in``'s order, by the next of ``texts``."""
    if isinstance(value, str):
        return next(texts)
    if isinstance(value, dict):
        return {key: _with_strings(item, texts) for key, item in value.items()}
    if isinstance(value, list):
        return [_with_strings(item, texts) for item in value]
    return value


def _answers(message: dict) -> bool:
    """Whether ``message`` is an assistant turn with something to learn: text or a tool call."""
    text = message.get("content") or ""
    return message["role"] == "assistant" and bool(text.strip() or message.get("tool_calls"))


def clean_one(args: tuple[Doc, dict]) -> tuple[Doc | None, str | None, list[str]]:
    """Clean one document. Returns (doc or None, drop reason, list of modifications)."""
    raw, opt = args
    mods: list[str] = []
    if raw.target is not None:  # a pair: checked and redacted, never otherwise rewritten
        if not raw.text.strip() or not raw.target.strip():
            return None, "empty_pair", mods
        (prompt, target), mods = _redact([raw.text, raw.target], opt)
        return replace(raw, text=prompt, target=target), None, mods
    if raw.chat:  # a conversation: its messages' and tools' texts redacted, never rewritten
        messages = raw.messages
        if not any(_answers(m) for m in messages):
            return None, "empty_chat", mods
        texts, mods = _redact(_strings_in([messages, raw.tools]), opt)
        redacted, tools = _with_strings([messages, raw.tools], iter(texts))
        return replace(raw, text=json.dumps(redacted, ensure_ascii=False), tools=tools), None, mods
    text, reason = decode_source(raw.text)
    if text is None:
        return None, reason, mods
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if len(text.encode("utf-8")) < opt["min_bytes"]:
        return None, "too_small", mods
    if opt["strip_license"]:
        nested = posixpath.splitext(raw.id)[1].lower() in NESTED_BLOCK_COMMENTS
        text, removed = strip_license_header(text, line_comment(raw.id, unknown=None), nested)
        if removed:
            mods.append("license_header_removed")
    (text,), redacted = _redact([text], opt)
    mods += redacted
    is_python = raw.is_python  # pairs returned above
    if is_python and (opt["strip_comments"] or opt["strip_docstrings"]):
        try:
            text = strip_comments_and_docstrings(text, opt["strip_comments"],
                                                 opt["strip_docstrings"], strict=True)
            mods.append("comments_or_docstrings_stripped")
        except PYTHON_PARSE_ERRORS:
            return None, "syntax_error", mods
    if is_python and opt["autopep8"]:
        text, changed = _autopep8(text)
        mods += [changed] if changed else []
    if not is_python and (opt["strip_comments"] or opt["strip_docstrings"] or opt["autopep8"]):
        mods.append("not_python_kept_as_is")  # those options read Python alone: counted, said
    lines = source_lines(text)
    if sum(map(bool, map(str.strip, lines))) < opt["min_lines"]:
        return None, "too_few_lines", mods
    if max(map(len, lines), default=0) > opt["max_line_length"]:
        return None, "long_line", mods
    limit = opt["max_literal_length"]
    block_comments = line_comment(raw.id, unknown=None) == "//"  # C's family: /* */ too
    if longest_literal(text, limit, python=is_python, block_comments=block_comments) > limit:
        return None, "long_literal", mods
    return replace(raw, text=text), None, mods
