"""``python -m codelm.sandbox FILE [--timeout-s S] [--memory-mb MB] ...`` (installed:
``codelm-sandbox``): run one Python file in the sandbox, as pass@k runs generated code, and say
how it ended."""

from __future__ import annotations

if __name__ == "__main__":  # first, as in every script
    from codelm.runtime import process

    process.quiet_start_up_stops()

import argparse
import math
import sys
from pathlib import Path

from codelm.runtime import process, settings
from codelm.sandbox.runner import MIN_MEMORY_MB, SandboxConfig, run_python


def main(argv: list[str] | None = None) -> int:
    """Run one Python file in the sandbox: what a generated sample does, without risk."""
    parser = settings.ArgumentParser(
        prog="python -m codelm.sandbox",
        description="Run a Python file in codelm's sandbox, as pass@k runs generated code: its "
        "own process and user, limits, no network, writes confined to a temporary directory. "
        "Its output is printed, then how it ended; exit 0 if it passed, 1 if not.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("program", help="the Python file to run")
    settings.add_config_flags(parser, SandboxConfig)
    flags = vars(parser.parse_args(argv))
    program = flags.pop("program")

    def run() -> int:
        cfg = settings.config_from_dict(SandboxConfig, flags, "command line")
        for flag, ok, why in (
                ("timeout-s", 0 < cfg.timeout_s < math.inf, "a positive number of seconds"),
                ("memory-mb", cfg.memory_mb >= MIN_MEMORY_MB,
                 f">= {MIN_MEMORY_MB}: a Python interpreter needs that much"),
                ("file-mb", cfg.file_mb >= 0, ">= 0"),
                ("max-output-chars", cfg.max_output_chars >= 0, ">= 0"),
                ("disk-mb", cfg.disk_mb >= 0, ">= 0"), ("max-files", cfg.max_files >= 0, ">= 0")):
            if not ok:
                value = getattr(cfg, flag.replace("-", "_"))
                raise ValueError(f"--{flag} {value}: must be {why}")
        try:
            source = Path(program).read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{program}: not UTF-8 text ({err.reason})") from None
        result = run_python(source, cfg)
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        layers = [name for name, on in (("landlock", result.landlock),
                                        ("seccomp", result.seccomp)) if on]
        if not result.landlock:
            layers.append("reads NOT confined")
        print(f"sandbox: {result.status} (exit code {result.returncode}) in "
              f"{result.duration_s:.2f} s{'' if result.completed else ', not run to its end'}; "
              f"{', '.join(layers) or 'rlimits only'}", file=sys.stderr)
        return 0 if result.passed else 1

    return process.run_tool(run)


if __name__ == "__main__":
    sys.exit(process.run_main(main))
