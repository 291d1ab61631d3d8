"""Project context composition: the time to compose one completion file's context from a large
repository within a token budget, after the one-time index, against Long Code Arena's way.

    python bench/bench_composers.py [--files 10000] [--budget 16384] [--completions 20]

A synthetic Python repository (``--files`` modules in nested packages, each importing a few
others and calling their functions) is indexed once (``RepositoryIndex``: paths, identifiers,
module names). Then, for ``--completions`` files taken out of it, each composer composes the
context of a prefix (the file's first half) within ``--budget`` tokens: ``cold`` with an empty
token cache (every file the context takes encoded then), ``warm`` with the cache the earlier
compositions left. The reference is LCA's path-distance composition: every file of the
repository joined as text in path-distance order, cropped to its last 60,000 characters and
tokenized (lca-baselines' preprocessor). Medians over the completion files; the ratio is the
reference's time over each composer's cold time.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codelm.data import composers  # noqa: E402
from codelm.runtime import settings  # noqa: E402
from tokenizer import CodeTokenizer  # noqa: E402

LCA_CONTEXT_CHARS = 60_000  # lca-baselines' PreprocessorBase context_len_char


@dataclass
class BenchConfig:
    files: int = 10_000  # modules of the synthetic repository
    budget: int = 16_384  # tokens of a composed prompt
    completions: int = 20  # completion files composed (each by every composer)
    seed: int = 0  # the synthetic repository and the completion files


def synthetic_repository(n: int, seed: int) -> dict[str, str]:
    """``n`` Python modules under pkg{a}/sub{b}/, each defining a class and functions named
    after it, importing three other modules and calling their functions (about 1.4 KB)."""
    rng = random.Random(seed)
    paths = [f"pkg{i % 23}/sub{i % 7}/mod{i}.py" for i in range(n)]
    files = {}
    for i, path in enumerate(paths):
        others = rng.sample(range(n), 3)
        imports = "\n".join(f"from {paths[j][:-3].replace('/', '.')} import func_{j}"
                            for j in others)
        calls = "\n".join(f"        total += func_{j}(value, self.scale)" for j in others)
        files[path] = f'''"""Module {i}: helpers for the {rng.choice(["io", "math", "web"])} layer."""
{imports}


class Widget{i}:
    """A widget that scales values."""

    def __init__(self, scale: int = {i % 9 + 1}):
        self.scale = scale
        self.cache = {{}}

    def compute(self, value: int) -> int:
        total = 0
{calls}
        self.cache[value] = total
        return total


def func_{i}(value: int, scale: int) -> int:
    """Scale ``value`` and add the module's number."""
    return value * scale + {i}


def make_widget_{i}() -> Widget{i}:
    return Widget{i}()
'''
    return files


def lca_reference(files: dict[str, str], path: str, prefix: str, tok) -> int:
    """LCA's path-distance context: every file joined, least near first, cropped to the last
    LCA_CONTEXT_CHARS characters, tokenized with the prefix; its token count."""
    order = sorted((p for p in files if p != path),
                   key=lambda p: composers.path_distance(path, p), reverse=True)
    text = "".join(f"{p}METASEP{files[p]}" for p in order) + f"{path}METASEP{prefix}"
    return len(tok.encode(text[-LCA_CONTEXT_CHARS:]))


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__.split("\n\n")[0])
    files = synthetic_repository(cfg.files, cfg.seed)
    tok = CodeTokenizer.train(list(files.values())[:300], min_freq=2)
    targets = random.Random(cfg.seed).sample(sorted(files), cfg.completions)
    start = time.perf_counter()
    index = composers.RepositoryIndex("synthetic", files, tok)
    index_s = time.perf_counter() - start
    chars = sum(map(len, files.values()))
    print(f"repository: {len(files)} files, {chars / 1e6:.1f} M characters; index built in "
          f"{index_s:.2f} s; budget {cfg.budget} tokens; {cfg.completions} completion files")
    times: dict[str, dict[str, list[float]]] = {}
    for name in [c for c in composers.COMPOSERS if c != "empty"]:  # empty: the prefix alone
        times[name] = {"cold": [], "warm": []}
        warm_cache: dict = {}
        for path in targets:
            text = files[path]
            prefix = text[: len(text) // 2]
            prefix_ids = tok.encode(prefix)
            for mode, cache in (("cold", {}), ("warm", warm_cache)):
                index.cache.ids = cache
                start = time.perf_counter()
                composed = composers.compose(index, name, path, prefix, prefix_ids, cfg.budget)
                times[name][mode].append(time.perf_counter() - start)
                assert len(composed.ids) <= cfg.budget
    reference = []
    for path in targets:
        start = time.perf_counter()
        lca_reference(files, path, files[path][: len(files[path]) // 2], tok)
        reference.append(time.perf_counter() - start)
    ref = statistics.median(reference)
    print("| composer | cold ms / file | warm ms / file | LCA reference / cold |")
    print("| --- | --- | --- | --- |")
    for name, modes in times.items():
        cold, warm = statistics.median(modes["cold"]), statistics.median(modes["warm"])
        print(f"| {name} | {1e3 * cold:.1f} | {1e3 * warm:.1f} | {ref / cold:.2f} |")
    print(f"| LCA reference (path distance, 60,000 characters tokenized) | {1e3 * ref:.1f} | "
          "- | 1.00 |")


if __name__ == "__main__":
    main()
