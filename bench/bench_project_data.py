"""The project task's training examples (``--task project``): how fast ``project_pairs``
composes a split's repositories into sequences and completion examples, in one process against
its worker processes, on real code.

    python bench/bench_project_data.py [--packages 12] [--workers 0] [--block-size 2048]

The corpus is the Python standard library's own source (the embedded default corpus): each of
its largest ``--packages`` packages is a repository (its files under the package's name). A
CodeTokenizer is trained on it; then ``project_pairs`` builds the examples (the bm25 composer,
``--lines-per-file`` lines a file) in one process and on ``--workers`` processes (0: every
core), and checks the two give the same examples. Figures: characters of code a second, and the
workers' speed over the one process.
"""

from __future__ import annotations

import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codelm.data.config import DataConfig  # noqa: E402
from codelm.data.project import project_pairs  # noqa: E402
from codelm.data.sources import Doc  # noqa: E402
from codelm.runtime import process, settings  # noqa: E402
from tokenizer import CodeTokenizer  # noqa: E402


@dataclass
class BenchConfig:
    packages: int = 12  # the standard library's largest packages, each a repository
    workers: int = 0  # worker processes of the parallel build (0: every core)
    block_size: int = 2048  # tokens an example may have
    lines_per_file: int = 5  # completion examples a file


def stdlib_repositories(count: int) -> list[Doc]:
    """The files of the standard library's ``count`` largest packages (by characters), each
    package a repository."""
    root = Path(sysconfig.get_paths()["stdlib"])
    packages = []
    for package in sorted(p for p in root.iterdir() if (p / "__init__.py").is_file()):
        files = sorted(f for f in package.rglob("*.py") if "test" not in f.parts)
        texts = {f.relative_to(root).as_posix(): f.read_text(errors="replace") for f in files}
        packages.append((sum(map(len, texts.values())), package.name, texts))
    packages.sort(key=lambda entry: (-entry[0], entry[1]))
    docs = []
    for _, name, texts in packages[:count]:
        docs += [Doc(path, text, repo=name) for path, text in texts.items()]
    return docs


def timed_build(docs: list[Doc], tok: CodeTokenizer, cfg: DataConfig) -> tuple[float, list]:
    start = time.perf_counter()
    pairs = project_pairs(docs, tok, cfg, cfg.block_size)
    return time.perf_counter() - start, pairs


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__.split("\n\n")[0])
    docs = stdlib_repositories(cfg.packages)
    chars = sum(len(doc.text) for doc in docs)
    tok = CodeTokenizer.train([doc.text for doc in docs], min_freq=5)
    workers = cfg.workers or process.usable_cores()
    print(f"corpus: {cfg.packages} standard-library packages, {len(docs)} files, "
          f"{chars / 1e6:.1f} M characters; vocabulary {tok.vocab_size}; block "
          f"{cfg.block_size}, {cfg.lines_per_file} lines a file, bm25")
    rows = []
    for label, count in (("one process", 1), (f"{workers} workers", workers)):
        data_cfg = DataConfig(task="project", block_size=cfg.block_size, num_workers=count,
                              lines_per_file=cfg.lines_per_file, project_composer="bm25")
        seconds, pairs = timed_build(docs, tok, data_cfg)
        rows.append((label, seconds, pairs))
    assert rows[1][2] == rows[0][2], "the workers' examples differ from one process's"
    print(f"examples: {len(rows[0][2])}, the same on both")
    print("| build | seconds | M characters / s | speed / one process |")
    print("| --- | --- | --- | --- |")
    for label, seconds, _ in rows:
        print(f"| {label} | {seconds:.1f} | {chars / seconds / 1e6:.2f} | "
              f"{rows[0][1] / seconds:.2f}x |")


if __name__ == "__main__":
    main()
