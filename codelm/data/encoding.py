"""Text to ids as training reads it: documents and prompts encoded (special tokens' text as
text, or read as the tokens), examples tokenized and cut to fit (``tokenize_examples``,
``supervised_example``, ``fit_prompt``), fill-in-the-middle prompts, and the tokenizer's part in
the cache key (``tokenizer_fingerprint``)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import random
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from itertools import accumulate, groupby
from pathlib import Path

import numpy as np
import torch

from codelm.data.cache import hash_json
from codelm.data.config import FIM_SENTINELS, DataConfig
from codelm.data.examples import Example
from codelm.data.splits import corpus_key
from codelm.kernels import IGNORE_INDEX
from codelm.runtime.console import progress_bar
from codelm.tokenization.batching import (
    CONTINUATION_ANCHOR,
    BatchEncoder,
    continuation_ids,
)
from codelm.tokenization.bpe import BPETokenizer
from tokenizer import ENCODING_VERSION, CodeTokenizer, Tokenizer


def supervised_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int,
                       max_completion_tokens: int | None = None,
                       max_prompt_tokens: int | None = None, code: tuple[int, int] = (0, 0),
                       start: Sequence[int] = ()) -> dict[str, torch.Tensor]:
    """One causal-LM example: ``start`` + prompt + completion cut by ``truncate_pair``."""
    prompt, completion = truncate_pair(prompt_ids, completion_ids, max_length - len(start),
                                        max_completion_tokens, max_prompt_tokens, code)
    prompt = [*start, *prompt]
    seq = torch.tensor(prompt + completion, dtype=torch.long)
    labels = seq[1:].clone()
    labels[: max(0, len(prompt) - 1)] = IGNORE_INDEX
    return {"input_ids": seq[:-1], "labels": labels}


def truncate_pair(prompt_ids: Sequence[int], completion_ids: Sequence[int], max_length: int,
                   max_completion_tokens: int | None, max_prompt_tokens: int | None = None,
                   code: tuple[int, int] = (0, 0)) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into ``max_length + 1`` tokens and the prompt into
    ``max_prompt_tokens`` (``fit_prompt`` cuts it); the completion keeps its start."""
    completion = list(completion_ids)[:max_completion_tokens]
    room = len(prompt_ids) if max_prompt_tokens is None else min(len(prompt_ids), max_prompt_tokens)
    budget = max_length + 1
    # When both are long, the prompt keeps half the sequence: a completion cut short still
    # teaches its start, a prompt cut to a token or two conditions nothing.
    room = min(room, max(budget - len(completion), budget // 2))
    return fit_prompt(prompt_ids, room, code), completion[: budget - room]


def fit_prompt(prompt_ids: Sequence[int], room: int, code: tuple[int, int] = (0, 0)) -> list[int]:
    """The prompt cut to ``room`` tokens: the end of its ``code`` span (start, end) goes first, so
    that the instruction around the code survives, then its left end (training and eval.py)."""
    prompt = list(prompt_ids)
    room = min(room, len(prompt))
    start, end = code
    del prompt[max(start, end - (len(prompt) - room)) : end]
    return prompt[len(prompt) - room :]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """Hash of the tokenizer's saved files, role ids and ``ENCODING_VERSION``: the cache changes
    when the ids can."""
    with tempfile.TemporaryDirectory(prefix="codelm-tokenizer-") as d:
        target = Path(d) / "tokenizer"
        target.mkdir()
        tokenizer.save(str(target))
        roles = ("vocab_size", "bos_id", "eos_id", "pad_id",  # can come from files beside it
                 "fim_prefix_id", "fim_middle_id", "fim_suffix_id")
        key = [ENCODING_VERSION, *(getattr(tokenizer, r) for r in roles)]
        h = hashlib.sha256(json.dumps(key).encode())
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                h.update(p.relative_to(d).as_posix().encode() + b"\0" + p.read_bytes())
        return h.hexdigest()[:24]


def tokenizer_cache_dir(cfg: DataConfig, min_freq: int, max_vocab: int | None,
                        kind: str = "code") -> Path:
    """Where a tokenizer of ``kind`` (a CodeTokenizer, or a byte-level BPE) trained on
    ``cfg``'s train split is cached."""
    keyed = {"v": ENCODING_VERSION, "corpus": corpus_key(cfg), "min_freq": min_freq,
             "max_vocab": max_vocab}
    if kind != "code":  # a CodeTokenizer's key names no kind
        keyed["kind"] = kind
    key = hash_json(keyed)
    return Path(cfg.cache_dir) / f"tokenizer-{key}"


def reads_special_tokens(task: str | None, pair_special_tokens: object) -> bool:
    """Whether a run's pair records (and its prompts) read special-token text as the tokens: a
    chat template's always do."""
    return task == "chat" or (bool(pair_special_tokens) and task != "lm")


def encode(tokenizer: Tokenizer, texts: list[str], cfg: DataConfig, desc: str,
            specials: Sequence[bool] = (), encoder: BatchEncoder | None = None
            ) -> list[list[int]]:
    """The texts' ids, encoded in chunks of about 16M characters (bounded memory, a progress
    bar) on ``encoder`` where it is the tokenizer's (a build's pool), else on a pool of this
    call; a special token's text is text, except in the texts ``specials`` marks
    (``pair_special_tokens``)."""
    if encoder is None or encoder.tokenizer is not tokenizer:
        encoding = tokenizer.batch_encoder(cfg.workers)
    else:
        encoding = contextlib.nullcontext(encoder)
    out: list[list[int]] = [[] for _ in texts]
    with encoding as encoder, progress_bar(total=len(texts), desc=desc, unit="text",
                                           enabled=cfg.progress) as bar:
        for read in (False, True):
            which = [i for i in range(len(texts)) if bool(specials and specials[i]) == read]
            ends = accumulate(len(texts[i]) for i in which)  # characters up to each text
            for _, chunk in groupby(zip(which, ends), lambda pair: pair[1] // 16_000_000):
                chunk = [i for i, _ in chunk]
                encoded = encoder([texts[i] for i in chunk], split_special_tokens=not read)
                for i, ids in zip(chunk, encoded):
                    out[i] = ids
                bar.update(len(chunk))
    return out


def token_dtype(tokenizer: Tokenizer) -> str:
    return "uint16" if tokenizer.vocab_size <= 65536 else "uint32"


def template_writes_start(task: str | None) -> bool:
    """Whether a task's prompts are a chat template's text, which writes their start tokens
    itself (a BOS or none): their ids are that text's as it reads, nothing added or taken
    away, as transformers' apply_chat_template(tokenize=True) and the server encode them."""
    return task == "chat"


def template_start_length(ids: Sequence[int], tokenizer: CodeTokenizer | BPETokenizer) -> int:
    """How many of a template-written text's ``ids`` are its start, kept when a long prompt
    loses its history: the tokenizer's template prefix, else a BOS, where the ids begin so."""
    prefix = tokenizer.template_prefix
    if prefix and list(ids[: len(prefix)]) == prefix:
        return len(prefix)
    return 1 if tokenizer.bos_id is not None and list(ids[:1]) == [tokenizer.bos_id] else 0


def prompt_prefix(tokenizer: CodeTokenizer | BPETokenizer, task: str | None) -> list[int]:
    """The ids before a prompt, as the model saw text in training: the template start (Llama-3's
    BOS), after an EOS for the lm task, which packs each file after one."""
    eos = [tokenizer.eos_id] if task == "lm" and tokenizer.eos_id is not None else []
    return eos + tokenizer.template_prefix


def special_token_text(tokenizer: CodeTokenizer | BPETokenizer) -> re.Pattern | None:
    """What finds the text of the tokenizer's ``matched_special_tokens``; None: it has none."""
    specials = tokenizer.matched_special_tokens
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _without_text_template_prefix(ids: list[int], prefix: Sequence[int]) -> list[int]:
    """``ids`` less a start equal to the template prefix (``prompt_prefix`` places it): one BOS."""
    return ids[len(prefix) :] if prefix and ids[: len(prefix)] == list(prefix) else ids


RUN_READ_TEXT = "the run trained on such text as text (pair records without pair_special_tokens, " \
                "or the lm task)"


def encode_prompts(tokenizer: CodeTokenizer | BPETokenizer, prompts: Sequence[str],
                   pair_special_tokens: bool | None = None, remedy: str = "",
                   why: str = RUN_READ_TEXT) -> list[list[int]]:
    """The ids of user prompts (after ``prompt_prefix``), a special token's text read as the model
    learned it: None (a base model) as transformers does, True as pairs, False as text (a note)."""
    if pair_special_tokens is None:
        return [tokenizer.encode(p) for p in prompts]
    if pair_special_tokens:
        prefix = tokenizer.template_prefix
        return [_without_text_template_prefix(tokenizer.encode(p), prefix) for p in prompts]
    found = special_token_text(tokenizer)
    held = {m for p in prompts for m in found.findall(p)} if found else set()
    if held:
        n = len({p for p in prompts if found.search(p)})  # pass@k repeats each problem
        names = [t for t in tokenizer.matched_special_tokens if t in held]
        print(f"note: {n} prompt(s) hold the text of special token(s) of the tokenizer "
              f"({', '.join(names)}); {why}, so the prompt is encoded as text, not as those "
              f"tokens (as transformers' tokenizer(text) would read them){remedy}",
              file=sys.stderr)
    return [encode_text(tokenizer, p) for p in prompts]


def encode_text(tokenizer: CodeTokenizer | BPETokenizer, text: str) -> list[int]:
    """A text's ids as data building encodes a document (special tokens' text is text)."""
    return tokenizer.encode(text, split_special_tokens=True)


def fitted_prompt(example: Example, tokenizer: CodeTokenizer | BPETokenizer) -> str:
    """``example``'s prompt as text, its body cut to ``body_budget`` tokens (``encode_text``'s)."""
    body = example.body
    if example.body_budget is not None:
        body = _body_cut(tokenizer, body, encode_text(tokenizer, body), example.body_budget)
    return example.head + body + example.tail


def _body_cut(tokenizer: CodeTokenizer | BPETokenizer, body: str, ids: Sequence[int],
              budget: int) -> str:
    """``body`` cut to the first ``budget`` of its ``ids`` as text, less a character the cut
    splits (a byte-level token can hold part of one): the decoded ids would end it with U+FFFD,
    which the body does not hold."""
    n = min(budget, len(ids))
    text = tokenizer.decode(ids[:n])
    while n > 0 and text.endswith("\ufffd") and "\ufffd" not in body:
        n -= 1
        text = tokenizer.decode(ids[:n])
    return text


def ended(completion_ids: list[int], eos_id: int | None, ends: bool,
          max_completion_tokens: int | None = None) -> list[int]:
    """The completion as training ends it: with EOS where it ends its text (a window cut from a
    file does not) and EOS is added, unless it already ends with one. One longer than
    ``max_completion_tokens`` is cut there and gets no EOS (it does not end); the limit counts
    the completion's own tokens, so one of exactly that length keeps its EOS."""
    if max_completion_tokens is not None and len(completion_ids) > max_completion_tokens:
        return list(completion_ids[:max_completion_tokens])
    if ends and eos_id is not None and completion_ids[-1:] != [eos_id]:
        return [*completion_ids, eos_id]
    return completion_ids


def packed_document(tokenizer: CodeTokenizer | BPETokenizer, ids: Sequence[int]) -> list[int]:
    """A file's ids as the lm task packs them: the template start, the file, EOS."""
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]  # eval.py scores without one
    return [*tokenizer.template_prefix, *ids, *eos]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize_examples(examples: list[Example], tokenizer: CodeTokenizer | BPETokenizer,
                      cfg: DataConfig, desc: str, encoder: BatchEncoder | None = None
                      ) -> list[tuple[list[int], list[int], tuple[int, int]]]:
    """(prompt ids, completion ids, the body's span in the prompt) of each example. The prompt
    is tokenized whole (as a tokenizer reads the text), a body with a budget first cut to it as
    text (``fitted_prompt``'s cut); its head and tail apart only to find the body's span. With
    ``pair_special_tokens`` a pair reads special tokens' text as the tokens, and loses its own
    template prefix (one BOS)."""
    # Text far beyond what can survive truncation is cut before tokenizing.
    chars = tokenizer.longest_token * (cfg.block_size + 1)
    reads = [(cfg.pair_special_tokens or cfg.task == "chat") and e.pair for e in examples]
    examples = _bodies_cut(examples, tokenizer, cfg, desc, reads, encoder)
    anchor = tokenizer.continuation_anchor
    before = "" if anchor is None else CONTINUATION_ANCHOR
    start_text = _template_start_text(tokenizer, cfg.task)
    parts = []
    for e in examples:
        head = _head_cut(e.head, chars, start_text)
        whole = head + e.body[:chars] + e.tail
        parts += [whole, head, e.tail] if e.body else [whole, "", ""]
        parts.append(before + e.completion[:chars])
    ids = encode(tokenizer, parts, cfg, desc, [r for r in reads for _ in range(4)], encoder)
    prefix = tokenizer.template_prefix
    out = []
    for i, e in enumerate(examples):
        whole, head, tail, completion = ids[4 * i : 4 * i + 4]
        completion = continuation_ids(completion, anchor, lambda i=i: encode(
            tokenizer, [parts[4 * i + 3][len(before):]], cfg, desc, [reads[i]], encoder)[0])
        start = _common_prefix(whole, head)
        end = start
        if e.body:
            end = max(start, len(whole) - _common_prefix(whole[::-1], tail[::-1]))
            end = _before_shared_token(tokenizer, whole, start, end, tail, e.tail)
        # With pair_special_tokens the text's own BOS goes.
        n = 0
        if reads[i] and not template_writes_start(cfg.task):
            n = len(whole) - len(_without_text_template_prefix(whole, prefix))
        out.append((whole[n:], completion, (max(0, start - n), max(0, end - n))))
    return out


def _before_shared_token(tokenizer: CodeTokenizer | BPETokenizer, whole: list[int], start: int,
                         end: int, tail: list[int], tail_text: str) -> int:
    """The end of a prompt's body span (``start``, ``end``) moved back over a token the body
    shares with its tail (a byte-level BPE reads ")\n\n" as one token), so that a cut of the
    body's end never takes the tail's text with it: the prompt keeps its "\n\nDocstring:".
    ``tail``: the tail's ids alone (a SentencePiece tokenizer's open with a space it adds)."""
    if len(whole) - end >= len(tail):  # every token of the tail matched: none is shared
        return end
    tail_length = min(len(tail_text), len(tokenizer.decode(tail, continuation=True)))
    while end > start and len(tokenizer.decode(whole[end:], continuation=True)) < tail_length:
        end -= 1
    return end


def _template_start_text(tokenizer: CodeTokenizer | BPETokenizer, task: str | None) -> str:
    """The text a template-written prompt opens with and truncation keeps (its BOS's), else ""."""
    if not template_writes_start(task) or tokenizer.bos_id is None:
        return ""
    return tokenizer.token_content(tokenizer.bos_id) or ""


def _head_cut(head: str, chars: int, start_text: str) -> str:
    """A prompt's head within ``chars`` characters, its last ones (far more than truncation
    keeps), after ``start_text`` where the head opens with it: the start truncation keeps."""
    if len(head) <= chars:
        return head
    opening = start_text if start_text and head.startswith(start_text) else ""
    return opening + head[-chars:]


def _bodies_cut(examples: list[Example], tokenizer: CodeTokenizer | BPETokenizer,
                cfg: DataConfig, desc: str, reads: list[bool], encoder: BatchEncoder | None
                ) -> list[Example]:
    """The examples, each body with a token budget cut to it as text (``_body_cut``), as
    ``fitted_prompt`` cuts it."""
    budgeted = [i for i, e in enumerate(examples) if e.body_budget is not None]
    if not budgeted:
        return examples
    bodies = [examples[i].body[: tokenizer.longest_token * examples[i].body_budget]
              for i in budgeted]
    ids = encode(tokenizer, bodies, cfg, desc, [reads[i] for i in budgeted], encoder)
    cut = list(examples)
    for i, body in zip(budgeted, ids):
        text = _body_cut(tokenizer, examples[i].body, body, examples[i].body_budget)
        cut[i] = dataclasses.replace(examples[i], body=text, body_budget=None)
    return cut


def window_pairs(ids: list[int], cfg: DataConfig) -> Iterator[tuple[list[int], list[int]]]:
    """A sliding window: up to P tokens of context -> the next C tokens (at least one: a
    window may start at the file's last token)."""
    p, c = cfg.window_prompt_tokens, cfg.window_completion_tokens
    stride = cfg.window_stride or (p + c)
    for s in range(min(p, max(1, len(ids) - c)), len(ids), stride):
        prompt, completion = ids[max(0, s - p) : s], ids[s : s + c]
        if prompt and completion:
            yield prompt, completion


def _char_start(raw: bytes, x: int) -> int:
    """``x`` moved back to the start of the UTF-8 character holding byte ``x``."""
    for _ in range(3):
        if 0 < x < len(raw) and raw[x] & 0xC0 == 0x80:
            x -= 1
    return x


def _fim_plan(ids: list[int], doc_id: str, size: int, tokenizer, cfg: DataConfig,
              byte_lengths: np.ndarray) -> list[list[int] | tuple[str, str, str]]:
    """A file's chunks of ``size`` tokens: plain LM chunks (ids, after the first one token more:
    the one before it) or, for a seeded ``fim_rate`` share, the texts of prefix, middle and
    suffix cut at two tokens moved to character starts."""
    rng = random.Random(f"{cfg.seed}\0fim\0{doc_id}")
    table = tokenizer._id_to_bytes
    offsets = None
    plan: list[list[int] | tuple[str, str, str]] = []
    for s in range(0, len(ids), size):
        chunk = ids[s : s + size]
        if len(chunk) >= 3 and rng.random() < cfg.fim_rate:
            a, b = sorted(rng.sample(range(1, len(chunk)), 2))
            if offsets is None:  # where each token of the file starts, in bytes
                offsets = np.concatenate([[0], np.cumsum(byte_lengths[ids])]).tolist()
            # The chunk's bytes and 3 tokens either side, to find where its end characters start.
            first = max(0, s - 3)
            raw = b"".join(map(table.__getitem__, ids[first : s + len(chunk) + 3]))
            start, x, y, end = (_char_start(raw, offsets[s + k] - offsets[first])
                                for k in (0, a, b, len(chunk)))
            while y <= x < end or (y < end and raw[y] & 0xC0 == 0x80):
                y += 1  # both cuts in one character: the middle takes that character
            plan.append(tuple(raw[i:j].decode("utf-8", "replace")
                              for i, j in ((start, x), (x, y), (y, end))))
        else:  # plain: after the first, the token before it opens it (where no template start
            # does), so that its own first token is a target too, as in an lm window
            lead = ids[s - 1 : s] if s and not tokenizer.template_prefix else []
            if len(lead) + len(chunk) >= 2:
                plan.append(lead + chunk)
    return plan


def fim_pairs(docs: list[tuple[list[int], str]], tokenizer: Tokenizer, cfg: DataConfig,
               desc: str = "fim parts", encoder: BatchEncoder | None = None
               ) -> list[list[tuple[list[int], list[int]]]]:
    """(prompt, completion) pairs of each file ``(ids, doc id)``: plain LM chunks, and a
    ``fim_rate`` share of prefix-suffix-middle (PSM) examples whose parts are cut at characters
    and encoded alone, as at inference (StarCoder's FIM)."""
    # The template prefix, three sentinels, the chunk and EOS fill ``block_size + 1``.
    size = max(2, cfg.block_size + 1 - 4 - len(tokenizer.template_prefix))
    byte_lengths = np.fromiter(map(len, tokenizer._id_to_bytes), np.int64)
    plans = [_fim_plan(ids, doc_id, size, tokenizer, cfg, byte_lengths) for ids, doc_id in docs]
    texts = [t for plan in plans for item in plan if isinstance(item, tuple) for t in item]
    parts = iter(encode(without_stripping(tokenizer), texts, cfg, desc, encoder=encoder))

    def pair(item: list[int] | tuple[str, str, str]) -> tuple[list[int], list[int]]:
        if not isinstance(item, tuple):
            return [], item
        prefix, middle, suffix = next(parts), next(parts), next(parts)
        # Encoded apart, the parts can outgrow the chunk: the prompt gets what the middle leaves.
        limit = max(FIM_SENTINELS, size + FIM_SENTINELS - len(middle))
        limit = min(limit, cfg.max_prompt_tokens or limit)
        return fim_prompt(tokenizer, prefix, suffix, limit), middle

    return [[pair(item) for item in plan] for plan in plans]


def fim_prompt(tokenizer: Tokenizer, prefix: list[int], suffix: list[int], max_prompt_tokens: int
               ) -> list[int]:
    """A prefix-suffix-middle prompt in the tokenizer's own FIM tokens (PREFIX prefix SUFFIX
    suffix MIDDLE), prefix and suffix cut to fit ``max_prompt_tokens`` (training and eval.py)."""
    prefix, suffix = _fit_fim_context(prefix, suffix, max_prompt_tokens)
    return ([tokenizer.fim_prefix_id] + prefix + [tokenizer.fim_suffix_id] + suffix
            + [tokenizer.fim_middle_id])


def without_stripping(tokenizer: Tokenizer) -> Tokenizer:
    """``tokenizer`` without comment stripping: PSM parts are already stripped text, and a part
    stripped alone can lose code (a string's tail read as a comment)."""
    if not getattr(tokenizer, "strip_comments", False):
        return tokenizer
    plain = copy.copy(tokenizer)
    plain.strip_comments = False
    return plain


def _fit_fim_context(prefix: list[int], suffix: list[int], max_prompt_tokens: int
                     ) -> tuple[list[int], list[int]]:
    """Prefix and suffix cut to fit a PSM prompt into ``max_prompt_tokens``, keeping the code
    next to the middle (each keeps half the room where both are long)."""
    room = max_prompt_tokens - FIM_SENTINELS
    keep = min(len(prefix), max(room // 2, room - len(suffix)))
    return prefix[len(prefix) - keep :], suffix[: room - keep]
