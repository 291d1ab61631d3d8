"""The sections of a GPU bench script (bench_gpu.py, bench_gpu_lora.py): ``--only``'s choice,
and a runner that reports one section's failure and still runs the others, so that one long
device run gives every figure it can."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from typing import Any


def chosen(parser: argparse.ArgumentParser, only: str, sections: tuple[str, ...]) -> tuple[str, ...]:
    """The sections ``--only`` names ("all" or a comma-separated list), checked against
    ``sections``; an unknown one is the parser's usage error."""
    picked = sections if only == "all" else tuple(only.split(","))
    unknown = [s for s in picked if s not in sections]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; expected "
                     f"{', '.join(sections)} or all")
    return picked


def run(sections: dict[str, Callable[[argparse.Namespace], Any]], only: tuple[str, ...],
        args: argparse.Namespace, default: Callable[[Any], Any]) -> int:
    """Runs each section of ``only`` on ``args``, prints their results as one JSON object
    (``default`` writes what JSON cannot) and the failed sections' names; the exit code: 1 if
    any failed, else 0."""
    results, failed = {}, []
    for name in only:
        try:  # one section's failure is reported; the others still run
            results[name] = sections[name](args)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
    print("\n" + json.dumps(results, default=default))
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
