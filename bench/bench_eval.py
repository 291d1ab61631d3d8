"""eval.py's hand-written BLEU and its sandbox against their references, timed in one run.

    python bench/bench_eval.py [--pairs 2000] [--runs 20]

Each line: our time, the reference's time, and the ratio (ours / reference; < 1 is faster).
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sacrebleu  # noqa: E402

from codelm.evaluation import metrics as eval_metrics  # noqa: E402
from codelm.sandbox.runner import SandboxConfig, run_python  # noqa: E402


def _pairs(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Code-like lines from the stdlib, each paired with a lightly mutated copy."""
    from codelm.data.sources import stdlib_files

    rng = random.Random(seed)
    lines = [line.strip() for f in stdlib_files()[:200]
             for line in f.read_text(errors="replace").splitlines() if len(line.strip()) > 20]
    refs = rng.sample(lines, n)
    preds = []
    for ref in refs:
        chars = list(ref)
        for _ in range(rng.randint(0, 8)):
            chars[rng.randrange(len(chars))] = rng.choice("abc_() ")
        preds.append("".join(chars))
    return preds, refs


def _time(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000,
                        help="(hypothesis, reference) lines scored (default: 2000)")
    parser.add_argument("--runs", type=int, default=20,
                        help="sandboxed runs timed (default: 20)")
    args = parser.parse_args()
    preds, refs = _pairs(args.pairs)
    # chrF, ROUGE-L and edit similarity are the libraries' own: nothing to compare
    rows = [
        ("BLEU vs sacrebleu BLEU", lambda: eval_metrics.codexglue_bleu(preds, refs),
         lambda: sacrebleu.metrics.BLEU(tokenize="none", smooth_method="add-k")
         .corpus_score(preds, [refs])),
    ]
    print(f"{args.pairs} pairs")
    for name, ours, reference in rows:
        t_ours, t_ref = _time(ours), _time(reference)
        print(f"{name:<26} ours {t_ours * 1e3:8.1f} ms  reference {t_ref * 1e3:8.1f} ms  "
              f"ratio {t_ours / t_ref:5.2f}")

    config = SandboxConfig()
    t_sandbox = _time(lambda: [run_python("pass", config) for _ in range(args.runs)], repeat=1)
    t_bare = _time(lambda: [subprocess.run([sys.executable, "-c", "pass"], check=True)
                            for _ in range(args.runs)], repeat=1)
    print(f"{'sandboxed run vs python -c':<26} ours {t_sandbox / args.runs * 1e3:8.1f} ms  "
          f"reference {t_bare / args.runs * 1e3:8.1f} ms  ratio {t_sandbox / t_bare:5.2f}")


if __name__ == "__main__":
    main()
