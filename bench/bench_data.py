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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dataset  # noqa: E402
from codelm.data.config import DataConfig  # noqa: E402
from codelm.data.sources import stdlib_root  # noqa: E402
from codelm.data.splits import load_corpus  # noqa: E402
from tokenizer import CodeTokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker counts, one cold run each (default: 1 2)")
    parser.add_argument("--autopep8", action="store_true", help="include autopep8 (slow)")
    parser.add_argument("--block-size", type=int, default=256,
                        help="tokens per packed sequence (default: 256)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def config(cache: str, workers: int) -> DataConfig:
            return DataConfig(
                task="lm",
                block_size=args.block_size,
                autopep8=args.autopep8,
                num_workers=workers,
                cache_dir=str(tmp / cache),
                progress=False,
            )

        texts = dataset.prepare(config("tok", 2), None)
        tok = CodeTokenizer.train(texts.train, min_freq=10)
        tok_path = tok.save(tmp / "tokenizer.json")
        raw_mb = texts.stats["corpus"]["read"]["bytes"] / 1e6
        print(
            f"stdlib corpus: {texts.stats['corpus']['read']['files']} files, {raw_mb:.1f} MB; "
            f"tokenizer vocab {tok.vocab_size}; autopep8 {'on' if args.autopep8 else 'off'}"
        )
        print(
            f"{'workers':>7} {'clean MB/s':>11} {'tokenize+pack MB/s':>19} {'total MB/s':>11} "
            f"{'total s':>8}"
        )
        totals = {}
        for workers in args.workers:
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

        if not args.autopep8:  # autopep8 is slow: time it on one stdlib package instead
            sample = stdlib_root() / "email"
            for workers in args.workers:
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

        cfg = config(f"w{args.workers[0]}", args.workers[0])
        start = time.perf_counter()
        data = dataset.prepare(cfg, tok)
        cached = time.perf_counter() - start
        assert data.stats["cache_hit"]
        print(
            f"second run (cache hit), in process: {cached:.3f} s "
            f"({len(data.train)} train windows, {data.train.n_tokens} train tokens)"
        )
        code = (
            "import sys, time; t = time.perf_counter(); sys.path.insert(0, sys.argv[1]); "
            "import dataset; from codelm.data.config import DataConfig; "
            "from tokenizer import load_tokenizer; "
            "cfg = DataConfig(task='lm', block_size=int(sys.argv[3]), "
            "autopep8=sys.argv[5] == '1', num_workers=int(sys.argv[4]), cache_dir=sys.argv[2], "
            "progress=False); d = dataset.prepare(cfg, load_tokenizer(sys.argv[6])); "
            "assert d.stats['cache_hit']; print(time.perf_counter() - t)"
        )
        start = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(ROOT),
                cfg.cache_dir,
                str(args.block_size),
                str(args.workers[0]),
                "1" if args.autopep8 else "0",
                str(tok_path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - start
        print(
            f"second run (cache hit), fresh process: {float(out.stdout):.3f} s inside "
            f"(imports included), {wall:.2f} s wall with interpreter start"
        )


if __name__ == "__main__":
    main()
