"""The repository keeps its promises to a newcomer: README commands, CI, pins."""

import argparse
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0].endswith("python trainingmanager.py")
    assert "requirements-dev.txt" in commands[1] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_torch_pinned_exactly():
    reqs = (ROOT / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0" in reqs


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a script built."""


def _script_parser(path: Path, monkeypatch) -> argparse.ArgumentParser:
    """The argparse parser a script's main() builds, without running it."""
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "path", [str(path.parent), *sys.path])  # as `python SCRIPT` has it
    monkeypatch.setattr(sys, "argv", [str(path)])
    with pytest.raises(_Parsed) as caught:
        runpy.run_path(str(path), run_name="__main__")
    return caught.value.args[0]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("bench_*.py")))
def test_bench_help_gives_every_flags_default(script, monkeypatch):
    """README: every script's --help gives each flag's meaning and default (an on/off switch
    that is off unless given needs none)."""
    parser = _script_parser(ROOT / "bench" / script, monkeypatch)
    for action in parser._actions:
        if (action.option_strings and action.help != argparse.SUPPRESS
                and not isinstance(action, (argparse._HelpAction, argparse._StoreTrueAction))):
            assert "default" in action.help, f"{script} {action.option_strings[0]}"


def test_bench_lora_refuses_a_width_its_heads_do_not_divide(capsys, monkeypatch):
    """--width 64 gave Llama no key/value head: a ZeroDivisionError deep in transformers."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts its folders first
    main = runpy.run_path(str(ROOT / "bench" / "bench_lora.py"))["main"]
    with pytest.raises(SystemExit) as stop:
        main(["--width", "64", "--steps", "1", "--families", "llama", "--skip-memory"])
    assert stop.value.code == 2
    assert "--width 64: must be a positive multiple of 128" in capsys.readouterr().err


def test_ground_floor_modules_import_nothing_of_the_project():
    """docs/contracts.md's import floors: cliconfig, tokenizer, architecture and scraping load
    no other project module but cliconfig, the utility under every floor (architecture calls
    pretrained lazily, inside from_pretrained)."""
    project = sorted(p.stem for p in ROOT.glob("*.py")) + ["scraping"]
    code = ("import sys; import {0}; "
            "print(' '.join(m for m in {1!r} if m in sys.modules and m not in ('{0}', 'cliconfig')))")
    for module in ("cliconfig", "tokenizer", "architecture", "scraping"):
        loaded = subprocess.run([sys.executable, "-c", code.format(module, project)], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
        assert loaded == [], f"import {module} loads {loaded}"


def test_docs_point_only_at_what_the_repository_holds():
    """A `runs/NAME` the README or docs name is a directory a recipe really writes, and no doc
    sends the reader outside the repository (../shared/ is not shipped)."""
    names = {json.loads(p.read_text())["train"]["name"] for p in (ROOT / "configs").glob("*.json")}
    for doc in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        text = doc.read_text()
        for name in re.findall(r"runs/([\w-]+)", text):
            assert name in names | {"smoke"}, f"{doc.name}: runs/{name}"
        assert "../shared" not in text, doc.name
