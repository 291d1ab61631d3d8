"""The generation tasks on the corpus's split: line (the next line of a file, as CodeXGLUE's line
completion), completion (a training window's continuation), method (a function's body after its
header), docstring (a function's docstring, under each prompt variant) and refactor (a pair
record's output). Examples are built by codelm.data.examples' builders as training builds them;
each task's generations are post-processed and scored as its benchmark scores them."""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import random
import sys
import tokenize
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import NamedTuple, Protocol

from codelm.data.config import DataConfig
from codelm.data.encoding import encode_text, fitted_prompt, tokenize_examples, window_pairs
from codelm.data.examples import (
    REFACTOR_HEADER,
    Example,
    docstring_examples,
    line_completion_examples,
    method_examples,
    refactor_example,
)
from codelm.data.sources import Doc, plain_text
from codelm.evaluation import scoring
from codelm.evaluation.metrics import (
    chrf,
    code_to_text_bleu,
    codexglue_bleu,
    codexglue_post_process,
    edit_sim,
    exact_match,
    fuzz_ratio,
    rouge_l,
    semantic_similarity,
)
from codelm.evaluation.scoring import Scoring
from codelm.loading import LoadedModel
from codelm.models.generation import FUNCTION_STOPS
from codelm.tokenization.bpe import BPETokenizer
from codelm.tokenization.source import docstring_statement
from tokenizer import CodeTokenizer

GENERATION_EXAMPLES = 100  # a generation task's examples where --limit is not given (its help)
KIND = "examples"  # built from the split's documents
REFERENCE_LOSS = True  # --reference-loss adds the loss of each reference


class TextSettings(Scoring, Protocol):
    """What the generation tasks read of an evaluation's settings (EvalConfig has each)."""

    limit: int | None
    lines_per_file: int
    split: str
    docstring_prompts: list[str] | None
    reference_loss: bool


class NoExamples(ValueError):
    """A generation task's split holds no example of it (``task`` names the task)."""

    def __init__(self, task: str, message: str) -> None:
        super().__init__(message)
        self.task = task


def build_examples(task: str, docs: Sequence[Doc], cfg: TextSettings, variant: str = "simple",
                   tok: CodeTokenizer | BPETokenizer | None = None,
                   data_cfg: DataConfig | None = None) -> list[Example]:
    """The first ``cfg.limit`` (default GENERATION_EXAMPLES) examples of a generation task,
    built by codelm.data.examples' builders as training built them (``data_cfg``'s docstring
    targets, minimum and code length), each named by its document's id (#N)."""
    limit = GENERATION_EXAMPLES if cfg.limit is None else cfg.limit

    data_cfg = data_cfg or DataConfig()
    min_tokens = data_cfg.docstring_min_tokens
    out: list[Example] = []
    other_languages = 0  # code files method and docstring cannot read (not Python)
    for doc in docs:
        if task == "refactor" and doc.target is not None:
            out.append(replace(refactor_example(doc), id=doc.id))
        elif task == "completion" and doc.target is None:
            out += completion_examples(doc, tok, data_cfg, cfg)
        elif task == "line" and doc.target is None:  # any language's lines, as training's
            built = line_completion_examples(doc, cfg.lines_per_file, cfg.seed)
            out += [replace(e, id=f"{doc.id}#{j}") for j, e in enumerate(built)]
        elif task in ("method", "docstring") and doc.target is None and not doc.is_python:
            other_languages += 1
        elif task in ("method", "docstring") and doc.target is None:
            if task == "method":
                built = method_examples(doc)
            else:
                built = docstring_examples(doc, data_cfg.docstring_targets, variant,
                                           data_cfg.docstring_code_tokens)
                if min_tokens and tok is not None:  # counted as training counts them
                    tokenized = tokenize_examples(built, tok, replace(data_cfg, progress=False),
                                                  "docstring")
                    built = [e for e, (_, completion, _) in zip(built, tokenized)
                             if len(completion) >= min_tokens]
            out += [replace(e, id=f"{doc.id}#{j}") for j, e in enumerate(built)]
        if len(out) >= limit:
            break
    if not out:
        hint = ("the refactor task needs {input, output} pair records: pass --data FILE.jsonl"
                if task == "refactor" else "choose other --data or --split")
        if other_languages:
            hint = (f"{task} targets come from Python files (named .py), and {other_languages} "
                    f"of its code files are not (other languages, or text records); {hint}")
        elif task in ("method", "docstring") and data_cfg.strip_docstrings:
            hint = (f"{task} targets are functions with their docstrings, which this data's "
                    "cleaning strips (strip_docstrings): score them on it unstripped, --data-"
                    """options '{"strip_docstrings": false}'""")
        raise NoExamples(task, f"task {task!r}: no examples in the {cfg.split} split; {hint}")
    return out[:limit]


def completion_examples(doc: Doc, tok: CodeTokenizer | BPETokenizer | None, data_cfg: DataConfig,
                        cfg: TextSettings) -> list[Example]:
    """``cfg.lines_per_file`` of a file's training windows, chosen by a seeded draw."""
    assert tok is not None, "the completion task cuts token windows"
    pairs = list(window_pairs(encode_text(tok, plain_text(doc)), data_cfg))  # the training windows
    rng = random.Random(f"{cfg.seed}\0{doc.id}")
    chosen = sorted(rng.sample(range(len(pairs)), min(cfg.lines_per_file, len(pairs))))
    return [Example(tok.decode(pairs[j][0]), tok.decode(pairs[j][1]), id=f"{doc.id}#{j}",
                    ends=False)
            for j in chosen]


def method_body(text: str) -> str:
    """A generated body ends at the first non-blank line without indentation that is not a
    comment (a comment in column 0 may sit inside a body) and starts a statement (a line of a
    string or of a bracketed expression does not); the comments in column 0 just before that
    line are not the body's."""
    lines = text.split("\n")
    continued = _continuation_lines(text)
    end = len(lines)
    for i, line in enumerate(lines):
        if (i and line.strip() and not line[0].isspace() and not line.startswith("#")
                and i not in continued):
            end = i
            break
    body = lines[:end]
    while len(body) > 1 and (not body[-1].strip() or body[-1].startswith("#")):
        body.pop()
    return "\n".join(body).rstrip()


def _continuation_lines(text: str) -> set[int]:
    """The (0-based) lines of ``text`` that continue a statement begun above them: inside a
    string over several lines, or inside brackets; as far as the text tokenizes (generated
    code may end mid-statement)."""
    continued: set[int] = set()
    depth, row = 0, 0
    with contextlib.suppress(tokenize.TokenError, SyntaxError):
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.start[0] != row:  # the first token of a line
                row = token.start[0]
                if depth > 0:
                    continued.add(row - 1)
            continued.update(range(token.start[0], token.end[0]))  # a string's later lines
            if token.type == tokenize.OP and token.string in "([{":
                depth += 1
            elif token.type == tokenize.OP and token.string in ")]}":
                depth = max(0, depth - 1)
    return continued


class Generation(NamedTuple):
    """How a task's answers are generated and compared: the stop strings, where the answer
    starts in the decoded text (a stop before it does not count), and the post-processing of a
    prediction and of a reference."""

    stops: tuple[str, ...]
    start: Callable[[str], str] | None
    clean_pred: Callable[[str], str]
    clean_ref: Callable[[str], str]


def _past_opening_quotes(text: str) -> str:
    """A docstring's text: past its leading blanks and the opening triple quotes a model may
    write (the closing ones are then its stop)."""
    text = text.lstrip()
    return text[3:] if text.startswith(('"""', "'''")) else text


_GENERATION = {
    "line": Generation(("\n",), str.lstrip, lambda t: codexglue_post_process(t.strip()),
                       lambda r: codexglue_post_process(r.strip())),
    "method": Generation(FUNCTION_STOPS[:4], None, method_body, str.rstrip),
    "docstring": Generation(('"""', "'''", "\nclass ", "\ndef "), _past_opening_quotes,
                            str.strip, str.strip),
    # a base model that goes on writes the template's next header (a "### Section" comment
    # in a refactored program is the program's own)
    "refactor": Generation(("\n" + REFACTOR_HEADER,), None, str.strip, str.strip),
    "completion": Generation((), None, str.strip, str.strip),
}


# A line of code takes at most this many new tokens: the rest of the context holds its file, as
# CodeXGLUE's line completion gives the model the file before the line.
LINE_NEW_TOKENS = 64


def _edit_form(task: str, text: str) -> str:
    """CodeXGLUE method generation collapses whitespace runs before edit similarity."""
    return " ".join(text.split()) if task in ("method", "completion") else text


def _generation_metrics(task: str, preds: list[str], refs: list[str],
                        progress: bool = True) -> dict:
    edit = edit_sim([_edit_form(task, p) for p in preds], [_edit_form(task, r) for r in refs])
    if task == "line":  # as CodeXGLUE scores line completion (a line's smoothed BLEU would
        # count the 2-4-grams a one-word line lacks as matched)
        return {"EM": exact_match(preds, refs), "edit_sim": edit}
    bleu = codexglue_bleu(preds, refs)
    if task == "completion":
        return {"edit_sim": edit, "BLEU": bleu}
    if task == "docstring":
        return {"chrF": chrf(preds, refs), "ROUGE-L": rouge_l(preds, refs),
                "c2t_BLEU": code_to_text_bleu(preds, refs)}
    metrics = {"BLEU": bleu, "edit_sim": edit}
    if task == "refactor":
        try:
            metrics["semantic_sim"] = semantic_similarity(preds, refs, progress)
        except ImportError as err:
            _note_once(f"refactor semantic similarity skipped: {err}")
    return metrics


@functools.cache
def _note_once(note: str) -> None:
    """A note said once a process, not once a model."""
    print(f"note: {note}", file=sys.stderr)


def run_generation_task(lm: LoadedModel, task: str, examples: Sequence[Example],
                        cfg: TextSettings, variant: str | None = None,
                        data_cfg: DataConfig | None = None) -> tuple[dict, list[dict]]:
    stops, start, clean_pred, clean_ref = _GENERATION[task]
    prompts = [fitted_prompt(e, lm.tokenizer) for e in examples]
    trained = scoring.training_ids(lm, examples, cfg, data_cfg)
    ids = [(prompt, span) for prompt, _, span in trained]
    if task == "line":  # its reference is the next line that is not blank: so is its prediction
        cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, LINE_NEW_TOKENS))
    max_prompt_tokens = data_cfg.max_prompt_tokens if data_cfg else None
    raw = scoring.generate_texts(lm, prompts, cfg, stops, desc=task, prompt_ids=ids, start=start,
                                 max_prompt_tokens=max_prompt_tokens)
    opening = len(lm.prompt_start)
    fed = [fed_ids[opening:] for fed_ids in scoring.prompts_as_fed(lm, cfg, ids, max_prompt_tokens)]
    cut = [len(kept) < len(prompt_ids) for kept, (prompt_ids, _) in zip(fed, ids)]
    tails = [lm.tokenizer.decode(kept[-300:], continuation=True) for kept in fed]  # as seen
    preds = [clean_pred(t) for t in raw]
    empty = sum(not y for y in preds)
    if empty * 2 >= len(preds):  # scores near 0, and no bug of the evaluation's
        print(f"note: {lm.label}: {empty} of {len(preds)} {task} predictions are empty (the "
              "model's text ended, or held only whitespace, before any code)", file=sys.stderr)
    refs = [clean_ref(e.completion) for e in examples]
    records = [{"model": lm.label, "task": task, "variant": variant, "id": e.id,
                "prompt_tail": tail[-300:], "prompt_cut": was_cut, "reference": r,
                "prediction": y, "edit_sim": fuzz_ratio(_edit_form(task, y), _edit_form(task, r))}
               for e, tail, was_cut, r, y in zip(examples, tails, cut, refs, preds)]
    loss = {}
    if cfg.reference_loss:
        loss = {"loss": scoring.score_supervised(lm, examples, cfg, data_cfg)}
    metrics = {**loss, **_generation_metrics(task, preds, refs, cfg.progress)}
    if task == "method":  # the share of functions, header and generated body, that parse
        completed = [p + y for p, y in zip(prompts, preds)]
        metrics["parses"] = 100 * sum(map(_body_parses, completed)) / len(preds)
    return metrics, records


def _body_parses(source: str) -> bool:
    """Whether a function (its header and docstring, then the generated body) parses with a body
    of its own: a statement besides the docstring, which alone would parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: a null byte
        return False
    function = next((node for node in tree.body
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)), None)
    if function is None:
        return False
    has_docstring = docstring_statement(function) is not None
    return len(function.body) > (1 if has_docstring else 0)


def items(task: str, docs: Sequence[Doc], cfg: TextSettings,
          tok: CodeTokenizer | BPETokenizer | None, data_cfg: DataConfig
          ) -> dict[str | None, list[Example]]:
    """``task``'s examples of the split's documents: the docstring task's by prompt variant
    (those asked for, else the one the run trained with), the others' under None."""
    variants = [None]
    if task == "docstring":
        variants = cfg.docstring_prompts or [data_cfg.docstring_prompt]
    return {v: build_examples(task, docs, cfg, v or "simple", tok, data_cfg) for v in variants}


def run(lm: LoadedModel, task: str, examples: Sequence[Example], cfg: TextSettings,
        variant: str | None = None, data_cfg: DataConfig | None = None
        ) -> tuple[dict, list[dict]]:
    return run_generation_task(lm, task, examples, cfg, variant, data_cfg)
