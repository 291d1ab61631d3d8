"""The GRPO reward against the exploit corpus: every exploit of data/exploits/ as a completion of
every problem of the benchmarks, scored through the reward path; then the canonical solutions.

    python bench/bench_rewards.py [--tasks passk,humaneval] [--workers 4] [--timeout-s 2.0]
        [--no-partial-credit]

Each exploit's line: how its runs ended (passed, failed, timeout, ...), how many earned the
full reward and how many are hacks (the trusted test fails, the same test in the candidate's
interpreter passes). The last line: ``exploits earning the full reward 0/N, canonical 164/164
(humaneval), 45/45 (passk); hack rate ...``. The reward is GRPO's default, the share of the
test's asserts that hold (``--no-partial-credit``: pass or fail; an exploit's wrong answer may
still hold an assert or two, as any wrong answer may), eval.py's ``run_check`` through
``codelm.training.rewards``; a task's problems are those eval.py reads (``--problems TASK=PATH``
as there: MBPP's and EvalPlus's need their datasets).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codelm.runtime import settings  # noqa: E402


@dataclass
class BenchConfig:
    tasks: str = "passk,humaneval"  # pass@k tasks, comma-separated (eval.py's names)
    problems: str = ""  # TASK=PATH entries, comma-separated, as eval.py's --problems
    workers: int = 4  # runs in flight at once (the sleeping exploit's runs wait, idle)
    timeout_s: float = 2.0  # each run's wall-clock limit
    partial_credit: bool = True  # the share of asserts that hold (GRPO's default), or pass/fail


def _ended(statuses: Counter) -> str:
    return " ".join(f"{status} {count}" for status, count in sorted(statuses.items()))


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__.split("\n\n")[0])
    from codelm.evaluation.config import EvalConfig
    from codelm.evaluation.tasks import passk, registry
    from codelm.training import rewards

    evaluation = EvalConfig(tasks=cfg.tasks.split(","), timeout_s=cfg.timeout_s,
                            problems=[entry for entry in cfg.problems.split(",") if entry])
    corpus = rewards.exploits()
    ended = {name: Counter() for name in corpus}
    hacked = {name: 0 for name in corpus}
    full_credit = {name: 0 for name in corpus}
    canonical = []
    start = time.perf_counter()
    for task, file in registry.problem_files(evaluation).items():
        problems = passk.load_problems(file, passk_task=registry.PASSK_TASKS[task])
        sandbox = passk.task_sandbox(evaluation, registry.PASSK_TASKS[task])
        jobs = [(problem, rewards.exploit_completion(problem, source))
                for source in corpus.values() for problem in problems]
        names = [name for name in corpus for _ in problems]
        scores = rewards.scores(jobs, passk.run_check, sandbox, cfg.workers, cfg.partial_credit)
        hacks = rewards.hacks(jobs, [score.reward for score in scores], passk.run_check, sandbox,
                              cfg.workers, [score.timed_out for score in scores])
        for name, score, hack in zip(names, scores, hacks):
            ended[name][score.status] += 1
            full_credit[name] += score.reward == 1.0
            hacked[name] += hack
        solutions = [(problem, problem["canonical_solution"]) for problem in problems]
        solved = rewards.scores(solutions, passk.run_check, sandbox, cfg.workers,
                                cfg.partial_credit)
        full = sum(score.reward == 1.0 for score in solved)
        canonical.append(f"{full}/{len(solved)} ({task})")
        print(f"{task}: {len(problems)} problems x {len(corpus)} exploits", flush=True)
    width = max(map(len, corpus))
    for name in corpus:
        print(f"{name:{width}}  {_ended(ended[name])}; full reward {full_credit[name]}; "
              f"hacks {hacked[name]}")
    total = sum(sum(statuses.values()) for statuses in ended.values())
    rewarded = sum(full_credit.values())
    hacks_total = sum(hacked.values())
    reward = "partial credit" if cfg.partial_credit else "pass/fail"
    print(f"exploits earning the full reward ({reward}) {rewarded}/{total}, canonical "
          f"{', '.join(canonical)}; hack rate "
          f"{hacks_total / total:.1%} ({hacks_total} of {total}); "
          f"{time.perf_counter() - start:.0f} s, {cfg.workers} workers")


if __name__ == "__main__":
    main()
