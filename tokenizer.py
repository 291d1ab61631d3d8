"""Tokenizers: ``CodeTokenizer`` (trained here, lossless through byte fallback, saved as an HF
tokenizer.json) and ``BPETokenizer`` (the ids of HF ``tokenizers`` for byte-level BPE files;
anything else is refused naming the component). Ground floor: imports settings, process and
codelm.tokenization (the file, batching, source stripping, BPE and chat parts).

Main path: ``load_tokenizer(path)`` -> ``.encode(text)`` / ``.decode(ids)``.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, as in every script
    from codelm.runtime import process

    process.quiet_start_up_stops()

import contextlib
import functools
import itertools
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import regex

from codelm.runtime import process, settings
from codelm.tokenization.batching import BatchEncodeMixin, checked_ids, text_batches
from codelm.tokenization.bpe import (
    BYTE_TO_UNICODE,
    UNICODE_TO_BYTE,
    BPETokenizer,
    post_processor_ids,
)
from codelm.tokenization.files import (
    TOKENIZER_FILE,
    read_json,
    shown_json,
    tokenizer_path,
    write_tokenizer,
)
from codelm.tokenization.source import strip_comments_and_docstrings

CODE_TOKENIZER_TYPE = "codelm-code-tokenizer"
CODE_TOKENIZER_FORMAT_VERSION = 1  # of the file ``CodeTokenizer.to_dict`` writes
# What ids depend on besides a tokenizer's files (a key of dataset's caches): these encoding rules
# (bump when a file starts to encode differently) and `regex`'s Unicode tables.
ENCODING_VERSION = f"4+regex-{regex.__version__}"


# --- CodeTokenizer ---

# Pieces of code. Every character is matched by some branch (the last one takes anything), so the
# pieces of a text always concatenate back to it.
_CODE_PIECE_PATTERN = r"""
    \r\n|\n|\r                                  # a newline
  | (?<=^|[\r\n])[^\S\r\n]+                     # indentation
  | [\p{Lu}\p{Lt}]+(?=[\p{Lu}\p{Lt}]\p{Ll})     # acronym before a Capitalized word: HTTP|Server
  | [\p{Lu}\p{Lt}]?[\p{Ll}\p{Lm}\p{Lo}\p{M}]+   # a lower-case word, maybe Capitalized
  | [\p{Lu}\p{Lt}\p{M}]+                        # an upper-case run
  | \p{N}+                                      # a number
  | _+                                          # underscores
  | [^\S\r\n]+                                  # spaces between tokens
  | [^\s\p{L}\p{N}\p{M}_]+                      # operators and punctuation
  | (?s:.)
"""
_CODE_PIECE_RE = regex.compile(_CODE_PIECE_PATTERN, regex.VERBOSE)
# The same pattern for HF tokenizers' Oniguruma: no verbose layout, and [\s\S] for (?s:.).
_CODE_PIECE_HF_REGEX = regex.sub(r"\s+", "", regex.sub(r"#.*", "", _CODE_PIECE_PATTERN)
                                 ).replace("(?s:.)", r"[\s\S]")

# Longest code piece: longer matches (blobs, rows of '=') are cut, here and in the HF export, whose
# WordPiece is about cubic in a piece's length.
MAX_PIECE_CHARS = 128
_CAP_PIECE_HF_REGEX = rf"[\s\S]{{1,{MAX_PIECE_CHARS}}}"
# A lone surrogate (an undecodable byte of a file) has no UTF-8 form: no piece may hold one.
_SURROGATE = regex.compile(r"\p{Cs}")
# Byte tokens as codelm writes them (HF's byte-fallback spelling): upper-case hex.
_BYTE_TOKEN_RE = regex.compile(r"<0x([0-9A-F]{2})>")

CODE_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>")
_N_BYTES = 256


def _cut(match: str) -> list[str]:
    """A piece-pattern match cut into runs of at most ``MAX_PIECE_CHARS`` characters."""
    k = MAX_PIECE_CHARS
    return [match[i : i + k] for i in range(0, len(match), k)]


def _count_pieces(texts: Iterable[str], strip_comments: bool) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        if strip_comments:
            text = strip_comments_and_docstrings(text)
        counts.update(_CODE_PIECE_RE.findall(text))  # long pieces are cut after counting
    return counts


# CodeTokenizer.train counts pieces in batches of about this many characters, at most two per
# worker in flight: texts are read as they are counted.
_COUNT_BATCH_CHARS = 2_000_000


def _piece_counts(texts: Iterable[str], strip_comments: bool, num_workers: int | None
                  ) -> Counter[str]:
    """How often each code piece occurs in ``texts``, counted on ``num_workers`` processes
    (default: every core; one batch of texts, or a daemon process: in this one)."""
    workers = process.worker_count(num_workers)
    assert workers >= 1, num_workers
    batches = text_batches(texts, _COUNT_BATCH_CHARS)
    head = list(itertools.islice(batches, 2))
    if len(head) < 2 or workers == 1:
        return _count_pieces(chain.from_iterable(chain(head, batches)), strip_comments)
    counts: Counter[str] = Counter()
    count = functools.partial(_count_pieces, strip_comments=strip_comments)
    with process.worker_pool(workers) as pool:
        for batch_counts in process.ordered_map(pool, count, chain(head, batches), 2 * workers):
            counts.update(batch_counts)
    return counts


# The character classes of the piece pattern: a piece longer than one character holds one only.
_PIECE_CLASS_RES = [regex.compile(p) for p in
                    (r"\s", r"[\p{L}\p{M}]", r"\p{N}", r"_", r"[^\s\p{L}\p{N}\p{M}_]")]


def _can_be_in_a_piece(token: str) -> bool:
    """Whether HF's WordPiece could find ``token`` inside a code piece: unless it is printable
    ASCII mixing two character classes (a longer piece has one)."""
    if not all("!" <= c <= "~" for c in token):
        return True
    return sum(any(r.match(c) for c in token) for r in _PIECE_CLASS_RES) < 2


class CodeTokenizer(BatchEncodeMixin):
    """Code pieces (camelCase, underscores, indentation) seen ``min_freq`` times; byte fallback.
    Ids: specials, the 256 bytes, pieces by frequency; "<eos>" inside a text is text."""

    def __init__(self, pieces: Sequence[str], min_freq: int = 10, strip_comments: bool = False,
                 special_tokens: Sequence[str] = CODE_SPECIAL_TOKENS):
        self.special_tokens = list(special_tokens)
        if len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError(f"special tokens must be distinct: {self.special_tokens}")
        self.pieces = list(pieces)
        self.min_freq = min_freq
        self.strip_comments = strip_comments
        self._byte_offset = len(self.special_tokens)
        first_piece = self._byte_offset + _N_BYTES
        self._piece_to_id = {p: first_piece + i for i, p in enumerate(self.pieces)}
        if len(self._piece_to_id) != len(self.pieces):
            raise ValueError("CodeTokenizer vocabulary pieces must be distinct")
        self._max_piece_len = max(map(len, self.pieces), default=1)
        self._id_to_bytes = ([s.encode("utf-8") for s in self.special_tokens]
                             + [bytes([b]) for b in range(_N_BYTES)]
                             + [p.encode("utf-8", "surrogatepass") for p in self.pieces])

    @classmethod
    def train(cls, texts: Iterable[str], min_freq: int = 10, max_vocab: int | None = None,
              strip_comments: bool = False, special_tokens: Sequence[str] = CODE_SPECIAL_TOKENS,
              num_workers: int | None = None) -> CodeTokenizer:
        """Keep each piece seen ``min_freq`` times, at most ``max_vocab`` (bytes come on top);
        pieces counted on ``num_workers`` processes (default: every core)."""
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        if max_vocab is not None and max_vocab < 0:
            raise ValueError(f"max_vocab must be >= 0 (None: every piece kept), got {max_vocab}")
        if isinstance(texts, str):
            raise ValueError("CodeTokenizer.train expects texts (a list of str), got one str")
        counts = _piece_counts(texts, strip_comments, num_workers)
        for match in [m for m in counts if len(m) > MAX_PIECE_CHARS]:
            n = counts.pop(match)
            for piece in _cut(match):
                counts[piece] += n
        kept = sorted((piece for piece, n in counts.items()
                       if n >= min_freq and not _SURROGATE.search(piece)
                       and piece not in special_tokens),
                      key=lambda piece: (-counts[piece], piece))
        return cls(kept[:max_vocab], min_freq=min_freq, strip_comments=strip_comments,
                   special_tokens=special_tokens)

    def _encode_piece(self, piece: str) -> list[int]:
        """Longest known sub-pieces from the left; bytes of a character no piece covers."""
        if len(piece) > MAX_PIECE_CHARS:
            return [i for part in _cut(piece) for i in self._cache[part]]
        vocab = self._piece_to_id
        if (i := vocab.get(piece)) is not None:
            return [i]
        ids = []
        pos, n = 0, len(piece)
        while pos < n:
            for end in range(min(n, pos + self._max_piece_len), pos, -1):
                if (i := vocab.get(piece[pos:end])) is not None:
                    ids.append(i)
                    pos = end
                    break
            else:
                raw = piece[pos].encode("utf-8", "surrogatepass")
                ids.extend(self._byte_offset + b for b in raw)
                pos += 1
        return ids

    def encode(self, text: str, add_special_tokens: bool = False,
               split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (with ``add_special_tokens``, between bos and eos); special
        tokens' text is always text, so ``split_special_tokens`` changes nothing."""
        if self.strip_comments:
            text = strip_comments_and_docstrings(text)
        ids = list(chain.from_iterable(map(self._cache.__getitem__, _CODE_PIECE_RE.findall(text))))
        if add_special_tokens:
            bos, eos = self.bos_id, self.eos_id
            ids = ([] if bos is None else [bos]) + ids + ([] if eos is None else [eos])
        return ids

    @property
    def template_prefix(self) -> list[int]:
        """Ids before every text: none (the HF export has no template)."""
        return []

    @property
    def matched_special_tokens(self) -> list[str]:
        """Special tokens whose text HF reads as the token: none."""
        return []

    @property
    def _special_ids(self) -> range:
        return range(self._byte_offset)

    def _special_id(self, token: str) -> int | None:
        return self.special_tokens.index(token) if token in self.special_tokens else None

    # The role ids (None where custom special_tokens lack the token).
    pad_id = property(lambda self: self._special_id("<pad>"))
    bos_id = property(lambda self: self._special_id("<bos>"))
    eos_id = property(lambda self: self._special_id("<eos>"))
    fim_prefix_id = property(lambda self: self._special_id("<fim_prefix>"))
    fim_middle_id = property(lambda self: self._special_id("<fim_middle>"))
    fim_suffix_id = property(lambda self: self._special_id("<fim_suffix>"))

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token, a vocabulary piece, or a byte token written ``<0xNN>``."""
        i = self._special_id(token)
        if i is None:
            i = self._piece_to_id.get(token)
        if i is None:
            byte = _BYTE_TOKEN_RE.fullmatch(token)
            if byte:
                i = self._byte_offset + int(byte[1], 16)
        return i

    def id_to_token(self, i: int) -> str:
        checked_ids([i], self.vocab_size)
        if i < self._byte_offset:
            return self.special_tokens[i]
        if i < self._byte_offset + _N_BYTES:
            return f"<0x{i - self._byte_offset:02X}>"
        return self.pieces[i - self._byte_offset - _N_BYTES]

    def is_byte_token(self, i: int) -> bool:
        return self._byte_offset <= i < self._byte_offset + _N_BYTES

    def to_dict(self) -> dict:
        """codelm's own format, for what HF cannot express (comment stripping)."""
        return {"type": CODE_TOKENIZER_TYPE, "format_version": CODE_TOKENIZER_FORMAT_VERSION,
                "min_freq": self.min_freq, "strip_comments": self.strip_comments,
                "special_tokens": self.special_tokens, "pieces": self.pieces}

    def to_hf(self) -> dict:
        """The same tokenizer as an HF tokenizer.json: piece Splits, ByteLevel, then WordPiece
        (greedy longest match, as ``_encode_piece``) over every byte; specials are plain entries."""
        if self.strip_comments:
            raise ValueError("a CodeTokenizer that strips comments has no HF tokenizer.json form")
        if inside := [t for t in self.special_tokens if _can_be_in_a_piece(t)]:
            raise ValueError(f"special tokens {inside} could be read inside a code piece by HF; "
                             "one with an HF form mixes punctuation with letters or digits, "
                             "e.g. '<eos>'")
        vocab = {t: i for i, t in enumerate(self.special_tokens)}
        pieces = {p: "".join(map(BYTE_TO_UNICODE.__getitem__, p.encode("utf-8")))
                  for p in self.pieces}
        taken = set(pieces.values())
        for b in range(_N_BYTES):
            char = BYTE_TO_UNICODE[b]
            vocab[char if char not in taken else f"<0x{b:02X}>"] = self._byte_offset + b
        vocab.update((pieces[p], i) for p, i in self._piece_to_id.items())
        sections = _code_hf_sections()
        return {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": sections["pre_tokenizer"],
            "post_processor": None, "decoder": sections["decoder"],
            "model": {"type": "WordPiece", "unk_token": next(iter(vocab)),
                      **_CODE_HF_MODEL, "vocab": vocab},
        }

    @classmethod
    def from_hf(cls, spec: dict, source: str = "<tokenizer.json>") -> CodeTokenizer:
        """Read back what ``to_hf`` writes (or a transformers save of it): the special tokens
        are the entries before the byte tokens; any other difference is refused."""
        model = spec.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not isinstance(vocab, dict):
            raise ValueError(f"{source}: model.vocab is missing or not an object")
        _check_code_hf_sections(spec, source)
        by_id = {i: token for token, i in vocab.items()}
        n = len(vocab)
        if set(by_id) != set(range(n)):
            raise ValueError(f"{source}: model.vocab ids must be 0..{n - 1}, each once")
        n_specials = vocab.get("<0x00>", vocab.get(BYTE_TO_UNICODE[0], n))
        if any(by_id.get(n_specials + b) not in (BYTE_TO_UNICODE[b], f"<0x{b:02X}>")
               for b in range(_N_BYTES)):
            raise ValueError(f"{source}: model.vocab must list the special tokens, the 256 bytes "
                             "in order, then the pieces")
        pieces = []
        for i in range(n_specials + _N_BYTES, n):
            try:
                pieces.append(bytes(map(UNICODE_TO_BYTE.__getitem__, by_id[i])).decode("utf-8"))
            except (KeyError, UnicodeDecodeError):
                raise ValueError(f"{source}: model.vocab entry {by_id[i]!r} (id {i}) is not the "
                                 "ByteLevel spelling of UTF-8 text") from None
        specials = [by_id[i] for i in range(n_specials)]
        # Added tokens may only repeat the special tokens (as a transformers save lists them).
        added = spec.get("added_tokens", [])
        if bad := [e for e in (added if isinstance(added, list) else [added])
                   if not (isinstance(e, dict) and e.get("content") in specials)]:
            raise ValueError(f"{source}: added_tokens entry {shown_json(bad[0])} is not one of "
                             f"the special tokens {specials}: HF would read it inside a text")
        # (distinct: the vocab's keys are, and the ByteLevel spelling maps them one to one)
        return cls(pieces, special_tokens=specials)

    @staticmethod
    def is_hf_form(spec: dict) -> bool:
        """Whether an HF tokenizer.json is a CodeTokenizer's: WordPiece, no continuation prefix."""
        model = spec.get("model")
        return (isinstance(model, dict) and model.get("type") == "WordPiece"
                and model.get("continuing_subword_prefix") == "")

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (into a directory: with a tokenizer_config.json naming the
        special tokens for transformers); one that strips comments in codelm's own format."""
        if self.strip_comments:
            return write_tokenizer(path, self.to_dict(), indent=0)
        roles = {f"{token[1:-1]}_token": token for token in ("<bos>", "<eos>", "<pad>")
                 if token in self.special_tokens}
        others = [t for t in self.special_tokens if t not in roles.values()]
        return write_tokenizer(path, self.to_hf(), 0, replace_config=True, config={
            **roles, "additional_special_tokens": others, "split_special_tokens": True})

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> CodeTokenizer:
        """Read codelm's own format (``to_dict``; one version, another is refused)."""
        if data.get("type") != CODE_TOKENIZER_TYPE:
            raise ValueError(f"{source}: not a codelm CodeTokenizer file (type={data.get('type')!r})")
        version = data.get("format_version")
        if version != CODE_TOKENIZER_FORMAT_VERSION:
            raise ValueError(f"{source}: CodeTokenizer format_version {version!r}; codelm reads "
                             f"format_version {CODE_TOKENIZER_FORMAT_VERSION} (train it again)")
        for key, kind in (("pieces", list), ("special_tokens", list), ("min_freq", int),
                          ("strip_comments", bool)):
            if not isinstance(data.get(key), kind):
                raise ValueError(f"{source}: key {key!r} missing or not a {kind.__name__}")
            if kind is list and not all(isinstance(p, str) and p for p in data[key]):
                raise ValueError(f"{source}: key {key!r} must hold non-empty strings")
        try:
            return cls(data["pieces"], min_freq=data["min_freq"],
                       strip_comments=data["strip_comments"], special_tokens=data["special_tokens"])
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def __repr__(self) -> str:
        return (f"CodeTokenizer(vocab_size={self.vocab_size}, min_freq={self.min_freq}, "
                f"strip_comments={self.strip_comments})")


# ``to_hf``'s WordPiece settings; HF's default max_input_chars_per_word would make long pieces unknown.
_CODE_HF_MODEL = {"continuing_subword_prefix": "", "max_input_chars_per_word": 1 << 40}


def _code_hf_sections() -> dict:
    """The parts of ``to_hf``'s tokenizer.json but the model, added tokens and post-processor."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    splits = [{"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
               "invert": False} for pattern in (_CODE_PIECE_HF_REGEX, _CAP_PIECE_HF_REGEX)]
    return {
        "truncation": None, "padding": None, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [*splits, byte_level]},
        "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, byte_level]},
    }


def _covers(actual: object, expected: object) -> bool:
    """Whether ``actual`` is ``expected`` but for keys ``expected`` lacks (HF saves add some)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            key in actual and _covers(actual[key], value) for key, value in expected.items())
    if isinstance(expected, list):
        return (isinstance(actual, list) and len(actual) == len(expected)
                and all(map(_covers, actual, expected)))
    return type(actual) is type(expected) and actual == expected


def _check_code_hf_sections(spec: dict, source: str) -> None:
    """Refuse an edited CodeTokenizer tokenizer.json: HF would read it as another tokenizer. A
    post-processor may add no ids (a transformers save writes a TemplateProcessing of $A)."""
    try:
        adds_ids = post_processor_ids(spec.get("post_processor")) != ([], [])
    except (ValueError, KeyError, TypeError, AttributeError):
        adds_ids = True  # not one HF would read alike
    parts = {"model": _CODE_HF_MODEL, **_code_hf_sections()}  # a part left out HF reads as null
    part = next((p for p, want in parts.items() if not _covers(spec.get(p), want)),
                "post_processor" if adds_ids else None)
    if part:
        hint = ("; a transformers save after a padded or truncated call writes them: set "
                "truncation and padding to null" if part in ("truncation", "padding") else "")
        raise ValueError(f"{source}: a WordPiece model whose {part} is not codelm's: HF would "
                         f"give other ids or text{hint}")


# Either kind of tokenizer load_tokenizer gives.
Tokenizer = CodeTokenizer | BPETokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json (HF byte-level BPE), a codelm tokenizer file, or a dir with one."""
    directory = Path(path) if Path(path).is_dir() else None
    path = tokenizer_path(path)
    if directory is not None and not path.exists():
        raise ValueError(f"{path}: not found{where_tokenizer_is(directory)}")
    kept = BPETokenizer.from_kept(path)  # a big tokenizer.json read before
    if kept is not None:
        return kept
    if path.suffix in (".jsonl", ".parquet", ".py") and path.is_file():  # data, not a tokenizer
        raise ValueError(f"{path}: a data file, not a tokenizer: give a tokenizer.json, a codelm "
                         "tokenizer file, or a directory holding one (a model's, a run's)")
    data = read_json(path)
    if data.get("type") == CODE_TOKENIZER_TYPE:
        return CodeTokenizer.from_dict(data, str(path))
    if CodeTokenizer.is_hf_form(data):
        return CodeTokenizer.from_hf(data, str(path))
    if "model" in data:
        return BPETokenizer.from_file(path, spec=data)
    raise ValueError(f"{path}: neither a HF tokenizer.json (no 'model' key) nor a codelm tokenizer file")


# PEFT's adapter config (codelm.models.adapter_config.ADAPTER_CONFIG: this floor imports nothing
# else of codelm).
_ADAPTER_CONFIG = "adapter_config.json"


def where_tokenizer_is(directory: str | os.PathLike) -> str:
    """Where the tokenizer of a directory without one is, as the end of an error ("; ..." or
    ""): an adapter's base model, a slow tokenizer's files to convert, a run above (for best/,
    checkpoints/step-N/), or runs below."""
    directory = Path(directory)
    if (directory / _ADAPTER_CONFIG).is_file():
        base = None
        with contextlib.suppress(ValueError):
            base = read_json(directory / _ADAPTER_CONFIG).get("base_model_name_or_path")
        return (f"; {directory} is a LoRA adapter directory ({_ADAPTER_CONFIG}), whose "
                f"tokenizer is its base model's" + (f": {base}" if base else ""))
    slow = [name for name in ("vocab.json", "merges.txt", "tokenizer.model")
            if (directory / name).is_file()]
    if slow:  # a slow tokenizer's files: transformers writes their tokenizer.json
        return (f"; it holds a slow tokenizer's {', '.join(slow)}: python -c \"from transformers "
                f"import AutoTokenizer as T; T.from_pretrained('{directory}')"
                f".save_pretrained('{directory}')\" writes its {TOKENIZER_FILE}")
    for above in list(directory.resolve().parents)[:2]:
        if (above / TOKENIZER_FILE).is_file():
            return f"; {above} above it holds one"
    below = sorted(p.parent for p in directory.glob(f"*/{TOKENIZER_FILE}"))
    hold = "holds" if len(below) == 1 else "hold"
    return f"; {', '.join(map(str, below))} below it {hold} one" if below else ""


def _config_ids(value: object, n_embeddings: object) -> list[int]:
    """A config.json bos/eos entry (null, an id or a list) as ids within the embeddings."""
    ids = value if isinstance(value, list) else [value]
    return [i for i in ids if type(i) is int and i >= 0
            and not (type(n_embeddings) is int and i >= n_embeddings)]


def generation_eos_ids(tok: CodeTokenizer | BPETokenizer, model_eos: object,
                       model_dir: str | os.PathLike | None = None) -> list[int]:
    """The ids that end a generated text, as transformers' generate: the tokenizer's eos, then
    each special-token id of the model's ``eos_token_id`` and of ``model_dir``'s
    generation_config.json (an ordinary token there is a stale class default)."""
    listed = _config_ids(model_eos, tok.vocab_size)
    generation = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if generation is not None and generation.is_file():
        with contextlib.suppress(ValueError):  # an unreadable one adds none
            listed += _config_ids(read_json(generation).get("eos_token_id"), tok.vocab_size)
    ids = dict.fromkeys([tok.eos_id, *(i for i in listed if i in tok._special_ids)])
    return [i for i in ids if i is not None]


def decode_generated(tok: CodeTokenizer | BPETokenizer, ids: Iterable[int],
                     skip_special_tokens: bool = False) -> str:
    """Text of generated ``ids``; as in transformers, ids past the tokenizer decode to nothing
    (``skip_special_tokens``: so do special tokens)."""
    n = tok.vocab_size
    return tok.decode([i for i in ids if i < n], skip_special_tokens, continuation=True)


def _shown_id(tok: CodeTokenizer | BPETokenizer, i: int) -> str:
    """An id with the token it names in ``tok`` (and the role it has there)."""
    if i >= tok.vocab_size:
        return f"{i} (past the tokenizer's {tok.vocab_size} tokens)"
    role = "".join(f", its {r}" for r, own in (("bos", tok.bos_id), ("eos", tok.eos_id))
                   if own == i)
    return f"{i} ({tok.id_to_token(i)!r} in the tokenizer{role})"


def same_vocabulary(tok: CodeTokenizer | BPETokenizer,
                    other: CodeTokenizer | BPETokenizer) -> bool:
    """Whether two tokenizers name every id with the same token."""
    return [tok.id_to_token(i) for i in range(tok.vocab_size)] == [
        other.id_to_token(i) for i in range(other.vocab_size)]


def check_model_tokenizer(tok: CodeTokenizer | BPETokenizer, tokenizer_file: str | os.PathLike,
                          model_dir: str | os.PathLike) -> None:
    """Refuse a tokenizer that is not the model's, as the bos/eos ids of its config.json tell:
    crossed roles, or other ids than a CodeTokenizer's; warn where no role agrees and the ids
    name ordinary tokens (a BPE's differing ids may be a stale config's)."""
    config = Path(model_dir) / "config.json"
    try:
        hf = read_json(config)
    except ValueError:  # none (a model built from the tokenizer), or one the model loader names
        return
    mine = {"bos": tok.bos_id, "eos": tok.eos_id}
    given = {role: _config_ids(hf.get(f"{role}_token_id"), hf.get("vocab_size")) for role in mine}
    compared = {role: ids for role, ids in given.items() if ids and mine[role] is not None}
    differ = {role: ids for role, ids in compared.items() if mine[role] not in ids}
    crossed = any(own in ids for role, ids in differ.items()
                  for other, own in mine.items() if other != role)
    if not differ:
        return
    listed = " and ".join(f"{role}_token_id {', '.join(_shown_id(tok, i) for i in ids)}"
                         for role, ids in differ.items())
    has = " and ".join(f"the tokenizer's {role} is {mine[role]} ({tok.id_to_token(mine[role])!r})"
                       for role in differ)
    own_file = Path(model_dir) / TOKENIZER_FILE
    remedy = (f"pass --tokenizer {model_dir}, the model's own"
              if own_file.is_file() and own_file.resolve() != Path(tokenizer_file).resolve()
              else f"pass --tokenizer with the tokenizer {model_dir} was trained with")
    if crossed or isinstance(tok, CodeTokenizer):
        raise ValueError(f"{tokenizer_file} is not the tokenizer of the model in {model_dir}: "
                         f"{config} has {listed}, but {has}; {remedy}")
    ordinary = [i for ids in differ.values() for i in ids
                if i < tok.vocab_size and i not in tok._special_ids]
    if len(differ) == len(compared) and ordinary:  # no role agrees; not a special token
        print(f"warning: {tokenizer_file} may not be the tokenizer of the model in {model_dir} "
              f"(or its config is stale): {config} has {listed}, but {has}; if its text comes "
              f"out wrong, {remedy}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Show how a tokenizer splits a text: what a model is actually fed."""
    parser = settings.ArgumentParser(
        description="Show how a tokenizer splits a text: each token's id and text (or bytes, "
        "for part of a character), then the count. The tokenizer is a tokenizer.json (HF "
        "byte-level BPE or codelm's), a codelm tokenizer file, or a directory holding one: a "
        "model's, or a run's (runs/NAME).")
    parser.add_argument("tokenizer", help="tokenizer file or directory")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--text", help="the text to split")
    given.add_argument("--file", help="a UTF-8 file whose text to split")
    parser.add_argument("--count", action="store_true", help="print only the number of tokens")
    parser.add_argument("--add-special-tokens", action="store_true",
                        help="with the tokens the tokenizer's template puts before a text, as "
                        "a model is fed it (e.g. Llama-3's BOS; codelm's own tokenizer: none)")
    args = parser.parse_args(argv)
    return process.run_tool(lambda: _show_split(args))


def _show_split(args) -> None:
    tok = load_tokenizer(args.tokenizer)
    text = args.text
    if args.file is not None:
        try:
            text = Path(args.file).read_bytes().decode("utf-8")  # its \r\n as they are
        except UnicodeDecodeError as err:
            raise ValueError(f"{args.file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    ids = tok.encode(text)
    if args.add_special_tokens:  # as a model is fed the text: its template's start before it
        ids = [*tok.template_prefix, *ids]
    if args.count:
        print(len(ids))
        return
    width = len(str(tok.vocab_size - 1))
    for i in ids:
        raw = tok.token_bytes(i)
        try:
            shown = repr(raw.decode("utf-8"))
        except UnicodeDecodeError:  # part of a character: its bytes
            shown = repr(raw)
        print(f"{i:>{width}}  {shown}")
    per_token = f" ({len(text) / len(ids):.2f} characters a token)" if ids else ""
    print(f"{len(ids)} tokens for {len(text)} characters{per_token}")


if __name__ == "__main__":
    sys.exit(process.run_main(main))
