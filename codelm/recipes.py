"""``python -m codelm.recipes RECIPE`` (installed: ``codelm-recipe``): run a seed project's recipe
(``configs/*.json``: a ``train`` and an ``eval`` section) end to end: train, export the adapter
and merged model, evaluate, print the table. ``--smoke`` runs the
same recipe on a tiny random checkpoint of its family and a small stdlib sample, then checks that
the loss fell and the saved adapter computes what the merged export computes."""

from __future__ import annotations

if __name__ == "__main__":  # first: the imports below load torch for seconds
    from codelm.runtime import process

    process.quiet_start_up_stops()

import argparse
import ast
import dataclasses
import hashlib
import json
import shutil
import sys
import textwrap
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

import eval as ev
import trainingmanager as tm
from codelm import trainconfig
from codelm.data.config import DataConfig
from codelm.data.sources import stdlib_files, stdlib_root
from codelm.evaluation.config import EvalConfig, config_from_dict
from codelm.evaluation.results import check_settings_unchanged
from codelm.runs import rundir
from codelm.runtime import process, settings
from codelm.runtime.hub import checkpoint_dir
from codelm.training import plan
from scraping import is_git_source

# --------------------------------------------------------------------------------------- recipes

@dataclass
class Recipe:
    path: Path
    train: dict  # TrainConfig values, validated
    eval: dict  # EvalConfig values, validated


# The recipes shipped with codelm: configs/NAME.json (in an install, under <prefix>/share/codelm).
SHIPPED = settings.bundled("configs")


def recipe_path(recipe: str | Path) -> Path:
    """The recipe file ``recipe`` names: a path, or a shipped recipe's name (refactotron, or
    configs/refactotron.json from another directory); one that is neither is refused, listing
    the shipped ones."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = SHIPPED / f"{path.name.removesuffix('.json')}.json"
    if path.parent in (Path("."), Path("configs")) and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.json")))
    raise ValueError(f"recipe {recipe}: no such file; the shipped recipes, by name: "
                     f"{names or 'none'} ({SHIPPED})")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe (a file, or a shipped recipe's name); errors name the file,
    the section and the key."""
    path = recipe_path(path)
    raw = settings.read_json_object(path, "recipe", strict=True)
    settings.check_recipe_keys(raw, path)
    for name in ("train", "eval"):
        if not isinstance(raw.get(name), dict):
            raise ValueError(f"{path}: the '{name}' section is missing or not an object")
    recipe = Recipe(path, *({k: v for k, v in raw[name].items() if not k.startswith("_")}
                            for name in ("train", "eval")))
    check_sections(recipe)
    for key in recipe.eval:
        check_eval_key(key, f"{path}: the eval section's {key}")
    for key in recipe.train:
        check_train_key(key, f"{path}: the train section's {key}")
    return recipe


def check_sections(recipe: Recipe, note: str = "", sets: Sequence[str] = ()) -> None:
    """Both sections' keys and value types; ``note`` and ``sets``: as ``--set`` changed them."""
    where = f"{recipe.path} (train section{note})"
    trainconfig.config_from_dict(recipe.train, where)
    config_from_dict(recipe.eval, f"{recipe.path} (eval section{note})",
                     partial(where_in_recipe, recipe.path, section="eval",
                             typed=set_train_keys(sets, "eval")))


# EvalConfig keys the recipe command sets itself or does not use, and what to do instead.
OWN_EVAL_KEYS = {
    "out_dir": f"sets eval.out_dir itself: it evaluates a run into <out-dir>/<name>/"
               f"{rundir.EVAL_DIR} (eval.py --out-dir DIR evaluates it elsewhere)",
    "device": "sets eval.device itself: use --device (training's too)",
    "progress": "sets eval.progress itself: use --no-progress (training's too)",
    "prompt": "runs the recipe's tasks, not a prompt (python eval.py --config RECIPE --prompt TEXT)",
}


# TrainConfig keys the recipe command sets itself, and the flag to use instead.
OWN_TRAIN_KEYS = {
    "device": "sets train.device itself: use --device (evaluation's too)",
    "progress": "sets train.progress itself: use --no-progress (evaluation's too)",
    "resume": "sets train.resume itself: use --resume (it resumes <out-dir>/<name>)",
}


def check_eval_key(key: str, where: str) -> None:
    """Refuse an eval key the recipe command sets itself or does not use (``OWN_EVAL_KEYS``)."""
    if key in OWN_EVAL_KEYS:
        raise ValueError(f"{where}: python -m codelm.recipes {OWN_EVAL_KEYS[key]}")


def check_train_key(key: str, where: str) -> None:
    """Refuse a train key the recipe command sets itself (``OWN_TRAIN_KEYS``)."""
    if key in OWN_TRAIN_KEYS:
        raise ValueError(f"{where}: python -m codelm.recipes {OWN_TRAIN_KEYS[key]}")


def apply_setting(recipe: Recipe, setting: str) -> None:
    """``--set train.lr=3e-4``: the value is read as JSON when it parses, else as a string."""
    key, sep, text = setting.partition("=")
    parts = key.split(".")
    if not sep or len(parts) < 2 or parts[0] not in ("train", "eval"):
        raise ValueError(f"--set {setting}: expected train.KEY=VALUE or eval.KEY=VALUE")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if parts[0] == "eval":
        check_eval_key(parts[1], f"--set {setting}")
    else:
        check_train_key(parts[1], f"--set {setting}")
    target = getattr(recipe, parts[0])
    for part in parts[1:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ValueError(f"--set {setting}: {part} is not an object")
    target[parts[-1]] = value
    other = trainconfig.OTHER_LENGTH.get(key.removeprefix("train."))
    if other is not None and value is not None and recipe.train.get(other) is not None:
        print(f"note: --set {setting} sets the run's length in place of the recipe's {other} "
              f"{recipe.train[other]}", file=sys.stderr)
        recipe.train[other] = None


# ------------------------------------------------------- data sources that need collecting first

def code_extensions(values: Mapping) -> list[str]:
    """The code files' extensions of train ``values``: data_options' (one given alone, as a
    list), else Python's."""
    options = settings.option_values(DataConfig, values.get("data_options") or {})
    return options.get("extensions") or [".py"]


def collect_git_sources(sources: Sequence[str], extensions: Sequence[str], out_dir: Path,
                        progress: bool) -> list[str]:
    """Git sources become scraper JSONL (one file per source, reused by a re-run); others pass."""
    from scraping.local import LocalConfig, collect_local

    out = []
    for source in sources:
        if not is_git_source(source):
            out.append(source)
            continue
        key = json.dumps([source, sorted(extensions)]).encode()
        target = out_dir / f"source-{hashlib.sha256(key).hexdigest()[:16]}.jsonl"
        summary = collect_local(LocalConfig(sources=[source], out=str(target),
                                            extensions=list(extensions), progress=progress))
        print(f"collected {source} -> {target}: {summary.format()}")
        out.append(str(target))
    return out


def check_family(model_dir: str, preset: str | None) -> None:
    """Refuse a checkpoint of another family than the recipe's ``preset`` (its LoRA targets)."""
    from architecture import PRESETS
    from codelm.models.families import read_config

    config = Path(model_dir) / rundir.HF_CONFIG
    if preset not in PRESETS or not config.is_file():
        return  # trainingmanager reports a missing or malformed checkpoint itself
    found = settings.read_json_object(config, "model config").get("model_type")
    if found is None:
        read_config(model_dir)  # says what it is instead (a codelm run directory, ...)
    want = PRESETS[preset].family
    if found != want:
        raise ValueError(f"{model_dir}: a {found!r} checkpoint, but this recipe is written for "
                         f"{preset} ({want!r}); pass --model with a {want} checkpoint")


def recipe_training(init_from: str, recipes_dir: Path) -> Path | None:
    """The recipe of ``recipes_dir`` whose run exports ``init_from`` (``runs/NAME/export``, an
    earlier stage's model), or None."""
    parts = Path(init_from).parts
    if len(parts) != 3 or parts[0] != "runs" or parts[2] != "export":
        return None
    for path in sorted(recipes_dir.glob("*.json")):
        try:
            train = json.loads(path.read_text(encoding="utf-8")).get("train") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(train, dict) and train.get("name") == parts[1]:
            return path
    return None


def check_paths(values: dict, recipe: str) -> None:
    """The recipe's model and data paths are placeholders: say which flag replaces them."""
    init_from = values.get("init_from")
    if init_from is not None:
        preset = values.get("preset")
        shape = f" of {preset}" if preset else ""
        how = (f"pass --model DIR or ID, an HF checkpoint{shape} (see docs/recipes.md; "
               f"{recipe}: train.init_from)")
        try:
            path = checkpoint_dir(init_from, "init_from")
        except ValueError as e:
            raise ValueError(f"{e}; or {how}") from None
        if not path.is_dir():
            if (earlier := recipe_training(init_from, Path(recipe).parent)) is not None:
                how = f"train it first with python -m codelm.recipes {earlier}, or {how}"
            raise ValueError(f"{init_from}: no such model directory; {how}")
        check_family(str(path), values.get("preset"))
    for key, flag in (("data", "--data"), ("val_data", "--val-data"), ("test_data", None)):
        for source in values.get(key) or []:
            if source != "stdlib" and not is_git_source(source) and not Path(source).exists():
                how = f"pass {flag} PATH ... " if flag else f"set --set train.{key}=[...] "
                raise ValueError(f"{source}: no such data file or directory; {how}"
                                 f"(see docs/recipes.md; {recipe}: train.{key})")


# ------------------------------------------------ smoke: a tiny checkpoint and data sample

# The family's pre-tokenizer and special tokens, so the tiny tokenizer is shaped like the real one.
SMOKE_TOKENIZERS = {
    "gpt_bigcode": ("starcoder", ("<|endoftext|>",)),
    "codegen": ("gpt2", ("<|endoftext|>",)),
    "phi": ("gpt2", ("<|endoftext|>",)),
    "llama": ("llama3", ("<|begin_of_text|>", "<|end_of_text|>")),
    "qwen2": ("qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>",
                        "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")),
}
SMOKE_VOCAB = 512
SMOKE_SHAPE = {"n_layer": 2, "n_head": 4, "n_embd": 64, "mlp_hidden": 128}
SMOKE_BLOCK = 192
SMOKE_PROBLEMS = 16  # generated problems a smoke run trains GRPO or preferences on
# Wider than GPT-2's 0.02, which at width 64 leaves LoRA on a random base nothing to move.
SMOKE_INIT_STD = 0.2
SMOKE_LICENSE = ("// Copyright 2010-2024 JetBrains s.r.o. Use of this source code is governed\n"
                 "// by the Apache 2.0 license that can be found in the LICENSE.txt file.\n\n")


def _stdlib_texts(max_bytes: int, count: int | None, must_have=None,
                  tests: bool = False) -> list[tuple[str, str]]:
    """(relative path, text) of up to ``count`` small stdlib files in a fixed order (the
    stdlib's own tests only with ``tests``)."""
    root = stdlib_root()
    out = []
    for path in stdlib_files():
        rel = path.relative_to(root)
        if path.stat().st_size > max_bytes or (rel.parts[0] == "test" and not tests):
            continue
        text = path.read_text("utf-8", errors="replace")
        if len(text.strip()) < 200 or (must_have is not None and not must_have(text)):
            continue
        out.append((rel.as_posix(), text))
        if len(out) == count:
            break
    return out


def _has_class_docstring(text: str) -> bool:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return False
    return any(isinstance(n, ast.ClassDef) and len(ast.get_docstring(n) or "") > 80
               for n in ast.walk(tree))


def refactor_pairs(count: int, methods: bool = False, every_function: bool = False) -> list[dict]:
    """Stdlib functions with their docstrings and comments -> the same code without them: the
    top-level functions of files up to 20 kB, or with ``methods`` every function of every
    file (nested ones dedented), about 3,600 pairs. ``every_function`` (implies ``methods``)
    also takes the stdlib's tests and functions with no docstring (the output is the input less
    its comments, often the input itself), of 120-800 characters: about 35,000 pairs, mostly
    copying, which is what a model must learn before it can refactor."""
    from codelm.tokenization.source import PYTHON_PARSE_ERRORS, strip_comments_and_docstrings

    methods = methods or every_function
    longest = 800 if every_function else 500
    pairs = []
    for _, text in _stdlib_texts(10**9 if methods else 20000, None, tests=every_function):
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.col_offset and not methods:
                continue
            source = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
            if not 120 <= len(source) <= longest:
                continue
            if not every_function and not ast.get_docstring(node):
                continue
            try:
                clean = strip_comments_and_docstrings(source, strict=True).strip()
            except PYTHON_PARSE_ERRORS:
                continue
            pairs.append({"input": source, "output": clean})
            if len(pairs) == count:
                return pairs
    return pairs


# Generated execution problems of a smoke run (codelm.data.problems, described): the forms
# whose prompts are shortest, a set of its own for each use.
SMOKE_FORMS = ("sign_code", "in_range")
SMOKE_PROBLEM_SEEDS = {"train": 3, "val": 2, "heldout": 1}


def write_problems(path: Path, n: int, seed: int) -> list[dict]:
    """``n`` generated execution problems of set ``seed``, written to ``path`` as HumanEval-format
    JSONL (what ``python -m codelm.data.problems --describe`` writes)."""
    from codelm.data.problems import generate_problems

    problems = generate_problems(n, seed, SMOKE_FORMS, describe=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(problem) + "\n" for problem in problems))
    return problems


def _preference_records(problems: Sequence[dict], paired: bool) -> list[dict]:
    """Preference records of generated problems, a solution that passes the test chosen over
    one a slip away that fails it: pairs (dpo, orpo, simpo) or labelled completions (kto)."""
    import random

    from codelm.data.problems import buggy_solution

    rng = random.Random(0)
    records = []
    for problem in problems:
        right = problem["canonical_solution"]
        wrong = buggy_solution(problem, rng)
        if wrong is None:
            continue
        if paired:
            records.append({"prompt": problem["prompt"], "chosen": right, "rejected": wrong})
        else:
            records.append({"prompt": problem["prompt"], "completion": right, "label": True})
            records.append({"prompt": problem["prompt"], "completion": wrong, "label": False})
    return records


def write_smoke_data(task: str, scratch: bool, out: Path, suffix: str = ".py"
                     ) -> tuple[list[str], list[str]]:
    """A small sample shaped like the recipe's data: (sources, texts for the tokenizer);
    ``suffix``: the file type a folder of code is read as (the recipe's first extension)."""
    from codelm.data.config import PREFERENCE_TASKS
    from scraping.common import encode_records, git_blob_sha, make_record

    out.mkdir(parents=True, exist_ok=True)
    if task in PREFERENCE_TASKS:  # records of generated problems' right and wrong solutions
        problems = write_problems(out / "problems.jsonl", 2 * SMOKE_PROBLEMS,
                                  SMOKE_PROBLEM_SEEDS["train"])
        records = _preference_records(problems, paired=task != "kto")
        file = out / "preferences.jsonl"
        file.write_text("".join(json.dumps(r) + "\n" for r in records))
        return [str(file)], [p["prompt"] + p["canonical_solution"] for p in problems]
    if task == "refactor":
        pairs = refactor_pairs(160)
        file = out / "pairs.jsonl"
        file.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        return [str(file)], [p["input"] + "\n" + p["output"] for p in pairs]
    if task == "lm" and scratch:  # scraper JSONL, one repo per stdlib package
        files = _stdlib_texts(8000, 60)
        records = [make_record(f"stdlib/{rel.split('/')[0]}", rel, git_blob_sha(t.encode()),
                               "PSF-2.0", 101, t) for rel, t in files]
        file = out / "scrape.jsonl"
        file.write_bytes(encode_records(records))
        return [str(file)], [t for _, t in files]
    if task == "docstring":
        files = _stdlib_texts(12000, 40, _has_class_docstring)
    elif task == "completion":  # stdlib code standing in for the recipe's, some with a licence
        files = [(rel, (SMOKE_LICENSE if i % 3 == 0 else "") + t)
                 for i, (rel, t) in enumerate(_stdlib_texts(6000, 40))]
    else:
        files = _stdlib_texts(6000, 40)
    code = out / "code"
    for rel, text in files:
        target = code / (rel.removesuffix(".py").replace("/", "__") + suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, "utf-8")
    return [str(code)], [t for _, t in files]


def tiny_checkpoint(preset: str, texts: Sequence[str], out: Path, seed: int = 0) -> Path:
    """A random toy-size HF checkpoint of the preset's family, with a BPE tokenizer of ``texts``."""
    from architecture import PRESETS, Transformer
    from codelm.models import pretrained
    from codelm.tokenization.bpe import BPETokenizer

    base = PRESETS[preset]
    pretokenizer, specials = SMOKE_TOKENIZERS[base.family]
    tok = BPETokenizer.train(texts, vocab_size=SMOKE_VOCAB, pretokenizer=pretokenizer,
                             special_tokens=specials)
    head_dim = SMOKE_SHAPE["n_embd"] // SMOKE_SHAPE["n_head"]
    rotary = max(2, head_dim * base.rotary_dim // base.head_dim // 2 * 2)
    n_kv = 1 if base.n_kv_head == 1 else (2 if base.n_kv_head < base.n_head else 4)
    cfg = dataclasses.replace(base, **SMOKE_SHAPE, vocab_size=tok.vocab_size,
                              block_size=2 * SMOKE_BLOCK, n_kv_head=n_kv, head_dim=head_dim,
                              rotary_dim=rotary, bos_id=tok.bos_id, eos_id=tok.eos_id,
                              init_std=SMOKE_INIT_STD)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    pretrained.save(model, out)
    tok.save(out)
    return out


def smoke_inputs(run_dir: Path) -> Path:
    """Where a smoke run's model and data are written, beside the run."""
    return run_dir.parent / f"{run_dir.name}-smoke-inputs"


def _is_smoke_run(run_dir: Path, work: Path) -> bool:
    """Whether run_dir is a --smoke run (the only run a smoke run may replace)."""
    try:
        saved = json.loads((run_dir / rundir.CONFIG_FILE).read_text())
        cache = saved["data_options"]["cache_dir"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return Path(cache).resolve() == (work / "cache").resolve()


# What --smoke replaces with its own tiny model and data: a --set of these is refused.
SMOKE_OWN_KEYS = ("init_from", "data", "val_data", "test_data", "data_options.cache_dir",
                  "problems", "val_problems")


def set_train_keys(settings: Sequence[str], section: str = "train") -> set[str]:
    """The keys of ``section`` that ``--set`` gives, dotted below it ("data_options.x")."""
    keys = (s.partition("=")[0] for s in settings)
    return {k.removeprefix(f"{section}.") for k in keys if k.startswith(f"{section}.")}


def smoke_train_values(values: dict, work: Path, steps: int, typed: Collection[str] = ()
                       ) -> dict:
    """The recipe's train section at toy scale (same task, LoRA, quantization); --set keys kept."""
    if "max_steps" in typed and values.get("max_steps") is None:
        raise ValueError("--smoke runs a number of steps: give --smoke-steps N, not "
                         "--set train.max_steps=null")
    if "epochs" in typed and values.get("epochs") is not None:
        raise ValueError("--smoke runs --smoke-steps steps: drop --set train.epochs (or give "
                         "--set train.max_steps=N)")
    task, scratch = values.get("task", "lm"), values.get("init_from") is None
    extensions = code_extensions(values)
    grpo_files = {"problems": work / "data" / "problems.jsonl",
                  "val_problems": work / "data" / "val_problems.jsonl"}
    if task == trainconfig.GRPO_TASK:  # generated problems, their tests the rewards
        problems = write_problems(grpo_files["problems"], SMOKE_PROBLEMS,
                                  SMOKE_PROBLEM_SEEDS["train"])
        val = write_problems(grpo_files["val_problems"], SMOKE_PROBLEMS // 4,
                             SMOKE_PROBLEM_SEEDS["val"])
        sources = None
        texts = [p["prompt"] + p["canonical_solution"] for p in problems + val]
    else:
        sources, texts = write_smoke_data(task, scratch, work / "data", extensions[0])
    steps = values["max_steps"] if "max_steps" in typed else steps
    sized = {"max_steps": steps, "epochs": None,
             "warmup_steps": 2, "eval_every": steps, "save_every": steps,
             "eval_examples": SMOKE_EVAL_LIMITS["limit"],  # eval's examples: the same loss
             "batch_size": min(values.get("batch_size") or 8, 4),  # null: preset auto's
             "grad_accum": min(values.get("grad_accum") or 1, 2),
             "block_size": SMOKE_BLOCK, "log_every": 1, "sample_tokens": 8,
             "lr": 3e-3 if scratch else 1e-2, "min_lr_ratio": 0.1,
             **(SMOKE_SHAPE if scratch else {})}
    if not torch.cuda.is_available() and values.get("precision") in ("fp16", "bf16"):
        sized["precision"] = "fp32"  # half precision needs CUDA; the smoke runs anywhere
    if task == trainconfig.GRPO_TASK:
        sized["max_completion_tokens"] = min(values.get("max_completion_tokens") or 32, 32)
    values = {**values, **{k: v for k, v in sized.items() if k not in typed},
              "data": sources, "val_data": None, "test_data": None,
              "data_options": {**values.get("data_options", {}),
                               "cache_dir": str(work / "cache")}}
    if task == trainconfig.GRPO_TASK:
        values.update({key: str(path) for key, path in grpo_files.items()})
    if not scratch:  # the preset names the family of the tiny base, whose shape then trains
        values["init_from"] = str(tiny_checkpoint(values.get("preset"), texts, work / "base"))
        values["preset"] = "auto"
    return values


SMOKE_EVAL_LIMITS = {"limit": 4, "max_new_tokens": 16, "lm_windows": 4, "lines_per_file": 2,
                     "batch_size": 4}


def smoke_eval_values(values: dict, work: Path | None = None) -> dict:
    """The recipe's eval section on a handful of examples (same tasks, metrics and decoding);
    its pass@k problems files are generated problems, written under ``work`` (the run's smoke
    inputs)."""
    out = dict(values)
    for key, cap in SMOKE_EVAL_LIMITS.items():
        value = values.get(key, getattr(EvalConfig, key))  # else the field's default
        out[key] = cap if value is None else min(value, cap)
    passk = [entry for entry in values.get("problems") or [] if entry.startswith("passk=")]
    if passk and work is not None:
        heldout = work / "data" / "heldout.jsonl"
        write_problems(heldout, SMOKE_EVAL_LIMITS["limit"], SMOKE_PROBLEM_SEEDS["heldout"])
        out["problems"] = [f"passk={heldout}" if entry in passk else entry
                           for entry in values["problems"]]
    return out


@torch.no_grad()
def check_adapter_round_trip(base_dir: Path, export: Path) -> float:
    """The largest logit difference between the saved adapter on a fresh base and the merge."""
    import lora
    from codelm.models import pretrained

    model = pretrained.load(base_dir, dtype=torch.float32)
    lora.load_adapter(model, export)
    merged = pretrained.load(export / rundir.MERGED_DIR, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=g)
    return float((model.eval()(ids) - merged.eval()(ids)).abs().max())


def train_losses(run_dir: Path, key: str = "loss") -> list[float]:
    """The logged training steps' ``key`` (their loss; a GRPO run's ``reward_mean``, say)."""
    lines = (Path(run_dir) / rundir.METRICS_FILE).read_text().splitlines()
    return [r[key] for r in map(json.loads, lines) if r.get("kind") == "train" and key in r]


# --------------------------------------------------------------------------------------- the run

# --set is given once per override, its values never split at commas (JSON lists hold them).
_SET_FLAG = {"repeat": True, "metavar": "SECTION.KEY=VALUE"}


@dataclass
class RecipeOptions:
    """Flags of ``python -m codelm.recipes`` (``settings.add_config_flags``; ``recipe``
    positional)."""

    recipe: str  # a recipe file, e.g. configs/refactotron.json, or a shipped recipe's name:
    #   airflow_docstrings, code_completion, fastapi_codegen, kotlin_phi, qwen_coder_completion,
    #   refactotron, ... (a wrong one lists them all)
    smoke: bool = False  # tiny random checkpoint of the family + small stdlib sample
    model: str | None = None  # base model: a local HF directory or hub id; default: train.init_from
    data: list[str] | None = None  # JSONL files, directories or git URLs; default: train.data
    val_data: list[str] | None = None  # default: train.val_data, or with --data a split of it
    out_dir: str | None = None  # where runs go; default: runs/ (smoke: runs/smoke/)
    name: str | None = None  # run name; default: the recipe's
    set: list[str] = field(default_factory=list, metadata=_SET_FLAG)  # e.g. train.lr=1e-4
    smoke_steps: int = 30  # training steps of --smoke
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    skip_eval: bool = False  # train and export only
    resume: bool = False  # continue the interrupted run <out-dir>/<name> from its checkpoint
    progress: bool = True  # progress bars


@dataclass
class RecipeResult:
    run_dir: Path
    train: tm.TrainResult
    eval: dict | None  # eval.evaluate's results, its "table" printed
    losses: list[float]
    adapter_max_diff: float | None = None  # smoke: base + adapter vs the merged export
    smoke: bool = False  # a --smoke run
    rewards: list[float] | None = None  # a GRPO run's mean reward a logged step


def resolve_models(specs: Sequence[str], placeholders: dict[str, str]) -> list[str]:
    """The eval section's models with the recipe's own paths (``placeholders``) made this run's."""
    out = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or "/" in label:
            label, path = "", spec
        path = placeholders.get(path.rstrip("/"), path)
        out.append(f"{label}={path}" if label else path)
    return out


def run_recipe(opts: RecipeOptions) -> RecipeResult:
    """Train, export and evaluate one recipe (see the module docstring)."""
    threads = torch.get_num_threads()
    if opts.smoke:  # toy tensors: threads only add overhead (and suffer most on a busy machine)
        torch.set_num_threads(1)
    try:
        return _run_recipe(opts)
    finally:
        torch.set_num_threads(threads)


def where_in_recipe(recipe: str | Path, key: str, typed: Collection[str] = (),
                   own: Mapping[str, str] | None = None, section: str = "train") -> str:
    """Where the user set ``key`` of ``section``: the command's flag, ``--set``, else the recipe."""
    if own and key in own:
        return own[key]
    if key in typed:
        return f"--set {section}.{key}"
    if inside := sorted(k for k in typed if k.startswith(f"{key}.")):
        return " and ".join(f"--set {section}.{k}" for k in inside)
    return f"{section}.{key} in {recipe} (or --set {section}.{key}=VALUE)"


# The train keys the command's own flags set (RecipeOptions field -> TrainConfig key).
OWN_FLAGS = {"model": "init_from", "data": "data", "val_data": "val_data", "name": "name",
             "out_dir": "out_dir", "device": "device"}


def resume_hint(smoke: bool) -> str:
    """Completes trainingmanager's "continue with ...": a smoke run is run again, not resumed."""
    return ("the same `python -m codelm.recipes` command (a --smoke run is not resumed)" if smoke
            else "the same `python -m codelm.recipes` command plus --resume")


def what_next(smoke: bool) -> str:
    """What the user of a stopped run does next, in trainingmanager's words."""
    return rundir.what_next(resume_hint(smoke), restarts=smoke)


class TrainedRunInterrupted(KeyboardInterrupt):
    """A stop after training returned: the run is saved, and ``--resume`` evaluates it."""

    def __init__(self, stop: KeyboardInterrupt, run_dir: Path):
        super().__init__(*stop.args)  # the signal's name, for process.interrupted_exit_code
        self.run_dir = run_dir


def eval_config(recipe: Recipe, opts: RecipeOptions, cfg: trainconfig.TrainConfig, run_dir: Path,
                own_run: str, own_base: str) -> EvalConfig:
    """The recipe's eval section for ``run_dir``: its own run and base named are this run's."""
    values = (smoke_eval_values(recipe.eval, smoke_inputs(run_dir)) if opts.smoke
              else dict(recipe.eval))
    placeholders = {own_run: str(run_dir)}
    if own_base and cfg.init_from:
        placeholders[own_base] = cfg.init_from
    values.update(models=resolve_models(values.get("models") or [own_run], placeholders),
                  out_dir=str(run_dir / rundir.EVAL_DIR), device=opts.device, progress=opts.progress)
    own = {"device": "--device", **({k: "--smoke" for k in SMOKE_EVAL_LIMITS} if opts.smoke
                                     else {})}
    return config_from_dict(values, f"{opts.recipe} (eval section)",
                            partial(where_in_recipe, opts.recipe, section="eval",
                                    typed=set_train_keys(opts.set, "eval"), own=own))


def _with_flags(values: dict, opts: RecipeOptions) -> dict:
    """The train values with the command's own flags applied."""
    if opts.smoke:
        given = [flag for flag, value in (("--model", opts.model), ("--data", opts.data),
                                          ("--val-data", opts.val_data)) if value is not None]
        given += [f"--set train.{t}" for t in sorted(set_train_keys(opts.set))
                  if any(t == k or t.startswith(f"{k}.") for k in SMOKE_OWN_KEYS)]
        if "problems" in set_train_keys(opts.set, "eval"):
            given.append("--set eval.problems")
        if given:
            raise ValueError(f"--smoke builds its own tiny model and data: drop "
                             f"{', '.join(given)} (or drop --smoke to train on them)")
        if opts.smoke_steps < 1:
            raise ValueError(f"--smoke-steps {opts.smoke_steps}: must be >= 1")
        defaults = trainconfig.TrainConfig()
        exported = {key: values.get(key, getattr(defaults, key))
                    for key in ("export", "export_merged")}
        if values.get("lora_r", defaults.lora_r) > 0 and not all(exported.values()):
            raise ValueError("--smoke checks the saved adapter against the merged export of a "
                             "LoRA recipe: it needs train.export and train.export_merged true "
                             "(--set train.export_merged=true), or drop --smoke")
    if opts.model is not None:
        if values.get("init_from") is None:
            raise ValueError(f"--model: {opts.recipe} trains from scratch (no init_from)")
        values["init_from"] = opts.model
    if opts.data:  # the user's own data: their validation files, or a split of the data
        values["data"] = list(opts.data)
        values["val_data"] = None
    if opts.val_data:
        values["val_data"] = list(opts.val_data)
    return values


def _smoke_sized(values: dict, opts: RecipeOptions, run_dir: Path, typed: set[str],
                 own: dict[str, str]) -> dict:
    """The smoke-sized train values (``own`` told which keys it sized)."""
    from architecture import PRESETS

    if values.get("init_from") and values.get("preset") not in PRESETS:
        raise ValueError(f"{opts.recipe}: --smoke builds a tiny checkpoint of the family of "
                         f"train.preset, which must name one of {sorted(PRESETS)}: add "
                         "--set train.preset=NAME")
    if opts.resume:
        raise ValueError("--smoke runs are not resumed; run it again")
    work = smoke_inputs(run_dir)  # rebuilt alike each time
    if run_dir.exists() and not _is_smoke_run(run_dir, work):
        raise ValueError(f"{run_dir} holds a run that --smoke did not write; choose another "
                         "--out-dir or --name (a smoke run replaces only its own)")
    shutil.rmtree(work, ignore_errors=True)
    sized = smoke_train_values(values, work, opts.smoke_steps, typed)
    own.update({k: "--smoke-steps" if k in ("max_steps", "eval_every", "save_every") else
                "--smoke" for k in sized if k not in typed and sized[k] != values.get(k)
                and k != "data_options"})  # of which --smoke sets only the cache_dir
    return sized


def _run_recipe(opts: RecipeOptions) -> RecipeResult:
    recipe = load_recipe(opts.recipe)
    own_run = f"{recipe.train.get('out_dir', 'runs')}/{recipe.train.get('name')}".rstrip("/")
    own_base = str(recipe.train.get("init_from") or "").rstrip("/")
    for setting in opts.set:
        apply_setting(recipe, setting)
    # a list key's one item alone (data: src/) as the list it stands for, as --config reads it
    recipe.train = settings.option_values(trainconfig.TrainConfig, recipe.train)
    recipe.eval = settings.option_values(EvalConfig, recipe.eval)
    typed = set_train_keys(opts.set)
    if opts.smoke and "max_steps" in typed:  # a smoke run counts steps, not the recipe's epochs
        recipe.train["epochs"] = None
    if opts.set:  # checked now, not after hours of training
        check_sections(recipe, ", with --set", opts.set)
    values = dict(recipe.train)
    name = opts.name or values.get("name") or Path(opts.recipe).stem
    trainconfig.check_run_name(name, f"--name {name}" if opts.name
                               else f"{opts.recipe}: train.name {name}")
    smoke_dir = "runs/smoke" if opts.smoke and "out_dir" not in typed else None  # a --set's kept
    # ~: the home directory (--out-dir=~/runs, a recipe's out_dir), as a run's out_dir reads it
    out_dir = Path(opts.out_dir or smoke_dir or values.get("out_dir", "runs")).expanduser()
    values.update(name=name, out_dir=str(out_dir), device=opts.device, progress=opts.progress,
                  resume=str(out_dir / name) if opts.resume else None)
    values = _with_flags(values, opts)
    own = {key: settings.flag_of(flag) for flag, key in OWN_FLAGS.items() if getattr(opts, flag)}
    where_set = partial(where_in_recipe, opts.recipe, typed=typed, own=own)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out_dir}: cannot create the output directory ({e.strerror}); check "
                         "--out-dir") from None
    if opts.smoke:  # a smoke run replaces the previous one of the same name
        values = _smoke_sized(values, opts, out_dir / name, typed, own)
    else:
        check_paths(values, opts.recipe)
    if values.get("init_adapter") is not None:  # its lora_* keys as --config reads them
        init_cfg = trainconfig.config_from_dict(values, f"{opts.recipe} (train section)")
        plan.with_init_adapter(init_cfg, typed=set(recipe.train), where_set=where_set)
    if values.get("data"):
        extensions = code_extensions(values)
        values["data"] = collect_git_sources(values["data"], extensions, out_dir / f"{name}-data",
                                             opts.progress)
    cfg = trainconfig.config_from_dict(values, f"{opts.recipe} (train section)")
    plan.validate_config(cfg, where_set)
    if opts.smoke:  # only once the new run can start
        shutil.rmtree(out_dir / name, ignore_errors=True)
    eval_remedy = (f"remove {out_dir / name / rundir.EVAL_DIR}, then run the same command with "
                   "--resume to evaluate the run again")
    if opts.resume and not opts.skip_eval:  # refused now, not after the run's export again
        check_settings_unchanged(
            eval_config(recipe, opts, cfg, out_dir / name, own_run, own_base), eval_remedy)
    result = tm.train(cfg, resume_hint=resume_hint(opts.smoke), restarts=opts.smoke,
                      where_set=where_set, checked=True)
    grpo = cfg.task == trainconfig.GRPO_TASK
    report = RecipeResult(result.run_dir, result, None, train_losses(result.run_dir),
                          smoke=opts.smoke,
                          rewards=train_losses(result.run_dir, "reward_mean") if grpo else None)
    if result.interrupted:
        return report
    try:
        export = result.run_dir / rundir.EXPORT_DIR
        if opts.smoke and cfg.lora_r > 0:
            report.adapter_max_diff = check_adapter_round_trip(Path(cfg.init_from), export)
        if not opts.skip_eval:
            report.eval = ev.evaluate(
                eval_config(recipe, opts, cfg, result.run_dir, own_run, own_base),
                remedy=eval_remedy, replace_other_weights=True)
    except KeyboardInterrupt as e:
        raise TrainedRunInterrupted(e, result.run_dir) from None
    return report


def loss_change(losses: Sequence[float]) -> tuple[float, float] | None:
    """Mean loss of the first and of the last (up to) three logged steps; None with fewer than two."""
    k = min(3, len(losses) // 2)
    return (sum(losses[:k]) / k, sum(losses[-k:]) / k) if k else None


ROUND_TRIP_TOLERANCE = 1e-4


def smoke_problems(report: RecipeResult) -> list[str]:
    """A smoke run fails on a loss that did not fall or an adapter that disagrees with the merge."""
    problems = []
    change = loss_change(report.losses)  # None (one logged step): not checked, said by summary
    if report.rewards is None and change is not None and not change[1] < change[0]:
        problems.append(f"the training loss did not decrease ({change[0]:.4f} -> "
                        f"{change[1]:.4f})")
    if report.adapter_max_diff is not None and report.adapter_max_diff > ROUND_TRIP_TOLERANCE:
        problems.append(f"base + saved adapter and the merged export differ by "
                        f"{report.adapter_max_diff:.2e} (tolerance {ROUND_TRIP_TOLERANCE})")
    return problems


def grpo_summary(rewards: Sequence[float], smoke: bool) -> str:
    """A GRPO run's line in place of the loss's: its mean reward, first vs last steps."""
    change = loss_change(rewards)
    line = "GRPO mean reward (first vs last steps): "
    line += f"{change[0]:.3f} -> {change[1]:.3f}" if change else "too few logged steps"
    if smoke and not any(rewards):
        line += (" (a random model solves nothing: the smoke checks that sampling, the "
                 "sandboxed tests and the update run, not that GRPO learns)")
    return line


def summary(report: RecipeResult) -> str:
    """What the run left that training's own lines do not say (they name its stop and export)."""
    lines = [f"run: {report.run_dir}"]
    if report.train.stopped_by_budget:
        lines.append(f"time budget (train.max_time_s) reached at step {report.train.step}: the "
                     f"run is not finished; {what_next(report.smoke)}")
    if report.rewards is not None:  # GRPO's advantages average zero: its loss need not fall
        lines.append(grpo_summary(report.rewards, report.smoke))
    elif change := loss_change(report.losses):
        first, last = change
        lines.append(f"training loss (first vs last steps): {first:.4f} -> {last:.4f} "
                     f"({'decreased' if last < first else 'DID NOT DECREASE'})")
    elif report.losses:
        lines.append(f"training loss: too few logged steps ({len(report.losses)}) to compare "
                     "the first with the last")
    if report.adapter_max_diff is not None:
        lines.append(f"adapter loaded back onto the base vs merged export: max |logit diff| "
                     f"{report.adapter_max_diff:.2e}")
    if report.eval:
        lines += ["", report.eval["table"], "", f"evaluation: {report.eval['out_dir']}"]
        if report.smoke:
            lines.append("(a smoke run: a tiny random model trained a few steps; its figures "
                         "check the pipeline, not the recipe)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = settings.ArgumentParser(
        prog="python -m codelm.recipes",
        argument_default=argparse.SUPPRESS,  # RecipeOptions' defaults hold
        description="Train and evaluate one seed project's recipe (configs/*.json) with one "
        "command; --smoke runs it on a tiny random checkpoint of the same family in seconds.")
    return settings.add_config_flags(parser, RecipeOptions, positional=("recipe",))


def main(argv: Sequence[str] | None = None) -> int:
    opts = None  # a stop while the flags are read is told too, not a traceback
    try:
        with process.interrupt_on_sigterm():
            opts = RecipeOptions(**vars(build_parser().parse_args(argv)))
            report = run_recipe(opts)
    except tm.RUN_ERRORS as e:
        return tm.report_run_error(e)
    except KeyboardInterrupt as e:  # training stops itself (a checkpoint); this is before or after
        if opts is not None and opts.smoke:  # never continued, whatever it had saved
            print(f"interrupted: {what_next(True)}", file=sys.stderr)
        elif isinstance(e, TrainedRunInterrupted):
            print(f"interrupted: training is complete and saved in {e.run_dir}; finish the "
                  f"evaluation with {resume_hint(opts.smoke)}", file=sys.stderr)
        elif isinstance(e, rundir.RunInterrupted) and e.resume is not None:
            print(f"interrupted: continue with {e.resume}", file=sys.stderr)
        else:  # before training, or before its first checkpoint: no run to resume
            print("interrupted before the first checkpoint: nothing to resume; run the same "
                  "command again", file=sys.stderr)
        return process.interrupted_exit_code(e)
    print(summary(report))
    if report.train.interrupted:
        return process.interrupted_exit_code(report.train.interrupted)
    problems = smoke_problems(report) if opts.smoke else []
    for problem in problems:
        print(f"smoke check failed: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(process.run_main(main))
