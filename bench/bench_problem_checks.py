"""An evaluation's start on a pass@k task: its problems loaded with their sandbox checks (each
canonical solution and a do-nothing completion run against its test), the first time against
the next, when the checks are read back from the cache.

    python bench/bench_problem_checks.py [--task humaneval] [--workers 2] [--rounds 3]

Each round loads the task's problems into a fresh cache (the checks run) and again from it
(the checks read back), in one process; prints the median of each and the ratio (first / next;
above 1 is what the cache saves), after checking both loads find the same problems.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from codelm.runtime import settings  # noqa: E402

# The pass@k tasks whose problems ship with codelm's requirements (no hub download).
SHIPPED_TASKS = ("humaneval", "passk")


@dataclass
class BenchConfig:
    task: str = "humaneval"  # a pass@k task whose problems ship here
    workers: int = 2  # sandbox runs in flight at once, as eval.py's --workers
    rounds: int = 3  # first and next loads timed, each round in a fresh cache


def main(argv: list[str] | None = None) -> None:
    cfg = settings.parse_config_flags(BenchConfig, argv, __doc__.split("\n\n")[0],
                                      choices={"task": SHIPPED_TASKS})
    for name in ("workers", "rounds"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name} {getattr(cfg, name)}: give 1 or more")
    from codelm.evaluation.config import EvalConfig
    from codelm.evaluation.tasks import passk, registry

    module = registry.TASKS[cfg.task]
    passk_task = module.PASSK
    file = module.source()
    sandbox = passk.task_sandbox(EvalConfig(), passk_task)  # eval.py's defaults
    first, following = [], []
    for _ in range(cfg.rounds):
        with tempfile.TemporaryDirectory() as cache:
            os.environ["CODELM_CACHE"] = cache
            started = time.perf_counter()
            checked = passk.load_problems(file, sandbox, cfg.workers, passk_task=passk_task)
            first.append(time.perf_counter() - started)
            started = time.perf_counter()
            read_back = passk.load_problems(file, sandbox, cfg.workers, passk_task=passk_task)
            following.append(time.perf_counter() - started)
        if checked != read_back:
            raise SystemExit("the checks read back differ from those run")
    first_s, next_s = statistics.median(first), statistics.median(following)
    print(f"{cfg.task}: {len(checked)} problems, {cfg.workers} workers, {cfg.rounds} rounds")
    print(f"first load (checks run): {first_s:.2f} s; next (read back): {next_s:.3f} s; "
          f"ratio {first_s / next_s:.0f}x")


if __name__ == "__main__":
    main()
