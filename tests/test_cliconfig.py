"""cliconfig: the one implementation of 'flags mirror a config dataclass'."""

import argparse
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import cliconfig


@dataclass
class Demo:
    # optimisation
    lr: float = 1e-3  # peak rate: 100% at the end of warmup
    steps: int = 10  # optimizer steps; a step is
    #   one update
    name: str | None = None  # runs/<name>; default: a timestamp
    # switches: the second section
    fast: bool = False
    targets: list[str] = field(default_factory=lambda: ["q"])
    ks: list[int] = field(default_factory=lambda: [1])
    options: dict = field(default_factory=dict)
    mode: str = "a"
    tag: str = "x"  # a plain str: "none" is text here
    limit: int | None = 5  # None: no limit
    share: float | None = None
    kind: str | None = None
    paths: list[str] | None = None
    extra: dict | None = None


CHOICES = {"mode": ("a", "b"), "kind": ("x", "y")}


def _parse(argv, tmp_path=None):
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    parser.add_argument("--config")
    cliconfig.add_config_flags(parser, Demo, CHOICES)
    return cliconfig.resolve_config(Demo, vars(parser.parse_args(argv)), "train", choices=CHOICES)


def test_flags_mirror_fields_and_lists_take_both_forms():
    cfg = _parse(["--lr", "0.5", "--fast", "--targets", "q_proj,k_proj", "v_proj",
                  "--ks", "1,10", "--options", '{"a": 1}', "--name", "x"])
    assert cfg == Demo(lr=0.5, fast=True, targets=["q_proj", "k_proj", "v_proj"], ks=[1, 10],
                       options={"a": 1}, name="x")
    assert _parse([]) == Demo()


def test_file_then_flags_with_recipe_sections(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"_seed": "doc", "train": {"steps": 3, "lr": 2, "_why": "x"},
                                  "eval": {"anything": 1}}))
    cfg = _parse(["--config", str(recipe), "--lr", "0.25"])
    assert (cfg.steps, cfg.lr) == (3, 0.25) and isinstance(_parse(["--config", str(recipe)]).lr,
                                                           float)


@pytest.mark.parametrize(("content", "message"), [
    ({"stpes": 1}, r"c\.json: unknown key 'stpes'; did you mean 'steps'\?$"),
    ({"velocity": 1}, r"c\.json: unknown key 'velocity'; Demo keys are: extra, fast, "),
    ({"model_type": "llama", "vocab_size": 8},
     r"c\.json: a model's config\.json \(model_type 'llama'\), not a Demo file$"),
    ({"train": {"steps": "3"}}, r"c\.json \(train section\): key 'steps' must be an integer"),
    ({"steps": True}, r"key 'steps' must be an integer"),
    ({"fast": 1}, r"key 'fast' must be true/false, got 1"),
    ({"train": {"fast": 0}}, r"\(train section\): key 'fast' must be true/false, got 0"),
    ({"ks": [1, "2"]}, r"key 'ks' must be a list of integers"),
    ({"mode": "c"}, r"key 'mode' must be one of \('a', 'b'\)"),
    ({"fast": None}, r"key 'fast' must not be null"),
    ({"lr": True}, r"key 'lr' must be a number, got True"),
    ({"eval": {}}, r"c\.json: a recipe without a 'train' section"),
    ({"train": [1]}, r"section must be a JSON object"),
])
def test_errors_name_the_file_and_the_key(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(path)])


def test_unreadable_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="missing.json: config file not found"):
        _parse(["--config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "lr": 1,\n  oops\n}')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 3, column 3"):
        _parse(["--config", str(bad)])
    for content, kind in ((b"[1]", "an array"), (b"null", "null"), (b"3", "a number")):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"bad.json: the config file must be one JSON object, "
                                             f"not {kind}"):
            _parse(["--config", str(bad)])
    bad.write_bytes(b'{"lr": "\xff"}')
    with pytest.raises(ValueError, match="bad.json: cannot read the config file: .*utf-8"):
        _parse(["--config", str(bad)])


def test_a_recipe_shaped_config_refuses_unknown_top_level_keys(tmp_path):
    """A key beside a recipe's sections was silently ignored by --config (recipes.py refused it)."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"_note": "doc", "train": {"steps": 3}, "eval": {}, "lr": 5}))
    with pytest.raises(ValueError, match=r"r\.json: unknown top-level key\(s\) \['lr'\]; a "
                                         r"recipe has 'train', 'eval' and '_'-prefixed notes"):
        _parse(["--config", str(recipe)])


def test_a_key_given_twice_is_refused_naming_the_key_and_file(tmp_path):
    """json keeps the last of a repeated key: a copy-pasted key's first value was silently lost."""
    config = tmp_path / "c.json"
    for text in ('{"lr": 1e-3, "steps": 2, "lr": 2e-3}', '{"options": {"a": 1, "a": 2}}'):
        config.write_text(text)
        key = "lr" if "lr" in text else "a"
        with pytest.raises(ValueError, match=rf"c\.json: key '{key}' is given twice"):
            _parse(["--config", str(config)])
    # another tool's file (an HF config.json) loads as transformers loads it: the last wins
    assert cliconfig.read_json_object(config, "model config") == {"options": {"a": 2}}


def test_a_config_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Windows editors save UTF-8 with a BOM, which json refuses ("Unexpected UTF-8 BOM")."""
    config = tmp_path / "c.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"lr": 0.5}).encode())
    assert _parse(["--config", str(config)]).lr == 0.5


def test_bad_flag_values_exit_2(capsys):
    for argv in (["--ks", "1,x"], ["--options", "[1]"], ["--steps", "1.5"], ["--mode", "z"]):
        with pytest.raises(SystemExit) as exit_info:
            _parse(argv)
        assert exit_info.value.code == 2


@pytest.mark.parametrize("word", ["none", "None", "NULL"])
def test_optional_fields_take_none_on_the_command_line(word):
    """A field documented as "None: no limit" must be settable to None from the command line."""
    cfg = _parse(["--limit", word, "--share", word, "--kind", word, "--paths", word,
                  "--extra", word, "--name", word, "--tag", word])
    assert (cfg.limit, cfg.share, cfg.kind, cfg.paths, cfg.extra, cfg.name) == (None,) * 6
    assert cfg.tag == word  # not Optional: the word is the value


def test_optional_fields_still_take_values_and_refuse_bad_ones(capsys):
    cfg = _parse(["--limit", "3", "--share", "0.5", "--kind", "y", "--paths", "none,b",
                  "--extra", '{"a": 1}'])
    assert (cfg.limit, cfg.share, cfg.kind, cfg.paths, cfg.extra) == (3, 0.5, "y", ["none", "b"],
                                                                       {"a": 1})
    for argv in (["--limit", "x"], ["--kind", "z"], ["--mode", "none"], ["--steps", "none"]):
        with pytest.raises(SystemExit) as exit_info:
            _parse(argv)
        assert exit_info.value.code == 2
    assert "invalid int value: 'none'" in capsys.readouterr().err


def test_help_says_which_flags_take_none():
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    text = " ".join(cliconfig.add_config_flags(parser, Demo, CHOICES).format_help().split())
    assert "--limit LIMIT None: no limit (default: 5; 'none' for None)" in text
    assert "--kind {x,y,none} default: None; 'none' for None" in text
    assert "--tag TAG a plain str: \"none\" is text here (default: 'x') " in text


def test_trainingmanager_eval_examples_none_is_the_whole_split():
    import trainingmanager

    assert trainingmanager.parse_config([]).eval_examples == 80
    assert trainingmanager.parse_config(["--eval-examples", "none"]).eval_examples is None


def test_help_comes_from_the_field_comments_grouped_by_section():
    """A field's trailing comment (continued on "#   " lines) is its --help text, with its
    default unless it states one; other comment lines title groups; '%' is printed as is."""
    helps, sections = cliconfig.field_docs(Demo)
    assert helps["steps"] == "optimizer steps; a step is one update"
    assert helps["fast"] == "" and sections["mode"] == "switches: the second section"
    assert sections["lr"] == sections["name"] == "optimisation"
    assert sections["fast"] == "switches: the second section"
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    text = " ".join(cliconfig.add_config_flags(parser, Demo, CHOICES).format_help().split())
    assert "optimisation: --lr LR peak rate: 100% at the end of warmup (default: 0.001)" in text
    assert ("--name NAME runs/<name>; default: a timestamp ('none' for None) switches: the "
            "second section: "
            "--fast, --no-fast default: False") in text


def test_every_flag_of_the_scripts_explains_itself():
    import hyperparam_tune
    import trainingmanager
    from dataset import DataConfig
    from eval import EvalConfig
    from recipes import RecipeOptions
    from scraping import GitHubConfig, LocalConfig

    for cls in (trainingmanager.TrainConfig, EvalConfig, hyperparam_tune.TuneConfig, DataConfig,
                RecipeOptions, GitHubConfig, LocalConfig):
        helps, _ = cliconfig.field_docs(cls)
        assert not [f for f in cls.__dataclass_fields__ if not helps.get(f)], cls.__name__


@dataclass
class Operands:
    files: list[str]  # input files
    out: str = field(metadata={"help": "output file"})
    overrides: list[str] = field(default_factory=list, metadata={"repeat": True,
                                                                 "metavar": "KEY=VALUE"})
    mode: str = field(default="a", metadata={"help": "how", "choices": ("a", "b")})


def test_operands_required_flags_and_repeated_flags():
    """recipes.py (positional recipe, repeatable --set) and python -m scraping (positional
    sources, required --out, help and choices in field metadata) each had their own copy of
    this function; they now use it."""
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    cliconfig.add_config_flags(parser, Operands, positional=("files",))
    args = parser.parse_args(["a,b.py", "c.py", "--out", "o", "--overrides", 'k=["x","y"]',
                              "--overrides", "j=1"])
    assert Operands(**vars(args)) == Operands(["a,b.py", "c.py"], "o", ['k=["x","y"]', "j=1"])
    assert Operands(**vars(parser.parse_args(["f", "--out", "o"]))).overrides == []
    text = " ".join(parser.format_help().split())
    assert "files input files" in text and "--out OUT output file --overrides KEY=VALUE" in text
    assert "--mode {a,b} how (default: 'a')" in text
    for argv in (["f"], ["--out", "o"], ["f", "--out", "o", "--mode", "c"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_is_an_interrupt_with_its_own_exit_code(name, code, capsys):
    """So is SIGHUP, a dropped SSH session's or closed terminal's (capsys: a hangup would point
    a terminal running pytest -s at /dev/null)."""
    import os
    import signal
    import time

    sig = signal.Signals[name]
    inherited = signal.signal(sig, signal.SIG_DFL)  # pytest under nohup ignores SIGHUP
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            with cliconfig.interrupt_on_sigterm():
                os.kill(os.getpid(), sig)
                time.sleep(5)  # not reached: the handler raises first
        assert signal.getsignal(sig) is signal.SIG_DFL  # put back
    finally:
        signal.signal(sig, inherited)
    assert cliconfig.interrupted_exit_code(stopped.value) == code
    assert cliconfig.stop_signal(stopped.value) == sig
    assert cliconfig.interrupted_exit_code(KeyboardInterrupt()) == 130  # Ctrl-C


def test_a_hangup_ignored_by_nohup_stays_ignored_under_interrupt_on_sigterm():
    import os
    import signal

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with cliconfig.interrupt_on_sigterm():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # nothing happens
        with cliconfig.stops_deferred():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)


def test_a_hangup_points_a_terminal_at_dev_null_and_leaves_files_alone(tmp_path, monkeypatch):
    """A hung-up terminal fails every write (EIO), and os.isatty says False of it: the next
    print after a hangup ended a run before its checkpoint. Other output is left as it is."""
    import os
    import signal

    hung_up_side, hung_up = os.openpty()
    live_side, live = os.openpty()
    stdout, stderr = os.fdopen(hung_up, "w"), os.fdopen(live, "w")
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    os.close(hung_up_side)  # the terminal's other end goes away: the kernel hangs this one up
    with pytest.raises(OSError):
        os.write(hung_up, b"x")
    null = os.stat(os.devnull).st_rdev
    cliconfig.leave_terminal_on_hangup(signal.SIGTERM)  # no hangup: left as it is
    assert os.fstat(live).st_rdev != null and os.isatty(live)
    cliconfig.leave_terminal_on_hangup(signal.SIGHUP)
    assert os.fstat(hung_up).st_rdev == null and os.fstat(live).st_rdev == null
    print("the stop's message", file=stdout, flush=True)  # goes nowhere, and raises nothing
    log = open(tmp_path / "log", "w")  # noqa: SIM115 (closed below)
    monkeypatch.setattr("sys.stdout", log)
    cliconfig.leave_terminal_on_hangup(signal.SIGHUP)
    assert os.path.sameopenfile(log.fileno(), os.open(tmp_path / "log", os.O_RDONLY))
    for f in (stdout, stderr, log):
        f.close()
    os.close(live_side)


def test_a_hangup_leaves_a_pipe_whose_reader_it_ended_and_keeps_a_live_one(monkeypatch):
    """``cmd 2>&1 | tee log`` over SSH: the hangup ends tee with the run, and every later write
    to the pipe failed (BrokenPipeError: the progress bar's next refresh), so the stop died
    before its checkpoint, exit 1. A pipe whose reader lives on (a supervisor's) keeps its
    output."""
    import os
    import signal

    gone_r, gone_w = os.pipe()
    live_r, live_w = os.pipe()
    stdout, stderr = os.fdopen(gone_w, "w"), os.fdopen(live_w, "w")
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stderr", stderr)
    os.close(gone_r)  # tee, ended by the same hangup
    cliconfig.leave_terminal_on_hangup(signal.SIGHUP)
    null = os.stat(os.devnull).st_rdev
    assert os.fstat(gone_w).st_rdev == null
    print("the stop's message", file=stdout, flush=True)  # goes nowhere, and raises nothing
    print("still read", file=stderr, flush=True)
    assert os.read(live_r, 100) == b"still read\n"
    for f in (stdout, stderr):
        f.close()
    os.close(live_r)


def test_each_stop_handler_leaves_a_hung_up_terminal_before_its_stop(monkeypatch):
    """interrupt_on_sigterm, stops_deferred and the start-up guard each take a hangup: each points
    a hung-up stdout at /dev/null at once, before the stop's message or save writes to it."""
    import os
    import signal
    import time

    null = os.stat(os.devnull).st_rdev

    def hung_up_stdout():
        side, fd = os.openpty()
        stream = os.fdopen(fd, "w")
        monkeypatch.setattr("sys.stdout", stream)
        os.close(side)  # the terminal's other end goes away
        return stream

    before = {sig: signal.getsignal(sig) for sig in cliconfig.STOP_SIGNALS}
    streams = []
    try:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # pytest under nohup: not ignored here
        streams.append(hung_up_stdout())
        with pytest.raises(KeyboardInterrupt, match="SIGHUP"):
            with cliconfig.interrupt_on_sigterm():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(5)  # not reached: the handler raises first
        assert os.fstat(streams[-1].fileno()).st_rdev == null
        taken = []
        signal.signal(signal.SIGHUP, lambda signum, frame: taken.append(signum))
        streams.append(hung_up_stdout())
        with cliconfig.stops_deferred():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)  # the handler has run by now
            assert os.fstat(streams[-1].fileno()).st_rdev == null and taken == []
        assert taken == [signal.SIGHUP]  # landed on leaving
        streams.append(hung_up_stdout())
        monkeypatch.setattr(os, "_exit", _raise_system_exit)
        with pytest.raises(SystemExit) as stopped:
            cliconfig._stopped_while_starting(True, signal.SIGHUP, None)
        assert stopped.value.code == 129 and os.fstat(streams[-1].fileno()).st_rdev == null
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
        for stream in streams:
            stream.close()


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_forked_worker_ends_on_sigterm_without_a_traceback(capfd, name):
    # multiprocessing ends a fork pool's workers with SIGTERM: a worker must die of it, not raise
    # the parent's KeyboardInterrupt (a traceback per worker). A hangup's SIGHUP: dies of that.
    import multiprocessing
    import os
    import signal
    import time

    sig = signal.Signals[name]

    def worker():
        os.kill(os.getpid(), sig)
        time.sleep(5)

    inherited = signal.signal(sig, signal.SIG_DFL)  # pytest under nohup ignores SIGHUP
    try:
        with cliconfig.interrupt_on_sigterm():
            child = multiprocessing.get_context("fork").Process(target=worker)
            child.start()
            child.join()
    finally:
        signal.signal(sig, inherited)
    assert child.exitcode == -sig
    assert "Traceback" not in capfd.readouterr().err


def test_only_dead_processes_of_this_machine_and_pid_namespace_are_dead_owners():
    import os
    import re
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    pattern = re.compile(cliconfig.OWNER_PATTERN)
    tag = cliconfig.owner_tag()
    pid, host, ns, _ = tag.split("@")
    assert int(pid) == os.getpid() and host == socket.gethostname()

    def dead_owner(name: str) -> bool:
        return cliconfig.owner_is_dead(pattern.fullmatch(name))

    assert dead_owner(f"{dead}@{host}@{ns}@")
    assert not dead_owner(tag)  # this process
    assert not dead_owner(f"{dead}@other-{host}@{ns}@")  # another machine's
    assert not dead_owner(f"{dead}@{host}@{ns}9@")  # a container's: its PIDs are not ours


def test_write_atomic_removes_what_killed_writers_left_never_a_live_writers_temp(tmp_path):
    # SIGKILL runs no cleanup: a writer killed mid-write left `.NAME.tmp-PID` for good. Temp names
    # now carry the owner tag, and the next write of the file removes dead owners' temps only.
    import multiprocessing
    import os
    import signal

    target = tmp_path / "results.json"

    def killed_writer():
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # written, not yet renamed
        cliconfig.write_atomic(target, "half")

    child = multiprocessing.get_context("fork").Process(target=killed_writer)
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    [left] = tmp_path.iterdir()
    assert left.name.startswith(f".results.json.tmp-{child.pid}@")
    _, host, ns, _ = cliconfig.owner_tag().split("@")
    live = tmp_path / f".results.json.tmp-{os.getppid()}@{host}@{ns}@"  # this test's parent's
    live.write_text("another worker is writing")
    cliconfig.write_atomic(target, "whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "results.json"]
    assert target.read_text() == "whole"


def test_write_atomic_files_replace_none_of_a_set_when_one_write_fails(tmp_path):
    """Files that belong together (weights and their config) are all written before the first is
    renamed: a full disk on the last leaves every earlier file as it was, and no temp behind.
    Content may be a function that streams into the file (weights too large for memory)."""
    import errno

    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    weights.write_bytes(b"old weights")
    config.write_text("old config")

    def disk_full(f) -> None:
        f.write(b"half a config")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        cliconfig.write_atomic_files({weights: lambda f: f.write(b"new weights"),
                                      config: disk_full})
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(config))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (weights.read_bytes(), config.read_text()) == (b"old weights", "old config")
    cliconfig.write_atomic_files({weights: lambda f: f.write(b"new weights"),
                                  config: "new config"})
    assert (weights.read_bytes(), config.read_text()) == (b"new weights", "new config")


def test_write_dir_atomically_replaces_or_lets_the_first_publisher_win(tmp_path):
    """One home for directory publishing: trainingmanager replaces its checkpoints, best/ and
    export/; a cache entry (dataset, the tokenizer cache) is published once, and a concurrent
    builder's copy of the same key is discarded."""
    target = tmp_path / "entry"
    assert cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("1"))
    assert cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("2"))
    assert (target / "a").read_text() == "2"

    def raced(d: Path) -> None:
        (d / "a").write_text("loser")
        cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("winner"))

    assert not cliconfig.write_dir_atomically(target, raced, replace=False)
    assert (target / "a").read_text() == "winner"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
    fresh = tmp_path / "deeper" / "fresh"
    assert cliconfig.write_dir_atomically(fresh, lambda d: (d / "a").write_text("1"),
                                          replace=False)
    assert (fresh / "a").read_text() == "1"


def test_replacing_a_directory_whose_new_copy_fails_to_land_puts_the_old_one_back(tmp_path,
                                                                                 monkeypatch):
    """The old copy is moved aside, then the new one's rename fails (an I/O error, a Ctrl-C):
    the old copy is back under its name and nothing else is left beside it."""
    import errno
    import os

    target = tmp_path / "entry"
    cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("old"))
    rename = os.rename

    def failing(src, dst):
        if ".entry.tmp-" in Path(src).name:  # the new copy's rename, after the move aside
            raise OSError(errno.EIO, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    for _ in range(2):  # the second sees a clean directory: nothing was left to settle
        with pytest.raises(OSError, match="Input/output error"):
            cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("new"))
        assert (target / "a").read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_recover_partial_writes_settles_dead_owners_only(tmp_path):
    """A dead writer's temp is removed and the directory it had moved aside put back when its
    replacement never landed (else removed); a live writer's names, and another machine's, are
    left, unless every owner is known to be gone (under a lock all writers hold)."""
    import os
    import socket
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)
    _, host, ns, _ = cliconfig.owner_tag().split("@")
    assert host == socket.gethostname()
    dead_tag, live_tag = f"{dead}@{host}@{ns}@ab12", f"{os.getppid()}@{host}@{ns}@cd34"
    names = {
        f".lost.old-{dead_tag}": "put back",  # killed between its two renames
        f".landed.old-{dead_tag}": "removed",  # killed after the new copy landed
        "landed": "new",
        f".landed.tmp-{dead_tag}": "removed",
        f".landed.tmp-{live_tag}": "kept",
        f".landed.tmp-{dead}@other-{host}@{ns}@": "kept",
    }
    for name, text in names.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "a").write_text(text)
    (tmp_path / f".f.json.tmp-{dead_tag}").write_text("half")
    cliconfig.recover_partial_writes(tmp_path)
    left = {p.name: (p / "a").read_text() for p in tmp_path.iterdir()}
    assert left == {"lost": "put back", "landed": "new", f".landed.tmp-{live_tag}": "kept",
                    f".landed.tmp-{dead}@other-{host}@{ns}@": "kept"}
    cliconfig.recover_partial_writes(tmp_path, every_owner_gone=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landed", "lost"]


def test_write_dir_atomically_syncs_the_tree_before_the_rename(tmp_path, monkeypatch):
    """Every file and directory of the new copy (nested ones too) reaches the disk before its
    name does, and the rename itself after (its parent directory)."""
    import os

    events: list[str] = []
    fsync, rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        Path(os.readlink(f"/proc/self/fd/{fd}")).name), fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), rename(a, b))[1])

    def build(d: Path) -> None:
        (d / "sub").mkdir()
        (d / "sub" / "b").write_text("b")
        (d / "a").write_text("a")

    cliconfig.write_dir_atomically(tmp_path / "out" / "entry", build)
    tmp = next(e for e in events if e.startswith(".entry.tmp-"))
    assert sorted(events[:4]) == sorted(["a", "b", "sub", tmp]) and events[3] == tmp
    assert events[4:] == ["rename", "out"]


def test_list_flags_skip_empty_items_and_take_none_as_text_when_not_optional():
    """``--targets q_proj,`` (a trailing comma) and ``--ks 1,,2`` give no empty item (an int
    list would fail on ''), and a list field that is not Optional keeps "none" as an item."""
    cfg = _parse(["--targets", "q_proj,", ",v_proj", "--ks", "1,,2"])
    assert (cfg.targets, cfg.ks) == (["q_proj", "v_proj"], [1, 2])
    assert _parse(["--targets", "none"]).targets == ["none"]


def test_an_owner_another_user_runs_is_alive(monkeypatch):
    """os.kill(pid, 0) on another user's live process raises PermissionError: its temp files
    must be kept, not removed as a dead owner's."""
    import os
    import re

    def not_permitted(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", not_permitted)
    match = re.fullmatch(cliconfig.OWNER_PATTERN, "1@" + cliconfig.owner_tag().split("@", 1)[1])
    assert match and not cliconfig.owner_is_dead(match)


def test_remove_dead_owners_removes_a_dead_owners_directories_and_files_only(tmp_path):
    """What a killed process left under its owner tag goes, directories too (a killed
    scraper's clone), through ``remove_dir`` when given; a live owner's entry stays."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    _, host, ns, _ = cliconfig.owner_tag().split("@")
    dead_dir = tmp_path / f"clone-{dead}@{host}@{ns}@a"
    live_dir = tmp_path / f"clone-{os.getpid()}@{host}@{ns}@b"
    for d in (dead_dir, live_dir):
        d.mkdir()
        (d / "f.py").write_text("x")
    (tmp_path / f"clone-{dead}@{host}@{ns}@c.txt").write_text("half")
    other = tmp_path / f"other-{dead}@{host}@{ns}@d"
    other.mkdir()
    cliconfig.remove_dead_owners(tmp_path, "clone-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live_dir.name, other.name])
    removed = []
    cliconfig.remove_dead_owners(tmp_path, "other-", remove_dir=removed.append)
    assert removed == [other]


def test_write_atomic_files_renames_in_the_mappings_order(tmp_path, monkeypatch):
    """The renames go in the mapping's order (the config after the weights it describes), so
    a kill between two renames leaves new weights under an old config, never the reverse."""
    import os

    landed: list[str] = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (landed.append(Path(b).name), replace(a, b))[1])
    files = {tmp_path / "z.safetensors": b"w", tmp_path / "a.json": "{}", tmp_path / "m": "m"}
    cliconfig.write_atomic_files(files)
    assert landed == ["z.safetensors", "a.json", "m"]


def test_replacing_a_directory_syncs_its_parent_after_the_rename(tmp_path, monkeypatch):
    """Replacing an existing directory: the new copy's rename reaches the disk (its parent
    directory is fsynced) before the old copy is removed."""
    import os

    target = tmp_path / "out" / "entry"
    cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("1"))
    events: list[str] = []
    fsync, rename = os.fsync, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(
        Path(os.readlink(f"/proc/self/fd/{fd}")).name), fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append("rename"), rename(a, b))[1])
    cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("2"))
    assert events[-3:] == ["rename", "rename", "out"] and (target / "a").read_text() == "2"


def test_write_dir_atomically_publishes_a_dangling_symlink_as_a_link(tmp_path):
    """Links in the new copy are published as they are, not followed (a dangling one, which
    an fsync through it could not open, included)."""
    import os

    def build(d: Path) -> None:
        (d / "a").write_text("a")
        os.symlink("a", d / "to-a")
        os.symlink("missing", d / "dangling")

    target = tmp_path / "entry"
    assert cliconfig.write_dir_atomically(target, build)
    assert os.readlink(target / "dangling") == "missing" and (target / "to-a").read_text() == "a"


def _raise_system_exit(code: int):
    """``os._exit`` for a test calling the start-up guard's handler in pytest's own process."""
    raise SystemExit(code)


def test_start_up_stops_keep_an_ignored_signal_and_run_main_puts_the_handlers_back(monkeypatch):
    """A signal the parent ignores (``cmd &``) stays ignored through start-up; a Ctrl-C while
    the imports load exits 130; main runs under the handlers the process started with."""
    import os
    import signal

    before = {sig: signal.getsignal(sig) for sig in cliconfig.STOP_SIGNALS}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup's
        cliconfig.quiet_start_up_stops(quiet=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        monkeypatch.setattr(os, "_exit", _raise_system_exit)
        with pytest.raises(SystemExit) as stopped:
            signal.getsignal(signal.SIGTERM)(signal.SIGINT, None)
        assert stopped.value.code == 130
        seen = cliconfig.run_main(lambda: (signal.getsignal(signal.SIGINT),
                                           signal.getsignal(signal.SIGTERM),
                                           signal.getsignal(signal.SIGHUP)))
        assert seen == (signal.SIG_IGN, signal.SIG_DFL, signal.SIG_IGN)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_write_dir_atomically_replaces_a_dangling_symlink_at_the_target(tmp_path):
    """A target that is a link to nothing (a removed cache, say) is replaced by the new
    directory, not renamed onto (which fails: a directory cannot replace a non-directory)."""
    import os

    target = tmp_path / "entry"
    os.symlink("gone", target)
    assert cliconfig.write_dir_atomically(target, lambda d: (d / "a").write_text("1"))
    assert not target.is_symlink() and (target / "a").read_text() == "1"
    assert os.listdir(tmp_path) == ["entry"]  # the link moved aside is gone too


@pytest.fixture
def ctrl_c_raises():
    """SIGINT at Python's own handler (KeyboardInterrupt) whatever pytest inherited: started with
    SIGINT ignored (`nohup pytest ... &` in a script), Python installs none, and a test's Ctrl-C
    is ignored, as cliconfig keeps an ignored signal ignored; both tests below then failed."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_stop_within_stops_deferred_lands_on_leaving_whole_work_done(ctrl_c_raises):
    """A signal to the process (its kernel may hand it to any thread) waits for the block's end,
    then lands as the handler in place before takes it: here Ctrl-C's KeyboardInterrupt."""
    import os
    import signal
    import time

    done = []
    with pytest.raises(KeyboardInterrupt):
        with cliconfig.stops_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler has run by now
            done.append("saved")
    assert done == ["saved"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_reader_that_stops_reading_ends_a_script_quietly():
    """`python tokenizer.py ... | head`: the closed pipe gave a BrokenPipeError traceback, and
    a second one when Python flushed stdout at exit; now exit 1 and nothing on stderr."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    script = ("import sys, cliconfig\n"
              "sys.exit(cliconfig.run_main(lambda: cliconfig.run_tool(\n"
              "    lambda: [print('x' * 100) for _ in range(10**6)])))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"x" * 100 + b"\n"
    proc.stdout.close()
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""


_SLOW_EXIT = """
import atexit, os, signal, sys, time
import cliconfig
def slow_exit():  # torch's exit handlers, say
    open(sys.argv[1], "w").close()
    time.sleep(60)
atexit.register(slow_exit)
stop = lambda: os.kill(os.getpid(), signal.SIGINT)
sys.exit(cliconfig.run_main(lambda: cliconfig.run_tool(stop)))
"""


def test_a_second_ctrl_c_while_the_script_exits_ends_it_without_a_traceback(tmp_path):
    """Ctrl-C twice: the first is told ("interrupted"), the second landed in an atexit handler
    and printed "Exception ignored in atexit callback" with a traceback. Now it ends the
    process at once, as SIGINT's default does."""
    import signal
    import sys

    from procs import popen, signal_when

    root = Path(__file__).resolve().parents[1]
    exiting = tmp_path / "exiting"
    proc = popen([sys.executable, "-c", _SLOW_EXIT, str(exiting)], cwd=root,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = signal_when(proc, exiting.exists, signal.SIGINT)
    assert err == "interrupted\n"
    assert proc.returncode == -signal.SIGINT


_SWALLOWING_IMPORT = """
import atexit, os, signal, sys
import cliconfig
cliconfig.quiet_start_up_stops()
atexit.register(lambda: print("exit handler ran"))
try:  # an extension's init that clears any error, as torch's of numpy does
    os.kill(os.getpid(), signal.SIGINT)
except BaseException:
    pass
sys.exit(cliconfig.run_main(lambda: print("main ran")))
"""


def test_a_stop_at_start_up_ends_the_script_even_where_the_import_swallows_errors():
    """A Ctrl-C while torch loads raised SystemExit into the import under way: torch's numpy
    init cleared it and the script ran on after "interrupted while starting" (1 in 4 Ctrl-Cs
    of `python eval.py`), or pybind11 aborted with a C++ dump. Now the process ends there."""
    import sys

    from procs import popen

    root = Path(__file__).resolve().parents[1]
    proc = popen([sys.executable, "-c", _SWALLOWING_IMPORT], cwd=root, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "interrupted while starting: nothing was "
                                           "written\n")


def test_a_ctrl_c_between_the_renames_of_a_set_lands_after_the_last(tmp_path, monkeypatch,
                                                                  ctrl_c_raises):
    """Ctrl-C (or SIGTERM under interrupt_on_sigterm) right after the weights' rename left them
    under the previous config: the set is renamed whole, then the stop lands."""
    import os
    import signal

    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    cliconfig.write_atomic_files({weights: b"old weights", config: "old config"})
    replace = os.replace

    def replace_then_ctrl_c(src, dst):
        replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        cliconfig.write_atomic_files({weights: b"new weights", config: "new config"})
    assert (weights.read_bytes(), config.read_text()) == (b"new weights", "new config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
