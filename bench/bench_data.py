"""Data pipeline throughput on the stdlib corpus: clean, split, tokenize and pack (lm task).

    python bench/bench_data.py [--workers 1 2] [--autopep8] [--block-size 256]

For each worker count, a cold run in a fresh cache: MB/s of raw source through cleaning + split
(corpus stage) and through tokenization + packing (task stage), and end to end. Then the second
run, which loads from the cache: in-process ``prepare`` time and a fresh ``python`` process that
imports dataset and prepares (imports included). Without ``--autopep8`` the cleaning with
autopep8 is timed on one stdlib package (email/). The tokenizer (CodeTokenizer, min_freq 10) is
trained once on the train split, outside the timings.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
from codelm.data.config import DataConfig  # noqa: E402
from codelm.data.sources import stdlib_root  # noqa: E402
from codelm.data.splits import load_corpus  # noqa: E402
from tokenizer import CodeTokenizer  # noqa: E402

# A fresh process that prepares the cached data again: its time inside, imports included.
CACHED_IN_A_FRESH_PROCESS = """
import sys, time
start = time.perf_counter()
sys.path.insert(0, sys.argv[1])
import dataset
from codelm.data.config import DataConfig
from tokenizer import load_tokenizer
cfg = DataConfig(task="lm", block_size=int(sys.argv[3]), autopep8=sys.argv[5] == "1",
                 num_workers=int(sys.argv[4]), cache_dir=sys.argv[2], progress=False)
data = dataset.prepare(cfg, load_tokenizer(sys.argv[6]))
assert data.stats["cache_hit"]
print(time.perf_counter() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts, one cold run each (default: 1 2)")
    parser.add_argument("--autopep8", action="store_true", help="include autopep8 (slow)")
    parser.add_argument("--block-size", type=int, default=256,
                        help="tokens per packed sequence (default: 256)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        config = functools.partial(_config, Path(tmp), args)
        texts = dataset.prepare(config("tok", 2), None)
        tok = CodeTokenizer.train(texts.train, min_freq=10)
        tok_path = tok.save(Path(tmp) / "tokenizer.json")
        raw_mb = texts.stats["corpus"]["read"]["bytes"] / 1e6
        print(
            f"stdlib corpus: {texts.stats['corpus']['read']['files']} files, {raw_mb:.1f} MB; "
            f"tokenizer vocab {tok.vocab_size}; autopep8 {'on' if args.autopep8 else 'off'}"
        )
        _cold_runs(config, tok, raw_mb, args.workers)
        if not args.autopep8:  # autopep8 is slow: time it on one stdlib package instead
            _autopep8_runs(config, args.workers)
        _cached_runs(config(f"w{args.workers[0]}", args.workers[0]), tok, tok_path)


def _config(tmp: Path, args: argparse.Namespace, cache: str, workers: int) -> DataConfig:
    """The lm task's data on the stdlib, cached under ``tmp / cache``."""
    return DataConfig(task="lm", block_size=args.block_size, autopep8=args.autopep8,
                      num_workers=workers, cache_dir=str(tmp / cache), progress=False)


def _cold_runs(config: Callable[[str, int], DataConfig], tok: CodeTokenizer, raw_mb: float,
               workers_counts: list[int]) -> None:
    """One cold run for each worker count: cleaning + split, then tokenizing + packing."""
    print(
        f"{'workers':>7} {'clean MB/s':>11} {'tokenize+pack MB/s':>19} {'total MB/s':>11} "
        f"{'total s':>8}"
    )
    totals = {}
    for workers in workers_counts:
        cfg = config(f"w{workers}", workers)
        start = time.perf_counter()
        load_corpus(cfg)
        cleaned = time.perf_counter()
        data = dataset.prepare(cfg, tok)
        done = time.perf_counter()
        assert not data.stats["cache_hit"]
        totals[workers] = done - start
        print(
            f"{workers:>7} {raw_mb / (cleaned - start):>11.2f} "
            f"{raw_mb / (done - cleaned):>19.2f} {raw_mb / (done - start):>11.2f} "
            f"{done - start:>8.1f}"
        )
    for workers in totals:
        if 1 in totals and workers != 1:
            print(f"speedup, {workers} workers vs 1: {totals[1] / totals[workers]:.2f}x")


def _autopep8_runs(config: Callable[[str, int], DataConfig], workers_counts: list[int]) -> None:
    """Cleaning with autopep8 on one stdlib package, for each worker count."""
    sample = stdlib_root() / "email"
    for workers in workers_counts:
        cfg = config(f"pep8-{workers}", workers)
        cfg.sources, cfg.autopep8 = [str(sample)], True
        start = time.perf_counter()
        corpus = load_corpus(cfg)
        took = time.perf_counter() - start
        mb = corpus.stats["read"]["bytes"] / 1e6
        print(
            f"clean with autopep8, stdlib email/ ({mb:.2f} MB), {workers} workers: "
            f"{mb / took:.3f} MB/s"
        )


def _cached_runs(cfg: DataConfig, tok: CodeTokenizer, tok_path: Path) -> None:
    """The second preparation of ``cfg``'s data, a cache hit: in this process, and in a fresh
    one (imports included)."""
    start = time.perf_counter()
    data = dataset.prepare(cfg, tok)
    cached = time.perf_counter() - start
    assert data.stats["cache_hit"]
    print(
        f"second run (cache hit), in process: {cached:.3f} s "
        f"({len(data.train)} train windows, {data.train.n_tokens} train tokens)"
    )
    command = [sys.executable, "-c", CACHED_IN_A_FRESH_PROCESS, str(ROOT), cfg.cache_dir,
               str(cfg.block_size), str(cfg.num_workers), "1" if cfg.autopep8 else "0",
               str(tok_path)]
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    print(
        f"second run (cache hit), fresh process: {float(out.stdout):.3f} s inside "
        f"(imports included), {wall:.2f} s wall with interpreter start"
    )


if __name__ == "__main__":
    main()
