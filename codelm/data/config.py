"""``DataConfig``: everything that decides what ``dataset.prepare`` builds, as data, with its
checks. It imports none of the data pipeline, so that configs (trainconfig.py) read it alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from codelm.runtime import process, settings

# The sentinel tokens of a fim prompt (prefix, suffix, middle).
FIM_SENTINELS = 3

TASKS = ("lm", "completion", "method", "docstring", "refactor", "fim", "chat", "project")
# The project task's composers (codelm.data.composers.COMPOSERS less "empty").
PROJECT_COMPOSERS = ("path_distance", "imports", "bm25")
# The preference tasks (codelm.data.preferences reads their data, not ``prepare``).
PREFERENCE_TASKS = ("dpo", "kto", "orpo", "simpo")
GRPO_TASK = "grpo"  # reinforcement learning from the problems' tests (codelm.training.rollout)
# The tasks whose runs train on no corpus's documents (problems, preference records): no
# held-out split of their data scores them; benchmarks do.
NO_CORPUS_TASKS = (GRPO_TASK, *PREFERENCE_TASKS)
ALL_TASKS = (*TASKS, *NO_CORPUS_TASKS)  # what a run's --task may name
SPLITS = ("train", "val", "test")
# A from-scratch byte-level BPE's special tokens (tokenizer kind bpe): StarCoder2's end of
# text, fill-in-the-middle and repository tokens, which codelm's tasks read by name.
BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                      "<repo_name>", "<file_sep>")
TOKENIZER_KINDS = ("code", "bpe")
# TokenizerTraining's ranges (TrainConfig's keys of the same names: trainconfig.VALUE_RANGES).
TOKENIZER_RANGES = (settings.ValueRange(("tokenizer_min_freq", "tokenizer_max_vocab"),
                                        lambda v: v >= 1, "must be >= 1"),)
# Files of records, read when given as sources: no extension of the code a directory holds.
RECORD_EXTENSIONS = (".jsonl", ".parquet")

REFACTOR_TEMPLATE = "### Refactor the following Python code to improve quality:\n\n{input}\n"
# ``{source_code}`` is the class with its docstring removed.
DOCSTRING_PROMPTS = {
    "simple": "Class {source_code}\n\nDocstring:",
    "verbose": (
        "Your task is to write a docstring that summarizes the following Python class.\n"
        "Class {class_name}:\n{source_code}\n\nDocstring:"
    ),
}


def docstring_template(prompt: str) -> str:
    """A docstring prompt's template: that of a key of DOCSTRING_PROMPTS, else ``prompt``
    itself (a template of one's own)."""
    return DOCSTRING_PROMPTS.get(prompt, prompt)


def docstring_prompt_problem(prompt: str) -> str | None:
    """Why ``prompt`` is no docstring prompt (None: a key of DOCSTRING_PROMPTS, or a template
    holding {source_code} once, where the code goes, and {class_name} where it likes)."""
    if prompt in DOCSTRING_PROMPTS or prompt.count("{source_code}") == 1:
        return None
    return (f"{prompt!r} is neither {' nor '.join(DOCSTRING_PROMPTS)} nor a template holding "
            "{source_code} once (where the class goes; {class_name} names it)")


class DataError(ValueError):
    """A user-facing data problem; the message names the file, line or option at fault."""


def _default_cache_dir() -> str:
    return str(settings.cache_root() / "data")


# The longest training sequence a pretrained model's run takes where block_size is unset.
MAX_DEFAULT_CONTEXT = 1024
# The keys of an HF config.json that hold the model's context, in the order families use them.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx")


def checkpoint_context(directory: str | Path) -> int | None:
    """The context a run from the HF checkpoint in ``directory`` takes where block_size is
    unset: the model's own, at most MAX_DEFAULT_CONTEXT; None where its config.json names none
    (or it has none: a tokenizer's directory alone)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    config = settings.read_json_object(path, "model config")
    context = next((config[k] for k in CONTEXT_KEYS if k in config), None)
    if not settings.is_number(context) or not math.isfinite(context) or context < 1:
        return None
    if context != int(context):
        return None
    return min(int(context), MAX_DEFAULT_CONTEXT)


@dataclass(frozen=True)
class TokenizerTraining:
    """A tokenizer trained on a corpus's train split (``dataset.trained_tokenizer``): a
    from-scratch run's (TrainConfig's keys of the same names) and dataset.py
    --train-tokenizer's."""

    # a tokenizer trained on the train split (--train-tokenizer)
    tokenizer_kind: str = "code"  # code (codelm's CodeTokenizer) or bpe (byte-level BPE in HF's
    #   tokenizer.json, StarCoder's pre-tokenizer and special tokens)
    tokenizer_min_freq: int = 10  # keeps pieces seen at least this often (11: more than 10
    #   times; bpe: merges pairs seen at least this often)
    tokenizer_max_vocab: int | None = 4000  # the cap on learned pieces (its byte and special
    #   tokens come on top)

    def describe(self) -> str:
        return (f"{self.tokenizer_kind} tokenizer trained on the train split (min_freq "
                f"{self.tokenizer_min_freq}, max_vocab {self.tokenizer_max_vocab or 'none'})")


@dataclass
class DataConfig:
    """Everything that decides what ``prepare`` builds; all but the runtime knobs key the cache."""

    # task and sources
    task: str = "lm"  # lm | completion | method | docstring | refactor | fim | chat | project
    sources: list[str] = field(default_factory=lambda: ["stdlib"])  # "stdlib", a directory (a
    #   git checkout too), a JSONL of code ({repo, path, text} or {"file_text"}), of pairs
    #   ({input, output} or {prompt, completion}) or of conversations ({"messages": [{role,
    #   content}, ...]}), a parquet file, a datasets save_to_disk directory, or a Hugging Face
    #   dataset id (org/name: its train split)
    val_sources: list[str] = field(default_factory=list)  # exactly the val split; `sources`
    #   fill the others, and a copy of one of its documents in `sources` leaves training
    test_sources: list[str] = field(default_factory=list)  # the same for the test split
    extensions: list[str] = field(default_factory=lambda: [".py"])  # files read from directories
    block_size: int = 256  # tokens per training sequence (supervised: prompt + completion)
    # splits
    train_frac: float = 0.8  # the training share of the documents (the three sum to 1)
    val_frac: float = 0.1  # the validation share
    test_frac: float = 0.1  # the test share
    seed: int = 42  # the split and the sampled task targets
    split_by: str = "repo"  # "repo" (where the source knows the repo, else file) or "file"
    # cleaning
    dedupe: bool = True  # drop exact duplicates (a copy in another split always goes)
    near_dedupe: bool = False  # also drop near duplicates (MinHash)
    near_dedupe_threshold: float = 0.85  # Jaccard similarity above which files are duplicates
    autopep8: bool = False  # reformat each Python file with autopep8
    strip_license: bool = True  # drop a licence header: the leading comment blocks (/* */ or
    #   the language's own line comments: #, // or --) of a copyright or licence notice
    strip_comments: bool = False  # drop Python files' comments (other languages keep theirs)
    strip_docstrings: bool = False  # drop Python files' docstrings
    redact_secrets: bool = True  # credentials become placeholders such as <GITHUB_TOKEN>
    redact_emails: bool = False  # e-mail addresses become <EMAIL>
    min_bytes: int = 1  # smaller files are dropped
    max_bytes: int = 1_000_000  # larger files (as stored) are dropped, unread
    min_lines: int = 2  # files with fewer lines are dropped
    max_line_length: int = 1000  # files with a longer line (minified, generated) are dropped
    max_literal_length: int = 400  # longest one-line string/number literal
    skip_bad: bool = False  # skip (and count) malformed records instead of failing
    text_column: str | None = None  # the code column of parquet/datasets/JSONL records
    input_column: str | None = None  # the prompt column of pair records (with output_column)
    output_column: str | None = None  # the completion column of pair records
    max_docs: int | None = None  # read only the first N of sources, val_sources, test_sources
    # task options
    add_eos: bool = True  # EOS after each supervised completion
    max_prompt_tokens: int | None = None  # longer prompts lose the end of their code, then
    #   their left end (fim: keeps the three sentinels)
    max_completion_tokens: int | None = None  # longer completions are cut there, without their EOS (fim: the middles)
    completion_style: str = "window"  # "window" or "line" (CodeXGLUE line completion)
    window_prompt_tokens: int = 100  # window completion: tokens of context
    window_completion_tokens: int = 35  # window completion: tokens to complete
    window_stride: int | None = None  # default: prompt + completion tokens (no overlap)
    lines_per_file: int = 5  # line completion targets sampled per file (project: too)
    project_composer: str = "path_distance"  # project: the composer that orders repositories
    #   and composes completion examples' contexts (path_distance | imports | bm25)
    docstring_targets: str = "class"  # "class", "function" or "both": what loses its docstring
    docstring_min_tokens: int = 20  # shorter docstrings make no example
    docstring_code_tokens: int = 400  # the code shown with a docstring target, at most
    docstring_prompt: str = "simple"  # simple ("Class {source_code}\n\nDocstring:"), verbose
    #   ("Your task is to write a docstring that summarizes the following Python class.\nClass
    #   {class_name}:\n{source_code}\n\nDocstring:"), or a template of your own holding
    #   {source_code} (and {class_name} if you like)
    fim_rate: float = 0.5  # fraction of fim chunks turned into prefix-suffix-middle examples
    pair_special_tokens: bool = False  # pair records read a special token's text (<|eot_id|>)
    #   as the token, as transformers' tokenizer(text) does; documents keep it text; not in lm
    # runtime (not part of the cache key)
    cache_dir: str = field(default_factory=_default_cache_dir)  # where prepared datasets are kept
    use_cache: bool = True  # False: rebuild, replacing what the cache holds
    num_workers: int | None = None  # processes cleaning and tokenizing; None: every core
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        self.cache_dir = settings.home_expanded(self.cache_dir)  # a config file's ~: home

    @property
    def workers(self) -> int:
        """The processes that clean and tokenize (``process.worker_count``)."""
        return process.worker_count(self.num_workers)

    def sources_by_split(self) -> list[tuple[str | None, str]]:
        """(predefined split or None, source), val and test first: deduplication keeps the first
        copy, so a document both in a val/test file and in `sources` stays out of training."""
        return ([("val", s) for s in self.val_sources] + [("test", s) for s in self.test_sources]
                + [(None, s) for s in self.sources])

    def validate(self) -> None:
        """What the field types cannot say (``settings.config_from_dict`` checks the types)."""
        for name, minimum in _MINIMUMS.items():
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise DataError(f"DataConfig.{name} must be >= {minimum}, got {value}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise DataError(f"DataConfig.{name}: {value!r} is not one of {list(allowed)}")
        if problem := docstring_prompt_problem(self.docstring_prompt):
            raise DataError(f"DataConfig.docstring_prompt: {problem}")
        fracs = (self.train_frac, self.val_frac, self.test_frac)
        if min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
            raise DataError(f"DataConfig split fractions must be >= 0 and sum to 1, got {fracs} "
                            "(train_frac, val_frac, test_frac: set the three together)")
        if not self.sources:
            raise DataError("DataConfig.sources is empty; use ['stdlib'] for the default corpus")
        roles: dict[str, str] = {}
        for split, source in self.sources_by_split():
            key = source if source == "stdlib" else str(Path(source).expanduser().resolve())
            role = f"{split}_sources" if split else "sources"
            if roles.setdefault(key, role) != role:
                raise DataError(f"data source {source} is in both {roles[key]} and {role}")
        if (self.input_column is None) != (self.output_column is None) or (
                self.text_column and self.input_column):
            raise DataError("DataConfig: set text_column (code records) or input_column and "
                            "output_column (pairs), not both")
        if bad := [e for e in self.extensions if not (e.startswith(".") and len(e) > 1)]:
            fixed = [f".{e.lstrip('.')}" for e in bad if e.strip(".")] or [".kt"]
            raise DataError(f"DataConfig.extensions: {bad} must each be a suffix with its dot: "
                            f"{fixed}")
        if records := [e for e in self.extensions if e.lower() in RECORD_EXTENSIONS]:
            raise DataError(f"DataConfig.extensions: {records} are files of records, not code a "
                            "directory holds: give the files as sources (--data DIR/*.jsonl)")
        for name in ("fim_rate", "near_dedupe_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DataError(f"DataConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if (self.task == "fim" and self.fim_rate > 0 and self.max_prompt_tokens is not None
                and self.max_prompt_tokens < FIM_SENTINELS):
            raise DataError(f"DataConfig.max_prompt_tokens={self.max_prompt_tokens} leaves no room "
                            f"for the {FIM_SENTINELS} sentinels of a fim prompt (or fim_rate=0)")


# Lower bounds of numeric options (fractions and rates are checked against [0, 1] apart).
_MINIMUMS = {
    "block_size": 2, "num_workers": 1, "min_bytes": 0, "max_bytes": 0, "min_lines": 0,
    "max_line_length": 1, "max_literal_length": 1, "max_docs": 1,
    "max_prompt_tokens": 0, "max_completion_tokens": 1, "window_prompt_tokens": 1,
    "window_completion_tokens": 1, "window_stride": 0, "lines_per_file": 0,
    "docstring_min_tokens": 0, "docstring_code_tokens": 0,
}  # fmt: skip

CHOICES = {
    "task": TASKS,
    "split_by": ("repo", "file"),
    "completion_style": ("window", "line"),
    "docstring_targets": ("class", "function", "both"),
    "project_composer": PROJECT_COMPOSERS,
}


# Which fields key which cache; the rest are task options (dataset._task_options) or runtime
# knobs.
_RUNTIME_FIELDS = frozenset({"cache_dir", "use_cache", "num_workers", "progress"})
SPLIT_FIELDS = frozenset({"train_frac", "val_frac", "test_frac", "seed", "split_by"})
CLEANING_FIELDS = frozenset(
    {
        "sources", "val_sources", "test_sources", "extensions", "dedupe", "near_dedupe", "near_dedupe_threshold", "autopep8",
        "strip_license", "strip_comments", "strip_docstrings", "redact_secrets", "redact_emails", "min_bytes",
        "max_bytes", "min_lines", "max_line_length", "max_literal_length", "skip_bad", "max_docs",
        "text_column", "input_column", "output_column",
    }
)  # fmt: skip
