"""``python -m scraping {github,local} ...``: flags mirror GitHubConfig and LocalConfig."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing

import cliconfig
from scraping.client import GitHubError
from scraping.github import SERVER_ERROR, GitHubConfig, scrape_github
from scraping.local import LocalConfig, collect_local

_POSITIONAL = {"sources"}


def _shown(default, switch: bool) -> str:
    """A default as --help gives it."""
    if switch:
        return "on" if default else "off"
    if default in (None, ""):
        return "none"
    return " ".join(map(str, default)) if isinstance(default, list) else str(default)


def _add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field, typed and documented from the field itself."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args and (typing.get_origin(hint) in (typing.Union,
                                                                         types.UnionType))
        if optional:
            hint = next(a for a in args if a is not type(None))
        required = (f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING)
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None if required else f.default)
        kwargs: dict = {"help": f.metadata.get("help", ""), "default": default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is list:
            kwargs.update(nargs="+" if required else "*", type=typing.get_args(hint)[0])
        else:
            kwargs["type"] = hint
        if f.name in _POSITIONAL:
            kwargs.pop("default")
            parser.add_argument(f.name, **kwargs)
            continue
        if required:
            kwargs["required"] = True
        if not required and "default" not in kwargs["help"]:  # else said in its own words
            kwargs["help"] += f" (default: {_shown(default, hint is bool)})"
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scraping",
        description="Collect source files into JSONL records {repo, path, sha, license, stars, "
                    "text}.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gh = sub.add_parser(
        "github", help="search GitHub and download matching files (resumable)",
        description="Search GitHub repositories and download matching files. Reads the token "
                    "from GITHUB_TOKEN. Re-running with the same flags resumes where a run "
                    "stopped; nothing is written twice.")
    _add_dataclass_args(gh, GitHubConfig)
    local = sub.add_parser(
        "local", help="collect files from local directories or git URLs",
        description="Collect files by extension from directories, or from git URLs cloned "
                    "shallowly into a temporary directory that is removed afterwards.")
    _add_dataclass_args(local, LocalConfig)
    parser.add_argument("-v", "--verbose", action="store_true", help="log every retry and wait")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    command, verbose = args.pop("command"), args.pop("verbose")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    try:
        with cliconfig.interrupt_on_sigterm():  # a kill ends it as Ctrl-C does: clones removed
            if command == "github":
                summary = scrape_github(GitHubConfig(**args))
            else:
                summary = collect_local(LocalConfig(**args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GitHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the output cannot be written: disk full, permissions, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print("interrupted; finished repos are saved, re-run to continue", file=sys.stderr)
        return cliconfig.interrupted_exit_code(stop)
    print(summary.format(), file=sys.stderr)
    print(f"wrote {args['out']}", file=sys.stderr)
    if summary.repos[SERVER_ERROR]:
        print(f"error: GitHub kept failing on {summary.repos[SERVER_ERROR]} repos, which are not "
              f"in {args['out']}; re-run the same command to retry them", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
