"""settings: config dataclasses <-> flags and JSON files."""

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from codelm import trainconfig
from codelm.data.config import DataConfig
from codelm.runtime import settings
from codelm.training import plan

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_files_are_found_in_the_checkout():
    """In a checkout the bundled data/ and configs/ are the repository's own, wherever the
    module that finds them sits in the package."""
    assert settings.bundled("configs", "search_spaces") == ROOT / "configs" / "search_spaces"
    assert settings.bundled("data", "overfit").is_dir()


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
    settings.add_config_flags(parser, Demo, CHOICES)
    return settings.resolve_config(Demo, vars(parser.parse_args(argv)), "train", choices=CHOICES)


def test_flags_mirror_fields_and_lists_take_both_forms():
    """Every field has its flag: a bool takes --x and --no-x, a list takes commas or several
    values, a dict takes JSON; with no flags, the defaults."""
    cfg = _parse(["--lr", "0.5", "--fast", "--targets", "q_proj,k_proj", "v_proj",
                  "--ks", "1,10", "--options", '{"a": 1}', "--name", "x"])
    assert cfg == Demo(lr=0.5, fast=True, targets=["q_proj", "k_proj", "v_proj"], ks=[1, 10],
                       options={"a": 1}, name="x")
    assert _parse([]) == Demo()


@dataclass
class TriState:
    packing: bool | None = None  # None: where it pays


def test_an_optional_bool_flag_sets_true_false_or_back_to_its_default_over_a_file(
        tmp_path, capsys):
    """An Optional bool (packing: None where it pays) takes --packing (True), --no-packing
    (False) and --packing none (None, its default), each over a --config file that sets it,
    as every other Optional field's flag takes 'none'; another value is a usage error."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"packing": False}))

    def parse(*argv: str) -> TriState:
        parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
        parser.add_argument("--config")
        settings.add_config_flags(parser, TriState)
        return settings.resolve_config(TriState, vars(parser.parse_args(argv)), "train")

    assert parse().packing is None
    assert parse("--config", str(config)).packing is False
    assert parse("--config", str(config), "--packing").packing is True
    assert parse("--config", str(config), "--packing", "none").packing is None
    assert parse("--config", str(config), "--packing=null").packing is None
    assert parse("--packing", "--no-packing").packing is False
    with pytest.raises(SystemExit):
        parse("--packing", "auto")
    assert "--packing: expected no value or none, got 'auto'" in capsys.readouterr().err


def test_a_scripts_flags_alone_make_its_settings(capsys):
    """parse_config_flags: the typed flags over the defaults, no config file; a value outside
    the choices is argparse's usage error."""
    cfg = settings.parse_config_flags(Demo, ["--steps", "3", "--mode", "b"], "A demo.", CHOICES)
    assert cfg == Demo(steps=3, mode="b")
    assert settings.parse_config_flags(Demo, [], "A demo.") == Demo()
    with pytest.raises(SystemExit) as stop:
        settings.parse_config_flags(Demo, ["--mode", "c"], "A demo.", CHOICES)
    assert stop.value.code == 2 and "invalid choice: 'c'" in capsys.readouterr().err


def test_file_then_flags_with_recipe_sections(tmp_path):
    """--config's values lie under the flags given with it; a recipe's train section reads as the
    file, its _-keys as notes, and an integer in the file reads as a float field's float."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"_seed": "doc", "train": {"steps": 3, "lr": 2, "_why": "x"},
                                  "eval": {"anything": 1}}))
    cfg = _parse(["--config", str(recipe), "--lr", "0.25"])
    assert (cfg.steps, cfg.lr) == (3, 0.25) and isinstance(_parse(["--config", str(recipe)]).lr,
                                                           float)


def test_a_dict_flag_updates_the_files_dict_key_by_key(tmp_path):
    """--options '{"b": 3}' over a file whose options hold a and b: a kept, b the flag's, as
    a recipe's --set train.options.b=3 does; a run's own config (base) is updated alike."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"train": {"options": {"a": 1, "b": 2}, "extra": {"x": 1}}}))
    cfg = _parse(["--config", str(recipe), "--options", '{"b": 3}'])
    assert cfg.options == {"a": 1, "b": 3} and cfg.extra == {"x": 1}
    args = {"config": str(recipe), "extra": {"y": 2}}
    cfg = settings.resolve_config(Demo, args, "train", base={"extra": {"z": 0}, "steps": 4})
    assert (cfg.extra, cfg.options, cfg.steps) == ({"z": 0, "x": 1, "y": 2}, {"a": 1, "b": 2}, 4)


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
    """A bad value in a config file is refused naming the file, the section and the key with what
    it takes (the close key for a typo), so the user edits that line."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        _parse(["--config", str(path)])


def test_unreadable_files_are_named(tmp_path):
    """A config file missing, not JSON (its line and column), not one object, or not UTF-8 is
    refused naming the file, not with json's bare exception."""
    with pytest.raises(ValueError, match="missing.json: config file not found"):
        _parse(["--config", str(tmp_path / "missing.json")])
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "lr": 1,\n  oops\n}')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 3, column 3"):
        _parse(["--config", str(bad)])
    for content, kind in ((b"[1]", "an array"), (b"null", "null"), (b"3", "a number")):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match=f"bad.json: .*one JSON object, not {kind}"):
            _parse(["--config", str(bad)])
    bad.write_bytes(b'{"lr": "\xff"}')
    with pytest.raises(ValueError, match="bad.json: cannot read the config file: .*utf-8"):
        _parse(["--config", str(bad)])


def test_a_recipe_shaped_config_refuses_unknown_top_level_keys(tmp_path):
    """A key beside a recipe's sections would be ignored by --config: it is refused."""
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"_note": "doc", "train": {"steps": 3}, "eval": {}, "lr": 5}))
    with pytest.raises(ValueError, match=r"r\.json: unknown top-level key\(s\) \['lr'\]; "
                                         r".*'train', 'eval', 'tune'"):
        _parse(["--config", str(recipe)])


def test_a_key_given_twice_is_refused_naming_the_key_and_file(tmp_path):
    """json keeps the last of a repeated key: a copy-pasted key would silently win."""
    config = tmp_path / "c.json"
    for text in ('{"lr": 1e-3, "steps": 2, "lr": 2e-3}', '{"options": {"a": 1, "a": 2}}'):
        config.write_text(text)
        key = "lr" if "lr" in text else "a"
        with pytest.raises(ValueError, match=rf"c\.json: key '{key}' is given twice"):
            _parse(["--config", str(config)])
    # another tool's file (an HF config.json) loads as transformers loads it: the last wins
    assert settings.read_json_object(config, "model config") == {"options": {"a": 2}}


def test_a_config_file_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Windows editors save UTF-8 with a BOM, which json refuses ("Unexpected UTF-8 BOM")."""
    config = tmp_path / "c.json"
    config.write_bytes(b"\xef\xbb\xbf" + json.dumps({"lr": 0.5}).encode())
    assert _parse(["--config", str(config)]).lr == 0.5


def test_bad_flag_values_exit_2(capsys):
    """A flag value of the wrong type or outside the choices exits 2, argparse's usage error, not a
    traceback."""
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
    """A field that may be None still takes a typed value from its flag and refuses a bad one;
    'none' reads as None only where the field may be None."""
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
    """A flag whose default is None takes 'none' as that default (`--license none`: each
    source's licence file, not "no licence"); another takes it as None, which its help
    explains."""
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    text = " ".join(settings.add_config_flags(parser, Demo, CHOICES).format_help().split())
    assert "--limit LIMIT None: no limit (default: 5; 'none' for None)" in text
    assert "--kind {x,y,none} default: None; 'none': the default" in text
    assert "--tag TAG a plain str: \"none\" is text here (default: 'x') " in text


def test_trainingmanager_eval_examples_none_is_the_whole_split():
    """trainingmanager's --eval-examples is 80 by default, and 'none' evaluates the whole
    validation split."""
    assert plan.parse_config([]).eval_examples == 80
    assert plan.parse_config(["--eval-examples", "none"]).eval_examples is None


def test_help_comes_from_the_field_comments_grouped_by_section():
    """A field's trailing comment (continued on "#   " lines) is its --help text, with its
    default unless it states one; other comment lines title groups; '%' is printed as is."""
    helps, sections = settings.field_docs(Demo)
    assert helps["steps"] == "optimizer steps; a step is one update"
    assert helps["fast"] == "" and sections["mode"] == "switches: the second section"
    assert sections["lr"] == sections["name"] == "optimisation"
    assert sections["fast"] == "switches: the second section"
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    text = " ".join(settings.add_config_flags(parser, Demo, CHOICES).format_help().split())
    assert "optimisation: --lr LR peak rate: 100% at the end of warmup (default: 0.001)" in text
    assert ("--name NAME runs/<name>; default: a timestamp ('none': the default) switches: the "
            "second section: "
            "--fast, --no-fast default: False") in text


def test_every_flag_of_the_scripts_explains_itself():
    """Every field of the scripts' configs has a help comment, so --help explains each flag."""
    import hyperparam_tune
    from codelm.evaluation.config import EvalConfig
    from codelm.recipes import RecipeOptions
    from scraping import GitHubConfig, LocalConfig

    for cls in (trainconfig.TrainConfig, EvalConfig, hyperparam_tune.TuneConfig, DataConfig,
                RecipeOptions, GitHubConfig, LocalConfig):
        helps, _ = settings.field_docs(cls)
        assert not [f for f in cls.__dataclass_fields__ if not helps.get(f)], cls.__name__


@dataclass
class Operands:
    files: list[str]  # input files
    out: str = field(metadata={"help": "output file"})
    overrides: list[str] = field(default_factory=list, metadata={"repeat": True,
                                                                 "metavar": "KEY=VALUE"})
    mode: str = field(default="a", metadata={"help": "how", "choices": ("a", "b")})


def test_operands_required_flags_and_repeated_flags():
    """What codelm.recipes (positional recipe, repeatable --set) and python -m scraping (positional
    sources, required --out, help and choices in field metadata) read their flags with."""
    parser = argparse.ArgumentParser(argument_default=argparse.SUPPRESS)
    settings.add_config_flags(parser, Operands, positional=("files",))
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


def test_list_flags_skip_empty_items_and_take_none_as_text_when_not_optional():
    """``--targets q_proj,`` (a trailing comma) and ``--ks 1,,2`` give no empty item (an int
    list would fail on ''), and a list field that is not Optional keeps "none" as an item."""
    cfg = _parse(["--targets", "q_proj,", ",v_proj", "--ks", "1,,2"])
    assert (cfg.targets, cfg.ks) == (["q_proj", "v_proj"], [1, 2])
    assert _parse(["--targets", "none"]).targets == ["none"]


def test_a_json_flag_that_is_no_json_says_how_json_is_quoted(capsys):
    """A --data-options value with unquoted keys (a shell ate the quotes, or they were never
    typed): one line naming the parse error and JSON's quoting in a shell."""
    with pytest.raises(SystemExit) as stop:
        plan.parse_config(["--data-options", '{extensions: [".kt"]}'])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1
    assert "--data-options: not a JSON object: Expecting property name" in err
    assert """'{"key": "value"}'""" in err


def test_an_unknown_flag_is_one_line_naming_the_closest_flags(capsys):

    """An unknown flag exits 2 with one line naming the closest flags (one it begins first), a
    prefix never taken as an abbreviation; a flag with none close points to --help."""
    for typed, near in ((["--max-stpes", "5"], "--max-steps"), (["--max-step", "5"], "--max-steps"),
                        (["--out", "runs"], "--out-dir or")):  # a flag it begins comes first
        with pytest.raises(SystemExit) as stop:  # a prefix is no abbreviation either
            plan.parse_config(typed)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1
        assert f"unknown flag {typed[0]}" in err and f"did you mean {near}" in err
    with pytest.raises(SystemExit):
        plan.parse_config(["--zzzzzzzz"])
    assert "--help lists the flags" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-stpes", "5"], ["--lr", "abc"]])
def test_a_flag_error_is_said_once_for_a_torchrun_job(argv, capsys, monkeypatch):
    """Every rank of a torchrun job exits 2 on a bad flag; rank 0 alone says why."""
    for rank, says in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            plan.parse_config(argv)
        assert stop.value.code == 2
        assert ("error: " in capsys.readouterr().err) == says, rank


def test_hugging_face_trainer_spellings_are_aliases_of_the_codelm_flags():
    """Hugging Face Trainer's flags (--learning_rate, --bf16, ...) read as the codelm flags they
    spell, for users coming from it; --help lists only codelm's."""
    from codelm import trainconfig

    hf = plan.parse_config([
        "--learning_rate", "2e-3", "--per_device_train_batch_size", "3",
        "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5", "--warmup_steps", "2",
        "--weight_decay", "0", "--max_steps", "9", "--logging_steps", "3", "--eval_steps", "3",
        "--save_steps", "3", "--output_dir", "elsewhere", "--seed", "3", "--bf16",
        "--gradient_checkpointing"])
    codelm = plan.parse_config([
        "--lr", "2e-3", "--batch-size", "3", "--grad-accum", "2", "--grad-clip", "0.5",
        "--warmup-steps", "2", "--weight-decay", "0", "--max-steps", "9", "--log-every", "3",
        "--eval-every", "3", "--save-every", "3", "--out-dir", "elsewhere", "--seed", "3",
        "--precision", "bf16", "--gradient-checkpointing"])
    assert hf == codelm
    assert plan.parse_config(["--num_train_epochs", "2", "--fp16"]).precision == "fp16"
    assert "learning_rate" not in trainconfig.build_parser().format_help()


@dataclass
class Switches:
    fast: bool = False  # a switch
    packing: bool | None = None  # None: where it pays


@pytest.mark.parametrize("word", ["true", "True", "TRUE", "1", "yes", "Y", "t",
                                  "false", "False", "0", "no", "n", "F"])
def test_a_switch_takes_a_true_or_false_word_as_hf_trainer_flags_do(word):
    """A bool field's flag (its --no- flag too) and an Optional bool's take a true/false word
    after them or after '=', read as HfArgumentParser's string_to_bool reads it (HF Trainer's
    users type --bf16 True); alone, each is still true."""
    from transformers.hf_argparser import string_to_bool

    def parse(*argv: str) -> Switches:
        parser = settings.ArgumentParser(argument_default=argparse.SUPPRESS)
        settings.add_config_flags(parser, Switches)
        return Switches(**vars(parser.parse_args(argv)))

    truth = string_to_bool(word)
    assert parse("--fast", word) == parse(f"--fast={word}") == Switches(fast=truth)
    assert parse("--no-fast", word) == Switches(fast=not truth)
    assert parse("--packing", word) == parse(f"--packing={word}") == Switches(packing=truth)
    assert parse("--fast", "--packing") == Switches(fast=True, packing=True)


def test_hf_trainer_switches_take_true_and_false_words(capsys):
    """trainingmanager.py reads HF Trainer's --bf16 True and --gradient_checkpointing False as
    HF does; --bf16 false, a precision it cannot turn off, is one line naming it; a word that
    is no true/false word after a switch is not its value."""
    assert plan.parse_config(["--bf16", "True", "--gradient_checkpointing", "False"]) == \
        plan.parse_config(["--bf16", "--no-gradient-checkpointing"])
    for argv in (["--bf16", "false"], ["--progress", "maybe"]):
        with pytest.raises(SystemExit):
            plan.parse_config(argv)
    err = capsys.readouterr().err
    assert "--bf16 false: --bf16 has no false value" in err
    assert "unrecognized arguments: maybe" in err


@pytest.mark.parametrize(("argv", "named"), [
    (["--learning_rate", "-1"], "lr (-1.0, --learning_rate): must be > 0"),
    (["--per_device_train_batch_size=0"], "batch_size (0, --per_device_train_batch_size)"),
    (["--learning_rate", "1", "--lr", "-1"], "lr (-1.0, --lr)"),  # the last one typed counts
])
def test_an_error_names_a_setting_as_the_command_line_spelled_it(argv, named):
    """A value typed with HF Trainer's spelling is named with that spelling in its error, so the
    user finds the flag they typed."""
    with pytest.raises(ValueError) as err:
        plan.parse_config(argv)
    assert named in str(err.value)


@pytest.mark.parametrize(("script", "text", "meant"), [
    ("trainingmanager", "learning_rate: 1.0e-3\n", "'lr'"),  # HF Trainer's name of the key
    ("trainingmanager", "max-steps: 3\n", "'max_steps'"),  # the flag's spelling
    ("trainingmanager", "Warmup_Stpes: 3\n", "'warmup_steps'"),
    ("eval", "k: [1, 10]\n", "'pass_k'"),  # bigcode-evaluation-harness's name of the key
])
def test_a_config_files_unknown_key_gets_the_did_you_mean_a_flag_gets(script, text, meant,
                                                                      tmp_path):
    """A YAML (or JSON) config's mistyped key names the key it stands for, as a mistyped flag
    does, other spellings of the script's flags included; not the list of every key."""
    import importlib

    module = importlib.import_module(script)
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ValueError) as err:
        module.parse_config(["--config", str(config)])
    assert str(config) in str(err.value) and f"did you mean {meant}?" in str(err.value)
    assert "keys are" not in str(err.value)


def test_a_mistyped_other_spelling_of_a_flag_is_answered_with_the_flag_help_shows(capsys):
    """--learning-rate is close to HF Trainer's hidden --learning_rate: the hint is --lr, the
    flag --help lists; a shown flag's own spellings stay as they are."""
    for typed, meant in (("--learning-rate", "--lr"), ("--progres", "--progress")):
        with pytest.raises(SystemExit):
            plan.parse_config([typed, "1"])
        err = capsys.readouterr().err
        assert f"unknown flag {typed}: did you mean {meant}" in err, err
        assert "learning_rate" not in err


def test_every_unknown_flag_of_a_command_is_answered_at_once(capsys):
    """Three mistyped flags (and their values, negative numbers among them) are answered in
    one line, each once with its hint: no second run to find the second; what follows -- is
    an operand, no flag."""
    with pytest.raises(SystemExit):
        plan.parse_config(["--progres", "--learning-rate", "-1", "--max-stepz", "-inf",
                           "--progres", "--", "--not-a-flag"])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.count("--progres:") == 1 and "--not-a-flag" not in err
    assert "unknown flags --progres: did you mean --progress" in err
    assert "; --learning-rate: did you mean --lr?; --max-stepz: did you mean --max-steps" in err


def test_a_directory_setting_under_the_home_directory_is_that_directory(tmp_path, monkeypatch):
    """A ~ that no shell expanded (a config file's, --out-dir=~/...) is the home directory in
    each script's directory settings (the data cache's too), a journal storage and eval.py's
    generations and preference-pair files, as it is in the paths of models and data: no
    directory named ~ is made where the command runs."""
    from codelm import tuneconfig
    from codelm.evaluation.config import parse_config as eval_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = tmp_path / "run.yaml"
    config.write_text("out_dir: ~/runs\n")
    assert trainconfig.read_config(["--config", str(config)]).cfg.out_dir == str(tmp_path / "runs")
    assert trainconfig.read_config(["--out-dir=~/b"]).cfg.out_dir == str(tmp_path / "b")
    evaluated = eval_config(["--models", "m", "--runs-dir=~/runs", "--out-dir=~/scores"])
    assert (evaluated.runs_dir, evaluated.out_dir) == (str(tmp_path / "runs"),
                                                       str(tmp_path / "scores"))
    tuned = tuneconfig.parse_config(["--out-dir=~/studies"])
    assert tuned.out_dir == str(tmp_path / "studies")
    assert tuneconfig.parse_config(["--storage=~/j.log"]).storage == str(tmp_path / "j.log")
    assert DataConfig(cache_dir="~/cache").cache_dir == str(tmp_path / "cache")
    files = eval_config(["--tasks", "humaneval", "--load-generations=~/g.json"])
    assert files.load_generations == str(tmp_path / "g.json")
    pairs = eval_config(["--models", "m", "--tasks", "humaneval", "--num-samples", "2",
                         "--temperature", "0.8", "--preference-pairs=~/pairs.jsonl"])
    assert pairs.preference_pairs == str(tmp_path / "pairs.jsonl")


def test_a_config_file_under_the_home_directory_is_read_there(tmp_path, monkeypatch):
    """--config=~/FILE (no shell expands that ~) reads the file under the home directory, in
    each script; hyperparam_tune's --train-config and --space name their files there too."""
    import hyperparam_tune
    from codelm import tuneconfig
    from codelm.evaluation.config import parse_config as eval_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "run.json").write_text(json.dumps({"lr": 2e-3, "max_steps": 7}))
    (tmp_path / "eval.json").write_text(json.dumps({"models": ["m"], "tasks": ["lm"]}))
    (tmp_path / "tune.json").write_text(json.dumps({"train_config": "~/run.json",
                                                    "space": "~/space.json"}))
    assert trainconfig.read_config(["--config=~/run.json"]).cfg.lr == 2e-3
    assert eval_config(["--config=~/eval.json"]).tasks == ["lm"]
    tuned = tuneconfig.parse_config(["--config=~/tune.json"])
    assert tuned.space == str(tmp_path / "space.json")
    assert hyperparam_tune.train_config_values(tuned.train_config) == {"lr": 2e-3,
                                                                        "max_steps": 7}


@pytest.mark.parametrize("value", ["-1e-3", "-2.5E+2", "-.5e1", "-7", "-inf", "-Infinity"])
def test_a_negative_number_in_any_float_spelling_is_a_flags_value(value):
    """A flag's value that Python's float reads as a negative number (an exponent, inf) is
    that value, not a flag: its range check then names the key, as --lr -1 is named."""
    read = trainconfig.read_config(["--lr", value, "--max-steps", "5"])
    assert read.cfg.lr == float(value) and read.cfg.max_steps == 5
    with pytest.raises(ValueError, match=r"^lr \(.*, --lr\): must be"):
        plan.parse_config(["--lr", value])


def test_a_data_options_list_given_as_its_one_string_reads_as_that_list(tmp_path):
    """data_options' list keys take their one item alone, as the top-level ones do (the check
    reads them so): the run's DataConfig, eval.py's project files and a recipe's collected
    sources all get the one-item list, never the string's characters."""
    from codelm import recipes
    from codelm.evaluation.config import parse_config as eval_config
    from codelm.evaluation.tasks import project

    config = tmp_path / "run.json"
    config.write_text(json.dumps({"data_options": {"extensions": ".kt"}}))
    cfg = trainconfig.read_config(["--config", str(config)]).cfg
    checked = settings.config_from_dict(DataConfig, {"extensions": ".kt"})
    assert cfg.data_options == {"extensions": [".kt"]}
    assert trainconfig.data_config(cfg).extensions == checked.extensions == [".kt"]
    flagged = eval_config(["--tasks", "project-completion", "--data", str(tmp_path),
                           "--models", "m", "--data-options", '{"extensions": ".kt"}'])
    assert project.extensions(flagged) == [".kt"]
    assert recipes.code_extensions({"data_options": {"extensions": ".kt"}}) == [".kt"]


def test_yaml_config_files_read_as_json_ones_do(tmp_path):

    """A YAML config (as litgpt users write one) reads as the same JSON does, recipes included, and
    its errors name the file as JSON's do: a typo's close key, a key given twice, the line."""
    config = tmp_path / "run.yaml"
    config.write_text("# as litgpt users write it\nmax_steps: 3\nlr: 2e-3\n"
                      "data_options:\n  val_frac: 0.1\n")
    cfg = plan.parse_config(["--config", str(config)])
    assert (cfg.max_steps, cfg.lr, cfg.data_options) == (3, 0.002, {"val_frac": 0.1})
    recipe = tmp_path / "recipe.yml"
    recipe.write_text("_note: a recipe\ntrain:\n  max_steps: 4\neval:\n  tasks: [lm]\n")
    assert settings.read_config_file(recipe, "eval")[0] == {"tasks": ["lm"]}
    for text, words in (("max_stpes: 3\n", ["max_stpes", "did you mean 'max_steps'"]),
                        ("lr: 1\nlr: 2\n", ["'lr'", "twice"]),
                        ("max_steps: [3\n", ["invalid YAML at line 2"])):
        config.write_text(text)
        with pytest.raises(ValueError) as err:
            plan.parse_config(["--config", str(config)])
        assert str(config) in str(err.value) and all(w in str(err.value) for w in words)


@pytest.mark.parametrize("script, flag", [("eval", "--seed"), ("hyperparam_tune", "--sampler-seed")])
def test_print_config_of_eval_and_tune_reads_back_to_the_same_settings(script, flag, tmp_path,
                                                                       capsys, monkeypatch):
    """--print-config yaml of eval.py and hyperparam_tune.py prints a file that, given to --config,
    makes the same settings: a run's settings are saved to be run again. It runs in a directory
    of its own: eval.py's default model is the latest run under ./runs."""
    import importlib

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    argv = [flag, "7", "--config", str(tmp_path / "first.yaml")]
    (tmp_path / "first.yaml").write_text("progress: false\n")
    assert module.main([*argv, "--print-config", "yaml"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert module.parse_config(["--config", str(printed)]) == module.parse_config(argv)


@pytest.mark.parametrize("script, beside, key, derived", [
    ("eval", ["--serve"], "batch_size", 8),
    ("eval", ["--chat", "--tasks", "humaneval"], "max_new_tokens", 128),
    ("hyperparam_tune", ["--time-budget-min", "5"], "max_steps", 150)])
def test_a_printed_config_leaves_a_derived_default_to_the_flags_beside_it(script, beside, key,
                                                                          derived, tmp_path,
                                                                          capsys, monkeypatch):
    """A value derived where none is given (eval.py's batch_size and max_new_tokens, a sweep's
    max_steps) is printed null by --print-config, so the printed file with --serve, --chat or
    --time-budget-min beside it makes the settings those flags make alone; the same value
    given is printed as given. It runs in a directory of its own: eval.py's default model is
    the latest run under ./runs."""
    import importlib

    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(script)
    for fmt in ("json", "yaml"):
        assert module.main(["--print-config", fmt]) == 0
        printed = tmp_path / f"printed.{fmt}"
        printed.write_text(capsys.readouterr().out)
        assert module.parse_config(["--config", str(printed)]) == module.parse_config([])
        assert module.parse_config(["--config", str(printed), *beside]) == \
            module.parse_config(beside)
    assert module.main([settings.flag_of(key), str(derived), "--print-config", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[key] == derived


@pytest.mark.parametrize("script, flag, key", [("eval", "--models", "models"),
                                               ("hyperparam_tune", "--study-name", "study_name")])
def test_print_config_yaml_keeps_text_that_reads_as_a_number_text(script, flag, key, tmp_path,
                                                                  capsys):
    """Text that --config's YAML reads as a number (2e3: an exponent without a dot) is printed
    quoted by --print-config yaml, so the file reads back to the same text, as its JSON does."""
    import importlib

    module = importlib.import_module(script)
    for fmt in ("json", "yaml"):
        assert module.main([flag, "2e3", "--print-config", fmt]) == 0
        printed = tmp_path / f"printed.{fmt}"
        printed.write_text(capsys.readouterr().out)
        value = getattr(module.parse_config(["--config", str(printed)]), key)
        assert value in ("2e3", ["2e3"])


def _with_subcommand() -> settings.ArgumentParser:
    parser = settings.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch")
    fetch.add_argument("--out", required=True)
    fetch.add_argument("--max-repos", type=int, default=1)
    fetch.add_argument("--mode", choices=("a", "b"), default="a")
    return parser


@pytest.mark.parametrize("argv, said", [
    (["fetch"], "tool fetch: error: the following arguments are required: --out"),
    (["fetch", "--out", "o", "--max-repos", "x"], "invalid int value: 'x'"),
    (["fetch", "--out", "o", "--mode", "c"], "invalid choice: 'c'"),
    (["fetch", "--out"], "argument --out: expected one argument"),
    (["pull"], "tool: error: argument command: invalid choice: 'pull'"),
    ([], "required: command"),
])
def test_every_command_line_mistake_is_one_line_pointing_at_help(argv, said, capsys):
    """A script's user sees the mistake, not a usage block of every flag above it: one line,
    the --help pointer, exit 2, in subcommands too (their parsers are the parent's class)."""
    with pytest.raises(SystemExit) as stop:
        _with_subcommand().parse_args(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert said in err and "--help lists the flags" in err and "usage:" not in err


def test_a_subcommands_unknown_flag_is_answered_with_the_subcommands_closest_flags(capsys):
    """argparse reports a subcommand's leftover flag from the top parser, which has no such
    flag of its own: the closest flags come from its subcommands."""
    with pytest.raises(SystemExit) as stop:
        _with_subcommand().parse_args(["fetch", "--out", "o", "--max-repo", "3"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "unknown flag --max-repo: did you mean --max-repos" in err


def test_another_subcommands_flag_names_the_subcommand_it_belongs_to(capsys):
    """A flag that one subcommand takes, typed after another: the answer names the subcommand
    that takes it, not the flag itself as a "did you mean"."""
    parser = settings.ArgumentParser(prog="tool")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch").add_argument("--out")
    sub.add_parser("push").add_argument("--force", action="store_true")
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["fetch", "--out", "o", "--force"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert "unknown flag --force here: it belongs to `tool push`" in err
    assert "did you mean" not in err
