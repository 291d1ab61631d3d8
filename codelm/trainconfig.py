"""``TrainConfig``: every setting of a run, read from flags, a ``--config`` file or a resumed
run's config.json (``read_config``), the checks of its values together and of the run
directory it resumes (``check_config``), and preset auto's ladder of models
(``BUDGET_LADDER``). It builds nothing: codelm.training.plan checks the settings against the
model and data files they name, codelm.training.build builds."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from architecture import PRESETS, SHORT_DTYPES, ModelConfig
from codelm.data.config import (
    ALL_TASKS,
    GRPO_TASK,
    MAX_DEFAULT_CONTEXT,
    PREFERENCE_TASKS,
    TOKENIZER_KINDS,
    TOKENIZER_RANGES,
    DataConfig,
    TokenizerTraining,
    checkpoint_context,
)
from codelm.runs import rundir
from codelm.runs.checkpoint import check_run_paths, is_sharded
from codelm.runs.trackers import TRACKERS
from codelm.runtime import process, settings
from codelm.runtime.distributed import STRATEGIES
from codelm.runtime.settings import ValueRange, setting


@dataclass
class TrainConfig:
    """Everything a run needs; the defaults are the default run: the model, batch and schedule
    that fit 15 minutes on this machine, trained on the stdlib corpus."""

    # run directory
    name: str | None = None  # <out_dir>/<name>; default: <preset, or the --init-from
    #   directory's name>-<task>-<timestamp>[-2, -3, ... if taken]
    out_dir: str = "runs"  # the parent of run directories
    resume: str | None = None  # a run directory to continue from its latest checkpoint
    seed: int = 1337  # model init, data order, dropout (a resumed run restores its RNG)
    device: str = "auto"  # auto (a GPU where there is one, else the CPU; not mps) | cpu | cuda | cuda:N
    # model: from scratch (preset + overrides) or from a local HF checkpoint
    preset: str = "auto"  # architecture.PRESETS name (`python architecture.py` lists them;
    #   vocab_size follows the tokenizer); auto: the largest BUDGET_LADDER model this machine
    #   trains well in time_budget_min
    init_from: str | None = None  # an HF checkpoint: a local directory (a run's export/ or, of
    #   a LoRA run, its export/merged/, which --export-merged writes) or a hub id (the local hub
    #   cache, else downloaded)
    n_layer: int | None = None  # overrides the preset (from-scratch models only)
    n_head: int | None = None  # n_kv_head follows it unless model_options sets it
    n_embd: int | None = None  # model width
    mlp_hidden: int | None = None  # MLP width
    block_size: int | None = None  # length of training sequences (None: the preset's context,
    #   or the checkpoint's, at most 1024)
    dropout: float | None = None  # dropout of the embeddings and residual branches (default:
    #   the model's own); attention dropout: model_options {"attn_dropout": p}
    model_options: dict = field(default_factory=dict)  # any other ModelConfig field, e.g. init
    # tokenizer: a file/dir, else the model dir's, else a CodeTokenizer trained on the train split
    tokenizer: str | None = None  # a tokenizer.json / codelm tokenizer file or directory
    tokenizer_min_freq: int = TokenizerTraining.tokenizer_min_freq  # a trained tokenizer keeps
    #   pieces seen at least this often (11: more than 10 times; bpe: merges pairs seen at
    #   least this often)
    tokenizer_max_vocab: int | None = TokenizerTraining.tokenizer_max_vocab  # a trained
    #   tokenizer's cap on learned pieces (its byte and special tokens come on top)
    tokenizer_kind: str = TokenizerTraining.tokenizer_kind  # the tokenizer a from-scratch run
    #   trains: code (codelm's CodeTokenizer) or bpe (byte-level BPE in HF's tokenizer.json,
    #   StarCoder's pre-tokenizer and special tokens: transformers and llama.cpp read it, so
    #   GGUF export takes it)
    # LoRA (r = 0: full training) and a quantized frozen base (QLoRA)
    lora_r: int = 0  # adapter rank; needs init_from (a random base is not worth freezing)
    lora_alpha: float = 16.0  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_dora: bool = False  # DoRA: a learned magnitude per output row (PEFT's use_dora)
    lora_bias: str = "none"  # none | lora_only | all: biases trained and saved too (PEFT's bias)
    lora_modules_to_save: list[str] | None = None  # modules trained whole and saved with the
    #   adapter (PEFT's modules_to_save), e.g. lm_head
    lora_targets: list[str] | None = None  # module names, HF (q_proj) or codelm (qkv);
    #   default: the attention projections (qkv, attn.proj)
    init_adapter: str | None = None  # a LoRA adapter directory (PEFT's, or a LoRA run's
    #   export/) to train on; its adapter_config.json sets the base and the lora_* settings
    quantize_bits: int = 0  # 0, 8 (int8) or 4 (NF4): the frozen base's Linears but lm_head;
    #   needs lora_r > 0
    base_dtype: str = "fp32"  # fp32 | bf16 | fp16: dtype of the frozen base under LoRA (the
    #   adapters stay fp32; with quantize_bits, its unquantized weights); fp16 turns on loss
    #   scaling
    # data (dataset.py): task and sources (None: the Python standard library)
    task: str = "lm"  # lm (the next token of code files) | completion (100 tokens of a file
    #   -> its next 35; data_options {"completion_style": "line"}: a file's prefix -> its next
    #   line) | method (a function's signature and docstring -> its body) | docstring (a
    #   class without its docstring -> the docstring; functions too with data_options
    #   {"docstring_targets": "both"}) | refactor (JSONL input -> output pairs, the input
    #   prompted "### Refactor the following Python code to improve quality:\n\n{input}\n")
    #   | fim (fill in the middle) | chat (conversation JSONL, in the tokenizer's
    #   chat template) | project (repository-shaped sequences and cross-file line completion);
    #   grpo (reinforcement learning from problems' tests); or preference tuning on TRL's
    #   preference records: dpo | kto | orpo | simpo (JSONL of {"prompt", "chosen", "rejected"};
    #   kto also {"prompt", "completion", "label"}: docs/training.md, "Preference tuning")
    data: list[str] | None = None  # "stdlib", directories (git checkouts too), JSONL of code,
    #   pairs or conversations, parquet files, datasets save_to_disk directories, hub dataset ids
    val_data: list[str] | None = None  # predefined validation files (None: split from data)
    test_data: list[str] | None = None  # predefined test files (None: split from data)
    data_options: dict = field(default_factory=dict)  # further DataConfig fields for the task:
    #   dataset.py --help lists each (--docstring-prompt as "docstring_prompt"), and prints what
    #   they build
    # GRPO (task grpo: codelm.training.rollout): G samples a problem, rewarded by its test
    problems: str | None = None  # task grpo: the problems sampled for (HumanEval-format JSONL)
    val_problems: str | None = None  # task grpo: held-out problems whose greedy pass@1 each
    #   evaluation scores (None: the first eval_examples of problems)
    num_generations: int = 8  # G: completions sampled a problem, compared within their group
    grpo_loss_type: str = "dapo"  # grpo | dr_grpo | dapo | bnpo | cispo (TRL's loss_type)
    grpo_beta: float = 0.0  # the KL term's weight (TRL's beta); the reference is the starting
    #   model (under LoRA its base with the adapters off; else a frozen copy)
    epsilon_low: float = 0.2  # the ratio clipped below at 1 - epsilon_low (TRL's epsilon)
    epsilon_high: float | None = None  # ... above at 1 + epsilon_high (None: epsilon_low;
    #   cispo: the ratio's cap, e.g. 5.0)
    scale_rewards: str = "group"  # group | batch | none: advantages over the reward spread
    mask_truncated: bool = False  # completions cut at max_completion_tokens count for nothing
    max_completion_tokens: int = 128  # new tokens a sampled completion may have
    temperature: float = 1.0  # sampling temperature (the loss's log-probs are at it too)
    partial_credit: bool = False  # reward: the share of the test's asserts that pass (else 1
    #   for a pass, 0 for a fail)
    shuffle_rewards: bool = False  # control arm: the rewards permuted within each step's batch
    reward_workers: int = 2  # sandboxed tests run at once
    reward_timeout_s: float = 5.0  # a test's wall-clock limit in the sandbox
    # optimisation
    batch_size: int | None = None  # sequences per micro-batch (per process); None: preset auto's
    #   choice, else 4. Preference tasks: pairs (kto: completions) per micro-batch; grpo:
    #   problems per optimizer step, each sampled num_generations times
    grad_accum: int = 1  # micro-batches per optimizer step, weighted by their tokens; grpo: the
    #   micro-batches a step's completions are split into
    packing: bool | None = None  # pair and chat tasks: several examples in each row of
    #   block_size tokens, each attending only to itself (batch_size then counts rows); None:
    #   where it pays (examples averaging at most half a row); lm (not by default): each file of
    #   a window attends only to itself
    max_steps: int | None = None  # optimizer steps; None: epochs, else time_budget_min's
    epochs: float | None = None  # the run's length in passes over the data (not with max_steps)
    optimizer: str | None = None  # adamw | muon (Muon on the blocks' matrices, AdamW on the
    #   rest: codelm.training.optim); None: preset auto's choice, else adamw
    lr: float | None = None  # peak learning rate; None: preset auto's choice, else 1e-3
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup_steps: int | None = None  # linear warmup, then the decay; None: 2% of a budgeted
    #   run's steps, else 50, or a tenth of a run shorter than 500 steps (config.json records it)
    decay_steps: int | None = None  # None: cosine from the warmup to the end; N: the peak lr
    #   holds until the last N steps, which decay it (warmup-stable-decay); a budgeted run's
    #   is a fifth of its steps, re-timed on the clock when it starts
    weight_decay: float = 0.1  # decoupled; matrices only (not norms, biases)
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.95  # AdamW's second-moment decay
    adam_eps: float = 1e-8  # AdamW's epsilon
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)
    label_smoothing: float = 0.0  # training only; validation reports the true NLL; dpo
    #   (pref_loss_type robust) and simpo: the chance a pair's label is flipped (TRL's)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on GPUs with native bf16, fp16
    #   on older ones such as the T4, fp32 on CPU; preset auto: bf16 on a CPU measured faster in it)
    eval_precision: str = "fp32"  # fp32 (no autocast) | same (as training); FSDP in bf16
    #   gathers bf16 weights for validation too
    compile: bool = False  # torch.compile the model
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory
    offload_activations: bool = False  # with gradient_checkpointing on a GPU: the blocks' saved
    #   inputs kept in pinned host memory (less GPU memory, a copy each way; on a CPU a no-op)
    force: bool = False  # train on where the step-cost check before the first step refuses
    #   (activations beyond the memory free; a step over 5 minutes or a twentieth of the budget)
    strategy: str = "ddp"  # under torchrun: ddp (every process holds the whole model and
    #   optimizer) | fsdp (FSDP2: each holds 1/N of the weights, gradients and optimizer state;
    #   sharded checkpoints)
    # preference tuning (task dpo, kto, orpo, simpo: TRL 1.16's losses, their defaults)
    pref_beta: float = 0.1  # dpo, kto: how far the policy may stray from the reference (ipo:
    #   its tau); simpo: the reward's scale (2.0 to 2.5 in the paper)
    pref_loss_type: str = "sigmoid"  # dpo's loss: sigmoid | ipo | hinge | robust
    kto_desirable_weight: float = 1.0  # kto: the weight of a desirable completion's loss
    kto_undesirable_weight: float = 1.0  # kto: the weight of an undesirable one's loss
    orpo_lambda: float = 0.1  # orpo: the odds-ratio term's weight beside the chosen's NLL
    simpo_gamma: float = 0.5  # simpo: the target margin of the rewards
    cpo_alpha: float = 0.0  # simpo: the weight of the chosen completions' NLL (CPO's term)
    # evaluation, logging, checkpoints
    eval_every: int = 175  # steps between evaluations (none before warmup_steps; one at the end)
    eval_examples: int | None = 80  # the validation split's first examples scored at each
    #   evaluation (None: the whole split)
    early_stop_patience: int = 0  # evaluations without improvement before stopping; 0: never
    early_stop_min_delta: float = 0.0  # a smaller fall of the validation loss is no improvement
    log_every: int = 10  # steps between metrics.jsonl / tracker lines
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # trackers fed the
    #   same scalars and the config: any of tensorboard, wandb, mlflow; or none
    save_every: int | None = None  # default: eval_every
    keep_last: int = 2  # step checkpoints kept (best/ is kept apart)
    time_budget_min: float | None = 15.0  # minutes for the whole run (data preparation and the
    #   final evaluation included) when max_steps and epochs are unset: the steps follow from
    #   this machine's measured step time, so the schedule ends on time; config.json records the
    #   steps (and preset auto's choices) instead. Preset auto sizes the model to it either way
    max_time_s: float | None = None  # wall-clock budget; the run checkpoints and ends cleanly
    progress: bool = True  # a progress bar
    # end of run
    export: bool = True  # write export/: HF model + tokenizer, or the PEFT adapter
    export_merged: bool = False  # under LoRA: also write the merged full model
    export_gguf: str | None = None  # also write export/model.gguf (LoRA merged) and an Ollama
    #   Modelfile, for llama.cpp, Ollama and LM Studio, matrices in f32 | f16 | bf16 | q8_0
    sample_prompt: str | None = None  # completed greedily at the end (with --export); None: a
    #   held-out prompt in the task's format (a function's header, a validation pair's input)
    sample_tokens: int = 96  # at most this many tokens of that sample; 0: no sample
    final_eval: bool = True  # a run of task lm that trains every weight (not LoRA), with
    #   export: line and function completion (eval.py's line and method tasks) on the test
    #   split, printed with the val loss
    # debugging
    overfit: bool = False  # train on the bundled tiny corpus until it is memorised
    overfit_batches: int = 0  # overfit K batches of the real training data (0: off); with it,
    #   where not given: preset auto's smallest rung, untimed (--preset), at most 400 steps
    #   (OVERFIT_STEPS; --max-steps), no export, sample or final evaluation (--export)
    inject_nan_at_step: int | None = None  # fault injection: make this step's loss NaN

    def __post_init__(self) -> None:
        # data_options as DataConfig holds them: a list key's one item alone made a list
        if isinstance(self.data_options, dict):
            self.data_options = settings.option_values(DataConfig, self.data_options)
        self.out_dir = settings.home_expanded(self.out_dir)

    @property
    def run_stem(self) -> str:
        """What an unnamed new run's directory is called before its timestamp."""
        model = Path(self.init_from).name if self.init_from else self.preset
        return f"{model}-{self.task}"


# The optimizers a run trains with (codelm.training.optim builds them).
OPTIMIZERS = ("adamw", "muon")

# Each key's values. Those of a loss or a writer repeat its own tuple (named beside them), which
# this module, below the builders, does not import: a test pins each equal to its own.
_CHOICES = {
    "task": ALL_TASKS,
    "optimizer": OPTIMIZERS,
    "tokenizer_kind": TOKENIZER_KINDS,
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "eval_precision": ("fp32", "same"),
    "quantize_bits": (0, 4, 8),
    "base_dtype": tuple(SHORT_DTYPES),
    "lora_bias": ("none", "lora_only", "all"),
    "pref_loss_type": ("sigmoid", "ipo", "hinge", "robust"),  # preference.DPO_LOSS_TYPES
    "strategy": STRATEGIES,
    "export_gguf": ("f32", "f16", "bf16", "q8_0"),  # codelm.models.families.OUTTYPES
    "grpo_loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo"),  # grpo.LOSS_TYPES
    "scale_rewards": ("group", "batch", "none"),  # grpo.SCALE_REWARDS
}


_DEFAULTS = TrainConfig()  # each field's default, as is_set compares


def is_set(cfg: TrainConfig, key: str) -> bool:
    """Whether ``cfg`` gives ``key`` a value other than TrainConfig's default."""
    return getattr(cfg, key) != getattr(_DEFAULTS, key)


def config_from_dict(values: dict, source: str = "<dict>") -> TrainConfig:
    """A TrainConfig from a dict, nested options included; errors name the source and key."""
    cfg = settings.config_from_dict(TrainConfig, values, source, _CHOICES, HF_FLAGS)
    check_options(values, source)
    if cfg.max_steps is not None and cfg.epochs is not None:  # flags: check_config's check
        raise ValueError(f"{source}: max_steps and epochs both set the run's length: set one "
                         "of them to null")
    return cfg


def load_config_file(path: str | os.PathLike) -> dict:
    """The checked TrainConfig values of a JSON file (a recipe's ``train`` section)."""
    values, source = settings.read_config_file(path, "train")
    config_from_dict(values, source)
    return values


def _resumed_config(run: Path) -> dict:
    """The checked config.json of the run ``--resume`` names; a damaged one names the copy its
    newest checkpoint holds, which restores it."""
    try:
        return load_config_file(run / rundir.CONFIG_FILE)
    except ValueError as err:
        copies = [c / rundir.CONFIG_FILE for c in rundir.list_checkpoints(run)]
        readable = [copy for copy in copies if _reads_as_config(copy)]
        if not readable:
            raise
        raise ValueError(f"{err}; its newest checkpoint holds the run's settings: copy "
                         f"{readable[-1]} over it") from None


def _reads_as_config(path: Path) -> bool:
    """Whether a checkpoint's copy of its run's config.json is intact and reads."""
    if not path.is_file() or process.manifest_problem(path.parent, [rundir.CONFIG_FILE]):
        return False
    try:
        load_config_file(path)
    except ValueError:
        return False
    return True


# Hugging Face Trainer's spellings of the same settings: accepted, not shown by --help.
HF_FLAGS = {"lr": ["--learning_rate"], "batch_size": ["--per_device_train_batch_size"],
            "grad_accum": ["--gradient_accumulation_steps"], "epochs": ["--num_train_epochs"],
            "grad_clip": ["--max_grad_norm"], "warmup_steps": ["--warmup_steps"],
            "weight_decay": ["--weight_decay"], "max_steps": ["--max_steps"],
            "log_every": ["--logging_steps"], "eval_every": ["--eval_steps"],
            "save_every": ["--save_steps"], "out_dir": ["--output_dir"],
            "gradient_checkpointing": ["--gradient_checkpointing"]}


def build_parser() -> argparse.ArgumentParser:
    """argparse flags mirroring TrainConfig (``--lora-r``), plus ``--config FILE.json``."""
    parser = settings.ArgumentParser(
        prog="trainingmanager.py",
        description="Train a codelm model: from scratch, fine-tuning or LoRA. Flags override "
        "--config; with no flags, trains the from-scratch code model on the stdlib corpus.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="JSON or YAML file of TrainConfig keys, or a recipe "
                        "(configs/*.json) whose 'train' section is read; flags override it")
    settings.add_print_config(parser)
    for precision in ("fp16", "bf16"):  # HF Trainer's switches
        parser.add_argument(f"--{precision}", dest="precision", action="store_const",
                            const=precision, help=argparse.SUPPRESS)
    return settings.add_config_flags(parser, TrainConfig, _CHOICES, aliases=HF_FLAGS)


class ReadConfig(NamedTuple):
    cfg: TrainConfig
    typed: set[str]  # the keys the command line or its --config file gave, defaults included
    #   (with --resume: those given a value other than the run's config.json holds)
    resume_name: str | None = None  # --resume as given, where it named a run under --out-dir


def read_config(argv: Sequence[str] | None = None) -> ReadConfig:
    """Defaults < ``--resume`` run's config.json < ``--config`` file < command-line flags, each
    value of its type (codelm.training.plan.parse_config checks them together and against the
    files)."""
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    given = load_config_file(config) if config is not None else {}
    resumed: dict = {}
    flag_gave_resume = args.get("resume") is not None
    resume_given = args["resume"] if flag_gave_resume else given.get("resume")
    out_dir = args["out_dir"] if args.get("out_dir") is not None else given.get("out_dir")
    resume = resume_dir(resume_given, out_dir)
    named_under_out_dir = resume != resume_given
    if resume:  # a config file's ~ (or --resume=~/...), which no shell expands
        resume = os.path.expanduser(resume)
    if resume != resume_given:  # a run's name under out_dir, or ~: its path in its place
        if flag_gave_resume:
            args["resume"] = resume
        else:
            given["resume"] = resume
    if resume and Path(resume).is_dir():  # else check_config says so
        check_resume_location(resume, args, given, config)
        run, saved = Path(resume), Path(resume) / rundir.CONFIG_FILE
        if not saved.is_file():
            raise ValueError(f"--resume {run}: no {rundir.CONFIG_FILE}: not a run directory, or "
                             "its run is starting or stopped before writing it (nothing to "
                             "resume: run the command that started it again)")
        resumed = _resumed_config(run)
        # the paths it gives the run must exist (its own copy of an adapter's config replaces it)
        owned = ("init_adapter",) if rundir.adapter_copy(run) else ()
        paths = ("init_from", "init_adapter", "data", "val_data", "test_data")
        unset_here = [k for k in paths if k not in {*args, *given, *owned}]
        models = [k for k in unset_here if k in ("init_from", "init_adapter")]
        data = [k for k in unset_here if k not in models]
        for keys, why in ((models, ""), (data, " (a corpus names its documents by their paths)")):
            try:
                check_run_paths(resumed, keys, str(saved))
            except ValueError as err:
                raise ValueError(f"{err}: a resumed run reads the files it trained with where "
                                 f"they were{why}; put it back there, or link it there") from None
    base = {**resumed, **settings.updated_over(resumed, given)}
    _length_typed_over(args, base, f"--config {config}" if config else "", given)
    cfg = settings.resolve_config(TrainConfig, args, "train", base=base,
                                   choices=_CHOICES, aliases=HF_FLAGS)
    # the flags' options as they update those below them (load_config_file checks the file's)
    check_options({key: getattr(cfg, key) for key in ("data_options", "model_options")
                   if key in args})
    return ReadConfig(cfg, _changed_keys(cfg, {*args, *given}, resumed),
                      resume_given if named_under_out_dir else None)


def _changed_keys(cfg: TrainConfig, typed: set[str], resumed: dict) -> set[str]:
    """The keys of ``typed`` whose value in ``cfg`` is not the one the resumed run's
    config.json (``resumed``; empty: no resume) holds, compared as JSON holds them: the run's
    own value typed again changes nothing."""
    values = json.loads(json.dumps(dataclasses.asdict(cfg)))
    return {key for key in typed if key not in resumed or values.get(key) != resumed[key]}


# The two keys that set a run's length, each with the other one it replaces where given.
OTHER_LENGTH = {"max_steps": "epochs", "epochs": "max_steps"}


def _length_typed_over(args: dict, base: dict, config: str, given: dict) -> None:
    """A run length typed on the command line (--max-steps or --epochs) replaces the other one
    the --config file or the resumed run's config.json sets, as a flag overrides a file (said
    on stderr): ``base`` loses it."""
    for typed, other in OTHER_LENGTH.items():
        if args.get(typed) is None or other in args or base.get(other) is None:
            continue
        where = config if other in given else "the resumed run's config.json"
        if process.is_rank_zero():
            print(f"note: {settings.flag_of(typed)} {args[typed]} sets the run's length in place "
                  f"of {other} {base[other]} ({where})", file=sys.stderr)
        base[other] = None


def resume_dir(resume: str | None, out_dir: str | None) -> str | None:
    """--resume's run directory: ``resume``, or the run of that name under ``out_dir`` (runs/
    where None) where ``resume`` names nothing here."""
    if not resume:
        return resume
    under = rundir.named_run(resume, out_dir or TrainConfig.out_dir)
    return resume if under is None else str(under)


def check_resume_location(resume_given: str, args: dict, given: dict, config: str | None
                          ) -> None:
    """A ``--name`` / ``--out-dir`` given beside ``--resume`` (``resume_given``, the flag's or
    the --config file's) must name that run's directory."""
    resume = Path(resume_given).expanduser()
    values = {k: args[k] if args.get(k) is not None else given.get(k) for k in ("name", "out_dir")}
    named = (Path(values["out_dir"] or resume.parent).expanduser()
             / (values["name"] or resume.name))
    set_by = [k for k in ("name", "out_dir") if values[k] is not None]
    if not set_by or named.resolve() == resume.resolve():
        return
    said = " ".join(f"{settings.flag_of(k)} {args[k]}" if args.get(k) is not None
                    else f"{k} {given[k]!r} in --config {config}" for k in set_by)
    raise ValueError(f"--resume {resume_given} continues that run, but {said} names another "
                     f"run ({named}): drop {said} to continue {resume_given}, or drop "
                     "--resume to start a new run there")


# Keys that mean something only under LoRA (lora_r > 0): set without it, they are refused.
LORA_ONLY_KEYS = ("lora_alpha", "lora_dropout", "lora_dora", "lora_bias", "lora_modules_to_save",
                  "lora_targets", "export_merged")


def check_run_name(name: str | None, what: str) -> None:
    """A run's name is one directory name in out_dir: a path put the run elsewhere (outside it
    with '..', or nested where eval.py's ``latest_run`` never looks). ``what`` names the setting."""
    if name and (Path(name).name != name or name in (".", "..")):
        raise ValueError(f"{what}: a run name, not a path (no path separator, and not '.' or "
                         "'..'); --out-dir sets the directory the run goes in")
    if name == rundir.EVAL_DIR:
        raise ValueError(f"{what}: {name!r} is where eval.py keeps its results; name the run "
                         "otherwise")


# The settings' own ranges (a key left unset, None, passes); a trained tokenizer's are its own.
VALUE_RANGES = (
    ValueRange(("batch_size", "grad_accum", "max_steps", "eval_every", "log_every", "keep_last",
                "decay_steps", "inject_nan_at_step", "save_every", "eval_examples"),
               lambda v: v >= 1, "must be >= 1"),
    ValueRange(("warmup_steps", "early_stop_patience", "sample_tokens", "weight_decay",
                "grad_clip", "early_stop_min_delta", "lora_r", "overfit_batches"),
               lambda v: v >= 0, "must be >= 0"),
    ValueRange(("lr", "adam_eps", "epochs", "max_time_s", "time_budget_min"), lambda v: v > 0,
               "must be > 0"),
    ValueRange(("beta1", "beta2", "label_smoothing", "dropout", "lora_dropout"),
               lambda v: 0 <= v < 1, "must be in [0, 1)"),
    *TOKENIZER_RANGES,
)


def check_values(cfg: TrainConfig, where_set: Callable[[str], str] = settings.flag_of,
                 only: Collection[str] | None = None) -> None:
    """Each float finite ("inf" and "nan" parse as floats; nan fails every comparison) and each
    value in its VALUE_RANGES range (``only``: these keys alone), naming the key, its value and
    where it was set."""
    keys = [f.name for f in dataclasses.fields(cfg) if only is None or f.name in only]
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{setting(cfg, key, where_set)}: must be finite")
    settings.check_ranges(cfg, VALUE_RANGES, where_set, only)


def check_config(cfg: TrainConfig, where_set: Callable[[str], str] = settings.flag_of
                 ) -> None:
    """Reject impossible settings, naming each key, its value and where it was set (an
    init_adapter's settings already read: plan.validate_config), and a --resume that names no
    run directory or a step past max_steps."""

    def named(key: str) -> str:
        return setting(cfg, key, where_set)

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{named(key)}: {why}")

    check_values(cfg, where_set)
    trackers = set(cfg.report_to)
    need(trackers <= set(TRACKERS) | {"none"} and not ("none" in trackers and len(
        trackers) > 1), "report_to", f"name trackers of {sorted(TRACKERS)}, or none alone")
    for name in trackers - {"none", "tensorboard"}:
        need(importlib.util.find_spec(name) is not None, "report_to",
             f"{name} is not installed: pip install {name}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, "min_lr_ratio", "must be in [0, 1]")
    need(cfg.decay_steps is None or cfg.max_steps is None
         or cfg.decay_steps <= cfg.max_steps - (cfg.warmup_steps or 0), "decay_steps",
         f"exceeds max_steps ({cfg.max_steps}) less warmup_steps ({cfg.warmup_steps}): the "
         "decay follows the warmup; set at most the steps between them")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise ValueError(f"{named('max_steps')} and {named('epochs')} both set the run's length: "
                         "unset one (--max-steps none, --epochs none)")
    need(cfg.time_budget_min is not None or cfg.max_steps or cfg.epochs, "time_budget_min",
         "unset, and so are max_steps and epochs: set one of them, the run's length")
    resumed = cfg.resume is not None and (Path(cfg.resume) / rundir.CONFIG_FILE).is_file()
    chosen_elsewhere = cfg.init_from is not None or resumed  # a checkpoint or run names the model
    need(cfg.preset != "auto" or chosen_elsewhere or cfg.time_budget_min is not None,
         "preset", f"auto chooses the model for {named('time_budget_min')}: set a budget, or "
         f"name a preset of {sorted(PRESETS)}")
    need(cfg.optimizer != "muon" or cfg.lora_r == 0, "optimizer",
         "muon trains whole weight matrices: LoRA adapters train with adamw")
    need(not cfg.offload_activations or cfg.gradient_checkpointing, "offload_activations",
         f"offloads what gradient checkpointing saves, and {named('gradient_checkpointing')} "
         "is off: set it too")
    need(cfg.lora_alpha != 0, "lora_alpha", "must not be 0: the adapters would never train")
    need(cfg.lora_r == 0 or cfg.init_from is not None, "lora_r",
         f"LoRA needs a pretrained base (init_from, {where_set('init_from')}): a from-scratch "
         "model has nothing frozen worth keeping, so only the adapters of a random model would "
         "train; set init_from, or lora_r 0 to train every weight")
    on_a_base = "" if cfg.init_from is not None else f" and init_from ({where_set('init_from')})"
    need(cfg.quantize_bits == 0 or cfg.lora_r > 0, "quantize_bits",
         f"a quantized base is frozen: it needs LoRA, but {named('lora_r')} trains every "
         f"weight: set lora_r > 0{on_a_base}")
    need(cfg.base_dtype == "fp32" or cfg.lora_r > 0, "base_dtype",
         f"only a frozen base can be held in 16 bits, and {named('lora_r')} trains every "
         f"weight (in fp32): set lora_r > 0 for LoRA, or precision bf16 "
         f"({where_set('precision')}) for 16-bit compute")
    lora_only = [named(k) for k in LORA_ONLY_KEYS if is_set(cfg, k)]
    if lora_only and cfg.lora_r == 0:  # else a full fine-tune would run, ignoring them
        raise ValueError(f"{', '.join(lora_only)}: LoRA settings, but {named('lora_r')} trains "
                         "every weight: set lora_r > 0, or drop them")
    check_strategy(cfg, named)
    check_preference_task(cfg, named)
    need(cfg.export_gguf is None or cfg.export, "export_gguf",
         f"writes into export/, and {named('export')} is off: turn it on, or set export_gguf none")
    trains_tokenizer = cfg.init_from is None and cfg.tokenizer is None
    need(cfg.export_gguf is None or not trains_tokenizer or cfg.tokenizer_kind == "bpe",
         "export_gguf", "a from-scratch run trains codelm's CodeTokenizer, whose greedy pieces "
         f"llama.cpp cannot run: set tokenizer_kind bpe ({where_set('tokenizer_kind')}), or "
         f"tokenizer ({where_set('tokenizer')}) to an HF BPE tokenizer.json, or export_gguf none")
    need(cfg.tokenizer_kind == "code" or trains_tokenizer,
         "tokenizer_kind", "names the tokenizer a from-scratch run trains, and this run's comes "
         "from init_from or tokenizer: drop it")
    need(0 <= cfg.seed < 2**63, "seed", "must be in [0, 2**63)")
    check_grpo(cfg, named)
    check_run_name(cfg.name, named("name"))
    if cfg.resume is None:
        return
    run = Path(cfg.resume)
    if not run.is_dir():
        raise ValueError(f"--resume {cfg.resume}: no such run directory (here, or under "
                         f"--out-dir {cfg.out_dir})")
    if is_sharded(run) or any((run / f).is_file() for f in (rundir.MODEL_FILE,
                                                             rundir.ADAPTER_FILE)):
        # a checkpoint's, best/'s or export/'s config.json made it look like a run with no
        # checkpoint yet: a whole new run started inside it
        owner = run.parent.parent if run.parent.name == rundir.CHECKPOINTS_DIR else run.parent
        raise ValueError(f"--resume {cfg.resume}: weights (a checkpoint, best/ or export/), not "
                         f"a run directory: --resume {owner} continues that run from its newest "
                         "checkpoint")
    if cfg.max_steps is not None:  # epochs: checked once the data is known
        step = max(map(rundir.checkpoint_step, rundir.list_checkpoints(run)), default=0)
        need(step <= cfg.max_steps, "max_steps", f"below the step of the checkpoint it resumes "
             f"from ({step}); a resume can only extend its run: set max_steps to {step} or more")


# Keys that mean something only to task grpo: set for another task, they are refused.
GRPO_KEYS = ("problems", "val_problems", "num_generations", "grpo_loss_type", "grpo_beta",
             "epsilon_low", "epsilon_high", "scale_rewards", "mask_truncated",
             "max_completion_tokens", "temperature", "partial_credit", "shuffle_rewards",
             "reward_workers", "reward_timeout_s")


def check_grpo(cfg: TrainConfig, named: Callable[[str], str]) -> None:
    """Task grpo's settings; the GRPO settings refused under any other task."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ValueError(f"{named(key)}: {why}")

    if cfg.task != GRPO_TASK:
        if given := [named(k) for k in GRPO_KEYS if is_set(cfg, k)]:
            raise ValueError(f"{', '.join(given)}: GRPO settings, but {named('task')} is not "
                             f"{GRPO_TASK}: set task {GRPO_TASK}, or drop them")
        return
    need(cfg.problems is not None, "problems", "task grpo samples completions of problems and "
         "rewards them by their tests: set problems to a HumanEval-format JSONL (python -m "
         "codelm.data.problems --n 200 --seed 0 --out FILE writes one)")
    need(cfg.num_generations >= 2, "num_generations", "GRPO compares each completion with the "
         "others of its problem: set 2 or more (8 is usual)")
    need(cfg.max_steps is not None or cfg.epochs is not None, "max_steps",
         "unset, and so is epochs: task grpo has no time budget (a step's time depends on what "
         "the model writes): set max_steps or epochs")
    need(cfg.data is None and not cfg.val_data and not cfg.test_data, "data",
         "task grpo trains on problems, not data: drop data, val_data and test_data (set "
         "problems and val_problems)")
    need(not cfg.overfit_batches, "overfit_batches", "a supervised check: task grpo has none")
    need(not cfg.packing, "packing", "task grpo pads each prompt and its sampled completions "
         "in their batch: drop packing")
    need(int(os.environ.get("WORLD_SIZE", "1")) <= 1, "task",
         "task grpo runs on one process: start it without torchrun")
    need(0 <= cfg.epsilon_low < 1, "epsilon_low", "must be in [0, 1): the ratio's lower clip "
         "is 1 - epsilon_low")
    need(cfg.epsilon_high is None or cfg.epsilon_high >= 0, "epsilon_high", "must be >= 0")
    high = cfg.epsilon_low if cfg.epsilon_high is None else cfg.epsilon_high
    need(cfg.grpo_loss_type != "cispo" or high >= 1, "epsilon_high",
         "loss cispo caps the ratio at epsilon_high (below 1 it caps every on-policy token): "
         "set it to eps_max, e.g. 5.0")
    ranges = ((("grpo_beta",), lambda v: v >= 0, "must be >= 0"),
              (("max_completion_tokens", "reward_workers"), lambda v: v >= 1, "must be >= 1"),
              (("temperature", "reward_timeout_s"), lambda v: v > 0, "must be > 0"))
    for keys, test, why in ranges:
        for key in keys:
            need(test(getattr(cfg, key)), key, why)


# Keys that mean something only to a preference task: set under another task, refused.
PREFERENCE_ONLY_KEYS = ("pref_beta", "pref_loss_type", "kto_desirable_weight",
                        "kto_undesirable_weight", "orpo_lambda", "simpo_gamma", "cpo_alpha")


def check_preference_task(cfg: TrainConfig, named: Callable[[str], str]) -> None:
    """A preference task's needs (its data, a tokenizer; kto no packing); its settings under no
    other task. Its loss settings together: codelm.training.plan (preference.config_of)."""
    if cfg.task not in PREFERENCE_TASKS:
        if given := [named(k) for k in PREFERENCE_ONLY_KEYS
                     if is_set(cfg, k)]:
            raise ValueError(f"{', '.join(given)}: preference settings, but {named('task')} "
                             f"is not one of {', '.join(PREFERENCE_TASKS)}: drop them")
        return
    if not cfg.data:
        raise ValueError(f"{named('task')}: trains on preference records (TRL's prompt, chosen, "
                         "rejected; kto: prompt, completion, label): name them with --data "
                         "FILE.jsonl (or parquet, a datasets directory, a dataset id)")
    if cfg.init_from is None and cfg.tokenizer is None:
        raise ValueError(f"{named('task')}: tunes a model's preferences: set init_from "
                         "(--init-from: the model, its tokenizer with it), or tokenizer "
                         "(--tokenizer) for a model from scratch")
    if cfg.packing and cfg.task == "kto":
        raise ValueError(f"{named('packing')}: the kto task reads its KL rows apart from its "
                         "completions, so it pads each in its batch: drop packing (dpo, orpo "
                         "and simpo pack)")
    if cfg.test_data:
        raise ValueError(f"{named('test_data')}: the {cfg.task} task has no test split: "
                         "score the export with eval.py")


def check_strategy(cfg: TrainConfig, named: Callable[[str], str]) -> None:
    """--strategy fsdp: under torchrun, and with the settings its sharding can hold."""
    if cfg.strategy != "fsdp":
        return
    fsdp = named("strategy")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise ValueError(f"{fsdp}: shards the model over torchrun's processes: start the run "
                         "with torchrun --nproc_per_node N (docs/training.md), or use "
                         "--strategy ddp")
    takes = (  # (key, the values fsdp takes, why no other, with the way on)
        ("base_dtype", ("fp32",), "fsdp gathers the base in the run's precision (bf16 under "
         "--precision bf16): leave base_dtype fp32"),
        ("optimizer", (None, "adamw"), "muon orthogonalizes whole matrices, fsdp holds shards "
         "of them: use adamw"),
        ("compile", (False,), "fsdp runs eager: drop compile"),
    )
    for key, values, why in takes:
        if getattr(cfg, key) not in values:
            raise ValueError(f"{named(key)} with {fsdp}: {why}")


# DataConfig keys that TrainConfig keys set (DataConfig -> TrainConfig): data_options may not.
_DATA_KEYS_OF_TRAIN = {"task": "task", "sources": "data", "val_sources": "val_data",
                       "test_sources": "test_data", "block_size": "block_size"}


def check_options(values: dict, source: str | None = None) -> None:
    """The data_options and model_options of ``values`` checked on their own, so that errors
    name ``source`` (a --config file), else their flags."""
    for key, check in (("data_options", _check_data_options),
                       ("model_options", _check_model_options)):
        if isinstance(values.get(key), dict):  # else config_from_dict names the type
            check(values[key], f"{source}: {key}" if source else settings.flag_of(key))


def _check_data_options(options: dict, where: str) -> None:
    """Keys DataConfig has and no TrainConfig key sets; values as DataConfig validates them."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    for key in options:
        if key in _DATA_KEYS_OF_TRAIN:
            raise ValueError(f"{where}: set {key!r} with the TrainConfig key "
                             f"{_DATA_KEYS_OF_TRAIN[key]!r} instead")
        if key not in known:
            raise ValueError(f"{where}: unknown DataConfig key {key!r}; "
                             + settings.key_hint(key, known - set(_DATA_KEYS_OF_TRAIN),
                                                  "DataConfig"))
    data_cfg = settings.config_from_dict(DataConfig, options, where)  # errors name `where`
    try:
        data_cfg.validate()  # its task and sources at their defaults
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def has_final_eval(cfg: TrainConfig) -> bool:
    """Whether the run ends with eval.py's line and function tasks: a code model, exported."""
    return cfg.final_eval and cfg.export and cfg.task == "lm" and cfg.lora_r == 0


def default_block_size(cfg: TrainConfig | DataSettings) -> int:
    """The preset's context from scratch; with init_from its context, at most
    MAX_DEFAULT_CONTEXT (``checkpoint_context``)."""
    if cfg.init_from is None:
        return PRESETS[cfg.preset].block_size  # plan.validate_config checked the preset
    return checkpoint_context(cfg.init_from) or MAX_DEFAULT_CONTEXT


def data_config(cfg: TrainConfig | DataSettings, block_size: int | None = None) -> DataConfig:
    """The DataConfig of this run: task, sources and sequence length come from cfg (None: the
    DataConfig's, where the length does not matter yet, as to check the sources)."""
    options = {"progress": cfg.progress, **cfg.data_options}
    if block_size is not None:
        options["block_size"] = block_size
    dcfg = DataConfig(task=cfg.task, sources=list(cfg.data or ["stdlib"]),
                      val_sources=list(cfg.val_data or []), test_sources=list(cfg.test_data or []),
                      **options)
    dcfg.validate()
    return dcfg


# The model_options a model loaded with --init-from takes (its config.json fixes the others).
LOADED_MODEL_OPTIONS = ("attn_dropout", "dropout", "embd_dropout")

# ModelConfig keys the tokenizer sets: model_options may not.
TOKENIZER_MODEL_KEYS = ("vocab_size", "bos_id", "eos_id")


def _check_model_options(options: dict, where: str) -> None:
    """Each key a ModelConfig key the tokenizer does not set, each value of its type."""
    hints = typing.get_type_hints(ModelConfig)
    for key, value in options.items():
        if key not in hints:
            raise ValueError(f"{where}: unknown ModelConfig key {key!r}; "
                             + settings.key_hint(key, hints, "ModelConfig"))
        if key in TOKENIZER_MODEL_KEYS:
            raise ValueError(f"{where}: {key!r} comes from the tokenizer (its vocabulary "
                             "and special tokens); choose the tokenizer instead (--tokenizer, "
                             "--tokenizer-max-vocab)")
        if problem := settings.type_error(hints[key], value):
            raise ValueError(f"{where}: key {key!r} {problem}")


# Preset auto: the from-scratch models a time budget chooses from, smallest first, each with the
# context, batch, peak learning rate and optimizer the budget sweep found best for it
# (docs/benchmarks.md, the budget sweep).
# A budget takes the largest model that still trains on plan.TOKENS_PER_PARAM tokens per
# parameter in its minutes on the machine it runs on (each step time measured there).
BUDGET_LADDER = (
    {"preset": "code-3x128", "block_size": 256, "batch_size": 8, "lr": 1.5e-3},
    {"preset": "code-4x160", "block_size": 256, "batch_size": 8, "lr": 1.5e-3},
    {"preset": "code-4x192", "block_size": 256, "batch_size": 16, "lr": 3e-3, "optimizer": "muon"},
    {"preset": "code-6x256", "block_size": 512, "batch_size": 16, "lr": 1e-3},
    {"preset": "llama-14m", "block_size": 512, "batch_size": 16, "lr": 1e-3},
    {"preset": "llama-60m", "block_size": 1024, "batch_size": 32, "lr": 6e-4},
)


# TrainConfig keys that override a preset's ModelConfig (from-scratch models).
MODEL_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "mlp_hidden", "block_size", "dropout")


def model_config(cfg: TrainConfig | ModelSettings, vocab_size: int, bos_id: int | None,
                 eos_id: int | None) -> ModelConfig:
    """Preset + overrides for a from-scratch model (derived sizes re-derived from the new ones)."""
    if cfg.preset not in PRESETS:
        close = settings.closest_key(cfg.preset, PRESETS)
        hint = f"did you mean {close!r}? " if close else ""
        raise ValueError(f"unknown preset {cfg.preset!r}; {hint}choose auto or one of "
                         f"{sorted(PRESETS)}")
    values = dataclasses.asdict(PRESETS[cfg.preset])
    shape = {k: getattr(cfg, k) for k in MODEL_SHAPE_KEYS if getattr(cfg, k) is not None}
    if "n_head" in shape or "n_embd" in shape:
        values.update(head_dim=None, rotary_dim=None)
    if "n_head" in shape:
        values["n_kv_head"] = None
    values.update({**shape, **cfg.model_options}, vocab_size=vocab_size, bos_id=bos_id,
                  eos_id=eos_id)
    try:
        return ModelConfig(**values)
    except (TypeError, AttributeError, KeyError) as e:  # a malformed value the types let through
        raise ValueError(f"model_options {json.dumps(cfg.model_options)}: {e}") from None


# ---- What a part of a run reads of it: its settings, taken once where a run is built ----

@dataclass(frozen=True)
class ModelSettings:
    """What building a run's model reads of its TrainConfig (codelm.loading.build_model, with
    ``model_config``): the fields of these names, documented there, and ``adapter_copy``, a
    continued run's copy of its init_adapter's config (rundir.adapter_copy), which gives the
    LoRA layout."""

    preset: str
    init_from: str | None
    n_layer: int | None
    n_head: int | None
    n_embd: int | None
    mlp_hidden: int | None
    block_size: int | None
    dropout: float | None
    model_options: dict
    base_dtype: str
    quantize_bits: int
    init_adapter: str | None
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    lora_dora: bool
    lora_bias: str
    lora_modules_to_save: list[str] | None
    lora_targets: list[str] | None
    gradient_checkpointing: bool
    offload_activations: bool
    adapter_copy: Path | None = None


@dataclass(frozen=True)
class DataSettings:
    """What preparing a run's data reads of its TrainConfig (codelm.training.build's
    prepare_data: the tokenizer, the examples or problems or preference records, the batches):
    the fields of these names, documented there, and the run directory (``run_dir``), whose
    tokenizer a continued run reads (``own_tokenizer``)."""

    task: str
    data: list[str] | None
    val_data: list[str] | None
    test_data: list[str] | None
    data_options: dict
    progress: bool
    preset: str
    init_from: str | None
    block_size: int | None
    tokenizer: str | None
    tokenizer_min_freq: int
    tokenizer_max_vocab: int | None
    tokenizer_kind: str
    batch_size: int
    grad_accum: int
    seed: int
    eval_examples: int | None
    packing: bool | None
    overfit_batches: int
    problems: str | None
    val_problems: str | None
    reward_workers: int
    reward_timeout_s: float
    kto_desirable_weight: float
    kto_undesirable_weight: float
    run_dir: Path
    own_tokenizer: bool


@dataclass(frozen=True)
class StepSettings:
    """What a trainer (codelm.training.trainer.Trainer: its optimizer, schedule, step and
    evaluation) reads of its run's TrainConfig: the fields of these names, documented there
    (``max_steps``: the schedule's length outside a run, whose RunState holds its own)."""

    precision: str
    strategy: str
    compile: bool
    base_dtype: str
    optimizer: str
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    adam_eps: float
    max_steps: int | None
    warmup_steps: int
    decay_steps: int | None
    min_lr_ratio: float
    grad_clip: float
    label_smoothing: float
    eval_precision: str
    progress: bool


@dataclass(frozen=True)
class GRPOSettings:
    """What task grpo's trainer (codelm.training.rollout.GRPOTrainer: sampling, rewards, the
    policy loss) reads of its run's TrainConfig beside its StepSettings: the fields of these
    names, documented there."""

    init_from: str | None
    init_adapter: str | None
    tokenizer: str | None
    num_generations: int
    max_completion_tokens: int
    temperature: float
    seed: int
    grad_accum: int
    grpo_loss_type: str
    grpo_beta: float
    epsilon_low: float
    epsilon_high: float | None
    scale_rewards: str
    mask_truncated: bool
    partial_credit: bool
    shuffle_rewards: bool
    reward_workers: int
    reward_timeout_s: float


@dataclass(frozen=True)
class LoopSettings:
    """What the step loop (trainingmanager.train) reads of its run's TrainConfig, as the run
    trains with it (fallbacks filled, sized to its budget): the fields of these names,
    documented there (``max_steps``: as planned; the run's length is its RunState's)."""

    log_every: int
    eval_every: int
    save_every: int | None
    warmup_steps: int
    max_steps: int | None
    max_time_s: float | None
    early_stop_patience: int
    early_stop_min_delta: float
    inject_nan_at_step: int | None
    overfit_batches: int
    lr: float
    export: bool
    progress: bool


@dataclass(frozen=True)
class ExportSettings:
    """What the end of a run, its export (codelm.training.finish.export_run), reads of its
    TrainConfig: the fields of these names, documented there."""

    task: str
    data_options: dict
    sample_prompt: str | None
    sample_tokens: int
    max_completion_tokens: int
    lora_r: int
    init_from: str | None
    tokenizer: str | None
    export_merged: bool
    export_gguf: str | None
    progress: bool


# The steps --overfit and --overfit-batches take where --max-steps leaves them unset: a check
# has a step budget of its own, never the time budget's.
OVERFIT_STEPS = 400

def where_set_of(argv: Sequence[str] | None) -> Callable[[str], str]:
    """Where a key of this command line was set: its flag, its ``--config`` file, else the
    ``--resume`` run's config.json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = vars(build_parser().parse_args(argv))
    resume = resume_dir(args.get("resume"), args.get("out_dir"))
    resumed = resume and f"{Path(resume) / rundir.CONFIG_FILE} (--resume)"
    return settings.where_set_in(args, "train", resumed, typed_spellings(argv))


def typed_spellings(argv: Sequence[str]) -> dict[str, str]:
    """The keys typed in another spelling than their own flag, and that spelling: lr ->
    ``--learning_rate`` (HF Trainer's, HF_FLAGS), precision -> ``--bf16``."""
    typed = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--")]
    spellings = {**HF_FLAGS, "precision": ["--fp16", "--bf16"]}
    spelled = {}
    for flag in typed:  # the last spelling typed is the one argparse kept
        for key, aliases in spellings.items():
            if flag in aliases:
                spelled[key] = flag
            elif flag == settings.flag_of(key):
                spelled.pop(key, None)
    return spelled
