"""tokenizer.py against HF `tokenizers`: ids on every stdlib file, edge cases, round trips, errors.

Reference tokenizer.json files are trained at test time by HF's own BpeTrainer (on every 20th
stdlib file) for the three pre-tokenizer styles, so the reference is independent of our code (the
llama3 Split regex is tiny_hf's copy of Meta's, not tokenizer.py's). A trainer never writes what
only hand-written or converted files hold (a vocabulary word the merges do not reach, a Digits
without its flag): small hand-written tokenizer.json files cover those.
"""

import ast
import functools
import io
import json
import pickle
import random
import tokenize
import unicodedata
from collections import Counter
from typing import NamedTuple

import pytest
import regex
from edge_corpus import edge_texts
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny_hf import (
    LLAMA3_PATTERN,
    LLAMA3_SPECIALS,
    QWEN2_SPECIALS,
    STARCODER_SPECIALS,
    train_hf_tokenizer,
    trained_bpe,
)
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    pre_tokenizers,
    processors,
)

from codelm.data import encoding
from codelm.data.encoding import tokenizer_fingerprint
from codelm.data.sources import stdlib_files, stdlib_root
from codelm.tokenization import batching
from codelm.tokenization.bpe import BYTE_TO_UNICODE, PRETOKENIZER_STYLES, BPETokenizer
from codelm.tokenization.merges import _LIST_SYMBOLS
from codelm.tokenization.source import (
    PYTHON_PARSE_ERRORS,
    docstring_statement,
    strip_comments_and_docstrings,
)
from tokenizer import (
    ENCODING_VERSION,
    MAX_PIECE_CHARS,
    CodeTokenizer,
    check_model_tokenizer,
    load_tokenizer,
)


@pytest.fixture(scope="session")
def stdlib_texts() -> list[tuple[str, str]]:
    root = stdlib_root()
    return [
        (p.relative_to(root).as_posix(), p.read_text(encoding="utf-8", errors="replace"))
        for p in stdlib_files()
    ]


@pytest.fixture(scope="session")
def references(stdlib_texts, tmp_path_factory) -> dict:
    """style -> (tokenizer.json path, HF tokenizer, our BPETokenizer) for the three styles."""
    train_texts = [t for _, t in stdlib_texts[::20]]
    out = {}
    for style in PRETOKENIZER_STYLES:
        path = tmp_path_factory.mktemp(f"ref_{style}") / "tokenizer.json"
        hf = train_hf_tokenizer(style, train_texts, path)
        out[style] = (path, hf, load_tokenizer(path))
    return out


@pytest.fixture(scope="session")
def code_tok(stdlib_texts) -> CodeTokenizer:
    return CodeTokenizer.train([t for _, t in stdlib_texts[::4]], min_freq=10)


@pytest.fixture(scope="session")
def code_tok_hf(code_tok) -> Tokenizer:
    """HF tokenizers reading the tokenizer.json the CodeTokenizer writes."""
    return Tokenizer.from_str(json.dumps(code_tok.to_hf()))


@pytest.fixture(scope="session")
def strip_tok(stdlib_texts) -> CodeTokenizer:
    return CodeTokenizer.train([t for _, t in stdlib_texts[::100]], min_freq=3, strip_comments=True)


def _hf_ids(hf: Tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


def _hf_pieces(hf: Tokenizer, text: str) -> list[str]:
    """The pieces of ``text`` as a CodeTokenizer's HF export splits it (HF's own regex engine),
    by its offsets: an independent oracle for the split that ``train`` and ``encode`` make."""
    return [text[i:j] for _, (i, j) in hf.pre_tokenizer.pre_tokenize_str(text)]


def _first_mismatch(names, ours, ref) -> str | None:
    for name, a, b in zip(names, ours, ref):
        if a != b:
            k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"{name}: first differing id at {k}: ours {a[k : k + 5]} vs HF {b[k : k + 5]}"
    return None


def _assert_ids_equal_hf(hf: Tokenizer, ours, texts: list[str], add_special_tokens: bool = False,
                         names: list[str] | None = None) -> list[list[int]]:
    """``ours``' ids of each text, asserted equal to HF's; a mismatch names the text (by
    ``names``, else its first 40 characters) and the first id that differs."""
    names = [repr(t[:40]) for t in texts] if names is None else names
    ref = _hf_ids(hf, texts, add_special_tokens=add_special_tokens)
    got = [ours.encode(t, add_special_tokens=add_special_tokens) for t in texts]
    mismatch = _first_mismatch(names, got, ref)
    assert mismatch is None, mismatch
    return got


# ---------------------------------------------------------------------------------------------
# Parity with HF tokenizers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style, start, every", [
    # The quick suite: every 16th file for each style, from a different first file for each,
    # so that together they cover a quarter of the files (HF's own encode of the whole standard
    # library alone takes ~30 s here). The slow suite: every file for every style.
    *[(style, 4 * start, 16) for start, style in enumerate(PRETOKENIZER_STYLES)],
    *[pytest.param(style, 0, 1, marks=pytest.mark.slow) for style in PRETOKENIZER_STYLES],
])
def test_parity_on_every_stdlib_file(style, start, every, references, stdlib_texts):
    """Ids equal HF tokenizers' on the Python standard library's files, for every pre-tokenizer
    style: real code in bulk, through encode_batch's worker processes."""
    _, hf, ours = references[style]
    sample = stdlib_texts[start::every]
    names = [n for n, _ in sample]
    texts = [t for _, t in sample]
    got = ours.encode_batch(texts, num_workers=2)
    mismatch = _first_mismatch(names, got, _hf_ids(hf, texts))
    assert mismatch is None, mismatch
    # The whole standard library (or every 16th file of it): Debian's python3.12, which ships
    # test/ (over half of CPython's files) apart, has ~570 files.
    assert len(texts) > 400 // every


@pytest.mark.parametrize("style", PRETOKENIZER_STYLES)
def test_parity_with_special_tokens(style, references, stdlib_texts):
    """With add_special_tokens, the template's tokens are added as HF adds them (none by
    ByteLevel's post-processor), and special-token strings spliced into code match as HF's do,
    on every 100th stdlib file (the bulk of the files: test_parity_on_every_stdlib_file)."""
    _, hf, ours = references[style]
    sample = stdlib_texts[::100]
    names = [n for n, _ in sample]
    texts = [t for _, t in sample]
    got = _assert_ids_equal_hf(hf, ours, texts, add_special_tokens=True, names=names)
    if style in ("gpt2", "qwen2"):
        assert got == [ours.encode(t) for t in texts]  # ByteLevel post-processor adds nothing
    else:
        assert any(g != ours.encode(t) for g, t in zip(got, texts))
    # Special tokens inside real code are matched as HF matches them.
    specials = {"llama3": LLAMA3_SPECIALS, "qwen2": QWEN2_SPECIALS}.get(style, STARCODER_SPECIALS)
    rng = random.Random(0)
    spliced = []
    for text in texts:
        cut = sorted(rng.sample(range(len(text) + 1), 2)) if len(text) > 2 else [0, 0]
        pieces = [text[: cut[0]], text[cut[0] : cut[1]], text[cut[1] :]]
        spliced.append(rng.choice(specials).join(pieces) + rng.choice(specials))
    for add in (False, True):
        _assert_ids_equal_hf(hf, ours, spliced, add_special_tokens=add, names=names)


def _one_mb_line(stdlib_texts) -> str:
    text = "".join(t for _, t in stdlib_texts[:200]).replace("\r", " ").replace("\n", " ")
    assert len(text) >= 1_000_000
    return text[:1_000_000]


EDGE_CASES = [
    "",
    " ",
    "\n",
    "\r\n",
    "def f(x):\r\n    return x\r\n\r\n",
    "a\rb\r\rc",
    "\tdef f():\n\t\treturn 1\t\n\t\t\t\tx\t \t",
    "x = 12345678901234567890123456789012345678901234567890\n",
    "0" * 1000,
    "3.14159e-10 0x7FFF_FFFF 1_000_000 ١٢٣ ½ Ⅻ",
    "🙂🙂 emoji 👩‍👩‍👧 flags 🇫🇷🇯🇵 ✨✨",
    "naïve café — “quotes” 中文字符 日本語のテキスト 한국어 العربية עברית Ελληνικά",
    "e\u0301 combining a\u0308\u0304 marks",
    "\u00a0\u2003\u3000 odd spaces\u2028x\u2029y\x85z\x0b\x0c\x1c\x1d\x1e\x1f",
    "'s 'S 'LL 'll 'Ve ''  ' s Don't I'M",
    "\x00\x01\x7f\ufeff BOM and controls",
    "   \n\n\n    \n  \t \n",
    "trailing spaces     ",
    "a" * 5000 + " " + "ab" * 3000,
    "<|endoftext|>",
    "a<|endoftext|>b<|endoftext|><|endoftext|>c",
    "  <|endoftext|>  <fim_prefix>def f():\n<fim_suffix>\n    return 1<fim_middle>",
    "<|begin_of_text|>x<|eot_id|><|end_of_text|>",
    "<|endoftext",
    "    x\t\t\ty        z",
]


@pytest.mark.parametrize("style", PRETOKENIZER_STYLES)
def test_parity_edge_cases(style, references, stdlib_texts):
    """The edge cases and a 1 MB line encode to HF's ids and decode back to the text (Qwen2's as
    its NFC normalizer left it)."""
    _, hf, ours = references[style]
    for add, texts in ((True, EDGE_CASES), (False, [*EDGE_CASES, _one_mb_line(stdlib_texts)])):
        got = _assert_ids_equal_hf(hf, ours, texts, add_special_tokens=add)
    for text, ids in zip(texts, got):  # Qwen2's text comes back as its NFC normalizer made it
        assert ours.decode(ids) == (unicodedata.normalize("NFC", text) if style == "qwen2"
                                    else text)


@pytest.mark.parametrize("style", PRETOKENIZER_STYLES)
def test_pieces_equal_hf_pre_tokenizers_on_the_edge_cases(style, references):
    """Each style's pre-tokenizer cuts text where HF's own pre-tokenizer does (contractions,
    digits one by one or by threes, runs of whitespace and newlines), whatever ids the trained
    merges happen to give a piece. Reference: HF's pre_tokenize_str offsets (after Qwen2's NFC)."""
    _, hf, ours = references[style]
    texts = [*EDGE_CASES, *edge_texts(), "we'll 12345 1234567 x  =  1\n\n  y", "IT'S they'RE"]
    for text in texts:
        if style == "qwen2":
            text = unicodedata.normalize("NFC", text)
        assert ours._pretokenize(text) == _hf_pieces(hf, text), repr(text[:40])


@pytest.mark.parametrize("style", PRETOKENIZER_STYLES)
def test_ids_equal_hf_on_the_edge_corpus(style, references):
    """Every general category, combining sequences, emoji ZWJ sequences and whitespace runs
    (tests/edge_corpus.py), with and without the template's special tokens."""
    _, hf, ours = references[style]
    for add in (False, True):
        _assert_ids_equal_hf(hf, ours, edge_texts(), add_special_tokens=add)


@pytest.mark.parametrize("style", PRETOKENIZER_STYLES)
def test_decode_vocab_and_ids_match_hf(style, references, stdlib_texts):
    """vocab_size, token_to_id and decode (with and without special tokens) agree with HF for
    every token, for real text, and for random ids that split multi-byte characters."""
    _, hf, ours = references[style]
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        assert ours.token_to_id(token) == i
    assert ours.token_to_id("definitely not a token") is None
    texts = [t for _, t in stdlib_texts[::60]] + EDGE_CASES
    for text in texts:
        ids = hf.encode(text, add_special_tokens=True).ids
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    # Arbitrary id sequences (split multi-byte characters) decode the same lossy way.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randrange(1, 12))]
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids)


def test_decode_bytes_spelling_a_surrogate_like_hf(references, code_tok, code_tok_hf):
    """ED A0 80 is invalid UTF-8: HF gives U+FFFD per byte, never a lone surrogate."""
    raw = b"x\xed\xa0\x80y"
    _, hf, ours = references["gpt2"]
    ids = [hf.token_to_id(BYTE_TO_UNICODE[b]) for b in raw]
    assert ours.decode(ids) == hf.decode(ids) == "x\ufffd\ufffd\ufffdy"
    code_ids = [code_tok.token_to_id(f"<0x{b:02X}>") for b in raw]
    assert code_tok.decode(code_ids) == code_tok_hf.decode(code_ids)


def test_special_role_and_fim_ids(references, tmp_path):
    """bos, eos, pad and the FIM ids are the tokens HF's file names: StarCoder's by their names,
    Llama-3's bos from its template; a tokenizer_config.json beside it sets the roles, as
    transformers reads them."""
    _, hf, star = references["starcoder"]
    assert star.eos_id == star.bos_id == hf.token_to_id("<|endoftext|>")
    assert star.fim_prefix_id == hf.token_to_id("<fim_prefix>")
    assert star.fim_middle_id == hf.token_to_id("<fim_middle>")
    assert star.fim_suffix_id == hf.token_to_id("<fim_suffix>")
    assert star.pad_id is None
    path, hf, llama = references["llama3"]
    assert llama.bos_id == hf.token_to_id("<|begin_of_text|>")  # from the template
    assert llama.eos_id == hf.token_to_id("<|end_of_text|>")
    assert llama.fim_prefix_id is llama.fim_middle_id is llama.fim_suffix_id is None
    # A tokenizer_config.json beside the file names the roles, as transformers writes it.
    d = tmp_path / "llama"
    d.mkdir()
    (d / "tokenizer.json").write_text(path.read_text("utf-8"), "utf-8")
    config = {"eos_token": "<|eot_id|>", "pad_token": {"content": "<|end_of_text|>"}}
    (d / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    tok = load_tokenizer(d)
    assert tok.eos_id == hf.token_to_id("<|eot_id|>")
    assert tok.pad_id == hf.token_to_id("<|end_of_text|>")


def test_bos_is_the_template_prefix_whatever_its_name(tmp_path):
    """bos is the token the TemplateProcessing puts first, here a name the fallback list lacks,
    beside an <|endoftext|> the list would take."""
    hf = Tokenizer.from_str(json.dumps(_hand_written_spec(["ab"], [("a", "b")])))
    hf.add_special_tokens(["<|endoftext|>", "<|start|>"])
    start = hf.token_to_id("<|start|>")
    hf.post_processor = processors.TemplateProcessing(
        single="<|start|> $A", special_tokens=[("<|start|>", start)]
    )
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    ref = hf.encode("ab x", add_special_tokens=True).ids
    assert ours.bos_id == ref[0] == start
    assert ours.encode("ab x", add_special_tokens=True) == ref
    assert ours.eos_id == hf.token_to_id("<|endoftext|>")


def test_merges_as_strings_and_added_token_flags(references, stdlib_texts, tmp_path):
    """Legacy "a b" merges, and lstrip/rstrip/single_word/normalized added tokens."""
    path, _, _ = references["gpt2"]
    spec = json.loads(path.read_text("utf-8"))
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(spec), "utf-8")
    hf = Tokenizer.from_file(str(legacy))
    hf.add_special_tokens(
        [
            AddedToken("<mask>", lstrip=True, special=True),
            AddedToken("<sep>", rstrip=True, special=True),
            AddedToken("<both>", lstrip=True, rstrip=True, special=True),
        ]
    )
    hf.add_tokens([AddedToken("word", single_word=True), AddedToken("élan", normalized=False)])
    flagged = tmp_path / "flagged.json"
    hf.save(str(flagged))
    ours = load_tokenizer(flagged)
    texts = [
        "a  <mask> b <sep>   c\n<both>\t d<mask><sep>",
        "word words sword word_ word. (word) élan élans",
        "x <mask><mask>  <sep> <sep>  <both>",
        *(t for _, t in stdlib_texts[::90]),
    ]
    for add in (False, True):
        _assert_ids_equal_hf(hf, ours, texts, add_special_tokens=add, names=texts)


def test_lstrip_token_inside_the_previous_rstrip_whitespace_is_dropped(references, tmp_path):
    """HF starts an lstrip match no earlier than the previous token's end and drops it if empty."""
    hf = Tokenizer.from_file(str(references["gpt2"][0]))
    hf.add_special_tokens([AddedToken("<sep>", rstrip=True, special=True)])
    hf.add_tokens([AddedToken("  ", lstrip=True, normalized=False)])  # CodeGen-style run token
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    texts = ["a<sep>  b", "def f():<sep>  return 1", "<sep><sep>  ", "a  <sep>  b  c"]
    assert [ours.encode(t) for t in texts] == _hf_ids(hf, texts)


@pytest.mark.parametrize("tokens", [["€"], ["\n"], ["\n", "\n\n", "\n\n\n"]],
                         ids=["euro", "newline", "newline-runs"])
def test_added_tokens_of_one_character_on_a_byte_level_tokenizer_take_hfs_ids(tokens, tmp_path):
    """An added token that is one character (or runs of one, as Gemma's newlines) on a
    byte-level tokenizer: HF cuts every occurrence out before the regex; the ids are HF's, for
    texts with and without it."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(["hello world", "def f():\n    return 1\n"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.add_tokens([AddedToken(t, normalized=False) for t in tokens])
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    texts = ["hello", "5€ and 6 €€", "a\n\n\n\nb \n x", " \n", "def f():\n    return 1\n"]
    ref = _hf_ids(hf, texts)
    assert [ours.encode(t) for t in texts] == ref
    assert [ours.decode(ids) for ids in ref] == texts


def test_added_token_ids_are_derived_as_hf_derives_them(references, tmp_path):
    """HF ignores the JSON ids: a content in the vocabulary keeps its id, others come next."""
    path, _, _ = references["gpt2"]
    spec = json.loads(path.read_text("utf-8"))
    n = len(spec["model"]["vocab"])
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False)
    spec["added_tokens"] += [
        {"id": n + 5, "content": "<sep>", **flags, "special": True},  # a gap
        {"id": n + 6, "content": "def", **flags, "special": False},  # already in the vocabulary
        {"id": 3, "content": "<cls>", **flags, "special": True},  # another token's id
        {"id": n + 5, "content": "<sep>", **flags, "special": True},  # an exact repeat
    ]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), "utf-8")
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    texts = ["a<sep>b<cls>", "def f(): <|endoftext|>", "<cls><sep>def"]
    ref = _hf_ids(hf, texts)
    assert [ours.encode(t) for t in texts] == ref
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        assert ours.token_to_id(token) == i
    for ids in ref:
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids)
    spec["added_tokens"].append({"id": n, "content": "<sep>", **flags, "special": False})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), "utf-8")
    with pytest.raises(ValueError, match="repeats '<sep>' with other flags"):
        load_tokenizer(tmp_path / "tokenizer.json")


def _with_split_regex(references, tmp_path, pattern: str):
    """The Llama-3 reference with its Split regex replaced: (path, HF tokenizer reading it)."""
    spec = json.loads(references["llama3"][0].read_text("utf-8"))
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": pattern}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), "utf-8")
    return path, Tokenizer.from_file(str(path))


@pytest.mark.parametrize(
    "pattern, construct",
    [
        (r"\h+|\S+|\s+", r"\\h"),  # hex digit in Oniguruma, horizontal space in Python regex
        (r"(?m)a.b|\S+|\s+", r"\(\?m\)"),  # dot-all in Oniguruma, multi-line in Python
        (r"^ +|\S+|\s+", r"\^"),  # line anchor in Oniguruma, string anchor in Python
        (r"\S+$|\S+|\s+", r"\$"),
        (r"a\Z|\S+|\s+", r"\\Z"),  # also before a final newline in Oniguruma
        (r"\w+|\W", r"\\w"),  # Python's \w also takes ZWJ/ZWNJ
        (r"\p{N}{1,3}+|\D+", r"\{1,3\}\+"),  # a repeat in Oniguruma, possessive in Python
        (r"(?i:ss)|\S|\s+", r"uses '\(\?i:ss\)"),  # Oniguruma folds ß to ss
        (r"[a-z&&[^aeiou]]+|[^a-z]+|[a-z]", "&&"),  # a set intersection in Oniguruma only
    ],
)
def test_split_regexes_oniguruma_reads_differently_are_refused(
    pattern, construct, references, tmp_path
):
    """A Split regex with a construct that Oniguruma (HF) and Python's regex read differently is
    refused naming the construct and the file, rather than loaded to give other ids than HF."""
    path, hf = _with_split_regex(references, tmp_path, pattern)
    with pytest.raises(ValueError, match=construct) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])  # fmt: skip
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class SplitStyle(NamedTuple):
    """A training style whose Split regex is a family's own: the regex, a text and the pieces
    HF's Split cuts it into, and a line of training text."""

    pattern: str
    text: str
    pieces: list[str]
    training_line: str


SPLIT_STYLES = {
    # Meta's Llama-3 file (tiny_hf's literal): digits by threes
    "llama3": SplitStyle(LLAMA3_PATTERN, "x = 12345", ["x", " =", " ", "123", "45"],
                         "pi = 3.14159; v2 = 1234567\n"),
    # Qwen2.5-Coder's file (QWEN2_PATTERN above): digits one by one, contractions of any case
    "qwen2": SplitStyle(QWEN2_PATTERN, "x = 123", ["x", " =", " ", "1", "2", "3"],
                        "It'S THEY'LL we've 3.14159\n"),
}


@pytest.mark.parametrize("style", sorted(SPLIT_STYLES))
def test_a_family_style_writes_the_familys_split_regex(style):
    """What codelm trains in the llama3 or qwen2 style splits as that family's file does: its
    Split regex is the file's literal, which HF's own Split reads as the family does (digits by
    threes, or one by one); the ids equal HF's with HF's pre-tokenizer built from that literal."""
    pattern, text, pieces, training_line = SPLIT_STYLES[style]
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    assert [p for p, _ in split.pre_tokenize_str(text)] == pieces
    texts = ["n = 12345 + 678 * 9012345\n" * 20, training_line * 5]
    ours = BPETokenizer.train(texts, 320, pretokenizer=style)
    assert ours.spec["pre_tokenizer"]["pretokenizers"][0]["pattern"] == {"Regex": pattern}
    hf = Tokenizer.from_str(json.dumps(ours.spec))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    probe = ["x = 12345", "1234567 89 0", "YOU'RE", *texts]
    assert [ours.encode(t) for t in probe] == _hf_ids(hf, probe)


@pytest.mark.parametrize("pattern", [r"\p{L}*|\s+|.", r"(?=\s)|\S+|\s"])
def test_a_split_regex_that_can_match_the_empty_string_is_refused(pattern, references, tmp_path):
    """Oniguruma steps one character past an empty match, leaving it a piece of its own, and
    Python regex does not: such a regex is refused, naming it."""
    path, _ = _with_split_regex(references, tmp_path, pattern)
    with pytest.raises(ValueError, match="empty string") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("pattern", [O200K_PATTERN, QWEN2_PATTERN, r"\p{N}{1,2}?|[]\d]|\D"])
def test_real_split_regexes_still_read_as_hf_reads_them(pattern, references, stdlib_texts,
                                                          tmp_path):
    """Those refusals spare real pre-tokenizer regexes (o200k, Qwen2, a lazy repeat, a set that
    starts with ]): they load, with HF's ids."""
    path, hf = _with_split_regex(references, tmp_path, pattern)
    ours = load_tokenizer(path)
    texts = [t for _, t in stdlib_texts[::150]] + EDGE_CASES
    assert _first_mismatch(texts, [ours.encode(t) for t in texts], _hf_ids(hf, texts)) is None


def test_a_split_regex_with_groups_splits_at_its_matches_as_hf_does(references, tmp_path):
    """Groups in a Split regex change nothing in HF, nor in codelm: Python's findall returns the
    groups, which would fail inside encode where their count matches the text's length ("ab":
    two)."""
    path, hf = _with_split_regex(references, tmp_path,
                                 r"( ?)(\p{L}+)|\p{N}{1,3}|\s+|(?<p>[^\s\p{L}\p{N}])+")
    ours = load_tokenizer(path)
    texts = ["ab", "ab cd", "a1", "+-", *EDGE_CASES]
    assert _first_mismatch(texts, [ours.encode(t) for t in texts], _hf_ids(hf, texts)) is None


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
               "use_regex": True}


def _hand_written_spec(tokens=(), merges=(), pre_tokenizer=_BYTE_LEVEL, **model) -> dict:
    """A byte-level tokenizer.json written by hand, not by a trainer: the 256 byte characters,
    then ``tokens``, with ``merges`` in rank order and ``model`` fields on top."""
    vocab = {c: i for i, c in enumerate(BYTE_TO_UNICODE.values())}
    vocab.update({t: len(vocab) + k for k, t in enumerate(tokens)})
    bpe = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
           "ignore_merges": False, "vocab": vocab, "merges": [list(m) for m in merges]}
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": _BYTE_LEVEL, "model": {**bpe, **model}}


@pytest.mark.parametrize("ignore_merges", [True, False])
def test_ignore_merges_takes_a_vocabulary_word_whole_as_hf_does(ignore_merges):
    """Real Llama-3 files set ignore_merges: a piece found whole in the vocabulary is one token
    though the merges would split it (b c ranks first, so by merges abc is a|bc). A file HF's
    trainer wrote reaches every word by merges, so the trained references cannot tell."""
    spec = _hand_written_spec(["ab", "bc", "abc"], [("b", "c"), ("a", "b")],
                              ignore_merges=ignore_merges)
    hf = Tokenizer.from_str(json.dumps(spec))
    texts = ["abc", "abcd", "ab", "bc", "xabc", "abc abc", "abcabc\nabc"]
    ref = _hf_ids(hf, texts)
    assert (ref[0] == [spec["model"]["vocab"]["abc"]]) is ignore_merges  # the flag matters
    assert [BPETokenizer(spec).encode(t) for t in texts] == ref


def test_a_merge_whose_result_is_no_vocabulary_token_is_refused_as_hf_refuses_it():
    """Both parts of merge #1 are tokens but "bc" is not: HF refuses the file, and codelm too
    (loaded, the merge would make a token with no id, a KeyError at encode)."""
    spec = _hand_written_spec(["ab"], [("a", "b"), ("b", "c")])
    with pytest.raises(Exception, match="`bc` out of vocabulary"):
        Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(ValueError, match=r"merge #1 \['b', 'c'\].*concatenation.*vocabulary"):
        BPETokenizer(spec)


def test_a_bpe_model_without_its_merges_is_refused_as_hf_refuses_it():
    """A tokenizer.json whose BPE model lost its merges key: HF refuses the file, and codelm
    too (read as no merges, every word would encode a character at a time); merges [] is a
    model without merges, read by both."""
    spec = _hand_written_spec(["ab"], [("a", "b")])
    del spec["model"]["merges"]
    with pytest.raises(Exception, match="Missing vocab/merges"):
        Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(ValueError, match=r"merges missing"):
        BPETokenizer(spec)
    spec["model"]["merges"] = []
    assert BPETokenizer(spec).encode("ab") == _hf_ids(Tokenizer.from_str(json.dumps(spec)),
                                                      ["ab"])[0]


def test_digits_without_its_flag_keeps_digit_runs_as_hf_default_does():
    """A hand-written {"type": "Digits"} lacks individual_digits: it is read as HF's default
    Digits() (false), so a digit run is one piece and merges across its digits. (HF's own JSON
    reader wants the key, so HF reads the file with the pre-tokenizer built in Python.)"""
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits"}, _BYTE_LEVEL]}
    spec = _hand_written_spec(["12", "123", "45"], [("1", "2"), ("12", "3"), ("4", "5")],
                              pre_tokenizer=pre)
    hf = Tokenizer.from_str(json.dumps({**spec, "pre_tokenizer": _BYTE_LEVEL}))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    texts = ["x = 12345", "a1b22c333d4545", "12 123 45\n", "x12345y 912"]
    ref = _hf_ids(hf, texts)
    assert ref[0][-2:] == [spec["model"]["vocab"]["123"], spec["model"]["vocab"]["45"]]
    assert [BPETokenizer(spec).encode(t) for t in texts] == ref


def test_a_string_split_pattern_is_literal_text_as_hf_reads_it():
    """A Split {"String": "."} splits at dots only: the string is text, not a regex (as a regex
    the dot would cut every character apart). Reference: HF on the same hand-written file."""
    split = {"type": "Split", "pattern": {"String": "."}, "behavior": "Isolated", "invert": False}
    pre = {"type": "Sequence", "pretokenizers": [split, {**_BYTE_LEVEL, "use_regex": False}]}
    spec = _hand_written_spec(["ab", "ab.", ".a"], [("a", "b"), ("ab", "."), (".", "a")],
                              pre_tokenizer=pre)
    hf = Tokenizer.from_str(json.dumps(spec))
    texts = ["ab.ab", "a.b", "x.y(z)*", "..ab"]
    ref = _hf_ids(hf, texts)
    assert ref[0] == [spec["model"]["vocab"][t] for t in ("ab", ".", "ab")]
    assert [BPETokenizer(spec).encode(t) for t in texts] == ref


def test_other_supported_pretokenizer_shapes(stdlib_texts, tmp_path):
    """Digit runs, a String Split, and a one-element Sequence are read as HF reads them."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    shapes = {
        "digit_runs": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=False), byte_level]
        ),
        "string_split": pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split("\n", behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        ),
        "sequence_of_one": pre_tokenizers.Sequence([byte_level]),
    }
    texts = [t for _, t in stdlib_texts[3::150]] + EDGE_CASES
    for name, pre in shapes.items():
        hf = trained_bpe(pre, [t for _, t in stdlib_texts[::150]])
        hf.save(str(tmp_path / f"{name}.json"))
        ours = load_tokenizer(tmp_path / f"{name}.json")
        ref = _hf_ids(hf, texts)
        assert _first_mismatch(texts, [ours.encode(t) for t in texts], ref) is None, name


def test_characters_missing_from_vocab_follow_hf(stdlib_texts, tmp_path):
    """Without the full byte alphabet HF drops unknown bytes, or maps them to unk_token."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf = trained_bpe(pre, ["def f(x): return x + 1\n" * 20], alphabet=False, specials=["<unk>"])
    hf.save(str(tmp_path / "plain.json"))
    texts = ["def g(y): return 42 🙂 + é\n", "zzz", "", "🙂🙂 def"]
    spec = json.loads((tmp_path / "plain.json").read_text("utf-8"))
    for unk, fuse in ((None, False), ("<unk>", False), ("<unk>", True)):
        spec["model"].update(unk_token=unk, fuse_unk=fuse)
        path = tmp_path / f"unk_{unk}_{fuse}.json"
        path.write_text(json.dumps(spec), "utf-8")
        hf = Tokenizer.from_file(str(path))
        ours = load_tokenizer(path)
        assert [ours.encode(t) for t in texts] == _hf_ids(hf, texts), (unk, fuse)


@pytest.mark.parametrize("fuse", [False, True])
def test_unk_token_goes_after_byte_fallback_tokens_that_follow_it_as_in_hf(fuse):
    """With byte_fallback and only some <0xNN> tokens, HF places an unk_token when the next
    character in the vocabulary (or the word's end) comes: é's fallback bytes after x (which
    has no token and no fallback) go before x's unk_token, and with fuse_unk a later unknown
    character joins that unk_token. Reference: HF's ids on the same file."""
    vocab = {"<unk>": 0, "a": 1, "y": 2, "<0xC3>": 3, "<0xA9>": 4}
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence",
                        "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": fuse, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}
    hf = Tokenizer.from_str(json.dumps(spec))
    texts = ["xé", "xéy", "éxé", "xéxa", "axéxéy"]
    ref = _hf_ids(hf, texts)
    assert ref[0] == [3, 4, 0]
    assert [BPETokenizer(spec).encode(t) for t in texts] == ref


@pytest.mark.parametrize("unk", [None, "<unk>"])
def test_characters_missing_from_vocab_leave_their_neighbours_one_word_as_in_hf(unk):
    """Without unk_token HF drops a character missing from the vocabulary and merges across
    the gap: "aéb" is the one token "ab" where é's bytes have none (an HF trainer's default
    leaves out the bytes its corpus lacks)."""
    spec = _hand_written_spec(["ab", "<unk>"], [("a", "b")], unk_token=unk)
    for b in "é".encode():
        del spec["model"]["vocab"][BYTE_TO_UNICODE[b]]
    hf = Tokenizer.from_str(json.dumps(spec))
    texts = ["aéb", "aééb", "a éb", "éab", "aé", "é"]
    ref = _hf_ids(hf, texts)
    assert (ref[0] == [spec["model"]["vocab"]["ab"]]) is (unk is None)
    assert [BPETokenizer(spec).encode(t) for t in texts] == ref


@pytest.mark.parametrize("style", PRETOKENIZER_STYLES)
def test_trained_here_loads_in_hf_with_identical_ids(style, stdlib_texts, tmp_path):
    """A BPE tokenizer trained by codelm saves a tokenizer.json that HF loads to the same ids on
    held-out text, the same vocab size and the same special-token ids."""
    train = [t for _, t in stdlib_texts[::60]]
    ours = BPETokenizer.train(train, 1200, pretokenizer=style, special_tokens=STARCODER_SPECIALS)
    path = ours.save(tmp_path)
    hf = Tokenizer.from_file(str(path))
    held_out = [t for _, t in stdlib_texts[7::60]] + EDGE_CASES
    assert [ours.encode(t) for t in held_out] == _hf_ids(hf, held_out)
    assert hf.get_vocab_size(with_added_tokens=True) == ours.vocab_size == 1200
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(held_out[0]) == ours.encode(held_out[0])
    assert ours.fim_middle_id == hf.token_to_id("<fim_middle>")
    assert ours.eos_id == hf.token_to_id("<|endoftext|>")


def test_split_special_tokens_encodes_their_text_as_hf_does(references, stdlib_texts, tmp_path):
    """Scraped code quoting ``<|endoftext|>`` or ``<fim_middle>`` must not become those special
    ids in dataset.py's documents (a false document end, a second FIM triple in a middle): with
    ``split_special_tokens`` their text is text, as HF's ``encode_special_tokens``. A
    non-special added token is still found."""
    train = [t for _, t in stdlib_texts[::60]]
    ours = BPETokenizer.train(train, 1200, special_tokens=STARCODER_SPECIALS)
    hf = Tokenizer.from_file(str(ours.save(tmp_path)))
    hf.encode_special_tokens = True
    texts = ['EOS = "<|endoftext|>"\n', "t = '<fim_prefix>{p}<fim_suffix>{s}<fim_middle>'\n"]
    assert ours.encode_batch(texts, num_workers=1, split_special_tokens=True) == _hf_ids(hf, texts)
    assert ours.encode_batch(texts * 400, num_workers=2, split_special_tokens=True) == (
        _hf_ids(hf, texts) * 400)
    assert not {ours.eos_id, ours.fim_middle_id} & {i for t in texts for i in
                                                   ours.encode(t, split_special_tokens=True)}
    assert ours.eos_id in ours.encode(texts[0])  # the default: HF's own default
    _, hf, tok = references["llama3"]  # shared: its setting is put back
    text = "x = '<|eot_id|>'  # 🙂"
    hf.encode_special_tokens = True
    try:
        assert tok.encode(text, split_special_tokens=True) == _hf_ids(hf, [text])[0]
    finally:
        hf.encode_special_tokens = False


def test_saved_directory_loads_in_transformers_with_roles(references, tmp_path):
    """A saved tokenizer directory loads in transformers' AutoTokenizer with HF's ids and the bos,
    eos and pad roles codelm gave it, and reloads in codelm with the same roles."""
    from transformers import AutoTokenizer

    path, hf, ours = references["llama3"]
    tok = BPETokenizer.from_file(path, roles={"eos": "<|eot_id|>", "pad": "<|end_of_text|>"})
    tok.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "def f(x):\n    return x  # 12345 🙂<|eot_id|>"
    assert auto(text, add_special_tokens=True)["input_ids"] == hf.encode(text).ids
    assert auto.eos_token_id == tok.eos_id == hf.token_to_id("<|eot_id|>")
    assert auto.pad_token_id == tok.pad_id and auto.bos_token_id == tok.bos_id
    reloaded = load_tokenizer(tmp_path)
    assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
    )


@pytest.mark.parametrize("min_frequency, merged", [(2, {"ab"}), (3, set())])
def test_bpe_training_min_frequency_boundary_as_hf(min_frequency, merged):
    """A pair seen exactly min_frequency times is merged, one seen fewer is not, as HF's
    BpeTrainer decides (ab twice; a|b after a space, z|q once)."""
    texts = ["ab ab zq"]
    ours = BPETokenizer.train(texts, 1000, min_frequency=min_frequency)
    hf = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), texts, vocab_size=1000,
                     min_frequency=min_frequency)
    specials = {"<|endoftext|>"}
    ref = {t for t in hf.get_vocab() if len(t) > 1} - specials
    assert {t for t in ours.spec["model"]["vocab"] if len(t) > 1} - specials == ref == merged


@pytest.mark.parametrize("texts", [["abc abc d d"], ["bcaac bcaac bcbac bca cdcb cdcb bddca"]])
def test_bpe_training_breaks_ties_by_token_ids_as_hf(texts):
    """Pairs seen equally often merge in the order of their token ids, as HF's BpeTrainer
    orders them: after a|b, ab|c and Ġ|d are both seen twice, and Ġ (a byte) has a lower id
    than ab (a merge), though "ab" sorts before "Ġ" as text. Reference: HF's merges."""
    ours = BPETokenizer.train(texts, 1000, min_frequency=2)
    hf = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), texts, vocab_size=1000,
                     min_frequency=2)
    ref = [tuple(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    assert [tuple(m) for m in ours.spec["model"]["merges"]] == ref
    assert ours.spec["model"]["vocab"] == hf.get_vocab(with_added_tokens=False)


@pytest.mark.parametrize("texts", [["aa aa aa"], ["aa aa aaa aaa aaaaa xyx xyx yxy"]])
def test_words_past_the_heap_threshold_merge_leftmost_first_as_hf(texts):
    """A word of more symbols than _LIST_SYMBOLS takes the heap; where one merge can apply at
    overlapping places (a run of one character, odd or even long) the leftmost goes first, as
    in HF's BPE, on either side of the threshold. Reference: HF's ids."""
    hf = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), texts, vocab_size=1000)
    ours = BPETokenizer(json.loads(hf.to_str()))
    words = []
    for length in range(_LIST_SYMBOLS - 3, _LIST_SYMBOLS + 6):
        words += ["a" * length, "xy" * length + "x", "yx" * length, "a" * length + "b"]
    for word in words:
        assert ours.encode(word) == hf.encode(word).ids, (len(word), word[:3])


def test_bpe_training_learns_frequent_words():
    """BPE training makes a frequent word one token ("Ġreturn"); a vocab_size with no room past
    the byte alphabet and an unknown pre-tokenizer style are refused naming them."""
    texts = ["def return self " * 50, "import numpy as np\n" * 30]
    tok = BPETokenizer.train(texts, 300, special_tokens=["<|endoftext|>"])
    assert tok.token_to_id("Ġreturn") is not None
    assert tok.encode(" return") == [tok.token_to_id("Ġreturn")]
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(texts, 100)
    with pytest.raises(ValueError, match="pre-tokenizer style"):
        BPETokenizer.train(texts, 300, pretokenizer="bert")


def test_bpe_training_takes_no_merges_from_special_token_text():
    """Special tokens in the training text separate documents (encode splits them out), so
    their characters are no material for merges (guards against train learning '<|' and the
    like). Reference: a hand count, every merged token but the special one comes from the code."""
    texts = ["x = 1<|endoftext|>y = 2<|endoftext|>"] * 5
    tok = BPETokenizer.train(texts, 1000, min_frequency=2)
    merged = {t for t in tok.spec["model"]["vocab"] if len(t) > 1}
    assert merged == {"<|endoftext|>", "Ġ1", "Ġ2", "Ġ="}


def test_bpe_training_cuts_out_the_longest_special_token_where_one_starts_another():
    """"<e>" starts "<e>zq": the text of "<e>zq" is one special token, as encode reads it (HF
    matches the longest), so its "zq" is no material for merges either. Reference: a hand
    count, every merged token but the special ones comes from "ab"."""
    tok = BPETokenizer.train(["ab<e>zq ab<e>zq"] * 3, 1000, special_tokens=["<e>", "<e>zq"],
                             min_frequency=2)
    merged = {t for t in tok.spec["model"]["vocab"] if len(t) > 1}
    assert merged == {"<e>", "<e>zq", "ab", "Ġab"}
    assert tok.encode("<e>zq") == [tok.token_to_id("<e>zq")]


def test_bpe_training_with_a_repeated_special_token_gives_dense_ids_hf_reads_alike(tmp_path):
    """A special token listed twice is one token: ids stay 0..vocab_size-1 (a repeat taking two
    ids would leave a hole), and HF reads the saved file with the same ids."""
    texts = ["def f(x):\n    return x<|endoftext|>"] * 5
    tok = BPETokenizer.train(texts, 300, special_tokens=["<|endoftext|>", "<pad>", "<|endoftext|>"])
    vocab = tok.spec["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert (tok.token_to_id("<|endoftext|>"), tok.token_to_id("<pad>")) == (0, 1)
    hf = Tokenizer.from_file(str(tok.save(tmp_path)))
    assert hf.encode(texts[0]).ids == tok.encode(texts[0])
    assert hf.get_vocab_size(with_added_tokens=True) == tok.vocab_size


def _hf_bpe_file(tmp_path, post_processor=None) -> tuple[Tokenizer, object]:
    """A small byte-level BPE trained by HF's BpeTrainer with specials <|endoftext|>, <a>, <b>
    and ``post_processor(hf)`` set, saved as tmp_path/tokenizer.json."""
    hf = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                     ["def f(x):\n    return x + 1\n"] * 20,
                     specials=("<|endoftext|>", "<a>", "<b>"), vocab_size=400)
    if post_processor is not None:
        hf.post_processor = post_processor(hf)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return hf, path


def test_bpe_save_keeps_an_existing_tokenizer_config(tmp_path):
    """BPETokenizer.save writes tokenizer_config.json "unless one is there already": an HF model
    directory's config (chat template, model_max_length) must survive a save (guards against
    replacing it). Reference: transformers' AutoTokenizer reads the kept model_max_length."""
    from transformers import AutoTokenizer

    _, path = _hf_bpe_file(tmp_path)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 123,
              "eos_token": "<|endoftext|>", "chat_template": "{{ messages }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    BPETokenizer.from_file(path).save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == config
    assert AutoTokenizer.from_pretrained(str(tmp_path)).model_max_length == 123


@pytest.mark.parametrize("value", [5, ["<|endoftext|>"], {"content": 5}, True])
def test_a_tokenizer_config_role_neither_a_token_nor_null_is_an_error_naming_it(value, tmp_path):
    """An id or a list where a token belongs is an error naming it, not ignored with the EOS
    guessed by name."""
    _hf_bpe_file(tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"pad_token": "<a>", "eos_token": value}))
    with pytest.raises(ValueError) as info:
        load_tokenizer(tmp_path)
    said = str(info.value)
    assert said.startswith(f"{config}: eos_token must be a token string"), said
    assert "null" in said and said.endswith(f"got {json.dumps(value)}"), said


def test_a_tokenizer_config_role_naming_no_token_of_the_vocabulary_is_an_error_naming_it(
        tmp_path):
    """transformers would add such a token past the model's embeddings; codelm refuses it."""
    _hf_bpe_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ValueError, match=r"tokenizer.json: bos_token '<s>' is not in the "
                                         "vocabulary"):
        load_tokenizer(tmp_path)


def test_an_added_token_with_empty_content_takes_no_id_as_in_hf():
    """HF skips an added token whose content is empty: the next one gets the id it would have
    had, and no empty match splits the text."""
    spec = _hand_written_spec(["ab"], [("a", "b")])
    n = len(spec["model"]["vocab"])
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False)
    spec["added_tokens"] = [{"id": n, "content": "", **flags, "special": True},
                            {"id": n + 1, "content": "<x>", **flags, "special": True}]
    hf = Tokenizer.from_str(json.dumps(spec))
    ours = BPETokenizer(spec)
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    assert ours.token_to_id("<x>") == hf.token_to_id("<x>") == n
    texts = ["ab<x>", "<x>a b", ""]
    assert [ours.encode(t) for t in texts] == _hf_ids(hf, texts)


def test_special_tokens_map_gives_the_roles_as_transformers_reads_it(tmp_path):
    """A checkpoint saved before transformers 4.34 names its roles in special_tokens_map.json:
    where tokenizer_config.json lists no added_tokens_decoder, the map's roles win (over the
    config's and the name guess), for the ids and the chat template alike; with an
    added_tokens_decoder the map is not read."""
    from transformers import AutoTokenizer

    _hf_bpe_file(tmp_path)
    template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                "{{ eos_token }}{% endfor %}")
    config = {"chat_template": template, "eos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<a>", "eos_token": {"content": "<b>", "lstrip": False}}))
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "hi"}]
    assert (ours.bos_id, ours.eos_id) == (auto.bos_token_id, auto.eos_token_id) == (
        ours.token_to_id("<a>"), ours.token_to_id("<b>"))
    assert ours.apply_chat_template(messages) == auto.apply_chat_template(
        messages, tokenize=False) == "<a>[user]hi<b>"
    decoder = {str(ours.token_to_id("<|endoftext|>")): {
        "content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {**config, "added_tokens_decoder": decoder}))
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert ours.eos_id == auto.eos_token_id == ours.token_to_id("<|endoftext|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": 7}))
    with pytest.raises(ValueError, match="special_tokens_map.json: eos_token must be a token"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("field", ["reasoning_content", "thinking", "reasoning"])
def test_a_messages_reasoning_renders_under_each_name_transformers_takes(tmp_path, field):
    """A Qwen3-style template reads message.reasoning_content, a gpt-oss one message.thinking:
    reasoning given under any of transformers' three names renders in either, as
    transformers renders it, so a trace in OpenAI's `reasoning` field is not dropped."""
    from transformers import AutoTokenizer

    _hf_bpe_file(tmp_path)
    template = ("{% for m in messages %}<a>{{ m.role }}\n{% if m.reasoning_content %}<think>"
                "{{ m.reasoning_content }}</think>{% endif %}{% if m.thinking %}[{{ m.thinking }}]"
                "{% endif %}{{ m.content }}<b>\n{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", field: "add two and two"}]
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    rendered = ours.apply_chat_template(messages)
    assert rendered == auto.apply_chat_template(messages, tokenize=False)
    assert "<think>add two and two</think>[add two and two]4" in rendered


def test_a_null_role_in_tokenizer_config_is_no_such_token_as_in_transformers(tmp_path):
    """transformers reads eos_token: null as no EOS; the name guess (<|endoftext|>) is only for
    a role the file does not name."""
    from transformers import AutoTokenizer

    hf, path = _hf_bpe_file(tmp_path, lambda hf: processors.TemplateProcessing(
        single="<b> $A", special_tokens=[("<b>", hf.token_to_id("<b>"))]))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": None, "eos_token": None, "pad_token": "<a>"}))
    ours, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (None, None, hf.token_to_id("<a>"))
    copy = tmp_path / "copy"  # a run's own copy reads back the same roles, and so does transformers
    copy.mkdir()
    ours.save(copy)
    reread, auto_copy = load_tokenizer(copy), AutoTokenizer.from_pretrained(str(copy))
    assert (reread.bos_id, reread.eos_id, reread.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
    assert (auto_copy.bos_token_id, auto_copy.eos_token_id) == (None, None)
    assert tokenizer_fingerprint(reread) == tokenizer_fingerprint(ours)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<a>"}))
    guessed = load_tokenizer(tmp_path)
    assert (guessed.bos_id, guessed.eos_id) == (hf.token_to_id("<b>"), hf.token_to_id("<|endoftext|>"))


def test_a_slow_format_directory_is_refused_saying_how_transformers_converts_it(tmp_path):
    """vocab.json + merges.txt without tokenizer.json: the error says codelm reads tokenizer.json
    and how to write one; doing so gives a tokenizer with transformers' ids."""
    from transformers import GPT2TokenizerFast

    hf, _ = _hf_bpe_file(tmp_path)
    slow = tmp_path / "slow"
    slow.mkdir()
    hf.model.save(str(slow))  # vocab.json and merges.txt, as GPT-2's hub repo holds them
    for load in (load_tokenizer, BPETokenizer.from_file):
        with pytest.raises(ValueError) as info:
            load(slow)
        said = str(info.value)
        assert said.startswith(f"{slow}: ") and "no tokenizer.json" in said, said
        assert (f"AutoTokenizer.from_pretrained({str(slow)!r}).save_pretrained({str(slow)!r})"
                in said), said
    fast = GPT2TokenizerFast.from_pretrained(str(slow))  # no config: AutoTokenizer cannot tell
    fast.save_pretrained(str(slow))
    text = "def f(x):\n    return x + 1  # éλ"
    assert load_tokenizer(slow).encode(text) == fast(text)["input_ids"]


@pytest.mark.parametrize("order", ["a_first", "b_first"])
def test_a_post_processor_sequence_of_two_templates_is_refused(order, tmp_path):
    """HF tokenizers (0.23) applies only the first of two TemplateProcessing steps in a Sequence
    (and panics, "not yet implemented", with some orders), where codelm would compose both: such
    a file is refused, naming the file and post_processor, never tokenized differently. A
    Sequence of ByteLevel and one template (Llama-3's shape) still reads as HF reads it."""
    def template(hf, single):
        names = regex.findall(r"<[^ ]+>", single)
        return processors.TemplateProcessing(
            single=single, special_tokens=[(t, hf.token_to_id(t)) for t in names])

    singles = ["<a> $A", "<b> $A <|endoftext|>"][:: 1 if order == "a_first" else -1]
    _, path = _hf_bpe_file(tmp_path, lambda hf: processors.Sequence(
        [template(hf, s) for s in singles]))
    with pytest.raises(ValueError, match="post_processor.*Sequence of 2 TemplateProcessing") as e:
        load_tokenizer(path)
    assert str(path) in str(e.value)

    hf, path = _hf_bpe_file(tmp_path, lambda hf: processors.Sequence(
        [processors.ByteLevel(trim_offsets=False), template(hf, singles[0])]))
    for text in ("def f(x):", "x + 1"):
        assert load_tokenizer(path).encode(text, add_special_tokens=True) == hf.encode(text).ids


# ---------------------------------------------------------------------------------------------
# CodeTokenizer
# ---------------------------------------------------------------------------------------------


def test_code_pieces_split_identifiers_and_keep_layout():
    """The split as train counts it and encode looks it up: with every piece kept, one id each."""
    text = "class HTTPServer:\n    def getValue_x(self, my_var2):\n\treturn  42\r\n"
    pieces = [
        "class", " ", "HTTP", "Server", ":", "\n",
        "    ", "def", " ", "get", "Value", "_", "x", "(", "self", ",", " ", "my", "_", "var", "2",
        "):", "\n", "\t", "return", "  ", "42", "\r\n",
    ]  # fmt: skip
    tok = CodeTokenizer.train([text], min_freq=1)
    assert sorted(tok.pieces) == sorted(set(pieces))
    assert [tok.id_to_token(i) for i in tok.encode(text)] == pieces
    assert _hf_pieces(Tokenizer.from_str(json.dumps(tok.to_hf())), text) == pieces


def test_code_tokenizer_longest_match_reaches_the_longest_piece():
    """An unknown piece is cut into the longest known sub-pieces, up to and including the
    longest piece's own length (abcd, 4 characters), as HF reads the export."""
    tok = CodeTokenizer(["abcd", "ab", "cd", "x"], min_freq=1)
    hf = Tokenizer.from_str(json.dumps(tok.to_hf()))
    texts = ["abcdx", "xabcd", "abcdabcd", "abc", "xabcdx"]
    assert [tok.encode(t) for t in texts] == _hf_ids(hf, texts)
    assert [tok.id_to_token(i) for i in tok.encode("xabcd")] == ["x", "abcd"]


def test_code_tokenizer_vocab_min_freq_and_specials(code_tok, code_tok_hf, stdlib_texts):
    """A CodeTokenizer's vocabulary is exactly the pieces seen min_freq times or more; it holds
    the common pieces of code (indents, keywords) and six distinct special ids, with bos and eos
    around an encoded text."""
    train = [t for _, t in stdlib_texts[::40]]  # HF's pre_tokenize_str is slow in Python
    tok = CodeTokenizer.train(train, min_freq=10)
    counts = Counter(piece for text in train for piece in _hf_pieces(code_tok_hf, text))
    assert all(counts[p] >= 10 for p in tok.pieces)
    assert {p for p, n in counts.items() if n >= 10} == set(tok.pieces)
    for piece in ("\n", "    ", "        ", "self", "return", "Error", "_"):
        assert code_tok.token_to_id(piece) is not None, piece
    ids = [code_tok.pad_id, code_tok.bos_id, code_tok.eos_id]
    ids += [code_tok.fim_prefix_id, code_tok.fim_middle_id, code_tok.fim_suffix_id]
    assert len(set(ids)) == 6 and all(0 <= i < code_tok.vocab_size for i in ids)
    assert code_tok.encode("x", add_special_tokens=True)[::2] == [code_tok.bos_id, code_tok.eos_id]


def test_code_tokenizer_lossless_on_held_out_files(code_tok, stdlib_texts):
    """On held-out files decode(encode(x)) is x and encode_batch agrees with encode, at over 2
    characters a token with under 1% byte tokens; rare text falls back to bytes and round-trips."""
    held_out = [t for _, t in stdlib_texts[1::16]]  # ~2 MiB: encode_batch's workers encode it
    all_ids = code_tok.encode_batch(held_out, num_workers=2)
    assert all_ids == [code_tok.encode(t) for t in held_out[:50]] + all_ids[50:]
    for text, ids in zip(held_out, all_ids):
        assert code_tok.decode(ids) == text
    n_tokens = sum(map(len, all_ids))
    n_bytes = sum(code_tok.is_byte_token(i) for ids in all_ids for i in ids)
    assert sum(map(len, held_out)) / n_tokens > 2.0
    assert n_bytes / n_tokens < 0.01
    # Rare text falls back to bytes and still round-trips.
    odd = "ʕ•ᴥ•ʔ 🙂 zzqxj_Qwerty𝔘𝔫𝔦"
    ids = code_tok.encode(odd)
    assert any(code_tok.is_byte_token(i) for i in ids)
    assert code_tok.decode(ids) == odd


def test_code_tokenizer_save_load(code_tok, stdlib_texts, tmp_path):
    """A CodeTokenizer saved to a file or a directory loads back (load_tokenizer) as a
    CodeTokenizer with the same vocabulary and ids."""
    path = code_tok.save(tmp_path / "tok.json")
    loaded = load_tokenizer(path)
    assert isinstance(loaded, CodeTokenizer)
    assert loaded.vocab_size == code_tok.vocab_size
    text = stdlib_texts[5][1]
    assert loaded.encode(text) == code_tok.encode(text)
    code_tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("x = 1") == code_tok.encode("x = 1")


def test_a_tokenizer_saved_to_a_new_path_without_json_makes_it_a_directory(code_tok, tmp_path):
    """As transformers' save_pretrained: a path that is not there and not named *.json is a
    directory, made, holding tokenizer.json and tokenizer_config.json; a second save there
    writes into it."""
    for name in ("new", "nested/new/"):
        saved = code_tok.save(tmp_path / name)
        assert saved == tmp_path / name.rstrip("/") / "tokenizer.json"
        assert (saved.parent / "tokenizer_config.json").is_file()
        assert code_tok.save(tmp_path / name) == saved
        assert load_tokenizer(tmp_path / name).encode("x = 1") == code_tok.encode("x = 1")


def test_special_token_strings_in_code_are_text_in_hf_and_transformers_too(code_tok, tmp_path):
    """``"<eos>"`` in scraped code is text, for codelm and for the exported tokenizer read by HF
    tokenizers and by transformers (which still knows every special token as special)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    code_tok.save(tmp_path)
    text = ('SPECIALS = ["<pad>", "<bos>", "<eos>"]  # <fim_prefix>x<fim_suffix>y<fim_middle>\n'
            "if tok != '<eos>' and s.endswith('<<pad>>'): ids = [<bos>]<eos>\n")
    ids = code_tok.encode(text)
    assert not set(ids) & set(range(len(code_tok.special_tokens)))
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    for hf_ids in (raw.encode(text).ids, auto(text, add_special_tokens=False)["input_ids"],
                   PreTrainedTokenizerFast.from_pretrained(str(tmp_path))(text)["input_ids"],
                   PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))(
                       text)["input_ids"]):
        assert hf_ids == ids
    specials = list(range(len(code_tok.special_tokens)))
    assert raw.token_to_id("<eos>") == code_tok.eos_id and raw.id_to_token(0) == "<pad>"
    assert sorted(auto.all_special_ids) == specials
    mixed = [code_tok.bos_id, code_tok.fim_prefix_id, *ids, code_tok.fim_middle_id,
             code_tok.eos_id]
    assert auto.decode(mixed, skip_special_tokens=True) == code_tok.decode(
        mixed, skip_special_tokens=True) == text
    assert auto.decode(mixed) == raw.decode(mixed, skip_special_tokens=False) == code_tok.decode(
        mixed)
    assert load_tokenizer(tmp_path).special_tokens == code_tok.special_tokens
    # A file that lists them as added tokens (a transformers save) reads back.
    spec = code_tok.to_hf()
    spec["added_tokens"] = [{"id": i, "content": t, "special": True}
                            for i, t in enumerate(code_tok.special_tokens)]
    assert CodeTokenizer.from_hf(spec).special_tokens == code_tok.special_tokens
    # A special token a code piece could hold would be read inside code by HF: no HF form.
    with pytest.raises(ValueError, match=r"special tokens \['PAD', '<<'\] could be read inside"):
        CodeTokenizer(["x"], special_tokens=["PAD", "<eos>", "<<"]).to_hf()


def test_a_special_token_spelled_in_byte_level_characters_has_no_hf_form():
    """A non-ASCII special token may be the ByteLevel spelling of code: "ĠĠ" is how the export
    writes the two-space piece, so HF would read two spaces in code as that special token.
    Such tokens are refused; the reason is shown on an export with "<eos>" renamed by hand."""
    with pytest.raises(ValueError, match=r"special tokens \['ĠĠ'\] could be read inside"):
        CodeTokenizer(["x", "  "], min_freq=1, special_tokens=["<eos>", "ĠĠ"]).to_hf()
    spec = CodeTokenizer(["x"], min_freq=1, special_tokens=["<eos>", "<x>"]).to_hf()
    vocab = spec["model"]["vocab"]
    vocab["ĠĠ"] = vocab.pop("<x>")
    assert Tokenizer.from_str(json.dumps(spec)).encode("x  x").ids == [2 + 256, 1, 2 + 256]


def test_decode_refuses_ids_outside_the_vocabulary_negative_ones_too(code_tok, references):
    """-100 (ignored labels) or -1 would index the vocabulary from its end: refused, named."""
    import numpy as np

    _, _, bpe = references["gpt2"]
    for tok in (code_tok, bpe):
        for ids in ([5, -1], [-100], [tok.vocab_size, 7]):
            with pytest.raises(ValueError, match=rf"out of range \[0, {tok.vocab_size}\): .*"
                               rf"{ids[-1] if ids[0] == 5 else ids[0]}"):
                tok.decode(ids)
            with pytest.raises(ValueError, match="out of range"):
                tok.decode(iter(ids), skip_special_tokens=True)
        ids = tok.encode("def f(x):\n    return x\n")
        assert tok.decode(np.array(ids)) == tok.decode(ids) == "def f(x):\n    return x\n"
    for i in (-1, code_tok.vocab_size):
        with pytest.raises(ValueError, match=rf"out of range .*\[{i}\]"):
            code_tok.id_to_token(i)
    assert code_tok.id_to_token(code_tok.vocab_size - 1) == code_tok.pieces[-1]


def test_decode_refuses_a_batch_or_a_single_id_saying_so(tmp_path):
    """generate's (1, T) output passed without [0] is refused as a batch (decode each row), not
    as ids "out of range" naming a whole row; a single id too, not a TypeError from iterating an
    int."""
    import numpy as np
    import torch

    hf, path = _hf_bpe_file(tmp_path)
    tok = load_tokenizer(path)
    ids = hf.encode("def f(x):\n    return x + 1\n").ids
    for wrong in (torch.tensor([ids]), np.array([ids, ids]), [ids], [torch.tensor(ids)], ids[0],
                  torch.tensor(ids[0]), [1.0]):
        with pytest.raises(ValueError, match=r"^decode takes one sequence.* got .*"
                                             r"decode each row"):
            tok.decode(wrong)
    assert tok.decode(torch.tensor(ids)) == tok.decode(tuple(ids)) == hf.decode(ids)


def test_encode_batch_refuses_one_str_instead_of_encoding_each_character(tmp_path):
    """encode_batch given one str would encode each character as a text: it is refused pointing
    to encode(text), and a list of one text encodes as HF does."""
    hf, path = _hf_bpe_file(tmp_path)
    tok = load_tokenizer(path)
    with pytest.raises(ValueError, match=r"^encode_batch .*list of texts, got a str.*"
                                         r"encode\(text\)"):
        tok.encode_batch("def f(x):", num_workers=1)
    assert tok.encode_batch(["def f(x):"], num_workers=1) == [hf.encode("def f(x):").ids]


def test_code_tokenizer_json_gives_hf_and_transformers_the_same_ids(code_tok, stdlib_texts,
                                                                   tmp_path):
    """What a from-scratch run exports runs anywhere: the saved tokenizer.json gives HF
    tokenizers and transformers' AutoTokenizer this tokenizer's ids and text, byte fallback and
    sub-pieces included, and codelm reads it back as the same CodeTokenizer."""
    from transformers import AutoTokenizer

    code_tok.save(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    vocab = hf.get_vocab()
    assert "<0x61>" in vocab and vocab["a"] == code_tok.token_to_id("a")  # the piece wins
    stress = "héllo wörld 日本語 \x1c\x1f\u00a0\u2028 x\u0301 \U0001F600 ΑΒΓ ǅungla HTTPServer_x"
    held_out = [t for _, t in stdlib_texts[1::40]] + [stress]
    for text in held_out:
        ids = code_tok.encode(text)
        assert hf.encode(text).ids == ids
        assert hf.decode(ids) == text
    assert any(code_tok.is_byte_token(i) for i in code_tok.encode(stress))
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(held_out[0])["input_ids"] == code_tok.encode(held_out[0])
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        code_tok.bos_id, code_tok.eos_id, code_tok.pad_id)
    reloaded = load_tokenizer(tmp_path)
    assert isinstance(reloaded, CodeTokenizer) and reloaded.pieces == code_tok.pieces
    assert reloaded.encode(stress) == code_tok.encode(stress)


def test_long_pieces_are_cut_alike_in_codelm_and_its_hf_export(code_tok, code_tok_hf):
    """HF's WordPiece is about cubic in a piece's length (16k characters in one piece: 77 s):
    codelm and the export's second Split cut pieces at MAX_PIECE_CHARS, with the same ids."""
    k = MAX_PIECE_CHARS
    texts = ["q" * 4000, "#" + "-" * 3000, "x" + " " * 2000 + "x", "ABC" + "d" * (k + 1),
             "q" * k, "q" * (k + 1), "日本語" * 300 + "\n", "\n" + "\t" * 700 + "if", "7" * 999]
    for text in texts:
        pieces = _hf_pieces(code_tok_hf, text)
        assert max(map(len, pieces)) <= k and "".join(pieces) == text
        ids = code_tok.encode(text)
        assert code_tok_hf.encode(text).ids == ids and code_tok.decode(ids) == text
    assert len(code_tok.encode("q" * (3 * k))) == 3 * len(code_tok.encode("q" * k))
    # Training counts the cut pieces, the ones encode looks up.
    tok = CodeTokenizer.train(["x = '" + "=" * (2 * k + 10) + "'\n"] * 3, min_freq=2)
    assert max(map(len, tok.pieces)) <= k and "=" * k in tok.pieces
    text = "y = '" + "=" * (2 * k + 10) + "'"
    assert len(tok.encode(text)) < 10
    assert Tokenizer.from_str(json.dumps(tok.to_hf())).encode(text).ids == tok.encode(text)


def test_encoding_version_names_regex_and_keys_the_dataset_cache(code_tok, monkeypatch):
    """Ids depend on the installed `regex` too (its Unicode tables: U+0295 is Ll before Unicode
    16, Lo after), so dataset's token-file key includes ENCODING_VERSION."""
    assert regex.__version__ in ENCODING_VERSION
    before = tokenizer_fingerprint(code_tok)
    assert tokenizer_fingerprint(code_tok) == before
    monkeypatch.setattr(encoding, "ENCODING_VERSION", ENCODING_VERSION + "-other")
    assert tokenizer_fingerprint(code_tok) != before


@pytest.mark.parametrize("specials", [("<pad>",), (), ("<|endoftext|>", "<pad>"), ("<eos>",)])
def test_code_tokenizer_without_bos_or_eos(specials, tmp_path):
    """Custom special tokens may lack <bos>/<eos> (bos_id/eos_id are None, as for a
    BPETokenizer): encode adds the ones there are, and the tokenizer saves and reloads."""
    tok = CodeTokenizer.train(["def foo(x):\n    return x\n"] * 3, min_freq=1,
                              special_tokens=specials)
    plain = tok.encode("x")
    ids = tok.encode("x", add_special_tokens=True)
    assert ids == plain + ([tok.eos_id] if "<eos>" in specials else [])
    assert tok.decode(ids, skip_special_tokens=True) == "x"
    tok.save(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "def foo(x):\n    return x  # <pad>\n"
    assert hf.encode(text).ids == tok.encode(text) == load_tokenizer(tmp_path).encode(text)
    assert load_tokenizer(tmp_path).special_tokens == list(specials)


def test_byte_tokens_are_read_only_as_written(code_tok):
    """token_to_id reads the spelling id_to_token writes, ``<0xNN>`` in upper-case hex."""
    first = code_tok.token_to_id("<0x00>")
    assert [code_tok.token_to_id(f"<0x{b:02X}>") for b in range(256)] == list(
        range(first, first + 256))
    assert all(code_tok.id_to_token(i) == f"<0x{i - first:02X}>" for i in range(first, first + 256))
    for bad in ("<0x-1>", "<0x+1>", "<0x 1>", "<0x٣٣>", "<0x1>", "<0x123>", "<0xzz>", "<0x4a>",
                "<0X4A>", "<0x4A> "):
        assert code_tok.token_to_id(bad) is None, bad


def test_training_makes_no_piece_of_a_special_tokens_text():
    """Custom special tokens may be spelled as a code piece ("PAD"): train keeps such a piece
    out of the vocabulary, so every token string names one id, as in an HF vocabulary."""
    tok = CodeTokenizer.train(["PAD = 1\nPAD = 2\n"] * 3, min_freq=1, special_tokens=("PAD",))
    assert "PAD" not in tok.pieces and tok.token_to_id("PAD") == 0
    tokens = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    assert len(set(tokens)) == len(tokens)
    assert tok.decode(tok.encode("PAD = 3\n")) == "PAD = 3\n"


def test_a_code_tokenizer_file_of_another_version_is_refused(tmp_path):
    """A codelm-format file (what a comment-stripping tokenizer saves) of a later version may
    mean other ids: refused by name, never read as version 1."""
    tok = CodeTokenizer.train(["def f(x):  # c\n    return x\n"] * 2, min_freq=1,
                              strip_comments=True)
    path = tok.save(tmp_path / "tok.json")
    assert load_tokenizer(path).pieces == tok.pieces
    for version in (2, "1", None):
        path.write_text(json.dumps({**tok.to_dict(), "format_version": version}), "utf-8")
        for load in (load_tokenizer,):
            with pytest.raises(ValueError, match=rf"tok.json: .*format_version "
                                                 rf"{regex.escape(repr(version))}.*reads "
                                                 "format_version 1"):
                load(path)


def _some_stdlib_texts(stdlib_texts, n: int) -> list[str]:
    return [t for _, t in stdlib_texts[::60][:n]]


@pytest.mark.parametrize("max_vocab", [1, 7, 50])
def test_max_vocab_keeps_exactly_the_most_frequent_pieces_in_frequency_order(
        max_vocab, stdlib_texts, code_tok_hf):
    """max_vocab keeps exactly N pieces, the N most frequent, with ids by descending count (ties
    by text) as train's docstring says (guards against keeping the rarest, or one too few).
    Reference: piece counts by HF's own pre-tokenizer on the exported regex."""
    texts = _some_stdlib_texts(stdlib_texts, 12)
    tok = CodeTokenizer.train(texts, min_freq=2, max_vocab=max_vocab)
    counts = Counter(p for t in texts for p in _hf_pieces(code_tok_hf, t))
    ranked = sorted((p for p, n in counts.items() if n >= 2), key=lambda p: (-counts[p], p))
    assert tok.pieces == ranked[:max_vocab] and len(tok.pieces) == max_vocab
    first = tok.vocab_size - max_vocab
    assert [tok.id_to_token(first + i) for i in range(max_vocab)] == tok.pieces


def test_a_comment_stripping_tokenizer_learns_its_vocabulary_from_stripped_code(stdlib_texts):
    """strip_comments=True encodes stripped text, so train counts pieces on stripped text: a
    word seen only in comments and docstrings is no piece (guards against train ignoring the
    option). Reference: the same texts stripped first, trained without the option."""
    code = ('def f(x):\n    """Zqdocword explains zqdocword."""\n'
            "    return x  # zqcommentword zqcommentword\n")
    texts = [code] * 5 + _some_stdlib_texts(stdlib_texts, 4)
    tok = CodeTokenizer.train(texts, min_freq=2, strip_comments=True)
    assert "zqcommentword" not in tok.pieces and "Zqdocword" not in tok.pieces
    ref = CodeTokenizer.train([strip_comments_and_docstrings(t) for t in texts], min_freq=2)
    assert tok.pieces == ref.pieces


def test_training_on_text_with_a_lone_surrogate_still_saves_for_hf(tmp_path):
    """A lone surrogate (JSON can spell one) is no UTF-8 and so no piece (guards against a
    surrogate piece, which would make save crash): the tokenizer saves, and HF reads the same
    ids."""
    tok = CodeTokenizer.train(["s = '\ud83d'\nx = 1\n"] * 3, min_freq=1)
    assert "\ud83d" not in tok.pieces
    hf = Tokenizer.from_file(str(tok.save(tmp_path)))
    assert hf.encode("x = 1\n").ids == tok.encode("x = 1\n")


def test_skip_special_tokens_keeps_a_nul_byte_as_transformers_does(tmp_path):
    """skip_special_tokens drops the special tokens only, not byte token 0x00 (the id right
    after them; guards against an off-by-one in the special ids). Reference: transformers'
    AutoTokenizer on the saved tokenizer."""
    from transformers import AutoTokenizer

    tok = CodeTokenizer.train(["def f(x):\n    return x\n"] * 3, min_freq=1)
    text = "x = '\x00'\n"
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert tok.token_to_id("<0x00>") in ids
    tok.save(tmp_path)
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert AutoTokenizer.from_pretrained(str(tmp_path)).decode(
        ids, skip_special_tokens=True) == text


def test_saving_into_a_directory_replaces_an_older_tokenizer_config(tmp_path):
    """A CodeTokenizer saved where another one was saved (a re-trained tokenizer in the same run
    directory) names its own roles in tokenizer_config.json (guards against keeping the old
    one's). Reference: transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    CodeTokenizer.train(["x = 1\n"] * 2, min_freq=1, special_tokens=("<pad>",)).save(tmp_path)
    new = CodeTokenizer.train(["x = 1\n"] * 2, min_freq=1)
    new.save(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (
        new.bos_id, new.eos_id, new.pad_id)
    assert sorted(auto.all_special_ids) == list(range(len(new.special_tokens)))


def test_a_nul_piece_survives_the_hf_round_trip(tmp_path):
    """A piece "\\x00" is written in its ByteLevel spelling, the same character as byte 0x00's,
    so reading back must take the byte block's start from "<0x00>", not from the piece (guards
    against a wrong n_specials). Reference: HF tokenizers on the saved file."""
    tok = CodeTokenizer.train(["x = \x00\ny = 1\n"] * 3, min_freq=1)
    assert "\x00" in tok.pieces
    path = tok.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.pieces == tok.pieces and back.special_tokens == tok.special_tokens
    text = "z = \x00 + '\x01'\n"
    assert back.encode(text) == tok.encode(text) == Tokenizer.from_file(str(path)).encode(text).ids


@pytest.fixture
def parallel_from_128k(monkeypatch) -> int:
    """Batches over 128 KiB go to the workers (1 MiB by default): the same pool and the same
    code path, on an eighth of the text to encode twice."""
    monkeypatch.setattr(batching, "MIN_PARALLEL_CHARS", 1 << 17)
    return batching.MIN_PARALLEL_CHARS


def test_parallel_encode_batch_returns_every_text_in_order(code_tok, stdlib_texts,
                                                           parallel_from_128k):
    """encode_batch over worker processes (over the parallel threshold, texts of uneven lengths
    so the chunks do not divide evenly) returns one id list per text, in order, as encode does
    (guards against losing the last partial chunk)."""
    base = _some_stdlib_texts(stdlib_texts, 30)
    texts = [(base[i % len(base)] * 8)[: 600 + 7919 * i % 6000] for i in range(60)]
    assert sum(map(len, texts)) > parallel_from_128k
    out = code_tok.encode_batch(texts, num_workers=2)
    assert out == [code_tok.encode(t) for t in texts]


def test_parallel_encode_batch_adds_special_tokens_in_the_workers_too(parallel_from_128k):
    """Over the parallel threshold the workers encode, with the caller's add_special_tokens (each
    option reaching the workers as itself, not as the other). Reference: encode one text at a
    time."""
    tok = CodeTokenizer.train(["def f(x):\n    return x + 1\n"] * 3, min_freq=1)
    texts = ["def f(x):\n    return x + 1\n" * 5000, "x = 1\n" * 1000]
    assert sum(map(len, texts)) > parallel_from_128k
    out = tok.encode_batch(texts, num_workers=2, add_special_tokens=True)
    assert out == [tok.encode(t, add_special_tokens=True) for t in texts]
    assert out[1][0] == tok.bos_id and out[1][-1] == tok.eos_id


def test_a_batch_encoder_keeps_one_pool_across_batches(code_tok, stdlib_texts,
                                                      parallel_from_128k):
    """BatchEncoder starts its workers at the first batch over the parallel threshold and encodes
    later batches on the same pool (warm piece caches), each text's ids as encode gives them;
    leaving the context stops the pool."""
    texts = _some_stdlib_texts(stdlib_texts, 20)
    assert sum(map(len, texts[:2])) < parallel_from_128k < sum(map(len, texts))
    with code_tok.batch_encoder(num_workers=2) as encode:
        assert encode(texts[:2]) == [code_tok.encode(t) for t in texts[:2]]  # small: in-process
        assert encode._pool is None
        first = encode(texts)
        pool = encode._pool
        second = [ids.tolist() for ids in encode.arrays(texts[::-1])]
        assert pool is not None and encode._pool is pool
    assert encode._pool is None
    assert first == [code_tok.encode(t) for t in texts] == second[::-1]


@pytest.mark.parametrize("strip_comments", [False, True])
def test_training_counts_pieces_the_same_on_one_or_two_workers(stdlib_texts, monkeypatch,
                                                               strip_comments):
    """CodeTokenizer.train counting pieces in many batches on 2 worker processes keeps the same
    pieces in the same order as counting them in this process."""
    import tokenizer

    monkeypatch.setattr(tokenizer, "_COUNT_BATCH_CHARS", 20_000)
    texts = [t for _, t in stdlib_texts[::100]]
    assert sum(map(len, texts)) > 10 * tokenizer._COUNT_BATCH_CHARS
    one = CodeTokenizer.train(texts, min_freq=3, strip_comments=strip_comments, num_workers=1)
    two = CodeTokenizer.train(iter(texts), min_freq=3, strip_comments=strip_comments,
                              num_workers=2)
    assert len(one.pieces) > 1000
    assert two.pieces == one.pieces


def _encode_in_daemon(tok, texts, queue):
    try:
        queue.put(("ok", tok.encode_batch(texts, num_workers=2) == [tok.encode(t) for t in texts]))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(e).__name__}: {e}"))


def test_encode_batch_inside_a_daemon_process_encodes_in_process(code_tok, stdlib_texts,
                                                                 parallel_from_128k):
    """A DataLoader worker is a daemon process, which may not start children: encode_batch there
    of a batch over the parallel threshold (the forked child inherits it) encodes in-process
    (guards against "daemonic processes are not allowed to have children")."""
    import multiprocessing

    texts = _some_stdlib_texts(stdlib_texts, 20)
    assert sum(map(len, texts)) > parallel_from_128k
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_encode_in_daemon, args=(code_tok, texts, queue), daemon=True)
    proc.start()
    result = queue.get(timeout=120)
    proc.join(timeout=30)
    assert result == ("ok", True)


def test_strip_comments_and_docstrings(stdlib_texts):
    """Stripping removes comments and docstrings and nothing else: a string holding '#' stays, an
    emptied body gets pass, code that does not parse is left as it is, and on the standard library
    the result parses, with no comment or docstring left."""
    source = (
        '"""Module doc."""\n'
        "import os  # why\n"
        "# a whole-line comment\n"
        "\n"
        "class A:\n"
        '    """Class doc."""\n'
        "    x = '# not a comment'\n"
        "\n"
        "    def f(self):\n"
        "        '''Only a docstring.'''\n"
        "\n"
        "def g(): 'doc'; return 1\n"
    )
    assert strip_comments_and_docstrings(source) == (
        "import os\n"
        "\n"
        "class A:\n"
        "    x = '# not a comment'\n"
        "\n"
        "    def f(self):\n"
        "        pass\n"
        "\n"
        "def g(): pass; return 1\n"
    )
    assert strip_comments_and_docstrings("def broken(:\n  # c\n") == "def broken(:\n  # c\n"
    for name, text in stdlib_texts[::120]:
        stripped = strip_comments_and_docstrings(text)
        try:
            original = ast.parse(text)
        except SyntaxError:
            assert stripped == text
            continue
        tree = ast.parse(stripped)  # still valid Python
        tokens = tokenize.generate_tokens(io.StringIO(stripped).readline)
        assert not any(t.type == tokenize.COMMENT for t in tokens), name
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                assert ast.get_docstring(node) is None, name
        # Only comments and docstrings went: the code itself is unchanged.
        n_defs = sum(isinstance(n, ast.FunctionDef | ast.ClassDef) for n in ast.walk(original))
        assert n_defs == sum(isinstance(n, ast.FunctionDef | ast.ClassDef) for n in ast.walk(tree))


def test_strip_options_strict_mode_and_pathological_nesting():
    """comments=False and docstrings=False keep that kind; nesting too deep for the parser leaves
    the text unchanged, and with strict=True raises one of the errors every caller catches."""
    source = 'def f():\n    """Doc."""\n    return 1  # one\n# alone\n'
    assert strip_comments_and_docstrings(source, docstrings=False) == (
        'def f():\n    """Doc."""\n    return 1\n')
    assert strip_comments_and_docstrings(source, comments=False) == (
        "def f():\n    return 1  # one\n# alone\n")
    assert strip_comments_and_docstrings(source, False, False) == source
    # Nesting past the parser's fixed stack (6000 levels in CPython 3.11-3.13; a chain of 6000
    # `+` exhausted 3.11's recursion limit but parses on 3.12.3+): unchanged, or with strict one
    # of the errors every caller catches.
    deep = "x = (\n" + "    not\n" * 10000 + "    True)\n"
    assert strip_comments_and_docstrings(deep) == deep
    for bad in (deep, "def broken(:\n"):
        with pytest.raises(PYTHON_PARSE_ERRORS):
            strip_comments_and_docstrings(bad, strict=True)


def test_strip_at_line_breaks_python_does_not_count():
    """Form feeds, \\v, \\x1c-\\x1e, U+0085, U+2028 and U+2029 end no Python line (str.splitlines
    ends one at each): the stripped text is the original's AST without docstrings (reference:
    ast), keeps its CRLF or CR line ends, and has no comment left (reference: tokenize)."""
    source = (
        "import os  # \x0c\n"
        "\x0c\n"
        "SEP = '\x0b\x1c\x1d\x1e\x85\u2028\u2029'  # \u2028\x85 in a comment\n"
        "def add(a, b):\n"
        '    """Add.\x0c\n'
        '    Two numbers."""\n'
        "    return a + b  # sum\n"
        "\x0c\n"
        "class Box:\n"
        '    """A box\u2028."""\n'
        "    def get(self):\n"
        "        '''Return.'''\n"
    )
    reference = ast.parse(source)
    documented = ast.Module | ast.ClassDef | ast.FunctionDef
    for node in ast.walk(reference):
        if isinstance(node, documented) and docstring_statement(node):
            node.body = node.body[1:] or [ast.Pass()]
    stripped = strip_comments_and_docstrings(source, strict=True)
    assert ast.dump(ast.parse(stripped)) == ast.dump(reference)
    tokens = tokenize.generate_tokens(io.StringIO(stripped).readline)
    assert not any(t.type == tokenize.COMMENT for t in tokens)
    for end in ("\r\n", "\r"):
        assert strip_comments_and_docstrings(source.replace("\n", end), strict=True) == (
            stripped.replace("\n", end))


def test_strict_stripping_refuses_output_that_does_not_parse(monkeypatch):
    """A strict caller (dataset cleaning) never gets text that does not parse, whatever goes
    wrong inside: here a lone docstring is wrongly removed without its ``pass``."""
    from codelm.tokenization import source as source_module

    source = 'def f():\n    """Only a docstring."""\n'
    monkeypatch.setattr(source_module, "_docstring_nodes",
                        lambda tree: [(tree.body[0].body[0], False)])
    assert strip_comments_and_docstrings(source) == "def f():\n"  # best effort: as it came out
    with pytest.raises(PYTHON_PARSE_ERRORS):
        strip_comments_and_docstrings(source, strict=True)


def test_code_tokenizer_strip_option_round_trips_stripped_text(strip_tok, stdlib_texts, tmp_path):
    """A CodeTokenizer saved with strip_comments keeps the option when loaded, and
    decode(encode(x)) is x stripped of comments and docstrings."""
    tok = load_tokenizer(strip_tok.save(tmp_path / "t.json"))
    assert tok.strip_comments
    for _, text in stdlib_texts[5::120]:
        assert tok.decode(tok.encode(text)) == strip_comments_and_docstrings(text)


# ---------------------------------------------------------------------------------------------
# Round trips (hypothesis)
# ---------------------------------------------------------------------------------------------

CODE_ALPHABET = st.sampled_from(
    list("abcXYZ_019 \t\n\r()[]{}:=.,'\"#<>|-+*/\\") + ["é", "中", "🙂", "\u0301", "\x00", "\u2028"]
)


@functools.cache
def _unicode_table_disagreements() -> str:
    """The code points whose \\p{..} classes (those the pre-tokenizer regexes use) or \\s differ
    between the installed `regex` module and HF tokenizers' Oniguruma.

    \\p{..} follows each engine's own Unicode tables (docs/contracts.md): with regex 2026.5.9
    (Unicode 17) and tokenizers 0.23 about 4,700 code points differ (e.g. U+088F, U+323B0 of CJK
    Extension J, U+0295), so a text drawn from all of Unicode may tokenize differently in codelm
    and HF by contract. Found by asking both engines about every code point `regex` sees assigned
    (an unassigned code point there is unassigned in every older Unicode too, so both read it
    alike); a few seconds, once, at the first draw. Each class matches one code point at a
    time, so HF reads the code points in chunks of 1,000 (its split of one long string costs
    more than linear time) and `regex` lists the ones it matches: the same sets, read faster.
    """
    assigned = "".join(regex.findall(r"[^\p{Cn}\p{Co}\p{Cs}]", "".join(map(chr, range(0x110000)))))
    every = set(assigned)
    chunks = [assigned[i : i + 1000] for i in range(0, len(assigned), 1000)]
    differ = set()
    for cls in (r"\p{Lu}", r"\p{Ll}", r"\p{Lt}", r"\p{Lm}", r"\p{Lo}", r"\p{N}", r"\p{M}", r"\s"):
        split = pre_tokenizers.Split(Regex(cls), behavior="removed")
        hf_rest = "".join(piece for chunk in chunks for piece, _ in split.pre_tokenize_str(chunk))
        differ |= (every - set(regex.findall(cls, assigned))) ^ set(hf_rest)
    return "".join(sorted(differ))


# Any text, in every script and plane, but for the code points where the two engines' Unicode
# tables disagree (above): there codelm and HF differ by contract, which would make the parity
# round trips fail at random (e.g. '\U000323b0/x' with the llama3 style).
ANY_TEXT = st.deferred(
    lambda: st.text(st.characters(codec="utf-8", exclude_characters=_unicode_table_disagreements()))
)
TEXTS = st.one_of(ANY_TEXT, st.text(alphabet=CODE_ALPHABET, max_size=200))
# Code with special-token strings in it, which a CodeTokenizer and its HF export read as text.
CODE_WITH_SPECIALS = st.lists(st.one_of(CODE_ALPHABET, st.sampled_from(
    ["<pad>", "<eos>", "<fim_middle>", "pad", "eos"])), max_size=100).map("".join)
ROUND_TRIP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@ROUND_TRIP
@given(text=st.one_of(TEXTS, CODE_WITH_SPECIALS))
def test_round_trip_code_tokenizer(code_tok, code_tok_hf, text):
    """For any text, and code holding special-token strings, decode(encode(x)) is x and the HF
    export gives the same ids: a special token's string in the text is text."""
    ids = code_tok.encode(text)
    assert code_tok.decode(ids) == text
    assert code_tok_hf.encode(text).ids == ids


@ROUND_TRIP
@given(text=TEXTS, style=st.sampled_from(PRETOKENIZER_STYLES))
@example(text="\uf900", style="qwen2")  # a compatibility ideograph NFC maps to U+8C48
def test_round_trip_bpe_and_parity(references, text, style):
    """Decoding gives the text back as the style's normalizer leaves it (qwen2's NFC)."""
    _, hf, ours = references[style]
    ids = ours.encode(text)
    normalized = hf.normalizer.normalize_str(text) if hf.normalizer is not None else text
    assert ours.decode(ids) == normalized
    assert ids == hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 10**6), comment=st.text(max_size=30), text=TEXTS)
def test_round_trip_with_stripping(strip_tok, stdlib_texts, index, comment, text):
    """With strip_comments, decode(encode(x)) is the stripped text, for code and for any text."""
    source = stdlib_texts[index % len(stdlib_texts)][1][:3000]
    for x in (source + "\n# " + comment, text):
        assert strip_tok.decode(strip_tok.encode(x)) == strip_comments_and_docstrings(x)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=50))
def test_round_trip_strings_with_surrogates(code_tok, references, text):
    """A lone surrogate, which HF cannot take, encodes, and decodes to U+FFFD for each of its
    three bytes: decoded text can always be written as UTF-8."""
    # Lone surrogates cannot reach HF at all; here they encode, and decode to writable text.
    replaced = text + "\ufffd" * 3
    text = text + "\ud800"
    assert code_tok.decode(code_tok.encode(text)) == replaced
    _, _, ours = references["gpt2"]
    assert ours.decode(ours.encode(text)) == replaced


def test_pickled_tokenizers_encode_the_same(references, code_tok, stdlib_texts):
    """Spawn-started workers receive the tokenizer pickled (without its piece cache)."""
    text = stdlib_texts[11][1] + "<|begin_of_text|>x"
    for tok in (references["llama3"][2], code_tok):
        clone = pickle.loads(pickle.dumps(tok))
        assert clone.encode(text, add_special_tokens=True) == tok.encode(
            text, add_special_tokens=True
        )


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _write_spec(tmp_path, references, edit):
    path, _, _ = references["starcoder"]
    spec = json.loads(path.read_text("utf-8"))
    edit(spec)
    out = tmp_path / "tokenizer.json"
    out.write_text(json.dumps(spec), "utf-8")
    return out


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer.*Lowercase"),
        (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer.*Whitespace"),
        (
            lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True),
            "add_prefix_space",
        ),
        (lambda s: s.update(decoder={"type": "WordPiece"}), "decoder.*WordPiece"),
        (lambda s: s.update(post_processor={"type": "BertProcessing"}), "BertProcessing"),
        (lambda s: s["model"].update(type="WordPiece"), "model.*WordPiece"),
        (lambda s: s["model"].update(dropout=0.1), "dropout"),
        (lambda s: s["model"].update(byte_fallback=True), "byte_fallback"),
        (lambda s: s["model"]["merges"].append(["nope", "zzz"]), "merge #"),
        (lambda s: s["model"]["merges"].insert(0, "a b c"), "merge #0"),
        (lambda s: s["model"].pop("vocab"), "vocab"),
        (lambda s: s.pop("model"), "neither a HF tokenizer.json"),
        (lambda s: s.update(truncation={"max_length": 5}), "truncation"),
        (lambda s: s.update(added_tokens=[{"content": 3}]), "added_tokens"),
        (lambda s: s["pre_tokenizer"]["pretokenizers"].reverse(), "pre_tokenizer"),
        (lambda s: s["model"]["vocab"].update(huge=10**12), "not dense"),  # no 8 TB table
        (lambda s: s.update(decoder=None), "decoder"),
    ],
)
def test_unsupported_or_malformed_tokenizer_json(edit, message, references, tmp_path):
    """A tokenizer.json with a part codelm does not implement, or a malformed one, is refused by a
    ValueError naming the file and the part, not loaded to give other ids than HF's, nor a bare
    KeyError."""
    path = _write_spec(tmp_path, references, edit)
    with pytest.raises(ValueError, match=message) as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, KeyError)


def _split_step(s):
    return s["pre_tokenizer"]["pretokenizers"][0]


def _byte_level_step(s):
    return s["pre_tokenizer"]["pretokenizers"][1]


@pytest.mark.parametrize("style, edit, message", [
    ("llama3", lambda s: _split_step(s).update(behavior="Removed"), r"Split behavior 'Removed'"),
    ("llama3", lambda s: _byte_level_step(s).update(add_prefix_space=True), "add_prefix_space"),
    ("llama3", lambda s: _byte_level_step(s).update(use_regex=True),
     r"Split then ByteLevel\(use_regex=true\)"),
    ("starcoder", lambda s: _byte_level_step(s).update(use_regex=False),
     r"Digits then ByteLevel\(use_regex=false\)"),
])
def test_pre_tokenizer_settings_hf_reads_otherwise_are_refused(style, edit, message, references,
                                                                 tmp_path):
    """Each edit makes HF split the text otherwise (other ids than the unedited file's), which
    codelm would not notice: refused, naming the setting and the file."""
    path, hf, _ = references[style]
    spec = json.loads(path.read_text("utf-8"))
    edit(spec)
    out = tmp_path / "tokenizer.json"
    out.write_text(json.dumps(spec), "utf-8")
    text = "def f(x):\n    return x+12345  # é ok\n"
    assert Tokenizer.from_file(str(out)).encode(text).ids != hf.encode(text).ids
    with pytest.raises(ValueError, match=rf"tokenizer\.json: unsupported pre_tokenizer: .*{message}"):
        load_tokenizer(out)


def _code_vocab_edits():
    def drop_piece(v):
        del v[next(t for t, i in v.items() if i == len(v) - 3)]

    def swap_bytes(v):  # bytes 1 and 2, spelled 'ā' and 'Ă' (no piece is)
        one, two = BYTE_TO_UNICODE[1], BYTE_TO_UNICODE[2]
        v[one], v[two] = v[two], v[one]

    return [
        (drop_piece, r"ids must be 0\.\.\d+, each once"),
        (lambda v: v.update(zzz=len(v) + 99), r"ids must be 0\.\.\d+"),
        (lambda v: v.update({"中文": len(v)}), r"entry '中文' \(id \d+\) is not the ByteLevel"),
        (lambda v: v.pop(BYTE_TO_UNICODE[0]), r"ids must be 0\.\.\d+"),
        (lambda v: v.update((t, str(i)) for t, i in list(v.items())), r"ids must be 0\.\.\d+"),
        (lambda v: v.update(zzz=-1), r"ids must be 0\.\.\d+"),
        (lambda v: v.update(zzz=300), r"ids must be 0\.\.\d+"),
        (swap_bytes, r"must list the special tokens, the 256 bytes in order"),
    ]


@pytest.mark.parametrize("edit, message", _code_vocab_edits())
def test_malformed_code_tokenizer_json_says_what_is_wrong(edit, message, code_tok, tmp_path):
    """A CodeTokenizer export with a broken model.vocab, or a model or pre_tokenizer of the
    wrong JSON type, is refused naming the file and what is wrong with it."""
    spec = code_tok.to_hf()
    edit(spec["model"]["vocab"])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), "utf-8")
    with pytest.raises(ValueError, match=rf"tokenizer.json: model.vocab ?{message}"):
        load_tokenizer(path)
    for shape in ("x", [1]):  # a model or pre-tokenizer of the wrong JSON type
        for key, said in (("model", "unsupported model"),
                          ("pre_tokenizer", "a WordPiece model whose pre_tokenizer is not")):
            path.write_text(json.dumps({**code_tok.to_hf(), key: shape}), "utf-8")
            with pytest.raises(ValueError, match=f"tokenizer.json: {said}"):
                load_tokenizer(path)


def _edited_code_json(code_tok, tmp_path, edit):
    """The CodeTokenizer's tokenizer.json after ``edit``, as a hand edit leaves the file."""
    spec = json.loads(json.dumps(code_tok.to_hf()))  # parts to_hf shares are separate in a file
    edit(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), "utf-8")
    return path


def _set_pattern(index: int, pattern: str):
    return lambda s: s["pre_tokenizer"]["pretokenizers"][index]["pattern"].update(Regex=pattern)


_SPECIAL_ENTRY = {"id": 2, "content": "<eos>", "single_word": False, "lstrip": False,
                  "rstrip": False, "normalized": False, "special": True}


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(pre_tokenizer=None),
     r"whose pre_tokenizer is not codelm's: HF would give other ids"),
    (_set_pattern(0, "(["), r"whose pre_tokenizer is not codelm's"),
    (_set_pattern(1, r"[\s\S]{1,64}"), r"whose pre_tokenizer is not codelm's"),
    (lambda s: s["pre_tokenizer"]["pretokenizers"][2].update(use_regex=True),
     r"whose pre_tokenizer is not codelm's"),
    (lambda s: s.update(decoder=None), r"whose decoder is not codelm's"),
    (lambda s: s.pop("decoder"), r"whose decoder is not codelm's"),
    (lambda s: s["decoder"]["decoders"].pop(0), r"whose decoder is not codelm's"),
    (lambda s: s.update(normalizer={"type": "NFC"}), r"whose normalizer is not codelm's"),
    (lambda s: s.update(truncation={"max_length": 5}), r"whose truncation is not codelm's.*"
     r"a transformers save after a padded or truncated call writes them: set truncation and "
     r"padding to null$"),
    (lambda s: s.update(post_processor={"type": "TemplateProcessing", "single": [
        {"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [1], "tokens": ["<bos>"]}}}),
     r"whose post_processor is not codelm's"),
    (lambda s: s["model"].update(max_input_chars_per_word=100),
     r"a WordPiece model whose model is not codelm's"),
    (lambda s: s.update(added_tokens=[{"id": 5, "content": 5}]), r"added_tokens entry .*is not one of"),
    (lambda s: s.update(added_tokens=[_SPECIAL_ENTRY, "<bos>"]), r"added_tokens entry .*is not one of"),
    (lambda s: s.update(added_tokens=[_SPECIAL_ENTRY, {**_SPECIAL_ENTRY, "content": "def"}]),
     r"added_tokens entry \{.*\"def\".* is not one of the special tokens \['<pad>', "),
    (lambda s: s.update(added_tokens=None), r"added_tokens entry null is not one of"),
])
def test_an_edited_code_tokenizer_json_names_the_part_that_differs(edit, message, code_tok,
                                                                    tmp_path):
    """A pre_tokenizer set to null or an edited Split regex is named as such, not blamed on the
    model ("unsupported model: type 'WordPiece'"); a null decoder or a non-string added token
    does not pass silently, as HF reads the file as another tokenizer or not at all."""
    path = _edited_code_json(code_tok, tmp_path, edit)
    for load in (load_tokenizer,):
        with pytest.raises(ValueError, match=rf"tokenizer\.json: .*{message}"):
            load(path)


def test_what_the_edited_parts_change_in_hf(code_tok, code_tok_hf, tmp_path):
    """Why those edits are refused: HF tokenizers gives the edited files other ids or text, and
    reads no added token without a string content. codelm never uses the decoder itself."""
    text = "def fooBar(x):  # é\n    return x_y\n"
    ids = code_tok.encode(text)
    assert code_tok_hf.encode(text).ids == ids and code_tok_hf.decode(ids) == text

    def hf(edit) -> Tokenizer:
        return Tokenizer.from_file(str(_edited_code_json(code_tok, tmp_path, edit)))

    assert hf(lambda s: s.update(pre_tokenizer=None)).encode(text).ids != ids
    assert hf(lambda s: s.update(decoder=None)).decode(ids) != text
    assert hf(lambda s: s["model"].update(max_input_chars_per_word=3)).encode(text).ids != ids
    with pytest.raises(Exception, match="invalid type: integer"):
        hf(lambda s: s.update(added_tokens=[{**_SPECIAL_ENTRY, "content": 5}]))


def test_hf_rewrites_of_a_code_tokenizer_json_load(code_tok, tmp_path):
    """What the checks of an edited file let through: HF's and transformers' saves of the file
    (special tokens also as added tokens), parts left out that HF reads as null, and fields HF
    does not know."""
    from transformers import AutoTokenizer

    text = "class HTTPServer:\n    x_y = fooBar(1)  # <eos> é\n"
    rewrites = tmp_path / "hf"
    (tmp_path / "ours").mkdir()
    code_tok.save(tmp_path / "ours")
    AutoTokenizer.from_pretrained(str(tmp_path / "ours")).save_pretrained(str(rewrites))
    saved = json.loads((rewrites / "tokenizer.json").read_text("utf-8"))
    assert saved["post_processor"] is not None and saved["added_tokens"]  # what transformers adds
    hf_saved = Tokenizer.from_str(json.dumps(code_tok.to_hf())).to_str()
    edits = [
        lambda s: s.update(saved),
        lambda s: s.update(json.loads(hf_saved)),
        lambda s: s.update(added_tokens=[_SPECIAL_ENTRY]),
        lambda s: [s.pop(k) for k in ("truncation", "padding", "normalizer", "post_processor",
                                      "added_tokens", "version")],
        lambda s: s["decoder"]["decoders"][0].update(note="hand-written"),
    ]
    for edit in edits:
        loaded = load_tokenizer(_edited_code_json(code_tok, tmp_path, edit))
        assert isinstance(loaded, CodeTokenizer) and loaded.encode(text) == code_tok.encode(text)


def test_broken_files_name_the_file(tmp_path, references):
    """Invalid JSON (with its line), a non-object, bytes that are not UTF-8, a missing file, a
    codelm file of another format or a bad key is a ValueError naming the file; decode refuses an
    id out of range, and encode bytes."""
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"model": {"type": "BPE",\n  "vocab": {', "utf-8")
    with pytest.raises(ValueError, match=r"tokenizer.json: invalid JSON at line 2"):
        load_tokenizer(bad)
    bad.write_text("[1, 2]", "utf-8")
    with pytest.raises(ValueError, match="JSON object"):
        load_tokenizer(bad)
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="cannot read the tokenizer file: 'utf-8' codec"):
        load_tokenizer(bad)
    with pytest.raises(ValueError, match="missing.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="empty_dir: tokenizer file not found"):
        load_tokenizer(tmp_path / "empty_dir")
    code = tmp_path / "code.json"
    code.write_text(json.dumps({"type": "codelm-code-tokenizer", "version": 1}), "utf-8")
    with pytest.raises(ValueError, match="code.json.*format_version None"):
        load_tokenizer(code)
    code.write_text(
        json.dumps(
            {"type": "codelm-code-tokenizer", "format_version": 1, "pieces": "x"}
        ),
        "utf-8",
    )
    with pytest.raises(ValueError, match="code.json: key 'pieces'"):
        load_tokenizer(code)
    _, _, ours = references["gpt2"]
    with pytest.raises(ValueError, match="out of range"):
        ours.decode([ours.vocab_size])
    with pytest.raises(TypeError):
        ours.encode(b"bytes")


def test_a_codelm_form_file_repeating_a_piece_or_special_token_is_an_error_naming_it(tmp_path):
    """A comment-stripping tokenizer's own format lists pieces and special tokens: a repeat
    (a hand edit, a merge of two files) would give one text two ids."""
    tok = CodeTokenizer.train(["def f(x):\n    return x  # c\n"] * 3, min_freq=1,
                              strip_comments=True)
    path = tok.save(tmp_path / "code.json")
    data = json.loads(path.read_text("utf-8"))
    for key, message in (("pieces", "CodeTokenizer vocabulary pieces must be distinct"),
                         ("special_tokens", r"special tokens must be distinct: \[.*'<pad>'\]")):
        path.write_text(json.dumps({**data, key: data[key] + data[key][:1]}), "utf-8")
        with pytest.raises(ValueError, match=rf"code.json: {message}"):
            load_tokenizer(path)
    with pytest.raises(TypeError):
        tok.encode(None)
    with pytest.raises(ValueError, match="min_freq must be >= 1, got 0"):
        CodeTokenizer.train(["x = 1"], min_freq=0)


def test_cli_shows_hf_tokenizers_ids_and_each_tokens_text_or_bytes(references, tmp_path, capsys):
    """`python tokenizer.py TOK --file F`: one line per token, id then its text as a literal
    (bytes for part of a character), ids as HF tokenizers gives them (of the file's text as it
    is, its \r\n and \r too); then the count."""
    import ast

    import tokenizer

    path, hf, _ = references["gpt2"]
    text = 'def f(x):\r\n    return "héllo €" + x  # ok\r\ny = 1\rz = 2\n'
    source = tmp_path / "f.py"
    source.write_bytes(text.encode("utf-8"))
    assert tokenizer.main([str(path.parent), "--file", str(source)]) == 0
    *lines, summary = capsys.readouterr().out.splitlines()
    ids = [int(line.split()[0]) for line in lines]
    assert ids == hf.encode(text).ids
    shown = [ast.literal_eval(line.split(maxsplit=1)[1]) for line in lines]
    raw = b"".join(p if isinstance(p, bytes) else p.encode("utf-8") for p in shown)
    assert raw.decode("utf-8") == text
    assert any(isinstance(p, bytes) for p in shown) == any(
        "\ufffd" in hf.decode([i]) for i in ids)
    assert summary == f"{len(ids)} tokens for {len(text)} characters " \
                      f"({len(text) / len(ids):.2f} characters a token)"
    assert tokenizer.main([str(path), "--text", text, "--count"]) == 0
    assert capsys.readouterr().out == f"{len(ids)}\n"


def test_cli_special_tokens_are_the_templates_start_as_a_model_is_fed(references, code_tok,
                                                                       tmp_path, capsys):
    """--add-special-tokens shows what goes before a text as a model is fed it: Llama-3's BOS
    (as transformers adds it), and for codelm's own tokenizer nothing (its HF export adds
    none, and training puts none there)."""
    import tokenizer

    path, hf, _ = references["llama3"]
    assert tokenizer.main([str(path), "--text", "def f", "--add-special-tokens", "--count"]) == 0
    assert int(capsys.readouterr().out) == len(hf.encode("def f").ids)  # BOS included
    code_tok.save(tmp_path / "code")
    assert tokenizer.main([str(tmp_path / "code"), "--text", "def f", "--count"]) == 0
    plain = capsys.readouterr().out
    assert tokenizer.main([str(tmp_path / "code"), "--text", "def f", "--count",
                           "--add-special-tokens"]) == 0
    assert capsys.readouterr().out == plain


def test_training_on_one_str_is_refused_not_split_into_characters():
    """Training on one str rather than a list of texts would learn from its characters: both
    trainers refuse it, and a negative max_vocab is refused."""
    with pytest.raises(ValueError, match="got one str"):
        CodeTokenizer.train("def f(x):\n    return x\n" * 10, min_freq=1)
    with pytest.raises(ValueError, match="got one str"):
        BPETokenizer.train("def f(x):\n    return x\n" * 10, vocab_size=300)
    with pytest.raises(ValueError, match="max_vocab must be >= 0"):
        CodeTokenizer.train(["def f(x):\n"] * 10, min_freq=1, max_vocab=-1)


def test_cli_errors_name_the_file(tmp_path, capsys):
    """The tokenizer CLI's errors are one line naming the file: a missing tokenizer, an
    unsupported tokenizer.json, and a --file that is not UTF-8 (with the byte where it fails)."""
    import tokenizer

    bad = tmp_path / "latin1.py"
    bad.write_bytes(b"x = '\xe9'\n")
    assert tokenizer.main([str(tmp_path / "none"), "--text", "x"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'none'}: tokenizer file "
                                              "not found")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}}')
    assert tokenizer.main([str(tmp_path), "--file", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'tokenizer.json'}:")
    code = tmp_path / "code"
    CodeTokenizer.train(["x = 1\n"] * 3, min_freq=1).save(code)
    assert tokenizer.main([str(code), "--file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (f"{bad}: not UTF-8", "byte 5")), err


def test_cli_add_special_tokens_shows_the_ids_hf_adds_with_its_template(references, capsys):
    """--add-special-tokens: the ids of HF tokenizers' encode with the template (Llama-3's BOS
    first); without it, the text's ids alone (the flag takes effect, not ignored)."""
    import tokenizer

    path, hf, _ = references["llama3"]
    text = "x = 1\n"
    assert hf.encode(text).ids != hf.encode(text, add_special_tokens=False).ids
    for flags, special in (([], False), (["--add-special-tokens"], True)):
        assert tokenizer.main([str(path), "--text", text, *flags]) == 0
        *lines, _ = capsys.readouterr().out.splitlines()
        assert [int(line.split()[0]) for line in lines] == hf.encode(
            text, add_special_tokens=special).ids


def test_cli_on_an_empty_text_counts_zero_tokens(references, capsys):
    """An empty --text (or file) has no tokens: a count of 0, not a ZeroDivisionError."""
    import tokenizer

    path = references["gpt2"][0]
    assert tokenizer.main([str(path), "--text", ""]) == 0
    assert capsys.readouterr().out == "0 tokens for 0 characters\n"
    assert tokenizer.main([str(path), "--text", "", "--count"]) == 0
    assert capsys.readouterr().out == "0\n"


# ------------------------------------------------------------------ a model's tokenizer, by roles

ROLE_TEXTS = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "import os\n"] * 4


@pytest.fixture(scope="module")
def role_tokenizers(tmp_path_factory) -> dict:
    """style -> directory of a small HF tokenizer.json + the tokenizer_config.json naming its
    roles (as the real models ship them); the roles are transformers' AutoTokenizer's."""
    import transformers

    out = {}
    for style in ("gpt2", "starcoder", "llama3"):
        directory = tmp_path_factory.mktemp(f"roles_{style}")
        train_hf_tokenizer(style, ROLE_TEXTS, directory / "tokenizer.json")
        load_tokenizer(directory).save(directory)
        tok, hf = load_tokenizer(directory), transformers.AutoTokenizer.from_pretrained(directory)
        assert (tok.bos_id, tok.eos_id) == (hf.bos_token_id, hf.eos_token_id)
        out[style] = directory
    return out


def _model_dir(path, **ids):
    """A model directory whose config.json (a tiny Llama's) has these ids; written here, as
    importing transformers' Llama config costs seconds, and the check reads only these keys."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 512,
                                                  **ids}))
    return path


def test_a_tokenizer_whose_roles_cross_the_models_config_is_refused(role_tokenizers, tmp_path):
    """A model trained with StarCoder's tokenizer (bos = eos = <|endoftext|>, id 0) given a
    Llama-3 one of no more tokens: its id 0 is <|begin_of_text|>, the config's eos."""
    import shutil

    star, llama3 = role_tokenizers["starcoder"], role_tokenizers["llama3"]
    tok = load_tokenizer(star)
    model = _model_dir(tmp_path / "model", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    shutil.copy(star / "tokenizer.json", model / "tokenizer.json")
    check_model_tokenizer(tok, star / "tokenizer.json", model)  # its own: passes
    wrong = load_tokenizer(llama3)
    assert wrong.vocab_size <= 512 and (wrong.bos_id, wrong.eos_id) == (0, 1)
    with pytest.raises(ValueError) as err:
        check_model_tokenizer(wrong, llama3 / "tokenizer.json", model)
    said = str(err.value)
    assert said.startswith(f"{llama3 / 'tokenizer.json'} is not the tokenizer"), said
    assert all(w in said for w in (str(model / "config.json"),
                                   "eos_token_id 0 ('<|begin_of_text|>'", "its bos",
                                   "eos is 1 ('<|end_of_text|>')", f"--tokenizer {model}")), said


def test_a_codelm_tokenizer_the_config_does_not_name_is_refused(tmp_path):
    """A CodeTokenizer's roles are fixed, never guessed: another layout of special tokens, or an
    HF model's ids past its vocabulary, cannot be the model's."""
    texts = ROLE_TEXTS
    trained = CodeTokenizer.train(texts, min_freq=1)
    model = _model_dir(tmp_path / "model", bos_token_id=trained.bos_id,
                       eos_token_id=trained.eos_id)
    check_model_tokenizer(trained, tmp_path / "t.json", model)
    other = CodeTokenizer.train(texts, min_freq=1,
                                special_tokens=("<pad>", "<sep>", "<cls>", "<bos>", "<eos>"))
    with pytest.raises(ValueError, match=r"bos_token_id 1 \('<sep>'.*eos_token_id 2 \('<cls>'"
                                         r".*bos is 3 \('<bos>'\).*eos is 4 \('<eos>'\)"
                                         r".*--tokenizer"):
        check_model_tokenizer(other, tmp_path / "t.json", model)
    hf_ids = _model_dir(tmp_path / "hf", bos_token_id=510, eos_token_id=[509, 511])
    past = f"past the tokenizer's {trained.vocab_size} tokens"
    with pytest.raises(ValueError, match=rf"eos_token_id 509 \({past}\), 511 \({past}\)"):
        check_model_tokenizer(trained, tmp_path / "t.json", hf_ids)


def test_legitimate_model_and_tokenizer_pairs_pass_silently(role_tokenizers, tmp_path, capsys):
    """What real checkpoints ship: an eos list (Llama-3-Instruct), a chat eos beside a guessed
    one, a stale bos beside the right eos (CodeGen), null ids (Phi-1.5), a class default past
    the embeddings, no config at all (a from-scratch run) and codelm's own exports."""
    import dataclasses
    import shutil

    from architecture import PRESETS, Transformer
    from codelm.models import pretrained

    llama3, gpt2 = role_tokenizers["llama3"], role_tokenizers["gpt2"]
    guessed = tmp_path / "guessed"  # no tokenizer_config.json: eos guessed as <|end_of_text|>
    guessed.mkdir()
    shutil.copy(llama3 / "tokenizer.json", guessed / "tokenizer.json")
    cases = [
        (llama3, dict(bos_token_id=0, eos_token_id=[1, 2])),  # <|end_of_text|>, <|eot_id|>
        (guessed, dict(bos_token_id=0, eos_token_id=2)),
        (guessed, dict(bos_token_id=None, eos_token_id=2)),  # Qwen-style: no bos, chat eos
        (gpt2, dict(bos_token_id=1, eos_token_id=0)),  # CodeGen-350M: bos 1 is '"' there
        (gpt2, dict(bos_token_id=None, eos_token_id=None)),  # Phi-1.5
        (gpt2, dict(bos_token_id=50256, eos_token_id=50256)),  # GPT-2's, past 512 embeddings
    ]
    for i, (directory, ids) in enumerate(cases):
        tok = load_tokenizer(directory)
        assert tok.vocab_size <= 512
        model = _model_dir(tmp_path / str(i), **ids)
        check_model_tokenizer(tok, directory / "tokenizer.json", model)
    assert load_tokenizer(guessed).eos_id == 1
    check_model_tokenizer(load_tokenizer(gpt2), gpt2 / "tokenizer.json", tmp_path / "none")
    for tok in (CodeTokenizer.train(ROLE_TEXTS, min_freq=1), load_tokenizer(llama3)):
        cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size, bos_id=tok.bos_id,
                                  eos_id=tok.eos_id)  # as trainconfig.model_config sets them
        export = tmp_path / f"export_{type(tok).__name__}"
        pretrained.save(Transformer(cfg), export)
        tok.save(export)
        check_model_tokenizer(load_tokenizer(export), export / "tokenizer.json", export)
    assert capsys.readouterr().err == ""


def test_ids_naming_ordinary_tokens_in_every_role_are_warned_of(role_tokenizers, tmp_path,
                                                               capsys):
    """A config whose bos and eos both name ordinary tokens of the tokenizer (another model's
    tokenizer, or a stale config: they look alike) is warned of on stderr, naming both files,
    the ids and the tokens; one role agreeing, or special tokens, pass silently (above)."""
    import transformers

    gpt2 = role_tokenizers["gpt2"]
    hf = transformers.AutoTokenizer.from_pretrained(gpt2)
    first, second = hf.convert_tokens_to_ids(["a", "b"])
    assert not {first, second} & set(hf.all_special_ids)
    model = _model_dir(tmp_path / "model", bos_token_id=first, eos_token_id=second)
    check_model_tokenizer(load_tokenizer(gpt2), gpt2 / "tokenizer.json", model)
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {gpt2 / 'tokenizer.json'} may not be the tokenizer"), err
    assert all(w in err for w in (str(model / "config.json"), f"bos_token_id {first} ('a'",
                                  f"eos_token_id {second} ('b'", "--tokenizer")), err


def test_one_crossed_role_is_refused_beside_an_ordinary_one_with_the_models_own_remedy(
        role_tokenizers, tmp_path):
    """The config's eos is the tokenizer's bos (transformers' AutoTokenizer says which id is
    which), its bos an ordinary token: one crossed role suffices. The checked file is the
    model's own tokenizer.json, so the remedy cannot be to pass that same file."""
    import shutil

    import transformers

    llama3 = role_tokenizers["llama3"]
    hf = transformers.AutoTokenizer.from_pretrained(llama3)
    ordinary = hf.convert_tokens_to_ids("a")
    assert ordinary not in hf.all_special_ids
    model = _model_dir(tmp_path / "model", bos_token_id=ordinary, eos_token_id=hf.bos_token_id)
    shutil.copy(llama3 / "tokenizer.json", model / "tokenizer.json")
    tok = load_tokenizer(llama3)
    with pytest.raises(ValueError) as err:
        check_model_tokenizer(tok, model / "tokenizer.json", model)
    said = str(err.value)
    assert said.startswith(f"{model / 'tokenizer.json'} is not the tokenizer"), said
    assert all(w in said for w in (str(model / "config.json"),
                                   f"bos_token_id {ordinary} ('a' in",
                                   f"eos_token_id {hf.bos_token_id} ({hf.bos_token!r}",
                                   f"bos is {hf.bos_token_id} ({hf.bos_token!r})",
                                   f"eos is {hf.eos_token_id} ({hf.eos_token!r})",
                                   "--tokenizer with the tokenizer")), said


def test_config_ids_at_the_edge_of_the_embeddings_and_the_tokenizer(tmp_path):
    """An id equal to the config's vocab_size is past the embeddings (names nothing, skipped);
    one equal to the tokenizer's size is past the tokenizer (shown so, not looked up); a config
    without a top-level vocab_size (a multimodal model's) still has its ids compared."""
    tok = CodeTokenizer.train(ROLE_TEXTS, min_freq=1)
    edge = _model_dir(tmp_path / "edge", bos_token_id=tok.bos_id, eos_token_id=512)
    check_model_tokenizer(tok, tmp_path / "t.json", edge)
    past = _model_dir(tmp_path / "past", bos_token_id=tok.bos_id, eos_token_id=tok.vocab_size)
    with pytest.raises(ValueError, match=rf"eos_token_id {tok.vocab_size} \(past the "
                                         rf"tokenizer's {tok.vocab_size} tokens\)"):
        check_model_tokenizer(tok, tmp_path / "t.json", past)
    nested = _model_dir(tmp_path / "nested", vocab_size=None, bos_token_id=tok.bos_id,
                        eos_token_id=tok.eos_id)
    check_model_tokenizer(tok, tmp_path / "t.json", nested)
    wrong = _model_dir(tmp_path / "wrong", vocab_size=None, bos_token_id=tok.bos_id,
                       eos_token_id=tok.bos_id)
    with pytest.raises(ValueError, match=r"is not the tokenizer of the model"):
        check_model_tokenizer(tok, tmp_path / "t.json", wrong)


def test_a_role_the_tokenizer_has_none_of_is_not_compared(role_tokenizers, tmp_path, capsys):
    """A tokenizer_config.json with a null bos (transformers: no bos token) against a config
    whose bos names an ordinary token and whose eos is null: nothing to compare, no word."""
    import shutil

    import transformers

    directory = tmp_path / "no_bos"
    directory.mkdir()
    shutil.copy(role_tokenizers["gpt2"] / "tokenizer.json", directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
         "eos_token": "<|endoftext|>"}))
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    tok = load_tokenizer(directory)
    assert hf.bos_token_id is None and (tok.bos_id, tok.eos_id) == (None, hf.eos_token_id)
    ordinary = hf.convert_tokens_to_ids("a")
    assert isinstance(ordinary, int) and ordinary not in hf.all_special_ids
    model = _model_dir(tmp_path / "model", bos_token_id=ordinary, eos_token_id=None)
    check_model_tokenizer(tok, directory / "tokenizer.json", model)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------- where a missing tokenizer.json is

def test_cli_on_an_adapter_directory_names_its_base(tmp_path, capsys):
    """A LoRA adapter directory holds no tokenizer: the error says so and names the base its
    adapter_config.json records, where that holds one."""
    import json

    import tokenizer

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")

    def run(base_name) -> str:
        (adapter / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "base_model_name_or_path": base_name}))
        assert tokenizer.main([str(adapter), "--text", "x"]) == 2
        return capsys.readouterr().err

    missing = f"error: {adapter / 'tokenizer.json'}: not found; {adapter} is a LoRA adapter " \
              "directory (adapter_config.json), whose tokenizer is its base model's"
    assert run(None) == f"{missing}\n"
    base.mkdir()
    CodeTokenizer.train(["x = 1\n"] * 3, min_freq=1).save(base)
    assert run(str(base)) == f"{missing}: {base}\n"
    assert tokenizer.main([str(base), "--text", "x", "--count"]) == 0  # which loads


def test_a_runs_directories_without_tokenizer_name_the_one_that_holds_it(tmp_path):
    """A run keeps its tokenizer at its top: its best/ or checkpoints/step-N/ name the run, and
    the runs directory the runs below it."""
    run = tmp_path / "runs" / "a"
    step = run / "checkpoints" / "step-4"
    step.mkdir(parents=True)
    (run / "best").mkdir()
    CodeTokenizer.train(["x = 1\n"] * 3, min_freq=1).save(run)
    for inside in (run / "best", step):
        with pytest.raises(ValueError, match=f"^{inside / 'tokenizer.json'}: not found; "
                                             f"{run.resolve()} above it holds one$"):
            load_tokenizer(inside)
    with pytest.raises(ValueError, match=f"^{tmp_path / 'runs' / 'tokenizer.json'}: not found; "
                                         f"{run} below it holds one$"):
        load_tokenizer(tmp_path / "runs")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'tokenizer.json'}: not found$"):
        load_tokenizer(tmp_path)


def test_a_runs_directory_names_every_run_below_that_holds_a_tokenizer(tmp_path):
    """Given a runs directory, the hint names every run below it that holds a tokenizer, in
    order, so the user can pick one."""
    import tokenizer

    runs = tmp_path / "runs"
    for name in ("b", "a"):
        (runs / name).mkdir(parents=True)
        CodeTokenizer.train(["x = 1\n"] * 3, min_freq=1).save(runs / name)
    assert tokenizer.where_tokenizer_is(runs) == f"; {runs / 'a'}, {runs / 'b'} below it hold one"


def test_a_slow_tokenizers_files_are_named_with_the_command_that_converts_them(tmp_path):
    """A checkpoint with vocab.json and merges.txt but no tokenizer.json: the error names those
    files and a transformers command; that command, run, writes the tokenizer.json codelm
    loads, splitting text as transformers' tokenizer of those files does."""
    import re
    import shutil
    import subprocess
    import sys

    import transformers

    import tokenizer

    texts = [p.read_text("utf-8") for p in stdlib_files(stdlib_root() / "json")]
    trained = train_hf_tokenizer("gpt2", texts, tmp_path / "fast.json")
    files = tmp_path / "files"
    files.mkdir()
    vocab, merges = trained.model.save(str(files))
    slow = transformers.GPT2Tokenizer(vocab, merges)  # CodeGen's and Phi-1.5's class
    checkpoint = tmp_path / "slow"
    slow.save_pretrained(checkpoint)  # its tokenizer_config.json
    (checkpoint / "tokenizer.json").unlink(missing_ok=True)
    for file in (vocab, merges):
        shutil.copy(file, checkpoint)
    assert (checkpoint / "vocab.json").is_file() and (checkpoint / "merges.txt").is_file()
    hint = tokenizer.where_tokenizer_is(checkpoint)
    assert "vocab.json, merges.txt" in hint
    command = re.search(r'python -c "(.*)" writes', hint).group(1)
    subprocess.run([sys.executable, "-c", command], check=True, timeout=300)
    loaded = load_tokenizer(checkpoint)
    text = "def f(x):\n    return x + 1\n"
    assert loaded.encode(text) == slow.encode(text)


def test_a_data_file_given_as_a_tokenizer_is_named_as_one(tmp_path):
    """A JSONL of records passed where a tokenizer goes (tokenizer.py, --tokenizer): one line
    saying it is data, not a tokenizer, and what to give instead (not a JSON parse error)."""
    records = tmp_path / "mine.jsonl"
    records.write_text('{"text": "x"}\n{"text": "y"}\n')
    with pytest.raises(ValueError, match=r"a data file, not a tokenizer: give a tokenizer\.json"):
        load_tokenizer(records)
