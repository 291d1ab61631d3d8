"""Instruct models on pass@k benchmarks, as EvalPlus prompts and reads them (``eval.py --chat``).

The problem goes to the model in a user turn, fenced after an instruction; the assistant's turn
is opened with a response prefix and a ``python`` code block, so the model writes the program
inside it (EvalPlus's ``make_raw_chat_prompt``). Its answer ends at EvalPlus's stop strings (the
code block's closing fence among them), and the program run is what EvalPlus's ``sanitize``
keeps of it: the longest stretch of lines that parses, then its imports and the top-level
definitions the entry point reaches. The program runs alone: the problem's prompt is not put
before it.

``sanitize`` reads the code with Python's own parser where EvalPlus reads it with tree-sitter;
it keeps what tree-sitter's reading keeps (a decorated definition, an augmented assignment and a
``from __future__`` import are none of the kinds EvalPlus keeps, so neither keeps them).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import NamedTuple

INSTRUCTION_PREFIX = ("Please provide a self-contained Python script that solves the following "
                      "problem in a markdown code block:")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the "
                   "problem and passes corresponding tests:")
# EvalPlus's stop strings (provider/utility.py's EOS) and, for a chat prompt, the code block's end
CHAT_STOPS = ("<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(",
              "\nprint(", "\n```\n")
_SPLITTER = "-[[]]-this-is-really-our-highest-priority-[[]]-"  # EvalPlus's


ANSWER_OPENING = f"{RESPONSE_PREFIX}\n```python\n"  # what opens the answer for the model


def question(problem_prompt: str) -> str:
    """The user's message asking for a problem's program: the instruction, the problem fenced
    (EvalPlus's)."""
    return f"{INSTRUCTION_PREFIX}\n```\n{problem_prompt.strip()}\n```\n"


def chat_prompt(tokenizer, problem_prompt: str) -> str:
    """The text an instruct model is prompted with for a problem: the chat template's rendering
    of the ``question`` and of the assistant's answer up to its opened ``python`` block
    (EvalPlus's ``make_raw_chat_prompt``). ``tokenizer`` has a chat template."""
    answer = f"{ANSWER_OPENING}{_SPLITTER}\n```\n"
    messages = [{"role": "user", "content": question(problem_prompt)},
                {"role": "assistant", "content": answer}]
    rendered = tokenizer.apply_chat_template(messages)
    if _SPLITTER not in rendered:
        raise ValueError(f"{tokenizer.source}: its chat template does not render the "
                         "assistant's answer, so the answer's code block cannot be opened for "
                         "the model")
    return rendered.split(_SPLITTER)[0]


def endpoint_message(problem_prompt: str) -> str:
    """The user message an OpenAI-compatible endpoint is asked for a problem's answer (EvalPlus's
    ``OpenAIChatDecoder``: the instruction, then the problem in a ``python`` block; the API
    opens no assistant turn for the model)."""
    return f"{INSTRUCTION_PREFIX}\n```python\n{problem_prompt.strip()}\n```"


def answer_text(generated: str) -> str:
    """A generated answer as EvalPlus reads it: tabs as four spaces (the stop strings are cut)."""
    return generated.replace("\t", "    ")


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, MemoryError, ValueError):  # ValueError: a null byte
        return False
    return True


def code_block(text: str) -> str:
    """The longest stretch of two or more lines of ``text`` that parses as Python, by its
    non-blank lines (the first of equal ones); the first line where none does (EvalPlus's
    ``code_extract``)."""
    lines = text.split("\n")
    filled = [0]  # filled[i]: the non-blank lines before line i
    for line in lines:
        filled.append(filled[-1] + bool(line.strip()))
    best_start, best_end, best_length = 0, 0, 0
    for start in range(len(lines)):
        if filled[-1] - filled[start] <= best_length:
            break  # no stretch from here on has more non-blank lines
        for end in range(len(lines) - 1, start, -1):  # the longest that parses, from start
            length = filled[end + 1] - filled[start]
            if length <= best_length:
                break
            if _parses("\n".join(lines[start : end + 1])):
                while end > start + 1 and not lines[end].strip():
                    end -= 1  # the first stretch of this length ends at a non-blank line
                best_start, best_end, best_length = start, end, length
                break
    return "\n".join(lines[best_start : best_end + 1])


class _Kept(NamedTuple):
    """A top-level definition EvalPlus's sanitizer keeps, by the name it reads in it (None: an
    assignment to something other than a name)."""

    name: str | None
    node: ast.stmt


def _identifiers(node: ast.AST) -> Iterator[str]:
    """The identifiers in a node's code, as tree-sitter names them: the names read and bound,
    attributes, parameters, keyword arguments, imported and defined names, and those in
    f-strings."""
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            yield child.id
        elif isinstance(child, ast.Attribute):
            yield child.attr
        elif isinstance(child, ast.arg):
            yield child.arg
        elif isinstance(child, ast.keyword) and child.arg is not None:
            yield child.arg
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield child.name
        elif isinstance(child, ast.alias):
            yield from child.name.split(".")
            if child.asname is not None:
                yield child.asname
        elif isinstance(child, (ast.Global, ast.Nonlocal)):
            yield from child.names
        elif isinstance(child, ast.ExceptHandler) and child.name is not None:
            yield child.name
        elif isinstance(child, (ast.MatchAs, ast.MatchStar)) and child.name is not None:
            yield child.name
        elif isinstance(child, ast.ImportFrom) and child.module is not None:
            yield from child.module.split(".")
        elif isinstance(child, ast.MatchClass):
            yield from child.kwd_attrs
        elif isinstance(child, ast.MatchMapping) and child.rest is not None:
            yield child.rest


def _definition_name(node: ast.stmt) -> str | None:
    """The name a top-level node defines where it is a kind EvalPlus keeps: a class, a function
    (neither decorated) or an assignment (its first target's name; for another target the
    value's where it is a bare name, else None); "" for a node of another kind."""
    if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        return "" if node.decorator_list else node.name
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if isinstance(targets[0], ast.Name):
            return targets[0].id
        # tree-sitter names it by the assignment's first identifier child: the value where it
        # is a bare name (`obj.x = helper`, `a, b = helper`), as EvalPlus reads it
        if len(targets) == 1 and isinstance(node.value, ast.Name):
            return node.value.id
        return None
    return ""


def _returns(node: ast.stmt) -> bool:
    return any(isinstance(child, ast.Return) for child in ast.walk(node))


def _kept(tree: ast.Module) -> tuple[list[ast.stmt], list[_Kept]]:
    """The imports and the definitions EvalPlus keeps of a module, in order: the first of each
    name, a function only where it has a return statement."""
    imports, definitions = [], []
    seen: set[str | None] = set()
    for node in tree.body:
        if isinstance(node, ast.Import) or (isinstance(node, ast.ImportFrom)
                                            and node.module != "__future__"):
            imports.append(node)
            continue
        name = _definition_name(node)
        if name == "" or name in seen:
            continue
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _returns(node):
            continue
        definitions.append(_Kept(name, node))
        seen.add(name)
    return imports, definitions


def _reached(entry_point: str, definitions: list[_Kept]) -> set[str | None]:
    """The names the entry point reaches through the names each definition uses."""
    uses = {kept.name: set(_identifiers(kept.node)) for kept in definitions}
    reached: set[str | None] = {entry_point}
    queue = [entry_point]
    while queue:
        for name in uses.get(queue.pop(0), ()):
            if name not in reached:
                reached.add(name)
                queue.append(name)
    return reached


def sanitize(answer: str, entry_point: str | None = None) -> str:
    """The program EvalPlus's ``sanitize`` makes of a model's answer: of its ``code_block``,
    the imports, then the definitions the entry point reaches (every one without an entry
    point); the code block itself where that keeps nothing."""
    code = code_block(answer)
    try:
        tree = ast.parse(code)
    except (SyntaxError, MemoryError, ValueError):  # no stretch parses: its first line
        return code
    imports, definitions = _kept(tree)
    if entry_point:
        reached = _reached(entry_point, definitions)
        definitions = [kept for kept in definitions if kept.name in reached]
    parts = [ast.get_source_segment(code, node) for node in imports]
    parts += [ast.get_source_segment(code, kept.node) for kept in definitions]
    return "\n".join(parts).strip() or code
