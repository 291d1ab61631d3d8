"""``python -m scraping {github,local} ...``: flags mirror GitHubConfig and LocalConfig."""

from __future__ import annotations

if __name__ == "__main__":  # first, as in every script: the imports below take a while
    from codelm.runtime import process

    process.quiet_start_up_stops()

import argparse
import logging
import sys

from codelm.runtime import process, settings
from scraping.client import GitHubError
from scraping.github import SERVER_ERROR, UNAVAILABLE, GitHubConfig, scrape_github
from scraping.local import LocalConfig, collect_local


def build_parser() -> argparse.ArgumentParser:
    """Flags from the configs' fields; what the user did not type is left out (its default holds)."""
    parser = settings.ArgumentParser(
        prog="python -m scraping",
        description="Collect source files into JSONL records {repo, path, sha, license, stars, "
                    "text}.")
    sub = parser.add_subparsers(dest="command", required=True)
    gh = sub.add_parser(
        "github", help="search GitHub and download matching files (resumable)",
        argument_default=argparse.SUPPRESS,
        description="Search GitHub repositories and download matching files. Reads the token "
                    "from GITHUB_TOKEN. Re-running with the same flags resumes where a run "
                    "stopped; nothing is written twice.")
    settings.add_config_flags(gh, GitHubConfig)
    local = sub.add_parser(
        "local", help="collect files from local directories or git URLs",
        argument_default=argparse.SUPPRESS,
        description="Collect files by extension from directories, or from git URLs cloned "
                    "shallowly into a temporary directory that is removed afterwards.")
    settings.add_config_flags(local, LocalConfig, positional=("sources",))
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log search splits, tree walks and resume progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = vars(build_parser().parse_args(argv))
    except SystemExit as stop:  # --help, or a flag argparse refused (its message printed)
        return int(stop.code or 0)
    command, verbose = args.pop("command"), args.pop("verbose")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")

    def work() -> int:
        try:
            if command == "github":
                summary = scrape_github(GitHubConfig(**args))
            else:
                summary = collect_local(LocalConfig(**args))
        except GitHubError as exc:  # GitHub's failure, not the user's mistake (exit 2)
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(summary.format(), file=sys.stderr)
        kept = summary.files["kept"]
        skipped = sum(summary.files.values()) - kept
        done_before = summary.repos["already_done"]
        if not kept and done_before and done_before == sum(summary.repos.values()):
            print(f"{args['out']} unchanged: its {done_before} source(s) were collected into it "
                  "before (a new --out collects them again)", file=sys.stderr)
        else:
            print(f"wrote {args['out']}", file=sys.stderr)
        filters = "--extensions, --language" if command == "github" else "--extensions"
        if not kept and skipped:
            print(f"warning: no file kept ({skipped} skipped: reasons above); do the filters "
                  f"({filters}, size limits) match the code you want?", file=sys.stderr)
        elif not kept and summary.repos["collected"]:
            print("warning: no file found: the sources hold no files (empty directories?)",
                  file=sys.stderr)
        if unsaved := summary.repos[SERVER_ERROR] + summary.repos[UNAVAILABLE]:
            print(f"error: GitHub kept failing on {unsaved} repos, which are not in "
                  f"{args['out']}; re-run the same command to retry them",
                  file=sys.stderr)
            return 1
        return 0

    # A kill ends it as Ctrl-C does: clones removed, finished repos kept.
    return process.run_tool(work, "interrupted; finished repos are saved, re-run to continue")

if __name__ == "__main__":
    sys.exit(process.run_main(main))
