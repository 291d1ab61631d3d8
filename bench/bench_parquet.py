"""Peak memory of reading a large parquet file into the corpus: it streams in batches.

    python bench/bench_parquet.py [--gb 2]

Writes a parquet file of about ``--gb`` GB of code records (the stdlib's files, repeated under
distinct paths so that exact dedupe keeps one copy of each), then, in a fresh process, runs
``load_corpus`` on it (read, dedupe, clean, split) and reports the file size, the time,
the kept documents and the process's peak RSS (``VmHWM``) beside that of the same process
loading only the stdlib copy once: what reading the big file adds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from codelm.data.config import DataConfig
from codelm.data.splits import load_corpus
cfg = DataConfig(sources=[{source!r}], cache_dir={cache!r}, progress=False)
start = time.perf_counter()
corpus = load_corpus(cfg)
seconds = time.perf_counter() - start
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"seconds": seconds, "docs": len(corpus.train) + len(corpus.val)
                  + len(corpus.test), "peak_mib": peak / 1024}}))
"""


def write_parquet(path: Path, texts: list[tuple[str, str]], target_bytes: int) -> int:
    """Copies of ``texts`` (path, text) until the file holds about ``target_bytes`` of text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    per_copy = sum(len(t.encode()) for _, t in texts)
    schema = pa.schema([("repo", pa.string()), ("path", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none") as writer:
        for copy in range(max(1, target_bytes // per_copy)):
            writer.write_table(pa.table({"repo": [f"copy{copy}"] * len(texts),
                                         "path": [p for p, _ in texts],
                                         "text": [t for _, t in texts]}, schema=schema),
                               row_group_size=1024)
    return path.stat().st_size


def measure(source: Path, cache: Path) -> dict:
    code = CHILD.format(root=str(ROOT), source=str(source), cache=str(cache))
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="the file's size (default: 2)")
    args = parser.parse_args()
    from codelm.data.sources import stdlib_files, stdlib_root

    root = stdlib_root()
    texts = [(p.relative_to(root).as_posix(), p.read_text("utf-8", "replace"))
             for p in stdlib_files() if p.stat().st_size < 200_000]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        once = tmp / "once.parquet"
        write_parquet(once, texts, 1)
        big = tmp / "big.parquet"
        size = write_parquet(big, texts, int(args.gb * 2**30))
        print(f"wrote {size / 2**30:.2f} GiB in {time.perf_counter() - start:.0f} s")
        base, read = measure(once, tmp / "cache1"), measure(big, tmp / "cache2")
    print("| file | size | load_corpus | kept docs | peak RSS |\n| --- | --- | --- | --- | --- |")
    print(f"| stdlib once | {once_size(texts)} | {base['seconds']:.0f} s | {base['docs']} | "
          f"{base['peak_mib']:.0f} MiB |")
    print(f"| {args.gb:g} GB of copies | {size / 2**30:.2f} GiB | {read['seconds']:.0f} s | "
          f"{read['docs']} | {read['peak_mib']:.0f} MiB |")


def once_size(texts: list[tuple[str, str]]) -> str:
    return f"{sum(len(t.encode()) for _, t in texts) / 2**20:.0f} MiB"


if __name__ == "__main__":
    main()
